"""MiniGPT-4 as EasyEdit runs it: image -> EVA ViT -> `ln_vision` -> Q-Former -> `llama_proj` -> LLaMA -> logits.

`MiniGPT4` is the Linen module: `Blip2` with another projection (`llama_proj`), another decoder (LLaMA) and the
image slots' embedding rule, and otherwise `Blip2`'s methods, so `forward.Blip2Fns`, every editor and every metric
run it unchanged; `MiniGPT4Model` is the public object (config + params + module), `Blip2Model`'s.

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

import jax.numpy as jnp

from mmedit_jax.models import llama as llama_lib
from mmedit_jax.models import qformer as qformer_lib
from mmedit_jax.models import vit as vit_lib
from mmedit_jax.models.blip2 import Blip2, Blip2Model, splice_image_embeds
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


class MiniGPT4(Blip2):
    """`__call__(input_ids [B, L], attention_mask [B, L], pixel_values NHWC | None, image_embeds [B, nq, D] | None,
    patch, taps, rows) -> (logits [B, L | R, V] float32, captured)`; the other methods as `Blip2`'s."""

    config: MiniGPT4Config

    def setup(self):
        cfg = self.config
        kw = self.setup_vision_side()
        self.llama_proj = PatchableDense(cfg.text.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        self.language_model = llama_lib.LlamaDecoder(cfg.text, **kw)

    def project(self, query_out, patch=None, taps=None):
        """`llama_proj`: Q-Former outputs `[B, nq, Dq]` -> `([B, nq, D], captured)`."""
        view = EditView(patch or {}, taps or {}, "llama_proj")
        return self.llama_proj(query_out, view), view.captured

    def embed_inputs(self, input_ids, image_embeds=None):
        """Token embeddings, the image slots' rows replaced by `image_embeds` `[B, nq, D]` (when given)."""
        is_image = input_ids == self.config.image_token_index
        embeds = self.language_model.embed(jnp.where(is_image, 0, input_ids))
        if image_embeds is None:
            return embeds
        return splice_image_embeds(embeds, input_ids, image_embeds, self.config.image_token_index)

    def generation_positions(self, attention_mask):
        """LLaMA's generation positions (`llama.position_ids`)."""
        return llama_lib.position_ids(attention_mask)

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return self.language_model.cache_shape(batch, length)


class MiniGPT4Model(Blip2Model):
    """Config + parameters + module. `model(pixel_values [B, 3, H, W] | None, input_ids, attention_mask)` ->
    logits `[B, L, V]` aligned with `input_ids` (image slots as in the module docstring); `generate` is greedy
    decoding of left-padded prompts, positions from the mask."""

    module_class = MiniGPT4
    stacks_of = staticmethod(stacks_of)

    @staticmethod
    def init_ids(config) -> list[int]:
        return image_block(config, [0], [0])
