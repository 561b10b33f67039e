"""Does `model.answer(..., patch=editor.edit(...))` return the target? The three-line API on the world's eval split.

    PYTHONPATH=. python benchmarks/api_world.py [--editor mend] [--limit 128] [--json benchmarks/api_world.json]

For every eval record (`image`, `src`, `alt`): the unedited answer, one edit (`editor.edit`), the edited answer
(greedy generation with the KV cache), and exact match of the stripped answer against `alt`. Beside it, the same
patch scored as the benchmark scores Reliability (teacher-forced: the argmax at every target position equals the
target token, `eval/metrics.py`), so a gap between the two is measured, not guessed: generation must also end the
word where the target ends, and its later tokens follow its own earlier ones rather than the target's.

Also measured: how many programs a loop of `--loop` different edits compiles (the editor's and generation's), and
the loop's edits/s (edit alone, and edit + answer), and `edit_batch` over the whole split in one call.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import mmedit_jax as mj
from mmedit_jax.world import assets

_ROUTED: dict = {}  # SERAC's routed forward, jitted once per editor
BENCH_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_world_mend.json")


def teacher_forced_hit(model, patch, image, prompt: str, target: str, length: int = 32) -> bool:
    """The benchmark's Reliability for one edit: the argmax at each target position is the target token (IKE:
    after its context; SERAC: SERAC's routed output, the classifier reading the query as the editor was trained
    to, with the target tokens marked as the answer)."""
    tok = model.tokenizer
    context = patch.ids if isinstance(patch, mj.ContextPatch) else ()
    prompt_ids = model.prompt_ids(prompt, True, context=context)
    target_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + target_ids
    length = max(length, len(ids))
    row = np.full((1, length), tok.pad_token_id, np.int32)
    row[0, : len(ids)] = ids
    mask = (np.arange(length) < len(ids)).astype(np.int32)[None]
    pixels = model.pixels(image)[None]
    if isinstance(patch, mj.MemoryPatch):
        import jax
        import jax.numpy as jnp

        from mmedit_jax.case import Seq
        from mmedit_jax.editors.serac import with_memory

        fns, net = patch.router
        labels = np.full(length, -100, np.int32)
        labels[len(prompt_ids) : len(ids)] = target_ids
        if fns not in _ROUTED:  # one compiled program (eager calls would compile the layer scans every time)
            _ROUTED[fns] = jax.jit(lambda params, net, memory, seq, px: fns.logits(
                params, with_memory(net, memory), seq, px if fns.uses_pixels else fns.encode(params, {}, px[None])[0]))
        logits = np.asarray(_ROUTED[fns](model.params, net, patch.memory, Seq(jnp.asarray(row[0]),
                                         jnp.asarray(mask[0]), jnp.asarray(labels)), jnp.asarray(pixels[0])))
    else:
        weights = None if isinstance(patch, mj.ContextPatch) else patch
        logits = np.asarray(model(pixels, row, mask, patch=weights))[0]
    pred = logits[len(prompt_ids) - 1 : len(ids) - 1].argmax(-1)
    return bool((pred == np.asarray(target_ids)).all())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default="mend")
    ap.add_argument("--editor-ckpt", help="a trained MEND / KE / SERAC directory (default: the shipped one)")
    ap.add_argument("--limit", type=int, default=None, help="first N eval records (default all 128)")
    ap.add_argument("--loop", type=int, default=100, help="edits in the compile/throughput loop")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "api_world.json"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    world = assets.ensure()
    with open(world.eval_json) as f:
        records = json.load(f)[: args.limit]
    model = mj.from_pretrained("world")
    editor = mj.load_editor(args.editor, model, args.editor_ckpt)
    image = lambda r: os.path.join(world.image_root, r["image"])  # noqa: E731

    # Warm up (compiles) on one record, then the timed loop over `--loop` different edits.
    r0 = records[0]
    model.answer(image(r0), r0["src"], patch=editor.edit(image(r0), r0["src"], r0["alt"]))
    loop = records[: args.loop]
    t = time.perf_counter()
    for r in loop:
        p = editor.edit(image(r), r["src"], r["alt"])
    jax_block(p)
    edit_s = time.perf_counter() - t
    t = time.perf_counter()
    for r in loop:
        model.answer(image(r), r["src"], patch=editor.edit(image(r), r["src"], r["alt"]))
    edit_answer_s = time.perf_counter() - t
    compiles = {"edit": editor.compiles, "generate (one patch)": model._generate._cache_size()}

    rows = []
    for r in records:
        before = model.answer(image(r), r["src"])
        patch = editor.edit(image(r), r["src"], r["alt"])
        after = model.answer(image(r), r["src"], patch=patch)
        raw = model.answer(image(r), r["src"], patch=patch, max_words=0)
        rows.append(dict(src=r["src"], image=r["image"], alt=r["alt"], pred_file=r["pred"], before=before,
                         after=after, generated=raw, hit=after == r["alt"],
                         teacher_forced=teacher_forced_hit(model, patch, image(r), r["src"], r["alt"])))
    n = len(rows)
    hits = sum(x["hit"] for x in rows)
    tf = sum(x["teacher_forced"] for x in rows)
    before_hits = sum(x["before"] == x["alt"] for x in rows)

    # The whole split as one batch of independent edits, answered each under its own edit (vmapped): the first
    # call compiles, the second is timed.
    images, prompts, targets = [image(r) for r in records], [r["src"] for r in records], [r["alt"] for r in records]
    batch_s = []
    for _ in range(2):
        t = time.perf_counter()
        batch = editor.edit_batch(images, prompts, targets)
        jax_block(getattr(batch, "stacked", [getattr(p, "memory", None) for p in batch]))  # IKE's are host ids
        t_edit = time.perf_counter() - t
        batch_answers = model.answer(images, prompts, patch=batch)
        batch_s.append((t_edit, time.perf_counter() - t - t_edit))
    batch_hits = sum(a == r["alt"] for a, r in zip(batch_answers, records))

    # Composition: consecutive records paired, both edits applied at once (`mj.compose`), both questions asked.
    pairs = []
    for a, b in zip(rows[0::2], rows[1::2]) if not isinstance(batch, mj.ContextBatch) else ():  # IKE: no compose
        i = rows.index(a)
        composed = mj.compose(batch[i], batch[i + 1])
        got = model.answer([image(records[i]), image(records[i + 1])], [a["src"], b["src"]], patch=composed)
        pairs.append(dict(alone=[a["hit"], b["hit"]], composed=[got[0] == a["alt"], got[1] == b["alt"]],
                          same_question_kind=a["src"] == b["src"]))
    both_alone = [p for p in pairs if all(p["alone"])]

    reference = None
    bench_json = BENCH_JSON.replace("mend", args.editor)
    if os.path.exists(bench_json):
        with open(bench_json) as f:
            reference = json.load(f)["quality"]["reliability"]
    result = dict(
        editor=args.editor, num_edits=n,
        generated_exact_match=100.0 * hits / n, teacher_forced_exact_match=100.0 * tf / n,
        # without the world's one-word cut: the world model never emits an end-of-sequence token
        uncut_generated_exact_match=100.0 * sum(x["generated"] == x["alt"] for x in rows) / n,
        single_token_targets=sum(len(model.tokenizer(" " + x["alt"], add_special_tokens=False)["input_ids"]) == 1
                                 for x in rows),
        benchmark_reliability=reference, unedited_answer_equals_target=100.0 * before_hits / n,
        both=sum(x["hit"] and x["teacher_forced"] for x in rows),
        generated_only=sum(x["hit"] and not x["teacher_forced"] for x in rows),
        teacher_forced_only=sum(x["teacher_forced"] and not x["hit"] for x in rows),
        loop_edits=len(loop), loop_compiles=compiles, loop_edits_per_s=len(loop) / edit_s,
        loop_edit_and_answer_per_s=len(loop) / edit_answer_s,
        batch_exact_match=100.0 * batch_hits / n, batch_edit_s=[e for e, _ in batch_s],
        batch_answer_s=[a for _, a in batch_s], batch_edits_per_s=n / batch_s[-1][0],
        compose_pairs=len(pairs), compose_pairs_both_alone=len(both_alone),
        editor_log=editor.log[-3:],
        compose_both_targets=sum(all(p["composed"]) for p in both_alone),
        compose_one_target=sum(sum(p["composed"]) == 1 for p in both_alone),
        compiles_after_everything={"edit": editor.compiles, "generate (one patch)": model._generate._cache_size()},
        misses=[x for x in rows if not x["hit"]], wall_s=time.perf_counter() - t0,
    )
    print(f"{args.editor} on the world's eval split, {n} edits through the three-line API")
    print(f"  generated answer == target: {result['generated_exact_match']:.1f}%  (teacher-forced, same patches: "
          f"{result['teacher_forced_exact_match']:.1f}%; bench Reliability: {reference})")
    print(f"  unedited answer == target: {result['unedited_answer_equals_target']:.1f}%")
    print(f"  teacher-forced only: {result['teacher_forced_only']}, generated only: {result['generated_only']}")
    for x in result["misses"][:10]:
        print(f"    miss: {x['src']!r} target {x['alt']!r}: generated {x['generated']!r}, teacher-forced "
              f"{'hit' if x['teacher_forced'] else 'miss'}")
    print(f"  loop of {len(loop)} different edits: {compiles} compiled programs; {result['loop_edits_per_s']:.1f} "
          f"edits/s (edit only), {result['loop_edit_and_answer_per_s']:.1f}/s (edit + answer)")
    print(f"  edit_batch of {n} + answer per edit: {result['batch_exact_match']:.1f}%; "
          f"edit_batch {batch_s[-1][0]:.2f} s "
          f"({result['batch_edits_per_s']:.0f} edits/s; first call, compiling: {batch_s[0][0]:.1f} s), answers "
          f"{batch_s[-1][1]:.2f} s")
    print(f"  compose: of {len(both_alone)} pairs whose edits each work alone, both targets come out of the "
          f"composed patch in {result['compose_both_targets']}, one in {result['compose_one_target']}")
    print(f"  total {result['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


def jax_block(tree):
    import jax

    jax.block_until_ready(tree)


if __name__ == "__main__":
    main()
