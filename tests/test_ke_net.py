"""KE hypernetwork against PyTorch re-computations (packed BiLSTM, weight-normed heads, the dense update)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mmedit_jax.editors import ke_net as ke
from mmedit_jax.patch import as_low_rank

V, E, L, T = 30, 8, 9, 6
SHAPES = {"lm/layers/0/fc1": (5, 7), "lm/layers/0/fc2": (7, 5)}
CFG = ke.KEConfig(lstm_hidden=6, condition_dim=10, hidden_dim=12, max_scale=0.7)


@pytest.fixture(scope="module")
def params():
    emb = jax.random.normal(jax.random.key(0), (V, E))
    return ke.init_ke(jax.random.key(1), CFG, SHAPES, emb)


def _torch_lstm(p):
    lstm = torch.nn.LSTM(E, CFG.lstm_hidden, num_layers=1, bidirectional=True, batch_first=True)
    with torch.no_grad():
        for suffix, d in (("", "fwd"), ("_reverse", "bwd")):
            getattr(lstm, "weight_ih_l0" + suffix).copy_(torch.tensor(np.asarray(p[d]["w_ih"]).T))
            getattr(lstm, "weight_hh_l0" + suffix).copy_(torch.tensor(np.asarray(p[d]["w_hh"]).T))
            getattr(lstm, "bias_ih_l0" + suffix).copy_(torch.tensor(np.asarray(p[d]["bias"])))
            getattr(lstm, "bias_hh_l0" + suffix).zero_()
    return lstm


def _torch_condition(params, ids, lengths):
    """Embedding -> packed BiLSTM -> [h_fwd; h_bwd] -> Linear + tanh, as the reference's LSTMConditioner."""
    x = torch.tensor(np.asarray(params["embedding"]))[torch.tensor(ids)]
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=True,
                                                     enforce_sorted=False)
    _, (h_n, _) = _torch_lstm(params["lstm"])(packed)
    h = torch.cat([h_n[0], h_n[1]], -1)
    k, b = (torch.tensor(np.asarray(params["cond"][n])) for n in ("kernel", "bias"))
    return torch.tanh(h @ k + b)


def _batch(seed):
    rng = np.random.default_rng(seed)
    lengths = [9, 4, 1, 6]
    ids = rng.integers(1, V, size=(len(lengths), L))
    mask = (np.arange(L)[None] < np.array(lengths)[:, None]).astype(np.float32)
    return ids * mask.astype(np.int64), mask, lengths


def test_masked_bilstm_equals_packed_torch_lstm(params):
    ids, mask, lengths = _batch(0)
    got = jax.jit(jax.vmap(lambda i, m: ke.encode_condition(params, i, m)))(ids, mask)
    with torch.no_grad():
        want = _torch_condition(params, ids, lengths).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Left padding gives the same condition (valid tokens are moved to the front in order).
    left_ids = np.stack([np.roll(r, L - n) for r, n in zip(ids, lengths)])
    left_mask = np.stack([np.roll(r, L - n) for r, n in zip(mask, lengths)])
    got_left = jax.vmap(lambda i, m: ke.encode_condition(params, i, m))(left_ids, left_mask)
    np.testing.assert_allclose(got_left, want, rtol=1e-5, atol=1e-5)


def _torch_head_update(head, c, grad_torch, max_scale):
    """The reference's ConditionedParameter for an nn.Linear param (torch layout [m=out, n=in])."""
    m, n = grad_torch.shape
    layers = []
    for name in ("hidden", "out"):
        v = torch.tensor(np.asarray(head[name]["v"]).T)  # [out_f, in_f]
        lin = torch.nn.Linear(v.shape[1], v.shape[0])
        with torch.no_grad():
            lin.weight.copy_(v)
            lin.bias.copy_(torch.tensor(np.asarray(head[name]["bias"])))
        lin = torch.nn.utils.parametrizations.weight_norm(lin)
        with torch.no_grad():
            lin.parametrizations.weight.original0.copy_(torch.tensor(np.asarray(head[name]["g"]))[:, None])
        layers.append(lin)
    raw = layers[1](torch.tanh(layers[0](c[None])))  # [1, 2(m+n)+1]
    cola, rowa, colb, rowb, eta = raw.split([n, m, n, m, 1], dim=-1)
    a = rowa.softmax(-1).T @ cola
    b = rowb.softmax(-1).T @ colb
    return max_scale * eta.sigmoid().squeeze() * (grad_torch * a + b)


