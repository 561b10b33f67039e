"""The OPT decoder in Flax Linen, as transformers' `OPTForCausalLM` (the language model of BLIP-2).

token embeddings (`word_embed_proj_dim` wide) -> `project_in` (when narrower than `hidden_size`) + learned
positions (offset 2, derived from the attention mask as `cumsum(mask) * mask - 1`) -> `num_hidden_layers`
decoder layers (pre- or post-LayerNorm per `do_layer_norm_before`; causal + padding mask; ReLU feed-forward)
scanned with `run_stack` -> `final_layer_norm` -> `project_out` -> tied `lm_head` (the token embedding table).

The same layers serve teacher-forced scoring (no cache) and generation: with a KV cache `[layers, B, T, H, Dh]`
each call writes its keys/values at `cache_index` and attends over the whole cache under a key mask.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmedit_jax.models.config import OPTConfig
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
from mmedit_jax.models.vit import activation
from mmedit_jax.sites import LM_STACK

STACK_PREFIX = LM_STACK

# The linears of a layer that see each position on its own (not keys/values): with `rows`, they run on those rows.
ROW_SITES = ("self_attn/q_proj", "self_attn/out_proj", "fc1", "fc2")
POSITION_OFFSET = 2  # OPT's learned positions start at index 2 (a fairseq legacy)


def position_ids(attention_mask: jax.Array) -> jax.Array:
    """transformers' OPT positions: `[B, L]` mask -> `[B, L]` ids (padding gets -1, then the offset)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=-1) * mask - 1


class OPTAttention(nn.Module):
    """`q_proj` (scaled by `head_dim ** -0.5` after the projection, as transformers), `k_proj`, `v_proj`,
    masked softmax attention, `out_proj`."""

    config: OPTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, edits: EditView | None = None, cache=None, cache_index=None, rows=None):
        """x `[B, L, D]`, mask bool `[B, 1, L, Lk]` (`[B, 1, R, Lk]` with `rows`); cache `(k, v)` each
        `[B, T, H, Dh]` or None. `rows` `[B, R]`: only these positions query (keys and values from all L).

        Returns `(out [B, L | R, D], new cache or None)`; with a cache, `Lk == T`.
        """
        cfg = self.config
        d, heads = cfg.hidden_size, cfg.num_attention_heads
        if d % heads:
            raise ValueError(f"OPT hidden_size {d} is not a multiple of num_attention_heads {heads}")
        head_dim = d // heads
        dense = lambda name: PatchableDense(  # noqa: E731
            d, use_bias=cfg.enable_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)  # noqa: E731
        xq = x if rows is None else take_rows(x, rows)
        q = split(dense("q_proj")(xq, child(edits, "q_proj")) * jnp.asarray(head_dim**-0.5, self.dtype))
        k = split(dense("k_proj")(x, child(edits, "k_proj")))
        v = split(dense("v_proj")(x, child(edits, "v_proj")))
        new_cache = None
        if cache is not None:
            ck, cv = cache
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
            new_cache = (k, v)
        scores = jnp.einsum("bhqd,bhkd->bhqk", heads_major(q), heads_major(k.astype(q.dtype))).astype(jnp.float32)
        # A finite fill: rows with no visible key (left padding) get a uniform softmax, not NaN.
        scores = masked_scores(scores, mask)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = sequence_major(jnp.einsum("bhqk,bhkd->bhqd", probs, heads_major(v.astype(self.dtype))))
        out = out.reshape(xq.shape[:-1] + (d,))
        return dense("out_proj")(out, child(edits, "out_proj")), new_cache


