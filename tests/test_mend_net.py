"""MEND gradient transform against independent NumPy re-derivations of the reference's math."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmedit_jax.editors import mend_net as mn
from mmedit_jax.patch import as_low_rank

SHAPES = {"lm/layers/0/fc1": (6, 10), "lm/layers/0/fc2": (10, 6), "lm/layers/1/fc1": (6, 10),
          "lm/layers/1/fc2": (10, 6)}
T = 5


def _randomise(params, seed=0):
    """Non-degenerate editor weights (the identity init would hide most of the network)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.5 * jax.random.normal(k, x.shape) + (1.0 if x.ndim == 2 and x.shape[0] <= 2 else 0.0)
           for k, x in zip(keys, leaves)]
    out = jax.tree.unflatten(treedef, new)
    out["edit_lrs"] = {k: jnp.abs(v) + 0.1 for k, v in out["edit_lrs"].items()}
    return out


def _factors(rng, spec, lead=()):
    inputs, masks = {}, {}
    for i, site in enumerate(spec.sites):
        n_in, n_out = spec.shape(site)
        k1, k2, k3 = jax.random.split(jax.random.fold_in(rng, i), 3)
        u = jax.random.normal(k1, (*lead, T, n_in)) + 0.3
        d = jax.random.normal(k2, (*lead, T, n_out)) * 0.1
        m = (jax.random.uniform(k3, (*lead, T)) > 0.3).astype(jnp.float32)
        inputs[site] = (u, d)
        masks[site] = m
    return inputs, masks


# ---- NumPy reference (float64), written from the reference's description ---------------------------


def np_welford(rows):
    """The reference's loop: first row sets mean, then k += 1; m += (x - m) / k; s += (x - m_old)(x - m_new)."""
    mean, s, k = None, None, 0
    for x in rows:
        if k == 0:
            mean, s, k = x.copy(), np.zeros_like(x), 1
        else:
            k += 1
            new = mean + (x - mean) / k
            s = s + (x - mean) * (x - new)
            mean = new
    return k, mean, s


def np_idmlp(net, x, mode, residual=True):
    for i in range(len(net)):
        layer = {k: np.asarray(v, np.float64) for k, v in net[f"layer_{i}"].items()}
        # reference layout: U = up.T [D, mid], V = down.T [mid, D]; pre = (U @ (V @ x.T)).T + bias
        pre = (layer["up"].T @ (layer["down"].T @ x.T)).T + layer["bias"]
        if "mode_scale" in layer:
            pre = pre * layer["mode_scale"][mode] + layer["mode_shift"][mode]
        act = np.clip(pre, 0, None)
        x = x + act if residual else act
    return x


def np_dense_update(cfg, net, u, d, mask, mean_u, std_u, mean_d, std_d, lr, mode):
    """Dense `[in, out]` MEND delta on the kept rows only (rows dropped, as the reference does)."""
    keep = mask > 0
    u, d = np.asarray(u, np.float64)[keep], np.asarray(d, np.float64)[keep]
    if cfg.norm:
        u = (u - mean_u) / (std_u + 1e-7)
        d = (d - mean_d) / (std_d + 1e-7)
    if cfg.combine:
        out = np_idmlp(net["mlp"], np.concatenate([u, d], -1), mode)
        u_t, d_t = out[:, : u.shape[1]], out[:, u.shape[1]:]
    else:
        u_t = np_idmlp(net["mlp_u"], u, mode) if "mlp_u" in net else u
        d_t = np_idmlp(net["mlp_delta"], d, mode) if "mlp_delta" in net else d
    g = np.einsum("ti,tj->ij", u_t, d_t)
    return (-lr if cfg.descent else lr) * g


@pytest.fixture(scope="module")
def setup():
    cfg = mn.MendConfig(rank=4, n_hidden=1)
    spec = mn.mend_spec(cfg, SHAPES)
    params, stats = mn.init_mend(jax.random.key(0), spec)
    params = _randomise(params)
    inputs, masks = _factors(jax.random.key(1), spec, lead=(3,))
    return spec, params, stats, inputs, masks


