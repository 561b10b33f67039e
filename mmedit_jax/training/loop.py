"""The training loop: data order, validation, metric rows, checkpoints and resume, early stopping.

The data order is a pure function of (seed, epoch) (`batch_indices`), so a resumed run sees exactly the batches an
uninterrupted one would and ends with bit-identical parameters. Checkpoints (`mmedit_jax.checkpoint`, orbax,
atomic) hold the whole training state (editor parameters, optimiser state, statistics, step, skipped count, RNG,
early-stopping state) plus JSON metadata (data position, config); on resume, metric rows written after the
restored step are cut from `metrics.jsonl` (`eval.records.read_rows`). A run claims its directory with a
fingerprint (`run.json`, `run_fingerprint`: editor, config, base weights, training cases, warm start); a resume
into a directory another run wrote, or into checkpoints no fingerprint vouches for, is refused, naming what
differs; a run stopped before its first checkpoint starts over and drops its own earlier rows.

Validation scores the first `val_steps` cases with the evaluation harness's programs (`eval.steps`: the five
metrics, summarised by `eval.records.summarize`) on the editor as it stands (`Trainable.editor`), plus the
objective in eval mode, the reference's early-stopping value. `objective: lagrangian` shrinks its margin by 0.8
(down to `margin_kl_min`) at each validation whose Reliability exceeds 90%.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from mmedit_jax import sharding
from mmedit_jax.case import METRICS, Case, num_cases, pad_batch, take
from mmedit_jax.editors import ke_net as KN
from mmedit_jax.eval import harness, records
from mmedit_jax.eval.steps import make_step_fns
from mmedit_jax.training.config import TrainConfig
from mmedit_jax.training.metric_writer import MetricWriter
from mmedit_jax.training.step import eval_loss_program, init_train_state, step_program, warm_start
from mmedit_jax.training.trainables import Trainable

# --------------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, epoch), so resuming needs only the step.


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Dataset rows of step `step`: positions `[step * E, (step + 1) * E)` of the concatenated epoch orders."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size)
    out = np.empty_like(pos)
    for epoch in np.unique(pos // n):
        sel = pos // n == epoch
        out[sel] = epoch_order(seed, int(epoch), n)[pos[sel] % n]
    return out


def steps_per_epoch(n_train: int, batch_size: int) -> float:
    return math.ceil(n_train / batch_size)


# --------------------------------------------------------------------------------------------------
# Validation: the evaluation harness's programs (five metrics) plus the objective for early stopping.


class Validator:
    """Validates on the first `val_steps` cases, `val_batch_size` at a time; the jitted programs are built once
    and reused, and the unedited model's outputs (which training does not change) are computed once.

    `ts`: a training state of the right structure (its values do not matter): it gives the editor whose `edit`
    the programs compile.
    """

    def __init__(self, trainable: Trainable, cfg: TrainConfig, base_params, cases: Case, meta, ts: dict):
        self.trainable, self.cfg, self.base = trainable, cfg, base_params
        n = min(cfg.val_steps, len(meta))
        self.cases, self.meta, self.n = take(cases, np.arange(n)), list(meta[:n]), n
        self.eval_loss = eval_loss_program(trainable, cfg)
        editor = trainable.editor(ts["params"], ts["editor_state"], check=False)  # statistics may be empty yet
        self.pre_fn, self.edit_fn = make_step_fns(editor, cfg.exact_match)
        self._pre = None

    def __call__(self, ts: dict) -> dict:
        e = self.cfg.val_batch_size
        editor_params = self.trainable.editor(ts["params"], ts["editor_state"], check=False).editor_params
        sums: dict[str, float] = {}
        rows, pre_all = [], []
        for b, idx in enumerate(harness.batch_indices(range(self.n), e)):
            batch = pad_batch(take(self.cases, idx), e)
            weights = np.arange(e) < len(idx)
            m = jax.device_get(self.eval_loss(ts["params"], ts["editor_state"], self.base, batch, weights))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
            pre = self.pre_fn(self.base, batch) if self._pre is None else self._pre[b]
            pre_all.append(pre)
            post = self.edit_fn(editor_params, self.base, batch, pre)
            pre_h, post_h = jax.device_get((pre, post))
            rows += [harness.case_row(self.meta[i], take(pre_h, j), take(post_h, j), None, None, 0.0)
                     for j, i in enumerate(idx)]
        self._pre = pre_all
        out = {f"{k}_val": v / self.n for k, v in sums.items()}
        summary = records.summarize(rows)
        out.update({f"val/{k}": summary[k] for k in METRICS})
        out["val/mean"] = float(np.mean([summary[k] for k in METRICS]))  # one number to select editors by
        out.update({f"val/{k}": summary[k] for k in summary if k.startswith("pre_")})  # the unedited model
        return out


# --------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
    state: dict
    history: list[dict]
    stopped_early: bool
    resumed_from: int | None


# Config entries a resumed run may change: how long it runs and how often it logs, validates and saves.
RESUMABLE = ("max_iters", "log_interval", "val_interval", "ckpt_interval", "max_to_keep", "early_stop_patience")


def run_fingerprint(trainable: Trainable, cfg: TrainConfig, base_params, train_cases: Case, init=None) -> dict:
    """What makes a training run itself (`run.json`; a resume into a directory written by another run is
    refused, naming what differs): the editor and its layout, the config but its `RESUMABLE` entries, the base
    model's weights (`records.hash_params`), the training cases' arrays, and the warm-start editor."""
    config = {f"config.{k}": v for k, v in cfg.as_json().items() if k not in RESUMABLE}  # a mismatch names the key
    sampled = lambda tree: records.hash_params(hashlib.sha256(), tree).hexdigest()  # noqa: E731
    return {"editor": trainable.name, "layout": hashlib.sha256(repr(trainable.spec).encode()).hexdigest(),
            **config, "base_model": sampled(base_params), "train_cases": records.digest_tree(train_cases),
            "init_editor": None if init is None else records.digest_tree(init)}


RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "tensorboard", "editor", records.RUN_FILE, "train_config.json")


def set_aside(out_dir: str) -> str | None:
    """Starting over (`resume=False`) in a directory a run wrote: its outputs move to `out_dir/replaced-<UTC time>/`
    (nothing is deleted, and the new run's checkpoints never mix with the old ones). Returns that directory."""
    present = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(out_dir, n))]
    if not present:
        return None
    dest = os.path.join(out_dir, time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime()))
    while os.path.exists(dest):
        dest += "+"
    os.makedirs(dest)
    for name in present:
        os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
    print(f"train: starting over in {out_dir}; the previous run's {', '.join(present)} moved to {dest}", flush=True)
    return dest


