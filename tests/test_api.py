"""The three-line API (`mmedit_jax/api.py`, `edit_patch.py`) on the shipped world model and its editors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import mmedit_jax as mj
from mmedit_jax import pipeline
from mmedit_jax.data.image import load_image
from mmedit_jax.patch import Dense, LowRank
from mmedit_jax.world import assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world():
    w = assets.ensure()
    with open(w.eval_json) as f:
        records = json.load(f)
    for r in records:
        for k in ("image", "m_loc"):
            r[k] = os.path.join(w.image_root, r[k])
    model = mj.from_pretrained("world")
    return model, mj.load_editor("mend", model), records


def test_import_is_cheap():
    code = "import sys, mmedit_jax as mj; assert 'jax' not in sys.modules; print(callable(mj.load_editor))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_the_snippet_as_written(world, tmp_path):
    _, _, records = world
    r = next(r for r in records if r["src"] == "What color are the shapes?" and r["pred"] != "purple")
    image = r["image"]

    import mmedit_jax as mj

    model = mj.from_pretrained("world")
    editor = mj.load_editor("mend", model)
    patch = editor.edit(image, "What color are the shapes?", "purple")
    before = model.answer(image, "What color are the shapes?")
    after = model.answer(image, "What color are the shapes?", patch=patch)
    assert isinstance(before, str) and before == r["pred"] != "purple"
    assert after == "purple"
    assert model.answer(image, "What color are the shapes?") == before  # the model itself is unchanged

    images, prompts, targets = [image, records[0]["image"]], ["What color are the shapes?", records[0]["src"]], \
        ["purple", records[0]["alt"]]
    patches = editor.edit_batch(images, prompts, targets)
    assert len(patches) == 2 and model.answer(image, prompts[0], patch=patches[0]) == "purple"
    mj.save_patch(patch, tmp_path / "edit.safetensors")
    patch = mj.load_patch(tmp_path / "edit.safetensors")
    assert model.answer(image, "What color are the shapes?", patch=patch) == "purple"


def test_from_pretrained_keeps_the_model_interface(world):
    model, _, records = world
    from mmedit_jax.models.blip2 import Blip2Model

    assert isinstance(model, Blip2Model) and model.name == "world" and model.is_world
    assert mj.from_pretrained("world")._generate is model._generate  # a reload reuses the compiled programs
    ids = np.asarray([model.prompt_ids(records[0]["src"], True)])
    pixels = model.pixels(records[0]["image"])[None]
    logits = model(pixels, ids, np.ones_like(ids))
    assert logits.shape == (*ids.shape, model.config.text.vocab_size)
    new = model.generate(pixels, ids, max_new_tokens=3)
    assert new.shape == (1, 3)
    assert model.tokenizer.decode(new[0, :1]).strip() == model.answer(records[0]["image"], records[0]["src"])


def test_a_hugging_face_directory_of_the_same_weights_takes_the_same_patches(world, tmp_path):
    """The world model written as a Hugging Face directory (no torch: its state dict as safetensors) loads through
    the same `from_pretrained`; same config and weights, so the same fingerprint, and a patch made on the shipped
    model applies to it. It is not the shipped world by path: its answers are not cut to one word by default."""
    import shutil

    from safetensors.numpy import save_file

    from mmedit_jax.convert.export_hf import hf_config_dict, state_dict

    model, editor, records = world
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict(model.config, model.params).items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**hf_config_dict(model.config), "model_type": "blip-2"}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(assets.ASSETS, "model", f), tmp_path)
    hf = mj.from_pretrained(str(tmp_path))
    assert hf.name == str(tmp_path) and not hf.is_world and hf.fingerprint == model.fingerprint
    r = records[1]
    patch = editor.edit(r["image"], r["src"], r["alt"])
    assert hf.answer(r["image"], r["src"], patch=patch, max_words=1) == r["alt"]
    assert hf.answer(r["image"], r["src"]).split()[0] == model.answer(r["image"], r["src"])


def test_answer_uses_the_benchmarks_prompt_and_pixels(world):
    """The prompt ids are the benchmark's edit input up to its answer; the pixels are `load_image`'s."""
    model, _, records = world
    from mmedit_jax.data.mmedit import load_mmedit

    w = assets.ensure()
    rec = load_mmedit(w.eval_json, "vqa", w.image_root, size=2).records
    prepared = pipeline.prepare_data(rec, model.tokenizer, model, "vqa")
    for i, r in enumerate(rec):
        labels = prepared.batch.edit.labels[i]
        prompt_len = int(np.argmax(labels != -100))
        assert model.prompt_ids(r.src, True) == prepared.batch.edit.input_ids[i, :prompt_len].tolist()
        np.testing.assert_array_equal(model.pixels(r.image), prepared.pixels[prepared.batch.edit.image_ids[i]])
    assert model.prompt_ids("x", False)[0] != model.config.image_token_index  # text only: no image slots


def test_image_kinds_give_the_same_pixels(world):
    model, _, records = world
    path = records[0]["image"]
    want = load_image(path, model.image_size)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(model.pixels(im), want)
    np.testing.assert_array_equal(model.pixels(rgb), want)
    np.testing.assert_array_equal(model.pixels(rgb / 255.0), want)
    np.testing.assert_array_equal(model.pixels(want), want)
    with pytest.raises(ValueError, match="values in"):
        model.pixels(rgb.astype(np.float32))


def test_text_only_answer_is_the_language_model_alone(world):
    """The world model knows its encyclopaedia facts; asked as the benchmark's text-only `loc` input."""
    model, _, records = world
    got = [model.answer(None, r["loc"], template="{}") for r in records[:4]]
    assert got == [r["loc_ans"] for r in records[:4]]


