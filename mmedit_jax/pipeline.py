"""From files to what the harness and the trainer take: model, tokenizer and split loading, the one editor
registry, and case preparation (token arrays, the image table the editor's forward wants, host `Case`s).

The command-line shells (`evaluate.py`, `bench.py`, `train.py`) are argparse around these functions; notebooks and
benchmarks call them directly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np

from mmedit_jax.case import Case, make_cases
from mmedit_jax.data.cases import CaseConfig, ImageTable, build_edit_batch, input_lengths, max_lengths
from mmedit_jax.data.image import load_image
from mmedit_jax.data.mmedit import load_mmedit
from mmedit_jax.editors import ft
from mmedit_jax.editors.base import Editor
from mmedit_jax.editors.hparams import load_hparams
from mmedit_jax.editors.io import load_ke, load_mend, load_serac
from mmedit_jax.editors.ke import make_ke
from mmedit_jax.editors.mend import make_mend
from mmedit_jax.editors.serac import make_serac
from mmedit_jax.forward import Blip2Fns, fns_for
from mmedit_jax.loading import from_pretrained
from mmedit_jax.sites import easyedit_site
from mmedit_jax.training.trainables import KINDS as TRAINABLE  # those `python -m mmedit_jax.train` trains
from mmedit_jax.world import assets

EDITORS = ("ft-l", "ft-v", "mend", "ke", "serac")  # every editor the CLIs and `build_editor` know


# --------------------------------------------------------------------------------------------------
# Loading.


def load_model(model_dir: str, tokenizer_dir: str | None = None, image_size: int | None = None):
    """`(Blip2Model, tokenizer)` from a converted or Hugging Face directory (tokenizer files beside the model,
    or in `tokenizer_dir`)."""
    if importlib.util.find_spec("torch") is None:  # transformers' "PyTorch was not found" advice: not needed here
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer  # here, not at the top: importing transformers costs seconds

    return from_pretrained(model_dir, image_size=image_size), AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)


def task_of(data: str, task: str | None = None) -> str:
    """The task of an MMEdit file: `task` if given, else "caption" when the file name says so, else "vqa"."""
    return task or ("caption" if "caption" in os.path.basename(data) else "vqa")


def load_split(data: str, task: str, image_root: str, rephrase_root: str | None = None, *, limit: int | None = None,
               strict: bool = False, log=print):
    """The usable records of an MMEdit file (`data.mmedit.load_mmedit`); `log` gets the count and the first
    problems. A file with no usable record is an error."""
    loaded = load_mmedit(data, task, image_root, rephrase_root, size=limit, strict=strict)
    log(f"{data}: {loaded.summary()}")
    for p in loaded.problems[:10]:
        log(f"  record {p.index}, {p.field}: {p.message}")
    if not loaded.records:
        raise SystemExit(f"{data}: no usable records")
    return loaded


def load_report(loaded, prepared: Prepared | None = None) -> dict:
    """What a run's summary records of its data file: how many records were read, kept, skipped (by which of the
    reference's rules) and rejected (with the first problems), and those the model could not take."""
    out = {"in_file": loaded.n_in_file, "read": loaded.n_read, "kept": len(loaded.records),
           "skipped": {reason: len(ids) for reason, ids in loaded.skipped.items()},
           "rejected": len(loaded.rejected), "problems": [str(p) for p in loaded.problems[:20]]}
    if prepared is not None:
        out.update(kept=len(prepared.meta), too_long=len(prepared.dropped), too_long_records=prepared.dropped[:20])
    return out


def read_hparams(path: str | None) -> dict:
    """Editor hparams from a YAML in EasyEdit's keys, `{}` without one."""
    return load_hparams(path) if path else {}


def exact_match_of(hparams: dict, token_accuracy: bool = False) -> bool:
    """Exact match (EasyEdit's BLIP-2 configs) unless the flag or the config asks for token accuracy."""
    return not token_accuracy and bool(hparams.get("exact_match", True))


# --------------------------------------------------------------------------------------------------
# Editors.


