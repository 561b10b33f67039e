"""`from_pretrained`: a Hugging Face BLIP-2 or LLaMA directory, or a converted one -> `Blip2Model` / `LlamaModel`.

Which kind a directory is: a converted one has `mmedit_config.json` (see `checkpoint.py`); a Hugging Face one
has `config.json` next to its safetensors (or `.bin`) files, and is converted in memory (streaming, so host memory
stays near the model's size) by the rules of its `model_type` (`FAMILIES`: `blip-2` -> `blip2_rules`, `llama` ->
`llama_rules`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax import checkpoint
from mmedit_jax.convert.blip2 import blip2_rules
from mmedit_jax.convert.engine import apply_rules, iter_rules, open_checkpoint, read_hf_json
from mmedit_jax.convert.llama import llama_rules
from mmedit_jax.models.blip2 import Blip2Model
from mmedit_jax.models.config import Blip2Config, LlamaConfig, MiniGPT4Config
from mmedit_jax.models.llama import LlamaModel
from mmedit_jax.models.minigpt4 import MiniGPT4Model
from mmedit_jax.models.vit import interpolate_pos_encoding

HF_CONFIG = "config.json"

# A Hugging Face `model_type` -> (config class, model class, conversion rules of the whole model).
FAMILIES = {
    "blip-2": (Blip2Config, Blip2Model, blip2_rules),
    "llama": (LlamaConfig, LlamaModel, llama_rules),
}
# The model class of every config a converted checkpoint may hold. MiniGPT-4 has no Hugging Face directory of its
# own: `python -m mmedit_jax.convert minigpt4` assembles it from three checkpoints (`convert/minigpt4.py`).
MODELS = {Blip2Config: Blip2Model, LlamaConfig: LlamaModel, MiniGPT4Config: MiniGPT4Model}


def _family(config):
    return next(f for f in FAMILIES.values() if isinstance(config, f[0]))


def model_class(config):
    """`Blip2Model`, `LlamaModel` or `MiniGPT4Model` for a config."""
    return MODELS[type(config)]


def read_hf_config(hf_dir: str | os.PathLike) -> Blip2Config | LlamaConfig:
    """The config (`Blip2Config` or `LlamaConfig`) of a Hugging Face directory's `config.json`; errors name the
    file."""
    file, d = read_hf_json(hf_dir, HF_CONFIG)
    if d.get("model_type") not in FAMILIES:
        raise ValueError(f"{file}: model_type is {d.get('model_type')!r}, expected one of {sorted(FAMILIES)}")
    return FAMILIES[d["model_type"]][0].from_hf(d)


def detect(path: str | os.PathLike) -> str:
    """'converted' or 'hf' for a model directory; a clear error otherwise."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no model directory at {path}")
    if checkpoint.is_converted(path):
        return "converted"
    if os.path.isfile(os.path.join(path, HF_CONFIG)):
        return "hf"
    raise FileNotFoundError(
        f"{path} is neither a converted checkpoint ({checkpoint.CONFIG_FILE}) nor a Hugging Face BLIP-2 / LLaMA "
        f"directory ({HF_CONFIG} + model.safetensors)"
    )


def param_template(config: Blip2Config | LlamaConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The model's parameter tree as `jax.ShapeDtypeStruct`s (nothing is allocated)."""
    model_cls = model_class(config)
    return jax.eval_shape(lambda rng: model_cls.init(config, rng, dtype=dtype).params, jax.random.key(0))


def _hf_conversion(hf_dir, dtype):
    config = read_hf_config(hf_dir)
    rules, ignored = _family(config)[2](config)
    return config, open_checkpoint(hf_dir), param_template(config, dtype), rules, ignored


def convert_hf(hf_dir: str | os.PathLike, dtype: Any = jnp.float32, progress=None):
    """(config, numpy param tree) from a Hugging Face BLIP-2 or LLaMA directory, converted tensor by tensor."""
    config, reader, template, rules, ignored = _hf_conversion(hf_dir, dtype)
    return config, apply_rules(reader, template, rules, ignored, dtype=dtype, progress=progress)


def iter_hf(hf_dir: str | os.PathLike, dtype: Any = jnp.float32):
    """(config, iterator of ('a/b/c', numpy array)): the conversion as a stream, one parameter at a time.
    Every check runs when the iteration starts, before any tensor is read."""
    config, reader, template, rules, ignored = _hf_conversion(hf_dir, dtype)
    return config, iter_rules(reader, template, rules, ignored, dtype=dtype)


def to_device(tree: dict[str, Any]) -> dict[str, Any]:
    """numpy tree -> jax arrays on the default device, emptying `tree` leaf by leaf as it goes, so the host
    holds at most one leaf twice (a whole-tree `device_put` would briefly hold the model twice)."""
    out = {}
    for name in list(tree):
        value = tree.pop(name)
        if isinstance(value, dict):
            out[name] = to_device(value)
        else:  # wait for each copy: pending async copies would keep every numpy leaf alive at once
            out[name] = jax.device_put(np.asarray(value)).block_until_ready()
        del value
    return out


def _resize_images(config: Blip2Config | LlamaConfig, params, image_size: int | None):
    """Resample the vision position embeddings when the run's image size differs from the checkpoint's."""
    if image_size is not None and not hasattr(config, "vision"):
        raise ValueError(f"image_size={image_size}: a {config.model_type} model has no vision tower")
    if image_size is None or int(image_size) == config.vision.image_size:
        return config, params
    vision, vision_config = interpolate_pos_encoding(params["vision_model"], config.vision, int(image_size))
    return dataclasses.replace(config, vision=vision_config), {**params, "vision_model": vision}


def from_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32, image_size: int | None = None,
                    verify: bool | None = None):
    """Load a BLIP-2 (`Blip2Model`) or LLaMA (`LlamaModel`) model from a Hugging Face directory or a converted one
    (`python -m mmedit_jax.convert`), or MiniGPT-4 (`MiniGPT4Model`) from a converted one
    (`python -m mmedit_jax.convert minigpt4`).

    `dtype`: parameter and compute dtype (float32 or bfloat16). `image_size`: run at this image size,
    interpolating the vision position embeddings (EasyEdit feeds 364 px images to 224 px checkpoints).
    `verify` (converted checkpoints): check the parameter files against their checksums before reading them
    (True), skip that for speed (False), or verify unless `$MMEDIT_JAX_SKIP_VERIFY=1` (None, the default).
    """
    dtype = jnp.dtype(dtype)  # accepts "bfloat16" as well as jnp.bfloat16
    kind = detect(path)
    if kind == "converted":
        config = checkpoint.read_config(path)
        params = checkpoint.restore_params(path, param_template(config, dtype), verify=verify)
    else:
        config, params = convert_hf(path, dtype)
        params = to_device(params)
    config, params = _resize_images(config, params, image_size)
    return model_class(config)(config, params, dtype=dtype)
