"""Score one edit: the five MMEdit metrics from six forward passes (five post-edit, pre-edit ones cached).

`pre_outputs` runs the unedited model once per case: its top-1 (text locality) and top-10 (multimodal locality)
tokens are what the post-edit model is compared against, and its accuracies are the pre-edit base figures.
`post_scores` runs the edited model. Both work on ONE case (`case.py`); the harness vmaps them over a batch of
edits, with the base parameters shared (`in_axes=None`) and only patches and inputs batched.
"""

from __future__ import annotations

import jax.numpy as jnp

from mmedit_jax.case import ACCURACY_INPUTS, INPUT_NAMES, LOCALITY_INPUTS, SPEC, Case, answer_rows_of
from mmedit_jax.eval import metrics as M
from mmedit_jax.forward import ModelFns, teacher_forced_group, teacher_forced_resumed


def _accuracies(model: ModelFns, params, patch, case: Case, exact_match: bool, prefixes: dict | None = None):
    """Reliability / T- / M-Generality, and the predicted tokens `[L]` (at the answer positions only where the
    inputs carry `answer_rows`, 0 elsewhere: what the rows' text needs). `prefixes`: `{input: (h, k)}` inputs
    whose forwards start from their hidden states entering layer k."""
    prefixes = prefixes or {}
    forwards = {}
    if prefixes:  # the resumed inputs as one group (`_prefixes` gives them one start layer)
        names = [n for n in ACCURACY_INPUTS if n in prefixes]
        forwards.update(zip(names, teacher_forced_resumed(model, params, patch, [case.seq(n) for n in names],
                                                          [prefixes[n][0] for n in names], prefixes[names[0]][1])))
    for names in _same_image([n for n in ACCURACY_INPUTS if n not in prefixes]):
        seqs = [case.seq(name) for name in names]
        forwards.update(zip(names, teacher_forced_group(model, params, patch, seqs, case.image(names[0]))))
    out, preds = {}, {}
    for name in ACCURACY_INPUTS:
        seq = case.seq(name)
        logits, labels = forwards[name]
        out[SPEC[name].metric] = M.edit_accuracy(logits[None], labels[None], exact_match)[0]
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # the token predicted at each step
        if seq.answer_rows is not None:  # R rows (+ the appended zero row) back to their positions
            rows, valid = answer_rows_of(seq)
            at = jnp.where(valid, rows, seq.labels.shape[0])
            pred = jnp.zeros(seq.labels.shape, jnp.int32).at[at].set(pred[:-1], mode="drop")
        preds[name] = pred
    return out, preds


def _same_image(names) -> list[list[str]]:
    """`names` grouped by the image they show (the edit input and its rephrase share one), in order."""
    groups: dict = {}
    for name in names:
        groups.setdefault(SPEC[name].image, []).append(name)
    return list(groups.values())


def _prefixes(pre: dict, prefix_layer: int | None) -> dict:
    """`{input: (hidden, k)}` for the accuracy inputs whose hidden states `pre` holds, else `{}`."""
    if prefix_layer is None:
        return {}
    return {name: (pre[f"hidden_{name}"], prefix_layer) for name in ACCURACY_INPUTS if f"hidden_{name}" in pre}


def hidden_states(model: ModelFns, params, case: Case, prefix_layer: int) -> dict:
    """`{hidden_<input>: [L, D]}`: every input's unedited hidden states entering layer `prefix_layer`, each input
    once. The inputs showing an image run as one stacked call (`prefix_group`), the text-only one apart."""
    out = {}
    for has_image in (True, False):
        names = [n for n in INPUT_NAMES if (SPEC[n].image is not None) == has_image]
        hs = model.prefix_group(params, [case.seq(n) for n in names], [case.image(n) for n in names], prefix_layer)
        out.update({f"hidden_{n}": h for n, h in zip(names, hs)})
    return out


