"""Ours (the JAX harness: vmapped edits, compiled edit + score) against the peer (`peer_easyedit.py`, EasyEdit's
one-edit-at-a-time procedure in PyTorch) on the same model, cases and editor weights, in one run.

    python benchmarks/compare_peer.py --editor mend                       # demo: tiny random BLIP-2, synthetic data
    python benchmarks/compare_peer.py --editor ft-l --model DIR --data FILE --image-root DIR [--editor-ckpt DIR]
    python benchmarks/compare_peer.py --editor ke --source world          # the shipped world KE

Steps: (1) prepare once, here: load the model and data the way `mmedit_jax.evaluate` does
(`pipeline.prepare_data`), export the weights to a transformers directory (`export_hf`), save the token arrays and
pixels (`save_cases`) and the editor (ours: `editors.io.save_mend` / `save_ke`; the peer's: EasyEdit's MEND
state-dict layout, `mend_to_easyedit`, or a `peer_easyedit.KENet` state dict, `ke_to_torch`; FT: the hparams).
(2) run each side in its own process, one after the other, so each peak RSS is its own: ours reloads the exported
directory with `from_pretrained` (bit-identical to the weights exported), scores every case with the harness at
the best batch size, and times steady-state calls per vmapped batch size; the peer edits and scores every case one
at a time. (3) print edits/s of both and the ratio, peak memory, and metric agreement (mean |difference| per metric
over cases and the fraction of cases where the metric is identical); `--json` writes it.

Model and data sources are pluggable (`SOURCES`): `files` (--model/--data/--image-root), `world` (the built-in
world's shipped model, eval split and editors via `mmedit_jax.world.assets`, the default once it exists) and
`demo` (`mmedit_jax.demo.demo_setup`; for MEND without a checkpoint a freshly initialised MEND over the last two
layers' fc1/fc2, statistics gathered from the cases' own edit gradients; for KE without a checkpoint a fresh KE over the
same sites at ke_world.yaml's sizes, the `a_col` part of its heads' output biases perturbed so that the update is
not near zero and mostly the gradient term, `fresh_ke`).
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


def world_available() -> bool:
    try:
        from mmedit_jax.world import assets  # noqa: F401
    except ImportError:
        return False
    return True


SOURCES = {"demo": source_demo, "files": source_files, "world": source_world}


# --------------------------------------------------------------------------------------------------
# Editors.


def last_ffn_shapes(model, layers: int) -> dict:
    """`{site: kernel shape}` of fc1/fc2 in the last `layers` OPT layers: what the fresh editors edit."""
    from mmedit_jax.sites import kernel_of

    n = model.config.text.num_hidden_layers
    sites = [f"language_model/layers/{i}/{fc}" for i in range(n - layers, n) for fc in ("fc1", "fc2")]
    return {s: tuple(kernel_of(model.params, s, model.stacks).shape) for s in sites}


def fresh_mend(model, cases_batch, pixels, layers: int = 2, seed: int = 0, perturb: float = 0.0,
               stats_from: str = "data"):
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
    spec = MN.mend_spec(MN.MendConfig(rank=64), shapes)
    params, stats = MN.init_mend(jax.random.PRNGKey(seed), spec)
    if perturb:
        leaves, tree = jax.tree_util.tree_flatten_with_path(params["nets"])
        keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
        new = [perturb * jax.random.normal(k, x.shape) if str(path[-1].key) == "up" else x
               for (path, x), k in zip(leaves, keys)]
        params = {**params, "nets": jax.tree_util.tree_unflatten(tree, new)}
    if stats_from == "random":
        rng = np.random.default_rng(seed)
        moments = lambda d: {"count": np.float32(100), "mean": rng.normal(0, 0.1, d).astype(np.float32),  # noqa: E731
                             "m2": (99 * rng.uniform(0.5, 2.0, d) ** 2).astype(np.float32)}
        stats = {k: {"u": moments(spec.group_shape(k)[0]), "delta": moments(spec.group_shape(k)[1])}
                 for k, _ in spec.groups}
        return spec, params, stats
    fns = Blip2Fns(model.module)  # the language model's sites: cached image embeddings
    cases = make_cases(cases_batch, fns.image_table(model.params, pixels))
    sites = tuple(shapes)
    out_dims = {s: shapes[s][1] for s in sites}
    factors = jax.jit(jax.vmap(lambda c: M.capture_factors(fns, model.params, {}, c, sites, out_dims)))(
        jax.tree.map(np.asarray, cases))
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
    manifest = {"editor": args.editor, "task": task, "num_cases": len(records), "hf": hf_dir,
                "cases": os.path.join(workdir, "cases.npz"), "meta": prepared.meta,
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


def save_cases(path: str, batch, pixels: np.ndarray) -> None:
    """Writes an `EditBatch` (`mmedit_jax.data.cases`) and its image table `[N, 3, H, W]` to one npz, the five
    inputs under EasyEdit's names (`case.INPUTS`), as the peer reads them (`peer_easyedit.load_cases`)."""
    from mmedit_jax.case import INPUTS

    arrays = {"pixels": np.asarray(pixels, np.float32), "case_index": np.asarray(batch.case_index),
              "cond_ids": np.asarray(batch.cond_ids), "cond_mask": np.asarray(batch.cond_mask),
              "valid": np.asarray(batch.valid)}
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


