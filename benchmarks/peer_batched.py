"""The best-effort PyTorch peer: the faithful peer's procedure (`peer_easyedit.py`, EasyEdit's edit + five
metrics per case) written as well as PyTorch allows, E cases at a time, on the same weights, cases and editor.

Per batch of E cases:
  1. image features once per distinct image of the batch (ViT -> Q-Former -> projection, one call);
  2. the unedited locality outputs: `loc` and `loc_image` rows as one padded call (E text + E image rows), the
     head only at valid positions, only the top-k indices kept;
  3. the edit: one padded forward/backward of the E edit inputs with no parameter requiring grad (autograd runs
     from the first edited layer's output up, the head only at answer positions); MEND transforms every row at
     once and masks the rows EasyEdit drops (`any(u) & any(delta)`); KE conditions all E cases in one packed
     BiLSTM call and writes its update in factored form (`grad * a` with `a = softmax(a_row)^T a_col` is
     `sum_t (softmax(a_row) * delta_t) (a_col * x_t)^T`, plus the rank-1 `b` term), so no case's dense weight
     change is ever formed;
  4. one post-edit call over the 5E rows, each edited Linear adding its row's case patch as
     `bmm(bmm(x, u^T), d)` (`Factored`); accuracies from the head at answer positions, localities from top-k at
     valid positions against step 2.
Forwards run under `torch.inference_mode` (the edit under grad). `compile=True` (compare_peer's "compiled" side)
puts the decoders, the vision side and SERAC's classifier under `torch.compile(dynamic=True)`. The frozen-prefix
idea (the edit and locality inputs' unedited layers shared between the base, edit and post passes) is not used
here: transformers' OPT gives no entry point at an inner layer. FT-L has no batched form here (each case would
need its own weight copy).

IKE and SERAC change no weight; their post-edit pass is what differs (steps 1-2 as above, no step 3):
  * IKE (`BatchedIKE`): the edit and rephrase rows' shared `[image slots][case's context]` once per case (a KV
    cache, `use_cache`) and their texts from it, then one call over the other 3E rows `[image slots][case's
    context][input text]`, right-padded; the input's own positions scored (the head at answer positions, top-k at
    its valid positions);
  * SERAC (`BatchedSerac`): the base model over the 5E rows (one call), the scope classifier once over the E
    memory keys and once over the 5E queries (padded rows), the image keys from the batch's feature table, the
    counterfactual over the 5E rows `[projected image][memory text][query text]` (one call), and the mixture
    (or the hard switch) at the scored positions only.

    python benchmarks/peer_batched.py --hf DIR --cases cases.npz --editor mend --mend mend_easyedit.pt
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

try:
    from benchmarks import peer_easyedit as PE
except ImportError:  # run as a script: this directory is on sys.path
    import peer_easyedit as PE

INPUT_ORDER = PE.SUB_INPUTS  # edit_inner, edit_outer, edit_outer_image, loc, loc_image
ACC_INPUTS = INPUT_ORDER[:3]


class Factored(torch.nn.Module):
    """An `nn.Linear` plus a per-row factored patch: `y = x W^T + b + bmm(bmm(x, u^T), d)` with `u [R, K, in]`,
    `d [R, K, out]` (the step folded into `d`). `capture`: keep the layer input and the gradient at its output
    (what EasyEdit's MEND hooks record), making the output a grad root when nothing below requires grad."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base, self.u, self.d, self.capture = base, None, None, False
        self.x = self.delta = None

    def forward(self, x):
        y = self.base(x)
        if self.u is not None:  # OPT feeds its FFN the rows flattened, [R * L, in]
            xr = x.reshape(self.u.shape[0], -1, x.shape[-1])
            y = y + torch.bmm(torch.bmm(xr, self.u.transpose(1, 2)), self.d).reshape(y.shape)
        if self.capture:
            self.x = x.detach()
            if not y.requires_grad:
                y.requires_grad_(True)
            y.register_hook(self._keep)
        return y

    def _keep(self, g):
        self.delta = g


def install(model, names) -> dict[str, Factored]:
    """Wraps each edited Linear (weight name `...fc1.weight`) of `model` in a `Factored`, in place."""
    out = {}
    for n in names:
        parent, attr = PE._parent_and_attr(model, n)
        out[n] = Factored(getattr(parent, attr))
        setattr(parent, attr, out[n])
    return out


def maybe_compile(fn, compile: bool):
    """`torch.compile(fn, dynamic=True)` (one program for every padded length and batch) or `fn`."""
    return torch.compile(fn, dynamic=True) if compile else fn


class Batched:
    """Padded multi-row forwards of a transformers BLIP-2 (OPT decoder), the head at chosen positions only;
    `compile`: the decoder and the vision side under `torch.compile`."""

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.embed = model.get_input_embeddings()
        self.decoder = maybe_compile(model.language_model.model, compile)
        self.head = model.language_model.get_output_embeddings()
        self.image_token = model.config.image_token_id
        self._features = maybe_compile(model.get_image_features, compile)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[n, 3, H, W]` -> projected query outputs `[n, nq, D]`."""
        return self._features(pixel_values=pixels).pooler_output

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
        """`[R, L, D]` final hidden states; `feats` `[r, nq, D]`: one per row holding image slots, in row order."""
        emb = self.embed(ids)
        if feats is not None:
            slots = (ids == self.image_token).unsqueeze(-1)
            emb = emb.masked_scatter(slots, feats.to(emb.dtype))
        return self.decoder(inputs_embeds=emb, attention_mask=mask, use_cache=False).last_hidden_state

    def logits_at(self, h: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Head outputs `[P, V]` at the True entries of `where [R, L]` (row-major order)."""
        return self.head(h[where])


def _stack(cases: dict, name: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
    t = lambda f: torch.from_numpy(cases[f"{name}/{f}"][idx].astype(np.int64))  # noqa: E731
    return {"input_ids": t("input_ids"), "attention_mask": t("attention_mask"), "labels": t("labels"),
            "image_ids": t("image_ids")}


def _concat(parts: list[dict]) -> dict[str, torch.Tensor]:
    """Rows of several inputs as one right-padded batch (pad id 1 is never read: its positions are masked)."""
    length = max(p["input_ids"].shape[1] for p in parts)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, length - x.shape[1]), value=v)  # noqa: E731
    return {"input_ids": torch.cat([pad(p["input_ids"], 1) for p in parts]),
            "attention_mask": torch.cat([pad(p["attention_mask"], 0) for p in parts]),
            "labels": torch.cat([pad(p["labels"], PE.IGNORE) for p in parts]),
            "image_ids": torch.cat([p["image_ids"] for p in parts])}


def _answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(where [R, L], targets [P])`: positions whose next label is an answer token (the causal shift)."""
    nxt = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=PE.IGNORE)
    where = nxt != PE.IGNORE
    return where, nxt[where]


def _per_row(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Sums of `values [P]` (row-major over `where [R, L]`) per row."""
    rows = where.nonzero()[:, 0]
    return torch.zeros(where.shape[0], dtype=values.dtype).index_add_(0, rows, values)


class BatchedPeer:
    """Edits and scores E cases per call; `editor` is "mend" (a `PE.MendTransform`) or "ke" (a `PE.KENet`)."""

    def __init__(self, model, editor: str, net, names, exact_match: bool = True, compile: bool = False):
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers = install(model, names)  # before compiling: the wrapped Linears are part of the program
        self.b, self.editor, self.net, self.names = Batched(model, compile), editor, net, list(names)
        self.em = exact_match

    def _feats(self, batch: dict, table: dict) -> torch.Tensor | None:
        return feats_of(batch, table)

    def _topk(self, h, mask, k_of_row):
        return topk_at(lambda where: self.b.logits_at(h, where), mask, k_of_row)

    def _patches(self, E: int, cond) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`{name: (u [E, K, in], d [E, K, out])}` from the captured inputs and output gradients of E rows."""
        out = {}
        if self.editor == "ke":
            c = ke_condition_batch(self.net, *cond)
        for i, n in enumerate(self.names):
            lay = self.layers[n]
            x = lay.x.float().reshape(E, -1, lay.x.shape[-1])
            dl = lay.delta.float().reshape(E, -1, lay.delta.shape[-1])
            T = x.shape[1]
            if self.editor == "mend":
                keep = ((x != 0).any(-1) & (dl != 0).any(-1)).unsqueeze(-1)
                u, d = self.net.rows(i, x.reshape(E * T, -1), dl.reshape(E * T, -1))
                out[n] = (u.reshape(E, T, -1) * keep, d.reshape(E, T, -1) * self.net.scale(i))
            else:
                m, k = dl.shape[-1], x.shape[-1]
                a_col, a_row, b_col, b_row, eta = self.net.heads[PE._head_key(n)](c).split([k, m, k, m, 1], -1)
                s = (self.net.max_scale * eta.sigmoid())[:, :, None]
                u = torch.cat([a_col[:, None] * x, b_col[:, None]], 1)
                d = torch.cat([a_row.softmax(-1)[:, None] * dl, b_row.softmax(-1)[:, None]], 1) * s
                out[n] = (u, d)
        return out

    def run(self, cases: dict, idx: np.ndarray) -> list[dict]:
        """The five metrics of cases `idx` (one batch)."""
        inputs = {name: _stack(cases, name, idx) for name in INPUT_ORDER}
        E = len(idx)
        with torch.inference_mode():
            table = feature_table(self.b, cases, inputs)
            base_topk = base_locality(self.b, inputs, table)
        # The edit: one padded forward/backward of the E edit inputs.
        e = inputs["edit_inner"]
        for lay in self.layers.values():
            lay.capture = True
        try:
            with torch.enable_grad():
                feats_e = self._feats(e, table)
                h = self.b.hidden(e["input_ids"], e["attention_mask"], None if feats_e is None else feats_e.clone())
                where, targ = _answer_positions(e["labels"])
                lp = torch.log_softmax(self.b.logits_at(h, where).float(), -1).gather(-1, targ[:, None])[:, 0]
                per_case = _per_row(-lp, where) / where.sum(1)
                per_case.sum().backward()
        finally:
            for lay in self.layers.values():
                lay.capture = False
        with torch.inference_mode():
            cond = None
            if self.editor == "ke":
                cond = (torch.from_numpy(cases["cond_ids"][idx].astype(np.int64)),
                        torch.from_numpy(cases["cond_mask"][idx].astype(np.int64)))
            patches = self._patches(E, cond)
            for n, lay in self.layers.items():
                lay.x = lay.delta = None
                u, d = patches[n]
                lay.u, lay.d = u.repeat(5, 1, 1), d.repeat(5, 1, 1)  # the post rows are input-major
            try:
                post = _concat([inputs[n] for n in INPUT_ORDER])
                hp = self.b.hidden(post["input_ids"], post["attention_mask"], self._feats(post, table))
            finally:
                for lay in self.layers.values():
                    lay.u = lay.d = None
            return score(lambda rows, where: self.b.logits_at(hp[rows], where), post["labels"],
                         post["attention_mask"], base_topk, cases["case_index"][idx], self.em)


# Shared by every batched peer: features once per image, the unedited locality pass, the five metrics.


def feats_of(batch: dict, table: dict) -> torch.Tensor | None:
    """The feature rows of `batch`'s rows that show an image, in row order (`Batched.hidden`'s `feats`)."""
    ids = batch["image_ids"]
    ids = ids[ids >= 0]
    return torch.stack([table[int(i)] for i in ids]) if len(ids) else None


def feature_table(b: Batched, cases: dict, inputs: dict) -> dict[int, torch.Tensor]:
    """`{image id: [nq, D]}`: every distinct image of the batch through the vision side once (one call)."""
    used = np.unique(np.concatenate([inputs[n]["image_ids"].numpy() for n in INPUT_ORDER]))
    used = used[used >= 0]
    feats = b.features(torch.from_numpy(cases["pixels"][used]))
    return {int(i): f for i, f in zip(used, feats.clone())}


def topk_at(logits_at, mask, k_of_row):
    """Top-k indices at every True position of `mask [R, L]`, k per row (1 text, 10 image) -> `{k: (indices
    [P_k, k], where [R, L])}`; `logits_at(where)` gives the logits `[P, V]` at `where`'s positions."""
    out = {}
    for k in sorted(set(k_of_row.tolist())):
        where = mask.bool() & (k_of_row == k)[:, None]
        out[k] = (torch.topk(torch.softmax(logits_at(where), -1), k=k, dim=-1).indices, where)
    return out


