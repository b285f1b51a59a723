"""`Engine.ask`: image + question -> streamed answer, following docs/bundle.md's runtime steps in
order (preprocess, prompt ids, vision_encoder, retrieval_query, bank search, rag_connector,
assemble, prefill, decode with the KV cache).

Numpy arrays in and out of the program, no torch. The engine owns one loaded program and
therefore one KV cache: calls are serialised by a lock, and every question starts again at
position 0 (later positions are masked, so nothing needs clearing).
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from tinyalign.images import MAX_PIXELS, load_image, preprocess

from .errors import ProgramError, PromptTooLongError

__all__ = ["Engine", "Answer", "Memory", "Timings", "sample_next", "prompt_ids"]

IMAGE_SLOT = -200  # the image slot in prompt ids (manifest special_tokens.image_token_id)


@dataclass
class Memory:
    """One retrieved bank entry."""

    id: int
    caption: str
    similarity: float


@dataclass
class Timings:
    """Seconds spent per step; `decode_s` has one entry per generated token after the first."""

    preprocess_s: float = 0.0
    encode_s: float = 0.0
    retrieve_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.decode_s) / sum(self.decode_s) if self.decode_s and sum(self.decode_s) > 0 else 0.0


@dataclass
class Answer:
    """What `ask` returns: the answer text, its token ids (stop token excluded), the retrieved
    memories (best first), the prefix length, why generation stopped and the timings."""

    text: str
    token_ids: list[int]
    memories: list[Memory]
    prompt_tokens: int
    stop_reason: str  # "eos" | "max_new_tokens" | "max_seq_len"
    timings: Timings

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timings"]["tokens_per_s"] = self.timings.tokens_per_s
        return d


def _render(text: str, values: dict) -> str:
    """Replace `{name}` by `values[name]` in one pass (braces inside the values stay as they are)."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def prompt_ids(tokenizer, manifest: dict, question: str) -> tuple[list[int], list[int]]:
    """docs/bundle.md step 3: (ids before the image slot, ids after it). The two parts are encoded
    separately with no special tokens added; `bos_id` (when not null) starts the first."""
    t, sp = manifest["template"], manifest["special_tokens"]
    values = {k: v for k, v in t.items() if isinstance(v, str)}
    values["question"] = question.strip()
    before = _render(t.get("before_image", "{system}{user_prefix}"), values)
    after = _render(t.get("after_image", "\n{question}{user_suffix}{assistant_prefix}"), values)
    head = [int(sp["bos_id"])] if sp.get("bos_id") is not None else []
    return (head + tokenizer.encode(before, add_special_tokens=False).ids,
            tokenizer.encode(after, add_special_tokens=False).ids)


def sample_next(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
                rng: np.random.Generator | None = None) -> int:
    """`logits [V]` -> next id; temperature 0 is greedy (argmax), else softmax(logits / T) with
    nucleus (top-p) filtering that always keeps the most likely token."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        sp = p[order]
        keep = np.cumsum(sp) - sp < top_p
        p = np.zeros_like(p)
        p[order[keep]] = sp[keep]
        p /= p.sum()
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.choice(p.shape[0], p=p))


class _Detokenizer:
    """Incremental detokenisation: yields the new text of each token, holding back a piece while
    it ends in an incomplete UTF-8 sequence (byte-level BPE splits characters across tokens)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece


def _check_options(max_new_tokens, temperature, top_p, seed):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")


