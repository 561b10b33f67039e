"""The built-in world: deterministic MMEdit files in the released schema, meaningful edits, a pretraining stream
and script whose output loads like any converted checkpoint, and the bench's asset lookup."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from mmedit_jax.data.mmedit import load_mmedit
from mmedit_jax.world import assets, dataset, facts, scenes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return dataset.write_world(str(out), seed=3, n_train=12, n_eval=8)


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(dirpath, f), "rb").read())
    return h.hexdigest()


def test_same_seed_same_bytes(world, tmp_path):
    again = dataset.write_world(str(tmp_path / "again"), seed=3, n_train=12, n_eval=8)
    assert _digest(world.root) == _digest(again.root)
    other = dataset.write_world(str(tmp_path / "other"), seed=4, n_train=12, n_eval=8)
    assert _digest(world.root) != _digest(other.root)


@pytest.mark.parametrize("key", ["vqa_train", "vqa_eval", "caption_train", "caption_eval"])
def test_every_split_loads_without_problems(world, key):
    task = key.split("_")[0]
    loaded = load_mmedit(world.files[key], task, world.root)
    assert not loaded.problems and len(loaded.records) == (12 if key.endswith("train") else 8)
    with open(world.files[key]) as f:
        raw = json.load(f)
    assert set(raw[0]) == {"src", "pred", "rephrase", "alt", "image", "image_rephrase", "loc", "loc_ans", "m_loc",
                           "m_loc_q", "m_loc_a"}
    for r in loaded.records:
        assert r.alt != r.pred and r.rephrase != r.src
        assert r.image != r.image_rephrase


def test_vqa_answers_and_edits_are_of_the_asked_attribute(world):
    values = {"color": set(scenes.COLORS), "shape": set(scenes.SHAPES), "count": set(scenes.COUNTS)}
    for r in load_mmedit(world.files["vqa_train"], "vqa", world.root).records:
        kind = next(k for k, qs in dataset.QUESTIONS.items() if r.src in qs)
        assert r.rephrase in dataset.QUESTIONS[kind]
        assert {r.pred, r.alt} <= values[kind]
        m_kind = next(k for k, qs in dataset.QUESTIONS.items() if r.m_loc_q in qs)
        assert r.m_loc_a in values[m_kind]


def test_image_rephrase_shows_the_same_colour(world):
    """The rephrase image is redrawn (other pixels) but shows the same scene: its dominant saturated colour is
    the record's colour when the question asks for it."""
    palette = {k: np.asarray(v, float) for k, v in scenes.COLORS.items()}
    for r in load_mmedit(world.files["vqa_eval"], "vqa", world.root).records:
        a, b = (np.asarray(Image.open(p), float) for p in (r.image, r.image_rephrase))
        assert np.abs(a - b).mean() > 1.0
        if r.src in dataset.QUESTIONS["color"]:
            for img in (a, b):
                px = img.reshape(-1, 3)
                near = {k: (np.linalg.norm(px - c, axis=1) < 60).sum() for k, c in palette.items()}
                assert max(near, key=near.get) == r.pred


def test_facts_are_consistent_and_distinct():
    fs = facts.encyclopaedia()
    assert len(fs) == 2 * facts.NUM_COUNTRIES
    assert len({f.question for f in fs}) == len(fs) and len({f.answer for f in fs}) == len(fs)
    assert fs == facts.encyclopaedia()


def test_pretraining_stream_is_deterministic_and_covers_every_kind():
    a = [dataset.pretraining_stream(0, 32).__next__() for _ in range(1)]
    s1, s2 = dataset.pretraining_stream(5, 32), dataset.pretraining_stream(5, 32)
    xs, ys = [next(s1) for _ in range(60)], [next(s2) for _ in range(60)]
    assert [(x.prompt, x.target) for x in xs] == [(y.prompt, y.target) for y in ys]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(xs, ys) if x.image is not None)
    kinds = {"fact" if x.image is None else "caption" if x.prompt in dataset.CAPTION_PROMPTS else "vqa" for x in xs}
    assert kinds == {"fact", "caption", "vqa"} and a


