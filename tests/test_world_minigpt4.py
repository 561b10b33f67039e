"""The MiniGPT-4-shaped built-in world: the `family` flag from pretraining to the bench, pretraining cases encoded
as the evaluation encodes them, and the shipped model with its MEND editing world cases."""

import json
import os

import numpy as np
import pytest

from mmedit_jax import bench, evaluate, pipeline
from mmedit_jax.data.mmedit import load_mmedit
from mmedit_jax.loading import from_pretrained
from mmedit_jax.models.minigpt4 import MiniGPT4Model
from mmedit_jax.world import assets, build, dataset, pretrain

SHIPPED = os.path.join(assets.assets_dir("minigpt4"), "model")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return dataset.write_world(str(tmp_path_factory.mktemp("world")), seed=3, n_train=4, n_eval=4, tasks=("vqa",))


def test_family_picks_the_assets(tmp_path):
    assert assets.assets_dir() == assets.ASSETS
    assert assets.assets_dir("minigpt4") != assets.ASSETS
    with pytest.raises(ValueError, match="family 'opt'"):
        assets.assets_dir("opt")
    with pytest.raises(FileNotFoundError, match="--family minigpt4"):
        assets.ensure(assets=str(tmp_path / "none"), cache_dir=str(tmp_path / "cache"), family="minigpt4")
    with pytest.raises(ValueError, match="unknown model family"):
        pretrain.pretrain(str(tmp_path / "p"), steps=1, family="opt")


def test_family_flag_needs_the_world():
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "m", "--data", "d.json", "--image-root", ".", "--family", "minigpt4"])
    with pytest.raises(SystemExit):
        bench.main(["--editor", "mend", "--model", "m", "--data", "d.json", "--image-root", ".",
                    "--family", "minigpt4"])


def test_build_uses_the_family_configs_and_assets(tmp_path, monkeypatch):
    """`world.build --family minigpt4`: MEND's stages from `mend_world_minigpt4*.yaml`, installed into the
    family's assets (here a temporary one)."""
    calls = []

    def fake_train(editor, config, model_dir, out, task, seed, init):
        calls.append((os.path.basename(config), init is not None))
        os.makedirs(os.path.join(out, "editor"))

    monkeypatch.setattr(build, "train_editor", fake_train)
    monkeypatch.setattr(build.assets, "ensure_data", lambda *a, **k: str(tmp_path))
    monkeypatch.setitem(assets.ASSETS_OF, "minigpt4", str(tmp_path / "installed"))
    work = tmp_path / "work"
    os.makedirs(work / "pretrain" / "model")
    build.main(["--family", "minigpt4", "--work", str(work), "--install"])
    want = [("mend_world_minigpt4.yaml", False)]
    if os.path.exists(os.path.join(build.REPO, "configs", "mend_world_minigpt4_finetune.yaml")):
        want.append(("mend_world_minigpt4_finetune.yaml", True))
    assert calls == want
    assert sorted(os.listdir(tmp_path / "installed")) == ["mend_vqa", "model"]


def test_pretraining_encodes_cases_as_the_evaluation_does(world):
    """A pretraining example of a world question is the evaluation's `rephrase` input, token for token: the
    wrapper `'###Human: <Img>'` ‖ slots ‖ `'</Img> '` in a few learned tokens, within the pretraining length."""
    tok = pretrain.build_tokenizer(None, "minigpt4")
    config = pretrain.minigpt4_config(tok, size="test")
    model = MiniGPT4Model(config, params={})
    wrapper = pipeline.image_wrapper(config, tok)
    assert 0 < len(wrapper["image_before"]) <= 6 and 0 < len(wrapper["image_after"]) <= 4
    record = load_mmedit(world.files["vqa_eval"], "vqa", world.root).records[0]
    prepared = pipeline.prepare_data([record], tok, model, "vqa")
    ev = prepared.batch.sub("rephrase")
    image = np.zeros((32, 32, 3), np.uint8)  # any image: only the ids are compared
    ex = dataset.Example(image, dataset.VQA_TEMPLATE.format(record.rephrase), " " + record.alt)
    _, ids, mask, labels = pretrain.encode_examples([ex], tok, config, 32, pretrain.SEQ_LENS["minigpt4"])
    n = int(ev.attention_mask[0].sum())
    assert n <= pretrain.SEQ_LENS["minigpt4"] and int(mask[0].sum()) == n
    np.testing.assert_array_equal(ids[0, :n], ev.input_ids[0, :n])
    np.testing.assert_array_equal(labels[0, :n], ev.labels[0, :n])


def test_pretrain_writes_a_loadable_minigpt4(world, tmp_path):
    report = pretrain.pretrain(str(tmp_path), steps=2, batch_size=4, eval_files=[world.files["vqa_eval"]],
                               image_root=world.root, log_every=1, size="test", family="minigpt4")
    assert report["family"] == "minigpt4" and set(report["accuracy"])
    model = from_pretrained(tmp_path / "model")
    assert isinstance(model, MiniGPT4Model) and model.config.prompt_before == "###Human: <Img>"
    assert model.config.text.num_hidden_layers == pretrain.SIZES["test"][5]


@pytest.mark.skipif(not os.path.isdir(SHIPPED), reason="the MiniGPT-4 world model is not built")
def test_shipped_minigpt4_world_mend_edits(tmp_path):
    """`evaluate --world --family minigpt4` on 8 eval cases: the shipped MEND's edits take (Reliability and
    T-Generality), locality holds; the shipped model is a MiniGPT-4 that knows the world before the edit."""
    out = str(tmp_path / "run")
    evaluate.main(["--world", "--family", "minigpt4", "--editor", "mend", "--limit", "8", "--batch-size", "8",
                   "--out", out, "--no-progress"])
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["num_cases"] == 8
    assert s["reliability"] >= 75 and s["t_generality"] >= 75, s
    assert s["t_locality"] >= 80 and s["m_locality"] >= 60, s
    assert s["pre_reliability"] < 50, s  # the edit targets are counterfactual: the model did not say them before
    model_dir, _, _, _, shipped = pipeline.world_inputs(family="minigpt4")
    assert model_dir == SHIPPED and set(shipped) == {"mend"}
    assert isinstance(from_pretrained(model_dir), MiniGPT4Model)
