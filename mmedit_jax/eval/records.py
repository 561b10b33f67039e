"""What a run leaves on disk, in one place: JSON lines appended as they come (flushed and fsynced), read back for a
resume (a torn last line cut off), the run's fingerprint (a resume continues only the run that wrote the directory),
per-case rows summarised as the paper's table, and that table printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from mmedit_jax.case import ACCURACY_INPUTS, METRICS, SPEC
from mmedit_jax.tree import flatten

HEADERS = dict(zip(METRICS, ("Rel.", "T-Gen.", "M-Gen.", "T-Loc.", "M-Loc.")))  # the paper's column names
PRE_METRICS = tuple(SPEC[name].metric for name in ACCURACY_INPUTS)  # what the unedited model scores too


class JsonlWriter:
    """Appends one JSON object per line; `flush()` makes what is written durable (fsync), so a killed run loses
    at most what came after its last flush."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def read_rows(path: str, keep: Callable[[dict], bool] | None = None) -> list[dict]:
    """The complete rows of a JSONL file written by `JsonlWriter` (none if it does not exist).

    The file is cut back to what is returned: a torn or unparseable tail (the run died mid-write) and, with
    `keep`, every row from the first one `keep` rejects on (e.g. steps after the checkpoint a run resumes from),
    so rows appended next continue a consistent file.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    rows, good = [], 0  # good: bytes up to the end of the last kept line
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if keep is not None and not keep(row):
            break
        rows.append(row)
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


# --------------------------------------------------------------------------------------------------
# Whose run is this: a fingerprint of everything that changes a row, written when a run starts.

RUN_FILE = "run.json"


class RunMismatch(ValueError):
    """A resume into a directory that another run (another editor, model, data or option) wrote."""


def digest_tree(tree) -> str:
    """sha256 of a pytree of arrays: every leaf's path, dtype, shape and bytes (host copies, leaf by leaf)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def hash_params(h, params, full_below: int = 1 << 20, samples: int = 4096):
    """Feeds `params` into the hashlib object `h` and returns it: every parameter's name, shape and dtype; the
    values of every leaf of at most `full_below` entries; `samples` entries at fixed positions of each larger leaf.
    A different checkpoint, or any change to a small leaf, changes the digest; a change confined to a few entries
    of a large matrix may not. Cost: one host copy of the small leaves and the samples (a 2.7B model: well under a
    second on a CPU)."""
    flat = flatten(params)
    for name in sorted(flat):
        x = flat[name]
        h.update(f"{name}|{tuple(x.shape)}|{x.dtype}|".encode())
        if x.size <= full_below:
            h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
        else:
            idx = np.sort(np.random.default_rng(x.size).choice(x.size, samples, replace=False))
            h.update(np.asarray(_gather(x, idx)).tobytes())
    return h


@jax.jit
def _gather(x, idx):
    return x.reshape(-1)[idx]


def digest_path(path: str | None, full_bytes: int = 1 << 24) -> str | None:
    """Identity of a file or directory: sha256 over each file's relative path and size, with the whole content
    of files up to `full_bytes` and the first and last MiB of larger ones (model weights: reading every byte of a
    multi-GB checkpoint on each resume would cost more than the check is worth). None for None."""
    if path is None:
        return None
    if not os.path.exists(path):
        return f"missing:{os.path.abspath(path)}"
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    h = hashlib.sha256()
    for f in files:
        size = os.path.getsize(f)
        h.update(f"{os.path.relpath(f, path)}|{size}|".encode())
        with open(f, "rb") as fh:
            if size <= full_bytes:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def claim_run(out_dir: str, fingerprint: Mapping, resume: bool, rows_file: str = "cases.jsonl") -> bool:
    """Marks `out_dir` as this run's (`run.json`), or checks that it already is. Returns whether rows written
    before may be kept (a resume).

    With `resume`, a directory holding rows (`rows_file`) but no fingerprint, or another run's fingerprint, is
    refused with a `RunMismatch` naming every entry that differs; without `resume` the caller starts over and the
    fingerprint is rewritten.
    """
    fingerprint = json.loads(json.dumps(dict(fingerprint), default=str))  # as it reads back from the file
    path, rows = os.path.join(out_dir, RUN_FILE), os.path.join(out_dir, rows_file)
    if resume and os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        differ = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        if differ:
            lines = [f"  {k}: the directory's {stored.get(k)!r}, this run's {fingerprint.get(k)!r}" for k in differ]
            raise RunMismatch(f"{out_dir} holds another run's results; what differs:\n" + "\n".join(lines)
                              + "\nUse another --out, or --no-resume to overwrite them.")
        return True
    if resume and os.path.exists(rows) and os.path.getsize(rows) > 0:
        raise RunMismatch(f"{rows} holds rows but {path} is missing, so nothing proves they are this run's: use "
                          "another --out, or --no-resume to overwrite them")
    write_json(out_dir, RUN_FILE, fingerprint)
    return False


# --------------------------------------------------------------------------------------------------
# Summaries.


def summarize(rows: Sequence[dict]) -> dict:
    """Means over cases (x100, as the paper reports), for post-edit metrics and pre-edit base accuracy."""
    out = {"num_cases": len(rows)}
    for m in METRICS:
        vals = [r[m] for r in rows if m in r]
        out[m] = 100.0 * float(np.mean(vals)) if vals else float("nan")
    for m in PRE_METRICS:
        vals = [r["pre"][m] for r in rows if "pre" in r]
        out[f"pre_{m}"] = 100.0 * float(np.mean(vals)) if vals else float("nan")
    out["nonfinite_edits"] = sum(1 for r in rows if r.get("finite") is False)
    return out


def write_json(out_dir: str, name: str, obj: dict) -> str:
    """Writes `obj` to `out_dir/name` whole (a temporary file renamed over it); returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(path + ".tmp", path)
    return path


def print_table(summary: dict, file=sys.stdout) -> None:
    """The paper's row for one run: editor, the five metrics, cases, edits/s; then pre-edit base accuracy."""
    rate = summary.get("edits_per_s")
    cols = ["editor", *HEADERS.values(), "cases", "edits/s"]
    vals = [summary["editor"], *(f"{summary[m]:.2f}" for m in METRICS), str(summary["num_cases"]),
            "-" if rate is None else f"{rate:.2f}"]
    widths = [max(len(c), len(v)) for c, v in zip(cols, vals)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)), file=file)
    print("  ".join(v.rjust(w) for v, w in zip(vals, widths)), file=file)
    pre = [f"{k[4:]}={summary[k]:.2f}" for k in summary if k.startswith("pre_")]
    if pre:
        print("pre-edit base accuracy: " + ", ".join(pre), file=file)
    if summary.get("nonfinite_edits"):
        print(f"WARNING: {summary['nonfinite_edits']} of {summary['num_cases']} edits produced a non-finite patch "
              "(NaN or inf); their rows say \"finite\": false and their scores mean nothing", file=file)
