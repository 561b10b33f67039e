"""Run an editor over an MMEdit file and score every edit.

    python -m mmedit_jax.evaluate --world --editor mend       # the built-in world (shipped model and editors)
    python -m mmedit_jax.evaluate --editor ft-l --model DIR --data vqa_eval.json --image-root DIR --out runs/x
    python -m mmedit_jax.evaluate --demo --out runs/demo      # synthetic MMEdit files + a tiny random BLIP-2

Writes `run.json` (what the results depend on), `cases.jsonl` (one line per case, as it goes; rerunning the same
command resumes, and a different run refuses to resume into it) and `summary.json` (with the records skipped or
rejected and why), and prints the paper's table (means x100). `--sequential` applies the edits one on top of
another instead. Without `--out`, results go to `runs/<editor>_<data file>`.
"""

from __future__ import annotations

import argparse
import os

from mmedit_jax import flags, pipeline
from mmedit_jax.demo import demo_setup
from mmedit_jax.eval import harness, records
from mmedit_jax.sharding import mesh_from_flag


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", choices=pipeline.EDITORS,
                    help="required, except with --world (default mend) and --demo (default ft-l)")
    flags.add_data(ap, default_model="none: give one, or --world, or --demo")
    flags.add_scoring(ap)
    ap.add_argument("--out", help="output directory (cases.jsonl, summary.json)")
    ap.add_argument("--batch-size", type=int, default=8, help="independent edits per compiled step")
    ap.add_argument("--sequential", action="store_true", help="apply the edits one on top of another")
    ap.add_argument("--no-feature-cache", action="store_true",
                    help="recompute image features in every forward instead of once per distinct image")
    ap.add_argument("--no-resume", action="store_true", help="start over instead of skipping written cases")
    ap.add_argument("--strict", action="store_true", help="stop at the first bad record")
    ap.add_argument("--world", action="store_true", help="the built-in world: shipped model, editors and eval split")
    flags.add_world(ap)
    ap.add_argument("--demo", action="store_true", help="synthetic data and a tiny random BLIP-2")
    ap.add_argument("--demo-records", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    flags.add_mesh(ap)
    args = ap.parse_args(argv)

    hparams = pipeline.read_hparams(args.config)
    exact_match = pipeline.exact_match_of(hparams, args.token_accuracy)
    mesh = mesh_from_flag(args.mesh)
    if args.sequential and mesh is not None:
        ap.error("--sequential runs one edit at a time on one device: drop --mesh")
    if sum(map(bool, (args.world, args.demo, args.model))) != 1:
        ap.error("choose one of --world, --demo or --model DIR (with --data and --image-root)")
    if args.family != "blip2" and not args.world:
        ap.error("--family picks the built-in world's model: use it with --world")
    editor_name = args.editor or ("mend" if args.world else "ft-l" if args.demo else None)
    if editor_name is None:
        ap.error("--editor is required with --model (one of " + ", ".join(pipeline.EDITORS) + ")")
    editor_ckpt, model_dir = args.editor_ckpt, args.model
    if args.demo:
        out = args.out or "runs/demo"
        paths, tok, model = demo_setup(out, args.demo_records, args.seed)
        data, image_root, rephrase_root, task = paths.json_path, paths.image_root, paths.rephrase_image_root, "vqa"
    else:
        if args.world:
            model_dir, tok_dir, data, image_root, shipped = pipeline.world_inputs(args.task or "vqa", args.cache_dir,
                                                                               args.family)
            rephrase_root, editor_ckpt = image_root, editor_ckpt or shipped.get(editor_name)
        elif not (args.data and args.image_root):
            ap.error("--model needs --data and --image-root")
        else:
            tok_dir, data, image_root, rephrase_root = model_dir, args.data, args.image_root, args.rephrase_image_root
        model, tok = pipeline.load_model(model_dir, tok_dir, image_size=args.image_size)
        task = pipeline.task_of(data, args.task)
        out = args.out or os.path.join("runs", f"{editor_name}_{os.path.splitext(os.path.basename(data))[0]}")
    print(f"editor: {editor_name}; results in {out}")

    loaded = pipeline.load_split(data, task, image_root, rephrase_root, limit=args.limit, strict=args.strict)
    bank = args.ike_bank or (pipeline.world_train_data(task, args.cache_dir) if args.world else None)
    editor = pipeline.build_editor(editor_name, model, hparams, editor_ckpt, feature_cache=not args.no_feature_cache,
                                   tok=tok, task=task, bank_data=bank, image_root=image_root,
                                   sentence_encoder=args.sentence_encoder)
    prepared = pipeline.prepare_data(loaded.records, tok, model, task, args.pad_multiple)
    for d in prepared.dropped[:10]:
        print(f"  record {d['index']} dropped: {d['reason']}")
    cases = pipeline.editor_cases(editor, model.params, prepared)
    kw = dict(exact_match=exact_match, batch_size=args.batch_size, progress=not args.no_progress)
    if args.sequential:
        result = harness.run_sequential(editor, model.params, cases, prepared.meta, out, **kw)
    else:
        fingerprint = {"model": f"demo seed {args.seed}" if args.demo else records.digest_path(model_dir),
                       "editor_ckpt": records.digest_path(editor_ckpt), "data": records.digest_path(data),
                       "image_root": os.path.abspath(image_root), "task": task,
                       "image_size": args.image_size, "pad_multiple": args.pad_multiple, "config": hparams}
        try:
            result = harness.run(editor, model.params, cases, prepared.meta, out, resume=not args.no_resume,
                                 decode=pipeline.decoder(tok), mesh=mesh, fingerprint=fingerprint, **kw)
        except records.RunMismatch as e:
            raise SystemExit(f"error: {e}") from None
        if result.summary["resumed_cases"]:
            print(f"resumed: {result.summary['resumed_cases']} of {len(prepared.meta)} cases were already in "
                  f"{os.path.join(out, 'cases.jsonl')}")
    result.summary.update(data=pipeline.load_report(loaded, prepared), data_path=os.path.abspath(data),
                          model_path=f"demo seed {args.seed}" if args.demo else os.path.abspath(model_dir))
    records.write_json(out, "sequential_summary.json" if args.sequential else "summary.json", result.summary)
    records.print_table(result.summary)
    if args.sequential:
        print(f"retention (final Rel. / Rel. at edit time): {result.summary['retention']:.3f}")
    print(f"wrote {os.path.join(out, 'sequential_summary.json' if args.sequential else 'summary.json')}")
    return result


if __name__ == "__main__":
    main()