def test_pretrain_writes_a_loadable_model(world, tmp_path):
    from transformers import AutoTokenizer

    from mmedit_jax.loading import from_pretrained
    from mmedit_jax.world.pretrain import pretrain

    report = pretrain(str(tmp_path), steps=3, batch_size=4, eval_files=[world.files["vqa_eval"]],
                      image_root=world.root, log_every=1, size="test")
    assert set(report["accuracy"]) and all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    model = from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.image_token_index == tok.convert_tokens_to_ids("<image>")
    assert model.config.text.vocab_size == len(tok)


def test_assets_lookup(tmp_path):
    with pytest.raises(FileNotFoundError, match="world.build"):
        assets.ensure(assets=str(tmp_path / "none"), cache_dir=str(tmp_path / "cache"))
    (tmp_path / "shipped" / "model").mkdir(parents=True)
    (tmp_path / "shipped" / "mend_vqa").mkdir()
    w = assets.ensure(assets=str(tmp_path / "shipped"), cache_dir=str(tmp_path / "cache"))
    assert w.editor_ckpts == {"mend": str(tmp_path / "shipped" / "mend_vqa")}
    assert os.path.exists(w.eval_json) and os.path.exists(os.path.join(w.data_dir, "COMPLETE"))
    assert w.model_dir == w.tokenizer_dir == str(tmp_path / "shipped" / "model")  # one model for every editor


def test_counts_are_visible_in_the_pixels(tmp_path):
    """Every caption image shows exactly `count` separate blobs of the caption's colour (objects never touch,
    so count answers are never ambiguous)."""
    measure = pytest.importorskip("skimage.measure")
    w = dataset.write_world(str(tmp_path), seed=7, n_train=80, n_eval=8, tasks=("caption",))
    for r in load_mmedit(w.files["caption_train"], "caption", w.root).records:
        n, color, _ = r.pred.split()
        for path in (r.image, r.image_rephrase):
            px = np.asarray(Image.open(path), float)
            mask = np.linalg.norm(px - np.asarray(scenes.COLORS[color], float), axis=-1) < 60
            sizes = np.bincount(measure.label(mask, connectivity=1).ravel())[1:]
            assert (sizes >= 4).sum() == scenes.COUNTS.index(n) + 1, (r.pred, path)


def test_build_stages_the_model_and_each_editor(tmp_path, monkeypatch):
    """`world.build`: the model's second pretraining stage starts from the first's, every editor is meta-trained
    on that model; a later stage (`E_world_finetune.yaml`, `..._finetune2.yaml`, where they exist) warm-starts
    from the stage before's editor, and finished stages are skipped on a rerun."""
    from mmedit_jax.world import build

    calls = []

    def fake_train(editor, config, model_dir, out, task, seed, init):
        calls.append((editor, os.path.basename(config), os.path.basename(out), init))
        assert model_dir == str(work / "pretrain_more" / "model")
        os.makedirs(os.path.join(out, "editor"))

    pretrained = []

    def fake_pretrain(out_dir, seed, steps, **kw):
        pretrained.append((os.path.basename(out_dir), kw.get("init"), kw.get("random_targets")))
        os.makedirs(os.path.join(out_dir, "model"))

    monkeypatch.setattr(build, "train_editor", fake_train)
    monkeypatch.setattr(build, "pretrain", fake_pretrain)
    monkeypatch.setattr(build.assets, "ensure_data", lambda *a, **k: str(tmp_path))
    work = tmp_path / "work"
    os.makedirs(work / "pretrain" / "model")
    build.main(["--work", str(work), "--editors", "mend,ke"])
    # the second stage: trained further from the first stage's model, on the same mixture; once.
    assert pretrained == [("pretrain_more", str(work / "pretrain" / "model"), 0.0)]
    want = [("mend", "mend_world.yaml", "mend_vqa", None),
            ("mend", "mend_world_finetune.yaml", "mend_vqa_finetune", str(work / "mend_vqa" / "editor")),
            ("mend", "mend_world_finetune2.yaml", "mend_vqa_finetune2", str(work / "mend_vqa_finetune" / "editor")),
            ("ke", "ke_world.yaml", "ke_vqa", None)]
    assert calls == want
    build.main(["--work", str(work), "--editors", "mend,ke"])
    assert len(calls) == len(want) and len(pretrained) == 1  # everything DONE: nothing retrained
    # SERAC has four stages, each warm-started from the one before
    del calls[:]
    build.main(["--work", str(work), "--editors", "serac"])
    runs = ["serac_vqa", "serac_vqa_finetune", "serac_vqa_finetune2", "serac_vqa_finetune3"]
    assert calls == [("serac", f"serac_world{run[9:]}.yaml", run, None if i == 0 else
                      os.path.join(str(work), runs[i - 1], "editor")) for i, run in enumerate(runs)]
    # --install: the second stage's model with its report, and each editor's last stage
    monkeypatch.setitem(build.assets.ASSETS_OF, "blip2", str(tmp_path / "assets"))  # never the shipped ones
    (work / "pretrain_more" / "model" / "marker").write_text("second stage")
    (work / "pretrain_more" / "pretrain_report.json").write_text("{}")
    (work / "mend_vqa_finetune2" / "editor" / "marker").write_text("stage 3")
    build.main(["--work", str(work), "--editors", "mend", "--install"])
    assert sorted(os.listdir(tmp_path / "assets")) == ["mend_vqa", "model", "pretrain_report.json"]
    assert (tmp_path / "assets" / "model" / "marker").read_text() == "second stage"
    assert (tmp_path / "assets" / "mend_vqa" / "marker").read_text() == "stage 3"


