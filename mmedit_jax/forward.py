"""The forward of one example, as editors, scoring and training see every model: `ModelFns`, and BLIP-2's.

A `ModelFns` runs ONE example (no batch axis; callers vmap), with an optional patch (`patch.py`) and taps
(`models/layers.py`). It takes its images as it says (`uses_pixels`): cached image embeddings `[nq, E]`, or
pixels `[3, H, W]` for a model whose vision side may be edited (FT-V), and builds the matching per-run table
once (`image_table`), so the pixels-or-embeddings choice is made in one place. `prefix` / `resume` split the
language model at a layer, for the frozen-prefix cache (only with cached embeddings: `supports_prefix`).
`forward_group` runs several inputs showing one image, so that a model whose inputs share a leading block runs it
once (IKE's context, through `Blip2Fns.forward_shared`'s KV cache). `teacher_forced` (`teacher_forced_group` for
such a group) is the one path from an input to the logits and labels that losses and accuracies take.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax.case import Seq, answer_rows_of
from mmedit_jax.sites import touches_vision


class ModelFns(Protocol):
    """Single-example forward functions of one model family (shapes without the batch axis)."""

    @property
    def uses_pixels(self) -> bool:
        """Images enter as pixels `[3, H, W]` (True) or cached embeddings `[nq, E]` (False)."""
        ...

    @property
    def supports_prefix(self) -> bool:
        """Whether `prefix` / `resume` are available (they need cached embeddings)."""
        ...

    def image_table(self, params, pixels: np.ndarray) -> np.ndarray:
        """`[N, 3, H, W]` pixels of every distinct image -> what `forward` takes per image, `[N, ...]`."""
        ...

    def encode(self, params, patch, pixel_values: jax.Array) -> jax.Array:
        """`[B, 3, H, W]` pixels -> the cached image features `forward` takes, `[B, nq, E]`."""
        ...

    def forward(self, params, patch, seq: Seq, image, taps=None, rows=None):
        """-> `(logits [L, V] (or [R, V] at `rows`), captured {site: layer input})`."""
        ...

    def forward_group(self, params, patch, seqs: Sequence[Seq], image, rows: Sequence | None = None) -> list:
        """`forward`'s logits of several inputs showing the same `image` (`rows[i]` or None for each): a model
        whose inputs share a leading block may run it once (IKE: `[image slots][context]`); else one forward each."""
        ...

    def logits(self, params, patch, seq: Seq, image) -> jax.Array:
        """`forward`'s logits `[L, V]`."""
        ...

    def prefix(self, params, seq: Seq, image, stop: int) -> jax.Array:
        """The unedited language model's hidden states entering layer `stop`, `[L, D]`."""
        ...

    def prefix_group(self, params, seqs: Sequence[Seq], images: Sequence, stop: int) -> list:
        """`prefix` of several inputs (all showing an image, or none) -> their hidden states `[L_i, D]`."""
        ...

    def resume(self, params, patch, seq: Seq, h: jax.Array, start: int, taps=None, rows=None):
        """`forward` from `prefix(..., stop=start)`'s hidden states `h`."""
        ...

    def resume_logits(self, params, patch, seq: Seq, h: jax.Array, start: int) -> jax.Array:
        ...

    def resume_group(self, params, patch, seqs: Sequence[Seq], hs: Sequence, start: int,
                     rows: Sequence | None = None) -> list:
        """`resume`'s logits of several inputs (`rows[i]` `[R]` for every input, or None)."""
        ...


