"""BERT-family text encoders in Flax Linen, as transformers' `BertModel` and `DistilBertModel` give
`last_hidden_state`, and BERT's sublayers, which BLIP-2's Q-Former shares.

Embeddings: word + token type (BERT only; zeros when not given) + absolute position `0 .. L-1` (whatever the
padding, as transformers) -> LayerNorm. Then `num_hidden_layers` post-LayerNorm layers scanned with `run_stack`:
`LayerNorm(h + dense(attn(h)))` with padded keys hidden, then `LayerNorm(h + dense(act(dense(h))))`. No pooler:
EasyEdit's SERAC reads the first token (`cls_embedding`), sentence-transformers' MiniLM mean-pools and normalises
(`sentence_embedding`). Dropout is off.

DistilBERT is the same network without token types and with every LayerNorm eps at 1e-12
(`DistilBertConfig.as_bert`). Both families take BERT's parameter names here (`attention/self/query`,
`attention/output/LayerNorm`, `intermediate/dense`, `output/dense`, ...); `convert/text_encoder.py` maps each
family's checkpoint keys onto them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmedit_jax.models.config import BertConfig, DistilBertConfig, QFormerConfig
from mmedit_jax.models.layers import EditView, PatchableDense, child, init_stack, run_stack
from mmedit_jax.models.vit import activation, dot_product_attention, layer_norm

STACK_PREFIX = "layers"


class BertModule(nn.Module):
    """What BERT's sublayers hold. They read only `hidden_size`, `num_attention_heads`, `intermediate_size`,
    `hidden_act` and `layer_norm_eps`, fields `BertConfig` and `QFormerConfig` share."""

    config: BertConfig | QFormerConfig
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


class BertLayer(BertModule):
    """One encoder layer, the scanned unit: `(h [B, L, D], mask bool [B, 1, 1, L]) -> (h [B, L, D], None)`."""

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array, edits: EditView | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = BertAttention(self.config, **kw, name="attention")(h, h, child(edits, "attention"), mask)
        inner = Intermediate(self.config, **kw, name="intermediate")(h, child(edits, "intermediate"))
        return Output(self.config, **kw, name="output")(inner, h, child(edits, "output")), None


class BertEmbeddings(BertModule):
    """`(input_ids [B, L], token_type_ids [B, L]) -> [B, L, D]`; no `token_type_embeddings` when
    `type_vocab_size == 0` (DistilBERT)."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        cfg = self.config
        embed = lambda n, name: nn.Embed(  # noqa: E731
            n, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        h = embed(cfg.vocab_size, "word_embeddings")(input_ids)
        if cfg.type_vocab_size:
            h = h + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        h = h + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(input_ids.shape[1]))[None]
        return layer_norm(cfg.layer_norm_eps, self.param_dtype, "LayerNorm")(h).astype(self.dtype)


class TextEncoder(nn.Module):
    """A BERT or DistilBERT encoder.

    `(input_ids [B, L], attention_mask [B, L] | None, token_type_ids [B, L] | None, patch, taps) ->
    (last_hidden_state [B, L, D], captured)`. `attention_mask` is 1 on real tokens (None: all real); padded
    positions still get states (attending to the real tokens), which the pooling helpers leave out. Sites are
    `layers/{i}/...`, e.g. `layers/3/intermediate/dense`.
    """

    config: BertConfig | DistilBertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def unit(self) -> BertLayer:
        return BertLayer(self.config.as_bert(), self.dtype, self.param_dtype, parent=None)

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        patch: dict | None = None,
        taps: dict | None = None,
    ):
        cfg = self.config.as_bert()
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed max_position_embeddings "
                             f"({cfg.max_position_embeddings}): truncate them")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        elif not cfg.type_vocab_size:
            raise ValueError("this encoder has no token types (type_vocab_size 0, e.g. DistilBERT)")
        for name, x in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if x.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {x.shape}, input_ids {input_ids.shape}")
        h = BertEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(input_ids, token_type_ids)
        mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1 (heads), 1 (queries), L keys]
        unit = self.unit()
        layers = self.param("layers", lambda r: init_stack(unit, r, cfg.num_hidden_layers, h[:1], mask[:1]))
        h, _, captured = run_stack(unit, layers, h, mask, prefix=STACK_PREFIX, patch=patch, taps=taps,
                                   remat=self.remat)
        return h, captured


# --------------------------------------------------------------------------------------------------
# Sentence embeddings from the hidden states (float32).


def cls_embedding(hidden: jax.Array) -> jax.Array:
    """`[B, L, D] -> [B, D]`: the first ([CLS]) token's state, what EasyEdit's SERAC scope classifier compares
    (DistilBERT's `last_hidden_state[:, 0]`)."""
    return hidden[:, 0].astype(jnp.float32)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """`[B, L, D]`, mask `[B, L]` -> `[B, D]`: the mean over real tokens, as sentence-transformers' `Pooling`
    (token count clamped at 1e-9)."""
    m = attention_mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`x / max(||x||, eps)` over the last axis, as torch's `F.normalize` (sentence-transformers' `Normalize`)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embedding(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """all-MiniLM-L6-v2's embedding: mean pooling then L2 normalisation, `[B, L, D] -> [B, D]` unit rows (IKE
    ranks its demonstrations by their dot product with the query's)."""
    return l2_normalize(mean_pool(hidden, attention_mask))
