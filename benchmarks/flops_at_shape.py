"""Matmul FLOPs per edit and the FLOP floor at a preset's real shapes, counted without the weights in memory.

    PYTHONPATH=. python benchmarks/flops_at_shape.py --preset blip2-opt-2.7b --batches 1,8,32 \
        --json benchmarks/flops_blip2-opt-2.7b.json

The bench's own programs (`steps.make_step_fns`, the timed image encoder) and the floor (`eval/floor.py`) traced
to jaxprs with abstract parameters (`jax.ShapeDtypeStruct`s: a 3.7 B model costs no memory here) on the first E
of the built-in world's eval cases (their token arrays; image features are shapes too), a fresh MEND over the
last three layers' fc1/fc2 (EasyEdit's BLIP-2 sites, rank 1920). Counts only: nothing runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax import pipeline
from mmedit_jax.case import make_cases, take
from mmedit_jax.eval import floor, steps, throughput
from mmedit_jax.models import presets
from mmedit_jax.models.blip2 import Blip2Model


def count(preset: str, batches, dtype: str = "float32") -> dict:
    _, tok_dir, data, image_root, _ = pipeline.world_inputs("vqa")
    tok = pipeline.load_tokenizer(tok_dir)
    config = presets.with_tokens(presets.preset(preset), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id,
                                 tok.bos_token_id, tok.eos_token_id, vocab=len(tok))
    params = presets.param_shapes(config, jnp.dtype(dtype))
    model = Blip2Model(config, params, dtype=dtype)
    loaded = pipeline.load_split(data, "vqa", image_root, image_root, limit=max(batches), log=lambda m: None)
    prepared = pipeline.prepare_data(loaded.records, tok, model, "vqa")
    trainable = pipeline.fresh_trainable("mend", model)
    editor_params, stats = jax.eval_shape(trainable.init, jax.random.PRNGKey(0))
    editor = trainable.editor(editor_params, stats, check=False)
    s = config.vision.image_size
    pixels_one = jax.ShapeDtypeStruct((1, 3, s, s), jnp.dtype(dtype))
    feat = jax.eval_shape(lambda p, x: editor.fns.encode(p, {}, x), params, pixels_one)
    # Values never enter a count, but the floor tells inputs apart by them: image i's features are all i.
    n = len(prepared.pixels)
    table = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None], (n, *feat.shape[1:])).astype(feat.dtype)
    cases = make_cases(prepared.batch, table)
    k = steps.first_edited_layer(trainable.spec.sites)
    pre_fn, edit_fn = steps.make_step_fns(editor, True, base_accuracy=False, prefix_layer=k)
    encode = throughput.image_encoder(editor.fns)
    rows = []
    for E in batches:
        idx = np.minimum(np.arange(E), len(prepared.meta) - 1)
        batch = take(cases, idx)
        images = throughput.BatchImages.of(prepared.batch, prepared.pixels, idx)
        px = jax.ShapeDtypeStruct(images.pixels.shape, jnp.dtype(dtype))
        image_flops = throughput.matmul_flops(jax.make_jaxpr(encode)(params, px, images.rows))
        pre = jax.eval_shape(pre_fn, params, batch)
        step = (throughput.matmul_flops(jax.make_jaxpr(pre_fn)(params, batch))
                + throughput.matmul_flops(jax.make_jaxpr(edit_fn)(editor.editor_params, params, batch, pre)))
        least = floor.flop_floor(editor, params, batch, k, len(images.pixels), image_flops)
        achieved = (step + image_flops) / E
        rows.append(dict(batch=E, gflop_per_edit=achieved / 1e9, image_gflop_per_edit=image_flops / E / 1e9,
                         x_floor=achieved / (least.total / E), **least.as_dict()))
        print(f"E={E}: {achieved / 1e9:.1f} GFLOP/edit (images {image_flops / E / 1e9:.1f}), floor "
              f"{least.total / E / 1e9:.1f}, x floor {rows[-1]['x_floor']:.3f}; parts "
              + ", ".join(f"{p} {v:.1f}" for p, v in rows[-1]["floor_parts_gflop_per_edit"].items()), flush=True)
    return dict(preset=preset, dtype=dtype, params=presets.param_count(config), prefix_layer=k,
                input_lengths={n: int(getattr(prepared.batch, n).input_ids.shape[1])
                               for n in ("edit", "rephrase", "image_rephrase", "loc", "loc_image")},
                rows=rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="blip2-opt-2.7b", choices=sorted(presets.PRESETS))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = count(args.preset, [int(b) for b in args.batches.split(",")])
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
