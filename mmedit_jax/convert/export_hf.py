"""Our BLIP-2 (config + parameter tree) -> a transformers `Blip2ForConditionalGeneration`: the inverse of
`blip2_rules`; and, for SERAC's PyTorch peer, an OPT decoder -> `OPTForCausalLM` and a `TextEncoder` -> a bare
`BertModel` / `DistilBertModel` (the inverses of `opt_rules` and `text_encoder_rules`).

Every rule is run backwards: a stacked leaf `[n, ...]` is split into its n per-layer tensors, linear kernels
`[in, out]` are transposed back to `nn.Linear.weight [out, in]`, the patch-embedding conv goes HWIO -> OIHW,
and the tied `language_model.lm_head.weight` is filled from `embed_tokens` (untied configs have their own rule).
The result is the model the PyTorch peer (`benchmarks/peer_easyedit.py`) runs, on exactly our weights.

    model = to_hf(config, params)                 # in memory, eval mode, float32
    export_hf(config, params, "out/hf", tok)      # save_pretrained directory (+ tokenizer), loadable by
                                                  # transformers and by `mmedit_jax.loading.from_pretrained`

`export_hf` streams: it writes `model.safetensors` one tensor at a time from the parameter tree (a layer's slice of a
stacked leaf, transposed), so exporting needs no second copy of the weights (BLIP-2 OPT-2.7B is 15 GB in float32);
`to_hf` builds transformers' model in memory and needs two.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from mmedit_jax.convert.blip2 import blip2_rules, opt_rules
from mmedit_jax.convert.rules import Rule
from mmedit_jax.convert.text_encoder import text_encoder_rules
from mmedit_jax.models.config import BertConfig, Blip2Config, DistilBertConfig, OPTConfig
from mmedit_jax.tree import flatten

# The inverse of each forward transform in `rules.TRANSFORMS`.
INVERSE = {
    "identity": lambda w: w,
    "linear": lambda w: w.T,  # Flax [in, out] -> torch [out, in]
    "conv": lambda w: w.transpose(3, 2, 0, 1),  # Flax HWIO -> torch OIHW
}


def hf_config_dict(config: Blip2Config) -> dict[str, Any]:
    """The `transformers.Blip2Config` keyword arguments of our config (field names are transformers')."""
    d = config.to_dict()
    text = dict(d["text"])
    text["_remove_final_layer_norm"] = text.pop("remove_final_layer_norm")
    return dict(vision_config=dict(d["vision"]), qformer_config=dict(d["qformer"]), text_config=text,
                num_query_tokens=config.num_query_tokens, image_token_index=config.image_token_index)


def hf_config(config: Blip2Config):
    import transformers

    return transformers.Blip2Config(**hf_config_dict(config))


def _leaf(params: Mapping, target: str):
    node = params
    for k in target.split("/"):
        if not isinstance(node, Mapping) or k not in node:
            raise KeyError(f"export: no parameter {target!r} in the tree (missing {k!r})")
        node = node[k]
    return node


def iter_state_dict(rules: list[Rule], params: Mapping, what: str = "export",
                    shapes_only: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """`(checkpoint key, numpy array)` for every rule run backwards on `params`, one tensor at a time (views of the
    leaves where the inverse transform allows). Checks that every parameter of the tree is used by exactly one
    rule (the export loses nothing) and that no key is written twice. `shapes_only`: arrays of the right shape
    and dtype that hold no memory (zero strides), for writing a header before the data."""
    extra = set(flatten(params)) - {r.target for r in rules}
    if extra:
        raise ValueError(f"{what}: parameters with no rule (would be lost): {sorted(extra)[:10]}")
    seen: set[str] = set()
    for rule in rules:
        leaf = _leaf(params, rule.target)
        if shapes_only:
            value = np.broadcast_to(np.zeros((), np.dtype(leaf.dtype)), leaf.shape)
        else:
            value = np.asarray(leaf)
        for key, v in _unapply(rule, value):
            if key in seen:
                raise ValueError(f"{what}: key {key!r} written twice")
            seen.add(key)
            yield key, v


def rules_state_dict(rules: list[Rule], params: Mapping, what: str = "export") -> dict[str, np.ndarray]:
    """`{checkpoint key: numpy array}`: `iter_state_dict`, every tensor made contiguous (a full copy)."""
    return {key: np.ascontiguousarray(v) for key, v in iter_state_dict(rules, params, what)}


# safetensors' dtype names (https://github.com/huggingface/safetensors: the format is an 8-byte little-endian header
# length, a JSON header of `{key: {dtype, shape, data_offsets}}`, then the tensors' bytes back to back).
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path: str | os.PathLike, tensors: Callable[[bool], Iterator[tuple[str, np.ndarray]]]) -> int:
    """Writes a safetensors file from `tensors(shapes_only)`, an iterator factory run twice: once with shapes only
    (the header), once with the data, written tensor by tensor (only one tensor's contiguous copy is held at a
    time). The second pass must yield the first's keys, shapes and dtypes in order. Returns the bytes of data."""
    header, offset, order = {}, 0, []
    for key, v in tensors(True):
        name = SAFETENSORS_DTYPES.get(np.dtype(v.dtype).name)
        if name is None:
            raise ValueError(f"export: {key}: dtype {v.dtype} has no safetensors name")
        size = int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize
        header[key] = {"dtype": name, "shape": list(v.shape), "data_offsets": [offset, offset + size]}
        order.append((key, tuple(v.shape), np.dtype(v.dtype)))
        offset += size
    head = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    tmp = f"{path}.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for i, (key, v) in enumerate(tensors(False)):
            if i >= len(order) or order[i] != (key, tuple(v.shape), np.dtype(v.dtype)):
                raise ValueError(f"export: tensor {i} ({key}) differs from the header's pass")
            f.write(np.ascontiguousarray(v).reshape(-1).view(np.uint8).data)  # bytes (bfloat16 has no buffer type)
        if f.tell() != 8 + len(head) + offset:
            raise ValueError(f"export: wrote {f.tell()} bytes, the header says {8 + len(head) + offset}")
    os.replace(tmp, path)  # never a half-written model.safetensors under the real name
    return offset


def state_dict(config: Blip2Config, params: Mapping) -> dict[str, np.ndarray]:
    """`{transformers key: float32/bf16 numpy array}` for every tensor of `Blip2ForConditionalGeneration`."""
    rules, _ = blip2_rules(config)
    out = rules_state_dict(rules, params)
    if config.text.tie_word_embeddings:
        out["language_model.lm_head.weight"] = out["language_model.model.decoder.embed_tokens.weight"]
    return out


def opt_state_dict(config: OPTConfig, params: Mapping) -> dict[str, np.ndarray]:
    """An `OPTDecoder`'s parameters (SERAC's counterfactual) under `OPTForCausalLM`'s keys: `opt_rules` without
    BLIP-2's `language_model` prefix."""
    rules, _ = opt_rules(config)
    rules = [Rule(r.target.removeprefix("language_model/"), tuple(k.removeprefix("language_model.") for k in r.sources),
                  r.transform, r.stacked) for r in rules]
    out = rules_state_dict(rules, params, "export (OPT)")
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.decoder.embed_tokens.weight"]
    return out


def opt_config_dict(config: OPTConfig) -> dict[str, Any]:
    """The `transformers.OPTConfig` keyword arguments of our config."""
    d = dataclasses.asdict(config)
    d.pop("model_type", None)
    d["_remove_final_layer_norm"] = d.pop("remove_final_layer_norm")
    return d


def text_encoder_state_dict(config: BertConfig | DistilBertConfig, params: Mapping) -> dict[str, np.ndarray]:
    """A `TextEncoder`'s parameters as a bare `BertModel` / `DistilBertModel` state dict (today's LayerNorm names;
    BERT's pooler, which nothing here reads, is not written)."""
    rules, _ = text_encoder_rules(config, ())
    return rules_state_dict(rules, params, "export (text encoder)")


def _unapply(rule: Rule, value: np.ndarray):
    inv = INVERSE[rule.transform]
    if not rule.stacked:
        return [(rule.sources[0], inv(value))]
    if value.shape[0] != len(rule.sources):
        raise ValueError(f"export: {rule.target} stacks {value.shape[0]} layers, the config has "
                         f"{len(rule.sources)}")
    return [(key, inv(value[i])) for i, key in enumerate(rule.sources)]


def to_hf(config: Blip2Config, params: Mapping, attn_implementation: str = "eager"):
    """A transformers `Blip2ForConditionalGeneration` (eval mode, float32) holding exactly `params`."""
    import torch
    import transformers

    model = transformers.Blip2ForConditionalGeneration._from_config(
        hf_config(config), attn_implementation=attn_implementation, dtype=torch.float32)
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state_dict(config, params).items()}
    have = model.state_dict()
    missing, unexpected = set(have) - set(sd), set(sd) - set(have)
    if missing or unexpected:
        raise ValueError(f"export: transformers' model has keys we do not fill {sorted(missing)[:10]} / we fill "
                         f"keys it does not have {sorted(unexpected)[:10]}")
    for k, v in sd.items():
        if tuple(have[k].shape) != tuple(v.shape):
            raise ValueError(f"export: {k}: ours {tuple(v.shape)}, transformers {tuple(have[k].shape)}")
    model.load_state_dict(sd, strict=True)
    if config.text.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def export_hf(config: Blip2Config, params: Mapping, out_dir: str | os.PathLike, tokenizer=None) -> str:
    """Writes a `save_pretrained`-style directory (config.json + model.safetensors, and the tokenizer if given),
    streaming the tensors (`write_safetensors`: no second copy of the weights is made). As transformers saves a
    tied model, the tied `lm_head` is left out; loading ties it again. Returns `out_dir`."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rules, _ = blip2_rules(config)
    dtypes = {np.dtype(x.dtype).name for x in flatten(params).values()}
    cfg = hf_config(config)
    cfg.dtype = dtypes.pop() if len(dtypes) == 1 else "float32"  # what transformers records for its weights
    cfg.save_pretrained(out_dir)
    write_safetensors(os.path.join(out_dir, "model.safetensors"),
                      lambda shapes_only: iter_state_dict(rules, params, shapes_only=shapes_only))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