@dataclasses.dataclass(frozen=True)
class Blip2Fns:
    """`ModelFns` of a module with `Blip2`'s methods (`encode_image`, `__call__`, `text_prefix`, `text_resume`):
    BLIP-2 (`models/blip2.py`) and MiniGPT-4 (`models/minigpt4.py`), whose image slots sit in `input_ids`."""

    module: nn.Module
    pixels: bool = False
    stack_inputs: bool = True  # False: `prefix_group` / `resume_group` run one call per input (the A/B benchmark)

    @property
    def uses_pixels(self) -> bool:
        return self.pixels

    @property
    def supports_prefix(self) -> bool:
        return not self.pixels

    @functools.cached_property
    def _encode_unpatched(self):
        """`encode` without a patch, jitted once per `Blip2Fns` (`image_table` runs per split and per round)."""
        return jax.jit(lambda p, x: self.encode(p, {}, x))

    def encode(self, params, patch, pixel_values: jax.Array) -> jax.Array:
        """`[B, 3, H, W]` -> projected query outputs `[B, nq, E]`."""
        nhwc = jnp.transpose(pixel_values, (0, 2, 3, 1))
        embeds, _ = self.module.apply({"params": params}, nhwc, patch=patch, method="encode_image")
        return embeds

    def image_table(self, params, pixels: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """`pixels` as they are when this model runs pixels, else every image's projected query outputs
        `[N, nq, E]`, computed once (the feature cache), `batch_size` images per call (the last batch padded, so
        it compiles once)."""
        bad = ~np.isfinite(pixels).reshape(len(pixels), -1).all(axis=1)
        if bad.any():
            raise ValueError(f"images {np.nonzero(bad)[0][:10].tolist()} of the table hold NaN or inf pixels")
        if self.pixels:
            return pixels
        encode = self._encode_unpatched
        out = []
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start : start + batch_size]
            n = len(chunk)
            if n < batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
            out.append(np.asarray(encode(params, chunk))[:n])
        table = np.concatenate(out) if out else np.zeros((0,), np.float32)
        bad = ~np.isfinite(table).reshape(len(table), -1).all(axis=1)
        if bad.any():
            raise ValueError(f"the image features of images {np.nonzero(bad)[0][:10].tolist()} are not finite: the "
                             "model's vision weights may be damaged (verify the checkpoint)")
        return table

    def forward(self, params, patch, seq: Seq, image, taps=None, rows=None, packed: bool = False):
        """One example: `seq` fields `[L]`, `image` `[nq, E]` / `[3, H, W]` / None -> (logits `[L, V]`, captured).

        `captured` maps each tapped site to its layer input without the batch axis. `rows` `[R]`: logits at those
        positions only, `[R, V]` (the last language-model layer and the head run R rows). `packed`: position ids
        count real tokens only (`generation_positions`), as if the padding inside `seq` were not there (OPT's
        always do; LLaMA's otherwise count every slot).
        """
        kw = {} if rows is None else {"rows": rows[None]}
        if packed:
            kw["positions"] = self.module.apply({"params": params}, seq.attention_mask[None],
                                                method="generation_positions")
        if image is not None and self.pixels:
            kw["pixel_values"] = jnp.transpose(image[None], (0, 2, 3, 1))  # the table holds [3, H, W]
        elif image is not None:
            kw["image_embeds"] = image[None]
        logits, captured = self.module.apply(
            {"params": params}, seq.input_ids[None], seq.attention_mask[None], patch=patch, taps=taps, **kw
        )
        return logits[0], {k: v[0] for k, v in captured.items()}

    def logits(self, params, patch, seq: Seq, image) -> jax.Array:
        return self.forward(params, patch, seq, image)[0]

    def forward_group(self, params, patch, seqs: Sequence[Seq], image, rows: Sequence | None = None) -> list:
        """One forward per input (their shared leading positions are image slots and a word or two: not worth a
        second program)."""
        return forward_each(self, params, patch, seqs, image, rows)

    def forward_shared(self, params, head: Seq, tails: Sequence[Seq], image, rows: Sequence | None = None) -> list:
        """The unpatched logits of inputs `[head][tail_i]` that begin with the same `head` `[P]` (ids, mask and
        `image`, whose slots lie in the head): the head runs once and its keys and values (a KV cache of
        `P + max Lt` slots) serve every tail, which runs its `Lt_i` positions only.

        -> per input, logits `[P + Lt_i, V]`, or with `rows[i]` `[R]` (positions in the joined input) `[R, V]`:
        rows inside the head get zero logits there (their logits are not computed; scored rows lie in the tails).
        Positions and masks are the joined input's, so the logits are `forward`'s on the joined input.
        """
        apply = functools.partial(self.module.apply, {"params": params})
        feats = None
        if image is not None:
            feats = self.encode(params, {}, image[None]) if self.pixels else image[None]
        p = head.input_ids.shape[-1]
        slots = p + max(t.input_ids.shape[-1] for t in tails)
        shape = apply(1, slots, method="cache_shape")
        cache = (jnp.zeros(shape, self.module.dtype), jnp.zeros(shape, self.module.dtype))
        head_mask = head.attention_mask.astype(jnp.int32)
        keys = jnp.zeros((1, slots), jnp.int32).at[0, :p].set(head_mask)
        embeds = apply(head.input_ids[None], feats, method="embed_inputs")
        head_logits, cache = apply(embeds, apply(head_mask[None], method="generation_positions"), cache, 0, keys,
                                   method="decode")
        rows = [None] * len(tails) if rows is None else rows
        out = []
        for tail, r in zip(tails, rows):
            lt = tail.input_ids.shape[-1]
            joined = jnp.concatenate([head_mask, tail.attention_mask.astype(jnp.int32)])
            positions = apply(joined[None], method="generation_positions")[:, p:]
            logits, _ = apply(apply(tail.input_ids[None], None, method="embed_inputs"), positions, cache, p,
                              keys.at[0, p : p + lt].set(joined[p:]), method="decode")
            if r is None:
                out.append(jnp.concatenate([head_logits[0], logits[0]]))
            else:
                at = logits[0][jnp.clip(r - p, 0, lt - 1)]
                out.append(jnp.where((r >= p)[:, None], at, jnp.zeros_like(at)))
        return out

    def prefix(self, params, seq: Seq, image, stop: int) -> jax.Array:
        """The unedited language model up to layer `stop` (excluded): -> hidden states `[L, D]`.

        Only with cached image embeddings `[nq, E]` (or None): a model that runs pixels may have the vision side
        edited, which the language-model prefix cannot see.
        """
        if self.pixels:
            raise ValueError("prefix() takes cached image embeddings; this Blip2Fns runs pixels")
        image = None if image is None else image[None]
        h = self.module.apply({"params": params}, seq.input_ids[None], seq.attention_mask[None], image, stop,
                              method="text_prefix")
        return h[0]

    def prefix_group(self, params, seqs: Sequence[Seq], images: Sequence, stop: int) -> list:
        """`prefix` of several inputs in one call: right-padded to the longest (masked, so causal attention leaves
        every real position as it was) and run as one batch, so each of the language model's matmuls sees all
        their rows at once. On a CPU a GEMM of ~50 rows runs at a third of the rate of one of ~200
        (`benchmarks/matmul_shapes.json`), and one case's inputs are ~50 tokens each.

        `images`: one `[nq, E]` embedding per input, or all None (text-only inputs). -> `[L_i, D]` per input.
        """
        if len(seqs) == 1 or not self.stack_inputs:
            return [self.prefix(params, s, im, stop) for s, im in zip(seqs, images)]
        if self.pixels:
            raise ValueError("prefix_group() takes cached image embeddings; this Blip2Fns runs pixels")
        if len({im is None for im in images}) != 1:
            raise ValueError("prefix_group(): every input shows an image, or none does")
        # Padded slots repeat the last id (never an image token: an input ends in text) under mask 0.
        ids = _stack_right_padded([s.input_ids for s in seqs], mode="edge")
        mask = _stack_right_padded([s.attention_mask for s in seqs])
        embeds = None if images[0] is None else jnp.stack(images)
        h = self.module.apply({"params": params}, ids, mask, embeds, stop, method="text_prefix")
        return [h[i, : s.input_ids.shape[-1]] for i, s in enumerate(seqs)]

    def resume(self, params, patch, seq: Seq, h: jax.Array, start: int, taps=None, rows=None):
        """Continues `prefix(..., stop=start)`'s hidden states `h [L, D]` through layers `start ..` (patched) and
        the head: -> `(logits [L, V] (or [R, V] at `rows`), captured)`, as `forward` when `patch` and `taps`
        leave the layers below `start` alone."""
        logits, captured = self.module.apply({"params": params}, h[None], seq.attention_mask[None], start, patch,
                                             taps, None if rows is None else rows[None], method="text_resume")
        return logits[0], {k: v[0] for k, v in captured.items()}

    def resume_logits(self, params, patch, seq: Seq, h: jax.Array, start: int) -> jax.Array:
        """`resume`'s logits `[L, V]`."""
        return self.resume(params, patch, seq, h, start)[0]

    def resume_group(self, params, patch, seqs: Sequence[Seq], hs: Sequence, start: int,
                     rows: Sequence | None = None) -> list:
        """`resume` of several inputs under one `patch` as one padded batch (as `prefix_group`, whose hidden
        states `hs` `[L_i, D]` it continues). `rows`: `[R_i]` per input (padded with position 0, cut off after),
        or None. -> logits `[R_i, V]` (or `[L_i, V]`) per input."""
        if len(seqs) == 1 or not self.stack_inputs:
            rows = [None] * len(seqs) if rows is None else rows
            return [self.resume(params, patch, s, h, start, rows=r)[0] for s, h, r in zip(seqs, hs, rows)]
        counts = [len(x) for x in (hs if rows is None else rows)]  # each input's output rows
        mask = _stack_right_padded([s.attention_mask for s in seqs])
        stacked_rows = None if rows is None else _stack_right_padded(list(rows))
        logits, _ = self.module.apply({"params": params}, _stack_right_padded(list(hs)), mask, start, patch, None,
                                      stacked_rows, method="text_resume")
        return [logits[i, :n] for i, n in enumerate(counts)]


