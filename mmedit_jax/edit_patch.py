"""Patches as a user holds them: with their provenance, in batches, composed, and in safetensors files.

`patch.py` defines the values (`{site: LowRank | Dense}`); this module adds what a patch needs once it leaves
the program that made it:

  * `EditPatch`: a patch dict that also says which editor made it, for which model (a fingerprint of the model's
    config and weights, and the model's name) and from which edits (`(prompt, target)` pairs). It is a `dict`:
    indexing by site, `.items()`, and every function of `patch.py` work unchanged. To jax it is the plain dict it
    holds (the metadata is not part of the pytree), so it goes through `jit`/`vmap` without a recompile per edit;
    `jax.tree.map` over it returns a plain dict.
  * `PatchBatch`: E independent edits as one stacked patch (every leaf with a leading `[E]` axis, what the
    vmapped editor returns). It is a sequence: `len(batch)`, `batch[i]` (an `EditPatch`), iteration; `.stacked` is
    the `[E]` dict to vmap over.
  * `ContextPatch` / `ContextBatch`: an in-context edit (IKE) changes no weight; it is the demonstration context
    that precedes every question asked under it (text and token ids), with the same provenance.
  * `MemoryPatch` / `MemoryBatch`: a SERAC edit is its memory (the edit's classifier key and counterfactual
    context); the editor's networks that read it travel beside it by reference (`router`), never copied.
  * `compose`: several independent edits applied at once (the sum of their deltas).
  * `save_patch` / `load_patch`: one safetensors file with the metadata in its header.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from mmedit_jax import patch as P

FORMAT = "mmedit_jax.patch/1"
SEP = "::"  # file keys: "<site>::a", "<site>::b", "<site>::scale" (LowRank) or "<site>::delta" (Dense)


class PatchMismatch(ValueError):
    """A patch made for one model applied to another, or composed with a patch of another model."""


class EditPatch(dict):
    """`{site: LowRank | Dense}` plus where it came from.

    editor: the editor's name ("mend", "ke", "ft-l", "ft-v"; "mend+ke" for a composition of several).
    model: the fingerprint of the model it was computed against (hex digest), None when unknown.
    model_name: that model's name as loaded ("world" or a directory), for messages.
    edits: the `(prompt, target)` of every edit it holds (a composition holds several).
    """

    def __init__(self, deltas=(), *, editor: str | None = None, model: str | None = None,
                 model_name: str | None = None, edits=()):
        super().__init__(deltas)
        self.editor = editor
        self.model = model
        self.model_name = model_name
        self.edits = tuple((str(p), str(t)) for p, t in edits)

    def meta(self) -> dict:
        return {"editor": self.editor, "model": self.model, "model_name": self.model_name, "edits": self.edits}

    def with_deltas(self, deltas) -> EditPatch:
        """Other deltas, the same provenance."""
        return EditPatch(deltas, **self.meta())

    def __repr__(self) -> str:
        sites = ", ".join(f"{s}: {type(d).__name__}" for s, d in self.items())
        fp = (self.model or "?")[:12]
        return (f"EditPatch(editor={self.editor!r}, model={self.model_name!r} ({fp}), edits={list(self.edits)!r}, "
                f"{{{sites}}})")

    # dict's copy() would drop the metadata
    def copy(self) -> EditPatch:
        return self.with_deltas(self)


def _flatten(p: EditPatch):
    keys = sorted(p)
    return [p[k] for k in keys], tuple(keys)


jax.tree_util.register_pytree_node(EditPatch, _flatten, lambda keys, values: dict(zip(keys, values)))


@dataclasses.dataclass
class PatchBatch:
    """E independent edits: `stacked` is `{site: delta}` with a leading `[E]` axis on every leaf (what a vmapped
    editor returns, and what a vmapped forward takes); `batch[i]` is edit i as an `EditPatch`."""

    stacked: dict
    editor: str | None = None
    model: str | None = None
    model_name: str | None = None
    edits: tuple = ()

    def __len__(self) -> int:
        leaves = jax.tree.leaves(self.stacked)
        return int(leaves[0].shape[0]) if leaves else len(self.edits)

    def __getitem__(self, i):
        if isinstance(i, slice):
            idx = np.arange(len(self))[i]
            edits = tuple(self.edits[j] for j in idx) if len(self.edits) == len(self) else ()
            return PatchBatch(jax.tree.map(lambda a: a[idx], dict(self.stacked)), self.editor, self.model,
                              self.model_name, edits)
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"edit {i} of a batch of {n}")
        i = int(i) % n
        return EditPatch(jax.tree.map(lambda a: a[i], dict(self.stacked)), editor=self.editor, model=self.model,
                         model_name=self.model_name,
                         edits=self.edits[i : i + 1] if len(self.edits) == n else ())

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def meta(self) -> dict:
        return {"editor": self.editor, "model": self.model, "model_name": self.model_name, "edits": self.edits}

    def __repr__(self) -> str:
        return (f"PatchBatch({len(self)} edits, editor={self.editor!r}, model={self.model_name!r}, "
                f"sites={list(self.stacked)})")


jax.tree_util.register_pytree_node(PatchBatch, lambda b: ((dict(b.stacked),), None),
                                   lambda _, children: children[0])


class _Made:
    """What a value edit says of where it came from, as `EditPatch` does: `editor`, `model` (fingerprint),
    `model_name`, `edits` (fields of the dataclasses below)."""

    def meta(self) -> dict:
        return {"editor": self.editor, "model": self.model, "model_name": self.model_name, "edits": self.edits}

    def _made_for(self) -> str:
        fp = (self.model or "?")[:12]
        return f"editor={self.editor!r}, model={self.model_name!r} ({fp}), edits={list(self.edits)!r}"


class _Edits(tuple):
    """E independent value edits, one per question: `batch[i]` is edit i."""

    def __repr__(self) -> str:
        name = self[0].model_name if self else None
        editor = self[0].editor if self else None
        return f"{type(self).__name__}({len(self)} edits, editor={editor!r}, model={name!r})"


@dataclasses.dataclass(frozen=True, repr=False)
class ContextPatch(_Made):
    """An in-context edit (IKE): `text`, the demonstrations and the "New Fact" line that precede every question
    asked under the edit (after its image), and `ids`, that text as the model's tokenizer splits it. Provenance as
    `EditPatch`'s (`editor`, `model` fingerprint, `model_name`, `edits`); the ids belong to that model's tokenizer."""

    text: str
    ids: tuple
    editor: str | None = "ike"
    model: str | None = None
    model_name: str | None = None
    edits: tuple = ()

    def __repr__(self) -> str:
        return f"ContextPatch({self._made_for()}, {len(self.ids)} context tokens)"


class ContextBatch(_Edits):
    """E in-context edits: a tuple of `ContextPatch`es (`batch[i]` is edit i); answered one question per edit."""


@dataclasses.dataclass(frozen=True, repr=False)
class MemoryPatch(_Made):
    """A SERAC edit: `memory`, the editor's memory value (`editors.serac_net.Memory`, `[C]` slots: one per edit it
    holds), and `router`, what reads it: `(fns, net)`, the editor's routed forward and its networks, shared by
    reference with the editor (not part of the value: not compared, not copied). Provenance as `EditPatch`'s."""

    memory: object
    router: object = dataclasses.field(compare=False)
    editor: str | None = "serac"
    model: str | None = None
    model_name: str | None = None
    edits: tuple = ()

    def __repr__(self) -> str:
        return f"MemoryPatch({self._made_for()}, {len(self.edits) or '?'} memory slots)"


