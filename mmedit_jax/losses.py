"""The losses editors and meta-training optimise: EasyEdit's multimodal trainer (`easyeditor/trainer/losses.py`,
commit `fb2ba6a`), plus one edit's answer NLL and our optional rank-order locality term.

Shapes: `logits [B, L, V]`, `labels [B, L]` (answer ids at input positions, -100 elsewhere, not shifted),
`mask [B, L]`. Computations run in float32 whatever the logits dtype, as the reference casts to float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmedit_jax.case import IGNORE_INDEX


def answer_log_probs(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities of the answer tokens with the causal shift.

    Returns:
      token_log_probs [B, L-1] float32 (`log_softmax(logits[:, :-1])` gathered at `labels[:, 1:]`, 0 where
      masked) and mask [B, L-1] bool.
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    safe_target = jnp.where(mask, target, 0)
    token_lp = jnp.take_along_axis(log_probs, safe_target[..., None], axis=-1)[..., 0]
    return jnp.where(mask, token_lp, 0.0), mask


def masked_nll_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean NLL of each example's answer tokens, [B] (the batch-1 value of `masked_log_probs(...)["nll"]`)."""
    token_lp, mask = answer_log_probs(logits, labels)
    return -jnp.sum(token_lp, axis=-1) / jnp.sum(mask, axis=-1).astype(jnp.float32)


def masked_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Scalar edit loss: `masked_log_probs(config, logits, labels, shift=True, multimodal=True)["nll"]`.

    The reference averages over all answer tokens of the batch (token-weighted), `-sum(lp * m) / sum(m)`;
    with one example per edit (the reference's batch size 1) it equals `masked_nll_per_example`.
    """
    token_lp, mask = answer_log_probs(logits, labels)
    return -jnp.sum(token_lp) / jnp.sum(mask).astype(jnp.float32)


def answer_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The edit loss of one example: `logits [L, V]`, `labels [L]` -> [] (`masked_nll` of a batch of one)."""
    return masked_nll(logits[None], labels[None])


def kl_per_position(pre_logits: jax.Array, post_logits: jax.Array) -> jax.Array:
    """KL(softmax(pre) || softmax(post)) at each position, [B, S] float32."""
    pre_lp = jax.nn.log_softmax(pre_logits.astype(jnp.float32), axis=-1)
    post_lp = jax.nn.log_softmax(post_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(pre_lp) * (pre_lp - post_lp), axis=-1)


def kl_loc_loss(pre_logits: jax.Array, post_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Scalar locality loss, reproducing `easyeditor/trainer/losses.py::kl_loc_loss` for sequences.

    `sum_{b,t} m_bt KL_bt / sum_{b,t} m_bt`, where `m` is the model's attention mask (every non-pad position,
    prompt and image slots included, as `MultimodalTrainer.edit_step` passes it). `pre_logits` is the
    unedited model's output and should be wrapped in `jax.lax.stop_gradient` by the caller (the reference
    detaches it).
    """
    m = mask.astype(jnp.float32)
    return jnp.sum(kl_per_position(pre_logits, post_logits) * m) / jnp.sum(m)


def kl_loc_loss_per_example(pre_logits: jax.Array, post_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """`kl_loc_loss` of each example alone, [B]."""
    m = mask.astype(jnp.float32)
    return jnp.sum(kl_per_position(pre_logits, post_logits) * m, axis=-1) / jnp.sum(m, axis=-1)


def topk_rank_loss(pre_logits: jax.Array, post_logits: jax.Array, mask: jax.Array, k: int) -> jax.Array:
    """Scalar: how much the edit reorders the unedited model's top-`k` tokens (our addition, not the reference's).

    At each position the logit changes `post - pre` at the unedited top-`k` tokens, minus their mean (a shift
    common to all of them changes no ranking), squared and averaged; then the masked mean over positions.
    M-Locality compares rank-ordered top-10 lists, and the KL of `kl_loc_loss` weights ranks 5-10 by their
    tiny probabilities, so small reorderings there cost it almost nothing; `k = 11` also covers the first
    token that could enter the top 10. Shapes as `kl_loc_loss`.
    """
    pre = pre_logits.astype(jnp.float32)
    _, idx = jax.lax.top_k(pre, k)
    delta = jnp.take_along_axis(post_logits.astype(jnp.float32) - pre, idx, axis=-1)
    per_pos = jnp.mean(jnp.square(delta - jnp.mean(delta, axis=-1, keepdims=True)), axis=-1)
    m = mask.astype(jnp.float32)
    return jnp.sum(per_pos * m) / jnp.sum(m)
