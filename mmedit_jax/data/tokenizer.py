"""A small byte-level BPE tokenizer trained offline, shaped like OPT's GPT-2 BPE.

Real runs use the OPT-2.7B tokenizer (`GPT2Tokenizer`, no BOS added by the 2024 BLIP-2 wrapper because it
tokenizes with `add_special_tokens=False`). Tests and synthetic examples need a tokenizer with the same
properties (byte-level pre-tokenization, a leading space becoming part of the next token, `</s>` as BOS/EOS,
a distinct pad token, an `<image>` placeholder for BLIP-2 query slots) that builds in a second with no
network. `train_bpe_tokenizer` makes one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Order fixes the ids: <pad>=0, </s>=1, <unk>=2, <image>=3.
DEFAULT_SPECIALS = ("<pad>", "</s>", "<unk>", "<image>")
IMAGE_TOKEN = "<image>"


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    special: Sequence[str] = DEFAULT_SPECIALS,
) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer (GPT-2/OPT style) on `texts`.

    Args:
      texts: training sentences.
      vocab_size: total vocabulary size including the 256 byte symbols and the specials; must exceed
        256 + len(special), otherwise no merge would be learned.
      out_dir: if given, `save_pretrained` writes `tokenizer.json` + `tokenizer_config.json` there, loadable
        offline with `transformers.AutoTokenizer.from_pretrained(out_dir)`.
      special: special tokens, given ids 0.. in order. The first four are used as pad, eos/bos, unk and the
        image placeholder, so they must be present in that role order.

    Returns:
      A `PreTrainedTokenizerFast` with pad/eos/bos/unk set and `<image>` registered as an extra special token
      (so it is never split and `tok.convert_tokens_to_ids("<image>")` gives its id).
    """
    special = tuple(special)
    if len(special) < 4:
        raise ValueError(f"special must name at least (pad, eos, unk, image) tokens, got {special!r}")
    min_size = 256 + len(special) + 1
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} must be at least {min_size} (bytes + specials + 1)")
    pad, eos, unk, image = special[:4]

    tok = Tokenizer(models.BPE(unk_token=unk))
    # add_prefix_space=False like GPT-2/OPT: "a b" -> ["a", "Ġb"].
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=eos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=[image, *special[4:]],
    )
    fast.padding_side = "right"
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


def image_token_id(tok) -> int:
    """The id of the `<image>` placeholder token; raises if the tokenizer has none."""
    idx = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if idx is None or idx == tok.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_TOKEN!r} token")
    return int(idx)
