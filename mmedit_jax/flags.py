"""The command-line flags `evaluate`, `bench` and `train` share, defined once (argparse only, no work)."""

from __future__ import annotations

import argparse

from mmedit_jax.pipeline import EDITORS
from mmedit_jax.world.assets import ASSETS_OF


def add_editor(ap: argparse.ArgumentParser, default: str | None = None, choices=EDITORS) -> None:
    ap.add_argument("--editor", choices=choices, default=default, required=default is None)


def add_data(ap: argparse.ArgumentParser, default_model: str) -> None:
    """Model, data and editor inputs."""
    ap.add_argument("--model", help=f"converted or Hugging Face BLIP-2 directory, tokenizer files beside it "
                                    f"(default: {default_model})")
    ap.add_argument("--data", help="an MMEdit JSON file (vqa_eval.json, caption_eval_edit.json, ...)")
    ap.add_argument("--task", choices=("vqa", "caption"), help="default: from the file name")
    ap.add_argument("--image-root", help="EasyEdit's coco_image")
    ap.add_argument("--rephrase-image-root", help="EasyEdit's rephrase_image (default: --image-root)")
    ap.add_argument("--image-size", type=int, help="resize images (and the ViT positions) to this size")
    ap.add_argument("--config", help="editor hparams YAML in EasyEdit's keys (configs/*.yaml)")
    ap.add_argument("--editor-ckpt", help="trained MEND/KE editor directory")
    ap.add_argument("--ike-bank", help="IKE: the MMEdit training file whose records make the demonstration bank "
                                       "(default for the built-in world: its train split)")
    ap.add_argument("--sentence-encoder", help="IKE: all-MiniLM-L6-v2 directory (weights and tokenizer; default: "
                                               "TF-IDF over the model's tokens)")
    ap.add_argument("--limit", type=int, help="only the first N records of the file (before filtering, as `size`)")


def add_world(ap: argparse.ArgumentParser) -> None:
    """The built-in world's options."""
    ap.add_argument("--cache-dir", help="where the built-in world's files are generated")
    ap.add_argument("--family", choices=tuple(ASSETS_OF), default="blip2",
                    help="the built-in world's model: BLIP-2-shaped (default) or MiniGPT-4-shaped")


def add_scoring(ap: argparse.ArgumentParser) -> None:
    """How cases are padded and scored."""
    ap.add_argument("--token-accuracy", action="store_true",
                    help="token accuracy instead of exact match (EasyEdit's BLIP-2 configs use exact match)")
    ap.add_argument("--pad-multiple", type=int, default=1,
                    help="pad each input to the split's longest, rounded up to a multiple of this (8 or 16 may suit "
                         "GPU/TPU kernels better; 1 computes no pad rows beyond the longest)")


def add_mesh(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--mesh", help="run on a device mesh: 'auto' (edits over every device) or DATAxMODEL, e.g. 4x2 "
                    "(edits over 4, weights split over 2 by the partition rules); the batch size must divide by DATA")
