"""Write the built-in world's MMEdit files.

    python -m mmedit_jax.world.generate --out DIR [--seed 0] [--n-train 512] [--n-eval 128] [--image-size 32]

Writes `DIR/{vqa_train.json, vqa_eval.json, caption_train_edit.json, caption_eval_edit.json}` in the released
MMEdit schema and their PNGs under `DIR/images/`; use `DIR` as both image roots.
"""

from __future__ import annotations

import argparse
import time

from mmedit_jax.world.dataset import write_world


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.world.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = write_world(args.out, args.seed, args.n_train, args.n_eval, args.image_size)
    print(f"wrote {', '.join(sorted(paths.files))} under {paths.root} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
