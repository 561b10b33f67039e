"""The `--demo` runs of `evaluate` and `train`: synthetic MMEdit files, a tokenizer trained on their text, and a
tiny random BLIP-2 (its numbers mean nothing: a random model knows nothing to edit; the built-in world does).
"""

from __future__ import annotations

import json
import os

import jax

from mmedit_jax.data.mmedit import load_mmedit
from mmedit_jax.data.synthetic import write_synthetic_mmedit
from mmedit_jax.data.tokenizer import train_bpe_tokenizer
from mmedit_jax.models.blip2 import Blip2Model
from mmedit_jax.models.config import Blip2Config, OPTConfig, QFormerConfig, VisionConfig


def demo_setup(out_dir: str, n_records: int, seed: int):
    """Synthetic MMEdit E-VQA files, a tokenizer trained on their text, and a tiny random BLIP-2 (its numbers
    mean nothing: a random model knows nothing to edit; the built-in world will replace this)."""
    paths = write_synthetic_mmedit(os.path.join(out_dir, "data"), "vqa", n_records, seed, image_size=32)
    with open(paths.json_path) as f:
        raw = json.load(f)
    texts = [r[k] for r in raw for k in ("src", "alt", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a", "pred")]
    texts += ["Question: " + t + " Short answer:" for t in texts[:50]]
    tok = train_bpe_tokenizer(texts, vocab_size=400, out_dir=os.path.join(out_dir, "tokenizer"))
    image_token = tok.convert_tokens_to_ids("<image>")
    cfg = Blip2Config(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8),
        qformer=QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              cross_attention_frequency=2, encoder_hidden_size=64),
        text=OPTConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, ffn_dim=256, num_attention_heads=4,
                       max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id),
        num_query_tokens=8, image_token_index=image_token,
    )
    model = Blip2Model.init(cfg, jax.random.PRNGKey(seed))
    return paths, tok, model


def demo_world(out_dir: str, n_train: int, n_val: int, seed: int):
    """Synthetic train/eval E-VQA files and a tiny random BLIP-2 (`demo_setup`)."""
    paths, tok, model = demo_setup(out_dir, n_val, seed)
    train_paths = write_synthetic_mmedit(os.path.join(out_dir, "data"), "vqa", n_train, seed + 1, image_size=32,
                                         split="train")
    train = load_mmedit(train_paths.json_path, "vqa", train_paths.image_root).records
    val = load_mmedit(paths.json_path, "vqa", paths.image_root).records
    return tok, model, train, val
