"""BERT / DistilBERT checkpoints -> `models.bert.TextEncoder` params, and `load_text_encoder` for a Hugging Face
directory.

One table names every tensor of a layer in both spellings: BERT's `encoder.layer.{i}.attention.self.query` and
DistilBERT's `transformer.layer.{i}.attention.q_lin` both fill `layers/attention/self/query`. Accepted layouts:
a bare `BertModel` / `DistilBertModel` save (a sentence-transformers directory holds one at its root), or a task
model's (`ForSequenceClassification`, `ForMaskedLM`, ...), whose keys sit under `bert.` / `distilbert.` next to its
head; the head's tensors are ignored by name, as is BERT's pooler (nothing here reads `pooler_output`). Legacy
LayerNorm names (`gamma`/`beta`, older BERT saves) are read as `weight`/`bias`. Everything else is
`engine.convert`'s checks: a missing, unexpected or misshapen tensor is a `ConversionError` naming it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from mmedit_jax.convert.engine import CheckpointReader, ConversionError, apply_rules, open_checkpoint, read_hf_json
from mmedit_jax.convert.rules import Rule, plain, stacked
from mmedit_jax.models.bert import TextEncoder
from mmedit_jax.models.config import BertConfig, DistilBertConfig

EncoderConfig = BertConfig | DistilBertConfig

# One layer: (our module path under `layers/`, kind, BERT key under `encoder.layer.{i}.`, DistilBERT key under
# `transformer.layer.{i}.`).
LAYER_TABLE = (
    ("attention/self/query", "linear", "attention.self.query", "attention.q_lin"),
    ("attention/self/key", "linear", "attention.self.key", "attention.k_lin"),
    ("attention/self/value", "linear", "attention.self.value", "attention.v_lin"),
    ("attention/output/dense", "linear", "attention.output.dense", "attention.out_lin"),
    ("attention/output/LayerNorm", "layer_norm", "attention.output.LayerNorm", "sa_layer_norm"),
    ("intermediate/dense", "linear", "intermediate.dense", "ffn.lin1"),
    ("output/dense", "linear", "output.dense", "ffn.lin2"),
    ("output/LayerNorm", "layer_norm", "output.LayerNorm", "output_layer_norm"),
)
EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")

# Per family: (prefix of a task model's encoder keys, key of the layer list, keys that belong to heads).
FAMILIES = {
    BertConfig: ("bert.", "encoder.layer", ("cls.", "classifier.", "qa_outputs.")),
    DistilBertConfig: ("distilbert.", "transformer.layer",
                       ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "pre_classifier.", "classifier.",
                        "qa_outputs.")),
}
UNUSED = {
    "pooler.dense.weight": "BERT's pooler: the encoder's outputs are the hidden states (CLS / mean pooling)",
    "pooler.dense.bias": "BERT's pooler: the encoder's outputs are the hidden states (CLS / mean pooling)",
    "embeddings.position_ids": "a buffer (0 .. max_position_embeddings - 1), saved by older transformers",
    "embeddings.token_type_ids": "a buffer (zeros), saved by older transformers",
}
LEGACY_LAYER_NORM = {"weight": "gamma", "bias": "beta"}


def encoder_prefix(config: EncoderConfig, keys) -> str:
    """`"bert."` / `"distilbert."` when the checkpoint is a task model's (its encoder under that name), else `""`."""
    prefix = FAMILIES[type(config)][0]
    return prefix if any(k.startswith(prefix) for k in keys) else ""


def text_encoder_rules(config: EncoderConfig, keys) -> tuple[list[Rule], dict[str, str]]:
    """Rules for every `TextEncoder` parameter, and the checkpoint keys left unused (with the reason).

    `keys`: the checkpoint's tensor names, which decide the prefix, the LayerNorm spelling and which head and
    buffer keys there are to ignore.
    """
    keys = set(keys)
    _, layer_list, heads = FAMILIES[type(config)]
    prefix = encoder_prefix(config, keys)
    bert = config.as_bert()
    distil = isinstance(config, DistilBertConfig)

    def layer_norm_key(base: str, leaf: str) -> str:
        modern, legacy = f"{base}.{leaf}", f"{base}.{LEGACY_LAYER_NORM[leaf]}"
        return legacy if modern not in keys and legacy in keys else modern

    def module(target: str, kind: str, sources_for) -> list[Rule]:
        if kind == "linear":
            return [stacked(f"{target}/kernel", sources_for("weight"), "linear"),
                    stacked(f"{target}/bias", sources_for("bias"))]
        return [stacked(f"{target}/scale", sources_for("weight")), stacked(f"{target}/bias", sources_for("bias"))]

    rules = []
    for name in EMBEDDINGS[: 3 if bert.type_vocab_size else 2]:
        rules.append(plain(f"embeddings/{name}/embedding", f"{prefix}embeddings.{name}.weight"))
    for leaf, ours in (("weight", "scale"), ("bias", "bias")):
        rules.append(plain(f"embeddings/LayerNorm/{ours}", layer_norm_key(f"{prefix}embeddings.LayerNorm", leaf)))
    for target, kind, bert_key, distil_key in LAYER_TABLE:
        src = distil_key if distil else bert_key

        def sources_for(leaf, src=src, kind=kind):
            bases = [f"{prefix}{layer_list}.{i}.{src}" for i in range(bert.num_hidden_layers)]
            if kind == "layer_norm":
                return [layer_norm_key(b, leaf) for b in bases]
            return [f"{b}.{leaf}" for b in bases]

        rules += module(f"layers/{target}", kind, sources_for)

    ignored = {f"{prefix}{k}": why for k, why in UNUSED.items() if f"{prefix}{k}" in keys}
    if prefix:
        ignored.update({k: "the task model's head" for k in keys if k.startswith(heads)})
    return rules, ignored


def read_encoder_config(path: str | os.PathLike) -> EncoderConfig:
    """`BertConfig` or `DistilBertConfig` from a Hugging Face directory's `config.json` (by its `model_type`)."""
    file, d = read_hf_json(path)
    kinds = {"bert": BertConfig, "distilbert": DistilBertConfig}
    if d.get("model_type") not in kinds:
        raise ValueError(f"{file}: model_type is {d.get('model_type')!r}, expected one of {sorted(kinds)}")
    return kinds[d["model_type"]].from_hf(d)


def param_template(config: EncoderConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """`TextEncoder`'s parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    module = TextEncoder(config, param_dtype=dtype)
    return jax.eval_shape(lambda r: module.init(r, ids)["params"], jax.random.key(0))


def convert_text_encoder(reader: CheckpointReader, config: EncoderConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """A numpy `TextEncoder` param tree from an open checkpoint; every check runs before any tensor is read."""
    rules, ignored = text_encoder_rules(config, reader.keys())
    return apply_rules(reader, param_template(config, dtype), rules, ignored, dtype=dtype)


def load_text_encoder(path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[EncoderConfig, dict[str, Any]]:
    """`(config, params)` from a Hugging Face BERT / DistilBERT directory (`config.json` + safetensors or `.bin`).

    Run it with `TextEncoder(config, dtype=...).apply({"params": params}, input_ids, attention_mask)`. Raises
    `ConversionError` for a checkpoint that does not fit the config.
    """
    config = read_encoder_config(path)
    try:
        params = convert_text_encoder(open_checkpoint(path), config, dtype)
    except ConversionError as e:
        raise ConversionError(f"{os.fspath(path)}: {e}") from e
    return config, jax.tree.map(jnp.asarray, params)
