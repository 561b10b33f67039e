"""Meta-training of the hypernetwork editors (MEND, KE) with EasyEdit's multimodal trainer objective.

One train step is ONE jitted program over a batch of E independent edits (`batch_size`):

  1. per case (vmapped), one forward/backward of the unedited model on `edit_inner` captures the per-token
     factors `u`, `delta` of every edited site (constants for the meta-gradient, as the reference);
  2. the editor turns them into factored patches (MEND: running input statistics updated with the whole
     batch first, training mode only; KE: conditioned on each case's `cond` tokens);
  3. per case, the edited model is run on the rephrase, the image rephrase and the two locality inputs, the
     unedited model on the locality inputs, and (`MultimodalTrainer.edit_step`, EasyEdit fb2ba6a)
        L = cedit * NLL(edit_outer) + iedit * NLL(edit_outer_image) + cloc * (KL(loc) + KL(loc_image))
     with NLL over answer tokens and KL(pre || post) averaged over every non-pad position (`eval.losses`);
  4. the mean of L over the E cases is differentiated with respect to the editor's parameters; a non-finite
     loss or gradient (checked on device) skips the whole step (parameters, optimiser state and statistics
     unchanged) and is counted; otherwise Adam (clipped by global norm `grad_clip`, accumulated over
     `accumulate_bs` steps with `optax.MultiSteps`) updates the editor.

`objective: lagrangian` trains KE (or MEND) with KE's original constrained objective instead:
`CR + alpha * (KL - margin)`, CR the generality terms above, alpha >= 0 ascended (centered RMSprop, `lr_alpha`)
and the margin shrunk by 0.8 (down to `margin_kl_min`) at each validation whose Reliability exceeds 90%.
With a `mesh`, the E edits of a step are split over its "data" axis (see `train`).

Counting follows the reference: `max_iters`, `val_interval`, `log_interval`, `accumulate_bs` and
`early_stop_patience` count steps (the reference's iterations, one batch of `batch_size` edits each; its
batch size is 1). EasyEdit's BLIP-2 MEND yaml (batch 1, accumulate 2) therefore runs the same schedule;
`batch_size: 2, accumulate_bs: 1` averages the same number of edits per update in one compiled step.

MEND's learned per-site edit lrs get their own Adam with `lr_lr` (the intent of the reference's `lr_opt`; as
written there that optimiser never steps, so `edit_lrs` only move with the main Adam at `lr`: set
`lr_lr: null` to reproduce that). Clipping covers every trained parameter, edit lrs included, as the
reference's `clip_grad_norm_(outer_parameters, grad_clip)`.

Deviations, stated: statistics are merged over the E edits of a step at once (the reference, at batch 1,
merges one edit per iteration; with E = 1 they agree); a skipped step also leaves the statistics unchanged
(the reference has already absorbed the bad rows, which would poison every later edit).

Checkpoints (`mmedit_jax.checkpoint.CheckpointManager`, orbax, atomic): editor parameters, optimiser state,
statistics, step, skipped count, RNG and early-stopping state, plus JSON metadata (data position, config).
The data order is a pure function of (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted one would and ends with bit-identical parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmedit_jax import patch as P
from mmedit_jax.editors import ke_net as KN
from mmedit_jax.editors import mend_net as MN
from mmedit_jax.editors.base import Case, Editor, ModelFns, answer_nll
from mmedit_jax.eval import metrics as M
from mmedit_jax.eval.losses import kl_loc_loss, topk_rank_loss
from mmedit_jax.metric_writer import MetricWriter

# --------------------------------------------------------------------------------------------------
# Configuration (EasyEdit's hparams keys).


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Trainer hyperparameters under EasyEdit's names (`hparams/TRAINING/MEND/blip2.yaml` defaults).

    Editor-specific keys (MEND: rank, n_hidden, mlp_class, combine, norm, shared, edit_lr, descent, ...;
    KE: lstm_hidden, condition_dim, hidden_dim, max_scale) are read by `MendConfig.from_hparams` /
    `ke_config_from_hparams` from the same YAML.
    """

    alg: str = "MEND"  # MEND or KE
    inner_params: tuple[str, ...] = ()  # EasyEdit parameter names or our sites
    lr: float = 1e-6
    lr_lr: float | None = 1e-4
    cedit: float = 0.1
    iedit: float = 0.1
    cloc: float = 1.0
    # Our addition (0 = the reference's objective): weight of `losses.topk_rank_loss` on both locality inputs,
    # which protects the rank order M-Locality measures; `rank_k` tokens per position.
    crank: float = 0.0
    rank_k: int = 11
    batch_size: int = 1  # edits per step (vmapped)
    val_batch_size: int = 1
    accumulate_bs: int = 2  # steps per optimiser update
    grad_clip: float = 100.0
    max_iters: int = 30000
    val_interval: int = 5000
    val_steps: int = 500  # validation cases
    log_interval: int = 200
    early_stop_patience: int = 20000
    early_stop_key: str = "loss/total_edit_val"  # or a validation metric ("val/mean", ...), then higher is better
    exact_match: bool = True
    seed: int = 0
    ckpt_interval: int = 1000  # steps between periodic checkpoints (also saved at every validation and the end)
    max_to_keep: int = 2
    # "mend": the multimodal trainer's weighted sum (EasyEdit; also what the EFK/KE ports train with).
    # "lagrangian": KE's original constrained objective, CR + alpha * (KL - margin) with alpha >= 0 ascended.
    objective: str = "mend"
    margin_kl: float = 1e-3  # the original's BART values: 1e-3 shrinking to 1e-5
    margin_kl_min: float = 1e-5
    lr_alpha: float = 0.1  # centered RMSprop on the multiplier, as the original

    def __post_init__(self):
        if self.alg.upper() not in ("MEND", "KE"):
            raise ValueError(f"TrainConfig.alg={self.alg!r}: expected MEND or KE")
        for f in ("batch_size", "val_batch_size", "accumulate_bs", "max_iters", "val_interval", "log_interval",
                  "ckpt_interval"):
            if getattr(self, f) < 1:
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)} must be >= 1")
        if self.objective not in ("mend", "lagrangian"):
            raise ValueError(f"TrainConfig.objective={self.objective!r}: expected 'mend' or 'lagrangian'")
        if not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip={self.grad_clip} must be > 0")

    @classmethod
    def from_hparams(cls, hparams: Mapping, **overrides) -> TrainConfig:
        """Picks this config's keys out of an EasyEdit hparams dict; other keys are left to the editor configs
        (unknown keys such as `model_name`, `device`, `results_dir` are ignored, as EasyEdit's dataclasses do)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in hparams.items() if k in names}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        if "inner_params" in kw:
            kw["inner_params"] = tuple(kw["inner_params"])
        if "alg" not in kw and "alg_name" in hparams:
            kw["alg"] = hparams["alg_name"]
        for k in ("lr", "cedit", "iedit", "cloc", "crank", "grad_clip", "margin_kl", "margin_kl_min", "lr_alpha"):
            if k in kw:
                kw[k] = float(kw[k])
        if kw.get("lr_lr") is not None:
            kw["lr_lr"] = float(kw["lr_lr"])
        return cls(**kw)


def ke_config_from_hparams(hparams: Mapping) -> KN.KEConfig:
    names = {f.name for f in dataclasses.fields(KN.KEConfig)}
    return KN.KEConfig(**{k: v for k, v in hparams.items() if k in names})


def resolve_sites(inner_params, params, stacks) -> tuple[str, ...]:
    """Our site names for EasyEdit parameter names (or sites), each checked against the model."""
    from mmedit_jax.convert.blip2 import easyedit_site

    if not inner_params:
        raise ValueError("inner_params is empty: name the matrices to edit (e.g. "
                         "opt_model.model.decoder.layers.31.fc1.weight)")
    sites = tuple(n if "/" in n else easyedit_site(n) for n in inner_params)
    for s in sites:
        P.kernel_of(params, s, stacks)  # KeyError naming the site if the model has no such module
        path, idx = P.resolve_site(s, stacks)
        leaf = P._get(params, path, s)
        if idx is not None and idx >= leaf.shape[0]:  # jax indexing would clamp silently
            raise KeyError(f"site {s!r}: the model has {leaf.shape[0]} stacked units under {'/'.join(path[:2])!r}")
    return sites


# --------------------------------------------------------------------------------------------------
# The editors as trainables: init, batched patches (training or eval mode), export as an `Editor`.


@dataclasses.dataclass(frozen=True)
class Trainable:
    """What the trainer needs of an editor.

    init(rng) -> (params, state); state is MEND's statistics ({} for KE).
    batch_patches(params, state, base_params, cases [E], training) -> (patches {site: LowRank [E, ...]}, state)
    editor(params, state) -> Editor (eval mode), editor_params(params, state) -> its `editor_params`.
    labels(params) -> optax labels ("net" / "edit_lr").
    save(dir, params, state) writes the editor for `evaluate --editor-ckpt`.
    """

    name: str
    spec: Any
    init: Callable
    batch_patches: Callable
    editor: Callable
    editor_params: Callable
    labels: Callable
    save: Callable


def mend_trainable(spec: MN.MendSpec, model: ModelFns) -> Trainable:
    from mmedit_jax.convert.mend_easyedit import save_mend
    from mmedit_jax.editors.mend import capture_factors, make_mend

    out_dims = {s: spec.shape(s)[1] for s in spec.sites}

    def batch_patches(params, stats, base_params, cases: Case, training: bool):
        factors = jax.vmap(lambda c: capture_factors(model, base_params, {}, c, spec.sites, out_dims))(cases)
        masks = {s: MN.nonzero_mask(u, d) for s, (u, d) in factors.items()}
        patches, stats = MN.mend_edit(spec, params, stats, factors, masks, training)
        return MN.as_low_rank(patches), stats

    def labels(params):
        return {"nets": jax.tree.map(lambda _: "net", params["nets"]),
                "edit_lrs": jax.tree.map(lambda _: "edit_lr", params["edit_lrs"])}

    return Trainable(
        name="mend", spec=spec, init=lambda rng: MN.init_mend(rng, spec), batch_patches=batch_patches,
        editor=lambda p, st: make_mend(spec, model, p, st), editor_params=lambda p, st: (p, st), labels=labels,
        save=lambda d, p, st: save_mend(d, spec, jax.device_get(p), jax.device_get(st), {"trained_by": "mmedit_jax"}),
    )


def ke_trainable(spec, model: ModelFns, embeddings: jax.Array) -> Trainable:
    from mmedit_jax.editors.ke import ke_case_patch, make_ke, save_ke

    def batch_patches(params, state, base_params, cases: Case, training: bool):
        del training  # KE has no running state
        patches = jax.vmap(lambda c: ke_case_patch(spec, model, params, base_params, c, {}))(cases)
        return patches, state

    return Trainable(
        name="ke", spec=spec, init=lambda rng: (KN.init_ke(rng, spec.cfg, spec.shape_dict, embeddings), {}),
        batch_patches=batch_patches, editor=lambda p, st: make_ke(spec, model, p), editor_params=lambda p, st: p,
        labels=lambda p: jax.tree.map(lambda _: "net", p), save=lambda d, p, st: save_ke(d, spec, jax.device_get(p)),
    )


# --------------------------------------------------------------------------------------------------
# The objective.


def case_losses(model: ModelFns, base_params, patch, case: Case, cfg: TrainConfig) -> dict:
    """The multimodal trainer's losses of ONE edited case (scalars), plus edit accuracies for the logs."""
    img = case.images
    post_edit = model.logits(base_params, patch, case.rephrase, img["edit"])
    post_image = model.logits(base_params, patch, case.image_rephrase, img["image_rephrase"])
    post_loc = model.logits(base_params, patch, case.loc, None)
    post_loc_image = model.logits(base_params, patch, case.loc_image, img["loc_image"])
    pre_loc = jax.lax.stop_gradient(model.logits(base_params, {}, case.loc, None))
    pre_loc_image = jax.lax.stop_gradient(model.logits(base_params, {}, case.loc_image, img["loc_image"]))
    l_edit = answer_nll(post_edit, case.rephrase.labels)
    l_image_edit = answer_nll(post_image, case.image_rephrase.labels)
    l_loc = kl_loc_loss(pre_loc[None], post_loc[None], case.loc.attention_mask[None])
    l_image_loc = kl_loc_loss(pre_loc_image[None], post_loc_image[None], case.loc_image.attention_mask[None])
    total = cfg.cedit * l_edit + cfg.iedit * l_image_edit + cfg.cloc * (l_loc + l_image_loc)
    rank = {}
    if cfg.crank:
        l_rank = (topk_rank_loss(pre_loc[None], post_loc[None], case.loc.attention_mask[None], cfg.rank_k)
                  + topk_rank_loss(pre_loc_image[None], post_loc_image[None], case.loc_image.attention_mask[None],
                                   cfg.rank_k))
        total = total + cfg.crank * l_rank
        rank = {"loss/rank_loc": l_rank}
    acc = lambda lg, seq: M.edit_accuracy(lg[None], seq.labels[None], cfg.exact_match)[0]  # noqa: E731
    return {"loss/total_edit": total, "loss/edit": l_edit, "loss/image_edit": l_image_edit, "loss/loc": l_loc,
            "loss/image_loc": l_image_loc, "edit/acc": acc(post_edit, case.rephrase),
            "image_rephrase/acc": acc(post_image, case.image_rephrase), **rank}