def test_batch_answers_equal_single_answers(world):
    model, editor, records = world
    images = [records[0]["image"], None, records[1]["image"]]
    questions = [records[0]["src"], records[0]["loc"], records[1]["src"]]
    single = [model.answer(im, q, template="{}" if im is None else None) for im, q in zip(images, questions)]
    batch = model.answer(images[::2], questions[::2])
    assert batch == single[::2]
    assert model.answer([None], [questions[1]], template="{}") == [single[1]]
    mixed = model.answer(images, questions)  # text-only rows are asked separately (no image slots)
    assert mixed[::2] == single[::2]


def test_edit_batch_equals_edit_and_per_row_answers(world):
    model, editor, records = world
    rs = records[4:7]
    images, prompts, targets = [r["image"] for r in rs], [r["src"] for r in rs], [r["alt"] for r in rs]
    batch = editor.edit_batch(images, prompts, targets)
    assert len(batch) == 3 and [p.edits for p in batch] == [((p, t),) for p, t in zip(prompts, targets)]
    for i, r in enumerate(rs):
        one = editor.edit(r["image"], r["src"], r["alt"])
        assert sorted(one) == sorted(batch[i])
        for site in one:
            # A batch of 3 and a batch of 1 reduce in different orders: float32 rounding of the largest entries
            # (|delta| up to about 0.4) is about 1e-6 of them, so the tolerance is scaled to the patch's size.
            want = np.asarray(one[site].dense())
            np.testing.assert_allclose(np.asarray(batch[i][site].dense()), want, rtol=1e-4,
                                       atol=1e-5 * np.abs(want).max())
    per_row = model.answer(images, prompts, patch=batch)
    assert per_row == [model.answer(im, q, patch=p) for im, q, p in zip(images, prompts, batch)]
    with pytest.raises(ValueError, match="one edit per question"):
        model.answer(images[:2], prompts[:2], patch=batch)


def test_compiles_stay_few_over_edits_of_different_lengths(world):
    model, editor, records = world
    long_q = "Looking closely at every one of the shapes drawn in this picture, which colour do they all have?"
    cases = [(r["image"], r["src"], r["alt"]) for r in records[8:14]] + [(records[14]["image"], long_q, "red"),
                                                                       (records[15]["image"], long_q + " x", "blue")]
    assert len({len(model.prompt_ids(q, True)) for _, q, _ in cases}) >= 4  # really different lengths
    edits0, gen0 = editor.compiles, model._generate._cache_size()
    for image, q, t in cases:
        model.answer(image, q, patch=editor.edit(image, q, t))
    assert editor.compiles - edits0 <= 2, editor.compiles - edits0  # buckets: 32 and 48 tokens at most
    assert model._generate._cache_size() - gen0 <= 3


