"""MMEdit loader, synthetic dataset, BPE tokenizer and the teacher-forced case arrays."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import transformers
from PIL import Image

from mmedit_jax.case import INPUT_NAMES
from mmedit_jax.data import cases as C
from mmedit_jax.data.mmedit import ALL_FIELDS, SKIP_DIRTY, SKIP_EMPTY_ALT, DataError, load_mmedit
from mmedit_jax.data.synthetic import write_synthetic_mmedit
from mmedit_jax.data.tokenizer import image_token_id, train_bpe_tokenizer

NQ = 4  # query tokens in these tests


def _pil_preprocess(path, size=8):
    """A tiny stand-in for mmedit_jax.data.image.load_image: float32 [3, S, S]."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB").resize((size, size)), np.float32) / 255.0
    return arr.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return write_synthetic_mmedit(tmp_path_factory.mktemp("vqa"), "vqa", n_records=8, seed=0)


@pytest.fixture(scope="module")
def caption(tmp_path_factory):
    return write_synthetic_mmedit(tmp_path_factory.mktemp("cap"), "caption", n_records=5, seed=1)


@pytest.fixture(scope="module")
def tok(vqa, caption, tmp_path_factory):
    texts = []
    for paths, task in ((vqa, "vqa"), (caption, "caption")):
        for rec in load_mmedit(paths.json_path, task, paths.image_root).records:
            texts += [x.text for x in C.case_inputs(rec, task).values()]
            texts.append(rec.cond)
    out = tmp_path_factory.mktemp("tok")
    return train_bpe_tokenizer(texts, vocab_size=400, out_dir=out), out


def _config(tok, task, **kw):
    return C.CaseConfig(task=task, num_query_tokens=NQ, image_token_id=image_token_id(tok), **kw)


def _copy_dataset(paths, tmp_path, edit):
    """A copy of a synthetic dataset whose JSON list is passed through `edit`."""
    root = tmp_path / "data"
    shutil.copytree(paths.image_root, root)
    json_path = root / os.path.relpath(paths.json_path, paths.image_root)
    with open(json_path) as f:
        raw = json.load(f)
    raw = edit(raw)
    with open(json_path, "w") as f:
        json.dump(raw, f)
    return str(json_path), str(root)


# ---------------- synthetic data + loader ----------------

def test_synthetic_round_trip_and_layout(vqa):
    with open(vqa.json_path) as f:
        raw = json.load(f)
    assert vqa.json_path.endswith(os.path.join("editing-data", "vqa", "vqa_eval.json"))
    res = load_mmedit(vqa.json_path, "vqa", vqa.image_root)
    assert res.n_in_file == res.n_read == len(res.records) == 8
    assert not res.problems and not res.rejected and res.n_skipped == 0
    for i, (rec, r) in enumerate(zip(res.records, raw)):
        assert set(r) == set(ALL_FIELDS)
        assert rec.index == i
        assert (rec.src, rec.pred, rec.alt, rec.rephrase) == (r["src"], r["pred"], r["alt"], r["rephrase"])
        for field in ("loc", "loc_ans", "m_loc_q", "m_loc_a"):
            assert getattr(rec, field) == r[field]
        assert r["image"].startswith("val2014/COCO_val2014_") and r["image"].endswith(".jpg")
        assert r["image_rephrase"].startswith("val2014_image_rephrase/")
        assert r["image_rephrase"].endswith(".png")
        assert r["loc"].startswith("nq question: ")
        assert rec.image == os.path.join(vqa.image_root, r["image"])
        assert rec.image_rephrase == os.path.join(vqa.rephrase_image_root, r["image_rephrase"])
        assert rec.m_loc == os.path.join(vqa.image_root, r["m_loc"])  # m_loc: COCO root, not rephrase root
        assert rec.cond == f"{r['pred']} >> {r['alt']} || {r['src']}"
        with Image.open(rec.image) as im:
            assert im.format == "JPEG" and im.size == (32, 32)