def batch_loss(trainable: Trainable, model: ModelFns, cfg: TrainConfig, params, state, base_params, cases: Case,
               weights: jax.Array, training: bool):
    """Weighted mean over the E cases of `case_losses` (weights 0 on padding rows). -> (loss, (state, metrics))."""
    patches, state = trainable.batch_patches(params, state, base_params, cases, training)
    per_case = jax.vmap(lambda p, c: case_losses(model, base_params, p, c, cfg))(patches, cases)
    w = weights.astype(jnp.float32) / jnp.maximum(jnp.sum(weights), 1.0)
    metrics = {k: jnp.sum(v * w) for k, v in per_case.items()}
    return metrics["loss/total_edit"], (state, metrics)


def lagrangian_loss(cfg: TrainConfig, metrics: dict, alpha: jax.Array, margin: jax.Array) -> jax.Array:
    """KE's constrained objective on the multimodal losses (design choice: the original's CR is the
    label-smoothed NLL of the edit and its paraphrase "view"; here CR is the trainer's generality terms,
    `cedit * NLL(rephrase) + iedit * NLL(image rephrase)`, without label smoothing, and the constraint is on
    the summed locality KL of the text and multimodal locality inputs)."""
    cr = cfg.cedit * metrics["loss/edit"] + cfg.iedit * metrics["loss/image_edit"]
    kl = metrics["loss/loc"] + metrics["loss/image_loc"]
    return KN.lagrangian(cr, {"kl": kl}, {"kl": alpha}, {"kl": margin})


