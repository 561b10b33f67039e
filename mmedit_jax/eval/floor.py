"""The FLOP floor of an edit step: the least matmul work the procedure (edit + five metrics) needs per batch.

Counted with `throughput.matmul_flops` on the jaxprs of one example's parts, for a batch of E cases whose
patches leave the language model's layers below k alone (k: the first edited layer, 0 when there is none):

  images        each distinct image of the batch encoded once (ViT + Q-Former + projection);
  prefix        each distinct input (per input name, across the batch) through the unedited layers 0 .. k-1 once;
  pre_locality  each distinct locality input through layers k .. and the head once, unedited (the top-k the
                locality metrics compare against);
  edit          each case's edit from its edit input's hidden states at layer k: the editor's forward and
                backward through the edited layers only, and its own networks (MEND's, KE's);
  post          each case's five inputs through the patched layers k .. again, the head at the answer rows for
                the three accuracy inputs and at every position for the two locality inputs (their metrics read
                all of them).

What it does not count: attention's score matmuls are counted where the layers run (they are matmuls), the
elementwise work, softmax and top-k not at all; a common prompt prefix of two inputs is not shared (distinct
inputs are whole sequences). Defined where the editor's forward takes cached features and splits at k
(`ModelFns.supports_prefix`); None otherwise (a vision-side edit re-runs the ViT by design).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mmedit_jax.case import ACCURACY_INPUTS, INPUT_NAMES, LOCALITY_INPUTS, Case, take
from mmedit_jax.editors.base import Editor
from mmedit_jax.eval.throughput import matmul_flops
from mmedit_jax.forward import teacher_forced

PARTS = ("images", "prefix", "pre_locality", "edit", "post")


@dataclasses.dataclass
class Floor:
    """FLOPs of each part for one batch of `batch` cases (`PARTS`), and how many distinct things each counted."""

    batch: int
    flops: dict
    distinct: dict

    @property
    def total(self) -> float:
        return float(sum(self.flops.values()))

    def as_dict(self) -> dict:
        return dict(floor_gflop_per_edit=self.total / 1e9 / self.batch,
                    floor_parts_gflop_per_edit={k: v / 1e9 / self.batch for k, v in self.flops.items()},
                    floor_distinct=self.distinct)


def distinct_rows(*arrays) -> int:
    """How many distinct rows the arrays `[E, ...]` hold together (row i of every array, compared bytewise)."""
    rows = np.concatenate([np.asarray(a).reshape(len(a), -1).view(np.uint8).reshape(len(a), -1) for a in arrays],
                          axis=1)
    return len(np.unique(rows, axis=0))


def distinct_inputs(cases: Case) -> dict:
    """`{input name: distinct (ids, mask, image) among the batch's E cases}`."""
    out = {}
    for name in INPUT_NAMES:
        seq, image = cases.seq(name), cases.image(name)
        out[name] = distinct_rows(seq.input_ids, seq.attention_mask, *([] if image is None else [image]))
    return out


def flop_floor(editor: Editor, params, cases: Case, prefix_layer: int | None, images: int,
               image_flops: float) -> Floor | None:
    """The floor of one step over `cases` (a host batch `[E]` with cached features, as the step runs it).

    `images`: distinct images of the batch; `image_flops`: matmul FLOPs of encoding them (`throughput`'s timed
    encoder). `params` and `editor.editor_params` may be abstract (`jax.ShapeDtypeStruct`s). None where the
    editor's forward cannot start at a layer (pixels, SERAC's memory, IKE's context).
    """
    fns = editor.fns
    if not fns.supports_prefix:
        return None
    k = prefix_layer or 0
    one = take(cases, 0)
    E = int(jax.tree.leaves(cases)[0].shape[0])
    ep = editor.editor_params
    # Parameters enter as arguments, never as closed-over constants: they may be abstract (`ShapeDtypeStruct`s,
    # shapes without memory), which counts the floor of a model too big to hold.
    flops = lambda f, *args: matmul_flops(jax.make_jaxpr(f)(params, *args))  # noqa: E731
    hidden = {name: jax.eval_shape(lambda p, c, n=name: fns.prefix(p, c.seq(n), c.image(n), k), params, one)
              for name in INPUT_NAMES}

    def edit(p, e, c, h):
        return editor.edit(e, p, c, {}, prefix=(h, k)) if editor.resumes else editor.edit(e, p, c, {})

    patch = jax.eval_shape(edit, params, ep, one, hidden["edit"])
    distinct = distinct_inputs(cases)
    parts = dict.fromkeys(PARTS, 0.0)
    parts["images"] = float(image_flops)
    for name in INPUT_NAMES:
        per = flops(lambda p, c, n=name: fns.prefix(p, c.seq(n), c.image(n), k), one)
        parts["prefix"] += distinct[name] * per
    for name in LOCALITY_INPUTS:
        per = flops(lambda p, c, h, n=name: fns.resume_logits(p, {}, c.seq(n), h, k), one, hidden[name])
        parts["pre_locality"] += distinct[name] * per
        parts["post"] += E * flops(lambda p, c, h, d, n=name: fns.resume_logits(p, d, c.seq(n), h, k),
                                   one, hidden[name], patch)
    for name in ACCURACY_INPUTS:
        parts["post"] += E * flops(lambda p, c, h, d, n=name: teacher_forced(fns, p, d, c.seq(n), c.image(n),
                                                                             prefix=(h, k))[0],
                                   one, hidden[name], patch)
    # Without `resumes` the editor runs its input from the embeddings: its unedited layers count in its edit.
    parts["edit"] = E * flops(edit, ep, one, hidden["edit"])
    return Floor(E, parts, dict(distinct, images=images))
