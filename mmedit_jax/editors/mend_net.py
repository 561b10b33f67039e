"""MEND's gradient transform as pure functions on captured per-token factors (Mitchell et al., ICLR 2022).

For an edited linear layer with Flax kernel `W: [in, out]` (`y = x @ W`) the weight gradient of the edit loss
is `sum_t u_t delta_t^T`, where `u_t: [in]` is the layer input at token t and `delta_t: [out]` the gradient at the
layer output. MEND standardises both factors with running statistics, passes them through a small
identity-initialised low-rank residual MLP (one per shape group, shared across layers with per-layer "mode"
scale/shift), and uses the transformed factors as a rank-T update. Here that update stays factored:

    patch = (a = mask * u_tilde [T, in],  b = delta_tilde [T, out],  scale = -+edit_lr[site])
    W_edited = W + scale * a.T @ b

Everything is a function of plain nested-dict pytrees and a static `MendSpec`, so one edit can be jitted and E
independent edits vmapped (statistics are shared, so in training they are merged over the whole batch first).

Facts from the reference (eric-mitchell/mend `algs/mend.py`, `nn.py`; EasyEdit `trainer/algs/MEND.py`,
`local_nn.py`, identical math) that this module reproduces:
  * IDMLP = n_hidden+1 `LRLinear(D -> D)` layers; each computes `pre = x V^T U^T + bias`, then with a mode
    `pre = pre * mode_scale[mode] + mode_shift[mode]`, then `clamp(pre, min=0)`, and returns `x + act` for
    init "id" (just `act` otherwise). Init "id": U = 0, V ~ N(0, 1), bias 0, scale 1, shift 0.
  * mid rank = min(rank, D). `combine` runs one IDMLP on concat(u_hat, delta_hat) (D = in + out);
    otherwise one per side, and `x_only`/`delta_only`/`one_sided` replace a side by the identity
    (`one_sided` transforms only the smaller side: delta if in > out, else u).
  * Statistics per shape group (pooled over its layers), Welford over kept rows in training only, the current
    rows included before normalising; std = sqrt(M2 / (k - 1)); applied as (x - mean) / (std + 1e-7).
    Sites are processed in inner-params order, so in training site j of a group is normalised with the
    statistics after merging sites 0..j (`update_stats` returns those snapshots).
  * Rows are kept iff `any(u != 0) and any(delta != 0)` (`nonzero_mask`); the network is not zero at zero,
    so the mask is applied to its outputs.
  * One learned scalar edit lr per edited matrix. The reference adds `lr * g` (ascent, a known bug);
    `descent=True` (default) subtracts as in the paper; use `descent=False` for EasyEdit checkpoints.

Parameter tree (`init_mend`):
    params = {
      "nets": {group_key: {"mlp": IDMLP} if combine else {"mlp_u": IDMLP, "mlp_delta": IDMLP}
               (an identity side has no entry)},
      "edit_lrs": {site: f32[]},
    }
    IDMLP = {"layer_0": LRL, ..., f"layer_{n_hidden}": LRL}
    LRL = {"down": [D, mid], "up": [mid, D], "bias": [D],
           "mode_scale": [n_modes, D], "mode_shift": [n_modes, D]}   # modes only when shared
  (`down` is the reference's V transposed, `up` its U transposed: `pre = x @ down @ up + bias`.)
    stats = {group_key: {"u": Moments(in), "delta": Moments(out)}},  Moments(d) = {"count": f32[], "mean": [d],
             "m2": [d]}
  group_key is the reference's ModuleDict key: `"(in, out)"` when shared, else the site name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

NORM_EPS = 1e-7  # added to the std, as in the reference


@dataclasses.dataclass(frozen=True)
class MendConfig:
    """MEND hyper-parameters under the reference's names (EasyEdit `hparams/TRAINING/MEND/*.yaml`)."""

    rank: int = 1920
    n_hidden: int = 1
    mlp_class: str = "IDMLP"
    init: str = "id"
    combine: bool = True
    x_only: bool = False
    delta_only: bool = False
    one_sided: bool = False
    norm: bool = True
    shared: bool = True
    edit_lr: float = 1e-4
    # True: W - lr * g (the paper). False: W + lr * g (mend/EasyEdit code; required for their checkpoints).
    descent: bool = True

    def __post_init__(self):
        if self.mlp_class != "IDMLP":
            raise ValueError(f"MendConfig.mlp_class={self.mlp_class!r}: only 'IDMLP' (the reference default) is "
                             "implemented")
        if self.init not in ("id", "xavier"):
            raise ValueError(f"MendConfig.init={self.init!r}: expected 'id' or 'xavier'")
        if self.combine and (self.one_sided or self.x_only or self.delta_only):
            raise ValueError("MendConfig: combine=True cannot be used with one_sided/x_only/delta_only")
        if self.rank < 1 or self.n_hidden < 0:
            raise ValueError(f"MendConfig: rank={self.rank} must be >= 1 and n_hidden={self.n_hidden} >= 0")

    @classmethod
    def from_hparams(cls, hparams: Mapping, **overrides) -> MendConfig:
        """Picks this config's keys out of an EasyEdit hparams dict (other keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in hparams.items() if k in names}
        kw.update(overrides)
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class MendSpec:
    """The static layout: which sites are edited, their `(in, out)` shapes and shape groups.

    `sites` is the reference's `inner_params` order: it fixes the order of `edit_lrs` and each site's mode
    (its index within its group). Hashable, so it can be a static argument of `jax.jit`.
    """

    cfg: MendConfig
    sites: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (group key, member sites in mode order)

    def shape(self, site: str) -> tuple[int, int]:
        return self.shapes[self._index(site)]

    def group_of(self, site: str) -> tuple[str, int]:
        """`(group key, mode)` of a site."""
        for key, members in self.groups:
            if site in members:
                return key, members.index(site)
        raise KeyError(f"site {site!r} is not edited by this MEND (sites: {list(self.sites)})")

    def group_shape(self, key: str) -> tuple[int, int]:
        return self.shape(dict(self.groups)[key][0])

    def n_modes(self, key: str) -> int | None:
        return len(dict(self.groups)[key]) if self.cfg.shared else None

    def _index(self, site: str) -> int:
        if site not in self.sites:
            raise KeyError(f"site {site!r} is not edited by this MEND (sites: {list(self.sites)})")
        return self.sites.index(site)


def shape_key(shape: tuple[int, int]) -> str:
    """The reference's group name for a shape, `str(tuple(shape))`, e.g. `"(2560, 10240)"`."""
    return str(tuple(int(d) for d in shape))