def train(trainable: Trainable, cfg: TrainConfig, base_params, train_cases: Case, out_dir: str | None, *,
          val_cases: Case | None = None, val_meta=None, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, resume: bool = True, mesh=None,
          tensorboard: bool = True, init: tuple | None = None,
          on_claim: Callable[[], None] | None = None) -> TrainResult:
    """Trains for `cfg.max_iters` steps (or until early stopping), resuming from `out_dir/checkpoints`.

    `train_cases`: host `Case` with a leading `[n_train]` axis (`case.make_cases`, images as `trainable.fns`
    takes them). Writes `out_dir/metrics.jsonl` (one line per step, validation lines with `"split": "val"`), the
    same scalars as TensorBoard events in `out_dir/tensorboard` (unless `tensorboard=False`), periodic
    checkpoints, and `out_dir/editor` (the editor at its best validation, for `evaluate --editor-ckpt`).
    `on_step(step, metrics)` is called after each step's metrics are fetched (tests use it to kill a run).

    With a `mesh` (`sharding.make_mesh`), each step's E edits are split over its "data" axis, the base weights
    are laid out over "model" by the partition rules, and the editor's state is replicated; the same jitted
    step runs (XLA inserts the reductions, e.g. for the shared statistics and the mean gradient).

    `init = (params, editor_state)` warm-starts from a trained editor (`load_editor_state`) with a fresh
    optimiser; a checkpoint in `out_dir` still takes precedence when resuming. `on_claim()` runs once `out_dir` is
    this run's (after the fingerprint check, before the first step): the CLI writes its own files there.
    """
    # Imported here: orbax is slow to import and only runs that write checkpoints need it.
    from mmedit_jax.checkpoint import CheckpointManager

    n_train = num_cases(train_cases)
    tx, step_fn = step_program(trainable, cfg)
    ts = init_train_state(trainable, tx, cfg.seed, cfg)
    if init is not None:
        ts = dict(ts, **warm_start(ts, tx, *init, fresh_ok=trainable.fresh_ok))
    mngr, resumed_from, metrics_path = None, None, None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        metrics_path = os.path.join(out_dir, "metrics.jsonl")
        if not resume:
            set_aside(out_dir)
        mngr = CheckpointManager(os.path.join(out_dir, "checkpoints"), max_to_keep=cfg.max_to_keep,
                                 save_interval_steps=1)
        has_checkpoint = mngr.latest_step() is not None
        fingerprint = run_fingerprint(trainable, cfg, base_params, train_cases, init)
        ours = records.claim_run(out_dir, fingerprint, resume, rows_file="metrics.jsonl")
        if resume and has_checkpoint and not ours:
            raise records.RunMismatch(f"{out_dir}/checkpoints holds checkpoints but no {records.RUN_FILE} proves "
                                      "they are this run's: use another --out, or --no-resume to start over")
        if on_claim is not None:
            on_claim()
        if resume and not has_checkpoint and os.path.exists(metrics_path):
            # this run, stopped before its first checkpoint: it starts again from step 0, so its rows go
            records.read_rows(metrics_path, keep=lambda r: False)
        if resume and has_checkpoint:
            ts, meta = mngr.restore(template=ts)
            # Orbax hands back arrays committed to a device; as uncommitted ones (like a fresh state's) they hit
            # the train step's compiled program instead of triggering a second compilation.
            ts = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), ts)
            resumed_from = int(ts["step"])
            if meta.get("n_train") != n_train or meta.get("batch_size") != cfg.batch_size:
                raise ValueError(f"checkpoint in {out_dir} was written for n_train={meta.get('n_train')}, "
                                 f"batch_size={meta.get('batch_size')}; this run has {n_train}, {cfg.batch_size}")
            records.read_rows(metrics_path, keep=lambda r: int(r.get("step", 0)) <= resumed_from)

    place = sharding.place_batch(mesh, cfg.batch_size)
    if mesh is not None:
        base_params = sharding.shard_params(base_params, mesh)
        replicated = NamedSharding(mesh, PS())
        ts = jax.device_put(ts, replicated)
        # The state leaves each step as it came in, replicated: left to XLA, the first step's output state has
        # other shardings than its input, and the second step would compile the program again.
        step_fn = jax.jit(step_fn, out_shardings=(replicated, replicated))

    validator = None
    if val_cases is not None and val_meta:
        validator = Validator(trainable, cfg, base_params, val_cases, val_meta, ts)

    def save(step, force=False):
        if mngr is None:
            return
        pos = step * cfg.batch_size
        meta = {"step": step, "epoch": pos // n_train, "offset": pos % n_train, "n_train": n_train,
                "batch_size": cfg.batch_size, "seed": cfg.seed, "skipped": int(ts["skipped"]),
                "config": cfg.as_json()}
        mngr.save(step, ts, meta, force=force)

    history: list[dict] = []
    pending: list[tuple[int, dict]] = []
    weights = np.ones((cfg.batch_size,), bool)
    bar = None
    start_step = int(ts["step"])
    if progress:
        from tqdm import tqdm  # imported here: only runs with a progress bar need it

        print(f"train {trainable.name}: compiling the train step (the first step includes it)", flush=True)
    out = None
    if metrics_path:
        out = MetricWriter(metrics_path, os.path.join(out_dir, "tensorboard") if tensorboard else None)
    stopped_early = False
    t_start = t_last = time.perf_counter()
    steps_last = start_step

    def flush():
        nonlocal t_last, steps_last
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        ran = pending[-1][0] - steps_last  # steps since the last flush, the compiling first step not counted
        rate = ran / max(now - t_last, 1e-9) if ran > 0 else float("nan")
        t_last, steps_last = now, pending[-1][0]
        for (s, _), m in zip(pending, fetched):
            row = {"step": s, **{k: (bool(v) if k == "finite" else float(v)) for k, v in m.items()},
                   "steps_per_s": rate}
            history.append(row)
            if out:
                out.write(row)
            if on_step:
                on_step(s, row)
        if out:
            out.flush()
        pending.clear()
        if bar:
            last = history[-1]
            bar.set_postfix(loss=f"{last['loss/total_edit']:.4f}", acc=f"{last['edit/acc']:.3f}",
                            steps_s=f"{rate:.2f}", skipped=int(ts["skipped"]))

    try:
        step = start_step
        while step < cfg.max_iters:
            idx = batch_indices(cfg.seed, step, cfg.batch_size, n_train)
            ts, m = step_fn(ts, base_params, place(take(train_cases, idx)), place(weights))
            step += 1
            pending.append((step, m))
            if step == start_step + 1:  # the first step compiled: step rates and the bar's ETA count from here
                jax.block_until_ready(ts["step"])
                t_last, steps_last = time.perf_counter(), step
                if progress:
                    print(f"train {trainable.name}: first step (compile included) {t_last - t_start:.1f}s", flush=True)
                    bar = tqdm(total=cfg.max_iters, initial=step, unit="step", desc=f"train {trainable.name}",
                               dynamic_ncols=True)
            elif bar:
                bar.update(1)
            if step % cfg.log_interval == 0 or on_step is not None or step == cfg.max_iters:
                flush()
            if validator is not None and step % cfg.val_interval == 0:
                flush()
                vals = validator(ts)
                if cfg.early_stop_key not in vals:
                    raise KeyError(f"early_stop_key {cfg.early_stop_key!r} is not a validation value "
                                   f"(have {sorted(vals)})")
                # Lower is better, as the reference's loss key; accuracies and the five metrics are negated.
                higher = "acc" in cfg.early_stop_key or cfg.early_stop_key.startswith("val/")
                score = -vals[cfg.early_stop_key] if higher else vals[cfg.early_stop_key]
                score = float(np.float32(score))  # as stored in the (float32) checkpointed state
                if score < float(ts["best_val"]):
                    ts = dict(ts, best_val=jnp.asarray(score, jnp.float32), best_step=jnp.asarray(step, jnp.int32))
                    if out_dir:
                        trainable.save(os.path.join(out_dir, "editor"), ts["params"], ts["editor_state"])
                if cfg.objective == "lagrangian":  # the original's schedule: shrink once edits succeed
                    ts = dict(ts, margin=KN.shrink_margins({"kl": ts["margin"]}, {"kl": cfg.margin_kl_min},
                                                           vals["val/reliability"] / 100.0)["kl"])
                    vals["margin"] = float(ts["margin"])
                row = {"step": step, "split": "val", **vals, "best_step": int(ts["best_step"])}
                history.append(row)
                if out:
                    out.write(row)
                    out.flush()
                save(step, force=True)
                if step - int(ts["best_step"]) >= cfg.early_stop_patience:
                    stopped_early = True
                    break
            elif step % cfg.ckpt_interval == 0:
                save(step, force=True)
        flush()
        if mngr is not None and (mngr.latest_step() or 0) < step:
            save(step, force=True)
        if out_dir and (validator is None or not os.path.isdir(os.path.join(out_dir, "editor"))):
            # No validation, or none improved on the last (e.g. every validation loss was NaN): the final editor.
            trainable.save(os.path.join(out_dir, "editor"), ts["params"], ts["editor_state"])
    finally:
        if out:
            out.close()
        if bar:
            bar.close()
        if mngr is not None:
            mngr.close()
    return TrainResult(ts, history, stopped_early, resumed_from)
