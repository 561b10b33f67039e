"""A small synthetic dataset in exactly the released MMEdit schema and directory layout.

Layout written under `out_dir` (the released images archive unpacks the same way, and EasyEdit's yamls point
both `coco_image` and `rephrase_image` at the directory holding `val2014/` and `val2014_image_rephrase/`):

    out_dir/
      editing-data/vqa/vqa_{split}.json                  (task "vqa")
      editing-data/caption/caption_{split}_edit.json     (task "caption")
      val2014/COCO_val2014_000000xxxxxx.jpg              edit images and OK-VQA (m_loc) images, JPEG
      val2014_image_rephrase/...png                      image rephrases, PNG

E-VQA rephrase names follow the released pattern `{id}00{k}_COCO_val2014_{id:012d}.png`, E-IC ones
`COCO_val2014_{id:012d}.png`. Everything is deterministic given `seed`. Images are random coloured blocks;
the texts are only grammatical enough to tokenize like the real data (a richer world is `mmedit_jax.world`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

_OBJECTS = ("cat", "dog", "bus", "kite", "pizza", "clock", "horse", "train", "boat", "bench", "vase", "cake")
_COLORS = ("red", "blue", "green", "white", "black", "yellow", "brown", "orange")
_PLACES = ("table", "street", "field", "beach", "kitchen", "shelf")
_COUNTS = ("1", "2", "3", "4", "5")
_NQ = (
    ("who wrote the novel pride and prejudice", "Jane Austen"),
    ("what is the capital city of australia", "Canberra"),
    ("when did the first moon landing happen", "1969"),
    ("who painted the mona lisa", "Leonardo da Vinci"),
    ("how many players are on a soccer team", "eleven"),
    ("what is the largest planet in the solar system", "Jupiter"),
)
_OKVQA = (
    ("What sport can you use this for?", "riding"),
    ("What is this animal known for?", "speed"),
    ("Which country is this dish from?", "italy"),
    ("What season is it?", "winter"),
    ("What material is this made of?", "wood"),
)


@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
    """Where `write_synthetic_mmedit` put things; pass these to `load_mmedit`."""

    json_path: str
    image_root: str  # EasyEdit's coco_image
    rephrase_image_root: str  # EasyEdit's rephrase_image (same directory, as in the shipped yamls)


def _coco_name(image_id: int) -> str:
    return f"val2014/COCO_val2014_{image_id:012d}.jpg"


def _write_image(path: str, rng: np.random.Generator, size: int) -> None:
    """A few random coloured rectangles on a random background (decodable, not constant)."""
    arr = np.empty((size, size, 3), np.uint8)
    arr[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, size - 1, 2)
        h, w = rng.integers(1, size // 2 + 1, 2)
        arr[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3, dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(arr, "RGB")
    if path.endswith(".jpg"):
        img.save(path, format="JPEG", quality=95)
    else:
        img.save(path, format="PNG")


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _vqa_texts(rng: np.random.Generator) -> dict[str, str]:
    obj = _pick(rng, _OBJECTS)
    if rng.random() < 0.5:
        alt, pred = (str(x) for x in rng.choice(_COLORS, 2, replace=False))
        return dict(src=f"What color is the {obj}?", rephrase=f"Which colour does the {obj} have?",
                    alt=alt, pred=pred)
    alt, pred = (str(x) for x in rng.choice(_COUNTS, 2, replace=False))
    return dict(src=f"How many {obj}s are in the picture?", rephrase=f"What is the number of {obj}s shown?",
                alt=alt, pred=pred)


def _caption_texts(rng: np.random.Generator) -> dict[str, str]:
    obj, obj2 = (str(x) for x in rng.choice(_OBJECTS, 2, replace=False))
    color, place = _pick(rng, _COLORS), _pick(rng, _PLACES)
    return dict(src=_pick(rng, ("a photo of", "a picture of")), rephrase="an image of",
                alt=f"A {color} {obj} on a {place}.", pred=f"a {obj2} in the {place}")


def write_synthetic_mmedit(
    out_dir: str | os.PathLike,
    task: str,
    n_records: int,
    seed: int,
    image_size: int = 32,
    split: str = "eval",
    n_m_loc_images: int | None = None,
) -> SyntheticPaths:
    """Writes `n_records` valid MMEdit records plus their images; deterministic given `seed`.

    Args:
      out_dir: root directory (created).
      task: "vqa" or "caption".
      n_records: number of records.
      seed: RNG seed (texts, image ids and pixels).
      image_size: side of the square images written.
      split: "eval" or "train" (only the file name).
      n_m_loc_images: size of the pool of OK-VQA images the records' `m_loc` is drawn from (default
        max(1, n_records // 2)), so several records share one locality image as in the released data.

    Returns:
      `SyntheticPaths` (JSON file, image root, rephrase image root).
    """
    if task not in ("vqa", "caption"):
        raise ValueError(f"task must be 'vqa' or 'caption', got {task!r}")
    out_dir = os.fspath(out_dir)
    rng = np.random.default_rng(seed)
    n_pool = max(1, n_records // 2) if n_m_loc_images is None else n_m_loc_images
    # Distinct COCO-like ids for edit images and for the m_loc pool.
    ids = rng.choice(np.arange(1, 600_000), size=n_records + n_pool, replace=False)
    edit_ids, pool_ids = ids[:n_records], ids[n_records:]

    for pid in pool_ids:
        _write_image(os.path.join(out_dir, _coco_name(int(pid))), rng, image_size)

    records = []
    for i in range(n_records):
        image_id = int(edit_ids[i])
        texts = _vqa_texts(rng) if task == "vqa" else _caption_texts(rng)
        if task == "vqa":
            rephrase_image = f"val2014_image_rephrase/{image_id}00{i % 10}_COCO_val2014_{image_id:012d}.png"
        else:
            rephrase_image = f"val2014_image_rephrase/COCO_val2014_{image_id:012d}.png"
        loc_q, loc_a = _NQ[int(rng.integers(len(_NQ)))]
        m_q, m_a = _OKVQA[int(rng.integers(len(_OKVQA)))]
        m_loc = _coco_name(int(pool_ids[int(rng.integers(n_pool))]))
        _write_image(os.path.join(out_dir, _coco_name(image_id)), rng, image_size)
        _write_image(os.path.join(out_dir, rephrase_image), rng, image_size)
        records.append({
            "src": texts["src"],
            "pred": texts["pred"],
            "rephrase": texts["rephrase"],
            "alt": texts["alt"],
            "image": _coco_name(image_id),
            "image_rephrase": rephrase_image,
            "loc": f"nq question: {loc_q}",
            "loc_ans": loc_a,
            "m_loc": m_loc,
            "m_loc_q": m_q,
            "m_loc_a": m_a,
        })

    name = f"vqa_{split}.json" if task == "vqa" else f"caption_{split}_edit.json"
    json_path = os.path.join(out_dir, "editing-data", task, name)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    return SyntheticPaths(json_path=json_path, image_root=out_dir, rephrase_image_root=out_dir)
