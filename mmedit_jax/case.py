"""The contract for one edit case: its five teacher-forced inputs under one set of names, and their answer rows.

Every layer above uses these names: the data pipeline builds token arrays under them (`data/cases.py`), editors
read `Case.edit`, scoring reads all five, the trainer's objective four. EasyEdit's names for the same inputs
(`edit_inner`, `edit_outer`, ...) appear only in `INPUTS`, for readers of the reference and for its peer.

| input            | EasyEdit           | image            | scored by    |
|------------------|--------------------|------------------|--------------|
| `edit`           | `edit_inner`       | `edit`           | Reliability  |
| `rephrase`       | `edit_outer`       | `edit`           | T-Generality |
| `image_rephrase` | `edit_outer_image` | `image_rephrase` | M-Generality |
| `loc`            | `loc`              | none             | T-Locality   |
| `loc_image`      | `loc_image`        | `loc_image`      | M-Locality   |
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

IGNORE_INDEX = -100  # label of a position that is not an answer token (the reference's value)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One of the five inputs: our name, EasyEdit's, which image it shows (None: text only) and its metric."""

    name: str
    easyedit: str
    image: str | None
    metric: str


INPUTS = (
    InputSpec("edit", "edit_inner", "edit", "reliability"),
    InputSpec("rephrase", "edit_outer", "edit", "t_generality"),
    InputSpec("image_rephrase", "edit_outer_image", "image_rephrase", "m_generality"),
    InputSpec("loc", "loc", None, "t_locality"),
    InputSpec("loc_image", "loc_image", "loc_image", "m_locality"),
)
INPUT_NAMES = tuple(i.name for i in INPUTS)
SPEC = {i.name: i for i in INPUTS}
METRICS = tuple(i.metric for i in INPUTS)  # the paper's column order
ACCURACY_INPUTS = INPUT_NAMES[:3]  # scored by (exact-match or token) accuracy on their answer tokens
LOCALITY_INPUTS = INPUT_NAMES[3:]  # scored by agreement with the unedited model's top-k
IMAGE_KEYS = ("edit", "image_rephrase", "loc_image")  # the distinct images of one case


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

    images: `{"edit", "image_rephrase", "loc_image"}` -> `[nq, E]` cached embeddings or `[3, H, W]` pixels, as the
    model's forward takes them (`forward.ModelFns.uses_pixels`).
    """

    edit: Seq  # image + prompt + target; Reliability, and the editors' edit loss
    rephrase: Seq  # image + rephrased prompt; T-Generality
    image_rephrase: Seq  # rephrased image + prompt; M-Generality
    loc: Seq  # text-only locality question; T-Locality
    loc_image: Seq  # another image and question; M-Locality
    images: dict
    cond_ids: jax.Array  # [Lc] KE condition "{pred} >> {alt} || {src}"
    cond_mask: jax.Array
    # [Lx] IKE's demonstration context (`editors/ike.py`), right-padded; None for every other editor.
    context_ids: jax.Array | None = None
    context_mask: jax.Array | None = None

    def seq(self, name: str) -> Seq:
        return getattr(self, name)

    def image(self, name: str):
        """The image input `name` shows, or None for the text-only input."""
        key = SPEC[name].image
        return None if key is None else self.images[key]


def answer_rows(labels: np.ndarray, width: int | None = None) -> np.ndarray:
    """`labels [..., L]` -> `[..., R]` int32: the positions t whose logits predict an answer token
    (`labels[..., t + 1] != -100`), ascending, then -1. R = `width`, or the most any input has (at least 1).

    Accuracies and edit losses need the logits at these rows only (`forward.teacher_forced`).
    """
    labels = np.asarray(labels)
    hits = labels[..., 1:] != IGNORE_INDEX
    need = int(hits.sum(-1).max(initial=0))
    width = max(need, 1) if width is None else width
    if need > width:
        raise ValueError(f"answer_rows: an input has {need} answer tokens, more than width {width}")
    if width > hits.shape[-1]:  # more rows than positions: the extra ones stay unused
        hits = np.pad(hits, [(0, 0)] * (hits.ndim - 1) + [(0, width - hits.shape[-1])])
    order = np.argsort(~hits, axis=-1, kind="stable")[..., :width]  # answer positions first, ascending
    taken = np.take_along_axis(hits, order, axis=-1)
    return np.where(taken, order, -1).astype(np.int32)


def answer_rows_of(seq: Seq) -> tuple[jax.Array, jax.Array]:
    """`seq.answer_rows` as `(rows [R], valid [R] bool)`, unused rows pointing at position 0."""
    valid = seq.answer_rows >= 0
    return jnp.where(valid, seq.answer_rows, 0), valid


def make_cases(batch, image_table: np.ndarray, with_answer_rows: bool = True) -> Case:
    """Host `Case`s from a data `EditBatch` (`data/cases.py`) and the table its `image_ids` index.

    `image_table` is `[N_images, nq, E]` cached image embeddings, or `[N_images, 3, H, W]` pixels for a model that
    runs the vision side itself (`forward.ModelFns.image_table` makes the right one). Images are gathered per
    case here, so host memory holds each distinct image once before this call. `with_answer_rows`: the inputs
    scored by accuracy (the edit input's loss too) carry their answer positions (`Seq.answer_rows`), so their
    forwards compute the last layer and the head at those rows only; the locality inputs need every position.
    """

    def seq(name):
        tb = getattr(batch, name)
        rows = answer_rows(tb.labels) if (with_answer_rows and name in ACCURACY_INPUTS) else None
        return Seq(tb.input_ids, tb.attention_mask, tb.labels, rows)

    images = {key: image_table[getattr(batch, key).image_ids] for key in IMAGE_KEYS}
    return Case(*(seq(name) for name in INPUT_NAMES), images, batch.cond_ids, batch.cond_mask)


def take(tree, idx):
    """Rows `idx` of every leaf of a batched pytree (a `Case`, scores, patches)."""
    return jax.tree.map(lambda a: a[idx], tree)


def pad_batch(tree, n: int):
    """Pads a host batch to `n` rows by repeating the last one (static shapes: one compile per batch size)."""
    have = jax.tree.leaves(tree)[0].shape[0]
    if have == n:
        return tree
    idx = np.concatenate([np.arange(have), np.full(n - have, have - 1)])
    return take(tree, idx)


def num_cases(tree) -> int:
    """The leading (case) axis of a batched pytree."""
    return int(jax.tree.leaves(tree)[0].shape[0])
