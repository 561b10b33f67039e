"""IKE (in-context knowledge editing, Zheng et al. 2023) as EasyEdit's multimodal IKE runs it: the edit is a
demonstration context, not a weight change.

EasyEdit (`easyeditor/models/ike/{util,ike_main}.py`, `easyeditor/evaluate/multimodal_evaluate.py`):
  * bank: per training record three sentences (`bank_sentences`), "New Fact: {p} {t}\\nPrompt: {..}\\n\\n" with
    copy `{p} {t}`, update `{rephrase} {t}`, retain `{loc} {loc_ans}`, embedded and L2-normalised;
  * retrieval: the query in copy form (`demo(p, t, p, t)`), dot-product top-k on the normalised embeddings
    (`retrieve`, `lax.top_k`), most similar first (no reversal); then the edit's own copy demo is appended;
  * every post-edit input x is fed as `demos + "New Fact: {p} {t}\\nPrompt: {x}"` with the input's own image (text
    locality without one); pre-edit inputs carry no demos and no "New Fact" line.

Here the context `"".join(demos) + "New Fact: {p} {t}\\nPrompt: "` is assembled and tokenised on the host, once per
case (`attach_contexts`), and rides in the `Case` (`context_ids`, `context_mask` `[Lc]`, right-padded). `edit`
returns it as the "patch"; the editor's `fns` (`InContextFns`) runs the base model on `[image slots][context][text]`
when the patch holds a context and on the input alone when it is `{}`, returning logits at the input's own
positions, so labels, answer rows, scoring and the harness are those of every other editor. Padding inside the
sequence is harmless: padded keys are masked and position ids count real tokens only (`Blip2Fns.forward(...,
packed=True)`; LLaMA's default would count the context's padding slots). The edit input and its rephrase show the
same image and so share `[image slots][context]`: `forward_group` runs that block once per case and both texts from
its keys and values (a KV prefix); the other inputs show other images (or none), under which the context's keys
differ.

Choices and deviations (see the README section on IKE):
  * p = the edit input's prompt as this package builds it (`data.cases.case_inputs`: templated for E-VQA), t = alt;
    the queried inputs x are the five inputs exactly as every other editor scores them (so M-Loc's question is
    templated, as in the non-IKE path);
  * the seam: the context ends with "Prompt: " and the input's ids follow unchanged. The ids decode to EasyEdit's
    string exactly; a byte-level BPE tokenising the joined string would merge that space into the input's first
    word ("Ġ", "Question" here vs "ĠQuestion"), which keeps the input's ids (and its pre-edit labels) as they are;
  * positions are checked: a context that does not fit beside its case's longest input drops its least similar
    retrieved demos first (`truncate`, counted in the report) or raises; the own demo and the fact line never go;
  * locality compares each input position with the same position of the unedited run (the context positions are
    not scored); EasyEdit aligns the last `min(S_pre, S_post)` positions, the same text positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax.case import Case, Seq
from mmedit_jax.data.cases import case_inputs
from mmedit_jax.editors.base import Editor
from mmedit_jax.forward import ModelFns, RoutedFns, forward_each
from mmedit_jax.models.bert import TextEncoder, sentence_embedding

Embed = Callable[[Sequence[str]], np.ndarray]  # sentences -> [n, D] float32 (normalised by `retrieve`)


@dataclasses.dataclass(frozen=True)
class IKEConfig:
    """k: retrieved demos (EasyEdit `hparams/IKE/blip2.yaml`: 32; its HF-VLM yamls: 0, own demo only).
    own_demo: append the edit's own copy demo (EasyEdit's multimodal IKE does).
    truncate: drop the least similar demos of a context that does not fit the model's positions (counted and
      reported); False raises instead.
    pad_multiple: the context length Lc is the longest context rounded up to a multiple of this.
    """

    k: int = 32
    own_demo: bool = True
    truncate: bool = True
    pad_multiple: int = 8


def config_from_hparams(hparams: dict) -> IKEConfig:
    """`IKEConfig` from EasyEdit's keys (`k`) plus ours; other keys (sentence_model_name, ...) are ignored here."""
    keys = {f.name for f in dataclasses.fields(IKEConfig)}
    return IKEConfig(**{k: v for k, v in hparams.items() if k in keys})


# --------------------------------------------------------------------------------------------------
# Strings (EasyEdit's formats).


def demo(fact_prompt: str, fact_target: str, prompt: str, answer: str) -> str:
    """One demonstration: `"New Fact: {fact_prompt} {fact_target}\\nPrompt: {prompt} {answer}\\n\\n"`."""
    return f"New Fact: {fact_prompt} {fact_target}\nPrompt: {prompt} {answer}\n\n"


