"""Meta-train a MEND or KE editor on an MMEdit train split.

    python -m mmedit_jax.train --editor mend --config configs/mend_blip2.yaml --model DIR \\
        --data vqa_train.json --val-data vqa_eval.json --image-root DIR --out runs/mend
    python -m mmedit_jax.train --editor ke --config configs/ke_blip2.yaml --demo --out runs/ke_demo

`--config` takes EasyEdit hparams YAML keys (`hparams/TRAINING/MEND/blip2.yaml` works as is). Rerunning the
same command resumes from the newest checkpoint in `--out`. Writes `metrics.jsonl`, `checkpoints/` and
`editor/` (the best editor, for `python -m mmedit_jax.evaluate --editor-ckpt`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax

from mmedit_jax.editors import mend_net as MN
from mmedit_jax.editors import train as T
from mmedit_jax.eval.model_fns import Blip2Fns
from mmedit_jax.sharding import mesh_from_flag


def build_trainable(kind: str, model, hparams: dict, cfg: T.TrainConfig, pixels: bool = False) -> T.Trainable:
    """A MEND or KE trainable for a `Blip2Model`, its sites from `cfg.inner_params`."""
    sites = T.resolve_sites(cfg.inner_params, model.params, model.stacks)
    from mmedit_jax.patch import kernel_of

    shapes = {s: tuple(kernel_of(model.params, s, model.stacks).shape) for s in sites}
    fns = Blip2Fns(model.module, pixels=pixels)
    if kind == "mend":
        spec = MN.mend_spec(MN.MendConfig.from_hparams(hparams), shapes)
        return T.mend_trainable(spec, fns)
    if kind == "ke":
        from mmedit_jax.editors.ke import ke_spec

        spec = ke_spec(T.ke_config_from_hparams(hparams), shapes)
        emb = model.params["language_model"]["embed_tokens"]["embedding"]
        return T.ke_trainable(spec, fns, emb)
    raise ValueError(f"editor {kind!r}: expected mend or ke")


def load_editor_state(kind: str, path: str) -> tuple[dict, dict]:
    """(params, editor_state) of a saved MEND or KE editor, for `--init-editor`."""
    if kind == "mend":
        from mmedit_jax.convert.mend_easyedit import load_mend

        _, params, stats = load_mend(path)
        return params, stats
    from mmedit_jax.editors.ke import load_ke

    return load_ke(path)[1], {}


def cases_for(records, tok, model, task: str, pixels: bool):
    """Host `Case`s (leading `[N]`) and metadata for `records`; image embeddings computed once unless `pixels`."""
    from mmedit_jax import evaluate as E
    from mmedit_jax.eval import harness

    prepared = E.prepare_data(records, tok, model, task, model.config.vision.image_size)
    if pixels:
        table = prepared.pixels
    else:
        encode = jax.jit(Blip2Fns(model.module).encode)
        table = harness.encode_image_table(lambda p, x: encode(p, {}, x), model.params, prepared.pixels)
    return harness.make_cases(prepared.batch, table), prepared.meta


def demo_world(out_dir: str, n_train: int, n_val: int, seed: int):
    """Synthetic train/eval E-VQA files and a tiny random BLIP-2 (`evaluate.demo_setup`)."""
    from mmedit_jax import evaluate as E
    from mmedit_jax.data.mmedit import load_mmedit
    from mmedit_jax.data.synthetic import write_synthetic_mmedit

    paths, tok, model = E.demo_setup(out_dir, n_val, seed)
    train_paths = write_synthetic_mmedit(os.path.join(out_dir, "data"), "vqa", n_train, seed + 1, image_size=32,
                                         split="train")
    train = load_mmedit(train_paths.json_path, "vqa", train_paths.image_root).records
    val = load_mmedit(paths.json_path, "vqa", paths.image_root).records
    return tok, model, train, val


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", choices=("mend", "ke"), required=True)
    ap.add_argument("--config", required=True, help="hparams YAML in EasyEdit's keys (configs/*.yaml)")
    ap.add_argument("--model", help="converted or Hugging Face BLIP-2 directory (tokenizer files beside it)")
    ap.add_argument("--data", help="MMEdit train JSON (vqa_train.json, caption_train_edit.json)")
    ap.add_argument("--val-data", help="MMEdit JSON for validation (vqa_eval.json, ...)")
    ap.add_argument("--task", choices=("vqa", "caption"), help="default: from the file name")
    ap.add_argument("--image-root", help="EasyEdit's coco_image")
    ap.add_argument("--rephrase-image-root", help="EasyEdit's rephrase_image (default: --image-root)")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--limit", type=int, help="only the first N train records")
    ap.add_argument("--out", required=True, help="run directory (metrics.jsonl, checkpoints/, editor/)")
    ap.add_argument("--max-iters", type=int)
    ap.add_argument("--batch-size", type=int, help="edits per compiled step (vmapped)")
    ap.add_argument("--accumulate-bs", type=int)
    ap.add_argument("--val-interval", type=int)
    ap.add_argument("--val-steps", type=int)
    ap.add_argument("--log-interval", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--init-editor", help="warm start: a trained editor directory (same config and sites), e.g. "
                    "the shipped world editor, fine-tuned with a fresh optimiser")
    ap.add_argument("--no-resume", action="store_true", help="start over (removes nothing but ignores checkpoints)")
    ap.add_argument("--demo", action="store_true", help="synthetic data and a tiny random BLIP-2")
    ap.add_argument("--demo-records", type=int, default=64)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-tensorboard", action="store_true", help="JSONL only, no TensorBoard event files")
    ap.add_argument("--mesh", help="train on a device mesh: 'auto' (edits over every device) or DATAxMODEL, e.g. "
                    "4x2 (edits over 4, base weights split over 2); --batch-size must divide by DATA")
    args = ap.parse_args(argv)

    from mmedit_jax.editors.hparams import load_hparams

    hparams = load_hparams(args.config)
    named = str(hparams.get("alg_name", hparams.get("alg", args.editor))).lower()
    if named != args.editor:
        ap.error(f"--editor {args.editor} but {args.config} is a {named!r} config")
    overrides = dict(max_iters=args.max_iters, batch_size=args.batch_size, accumulate_bs=args.accumulate_bs,
                     val_interval=args.val_interval, val_steps=args.val_steps, log_interval=args.log_interval,
                     seed=args.seed, alg=args.editor.upper())
    if args.demo:
        tok, model, train_records, val_records = demo_world(os.path.join(args.out, "demo"), args.demo_records,
                                                            max(8, args.demo_records // 4), args.seed or 0)
        task = "vqa"
        n_layers = model.config.text.num_hidden_layers
        demo_sites = [f"language_model/layers/{i}/{n}" for i in range(max(0, n_layers - 3), n_layers)
                      for n in ("fc1", "fc2")]
        print(f"demo: editing {demo_sites} of the tiny model instead of the config's inner_params")
        overrides["inner_params"] = tuple(demo_sites)
    else:
        if not (args.model and args.data and args.image_root):
            ap.error("--model, --data and --image-root are required (or --demo)")
        from transformers import AutoTokenizer

        from mmedit_jax.data.mmedit import load_mmedit
        from mmedit_jax.loading import from_pretrained

        model = from_pretrained(args.model, image_size=args.image_size)
        tok = AutoTokenizer.from_pretrained(args.model)
        task = args.task or ("caption" if "caption" in os.path.basename(args.data) else "vqa")
        loaded = load_mmedit(args.data, task, args.image_root, args.rephrase_image_root, size=args.limit)
        print(f"{args.data}: {loaded.summary()}")
        train_records = loaded.records
        val_records = []
        if args.val_data:
            lv = load_mmedit(args.val_data, task, args.image_root, args.rephrase_image_root)
            print(f"{args.val_data}: {lv.summary()}")
            val_records = lv.records
        if not train_records:
            raise SystemExit("no usable train records")
    cfg = T.TrainConfig.from_hparams(hparams, **overrides)
    trainable = build_trainable(args.editor, model, hparams, cfg)
    from mmedit_jax.editors.base import touches_vision

    pixels = touches_vision(trainable.spec.sites)
    trainable = build_trainable(args.editor, model, hparams, cfg, pixels=pixels) if pixels else trainable
    train_cases, _ = cases_for(train_records, tok, model, task, pixels)
    val_cases, val_meta = cases_for(val_records, tok, model, task, pixels) if val_records else (None, None)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_config.json"), "w") as f:
        json.dump({"editor": args.editor, "train": {k: (list(v) if isinstance(v, tuple) else v)
                                                    for k, v in dataclasses.asdict(cfg).items()},
                   "editor_spec": dataclasses.asdict(trainable.spec.cfg), "sites": list(trainable.spec.sites)},
                  f, indent=1)
    init = None
    if args.init_editor:
        init = load_editor_state(args.editor, args.init_editor)
    result = T.train(trainable, Blip2Fns(model.module, pixels=pixels), cfg, model.params, train_cases,
                     len(train_records), args.out, val_cases=val_cases, val_meta=val_meta,
                     progress=not args.no_progress, resume=not args.no_resume,
                     tensorboard=not args.no_tensorboard, mesh=mesh_from_flag(args.mesh), init=init)
    last = [r for r in result.history if r.get("split") != "val"]
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}")
    if last:
        print(f"step {last[-1]['step']}: loss {last[-1]['loss/total_edit']:.4f}, edit acc {last[-1]['edit/acc']:.3f}, "
              f"skipped steps {int(result.state['skipped'])}")
    vals = [r for r in result.history if r.get("split") == "val"]
    if vals:
        print("validation: " + ", ".join(f"{k}={v:.4f}" for k, v in vals[-1].items() if isinstance(v, float)))
    print(f"editor written to {os.path.join(args.out, 'editor')}")
    return result


if __name__ == "__main__":
    main()

