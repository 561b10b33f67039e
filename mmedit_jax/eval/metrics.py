"""The five MMEdit metrics, computed as EasyEdit computes them (May-2024 state, commit `fb2ba6a`).

Inputs are teacher-forced model outputs on the arrays built by `mmedit_jax.data.cases`:
`logits [B, L, V]`, `labels [B, L]` (answer token ids at their input positions, -100 elsewhere, *not*
shifted) and `attention_mask [B, L]` (1 on image slots and text, 0 on padding). Every function returns one
value per example, `[B]` float32, and is a pure jnp function (jit/vmap friendly, no host syncs).

| paper metric | EasyEdit log name   | input             | function here               |
|--------------|---------------------|-------------------|-----------------------------|
| Reliability  | `inner/acc`         | `edit`            | `edit_accuracy`             |
| T-Generality | `edit/acc`          | `rephrase`        | `edit_accuracy`             |
| M-Generality | `image_rephrase/acc`| `image_rephrase`  | `edit_accuracy`             |
| T-Locality   | `loc/acc`           | `loc`             | `text_locality` (top-1)     |
| M-Locality   | `image_loc/acc`     | `loc_image`       | `image_locality` (top-10)   |

Differences from the reference that do not change a batch-1 number: the reference runs batch size 1, so its
locality means over every position of the sequence; here padding positions (mask 0) are excluded so a padded
batch scores each example as if it ran alone. Ties among logits are broken by `lax.top_k` / `argmax` (lowest
index first); torch's `topk` tie order is unspecified, so exact ties can differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmedit_jax.case import IGNORE_INDEX


def shifted_answer_predictions(
    logits: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The causal shift of `multiclass_log_probs(..., shift=True, multimodal=True)` (EasyEdit `losses.py`).

    Args:
      logits: [B, L, V]; labels: [B, L] with -100 on non-answer positions.

    Returns:
      pred [B, L-1] int32 (argmax of logits[:, :-1]), target [B, L-1] int32 (labels[:, 1:], 0 where masked),
      mask [B, L-1] bool (labels[:, 1:] != -100).
    """
    pred = jnp.argmax(logits[:, :-1], axis=-1).astype(jnp.int32)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    return pred, jnp.where(mask, target, 0).astype(jnp.int32), mask


def token_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Teacher-forced answer-token accuracy, [B].

    Reproduces `easyeditor/trainer/losses.py::multiclass_log_probs(exact_match=False)` as called by
    `MultimodalTrainer.edit_step` through `masked_log_probs(..., shift=True, multimodal=True)` (and
    `compute_multimodal_edit_quality` in `easyeditor/evaluate`): `sum(correct & mask) / sum(mask)` with
    `pred = argmax(logits[:, :-1])`, `target = labels[:, 1:]`. An example without answer tokens gives NaN
    (0/0, as in the reference).
    """
    pred, target, mask = shifted_answer_predictions(logits, labels)
    correct = jnp.sum((pred == target) & mask, axis=-1)
    return correct.astype(jnp.float32) / jnp.sum(mask, axis=-1).astype(jnp.float32)


def exact_match(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 iff every answer token is predicted (teacher-forced), else 0.0; [B].

    Reproduces `multiclass_log_probs(exact_match=True)` (EasyEdit `losses.py`, added 2024-04-01 `51fa46c`):
    `(pred.masked_fill(~mask, 0) == target.masked_fill(~mask, 0)).all(-1)`.
    """
    pred, target, mask = shifted_answer_predictions(logits, labels)
    return jnp.all((pred == target) | ~mask, axis=-1).astype(jnp.float32)


def edit_accuracy(logits: jax.Array, labels: jax.Array, use_exact_match: bool = False) -> jax.Array:
    """Reliability / T-Generality / M-Generality, [B]: `exact_match` if `use_exact_match` (the
    `exact_match: True` of EasyEdit's BLIP-2 MEND configs) else `token_accuracy`."""
    return exact_match(logits, labels) if use_exact_match else token_accuracy(logits, labels)


def topk_agreement(pre_logits: jax.Array, post_logits: jax.Array, mask: jax.Array, k: int) -> jax.Array:
    """Ordered top-k agreement of post- vs pre-edit predictions, averaged over masked-in positions; [B].

    At each position t the r-th most likely token of the pre- and post-edit distributions are compared for
    r = 1..k (rank-wise equality, as `topk(softmax(logits), k).indices` compared element-wise); the score
    is `sum_t mask_t * sum_r eq_{t,r} / (k * sum_t mask_t)`. The ranking is taken on logits, which orders
    tokens as softmax does.

    Args:
      pre_logits, post_logits: [B, S, V]; mask: [B, S] (nonzero = counted).
    """
    return index_agreement(topk_indices(pre_logits, k), topk_indices(post_logits, k), mask)


