"""EasyEdit MEND checkpoint import: a random reference-layout state dict, converted, against PyTorch math."""

import numpy as np
import pytest
import torch

from mmedit_jax.convert import mend_easyedit as me
from mmedit_jax.editors import mend_net as mn
from mmedit_jax.editors.io import load_mend
from mmedit_jax.sites import easyedit_site

IN, OUT, MID, T = 6, 10, 4, 7
INNER = [f"opt_model.model.decoder.layers.{i}.{fc}.weight" for i in (1, 2) for fc in ("fc1", "fc2")]


def _lrlinear(g, prefix, width, n_modes, sd):
    sd[prefix + "u"] = torch.randn(width, MID, generator=g) * 0.3
    sd[prefix + "v"] = torch.randn(MID, width, generator=g)
    sd[prefix + "bias"] = torch.randn(width, generator=g) * 0.1
    if n_modes:
        sd[prefix + "mode_scale.weight"] = 1 + 0.3 * torch.randn(n_modes, width, generator=g)
        sd[prefix + "mode_shift.weight"] = 0.1 * torch.randn(n_modes, width, generator=g)


def _buffers(g, prefix, x_dim, d_dim, sd, k=50.0):
    for side, dim in (("u", x_dim), ("v", d_dim)):
        sd[f"{prefix}{side}_mean"] = torch.randn(dim, generator=g)
        sd[f"{prefix}{side}_s"] = torch.rand(dim, generator=g) * k + 1
        sd[f"{prefix}{side}_std"] = (sd[f"{prefix}{side}_s"] / (k - 1)) ** 0.5
    sd[prefix + "k"] = torch.tensor([k])


def reference_state_dict(combine=True, shared=True, n_hidden=1, seed=0):
    """A state dict laid out like EasyEdit's `MEND.state_dict()` (base model removed), random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    if shared:
        groups = {f"({IN}, {OUT})": (IN, OUT, 2), f"({OUT}, {IN})": (OUT, IN, 2)}
    else:
        groups = {n.replace(".", "#"): ((IN, OUT, None) if "fc1" in n else (OUT, IN, None)) for n in INNER}
    for name, (x_dim, d_dim, n_modes) in groups.items():
        nets = {"mlp": x_dim + d_dim} if combine else {"mlp1": x_dim, "mlp2": d_dim}
        for net, width in nets.items():
            for i in range(n_hidden + 1):
                _lrlinear(g, f"mend.{name}.{net}.layers.{i}.", width, n_modes, sd)
        _buffers(g, f"mend.{name}.", x_dim, d_dim, sd)
    sd["edit_lrs"] = torch.rand(len(INNER), generator=g) * 1e-3 + 1e-4
    return sd


def torch_reference_update(sd, name, u, d, combine, shared):
    """The reference's eval-mode edit of one nn.Linear param: `lr * einsum('bi,bj->ji', u~, d~)`, [out, in]."""
    x_dim, d_dim = u.shape[-1], d.shape[-1]
    group = f"({x_dim}, {d_dim})" if shared else name.replace(".", "#")
    same = [n for n in INNER if ("fc1" in n) == ("fc1" in name)]
    mode = same.index(name) if shared else None
    pre = f"mend.{group}."
    keep = (u != 0).any(-1) & (d != 0).any(-1)
    u, d = u[keep], d[keep]
    u = (u - sd[pre + "u_mean"]) / (sd[pre + "u_std"] + 1e-7)
    d = (d - sd[pre + "v_mean"]) / (sd[pre + "v_std"] + 1e-7)

    def idmlp(net, x):
        i = 0
        while f"{pre}{net}.layers.{i}.u" in sd:
            p = f"{pre}{net}.layers.{i}."
            h = (sd[p + "u"] @ (sd[p + "v"] @ x.T)).T + sd[p + "bias"]
            if mode is not None:
                h = h * sd[p + "mode_scale.weight"][mode] + sd[p + "mode_shift.weight"][mode]
            x = h.clamp(min=0) + x
            i += 1
        return x

    if combine:
        u_t, d_t = idmlp("mlp", torch.cat([u, d], -1)).split([x_dim, d_dim], -1)
    else:
        u_t, d_t = idmlp("mlp1", u), idmlp("mlp2", d)
    lr = sd["edit_lrs"][INNER.index(name)]
    return lr * torch.einsum("bi,bj->ji", u_t, d_t)