def test_in_context_stream_is_ike_shaped():
    """IKE-shaped pretraining examples: 0..max_demos demos, the own copy demo and the "New Fact" line, then an
    in-scope input answered with the new fact or an out-of-scope one answered truthfully."""
    xs = [next(s) for s in [dataset.in_context_stream(3, 32, max_demos=2)] for _ in range(200)]
    ys = [next(s) for s in [dataset.in_context_stream(3, 32, max_demos=2)] for _ in range(200)]
    assert [(x.context, x.prompt, x.target) for x in xs] == [(y.context, y.prompt, y.target) for y in ys]
    facts_q = {f.question: f.answer for f in facts.encyclopaedia()}
    attribute_of = {w: a for a, ws in (("color", scenes.COLORS), ("shape", scenes.SHAPES), ("count", scenes.COUNTS))
                    for w in ws}
    seen = set()
    for x in xs:
        assert x.context.endswith("\nPrompt: ")
        *demos, fact = x.context.split("\n\n")
        assert 1 <= len(demos) <= 3 and all(d.startswith("New Fact: ") and "\nPrompt: " in d for d in demos)
        stated = fact[len("New Fact: "):-len("\nPrompt: ")]  # "{p} {t}"
        assert demos[-1] + "\n\n" == f"New Fact: {stated}\nPrompt: {stated}\n\n"  # the own copy demo
        if x.image is None:
            seen.add("loc")
            assert facts_q[x.prompt] == x.target.strip()
        elif stated.endswith(x.target):
            seen.add("in scope")
            assert x.prompt in dataset.CAPTION_PROMPTS or x.prompt.startswith("Question: ")
        else:
            seen.add("m_loc")
            assert x.prompt.startswith("Question: ")
            if "Short answer:" in stated:  # E-VQA: another attribute than the edited one
                assert attribute_of[stated.split()[-1]] != attribute_of[x.target.strip()]
    assert seen == {"loc", "in scope", "m_loc"}


def test_in_context_stream_random_targets():
    """With `p_random_target`, about that share of stated facts (demos' and the edit's) carry an answer no question
    implies (another attribute's word, a fact's answer or a made-up word), and an in-scope input is answered with
    the stated answer all the same; with 0 the stream is the one without the switch."""
    plain = dataset.in_context_stream(4, 8, max_demos=2)
    zero = dataset.in_context_stream(4, 8, max_demos=2, p_random_target=0.0)
    assert [next(plain).context for _ in range(50)] == [next(zero).context for _ in range(50)]
    stream = dataset.in_context_stream(4, 8, max_demos=2, p_random_target=0.5)
    values = {"Question: What color": scenes.COLORS, "Question: Which color": scenes.COLORS,
              "Question: What is the color": scenes.COLORS, "Question: What shape": scenes.SHAPES,
              "Question: Which shape": scenes.SHAPES, "Question: What kind of shape": scenes.SHAPES,
              "Question: How many": scenes.COUNTS, "Question: What is the number": scenes.COUNTS}
    stated, off_attribute, in_scope = 0, 0, 0
    for _ in range(400):
        x = next(stream)
        for line in x.context.split("\n"):
            if line.startswith("New Fact: Question: "):
                (lead,) = [k for k in values if line[len("New Fact: "):].startswith(k)]
                stated += 1
                off_attribute += line.split()[-1] not in values[lead]
        fact = x.context.split("\n\n")[-1][len("New Fact: "):-len("\nPrompt: ")]
        if x.image is not None and fact.endswith(x.target) and x.prompt.startswith("Question: "):
            in_scope += 1
    assert in_scope > 50
    # Half the facts are random; a random one is off its attribute's values unless it drew a word of it.
    assert 0.25 < off_attribute / stated < 0.5, (off_attribute, stated)


