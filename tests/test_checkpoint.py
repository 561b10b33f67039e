"""Converted-model checkpoints (Orbax params + JSON config) and the periodic CheckpointManager."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmedit_jax import checkpoint
from mmedit_jax.checkpoint import CheckpointError, CheckpointManager
from mmedit_jax.models.config import Blip2Config, OPTConfig
from mmedit_jax.tree import flatten


def small_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "query_tokens": rng.standard_normal((1, 2, 4)).astype(np.float32),
        "language_model": {"layers": {"fc1": {"kernel": rng.standard_normal((3, 4, 5)).astype(np.float32)}}},
    }


def abstract(tree, dtype=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), tree)


CONFIG = Blip2Config(text=OPTConfig(vocab_size=50, hidden_size=8), num_query_tokens=2, image_token_index=49)


def test_save_and_restore_model(tmp_path):
    tree = small_tree()
    checkpoint.save_model(tmp_path / "out", CONFIG, tree)
    assert checkpoint.is_converted(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / checkpoint.CONFIG_FILE).read_text())
    assert meta["format_version"] == checkpoint.FORMAT_VERSION and meta["param_dtype"] == "float32"
    assert checkpoint.read_config(tmp_path / "out") == CONFIG
    got = checkpoint.restore_params(tmp_path / "out", abstract(tree))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
        assert isinstance(g, jax.Array)
        np.testing.assert_array_equal(np.asarray(g), w)
    # The template's dtype is the restored dtype.
    bf = checkpoint.restore_params(tmp_path / "out", abstract(tree, jnp.bfloat16))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf))
    with pytest.raises(FileExistsError):
        checkpoint.save_model(tmp_path / "out", CONFIG, tree)
    checkpoint.save_model(tmp_path / "out", CONFIG, small_tree(1), overwrite=True)
    got = checkpoint.restore_params(tmp_path / "out", abstract(tree))
    np.testing.assert_array_equal(np.asarray(got["query_tokens"]), small_tree(1)["query_tokens"])


def test_restore_with_shardings(tmp_path):
    tree = small_tree()
    checkpoint.save_model(tmp_path, CONFIG, tree)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    got = checkpoint.restore_params(tmp_path, abstract(tree), shardings=jax.tree.map(lambda _: spec, tree))
    assert got["query_tokens"].sharding == spec


def test_mismatched_checkpoint_names_the_parameter(tmp_path):
    tree = small_tree()
    checkpoint.save_model(tmp_path, CONFIG, tree)
    wrong = abstract(tree)
    wrong["language_model"]["layers"]["fc1"]["kernel"] = jax.ShapeDtypeStruct((3, 4, 6), jnp.float32)
    msg = r"'language_model/layers/fc1/kernel' has shape \(3, 4, 5\) in the checkpoint, the model needs \(3, 4, 6\)"
    with pytest.raises(CheckpointError, match=msg):
        checkpoint.restore_params(tmp_path, wrong)
    extra = {**abstract(tree), "language_projection": {"bias": jax.ShapeDtypeStruct((4,), jnp.float32)}}
    with pytest.raises(CheckpointError, match="missing parameters: language_projection/bias"):
        checkpoint.restore_params(tmp_path, extra)


def test_bad_metadata(tmp_path):
    with pytest.raises(CheckpointError, match="mmedit_config.json is missing"):
        checkpoint.read_config(tmp_path)
    (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps({"format_version": 99, "config": {}}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        checkpoint.read_config(tmp_path)
    (tmp_path / checkpoint.CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.read_config(tmp_path)
    with pytest.raises(CheckpointError, match="params is missing"):
        checkpoint.params_metadata(tmp_path)


def test_checkpoint_manager_keeps_latest(tmp_path):
    assert checkpoint.latest_step(tmp_path / "none") is None
    with CheckpointManager(tmp_path / "run", max_to_keep=2, save_interval_steps=2) as mngr:
        for step in range(5):
            mngr.save(step, small_tree(step), {"step": step, "loss": 1.0 / (step + 1)})
        mngr.wait()
        assert mngr.all_steps() == [2, 4]
        state, meta = mngr.restore(template=abstract(small_tree()))
        assert meta == {"step": 4, "loss": 0.2}
        np.testing.assert_array_equal(np.asarray(state["query_tokens"]), small_tree(4)["query_tokens"])
        state, meta = mngr.restore(2)
        assert meta["step"] == 2
        with pytest.raises(CheckpointError, match="step 3 not in"):
            mngr.restore(3)
    assert checkpoint.latest_step(tmp_path / "run") == 4


def test_parts_and_streamed_input(tmp_path):
    tree = small_tree(5)
    tree["language_projection"] = {"kernel": np.ones((4, 8), np.float32), "bias": np.zeros(8, np.float32)}
    flat = flatten(tree)
    consumed = []

    def stream():  # a generator, as the converter feeds it
        for name, array in flat.items():
            consumed.append(name)
            yield name, array

    checkpoint.save_model(tmp_path, CONFIG, stream(), part_bytes=40)
    meta = checkpoint.read_metadata(tmp_path)
    assert len(meta["params_parts"]) >= 3 and consumed == list(flat)
    assert meta["num_params"] == sum(a.size for a in flat.values())
    assert set(checkpoint.params_metadata(tmp_path)) == set(flat)
    got = flatten(checkpoint.restore_params(tmp_path, abstract(tree)))
    assert set(got) == set(flat)
    for name, want in flat.items():
        np.testing.assert_array_equal(np.asarray(got[name]), want)
