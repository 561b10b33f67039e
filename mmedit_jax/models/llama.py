"""The LLaMA decoder in Flax Linen, as transformers' `LlamaForCausalLM` (MiniGPT-4's Vicuna).

token embeddings -> `num_hidden_layers` pre-RMSNorm layers (rotary self-attention with grouped-query K/V, causal +
padding mask; SwiGLU MLP) scanned with `run_stack` -> `norm` -> `lm_head` (untied; the embedding table when
`tie_word_embeddings`).

Numerics follow transformers: RMSNorm statistics in float32, the normalised values cast back to the compute dtype
before the weight; rotary cos/sin computed in float32 from `positions * inv_freq` (half-split layout, `rotate_half`)
and cast to the compute dtype; attention softmax in float32.

Positions: `arange(L)` when none are given (transformers' forward, and EasyEdit's MiniGPT-4, whatever the
padding); generation derives them from the mask (`position_ids`). Rotary attention depends only on position
differences, so the two agree at every real token up to rounding.

`LlamaDecoder` has the OPT decoder's interface (`embed`, `head`, `prefix`, `resume`, `__call__` with `patch`,
`taps`, `cache`/`cache_index`/`key_mask`, `positions`, `rows`), so a model that feeds it `inputs_embeds` (MiniGPT-4
splicing image embeddings into the prompt) uses it as BLIP-2 uses OPT. Its parameters mirror transformers' names
below `model.` (`embed_tokens`, `layers/{self_attn/{q,k,v,o}_proj, mlp/{gate,up,down}_proj, input_layernorm,
post_attention_layernorm}`, `norm`) plus `lm_head`; `Llama` puts it under `language_model`, so its sites are
`language_model/layers/{i}/mlp/down_proj` etc., and `LlamaModel` is the public object (config + params + module).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax.models import generate as generate_lib
from mmedit_jax.models.config import LlamaConfig
from mmedit_jax.models.layers import (
    EditView,
    PatchableDense,
    attention_bias,
    below_layer,
    child,
    from_layer,
    heads_major,
    init_stack,
    masked_scores,
    run_stack,
    sequence_major,
    take_rows,
)
from mmedit_jax.sites import LM_STACK

STACK_PREFIX = LM_STACK

# The linears of a layer that see each position on its own (not keys/values): with `rows`, they run on those rows.
ROW_SITES = ("self_attn/q_proj", "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


def position_ids(attention_mask: jax.Array) -> jax.Array:
    """Generation positions: `[B, L]` mask -> `cumsum(mask) - 1` at real tokens, 1 at padding (EasyEdit's copy of
    transformers; transformers 5 puts 0 there: padding is never a key, so the choice reaches no real token)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 1)