def fact_of(record, task: str) -> tuple[str, str]:
    """`(p, t)`: the edit input's prompt (templated for E-VQA, as `case_inputs`) and the new answer."""
    return case_inputs(record, task)["edit"].prompt, record.alt


def bank_sentences(records, task: str) -> list[str]:
    """EasyEdit's `encode_ike_facts_multimodal`: copy, update (rephrased prompt), retain (locality Q/A) per record."""
    out = []
    for r in records:
        p, t = fact_of(r, task)
        out += [demo(p, t, p, t), demo(p, t, case_inputs(r, task)["rephrase"].prompt, t), demo(p, t, r.loc, r.loc_ans)]
    return out


def query_sentence(record, task: str) -> str:
    """The retrieval query, in copy form (also the own demo appended after the retrieved ones)."""
    p, t = fact_of(record, task)
    return demo(p, t, p, t)


def fact_line(fact_prompt: str, fact_target: str) -> str:
    """The line after the demos, before the queried input: `"New Fact: {p} {t}\\nPrompt: "`."""
    return f"New Fact: {fact_prompt} {fact_target}\nPrompt: "


def context_string(demos: Sequence[str], record, task: str) -> str:
    """What precedes every post-edit input: `"".join(demos) + fact_line(p, t)`."""
    return "".join(demos) + fact_line(*fact_of(record, task))


# --------------------------------------------------------------------------------------------------
# Retrieval.


@jax.jit
def normalize(x: jax.Array) -> jax.Array:
    """Rows to unit length (sentence-transformers' `util.normalize_embeddings`, eps 1e-12)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieve(bank: jax.Array, queries: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`bank [N, D]` (normalised), `queries [Q, D]` -> `(scores [Q, k], ids [Q, k])`, best first
    (`util.semantic_search` with `dot_score`)."""
    k = min(int(k), bank.shape[0])
    return _top_k(bank, normalize(queries), k)


@jax.jit
def _scores(bank, queries):
    return queries @ bank.T


def _top_k(bank, queries, k):
    return jax.lax.top_k(_scores(bank, queries), k) if k else (
        jnp.zeros((queries.shape[0], 0), jnp.float32), jnp.zeros((queries.shape[0], 0), jnp.int32))


def tfidf_embedder(tok, corpus: Sequence[str]) -> Embed:
    """A bag-of-tokens TF-IDF embedding over `tok`'s ids, IDF fitted on `corpus` (sklearn's smooth IDF). The
    stand-in where no trained sentence encoder exists (the built-in world ships none): it ranks demos by shared
    tokens, not by meaning."""
    vocab = len(tok)

    def counts(sentences):
        ids = tok(list(sentences), add_special_tokens=False)["input_ids"]
        out = np.zeros((len(ids), vocab), np.float32)
        for i, row in enumerate(ids):
            np.add.at(out[i], np.asarray(row, np.int64), 1.0)
        return out

    df = (counts(corpus) > 0).sum(0)
    idf = (np.log((1.0 + len(corpus)) / (1.0 + df)) + 1.0).astype(np.float32)
    return lambda sentences: counts(sentences) * idf


