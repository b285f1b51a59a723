"""Checkpoints: a folder with `config.json` (ModelConfig), `model.safetensors` (all weights,
tied tensors stored once), `tokenizer.json` and `checkpoint.json` (kit version, stage, step,
metrics). Written atomically; loading checks every part and names what is missing or wrong.
An input checkpoint is never modified."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import __version__
from .config import ConfigError, ModelConfig
from .fsutil import atomic_dir
from .models.vlm import TinyAlignVLM
from .tokenizer import Tokenizer, TokenizerError

FILES = ("config.json", "model.safetensors", "tokenizer.json", "checkpoint.json")


class CheckpointError(ValueError):
    pass


def state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.cfg.lm, "tie_word_embeddings", False):
        sd.pop("lm.lm_head.weight", None)
    return sd


def save_checkpoint(model: TinyAlignVLM, tokenizer: Tokenizer, path: str | Path, *, meta: dict | None = None,
                    force: bool = False, extra=None) -> Path:
    """Write the checkpoint folder atomically; `extra(tmp_folder)` may add files (metrics, state)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_dir(path, force=force) as tmp:
        (tmp / "config.json").write_text(model.cfg.to_json())
        save_file(state_for_saving(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.json")
        info = {"kit_version": __version__, **(meta or {})}
        (tmp / "checkpoint.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        if extra is not None:
            extra(tmp)
    return path


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: config.json is missing")
    try:
        return ModelConfig.from_dict(json.loads(f.read_text()))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{f} is not valid JSON ({exc})") from exc
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{f} is not a valid TinyAlign config: {exc}") from exc


def read_meta(path: str | Path) -> dict:
    f = Path(path) / "checkpoint.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def load_checkpoint(path: str | Path, *, retrieval: bool | None = None) -> tuple[TinyAlignVLM, Tokenizer, dict]:
    """Load `(model, tokenizer, meta)`; `retrieval` overrides `cfg.retrieval.enabled`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (it does not exist or is a file)")
    cfg = read_config(path)
    if retrieval is not None:
        cfg.retrieval.enabled = retrieval
    for name in ("model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is incomplete: {name} is missing")
    try:
        sd = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path / 'model.safetensors'} cannot be read ({exc}); it is truncated or corrupt — "
            "re-save the checkpoint or restore it from a copy"
        ) from exc
    model = TinyAlignVLM(cfg)
    expected = state_for_saving(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: model.safetensors does not match config.json (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(sd[k].shape)} but config.json implies {tuple(v.shape)}")
    model.load_state_dict(sd, strict=False)
    try:
        tok = Tokenizer.from_file(path / "tokenizer.json", cfg.template)
    except TokenizerError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if tok.vocab_size > cfg.lm.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer.json has {tok.vocab_size} tokens but the LM's vocabulary is {cfg.lm.vocab_size}"
        )
    model.eval()
    return model, tok, read_meta(path)
