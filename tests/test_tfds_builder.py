"""The TFDS builder: array_record shards read back with tfds.data_source (no TensorFlow) give exactly the records
and pixels of the JSON loader, and bad records are counted, not dropped silently."""

import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from mmedit_jax.data import tfds_builder as TB  # noqa: E402
from mmedit_jax.data.image import load_image  # noqa: E402
from mmedit_jax.data.mmedit import load_mmedit  # noqa: E402
from mmedit_jax.data.synthetic import write_synthetic_mmedit  # noqa: E402


def test_round_trip_equals_json_loader(tmp_path):
    manual = tmp_path / "manual"
    paths = write_synthetic_mmedit(manual, "vqa", 6, seed=0)
    write_synthetic_mmedit(manual, "vqa", 4, seed=1, split="train")
    # One bad record: the loader rejects it with a counted problem; the builder must do the same.
    with open(paths.json_path) as f:
        raw = json.load(f)
    raw[2]["image"] = "val2014/missing.jpg"
    with open(paths.json_path, "w") as f:
        json.dump(raw, f)

    builder = TB.build(str(manual), str(tmp_path / "tfds"), "vqa")
    assert builder.info.splits["eval"].num_examples == 5 and builder.info.splits["train"].num_examples == 4
    assert len(builder.problems["vqa_eval.json"]) == 1 and "missing.jpg" in builder.problems["vqa_eval.json"][0]

    source = tfds.data_source("mmedit/vqa", data_dir=str(tmp_path / "tfds"))["eval"]
    records, images = TB.records_from_source(source)
    want = load_mmedit(paths.json_path, "vqa", paths.image_root)
    assert len(want.problems) == 1
    assert [r.index for r in records] == [r.index for r in want.records]
    load = TB.image_loader(images, 32)
    for got, ref in zip(records, want.records):
        for field in TB.TEXT_FIELDS:
            assert getattr(got, field) == getattr(ref, field)
        for field in TB.IMAGE_FIELDS:
            assert os.path.join(paths.image_root, getattr(got, field)) == getattr(ref, field)
            np.testing.assert_array_equal(load(getattr(got, field)), load_image(getattr(ref, field), 32))


def test_missing_files_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no caption MMEdit files"):
        TB.find_split_files(str(tmp_path), "caption")
