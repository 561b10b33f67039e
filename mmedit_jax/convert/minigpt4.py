"""MiniGPT-4 assembled from three checkpoints into `models/minigpt4.py`'s tree.

* a Hugging Face BLIP-2 directory: the ViT, `post_layernorm` (LAVIS's `ln_vision`), `query_tokens` and the
  Q-Former (`blip2_vision.py`'s rules); its language side (`language_model.*`, `language_projection.*`) is unused;
* MiniGPT-4's projection file (`pretrained_minigpt4_7b.pth`, `{'model': {'llama_proj.weight', 'llama_proj.bias'}}`),
  read with torch's weights-only unpickler (`engine.open_torch_state`: a pickle holding code is refused);
* a Hugging Face LLaMA / Vicuna directory (`llama.py`'s rules).

The three are read as one `engine.MergedReader` (keys `blip2:...`, `minigpt4:...`, `llama:...`), so the engine's
checks cover the whole model: every parameter filled, every tensor's shape checked, a missing or unused tensor an
error naming its key. MiniGPT-4's `ln_vision` eps (1e-5) replaces transformers' BLIP-2 `post_layernorm` eps (1e-6).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from mmedit_jax import checkpoint
from mmedit_jax.convert.__main__ import DTYPES, copy_side_files
from mmedit_jax.convert.blip2_vision import qformer_rules, vision_rules
from mmedit_jax.convert.engine import MergedReader, apply_rules, iter_rules, open_checkpoint, open_torch_state
from mmedit_jax.convert.llama import llama_rules
from mmedit_jax.convert.rules import Rule, plain
from mmedit_jax.models.config import LlamaConfig, MiniGPT4Config, QFormerConfig, VisionConfig
from mmedit_jax.models.minigpt4 import MiniGPT4Model

LN_VISION_EPS = 1e-5
BLIP2, PROJ, LLAMA = "blip2", "minigpt4", "llama"
# BLIP-2 keys MiniGPT-4 does not use (its language side), by prefix.
UNUSED_BLIP2 = ("language_model.", "language_projection.")


def _json(path: str) -> dict[str, Any]:
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{file} is missing: not a Hugging Face model directory") from e


def minigpt4_config(blip2_dir: str | os.PathLike, llama_dir: str | os.PathLike, **overrides) -> MiniGPT4Config:
    """The config of the assembly: vision and Q-Former from the BLIP-2 `config.json` (`ln_vision` eps 1e-5), the
    LLaMA config from the LLaMA one; `overrides` are `MiniGPT4Config` fields (e.g. `prompt_before`)."""
    d = _json(os.fspath(blip2_dir))
    if d.get("model_type") != "blip-2":
        raise ValueError(f"{blip2_dir}: model_type is {d.get('model_type')!r}, expected 'blip-2'")
    # Only the vision side is read: the language model may be T5 (Salesforce/blip2-flan-t5-xxl is LAVIS's
    # blip2_pretrained_flant5xxl.pth, MiniGPT-4's Q-Former) or OPT; MiniGPT-4 replaces it.
    vision = VisionConfig.from_hf(d.get("vision_config") or {})
    vision = dataclasses.replace(vision, post_layernorm_eps=LN_VISION_EPS)
    return MiniGPT4Config(vision=vision, qformer=QFormerConfig.from_hf(d.get("qformer_config") or {}),
                          text=LlamaConfig.from_hf(_json(os.fspath(llama_dir))),
                          num_query_tokens=int(d.get("num_query_tokens", 32)), **overrides)


def _prefixed(rules: list[Rule], name: str) -> list[Rule]:
    return [dataclasses.replace(r, sources=tuple(f"{name}:{s}" for s in r.sources)) for r in rules]


def minigpt4_rules(config: MiniGPT4Config, blip2_keys=()) -> tuple[list[Rule], dict[str, str]]:
    """Rules for every parameter from the merged reader's keys, and the keys left unused (with the reason):
    `blip2_keys` are the BLIP-2 checkpoint's keys, whose language side is listed as unused."""
    rules = _prefixed(vision_rules(config.vision) + qformer_rules(config.qformer)
                      + [plain("query_tokens", "query_tokens")], BLIP2)
    rules += [plain("llama_proj/kernel", f"{PROJ}:llama_proj.weight", "linear"),
              plain("llama_proj/bias", f"{PROJ}:llama_proj.bias")]
    text_rules, ignored = llama_rules(config.text, source=f"{LLAMA}:")
    ignored.update({f"{BLIP2}:{k}": "BLIP-2's language side (MiniGPT-4 uses llama_proj + LLaMA)"
                    for k in blip2_keys if k.startswith(UNUSED_BLIP2)})
    return rules + text_rules, ignored