class MemoryBatch(_Edits):
    """E independent SERAC edits: a tuple of `MemoryPatch`es (`batch[i]` is edit i, a memory of its own)."""


def _compose_memories(flat) -> MemoryPatch:
    """SERAC edits together: one memory holding every edit's slots, in order (what SERAC's multi-edit memory
    is; the classifier routes each query to its nearest slot)."""
    if not all(isinstance(p, MemoryPatch) for p in flat):
        raise TypeError("a SERAC memory composes only with other SERAC memories (weight patches add to kernels; a "
                        "memory routes around the model)")
    if any(p.router is not flat[0].router for p in flat) or len({p.model for p in flat}) > 1:
        raise PatchMismatch("cannot compose memories of different SERAC editors or models")
    memory = jax.tree.map(lambda *slots: jnp.concatenate(slots, axis=0), *(p.memory for p in flat))
    return MemoryPatch(memory, flat[0].router, flat[0].editor, flat[0].model, flat[0].model_name,
                       tuple(e for p in flat for e in p.edits))


def provenance(patch) -> dict:
    """`{"editor", "model", "model_name", "edits"}` of an `EditPatch` / `PatchBatch` / `ContextPatch` /
    `MemoryPatch`; Nones for a plain dict."""
    if isinstance(patch, (EditPatch, PatchBatch, ContextPatch, MemoryPatch)):
        return patch.meta()
    return {"editor": None, "model": None, "model_name": None, "edits": ()}


