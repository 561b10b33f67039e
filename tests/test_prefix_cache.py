"""The frozen-prefix cache: the language model split at layer k equals the whole forward, and the harness's
programs with the cache give exactly the outputs they give without it (tiny random BLIP-2, 4 OPT layers)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmedit_jax import evaluate as E
from mmedit_jax import patch as P
from mmedit_jax.data.mmedit import load_mmedit
from mmedit_jax.editors import mend_net as MN
from mmedit_jax.editors.mend import make_mend
from mmedit_jax.eval import harness
from mmedit_jax.eval.model_fns import Blip2Fns
from mmedit_jax.eval.throughput import _cost

N = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    paths, tok, model = E.demo_setup(out, N, seed=1)
    records = load_mmedit(paths.json_path, "vqa", paths.image_root).records
    prepared = E.prepare_data(records, tok, model, "vqa", model.config.vision.image_size)
    return model, prepared


def cases_for(editor, model, prepared):
    return harness.make_cases(prepared.batch, E.image_table(editor, model, prepared.pixels))


def fresh_mend(model, layers=(2, 3), seed=0):
    """An untrained MEND on fc1/fc2 of `layers`, its `up` matrices and statistics random (an identity network
    with empty statistics would make every patch nearly the raw gradient)."""
    sites = [f"language_model/layers/{i}/{n}" for i in layers for n in ("fc1", "fc2")]
    spec = MN.mend_spec(MN.MendConfig(rank=4), {s: P.kernel_of(model.params, s, model.stacks).shape for s in sites})
    params, _ = MN.init_mend(jax.random.PRNGKey(seed), spec)
    leaves, tree = jax.tree_util.tree_flatten_with_path(params["nets"])
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [0.1 * jax.random.normal(k, x.shape) if str(p[-1].key) == "up" else x for (p, x), k in zip(leaves, keys)]
    params = {**params, "nets": jax.tree_util.tree_unflatten(tree, leaves)}
    rng = np.random.default_rng(seed)
    moments = lambda d: {"count": np.float32(100), "mean": rng.normal(0, 0.1, d).astype(np.float32),  # noqa: E731
                         "m2": (99 * rng.uniform(0.5, 2.0, d) ** 2).astype(np.float32)}
    stats = {k: {"u": moments(spec.group_shape(k)[0]), "delta": moments(spec.group_shape(k)[1])}
             for k, _ in spec.groups}
    return make_mend(spec, Blip2Fns(model.module), params, stats)


def random_patch(model, layers, seed=0, rank=2):
    """LowRank deltas on fc1 and out_proj of `layers`, large enough to change the logits."""
    out = {}
    for j, i in enumerate(layers):
        for n in ("fc1", "self_attn/out_proj"):
            site = f"language_model/layers/{i}/{n}"
            d_in, d_out = P.kernel_of(model.params, site, model.stacks).shape
            ka, kb = jax.random.split(jax.random.PRNGKey(seed + 10 * j + len(n)))
            out[site] = P.LowRank(jax.random.normal(ka, (rank, d_in)), jax.random.normal(kb, (rank, d_out)),
                                  jnp.asarray(0.5))
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_split_forward_equals_full_forward(world, k):
    model, prepared = world
    fns = Blip2Fns(model.module)
    case = jax.tree.map(lambda a: jnp.asarray(a[0]), cases_for(E.build_editor("ft-l", model), model, prepared))
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


def test_first_edited_layer():
    f = harness.first_edited_layer
    assert f(["language_model/layers/3/fc1", "language_model/layers/2/fc2"]) == 2
    assert f(["language_model/layers/0/fc1", "language_model/layers/3/fc1"]) is None  # nothing to share
    assert f(["language_model/layers/3/fc1", "qformer/layers/0/attention/query"]) is None
    assert f(["language_projection"]) is None
    assert f([]) is None


@pytest.mark.parametrize("name, want_k", [("mend", 2), ("ft-l", 3)])
def test_step_fns_with_cache_equal_without(world, name, want_k):
    model, prepared = world
    editor = fresh_mend(model) if name == "mend" else E.build_editor("ft-l", model, {"num_steps": 3, "edit_lr": 0.05})
    fns = Blip2Fns(model.module)
    cases = cases_for(editor, model, prepared)
    k = harness.prefix_layer(editor, fns, model.params, harness._take(cases, 0))
    assert k == want_k
    batch = jax.device_put(cases)
    plain_fns = harness.make_step_fns(editor, fns, exact_match=False)
    cached_fns = harness.make_step_fns(editor, fns, exact_match=False, prefix_layer=k)
    outs = []
    for pre_fn, edit_fn in (plain_fns, cached_fns):
        pre = pre_fn(model.params, batch)
        outs.append((pre, edit_fn(editor.editor_params, model.params, batch, pre)))
    (pre0, post0), (pre1, post1) = outs
    assert pre1["hidden_loc"].shape == (N, cases.loc.input_ids.shape[1], model.config.text.hidden_size)
    assert set(pre1) - set(pre0) == {"hidden_edit", "hidden_loc", "hidden_loc_image"}
    for key in pre0:
        np.testing.assert_allclose(pre1[key], pre0[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert set(post1) == set(post0)
    for key in post0:
        np.testing.assert_allclose(post1[key], post0[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert float(np.mean(post0["t_locality"])) < 1.0 or float(np.mean(post0["m_locality"])) < 1.0  # edits bite
    # The cache removes work: the edit program runs fewer layers on the locality inputs.
    flops = [_cost(f.lower(editor.editor_params, model.params, batch, pre).compile())[0]
             for (_, f), pre in ((plain_fns, pre0), (cached_fns, pre1))]
    print(f"{name}: edit-program FLOPs without / with the cache: {flops[0]:.3g} / {flops[1]:.3g}")
    if not np.isnan(flops).any():
        assert flops[1] < flops[0]
    # The harness's rows (what run() writes) are the same too, with the hidden states kept off the host rows.
    rows = [harness.run(editor, fns, model.params, cases, prepared.meta, None, batch_size=N, exact_match=False,
                        progress=False, step_fns=s).rows for s in (plain_fns, cached_fns)]
    for a, b in zip(*rows):
        assert {m: a[m] for m in harness.METRICS} == {m: b[m] for m in harness.METRICS}
        assert a["pre"] == b["pre"]


def test_vision_side_and_pixel_models_fall_back(world):
    model, prepared = world
    hp = {"num_steps": 1}
    ft_v = E.build_editor("ft-v", model, hp)
    pixels = Blip2Fns(model.module, pixels=True)
    case = harness._take(cases_for(ft_v, model, prepared), 0)
    assert harness.prefix_layer(ft_v, pixels, model.params, case) is None
    # FT-L on pixels (feature cache off) also falls back, though its sites alone would allow the cache.
    ft_l = E.build_editor("ft-l", model, hp, feature_cache=False)
    assert harness.first_edited_layer(ft_l.hparams.inner_params) == 3
    assert harness.prefix_layer(ft_l, pixels, model.params, case) is None
    with pytest.raises(ValueError, match="runs pixels"):
        pixels.prefix(model.params, case.loc_image, case.images["loc_image"], 2)
