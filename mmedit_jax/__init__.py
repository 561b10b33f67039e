"""mmedit_jax: multimodal knowledge editing (MMEdit) in JAX/Flax.

The path of one forward pass, by file:
  image -> `data/image.py` (preprocess) -> `models/vit.py` -> `models/qformer.py` -> `models/opt.py` -> logits
  (`models/blip2.py` composes them; `forward.py` is the single-example view editors and scoring use).
The path of one edit:
  `case.py` -> `editors/{ft,mend,ke}.py` -> `patch.py` (low-rank / dense patches) -> `forward.py` (patched forward)
  -> `eval/scoring.py` + `eval/metrics.py` (the five metrics) -> `eval/harness.py` (batches, rows on disk).
README.md "How it fits together" lists every file and which way imports point.

Three lines (`api.py`):
    import mmedit_jax as mj
    model = mj.from_pretrained("world"); editor = mj.load_editor("mend", model)
    patch = editor.edit(image, "What color are the shapes?", "purple"); model.answer(image, "...", patch=patch)
"""

__version__ = "0.1.0"


_API = ("from_pretrained", "load_editor", "save_patch", "load_patch", "compose", "Model", "MiniGPT4ApiModel",
        "BoundEditor", "EditPatch", "PatchBatch", "ContextPatch", "ContextBatch",
        "MemoryPatch", "MemoryBatch", "PatchMismatch")


def __getattr__(name):
    # Lazy, so `import mmedit_jax` stays cheap (no jax/orbax import until the API is used).
    if name in _API:
        # the public surface lives in api.py (layer 8); importing it here, at first use, keeps the import cheap
        from mmedit_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'mmedit_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
