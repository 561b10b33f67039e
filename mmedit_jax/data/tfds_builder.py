"""MMEdit files as a TensorFlow Datasets builder writing array_record shards (the `tfds` extra; no TensorFlow).

    python -m mmedit_jax.data.tfds_builder --manual-dir DIR --data-dir OUT --task vqa|caption [--image-root R]

`--manual-dir` holds EasyEdit's JSON files (`vqa_train.json` / `vqa_eval.json`, `caption_train_edit.json` /
`caption_eval_edit.json`, searched in the directory and in `editing-data/{task}/`); images resolve against
`--image-root` (default: the manual directory), exactly as `load_mmedit` resolves them. Each split keeps what
`load_mmedit` keeps (same filtering, same counted problems, recorded in the dataset's metadata), with the three
images stored as their original file bytes. Read back, on a TPU VM or anywhere, with

    source = tfds.data_source("mmedit/vqa", data_dir=OUT)["eval"]
    records, images = records_from_source(source)          # MMEditRecords + {key: image bytes}

and `ImageTable(image_loader(images, size))` in place of the file loader; the rest of the pipeline is unchanged.
The plain JSON + image loader (`data/mmedit.py`) stays the default.
"""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmedit_jax.data.image import preprocess_image
from mmedit_jax.data.mmedit import MMEditRecord, load_mmedit

TEXT_FIELDS = ("src", "pred", "alt", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
FILES = {"vqa": {"train": "vqa_train.json", "eval": "vqa_eval.json"},
         "caption": {"train": "caption_train_edit.json", "eval": "caption_eval_edit.json"}}


def find_split_files(manual_dir: str, task: str) -> dict[str, str]:
    found = {}
    for split, name in FILES[task].items():
        for d in (manual_dir, os.path.join(manual_dir, "editing-data", task)):
            if os.path.isfile(os.path.join(d, name)):
                found[split] = os.path.join(d, name)
                break
    if not found:
        raise FileNotFoundError(f"no {task} MMEdit files ({', '.join(FILES[task].values())}) in {manual_dir}")
    return found


class MMEdit(tfds.core.GeneratorBasedBuilder):
    """EasyEdit's MMEdit E-VQA / E-IC tasks; one config per task."""

    name = "mmedit"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="vqa"), tfds.core.BuilderConfig(name="caption")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put EasyEdit's MMEdit JSON files (and the images) in the manual directory."

    def __init__(self, *, image_root: str | None = None, rephrase_image_root: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self._image_root = image_root
        self._rephrase_image_root = rephrase_image_root
        self.problems: dict[str, list[str]] = {}

    def _info(self):
        features = {k: tfds.features.Text() for k in TEXT_FIELDS}
        features.update({f"{k}_path": tfds.features.Text() for k in IMAGE_FIELDS})
        features.update({f"{k}_bytes": tfds.features.Tensor(shape=(), dtype=np.object_) for k in IMAGE_FIELDS})
        features["index"] = tfds.features.Scalar(dtype=np.int64)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        files = find_split_files(manual, self.builder_config.name)
        return {split: self._generate_examples(path, manual) for split, path in files.items()}

    def _generate_examples(self, json_path: str, manual_dir: str):
        root = self._image_root or manual_dir
        loaded = load_mmedit(json_path, self.builder_config.name, root, self._rephrase_image_root)
        split = os.path.basename(json_path)
        problems = [f"record {p.index}, {p.field}: {p.message}" for p in loaded.problems]
        self.info.metadata[f"{split}:summary"] = loaded.summary()
        self.info.metadata[f"{split}:problems"] = problems
        self.problems[split] = problems
        for r in loaded.records:
            ex = {k: getattr(r, k) for k in TEXT_FIELDS}
            for k in IMAGE_FIELDS:
                path = getattr(r, k)
                with open(path, "rb") as f:
                    ex[f"{k}_bytes"] = f.read()
                ex[f"{k}_path"] = os.path.relpath(path, root) if os.path.isabs(path) else path
            ex["index"] = r.index
            yield r.index, ex


def build(manual_dir: str, data_dir: str, task: str, image_root: str | None = None,
          rephrase_image_root: str | None = None) -> MMEdit:
    builder = MMEdit(config=task, data_dir=data_dir, file_format="array_record", image_root=image_root,
                     rephrase_image_root=rephrase_image_root)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def records_from_source(source) -> tuple[list[MMEditRecord], dict[str, bytes]]:
    """A `tfds.data_source` split -> records in file order (image fields are keys into the returned bytes)."""
    records, images = [], {}
    for i in range(len(source)):
        ex = source[i]
        kw = {k: _text(ex[k]) for k in TEXT_FIELDS}
        for k in IMAGE_FIELDS:
            key = _text(ex[f"{k}_path"])
            images[key] = bytes(ex[f"{k}_bytes"])
            kw[k] = key
        records.append(MMEditRecord(index=int(ex["index"]), **kw))
    records.sort(key=lambda r: r.index)  # shards are in key-hash order; keep the file's
    return records, images


def image_loader(images: dict[str, bytes], image_size: int):
    """`key -> [3, S, S]` from stored bytes, preprocessed exactly as `data.image.load_image` does files."""

    def load(key: str) -> np.ndarray:
        with Image.open(io.BytesIO(images[key])) as img:
            img.load()
            return preprocess_image(img, image_size)

    return load


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.data.tfds_builder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manual-dir", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--task", required=True, choices=("vqa", "caption"))
    ap.add_argument("--image-root")
    ap.add_argument("--rephrase-image-root")
    args = ap.parse_args(argv)
    builder = build(args.manual_dir, args.data_dir, args.task, args.image_root, args.rephrase_image_root)
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples} examples")
    for name, problems in builder.problems.items():
        print(f"{name}: {len(problems)} problems" + "".join(f"\n  {p}" for p in problems[:10]))


if __name__ == "__main__":
    main()
