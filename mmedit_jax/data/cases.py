"""Turns MMEdit records into the five teacher-forced inputs the metrics need, as static-shaped arrays.

Follows `VQADataset.collate_fn` / `CaptionDataset.collate_fn` (EasyEdit `fb2ba6a`) and the label masking of
the BLIP-2 wrapper's forward (`easyeditor/trainer/blip2_models/blip2_opt.py`):

| sub-input          | image          | text                                                   |
|--------------------|----------------|--------------------------------------------------------|
| `edit`             | image          | prompt(src) + " " + alt                                |
| `rephrase`         | image          | prompt(rephrase) + " " + alt                           |
| `image_rephrase`   | image_rephrase | prompt(src) + " " + alt                                |
| `loc`              | none           | loc + " " + loc_ans                                    |
| `loc_image`        | m_loc          | "Question: {m_loc_q} Short answer:" + " " + m_loc_a    |

`prompt` is the VQA template "Question: {} Short answer:" for E-VQA and the identity for E-IC. Text is
tokenized with `add_special_tokens=False` (the 2024 wrapper adds no BOS); the prompt length is
`len(tok.encode(prompt, add_special_tokens=False))`. Labels are the text ids with pad ids, the first
`prompt_len` ids and the image slots set to -100, aligned with the input positions (not shifted: the metrics
shift, as the reference does).

Layout (transformers-5 BLIP-2): an input with an image is `[image_token_id] * num_query_tokens + text ids`;
the text-only `loc` input has no image slots. MiniGPT-4 (EasyEdit's `MiniGPT4.forward`) wraps the slots:
`image_before + [image_token_id] * num_query_tokens + image_after + text ids` (the ids of `'###Human: <Img>'`
and `'</Img> '`, each tokenized on its own), the whole block masked in the labels; text-only inputs stay bare.

Each sub-batch is right-padded with the tokenizer's pad id to the smallest configured length bucket that fits,
so a whole evaluation compiles to a few programs.

Paper-era switches (arXiv v1-v4 numbers, EasyEdit Oct 2023): `paper_era_template` uses
"Question: {} Short answer: " (trailing space) + the target without a leading space on templated inputs;
`prepend_bos` puts the tokenizer's BOS before the text and counts it in the prompt length (as
`len(tok.encode(prompt))` did for OPT then).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import struct

from mmedit_jax.case import ACCURACY_INPUTS, IGNORE_INDEX, INPUT_NAMES
from mmedit_jax.data.mmedit import TASKS, DataError, MMEditRecord

VQA_TEMPLATE = "Question: {} Short answer:"
PAPER_ERA_VQA_TEMPLATE = "Question: {} Short answer: "
DEFAULT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclasses.dataclass(frozen=True)
class CaseConfig:
    """How records become token arrays.

    Attributes:
      task: "vqa" (templated src/rephrase) or "caption" (never templated).
      num_query_tokens: image slots per image input (BLIP-2: 32).
      image_token_id: id of the `<image>` placeholder filling those slots.
      buckets: allowed padded lengths (total, image slots included), ascending.
      prepend_bos: paper-era BLIP-2 tokenization with BOS (counted in the prompt length).
      paper_era_template: "Question: {} Short answer: " + target without leading space.
      cond_max_length: KE `cond` length (the reference tokenizes with max_length=32, truncation).
      image_before, image_after: ids around the image slots (MiniGPT-4's wrapper; empty for BLIP-2).
    """

    task: str
    num_query_tokens: int = 32
    image_token_id: int = -1
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    prepend_bos: bool = False
    paper_era_template: bool = False
    cond_max_length: int = 32
    image_before: tuple[int, ...] = ()
    image_after: tuple[int, ...] = ()

    @property
    def image_block(self) -> list[int]:
        """The ids an input with an image starts with."""
        return [*self.image_before, *[self.image_token_id] * self.num_query_tokens, *self.image_after]

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.num_query_tokens > 0 and self.image_token_id < 0:
            raise ValueError("image_token_id must be set when num_query_tokens > 0")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be non-empty, strictly ascending, got {self.buckets}")


@dataclasses.dataclass(frozen=True)
class TextInput:
    """One teacher-forced input as strings: the model sees `prompt + target` (with `image`, if any)."""

    prompt: str
    target: str
    image: str | None  # image path, None for text only

    @property
    def text(self) -> str:
        return self.prompt + self.target


def case_inputs(record: MMEditRecord, task: str, paper_era_template: bool = False) -> dict[str, TextInput]:
    """The five inputs of one record as strings (reference `collate_fn`), keyed by `case.INPUT_NAMES`."""
    template = PAPER_ERA_VQA_TEMPLATE if paper_era_template else VQA_TEMPLATE
    # 2024 code: every target gets a leading space. Paper era: templated inputs appended the bare target,
    # untemplated ones joined prompt and target with " " (the same string as prompt + " " + target).
    templated_sep = "" if paper_era_template else " "
    if task == "vqa":
        src, rephrase, edit_sep = template.format(record.src), template.format(record.rephrase), templated_sep
    elif task == "caption":
        src, rephrase, edit_sep = record.src, record.rephrase, " "
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    alt = edit_sep + record.alt
    return {
        "edit": TextInput(src, alt, record.image),
        "rephrase": TextInput(rephrase, alt, record.image),
        "image_rephrase": TextInput(src, alt, record.image_rephrase),
        "loc": TextInput(record.loc, " " + record.loc_ans, None),
        "loc_image": TextInput(template.format(record.m_loc_q), templated_sep + record.m_loc_a, record.m_loc),
    }


class ImageTable:
    """Distinct image paths, each preprocessed once and cached.

    `index(path)` registers a path and returns its row; `array(i)` / `stack(ids)` preprocess lazily (once per
    path) with `preprocess(path) -> float32 [3, S, S]` (e.g. `mmedit_jax.data.image.load_image`).
    """

    def __init__(self, preprocess: Callable[[str], np.ndarray]):
        self._preprocess = preprocess
        self._index: dict[str, int] = {}
        self._paths: list[str] = []
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self._paths)

    @property
    def n_decoded(self) -> int:
        """How many images have been preprocessed so far (each at most once)."""
        return len(self._cache)

    def index(self, path: str) -> int:
        if path not in self._index:
            self._index[path] = len(self._paths)
            self._paths.append(path)
        return self._index[path]

    def array(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self._paths):
            raise IndexError(f"image id {i} out of range [0, {len(self._paths)})")
        if i not in self._cache:
            try:
                arr = np.asarray(self._preprocess(self._paths[i]), dtype=np.float32)
            except Exception as e:
                raise DataError(f"image {self._paths[i]}: cannot preprocess: {type(e).__name__}: {e}") from e
            if arr.ndim != 3:
                raise ValueError(f"preprocess({self._paths[i]!r}) returned shape {arr.shape}, "
                                 "expected [3, S, S]")
            self._cache[i] = arr
        return self._cache[i]

    def stack(self, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """float32 [N, 3, S, S] for `ids` (default: every registered image, in id order)."""
        ids = range(len(self._paths)) if ids is None else [int(i) for i in np.asarray(ids).reshape(-1)]
        return np.stack([self.array(i) for i in ids])


@struct.dataclass
class TokenBatch:
    """One teacher-forced sub-input for B cases, right-padded to a bucket length L.

    input_ids:      int32 [B, L]  image slots (image_token_id) + text ids + pad ids.
    attention_mask: int32 [B, L]  1 on image slots and text, 0 on padding.
    labels:         int32 [B, L]  answer token ids at their input positions, -100 elsewhere (not shifted).
    image_ids:      int32 [B]     row in the `ImageTable`, -1 for text-only inputs.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    image_ids: np.ndarray


@struct.dataclass
class EditBatch:
    """The five sub-inputs of B independent edit cases plus the KE condition; a pytree of arrays.

    cond_ids, cond_mask: int32 [B, cond_max_length] (tokenized "{pred} >> {alt} || {src}", right-padded).
    case_index:          int32 [B] the records' `index` in their JSON file (-1 on padding rows).
    valid:               bool  [B] False on rows added by `pad_to` (copies of the last case; ignore them).
    For a vmapped editor over edits use `per_edit()`: every leaf gets a unit batch axis ([B, 1, ...]) so
    `jax.vmap(f)(batch.per_edit())` hands `f` one case as a batch of 1 (the reference's protocol).
    """

    edit: TokenBatch
    rephrase: TokenBatch
    image_rephrase: TokenBatch
    loc: TokenBatch
    loc_image: TokenBatch
    cond_ids: np.ndarray
    cond_mask: np.ndarray
    case_index: np.ndarray
    valid: np.ndarray

    def sub(self, name: str) -> TokenBatch:
        return getattr(self, name)

    @property
    def batch_size(self) -> int:
        return int(self.case_index.shape[0])

    def per_edit(self) -> EditBatch:
        return jax.tree.map(lambda x: x[:, None], self)



def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; ValueError if none."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"sequence length {n} exceeds the largest bucket {buckets[-1]}")


def _encode(tok, strings: list[str]) -> list[list[int]]:
    if not strings:
        return []
    return [list(ids) for ids in tok(strings, add_special_tokens=False)["input_ids"]]


def encode_inputs(
    inputs: Sequence[TextInput],
    tok,
    images: ImageTable,
    config: CaseConfig,
    length: int | None = None,
    case_index: Sequence[int] | None = None,
    name: str = "input",
) -> TokenBatch:
    """Tokenizes B `TextInput`s into one right-padded `TokenBatch`.

    `length`: padded length L; default the smallest bucket fitting the longest input. Errors name the case
    (`case_index[i]`, default i) and `name` of the sub-input.
    """
    if tok.pad_token_id is None:
        raise ValueError("tokenizer has no pad token (the reference sets pad = eos)")
    pad_id = int(tok.pad_token_id)
    case_index = list(range(len(inputs))) if case_index is None else list(case_index)
    text_ids = _encode(tok, [x.text for x in inputs])
    prompt_lens = [len(ids) for ids in _encode(tok, [x.prompt for x in inputs])]
    bos = [int(tok.bos_token_id)] if config.prepend_bos else []

    rows, label_rows, image_ids = [], [], []
    for i, x in enumerate(inputs):
        block = config.image_block if x.image is not None else []
        ids = bos + text_ids[i]
        labels = np.asarray(ids, np.int64)
        # Reference masking: pad ids in the text, then the prompt (BOS included when prepended).
        labels = np.where(labels == pad_id, IGNORE_INDEX, labels)
        labels[: len(bos) + prompt_lens[i]] = IGNORE_INDEX
        # Edit inputs without answer tokens would score 0/0; locality inputs do not use their labels.
        if name in ACCURACY_INPUTS and not (labels != IGNORE_INDEX).any():
            raise ValueError(f"case {case_index[i]}, {name}: no answer tokens left after masking the prompt "
                             f"(text {x.text!r})")
        rows.append(block + ids)
        label_rows.append([IGNORE_INDEX] * len(block) + labels.tolist())
        image_ids.append(images.index(x.image) if x.image is not None else -1)

    longest = max((len(r) for r in rows), default=0)
    if length is None:
        try:
            length = bucket_length(longest, config.buckets)
        except ValueError:
            i = max(range(len(rows)), key=lambda j: len(rows[j]))
            raise ValueError(f"case {case_index[i]}, {name}: {len(rows[i])} tokens exceed the largest "
                             f"bucket {config.buckets[-1]}") from None
    b = len(rows)
    input_ids = np.full((b, length), pad_id, np.int32)
    attention_mask = np.zeros((b, length), np.int32)
    labels = np.full((b, length), IGNORE_INDEX, np.int32)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        if len(r) > length:
            raise ValueError(f"case {case_index[i]}, {name}: {len(r)} tokens exceed length {length}")
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
        labels[i, : len(r)] = lab
    return TokenBatch(input_ids, attention_mask, labels, np.asarray(image_ids, np.int32))


def encode_cond(records: Sequence[MMEditRecord], tok, max_length: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """KE conditioning: tok(cond, truncation, max_length) right-padded to exactly max_length.

    int32 [B, max_length] ids and mask. The reference pads to the longest in the batch; padding to a fixed
    length only adds masked positions.
    """
    enc = tok([r.cond for r in records], truncation=True, max_length=max_length)["input_ids"]
    ids = np.full((len(records), max_length), int(tok.pad_token_id), np.int32)
    mask = np.zeros((len(records), max_length), np.int32)
    for i, row in enumerate(enc):  # right padding whatever the tokenizer's padding_side
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def build_edit_batch(
    records: Sequence[MMEditRecord],
    tok,
    images: ImageTable,
    config: CaseConfig,
    lengths: Mapping[str, int] | None = None,
    pad_to: int | None = None,
) -> EditBatch:
    """The `EditBatch` of `records` (B = len(records), or `pad_to`).

    `lengths` optionally fixes the padded length per sub-input name (e.g. from `max_lengths` over the whole
    dataset, so every batch has one shape); otherwise each sub-batch takes the smallest fitting bucket.
    `pad_to` fills a short (last) batch up to a fixed number of cases by repeating the last record, marked
    `valid=False` and `case_index=-1`, so a vmapped editor keeps one compiled batch size.
    """
    if not records:
        raise ValueError("build_edit_batch needs at least one record")
    n_real = len(records)
    if pad_to is not None:
        if pad_to < n_real:
            raise ValueError(f"pad_to={pad_to} is smaller than the {n_real} records given")
        records = list(records) + [records[-1]] * (pad_to - n_real)
    per_case = [case_inputs(r, config.task, config.paper_era_template) for r in records]
    idx = [r.index for r in records]
    subs = {
        name: encode_inputs([c[name] for c in per_case], tok, images, config,
                            length=None if lengths is None else lengths.get(name), case_index=idx, name=name)
        for name in INPUT_NAMES
    }
    cond_ids, cond_mask = encode_cond(records, tok, config.cond_max_length)
    valid = np.arange(len(records)) < n_real
    case_index = np.where(valid, np.asarray(idx, np.int32), -1).astype(np.int32)
    return EditBatch(**subs, cond_ids=cond_ids, cond_mask=cond_mask, case_index=case_index, valid=valid)


def decode_answers(tok, pred_ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """Text of each example's predicted answer tokens: `pred_ids`, `mask` [B, L-1] as returned by
    `mmedit_jax.eval.metrics.shifted_answer_predictions` (the pre/post predictions the harness logs)."""
    pred_ids, mask = np.asarray(pred_ids), np.asarray(mask).astype(bool)
    return [tok.decode(p[m].tolist()) for p, m in zip(pred_ids, mask)]


def input_lengths(records: Sequence[MMEditRecord], tok, config: CaseConfig) -> dict[str, np.ndarray]:
    """Tokens of each record's five inputs as the model sees them (image slots and a prepended BOS included):
    `{name: [len(records)] int}`."""
    per_case = [case_inputs(r, config.task, config.paper_era_template) for r in records]
    extra = 1 if config.prepend_bos else 0
    out = {}
    for name in INPUT_NAMES:
        texts = [c[name] for c in per_case]
        n_img = len(config.image_block) if texts and texts[0].image is not None else 0
        out[name] = np.asarray([len(ids) + n_img + extra for ids in _encode(tok, [t.text for t in texts])], np.int64)
    return out


def max_lengths(records: Sequence[MMEditRecord], tok, config: CaseConfig, multiple: int | None = None,
                lengths: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """Padded length per sub-input that fits every record (pass as `lengths=` for one shape): the smallest
    bucket, or with `multiple` the longest input rounded up to a multiple of it (1: no padding beyond the
    longest; the peer runs each case unpadded, and every pad position costs a full row of compute).
    `lengths`: `input_lengths(...)` if the caller has it already."""
    lengths = input_lengths(records, tok, config) if lengths is None else lengths
    out = {}
    for name in INPUT_NAMES:
        n = int(lengths[name].max(initial=0))
        out[name] = bucket_length(n, config.buckets) if multiple is None else -(-n // multiple) * multiple
    return out