def test_factored_update_equals_dense_formula(params):
    ids, mask, lengths = _batch(1)
    c = ke.encode_condition(params, ids[1], mask[1])
    rng = np.random.default_rng(2)
    for site, (n_in, n_out) in SHAPES.items():
        u = rng.normal(size=(T, n_in)).astype(np.float32)
        d = rng.normal(size=(T, n_out)).astype(np.float32)
        tok = np.array([1, 1, 0, 1, 1, 0], np.float32)
        # Make head weights non-trivial in scale (g differs from ||v||).
        head = jax.tree.map(lambda x: x * 1.3, params["heads"][site])
        p = {**params, "heads": {**params["heads"], site: head}}
        a, b, s = ke.ke_patch(CFG, p, site, c, u, d, tok)
        assert a.shape == (T + 1, n_in) and b.shape == (T + 1, n_out)
        ours = (float(s) * np.asarray(a, np.float64).T @ np.asarray(b, np.float64)).T  # torch layout
        grad_torch = torch.einsum("ti,to->oi", torch.tensor(u * tok[:, None]), torch.tensor(d))
        with torch.no_grad():
            want = _torch_head_update(head, torch.tensor(np.asarray(c)), grad_torch, CFG.max_scale).numpy()
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-6)


def test_vmapped_edits_equal_one_at_a_time(params):
    ids, mask, _ = _batch(3)
    rng = np.random.default_rng(4)
    n_edit = ids.shape[0]
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    inputs = {s: (normal(n_edit, T, i), normal(n_edit, T, o)) for s, (i, o) in SHAPES.items()}
    masks = {s: (rng.uniform(size=(n_edit, T)) > 0.3).astype(np.float32) for s in SHAPES}
    batched = jax.jit(jax.vmap(lambda i, m, x, k: ke.ke_patches(CFG, params, i, m, x, k)))(ids, mask, inputs, masks)
    for e in range(n_edit):
        one = ke.ke_patches(CFG, params, ids[e], mask[e], {s: (u[e], d[e]) for s, (u, d) in inputs.items()},
                            {s: m[e] for s, m in masks.items()})
        for s in SHAPES:
            for x, y in zip(one[s], batched[s]):
                np.testing.assert_allclose(y[e], x, rtol=1e-5, atol=1e-6)
    lr = as_low_rank({s: tuple(x[0] for x in batched[s]) for s in SHAPES})
    assert lr["lm/layers/0/fc1"].dense().shape == SHAPES["lm/layers/0/fc1"]


def test_lagrangian_pieces():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(4, 7))
    dense = 0.3 * a.T @ b
    got = ke.lp_distance({"w": (jnp.asarray(a), jnp.asarray(b), jnp.asarray(0.3))})
    np.testing.assert_allclose(got, np.sqrt(np.mean(dense**2)), rtol=1e-5)

    mult = ke.init_multipliers(("kl", "lp"))
    margins = {"kl": jnp.asarray(1e-3), "lp": jnp.asarray(1e-3)}
    div = {"kl": jnp.asarray(0.5), "lp": jnp.asarray(1e-4)}
    np.testing.assert_allclose(ke.lagrangian(jnp.asarray(2.0), div, mult, margins), 2.0 + 0.499 - 0.0009, rtol=1e-6)
    grads = jax.grad(lambda m: ke.lagrangian(jnp.asarray(2.0), div, m, margins))(mult)
    opt = ke.multiplier_optimizer(0.1)
    upd, _ = opt.update(grads, opt.init(mult))
    new = ke.clamp_multipliers(optax.apply_updates(mult, upd))
    assert float(new["kl"]) > 1.0  # violated constraint: its multiplier grows (ascent)
    assert float(new["lp"]) < 1.0  # satisfied: it shrinks, and never below 0
    assert float(ke.clamp_multipliers({"x": jnp.asarray(-2.0)})["x"]) == 0.0
    mins = {"kl": jnp.asarray(1e-5), "lp": jnp.asarray(9e-4)}
    shrunk = ke.shrink_margins(margins, mins, jnp.asarray(0.95))
    np.testing.assert_allclose([shrunk["kl"], shrunk["lp"]], [8e-4, 9e-4], rtol=1e-6)
    kept = ke.shrink_margins(margins, mins, jnp.asarray(0.5))
    np.testing.assert_allclose(kept["kl"], 1e-3)


def test_bad_inputs_raise(params):
    c = jnp.zeros(CFG.condition_dim)
    with pytest.raises(KeyError, match="nope"):
        ke.ke_patch(CFG, params, "nope", c, jnp.zeros((T, 5)), jnp.zeros((T, 7)), jnp.ones(T))
    with pytest.raises(ValueError, match="needs"):
        ke.ke_patch(CFG, params, "lm/layers/0/fc1", c, jnp.zeros((T, 6)), jnp.zeros((T, 7)), jnp.ones(T))
    with pytest.raises(ValueError, match="ids"):
        ke.encode_condition(params, jnp.zeros((2, L), jnp.int32), jnp.ones((2, L)))
