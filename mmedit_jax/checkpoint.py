"""Checkpoints on disk: the only module that imports orbax.

A converted model is a directory:
  OUT/mmedit_config.json   {"format_version": 1, "model_type": "blip-2" | "llama", "param_dtype": ..., "config": {...},
                            "params_parts": ["part_00000", ...]}
  OUT/params/part_NNNNN/   Orbax (StandardCheckpointer) checkpoints, each of a subtree of the parameters
  OUT/checksums.json       size + sha256 of every file under params/ (see `mmedit_jax.integrity`), written once
                           the parameters are saved; `restore_params` verifies them before reading any data
                           (`verify=False` or `$MMEDIT_JAX_SKIP_VERIFY=1` skips that; a checkpoint written before
                           checksums existed loads with a one-line warning)
The parameters are split into parts of about `part_bytes` and saved part by part: Orbax holds a second copy
of whatever one save call writes, so one call for a whole 2.7B model would need twice its size in memory.
Restoring reads the on-disk metadata first and checks it against the template (the `jax.eval_shape` of the
model init for that config), so a mismatched checkpoint fails naming the parameter and both shapes, before
any data is read (orbax itself silently ignores a shape mismatch for numpy-saved leaves).

`CheckpointManager` wraps orbax's manager for periodic, atomic saves of a pytree plus JSON metadata (editor
training), keeping the `max_to_keep` latest steps.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmedit_jax import integrity, tree
from mmedit_jax.models.config import CONFIGS, Blip2Config, LlamaConfig

FORMAT_VERSION = 1
CONFIG_FILE = "mmedit_config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A converted checkpoint that is missing, malformed, corrupt or does not fit the model."""


REMEDY = "re-convert the model (python -m mmedit_jax.convert --hf-dir ... --out ... --overwrite)"



def is_converted(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by `save_model`."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))



def save_model(
    path: str | os.PathLike,
    config: Blip2Config | LlamaConfig,
    params: Mapping[str, Any] | Iterable[tuple[str, Any]],
    overwrite: bool = False,
    part_bytes: int = 1 << 28,
):
    """Write the parameters as Orbax checkpoints (parts of about `part_bytes`) plus `config` as JSON.

    `params`: a tree of numpy/jax arrays, or an iterable of `('a/b/c', array)` pairs, consumed lazily: the
    converter streams its output through here so only about one part is in memory at a time.
    """
    path = os.path.abspath(os.fspath(path))
    params_dir = os.path.join(path, PARAMS_DIR)
    if os.path.exists(params_dir):
        if not overwrite:
            raise FileExistsError(f"{params_dir} exists; pass overwrite=True to replace it")
        shutil.rmtree(params_dir)
    config_file = os.path.join(path, CONFIG_FILE)
    for stale in (config_file, os.path.join(path, integrity.CHECKSUMS_FILE)):
        if os.path.exists(stale):
            os.remove(stale)
    os.makedirs(params_dir)
    pairs = tree.flatten(params).items() if isinstance(params, Mapping) else params
    parts, dtypes, num_params = [], set(), 0
    with ocp.StandardCheckpointer() as ckptr:

        def flush(group):
            name = f"part_{len(parts):05d}"
            ckptr.save(os.path.join(params_dir, name), tree.unflatten(group))
            ckptr.wait_until_finished()
            parts.append(name)

        group, size = {}, 0
        for name, array in pairs:
            group[name] = array
            size += array.nbytes
            dtypes.add(str(np.dtype(array.dtype)))
            num_params += int(np.prod(array.shape))
            del array
            if size >= part_bytes:
                flush(group)
                group, size = {}, 0
        if group or not parts:
            flush(group)
        del group
    integrity.write_checksums(path, integrity.list_files(path, PARAMS_DIR))
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": config.model_type,
        "param_dtype": sorted(dtypes)[0] if len(dtypes) == 1 else sorted(dtypes),
        "num_params": num_params,
        "params_parts": parts,
        "config": config.to_dict(),
    }
    # The config is written last (after the checksums): its presence marks a complete checkpoint.
    tmp = config_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, config_file)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `mmedit_config.json` of a converted checkpoint (format version checked)."""
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file) as f:
            meta = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is not a converted checkpoint: {CONFIG_FILE} is missing") from e
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{file} has format_version {version!r}; this code reads {FORMAT_VERSION}")
    if "config" not in meta:
        raise CheckpointError(f"{file} has no 'config'")
    return meta


def read_config(path: str | os.PathLike) -> Blip2Config | LlamaConfig:
    meta = read_metadata(path)
    model_type = meta.get("model_type", Blip2Config.model_type)
    if model_type not in CONFIGS:
        raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)}: unknown model_type {model_type!r}")
    try:
        return CONFIGS[model_type].from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)}: bad config: {e}") from e


def _part_dirs(path: str) -> list[str]:
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir} is missing")
    parts = read_metadata(path).get("params_parts")
    if not parts:
        raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)} lists no params_parts")
    return [os.path.join(params_dir, p) for p in parts]


def _part_metadata(part_dir: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    try:
        with ocp.StandardCheckpointer() as ckptr:
            saved = ckptr.metadata(part_dir).item_metadata.tree
    except Exception as e:
        raise CheckpointError(f"cannot read the Orbax checkpoint {part_dir} ({_first_line(e)}): its metadata is "
                              f"missing or corrupt; {REMEDY}") from None
    return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in tree.flatten(saved or {}).items()}


def params_metadata(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{'a/b/c': (shape, dtype)} of the saved parameters, read from Orbax metadata (no tensor data)."""
    out = {}
    for part in _part_dirs(os.path.abspath(os.fspath(path))):
        out.update(_part_metadata(part))
    return out


