"""Preprocessing parity with transformers' `BlipImageProcessorPil` on real images shipped by scikit-image."""

import os

import numpy as np
import pytest
from PIL import Image

from mmedit_jax.data.image import load_image, preprocess_image

skimage = pytest.importorskip("skimage")
transformers = pytest.importorskip("transformers")

DATA = os.path.join(os.path.dirname(skimage.__file__), "data")
# RGB of several aspect ratios, a JPEG, a grayscale (L), an RGBA with real transparency, a palette GIF.
FILES = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "logo.png", "horse.png",
         "no_time_for_that_tiny.gif"]


def _reference(img, size):
    proc = transformers.BlipImageProcessorPil(size={"height": size, "width": size})
    return proc(images=img, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("size", [224, 30])
def test_matches_transformers_pil_processor(name, size):
    path = os.path.join(DATA, name)
    with Image.open(path) as img:
        img.load()
        ref = _reference(img, size)
        ours = preprocess_image(img, size)
    assert ours.dtype == np.float32 and ours.shape == (3, size, size) == ref.shape
    # Same dtypes at every step as transformers, so the arrays agree to the last bit (max|diff| = 0).
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(load_image(path, size), ref)


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    x = preprocess_image(img, 4)
    white = (1.0 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(x[:, 0, 0], white, rtol=1e-6)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing, 8)


def test_unreadable_file_names_the_path(tmp_path):
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="garbage.jpg"):
        load_image(bad, 8)
    truncated = tmp_path / "cut.png"
    src = open(os.path.join(DATA, "coffee.png"), "rb").read()
    truncated.write_bytes(src[: len(src) // 3])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(truncated, 8)


def test_rejects_non_pil_input():
    with pytest.raises(TypeError, match="ndarray"):
        preprocess_image(np.zeros((4, 4, 3), np.uint8), 4)