def vm_hwm_mib() -> float:
    """Peak RSS of this process (VmHWM; `peer_easyedit.peak_rss_mib` without importing torch here)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def run_ours(manifest: dict, batches=(1, 4, 16, 64), repeats: int = 3) -> dict:
    """The harness on the exported model: every case scored (quality), and steady edits/s per batch size."""
    import jax

    from mmedit_jax import pipeline
    from mmedit_jax.case import make_cases, take
    from mmedit_jax.eval import harness, steps, throughput
    from mmedit_jax.loading import from_pretrained

    model = from_pretrained(manifest["hf"])
    if manifest["editor"] == "ft-l":
        hp = manifest["ft"]
        from mmedit_jax.convert.mend_to_easyedit import easyedit_name

        hparams = {k: hp[k] for k in FT_KEYS}
        hparams["inner_params"] = [easyedit_name(s) for s in hp["sites"]]
        editor = pipeline.build_editor("ft-l", model, hparams)
    else:
        editor = pipeline.build_editor(manifest["editor"], model, editor_ckpt=manifest[manifest["editor"]])
    batch, pixels = cases_from_npz(manifest["cases"])
    cases = make_cases(batch, editor.fns.image_table(model.params, pixels))
    n = manifest["num_cases"]
    em = manifest["exact_match"]
    # Timing: what the peer computes, with the frozen-prefix cache where the editor allows it (as the bench).
    prefix = steps.prefix_layer(editor, model.params, take(cases, 0))
    step_fns = steps.make_step_fns(editor, em, base_accuracy=False, prefix_layer=prefix)
    rows = []
    for b in batches:  # no batches: quality only (tests)
        r = throughput.time_edit_step(editor, model.params, cases, b, repeats * (3 if b == 1 else 1), em,
                                      step_fns).as_dict()
        rows.append({k: r[k] for k in ("batch", "compile_s", "edits_per_s", "p50_ms", "p90_ms")})
        print(f"  ours E={b}: {r['edits_per_s']:.1f} edits/s (compile {r['compile_s']:.1f}s)", file=sys.stderr,
              flush=True)
    best = max(rows, key=lambda r: r["edits_per_s"]) if rows else {"batch": 4, "edits_per_s": float("nan")}
    quality = harness.run(editor, model.params, cases, manifest["meta"], None, batch_size=min(best["batch"], n),
                          exact_match=em, resume=False, progress=False)
    per_case = [{"index": int(r["index"]), **{m: r[m] for m in METRICS}} for r in quality.rows]
    return {"rows": per_case, "throughput": rows, "best_batch": best["batch"], "edits_per_s": best["edits_per_s"],
            "one_at_a_time_edits_per_s": next((r["edits_per_s"] for r in rows if r["batch"] == 1), None),
            "means": {m: quality.summary[m] for m in METRICS}, "peak_rss_mib": vm_hwm_mib(), "prefix_layer": prefix,
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def peer_files(manifest: dict) -> dict:
    """The peer's inputs in a prepared manifest, as `peer_easyedit.run_files` takes them (the worker gets the same
    as command-line flags; tests call `run_files(**peer_files(manifest))` in their own process)."""
    return {"hf": manifest["hf"], "cases": manifest["cases"], "editor": manifest["editor"],
            "ft": manifest.get("peer_ft"), "mend": manifest.get("peer_mend"), "ke": manifest.get("peer_ke"),
            "exact_match": manifest["exact_match"]}


def agreement(ours_rows, peer_rows) -> dict:
    """Per metric: mean |ours - peer| over the cases both scored, and the fraction where they are identical."""
    peer = {r["index"]: r for r in peer_rows}
    common = [r for r in ours_rows if r["index"] in peer]
    out = {"num_cases": len(common)}
    for m in METRICS:
        d = np.asarray([abs(float(r[m]) - float(peer[r["index"]][m])) for r in common])
        out[m] = {"mean_abs_diff": float(d.mean()) if len(d) else float("nan"),
                  "identical": float(np.mean(d <= 1e-6)) if len(d) else float("nan"),
                  "max_abs_diff": float(d.max()) if len(d) else float("nan")}
    return out


def _worker(cmd: list[str], out_path: str) -> dict:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    with open(out_path) as f:
        res = json.load(f)
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def print_table(result: dict, file=sys.stdout) -> None:
    o, p, a = result["ours"], result["peer"], result["agreement"]
    print(f"\n{result['editor']} on {result['source']} ({a['num_cases']} cases, "
          f"{'exact match' if result['exact_match'] else 'token accuracy'}), {o['device']}", file=file)
    print(f"{'':22s}{'ours (JAX, vmapped)':>22s}{'peer (PyTorch, 1 by 1)':>25s}", file=file)
    print(f"{'edits/s':22s}{o['edits_per_s']:>22.2f}{p['edits_per_s']:>25.2f}", file=file)
    print(f"{'  at batch size':22s}{o['best_batch']:>22d}{1:>25d}", file=file)
    print(f"{'peak RSS MiB':22s}{o['peak_rss_mib']:>22.0f}{p['peak_rss_mib']:>25.0f}", file=file)
    print(f"ratio ours/peer: {result['ratio']:.1f}x (one edit at a time, ours: "
          f"{o['one_at_a_time_edits_per_s']:.2f} edits/s = {result['ratio_one_at_a_time']:.1f}x)", file=file)
    print(f"\n{'metric':14s}{'ours':>8s}{'peer':>8s}{'mean |diff|':>13s}{'identical':>11s}", file=file)
    for m in METRICS:
        print(f"{m:14s}{o['means'][m]:>8.2f}{p['means'][m]:>8.2f}{a[m]['mean_abs_diff']:>13.2e}"
              f"{a[m]['identical']:>11.1%}", file=file)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default="mend", choices=("ft-l", "mend", "ke"))
    ap.add_argument("--source", choices=sorted(SOURCES),
                    help="default: files when --model is given, else the built-in world when installed, else demo")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--image-root")
    ap.add_argument("--rephrase-image-root")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--task", choices=("vqa", "caption"))
    ap.add_argument("--editor-ckpt", help="our MEND (save_mend / convert mend-easyedit) or KE (save_ke) directory")
    ap.add_argument("--config", help="FT hparams YAML (default configs/ft_l_blip2.yaml)")
    ap.add_argument("--ft-steps", type=int, help="override num_steps")
    ap.add_argument("--limit", type=int, help="first N records of the file")
    ap.add_argument("--peer-limit", type=int, help="the peer scores only the first N cases (it is slow)")
    ap.add_argument("--demo-records", type=int, default=32)
    ap.add_argument("--batches", default="1,4,16,32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--token-accuracy", action="store_true")
    ap.add_argument("--pad-multiple", type=int, default=1, help="our side's padding (the peer runs unpadded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the prepared files here (default: a temporary directory)")
    ap.add_argument("--json", help="write the whole comparison here")
    ap.add_argument("--worker", choices=("ours",), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker == "ours":  # child process: the manifest in --workdir, the result to --json
        with open(os.path.join(args.workdir, "manifest.json")) as f:
            manifest = json.load(f)
        res = run_ours(manifest, tuple(int(b) for b in args.batches.split(",")), args.repeats)
        with open(args.json, "w") as f:
            json.dump(res, f)
        return res

    args.source = args.source or ("files" if args.model else "world" if world_available() else "demo")
    if args.source == "files" and not (args.model and args.data and args.image_root):
        ap.error("--model needs --data and --image-root")
    workdir = args.workdir or tempfile.mkdtemp(prefix="compare_peer_")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    manifest = prepare(args, workdir)
    print(f"prepared {manifest['num_cases']} cases, {manifest['model_params']:,} parameters in {workdir} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    ours_json = os.path.join(workdir, "ours.json")
    ours = _worker([sys.executable, os.path.abspath(__file__), "--worker", "ours", "--workdir", workdir,
                    "--json", ours_json, "--batches", args.batches, "--repeats", str(args.repeats)], ours_json)
    peer_json = os.path.join(workdir, "peer.json")
    cmd = [sys.executable, os.path.join(HERE, "peer_easyedit.py"), "--hf", manifest["hf"], "--cases", manifest["cases"],
           "--editor", args.editor, "--out", peer_json]
    if args.editor == "ft-l":
        ft_path = os.path.join(workdir, "peer_ft.json")
        with open(ft_path, "w") as f:
            json.dump(manifest["peer_ft"], f)
        cmd += ["--ft-json", ft_path]
    elif args.editor == "ke":
        cmd += ["--ke", manifest["peer_ke"]]
    else:
        cmd += ["--mend", manifest["peer_mend"]]
    if not manifest["exact_match"]:
        cmd.append("--token-accuracy")
    if args.peer_limit:
        cmd += ["--limit", str(args.peer_limit)]
    peer = _worker(cmd, peer_json)

    result = {"editor": args.editor, "source": manifest["source"], "exact_match": manifest["exact_match"],
              "num_cases": manifest["num_cases"], "model_params": manifest["model_params"],
              "mend_fresh": manifest.get("mend_fresh"), "ke_fresh": manifest.get("ke_fresh"), "ft": manifest.get("ft"),
              "ours": ours, "peer": peer, "agreement": agreement(ours["rows"], peer["rows"]),
              "ratio": ours["edits_per_s"] / peer["edits_per_s"],
              "ratio_one_at_a_time": (ours["one_at_a_time_edits_per_s"] or float("nan")) / peer["edits_per_s"],
              "workdir": workdir, "wall_s": time.perf_counter() - t0}
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
