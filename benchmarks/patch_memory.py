"""Memory of one edit as a dense patch vs as low-rank factors.

1. From shapes: BLIP-2 OPT-2.7B's MEND layers (EasyEdit: `opt_model.model.decoder.layers.{29,30,31}.{fc1,fc2}`,
   2560 <-> 10240), for T captured tokens per edit (32 query slots + text).
2. Measured: XLA's buffer assignment (`compiled.memory_analysis()`) for a jitted, vmapped forward of E edited
   models through three OPT-2.7B-sized FFN layers, the edits as dense deltas vs factors. Compiling allocates
   nothing, so this runs on a laptop; it is what the program would need on the device.

    python benchmarks/patch_memory.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmedit_jax import patch as P
from mmedit_jax.models.layers import PatchableDense, child, run_stack

D_MODEL, D_FFN, LAYERS = 2560, 10240, (29, 30, 31)
MIB = 2**20


class FFN(nn.Module):
    """OPT's feed-forward block (the part MEND edits), as one scanned unit."""

    @nn.compact
    def __call__(self, h, edits=None):
        y = PatchableDense(D_FFN, name="fc1")(h, child(edits, "fc1"))
        return h + PatchableDense(D_MODEL, name="fc2")(jax.nn.relu(y), child(edits, "fc2")), None


def from_shapes(tokens: int) -> dict:
    shapes = {f"language_model/layers/{i}/{n}": s for i in LAYERS
              for n, s in (("fc1", (D_MODEL, D_FFN)), ("fc2", (D_FFN, D_MODEL)))}
    dense = P.dense_nbytes(shapes)
    factored = sum(tokens * (i + o) * 4 for i, o in shapes.values())
    return {"tokens": tokens, "dense_mib": dense / MIB, "factored_mib": factored / MIB, "ratio": dense / factored}


def measured(edits: int, tokens: int, seq: int) -> dict:
    unit = FFN(parent=None)
    n = len(LAYERS)
    f32 = jnp.float32
    shapes = {"fc1": (D_MODEL, D_FFN), "fc2": (D_FFN, D_MODEL)}
    params = {name: {"kernel": jax.ShapeDtypeStruct((n, *s), f32), "bias": jax.ShapeDtypeStruct((n, s[1]), f32)}
              for name, s in shapes.items()}
    x = jax.ShapeDtypeStruct((edits, 1, seq, D_MODEL), f32)
    sites = {f"net/layers/{i}/{name}": s for i in range(n) for name, s in shapes.items()}

    def fwd(params, x, patch):
        return run_stack(unit, params, x, prefix="net/layers", patch=patch)[0]

    batched = jax.vmap(fwd, in_axes=(None, 0, 0))
    dense = {s: P.Dense(jax.ShapeDtypeStruct((edits, *sh), f32)) for s, sh in sites.items()}
    lowrank = {s: P.LowRank(jax.ShapeDtypeStruct((edits, tokens, sh[0]), f32),
                            jax.ShapeDtypeStruct((edits, tokens, sh[1]), f32),
                            jax.ShapeDtypeStruct((edits,), f32)) for s, sh in sites.items()}
    out = {"edits": edits, "tokens": tokens, "seq": seq}
    for name, patch in (("dense", dense), ("factored", lowrank)):
        compiled = jax.jit(batched).lower(params, x, patch).compile()
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out[f"{name}_patch_args_mib"] = sum(a.size * 4 for a in jax.tree.leaves(patch)) / MIB
        out[f"{name}_temp_mib"] = mem.temp_size_in_bytes / MIB
        out[f"{name}_peak_mib"] = getattr(mem, "peak_memory_in_bytes", 0) / MIB
        out[f"{name}_gflops"] = cost.get("flops", float("nan")) / 1e9
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--edits", type=int, default=32)
    args = ap.parse_args()
    shape_rows = [from_shapes(t) for t in (33, 48, 64)]
    print("One edit of BLIP-2 OPT-2.7B's MEND layers (29-31 fc1/fc2), float32, from shapes:")
    print(f"{'tokens T':>9} {'dense MiB':>10} {'factored MiB':>13} {'ratio':>7}")
    for r in shape_rows:
        print(f"{r['tokens']:>9} {r['dense_mib']:>10.1f} {r['factored_mib']:>13.2f} {r['ratio']:>7.1f}")
    m = measured(args.edits, tokens=48, seq=48)
    print(f"\nXLA buffers of a jitted vmap over E={m['edits']} edits through 3 OPT-2.7B FFN layers (T=48, seq 48):")
    print(f"{'patch':>9} {'patch args MiB':>15} {'temp MiB':>10} {'peak MiB':>10} {'GFLOP':>8}")
    for name in ("dense", "factored"):
        print(f"{name:>9} {m[f'{name}_patch_args_mib']:>15.1f} {m[f'{name}_temp_mib']:>10.1f} "
              f"{m[f'{name}_peak_mib']:>10.1f} {m[f'{name}_gflops']:>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"from_shapes": shape_rows, "measured": m, "jax": jax.__version__,
                       "device": jax.devices()[0].device_kind}, f, indent=2)


if __name__ == "__main__":
    main()
