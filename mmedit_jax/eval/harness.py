"""The evaluation harness: edit every case in batches of independent edits, score them, record each row as it goes.

`iter_batches` runs the two compiled programs of `steps.py` batch by batch and yields the per-case rows;
`run` adds what a run needs around it: placement on a mesh, resume (rows already in `cases.jsonl` are skipped),
progress, timing and the summary (`records.py`). Rows are appended to `cases.jsonl` after every batch (fsynced),
so an interrupted run loses at most one batch. `run_sequential` applies the edits one on top of another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax import patch as P
from mmedit_jax import sharding
from mmedit_jax.case import INPUT_NAMES, METRICS, Case, num_cases, pad_batch, take
from mmedit_jax.editors.base import Editor
from mmedit_jax.eval import records
from mmedit_jax.eval.scoring import post_scores
from mmedit_jax.eval.steps import make_step_fns, prefix_layer


@dataclasses.dataclass
class RunResult:
    summary: dict
    rows: list[dict]


def batch_indices(todo: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive chunks of `todo` (row numbers), `batch_size` each (the last one shorter)."""
    for start in range(0, len(todo), batch_size):
        yield np.asarray(todo[start : start + batch_size])


def iter_batches(editor: Editor, params, cases: Case, meta: Sequence[dict], todo: Sequence[int], step_fns, *,
                 batch_size: int, place=lambda b: b, decode: Callable | None = None
                 ) -> Iterator[tuple[list[dict], float]]:
    """Edits and scores rows `todo` of `cases`, `batch_size` at a time (the last batch padded: one compile),
    yielding `(rows, seconds)` per batch; `seconds` covers both programs up to the results on the host."""
    pre_fn, edit_fn = step_fns
    for idx in batch_indices(todo, batch_size):
        batch = place(pad_batch(take(cases, idx), batch_size))
        t0 = time.perf_counter()
        pre = pre_fn(params, batch)
        post = edit_fn(editor.editor_params, params, batch, pre)
        pre = {key: v for key, v in pre.items() if not key.startswith("hidden_")}  # device-side only
        pre, post = jax.device_get(jax.block_until_ready((pre, post)))
        dt = time.perf_counter() - t0
        yield [case_row(meta[i], take(pre, j), take(post, j), labels_of(cases, i), decode, dt / len(idx))
               for j, i in enumerate(idx)], dt


def run(
    editor: Editor,
    params,
    cases: Case,
    meta: Sequence[dict],
    out_dir: str | None,
    *,
    batch_size: int = 8,
    exact_match: bool = True,
    resume: bool = True,
    decode: Callable[[np.ndarray], str] | None = None,
    progress: bool = True,
    mesh=None,
    step_fns=None,
    prefix_cache: bool = True,
    fingerprint: Mapping | None = None,
) -> RunResult:
    """Edits and scores every case; `cases` is a host `Case` with a leading `[N]` axis (images as `editor.fns`
    takes them), `meta[i]` holds at least `index` (the record's index in its file) for row i.

    With a `mesh` (`sharding.make_mesh`), each batch of edits is split over its "data" axis and the base
    parameters are laid out by the partition rules over "model"; the same jitted programs run, XLA inserting the
    communication. `prefix_cache` lets the post-edit passes start from the pre-edit hidden states below the
    first edited layer, where the edits allow it. `step_fns` (`steps.make_step_fns`) reuses compiled programs.

    With `out_dir`, the run's fingerprint goes to `run.json` (`records.claim_run`): the editor (name, hparams,
    weights), the scoring mode and the cases' token arrays, plus what the caller adds in `fingerprint` (model,
    data file, options); a resume into a directory another run wrote is refused, naming what differs.
    """
    n = len(meta)
    indices = [int(m["index"]) for m in meta]
    if len(set(indices)) != n:  # rows on disk are keyed by index: a duplicate would be skipped as done on resume
        dup = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(f"meta holds duplicated case indices {dup[:10]}: each case needs its own index")
    place = sharding.place_batch(mesh, batch_size)
    if mesh is not None:
        params = sharding.shard_params(params, mesh)
    jsonl = os.path.join(out_dir, "cases.jsonl") if out_dir else None
    if jsonl:
        claimed = records.claim_run(out_dir, {**run_fingerprint(editor, exact_match),
                                              **(fingerprint or {})}, resume)
        if not claimed and os.path.exists(jsonl):
            os.remove(jsonl)
    done = {int(r["index"]): r for r in records.read_rows(jsonl)} if jsonl else {}
    digests = dict(zip(indices, case_digests(cases)))
    for i in range(n):
        row = done.get(indices[i])
        if row is not None and row.get("case_digest") != digests[indices[i]]:
            raise records.RunMismatch(f"{jsonl}: the row of record {indices[i]} was written for other inputs (the "
                                      "data, prompts or tokenizer changed); use another --out, or --no-resume")
    todo = [i for i in range(n) if indices[i] not in done]
    if step_fns is None:
        k = prefix_layer(editor, params, take(cases, 0)) if prefix_cache and n else None
        step_fns = make_step_fns(editor, exact_match, prefix_layer=k)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=n - len(todo), unit="case", desc=f"{editor.name}", dynamic_ncols=True)
    rows = [done[int(m["index"])] for m in meta if int(m["index"]) in done]
    timing = {"batches": 0, "first_batch_s": None, "steady_s": 0.0, "steady_cases": 0}
    out = records.JsonlWriter(jsonl) if jsonl else None
    try:
        for batch_rows, dt in iter_batches(editor, params, cases, meta, todo, step_fns, batch_size=batch_size,
                                           place=place, decode=decode):
            if timing["first_batch_s"] is None:
                timing["first_batch_s"] = dt  # includes compilation
            else:
                timing["steady_s"] += dt
                timing["steady_cases"] += len(batch_rows)
            timing["batches"] += 1
            for row in batch_rows:
                row["case_digest"] = digests[int(row["index"])]
            rows.extend(batch_rows)
            if out:
                for row in batch_rows:
                    out.write(row)
                out.flush()
            if bar:
                bar.update(len(batch_rows))
                if timing["steady_cases"]:
                    bar.set_postfix(edits_per_s=f"{timing['steady_cases'] / timing['steady_s']:.1f}")
    finally:
        if out:
            out.close()
        if bar:
            bar.close()

    summary = records.summarize(rows)
    summary.update(editor=editor.name, exact_match=exact_match, batch_size=batch_size, resumed_cases=len(done),
                   **timing)
    if timing["steady_cases"]:
        summary["edits_per_s"] = timing["steady_cases"] / timing["steady_s"]
    if out_dir:
        records.write_json(out_dir, "summary.json", summary)
    return RunResult(summary, rows)


