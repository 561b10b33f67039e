"""The harness's edit + score step sharded over an 8-device CPU mesh (edits over "data", weights over "model")
gives the same scores and patches as one device."""

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
    import worlds
    from mmedit_jax import pipeline, sharding
    from mmedit_jax.eval import harness

    assert len(jax.devices()) == 8
    out = {}
    with tempfile.TemporaryDirectory() as d:
        world = worlds.demo_world(d, 8, seed=2)
    model, prepared = world.model, world.prepared
    editor = pipeline.build_editor("ft-l", model, {"num_steps": 3, "edit_lr": 0.02})
    cases = pipeline.cases_for(editor.fns, model.params, prepared)
    kw = dict(batch_size=8, exact_match=False, resume=False, progress=False)
    single = harness.run(editor, model.params, cases, prepared.meta, None, **kw).rows
    for data, mdl in ((4, 2),):  # both axes at once: edits split 4 ways, weights 2 ways
        mesh = sharding.make_mesh(data=data, model=mdl)
        rows = harness.run(editor, model.params, cases, prepared.meta, None, mesh=mesh, **kw).rows
        diffs = [abs(a[m] - b[m]) for a, b in zip(single, rows)
                 for m in ("reliability", "t_generality", "m_generality", "t_locality", "m_locality")]
        out[f"{data}x{mdl}"] = max(diffs)

    # The patches themselves, sharded (data=4, model=2) vs one device.
    mesh = sharding.make_mesh(data=4, model=2)
    edit = jax.jit(jax.vmap(lambda c: editor.edit(None, model.params, c, {})))
    batch = jax.tree.map(lambda a: a[:8], cases)
    want = edit(batch)
    placed = jax.tree.map(lambda a: jax.device_put(a, sharding.batch_sharding(mesh, np.ndim(a))), batch)
    edit_sharded = jax.jit(jax.vmap(lambda p, c: editor.edit(None, p, c, {}), in_axes=(None, 0)))
    got = edit_sharded(sharding.shard_params(model.params, mesh), placed)
    out["patch_diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))
    out["patch_sharding"] = str(jax.tree.leaves(got)[0].sharding.spec)
    out["num_rows"] = len(single)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def result():
    root = pathlib.Path(__file__).resolve().parents[1]
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"  # keep the suite's flags
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(root / "tests"), str(root)]))  # `worlds`, the tests' helpers
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][len("RESULT"):])


def test_sharded_scores_equal_single_device(result):
    assert result["num_rows"] == 8
    assert result["4x2"] <= 1e-6


def test_sharded_patches_equal_single_device(result):
    assert "data" in result["patch_sharding"]  # the edits really are split over the data axis
    # FT runs Adam, which normalises tiny gradients: reordered float sums move a few entries by ~1e-5.
    assert result["patch_diff"] <= 5e-5
