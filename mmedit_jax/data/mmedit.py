"""Reads EasyEdit's MMEdit JSON files (E-VQA `vqa_*.json`, E-IC `caption_*_edit.json`).

Follows `VQADataset.__init__` / `CaptionDataset.__init__` (zjunlp/EasyEdit `easyeditor/dataset/{vqa,
coco_caption}.py`, May-2024 state `fb2ba6a`):

* the file is one JSON list of dicts; `size` truncates that list *before* any filtering;
* records with `alt == ""` are skipped;
* (switch `drop_dirty`) records with any empty-string text field are skipped: the "dirty_data" rule EasyEdit
  added to `VQADataset` only, in Nov 2025; by default it is on for "vqa" and off for "caption", as in
  EasyEdit's current code (the May-2024 code had no such rule: pass `drop_dirty=False` for it);
* image paths: `join(image_root, image)`, `join(rephrase_image_root, image_rephrase)` and
  `join(image_root, m_loc)` (the multimodal-locality image lives under the COCO root, not the rephrase root).

Unlike the reference, bad records do not crash the run half way: each problem (missing field, wrong type,
missing or unreadable image) is recorded as a `Problem(index, field, message)`, the record is rejected and
counted, and `strict=True` raises `DataError` on the first one instead. `LoadResult` says how many records
were read, skipped (by rule) and rejected, so the evaluated set never changes silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

TASKS = ("vqa", "caption")

# Every field the reference reads from a record, in the order of the released files.
TEXT_FIELDS = ("src", "pred", "alt", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
ALL_FIELDS = ("src", "pred", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans",
              "m_loc", "m_loc_q", "m_loc_a")

SKIP_EMPTY_ALT = "empty alt"
SKIP_DIRTY = "empty string field (dirty data)"


class DataError(ValueError):
    """A record (or the file) does not follow the MMEdit schema."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One defect of one record. `index` is the record's position in the JSON list (-1: the whole file)."""

    index: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"record {self.index}, field {self.field!r}: {self.message}"


