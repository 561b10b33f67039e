"""Conversion rules for BLIP-2's vision tower and Q-Former (sources: `Blip2ForConditionalGeneration` keys).

Targets follow the parameter tree in MODEL_SPEC.md: `vision_model/...` with the ViT layers stacked over
`vision_model/layers`, `qformer/...` with the Q-Former layers stacked over groups of
`cross_attention_frequency` layers (members "0".."k-1" when k > 1).
"""

from __future__ import annotations

from mmedit_jax.convert.rules import Rule, plain, stacked
from mmedit_jax.models.config import QFormerConfig, VisionConfig


def _linear(target: str, source: str, sources_for) -> list[Rule]:
    """A stacked torch `nn.Linear` (weight + bias) -> `kernel` (transposed) + `bias`."""
    return [
        stacked(f"{target}/kernel", sources_for(f"{source}.weight"), "linear"),
        stacked(f"{target}/bias", sources_for(f"{source}.bias")),
    ]


def _layer_norm(target: str, source: str, sources_for) -> list[Rule]:
    """A stacked torch `nn.LayerNorm` (weight, bias) -> `scale`, `bias`."""
    return [
        stacked(f"{target}/scale", sources_for(f"{source}.weight")),
        stacked(f"{target}/bias", sources_for(f"{source}.bias")),
    ]


def vision_rules(cfg: VisionConfig) -> list[Rule]:
    """Rules for every `vision_model/...` parameter from `vision_model.*` checkpoint keys."""
    n = cfg.num_hidden_layers
    each = lambda key: [f"vision_model.encoder.layers.{i}.{key}" for i in range(n)]  # noqa: E731
    rules = [
        plain("vision_model/embeddings/class_embedding", "vision_model.embeddings.class_embedding"),
        plain("vision_model/embeddings/position_embedding", "vision_model.embeddings.position_embedding"),
        plain("vision_model/embeddings/patch_embedding/kernel", "vision_model.embeddings.patch_embedding.weight",
              "conv"),
        plain("vision_model/embeddings/patch_embedding/bias", "vision_model.embeddings.patch_embedding.bias"),
        plain("vision_model/post_layernorm/scale", "vision_model.post_layernorm.weight"),
        plain("vision_model/post_layernorm/bias", "vision_model.post_layernorm.bias"),
    ]
    t = "vision_model/layers"
    rules += _linear(f"{t}/self_attn/qkv", "self_attn.qkv", each)
    rules += _linear(f"{t}/self_attn/projection", "self_attn.projection", each)
    rules += _layer_norm(f"{t}/layer_norm1", "layer_norm1", each)
    rules += _linear(f"{t}/mlp/fc1", "mlp.fc1", each)
    rules += _linear(f"{t}/mlp/fc2", "mlp.fc2", each)
    rules += _layer_norm(f"{t}/layer_norm2", "layer_norm2", each)
    return rules


def _qformer_layer_modules(with_cross: bool) -> list[tuple[str, str]]:
    """`(module path, kind)` of one Q-Former layer, relative to the layer (`/` and `.` spellings agree)."""
    mods = []
    blocks = ["attention", "crossattention"] if with_cross else ["attention"]
    for block in blocks:
        mods += [(f"{block}/attention/{p}", "linear") for p in ("query", "key", "value")]
        mods += [(f"{block}/output/dense", "linear"), (f"{block}/output/LayerNorm", "layer_norm")]
    mods += [("intermediate_query/dense", "linear"), ("output_query/dense", "linear"),
             ("output_query/LayerNorm", "layer_norm")]
    return mods


def qformer_rules(cfg: QFormerConfig) -> list[Rule]:
    """Rules for every `qformer/...` parameter from `qformer.*` checkpoint keys.

    Layer `i` is member `i % k` of scanned group `i // k` (k = `cross_attention_frequency`); member 0 of each
    group is the cross-attention layer. For k == 1 the layer params sit directly under `qformer/layers`.
    """
    k = cfg.cross_attention_frequency
    groups = cfg.num_hidden_layers // k
    rules = [
        plain("qformer/layernorm/scale", "qformer.layernorm.weight"),
        plain("qformer/layernorm/bias", "qformer.layernorm.bias"),
    ]
    for member in range(k):
        prefix = "qformer/layers" if k == 1 else f"qformer/layers/{member}"

        def each(key, member=member):
            return [f"qformer.encoder.layer.{g * k + member}.{key}" for g in range(groups)]

        for path, kind in _qformer_layer_modules(with_cross=member == 0):
            source = path.replace("/", ".")
            make = _linear if kind == "linear" else _layer_norm
            rules += make(f"{prefix}/{path}", source, each)
    return rules
