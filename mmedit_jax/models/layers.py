"""Building blocks shared by every model: a patchable linear layer and the scanned layer-stack runner.

Edits reach the layers through an `EditView`: a read-only view of the patch deltas and "taps" for the linear
layers under one module. A tap on a linear layer adds a perturbation `eps` (zeros) to its output and records
its input `x`; differentiating the loss with respect to `eps` gives the output gradient `delta`, so editors
(MEND, KE) get the per-token factors `(x, delta)` of the weight gradient without ever forming it.

Stacks of identical layers run under `lax.scan`, so compile time does not grow with depth. The stack is cut
into *segments* of consecutive layers that carry the same kind of edits: layers below the first edited one
scan with no patch at all (and autodiff never touches them when only later layers carry taps), edited layers
scan with their stacked deltas. Which layers are edited is static (the patch's site names), the delta values
are traced, so one compiled program serves every edit with the same layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmedit_jax.patch import Dense, LowRank
from mmedit_jax.sites import layer_of, unit_entries

# --------------------------------------------------------------------------------------------------
# EditView: how patches and taps reach one module.


class EditView:
    """Deltas and taps for the linear layers under one module, keyed by path relative to the scanned unit.

    `child(name)` descends one module level; `PatchableDense` looks itself up by the view's path. Inputs of
    tapped layers are recorded into `captured` (a dict shared by every view of one unit), which the stack
    runner returns. Views are plain Python objects, built fresh inside each traced call.
    """

    def __init__(self, deltas: Mapping[str, Any], taps: Mapping[str, Any], path: str = "", captured=None):
        self.deltas = deltas
        self.taps = taps
        self.path = path
        self.captured = {} if captured is None else captured

    def child(self, name: str) -> EditView:
        path = f"{self.path}/{name}" if self.path else name
        return EditView(self.deltas, self.taps, path, self.captured)

    def with_taps(self, taps: Mapping[str, Any]) -> EditView:
        """The same view with other tap perturbations (recording into the same `captured`)."""
        return EditView(self.deltas, taps, self.path, self.captured)

    @property
    def delta(self):
        return self.deltas.get(self.path)

    @property
    def eps(self):
        return self.taps.get(self.path)

    def capture(self, x):
        self.captured[self.path] = x


def child(edits: EditView | None, name: str) -> EditView | None:
    """`edits.child(name)`, passing `None` through (the unedited fast path)."""
    return None if edits is None else edits.child(name)


# --------------------------------------------------------------------------------------------------
# The patchable linear layer.


class PatchableDense(nn.Module):
    """`nn.Dense` (kernel `[in, out]`, `y = x @ W + b`) that applies an edit delta and records taps.

    With `edits.delta = LowRank(a, b, s)` it computes `x @ W + s * (x @ a.T) @ b + bias` without forming the
    dense delta; with `Dense(d)` it uses `W + d`. With a tap `eps` (shape of `y`) it returns `y + eps` and
    records `x`, so `d loss / d eps` is the gradient at the layer output.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array, edits: EditView | None = None) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        delta = eps = None
        if edits is not None:
            delta, eps = edits.delta, edits.eps
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        x = x.astype(dtype)
        if isinstance(delta, Dense):
            kernel = kernel + delta.delta.astype(kernel.dtype)
        y = jnp.einsum("...i,io->...o", x, kernel.astype(dtype))
        if isinstance(delta, LowRank):
            low = jnp.einsum("...i,ri->...r", x, delta.a.astype(dtype))
            y = y + jnp.asarray(delta.scale, dtype) * jnp.einsum("...r,ro->...o", low, delta.b.astype(dtype))
        elif delta is not None and not isinstance(delta, Dense):
            raise TypeError(f"{edits.path}: unknown delta type {type(delta).__name__}")
        if bias is not None:
            y = y + bias.astype(dtype)
        if eps is not None:
            edits.capture(x)
            y = y + eps.astype(y.dtype)
        return y


# --------------------------------------------------------------------------------------------------
# Decoder helpers shared by the language models (OPT, LLaMA).


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """`x [B, L, ...]` at positions `rows [B, R]` -> `[B, R, ...]`."""
    return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)


