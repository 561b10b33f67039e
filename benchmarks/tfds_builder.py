"""Build time and read throughput of the optional tfds array_record builder on a synthetic MMEdit set.

    PYTHONPATH=. python benchmarks/tfds_builder.py [--n 200] [--image-size 224] [--json out.json]

For each image format: build seconds (load_mmedit + encoding + array_record write), shard bytes, record read
rate (examples -> MMEditRecord, images untouched) and pixel_values rate (stored image -> float32 [3, S, S]),
against the JSON loader (load_mmedit with its image checks) and `load_image` from the image files.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import tensorflow_datasets as tfds

from mmedit_jax.data import tfds_builder as TB
from mmedit_jax.data.image import load_image
from mmedit_jax.data.mmedit import IMAGE_FIELDS, load_mmedit
from mmedit_jax.data.synthetic import write_synthetic_mmedit


def _dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs if ".array_record" in f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200, help="records")
    p.add_argument("--image-size", type=int, default=224, help="side of the synthetic images and of pixel_values")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()
    tfds.disable_progress_bar()
    s = args.image_size
    out = {"n_records": args.n, "image_size": s}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_synthetic_mmedit(os.path.join(tmp, "m"), "vqa", args.n, seed=0, image_size=s)
        t = time.perf_counter()
        res = load_mmedit(paths.json_path, "vqa", paths.image_root)
        out["json_load_s"] = time.perf_counter() - t
        img_paths = sorted({getattr(r, f) for r in res.records for f in IMAGE_FIELDS})
        t = time.perf_counter()
        for ip in img_paths:
            load_image(ip, s)
        out["n_images"] = len(img_paths)
        out["files_pixel_values_per_s"] = len(img_paths) / (time.perf_counter() - t)
        for fmt, size in (("bytes", None), ("uint8", s), ("float32", s)):
            data_dir = os.path.join(tmp, f"out_{fmt}")
            t = time.perf_counter()
            TB.build(os.path.join(tmp, "m"), data_dir, "vqa", fmt, size)
            build_s = time.perf_counter() - t
            src = TB.open_source(data_dir, "vqa", "eval", fmt, size)
            t = time.perf_counter()
            records, prep = TB.from_data_source(src, s)
            rec_s = time.perf_counter() - t
            t = time.perf_counter()
            for ip in img_paths:
                prep(ip)
            img_s = time.perf_counter() - t
            assert len(records) == len(res.records)
            out[fmt] = {"build_s": build_s, "shard_bytes": _dir_bytes(data_dir),
                        "records_per_s": len(records) / rec_s, "pixel_values_per_s": len(img_paths) / img_s}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
