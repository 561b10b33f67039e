"""The accelerator run: the bench on the built-in world and at real BLIP-2 shapes, E = 1 .. 128, one JSON, and a
roofline estimate of edits/s on an H100 and a TPU v5e beside every measured figure.

    PYTHONPATH=. python benchmarks/accelerator.py --out benchmarks/accelerator_h200.json   # on a lent GPU / TPU
    PYTHONPATH=. python benchmarks/accelerator.py --quick                                  # any machine (CI-sized)

Runs `python -m mmedit_jax.bench` in-process for each config (`CONFIGS`: the world's shipped MEND; the `mid` and
`blip2-opt-2.7b` presets with a fresh MEND, random weights) in `--dtype` (bfloat16 by default), the presets
timing only (`--no-quality`: random weights have no quality to report), and writes every bench result with the
device's name to one JSON.

The roofline: per timed batch size, a call's matmul FLOPs (`throughput.matmul_flops`, images included; every
scanned layer counted) over the chip's dense peak, and its bytes over the chip's memory bandwidth; the estimate is
E / max(the two). Bytes: XLA's `bytes accessed` of the compiled programs, which counts a scanned layer stack's
body once, so it is raised to at least the weights read once per call (model and editor, in their dtype). What
it leaves out: launch and host overheads, the attention and elementwise work outside matmuls, imperfect overlap;
an upper bound on speed, not a prediction. Costs are of the programs compiled for THIS backend (XLA fuses
differently on GPU), which is why the run on the accelerator itself is the figure to trust.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

CHIPS = {  # dense bf16 peak FLOP/s and memory bandwidth (bytes/s), from the vendors' datasheets
    "H100 SXM": (989e12, 3.35e12),
    "TPU v5e": (197e12, 819e9),
}
BATCHES = "1,2,4,8,16,32,64,128"
CONFIGS = {  # name -> bench arguments (the batch sizes, dtype and limits are added)
    "world": ["--editor", "mend"],
    "mid": ["--preset", "mid", "--editor", "mend", "--no-quality"],  # random weights: no quality to report
    "blip2-opt-2.7b": ["--preset", "blip2-opt-2.7b", "--editor", "mend", "--no-quality"],
}
QUICK = {"configs": ["world"], "batches": "2", "limit": 2, "repeats": 1}


def roofline(row: dict, weight_bytes: float, chip: str) -> dict:
    """Estimated edits/s of one bench throughput row on `chip`, and what bounds it (compute or memory)."""
    peak, bandwidth = CHIPS[chip]
    E = row["batch"]
    flops = row["gflop_per_edit"] * 1e9 * E
    xla_bytes = row.get("xla_mib_accessed_per_edit", float("nan")) * 2**20 * E
    nbytes = max(weight_bytes, xla_bytes if xla_bytes == xla_bytes else 0.0)  # NaN: no cost analysis
    t_compute, t_memory = flops / peak, nbytes / bandwidth
    return {"edits_per_s": E / max(t_compute, t_memory), "bound": "compute" if t_compute >= t_memory else "memory",
            "compute_ms": t_compute * 1e3, "memory_ms": t_memory * 1e3}


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind}"


def run_config(name: str, args) -> dict:
    """The bench's result dict for one config (its own output kept in the log, not on the screen)."""
    from mmedit_jax import bench

    argv = [*CONFIGS[name], "--batches", args.batches, "--repeats", str(args.repeats), "--dtype", args.dtype]
    if args.quick and "--no-quality" not in argv:
        argv.append("--no-quality")
    if args.limit:
        argv += ["--limit", str(args.limit)]
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        result = bench.main(argv)
    result["bench_argv"] = argv
    result["log"] = log.getvalue().splitlines()[-40:]
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return result


def weight_bytes(result: dict) -> float:
    return result["params"] * (2 if result["dtype"] == "bfloat16" else 4)


def report(results: dict, file=None) -> None:
    file = file or sys.stdout  # looked up per call (a test's captured stdout)
    chips = list(CHIPS)
    head = f"{'config':>15} {'E':>4} {'measured':>10} {'GFLOP/edit':>11} {'floor':>8}" + "".join(
        f" {c + ' est.':>14} {'bound':>7}" for c in chips)
    print(head, file=file)
    for name, res in results.items():
        for row in res["throughput"]:
            line = (f"{name:>15} {row['batch']:>4} {row['edits_per_s']:>10.2f} {row['gflop_per_edit']:>11.2f} "
                    f"{row.get('floor_gflop_per_edit') or float('nan'):>8.2f}")
            for c in chips:
                est = row["roofline"][c]
                line += f" {est['edits_per_s']:>14.1f} {est['bound']:>7}"
            print(line, file=file)
    print("measured: edits/s on this device (images encoded in the step); est.: the roofline bound on that chip "
          "(see the module docstring for what it leaves out)", file=file)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--batches", default=BATCHES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=128, help="cases read from the world's eval split")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--quick", action="store_true",
                    help=f"a minute-sized check that everything runs: {QUICK}")
    ap.add_argument("--out", help="JSON path (default: benchmarks/accelerator_<device>.json; --quick: none)")
    args = ap.parse_args(argv)
    if args.quick:
        args.configs, args.batches, args.limit, args.repeats = (",".join(QUICK["configs"]), QUICK["batches"],
                                                                QUICK["limit"], QUICK["repeats"])
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown} (choose from {', '.join(CONFIGS)})")
    device = device_name()
    print(f"device {device}; configs {names}; E = {args.batches}; {args.dtype}", flush=True)
    results = {}
    for name in names:
        res = run_config(name, args)
        for row in res["throughput"]:
            row["roofline"] = {c: roofline(row, weight_bytes(res), c) for c in CHIPS}
        results[name] = res
    report(results)
    out = {"device": device, "dtype": args.dtype, "chips": {c: {"flops": p, "bytes_per_s": b}
                                                            for c, (p, b) in CHIPS.items()},
           "quick": args.quick, "results": results}
    path = args.out or (None if args.quick else os.path.join(
        "benchmarks", f"accelerator_{device.split(':')[-1].replace(' ', '_').lower()}.json"))
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2, default=float)
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
