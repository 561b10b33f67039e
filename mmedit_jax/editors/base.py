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
from flax import struct

from mmedit_jax.eval.losses import masked_nll


@struct.dataclass
class Seq:
    """One teacher-forced input. `input_ids`, `attention_mask`, `labels`: `[L]` (labels -100 off the answer)."""

    input_ids: jax.Array
    attention_mask: jax.Array
    labels: jax.Array


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

    uses_pixels: bool


@dataclasses.dataclass(frozen=True)
class Editor:
    """An editor as the harness sees it.

    name: `ft-l`, `ft-v`, `mend`, `ke`.
    edit: `(editor_params, base_params, case, prior) -> patch`, for one case, pure and vmappable.
    editor_params: trained hypernetwork weights (None for FT).
    vision_side: True when patches touch the vision side, so images must enter as pixels, not cached embeds.
    """

    name: str
    edit: Callable[[Any, Any, Case, dict], dict]
    editor_params: Any = None
    vision_side: bool = False
    hparams: Any = None


def answer_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The edit loss of one example: `logits [L, V]`, `labels [L]` -> [] (`eval.losses.masked_nll`)."""
    return masked_nll(logits[None], labels[None])
