"""Apply conversion `Rule`s to a Hugging Face checkpoint, streaming one tensor at a time, checking everything.

`convert(path, template, rules, ignored, dtype)` reads the tensors of a checkpoint (a `*.safetensors` file, a
directory with one or sharded safetensors files and their index, or `pytorch_model*.bin` when torch is
installed) and fills a numpy parameter tree shaped like `template` (the `jax.eval_shape` of the model init).

Memory: every output array is allocated once, at its final shape and dtype, and checkpoint tensors are
written into it (a stacked parameter slice by slice), so the host holds the converted model plus one
checkpoint tensor. Safetensors files are re-opened for every tensor: a long-lived handle keeps the file
memory-mapped, and every page read through it would stay resident and double the peak.

Checks, all made from the file headers before any tensor data is read: every rule target is a template
parameter and every template parameter has a rule; every source key exists; no checkpoint key feeds two
rules; every checkpoint key is used or listed in `ignored`; every shape after its transform equals the
template's. Errors name the tensor key, the target and both shapes.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from mmedit_jax import tree
from mmedit_jax.convert.rules import TRANSFORMS, Rule

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class ConversionError(ValueError):
    """A checkpoint that does not fit the model (or a mapping that does not fit the checkpoint)."""


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------------
# Reading checkpoints.


class CheckpointReader:
    """The tensors of one checkpoint (possibly sharded): headers up front, data one tensor at a time.

    `shapes[key]` and `dtypes[key]` come from the file headers; `read(key)` returns a fresh numpy array.
    """

    def __init__(self, files: list[str]):
        self.files = files
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self._bin_cache: tuple[str, Mapping[str, Any]] | None = None
        for f in files:
            for key, shape, dtype in self._header(f):
                if key in self.file_of:
                    raise ConversionError(f"tensor {key!r} appears in two files: {self.file_of[key]} and {f}")
                self.file_of[key] = f
                self.shapes[key] = tuple(shape)
                self.dtypes[key] = dtype

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def _header(self, path: str):
        if path.endswith(".safetensors"):
            return _safetensors_header(path)
        return _bin_header(path)

    def read(self, key: str) -> np.ndarray:
        path = self.file_of[key]
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(path, framework="numpy") as f:
                    return f.get_tensor(key)
            except Exception as e:
                raise ConversionError(f"cannot read tensor {key!r} from {path}: {e}") from e
        # One .bin file stays loaded (memory-mapped) at a time; shards are usually read in order.
        if self._bin_cache is None or self._bin_cache[0] != path:
            self._bin_cache = None
            self._bin_cache = (path, _torch_load(path))
        return _torch_to_numpy(self._bin_cache[1][key])

    def close(self):
        self._bin_cache = None


def _safetensors_header(path: str):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            out = []
            for key in f.keys():
                sl = f.get_slice(key)
                out.append((key, sl.get_shape(), _safetensors_dtype(sl.get_dtype(), path, key)))
            return out
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"corrupt or truncated safetensors file {path}: {e}") from e


_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _safetensors_dtype(name: str, path: str, key: str) -> np.dtype:
    if name not in _ST_DTYPES:
        raise ConversionError(f"tensor {key!r} in {path} has unsupported dtype {name}")
    return np.dtype(_ST_DTYPES[name])


# What torch's weights-only unpickler says of a well-formed pickle that wants more than tensors (a global it
# does not allow, a call, an object to build); anything else it refuses (a bad opcode, a runaway string) is
# damage. Its own text for these starts "Weights only load failed", on several lines.
_CODE_REFUSALS = ("GLOBAL", "global", "Trying to call", "Can only build", "Can only create", "Can only append",
                  "Can only extend", "Can only SETITEM", "Can only SETITEMS", "must be imported",
                  "Only persistent_load of storage")
_TORCH_BOILERPLATE = ("Weights only load failed", "In PyTorch", "Re-running", "Please file an issue", "Check the "
                      "documentation", "(1)", "(2)", "This file can still be loaded")


def _detail(message: str) -> str:
    """The informative line of a torch error (its weights-only messages wrap it in advice on several lines)."""
    lines = [ln.strip() for ln in message.replace("\033[1m", "").replace("\033[0m", "").splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)]
    line = (useful or lines or [""])[0].removeprefix("WeightsUnpickler error: ")
    return line[:300]


def _holds_code(message: str) -> bool:
    return "Weights only load failed" in message and any(k in _detail(message) for k in _CODE_REFUSALS)


# torch.load(weights_only=True) refuses two whole formats outright (RuntimeError "Cannot use
# ``weights_only=True`` with ..."): TorchScript archives and the pre-1.6 .tar format; both need trusted code.


def _refused_message(path: str, message: str) -> str:
    return (
        f"{path} was refused: it is a pickle that holds code or objects beyond tensors ({_detail(message)}), and "
        "loading it would run that code. If you trust the file, convert it to safetensors in trusted Python, "
        "e.g. `safetensors.torch.save_file(torch.load(PATH, weights_only=False), 'model.safetensors')` (or "
        "`model.save_pretrained(DIR, safe_serialization=True)`), and point the converter at that"
    )


def _torch_load(path: str) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"{path} is a PyTorch pickle checkpoint; reading it needs torch (pip install torch==2.13.0), "
            "or convert the checkpoint to safetensors"
        ) from e
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            # A legacy (non-zip) torch file cannot be memory-mapped; read it whole, still weights-only.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        if _holds_code(str(e)) or "Cannot use ``weights_only=True``" in str(e):
            raise ConversionError(_refused_message(path, str(e))) from None
        raise ConversionError(f"corrupt or truncated PyTorch checkpoint {path}: {_detail(str(e))}") from None
    except Exception as e:
        raise ConversionError(f"corrupt or truncated PyTorch checkpoint {path}: {_detail(str(e))}") from None
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return sd


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def _bin_header(path: str):
    sd = _torch_load(path)  # first: it gives the clear error when torch is absent
    import torch

    out = []
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"entry {key!r} of {path} is not a tensor ({type(t).__name__})")
        dtype = ml_dtypes.bfloat16 if t.dtype == torch.bfloat16 else torch.empty((), dtype=t.dtype).numpy().dtype
        out.append((key, tuple(t.shape), np.dtype(dtype)))
    return out


class StateDictReader:
    """The tensors of one state dict held in memory (a `CheckpointReader`'s interface: `keys`, `in`, `shapes`,
    `dtypes`, `read`, `close`), e.g. the `model` entry of a LAVIS/MiniGPT-4 `.pth` file."""

    def __init__(self, state: Mapping[str, Any], where: str):
        import torch

        self._state = state
        self.shapes, self.dtypes = {}, {}
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise ConversionError(f"entry {key!r} of {where} is not a tensor ({type(t).__name__})")
            self.shapes[key] = tuple(t.shape)
            self.dtypes[key] = np.dtype(ml_dtypes.bfloat16 if t.dtype == torch.bfloat16
                                        else torch.empty((), dtype=t.dtype).numpy().dtype)

    def keys(self) -> list[str]:
        return list(self._state)

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def read(self, key: str) -> np.ndarray:
        return _torch_to_numpy(self._state[key])

    def close(self):
        pass


def open_torch_state(path: str | os.PathLike, entry: str | None = "model") -> StateDictReader:
    """The tensors of a torch `.pth` file (its `entry` dict, e.g. LAVIS's `{'model': state_dict}`; None: the
    top level), read with torch's weights-only unpickler: a pickle that would build objects or run code is refused
    (`ConversionError`), as for `.bin` checkpoints."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    sd = _torch_load(path)
    if entry is not None:
        if entry not in sd or not isinstance(sd[entry], Mapping):
            raise ConversionError(f"{path} has no {entry!r} state dict (top-level keys: {_listing(map(str, sd))})")
        sd = sd[entry]
    return StateDictReader(sd, f"{path}[{entry!r}]" if entry else path)