def compose(*patches) -> EditPatch:
    """Several independent edits applied at once: the sum of their deltas, site by site (`patch.compose`).

    What it means, per editor: every edit of FT-L/FT-V (dense deltas), MEND and KE (low-rank deltas, whose
    factors are concatenated: the ranks add up) was computed against the UNEDITED model, and the composition is
    `W + delta_1 + delta_2 + ...`. That is not sequential editing (where edit 2 would be computed against the
    model already carrying edit 1 and could correct for it): two edits that touch the same rows of the same
    matrices can interfere, and nothing here corrects for that. Deltas of different editors compose too (they
    are all sums on kernels). Patches made for different models are refused (`PatchMismatch`).

    Accepts `EditPatch`es, plain patch dicts and `PatchBatch`es (each batch contributes all of its edits). SERAC
    memories (`MemoryPatch`, `MemoryBatch`) compose into one memory holding all their edits.
    """
    flat = []
    for p in patches:
        if isinstance(p, (ContextPatch, ContextBatch)):
            raise TypeError("in-context edits (IKE) do not compose: each is a context for its own questions; answer "
                            "under one ContextPatch at a time, or a ContextBatch one question per edit")
        flat.extend(p if isinstance(p, (PatchBatch, MemoryBatch)) else [p])
    if not flat:
        raise ValueError("compose needs at least one patch")
    if any(isinstance(p, MemoryPatch) for p in flat):
        return _compose_memories(flat)
    made_for = {(p.model, p.model_name) for p in flat if isinstance(p, EditPatch) and p.model is not None}
    if len({m for m, _ in made_for}) > 1:
        names = ", ".join(f"{n!r} ({m[:12]})" for m, n in sorted(made_for, key=str))
        raise PatchMismatch(f"cannot compose patches made for different models: {names}")
    model, model_name = next(iter(made_for), (None, None))
    editors = []
    for p in flat:
        name = provenance(p)["editor"]
        for part in (name or "?").split("+"):
            if part not in editors:
                editors.append(part)
    edits = tuple(e for p in flat for e in provenance(p)["edits"])
    return EditPatch(P.compose(*(dict(p) for p in flat)), editor="+".join(editors), model=model,
                     model_name=model_name, edits=edits)


# --------------------------------------------------------------------------------------------------
# Files.


