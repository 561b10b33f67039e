"""BLIP-2's EVA ViT in Flax Linen, as transformers' `Blip2VisionModel`.

Patch convolution (with bias) -> class token -> learned position embeddings -> `num_hidden_layers` pre-LayerNorm
blocks (fused qkv projection with bias, exact-erf GELU MLP) scanned with `run_stack` -> post-LayerNorm.

Inside the module images are NHWC (`[B, H, W, 3]`); the public model object transposes from transformers' NCHW.
Position embeddings are fixed to `config.image_size`: to run another size, resample them once at load time with
`interpolate_pos_encoding` (as transformers' `interpolate_pos_encoding=True` does on every call).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax.models.config import VisionConfig
from mmedit_jax.models.layers import (
    EditView,
    PatchableDense,
    child,
    heads_major,
    init_stack,
    masked_scores,
    run_stack,
    sequence_major,
)

STACK_PREFIX = "vision_model/layers"

# transformers' ACT2FN names -> jax. "gelu" is the exact (erf) GELU, as torch's `nn.functional.gelu`.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported (known: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def layer_norm(epsilon: float, param_dtype, name: str):
    """A float32 LayerNorm whose params sit directly under `name` (`{scale, bias}`), as the spec's tree wants."""
    return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype, name=name)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Multi-head attention. q `[B, Lq, H, Dh]`, k/v `[B, Lk, H, Dh]` -> `[B, Lq, H, Dh]`.

    `mask`: None (every key visible) or boolean, broadcastable to `[B, H, Lq, Lk]`, True where a key is
    visible; hidden keys get float32's most negative score (a row with none visible averages all keys, as
    transformers' additive mask does). Scores are formed in the compute dtype and the softmax runs in float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = heads_major(q * jnp.asarray(scale, q.dtype)), heads_major(k), heads_major(v)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    if mask is not None:
        scores = masked_scores(scores, mask)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return sequence_major(jnp.einsum("bhqk,bhkd->bhqd", probs, v))


class VisionModule(nn.Module):
    """What every module of the vision tower holds: its config, compute dtype and parameter dtype."""

    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32


class VisionAttention(VisionModule):
    """Self-attention with one fused `qkv` projection (`[D, 3D]`, bias) and an output `projection`."""

    @nn.compact
    def __call__(self, x: jax.Array, edits: EditView | None = None) -> jax.Array:
        """x `[B, L, D]` -> `[B, L, D]`."""
        cfg = self.config
        b, l, d = x.shape
        heads = cfg.num_attention_heads
        if d % heads:
            raise ValueError(f"vision hidden_size {d} is not a multiple of num_attention_heads {heads}")
        dense = lambda n, name: PatchableDense(  # noqa: E731
            n, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        # transformers' qkv bias is [q_bias, 0, v_bias] at init but one trainable tensor in checkpoints.
        qkv = dense(3 * d, "qkv")(x, child(edits, "qkv"))
        q, k, v = jnp.moveaxis(qkv.reshape(b, l, 3, heads, d // heads), 2, 0)
        out = dot_product_attention(q, k, v).reshape(b, l, d)
        return dense(d, "projection")(out, child(edits, "projection"))


class VisionMLP(VisionModule):
    """`fc2(act(fc1(x)))`, `[B, L, D] -> [B, L, D]`."""

    @nn.compact
    def __call__(self, x: jax.Array, edits: EditView | None = None) -> jax.Array:
        cfg = self.config
        dense = lambda n, name: PatchableDense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        h = dense(cfg.intermediate_size, "fc1")(x, child(edits, "fc1"))
        h = activation(cfg.hidden_act)(h)
        return dense(cfg.hidden_size, "fc2")(h, child(edits, "fc2"))


class VisionLayer(VisionModule):
    """One pre-LayerNorm block: `h + attn(ln1(h))`, then `h + mlp(ln2(h))`. The scanned unit of the ViT."""

    @nn.compact
    def __call__(self, h: jax.Array, edits: EditView | None = None):
        """h `[B, L, D]` -> `(h [B, L, D], None)`."""
        cfg = self.config
        ln = lambda name, x: layer_norm(cfg.layer_norm_eps, self.param_dtype, name)(x).astype(self.dtype)  # noqa: E731
        attn = VisionAttention(cfg, self.dtype, self.param_dtype, name="self_attn")
        h = h + attn(ln("layer_norm1", h), child(edits, "self_attn"))
        mlp = VisionMLP(cfg, self.dtype, self.param_dtype, name="mlp")
        h = h + mlp(ln("layer_norm2", h), child(edits, "mlp"))
        return h, None


class VisionEmbeddings(VisionModule):
    """Patch convolution + class token + position embeddings: `[B, H, W, 3] -> [B, 1 + N, D]`."""

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        d, p = cfg.hidden_size, cfg.patch_size
        init = nn.initializers.normal(0.02)
        class_embedding = self.param("class_embedding", init, (1, 1, d), self.param_dtype)
        position_embedding = self.param("position_embedding", init, (1, 1 + cfg.num_patches, d), self.param_dtype)
        conv = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=True, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="patch_embedding")
        patches = conv(pixel_values.astype(self.dtype))  # [B, H/p, W/p, D]
        b = patches.shape[0]
        patches = patches.reshape(b, -1, d)  # row-major over (h, w), as torch's flatten(2) of NCHW
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, d))
        return jnp.concatenate([cls, patches], axis=1) + position_embedding.astype(self.dtype)


