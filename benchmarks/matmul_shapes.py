"""float32 matmul speed by shape on this host, JAX (XLA CPU) and PyTorch side by side: how fast a step can run when
its matmuls have the rows one edit (E = 1) or a batch of edits gives them.

    python benchmarks/matmul_shapes.py --json benchmarks/matmul_shapes.json
    python benchmarks/matmul_shapes.py --shapes 45x2560x10240,90x2560x10240 --threads 2

Each shape `MxKxN` is one `[M, K] @ [K, N]` product; every (shape, library) is timed interleaved in rounds (a
round calls each one enough times to last about --min-s), median over rounds, both libraries on the same thread
count (torch.set_num_threads; XLA's intra-op threads set by flags before JAX starts). The default shapes are the
built-in world's language model (width 128, FFN 512, 4 heads of 32) at the row counts of one edit's input (~50),
of IKE's input with its context (~190), and of E = 8 and 32 edits' inputs; and OPT-2.7B's FFN (`2560 x 10240`) at
one and two edits' rows (45, 90) and at 1024.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

WORLD_M = (16, 50, 190, 400, 1520, 6080)
DEFAULT_SHAPES = ([f"{m}x128x512" for m in WORLD_M] + [f"{m}x512x128" for m in WORLD_M]
                  + [f"{m}x32x{m}" for m in (50, 190)] + ["45x2560x10240", "90x2560x10240", "1024x2560x10240"])


def parse_shape(s: str) -> tuple[int, int, int]:
    try:
        m, k, n = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {s!r} is not MxKxN") from None
    return m, k, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated MxKxN")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-s", type=float, default=0.05, help="seconds each (shape, library) runs per round")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t = args.threads
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={str(t > 1).lower()}"
                               f" intra_op_parallelism_threads={t}").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(t)
    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    rng = np.random.default_rng(0)
    calls, reps = {}, {}
    for m, k, n in shapes:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        f = jax.jit(jnp.matmul)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        calls[("jax", (m, k, n))] = lambda f=f, ja=ja, jb=jb: f(ja, jb).block_until_ready()
        calls[("torch", (m, k, n))] = lambda ta=ta, tb=tb: torch.mm(ta, tb)
    with torch.inference_mode():
        for key, run in calls.items():  # compile, warm up, and size a round's repetitions
            run()
            t0 = time.perf_counter()
            run()
            reps[key] = max(1, int(args.min_s / max(time.perf_counter() - t0, 1e-6)))
        times = {key: [] for key in calls}
        for _ in range(args.rounds):
            for key, run in calls.items():
                t0 = time.perf_counter()
                for _ in range(reps[key]):
                    run()
                times[key].append((time.perf_counter() - t0) / reps[key])
    rows = []
    for m, k, n in shapes:
        row = {"shape": f"{m}x{k}x{n}", "m": m, "k": k, "n": n}
        for lib in ("jax", "torch"):
            row[f"{lib}_gflops"] = 2 * m * k * n / statistics.median(times[(lib, (m, k, n))]) / 1e9
        rows.append(row)
        print(f"{row['shape']:>16}: XLA {row['jax_gflops']:7.1f} GFLOP/s, PyTorch {row['torch_gflops']:7.1f}")
    result = {"host": platform.processor() or platform.machine(), "threads": t, "rounds": args.rounds,
              "jax": jax.__version__, "torch": torch.__version__, "xla_flags": os.environ["XLA_FLAGS"],
              "command": "python benchmarks/matmul_shapes.py " + " ".join(argv if argv is not None else
                                                                         __import__("sys").argv[1:]),
              "rows": rows}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
