"""The reference procedure in PyTorch, side by side with ours, on the same weights, cases and editor.

EasyEdit's way, one edit at a time: transformers' `Blip2ForConditionalGeneration` (our parameters exported
into it); for MEND, forward hooks record each inner layer's input and backward hooks its output gradient on
the edit example, the MEND network (our trained parameters, run in PyTorch) turns them into the rank-T update,
the whole model is deep-copied and the update added to the copy's weights; then the five metrics with the
reference's formulas (exact match on the answer, top-1 / ordered top-10 agreement with the unedited model).
Ours: the harness's vmapped program (`eval.harness.make_step_fns`) at batch E, steady state.

    python benchmarks/peer_torch.py                       # built-in world, shipped MEND, 32 eval cases
    python benchmarks/peer_torch.py --model DIR --data FILE --image-root DIR --editor-ckpt DIR --cases 64

Prints edits/s of both, the ratio, peak RSS of each side, and how closely the per-case metrics agree; `--json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METRICS = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality")


# --------------------------------------------------------------------------------------------------
# Our parameters -> a transformers model (the inverse of convert/blip2.py's rules).


def hf_config(config):
    import transformers

    v, q, t = config.vision, config.qformer, config.text
    return transformers.Blip2Config(
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                           image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                           layer_norm_eps=v.layer_norm_eps, qkv_bias=v.qkv_bias),
        qformer_config=dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
                            num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
                            hidden_act=q.hidden_act, layer_norm_eps=q.layer_norm_eps,
                            cross_attention_frequency=q.cross_attention_frequency,
                            encoder_hidden_size=q.encoder_hidden_size),
        text_config=dict(model_type="opt", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                         num_hidden_layers=t.num_hidden_layers, ffn_dim=t.ffn_dim,
                         num_attention_heads=t.num_attention_heads, max_position_embeddings=t.max_position_embeddings,
                         do_layer_norm_before=t.do_layer_norm_before, word_embed_proj_dim=t.embed_dim,
                         pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                         activation_function=t.activation_function, enable_bias=t.enable_bias),
        num_query_tokens=config.num_query_tokens, image_token_index=config.image_token_index,
    )


def export_to_torch(model):
    """Our `Blip2Model` as a transformers `Blip2ForConditionalGeneration` (eager attention, eval mode)."""
    import jax
    import torch
    import transformers

    from mmedit_jax.convert.blip2 import blip2_rules

    inverse = {"identity": lambda w: w, "linear": lambda w: w.T, "conv": lambda w: w.transpose(3, 2, 0, 1)}
    params = jax.device_get(model.params)
    rules, _ = blip2_rules(model.config)
    state = {}
    for rule in rules:
        leaf = params
        for k in rule.target.split("/"):
            leaf = leaf[k]
        leaf = np.asarray(leaf, np.float32)
        parts = list(leaf) if rule.stacked else [leaf]
        for key, part in zip(rule.sources, parts):
            state[key] = torch.from_numpy(np.ascontiguousarray(inverse[rule.transform](part)))
    hf = transformers.Blip2ForConditionalGeneration._from_config(hf_config(model.config), attn_implementation="eager")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "language_model.lm_head.weight"]  # tied
    if missing or unexpected:
        raise RuntimeError(f"export: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.tie_weights()
    return hf.eval()


# --------------------------------------------------------------------------------------------------
# MEND in PyTorch (eval mode), from our parameters.


class TorchMend:
    def __init__(self, spec, params, stats):
        import jax
        import torch

        from mmedit_jax.editors import mend_net as MN

        self.spec, self.eps = spec, MN.NORM_EPS
        t = lambda x: torch.from_numpy(np.asarray(x, np.float32))  # noqa: E731
        self.params = jax.tree.map(t, jax.device_get(params))
        self.stats = {}
        for key, st in jax.device_get(stats).items():
            self.stats[key] = {side: (t(m["mean"]), t(np.sqrt(m["m2"] / (m["count"] - 1)))) for side, m in st.items()}

    def _idmlp(self, net, x, mode):
        for i in range(len(net)):
            layer = net[f"layer_{i}"]
            pre = (x @ layer["down"]) @ layer["up"] + layer["bias"]
            if "mode_scale" in layer:
                pre = pre * layer["mode_scale"][mode] + layer["mode_shift"][mode]
            act = pre.clamp(min=0)
            x = x + act if self.spec.cfg.init == "id" else act
        return x

    def update(self, site, u, d):
        """`[out, in]` weight update of one site from `u [T, in]`, `d [T, out]` (kept rows only, as the reference)."""
        import torch

        cfg = self.spec.cfg
        keep = (u != 0).any(-1) & (d != 0).any(-1)
        u, d = u[keep], d[keep]
        key, mode = self.spec.group_of(site)
        if cfg.norm:
            (um, us), (dm, ds) = self.stats[key]["u"], self.stats[key]["delta"]
            u, d = (u - um) / (us + self.eps), (d - dm) / (ds + self.eps)
        net = self.params["nets"][key]
        if cfg.combine:
            out = self._idmlp(net["mlp"], torch.cat([u, d], -1), mode)
            u, d = out[:, : u.shape[-1]], out[:, u.shape[-1]:]
        else:
            u = self._idmlp(net["mlp_u"], u, mode) if "mlp_u" in net else u
            d = self._idmlp(net["mlp_delta"], d, mode) if "mlp_delta" in net else d
        lr = self.params["edit_lrs"][site]
        scale = -lr if cfg.descent else lr
        return scale * torch.einsum("ti,to->oi", u, d)


def torch_module(hf, site):
    """Our site name -> the transformers module it edits (language sites only, as MEND's BLIP-2 config)."""
    parts = site.split("/")
    if parts[0] != "language_model" or parts[1] != "layers":
        raise ValueError(f"peer: site {site!r} is not an OPT layer")
    mod = hf.language_model.model.decoder.layers[int(parts[2])]
    for p in parts[3:]:
        mod = getattr(mod, p)
    return mod


# --------------------------------------------------------------------------------------------------
# The reference procedure, one case at a time.


def _forward(model, seq, pixels):
    import torch

    ids = torch.from_numpy(np.asarray(seq[0], np.int64))[None]
    mask = torch.from_numpy(np.asarray(seq[1], np.int64))[None]
    if pixels is None:
        return model.language_model(input_ids=ids, attention_mask=mask).logits[0]
    return model(pixel_values=torch.from_numpy(np.asarray(pixels))[None], input_ids=ids, attention_mask=mask).logits[0]


def _nll(logits, labels):
    import torch

    labels = torch.from_numpy(np.asarray(labels, np.int64))
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)


