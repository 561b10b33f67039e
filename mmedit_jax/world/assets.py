"""The built-in world as the bench's default: shipped model and editors, and data generated on first use.

Shipped with the package (small files, `mmedit_jax/assets/world/`): the pretrained world BLIP-2 with its
tokenizer (`model/`), and meta-trained editors (`mend_vqa/`, `ke_vqa/`, ...); the MiniGPT-4-shaped world model
and its editors likewise in `mmedit_jax/assets/world_minigpt4/` (family "minigpt4"); both read the same data.
The MMEdit files are not shipped: they are regenerated, deterministically, into a cache directory
(`$MMEDIT_JAX_CACHE` or `~/.cache/mmedit_jax`) the first time they are needed (about two seconds).
`python -m mmedit_jax.world.build` remakes everything shipped from seeds.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

from mmedit_jax.world.dataset import FILE_NAMES, write_world

_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
ASSETS_OF = {"blip2": os.path.join(_ROOT, "world"), "minigpt4": os.path.join(_ROOT, "world_minigpt4")}  # by family
ASSETS = ASSETS_OF["blip2"]
WORLD = dict(seed=0, n_train=512, n_eval=128, image_size=32)  # the shipped editors were trained on this


@dataclasses.dataclass(frozen=True)
class World:
    data_dir: str
    model_dir: str
    tokenizer_dir: str
    train_json: str
    eval_json: str
    image_root: str
    editor_ckpts: dict


def default_cache_dir(n_train: int | None = None) -> str:
    root = os.environ.get("MMEDIT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmedit_jax"))
    # v2: objects never overlap (v1 let diagonal squares merge); a new tag so old caches are not reused.
    tag = "world-v2-s{seed}-t{n_train}-e{n_eval}-px{image_size}".format(**world_args(n_train))
    return os.path.join(root, tag)


def world_args(n_train: int | None = None) -> dict:
    """`WORLD`, with another train-split size when given (the eval split and the first train records do not
    depend on it: each split has its own seeded stream)."""
    return dict(WORLD, n_train=WORLD["n_train"] if n_train is None else int(n_train))


def ensure_data(cache_dir: str | None = None, n_train: int | None = None) -> str:
    """The world's MMEdit files, generated once (atomically: a half-written directory is never used).

    `n_train`: a larger train split for meta-training editors (`world_n_train` in `configs/*_world.yaml`)."""
    data_dir = cache_dir or default_cache_dir(n_train)
    marker = os.path.join(data_dir, "COMPLETE")
    if os.path.exists(marker):
        return data_dir
    parent = os.path.dirname(os.path.abspath(data_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".world-", dir=parent)
    try:
        write_world(tmp, **world_args(n_train))
        open(os.path.join(tmp, "COMPLETE"), "w").close()
        if os.path.exists(data_dir):
            shutil.rmtree(data_dir)
        os.replace(tmp, data_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return data_dir


def assets_dir(family: str = "blip2") -> str:
    """Where the world model of `family` ("blip2" | "minigpt4") and its editors are shipped."""
    if family not in ASSETS_OF:
        raise ValueError(f"no built-in world model of family {family!r}; choose one of {tuple(ASSETS_OF)}")
    return ASSETS_OF[family]


def ensure(task: str = "vqa", cache_dir: str | None = None, assets: str | None = None,
           family: str = "blip2") -> World:
    """Paths of the built-in world for `task` ("vqa" | "caption") and model `family` (shipped in
    `assets_dir(family)` unless `assets` says where); clear errors when something is missing."""
    assets = assets or assets_dir(family)
    model_dir = os.path.join(assets, "model")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"the built-in world model is missing ({model_dir}); rebuild it with "
                                f"`python -m mmedit_jax.world.build --family {family} --install`")
    data_dir = ensure_data(cache_dir)
    ckpts = {name.removesuffix(f"_{task}"): os.path.join(assets, name) for name in sorted(os.listdir(assets))
             if name.endswith(f"_{task}") and os.path.isdir(os.path.join(assets, name))}
    return World(data_dir, model_dir, model_dir, os.path.join(data_dir, FILE_NAMES[(task, "train")]),
                 os.path.join(data_dir, FILE_NAMES[(task, "eval")]), data_dir, ckpts)
