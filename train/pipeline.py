"""Everything between a dataset and a training batch: loading datasets, cached vision features,
token sequences, and retrieval (building a bank from the model, queries, neighbours).

The vision tower is frozen in every stage of the presets, so its features are computed once per
image and cached (in memory and on disk under `$TINYALIGN_CACHE`, keyed by the tower's weights
and the image files).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..bank import BankMetadata, MemoryBank
from ..config import KeyRecipe, ValueKind
from ..data import Example, LoadReport, easy_vqa, load_llava_json
from ..images import load_image, preprocess
from ..models.vlm import IGNORE_INDEX, TinyAlignVLM
from ..tokenizer import Tokenizer

DATASETS = ("easy-vqa",)


# ---- datasets --------------------------------------------------------------------------------
@dataclass
class Dataset:
    captions: list[Example]  # one per image with a caption: pretrain data and bank entries
    qa: list[Example]  # instruction data: finetune and evaluation
    report: LoadReport | None = None
    source: str = ""


def load_dataset(*, dataset: str | None = None, data: str | None = None, image_folder: str | None = None,
                 split: str = "train") -> Dataset:
    """easy-vqa by name, or LLaVA JSON (`data` + `image_folder`). For LLaVA JSON, records
    whose single answer is a caption (pretraining style) become caption entries and every
    record is also instruction data."""
    if dataset:
        if dataset != "easy-vqa":
            raise ValueError(f"unknown dataset {dataset!r}; built-in datasets: {', '.join(DATASETS)}")
        caps, qa = easy_vqa(split)
        return Dataset(caps, qa, None, f"easy-vqa:{split}")
    if not data or not image_folder:
        raise ValueError("pass --dataset easy-vqa, or --data FILE.json with --image-folder DIR")
    examples, report = load_llava_json(data, image_folder)
    if not examples:
        raise ValueError(f"{data}: no usable records ({report.summary()})")
    caps = [e for e in examples if e.caption]
    return Dataset(caps, examples, report, f"llava:{Path(data).name}")


def subset(examples: list, fraction: float, seed: int) -> list:
    """A deterministic random fraction (at least one example)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--data-fraction must be in (0, 1], got {fraction}")
    if fraction >= 1:
        return list(examples)
    rng = np.random.default_rng(seed)
    n = max(1, int(round(len(examples) * fraction)))
    idx = np.sort(rng.permutation(len(examples))[:n])
    return [examples[i] for i in idx]


# ---- vision features -----------------------------------------------------------------------
def _cache_dir() -> Path:
    return Path(os.environ.get("TINYALIGN_CACHE", Path.home() / ".cache" / "tinyalign"))


