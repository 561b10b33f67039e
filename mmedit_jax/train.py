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
import os

from mmedit_jax import demo, pipeline, training
from mmedit_jax.eval import records
from mmedit_jax.sharding import mesh_from_flag


def demo_sites(model) -> tuple[str, ...]:
    """What `--demo` edits: fc1 and fc2 of the tiny model's last three layers (not the config's inner_params)."""
    n = model.config.text.num_hidden_layers
    return tuple(f"language_model/layers/{i}/{f}" for i in range(max(0, n - 3), n) for f in ("fc1", "fc2"))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", choices=pipeline.TRAINABLE, required=True)
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
    ap.add_argument("--no-resume", action="store_true",
                    help="start over: the previous run's outputs in --out move to --out/replaced-<time>/")
    ap.add_argument("--demo", action="store_true", help="synthetic data and a tiny random BLIP-2")
    ap.add_argument("--demo-records", type=int, default=64)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-tensorboard", action="store_true", help="JSONL only, no TensorBoard event files")
    ap.add_argument("--mesh", help="train on a device mesh: 'auto' (edits over every device) or DATAxMODEL, e.g. "
                    "4x2 (edits over 4, base weights split over 2); --batch-size must divide by DATA")
    args = ap.parse_args(argv)

    hparams = pipeline.read_hparams(args.config)
    named = str(hparams.get("alg_name", hparams.get("alg", args.editor))).lower()
    if named != args.editor:
        ap.error(f"--editor {args.editor} but {args.config} is a {named!r} config")
    overrides = dict(max_iters=args.max_iters, batch_size=args.batch_size, accumulate_bs=args.accumulate_bs,
                     val_interval=args.val_interval, val_steps=args.val_steps, log_interval=args.log_interval,
                     seed=args.seed, alg=args.editor.upper())
    if args.demo:
        tok, model, train_records, val_records = demo.demo_world(os.path.join(args.out, "demo"), args.demo_records,
                                                                 max(8, args.demo_records // 4), args.seed or 0)
        task = "vqa"
        overrides["inner_params"] = demo_sites(model)
        print(f"demo: editing {list(overrides['inner_params'])} of the tiny model instead of the config's "
              "inner_params")
    else:
        if not (args.model and args.data and args.image_root):
            ap.error("--model, --data and --image-root are required (or --demo)")
        model, tok = pipeline.load_model(args.model, image_size=args.image_size)
        task = pipeline.task_of(args.data, args.task)
        train_records = pipeline.load_split(args.data, task, args.image_root, args.rephrase_image_root,
                                            limit=args.limit).records
        val_records = []
        if args.val_data:
            val_records = pipeline.load_split(args.val_data, task, args.image_root, args.rephrase_image_root).records
    cfg = training.TrainConfig.from_hparams(hparams, **overrides)
    trainable = training.build_trainable(args.editor, model, hparams, cfg,
                                         image_wrap=pipeline.image_wrap(model.config, tok))
    train_prepared = pipeline.prepare_data(train_records, tok, model, task)
    train_cases = pipeline.cases_for(trainable.fns, model.params, train_prepared)
    val_cases, val_meta = None, None
    if val_records:
        val_prepared = pipeline.prepare_data(val_records, tok, model, task)
        val_cases, val_meta = pipeline.cases_for(trainable.fns, model.params, val_prepared), val_prepared.meta
    def write_config():  # once the directory is this run's (a refused resume leaves the other run's file alone)
        records.write_json(args.out, "train_config.json", {
            "editor": args.editor, "train": cfg.as_json(), "editor_spec": dataclasses.asdict(trainable.spec.cfg),
            "sites": list(trainable.spec.sites)})

    init = training.load_editor_state(args.init_editor, args.editor) if args.init_editor else None
    try:
        result = training.train(trainable, cfg, model.params, train_cases, args.out, val_cases=val_cases,
                                val_meta=val_meta, progress=not args.no_progress, resume=not args.no_resume,
                                tensorboard=not args.no_tensorboard, mesh=mesh_from_flag(args.mesh), init=init,
                                on_claim=write_config)
    except records.RunMismatch as e:
        raise SystemExit(f"error: {e}") from None
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
