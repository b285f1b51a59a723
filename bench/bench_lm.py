"""SmolLM2-135M-Instruct (GGUF, dequantised to fp32) in our decoder on the CPU: perplexity of a
normal sentence vs the same words shuffled, and generation speed with and without the KV cache.

    python bench/bench_lm.py [--repeats 5] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from tinyalign.generate import generate
from tinyalign.lm_chat import load_lm

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and one of the most visited cities in the world.",
    "Water boils at one hundred degrees Celsius at sea level.",
]


@torch.no_grad()
def perplexity(lm, tok, text: str) -> float:
    ids = torch.tensor([tok.encode(text)])
    logits = lm(lm.embed_tokens(ids))
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(torch.exp(loss))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    print("command: python bench/bench_lm.py " + " ".join(sys.argv[1:]))
    print(f"torch threads: {torch.get_num_threads()}")
    lm, tok = load_lm()
    print("\n| sentence | perplexity (normal) | perplexity (words shuffled) |\n|---|---|---|")
    rng = random.Random(0)
    for s in SENTENCES:
        words = s.rstrip(".").split()
        rng.shuffle(words)
        print(f"| {s[:40]}... | {perplexity(lm, tok, s):.1f} | {perplexity(lm, tok, ' '.join(words) + '.'):.1f} |")
    t = tok.template
    prompt = t.system + t.user_prefix + "Write a short story about a robot who learns to paint." + t.user_suffix + t.assistant_prefix
    prefix = lm.embed_tokens(torch.tensor([tok.encode(prompt)]))
    rows = {}
    for use_cache in (True, False):
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = generate(lm, prefix, max_new_tokens=args.new_tokens, use_cache=use_cache)  # no stop: fixed length
            rates.append(len(out[0]) / (time.perf_counter() - t0))
        rows[use_cache] = statistics.median(rates)
    print(f"\nprompt {prefix.shape[1]} tokens, {args.new_tokens} new tokens, median of {args.repeats} runs\n")
    print("| KV cache | tokens/s (median) |\n|---|---|")
    print(f"| on | {rows[True]:.1f} |\n| off | {rows[False]:.1f} |")
    print(f"\nspeed-up of the KV cache: {rows[True] / rows[False]:.2f}x")
    sample = generate(lm, prefix, max_new_tokens=60, stop_ids=tok.eos_ids)[0]
    print("\nsample (greedy):", tok.decode(sample))


if __name__ == "__main__":
    main()
