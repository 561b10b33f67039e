"""Timing the harness's compiled edit step: throughput by batch size, latency percentiles, memory, FLOPs.

Everything here times the same two programs the harness runs (`steps.make_step_fns`): the unedited model's
outputs the five metrics compare against (its locality predictions; its base accuracies are left out, as the
reference's per-record step computes none) and edit + five metrics, over a batch of E independent cases.
With `BatchImages` (the pixels of the batch's distinct images), each timed call first encodes them (ViT and
Q-Former, one jitted call beside the step) and the step runs on those features: the headline counts image
encoding. The same step on the cached features is timed in the same rounds, interleaved ("features cached").
Each program is compiled ahead, once (compile time: lowering and compiling them), and the same executables are
timed and analysed; steady times are taken after `jax.block_until_ready`, after one warm-up call (none when a
single timed call is asked for).
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax.case import IMAGE_KEYS, num_cases, pad_batch, take
from mmedit_jax.eval.steps import make_step_fns


@dataclasses.dataclass
class BatchImages:
    """The images of a batch of cases as pixels: each distinct image once (`pixels [N, 3, H, W]`) and, per image
    key of `case.IMAGE_KEYS`, each case's row in it (`rows {key: [E]}`)."""

    pixels: np.ndarray
    rows: dict

    @classmethod
    def of(cls, data_batch, pixels: np.ndarray, idx) -> BatchImages:
        """The images of cases `idx` of a data `EditBatch` whose `image_ids` index `pixels` (`pipeline.Prepared`)."""
        ids = {key: np.asarray(getattr(data_batch, key).image_ids)[idx] for key in IMAGE_KEYS}
        distinct = np.unique(np.concatenate(list(ids.values())))
        return cls(pixels[distinct], {k: np.searchsorted(distinct, v).astype(np.int32) for k, v in ids.items()})


@functools.lru_cache(maxsize=8)
def image_encoder(fns):
    """`jit((params, pixels [N, 3, H, W], rows {key: [E]}) -> {key: [E, nq, D]})`: the features each case's
    forward takes, computed from the pixels (each distinct image once) and gathered per case."""

    @jax.jit
    def encode(params, pixels, rows):
        feats = fns.encode(params, {}, pixels)
        return {k: feats[r] for k, r in rows.items()}

    return encode


@dataclasses.dataclass
class StepTiming:
    batch: int
    compile_s: float
    times_s: list[float]  # steady calls, one per repeat (image encoding included where images were given)
    flops: float  # matmul FLOPs of one call of both programs (`matmul_flops`, scans counted per iteration)
    xla_flops: float  # XLA's cost analysis of the same (counts a scan body once: undercounts layer stacks)
    temp_bytes: float  # XLA temporaries of the edit program
    patch_bytes: int  # one edit's patch
    cached_times_s: list[float] | None = None  # the step alone on cached features, interleaved with `times_s`
    images: int = 0  # distinct images encoded per call (0: none given, or the step runs pixels itself)
    image_flops: float = 0.0  # matmul FLOPs of their encoding (included in `flops`)
    xla_bytes: float = float("nan")  # XLA's bytes accessed (scan bodies once), both programs and the encoding

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def edits_per_s(self) -> float:
        return self.batch / self.median_s

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.times_s) * 1e3, q))

    def as_dict(self) -> dict:
        cached = statistics.median(self.cached_times_s) if self.cached_times_s else self.median_s
        return dict(batch=self.batch, compile_s=self.compile_s, median_ms=self.median_s * 1e3,
                    p50_ms=self.percentile_ms(50), p90_ms=self.percentile_ms(90), edits_per_s=self.edits_per_s,
                    cached_edits_per_s=self.batch / cached, images_per_edit=self.images / self.batch,
                    gflop_per_edit=self.flops / 1e9 / self.batch, achieved_gflops=self.flops / 1e9 / self.median_s,
                    image_gflop_per_edit=self.image_flops / 1e9 / self.batch,
                    xla_gflop_per_edit=self.xla_flops / 1e9 / self.batch,
                    xla_mib_accessed_per_edit=self.xla_bytes / 2**20 / self.batch,
                    temp_mib_per_edit=self.temp_bytes / 2**20 / self.batch,
                    patch_kib_per_edit=self.patch_bytes / 2**10)