def heads_major(x: jax.Array) -> jax.Array:
    """`[B, L, H, ..., Dh] -> [B, H, ..., L, Dh]`: attention's two batched matmuls then run on contiguous `[L, Dh]`
    blocks (on XLA CPU the L-major einsums were about 2x slower at the world's shapes; same arithmetic)."""
    return jnp.moveaxis(x, 1, -2)


def sequence_major(x: jax.Array) -> jax.Array:
    """`heads_major`'s inverse: `[B, H, ..., L, Dh] -> [B, L, H, ..., Dh]`."""
    return jnp.moveaxis(x, -2, 1)


def masked_scores(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 `scores` with hidden keys (`mask` False, broadcastable) at float32's most negative value: added as a
    0 / min bias, not selected with `where`. Same values (min + a finite score rounds to min), and XLA CPU fuses the
    add into the scores' producer where the select cost a pass of its own (IKE's `[32, 4, 175, 175]` attention:
    21.6 -> 14.6 ms). A row with no visible key gets a uniform softmax, not NaN."""
    return scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def attention_bias(query_pos: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Boolean `[B, 1, Lq, Lk]`: key j is visible to query i when `j <= query_pos[i]` and key j is not padding.

    query_pos `[Lq]` (or `[B, Lq]`) are absolute slots in the key sequence, key_mask `[B, Lk]`.
    """
    lk = key_mask.shape[-1]
    qp = query_pos if query_pos.ndim == 2 else query_pos[None]
    causal = jnp.arange(lk)[None, None, :] <= qp[:, :, None]  # [B|1, Lq, Lk]
    return (causal & key_mask.astype(bool)[:, None, :])[:, None]


def below_layer(table: dict | None, layer: int) -> dict | None:
    """The entries of a `{site: ...}` table outside the language-model stack or on its layers `< layer`."""
    if table is None:
        return None
    return {k: v for k, v in table.items() if layer_of(k) is None or layer_of(k) < layer}


def from_layer(table: dict | None, layer: int) -> dict | None:
    """The entries of a `{site: ...}` table on language-model layers `>= layer`."""
    if table is None:
        return None
    return {k: v for k, v in table.items() if layer_of(k) is not None and layer_of(k) >= layer}


# --------------------------------------------------------------------------------------------------
# The scanned layer-stack runner.


def _signature(deltas: Mapping[str, Any], taps: Mapping[str, Any]):
    def sig(v):
        return (type(v).__name__, tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(v)))

    return (tuple(sorted((k, sig(v)) for k, v in deltas.items())), tuple(sorted((k, sig(v)) for k, v in taps.items())))


