"""The two compiled programs of an evaluation, over a batch of E independent cases: pre-edit outputs, and edit +
post-edit scores (`vmap(editor.edit)` -> patches `[E, ...]` -> `vmap(post_scores)`; base parameters unbatched).

When every patch leaves the language model's layers below some k alone (MEND, KE, FT-L on late layers), the
pre-edit program keeps every input's hidden states at layer k, and the editor's forwards and all post-edit
passes start there (the frozen-prefix cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmedit_jax.case import Case
from mmedit_jax.editors.base import Editor
from mmedit_jax.eval.scoring import post_scores, pre_outputs
from mmedit_jax.sites import layer_of


def first_edited_layer(sites) -> int | None:
    """The lowest language-model layer among patch `sites` (`language_model/layers/<i>/...`), or None when a
    site lies outside the language model's layer stack (vision side, embeddings, head) or layer 0 is edited:
    then no unedited prefix of the stack can be shared."""
    layers = [layer_of(site) for site in sites]
    if None in layers:
        return None
    k = min(layers, default=0)
    return k if k > 0 else None


def prefix_layer(editor: Editor, params, case: Case) -> int | None:
    """The layer k from which the post-edit passes can reuse the pre-edit hidden states, or None.

    `case` is one case (no batch axis); only its shapes matter: the patch's sites come from `jax.eval_shape`
    of `editor.edit`. None where the editor's model cannot split its forward (it runs pixels).
    """
    if not editor.fns.supports_prefix:
        return None
    patch = jax.eval_shape(lambda c: editor.edit(editor.editor_params, params, c, {}), case)
    return first_edited_layer(patch)


def make_step_fns(editor: Editor, exact_match: bool, base_accuracy: bool = True, prefix_layer: int | None = None):
    """`(pre_fn(params, cases), edit_fn(editor_params, params, cases, pre))`, both jitted over `[E]` cases.

    `base_accuracy=False` leaves the unedited model's accuracies out of the pre-edit program (the five metrics
    do not need them; throughput timing uses it, as the reference's per-record step computes none).
    `prefix_layer` k (from `prefix_layer()`; every patch must leave the layers below k alone) turns on the
    frozen-prefix cache: the pre-edit program also returns every input's hidden states entering layer k
    (`hidden_edit`, ..., `hidden_loc_image` `[E, L, D]`); the post-edit passes, and the editor's own forwards
    where it `resumes`, run layers k.. only. `edit_fn`'s scores carry
    `finite`: whether every entry of the edit's patch is finite.
    """
    model, k = editor.fns, prefix_layer

    @jax.jit
    def pre_fn(params, cases: Case):
        return jax.vmap(lambda c: pre_outputs(model, params, c, exact_match, base_accuracy, k))(cases)

    resume = k is not None and editor.resumes

    @jax.jit
    def edit_fn(editor_params, params, cases: Case, pre):
        def one(case, pre_c):
            kw = {"prefix": (pre_c["hidden_edit"], k)} if resume else {}
            patch = editor.edit(editor_params, params, case, {}, **kw)
            scores = post_scores(model, params, patch, case, pre_c, exact_match, k)
            # A NaN or inf in the patch would still give numbers (argmax of NaN logits): flag it, never hide it.
            leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(patch)]
            return dict(scores, finite=jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True))

        return jax.vmap(one)(cases, pre)

    return pre_fn, edit_fn
