"""A Llama-family decoder (Llama, SmolLM2, Qwen2, TinyLlama) with an optional static KV cache.

Module names follow Hugging Face's (`embed_tokens`, `layers.N.self_attn.q_proj`, ...) so that
checkpoints map one to one. Two paths share the weights:
- training / no cache: `forward(embeds [B, T, H])`, causal attention over the input;
- export / generation: `setup_cache(batch, max_len)` registers fixed-size K/V buffers that are
  updated in place at `input_pos` (the form that runs in ExecuTorch and converts to a Core ML
  state, DESIGN.md section 3). One call serves prefill (T > 1) and decode (T = 1).
RoPE depends only on relative positions, so left padding plus a key mask gives the same result
as an unpadded sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: LMConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama 3 scaling when `rope_scaling.rope_type == "llama3"`."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) == "llama3":
        # https://github.com/meta-llama/llama-models (apply_scaling), as in transformers
        factor = rs["factor"]
        low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_len = rs.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv.float()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.has_cache = False

    def setup_cache(self, batch: int, max_len: int, dtype=torch.float32):
        shape = (batch, self.n_kv, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.has_cache = True

    def drop_cache(self):
        for name in ("k_cache", "v_cache"):
            if name in self._buffers:
                del self._buffers[name]
        self.has_cache = False

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.has_cache and input_pos is not None:
            # In-place slice write: the form that runs in ExecuTorch and becomes a Core ML state.
            start = input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start + T <= self.k_cache.shape[2])
            self.k_cache[:, :, start : start + T] = k
            self.v_cache[:, :, start : start + T] = v
            k, v = self.k_cache, self.v_cache  # [B, nkv, S, hd]
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, nh, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """`forward(embeds [B, T, H], input_pos [T] | None, key_mask [B, S] | None) -> logits [B, T, V]`."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.cache_len = 0
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # GPT-2 / Llama style init for training from scratch (loaders overwrite it)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # ---- KV cache ----------------------------------------------------------------------
    def setup_cache(self, batch: int = 1, max_len: int | None = None, dtype=torch.float32):
        self.cache_len = max_len or self.cfg.max_seq_len
        for layer in self.layers:
            layer.self_attn.setup_cache(batch, self.cache_len, dtype)

    def drop_cache(self):
        self.cache_len = 0
        for layer in self.layers:
            layer.self_attn.drop_cache()

    @property
    def has_cache(self) -> bool:
        return self.cache_len > 0

    # ---- forward -----------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor, dtype):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[None, None], emb.sin().to(dtype)[None, None]  # [1, 1, T, hd]

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        B, T, _ = embeds.shape
        if input_pos is None:
            positions = torch.arange(T, device=embeds.device)
        else:
            positions = input_pos
        cos, sin = self._rope(positions, embeds.dtype)
        if self.has_cache and input_pos is not None:
            keys = torch.arange(self.cache_len, device=embeds.device)
        else:
            keys = positions
        mask = keys[None, :] <= positions[:, None]  # [T, S] causal (and unfilled cache slots)
        mask = mask[None, None]  # [1, 1, T, S]
        if key_mask is not None:
            # Padding keys are hidden; every position still sees itself so that no softmax row is
            # empty (an empty row gives NaN, and NaN values poison later layers even when masked).
            self_mask = (keys[None, :] == positions[:, None])[None, None]
            mask = (mask & key_mask[:, None, None, : mask.shape[-1]].bool()) | self_mask
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)