def _factors(name, seed):
    g = torch.Generator().manual_seed(seed)
    x_dim, d_dim = (IN, OUT) if "fc1" in name else (OUT, IN)
    u, d = torch.randn(T, x_dim, generator=g), 0.1 * torch.randn(T, d_dim, generator=g)
    u[-2:] = 0  # padding rows: dropped by the reference, masked here
    d[0] = 0  # a row with no gradient
    return u, d


@pytest.mark.parametrize("combine,shared", [(True, True), (False, False)])
def test_converted_editor_matches_torch_reference(combine, shared):
    sd = reference_state_dict(combine=combine, shared=shared)
    spec, params, stats = me.convert_state_dict({k: v.numpy() for k, v in sd.items()}, INNER)
    assert not spec.cfg.descent and spec.cfg.combine == combine and spec.cfg.shared == shared
    assert spec.sites[0] == "language_model/layers/1/fc1"
    frozen = mn.frozen_site_stats(spec, stats)
    for i, name in enumerate(INNER):
        site = easyedit_site(name, strict=False)
        u, d = _factors(name, seed=i)
        mask = mn.nonzero_mask(u.numpy(), d.numpy())
        a, b, scale = mn.mend_patch(spec, params, frozen[site], site, u.numpy(), d.numpy(), mask)
        ours = (float(scale) * np.asarray(a, np.float64).T @ np.asarray(b, np.float64)).T  # torch layout
        want = torch_reference_update(sd, name, u, d, combine, shared).double().numpy()
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


class _Opaque:
    """A class the loader must not import or run."""

    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise AssertionError("the checkpoint loader ran pickled code")


def test_cli_roundtrip_and_errors(tmp_path):
    sd = reference_state_dict()
    ckpt = tmp_path / "blip2"
    # EasyEdit pickles the base model's config (and trainer objects): they must load as inert stubs.
    import transformers

    config = transformers.OPTConfig(hidden_size=IN, ffn_dim=OUT)
    torch.save({"model": {**sd, "model_config": config}, "opt": {"state": {}}, "val_stats": _Opaque(), "step": 3},
               ckpt)
    hp = tmp_path / "blip2.yaml"
    hp.write_text("inner_params:\n" + "".join(f"- {n}\n" for n in INNER) + "norm: True\ninit: id\nedit_lr: 1e-4\n")
    out = tmp_path / "out"
    with pytest.raises(AssertionError, match="ran pickled code"):  # what plain torch.load would do
        me.load_checkpoint(str(ckpt), trust_pickle=True)
    assert me.main(["--ckpt", str(ckpt), "--out", str(out), "--hparams", str(hp)]) == 0
    spec, params, stats = load_mend(str(out))
    spec2, params2, stats2 = me.convert_state_dict({k: v.numpy() for k, v in sd.items()}, INNER)
    assert spec == spec2
    import jax

    jax.tree.map(np.testing.assert_array_equal, params, params2)
    jax.tree.map(np.testing.assert_array_equal, stats, stats2)

    with pytest.raises(ValueError, match="inner params were given"):
        me.convert_state_dict({k: v.numpy() for k, v in sd.items()}, INNER[:3])
    odd = ["blocks.1.mystery.weight", *INNER[1:]]
    with pytest.raises(ValueError, match="blocks.1.mystery.weight"):
        me.convert_state_dict({k: v.numpy() for k, v in sd.items()}, odd)
    spec3, _, _ = me.convert_state_dict({k: v.numpy() for k, v in sd.items()}, odd,
                                        shapes={"blocks.1.mystery.weight": (IN, OUT)})
    assert spec3.group_of("blocks/1/mystery") == (f"({IN}, {OUT})", 0)
