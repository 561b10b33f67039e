"""SERAC (Mitchell et al. 2022; EasyEdit's `SERAC_MULTI`) as an editor: the edit is a value, the memory.

`edit(editor_params, base_params, case, prior)` writes `case.edit` into a capacity-1 memory (`serac_net.Memory`,
the classifier embedding computed once) and returns the patch `{"net": editor_params, "memory": memory}`
(`prior`, a patch of this form, is appended to: sequential editing). No base weight changes.

`SeracFns` is the `ModelFns` the editor runs and scoring must run: its `forward(params, patch, ...)` is the base
model's forward exactly when `patch` is empty (so the pre-edit outputs are the base model's), and SERAC's routed
output when `patch` is a SERAC patch (`serac_net.serac_logits`). `params` stay the base model's: the editor's
networks travel in the patch. Under the harness's `vmap` the edit and its scoring run in one traced function, so
`net` stays unbatched there (only the memory gains the `[E]` axis); the trainer broadcasts it (`trainables`).
It has no frozen-prefix split (`supports_prefix` False) and no taps.
"""

from __future__ import annotations

import dataclasses

import jax

from mmedit_jax.case import Case, Seq
from mmedit_jax.editors import serac_net as SN
from mmedit_jax.editors.base import Editor
from mmedit_jax.forward import Blip2Fns, RoutedFns


@dataclasses.dataclass(frozen=True)
class SeracSpec:
    """SERAC as the trainer's `spec`: its config; no edited sites."""

    cfg: SN.SeracConfig
    sites: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SeracFns(RoutedFns):
    """The base model's forward, routed through a SERAC memory when the patch holds one (`base`: a `Blip2Fns`)."""

    cfg: SN.SeracConfig

    def forward(self, params, patch, seq: Seq, image, taps=None, rows=None):
        if not patch:
            return self.base.forward(params, patch, seq, image, taps=taps, rows=rows)
        if taps:
            raise ValueError("SeracFns: taps are not available on a SERAC-edited model")
        base_logits = jax.lax.stop_gradient(self.base.logits(params, {}, seq, image))  # the reference: no_grad
        embeds = image
        if image is not None and self.base.uses_pixels:
            embeds = self.base.encode(params, {}, image[None])[0]
        logits = SN.serac_logits(self.cfg, patch["net"], patch["memory"], seq, embeds, base_logits)
        return (logits if rows is None else logits[rows]), {}

    def route(self, params, patch, seq: Seq, image) -> tuple[jax.Array, jax.Array]:
        """`(s*, c*)` of one query against the patch's memory."""
        del params, image
        scores = SN.scope_scores(self.cfg, patch["net"], patch["memory"], seq)
        return SN.route(scores)


def with_memory(net: dict, memory: SN.Memory) -> dict:
    """The patch `SeracFns` reads: the editor's networks and a memory."""
    return {"net": net, "memory": memory}


def serac_patch(cfg: SN.SeracConfig, net: dict, case: Case, prior: dict) -> dict:
    """The patch of one edit: `{"net", "memory"}`, the memory `prior`'s (if any) plus this edit's slot."""
    memory = SN.write_memory(cfg, net, case.edit)
    if prior:
        memory = SN.append(prior["memory"], memory)
    return with_memory(net, memory)


def make_serac(cfg: SN.SeracConfig, base: Blip2Fns, net: dict) -> Editor:
    """A trained (or fresh) SERAC as an `Editor`; `editor_params` = `net` (`serac_net.init_serac`)."""
    missing = {"classifier", "counterfactual", "projection"} - set(net)
    if missing:
        raise KeyError(f"SERAC parameters lack {sorted(missing)}")

    def edit(editor_params, params, case: Case, prior: dict, prefix=None) -> dict:
        del params, prefix
        return serac_patch(cfg, editor_params, case, prior)

    return Editor(name="serac", edit=edit, editor_params=net, fns=SeracFns(base, cfg), hparams=SeracSpec(cfg))