@dataclasses.dataclass(frozen=True)
class RoutedFns:
    """Base of a `ModelFns` whose patch is not a weight change but something `forward` routes the base model
    through (SERAC's memory, IKE's context): images as `base` takes them, no frozen-prefix split. Subclasses
    define `forward`; `{}` as the patch must give `base` itself."""

    base: ModelFns

    @property
    def uses_pixels(self) -> bool:
        return self.base.uses_pixels

    @property
    def supports_prefix(self) -> bool:
        return False  # the patch acts below every layer (a context) or beside the stack (a memory)

    def image_table(self, params, pixels: np.ndarray, **kw) -> np.ndarray:
        return self.base.image_table(params, pixels, **kw)

    def encode(self, params, patch, pixel_values: jax.Array) -> jax.Array:
        return self.base.encode(params, patch, pixel_values)

    def logits(self, params, patch, seq: Seq, image) -> jax.Array:
        return self.forward(params, patch, seq, image)[0]

    def forward_group(self, params, patch, seqs: Sequence[Seq], image, rows: Sequence | None = None) -> list:
        return forward_each(self, params, patch, seqs, image, rows)

    def prefix(self, params, seq: Seq, image, stop: int):
        raise ValueError(f"{type(self).__name__} has no frozen-prefix split (supports_prefix is False)")

    def prefix_group(self, params, seqs: Sequence[Seq], images: Sequence, stop: int) -> list:
        raise ValueError(f"{type(self).__name__} has no frozen-prefix split (supports_prefix is False)")

    def resume(self, params, patch, seq: Seq, h, start: int, taps=None, rows=None):
        raise ValueError(f"{type(self).__name__} has no frozen-prefix split (supports_prefix is False)")

    def resume_logits(self, params, patch, seq: Seq, h, start: int):
        raise ValueError(f"{type(self).__name__} has no frozen-prefix split (supports_prefix is False)")

    def resume_group(self, params, patch, seqs: Sequence[Seq], hs: Sequence, start: int, rows=None) -> list:
        raise ValueError(f"{type(self).__name__} has no frozen-prefix split (supports_prefix is False)")


