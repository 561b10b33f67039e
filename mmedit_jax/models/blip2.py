"""BLIP-2 (`Blip2ForConditionalGeneration`): image -> ViT -> Q-Former -> language projection -> OPT -> logits.

`Blip2` is the Linen module (images NHWC inside); `Blip2Model` is the public object `from_pretrained` returns:
config + parameter pytree + module, called with arrays laid out as transformers' processor gives them
(`pixel_values [B, 3, H, W]`). As in transformers 5, `input_ids` carry `num_query_tokens` image tokens
(`image_token_index`) whose embeddings are replaced, in order, by the projected Q-Former outputs.

Parameter tree:
  vision_model/...        models/vit.py (layers stacked over `vision_model/layers`)
  query_tokens            [1, nq, Dq]
  qformer/...             models/qformer.py (layers stacked in groups of `cross_attention_frequency`)
  language_projection     {kernel [Dq, E], bias [E]}
  language_model/...      models/opt.py (layers stacked over `language_model/layers`)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax.models import generate as generate_lib
from mmedit_jax.models import opt as opt_lib
from mmedit_jax.models import qformer as qformer_lib
from mmedit_jax.models import vit as vit_lib
from mmedit_jax.models.config import Blip2Config
from mmedit_jax.models.layers import EditView, PatchableDense


def stacks_of(config: Blip2Config) -> dict[str, int]:
    """Stacked-layer prefixes and layers per scanned unit (for `patch.resolve_site`)."""
    return {
        vit_lib.STACK_PREFIX: 1,
        qformer_lib.STACK_PREFIX: config.qformer.cross_attention_frequency,
        opt_lib.STACK_PREFIX: 1,
    }


def splice_image_embeds(inputs_embeds, input_ids, image_embeds, image_token_index: int):
    """Replaces the embeddings at image-token positions, row by row in order, by `image_embeds`.

    inputs_embeds `[B, L, E]`, input_ids `[B, L]`, image_embeds `[B, nq, E]` -> `[B, L, E]`. A row holds at most
    nq image tokens (transformers' `masked_scatter`); the k-th image token takes query output k.
    """
    is_image = input_ids == image_token_index
    slot = jnp.clip(jnp.cumsum(is_image, axis=-1) - 1, 0, image_embeds.shape[1] - 1)
    gathered = jnp.take_along_axis(image_embeds, slot[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(inputs_embeds.dtype), inputs_embeds)


class Blip2(nn.Module):
    """`__call__(input_ids [B, L], attention_mask [B, L], pixel_values NHWC | None, image_embeds [B, nq, E] | None,
    patch, taps) -> (logits [B, L, V] float32, captured)`.

    `encode_image(pixel_values, patch, taps) -> (image_embeds [B, nq, E], captured)` is the vision side alone
    (ViT -> Q-Former -> projection), so callers can cache it when an edit does not touch it. Likewise
    `text_prefix(..., stop=k)` and `text_resume(h, mask, k, patch)` split the language model at layer k, so the
    hidden states below the first edited layer can be computed once and reused.
    """

    config: Blip2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        kw = self.setup_vision_side()
        # transformers projects to the text `hidden_size` (its checkpoints' shape), not `word_embed_proj_dim`.
        self.language_projection = PatchableDense(cfg.text.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        self.language_model = opt_lib.OPTDecoder(cfg.text, **kw)

    def setup_vision_side(self) -> dict:
        """The ViT, the learned queries and the Q-Former (BLIP-2's and MiniGPT-4's alike); -> the submodules'
        dtype keywords."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
        self.vision_model = vit_lib.VisionModel(cfg.vision, **kw)
        self.query_tokens = self.param("query_tokens", nn.initializers.normal(0.02),
                                       (1, cfg.num_query_tokens, cfg.qformer.hidden_size), self.param_dtype)
        self.qformer = qformer_lib.QFormer(cfg.qformer, **kw)
        return kw

    def encode_image(self, pixel_values: jax.Array, patch: dict | None = None, taps: dict | None = None):
        image_features, cap_v = self.vision_model(pixel_values, patch=patch, taps=taps)
        b = image_features.shape[0]
        queries = jnp.broadcast_to(self.query_tokens, (b, *self.query_tokens.shape[1:]))
        query_out, cap_q = self.qformer(queries, image_features, patch=patch, taps=taps)
        embeds, cap_p = self.project(query_out, patch, taps)
        return embeds, {**cap_v, **cap_q, **cap_p}

    def project(self, query_out, patch=None, taps=None):
        """Q-Former outputs `[B, nq, Dq]` -> the language model's width, `(embeds, captured)`."""
        view = EditView(patch or {}, taps or {}, "language_projection")
        return self.language_projection(query_out, view), view.captured

    def embed_inputs(self, input_ids, image_embeds=None):
        """Token embeddings with the image tokens' rows replaced by `image_embeds` (when given)."""
        embeds = self.language_model.embed(input_ids)
        if image_embeds is None:
            return embeds
        if self.config.image_token_index is None:
            raise ValueError("config.image_token_index is not set: transformers 5 needs image tokens in input_ids")
        if image_embeds.shape[-1] != embeds.shape[-1]:
            # transformers' masked_scatter would silently spread the wider rows over several tokens.
            raise ValueError(
                f"image embeddings are {image_embeds.shape[-1]} wide but token embeddings {embeds.shape[-1]} "
                "(word_embed_proj_dim != hidden_size): BLIP-2 is not defined for such a text config"
            )
        return splice_image_embeds(embeds, input_ids, image_embeds, self.config.image_token_index)

    def __call__(self, input_ids, attention_mask, pixel_values=None, image_embeds=None, patch=None, taps=None,
                 rows=None, positions=None):
        """-> `(logits [B, L, V], captured)`; with `rows` `[B, R]`, logits at those positions only `[B, R, V]`.
        `positions` `[B, L]`: the language model's, instead of its default for the mask."""
        captured = {}
        if pixel_values is not None:
            if image_embeds is not None:
                raise ValueError("pass pixel_values or image_embeds, not both")
            image_embeds, captured = self.encode_image(pixel_values, patch, taps)
        embeds = self.embed_inputs(input_ids, image_embeds)
        logits, cap_t = self.language_model(embeds, attention_mask, patch=patch, taps=taps, rows=rows,
                                            positions=positions)
        return logits, {**captured, **cap_t}

    def text_prefix(self, input_ids, attention_mask, image_embeds=None, stop: int = 0):
        """Language-model layers `0 .. stop - 1`, unedited: -> hidden states `[B, L, D]` entering layer `stop`."""
        embeds = self.embed_inputs(input_ids, image_embeds)
        return self.language_model.prefix(embeds, attention_mask, stop)

    def text_resume(self, h, attention_mask, start: int, patch=None, taps=None, rows=None):
        """From `text_prefix`'s hidden states `h [B, L, D]`: layers `start ..` and the head -> (logits, captured)."""
        return self.language_model.resume(h, attention_mask, start, patch=patch, taps=taps, rows=rows)

    def generation_positions(self, attention_mask):
        """Positions of a left-padded prompt `[B, L]` in generation: OPT's, from the mask."""
        return opt_lib.position_ids(attention_mask)

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        """The KV cache's keys (or values): `[layers, B, T, heads, head_dim]`."""
        cfg = self.config.text
        heads = cfg.num_attention_heads
        return (cfg.num_hidden_layers, batch, length, heads, cfg.hidden_size // heads)

    def decode(self, inputs_embeds, positions, cache, cache_index, key_mask, patch=None):
        """Runs new tokens through the language model with a KV cache: -> (logits, new cache)."""
        mask = jnp.ones(inputs_embeds.shape[:2], jnp.int32)
        logits, _, cache = self.language_model(inputs_embeds, mask, patch=patch, cache=cache,
                                               cache_index=cache_index, key_mask=key_mask, positions=positions)
        return logits, cache


# --------------------------------------------------------------------------------------------------
# Greedy generation with a KV cache (static shapes: one compiled program per prompt length and budget).


def greedy_generate(module: Blip2, params, input_ids, attention_mask, image_embeds, *, max_new_tokens: int,
                    eos_token_id: int | None, pad_token_id: int, patch=None):
    """Greedy decoding of left-padded prompts. input_ids `[B, L]` -> new token ids `[B, max_new_tokens]`
    (`generate.greedy_generate` at the module's `generation_positions`). `module`: `Blip2` or a subclass."""
    apply = functools.partial(module.apply, {"params": params})
    embeds = apply(input_ids, image_embeds, method="embed_inputs")
    return generate_lib.greedy_generate(module, params, embeds, attention_mask,
                                        apply(attention_mask, method="generation_positions"),
                                        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                        pad_token_id=pad_token_id, patch=patch)


# --------------------------------------------------------------------------------------------------
# The public model object.


class Blip2Model:
    """Config + parameters + module. `model(pixel_values [B, 3, H, W] | None, input_ids, attention_mask)` ->
    logits `[B, L, V]` aligned with `input_ids`, as transformers' `Blip2ForConditionalGeneration`."""

    module_class = Blip2
    stacks_of = staticmethod(stacks_of)

    def __init__(self, config: Blip2Config, params, dtype: Any = jnp.float32, remat: bool = False):
        self.config = config
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self.module = self.module_class(config, dtype=self.dtype, param_dtype=self.dtype, remat=remat)
        self.stacks = self.stacks_of(config)
        self._forward = jax.jit(self._forward_impl)
        self._encode = jax.jit(self._encode_impl)
        self._generate = jax.jit(self._generate_impl, static_argnames=("max_new_tokens", "eos_token_id",
                                                                        "pad_token_id"))

    @classmethod
    def init(cls, config: Blip2Config, rng: jax.Array, dtype: Any = jnp.float32, remat: bool = False) -> Blip2Model:
        """Randomly initialised parameters (shapes only matter to conversion; values to tests and pretraining)."""
        dtype = jnp.dtype(dtype)
        module = cls.module_class(config, dtype=dtype, param_dtype=dtype)
        s = config.vision.image_size
        pixels = jnp.zeros((1, s, s, 3), dtype)
        ids = jnp.asarray([cls.init_ids(config)], jnp.int32)
        params = jax.jit(module.init)(rng, ids, jnp.ones_like(ids), pixel_values=pixels)["params"]
        return cls(config, params, dtype=dtype, remat=remat)

    @staticmethod
    def init_ids(config) -> list[int]:
        """A prompt that runs every part once (`init`): the image tokens and one text token."""
        image = [] if config.image_token_index is None else [config.image_token_index] * config.num_query_tokens
        return image + [0] * (1 if image else config.num_query_tokens + 1)

    @staticmethod
    def _nhwc(pixel_values):
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W] (transformers' layout), got {pixel_values.shape}")
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
        embeds = None
        if pixel_values is not None:
            embeds = self._encode_impl(params, pixel_values.astype(self.dtype), patch)
        return greedy_generate(self.module, params, input_ids, attention_mask, embeds, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, patch=patch)

    def __call__(self, pixel_values, input_ids, attention_mask=None, params=None, patch=None, image_embeds=None):
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        pixels = None if pixel_values is None else jnp.asarray(pixel_values)
        return self._forward(self.params if params is None else params, pixels, input_ids,
                             jnp.asarray(attention_mask, jnp.int32), patch or {}, image_embeds)

    def encode_image(self, pixel_values, params=None, patch=None):
        """`[B, 3, H, W]` -> projected query outputs `[B, nq, E]` (what the image tokens are replaced by)."""
        return self._encode(self.params if params is None else params, jnp.asarray(pixel_values, self.dtype),
                            patch or {})

    def generate(self, pixel_values, input_ids, attention_mask=None, *, max_new_tokens: int = 20,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, params=None, patch=None):
        """Greedy decoding of left-padded prompts: -> new token ids `[B, max_new_tokens]` (numpy).

        `eos_token_id`/`pad_token_id` default to the text config's; rows that stop early are padded.
        """
        text = self.config.text
        eos = text.eos_token_id if eos_token_id is None else eos_token_id
        pad = text.pad_token_id if pad_token_id is None else pad_token_id
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if input_ids.shape[1] + max_new_tokens > text.max_position_embeddings:
            raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                             f"max_position_embeddings {text.max_position_embeddings}")
        pixels = None if pixel_values is None else jnp.asarray(pixel_values)
        out = self._generate(self.params if params is None else params, pixels, input_ids,
                             jnp.asarray(attention_mask, jnp.int32), patch or {}, max_new_tokens=int(max_new_tokens),
                             eos_token_id=None if eos is None else int(eos), pad_token_id=int(pad or 0))
        return np.asarray(out)
