"""BLIP-2 at real sizes with random weights, for timing and memory at realistic shapes (`bench --preset`).

Configs as data: each preset is a `Blip2Config` whose token ids (image token, pad, bos, eos) are filled from the
tokenizer of the data it runs on (`with_tokens`). Weights come from `random_params`: drawn leaf by leaf in the
target dtype (no float32 copy of a bfloat16 model, no whole-model init program), as transformers initialises
BLIP-2 and OPT: N(0, 0.02) for kernels, embeddings and queries, ones for LayerNorm scales, zeros for biases.

| preset           | vision                          | Q-Former         | language model                 | params  |
|------------------|---------------------------------|------------------|--------------------------------|---------|
| `mid`            | ViT-B/16 at 224 px: 12 x 768    | 12 layers, 32 q. | OPT 24 x 1024, vocab 640       | 489.3 M |
| `blip2-opt-2.7b` | EVA ViT-g/14 at 224: 39 x 1408  | 12 layers, 32 q. | OPT-2.7B 32 x 2560, vocab 50272 | 3.745 B |

`mid` is the model issue 13 timed against the PyTorch peer (a vocabulary that holds the built-in world's
tokenizer, 617 tokens, and 512 positions); `blip2-opt-2.7b` is Salesforce/blip2-opt-2.7b's shapes (`param_count`
is tested against both).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax.models.blip2 import Blip2, Blip2Model
from mmedit_jax.models.config import Blip2Config, OPTConfig, QFormerConfig, VisionConfig

INIT_STD = 0.02  # transformers' initializer_range for BLIP-2 and OPT

PRESETS: dict[str, Blip2Config] = {
    "mid": Blip2Config(
        vision=VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=16),
        qformer=QFormerConfig(encoder_hidden_size=768),
        text=OPTConfig(vocab_size=640, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                       max_position_embeddings=512),
    ),
    "blip2-opt-2.7b": Blip2Config(
        vision=VisionConfig(),  # EVA ViT-g/14: 39 x 1408, MLP 6144, 16 heads
        qformer=QFormerConfig(),  # 12 layers, cross-attention every 2nd, onto the ViT's 1408
        text=OPTConfig(vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                       num_attention_heads=32, max_position_embeddings=2048),
    ),
}


def preset(name: str) -> Blip2Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(sorted(PRESETS))})")
    return PRESETS[name]


def with_tokens(config: Blip2Config, image_token_index: int, pad: int | None, bos: int | None,
                eos: int | None, vocab: int | None = None) -> Blip2Config:
    """`config` with a tokenizer's special ids; the ids, and the tokenizer's `vocab` tokens when given, must fit
    the preset's vocabulary (an id past the embedding table would read NaN, not fail)."""
    ids = [i for i in (image_token_index, pad, bos, eos) if i is not None]
    if max(ids) >= config.text.vocab_size:
        raise ValueError(f"token id {max(ids)} does not fit the preset's vocabulary of {config.text.vocab_size}")
    if vocab is not None and vocab > config.text.vocab_size:
        raise ValueError(f"the tokenizer's {vocab} tokens do not fit the preset's vocabulary of "
                         f"{config.text.vocab_size}")
    text = dataclasses.replace(config.text, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    return dataclasses.replace(config, text=text, image_token_index=image_token_index)


def param_shapes(config: Blip2Config, dtype=jnp.float32):
    """The parameter tree as `jax.ShapeDtypeStruct`s (abstract: nothing is allocated)."""
    if config.image_token_index is None:
        config = dataclasses.replace(config, image_token_index=config.text.vocab_size - 1)
    module = Blip2(config, dtype=dtype, param_dtype=dtype)
    s = config.vision.image_size
    ids = jnp.asarray([Blip2Model.init_ids(config)], jnp.int32)
    init = lambda: module.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids),  # noqa: E731
                               pixel_values=jnp.zeros((1, s, s, 3), dtype))["params"]
    return jax.eval_shape(init)


def param_count(config: Blip2Config) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(config)))


def random_params(config: Blip2Config, seed: int = 0, dtype=jnp.float32, big: int = 1 << 22):
    """Random weights of `config`, each leaf drawn on its own in `dtype`. Leaves of `big` elements or more are
    drawn by a jitted program straight into `dtype` (peak memory: the weights and nothing else; one compile per
    distinct shape), smaller ones by numpy (no compile)."""
    dtype = jnp.dtype(dtype)
    leaves, tree = jax.tree_util.tree_flatten_with_path(param_shapes(config, dtype))
    normal = jax.jit(lambda key, shape: (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype),
                     static_argnums=1)
    rng = np.random.default_rng(seed)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "bias"):  # numpy: an eager jnp.ones would compile a program per shape
            out.append(jnp.asarray(np.full(leaf.shape, 1 if name == "scale" else 0, dtype)))
        elif leaf.size >= big:
            out.append(normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), leaf.shape))
        else:
            out.append(jnp.asarray((INIT_STD * rng.standard_normal(leaf.shape, np.float32)).astype(dtype)))
    return jax.tree_util.tree_unflatten(tree, out)


def random_model(config: Blip2Config, seed: int = 0, dtype=jnp.float32) -> Blip2Model:
    return Blip2Model(config, random_params(config, seed, dtype), dtype=dtype)
