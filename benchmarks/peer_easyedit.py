"""The peer: EasyEdit's editing procedure in PyTorch on transformers' BLIP-2, one edit at a time.

Runs on the SAME weights as ours (a `save_pretrained` directory written by `mmedit_jax.convert.export_hf`) and
the SAME cases (our prepared token arrays and preprocessed pixels, saved by `compare_peer.save_cases` under
EasyEdit's input names: `edit_inner`, `edit_outer`, `edit_outer_image`, `loc`, `loc_image`), so neither
tokenisation nor image preprocessing can differ. `compare_peer.py` prepares those files, runs this file as its own
process and compares the two sides. Per case, as `MultimodalTrainer.edit_step` in eval mode:

  1. no grad: base logits on `loc` and `loc_image` (what locality compares against);
  2. the edit, on a copy of each edited child module (EasyEdit `_make_child_functional_model` copies the edited
     children; the shared model is restored afterwards, so every case is a fresh single edit):
     * FT-L: `copy.deepcopy` of each edited Linear, `torch.optim.AdamW(lr, betas, eps, weight_decay)` for
       `num_steps` steps on their weights only, loss = mean NLL of the edit example's answer tokens;
     * MEND: forward hook (layer input) + full backward hook (gradient at the layer output) on every inner
       param's module, `loss.backward()` on the edit example (EasyEdit's `requires_grad` rule: frozen up to the
       first inner param), rows kept iff `any(u) & any(delta)`, the GradientTransform of an EasyEdit MEND state
       dict (normalise, IDMLP with modes, clamp, residual), `W + lr * einsum('bi,bj->ji', u~, delta~)` (minus
       for `descent`) written into the copied module;
     * KE: `torch.autograd.grad` of the edit loss w.r.t. the edited weights (dense `[out, in]`, as the original
       KnowledgeEditor and the EFK port take it), the condition from a torch BiLSTM (`nn.LSTM`, bidirectional,
       over the case's unpadded `cond` tokens; final states [forward; backward] -> Linear -> tanh), per matrix
       `nn.Sequential(weight_norm(Linear), Tanh, weight_norm(Linear))` split [a_col, a_row, b_col, b_row, eta],
       `W + max_scale * sigmoid(eta) * (grad * softmax(a_row)^T a_col + softmax(b_row)^T b_col)` written into
       the copied module;
     * IKE: no weight changes; the case's demonstration context (our side's ids, saved with the cases) goes
       between the image slots and the text of every post-edit input, whose own positions are scored;
     * SERAC: no weight changes; the edit input is the memory, and every post-edit forward is `SERAC_MULTI`'s
       routed one (`SeracEditor.routed_logits`);
  3. no grad: the five post-edit forwards, and the metrics as EasyEdit computes them (`multiclass_log_probs`
     accuracy / exact match with the causal shift; `topk(softmax(logits), k).indices` agreement, k=1 text,
     k=10 image, over every position).
Each case runs unpadded (batch size 1, as the reference): the arrays' right padding is cut off.

This file imports neither JAX nor mmedit_jax (its memory figure is PyTorch's alone).

    python benchmarks/peer_easyedit.py --hf DIR --cases cases.npz --editor ft-l --ft-json ft.json --out peer.json
    python benchmarks/peer_easyedit.py --hf DIR --cases cases.npz --editor mend --mend mend_easyedit.pt --out peer.json
    python benchmarks/peer_easyedit.py --hf DIR --cases cases.npz --editor ke --ke ke_torch.pt --out peer.json
    python benchmarks/peer_easyedit.py --hf DIR --cases cases.npz --editor serac --serac serac_torch.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time

import numpy as np
import torch

SUB_INPUTS = ("edit_inner", "edit_outer", "edit_outer_image", "loc", "loc_image")  # EasyEdit's names
METRICS = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality")
ACC_INPUT = {"reliability": "edit_inner", "t_generality": "edit_outer", "m_generality": "edit_outer_image"}
IGNORE = -100


# --------------------------------------------------------------------------------------------------
# Cases: our prepared arrays, one npz file (`compare_peer.save_cases`).


def load_cases(path: str) -> dict[str, np.ndarray]:
    """`{"<input>/<field>": [N, ...], "pixels", "case_index", "cond_ids", "cond_mask", "valid"}`, inputs under
    EasyEdit's names (`SUB_INPUTS`); fields `input_ids`, `attention_mask`, `labels`, `image_ids` (-1: no image)."""
    with np.load(path) as z:
        return dict(z)


def num_cases(cases: dict) -> int:
    return int(cases["case_index"].shape[0])