# --------------------------------------------------------------------------------------------------
# Optimiser and the train step.


def make_optimizer(cfg: TrainConfig, labels) -> optax.GradientTransformation:
    """Clip (global norm, all trained parameters) -> Adam (`lr`; MEND's edit lrs `lr_lr`), every
    `accumulate_bs` steps on the mean gradient (`optax.MultiSteps`)."""
    lr_lr = cfg.lr if cfg.lr_lr is None else cfg.lr_lr
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.multi_transform({"net": optax.adam(cfg.lr), "edit_lr": optax.adam(lr_lr)}, labels),
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


def warm_start(ts: dict, tx: optax.GradientTransformation, params, editor_state) -> dict:
    """`params` / `editor_state` of a trained editor in place of a fresh state's, checked leaf by leaf."""
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


def make_train_step(trainable: Trainable, model: ModelFns, cfg: TrainConfig, tx: optax.GradientTransformation):
    """`train_step(ts, base_params, cases [E], weights [E]) -> (ts, metrics)`, jitted.

    A non-finite loss or gradient leaves params, optimiser state and statistics as they were and adds 1 to
    `ts["skipped"]`; `metrics["finite"]` says which happened.
    """

    lagrangian = cfg.objective == "lagrangian"
    alpha_tx = KN.multiplier_optimizer(cfg.lr_alpha)

    def objective(p, alpha, ts, base_params, cases, weights):
        loss, (state, metrics) = batch_loss(trainable, model, cfg, p, ts["editor_state"], base_params, cases,
                                            weights, True)
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


