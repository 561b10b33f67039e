"""Image preprocessing for BLIP-2 in numpy/PIL, matching transformers' BLIP image processor (PIL backend).

The steps, in order: convert to RGB (transparency composited onto white), resize to `(size, size)` with PIL's
bicubic filter, rescale by 1/255 (in float64, then cast to float32), normalise with the OpenAI CLIP mean/std
in float32, and lay the channels first. Doing the arithmetic in the same dtypes as transformers keeps the
result bit-identical, so a checkpoint sees exactly the `pixel_values` it would see under transformers.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of `img`; any alpha channel or palette transparency is composited onto white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess_image(img: Image.Image, image_size: int) -> np.ndarray:
    """A PIL image -> normalised `pixel_values` float32 `[3, S, S]` with `S = image_size`."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"preprocess_image expects a PIL.Image.Image, got {type(img).__name__}")
    size = int(image_size)
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    rgb = to_rgb(img).resize((size, size), resample=Image.Resampling.BICUBIC)
    x = (np.asarray(rgb).astype(np.float64) * (1 / 255)).astype(np.float32)  # [S, S, 3]
    mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)
    std = np.asarray(OPENAI_CLIP_STD, np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Read an image file and preprocess it: float32 `[3, S, S]`. Errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return preprocess_image(img, image_size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