def case_inputs(cases: dict, i: int) -> dict[str, dict]:
    """The five inputs of case i as batch-1 tensors, right padding removed, the KE condition `cond` (its valid
    token ids, in order) and, for IKE, the demonstration `context` (its valid ids)."""
    keep = cases["cond_mask"][i].astype(bool)
    out = {"cond": {"input_ids": torch.from_numpy(cases["cond_ids"][i][keep].astype(np.int64))[None]}}
    if "context_ids" in cases:
        ctx = cases["context_mask"][i].astype(bool)
        out["context"] = torch.from_numpy(cases["context_ids"][i][ctx].astype(np.int64))[None]
    for name in SUB_INPUTS:
        mask = cases[f"{name}/attention_mask"][i]
        n = int(mask.sum())
        img = int(cases[f"{name}/image_ids"][i])
        out[name] = {
            "input_ids": torch.from_numpy(cases[f"{name}/input_ids"][i, :n].astype(np.int64))[None],
            "attention_mask": torch.from_numpy(mask[:n].astype(np.int64))[None],
            "labels": torch.from_numpy(cases[f"{name}/labels"][i, :n].astype(np.int64))[None],
            "pixel_values": None if img < 0 else torch.from_numpy(cases["pixels"][img])[None],
        }
    return out


def logits_of(model, x: dict) -> torch.Tensor:
    """`[1, L, V]` float32 logits of one input (text-only inputs go straight to the language model, as the
    reference's wrapper does for `loc`)."""
    if x["pixel_values"] is None:
        return model.language_model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    return model(pixel_values=x["pixel_values"], input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits


# --------------------------------------------------------------------------------------------------
# EasyEdit's losses and metrics (`easyeditor/trainer/losses.py`, `MultimodalTrainer.edit_step`).


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`masked_log_probs(..., shift=True)["nll"]`: mean NLL over answer tokens, logits[:, :-1] vs labels[:, 1:]."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return -(lp * mask).sum() / mask.sum()


def edit_accuracy(logits: torch.Tensor, labels: torch.Tensor, exact_match: bool) -> float:
    """`multiclass_log_probs`: argmax of logits[:, :-1] against labels[:, 1:] on answer tokens; EM or token acc."""
    pred, targ = logits[:, :-1].argmax(-1), labels[:, 1:]
    mask = targ != IGNORE
    if exact_match:
        return float((pred.masked_fill(~mask, 0) == targ.masked_fill(~mask, 0)).all(-1).float().mean())
    return float(((pred == targ) & mask).sum() / mask.sum())


def topk_locality(base: torch.Tensor, post: torch.Tensor, k: int) -> float:
    """`loc/acc` (k=1) and `image_loc/acc` (k=10): rank-wise agreement of topk(softmax) indices, all positions."""
    b = torch.topk(torch.softmax(base, -1), k=k, dim=-1).indices
    p = torch.topk(torch.softmax(post, -1), k=k, dim=-1).indices
    return float((b == p).sum() / p.numel())


# --------------------------------------------------------------------------------------------------
# Edited copies of child modules.


def _parent_and_attr(model, weight_name: str):
    path = weight_name.removesuffix(".weight")
    parent_path, _, attr = path.rpartition(".")
    return model.get_submodule(parent_path), attr


class _Installed:
    """Copies of the edited child modules installed in the model; `restore()` puts the originals back."""

    def __init__(self, model, names):
        self.slots = []
        self.copies = {}
        for n in names:
            parent, attr = _parent_and_attr(model, n)
            original = getattr(parent, attr)
            clone = copy.deepcopy(original)
            setattr(parent, attr, clone)
            self.slots.append((parent, attr, original))
            self.copies[n] = clone

    def restore(self):
        for parent, attr, original in self.slots:
            setattr(parent, attr, original)


class FTEditor:
    """FT-L as VLKEB's FT (EasyEdit has none for BLIP-2): AdamW steps on the inner params' weights."""

    def __init__(self, model, inner_params, num_steps=15, edit_lr=2e-4, weight_decay=0.01, beta1=0.9, beta2=0.999,
                 eps=1e-8):
        self.model, self.names = model, list(inner_params)
        self.num_steps, self.kw = num_steps, dict(lr=edit_lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        for p in model.parameters():
            p.requires_grad_(False)

    def edit(self, case) -> _Installed:
        inst = _Installed(self.model, self.names)
        weights = [inst.copies[n].weight for n in self.names]
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.AdamW(weights, **self.kw)
        x = case["edit_inner"]
        for _ in range(self.num_steps):
            opt.zero_grad(set_to_none=True)
            masked_nll(logits_of(self.model, x), x["labels"]).backward()
            opt.step()
        for w in weights:
            w.requires_grad_(False)
        return inst


class MendTransform:
    """EasyEdit's MEND GradientTransform in eval mode, from an EasyEdit-layout state dict
    (`mmedit_jax.convert.mend_to_easyedit`): `(u, delta)` rows of one inner param -> `(u~, delta~)`."""

    def __init__(self, state_dict: dict, meta: dict):
        self.sd, self.meta = {k: torch.as_tensor(v) for k, v in state_dict.items()}, meta
        self.names = list(meta["inner_params"])
        self.shapes = [tuple(s) for s in meta["shapes"]]
        self.sign = -1.0 if meta["descent"] else 1.0

    def _group(self, i):
        name, shape = self.names[i], self.shapes[i]
        if self.meta["shared"]:
            members = [n for n, s in zip(self.names, self.shapes) if s == shape]
            return f"({shape[0]}, {shape[1]})", members.index(name)
        return name.replace(".", "#"), None

    def _idmlp(self, prefix, x, mode):
        i = 0
        while f"{prefix}.layers.{i}.u" in self.sd:
            p = f"{prefix}.layers.{i}."
            h = x @ self.sd[p + "v"].T @ self.sd[p + "u"].T + self.sd[p + "bias"]
            if mode is not None:
                h = h * self.sd[p + "mode_scale.weight"][mode] + self.sd[p + "mode_shift.weight"][mode]
            a = h.clamp(min=0)
            x = a + x if self.meta["init"] == "id" else a
            i += 1
        return x

    def rows(self, i, u, d):
        """Every row of `u [k, in]`, `d [k, out]` through the transform (no row dropped: batched callers mask)."""
        group, mode = self._group(i)
        g = f"mend.{group}"
        if self.meta["norm"]:
            u = (u - self.sd[g + ".u_mean"]) / (self.sd[g + ".u_std"] + 1e-7)
            d = (d - self.sd[g + ".v_mean"]) / (self.sd[g + ".v_std"] + 1e-7)
        if f"{g}.mlp.layers.0.u" in self.sd:
            out = self._idmlp(f"{g}.mlp", torch.cat([u, d], -1), mode)
            return out[:, : u.shape[-1]], out[:, u.shape[-1]:]
        u_t = self._idmlp(f"{g}.mlp1", u, mode) if f"{g}.mlp1.layers.0.u" in self.sd else u
        d_t = self._idmlp(f"{g}.mlp2", d, mode) if f"{g}.mlp2.layers.0.u" in self.sd else d
        return u_t, d_t

    def transform(self, i, u, d):
        """(u~ [k, in], delta~ [k, out]) of the kept rows (EasyEdit: `any(u) & any(delta)`)."""
        u, d = u.reshape(-1, u.shape[-1]).float(), d.reshape(-1, d.shape[-1]).float()
        keep = (u != 0).any(-1) & (d != 0).any(-1)
        return self.rows(i, u[keep], d[keep])

    def scale(self, i) -> torch.Tensor:
        """The signed step of inner param i: `W + scale * u~^T delta~`."""
        return self.sign * self.sd["edit_lrs"][i]


class MendEditor:
    """MEND from an EasyEdit-layout state dict (`mmedit_jax.convert.mend_to_easyedit`), applied the EasyEdit way."""

    def __init__(self, model, state_dict: dict, meta: dict):
        self.model, self.net = model, MendTransform(state_dict, meta)
        self.names = self.net.names
        # EasyEdit MEND.__init__: no grad up to the first inner param, the rest keeps requires_grad.
        seen = False
        for n, p in model.named_parameters():
            seen = seen or n == self.names[0]
            p.requires_grad_(seen)
        if not seen:
            raise ValueError(f"inner param {self.names[0]!r} is not a parameter of the model")
        self.modules = {n: _parent_and_attr(model, n) for n in self.names}
        for parent, attr in self.modules.values():  # EasyEdit hooks.py
            mod = getattr(parent, attr)
            mod.register_forward_hook(self._fwd_hook)
            mod.register_full_backward_hook(self._bwd_hook)

    @staticmethod
    def _fwd_hook(mod, inputs, output):
        mod.weight.__x__ = inputs[0].detach()

    @staticmethod
    def _bwd_hook(mod, grad_in, grad_out):
        mod.weight.__delta__ = grad_out[0].detach()

    def edit(self, case) -> _Installed:
        x = case["edit_inner"]
        masked_nll(logits_of(self.model, x), x["labels"]).backward()
        self.model.zero_grad(set_to_none=True)
        updates = {}
        with torch.no_grad():
            for i, n in enumerate(self.names):
                w = getattr(*self.modules[n]).weight
                u_t, d_t = self.net.transform(i, w.__x__, w.__delta__)
                updates[n] = self.net.scale(i) * torch.einsum("bi,bj->ji", u_t, d_t)
                del w.__x__, w.__delta__
            inst = _Installed(self.model, self.names)
            for n, upd in updates.items():
                inst.copies[n].weight.add_(upd)
        return inst


def _head_key(weight_name: str) -> str:
    return weight_name.replace(".", "#")  # ModuleDict keys may not contain dots


class KENet(torch.nn.Module):
    """KnowledgeEditor's hypernetwork as torch modules (`one_shot_learner.py`'s layout: embedding, BiLSTM,
    FeedForward(2H -> C, tanh), per edited matrix a `ConditionedParameter`). `shapes`: `{weight name: (out, in)}`."""

    def __init__(self, vocab: int, emb_dim: int, lstm_hidden: int, condition_dim: int, hidden_dim: int,
                 shapes: dict, max_scale: float):
        super().__init__()
        wn = torch.nn.utils.parametrizations.weight_norm  # dim=0: one norm per output unit
        self.max_scale = max_scale
        self.embedding = torch.nn.Embedding(vocab, emb_dim)
        self.lstm = torch.nn.LSTM(emb_dim, lstm_hidden, batch_first=True, bidirectional=True)
        self.cond = torch.nn.Linear(2 * lstm_hidden, condition_dim)
        self.heads = torch.nn.ModuleDict({
            _head_key(n): torch.nn.Sequential(wn(torch.nn.Linear(condition_dim, hidden_dim)), torch.nn.Tanh(),
                                              wn(torch.nn.Linear(hidden_dim, 2 * (m + k) + 1)))
            for n, (m, k) in shapes.items()})

    def condition(self, ids: torch.Tensor) -> torch.Tensor:
        """`[1, C]` from unpadded ids `[1, L]`: the final forward state (last token) and backward state (token 0)."""
        if ids.shape[1] == 0:  # an empty condition: the LSTM never steps, both states stay zero
            h = torch.zeros(1, 2 * self.lstm.hidden_size)
        else:
            _, (h_n, _) = self.lstm(self.embedding(ids))
            h = torch.cat([h_n[0], h_n[1]], -1)
        return torch.tanh(self.cond(h))

    def update(self, name: str, c: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """`ConditionedParameter.forward` for a 2-d weight: the update of weight `name` `[out, in]` from its grad."""
        m, n = grad.shape
        a_col, a_row, b_col, b_row, eta = self.heads[_head_key(name)](c).split([n, m, n, m, 1], dim=-1)
        a = a_row.softmax(-1).T @ a_col
        b = b_row.softmax(-1).T @ b_col
        return self.max_scale * eta.sigmoid().squeeze() * (grad * a + b)


class KEEditor:
    """KE from a torch state dict of `KENet` (exported from our parameters by `compare_peer.ke_to_torch`)."""

    def __init__(self, model, state_dict: dict, meta: dict):
        self.model, self.names = model, list(meta["inner_params"])
        cfg = meta["config"]
        emb = state_dict["embedding.weight"]
        self.net = KENet(emb.shape[0], emb.shape[1], cfg["lstm_hidden"], cfg["condition_dim"], cfg["hidden_dim"],
                         {n: tuple(s) for n, s in zip(self.names, meta["shapes"])}, cfg["max_scale"])
        self.net.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()})
        self.net.eval().requires_grad_(False)
        for p in model.parameters():
            p.requires_grad_(False)
        self.weights = [model.get_parameter(n) for n in self.names]
        for w in self.weights:
            w.requires_grad_(True)

    def edit(self, case) -> _Installed:
        x = case["edit_inner"]
        # The reference differentiates without create_graph: the gradient is a constant input to the editor.
        grads = torch.autograd.grad(masked_nll(logits_of(self.model, x), x["labels"]), self.weights)
        with torch.no_grad():
            c = self.net.condition(case["cond"]["input_ids"])
            updates = {n: self.net.update(n, c, g) for n, g in zip(self.names, grads)}
            inst = _Installed(self.model, self.names)
            for n, upd in updates.items():
                inst.copies[n].weight.add_(upd)
        return inst


# --------------------------------------------------------------------------------------------------
# The run.


class _Context:
    """IKE's "edit": no weight changes; each post-edit input reads `[image slots][context][text]` (EasyEdit's
    prompt `demos + "New Fact: ..." + x` after the image), and its logits at the input's own positions are kept
    (what the metrics compare, as `ike.InContextFns` returns them)."""

    def __init__(self, context: torch.Tensor, num_query_tokens: int):
        self.context, self.nq = context, num_query_tokens

    def logits(self, model, x: dict) -> torch.Tensor:
        n = self.nq if x["pixel_values"] is not None else 0
        ids, lc = x["input_ids"], self.context.shape[1]
        joined = dict(x, input_ids=torch.cat([ids[:, :n], self.context, ids[:, n:]], 1),
                      attention_mask=torch.ones((1, ids.shape[1] + lc), dtype=torch.long))
        out = logits_of(model, joined)
        return torch.cat([out[:, :n], out[:, n + lc:]], 1)

    def restore(self) -> None:
        pass


class IKEEditor:
    """IKE (EasyEdit's multimodal IKE): the case's demonstration context, retrieved and tokenised by our side
    (`compare_peer.prepare` saves it with the cases), read before every post-edit input."""

    def __init__(self, model):
        self.nq = int(model.config.num_query_tokens)

    def edit(self, case) -> _Context:
        return _Context(case["context"], self.nq)


class _Memory:
    """SERAC's "edit": the edit's input held in a one-entry cache (no weight changes); each post-edit forward is
    SERAC_MULTI's routed forward against it (`SeracEditor.routed_logits`)."""

    def __init__(self, serac, edit: dict):
        self.serac, self.edit = serac, edit
        self.image_key = None  # `scope_image`: the slot's image key, computed on first use, once per edit

    def logits(self, model, x: dict) -> torch.Tensor:
        return self.serac.routed_logits(model, self, x)

    def restore(self) -> None:
        pass


class SeracEditor:
    """SERAC (EasyEdit's `SERAC_MULTI`) on transformers modules holding our trained networks
    (`compare_peer.serac_to_torch`): a DistilBERT / BERT scope classifier, an OPT counterfactual, the image
    projection. Token ids are the base model's, as our side's (the classifier's clamped to its vocabulary); each
    forward re-encodes the memory, as the reference's `run_classifier` does."""

    def __init__(self, model, state_dict: dict, meta: dict):
        import transformers

        self.meta, self.image_token_id = meta, int(meta["image_token_id"])
        cls_config = transformers.AutoConfig.for_model(meta["classifier_kind"], **meta["classifier_config"])
        self.classifier = transformers.AutoModel.from_config(cls_config, attn_implementation="eager").eval()
        self.classifier.load_state_dict(state_dict["classifier"], strict=False)  # BERT: no pooler weights
        cf_config = transformers.OPTConfig(**meta["counterfactual_config"])
        self.counterfactual = transformers.OPTForCausalLM._from_config(cf_config, attn_implementation="eager").eval()
        self.counterfactual.load_state_dict(state_dict["counterfactual"], strict=True)
        proj = state_dict["projection"]
        self.projection = torch.nn.Linear(proj["weight"].shape[1], proj["weight"].shape[0])
        self.projection.load_state_dict(proj)
        self.scope_image = state_dict.get("scope_image") if meta.get("scope_image") else None
        self.eps = torch.finfo(torch.float32).eps

    def edit(self, case) -> _Memory:
        return _Memory(self, case["edit_inner"])

    def text(self, x: dict, reading: str = "text_input") -> torch.Tensor:
        """`[1, T]`: the input's text ids (image slots dropped); `reading="prompt"` also drops its answer tokens
        (the classifier reads a query as `scope_query` says, the memory key as `scope_key` says)."""
        ids = x["input_ids"][0]
        keep = ids != self.image_token_id
        if reading == "prompt":
            keep &= x["labels"][0] == IGNORE
        return ids[keep][None]

    def embed(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[N, T]` (right-padded where `mask` is given) -> the classifier's CLS embeddings `[N, H]`."""
        ids = ids.clamp(0, self.classifier.config.vocab_size - 1)
        mask = torch.ones_like(ids) if mask is None else mask
        e = self.classifier(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        return torch.tanh(e) if self.meta["bound_embeds"] else e

    def image_key(self, model, x: dict) -> torch.Tensor:
        """`[1, D_img]` (our image-aware scope, `scope_image`; not in SERAC_MULTI): the mean of the input's image
        embeddings (the base model's projected Q-Former outputs, a vision pass of its own) through the trained
        kernel, or the trained `no_image` key for a text-only input."""
        if x["pixel_values"] is None:
            return self.image_key_of(None)
        return self.image_key_of(model.get_image_features(pixel_values=x["pixel_values"]).pooler_output)

    def image_key_of(self, image: torch.Tensor | None) -> torch.Tensor:
        """`[N, D_img]` image keys of image embeddings `[N, nq, D]`; None: the text-only key `[1, D_img]`."""
        if image is None:
            return self.scope_image["no_image"][None]
        return image.mean(1) @ self.scope_image["kernel"]

    def similarity(self, key: torch.Tensor, query: torch.Tensor, image_dist=0.0) -> torch.Tensor:
        """`s = exp(-dist)` `[N]` of keys and queries `[N, H]`, the reference's distances (scale 1), plus
        `image_dist` (`scope_image`)."""
        if self.meta["cos"]:
            dist = 1.0 - torch.nn.functional.cosine_similarity(key, query, dim=-1)
        else:
            dist = ((key - query) ** 2).sum(-1)
            if not self.meta["square"]:
                dist = dist.clamp_min(1e-12).sqrt()
        return torch.exp(-(dist + image_dist))

    def counterfactual_logits(self, model, ctx: torch.Tensor, x: dict) -> torch.Tensor:
        """`[1, L, V]` at the query's own positions: the counterfactual on `[projected image][ctx][query text]`."""
        ids = x["input_ids"]
        n = int((ids[0] == self.image_token_id).sum())
        joined = torch.cat([ids[:, :n], ctx, ids[:, n:]], 1).clamp(0, self.counterfactual.config.vocab_size - 1)
        embeds = self.counterfactual.get_input_embeddings()(joined)
        if n:
            image = model.get_image_features(pixel_values=x["pixel_values"]).pooler_output  # a second vision pass
            embeds = torch.cat([self.projection(image), embeds[:, n:]], 1)
        out = self.counterfactual(inputs_embeds=embeds, attention_mask=torch.ones(joined.shape, dtype=torch.long))
        lc = ctx.shape[1]
        return torch.cat([out.logits[:, :n], out.logits[:, n + lc:]], 1)

    def routed_logits(self, model, memory: _Memory, x: dict) -> torch.Tensor:
        """`SERAC_MULTI.forward` on one input: base logits, the scope classifier on the memory and the query, the
        counterfactual on the memory + query, then the soft mixture (or the hard switch)."""
        base = logits_of(model, x)
        edit = memory.edit
        ctx = self.text(edit)
        image_dist = 0.0
        if self.scope_image is not None:
            if memory.image_key is None:
                memory.image_key = self.image_key(model, edit)
            image_dist = ((memory.image_key - self.image_key(model, x)) ** 2).sum(-1)
        key_text = self.text(edit, self.meta.get("scope_key", "text_input"))
        s = self.similarity(self.embed(key_text), self.embed(self.text(x, self.meta["scope_query"])), image_dist)
        cf = self.counterfactual_logits(model, ctx, x)
        if self.meta["hard_routing"]:
            return cf if s > 0.5 else base
        p = (1.0 - s) * torch.softmax(base.float(), -1) + s * torch.softmax(cf.float(), -1)
        return torch.log(p + self.eps)


def edit_and_score(model, editor, case, exact_match: bool) -> dict:
    """The faithful procedure (`MultimodalTrainer.edit_step`): 2 base forwards, the edit, 5 post-edit forwards
    (IKE: the edit is the case's context, which the post-edit forwards read)."""
    with torch.no_grad():
        base_loc = logits_of(model, case["loc"])
        base_img = logits_of(model, case["loc_image"])
    inst = editor.edit(case)
    post_logits = getattr(inst, "logits", None) or logits_of
    try:
        with torch.no_grad():
            post = {name: post_logits(model, case[name]) for name in SUB_INPUTS}
    finally:
        inst.restore()
    row = {m: edit_accuracy(post[s], case[s]["labels"], exact_match) for m, s in ACC_INPUT.items()}
    row["t_locality"] = topk_locality(base_loc, post["loc"], 1)
    row["m_locality"] = topk_locality(base_img, post["loc_image"], 10)
    return row


# --------------------------------------------------------------------------------------------------
# EasyEdit's per-record procedure as shipped (`MultimodalEditor.edit`, `compute_multimodal_edit_results`): per
# record the five metric inputs are tokenised and run on the unedited model ("pre": its accuracies and locality
# logits), the edit runs, then the five inputs are tokenised and run again on the edited model ("post"): 11
# forwards (9 of them through the vision tower) against the faithful procedure's 8 (6). Images arrive
# preprocessed (`_prepare_requests` runs the image processor before the loop), as here.


def shipped_input(tok, prompt: str, target: str, pixels, image_block: list[int]) -> dict:
    """One input as `prepare_multimodal_edit` + the BLIP-2 wrapper build it from strings: a leading space on the
    target, the prompt's length from `tok.encode`, the target ids (the reference tokenises them too; its scores
    read the wrapper's labels), `prompt + target` tokenised without special tokens, labels = ids with pad ids and
    the prompt masked; image slots (`image_block`, -100 labels) before the text when there is an image."""
    target = target if target.startswith(" ") else " " + target
    prompt_len = len(tok.encode(prompt, add_special_tokens=False))
    tok(target, add_special_tokens=False, return_tensors="pt")
    ids = tok(prompt + target, add_special_tokens=False, return_tensors="pt")["input_ids"]
    labels = ids.masked_fill(ids == tok.pad_token_id, IGNORE)
    labels[:, :prompt_len] = IGNORE
    if pixels is not None:
        block = torch.tensor([image_block], dtype=ids.dtype)
        ids, labels = torch.cat([block, ids], 1), torch.cat([torch.full_like(block, IGNORE), labels], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}


def shipped_records(cases: dict, strings: list[dict]) -> list[dict]:
    """Per case `{input: (prompt, target, pixels [1, 3, H, W] or None)}` and `cond` (the prepared KE condition
    ids): what `MultimodalEditor._prepare_requests` hands its loop. `strings`: per case `{input: [prompt, target,
    image id]}` (`compare_peer.save_strings`)."""
    out = []
    for i, per_input in enumerate(strings):
        rec = {"cond": case_inputs(cases, i)["cond"]}
        for name, (prompt, target, img) in per_input.items():
            rec[name] = (prompt, target, None if img < 0 else torch.from_numpy(cases["pixels"][img])[None])
        out.append(rec)
    return out


def check_shipped_tokens(tok, records: list[dict], cases: dict, image_block: list[int]) -> None:
    """The as-shipped tokenisation must give exactly the prepared arrays (else the two would score other text)."""
    for i, rec in enumerate(records):
        want = case_inputs(cases, i)
        for name in SUB_INPUTS:
            got = shipped_input(tok, *rec[name], image_block)
            for field in ("input_ids", "labels"):
                if not torch.equal(got[field], want[name][field]):
                    raise ValueError(f"case {i}, {name}: the as-shipped tokenisation gives other {field} than the "
                                     f"prepared arrays ({got[field].tolist()} vs {want[name][field].tolist()})")


def edit_and_score_shipped(model, editor, tok, record: dict, image_block: list[int], exact_match: bool) -> dict:
    """`MultimodalEditor.edit` for one record (single editing): pre metrics, the edit, post metrics, restore."""
    x = {name: (lambda name=name: shipped_input(tok, *record[name], image_block)) for name in SUB_INPUTS}

    def results(m):  # compute_multimodal_edit_results: five tokenised forwards, accuracies, locality logits
        out, logits = {}, {}
        with torch.no_grad():
            for name in SUB_INPUTS:
                inp = x[name]()
                logits[name] = logits_of(m, inp).detach().cpu()
                if name in ("loc", "loc_image"):
                    logits[name] = logits[name].clone()  # the reference's `_demo` variant returns a copy
                else:
                    out[name] = (edit_accuracy(logits[name], inp["labels"], exact_match),)
        return out, logits

    _pre, pre_logits = results(model)
    inst = editor.edit({"edit_inner": x["edit_inner"](), "cond": record["cond"]})
    try:
        post, post_logits = results(model)
    finally:
        inst.restore()
    row = {m: post[s][0] for m, s in ACC_INPUT.items()}
    row["t_locality"] = topk_locality(pre_logits["loc"], post_logits["loc"], 1)  # attach_topk_locality_metrics
    row["m_locality"] = topk_locality(pre_logits["loc_image"], post_logits["loc_image"], 10)
    return row


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM: per address space, so unlike `ru_maxrss` it does not inherit the
    parent's figure across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pick_threads(model, editor, case, exact_match: bool, repeats: int = 3) -> int:
    """The faster of 1 thread and torch's default for this model (on a busy machine extra intra-op threads can
    cost far more than they give); the peer gets its best setting."""
    default = torch.get_num_threads()
    best, best_t = default, float("inf")
    for t in sorted({1, default}):
        torch.set_num_threads(t)
        edit_and_score(model, editor, case, exact_match)
        t0 = time.perf_counter()
        for _ in range(repeats):
            edit_and_score(model, editor, case, exact_match)
        dt = time.perf_counter() - t0
        if dt < best_t:
            best, best_t = t, dt
    torch.set_num_threads(best)
    return best


def run_peer(model, editor, cases: dict, exact_match: bool = True, limit: int | None = None,
             warmup: int = 1, threads: int | None = None) -> dict:
    """Edits and scores every case one at a time; the first `warmup` cases are also run once untimed.
    `threads=None` picks the faster of 1 and torch's default (`pick_threads`)."""
    n = num_cases(cases) if limit is None else min(limit, num_cases(cases))
    inputs = [case_inputs(cases, i) for i in range(n)]
    if threads is None:
        pick_threads(model, editor, inputs[0], exact_match)
    else:
        torch.set_num_threads(threads)
    for i in range(min(warmup, n)):
        edit_and_score(model, editor, inputs[i], exact_match)
    rows, times = [], []
    for i in range(n):
        t0 = time.perf_counter()
        row = edit_and_score(model, editor, inputs[i], exact_match)
        times.append(time.perf_counter() - t0)
        row["index"] = int(cases["case_index"][i])
        rows.append(row)
    return {
        "rows": rows, "num_cases": n, "seconds": float(sum(times)), "edits_per_s": n / sum(times),
        "p50_ms": float(np.percentile(np.asarray(times) * 1e3, 50)),
        "p90_ms": float(np.percentile(np.asarray(times) * 1e3, 90)),
        "means": {m: 100.0 * float(np.mean([r[m] for r in rows])) for m in METRICS},
        "peak_rss_mib": peak_rss_mib(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def load_model(hf_dir: str, attn: str = "eager"):
    """transformers' BLIP-2 in float32, eval mode; `attn`: its attention implementation (the reference's own
    OPT copy computes attention eagerly)."""
    import transformers

    model = transformers.Blip2ForConditionalGeneration.from_pretrained(hf_dir, attn_implementation=attn,
                                                                       dtype=torch.float32)
    return model.eval()


def make_editor(name: str, model, ft: dict | None = None, mend_path: str | None = None, ke_path: str | None = None,
                serac_path: str | None = None):
    """The peer's editor: FT-L from its hparams (`inner_params` as module weight names), MEND from an EasyEdit
    state dict file, KE from a `KENet` state dict file (each a torch file `{'state_dict', 'meta'}`)."""
    if name == "ft-l":
        ft = dict(ft or {})
        return FTEditor(model, ft.pop("inner_params"), **ft)
    if name == "mend":
        blob = torch.load(mend_path, map_location="cpu", weights_only=True)
        return MendEditor(model, blob["state_dict"], blob["meta"])
    if name == "ke":
        blob = torch.load(ke_path, map_location="cpu", weights_only=True)
        return KEEditor(model, blob["state_dict"], blob["meta"])
    if name == "ike":
        return IKEEditor(model)
    if name == "serac":
        blob = torch.load(serac_path, map_location="cpu", weights_only=True)
        return SeracEditor(model, blob["state_dict"], blob["meta"])
    raise ValueError(f"peer editor {name!r}: choose ft-l, mend, ke, serac or ike")


def run_files(hf: str, cases: str, editor: str, ft: dict | None = None, mend: str | None = None,
              ke: str | None = None, serac: str | None = None, exact_match: bool = True, limit: int | None = None,
              threads: int | None = None, model=None, warmup: int = 1) -> dict:
    """The whole peer run on files: the exported model `hf`, the cases npz, the editor's file; `run_peer`'s result
    with `editor` added. `model`: `load_model(hf)` already loaded."""
    model = load_model(hf) if model is None else model
    result = run_peer(model, make_editor(editor, model, ft, mend, ke, serac), load_cases(cases), exact_match, limit,
                      warmup=warmup, threads=threads)
    result["editor"] = editor
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="save_pretrained directory (export_hf)")
    ap.add_argument("--cases", required=True, help="npz written by save_cases")
    ap.add_argument("--editor", required=True, choices=("ft-l", "mend", "ke", "serac", "ike"))
    ap.add_argument("--ft-json", help="FT hparams JSON (inner_params as module weight names, num_steps, ...)")
    ap.add_argument("--mend", help="torch file {'state_dict', 'meta'} (mend_to_easyedit)")
    ap.add_argument("--ke", help="torch file {'state_dict' (KENet), 'meta'} (compare_peer.ke_to_torch)")
    ap.add_argument("--serac", help="torch file {'state_dict', 'meta'} (compare_peer.serac_to_torch)")
    ap.add_argument("--token-accuracy", action="store_true")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: the faster of 1 and torch's)")
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args(argv)
    model = load_model(args.hf)
    ft = None
    if args.editor == "ft-l":
        if not args.ft_json:
            ap.error("--editor ft-l needs --ft-json")
        with open(args.ft_json) as f:
            ft = json.load(f)
    elif args.editor == "mend" and not args.mend:
        ap.error("--editor mend needs --mend")
    elif args.editor == "ke" and not args.ke:
        ap.error("--editor ke needs --ke")
    elif args.editor == "serac" and not args.serac:
        ap.error("--editor serac needs --serac")
    result = run_files(args.hf, args.cases, args.editor, ft, args.mend, args.ke, args.serac, not args.token_accuracy,
                       args.limit, threads=args.threads, model=model)
    print(f"peer {args.editor}: {result['edits_per_s']:.2f} edits/s over {result['num_cases']} cases, "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
