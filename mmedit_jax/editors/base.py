"""What every editor looks like to the evaluation harness.

An editor is a pure function `edit(editor_params, base_params, case, prior) -> patch` for ONE case; the harness
vmaps it over a batch of independent cases (each edit sees the unedited model, as in the reference's
single-edit protocol) and jits the whole edit + score step. `prior` is the patch already applied (sequential
editing); it is `{}` for independent edits.

A case is `Case`: the five teacher-forced inputs the MMEdit metrics need plus the KE condition. Images enter
as whatever the forward needs: projected image embeddings `[nq, E]` (cached per distinct image) when the editor
leaves the vision side alone, raw pixels `[3, H, W]` when it edits the vision side (FT-V).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import struct

from mmedit_jax.eval.losses import masked_nll


@struct.dataclass
class Seq:
    """One teacher-forced input. `input_ids`, `attention_mask`, `labels`: `[L]` (labels -100 off the answer)."""

    input_ids: jax.Array
    attention_mask: jax.Array
    labels: jax.Array
    # [R] int32: the positions t whose logits predict an answer token (labels[t + 1] != -100), then -1. Optional:
    # with it, accuracies and edit losses compute the last layer and the head at these R rows only, not all L.
    answer_rows: jax.Array | None = None


@struct.dataclass
class Case:
    """One edit and its evaluation inputs (add a leading `[E]` axis for a batch of cases).

    images: `{"edit", "image_rephrase", "loc_image"}` -> `[nq, E]` embeddings or `[3, H, W]` pixels.
    """

    edit: Seq  # edit_inner: image + prompt + target; Reliability, and the editors' edit loss
    rephrase: Seq  # edit_outer: image + rephrased prompt; T-Generality
    image_rephrase: Seq  # edit_outer_image: rephrased image + prompt; M-Generality
    loc: Seq  # text-only locality question; T-Locality
    loc_image: Seq  # another image and question; M-Locality
    images: dict
    cond_ids: jax.Array  # [Lc] KE condition "{pred} >> {alt} || {src}"
    cond_mask: jax.Array


# Sites under these prefixes change the image embeddings, so cached embeddings cannot be used with them.
VISION_PREFIXES = ("vision_model/", "qformer/", "language_projection", "query_tokens")


def touches_vision(sites) -> bool:
    return any(s.startswith(VISION_PREFIXES) for s in sites)


IMAGE_OF = {"edit": "edit", "rephrase": "edit", "image_rephrase": "image_rephrase", "loc": None,
            "loc_image": "loc_image"}


class ModelFns(Protocol):
    """The two forward functions editors and the harness use (single example, no batch axis)."""

    def logits(self, params, patch, seq: Seq, image) -> jax.Array:  # [L, V]
        ...

    def forward(self, params, patch, seq: Seq, image, taps=None, rows=None):  # (logits [L | R, V], captured)
        ...

    uses_pixels: bool


@dataclasses.dataclass(frozen=True)
class Editor:
    """An editor as the harness sees it.

    name: `ft-l`, `ft-v`, `mend`, `ke`.
    edit: `(editor_params, base_params, case, prior) -> patch`, for one case, pure and vmappable.
    editor_params: trained hypernetwork weights (None for FT).
    vision_side: True when patches touch the vision side, so images must enter as pixels, not cached embeds.
    resumes: `edit` also takes `prefix=(h [L, D], k)`, the unedited hidden states of `case.edit` entering
      language-model layer k (no site of the editor lies below k), and then runs its forwards from there.
    """

    name: str
    edit: Callable[..., dict]
    editor_params: Any = None
    vision_side: bool = False
    hparams: Any = None
    resumes: bool = False


def answer_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The edit loss of one example: `logits [L, V]`, `labels [L]` -> [] (`eval.losses.masked_nll`)."""
    return masked_nll(logits[None], labels[None])


def teacher_forced(model: ModelFns, params, patch, seq: Seq, image, taps=None, prefix=None):
    """`(logits, labels, captured)` of one input, in the shifted layout `answer_nll` and the accuracies take
    (`logits[t]` scored against `labels[t + 1]`).

    `prefix` `(h [L, D], k)`: the unedited hidden states of this input entering language-model layer k
    (`model.prefix`); the forward then runs layers k.. only (`patch` and `taps` must leave layers < k alone).

    Without `seq.answer_rows`: the whole forward, `logits [L, V]` and `seq.labels`. With it: the logits at the R
    answer rows only (the last layer and the head run R rows), laid out as `logits [R + 1, V]` (a zero row
    appended) and `labels [R + 1]` = (-100, the R targets, -100 at unused rows): the same loss and accuracies.
    A tapped linear of the last layer then records its input at the R rows (`captured[site]` `[R, in]`).
    """
    def forward(rows=None):
        if prefix is None:
            return model.forward(params, patch, seq, image, taps=taps, rows=rows)
        return model.resume(params, patch, seq, prefix[0], prefix[1], taps=taps, rows=rows)

    if seq.answer_rows is None:
        logits, captured = forward()
        return logits, seq.labels, captured
    rows, valid = answer_rows_of(seq)
    logits, captured = forward(rows)
    targets = jnp.where(valid, seq.labels[jnp.minimum(rows + 1, seq.labels.shape[0] - 1)], -100)
    logits = jnp.concatenate([logits, jnp.zeros_like(logits[:1])])
    return logits, jnp.concatenate([jnp.full((1,), -100, targets.dtype), targets]), captured


def answer_rows_of(seq: Seq) -> tuple[jax.Array, jax.Array]:
    """`seq.answer_rows` as `(rows [R], valid [R] bool)`, unused rows pointing at position 0."""
    valid = seq.answer_rows >= 0
    return jnp.where(valid, seq.answer_rows, 0), valid
