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

from mmedit_jax.case import Case, make_cases, take
from mmedit_jax.convert.text_encoder import load_text_encoder
from mmedit_jax.data.cases import CaseConfig, ImageTable, build_edit_batch, input_lengths, max_lengths
from mmedit_jax.data.image import load_image
from mmedit_jax.data.mmedit import load_mmedit
from mmedit_jax.editors import ft, ike
from mmedit_jax.editors.base import Editor
from mmedit_jax.editors.hparams import load_hparams
from mmedit_jax.editors.io import load_ke, load_mend, load_serac
from mmedit_jax.editors.ke import make_ke
from mmedit_jax.editors.mend import make_mend
from mmedit_jax.editors.serac import make_serac
from mmedit_jax.forward import Blip2Fns, fns_for
from mmedit_jax.loading import from_pretrained
from mmedit_jax.models import presets
from mmedit_jax.sites import easyedit_site
from mmedit_jax.training.config import TrainConfig
from mmedit_jax.training.trainables import KINDS as TRAINABLE  # those `python -m mmedit_jax.train` trains
from mmedit_jax.training.trainables import build_trainable
from mmedit_jax.world import assets

EDITORS = ("ft-l", "ft-v", "mend", "ke", "serac", "ike")  # every editor the CLIs and `build_editor` know


# --------------------------------------------------------------------------------------------------
# Loading.


def load_tokenizer(directory: str):
    """transformers' `AutoTokenizer` from `directory` (imported here: importing transformers costs seconds)."""
    if importlib.util.find_spec("torch") is None:  # transformers' "PyTorch was not found" advice: not needed here
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def load_model(model_dir: str, tokenizer_dir: str | None = None, image_size: int | None = None,
               dtype: str = "float32"):
    """`(Blip2Model, tokenizer)` from a converted or Hugging Face directory (tokenizer files beside the model,
    or in `tokenizer_dir`)."""
    return (from_pretrained(model_dir, dtype=dtype, image_size=image_size),
            load_tokenizer(tokenizer_dir or model_dir))


def preset_model(name: str, tokenizer_dir: str, dtype: str = "float32", seed: int = 0):
    """`(Blip2Model, tokenizer)`: a random-weight BLIP-2 at a preset's real sizes (`models/presets.py`) with the
    special ids of the tokenizer in `tokenizer_dir` (the built-in world's, for its cases)."""
    tok = load_tokenizer(tokenizer_dir)
    image_token = tok.convert_tokens_to_ids("<image>")
    config = presets.with_tokens(presets.preset(name), image_token, tok.pad_token_id, tok.bos_token_id,
                                 tok.eos_token_id, vocab=len(tok))
    return presets.random_model(config, seed, dtype), tok


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
                 feature_cache: bool = True, *, tok=None, task: str = "vqa", bank_data: str | None = None,
                 image_root: str | None = None, sentence_encoder: str | None = None, log=print) -> Editor:
    """An `Editor` for `model` (a `Blip2Model`); `hparams` in EasyEdit key names override the defaults.

    IKE also takes the model's tokenizer `tok`, the `task`, the MMEdit file of its demonstration bank
    (`bank_data`, a training split, images under `image_root`) and a sentence encoder directory
    (all-MiniLM-L6-v2, with its tokenizer; without one, `editors.ike.tfidf_embedder` over `tok`)."""
    hparams = dict(hparams or {})
    if name == "ike":
        if not bank_data:
            raise SystemExit("--editor ike needs a demonstration bank: --ike-bank TRAIN.json (the built-in world "
                             "uses its train split)")
        records = load_split(bank_data, task, image_root, log=log).records
        return build_ike(model, tok, task, records, hparams, sentence_encoder, feature_cache, log)
    if name in ("ft-l", "ft-v"):
        names = hparams.get("inner_params")
        if name == "ft-v" and (names is None or names == ["Qformer"]):
            sites = ft.ft_v_sites(model.params, model.stacks)
        elif names is None:
            sites = ft.ft_l_sites(model.config.text.num_hidden_layers, modules=ft.mlp_modules(model.params))
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


