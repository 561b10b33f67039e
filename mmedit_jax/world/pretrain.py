"""Pretrain a small BLIP-2 or MiniGPT-4 on the built-in world, so that it knows what later gets edited.

    python -m mmedit_jax.world.pretrain --out DIR [--family blip2|minigpt4] [--seed 0] [--steps 3000]

Trains a tokenizer on the world's text, then every parameter of a small model of the family (same modules as the
real one: EVA-style ViT, Q-Former, then OPT for BLIP-2, `llama_proj` + LLaMA for MiniGPT-4, whose prompt wrapper
goes around the image slots as in evaluation) with AdamW on the answer tokens of an endless stream of freshly
rendered scenes (questions in every phrasing, captions) and encyclopaedia facts. Reports held-out accuracy (exact
match of the whole answer, teacher-forced, as the metrics score it) on the eval split's unseen scenes and on the
facts, and writes `DIR/model` (a converted checkpoint with the tokenizer beside it). Reproducible from the seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from mmedit_jax import checkpoint
from mmedit_jax.case import Seq
from mmedit_jax.data.cases import CaseConfig, ImageTable, TextInput, encode_inputs
from mmedit_jax.data.image import load_image, preprocess_image
from mmedit_jax.data.tokenizer import train_bpe_tokenizer
from mmedit_jax.editors.ike import demo, fact_line, join_context
from mmedit_jax.loading import from_pretrained
from mmedit_jax.losses import masked_nll
from mmedit_jax.models.blip2 import Blip2Model
from mmedit_jax.models.config import (
    Blip2Config,
    LlamaConfig,
    MiniGPT4Config,
    OPTConfig,
    QFormerConfig,
    VisionConfig,
)
from mmedit_jax.models.minigpt4 import MiniGPT4Model
from mmedit_jax.pipeline import image_wrapper, load_tokenizer
from mmedit_jax.world.dataset import VQA_TEMPLATE, in_context_stream, pretraining_stream, world_texts

FAMILIES = ("blip2", "minigpt4")
SEQ_LEN = 32  # the longest world input is 8 image slots + 17 text tokens
# MiniGPT-4 wraps the slots in '###Human: <Img>' ... '</Img> ' (10 more tokens with its tokenizer: at most 35).
SEQ_LENS = {"blip2": SEQ_LEN, "minigpt4": 40}
# In-context (IKE) pretraining: up to `MAX_DEMOS` demonstrations (at most 42 tokens each with the world's BPE), the
# own demo and the "New Fact" line (24) fit `CONTEXT_LEN` (the longest possible context is 150 tokens);
# `IN_CONTEXT_POSITIONS` holds it beside the longest input.
MAX_DEMOS, CONTEXT_LEN, IN_CONTEXT_POSITIONS = 2, 152, 192


SIZES = {  # (vision width, vision layers, Q-Former width, Q-Former layers, text width, text layers)
    "world": (96, 3, 96, 2, 128, 4),  # ~1.4 M parameters: the shipped model
    "test": (32, 1, 32, 1, 32, 1),
}


def world_config(tok, image_size: int = 32, num_query_tokens: int = 8, size: str = "world",
                 max_positions: int = 128) -> Blip2Config:
    """The world model, BLIP-2-shaped (same modules as the real one, small widths)."""
    vw, vl, qw, ql, tw, tl = SIZES[size]
    return Blip2Config(
        vision=VisionConfig(hidden_size=vw, intermediate_size=vw * 8 // 3, num_hidden_layers=vl, patch_size=4,
                            num_attention_heads=4, image_size=image_size),
        qformer=QFormerConfig(hidden_size=qw, num_hidden_layers=ql, num_attention_heads=4,
                              intermediate_size=qw * 8 // 3, cross_attention_frequency=1, encoder_hidden_size=vw),
        text=OPTConfig(vocab_size=len(tok), hidden_size=tw, num_hidden_layers=tl, ffn_dim=tw * 4,
                       num_attention_heads=4, max_position_embeddings=max_positions,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        num_query_tokens=num_query_tokens, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )


def minigpt4_config(tok, image_size: int = 32, num_query_tokens: int = 8, size: str = "world",
                    max_positions: int = 128) -> MiniGPT4Config:
    """The world model, MiniGPT-4-shaped: BLIP-2's vision side and Q-Former, `llama_proj`, a small LLaMA (SwiGLU
    at about 8/3 of the width, as LLaMA's; untied head) and MiniGPT-4's prompt wrapper around the image slots."""
    blip2 = world_config(tok, image_size, num_query_tokens, size)
    tw, tl = SIZES[size][4:]
    return MiniGPT4Config(
        vision=dataclasses.replace(blip2.vision, post_layernorm_eps=1e-5),  # MiniGPT-4's `ln_vision`
        qformer=blip2.qformer,
        text=LlamaConfig(vocab_size=len(tok), hidden_size=tw, intermediate_size=tw * 11 // 4, num_hidden_layers=tl,
                         num_attention_heads=4, max_position_embeddings=max_positions,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        num_query_tokens=num_query_tokens,
    )


CONFIG_OF = {"blip2": world_config, "minigpt4": minigpt4_config}
MODEL_OF = {"blip2": Blip2Model, "minigpt4": MiniGPT4Model}


def build_tokenizer(out_dir: str | None, family: str = "blip2", in_context: bool = False):
    """The world's BPE tokenizer; MiniGPT-4's also learns its prompt wrapper (so '###Human: <Img>' is a few
    tokens, not bytes); with `in_context`, IKE's demonstration format too."""
    texts = world_texts(in_context)
    if family == "minigpt4":
        wrapper = MiniGPT4Config()
        texts += [wrapper.prompt_before, wrapper.prompt_after] * 64
    return train_bpe_tokenizer(texts * 4, vocab_size=640, out_dir=out_dir)