def fns_for(model, sites, feature_cache: bool = True) -> Blip2Fns:
    """The single-example forward an editor (or trainer) of `sites` runs on `model` (a `Blip2Model` or
    `MiniGPT4Model`): pixels when it edits the vision side or the feature cache is off, cached image embeddings
    otherwise. The one place that choice is made; the editor carries the result (`Editor.fns`) and everything
    downstream asks it."""
    return Blip2Fns(model.module, pixels=touches_vision(sites) or not feature_cache)


def _stack_right_padded(arrays: Sequence[jax.Array], mode: str = "constant") -> jax.Array:
    """`[L_i, ...]` arrays -> `[n, max L_i, ...]`, each padded at the end of its first axis (`jnp.pad`'s `mode`;
    "constant" pads zeros: mask 0, hidden state 0, row 0)."""
    width = max(a.shape[0] for a in arrays)
    return jnp.stack([jnp.pad(a, [(0, width - a.shape[0])] + [(0, 0)] * (a.ndim - 1), mode=mode) for a in arrays])


def forward_each(model: ModelFns, params, patch, seqs: Sequence[Seq], image, rows: Sequence | None = None) -> list:
    """`forward_group` as one `model.forward` per input: `[logits of seqs[i] (at rows[i])]`."""
    rows = [None] * len(seqs) if rows is None else rows
    return [model.forward(params, patch, s, image, rows=r)[0] for s, r in zip(seqs, rows)]


