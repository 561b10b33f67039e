"""The conversion engine on small synthetic checkpoints written here (safetensors single/sharded, .bin, bf16)."""

import json
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from mmedit_jax.convert import engine
from mmedit_jax.convert.engine import ConversionError, convert, open_checkpoint
from mmedit_jax.convert.rules import plain, stacked

L, D, F, V, P = 3, 4, 6, 10, 2


def sds(*shape, dtype=np.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


TEMPLATE = {
    "embed": {"embedding": sds(V, D)},
    "patch": {"kernel": sds(P, P, 3, D), "bias": sds(D)},
    "layers": {"fc": {"kernel": sds(L, D, F), "bias": sds(L, F)}},
}


def make_rules():
    return [
        plain("embed/embedding", "model.embed.weight"),
        plain("patch/kernel", "model.patch.weight", "conv"),
        plain("patch/bias", "model.patch.bias"),
        stacked("layers/fc/kernel", [f"model.layers.{i}.fc.weight" for i in range(L)], "linear"),
        stacked("layers/fc/bias", [f"model.layers.{i}.fc.bias" for i in range(L)]),
    ]


IGNORED = {"lm_head.weight": "tied to the embedding"}


def make_tensors(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(dtype)
    t = {"model.embed.weight": r(V, D), "model.patch.weight": r(D, 3, P, P), "model.patch.bias": r(D)}
    for i in range(L):
        t[f"model.layers.{i}.fc.weight"] = r(F, D)
        t[f"model.layers.{i}.fc.bias"] = r(F)
    return t


def expected(t):
    f32 = lambda a: np.asarray(a, np.float32)
    return {
        "embed": {"embedding": f32(t["model.embed.weight"])},
        "patch": {"kernel": f32(t["model.patch.weight"]).transpose(2, 3, 1, 0), "bias": f32(t["model.patch.bias"])},
        "layers": {
            "fc": {
                "kernel": np.stack([f32(t[f"model.layers.{i}.fc.weight"]).T for i in range(L)]),
                "bias": np.stack([f32(t[f"model.layers.{i}.fc.bias"]) for i in range(L)]),
            }
        },
    }


def assert_tree_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(g, np.ndarray) and g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def write_sharded(folder, tensors, n_shards=2, ext="safetensors"):
    keys = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.{ext}"
        part = {k: tensors[k] for k in keys[s::n_shards]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_single_safetensors(tmp_path):
    t = make_tensors()
    save_file({**t, "lm_head.weight": t["model.embed.weight"]}, str(tmp_path / "model.safetensors"))
    got = convert(tmp_path, TEMPLATE, make_rules(), IGNORED)
    assert_tree_equal(got, expected(t))
    # A file path works as well as its directory.
    assert_tree_equal(convert(tmp_path / "model.safetensors", TEMPLATE, make_rules(), IGNORED), expected(t))


def test_sharded_safetensors_with_index(tmp_path):
    t = make_tensors(1)
    write_sharded(tmp_path, t, n_shards=3)
    reader = open_checkpoint(tmp_path)
    assert len(reader.files) == 3 and sorted(reader.keys()) == sorted(t)
    assert_tree_equal(convert(tmp_path, TEMPLATE, make_rules(), IGNORED), expected(t))


def test_missing_shard_is_named(tmp_path):
    write_sharded(tmp_path, make_tensors(), n_shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors"):
        convert(tmp_path, TEMPLATE, make_rules(), IGNORED)


def test_bf16_source_and_bf16_output(tmp_path):
    t = make_tensors(2, dtype=ml_dtypes.bfloat16)
    save_file(t, str(tmp_path / "model.safetensors"))
    assert open_checkpoint(tmp_path).dtypes["model.embed.weight"] == np.dtype(ml_dtypes.bfloat16)
    # bf16 -> float32 is exact.
    assert_tree_equal(convert(tmp_path, TEMPLATE, make_rules(), IGNORED), expected(t))
    # dtype= overrides the template's dtype.
    got = convert(tmp_path, TEMPLATE, make_rules(), IGNORED, dtype=jax.numpy.bfloat16)
    want = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), expected(t))
    assert_tree_equal(got, want)


def test_pytorch_bin_single_and_sharded(tmp_path):
    torch = pytest.importorskip("torch")
    t = make_tensors(3)
    single = tmp_path / "single"
    single.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in t.items()}, single / "pytorch_model.bin")
    assert_tree_equal(convert(single, TEMPLATE, make_rules(), IGNORED), expected(t))

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(t)
    weight_map = {}
    for s, part in enumerate([keys[:4], keys[4:]]):
        name = f"pytorch_model-{s + 1:05d}-of-00002.bin"
        torch.save({k: torch.from_numpy(t[k]) for k in part}, sharded / name)
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_tree_equal(convert(sharded, TEMPLATE, make_rules(), IGNORED), expected(t))