def _locality_logits(model: ModelFns, params, patch, case: Case, pre: dict, prefix_layer: int | None):
    """Logits `[L, V]` on `loc` and `loc_image`. With `prefix_layer` k, from the hidden states entering layer k
    that `pre` holds (`hidden_loc`, `hidden_loc_image` `[L, D]`), which no patch of layers >= k changes."""
    if prefix_layer is None:
        return tuple(model.logits(params, patch, case.seq(name), case.image(name)) for name in LOCALITY_INPUTS)
    seqs = [case.seq(name) for name in LOCALITY_INPUTS]
    hs = [pre[f"hidden_{name}"] for name in LOCALITY_INPUTS]
    if len({s.attention_mask.shape[-1] for s in seqs}) == 1:  # one batch where that pads nothing: the head
        return tuple(model.resume_group(params, patch, seqs, hs, prefix_layer))  # runs every row of these
    return tuple(model.resume_logits(params, patch, s, h, prefix_layer) for s, h in zip(seqs, hs))


def pre_outputs(model: ModelFns, params, case: Case, exact_match: bool = True, base_accuracy: bool = True,
                prefix_layer: int | None = None) -> dict:
    """The unedited model's outputs one case needs: `loc_top1 [L]` and `loc_image_top10 [L, 10]` (two forward
    passes: all the five metrics need, as the reference's per-record step), and with `base_accuracy` the
    pre-edit accuracies (`reliability`, ...) and predictions of the three accuracy inputs (`pred_edit`,
    `pred_rephrase`, `pred_image_rephrase` `[L]`, in the shifted layout: `pred[t]` predicts `t + 1`) (three more);
    the locality inputs' predictions are the first column of their top-k.

    With `prefix_layer` k (the first edited language-model layer), it also returns every input's hidden states
    entering layer k (`hidden_states`: `hidden_edit`, ..., `hidden_loc_image` `[L, D]`), computed once here: the
    pre- and post-edit passes all start from them, and the editor's forward from `hidden_edit`.
    """
    out = {}
    if prefix_layer is not None:
        out.update(hidden_states(model, params, case, prefix_layer))
    loc, loc_image = _locality_logits(model, params, {}, case, out, prefix_layer)
    out.update(loc_top1=M.topk_indices(loc, 1), loc_image_top10=M.topk_indices(loc_image, 10))
    if base_accuracy:
        acc, preds = _accuracies(model, params, {}, case, exact_match, _prefixes(out, prefix_layer))
        out.update(acc, **{f"pred_{name}": p for name, p in preds.items()})
    return out


def post_scores(model: ModelFns, params, patch, case: Case, pre: dict, exact_match: bool = True,
                prefix_layer: int | None = None) -> dict:
    """The five metrics of the edited model on one case (scalars in [0, 1]), its predictions on the three accuracy
    inputs (`pred_<input> [L]`, as `pre_outputs`'s) and its locality top-k (`loc_top1 [L, 1]`, `loc_image_top10`).

    With `prefix_layer` k, `patch` must leave layers `< k` alone and `pre` come from `pre_outputs(...,
    prefix_layer=k)`: every pass then runs layers `k ..` only.
    """
    out, preds = _accuracies(model, params, patch, case, exact_match, _prefixes(pre, prefix_layer))
    loc, loc_image = _locality_logits(model, params, patch, case, pre, prefix_layer)
    # = metrics.text_locality / image_locality, with the pre-edit top-k cached instead of its logits.
    top1, top10 = M.topk_indices(loc, 1), M.topk_indices(loc_image, 10)
    out["t_locality"] = M.index_agreement(pre["loc_top1"][None], top1[None], case.loc.attention_mask[None])[0]
    out["m_locality"] = M.index_agreement(
        pre["loc_image_top10"][None], top10[None], case.loc_image.attention_mask[None])[0]
    # Whole top-k arrays out, not their first columns: on XLA CPU, slicing a `top_k` result inside the program
    # made both step programs 2.5x slower (measured: 39 -> 116 ms for the world's E = 32 edit step).
    out.update({f"pred_{name}": p for name, p in preds.items()}, loc_top1=top1, loc_image_top10=top10)
    return out
