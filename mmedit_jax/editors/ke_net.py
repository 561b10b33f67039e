"""KnowledgeEditor (KE; De Cao et al., EMNLP 2021) hypernetwork as pure functions, with factored patches.

The design follows nicola-decao/KnowledgeEditor `src/models/one_shot_learner.py` and its ports (mend
`algs/efk.py` "EFK", EasyEdit's deleted `trainer/algs/KE.py`):

  condition text ids -> trainable embedding (initialised from the base model's token embeddings)
    -> 1-layer BiLSTM, final states [h_fwd at the last valid token ; h_bwd at token 0]  (allennlp's
       PytorchSeq2VecWrapper over a packed sequence)
    -> FeedForward(2H -> C, tanh) = condition c [C]
  per edited matrix (torch layout m x n, here m = out, n = in, i.e. an nn.Linear):
    weight-normalised Linear(C -> hidden) -> tanh -> weight-normalised Linear(hidden -> 2(m+n)+1)
    split in this order: [a_col (n), a_row (m), b_col (n), b_row (m), eta (1)]
    mask   a = softmax(a_row)^T a_col   (m x n, softmax over the out dim)
    offset b = softmax(b_row)^T b_col
    update delta_W = max_scale * sigmoid(eta) * (grad_W * a + b),  W' = W + delta_W (added, as the reference).

With grad_W = sum_t delta_t u_t^T (torch layout), the update is low-rank. In Flax layout (`W: [in, out]`):

    delta_W = s * [ sum_t (a_col * m_t u_t) (r * delta_t)^T + b_col r_b^T ],  r = softmax(a_row), r_b = softmax(b_row)

i.e. the patch `(a = [a_col * u_t ...; b_col] [T+1, in], b = [r * delta_t ...; r_b] [T+1, out], scale = s)`,
rank T+1, never a dense matrix. `delta_t` must be the gradient of the loss the reference differentiates (the
plain token-mean NLL of the edit example with the new target), `u_t` the layer input; padded rows are masked.

Design choices where no reference exists (multimodal KE is not in EasyEdit; the MMEdit paper's KE baseline
code is not public):
  * the condition is the text string `"{pred} >> {alt} || {src}"` (EasyEdit's multimodal datasets build it),
    tokenised with the base LM's tokenizer; the image does not enter the conditioner, only the gradient
    (which comes from the multimodal forward on the edited LM matrices);
  * one condition per edit (the original conditions a whole batch on its single edit); E edits are vmapped;
  * the mask of the conditioner is explicit (the reference's `padding_idx=0` does not match OPT/BART pads,
    and it also freezes embedding row 0; here every row trains);
    any padding layout works: valid tokens are moved to the front (stable) before the packed-LSTM scan;
  * sizes default to the EFK port: LSTM hidden 512, condition 768, head hidden 512, max_scale 1.

Parameter tree (`init_ke`):
    {"embedding": [V, E],
     "lstm": {"fwd": LSTM, "bwd": LSTM},  LSTM = {"w_ih": [E, 4H], "w_hh": [H, 4H], "bias": [4H]}
                                          (gate order i, f, g, o as torch; bias = b_ih + b_hh)
     "cond": {"kernel": [2H, C], "bias": [C]},
     "heads": {site: {"hidden": WN(C, hidden), "out": WN(hidden, 2(in+out)+1)}}}
    WN(i, o) = {"v": [i, o], "g": [o], "bias": [o]}: kernel = g * v / ||v||_(axis 0) (torch weight_norm, dim=0).

Objectives: the MEND-style objective (`cedit * L_edit + cloc * KL`, EasyEdit/EFK) lives in the trainer. The
original constrained objective's pieces are here: `lagrangian`, `init_multipliers`, `multiplier_optimizer`
(gradient ascent, RMSprop centered as the original), `clamp_multipliers`, `shrink_margins`, `lp_distance`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class KEConfig:
    """KE sizes (defaults: the EFK port used by MEND and EasyEdit; the original used 128 / 1024 / 128)."""

    lstm_hidden: int = 512
    condition_dim: int = 768
    hidden_dim: int = 512
    max_scale: float = 1.0

    def __post_init__(self):
        for f in ("lstm_hidden", "condition_dim", "hidden_dim"):
            if getattr(self, f) < 1:
                raise ValueError(f"KEConfig.{f}={getattr(self, f)} must be >= 1")


# --------------------------------------------------------------------------------------------------
# Init (torch defaults, so a fresh KE matches a fresh reference in distribution).


def _uniform(rng, shape, bound):
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def _init_wn(rng, fan_in: int, fan_out: int) -> dict:
    """weight_norm(Linear): v from nn.Linear's init, g = ||v|| per output unit (so the kernel starts as v)."""
    k1, k2 = jax.random.split(rng)
    bound = 1.0 / math.sqrt(fan_in)
    v = _uniform(k1, (fan_in, fan_out), bound)
    return {"v": v, "g": jnp.linalg.norm(v, axis=0), "bias": _uniform(k2, (fan_out,), bound)}


