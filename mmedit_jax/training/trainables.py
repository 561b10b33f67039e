"""What the trainer needs of an editor, for MEND and KE: a `Trainable` (init, batched patches in training or eval
mode, the optax labels, the `Editor` it is at any point, saving it), built from a model and EasyEdit hparams.

MEND's `batch_patches` in training mode first merges the whole batch's factors into its running input statistics
(then normalises with them); in eval mode the statistics stay frozen. Deviation, stated: statistics are merged over
the E edits of a step at once (the reference, at batch 1, merges one edit per iteration; with E = 1 they agree).
KE conditions each case's patch on its `cond` tokens and has no running state (`{}`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax

from mmedit_jax.case import Case
from mmedit_jax.editors import io
from mmedit_jax.editors import ke_net as KN
from mmedit_jax.editors import mend_net as MN
from mmedit_jax.editors.base import Editor
from mmedit_jax.editors.ke import KESpec, ke_case_patch, ke_spec, make_ke
from mmedit_jax.editors.mend import capture_factors, make_mend
from mmedit_jax.forward import ModelFns, fns_for
from mmedit_jax.patch import as_low_rank
from mmedit_jax.sites import kernel_of, resolve_sites
from mmedit_jax.training.config import TrainConfig, ke_config_from_hparams

KINDS = ("mend", "ke")  # the editors meta-training trains


@dataclasses.dataclass(frozen=True)
class Trainable:
    """An editor as the trainer sees it (hashable: a static argument of jitted programs).

    fns: the model's single-example forward the editor runs (and the objective scores with).
    init(rng) -> (params, state); state is MEND's statistics ({} for KE).
    batch_patches(params, state, base_params, cases [E], training) -> (patches {site: LowRank [E, ...]}, state).
    make_editor(params, state, check) -> Editor (eval mode); use `editor()`.
    labels(params) -> optax labels ("net" / "edit_lr").
    save(dir, params, state) writes the editor for `evaluate --editor-ckpt` (`editors.io`).
    The compiled programs built for this trainable (`training.step.step_program`, ...) are cached on it, so a
    resumed or repeated `train` call reuses them; `dataclasses.replace` gives a copy with an empty cache.
    """

    name: str
    spec: Any
    fns: ModelFns
    init: Callable
    batch_patches: Callable
    make_editor: Callable
    labels: Callable
    save: Callable
    programs: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def editor(self, params, state, check: bool = True) -> Editor:
        """The editor at `(params, state)` as the harness runs it; `editor.editor_params` is what its `edit`
        takes. `check=False` skips host-side checks of the state (an editor still being trained)."""
        return self.make_editor(params, state, check)

    def program(self, key: Hashable, build: Callable[[], Any]):
        """`build()`, once per `key` for this trainable."""
        if key not in self.programs:
            self.programs[key] = build()
        return self.programs[key]


def mend_trainable(spec: MN.MendSpec, fns: ModelFns) -> Trainable:
    out_dims = {s: spec.shape(s)[1] for s in spec.sites}

    def batch_patches(params, stats, base_params, cases: Case, training: bool):
        factors = jax.vmap(lambda c: capture_factors(fns, base_params, {}, c, spec.sites, out_dims))(cases)
        masks = {s: MN.nonzero_mask(u, d) for s, (u, d) in factors.items()}
        patches, stats = MN.mend_edit(spec, params, stats, factors, masks, training)
        return as_low_rank(patches), stats

    def labels(params):
        return {"nets": jax.tree.map(lambda _: "net", params["nets"]),
                "edit_lrs": jax.tree.map(lambda _: "edit_lr", params["edit_lrs"])}

    return Trainable(
        name="mend", spec=spec, fns=fns, init=lambda rng: MN.init_mend(rng, spec), batch_patches=batch_patches,
        make_editor=lambda p, st, check: make_mend(spec, fns, p, st, check=check), labels=labels,
        save=lambda d, p, st: io.save_mend(d, spec, jax.device_get(p), jax.device_get(st),
                                           {"trained_by": "mmedit_jax"}),
    )


def ke_trainable(spec: KESpec, fns: ModelFns, embeddings: jax.Array) -> Trainable:
    """`embeddings`: the language model's token embedding table (KE's condition encoder starts from it)."""

    def batch_patches(params, state, base_params, cases: Case, training: bool):
        del training  # KE has no running state
        patches = jax.vmap(lambda c: ke_case_patch(spec, fns, params, base_params, c, {}))(cases)
        return patches, state

    return Trainable(
        name="ke", spec=spec, fns=fns, init=lambda rng: (KN.init_ke(rng, spec.cfg, spec.shape_dict, embeddings), {}),
        batch_patches=batch_patches, make_editor=lambda p, st, check: make_ke(spec, fns, p),
        labels=lambda p: jax.tree.map(lambda _: "net", p), save=lambda d, p, st: io.save_ke(d, spec, jax.device_get(p)),
    )


def build_trainable(kind: str, model, hparams: dict, cfg: TrainConfig, feature_cache: bool = True) -> Trainable:
    """A MEND or KE trainable for a `Blip2Model`: its sites from `cfg.inner_params` (EasyEdit names or ours,
    checked against the model), its sizes from `hparams`, its forward from `forward.fns_for` (pixels when a
    site is on the vision side or `feature_cache` is off, cached image embeddings otherwise)."""
    sites = resolve_sites(cfg.inner_params, model.params, model.stacks)
    shapes = {s: tuple(kernel_of(model.params, s, model.stacks).shape) for s in sites}
    fns = fns_for(model, sites, feature_cache)
    if kind == "mend":
        return mend_trainable(MN.mend_spec(MN.MendConfig.from_hparams(hparams), shapes), fns)
    if kind == "ke":
        emb = model.params["language_model"]["embed_tokens"]["embedding"]
        return ke_trainable(ke_spec(ke_config_from_hparams(hparams), shapes), fns, emb)
    raise ValueError(f"editor {kind!r}: expected one of {', '.join(KINDS)}")


def load_editor_state(path: str, kind: str | None = None) -> tuple[dict, dict]:
    """`(params, editor_state)` of a saved MEND or KE editor (`--init-editor`); with `kind`, the saved editor must
    be of that kind."""
    saved, _, params, state = io.load_state(path)
    if kind is not None and saved != kind:
        raise ValueError(f"{path} holds a {saved.upper()} editor, not {kind.upper()}")
    return params, state