def base_locality(b: Batched, inputs: dict, table: dict) -> dict:
    """The unedited model's top-1 (`loc`) and top-10 (`loc_image`) at every valid position: one padded call."""
    E = inputs["loc"]["input_ids"].shape[0]
    base = _concat([inputs["loc"], inputs["loc_image"]])
    hb = b.hidden(base["input_ids"], base["attention_mask"], feats_of(base, table))
    return topk_at(lambda where: b.logits_at(hb, where), base["attention_mask"], _k_of_row(E))


def _k_of_row(E: int) -> torch.Tensor:
    return torch.tensor([1] * E + [10] * E)


def score(logits_at, labels, mask, base_topk, case_index, exact_match: bool) -> list[dict]:
    """The five metrics of E cases from the post-edit outputs over the 5E input-major rows: `logits_at(rows,
    where)` gives the logits `[P, V]` at the True positions of `where` (a mask over rows `rows`); `labels` and
    `mask` `[5E, L]` mark the scored positions (answer positions; every valid position of the locality rows, in
    the order of the base pass's)."""
    E = labels.shape[0] // 5
    acc_rows = slice(0, 3 * E)  # accuracies: the head at answer positions only
    where, targ = _answer_positions(labels[acc_rows])
    hit = (logits_at(acc_rows, where).argmax(-1) == targ).float()
    n_hit, n_ans = _per_row(hit, where), where.sum(1).float()
    acc = (n_hit == n_ans).float() if exact_match else n_hit / n_ans
    loc = slice(3 * E, 5 * E)  # localities against the base pass (same rows, same valid positions)
    post_topk = topk_at(lambda w: logits_at(loc, w), mask[loc], _k_of_row(E))
    agree = torch.zeros(2 * E)
    for k, (ib, _) in base_topk.items():
        ip, wp = post_topk[k]
        agree += _per_row((ib == ip).float().sum(-1), wp) / (wp.sum(1).clamp(min=1) * k)
    return [{"reliability": float(acc[j]), "t_generality": float(acc[E + j]), "m_generality": float(acc[2 * E + j]),
             "t_locality": float(agree[j]), "m_locality": float(agree[E + j]), "index": int(case_index[j])}
            for j in range(E)]