def run_fingerprint(editor: Editor, exact_match: bool) -> dict:
    """What the harness itself knows changes every row: the editor and its weights and the scoring mode. Each
    row also carries its case's digest (`case_digests`): which records a run holds may grow between resumes."""
    return {"editor": editor.name, "editor_hparams": repr(editor.hparams),
            "editor_params": records.digest_tree(editor.editor_params), "exact_match": bool(exact_match),
            "pixels": editor.uses_pixels}


def case_digests(cases: Case) -> list[str]:
    """Per host case, a digest of what its rows depend on in the inputs: each input's real tokens and labels, the
    KE condition and IKE's context, padding left out (a run extended by more records pads to another length, and
    its cases are still the same). A resumed row is kept only where its digest matches the case's now."""
    arrays = [np.asarray(x) for x in (cases.cond_ids, cases.cond_mask)]
    seqs = [[np.asarray(x) for x in (q.input_ids, q.attention_mask, q.labels)] for q in map(cases.seq, INPUT_NAMES)]
    out = []
    for i in range(num_cases(cases)):
        h = hashlib.sha256()
        for ids, mask, labels in seqs:
            keep = mask[i] > 0
            h.update(ids[i][keep].astype(np.int64).tobytes() + b"|" + labels[i][keep].astype(np.int64).tobytes() + b"|")
        h.update(arrays[0][i][arrays[1][i] > 0].astype(np.int64).tobytes())
        if cases.context_ids is not None:  # IKE's demonstration context
            h.update(b"|" + np.asarray(cases.context_ids[i])[np.asarray(cases.context_mask[i]) > 0]
                     .astype(np.int64).tobytes())
        out.append(h.hexdigest())
    return out


def labels_of(cases: Case, i: int) -> dict[str, np.ndarray]:
    """`{input: labels [L]}` of host case `i` (what the rows' answer texts are read at)."""
    return {name: np.asarray(cases.seq(name).labels[i]) for name in INPUT_NAMES}


def _prediction(outputs: dict, name: str):
    """The predicted tokens `[L]` (shifted) on input `name` in `scoring`'s outputs, or None: an accuracy input's
    `pred_<name>`, a locality input's top-1 (the first column of its top-k)."""
    top = {"loc": "loc_top1", "loc_image": "loc_image_top10"}.get(name)
    if top is not None:
        return None if top not in outputs else np.asarray(outputs[top])[:, 0]
    return outputs.get(f"pred_{name}")


def _answer_text(pred, labels: np.ndarray, decode) -> tuple[str, str]:
    """The teacher-forced prediction at the answer positions (shifted) and the target, as text."""
    pos = np.nonzero(labels[1:] != -100)[0]
    return decode(np.asarray(pred)[pos]), decode(labels[1:][pos])