def _answer_layout(seq: Seq):
    """`(rows [R], targets [R + 1])` of an input with `answer_rows`: the rows whose logits are scored and the
    targets of `[their logits; a zero row]` (-100 first and at unused rows)."""
    rows, valid = answer_rows_of(seq)
    targets = jnp.where(valid, seq.labels[jnp.minimum(rows + 1, seq.labels.shape[0] - 1)], -100)
    return rows, jnp.concatenate([jnp.full((1,), -100, targets.dtype), targets])


def _with_zero_row(logits: jax.Array) -> jax.Array:
    return jnp.concatenate([logits, jnp.zeros_like(logits[:1])])


def teacher_forced(model: ModelFns, params, patch, seq: Seq, image, taps=None, prefix=None):
    """`(logits, labels, captured)` of one input, in the shifted layout `losses.answer_nll` and the accuracies
    take (`logits[t]` scored against `labels[t + 1]`).

    `prefix` `(h [L, D], k)`: the unedited hidden states of this input entering language-model layer k
    (`model.prefix`); the forward then runs layers k.. only (`patch` and `taps` must leave layers < k alone).

    Without `seq.answer_rows`: the whole forward, `logits [L, V]` and `seq.labels`. With it: the logits at the R
    answer rows only (the last layer and the head run R rows), laid out as `logits [R + 1, V]` (a zero row
    appended) and `labels [R + 1]` = (-100, the R targets, -100 at unused rows): the same loss and accuracies.
    A tapped linear of the last layer then records its input at the R rows (`captured[site]` `[R, in]`).
    """
    def run(rows=None):
        if prefix is None:
            return model.forward(params, patch, seq, image, taps=taps, rows=rows)
        return model.resume(params, patch, seq, prefix[0], prefix[1], taps=taps, rows=rows)

    if seq.answer_rows is None:
        logits, captured = run()
        return logits, seq.labels, captured
    rows, targets = _answer_layout(seq)
    logits, captured = run(rows)
    return _with_zero_row(logits), targets, captured


def teacher_forced_resumed(model: ModelFns, params, patch, seqs: Sequence[Seq], hs: Sequence, start: int) -> list:
    """`teacher_forced(..., prefix=(hs[i], start))`'s `(logits, labels)` of several inputs (no taps), those with
    `answer_rows` as one `resume_group` call and those without as another."""
    out = [None] * len(seqs)
    for with_rows in (True, False):
        idx = [i for i, s in enumerate(seqs) if (s.answer_rows is not None) == with_rows]
        if not idx:
            continue
        layouts = [_answer_layout(seqs[i]) for i in idx] if with_rows else None
        logits = model.resume_group(params, patch, [seqs[i] for i in idx], [hs[i] for i in idx], start,
                                    rows=None if layouts is None else [a[0] for a in layouts])
        for j, i in enumerate(idx):
            out[i] = (_with_zero_row(logits[j]), layouts[j][1]) if with_rows else (logits[j], seqs[i].labels)
    return out


def teacher_forced_group(model: ModelFns, params, patch, seqs: Sequence[Seq], image) -> list:
    """`teacher_forced`'s `(logits, labels)` of several inputs showing the same `image` (no taps, no prefix),
    through the model's `forward_group` (inputs that share a leading block may run it once)."""
    layouts = [None if s.answer_rows is None else _answer_layout(s) for s in seqs]
    logits = model.forward_group(params, patch, seqs, image, rows=[None if a is None else a[0] for a in layouts])
    return [(lg, s.labels) if a is None else (_with_zero_row(lg), a[1]) for lg, s, a in zip(logits, seqs, layouts)]
