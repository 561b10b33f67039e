"""Answer rows: logits, losses, accuracies, editor factors and whole harness steps computed at the answer
positions only equal those of the full forward (tiny random BLIP-2, 4 OPT layers, pre- and post-LayerNorm)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from worlds import fresh_mend, random_patch

from benchmarks import compare_peer
from mmedit_jax import pipeline
from mmedit_jax.case import ACCURACY_INPUTS, answer_rows, make_cases
from mmedit_jax.editors.ke import make_ke
from mmedit_jax.eval import metrics as M
from mmedit_jax.eval import steps
from mmedit_jax.forward import Blip2Fns, teacher_forced
from mmedit_jax.losses import answer_nll
from mmedit_jax.models.blip2 import Blip2Model

N = 6


@pytest.fixture(scope="module")
def world(make_demo_world):
    w = make_demo_world(N, seed=2)
    return w.model, w.prepared


def test_answer_rows_by_hand():
    labels = np.array([[-100, -100, 5, 6, -100], [-100, -100, -100, 7, -100], [-100] * 5])
    np.testing.assert_array_equal(answer_rows(labels), [[1, 2], [2, -1], [-1, -1]])
    np.testing.assert_array_equal(answer_rows(labels, width=3)[1], [2, -1, -1])
    np.testing.assert_array_equal(answer_rows(labels[2:]), [[-1]])  # at least one row
    with pytest.raises(ValueError, match="2 answer tokens, more than width 1"):
        answer_rows(labels, width=1)


@pytest.mark.parametrize("pre_ln", [True, False])
def test_forward_at_rows_equals_full_forward(world, pre_ln):
    model, prepared = world
    if not pre_ln:  # OPT-350m's layout: LayerNorm after each block, no final LayerNorm
        text = dataclasses.replace(model.config.text, do_layer_norm_before=False)
        model = Blip2Model.init(dataclasses.replace(model.config, text=text), jax.random.PRNGKey(7))
    fns = Blip2Fns(model.module)
    editor = pipeline.build_editor("ft-l", model)
    cases = pipeline.cases_for(editor.fns, model.params, prepared)
    rows_all = np.asarray(cases.edit.answer_rows)
    assert rows_all.shape[1] > 1 and (rows_all == -1).any()  # several answer tokens, and padding rows
    patch = random_patch(model, [1, 3])
    logits_fn = jax.jit(fns.logits)
    rows_fn = jax.jit(lambda params, p, seq, image, rows: fns.forward(params, p, seq, image, rows=rows)[0])
    forced_fn = jax.jit(lambda params, p, seq, image: teacher_forced(fns, params, p, seq, image)[:2])
    for i in range(3):
        case = jax.tree.map(lambda a: jnp.asarray(a[i]), cases)  # noqa: B023
        seq, image = case.edit, case.images["edit"]
        rows = jnp.maximum(seq.answer_rows, 0)
        for p in ({}, patch):
            full = logits_fn(model.params, p, seq, image)
            np.testing.assert_allclose(rows_fn(model.params, p, seq, image, rows), full[rows], rtol=1e-5, atol=1e-5)
        # The loss and accuracies in the shifted layout are the full forward's.
        logits, labels = forced_fn(model.params, patch, seq, image)
        assert logits.shape[0] == rows.shape[0] + 1
        np.testing.assert_allclose(answer_nll(logits, labels), answer_nll(full, seq.labels), rtol=1e-5)
        for exact in (True, False):
            np.testing.assert_allclose(M.edit_accuracy(logits[None], labels[None], exact),
                                       M.edit_accuracy(full[None], seq.labels[None], exact), rtol=1e-6)


def fresh_ke(model):
    """A fresh KE on layers 2-3 whose update is mostly the gradient term (`compare_peer.fresh_ke`, perturbed)."""
    spec, params = compare_peer.fresh_ke(model, layers=2, perturb=1.0)
    return make_ke(spec, Blip2Fns(model.module), params)


@pytest.mark.parametrize("name", ["mend", "ke"])
def test_patches_and_scores_with_rows_equal_without(world, name):
    """The editors' patches (as dense deltas) and every harness output are those of the full-length path; the
    last layer's factors shrink to the answer rows."""
    model, prepared = world
    editor = fresh_mend(model) if name == "mend" else fresh_ke(model)
    table = editor.fns.image_table(model.params, prepared.pixels)
    with_rows, without = (make_cases(prepared.batch, table, with_answer_rows=a) for a in (True, False))
    assert without.edit.answer_rows is None
    one = [jax.tree.map(lambda a: jnp.asarray(a[0]), c) for c in (with_rows, without)]
    edit = jax.jit(editor.edit)
    patches = [edit(editor.editor_params, model.params, c, {}) for c in one]
    top = "language_model/layers/3/fc1"
    assert patches[0][top].a.shape[0] < patches[1][top].a.shape[0]  # fewer rows on the last layer
    for site in patches[1]:
        dense = [np.asarray(p[site].scale * p[site].a.T @ p[site].b) for p in patches]
        assert np.abs(dense[1]).max() > 0
        np.testing.assert_allclose(dense[0], dense[1], rtol=1e-4, atol=1e-6 * np.abs(dense[1]).max(), err_msg=site)
    pre_fn, edit_fn = steps.make_step_fns(editor, exact_match=False, prefix_layer=2)
    outs = []
    for cases in (with_rows, without):
        batch = jax.device_put(cases)
        pre = pre_fn(model.params, batch)
        outs.append((pre, edit_fn(editor.editor_params, model.params, batch, pre)))
    answer = {f"pred_{name}": np.asarray(getattr(prepared.batch, name).labels)[:, 1:] != -100
              for name in ACCURACY_INPUTS}
    for a, b in zip(*outs):
        for key in b:
            x, y = np.asarray(a[key]), np.asarray(b[key])
            if key in answer:  # the accuracy inputs' predictions are kept at their answer positions only
                x, y = x[:, :-1][answer[key]], y[:, :-1][answer[key]]
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=key)
