"""The FLOP floor's arithmetic (hand-counted on the tiny BLIP-2), the real-size presets' parameter counts
(abstract: nothing allocated), their random init, and the timed image encoding of the bench."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from worlds import fresh_mend

from mmedit_jax import pipeline
from mmedit_jax.case import LOCALITY_INPUTS, take
from mmedit_jax.eval import floor, throughput
from mmedit_jax.models import presets


@pytest.fixture(scope="module")
def setup(demo_world):
    model, prepared = demo_world.model, demo_world.prepared
    editor = fresh_mend(model)  # fc1/fc2 of OPT layers 2 and 3: k = 2
    cases = pipeline.cases_for(editor.fns, model.params, prepared)
    return model, prepared, editor, cases


def layer_flops(L, cfg):
    """One OPT layer on L rows by hand: q, k, v, out projections; scores and their weighted sum; fc1, fc2."""
    D, F = cfg.hidden_size, cfg.ffn_dim
    return 4 * 2 * L * D * D + 2 * 2 * L * L * D + 2 * 2 * L * D * F


def test_floor_parts_by_hand(setup):
    model, prepared, editor, cases = setup
    cfg, k = model.config.text, 2
    batch = take(cases, np.array([0, 1, 2, 0]))  # a repeated case: its inputs count once where shared
    least = floor.flop_floor(editor, model.params, batch, k, images=5, image_flops=123.0)
    assert least.distinct == {"edit": 3, "rephrase": 3, "image_rephrase": 3, "loc": 3, "loc_image": 3, "images": 5}
    L = {name: batch.seq(name).input_ids.shape[1] for name in least.distinct if name != "images"}
    assert least.flops["images"] == 123.0
    assert least.flops["prefix"] == sum(3 * k * layer_flops(n, cfg) for n in L.values())
    head = lambda n: 2 * n * cfg.hidden_size * cfg.vocab_size  # noqa: E731  (tied embeddings)
    rest = cfg.num_hidden_layers - k
    assert least.flops["pre_locality"] == sum(3 * (rest * layer_flops(L[n], cfg) + head(L[n]))
                                              for n in LOCALITY_INPUTS)
    # The edit's backward: through layers k.. only, so far less than a forward and backward of the whole stack.
    whole = 3 * cfg.num_hidden_layers * layer_flops(L["edit"], cfg) * 4
    assert 0 < least.flops["edit"] < whole
    assert least.as_dict()["floor_gflop_per_edit"] == pytest.approx(least.total / 1e9 / 4)
    # Abstract parameters (shapes only: how benchmarks/flops_at_shape.py counts a model too big to hold) count
    # the same.
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    abstract = dataclasses.replace(editor, editor_params=shapes(editor.editor_params))
    assert floor.flop_floor(abstract, shapes(model.params), batch, k, 5, 123.0).flops == least.flops


def test_timed_step_encodes_images_and_stays_above_the_floor(setup):
    model, prepared, editor, cases = setup
    from mmedit_jax.eval import steps

    idx = np.array([3, 1])
    images = throughput.BatchImages.of(prepared.batch, prepared.pixels, idx)
    ids = [getattr(prepared.batch, key).image_ids[idx] for key in ("edit", "image_rephrase", "loc_image")]
    assert len(images.pixels) == len(np.unique(np.concatenate(ids)))
    cases = take(cases, np.array([3, 1, 0]))  # the step times the first E = 2 of these
    fns = steps.make_step_fns(editor, True, base_accuracy=False, prefix_layer=2)
    t = throughput.time_edit_step(editor, model.params, cases, 2, 1, True, fns, images)
    assert t.images == len(images.pixels) and t.image_flops > 0 and len(t.cached_times_s) == 1
    # The timed encoder gives the features the cases carry (the step runs on the same numbers).
    got = throughput.image_encoder(editor.fns)(model.params, images.pixels, images.rows)
    for key, feats in got.items():
        np.testing.assert_allclose(feats, cases.images[key][:2], rtol=1e-5, atol=1e-5)
    least = floor.flop_floor(editor, model.params, take(cases, np.arange(2)), 2, t.images, t.image_flops)
    assert least.total <= t.flops * (1 + 1e-9)
    assert least.total > 0.5 * t.flops  # on distinct cases the step is near its floor


def hf_count(cfg, **layers):
    """transformers' parameter count of the BLIP-2 of `cfg` (built on the meta device: nothing allocated), with
    `layers` overriding vision / text layer counts."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text = dict(model_type="opt", **{k: getattr(cfg.text, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads",
        "max_position_embeddings")}, word_embed_proj_dim=cfg.text.hidden_size)
    vision = {k: getattr(cfg.vision, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "image_size", "patch_size")}
    vision["num_hidden_layers"] = layers.get("vision", vision["num_hidden_layers"])
    text["num_hidden_layers"] = layers.get("text", text["num_hidden_layers"])
    hf = transformers.Blip2Config(vision_config=vision, text_config=text, num_query_tokens=cfg.num_query_tokens,
                                  qformer_config=dict(encoder_hidden_size=cfg.qformer.encoder_hidden_size))
    with torch.device("meta"):
        ref = transformers.Blip2ForConditionalGeneration(hf)
    return sum(p.numel() for p in ref.parameters())  # lm_head is tied: counted once


