"""Run an editor over an MMEdit file and score every edit.

    python -m mmedit_jax.evaluate --editor ft-l --model DIR --data vqa_eval.json --image-root DIR --out runs/x
    python -m mmedit_jax.evaluate --demo --out runs/demo      # synthetic MMEdit files + a tiny random BLIP-2

Writes `cases.jsonl` (one line per case, as it goes; rerunning the same command resumes) and `summary.json`,
and prints the paper's table (means x100). `--sequential` applies the edits one on top of another instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import numpy as np

from mmedit_jax.data.cases import CaseConfig, ImageTable, build_edit_batch, max_lengths
from mmedit_jax.data.image import load_image
from mmedit_jax.data.mmedit import load_mmedit
from mmedit_jax.editors.base import Editor
from mmedit_jax.eval import harness
from mmedit_jax.eval.model_fns import Blip2Fns
from mmedit_jax.eval.scoring import METRICS
from mmedit_jax.sharding import mesh_from_flag

EDITORS = ("ft-l", "ft-v", "mend", "ke")
HEADERS = {"reliability": "Rel.", "t_generality": "T-Gen.", "m_generality": "M-Gen.", "t_locality": "T-Loc.",
           "m_locality": "M-Loc."}


def build_editor(name: str, model, hparams: dict | None = None, editor_ckpt: str | None = None,
                 feature_cache: bool = True) -> Editor:
    """An `Editor` for `model` (a `Blip2Model`); `hparams` in EasyEdit key names override the defaults.

    Its forward takes pixels when it edits the vision side or the feature cache is off, else cached embeddings
    (`editor.vision_side` then says which table the harness must hand it).
    """
    from mmedit_jax.convert.blip2 import easyedit_site
    from mmedit_jax.editors import ft

    hparams = dict(hparams or {})

    def fns_for(sites):
        return Blip2Fns(model.module, pixels=ft.touches_vision(sites) or not feature_cache)

    if name in ("ft-l", "ft-v"):
        names = hparams.get("inner_params")
        if name == "ft-v" and (names is None or names == ["Qformer"]):
            sites = ft.ft_v_sites(model.params, model.stacks)
        elif names is None:
            sites = ft.ft_l_sites(model.config.text.num_hidden_layers)
        else:
            sites = tuple(easyedit_site(n) for n in names)
        keys = {f.name for f in dataclasses.fields(ft.FTConfig)} - {"inner_params"}
        cfg = ft.FTConfig(inner_params=sites, **{k: v for k, v in hparams.items() if k in keys})
        editor = ft.make_ft(name, fns_for(sites), cfg, model.params, model.stacks)
    elif name == "mend":
        from mmedit_jax.convert.mend_easyedit import load_mend
        from mmedit_jax.editors.mend import make_mend

        if editor_ckpt is None:
            raise SystemExit("--editor mend needs --editor-ckpt (a trained MEND: `python -m mmedit_jax.train`, or an "
                             "EasyEdit checkpoint converted with `python -m mmedit_jax.convert mend-easyedit`)")
        spec, net, stats = load_mend(editor_ckpt)
        editor = make_mend(spec, fns_for(spec.sites), net, stats)
    elif name == "ke":
        from mmedit_jax.editors.ke import load_ke, make_ke

        if editor_ckpt is None:
            raise SystemExit("--editor ke needs --editor-ckpt (a KE trained by `python -m mmedit_jax.train`)")
        spec, net = load_ke(editor_ckpt)
        editor = make_ke(spec, fns_for(spec.sites), net)
    else:
        raise SystemExit(f"editor {name!r} is not available (choose from {', '.join(EDITORS)})")
    # From here on `vision_side` means "takes pixels" for the harness.
    return dataclasses.replace(editor, vision_side=editor.vision_side or not feature_cache)


@dataclasses.dataclass
class Prepared:
    batch: object  # data.cases.EditBatch over every accepted record
    pixels: np.ndarray  # [N_images, 3, S, S]
    meta: list[dict]
    load_summary: str


def prepare_data(records, tok, model, task: str, image_size: int, pad_multiple: int | None = None) -> Prepared:
    """Token arrays for every record (one padded length per sub-input: one compiled program) and the images.

    Lengths are the configured buckets, or with `pad_multiple` the longest input rounded up to a multiple of it
    (`cases.max_lengths`)."""
    images = ImageTable(lambda p: load_image(p, image_size))
    cfg = CaseConfig(task=task, num_query_tokens=model.config.num_query_tokens,
                     image_token_id=model.config.image_token_index)
    batch = build_edit_batch(records, tok, images, cfg, lengths=max_lengths(records, tok, cfg, pad_multiple))
    meta = [{"index": r.index, "src": r.src, "alt": r.alt} for r in records]
    return Prepared(batch, images.stack(), meta, "")


def image_table(editor: Editor, model, pixels: np.ndarray) -> np.ndarray:
    """Pixels for editors that take them, else every distinct image's embeddings, computed once."""
    if editor.vision_side:
        return pixels
    encode = jax.jit(Blip2Fns(model.module).encode)
    return harness.encode_image_table(lambda p, x: encode(p, {}, x), model.params, pixels)