def _conversion(llama_dir, projection_file, blip2_dir, dtype, overrides):
    config = minigpt4_config(blip2_dir, llama_dir, **overrides)
    blip2 = open_checkpoint(blip2_dir)
    reader = MergedReader({BLIP2: blip2, PROJ: open_torch_state(projection_file), LLAMA: open_checkpoint(llama_dir)})
    rules, ignored = minigpt4_rules(config, blip2.keys())
    template = jax.eval_shape(lambda r: MiniGPT4Model.init(config, r, dtype=dtype).params, jax.random.key(0))
    return config, reader, template, rules, ignored


def convert_minigpt4(llama_dir: str | os.PathLike, projection_file: str | os.PathLike,
                     blip2_dir: str | os.PathLike, dtype: Any = jnp.float32, progress=None, **overrides):
    """(`MiniGPT4Config`, numpy param tree) from the three checkpoints (module docstring)."""
    config, reader, template, rules, ignored = _conversion(llama_dir, projection_file, blip2_dir, dtype, overrides)
    return config, apply_rules(reader, template, rules, ignored, dtype=dtype, progress=progress)


def iter_minigpt4(llama_dir: str | os.PathLike, projection_file: str | os.PathLike,
                  blip2_dir: str | os.PathLike, dtype: Any = jnp.float32, **overrides):
    """(config, iterator of ('a/b/c', numpy array)): the conversion as a stream (every check runs first)."""
    config, reader, template, rules, ignored = _conversion(llama_dir, projection_file, blip2_dir, dtype, overrides)
    return config, iter_rules(reader, template, rules, ignored, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    """`python -m mmedit_jax.convert minigpt4 --llama-dir D --projection F --blip2-dir D --out OUT`: a converted
    checkpoint `loading.from_pretrained(OUT, image_size=364)` loads (the LLaMA dir's tokenizer files copied)."""
    parser = argparse.ArgumentParser(prog="python -m mmedit_jax.convert minigpt4", description=__doc__.split("\n")[0])
    parser.add_argument("--llama-dir", required=True, help="Hugging Face LLaMA / Vicuna directory")
    parser.add_argument("--projection", required=True, help="MiniGPT-4's projection file (pretrained_minigpt4_7b.pth)")
    parser.add_argument("--blip2-dir", required=True, help="Hugging Face BLIP-2 directory (vision + Q-Former)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter dtype to store")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing converted checkpoint")
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.out, checkpoint.PARAMS_DIR)) and not args.overwrite:
        parser.error(f"{args.out} already holds a converted checkpoint; pass --overwrite to replace it")
    config, pairs = iter_minigpt4(args.llama_dir, args.projection, args.blip2_dir, getattr(jnp, args.dtype))
    checkpoint.save_model(args.out, config, pairs, overwrite=args.overwrite)
    copied = copy_side_files(args.llama_dir, args.out)
    meta = checkpoint.read_metadata(args.out)
    print(f"converted {meta['num_params']:,} MiniGPT-4 parameters ({args.dtype}) to {args.out}; copied "
          f"{', '.join(copied) or 'no side files'}")
    return 0
