"""Saving and loading trained editors: one directory each, `spec.json` (format, config, sites, shapes) + `.npz`.

Formats: `mmedit_jax.mend/1` (`params.npz`, `stats.npz`), `mmedit_jax.ke/1` and `mmedit_jax.serac/1`
(`params.npz`: SERAC's classifier, counterfactual model and image projection; its config in `spec.json`).
Parameter trees are flattened with `::` between keys (`tree.flatten`). A save ends with `checksums.json`
(`integrity.py`), verified before a load (`verify=False` or `MMEDIT_JAX_SKIP_VERIFY=1` skips it; an editor
saved before checksums existed loads with a warning). The trainer's own resumable checkpoints are Orbax
(`checkpoint.py`); these files are what `evaluate --editor-ckpt` and `train --init-editor` read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from mmedit_jax import integrity, tree
from mmedit_jax.editors import ke_net as KN
from mmedit_jax.editors import mend_net as MN
from mmedit_jax.editors import serac_net as SN
from mmedit_jax.editors.ke import KESpec, ke_spec

SEP = "::"
MEND_FORMAT = "mmedit_jax.mend/1"
KE_FORMAT = "mmedit_jax.ke/1"
SERAC_FORMAT = "mmedit_jax.serac/1"


def _write(out_dir: str, meta: dict, arrays: Mapping[str, dict]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "spec.json"), "w") as f:
        json.dump(meta, f, indent=1)
    for name, params in arrays.items():
        np.savez(os.path.join(out_dir, name), **{k: np.asarray(v) for k, v in tree.flatten(params, SEP).items()})
    integrity.write_checksums(out_dir, ["spec.json", *arrays])


def verify_files(out_dir: str, verify: bool | None = None) -> None:
    """Checks a saved editor's files against the checksums written with them (`verify=None`: unless
    `MMEDIT_JAX_SKIP_VERIFY` is set)."""
    if verify is False or (verify is None and integrity.skip_requested()):
        return
    integrity.verify_checksums(out_dir, remedy="save or train the editor again")


def read_spec(out_dir: str) -> dict:
    """`spec.json` of a saved editor; errors name the file."""
    path = os.path.join(out_dir, "spec.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {out_dir} is not a saved editor (train one with "
                                "`python -m mmedit_jax.train`)") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the editor directory is damaged; save it again") from None


def _read_arrays(out_dir: str, name: str) -> dict:
    path = os.path.join(out_dir, name)
    try:
        with np.load(path) as z:
            arrays = dict(z.items())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the editor directory is incomplete; save it again") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); save or train the editor "
                         "again") from None
    for key, a in arrays.items():
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise ValueError(f"{path}: {key.replace(SEP, '/')} holds NaN or inf ({int((~np.isfinite(a)).sum())} of "
                             f"{a.size} entries): this editor cannot edit; train it again")
    return tree.unflatten({k: jnp.asarray(v) for k, v in arrays.items()}, SEP)


def _check_format(out_dir: str, meta: dict, want: str) -> None:
    if meta.get("format") != want:
        raise ValueError(f"{out_dir}/spec.json is not a {want.split('.')[1].split('/')[0].upper()} editor "
                         f"(format {meta.get('format')!r}, expected {want!r})")


def _shapes(meta: dict) -> dict[str, tuple[int, int]]:
    return {s: tuple(sh) for s, sh in zip(meta["sites"], meta["shapes"])}


def save_mend(out_dir: str, spec: MN.MendSpec, params: dict, stats: dict, source: Mapping | None = None) -> None:
    """Writes `spec.json`, `params.npz`, `stats.npz` under `out_dir`."""
    meta = {"format": MEND_FORMAT, "config": dataclasses.asdict(spec.cfg), "sites": list(spec.sites),
            "shapes": [list(s) for s in spec.shapes], "source": dict(source or {})}
    _write(out_dir, meta, {"params.npz": params, "stats.npz": stats})


def load_mend(out_dir: str, verify: bool | None = None) -> tuple[MN.MendSpec, dict, dict]:
    """`(spec, params, stats)` of what `save_mend` wrote (checksums checked first, see `verify_files`)."""
    verify_files(out_dir, verify)
    meta = read_spec(out_dir)
    _check_format(out_dir, meta, MEND_FORMAT)
    spec = MN.mend_spec(MN.MendConfig(**meta["config"]), _shapes(meta))
    return spec, _read_arrays(out_dir, "params.npz"), _read_arrays(out_dir, "stats.npz")


def save_ke(out_dir: str, spec: KESpec, params) -> None:
    """Writes `spec.json` and `params.npz` under `out_dir`."""
    meta = {"format": KE_FORMAT, "config": dataclasses.asdict(spec.cfg), "sites": list(spec.sites),
            "shapes": [list(s) for s in spec.shapes]}
    _write(out_dir, meta, {"params.npz": params})


def load_ke(out_dir: str, verify: bool | None = None) -> tuple[KESpec, dict]:
    """`(spec, params)` of what `save_ke` wrote (checksums checked first, see `verify_files`)."""
    verify_files(out_dir, verify)
    meta = read_spec(out_dir)
    _check_format(out_dir, meta, KE_FORMAT)
    return ke_spec(KN.KEConfig(**meta["config"]), _shapes(meta)), _read_arrays(out_dir, "params.npz")


def save_serac(out_dir: str, cfg: SN.SeracConfig, params) -> None:
    """Writes `spec.json` (the config) and `params.npz` under `out_dir`."""
    _write(out_dir, {"format": SERAC_FORMAT, "config": cfg.to_json()}, {"params.npz": params})


def load_serac(out_dir: str, verify: bool | None = None) -> tuple[SN.SeracConfig, dict]:
    """`(config, params)` of what `save_serac` wrote (checksums checked first, see `verify_files`)."""
    verify_files(out_dir, verify)
    meta = read_spec(out_dir)
    _check_format(out_dir, meta, SERAC_FORMAT)
    return SN.SeracConfig.from_json(meta["config"]), _read_arrays(out_dir, "params.npz")


def load_state(out_dir: str, verify: bool | None = None) -> tuple[str, object, dict, dict]:
    """`(kind, spec, params, editor_state)` of any saved editor (`editor_state`: MEND's statistics, `{}` for KE and
    SERAC; SERAC's `spec` is its `SeracConfig`)."""
    fmt = read_spec(out_dir).get("format")
    if fmt == MEND_FORMAT:
        spec, params, stats = load_mend(out_dir, verify)
        return "mend", spec, params, stats
    if fmt == KE_FORMAT:
        spec, params = load_ke(out_dir, verify)
        return "ke", spec, params, {}
    if fmt == SERAC_FORMAT:
        cfg, params = load_serac(out_dir, verify)
        return "serac", cfg, params, {}
    raise ValueError(f"{out_dir}/spec.json: unknown editor format {fmt!r} (expected {MEND_FORMAT}, {KE_FORMAT} or "
                     f"{SERAC_FORMAT})")
