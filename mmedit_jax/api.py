"""Edit a fact in three lines: the surface a researcher reaches for first.

    import mmedit_jax as mj
    model = mj.from_pretrained("world")                      # or a converted / Hugging Face directory
    editor = mj.load_editor("mend", model)                   # the shipped editor; or path=DIR, hparams=...
    patch = editor.edit(image, "What color are the shapes?", "purple")
    model.answer(image, "What color are the shapes?")                  # the unedited answer
    model.answer(image, "What color are the shapes?", patch=patch)     # "purple"

`Model` is a `Blip2Model` (everything it does, unchanged: `model(pixel_values, input_ids, attention_mask)`,
`model.generate(...)`) that also knows its tokenizer, its name and a fingerprint of its config and weights, and
answers questions the way the benchmark asks them (`answer`); `MiniGPT4ApiModel` is the same over a
`MiniGPT4Model` (its image slots wrapped in `'###Human: <Img>'` / `'</Img> '`, LLaMA's generation positions).
`BoundEditor` is one of the project's editors
(`pipeline.build_editor`) bound to one model: `edit` / `edit_batch` build the benchmark's `Case` for each edit
(`data/cases.py`, `case.make_cases`) and run the editor's pure per-case edit, vmapped over the edits, in one
compiled program per shape (token lengths padded to `data.cases.DEFAULT_BUCKETS`, the number of edits to a power
of two, so a loop over many edits compiles a handful of times). Patches are values (`edit_patch.EditPatch`) that
carry which editor made them for which model; applying one to another model is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmedit_jax import loading, pipeline
from mmedit_jax.case import Seq, answer_rows, make_cases, pad_batch, take
from mmedit_jax.data.cases import DEFAULT_BUCKETS, VQA_TEMPLATE, CaseConfig, ImageTable, build_edit_batch
from mmedit_jax.data.image import load_image, preprocess_image
from mmedit_jax.data.mmedit import TASKS, MMEditRecord
from mmedit_jax.edit_patch import (
    ContextBatch,
    ContextPatch,
    EditPatch,
    MemoryBatch,
    MemoryPatch,
    PatchBatch,
    PatchMismatch,
    compose,
    save_patch,
)
from mmedit_jax.edit_patch import load_patch as _load_patch_file
from mmedit_jax.editors.io import read_spec
from mmedit_jax.editors.serac import with_memory
from mmedit_jax.eval import records
from mmedit_jax.models.blip2 import Blip2Model
from mmedit_jax.models.minigpt4 import MiniGPT4Model
from mmedit_jax.sites import get_path, resolve_site
from mmedit_jax.world import assets

__all__ = ["Model", "MiniGPT4ApiModel", "BoundEditor", "from_pretrained", "load_editor", "save_patch", "load_patch",
           "compose", "EditPatch", "PatchBatch", "ContextPatch", "ContextBatch", "MemoryPatch", "MemoryBatch",
           "PatchMismatch", "model_fingerprint"]

WORLD = "world"  # `from_pretrained("world")`: the shipped world model (a directory named so: pass "./world")
WORLD_DIR = "model"  # its directory under the assets
# The world model was pretrained on answer tokens only (no end-of-sequence token after them), so it never learns
# to stop; its answers are one word for E-VQA and three for E-IC by construction (`world/dataset.py`), and
# `answer` keeps that many words of what it generates.
WORLD_ANSWER_WORDS = {"vqa": 1, "caption": 3}
DEFAULT_NEW_TOKENS = {"vqa": 10, "caption": 20}
PROMPT_MULTIPLE = 8  # `answer` left-pads prompts to a multiple of this (one compiled program per bucket)
_COMPILED: dict = {}  # (config, dtype, remat) -> the jitted model functions every `Model` of that kind shares


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# --------------------------------------------------------------------------------------------------
# Images.


def to_pixels(image, image_size: int) -> np.ndarray:
    """An image as the benchmark feeds it: float32 `[3, S, S]` (`data.image.preprocess_image`, S = `image_size`).

    `image`: a file path, a PIL image, or an `[H, W, 3]` (or `[H, W]`, `[H, W, 4]`) array, uint8 or float in
    [0, 1] (rounded to uint8 first, so it goes through the same PIL path as a file). An array already shaped
    `[3, S, S]` float is taken as preprocessed pixels and returned as is.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, image_size)
    if isinstance(image, Image.Image):
        return preprocess_image(image, image_size)
    arr = np.asarray(image)
    if arr.shape == (3, image_size, image_size) and np.issubdtype(arr.dtype, np.floating) and image_size != 3:
        return arr.astype(np.float32)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4] (or preprocessed [3, {image_size}, "
                         f"{image_size}]), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("the image array holds NaN or inf")
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"a float image array must hold values in [0, 1] (got {arr.min():.3g}..{arr.max():.3g});"
                             " pass uint8 for 0..255")
        arr = np.round(arr * 255)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return preprocess_image(Image.fromarray(arr.astype(np.uint8)), image_size)


def _as_list(x, n: int, what: str) -> list:
    """`x` for each of n rows: a list/tuple of n, a 4-D array of n images, or one value for every row."""
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{len(x)} {what} for {n} questions")
        return list(x)
    if isinstance(x, np.ndarray) and x.ndim == 4 and what == "images":
        if len(x) != n:
            raise ValueError(f"{len(x)} {what} for {n} questions")
        return list(x)
    return [x] * n


# --------------------------------------------------------------------------------------------------
# The model.


def model_fingerprint(config, params, full_below: int = 1 << 20, samples: int = 4096) -> str:
    """sha256 over the config and the weights (`records.hash_params`: names, shapes, dtypes; small leaves whole,
    `samples` fixed entries of each larger one). So a different config, a different checkpoint, or any change to a
    small leaf (the world model: every leaf) gives another fingerprint; a change confined to a few entries of a
    large matrix may go unnoticed."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    return records.hash_params(h, params, full_below, samples).hexdigest()


def _delta_shape(d) -> tuple[int, int]:
    if hasattr(d, "a"):
        return int(d.a.shape[-1]), int(d.b.shape[-1])
    return tuple(int(s) for s in d.delta.shape[-2:])


class Model(Blip2Model):
    """A `Blip2Model` that knows its tokenizer, its name and its fingerprint, and answers questions.

    Everything of `Blip2Model` works unchanged (`model(pixel_values, input_ids, attention_mask, patch=...)`,
    `model.generate(...)`, `.config`, `.params`); a patch passed to them is checked first (`check_patch`).
    `family`: the model class this one answers for (its module, stacks and compiled programs).
    """

    family = Blip2Model

    def __init__(self, config, params, dtype: Any = jnp.float32, remat: bool = False, *, name: str | None = None,
                 source_dir: str | None = None, tokenizer=None, tokenizer_dir: str | None = None,
                 answer_words: dict | None = None):
        super().__init__(config, params, dtype=dtype, remat=remat)
        self.name = name or "unnamed model"
        self.source_dir = None if source_dir is None else os.path.abspath(source_dir)
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = tokenizer
        self.answer_words = dict(answer_words or {})
        self._fingerprint = (None, None)
        self._share_compiled(remat)

    def _share_compiled(self, remat: bool) -> None:
        """Use the compiled programs of any earlier `Model` of the same config, dtype and remat (they are pure
        in the parameters), so loading a model again (a notebook cell rerun, a second checkpoint of the same
        architecture) does not compile again. The shared functions are bound to a parameterless shell of the
        model, so they keep no model's weights alive."""
        key = (self.config, str(self.dtype), bool(remat))
        if key not in _COMPILED:
            shell = object.__new__(self.family)
            shell.config, shell.dtype, shell.module, shell.stacks = self.config, self.dtype, self.module, self.stacks
            _COMPILED[key] = dict(
                shell=shell, forward=jax.jit(shell._forward_impl), encode=jax.jit(shell._encode_impl),
                generate=jax.jit(shell._generate_impl, static_argnames=("max_new_tokens", "eos_token_id",
                                                                         "pad_token_id")), each={})
        shared = _COMPILED[key]
        self._forward, self._encode, self._generate = shared["forward"], shared["encode"], shared["generate"]
        self._shell, self._generate_each = shared["shell"], shared["each"]

    @classmethod
    def wrap(cls, model: Blip2Model, **kw) -> Model:
        """A `Model` over an existing `Blip2Model`'s config and parameters (shared, not copied)."""
        return cls(model.config, model.params, model.dtype, model.module.remat, **kw)

    def __repr__(self) -> str:
        return f"Model({self.name!r}, {self.config.text.num_hidden_layers} text layers, {self.dtype})"

    # ---- identity -----------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The tokenizer beside the model (loaded on first use: importing transformers costs seconds)."""
        if self._tokenizer is None:
            where = self.tokenizer_dir
            if where is None:
                raise ValueError(f"model {self.name!r} has no tokenizer: pass tokenizer= (a directory or a "
                                 "tokenizer object) to mmedit_jax.from_pretrained, or set model.tokenizer")
            try:
                self._tokenizer = pipeline.load_tokenizer(where)
            except (OSError, ValueError) as e:
                raise ValueError(f"model {self.name!r}: no usable tokenizer in {where} ({type(e).__name__}: {e}); "
                                 "pass tokenizer= to mmedit_jax.from_pretrained") from None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok):
        self._tokenizer = tok

    @property
    def fingerprint(self) -> str:
        """`model_fingerprint` of this model's config and current parameters (computed once per params)."""
        params, fp = self._fingerprint
        if params is not self.params:
            fp = model_fingerprint(self.config, self.params)
            self._fingerprint = (self.params, fp)
        return fp

    @property
    def is_world(self) -> bool:
        """Whether this is the shipped world model (loaded from its directory): its editors are shipped too, and
        the world's data, demonstration bank and answer lengths apply."""
        return self.source_dir is not None and (
            os.path.realpath(self.source_dir) == os.path.realpath(os.path.join(assets.ASSETS, WORLD_DIR)))

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def pixels(self, image) -> np.ndarray:
        """`image` preprocessed as the benchmark does at this model's image size: float32 `[3, S, S]`."""
        return to_pixels(image, self.image_size)

    # ---- patches ------------------------------------------------------------------------------------

    def check_patch(self, patch):
        """The plain patch dict jax takes (`PatchBatch`: its stacked dict), after checking that it fits.

        Refused (`PatchMismatch`): a patch made for another model (its fingerprint differs from this model's;
        the message names both), or one whose sites this model lacks or whose shapes differ."""
        if patch is None:
            return None
        if isinstance(patch, (ContextPatch, ContextBatch)):
            raise TypeError("an in-context edit (IKE) changes no weight: ask under it with model.answer(..., "
                            "patch=...), which puts its context before the question")
        if isinstance(patch, (MemoryPatch, MemoryBatch)):
            raise TypeError("a SERAC edit changes no weight: ask under it with model.answer(..., patch=...), which "
                            "routes every generated token through the editor's memory")
        if isinstance(patch, PatchBatch):
            deltas, made_for, name, editor = patch.stacked, patch.model, patch.model_name, patch.editor
        elif isinstance(patch, dict):
            deltas = patch
            made_for, name, editor = (patch.model, patch.model_name, patch.editor) if isinstance(patch, EditPatch) \
                else (None, None, None)
        else:
            raise TypeError(f"patch must be a dict of deltas, an EditPatch or a PatchBatch, not {type(patch).__name__}")
        if made_for is not None and made_for != self.fingerprint:
            raise PatchMismatch(
                f"this patch was made by {editor or 'an editor'} for model {name!r} (fingerprint {made_for[:16]}), "
                f"not for model {self.name!r} (fingerprint {self.fingerprint[:16]}): its deltas were computed "
                "against the other model's weights. Load the model it was made for, or edit this one again.")
        for site, d in deltas.items():
            path, idx = resolve_site(site, self.stacks)
            try:
                leaf = get_path(self.params, path, site)
            except KeyError:
                raise PatchMismatch(f"the patch edits {site!r}, which model {self.name!r} does not have") from None
            want = tuple(leaf.shape if idx is None else leaf.shape[1:])
            if idx is not None and idx >= leaf.shape[0]:
                raise PatchMismatch(f"the patch edits {site!r}, which model {self.name!r} does not have "
                                    f"({leaf.shape[0]} layers)")
            if _delta_shape(d) != want:
                raise PatchMismatch(f"the patch's delta at {site!r} is {_delta_shape(d)}, model {self.name!r}'s "
                                    f"kernel there is {want}")
        return dict(deltas)

    def __call__(self, pixel_values, input_ids, attention_mask=None, params=None, patch=None, image_embeds=None):
        if isinstance(patch, PatchBatch):
            raise TypeError("a PatchBatch holds E edits: pass one of them (batch[i]), or vmap over batch.stacked")
        return super().__call__(pixel_values, input_ids, attention_mask, params, self.check_patch(patch),
                                image_embeds)

    def generate(self, pixel_values, input_ids, attention_mask=None, *, patch=None, **kw):
        if isinstance(patch, PatchBatch):
            raise TypeError("a PatchBatch holds E edits: pass one of them (batch[i]), or use answer(...)")
        return super().generate(pixel_values, input_ids, attention_mask, patch=self.check_patch(patch), **kw)

    # ---- answering ----------------------------------------------------------------------------------

    def case_config(self, task: str = "vqa", buckets=DEFAULT_BUCKETS) -> CaseConfig:
        """How the benchmark turns this model's inputs into ids (`data/cases.py`): its image slots, and around
        them MiniGPT-4's wrapper pieces tokenized with this model's tokenizer (`pipeline.image_wrapper`)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        return CaseConfig(task=task, num_query_tokens=self.config.num_query_tokens,
                          image_token_id=self.config.image_token_index, buckets=buckets,
                          **pipeline.image_wrapper(self.config, self.tokenizer))

    def prompt_ids(self, question: str, with_image: bool, task: str = "vqa", template: str | None = None,
                   context: Sequence[int] = ()) -> list:
        """The token ids the benchmark shows the model for `question` (`data/cases.py`): the image block, when
        there is an image (`[image_token_index] * num_query_tokens`; MiniGPT-4: wrapped in its prompt pieces) +
        `context` (an in-context edit's ids, where IKE puts them: `editors.ike.join_context`) + the templated text
        tokenized without special tokens (no BOS). E-VQA's template is `VQA_TEMPLATE`, E-IC's the identity."""
        cfg = self.case_config(task)
        if template is None:
            template = VQA_TEMPLATE if task == "vqa" else "{}"
        ids = list(self.tokenizer(template.format(question), add_special_tokens=False)["input_ids"])
        return ([int(i) for i in cfg.image_block] if with_image else []) + [int(i) for i in context] + ids

    def decode_answer(self, tokens, max_words: int | None = None) -> str:
        """Generated ids -> the answer: cut at the end-of-sequence token, special tokens dropped, the first
        line, stripped, and at most `max_words` words (None or 0: no limit)."""
        tokens = [int(t) for t in tokens]
        eos = self.config.text.eos_token_id
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        text = text.split("\n")[0].strip()
        if max_words:
            text = " ".join(text.split()[:max_words])
        return text

    def answer(self, image, question, patch=None, *, max_new_tokens: int | None = None, task: str = "vqa",
               template: str | None = None, max_words: int | None = None):
        """The model's answer to `question` about `image`, greedy with the KV cache (`Blip2Model.generate`).

        image: a path, a PIL image, an `[H, W, 3]` array (`to_pixels`), or None for a text-only question (the
          language model alone, no image slots, as the benchmark's `loc` input).
        question: a string -> a string; a list of strings -> a list (images then: a list of as many, or one
          image for all; prompts are left-padded to a common length, a multiple of 8).
        patch: an `EditPatch` / patch dict applied to every question, or a `PatchBatch` of as many edits as
          questions (question i answered under edit i, vmapped); an in-context edit (IKE's `ContextPatch`, or a
          `ContextBatch` of one per question) puts its context between the image and the question; a SERAC edit
          (`MemoryPatch`, or a `MemoryBatch` of one per question) routes generation through its memory: each token
          is the argmax of SERAC's routed output (classifier on the text so far, counterfactual, mixture) from a
          full forward of the prompt and the tokens so far (no KV cache: the classifier re-reads the text).
        task: "vqa" (the prompt is `VQA_TEMPLATE.format(question)`) or "caption" (the question is the caption's
          prefix, as E-IC's "a photo of"); `template` overrides ("{}" for the raw text).
        max_new_tokens: generation budget (default 10 for VQA, 20 for captions).
        max_words: keep this many words of the answer (default: the model's `answer_words[task]`, set for the
          world model, whose answers have a fixed length and which never emits an end-of-sequence token; else no
          limit: the answer ends at the end-of-sequence token, or the first line break).
        """
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        if not questions:
            return []
        n = len(questions)
        images = [image] if single else _as_list(image, n, "images")
        max_new = int(max_new_tokens or DEFAULT_NEW_TOKENS.get(task, 10))
        words = self.answer_words.get(task) if max_words is None else max_words
        contexts = self._contexts(patch, n)
        if contexts is not None:
            patch = None
        memories = self._memories(patch, n)
        if memories is not None:
            patch = None
        per_edit = isinstance(patch, PatchBatch)
        if per_edit and len(patch) != n:
            raise ValueError(f"a PatchBatch of {len(patch)} edits for {n} questions: pass one edit per question")
        deltas = self.check_patch(patch) or {}
        out = [None] * n
        for has_image in (True, False):
            rows = [i for i in range(n) if (images[i] is not None) == has_image]
            if not rows:
                continue
            ids = [self.prompt_ids(questions[i], has_image, task, template, () if contexts is None else
                                   contexts[i].ids) for i in rows]
            if memories is not None:
                tokens = self._routed_rows(ids, [images[i] for i in rows] if has_image else None,
                                           [memories[i] for i in rows], max_new)
                for j, i in enumerate(rows):
                    out[i] = self.decode_answer(tokens[j], words)
                continue
            row_deltas = take(deltas, np.asarray(rows)) if per_edit else deltas
            tokens = self._generate_rows(ids, [images[i] for i in rows] if has_image else None, row_deltas,
                                         per_edit, max_new)
            for j, i in enumerate(rows):
                out[i] = self.decode_answer(tokens[j], words)
        return out[0] if single else out

    def _value_edits(self, patch, n: int, one: type, batch: type) -> list | None:
        """A value edit (`one`: `ContextPatch`, `MemoryPatch`) as one per question, from one edit or a `batch` of
        n; None for any other patch. Each must be made for this model (IKE's ids are its tokenizer's tokens;
        SERAC's memory keys and contexts come from its weights and tokenizer)."""
        if isinstance(patch, one):
            edits = [patch] * n
        elif isinstance(patch, batch):
            if len(patch) != n:
                raise ValueError(f"a {batch.__name__} of {len(patch)} edits for {n} questions: pass one edit per "
                                 "question")
            edits = list(patch)
        else:
            return None
        for e in edits:
            if e.model is not None and e.model != self.fingerprint:
                raise PatchMismatch(f"this {e.editor} edit was made for model {e.model_name!r} (fingerprint "
                                    f"{e.model[:16]}), not for model {self.name!r} (fingerprint "
                                    f"{self.fingerprint[:16]}): it holds the other model's tokens and outputs")
        return edits

    def _contexts(self, patch, n: int) -> list[ContextPatch] | None:
        return self._value_edits(patch, n, ContextPatch, ContextBatch)

    def _memories(self, patch, n: int) -> list[MemoryPatch] | None:
        memories = self._value_edits(patch, n, MemoryPatch, MemoryBatch)
        if memories and any(m.router is not memories[0].router for m in memories):
            raise ValueError("these SERAC edits come from different editors: answer them separately")
        return memories

    def _routed_rows(self, ids: list[list[int]], images, memories: list[MemoryPatch], max_new: int) -> np.ndarray:
        """Greedy tokens `[n, max_new]` through SERAC's routed forward, one memory per row (vmapped)."""
        text = self.config.text
        longest = max(len(r) for r in ids)
        if longest + max_new > text.max_position_embeddings:
            raise ValueError(f"a prompt of {longest} tokens leaves no room for {max_new} new tokens in the model's "
                             f"{text.max_position_embeddings} positions")
        length = -(-longest // PROMPT_MULTIPLE) * PROMPT_MULTIPLE + max_new
        n, b = len(ids), _pow2(len(ids))
        pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else text.pad_token_id or 0)
        input_ids = np.full((b, length), pad, np.int32)
        mask = np.zeros((b, length), np.int32)
        for i in range(b):
            r = ids[min(i, n - 1)]
            input_ids[i, : len(r)], mask[i, : len(r)] = r, 1  # right padding: the routed forward's layout
        lengths = mask.sum(-1).astype(np.int32)
        fns, net = memories[0].router
        memory = jax.tree.map(lambda *m: jnp.stack(m), *(memories[min(i, n - 1)].memory for i in range(b)))
        pixels = None
        if images is not None:
            pixels = np.stack([self.pixels(images[min(i, n - 1)]) for i in range(b)])
        fn = self._routed_fn(fns, pixels is not None, max_new)
        return np.asarray(fn(self.params, net, memory, input_ids, mask, lengths, pixels))[:n]

    def _routed_fn(self, fns, has_image: bool, max_new: int):
        """The jitted, row-vmapped greedy loop of `_routed_rows` for one editor's `fns`."""
        key = ("routed", id(fns), has_image, max_new)
        if key not in self._generate_each:

            def one(params, net, memory, ids, mask, n, pixels):
                patch, labels = with_memory(net, memory), jnp.full_like(ids, -100)
                # The image as the editor's forward takes it (cached features: encoded here, once, compiled).
                image = pixels if pixels is None or fns.uses_pixels else fns.encode(params, {}, pixels[None])[0]

                # Generated tokens are the answer (labels set), so a classifier that reads the prompt alone
                # (`scope_query="prompt"`) routes every step on the question, as it was trained.
                def step(t, carry):
                    ids, mask, labels, out = carry
                    logits = fns.logits(params, patch, Seq(ids, mask, labels), image)
                    token = jnp.argmax(logits[n + t - 1]).astype(ids.dtype)
                    return (ids.at[n + t].set(token), mask.at[n + t].set(1), labels.at[n + t].set(token),
                            out.at[t].set(token))

                init = (ids, mask, labels, jnp.zeros((max_new,), ids.dtype))
                return jax.lax.fori_loop(0, max_new, step, init)[3]

            axes = (None, None, 0, 0, 0, 0, 0 if has_image else None)
            self._generate_each[key] = (fns, jax.jit(jax.vmap(one, in_axes=axes)))  # fns kept: its id stays its own
        return self._generate_each[key][1]

    def _generate_rows(self, ids: list[list[int]], images, deltas, per_edit: bool, max_new: int) -> np.ndarray:
        text = self.config.text
        limit = text.max_position_embeddings - max_new
        longest = max(len(r) for r in ids)
        if longest > limit:
            raise ValueError(f"a prompt of {longest} tokens leaves no room for {max_new} new tokens in the model's "
                             f"{text.max_position_embeddings} positions")
        length = min(-(-longest // PROMPT_MULTIPLE) * PROMPT_MULTIPLE, limit)
        n, b = len(ids), _pow2(len(ids))  # rows padded to a power of two: few compiled batch sizes
        pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else text.pad_token_id or 0)
        input_ids = np.full((b, length), pad, np.int32)
        mask = np.zeros((b, length), np.int32)
        for i in range(b):
            r = ids[min(i, n - 1)]
            input_ids[i, length - len(r):] = r  # left padding
            mask[i, length - len(r):] = 1
        pixels = None
        if images is not None:
            pixels = np.stack([self.pixels(im) for im in images])
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], b - n, axis=0)])
        if per_edit:
            deltas = pad_batch(deltas, b) if deltas else deltas
            fn = self._each_fn(pixels is not None, max_new, pad)
            return np.asarray(fn(self.params, pixels, input_ids, mask, deltas))[:n]
        return super().generate(pixels, input_ids, mask, max_new_tokens=max_new, patch=deltas, pad_token_id=pad)[:n]

    def _each_fn(self, has_pixels: bool, max_new: int, pad: int):
        """Generation with one patch per row: `vmap` over (pixels, ids, mask, patch) of one-row generation."""
        key = (has_pixels, max_new, pad)
        if key not in self._generate_each:
            text = self.config.text
            eos = None if text.eos_token_id is None else int(text.eos_token_id)
            shell = self._shell

            def one(params, px, ids, mask, patch):
                px = None if px is None else px[None]
                return shell._generate_impl(params, px, ids[None], mask[None], patch, max_new, eos, pad)[0]

            axes = (None, 0 if has_pixels else None, 0, 0, 0)
            self._generate_each[key] = jax.jit(jax.vmap(one, in_axes=axes))
        return self._generate_each[key]


class MiniGPT4ApiModel(Model, MiniGPT4Model):
    """`Model` over a `MiniGPT4Model` (EasyEdit's MiniGPT-4): the benchmark's ids wrap the image slots in
    `'###Human: <Img>'` / `'</Img> '` (`case_config`), and generation takes LLaMA's positions (the module's)."""

    family = MiniGPT4Model


API_CLASSES = {Blip2Model: Model, MiniGPT4Model: MiniGPT4ApiModel}  # the model classes this API answers for


def from_pretrained(path: str | os.PathLike = WORLD, dtype: Any = jnp.float32, image_size: int | None = None,
                    verify: bool | None = None, tokenizer=None) -> Model:
    """A `Model`: "world" (the shipped world model), or a converted or Hugging Face BLIP-2 directory, or a
    converted MiniGPT-4 one (`python -m mmedit_jax.convert minigpt4`; a `MiniGPT4ApiModel`)
    (`loading.from_pretrained`: `dtype`, `image_size`, `verify` as there).

    tokenizer: a directory or a tokenizer object; default the tokenizer files beside the model (loaded on
    first use). The world model's answers are cut to its fixed answer lengths (`WORLD_ANSWER_WORDS`).
    """
    path = os.fspath(path)
    world = path == WORLD
    directory = os.path.join(assets.ASSETS, WORLD_DIR) if world else path
    if world and not os.path.isdir(directory):
        raise FileNotFoundError(f"the built-in world model {path!r} is missing ({directory}); rebuild it with "
                                "`python -m mmedit_jax.world.build --install`")
    base = loading.from_pretrained(directory, dtype=dtype, image_size=image_size, verify=verify)
    api_class = API_CLASSES.get(type(base))
    if api_class is None:  # question answering and editing by image and text need an image-text model
        raise ValueError(f"{path} holds a {base.config.model_type} model: mmedit_jax.from_pretrained serves BLIP-2 "
                         f"and MiniGPT-4 models; load it with mmedit_jax.loading.from_pretrained "
                         f"(-> {type(base).__name__})")
    tok_obj = None if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    tok_dir = os.fspath(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else directory
    model = api_class.wrap(base, name=path, source_dir=directory, tokenizer=tok_obj, tokenizer_dir=tok_dir)
    if model.is_world:
        model.answer_words = dict(WORLD_ANSWER_WORDS)
    return model


def load_patch(path: str | os.PathLike, model: Model | None = None):
    """`edit_patch.load_patch`; with `model`, also checked against it now (`Model.check_patch`)."""
    patch = _load_patch_file(path)
    if model is not None:
        model.check_patch(patch)
    return patch


# --------------------------------------------------------------------------------------------------
# Editors.


class BoundEditor:
    """One of the project's editors (`editor`, an `editors.base.Editor`) bound to one `Model`.

    `edit(image, prompt, target)` -> an `EditPatch`; `edit_batch(images, prompts, targets)` -> a `PatchBatch` of
    E independent edits (each computed against the unedited model), one compiled call. Neither changes the
    model. `compiles` counts the programs compiled so far.
    """

    def __init__(self, editor, model: Model, task: str = "vqa", source: str | None = None):
        self.editor = editor
        self.model = model
        self.task = task
        self.source = source
        self.buckets = DEFAULT_BUCKETS
        self.log: list[str] = []  # what the editor reported (IKE: its bank, and the demos each edit kept)
        self._edit_fn = jax.jit(self._edit_cases)

    @property
    def name(self) -> str:
        return self.editor.name

    def __repr__(self) -> str:
        return f"BoundEditor({self.name!r}, model={self.model.name!r}, task={self.task!r}, source={self.source!r})"

    @property
    def compiles(self) -> int:
        """Programs compiled so far by `edit` / `edit_batch` (one per padded shape)."""
        return self._edit_fn._cache_size()

    def _edit_cases(self, editor_params, params, cases):
        fns = self.editor.fns
        if not fns.uses_pixels:  # the editor runs cached image embeddings: encode the edit image here, once
            embeds = fns.encode(params, {}, cases.images["edit"])
            cases = cases.replace(images={k: embeds for k in cases.images})
        patches = jax.vmap(lambda c: self.editor.edit(editor_params, params, c, {}))(cases)
        # SERAC's patch carries the editor's networks beside the memory: keep the memory only (one copy of the
        # networks stays with the editor, not E of them).
        return {"memory": patches["memory"]} if "memory" in patches else patches

    def cases(self, images: Sequence, prompts: Sequence[str], targets: Sequence[str],
              preds: Sequence[str] | None = None):
        """The benchmark's `Case`s (leading `[E]`, pixels as images) for these edits: an MMEdit record per edit
        with `rephrase` = the prompt, every image = the edit's image, `loc` = the prompt and the target (only
        their shapes matter to an edit), and KE's `cond` = "{pred} >> {target} || {prompt}"; tokens padded to
        `DEFAULT_BUCKETS`; the editor's own per-case inputs added (`Editor.prepare_cases`: IKE's contexts)."""
        cases, records = self._cases_and_records(images, prompts, targets, preds)
        return self.editor.prepare_cases(cases, records)

    def _cases_and_records(self, images, prompts, targets, preds):
        model = self.model
        n = len(prompts)
        if not (len(images) == len(targets) == n) or (preds is not None and len(preds) != n):
            raise ValueError(f"edit_batch: {len(images)} images, {n} prompts, {len(targets)} targets"
                             + ("" if preds is None else f", {len(preds)} preds") + ": give one of each per edit")
        if n == 0:
            raise ValueError("edit_batch: no edits")
        pixels, records = {}, []
        for i in range(n):
            if images[i] is None:
                raise ValueError(f"edit {i}: an edit needs an image (E-VQA and E-IC edits are about one)")
            if not str(targets[i]).strip():
                raise ValueError(f"edit {i}: the target is empty")
            key = f"edit{i}"
            pixels[key] = model.pixels(images[i])
            p, t = str(prompts[i]), str(targets[i]).strip()
            records.append(MMEditRecord(index=i, src=p, pred="" if preds is None else str(preds[i]), alt=t,
                                        rephrase=p, image=key, image_rephrase=key, loc=p, loc_ans=t, m_loc=key,
                                        m_loc_q=p, m_loc_a=t))
        cfg = model.case_config(self.task, self.buckets)
        table = ImageTable(pixels.__getitem__)
        batch = build_edit_batch(records, model.tokenizer, table, cfg)
        used = int(batch.edit.attention_mask.sum(-1).max())
        if used > model.config.text.max_position_embeddings:
            raise ValueError(f"an edit input has {used} tokens, more than the model's "
                             f"{model.config.text.max_position_embeddings} positions")
        cases = make_cases(batch, table.stack(), with_answer_rows=False)
        # The answer positions, as the benchmark's edit input carries them, in a width padded to a multiple of 8.
        need = int((batch.edit.labels[:, 1:] != -100).sum(-1).max())
        rows = answer_rows(batch.edit.labels, width=min(-(-need // 8) * 8, batch.edit.labels.shape[-1]))
        return cases.replace(edit=cases.edit.replace(answer_rows=rows)), records

    def edit_batch(self, images, prompts: Sequence[str], targets: Sequence[str],
                   preds: Sequence[str] | None = None) -> PatchBatch | ContextBatch | MemoryBatch:
        """E independent edits in one compiled call -> a `PatchBatch` (`batch[i]` is edit i's `EditPatch`); for
        IKE a `ContextBatch` (edit i's demonstrations, retrieved from the bank, as a `ContextPatch`); for SERAC a
        `MemoryBatch` (edit i's own memory, as a `MemoryPatch`).

        `preds`: the model's current answers, for KE's condition "{pred} >> {target} || {prompt}"; default
        (KE only) `model.answer(images, prompts)`. E is padded to a power of two, and token lengths to
        `DEFAULT_BUCKETS`, so the number of compiled programs stays small."""
        prompts, targets = [str(p) for p in prompts], [str(t) for t in targets]
        images = _as_list(images, len(prompts), "images")
        if preds is None and self.name == "ke":
            preds = self.model.answer(images, prompts, task=self.task)
        cases = self.cases(images, prompts, targets, preds)
        n = len(prompts)
        cases = pad_batch(cases, _pow2(n))
        stacked = self._edit_fn(self.editor.editor_params, self.model.params, cases)
        if _pow2(n) != n:
            stacked = jax.tree.map(lambda a: a[:n], stacked)
        if "memory" in stacked:  # SERAC: the edit is a memory of one slot, read by the editor's networks
            router = (self.editor.fns, self.editor.editor_params)
            fp = self.model.fingerprint
            return MemoryBatch(MemoryPatch(jax.tree.map(lambda a, i=i: a[i], stacked["memory"]), router,
                                           editor=self.name, model=fp, model_name=self.model.name, edits=((p, t),))
                               for i, (p, t) in enumerate(zip(prompts, targets)))
        if "context_ids" in stacked:  # IKE: the edit is its context, kept as text and ids
            ids, mask = np.asarray(stacked["context_ids"]), np.asarray(stacked["context_mask"]) > 0
            tok, fp = self.model.tokenizer, self.model.fingerprint
            return ContextBatch(ContextPatch(tok.decode(row[m].tolist()), tuple(int(i) for i in row[m]),
                                             editor=self.name, model=fp, model_name=self.model.name,
                                             edits=((p, t),))
                                for row, m, p, t in zip(ids, mask, prompts, targets))
        return PatchBatch(stacked, editor=self.name, model=self.model.fingerprint, model_name=self.model.name,
                          edits=tuple(zip(prompts, targets)))

    def edit(self, image, prompt: str, target: str, *,
             pred: str | None = None) -> EditPatch | ContextPatch | MemoryPatch:
        """One edit: the patch that makes the model answer `target` to `prompt` about `image` (a value; the
        model is not changed). `pred` as in `edit_batch`."""
        return self.edit_batch([image], [prompt], [target], None if pred is None else [pred])[0]


def _load_ike(model: Model, hparams, task: str, feature_cache: bool, bank, image_root, sentence_encoder):
    if bank is None:
        if not model.is_world:
            raise ValueError("ike needs a demonstration bank: bank= an MMEdit training file (or its records); the "
                             "world model's default is the world's train split")
        bank = pipeline.world_train_data(task)
    notes: list[str] = []
    records = bank
    if isinstance(bank, (str, os.PathLike)):
        root = image_root or os.path.dirname(os.path.abspath(bank))  # the world's images sit beside its files
        records = pipeline.load_split(os.fspath(bank), task, root, log=notes.append).records
    # Room for the answer: generation adds up to DEFAULT_NEW_TOKENS[task] positions after the question.
    limit = model.config.text.max_position_embeddings - DEFAULT_NEW_TOKENS.get(task, 10)
    editor = pipeline.build_ike(model, model.tokenizer, task, list(records), dict(hparams or {}), sentence_encoder,
                                feature_cache, log=notes.append, max_positions=limit)
    bound = BoundEditor(editor, model, task, None if not isinstance(bank, (str, os.PathLike)) else os.fspath(bank))
    bound.log = notes
    return bound


def shipped_editor(name: str, task: str = "vqa") -> str | None:
    """The shipped world editor's directory for `name` and `task` (`assets/world/<name>_<task>`), or None."""
    path = os.path.join(assets.ASSETS, f"{name}_{task}")
    return path if os.path.isdir(path) else None


def _check_editor_fits(path: str, model: Model) -> None:
    meta = read_spec(path)
    for site, shape in zip(meta.get("sites", []), meta.get("shapes", [])):
        p, idx = resolve_site(site, model.stacks)
        try:
            leaf = get_path(model.params, p, site)
        except KeyError:
            raise ValueError(f"the editor at {path} edits {site!r}, which model {model.name!r} does not have: it "
                             "was trained for another model") from None
        have = tuple(leaf.shape if idx is None else leaf.shape[1:])
        if (idx is not None and idx >= leaf.shape[0]) or have != tuple(shape):
            raise ValueError(f"the editor at {path} edits {site!r} as a {tuple(shape)} kernel; model "
                             f"{model.name!r} has {have if idx is None or idx < leaf.shape[0] else 'no such layer'} "
                             "there: it was trained for another model")


def load_editor(name: str, model: Model, path: str | os.PathLike | None = None, hparams=None, *,
                task: str = "vqa", feature_cache: bool = True, bank=None, image_root: str | None = None,
                sentence_encoder: str | None = None) -> BoundEditor:
    """One of the project's editors (`pipeline.EDITORS`: "ft-l", "ft-v", "mend", "ke", "serac", "ike") bound to
    `model`.

    path: a trained MEND / KE / SERAC directory (`python -m mmedit_jax.train`, or `convert mend-easyedit`); default, for
      the world model, the shipped editor (`assets/world/<name>_<task>`). FT-L / FT-V / IKE need none.
    hparams: a dict in EasyEdit's keys, or a YAML file (`editors/hparams.py`); FT's `num_steps`, `edit_lr`,
      `inner_params`, IKE's `k`, ...
    bank, image_root, sentence_encoder (IKE): the demonstration bank, an MMEdit training file (or its records;
      default for the world model: the world's train split), and an all-MiniLM-L6-v2 directory (default: the
      TF-IDF stand-in, `editors.ike.tfidf_embedder`). Contexts leave room for the answer: they fit the model's
      positions less the longest question and `DEFAULT_NEW_TOKENS[task]` generated tokens; demos that do not fit
      are dropped, least similar first (`BoundEditor.log` says how many).
    """
    if not isinstance(model, Model):
        raise TypeError("load_editor takes the model mmedit_jax.from_pretrained returns (it needs the tokenizer); "
                        f"got {type(model).__name__} (wrap a Blip2Model with mmedit_jax.api.Model.wrap(m, "
                        "tokenizer=...))")
    if name not in pipeline.EDITORS:
        raise ValueError(f"unknown editor {name!r}: choose from {', '.join(pipeline.EDITORS)}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(hparams, (str, os.PathLike)):
        hparams = pipeline.read_hparams(os.fspath(hparams))
    if name == "ike":
        return _load_ike(model, hparams, task, feature_cache, bank, image_root, sentence_encoder)
    if name in ("mend", "ke", "serac"):
        if path is None:
            path = shipped_editor(name, task) if model.is_world else None
            if path is None:
                shipped = sorted(d for d in os.listdir(assets.ASSETS) if os.path.isdir(os.path.join(assets.ASSETS, d))
                                 and d != WORLD_DIR)
                raise ValueError(
                    f"{name} needs a trained editor: pass path=DIR (one trained for this model by `python -m "
                    "mmedit_jax.train`" + (", or converted with `python -m mmedit_jax.convert mend-easyedit`"
                                           if name == "mend" else "")
                    + f"); shipped ones exist only for the world model ({', '.join(shipped)})")
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no editor directory at {path}")
        _check_editor_fits(path, model)
    editor = pipeline.build_editor(name, model, hparams, None if path is None else os.fspath(path), feature_cache)
    return BoundEditor(editor, model, task, None if path is None else os.fspath(path))