def _tensors(deltas: dict) -> tuple[dict, list[str], list[str]]:
    tensors, sites, kinds = {}, [], []
    for site, d in deltas.items():
        if SEP in site:
            raise ValueError(f"site name {site!r} contains {SEP!r}")
        sites.append(site)
        if isinstance(d, P.LowRank):
            kinds.append("low_rank")
            for field in ("a", "b", "scale"):
                tensors[f"{site}{SEP}{field}"] = np.asarray(getattr(d, field))
        elif isinstance(d, P.Dense):
            kinds.append("dense")
            tensors[f"{site}{SEP}delta"] = np.asarray(d.delta)
        else:
            raise TypeError(f"site {site!r}: {type(d).__name__} is not a patch delta (LowRank or Dense)")
    return tensors, sites, kinds


def save_patch(patch, path: str | os.PathLike) -> str:
    """Writes an `EditPatch`, a `PatchBatch` or a plain patch dict to one safetensors file (atomically: a
    crash leaves the old file or none). The header's metadata: `format`, `editor`, `model_fingerprint`,
    `model_name`, `sites` and `kinds` (site order, LowRank/Dense), `batch` (E for a `PatchBatch`, "" otherwise)
    and `edits` (JSON). Returns the path."""
    from safetensors.numpy import save_file

    if isinstance(patch, (ContextPatch, ContextBatch)):
        raise TypeError("save_patch writes weight patches; an in-context edit (IKE) is its context: keep "
                        "patch.text (or rerun editor.edit, which retrieves the same demonstrations)")
    if isinstance(patch, (MemoryPatch, MemoryBatch)):
        raise TypeError("save_patch writes weight patches; a SERAC edit is a memory read by its editor's networks: "
                        "rerun editor.edit (it is one classifier pass per edit)")
    path = os.fspath(path)
    batch = isinstance(patch, PatchBatch)
    deltas = dict(patch.stacked if batch else patch)
    if not deltas:
        raise ValueError("save_patch: the patch is empty")
    tensors, sites, kinds = _tensors(deltas)
    meta = provenance(patch)
    header = {"format": FORMAT, "editor": meta["editor"] or "", "model_fingerprint": meta["model"] or "",
              "model_name": meta["model_name"] or "", "sites": json.dumps(sites), "kinds": json.dumps(kinds),
              "batch": str(len(patch)) if batch else "", "edits": json.dumps([list(e) for e in meta["edits"]])}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".patch-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_patch(path: str | os.PathLike):
    """What `save_patch` wrote: an `EditPatch` (or a `PatchBatch`) with the same sites, kinds, shapes, dtypes and
    values, as jax arrays, and its provenance. Errors name the file."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no patch file at {path}")
    try:
        with safe_open(path, "np") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); save the patch again") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a patch file of this version (format {header.get('format')!r}, expected "
                         f"{FORMAT!r})")
    try:
        sites, kinds = json.loads(header["sites"]), json.loads(header["kinds"])
        edits = [tuple(e) for e in json.loads(header.get("edits") or "[]")]
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: damaged patch header ({type(e).__name__}: {e})") from None
    deltas = {}
    try:
        for site, kind in zip(sites, kinds, strict=True):
            if kind == "low_rank":
                a, b, s = (jnp.asarray(tensors.pop(f"{site}{SEP}{k}")) for k in ("a", "b", "scale"))
                deltas[site] = P.LowRank(a, b, s)
            elif kind == "dense":
                deltas[site] = P.Dense(jnp.asarray(tensors.pop(f"{site}{SEP}delta")))
            else:
                raise ValueError(f"unknown delta kind {kind!r}")
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: damaged patch file (site {site!r}: {type(e).__name__}: {e})") from None
    if tensors:
        raise ValueError(f"{path}: damaged patch file (tensors {sorted(tensors)[:5]} belong to no site)")
    meta = dict(editor=header.get("editor") or None, model=header.get("model_fingerprint") or None,
                model_name=header.get("model_name") or None, edits=tuple(edits))
    if header.get("batch"):
        return PatchBatch(deltas, **meta)
    return EditPatch(deltas, **meta)
