"""Ours (the JAX harness: vmapped edits, compiled edit + score) against up to four PyTorch peers on the same model,
cases and editor weights, timed interleaved in one window.

    python benchmarks/compare_peer.py --editor mend                       # demo: tiny random BLIP-2, synthetic data
    python benchmarks/compare_peer.py --editor ft-l --model DIR --data FILE --image-root DIR --peers faithful,shipped
    python benchmarks/compare_peer.py --editor ke --source world          # the shipped world KE

The sides (each its own process, so each peak RSS is its own):
  * ours: the harness's two compiled step programs (the bench's), E cases per call for each E in --batches, the
    frozen-prefix cache where the editor allows it; a round also encodes every distinct image of the cases once
    (the image table: ViT, Q-Former, projection; one compiled encoder) and counts it. The "features cached" rows
    leave that out;
  * faithful (`peer_easyedit.edit_and_score`): EasyEdit's `MultimodalTrainer.edit_step` procedure, one record at
    a time: 2 base forwards, the edit's forward/backward, 5 post-edit forwards (8 forwards, 6 through the ViT);
  * shipped (`peer_easyedit.edit_and_score_shipped`): EasyEdit's per-record procedure as shipped
    (`MultimodalEditor.edit`): every input tokenised from its strings inside the step, the five metric forwards on
    the unedited model ("pre"), the edit, the five again on the edited model (11 forwards, 9 through the ViT);
  * best (`peer_batched`): the same procedure as well as PyTorch allows, --peer-batch cases at a time (features
    once per image, one padded call per pass, factored per-case patches, head at answer rows); MEND, KE, IKE and
    SERAC (no FT-L);
  * compiled: the best-effort peer under `torch.compile(dynamic=True)` (decoders, vision side, SERAC's
    classifier), warmed up on every batch before the timed rounds (`--peers ...,compiled`).
IKE (`--editor ike`) has ours, the faithful and the best-effort peer: the contexts are retrieved and tokenised once,
by our side's `Editor.prepare` (host work neither side's timed round repeats), and every side reads the same ids;
the faithful peer runs the two base forwards and the five post-edit forwards on `[image slots][context][input]`
(`peer_easyedit.IKEEditor`), the best-effort one the five as one padded call (`peer_batched.BatchedIKE`).
SERAC (`--editor serac`, a trained editor) has ours, the faithful (`peer_easyedit.SeracEditor`) and the best-effort
peer (`peer_batched.BatchedSerac`): our classifier, counterfactual OPT and image projection exported to
transformers' DistilBERT / BERT and OPT on the same weights (`serac_to_torch`); per post-edit forward the base
model, the classifier on the memory and on the query, the counterfactual on `[projected image][memory text][query
text]`, and the mixture, as `SERAC_MULTI.forward` (the best-effort peer: each of those once per batch, padded).

Steps: (1) prepare once, here: load the model and data the way `mmedit_jax.evaluate` does
(`pipeline.prepare_data`), export the weights to a transformers directory (`export_hf`), save the token arrays and
pixels (`save_cases`), the input strings (`save_strings`, for the as-shipped peer) and the editor (ours:
`editors.io.save_mend` / `save_ke`; the peers': EasyEdit's MEND state-dict layout, `mend_to_easyedit`, or a
`peer_easyedit.KENet` state dict, `ke_to_torch`; FT: the hparams). (2) start one worker per side; each loads,
compiles and warms up (untimed, all at once). (3) --rounds timed rounds: in each, every side in turn (the order
rotating) edits and scores all its cases while the others wait, every side on --threads intra-op threads
(`torch.set_num_threads`; XLA's `intra_op_parallelism_threads`). (4) print every row (edits/s = cases / median
round time), the ratios, peak memory, and per metric each peer's agreement with ours case by case (the
disagreeing cases listed); `--json` writes it all.

Model and data sources are pluggable (`SOURCES`): `files` (--model/--data/--image-root), `world` (the built-in
world's shipped model, eval split and editors via `mmedit_jax.world.assets`, the default once it exists),
`preset` (--preset mid | blip2-opt-2.7b: a random-weight BLIP-2 at real sizes on the world's eval cases, fresh
editors as for `demo`; every side holds its own copy of the weights, so at 2.7B the sides do not fit 24 GB
together: `--prepare-only --workdir D`, then `--reuse --workdir D --one-side-at-a-time`, which sets up, times and
ends each side before the next, not interleaved) and `demo`
(`mmedit_jax.demo.demo_setup`; for MEND without a checkpoint a freshly initialised MEND over the last two layers'
fc1/fc2, statistics gathered from the cases' own edit gradients; for KE without a checkpoint a fresh KE over the
same sites at ke_world.yaml's sizes, the `a_col` part of its heads' output biases perturbed so that the update is
not near zero and mostly the gradient term, `fresh_ke`; for SERAC without a checkpoint a fresh SERAC whose
counterfactual is a copy of the base language model, `fresh_serac`).

FLOPs: every side's matmul FLOPs per edit over a round are counted outside the timed rounds (ours from the step
programs' jaxprs, the image table's encoder included; the peers' on one extra round through
`torch_matmul_flops`) and printed beside the FLOP floor (`eval/floor.py`, the whole split's: each distinct image
and input once), so each row's "x floor" says how much work it does beyond the least the procedure needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

METRICS = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality")
FT_KEYS = ("num_steps", "edit_lr", "weight_decay", "beta1", "beta2", "eps")


# --------------------------------------------------------------------------------------------------
# Sources: (model, tokenizer, records, task, default editor ckpt).


def source_demo(args, workdir):
    from mmedit_jax.data.mmedit import load_mmedit
    from mmedit_jax.demo import demo_setup

    paths, tok, model = demo_setup(os.path.join(workdir, "demo"), args.demo_records, args.seed)
    loaded = load_mmedit(paths.json_path, "vqa", paths.image_root, paths.rephrase_image_root)
    return model, tok, loaded.records, "vqa", None


def source_files(args, workdir):
    from mmedit_jax import pipeline
    from mmedit_jax.data.mmedit import load_mmedit

    model, tok = pipeline.load_model(args.model, image_size=args.image_size)
    task = pipeline.task_of(args.data, args.task)
    loaded = load_mmedit(args.data, task, args.image_root, args.rephrase_image_root or args.image_root,
                         size=args.limit)
    return model, tok, loaded.records, task, args.editor_ckpt


def source_world(args, workdir):
    """The built-in world (`pipeline.world_inputs`, the interface `mmedit_jax.bench` uses)."""
    from mmedit_jax import pipeline
    from mmedit_jax.data.mmedit import load_mmedit

    task = args.task or "vqa"
    model_dir, tokenizer_dir, eval_json, image_root, ckpts = pipeline.world_inputs(task)
    model, tok = pipeline.load_model(model_dir, tokenizer_dir)
    loaded = load_mmedit(eval_json, task, image_root, image_root, size=args.limit)
    return model, tok, loaded.records, task, ckpts.get(args.editor)


def source_preset(args, workdir):
    """A random-weight BLIP-2 at a preset's real sizes (`--preset`, `models/presets.py`, as `bench --preset`) on the
    built-in world's cases, its images read at the preset's size; the editor is fresh unless --editor-ckpt."""
    from mmedit_jax import pipeline
    from mmedit_jax.data.mmedit import load_mmedit

    task = args.task or "vqa"
    _, tokenizer_dir, eval_json, image_root, _ = pipeline.world_inputs(task)
    model, tok = pipeline.preset_model(args.preset, tokenizer_dir, seed=args.seed)
    loaded = load_mmedit(eval_json, task, image_root, image_root, size=args.limit)
    return model, tok, loaded.records, task, args.editor_ckpt


def world_available() -> bool:
    try:
        from mmedit_jax.world import assets  # noqa: F401
    except ImportError:
        return False
    return True


PRESET_NAMES = ("blip2-opt-2.7b", "mid")  # models/presets.py's (not imported: the torch workers never load jax)
SOURCES = {"demo": source_demo, "files": source_files, "preset": source_preset, "world": source_world}


# --------------------------------------------------------------------------------------------------
# Editors.


def last_ffn_shapes(model, layers: int) -> dict:
    """`{site: kernel shape}` of fc1/fc2 in the last `layers` OPT layers: what the fresh editors edit."""
    from mmedit_jax.sites import kernel_of

    n = model.config.text.num_hidden_layers
    sites = [f"language_model/layers/{i}/{fc}" for i in range(n - layers, n) for fc in ("fc1", "fc2")]
    return {s: tuple(kernel_of(model.params, s, model.stacks).shape) for s in sites}


def fresh_mend(model, cases_batch, pixels, layers: int = 2, seed: int = 0, perturb: float = 0.0,
               stats_from: str = "data", rank: int = 64):
    """A freshly initialised MEND over the last `layers` OPT layers' fc1/fc2, with normalisation statistics merged
    from the edit gradients of the given cases (`stats_from="data"`; a fresh MEND has none) or drawn at random
    (`"random"`, for tests: no extra compile). `perturb > 0` makes the networks' `up` matrices nonzero (an untrained
    identity network would hide a wrong transform in tests)."""
    import jax

    from mmedit_jax.case import make_cases
    from mmedit_jax.editors import mend as M
    from mmedit_jax.editors import mend_net as MN
    from mmedit_jax.forward import Blip2Fns

    shapes = last_ffn_shapes(model, layers)
    spec = MN.mend_spec(MN.MendConfig(rank=rank), shapes)
    params, stats = MN.init_mend(jax.random.PRNGKey(seed), spec)
    if perturb:
        leaves, tree = jax.tree_util.tree_flatten_with_path(params["nets"])
        keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
        new = [perturb * jax.random.normal(k, x.shape) if str(path[-1].key) == "up" else x
               for (path, x), k in zip(leaves, keys)]
        params = {**params, "nets": jax.tree_util.tree_unflatten(tree, new)}
    if stats_from == "random":
        return spec, params, MN.random_stats(spec, seed)
    fns = Blip2Fns(model.module)  # the language model's sites: cached image embeddings
    cases = make_cases(cases_batch, fns.image_table(model.params, pixels))
    sites = tuple(shapes)
    out_dims = {s: shapes[s][1] for s in sites}
    # The weights are an argument, not a closure's constant (a second copy of them inside the program).
    factors = jax.jit(jax.vmap(lambda p, c: M.capture_factors(fns, p, {}, c, sites, out_dims), in_axes=(None, 0)))(
        model.params, jax.tree.map(np.asarray, cases))
    masks = {s: MN.nonzero_mask(u, d) for s, (u, d) in factors.items()}
    stats, _ = MN.update_stats(spec, stats, factors, masks)
    return spec, params, stats


def fresh_ke(model, layers: int = 2, seed: int = 0, perturb: float = 0.0, cfg=None):
    """A fresh KE (`ke_net.init_ke`, embeddings from the model) over the last `layers` OPT layers' fc1/fc2, sizes
    of configs/ke_world.yaml unless `cfg`. A fresh head's outputs are O(0.1), so its mask `softmax(a_row)^T a_col`
    is ~a_col / out and the gradient term all but vanishes beside the offset; `perturb > 0` adds
    N(0, (perturb * out)^2) to the `a_col` part of each head's output bias, making the mask's entries O(perturb):
    the update is then mostly the gradient, scaled entrywise, so a wrong gradient path would show."""
    import jax

    from mmedit_jax.editors import ke_net as KN
    from mmedit_jax.editors.ke import ke_spec

    shapes = last_ffn_shapes(model, layers)
    spec = ke_spec(cfg or KN.KEConfig(lstm_hidden=64, condition_dim=64, hidden_dim=64), shapes)
    emb = model.params["language_model"]["embed_tokens"]["embedding"]
    params = KN.init_ke(jax.random.PRNGKey(seed), spec.cfg, spec.shape_dict, emb)
    if perturb:
        heads = {}
        for i, (site, head) in enumerate(params["heads"].items()):
            n_in, n_out = spec.shape(site)
            noise = perturb * n_out * jax.random.normal(jax.random.PRNGKey(seed + 1 + i), (n_in,))
            bias = head["out"]["bias"].at[:n_in].add(noise)
            heads[site] = {**head, "out": {**head["out"], "bias": bias}}
        params = {**params, "heads": heads}
    return spec, params


def ke_to_torch(spec, params) -> tuple[dict, dict]:
    """Our KE parameters as a `peer_easyedit.KENet` state dict (numpy arrays) and its meta. Layouts: torch Linear
    weights are `[out, in]` (ours `[in, out]`); LSTM gates i, f, g, o in both, our summed bias goes to `bias_ih`
    (`bias_hh` = 0); weight norm `original0` = g `[out, 1]`, `original1` = v `[out, in]`."""
    import dataclasses

    from mmedit_jax.convert.mend_to_easyedit import easyedit_name

    a = lambda x: np.array(x, np.float32)  # noqa: E731  (a writable copy: torch.from_numpy warns on read-only)
    sd = {"embedding.weight": a(params["embedding"]),
          "cond.weight": a(params["cond"]["kernel"]).T, "cond.bias": a(params["cond"]["bias"])}
    for direction, suffix in (("fwd", ""), ("bwd", "_reverse")):
        p = params["lstm"][direction]
        sd[f"lstm.weight_ih_l0{suffix}"] = a(p["w_ih"]).T
        sd[f"lstm.weight_hh_l0{suffix}"] = a(p["w_hh"]).T
        sd[f"lstm.bias_ih_l0{suffix}"] = a(p["bias"])
        sd[f"lstm.bias_hh_l0{suffix}"] = np.zeros_like(a(p["bias"]))
    names = [easyedit_name(s) for s in spec.sites]
    for site, name in zip(spec.sites, names):
        for idx, part in ((0, "hidden"), (2, "out")):
            p, pre = params["heads"][site][part], f"heads.{name.replace('.', '#')}.{idx}."
            sd[pre + "parametrizations.weight.original0"] = a(p["g"])[:, None]
            sd[pre + "parametrizations.weight.original1"] = a(p["v"]).T
            sd[pre + "bias"] = a(p["bias"])
    meta = {"inner_params": names, "shapes": [[o, i] for i, o in spec.shapes],
            "config": dataclasses.asdict(spec.cfg)}
    return sd, meta


def fresh_serac(model, seed: int = 0, scope_query: str = "prompt", cls_dim: int = 8, hparams: dict | None = None):
    """A fresh SERAC (`trainables.serac_config_from_hparams`): a random `cls_dim`-wide DistilBERT classifier (narrow,
    so that routing weights of unrelated texts are small but not zero and the mixture mixes), the counterfactual a
    copy of the base language model, the projection the identity; `hparams`: more config keys (`scope_image`,
    `scope_key`, ...)."""
    import jax

    from mmedit_jax.editors import serac_net as SN
    from mmedit_jax.training.trainables import serac_config_from_hparams

    cfg = serac_config_from_hparams(model, {"cls_dim": cls_dim, "cls_heads": 2, "scope_query": scope_query,
                                            **(hparams or {})})
    return cfg, SN.init_serac(jax.random.PRNGKey(seed), cfg, counterfactual_params=model.params["language_model"])


def serac_to_torch(cfg, net) -> tuple[dict, dict]:
    """Our SERAC networks as the peer's torch inputs (`peer_easyedit.SeracEditor`): state dicts of a bare
    DistilBERT / BERT (the scope classifier), an `OPTForCausalLM` (the counterfactual) and the image projection's
    `Linear` (`[out, in]`), with their transformers configs and the routing switches in `meta`."""
    import dataclasses

    from mmedit_jax.convert.export_hf import opt_config_dict, opt_state_dict, text_encoder_state_dict
    from mmedit_jax.models.config import DistilBertConfig, OPTConfig

    if not isinstance(cfg.counterfactual, OPTConfig) or tuple(cfg.image_wrap) != (0, 0):
        raise SystemExit("the SERAC peer runs BLIP-2's SERAC (an OPT counterfactual, no image wrapper)")
    a = lambda x: np.array(x, np.float32)  # noqa: E731
    state = {"classifier": text_encoder_state_dict(cfg.classifier, net["classifier"]),
             "counterfactual": opt_state_dict(cfg.counterfactual, net["counterfactual"]),
             "projection": {"weight": a(net["projection"]["kernel"]).T, "bias": a(net["projection"]["bias"])}}
    if cfg.scope_image:
        state["scope_image"] = {k: a(v) for k, v in net["scope_image"].items()}
    kind = "distilbert" if isinstance(cfg.classifier, DistilBertConfig) else "bert"
    meta = {"classifier_kind": kind, "classifier_config": dataclasses.asdict(cfg.classifier),
            "counterfactual_config": opt_config_dict(cfg.counterfactual),
            **{k: getattr(cfg, k) for k in ("image_token_id", "hard_routing", "square", "cos", "bound_embeds",
                                             "scope_query", "scope_image", "scope_key")}}
    return state, meta


def ft_hparams(model, config_path: str | None) -> dict:
    """FT-L hparams: configs/ft_l_blip2.yaml (or --config) values; sites from the config's inner_params when they
    exist in this model, else the last OPT layer's fc1/fc2 (the yaml's layer 31 is OPT-2.7B's last)."""
    from mmedit_jax.editors import ft
    from mmedit_jax.editors.hparams import load_hparams
    from mmedit_jax.sites import easyedit_site

    hp = load_hparams(config_path or os.path.join(ROOT, "configs", "ft_l_blip2.yaml"))
    sites = None
    if hp.get("inner_params"):
        sites = tuple(easyedit_site(n) for n in hp["inner_params"])
        n = model.config.text.num_hidden_layers
        if any(int(s.split("/")[2]) >= n for s in sites if s.startswith("language_model/layers/")):
            if config_path:
                raise SystemExit(f"{config_path}: inner_params {hp['inner_params']} do not exist in a {n}-layer model")
            sites = None
    sites = sites or ft.ft_l_sites(model.config.text.num_hidden_layers)
    defaults = ft.FTConfig(inner_params=sites)
    out = {k: hp.get(k, getattr(defaults, k)) for k in FT_KEYS}
    out["sites"] = list(sites)
    out["exact_match"] = bool(hp.get("exact_match", True))
    return out


