"""The meta-training step on an 8-device CPU mesh (edits over "data", base weights over "model") gives the same
run as one device: MEND, whose statistics are merged across the sharded batch (KE's step is the same program
without statistics; its single-device training is tested in test_train.py)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, tempfile
    import jax, numpy as np
    from mmedit_jax import sharding
    from mmedit_jax import training as T
    from test_train import CFG, dataclasses_replace, mend_trainable
    from worlds import train_world

    assert len(jax.devices()) == 8
    # Every lowering of the train step (the jit cache missed: a compile, or a load from the persistent cache).
    import logging
    lowered = []
    class Lowered(logging.Handler):
        def emit(self, record):
            if record.msg.startswith("Compiling") and record.args and record.args[0] == "jit(step)":
                lowered.append(1)
    pxla_log = logging.getLogger("jax._src.interpreters.pxla")
    pxla_log.setLevel(logging.DEBUG)
    pxla_log.addHandler(Lowered())
    out = {}
    with tempfile.TemporaryDirectory() as d:
        world = train_world(d)
    model, _, cases, _ = world
    for kind in ("mend",):
        tr = mend_trainable(world)
        cfg = dataclasses_replace(CFG, alg=kind.upper(), batch_size=4, accumulate_bs=1, max_iters=3, lr=1e-3)
        runs = {}
        for name, mesh in (("single", None), ("4x2", sharding.make_mesh(data=4, model=2))):
            before = len(lowered)
            res = T.train(tr, cfg, model.params, cases, None, progress=False, mesh=mesh)
            out[f"{kind}_{name}_step_lowerings"] = len(lowered) - before
            runs[name] = (jax.device_get(res.state), [r["loss/total_edit"] for r in res.history])
            if mesh is not None:
                out[kind + "_param_sharding"] = str(jax.tree.leaves(res.state["params"])[0].sharding)
        (a, la), (b, lb) = runs["single"], runs["4x2"]
        out[kind + "_loss_diff"] = max(abs(x - y) / abs(x) for x, y in zip(la, lb))
        out[kind + "_param_diff"] = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                                        for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])))
        out[kind + "_state_diff"] = max([float(np.abs(np.asarray(x) - np.asarray(y)).max() / (np.abs(x).max() + 1e-12))
                                         for x, y in zip(jax.tree.leaves(a["editor_state"]),
                                                         jax.tree.leaves(b["editor_state"]))] or [0.0])
        out[kind + "_moved"] = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(a["params"]))
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def result():
    root = pathlib.Path(__file__).resolve().parents[1]
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"  # keep the suite's flags
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][len("RESULT"):])


@pytest.mark.parametrize("kind", ["mend"])
def test_sharded_training_equals_single_device(result, kind):
    assert "Named" in result[kind + "_param_sharding"] or "GSPMD" in result[kind + "_param_sharding"]
    assert result[kind + "_loss_diff"] <= 1e-5
    # Adam steps of lr 1e-3: three steps move a parameter by at most 3e-3; reordered float sums change the
    # result far below that.
    assert result[kind + "_param_diff"] <= 1e-5
    assert result[kind + "_state_diff"] <= 1e-5
    # One program for all three steps on either layout: the sharded state leaves a step as it came in.
    assert result[kind + "_single_step_lowerings"] == 1 and result[kind + "_4x2_step_lowerings"] == 1, result
