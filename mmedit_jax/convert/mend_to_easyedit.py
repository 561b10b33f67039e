"""Our MEND (spec, params, stats) -> EasyEdit's MEND state-dict layout: the inverse of
`mend_easyedit.convert_state_dict`, so the PyTorch peer can run our editor weights the EasyEdit way.

Layout written (see `mend_easyedit` for the reading side):
  mend.<group>.<net>.layers.<i>.{u [D, mid], v [mid, D], bias [D], mode_scale.weight, mode_shift.weight}
  mend.<group>.{u_mean, v_mean, u_s, v_s, u_std, v_std, k}         (`v` = the delta side)
  edit_lrs [n]                                                      (inner-params order)
`<group>` is `"(in, out)"` when shared, else the inner-param name with `.` -> `#`. The sign (`descent`), `init`
and `norm` are not weights; `meta` carries them beside the state dict.
"""

from __future__ import annotations

import re

import numpy as np

from mmedit_jax.editors import mend_net as mn

_NETS = {"mlp": "mlp", "mlp_u": "mlp1", "mlp_delta": "mlp2"}


def easyedit_name(site: str, style: str = "transformers") -> str:
    """`language_model/layers/3/fc1` -> `language_model.model.decoder.layers.3.fc1.weight` (transformers module
    names, what the peer hooks) or, with `style="lavis"`, `opt_model.model.decoder.layers.3.fc1.weight`."""
    m = re.match(r"^language_model/layers/(\d+)/(.+)$", site)
    if m:
        head = "language_model.model.decoder" if style == "transformers" else "opt_model.model.decoder"
        return f"{head}.layers.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
    m = re.match(r"^qformer/layers/(\d+)/(.+)$", site)
    if m:
        head = "qformer.encoder.layer" if style == "transformers" else "Qformer.bert.encoder.layer"
        return f"{head}.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
    return site.replace("/", ".") + ".weight"


def to_easyedit(spec: mn.MendSpec, params: dict, stats: dict, style: str = "transformers"):
    """`(state_dict {key: float32 numpy}, meta)`; meta = inner_params (names in `style`), config flags."""
    cfg = spec.cfg
    names = [easyedit_name(s, style) for s in spec.sites]
    sd: dict[str, np.ndarray] = {}
    for key, members in spec.groups:
        group = key if cfg.shared else names[spec.sites.index(members[0])].replace(".", "#")
        for ours, theirs in _NETS.items():
            net = params["nets"][key].get(ours)
            if net is None:
                continue
            for i in range(len(net)):
                layer = net[f"layer_{i}"]
                p = f"mend.{group}.{theirs}.layers.{i}."
                sd[p + "u"] = np.asarray(layer["up"]).T
                sd[p + "v"] = np.asarray(layer["down"]).T
                sd[p + "bias"] = np.asarray(layer["bias"])
                if "mode_scale" in layer:
                    sd[p + "mode_scale.weight"] = np.asarray(layer["mode_scale"])
                    sd[p + "mode_shift.weight"] = np.asarray(layer["mode_shift"])
        st = stats[key]
        k = np.asarray(st["u"]["count"], np.float32)
        for side, theirs in (("u", "u"), ("delta", "v")):
            sd[f"mend.{group}.{theirs}_mean"] = np.asarray(st[side]["mean"])
            sd[f"mend.{group}.{theirs}_s"] = np.asarray(st[side]["m2"])
            sd[f"mend.{group}.{theirs}_std"] = np.asarray(mn.moments_std(st[side]))
        sd[f"mend.{group}.k"] = k.reshape(1)
    sd["edit_lrs"] = np.asarray([params["edit_lrs"][s] for s in spec.sites], np.float32)
    meta = {"inner_params": names, "shapes": [list(spec.shape(s)) for s in spec.sites],
            "init": cfg.init, "norm": cfg.norm, "descent": cfg.descent, "shared": cfg.shared,
            "combine": cfg.combine, "sites": list(spec.sites)}
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}, meta