def test_preset_parameter_counts():
    mid = presets.preset("mid")
    assert presets.param_count(mid) == hf_count(mid) == 489_343_232
    # At 2.7B, transformers' meta-device build takes ~25 s: it checks two layers of each stack at the real widths
    # (every other term of the count is one layer's times the depth), our abstract count the whole model.
    big = presets.preset("blip2-opt-2.7b")
    small = dataclasses.replace(big, vision=dataclasses.replace(big.vision, num_hidden_layers=2),
                                text=dataclasses.replace(big.text, num_hidden_layers=2))
    assert presets.param_count(small) == hf_count(big, vision=2, text=2)
    assert presets.param_count(big) == 3_744_679_936  # Salesforce/blip2-opt-2.7b: 3.74 B


def test_random_params_init_and_dtype(demo_world):
    cfg = demo_world.model.config
    params = presets.random_params(cfg, seed=1, dtype=jnp.bfloat16, big=60000)  # both paths: jit (2 shapes), numpy
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    assert all(x.dtype == jnp.bfloat16 for x in flat.values())
    by = lambda name: [x for p, x in flat.items() if str(p[-1].key) == name]  # noqa: E731
    assert all(bool(jnp.all(x == 1)) for x in by("scale"))
    assert all(bool(jnp.all(x == 0)) for x in by("bias"))
    kernels = np.concatenate([np.asarray(x, np.float32).ravel() for x in by("kernel")])
    assert abs(kernels.std() - presets.INIT_STD) < 0.002 and abs(kernels.mean()) < 0.002
    assert jax.tree.structure(params) == jax.tree.structure(demo_world.model.params)
    with pytest.raises(ValueError, match="does not fit"):
        presets.with_tokens(presets.preset("mid"), 700, 1, 2, 2)
    with pytest.raises(ValueError, match="tokenizer's 700 tokens do not fit"):
        presets.with_tokens(presets.preset("mid"), 3, 1, 2, 2, vocab=700)


def test_data_with_ids_past_the_vocabulary_is_refused(demo_world):
    """A tokenizer whose ids run past the model's embedding table is an error at data preparation, not NaN logits
    in the compiled forward (an out-of-range gather reads NaN)."""
    import dataclasses
    import types

    from mmedit_jax import pipeline

    cfg = demo_world.model.config
    small = types.SimpleNamespace(config=dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=8)))
    with pytest.raises(ValueError, match="outside the model's vocabulary of 8"):
        pipeline.prepare_data(demo_world.records[:2], demo_world.tok, small, "vqa")
    assert pipeline.prepare_data(demo_world.records[:2], demo_world.tok, demo_world.model, "vqa").batch is not None
