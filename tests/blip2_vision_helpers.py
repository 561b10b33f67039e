"""Shared by the vision/Q-Former tests: tiny randomised transformers BLIP-2 models and a minimal rule applier.

The real converter (`mmedit_jax/convert/engine.py`) streams and checks; here a dict of numpy arrays is enough.
"""

from __future__ import annotations

import numpy as np

from mmedit_jax.convert.rules import TRANSFORMS, Rule


def hf_blip2(vision: dict, qformer: dict, seed: int = 0, std: float = 0.2):
    """A `Blip2ForConditionalGeneration` (eager attention, eval mode) with every weight ~ N(0, std)."""
    import torch
    import transformers

    text = dict(model_type="opt", vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=24,
                num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
    cfg = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                                   num_query_tokens=qformer.pop("_num_query_tokens", 5), image_token_index=63)
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def state_dict_numpy(module, prefix: str) -> dict[str, np.ndarray]:
    """`module.state_dict()` as float32 numpy arrays, keys prefixed as in the full BLIP-2 checkpoint."""
    return {f"{prefix}.{k}": v.detach().float().numpy() for k, v in module.state_dict().items()}


def apply_rules(rules: list[Rule], state: dict[str, np.ndarray], strict: bool = True) -> dict:
    """Fills a nested param dict from `state` with `rules`; with `strict`, every key must be used exactly once."""
    params: dict = {}
    used: list[str] = []
    for rule in rules:
        fn = TRANSFORMS[rule.transform]
        values = [fn(state[s]) for s in rule.sources]
        used += rule.sources
        value = np.stack(values) if rule.stacked else values[0]
        node = params
        *path, leaf = rule.target.split("/")
        for p in path:
            node = node.setdefault(p, {})
        assert leaf not in node, f"{rule.target} filled twice"
        node[leaf] = value
    assert len(used) == len(set(used)), "a checkpoint key is used twice"
    if strict:
        unused = sorted(set(state) - set(used))
        assert not unused, f"unused checkpoint keys: {unused}"
    return params