def _exact(logits, labels):
    labels = np.asarray(labels)[1:]
    pred = logits[:-1].argmax(-1).numpy()
    ans = labels != -100
    return float(((pred == labels) | ~ans).all())


def _topk_agree(pre, post, mask, k):
    import torch

    a, b = torch.topk(torch.softmax(pre, -1), k).indices, torch.topk(torch.softmax(post, -1), k).indices
    m = np.asarray(mask, bool)
    return float((a == b).float().mean(-1).numpy()[m].mean())


def reference_edit_and_score(hf, mend: TorchMend, case: dict) -> dict:
    """One MEND edit and its five metrics, EasyEdit's way. `case`: sub-input -> (ids, mask, labels, pixels)."""
    import torch

    sites = mend.spec.sites
    inputs, grads, handles = {}, {}, []
    for s in sites:
        mod = torch_module(hf, s)
        # OPT flattens [B, L, D] to [B * L, D] around its MLP; B = 1 here, so rows are tokens either way.
        handles.append(mod.register_forward_hook(
            lambda m, i, o, s=s: inputs.__setitem__(s, i[0].detach().reshape(-1, i[0].shape[-1]))))
        handles.append(mod.register_full_backward_hook(
            lambda m, gi, go, s=s: grads.__setitem__(s, go[0].detach().reshape(-1, go[0].shape[-1]))))
    for p in hf.parameters():
        p.requires_grad_(False)
    for s in sites:
        torch_module(hf, s).weight.requires_grad_(True)
    try:
        loss = _nll(_forward(hf, case["edit_inner"], case["edit_inner"][3]), case["edit_inner"][2])
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        edited = copy.deepcopy(hf)
        for s in sites:
            upd = mend.update(s, inputs[s], grads[s])
            torch_module(edited, s).weight.add_(upd)
        for s in sites:
            torch_module(hf, s).weight.grad = None
        out = {}
        for metric, sub in (("reliability", "edit_inner"), ("t_generality", "edit_outer"),
                            ("m_generality", "edit_outer_image")):
            ids, mask, labels, pix = case[sub]
            out[metric] = _exact(_forward(edited, (ids, mask), pix), labels)
        for metric, sub, k in (("t_locality", "loc", 1), ("m_locality", "loc_image", 10)):
            ids, mask, _, pix = case[sub]
            pre, post = _forward(hf, (ids, mask), pix), _forward(edited, (ids, mask), pix)
            out[metric] = _topk_agree(pre, post, mask, k)
        del edited
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--image-root")
    ap.add_argument("--editor-ckpt")
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="our vmapped batch size")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import jax
    import torch
    from transformers import AutoTokenizer

    from mmedit_jax import evaluate as E
    from mmedit_jax.convert.mend_easyedit import load_mend
    from mmedit_jax.data.mmedit import load_mmedit
    from mmedit_jax.eval import harness
    from mmedit_jax.eval.model_fns import Blip2Fns
    from mmedit_jax.loading import from_pretrained

    if args.model:
        model_dir, data, root, ckpt = args.model, args.data, args.image_root, args.editor_ckpt
    else:
        from mmedit_jax.world import assets

        w = assets.ensure("vqa")
        model_dir, data, root, ckpt = w.model_dir, w.eval_json, w.image_root, args.editor_ckpt or w.editor_ckpts["mend"]
    torch.set_num_threads(os.cpu_count() or 1)
    model = from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = load_mmedit(data, "vqa", root, size=args.cases).records
    prepared = E.prepare_data(records, tok, model, "vqa", model.config.vision.image_size)
    n = len(records)

    # Ours: the harness's compiled step over batches of E (steady state; compile reported apart).
    editor = E.build_editor("mend", model, {}, ckpt)
    fns = Blip2Fns(model.module, pixels=editor.vision_side)
    cases = harness.make_cases(prepared.batch, E.image_table(editor, model, prepared.pixels))
    step_fns = harness.make_step_fns(editor, fns, True)
    kw = dict(batch_size=args.batch, exact_match=True, resume=False, progress=False, step_fns=step_fns)
    t0 = time.perf_counter()
    harness.run(editor, fns, model.params, cases, prepared.meta, None, **kw)
    ours_first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = harness.run(editor, fns, model.params, cases, prepared.meta, None, **kw)  # compiled: steady state
    ours_s = time.perf_counter() - t0
    ours_rss = peak_rss_mib()

    # The peer, on the exported weights and the same token arrays and pixels.
    hf = export_to_torch(model)
    spec, net, stats = load_mend(ckpt)
    mend = TorchMend(spec, net, stats)
    batch = prepared.batch
    peer_rows, times = [], []
    for i in range(n):
        case = {}
        for sub in ("edit_inner", "edit_outer", "edit_outer_image", "loc", "loc_image"):
            tb = batch.sub(sub)
            img = int(tb.image_ids[i])
            case[sub] = (tb.input_ids[i], tb.attention_mask[i], tb.labels[i],
                         None if img < 0 else prepared.pixels[img])
        t0 = time.perf_counter()
        peer_rows.append(reference_edit_and_score(hf, mend, case))
        times.append(time.perf_counter() - t0)
    # Steady state like ours: the first case warms torch up; the rest is timed whole (mean, outliers included).
    peer_s = sum(times[1:]) * n / max(n - 1, 1)
    peer_rss = peak_rss_mib()

    agree = {}
    for m in METRICS:
        a = np.array([r[m] for r in ours.rows])
        b = np.array([r[m] for r in peer_rows])
        agree[m] = dict(ours=100 * a.mean(), peer=100 * b.mean(), mean_abs_diff=float(np.abs(a - b).mean()),
                        identical=float((np.abs(a - b) < 1e-6).mean()))
    result = dict(cases=n, batch=args.batch, device=str(jax.devices()[0].device_kind),
                  torch_threads=torch.get_num_threads(),
                  ours_edits_per_s=n / ours_s, ours_first_run_s=ours_first_s, peer_edits_per_s=n / peer_s,
                  peer_p50_ms=1e3 * statistics.median(times), peer_mean_ms=1e3 * statistics.mean(times[1:]),
                  peer_edits_per_s_at_p50=1e3 / (1e3 * statistics.median(times)), ratio=(n / ours_s) / (n / peer_s),
                  ours_peak_rss_mib=ours_rss, peak_rss_after_peer_mib=peer_rss, metrics=agree)
    print(f"{n} MEND edits (edit + five metrics), {result['device']}")
    print(f"  ours (vmapped, E={args.batch}): {result['ours_edits_per_s']:.1f} edits/s "
          f"(first run with compile {ours_first_s:.1f} s)")
    print(f"  peer (PyTorch, one at a time, deepcopy): {result['peer_edits_per_s']:.1f} edits/s "
          f"(per edit: mean {result['peer_mean_ms']:.0f} ms, p50 {result['peer_p50_ms']:.0f} ms)")
    print(f"  ratio: {result['ratio']:.1f}x; peak RSS ours {ours_rss:.0f} MiB, after the peer {peer_rss:.0f} MiB")
    print(f"  {'metric':>14} {'ours':>7} {'peer':>7} {'mean|diff|':>11} {'identical':>10}")
    for m, d in agree.items():
        print(f"  {m:>14} {d['ours']:7.2f} {d['peer']:7.2f} {d['mean_abs_diff']:11.4f} {d['identical']:10.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