def build_ike(model, tok, task: str, bank_records, hparams: dict, sentence_encoder: str | None = None,
              feature_cache: bool = True, log=print, max_positions: int | None = None) -> Editor:
    """IKE on `model`: the bank of `bank_records` embedded once, with all-MiniLM-L6-v2 (`sentence_encoder`) or
    the TF-IDF stand-in. `hparams`: `k` (EasyEdit's), `own_demo`, `truncate`, `pad_multiple`. Contexts fit
    `max_positions` (default the model's) beside each case's longest input."""
    if tok is None or not bank_records:
        raise SystemExit("--editor ike needs the model's tokenizer and a demonstration bank (a training split: "
                         "--ike-bank FILE; the built-in world uses its train split)")
    if sentence_encoder:
        from transformers import AutoTokenizer  # here, not at the top: importing transformers costs seconds

        config, params = load_text_encoder(sentence_encoder)
        embed = ike.encoder_embedder(config, params, AutoTokenizer.from_pretrained(sentence_encoder))
        log(f"IKE: sentence encoder {sentence_encoder}")
    else:
        embed = ike.tfidf_embedder(tok, ike.bank_sentences(bank_records, task))
        log("IKE: no sentence encoder given: demos ranked by TF-IDF over the model's tokens (a stand-in for "
            "all-MiniLM-L6-v2)")
    bank = ike.build_bank(bank_records, task, embed)
    cfg = ike.config_from_hparams(hparams)
    log(f"IKE: bank of {len(bank.sentences)} sentences from {len(bank_records)} records, k={cfg.k}")
    # The context goes after the whole image block: MiniGPT-4's wrapper closes it ('</Img> ') before the text.
    image_block = model.config.num_query_tokens + sum(image_wrap(model.config, tok))
    return ike.make_ike(fns_for(model, (), feature_cache), image_block,
                        max_positions or model.config.text.max_position_embeddings, tok, task, bank, embed, cfg,
                        log=log)


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
    records: list = dataclasses.field(default_factory=list)  # the kept records, in `batch` order


def prepare_data(records, tok, model, task: str, pad_multiple: int | None = None) -> Prepared:
    """Token arrays for every record (one padded length per input: one compiled program) and the images at the
    model's image size. Lengths are the configured buckets, or with `pad_multiple` the longest input rounded up
    to a multiple of it (`data.cases.max_lengths`).

    A record with an input longer than the language model's positions is dropped and reported in `dropped`
    (never truncated or run past the position table, which would score it silently wrong); none left is an error.
    """
    cfg = CaseConfig(task=task, num_query_tokens=model.config.num_query_tokens,
                     image_token_id=model.config.image_token_index, **image_wrapper(model.config, tok))
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
    vocab, image_id = model.config.text.vocab_size, model.config.image_token_index
    ids = np.concatenate([np.ravel(x) for x in (batch.edit.input_ids, batch.rephrase.input_ids,
                                                batch.image_rephrase.input_ids, batch.loc.input_ids,
                                                batch.loc_image.input_ids)])
    top = int(np.max(ids[ids != image_id], initial=0))  # image slots are spliced, never looked up (MiniGPT-4's
    if top >= vocab:  # sit past the table); another id past it would read NaN in the compiled forward, not fail
        raise ValueError(f"token id {top} is outside the model's vocabulary of {vocab}: the tokenizer "
                         f"({len(tok)} tokens) does not belong to this model")
    return Prepared(batch, images.stack(), [record_meta(r) for r in records], dropped, list(records))


def image_wrapper(config, tok) -> dict:
    """`CaseConfig`'s `image_before` / `image_after`: MiniGPT-4's prompt pieces around the image, each tokenized on
    its own without special tokens (EasyEdit's `MiniGPT4`); nothing for BLIP-2."""
    pieces = {"image_before": getattr(config, "prompt_before", ""), "image_after": getattr(config, "prompt_after", "")}
    return {k: tuple(tok(v, add_special_tokens=False)["input_ids"]) if v else () for k, v in pieces.items()}


