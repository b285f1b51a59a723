"""Evaluation: accuracy (normalised exact match of generated answers) on easy-vqa or on a
user's LLaVA JSON (the last assistant turn is the reference), with per-question predictions,
and retrieval precision of a bank on held-out images."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..bank import MemoryBank
from ..checkpoint import load_checkpoint
from ..data import normalize_answer
from ..generate import generate
from ..models.vlm import TinyAlignVLM
from ..tokenizer import Tokenizer
from . import pipeline as P


def _questions(ds: P.Dataset) -> list[tuple]:
    """(example, prompt turns, reference answer) with the last assistant turn as reference."""
    out = []
    for e in ds.qa:
        out.append((e, e.turns[-1][0], e.turns[-1][1]))
    return out


@torch.no_grad()
def answer_batch(model: TinyAlignVLM, tok: Tokenizer, feats: torch.Tensor, questions: list[str],
                 values: torch.Tensor | None, max_new_tokens: int = 8) -> list[str]:
    prompts = [tok.prompt_ids(q) for q in questions]
    ids, _, mask = P.pad_batch(prompts, prompts, tok.pad_id, left=True)
    memory = model.memory_tokens(values) if values is not None else None
    embeds, _, mask = model.assemble(ids, model.image_tokens(feats), memory, attn_mask=mask)
    outs = generate(model.lm, embeds, key_mask=mask, max_new_tokens=max_new_tokens, stop_ids=tok.eos_ids)
    return [tok.decode(o).strip() for o in outs]


def evaluate(*, checkpoint: str | Path, dataset: str | None = None, data: str | None = None,
             image_folder: str | None = None, split: str = "test", bank: str | Path | None = None,
             limit: int | None = None, batch_size: int = 64, max_new_tokens: int = 8,
             predictions: str | Path | None = None, progress: bool = True, seed: int = 0,
             model=None, tok=None) -> dict:
    """Accuracy of a checkpoint; with retrieval on, memories come from `bank`."""
    torch.set_flush_denormal(True)
    if model is None:
        model, tok, _ = load_checkpoint(checkpoint)
    model.eval()
    use_rag = model.cfg.retrieval.enabled
    mem = None
    if use_rag:
        if bank is None:
            raise ValueError(f"{checkpoint} was trained with retrieval: pass --bank BANK (tinyalign bank build)")
        mem = bank if isinstance(bank, MemoryBank) else MemoryBank.open(bank)
        mem.check_fingerprint(model.key_fingerprint(tok.tok.to_str()))
    ds = P.load_dataset(dataset=dataset, data=data, image_folder=image_folder, split=split)
    items = _questions(ds)
    if limit:
        rng = np.random.default_rng(seed)
        items = [items[i] for i in np.sort(rng.permutation(len(items))[:limit])]
    table = P.FeatureTable(model, [e.image for e, _, _ in items], progress=progress)
    correct, rows = 0, []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(items), batch_size), desc="eval", unit="batch", disable=not progress, leave=False):
        chunk = items[i:i + batch_size]
        feats = table[[e.image for e, _, _ in chunk]]
        values = None
        retrieved = None
        if use_rag:
            q = P.query_vectors(model, tok, feats, [qq for _, qq, _ in chunk])
            nb = P.neighbours(mem, q, model.cfg.retrieval.k)
            values = P.bank_values(mem, nb)
            retrieved = mem.captions_of(nb)
        answers = answer_batch(model, tok, feats, [qq for _, qq, _ in chunk], values, max_new_tokens)
        for j, ((e, q, ref), a) in enumerate(zip(chunk, answers)):
            ok = normalize_answer(a) == normalize_answer(ref)
            correct += ok
            row = {"image_id": e.image_id, "question": q, "answer": ref, "prediction": a, "correct": bool(ok)}
            if retrieved is not None:
                row["retrieved"] = retrieved[j]
            rows.append(row)
    acc = correct / max(1, len(items))
    result = {"checkpoint": str(checkpoint), "dataset": ds.source, "questions": len(items), "accuracy": acc,
              "retrieval": use_rag, "seconds": time.perf_counter() - t0}
    if predictions:
        from ..fsutil import atomic_write_text

        atomic_write_text(predictions, "".join(json.dumps(r) + "\n" for r in rows))
        result["predictions"] = str(predictions)
    return result


def retrieval_precision(model: TinyAlignVLM, tok: Tokenizer, bank: MemoryBank, ds: P.Dataset, *, k: int | None = None,
                        progress: bool = False, limit: int | None = None) -> dict:
    """How often the top-1 / any of the top-k entries carry the query image's own caption, on
    held-out images (queries: one per captioned image, with its first question when the recipe
    uses text)."""
    k = k or model.cfg.retrieval.k
    bank.check_fingerprint(model.key_fingerprint(tok.tok.to_str()))
    first_q = {}
    for e in ds.qa:
        first_q.setdefault(e.image_id, e.turns[0][0])
    entries = [e for e in ds.captions if e.caption]
    if limit:
        entries = entries[:limit]
    table = P.FeatureTable(model, [e.image for e in entries], progress=progress)
    feats = table[[e.image for e in entries]]
    q = P.query_vectors(model, tok, feats, [first_q.get(e.image_id, "What is in the image?") for e in entries])
    ids, sims = bank.search(q, k)
    caps = bank.captions_of(ids)
    top1 = float(np.mean([c[0] == e.caption for c, e in zip(caps, entries)]))
    topk = float(np.mean([e.caption in c for c, e in zip(caps, entries)]))
    return {"queries": len(entries), "k": k, "top1": top1, "topk": topk, "recipe": model.cfg.retrieval.recipe.value,
            "mean_top1_similarity": float(np.mean(sims[:, 0]))}
