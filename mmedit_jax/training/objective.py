"""The meta-training objective: EasyEdit's multimodal trainer loss of one edited case, its weighted mean over a
batch of edits, and KE's constrained (Lagrangian) alternative.

Per case (`MultimodalTrainer.edit_step`, EasyEdit fb2ba6a), with the editor's patch applied to the rephrase, the
image rephrase and the two locality inputs, and the unedited model on the locality inputs:

    L = cedit * NLL(rephrase) + iedit * NLL(image rephrase) + cloc * (KL(loc) + KL(loc_image))

NLL over answer tokens, and the logged edit accuracies, go through `forward.teacher_forced`, as evaluation scores
them (at the inputs' answer rows only, where the `Seq` carries them: the same values, the last layer and the head
run R rows). KL(pre || post) is averaged over every non-pad position, so it takes the full logits (`losses`).

SERAC trains with this objective through its soft mixture (EasyEdit: `supervised: false`); with `supervised: true`
it takes the SERAC paper's instead (`serac_case_losses`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmedit_jax.case import Case
from mmedit_jax.editors import ke_net as KN
from mmedit_jax.editors import serac_net as SN
from mmedit_jax.eval import metrics as M
from mmedit_jax.forward import ModelFns, teacher_forced
from mmedit_jax.losses import answer_nll, kl_loc_loss, topk_rank_loss
from mmedit_jax.training.config import TrainConfig
from mmedit_jax.training.trainables import Trainable


def case_losses(fns: ModelFns, base_params, patch, case: Case, cfg: TrainConfig) -> dict:
    """The multimodal trainer's losses of ONE edited case (scalars), plus edit accuracies for the logs."""

    def answer_terms(name):
        logits, labels, _ = teacher_forced(fns, base_params, patch, case.seq(name), case.image(name))
        acc = M.edit_accuracy(logits[None], labels[None], cfg.exact_match)[0]
        return answer_nll(logits, labels), acc

    def locality_logits(name):
        seq, image = case.seq(name), case.image(name)
        pre = jax.lax.stop_gradient(fns.logits(base_params, {}, seq, image))
        return pre, fns.logits(base_params, patch, seq, image), seq.attention_mask

    l_edit, acc_edit = answer_terms("rephrase")
    l_image_edit, acc_image = answer_terms("image_rephrase")
    loc = locality_logits("loc")
    loc_image = locality_logits("loc_image")
    l_loc = kl_loc_loss(*(x[None] for x in loc))
    l_image_loc = kl_loc_loss(*(x[None] for x in loc_image))
    total = cfg.cedit * l_edit + cfg.iedit * l_image_edit + cfg.cloc * (l_loc + l_image_loc)
    rank = {}
    if cfg.crank:
        l_rank = (topk_rank_loss(*(x[None] for x in loc), cfg.rank_k)
                  + topk_rank_loss(*(x[None] for x in loc_image), cfg.rank_k))
        total = total + cfg.crank * l_rank
        rank = {"loss/rank_loc": l_rank}
    return {"loss/total_edit": total, "loss/edit": l_edit, "loss/image_edit": l_image_edit, "loss/loc": l_loc,
            "loss/image_loc": l_image_loc, "edit/acc": acc_edit, "image_rephrase/acc": acc_image, **rank}


