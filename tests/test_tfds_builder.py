"""The optional tfds builder: array_record shards hold exactly what the JSON loader accepts, readable without TF."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from mmedit_jax.data import cases as C  # noqa: E402
from mmedit_jax.data import tfds_builder as TB  # noqa: E402
from mmedit_jax.data.image import load_image  # noqa: E402
from mmedit_jax.data.mmedit import IMAGE_FIELDS, DataError, load_mmedit  # noqa: E402
from mmedit_jax.data.synthetic import write_synthetic_mmedit  # noqa: E402
from mmedit_jax.data.tokenizer import image_token_id, train_bpe_tokenizer  # noqa: E402

S = 30  # != the synthetic images' 32, so uint8/float32 storage really resizes


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
    """Released layout with both tasks and both splits under one manual dir (as the images archive shares it)."""
    root = tmp_path_factory.mktemp("manual")
    out = {}
    for task, split, n, seed in (("vqa", "eval", 7, 0), ("vqa", "train", 4, 1), ("caption", "eval", 5, 2)):
        out[task, split] = write_synthetic_mmedit(root, task, n_records=n, seed=seed, split=split)
    return str(root), out


def _assert_same_as_json_loader(data_dir, paths, task, split, fmt, size):
    ref = load_mmedit(paths.json_path, task, paths.image_root)
    src = TB.open_source(data_dir, task, split, fmt, size)
    assert len(src) == len(ref.records)
    records, prep = TB.from_data_source(src, S)
    assert records == list(ref.records)  # every field, index and resolved image path, in file order
    for r in records:
        for f in IMAGE_FIELDS:
            np.testing.assert_array_equal(prep(getattr(r, f)), load_image(getattr(r, f), S))
    return ref, records, prep


@pytest.mark.parametrize("fmt,size", [("bytes", None), ("uint8", S), ("float32", S)])
def test_round_trip_matches_json_loader(manual, tmp_path, fmt, size):
    manual_dir, paths = manual
    b = TB.build(manual_dir, tmp_path, "vqa", fmt, size)
    assert set(b.info.splits) == {"eval", "train"}
    for split in ("eval", "train"):
        _assert_same_as_json_loader(tmp_path, paths["vqa", split], "vqa", split, fmt, size)
    ex = TB.open_source(tmp_path, "vqa", "eval", fmt, size)[0]
    assert TB.stored_image_format(ex) == fmt
    # Neither building nor reading pulled TensorFlow in (it is not installed; tfds must not need it).
    assert "tensorflow" not in sys.modules


def test_caption_and_edit_batch_unchanged(manual, tmp_path):
    manual_dir, paths = manual
    TB.build(manual_dir, tmp_path, "caption")
    ref, records, prep = _assert_same_as_json_loader(tmp_path, paths["caption", "eval"], "caption", "eval",
                                                     "bytes", None)
    texts = [x.text for r in ref.records for x in C.case_inputs(r, "caption").values()] + [r.cond for r in records]
    tok = train_bpe_tokenizer(texts, vocab_size=320)
    cfg = C.CaseConfig(task="caption", num_query_tokens=4, image_token_id=image_token_id(tok))
    img_json, img_tfds = C.ImageTable(lambda p: load_image(p, S)), C.ImageTable(prep)
    a = C.build_edit_batch(ref.records, tok, img_json, cfg, pad_to=8)
    b = C.build_edit_batch(records, tok, img_tfds, cfg, pad_to=8)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(img_json.stack(), img_tfds.stack())
    assert img_tfds.paths == img_json.paths


def _corrupted_copy(paths, tmp_path):
    """A copy of a synthetic VQA set with every kind of bad record plus one skipped by the reference rule."""
    root = tmp_path / "manual"
    shutil.copytree(paths.image_root, root)
    json_path = root / os.path.relpath(paths.json_path, paths.image_root)
    raw = json.loads(json_path.read_text())
    del raw[1]["rephrase"]  # missing field
    raw[2]["loc_ans"] = 42  # wrong type
    raw[3]["image"] = "val2014/COCO_val2014_000000000000.jpg"  # missing file
    raw[4]["m_loc"] = "val2014/broken.jpg"  # unreadable
    raw[5]["alt"] = ""  # skipped (reference rule), not a problem
    (root / "val2014" / "broken.jpg").write_bytes(b"not a jpeg")
    json_path.write_text(json.dumps(raw))
    return str(root), str(json_path)


def test_bad_records_are_counted_in_metadata(manual, tmp_path):
    manual_dir, paths = manual
    root, json_path = _corrupted_copy(paths["vqa", "eval"], tmp_path)
    ref = load_mmedit(json_path, "vqa", root)
    assert ref.rejected == (1, 2, 3, 4) and len(ref.records) == 2

    out = tmp_path / "out"
    TB.build(root, out, "vqa")
    report = TB.stored_load_report(out, "vqa")["eval"]
    assert report["rejected"] == [1, 2, 3, 4]
    assert report["skipped"]["empty alt"] == [5]
    assert report["n_kept"] == 2 and report["n_in_file"] == 7
    assert [(p["index"], p["field"], p["message"]) for p in report["problems"]] == [
        (p.index, p.field, p.message) for p in ref.problems]
    assert report["summary"] == ref.summary()
    records, _ = TB.from_data_source(TB.open_source(out, "vqa", "eval"), S)
    assert records == list(ref.records) and [r.index for r in records] == [0, 6]

    # strict: the first problem stops the build, with the loader's message, and nothing is left behind.
    with pytest.raises(DataError, match=r"record 1, field 'rephrase': missing field"):
        TB.build(root, tmp_path / "strict", "vqa", strict=True)
    assert not (tmp_path / "strict" / "mmedit" / "vqa" / "1.0.0").exists()


def test_no_usable_records_and_missing_files(tmp_path):
    paths = write_synthetic_mmedit(tmp_path / "m", "caption", n_records=2, seed=3, split="train")
    raw = json.loads(open(paths.json_path).read())
    for r in raw:
        r["alt"] = ""
    with open(paths.json_path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(DataError, match=r"no usable records in any split: train: 2 in file.*2 skipped"):
        TB.build(tmp_path / "m", tmp_path / "out", "caption")
    with pytest.raises(FileNotFoundError, match="vqa_train.json or vqa_eval.json"):
        TB.build(tmp_path / "m", tmp_path / "out", "vqa")
    with pytest.raises(ValueError, match="needs a positive image_size"):
        TB.make_config("vqa", "uint8")
    with pytest.raises(ValueError, match="only used with"):
        TB.make_config("vqa", "bytes", 224)


def test_cli_flat_manual_dir(manual, tmp_path, capsys):
    _, paths = manual
    flat = tmp_path / "flat"
    shutil.copytree(paths["caption", "eval"].image_root, flat)
    shutil.copy(paths["caption", "eval"].json_path, flat / "caption_eval_edit.json")
    shutil.rmtree(flat / "editing-data")  # JSON directly in the manual dir, images beside it
    rc = TB.main(["--manual-dir", str(flat), "--data-dir", str(tmp_path / "out"), "--task", "caption",
                  "--image-format", "uint8", "--image-size", str(S), "--size", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "eval: 5 in file, 3 read, 3 kept" in out
    src = TB.open_source(tmp_path / "out", "caption", "eval", "uint8", S)
    assert len(src) == 3 and src[0]["image"].shape == (S, S, 3) and src[0]["image"].dtype == np.uint8
