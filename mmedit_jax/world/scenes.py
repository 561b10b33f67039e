"""Procedural scenes: a few identical objects (shape, colour, count) drawn on a noisy background.

A `Scene` is the facts (what a question can ask about); `render` draws it with a `Layout` (positions, object
size, background shade, noise), so the same scene drawn with two layouts is an image and its rephrase: same
answers, different pixels. Everything is numpy + Pillow and deterministic given the RNG.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
COUNTS = ("one", "two", "three")


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    count: int  # 1..len(COUNTS)

    def __post_init__(self):
        if self.shape not in SHAPES or self.color not in COLORS or not 1 <= self.count <= len(COUNTS):
            raise ValueError(f"invalid scene {self}")

    @property
    def count_word(self) -> str:
        return COUNTS[self.count - 1]

    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{self.count_word} {self.color} {noun}"


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))],
                 int(rng.integers(1, len(COUNTS) + 1)))


def all_scenes() -> list[Scene]:
    return [Scene(s, c, n) for s in SHAPES for c in COLORS for n in range(1, len(COUNTS) + 1)]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a scene is drawn: object centres and radius in [0, 1] units, background grey level, noise std."""

    centers: tuple[tuple[float, float], ...]
    radius: float
    background: int
    noise: float


def random_layout(rng: np.random.Generator, count: int, max_tries: int = 200) -> Layout:
    """Non-overlapping positions for `count` objects (radius 0.13-0.18 of the image side)."""
    radius = float(rng.uniform(0.13, 0.18))
    centers: list[tuple[float, float]] = []
    for _ in range(max_tries):
        if len(centers) == count:
            break
        c = tuple(float(v) for v in rng.uniform(radius + 0.02, 1 - radius - 0.02, 2))
        # Axis-wise (Chebyshev) separation: a square reaches `radius` along each axis, so centre distance alone
        # lets diagonal squares overlap and merge (a wrong count). Circles and diamonds fit inside the square.
        if all(max(abs(c[0] - o[0]), abs(c[1] - o[1])) > 2.6 * radius for o in centers):
            centers.append(c)
    if len(centers) < count:  # dense fallback: a fixed row, always fits for count <= 3
        centers = [((i + 0.5) / count, 0.5) for i in range(count)]
        radius = min(radius, 0.36 / count)  # keeps the 2.6 r spacing of the row
    return Layout(tuple(centers), radius, int(rng.integers(30, 90)), float(rng.uniform(2.0, 10.0)))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def render(scene: Scene, layout: Layout, size: int, rng: np.random.Generator) -> np.ndarray:
    """`[size, size, 3]` uint8: the scene's objects at the layout's places, then Gaussian pixel noise."""
    if len(layout.centers) != scene.count:
        raise ValueError(f"layout has {len(layout.centers)} places for {scene.count} objects")
    scale = 4  # draw large and downsample: smooth edges at small sizes
    big = size * scale
    img = Image.new("RGB", (big, big), (layout.background,) * 3)
    draw = ImageDraw.Draw(img)
    color = COLORS[scene.color]
    for cx, cy in layout.centers:
        x, y, r = cx * big, cy * big, layout.radius * big
        poly = _polygon(scene.shape, x, y, r)
        if poly is None:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        else:
            draw.polygon(poly, fill=color)
    arr = np.asarray(img.resize((size, size), Image.BILINEAR), np.float32)
    arr = arr + rng.normal(0.0, layout.noise, arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def save_png(arr: np.ndarray, path: str) -> None:
    Image.fromarray(arr, "RGB").save(path, format="PNG", optimize=False)
