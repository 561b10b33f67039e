"""Sites: the names of the linear layers an edit may change, and the one parser for them.

A *site* names one linear layer by its readable path, with the layer index spelled out for stacked (scanned)
layers: `"language_model/layers/31/fc1"`, `"qformer/layers/10/output_query/dense"`, `"language_projection"`. Its
parameter is that module's `kernel` (`[in, out]`, `y = x @ W`). `stacks` maps each stacked prefix to how many
layers one scanned unit holds (1 for plain stacks; k for the Q-Former, scanned in groups of k, whose members are
stored as `"0".."k-1"` inside each group). EasyEdit's parameter names (`opt_model.model.decoder.layers.31.fc1.weight`)
translate to sites here too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

LM_STACK = "language_model/layers"
# Sites under these prefixes change the image embeddings, so cached embeddings cannot be used with them.
VISION_PREFIXES = ("vision_model/", "qformer/", "language_projection", "llama_proj", "query_tokens")


def split_stacked(site: str, prefix: str) -> tuple[int, str] | None:
    """`(layer index, module path)` of a site under the stacked `prefix`, None for a site outside it.

    `split_stacked("language_model/layers/31/fc1", "language_model/layers") == (31, "fc1")`.
    """
    if not site.startswith(prefix + "/"):
        return None
    idx, _, rest = site[len(prefix) + 1 :].partition("/")
    if not idx.isdigit() or not rest:
        raise KeyError(f"site {site!r}: expected '{prefix}/<layer index>/<module path>'")
    return int(idx), rest


def layer_of(site: str) -> int | None:
    """The language-model layer of a site `language_model/layers/<i>/...`, None for a site outside that stack."""
    hit = split_stacked(site, LM_STACK)
    return None if hit is None else hit[0]


def touches_vision(sites: Iterable[str]) -> bool:
    """Whether any site changes the image embeddings (then images must enter as pixels)."""
    return any(s.startswith(VISION_PREFIXES) for s in sites)


def resolve_site(site: str, stacks: Mapping[str, int]) -> tuple[tuple[str, ...], int | None]:
    """`(path of the site's kernel leaf, index on the leaf's leading layer axis or None)`."""
    for prefix, per_unit in stacks.items():
        hit = split_stacked(site, prefix)
        if hit is not None:
            i, rest = hit
            path = prefix.split("/")
            if per_unit > 1:
                path.append(str(i % per_unit))
            return (*path, *rest.split("/"), "kernel"), i // per_unit
    return (*site.split("/"), "kernel"), None


def get_path(tree, path: tuple[str, ...], site: str):
    """The node at `path`; a KeyError names the site and what is there instead."""
    node = tree
    for i, k in enumerate(path):
        if not isinstance(node, Mapping) or k not in node:
            have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise KeyError(f"site {site!r}: no {'/'.join(path[: i + 1])!r} in params (have {have})")
        node = node[k]
    return node


def set_path(tree, path: tuple[str, ...], value):
    """A new dict spine with `value` at `path`; every other leaf is shared, not copied."""
    if not path:
        return value
    new = dict(tree)
    new[path[0]] = set_path(tree[path[0]], path[1:], value)
    return new


def kernel_of(params, site: str, stacks: Mapping[str, int]):
    """The `[in, out]` kernel a site edits; a KeyError names a site the model does not have. Abstract parameters
    (`jax.ShapeDtypeStruct`s, which do not index) give the kernel's shape and dtype."""
    path, idx = resolve_site(site, stacks)
    leaf = get_path(params, path, site)
    if idx is not None and idx >= leaf.shape[0]:  # jax indexing would clamp silently
        raise KeyError(f"site {site!r}: layer out of range (the stack {'/'.join(path[:2])!r} holds "
                       f"{leaf.shape[0]} units)")
    if idx is None:
        return leaf
    if not hasattr(leaf, "__getitem__"):  # an abstract leaf: its unit's shape
        return type(leaf)(leaf.shape[1:], leaf.dtype)
    return leaf[idx]


