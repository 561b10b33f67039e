"""SERAC and IKE on MiniGPT-4 (EasyEdit's `configs/{serac,ike}_minigpt4.yaml`): on the shipped world MiniGPT-4, a
SERAC whose counterfactual is a copy of the base LLaMA (EasyEdit's SERAC_MULTI on MiniGPT-4) routes the edit to
the counterfactual and an unrelated query to the base, sees `[wrapped image] + ctx + query`, round-trips through
its saved form and scores cases through the harness; IKE builds from its yaml and scores too."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmedit_jax import pipeline
from mmedit_jax import training as T
from mmedit_jax.case import take
from mmedit_jax.editors import io
from mmedit_jax.editors import serac_net as SN
from mmedit_jax.editors.hparams import load_hparams
from mmedit_jax.eval import harness
from mmedit_jax.models.config import LlamaConfig
from mmedit_jax.models.llama import LlamaDecoder
from mmedit_jax.world import assets

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
SHIPPED = os.path.join(assets.assets_dir("minigpt4"), "model")
SMALL_CLASSIFIER = {"cls_dim": 16, "cls_layers": 1, "cls_heads": 2}  # ours: a tiny scope classifier

pytestmark = pytest.mark.skipif(not os.path.isdir(SHIPPED), reason="the MiniGPT-4 world model is not built")


@pytest.fixture(scope="module")
def world():
    """`(model, tok, prepared 4 eval cases, world paths)` of the shipped MiniGPT-4 world."""
    model_dir, tok_dir, eval_json, image_root, _ = pipeline.world_inputs(family="minigpt4")
    model, tok = pipeline.load_model(model_dir, tok_dir)
    records = pipeline.load_split(eval_json, "vqa", image_root, limit=4, log=lambda *a: None).records
    return model, tok, pipeline.prepare_data(records, tok, model, "vqa"), image_root


@pytest.fixture(scope="module")
def serac(world, tmp_path_factory):
    """`(trainable, fresh params, the editor built from its saved form, its saved directory)`."""
    model, tok, _, _ = world
    hp = {**load_hparams(os.path.join(CONFIGS, "serac_minigpt4.yaml")), **SMALL_CLASSIFIER}
    tr = T.build_trainable("serac", model, hp, T.TrainConfig.from_hparams(hp),
                           image_wrap=pipeline.image_wrap(model.config, tok))
    params, _ = tr.init(jax.random.key(0))
    out = str(tmp_path_factory.mktemp("serac") / "editor")
    tr.save(out, params, {})
    return tr, params, pipeline.build_editor("serac", model, hp, editor_ckpt=out), out


def test_yaml_gives_a_llama_counterfactual_copying_the_base(world, serac):
    model, tok, _, _ = world
    tr, params, _, _ = serac
    cfg = tr.spec.cfg
    assert isinstance(cfg.counterfactual, LlamaConfig) and cfg.counterfactual == model.config.text
    assert cfg.image_wrap == tuple(len(v) for v in pipeline.image_wrapper(model.config, tok).values())
    assert min(cfg.image_wrap) > 0 and not cfg.hard_routing and cfg.square and not cfg.cos
    jax.tree.map(np.testing.assert_array_equal, params["counterfactual"], model.params["language_model"])
    np.testing.assert_array_equal(params["projection"]["kernel"], np.eye(cfg.image_width))


def test_one_train_step_moves_only_the_counterfactuals_last_layer(world, serac):
    """EasyEdit's MiniGPT-4 SERAC trains the classifier and only Vicuna's last layer ('31' in the name): after an
    Adam step every other counterfactual parameter is bit-identical (its layers get zero gradient, its embeddings,
    norm and head carry no optimiser state), while the last layer, the classifier and the projection move."""
    model, _, prepared, _ = world
    tr, params, editor, _ = serac
    last = model.config.text.num_hidden_layers - 1
    assert tr.spec.cfg.trained_layers == 1
    cfg = T.TrainConfig.from_hparams({"alg": "SERAC", "lr": 1e-3, "accumulate_bs": 1})
    labels = tr.labels(params)
    assert {labels["counterfactual"]["embed_tokens"]["embedding"], labels["counterfactual"]["layers"]["mlp"]
            ["down_proj"]["kernel"]} == {"frozen", "net"}
    tx = T.make_optimizer(cfg, labels)
    ts = T.init_train_state(tr, tx, 0)
    batch = jax.tree.map(jnp.asarray, take(pipeline.editor_cases(editor, model.params, prepared), np.arange(2)))
    new, m = T.make_train_step(tr, cfg, tx)(ts, model.params, batch, jnp.ones(2, bool))
    assert bool(m["finite"]) and float(m["grad_norm"]) > 0
    before, after = ts["params"], new["params"]
    moved = lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b))  # noqa: E731
    after_leaves = dict(jax.tree_util.tree_flatten_with_path(after["counterfactual"])[0])
    for path, a in jax.tree_util.tree_flatten_with_path(before["counterfactual"])[0]:
        b = after_leaves[path]
        if jax.tree_util.keystr(path).startswith("['layers']"):
            np.testing.assert_array_equal(np.asarray(a)[:last], np.asarray(b)[:last])
        else:
            np.testing.assert_array_equal(a, b)
    cf_moved = [moved(a[last], b[last]) for a, b in zip(jax.tree.leaves(before["counterfactual"]["layers"]),
                                                         jax.tree.leaves(after["counterfactual"]["layers"]))]
    assert sum(cf_moved) >= len(cf_moved) - 1, cf_moved  # every last-layer matrix (a norm may see no gradient)
    assert any(moved(a, b) for a, b in zip(jax.tree.leaves(before["classifier"]), jax.tree.leaves(after["classifier"])))
    assert moved(before["projection"]["kernel"], after["projection"]["kernel"])


def test_save_load_round_trip_keeps_the_family(serac):
    tr, params, editor, out = serac
    cfg, loaded = io.load_serac(out)
    assert cfg == tr.spec.cfg and editor.fns.cfg == cfg
    assert io.load_state(out)[0] == "serac"
    jax.tree.map(np.testing.assert_array_equal, params, loaded)


def test_edit_routes_to_the_counterfactual_and_locality_to_the_base(world, serac):
    """Hard routing makes the two sides visible: the edit input (s* = 1, read as EasyEdit's text_input: the memory's
    own text) gets the counterfactual's logits, the text-locality query (s* < 0.5) the base model's."""
    model, _, prepared, _ = world
    tr, params, editor, _ = serac
    case = jax.tree.map(jnp.asarray, take(pipeline.editor_cases(editor, model.params, prepared), 0))
    patch = editor.edit(params, model.params, case, {})
    hard = dataclasses.replace(tr.spec.cfg, hard_routing=True, scope_query="text_input")
    fns, mem = editor.fns, patch["memory"]

    @jax.jit
    def sides(seq, image):
        """`(s*, hard-routed output, counterfactual logits, base logits)` of one query."""
        s, _ = SN.route(SN.scope_scores(hard, patch["net"], mem, seq))
        base = fns.base.logits(model.params, {}, seq, image)
        embeds = image
        if image is not None and fns.base.uses_pixels:
            embeds = fns.base.encode(model.params, {}, image[None])[0]
        out = SN.serac_logits(hard, patch["net"], mem, seq, embeds, base)
        cf = SN.counterfactual_logits(hard, patch["net"], mem.ctx_ids[0], mem.ctx_mask[0], seq, embeds)
        return s, out, cf, base

    s, out, cf, _ = sides(case.edit, case.image("edit"))
    assert float(s) == pytest.approx(1.0)  # identical text: distance 0
    np.testing.assert_array_equal(np.asarray(out), np.asarray(cf))
    s, out, _, base = sides(case.loc, case.image("loc"))
    assert float(s) < 0.5
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_counterfactual_sees_wrapped_image_then_context_then_query(world, serac):
    """The static layout equals LLaMA on the plain sequence `before ‖ image ‖ after ‖ ctx ‖ query text`
    (positions arange, no padding), the wrapper kept with the image and out of the memory's context."""
    model, _, prepared, _ = world
    tr, params, editor, _ = serac
    cfg = tr.spec.cfg
    case = jax.tree.map(jnp.asarray, take(pipeline.editor_cases(editor, model.params, prepared), 1))
    mem = SN.write_memory(cfg, params, case.edit)
    seq, image = case.rephrase, case.image("rephrase")
    got = np.asarray(SN.counterfactual_logits(cfg, params, mem.ctx_ids[0], mem.ctx_mask[0], seq, image))
    ids, mask = np.asarray(seq.input_ids), np.asarray(seq.attention_mask).astype(bool)
    block = np.asarray(SN.image_block(cfg, seq.input_ids))
    nb = cfg.image_wrap[0] + model.config.num_query_tokens + cfg.image_wrap[1]
    assert block[:nb].all() and not block[nb:].any()
    ctx = np.asarray(mem.ctx_ids[0])[np.asarray(mem.ctx_mask[0]).astype(bool)]
    edit_ids = np.asarray(case.edit.input_ids)[np.asarray(case.edit.attention_mask).astype(bool)]
    np.testing.assert_array_equal(ctx, edit_ids[nb:])  # the edit's text alone
    text = np.nonzero(mask & ~block)[0]
    dec = LlamaDecoder(cfg.counterfactual)
    p = {"params": params["counterfactual"]}
    plain = np.concatenate([ids[:nb], ctx, ids[text]])
    emb = dec.apply(p, jnp.asarray(np.where(plain == cfg.image_token_id, 0, plain))[None], method="embed")[0]
    proj = np.asarray(image) @ np.asarray(params["projection"]["kernel"]) + np.asarray(params["projection"]["bias"])
    emb = emb.at[cfg.image_wrap[0]:cfg.image_wrap[0] + len(proj)].set(jnp.asarray(proj))
    want, _ = dec.apply(p, emb[None], jnp.ones((1, len(plain)), jnp.int32))
    np.testing.assert_allclose(got[:nb], np.asarray(want[0, :nb]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[text], np.asarray(want[0, nb + len(ctx):]), rtol=1e-4, atol=1e-4)


def test_serac_scores_cases_through_the_harness(world, serac):
    model, _, prepared, _ = world
    _, _, editor, _ = serac
    cases = pipeline.editor_cases(editor, model.params, prepared)
    result = harness.run(editor, model.params, cases, prepared.meta, None, batch_size=4, exact_match=False,
                         progress=False)
    s = result.summary
    assert s["num_cases"] == 4 and len(result.rows) == 4
    for k in ("reliability", "t_generality", "m_generality", "t_locality", "m_locality"):
        assert np.isfinite(s[k]) and 0 <= s[k] <= 100, (k, s[k])
    # the edit text routes to a copy of the base reading its own answer as context: locality is the base's
    assert s["t_locality"] >= 90, s


def test_ike_yaml_builds_and_scores(world):
    model, tok, prepared, image_root = world
    hp = load_hparams(os.path.join(CONFIGS, "ike_minigpt4.yaml"))
    assert hp["k"] == 32 and hp["alg_name"] == "IKE" and hp["model_name"] == "minigpt4"
    editor = pipeline.build_editor("ike", model, hp, tok=tok, task="vqa", image_root=image_root,
                                   bank_data=pipeline.world_train_data("vqa"), log=lambda *a: None)
    some = take(pipeline.editor_cases(editor, model.params, prepared), np.arange(2))
    result = harness.run(editor, model.params, some, prepared.meta[:2], None, batch_size=2,
                         exact_match=pipeline.exact_match_of(hp), progress=False)
    assert result.summary["num_cases"] == 2
    assert all(np.isfinite(result.summary[k]) for k in ("reliability", "t_locality"))
