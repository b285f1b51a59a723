"""Retrieval parts: attention pooling against numpy, key recipes, latent values."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from tinyalign.config import KeyRecipe, ValueKind
from tinyalign.models.retrieval import attention_pool
from tinyalign.models.vlm import TinyAlignVLM


def _numpy_pool(M):
    s = M @ M.T
    A = np.exp(s - s.max(1, keepdims=True))
    A /= A.sum(1, keepdims=True)
    return A.mean(0) @ M


def test_attention_pooling_matches_numpy():
    M = torch.randn(3, 7, 16, dtype=torch.float64)
    got = attention_pool(M).numpy()
    want = np.stack([_numpy_pool(m) for m in M.numpy()])
    assert np.allclose(got, want, atol=1e-10)


def test_masked_attention_pooling_equals_pooling_the_valid_rows():
    M = torch.randn(2, 9, 8, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    got = attention_pool(M, mask)
    assert np.allclose(got[0].numpy(), _numpy_pool(M[0, :6].numpy()), atol=1e-10)
    assert np.allclose(got[1].numpy(), _numpy_pool(M[1].numpy()), atol=1e-10)


def test_paper_recipe_is_the_alpha_weighted_pool_of_image_and_text():
    cfg = tiny_config(recipe=KeyRecipe.PAPER, alpha=0.4)
    model = TinyAlignVLM(cfg).eval()
    feats = torch.randn(1, 16, 32)
    ids = torch.tensor([[5, 9, 12, -1]])
    with torch.no_grad():
        got = model.key_encoder(feats, ids, ids >= 0)[0].double().numpy()
        enc = model.key_encoder
        img = torch.nn.functional.normalize(enc.connector(feats), dim=-1)[0].double().numpy()
        txt = torch.nn.functional.normalize(enc.text_embed(ids[:, :3]), dim=-1)[0].double().numpy()
    want = _numpy_pool(np.concatenate([0.4 * img, 0.6 * txt]))
    want /= np.linalg.norm(want)
    assert np.allclose(got, want, atol=1e-5)


def test_image_recipe_ignores_the_text_and_learned_queries_match_keys_of_the_same_image():
    for recipe in (KeyRecipe.IMAGE, KeyRecipe.LEARNED):
        model = TinyAlignVLM(tiny_config(recipe=recipe)).eval()
        feats = torch.randn(2, 16, 32)
        with torch.no_grad():
            a = model.key_encoder(feats, torch.tensor([[1, 2], [3, 4]]), torch.ones(2, 2))
            b = model.key_encoder(feats, None)
        assert torch.allclose(a, b) and torch.allclose(a.norm(dim=-1), torch.ones(2))


def test_latent_values_become_k_times_m_memory_tokens():
    cfg = tiny_config(value_kind=ValueKind.LATENT)
    cfg.retrieval.value_tokens, cfg.retrieval.value_dim = 3, 8
    model = TinyAlignVLM(cfg).eval()
    feats = torch.randn(4, 16, 32)
    caps = torch.tensor([[5, 6, -1, -1]] * 4)
    with torch.no_grad():
        v = model.value_encoder(feats, caps, caps >= 0)  # [4, m, d_v]
        mem = model.memory_tokens(v.view(2, 2, 3, 8))
    assert v.shape == (4, 3, 8) and mem.shape == (2, 6, 32)
    assert model.memory_len() == 2 * 3


def test_caption_value_padding_gives_zero_memory_tokens():
    model = TinyAlignVLM(tiny_config()).eval()
    with torch.no_grad():
        mem = model.memory_tokens(torch.tensor([[[7, 8, -1, -1], [9, -1, -1, -1]]]))
    assert mem.shape == (1, 8, 32)
    assert torch.all(mem[0, 2:4] == 0) and torch.all(mem[0, 5:] == 0) and mem[0, 0].abs().sum() > 0