def test_spec_groups_and_param_layout(setup):
    spec, params, stats, _, _ = setup
    assert spec.groups == (("(6, 10)", ("lm/layers/0/fc1", "lm/layers/1/fc1")),
                           ("(10, 6)", ("lm/layers/0/fc2", "lm/layers/1/fc2")))
    assert spec.group_of("lm/layers/1/fc2") == ("(10, 6)", 1)
    layer = params["nets"]["(6, 10)"]["mlp"]["layer_1"]
    assert {k: v.shape for k, v in layer.items()} == {
        "down": (16, 4), "up": (4, 16), "bias": (16,), "mode_scale": (2, 16), "mode_shift": (2, 16)}
    assert set(params["edit_lrs"]) == set(SHAPES)
    assert stats["(10, 6)"]["u"]["mean"].shape == (10,)
    with pytest.raises(KeyError, match="not edited"):
        spec.group_of("nope")


def test_chan_merge_equals_sequential_welford(setup):
    spec, _, stats, inputs, masks = setup
    new, per_site = jax.jit(lambda s, i, m: mn.update_stats(spec, s, i, m))(stats, inputs, masks)
    # Two training steps: the second merge starts from non-empty statistics.
    new2, per_site2 = mn.update_stats(spec, new, inputs, masks)
    for key, members in spec.groups:
        for side, idx in (("u", 0), ("delta", 1)):
            rows = []
            for step_per_site in (per_site, per_site2):
                for s in members:
                    x = np.asarray(inputs[s][idx], np.float64).reshape(-1, inputs[s][idx].shape[-1])
                    m = np.asarray(masks[s]).reshape(-1) > 0
                    rows.extend(list(x[m]))
                    k, mean, m2 = np_welford(rows)
                    got = step_per_site[s][side]
                    assert float(got["count"]) == k
                    np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=1e-6)
                    np.testing.assert_allclose(got["m2"], m2, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(new2[key][side]["m2"], m2, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(mn.moments_std(new2[key][side]), np.sqrt(m2 / (k - 1)), rtol=1e-5)


def test_empty_batch_leaves_stats_and_std_nan_before_two_rows():
    mom = {"count": jnp.zeros(()), "mean": jnp.zeros(3), "m2": jnp.zeros(3)}
    x = jnp.ones((4, 3))
    same = mn.merge_moments(mom, x, jnp.zeros(4))
    assert float(same["count"]) == 0 and np.isnan(mn.moments_std(same)).all()
    one = mn.merge_moments(mom, x, jnp.array([0.0, 1, 0, 0]))
    np.testing.assert_allclose(one["mean"], 1.0)
    assert np.isnan(mn.moments_std(one)).all()


def test_factored_update_equals_dense_reference(setup):
    spec, params, stats, inputs, masks = setup
    new, per_site = mn.update_stats(spec, stats, inputs, masks)
    edit = 1
    fn = jax.jit(lambda p, st, u, d, m, site: mn.mend_patch(spec, p, st, site, u, d, m), static_argnums=5)
    for site in spec.sites:
        key, mode = spec.group_of(site)
        u, d = inputs[site][0][edit], inputs[site][1][edit]
        a, b, scale = fn(params, per_site[site], u, d, masks[site][edit], site)
        assert a.shape == (T, spec.shape(site)[0]) and b.shape == (T, spec.shape(site)[1]) and scale.shape == ()
        st = jax.tree.map(lambda x: np.asarray(x, np.float64), per_site[site])
        std = lambda mo: np.sqrt(mo["m2"] / (mo["count"] - 1))
        want = np_dense_update(spec.cfg, params["nets"][key], u, d, np.asarray(masks[site][edit]),
                               st["u"]["mean"], std(st["u"]), st["delta"]["mean"], std(st["delta"]),
                               float(params["edit_lrs"][site]), mode)
        got = float(scale) * np.asarray(a, np.float64).T @ np.asarray(b, np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
        assert np.all(np.asarray(a)[np.asarray(masks[site][edit]) == 0] == 0)


def test_vmapped_edits_equal_one_at_a_time(setup):
    spec, params, stats, inputs, masks = setup
    patches, _ = jax.jit(lambda p, s, i, m: mn.mend_edit(spec, p, s, i, m, training=False))(
        params, _trained(spec, stats, inputs, masks), inputs, masks)
    frozen = mn.frozen_site_stats(spec, _trained(spec, stats, inputs, masks))
    for e in range(3):
        for site in spec.sites:
            a, b, s = mn.mend_patch(spec, params, frozen[site], site, inputs[site][0][e], inputs[site][1][e],
                                    masks[site][e])
            np.testing.assert_allclose(patches[site][0][e], a, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(patches[site][1][e], b, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(patches[site][2][e], s)


def test_spec_is_a_static_jit_argument(setup):
    spec, params, stats, inputs, masks = setup
    edit = jax.jit(mn.mend_edit, static_argnums=(0, 5))
    p1, s1 = edit(spec, params, stats, inputs, masks, True)
    p2, s2 = edit(mn.mend_spec(spec.cfg, SHAPES), params, stats, inputs, masks, True)  # equal spec: cache hit
    assert edit._cache_size() == 1
    jax.tree.map(np.testing.assert_array_equal, (p1, s1), (p2, s2))


def _trained(spec, stats, inputs, masks):
    return mn.update_stats(spec, stats, inputs, masks)[0]


def test_training_edit_uses_per_site_snapshots(setup):
    spec, params, stats, inputs, masks = setup
    patches, new = mn.mend_edit(spec, params, stats, inputs, masks, training=True)
    want_stats, per_site = mn.update_stats(spec, stats, inputs, masks)
    jax.tree.map(np.testing.assert_allclose, new, want_stats)
    site = spec.sites[0]  # mode 0 of its group: normalised before the group's second site is merged
    a, _, _ = mn.mend_patch(spec, params, per_site[site], site, inputs[site][0][2], inputs[site][1][2],
                            masks[site][2])
    np.testing.assert_allclose(patches[site][0][2], a, rtol=1e-5, atol=1e-5)


def test_identity_init_gives_normalised_inputs():
    for cfg in (mn.MendConfig(rank=3), mn.MendConfig(rank=3, combine=False, shared=False)):
        spec = mn.mend_spec(cfg, SHAPES)
        params, stats = mn.init_mend(jax.random.key(3), spec)
        inputs, masks = _factors(jax.random.key(4), spec)
        _, per_site = mn.update_stats(spec, stats, inputs, masks)
        for site in spec.sites:
            u, d = inputs[site]
            u_t, d_t = mn.transform(spec, params, per_site[site], site, u, d, masks[site])
            mo = per_site[site]
            m = np.asarray(masks[site])[:, None]
            want_u = (u - mo["u"]["mean"]) / (mn.moments_std(mo["u"]) + 1e-7) * m
            want_d = (d - mo["delta"]["mean"]) / (mn.moments_std(mo["delta"]) + 1e-7) * m
            np.testing.assert_allclose(u_t, want_u, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(d_t, want_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags", [dict(combine=False), dict(combine=False, x_only=True),
                                   dict(combine=False, delta_only=True), dict(combine=False, one_sided=True),
                                   dict(combine=False, shared=False, norm=False, descent=False)])
def test_variants_match_dense_reference(flags):
    cfg = mn.MendConfig(rank=4, n_hidden=2, **flags)
    spec = mn.mend_spec(cfg, SHAPES)
    params, stats = mn.init_mend(jax.random.key(5), spec)
    params = _randomise(params, seed=6)
    inputs, masks = _factors(jax.random.key(7), spec)
    _, per_site = mn.update_stats(spec, stats, inputs, masks)
    for site in spec.sites:
        key, mode = spec.group_of(site)
        net = params["nets"][key]
        if flags.get("one_sided"):  # only the smaller side is transformed
            assert set(net) == ({"mlp_delta"} if spec.shape(site)[0] > spec.shape(site)[1] else {"mlp_u"})
        a, b, s = mn.mend_patch(spec, params, per_site[site], site, *inputs[site], masks[site])
        st = jax.tree.map(lambda x: np.asarray(x, np.float64), per_site[site])
        std = lambda mo: np.sqrt(mo["m2"] / (mo["count"] - 1))
        want = np_dense_update(cfg, net, *inputs[site], np.asarray(masks[site]), st["u"]["mean"], std(st["u"]),
                               st["delta"]["mean"], std(st["delta"]), float(params["edit_lrs"][site]),
                               mode if cfg.shared else None)
        got = float(s) * np.asarray(a, np.float64).T @ np.asarray(b, np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
        assert (float(s) > 0) == (not cfg.descent)


def test_nonzero_mask_and_low_rank_adapter(setup):
    spec, params, stats, inputs, masks = setup
    u = jnp.array([[1.0, 0.0], [0.0, 0.0], [2.0, 1.0]])
    d = jnp.array([[1.0], [3.0], [0.0]])
    np.testing.assert_array_equal(mn.nonzero_mask(u, d), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(mn.nonzero_mask(u, d, jnp.array([0, 1, 1])), [0.0, 0.0, 0.0])
    site = spec.sites[1]
    per = mn.frozen_site_stats(spec, _trained(spec, stats, inputs, masks))[site]
    a, b, s = mn.mend_patch(spec, params, per, site, inputs[site][0][0], inputs[site][1][0], masks[site][0])
    lr = as_low_rank({site: (a, b, s)})[site]
    np.testing.assert_allclose(lr.dense(), s * a.T @ b, rtol=1e-5, atol=1e-6)


def test_bad_shapes_and_config_raise(setup):
    spec, params, stats, inputs, masks = setup
    site = spec.sites[0]
    with pytest.raises(ValueError, match="lm/layers/0/fc1"):
        mn.transform(spec, params, stats["(6, 10)"], site, jnp.zeros((T, 7)), jnp.zeros((T, 10)), jnp.ones(T))
    with pytest.raises(ValueError, match="combine"):
        mn.MendConfig(combine=True, x_only=True)
    with pytest.raises(ValueError, match="at least 2"):
        mn.check_stats(spec, stats)
    cfg = mn.MendConfig.from_hparams({"rank": 8, "lr": 1e-6, "alg": "MEND"}, descent=False)
    assert dataclasses.replace(cfg, rank=8) == cfg and not cfg.descent


def test_gradients_match_torch_clamp_at_identity_init():
    """At init every pre-activation is exactly 0: torch's clamp passes the gradient there, so must we."""
    import torch

    cfg = mn.MendConfig(rank=3, norm=False, shared=False)
    spec = mn.mend_spec(cfg, {"w": (4, 5)})
    params, stats = mn.init_mend(jax.random.key(8), spec)
    u = jax.random.normal(jax.random.key(9), (T, 4))
    d = jax.random.normal(jax.random.key(10), (T, 5))
    probe = jax.random.normal(jax.random.key(11), (4, 5))

    def loss(p):
        a, b, s = mn.mend_patch(spec, p, stats["w"], "w", u, d, jnp.ones(T))
        return jnp.sum(s * (a.T @ b) * probe)

    grads = jax.grad(loss)(params)
    net = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params["nets"]["w"]["mlp"]["layer_0"].items()}
    net1 = {k: torch.tensor(np.asarray(v)) for k, v in params["nets"]["w"]["mlp"]["layer_1"].items()}
    x = torch.cat([torch.tensor(np.asarray(u)), torch.tensor(np.asarray(d))], -1)
    h = x + ((x @ net["down"]) @ net["up"] + net["bias"]).clamp(min=0)
    h = h + ((h @ net1["down"]) @ net1["up"] + net1["bias"]).clamp(min=0)
    lr = float(params["edit_lrs"]["w"])
    torch_loss = (-lr * (h[:, :4].T @ h[:, 4:]) * torch.tensor(np.asarray(probe))).sum()
    torch_loss.backward()
    for k in ("bias", "up"):
        np.testing.assert_allclose(grads["nets"]["w"]["mlp"]["layer_0"][k], net[k].grad.numpy(), rtol=1e-4,
                                   atol=1e-6)
    assert np.abs(np.asarray(grads["nets"]["w"]["mlp"]["layer_0"]["up"])).max() > 0
    assert float(grads["edit_lrs"]["w"]) != 0
