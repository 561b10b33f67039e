"""SERAC: routing math against the reference formulas, the memory as the patch (empty patch = base model),
the counterfactual input layout, vmapped edits, training and the saved editor, on the tiny training world."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmedit_jax import training as T
from mmedit_jax.case import take
from mmedit_jax.editors import io
from mmedit_jax.editors import serac_net as SN
from mmedit_jax.editors.serac import SeracFns
from mmedit_jax.models.opt import OPTDecoder

HPARAMS = {"cls_dim": 16, "cls_layers": 1, "cls_heads": 2}


@pytest.fixture(scope="module")
def serac(train_world):
    """`(model, trainable, params, cases)`: a fresh SERAC (counterfactual = the base language model's copy) on
    `worlds.train_world`."""
    model, _, cases, _ = train_world
    cfg = T.TrainConfig.from_hparams({"alg": "SERAC"})
    tr = T.build_trainable("serac", model, HPARAMS, cfg)
    params, _ = tr.init(jax.random.key(0))
    return model, tr, params, cases


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_routing_math_matches_the_reference_formulas():
    rng = np.random.default_rng(0)
    clf = SN.SeracConfig(classifier=None, counterfactual=None, image_width=4, image_token_id=3)
    keys = rng.normal(size=(5, 8)).astype(np.float32)
    query = (keys[2] + 0.1 * rng.normal(size=8)).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 1], bool)  # the nearest slot is unfilled: it must not win
    ls = np.asarray(SN.log_similarity(clf, jnp.asarray(query), jnp.asarray(keys), jnp.asarray(valid)))
    d = ((keys - query) ** 2).sum(-1)
    want = np.where(valid, -d, -np.inf)
    np.testing.assert_allclose(ls, want, rtol=1e-5)
    s, c = SN.route(jnp.asarray(ls))
    assert int(c) == int(np.argmax(want)) != 2
    np.testing.assert_allclose(float(s), np.exp(want.max()), rtol=1e-5)
    # the image-aware scope (ours) adds the squared distance of the image keys
    img_keys = rng.normal(size=(5, 3)).astype(np.float32)
    q_img = rng.normal(size=3).astype(np.float32)
    ls_img = SN.log_similarity(dataclasses.replace(clf, scope_image=True), jnp.asarray(query), jnp.asarray(keys),
                               jnp.asarray(valid), jnp.asarray(q_img), jnp.asarray(img_keys))
    want_img = np.where(valid, -d - ((img_keys - q_img) ** 2).sum(-1), -np.inf)
    np.testing.assert_allclose(np.asarray(ls_img), want_img, rtol=1e-5)
    # unsquared distance and cosine (EasyEdit's `square: false`, `cos: true`)
    ls2 = SN.log_similarity(dataclasses.replace(clf, square=False), jnp.asarray(query), jnp.asarray(keys),
                            jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(ls2)[valid], -np.sqrt(d)[valid], rtol=1e-5)
    # soft mixture log((1 - s) p_base + s p_cf + eps) and hard routing, at s on both sides of 0.5
    base, cf = rng.normal(size=(2, 6, 11)).astype(np.float32)
    for s in (0.2, 0.7):
        soft = np.asarray(SN.mix(clf, jnp.asarray(base), jnp.asarray(cf), jnp.asarray(s)))
        want = np.log((1 - s) * _np_softmax(base) + s * _np_softmax(cf) + np.finfo(np.float32).eps)
        np.testing.assert_allclose(soft, want, rtol=1e-5, atol=1e-6)
        hard = np.asarray(SN.mix(dataclasses.replace(clf, hard_routing=True), jnp.asarray(base), jnp.asarray(cf),
                                 jnp.asarray(s)))
        np.testing.assert_array_equal(hard, cf if s > 0.5 else base)
    # balanced BCE with masked means = the reference's boolean indexing
    pos, neg = -rng.uniform(0, 3, size=(2, 7)).astype(np.float32)
    w = np.array([1, 1, 0, 1, 0, 1, 1], np.float32)
    got = float(SN.balanced_bce(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(w)))
    m = w > 0
    want = np.mean(-pos[m]) + np.mean(-np.log(1 - np.exp(neg[m])))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _outputs(fns: SeracFns, hard: SeracFns, edit, net, base_params, case):
    """What the tests compare, for one case: routes of the edit, rephrase and loc inputs (the classifier reading
    the prompt, and EasyEdit's prompt + target for the edit), the rephrase's base / empty-patch / SERAC /
    counterfactual logits, and the hard-routed logits (EasyEdit's reading) of the edit and loc inputs."""
    patch = edit(net, base_params, case, {})
    out = {f"s_{n}": fns.route(base_params, patch, case.seq(n), case.image(n))[0] for n in ("edit", "rephrase", "loc")}
    out["s_edit_text_input"] = hard.route(base_params, patch, case.edit, case.image("edit"))[0]
    ids, mask = SN.text_tokens(fns.cfg, case.edit, fns.cfg.scope_query)
    out["prompt_ids"], out["prompt_mask"] = ids, mask
    out["key"] = patch["memory"].keys[0]
    seq, img = case.rephrase, case.image("rephrase")
    mem = patch["memory"]
    out.update(
        base=fns.base.logits(base_params, {}, seq, img), empty=fns.logits(base_params, {}, seq, img),
        serac=fns.logits(base_params, patch, seq, img),
        cf=SN.counterfactual_logits(fns.cfg, net, mem.ctx_ids[0], mem.ctx_mask[0], seq, img),
        hard_edit=hard.logits(base_params, patch, case.edit, case.image("edit")),
        cf_edit=SN.counterfactual_logits(fns.cfg, net, mem.ctx_ids[0], mem.ctx_mask[0], case.edit,
                                         case.image("edit")),
        hard_loc=hard.logits(base_params, patch, case.loc, None),
        base_loc=fns.base.logits(base_params, {}, case.loc, None))
    return out


@pytest.fixture(scope="module")
def batched(serac):
    """`(run, outputs of the first 3 cases)`: `run(cases [E])` vmapped and jitted once."""
    model, tr, params, cases = serac
    editor = tr.editor(params, {})
    assert editor.fns.cfg.scope_query == "prompt"  # the default
    hard = SeracFns(editor.fns.base, dataclasses.replace(editor.fns.cfg, hard_routing=True, scope_query="text_input"))
    run = jax.jit(jax.vmap(lambda c: _outputs(editor.fns, hard, editor.edit, params, model.params, c)))
    return run, run(jax.tree.map(lambda a: jnp.asarray(a[:3]), cases))


def test_empty_patch_is_the_base_model_and_the_mixture_is_the_formula(batched):
    _, out = batched
    np.testing.assert_array_equal(np.asarray(out["empty"]), np.asarray(out["base"]))
    s = np.asarray(out["s_rephrase"])[:, None, None]
    want = np.log((1 - s) * _np_softmax(np.asarray(out["base"])) + s * _np_softmax(np.asarray(out["cf"]))
                  + np.finfo(np.float32).eps)
    np.testing.assert_allclose(np.asarray(out["serac"]), want, rtol=1e-4, atol=1e-5)


def test_own_edit_routes_to_the_counterfactual_and_an_unrelated_query_to_the_base(serac, batched):
    _, out = batched
    # EasyEdit's reading: the edit's own text_input is the memory's text: distance 0.
    np.testing.assert_allclose(np.asarray(out["s_edit_text_input"]), 1.0, rtol=1e-6)
    # The default reads the prompt alone: the answer tokens are dropped, so the distance is the prompt's to the
    # edit descriptor (prompt + new answer), by hand.
    net = serac[2]
    cfg = serac[1].spec.cfg
    for i in range(3):
        ids, mask = np.asarray(out["prompt_ids"][i]), np.asarray(out["prompt_mask"][i])
        edit = take(serac[3], np.arange(i, i + 1)).edit
        text = np.asarray(edit.attention_mask[0]).astype(bool) & (np.asarray(edit.input_ids[0]) != cfg.image_token_id)
        prompt = text & (np.asarray(edit.labels[0]) == -100)
        assert 0 < mask.sum() == prompt.sum() < text.sum()
        np.testing.assert_array_equal(ids[: mask.sum()], np.asarray(edit.input_ids[0])[prompt])
        q = SN.embed(cfg, net["classifier"], jnp.asarray(ids), jnp.asarray(mask))
        want = np.exp(-np.sum((np.asarray(q) - np.asarray(out["key"][i])) ** 2))
        np.testing.assert_allclose(float(out["s_edit"][i]), want, rtol=1e-4, atol=1e-7)
        assert want < 1.0
    assert np.all(np.asarray(out["s_loc"]) < 0.5), out["s_loc"]
    np.testing.assert_array_equal(np.asarray(out["hard_edit"]), np.asarray(out["cf_edit"]))
    np.testing.assert_array_equal(np.asarray(out["hard_loc"]), np.asarray(out["base_loc"]))


def test_vmapped_edits_equal_one_at_a_time(serac, batched):
    run, out = batched
    cases = serac[3]
    for i in (0, 2):
        one = run(take(cases, np.arange(i, i + 1)))
        for k, v in one.items():
            np.testing.assert_allclose(np.asarray(v)[0], np.asarray(out[k])[i], rtol=1e-5, atol=1e-5, err_msg=k)


def test_counterfactual_input_is_image_then_context_then_query(serac):
    """The static, padded layout gives the logits of the plain sequence `[projected image] + ctx + query`."""
    model, tr, params, cases = serac
    cfg = tr.spec.cfg
    case = jax.tree.map(lambda a: jnp.asarray(a[1]), cases)
    mem = SN.write_memory(cfg, params, case.edit)
    seq, image = case.rephrase, case.image("rephrase")
    got = np.asarray(SN.counterfactual_logits(cfg, params, mem.ctx_ids[0], mem.ctx_mask[0], seq, image))
    ids, mask = np.asarray(seq.input_ids), np.asarray(seq.attention_mask).astype(bool)
    text = np.nonzero(mask & (ids != cfg.image_token_id))[0]
    ctx = np.asarray(mem.ctx_ids[0])[np.asarray(mem.ctx_mask[0]).astype(bool)]
    dec = OPTDecoder(cfg.counterfactual)
    p = {"params": params["counterfactual"]}
    tok = dec.apply(p, jnp.asarray(np.concatenate([ctx, ids[text]]))[None], method="embed")[0]
    proj = np.asarray(image) @ np.asarray(params["projection"]["kernel"]) + np.asarray(params["projection"]["bias"])
    embeds = jnp.concatenate([jnp.asarray(proj), tok])[None]
    want, _ = dec.apply(p, embeds, jnp.ones(embeds.shape[:2], jnp.int32))
    np.testing.assert_allclose(got[text], np.asarray(want[0, len(proj) + len(ctx):]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("supervised", [False, True])
def test_train_steps_decrease_the_loss(serac, supervised):
    """EasyEdit's objective (with the image-aware scope, whose image key must train through it) and the SERAC
    paper's."""
    model, _, _, cases = serac
    hp = dict(HPARAMS, supervised=supervised, scope_image=not supervised)
    cfg = T.TrainConfig.from_hparams({"alg": "SERAC", "lr": 1e-3, "accumulate_bs": 1, **hp})
    tr = T.build_trainable("serac", model, hp, cfg)
    tx = T.make_optimizer(cfg, tr.labels(tr.init(jax.random.key(0))[0]))
    ts = T.init_train_state(tr, tx, 0)
    step = T.make_train_step(tr, cfg, tx)
    batch = jax.tree.map(lambda a: jnp.asarray(a[:2]), cases)
    losses = []
    for _ in range(5):
        ts, m = step(ts, model.params, batch, jnp.ones(2, bool))
        losses.append(float(m["loss/total_edit"]))
    assert all(np.isfinite(losses)) and int(ts["skipped"]) == 0
    assert np.all(np.diff(losses) < 0) and losses[-1] < losses[0] - 0.01, losses
    # the image projection is trained (EasyEdit's is not)
    assert not np.allclose(np.asarray(ts["params"]["projection"]["kernel"]), np.eye(tr.spec.cfg.image_width))
    if not supervised:  # the image key's kernel and the text-only input's key (the loc input) get gradients
        fresh = tr.init(jax.random.key(0))[0]["scope_image"]
        for name in ("kernel", "no_image"):
            assert not np.allclose(np.asarray(ts["params"]["scope_image"][name]), np.asarray(fresh[name])), name


def test_image_scope_compares_the_images(serac):
    """With `scope_image` the edit's own text on its own image is at distance 0, on another image at the image
    keys' distance, and a text-only query compares `no_image`; without it the keys have width 0. `scope_key`."""
    model, tr, _, cases = serac
    assert tr.init(jax.random.key(0))[0].keys() == {"classifier", "counterfactual", "projection"}
    hp = dict(HPARAMS, scope_image=True, scope_query="text_input")
    img_tr = T.build_trainable("serac", model, hp, T.TrainConfig.from_hparams({"alg": "SERAC", **hp}))
    params, _ = img_tr.init(jax.random.key(4))
    params["scope_image"]["kernel"] = 4 * params["scope_image"]["kernel"]  # distances well inside (0, 1)
    editor = img_tr.editor(params, {})
    fns = editor.fns

    @jax.jit
    def routes(case, other):
        patch = editor.edit(params, model.params, case, {})
        own = fns.route(model.params, patch, case.edit, case.image("edit"))[0]
        moved = fns.route(model.params, patch, case.edit, other.image("edit"))[0]
        text_only = fns.route(model.params, patch, case.edit, None)[0]
        return own, moved, text_only, patch["memory"].image_keys[0]

    a, b = jax.tree.map(lambda x: jnp.asarray(x[0]), cases), jax.tree.map(lambda x: jnp.asarray(x[1]), cases)
    own, moved, text_only, key = (np.asarray(x) for x in routes(a, b))
    np.testing.assert_allclose(own, 1.0, rtol=1e-6)
    want_key = np.asarray(a.image("edit")).mean(0) @ np.asarray(params["scope_image"]["kernel"])
    np.testing.assert_allclose(key, want_key, rtol=1e-4, atol=1e-6)
    other_key = np.asarray(b.image("edit")).mean(0) @ np.asarray(params["scope_image"]["kernel"])
    np.testing.assert_allclose(moved, np.exp(-np.sum((other_key - key) ** 2)), rtol=1e-4)
    np.testing.assert_allclose(text_only, np.exp(-np.sum(key ** 2)), rtol=1e-4)  # no_image starts at 0
    assert 0.05 < moved < 0.95 and 0.05 < text_only < 0.95, (moved, text_only)
    # `scope_key="prompt"`: the key reads the edit's prompt as a "prompt" query is read, so the edit's own question
    # on its own image is at distance 0 whatever its new answer; the counterfactual's context keeps the answer
    both = dataclasses.replace(img_tr.spec.cfg, scope_query="prompt", scope_key="prompt")
    image = a.image("edit")
    mem = SN.write_memory(both, params, a.edit, image)
    np.testing.assert_allclose(np.asarray(SN.scope_scores(both, params, mem, a.edit, image)), 0.0, atol=1e-6)
    text_input_key = SN.write_memory(dataclasses.replace(both, scope_key="text_input"), params, a.edit, image)
    assert float(SN.scope_scores(both, params, text_input_key, a.edit, image)[0]) < -1e-3
    np.testing.assert_array_equal(np.asarray(mem.ctx_mask), np.asarray(text_input_key.ctx_mask))
    assert int(mem.ctx_mask.sum()) > int(SN.text_tokens(both, a.edit, both.scope_query)[1].sum())
    with pytest.raises(ValueError, match="scope_key"):
        dataclasses.replace(both, scope_key="answer")
    # a SERAC saved without the image scope warm-starts one with it: the image key starts fresh
    saved, _ = tr.init(jax.random.key(0))
    tx = T.make_optimizer(T.TrainConfig.from_hparams({"alg": "SERAC"}), img_tr.labels(params))
    fresh_ts = T.init_train_state(img_tr, tx, 0)
    warm = T.warm_start(fresh_ts, tx, saved, {}, fresh_ok=img_tr.fresh_ok)
    np.testing.assert_array_equal(np.asarray(warm["params"]["scope_image"]["kernel"]),
                                  np.asarray(fresh_ts["params"]["scope_image"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(warm["params"]["projection"]["kernel"]),
                                  np.asarray(saved["projection"]["kernel"]))
    with pytest.raises(ValueError, match="scope_image"):
        T.warm_start(fresh_ts, tx, saved, {})
    # and the other way (the E-IC SERAC warm-starts from the E-VQA one): the image key is dropped
    plain_tx = T.make_optimizer(T.TrainConfig.from_hparams({"alg": "SERAC"}), tr.labels(saved))
    plain = T.warm_start(T.init_train_state(tr, plain_tx, 0), plain_tx, params, {}, fresh_ok=tr.fresh_ok)
    assert set(plain["params"]) == {"classifier", "counterfactual", "projection"}
    np.testing.assert_array_equal(np.asarray(plain["params"]["projection"]["kernel"]),
                                  np.asarray(params["projection"]["kernel"]))


def test_save_load_round_trip(serac, tmp_path):
    model, tr, params, _ = serac
    tr.save(str(tmp_path / "serac"), params, {})
    cfg, loaded = io.load_serac(str(tmp_path / "serac"))
    assert cfg == tr.spec.cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, loaded)
    assert io.load_state(str(tmp_path / "serac"))[0] == "serac"
    # a NaN in the weights is refused at load time
    bad = jax.tree.map(lambda x: x, params)
    bad["projection"] = {**bad["projection"], "bias": bad["projection"]["bias"].at[0].set(jnp.nan)}
    io.save_serac(str(tmp_path / "bad"), cfg, jax.device_get(bad))
    with pytest.raises(ValueError, match="NaN"):
        io.load_serac(str(tmp_path / "bad"))


def test_sequential_memory_routes_each_query_to_its_own_slot(serac):
    """`prior` (an earlier SERAC patch) is appended to: the memory grows, each edit's text finds its own slot
    (read as EasyEdit's text_input, identical to the slot's text)."""
    model, tr, params, cases = serac
    editor = tr.editor(params, {})
    patch = {}
    for i in range(3):
        patch = editor.edit(params, model.params, take(cases, i), patch)
    mem = patch["memory"]
    assert mem.capacity == 3 and bool(np.all(np.asarray(mem.valid)))
    fns = SeracFns(editor.fns.base, dataclasses.replace(editor.fns.cfg, scope_query="text_input"))
    for i in range(3):
        s, c = fns.route(model.params, patch, take(cases, i).edit, None)
        assert int(c) == i and float(s) == pytest.approx(1.0)


def test_editors_saved_before_scope_query_read_as_text_input(serac):
    """A config written before `scope_query` existed was trained reading prompt + target: it loads so."""
    cfg = serac[1].spec.cfg
    d = cfg.to_json()
    assert SN.SeracConfig.from_json(d).scope_query == "prompt"
    del d["scope_query"]
    assert SN.SeracConfig.from_json(d).scope_query == "text_input"
    with pytest.raises(ValueError, match="scope_query"):
        dataclasses.replace(cfg, scope_query="answer")
