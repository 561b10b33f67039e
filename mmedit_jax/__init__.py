"""mmedit_jax: multimodal knowledge editing (MMEdit) in JAX/Flax.

The path of one forward pass, by file:
  image -> `data/image.py` (preprocess) -> `models/vit.py` -> `models/qformer.py` -> `models/opt.py` -> logits
  (`models/blip2.py` composes them).
The path of one edit:
  case -> `editors/*.py` (FT, MEND, KE) -> `patch.py` (low-rank / dense patches) -> `eval/metrics.py`.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import mmedit_jax` stays cheap (no jax/orbax import until a model is loaded).
    if name == "from_pretrained":
        from mmedit_jax.loading import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'mmedit_jax' has no attribute {name!r}")