def _valid(batch: dict, r: int, field: str = "input_ids") -> torch.Tensor:
    return batch[field][r, : int(batch["attention_mask"][r].sum())]


def _right_padded(rows: list[torch.Tensor], pad: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length id rows -> `(ids [R, L], mask [R, L])`, right-padded (pad id never read: masked)."""
    length = max(len(x) for x in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, x in enumerate(rows):
        ids[r, : len(x)], mask[r, : len(x)] = x, 1
    return ids, mask


def joined(post: dict, contexts: list[torch.Tensor], image_token: int, pad: int = 1):
    """Rows `[image slots][context][input text]` (each row's context spliced in after its image slots), right-padded
    -> `(ids [R, Lj], mask [R, Lj], where_of)`; `where_of(rows, where)` maps a mask `where` over `post`'s rows
    `rows` (a slice) to `(row indices, positions)` of the same tokens in the joined rows (row-major order)."""
    R, L = post["input_ids"].shape
    parts, n_img, n_ctx = [], torch.zeros(R, dtype=torch.long), torch.zeros(R, dtype=torch.long)
    for r in range(R):
        ids = _valid(post, r)
        n = int((ids == image_token).sum())
        parts.append(torch.cat([ids[:n], contexts[r], ids[n:]]))
        n_img[r], n_ctx[r] = n, len(contexts[r])
    ids, mask = _right_padded(parts, pad)
    t = torch.arange(L)
    pos = t[None] + (t[None] >= n_img[:, None]) * n_ctx[:, None]  # [R, L]: where each input position went

    def where_of(rows: slice, where: torch.Tensor):
        at = where.nonzero()
        return at[:, 0] + rows.start, pos[rows][where]

    return ids, mask, where_of


class BatchedIKE:
    """IKE, E cases per call: the unedited locality pass; then the edit input and its rephrase, which show the same
    image, share `[image slots][case's context]`: that block runs once per case (E rows, `use_cache`) and the 2E
    texts from its keys and values (one call); the other 3E post-edit rows `[image slots][context][input text]`
    as one right-padded call. The contexts are the ids our side retrieved and tokenised, saved with the cases; the
    head runs at the scored positions of the inputs' own tokens only."""

    def __init__(self, model, exact_match: bool = True, compile: bool = False):
        for p in model.parameters():
            p.requires_grad_(False)
        self.b, self.em = Batched(model, compile), exact_match

    def _shared(self, post: dict, ctx: list[torch.Tensor], feats: torch.Tensor, E: int):
        """Final hidden states `[2E, Lt, D]` of the edit and rephrase rows' texts (row `2j + k`: case j, input k)
        from one run of their shared `[image slots][context]`, and `[2E]` each row's image-slot count."""
        heads, tails, n_img = [], [], []
        for j in range(E):
            ids = _valid(post, j)
            n = int((ids == self.b.image_token).sum())
            heads.append(torch.cat([ids[:n], ctx[j]]))
            for r in (j, E + j):
                tails.append(_valid(post, r)[n:])
                n_img.append(n)
        head_ids, head_mask = _right_padded(heads)
        tail_ids, tail_mask = _right_padded(tails)
        emb = self.b.embed(head_ids)
        emb = emb.masked_scatter((head_ids == self.b.image_token).unsqueeze(-1), feats.to(emb.dtype))
        cache = self.b.decoder(inputs_embeds=emb, attention_mask=head_mask, use_cache=True).past_key_values
        cache.batch_repeat_interleave(2)
        mask = torch.cat([head_mask.repeat_interleave(2, 0), tail_mask], 1)
        h = self.b.decoder(inputs_embeds=self.b.embed(tail_ids), attention_mask=mask, cache=cache,
                           use_cache=True).last_hidden_state
        return h, torch.tensor(n_img)

    def run(self, cases: dict, idx: np.ndarray) -> list[dict]:
        inputs = {name: _stack(cases, name, idx) for name in INPUT_ORDER}
        ctx = [torch.from_numpy(cases["context_ids"][i][cases["context_mask"][i].astype(bool)].astype(np.int64))
               for i in idx]
        E = len(idx)
        with torch.inference_mode():
            table = feature_table(self.b, cases, inputs)
            base_topk = base_locality(self.b, inputs, table)
            post = _concat([inputs[n] for n in INPUT_ORDER])  # input-major rows: case = row % E
            hidden_at = self.post_hidden(post, ctx, table, E)
            return score(lambda rows, where: self.b.head(hidden_at(rows, where)), post["labels"],
                         post["attention_mask"], base_topk, cases["case_index"][idx], self.em)

    def post_hidden(self, post: dict, ctx: list[torch.Tensor], table: dict, E: int):
        """The post-edit pass over the 5E input-major rows: -> `hidden_at(rows, where)`, the final hidden states
        `[P, D]` at the True positions of `where` (a mask over `post`'s rows `rows`, a slice), row-major."""
        h_shared, n_img = self._shared(post, ctx, feats_of({"image_ids": post["image_ids"][:E]}, table), E)
        rest = {k: v[2 * E :] for k, v in post.items()}  # image rephrase, loc, loc_image
        ids, mask, where_of = joined(rest, ctx * 3, self.b.image_token)
        h_rest = self.b.hidden(ids, mask, feats_of(rest, table))

        def hidden_at(rows: slice, where: torch.Tensor) -> torch.Tensor:
            parts = []
            if rows.start < 2 * E:  # the edit and rephrase rows: from the shared run
                at = where[: 2 * E - rows.start].nonzero()
                i = at[:, 0] + rows.start
                parts.append(h_shared[2 * (i % E) + i // E, at[:, 1] - n_img[i]])
            if rows.stop > 2 * E:
                lo = max(rows.start, 2 * E)
                r, t = where_of(slice(lo - 2 * E, rows.stop - 2 * E), where[lo - rows.start :])
                parts.append(h_rest[r, t])
            return torch.cat(parts)

        return hidden_at


class BatchedSerac:
    """SERAC_MULTI, E cases per call, on the faithful peer's modules (`PE.SeracEditor`): the base model over the 5E
    post-edit rows, the scope classifier over the E memory keys and the 5E queries (two padded calls), the image
    keys from the batch's features (`scope_image`), the counterfactual over the 5E rows `[projected image][memory
    text][query text]` (one call), and the mixture (or the hard switch) at the scored positions only."""

    def __init__(self, model, serac: PE.SeracEditor, exact_match: bool = True, compile: bool = False):
        for p in model.parameters():
            p.requires_grad_(False)
        self.b, self.serac, self.em = Batched(model, compile), serac, exact_match
        self.cf = serac.counterfactual
        self.cf_decoder = maybe_compile(self.cf.model, compile)
        serac.classifier = maybe_compile(serac.classifier, compile)  # this peer's own SeracEditor

    def _texts(self, batch: dict, reading: str) -> list[torch.Tensor]:
        """Each row's text ids (image slots dropped; `reading="prompt"` also drops its answer tokens)."""
        out = []
        for r in range(batch["input_ids"].shape[0]):
            ids, labels = _valid(batch, r), _valid(batch, r, "labels")
            keep = ids != self.serac.image_token_id
            if reading == "prompt":
                keep &= labels == PE.IGNORE
            out.append(ids[keep])
        return out

    def _embed(self, texts: list[torch.Tensor]) -> torch.Tensor:
        """The classifier's embeddings `[N, H]` of N texts, one right-padded call."""
        length = max(len(x) for x in texts)
        ids = torch.zeros((len(texts), length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, x in enumerate(texts):
            ids[r, : len(x)], mask[r, : len(x)] = x, 1
        return self.serac.embed(ids, mask)

    def _image_keys(self, batch: dict, feats: torch.Tensor | None) -> torch.Tensor:
        """`[N, D_img]`: each row's image key, one matmul over the rows' features `feats` (`feats_of`, rows with an
        image in order), the text-only key where a row shows none."""
        keys = self.serac.image_key_of(None).expand(batch["image_ids"].shape[0], -1).clone()
        if feats is not None:
            keys[batch["image_ids"] >= 0] = self.serac.image_key_of(feats)
        return keys

    def run(self, cases: dict, idx: np.ndarray) -> list[dict]:
        inputs = {name: _stack(cases, name, idx) for name in INPUT_ORDER}
        meta = self.serac.meta
        with torch.inference_mode():
            table = feature_table(self.b, cases, inputs)
            base_topk = base_locality(self.b, inputs, table)
            post = _concat([inputs[n] for n in INPUT_ORDER])  # input-major rows: case = row % E
            feats = feats_of(post, table)
            hb = self.b.hidden(post["input_ids"], post["attention_mask"], feats)
            # Scope: the memory keys once per edit, the queries once per row.
            edit = inputs["edit_inner"]
            keys = self._embed(self._texts(edit, meta.get("scope_key", "text_input"))).repeat(5, 1)
            queries = self._embed(self._texts(post, meta["scope_query"]))
            image_dist = 0.0
            if self.serac.scope_image is not None:
                query_keys = self._image_keys(post, feats)
                slot = query_keys[: len(idx)].repeat(5, 1)  # the edit rows come first: their keys are the slots'
                image_dist = ((slot - query_keys) ** 2).sum(-1)
            s = self.serac.similarity(keys, queries, image_dist)  # [5E]
            # The counterfactual: the memory text after the image slots (projected image embeddings).
            ids, mask, where_of = joined(post, self._texts(edit, "text_input") * 5, self.serac.image_token_id)
            slots = ids == self.serac.image_token_id
            emb = self.cf.get_input_embeddings()(ids.clamp(0, self.cf.config.vocab_size - 1))
            if feats is not None:
                emb = emb.masked_scatter(slots.unsqueeze(-1), self.serac.projection(feats).to(emb.dtype))
            hc = self.cf_decoder(inputs_embeds=emb, attention_mask=mask, use_cache=False).last_hidden_state
            head = self.cf.get_output_embeddings()

            def logits_at(rows, where):
                base = self.b.logits_at(hb[rows], where).float()
                r, t = where_of(rows, where)
                cf = head(hc[r, t]).float()
                sr = s[r][:, None]
                if meta["hard_routing"]:
                    return torch.where(sr > 0.5, cf, base)
                p = (1.0 - sr) * torch.softmax(base, -1) + sr * torch.softmax(cf, -1)
                return torch.log(p + self.serac.eps)

            return score(logits_at, post["labels"], post["attention_mask"], base_topk, cases["case_index"][idx],
                         self.em)


def ke_condition_batch(net: PE.KENet, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[E, C]` conditions of E right-padded condition sequences in one packed BiLSTM call (an empty one: zero
    states, as `KENet.condition`)."""
    lengths = mask.sum(1)
    h = torch.zeros(ids.shape[0], 2 * net.lstm.hidden_size)
    nz = lengths > 0
    if nz.any():
        packed = torch.nn.utils.rnn.pack_padded_sequence(net.embedding(ids[nz]), lengths[nz].cpu(), batch_first=True,
                                                         enforce_sorted=False)
        _, (h_n, _) = net.lstm(packed)
        h[nz] = torch.cat([h_n[0], h_n[1]], -1)
    return torch.tanh(net.cond(h))


def make_peer(model, editor: str, mend: str | None = None, ke: str | None = None, exact_match: bool = True,
              serac: str | None = None, compile: bool = False):
    """A batched peer on `model` from the faithful peer's editor files (MEND: EasyEdit state dict; KE: `KENet`;
    SERAC: `compare_peer.serac_to_torch`'s file; IKE: none, the contexts come with the cases)."""
    if editor == "mend":
        blob = torch.load(mend, map_location="cpu", weights_only=True)
        net = PE.MendTransform(blob["state_dict"], blob["meta"])
        return BatchedPeer(model, "mend", net, net.names, exact_match, compile)
    if editor == "ke":
        ke_editor = PE.make_editor("ke", model, ke_path=ke)
        return BatchedPeer(model, "ke", ke_editor.net, ke_editor.names, exact_match, compile)
    if editor == "ike":
        return BatchedIKE(model, exact_match, compile)
    if editor == "serac":
        return BatchedSerac(model, PE.make_editor("serac", model, serac_path=serac), exact_match, compile)
    raise ValueError(f"the best-effort peer has MEND, KE, IKE and SERAC, not {editor!r}")


def run_cases(peer: BatchedPeer, cases: dict, batch: int, limit: int | None = None) -> list[dict]:
    """Every case (the first `limit`), `batch` at a time."""
    n = PE.num_cases(cases) if limit is None else min(limit, PE.num_cases(cases))
    rows = []
    for start in range(0, n, batch):
        rows += peer.run(cases, np.arange(start, min(start + batch, n)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--editor", required=True, choices=("mend", "ke", "ike", "serac"))
    ap.add_argument("--mend")
    ap.add_argument("--ke")
    ap.add_argument("--serac")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--token-accuracy", action="store_true")
    args = ap.parse_args(argv)
    model = PE.load_model(args.hf)
    peer = make_peer(model, args.editor, args.mend, args.ke, not args.token_accuracy, args.serac)
    cases = PE.load_cases(args.cases)
    run_cases(peer, cases, args.batch)
    t0 = time.perf_counter()
    rows = run_cases(peer, cases, args.batch)
    dt = time.perf_counter() - t0
    print(f"best-effort peer {args.editor}: {len(rows) / dt:.1f} edits/s at E={args.batch}", file=sys.stderr)


if __name__ == "__main__":
    main()
