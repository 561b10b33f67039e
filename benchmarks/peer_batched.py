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
Forwards run under `torch.inference_mode` (the edit under grad). The frozen-prefix idea (the edit and locality
inputs' unedited layers shared between the base, edit and post passes) is not used here: transformers' OPT gives
no entry point at an inner layer. FT-L has no batched form here (each case would need its own weight copy).

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


class Batched:
    """Padded multi-row forwards of a transformers BLIP-2 (OPT decoder), the head at chosen positions only."""

    def __init__(self, model):
        self.model = model
        self.embed = model.get_input_embeddings()
        self.decoder = model.language_model.model
        self.head = model.language_model.get_output_embeddings()
        self.image_token = model.config.image_token_id

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[n, 3, H, W]` -> projected query outputs `[n, nq, D]`."""
        return self.model.get_image_features(pixel_values=pixels).pooler_output

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

    def __init__(self, model, editor: str, net, names, exact_match: bool = True):
        for p in model.parameters():
            p.requires_grad_(False)
        self.b, self.editor, self.net, self.names, self.em = Batched(model), editor, net, list(names), exact_match
        self.layers = install(model, self.names)

    def _feats(self, batch: dict, table: dict) -> torch.Tensor | None:
        ids = batch["image_ids"]
        ids = ids[ids >= 0]
        return torch.stack([table[int(i)] for i in ids]) if len(ids) else None

    def _topk(self, h, mask, k_of_row):
        """Top-k indices at every valid position, k per row (1 text, 10 image) -> list per k of `[P_k, k]`."""
        out = {}
        for k in sorted(set(k_of_row.tolist())):
            where = mask.bool() & (k_of_row == k)[:, None]
            out[k] = (torch.topk(torch.softmax(self.b.logits_at(h, where), -1), k=k, dim=-1).indices, where)
        return out

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
            used = np.unique(np.concatenate([inputs[n]["image_ids"].numpy() for n in INPUT_ORDER]))
            used = used[used >= 0]
            feats = self.b.features(torch.from_numpy(cases["pixels"][used]))
            table = {int(i): f for i, f in zip(used, feats.clone())}
            base = _concat([inputs["loc"], inputs["loc_image"]])
            k_base = torch.tensor([1] * E + [10] * E)
            hb = self.b.hidden(base["input_ids"], base["attention_mask"], self._feats(base, table))
            base_topk = self._topk(hb, base["attention_mask"], k_base)
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
            # Accuracies: the first 3E rows, head at answer positions only.
            acc_rows = slice(0, 3 * E)
            where, targ = _answer_positions(post["labels"][acc_rows])
            hit = (self.b.logits_at(hp[acc_rows], where).argmax(-1) == targ).float()
            n_hit, n_ans = _per_row(hit, where), where.sum(1).float()
            acc = (n_hit == n_ans).float() if self.em else n_hit / n_ans
            # Localities: rows 3E.. against the base pass (same rows, same valid positions).
            loc = slice(3 * E, 5 * E)
            post_topk = self._topk(hp[loc], post["attention_mask"][loc], k_base)
            agree = torch.zeros(2 * E)
            for k, (ib, _) in base_topk.items():
                ip, wp = post_topk[k]
                agree += _per_row((ib == ip).float().sum(-1), wp) / (wp.sum(1).clamp(min=1) * k)
        rows = []
        for j in range(E):
            rows.append({"reliability": float(acc[j]), "t_generality": float(acc[E + j]),
                         "m_generality": float(acc[2 * E + j]), "t_locality": float(agree[j]),
                         "m_locality": float(agree[E + j]), "index": int(cases["case_index"][idx[j]])})
        return rows


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


def make_peer(model, editor: str, mend: str | None = None, ke: str | None = None, exact_match: bool = True):
    """A `BatchedPeer` on `model` from the faithful peer's editor files (MEND: EasyEdit state dict; KE: `KENet`)."""
    if editor == "mend":
        blob = torch.load(mend, map_location="cpu", weights_only=True)
        net = PE.MendTransform(blob["state_dict"], blob["meta"])
        return BatchedPeer(model, "mend", net, net.names, exact_match)
    if editor == "ke":
        ke_editor = PE.make_editor("ke", model, ke_path=ke)
        return BatchedPeer(model, "ke", ke_editor.net, ke_editor.names, exact_match)
    raise ValueError(f"the best-effort peer has MEND and KE only, not {editor!r}")


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
    ap.add_argument("--editor", required=True, choices=("mend", "ke"))
    ap.add_argument("--mend")
    ap.add_argument("--ke")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--token-accuracy", action="store_true")
    args = ap.parse_args(argv)
    model = PE.load_model(args.hf)
    peer = make_peer(model, args.editor, args.mend, args.ke, not args.token_accuracy)
    cases = PE.load_cases(args.cases)
    run_cases(peer, cases, args.batch)
    t0 = time.perf_counter()
    rows = run_cases(peer, cases, args.batch)
    dt = time.perf_counter() - t0
    print(f"best-effort peer {args.editor}: {len(rows) / dt:.1f} edits/s at E={args.batch}", file=sys.stderr)


if __name__ == "__main__":
    main()
