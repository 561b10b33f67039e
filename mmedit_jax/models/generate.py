"""Greedy decoding with a KV cache, for every model family (static shapes: one program per prompt length and
budget).

The loop needs three methods of the Linen module: `embed_inputs(ids)` (token embeddings), `cache_shape(B, T)`
(the shape of the keys' and values' cache) and `decode(inputs_embeds, positions, cache, cache_index, key_mask,
patch)` -> `(logits, new cache)`. BLIP-2, LLaMA and MiniGPT-4 all have them; each passes its own positions.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def greedy_generate(module: nn.Module, params, inputs_embeds, attention_mask, positions, *, max_new_tokens: int,
                    eos_token_id: int | None, pad_token_id: int, patch=None):
    """Greedy decoding of left-padded prompts given as embeddings `[B, L, D]` -> new token ids `[B, max_new_tokens]`.

    `positions` `[B, L]` are the prompt's (the family's rule: OPT's learned or LLaMA's rotary ones); new tokens
    continue from each row's last one. After a row emits `eos_token_id`, the rest of the row is `pad_token_id` (as
    transformers' `generate`); the loop stops early when every row is done.
    """
    b, length = attention_mask.shape
    total = length + max_new_tokens
    apply = functools.partial(module.apply, {"params": params})
    shape = apply(b, total, method="cache_shape")
    cache = (jnp.zeros(shape, module.dtype), jnp.zeros(shape, module.dtype))
    key_mask = jnp.zeros((b, total), jnp.int32).at[:, :length].set(attention_mask.astype(jnp.int32))

    logits, cache = apply(inputs_embeds, positions, cache, 0, key_mask, patch, method="decode")
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((b,), bool) if eos_token_id is None else first == eos_token_id

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, cache, key_mask, done, pos = state
        prev = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=1, keepdims=True)  # [B, 1]
        slot = length + step - 1
        key_mask = jax.lax.dynamic_update_slice_in_dim(key_mask, jnp.ones((b, 1), jnp.int32), slot, axis=1)
        x = apply(prev, method="embed_inputs")
        logits, cache = apply(x, pos[:, None], cache, slot, key_mask, patch, method="decode")
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_token_id, nxt)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], step, axis=1)
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
        return step + 1, tokens, cache, key_mask, done, pos + 1

    state = (jnp.asarray(1), tokens, cache, key_mask, done, positions[:, -1] + 1)
    return jax.lax.while_loop(cond, body, state)[1]