def print_table(summary: dict, file=sys.stdout) -> None:
    cols = ["editor", *HEADERS.values(), "cases", "edits/s"]
    vals = [summary["editor"], *(f"{summary[m]:.2f}" for m in METRICS), str(summary["num_cases"]),
            f"{summary.get('edits_per_s', float('nan')):.2f}"]
    widths = [max(len(c), len(v)) for c, v in zip(cols, vals)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)), file=file)
    print("  ".join(v.rjust(w) for v, w in zip(vals, widths)), file=file)
    pre = [f"{k[4:]}={summary[k]:.2f}" for k in summary if k.startswith("pre_")]
    if pre:
        print("pre-edit base accuracy: " + ", ".join(pre), file=file)


def run_editor(editor: Editor, model, prepared: Prepared, tok, out: str | None, *, batch_size: int,
               exact_match: bool, resume: bool, sequential: bool, progress: bool, mesh=None):
    fns = Blip2Fns(model.module, pixels=editor.vision_side)
    cases = harness.make_cases(prepared.batch, image_table(editor, model, prepared.pixels))
    decode = lambda ids: tok.decode([int(i) for i in ids])  # noqa: E731
    kw = dict(exact_match=exact_match, batch_size=batch_size, progress=progress)
    if sequential:
        if mesh is not None:
            raise SystemExit("--sequential runs one edit at a time on one device: drop --mesh")
        return harness.run_sequential(editor, fns, model.params, cases, prepared.meta, out, **kw)
    return harness.run(editor, fns, model.params, cases, prepared.meta, out, resume=resume, decode=decode, mesh=mesh,
                       **kw)