def mend_spec(cfg: MendConfig, shapes: Mapping[str, tuple[int, int]]) -> MendSpec:
    """Builds the layout from `{site: (in, out)}` in inner-params order (dict order is kept)."""
    if not shapes:
        raise ValueError("mend_spec: no sites to edit")
    sites = tuple(shapes)
    dims = tuple((int(i), int(o)) for i, o in shapes.values())
    groups: dict[str, list[str]] = {}
    for site, shape in zip(sites, dims):
        groups.setdefault(shape_key(shape) if cfg.shared else site, []).append(site)
    return MendSpec(cfg, sites, dims, tuple((k, tuple(v)) for k, v in groups.items()))


# --------------------------------------------------------------------------------------------------
# Parameters.


def _side_widths(cfg: MendConfig, in_dim: int, out_dim: int) -> dict[str, int]:
    """Which networks a group has and their widths (an identity side has none)."""
    if cfg.combine:
        return {"mlp": in_dim + out_dim}
    if cfg.one_sided:
        return {"mlp_delta": out_dim} if in_dim > out_dim else {"mlp_u": in_dim}
    if cfg.x_only:
        return {"mlp_u": in_dim}
    if cfg.delta_only:
        return {"mlp_delta": out_dim}
    return {"mlp_u": in_dim, "mlp_delta": out_dim}


