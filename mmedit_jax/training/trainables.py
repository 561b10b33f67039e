"""What the trainer needs of an editor, for MEND and KE: a `Trainable` (init, batched patches in training or eval
mode, the optax labels, the `Editor` it is at any point, saving it), built from a model and EasyEdit hparams.

MEND's `batch_patches` in training mode first merges the whole batch's factors into its running input statistics
(then normalises with them); in eval mode the statistics stay frozen. Deviation, stated: statistics are merged over
the E edits of a step at once (the reference, at batch 1, merges one edit per iteration; with E = 1 they agree).
KE conditions each case's patch on its `cond` tokens and has no running state (`{}`). SERAC's "patches" are its
memories (`editors.serac`), each with the editor's networks, broadcast over the E edits of a step (the objective
vmaps over patches; at the reference's batch size 1 that is one copy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp

from mmedit_jax.case import Case
from mmedit_jax.editors import io
from mmedit_jax.editors import ke_net as KN
from mmedit_jax.editors import mend_net as MN
from mmedit_jax.editors import serac_net as SN
from mmedit_jax.editors.base import Editor
from mmedit_jax.editors.ke import KESpec, ke_case_patch, ke_spec, make_ke
from mmedit_jax.editors.mend import capture_factors, make_mend
from mmedit_jax.editors.serac import SeracFns, SeracSpec, make_serac
from mmedit_jax.forward import ModelFns, fns_for
from mmedit_jax.models.config import DistilBertConfig
from mmedit_jax.patch import as_low_rank
from mmedit_jax.sites import kernel_of, resolve_sites
from mmedit_jax.training.config import TrainConfig, ke_config_from_hparams

KINDS = ("mend", "ke", "serac")  # the editors meta-training trains


@dataclasses.dataclass(frozen=True)
class Trainable:
    """An editor as the trainer sees it (hashable: a static argument of jitted programs).

    fns: the model's single-example forward the editor runs (and the objective scores with).
    init(rng) -> (params, state); state is MEND's statistics ({} for KE).
    batch_patches(params, state, base_params, cases [E], training) -> (patches {site: LowRank [E, ...]}, state).
    make_editor(params, state, check) -> Editor (eval mode); use `editor()`.
    labels(params) -> optax labels ("net" / "edit_lr").
    save(dir, params, state) writes the editor for `evaluate --editor-ckpt` (`editors.io`).
    fresh_ok: top-level parameter groups of a switch (SERAC's `scope_image`) that a warm start may lack (they keep
    their initial values) or bring where this editor has none (they are dropped).
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
    fresh_ok: tuple[str, ...] = ()
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


def serac_trainable(spec: SeracSpec, fns: SeracFns, counterfactual_params=None, classifier_params=None) -> Trainable:
    """`counterfactual_params` / `classifier_params`: pretrained starting points (random without them)."""

    def batch_patches(params, state, base_params, cases: Case, training: bool):
        del training

        def write(c):
            image = fns.image_embeds(base_params, c.image("edit")) if spec.cfg.scope_image else None
            return SN.write_memory(spec.cfg, params, c.edit, image)

        memory = jax.vmap(write)(cases)
        e = memory.valid.shape[0]
        net = jax.tree.map(lambda x: jnp.broadcast_to(x, (e, *x.shape)), params)
        return {"net": net, "memory": memory}, state

    def init(rng):
        return SN.init_serac(rng, spec.cfg, counterfactual_params, classifier_params), {}

    return Trainable(
        name="serac", spec=spec, fns=fns, init=init, batch_patches=batch_patches,
        make_editor=lambda p, st, check: make_serac(spec.cfg, fns.base, p),
        labels=lambda p: serac_labels(spec.cfg, p),
        save=lambda d, p, st: io.save_serac(d, spec.cfg, jax.device_get(p)), fresh_ok=("scope_image",),
    )


def serac_labels(cfg: SN.SeracConfig, params: dict) -> dict:
    """Optax labels: "net" for what trains; with `cfg.trained_layers`, "frozen" (no update, no Adam state) on the
    counterfactual's leaves outside its layer stack. The stack itself stays "net": its frozen layers get exactly
    zero gradients (`serac_net.counterfactual_logits`), so Adam leaves them unchanged."""
    labels = jax.tree.map(lambda _: "net", params)
    if cfg.trained_layers is not None:
        labels["counterfactual"] = {k: (v if k == "layers" else jax.tree.map(lambda _: "frozen", v))
                                    for k, v in labels["counterfactual"].items()}
    return labels


