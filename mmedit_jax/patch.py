"""Edits as patches: values that say how some parameters change, never in-place writes.

A patch is a plain dict `{site: delta}`; a *site* names one linear layer (`sites.py`), e.g.
`"language_model/layers/31/fc1"`; its parameter is that module's `kernel` (`[in, out]`, `y = x @ W`).

Deltas:
  * `LowRank(a [r, in], b [r, out], scale [])`: `W + scale * a.T @ b`, applied factored inside the layer as
    `y + scale * (x @ a.T) @ b` (see `models/layers.py`), so an edit costs `r * (in + out)` numbers, not
    `in * out`, and E vmapped edits share one copy of the base weights.
  * `Dense(delta [in, out])`: a full delta, for fine-tuning baselines.

Both are pytrees (flax.struct), so a batch of E independent patches is the same dict with a leading `[E]`
axis on every leaf, and `jax.vmap` over it evaluates E edited models at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import struct

from mmedit_jax.sites import get_path, resolve_site, set_path


@struct.dataclass
class LowRank:
    """`delta W = scale * a.T @ b` for a kernel `W: [in, out]`. Shapes: a `[r, in]`, b `[r, out]`, scale `[]`."""

    a: jax.Array
    b: jax.Array
    scale: jax.Array

    @property
    def rank(self) -> int:
        return self.a.shape[-2]

    def dense(self) -> jax.Array:
        """The materialised `[in, out]` delta (tests and export only: it costs `in * out`)."""
        return jnp.asarray(self.scale)[..., None, None] * jnp.einsum("...ri,...ro->...io", self.a, self.b)


@struct.dataclass
class Dense:
    """A full delta `W + delta`, `delta: [in, out]`."""

    delta: jax.Array

    def dense(self) -> jax.Array:
        return self.delta


Delta = LowRank | Dense
Patch = dict  # dict[str, Delta]


def as_low_rank(factors: Mapping[str, tuple[jax.Array, jax.Array, jax.Array]]) -> Patch:
    """`{site: (a, b, scale)}` (what the hypernetwork editors compute) as a patch `{site: LowRank}`."""
    return {site: LowRank(a, b, scale) for site, (a, b, scale) in factors.items()}


def apply_patch(params, patch: Patch, stacks: Mapping[str, int]):
    """Materialises `patch` into a new parameter tree (untouched leaves are shared).

    The editors never need this: forward passes take the patch and apply it factored. It exists for export,
    for tests (factored == materialised), and for fine-tuning loops that want plain parameters.
    """
    for site, delta in patch.items():
        path, idx = resolve_site(site, stacks)
        leaf = get_path(params, path, site)
        d = delta.dense().astype(leaf.dtype)
        target_shape = leaf.shape if idx is None else leaf.shape[1:]
        if d.shape != target_shape:
            raise ValueError(f"site {site!r}: delta shape {d.shape} does not match kernel shape {target_shape}")
        params = set_path(params, path, leaf + d if idx is None else leaf.at[idx].add(d))
    return params


# --------------------------------------------------------------------------------------------------
# Algebra on patches.


def scale(patch: Patch, c) -> Patch:
    """`c * patch` (c may be a traced scalar)."""
    out = {}
    for site, d in patch.items():
        out[site] = d.replace(scale=d.scale * c) if isinstance(d, LowRank) else Dense(d.delta * c)
    return out


def compose(*patches: Patch) -> Patch:
    """The sum of several patches. Low-rank deltas on one site concatenate their factors (rank adds up), with
    each scale folded into its `b`; a dense delta anywhere on a site makes that site dense."""
    out: dict[str, list] = {}
    for p in patches:
        for site, d in p.items():
            out.setdefault(site, []).append(d)
    result = {}
    for site, ds in out.items():
        if len(ds) == 1:
            result[site] = ds[0]
        elif all(isinstance(d, LowRank) for d in ds):
            a = jnp.concatenate([d.a for d in ds], axis=-2)
            b = jnp.concatenate([jnp.asarray(d.scale)[..., None, None] * d.b for d in ds], axis=-2)
            result[site] = LowRank(a, b, jnp.ones(a.shape[:-2], a.dtype))
        else:
            result[site] = Dense(sum(d.dense() for d in ds))
    return result


def nbytes(patch: Patch) -> int:
    """Bytes held by the patch's arrays (all leaves, including any leading edit axis)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(patch))


def dense_nbytes(shapes: Mapping[str, tuple[int, int]], itemsize: int = 4) -> int:
    """Bytes one edit would take as dense deltas on kernels of the given `[in, out]` shapes."""
    return sum(math.prod(s) * itemsize for s in shapes.values())


# --------------------------------------------------------------------------------------------------
# Sequential editing: a fixed-capacity running sum of patches, so every step has the same shapes.


def empty_accumulator(example: Patch, steps: int) -> Patch:
    """A zero patch that can hold the sum of `steps` patches shaped like `example` (one compile for all steps).

    Low-rank sites get `steps * r` zero rows (filled step by step); dense sites are a zero delta.
    """
    out = {}
    for site, d in example.items():
        if isinstance(d, LowRank):
            r = d.a.shape[-2]
            out[site] = LowRank(
                jnp.zeros((*d.a.shape[:-2], steps * r, d.a.shape[-1]), d.a.dtype),
                jnp.zeros((*d.b.shape[:-2], steps * r, d.b.shape[-1]), d.b.dtype),
                jnp.ones(d.a.shape[:-2], d.a.dtype),
            )
        else:
            out[site] = Dense(jnp.zeros_like(d.delta))
    return out


def accumulate(total: Patch, new: Patch, step) -> Patch:
    """`total + new`, writing `new`'s low-rank factors into rows `[step * r, (step + 1) * r)` of `total`.

    `step` may be traced. `total` must come from `empty_accumulator` (its scale is 1; `new`'s scale is folded
    into its `b`).
    """
    out = dict(total)
    for site, d in new.items():
        t = total[site]
        if isinstance(d, LowRank) and isinstance(t, LowRank):
            r = d.a.shape[-2]
            b = jnp.asarray(d.scale)[..., None, None] * d.b
            out[site] = LowRank(
                jax.lax.dynamic_update_slice_in_dim(t.a, d.a.astype(t.a.dtype), step * r, axis=-2),
                jax.lax.dynamic_update_slice_in_dim(t.b, b.astype(t.b.dtype), step * r, axis=-2),
                t.scale,
            )
        else:
            out[site] = Dense(t.dense() + d.dense())
    return out
