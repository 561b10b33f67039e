"""Edit + score throughput of the harness: vmapped batches of independent edits against one edit at a time.

For an editor (FT-L by default) on synthetic MMEdit files and a random BLIP-2 (`--size demo` is the
`evaluate --demo` model; `--size small` is wider and deeper), measures per batch size E:
  compile_s      first call of the two jitted programs (pre-edit outputs, edit + five metrics) minus a steady call
  edits_per_s    steady state, E cases per call, median over `--repeats` calls (`jax.block_until_ready`)
  temp_mib/edit  XLA's temporary buffers of the compiled edit program, per edit (memory_analysis)
  patch_kib/edit the edit's patch (what a stored edit costs)
  gflop/edit     XLA cost analysis of the edit program, per edit; achieved GFLOP/s beside it
E = 1 is "one edit at a time" (the same compiled program called per case). Then the feature cache: the
whole run's evaluation with image features computed once per distinct image versus recomputed in every
forward (`--no-feature-cache` of the CLI).

  python benchmarks/edit_throughput.py --json benchmarks/edit_throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time


def setup(size: str, n_records: int, workdir: str, seed: int = 0):
    import jax

    from mmedit_jax import pipeline
    from mmedit_jax.data.mmedit import load_mmedit
    from mmedit_jax.demo import demo_setup
    from mmedit_jax.models.blip2 import Blip2Model

    paths, tok, model = demo_setup(workdir, n_records, seed)
    if size == "small":
        c = model.config
        cfg = dataclasses.replace(
            c,
            vision=dataclasses.replace(c.vision, hidden_size=128, intermediate_size=512, num_hidden_layers=4),
            qformer=dataclasses.replace(c.qformer, hidden_size=128, intermediate_size=512, encoder_hidden_size=128),
            text=dataclasses.replace(c.text, hidden_size=256, ffn_dim=1024, num_hidden_layers=8, num_attention_heads=8),
        )
        model = Blip2Model.init(cfg, jax.random.PRNGKey(seed))
    records = load_mmedit(paths.json_path, "vqa", paths.image_root).records
    prepared = pipeline.prepare_data(records, tok, model, "vqa")
    return model, prepared


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default="ft-l", choices=("ft-l", "ft-v"))
    ap.add_argument("--size", default="demo", choices=("demo", "small"))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import jax

    from mmedit_jax import pipeline
    from mmedit_jax.case import make_cases
    from mmedit_jax.eval.throughput import matmul_peak_gflops, time_edit_step

    with tempfile.TemporaryDirectory() as workdir:
        model, prepared = setup(args.size, args.records, workdir)
    rows = []
    for cache in (True, False):
        editor = pipeline.build_editor(args.editor, model, {}, feature_cache=cache)
        t0 = time.perf_counter()
        table = editor.fns.image_table(model.params, prepared.pixels)
        table_s = time.perf_counter() - t0
        cases = make_cases(prepared.batch, table)
        batches = [int(b) for b in args.batches.split(",")] if cache else [max(int(b) for b in args.batches.split(","))]
        for b in batches:
            r = time_edit_step(editor, model.params, cases, b, args.repeats).as_dict()
            r.update(feature_cache=cache, image_table_s=table_s)
            rows.append(r)
            print(f"E={b:3d} cache={cache!s:5}  {r['edits_per_s']:8.1f} edits/s  compile {r['compile_s']:.1f}s  "
                  f"temp {r['temp_mib_per_edit']:.2f} MiB/edit  patch {r['patch_kib_per_edit']:.0f} KiB/edit",
                  flush=True)
    one = next(r for r in rows if r["batch"] == 1 and r["feature_cache"])
    for r in rows:
        r["speedup_vs_one_at_a_time"] = r["edits_per_s"] / one["edits_per_s"]
    peak = matmul_peak_gflops()
    for r in rows:
        r["fraction_of_matmul_peak"] = r["achieved_gflops"] / peak
    print(f"float32 matmul peak measured in this run: {peak:.1f} GFLOP/s")
    cols = ["batch", "feature_cache", "compile_s", "median_ms", "p90_ms", "edits_per_s", "speedup_vs_one_at_a_time",
            "temp_mib_per_edit", "patch_kib_per_edit", "gflop_per_edit", "achieved_gflops", "fraction_of_matmul_peak"]
    print("  ".join(f"{c:>14.14}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>14.4g}" if isinstance(r[c], float) else f"{r[c]!s:>14}" for c in cols))
    if args.json:
        env = dict(matmul_peak_gflops=peak, jax=jax.__version__, device=str(jax.devices()[0]), cpus=os.cpu_count(),
                   editor=args.editor,
                   size=args.size, config=model.config.to_dict(), records=args.records)
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