def build_editor(name: str, model, hparams: dict | None = None, editor_ckpt: str | None = None,
                 feature_cache: bool = True) -> Editor:
    """An `Editor` for `model` (a `Blip2Model`); `hparams` in EasyEdit key names override the defaults."""
    hparams = dict(hparams or {})
    if name in ("ft-l", "ft-v"):
        names = hparams.get("inner_params")
        if name == "ft-v" and (names is None or names == ["Qformer"]):
            sites = ft.ft_v_sites(model.params, model.stacks)
        elif names is None:
            sites = ft.ft_l_sites(model.config.text.num_hidden_layers)
        else:
            sites = tuple(easyedit_site(n) for n in names)
        keys = {f.name for f in dataclasses.fields(ft.FTConfig)} - {"inner_params"}
        cfg = ft.FTConfig(inner_params=sites, **{k: v for k, v in hparams.items() if k in keys})
        return ft.make_ft(name, fns_for(model, sites, feature_cache), cfg, model.params, model.stacks)
    if name in TRAINABLE and editor_ckpt is None:
        raise SystemExit(f"--editor {name} needs --editor-ckpt (an editor trained by `python -m mmedit_jax.train`"
                         + (", or an EasyEdit checkpoint converted with `python -m mmedit_jax.convert mend-easyedit`)"
                            if name == "mend" else ")"))
    if name == "mend":
        spec, net, stats = load_mend(editor_ckpt)
        return make_mend(spec, fns_for(model, spec.sites, feature_cache), net, stats)
    if name == "ke":
        spec, net = load_ke(editor_ckpt)
        return make_ke(spec, fns_for(model, spec.sites, feature_cache), net)
    if name == "serac":
        cfg, net = load_serac(editor_ckpt)
        return make_serac(cfg, fns_for(model, (), feature_cache), net)
    raise SystemExit(f"editor {name!r} is not available (choose from {', '.join(EDITORS)})")


# --------------------------------------------------------------------------------------------------
# Cases.


@dataclasses.dataclass
class Prepared:
    """A split as token arrays and pixels: `batch` (`data.cases.EditBatch` over every kept record), `pixels`
    `[N_images, 3, S, S]` (each distinct image once), `meta` (index, src, alt per kept record), `dropped`
    (`{"index", "reason"}` of records the model cannot take)."""

    batch: object
    pixels: np.ndarray
    meta: list[dict]
    dropped: list[dict] = dataclasses.field(default_factory=list)


def prepare_data(records, tok, model, task: str, pad_multiple: int | None = None) -> Prepared:
    """Token arrays for every record (one padded length per input: one compiled program) and the images at the
    model's image size. Lengths are the configured buckets, or with `pad_multiple` the longest input rounded up
    to a multiple of it (`data.cases.max_lengths`).

    A record with an input longer than the language model's positions is dropped and reported in `dropped`
    (never truncated or run past the position table, which would score it silently wrong); none left is an error.
    """
    cfg = CaseConfig(task=task, num_query_tokens=model.config.num_query_tokens,
                     image_token_id=model.config.image_token_index)
    limit = model.config.text.max_position_embeddings
    lengths = input_lengths(records, tok, cfg)
    too_long = {}
    for name, n in lengths.items():
        for i in np.nonzero(n > limit)[0]:
            too_long.setdefault(int(i), f"input {name!r} has {int(n[i])} tokens, more than the model's {limit} "
                                        "positions")
    dropped = [{"index": records[i].index, "reason": why} for i, why in sorted(too_long.items())]
    if too_long:
        keep = [i for i in range(len(records)) if i not in too_long]
        if not keep:
            raise SystemExit(f"no record fits the model's {limit} positions (first: {dropped[0]['reason']})")
        records = [records[i] for i in keep]
        lengths = {name: n[keep] for name, n in lengths.items()}
    images = ImageTable(lambda p: load_image(p, model.config.vision.image_size))
    batch = build_edit_batch(records, tok, images, cfg,
                             lengths=max_lengths(records, tok, cfg, pad_multiple, lengths=lengths))
    return Prepared(batch, images.stack(), [record_meta(r) for r in records], dropped)


def record_meta(record) -> dict:
    """What a run's per-case row says of its record: index, the texts, and the three images' paths (absolute)."""
    out = {k: getattr(record, k) for k in ("index", "src", "pred", "alt", "rephrase", "loc", "loc_ans", "m_loc_q",
                                           "m_loc_a")}
    out.update({k: os.path.abspath(getattr(record, k)) for k in ("image", "image_rephrase", "m_loc")})
    return out


def cases_for(fns: Blip2Fns, params, prepared: Prepared) -> Case:
    """Host `Case`s (leading `[N]`) with images as `fns` takes them (embeddings computed once, or pixels)."""
    return make_cases(prepared.batch, fns.image_table(params, prepared.pixels))


def decoder(tok):
    """`ids -> text` for the per-case rows."""
    return lambda ids: tok.decode([int(i) for i in ids])


def world_inputs(task: str = "vqa", cache_dir: str | None = None):
    """The built-in world: `(model dir, tokenizer dir, eval file, image root, {editor: shipped checkpoint})`."""
    w = assets.ensure(task, cache_dir=cache_dir)
    return w.model_dir, w.tokenizer_dir, w.eval_json, w.image_root, w.editor_ckpts
