"""SERAC (Mitchell et al. 2022; EasyEdit's `SERAC_MULTI`) as an editor: the edit is a value, the memory.

`edit(editor_params, base_params, case, prior)` writes `case.edit` into a capacity-1 memory (`serac_net.Memory`,
the classifier embedding computed once) and returns the patch `{"net": editor_params, "memory": memory}`
(`prior`, a patch of this form, is appended to: sequential editing). No base weight changes.

`SeracFns` is the `ModelFns` the editor runs and scoring must run: its `forward(params, patch, ...)` is the base
model's forward exactly when `patch` is empty (so the pre-edit outputs are the base model's), and SERAC's routed
output when `patch` is a SERAC patch (`serac_net.serac_logits`). `params` stay the base model's: the editor's
networks travel in the patch. Under the harness's `vmap` the edit and its scoring run in one traced function, so
`net` stays unbatched there (only the memory gains the `[E]` axis); the trainer broadcasts it (`trainables`).
It has no frozen-prefix split (`supports_prefix` False) and no taps. With `scope_image` the edit and the routing
also read the inputs' images (`SeracFns.image_embeds`).
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
        embeds = self.image_embeds(params, image)
        logits = SN.serac_logits(self.cfg, patch["net"], patch["memory"], seq, embeds, base_logits)
        return (logits if rows is None else logits[rows]), {}

    def image_embeds(self, params, image):
        """The base model's embeddings `[nq, E_base]` of one input's image (pixels encoded; cached features as
        they are; None for a text-only input)."""
        if image is not None and self.base.uses_pixels:
            return self.base.encode(params, {}, image[None])[0]
        return image

    def route(self, params, patch, seq: Seq, image) -> tuple[jax.Array, jax.Array]:
        """`(s*, c*)` of one query against the patch's memory."""
        embeds = self.image_embeds(params, image) if self.cfg.scope_image else None  # the text alone otherwise
        return SN.route(SN.scope_scores(self.cfg, patch["net"], patch["memory"], seq, embeds))


def with_memory(net: dict, memory: SN.Memory) -> dict:
    """The patch `SeracFns` reads: the editor's networks and a memory."""
    return {"net": net, "memory": memory}


def serac_patch(cfg: SN.SeracConfig, net: dict, case: Case, prior: dict, image=None) -> dict:
    """The patch of one edit: `{"net", "memory"}`, the memory `prior`'s (if any) plus this edit's slot (`image`:
    the base model's embeddings of the edit's image, read with `scope_image`)."""
    memory = SN.write_memory(cfg, net, case.edit, image)
    if prior:
        memory = SN.append(prior["memory"], memory)
    return with_memory(net, memory)


def make_serac(cfg: SN.SeracConfig, base: Blip2Fns, net: dict) -> Editor:
    """A trained (or fresh) SERAC as an `Editor`; `editor_params` = `net` (`serac_net.init_serac`)."""
    missing = {"classifier", "counterfactual", "projection", *(("scope_image",) if cfg.scope_image else ())} - set(net)
    if missing:
        raise KeyError(f"SERAC parameters lack {sorted(missing)}")

    fns = SeracFns(base, cfg)

    def edit(editor_params, params, case: Case, prior: dict, prefix=None) -> dict:
        del prefix
        image = fns.image_embeds(params, case.image("edit")) if cfg.scope_image else None
        return serac_patch(cfg, editor_params, case, prior, image)

    return Editor(name="serac", edit=edit, editor_params=net, fns=fns, hparams=SeracSpec(cfg))
