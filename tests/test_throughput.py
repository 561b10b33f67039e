"""FLOP counting for the bench: every iteration of a scanned layer stack counts."""

import jax
import jax.numpy as jnp
import pytest

from mmedit_jax.eval.throughput import matmul_flops


@pytest.mark.parametrize("layers", [1, 3])
def test_matmul_flops_counts_each_scan_iteration(layers):
    d, m = 16, 8

    def stack(w, x):  # w [layers, d, d], x [m, d]
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    w, x = jnp.ones((layers, d, d)), jnp.ones((m, d))
    f = jax.jit(stack)
    assert matmul_flops(jax.make_jaxpr(f)(w, x)) == layers * 2 * m * d * d
    # Under vmap (batch dims) and grad (forward + two backward matmuls per layer).
    xs = jnp.ones((5, m, d))
    assert matmul_flops(jax.make_jaxpr(jax.vmap(stack, in_axes=(None, 0)))(w, xs)) == 5 * layers * 2 * m * d * d
    g = jax.make_jaxpr(jax.grad(lambda w: stack(w, x).sum()))(w)
    assert matmul_flops(g) == 3 * layers * 2 * m * d * d
