"""Single-example forward functions of BLIP-2, the form editors and the harness vmap over.

`Blip2Fns(module, pixels=False)` takes cached image embeddings `[nq, E]`. With `pixels=True` it takes pixels
`[3, H, W]` (as the image processor gives them) and runs the (possibly patched) vision side itself, which
vision-side editors (FT-V) need. `prefix` / `resume_logits` split the language model at a layer, for the
harness's frozen-prefix cache.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmedit_jax.editors.base import Seq


@dataclasses.dataclass(frozen=True)
class Blip2Fns:
    module: nn.Module
    pixels: bool = False

    @property
    def uses_pixels(self) -> bool:
        return self.pixels

    def encode(self, params, patch, pixel_values: jax.Array) -> jax.Array:
        """`[B, 3, H, W]` -> projected query outputs `[B, nq, E]`."""
        nhwc = jnp.transpose(pixel_values, (0, 2, 3, 1))
        embeds, _ = self.module.apply({"params": params}, nhwc, patch=patch, method="encode_image")
        return embeds

    def forward(self, params, patch, seq: Seq, image, taps=None, rows=None):
        """One example: `seq` fields `[L]`, `image` `[nq, E]` / `[3, H, W]` / None -> (logits `[L, V]`, captured).

        `captured` maps each tapped site to its layer input without the batch axis. `rows` `[R]`: logits at those
        positions only, `[R, V]` (the last language-model layer and the head run R rows).
        """
        kw = {} if rows is None else {"rows": rows[None]}
        if image is not None and self.pixels:
            kw["pixel_values"] = jnp.transpose(image[None], (0, 2, 3, 1))  # the table holds [3, H, W]
        elif image is not None:
            kw["image_embeds"] = image[None]
        logits, captured = self.module.apply(
            {"params": params}, seq.input_ids[None], seq.attention_mask[None], patch=patch, taps=taps, **kw
        )
        return logits[0], {k: v[0] for k, v in captured.items()}

    def logits(self, params, patch, seq: Seq, image) -> jax.Array:
        return self.forward(params, patch, seq, image)[0]

    def prefix(self, params, seq: Seq, image, stop: int) -> jax.Array:
        """The unedited language model up to layer `stop` (excluded): -> hidden states `[L, D]`.

        Only with cached image embeddings `[nq, E]` (or None): a model that runs pixels may have the vision side
        edited, which the language-model prefix cannot see.
        """
        if self.pixels:
            raise ValueError("prefix() takes cached image embeddings; this Blip2Fns runs pixels")
        image = None if image is None else image[None]
        h = self.module.apply({"params": params}, seq.input_ids[None], seq.attention_mask[None], image, stop,
                              method="text_prefix")
        return h[0]

    def resume(self, params, patch, seq: Seq, h: jax.Array, start: int, taps=None, rows=None):
        """Continues `prefix(..., stop=start)`'s hidden states `h [L, D]` through layers `start ..` (patched) and
        the head: -> `(logits [L, V] (or [R, V] at `rows`), captured)`, as `forward` when `patch` and `taps`
        leave the layers below `start` alone."""
        logits, captured = self.module.apply({"params": params}, h[None], seq.attention_mask[None], start, patch,
                                             taps, None if rows is None else rows[None], method="text_resume")
        return logits[0], {k: v[0] for k, v in captured.items()}

    def resume_logits(self, params, patch, seq: Seq, h: jax.Array, start: int) -> jax.Array:
        """`resume`'s logits `[L, V]`."""
        return self.resume(params, patch, seq, h, start)[0]
