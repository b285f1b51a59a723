"""A SigLIP-style ViT vision tower whose weights load from a Hugging Face SigLIP checkpoint.

Features are the hidden states after layer `feature_layer` (the paper and LLaVA take layer -2,
all patches, before the post-layernorm), so only the layers up to that one are built at all.
Module names mirror `SiglipVisionModel` (`embeddings.patch_embedding`, `encoder.layers.N...`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


class _Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.v_proj, self.out_proj = nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x):
        B, N, H = x.shape
        shape = (B, N, self.heads, H // self.heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [B, nh, N, hd]
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, H))


class _MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _Layer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = _Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.grid * cfg.grid, cfg.hidden_size)

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, N, H]
        return x + self.position_embedding.weight[None]


class _Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig, used_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(used_layers))


class SiglipVisionTower(nn.Module):
    """`forward(pixels [B, 3, S, S]) -> tokens [B, (S/patch)^2, hidden]`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        fl = cfg.feature_layer
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i.
        used = fl if fl >= 0 else cfg.num_layers + 1 + fl
        if not 0 <= used <= cfg.num_layers:
            raise ValueError(f"vision.feature_layer={fl} is out of range for {cfg.num_layers} layers")
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg, used)
        self.grid = cfg.grid

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return x
