"""MEND as an editor: one forward/backward on the edit example, then the learned gradient transform.

Per edited site the forward pass records the layer input `u [L, in]` (a tap) and the loss gradient at the layer
output `delta [L, out]` (the gradient with respect to the tap's zero perturbation), with no dense weight
gradient formed and autodiff stopping at the earliest edited layer. Rows are kept as the reference keeps them
(`any(u) & any(delta)`), masked rather than dropped. `mend_net` turns `(u, delta)` into the factored patch
`W - edit_lr * u~.T @ delta~` (sign per `MendConfig.descent`). Both factors are constants for the
meta-gradient (stop_gradient), as in the reference's first-order treatment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmedit_jax.case import Case, answer_rows_of
from mmedit_jax.editors import mend_net as MN
from mmedit_jax.editors.base import Editor
from mmedit_jax.forward import ModelFns, teacher_forced
from mmedit_jax.losses import answer_nll
from mmedit_jax.patch import as_low_rank


def capture_factors(model: ModelFns, params, prior: dict, case: Case, sites, out_dims: dict, prefix=None):
    """`{site: (u [T, in], delta [T, out])}` of the edit loss on `case.edit`, through the model with `prior`.

    T = L, except where `case.edit` carries `answer_rows` and the site's layer ran on those R rows only (the last
    layer's row-wise linears: their delta is zero at every other position, as only the answer positions' logits
    enter the loss): there T = R, with unused rows zeroed (dropped by `nonzero_mask`). `prefix` `(h, k)`: start
    from the edit input's hidden states entering layer k (`teacher_forced`).
    """
    length = case.edit.input_ids.shape[-1]
    eps = {s: jnp.zeros((1, length, out_dims[s]), jnp.float32) for s in sites}

    def loss(eps):
        logits, labels, captured = teacher_forced(model, params, prior, case.edit, case.images["edit"], taps=eps,
                                                  prefix=prefix)
        return answer_nll(logits, labels), captured

    delta, captured = jax.grad(loss, has_aux=True)(eps)
    out = {}
    for s in sites:
        u, d = captured[s], delta[s][0]
        if u.shape[0] != d.shape[0]:  # the site saw the answer rows only
            rows, valid = answer_rows_of(case.edit)
            u, d = u * valid[:, None].astype(u.dtype), d[rows]
        out[s] = jax.lax.stop_gradient((u, d))
    return out


def mend_case_patch(spec: MN.MendSpec, model: ModelFns, mend_params, site_stats, params, case: Case, prior: dict,
                    prefix=None):
    """The patch of one edit (eval-mode statistics `site_stats`)."""
    out_dims = {s: spec.shape(s)[1] for s in spec.sites}
    factors = capture_factors(model, params, prior, case, spec.sites, out_dims, prefix)
    masks = {s: MN.nonzero_mask(u, d) for s, (u, d) in factors.items()}
    return as_low_rank(MN.mend_patches(spec, mend_params, site_stats, factors, masks))


def make_mend(spec: MN.MendSpec, model: ModelFns, mend_params, stats, check: bool = True) -> Editor:
    """A trained (or freshly initialised) MEND as an `Editor`; `editor_params = (mend_params, stats)`.

    `check`: verify on the host that the statistics hold data (off for an editor still being trained, whose
    statistics are traced values or still empty)."""
    if check:
        MN.check_stats(spec, stats)

    def edit(editor_params, params, case: Case, prior: dict, prefix=None) -> dict:
        net, st = editor_params
        return mend_case_patch(spec, model, net, MN.frozen_site_stats(spec, st), params, case, prior, prefix)

    return Editor(name="mend", edit=edit, editor_params=(mend_params, stats), fns=model, hparams=spec,
                  resumes=True)
