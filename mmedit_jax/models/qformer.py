"""BLIP-2's Q-Former in Flax Linen, as transformers' `Blip2QFormerModel` run on query embeddings only.

`layernorm(query_embeds)` -> `num_hidden_layers` BERT post-LayerNorm layers: self-attention, cross-attention to
the image features in every `cross_attention_frequency`-th layer (global index % k == 0), then the query
feed-forward branch (`intermediate_query`, `output_query`). The image attention mask is all ones (BLIP-2 never
masks image features) and dropout is off. The sublayers are BERT's (`models/bert.py`), with the q/k/v module
named `attention` as in transformers' Q-Former (BERT's is `self`).

Layers are scanned in groups of k = `cross_attention_frequency` (one group = one cross-attention layer and its
k - 1 followers), so the scanned unit is uniform: for k == 1 the unit is the layer itself, for k > 1 a group
module with members "0".."k-1".
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmedit_jax.models.bert import BertAttention, Intermediate, Output
from mmedit_jax.models.config import QFormerConfig
from mmedit_jax.models.layers import EditView, child, init_stack, run_stack
from mmedit_jax.models.vit import layer_norm

STACK_PREFIX = "qformer/layers"


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
        h = BertAttention(cfg, **kw, inner="attention", name="attention")(h, h, child(edits, "attention"))
        if self.has_cross_attention:
            cross = BertAttention(cfg, **kw, inner="attention", name="crossattention")
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