def serac_case_losses(fns, base_params, patch, case: Case, cfg: TrainConfig) -> dict:
    """The SERAC paper's supervised terms of ONE case whose edit is the memory's only slot (`SupervisedTrainer`):
    the counterfactual model's answer NLL on the rephrase (`cedit`) and the image rephrase (`iedit`) given the
    gold slot (teacher forcing, whatever the classifier says), and the classifier's log-similarities of the
    positives (rephrase, image rephrase) and negatives (loc, loc_image) to the edit (for `balanced_bce`)."""
    net, memory = patch["net"], patch["memory"]
    out = {}
    for name, key in (("rephrase", "loss/edit"), ("image_rephrase", "loss/image_edit")):
        seq, image = case.seq(name), case.image(name)
        if image is not None and fns.uses_pixels:
            image = fns.base.encode(base_params, {}, image[None])[0]
        logits = SN.counterfactual_logits(fns.cfg, net, memory.ctx_ids[0], memory.ctx_mask[0], seq, image)
        out[key] = answer_nll(logits, seq.labels)
        out[f"{name}/acc"] = M.edit_accuracy(logits[None], seq.labels[None], cfg.exact_match)[0]
    for name in ("rephrase", "image_rephrase", "loc", "loc_image"):
        image = fns.image_embeds(base_params, case.image(name)) if fns.cfg.scope_image else None
        out[f"logsim/{name}"] = SN.scope_scores(fns.cfg, net, memory, case.seq(name), image)[0]
    return out


def serac_supervised_loss(per_case: dict, cfg: TrainConfig, w: jax.Array) -> dict:
    """`cedit * NLL(rephrase) + iedit * NLL(image rephrase) + cloc * balanced_bce` from `serac_case_losses`,
    with means weighted by `w` (0 on padding rows: the reference's boolean indexing as masked means)."""
    mean = lambda v: jnp.sum(v * w)  # noqa: E731
    pos = jnp.stack([per_case["logsim/rephrase"], per_case["logsim/image_rephrase"]])
    neg = jnp.stack([per_case["logsim/loc"], per_case["logsim/loc_image"]])
    l_cls = SN.balanced_bce(pos, neg, jnp.broadcast_to(w, pos.shape))
    l_edit, l_image = mean(per_case["loss/edit"]), mean(per_case["loss/image_edit"])
    total = cfg.cedit * l_edit + cfg.iedit * l_image + cfg.cloc * l_cls
    return {"loss/total_edit": total, "loss/edit": l_edit, "loss/image_edit": l_image, "loss/cls": l_cls,
            "edit/acc": mean(per_case["rephrase/acc"]), "image_rephrase/acc": mean(per_case["image_rephrase/acc"]),
            "sims/pos": mean(jnp.exp(per_case["logsim/rephrase"])), "sims/neg": mean(jnp.exp(per_case["logsim/loc"]))}


def batch_loss(trainable: Trainable, cfg: TrainConfig, params, state, base_params, cases: Case, weights: jax.Array,
               training: bool):
    """Weighted mean over the E cases of `case_losses` (weights 0 on padding rows). -> (loss, (state, metrics))."""
    patches, state = trainable.batch_patches(params, state, base_params, cases, training)
    w = weights.astype(jnp.float32) / jnp.maximum(jnp.sum(weights), 1.0)
    if cfg.supervised:
        per_case = jax.vmap(lambda p, c: serac_case_losses(trainable.fns, base_params, p, c, cfg))(patches, cases)
        metrics = serac_supervised_loss(per_case, cfg, w)
        return metrics["loss/total_edit"], (state, metrics)
    per_case = jax.vmap(lambda p, c: case_losses(trainable.fns, base_params, p, c, cfg))(patches, cases)
    metrics = {k: jnp.sum(v * w) for k, v in per_case.items()}
    return metrics["loss/total_edit"], (state, metrics)


def lagrangian_loss(cfg: TrainConfig, metrics: dict, alpha: jax.Array, margin: jax.Array) -> jax.Array:
    """KE's constrained objective on the multimodal losses (design choice: the original's CR is the
    label-smoothed NLL of the edit and its paraphrase "view"; here CR is the trainer's generality terms,
    `cedit * NLL(rephrase) + iedit * NLL(image rephrase)`, without label smoothing, and the constraint is on
    the summed locality KL of the text and multimodal locality inputs)."""
    cr = cfg.cedit * metrics["loss/edit"] + cfg.iedit * metrics["loss/image_edit"]
    kl = metrics["loss/loc"] + metrics["loss/image_loc"]
    return KN.lagrangian(cr, {"kl": kl}, {"kl": alpha}, {"kl": margin})