def case_config(config, tok) -> CaseConfig:
    """How the world's inputs are encoded for `config`'s family: as `pipeline.prepare_data` encodes them."""
    return CaseConfig(task="vqa", num_query_tokens=config.num_query_tokens, image_token_id=config.image_token_index,
                      **image_wrapper(config, tok))


def encode_examples(examples, tok, config, image_size: int, length: int = SEQ_LEN, context_len: int = CONTEXT_LEN):
    """Examples -> (pixels [B, 3, S, S], input_ids, attention_mask, labels), fixed length `length`, or
    `length + context_len` when the examples carry IKE contexts."""
    arrays = {}
    inputs = []
    for i, ex in enumerate(examples):
        key = None
        if ex.image is not None:
            key = f"ex{i}"
            arrays[key] = preprocess_image(Image.fromarray(ex.image, "RGB"), image_size)
        inputs.append(TextInput(ex.prompt, ex.target, key))
    table = ImageTable(lambda k: arrays[k])
    tb = encode_inputs(inputs, tok, table, case_config(config, tok), length=length, name="pretrain")
    blank = np.zeros((3, image_size, image_size), np.float32)
    pixels = np.stack([table.array(int(j)) if j >= 0 else blank for j in tb.image_ids])
    if not any(ex.context for ex in examples):
        return pixels, tb.input_ids, tb.attention_mask, tb.labels
    image_block = len(case_config(config, tok).image_block)
    return (pixels, *with_contexts(tb, [ex.context for ex in examples], tok, image_block, context_len))


