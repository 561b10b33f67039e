"""Partition rules for every BLIP-2 and LLaMA parameter: a path-regex table (big_vision / EasyLM style).

Each rule is `(regex, PartitionSpec)`; a parameter's '/'-joined path (e.g. `language_model/layers/fc1/kernel`)
takes the spec of the first rule whose regex `re.search`es it, and a parameter no rule matches is an error that
names it (no silent catch-all). Specs are written for one layer: leaves under a stacked prefix (`*/layers`) get
an unsharded leading layer axis prepended, so scans slice whole layers without communication.

Mesh axes are `("data", "model")`. Parameters never use "data" (the batch is split over it). Large kernels
are split over "model" along one axis: the first linear of a pair (q/k/v, fc1, ...) along its output features
and the second (out_proj, fc2, ...) along its input features, so that one pair needs one reduction; vocabulary
tables along the vocabulary. Small leaves (biases, LayerNorm, class/position embeddings, query tokens) are
replicated. A sharded axis that the mesh size does not divide falls back to replicated (tiny test models).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmedit_jax import tree

DATA, MODEL = "data", "model"

# Stacked layer prefixes: their leaves carry a leading layer (or Q-Former group) axis.
STACKED_PREFIXES = ("vision_model/layers", "qformer/layers", "language_model/layers")

COLUMN = P(None, MODEL)  # [in, out]: split output features
ROW = P(MODEL, None)  # [in, out]: split input features

DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    # Small leaves: replicated.
    (r"(^|/)(bias|scale)$", P()),
    (r"^query_tokens$", P()),
    (r"^vision_model/embeddings/(class_embedding|position_embedding)$", P()),
    (r"^language_model/embed_positions/embedding$", P()),
    # Vision tower.
    (r"^vision_model/embeddings/patch_embedding/kernel$", P(None, None, None, MODEL)),  # HWIO: split O
    (r"^vision_model/layers/self_attn/qkv/kernel$", COLUMN),
    (r"^vision_model/layers/self_attn/projection/kernel$", ROW),
    (r"^vision_model/layers/mlp/fc1/kernel$", COLUMN),
    (r"^vision_model/layers/mlp/fc2/kernel$", ROW),
    # Q-Former (optional group member "0".."k-1" after `layers/`).
    (r"^qformer/layers/(\d+/)?(attention|crossattention)/attention/(query|key|value)/kernel$", COLUMN),
    (r"^qformer/layers/(\d+/)?(attention|crossattention)/output/dense/kernel$", ROW),
    (r"^qformer/layers/(\d+/)?intermediate_query/dense/kernel$", COLUMN),
    (r"^qformer/layers/(\d+/)?output_query/dense/kernel$", ROW),
    (r"^language_projection/kernel$", COLUMN),
    # OPT.
    (r"^language_model/embed_tokens/embedding$", P(MODEL, None)),  # [V, E]: split the vocabulary
    (r"^language_model/project_in/kernel$", COLUMN),
    (r"^language_model/project_out/kernel$", ROW),
    (r"^language_model/layers/self_attn/(q_proj|k_proj|v_proj)/kernel$", COLUMN),
    (r"^language_model/layers/self_attn/out_proj/kernel$", ROW),
    (r"^language_model/layers/fc1/kernel$", COLUMN),
    (r"^language_model/layers/fc2/kernel$", ROW),
    (r"^language_model/lm_head/kernel$", COLUMN),  # [E, V]: split the vocabulary
    # LLaMA (q/k/v_proj, embed_tokens and lm_head as OPT's; its RMSNorms are `scale`).
    (r"^language_model/layers/self_attn/o_proj/kernel$", ROW),
    (r"^language_model/layers/mlp/(gate_proj|up_proj)/kernel$", COLUMN),
    (r"^language_model/layers/mlp/down_proj/kernel$", ROW),
)



def _is_stacked(name: str, stacked_prefixes: Sequence[str]) -> bool:
    return any(name.startswith(p + "/") for p in stacked_prefixes)


def partition_spec(name: str, shape: Sequence[int], rules=DEFAULT_RULES,
                   stacked_prefixes: Sequence[str] = STACKED_PREFIXES) -> P:
    """The spec of the parameter `name` with `shape` (the layer axis included for stacked leaves).

    Raises `KeyError` when no rule matches and `ValueError` when the matched spec's rank does not fit.
    """
    match = next(((pattern, spec) for pattern, spec in rules if re.search(pattern, name)), None)
    if match is None:
        raise KeyError(f"no partition rule matches parameter {name!r} (shape {tuple(shape)})")
    pattern, spec = match[0], tuple(match[1])
    if not spec:  # replicated, whatever the rank
        return P()
    if _is_stacked(name, stacked_prefixes):
        spec = (None, *spec)
    if len(spec) != len(shape):
        raise ValueError(
            f"partition rule {pattern!r} gives {len(spec)} axes {P(*spec)} for parameter {name!r} of shape "
            f"{tuple(shape)}"
        )
    return P(*spec)


def param_specs(params, rules=DEFAULT_RULES, stacked_prefixes: Sequence[str] = STACKED_PREFIXES):
    """The tree of `PartitionSpec`s for `params` (arrays or `jax.ShapeDtypeStruct`s)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: partition_spec(tree.path_name(path), np.shape(leaf), rules, stacked_prefixes), params
    )


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """`spec` with every axis the mesh cannot split evenly replicated instead."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append(axes if size == 1 or dim % size == 0 else None)
    return P(*fitted)


def param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES,
                    stacked_prefixes: Sequence[str] = STACKED_PREFIXES):
    """The tree of `NamedSharding`s for `params` on `mesh` (see the module docstring for the layout)."""

    def one(path, leaf):
        shape = np.shape(leaf)
        spec = partition_spec(tree.path_name(path), shape, rules, stacked_prefixes)
        return NamedSharding(mesh, fit_spec(spec, shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params, mesh: Mesh, rules=DEFAULT_RULES):
    """`params` placed on `mesh` by `param_shardings`."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
    """A `("data", "model")` mesh with Auto axes (XLA propagates shardings); `-1` takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % model:
            raise ValueError(f"model axis size {model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, have {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Inputs `[B, ...]` split over "data" on their batch axis."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def place_batch(mesh: Mesh | None, batch_size: int):
    """`place(tree)`: puts a host batch of `batch_size` edits on `mesh`, split over "data" (identity without a mesh).

    The harness and the trainer place every batch through this, so both check the same divisibility."""
    if mesh is None:
        return lambda tree: tree
    if batch_size % mesh.shape[DATA]:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the mesh's data axis ({mesh.shape[DATA]})")
    return lambda tree: jax.tree.map(lambda a: jax.device_put(a, batch_sharding(mesh, np.ndim(a))), tree)


def mesh_from_flag(flag: str | None) -> Mesh | None:
    """`--mesh` of the CLIs: None/"" -> no mesh (one device); "auto" -> every device on "data";
    "DxM" (e.g. "4x2", "-1x2") -> `make_mesh(D, M)`."""
    if not flag:
        return None
    if flag == "auto":
        return make_mesh()
    try:
        data, model = (int(x) for x in flag.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mesh must be 'auto' or DATAxMODEL (e.g. 8x1, -1x2), got {flag!r}") from None
    return make_mesh(data, model)
