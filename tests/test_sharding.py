"""Partition rules: every parameter of a BLIP-2 tree gets a valid spec, unmatched ones are named, and a sharded
forward of the vision tower on an 8-device CPU mesh equals the unsharded one."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmedit_jax import sharding
from mmedit_jax.models.config import QFormerConfig, VisionConfig
from mmedit_jax.models.qformer import QFormer
from mmedit_jax.models.vit import VisionModel
from mmedit_jax.tree import path_name

VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=16, patch_size=4)
QFORMER = QFormerConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
                        cross_attention_frequency=2, encoder_hidden_size=32)
NQ, V, E, D, LT, FFN, MAXPOS = 4, 50, 16, 32, 2, 64, 30


def tiny_blip2_params(abstract: bool = True):
    """The spec's full tree: real vision/Q-Former params and a fake OPT subtree with the spec's shapes
    (project_in/out, final_layer_norm and an untied lm_head, so every optional leaf is present)."""
    pixels = jnp.zeros((1, VISION.image_size, VISION.image_size, 3))
    query = jnp.zeros((1, NQ, QFORMER.hidden_size))
    enc = jnp.zeros((1, 1 + VISION.num_patches, VISION.hidden_size))
    make = jax.eval_shape if abstract else (lambda f: f())
    vision = make(lambda: VisionModel(VISION).init(jax.random.PRNGKey(0), pixels)["params"])
    qformer = make(lambda: QFormer(QFORMER).init(jax.random.PRNGKey(1), query, enc)["params"])
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    dense = lambda i, o, *lead: {"kernel": s(*lead, i, o), "bias": s(*lead, o)}  # noqa: E731
    ln = lambda *lead: {"scale": s(*lead, D), "bias": s(*lead, D)}  # noqa: E731
    layers = {
        "self_attn": {n: dense(D, D, LT) for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "self_attn_layer_norm": ln(LT), "fc1": dense(D, FFN, LT), "fc2": dense(FFN, D, LT), "final_layer_norm": ln(LT),
    }
    language_model = {
        "embed_tokens": {"embedding": s(V, E)}, "embed_positions": {"embedding": s(MAXPOS + 2, D)},
        "project_in": {"kernel": s(E, D)}, "project_out": {"kernel": s(D, E)}, "layers": layers,
        "final_layer_norm": ln(), "lm_head": {"kernel": s(E, V)},
    }
    return {
        "query_tokens": s(1, NQ, QFORMER.hidden_size), "vision_model": vision, "qformer": qformer,
        "language_projection": dense(QFORMER.hidden_size, E), "language_model": language_model,
    }


def test_every_param_has_a_spec_of_its_rank():
    params = tiny_blip2_params()
    specs = sharding.param_specs(params)
    flat = {path_name(p): (leaf.shape, spec) for (p, leaf), spec in
            zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(specs, is_leaf=lambda x:
                                                                                 isinstance(x, P)))}
    assert len(flat) == len(jax.tree.leaves(params))
    for name, (shape, spec) in flat.items():
        assert len(spec) in (0, len(shape)), (name, shape, spec)
        if name.split("/")[1:2] == ["layers"]:
            assert len(spec) == 0 or spec[0] is None, f"{name}: layer axis must stay unsharded, got {spec}"
    assert flat["vision_model/layers/self_attn/qkv/kernel"][1] == P(None, None, "model")
    assert flat["qformer/layers/1/output_query/dense/kernel"][1] == P(None, "model", None)
    assert flat["language_model/embed_tokens/embedding"][1] == P("model", None)
    assert flat["language_model/layers/fc1/bias"][1] == P()
    sharded = [n for n, (_, spec) in flat.items() if any(a is not None for a in spec)]
    assert all(n.endswith(("kernel", "embedding")) for n in sharded) and len(sharded) >= 20


def test_unmatched_and_misfit_params_are_named():
    with pytest.raises(KeyError, match="'language_model/adapter/kernel'"):
        sharding.param_specs({"language_model": {"adapter": {"kernel": np.zeros((2, 2))}}})
    with pytest.raises(ValueError, match="'language_projection/kernel' of shape \\(2, 2, 2\\)"):
        sharding.param_specs({"language_projection": {"kernel": np.zeros((2, 2, 2))}})
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh(3, 2, devices=jax.devices()[:1])


# Runs with 8 host devices: XLA_FLAGS must be set before jax is imported, hence a fresh interpreter.
SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from test_sharding import QFORMER, VISION, tiny_blip2_params
    from mmedit_jax import sharding
    from mmedit_jax.tree import path_name
    from mmedit_jax.models.qformer import QFormer
    from mmedit_jax.models.vit import VisionModel

    assert len(jax.devices()) == 8, jax.devices()
    mesh = sharding.make_mesh(data=2, model=4)
    tree = tiny_blip2_params()
    shardings = sharding.param_shardings(tree, mesh)
    out = {"mesh": dict(mesh.shape), "axis_types": [str(t) for t in mesh.axis_types], "shards": {}}
    for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(shardings)):
        out["shards"][path_name(path)] = [list(leaf.shape), list(s.shard_shape(leaf.shape))]

    # Random values on the abstract tree (numpy: no init program to compile).
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), jnp.float32), tree)
    params = values["vision_model"]
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 16, 16, 3))
    fwd = jax.jit(lambda p, x: VisionModel(VISION).apply({"params": p}, x)[0])
    want = fwd(params, x)
    placed = sharding.shard_params({"vision_model": params}, mesh)["vision_model"]
    xs = jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
    got = fwd(placed, xs)
    qkv = placed["layers"]["self_attn"]["qkv"]["kernel"]
    out["qkv_shard"] = list(qkv.addressable_shards[0].data.shape)
    out["max_diff"] = float(jnp.max(jnp.abs(got - want)))

    # The Q-Former (grouped stack, cross-attention to the sharded image features) the same way.
    q = jax.random.normal(jax.random.PRNGKey(3), (4, 4, QFORMER.hidden_size))
    qparams = values["qformer"]
    qfwd = jax.jit(lambda p, q, e: QFormer(QFORMER).apply({"params": p}, q, e)[0])
    qwant = qfwd(qparams, q, want)
    qplaced = sharding.shard_params({"qformer": qparams}, mesh)["qformer"]
    qgot = qfwd(qplaced, jax.device_put(q, sharding.batch_sharding(mesh, 3)), got)
    out["qformer_max_diff"] = float(jnp.max(jnp.abs(qgot - qwant)))
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices():
    root = pathlib.Path(__file__).resolve().parents[1]
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"  # keep the suite's flags
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(root / "tests"), os.environ.get("PYTHONPATH", "")]))  # test_sharding
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_mesh_has_auto_axes(eight_devices):
    assert eight_devices["mesh"] == {"data": 2, "model": 4}
    assert all("Auto" in t for t in eight_devices["axis_types"])


def test_every_param_gets_a_valid_sharding(eight_devices):
    shards = eight_devices["shards"]
    assert len(shards) == len(jax.tree.leaves(tiny_blip2_params()))
    assert shards["vision_model/layers/mlp/fc1/kernel"] == [[2, 32, 64], [2, 32, 16]]
    assert shards["qformer/layers/0/crossattention/attention/key/kernel"] == [[2, 32, 32], [2, 32, 8]]
    assert shards["language_model/lm_head/kernel"] == [[16, 50], [16, 50]]  # 50 % 4 != 0: replicated
    assert shards["language_model/layers/fc2/kernel"] == [[2, 64, 32], [2, 16, 32]]
    assert shards["vision_model/embeddings/position_embedding"][0] == shards["vision_model/embeddings/"
                                                                             "position_embedding"][1]


def test_sharded_vision_forward_equals_unsharded(eight_devices):
    assert eight_devices["qkv_shard"] == [2, 32, 24]  # the stacked qkv kernel really is split over "model"
    print(f"sharded vs unsharded vision forward max|diff|={eight_devices['max_diff']:.2e}")
    assert eight_devices["max_diff"] <= 1e-5


def test_sharded_qformer_forward_equals_unsharded(eight_devices):
    print(f"sharded vs unsharded Q-Former forward max|diff|={eight_devices['qformer_max_diff']:.2e}")
    assert eight_devices["qformer_max_diff"] <= 1e-5


def test_mesh_flag_of_the_clis():
    n = len(jax.devices())
    assert sharding.mesh_from_flag(None) is None and sharding.mesh_from_flag("") is None
    assert dict(sharding.mesh_from_flag("auto").shape) == {"data": n, "model": 1}
    assert dict(sharding.mesh_from_flag(f"-1x{n}").shape) == {"data": 1, "model": n}
    with pytest.raises(ValueError, match="DATAxMODEL"):
        sharding.mesh_from_flag("4by2")
    with pytest.raises(ValueError, match="needs"):
        sharding.mesh_from_flag(f"{n + 1}x1")
