"""Device memory of MEND on MiniGPT-4 (Vicuna-7B), bfloat16, from XLA's compiled memory analysis (no weights allocated).

The programs are the bench's own (`eval.steps.make_step_fns(..., base_accuracy=False)`, the frozen-prefix cache
from `eval.steps.prefix_layer`), over E independent E-VQA cases, lowered with abstract arguments
(`jax.ShapeDtypeStruct`) and compiled for this host's backend; `compiled.memory_analysis()` gives the bytes of the
arguments XLA keeps, the outputs and the temporaries. The model is `MiniGPT4Config()`: EVA ViT-g/14 (39 x 1408,
16 heads, MLP 6144) at `--image-size`, BLIP-2's Q-Former (12 x 768, 32 queries), `llama_proj` 768 -> 4096, Vicuna-7B
v0 (32 x 4096, MLP 11008, 32 heads, vocab 32001), every parameter bfloat16. MEND is EasyEdit's
`hparams/MEND/minigpt4.yaml` (`configs/mend_minigpt4.yaml`: layers 29-31 `mlp.{down,up}_proj`, rank 1920, n_hidden 1,
shared, combined), its network float32 (as EasyEdit builds it).

What a device holds while a program runs = every resident buffer (all the model's parameters, the ViT included,
though the cached-feature step does not read them; MEND's weights and statistics; the E cases; the pre-edit
outputs while the edit program runs) + that program's outputs + its temporaries. `total_bytes` is that sum, for the
larger of the two programs; E is bisected on it against 24 GB and 80 GB (10^9 bytes, as GPU cards are sold).
The feature cache's image encoder (`forward.Blip2Fns.image_table`, 16 images per call) is a third program, run
before: its total is reported beside.

XLA:CPU has no bfloat16 matmul: it converts each bf16 dot's weight operand to float32 and, by default, its
while-loop invariant code motion hoists those converts out of the scanned layer loops, so the compiled CPU program
holds float32 copies of whole weight stacks (27 GB of temporaries at E = 1; XLA:GPU and TPU run bf16 dots natively
and make no such copies). The script therefore compiles with `--xla_disable_hlo_passes=while-loop-invariant-code-
motion` (set before jax loads); the converts then stay inside the loops, one layer's weights at a time (still an
overestimate of a GPU's figure by that much). `--xla-cpu-hoisting` keeps XLA:CPU's default pipeline instead.

    python benchmarks/minigpt4_7b_memory.py --json benchmarks/minigpt4_7b_memory.json
    python benchmarks/minigpt4_7b_memory.py --xla-cpu-hoisting --only-e1 --json /tmp/cpu_default.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if "--xla-cpu-hoisting" not in sys.argv:  # before jax loads (see the docstring)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_disable_hlo_passes=while-loop-invariant-code-motion").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mmedit_jax.case import Case, Seq  # noqa: E402
from mmedit_jax.editors.hparams import load_hparams  # noqa: E402
from mmedit_jax.eval import steps  # noqa: E402
from mmedit_jax.models.config import MiniGPT4Config, VisionConfig  # noqa: E402
from mmedit_jax.models.minigpt4 import MiniGPT4Model  # noqa: E402
from mmedit_jax.training.config import TrainConfig  # noqa: E402
from mmedit_jax.training.trainables import build_trainable  # noqa: E402

GB = 1e9
GIB = 2**30
# Padded lengths of E-VQA's inputs on MiniGPT-4 (image inputs: '###Human: <Img>' ‖ 32 slots ‖ '</Img> ' ‖
# "Question: {q} Short answer: {a}"; about 43 + 15-30 tokens, the split's longest padded to the 96 bucket; the
# text-only NQ locality question and answer: up to ~40 tokens, the 48 bucket), answer rows, KE's cond length.
LENGTHS = {"edit": 96, "rephrase": 96, "image_rephrase": 96, "loc": 48, "loc_image": 96}
ANSWER_ROWS, COND = 8, 32


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract(tree, lead: tuple[int, ...] = (), dtype=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(lead + tuple(x.shape), dtype or x.dtype), tree)


def abstract_model(image_size: int, dtype) -> MiniGPT4Model:
    """`MiniGPT4Model` at 7B shapes whose parameters are `ShapeDtypeStruct`s (nothing allocated)."""
    config = MiniGPT4Config(vision=VisionConfig(image_size=image_size, post_layernorm_eps=1e-5))
    module = MiniGPT4Model.module_class(config, dtype=dtype, param_dtype=dtype)
    ids = jnp.asarray([MiniGPT4Model.init_ids(config)], jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, image_size, image_size, 3), dtype)
    params = jax.eval_shape(lambda p: module.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids), pixel_values=p),
                            pixels)["params"]
    return MiniGPT4Model(config, params, dtype=dtype)


def abstract_mend(model: MiniGPT4Model, hparams: dict):
    """The bench's MEND editor for `model`, its weights and statistics abstract. The trainable is built against
    traced parameters (it reads only their shapes)."""
    built = {}

    def build(params):
        shell = MiniGPT4Model(model.config, params, dtype=model.dtype)
        built["t"] = build_trainable("mend", shell, hparams, TrainConfig(inner_params=tuple(hparams["inner_params"])))
        return 0

    jax.eval_shape(build, model.params)
    trainable = built["t"]
    mend_params, stats = jax.eval_shape(trainable.init, jax.random.PRNGKey(0))
    return trainable.editor(mend_params, stats, check=False)


def frozen_prefix(model, editor, case) -> int | None:
    """`steps.prefix_layer` (as the bench), called on traced parameters: it closes over them."""
    out = {}

    def run(params, editor_params):
        out["k"] = steps.prefix_layer(dataclasses.replace(editor, editor_params=editor_params), params, case)
        return 0

    jax.eval_shape(run, model.params, editor.editor_params)
    return out["k"]


def one_case(config: MiniGPT4Config, dtype) -> Case:
    """One E-VQA case's shapes (`LENGTHS`), images as cached embeddings `[32, 4096]` (the bench's feature cache)."""
    def seq(name):
        n = LENGTHS[name]
        rows = ANSWER_ROWS if name in ("edit", "rephrase", "image_rephrase") else None
        return Seq(*(jax.ShapeDtypeStruct((n,), jnp.int32) for _ in range(3)),
                   None if rows is None else jax.ShapeDtypeStruct((rows,), jnp.int32))

    image = jax.ShapeDtypeStruct((config.num_query_tokens, config.text.hidden_size), dtype)
    return Case(*(seq(n) for n in LENGTHS), {k: image for k in ("edit", "image_rephrase", "loc_image")},
                jax.ShapeDtypeStruct((COND,), jnp.int32), jax.ShapeDtypeStruct((COND,), jnp.int32))


def analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
            "generated_code_bytes": int(m.generated_code_size_in_bytes)}


def measure(model, editor, case, prefix, edits: int) -> dict:
    """Both step programs at E = `edits`: XLA's figures and the device total (module docstring)."""
    cases = abstract(case, (edits,))
    pre_fn, edit_fn = steps.make_step_fns(editor, True, base_accuracy=False, prefix_layer=prefix)
    pre = jax.eval_shape(pre_fn, model.params, cases)
    t0 = time.perf_counter()
    pre_c = pre_fn.lower(model.params, cases).compile()
    t1 = time.perf_counter()
    edit_c = edit_fn.lower(editor.editor_params, model.params, cases, pre).compile()
    t2 = time.perf_counter()
    resident = nbytes(model.params) + nbytes(editor.editor_params) + nbytes(cases)
    out = {"edits": edits, "compile_s": {"pre": t1 - t0, "edit": t2 - t1},
           "resident_bytes": {"model_params": nbytes(model.params), "editor": nbytes(editor.editor_params),
                              "cases": nbytes(cases), "pre_outputs": nbytes(pre)},
           "pre": analysis(pre_c), "edit": analysis(edit_c)}
    out["pre"]["total_bytes"] = resident + out["pre"]["output_bytes"] + out["pre"]["temp_bytes"]
    out["edit"]["total_bytes"] = resident + nbytes(pre) + out["edit"]["output_bytes"] + out["edit"]["temp_bytes"]
    out["total_bytes"] = max(out["pre"]["total_bytes"], out["edit"]["total_bytes"])
    return out


