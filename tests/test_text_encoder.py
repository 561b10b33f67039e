"""BERT-family text encoders (`models/bert.py`, `convert/text_encoder.py`) against transformers' `BertModel` and
`DistilBertModel`: tiny randomised models saved with `save_pretrained` and read back with `load_text_encoder`;
hidden states of a right-padded batch, the CLS embedding (SERAC's classifier) and the mean-pooled, normalised one
(all-MiniLM-L6-v2 for IKE), task-model checkpoints, older saves, and broken checkpoints."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from mmedit_jax.convert.engine import ConversionError  # noqa: E402
from mmedit_jax.convert.text_encoder import load_text_encoder, param_template  # noqa: E402
from mmedit_jax.models.bert import TextEncoder, cls_embedding, sentence_embedding  # noqa: E402
from mmedit_jax.models.config import BertConfig, DistilBertConfig  # noqa: E402

VOCAB, MAX_POS, LENGTHS = 100, 16, (9, 5, 2)
FAMILIES = {
    "bert": (transformers.BertConfig, dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=48, max_position_embeddings=MAX_POS, type_vocab_size=2)),
    "distilbert": (transformers.DistilBertConfig, dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                                       max_position_embeddings=MAX_POS)),
}
BASE = {"bert": "BertModel", "distilbert": "DistilBertModel"}


def hf_model(kind: str, class_name: str, seed: int):
    """A transformers model (eager attention, eval mode) with every weight, LayerNorms included, ~ N(0, 0.4)."""
    config_cls, kw = FAMILIES[kind]
    model = getattr(transformers, class_name)._from_config(config_cls(**kw), attn_implementation="eager").eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """`family(kind)` -> (torch base model, its save_pretrained directory, loaded config, loaded params)."""
    built = {}

    def get(kind):
        if kind not in built:
            model = hf_model(kind, BASE[kind], seed=len(built))
            path = tmp_path_factory.mktemp(kind)
            model.save_pretrained(path)
            built[kind] = (model, path, *load_text_encoder(path))
        return built[kind]

    return get


@functools.cache
def forward(config):
    """One jitted `TextEncoder` forward per config: `(params, ids, mask, token_types) -> last hidden states`."""
    module = TextEncoder(config)
    return jax.jit(lambda p, ids, mask, types: module.apply({"params": p}, ids, mask, types)[0])


def batch(seed):
    """Three right-padded rows (pad id 0) of lengths `LENGTHS`, and random token types on the real tokens."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(max(LENGTHS))[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    ids = np.where(mask, rng.integers(1, VOCAB, size=mask.shape), 0)
    types = rng.integers(0, 2, size=mask.shape) * mask
    return ids, mask, types


def torch_hidden(model, ids, mask, types=None):
    kw = {} if types is None else {"token_type_ids": torch.from_numpy(types)}
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw)
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_hidden_states_and_cls_match_transformers(family, kind):
    model, _, config, params = family(kind)
    assert isinstance(config, BertConfig if kind == "bert" else DistilBertConfig)
    ids, mask, types = batch(0)
    types = types if kind == "bert" else None
    want = torch_hidden(model, ids, mask, types)
    got = np.asarray(forward(config)(params, ids, mask, types))
    real = mask.astype(bool)
    assert got.shape == want.shape == (3, max(LENGTHS), 32) and want[real].std() > 0.3
    err = float(np.abs(got - want)[real].max())
    print(f"{kind}: max|diff| on real tokens {err:.1e}")
    assert err <= 1e-5
    # SERAC's scope classifier compares `last_hidden_state[:, 0]`
    np.testing.assert_allclose(np.asarray(cls_embedding(got)), want[:, 0], rtol=0, atol=1e-5)


def test_sentence_embedding_matches_mean_pooling_in_torch(family):
    """sentence-transformers' Pooling (mean over real tokens) + Normalize, written out on BertModel's outputs."""
    model, _, config, params = family("bert")
    ids, mask, _ = batch(1)
    with torch.no_grad():
        hidden = torch.from_numpy(torch_hidden(model, ids, mask))
        m = torch.from_numpy(mask).unsqueeze(-1).float()
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        want = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
    got = np.asarray(sentence_embedding(forward(config)(params, ids, mask, None), mask))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)
    # what the padded positions hold does not reach the embedding
    other = np.where(mask.astype(bool), ids, 7)
    again = np.asarray(sentence_embedding(forward(config)(params, other, mask, None), mask))
    np.testing.assert_allclose(again, got, rtol=0, atol=1e-6)


def test_param_tree_names(family):
    for kind in ("bert", "distilbert"):
        _, _, config, params = family(kind)
        shapes = lambda t: jax.tree.map(lambda a: a.shape, t)  # noqa: E731
        assert shapes(params) == shapes(param_template(config))
        layers = params["layers"]
        assert layers["attention"]["self"]["query"]["kernel"].shape == (2, 32, 32)
        assert layers["intermediate"]["dense"]["kernel"].shape == (2, 32, 48)
        assert layers["output"]["LayerNorm"]["scale"].shape == (2, 32)
        assert ("token_type_embeddings" in params["embeddings"]) == (kind == "bert")


