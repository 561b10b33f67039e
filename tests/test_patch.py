"""Patches and the stack runner: factored == materialised, taps give the true weight gradient, vmap works."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmedit_jax import patch as P
from mmedit_jax.models.layers import PatchableDense, child, init_stack, run_stack
from mmedit_jax.sites import resolve_site


class Block(nn.Module):
    """A residual ReLU MLP unit: `h + fc2(relu(fc1(h)))`."""

    width: int = 8
    hidden: int = 12

    @nn.compact
    def __call__(self, h, edits=None):
        y = PatchableDense(self.hidden, name="fc1")(h, child(edits, "fc1"))
        y = PatchableDense(self.width, name="fc2")(jax.nn.relu(y), child(edits, "fc2"))
        return h + y, None


class Pair(nn.Module):
    """A group of two blocks (members "0" and "1"), like a Q-Former group."""

    @nn.compact
    def __call__(self, h, edits=None):
        h, _ = Block(name="0")(h, child(edits, "0"))
        h, _ = Block(name="1")(h, child(edits, "1"))
        return h, None


L, B, S, D = 5, 2, 3, 8
UNIT = Block(parent=None)
STACKS = {"net/layers": 1}


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.PRNGKey(0), (B, S, D))
    params = {"net": {"layers": init_stack(UNIT, jax.random.PRNGKey(1), L, x)}}
    return params, x


def forward(params, x, patch=None, taps=None):
    h, _, cap = run_stack(UNIT, params["net"]["layers"], x, prefix="net/layers", patch=patch, taps=taps)
    return h, cap


def loop_forward(params, x):
    h = x
    for i in range(L):
        p = jax.tree.map(lambda a, i=i: a[i], params["net"]["layers"])
        h, _ = UNIT.apply({"params": p}, h)
    return h


def random_lowrank(key, r, din, dout):
    k1, k2, k3 = jax.random.split(key, 3)
    return P.LowRank(jax.random.normal(k1, (r, din)), jax.random.normal(k2, (r, dout)), jax.random.normal(k3, ()))


def test_unpatched_scan_equals_python_loop(setup):
    params, x = setup
    np.testing.assert_allclose(forward(params, x)[0], loop_forward(params, x), atol=1e-5)


def test_factored_patch_equals_materialised(setup):
    params, x = setup
    patch = {
        "net/layers/3/fc1": random_lowrank(jax.random.PRNGKey(2), 4, D, 12),
        "net/layers/4/fc2": P.Dense(jax.random.normal(jax.random.PRNGKey(3), (12, D)) * 0.1),
        "net/layers/1/fc1": random_lowrank(jax.random.PRNGKey(4), 4, D, 12),
    }
    factored = jax.jit(forward)(params, x, patch)[0]
    dense = forward(P.apply_patch(params, patch, STACKS), x)[0]
    np.testing.assert_allclose(factored, dense, rtol=1e-5, atol=1e-5)
    assert not np.allclose(factored, forward(params, x)[0])
    # The base tree is untouched and shared by the patched one, except along the patched path.
    patched = P.apply_patch(params, patch, STACKS)
    assert patched["net"]["layers"]["fc1"]["bias"] is params["net"]["layers"]["fc1"]["bias"]


def test_taps_give_weight_gradient(setup):
    params, x = setup
    sites = ["net/layers/3/fc1", "net/layers/4/fc2"]

    def loss_of_eps(eps):
        h, cap = forward(params, x, taps=eps)
        return jnp.sum(jnp.sin(h)), cap

    eps = {"net/layers/3/fc1": jnp.zeros((B, S, 12)), "net/layers/4/fc2": jnp.zeros((B, S, D))}
    delta, cap = jax.grad(loss_of_eps, has_aux=True)(eps)

    def loss_of_params(p):
        return jnp.sum(jnp.sin(forward(p, x)[0]))

    gw = jax.grad(loss_of_params)(params)["net"]["layers"]
    for site, (name, i) in zip(sites, [("fc1", 3), ("fc2", 4)]):
        u = cap[site].reshape(-1, cap[site].shape[-1])
        d = delta[site].reshape(-1, delta[site].shape[-1])
        np.testing.assert_allclose(u.T @ d, gw[name]["kernel"][i], rtol=1e-4, atol=1e-5)


def test_vmap_over_patches_equals_one_at_a_time(setup):
    params, x = setup
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    patches = [{"net/layers/2/fc2": random_lowrank(k, 2, 12, D)} for k in keys]
    batched = jax.tree.map(lambda *a: jnp.stack(a), *patches)
    out = jax.jit(jax.vmap(lambda p: forward(params, x, p)[0]))(batched)
    for e, p in enumerate(patches):
        np.testing.assert_allclose(out[e], forward(params, x, p)[0], rtol=1e-5, atol=1e-5)


def test_grouped_stack_sites():
    unit = Pair(parent=None)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, S, D))
    stacked = init_stack(unit, jax.random.PRNGKey(1), 3, x)  # 3 groups of 2 = 6 layers
    params = {"q": {"layers": stacked}}
    patch = {"q/layers/3/fc2": random_lowrank(jax.random.PRNGKey(2), 3, 12, D)}  # group 1, member "1"
    run = lambda p, patch=None: run_stack(unit, p["q"]["layers"], x, prefix="q/layers", per_unit=2, patch=patch)[0]
    dense = run(P.apply_patch(params, patch, {"q/layers": 2}))
    np.testing.assert_allclose(run(params, patch), dense, rtol=1e-5, atol=1e-5)
    path, idx = resolve_site("q/layers/3/fc2", {"q/layers": 2})
    assert path == ("q", "layers", "1", "fc2", "kernel") and idx == 1


def test_compose_and_scale(setup):
    params, x = setup
    p1 = {"net/layers/0/fc1": random_lowrank(jax.random.PRNGKey(6), 2, D, 12)}
    p2 = {"net/layers/0/fc1": random_lowrank(jax.random.PRNGKey(7), 3, D, 12)}
    both = P.compose(p1, P.scale(p2, 0.5))
    assert both["net/layers/0/fc1"].rank == 5
    want = p1["net/layers/0/fc1"].dense() + 0.5 * p2["net/layers/0/fc1"].dense()
    np.testing.assert_allclose(both["net/layers/0/fc1"].dense(), want, rtol=1e-5, atol=1e-5)


def test_bad_site_names_are_clear(setup):
    params, _ = setup
    with pytest.raises(KeyError, match="no 'net/layers/fc9'"):
        P.apply_patch(params, {"net/layers/0/fc9": P.Dense(jnp.zeros((D, 12)))}, STACKS)
    with pytest.raises(ValueError, match="does not match kernel shape"):
        P.apply_patch(params, {"net/layers/0/fc1": P.Dense(jnp.zeros((3, 3)))}, STACKS)


def test_accumulator_equals_compose(setup):
    params, x = setup
    steps = [
        {"net/layers/2/fc1": random_lowrank(jax.random.PRNGKey(10 + i), 2, D, 12),
         "net/layers/4/fc2": P.Dense(0.1 * jax.random.normal(jax.random.PRNGKey(20 + i), (12, D)))}
        for i in range(3)
    ]
    total = P.empty_accumulator(steps[0], 3)
    add = jax.jit(P.accumulate)
    for i, p in enumerate(steps):
        total = add(total, p, i)
    want = P.compose(*steps)
    for site in want:
        np.testing.assert_allclose(total[site].dense(), want[site].dense(), rtol=1e-5, atol=1e-5)
    assert add._cache_size() == 1  # one program for every step