def test_save_load_round_trip_and_refusal_on_another_model(world, tmp_path):
    model, editor, records = world
    r = records[2]
    patch = editor.edit(r["image"], r["src"], r["alt"])
    path = mj.save_patch(patch, tmp_path / "p.safetensors")
    loaded = mj.load_patch(path, model)
    assert isinstance(loaded, mj.EditPatch) and list(loaded) == list(patch)
    assert (loaded.editor, loaded.model, loaded.model_name, loaded.edits) == \
        ("mend", model.fingerprint, "world", ((r["src"], r["alt"]),))
    for site in patch:
        assert type(loaded[site]) is type(patch[site]) is LowRank
        for f in ("a", "b", "scale"):
            a, b = getattr(loaded[site], f), getattr(patch[site], f)
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    batch = editor.edit_batch([r["image"]] * 2, [r["src"]] * 2, [r["alt"], r["pred"]])
    again = mj.load_patch(mj.save_patch(batch, tmp_path / "b.safetensors"))
    assert isinstance(again, mj.PatchBatch) and len(again) == 2 and again.edits == batch.edits
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), again.stacked,
                 batch.stacked)

    # Another model: the world model with one weight changed.
    lm = dict(model.params["language_model"])
    lm["final_layer_norm"] = {**lm["final_layer_norm"], "scale": lm["final_layer_norm"]["scale"].at[5].add(1e-3)}
    params = {**model.params, "language_model": lm}
    other = mj.Model(model.config, params, name="world, one weight changed", tokenizer=model.tokenizer)
    assert other.fingerprint != model.fingerprint
    with pytest.raises(mj.PatchMismatch, match=r"'world'.*'world, one weight changed'"):
        other.answer(r["image"], r["src"], patch=loaded)
    with pytest.raises(mj.PatchMismatch):
        mj.load_patch(path, other)
    with pytest.raises(mj.PatchMismatch):
        other(model.pixels(r["image"])[None], np.asarray([model.prompt_ids(r["src"], True)]), patch=loaded)
    with pytest.raises(mj.PatchMismatch, match="does not have"):
        model.answer(r["image"], r["src"], patch={"language_model/layers/9/fc1": loaded[next(iter(loaded))]})
    with pytest.raises(mj.PatchMismatch, match="cannot compose"):
        mj.compose(loaded, mj.EditPatch(dict(loaded), editor="mend", model=other.fingerprint, model_name="x"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a patch")
    with pytest.raises(ValueError, match="junk.safetensors"):
        mj.load_patch(tmp_path / "junk.safetensors")


def test_compose_is_the_sum_and_two_mend_edits_both_hold(world):
    """Two MEND edits on different images and questions, composed: the deltas add up exactly, and for some pair of
    the first eight records both targets come out. Over the eval split both hold in 38 of 64 pairs and one in 23
    (summed MEND edits interfere; benchmarks/api_world.json)."""
    model, editor, records = world
    a, b = records[0], records[1]
    pa, pb = editor.edit(a["image"], a["src"], a["alt"]), editor.edit(b["image"], b["src"], b["alt"])
    both = mj.compose(pa, pb)
    assert both.editor == "mend" and both.edits == pa.edits + pb.edits and both.model == model.fingerprint
    for site in pa:
        assert both[site].rank == pa[site].rank + pb[site].rank
        # One product of the concatenated factors vs two products summed: float32 rounding differs by about
        # 1e-6 of the largest entry, so the absolute tolerance is scaled to it (atol=1e-7 failed 1 of 65,536).
        want = np.asarray(pa[site].dense() + pb[site].dense())
        np.testing.assert_allclose(np.asarray(both[site].dense()), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    held = model.answer([a["image"], b["image"]], [a["src"], b["src"]], patch=both) == [a["alt"], b["alt"]]
    for a2, b2 in zip(records[2:8:2], records[3:8:2]):
        pair = mj.compose(*(editor.edit(r["image"], r["src"], r["alt"]) for r in (a2, b2)))
        held += model.answer([a2["image"], b2["image"]], [a2["src"], b2["src"]], patch=pair) == [a2["alt"], b2["alt"]]
    assert held >= 1, "no composed pair of the first eight records kept both targets"
    dense = mj.compose({s: Dense(d.dense()) for s, d in pa.items()}, pb)  # mixed kinds: dense sum
    site = next(iter(pa))
    want = np.asarray(both[site].dense())
    np.testing.assert_allclose(np.asarray(dense[site].delta), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("name", ["ft-l", "ft-v", "ke", "mend"])
def test_every_editor_edits_through_the_api(world, name):
    model, mend, records = world
    editor = mend if name == "mend" else mj.load_editor(name, model)
    r = records[1]
    patch = editor.edit(r["image"], r["src"], r["alt"])
    assert isinstance(patch, mj.EditPatch) and patch.editor == name and patch.model == model.fingerprint
    kind = Dense if name.startswith("ft") else LowRank
    assert patch and all(isinstance(d, kind) for d in patch.values())
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(patch))
    if name == "ft-v":
        assert all(s.startswith("qformer/") for s in patch)
    ids = np.asarray([model.prompt_ids(r["src"], True)])
    pixels = model.pixels(r["image"])[None]
    before, after = np.asarray(model(pixels, ids)), np.asarray(model(pixels, ids, patch=patch))
    assert np.abs(after[0, -1] - before[0, -1]).max() > 1e-3  # the answer's logits move


def test_load_editor_errors(world):
    model, _, _ = world
    with pytest.raises(ValueError, match="unknown editor 'rome'"):
        mj.load_editor("rome", model)
    stranger = mj.Model(model.config, model.params, name="my model", tokenizer=model.tokenizer)
    with pytest.raises(ValueError, match="needs a trained editor: pass path="):
        mj.load_editor("mend", stranger)
    with pytest.raises(TypeError, match="from_pretrained"):
        mj.load_editor("ft-l", pipeline.from_pretrained(os.path.join(assets.ASSETS, "model")))


def test_quickstart_example_runs(world):
    model, editor, _ = world
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import quickstart
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    lines = []
    rows = quickstart.main(model=model, editor=editor, out=lines.append)
    assert [r["after"] for r in rows] == [t for _, t in quickstart.EDITS]
    assert all(r["before"] != r["target"] for r in rows)
    assert lines[-2] == f"edit_batch: {[t for _, t in quickstart.EDITS]}"
    assert lines[-1].startswith("from edit.safetensors: 'purple'")


def test_ike_through_the_api_is_its_context(world, tmp_path):
    """IKE's edit is a context, not weights: the retrieved demos, the edit's own copy demo and the "New Fact" line
    (EasyEdit's strings); answering under it runs the model on image ‖ context ‖ question; a batch holds one
    context per edit; weight-patch paths (the forward, compose, save_patch) and another model refuse it."""
    import re

    from mmedit_jax.data.cases import VQA_TEMPLATE
    from mmedit_jax.editors import ike

    model, _, records = world
    editor = mj.load_editor("ike", model, hparams={"k": 2})
    a, b = records[2], records[5]
    patch = editor.edit(a["image"], a["src"], a["alt"])
    assert isinstance(patch, mj.ContextPatch) and patch.model == model.fingerprint and patch.editor == "ike"
    p = VQA_TEMPLATE.format(a["src"])
    assert patch.text.endswith(ike.demo(p, a["alt"], p, a["alt"]) + ike.fact_line(p, a["alt"]))
    kept = float(re.search(r"kept ([\d.]+) on average", editor.log[-1]).group(1))
    assert patch.text.count("New Fact: ") == 2 + kept and model.tokenizer.decode(list(patch.ids)) == patch.text
    # The question after the image block and the context, as the benchmark's in-context forward joins them.
    ids = model.prompt_ids(a["src"], True, context=patch.ids)
    block = len(model.case_config().image_block)
    assert ids[:block] == model.prompt_ids(a["src"], True)[:block] and ids[block:block + len(patch.ids)] == list(
        patch.ids) and ids[block + len(patch.ids):] == model.prompt_ids(a["src"], False)
    logits = np.asarray(model(model.pixels(a["image"])[None], np.asarray([ids])))
    first = model.tokenizer.decode([int(logits[0, -1].argmax())]).strip()
    answer = model.answer(a["image"], a["src"], patch=patch)
    assert answer.startswith(first)
    assert model.answer(None, a["loc"], patch=patch, task="vqa", template="{}") is not None
    batch = editor.edit_batch([a["image"], b["image"]], [a["src"], b["src"]], [a["alt"], b["alt"]])
    assert isinstance(batch, mj.ContextBatch) and batch[0] == patch and batch[1].edits == ((b["src"], b["alt"]),)
    assert model.answer([a["image"], b["image"]], [a["src"], b["src"]], patch=batch) == [
        answer, model.answer(b["image"], b["src"], patch=batch[1])]
    with pytest.raises(TypeError, match="model.answer"):
        model(model.pixels(a["image"])[None], np.asarray([ids]), patch=patch)
    with pytest.raises(TypeError, match="do not compose"):
        mj.compose(patch, batch[1])
    with pytest.raises(TypeError, match="in-context edit"):
        mj.save_patch(patch, tmp_path / "ike.safetensors")
    with pytest.raises(ValueError, match="2 edits for 1 questions"):
        model.answer(a["image"], [a["src"]], patch=batch)
    import dataclasses

    with pytest.raises(mj.PatchMismatch, match="other model's tokens"):
        model.answer(a["image"], a["src"], patch=dataclasses.replace(patch, model="0" * 64))
    stranger = mj.Model(model.config, model.params, name="my model", tokenizer=model.tokenizer)
    with pytest.raises(ValueError, match="demonstration bank"):
        mj.load_editor("ike", stranger)


def test_serac_through_the_api_routes_through_its_memory(world):
    """SERAC's edit is a memory (one slot), the networks stay with the editor; answering under it is greedy
    decoding of SERAC's routed output, token by token equal to the argmax of `SeracFns.logits` on the prompt and
    the tokens so far; memories compose into one; weight-patch paths refuse them."""
    from mmedit_jax.case import Seq
    from mmedit_jax.editors.serac import with_memory

    model, _, records = world
    editor = mj.load_editor("serac", model)
    a, b = records[3], records[7]
    patch = editor.edit(a["image"], a["src"], a["alt"])
    assert isinstance(patch, mj.MemoryPatch) and patch.model == model.fingerprint
    assert patch.memory.valid.shape == (1,) and patch.router[1] is editor.editor.editor_params
    answer = model.answer(a["image"], a["src"], patch=patch, max_words=0, max_new_tokens=4)
    # The same greedy loop, by hand: the routed forward on the prompt and the tokens so far (generated tokens
    # labelled as answer), one compiled program at a fixed, right-padded length.
    fns, net = patch.router
    prompt = model.prompt_ids(a["src"], True)
    routed = jax.jit(lambda ids, mask, labels, px: fns.logits(model.params, with_memory(net, patch.memory),
                                                              Seq(ids, mask, labels),
                                                              fns.encode(model.params, {}, px[None])[0]))
    length = len(prompt) + 4
    ids, mask, labels = np.zeros(length, np.int32), np.zeros(length, np.int32), np.full(length, -100, np.int32)
    ids[: len(prompt)], mask[: len(prompt)] = prompt, 1
    pixels = jnp.asarray(model.pixels(a["image"]))
    for n in range(len(prompt), length):
        token = int(jnp.argmax(routed(ids, mask, labels, pixels)[n - 1]))
        ids[n], mask[n], labels[n] = token, 1, token
    assert answer == model.decode_answer(ids[len(prompt):])
    batch = editor.edit_batch([a["image"], b["image"]], [a["src"], b["src"]], [a["alt"], b["alt"]])
    assert isinstance(batch, mj.MemoryBatch) and len(batch) == 2
    np.testing.assert_allclose(np.asarray(batch[0].memory.keys), np.asarray(patch.memory.keys), rtol=1e-5, atol=1e-6)
    ask = lambda q, p: model.answer(q[0], q[1], patch=p, max_new_tokens=4)  # noqa: E731
    assert ask(([a["image"], b["image"]], [a["src"], b["src"]]), batch) == [
        ask((a["image"], a["src"]), batch[0]), ask((b["image"], b["src"]), batch[1])]
    both = mj.compose(batch[0], batch[1])  # one memory, two slots
    assert both.memory.valid.shape == (2,) and both.edits == ((a["src"], a["alt"]), (b["src"], b["alt"]))
    assert len(ask(([a["image"], b["image"]], [a["src"], b["src"]]), both)) == 2
    with pytest.raises(TypeError, match="model.answer"):
        model(model.pixels(a["image"])[None], np.asarray([model.prompt_ids(a["src"], True)]), patch=patch)
    with pytest.raises(TypeError, match="composes only with other SERAC memories"):
        mj.compose(patch, mj.EditPatch({}))
    with pytest.raises(TypeError, match="SERAC edit is a memory"):
        mj.save_patch(patch, "unused.safetensors")


def test_ike_on_the_world_model_gives_the_new_answers(world):
    """IKE on the world model (the one the other shipped editors were meta-trained on; its bank is the world's
    train split): it answers the new fact for every edit of a batch, where the unedited model does not."""
    _, _, records = world
    model = mj.from_pretrained("world")
    assert model.is_world
    assert model.config.text.max_position_embeddings == 192
    editor = mj.load_editor("ike", model, hparams={"k": 2})
    recs = [r for r in records if r["alt"] != r["pred"]][:4]
    images, questions, targets = [r["image"] for r in recs], [r["src"] for r in recs], [r["alt"] for r in recs]
    batch = editor.edit_batch(images, questions, targets)
    assert model.answer(images, questions, patch=batch) == targets
    assert model.answer(images, questions) != targets
