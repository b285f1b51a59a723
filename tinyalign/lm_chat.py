"""Text-only chat with a TinyAlign checkpoint's LM or a llama GGUF file, streaming pieces."""

from __future__ import annotations

from typing import Iterator

import torch

from .config import preset
from .generate import generate_stream
from .models.llama import LlamaDecoder


def load_lm(checkpoint=None, gguf=None):
    if checkpoint:
        from .checkpoint import load_checkpoint

        model, tok, _ = load_checkpoint(checkpoint)
        return model.lm, tok
    from .tokenizer import tokenizer_from_gguf
    from .weights import load_gguf_lm, smollm2_gguf_path

    cfg, sd, reader = load_gguf_lm(gguf or smollm2_gguf_path())
    lm = LlamaDecoder(cfg)
    lm.load_state_dict(sd, strict=not cfg.tie_word_embeddings)
    return lm.eval(), tokenizer_from_gguf(reader, preset("small").template)


def chat(prompt: str, *, checkpoint=None, gguf=None, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None,
         use_cache=True) -> Iterator[str]:
    torch.set_flush_denormal(True)
    lm, tok = load_lm(checkpoint, gguf)
    t = tok.template
    text = t.system + t.user_prefix + prompt.strip() + t.user_suffix + t.assistant_prefix
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
    pieces: list[int] = []
    prev = ""
    with torch.no_grad():
        for nxt in generate_stream(lm, lm.embed_tokens(torch.tensor([ids])), max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, stop_ids=tok.eos_ids, seed=seed,
                                   use_cache=use_cache):
            if int(nxt[0]) in tok.eos_ids:
                break
            pieces.append(int(nxt[0]))
            full = tok.decode(pieces)  # decode the whole prefix: keeps multi-byte characters intact
            if full.startswith(prev) and not full.endswith("\ufffd"):
                yield full[len(prev):]
                prev = full
