"""The LLaMA mapping: transformers' `LlamaForCausalLM` keys -> `language_model/...` of `models/llama.py`.

A plain rename below `model.` (`model.layers.{i}.mlp.down_proj.weight` -> `language_model/layers/mlp/down_proj/kernel`,
stacked over i and transposed), RMSNorm `weight` -> `scale`, `lm_head.weight` transposed (ignored when tied: the
head reads `embed_tokens`). Legacy checkpoints' non-persistent `rotary_emb.inv_freq` buffers are ignored: the
frequencies are recomputed from `rope_theta`. `source` prefixes every checkpoint key, for a LLaMA stored inside a
larger model (e.g. LAVIS/EasyEdit MiniGPT-4's `llama_model.`).
"""

from __future__ import annotations

from mmedit_jax.convert.rules import Rule, plain, stacked
from mmedit_jax.models.config import LlamaConfig

LINEARS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
           "mlp/up_proj", "mlp/down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def llama_rules(cfg: LlamaConfig, source: str = "",
                target: str = "language_model") -> tuple[list[Rule], dict[str, str]]:
    """Rules for `{target}/...` from keys `{source}model.*` / `{source}lm_head.weight`, and the keys left unused
    (with the reason)."""
    n = cfg.num_hidden_layers
    m, t = f"{source}model", target
    each = lambda key: [f"{m}.layers.{i}.{key}" for i in range(n)]  # noqa: E731
    rules = [
        plain(f"{t}/embed_tokens/embedding", f"{m}.embed_tokens.weight"),
        plain(f"{t}/norm/scale", f"{m}.norm.weight"),
    ]
    for name in LINEARS:
        src = name.replace("/", ".")
        rules.append(stacked(f"{t}/layers/{name}/kernel", each(f"{src}.weight"), "linear"))
        if cfg.attention_bias if name.startswith("self_attn") else cfg.mlp_bias:
            rules.append(stacked(f"{t}/layers/{name}/bias", each(f"{src}.bias")))
    rules += [stacked(f"{t}/layers/{name}/scale", each(f"{name}.weight")) for name in NORMS]
    ignored = {key: "recomputed from rope_theta" for key in each("self_attn.rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        ignored[f"{source}lm_head.weight"] = "tied to embed_tokens"
    else:
        rules.append(plain(f"{t}/lm_head/kernel", f"{source}lm_head.weight", "linear"))
    return rules, ignored
