"""Retrieval parts of TinyAlign (arXiv 2505.12884): key/query encoders and memory values.

Key recipes (`KeyRecipe`), all mapping to one L2-normalised vector per (image, text):
- `paper`: M = [alpha * l2norm(connector(vision(img))) ; (1 - alpha) * l2norm(embed(text))] along the
  sequence, A = softmax(M M^T), key = mean_rows(A) M  (the paper's attention pooling, H-dim).
  Keys use the caption, queries the instruction only (never the answer).
- `image`: the same pooling over the image tokens alone (alpha = 1).
- `learned`: a small key encoder trained contrastively on the bank's own image/caption pairs;
  keys and queries both come from the image side, in a space where images that share a
  caption cluster together (DESIGN.md section 1 calibration: 46.5 % vs 5 % top-1 for the paper's).
The encoder owns frozen snapshots of everything it uses, so later training of the connector or
LM never silently changes how queries are computed; its parameters define the bank fingerprint.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..config import KeyRecipe, RetrievalConfig


def attention_pool(M: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`M [B, L, H]` (rows masked out where `mask [B, L]` is 0) -> `[B, H]`.

    A = softmax(M M^T) over valid columns; key = mean over valid rows of A, times M.
    """
    scores = M @ M.transpose(1, 2)  # [B, L, L]
    if mask is not None:
        m = mask.bool()
        scores = scores.masked_fill(~m[:, None, :], float("-inf"))
        A = torch.softmax(scores, dim=-1) * m[:, :, None]
        weights = A.sum(1) / m.sum(1, keepdim=True).clamp(min=1)  # [B, L]
    else:
        weights = torch.softmax(scores, dim=-1).mean(1)
    return torch.einsum("bl,blh->bh", weights, M)


class KeyEncoder(nn.Module):
    """Computes bank keys and retrieval queries for one recipe. Output is L2-normalised."""

    def __init__(self, cfg: RetrievalConfig, vision_dim: int, hidden: int, vocab: int):
        super().__init__()
        self.recipe = cfg.recipe
        self.alpha = cfg.alpha
        if self.recipe is KeyRecipe.LEARNED:
            self.image_head = nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.key_dim))
            self.text_embed = nn.Embedding(vocab, hidden)
            self.text_head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, cfg.key_dim))
            self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as CLIP
            self.dim = cfg.key_dim
        else:
            # Frozen snapshots of the connector (and, for the paper's recipe, the LM's token
            # table) taken when the bank is built; see `snapshot`.
            from .connector import Connector

            self.connector = Connector(vision_dim, hidden)
            if self.recipe is KeyRecipe.PAPER:
                self.text_embed = nn.Embedding(vocab, hidden)
            self.dim = hidden

    def snapshot(self, connector: nn.Module, embed_tokens: nn.Embedding) -> None:
        """Copy the model's current connector / token table into this encoder (paper, image)."""
        if self.recipe is KeyRecipe.LEARNED:
            return
        self.connector.load_state_dict(copy.deepcopy(connector.state_dict()))
        if self.recipe is KeyRecipe.PAPER:
            self.text_embed.weight.data.copy_(embed_tokens.weight.data)

    # ---- encoders ----------------------------------------------------------------------
    def image_embedding(self, feats: torch.Tensor) -> torch.Tensor:
        """Learned recipe: `feats [B, N, Dv]` -> `[B, key_dim]` (normalised)."""
        return F.normalize(self.image_head(feats.mean(1)), dim=-1)

    def text_embedding(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Learned recipe: caption ids `[B, L]` -> `[B, key_dim]` (normalised)."""
        e = self.text_embed(ids.clamp(min=0)) * mask[..., None]
        pooled = e.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_head(pooled), dim=-1)

    def forward(self, feats: torch.Tensor, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`feats [B, N, Dv]` (vision features before the connector), `text_ids [B, L]` -> `[B, dim]`.

        For keys pass the caption ids, for queries the instruction ids; the learned and image
        recipes ignore the text.
        """
        if self.recipe is KeyRecipe.LEARNED:
            return self.image_embedding(feats)
        img = F.normalize(self.connector(feats), dim=-1)  # [B, N, H]
        if self.recipe is KeyRecipe.IMAGE or text_ids is None:
            return F.normalize(attention_pool(img), dim=-1)
        txt = F.normalize(self.text_embed(text_ids.clamp(min=0)), dim=-1)  # [B, L, H]
        M = torch.cat([self.alpha * img, (1 - self.alpha) * txt], dim=1)  # [B, N + L, H]
        mask = torch.cat([torch.ones(img.shape[:2], dtype=torch.bool, device=img.device),
                          text_mask.bool() if text_mask is not None else torch.ones(txt.shape[:2], dtype=torch.bool)], 1)
        return F.normalize(attention_pool(M, mask), dim=-1)

    def contrastive_loss(self, feats: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor,
                         groups: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE between images and captions; entries of the same `groups` id
        (e.g. identical caption text) count as positives for each other."""
        img = self.image_embedding(feats)
        txt = self.text_embedding(caption_ids, caption_mask)
        logits = self.logit_scale.exp().clamp(max=100) * img @ txt.T  # [B, B]
        if groups is None:
            groups = torch.arange(len(img))
        pos = (groups[:, None] == groups[None, :]).float()
        target = pos / pos.sum(1, keepdim=True)
        return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


class LatentValueEncoder(nn.Module):
    """The paper-faithful value: a one-layer Perceiver with `m` learned latents of width `d_v`
    cross-attending over the entry's image features and caption embeddings -> `[m, d_v]`."""

    def __init__(self, cfg: RetrievalConfig, vision_dim: int, hidden: int, vocab: int):
        super().__init__()
        d = cfg.value_dim
        self.latents = nn.Parameter(torch.randn(cfg.value_tokens, d) * 0.02)
        self.image_proj = nn.Linear(vision_dim, d)
        self.text_embed = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, num_heads=4 if d % 4 == 0 else 1, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, feats: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        """`feats [B, N, Dv]`, `caption_ids [B, L]` -> `[B, m, d_v]`."""
        ctx = torch.cat([self.image_proj(feats), self.text_embed(caption_ids.clamp(min=0))], 1)
        pad = torch.cat([torch.zeros(feats.shape[:2], dtype=torch.bool), ~caption_mask.bool()], 1)
        q = self.latents[None].expand(len(feats), -1, -1)
        x = q + self.attn(q, ctx, ctx, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.norm(x))