def rotary(positions: jax.Array, head_dim: int, theta: float, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """`positions [B, L]` -> `(cos, sin)`, each `[B, L, head_dim]`: float32 angles `position * theta^(-2i/d)`, the
    frequencies repeated over both halves, cast to `dtype` (transformers' `LlamaRotaryEmbedding`)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x [B, L, H, Dh]` rotated: `x * cos + rotate_half(x) * sin`, `rotate_half(x) = (-x2, x1)` for halves x1, x2."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    half = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :] + half * sin[:, :, None, :]


class RMSNorm(nn.Module):
    """`scale * (x * rsqrt(mean(x^2) + eps))`, the statistics in float32, cast to `dtype` before the scale."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class LlamaAttention(nn.Module):
    """`q_proj` `[D, H * Dh]`, `k_proj`/`v_proj` `[D, KVH * Dh]` (query head h reads K/V head `h // (H / KVH)`,
    transformers' `repeat_kv`), rotary q and k, scaled masked softmax, `o_proj` `[H * Dh, D]`."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, rope, edits: EditView | None = None, cache=None, cache_index=None, rows=None):
        """x `[B, L, D]`, mask bool `[B, 1, L | R, Lk]`, rope `(cos, sin)` `[B, L, Dh]`; cache `(k, v)` each
        `[B, T, KVH, Dh]` or None. `rows` `[B, R]`: only these positions query (keys and values from all L).

        Returns `(out [B, L | R, D], new cache or None)`; with a cache, `Lk == T` and keys are stored rotated.
        """
        cfg = self.config
        heads, kv_heads, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda n, name: PatchableDense(  # noqa: E731
            n, use_bias=cfg.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        cos, sin = rope
        xq, qcos, qsin = x, cos, sin
        if rows is not None:
            xq, qcos, qsin = take_rows(x, rows), take_rows(cos, rows), take_rows(sin, rows)
        q = dense(heads * dh, "q_proj")(xq, child(edits, "q_proj"))
        k = dense(kv_heads * dh, "k_proj")(x, child(edits, "k_proj"))
        v = dense(kv_heads * dh, "v_proj")(x, child(edits, "v_proj"))
        q = rotate(q.reshape(*q.shape[:-1], heads, dh), qcos, qsin)
        k = rotate(k.reshape(*k.shape[:-1], kv_heads, dh), cos, sin)
        v = v.reshape(*v.shape[:-1], kv_heads, dh)
        new_cache = None
        if cache is not None:
            ck, cv = cache
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
            new_cache = (k, v)
        q = q.reshape(*q.shape[:2], kv_heads, heads // kv_heads, dh)  # query head h = (h // G, h % G)
        scores = jnp.einsum("bhgqd,bhkd->bhgqk", heads_major(q), heads_major(k.astype(q.dtype)))
        scores = scores * jnp.asarray(dh**-0.5, q.dtype)
        # A finite fill: rows with no visible key (left padding) get a uniform softmax, not NaN.
        scores = masked_scores(scores.astype(jnp.float32), mask[:, :, None])
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = sequence_major(jnp.einsum("bhgqk,bhkd->bhgqd", probs, heads_major(v.astype(self.dtype))))
        out = out.reshape(*xq.shape[:-1], heads * dh)
        return dense(cfg.hidden_size, "o_proj")(out, child(edits, "o_proj")), new_cache


class LlamaMLP(nn.Module):
    """`down_proj(silu(gate_proj(x)) * up_proj(x))`."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, edits: EditView | None = None):
        cfg = self.config
        dense = lambda n, name: PatchableDense(  # noqa: E731
            n, use_bias=cfg.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        gate = dense(cfg.intermediate_size, "gate_proj")(x, child(edits, "gate_proj"))
        up = dense(cfg.intermediate_size, "up_proj")(x, child(edits, "up_proj"))
        return dense(cfg.hidden_size, "down_proj")(jax.nn.silu(gate) * up, child(edits, "down_proj"))


class LlamaLayer(nn.Module):
    """One decoder layer; the scanned unit. `(h [B, L, D], mask, rope) -> (h, new cache)`.

    With `rows` `[B, R]` only those positions go through the layer (queries, residual, MLP; keys and values still
    come from all L) and `h` comes back `[B, R, D]`. Taps on the row-wise linears (`ROW_SITES`) then take and record
    `R` rows.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, rope, cache_index=None, edits: EditView | None = None, xs=None, rows=None):
        cfg = self.config
        if rows is not None:
            mask = jnp.take_along_axis(mask, rows[:, None, :, None], axis=2)
            if edits is not None and edits.taps:
                edits = edits.with_taps({p: take_rows(e, rows) if p in ROW_SITES else e for p, e in edits.taps.items()})
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731
        attn = LlamaAttention(cfg, self.dtype, self.param_dtype, name="self_attn")
        a, new_cache = attn(norm("input_layernorm")(h), mask, rope, child(edits, "self_attn"), cache=xs,
                            cache_index=cache_index, rows=rows)
        h = (h if rows is None else take_rows(h, rows)) + a
        mlp = LlamaMLP(cfg, self.dtype, self.param_dtype, name="mlp")
        h = h + mlp(norm("post_attention_layernorm")(h), child(edits, "mlp"))
        return h, new_cache


class LlamaDecoder(nn.Module):
    """LLaMA's decoder with its head; the OPT decoder's interface (`models/opt.py`).

    `embed(input_ids [B, L]) -> [B, L, D]`, then `__call__(inputs_embeds [B, L, D], attention_mask [B, L], patch,
    taps, positions=None) -> (logits [B, L, V], captured)`; `positions` `[B, L]` default to `arange(L)`.
    `prefix(inputs_embeds, mask, k)` -> hidden states entering layer k, `resume(h, mask, k, patch, taps)` -> (logits,
    captured): the same forward split at layer k. For generation, `__call__(..., cache=..., cache_index=i,
    key_mask=[B, T], positions=...)` runs `L` new tokens placed at slots `i .. i + L - 1` of a `[layers, B, T, KVH,
    Dh]` cache (`cache_shape`) and returns `(logits, captured, new cache)`.
    Sites: `language_model/layers/{i}/{self_attn/q_proj, ..., mlp/down_proj}`.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02),
                                     dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        )
        rope = (jnp.ones((1, 1, cfg.head_dim), self.dtype), jnp.zeros((1, 1, cfg.head_dim), self.dtype))
        sample = (jnp.zeros((1, 1, cfg.hidden_size), self.dtype), jnp.ones((1, 1, 1, 1), bool), rope)
        self.layers = self.param("layers", lambda r: init_stack(self.unit(), r, cfg.num_hidden_layers, *sample))

    def unit(self) -> LlamaLayer:
        return LlamaLayer(self.config, self.dtype, self.param_dtype, parent=None)

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        """The shape of each of the KV cache's `(k, v)`: `[layers, B, T, KVH, Dh]`."""
        cfg = self.config
        return (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integers, got {input_ids.dtype}")
        return self.embed_tokens(input_ids)

    def head(self, h: jax.Array) -> jax.Array:
        """Final hidden states `[B, L, D]` -> logits `[B, L, V]` (float32)."""
        h = self.norm(h)
        if self.lm_head is not None:
            return self.lm_head(h).astype(jnp.float32)
        return self.embed_tokens.attend(h).astype(jnp.float32)

    def _inputs(self, inputs_embeds, attention_mask, positions, start=0):
        """Checked `inputs_embeds` in the compute dtype, and the rotary `(cos, sin)` of their positions."""
        cfg = self.config
        b, length, width = inputs_embeds.shape
        if width != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must be [B, L, {cfg.hidden_size}], got {inputs_embeds.shape}")
        if attention_mask.shape != (b, length):
            raise ValueError(f"attention_mask must be {(b, length)}, got {attention_mask.shape}")
        if positions is None:
            positions = start + jnp.arange(length)
        positions = jnp.broadcast_to(positions, (b, length))
        return inputs_embeds.astype(self.dtype), rotary(positions, cfg.head_dim, cfg.rope_theta, self.dtype)

    def _layers(self, h, mask, rope, cache_index, patch, taps, cache=None, start=0, stop=None, rows=None):
        """Layers `start .. stop - 1`; with `rows` `[B, R]` the last layer runs on those positions only (its
        output `[B, R, D]`)."""
        run = functools.partial(run_stack, self.unit(), self.layers, prefix=STACK_PREFIX, remat=self.remat)
        if rows is None:
            return run(h, mask, rope, cache_index, patch=patch, taps=taps, per_unit_xs=cache, start=start, stop=stop)
        last = self.config.num_hidden_layers - 1
        if cache is not None or (stop is not None and stop <= last) or start > last:
            raise ValueError("rows: only without a cache, through the last layer")
        h, _, captured = run(h, mask, rope, cache_index, patch=below_layer(patch, last), taps=below_layer(taps, last),
                             start=start, stop=last)
        h, _, top = run(h, mask, rope, cache_index, patch=from_layer(patch, last), taps=from_layer(taps, last),
                        start=last, rows=rows)
        return h, None, {**captured, **top}

    def prefix(self, inputs_embeds: jax.Array, attention_mask: jax.Array, stop: int,
               positions: jax.Array | None = None) -> jax.Array:
        """The unedited layers `0 .. stop - 1` alone: `inputs_embeds [B, L, D]` -> hidden states `[B, L, D]` entering
        layer `stop` (what `resume(..., start=stop)` continues from; give both the same `positions`)."""
        h, rope = self._inputs(inputs_embeds, attention_mask, positions)
        mask = attention_bias(jnp.arange(h.shape[1]), attention_mask)
        return self._layers(h, mask, rope, 0, None, None, stop=stop)[0]

    def resume(self, h: jax.Array, attention_mask: jax.Array, start: int, patch: dict | None = None,
               taps: dict | None = None, rows: jax.Array | None = None, positions: jax.Array | None = None):
        """Layers `start ..` and the head from the hidden states `h [B, L, D]` entering layer `start`:
        -> `(logits [B, L | R, V], captured)`. Patches and taps may only touch layers `>= start`."""
        h, rope = self._inputs(h, attention_mask, positions)
        mask = attention_bias(jnp.arange(h.shape[1]), attention_mask)
        h, _, captured = self._layers(h, mask, rope, 0, patch, taps, start=start, rows=rows)
        return self.head(h), captured

    def __call__(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array,
        patch: dict | None = None,
        taps: dict | None = None,
        cache=None,
        cache_index: jax.Array | int = 0,
        key_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        rows: jax.Array | None = None,
    ):
        """`rows` `[B, R]` (teacher forcing only): logits at those positions only, `[B, R, V]`. With a cache,
        `positions` default to the slots `cache_index + arange(L)`."""
        h, rope = self._inputs(inputs_embeds, attention_mask, positions, start=0 if cache is None else cache_index)
        length = h.shape[1]
        if cache is None:
            mask = attention_bias(jnp.arange(length), attention_mask)
        else:
            mask = attention_bias(cache_index + jnp.arange(length), key_mask)
        h, new_cache, captured = self._layers(h, mask, rope, cache_index, patch, taps, cache=cache, rows=rows)
        logits = self.head(h)
        if cache is None:
            return logits, captured
        return logits, captured, new_cache


class Llama(nn.Module):
    """`LlamaForCausalLM` with its decoder under `language_model` (the site prefix every editor knows).

    `__call__(input_ids [B, L], attention_mask [B, L], patch, taps, rows, inputs_embeds, positions) -> (logits
    [B, L | R, V] float32, captured)`; `inputs_embeds` `[B, L, D]`, when given, replace the token embeddings
    (`input_ids` may then be None). `text_prefix` / `text_resume` / `decode` as `Blip2`'s.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.language_model = LlamaDecoder(self.config, self.dtype, self.param_dtype, self.remat)

    def embed_inputs(self, input_ids):
        return self.language_model.embed(input_ids)

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return self.language_model.cache_shape(batch, length)

    def __call__(self, input_ids, attention_mask, patch=None, taps=None, rows=None, inputs_embeds=None,
                 positions=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids)
        return self.language_model(inputs_embeds, attention_mask, patch=patch, taps=taps, positions=positions,
                                   rows=rows)

    def text_prefix(self, input_ids, attention_mask, inputs_embeds=None, stop: int = 0):
        """Layers `0 .. stop - 1`, unedited: -> hidden states `[B, L, D]` entering layer `stop`."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids)
        return self.language_model.prefix(inputs_embeds, attention_mask, stop)

    def text_resume(self, h, attention_mask, start: int, patch=None, taps=None, rows=None):
        """From `text_prefix`'s hidden states `h [B, L, D]`: layers `start ..` and the head -> (logits, captured)."""
        return self.language_model.resume(h, attention_mask, start, patch=patch, taps=taps, rows=rows)

    def decode(self, inputs_embeds, positions, cache, cache_index, key_mask, patch=None):
        """Runs new tokens through the decoder with a KV cache: -> (logits, new cache)."""
        mask = jnp.ones(inputs_embeds.shape[:2], jnp.int32)
        logits, _, cache = self.language_model(inputs_embeds, mask, patch=patch, cache=cache, cache_index=cache_index,
                                               key_mask=key_mask, positions=positions)
        return logits, cache


# --------------------------------------------------------------------------------------------------
# Greedy generation with a KV cache (static shapes: one compiled program per prompt length and budget).


def greedy_generate(module: nn.Module, params, inputs_embeds, attention_mask, *, max_new_tokens: int,
                    eos_token_id: int | None, pad_token_id: int, patch=None):
    """`generate.greedy_generate` with LLaMA's generation positions (`position_ids`): `[B, L, D]` left-padded
    prompt embeddings -> new token ids `[B, max_new_tokens]`. `module` is `Llama` or a model that splices images
    into its prompt (MiniGPT-4)."""
    return generate_lib.greedy_generate(module, params, inputs_embeds, attention_mask, position_ids(attention_mask),
                                        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                        pad_token_id=pad_token_id, patch=patch)


# --------------------------------------------------------------------------------------------------
# The public model object.


class LlamaModel:
    """Config + parameters + module. `model(input_ids, attention_mask)` -> logits `[B, L, V]` aligned with
    `input_ids`, as transformers' `LlamaForCausalLM` (positions `arange(L)` unless given)."""

    def __init__(self, config: LlamaConfig, params, dtype: Any = jnp.float32, remat: bool = False):
        self.config = config
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self.module = Llama(config, dtype=self.dtype, param_dtype=self.dtype, remat=remat)
        self.stacks = {STACK_PREFIX: 1}
        self._forward = jax.jit(self._forward_impl)
        self._embed = jax.jit(lambda params, ids: self.module.apply({"params": params}, ids, method="embed_inputs"))
        self._generate = jax.jit(functools.partial(greedy_generate, self.module),
                                 static_argnames=("max_new_tokens", "eos_token_id", "pad_token_id"))

    @classmethod
    def init(cls, config: LlamaConfig, rng: jax.Array, dtype: Any = jnp.float32, remat: bool = False) -> LlamaModel:
        """Randomly initialised parameters (shapes matter to conversion; values to tests)."""
        dtype = jnp.dtype(dtype)
        module = Llama(config, dtype=dtype, param_dtype=dtype)
        ids = jnp.zeros((1, 2), jnp.int32)
        params = jax.jit(module.init)(rng, ids, jnp.ones_like(ids))["params"]
        return cls(config, params, dtype=dtype, remat=remat)

    def _forward_impl(self, params, input_ids, attention_mask, patch, inputs_embeds, positions):
        return self.module.apply({"params": params}, input_ids, attention_mask, patch=patch,
                                 inputs_embeds=inputs_embeds, positions=positions)[0]

    @staticmethod
    def _batch(input_ids, attention_mask, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        ids = None if input_ids is None else jnp.asarray(input_ids, jnp.int32)
        embeds = None if inputs_embeds is None else jnp.asarray(inputs_embeds)
        shape = (ids if ids is not None else embeds).shape[:2]
        mask = jnp.ones(shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return ids, mask, embeds

    def __call__(self, input_ids=None, attention_mask=None, params=None, patch=None, inputs_embeds=None,
                 positions=None):
        """-> logits `[B, L, V]` (float32). `inputs_embeds` `[B, L, D]` instead of `input_ids`; `positions` `[B, L]`
        (e.g. `position_ids(mask)` for left-padded prompts) instead of `arange(L)`."""
        ids, mask, embeds = self._batch(input_ids, attention_mask, inputs_embeds)
        pos = None if positions is None else jnp.asarray(positions, jnp.int32)
        return self._forward(self.params if params is None else params, ids, mask, patch or {}, embeds, pos)

    def generate(self, input_ids=None, attention_mask=None, *, max_new_tokens: int = 20,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, params=None, patch=None,
                 inputs_embeds=None):
        """Greedy decoding of left-padded prompts (ids, or `inputs_embeds`): -> new token ids `[B, max_new_tokens]`
        (numpy). `eos_token_id`/`pad_token_id` default to the config's; rows that stop early are padded."""
        cfg = self.config
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
        ids, mask, embeds = self._batch(input_ids, attention_mask, inputs_embeds)
        params = self.params if params is None else params
        if embeds is None:  # embedded apart, so prompts given as ids or as embeddings share one generation program
            embeds = self._embed(params, ids)
        out = self._generate(params, embeds.astype(self.dtype), mask, max_new_tokens=int(max_new_tokens),
                             eos_token_id=None if eos is None else int(eos), pad_token_id=int(pad or 0),
                             patch=patch or {})
        return np.asarray(out)