def _xavier_uniform(rng, shape, fan_in, fan_out, gain):
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def _init_lrlinear(rng, cfg: MendConfig, width: int, n_modes: int | None) -> dict:
    mid = min(cfg.rank, width)
    k_down, k_up = jax.random.split(rng)
    if cfg.init == "id":
        down = jax.random.normal(k_down, (width, mid), jnp.float32)
        up = jnp.zeros((mid, width), jnp.float32)
    else:  # xavier: gain sqrt(2) (relu) on U, 1 on V, as the reference
        down = _xavier_uniform(k_down, (width, mid), width, mid, 1.0)
        up = _xavier_uniform(k_up, (mid, width), mid, width, math.sqrt(2.0))
    layer = {"down": down, "up": up, "bias": jnp.zeros((width,), jnp.float32)}
    if n_modes is not None:
        layer["mode_scale"] = jnp.ones((n_modes, width), jnp.float32)
        layer["mode_shift"] = jnp.zeros((n_modes, width), jnp.float32)
    return layer


def _init_idmlp(rng, cfg: MendConfig, width: int, n_modes: int | None) -> dict:
    keys = jax.random.split(rng, cfg.n_hidden + 1)
    return {f"layer_{i}": _init_lrlinear(k, cfg, width, n_modes) for i, k in enumerate(keys)}


def init_stats(spec: MendSpec) -> dict:
    """Empty statistics (count 0) for every group."""

    def moments(d):
        return {"count": jnp.zeros((), jnp.float32), "mean": jnp.zeros((d,), jnp.float32),
                "m2": jnp.zeros((d,), jnp.float32)}

    out = {}
    for key, _ in spec.groups:
        i, o = spec.group_shape(key)
        out[key] = {"u": moments(i), "delta": moments(o)}
    return out


def random_stats(spec: MendSpec, seed: int = 0) -> dict:
    """Statistics shaped like a trained MEND's (count 100, means N(0, 0.1), standard deviations in [0.5, 2]), for
    tests and timing where no trained editor exists: empty ones (`init_stats`) leave the normalisation degenerate."""
    rng = np.random.default_rng(seed)

    def moments(d):
        return {"count": np.float32(100), "mean": rng.normal(0, 0.1, d).astype(np.float32),
                "m2": (99 * rng.uniform(0.5, 2.0, d) ** 2).astype(np.float32)}

    return {k: {"u": moments(spec.group_shape(k)[0]), "delta": moments(spec.group_shape(k)[1])}
            for k, _ in spec.groups}


def init_mend(rng: jax.Array, spec: MendSpec) -> tuple[dict, dict]:
    """`(params, stats)` for a fresh editor: identity networks, edit lrs = cfg.edit_lr, empty statistics."""
    cfg = spec.cfg
    nets = {}
    for key, rng_g in zip((k for k, _ in spec.groups), jax.random.split(rng, len(spec.groups))):
        i, o = spec.group_shape(key)
        widths = _side_widths(cfg, i, o)
        nets[key] = {
            name: _init_idmlp(k, cfg, w, spec.n_modes(key))
            for (name, w), k in zip(widths.items(), jax.random.split(rng_g, len(widths)))
        }
    edit_lrs = {site: jnp.asarray(cfg.edit_lr, jnp.float32) for site in spec.sites}
    return {"nets": nets, "edit_lrs": edit_lrs}, init_stats(spec)


# --------------------------------------------------------------------------------------------------
# Statistics: a masked batched Chan merge equal to the reference's sequential Welford loop over kept rows.