class VisionModel(VisionModule):
    """BLIP-2's vision tower.

    `(pixel_values [B, H, W, 3], patch, taps) -> (last_hidden_state [B, 1 + N, D], captured)`, where
    `last_hidden_state` is after `post_layernorm` (transformers' `Blip2VisionModel(...).last_hidden_state`),
    `patch`/`taps` are keyed by global sites (`vision_model/layers/{i}/mlp/fc1`, ...) and `captured` maps each
    tapped site to its layer input.
    """

    remat: bool = False

    def unit(self) -> VisionLayer:
        return VisionLayer(self.config, self.dtype, self.param_dtype, parent=None)

    @nn.compact
    def __call__(self, pixel_values: jax.Array, patch: dict | None = None, taps: dict | None = None):
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != 3:
            raise ValueError(f"pixel_values must be NHWC [B, H, W, 3], got shape {pixel_values.shape}")
        if pixel_values.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[1]}x{pixel_values.shape[2]} but the vision config's "
                f"image_size is {cfg.image_size}: resample the position embeddings first with "
                "mmedit_jax.models.vit.interpolate_pos_encoding"
            )
        h = VisionEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(pixel_values)
        unit = self.unit()
        layers = self.param("layers", lambda r: init_stack(unit, r, cfg.num_hidden_layers, h[:1]))
        h, _, captured = run_stack(unit, layers, h, prefix=STACK_PREFIX, patch=patch, taps=taps, remat=self.remat)
        eps = cfg.layer_norm_eps if cfg.post_layernorm_eps is None else cfg.post_layernorm_eps
        h = layer_norm(eps, self.param_dtype, "post_layernorm")(h).astype(self.dtype)
        return h, captured


# --------------------------------------------------------------------------------------------------
# Position-embedding interpolation (transformers' `interpolate_pos_encoding`), done once on the params.

_CUBIC_A = -0.75  # torch's bicubic coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution weights for taps at offsets -1, 0, 1, 2 from `floor(src)`. t `[n]` -> `[n, 4]`."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` float64 matrix of torch's 1-D bicubic resampling (align_corners=False, edge-clamped taps).

    Source coordinate `(dst + 0.5) * in / out - 0.5` (not clamped at 0 for cubic, as torch), taps at
    `floor(src) - 1 .. floor(src) + 2` clamped into `[0, in - 1]`.
    """
    dst = np.arange(out_size, dtype=np.float64)
    src = (dst + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    w = _cubic_weights(src - base)
    m = np.zeros((out_size, in_size))
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), w[:, tap])
    return m


def resize_position_embedding(position_embedding, new_grid: int) -> np.ndarray:
    """`[1, 1 + g*g, D]` -> `[1, 1 + new_grid**2, D]`: class position kept, patch grid resampled bicubically.

    Computed in float64 and returned in the input's dtype.
    """
    pos = np.asarray(position_embedding)
    n = pos.shape[1] - 1
    g = math.isqrt(n)
    if pos.ndim != 3 or pos.shape[0] != 1 or g * g != n:
        raise ValueError(f"position_embedding must be [1, 1 + g*g, D], got {pos.shape}")
    d = pos.shape[-1]
    grid = pos[0, 1:].astype(np.float64).reshape(g, g, d)
    m = bicubic_matrix(g, new_grid)
    grid = np.einsum("ih,jw,hwd->ijd", m, m, grid)  # separable: rows, then columns
    out = np.concatenate([pos[0, :1].astype(np.float64), grid.reshape(-1, d)], axis=0)[None]
    return out.astype(pos.dtype)


def interpolate_pos_encoding(vision_params: dict, config: VisionConfig, image_size: int):
    """Resamples the `vision_model` params for `image_size` pixels, as transformers' `interpolate_pos_encoding`.

    Args:
      vision_params: the `vision_model` subtree (`{"embeddings": {"position_embedding": ...}, ...}`).
      config: the config the params were made for.
      image_size: the new (square) image size; the grid becomes `image_size // patch_size`.

    Returns:
      `(new vision params, new config)`; every leaf but `position_embedding` is shared. When the grid does not
      change the inputs are returned as they are (transformers returns the embedding untouched then too).
    """
    new_config = dataclasses.replace(config, image_size=int(image_size))
    if new_config.num_patches == config.num_patches:
        return vision_params, new_config
    pos = vision_params["embeddings"]["position_embedding"]
    new_grid = int(image_size) // config.patch_size
    resized = resize_position_embedding(jax.device_get(pos), new_grid)
    if isinstance(pos, jax.Array):
        resized = jnp.asarray(resized, pos.dtype)
    embeddings = {**vision_params["embeddings"], "position_embedding": resized}
    return {**vision_params, "embeddings": embeddings}, new_config
