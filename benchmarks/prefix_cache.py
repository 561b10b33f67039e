"""The frozen-prefix cache, timed side by side with the plain path in one process (the built-in world).

    python benchmarks/prefix_cache.py --editor mend --batch 64 --repeats 10 [--json FILE]

Both paths run the bench's timed programs (`steps.make_step_fns(..., base_accuracy=False)`: the unedited
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

from mmedit_jax.eval.throughput import matmul_flops, xla_cost


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default="mend", choices=("ft-l", "mend", "ke"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10, help="alternating rounds of one steady call per path")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from mmedit_jax import pipeline
    from mmedit_jax.case import pad_batch, take
    from mmedit_jax.data.mmedit import load_mmedit
    from mmedit_jax.eval import steps

    model_dir, tokenizer_dir, eval_json, image_root, ckpts = pipeline.world_inputs("vqa")
    model, tok = pipeline.load_model(model_dir, tokenizer_dir)
    records = load_mmedit(eval_json, "vqa", image_root, image_root).records
    editor = pipeline.build_editor(args.editor, model, {}, ckpts.get(args.editor))
    prepared = pipeline.prepare_data(records, tok, model, "vqa", pad_multiple=1)
    cases = pipeline.cases_for(editor.fns, model.params, prepared)
    k = steps.prefix_layer(editor, model.params, take(cases, 0))
    print(f"{args.editor}: first edited language-model layer {k} of {model.config.text.num_hidden_layers}")

    n = len(prepared.meta)
    batch = pad_batch(take(cases, np.arange(min(args.batch, n))), args.batch)
    batch = jax.device_put(batch)
    paths = {"plain": steps.make_step_fns(editor, True, base_accuracy=False),
             "prefix cache": steps.make_step_fns(editor, True, base_accuracy=False, prefix_layer=k)}

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
        flops_edit = xla_cost(edit_fn.lower(editor.editor_params, model.params, batch, pre).compile())[0]
        flops_pre = xla_cost(pre_fn.lower(model.params, batch).compile())[0]
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