def nonzero_mask(u: jax.Array, delta: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The reference's kept rows: `any(u_t != 0) & any(delta_t != 0)` (and `mask`). `[..., T]` float32."""
    keep = jnp.any(u != 0, axis=-1) & jnp.any(delta != 0, axis=-1)
    if mask is not None:
        keep = keep & (mask != 0)
    return keep.astype(jnp.float32)


def merge_moments(moments: dict, x: jax.Array, mask: jax.Array) -> dict:
    """Adds the rows of `x: [..., d]` where `mask: [...]` is 1 to `{count, mean, m2}` (Chan et al. merge).

    Equals adding the kept rows one by one with Welford's update, in any order; a batch with no kept row
    leaves the moments unchanged.
    """
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    m = mask.reshape(-1).astype(jnp.float32)
    n_b = m.sum()
    mean_b = (m[:, None] * x).sum(0) / jnp.maximum(n_b, 1.0)
    m2_b = (m[:, None] * jnp.square(x - mean_b)).sum(0)
    n_a, mean_a, m2_a = moments["count"], moments["mean"], moments["m2"]
    n = n_a + n_b
    diff = mean_b - mean_a
    frac = n_b / jnp.maximum(n, 1.0)
    return {
        "count": n,
        "mean": mean_a + diff * frac,
        "m2": m2_a + m2_b + jnp.square(diff) * n_a * frac,
    }


def moments_std(moments: dict) -> jax.Array:
    """Sample std `sqrt(M2 / (k - 1))`; NaN while fewer than 2 rows were seen (the reference raises there)."""
    k = moments["count"]
    return jnp.where(k >= 2, jnp.sqrt(moments["m2"] / jnp.maximum(k - 1.0, 1.0)), jnp.nan)


def update_stats(
    spec: MendSpec,
    stats: dict,
    inputs: Mapping[str, tuple[jax.Array, jax.Array]],
    masks: Mapping[str, jax.Array],
) -> tuple[dict, dict]:
    """Training-mode statistics update, in the reference's order.

    Args:
      inputs: `{site: (u [..., T, in], delta [..., T, out])}` for every edited site; any leading axes (e.g. E
        edits) are pooled, since the statistics are shared by all edits.
      masks: `{site: [..., T]}` kept rows (use `nonzero_mask` to match the reference exactly).
    Returns:
      `(new_stats, per_site)`: `per_site[site]` is its group's `{"u", "delta"}` moments right after merging that
      site (sites merged in `spec.sites` order), which is what the reference normalises that site with.
    """
    missing = [s for s in spec.sites if s not in inputs or s not in masks]
    if missing:
        raise KeyError(f"update_stats: no inputs/masks for sites {missing}")
    stats = dict(stats)
    per_site = {}
    for site in spec.sites:
        key, _ = spec.group_of(site)
        u, delta = inputs[site]
        mask = masks[site]
        stats[key] = {
            "u": merge_moments(stats[key]["u"], u, mask),
            "delta": merge_moments(stats[key]["delta"], delta, mask),
        }
        per_site[site] = stats[key]
    return stats, per_site


def frozen_site_stats(spec: MendSpec, stats: dict) -> dict:
    """Eval mode: every site uses its group's statistics as they are."""
    return {site: stats[spec.group_of(site)[0]] for site in spec.sites}


def check_stats(spec: MendSpec, stats: dict) -> None:
    """Host-side check (outside jit) that every group has seen >= 2 rows, naming the group if not."""
    if not spec.cfg.norm:
        return
    for key, _ in spec.groups:
        for side in ("u", "delta"):
            k = float(stats[key][side]["count"])
            if not k >= 2:
                raise ValueError(f"MEND statistics of group {key!r} ({side}) have seen {k:g} rows; "
                                 "normalisation needs at least 2 (train first or load a checkpoint)")


# --------------------------------------------------------------------------------------------------
# The network.


def lrlinear(layer: dict, x: jax.Array, mode, residual: bool) -> jax.Array:
    """One LRLinear on `x: [T, D]`: `x + clamp((x @ down @ up + bias) * scale[mode] + shift[mode], 0)`."""
    pre = (x @ layer["down"]) @ layer["up"] + layer["bias"]
    if "mode_scale" in layer:
        pre = pre * layer["mode_scale"][mode] + layer["mode_shift"][mode]
    # torch's clamp(min=0) passes the gradient at exactly 0 (relu, and jnp.maximum's 1/2, would not); at the
    # identity init every pre-activation is exactly 0, so this sets the first training steps.
    act = jnp.where(pre >= 0, pre, 0.0)
    return x + act if residual else act


def idmlp(net: dict, x: jax.Array, mode, residual: bool = True) -> jax.Array:
    """The IDMLP: its LRLinear layers in order. `x: [T, D]`, `mode`: int or int32 scalar (may be traced)."""
    for i in range(len(net)):
        x = lrlinear(net[f"layer_{i}"], x, mode, residual)
    return x


def _normalise(x, moments, norm: bool):
    if not norm:
        return x
    return (x - moments["mean"]) / (moments_std(moments) + NORM_EPS)


def _gtransform(cfg: MendConfig, net: dict, site_stats: dict, u, delta, mask, mode):
    # First-order like the reference: no meta-gradient through the captured factors or the statistics.
    u, delta, site_stats = jax.lax.stop_gradient((u, delta, site_stats))
    u = _normalise(u.astype(jnp.float32), site_stats["u"], cfg.norm)
    delta = _normalise(delta.astype(jnp.float32), site_stats["delta"], cfg.norm)
    residual = cfg.init == "id"
    if cfg.combine:
        out = idmlp(net["mlp"], jnp.concatenate([u, delta], axis=-1), mode, residual)
        u_t, d_t = out[..., : u.shape[-1]], out[..., u.shape[-1]:]
    else:
        u_t = idmlp(net["mlp_u"], u, mode, residual) if "mlp_u" in net else u
        d_t = idmlp(net["mlp_delta"], delta, mode, residual) if "mlp_delta" in net else delta
    m = mask.astype(jnp.float32)[..., None]
    return u_t * m, d_t * m


def _check_factors(spec: MendSpec, site: str, u, delta, mask):
    i, o = spec.shape(site)
    if u.shape[-1] != i or delta.shape[-1] != o or u.shape[:-1] != delta.shape[:-1] or mask.shape != u.shape[:-1]:
        raise ValueError(f"MEND site {site!r} (in={i}, out={o}): got u {u.shape}, delta {delta.shape}, "
                         f"mask {mask.shape}; expected [T, {i}], [T, {o}], [T]")


def transform(spec: MendSpec, params: dict, site_stats: dict, site: str, u: jax.Array, delta: jax.Array,
              mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(u_tilde [T, in], delta_tilde [T, out])` for one site; masked rows are zero.

    `site_stats` is the `{"u", "delta"}` moments the site is normalised with (`update_stats(...)[1][site]` in
    training, `frozen_site_stats(...)[site]` in eval).
    """
    _check_factors(spec, site, u, delta, mask)
    key, mode = spec.group_of(site)
    return _gtransform(spec.cfg, params["nets"][key], site_stats, u, delta, mask, mode)


def edit_scale(spec: MendSpec, params: dict, site: str) -> jax.Array:
    """The patch scale: `-edit_lr` for descent, `+edit_lr` for the reference's ascent."""
    lr = params["edit_lrs"][site]
    return -lr if spec.cfg.descent else lr


def mend_patch(spec: MendSpec, params: dict, site_stats: dict, site: str, u: jax.Array, delta: jax.Array,
               mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One site's factored update `(a [T, in], b [T, out], scale [])`: `W + scale * a.T @ b`.

    `a.T @ b = sum_t u_tilde_t delta_tilde_t^T`, the reference's pseudo-gradient (mask zeroes padded rows).
    """
    u_t, d_t = transform(spec, params, site_stats, site, u, delta, mask)
    return u_t, d_t, edit_scale(spec, params, site)


def transform_group(spec: MendSpec, params: dict, group_key: str, site_stats: dict, u: jax.Array,
                    delta: jax.Array, mask: jax.Array, modes: tuple[int, ...] | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """All sites of one shape group in one call: inputs stacked in mode order.

    Args:
      site_stats: moments with a leading `[M]` axis (one per mode) on every leaf.
      u: `[M, T, in]`, delta: `[M, T, out]`, mask: `[M, T]`, M = number of sites in the group.
      modes: the members' modes when only some of the group's sites are stacked (default: all, in order).
    Returns: `(u_tilde [M, T, in], delta_tilde [M, T, out])`, the shared network run with each site's mode.
    """
    members = dict(spec.groups)[group_key]
    modes = tuple(range(len(members))) if modes is None else tuple(modes)
    if u.shape[0] != len(modes):
        raise ValueError(f"transform_group {group_key!r}: modes {modes} of sites {members} but u has leading "
                         f"axis {u.shape[0]}")
    net = params["nets"][group_key]
    modes = jnp.asarray(modes, dtype=jnp.int32)
    fn = lambda st, uu, dd, mm, md: _gtransform(spec.cfg, net, st, uu, dd, mm, md)
    return jax.vmap(fn)(site_stats, u, delta, mask, modes)


def stack_site_stats(spec: MendSpec, group_key: str, per_site: Mapping[str, dict]) -> dict:
    """Stacks the per-site moments of a group's members into the `[M]`-leading tree `transform_group` takes."""
    members = dict(spec.groups)[group_key]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *(per_site[s] for s in members))


def mend_patches(spec: MendSpec, params: dict, site_stats: Mapping[str, dict],
                 inputs: Mapping[str, tuple[jax.Array, jax.Array]], masks: Mapping[str, jax.Array]) -> dict:
    """Patches for every site of one edit, each shape group in one stacked network call.

    `inputs[site] = (u [T_site, in], delta [T_site, out])`. Members of a group with the same T share one
    stacked call (T differs where the last layer's sites carry only the answer rows). Returns
    `{site: (a, b, scale)}`. vmap this over edits.
    """
    out = {}
    for key, members in spec.groups:
        by_rows: dict[int, list[int]] = {}
        for j, s in enumerate(members):
            _check_factors(spec, s, inputs[s][0], inputs[s][1], masks[s])
            by_rows.setdefault(inputs[s][0].shape[0], []).append(j)
        stats = stack_site_stats(spec, key, site_stats)
        for modes in by_rows.values():
            sites = [members[j] for j in modes]
            u = jnp.stack([inputs[s][0] for s in sites])
            d = jnp.stack([inputs[s][1] for s in sites])
            m = jnp.stack([masks[s] for s in sites])
            st = jax.tree.map(lambda a: a[jnp.asarray(modes)], stats)  # noqa: B023 (used immediately)
            u_t, d_t = transform_group(spec, params, key, st, u, d, m, modes)
            for j, s in enumerate(sites):
                out[s] = (u_t[j], d_t[j], edit_scale(spec, params, s))
    return out


def mend_edit(spec: MendSpec, params: dict, stats: dict, inputs: Mapping[str, tuple[jax.Array, jax.Array]],
              masks: Mapping[str, jax.Array], training: bool) -> tuple[dict, dict]:
    """E independent edits: `inputs[site] = (u [E, T, in], delta [E, T, out])`, `masks[site]: [E, T]`.

    In training the shared statistics first absorb every kept row of the batch (reference order, see
    `update_stats`); in eval they are frozen. Returns `(patches {site: (a [E,T,in], b [E,T,out], scale [E])},
    new_stats)`. `training` must be static under jit.
    """
    if training:
        stats, per_site = update_stats(spec, stats, inputs, masks)
    else:
        per_site = frozen_site_stats(spec, stats)
    patches = jax.vmap(lambda i, m: mend_patches(spec, params, per_site, i, m))(inputs, masks)
    return patches, stats



def param_count(params: dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


__all__ = [
    "MendConfig", "MendSpec", "mend_spec", "shape_key", "init_mend", "init_stats", "nonzero_mask",
    "merge_moments", "moments_std", "update_stats", "frozen_site_stats", "check_stats", "lrlinear", "idmlp",
    "transform", "edit_scale", "mend_patch", "transform_group", "stack_site_stats", "mend_patches", "mend_edit",
    "param_count",
]
