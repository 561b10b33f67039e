"""The whole BLIP-2 mapping (transformers' `Blip2ForConditionalGeneration` keys -> our tree).

Vision and Q-Former rules live in `blip2_vision.py`; this file adds the query tokens, the language projection and
the OPT decoder. The tied `language_model.lm_head.weight` is absent from safetensors files and present in
`.bin` ones; it is ignored either way (our head reads `embed_tokens`), unless the config unties it.
EasyEdit's `inner_params` names translate to our sites in `sites.easyedit_site`.
"""

from __future__ import annotations

from mmedit_jax.convert.blip2_vision import qformer_rules, vision_rules
from mmedit_jax.convert.rules import Rule, plain, stacked
from mmedit_jax.models.config import Blip2Config, OPTConfig

LM = "language_model.model.decoder"


def opt_rules(cfg: OPTConfig) -> tuple[list[Rule], dict[str, str]]:
    """Rules for `language_model/...` and the keys left unused (with the reason)."""
    n = cfg.num_hidden_layers
    each = lambda key: [f"{LM}.layers.{i}.{key}" for i in range(n)]  # noqa: E731
    t = "language_model"
    rules = [
        plain(f"{t}/embed_tokens/embedding", f"{LM}.embed_tokens.weight"),
        plain(f"{t}/embed_positions/embedding", f"{LM}.embed_positions.weight"),
    ]
    if cfg.embed_dim != cfg.hidden_size:
        rules += [plain(f"{t}/project_in/kernel", f"{LM}.project_in.weight", "linear"),
                  plain(f"{t}/project_out/kernel", f"{LM}.project_out.weight", "linear")]
    affine = cfg.layer_norm_elementwise_affine
    if cfg.do_layer_norm_before and not cfg.remove_final_layer_norm and affine:
        rules += [plain(f"{t}/final_layer_norm/scale", f"{LM}.final_layer_norm.weight"),
                  plain(f"{t}/final_layer_norm/bias", f"{LM}.final_layer_norm.bias")]
    for name in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/out_proj", "fc1", "fc2"):
        src = name.replace("/", ".")
        rules.append(stacked(f"{t}/layers/{name}/kernel", each(f"{src}.weight"), "linear"))
        if cfg.enable_bias:
            rules.append(stacked(f"{t}/layers/{name}/bias", each(f"{src}.bias")))
    if affine:
        for name in ("self_attn_layer_norm", "final_layer_norm"):
            rules += [stacked(f"{t}/layers/{name}/scale", each(f"{name}.weight")),
                      stacked(f"{t}/layers/{name}/bias", each(f"{name}.bias"))]
    ignored = {}
    if cfg.tie_word_embeddings:
        ignored["language_model.lm_head.weight"] = "tied to embed_tokens"
    else:
        rules.append(plain(f"{t}/lm_head/kernel", "language_model.lm_head.weight", "linear"))
    return rules, ignored


def blip2_rules(config: Blip2Config) -> tuple[list[Rule], dict[str, str]]:
    """Every parameter of `Blip2Model` from a `Blip2ForConditionalGeneration` checkpoint."""
    rules = vision_rules(config.vision) + qformer_rules(config.qformer)
    rules += [
        plain("query_tokens", "query_tokens"),
        plain("language_projection/kernel", "language_projection.weight", "linear"),
        plain("language_projection/bias", "language_projection.bias"),
    ]
    text_rules, ignored = opt_rules(config.text)
    return rules + text_rules, ignored
