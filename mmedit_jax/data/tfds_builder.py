"""Optional tensorflow-datasets builder: MMEdit JSON + images -> array_record shards, read without TensorFlow.

For TPU-VM style pipelines (`pip install mmedit_jax[tfds]`); the plain JSON loader (`mmedit.load_mmedit`) stays
the default and this module only repackages what it accepts:

* the records are exactly `load_mmedit(...)`'s (same skip rules, same problem counting, `strict` stops at the
  first problem); the `LoadResult` of every split is saved in the dataset's `metadata.json` (`load_report`),
  so rejected and skipped records are counted in the shards' own metadata, never silently dropped;
* the shards are `file_format="array_record"` and are read with `tfds.data_source(...)` /
  `builder.as_data_source(...)` (random access, numpy dicts). Neither writing nor reading needs TensorFlow:
  every feature is a `Tensor`/`Scalar`/`Text`, never `tfds.features.Image` (whose encoder calls TF);
* images are stored per record (edit image, rephrase image, locality image) in one of three forms
  (`image_format`): "bytes" (the file's own bytes, decoded with PIL at read time; lossless, smallest),
  "uint8" (RGB already resized to `image_size`, [S, S, 3]) or "float32" (the final `pixel_values`,
  [3, S, S]). All three give `pixel_values` bit-identical to `image.load_image(path, S)`: for "uint8",
  `preprocess_image` of an image already at the target size skips the resize (PIL returns a copy), so the
  normalisation is the same code on the same pixels.

Reading back: `from_data_source(source, image_size)` returns the `MMEditRecord`s (paths as `load_mmedit`
resolved them at build time; they serve as image keys) and a `preprocess(path)` for `cases.ImageTable`, so
`cases.build_edit_batch` and everything after it are unchanged.

CLI:
    python -m mmedit_jax.data.tfds_builder --manual-dir DIR --data-dir OUT --task vqa|caption
        [--image-format bytes|uint8|float32 --image-size 224] [--strict] [--size N]

`DIR` holds the released files either at `DIR/editing-data/{task}/<file>` (released layout) or at `DIR/<file>`,
with `val2014/` and `val2014_image_rephrase/` under the image root (default `DIR`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from mmedit_jax.data.image import preprocess_image, to_rgb
from mmedit_jax.data.mmedit import (
    IMAGE_FIELDS,
    TASKS,
    TEXT_FIELDS,
    DataError,
    LoadResult,
    MMEditRecord,
    load_mmedit,
)

try:  # optional extra: everything below needs it, the JSON loader does not.
    import tensorflow_datasets as tfds
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError("mmedit_jax.data.tfds_builder needs the optional extra: pip install 'mmedit_jax[tfds]' "
                      "(tensorflow-datasets and array-record; TensorFlow itself is not needed)") from _e

DATASET_NAME = "mmedit"
IMAGE_FORMATS = ("bytes", "uint8", "float32")
# Released file names per task and split (EasyEdit `editing-data/{vqa,caption}/...`).
SPLIT_FILES = {
    "vqa": {"train": "vqa_train.json", "eval": "vqa_eval.json"},
    "caption": {"train": "caption_train_edit.json", "eval": "caption_eval_edit.json"},
}
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put EasyEdit's MMEdit files in the manual dir: `editing-data/vqa/vqa_{train,eval}.json`,
`editing-data/caption/caption_{train,eval}_edit.json` (or the JSON files directly in the manual dir), and the
images archive unpacked so that `val2014/` and `val2014_image_rephrase/` are in the manual dir (or pass
`image_root` / `rephrase_image_root`).
"""


def config_name(task: str, image_format: str = "bytes", image_size: int | None = None) -> str:
    """Builder config name: "vqa" / "caption" for raw bytes, "vqa_uint8_224", "caption_float32_32", ..."""
    if image_format == "bytes":
        return task
    return f"{task}_{image_format}_{image_size}"


