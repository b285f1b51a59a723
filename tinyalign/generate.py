"""Autoregressive generation over input embeddings: greedy or temperature / top-p sampling,
with or without the static KV cache, stop tokens and a token budget.

The engine knows nothing about images or tokenization beyond ids: callers build the prefix
embeddings (text, image and memory tokens) and decode the returned ids.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .models.llama import LlamaDecoder


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """`logits [B, V] -> ids [B]`; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def generate(lm: LlamaDecoder, prefix: torch.Tensor, *, key_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), use_cache: bool = True, seed: int | None = None,
             on_token: Callable[[int, torch.Tensor], None] | None = None) -> list[list[int]]:
    """Generate from `prefix [B, T, H]` (left-padded where `key_mask [B, T]` is 0).

    Returns the new ids of each row, cut before its first stop token. `on_token(step, ids [B])`
    is called after every step.
    """
    steps = []
    for step, nxt in enumerate(generate_stream(lm, prefix, key_mask=key_mask, max_new_tokens=max_new_tokens,
                                               temperature=temperature, top_p=top_p, stop_ids=stop_ids,
                                               use_cache=use_cache, seed=seed)):
        steps.append(nxt)
        if on_token is not None:
            on_token(step, nxt)
    out = torch.stack(steps, 1) if steps else torch.empty(prefix.shape[0], 0, dtype=torch.long)
    stop_set = set(int(s) for s in stop_ids)
    results = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        results.append(row[:cut])
    return results


@torch.no_grad()
def generate_stream(lm: LlamaDecoder, prefix: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                    stop_ids: Sequence[int] = (), use_cache: bool = True, seed: int | None = None):
    """Yield the next ids `[B]` step by step until every row has hit a stop token (rows that
    stopped repeat a stop token) or the budget / maximum sequence length is reached."""
    B, T, _ = prefix.shape
    limit = lm.cfg.max_seq_len
    if T >= limit:
        raise ValueError(f"the prompt takes {T} positions but the model's maximum sequence length is {limit}")
    max_new_tokens = max(0, min(max_new_tokens, limit - T))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    mask = key_mask.bool() if key_mask is not None else torch.ones(B, T, dtype=torch.bool)
    stops = torch.tensor(sorted(set(stop_ids)) or [-1])
    done = torch.zeros(B, dtype=torch.bool)
    made_cache = False
    if use_cache and not lm.has_cache:
        lm.setup_cache(B, limit, dtype=prefix.dtype)
        made_cache = True
    try:
        seq = prefix
        if use_cache:
            full_mask = torch.zeros(B, lm.cache_len, dtype=torch.bool)
            full_mask[:, :T] = mask
            logits = lm(prefix, input_pos=torch.arange(T), key_mask=full_mask)[:, -1]
        else:
            logits = lm(prefix, key_mask=mask)[:, -1]
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)
            nxt = torch.where(done, stops[0].clamp(min=0), nxt)
            done |= torch.isin(nxt, stops)
            yield nxt
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            emb = lm.embed_tokens(nxt)[:, None]  # [B, 1, H]
            pos = T + step
            if use_cache:
                full_mask[:, pos] = True
                logits = lm(emb, input_pos=torch.tensor([pos]), key_mask=full_mask)[:, -1]
            else:
                seq = torch.cat([seq, emb], dim=1)
                mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], dim=1)
                logits = lm(seq, key_mask=mask)[:, -1]
    finally:
        if made_cache:
            lm.drop_cache()
