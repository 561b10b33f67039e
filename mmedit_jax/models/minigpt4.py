"""MiniGPT-4 as EasyEdit runs it: image -> EVA ViT -> `ln_vision` -> Q-Former -> `llama_proj` -> LLaMA -> logits.

`MiniGPT4` is the Linen module with `Blip2`'s methods (`encode_image`, `embed_inputs`, `__call__`, `text_prefix`,
`text_resume`, `decode`), so `forward.Blip2Fns`, every editor and every metric run it unchanged;
`MiniGPT4Model` is the public object (config + params + module).

The image splice. EasyEdit builds `emb(tok('###Human: <Img>')) ‖ img ‖ emb(tok('</Img> ')) ‖ emb(tok(text))`
(each piece tokenized on its own, no BOS). Here that is one `input_ids` row:
`before ids ‖ [image_token_index] * nq ‖ after ids ‖ text ids`, whose `nq` placeholder slots take the projected
query outputs in order (`blip2.splice_image_embeds`), so the embeddings equal EasyEdit's position by position and
a case stays one `Seq` of ids, as BLIP-2's. The placeholder defaults to `vocab_size` (no token has it); its slots
look up row 0 of the embedding table before being replaced. Positions are `arange(L)` (EasyEdit's forward).

Parameter tree:
  vision_model/...        models/vit.py (`post_layernorm` = LAVIS's `ln_vision`, eps 1e-5)
  query_tokens            [1, nq, Dq]
  qformer/...             models/qformer.py
  llama_proj              {kernel [Dq, D], bias [D]}
  language_model/...      models/llama.py
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax.models import llama as llama_lib
from mmedit_jax.models import qformer as qformer_lib
from mmedit_jax.models import vit as vit_lib
from mmedit_jax.models.blip2 import splice_image_embeds
from mmedit_jax.models.config import MiniGPT4Config
from mmedit_jax.models.layers import EditView, PatchableDense


def stacks_of(config: MiniGPT4Config) -> dict[str, int]:
    """Stacked-layer prefixes and layers per scanned unit (for `patch.resolve_site`)."""
    return {
        vit_lib.STACK_PREFIX: 1,
        qformer_lib.STACK_PREFIX: config.qformer.cross_attention_frequency,
        llama_lib.STACK_PREFIX: 1,
    }


def image_block(config: MiniGPT4Config, before: list[int], after: list[int]) -> list[int]:
    """The ids of the wrapped image: `before ‖ [image_token_index] * nq ‖ after` (`before`/`after`: the
    tokenized `prompt_before`/`prompt_after`, `add_special_tokens=False`)."""
    return list(before) + [config.image_token_index] * config.num_query_tokens + list(after)


class MiniGPT4(nn.Module):
    """`__call__(input_ids [B, L], attention_mask [B, L], pixel_values NHWC | None, image_embeds [B, nq, D] | None,
    patch, taps, rows) -> (logits [B, L | R, V] float32, captured)`; the other methods as `Blip2`'s."""

    config: MiniGPT4Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
        self.vision_model = vit_lib.VisionModel(cfg.vision, **kw)
        self.query_tokens = self.param("query_tokens", nn.initializers.normal(0.02),
                                       (1, cfg.num_query_tokens, cfg.qformer.hidden_size), self.param_dtype)
        self.qformer = qformer_lib.QFormer(cfg.qformer, **kw)
        self.llama_proj = PatchableDense(cfg.text.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        self.language_model = llama_lib.LlamaDecoder(cfg.text, **kw)

    def encode_image(self, pixel_values: jax.Array, patch: dict | None = None, taps: dict | None = None):
        """NHWC pixels -> `(llama_proj(Q-Former(ln_vision(ViT(x)))) [B, nq, D], captured)`."""
        image_features, cap_v = self.vision_model(pixel_values, patch=patch, taps=taps)
        b = image_features.shape[0]
        queries = jnp.broadcast_to(self.query_tokens, (b, *self.query_tokens.shape[1:]))
        query_out, cap_q = self.qformer(queries, image_features, patch=patch, taps=taps)
        view = EditView(patch or {}, taps or {}, "llama_proj")
        embeds = self.llama_proj(query_out, view)
        return embeds, {**cap_v, **cap_q, **view.captured}

    def embed_inputs(self, input_ids, image_embeds=None):
        """Token embeddings, the image slots' rows replaced by `image_embeds` `[B, nq, D]` (when given)."""
        is_image = input_ids == self.config.image_token_index
        embeds = self.language_model.embed(jnp.where(is_image, 0, input_ids))
        if image_embeds is None:
            return embeds
        return splice_image_embeds(embeds, input_ids, image_embeds, self.config.image_token_index)

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return self.language_model.cache_shape(batch, length)

    def __call__(self, input_ids, attention_mask, pixel_values=None, image_embeds=None, patch=None, taps=None,
                 rows=None):
        captured = {}
        if pixel_values is not None:
            if image_embeds is not None:
                raise ValueError("pass pixel_values or image_embeds, not both")
            image_embeds, captured = self.encode_image(pixel_values, patch, taps)
        embeds = self.embed_inputs(input_ids, image_embeds)
        logits, cap_t = self.language_model(embeds, attention_mask, patch=patch, taps=taps, rows=rows)
        return logits, {**captured, **cap_t}

    def text_prefix(self, input_ids, attention_mask, image_embeds=None, stop: int = 0):
        """Language-model layers `0 .. stop - 1`, unedited: -> hidden states `[B, L, D]` entering layer `stop`."""
        return self.language_model.prefix(self.embed_inputs(input_ids, image_embeds), attention_mask, stop)

    def text_resume(self, h, attention_mask, start: int, patch=None, taps=None, rows=None):
        """From `text_prefix`'s hidden states `h [B, L, D]`: layers `start ..` and the head -> (logits, captured)."""
        return self.language_model.resume(h, attention_mask, start, patch=patch, taps=taps, rows=rows)

    def decode(self, inputs_embeds, positions, cache, cache_index, key_mask, patch=None):
        """Runs new tokens through the language model with a KV cache: -> (logits, new cache)."""
        mask = jnp.ones(inputs_embeds.shape[:2], jnp.int32)
        logits, _, cache = self.language_model(inputs_embeds, mask, patch=patch, cache=cache,
                                               cache_index=cache_index, key_mask=key_mask, positions=positions)
        return logits, cache


class MiniGPT4Model:
    """Config + parameters + module. `model(pixel_values [B, 3, H, W] | None, input_ids, attention_mask)` ->
    logits `[B, L, V]` aligned with `input_ids` (image slots as in the module docstring)."""

    def __init__(self, config: MiniGPT4Config, params, dtype: Any = jnp.float32, remat: bool = False):
        self.config = config
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self.module = MiniGPT4(config, dtype=self.dtype, param_dtype=self.dtype, remat=remat)
        self.stacks = stacks_of(config)
        self._forward = jax.jit(self._forward_impl)
        self._encode = jax.jit(self._encode_impl)
        self._generate = jax.jit(self._generate_impl, static_argnames=("max_new_tokens", "eos_token_id",
                                                                        "pad_token_id"))

    @classmethod
    def init(cls, config: MiniGPT4Config, rng: jax.Array, dtype: Any = jnp.float32,
             remat: bool = False) -> MiniGPT4Model:
        """Randomly initialised parameters (shapes matter to conversion; values to tests)."""
        dtype = jnp.dtype(dtype)
        module = MiniGPT4(config, dtype=dtype, param_dtype=dtype)
        s = config.vision.image_size
        ids = jnp.asarray([image_block(config, [0], [0])], jnp.int32)
        params = jax.jit(module.init)(rng, ids, jnp.ones_like(ids), pixel_values=jnp.zeros((1, s, s, 3), dtype))
        return cls(config, params["params"], dtype=dtype, remat=remat)

    @staticmethod
    def _nhwc(pixel_values):
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {pixel_values.shape}")
        return jnp.transpose(pixel_values, (0, 2, 3, 1))

    def _encode_impl(self, params, pixel_values, patch):
        return self.module.apply({"params": params}, self._nhwc(pixel_values), patch, method="encode_image")[0]

    def _forward_impl(self, params, pixel_values, input_ids, attention_mask, patch, image_embeds):
        kw = {}
        if pixel_values is not None:
            kw["pixel_values"] = self._nhwc(pixel_values.astype(self.dtype))
        if image_embeds is not None:
            kw["image_embeds"] = image_embeds
        return self.module.apply({"params": params}, input_ids, attention_mask, patch=patch, **kw)[0]

    def _generate_impl(self, params, pixel_values, input_ids, attention_mask, patch, max_new_tokens, eos_token_id,
                       pad_token_id):
        image = None if pixel_values is None else self._encode_impl(params, pixel_values.astype(self.dtype), patch)
        embeds = self.module.apply({"params": params}, input_ids, image, method="embed_inputs")
        return llama_lib.greedy_generate(self.module, params, embeds, attention_mask, max_new_tokens=max_new_tokens,
                                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, patch=patch)

    def __call__(self, pixel_values, input_ids, attention_mask=None, params=None, patch=None, image_embeds=None):
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        pixels = None if pixel_values is None else jnp.asarray(pixel_values)
        return self._forward(self.params if params is None else params, pixels, input_ids,
                             jnp.asarray(attention_mask, jnp.int32), patch or {}, image_embeds)

    def encode_image(self, pixel_values, params=None, patch=None):
        """`[B, 3, H, W]` -> projected query outputs `[B, nq, D]` (what the image slots are replaced by)."""
        return self._encode(self.params if params is None else params, jnp.asarray(pixel_values, self.dtype),
                            patch or {})

    def generate(self, pixel_values, input_ids, attention_mask=None, *, max_new_tokens: int = 20,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, params=None, patch=None):
        """Greedy decoding of left-padded prompts (positions from the mask): -> new token ids
        `[B, max_new_tokens]` (numpy); `eos_token_id`/`pad_token_id` default to the text config's."""
        text = self.config.text
        eos = text.eos_token_id if eos_token_id is None else eos_token_id
        pad = text.pad_token_id if pad_token_id is None else pad_token_id
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        pixels = None if pixel_values is None else jnp.asarray(pixel_values)
        run = functools.partial(self._generate, max_new_tokens=int(max_new_tokens),
                                eos_token_id=None if eos is None else int(eos), pad_token_id=int(pad or 0))
        out = run(self.params if params is None else params, pixels, input_ids,
                  jnp.asarray(attention_mask, jnp.int32), patch or {})
        return np.asarray(out)