@dataclasses.dataclass(eq=False)
class MMEditConfig(tfds.core.BuilderConfig):
    """One task and one way of storing images.

    Attributes:
      task: "vqa" or "caption".
      image_format: "bytes" (file bytes), "uint8" (resized RGB [S, S, 3]) or "float32" (pixel_values [3, S, S]).
      image_size: S, required for "uint8" / "float32", must be None for "bytes".
    """

    task: str = "vqa"
    image_format: str = "bytes"
    image_size: int | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.image_format == "bytes" and self.image_size is not None:
            raise ValueError("image_size is only used with image_format 'uint8' or 'float32'")
        if self.image_format != "bytes" and (self.image_size is None or self.image_size <= 0):
            raise ValueError(f"image_format {self.image_format!r} needs a positive image_size")


def make_config(task: str, image_format: str = "bytes", image_size: int | None = None) -> MMEditConfig:
    return MMEditConfig(name=config_name(task, image_format, image_size), version="1.0.0",
                        description=f"MMEdit {task}, images as {image_format}", task=task,
                        image_format=image_format, image_size=image_size)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How the builder calls `load_mmedit` (build time only; not part of the stored config).

    size, strict, drop_dirty: as in `load_mmedit`. image_root / rephrase_image_root: None = the manual dir /
    the image root.
    """

    size: int | None = None
    strict: bool = False
    drop_dirty: bool | None = None
    image_root: str | None = None
    rephrase_image_root: str | None = None


def _image_feature(config: MMEditConfig):
    if config.image_format == "bytes":
        return tfds.features.Tensor(shape=(), dtype=np.object_)
    s = config.image_size
    # Raw bytes of the array: the default tf.train.Example encoding would write one int64/float proto value per
    # pixel, about 40x slower to build and 8x larger before compression for uint8.
    raw = tfds.features.Encoding.BYTES
    if config.image_format == "uint8":
        return tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding=raw)
    return tfds.features.Tensor(shape=(3, s, s), dtype=np.float32, encoding=raw)


def encode_image(path: str, image_format: str, image_size: int | None) -> Any:
    """The stored form of one image file (see the module docstring). Errors name the file."""
    if image_format == "bytes":
        with open(path, "rb") as f:
            return f.read()
    try:
        with Image.open(path) as img:
            img.load()
            if image_format == "uint8":
                # The same conversion and resize as `preprocess_image`, stopped before the float arithmetic.
                return np.asarray(to_rgb(img).resize((image_size, image_size), resample=Image.Resampling.BICUBIC))
            return preprocess_image(img, image_size)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def decode_image(value: Any, image_format: str, image_size: int) -> np.ndarray:
    """Stored image -> float32 pixel_values [3, S, S], bit-identical to `image.load_image(path, S)`."""
    if image_format == "bytes":
        with Image.open(io.BytesIO(value)) as img:
            img.load()
            return preprocess_image(img, image_size)
    arr = np.asarray(value)
    if image_format == "uint8":
        if arr.shape[0] != image_size:
            raise ValueError(f"shards hold uint8 images of size {arr.shape[0]}, asked for {image_size}")
        return preprocess_image(Image.fromarray(arr, "RGB"), image_size)
    if arr.shape[-1] != image_size:
        raise ValueError(f"shards hold float32 pixel_values of size {arr.shape[-1]}, asked for {image_size}")
    return arr.astype(np.float32, copy=False)


def _find_json(manual_dir: str, task: str, split: str) -> str | None:
    name = SPLIT_FILES[task][split]
    for p in (os.path.join(manual_dir, "editing-data", task, name), os.path.join(manual_dir, name)):
        if os.path.isfile(p):
            return p
    return None


def load_report(result: LoadResult, json_path: str) -> dict:
    """JSON-able account of one `load_mmedit` call (stored in the dataset metadata)."""
    return {
        "json_path": json_path,
        "n_in_file": result.n_in_file,
        "n_read": result.n_read,
        "n_kept": len(result.records),
        "skipped": {k: list(v) for k, v in result.skipped.items()},
        "rejected": list(result.rejected),
        "problems": [{"index": p.index, "field": p.field, "message": p.message} for p in result.problems],
        "summary": result.summary(),
    }


class MMEdit(tfds.core.GeneratorBasedBuilder):
    """E-VQA / E-IC edit cases as `load_mmedit` accepts them, one example per record, in file order."""

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [make_config("vqa"), make_config("caption")]

    def __init__(self, *, load_options: LoadOptions | None = None, **kwargs):
        self.load_options = load_options or LoadOptions()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        image = _image_feature(cfg)
        features = {"index": tfds.features.Scalar(dtype=np.int64)}
        features.update({f: tfds.features.Text() for f in TEXT_FIELDS})
        features.update({f"{f}_path": tfds.features.Text() for f in IMAGE_FIELDS})
        features.update({f: image for f in IMAGE_FIELDS})
        return tfds.core.DatasetInfo(
            builder=self,
            description="MMEdit (E-VQA / E-IC) edit cases from EasyEdit's JSON files, images included.",
            features=tfds.features.FeaturesDict(features),
            # File order = the JSON order, so example i of a split is the i-th accepted record.
            disable_shuffling=True,
            homepage="https://github.com/zjunlp/EasyEdit",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        cfg, opt = self.builder_config, self.load_options
        manual_dir = os.fspath(dl_manager.manual_dir)
        image_root = opt.image_root or manual_dir
        generators, reports = {}, {}
        for split in SPLIT_FILES[cfg.task]:
            json_path = _find_json(manual_dir, cfg.task, split)
            if json_path is None:
                continue
            result = load_mmedit(json_path, cfg.task, image_root, opt.rephrase_image_root, size=opt.size,
                                 strict=opt.strict, drop_dirty=opt.drop_dirty)
            reports[split] = load_report(result, json_path)
            if result.records:  # tfds cannot write an empty split; the report still says why it is absent
                generators[split] = self._generate_examples(result.records)
            else:
                logging.warning("MMEdit %s split %s: no usable records (%s), split not written",
                                cfg.task, split, result.summary())
        if not reports:
            wanted = " or ".join(SPLIT_FILES[cfg.task].values())
            raise FileNotFoundError(f"no {wanted} in {manual_dir} (nor in {manual_dir}/editing-data/{cfg.task})")
        if not generators:
            raise DataError("no usable records in any split: "
                            + "; ".join(f"{k}: {v['summary']}" for k, v in reports.items()))
        self.info.metadata["load_report"] = reports
        return generators

    def _generate_examples(self, records: Sequence[MMEditRecord]):
        cfg = self.builder_config
        for r in records:
            ex = {"index": r.index}
            ex.update({f: getattr(r, f) for f in TEXT_FIELDS})
            for f in IMAGE_FIELDS:
                path = getattr(r, f)
                ex[f"{f}_path"] = path
                ex[f] = encode_image(path, cfg.image_format, cfg.image_size)
            yield r.index, ex


def build(
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    task: str,
    image_format: str = "bytes",
    image_size: int | None = None,
    overwrite: bool = False,
    **load_kwargs,
) -> MMEdit:
    """Builds the array_record shards of `task` under `data_dir`; returns the (prepared) builder.

    `load_kwargs`: `size`, `strict`, `drop_dirty`, `image_root`, `rephrase_image_root` (see `LoadOptions`).
    An existing build of the same config is reused unless `overwrite`. Raises `DataError` (strict) at the
    first bad record, or when no split has a usable record.
    """
    name = config_name(task, image_format, image_size)
    predefined = {c.name for c in MMEdit.BUILDER_CONFIGS}
    config = name if name in predefined else make_config(task, image_format, image_size)
    builder = MMEdit(config=config, data_dir=os.fspath(data_dir), file_format="array_record",
                     load_options=LoadOptions(**load_kwargs))
    modes = tfds.download.GenerateMode
    mode = modes.FORCE_REDOWNLOAD if overwrite else modes.REUSE_DATASET_IF_EXISTS
    dl_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), download_mode=mode)
    builder.download_and_prepare(download_config=dl_config)
    return builder


def open_source(data_dir: str | os.PathLike, task: str, split: str, image_format: str = "bytes",
                image_size: int | None = None):
    """`tfds.data_source` of a built split (random access, numpy dicts, no TensorFlow)."""
    name = f"{DATASET_NAME}/{config_name(task, image_format, image_size)}"
    return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes | np.bytes_) else str(v)


def example_to_record(example: Mapping[str, Any]) -> MMEditRecord:
    """One data_source example -> the `MMEditRecord` `load_mmedit` returned for it (paths as at build time)."""
    fields = {f: _text(example[f]) for f in TEXT_FIELDS}
    fields.update({f: _text(example[f"{f}_path"]) for f in IMAGE_FIELDS})
    return MMEditRecord(index=int(example["index"]), **fields)


def stored_image_format(example: Mapping[str, Any]) -> str:
    """Which `image_format` an example was stored with (from the value itself)."""
    v = example["image"]
    if isinstance(v, bytes | np.bytes_):
        return "bytes"
    return "uint8" if np.asarray(v).dtype == np.uint8 else "float32"


class ShardImages:
    """`preprocess(path)` for `cases.ImageTable` that reads images from the shards instead of the disk.

    Maps each image path to the first (example, field) holding it; the image is decoded on demand (the
    `ImageTable` caches it, so each distinct path decodes once).
    """

    def __init__(self, source, image_size: int, locations: Mapping[str, tuple[int, str]], image_format: str):
        self._source, self._size, self._where, self._format = source, int(image_size), dict(locations), image_format

    def __call__(self, path: str) -> np.ndarray:
        if path not in self._where:
            raise KeyError(f"image {path} is not in the shards")
        i, field = self._where[path]
        return decode_image(self._source[i][field], self._format, self._size)


def from_data_source(source, image_size: int, indices: Sequence[int] | None = None,
                     ) -> tuple[list[MMEditRecord], Callable[[str], np.ndarray]]:
    """Records of `source` (all, or `indices`) and a `preprocess` for `cases.ImageTable(preprocess)`.

    Usage: `records, prep = from_data_source(src, 224); build_edit_batch(records, tok, ImageTable(prep), cfg)`.
    """
    indices = range(len(source)) if indices is None else indices
    records, where, fmt = [], {}, None
    for i in indices:
        ex = source[int(i)]
        fmt = fmt or stored_image_format(ex)
        r = example_to_record(ex)
        records.append(r)
        for f in IMAGE_FIELDS:
            where.setdefault(getattr(r, f), (int(i), f))
    return records, ShardImages(source, image_size, where, fmt or "bytes")


def stored_load_report(data_dir: str | os.PathLike, task: str, image_format: str = "bytes",
                       image_size: int | None = None) -> dict:
    """The per-split `load_mmedit` report saved at build time (kept / skipped / rejected / problems)."""
    d = os.path.join(os.fspath(data_dir), DATASET_NAME, config_name(task, image_format, image_size),
                     str(MMEdit.VERSION))
    with open(os.path.join(d, "metadata.json"), encoding="utf-8") as f:
        return json.load(f)["load_report"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manual-dir", required=True, help="directory with the MMEdit JSON files and images")
    p.add_argument("--data-dir", required=True, help="where tfds writes the array_record shards")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--image-format", default="bytes", choices=IMAGE_FORMATS)
    p.add_argument("--image-size", type=int, default=None, help="S for uint8 / float32 images")
    p.add_argument("--image-root", default=None, help="EasyEdit coco_image (default: manual dir)")
    p.add_argument("--rephrase-image-root", default=None, help="EasyEdit rephrase_image (default: image root)")
    p.add_argument("--size", type=int, default=None, help="first N records of each file (before filtering)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if the shards exist")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    try:
        builder = build(args.manual_dir, args.data_dir, args.task, args.image_format, args.image_size,
                        overwrite=args.overwrite, size=args.size, strict=args.strict, image_root=args.image_root,
                        rephrase_image_root=args.rephrase_image_root)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    for split, rep in builder.info.metadata["load_report"].items():
        print(f"{split}: {rep['summary']}")
        for prob in rep["problems"]:
            print(f"  record {prob['index']}, field {prob['field']!r}: {prob['message']}")
    print(f"shards: {builder.data_dir} ({dt:.2f} s; an existing build is reused unless --overwrite)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