def test_synthetic_is_deterministic(tmp_path):
    a = write_synthetic_mmedit(tmp_path / "a", "caption", 3, seed=7, image_size=16)
    b = write_synthetic_mmedit(tmp_path / "b", "caption", 3, seed=7, image_size=16)
    c = write_synthetic_mmedit(tmp_path / "c", "caption", 3, seed=8, image_size=16)
    ra, rb, rc = (json.load(open(p.json_path)) for p in (a, b, c))
    assert ra == rb and ra != rc
    assert a.json_path.endswith("caption_eval_edit.json")
    img_a = np.asarray(Image.open(os.path.join(a.image_root, ra[0]["image_rephrase"])))
    img_b = np.asarray(Image.open(os.path.join(b.image_root, rb[0]["image_rephrase"])))
    np.testing.assert_array_equal(img_a, img_b)


def test_rephrase_root_is_separate(vqa, tmp_path):
    # Move the rephrase images elsewhere: loading works only with rephrase_image_root pointing there.
    json_path, root = _copy_dataset(vqa, tmp_path, lambda r: r)
    other = tmp_path / "reph"
    shutil.move(os.path.join(root, "val2014_image_rephrase"), other / "val2014_image_rephrase")
    bad = load_mmedit(json_path, "vqa", root)
    assert len(bad.records) == 0 and {p.field for p in bad.problems} == {"image_rephrase"}
    good = load_mmedit(json_path, "vqa", root, rephrase_image_root=other)
    assert len(good.records) == 8


def test_every_problem_kind_is_counted_and_strict_raises(vqa, tmp_path):
    def corrupt(raw):
        del raw[1]["rephrase"]  # missing field
        raw[2]["loc_ans"] = 42  # wrong type
        raw[3]["image"] = "val2014/COCO_val2014_000000000000.jpg"  # missing file
        raw[4]["m_loc"] = "val2014/broken.jpg"  # unreadable file
        raw[5] = ["not", "a", "dict"]
        return raw

    json_path, root = _copy_dataset(vqa, tmp_path, corrupt)
    with open(os.path.join(root, "val2014", "broken.jpg"), "wb") as f:
        f.write(b"this is not a jpeg")
    res = load_mmedit(json_path, "vqa", root)
    assert res.rejected == (1, 2, 3, 4, 5)
    assert [r.index for r in res.records] == [0, 6, 7]
    by_index = {p.index: p for p in res.problems}
    assert (by_index[1].field, by_index[1].message) == ("rephrase", "missing field")
    assert by_index[2].field == "loc_ans" and "expected a string, got int" in by_index[2].message
    assert by_index[3].field == "image" and "not found" in by_index[3].message
    assert by_index[4].field == "m_loc" and "unreadable" in by_index[4].message
    assert by_index[5].field == "<record>"
    assert "5 rejected (5 problems)" in res.summary()

    with pytest.raises(DataError, match=r"record 1, field 'rephrase': missing field"):
        load_mmedit(json_path, "vqa", root, strict=True)
    # Without image checks the image problems go unnoticed, but schema problems still count.
    assert load_mmedit(json_path, "vqa", root, check_images=False).rejected == (1, 2, 5)


def test_file_level_errors(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"src": "a"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_mmedit(p, "vqa", tmp_path)
    p.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_mmedit(p, "vqa", tmp_path)
    with pytest.raises(ValueError, match="task"):
        load_mmedit(p, "gqa", tmp_path)


def test_skip_rules_and_size_truncation(vqa, tmp_path):
    def edit(raw):
        raw[1]["alt"] = ""
        raw[4]["loc_ans"] = ""  # "dirty" record
        return raw

    json_path, root = _copy_dataset(vqa, tmp_path, edit)
    res = load_mmedit(json_path, "vqa", root)  # VQA default: dirty records dropped
    assert res.skipped[SKIP_EMPTY_ALT] == (1,) and res.skipped[SKIP_DIRTY] == (4,)
    assert len(res.records) == 6 and res.n_skipped == 2
    assert "1 skipped (empty alt)" in res.summary()
    assert len(load_mmedit(json_path, "vqa", root, drop_dirty=False).records) == 7
    assert len(load_mmedit(json_path, "caption", root).records) == 7  # caption default keeps dirty records
    # size truncates the raw list before filtering: first 3 entries, one of them skipped.
    small = load_mmedit(json_path, "vqa", root, size=3)
    assert (small.n_in_file, small.n_read, len(small.records)) == (8, 3, 2)


# ---------------- tokenizer ----------------

def test_tokenizer_reloads_offline(tok):
    t, out = tok
    again = transformers.AutoTokenizer.from_pretrained(out)
    s = "Question: What color is the cat? Short answer: red"
    assert again.encode(s, add_special_tokens=False) == t.encode(s, add_special_tokens=False)
    assert (again.pad_token_id, again.eos_token_id, image_token_id(again)) == (0, 1, 3)
    assert again.encode("<image> red", add_special_tokens=False)[0] == 3  # never split
    assert again.decode(again.encode(s, add_special_tokens=False)) == s
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["a"], vocab_size=100)


