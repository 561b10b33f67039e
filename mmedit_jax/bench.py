"""The main job: edit quality and edit throughput of one editor, in one run.

    python -m mmedit_jax.bench --editor mend                  # the built-in world (shipped model and editors)
    python -m mmedit_jax.bench --editor ft-l --model DIR --data vqa_eval.json --image-root DIR [--editor-ckpt DIR]
    python -m mmedit_jax.bench --preset blip2-opt-2.7b --dtype bfloat16 --limit 4 --batches 1,2 --no-quality

Prints
  quality     the five metrics over the eval split (means x100, as the paper's table) and pre-edit base accuracy,
              and the whole split's end-to-end wall time (image features, the quality run, compiles included);
  throughput  per vmapped batch size E: compile time, steady edits/s (edit + five-metric scoring of E
              independent cases: the unedited model's locality predictions, then edit + five metrics, two
              compiled calls; pre-edit base accuracy is not part of it, as in the reference's step),
              with each distinct image of the batch encoded from its pixels inside the timed call (and, beside
              it, "features cached": the same step on precomputed features, timed in the same rounds),
              speed-up over one edit at a time (E = 1), p50/p90 call latency, matmul FLOPs per edit
              (`throughput.matmul_flops`: every layer of a scanned stack counted; XLA's cost analysis, which
              counts a scan body once, is in the JSON as `xla_gflop_per_edit`) and achieved GFLOP/s as a
              fraction of a matmul peak measured in the same run (in the model's dtype), the FLOP floor per
              edit (`eval/floor.py`: the least the procedure needs) and achieved / floor, XLA
              temporaries per edit and the size of one edit's patch;
  memory      peak host RSS, and peak device memory where the backend reports it.
`--json FILE` writes all of it, `--plot FILE` draws throughput against E and the metric bars, `--profile DIR`
writes a `jax.profiler` trace of one steady call at the largest E, `--device` picks cpu/gpu/tpu.
`--preset mid|blip2-opt-2.7b` runs a random-weight BLIP-2 at real sizes (`models/presets.py`) on the built-in
world's cases (images at the preset's size) with a fresh MEND / KE; `--dtype bfloat16` runs any model in bfloat16;
`--no-quality` times only.
Where the edits leave the language model's first k layers alone, the post-edit locality passes start from the
pre-edit hidden states at layer k (`eval.steps.prefix_layer`); `--no-prefix-cache` turns that off.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import jax
import numpy as np

from mmedit_jax import flags, pipeline
from mmedit_jax.case import METRICS, take
from mmedit_jax.eval import floor, harness, records, steps, throughput
from mmedit_jax.eval.records import HEADERS
from mmedit_jax.models import presets

COLUMNS = {  # name in the JSON -> header, format
    "batch": ("E", "{:d}"),
    "compile_s": ("compile s", "{:.2f}"),
    "edits_per_s": ("edits/s", "{:.2f}"),
    "cached_edits_per_s": ("features cached", "{:.2f}"),
    "speedup": ("x one-at-a-time", "{:.2f}"),
    "p50_ms": ("p50 ms", "{:.1f}"),
    "p90_ms": ("p90 ms", "{:.1f}"),
    "gflop_per_edit": ("GFLOP/edit", "{:.3f}"),
    "floor_gflop_per_edit": ("floor", "{:.3f}"),
    "x_floor": ("x floor", "{:.2f}"),
    "achieved_gflops": ("GFLOP/s", "{:.1f}"),
    "fraction_of_peak": ("of peak", "{:.1%}"),
    "temp_mib_per_edit": ("temp MiB/edit", "{:.2f}"),
    "patch_kib_per_edit": ("patch KiB/edit", "{:.1f}"),
}


def table(rows: list[dict], columns=COLUMNS) -> str:
    heads = [h for h, _ in columns.values()]
    cells = [[fmt.format(r[k]) if r.get(k) is not None else "-" for k, (_, fmt) in columns.items()] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib  # optional (the `plot` extra): imported only when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rows = result["throughput"]
    ax1.plot([r["batch"] for r in rows], [r["edits_per_s"] for r in rows], "o-")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("independent edits per compiled call (E)")
    ax1.set_ylabel("edits/s (edit + 5 metrics)")
    ax1.set_title(f"{result['editor']} throughput on {result['device']}")
    q = result["quality"]
    ax2.bar(range(len(METRICS)), [q[m] for m in METRICS])
    ax2.set_xticks(range(len(METRICS)), [HEADERS[m] for m in METRICS])
    ax2.set_ylim(0, 100)
    ax2.set_title("edit quality (eval split)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def say(msg: str, t0: float) -> None:
    """A progress line with the seconds since the start, flushed at once."""
    print(f"[{time.perf_counter() - t0:5.1f}s] {msg}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_editor(ap, default="mend")
    flags.add_data(ap, default_model="the built-in world")
    ap.set_defaults(task="vqa")
    flags.add_scoring(ap)
    ap.add_argument("--batches", default="1,8,32,64", help="vmapped batch sizes to time")
    ap.add_argument("--repeats", type=int, default=5,
                    help="steady calls per batch size (E = 1 gets 4x, unless 1 is asked for)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--plot", help="PNG: throughput against E, and the metric bars (needs the `plot` extra)")
    ap.add_argument("--profile", help="write a jax.profiler trace of one steady call here")
    ap.add_argument("--device", choices=("cpu", "gpu", "tpu"), help="JAX platform (default: JAX's choice)")
    flags.add_world(ap)
    ap.add_argument("--out", help="also write the quality run's per-case rows, summary and bench.json here (a run "
                    "directory for `python -m mmedit_jax.report`)")
    ap.add_argument("--preset", choices=sorted(presets.PRESETS),
                    help="a random-weight BLIP-2 at real sizes (models/presets.py) on the built-in world's cases "
                         "(its images at the preset's size); MEND / KE: freshly initialised unless --editor-ckpt")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the model's parameters and compute dtype")
    ap.add_argument("--no-quality", action="store_true",
                    help="time only: no quality run over the split (nor its end-to-end wall time)")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="run the post-edit locality passes from the embeddings, not from the pre-edit hidden "
                         "states below the first edited layer")
    args = ap.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # say so now, not after the whole run
        ap.error("--plot needs matplotlib: pip install -e '.[plot]' (or drop --plot)")
    if args.model and not (args.data and args.image_root):
        ap.error("--model needs --data and --image-root")
    if args.no_quality and (args.out or args.plot):
        ap.error("--out and --plot show the quality run: drop --no-quality")
    if args.preset and args.model:
        ap.error("--preset builds its own random model: drop --model")
    if args.family != "blip2" and (args.model or args.preset):
        ap.error("--family picks the built-in world's model: drop it with --model or --preset")
    if args.device:
        jax.config.update("jax_platforms", args.device)
    batches = [int(b) for b in args.batches.split(",")]

    t_start = time.perf_counter()
    if args.model:
        model_dir, tok_dir, data, image_root, rephrase_root = (args.model, args.model, args.data, args.image_root,
                                                               args.rephrase_image_root)
        ckpt = args.editor_ckpt
    else:
        say("built-in world: generating its data on first use", t_start)
        model_dir, tok_dir, data, image_root, shipped = pipeline.world_inputs(args.task, args.cache_dir,
                                                                               args.family)
        rephrase_root, ckpt = image_root, args.editor_ckpt or shipped.get(args.editor)
    if args.preset:
        say(f"preset {args.preset}: random weights in {args.dtype}", t_start)
        model, tok = pipeline.preset_model(args.preset, tok_dir, args.dtype)
        ckpt = args.editor_ckpt
    else:
        say(f"loading the model from {model_dir}", t_start)
        model, tok = pipeline.load_model(model_dir, tok_dir, image_size=args.image_size, dtype=args.dtype)
    hparams = pipeline.read_hparams(args.config)
    exact_match = pipeline.exact_match_of(hparams, args.token_accuracy)
    loaded = pipeline.load_split(data, args.task, image_root, rephrase_root, limit=args.limit,
                                 log=lambda m: say(m, t_start))
    say(f"tokenizing {len(loaded.records)} cases, loading their images", t_start)
    prepared = pipeline.prepare_data(loaded.records, tok, model, args.task, args.pad_multiple)
    bank = args.ike_bank or (None if args.model else pipeline.world_train_data(args.task, args.cache_dir))
    t_split = time.perf_counter()  # the whole split end to end: image features, then the quality run
    if args.preset and ckpt is None and args.editor in ("mend", "ke"):
        say(f"a fresh {args.editor.upper()} (no checkpoint) over the last 3 layers' fc1/fc2", t_start)
        editor, cases = pipeline.fresh_editor(args.editor, model, prepared, hparams)
    else:
        editor = pipeline.build_editor(args.editor, model, hparams, ckpt, tok=tok, task=args.task, bank_data=bank,
                                       image_root=image_root, sentence_encoder=args.sentence_encoder,
                                       log=lambda m: say(m, t_start))
        say(f"{editor.name}: encoding the split's images", t_start)
        cases = pipeline.editor_cases(editor, model.params, prepared)
    prefix = None if args.no_prefix_cache else steps.prefix_layer(editor, model.params, take(cases, 0))
    say(f"frozen-prefix cache: {'off' if prefix is None else f'from language-model layer {prefix}'}", t_start)
    timed_fns = steps.make_step_fns(editor, exact_match, base_accuracy=False, prefix_layer=prefix)

    # Quality: the whole eval split at the largest batch size that the split fills.
    n = len(prepared.meta)
    q = pre_edit = split_s = None
    if not args.no_quality:
        quality_batch = max([b for b in batches if b <= n] or [1])
        say(f"quality: editing and scoring {n} cases, {quality_batch} per compiled call (the first call compiles)",
            t_start)
        quality = harness.run(editor, model.params, cases, prepared.meta, args.out, batch_size=quality_batch,
                              exact_match=exact_match, resume=False, progress=True,
                              prefix_cache=not args.no_prefix_cache,
                              decode=pipeline.decoder(tok) if args.out else None).summary  # answers for the report
        split_s = time.perf_counter() - t_split
        q = {m: quality[m] for m in METRICS}
        pre_edit = {k[4:]: quality[k] for k in quality if k.startswith("pre_")}
        print(f"\n{editor.name} on {os.path.basename(data)} ({n} cases, "
              f"{'exact match' if exact_match else 'token accuracy'}), {jax.devices()[0].device_kind}")
        print("  ".join(f"{HEADERS[m]}={q[m]:.1f}" for m in METRICS))
        print("pre-edit base accuracy: " + ", ".join(f"{k}={v:.1f}" for k, v in pre_edit.items()), flush=True)
        print(f"the whole split end to end (image features, editing, five metrics and pre-edit accuracies; "
              f"compiles included): {split_s:.1f} s, {n / split_s:.2f} edits/s\n", flush=True)

    # Throughput. The matmul peak is measured between the timed batch sizes too and the best kept: one reading on
    # a machine that is busy at that moment would understate the ceiling.
    peak_dtype = jax.numpy.dtype(args.dtype)
    peaks = [throughput.matmul_peak_gflops(dtype=peak_dtype)]
    rows = []
    for b in batches:
        reps = args.repeats * (4 if b == 1 and args.repeats > 1 else 1)
        say(f"throughput: E={b} (compiling, then {reps} timed calls)", t_start)
        idx = np.minimum(np.arange(b), n - 1)  # the cases the step times (the last repeated past the split)
        images = throughput.BatchImages.of(prepared.batch, prepared.pixels, idx)
        timing = throughput.time_edit_step(editor, model.params, cases, b, reps, exact_match, timed_fns, images)
        rows.append(timing.as_dict())
        least = floor.flop_floor(editor, model.params, take(cases, idx), prefix, timing.images, timing.image_flops)
        if least is not None:
            rows[-1].update(least.as_dict(), x_floor=rows[-1]["gflop_per_edit"] / least.as_dict()[
                "floor_gflop_per_edit"])
        say(f"  E={b}: {rows[-1]['edits_per_s']:.2f} edits/s, {rows[-1]['cached_edits_per_s']:.2f} with features "
            f"cached (compile {rows[-1]['compile_s']:.1f}s)", t_start)
        peaks.append(throughput.matmul_peak_gflops(dtype=peak_dtype))
    peak = max(peaks)
    for r in rows:
        r["fraction_of_peak"] = r["achieved_gflops"] / peak
    one = next((r for r in rows if r["batch"] == 1), rows[0])
    for r in rows:
        r["speedup"] = r["edits_per_s"] / one["edits_per_s"]
    if args.profile:
        with jax.profiler.trace(args.profile):
            throughput.time_edit_step(editor, model.params, cases, max(batches), 1, exact_match, timed_fns)
        say(f"wrote a profiler trace to {args.profile}", t_start)

    result = dict(
        editor=editor.name, task=args.task, device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
        data=data, num_cases=n, exact_match=exact_match, prefix_layer=prefix,
        preset=args.preset, dtype=args.dtype, params=sum(int(x.size) for x in jax.tree.leaves(model.params)),
        split_wall_s=split_s, split_edits_per_s=None if split_s is None else n / split_s,
        quality=q, pre_edit=pre_edit, throughput=rows, matmul_peak_gflops=peak, matmul_peak_readings=peaks,
        one_edit_p50_ms=one["p50_ms"], one_edit_p90_ms=one["p90_ms"],
        peak_host_mib=throughput.peak_host_mib(), peak_device_mib=throughput.peak_device_mib(),
        wall_s=time.perf_counter() - t_start, jax=jax.__version__,
        command="python -m mmedit_jax.bench " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    print(f"\nthroughput ({args.dtype} matmul peak: {peak:.0f} GFLOP/s, best of {len(peaks)} readings taken between "
          f"the timed batch sizes: {min(peaks):.0f}-{peak:.0f})")
    print(table(rows))
    print("edits/s counts encoding each distinct image of the batch (pixels in); 'features cached' is the same "
          "step on precomputed features. GFLOP/edit: matmuls of both, images included; floor: the least the "
          "procedure needs (eval/floor.py)")
    if any(r["fraction_of_peak"] > 1 for r in rows):
        print("note: a fraction above 100% means the machine was busier while the peak was measured than during "
              "that batch size; rerun on an idle machine for a fair figure")
    print(f"\none edit at a time: p50 {one['p50_ms']:.1f} ms, p90 {one['p90_ms']:.1f} ms per call; "
          f"peak host RSS {result['peak_host_mib']:.0f} MiB"
          + (f", peak device {result['peak_device_mib']:.0f} MiB" if result["peak_device_mib"] else "")
          + f"; total {result['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=float)
        print(f"wrote {args.json}")
    if args.out:  # the run directory holds everything `python -m mmedit_jax.report` shows
        records.write_json(args.out, "bench.json", result)
        records.write_json(args.out, "summary.json", dict(
            quality, edits_per_s=max(r["edits_per_s"] for r in rows), model_path=os.path.abspath(model_dir),
            data_path=os.path.abspath(data), data=pipeline.load_report(loaded, prepared)))
        print(f"wrote {args.out}/bench.json and the per-case rows (python -m mmedit_jax.report {args.out})")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
