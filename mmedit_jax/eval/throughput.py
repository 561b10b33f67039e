"""Timing the harness's compiled edit step: throughput by batch size, latency percentiles, memory, FLOPs.

Everything here times the same two programs the harness runs (`steps.make_step_fns`): the unedited model's
outputs the five metrics compare against (its locality predictions; its base accuracies are left out, as the
reference's per-record step computes none) and edit + five metrics, over a batch of E independent cases.
Compile time is the first call minus a steady call; steady times are taken after `jax.block_until_ready`.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax.case import num_cases, pad_batch, take
from mmedit_jax.eval.steps import make_step_fns


@dataclasses.dataclass
class StepTiming:
    batch: int
    compile_s: float
    times_s: list[float]  # steady calls, one per repeat
    flops: float  # matmul FLOPs of one call of both programs (`matmul_flops`, scans counted per iteration)
    xla_flops: float  # XLA's cost analysis of the same (counts a scan body once: undercounts layer stacks)
    temp_bytes: float  # XLA temporaries of the edit program
    patch_bytes: int  # one edit's patch

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def edits_per_s(self) -> float:
        return self.batch / self.median_s

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.times_s) * 1e3, q))

    def as_dict(self) -> dict:
        return dict(batch=self.batch, compile_s=self.compile_s, median_ms=self.median_s * 1e3,
                    p50_ms=self.percentile_ms(50), p90_ms=self.percentile_ms(90), edits_per_s=self.edits_per_s,
                    gflop_per_edit=self.flops / 1e9 / self.batch, achieved_gflops=self.flops / 1e9 / self.median_s,
                    xla_gflop_per_edit=self.xla_flops / 1e9 / self.batch,
                    temp_mib_per_edit=self.temp_bytes / 2**20 / self.batch,
                    patch_kib_per_edit=self.patch_bytes / 2**10)


def xla_cost(compiled) -> tuple[float, float]:
    """`(FLOPs, temporary bytes)` of a compiled program by XLA's analyses; NaN where the backend has none."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", float("nan")))
    except Exception:  # some backends do not implement it
        flops = float("nan")
    try:
        temp = float(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:
        temp = float("nan")
    return flops, temp


def time_edit_step(editor, params, cases, batch_size: int, repeats: int, exact_match: bool = True,
                   step_fns=None) -> StepTiming:
    """Times pre-edit outputs + edit + scoring of `batch_size` cases (the first ones of `cases`, padded).

    `step_fns`: `steps.make_step_fns(..., base_accuracy=False)`, built once and reused across calls.
    """
    pre_fn, edit_fn = step_fns or make_step_fns(editor, exact_match, base_accuracy=False)
    batch = pad_batch(take(cases, np.arange(min(batch_size, num_cases(cases)))), batch_size)
    batch = jax.device_put(batch)

    def call():
        pre = pre_fn(params, batch)
        return jax.block_until_ready(edit_fn(editor.editor_params, params, batch, pre))

    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    pre = pre_fn(params, batch)
    flops_edit, temp = xla_cost(edit_fn.lower(editor.editor_params, params, batch, pre).compile())
    flops_pre, _ = xla_cost(pre_fn.lower(params, batch).compile())
    flops = (matmul_flops(jax.make_jaxpr(edit_fn)(editor.editor_params, params, batch, pre))
             + matmul_flops(jax.make_jaxpr(pre_fn)(params, batch)))
    one = jax.tree.map(lambda a: a[0], batch)
    patch = jax.eval_shape(lambda c: editor.edit(editor.editor_params, params, c, {}), one)
    patch_bytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(patch))
    return StepTiming(batch_size, first - statistics.median(times), times, flops, flops_edit + flops_pre, temp,
                      patch_bytes)


def matmul_flops(jaxpr) -> float:
    """`2 * M * N * K` summed over every `dot_general` of a (closed) jaxpr, nested jaxprs included and a
    `scan` body counted `length` times (XLA's cost analysis counts it once). Both branches of a `cond` count;
    a `while_loop` body counts once (its trip count is not static)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            k = np.prod([eqn.invars[0].aval.shape[d] for d in lhs_contract])
            total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * float(k)
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    total += times * matmul_flops(sub)
    return total


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
    """Achieved GFLOP/s of a jitted n x n matmul on the default device: the ceiling to compare against."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def peak_host_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_mib() -> float | None:
    """Peak device memory in use, where the backend reports it (GPU/TPU; not the CPU backend)."""
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20