# ---------------- case strings ----------------

def test_case_strings_follow_reference_templates(vqa, caption):
    r = load_mmedit(vqa.json_path, "vqa", vqa.image_root).records[0]
    x = C.case_inputs(r, "vqa")
    assert x["edit"].text == f"Question: {r.src} Short answer: {r.alt}"
    assert x["edit"].prompt == f"Question: {r.src} Short answer:"
    assert x["edit"].target == " " + r.alt
    assert x["rephrase"].text == f"Question: {r.rephrase} Short answer: {r.alt}"
    assert (x["edit"].image, x["rephrase"].image, x["image_rephrase"].image) == (
        r.image, r.image, r.image_rephrase)
    assert x["image_rephrase"].text == x["edit"].text
    assert x["loc"].text == f"{r.loc} {r.loc_ans}" and x["loc"].image is None
    assert x["loc_image"].text == f"Question: {r.m_loc_q} Short answer: {r.m_loc_a}"
    assert x["loc_image"].image == r.m_loc

    old = C.case_inputs(r, "vqa", paper_era_template=True)
    assert old["edit"].prompt == f"Question: {r.src} Short answer: "
    assert old["edit"].target == r.alt
    assert old["loc_image"].target == r.m_loc_a and old["loc"].text == x["loc"].text

    c = load_mmedit(caption.json_path, "caption", caption.image_root).records[0]
    y = C.case_inputs(c, "caption")
    assert y["edit"].text == f"{c.src} {c.alt}" and y["rephrase"].text == f"{c.rephrase} {c.alt}"
    assert y["loc_image"].text == f"Question: {c.m_loc_q} Short answer: {c.m_loc_a}"  # M-Loc always templated
    assert C.case_inputs(c, "caption", paper_era_template=True)["edit"].text == y["edit"].text


def test_prompt_is_clean_token_prefix(vqa, caption, tok):
    t, _ = tok
    for paths, task in ((vqa, "vqa"), (caption, "caption")):
        for rec in load_mmedit(paths.json_path, task, paths.image_root).records:
            for name, x in C.case_inputs(rec, task).items():
                p = t.encode(x.prompt, add_special_tokens=False)
                full = t.encode(x.text, add_special_tokens=False)
                assert full[: len(p)] == p and len(full) > len(p), (task, rec.index, name)


# ---------------- arrays ----------------

@pytest.fixture(scope="module")
def vqa_records(vqa):
    return load_mmedit(vqa.json_path, "vqa", vqa.image_root).records


