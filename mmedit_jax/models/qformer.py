"""BLIP-2's Q-Former in Flax Linen, as transformers' `Blip2QFormerModel` run on query embeddings only.

`layernorm(query_embeds)` -> `num_hidden_layers` BERT post-LayerNorm layers: self-attention, cross-attention to
the image features in every `cross_attention_frequency`-th layer (global index % k == 0), then the query
feed-forward branch (`intermediate_query`, `output_query`). The image attention mask is all ones (BLIP-2 never
masks image features) and dropout is off.

Layers are scanned in groups of k = `cross_attention_frequency` (one group = one cross-attention layer and its
k - 1 followers), so the scanned unit is uniform: for k == 1 the unit is the layer itself, for k > 1 a group
module with members "0".."k-1".
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmedit_jax.models.config import QFormerConfig
from mmedit_jax.models.layers import EditView, PatchableDense, child, init_stack, run_stack
from mmedit_jax.models.vit import activation, dot_product_attention, layer_norm

STACK_PREFIX = "qformer/layers"


class SelfAttention(nn.Module):
    """`{query, key, value}` projections and unmasked attention: x `[B, Lq, D]`, kv `[B, Lk, Dk]` -> `[B, Lq, D]`."""

    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, edits: EditView | None = None) -> jax.Array:
        cfg = self.config
        d, heads = cfg.hidden_size, cfg.num_attention_heads
        if d % heads:
            raise ValueError(f"Q-Former hidden_size {d} is not a multiple of num_attention_heads {heads}")
        dense = lambda name: PatchableDense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        split = lambda t: t.reshape(*t.shape[:-1], heads, d // heads)  # noqa: E731
        q = split(dense("query")(x, child(edits, "query")))
        k = split(dense("key")(kv, child(edits, "key")))
        v = split(dense("value")(kv, child(edits, "value")))
        return dot_product_attention(q, k, v).reshape(x.shape[:-1] + (d,))


class Output(nn.Module):
    """BERT's output sublayer: `LayerNorm(dense(x) + residual)` (`dense`, `LayerNorm`)."""

    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, edits: EditView | None = None) -> jax.Array:
        cfg = self.config
        y = PatchableDense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(
            x, child(edits, "dense")
        )
        return layer_norm(cfg.layer_norm_eps, self.param_dtype, "LayerNorm")(y + residual).astype(self.dtype)


class BertAttention(nn.Module):
    """`attention` (q/k/v) then `output` (dense + residual LayerNorm). Cross-attention reads keys/values from
    the image features (width `encoder_hidden_size`)."""

    config: QFormerConfig
    is_cross_attention: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, edits: EditView | None = None) -> jax.Array:
        cfg = self.config
        want = cfg.encoder_hidden_size if self.is_cross_attention else cfg.hidden_size
        if kv.shape[-1] != want:
            kind = "cross" if self.is_cross_attention else "self"
            raise ValueError(f"Q-Former {kind}-attention: keys/values have width {kv.shape[-1]}, expected {want}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        a = SelfAttention(cfg, **kw, name="attention")(x, kv, child(edits, "attention"))
        return Output(cfg, **kw, name="output")(a, x, child(edits, "output"))


class Intermediate(nn.Module):
    """`act(dense(x))`, `[.., D] -> [.., intermediate_size]`."""

    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, edits: EditView | None = None) -> jax.Array:
        cfg = self.config
        y = PatchableDense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(
            x, child(edits, "dense")
        )
        return activation(cfg.hidden_act)(y)


class QFormerLayer(nn.Module):
    """One Q-Former layer on the queries: `[B, nq, D]` -> `([B, nq, D], None)`."""

    config: QFormerConfig
    has_cross_attention: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, encoder_hidden_states: jax.Array, edits: EditView | None = None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = BertAttention(cfg, False, **kw, name="attention")(h, h, child(edits, "attention"))
        if self.has_cross_attention:
            cross = BertAttention(cfg, True, **kw, name="crossattention")
            h = cross(h, encoder_hidden_states.astype(self.dtype), child(edits, "crossattention"))
        inner = Intermediate(cfg, **kw, name="intermediate_query")(h, child(edits, "intermediate_query"))
        h = Output(cfg, **kw, name="output_query")(inner, h, child(edits, "output_query"))
        return h, None


class QFormerGroup(nn.Module):
    """k consecutive layers (members "0".."k-1"); member "0" cross-attends. The scanned unit when k > 1."""

    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, encoder_hidden_states: jax.Array, edits: EditView | None = None):
        k = self.config.cross_attention_frequency
        for m in range(k):  # static and small (k = 2 in BLIP-2); the groups themselves are scanned
            layer = QFormerLayer(self.config, m == 0, self.dtype, self.param_dtype, name=str(m))
            h, _ = layer(h, encoder_hidden_states, child(edits, str(m)))
        return h, None


class QFormer(nn.Module):
    """BLIP-2's Q-Former on query embeddings.

    `(query_embeds [B, nq, Dq], encoder_hidden_states [B, N, Dv], patch, taps) ->
    (last_hidden_state [B, nq, Dq], captured)`. Sites are `qformer/layers/{i}/...` with the global layer index
    i (e.g. `qformer/layers/10/output_query/dense`); the stack holds `cross_attention_frequency` layers per unit.
    """

    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @property
    def per_unit(self) -> int:
        return self.config.cross_attention_frequency

    def unit(self) -> nn.Module:
        if self.per_unit == 1:
            return QFormerLayer(self.config, True, self.dtype, self.param_dtype, parent=None)
        return QFormerGroup(self.config, self.dtype, self.param_dtype, parent=None)

    @nn.compact
    def __call__(
        self,
        query_embeds: jax.Array,
        encoder_hidden_states: jax.Array,
        patch: dict | None = None,
        taps: dict | None = None,
    ):
        cfg = self.config
        if query_embeds.ndim != 3 or query_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"query_embeds must be [B, nq, {cfg.hidden_size}], got {query_embeds.shape}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.encoder_hidden_size:
            raise ValueError(
                f"encoder_hidden_states must be [B, N, {cfg.encoder_hidden_size}], got {encoder_hidden_states.shape}"
            )
        if encoder_hidden_states.shape[0] != query_embeds.shape[0]:
            raise ValueError(
                f"batch mismatch: query_embeds {query_embeds.shape} vs encoder_hidden_states "
                f"{encoder_hidden_states.shape}"
            )
        h = layer_norm(cfg.layer_norm_eps, self.param_dtype, "layernorm")(query_embeds).astype(self.dtype)
        enc = encoder_hidden_states.astype(self.dtype)
        unit = self.unit()
        num_units = cfg.num_hidden_layers // self.per_unit
        layers = self.param("layers", lambda r: init_stack(unit, r, num_units, h[:1], enc[:1]))
        h, _, captured = run_stack(
            unit, layers, h, enc, prefix=STACK_PREFIX, per_unit=self.per_unit, patch=patch, taps=taps,
            remat=self.remat,
        )
        return h, captured
