"""The main job: edit quality and edit throughput of one editor, in one run.

    python -m mmedit_jax.bench --editor mend                  # the built-in world (shipped model and editors)
    python -m mmedit_jax.bench --editor ft-l --model DIR --data vqa_eval.json --image-root DIR [--editor-ckpt DIR]

Prints
  quality     the five metrics over the eval split (means x100, as the paper's table) and pre-edit base accuracy;
  throughput  per vmapped batch size E: compile time, steady edits/s (edit + five-metric scoring of E
              independent cases: the unedited model's locality predictions, then edit + five metrics, two
              compiled calls; pre-edit base accuracy is not part of it, as in the reference's step),
              speed-up over one edit at a time (E = 1), p50/p90 call latency, matmul FLOPs per edit
              (`throughput.matmul_flops`: every layer of a scanned stack counted; XLA's cost analysis, which
              counts a scan body once, is in the JSON as `xla_gflop_per_edit`) and achieved GFLOP/s as a
              fraction of a float32 matmul peak measured in the same run, XLA
              temporaries per edit and the size of one edit's patch;
  memory      peak host RSS, and peak device memory where the backend reports it.
`--json FILE` writes all of it, `--plot FILE` draws throughput against E and the metric bars, `--profile DIR`
writes a `jax.profiler` trace of one steady call at the largest E, `--device` picks cpu/gpu/tpu.
Where the edits leave the language model's first k layers alone, the post-edit locality passes start from the
pre-edit hidden states at layer k (`harness.prefix_layer`); `--no-prefix-cache` turns that off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

COLUMNS = {  # name in the JSON -> header, format
    "batch": ("E", "{:d}"),
    "compile_s": ("compile s", "{:.2f}"),
    "edits_per_s": ("edits/s", "{:.1f}"),
    "speedup": ("x one-at-a-time", "{:.2f}"),
    "p50_ms": ("p50 ms", "{:.1f}"),
    "p90_ms": ("p90 ms", "{:.1f}"),
    "gflop_per_edit": ("GFLOP/edit", "{:.3f}"),
    "achieved_gflops": ("GFLOP/s", "{:.1f}"),
    "fraction_of_peak": ("of peak", "{:.1%}"),
    "temp_mib_per_edit": ("temp MiB/edit", "{:.2f}"),
    "patch_kib_per_edit": ("patch KiB/edit", "{:.1f}"),
}


def table(rows: list[dict], columns=COLUMNS) -> str:
    heads = [h for h, _ in columns.values()]
    cells = [[fmt.format(r[k]) for k, (_, fmt) in columns.items()] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def resolve_inputs(args):
    """(model dir, tokenizer dir, data file, image root, rephrase root, editor ckpt) from flags or the world."""
    if args.model:
        if not (args.data and args.image_root):
            raise SystemExit("--model needs --data and --image-root")
        return args.model, args.model, args.data, args.image_root, args.rephrase_image_root, args.editor_ckpt
    from mmedit_jax.world import assets

    w = assets.ensure(args.task, cache_dir=args.cache_dir)
    ckpt = args.editor_ckpt or w.editor_ckpts.get(args.editor)
    return w.model_dir, w.tokenizer_dir, w.eval_json, w.image_root, w.image_root, ckpt


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmedit_jax.eval.scoring import METRICS

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rows = result["throughput"]
    ax1.plot([r["batch"] for r in rows], [r["edits_per_s"] for r in rows], "o-")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("independent edits per compiled call (E)")
    ax1.set_ylabel("edits/s (edit + 5 metrics)")
    ax1.set_title(f"{result['editor']} throughput on {result['device']}")
    q = result["quality"]
    ax2.bar(range(len(METRICS)), [q[m] for m in METRICS])
    ax2.set_xticks(range(len(METRICS)), ["Rel.", "T-Gen.", "M-Gen.", "T-Loc.", "M-Loc."])
    ax2.set_ylim(0, 100)
    ax2.set_title("edit quality (eval split)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default="mend", choices=("ft-l", "ft-v", "mend", "ke"))
    ap.add_argument("--task", default="vqa", choices=("vqa", "caption"))
    ap.add_argument("--model", help="converted or Hugging Face BLIP-2 directory (default: the built-in world)")
    ap.add_argument("--data", help="MMEdit eval JSON")
    ap.add_argument("--image-root")
    ap.add_argument("--rephrase-image-root")
    ap.add_argument("--editor-ckpt", help="trained MEND/KE editor directory")
    ap.add_argument("--config", help="editor hparams YAML (EasyEdit keys)")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--batches", default="1,4,16,64", help="vmapped batch sizes to time")
    ap.add_argument("--repeats", type=int, default=5, help="steady calls per batch size (E = 1 gets 4x)")
    ap.add_argument("--limit", type=int, help="score only the first N eval records")
    ap.add_argument("--token-accuracy", action="store_true", help="token accuracy instead of exact match")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--plot", help="PNG: throughput against E, and the metric bars")
    ap.add_argument("--profile", help="write a jax.profiler trace of one steady call here")
    ap.add_argument("--device", choices=("cpu", "gpu", "tpu"), help="JAX platform (default: JAX's choice)")
    ap.add_argument("--cache-dir", help="where the built-in world's files are generated")
    ap.add_argument("--out", help="also write the per-case JSONL of the quality run here")
    ap.add_argument("--pad-multiple", type=int, default=1,
                    help="pad each input to the split's longest, rounded up to a multiple of this (8 or 16 may suit "
                         "GPU/TPU kernels better; 1 computes no pad rows beyond the longest)")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="run the post-edit locality passes from the embeddings, not from the pre-edit hidden "
                         "states below the first edited layer")
    args = ap.parse_args(argv)

    import jax

    if args.device:
        jax.config.update("jax_platforms", args.device)
    from transformers import AutoTokenizer

    from mmedit_jax import evaluate as E
    from mmedit_jax.data.mmedit import load_mmedit
    from mmedit_jax.eval import harness, throughput
    from mmedit_jax.eval.model_fns import Blip2Fns
    from mmedit_jax.eval.scoring import METRICS
    from mmedit_jax.loading import from_pretrained

    t_start = time.perf_counter()
    model_dir, tok_dir, data, image_root, rephrase_root, ckpt = resolve_inputs(args)
    model = from_pretrained(model_dir, image_size=args.image_size)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    hparams = {}
    if args.config:
        from mmedit_jax.editors.hparams import load_hparams

        hparams = load_hparams(args.config)
    exact_match = not args.token_accuracy and hparams.get("exact_match", True)
    loaded = load_mmedit(data, args.task, image_root, rephrase_root, size=args.limit)
    print(f"{data}: {loaded.summary()}")
    if not loaded.records:
        raise SystemExit("no usable records")
    editor = E.build_editor(args.editor, model, hparams, ckpt)
    prepared = E.prepare_data(loaded.records, tok, model, args.task, model.config.vision.image_size,
                              args.pad_multiple)
    fns = Blip2Fns(model.module, pixels=editor.vision_side)
    cases = harness.make_cases(prepared.batch, E.image_table(editor, model, prepared.pixels))
    batches = [int(b) for b in args.batches.split(",")]
    prefix = None if args.no_prefix_cache else harness.prefix_layer(editor, fns, model.params,
                                                                    harness._take(cases, 0))
    print(f"frozen-prefix cache: {'off' if prefix is None else f'from language-model layer {prefix}'}")
    timed_fns = harness.make_step_fns(editor, fns, exact_match, base_accuracy=False, prefix_layer=prefix)

    # Quality: the whole eval split at the largest batch size that the split fills.
    n = len(prepared.meta)
    quality_batch = max([b for b in batches if b <= n] or [1])
    quality = harness.run(editor, fns, model.params, cases, prepared.meta, args.out, batch_size=quality_batch,
                          exact_match=exact_match, resume=False, progress=False,
                          prefix_cache=not args.no_prefix_cache).summary

    # Throughput.
    peak = throughput.matmul_peak_gflops()
    rows = []
    for b in batches:
        reps = args.repeats * (4 if b == 1 else 1)
        r = throughput.time_edit_step(editor, fns, model.params, cases, b, reps, exact_match, timed_fns).as_dict()
        r["fraction_of_peak"] = r["achieved_gflops"] / peak
        rows.append(r)
        print(f"  E={b}: {r['edits_per_s']:.1f} edits/s (compile {r['compile_s']:.1f}s)", flush=True)
    one = next((r for r in rows if r["batch"] == 1), rows[0])
    for r in rows:
        r["speedup"] = r["edits_per_s"] / one["edits_per_s"]
    if args.profile:
        big = max(batches)
        with jax.profiler.trace(args.profile):
            throughput.time_edit_step(editor, fns, model.params, cases, big, 1, exact_match, timed_fns)
        print(f"wrote a profiler trace to {args.profile}")

    result = dict(
        editor=editor.name, task=args.task, device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
        data=data, num_cases=quality["num_cases"], exact_match=exact_match, prefix_layer=prefix,
        quality={m: quality[m] for m in METRICS},
        pre_edit={k[4:]: quality[k] for k in quality if k.startswith("pre_")},
        throughput=rows, matmul_peak_gflops=peak, one_edit_p50_ms=one["p50_ms"], one_edit_p90_ms=one["p90_ms"],
        peak_host_mib=throughput.peak_host_mib(), peak_device_mib=throughput.peak_device_mib(),
        wall_s=time.perf_counter() - t_start, jax=jax.__version__,
    )
    q = result["quality"]
    print(f"\n{editor.name} on {os.path.basename(data)} ({result['num_cases']} cases, "
          f"{'exact match' if exact_match else 'token accuracy'}), {result['device']}")
    print("  ".join(f"{h}={q[m]:.1f}" for h, m in zip(("Rel.", "T-Gen.", "M-Gen.", "T-Loc.", "M-Loc."), METRICS)))
    print("pre-edit base accuracy: " + ", ".join(f"{k}={v:.1f}" for k, v in result["pre_edit"].items()))
    print(f"\nthroughput (float32 matmul peak measured now: {peak:.0f} GFLOP/s)")
    print(table(rows))
    print(f"\none edit at a time: p50 {one['p50_ms']:.1f} ms, p90 {one['p90_ms']:.1f} ms per call; "
          f"peak host RSS {result['peak_host_mib']:.0f} MiB"
          + (f", peak device {result['peak_device_mib']:.0f} MiB" if result["peak_device_mib"] else "")
          + f"; total {result['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=float)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
