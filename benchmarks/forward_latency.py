"""Forward latency of our Flax BLIP-2 against transformers' PyTorch `Blip2ForConditionalGeneration`, same weights.

For each config the PyTorch model is built with random weights, saved, converted and loaded with
`from_pretrained`; both run the same batch (images + left-padded prompts with image tokens). JAX compile time
is reported apart (first call minus steady state); steady-state latency is the median of `--repeats` calls,
timed interleaved (jax, torch, jax, torch, ...) so machine noise hits both alike. Also checks the logits agree.

  python benchmarks/forward_latency.py --json benchmarks/forward_latency.json
Configs: tiny (the test model), mid (ViT-B-sized vision at 224 px, 2 Q-Former layers, OPT-125m-sized text).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np

CONFIGS = {
    "tiny": dict(
        vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    image_size=16, patch_size=8),
        qformer=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     cross_attention_frequency=2, encoder_hidden_size=16),
        text=dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=24, num_attention_heads=2,
                  max_position_embeddings=64),
        num_query_tokens=4, text_len=12,
    ),
    "mid": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=16),
        qformer=dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
                     cross_attention_frequency=2, encoder_hidden_size=768),
        text=dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                  max_position_embeddings=2048),
        num_query_tokens=32, text_len=32,
    ),
}


def build(name: str, workdir: str):
    import torch
    import transformers

    c = CONFIGS[name]
    vocab = c["text"]["vocab_size"]
    text = dict(model_type="opt", pad_token_id=1, bos_token_id=2, eos_token_id=2, word_embed_proj_dim=None,
                **c["text"])
    text["word_embed_proj_dim"] = text["hidden_size"]
    cfg = transformers.Blip2Config(vision_config=c["vision"], qformer_config=c["qformer"], text_config=text,
                                   num_query_tokens=c["num_query_tokens"], image_token_index=vocab - 1)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    path = os.path.join(workdir, name)
    model.save_pretrained(path)
    return model, path, cfg


def inputs(cfg, batch: int, text_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    nq, vocab = cfg.num_query_tokens, cfg.text_config.vocab_size
    size = cfg.vision_config.image_size
    ids = np.ones((batch, nq + text_len), np.int64)
    mask = np.zeros_like(ids)
    for b in range(batch):
        pad = b % 3  # left padding of different lengths
        ids[b, pad:pad + nq] = cfg.image_token_index
        ids[b, pad + nq:] = rng.integers(3, vocab - 1, text_len - pad)
        mask[b, pad:] = 1
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    return pixels, ids, mask


def bench(name: str, batches, repeats: int, workdir: str) -> list[dict]:
    import jax
    import torch

    from mmedit_jax.loading import from_pretrained

    ref, path, cfg = build(name, workdir)
    model = from_pretrained(path)
    rows = []
    for batch in batches:
        pixels, ids, mask = inputs(cfg, batch, CONFIGS[name]["text_len"])
        tp, ti, tm = torch.from_numpy(pixels), torch.from_numpy(ids), torch.from_numpy(mask)

        def run_jax(pixels=pixels, ids=ids, mask=mask):
            return jax.block_until_ready(model(pixels, ids, mask))

        def run_torch(tp=tp, ti=ti, tm=tm):
            with torch.no_grad():
                return ref(pixel_values=tp, input_ids=ti, attention_mask=tm).logits

        t0 = time.perf_counter()
        got = run_jax()
        first = time.perf_counter() - t0
        want = run_torch().numpy()
        diff = float(np.abs(np.asarray(got) - want)[mask.astype(bool)].max())
        tj, tt = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_jax()
            tj.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_torch()
            tt.append(time.perf_counter() - t0)
        jax_ms, torch_ms = statistics.median(tj) * 1e3, statistics.median(tt) * 1e3
        rows.append(dict(config=name, batch=batch, seq_len=int(ids.shape[1]), jax_compile_s=first - jax_ms / 1e3,
                         jax_ms=jax_ms, torch_ms=torch_ms, speedup=torch_ms / jax_ms, max_abs_logit_diff=diff))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,mid")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    import jax
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.configs.split(","):
            rows += bench(name, [int(b) for b in args.batches.split(",")], args.repeats, workdir)
    cols = ["config", "batch", "seq_len", "jax_compile_s", "jax_ms", "torch_ms", "speedup", "max_abs_logit_diff"]
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>18.4g}" if isinstance(r[c], float) else f"{r[c]:>18}" for c in cols))
    if args.json:
        env = dict(jax=jax.__version__, torch=torch.__version__, device=str(jax.devices()[0]),
                   torch_threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                   cpus=os.cpu_count())
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
