"""Meta-training throughput of MEND and KE: one jitted train step over E vmapped edits.

On the `evaluate --demo` tiny random BLIP-2 (text: 4 layers, width 64, FFN 256) and synthetic E-VQA cases,
editing fc1/fc2 of the last three layers, for each editor and batch size E it measures
  compile_s      the first call (trace + compile + run) minus a steady call
  steps_per_s    steady state, median over `--repeats` timed blocks of `--steps` steps (block_until_ready)
  edits_per_s    steps_per_s * E
  gflop/step     XLA's cost analysis of the compiled step; achieved GFLOP/s beside it
Editor sizes: MEND rank 1920 (min(rank, width) = 320 here), KE at the EFK sizes (LSTM 512, condition 768,
head 512), so KE's parameter count dominates its step.

  python benchmarks/train_throughput.py --json benchmarks/train_throughput_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--editors", default="mend,ke")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from mmedit_jax import demo, pipeline
    from mmedit_jax import training as T
    from mmedit_jax.case import take
    from mmedit_jax.train import demo_sites

    with tempfile.TemporaryDirectory() as d:
        tok, model, records, _ = demo.demo_world(d, 32, 8, 0)
        prepared = pipeline.prepare_data(records, tok, model, "vqa")
    sites = demo_sites(model)
    rows = []
    for kind in args.editors.split(","):
        for e in (int(x) for x in args.batch_sizes.split(",")):
            cfg = T.TrainConfig(alg=kind.upper(), inner_params=sites, batch_size=e, accumulate_bs=1, lr=1e-4)
            tr = T.build_trainable(kind, model, {}, cfg)
            cases = pipeline.cases_for(tr.fns, model.params, prepared)
            tx, step = T.step_program(tr, cfg)
            ts = T.init_train_state(tr, tx, 0, cfg)
            w = jnp.ones(e, bool)
            batches = [jax.device_put(take(cases, T.batch_indices(0, s, e, len(records))))
                       for s in range(args.steps + 1)]
            t0 = time.perf_counter()
            ts, m = step(ts, model.params, batches[0], w)
            jax.block_until_ready(m)
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for b in batches[1:]:
                    ts, m = step(ts, model.params, b, w)
                jax.block_until_ready((ts, m))
                times.append((time.perf_counter() - t0) / args.steps)
            per_step = statistics.median(times)
            cost = step.lower(ts, model.params, batches[0], w).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
            row = {"editor": kind, "E": e, "compile_s": round(first - per_step, 2),
                   "steps_per_s": round(1 / per_step, 2), "edits_per_s": round(e / per_step, 1),
                   "gflop_per_step": round(flops / 1e9, 3), "achieved_gflop_s": round(flops / 1e9 / per_step, 2),
                   "editor_params": int(sum(x.size for x in jax.tree.leaves(ts["params"])))}
            print(row, flush=True)
            rows.append(row)
    out = {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "model": "evaluate --demo tiny BLIP-2",
           "sites": list(sites), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
