"""The frozen-prefix cache and its stacked inputs, timed side by side in one process.

    python benchmarks/prefix_cache.py --editor mend --batches 64 --repeats 10 [--json FILE]
    python benchmarks/prefix_cache.py --preset mid --limit 8 --batches 1,2 --repeats 5 --paths one,stacked

Paths (`--paths`, all by default), each the bench's timed programs (`steps.make_step_fns(...,
base_accuracy=False)`: the unedited model's locality predictions, then edit + five metrics):
  plain     no cache: every pass runs the whole language model;
  one       the cache, each input's unedited layers run as its own forward (`Blip2Fns(stack_inputs=False)`);
  stacked   the cache, a case's inputs that show an image run their unedited layers as one padded batch
            (`Blip2Fns.prefix_group`), the text-only one apart: what the bench and the harness run.
Each path is compiled apart, then the paths are timed in alternating rounds (steady calls,
`jax.block_until_ready`, features cached: image encoding is the same work on every path), so a noisy machine
affects all alike; medians are reported. Also checks that all paths give the same metrics on the timed batch,
and reports FLOPs per edit of each: XLA's cost analysis (which counts a `lax.scan` body once, not once per
layer, so it undercounts scanned layer stacks) and the matmul FLOPs of the jaxpr with scan bodies counted
`length` times.

The built-in world runs its shipped editor; `--preset mid|blip2-opt-2.7b` a random-weight BLIP-2 at real sizes
on the world's first `--limit` cases with a fresh MEND / KE over the last two layers' fc1/fc2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from mmedit_jax.eval.throughput import matmul_flops, xla_cost

PATHS = ("plain", "one", "stacked")


def load(args):
    """`(editor, params, host cases)` of the world or a preset."""
    from mmedit_jax import pipeline
    from mmedit_jax.data.mmedit import load_mmedit

    model_dir, tokenizer_dir, eval_json, image_root, ckpts = pipeline.world_inputs("vqa")
    if args.preset:
        model, tok = pipeline.preset_model(args.preset, tokenizer_dir)
    else:
        model, tok = pipeline.load_model(model_dir, tokenizer_dir)
    records = load_mmedit(eval_json, "vqa", image_root, image_root, size=args.limit).records
    prepared = pipeline.prepare_data(records, tok, model, "vqa", pad_multiple=1)
    if args.preset:
        editor, cases = pipeline.fresh_editor(args.editor, model, prepared, layers=2)
    else:
        editor = pipeline.build_editor(args.editor, model, {}, ckpts.get(args.editor))
        cases = pipeline.cases_for(editor.fns, model.params, prepared)
    return editor, model, cases


def time_paths(editor, model, cases, batch: int, names, repeats: int) -> dict:
    import jax
    import numpy as np

    from mmedit_jax.case import METRICS, num_cases, pad_batch, take
    from mmedit_jax.eval import steps

    k = steps.prefix_layer(editor, model.params, take(cases, 0))
    one_by_one = dataclasses.replace(editor, fns=dataclasses.replace(editor.fns, stack_inputs=False))
    build = {"plain": lambda: steps.make_step_fns(editor, True, base_accuracy=False),
             "one": lambda: steps.make_step_fns(one_by_one, True, base_accuracy=False, prefix_layer=k),
             "stacked": lambda: steps.make_step_fns(editor, True, base_accuracy=False, prefix_layer=k)}
    paths = {name: build[name]() for name in names}
    host = pad_batch(take(cases, np.arange(min(batch, num_cases(cases)))), batch)
    batch_dev = jax.device_put(host)

    def call(name):
        pre_fn, edit_fn = paths[name]
        pre = pre_fn(model.params, batch_dev)
        return jax.block_until_ready(edit_fn(editor.editor_params, model.params, batch_dev, pre))

    result, outs = {}, {}
    for name in paths:
        t0 = time.perf_counter()
        outs[name] = jax.device_get(call(name))
        result[name] = {"first_call_s": time.perf_counter() - t0, "times_s": []}
    for _ in range(repeats):
        for name in paths:
            t0 = time.perf_counter()
            call(name)
            result[name]["times_s"].append(time.perf_counter() - t0)
    for name, (pre_fn, edit_fn) in paths.items():
        pre_shape = jax.eval_shape(pre_fn, model.params, batch_dev)
        flops = (xla_cost(edit_fn.lower(editor.editor_params, model.params, batch_dev, pre_shape).compile())[0]
                 + xla_cost(pre_fn.lower(model.params, batch_dev).compile())[0])
        jaxpr_flops = (matmul_flops(jax.make_jaxpr(edit_fn)(editor.editor_params, model.params, batch_dev, pre_shape))
                       + matmul_flops(jax.make_jaxpr(pre_fn)(model.params, batch_dev)))
        r = result[name]
        med = statistics.median(r["times_s"])
        r.update(median_ms=1e3 * med, edits_per_s=batch / med, xla_gflop_per_edit=flops / 1e9 / batch,
                 matmul_gflop_per_edit=jaxpr_flops / 1e9 / batch,
                 achieved_gflops=jaxpr_flops / 1e9 / med)
    first = outs[names[0]]
    agree = {name: all(np.array_equal(first[m], outs[name][m]) for m in METRICS) for name in names}
    return dict(batch=batch, prefix_layer=k, metrics_identical=agree, paths=result)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default="mend", choices=("ft-l", "mend", "ke"))
    ap.add_argument("--preset", choices=("mid", "blip2-opt-2.7b"), help="a random-weight BLIP-2 at real sizes")
    ap.add_argument("--limit", type=int, help="the world's first N eval cases (default: all 128)")
    ap.add_argument("--batches", default="64", help="comma-separated batch sizes E")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {PATHS}")
    ap.add_argument("--repeats", type=int, default=10, help="alternating rounds of one steady call per path")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    names = [p for p in args.paths.split(",") if p]
    if not names or set(names) - set(PATHS):
        ap.error(f"--paths: choose from {PATHS}")
    if args.preset and args.editor == "ft-l":
        ap.error("--preset runs a fresh MEND or KE")

    import jax

    editor, model, cases = load(args)
    runs = []
    for batch in [int(b) for b in args.batches.split(",")]:
        run = time_paths(editor, model, cases, batch, names, args.repeats)
        runs.append(run)
        print(f"{args.editor}, E={batch}, first edited layer {run['prefix_layer']}, {args.repeats} alternating "
              f"rounds, {jax.devices()[0].device_kind}; metrics identical to {names[0]}: {run['metrics_identical']}")
        for name, r in run["paths"].items():
            print(f"  {name:>8}: {r['edits_per_s']:8.3f} edits/s (median {r['median_ms']:.1f} ms/call, rounds "
                  f"{min(r['times_s']):.3g}-{max(r['times_s']):.3g} s), jaxpr matmuls {r['matmul_gflop_per_edit']:.4g}"
                  f" GFLOP/edit at {r['achieved_gflops']:.1f} GFLOP/s, XLA {r['xla_gflop_per_edit']:.4g} GFLOP/edit")
        base = run["paths"][names[0]]
        for name in names[1:]:
            print(f"  {name} / {names[0]}: edits/s {run['paths'][name]['edits_per_s'] / base['edits_per_s']:.3f}x")
    out = dict(editor=args.editor, preset=args.preset, limit=args.limit, repeats=args.repeats,
               device=str(jax.devices()[0].device_kind), runs=runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
