"""Retrieval precision of each key/query recipe on held-out easy-vqa images.

For each recipe the pretrain stage's key preparation runs for real (learned: contrastive key
encoder; paper / image: connector warm-up then snapshot), a bank of the 4,000 training captions
is built, and every test image queries it: how often the top-1 / any of the top-k entries carry
the image's own caption (k = 4). The paper recipe's query uses the image's first question.

    python bench/bench_recipes.py --lm runs/de/seed0/lm [--steps 300]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from tinyalign.checkpoint import load_checkpoint
from tinyalign.config import KeyRecipe
from tinyalign.models.vlm import TinyAlignVLM
from tinyalign.train import pipeline as P
from tinyalign.train.evaluate import retrieval_precision
from tinyalign.train.loop import prepare_keys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lm", required=True, help="an lm-stage checkpoint of the tiny preset")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("-k", type=int, default=4)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    print("command: python bench/bench_recipes.py " + " ".join(sys.argv[1:]))
    train_ds = P.load_dataset(dataset="easy-vqa", split="train")
    test_ds = P.load_dataset(dataset="easy-vqa", split="test")
    base, tok, _ = load_checkpoint(args.lm)
    arms = [("paper", 0.4), ("paper", 1.0), ("image", 1.0), ("learned", None)]
    print("\n| recipe | alpha | top-1 own caption | top-4 own caption | key dim | key prep s |\n|---|---|---|---|---|---|")
    for recipe, alpha in arms:
        cfg = base.cfg.replace()
        cfg.retrieval.recipe = KeyRecipe(recipe)
        cfg.retrieval.k = args.k
        if alpha is not None:
            cfg.retrieval.alpha = alpha
        model = TinyAlignVLM(cfg)
        want = model.state_dict()
        model.load_state_dict({n: t for n, t in base.state_dict().items() if n in want and want[n].shape == t.shape},
                              strict=False)
        model.eval()
        entries = train_ds.captions
        table = P.FeatureTable(model, [e.image for e in entries], progress=False)
        feats = table[[e.image for e in entries]]
        caps = P.caption_ids(tok, [e.caption for e in entries], cfg.retrieval.caption_len)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        prepare_keys(model, tok, entries, feats, caps, steps=args.steps, seed=0, progress=False)
        prep = time.perf_counter() - t0
        model.eval()
        bank = P.build_bank(model, tok, entries, feats, exact=True)
        p = retrieval_precision(model, tok, bank, test_ds, k=args.k)
        print(f"| {recipe} | {alpha if alpha is not None else '-'} | {p['top1']:.3f} | {p['topk']:.3f} | "
              f"{bank.meta.dim} | {prep:.0f} |", flush=True)


if __name__ == "__main__":
    main()
