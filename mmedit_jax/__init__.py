"""mmedit_jax: multimodal knowledge editing (MMEdit) in JAX/Flax.

The path of one forward pass, by file:
  image -> `data/image.py` (preprocess) -> `models/vit.py` -> `models/qformer.py` -> `models/opt.py` -> logits
  (`models/blip2.py` composes them; `forward.py` is the single-example view editors and scoring use).
The path of one edit:
  `case.py` -> `editors/{ft,mend,ke}.py` -> `patch.py` (low-rank / dense patches) -> `forward.py` (patched forward)
  -> `eval/scoring.py` + `eval/metrics.py` (the five metrics) -> `eval/harness.py` (batches, rows on disk).
README.md "How it fits together" lists every file and which way imports point.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import mmedit_jax` stays cheap (no jax/orbax import until a model is loaded).
    if name == "from_pretrained":
        from mmedit_jax.loading import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'mmedit_jax' has no attribute {name!r}")
