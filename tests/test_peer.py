"""The PyTorch peer (benchmarks/peer_torch.py: transformers' BLIP-2 with our exported weights, hooks, a deep-copied
edited model, the reference's metric formulas) and our vmapped harness give the same per-case scores with the
shipped world model and MEND."""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import peer_torch as PT  # noqa: E402

from mmedit_jax import evaluate as E  # noqa: E402
from mmedit_jax.convert.mend_easyedit import load_mend  # noqa: E402
from mmedit_jax.data.mmedit import load_mmedit  # noqa: E402
from mmedit_jax.eval import harness  # noqa: E402
from mmedit_jax.eval.model_fns import Blip2Fns  # noqa: E402
from mmedit_jax.loading import from_pretrained  # noqa: E402
from mmedit_jax.world import assets  # noqa: E402


def test_peer_and_ours_agree_case_by_case(tmp_path):
    from transformers import AutoTokenizer

    w = assets.ensure("vqa", cache_dir=str(tmp_path / "world"))
    model, tok = from_pretrained(w.model_dir), AutoTokenizer.from_pretrained(w.model_dir)
    records = load_mmedit(w.eval_json, "vqa", w.image_root, size=6).records
    prepared = E.prepare_data(records, tok, model, "vqa", model.config.vision.image_size)
    editor = E.build_editor("mend", model, {}, w.editor_ckpts["mend"])
    cases = harness.make_cases(prepared.batch, E.image_table(editor, model, prepared.pixels))
    ours = harness.run(editor, Blip2Fns(model.module), model.params, cases, prepared.meta, None, batch_size=6,
                       exact_match=True, resume=False, progress=False).rows

    hf = PT.export_to_torch(model)
    mend = PT.TorchMend(*load_mend(w.editor_ckpts["mend"]))
    for i, row in enumerate(ours):
        case = {}
        for sub in ("edit_inner", "edit_outer", "edit_outer_image", "loc", "loc_image"):
            tb = prepared.batch.sub(sub)
            img = int(tb.image_ids[i])
            case[sub] = (tb.input_ids[i], tb.attention_mask[i], tb.labels[i], None if img < 0 else prepared.pixels[img])
        peer = PT.reference_edit_and_score(hf, mend, case)
        for m in PT.METRICS:
            assert peer[m] == pytest.approx(row[m], abs=1e-6), (i, m)
    assert np.mean([r["reliability"] for r in ours]) > 0.5  # the edits really take