class MergedReader:
    """Several readers as one, each key prefixed by its reader's name (`'llama:model.norm.weight'`), so one set of
    rules and one `check_rules` cover a model assembled from several checkpoints."""

    SEP = ":"

    def __init__(self, parts: Mapping[str, Any]):
        self.parts = dict(parts)
        self.shapes, self.dtypes = {}, {}
        for name, reader in self.parts.items():
            for key in reader.keys():
                self.shapes[f"{name}{self.SEP}{key}"] = reader.shapes[key]
                self.dtypes[f"{name}{self.SEP}{key}"] = reader.dtypes[key]

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def read(self, key: str) -> np.ndarray:
        name, _, inner = key.partition(self.SEP)
        return self.parts[name].read(inner)

    def close(self):
        for reader in self.parts.values():
            reader.close()


def _index_files(index_path: str) -> list[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"cannot read checkpoint index {index_path}: {e}") from e
    folder = os.path.dirname(index_path)
    files = sorted(set(weight_map.values()))
    for name in files:
        if not os.path.isfile(os.path.join(folder, name)):
            raise ConversionError(f"shard {name} listed in {index_path} is missing")
    return [os.path.join(folder, name) for name in files]


def read_hf_json(directory: str | os.PathLike, name: str = "config.json") -> tuple[str, dict]:
    """A Hugging Face directory's `config.json` (or `name`), parsed: -> `(its path, the dict)`; a missing or
    malformed file is an error naming it."""
    file = os.path.join(directory, name)
    try:
        with open(file) as f:
            return file, json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{file} is missing: not a Hugging Face model directory") from e
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def checkpoint_files(path: str | os.PathLike) -> list[str]:
    """The tensor files of a checkpoint: a file itself, or a directory's (sharded) safetensors or .bin."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    join = lambda name: os.path.join(path, name)
    if os.path.isfile(join(SAFETENSORS_INDEX)):
        return _index_files(join(SAFETENSORS_INDEX))
    if os.path.isfile(join(SAFETENSORS_SINGLE)):
        return [join(SAFETENSORS_SINGLE)]
    loose = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if loose:
        return [join(n) for n in loose]
    if os.path.isfile(join(BIN_INDEX)):
        return _index_files(join(BIN_INDEX))
    if os.path.isfile(join(BIN_SINGLE)):
        return [join(BIN_SINGLE)]
    raise FileNotFoundError(
        f"no checkpoint tensors in {path}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} "
        f"or {BIN_INDEX}"
    )


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Headers of every tensor of the checkpoint at `path` (a file or a directory); data stays on disk."""
    return CheckpointReader(checkpoint_files(path))


