"""Nested parameter dicts <-> flat `{"a/b/c": leaf}` tables: the one flattener (checkpoints, editor files, sharding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax


def flatten(tree: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": x}}` -> `{"a/b": x}` (leaves as they are). A key containing `sep` is refused: it would not
    come back from `unflatten`."""
    flat = {}
    for name, value in tree.items():
        name = str(name)
        if sep in name:
            raise ValueError(f"tree key {name!r} under {prefix or 'the root'!r} contains the separator {sep!r}")
        path = f"{prefix}{sep}{name}" if prefix else name
        if isinstance(value, Mapping):
            flat.update(flatten(value, sep, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """The inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def path_name(path) -> str:
    """A `jax.tree_util.tree_flatten_with_path` key path as a '/'-joined name (`vision_model/layers/fc1/kernel`)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)