def test_in_context_examples_encode_as_ike_reads_them():
    """The pretraining layout is IKE's (`editors.ike.join_context`): image slots, the context, then the input; the
    labels are the answer's tokens only."""
    from mmedit_jax.world import pretrain

    tok = pretrain.build_tokenizer(None, in_context=True)
    assert tok.tokenize("New Fact:") == ["New", "ĠFact", ":"]
    config = pretrain.world_config(tok, size="test", max_positions=pretrain.IN_CONTEXT_POSITIONS)
    stream = dataset.in_context_stream(1, 32)
    exs = [next(stream) for _ in range(16)]
    pixels, ids, mask, labels = pretrain.encode_examples(exs, tok, config, 32)
    assert ids.shape == (16, pretrain.SEQ_LEN + pretrain.CONTEXT_LEN) and pixels.shape == (16, 3, 32, 32)
    for ex, row, m, lab in zip(exs, ids, mask, labels):
        slots = config.num_query_tokens if ex.image is not None else 0
        assert (row[:slots] == config.image_token_index).all()
        assert tok.decode(row[slots:][m[slots:] == 1]) == ex.context + ex.prompt + ex.target
        assert tok.decode(lab[lab != -100]) == ex.target


def test_pretrain_in_context_reports_ike_accuracy(world, tmp_path):
    from mmedit_jax.loading import from_pretrained
    from mmedit_jax.world.pretrain import IN_CONTEXT_POSITIONS, pretrain

    with open(world.files["vqa_eval"]) as f:  # 8 records are enough to exercise the report (one batch each)
        few = json.load(f)[:8]
    (tmp_path / "vqa_eval.json").write_text(json.dumps(few))
    report = pretrain(str(tmp_path), steps=2, batch_size=4, eval_files=[str(tmp_path / "vqa_eval.json")],
                      image_root=world.root, log_every=1, size="test", in_context_batch=2)
    assert report["max_positions"] == IN_CONTEXT_POSITIONS and report["in_context_batch"] == 2
    in_context = [k for k in report["accuracy"] if "in context" in k]
    assert len(in_context) == 5 and all(0.0 <= report["accuracy"][k] <= 1.0 for k in in_context)
    first = from_pretrained(tmp_path / "model")
    assert first.config.text.max_position_embeddings == IN_CONTEXT_POSITIONS
    # Trained further (`init`): the same config and tokenizer, other weights.
    pretrain(str(tmp_path / "more"), seed=1, steps=1, batch_size=4, log_every=1, in_context_batch=2,
             init=str(tmp_path / "model"))
    more = from_pretrained(tmp_path / "more" / "model")
    assert more.config == first.config
    assert (tmp_path / "more" / "model" / "tokenizer.json").read_text() == (
        tmp_path / "model" / "tokenizer.json").read_text()
    assert not np.array_equal(np.asarray(more.params["language_model"]["embed_tokens"]["embedding"]),
                              np.asarray(first.params["language_model"]["embed_tokens"]["embedding"]))


def test_build_warm_starts_from_its_own_editors(tmp_path):
    from mmedit_jax.world import build

    assert build.own_build_of("mmedit_jax/assets/world/ke_vqa", str(tmp_path)) is None
    for suffix in ("", "_finetune"):
        (tmp_path / f"ke_vqa{suffix}" / "editor").mkdir(parents=True)
    (tmp_path / "ke_vqa" / "DONE").touch()
    assert build.own_build_of("mmedit_jax/assets/world/ke_vqa", str(tmp_path)) == str(tmp_path / "ke_vqa" / "editor")
    (tmp_path / "ke_vqa_finetune" / "DONE").touch()
    assert build.own_build_of("mmedit_jax/assets/world/ke_vqa/", str(tmp_path)) == str(
        tmp_path / "ke_vqa_finetune" / "editor")
