"""Rebuild everything the built-in world ships, from seeds: the pretrained model and the meta-trained editors.

    python -m mmedit_jax.world.build [--family blip2|minigpt4] [--work DIR] [--steps N] [--editors mend,ke]
                                     [--task vqa|caption] [--install]
    python -m mmedit_jax.world.build --model mmedit_jax/assets/world/model --task caption --editors mend --install

1. the world's MMEdit files (`assets.ensure_data`; an editor's config may ask for a larger train split with
   `world_n_train`, generated beside it: same eval split, same first train records);
2. `world.pretrain` of the family's model -> `WORK/pretrain/model` (+ `pretrain_report.json` with held-out
   accuracy); for BLIP-2 on a mixture of plain and IKE-shaped in-context examples, then trained further on the
   same mixture at half the learning rate (`SECOND_STAGE`) -> `WORK/pretrain_more/model`: one model that every
   editor, IKE included, runs on;
3. `python -m mmedit_jax.train --editor E --config configs/E_world.yaml` on the E-VQA train split, validated on
   the eval split -> `WORK/E_vqa/editor`; where `configs/E_world_finetune.yaml` exists, a second stage
   warm-starts from that editor (`--init-editor`) -> `WORK/E_vqa_finetune/editor`, and so on through
   `_finetune2`, `_finetune3` where they exist; the last stage's editor is the one installed (for the
   MiniGPT-4 family the configs are `E_world_minigpt4.yaml` and `E_world_minigpt4_finetune.yaml`);
4. with `--install`, copies the model and editors into the family's assets (`mmedit_jax/assets/world/`,
   `mmedit_jax/assets/world_minigpt4/`: what `bench --family` loads).
`--model DIR` skips step 2 and meta-trains on that pretrained model (the shipped one, to add editors for another
task); the model itself is then not installed. Where `configs/E_{world}_{task}.yaml` exists, that task has its own
recipe: it and `configs/E_{world}_finetune_{task}.yaml` (if any) replace the files above. A config's
`world_init_editor` (a path under the repository) warm-starts its first stage from an existing editor: this
build's own copy of it when it has made one (`WORK/{name}*`), else the installed one.
Each step is skipped when its output exists, so an interrupted build resumes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from mmedit_jax.editors.hparams import load_hparams
from mmedit_jax.world import assets
from mmedit_jax.world.pretrain import FAMILIES, pretrain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Training stages of each editor: config suffix -> run-directory suffix. A later stage runs only where its config
# exists, warm-started from the previous stage's editor.
STAGES = {"": "", "_finetune": "_finetune", "_finetune2": "_finetune2", "_finetune3": "_finetune3"}
WORLD_CONFIG = {"blip2": "world", "minigpt4": "world_minigpt4"}  # configs/{editor}_{this}{stage}[_{task}].yaml
DEFAULTS = {"blip2": ("runs/world_build", "mend,ke,serac", 3000),
            "minigpt4": ("runs/world_build_minigpt4", "mend", 1000)}
# IKE-shaped examples per pretraining step (`pretrain.in_context_batch`): the BLIP-2 world is IKE's; the MiniGPT-4
# world runs no IKE and keeps its recipe.
IN_CONTEXT_BATCH = {"blip2": 8, "minigpt4": 0}
# The BLIP-2 world's second pretraining stage, from the first stage's model: the same mixture at half the
# learning rate, another seed. It takes held-out in-context accuracy to 100 % on both tasks' edit, rephrase and
# image-rephrase inputs (stage 1 alone: IKE well below its targets), so IKE runs on the model the other editors
# are meta-trained on (README, "IKE").
SECOND_STAGE = {"blip2": dict(steps=2000, lr=1e-3, in_context_batch=8, random_targets=0.0, seed_offset=1),
                "minigpt4": None}


def own_build_of(asset: str, work: str) -> str | None:
    """A config's `world_init_editor` (an installed asset, `.../{editor}_{task}`) as this build made it: the last
    finished stage's editor under `work`, so that a fresh build warm-starts from its own editors, not from the
    ones installed from an older model. None when this build has not made it."""
    name = os.path.basename(os.path.normpath(asset))
    found = None
    for suffix in STAGES.values():
        out = os.path.join(work, name + suffix)
        if os.path.exists(os.path.join(out, "DONE")):
            found = os.path.join(out, "editor")
    return found


def stage_config(editor: str, world: str, stage: str, task: str) -> str:
    """The config of one stage: `configs/{editor}_{world}{stage}_{task}.yaml` when the task has its own recipe (its
    own first-stage file), else `configs/{editor}_{world}{stage}.yaml`. The path may not exist (no such stage)."""
    own = os.path.exists(os.path.join(REPO, "configs", f"{editor}_{world}_{task}.yaml"))
    return os.path.join(REPO, "configs", f"{editor}_{world}{stage}{f'_{task}' if own else ''}.yaml")


def train_editor(editor: str, config: str, model_dir: str, out: str, task: str, seed: int, init: str | None):
    train_data = assets.ensure_data(n_train=load_hparams(config).get("world_n_train"))
    train_json = os.path.join(train_data, "vqa_train.json" if task == "vqa" else "caption_train_edit.json")
    eval_json = os.path.join(train_data, "vqa_eval.json" if task == "vqa" else "caption_eval_edit.json")
    cmd = [sys.executable, "-m", "mmedit_jax.train", "--editor", editor, "--config", config, "--model", model_dir,
           "--data", train_json, "--val-data", eval_json, "--image-root", train_data, "--out", out,
           "--no-progress", "--seed", str(seed)]
    if init:
        cmd += ["--init-editor", init]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.world.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="blip2", choices=FAMILIES, help="the world model's family")
    ap.add_argument("--work", help="default: runs/world_build (blip2), runs/world_build_minigpt4 (minigpt4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="pretraining steps (default: 3000 for blip2, 1000 for minigpt4)")
    ap.add_argument("--editors", help="default: mend,ke,serac (blip2), mend (minigpt4)")
    ap.add_argument("--task", default="vqa", choices=("vqa", "caption"))
    ap.add_argument("--model", help="an existing pretrained world model: skip pretraining (and do not install it)")
    ap.add_argument("--install", action="store_true", help="copy the results into the family's assets")
    args = ap.parse_args(argv)
    work, editors, steps = DEFAULTS[args.family]
    work, editors, steps = args.work or work, args.editors or editors, args.steps or steps

    data = assets.ensure_data()
    evals = [os.path.join(data, f) for f in ("vqa_eval.json", "caption_eval_edit.json")]
    first = os.path.join(work, "pretrain", "model")
    second = SECOND_STAGE[args.family]
    model_dir = args.model or (os.path.join(work, "pretrain_more", "model") if second else first)
    if args.model and not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model}: no such directory")
    if not args.model and not os.path.isdir(first):
        pretrain(os.path.dirname(first), args.seed, steps, eval_files=evals, image_root=data, family=args.family,
                 in_context_batch=IN_CONTEXT_BATCH[args.family])
    if not args.model and second and not os.path.isdir(model_dir):
        pretrain(os.path.dirname(model_dir), args.seed + second["seed_offset"], second["steps"], lr=second["lr"],
                 eval_files=evals, image_root=data, family=args.family, in_context_batch=second["in_context_batch"],
                 init=first, random_targets=second["random_targets"])
    editor_dirs = {}
    for editor in [e for e in editors.split(",") if e]:
        init = None  # stage 1: from scratch, or the config's `world_init_editor`; later stages: the previous one
        for stage in STAGES:
            config = stage_config(editor, WORLD_CONFIG[args.family], stage, args.task)
            if stage and not os.path.exists(config):
                break
            out = os.path.join(work, f"{editor}_{args.task}{STAGES[stage]}")
            editor_dirs[editor] = os.path.join(out, "editor")
            if not stage and load_hparams(config).get("world_init_editor"):
                asset = load_hparams(config)["world_init_editor"]
                init = own_build_of(asset, work) or os.path.join(REPO, asset)
            if not (os.path.isdir(editor_dirs[editor]) and os.path.exists(os.path.join(out, "DONE"))):
                train_editor(editor, config, model_dir, out, args.task, args.seed, init)
                open(os.path.join(out, "DONE"), "w").close()
            init = editor_dirs[editor]
    if args.install:
        installed = assets.assets_dir(args.family)
        os.makedirs(installed, exist_ok=True)
        targets = {f"{e}_{args.task}": d for e, d in editor_dirs.items()}
        if not args.model:
            targets["model"] = model_dir
        for name, src in targets.items():
            dst = os.path.join(installed, name)
            if os.path.exists(dst):
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
            print(f"installed {dst}")
        report = os.path.join(os.path.dirname(model_dir), "pretrain_report.json")
        if os.path.exists(report) and not args.model:
            shutil.copy2(report, os.path.join(installed, "pretrain_report.json"))


if __name__ == "__main__":
    main()
