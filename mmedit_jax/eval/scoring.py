"""Score one edit: the five MMEdit metrics from six forward passes (five post-edit, pre-edit ones cached).

`pre_outputs` runs the unedited model once per case: its top-1 (text locality) and top-10 (multimodal locality)
tokens are what the post-edit model is compared against, and its accuracies are the pre-edit base figures.
`post_scores` runs the edited model. Both work on ONE case; the harness vmaps them over a batch of edits,
with the base parameters shared (`in_axes=None`) and only patches and inputs batched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmedit_jax.editors.base import IMAGE_OF, Case, ModelFns
from mmedit_jax.eval import metrics as M

# metric name -> the case input it is computed on
GENERALITY = {"reliability": "edit", "t_generality": "rephrase", "m_generality": "image_rephrase"}
METRICS = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality")


def _logits(model: ModelFns, params, patch, case: Case, kind: str) -> jax.Array:
    image_key = IMAGE_OF[kind]
    image = None if image_key is None else case.images[image_key]
    return model.logits(params, patch, getattr(case, kind), image)


def _accuracies(model, params, patch, case, exact_match: bool):
    out, preds = {}, {}
    for name, kind in GENERALITY.items():
        seq = getattr(case, kind)
        logits = _logits(model, params, patch, case, kind)
        out[name] = M.edit_accuracy(logits[None], seq.labels[None], exact_match)[0]
        preds[kind] = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [L]: the token predicted at each step
    return out, preds


def pre_outputs(model: ModelFns, params, case: Case, exact_match: bool = True, base_accuracy: bool = True) -> dict:
    """The unedited model's outputs one case needs: `loc_top1 [L]` and `loc_image_top10 [L, 10]` (two forward
    passes: all the five metrics need, as the reference's per-record step), and with `base_accuracy` the
    pre-edit accuracies (`reliability`, ...) and predictions (`pred_edit [L]`) (three more)."""
    loc = _logits(model, params, {}, case, "loc")
    loc_image = _logits(model, params, {}, case, "loc_image")
    out = {"loc_top1": M.topk_indices(loc, 1), "loc_image_top10": M.topk_indices(loc_image, 10)}
    if base_accuracy:
        acc, preds = _accuracies(model, params, {}, case, exact_match)
        out.update(acc, pred_edit=preds["edit"])
    return out


def post_scores(model: ModelFns, params, patch, case: Case, pre: dict, exact_match: bool = True) -> dict:
    """The five metrics of the edited model on one case (scalars in [0, 1]) and its `pred_edit [L]`."""
    out, preds = _accuracies(model, params, patch, case, exact_match)
    loc = _logits(model, params, patch, case, "loc")
    loc_image = _logits(model, params, patch, case, "loc_image")
    # = metrics.text_locality / image_locality, with the pre-edit top-k cached instead of its logits.
    out["t_locality"] = M.index_agreement(
        pre["loc_top1"][None], M.topk_indices(loc, 1)[None], case.loc.attention_mask[None])[0]
    out["m_locality"] = M.index_agreement(
        pre["loc_image_top10"][None], M.topk_indices(loc_image, 10)[None], case.loc_image.attention_mask[None])[0]
    out["pred_edit"] = preds["edit"]
    return out
