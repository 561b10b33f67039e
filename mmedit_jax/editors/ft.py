"""FT-L and FT-V: the fine-tuning baselines of MMEdit, as dense patches.

Reference facts (EasyEdit has no multimodal FT; the public one is VLKEB's `trainer/algs/FT.py` with
`hparams/FT/blip2.yaml`): `num_steps` steps of `torch.optim.AdamW(lr=edit_lr)` (so betas 0.9/0.999, eps 1e-8,
weight decay 0.01, decoupled) on the mean NLL of the edit example's answer tokens, updating only `inner_params`:
FT-L = `opt_model.model.decoder.layers.31.{fc1,fc2}.weight`, FT-V = every parameter whose name contains `Qformer`.

Here the trainable weights are linear kernels, each a `Dense` delta on a site, optimised from zero, so the
base weights are never written and E edits vmap with E small optimiser states. Deviation, stated: FT-V tunes
the Q-Former's linear kernels only (the reference also tunes its biases and LayerNorms); the reference trains
with the Q-Former's dropout active, here dropout is off (deterministic edits).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmedit_jax import patch as P
from mmedit_jax.case import Case
from mmedit_jax.editors.base import Editor
from mmedit_jax.forward import ModelFns, teacher_forced
from mmedit_jax.losses import answer_nll
from mmedit_jax.sites import kernel_of, kernel_paths


@dataclasses.dataclass(frozen=True)
class FTConfig:
    """Hyperparameters, named as in the reference yaml."""

    inner_params: tuple[str, ...]  # sites (or EasyEdit names, translated by the caller)
    num_steps: int = 15
    edit_lr: float = 2e-4
    weight_decay: float = 0.01  # torch AdamW's default, which the reference does not override
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


def ft_l_sites(num_layers: int, layers: tuple[int, ...] | None = None,
               modules: tuple[str, ...] = ("fc1", "fc2")) -> tuple[str, ...]:
    """FT-L's default sites: the MLP of the last layer (reference: fc1, fc2 of layer 31 of OPT-2.7B)."""
    layers = layers if layers is not None else (num_layers - 1,)
    return tuple(f"language_model/layers/{i}/{n}" for i in layers for n in modules)


def mlp_modules(params) -> tuple[str, ...]:
    """The MLP linears of the language model's layers: OPT's `fc1, fc2`, or LLaMA's `mlp/up_proj, mlp/down_proj`
    (the two EasyEdit's MiniGPT-4 MEND edits)."""
    layers = params["language_model"]["layers"]
    return ("fc1", "fc2") if "fc1" in layers else ("mlp/up_proj", "mlp/down_proj")


def ft_v_sites(params, stacks) -> tuple[str, ...]:
    """FT-V's default sites: every linear layer of the Q-Former."""
    per_unit = stacks["qformer/layers"]
    layers = params["qformer"]["layers"]
    num_units = jax.tree.leaves(layers)[0].shape[0]
    sites = []
    for i in range(num_units * per_unit):
        sub = layers if per_unit == 1 else layers[str(i % per_unit)]
        for path in kernel_paths(sub):
            sites.append(f"qformer/layers/{i}/{path}")
    return tuple(sites)



def make_ft(name: str, model: ModelFns, cfg: FTConfig, base_params, stacks) -> Editor:
    """Builds an FT editor; `edit` runs `num_steps` AdamW steps on the edit example inside one traced loop."""
    for s in cfg.inner_params:  # fail now, with the site's name, rather than inside a trace
        kernel_of(base_params, s, stacks)

    def edit(editor_params, params, case: Case, prior: dict, prefix=None) -> dict:
        del editor_params
        # The weights the optimiser sees are W + prior + delta; decay acts on all of it (decoupled AdamW).
        base_w = {s: kernel_of(params, s, stacks) for s in cfg.inner_params}
        if prior:
            base_w = {s: w + prior[s].dense() if s in prior else w for s, w in base_w.items()}

        def loss(delta):
            patch = P.compose(prior, {s: P.Dense(d) for s, d in delta.items()}) if prior else \
                {s: P.Dense(d) for s, d in delta.items()}
            logits, labels, _ = teacher_forced(model, params, patch, case.edit, case.images["edit"], prefix=prefix)
            return answer_nll(logits, labels)

        def step(carry, t):
            delta, m, v = carry
            g = jax.grad(loss)(delta)
            m = jax.tree.map(lambda m_, g_: cfg.beta1 * m_ + (1 - cfg.beta1) * g_, m, g)
            v = jax.tree.map(lambda v_, g_: cfg.beta2 * v_ + (1 - cfg.beta2) * g_ * g_, v, g)
            c1, c2 = 1 - cfg.beta1 ** (t + 1), 1 - cfg.beta2 ** (t + 1)

            def upd(s):
                w = base_w[s] + delta[s]
                adam = (m[s] / c1) / (jnp.sqrt(v[s] / c2) + cfg.eps)
                return delta[s] - cfg.edit_lr * (adam + cfg.weight_decay * w)

            return ({s: upd(s) for s in delta}, m, v), None

        zeros = {s: jnp.zeros_like(k) for s, k in base_w.items()}
        (delta, _, _), _ = jax.lax.scan(step, (zeros, zeros, zeros), jnp.arange(cfg.num_steps))
        return {s: P.Dense(d) for s, d in delta.items()}

    return Editor(name=name, edit=edit, fns=model, hparams=cfg, resumes=True)