def test_edit_batch_layout_and_labels(vqa_records, tok):
    t, _ = tok
    cfg = _config(t, "vqa")
    table = C.ImageTable(_pil_preprocess)
    recs = vqa_records[:3]
    batch = C.build_edit_batch(recs, t, table, cfg)
    assert batch.batch_size == 3 and list(batch.case_index) == [0, 1, 2]
    for name in INPUT_NAMES:
        sub = batch.sub(name)
        b, length = sub.input_ids.shape
        assert length in cfg.buckets and sub.labels.shape == sub.attention_mask.shape == (b, length)
        assert all(a.dtype == np.int32 for a in jax.tree.leaves(sub))
        for i, rec in enumerate(recs):
            x = C.case_inputs(rec, "vqa")[name]
            text_ids = t.encode(x.text, add_special_tokens=False)
            n_img = 0 if name == "loc" else NQ
            n = n_img + len(text_ids)
            assert list(sub.input_ids[i, :n_img]) == [cfg.image_token_id] * n_img
            assert list(sub.input_ids[i, n_img:n]) == text_ids
            assert np.all(sub.input_ids[i, n:] == t.pad_token_id)  # right padding
            assert list(sub.attention_mask[i]) == [1] * n + [0] * (length - n)
            ans = sub.labels[i][sub.labels[i] != -100]
            assert list(ans) == t.encode(x.target, add_special_tokens=False)  # clean prefix => target ids
            assert np.all(sub.labels[i, : n_img + len(t.encode(x.prompt, add_special_tokens=False))] == -100)
            assert np.all(sub.labels[i, n:] == -100)
            assert sub.image_ids[i] == (-1 if name == "loc" else table.paths.index(x.image))
    assert t.decode(batch.edit.labels[0][batch.edit.labels[0] >= 0]) == " " + recs[0].alt
    assert batch.cond_ids.shape == batch.cond_mask.shape == (3, 32)
    n = batch.cond_mask[1].sum()
    assert t.decode(batch.cond_ids[1, :n]) == recs[1].cond and np.all(batch.cond_ids[1, n:] == t.pad_token_id)
    shapes = jax.tree.map(np.shape, batch.per_edit())
    assert shapes.loc.input_ids == (3, 1) + batch.loc.input_ids.shape[1:] and shapes.cond_ids == (3, 1, 32)


def test_prepend_bos_is_masked(vqa_records, tok):
    t, _ = tok
    table = C.ImageTable(_pil_preprocess)
    a = C.build_edit_batch(vqa_records[:2], t, table, _config(t, "vqa"))
    b = C.build_edit_batch(vqa_records[:2], t, table, _config(t, "vqa", prepend_bos=True))
    assert b.edit.input_ids[0, NQ] == t.bos_token_id and b.loc.input_ids[0, 0] == t.bos_token_id
    assert b.edit.labels[0, NQ] == -100
    for name in INPUT_NAMES:  # same answer tokens, one position later
        la, lb = a.sub(name).labels, b.sub(name).labels
        np.testing.assert_array_equal(la[la != -100], lb[lb != -100])


def test_buckets_and_fixed_lengths(vqa_records, tok):
    t, _ = tok
    cfg = _config(t, "vqa", buckets=(8, 16, 24, 40))
    batch = C.build_edit_batch(vqa_records[:2], t, C.ImageTable(_pil_preprocess), cfg)
    for name in INPUT_NAMES:
        sub = batch.sub(name)
        longest = sub.attention_mask.sum(1).max()
        smaller = [x for x in cfg.buckets if x < sub.input_ids.shape[1]]
        assert sub.input_ids.shape[1] >= longest and all(x < longest for x in smaller)
    lengths = C.max_lengths(vqa_records, t, cfg)
    table = C.ImageTable(_pil_preprocess)
    fixed = [C.build_edit_batch(vqa_records[i : i + 2], t, table, cfg, lengths=lengths) for i in (0, 2, 4, 6)]
    for name in INPUT_NAMES:
        assert {f.sub(name).input_ids.shape for f in fixed} == {(2, lengths[name])}
    with pytest.raises(ValueError, match=r"case 0, edit: \d+ tokens exceed the largest bucket 8"):
        C.build_edit_batch(vqa_records[:1], t, C.ImageTable(_pil_preprocess), _config(t, "vqa", buckets=(8,)))
    with pytest.raises(ValueError, match="ascending"):
        _config(t, "vqa", buckets=(16, 8))


