"""The frozen-prefix cache, timed side by side with the plain path in one process (the built-in world).

    PYTHONPATH=. python benchmarks/prefix_cache.py --editor mend --batch 64 --repeats 10 [--json FILE]

Both paths run the bench's timed programs (`harness.make_step_fns(..., base_accuracy=False)`: the unedited
model's locality predictions, then edit + five metrics), compiled separately, then timed in alternating rounds
(steady calls, `jax.block_until_ready`) so a noisy machine affects both alike. Also checks that both give the
same outputs on the timed batch, and reports FLOPs per edit of each: XLA's cost analysis (which counts a
`lax.scan` body once, not once per layer, so it undercounts scanned layer stacks) and the matmul FLOPs of the
jaxpr with scan bodies counted `length` times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mmedit_jax.eval.throughput import matmul_flops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default="mend", choices=("ft-l", "mend", "ke"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10, help="alternating rounds of one steady call per path")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from transformers import AutoTokenizer

    from mmedit_jax import evaluate as E
    from mmedit_jax.data.mmedit import load_mmedit
    from mmedit_jax.eval import harness, throughput
    from mmedit_jax.eval.model_fns import Blip2Fns
    from mmedit_jax.loading import from_pretrained
    from mmedit_jax.world import assets

    w = assets.ensure("vqa")
    model = from_pretrained(w.model_dir)
    tok = AutoTokenizer.from_pretrained(w.tokenizer_dir)
    records = load_mmedit(w.eval_json, "vqa", w.image_root, w.image_root).records
    editor = E.build_editor(args.editor, model, {}, w.editor_ckpts.get(args.editor))
    prepared = E.prepare_data(records, tok, model, "vqa", model.config.vision.image_size, pad_multiple=1)
    fns = Blip2Fns(model.module, pixels=editor.vision_side)
    cases = harness.make_cases(prepared.batch, E.image_table(editor, model, prepared.pixels))
    k = harness.prefix_layer(editor, fns, model.params, harness._take(cases, 0))
    print(f"{args.editor}: first edited language-model layer {k} of {model.config.text.num_hidden_layers}")

    n = len(prepared.meta)
    batch = harness._pad_batch(harness._take(cases, np.arange(min(args.batch, n))), args.batch)
    batch = jax.device_put(batch)
    paths = {"plain": harness.make_step_fns(editor, fns, True, base_accuracy=False),
             "prefix cache": harness.make_step_fns(editor, fns, True, base_accuracy=False, prefix_layer=k)}

    def call(name):
        pre_fn, edit_fn = paths[name]
        pre = pre_fn(model.params, batch)
        return pre, jax.block_until_ready(edit_fn(editor.editor_params, model.params, batch, pre))

    result, outs = {}, {}
    for name in paths:
        t0 = time.perf_counter()
        outs[name] = jax.device_get(call(name))
        result[name] = {"first_call_s": time.perf_counter() - t0, "times_s": []}
    for _ in range(args.repeats):
        for name in paths:
            t0 = time.perf_counter()
            call(name)
            result[name]["times_s"].append(time.perf_counter() - t0)
    for name, (pre_fn, edit_fn) in paths.items():
        pre = pre_fn(model.params, batch)
        flops_edit, _ = throughput._cost(edit_fn.lower(editor.editor_params, model.params, batch, pre).compile())
        flops_pre, _ = throughput._cost(pre_fn.lower(model.params, batch).compile())
        jaxpr_flops = (matmul_flops(jax.make_jaxpr(edit_fn)(editor.editor_params, model.params, batch, pre))
                       + matmul_flops(jax.make_jaxpr(pre_fn)(model.params, batch)))
        r = result[name]
        r.update(matmul_gflop_per_edit=jaxpr_flops / 1e9 / args.batch,median_ms=1e3 * statistics.median(r["times_s"]),
                 edits_per_s=args.batch / statistics.median(r["times_s"]),
                 gflop_per_edit=(flops_edit + flops_pre) / 1e9 / args.batch,
                 gflop_per_edit_post=flops_edit / 1e9 / args.batch)
    (pre0, post0), (pre1, post1) = outs["plain"], outs["prefix cache"]
    same = all(np.array_equal(pre0[key], pre1[key]) for key in pre0) and \
        all(np.array_equal(post0[key], post1[key]) for key in post0)
    print(f"E={args.batch}, {args.repeats} alternating rounds, device {jax.devices()[0].device_kind}; "
          f"outputs identical: {same}")
    for name, r in result.items():
        print(f"  {name:>12}: {r['edits_per_s']:7.1f} edits/s (median {r['median_ms']:.1f} ms/call), "
              f"XLA {r['gflop_per_edit']:.4f} GFLOP/edit ({r['gflop_per_edit_post']:.4f} in the edit program), "
              f"jaxpr matmuls {r['matmul_gflop_per_edit']:.4f} GFLOP/edit")
    ratio = lambda key: result["prefix cache"][key] / result["plain"][key]  # noqa: E731
    print(f"  cache / plain: edits/s {ratio('edits_per_s'):.3f}x, "
          f"jaxpr matmul FLOPs {ratio('matmul_gflop_per_edit'):.3f}x")
    out = dict(editor=args.editor, batch=args.batch, prefix_layer=k, outputs_identical=same,
               device=str(jax.devices()[0].device_kind), paths=result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