def test_pytorch_bin_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    t32 = make_tensors(4)
    t = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in t32.items()}
    torch.save(t, tmp_path / "pytorch_model.bin")
    want = expected({k: v.float().numpy() for k, v in t.items()})
    assert_tree_equal(convert(tmp_path, TEMPLATE, make_rules(), IGNORED), want)


def test_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "pytorch_model.bin").write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ConversionError, match="needs torch"):
        open_checkpoint(tmp_path)


def test_missing_tensor_names_target_and_key(tmp_path):
    t = make_tensors()
    del t["model.layers.1.fc.bias"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"layers/fc/bias expects 'model.layers.1.fc.bias'"):
        convert(tmp_path, TEMPLATE, make_rules(), IGNORED)


def test_extra_tensor_is_listed(tmp_path):
    t = make_tensors()
    t["model.surprise.weight"] = np.zeros(3, np.float32)
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="not used by any rule: model.surprise.weight"):
        convert(tmp_path, TEMPLATE, make_rules(), IGNORED)
    # Listing it as ignored makes it fine.
    convert(tmp_path, TEMPLATE, make_rules(), {**IGNORED, "model.surprise.weight": "not a parameter"})


def test_wrong_shape_names_key_target_and_both_shapes(tmp_path):
    t = make_tensors()
    t["model.layers.2.fc.weight"] = np.zeros((F, D + 1), np.float32)
    save_file(t, str(tmp_path / "model.safetensors"))
    msg = r"'model.layers.2.fc.weight' \(6, 5\) gives \(5, 6\) .* 'layers/fc/kernel' needs \(4, 6\)"
    with pytest.raises(ConversionError, match=msg):
        convert(tmp_path, TEMPLATE, make_rules(), IGNORED)


def test_transposed_square_mismatch_caught(tmp_path):
    # A plain rule whose tensor has the template's shape only before the transform.
    t = make_tensors()
    t["model.patch.weight"] = np.zeros((P, P, 3, D), np.float32)  # already HWIO: conv transform breaks it
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"'model.patch.weight' \(2, 2, 3, 4\) .* 'patch/kernel'"):
        convert(tmp_path, TEMPLATE, make_rules(), IGNORED)


def test_truncated_and_garbage_files_are_named(tmp_path):
    save_file(make_tensors(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(ConversionError, match=r"corrupt or truncated .*model.safetensors"):
        convert(tmp_path, TEMPLATE, make_rules(), IGNORED)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ConversionError, match=r"model.safetensors"):
        convert(tmp_path, TEMPLATE, make_rules(), IGNORED)


def test_truncated_bin_is_named(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in make_tensors().items()}, tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"corrupt or truncated .*pytorch_model.bin"):
        convert(tmp_path, TEMPLATE, make_rules(), IGNORED)


def test_mapping_errors(tmp_path):
    t = make_tensors()
    save_file(t, str(tmp_path / "model.safetensors"))
    rules = make_rules()
    # A source key used by two rules.
    dup = rules[:2] + [plain("patch/bias", "model.embed.weight")] + rules[3:]
    with pytest.raises(ConversionError, match=r"'model.embed.weight' is used by two rules"):
        convert(tmp_path, TEMPLATE, dup, IGNORED)
    # A template parameter with no rule.
    with pytest.raises(ConversionError, match="no rule fills the model parameters: patch/bias"):
        convert(tmp_path, TEMPLATE, rules[:2] + rules[3:], {**IGNORED, "model.patch.bias": "x"})
    # A rule target that is not a parameter.
    with pytest.raises(ConversionError, match="'patch/weight' is not a parameter"):
        convert(tmp_path, TEMPLATE, rules + [plain("patch/weight", "x")], IGNORED)
    # Stacking the wrong number of tensors.
    short = rules[:4] + [stacked("layers/fc/bias", [f"model.layers.{i}.fc.bias" for i in range(L - 1)])]
    ign = {**IGNORED, f"model.layers.{L - 1}.fc.bias": "x"}
    with pytest.raises(ConversionError, match=r"'layers/fc/bias' has shape \(3, 6\), but its rule stacks 2"):
        convert(tmp_path, TEMPLATE, short, ign)
    # A key both ignored and used.
    with pytest.raises(ConversionError, match="both ignored and used"):
        convert(tmp_path, TEMPLATE, rules, {"model.embed.weight": "x"})


def test_no_checkpoint_in_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint tensors"):
        convert(tmp_path, TEMPLATE, make_rules(), IGNORED)


def test_reads_each_tensor_once_and_checks_before_reading(tmp_path, monkeypatch):
    t = make_tensors()
    save_file(t, str(tmp_path / "model.safetensors"))
    reads = []
    original = engine.CheckpointReader.read
    monkeypatch.setattr(engine.CheckpointReader, "read", lambda self, k: reads.append(k) or original(self, k))
    convert(tmp_path, TEMPLATE, make_rules(), IGNORED)
    assert sorted(reads) == sorted(t)
    reads.clear()
    del t["model.patch.bias"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError):
        convert(tmp_path, TEMPLATE, make_rules(), IGNORED)
    assert reads == []  # failed from headers alone
