"""The compiled training step: the optimiser, the training state (what checkpoints hold), warm starts, and one
jitted step over a batch of E independent edits.

One train step is ONE jitted program:

  1. per case (vmapped), one forward/backward of the unedited model on `edit` captures the per-token factors
     `u`, `delta` of every edited site (constants for the meta-gradient, as the reference);
  2. the editor turns them into factored patches (`Trainable.batch_patches`, training mode);
  3. the objective (`objective.batch_loss`, or `lagrangian_loss`) on the patched model;
  4. its gradient with respect to the editor's parameters; a non-finite loss or gradient (checked on device)
     skips the whole step (parameters, optimiser state and statistics unchanged; the reference would already have
     absorbed the bad rows into its statistics) and is counted; otherwise Adam (clipped by global norm
     `grad_clip`, accumulated over `accumulate_bs` steps with `optax.MultiSteps`) updates the editor.

MEND's learned per-site edit lrs get their own Adam with `lr_lr` (the intent of the reference's `lr_opt`; as
written there that optimiser never steps, so `edit_lrs` only move with the main Adam at `lr`: set
`lr_lr: null` to reproduce that). Clipping covers every trained parameter, edit lrs included, as the
reference's `clip_grad_norm_(outer_parameters, grad_clip)`.

`objective: lagrangian`: `CR + alpha * (KL - margin)` with alpha >= 0 ascended (centered RMSprop, `lr_alpha`); the
margin is shrunk by the loop at validations (`loop.train`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmedit_jax.editors import ke_net as KN
from mmedit_jax.training.config import TrainConfig
from mmedit_jax.training.objective import batch_loss, lagrangian_loss
from mmedit_jax.training.trainables import Trainable


def make_optimizer(cfg: TrainConfig, labels) -> optax.GradientTransformation:
    """Clip (global norm, all trained parameters) -> Adam (`lr`; MEND's edit lrs `lr_lr`; leaves labelled
    "frozen" never move), every `accumulate_bs` steps on the mean gradient (`optax.MultiSteps`)."""
    lr_lr = cfg.lr if cfg.lr_lr is None else cfg.lr_lr
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.multi_transform({"net": optax.adam(cfg.lr), "edit_lr": optax.adam(lr_lr),
                               "frozen": optax.set_to_zero()}, labels),
    )
    return optax.MultiSteps(inner, every_k_schedule=cfg.accumulate_bs)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def init_train_state(trainable: Trainable, tx: optax.GradientTransformation, seed: int,
                     cfg: TrainConfig | None = None) -> dict:
    """The whole training state as one pytree (what checkpoints hold); built in one jitted program.
    With `cfg.objective == "lagrangian"` it also holds the multiplier, its optimiser state and the margin."""
    return jax.jit(_train_state, static_argnums=(0, 1, 2, 3))(trainable, tx, seed, cfg)


def _train_state(trainable: Trainable, tx: optax.GradientTransformation, seed: int, cfg) -> dict:
    rng = jax.random.key(seed)
    params, state = trainable.init(jax.random.fold_in(rng, 0))
    out = {
        "params": params,
        "editor_state": state,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(rng),
        "best_val": jnp.asarray(np.inf, jnp.float32),
        "best_step": jnp.zeros((), jnp.int32),
    }
    if cfg is not None and cfg.objective == "lagrangian":
        alpha = KN.init_multipliers()["kl"]
        out.update(alpha=alpha, alpha_opt=KN.multiplier_optimizer(cfg.lr_alpha).init(alpha),
                   margin=jnp.asarray(cfg.margin_kl, jnp.float32))
    return out


def warm_start(ts: dict, tx: optax.GradientTransformation, params, editor_state, fresh_ok: tuple = ()) -> dict:
    """`params` / `editor_state` of a trained editor in place of a fresh state's, checked leaf by leaf. The
    top-level parameter groups named in `fresh_ok` (a switch's own parameters) may be absent from the given
    editor, and keep their fresh values, or present in it and absent here, and are dropped (said on stdout)."""
    kept = [k for k in fresh_ok if k in ts["params"] and k not in params]
    dropped = [k for k in fresh_ok if k in params and k not in ts["params"]]
    if kept or dropped:
        print(f"warm start: {', '.join(kept) or 'nothing'} initialised fresh (not in the given editor); "
              f"{', '.join(dropped) or 'nothing'} dropped (not in this one)", flush=True)
        params = {**{k: v for k, v in params.items() if k not in dropped}, **{k: ts["params"][k] for k in kept}}
    for name, fresh, given in (("params", ts["params"], params), ("editor_state", ts["editor_state"], editor_state)):
        want = jax.tree_util.tree_flatten_with_path(fresh)[0]
        have = dict(jax.tree_util.tree_flatten_with_path(given)[0])
        for path, leaf in want:
            got = have.get(path)
            if got is None or tuple(np.shape(got)) != tuple(leaf.shape):
                raise ValueError(f"warm start: {name}{jax.tree_util.keystr(path)} is "
                                 f"{None if got is None else np.shape(got)} in the given editor, expected "
                                 f"{tuple(leaf.shape)} (a different editor config or sites?)")
        extra = set(have) - {path for path, _ in want}
        if extra:
            raise ValueError(f"warm start: the given editor's {name} has entries this editor lacks: "
                             f"{sorted(jax.tree_util.keystr(p) for p in extra)[:4]} (different sites?)")
    params = jax.tree.map(lambda f, g: jnp.asarray(g, f.dtype), ts["params"], params)
    state = jax.tree.map(lambda f, g: jnp.asarray(g, f.dtype), ts["editor_state"], editor_state)
    return {"params": params, "editor_state": state, "opt_state": tx.init(params)}


def make_train_step(trainable: Trainable, cfg: TrainConfig, tx: optax.GradientTransformation):
    """`train_step(ts, base_params, cases [E], weights [E]) -> (ts, metrics)`, jitted.

    A non-finite loss or gradient leaves params, optimiser state and statistics as they were and adds 1 to
    `ts["skipped"]`; `metrics["finite"]` says which happened.
    """

    lagrangian = cfg.objective == "lagrangian"
    alpha_tx = KN.multiplier_optimizer(cfg.lr_alpha)

    def objective(p, alpha, ts, base_params, cases, weights):
        loss, (state, metrics) = batch_loss(trainable, cfg, p, ts["editor_state"], base_params, cases, weights, True)
        if lagrangian:
            loss = lagrangian_loss(cfg, metrics, alpha, ts["margin"])
            metrics = dict(metrics, **{"loss/lagrangian": loss})
        return loss, (state, metrics)

    def step(ts, base_params, cases, weights):
        grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
        (loss, (new_state, metrics)), (grads, g_alpha) = grad_fn(ts["params"], ts.get("alpha", 0.0), ts,
                                                                 base_params, cases, weights)
        finite = jnp.isfinite(loss) & _all_finite(grads) & jnp.isfinite(g_alpha)
        # Zero the gradient of a bad step before the optimiser sees it (NaN * 0 is still NaN); then keep the old
        # state anyway, so the accumulation counter does not advance either.
        safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, new_opt = tx.update(safe_grads, ts["opt_state"], ts["params"])
        new_params = optax.apply_updates(ts["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        out = dict(ts)
        out["params"] = keep(new_params, ts["params"])
        out["opt_state"] = keep(new_opt, ts["opt_state"])
        out["editor_state"] = keep(new_state, ts["editor_state"])
        if lagrangian:  # the multiplier ascends on every (finite) step, clamped at 0, as the original
            a_upd, a_opt = alpha_tx.update(jnp.where(finite, g_alpha, 0.0), ts["alpha_opt"])
            alpha = KN.clamp_multipliers({"kl": optax.apply_updates(ts["alpha"], a_upd)})["kl"]
            out["alpha"] = keep(alpha, ts["alpha"])
            out["alpha_opt"] = keep(a_opt, ts["alpha_opt"])
            metrics = dict(metrics, alpha=ts["alpha"], margin=ts["margin"])
        out["step"] = ts["step"] + 1
        out["skipped"] = ts["skipped"] + (~finite).astype(jnp.int32)
        metrics = dict(metrics, finite=finite, grad_norm=optax.tree.norm(safe_grads))
        return out, metrics

    return jax.jit(step)


def step_program(trainable: Trainable, cfg: TrainConfig):
    """`(tx, jitted train step)` for `cfg`, built once per trainable (cached on it), so a resumed or repeated
    `train` call with the same trainable and config reuses the compiled program."""

    def build():
        tx = make_optimizer(cfg, trainable.labels(jax.eval_shape(trainable.init, jax.random.key(0))[0]))
        return tx, make_train_step(trainable, cfg, tx)

    return trainable.program(("train_step", cfg), build)


def eval_loss_program(trainable: Trainable, cfg: TrainConfig):
    """The jitted validation objective, eval mode (statistics frozen): `(params, state, base, cases, w) ->
    metrics`; built once per trainable and config."""

    def build():
        def fn(params, state, base_params, cases, weights):
            return batch_loss(trainable, cfg, params, state, base_params, cases, weights, False)[1][1]

        return jax.jit(fn)

    return trainable.program(("eval_loss", cfg), build)
