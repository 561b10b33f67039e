"""Editor hyperparameters from YAML, in EasyEdit's key names, so users can bring their EasyEdit configs.

PyYAML reads `1e-6` as a string (YAML 1.1 wants a dot), which EasyEdit fixes up after loading; so do we.
"""

from __future__ import annotations

import re

import yaml

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _fix_floats(x):
    if isinstance(x, dict):
        return {k: _fix_floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_fix_floats(v) for v in x]
    if isinstance(x, str) and _FLOAT.match(x):
        return float(x)
    return x


def load_hparams(path: str) -> dict:
    """Reads an EasyEdit-style hparams YAML into a dict (scientific-notation strings become floats)."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of hyperparameters, got {type(data).__name__}")
    return _fix_floats(data)
