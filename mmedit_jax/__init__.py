"""mmedit_jax: multimodal knowledge editing (MMEdit) in JAX/Flax.

The path of one forward pass, by file:
  image -> `data/image.py` (preprocess) -> `models/vit.py` -> `models/qformer.py` -> `models/opt.py` -> logits
  (`models/blip2.py` composes them).
The path of one edit:
  case -> `editors/*.py` (FT, MEND, KE) -> `patch.py` (low-rank / dense patches) -> `eval/metrics.py`.
"""

__version__ = "0.1.0"