def with_contexts(tb, contexts, tok, image_block: int, context_len: int = CONTEXT_LEN):
    """IKE's layout: each input of `tb` (a `TokenBatch`) with its context string right after its `image_block`
    positions (the image slots and any wrapper; `editors.ike.join_context`), padded to `context_len` inside the
    sequence as evaluation pads its contexts.
    -> (input_ids, attention_mask, labels) `[B, L + context_len]`."""
    rows = []
    for i, context in enumerate(contexts):
        ctx = list(tok(context, add_special_tokens=False)["input_ids"])
        if len(ctx) > context_len:
            raise ValueError(f"in-context example {i}: context of {len(ctx)} tokens > {context_len}")
        ids = np.full(context_len, tok.pad_token_id, np.int32)
        ids[: len(ctx)] = ctx
        seq = Seq(tb.input_ids[i], tb.attention_mask[i], tb.labels[i])
        n = image_block if tb.image_ids[i] >= 0 else 0
        rows.append(join_context(seq, ids, (np.arange(context_len) < len(ctx)).astype(np.int32), n))
    return tuple(np.stack([np.asarray(getattr(r, f)) for r in rows]) for f in ("input_ids", "attention_mask", "labels"))


def make_train_step(model, optimizer):
    """`step(params, opt_state, *batches)`: one AdamW step on the sum of each batch's answer NLL (a batch is
    `(pixels, ids, mask, labels)`; the pretraining stream's and, in-context pretraining, IKE-shaped examples')."""
    module = model.module

    def loss_fn(params, batches):
        total = 0.0
        for pixels, ids, mask, labels in batches:
            logits, _ = module.apply({"params": params}, ids, mask,
                                     pixel_values=jnp.transpose(pixels, (0, 2, 3, 1)))
            total = total + masked_nll(logits, labels)
        return total

    @jax.jit
    def step(params, opt_state, *batches):
        loss, grads = jax.value_and_grad(loss_fn)(params, batches)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def exact_match_accuracy(model, params, tok, inputs: list[TextInput], image_size: int, batch_size: int = 64,
                         length: int = SEQ_LEN, contexts: list[str] | None = None) -> float:
    """Fraction of inputs whose whole target is the teacher-forced argmax (Reliability's `exact_match`); with
    `contexts`, each input read after its IKE context (`with_contexts`)."""
    cfg = case_config(model.config, tok)
    table = ImageTable(lambda p: load_image(p, image_size))
    hits = []
    for start in range(0, len(inputs), batch_size):
        tb = encode_inputs(inputs[start:start + batch_size], tok, table, cfg, length=length, name="eval")
        blank = np.zeros((3, image_size, image_size), np.float32)
        pixels = np.stack([table.array(int(j)) if j >= 0 else blank for j in tb.image_ids])
        ids, mask, labels = tb.input_ids, tb.attention_mask, tb.labels
        if contexts is not None:
            ids, mask, labels = with_contexts(tb, contexts[start:start + batch_size], tok, len(cfg.image_block))
        logits = np.asarray(model(pixels, ids, mask, params=params))
        pred, labels = logits[:, :-1].argmax(-1), labels[:, 1:]
        answer = labels != -100
        hits += list(((pred == labels) | ~answer).all(-1))
    return float(np.mean(hits))


def held_out_inputs(eval_json: str, image_root: str) -> dict[str, list[TextInput]]:
    """The eval split's questions with their TRUE answers: what the base model should get right."""
    with open(eval_json) as f:
        records = json.load(f)
    img = lambda p: os.path.join(image_root, p)  # noqa: E731
    vqa = "vqa" in os.path.basename(eval_json)
    tmpl = VQA_TEMPLATE.format if vqa else (lambda s: s)
    return {
        "scene (src)": [TextInput(tmpl(r["src"]), " " + r["pred"], img(r["image"])) for r in records],
        "scene (rephrase)": [TextInput(tmpl(r["rephrase"]), " " + r["pred"], img(r["image"])) for r in records],
        "scene (image rephrase)": [TextInput(tmpl(r["src"]), " " + r["pred"], img(r["image_rephrase"]))
                                   for r in records],
        "facts (loc)": [TextInput(r["loc"], " " + r["loc_ans"], None) for r in records],
        "other scenes (m_loc)": [TextInput(VQA_TEMPLATE.format(r["m_loc_q"]), " " + r["m_loc_a"], img(r["m_loc"]))
                                 for r in records],
    }


