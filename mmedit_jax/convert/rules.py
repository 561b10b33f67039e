"""The declarative weight mapping: which Hugging Face tensors fill which Flax parameter, and how.

A model's mapping is a list of `Rule`s plus the set of checkpoint keys it may leave unused (with a reason,
e.g. OPT's tied `lm_head.weight`). The converter (`engine.py`) checks that every checkpoint tensor is used
exactly once, every parameter of the model's template is filled, and every shape matches.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def identity(w: np.ndarray) -> np.ndarray:
    return w


def linear(w: np.ndarray) -> np.ndarray:
    """torch `nn.Linear.weight` `[out, in]` -> Flax kernel `[in, out]`."""
    return w.T


def conv(w: np.ndarray) -> np.ndarray:
    """torch `Conv2d.weight` OIHW -> Flax HWIO."""
    return w.transpose(2, 3, 1, 0)


TRANSFORMS = {"identity": identity, "linear": linear, "conv": conv}


@dataclasses.dataclass(frozen=True)
class Rule:
    """Fill the Flax parameter at `target` ('/'-joined path, e.g. 'language_model/layers/fc1/kernel').

    `sources` holds one checkpoint key for a plain parameter, or one key per scanned unit for a stacked
    parameter (each transformed, then stacked along a new leading axis, in order).
    """

    target: str
    sources: tuple[str, ...]
    transform: str = "identity"
    stacked: bool = False

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"{self.target}: unknown transform {self.transform!r}")
        if not self.stacked and len(self.sources) != 1:
            raise ValueError(f"{self.target}: an unstacked rule takes exactly one source, got {self.sources}")


def plain(target: str, source: str, transform: str = "identity") -> Rule:
    return Rule(target, (source,), transform)


def stacked(target: str, sources, transform: str = "identity") -> Rule:
    return Rule(target, tuple(sources), transform, stacked=True)