@dataclasses.dataclass(frozen=True)
class MMEditRecord:
    """One MMEdit edit case with image paths resolved (absolute or relative to the working directory).

    Attributes mirror the JSON fields; `index` is the position in the JSON list (EasyEdit's `instance_id`).
    """

    index: int
    src: str  # edit prompt (E-VQA question; E-IC caption prefix)
    pred: str  # the unedited model's (wrong) output
    alt: str  # the edit target
    rephrase: str  # paraphrased prompt (T-Generality)
    image: str  # edit image (Reliability, T-Generality)
    image_rephrase: str  # generated variant of `image` (M-Generality)
    loc: str  # NQ question, "nq question: ..." (T-Locality, text only)
    loc_ans: str
    m_loc: str  # OK-VQA image (M-Locality)
    m_loc_q: str
    m_loc_a: str

    @property
    def cond(self) -> str:
        """KE-style conditioning string, as the reference builds it: "{pred} >> {alt} || {src}"."""
        return f"{self.pred} >> {self.alt} || {self.src}"


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What `load_mmedit` read.

    Attributes:
      records: the accepted records, in file order.
      problems: every defect found in rejected records (a record may have several).
      n_in_file: length of the JSON list.
      n_read: records considered after `size` truncation.
      skipped: reason -> indices of records dropped by a reference rule (empty alt, dirty data).
      rejected: indices of records dropped because of problems.
    """

    records: tuple[MMEditRecord, ...]
    problems: tuple[Problem, ...]
    n_in_file: int
    n_read: int
    skipped: Mapping[str, tuple[int, ...]]
    rejected: tuple[int, ...]

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        parts = [f"{self.n_in_file} in file", f"{self.n_read} read", f"{len(self.records)} kept"]
        parts += [f"{len(v)} skipped ({k})" for k, v in self.skipped.items() if v]
        parts.append(f"{len(self.rejected)} rejected ({len(self.problems)} problems)")
        return ", ".join(parts)


def _image_problem(path: str, cache: dict[str, str | None]) -> str | None:
    """None if `path` is a readable image, else why not. Checks each distinct path once."""
    if path in cache:
        return cache[path]
    if not os.path.isfile(path):
        msg = f"image file not found: {path}"
    else:
        try:
            from PIL import Image

            with Image.open(path) as im:
                im.verify()
            msg = None
        except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
            msg = f"unreadable image {path}: {type(e).__name__}: {e}"
    cache[path] = msg
    return msg


def load_mmedit(
    path: str | os.PathLike,
    task: str,
    image_root: str | os.PathLike,
    rephrase_image_root: str | os.PathLike | None = None,
    size: int | None = None,
    strict: bool = False,
    drop_dirty: bool | None = None,
    check_images: bool = True,
) -> LoadResult:
    """Loads an MMEdit JSON file the way EasyEdit's `VQADataset` / `CaptionDataset` do.

    Args:
      path: `vqa_{train,eval}.json` or `caption_{train,eval}_edit.json`.
      task: "vqa" or "caption" (selects the default of `drop_dirty`; prompts are built in `cases.py`).
      image_root: EasyEdit's `coco_image` (holds `val2014/...`); `image` and `m_loc` are relative to it.
      rephrase_image_root: EasyEdit's `rephrase_image` (holds `val2014_image_rephrase/...`); defaults to
        `image_root` (all shipped yamls set both to the same directory).
      size: keep only the first `size` entries of the list, before filtering (reference behaviour).
      strict: raise `DataError` at the first problem instead of rejecting and counting.
      drop_dirty: skip records with an empty-string text field. None: the reference default per task
        (True for "vqa", False for "caption", EasyEdit's current rule; the May-2024 code used False for both).
      check_images: verify that every image file exists and PIL can read it (each distinct path once).

    Returns:
      A `LoadResult`.

    Raises:
      DataError: the file is not a JSON list, or (strict) the first bad record.
      FileNotFoundError: `path` does not exist.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if drop_dirty is None:
        drop_dirty = task == "vqa"
    image_root = os.fspath(image_root)
    rephrase_image_root = image_root if rephrase_image_root is None else os.fspath(rephrase_image_root)

    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    n_in_file = len(raw)
    if size is not None:
        raw = raw[:size]

    records: list[MMEditRecord] = []
    problems: list[Problem] = []
    skipped: dict[str, list[int]] = {SKIP_EMPTY_ALT: [], SKIP_DIRTY: []}
    rejected: list[int] = []
    image_cache: dict[str, str | None] = {}

    for index, rec in enumerate(raw):
        found: list[Problem] = []

        def report(field: str, message: str, index=index, found=found) -> None:
            problem = Problem(index, field, message)
            if strict:
                raise DataError(f"{path}: {problem}")
            found.append(problem)

        if not isinstance(rec, dict):
            report("<record>", f"expected a JSON object, got {type(rec).__name__}")
        else:
            for field in ALL_FIELDS:
                if field not in rec:
                    report(field, "missing field")
                elif not isinstance(rec[field], str):
                    report(field, f"expected a string, got {type(rec[field]).__name__}: {rec[field]!r:.60}")
        if found:
            problems.extend(found)
            rejected.append(index)
            continue

        # Reference skip rules, applied before touching images (as the reference does for empty alt).
        if rec["alt"] == "":
            skipped[SKIP_EMPTY_ALT].append(index)
            continue
        if drop_dirty and any(rec[f] == "" for f in TEXT_FIELDS):
            skipped[SKIP_DIRTY].append(index)
            continue

        paths = {
            "image": os.path.join(image_root, rec["image"]),
            "image_rephrase": os.path.join(rephrase_image_root, rec["image_rephrase"]),
            "m_loc": os.path.join(image_root, rec["m_loc"]),
        }
        if check_images:
            for field, p in paths.items():
                msg = _image_problem(p, image_cache)
                if msg is not None:
                    report(field, msg)
        if found:
            problems.extend(found)
            rejected.append(index)
            continue

        records.append(
            MMEditRecord(index=index, **{f: rec[f] for f in TEXT_FIELDS}, **paths)
        )

    return LoadResult(
        records=tuple(records),
        problems=tuple(problems),
        n_in_file=n_in_file,
        n_read=len(raw),
        skipped={k: tuple(v) for k, v in skipped.items()},
        rejected=tuple(rejected),
    )