def vision_fingerprint(model: TinyAlignVLM) -> str:
    h = hashlib.sha256(repr(model.cfg.vision).encode())
    for name, t in sorted(model.vision.state_dict().items()):
        h.update(name.encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def pixels_of(path: str, model: TinyAlignVLM) -> np.ndarray:
    v = model.cfg.vision
    return preprocess(load_image(path), v.image_size, v.image_mean, v.image_std)


@torch.no_grad()
def compute_features(model: TinyAlignVLM, paths: list[str], *, batch_size: int = 64, progress: bool = True,
                     cache: bool = True) -> torch.Tensor:
    """Vision features `[len(paths), N, Dv]` (fp32), cached on disk by tower + file list."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(vision_fingerprint(model).encode())
    for p in paths:
        st = os.stat(p)
        key.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    file = _cache_dir() / "features" / f"{key.hexdigest()[:32]}.safetensors"
    if cache and file.is_file():
        try:
            return load_file(str(file))["feats"]
        except Exception:
            file.unlink(missing_ok=True)
    was_training = model.vision.training
    model.vision.eval()
    out = []
    for i in tqdm(range(0, len(paths), batch_size), desc="vision features", unit="batch", disable=not progress,
                  leave=False):
        px = torch.from_numpy(np.stack([pixels_of(p, model) for p in paths[i:i + batch_size]]))
        out.append(model.image_features(px))
    model.vision.train(was_training)
    feats = torch.cat(out) if out else torch.zeros(0, model.cfg.vision.num_tokens, model.cfg.vision.hidden_size)
    if cache:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        save_file({"feats": feats.contiguous()}, str(tmp))
        os.replace(tmp, file)
    return feats


class FeatureTable:
    """Features of a set of images, addressed by image path."""

    def __init__(self, model: TinyAlignVLM, paths, **kw):
        self.paths = sorted(set(paths))
        self.row = {p: i for i, p in enumerate(self.paths)}
        self.feats = compute_features(model, self.paths, **kw)

    def __getitem__(self, paths: list[str]) -> torch.Tensor:
        return self.feats[[self.row[p] for p in paths]]


# ---- token sequences ---------------------------------------------------------------------------
def encode_conversation(tok: Tokenizer, ex: Example, max_text: int) -> tuple[list[int], list[int]]:
    """ids with one IMAGE_TOKEN_ID and labels (IGNORE_INDEX on every prompt position)."""
    t = tok.template
    ids, labels = [], []
    for i, (q, a) in enumerate(ex.turns):
        prompt = tok.prompt_ids(q) if i == 0 else tok.encode(t.user_prefix + q.strip() + t.user_suffix + t.assistant_prefix)
        ans = tok.answer_ids(a)
        if len(ids) + len(prompt) + len(ans) > max_text:
            if i == 0:
                keep = max(1, max_text - len(prompt))
                ids, labels = prompt + ans[:keep], [IGNORE_INDEX] * len(prompt) + ans[:keep]
            break
        ids += prompt + ans
        labels += [IGNORE_INDEX] * len(prompt) + ans
    return ids, labels


def encode_text_only(tok: Tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """The LM stage: the same conversation without the image, loss on every token but BOS."""
    t = tok.template
    ids = [tok.bos_id] if tok.bos_id is not None else []
    for q, a in ex.turns:
        ids += tok.encode(t.system + t.user_prefix + q.strip() + t.user_suffix + t.assistant_prefix) + tok.answer_ids(a)
    return ids, [IGNORE_INDEX] + ids[1:]


def pad_batch(seqs: list[list[int]], labels: list[list[int]], pad_id: int, left: bool = False):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        lab[i, sl] = torch.tensor(l)
        mask[i, sl] = True
    return ids, lab, mask


def _pad_rows(rows: list[list[int]], length: int) -> torch.Tensor:
    """Token-id rows cut to `length` and -1 padded -> `[N, length]`."""
    out = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, ids in enumerate(rows):
        ids = ids[:length]
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def caption_ids(tok: Tokenizer, captions: list[str], length: int) -> torch.Tensor:
    """Caption token ids `[N, length]`, -1 padded: the compact text value and the key text."""
    return _pad_rows([tok.encode(c.strip()) for c in captions], length)


def instruction_ids(tok: Tokenizer, questions: list[str], length: int = 48) -> torch.Tensor:
    """The query's text: the prompt ids of the instruction (the chat template's prompt, never an
    answer), -1 padded, with the image slot masked out. The exported `retrieval_query` method
    takes exactly these ids (docs/bundle.md), so training, bank evaluation and devices agree."""
    return _pad_rows([[t if t >= 0 else -1 for t in tok.prompt_ids(q)] for q in questions], length)


# ---- retrieval -------------------------------------------------------------------------------
@torch.no_grad()
def encode_keys(model: TinyAlignVLM, feats: torch.Tensor, text: torch.Tensor | None, batch: int = 512) -> np.ndarray:
    out = []
    for i in range(0, len(feats), batch):
        t = text[i:i + batch] if text is not None else None
        out.append(model.key_encoder(feats[i:i + batch], t, (t >= 0) if t is not None else None))
    return torch.cat(out).float().numpy()


@torch.no_grad()
def entry_values(model: TinyAlignVLM, feats: torch.Tensor, cap_ids: torch.Tensor, batch: int = 256) -> dict:
    if model.cfg.retrieval.value_kind is ValueKind.CAPTION:
        return {"caption_ids": cap_ids.numpy().astype(np.int32)}
    out = [model.value_encoder(feats[i:i + batch], cap_ids[i:i + batch], cap_ids[i:i + batch] >= 0)
           for i in range(0, len(feats), batch)]
    return {"latent": torch.cat(out).numpy().astype(np.float16)}


def build_bank(model: TinyAlignVLM, tok: Tokenizer, entries: list[Example], feats: torch.Tensor, *,
               key_dtype: str = "f16", exact: bool = False, source: str = "", progress: bool = False) -> MemoryBank:
    """A bank with one entry per (image, caption) pair, keys by the model's key recipe."""
    r = model.cfg.retrieval
    caps = caption_ids(tok, [e.caption for e in entries], r.caption_len)
    text = caps if r.recipe is KeyRecipe.PAPER else None
    keys = encode_keys(model, feats, text)
    meta = BankMetadata(dim=keys.shape[1], key_dtype=key_dtype, exact=exact, alpha=r.alpha, k=r.k,
                        recipe=r.recipe.value, value_kind=r.value_kind.value, source=source,
                        fingerprint=model.key_fingerprint(tok.tok.to_str()),
                        extra={"image_ids": [e.image_id for e in entries], "caption_len": r.caption_len})
    bank = MemoryBank(meta=meta)
    bank.add(keys, entry_values(model, feats, caps), [e.caption for e in entries], progress=progress)
    return bank


def query_vectors(model: TinyAlignVLM, tok: Tokenizer, feats: torch.Tensor, questions: list[str] | None) -> np.ndarray:
    text = None
    if model.cfg.retrieval.recipe is KeyRecipe.PAPER and questions is not None:
        text = instruction_ids(tok, questions)
    return encode_keys(model, feats, text)


def neighbours(bank: MemoryBank, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    ids, _ = bank.search(queries, k, exclude=exclude)
    return ids


def bank_values(bank: MemoryBank, ids: np.ndarray) -> torch.Tensor:
    vals = bank.values(ids)
    if "caption_ids" in vals:
        return torch.from_numpy(vals["caption_ids"].astype(np.int64))
    return torch.from_numpy(vals["latent"].astype(np.float32))