def xla_cost(compiled) -> tuple[float, float, float]:
    """`(FLOPs, temporary bytes, bytes accessed)` of a compiled program by XLA's analyses; NaN where the backend
    has none."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", float("nan")))
        accessed = float(cost.get("bytes accessed", float("nan")))
    except Exception:  # some backends do not implement it
        flops = accessed = float("nan")
    try:
        temp = float(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:
        temp = float("nan")
    return flops, temp, accessed


def time_edit_step(editor, params, cases, batch_size: int, repeats: int, exact_match: bool = True,
                   step_fns=None, images: BatchImages | None = None) -> StepTiming:
    """Times pre-edit outputs + edit + scoring of `batch_size` cases (the first ones of `cases`, padded).

    `step_fns`: `steps.make_step_fns(..., base_accuracy=False)`, built once and reused across calls.
    `images`: the batch's images as pixels (`BatchImages.of`); each timed call then encodes them first and runs
    the step on those features, and the step on the cases' cached features is timed too, interleaved. Ignored
    where the editor's forward runs pixels itself (its step already encodes).
    """
    pre_fn, edit_fn = step_fns or make_step_fns(editor, exact_match, base_accuracy=False)
    batch = jax.device_put(pad_batch(take(cases, np.arange(min(batch_size, num_cases(cases)))), batch_size))
    encode = None if images is None or editor.fns.uses_pixels else image_encoder(editor.fns)
    if encode is not None:
        pixels, rows = jax.device_put((images.pixels, images.rows))

    # Compiled ahead (one compile per program: the same executables are timed and give XLA's cost analyses).
    t0 = time.perf_counter()
    pre_shape = jax.eval_shape(pre_fn, params, batch)
    pre_c = pre_fn.lower(params, batch).compile()
    edit_c = edit_fn.lower(editor.editor_params, params, batch, pre_shape).compile()
    encode_c = None if encode is None else encode.lower(params, pixels, rows).compile()
    compile_s = time.perf_counter() - t0

    def step(b):
        return jax.block_until_ready(edit_c(editor.editor_params, params, b, pre_c(params, b)))

    def call():  # the headline: pixels in where given
        return step(batch if encode_c is None else batch.replace(images=encode_c(params, pixels, rows)))

    if repeats > 1:  # a warm-up call; not with one timed call asked for (at 2.7B shapes on a CPU each costs minutes)
        call()
    times, cached = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if encode_c is not None:
            t0 = time.perf_counter()
            step(batch)
            cached.append(time.perf_counter() - t0)
    flops_edit, temp, bytes_edit = xla_cost(edit_c)
    flops_pre, _, bytes_pre = xla_cost(pre_c)
    flops = (matmul_flops(jax.make_jaxpr(edit_fn)(editor.editor_params, params, batch, pre_shape))
             + matmul_flops(jax.make_jaxpr(pre_fn)(params, batch)))
    image_flops, n_images, xla_flops, xla_bytes = 0.0, 0, flops_edit + flops_pre, bytes_edit + bytes_pre
    if encode_c is not None:
        image_flops = matmul_flops(jax.make_jaxpr(encode)(params, pixels, rows))
        n_images = len(images.pixels)
        flops_img, _, bytes_img = xla_cost(encode_c)
        xla_flops, xla_bytes = xla_flops + flops_img, xla_bytes + bytes_img
    one = jax.tree.map(lambda a: a[0], batch)
    patch = jax.eval_shape(lambda c: editor.edit(editor.editor_params, params, c, {}), one)
    patch_bytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(patch))
    return StepTiming(batch_size, compile_s, times, flops + image_flops, xla_flops, temp,
                      patch_bytes, cached or None, n_images, image_flops, xla_bytes)


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
