"""Tokenizers: `tokenizer.json` through the `tokenizers` library, a small byte-level BPE trained
on the training text for the tiny preset, and the GGUF-embedded BPE of SmolLM2.

Imports no torch: the on-device runtime uses this module as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .config import ChatTemplate

IMAGE_TOKEN_ID = -200  # sentinel for the image (and retrieved-memory) slot, as in LLaVA


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids of a chat template."""

    def __init__(self, tok: _HFTokenizer, template: ChatTemplate):
        self.tok = tok
        self.template = template
        self.bos_id = self._id(template.bos_token) if template.bos_token else None
        self.eos_ids = [self._id(t) for t in template.eos_tokens]
        self.pad_id = self._id(template.pad_token) if template.pad_token else self.eos_ids[0]

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"special token {token!r} of the chat template is not in the tokenizer's vocabulary")
        return i

    def __repr__(self):
        return f"Tokenizer(vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids})"

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    # ---- files -------------------------------------------------------------------------
    def save(self, path: str | Path):
        self.tok.save(str(path))

    @classmethod
    def from_file(cls, path: str | Path, template: ChatTemplate) -> "Tokenizer":
        try:
            return cls(_HFTokenizer.from_file(str(path)), template)
        except Exception as exc:
            if isinstance(exc, TokenizerError):
                raise
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({exc})") from exc

    # ---- chat --------------------------------------------------------------------------
    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of a one-turn prompt, with IMAGE_TOKEN_ID where image and memories go.

        Only the instruction is encoded here (never the answer), so retrieval queries built from
        these ids cannot leak the answer, whatever the template.
        """
        t = self.template
        before = (t.system + t.user_prefix)
        after = "\n" + question.strip() + t.user_suffix + t.assistant_prefix
        ids = [self.bos_id] if self.bos_id is not None else []
        return ids + self.encode(before) + [IMAGE_TOKEN_ID] + self.encode(after)

    def answer_ids(self, answer: str) -> list[int]:
        return self.encode(answer.strip() + self.template.assistant_suffix)


def special_tokens(template: ChatTemplate) -> list[str]:
    names = [template.bos_token, template.pad_token, *template.eos_tokens,
             template.user_prefix.strip(), template.assistant_prefix.strip()]
    out = []
    for n in names:
        if n and n not in out:
            out.append(n)
    return out


def train_bpe(texts: Iterable[str], vocab_size: int, template: ChatTemplate) -> Tokenizer:
    """Train a byte-level BPE on the given text (the tiny preset's tokenizer)."""
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens(template),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok, template)


def tokenizer_from_gguf(reader, template: ChatTemplate) -> Tokenizer:
    """Rebuild a GPT-2 style byte-level BPE tokenizer from a GGUF file's metadata."""
    from .weights import _field

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # SmolLM2 / GPT-2 style: digits split one by one, then byte-level with the GPT-2 regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = control (special) tokens in llama.cpp's vocabulary
    from tokenizers import AddedToken

    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)
    return Tokenizer(tok, template)


def read_tokenizer_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