def test_max_lengths_to_a_multiple(vqa_records, tok):
    """`multiple=1` pads to the longest input exactly (no pad rows beyond it); other multiples round it up."""
    t, _ = tok
    cfg = _config(t, "vqa", buckets=(64,))
    exact = C.max_lengths(vqa_records, t, cfg, multiple=1)
    batch = C.build_edit_batch(vqa_records, t, C.ImageTable(_pil_preprocess), cfg, lengths=exact)
    for name in INPUT_NAMES:
        assert exact[name] == batch.sub(name).attention_mask.sum(1).max() < 64
    for name, n in C.max_lengths(vqa_records, t, cfg, multiple=8).items():
        assert n % 8 == 0 and exact[name] <= n < exact[name] + 8


def test_image_table_decodes_each_image_once(vqa_records, tok):
    t, _ = tok
    calls = []

    def counting(path):
        calls.append(path)
        return _pil_preprocess(path)

    table = C.ImageTable(counting)
    batch = C.build_edit_batch(vqa_records, t, table, _config(t, "vqa"))
    referenced = {r.image for r in vqa_records} | {r.image_rephrase for r in vqa_records} | {
        r.m_loc for r in vqa_records}
    assert len(table) == len(referenced) < 3 * len(vqa_records)  # m_loc images are shared
    assert table.n_decoded == 0  # lazy
    pixels = table.stack()
    assert pixels.shape == (len(table), 3, 8, 8) and pixels.dtype == np.float32
    table.stack(batch.loc_image.image_ids)
    table.array(0)
    assert sorted(calls) == sorted(table.paths)  # each path preprocessed exactly once
    np.testing.assert_array_equal(pixels[batch.image_rephrase.image_ids[3]],
                                  _pil_preprocess(vqa_records[3].image_rephrase))
    with pytest.raises(IndexError):
        table.array(len(table))


def test_pad_to_and_decode_answers(vqa_records, tok):
    from mmedit_jax.eval.metrics import shifted_answer_predictions

    t, _ = tok
    table = C.ImageTable(_pil_preprocess)
    cfg = _config(t, "vqa")
    batch = C.build_edit_batch(vqa_records[5:], t, table, cfg, pad_to=4)
    assert list(batch.valid) == [True, True, True, False] and list(batch.case_index) == [5, 6, 7, -1]
    np.testing.assert_array_equal(batch.edit.input_ids[3], batch.edit.input_ids[2])
    with pytest.raises(ValueError, match="pad_to=2"):
        C.build_edit_batch(vqa_records[5:], t, table, cfg, pad_to=2)
    # Logits that predict each label one step early decode back to the target text.
    labels = batch.rephrase.labels
    v = len(t)
    logits = np.zeros(labels.shape + (v,), np.float32)
    for i, j in zip(*np.nonzero(labels[:, 1:] != -100)):
        logits[i, j, labels[i, j + 1]] = 1.0
    pred, _, mask = shifted_answer_predictions(logits, labels)
    expected = [" " + r.alt for r in vqa_records[5:]] + [" " + vqa_records[7].alt]
    assert C.decode_answers(t, pred, mask) == expected


def test_image_table_names_bad_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    table = C.ImageTable(_pil_preprocess)
    table.index(str(bad))
    with pytest.raises(DataError, match=r"bad\.png: cannot preprocess"):
        table.array(0)
    shape_table = C.ImageTable(lambda p: np.zeros((4, 4), np.float32))
    shape_table.index("x.png")
    with pytest.raises(ValueError, match=r"returned shape \(4, 4\)"):
        shape_table.array(0)


def test_cond_truncated_and_right_padded(vqa_records, tok):
    import dataclasses

    t, _ = tok
    long = dataclasses.replace(vqa_records[0], src=" ".join(["What color is the cat?"] * 20))
    t.padding_side = "left"  # must not matter
    try:
        ids, mask = C.encode_cond([long, vqa_records[1]], t, max_length=32)
    finally:
        t.padding_side = "right"
    assert ids.shape == mask.shape == (2, 32)
    assert mask[0].all() and list(ids[0]) == t(long.cond)["input_ids"][:32]
    n = int(mask[1].sum())
    assert 0 < n < 32 and mask[1, :n].all() and np.all(ids[1, n:] == t.pad_token_id)