def encoder(model, fns, images: int = 16) -> dict:
    """The feature cache's encoding program (`forward.Blip2Fns.image_table`: `images` pixels per call)."""
    s = model.config.vision.image_size
    pixels = jax.ShapeDtypeStruct((images, 3, s, s), jnp.float32)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda p, x: fns.encode(p, {}, x)).lower(model.params, pixels).compile()
    out = {"images": images, "compile_s": time.perf_counter() - t0, **analysis(compiled)}
    out["total_bytes"] = nbytes(model.params) + nbytes(pixels) + out["output_bytes"] + out["temp_bytes"]
    return out


def largest_fitting(fits, lo: int, hi: int) -> int:
    """The largest E in [lo, hi) with `fits(E)`, given `fits(lo)` and not `fits(hi)` (bisection)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--image-size", type=int, default=224, help="224 (MiniGPT-4's own) or 364 (EasyEdit's)")
    ap.add_argument("--config", default="configs/mend_minigpt4.yaml")
    ap.add_argument("--limits-gb", default="24,80")
    ap.add_argument("--only-e1", action="store_true", help="E = 1 only (no bisection)")
    ap.add_argument("--xla-cpu-hoisting", action="store_true",
                    help="keep XLA:CPU's loop-invariant code motion (float32 copies of weight stacks; docstring)")
    args = ap.parse_args()
    dtype = jnp.bfloat16
    t_start = time.perf_counter()
    model = abstract_model(args.image_size, dtype)
    hparams = load_hparams(args.config)
    editor = abstract_mend(model, hparams)
    case = one_case(model.config, dtype)
    prefix = frozen_prefix(model, editor, case)
    print(f"MiniGPT-4 7B, {nbytes(model.params) / GIB:.2f} GiB of bf16 parameters; "
          f"MEND {nbytes(editor.editor_params) / GIB:.2f} GiB; "
          f"frozen prefix from layer {prefix}; lengths {LENGTHS}, answer rows {ANSWER_ROWS}", flush=True)
    seen: dict[int, dict] = {}

    def at(e):
        if e not in seen:
            seen[e] = measure(model, editor, case, prefix, e)
            r = seen[e]
            print(f"E={e}: total {r['total_bytes'] / GB:.2f} GB (edit temp {r['edit']['temp_bytes'] / GB:.2f}, "
                  f"pre temp {r['pre']['temp_bytes'] / GB:.2f}); compile {sum(r['compile_s'].values()):.0f} s",
                  flush=True)
        return seen[e]

    enc = encoder(model, editor.fns)
    print(f"image encoder (16 images): total {enc['total_bytes'] / GB:.2f} GB, temp {enc['temp_bytes'] / GB:.2f}",
          flush=True)
    one = at(1)
    result = {"model": "MiniGPT-4 Vicuna-7B v0", "dtype": "bfloat16", "image_size": args.image_size,
              "config": args.config, "lengths": LENGTHS, "answer_rows": ANSWER_ROWS, "prefix_layer": prefix,
              "e1": one, "encoder": enc,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "backend": jax.default_backend(), "jax": jax.__version__}
    if not args.only_e1:
        fits_at = {}
        for limit in (float(x) for x in args.limits_gb.split(",")):
            fits = lambda e, limit=limit: at(e)["total_bytes"] <= limit * GB  # noqa: E731
            if not fits(1):
                fits_at[f"{limit:g}"] = 0
                continue
            # A bracket [lo fits, hi does not] from a straight line through E = 1 and 8, then bisection on the
            # compiled figures (the line only saves compiles; every answer is a compiled program's).
            slope = max((at(8)["total_bytes"] - one["total_bytes"]) / 7, 1.0)
            guess = max(1, 1 + int((limit * GB - one["total_bytes"]) / slope))
            lo, hi = (guess, guess + 1) if fits(guess) else (max(1, guess - 1), guess)
            while fits(hi):
                lo, hi = hi, 2 * hi
            while not fits(lo):
                lo, hi = max(1, lo // 2), lo
            fits_at[f"{limit:g}"] = largest_fitting(fits, lo, hi)
        result["largest_e"] = fits_at
        result["points"] = [seen[e] for e in sorted(seen)]
    result["wall_s"] = time.perf_counter() - t_start
    print(json.dumps({k: v for k, v in result.items() if k not in ("points",)}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