def _init_lstm(rng, emb: int, hidden: int) -> dict:
    k1, k2, k3 = jax.random.split(rng, 3)
    bound = 1.0 / math.sqrt(hidden)
    # torch has b_ih + b_hh, each U(-bound, bound); one summed bias is the same function.
    return {"w_ih": _uniform(k1, (emb, 4 * hidden), bound), "w_hh": _uniform(k2, (hidden, 4 * hidden), bound),
            "bias": _uniform(k3, (4 * hidden,), bound) + _uniform(jax.random.fold_in(k3, 1), (4 * hidden,), bound)}


def head_width(shape: tuple[int, int]) -> int:
    """Output width of a site's head: `2 (in + out) + 1`."""
    return 2 * (shape[0] + shape[1]) + 1


def init_ke(rng: jax.Array, cfg: KEConfig, shapes: Mapping[str, tuple[int, int]], embeddings: jax.Array) -> dict:
    """Fresh KE parameters. `shapes: {site: (in, out)}`; `embeddings: [V, E]` the base LM's token embeddings."""
    if embeddings.ndim != 2:
        raise ValueError(f"init_ke: embeddings must be [vocab, dim], got {embeddings.shape}")
    k_f, k_b, k_c, k_h = jax.random.split(rng, 4)
    emb = embeddings.shape[1]
    h = cfg.lstm_hidden
    heads = {}
    for i, (site, shape) in enumerate(shapes.items()):
        k1, k2 = jax.random.split(jax.random.fold_in(k_h, i))
        heads[site] = {"hidden": _init_wn(k1, cfg.condition_dim, cfg.hidden_dim),
                       "out": _init_wn(k2, cfg.hidden_dim, head_width(shape))}
    kc1, kc2 = jax.random.split(k_c)
    bound = 1.0 / math.sqrt(2 * h)
    return {
        "embedding": jnp.asarray(embeddings, jnp.float32),
        "lstm": {"fwd": _init_lstm(k_f, emb, h), "bwd": _init_lstm(k_b, emb, h)},
        "cond": {"kernel": _uniform(kc1, (2 * h, cfg.condition_dim), bound),
                 "bias": _uniform(kc2, (cfg.condition_dim,), bound)},
        "heads": heads,
    }


# --------------------------------------------------------------------------------------------------
# Conditioner.


def _lstm_final(p: dict, x: jax.Array, valid: jax.Array) -> jax.Array:
    """Final hidden state of an LSTM over `x: [L, E]`, updating only where `valid: [L]` (a prefix)."""
    hidden = p["w_hh"].shape[0]
    gates_x = x @ p["w_ih"] + p["bias"]  # [L, 4H], the input part for every step at once

    def step(carry, inp):
        h, c = carry
        gx, ok = inp
        i, f, g, o = jnp.split(gx + h @ p["w_hh"], 4)
        c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
        return (jnp.where(ok, h_new, h), jnp.where(ok, c_new, c)), None

    zeros = jnp.zeros((hidden,), x.dtype)
    (h, _), _ = jax.lax.scan(step, (zeros, zeros), (gates_x, valid))
    return h


