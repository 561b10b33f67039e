"""BERT's sublayers in Flax Linen (transformers' `BertSelfAttention`, `BertSelfOutput`, `BertAttention`,
`BertIntermediate`, `BertOutput`), with an optional key mask; BLIP-2's Q-Former is built from them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmedit_jax.models.config import QFormerConfig
from mmedit_jax.models.layers import EditView, PatchableDense, child
from mmedit_jax.models.vit import activation, dot_product_attention, layer_norm


class BertModule(nn.Module):
    """What BERT's sublayers hold. They read only `hidden_size`, `num_attention_heads`, `intermediate_size`,
    `hidden_act` and `layer_norm_eps`."""

    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32


class SelfAttention(BertModule):
    """`{query, key, value}` projections and attention: x `[B, Lq, D]`, kv `[B, Lk, Dk]` -> `[B, Lq, D]`.

    `mask` is `dot_product_attention`'s (None: every key visible).
    """

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, edits: EditView | None = None, mask=None) -> jax.Array:
        cfg = self.config
        d, heads = cfg.hidden_size, cfg.num_attention_heads
        if d % heads:
            raise ValueError(f"hidden_size {d} is not a multiple of num_attention_heads {heads}")
        dense = lambda name: PatchableDense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        split = lambda t: t.reshape(*t.shape[:-1], heads, d // heads)  # noqa: E731
        q = split(dense("query")(x, child(edits, "query")))
        k = split(dense("key")(kv, child(edits, "key")))
        v = split(dense("value")(kv, child(edits, "value")))
        return dot_product_attention(q, k, v, mask).reshape(x.shape[:-1] + (d,))


class Output(BertModule):
    """BERT's output sublayer: `LayerNorm(dense(x) + residual)` (`dense`, `LayerNorm`)."""

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, edits: EditView | None = None) -> jax.Array:
        cfg = self.config
        y = PatchableDense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(
            x, child(edits, "dense")
        )
        return layer_norm(cfg.layer_norm_eps, self.param_dtype, "LayerNorm")(y + residual).astype(self.dtype)


class BertAttention(BertModule):
    """`{inner}` (q/k/v attention, keys and values from `kv`) then `output` (dense + residual LayerNorm)."""

    inner: str = "self"  # transformers' BERT: `attention.self.query`; BLIP-2's Q-Former: `attention.attention.query`

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, edits: EditView | None = None, mask=None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        a = SelfAttention(self.config, **kw, name=self.inner)(x, kv, child(edits, self.inner), mask)
        return Output(self.config, **kw, name="output")(a, x, child(edits, "output"))


class Intermediate(BertModule):
    """`act(dense(x))`, `[.., D] -> [.., intermediate_size]`."""

    @nn.compact
    def __call__(self, x: jax.Array, edits: EditView | None = None) -> jax.Array:
        cfg = self.config
        y = PatchableDense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(
            x, child(edits, "dense")
        )
        return activation(cfg.hidden_act)(y)
