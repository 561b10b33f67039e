"""Model configs as frozen dataclasses (hashable, so they can be static arguments of `jax.jit`).

Field names follow transformers' `Blip2VisionConfig`, `Blip2QFormerConfig`, `OPTConfig`, `Blip2Config`,
`LlamaConfig`, `BertConfig` and `DistilBertConfig`, so `from_hf` / `to_hf` are plain renames. Training-only fields
(dropout, init ranges) are not kept: the models here run inference and editing, where dropout is off.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar


def _pick(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _as_int(x) -> int:
    """HF allows `image_size`/`patch_size` as int or (h, w); only square ones are supported here."""
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise ValueError(f"only square sizes are supported, got {x}")
        return int(x[0])
    return int(x)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """BLIP-2's EVA ViT (`Blip2VisionModel`)."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    # `post_layernorm`'s eps when it differs from the layers' (MiniGPT-4's `ln_vision`: 1e-5); None: `layer_norm_eps`.
    post_layernorm_eps: float | None = None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VisionConfig:
        d = _pick(cls, d)
        for k in ("image_size", "patch_size"):
            if k in d:
                d[k] = _as_int(d[k])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2's Q-Former (`Blip2QFormerModel`): BERT-like, cross-attention every `cross_attention_frequency`."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    # Kept only so `to_hf` round-trips; the query-only Q-Former of BLIP-2 uses no word embeddings.
    vocab_size: int = 30522
    max_position_embeddings: int = 512

    def __post_init__(self):
        if self.num_hidden_layers % self.cross_attention_frequency:
            raise ValueError(
                f"num_hidden_layers ({self.num_hidden_layers}) must be a multiple of "
                f"cross_attention_frequency ({self.cross_attention_frequency}): layers are scanned in groups"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> QFormerConfig:
        if d.get("use_qformer_text_input"):
            raise ValueError("Q-Former text input (InstructBLIP-style) is not supported")
        return cls(**_pick(cls, d))


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """A BERT encoder (`BertModel`; also MiniLM, e.g. sentence-transformers' all-MiniLM-L6-v2).

    `type_vocab_size == 0` means no token-type embeddings: how `DistilBertConfig.as_bert` describes DistilBERT.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0

    def as_bert(self) -> BertConfig:
        """The config `TextEncoder` runs with (itself; `DistilBertConfig` translates)."""
        return self

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> BertConfig:
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"not a BERT config: model_type={d.get('model_type')!r}")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported: encoders only")
        if d.get("position_embedding_type", "absolute") != "absolute":
            kind = d["position_embedding_type"]
            raise ValueError(f"position_embedding_type {kind!r} is not supported (absolute positions only)")
        return cls(**_pick(cls, d))


@dataclasses.dataclass(frozen=True)
class DistilBertConfig:
    """A DistilBERT encoder (`DistilBertModel`, e.g. EasyEdit's SERAC scope classifier distilbert-base-cased).

    The network is BERT's without token types: `as_bert` gives the `BertConfig` the encoder runs with.
    `sinusoidal_pos_embds` only changes how transformers initialises the position table; checkpoints store the
    table either way, so it is kept for the round trip and does not change the forward.
    """

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    activation: str = "gelu"
    pad_token_id: int | None = 0

    def as_bert(self) -> BertConfig:
        """The same network in BERT's terms; transformers fixes every DistilBERT LayerNorm eps at 1e-12."""
        return BertConfig(vocab_size=self.vocab_size, hidden_size=self.dim, num_hidden_layers=self.n_layers,
                          num_attention_heads=self.n_heads, intermediate_size=self.hidden_dim,
                          hidden_act=self.activation, max_position_embeddings=self.max_position_embeddings,
                          type_vocab_size=0, layer_norm_eps=1e-12, pad_token_id=self.pad_token_id)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> DistilBertConfig:
        if d.get("model_type", "distilbert") != "distilbert":
            raise ValueError(f"not a DistilBERT config: model_type={d.get('model_type')!r}")
        return cls(**_pick(cls, d))


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """The OPT decoder (`OPTForCausalLM`)."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2
    model_type: str = "opt"

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (`word_embed_proj_dim`, defaulting to `hidden_size`)."""
        return self.word_embed_proj_dim or self.hidden_size

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> OPTConfig:
        if d.get("model_type", "opt") != "opt":
            raise ValueError(f"text model {d.get('model_type')!r} is not supported (only OPT)")
        kw = _pick(cls, d)
        if "_remove_final_layer_norm" in d:
            kw["remove_final_layer_norm"] = bool(d["_remove_final_layer_norm"])
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    """`Blip2ForConditionalGeneration`: vision -> Q-Former -> language projection -> OPT."""

    model_type: ClassVar[str] = "blip-2"  # the `model_type` of converted checkpoints' metadata

    vision: VisionConfig = VisionConfig()
    qformer: QFormerConfig = QFormerConfig()
    text: OPTConfig = OPTConfig()
    num_query_tokens: int = 32
    # transformers 5 marks where the projected query outputs go with this token id in `input_ids`.
    image_token_index: int | None = None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Blip2Config:
        if d.get("model_type") not in (None, "blip-2"):
            raise ValueError(f"not a BLIP-2 config: model_type={d.get('model_type')!r}")
        image_token = d.get("image_token_index", d.get("image_token_id"))
        return cls(
            vision=VisionConfig.from_hf(d.get("vision_config") or {}),
            qformer=QFormerConfig.from_hf(d.get("qformer_config") or {}),
            text=OPTConfig.from_hf(d.get("text_config") or {}),
            num_query_tokens=int(d.get("num_query_tokens", 32)),
            image_token_index=None if image_token is None else int(image_token),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blip2Config:
        return cls(
            vision=VisionConfig(**d["vision"]),
            qformer=QFormerConfig(**d["qformer"]),
            text=OPTConfig(**d["text"]),
            num_query_tokens=d["num_query_tokens"],
            image_token_index=d["image_token_index"],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The LLaMA decoder (`LlamaForCausalLM`; Vicuna, MiniGPT-4's language model).

    `num_key_value_heads` (None: as many as query heads) and `head_dim` (None: `hidden_size // heads`) are
    resolved on construction, so two configs of the same model compare equal. RoPE is the default kind only
    (`rope_theta`); scaled variants (linear, dynamic, llama3, ...) are refused, not approximated.
    """

    model_type: ClassVar[str] = "llama"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        heads = self.num_attention_heads
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", heads)
        if self.head_dim is None:
            if self.hidden_size % heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // heads)
        if heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads "
                             f"{self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary embeddings rotate halves)")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (LLaMA's MLP is SwiGLU: silu)")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        """From a `config.json` dict (transformers 4's top-level `rope_theta` or 5's `rope_parameters`)."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"not a LLaMA config: model_type={d.get('model_type')!r}")
        kw = _pick(cls, d)
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if scaling or kind != "default":
            raise ValueError(f"RoPE scaling {scaling or rope} is not supported (only the default rotary embeddings)")
        if "rope_theta" in rope:
            kw["rope_theta"] = float(rope["rope_theta"])
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """`transformers.LlamaConfig` keyword arguments (`rope_theta` as a top-level key, which 4.x reads and 5.x
        moves into `rope_parameters`)."""
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class MiniGPT4Config:
    """MiniGPT-4 (EasyEdit's `MiniGPT4`): EVA ViT -> `ln_vision` -> Q-Former -> `llama_proj` -> LLaMA (Vicuna).

    The vision and Q-Former configs are BLIP-2's (`post_layernorm` is LAVIS's `ln_vision`, eps 1e-5); `text` is
    the LLaMA config. `image_token_index` marks the `num_query_tokens` image slots in `input_ids` (None: one past
    the vocabulary, an id no token has). `prompt_before` / `prompt_after` are the wrapper around the image slots
    (`'###Human: <Img><ImageHere></Img> '` split at the image), each tokenized on its own without BOS.
    """

    model_type: ClassVar[str] = "minigpt4"

    vision: VisionConfig = VisionConfig(post_layernorm_eps=1e-5)
    qformer: QFormerConfig = QFormerConfig()
    text: LlamaConfig = LlamaConfig(vocab_size=32001)
    num_query_tokens: int = 32
    image_token_index: int | None = None
    prompt_before: str = "###Human: <Img>"
    prompt_after: str = "</Img> "

    def __post_init__(self):
        if self.image_token_index is None:
            object.__setattr__(self, "image_token_index", self.text.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniGPT4Config:
        return cls(vision=VisionConfig(**d["vision"]), qformer=QFormerConfig(**d["qformer"]),
                   text=LlamaConfig(**d["text"]),
                   **{k: d[k] for k in ("num_query_tokens", "image_token_index", "prompt_before", "prompt_after")})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Converted checkpoints name their config by `model_type` (checkpoint.py).
CONFIGS: dict[str, type] = {Blip2Config.model_type: Blip2Config, LlamaConfig.model_type: LlamaConfig,
                            MiniGPT4Config.model_type: MiniGPT4Config}