@pytest.mark.parametrize("kind,head", [("bert", "BertForSequenceClassification"), ("bert", "BertForMaskedLM"),
                                       ("distilbert", "DistilBertForSequenceClassification"),
                                       ("distilbert", "DistilBertForMaskedLM")])
def test_task_model_checkpoints(family, tmp_path, kind, head):
    """Keys under `bert.` / `distilbert.` are the encoder; the head (and BERT's pooler) are left out by name."""
    model = hf_model(kind, head, seed=5)
    model.save_pretrained(tmp_path)
    assert any(k.startswith(f"{kind}.") for k in load_file(tmp_path / "model.safetensors"))
    config, params = load_text_encoder(tmp_path)
    assert config == family(kind)[2]  # the same compiled forward serves it
    ids, mask, _ = batch(2)
    want = torch_hidden(getattr(model, kind), ids, mask)
    got = np.asarray(forward(config)(params, ids, mask, None))
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-5


def copy_checkpoint(src, dst, edit=lambda tensors: None, config_edit=lambda d: None):
    """`src`'s checkpoint in `dst`, after `edit(tensors)` and `config_edit(config dict)`."""
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    d = json.loads((src / "config.json").read_text())
    config_edit(d)
    (dst / "config.json").write_text(json.dumps(d))
    return dst


def test_older_save_with_legacy_names_and_buffers(family, tmp_path):
    """LayerNorm `gamma`/`beta` and a saved `position_ids` buffer, as older BERT checkpoints have them."""
    _, path, config, params = family("bert")

    def legacy(t):
        for k in [k for k in t if ".LayerNorm." in k]:
            t[k.replace(".weight", ".gamma").replace(".bias", ".beta")] = t.pop(k)
        t["embeddings.position_ids"] = np.arange(MAX_POS, dtype=np.int64)[None]

    old_config, old_params = load_text_encoder(copy_checkpoint(path, tmp_path / "old", legacy))
    assert old_config == config
    jax.tree.map(np.testing.assert_array_equal, old_params, params)


def _drop(key):
    return lambda t: t.pop(key)


def _reshape(key, shape):
    return lambda t: t.update({key: np.zeros(shape, np.float32)})


@pytest.mark.parametrize("kind,edit,message", [
    pytest.param("bert", _drop("encoder.layer.1.output.dense.bias"),
                 r"missing from the checkpoint: layers/output/dense/bias expects "
                 r"'encoder\.layer\.1\.output\.dense\.bias'",
                 id="missing"),
    pytest.param("bert", _reshape("embeddings.word_embeddings.weight", (VOCAB - 1, 32)),
                 r"shape mismatch: checkpoint tensor 'embeddings\.word_embeddings\.weight' \(99, 32\)", id="shape"),
    pytest.param("distilbert", _reshape("transformer.layer.0.ffn.lin1.weight", (48, 31)),
                 r"'transformer\.layer\.0\.ffn\.lin1\.weight' \(48, 31\) gives \(31, 48\) after 'linear'",
                 id="stacked-shape"),
    pytest.param("distilbert", lambda t: t.update({"transformer.layer.0.extra.weight": np.zeros(3, np.float32)}),
                 r"not used by any rule: transformer\.layer\.0\.extra\.weight", id="unexpected"),
])
def test_broken_checkpoint_is_a_clear_error(family, tmp_path, kind, edit, message):
    path = copy_checkpoint(family(kind)[1], tmp_path / "broken", edit)
    with pytest.raises(ConversionError, match=message):
        load_text_encoder(path)


def test_config_that_does_not_fit_the_tensors(family, tmp_path):
    path = copy_checkpoint(family("distilbert")[1], tmp_path / "deeper", config_edit=lambda d: d.update(n_layers=3))
    with pytest.raises(ConversionError, match=r"transformer\.layer\.2\.attention\.q_lin\.weight"):
        load_text_encoder(path)
    path = copy_checkpoint(family("bert")[1], tmp_path / "gpt", config_edit=lambda d: d.update(model_type="gpt2"))
    with pytest.raises(ValueError, match="model_type is 'gpt2'"):
        load_text_encoder(path)


def test_bad_configs_and_inputs(family):
    with pytest.raises(ValueError, match="not a BERT config"):
        BertConfig.from_hf({"model_type": "distilbert"})
    with pytest.raises(ValueError, match="encoders only"):
        BertConfig.from_hf({"model_type": "bert", "is_decoder": True})
    _, _, config, params = family("distilbert")
    ids, mask, types = batch(0)
    with pytest.raises(ValueError, match="no token types"):
        forward(config)(params, ids, mask, types)
    long = np.ones((1, MAX_POS + 1), np.int64)
    with pytest.raises(ValueError, match="exceed max_position_embeddings"):
        TextEncoder(config).apply({"params": params}, long)
