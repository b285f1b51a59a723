"""The TinyAlign vision-language model: vision tower -> connector -> image tokens, retrieved
memory values -> RAG connector -> memory tokens placed right after the image tokens, and the
Llama-family decoder over `[text before <image>] [image] [memories] [text after]`.

With no memories passed (or `retrieval.enabled = False`) it is exactly the baseline model:
the retrieval parts exist but take no part in the computation.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, ValueKind, VisionKind
from ..tokenizer import IMAGE_TOKEN_ID
from .connector import Connector, RAGConnector
from .efficientnet import EfficientNetLite0
from .llama import LlamaDecoder
from .retrieval import KeyEncoder, LatentValueEncoder
from .vit import SiglipVisionTower

IGNORE_INDEX = -100


def build_vision(cfg) -> nn.Module:
    if cfg.kind is VisionKind.EFFICIENTNET_LITE0:
        return EfficientNetLite0(cfg.image_size)
    return SiglipVisionTower(cfg)


class TinyAlignVLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, V = cfg.lm.hidden_size, cfg.lm.vocab_size
        self.vision = build_vision(cfg.vision)
        dv = cfg.vision.hidden_size
        self.connector = Connector(dv, H)
        self.lm = LlamaDecoder(cfg.lm)
        r = cfg.retrieval
        self.key_encoder = KeyEncoder(r, dv, H, V)
        if r.value_kind is ValueKind.LATENT:
            self.value_encoder = LatentValueEncoder(r, dv, H, V)
            self.rag_connector = RAGConnector(r.value_dim, H)
        else:
            self.value_encoder = None
            self.rag_connector = RAGConnector(H, H)
            if r.caption_residual:
                self.zero_rag_output()

    def zero_rag_output(self):
        """Start the residual RAG connector at zero (memories = the captions' word embeddings)."""
        nn.init.zeros_(self.rag_connector[-1].weight)
        nn.init.zeros_(self.rag_connector[-1].bias)

    # ---- pieces (each one is an exported method) ---------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels [B, 3, S, S]` -> vision features `[B, N, Dv]` (pooled to `pool_to` if set)."""
        feats = self.vision(pixels)
        p = self.cfg.vision.pool_to
        g = self.cfg.vision.grid
        if p and g > p:
            x = feats.transpose(1, 2).reshape(len(feats), -1, g, g)
            feats = F.adaptive_avg_pool2d(x, p).flatten(2).transpose(1, 2)
        return feats

    def image_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """Vision features `[B, N, Dv]` -> LM input tokens `[B, N, H]`."""
        return self.connector(feats)

    def memory_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Retrieved values -> memory tokens `[B, k * t, H]`.

        Caption values are token ids `[B, k, L]` (-1 = padding): embedded by the LM's table and
        passed through the RAG connector, padding zeroed. Latent values are `[B, k, m, d_v]`.
        """
        B, k = values.shape[:2]
        if self.cfg.retrieval.value_kind is ValueKind.CAPTION:
            mask = (values >= 0).unsqueeze(-1)  # [B, k, L, 1]
            e = self.lm.embed_tokens(values.clamp(min=0))  # [B, k, L, H]
            x = self.rag_connector(e)
            if self.cfg.retrieval.caption_residual:
                x = x + e
            x = x * mask
        else:
            x = self.rag_connector(values.float())  # [B, k, m, H]
        return x.reshape(B, -1, x.shape[-1])

    def memory_len(self) -> int:
        r = self.cfg.retrieval
        if not r.enabled:
            return 0
        t = r.caption_len if r.value_kind is ValueKind.CAPTION else r.value_tokens
        return r.k * t

    # ---- sequence assembly ---------------------------------------------------------------
    def assemble(self, ids: torch.Tensor, image_tokens: torch.Tensor, memory: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None):
        """Replace the single IMAGE_TOKEN_ID of each row of `ids [B, T]` by
        `image_tokens [B, N, H]` followed by `memory [B, M, H]`.

        Returns `(embeds [B, T-1+N+M, H], labels or None, attn_mask or None)`; image and memory
        positions carry IGNORE_INDEX labels and are always attended.
        """
        B, T = ids.shape
        is_img = ids == IMAGE_TOKEN_ID
        counts = is_img.sum(1)
        if not bool((counts == 1).all()):
            raise ValueError(f"each sequence needs exactly one image placeholder, got counts {counts.tolist()}")
        pos = is_img.float().argmax(1)  # [B]
        text = self.lm.embed_tokens(ids.clamp(min=0))  # [B, T, H]
        extra = image_tokens if memory is None or memory.shape[1] == 0 else torch.cat([image_tokens, memory], 1)
        n = extra.shape[1]
        rows, lab_rows, mask_rows = [], [], []
        for b in range(B):
            p = int(pos[b])
            rows.append(torch.cat([text[b, :p], extra[b], text[b, p + 1:]], 0))
            if labels is not None:
                fill = torch.full((n,), IGNORE_INDEX, dtype=labels.dtype)
                lab_rows.append(torch.cat([labels[b, :p], fill, labels[b, p + 1:]]))
            if attn_mask is not None:
                ones = torch.ones(n, dtype=attn_mask.dtype)
                mask_rows.append(torch.cat([attn_mask[b, :p], ones, attn_mask[b, p + 1:]]))
        embeds = torch.stack(rows)
        return (embeds, torch.stack(lab_rows) if labels is not None else None,
                torch.stack(mask_rows) if attn_mask is not None else None)

    def forward(self, ids: torch.Tensor, *, pixels: torch.Tensor | None = None,
                feats: torch.Tensor | None = None, values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None):
        """Returns `(logits [B, L, V], loss or None)`. Pass `pixels` or precomputed `feats`
        (the vision tower is frozen in every stage of the tiny and small presets, so training
        caches its features). `values` are retrieved memories; None = baseline."""
        if feats is None:
            feats = self.image_features(pixels)
        memory = self.memory_tokens(values) if values is not None and self.cfg.retrieval.enabled else None
        embeds, labels, attn_mask = self.assemble(ids, self.image_tokens(feats), memory, labels, attn_mask)
        logits = self.lm(embeds, key_mask=attn_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        return logits, loss

    # ---- bank pairing ----------------------------------------------------------------------
    def key_fingerprint(self, tokenizer_json: str = "") -> str:
        """sha256 over everything that determines keys, queries and stored values: the vision
        tower, the key encoder, the value encoder (latent values) and the tokenizer."""
        h = hashlib.sha256()
        h.update(self.cfg.retrieval.recipe.value.encode())
        h.update(self.cfg.retrieval.value_kind.value.encode())
        h.update(repr(self.cfg.vision).encode())
        parts = [self.vision, self.key_encoder] + ([self.value_encoder] if self.value_encoder is not None else [])
        for part in parts:
            for name, t in sorted(part.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        if tokenizer_json:
            # canonical form: the same tokenizer hashes the same whether pretty-printed or compact
            import json

            tokenizer_json = json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":"))
        h.update(tokenizer_json.encode())
        return h.hexdigest()

    # ---- freezing ------------------------------------------------------------------------------
    def set_trainable(self, *, vision: bool, connector: bool, lm: bool, rag: bool, keys: bool = False,
                      values: bool | None = None):
        """Freeze / unfreeze parts. The key and value encoders define the bank fingerprint, so
        they train only before a bank is built (keys: the key phase; values: pretrain)."""
        for mod, flag in ((self.vision, vision), (self.connector, connector), (self.lm, lm),
                          (self.rag_connector, rag), (self.key_encoder, keys)):
            for p in mod.parameters():
                p.requires_grad_(flag)
        if self.value_encoder is not None:
            for p in self.value_encoder.parameters():
                p.requires_grad_(rag if values is None else values)
        if self.cfg.lm.tie_word_embeddings:
            self.lm.lm_head.weight = self.lm.embed_tokens.weight
