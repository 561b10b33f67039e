"""E-IC on the built-in world: the shipped caption editors load and verify, `evaluate --world --task caption`
scores MEND and SERAC on whole-caption targets (exact match over every target token), and `world.build --task
caption --model DIR` meta-trains on an existing model with the task's own configs, installing editors only."""

import json
import os

import pytest

from mmedit_jax import evaluate, pipeline
from mmedit_jax.editors import io as editor_io
from mmedit_jax.editors.hparams import load_hparams
from mmedit_jax.integrity import verify_checksums
from mmedit_jax.world import assets

SHIPPED = {"mend": editor_io.load_mend, "ke": editor_io.load_ke, "serac": editor_io.load_serac}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("world_caption"))


def test_shipped_caption_editors_verify_and_load(cache):
    w = assets.ensure("caption", cache_dir=cache)
    assert set(SHIPPED) <= set(w.editor_ckpts), w.editor_ckpts
    for name, load in SHIPPED.items():
        assert w.editor_ckpts[name] == os.path.join(assets.ASSETS, f"{name}_caption")
        assert verify_checksums(w.editor_ckpts[name]) >= 2
        assert load(w.editor_ckpts[name])  # a spec/config and finite weights (io refuses NaN or inf)


# Lower bounds on the first 8 eval cases, under what the shipped editors score on the whole split (README's
# table): MEND must edit whole captions; SERAC (100 / 100 / 100 / 100 / 98.3 on the split) must copy the caption
# from its memory and leave what the memory does not cover alone.
BOUNDS = {"mend": dict(reliability=75.0, t_generality=62.5, t_locality=90.0),
          "serac": dict(reliability=87.5, t_generality=87.5, t_locality=95.0, m_locality=80.0)}


@pytest.mark.parametrize("editor", sorted(BOUNDS))
def test_evaluate_world_caption(editor, cache, tmp_path):
    out = str(tmp_path / "run")
    result = evaluate.main(["--world", "--task", "caption", "--editor", editor, "--limit", "8", "--batch-size", "4",
                            "--cache-dir", cache, "--out", out, "--no-progress"])
    s = result.summary
    assert s["num_cases"] == 8 and s["exact_match"]
    for metric, low in BOUNDS[editor].items():
        assert s[metric] >= low, (metric, s[metric])
    with open(assets.ensure("caption", cache_dir=cache).eval_json) as f:
        records = json.load(f)[:8]
    for row, rec in zip(result.rows, records):  # whole captions, several tokens each, decoded back as written
        assert row["target"].strip() == rec["alt"] and len(rec["alt"].split()) == 3
        assert set(row["answers"]) >= {"edit", "rephrase", "image_rephrase"}


def test_build_caption_uses_the_given_model_and_the_task_configs(tmp_path, monkeypatch):
    from mmedit_jax.world import build

    calls = []

    def fake_train(editor, config, model_dir, out, task, seed, init):
        calls.append((editor, os.path.basename(config), os.path.basename(out), task, model_dir, init))
        os.makedirs(os.path.join(out, "editor"))

    def no_pretraining(*a, **k):
        raise AssertionError("--model given: nothing is pretrained")

    monkeypatch.setattr(build, "train_editor", fake_train)
    monkeypatch.setattr(build, "pretrain", no_pretraining)
    monkeypatch.setattr(build.assets, "ensure_data", lambda *a, **k: str(tmp_path))
    monkeypatch.setitem(build.assets.ASSETS_OF, "blip2", str(tmp_path / "assets"))  # never the shipped ones
    model = tmp_path / "model"
    model.mkdir()
    work = str(tmp_path / "work")
    build.main(["--work", work, "--model", str(model), "--task", "caption", "--editors", "mend,ke", "--install"])
    want = []
    for editor in ("mend", "ke"):  # a task with its own first-stage config uses only its own stage files
        suffix = "_caption" if os.path.exists(_config(build, f"{editor}_world_caption")) else ""
        first = _config(build, f"{editor}_world{suffix}")
        init = load_hparams(first).get("world_init_editor")
        want.append((editor, os.path.basename(first), f"{editor}_caption", init and os.path.join(build.REPO, init)))
        if os.path.exists(_config(build, f"{editor}_world_finetune{suffix}")):
            want.append((editor, f"{editor}_world_finetune{suffix}.yaml", f"{editor}_caption_finetune",
                         os.path.join(work, f"{editor}_caption", "editor")))
    assert [c[:3] + c[5:] for c in calls] == want
    assert all(c[3] == "caption" and c[4] == str(model) for c in calls)
    assert sorted(os.listdir(tmp_path / "assets")) == ["ke_caption", "mend_caption"]  # the model is not installed
    with pytest.raises(SystemExit, match="no such directory"):
        build.main(["--work", work, "--model", str(tmp_path / "none"), "--task", "caption"])


def _config(build, name):
    return os.path.join(build.REPO, "configs", f"{name}.yaml")


def test_caption_world_lists_only_caption_editors(cache):
    shipped = pipeline.world_inputs("caption", cache)[4]
    assert all(path.endswith("_caption") for path in shipped.values())