class Engine:
    """Runs questions against one opened Bundle (see `ask`)."""

    def __init__(self, bundle):
        self.bundle = bundle
        m = bundle.manifest
        self.program = bundle.program
        self.image = m["image"]
        self.max_seq_len = int(m["max_seq_len"])
        self.image_tokens = int(m["model"]["image_tokens"])
        self.retrieval = m["retrieval"] if m["retrieval"].get("enabled") and bundle.bank is not None else None
        self.memory_len = int(self.retrieval["memory_len"]) if self.retrieval else 0
        self.eos_ids = {int(i) for i in m["special_tokens"]["eos_ids"]}
        self.max_pixels = int(self.image.get("max_pixels") or MAX_PIXELS)
        self._lock = threading.Lock()

    def prefix_len(self, question: str) -> int:
        """P = len(prompt ids) - 1 + image tokens + memory tokens (docs/bundle.md step 8)."""
        before, after = prompt_ids(self.bundle.tokenizer, self.bundle.manifest, question)
        return len(before) + len(after) + self.image_tokens + self.memory_len

    def pixels(self, image) -> np.ndarray:
        """docs/bundle.md step 2: `image` (path, bytes or PIL image) -> float32 `[1, 3, S, S]`, the
        same conversion as training (`tinyalign.images`: EXIF, modes, white background, bicubic)."""
        img = load_image(image, max_pixels=self.max_pixels)
        return preprocess(img, int(self.image["size"]), self.image["mean"], self.image["std"])[None]

    def _embed(self, ids: list[int]) -> np.ndarray:
        return self.program.run("token_embedding", np.asarray([ids], dtype=np.int64))[0]

    def ask(self, image, question: str, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None, stream: Callable[[str], None] | None = None) -> Answer:
        """Answer `question` about `image` (a path, the file's bytes or a PIL image).

        `temperature` 0 is greedy; otherwise softmax sampling with nucleus `top_p`, reproducible
        with `seed`. `stream(piece)` receives each new piece of answer text as it is decoded.
        Raises ImageError (unreadable, corrupt, truncated or oversized image), PromptTooLongError
        (checked before anything runs), ValueError (bad options) or ProgramError.
        """
        _check_options(max_new_tokens, temperature, top_p, seed)
        if not isinstance(question, str):
            raise ValueError(f"question must be a string, got {type(question).__name__}")
        with self._lock:
            return self._ask(image, question, max_new_tokens, temperature, top_p, seed, stream)

    def _ask(self, image, question, max_new_tokens, temperature, top_p, seed, stream) -> Answer:
        t_start = time.perf_counter()
        tm = Timings()
        # 3. prompt ids, and the length check before any work
        tok = self.bundle.tokenizer
        before, after = prompt_ids(tok, self.bundle.manifest, question)
        P = len(before) + len(after) + self.image_tokens + self.memory_len
        if P >= self.max_seq_len:
            raise PromptTooLongError(
                f"the prompt needs {P} positions ({len(before) + len(after)} text tokens + {self.image_tokens} image "
                f"tokens + {self.memory_len} memory tokens) but the model's maximum sequence length is "
                f"{self.max_seq_len}; ask a shorter question")
        # 2. preprocess (same conversion as training: EXIF, modes, white background, bicubic)
        t0 = time.perf_counter()
        pixels = self.pixels(image)  # [1, 3, S, S]
        tm.preprocess_s = time.perf_counter() - t0
        # 4. vision_encoder
        t0 = time.perf_counter()
        image_tokens, feats = self.program.run("vision_encoder", pixels)[:2]  # [1,N,H], [1,N,Dv]
        tm.encode_s = time.perf_counter() - t0
        # 5-7. retrieval_query, bank search, rag_connector
        memories, memory_tokens = [], None
        if self.retrieval:
            t0 = time.perf_counter()
            full = np.asarray([before + [IMAGE_SLOT] + after], dtype=np.int64)
            query = self.program.run("retrieval_query", feats, full, np.ones_like(full))[0]  # [1, key_dim]
            k = int(self.retrieval["k"])
            bank = self.bundle.bank
            ids, sims = bank.search(np.asarray(query, dtype=np.float32), k)
            values = np.asarray(bank.values(ids[0])[self.retrieval["value_name"]])  # [k, L] or [k, m, d_v]
            values = values.astype(np.int64 if np.issubdtype(values.dtype, np.integer) else np.float32)[None]
            memory_tokens = self.program.run("rag_connector", values)[0]  # [1, k*L, H]
            captions = bank.captions_of(ids[0])
            memories = [Memory(int(i), str(c), float(s)) for i, c, s in zip(ids[0], captions, sims[0])]
            tm.retrieve_s = time.perf_counter() - t0
        # 8-9. assemble and prefill
        t0 = time.perf_counter()
        parts = ([self._embed(before)] if before else []) + [image_tokens]
        parts += ([memory_tokens] if memory_tokens is not None else []) + ([self._embed(after)] if after else [])
        prefix = np.concatenate(parts, axis=1).astype(np.float32)  # [1, P, H]
        if prefix.shape[1] != P:
            raise ProgramError(f"assembled {prefix.shape[1]} prefix positions, expected {P}; the bundle's "
                               f"manifest does not match its program")
        logits = self.program.run("text_decoder", prefix, np.arange(P, dtype=np.int64))[0]  # [1, V]
        tm.prefill_s = time.perf_counter() - t0
        # 10. decode loop with the KV cache
        rng = np.random.default_rng(seed)
        budget = min(max_new_tokens, self.max_seq_len - P)
        detok = _Detokenizer(tok)
        out: list[int] = []
        stop = "max_new_tokens" if budget == max_new_tokens else "max_seq_len"
        for step in range(budget):
            nxt = sample_next(logits[0], temperature, top_p, rng)
            if nxt in self.eos_ids:
                stop = "eos"
                break
            out.append(nxt)
            piece = detok.push(nxt)
            if piece and stream is not None:
                stream(piece)
            if step == budget - 1:
                break
            t0 = time.perf_counter()
            emb = self._embed([nxt])  # [1, 1, H]
            logits = self.program.run("text_decoder", emb, np.asarray([P + step], dtype=np.int64))[0]
            tm.decode_s.append(time.perf_counter() - t0)
        text = tok.decode(out, skip_special_tokens=True)
        if stream is not None and text.startswith(detok.text) and len(text) > len(detok.text):
            stream(text[len(detok.text):])  # a held-back tail (an incomplete character at the end)
        tm.total_s = time.perf_counter() - t_start
        return Answer(text=text.strip(), token_ids=out, memories=memories, prompt_tokens=P, stop_reason=stop,
                      timings=tm)