def bilstm_final(lstm: dict, x: jax.Array, mask: jax.Array) -> jax.Array:
    """`[h_fwd(last valid token); h_bwd(first valid token)]`, `[2H]`, as a packed bidirectional LSTM.

    `x: [L, E]`, `mask: [L]` (1 = token). Valid tokens are moved to the front in order (so left or right
    padding both work); the backward direction reads each sequence reversed within its own length.
    """
    keep = mask.astype(bool)
    order = jnp.argsort(~keep, stable=True)
    x = x[order]
    length = keep.sum()
    steps = jnp.arange(x.shape[0])
    valid = steps < length
    h_fwd = _lstm_final(lstm["fwd"], x, valid)
    rev = jnp.clip(length - 1 - steps, 0, x.shape[0] - 1)
    h_bwd = _lstm_final(lstm["bwd"], x[rev], valid)
    return jnp.concatenate([h_fwd, h_bwd])


def encode_condition(params: dict, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Condition vector `c: [C]` from condition token ids `[L]` and mask `[L]`."""
    if ids.ndim != 1 or mask.shape != ids.shape:
        raise ValueError(f"encode_condition: expected ids [L] and mask [L], got {ids.shape} and {mask.shape}")
    x = params["embedding"][ids]
    h = bilstm_final(params["lstm"], x, mask)
    return jnp.tanh(h @ params["cond"]["kernel"] + params["cond"]["bias"])


# --------------------------------------------------------------------------------------------------
# Per-site heads and the factored update.


def weight_norm_kernel(p: dict) -> jax.Array:
    """`g * v / ||v||`, the norm over the input axis (per output unit)."""
    return p["g"] * p["v"] / jnp.linalg.norm(p["v"], axis=0)


def _wn_dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ weight_norm_kernel(p) + p["bias"]


def head_outputs(head: dict, c: jax.Array, shape: tuple[int, int]) -> dict:
    """The head's split outputs for a site of Flax shape `(in, out)`:
    `{"a_col": [in], "a_row": [out], "b_col": [in], "b_row": [out], "eta": []}` (reference order)."""
    n_in, n_out = shape
    raw = _wn_dense(head["out"], jnp.tanh(_wn_dense(head["hidden"], c)))
    if raw.shape[-1] != head_width(shape):
        raise ValueError(f"KE head has {raw.shape[-1]} outputs; a site of shape (in={n_in}, out={n_out}) needs "
                         f"{head_width(shape)}")
    cuts = [n_in, n_in + n_out, 2 * n_in + n_out, 2 * (n_in + n_out)]
    a_col, a_row, b_col, b_row, eta = jnp.split(raw, cuts)
    return {"a_col": a_col, "a_row": a_row, "b_col": b_col, "b_row": b_row, "eta": eta[0]}


def ke_patch(cfg: KEConfig, params: dict, site: str, c: jax.Array, u: jax.Array, delta: jax.Array,
             mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One site's update as `(a [T+1, in], b [T+1, out], scale [])`: `W + scale * a.T @ b`.

    `c: [C]` the condition; `u: [T, in]` layer inputs, `delta: [T, out]` output gradients, `mask: [T]`.
    """
    if site not in params["heads"]:
        raise KeyError(f"KE has no head for site {site!r} (heads: {sorted(params['heads'])})")
    if u.ndim != 2 or delta.ndim != 2 or u.shape[0] != delta.shape[0] or mask.shape != u.shape[:1]:
        raise ValueError(f"KE site {site!r}: expected u [T, in], delta [T, out], mask [T]; got {u.shape}, "
                         f"{delta.shape}, {mask.shape}")
    out = head_outputs(params["heads"][site], c, (u.shape[1], delta.shape[1]))
    u, delta = jax.lax.stop_gradient((u, delta))  # the gradient fed to KE is a constant, as the reference
    m = mask.astype(jnp.float32)[:, None]
    a = jnp.concatenate([u.astype(jnp.float32) * m * out["a_col"], out["b_col"][None]], axis=0)
    b = jnp.concatenate([delta.astype(jnp.float32) * jax.nn.softmax(out["a_row"]),
                         jax.nn.softmax(out["b_row"])[None]], axis=0)
    scale = cfg.max_scale * jax.nn.sigmoid(out["eta"])
    return a, b, scale


def ke_patches(cfg: KEConfig, params: dict, cond_ids: jax.Array, cond_mask: jax.Array,
               inputs: Mapping[str, tuple[jax.Array, jax.Array]], masks: Mapping[str, jax.Array]) -> dict:
    """All sites of one edit: `{site: (a, b, scale)}`. vmap over edits (everything per edit has a leading E)."""
    c = encode_condition(params, cond_ids, cond_mask)
    return {site: ke_patch(cfg, params, site, c, u, d, masks[site]) for site, (u, d) in inputs.items()}



# --------------------------------------------------------------------------------------------------
# The original constrained objective (De Cao et al.): CR + sum_k alpha_k (D_k - margin_k), alpha_k >= 0 ascended.


def init_multipliers(names=("kl",)) -> dict:
    """Lagrange multipliers, 1 each as the original (`divergences` kl / lp / both)."""
    return {n: jnp.ones((), jnp.float32) for n in names}


def lagrangian(cr: jax.Array, divergences: Mapping[str, jax.Array], multipliers: Mapping[str, jax.Array],
               margins: Mapping[str, jax.Array]) -> jax.Array:
    """`cr + sum_k alpha_k * (D_k - margin_k)` over the multipliers' names. Margins are arrays (no recompile
    when they shrink). Minimise over the editor, maximise over alpha (`multiplier_optimizer`)."""
    return cr + sum(multipliers[k] * (divergences[k] - margins[k]) for k in multipliers)


def multiplier_optimizer(learning_rate=0.1) -> optax.GradientTransformation:
    """Gradient *ascent* on the multipliers with centered RMSprop (the original's optimiser, lr 0.1; its linear
    warmup schedule can be passed as `learning_rate`). Apply `clamp_multipliers` after each update."""
    return optax.chain(optax.scale(-1.0), optax.rmsprop(learning_rate, centered=True))


def clamp_multipliers(multipliers: Mapping[str, jax.Array]) -> dict:
    return {k: jnp.maximum(v, 0.0) for k, v in multipliers.items()}


def shrink_margins(margins: Mapping[str, jax.Array], min_margins: Mapping[str, jax.Array], flipped_acc,
                   factor: float = 0.8, threshold: float = 0.9) -> dict:
    """End of validation: if the edit success ("flipped" accuracy) exceeds `threshold`, `m <- max(0.8 m, m_min)`."""
    return {k: jnp.where(flipped_acc > threshold, jnp.maximum(m * factor, min_margins[k]), m)
            for k, m in margins.items()}


def lp_distance(patches: Mapping[str, tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """The original's LP (p = 2): mean over sites of `sqrt(mean(delta_W ** 2))`, computed factored:
    `||s a^T b||_F^2 = s^2 * sum((a a^T) * (b b^T))`, no dense delta."""
    vals = []
    for a, b, s in patches.values():
        sq = jnp.square(s) * jnp.sum((a @ a.T) * (b @ b.T))
        vals.append(jnp.sqrt(jnp.maximum(sq, 0.0) / (a.shape[-1] * b.shape[-1])))
    return sum(vals) / len(vals)


__all__ = [
    "KEConfig", "init_ke", "head_width", "bilstm_final", "encode_condition", "weight_norm_kernel",
    "head_outputs", "ke_patch", "ke_patches", "init_multipliers", "lagrangian",
    "multiplier_optimizer", "clamp_multipliers", "shrink_margins", "lp_distance",
]
