"""Our MEND -> EasyEdit's state-dict layout -> back (`mend_easyedit.convert_state_dict`) is the identity."""

import jax
import numpy as np
import pytest

from mmedit_jax.convert import mend_easyedit as me
from mmedit_jax.convert.mend_to_easyedit import easyedit_name, to_easyedit
from mmedit_jax.editors import mend_net as mn

SHAPES = {f"language_model/layers/{i}/{fc}": ((6, 10) if fc == "fc1" else (10, 6)) for i in (2, 3)
          for fc in ("fc1", "fc2")}


@pytest.mark.parametrize("combine,shared", [(True, True), (False, False)])
def test_round_trip(combine, shared):
    spec = mn.mend_spec(mn.MendConfig(rank=4, combine=combine, shared=shared, descent=False), SHAPES)
    params, stats = mn.init_mend(jax.random.PRNGKey(0), spec)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    rng = np.random.default_rng(0)
    factors = {s: (rng.standard_normal((5, i)), rng.standard_normal((5, o))) for s, (i, o) in SHAPES.items()}
    stats, _ = mn.update_stats(spec, stats, factors, {s: np.ones(5) for s in SHAPES})

    sd, meta = to_easyedit(spec, params, stats, style="lavis")
    assert meta["inner_params"][0] == "opt_model.model.decoder.layers.2.fc1.weight"
    spec2, params2, stats2 = me.convert_state_dict(sd, meta["inner_params"], init=meta["init"], norm=meta["norm"])
    assert spec2.sites == spec.sites and spec2.shapes == spec.shapes and spec2.cfg.combine == combine
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), params2, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), stats2, stats)
    std = sd[f"mend.{'(6, 10)' if shared else 'opt_model#model#decoder#layers#2#fc1#weight'}.u_std"]
    assert np.all(np.isfinite(std)) and np.all(std > 0)


def test_transformers_names():
    assert easyedit_name("language_model/layers/3/fc2") == "language_model.model.decoder.layers.3.fc2.weight"
    assert easyedit_name("qformer/layers/1/output_query/dense") == "qformer.encoder.layer.1.output_query.dense.weight"