# --------------------------------------------------------------------------------------------------
# Templates.




def _transformed_shape(transform: Callable, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `transform` gives an array of `shape`, computed on a zero-stride view (no memory)."""
    return tuple(transform(np.broadcast_to(np.zeros((), np.float32), shape)).shape)


# --------------------------------------------------------------------------------------------------
# Checking and applying the rules.


def check_rules(
    reader: CheckpointReader,
    template: Mapping[str, Any],
    rules: Iterable[Rule],
    ignored: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Every check that needs only headers; returns the flat template. Raises `ConversionError`."""
    flat = tree.flatten(template)
    ignored = dict(ignored or {})
    rules = list(rules)
    target_of: dict[str, str] = {}
    ruled: set[str] = set()
    for rule in rules:
        if rule.target not in flat:
            raise ConversionError(f"rule target {rule.target!r} is not a parameter of the model")
        if rule.target in ruled:
            raise ConversionError(f"two rules fill the parameter {rule.target!r}")
        ruled.add(rule.target)
        for key in rule.sources:
            if key in target_of:
                raise ConversionError(
                    f"checkpoint tensor {key!r} is used by two rules: {target_of[key]!r} and {rule.target!r}"
                )
            if key in ignored:
                raise ConversionError(f"checkpoint tensor {key!r} is both ignored and used by {rule.target!r}")
            target_of[key] = rule.target

    unfilled = [t for t in flat if t not in ruled]
    if unfilled:
        raise ConversionError(f"no rule fills the model parameters: {_listing(unfilled)}")

    missing = [(t, k) for k, t in target_of.items() if k not in reader]
    if missing:
        lines = "; ".join(f"{t} expects {k!r}" for t, k in missing[:20])
        more = f" ... ({len(missing) - 20} more)" if len(missing) > 20 else ""
        raise ConversionError(f"{len(missing)} tensor(s) missing from the checkpoint: {lines}{more}")

    unused = [k for k in reader.keys() if k not in target_of and k not in ignored]
    if unused:
        raise ConversionError(f"{len(unused)} checkpoint tensor(s) are not used by any rule: {_listing(unused)}")

    for rule in rules:
        want = tuple(flat[rule.target].shape)
        transform = TRANSFORMS[rule.transform]
        if rule.stacked and (not want or want[0] != len(rule.sources)):
            raise ConversionError(
                f"parameter {rule.target!r} has shape {want}, but its rule stacks {len(rule.sources)} tensors"
            )
        slot = want[1:] if rule.stacked else want
        for key in rule.sources:
            got = _transformed_shape(transform, reader.shapes[key])
            if got != slot:
                raise ConversionError(_shape_message(key, reader.shapes[key], rule, got, slot))
    return flat


def _shape_message(key, src_shape, rule, got, want) -> str:
    where = "each slice of " if rule.stacked else ""
    return (
        f"shape mismatch: checkpoint tensor {key!r} {tuple(src_shape)} gives {tuple(got)} after "
        f"{rule.transform!r}, but {where}parameter {rule.target!r} needs {tuple(want)}"
    )


def iter_rules(
    reader: CheckpointReader,
    template: Mapping[str, Any],
    rules: Iterable[Rule],
    ignored: Mapping[str, str] | None = None,
    dtype: Any = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(target, array)` per rule, each array cast to `dtype` (default: the template leaf's dtype).

    Every check of `check_rules` runs before the first tensor is read. A consumer that writes each array
    away and drops it (the CLI's part-wise save) needs only about one parameter of memory at a time.
    """
    rules = list(rules)
    flat = check_rules(reader, template, rules, ignored)
    try:
        for rule in rules:
            want = tuple(flat[rule.target].shape)
            out_dtype = np.dtype(dtype if dtype is not None else flat[rule.target].dtype)
            transform = TRANSFORMS[rule.transform]
            array = np.empty(want, out_dtype)
            slots = [array[i] for i in range(len(rule.sources))] if rule.stacked else [array]
            for key, slot in zip(rule.sources, slots):
                value = transform(reader.read(key))
                # The header check ran already; this guards against a file whose data disagrees with it,
                # and against numpy silently broadcasting into the slot.
                if value.shape != slot.shape:
                    raise ConversionError(_shape_message(key, reader.shapes[key], rule, value.shape, slot.shape))
                slot[...] = value
                del value
            yield rule.target, array
            del array, slots
    finally:
        reader.close()


def apply_rules(
    reader: CheckpointReader,
    template: Mapping[str, Any],
    rules: Iterable[Rule],
    ignored: Mapping[str, str] | None = None,
    dtype: Any = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fill a numpy tree shaped like `template` from `reader`'s tensors (cast to `dtype`, default the
    template leaf's dtype). Every check of `check_rules` runs first, then tensors are read one by one."""
    out = {}
    for target, array in iter_rules(reader, template, rules, ignored, dtype):
        out[target] = array
        if progress is not None:
            progress(target)
    return tree.unflatten(out)


def convert(
    path: str | os.PathLike,
    template: Mapping[str, Any],
    rules: Iterable[Rule],
    ignored: Mapping[str, str] | None = None,
    dtype: Any = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Convert the checkpoint at `path` (file or directory) into a numpy param tree shaped like `template`."""
    return apply_rules(open_checkpoint(path), template, rules, ignored, dtype, progress)
