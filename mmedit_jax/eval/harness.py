"""The evaluation harness: edit a batch of cases, score them, write one JSON line per case as it goes.

One jitted program per batch shape does everything for E independent edits at once:
`vmap(editor.edit)` -> patches `[E, ...]` -> `vmap(post_scores)`; the base parameters enter once, unbatched.
Pre-edit outputs are one more jitted program. When every patch leaves the language model's layers below some
k alone (MEND, KE, FT-L on late layers), the pre-edit program keeps the edit and locality inputs' hidden states
at layer k, and the editor's forwards, Reliability and the post-edit locality passes start there (the
frozen-prefix cache).
Results are appended to `cases.jsonl` after every batch (flushed and fsynced), so an interrupted run loses at
most one batch and `resume=True` skips the cases already written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax.data import cases as cases_lib
from mmedit_jax.editors.base import Case, Editor, ModelFns, Seq
from mmedit_jax.eval.scoring import METRICS, post_scores, pre_outputs
from mmedit_jax.models.opt import layer_of


@dataclasses.dataclass
class RunResult:
    summary: dict
    rows: list[dict]


def first_edited_layer(sites) -> int | None:
    """The lowest language-model layer among patch `sites` (`language_model/layers/<i>/...`), or None when a
    site lies outside the language model's layer stack (vision side, embeddings, head) or layer 0 is edited:
    then no unedited prefix of the stack can be shared."""
    layers = [layer_of(site) for site in sites]
    if None in layers:
        return None
    k = min(layers, default=0)
    return k if k > 0 else None


def prefix_layer(editor: Editor, model: ModelFns, params, case: Case) -> int | None:
    """The layer k from which the post-edit locality passes can reuse the pre-edit hidden states, or None.

    `case` is one case (no batch axis); only its shapes matter: the patch's sites come from `jax.eval_shape`
    of `editor.edit`. None where the model runs pixels (the vision side may be edited) or has no `prefix`.
    """
    if model.uses_pixels or not hasattr(model, "prefix"):
        return None
    patch = jax.eval_shape(lambda c: editor.edit(editor.editor_params, params, c, {}), case)
    return first_edited_layer(patch)


def make_step_fns(editor: Editor, model: ModelFns, exact_match: bool, base_accuracy: bool = True,
                  prefix_layer: int | None = None):
    """The two jitted programs of a run: pre-edit outputs, and edit + post-edit scores, both over `[E]`.

    `base_accuracy=False` leaves the unedited model's accuracies out of the pre-edit program (the five metrics
    do not need them; throughput timing uses it, as the reference's per-record step computes none).
    `prefix_layer` k (from `prefix_layer()`; every patch must leave the layers below k alone) turns on the
    frozen-prefix cache: the pre-edit program also returns the edit and locality inputs' hidden states entering
    layer k (`hidden_edit`, `hidden_loc`, `hidden_loc_image` `[E, L, D]`); the post-edit locality and Reliability
    passes, and the editor's own forwards where it `resumes`, run layers k.. only.
    """
    k = prefix_layer

    @jax.jit
    def pre_fn(params, cases: Case):
        return jax.vmap(lambda c: pre_outputs(model, params, c, exact_match, base_accuracy, k))(cases)

    resume = k is not None and editor.resumes

    @jax.jit
    def edit_fn(editor_params, params, cases: Case, pre):
        def one(case, pre_c):
            kw = {"prefix": (pre_c["hidden_edit"], k)} if resume else {}
            patch = editor.edit(editor_params, params, case, {}, **kw)
            return post_scores(model, params, patch, case, pre_c, exact_match, k)

        return jax.vmap(one)(cases, pre)

    return pre_fn, edit_fn


def make_cases(batch, image_table: np.ndarray, answer_rows: bool = True) -> Case:
    """Host `Case`s from a data `EditBatch` (`mmedit_jax.data.cases`) and the table its `image_ids` index.

    `image_table` is `[N_images, nq, E]` cached image embeddings, or `[N_images, 3, H, W]` pixels when the
    editor changes the vision side (or the feature cache is off). Images are gathered per case here, per batch,
    so host memory holds each distinct image once. `answer_rows`: the three inputs scored by accuracy (and the
    edit input, whose loss the editors take) carry their answer positions (`Seq.answer_rows`), so their
    forwards compute the last layer and the head at those rows only; the locality inputs need every position.
    """

    def seq(tb, rows=False):
        return Seq(tb.input_ids, tb.attention_mask, tb.labels,
                   cases_lib.answer_rows(tb.labels) if (rows and answer_rows) else None)

    images = {
        "edit": image_table[batch.edit_inner.image_ids],
        "image_rephrase": image_table[batch.edit_outer_image.image_ids],
        "loc_image": image_table[batch.loc_image.image_ids],
    }
    return Case(seq(batch.edit_inner, True), seq(batch.edit_outer, True), seq(batch.edit_outer_image, True),
                seq(batch.loc), seq(batch.loc_image), images, batch.cond_ids, batch.cond_mask)


def encode_image_table(encode: Callable, params, pixels: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Image features `[N, nq, E]` of every distinct image, computed once (the feature cache).

    `encode(params, pixels [B, 3, H, W]) -> [B, nq, E]` is jitted by the caller; the last batch is padded so
    it compiles once.
    """
    out = []
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        out.append(np.asarray(encode(params, chunk))[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _take(tree, idx):
    return jax.tree.map(lambda a: a[idx], tree)


def _pad_batch(tree, n: int):
    """Pads a host batch to `n` rows by repeating the last one (static shapes: one compile per batch size)."""
    have = jax.tree.leaves(tree)[0].shape[0]
    if have == n:
        return tree
    idx = np.concatenate([np.arange(have), np.full(n - have, have - 1)])
    return _take(tree, idx)


def read_done(path: str) -> dict[int, dict]:
    """Rows already written by an interrupted run, by case index.

    A torn last line (the run died mid-write) is cut off the file, so the rows appended next start on a line
    of their own.
    """
    done: dict[int, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    good = 0  # bytes up to the end of the last complete, parseable line
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        done[int(row["index"])] = row
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def summarize(rows: Sequence[dict]) -> dict:
    """Means over cases (x100, as the paper reports), for post-edit metrics and pre-edit base accuracy."""
    out = {"num_cases": len(rows)}
    for m in METRICS:
        vals = [r[m] for r in rows if m in r]
        out[m] = 100.0 * float(np.mean(vals)) if vals else float("nan")
    for m in ("reliability", "t_generality", "m_generality"):
        vals = [r["pre"][m] for r in rows if "pre" in r]
        out[f"pre_{m}"] = 100.0 * float(np.mean(vals)) if vals else float("nan")
    return out


def run(
    editor: Editor,
    model: ModelFns,
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
) -> RunResult:
    """Edits and scores every case; `cases` is a host `Case` with a leading `[N]` axis, `meta[i]` holds at least
    `index` (the record's index in its file) for row i.

    With a `mesh` (`sharding.make_mesh`), each batch of edits is split over its "data" axis and the base
    parameters are laid out by the partition rules over "model" (replicated where "model" has size 1); the
    same jitted programs run, XLA inserting the communication. `prefix_cache` lets the post-edit locality
    passes start from the pre-edit hidden states below the first edited layer, where the edits allow it.
    """
    n = len(meta)
    place = lambda b: b  # noqa: E731
    if mesh is not None:
        from mmedit_jax import sharding

        if batch_size % mesh.shape[sharding.DATA]:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the mesh's data axis "
                             f"({mesh.shape[sharding.DATA]})")
        params = sharding.shard_params(params, mesh)
        place = lambda b: jax.tree.map(  # noqa: E731
            lambda a: jax.device_put(a, sharding.batch_sharding(mesh, np.ndim(a))), b)
    jsonl = os.path.join(out_dir, "cases.jsonl") if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    done = read_done(jsonl) if (jsonl and resume) else {}
    if jsonl and not resume and os.path.exists(jsonl):
        os.remove(jsonl)
    todo = [i for i in range(n) if int(meta[i]["index"]) not in done]
    # `step_fns` (from `make_step_fns`) lets repeated runs reuse compiled programs.
    if step_fns is None:
        k = prefix_layer(editor, model, params, _take(cases, 0)) if prefix_cache and n else None
        step_fns = make_step_fns(editor, model, exact_match, prefix_layer=k)
    pre_fn, edit_fn = step_fns

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=n - len(todo), unit="case", desc=f"{editor.name}", dynamic_ncols=True)
    rows = [done[int(m["index"])] for m in meta if int(m["index"]) in done]
    timing = {"batches": 0, "first_batch_s": None, "steady_s": 0.0, "steady_cases": 0}
    out = open(jsonl, "a") if jsonl else None
    try:
        for start in range(0, len(todo), batch_size):
            idx = np.asarray(todo[start : start + batch_size])
            batch = place(_pad_batch(_take(cases, idx), batch_size))
            t0 = time.perf_counter()
            pre = pre_fn(params, batch)
            post = edit_fn(editor.editor_params, params, batch, pre)
            pre = {key: v for key, v in pre.items() if not key.startswith("hidden_")}  # device-side only
            pre, post = jax.device_get(jax.block_until_ready((pre, post)))
            dt = time.perf_counter() - t0
            if timing["first_batch_s"] is None:
                timing["first_batch_s"] = dt  # includes compilation
            else:
                timing["steady_s"] += dt
                timing["steady_cases"] += len(idx)
            timing["batches"] += 1
            for j, i in enumerate(idx):
                row = _row(meta[i], _take(pre, j), _take(post, j), _take(batch.edit, j), decode, dt / len(idx))
                rows.append(row)
                if out:
                    out.write(json.dumps(row) + "\n")
            if out:
                out.flush()
                os.fsync(out.fileno())
            if bar:
                bar.update(len(idx))
                if timing["steady_cases"]:
                    bar.set_postfix(edits_per_s=f"{timing['steady_cases'] / timing['steady_s']:.1f}")
    finally:
        if out:
            out.close()
        if bar:
            bar.close()

    summary = summarize(rows)
    summary.update(editor=editor.name, exact_match=exact_match, batch_size=batch_size, **timing)
    if timing["steady_cases"]:
        summary["edits_per_s"] = timing["steady_cases"] / timing["steady_s"]
    if out_dir:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return RunResult(summary, rows)


def _answer_text(pred: np.ndarray, seq, decode) -> tuple[str | None, str | None]:
    """The teacher-forced prediction at the answer positions (shifted) and the target, as text."""
    labels = np.asarray(seq.labels)
    pos = np.nonzero(labels[1:] != -100)[0]
    if decode is None:
        return None, None
    return decode(np.asarray(pred)[pos]), decode(labels[1:][pos])


def _row(meta: dict, pre: dict, post: dict, edit_seq, decode, seconds: float) -> dict:
    row = dict(meta)
    for m in METRICS:
        row[m] = float(post[m])
    row["pre"] = {m: float(pre[m]) for m in ("reliability", "t_generality", "m_generality")}
    pre_text, target = _answer_text(pre["pred_edit"], edit_seq, decode)
    post_text, _ = _answer_text(post["pred_edit"], edit_seq, decode)
    if decode is not None:
        row.update(target=target, pre_prediction=pre_text, post_prediction=post_text)
    row["seconds"] = seconds
    return row


def to_device_case(case: Case) -> Case:
    return jax.tree.map(jnp.asarray, case)


def run_sequential(
    editor: Editor,
    model: ModelFns,
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
    from mmedit_jax import patch as P

    n = len(meta)
    device_cases = to_device_case(cases)
    pre_fn, _ = make_step_fns(editor, model, exact_match)
    pre = jax.device_get(pre_fn(params, device_cases))

    @jax.jit
    def step(editor_params, params, total, case, pre_c, i):
        new = editor.edit(editor_params, params, case, total)
        total = P.accumulate(total, new, i)
        return total, post_scores(model, params, total, case, pre_c, exact_match)

    @jax.jit
    def score_all(params, total, cases, pre):
        return jax.vmap(lambda c, p: post_scores(model, params, total, c, p, exact_match))(cases, pre)

    first = _take(device_cases, 0)
    example = jax.eval_shape(lambda c: editor.edit(editor.editor_params, params, c, {}), first)
    example = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example)
    total = P.empty_accumulator(example, n)

    at_edit = []
    t0 = time.perf_counter()
    iterator = range(n)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, unit="edit", desc=f"{editor.name} sequential", dynamic_ncols=True)
    for i in iterator:
        total, s = step(editor.editor_params, params, total, _take(device_cases, i), _take(pre, i), i)
        at_edit.append(jax.device_get(s))
    seconds = time.perf_counter() - t0

    final = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        b = _pad_batch(_take(device_cases, idx), batch_size)
        p = _pad_batch(_take(pre, idx), batch_size)
        final.append(jax.device_get(score_all(params, total, b, p)))
    final = {k: np.concatenate([f[k] for f in final])[:n] for k in final[0]}

    rows = []
    for i in range(n):
        row = dict(meta[i])
        for m in METRICS:
            row[f"{m}_at_edit"] = float(at_edit[i][m])
            row[m] = float(final[m][i])
        row["pre"] = {m: float(pre[m][i]) for m in ("reliability", "t_generality", "m_generality")}
        rows.append(row)
    summary = summarize(rows)
    for m in METRICS:
        summary[f"{m}_at_edit"] = 100.0 * float(np.mean([r[f"{m}_at_edit"] for r in rows]))
    at = summary["reliability_at_edit"]
    summary.update(editor=editor.name, mode="sequential", seconds=seconds,
                   retention=summary["reliability"] / at if at > 0 else float("nan"))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "sequential_cases.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        with open(os.path.join(out_dir, "sequential_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return RunResult(summary, rows)