_PROGRAMS: dict = {}


def step_program(trainable: Trainable, model: ModelFns, cfg: TrainConfig):
    """`(tx, jitted train step)`, built once per (trainable, model, config) in this process, so a resumed or
    repeated `train` call reuses the compiled program."""
    key = (id(trainable), id(model), cfg)
    if key not in _PROGRAMS:
        tx = make_optimizer(cfg, trainable.labels(jax.eval_shape(trainable.init, jax.random.key(0))[0]))
        _PROGRAMS[key] = (trainable, model, tx, make_train_step(trainable, model, cfg, tx))
    return _PROGRAMS[key][2:]


def make_eval_loss(trainable: Trainable, model: ModelFns, cfg: TrainConfig):
    """Jitted validation objective, eval mode (statistics frozen): `(params, state, base, cases, w) -> metrics`."""

    def fn(params, state, base_params, cases, weights):
        return batch_loss(trainable, model, cfg, params, state, base_params, cases, weights, False)[1][1]

    return jax.jit(fn)


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


def take(tree, idx):
    return jax.tree.map(lambda a: a[idx], tree)


# --------------------------------------------------------------------------------------------------
# Validation: the evaluation harness's programs (five metrics) plus the objective for early stopping.


class Validator:
    """Validates on the first `val_steps` cases; the jitted programs are built once and reused."""

    def __init__(self, trainable: Trainable, model: ModelFns, cfg: TrainConfig, base_params, cases: Case,
                 meta, ts: dict):
        from mmedit_jax.eval import harness

        self.trainable, self.model, self.cfg, self.base = trainable, model, cfg, base_params
        n = min(cfg.val_steps, len(meta))
        self.cases, self.n = take(cases, np.arange(n)), n
        self.eval_loss = make_eval_loss(trainable, model, cfg)
        editor = trainable.editor(ts["params"], ts["editor_state"]) if trainable.name == "ke" else \
            self._editor_unchecked()
        self.pre_fn, self.edit_fn = harness.make_step_fns(editor, model, cfg.exact_match)
        self._pre = None

    def _editor_unchecked(self) -> Editor:
        # make_mend checks the statistics (host side); at construction time they may still be empty.
        from mmedit_jax.editors.mend import mend_case_patch

        spec = self.trainable.spec

        def edit(editor_params, params, case, prior):
            net, st = editor_params
            return mend_case_patch(spec, self.model, net, MN.frozen_site_stats(spec, st), params, case, prior)

        return Editor(name="mend", edit=edit)

    def __call__(self, ts: dict) -> dict:
        from mmedit_jax.eval import harness
        from mmedit_jax.eval.scoring import METRICS

        e = self.cfg.val_batch_size
        eparams = self.trainable.editor_params(ts["params"], ts["editor_state"])
        sums: dict[str, float] = {}
        rows = []
        pre_all = []
        for start in range(0, self.n, e):
            idx = np.arange(start, min(start + e, self.n))
            batch = harness._pad_batch(take(self.cases, idx), e)
            weights = np.arange(e) < len(idx)
            m = jax.device_get(self.eval_loss(ts["params"], ts["editor_state"], self.base, batch, weights))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
            if self._pre is None:
                pre = self.pre_fn(self.base, batch)
                pre_all.append(pre)
            else:
                pre = self._pre[start // e]
            post = jax.device_get(self.edit_fn(eparams, self.base, batch, pre))
            for j in range(len(idx)):
                rows.append({**{k: float(post[k][j]) for k in METRICS},
                             "pre": {k: float(np.asarray(pre[k])[j]) for k in ("reliability", "t_generality",
                                                                                "m_generality")}})
        if self._pre is None:
            self._pre = pre_all  # the unedited model's outputs do not change during training
        out = {f"{k}_val": v / self.n for k, v in sums.items()}
        summary = harness.summarize(rows)
        out.update({f"val/{k}": summary[k] for k in METRICS})
        out["val/mean"] = float(np.mean([summary[k] for k in METRICS]))  # one number to select editors by
        out.update({f"val/{k}": summary[k] for k in summary if k.startswith("pre_")})  # the unedited model
        return out


# --------------------------------------------------------------------------------------------------
# The loop.


def _metrics_rows(path: str, keep_through_step: int) -> None:
    """On resume: drop metric lines written after the restored checkpoint (the killed run's tail)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if int(row.get("step", 0)) <= keep_through_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(kept)


@dataclasses.dataclass
class TrainResult:
    state: dict
    history: list[dict]
    stopped_early: bool
    resumed_from: int | None


def train(trainable: Trainable, model: ModelFns, cfg: TrainConfig, base_params, train_cases: Case, n_train: int,
          out_dir: str | None, *, val_cases: Case | None = None, val_meta=None, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, resume: bool = True, mesh=None,
          tensorboard: bool = True, init: tuple | None = None) -> TrainResult:
    """Trains for `cfg.max_iters` steps (or until early stopping), resuming from `out_dir/checkpoints`.

    `train_cases`: host `Case` with a leading `[n_train]` axis (`eval.harness.make_cases`). Writes
    `out_dir/metrics.jsonl` (one line per step, validation lines with `"split": "val"`), the same scalars as
    TensorBoard events in `out_dir/tensorboard` (unless `tensorboard=False`), periodic checkpoints, and
    `out_dir/editor` (the editor at its best validation, for `evaluate --editor-ckpt`).
    `on_step(step, metrics)` is called after each step's metrics are fetched (tests use it to kill a run).

    With a `mesh` (`sharding.make_mesh`), each step's E edits are split over its "data" axis, the base weights
    are laid out over "model" by the partition rules, and the editor's state is replicated; the same jitted
    step runs (XLA inserts the reductions, e.g. for the shared statistics and the mean gradient).

    `init = (params, editor_state)` warm-starts from a trained editor (e.g. `load_mend`'s) with a fresh
    optimiser; a checkpoint in `out_dir` still takes precedence when resuming.
    """
    from mmedit_jax.checkpoint import CheckpointManager

    tx, step_fn = step_program(trainable, model, cfg)
    ts = init_train_state(trainable, tx, cfg.seed, cfg)
    if init is not None:
        ts = dict(ts, **warm_start(ts, tx, *init))
    mngr, resumed_from, metrics_path = None, None, None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        metrics_path = os.path.join(out_dir, "metrics.jsonl")
        mngr = CheckpointManager(os.path.join(out_dir, "checkpoints"), max_to_keep=cfg.max_to_keep,
                                 save_interval_steps=1)
        if resume and mngr.latest_step() is not None:
            ts, meta = mngr.restore(template=ts)
            # Orbax hands back arrays committed to a device; as uncommitted ones (like a fresh state's) they hit
            # the train step's compiled program instead of triggering a second compilation.
            ts = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), ts)
            resumed_from = int(ts["step"])
            if meta.get("n_train") != n_train or meta.get("batch_size") != cfg.batch_size:
                raise ValueError(f"checkpoint in {out_dir} was written for n_train={meta.get('n_train')}, "
                                 f"batch_size={meta.get('batch_size')}; this run has {n_train}, {cfg.batch_size}")
            _metrics_rows(metrics_path, resumed_from)
        elif not resume and os.path.exists(metrics_path):
            os.remove(metrics_path)

    place = lambda b: b  # noqa: E731
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as PS

        from mmedit_jax import sharding

        if cfg.batch_size % mesh.shape[sharding.DATA]:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the mesh's data axis "
                             f"({mesh.shape[sharding.DATA]})")
        base_params = sharding.shard_params(base_params, mesh)
        ts = jax.device_put(ts, NamedSharding(mesh, PS()))
        place = lambda b: jax.tree.map(  # noqa: E731
            lambda a: jax.device_put(a, sharding.batch_sharding(mesh, np.ndim(a))), b)

    validator = None
    if val_cases is not None and val_meta:
        validator = Validator(trainable, model, cfg, base_params, val_cases, val_meta, ts)

    def save(step, force=False):
        if mngr is None:
            return
        pos = step * cfg.batch_size
        meta = {"step": step, "epoch": pos // n_train, "offset": pos % n_train, "n_train": n_train,
                "batch_size": cfg.batch_size, "seed": cfg.seed, "skipped": int(ts["skipped"]),
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}}
        mngr.save(step, ts, meta, force=force)

    history: list[dict] = []
    pending: list[tuple[int, dict]] = []
    weights = np.ones((cfg.batch_size,), bool)
    bar = None
    start_step = int(ts["step"])
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_iters, initial=start_step, unit="step", desc=f"train {trainable.name}",
                   dynamic_ncols=True)
    out = None
    if metrics_path:
        out = MetricWriter(metrics_path, os.path.join(out_dir, "tensorboard") if tensorboard else None)
    stopped_early = False
    t_last, steps_last = time.perf_counter(), start_step

    def flush():
        nonlocal t_last, steps_last
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        rate = (pending[-1][0] - steps_last) / max(now - t_last, 1e-9)
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
            if bar:
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


def steps_per_epoch(n_train: int, batch_size: int) -> float:
    return math.ceil(n_train / batch_size)