def topk_indices(logits: jax.Array, k: int) -> jax.Array:
    """`[..., S, V] -> [..., S, k]` int32, most likely first: what locality compares. The harness keeps these
    for the pre-edit model instead of its `[S, V]` logits."""
    return jax.lax.top_k(logits, k)[1].astype(jnp.int32)


def index_agreement(pre_top: jax.Array, post_top: jax.Array, mask: jax.Array) -> jax.Array:
    """Rank-wise agreement of two `[B, S, k]` top-k index arrays, averaged over masked-in positions; [B]."""
    agree = jnp.mean((pre_top == post_top).astype(jnp.float32), axis=-1)  # [B, S]
    mask = mask.astype(jnp.float32)
    return jnp.sum(agree * mask, axis=-1) / jnp.sum(mask, axis=-1)


def text_locality(pre_logits: jax.Array, post_logits: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """T-Locality, [B]: top-1 agreement of post- vs pre-edit logits on the text-only `loc` input.

    Reproduces `MultimodalTrainer.edit_step`'s `loc/acc` (EasyEdit `easyeditor/trainer/MultimodalTrainer.py`):
    `topk(softmax(post), 1) == topk(softmax(base), 1)` averaged over all S positions of the sequence (prompt
    and answer, unshifted; the ground-truth answer is never used). Padding is excluded via `attention_mask`.
    """
    return topk_agreement(pre_logits, post_logits, attention_mask, k=1)


def image_locality(pre_logits: jax.Array, post_logits: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """M-Locality, [B]: ordered top-10 agreement on the `loc_image` input.

    Reproduces `MultimodalTrainer.edit_step`'s `image_loc/acc`: rank-wise equality of
    `topk(softmax(logits), 10).indices` of post vs base, averaged over all positions including the query
    (image) slots, i.e. `(1 / (10 S)) sum_t sum_r [top_r(post_t) = top_r(pre_t)]`; padding excluded.
    """
    return topk_agreement(pre_logits, post_logits, attention_mask, k=10)


def answer_topk_agreement(
    pre_logits: jax.Array, post_logits: jax.Array, labels: jax.Array, k: int = 1
) -> jax.Array:
    """Locality variant restricted to answer positions (shifted, like the edit metrics); [B].

    `k=1` is the paper-era editor path (EasyEdit `64b4057`, `MultimodalEditor.edit`: `np.mean(np.equal(post
    locality_output, pre locality_output))` where `locality_output` are argmax ids at the target positions);
    `k=10` on answer positions approximates the April-2024 IKE path (top-10 for both localities).
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    return topk_agreement(pre_logits[:, :-1], post_logits[:, :-1], mask, k)


def locality(
    pre_logits: jax.Array,
    post_logits: jax.Array,
    attention_mask: jax.Array,
    labels: jax.Array,
    k: int,
    positions: str = "all",
) -> jax.Array:
    """Locality with switches, [B]: `positions="all"` (MultimodalTrainer, canonical) counts every non-pad
    position; `positions="answer"` counts only the shifted answer positions (paper-era editor path)."""
    if positions == "all":
        return topk_agreement(pre_logits, post_logits, attention_mask, k)
    if positions == "answer":
        return answer_topk_agreement(pre_logits, post_logits, labels, k)
    raise ValueError(f"positions must be 'all' or 'answer', got {positions!r}")


def mmedit_metrics(
    post: dict[str, jax.Array],
    pre_loc_logits: jax.Array,
    pre_loc_image_logits: jax.Array,
    batch,
    use_exact_match: bool = False,
    locality_positions: str = "all",
    text_k: int = 1,
    image_k: int = 10,
) -> dict[str, jax.Array]:
    """All five metrics of a batch of cases, each [B].

    Args:
      post: post-edit logits per input name (`case.INPUT_NAMES`), each [B, L_name, V].
      pre_loc_logits, pre_loc_image_logits: pre-edit logits on `loc` / `loc_image` (computed once per case).
      batch: an `EditBatch` (or anything with those five `TokenBatch`-like attributes).
      use_exact_match: EM instead of token accuracy for the three edit metrics.
      locality_positions, text_k, image_k: the locality switches (defaults: MultimodalTrainer).

    Returns:
      {"reliability", "t_generality", "m_generality", "t_locality", "m_locality"} -> [B] float32.
    """
    def acc(name):
        return edit_accuracy(post[name], getattr(batch, name).labels, use_exact_match)

    return {
        "reliability": acc("edit"),
        "t_generality": acc("rephrase"),
        "m_generality": acc("image_rephrase"),
        "t_locality": locality(pre_loc_logits, post["loc"], batch.loc.attention_mask, batch.loc.labels,
                               text_k, locality_positions),
        "m_locality": locality(pre_loc_image_logits, post["loc_image"], batch.loc_image.attention_mask,
                               batch.loc_image.labels, image_k, locality_positions),
    }