def held_out_in_context(eval_json: str, image_root: str) -> dict[str, tuple[list[TextInput], list[str]]]:
    """The eval split's five inputs after each record's IKE context with no retrieved demos (its own copy demo and
    the "New Fact" line), with the answers an edit should give: the new one in scope, the truth outside."""
    with open(eval_json) as f:
        records = json.load(f)
    img = lambda p: os.path.join(image_root, p)  # noqa: E731
    tmpl = VQA_TEMPLATE.format if "vqa" in os.path.basename(eval_json) else (lambda s: s)
    contexts = [demo(tmpl(r["src"]), r["alt"], tmpl(r["src"]), r["alt"]) + fact_line(tmpl(r["src"]), r["alt"])
                for r in records]
    inputs = {
        "edit": [TextInput(tmpl(r["src"]), " " + r["alt"], img(r["image"])) for r in records],
        "rephrase": [TextInput(tmpl(r["rephrase"]), " " + r["alt"], img(r["image"])) for r in records],
        "image rephrase": [TextInput(tmpl(r["src"]), " " + r["alt"], img(r["image_rephrase"])) for r in records],
        "facts (loc)": [TextInput(r["loc"], " " + r["loc_ans"], None) for r in records],
        "other scenes (m_loc)": [TextInput(VQA_TEMPLATE.format(r["m_loc_q"]), " " + r["m_loc_a"], img(r["m_loc"]))
                                 for r in records],
    }
    return {name: (xs, contexts) for name, xs in inputs.items()}


