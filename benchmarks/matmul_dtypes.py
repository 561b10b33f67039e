"""float32 against bfloat16 matmuls on this host, JAX (XLA CPU) and PyTorch side by side: what each makes of bf16.

    python benchmarks/matmul_dtypes.py --json benchmarks/matmul_dtypes.json

An n x n x n matmul per (library, dtype), the four timed interleaved in rounds (median and best of the rounds),
both libraries on the same thread count (torch.set_num_threads = the host's cores; XLA CPU uses them all). The
host's CPU flags are recorded: bfloat16 arithmetic in hardware needs AVX512_BF16 or AMX, which a host without
them emulates (converting to float32 and back), so there bf16 saves memory, not time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count())
    n = args.n
    sides = {}
    for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dt)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        sides[f"jax {name}"] = lambda f=f, a=a: f(a).block_until_ready()
        t = torch.randn(n, n).to(getattr(torch, name))
        with torch.inference_mode():
            t @ t
        sides[f"torch {name}"] = lambda t=t: torch.mm(t, t)
    times = {k: [] for k in sides}
    for _ in range(args.rounds):
        for k, run in sides.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                run()
            times[k].append(time.perf_counter() - t0)
    flop = 2 * n**3
    result = {"host": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
              "n": n, "rounds": args.rounds, "jax": jax.__version__, "torch": torch.__version__,
              "gflops": {k: {"median": flop / statistics.median(v) / 1e9, "best": flop / min(v) / 1e9}
                         for k, v in times.items()}}
    print(f"CPU flags: {' '.join(result['cpu_flags'])}")
    for k, v in result["gflops"].items():
        print(f"{k:>15}: median {v['median']:7.1f} GFLOP/s, best {v['best']:7.1f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
