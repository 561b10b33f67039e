"""Q-Former (`QFormer`) against transformers' `Blip2QFormerModel` (cross-attention every layer and every other
layer), its conversion rules, and patches/taps through a real Q-Former layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from blip2_vision_helpers import apply_rules, hf_blip2, state_dict_numpy

from mmedit_jax import patch as P
from mmedit_jax.convert.blip2_vision import qformer_rules
from mmedit_jax.models.config import QFormerConfig
from mmedit_jax.models.qformer import QFormer
from mmedit_jax.sites import resolve_site

HF_VISION = dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                 patch_size=4)
NQ, N_IMG = 5, 7  # query tokens, image tokens fed to cross-attention


def hf_qformer_config(k: int) -> dict:
    return dict(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=40,
                encoder_hidden_size=24, max_position_embeddings=16, cross_attention_frequency=k,
                _num_query_tokens=NQ)


@functools.cache
def setup(k: int):
    """(torch Q-Former, converted params, config, jitted forward) for cross_attention_frequency k."""
    hf = hf_blip2(dict(HF_VISION), hf_qformer_config(k), seed=k).qformer
    cfg = QFormerConfig.from_hf(hf.config.to_dict())
    assert cfg.cross_attention_frequency == k
    params = apply_rules(qformer_rules(cfg), state_dict_numpy(hf, "qformer"))["qformer"]
    params = jax.tree.map(jnp.asarray, params)
    model = QFormer(cfg)

    @jax.jit
    def run(qparams, query, enc, patch=None, taps=None):
        return model.apply({"params": qparams}, query, enc, patch, taps)

    return hf, params, cfg, run


def inputs(batch, seed):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, NQ, 32)).astype(np.float32)
    enc = rng.normal(size=(batch, N_IMG, 24)).astype(np.float32)
    return query, enc


def torch_forward(hf, query, enc):
    with torch.no_grad():
        out = hf(query_embeds=torch.from_numpy(query), encoder_hidden_states=torch.from_numpy(enc),
                 encoder_attention_mask=torch.ones(enc.shape[:2], dtype=torch.long))
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("k", [1, 2])
def test_param_tree_matches_init(k):
    _, params, cfg, _ = setup(k)
    query, enc = inputs(1, 0)
    init = jax.eval_shape(lambda: QFormer(cfg).init(jax.random.PRNGKey(0), query, enc)["params"])
    shapes = lambda t: jax.tree_util.tree_map_with_path(lambda p, a: (jax.tree_util.keystr(p), a.shape), t)
    assert jax.tree.leaves(shapes(params)) == jax.tree.leaves(shapes(init))
    layers = params["layers"]
    if k == 1:
        assert layers["crossattention"]["attention"]["key"]["kernel"].shape == (4, 24, 32)
    else:
        assert set(layers) == {"0", "1"} and "crossattention" not in layers["1"]
        assert layers["0"]["crossattention"]["attention"]["value"]["kernel"].shape == (2, 24, 32)
        assert layers["1"]["output_query"]["dense"]["kernel"].shape == (2, 40, 32)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_transformers(k, batch):
    hf, params, _, run = setup(k)
    query, enc = inputs(batch, seed=10 * k + batch)
    want = torch_forward(hf, query, enc)
    got, captured = run(params, query, enc)
    assert captured == {} and got.shape == want.shape == (batch, NQ, 32)
    err = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"qformer k={k} B={batch} max|diff|={err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("k", [1, 2])
def test_patch_factored_equals_materialised(k):
    _, params, _, run = setup(k)
    query, enc = inputs(2, seed=5)
    keys = jax.random.split(jax.random.PRNGKey(k), 4)
    patch = {
        # layer 1 is member "1" of group 0 when k == 2
        "qformer/layers/1/output_query/dense": P.LowRank(jax.random.normal(keys[0], (3, 40)),
                                                         jax.random.normal(keys[1], (3, 32)), jnp.asarray(0.05)),
        "qformer/layers/2/crossattention/attention/key": P.Dense(0.05 * jax.random.normal(keys[2], (24, 32))),
    }
    stacks = {"qformer/layers": k}
    factored, _ = run(params, query, enc, patch)
    dense, _ = run(P.apply_patch({"qformer": params}, patch, stacks)["qformer"], query, enc)
    np.testing.assert_allclose(np.asarray(factored), np.asarray(dense), atol=1e-5)
    assert np.max(np.abs(np.asarray(factored) - np.asarray(run(params, query, enc)[0]))) > 1e-3


def test_taps_give_weight_gradient():
    """Through member "1" of group 0 (k = 2): the grouped case, where the site index must be remapped."""
    k = 2
    _, params, _, run = setup(k)
    query, enc = inputs(2, seed=6)
    site = "qformer/layers/1/output_query/dense"

    def loss_of_eps(eps):
        h, cap = run(params, query, enc, None, eps)
        return jnp.sum(jnp.sin(3 * h)), cap

    delta, cap = jax.grad(loss_of_eps, has_aux=True)({site: jnp.zeros((2, NQ, 32))})
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(3 * run(p, query, enc)[0])))(params)["layers"]
    path, idx = resolve_site(site, {"qformer/layers": k})
    gw = grads
    for name in path[2:]:
        gw = gw[name]
    u, d = cap[site].reshape(-1, 40), delta[site].reshape(-1, 32)
    np.testing.assert_allclose(u.T @ d, gw[idx], rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    _, params, cfg, _ = setup(2)
    query, enc = inputs(1, 0)
    model = QFormer(cfg)
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        model.apply({"params": params}, query, enc[..., :20])
    with pytest.raises(ValueError, match="batch mismatch"):
        model.apply({"params": params}, query, np.concatenate([enc, enc]))
    with pytest.raises(ValueError, match="multiple of cross_attention_frequency"):
        QFormerConfig(num_hidden_layers=3, cross_attention_frequency=2)


def test_bfloat16_close_to_float32():
    _, params, cfg, run = setup(2)
    query, enc = inputs(2, seed=11)
    want, _ = run(params, query, enc)
    model = QFormer(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    bf_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    got, _ = jax.jit(lambda p, q, e: model.apply({"params": p}, q, e))(bf_params, query, enc)
    assert got.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    print(f"qformer bf16 vs f32 max|diff|={err:.3f} (output std {float(jnp.std(want)):.2f})")
    assert err < 0.03


def test_rules_cover_the_default_blip2_layout():
    """With transformers' default BLIP-2 (opt-2.7b-sized vision and Q-Former, built on the meta device: no
    memory), the rules use every `vision_model.*` / `qformer.*` key once and give exactly our modules' shapes."""
    import transformers

    from mmedit_jax.convert.blip2_vision import vision_rules
    from mmedit_jax.models.config import Blip2Config
    from mmedit_jax.models.vit import VisionModel

    text = dict(model_type="opt", num_hidden_layers=1, vocab_size=64, hidden_size=64, ffn_dim=64, num_attention_heads=2)
    hf_cfg = transformers.Blip2Config(text_config=text)
    with torch.device("meta"):
        hf = transformers.Blip2ForConditionalGeneration(hf_cfg)
    keys = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k.startswith(("vision_model.", "qformer."))}
    cfg = Blip2Config.from_hf(hf_cfg.to_dict())
    assert cfg.vision.num_hidden_layers == 39 and cfg.qformer.cross_attention_frequency == 2
    rules = vision_rules(cfg.vision) + qformer_rules(cfg.qformer)
    sources = [s for r in rules for s in r.sources]
    assert len(sources) == len(set(sources)) and set(sources) == set(keys)

    perm = {"identity": lambda s: s, "linear": lambda s: s[::-1], "conv": lambda s: (s[2], s[3], s[1], s[0])}
    got = {}
    for r in rules:
        shapes = {perm[r.transform](keys[s]) for s in r.sources}
        assert len(shapes) == 1, r.target
        shape = shapes.pop()
        got[r.target] = (len(r.sources), *shape) if r.stacked else shape
    nq = cfg.num_query_tokens
    size = cfg.vision.image_size
    want = {
        "vision_model": jax.eval_shape(lambda: VisionModel(cfg.vision).init(
            jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]),
        "qformer": jax.eval_shape(lambda: QFormer(cfg.qformer).init(
            jax.random.PRNGKey(0), jnp.zeros((1, nq, cfg.qformer.hidden_size)),
            jnp.zeros((1, 1 + cfg.vision.num_patches, cfg.vision.hidden_size)))["params"]),
    }
    flat = {"/".join(str(k.key) for k in p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(want)[0]}
    assert got == flat