def pretrain(out_dir: str, seed: int = 0, steps: int = 3000, batch_size: int = 32, lr: float = 2e-3,
             image_size: int = 32, eval_files=(), image_root: str | None = None, log_every: int = 250,
             size: str = "world", family: str = "blip2", in_context_batch: int = 0, init: str | None = None,
             plain_steps: int = 0, random_targets: float = 0.0):
    """`in_context_batch`: IKE-shaped examples (`dataset.in_context_stream`) per step beside the `batch_size`
    plain ones, from step `plain_steps` on (a curriculum: the model first learns to see, then to read facts); with
    it the tokenizer learns the demonstration format and the model has `IN_CONTEXT_POSITIONS` positions. `init`: a
    model this function wrote (its `model` directory), trained further (its tokenizer and config kept; a fresh
    optimiser and schedule; the streams continue from `seed`, so pass another seed than the first stage's to see
    new examples). `random_targets`: the share of in-context facts whose new answer is any word
    (`dataset.random_answer`), so that only a copy of the stated answer lowers their loss. An in-context example
    whose context exceeds `CONTEXT_LEN` tokens is drawn again (counted: `in_context_too_long` in the report)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")
    os.makedirs(out_dir, exist_ok=True)
    model_dir = os.path.join(out_dir, "model")
    if init:
        model, tok = from_pretrained(init), load_tokenizer(init)
        config, positions = model.config, model.config.text.max_position_embeddings
        if type(model) is not MODEL_OF[family]:
            raise ValueError(f"--init {init} holds a {type(model).__name__}, not a {family} world model")
        if in_context_batch and positions < IN_CONTEXT_POSITIONS:
            raise ValueError(f"--init {init} has {positions} positions: in-context pretraining needs "
                             f"{IN_CONTEXT_POSITIONS} (start it from scratch)")
    else:
        tok = build_tokenizer(None, family, in_context=in_context_batch > 0)
        positions = IN_CONTEXT_POSITIONS if in_context_batch else 128
        config = CONFIG_OF[family](tok, image_size, size=size, max_positions=positions)
        model = MODEL_OF[family].init(config, jax.random.PRNGKey(seed))
    length = SEQ_LENS[family]
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr * 0.02)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    params, opt_state = model.params, optimizer.init(model.params)
    step_fn = make_train_step(model, optimizer)
    stream = pretraining_stream(seed, image_size)
    icl_stream = in_context_stream(seed, image_size, MAX_DEMOS, p_random_target=random_targets)
    too_long = [0]  # in-context examples whose context exceeds CONTEXT_LEN: drawn again, counted in the report

    def next_in_context():
        while True:
            ex = next(icl_stream)
            if len(tok(ex.context, add_special_tokens=False)["input_ids"]) <= CONTEXT_LEN:
                return ex
            too_long[0] += 1

    t0, t_compiled, losses = time.perf_counter(), None, []
    for step in range(steps):
        batches = [encode_examples([next(stream) for _ in range(batch_size)], tok, config, image_size, length)]
        if in_context_batch and step >= plain_steps:
            batches.append(encode_examples([next_in_context() for _ in range(in_context_batch)], tok, config,
                                           image_size, length))
        params, opt_state, loss = step_fn(params, opt_state, *batches)
        if step == 0:
            loss.block_until_ready()
            t_compiled = time.perf_counter()
        losses.append(loss)
        if (step + 1) % log_every == 0:
            recent = float(np.mean(jax.device_get(losses[-log_every:])))
            print(f"step {step + 1}/{steps}  loss {recent:.4f}  {time.perf_counter() - t0:.0f}s", flush=True)
    jax.block_until_ready(params)
    train_s = time.perf_counter() - t_compiled
    report = {"family": family, "steps": steps, "batch_size": batch_size, "in_context_batch": in_context_batch,
              "plain_steps": plain_steps if in_context_batch else None, "init": init, "lr": lr,
              "random_targets": random_targets if in_context_batch else None, "in_context_too_long": too_long[0],
              "max_positions": positions, "seed": seed, "train_s": train_s,
              "steps_per_s": (steps - 1) / train_s, "final_loss": float(np.mean(jax.device_get(losses[-50:]))),
              "num_params": int(sum(x.size for x in jax.tree.leaves(params))), "accuracy": {}}
    for file in eval_files:
        for name, inputs in held_out_inputs(file, image_root).items():
            acc = exact_match_accuracy(model, params, tok, inputs, image_size, length=length)
            report["accuracy"][f"{os.path.basename(file)}: {name}"] = acc
            print(f"held-out {os.path.basename(file)} {name}: {acc:.3f}")
        if in_context_batch:
            for name, (inputs, contexts) in held_out_in_context(file, image_root).items():
                acc = exact_match_accuracy(model, params, tok, inputs, image_size, length=length, contexts=contexts)
                report["accuracy"][f"{os.path.basename(file)}: in context, {name}"] = acc
                print(f"held-out {os.path.basename(file)} in context, {name}: {acc:.3f}")
    checkpoint.save_model(model_dir, config, jax.device_get(params), overwrite=True)
    tok.save_pretrained(model_dir)
    with open(os.path.join(out_dir, "pretrain_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {model_dir} ({report['num_params']:,} parameters, {report['steps_per_s']:.1f} steps/s)")
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.world.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--family", default="blip2", choices=FAMILIES, help="the world model's family")
    ap.add_argument("--data", help="a world directory (python -m mmedit_jax.world.generate) for held-out accuracy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--in-context-batch", type=int, default=0,
                    help="IKE-shaped examples per step beside the plain ones (0: none, the world v1 model's recipe)")
    ap.add_argument("--plain-steps", type=int, default=0,
                    help="with --in-context-batch: train on plain examples alone for this many steps first")
    ap.add_argument("--random-targets", type=float, default=0.0,
                    help="with --in-context-batch: the share of in-context facts with a random new answer")
    ap.add_argument("--init", help="a world model directory (`OUT/model` of an earlier run) to train further")
    args = ap.parse_args(argv)
    files = []
    if args.data:
        files = [os.path.join(args.data, f) for f in ("vqa_eval.json", "caption_eval_edit.json")
                 if os.path.exists(os.path.join(args.data, f))]
    pretrain(args.out, args.seed, args.steps, args.batch_size, args.lr, eval_files=files, image_root=args.data,
             family=args.family, in_context_batch=args.in_context_batch, init=args.init,
             plain_steps=args.plain_steps, random_targets=args.random_targets)


if __name__ == "__main__":
    main()
