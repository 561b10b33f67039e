"""Conversion time and peak host memory for a large random BLIP-2 (or LLaMA / Vicuna) checkpoint.

Builds a Hugging Face BLIP-2 directory (config.json + sharded model.safetensors + index) of random weights,
written tensor by tensor with a small safetensors writer so building it never holds the model in memory
(key names and shapes come from transformers' model instantiated on the `meta` device: no memory). Then
runs, each in its own subprocess, and reads that child's peak RSS (`ru_maxrss` from `os.wait4`):
  baseline   python + jax + mmedit_jax imported, nothing loaded
  convert    python -m mmedit_jax.convert --hf-dir CKPT --out OUT      (stream -> numpy tree -> Orbax)
  hf_load    mmedit_jax.from_pretrained(CKPT)                          (in-memory conversion -> jax arrays)
  conv_load  mmedit_jax.from_pretrained(OUT)                           (Orbax restore)
The issue's target: peak <= ~1.5x the checkpoint size.

  python benchmarks/convert_memory.py --preset opt-1.3b --workdir /tmp/convbench --json benchmarks/convert_memory.json
Presets: tiny (seconds, for a smoke run), opt-125m, opt-1.3b (ViT-g + Q-Former + OPT-1.3B, ~9.6 GB float32),
opt-2.7b (the blip2-opt-2.7b shapes, ~15 GB float32: needs ~23 GB RAM at 1.5x); LLaMA directories (what MiniGPT-4's
language model converts from, `python -m mmedit_jax.convert --hf-dir` on a LLaMA directory): llama-tiny, vicuna-7b
(Vicuna-7B's shapes, 13.5 GB in float16; `--runs convert --out-dtype bfloat16`: the in-memory loads of a 7B model
do not fit a 24 GB host).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             image_size=224, patch_size=14)
QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               encoder_hidden_size=1408, cross_attention_frequency=2)
PRESETS = {
    "tiny": dict(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=30, patch_size=15),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                            encoder_hidden_size=32, cross_attention_frequency=2),
        text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=37, num_attention_heads=4,
                         max_position_embeddings=64),
        num_query_tokens=4,
    ),
    "opt-125m": dict(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        qformer_config=dict(QFORMER, encoder_hidden_size=768),
        text_config=dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12),
        num_query_tokens=32,
    ),
    "opt-1.3b": dict(
        vision_config=VIT_G,
        qformer_config=QFORMER,
        text_config=dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
        num_query_tokens=32,
    ),
    "opt-2.7b": dict(
        vision_config=VIT_G,
        qformer_config=QFORMER,
        text_config=dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32),
        num_query_tokens=32,
    ),
}
LLAMA_PRESETS = {  # transformers.LlamaConfig kwargs
    "llama-tiny": dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64),
    "vicuna-7b": dict(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048),
}
ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def hf_config(preset: str):
    import transformers

    if preset in LLAMA_PRESETS:
        return transformers.LlamaConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, **LLAMA_PRESETS[preset])
    kw = dict(PRESETS[preset])
    text = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=None,
                pad_token_id=1, bos_token_id=2, eos_token_id=2)
    text.update(kw.pop("text_config"))
    text["word_embed_proj_dim"] = text["word_embed_proj_dim"] or text["hidden_size"]
    vocab = text["vocab_size"]
    return transformers.Blip2Config(text_config=text, image_token_index=vocab - 1, **kw)


def checkpoint_shapes(config) -> dict[str, tuple[int, ...]]:
    """{key: shape} of what `save_pretrained` writes, from a model on the meta device (no memory)."""
    import torch
    import transformers

    llama = isinstance(config, transformers.LlamaConfig)
    with torch.device("meta"):
        model = (transformers.LlamaForCausalLM if llama else transformers.Blip2ForConditionalGeneration)(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not llama:  # LLaMA's lm_head is its own tensor (untied), and saved
        shapes.pop("language_model.lm_head.weight")  # tied to embed_tokens; save_pretrained leaves it out
    return shapes


def write_safetensors(path: str, shapes: dict[str, tuple[int, ...]], dtype, rng) -> int:
    """Write random tensors one at a time: header first (offsets known from shapes), then each tensor."""
    dtype = np.dtype(dtype)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        n = int(np.prod(shape)) * dtype.itemsize
        header[key] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for shape in shapes.values():
            f.write((0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype).tobytes())
    return os.path.getsize(path)


def build_checkpoint(folder: str, preset: str, dtype, shard_bytes: float = 2e9) -> int:
    config = hf_config(preset)
    shapes = checkpoint_shapes(config)
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        current[key] = shape
        size += int(np.prod(shape)) * np.dtype(dtype).itemsize
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(folder, name), part, dtype, rng)
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def run_child(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS bytes, output) of one subprocess, via its own rusage from os.wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss * 1024.0, out  # ru_maxrss is in KiB on Linux


def engine_child(mode: str, ckpt: str, out: str):
    """The engine with one identity rule per tensor (no model code needed):
    save: stream it into a part-wise Orbax save as the CLI does; memory: convert into a numpy tree and move
    it to the device as `from_pretrained(hf_dir)` does; restore: restore the saved one as
    `from_pretrained(converted_dir)` does."""
    import jax

    from mmedit_jax import checkpoint
    from mmedit_jax.convert.engine import apply_rules, iter_rules, open_checkpoint
    from mmedit_jax.convert.rules import plain
    from mmedit_jax.loading import read_hf_config, to_device
    from mmedit_jax.tree import unflatten

    reader = open_checkpoint(ckpt)
    targets = {k: k.replace(".", "/") for k in reader.keys()}
    template = unflatten({t: jax.ShapeDtypeStruct(reader.shapes[k], reader.dtypes[k]) for k, t in targets.items()})
    rules = [plain(t, k) for k, t in targets.items()]
    if mode == "save":
        checkpoint.save_model(out, read_hf_config(ckpt), iter_rules(reader, template, rules))
    elif mode == "memory":
        jax.block_until_ready(to_device(apply_rules(reader, template, rules)))
    else:
        jax.block_until_ready(checkpoint.restore_params(out, template))


RUNS = ["baseline", "engine", "engine_restore", "engine_memory", "convert", "hf_load", "conv_load"]
LOAD = "import jax, mmedit_jax, sys; m = mmedit_jax.from_pretrained(sys.argv[1]); jax.block_until_ready(m.params)"
BASELINE = "import jax, jax.numpy as jnp, orbax.checkpoint, mmedit_jax.loading, mmedit_jax.convert.engine; jnp.ones(1)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="opt-1.3b", choices=sorted(PRESETS) + sorted(LLAMA_PRESETS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--workdir", default="/tmp/mmedit_convert_bench")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--runs", default=",".join(RUNS),
                        help="comma-separated subset of: " + ", ".join(RUNS))
    parser.add_argument("--child-build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-engine", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--out-dtype", choices=["float32", "bfloat16"], help="the convert run's stored dtype")
    args = parser.parse_args()
    if args.child_engine:
        return engine_child(*args.child_engine)

    ckpt, out = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "converted")
    if args.child_build:
        build_checkpoint(ckpt, args.preset, args.dtype)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    # Every step runs in its own process, the build too: a child forked from a big parent would start
    # with the parent's RSS in its ru_maxrss.
    build_argv = [sys.executable, os.path.abspath(__file__), "--child-build", "--preset", args.preset,
                  "--dtype", args.dtype, "--workdir", args.workdir]
    build_s, build_rss, _ = run_child(build_argv)
    size = sum(os.path.getsize(os.path.join(ckpt, n)) for n in os.listdir(ckpt) if n.endswith(".safetensors"))
    print(f"built {args.preset} ({args.dtype}) checkpoint: {size / 2**30:.2f} GiB in {build_s:.1f}s "
          f"(builder peak RSS {build_rss / 2**30:.2f} GiB)", flush=True)

    py = sys.executable
    engine_out = os.path.join(args.workdir, "engine_out")
    runs = {"baseline": [py, "-c", BASELINE],
            "engine": [py, os.path.abspath(__file__), "--child-engine", "save", ckpt, engine_out],
            "engine_restore": [py, os.path.abspath(__file__), "--child-engine", "restore", ckpt, engine_out],
            "engine_memory": [py, os.path.abspath(__file__), "--child-engine", "memory", ckpt, engine_out],
            "convert": [py, "-m", "mmedit_jax.convert", "--hf-dir", ckpt, "--out", out]
            + (["--dtype", args.out_dtype] if args.out_dtype else []),
            "hf_load": [py, "-c", LOAD, ckpt],
            "conv_load": [py, "-c", LOAD, out]}
    wanted = args.runs.split(",")
    runs = {k: v for k, v in runs.items() if k in wanted or k == "baseline"}
    results = {}
    for name, argv in runs.items():
        wall, peak, log = run_child(argv)
        results[name] = {"wall_s": round(wall, 2), "peak_rss_gib": round(peak / 2**30, 3),
                         "peak_over_ckpt": round(peak / size, 3)}
        print(f"  {name:<10} {wall:7.1f}s  peak {peak / 2**30:6.2f} GiB  ({peak / size:.2f}x)", flush=True)
        if name == "convert":
            print("   ", log.strip().splitlines()[-1], flush=True)
        if name == "engine_restore":
            shutil.rmtree(engine_out, ignore_errors=True)  # free the disk before the next run
    base = results["baseline"]["peak_rss_gib"] * 2**30
    for r in results.values():
        r["peak_minus_baseline_over_ckpt"] = round((r["peak_rss_gib"] * 2**30 - base) / size, 3)

    print()
    print(f"| step | wall (s) | peak RSS (GiB) | peak / ckpt ({size / 2**30:.2f} GiB) | (peak - baseline) / ckpt |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['wall_s']} | {r['peak_rss_gib']} | {r['peak_over_ckpt']} | "
              f"{r['peak_minus_baseline_over_ckpt']} |")
    report = {"runs_doc": {"baseline": "python + jax + orbax + mmedit_jax imported",
                           "engine": "engine with identity rules streamed into the part-wise Orbax save",
                           "engine_restore": "restore_params of that save (no model code)",
                           "engine_memory": "engine into a numpy tree, then to_device (no model code)",
                           "convert": "python -m mmedit_jax.convert (the model's rules + Orbax save)",
                           "hf_load": "from_pretrained(HF dir)", "conv_load": "from_pretrained(converted dir)"},
              "preset": args.preset, "dtype": args.dtype, "out_dtype": args.out_dtype, "checkpoint_bytes": size,
              "checkpoint_gib": round(size / 2**30, 3), "build_s": round(build_s, 1),
              "builder_peak_rss_gib": round(build_rss / 2**30, 3), "runs": results,
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
