"""Command line conversion.

  python -m mmedit_jax.convert --hf-dir DIR --out OUT [--dtype float32|bfloat16] [--overwrite]
      A Hugging Face BLIP-2 or LLaMA directory -> a converted checkpoint (Orbax params + mmedit_config.json), with the
      tokenizer/processor files copied beside it so `AutoTokenizer.from_pretrained(OUT)` works offline.
  python -m mmedit_jax.convert mend-easyedit ARGS...
      Import an EasyEdit-trained MEND checkpoint (see `mmedit_jax/convert/mend_easyedit.py`).
  python -m mmedit_jax.convert minigpt4 --llama-dir D --projection F --blip2-dir D --out OUT
      Assemble MiniGPT-4 from a LLaMA dir, its llama_proj .pth and a BLIP-2 dir (`mmedit_jax/convert/minigpt4.py`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time

SUBCOMMANDS = {"mend-easyedit": "mmedit_jax.convert.mend_easyedit", "minigpt4": "mmedit_jax.convert.minigpt4"}
DTYPES = ("float32", "bfloat16")


def copy_side_files(hf_dir: str, out: str) -> list[str]:
    """Copy everything but the weights (tokenizer, processor, generation config, HF config) from hf_dir."""
    copied = []
    for name in sorted(os.listdir(hf_dir)):
        src = os.path.join(hf_dir, name)
        weights = name.endswith((".safetensors", ".bin", ".pt", ".h5", ".msgpack")) or name.endswith(".index.json")
        if os.path.isfile(src) and not weights:
            shutil.copy2(src, os.path.join(out, name))
            copied.append(name)
    return copied


def convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmedit_jax.convert",
        description="Convert a Hugging Face BLIP-2 or LLaMA checkpoint directory into an mmedit_jax checkpoint.",
        epilog="Subcommands: 'mend-easyedit ARGS...' imports an EasyEdit MEND checkpoint; 'minigpt4 ARGS...' "
               "assembles MiniGPT-4.",
    )
    parser.add_argument("--hf-dir", required=True,
                        help="Hugging Face BLIP-2 or LLaMA directory (config.json + weights)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter dtype to store")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing converted checkpoint")
    args = parser.parse_args(argv)

    # Imported after parsing, so `--help` and usage errors answer without loading JAX.
    import jax.numpy as jnp

    from mmedit_jax import checkpoint
    from mmedit_jax.loading import iter_hf

    if not os.path.isdir(args.hf_dir):
        parser.error(f"--hf-dir {args.hf_dir} is not a directory")
    if os.path.exists(os.path.join(args.out, checkpoint.PARAMS_DIR)) and not args.overwrite:
        parser.error(f"{args.out} already holds a converted checkpoint; pass --overwrite to replace it")
    t0 = time.perf_counter()
    # Converted parameters stream into the part-wise Orbax save: about one part is in memory at a time.
    config, pairs = iter_hf(args.hf_dir, getattr(jnp, args.dtype))
    checkpoint.save_model(args.out, config, pairs, overwrite=args.overwrite)
    copied = copy_side_files(args.hf_dir, args.out)
    meta = checkpoint.read_metadata(args.out)
    print(
        f"converted {meta['num_params']:,} parameters ({args.dtype}) from {args.hf_dir} to {args.out} in "
        f"{time.perf_counter() - t0:.1f}s ({len(meta['params_parts'])} parts); copied "
        f"{', '.join(copied) or 'no side files'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        name = SUBCOMMANDS[argv[0]]
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            print(f"error: subcommand {argv[0]!r} needs {name}, which is not part of this install", file=sys.stderr)
            return 2
        return int(module.main(argv[1:]) or 0)
    return convert_main(argv)


if __name__ == "__main__":
    sys.exit(main())
