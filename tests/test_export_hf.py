"""Export to transformers: a random tiny `Blip2Model` -> `Blip2ForConditionalGeneration` gives our logits, and
export -> save_pretrained -> `from_pretrained` gives back our parameters bit for bit."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mmedit_jax.convert import export_hf as X  # noqa: E402
from mmedit_jax.loading import from_pretrained  # noqa: E402
from mmedit_jax.models.blip2 import Blip2Model  # noqa: E402
from mmedit_jax.models.config import Blip2Config, OPTConfig, QFormerConfig, VisionConfig  # noqa: E402

IMAGE_TOKEN, PAD, NQ = 63, 1, 3


def tiny_config(cross_every=2, tie=True):
    return Blip2Config(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            image_size=16, patch_size=8),
        qformer=QFormerConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                              cross_attention_frequency=cross_every, encoder_hidden_size=16),
        text=OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=24, num_attention_heads=2,
                       max_position_embeddings=40, pad_token_id=PAD, bos_token_id=2, eos_token_id=2,
                       tie_word_embeddings=tie),
        num_query_tokens=NQ, image_token_index=IMAGE_TOKEN)


def random_model(config, seed=0, std=0.3):
    """Our init, then every leaf redrawn (LayerNorm scales and biases too, so no identity hides an error)."""
    model = Blip2Model.init(config, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    model.params = jax.tree.unflatten(tree, [std * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return model


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = np.full((2, NQ + 6), PAD)
    ids[0, :NQ], ids[0, NQ:NQ + 4] = IMAGE_TOKEN, rng.integers(3, 60, 4)
    ids[1, :NQ], ids[1, NQ:] = IMAGE_TOKEN, rng.integers(3, 60, 6)
    mask = (ids != PAD).astype(np.int64)
    return rng.standard_normal((2, 3, 16, 16)).astype(np.float32), ids, mask


@pytest.mark.parametrize("cross_every,tie", [(2, True), (1, False)])
def test_exported_logits_match_ours(cross_every, tie):
    model = random_model(tiny_config(cross_every, tie))
    hf = X.to_hf(model.config, model.params)
    pixels, ids, mask = inputs()
    ours = np.asarray(model(pixels, ids, mask))
    with torch.no_grad():
        theirs = hf(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask)).logits.numpy()
    keep = mask.astype(bool)
    assert np.abs(ours - theirs)[keep].max() <= 1e-4
    if tie:
        assert hf.language_model.lm_head.weight.data_ptr() == \
            hf.language_model.model.decoder.embed_tokens.weight.data_ptr()


def test_save_pretrained_round_trip_is_bit_identical(tmp_path):
    model = random_model(tiny_config())
    X.export_hf(model.config, model.params, tmp_path / "hf")
    back = from_pretrained(tmp_path / "hf")
    # transformers writes word_embed_proj_dim = hidden_size where we keep None (same model).
    assert back.config.text.embed_dim == model.config.text.embed_dim
    text = dataclasses.replace(back.config.text, word_embed_proj_dim=model.config.text.word_embed_proj_dim)
    assert dataclasses.replace(back.config, text=text) == model.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, model.params)


def test_export_refuses_a_tree_it_would_lose():
    model = random_model(tiny_config())
    params = {**model.params, "stray": np.zeros(3)}
    with pytest.raises(ValueError, match="stray"):
        X.state_dict(model.config, params)


@pytest.mark.parametrize("tie", [True, False])
def test_streamed_export_loads_in_transformers_as_the_in_memory_model(tmp_path, tie):
    """`export_hf` writes the safetensors file itself, tensor by tensor: transformers loads it to exactly the
    model `to_hf` builds in memory (the tied head left out and tied again on load, an untied one written)."""
    import transformers

    model = random_model(tiny_config(tie=tie))
    X.export_hf(model.config, model.params, tmp_path / "hf")
    loaded = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    want = X.to_hf(model.config, model.params).state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="numpy") as f:
        assert ("language_model.lm_head.weight" in f.keys()) == (not tie)


def test_write_safetensors_streams_every_dtype_and_refuses_a_changed_second_pass(tmp_path):
    import ml_dtypes
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b.t": rng.standard_normal((4, 2)).astype(np.float32).T,  # a non-contiguous view
               "c": rng.standard_normal(7).astype(ml_dtypes.bfloat16), "d": np.arange(6, dtype=np.int64).reshape(2, 3)}
    path = tmp_path / "m.safetensors"
    X.write_safetensors(path, lambda shapes_only: iter(tensors.items()))
    with safe_open(str(path), framework="numpy") as f:
        assert list(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and np.array_equal(got, v), k

    def changing(shapes_only):  # the data pass yields another shape than the header's
        yield "a", tensors["a"] if shapes_only else tensors["a"][:2]

    with pytest.raises(ValueError, match="differs from the header"):
        X.write_safetensors(tmp_path / "bad.safetensors", changing)
    assert not (tmp_path / "bad.safetensors").exists()