def check_against_template(saved: Mapping[str, tuple], template: Mapping[str, Any], where: str):
    """Raise `CheckpointError` naming every missing/extra parameter and the first shape mismatches."""
    want = {k: tuple(v.shape) for k, v in tree.flatten(template).items()}
    missing = sorted(set(want) - set(saved))
    extra = sorted(set(saved) - set(want))
    bad = [(k, saved[k][0], want[k]) for k in sorted(set(want) & set(saved)) if tuple(saved[k][0]) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing parameters: {', '.join(missing[:20])}")
    if extra:
        problems.append(f"parameters the model does not have: {', '.join(extra[:20])}")
    for k, got, exp in bad[:20]:
        problems.append(f"parameter {k!r} has shape {tuple(got)} in the checkpoint, the model needs {exp}")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not fit the model: " + "; ".join(problems))


def _first_line(e: BaseException) -> str:
    """The innermost cause of `e`, on one line (TensorStore errors span dozens of lines, the cause last)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


def verify_params(path: str | os.PathLike, verify: bool | None = None) -> int | None:
    """Check the files under `path/params` against `path/checksums.json`: raises `CheckpointError` naming a
    truncated, missing or corrupt file; returns the number verified (None when skipped or when the checkpoint
    predates checksums, which warns once). `verify=None`: verify unless `$MMEDIT_JAX_SKIP_VERIFY` is set."""
    if verify is False or (verify is None and integrity.skip_requested()):
        return None
    try:
        return integrity.verify_checksums(os.fspath(path), remedy=REMEDY)
    except integrity.IntegrityError as e:
        raise CheckpointError(f"checkpoint {os.fspath(path)}: {e}") from None


def restore_params(path: str | os.PathLike, template: Mapping[str, Any], shardings: Any = None,
                   verify: bool | None = None) -> dict[str, Any]:
    """Restore the parameters under `path` as jax arrays with `template`'s shapes and dtypes.

    `template`: tree of `jax.ShapeDtypeStruct` (the dtype there is the restored dtype: a float32 checkpoint
    restores as bfloat16 if asked). `shardings`: optional tree (same structure) of `jax.sharding.Sharding`;
    by default every array goes to the default device. `verify`: check the files' checksums first (True), skip
    that (False), or verify unless `$MMEDIT_JAX_SKIP_VERIFY=1` (None, the default); see `verify_params`.
    """
    path = os.path.abspath(os.fspath(path))
    verify_params(path, verify)
    check_against_template(params_metadata(path), template, path)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, template)
    flat_template, flat_shardings = tree.flatten(template), tree.flatten(shardings)
    restored = {}
    with ocp.StandardCheckpointer() as ckptr:
        for part in _part_dirs(path):
            names = list(_part_metadata(part))
            target = {
                n: jax.ShapeDtypeStruct(flat_template[n].shape, flat_template[n].dtype, sharding=flat_shardings[n])
                for n in names
            }
            try:
                restored.update(tree.flatten(ckptr.restore(part, tree.unflatten(target))))
            except Exception as e:  # noqa: BLE001 - one clear line instead of a TensorStore spec dump
                raise CheckpointError(
                    f"cannot read the parameters in {part} ({_first_line(e)}): a data file under it is truncated "
                    f"or corrupt; {REMEDY}") from None
    return tree.unflatten(restored)


# --------------------------------------------------------------------------------------------------
# Periodic training checkpoints.


class CheckpointManager:
    """Periodic atomic saves of one pytree (`state`) plus JSON metadata, keeping the latest `max_to_keep`.

    >>> mngr = CheckpointManager(dir, max_to_keep=2, save_interval_steps=100)
    >>> mngr.save(step, state, {"val_acc": 0.9})      # a no-op between intervals (returns False)
    >>> state, meta = mngr.restore(template=abstract_state)   # latest step
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, save_interval_steps: int = 1):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(dict(metadata or {}))
        )
        return self._mngr.save(int(step), args=args, force=force)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def restore(self, step: int | None = None, template: Any = None) -> tuple[Any, dict[str, Any]]:
        """(state, metadata) at `step` (default: latest). `template`: abstract tree to restore into."""
        self._mngr.wait_until_finished()
        step = self._mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint steps in {self.directory}")
        if step not in self._mngr.all_steps():
            raise CheckpointError(f"step {step} not in {self.directory} (have {self.all_steps()})")
        state_args = ocp.args.StandardRestore(template) if template is not None else ocp.args.StandardRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(state=state_args, metadata=ocp.args.JsonRestore()))
        return out.state, dict(out.metadata)

    def wait(self):
        self._mngr.wait_until_finished()

    def close(self):
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step saved by `CheckpointManager` under `directory` (None if there is none)."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        return None
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(directory, options=options) as mngr:
        return mngr.latest_step()
