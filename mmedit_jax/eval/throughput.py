"""Timing the harness's compiled edit step: throughput by batch size, latency percentiles, memory, FLOPs.

Everything here times the same two programs the harness runs (`harness.make_step_fns`): the unedited model's
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

from mmedit_jax.eval import harness


@dataclasses.dataclass
class StepTiming:
    batch: int
    compile_s: float
    times_s: list[float]  # steady calls, one per repeat
    flops: float  # XLA cost analysis of one call of the edit program (nan when unavailable)
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
                    temp_mib_per_edit=self.temp_bytes / 2**20 / self.batch,
                    patch_kib_per_edit=self.patch_bytes / 2**10)


def _cost(compiled) -> tuple[float, float]:
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


def time_edit_step(editor, fns, params, cases, batch_size: int, repeats: int, exact_match: bool = True,
                   step_fns=None) -> StepTiming:
    """Times pre-edit outputs + edit + scoring of `batch_size` cases (the first ones of `cases`, padded).

    `step_fns`: `harness.make_step_fns(..., base_accuracy=False)`, built once and reused across calls.
    """
    pre_fn, edit_fn = step_fns or harness.make_step_fns(editor, fns, exact_match, base_accuracy=False)
    n = jax.tree.leaves(cases)[0].shape[0]
    batch = harness._pad_batch(harness._take(cases, np.arange(min(batch_size, n))), batch_size)
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
    flops_edit, temp = _cost(edit_fn.lower(editor.editor_params, params, batch, pre).compile())
    flops_pre, _ = _cost(pre_fn.lower(params, batch).compile())
    one = jax.tree.map(lambda a: a[0], batch)
    patch = jax.eval_shape(lambda c: editor.edit(editor.editor_params, params, c, {}), one)
    patch_bytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(patch))
    return StepTiming(batch_size, first - statistics.median(times), times, flops_edit + flops_pre, temp, patch_bytes)


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
