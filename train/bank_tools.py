"""Bank commands as plain functions (the CLI wraps them): build a bank from a checkpoint and a
dataset, describe it, search it with an image, and measure its retrieval precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..bank import MemoryBank
from ..checkpoint import load_checkpoint
from ..fsutil import check_output
from . import pipeline as P
from .evaluate import retrieval_precision


def build(*, checkpoint: str | Path, out: str | Path, dataset: str | None = None, data: str | None = None,
          image_folder: str | None = None, split: str = "train", key_dtype: str = "f16", exact: bool = False,
          force: bool = False, progress: bool = True) -> MemoryBank:
    """One entry per captioned image of the dataset, keyed by the checkpoint's key recipe."""
    torch.set_flush_denormal(True)
    check_output(out, force)
    model, tok, _ = load_checkpoint(checkpoint)
    ds = P.load_dataset(dataset=dataset, data=data, image_folder=image_folder, split=split)
    entries = [e for e in ds.captions if e.caption]
    if not entries:
        raise ValueError(f"{ds.source} has no captioned images to build a bank from")
    table = P.FeatureTable(model, [e.image for e in entries], progress=progress)
    bank = P.build_bank(model, tok, entries, table[[e.image for e in entries]], key_dtype=key_dtype, exact=exact,
                        source=ds.source, progress=progress)
    bank.save(out, overwrite=force)
    return bank


def merge(*, shards: list[str | Path], out: str | Path, force: bool = False) -> MemoryBank:
    """Merge banks built in shards (same model fingerprint, recipe and value kind) into one."""
    check_output(out, force)
    banks = [MemoryBank.open(s) for s in shards]
    merged = MemoryBank.merge(banks)
    ids = [b.meta.extra.get("image_ids") for b in banks]
    if all(isinstance(i, list) and len(i) == len(b) for i, b in zip(ids, banks)):
        # per-entry image ids (leave-one-out during training) follow the entries' new order
        merged.meta.extra["image_ids"] = [x for i in ids for x in i]
    else:
        merged.meta.extra.pop("image_ids", None)
    merged.save(out, overwrite=force)
    return merged


def info(bank: str | Path) -> dict:
    b = MemoryBank.open(bank)
    m = b.meta.to_dict()
    m.pop("extra", None)
    return {"path": str(bank), **m, "bytes_per_entry": b.bytes_per_entry()}


def search(*, bank: str | Path, checkpoint: str | Path, image: str, prompt: str = "", k: int = 5) -> list[dict]:
    model, tok, _ = load_checkpoint(checkpoint)
    b = MemoryBank.open(bank)
    b.check_fingerprint(model.key_fingerprint(tok.tok.to_str()))
    with torch.no_grad():
        feats = model.image_features(torch.from_numpy(P.pixels_of(image, model))[None])
    q = P.query_vectors(model, tok, feats, [prompt or "What is in the image?"])
    ids, sims = b.search(q, min(k, len(b)))
    caps = b.captions_of(ids)[0]
    return [{"rank": r + 1, "id": int(i), "similarity": float(s), "caption": c}
            for r, (i, s, c) in enumerate(zip(ids[0], sims[0], caps))]


def evaluate_bank(*, bank: str | Path, checkpoint: str | Path, dataset: str | None = None, data: str | None = None,
                  image_folder: str | None = None, split: str = "test", k: int | None = None,
                  progress: bool = True) -> dict:
    model, tok, _ = load_checkpoint(checkpoint)
    b = MemoryBank.open(bank)
    ds = P.load_dataset(dataset=dataset, data=data, image_folder=image_folder, split=split)
    return retrieval_precision(model, tok, b, ds, k=k, progress=progress)