def _stack(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    if not dicts or not dicts[0]:
        return {}
    return {k: jax.tree.map(lambda *xs: jnp.stack(xs), *(d[k] for d in dicts)) for k in dicts[0]}


def run_stack(
    unit: nn.Module,
    stacked_params,
    carry,
    *args,
    prefix: str,
    per_unit: int = 1,
    patch: Mapping[str, Any] | None = None,
    taps: Mapping[str, Any] | None = None,
    per_unit_xs=None,
    remat: bool = False,
    start: int = 0,
    stop: int | None = None,
    **kwargs,
):
    """Runs a stack of `num_units` identical units (`unit.apply`) over `carry`, segment by segment.

    `start`/`stop` run only units `start .. stop - 1` (a prefix of the stack, or its continuation from the
    hidden states a prefix returned); a patch or tap on a unit outside that range is an error, not ignored.

    Args:
      unit: an unbound module (`parent=None`) whose `__call__(carry, *args, edits=view, xs=..., **kwargs)`
        returns `(carry, ys)`; `ys` may be None. `xs` is only passed when `per_unit_xs` is given.
      stacked_params: the unit's params with a leading `[num_units]` axis on every leaf.
      carry: the running state (a pytree), e.g. hidden states `[B, L, D]`.
      *args, **kwargs: broadcast to every unit (masks, encoder states, ...).
      prefix: the stack's site prefix, e.g. `"language_model/layers"`.
      per_unit: layers per scanned unit (Q-Former groups); site layer `i` is member `i % per_unit` of unit
        `i // per_unit`.
      patch: `{site: LowRank | Dense}`; sites outside this stack are ignored.
      taps: `{site: eps}` perturbations whose layers record their inputs.
      per_unit_xs: optional pytree with a leading `[num_units]` axis handed to each unit as `xs` (KV caches).
      remat: rematerialise each unit in the backward pass (saves activation memory when training).
      start, stop: the units to run, `[start, stop)` (default: all).

    Returns:
      `(carry, ys, captured)`: `ys` stacked over the units run (or None), `captured` maps each tapped site to
      the input its layer saw.
    """
    num_units = jax.tree.leaves(stacked_params)[0].shape[0]
    stop = num_units if stop is None else stop
    if not 0 <= start <= stop <= num_units:
        raise ValueError(f"units [{start}, {stop}) out of range for a stack of {num_units}")
    unit_deltas = unit_entries(patch or {}, prefix, num_units, per_unit)
    unit_taps = unit_entries(taps or {}, prefix, num_units, per_unit)
    skipped = [u for u in (*range(start), *range(stop, num_units)) if unit_deltas[u] or unit_taps[u]]
    if skipped:
        raise ValueError(f"{prefix}: units {skipped} carry edits or taps but only [{start}, {stop}) run")
    sigs = [_signature(d, t) for d, t in zip(unit_deltas, unit_taps)]

    # Maximal runs of units that carry the same kind of edits.
    segments, first = [], start
    for u in range(start + 1, stop + 1):
        if u == stop or sigs[u] != sigs[first]:
            segments.append((first, u))
            first = u

    def body(c, x):
        p, deltas, eps, xs = x
        view = EditView(deltas, eps)
        extra = {} if xs is None else {"xs": xs}
        c, ys = unit.apply({"params": p}, c, *args, edits=view, **extra, **kwargs)
        return c, (ys, view.captured)

    if remat:
        body = jax.checkpoint(body)

    def indexed(c, x):  # a part of the stack: its units' weights read from the whole stack by index
        i, unit_x = x
        p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked_params)
        return body(c, (p, *unit_x))

    ys_parts, captured = [], {}
    for s, e in segments:
        seg = lambda t: jax.tree.map(lambda a: a[s:e], t)  # noqa: B023 (used immediately)
        unit_x = (_stack(unit_deltas[s:e]), _stack(unit_taps[s:e]), None if per_unit_xs is None else seg(per_unit_xs))
        if e - s == 1:  # one unit: called directly, so it may change the carry's shape (rows of the last layer)
            unit_p = jax.tree.map(lambda a: a[s], stacked_params)  # noqa: B023
            carry, (ys, cap) = body(carry, (unit_p, *jax.tree.map(lambda a: a[0], unit_x)))
            ys, cap = jax.tree.map(lambda a: a[None], (ys, cap))
        elif e - s == num_units:
            carry, (ys, cap) = jax.lax.scan(body, carry, (stacked_params, *unit_x))
        elif not (unit_deltas[s] or unit_taps[s]):
            # An unedited part (the layers below the first edited one): not `stacked_params[s:e]`, a slice is a
            # copy of those layers' weights (at 7B, LLaMA's layers 0-28 are 11 GB in bfloat16); indexing the
            # whole stack inside the loop copies nothing. (An edited part is usually differentiated: there the
            # per-unit weights are kept for the backward pass whichever way they are read, so it is sliced.)
            carry, (ys, cap) = jax.lax.scan(indexed, carry, (jnp.arange(s, e), unit_x))
        else:
            carry, (ys, cap) = jax.lax.scan(body, carry, (seg(stacked_params), *unit_x))
        ys_parts.append(ys)
        for rel, x in cap.items():
            for j, u in enumerate(range(s, e)):
                if per_unit == 1:
                    site = f"{prefix}/{u}/{rel}"
                else:
                    member, _, rest = rel.partition("/")
                    site = f"{prefix}/{u * per_unit + int(member)}/{rest}"
                captured[site] = x[j]
    ys = None
    if ys_parts and jax.tree.leaves(ys_parts[0]):
        ys = jax.tree.map(lambda *p: jnp.concatenate(p), *ys_parts)
    return carry, ys, captured


def init_stack(unit: nn.Module, rng: jax.Array, num_units: int, *sample_args, **sample_kwargs):
    """Initialises `num_units` independent copies of `unit` as one stacked param tree (`[num_units, ...]`)."""
    rngs = jax.random.split(rng, num_units)
    init = lambda r: unit.init(r, *sample_args, **sample_kwargs)["params"]
    return jax.vmap(init)(rngs)