class OPTLayer(nn.Module):
    """One decoder layer; the scanned unit. `(h [B, L, D], mask) -> (h, new cache)`.

    With `rows` `[B, R]` only those positions go through the layer (queries, residual, feed-forward; keys and
    values still come from all L) and `h` comes back `[B, R, D]`: enough for the last layer when only some
    positions' logits are needed. Taps on the row-wise linears (`ROW_SITES`) then take and record `R` rows.
    """

    config: OPTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, cache_index=None, edits: EditView | None = None, xs=None, rows=None):
        cfg = self.config
        if rows is not None:
            mask = jnp.take_along_axis(mask, rows[:, None, :, None], axis=2)
            if edits is not None and edits.taps:
                edits = edits.with_taps({p: take_rows(e, rows) if p in ROW_SITES else e for p, e in edits.taps.items()})
        pre = cfg.do_layer_norm_before

        def ln(name):
            return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype, name=name,
                                use_scale=cfg.layer_norm_elementwise_affine,
                                use_bias=cfg.layer_norm_elementwise_affine)

        def norm(name, x):
            return ln(name)(x).astype(self.dtype)

        attn = OPTAttention(cfg, self.dtype, self.param_dtype, name="self_attn")
        x = norm("self_attn_layer_norm", h) if pre else h
        a, new_cache = attn(x, mask, child(edits, "self_attn"), cache=xs, cache_index=cache_index, rows=rows)
        h = (h if rows is None else take_rows(h, rows)) + a
        if not pre:
            h = norm("self_attn_layer_norm", h)
        dense = lambda n, name: PatchableDense(  # noqa: E731
            n, use_bias=cfg.enable_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = norm("final_layer_norm", h) if pre else h
        x = activation(cfg.activation_function)(dense(cfg.ffn_dim, "fc1")(x, child(edits, "fc1")))
        h = h + dense(cfg.hidden_size, "fc2")(x, child(edits, "fc2"))
        if not pre:
            h = norm("final_layer_norm", h)
        return h, new_cache


class OPTDecoder(nn.Module):
    """OPT's decoder with its (tied) head.

    `embed(input_ids [B, L]) -> [B, L, E]` (E = `word_embed_proj_dim`), then
    `__call__(inputs_embeds [B, L, E], attention_mask [B, L], patch, taps) -> (logits [B, L, V], captured)`.
    The same forward in two parts, for edits that leave layers `< k` alone: `prefix(inputs_embeds, mask, k)`
    -> hidden states `[B, L, D]` entering layer k, then `resume(h, mask, k, patch, taps)` -> (logits, captured).
    For generation, `__call__(..., cache=..., cache_index=i, key_mask=[B, T])` runs `L` new tokens placed at
    slots `i .. i + L - 1` of a `[layers, B, T, H, Dh]` cache and returns `(logits, captured, new cache)`.
    Sites: `language_model/layers/{i}/{self_attn/q_proj, ..., fc1, fc2}`.
    """

    config: OPTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=init, dtype=self.dtype,
                                     param_dtype=self.param_dtype)
        self.embed_positions = nn.Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                                        embedding_init=init, dtype=self.dtype, param_dtype=self.param_dtype)
        narrow = cfg.embed_dim != cfg.hidden_size
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                         name=name)
        self.project_in = dense(cfg.hidden_size, "project_in") if narrow else None
        self.project_out = dense(cfg.embed_dim, "project_out") if narrow else None
        has_final = cfg.do_layer_norm_before and not cfg.remove_final_layer_norm
        self.final_layer_norm = (
            nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype,
                         use_scale=cfg.layer_norm_elementwise_affine, use_bias=cfg.layer_norm_elementwise_affine)
            if has_final else None
        )
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        )
        sample = (jnp.zeros((1, 1, cfg.hidden_size), self.dtype), jnp.ones((1, 1, 1, 1), bool))
        self.layers = self.param("layers", lambda r: init_stack(self.unit(), r, cfg.num_hidden_layers, *sample))

    def unit(self) -> OPTLayer:
        return OPTLayer(self.config, self.dtype, self.param_dtype, parent=None)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integers, got {input_ids.dtype}")
        return self.embed_tokens(input_ids)

    def head(self, h: jax.Array) -> jax.Array:
        """Final hidden states `[B, L, D]` -> logits `[B, L, V]` (float32)."""
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h).astype(self.dtype)
        if self.project_out is not None:
            h = self.project_out(h)
        if self.lm_head is not None:
            return self.lm_head(h).astype(jnp.float32)
        return self.embed_tokens.attend(h).astype(jnp.float32)

    def _embed_positions(self, inputs_embeds, attention_mask, positions):
        """`inputs_embeds [B, L, E]` -> the hidden states entering layer 0, `[B, L, D]`."""
        cfg = self.config
        b, length, width = inputs_embeds.shape
        if width != cfg.embed_dim:
            raise ValueError(f"inputs_embeds must be [B, L, {cfg.embed_dim}], got {inputs_embeds.shape}")
        if attention_mask.shape != (b, length):
            raise ValueError(f"attention_mask must be {(b, length)}, got {attention_mask.shape}")
        if positions is None:
            positions = position_ids(attention_mask)
        x = inputs_embeds.astype(self.dtype)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(positions + POSITION_OFFSET)

    def _layers(self, h, mask, cache_index, patch, taps, cache=None, start=0, stop=None, rows=None):
        """Layers `start .. stop - 1`; with `rows` `[B, R]` the last layer runs on those positions only (its
        output `[B, R, D]`)."""
        if rows is None:
            return run_stack(self.unit(), self.layers, h, mask, cache_index, prefix=STACK_PREFIX, patch=patch,
                             taps=taps, per_unit_xs=cache, remat=self.remat, start=start, stop=stop)
        last = self.config.num_hidden_layers - 1
        if cache is not None or (stop is not None and stop <= last) or start > last:
            raise ValueError("rows: only without a cache, through the last layer")
        h, _, captured = self._layers(h, mask, cache_index, below_layer(patch, last), below_layer(taps, last),
                                      start=start, stop=last)
        h, _, top = run_stack(self.unit(), self.layers, h, mask, cache_index, prefix=STACK_PREFIX,
                              patch=from_layer(patch, last), taps=from_layer(taps, last), remat=self.remat, start=last,
                              rows=rows)
        return h, None, {**captured, **top}

    def prefix(self, inputs_embeds: jax.Array, attention_mask: jax.Array, stop: int) -> jax.Array:
        """The unedited layers `0 .. stop - 1` alone: `inputs_embeds [B, L, E]` -> hidden states `[B, L, D]` entering
        layer `stop` (what `resume(..., start=stop)` continues from)."""
        h = self._embed_positions(inputs_embeds, attention_mask, None)
        mask = attention_bias(jnp.arange(h.shape[1]), attention_mask)
        return self._layers(h, mask, 0, None, None, stop=stop)[0]

    def resume(self, h: jax.Array, attention_mask: jax.Array, start: int, patch: dict | None = None,
               taps: dict | None = None, rows: jax.Array | None = None):
        """Layers `start ..` and the head from the hidden states `h [B, L, D]` entering layer `start`:
        -> `(logits [B, L | R, V], captured)`. Patches and taps may only touch layers `>= start`."""
        mask = attention_bias(jnp.arange(h.shape[1]), attention_mask)
        h, _, captured = self._layers(h, mask, 0, patch, taps, start=start, rows=rows)
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
        """`rows` `[B, R]` (teacher forcing only): logits at those positions only, `[B, R, V]`; the last layer and
        the head then run on R rows instead of L (where only the answer positions' logits are needed)."""
        h = self._embed_positions(inputs_embeds, attention_mask, positions)
        length = h.shape[1]
        if cache is None:
            mask = attention_bias(jnp.arange(length), attention_mask)
        else:
            mask = attention_bias(cache_index + jnp.arange(length), key_mask)
        h, new_cache, captured = self._layers(h, mask, cache_index, patch, taps, cache=cache, rows=rows)
        logits = self.head(h)
        if cache is None:
            return logits, captured
        return logits, captured, new_cache

