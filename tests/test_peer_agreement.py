"""The PyTorch peer (EasyEdit's procedure on transformers' BLIP-2, exported weights) and our harness score the same
cases the same: FT-L with two AdamW steps, and a freshly initialised (perturbed) MEND exported to EasyEdit's layout."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import compare_peer as C  # noqa: E402

N = 4


def _args(editor):
    return argparse.Namespace(source="demo", editor=editor, demo_records=N, seed=0, token_accuracy=False,
                              config=None, ft_steps=2, editor_ckpt=None)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model, tokenizer and records, built once for both editors."""
    return C.source_demo(_args("ft-l"), str(tmp_path_factory.mktemp("demo")))


def _check(manifest):
    ours = C.run_ours(manifest, batches=())
    peer = C.run_peer_inline(manifest)
    agree = C.agreement(ours["rows"], peer["rows"])
    assert agree["num_cases"] == N
    for m in C.METRICS:
        # Exact up to float noise: the edit metrics are argmax decisions, locality averages of them.
        assert agree[m]["mean_abs_diff"] <= 1e-6, (m, agree[m], ours["rows"], peer["rows"])
    return ours, peer


def test_ft_l_agrees(tmp_path, demo):
    manifest = C.prepare(_args("ft-l"), str(tmp_path), source=demo)
    assert manifest["ft"]["num_steps"] == 2 and manifest["ft"]["edit_lr"] == 2e-4
    ours, _ = _check(manifest)
    # The edit did something: the edited model's predictions moved away from the unedited ones somewhere.
    assert np.mean([r["m_locality"] for r in ours["rows"]]) < 1.0


def test_mend_fresh_agrees(tmp_path, demo):
    manifest = C.prepare(_args("mend"), str(tmp_path), source=demo, perturb_mend=0.05, mend_stats="random")
    ours, _ = _check(manifest)
    assert np.mean([r["m_locality"] for r in ours["rows"]]) < 1.0