def image_wrap(config, tok) -> tuple[int, int]:
    """How many tokens `image_wrapper`'s pieces take before and after the image slots (SERAC's `image_wrap`)."""
    pieces = image_wrapper(config, tok)
    return len(pieces["image_before"]), len(pieces["image_after"])


def record_meta(record) -> dict:
    """What a run's per-case row says of its record: index, the texts, and the three images' paths (absolute)."""
    out = {k: getattr(record, k) for k in ("index", "src", "pred", "alt", "rephrase", "loc", "loc_ans", "m_loc_q",
                                           "m_loc_a")}
    out.update({k: os.path.abspath(getattr(record, k)) for k in ("image", "image_rephrase", "m_loc")})
    return out


def fresh_trainable(kind: str, model, hparams: dict | None = None, layers: int = 3):
    """The MEND or KE trainable (`training.trainables`) over fc1/fc2 of the language model's last `layers` layers;
    `model.params` may be abstract (shapes only)."""
    n = model.config.text.num_hidden_layers
    sites = tuple(f"language_model/layers/{i}/{fc}" for i in range(n - layers, n) for fc in ("fc1", "fc2"))
    return build_trainable(kind, model, hparams or {}, TrainConfig(inner_params=sites))


def fresh_editor(kind: str, model, prepared: Prepared, hparams: dict | None = None, layers: int = 3,
                 seed: int = 0, stats_cases: int = 8) -> tuple[Editor, Case]:
    """`(editor, its cases)`: an untrained MEND or KE over fc1/fc2 of the language model's last `layers` layers
    (EasyEdit's BLIP-2 choice: 3), sized by `hparams` (EasyEdit's defaults: MEND rank 1920), initialised as
    meta-training starts (`training.trainables`). Its numbers mean nothing; its shapes and FLOPs are real, for
    timing where no trained editor exists. MEND's input statistics are merged from the edit gradients of the
    first `stats_cases` cases (the trainer's first step does the same), so its normalisation is non-degenerate."""
    import jax  # here: the rest of this module runs on the host

    trainable = fresh_trainable(kind, model, hparams, layers)
    params, state = trainable.init(jax.random.PRNGKey(seed))
    cases = cases_for(trainable.fns, model.params, prepared)
    if kind == "mend":
        some = take(cases, np.arange(min(stats_cases, len(prepared.meta))))
        merge = jax.jit(lambda p, st, base, c: trainable.batch_patches(p, st, base, c, True)[1])
        state = merge(params, state, model.params, some)
    return trainable.editor(params, state), cases


def cases_for(fns: Blip2Fns, params, prepared: Prepared) -> Case:
    """Host `Case`s (leading `[N]`) with images as `fns` takes them (embeddings computed once, or pixels)."""
    return make_cases(prepared.batch, fns.image_table(params, prepared.pixels))


def editor_cases(editor: Editor, params, prepared: Prepared) -> Case:
    """`cases_for` with the editor's own per-case inputs added (`Editor.prepare_cases`: IKE's contexts)."""
    return editor.prepare_cases(cases_for(editor.fns, params, prepared), prepared.records)


def decoder(tok):
    """`ids -> text` for the per-case rows."""
    return lambda ids: tok.decode([int(i) for i in ids])


def world_train_data(task: str = "vqa", cache_dir: str | None = None) -> str:
    """The built-in world's training split (IKE's demonstration bank there)."""
    return assets.ensure(task, cache_dir=cache_dir).train_json


def world_inputs(task: str = "vqa", cache_dir: str | None = None, family: str = "blip2"):
    """The built-in world with its `family`'s model ("blip2" | "minigpt4"), the one every editor runs on:
    `(model dir, tokenizer dir, eval file, image root, {editor: shipped checkpoint})`."""
    w = assets.ensure(task, cache_dir=cache_dir, family=family)
    return w.model_dir, w.tokenizer_dir, w.eval_json, w.image_root, w.editor_ckpts