def unit_entries(table: Mapping[str, Any], prefix: str, num_units: int, per_unit: int) -> list[dict[str, Any]]:
    """Splits a `{site: value}` table into per-unit `{path inside the unit: value}` dicts for one stack."""
    units: list[dict[str, Any]] = [{} for _ in range(num_units)]
    for site, value in table.items():
        hit = split_stacked(site, prefix)
        if hit is None:
            continue
        i, rest = hit
        if i >= num_units * per_unit:
            raise KeyError(f"site {site!r}: layer {i} out of range (the stack has {num_units * per_unit})")
        units[i // per_unit][rest if per_unit == 1 else f"{i % per_unit}/{rest}"] = value
    return units


def kernel_paths(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """The module paths under `tree` that hold a linear `kernel` (each a site below `prefix`)."""
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, Mapping):
            if "kernel" in v and not isinstance(v["kernel"], Mapping):
                yield p
            else:
                yield from kernel_paths(v, p)


# --------------------------------------------------------------------------------------------------
# EasyEdit's parameter names.

_EASYEDIT_PATTERNS: tuple[tuple[str, str], ...] = (
    # LAVIS / EasyEdit module names.
    (r"^opt_model\.model\.decoder\.layers\.(\d+)\.(.+)$", "language_model/layers/{0}/{1}"),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)$", "qformer/layers/{0}/{1}"),
    (r"^visual_encoder\.blocks\.(\d+)\.(.+)$", "vision_model/layers/{0}/{1}"),
    (r"^opt_proj$", "language_projection"),
    # EasyEdit's MiniGPT-4 (`llama_model` is a LlamaForCausalLM; `llama_proj` keeps its name here).
    (r"^llama_model\.model\.layers\.(\d+)\.(.+)$", "language_model/layers/{0}/{1}"),
    (r"^llama_proj$", "llama_proj"),
    # transformers names.
    (r"^language_model\.model\.decoder\.layers\.(\d+)\.(.+)$", "language_model/layers/{0}/{1}"),
    (r"^qformer\.encoder\.layer\.(\d+)\.(.+)$", "qformer/layers/{0}/{1}"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$", "vision_model/layers/{0}/{1}"),
    (r"^language_projection$", "language_projection"),
    (r"^model\.layers\.(\d+)\.(.+)$", "language_model/layers/{0}/{1}"),  # LlamaForCausalLM
)
# LAVIS's EVA ViT names its attention/MLP modules differently from transformers'.
_LAVIS_VISION = {"attn/qkv": "self_attn/qkv", "attn/proj": "self_attn/projection"}


def easyedit_site(name: str, strict: bool = True) -> str:
    """`opt_model.model.decoder.layers.31.fc1.weight` -> `language_model/layers/31/fc1` (also transformers names);
    MiniGPT-4's `llama_model.model.layers.31.mlp.down_proj.weight` -> `language_model/layers/31/mlp/down_proj`.

    A name that is not a BLIP-2 linear layer we know raises a ValueError naming it; with `strict=False` it is
    translated generically instead (`.weight` dropped, `.` -> `/`), as for another model family's MEND checkpoint.
    """
    base = name.removesuffix(".weight")
    for pattern, template in _EASYEDIT_PATTERNS:
        m = re.match(pattern, base)
        if m:
            site = template.format(*(g.replace(".", "/") for g in m.groups()))
            hit = split_stacked(site, "vision_model/layers")
            if hit is not None:
                site = f"vision_model/layers/{hit[0]}/{_LAVIS_VISION.get(hit[1], hit[1])}"
            return site
    if not strict:
        return base.replace(".", "/")
    raise ValueError(
        f"inner_params entry {name!r} is not a BLIP-2 or MiniGPT-4 linear layer we know (expected e.g. "
        "'opt_model.model.decoder.layers.31.fc1.weight', 'language_model.model.decoder.layers.31.fc1.weight' or "
        "'llama_model.model.layers.31.mlp.down_proj.weight')"
    )


def resolve_sites(inner_params: Iterable[str], params, stacks: Mapping[str, int]) -> tuple[str, ...]:
    """Our sites for EasyEdit parameter names (or sites, passed through), each checked against the model."""
    inner_params = tuple(inner_params)
    if not inner_params:
        raise ValueError("inner_params is empty: name the matrices to edit (e.g. "
                         "opt_model.model.decoder.layers.31.fc1.weight)")
    sites = tuple(n if "/" in n else easyedit_site(n) for n in inner_params)
    for s in sites:
        kernel_of(params, s, stacks)  # a KeyError naming the site if the model has no such module or layer
    return sites
