"""Import an EasyEdit-trained MEND editor (a PyTorch checkpoint) as our MEND params + statistics.

EasyEdit's trainer saves `torch.save({"model": MEND.state_dict(), "opt": ..., ...})`; the MEND state dict holds
(base-model weights removed, `model_config` added):
  * `mend.<group>.<net>.layers.<i>.{u [D, mid], v [mid, D], bias [D], mode_scale.weight [M, D],
    mode_shift.weight [M, D]}` with `<group>` = `"(in, out)"` when shared (else the parameter name with `.` ->
    `#`) and `<net>` = `mlp` (combine) or `mlp1` (u side) / `mlp2` (delta side);
  * `mend.<group>.{u_mean, v_mean, u_std, v_std, u_s, v_s, k}`: Welford buffers (`u_s`, `v_s` are M2, `k` the
    count; `v` means delta here);
  * `edit_lrs [n]`, one per inner param in the hparams' `inner_params` order.
The shared-mode keys name shapes, not parameters, so the inner-param names come from the hparams YAML (or the
caller), and each name is matched to its shape group (`--shape`, or by its projection kind, see
`infer_shapes`). The result uses `descent=False`: these editors were trained with `W + lr * g`.

CLI (`python -m mmedit_jax.convert mend-easyedit ...`, `main(argv)` gets the arguments after the subcommand):
    --ckpt FILE --out DIR [--hparams YAML] [--inner-param NAME ...] [--shape NAME=IN,OUT ...]
    [--init id|xavier] [--no-norm] [--trust-pickle]
The checkpoint is read without importing or running any pickled class (see `load_checkpoint`).
Output directory (`editors.io.save_mend`): `spec.json` (config, sites, shapes, source names), `params.npz`,
`stats.npz`; npz keys are tree paths joined by `::`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import types
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax.editors import mend_net as mn
from mmedit_jax.editors.io import save_mend
from mmedit_jax.sites import easyedit_site

_SHARED_GROUP = re.compile(r"^\((\d+), (\d+)\)$")
_NETS = {"mlp": "mlp", "mlp1": "mlp_u", "mlp2": "mlp_delta"}
_LAYER_KEY = re.compile(r"^(mlp|mlp1|mlp2)\.layers\.(\d+)\.(u|v|bias|mode_scale\.weight|mode_shift\.weight)$")
_BUFFERS = ("u_mean", "v_mean", "u_std", "v_std", "u_s", "v_s", "k")

# Module kinds whose Linear expands (in < out) or contracts (in > out): enough to place BLIP-2/OPT, Q-Former,
# LLaMA, GPT-J and GPT-2 MLP matrices in their shape group without loading the model.
_EXPANDING = ("fc1", "fc_in", "c_fc", "up_proj", "gate_proj", "intermediate.dense", "intermediate_query.dense")
_CONTRACTING = ("fc2", "fc_out", "c_proj", "down_proj", "output.dense", "output_query.dense")



class _Stub:
    """Stands in for any pickled object of a class we do not load (e.g. the base model's config): it swallows
    its construction arguments and state, and nothing of it is ever called."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self._state = state

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Resolves torch's tensor-rebuild helpers and plain containers; every other global becomes a `_Stub`
    subclass, so no foreign code (EasyEdit, transformers, omegaconf classes) is imported or run."""

    _ALLOWED = {("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"), ("torch", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED or (module == "torch._utils" and name.startswith("_rebuild_")) or (
                module == "torch" and name in _TORCH_DTYPES):
            return super().find_class(module, name)
        return type(name, (_Stub,), {"__module__": f"stub.{module}"})


_TORCH_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "bool"}


def _restricted_load(file, **kwargs):
    """`pickle.load` through `_TensorsOnlyUnpickler`: torch's legacy (non-zip) loader unpickles the magic
    number, protocol version, system info and storage keys (and the old tar format's storage/tensor tables)
    with `pickle_module.load`, so this must be as restricted as the main object's unpickler."""
    return _TensorsOnlyUnpickler(file, **kwargs).load()


def _restricted_loads(data, **kwargs):
    import io

    return _restricted_load(io.BytesIO(data), **kwargs)


# The `pickle_module` handed to `torch.load`: torch uses `Unpickler` (subclassing it) and `load`; every other
# name it could reach for is restricted too, so nothing in a checkpoint runs through the plain pickle module.
_TENSORS_ONLY_PICKLE = types.SimpleNamespace(
    __name__="mmedit_jax_tensors_only", Unpickler=_TensorsOnlyUnpickler, load=_restricted_load,
    loads=_restricted_loads, UnpicklingError=pickle.UnpicklingError)


def _torchscript_archive(path: str) -> bool:
    """Whether `path` is a TorchScript zip (torch.load hands those to torch.jit.load, which runs their code),
    asked the way torch.load asks (its zip reader), and of Python's zipfile as well."""
    import zipfile

    import torch.serialization as ts

    try:
        with open(path, "rb") as f:
            if ts._is_zipfile(f):
                with ts._open_zipfile_reader(f) as z:
                    if ts._is_torchscript_zip(z):
                        return True
    except (AttributeError, OSError, RuntimeError):  # not a readable zip: torch.load reports it
        pass
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """The MEND state dict of an EasyEdit checkpoint as float32 NumPy arrays (non-tensor entries dropped).

    EasyEdit pickles the base model's config into the checkpoint. By default the file is read with an
    unpickler that rebuilds tensors and replaces every other object by an inert stub (no foreign classes
    are imported, no code is run, in every pickle of both torch formats: zip and legacy); `trust_pickle=True`
    uses plain `torch.load` instead. TorchScript archives are refused unless trusted (loading one runs its code).
    """
    import torch

    if trust_pickle:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    else:
        if _torchscript_archive(path):
            raise ValueError(f"{path} is a TorchScript archive: loading it runs the code it holds; if you trust "
                             "this file, pass --trust-pickle")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TENSORS_ONLY_PICKLE)
        except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file name
            raise ValueError(f"{path}: could not read the checkpoint with the tensors-only unpickler "
                             f"({type(e).__name__}: {e}); if you trust this file, pass --trust-pickle") from e
    sd = obj["model"] if isinstance(obj, Mapping) and "model" in obj else obj
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a dict with a 'model' state dict, got {type(obj).__name__}")
    return {k: v.detach().to(torch.float32).numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _parse_groups(sd: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if not key.startswith("mend."):
            continue
        group, _, rest = key[len("mend."):].partition(".")
        if not (rest in _BUFFERS or _LAYER_KEY.match(rest)):
            raise ValueError(f"unexpected MEND state-dict key {key!r}")
        groups.setdefault(group, {})[rest] = value
    if not groups:
        heads = sorted({k.split(".")[0] for k in sd})
        raise ValueError(f"no 'mend.*' keys in the state dict (its keys start with {heads})")
    return groups


def infer_shapes(inner_params: Sequence[str], group_shapes: Sequence[tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """`{name: (in, out)}` for shared-mode groups: one group takes every name; otherwise a name goes to the only
    group whose direction (expanding in < out / contracting in > out) matches its module kind."""
    if len(group_shapes) == 1:
        return {n: tuple(group_shapes[0]) for n in inner_params}
    out = {}
    for name in inner_params:
        stem = name.removesuffix(".weight")
        if any(stem.endswith(k) for k in _EXPANDING):
            cands = [s for s in group_shapes if s[0] < s[1]]
        elif any(stem.endswith(k) for k in _CONTRACTING):
            cands = [s for s in group_shapes if s[0] > s[1]]
        else:
            cands = []
        if len(cands) != 1:
            raise ValueError(f"cannot tell which shape group {list(group_shapes)} inner param {name!r} belongs to; "
                             "pass its shape explicitly (--shape NAME=IN,OUT)")
        out[name] = tuple(cands[0])
    return out


def convert_state_dict(
    sd: Mapping[str, np.ndarray],
    inner_params: Sequence[str],
    *,
    shapes: Mapping[str, tuple[int, int]] | None = None,
    sites: Mapping[str, str] | None = None,
    init: str = "id",
    norm: bool = True,
    edit_lr: float | None = None,
) -> tuple[mn.MendSpec, dict, dict]:
    """`(spec, params, stats)` from an EasyEdit MEND state dict.

    Args:
      sd: the state dict (`load_checkpoint`), torch layout, NumPy arrays.
      inner_params: EasyEdit's `inner_params` in hparams order (fixes `edit_lrs` order and modes).
      shapes: `{inner param: (in, out)}` where `infer_shapes` cannot tell (shared mode only).
      sites: `{inner param: our site name}` overrides (default `sites.easyedit_site(name, strict=False)`).
      init, norm: not recoverable from weights (forward-relevant): take them from the hparams.
      edit_lr: the config's initial edit lr (informational; the learned values come from `edit_lrs`).
    """
    inner_params = list(inner_params)
    groups = _parse_groups(sd)
    if "edit_lrs" not in sd:
        raise ValueError("state dict has no 'edit_lrs'")
    edit_lrs = np.asarray(sd["edit_lrs"]).reshape(-1)
    if len(edit_lrs) != len(inner_params):
        raise ValueError(f"edit_lrs has {len(edit_lrs)} entries but {len(inner_params)} inner params were given: "
                         f"{inner_params}")
    shared = all(_SHARED_GROUP.match(g) for g in groups)
    if not shared and any(_SHARED_GROUP.match(g) for g in groups):
        raise ValueError(f"mixed shared and per-parameter MEND groups: {list(groups)}")

    # Network structure, checked to be the same in every group.
    nets = {g: sorted({k.split(".")[0] for k in entries if _LAYER_KEY.match(k)}) for g, entries in groups.items()}
    some = next(iter(groups.values()))
    net0 = sorted({k.split(".")[0] for k in some if _LAYER_KEY.match(k)})
    n_layers = len({k.split(".")[2] for k in some if _LAYER_KEY.match(k) and k.startswith(net0[0] + ".")})
    rank = some[f"{net0[0]}.layers.0.v"].shape[0]
    combine = net0 == ["mlp"]
    sides = {tuple(v) for v in nets.values()}
    flags = {}
    if not combine and sides != {("mlp1", "mlp2")}:
        if sides == {("mlp1",)}:
            flags = {"x_only": True}
        elif sides == {("mlp2",)}:
            flags = {"delta_only": True}
        else:
            flags = {"one_sided": True}
    cfg = mn.MendConfig(rank=int(rank), n_hidden=n_layers - 1, init=init, combine=combine, norm=norm,
                        shared=shared, descent=False, **flags,
                        **({"edit_lr": float(edit_lr)} if edit_lr is not None else {}))

    # Sites and shapes, in inner-params order.
    if shared:
        group_shapes = [tuple(int(x) for x in _SHARED_GROUP.match(g).groups()) for g in groups]
        given = dict(shapes or {})
        rest = [n for n in inner_params if n not in given]
        given.update(infer_shapes(rest, group_shapes) if rest else {})
        by_name = {n: tuple(int(x) for x in given[n]) for n in inner_params}
    else:
        by_name = {}
        for n in inner_params:
            g = groups.get(n.replace(".", "#"))
            if g is None:
                raise ValueError(f"inner param {n!r} has no group 'mend.{n.replace('.', '#')}' in the state dict")
            by_name[n] = (g["u_mean"].shape[0], g["v_mean"].shape[0])
    site_of = {n: (sites or {}).get(n, easyedit_site(n, strict=False)) for n in inner_params}
    spec = mn.mend_spec(cfg, {site_of[n]: by_name[n] for n in inner_params})

    src_group = {}
    for key, members in spec.groups:
        src = key if shared else next(n for n in inner_params if site_of[n] == key).replace(".", "#")
        if src not in groups:
            raise ValueError(f"no MEND group 'mend.{src}' in the state dict for sites {members} "
                             f"(groups present: {list(groups)})")
        n_modes = groups[src].get(f"{net0[0]}.layers.0.mode_scale.weight")
        if shared and (n_modes is None or n_modes.shape[0] != len(members)):
            raise ValueError(f"group {src!r}: state dict has "
                             f"{None if n_modes is None else n_modes.shape[0]} modes, inner params give "
                             f"{len(members)} ({members}); check inner_params / --shape")
        src_group[key] = src

    # Shapes only (no random init of a possibly large network).
    params = jax.eval_shape(lambda: mn.init_mend(jax.random.key(0), spec)[0])
    stats = mn.init_stats(spec)
    for key, src in src_group.items():
        entries = groups[src]
        net = {}
        for tname, ours in _NETS.items():
            if not any(k.startswith(tname + ".") for k in entries):
                continue
            layers = {}
            for i in range(n_layers):
                p = f"{tname}.layers.{i}."
                layer = {"down": entries[p + "v"].T, "up": entries[p + "u"].T, "bias": entries[p + "bias"]}
                if shared:
                    layer["mode_scale"] = entries[p + "mode_scale.weight"]
                    layer["mode_shift"] = entries[p + "mode_shift.weight"]
                layers[f"layer_{i}"] = layer
            net[ours] = layers
        want = jax.tree.map(lambda x: tuple(x.shape), params["nets"][key])
        got = jax.tree.map(np.shape, net)
        if want != got:
            raise ValueError(f"group {src!r}: converted network shapes {got} differ from the config's {want}")
        params["nets"][key] = jax.tree.map(jnp.asarray, net)

        k = float(np.asarray(entries["k"]).reshape(-1)[0]) if "k" in entries else float("nan")
        if np.isnan(k):  # never trained: empty statistics
            continue
        stats[key] = {
            "u": {"count": jnp.asarray(k, jnp.float32), "mean": jnp.asarray(entries["u_mean"]),
                  "m2": jnp.asarray(entries["u_s"])},
            "delta": {"count": jnp.asarray(k, jnp.float32), "mean": jnp.asarray(entries["v_mean"]),
                      "m2": jnp.asarray(entries["v_s"])},
        }
    params = {"nets": params["nets"]}
    params["edit_lrs"] = {site_of[n]: jnp.asarray(edit_lrs[i], jnp.float32) for i, n in enumerate(inner_params)}
    return spec, params, stats


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.convert mend-easyedit",
                                 description="Convert an EasyEdit-trained MEND checkpoint to mmedit_jax.")
    ap.add_argument("--ckpt", required=True, help="EasyEdit checkpoint (torch.save of {'model': state_dict, ...})")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--hparams", help="EasyEdit hparams YAML (inner_params, init, norm, edit_lr)")
    ap.add_argument("--inner-param", action="append", default=[], help="inner param name, in order (repeat)")
    ap.add_argument("--shape", action="append", default=[], help="NAME=IN,OUT for an inner param (repeat)")
    ap.add_argument("--init", choices=("id", "xavier"), help="IDMLP init (default: hparams or 'id')")
    ap.add_argument("--no-norm", action="store_true", help="the editor was trained with norm: False")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="read with plain torch.load (imports and runs pickled classes; trusted files only)")
    args = ap.parse_args(argv)

    hp = {}
    if args.hparams:
        import yaml

        with open(args.hparams) as f:
            hp = yaml.safe_load(f) or {}
    inner = args.inner_param or list(hp.get("inner_params") or [])
    if not inner:
        ap.error("give the inner params (--hparams YAML with inner_params, or --inner-param NAME ...)")
    shapes = {}
    for item in args.shape:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = tuple(int(x) for x in dims.split(","))
            assert len(shapes[name]) == 2
        except (ValueError, AssertionError):
            ap.error(f"--shape {item!r}: expected NAME=IN,OUT")
    sd = load_checkpoint(args.ckpt, trust_pickle=args.trust_pickle)
    spec, params, stats = convert_state_dict(
        sd, inner, shapes=shapes, init=args.init or hp.get("init", "id"),
        norm=False if args.no_norm else bool(hp.get("norm", True)), edit_lr=hp.get("edit_lr"))
    save_mend(args.out, spec, params, stats,
              source={"ckpt": os.path.abspath(args.ckpt), "inner_params": inner})
    print(f"converted {len(spec.sites)} sites in {len(spec.groups)} groups "
          f"({mn.param_count(params):,} parameters) -> {args.out}")
    for site in spec.sites:
        print(f"  {site}: shape {spec.shape(site)}, group {spec.group_of(site)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
