"""KE editor and the MEND/KE meta-trainer on a tiny random BLIP-2 and synthetic MMEdit records."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import worlds

from mmedit_jax import patch as P
from mmedit_jax import training as T
from mmedit_jax.editors import io
from mmedit_jax.editors import ke as KE
from mmedit_jax.editors import ke_net as KN
from mmedit_jax.editors.hparams import load_hparams
from mmedit_jax.eval import records
from mmedit_jax.losses import answer_nll
from mmedit_jax.sites import kernel_of, resolve_sites

SITES = ("language_model/layers/1/fc1", "language_model/layers/1/fc2")
N_TRAIN = worlds.TRAIN_CASES


@pytest.fixture(scope="module")
def world(train_world):
    """`(model, fns, cases, meta)`: the tiny 2-layer BLIP-2 and N_TRAIN cases (`worlds.train_world`)."""
    return train_world


def ke_trainable(world, **kw):
    model, fns, _, _ = world
    shapes = {s: tuple(kernel_of(model.params, s, model.stacks).shape) for s in SITES}
    spec = KE.ke_spec(KN.KEConfig(lstm_hidden=8, condition_dim=12, hidden_dim=10, **kw), shapes)
    return T.ke_trainable(spec, fns, model.params["language_model"]["embed_tokens"]["embedding"])


def mend_trainable(world):
    from mmedit_jax.editors import mend_net as MN

    model, fns, _, _ = world
    shapes = {s: tuple(kernel_of(model.params, s, model.stacks).shape) for s in SITES}
    return T.mend_trainable(MN.mend_spec(MN.MendConfig(rank=8, edit_lr=1e-2), shapes), fns)


def one(cases, i):
    return jax.tree.map(lambda a: jnp.asarray(a[i]), cases)


# --------------------------------------------------------------------------------------------------
# KE editor


def test_ke_patch_is_the_dense_ke_update_and_low_rank(world):
    model, fns, cases, _ = world
    tr = ke_trainable(world, max_scale=0.5)
    params, _ = tr.init(jax.random.key(1))
    editor = tr.editor(params, {})
    case = one(cases, 0)
    patch = jax.jit(editor.edit)(params, model.params, case, {})
    L = case.edit.input_ids.shape[0]
    # Dense reference: grad_W of the edit loss w.r.t. each kernel, then max_scale * sig(eta) * (g * mask + offset).
    # One jitted program (run op by op, its forward and backward compiled some 250 single-op programs).
    kernels = {s: kernel_of(model.params, s, model.stacks) for s in SITES}

    @jax.jit
    def dense_ke_update(params, base, case):
        kernels = {s: kernel_of(base, s, model.stacks) for s in SITES}

        def loss(ks):
            delta = {s: P.Dense(ks[s] - kernels[s]) for s in SITES}
            return answer_nll(fns.logits(base, delta, case.edit, case.images["edit"]), case.edit.labels)

        grads = jax.grad(loss)(kernels)
        c = KN.encode_condition(params, case.cond_ids, case.cond_mask)
        want = {}
        for s in SITES:
            h = KN.head_outputs(params["heads"][s], c, kernels[s].shape)
            mask = h["a_col"][:, None] * jax.nn.softmax(h["a_row"])[None, :]
            offset = h["b_col"][:, None] * jax.nn.softmax(h["b_row"])[None, :]
            want[s] = 0.5 * jax.nn.sigmoid(h["eta"]) * (grads[s] * mask + offset)
        return want

    want = dense_ke_update(params, model.params, case)
    for s in SITES:
        d = patch[s]
        n_in, n_out = kernels[s].shape
        # Rank T + 1: T = L, or on the last layer the answer rows only (the gradient is zero elsewhere).
        last = int(s.split("/")[2]) == model.config.text.num_hidden_layers - 1
        t = case.edit.answer_rows.shape[0] if last else L
        assert d.a.shape == (t + 1, n_in) and d.b.shape == (t + 1, n_out) and d.scale.shape == ()
        np.testing.assert_allclose(d.dense(), want[s], rtol=2e-4, atol=1e-8)
        n_tokens = int(case.edit.attention_mask.sum())
        assert np.linalg.matrix_rank(np.asarray(d.dense(), np.float64), tol=1e-9) <= n_tokens + 1


def test_ke_vmapped_edits_equal_one_at_a_time(world):
    model, _, cases, _ = world
    tr = ke_trainable(world)
    params, _ = tr.init(jax.random.key(2))
    editor = tr.editor(params, {})
    batch = jax.tree.map(lambda a: jnp.asarray(a[:3]), cases)
    vm = jax.jit(jax.vmap(editor.edit, in_axes=(None, None, 0, None)))(params, model.params, batch, {})
    single = jax.jit(editor.edit)
    for i in range(3):
        p = single(params, model.params, one(cases, i), {})
        for s in SITES:
            np.testing.assert_allclose(vm[s].dense()[i], p[s].dense(), rtol=1e-5, atol=1e-9)


def test_ke_save_load_round_trip(world, tmp_path):
    tr = ke_trainable(world)
    params, _ = tr.init(jax.random.key(3))
    tr.save(str(tmp_path), params, {})
    spec, loaded = io.load_ke(str(tmp_path))
    assert spec == tr.spec
    jax.tree.map(np.testing.assert_array_equal, params, loaded)


# --------------------------------------------------------------------------------------------------
# Trainer


CFG = T.TrainConfig(alg="KE", lr=3e-3, lr_lr=3e-3, batch_size=3, accumulate_bs=2, max_iters=5, exact_match=False,
                    log_interval=1, val_interval=10**6, ckpt_interval=3)

# Every MEND test runs this one config on the one `mend_tr`, so they share one compiled train step (the step
# program is cached on the trainable per config; each distinct one cost ~8 s of tracing and compiling): the edit
# terms weighted up (meta-training's edit success), the rank loss on (the warm start checks it), and for the
# loop, which the step program does not read, 40 steps and early stopping on `val/mean` with patience 1 (the
# early-stopping test; the others pass no validation cases).
MEND_CFG = T.TrainConfig.from_hparams({
    "alg": "MEND", "lr": 1e-3, "lr_lr": 1e-2, "batch_size": 3, "accumulate_bs": 1, "exact_match": False,
    "cedit": 1.0, "iedit": 1.0, "cloc": 0.1, "crank": 1.0, "rank_k": 4, "max_iters": 40, "log_interval": 10,
    "val_steps": N_TRAIN, "val_batch_size": N_TRAIN, "val_interval": 1, "early_stop_key": "val/mean",
    "early_stop_patience": 1})


@pytest.fixture(scope="module")
def mend_tr(world):
    """The MEND trainable of every MEND test: they run `MEND_CFG` (one compiled train step)."""
    return mend_trainable(world)


@pytest.fixture(scope="module")
def ke_tr(world):
    """One KE trainable for the tests that run `CFG`, so they share one compiled train step."""
    return ke_trainable(world)


@pytest.mark.parametrize("kind", ["ke", "mend"])
def test_train_step_decreases_the_loss(world, kind, request):
    model, fns, cases, _ = world
    if kind == "ke":
        tr, cfg = ke_trainable(world, max_scale=30.0), dataclasses_replace(CFG, lr=1e-2, accumulate_bs=1)
    else:
        tr, cfg = request.getfixturevalue("mend_tr"), MEND_CFG
    tx, step = T.step_program(tr, cfg)  # make_optimizer + make_train_step, cached on the trainable
    ts = T.init_train_state(tr, tx, 0, cfg)
    batch = jax.tree.map(lambda a: jnp.asarray(a[:3]), cases)
    w = jnp.ones(3, bool)
    losses = []
    for _ in range(8):
        ts, m = step(ts, model.params, batch, w)
        losses.append(float(m["loss/total_edit"]))
    assert all(np.isfinite(losses)) and int(ts["skipped"]) == 0
    assert np.all(np.diff(losses) < 0) and losses[-1] < losses[0] - 0.02, losses
    if kind == "mend":  # the statistics absorbed every kept row of every step (training mode)
        counts = [float(v["u"]["count"]) for v in ts["editor_state"].values()]
        assert all(c > 0 for c in counts)


def test_mend_statistics_after_a_step_equal_a_sequential_welford_pass(world, mend_tr):
    """Training mode: the shared statistics absorb every kept row (any(u) & any(delta)) of all E edits, pooled
    per shape group in inner-params order, as the reference's row-by-row Welford loop."""
    from mmedit_jax.editors.mend import capture_factors

    model, fns, cases, _ = world
    tr, cfg = mend_tr, MEND_CFG
    tx, step = T.step_program(tr, cfg)
    batch = jax.tree.map(lambda a: jnp.asarray(a[:3]), cases)
    ts, _ = step(T.init_train_state(tr, tx, 0, cfg), model.params, batch, jnp.ones(3, bool))
    spec = tr.spec
    out_dims = {st: spec.shape(st)[1] for st in spec.sites}
    # jitted: op by op, the vmapped forward and backward compiled some 200 single-op programs
    factors = jax.jit(jax.vmap(lambda c: capture_factors(fns, model.params, {}, c, spec.sites, out_dims)))(batch)
    for key, members in spec.groups:
        for side, j in (("u", 0), ("delta", 1)):
            k, mean, m2 = 0, None, None
            for e in range(3):
                for site in members:
                    u, d = (np.asarray(x[e], np.float64) for x in factors[site])
                    x = (u, d)[j]
                    for t in range(u.shape[0]):
                        if not (np.any(u[t] != 0) and np.any(d[t] != 0)):
                            continue
                        k += 1
                        if mean is None:
                            mean, m2 = x[t].copy(), np.zeros_like(x[t])
                        else:
                            new = mean + (x[t] - mean) / k
                            m2 += (x[t] - mean) * (x[t] - new)
                            mean = new
            got = ts["editor_state"][key][side]
            assert float(got["count"]) == k > 0
            np.testing.assert_allclose(got["mean"], mean, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(got["m2"], m2, rtol=1e-3, atol=1e-6)


def test_non_finite_step_is_skipped_and_counted(world, mend_tr):
    model, fns, cases, _ = world
    tr, cfg = mend_tr, MEND_CFG
    tx, step = T.step_program(tr, cfg)
    ts0 = T.init_train_state(tr, tx, 0, cfg)
    batch = jax.tree.map(lambda a: jnp.asarray(a[:3]), cases)
    bad = batch.replace(images={**batch.images, "image_rephrase": batch.images["image_rephrase"].at[1].set(jnp.nan)})
    w = jnp.ones(3, bool)
    ts1, m = step(ts0, model.params, bad, w)
    assert not bool(m["finite"]) and int(ts1["skipped"]) == 1 and int(ts1["step"]) == 1
    for key in ("params", "opt_state", "editor_state"):
        jax.tree.map(np.testing.assert_array_equal, ts0[key], ts1[key])
    ts2, m = step(ts1, model.params, batch, w)
    assert bool(m["finite"]) and int(ts2["skipped"]) == 1
    assert not np.array_equal(ts2["params"]["edit_lrs"][SITES[0]], ts1["params"]["edit_lrs"][SITES[0]])


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_accumulation_updates_every_k_steps(world, ke_tr):
    model, fns, cases, _ = world
    tx, step = T.step_program(ke_tr, CFG)
    ts0 = T.init_train_state(ke_tr, tx, 0)
    w = jnp.ones(3, bool)
    ts1, _ = step(ts0, model.params, jax.tree.map(lambda a: jnp.asarray(a[:3]), cases), w)
    jax.tree.map(np.testing.assert_array_equal, ts0["params"], ts1["params"])
    ts2, _ = step(ts1, model.params, jax.tree.map(lambda a: jnp.asarray(a[3:6]), cases), w)
    assert not np.array_equal(ts2["params"]["cond"]["kernel"], ts1["params"]["cond"]["kernel"])


def test_objective_on_answer_rows_equals_the_full_sequence(world):
    """The NLL and accuracy terms score the rephrase inputs at their answer rows only (`forward.teacher_forced`,
    as evaluation); with the full logits instead (no `answer_rows`) every term is the same."""
    model, fns, cases, _ = world
    tr = ke_trainable(world, max_scale=30.0)
    params, _ = tr.init(jax.random.key(4))
    case = one(cases, 0)
    assert case.rephrase.answer_rows is not None and case.image_rephrase.answer_rows is not None
    full = case.replace(rephrase=case.rephrase.replace(answer_rows=None),
                        image_rephrase=case.image_rephrase.replace(answer_rows=None))
    cfg = dataclasses_replace(CFG, crank=1.0, rank_k=4)
    patch = jax.jit(tr.editor(params, {}).edit)(params, model.params, case, {})
    losses = jax.jit(lambda base, c: T.case_losses(fns, base, patch, c, cfg))
    rows, whole = losses(model.params, case), losses(model.params, full)
    assert set(rows) == set(whole)
    for k in rows:
        np.testing.assert_allclose(rows[k], whole[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert float(rows["loss/edit"]) > 0 and float(rows["loss/loc"]) > 0


def test_lagrangian_objective_ascends_the_multiplier(world, ke_tr):
    model, fns, cases, _ = world
    cfg = dataclasses_replace(CFG, objective="lagrangian", accumulate_bs=1, margin_kl=1e-3)
    tx, step = T.step_program(ke_tr, cfg)
    ts0 = T.init_train_state(ke_tr, tx, 0, cfg)
    assert float(ts0["alpha"]) == 1.0 and float(ts0["margin"]) == pytest.approx(1e-3)
    ts1, m = step(ts0, model.params, jax.tree.map(lambda a: jnp.asarray(a[:3]), cases), jnp.ones(3, bool))
    kl = float(m["loss/loc"] + m["loss/image_loc"])
    cr = cfg.cedit * float(m["loss/edit"]) + cfg.iedit * float(m["loss/image_edit"])
    assert float(m["loss/lagrangian"]) == pytest.approx(cr + 1.0 * (kl - 1e-3), rel=1e-5)
    # d/d alpha = KL - margin < 0 here (a fresh KE barely moves the model): ascent lowers alpha, not below 0.
    assert kl < 1e-3 and 0.0 <= float(ts1["alpha"]) < 1.0
    with pytest.raises(ValueError, match="objective"):
        T.TrainConfig(objective="constrained")


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_result(world, ke_tr, tmp_path):
    model, fns, cases, meta = world
    tr = ke_tr
    straight = T.train(tr, CFG, model.params, cases, str(tmp_path / "a"), progress=False)
    compiled = T.step_program(tr, CFG)[1]._cache_size()  # other tests may have compiled other variants before

    def kill(step, row):
        if step == 4:  # after the checkpoint at step 3 (mid-accumulation: accumulate_bs 2), before the end
            raise Killed

    with pytest.raises(Killed):
        T.train(tr, CFG, model.params, cases, str(tmp_path / "b"), progress=False, on_step=kill)
    resumed = T.train(tr, CFG, model.params, cases, str(tmp_path / "b"), progress=False)
    assert resumed.resumed_from == 3
    for key in ("params", "opt_state", "rng", "step", "skipped"):
        jax.tree.map(np.testing.assert_array_equal, straight.state[key], resumed.state[key])
    # The metrics file holds each step once, as the uninterrupted run's.
    rows = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    want = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["loss/total_edit"] for r in rows] == [r["loss/total_edit"] for r in want]
    assert os.path.exists(tmp_path / "a" / "editor" / "params.npz")
    # The killed and the resumed run (its state restored from a checkpoint) reused the first run's compiled step.
    assert T.step_program(tr, CFG)[1]._cache_size() == compiled


def test_resume_only_into_its_own_run(world, ke_tr, tmp_path):
    """A resume into a directory another run wrote (here: another lr) is refused naming what differs, as are
    checkpoints with no fingerprint; a run killed before its first checkpoint starts over without its old rows;
    a resume may run longer (`max_iters` is not part of the fingerprint)."""
    model, _, cases, _ = world
    out = str(tmp_path / "run")

    def kill(step, row):
        if step == 2:  # before the first checkpoint (ckpt_interval 3)
            raise Killed

    with pytest.raises(Killed):
        T.train(ke_tr, CFG, model.params, cases, out, progress=False, tensorboard=False, on_step=kill)
    assert [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    with pytest.raises(records.RunMismatch, match=r"config\.lr: "):
        T.train(ke_tr, dataclasses_replace(CFG, lr=1e-3), model.params, cases, out, progress=False,
                tensorboard=False)
    with pytest.raises(records.RunMismatch, match="train_cases"):
        T.train(ke_tr, CFG, model.params, jax.tree.map(lambda a: a[::-1], cases), out, progress=False,
                tensorboard=False)
    done = T.train(ke_tr, CFG, model.params, cases, out, progress=False, tensorboard=False)
    assert done.resumed_from is None
    assert [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3, 4, 5]
    longer = T.train(ke_tr, dataclasses_replace(CFG, max_iters=6), model.params, cases, out, progress=False,
                     tensorboard=False)
    assert longer.resumed_from == 5 and int(longer.state["step"]) == 6
    os.remove(os.path.join(out, records.RUN_FILE))
    with pytest.raises(records.RunMismatch, match="proves"):
        T.train(ke_tr, CFG, model.params, cases, out, progress=False, tensorboard=False)
    # --no-resume starts over and claims the directory; the old run's files are set aside, not deleted
    again = T.train(ke_tr, CFG, model.params, cases, out, progress=False, tensorboard=False, resume=False)
    assert again.resumed_from is None and int(again.state["step"]) == 5
    assert os.path.exists(os.path.join(out, records.RUN_FILE))
    aside = [d for d in os.listdir(out) if d.startswith("replaced-")]
    assert len(aside) == 1 and os.path.isdir(os.path.join(out, aside[0], "checkpoints"))
    assert len(open(os.path.join(out, aside[0], "metrics.jsonl")).readlines()) == 6
    assert T.train(ke_tr, CFG, model.params, cases, out, progress=False, tensorboard=False).resumed_from == 5


def test_warm_start_continues_from_a_saved_editor(world, mend_tr, tmp_path):
    """`--init-editor`: training starts from a saved editor's weights and statistics, with the rank loss on."""
    model, fns, cases, _ = world
    cfg = MEND_CFG  # the rank loss on (crank 1); every run here reuses its compiled step
    assert cfg.crank > 0
    first = T.train(mend_tr, cfg, model.params, cases, str(tmp_path / "a"), progress=False, tensorboard=False)
    assert len(first.history) == cfg.max_iters and all(np.isfinite(r["loss/rank_loc"]) for r in first.history)
    _, params, stats = io.load_mend(str(tmp_path / "a" / "editor"))
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(first.state["params"]))
    init = T.load_editor_state(str(tmp_path / "a" / "editor"))
    tx = T.make_optimizer(cfg, mend_tr.labels(init[0]))
    fresh = T.init_train_state(mend_tr, tx, 0, cfg)
    warm = T.warm_start(fresh, tx, *init)
    jax.tree.map(np.testing.assert_array_equal, warm["params"], params)
    jax.tree.map(np.testing.assert_array_equal, warm["editor_state"], stats)
    # It continues: the first warm step's loss is the trained editor's, not a fresh one's.
    again = T.train(mend_tr, cfg, model.params, cases, str(tmp_path / "b"), progress=False, tensorboard=False,
                    init=init)
    scratch = T.train(mend_tr, cfg, model.params, cases, str(tmp_path / "c"), progress=False, tensorboard=False)
    assert again.history[0]["loss/total_edit"] != scratch.history[0]["loss/total_edit"]
    # An editor of another shape is refused by name.
    bad = jax.tree.map(lambda a: np.zeros(np.shape(a)[:-1] + (np.shape(a)[-1] + 1,)) if np.ndim(a) else a, params)
    with pytest.raises(ValueError, match="warm start: params"):
        T.warm_start(fresh, tx, bad, stats)


def test_validation_reports_the_five_metrics_and_early_stops(world, tmp_path):
    model, fns, cases, meta = world
    tr = ke_trainable(world)
    cfg = dataclasses_replace(CFG, lr=0.0, lr_lr=0.0, val_interval=1, val_steps=4, val_batch_size=2,
                              early_stop_patience=2, max_iters=10)
    res = T.train(tr, cfg, model.params, cases, str(tmp_path), val_cases=cases, val_meta=meta,
                  progress=False)
    vals = [r for r in res.history if r.get("split") == "val"]
    # lr 0 (KE has no running statistics): the validation loss never improves after the first step, so
    # patience 2 stops at step 3.
    assert res.stopped_early and [v["step"] for v in vals] == [1, 2, 3]
    for k in ("val/reliability", "val/t_generality", "val/m_generality", "val/t_locality", "val/m_locality",
              "loss/total_edit_val"):
        assert np.isfinite(vals[-1][k]), k
    assert io.load_ke(str(tmp_path / "editor"))[0] == tr.spec
    # The same scalars as TensorBoard events, read back from the event files.
    from mmedit_jax.training.metric_writer import read_scalars

    tb = read_scalars(str(tmp_path / "tensorboard"))
    train_rows = [r for r in res.history if r.get("split") != "val"]
    assert [s for s, _ in tb["loss/total_edit"]] == [r["step"] for r in train_rows]
    np.testing.assert_allclose([v for _, v in tb["loss/total_edit"]], [r["loss/total_edit"] for r in train_rows],
                               rtol=1e-6)
    np.testing.assert_allclose([v for _, v in tb["val/reliability"]], [v["val/reliability"] for v in vals],
                               rtol=1e-6)
    five = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality")
    assert vals[-1]["val/mean"] == pytest.approx(np.mean([vals[-1][f"val/{k}"] for k in five]))


def test_early_stopping_on_a_validation_metric_keeps_the_highest(world, mend_tr, tmp_path, monkeypatch):
    """`early_stop_key: val/...` selects the editor with the highest value (losses: the lowest)."""
    model, fns, cases, meta = world
    seen = iter([50.0, 80.0, 60.0])

    def fake_call(self, ts):
        return {"val/mean": next(seen), "loss/total_edit_val": 1.0}

    monkeypatch.setattr(T.Validator, "__call__", fake_call)
    saved = []

    def save_mend(d, *args, **kw):  # what `mend_tr.save` writes with (the trainable keeps its compiled step)
        saved.append(1)
        os.makedirs(d, exist_ok=True)

    monkeypatch.setattr(io, "save_mend", save_mend)
    cfg = MEND_CFG  # validation every step, early stopping on val/mean with patience 1
    assert (cfg.val_interval, cfg.early_stop_key, cfg.early_stop_patience) == (1, "val/mean", 1)
    res = T.train(mend_tr, cfg, model.params, cases, str(tmp_path), val_cases=cases, val_meta=meta,
                  progress=False, tensorboard=False)
    # 50 (best), 80 (best), 60: not better, and patience 1 stops at step 3
    assert int(res.state["best_step"]) == 2 and float(res.state["best_val"]) == -80.0 and len(saved) == 2
    assert res.stopped_early and int(res.state["step"]) == 3


# --------------------------------------------------------------------------------------------------
# Config and data order


def test_easyedit_yaml_keys(tmp_path):
    text = """
alg_name: MEND
inner_params:
- opt_model.model.decoder.layers.31.fc1.weight
lr: 1e-6
edit_lr: 1e-4
lr_lr: 1e-4
cedit: 0.1
iedit: 0.1
cloc: 1.0
rank: 1920
n_hidden: 1
mlp_class: IDMLP
combine: true
norm: true
shared: true
max_iters: 30000
accumulate_bs: 2
grad_clip: 100.
results_dir: ./results
"""
    path = tmp_path / "mend.yaml"
    path.write_text(text)
    hp = load_hparams(str(path))
    cfg = T.TrainConfig.from_hparams(hp)
    assert (cfg.alg, cfg.lr, cfg.lr_lr, cfg.cedit, cfg.iedit, cfg.cloc) == ("MEND", 1e-6, 1e-4, 0.1, 0.1, 1.0)
    assert (cfg.max_iters, cfg.accumulate_bs, cfg.grad_clip) == (30000, 2, 100.0)
    assert cfg.inner_params == ("opt_model.model.decoder.layers.31.fc1.weight",)
    from mmedit_jax.editors import mend_net as MN

    mc = MN.MendConfig.from_hparams(hp)
    assert (mc.rank, mc.n_hidden, mc.combine, mc.norm, mc.shared, mc.edit_lr) == (1920, 1, True, True, True, 1e-4)
    for name in ("mend_blip2.yaml", "ke_blip2.yaml", "mend_minigpt4.yaml", "ke_minigpt4.yaml"):
        hp = load_hparams(os.path.join(os.path.dirname(__file__), "..", "configs", name))
        cfg = T.TrainConfig.from_hparams(hp)
        assert len(cfg.inner_params) == 6 and cfg.max_iters == 30000
    assert T.ke_config_from_hparams(hp) == KN.KEConfig(lstm_hidden=512, condition_dim=768, hidden_dim=512)
    with pytest.raises(ValueError, match="alg"):
        T.TrainConfig.from_hparams({"alg_name": "ROME"})


def test_resolve_sites_names_the_bad_parameter(world):
    model = world[0]
    assert resolve_sites(["opt_model.model.decoder.layers.1.fc2.weight"], model.params, model.stacks) == \
        ("language_model/layers/1/fc2",)
    with pytest.raises(KeyError, match="layers/7"):
        resolve_sites(["opt_model.model.decoder.layers.7.fc1.weight"], model.params, model.stacks)


def test_data_order_is_a_permutation_per_epoch_and_deterministic():
    n, e = 5, 3
    seq = np.concatenate([T.batch_indices(7, s, e, n) for s in range(5)])  # 15 positions = 3 epochs
    for ep in range(3):
        assert sorted(seq[ep * n:(ep + 1) * n]) == list(range(n))
    np.testing.assert_array_equal(seq, np.concatenate([T.batch_indices(7, s, e, n) for s in range(5)]))
    assert not np.array_equal(seq[:n], seq[n:2 * n])


@pytest.mark.parametrize("kind", ["mend"])  # KE's steps lower its loss: test_train_step_decreases_the_loss[ke]
def test_meta_training_raises_edit_success_above_the_untrained_editor(world, kind, request):
    """Edit success (post-edit Reliability and T-Generality, token accuracy) of the editor before and after a
    short meta-training run on the synthetic cases, scored by the validation programs (the harness's)."""
    model, fns, cases, meta = world
    if kind == "mend":
        # 40 steps, no validation cases in `train` (so no early stopping); the Validator scores all N_TRAIN
        tr, cfg = request.getfixturevalue("mend_tr"), MEND_CFG
        assert (cfg.max_iters, cfg.val_steps, cfg.val_batch_size) == (40, N_TRAIN, N_TRAIN)
    else:
        tr = ke_trainable(world, max_scale=30.0)
        cfg = dataclasses_replace(CFG, lr=1e-2, accumulate_bs=1, max_iters=40, cedit=1.0, iedit=1.0, cloc=0.1,
                                  val_steps=N_TRAIN, val_batch_size=N_TRAIN)
    tx, _ = T.step_program(tr, cfg)
    untrained = T.init_train_state(tr, tx, cfg.seed, cfg)
    trained = T.train(tr, cfg, model.params, cases, None, progress=False).state
    assert int(trained["skipped"]) == 0

    validator = T.Validator(tr, cfg, model.params, cases, meta, untrained)  # one compile for both states

    def success(ts):
        v = validator(ts)
        return (v["val/reliability"] + v["val/t_generality"]) / 2

    before, after = success(untrained), success(trained)
    assert after >= before + 40.0, (before, after)  # measured: MEND 0 -> 91, KE 0 -> 52