def serac_config_from_hparams(model, hparams: dict, classifier=None,
                              image_wrap: tuple[int, int] = (0, 0)) -> SN.SeracConfig:
    """SERAC's layout for a `Blip2Model` or `MiniGPT4Model`: the counterfactual model's config is the base language
    model's (OPT or LLaMA; the built-in default: a copy of it, as EasyEdit's `opt-125m` shares BLIP-2 OPT's
    tokenizer and its MiniGPT-4 SERAC copies the Vicuna itself), `image_wrap` the wrapper token counts around the
    image slots (`pipeline.image_wrap`; MiniGPT-4's prompt pieces), the classifier a
    DistilBERT over the base tokenizer's ids (`cls_dim`, `cls_layers`, `cls_heads`: our keys, for the small
    worlds) unless `classifier` is given. Routing from EasyEdit's keys: hard only when `supervised` and not
    `soft_weighting`. What of the counterfactual trains: `cntr_trained_layers` (our key: a count of last layers, or
    `all`), by default EasyEdit's choice, only the last layer for `model_name: minigpt4` (its '31' name filter on
    Vicuna's 32 layers) and everything otherwise. `scope_image` / `scope_image_dim` / `scope_key` (ours): the
    image-aware scope and what the memory key reads (`serac_net`)."""
    text = model.config.text
    if int(hparams.get("dist_heads", 1)) != 1:
        raise ValueError("SERAC: dist_heads > 1 is not implemented (every EasyEdit config uses 1)")
    if hparams.get("cross_attend"):
        raise ValueError("SERAC: cross_attend (the FNLI classifier) is not implemented")
    if classifier is None:
        dim = int(hparams.get("cls_dim", 64))
        classifier = DistilBertConfig(
            vocab_size=text.vocab_size, max_position_embeddings=text.max_position_embeddings,
            n_layers=int(hparams.get("cls_layers", 2)), n_heads=int(hparams.get("cls_heads", 4)), dim=dim,
            hidden_dim=4 * dim, pad_token_id=text.pad_token_id)
    trained = hparams.get("cntr_trained_layers", 1 if hparams.get("model_name") == "minigpt4" else None)
    return SN.SeracConfig(
        trained_layers=None if trained in (None, "all") else int(trained),
        classifier=classifier, counterfactual=text, image_width=text.hidden_size,
        image_token_id=int(model.config.image_token_index), image_wrap=tuple(int(n) for n in image_wrap),
        hard_routing=bool(hparams.get("supervised", False)) and not bool(hparams.get("soft_weighting", False)),
        square=bool(hparams.get("square", True)), cos=bool(hparams.get("cos", False)),
        bound_embeds=bool(hparams.get("bound_embeds", False)), scope_query=str(hparams.get("scope_query", "prompt")),
        scope_image=bool(hparams.get("scope_image", False)), scope_image_dim=int(hparams.get("scope_image_dim", 32)),
        scope_key=str(hparams.get("scope_key", "text_input")))


def build_trainable(kind: str, model, hparams: dict, cfg: TrainConfig, feature_cache: bool = True,
                    image_wrap: tuple[int, int] = (0, 0)) -> Trainable:
    """A MEND, KE or SERAC trainable for a `Blip2Model` (SERAC: `serac_config_from_hparams` with `image_wrap`,
    the counterfactual model starting from the base language model's weights). MEND / KE: their sites from
    `cfg.inner_params` (EasyEdit names or ours, checked against the model), its sizes from `hparams`, its forward from
    `forward.fns_for` (pixels when a site is on the vision side or `feature_cache` is off, cached image
    embeddings otherwise)."""
    if kind == "serac":
        spec = SeracSpec(serac_config_from_hparams(model, hparams, image_wrap=image_wrap))
        return serac_trainable(spec, SeracFns(fns_for(model, (), feature_cache), spec.cfg),
                               counterfactual_params=model.params["language_model"])
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
    """`(params, editor_state)` of a saved MEND, KE or SERAC editor (`--init-editor`); with `kind`, the saved
    editor must be of that kind."""
    saved, _, params, state = io.load_state(path)
    if kind is not None and saved != kind:
        raise ValueError(f"{path} holds a {saved.upper()} editor, not {kind.upper()}")
    return params, state