def case_row(meta: dict, pre: dict, post: dict, labels: dict | None, decode, seconds: float) -> dict:
    """One case's JSON row: its metadata, the five metrics, pre-edit accuracies, and (with `decode` and `labels`,
    `labels_of`'s) each input's target and the unedited and edited model's teacher-forced answers as text
    (`answers`; the edit input's also as `target`, `pre_prediction`, `post_prediction`)."""
    row = dict(meta)
    for m in METRICS:
        row[m] = float(post[m])
    row["pre"] = {m: float(pre[m]) for m in records.PRE_METRICS}
    if "finite" in post:
        row["finite"] = bool(post["finite"])
    if decode is not None and labels is not None:
        answers = {}
        for name in INPUT_NAMES:
            pre_pred, post_pred = _prediction(pre, name), _prediction(post, name)
            if post_pred is not None:
                post_text, target = _answer_text(post_pred, labels[name], decode)
                pre_text = None if pre_pred is None else _answer_text(pre_pred, labels[name], decode)[0]
                answers[name] = {"target": target, "pre": pre_text, "post": post_text}
        row["answers"] = answers
        edit = answers.get("edit", {})
        row.update(target=edit.get("target"), pre_prediction=edit.get("pre"), post_prediction=edit.get("post"))
    row["seconds"] = seconds
    return row


def run_sequential(
    editor: Editor,
    params,
    cases: Case,
    meta: Sequence[dict],
    out_dir: str | None,
    *,
    exact_match: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> RunResult:
    """Sequential editing: edit i is computed on the model that already carries edits 0..i-1.

    Each case is scored right after its own edit (`*_at_edit`), and again with the final patch that holds
    all N edits. Retention = final Reliability / Reliability at edit time, i.e. how much of the earlier edits
    survives the later ones. Locality always compares against the unedited model.
    """
    if not editor.composes:
        raise ValueError(f"{editor.name}'s edits do not stack (its patch is not a weight change): no sequential "
                         "editing")
    model, n = editor.fns, len(meta)
    device_cases = jax.tree.map(jnp.asarray, cases)
    pre_fn, _ = make_step_fns(editor, exact_match)
    pre = jax.device_get(pre_fn(params, device_cases))

    @jax.jit
    def step(editor_params, params, total, case, pre_c, i):
        new = editor.edit(editor_params, params, case, total)
        total = P.accumulate(total, new, i)
        return total, post_scores(model, params, total, case, pre_c, exact_match)

    @jax.jit
    def score_all(params, total, cases, pre):
        return jax.vmap(lambda c, p: post_scores(model, params, total, c, p, exact_match))(cases, pre)

    example = jax.eval_shape(lambda c: editor.edit(editor.editor_params, params, c, {}), take(device_cases, 0))
    total = P.empty_accumulator(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example), n)

    at_edit = []
    t0 = time.perf_counter()
    iterator = range(n)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, unit="edit", desc=f"{editor.name} sequential", dynamic_ncols=True)
    for i in iterator:
        total, s = step(editor.editor_params, params, total, take(device_cases, i), take(pre, i), i)
        at_edit.append(jax.device_get(s))
    seconds = time.perf_counter() - t0

    final = [jax.device_get(score_all(params, total, pad_batch(take(device_cases, idx), batch_size),
                                      pad_batch(take(pre, idx), batch_size)))
             for idx in batch_indices(range(n), batch_size)]
    final = {k: np.concatenate([f[k] for f in final])[:n] for k in final[0]}

    rows = []
    for i in range(n):
        row = dict(meta[i])
        for m in METRICS:
            row[f"{m}_at_edit"] = float(at_edit[i][m])
            row[m] = float(final[m][i])
        row["pre"] = {m: float(pre[m][i]) for m in records.PRE_METRICS}
        rows.append(row)
    summary = records.summarize(rows)
    for m in METRICS:
        summary[f"{m}_at_edit"] = 100.0 * float(np.mean([r[f"{m}_at_edit"] for r in rows]))
    at = summary["reliability_at_edit"]
    summary.update(editor=editor.name, mode="sequential", seconds=seconds,
                   retention=summary["reliability"] / at if at > 0 else float("nan"))
    if out_dir:
        path = os.path.join(out_dir, "sequential_cases.jsonl")
        if os.path.exists(path):
            os.remove(path)
        out = records.JsonlWriter(path)
        for row in rows:
            out.write(row)
        out.flush()
        out.close()
        records.write_json(out_dir, "sequential_summary.json", summary)
    return RunResult(summary, rows)