# --------------------------------------------------------------------------------------------------
# Prepare (this process), then the two workers.


def prepare(args, workdir: str, perturb_mend: float = 0.0, source=None, mend_stats: str = "data",
            perturb_ke: float = 1.0) -> dict:
    """Writes everything both sides need under `workdir`; returns the manifest. `source`: an already loaded
    `(model, tok, records, task, ckpt)` (default: `SOURCES[args.source]`). `perturb_ke`: for a fresh KE only."""
    import torch

    from mmedit_jax import pipeline
    from mmedit_jax.convert.export_hf import export_hf
    from mmedit_jax.convert.mend_to_easyedit import easyedit_name, to_easyedit

    model, tok, records, task, ckpt = source or SOURCES[args.source](args, workdir)
    if not records:
        raise SystemExit("no usable records")
    prepared = pipeline.prepare_data(records, tok, model, task, getattr(args, "pad_multiple", 1))
    hf_dir = os.path.join(workdir, "hf")
    export_hf(model.config, model.params, hf_dir, tok)
    save_cases(os.path.join(workdir, "cases.npz"), prepared.batch, prepared.pixels)
    save_strings(os.path.join(workdir, "strings.json"), prepared, task)
    manifest = {"editor": args.editor, "task": task, "num_cases": len(records), "hf": hf_dir,
                "cases": os.path.join(workdir, "cases.npz"), "meta": prepared.meta,
                "strings": os.path.join(workdir, "strings.json"),
                "exact_match": not args.token_accuracy, "source": args.source,
                "model_params": int(sum(np.size(x) for x in __import__("jax").tree.leaves(model.params)))}
    if args.editor == "ft-l":
        hp = ft_hparams(model, args.config)
        hp["num_steps"] = args.ft_steps or hp["num_steps"]
        manifest["ft"] = hp
        manifest["exact_match"] = manifest["exact_match"] and hp["exact_match"]
        peer_ft = {k: hp[k] for k in FT_KEYS}
        peer_ft["inner_params"] = [easyedit_name(s) for s in hp["sites"]]
        manifest["peer_ft"] = peer_ft
    elif args.editor == "ke":
        from mmedit_jax.editors.io import load_ke, save_ke

        ckpt = args.editor_ckpt or ckpt
        spec, params = load_ke(ckpt) if ckpt else fresh_ke(model, seed=args.seed, perturb=perturb_ke)
        ours_dir = os.path.join(workdir, "ke")
        save_ke(ours_dir, spec, params)
        sd, meta = ke_to_torch(spec, params)
        peer_path = os.path.join(workdir, "ke_torch.pt")
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "meta": meta}, peer_path)
        manifest.update(ke=ours_dir, peer_ke=peer_path, ke_fresh=not ckpt)
    elif args.editor == "ike":
        # Our side retrieves and tokenises every case's context once (`Editor.prepare`); both sides read those ids.
        bank = getattr(args, "ike_bank", None) or (pipeline.world_train_data(task) if args.source == "world" else None)
        bank_records = (pipeline.load_split(bank, task, os.path.dirname(os.path.abspath(bank)), log=lambda m: None)
                        .records if bank else records)
        k = getattr(args, "ike_k", None)
        editor = pipeline.build_ike(model, tok, task, bank_records, {} if k is None else {"k": k},
                                    log=lambda m: print(m, file=sys.stderr))
        cases = editor.prepare_cases(pipeline.cases_for(editor.fns, model.params, prepared), prepared.records)
        save_cases(os.path.join(workdir, "cases.npz"), prepared.batch, prepared.pixels,
                   {"context_ids": np.asarray(cases.context_ids), "context_mask": np.asarray(cases.context_mask)})
        manifest.update(ike_bank=bank or "the cases' own records", ike_k=editor.hparams[0].k,
                        ike_context_tokens=int(np.asarray(cases.context_mask).sum(-1).max()))
    elif args.editor == "serac":
        from mmedit_jax.editors.io import load_serac, save_serac

        ckpt = args.editor_ckpt or ckpt
        cfg, net = load_serac(ckpt) if ckpt else fresh_serac(model, args.seed, getattr(args, "scope_query", "prompt"),
                                                             hparams=getattr(args, "serac_hparams", None))
        ours_dir = os.path.join(workdir, "serac")
        save_serac(ours_dir, cfg, net)
        state, meta = serac_to_torch(cfg, net)
        peer_path = os.path.join(workdir, "serac_torch.pt")
        to_t = lambda d: {k: torch.from_numpy(np.array(v)) for k, v in d.items()}  # noqa: E731
        torch.save({"state_dict": {k: to_t(v) for k, v in state.items()}, "meta": meta}, peer_path)
        manifest.update(serac=ours_dir, peer_serac=peer_path, serac_fresh=not ckpt, serac_scope_query=cfg.scope_query)
    else:
        from mmedit_jax.editors.io import load_mend, save_mend

        ckpt = args.editor_ckpt or ckpt
        if ckpt:
            spec, params, stats = load_mend(ckpt)
        else:
            spec, params, stats = fresh_mend(model, prepared.batch, prepared.pixels, seed=args.seed,
                                             perturb=perturb_mend, stats_from=mend_stats)
        ours_dir = os.path.join(workdir, "mend")
        save_mend(ours_dir, spec, params, stats, source={"fresh": not ckpt})
        sd, meta = to_easyedit(spec, params, stats)
        peer_path = os.path.join(workdir, "mend_easyedit.pt")
        torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, "meta": meta}, peer_path)
        manifest.update(mend=ours_dir, peer_mend=peer_path, mend_fresh=not ckpt)
    with open(os.path.join(workdir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


TOKEN_FIELDS = ("input_ids", "attention_mask", "labels", "image_ids")


def save_cases(path: str, batch, pixels: np.ndarray, extra: dict | None = None) -> None:
    """Writes an `EditBatch` (`mmedit_jax.data.cases`) and its image table `[N, 3, H, W]` to one npz, the five
    inputs under EasyEdit's names (`case.INPUTS`), as the peer reads them (`peer_easyedit.load_cases`); `extra`:
    per-case arrays an editor adds (IKE's `context_ids`, `context_mask`)."""
    from mmedit_jax.case import INPUTS

    arrays = {"pixels": np.asarray(pixels, np.float32), "case_index": np.asarray(batch.case_index),
              "cond_ids": np.asarray(batch.cond_ids), "cond_mask": np.asarray(batch.cond_mask),
              "valid": np.asarray(batch.valid), **(extra or {})}
    for spec in INPUTS:
        tb = batch.sub(spec.name)
        for field in TOKEN_FIELDS:
            arrays[f"{spec.easyedit}/{field}"] = np.asarray(getattr(tb, field))
    np.savez(path, **arrays)


def cases_from_npz(path: str):
    """The `EditBatch` saved by `save_cases`, and its pixels."""
    from mmedit_jax.case import INPUTS
    from mmedit_jax.data.cases import EditBatch, TokenBatch

    with np.load(path) as z:
        d = dict(z)
    subs = {spec.name: TokenBatch(*(d[f"{spec.easyedit}/{f}"] for f in TOKEN_FIELDS)) for spec in INPUTS}
    batch = EditBatch(**subs, cond_ids=d["cond_ids"], cond_mask=d["cond_mask"], case_index=d["case_index"],
                      valid=d["valid"])
    return batch, d["pixels"]


def save_strings(path: str, prepared, task: str) -> None:
    """Per case `{EasyEdit input name: [prompt, target, image id]}`: the strings the as-shipped peer tokenises
    inside its step (`peer_easyedit.shipped_input`), from the records `prepared` kept (`data.cases.case_inputs`)."""
    from mmedit_jax.case import INPUTS
    from mmedit_jax.data.cases import case_inputs

    out = []
    for i, record in enumerate(prepared.records):
        texts = case_inputs(record, task)
        out.append({spec.easyedit: [texts[spec.name].prompt, texts[spec.name].target,
                                    int(prepared.batch.sub(spec.name).image_ids[i])] for spec in INPUTS})
    with open(path, "w") as f:
        json.dump(out, f)


def vm_mib(field: str = "VmHWM") -> float:
    """This process's `/proc/self/status` memory field in MiB: VmHWM, the peak RSS (`peer_easyedit.peak_rss_mib`
    without importing torch here), or VmRSS, the current one."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(f"{field}:"))


def xla_thread_flags(threads: int) -> str:
    """XLA CPU flags for `threads` intra-op threads (set before JAX starts: the workers get them by environment)."""
    return f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} intra_op_parallelism_threads={threads}"


class OursSide:
    """Our harness on the exported model. A round encodes every distinct image of the cases (the image table, one
    compiled encoder, fixed chunks) and edits + scores every case at each batch size E (the two compiled step
    programs the bench times, with the frozen-prefix cache where the editor allows it); `rows`: every case scored
    by `harness.run` (untimed)."""

    def __init__(self, manifest: dict, batches=(1, 32), chunk: int = 64):
        import jax

        from mmedit_jax import pipeline
        from mmedit_jax.case import take
        from mmedit_jax.eval import steps
        from mmedit_jax.loading import from_pretrained

        self.jax = jax
        self.model = model = from_pretrained(manifest["hf"])
        if manifest["editor"] == "ft-l":
            from mmedit_jax.convert.mend_to_easyedit import easyedit_name

            hp = manifest["ft"]
            hparams = {k: hp[k] for k in FT_KEYS}
            hparams["inner_params"] = [easyedit_name(s) for s in hp["sites"]]
            self.editor = pipeline.build_editor("ft-l", model, hparams)
        elif manifest["editor"] == "ike":  # the contexts come with the cases (prepared once, read by both sides)
            from mmedit_jax.editors import ike

            self.editor = ike.make_ike(pipeline.fns_for(model, (), True), model.config.num_query_tokens,
                                       model.config.text.max_position_embeddings, None, manifest["task"], None, None)
        else:
            self.editor = pipeline.build_editor(manifest["editor"], model, editor_ckpt=manifest[manifest["editor"]])
        self.meta = manifest["meta"]
        self.batch, self.pixels = cases_from_npz(manifest["cases"])
        self.contexts = {}  # IKE's, read once here (not inside a timed round)
        if manifest["editor"] == "ike":
            with np.load(manifest["cases"]) as z:
                self.contexts = {"context_ids": z["context_ids"], "context_mask": z["context_mask"]}
        self.n, self.em, self.batches = manifest["num_cases"], manifest["exact_match"], tuple(batches)
        self.chunk = min(chunk, len(self.pixels))
        t0 = time.perf_counter()
        cases = self.cases()
        self.compile_s = {"image_table": time.perf_counter() - t0}
        self.prefix = steps.prefix_layer(self.editor, model.params, take(cases, 0))
        self.step_fns = steps.make_step_fns(self.editor, self.em, base_accuracy=False, prefix_layer=self.prefix)
        for b in self.batches:
            t0 = time.perf_counter()
            self.edit_all(cases, b)
            self.compile_s[f"E={b}"] = time.perf_counter() - t0
        self.rows, self.means = self.quality(cases) if self.batches else self.quality(cases, 4)
        self.gflop = self.flops(cases) if self.batches else None

    def table(self) -> np.ndarray:
        """Every distinct image encoded once, `[N_images, nq, D]` on the host (or the pixels themselves, for a model
        that runs pixels in its forward: vision-side edits pay for images inside the steps)."""
        return self.editor.fns.image_table(self.model.params, self.pixels, batch_size=self.chunk)

    def cases(self):
        from mmedit_jax.case import make_cases

        cases = make_cases(self.batch, self.table())
        return cases.replace(**self.contexts) if self.contexts else cases

    def edit_all(self, cases, batch: int) -> None:
        """Every case edited and scored, `batch` at a time (the last batch padded), blocking at the end."""
        from mmedit_jax.case import pad_batch, take

        pre_fn, edit_fn = self.step_fns
        out = None
        for start in range(0, self.n, batch):
            b = pad_batch(take(cases, np.arange(start, min(start + batch, self.n))), batch)
            out = edit_fn(self.editor.editor_params, self.model.params, b, pre_fn(self.model.params, b))
        self.jax.block_until_ready(out)

    def quality(self, cases, batch: int | None = None):
        from mmedit_jax.eval import harness

        batch = batch or max(self.batches)
        res = harness.run(self.editor, self.model.params, cases, self.meta, None, batch_size=min(batch, self.n),
                          exact_match=self.em, resume=False, progress=False)
        rows = [{"index": int(r["index"]), **{m: r[m] for m in METRICS}} for r in res.rows]
        return rows, {m: res.summary[m] for m in METRICS}

    def round(self) -> dict:
        t0 = time.perf_counter()
        cases = self.cases()
        out = {"image_s": time.perf_counter() - t0, "steps_s": {}}
        for b in self.batches:
            t0 = time.perf_counter()
            self.edit_all(cases, b)
            out["steps_s"][str(b)] = time.perf_counter() - t0
        return out

    def flops(self, cases) -> dict:
        """Matmul FLOPs per edit of a round (`throughput.matmul_flops`, every layer of a scanned stack counted;
        padding of the last batch and of the image table's last chunk counted, as they run): `{"images": ...,
        "E=b": steps + images, "floor": ...}`. Each E's step program has one shape, so one trace per E counts every
        call. The floor (`eval/floor.py`) is the whole split's: each distinct image and input once."""
        from mmedit_jax.case import pad_batch, take
        from mmedit_jax.eval import floor
        from mmedit_jax.eval.throughput import matmul_flops

        jax, params, fns = self.jax, self.model.params, self.editor.fns
        image_flops = exact_image_flops = 0.0
        if not fns.uses_pixels:
            chunk = self.pixels[: self.chunk]
            per_chunk = matmul_flops(jax.make_jaxpr(lambda p, x: fns.encode(p, {}, x))(params, chunk))
            image_flops = per_chunk * -(-len(self.pixels) // self.chunk)
            exact_image_flops = per_chunk * len(self.pixels) / self.chunk
        out = {"images": image_flops / self.n / 1e9}
        pre_fn, edit_fn = self.step_fns
        for b in self.batches:
            batch = pad_batch(take(cases, np.arange(min(b, self.n))), b)
            pre_shape = jax.eval_shape(pre_fn, params, batch)
            per_call = (matmul_flops(jax.make_jaxpr(pre_fn)(params, batch))
                        + matmul_flops(jax.make_jaxpr(edit_fn)(self.editor.editor_params, params, batch, pre_shape)))
            out[f"E={b}"] = (per_call * -(-self.n // b) + image_flops) / self.n / 1e9
        least = floor.flop_floor(self.editor, params, take(cases, np.arange(self.n)), self.prefix, len(self.pixels),
                                 exact_image_flops)
        out["floor"] = None if least is None else least.as_dict()["floor_gflop_per_edit"]
        return out

    def info(self) -> dict:
        return {"n": self.n, "compile_s": self.compile_s, "prefix_layer": self.prefix, "batches": list(self.batches),
                "gflop_per_edit": self.gflop,
                "device": str(self.jax.devices()[0].device_kind), "jax": self.jax.__version__,
                "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpus": len(os.sched_getaffinity(0)),
                "images": int(len(self.pixels)), "image_chunk": self.chunk}


def run_ours(manifest: dict, batches=()) -> dict:
    """Our side's per-case rows (and, with `batches`, one timed round); tests call it in their own process."""
    side = OursSide(manifest, batches)
    res = {"rows": side.rows, "means": side.means, **side.info()}
    if batches:
        res["round"] = side.round()
    return res


def _peer_module(name: str):
    """A peer file of this directory, imported as `benchmarks.<name>` (tests) or as a script's neighbour."""
    import importlib

    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ImportError:
        return importlib.import_module(name)


class PeerSide:
    """A PyTorch peer in this process: `faithful` (`peer_easyedit.edit_and_score`, one record at a time),
    `shipped` (`peer_easyedit.edit_and_score_shipped`) or `best` (`peer_batched`, `batch` cases at a time). The
    first `warmup` cases (a batch for `best`, when `warmup` > 0; the compiled peer always warms up) run once
    untimed; a round runs the first `limit` cases, and the first round's metrics are the side's `rows`.
    `count_flops`: one extra untimed round under the FLOP counter (`gflop`; None without it)."""

    def __init__(self, kind: str, manifest: dict, limit: int | None = None, batch: int = 32, warmup: int = 2,
                 count_flops: bool = True):
        import torch

        PE = _peer_module("peer_easyedit")
        self.torch, self.PE, self.kind = torch, PE, kind
        self.cases = PE.load_cases(manifest["cases"])
        self.n = PE.num_cases(self.cases) if not limit else min(limit, PE.num_cases(self.cases))
        em, f = manifest["exact_match"], peer_files(manifest)
        t0 = time.perf_counter()
        if kind in BATCHED:
            PB = _peer_module("peer_batched")
            self.model = PE.load_model(manifest["hf"], attn="sdpa")
            self.peer = PB.make_peer(self.model, f["editor"], f["mend"], f["ke"], em, f["serac"],
                                     compile=kind == "compiled")
            self.batch = min(batch, self.n)  # what a call holds (the label's E): fewer cases than --peer-batch
            # torch.compile specialises on shapes: the compiled peer warms up on every batch (untimed).
            if kind == "compiled" or warmup:
                PB.run_cases(self.peer, self.cases, self.batch, self.n if kind == "compiled" else min(self.n, batch))
            self.step = lambda: PB.run_cases(self.peer, self.cases, self.batch, self.n)
        else:
            self.model = PE.load_model(manifest["hf"])
            editor = PE.make_editor(f["editor"], self.model, f["ft"], f["mend"], f["ke"], f["serac"])
            if kind == "shipped":
                import transformers

                tok = transformers.AutoTokenizer.from_pretrained(manifest["hf"])
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
                with open(manifest["strings"]) as fh:
                    records = PE.shipped_records(self.cases, json.load(fh))
                cfg = self.model.config
                block = [cfg.image_token_id] * cfg.num_query_tokens
                PE.check_shipped_tokens(tok, records[: self.n], self.cases, block)
                one = lambda i: PE.edit_and_score_shipped(self.model, editor, tok, records[i], block, em)  # noqa: E731
            else:
                inputs = [PE.case_inputs(self.cases, i) for i in range(self.n)]
                one = lambda i: PE.edit_and_score(self.model, editor, inputs[i], em)  # noqa: E731
            for i in range(min(warmup, self.n)):
                one(i)
            self.step = lambda: [dict(one(i), index=int(self.cases["case_index"][i])) for i in range(self.n)]
        self.setup_s = time.perf_counter() - t0
        # A round's matmul FLOPs, counted on one extra untimed round (the counter slows what it watches). The
        # compiled peer runs the best-effort one's procedure: its count is that one's.
        self.gflop = None if kind == "compiled" or not count_flops else torch_matmul_flops(self.step) / self.n / 1e9
        self.rows = None

    def round(self) -> dict:
        t0 = time.perf_counter()
        rows = self.step()
        out = {"seconds": time.perf_counter() - t0}
        if self.rows is None:
            self.rows = rows
        return out

    def info(self) -> dict:
        return {"n": self.n, "setup_s": self.setup_s, "threads": self.torch.get_num_threads(),
                "torch": self.torch.__version__, "batch": getattr(self, "batch", 1), "gflop_per_edit": self.gflop}


def torch_matmul_flops(run) -> float:
    """Matmul FLOPs of `run()` as our side counts them (`2 M N K` per product, backward passes included): every
    aten op that reaches the dispatcher, priced by torch's FLOP formulas (`torch.utils.flop_counter`: mm, addmm,
    bmm, baddbmm, the attention kernels) plus one for CPU's fused attention kernel (torch has none), convolutions
    left out (our count has none: the ViT's patch embedding is a convolution on both sides). A dispatch mode of
    our own rather than `FlopCounterMode`, whose module tracking fails on transformers' BLIP-2 under `no_grad`."""
    import contextlib

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    @shape_wrapper
    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs):  # shapes [B, H, L, D]
        b, h, lq, d = query
        return 2 * b * h * lq * key[-2] * (d + value[-1])

    formulas = {op: f for op, f in flop_registry.items() if "conv" not in str(op)}
    formulas[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = cpu_attention

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = formulas.get(func._overloadpacket)
            if formula is not None:
                self.total += int(formula(*args, **kwargs, out_val=out))
            return out

    # Under `inference_mode` no dispatch mode sees an op (the peers' passes would count zero); the same passes
    # under `no_grad` do the same arithmetic.
    inference_mode = torch.inference_mode
    torch.inference_mode = lambda mode=True: torch.no_grad() if mode else contextlib.nullcontext()
    try:
        with Count() as count:
            run()
    finally:
        torch.inference_mode = inference_mode
    return float(count.total)


def peer_files(manifest: dict) -> dict:
    """The peer's inputs in a prepared manifest, as `peer_easyedit.run_files` takes them (tests call
    `run_files(**peer_files(manifest))` in their own process)."""
    return {"hf": manifest["hf"], "cases": manifest["cases"], "editor": manifest["editor"],
            "ft": manifest.get("peer_ft"), "mend": manifest.get("peer_mend"), "ke": manifest.get("peer_ke"),
            "serac": manifest.get("peer_serac"), "exact_match": manifest["exact_match"]}


SIDES = ("ours", "faithful", "shipped", "best", "compiled")
BATCHED = ("best", "compiled")  # the batched peers (E cases per call, all cases every round)
PROTOCOL = "@@ "  # a worker's protocol lines on stdout start with this (libraries may print too)


def _say(obj) -> None:
    sys.stdout.write(PROTOCOL + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(kind: str, workdir: str) -> None:
    """A worker: set up one side, then answer each `round` line on stdin with that round's timing (one JSON
    line), and `done` with the side's rows, info and peak RSS."""
    with open(os.path.join(workdir, "manifest.json")) as f:
        manifest = json.load(f)
    run = manifest["run"]
    if kind == "ours":
        side = OursSide(manifest, run["batches"])
    else:
        import torch

        torch.set_num_threads(run["threads"])
        limit = None if kind in BATCHED else run["peer_limit"]
        side = PeerSide(kind, manifest, limit, run["peer_batch"])
    _say({"ready": kind})
    for line in sys.stdin:
        if line.strip() != "round":
            break
        _say(side.round())
    _say({"rows": side.rows, "info": side.info(), "peak_rss_mib": vm_mib()})


class Worker:
    def __init__(self, kind: str, workdir: str, threads: int):
        env = dict(os.environ, XLA_FLAGS=xla_thread_flags(threads), OMP_NUM_THREADS=str(threads))
        env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", kind, "--workdir",
                                      workdir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
            sys.stderr.write(line)
        raise SystemExit(f"the {self.kind} worker ended early (exit status {self.proc.wait()})")

    def send(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()


def _round_line(r: int, total: int, rounds: dict) -> str:
    return f"round {r + 1}/{total}: " + ", ".join(
        f"{k} {x[-1].get('seconds', x[-1].get('image_s', 0) + sum(x[-1].get('steps_s', {}).values())):.2f}s"
        for k, x in rounds.items() if x)


def run_interleaved(kinds, workdir: str, threads: int, n_rounds: int):
    """Setup (load, compile, warm up) of every side at once: untimed. Then the timed rounds, one side at a time,
    the order rotating each round, so that each round of each side sees the same machine. Returns `(sides,
    rounds, timed window s)`."""
    workers = {k: Worker(k, workdir, threads) for k in kinds}
    t_setup = time.perf_counter()
    for w in workers.values():
        w.read()
    print(f"sides set up ({time.perf_counter() - t_setup:.0f} s)", file=sys.stderr)
    rounds = {k: [] for k in kinds}
    t_rounds = time.perf_counter()
    for r in range(n_rounds):
        for k in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
            rounds[k].append(workers[k].send("round"))
        print(_round_line(r, n_rounds, rounds), file=sys.stderr)
    window_s = time.perf_counter() - t_rounds
    sides = {k: w.send("done") for k, w in workers.items()}
    for w in workers.values():
        w.proc.wait()
    return sides, rounds, window_s


def run_one_side_at_a_time(kinds, workdir: str, threads: int, n_rounds: int):
    """Each side set up, timed for all its rounds and ended before the next starts: only one side's weights are in
    memory (BLIP-2 OPT-2.7B in float32 is 15 GB a side). Not interleaved, so a change in the host's load between
    sides is not averaged out: use it only where the sides do not fit together, on an otherwise idle host. The
    window is the sum of the sides' timed spans."""
    import gc

    gc.collect()  # the prepared model (the main process's copy) must be gone before a side loads its own
    print(f"one side at a time; this process holds {vm_mib('VmRSS'):.0f} MiB", file=sys.stderr)
    sides, rounds, window_s = {}, {}, 0.0
    for k in kinds:
        t_setup = time.perf_counter()
        w = Worker(k, workdir, threads)
        w.read()
        print(f"{k} set up ({time.perf_counter() - t_setup:.0f} s)", file=sys.stderr)
        rounds[k] = []
        t_rounds = time.perf_counter()
        for r in range(n_rounds):
            rounds[k].append(w.send("round"))
            print(_round_line(r, n_rounds, {k: rounds[k]}), file=sys.stderr)
        window_s += time.perf_counter() - t_rounds
        sides[k] = w.send("done")
        w.proc.wait()
    return sides, rounds, window_s


def agreement(ours_rows, peer_rows, show: int = 20) -> dict:
    """Per metric: mean |ours - peer| over the cases both scored, the fraction where they are identical, and the
    first `show` disagreeing cases `(index, ours, peer)`."""
    peer = {r["index"]: r for r in peer_rows}
    common = [r for r in ours_rows if r["index"] in peer]
    out = {"num_cases": len(common)}
    for m in METRICS:
        d = np.asarray([abs(float(r[m]) - float(peer[r["index"]][m])) for r in common])
        bad = [(r["index"], float(r[m]), float(peer[r["index"]][m])) for r, x in zip(common, d) if x > 1e-6]
        out[m] = {"mean_abs_diff": float(d.mean()) if len(d) else float("nan"),
                  "identical": float(np.mean(d <= 1e-6)) if len(d) else float("nan"),
                  "max_abs_diff": float(d.max()) if len(d) else float("nan"), "disagree": bad[:show]}
    return out


def summarize(sides: dict, rounds: dict) -> list[dict]:
    """The table's rows: edits/s of each side as the median over rounds (ours: per batch size, with the image
    table's time counted, and again with it left out)."""
    med = lambda xs: float(np.median(xs))  # noqa: E731
    rows = []
    ours = sides["ours"]
    for b in ours["info"]["batches"]:
        with_img = [r["image_s"] + r["steps_s"][str(b)] for r in rounds["ours"]]
        steps = [r["steps_s"][str(b)] for r in rounds["ours"]]
        n = ours["info"]["n"]
        gflop = ours["info"].get("gflop_per_edit") or {}
        step_gflop = gflop.get(f"E={b}")
        rows.append({"side": "ours", "label": f"ours (JAX), E={b}, images counted", "batch": b,
                     "edits_per_s": n / med(with_img), "round_s": with_img, "images_s": med([r["image_s"] for r in
                                                                                               rounds["ours"]]),
                     "gflop_per_edit": step_gflop})
        rows.append({"side": "ours_cached", "label": f"ours (JAX), E={b}, features cached", "batch": b,
                     "edits_per_s": n / med(steps), "round_s": steps,
                     "gflop_per_edit": None if step_gflop is None else step_gflop - gflop["images"]})
    labels = {"faithful": "faithful peer (EasyEdit edit_step), 1 by 1",
              "shipped": "as-shipped peer (MultimodalEditor.edit), 1 by 1",
              "best": "best-effort peer (PyTorch, batched)",
              "compiled": "best-effort peer under torch.compile"}
    for kind in SIDES[1:]:
        if kind in sides:
            secs = [r["seconds"] for r in rounds[kind]]
            rows.append({"side": kind, "label": labels[kind] + (f", E={sides[kind]['info']['batch']}" if kind in
                                                                 BATCHED else ""),
                         "batch": sides[kind]["info"]["batch"], "edits_per_s": sides[kind]["info"]["n"] / med(secs),
                         "round_s": secs, "gflop_per_edit": sides[kind]["info"].get("gflop_per_edit")})
    for r in rows:  # the compiled peer runs the best-effort one's procedure: its FLOPs are that one's
        if r["side"] == "compiled" and "best" in sides:
            r["gflop_per_edit"] = r["gflop_per_edit"] or sides["best"]["info"].get("gflop_per_edit")
    floor = (ours["info"].get("gflop_per_edit") or {}).get("floor")
    for r in rows:  # the floor counts the images: no ratio for the rows that leave them out
        counted = floor and r["gflop_per_edit"] and r["side"] != "ours_cached"
        r["x_floor"] = r["gflop_per_edit"] / floor if counted else None
    return rows


def print_table(result: dict, file=sys.stdout) -> None:
    how = "interleaved rounds" if result.get("interleaved", True) else "rounds, one side at a time (not interleaved)"
    print(f"\n{result['editor']} on {result['source']} ({result['num_cases']} cases, "
          f"{'exact match' if result['exact_match'] else 'token accuracy'}), {result['rounds']} {how}, "
          f"{result['threads']} threads each side (torch.set_num_threads; XLA_FLAGS {result['xla_flags']!r})",
          file=file)
    fmt = lambda v, spec: format(v, spec) if v is not None else format("-", spec[:-3] + "s")  # noqa: E731
    print(f"{'':58s}{'edits/s':>10s}{'cases':>7s}{'peak RSS MiB':>14s}{'GFLOP/edit':>12s}{'x floor':>9s}", file=file)
    for r in result["table"]:
        side = result["sides"][r["side"].removesuffix("_cached")]
        print(f"{r['label']:58s}{r['edits_per_s']:>10.2f}{side['info']['n']:>7d}{side['peak_rss_mib']:>14.0f}"
              f"{fmt(r.get('gflop_per_edit'), '>12.3f')}{fmt(r.get('x_floor'), '>9.2f')}", file=file)
    for k, v in result["ratios"].items():
        print(f"ratio {k}: {v:.2f}x", file=file)
    floor = (result["sides"]["ours"]["info"].get("gflop_per_edit") or {}).get("floor")
    if floor:
        print(f"GFLOP/edit: matmul FLOPs of each side's timed round per edit (ours from the jaxprs, the peers' "
              f"by torch's FLOP formulas on an untimed round, torch_matmul_flops; convolutions left out of both); "
              f"floor: {floor:.3f}, "
              "the least the procedure needs (eval/floor.py), so faithful x floor is the lead a compute-bound "
              "machine allows over that peer", file=file)
    common = set.intersection(*({r["index"] for r in s["rows"]} for s in result["sides"].values()))
    print(f"\nmeans over the {len(common)} cases every side scored; identical = cases each peer scores exactly as "
          "ours, over all the cases it scored", file=file)
    print(f"{'metric':14s}" + "".join(f"{k:>10s}" for k in result["sides"]) + "   identical to ours", file=file)
    for m in METRICS:
        means = "".join(f"{100 * np.mean([r[m] for r in s['rows'] if r['index'] in common]):>10.2f}"
                        for s in result["sides"].values())
        same = "  ".join(f"{k} {a[m]['identical']:.1%}" for k, a in result["agreement"].items())
        print(f"{m:14s}{means}   {same}", file=file)
    for k, a in result["agreement"].items():
        for m in METRICS:
            if a[m]["disagree"]:
                print(f"  {k} vs ours, {m}: cases (index, ours, peer) {a[m]['disagree'][:5]}", file=file)


def ratios(table: list[dict]) -> dict:
    by = {}
    for r in table:
        by.setdefault(r["side"], []).append(r)
    out = {}
    best_ours = max(by["ours"], key=lambda r: r["edits_per_s"])
    one = next((r for r in by["ours"] if r["batch"] == 1), None)
    for kind in SIDES[1:]:
        if kind in by:
            p = by[kind][0]["edits_per_s"]
            out[f"ours E={best_ours['batch']} (images counted) / {kind}"] = best_ours["edits_per_s"] / p
            if one is not None and kind not in BATCHED:
                out[f"ours E=1 (images counted) / {kind}"] = one["edits_per_s"] / p
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default="mend", choices=("ft-l", "mend", "ke", "serac", "ike"))
    ap.add_argument("--ike-bank", help="IKE: the demonstration bank's MMEdit file (world: its train split)")
    ap.add_argument("--ike-k", type=int, help="IKE: demos retrieved per case (default IKEConfig's, as fit)")
    ap.add_argument("--source", choices=sorted(SOURCES),
                    help="default: files when --model is given, else the built-in world when installed, else demo")
    ap.add_argument("--preset", choices=sorted(PRESET_NAMES),
                    help="--source preset: a random-weight BLIP-2 at real sizes")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--image-root")
    ap.add_argument("--rephrase-image-root")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--task", choices=("vqa", "caption"))
    ap.add_argument("--editor-ckpt",
                    help="our MEND (save_mend / convert mend-easyedit), KE (save_ke) or SERAC (save_serac) directory")
    ap.add_argument("--config", help="FT hparams YAML (default configs/ft_l_blip2.yaml)")
    ap.add_argument("--ft-steps", type=int, help="override num_steps")
    ap.add_argument("--limit", type=int, help="first N records of the file")
    ap.add_argument("--peer-limit", type=int,
                    help="the one-at-a-time peers (faithful, as shipped) run only the first N cases (they are slow)")
    ap.add_argument("--peers", help="which peers (default: every one the editor has: FT-L no best-effort peer, IKE "
                    "and SERAC no as-shipped one)")
    ap.add_argument("--demo-records", type=int, default=32)
    ap.add_argument("--batches", default="1,32", help="our batch sizes E (a table row each)")
    ap.add_argument("--peer-batch", type=int, default=32, help="the best-effort peer's E")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="intra-op threads of every side (torch.set_num_threads; XLA's intra_op_parallelism)")
    ap.add_argument("--token-accuracy", action="store_true")
    ap.add_argument("--pad-multiple", type=int, default=1, help="our side's padding (the peers run unpadded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the prepared files here (default: a temporary directory)")
    ap.add_argument("--json", help="write the whole comparison here")
    ap.add_argument("--reuse", action="store_true", help="reuse the files a former run prepared in --workdir")
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the prepared files to --workdir and stop (time them later with --reuse)")
    ap.add_argument("--one-side-at-a-time", action="store_true",
                    help="set up, time and end each side before the next (only one copy of the weights in memory; "
                         "not interleaved: for models whose sides do not fit together, on an idle host)")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # child process: one side, the manifest in --workdir
        return serve(args.worker, args.workdir)

    args.source = args.source or ("files" if args.model else "world" if world_available() else "demo")
    if args.source == "files" and not (args.model and args.data and args.image_root):
        ap.error("--model needs --data and --image-root")
    if (args.source == "preset") != bool(args.preset):
        ap.error("--preset goes with --source preset (and --source preset needs --preset)")
    if args.peers is None:
        args.peers = {"ft-l": "faithful,shipped", "ike": "faithful,best", "serac": "faithful,best"}.get(
            args.editor, "faithful,shipped,best")
    peers = [p for p in args.peers.split(",") if p]
    if set(peers) - set(SIDES[1:]):
        ap.error(f"--peers: choose from {SIDES[1:]}")
    if args.editor == "ft-l" and set(peers) & set(BATCHED):
        ap.error("FT-L has no best-effort peer: --peers faithful,shipped")
    if args.editor in ("ike", "serac") and "shipped" in peers:
        ap.error(f"{args.editor.upper()} has no as-shipped peer: --peers faithful,best")
    if args.prepare_only and (args.reuse or not args.workdir):
        ap.error("--prepare-only needs --workdir (and no --reuse)")
    workdir = args.workdir or tempfile.mkdtemp(prefix="compare_peer_")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    if args.reuse:
        with open(os.path.join(workdir, "manifest.json")) as f:
            manifest = json.load(f)
        if manifest["editor"] != args.editor or manifest["source"] != args.source:
            ap.error(f"--reuse: {workdir} holds {manifest['editor']} on {manifest['source']}")
    else:
        manifest = prepare(args, workdir)
    manifest["run"] = {"batches": [int(b) for b in args.batches.split(",")], "peer_batch": args.peer_batch,
                       "peer_limit": args.peer_limit, "threads": args.threads}
    with open(os.path.join(workdir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"prepared {manifest['num_cases']} cases, {manifest['model_params']:,} parameters in {workdir} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.prepare_only:
        return manifest

    kinds = ["ours", *peers]
    if args.one_side_at_a_time:
        sides, rounds, window_s = run_one_side_at_a_time(kinds, workdir, args.threads, args.rounds)
    else:
        sides, rounds, window_s = run_interleaved(kinds, workdir, args.threads, args.rounds)
    with open(os.path.join(workdir, "raw.json"), "w") as f:  # what was measured, before any summary
        json.dump({"sides": sides, "rounds": rounds}, f)

    table = summarize(sides, rounds)
    result = {"editor": args.editor, "source": manifest["source"], "exact_match": manifest["exact_match"],
              "num_cases": manifest["num_cases"], "model_params": manifest["model_params"],
              "mend_fresh": manifest.get("mend_fresh"), "ke_fresh": manifest.get("ke_fresh"),
              "serac_fresh": manifest.get("serac_fresh"), "ike_k": manifest.get("ike_k"),
              "ike_context_tokens": manifest.get("ike_context_tokens"),
              "serac_scope_query": manifest.get("serac_scope_query"),
              "ft": manifest.get("ft"),
              "rounds": args.rounds, "interleaved": not args.one_side_at_a_time,
              "threads": args.threads, "xla_flags": xla_thread_flags(args.threads),
              "table": table, "ratios": ratios(table), "sides": sides, "round_times": rounds,
              "agreement": {k: agreement(sides["ours"]["rows"], sides[k]["rows"]) for k in peers},
              "timed_window_s": window_s, "workdir": workdir, "wall_s": time.perf_counter() - t0,
              "command": "python benchmarks/compare_peer.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
