"""The tiny worlds the tests share, as plain functions (the subprocess tests build them without pytest;
`conftest.py` wraps them as fixtures): a tiny random BLIP-2 with synthetic MMEdit data and a tokenizer trained on
it, an untrained but non-trivial MEND, and random low-rank patches."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from benchmarks import compare_peer
from mmedit_jax import patch as P
from mmedit_jax import pipeline
from mmedit_jax.data.mmedit import load_mmedit
from mmedit_jax.demo import demo_setup
from mmedit_jax.editors.mend import make_mend
from mmedit_jax.forward import Blip2Fns
from mmedit_jax.sites import kernel_of

TRAIN_CASES = 6  # cases in `train_world`


@dataclasses.dataclass
class DemoWorld:
    """`mmedit_jax.demo.demo_setup`'s tiny random BLIP-2 (4 OPT layers), its tokenizer, and its synthetic E-VQA
    records prepared for the harness (`pipeline.prepare_data`)."""

    model: object
    tok: object
    records: list
    prepared: pipeline.Prepared


def demo_world(out_dir: str, n: int, seed: int) -> DemoWorld:
    paths, tok, model = demo_setup(out_dir, n, seed=seed)
    records = load_mmedit(paths.json_path, "vqa", paths.image_root).records
    return DemoWorld(model, tok, records, pipeline.prepare_data(records, tok, model, "vqa"))


def train_world(out_dir: str):
    """An even smaller random BLIP-2 (2 OPT layers, 16-pixel images), a BPE tokenizer and TRAIN_CASES synthetic
    E-VQA train cases: `(model, fns, cases, meta)`, image embeddings cached (`fns` runs embeddings)."""
    from mmedit_jax.data.synthetic import write_synthetic_mmedit
    from mmedit_jax.data.tokenizer import train_bpe_tokenizer
    from mmedit_jax.models.blip2 import Blip2Model
    from mmedit_jax.models.config import Blip2Config, OPTConfig, QFormerConfig, VisionConfig

    paths = write_synthetic_mmedit(out_dir, "vqa", TRAIN_CASES, 3, image_size=16, split="train")
    records = load_mmedit(paths.json_path, "vqa", paths.image_root).records
    texts = [getattr(r, k) for r in records for k in ("src", "alt", "rephrase", "loc", "loc_ans", "pred")]
    texts += ["Question: Short answer: " + t for t in texts]
    tok = train_bpe_tokenizer(texts, vocab_size=300, out_dir=os.path.join(out_dir, "tok"))
    cfg = Blip2Config(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=16, patch_size=8),
        qformer=QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              cross_attention_frequency=1, encoder_hidden_size=32),
        text=OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                       max_position_embeddings=128, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model = Blip2Model.init(cfg, jax.random.PRNGKey(0))
    fns = Blip2Fns(model.module)
    prepared = pipeline.prepare_data(records, tok, model, "vqa")
    return model, fns, pipeline.cases_for(fns, model.params, prepared), prepared.meta


def fresh_mend(model, seed=0):
    """An untrained MEND (rank 4) on fc1/fc2 of the last two OPT layers, its `up` matrices and statistics random
    (an identity network with empty statistics would make every patch nearly the raw gradient)."""
    spec, params, stats = compare_peer.fresh_mend(model, None, None, layers=2, seed=seed, perturb=0.1,
                                                  stats_from="random", rank=4)
    return make_mend(spec, Blip2Fns(model.module), params, stats)


def random_patch(model, layers, seed=0, rank=2):
    """LowRank deltas on fc1 and out_proj of `layers`, large enough to change the logits."""
    out = {}
    for j, i in enumerate(layers):
        for n in ("fc1", "self_attn/out_proj"):
            site = f"language_model/layers/{i}/{n}"
            d_in, d_out = kernel_of(model.params, site, model.stacks).shape
            ka, kb = jax.random.split(jax.random.PRNGKey(seed + 10 * j + len(n)))
            out[site] = P.LowRank(jax.random.normal(ka, (rank, d_in)), jax.random.normal(kb, (rank, d_out)),
                                  jnp.asarray(0.5))
    return out