def demo_setup(out_dir: str, n_records: int, seed: int):
    """Synthetic MMEdit E-VQA files, a tokenizer trained on their text, and a tiny random BLIP-2 (its numbers
    mean nothing: a random model knows nothing to edit; the built-in world will replace this)."""
    from mmedit_jax.data.synthetic import write_synthetic_mmedit
    from mmedit_jax.data.tokenizer import train_bpe_tokenizer
    from mmedit_jax.models.blip2 import Blip2Model
    from mmedit_jax.models.config import Blip2Config, OPTConfig, QFormerConfig, VisionConfig

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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", choices=EDITORS, default="ft-l")
    ap.add_argument("--model", help="converted or Hugging Face BLIP-2 directory (tokenizer files beside it)")
    ap.add_argument("--data", help="an MMEdit JSON file (vqa_eval.json, caption_eval_edit.json, ...)")
    ap.add_argument("--task", choices=("vqa", "caption"), help="default: from the file name")
    ap.add_argument("--image-root", help="EasyEdit's coco_image")
    ap.add_argument("--rephrase-image-root", help="EasyEdit's rephrase_image (default: --image-root)")
    ap.add_argument("--image-size", type=int, help="resize images (and the ViT positions) to this size")
    ap.add_argument("--config", help="editor hparams YAML in EasyEdit's keys (configs/*.yaml)")
    ap.add_argument("--editor-ckpt", help="trained MEND/KE editor directory")
    ap.add_argument("--out", help="output directory (cases.jsonl, summary.json)")
    ap.add_argument("--limit", type=int, help="only the first N records of the file (before filtering, as `size`)")
    ap.add_argument("--batch-size", type=int, default=8, help="independent edits per compiled step")
    ap.add_argument("--token-accuracy", action="store_true",
                    help="token accuracy instead of exact match (EasyEdit's BLIP-2 configs use exact match)")
    ap.add_argument("--sequential", action="store_true", help="apply the edits one on top of another")
    ap.add_argument("--no-feature-cache", action="store_true",
                    help="recompute image features in every forward instead of once per distinct image")
    ap.add_argument("--pad-multiple", type=int, default=1,
                    help="pad each input to the split's longest, rounded up to a multiple of this (8 or 16 may suit "
                         "GPU/TPU kernels better; 1 computes no pad rows beyond the longest)")
    ap.add_argument("--no-resume", action="store_true", help="start over instead of skipping written cases")
    ap.add_argument("--strict", action="store_true", help="stop at the first bad record")
    ap.add_argument("--demo", action="store_true", help="synthetic data and a tiny random BLIP-2")
    ap.add_argument("--demo-records", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--mesh", help="run on a device mesh: 'auto' (edits over every device) or DATAxMODEL, e.g. 4x2 "
                    "(edits over 4, weights split over 2 by the partition rules); --batch-size must divide by DATA")
    args = ap.parse_args(argv)

    hparams = {}
    if args.config:
        from mmedit_jax.editors.hparams import load_hparams

        hparams = load_hparams(args.config)
    exact_match = not args.token_accuracy and hparams.get("exact_match", True)

    if args.demo:
        out = args.out or "runs/demo"
        paths, tok, model = demo_setup(out, args.demo_records, args.seed)
        data, image_root, rephrase_root, task = paths.json_path, paths.image_root, paths.rephrase_image_root, "vqa"
    else:
        if not (args.model and args.data and args.image_root):
            ap.error("--model, --data and --image-root are required (or --demo)")
        from transformers import AutoTokenizer

        from mmedit_jax.loading import from_pretrained

        out = args.out
        model = from_pretrained(args.model, image_size=args.image_size)
        tok = AutoTokenizer.from_pretrained(args.model)
        data, image_root = args.data, args.image_root
        rephrase_root = args.rephrase_image_root
        task = args.task or ("caption" if "caption" in os.path.basename(data) else "vqa")

    loaded = load_mmedit(data, task, image_root, rephrase_root, size=args.limit, strict=args.strict)
    print(f"{data}: {loaded.summary()}")
    for p in loaded.problems[:10]:
        print(f"  record {p.index}, {p.field}: {p.message}")
    if not loaded.records:
        raise SystemExit("no usable records")
    editor = build_editor(args.editor, model, hparams, args.editor_ckpt, feature_cache=not args.no_feature_cache)
    prepared = prepare_data(loaded.records, tok, model, task, model.config.vision.image_size, args.pad_multiple)
    result = run_editor(editor, model, prepared, tok, out, batch_size=args.batch_size, exact_match=exact_match,
                        resume=not args.no_resume, sequential=args.sequential, progress=not args.no_progress,
                        mesh=mesh_from_flag(args.mesh))
    print_table(result.summary)
    if args.sequential:
        print(f"retention (final Rel. / Rel. at edit time): {result.summary['retention']:.3f}")
    if out:
        print(f"wrote {os.path.join(out, 'summary.json')}")
    return result


if __name__ == "__main__":
    main()
