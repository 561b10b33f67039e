"""SERAC's networks and routing math (EasyEdit's `SERAC_MULTI`; editors.md §3): the scope classifier, the
counterfactual model with its image projection, the memory, and the mixture of base and counterfactual outputs.

* Scope classifier: a BERT/DistilBERT `TextEncoder`; `e(text)` = its [CLS] (first-token) state (`tanh`-bounded
  with `bound_embeds`). Log-similarity of a query to memory slot c: `-||e_q - e_c||^2 * scale` (`square: false`:
  the unsquared norm; `cos: true`: `-(1 - cos)`), `scale` fixed at 1.0 as the reference's buffer, so
  `s_c = exp(log-sim) in (0, 1]`. Invalid (unfilled) slots get `-inf`; `s* = max_c s_c`, `c* = argmax`.
* Memory (`Memory`): fixed capacity C; each slot's classifier embedding is computed ONCE, when the edit is
  written (the reference re-encodes the whole cache on every forward), plus the slot's counterfactual context
  tokens `[C, Lc]`. What a slot holds is the edit input's text (prompt + answer, image slots and padding
  dropped): SERAC_MULTI caches the edit's `text_input`, and its classifier compares it with the query's
  `text_input` (also prompt + answer), so a query identical to an edit has `s* = 1` exactly (generic SERAC's
  `x_e [SEP] y_e [SEP]` memory text is commented out in SERAC_MULTI's `build_cls_cache_inputs`).
* Counterfactual: an OPT or LLaMA decoder (its config's family; EasyEdit: `opt-125m` for BLIP-2, the same
  Vicuna for MiniGPT-4) on `[projected image] + ctx[c*] + query` (image first, as SERAC_MULTI
  prepends its projected query outputs; MiniGPT-4's wrapper tokens travel with the image, `image_wrap`, as
  SERAC_MULTI reuses the base model's `prompt_wrap`): built by permuting `concat(ctx, query)` so the query's
  image block comes first; padding anywhere is masked and positions come from `cumsum(mask)`, so shapes stay static. The
  logits are gathered back to the query's own positions, aligned with its labels. Deviation, stated: the
  context and query are concatenated as token ids (no decode / re-encode round trip), so each keeps the BOS
  the base tokenizer gave it (the reference tokenises `ctx + " " + query` as one string without special tokens).
* Image projection: `Linear(E_base -> E_cf)` from the base model's cached image embeddings (its own
  `language_projection` output, `[nq, E_base]`) rather than from the Q-Former outputs (`[nq, 768]`) as the
  reference: the composition of the frozen BLIP-2 projection (injective, 768 -> 2560) with a trained linear
  expresses any linear map of the Q-Former outputs, and it reuses the feature cache. EasyEdit's bug fixed:
  its `language_projection` is never optimised and is re-initialised at random in every edited wrapper; here it
  is an editor parameter, trained and saved with the rest.
* Image-aware scope (`scope_image: true`; ours, off by default): SERAC_MULTI's classifier reads text only, so
  another image's question in the edit's words is in scope by construction (M-Locality falls wherever questions
  repeat). With the switch each key and query also carry an image key, a trained linear map of the mean of the
  base model's image embeddings (`[nq, E_base] -> [D_img]`; a text-only input's image key is a trained
  `no_image` vector), and the distance adds `||i_q - i_c||^2` to the text's. Off, the image keys have width 0.
* Mixture: EasyEdit (`supervised: false`, every shipped config): `log((1 - s*) p_base + s* p_cf + eps)` with
  eps = float32 eps; the SERAC paper (`supervised: true`, `soft_weighting: false`): hard routing, the
  counterfactual logits where `s* > 0.5`, else the base logits. Both models always run (no data-dependent
  branch).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mmedit_jax.case import Seq
from mmedit_jax.models.bert import TextEncoder, cls_embedding
from mmedit_jax.models.blip2 import splice_image_embeds
from mmedit_jax.models.config import BertConfig, DistilBertConfig, LlamaConfig, OPTConfig
from mmedit_jax.models.llama import LlamaDecoder
from mmedit_jax.models.opt import OPTDecoder

SCALE = 1.0  # the reference's `scale` buffer (never learned)
SCOPE_QUERIES = ("prompt", "text_input")  # `SeracConfig.scope_query`
EPS = float(np.finfo(np.float32).eps)  # the reference's `eps` default in `SERAC.forward`


@dataclasses.dataclass(frozen=True)
class SeracConfig:
    """The static layout of a SERAC editor (hashable).

    classifier / counterfactual: the two networks' configs; the counterfactual's family follows its config
    (`OPTConfig` -> `OPTDecoder`, `LlamaConfig` -> `LlamaDecoder`). image_width: E of the base model's image
    embeddings (the projection's input). image_token_id: the base model's image placeholder id in `input_ids`.
    image_wrap: `(before, after)`, how many wrapper tokens surround the image slots in an image query
    (MiniGPT-4's `'###Human: <Img>'` / `'</Img> '`; BLIP-2 has none): they belong to the image block, which the
    classifier's text and the memory's context leave out and the counterfactual sees first.
    hard_routing: the SERAC paper's `s* > 0.5` switch (EasyEdit: `supervised and not soft_weighting`) instead of
    the soft mixture. square / cos / bound_embeds: EasyEdit's distance keys.
    scope_image: the scope also compares the query's image with the slot's (ours; module docstring), through an
    image key of width `scope_image_dim`.
    trained_layers: how many of the counterfactual's last decoder layers train (None: all its parameters). EasyEdit's
    MiniGPT-4 SERAC trains only the Vicuna parameters whose name holds '31', i.e. its last layer (1); its embeddings,
    final norm and head stay frozen with the other layers.
    scope_query: what of a query the scope classifier reads. "prompt" (default; the SERAC paper: the input x, not
    its answer) drops the answer tokens (`labels != -100`); "text_input" (EasyEdit's SERAC_MULTI) reads prompt and
    target, so a teacher-forced query carries the very answer being scored into the routing decision, and at
    generation, where no target exists, the routing sees another distribution.
    scope_key: what of the edit the memory's classifier key reads. "text_input" (default; SERAC_MULTI, and the
    SERAC paper's edit descriptor) the edit's prompt and new answer; "prompt" (ours) the prompt alone, as a
    "prompt" query is read, so the key no longer depends on the new answer (on the world, keys of some answers
    lay so far from their prompts that the routing weight was 0 and its gradient with it). The counterfactual's
    context keeps the whole text either way.
    """

    classifier: DistilBertConfig | BertConfig
    counterfactual: OPTConfig | LlamaConfig
    image_width: int
    image_token_id: int
    image_wrap: tuple[int, int] = (0, 0)
    hard_routing: bool = False
    square: bool = True
    cos: bool = False
    bound_embeds: bool = False
    trained_layers: int | None = None
    scope_query: str = "prompt"
    scope_image: bool = False
    scope_image_dim: int = 32
    scope_key: str = "text_input"

    def __post_init__(self):
        if self.scope_query not in SCOPE_QUERIES:
            raise ValueError(f"SERAC: scope_query must be one of {SCOPE_QUERIES}, got {self.scope_query!r}")
        if self.scope_key not in SCOPE_QUERIES:
            raise ValueError(f"SERAC: scope_key must be one of {SCOPE_QUERIES}, got {self.scope_key!r}")
        if self.trained_layers is not None and self.counterfactual is not None:
            total = self.counterfactual.num_hidden_layers
            if not 1 <= self.trained_layers <= total:
                raise ValueError(f"SERAC: trained_layers must be in 1..{total} (the counterfactual's layers), "
                                 f"got {self.trained_layers}")

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["classifier_kind"] = "distilbert" if isinstance(self.classifier, DistilBertConfig) else "bert"
        out["counterfactual_kind"] = "llama" if isinstance(self.counterfactual, LlamaConfig) else "opt"
        return out

    @classmethod
    def from_json(cls, d: dict) -> SeracConfig:
        """The config `to_json` wrote; editors saved before the LLaMA counterfactual (no `counterfactual_kind`,
        no `image_wrap`) read as OPT with no wrapper, and those saved before `scope_query` as "text_input" (what
        they were trained with)."""
        d = dict(d)
        d.setdefault("scope_query", "text_input")
        kind = d.pop("classifier_kind", "distilbert")
        cls_cfg = (DistilBertConfig if kind == "distilbert" else BertConfig)(**d.pop("classifier"))
        cf_kind = d.pop("counterfactual_kind", "opt")
        if cf_kind not in COUNTERFACTUALS:
            raise ValueError(f"SERAC: unknown counterfactual kind {cf_kind!r} (expected one of "
                             f"{sorted(COUNTERFACTUALS)})")
        cf_cfg = COUNTERFACTUALS[cf_kind][0](**d.pop("counterfactual"))
        wrap = tuple(int(n) for n in d.pop("image_wrap", (0, 0)))
        return cls(classifier=cls_cfg, counterfactual=cf_cfg, image_wrap=wrap, **d)

    @property
    def counterfactual_width(self) -> int:
        """The counterfactual's input embedding width (OPT's `word_embed_proj_dim`, LLaMA's `hidden_size`)."""
        cf = self.counterfactual
        return cf.embed_dim if isinstance(cf, OPTConfig) else cf.hidden_size


# The counterfactual's families: saved kind -> (config class, decoder).
COUNTERFACTUALS = {"opt": (OPTConfig, OPTDecoder), "llama": (LlamaConfig, LlamaDecoder)}


def counterfactual_decoder(cfg: SeracConfig):
    """The counterfactual's Linen decoder, of the family its config names."""
    for config_cls, decoder in COUNTERFACTUALS.values():
        if isinstance(cfg.counterfactual, config_cls):
            return decoder(cfg.counterfactual)
    raise TypeError(f"SERAC: no counterfactual decoder for {type(cfg.counterfactual).__name__}")


@struct.dataclass
class Memory:
    """Fixed-capacity SERAC memory (add a leading `[E]` axis for a batch of independent memories).

    keys `[C, D]`: classifier embeddings of the slots' texts; image_keys `[C, D_img]`: their images' keys
    (`image_key`; D_img = 0 without `scope_image`); ctx_ids / ctx_mask `[C, Lc]`: their counterfactual context
    tokens (mask 0 on padding and image slots); valid `[C]` bool: filled slots.
    """

    keys: jax.Array
    image_keys: jax.Array
    ctx_ids: jax.Array
    ctx_mask: jax.Array
    valid: jax.Array

    @property
    def capacity(self) -> int:
        return int(self.valid.shape[-1])


def append(memory: Memory, new: Memory) -> Memory:
    """`memory` followed by `new`'s slots (sequential editing: capacity grows by `new.capacity`)."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), memory, new)


# --------------------------------------------------------------------------------------------------
# Parameters.


def init_serac(rng, cfg: SeracConfig, counterfactual_params=None, classifier_params=None) -> dict:
    """`{"classifier", "counterfactual", "projection": {"kernel", "bias"}}`; the networks random unless given.
    The projection starts as the identity where the widths agree (a counterfactual that is a copy of the base
    language model then sees the images as the base does), else `normal(0.02)`. With `scope_image`, also
    `"scope_image": {"kernel" [E_base, D_img], "no_image" [D_img]}` (`fresh_scope_image`)."""
    k_cls, k_cf, k_proj, k_img = jax.random.split(rng, 4)
    if classifier_params is None:
        ids = jnp.zeros((1, 4), jnp.int32)
        classifier_params = TextEncoder(cfg.classifier).init(k_cls, ids)["params"]
    if counterfactual_params is None:
        emb = jnp.zeros((1, 4, cfg.counterfactual_width), jnp.float32)
        counterfactual_params = counterfactual_decoder(cfg).init(k_cf, emb, jnp.ones((1, 4), jnp.int32))["params"]
    d_in, d_out = cfg.image_width, cfg.counterfactual_width
    kernel = (jnp.eye(d_in, dtype=jnp.float32) if d_in == d_out
              else 0.02 * jax.random.normal(k_proj, (d_in, d_out), jnp.float32))
    net = {"classifier": classifier_params, "counterfactual": counterfactual_params,
           "projection": {"kernel": kernel, "bias": jnp.zeros((d_out,), jnp.float32)}}
    if cfg.scope_image:
        net["scope_image"] = fresh_scope_image(k_img, cfg)
    return net


def fresh_scope_image(rng, cfg: SeracConfig) -> dict:
    """The image key's parameters, untrained: a kernel small enough that a fresh key barely moves the routing of
    a trained text classifier (a zero kernel would have zero gradient: the distance is quadratic in it), and
    `no_image` at zero."""
    kernel = 0.01 * jax.random.normal(rng, (cfg.image_width, cfg.scope_image_dim), jnp.float32)
    return {"kernel": kernel, "no_image": jnp.zeros((cfg.scope_image_dim,), jnp.float32)}


# --------------------------------------------------------------------------------------------------
# Scope classifier and routing.


def image_block(cfg: SeracConfig, ids: jax.Array) -> jax.Array:
    """`[L]` bool: the image slots of `ids [L]` and the `cfg.image_wrap` wrapper tokens around them (all False
    for a text-only input)."""
    is_image = ids == cfg.image_token_id
    if cfg.image_wrap == (0, 0):
        return is_image
    before, after = cfg.image_wrap
    pos = jnp.arange(ids.shape[0])
    first = jnp.min(jnp.where(is_image, pos, ids.shape[0]))
    last = jnp.max(jnp.where(is_image, pos, -1))
    return jnp.any(is_image) & (pos >= first - before) & (pos <= last + after)


def text_tokens(cfg: SeracConfig, seq: Seq, reading: str = "text_input") -> tuple[jax.Array, jax.Array]:
    """An input's text tokens, packed to the front: `(ids [L], mask [L])` (the image block and padding
    dropped); `reading="prompt"` also drops the answer tokens (`labels != -100`). The scope classifier reads a
    query as `cfg.scope_query` says and a memory key as `cfg.scope_key` says."""
    keep = seq.attention_mask.astype(bool) & ~image_block(cfg, seq.input_ids)
    if reading == "prompt":
        keep = keep & (seq.labels == -100)
    order = jnp.argsort(~keep, stable=True)
    return seq.input_ids[order], keep[order].astype(jnp.int32)


def embed(cfg: SeracConfig, classifier_params, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The classifier embedding `[D]` of one text `ids [L]` (packed to the front): its [CLS] state."""
    ids = jnp.clip(ids, 0, cfg.classifier.vocab_size - 1)  # MiniGPT-4's image id is one past the vocabulary
    h, _ = TextEncoder(cfg.classifier).apply({"params": classifier_params}, ids[None], mask[None])
    e = cls_embedding(h)[0]
    return jnp.tanh(e) if cfg.bound_embeds else e


def image_key(cfg: SeracConfig, net: dict, image: jax.Array | None) -> jax.Array:
    """`[D_img]`: the scope's key of an input's image (`image`: the base model's embeddings `[nq, E_base]`, None
    for a text-only input); width 0 without `scope_image`."""
    if not cfg.scope_image:
        return jnp.zeros((0,), jnp.float32)
    p = net["scope_image"]
    if image is None:
        return p["no_image"]
    return jnp.mean(image.astype(jnp.float32), axis=0) @ p["kernel"]


def log_similarity(cfg: SeracConfig, query: jax.Array, keys: jax.Array, valid: jax.Array,
                   query_image: jax.Array | None = None, image_keys: jax.Array | None = None) -> jax.Array:
    """`[C]` log-similarities of the query embedding `[D]` to the memory keys `[C, D]`; `-inf` at invalid slots.
    With `scope_image`, the squared distance of the image keys (`query_image [D_img]`, `image_keys [C, D_img]`)
    is added to the text's distance."""
    if cfg.cos:
        cos = keys @ query / (jnp.linalg.norm(keys, axis=-1) * jnp.linalg.norm(query) + 1e-12)
        dist = 1.0 - cos
    else:
        dist = jnp.sum(jnp.square(keys - query[None]), axis=-1)
        if not cfg.square:
            dist = jnp.sqrt(jnp.maximum(dist, 1e-12))
    if cfg.scope_image:
        dist = dist + jnp.sum(jnp.square(image_keys - query_image[None]), axis=-1)
    return jnp.where(valid, -dist * SCALE, -jnp.inf)


def route(log_sim: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(s* = exp(max log-sim), c* = argmax)`; an all-invalid memory gives `s* = 0`."""
    return jnp.exp(jnp.max(log_sim)), jnp.argmax(log_sim)


def balanced_bce(pos: jax.Array, neg: jax.Array, w: jax.Array) -> jax.Array:
    """The SERAC paper's classifier loss (`losses.py: balanced_bce`) on log-similarities:
    `mean_pos[-log s] + mean_neg[-log(1 - s)]`, each a mean weighted by `w` (same shape; weights normalised
    per side, so masked rows drop out, as the reference's boolean indexing)."""
    w = w.astype(jnp.float32)
    wmean = lambda x: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-12)  # noqa: E731
    s_neg = jnp.minimum(jnp.exp(neg), 1.0 - 1e-6)
    return wmean(-pos) + wmean(-jnp.log1p(-s_neg))


def mix(cfg: SeracConfig, base_logits: jax.Array, cf_logits: jax.Array, s: jax.Array) -> jax.Array:
    """The routed output `[L, V]`: hard `where(s > 0.5, cf, base)`, or the soft mixture's log-probabilities
    `log((1 - s) softmax(base) + s softmax(cf) + eps)`."""
    if cfg.hard_routing:
        return jnp.where(s > 0.5, cf_logits, base_logits)
    p = (1.0 - s) * jax.nn.softmax(base_logits, axis=-1) + s * jax.nn.softmax(cf_logits, axis=-1)
    return jnp.log(p + EPS)


# --------------------------------------------------------------------------------------------------
# The memory and the counterfactual model.


def write_memory(cfg: SeracConfig, net: dict, edit: Seq, image: jax.Array | None = None) -> Memory:
    """A capacity-1 memory holding one edit: its text's classifier embedding (computed once, here; the prompt's
    alone with `scope_key="prompt"`), its image's key (`image`: the base model's embeddings `[nq, E_base]` of the
    edit's image; read with `scope_image` only) and its whole text as counterfactual context."""
    ids, mask = text_tokens(cfg, edit)
    key_text = (ids, mask) if cfg.scope_key == "text_input" else text_tokens(cfg, edit, cfg.scope_key)
    key = embed(cfg, net["classifier"], *key_text)
    return Memory(keys=key[None], image_keys=image_key(cfg, net, image)[None], ctx_ids=ids[None],
                  ctx_mask=mask[None], valid=jnp.ones((1,), bool))


def counterfactual_logits(cfg: SeracConfig, net: dict, ctx_ids: jax.Array, ctx_mask: jax.Array, seq: Seq,
                          image: jax.Array | None) -> jax.Array:
    """Counterfactual logits `[L, V]` at the query's positions, for `[image block] + ctx + query text`.

    ctx_ids / ctx_mask `[Lc]`; seq: the query (its image block, `[nq]` image slots with any wrapper tokens, then
    text + right padding); image: the base model's embeddings of the query's image `[nq, E_base]` (None for a
    text-only query). OPT takes its positions from the mask itself; LLaMA is given `cumsum(mask) - 1`, the
    positions of the same sequence without its padding.
    """
    lc = ctx_ids.shape[0]
    ids = jnp.concatenate([ctx_ids, seq.input_ids])
    mask = jnp.concatenate([ctx_mask.astype(jnp.int32), seq.attention_mask.astype(jnp.int32)])
    is_image = jnp.concatenate([jnp.zeros((lc,), bool), image_block(cfg, seq.input_ids)])
    order = jnp.argsort(~is_image, stable=True)  # the image block first, then the context, then the query's text
    where_now = jnp.argsort(order)[lc:]  # the query's positions in the permuted sequence
    ids, mask = ids[order], mask[order]
    decoder = counterfactual_decoder(cfg)
    cf = net["counterfactual"]
    frozen = cf if cfg.trained_layers is None else jax.lax.stop_gradient(cf)
    embeds = decoder.apply({"params": frozen}, jnp.clip(ids, 0, cfg.counterfactual.vocab_size - 1)[None],
                           method="embed")
    if image is not None:
        projected = image.astype(jnp.float32) @ net["projection"]["kernel"] + net["projection"]["bias"]
        embeds = splice_image_embeds(embeds, ids[None], projected[None], cfg.image_token_id)
    llama = isinstance(decoder, LlamaDecoder)
    where = {"positions": jnp.maximum(jnp.cumsum(mask) - 1, 0)[None]} if llama else {}
    if cfg.trained_layers is None:
        logits, _ = decoder.apply({"params": cf}, embeds, mask[None], **where)
        return logits[0][where_now]
    # Only the last `trained_layers` layers train: the frozen layers run as a prefix without gradients, and the
    # rest resume with the stack's own (differentiated) leaves, so only their slices get non-zero gradients.
    start = cfg.counterfactual.num_hidden_layers - cfg.trained_layers
    h = decoder.apply({"params": frozen}, embeds, mask[None], stop=start, method="prefix", **where)
    tail = {**frozen, "layers": cf["layers"]}
    logits, _ = decoder.apply({"params": tail}, h, mask[None], start=start, method="resume", **where)
    return logits[0][where_now]


def serac_logits(cfg: SeracConfig, net: dict, memory: Memory, seq: Seq, image, base_logits: jax.Array,
                 return_route: bool = False) -> Any:
    """The edited model's output `[L, V]` on one query: classifier on the query's text, counterfactual on the
    nearest slot's context + the query, routed against `base_logits` (`mix`). With `return_route`, also
    `(s*, c*)`."""
    s, c = route(scope_scores(cfg, net, memory, seq, image))
    cf = counterfactual_logits(cfg, net, memory.ctx_ids[c], memory.ctx_mask[c], seq, image)
    out = mix(cfg, base_logits, cf, s)
    return (out, (s, c)) if return_route else out


def scope_scores(cfg: SeracConfig, net: dict, memory: Memory, seq: Seq, image: jax.Array | None = None) -> jax.Array:
    """`[C]` log-similarities of one query to every slot (the classifier alone): its text's, and with
    `scope_image` its image's (`image`: the base model's embeddings `[nq, E_base]`, None for a text-only query)."""
    ids, mask = text_tokens(cfg, seq, cfg.scope_query)
    return log_similarity(cfg, embed(cfg, net["classifier"], ids, mask), memory.keys, memory.valid,
                          image_key(cfg, net, image), memory.image_keys)
