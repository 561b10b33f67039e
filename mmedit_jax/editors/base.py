"""What every editor is to the rest of the code: `Editor`, a pure per-case edit function and its weights.

An editor is `edit(editor_params, base_params, case, prior) -> patch` for ONE case (`case.py`); the harness and the
trainer vmap it over a batch of independent cases (each edit sees the unedited model, as the reference's
single-edit protocol) and jit the whole edit + score step. `prior` is the patch already applied (sequential
editing); it is `{}` for independent edits. The editor closes over the `ModelFns` it edits (`fns`), and that same
object decides how images enter (`fns.uses_pixels`), so nobody builds a second one that could disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mmedit_jax.forward import ModelFns


@dataclasses.dataclass(frozen=True)
class Editor:
    """An editor as the harness and trainer see it.

    name: `ft-l`, `ft-v`, `mend`, `ke`, `ike`.
    edit: `(editor_params, base_params, case, prior) -> patch`, for one case, pure and vmappable.
    fns: the model's single-example forward functions the edit runs (and scoring must run: same image inputs).
    editor_params: trained hypernetwork weights (None for FT).
    prepare: `(cases, records) -> cases`, host-side inputs the edit needs beyond the five (IKE's contexts).
    composes: patches stack (`patch.accumulate`: sequential editing); False for IKE's contexts.
    resumes: `edit` also takes `prefix=(h [L, D], k)`, the unedited hidden states of `case.edit` entering
      language-model layer k (no site of the editor lies below k), and then runs its forwards from there.
    """

    name: str
    edit: Callable[..., dict]
    fns: ModelFns
    editor_params: Any = None
    hparams: Any = None
    resumes: bool = False
    prepare: Callable[..., Any] | None = None
    composes: bool = True

    def prepare_cases(self, cases, records):
        """Host `Case`s (leading `[N]`) with whatever per-case inputs this editor reads besides the five inputs
        (IKE: its demonstration contexts, from the `records` the cases were made of); the cases as they are for
        an editor without `prepare`."""
        return cases if self.prepare is None else self.prepare(cases, records)

    @property
    def uses_pixels(self) -> bool:
        """Images must enter this editor's cases as pixels (it edits the vision side, or the cache is off)."""
        return self.fns.uses_pixels
