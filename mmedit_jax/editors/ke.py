"""KE (KnowledgeEditor, De Cao et al. 2021) as an editor: condition on the case's text, transform its gradient.

Per edit: one forward/backward on `case.edit` gives, per edited site, the layer inputs `u [L, in]` and the loss
gradient at the layer output `delta [L, out]` (`mend.capture_factors`: no dense weight gradient is formed), so
`grad_W = u.T @ delta`. The BiLSTM conditioner reads `case.cond_ids` ("{pred} >> {alt} || {src}") and, per
site, a weight-normalised head turns the condition into a rank-1 mask, a rank-1 offset and a gate
(`ke_net.ke_patch`): `delta_W = max_scale * sigmoid(eta) * (grad_W * mask + offset)`, kept factored as a
`LowRank` patch of rank `L + 1`. Everything has static shapes (padding is masked), so `edit` jits and vmaps.

Design choices where no reference exists (EasyEdit has no multimodal KE; the MMEdit paper's KE code is not
public; see `ke_net` for the conditioner's):
  * the gradient KE transforms is the one MEND's multimodal port uses: the answer-token mean NLL of
    `edit_inner` (image + prompt + new answer) through the full BLIP-2 forward, at the edited LM matrices;
    both factors are constants for the meta-gradient (the reference takes `autograd.grad` without
    `create_graph`);
  * padded rows are masked with the edit input's attention mask. Their `delta` is exactly zero anyway (no
    loss reaches them in a causal LM), so the mask only removes zero rows from the factors;
  * the update is added (`W + delta_W`), as in every KE implementation (there is no sign issue: the gate and
    the mask are learned, and the original trains with this sign);
  * the edited sites default to MEND's (`inner_params`), as the EFK port and VLKEB's KE yaml do.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mmedit_jax.case import Case
from mmedit_jax.editors import ke_net as KN
from mmedit_jax.editors.base import Editor
from mmedit_jax.editors.mend import capture_factors
from mmedit_jax.forward import ModelFns
from mmedit_jax.patch import as_low_rank


@dataclasses.dataclass(frozen=True)
class KESpec:
    """The static layout: KE sizes plus the edited sites and their Flax kernel shapes `(in, out)`, in
    inner-params order. Hashable (a static jit argument)."""

    cfg: KN.KEConfig
    sites: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]

    def shape(self, site: str) -> tuple[int, int]:
        return self.shapes[self.sites.index(site)]

    @property
    def shape_dict(self) -> dict[str, tuple[int, int]]:
        return dict(zip(self.sites, self.shapes))


def ke_spec(cfg: KN.KEConfig, shapes) -> KESpec:
    """From `{site: (in, out)}` (dict order kept)."""
    if not shapes:
        raise ValueError("ke_spec: no sites to edit")
    return KESpec(cfg, tuple(shapes), tuple((int(i), int(o)) for i, o in shapes.values()))


def capture(spec: KESpec, model: ModelFns, params, case: Case, prior: dict, prefix=None) -> tuple[dict, dict]:
    """`({site: (u [T, in], delta [T, out])}, {site: mask [T]})` of one case's edit loss (`capture_factors`)."""
    out_dims = {s: o for s, (_, o) in zip(spec.sites, spec.shapes)}
    factors = capture_factors(model, params, prior, case, spec.sites, out_dims, prefix)
    mask = case.edit.attention_mask.astype(jnp.float32)
    # A site that saw only the answer rows has its unused rows zeroed already; its other rows are all real.
    return factors, {s: mask if u.shape[0] == mask.shape[0] else jnp.ones(u.shape[:1], jnp.float32)
                     for s, (u, _) in factors.items()}


def ke_case_patch(spec: KESpec, model: ModelFns, ke_params, params, case: Case, prior: dict, prefix=None) -> dict:
    """The `{site: LowRank}` patch of one edit (rank `T + 1` per site, T as in `capture_factors`)."""
    factors, masks = capture(spec, model, params, case, prior, prefix)
    patches = KN.ke_patches(spec.cfg, ke_params, case.cond_ids, case.cond_mask, factors, masks)
    return as_low_rank(patches)


def make_ke(spec: KESpec, model: ModelFns, ke_params) -> Editor:
    """A trained (or fresh) KE as an `Editor`; `editor_params` is the KE parameter tree (`ke_net.init_ke`)."""
    missing = [s for s in spec.sites if s not in ke_params["heads"]]
    if missing:
        raise KeyError(f"KE parameters have no head for sites {missing} (have {sorted(ke_params['heads'])})")

    def edit(editor_params, params, case: Case, prior: dict, prefix=None) -> dict:
        return ke_case_patch(spec, model, editor_params, params, case, prior, prefix)

    return Editor(name="ke", edit=edit, editor_params=ke_params, fns=model, hparams=spec, resumes=True)