def encoder_embedder(config, params, tok, max_length: int = 256, batch_size: int = 64, multiple: int = 32) -> Embed:
    """A BERT-family sentence encoder (`models.bert.TextEncoder`, e.g. all-MiniLM-L6-v2 from
    `convert.text_encoder.load_text_encoder`) with its tokenizer: mean pool + L2 (`sentence_embedding`),
    sentences truncated at `max_length` tokens (sentence-transformers' `max_seq_length`, 256 for MiniLM), each
    batch padded to a multiple of `multiple` (a few compiled shapes)."""
    module = TextEncoder(config)

    @jax.jit
    def run(ids, mask):
        hidden, _ = module.apply({"params": params}, ids, mask)
        return sentence_embedding(hidden, mask)

    def embed(sentences):
        out = []
        for s in range(0, len(sentences), batch_size):
            enc = tok(list(sentences[s : s + batch_size]), truncation=True, max_length=max_length)["input_ids"]
            n = len(enc)
            width = min(-(-max(map(len, enc)) // multiple) * multiple, max(max_length, 1))
            ids = np.full((batch_size, width), tok.pad_token_id or 0, np.int32)
            mask = np.zeros((batch_size, width), np.int32)
            for i, row in enumerate(enc):
                ids[i, : len(row)], mask[i, : len(row)] = row, 1
            mask[n:, 0] = 1  # padded rows: one visible token, then dropped
            out.append(np.asarray(run(ids, mask))[:n])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return embed


@dataclasses.dataclass(frozen=True)
class Bank:
    """The demonstration bank: its sentences and their normalised embeddings `[N, D]` (on device)."""

    sentences: tuple[str, ...]
    embeddings: jax.Array

    def __repr__(self) -> str:  # run fingerprints: what it holds, not its floats
        return f"Bank({len(self.sentences)} sentences, D={self.embeddings.shape[-1]})"


def build_bank(records, task: str, embed: Embed) -> Bank:
    sentences = bank_sentences(records, task)
    if not sentences:
        raise ValueError("IKE needs a non-empty demonstration bank (training records)")
    return Bank(tuple(sentences), normalize(jnp.asarray(embed(sentences))))


# --------------------------------------------------------------------------------------------------
# Contexts: strings -> token arrays, with the position check.


@dataclasses.dataclass(frozen=True)
class ContextReport:
    """What `make_contexts` did: `kept [N]` retrieved demos kept per case (of `asked`), `length` Lc, the longest
    real context `longest`, and the cases that lost demos to the position limit."""

    asked: int
    kept: np.ndarray
    length: int
    longest: int
    limit: int

    @property
    def truncated(self) -> int:
        return int((self.kept < self.asked).sum())

    def summary(self) -> str:
        least = self.kept.min(initial=self.asked)
        return (f"IKE contexts: {len(self.kept)} cases, {self.asked} demos retrieved each, kept {self.kept.mean():.2f} "
                f"on average (min {least}); {self.truncated} cases lost demos to the model's "
                f"{self.limit} positions; longest context {self.longest} tokens, padded to {self.length}")


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def make_contexts(records, task: str, tok, bank: Bank, embed: Embed, cfg: IKEConfig, budgets: Sequence[int],
                  limit: int) -> tuple[np.ndarray, np.ndarray, ContextReport, list[str]]:
    """Context ids / mask `[N, Lc]` (right-padded), the report and the context strings, for `records`.

    `budgets[i]`: the most context tokens case i can take (the model's positions less its longest input).
    Demos are retrieved for all cases in one device call; a context over budget loses its least similar demos
    first (`cfg.truncate`), else ValueError. A case whose own demo and fact line alone exceed it is an error.
    """
    queries = [query_sentence(r, task) for r in records]
    _, top = retrieve(bank.embeddings, jnp.asarray(embed(queries)), cfg.k) if cfg.k else (None, None)
    top = np.zeros((len(records), 0), np.int64) if top is None else np.asarray(top)
    rows, kept, texts = [], [], []
    for i, r in enumerate(records):
        demos = [bank.sentences[j] for j in top[i]]
        own = [queries[i]] if cfg.own_demo else []
        while True:
            text = context_string(demos + own, r, task)
            ids = _ids(tok, text)
            if len(ids) <= budgets[i]:
                break
            if not demos or not cfg.truncate:
                raise ValueError(
                    f"IKE: case {getattr(r, 'index', i)}'s context has {len(ids)} tokens, more than the "
                    f"{budgets[i]} its longest input leaves of the model's {limit} positions"
                    + ("" if demos else " even without retrieved demos") + (
                        " (set truncate to drop the least similar demos)" if demos else ""))
            demos = demos[:-1]  # the least similar retrieved demo goes first
        rows.append(ids)
        kept.append(len(demos))
        texts.append(text)
    longest = max(map(len, rows), default=0)
    length = max(-(-longest // cfg.pad_multiple) * cfg.pad_multiple, 1)
    pad = int(tok.pad_token_id)
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    report = ContextReport(int(min(cfg.k, len(bank.sentences))), np.asarray(kept, np.int64), length, longest, limit)
    return ids, mask, report, texts


def input_budgets(cases: Case, limit: int) -> np.ndarray:
    """Per host case: `limit` less the longest real input (image slots included)."""
    longest = np.max([np.asarray(cases.seq(n).attention_mask).sum(-1) for n in
                      ("edit", "rephrase", "image_rephrase", "loc", "loc_image")], axis=0)
    return limit - longest


# --------------------------------------------------------------------------------------------------
# The forward with a context, and the editor.


def join_context(seq: Seq, context_ids, context_mask, n: int) -> Seq:
    """One input `[L]` with its context `[Lc]` after its first `n` positions (the image slots; 0 without an
    image) -> `[L + Lc]`; the context is never a label. The one layout IKE's inputs have, in evaluation and in
    the world model's in-context pretraining."""
    join = lambda a, c: jnp.concatenate([a[:n], jnp.asarray(c).astype(a.dtype), a[n:]])  # noqa: E731
    labels = jnp.full((context_ids.shape[-1],), -100, jnp.asarray(seq.labels).dtype)
    return Seq(*(join(jnp.asarray(a), c) for a, c in ((seq.input_ids, context_ids),
                                                      (seq.attention_mask, context_mask), (seq.labels, labels))))


@dataclasses.dataclass(frozen=True)
class InContextFns(RoutedFns):
    """A `ModelFns` that prepends a context: `patch = {"context_ids": [Lc], "context_mask": [Lc]}` runs
    `base` on `[image block][context][text]` (the context after the `image_block` positions an input
    that shows an image, first otherwise) and returns logits at the input's own L positions; `patch = {}` is
    `base` itself. Weight patches are not taken (IKE changes no weight)."""

    image_block: int  # positions before the text of an input with an image: the slots (MiniGPT-4: and its wrapper)

    def forward(self, params, patch, seq: Seq, image, taps=None, rows=None):
        if not patch:
            return self.base.forward(params, {}, seq, image, taps=taps, rows=rows)
        n = self.image_block if image is not None else 0
        lc, length = patch["context_ids"].shape[-1], seq.input_ids.shape[-1]
        full = join_context(seq, patch["context_ids"], patch["context_mask"], n)
        if rows is not None:
            return self.base.forward(params, {}, full, image, taps=taps, rows=jnp.where(rows >= n, rows + lc, rows),
                                     packed=True)
        logits, captured = self.base.forward(params, {}, full, image, taps=taps, packed=True)
        return logits[own_positions(n, lc, length)], captured

    def forward_group(self, params, patch, seqs, image, rows=None):
        """Inputs showing the same image (the edit input and its rephrase) share `[image block][context]`: with a
        context, that block runs once and each input's text from its keys and values (`forward_shared`, the
        base model's KV prefix). The inputs' first `image_block` ids must be the same (the image slots are)."""
        if not patch or image is None or len(seqs) < 2:
            return forward_each(self, params, patch, seqs, image, rows)
        rows = [None] * len(seqs) if rows is None else rows
        n, lc = self.image_block, patch["context_ids"].shape[-1]
        first = Seq(seqs[0].input_ids[:n], seqs[0].attention_mask[:n], seqs[0].labels[:n])  # the image block
        head = join_context(first, patch["context_ids"], patch["context_mask"], n)  # [image block][context]
        tails = [Seq(s.input_ids[n:], s.attention_mask[n:], s.labels[n:]) for s in seqs]
        joined_rows = [None if r is None else jnp.where(r >= n, r + lc, r) for r in rows]
        out = self.base.forward_shared(params, head, tails, image, rows=joined_rows)
        return [lg if r is not None else lg[own_positions(n, lc, s.input_ids.shape[-1])]
                for lg, r, s in zip(out, rows, seqs)]


def own_positions(n: int, lc: int, length: int) -> jax.Array:
    """Where an input's `length` positions lie in `[its first n][context Lc][the rest]`."""
    return jnp.concatenate([jnp.arange(n), n + lc + jnp.arange(length - n)])


def ike_edit(editor_params, params, case: Case, prior: dict, prefix=None) -> dict:
    """The edit of one case: its demonstration context (`attach_contexts` put it in the case)."""
    if case.context_ids is None:
        raise ValueError("IKE: the case carries no context; prepare cases with the editor's `prepare` "
                         "(pipeline.editor_cases)")
    if prior:
        raise ValueError("IKE edits do not compose (no sequential editing): prior must be {}")
    return {"context_ids": case.context_ids, "context_mask": case.context_mask}


def make_ike(base: ModelFns, image_block: int, max_positions: int, tok, task: str, bank: Bank, embed: Embed,
             cfg: IKEConfig = IKEConfig(), log=print) -> Editor:
    """IKE as an `Editor`. Its `prepare(cases, records)` retrieves and tokenises every case's context (host) and
    returns the cases with `context_ids` / `context_mask` set, logging the `ContextReport`."""

    def prepare(cases: Case, records) -> Case:
        budgets = input_budgets(cases, max_positions)
        ids, mask, report, _ = make_contexts(records, task, tok, bank, embed, cfg, budgets, max_positions)
        log(report.summary())
        return cases.replace(context_ids=ids, context_mask=mask)

    return Editor(name="ike", edit=ike_edit, fns=InContextFns(base, image_block), hparams=(cfg, bank),
                  prepare=prepare, composes=False)
