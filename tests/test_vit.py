"""EVA ViT (`VisionModel`) against transformers' `Blip2VisionModel`, position-embedding interpolation against
torch's bicubic resampling, and patches/taps through a real ViT layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from blip2_vision_helpers import apply_rules, hf_blip2, state_dict_numpy

from mmedit_jax import patch as P
from mmedit_jax.convert.blip2_vision import vision_rules
from mmedit_jax.models.config import VisionConfig
from mmedit_jax.models.vit import VisionModel, bicubic_matrix, interpolate_pos_encoding, resize_position_embedding

HF_VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, image_size=24,
                 patch_size=4, layer_norm_eps=1e-6)
HF_QFORMER = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                  encoder_hidden_size=32, max_position_embeddings=16, cross_attention_frequency=1)
STACKS = {"vision_model/layers": 1}


@pytest.fixture(scope="module")
def hf_vision():
    return hf_blip2(dict(HF_VISION), dict(HF_QFORMER)).vision_model


@pytest.fixture(scope="module")
def converted(hf_vision):
    cfg = VisionConfig.from_hf(hf_vision.config.to_dict())
    params = apply_rules(vision_rules(cfg), state_dict_numpy(hf_vision, "vision_model"))["vision_model"]
    return cfg, jax.tree.map(jnp.asarray, params)


@functools.cache
def forward_fn(cfg: VisionConfig, dtype=jnp.float32):
    model = VisionModel(cfg, dtype=dtype)

    @jax.jit
    def run(vision_params, pixels_nhwc, patch=None, taps=None):
        return model.apply({"params": vision_params}, pixels_nhwc, patch, taps)

    return run


def torch_forward(hf_vision, pixels_nchw, interpolate=False):
    with torch.no_grad():
        out = hf_vision(pixel_values=torch.from_numpy(pixels_nchw), interpolate_pos_encoding=interpolate)
    return out.last_hidden_state.numpy()


def pixels(batch, size, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def test_param_tree_matches_init(converted):
    """The rules fill exactly the tree `VisionModel.init` creates, with the same shapes."""
    cfg, params = converted
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    init = jax.eval_shape(lambda: VisionModel(cfg).init(jax.random.PRNGKey(0), x)["params"])
    shapes = lambda t: jax.tree_util.tree_map_with_path(lambda p, a: (jax.tree_util.keystr(p), a.shape), t)
    assert jax.tree.leaves(shapes(params)) == jax.tree.leaves(shapes(init))
    assert params["layers"]["self_attn"]["qkv"]["kernel"].shape == (3, 32, 96)
    assert params["embeddings"]["patch_embedding"]["kernel"].shape == (4, 4, 3, 32)


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_transformers(hf_vision, converted, batch):
    cfg, params = converted
    x = pixels(batch, cfg.image_size, seed=batch)
    want = torch_forward(hf_vision, x)
    got, captured = forward_fn(cfg)(params, x.transpose(0, 2, 3, 1))
    assert captured == {}
    assert got.shape == want.shape == (batch, 1 + cfg.num_patches, cfg.hidden_size)
    err = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"vision B={batch} max|diff|={err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("in_size,out_size", [(6, 10), (6, 4), (7, 5), (3, 8), (6, 6)])
def test_bicubic_matrix_matches_torch(in_size, out_size):
    grid = np.random.default_rng(0).normal(size=(1, 5, in_size, in_size)).astype(np.float64)
    want = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(out_size, out_size), mode="bicubic",
                                           align_corners=False).numpy()
    m = bicubic_matrix(in_size, out_size)
    got = np.einsum("ih,jw,bchw->bcij", m, m, grid)
    np.testing.assert_allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("image_size", [40, 16])
def test_interpolated_matches_transformers(hf_vision, converted, image_size):
    """Resampling once at load time == transformers' `interpolate_pos_encoding=True` on every call."""
    cfg, params = converted
    new_params, new_cfg = interpolate_pos_encoding(params, cfg, image_size)
    assert new_cfg.image_size == image_size and new_cfg.num_patches == (image_size // 4) ** 2
    assert new_params["layers"] is params["layers"]
    x = pixels(2, image_size, seed=image_size)
    want = torch_forward(hf_vision, x, interpolate=True)
    got, _ = forward_fn(new_cfg)(new_params, x.transpose(0, 2, 3, 1))
    err = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"vision interpolated {cfg.image_size}->{image_size} max|diff|={err:.2e}")
    assert err <= 1e-4


def test_interpolation_is_identity_for_same_grid(converted):
    cfg, params = converted
    same, same_cfg = interpolate_pos_encoding(params, cfg, cfg.image_size + 1)  # same 6x6 grid
    assert same is params and same_cfg.num_patches == cfg.num_patches
    with pytest.raises(ValueError, match=r"\[1, 1 \+ g\*g, D\]"):
        resize_position_embedding(np.zeros((1, 7, 4)), 3)


def test_wrong_image_size_is_a_clear_error(converted):
    cfg, params = converted
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        VisionModel(cfg).apply({"params": params}, jnp.zeros((1, 28, 28, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        VisionModel(cfg).apply({"params": params}, jnp.zeros((1, 3, 24, 24)))


def test_patch_factored_equals_materialised(converted):
    cfg, params = converted
    x = pixels(2, cfg.image_size, seed=7).transpose(0, 2, 3, 1)
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    patch = {
        "vision_model/layers/1/mlp/fc1": P.LowRank(jax.random.normal(keys[0], (2, 32)),
                                                   jax.random.normal(keys[1], (2, 40)), jnp.asarray(0.05)),
        "vision_model/layers/2/self_attn/qkv": P.Dense(0.02 * jax.random.normal(keys[2], (32, 96))),
    }
    run = forward_fn(cfg)
    factored, _ = run(params, x, patch)
    full = {"vision_model": params}
    dense, _ = run(P.apply_patch(full, patch, STACKS)["vision_model"], x)
    np.testing.assert_allclose(np.asarray(factored), np.asarray(dense), atol=1e-5)
    assert np.max(np.abs(np.asarray(factored) - np.asarray(run(params, x)[0]))) > 1e-3


def test_taps_give_weight_gradient(converted):
    cfg, params = converted
    x = pixels(2, cfg.image_size, seed=8).transpose(0, 2, 3, 1)
    site = "vision_model/layers/1/mlp/fc2"
    n = 1 + cfg.num_patches
    run = forward_fn(cfg)

    def loss_of_eps(eps):
        h, cap = run(params, x, None, eps)
        return jnp.sum(jnp.sin(h)), cap

    delta, cap = jax.grad(loss_of_eps, has_aux=True)({site: jnp.zeros((2, n, cfg.hidden_size))})
    gw = jax.grad(lambda p: jnp.sum(jnp.sin(run(p, x)[0])))(params)["layers"]["mlp"]["fc2"]["kernel"][1]
    u = cap[site].reshape(-1, cfg.intermediate_size)
    d = delta[site].reshape(-1, cfg.hidden_size)
    np.testing.assert_allclose(u.T @ d, gw, rtol=1e-4, atol=1e-5)


def test_bfloat16_close_to_float32(converted):
    cfg, params = converted
    x = pixels(2, cfg.image_size, seed=9).transpose(0, 2, 3, 1)
    want, _ = forward_fn(cfg)(params, x)
    bf_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    got, _ = forward_fn(cfg, jnp.bfloat16)(bf_params, x)
    assert got.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    print(f"vision bf16 vs f32 max|diff|={err:.3f} (output std {float(jnp.std(want)):.2f})")
    assert err < 0.05
