"""The frozen-prefix cache: the language model split at layer k equals the whole forward, and the harness's
programs with the cache give exactly the outputs they give without it (tiny random BLIP-2, 4 OPT layers)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from worlds import fresh_mend, random_patch

from mmedit_jax import pipeline
from mmedit_jax.case import INPUT_NAMES, METRICS, take
from mmedit_jax.eval import harness, steps
from mmedit_jax.eval.throughput import xla_cost
from mmedit_jax.forward import Blip2Fns

N = 6


@pytest.fixture(scope="module")
def world(demo_world):
    assert len(demo_world.prepared.meta) == N
    return demo_world.model, demo_world.prepared



@pytest.mark.parametrize("k", [1, 3])
def test_split_forward_equals_full_forward(world, k):
    model, prepared = world
    fns = Blip2Fns(model.module)
    editor = pipeline.build_editor("ft-l", model)
    case = jax.tree.map(lambda a: jnp.asarray(a[0]), pipeline.cases_for(editor.fns, model.params, prepared))
    full = jax.jit(fns.logits)
    prefix = jax.jit(functools.partial(fns.prefix, stop=k))
    resume = jax.jit(functools.partial(fns.resume_logits, start=k))
    patch = random_patch(model, range(k, 4))
    for seq, image in ((case.loc_image, case.images["loc_image"]), (case.loc, None)):
        h = prefix(model.params, seq, image)
        assert h.shape == (seq.input_ids.shape[0], model.config.text.hidden_size)
        plain = full(model.params, {}, seq, image)
        edited = full(model.params, patch, seq, image)
        assert np.abs(np.asarray(edited - plain)).max() > 1e-2  # the patch matters
        np.testing.assert_allclose(resume(model.params, {}, seq, h), plain, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(resume(model.params, patch, seq, h), edited, rtol=1e-6, atol=1e-6)
    # A patch below the split would be silently lost: it is refused.
    with pytest.raises(ValueError, match="carry edits or taps"):
        fns.resume_logits(model.params, random_patch(model, [k - 1]), case.loc, h, start=k)


def test_stacked_inputs_equal_one_at_a_time(world):
    """`prefix_group` / `resume_group` pad inputs of different lengths (and answer-row counts) to one batch: each
    input's real positions come out as its own `prefix` / `resume` gives them (the padding is cut off), with
    images and without, patched and not."""
    model, prepared = world
    fns = Blip2Fns(model.module)
    case = jax.tree.map(lambda a: jnp.asarray(a[0]), pipeline.cases_for(fns, model.params, prepared))
    short = case.edit.replace(input_ids=case.edit.input_ids[:-3], attention_mask=case.edit.attention_mask[:-3])
    loc_short = case.loc.replace(input_ids=case.loc.input_ids[:-2], attention_mask=case.loc.attention_mask[:-2])
    groups = ([(case.edit, case.images["edit"]), (short, case.images["image_rephrase"]),
               (case.loc_image, case.images["loc_image"])], [(case.loc, None), (loc_short, None)])
    patch = random_patch(model, [2, 3])
    prefix_group = jax.jit(lambda p, s, i: fns.prefix_group(p, s, i, 2))
    resume_group = jax.jit(lambda p, d, s, h, r: fns.resume_group(p, d, s, h, 2, rows=r))
    one = jax.jit(lambda p, d, s, h, r: fns.resume(p, d, s, h, 2, rows=r)[0])
    for group in groups:
        seqs, images = zip(*group)
        assert len({s.input_ids.shape[0] for s in seqs}) > 1  # lengths differ: padding is exercised
        hs = prefix_group(model.params, seqs, images)
        for seq, image, h in zip(seqs, images, hs):
            np.testing.assert_allclose(h, fns.prefix(model.params, seq, image, 2), rtol=1e-5, atol=1e-5)
        rows = [jnp.arange(1 + i, seq.input_ids.shape[0] - 1) for i, seq in enumerate(seqs)]  # R differ too
        for d, r in (({}, None), (patch, rows)):  # (patched, all rows) and (unpatched, rows) add only compiles
            got = resume_group(model.params, d, seqs, hs, r)
            for i, (seq, h) in enumerate(zip(seqs, hs)):
                want = one(model.params, d, seq, h, None if r is None else r[i])
                assert got[i].shape == want.shape
                np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="or none does"):
        fns.prefix_group(model.params, [case.edit, case.loc], [case.images["edit"], None], 2)


def test_first_edited_layer():
    f = steps.first_edited_layer
    assert f(["language_model/layers/3/fc1", "language_model/layers/2/fc2"]) == 2
    assert f(["language_model/layers/0/fc1", "language_model/layers/3/fc1"]) is None  # nothing to share
    assert f(["language_model/layers/3/fc1", "qformer/layers/0/attention/query"]) is None
    assert f(["language_projection"]) is None
    assert f([]) is None


@pytest.mark.parametrize("name, want_k", [("mend", 2), ("ft-l", 3)])
def test_step_fns_with_cache_equal_without(world, name, want_k):
    model, prepared = world
    editor = (fresh_mend(model) if name == "mend"
              else pipeline.build_editor("ft-l", model, {"num_steps": 3, "edit_lr": 0.05}))
    cases = pipeline.cases_for(editor.fns, model.params, prepared)
    k = steps.prefix_layer(editor, model.params, take(cases, 0))
    assert k == want_k
    batch = jax.device_put(cases)
    plain_fns = steps.make_step_fns(editor, exact_match=False)
    cached_fns = steps.make_step_fns(editor, exact_match=False, prefix_layer=k)
    outs = []
    for pre_fn, edit_fn in (plain_fns, cached_fns):
        pre = pre_fn(model.params, batch)
        outs.append((pre, edit_fn(editor.editor_params, model.params, batch, pre)))
    (pre0, post0), (pre1, post1) = outs
    assert pre1["hidden_loc"].shape == (N, cases.loc.input_ids.shape[1], model.config.text.hidden_size)
    assert set(pre1) - set(pre0) == {f"hidden_{name}" for name in INPUT_NAMES}
    for key in pre0:
        np.testing.assert_allclose(pre1[key], pre0[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert set(post1) == set(post0)
    for key in post0:
        np.testing.assert_allclose(post1[key], post0[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert float(np.mean(post0["t_locality"])) < 1.0 or float(np.mean(post0["m_locality"])) < 1.0  # edits bite
    # The cache removes work: the edit program runs fewer layers on the locality inputs.
    flops = [xla_cost(f.lower(editor.editor_params, model.params, batch, pre).compile())[0]
             for (_, f), pre in ((plain_fns, pre0), (cached_fns, pre1))]
    print(f"{name}: edit-program FLOPs without / with the cache: {flops[0]:.3g} / {flops[1]:.3g}")
    if not np.isnan(flops).any():
        assert flops[1] < flops[0]
    # The harness's rows (what run() writes) are the same too, with the hidden states kept off the host rows.
    rows = [harness.run(editor, model.params, cases, prepared.meta, None, batch_size=N, exact_match=False,
                        progress=False, step_fns=s).rows for s in (plain_fns, cached_fns)]
    for a, b in zip(*rows):
        assert {m: a[m] for m in METRICS} == {m: b[m] for m in METRICS}
        assert a["pre"] == b["pre"]


def test_vision_side_and_pixel_models_fall_back(world):
    model, prepared = world
    hp = {"num_steps": 1}
    ft_v = pipeline.build_editor("ft-v", model, hp)
    pixels = Blip2Fns(model.module, pixels=True)
    assert ft_v.fns == pixels
    case = take(pipeline.cases_for(ft_v.fns, model.params, prepared), 0)
    assert steps.prefix_layer(ft_v, model.params, case) is None
    # FT-L on pixels (feature cache off) also falls back, though its sites alone would allow the cache.
    ft_l = pipeline.build_editor("ft-l", model, hp, feature_cache=False)
    assert ft_l.fns == pixels
    assert steps.first_edited_layer(ft_l.hparams.inner_params) == 3
    assert steps.prefix_layer(ft_l, model.params, case) is None
    with pytest.raises(ValueError, match="runs pixels"):
        pixels.prefix(model.params, case.loc_image, case.images["loc_image"], 2)
