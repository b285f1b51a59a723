"""Model core: our modules against transformers' reference models, KV cache, checkpoints."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from tinyalign.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinyalign.generate import generate
from tinyalign.models.llama import LlamaDecoder
from tinyalign.models.vit import SiglipVisionTower
from tinyalign.models.vlm import TinyAlignVLM
from tinyalign.tokenizer import IMAGE_TOKEN_ID, train_bpe
from tinyalign.weights import WeightsError, load_gguf_lm, load_hf_lm, load_hf_siglip


def _hf_lm(kind: str, tmp_path: Path):
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama3-rope":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    model.eval()
    if kind == "qwen2":  # random-init biases are zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    folder = tmp_path / kind
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3-rope"])
def test_decoder_logits_match_transformers(kind, tmp_path):
    ref, folder = _hf_lm(kind, tmp_path)
    cfg, sd = load_hf_lm(folder)
    ours = LlamaDecoder(cfg)
    ours.load_state_dict(sd, strict=not cfg.tie_word_embeddings)
    ours.eval()
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ours.embed_tokens(ids))
    assert (got - want).abs().max().item() < 1e-4


def test_siglip_features_match_transformers(tmp_path):
    import transformers

    cfg = transformers.SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                          num_attention_heads=4, image_size=32, patch_size=8)
    ref = transformers.SiglipVisionModel(cfg).eval()
    ref.save_pretrained(tmp_path / "siglip", safe_serialization=True)
    vcfg, sd = load_hf_siglip(tmp_path / "siglip", feature_layer=-2)
    ours = SiglipVisionTower(vcfg).eval()
    ours.load_state_dict(sd)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        got = ours(pixels)
    assert got.shape == want.shape == (2, 16, 48)
    assert (got - want).abs().max().item() < 1e-4


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # what llama.cpp's convert_hf_to_gguf does to q/k rows
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_loader_matches_transformers(tmp_path):
    import gguf

    ref, _ = _hf_lm("llama", tmp_path)
    c = ref.config
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, t in ref.state_dict().items():
        a = t.numpy().astype(np.float32)
        if key == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif key == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif key == "lm_head.weight":
            w.add_tensor("output.weight", a)
        elif key.startswith("model.layers."):
            _, _, idx, *rest = key.split(".")
            mod, leaf = ".".join(rest[:-1]), rest[-1]
            if mod == "self_attn.q_proj":
                a = _llama_cpp_permute(a, c.num_attention_heads)
            elif mod == "self_attn.k_proj":
                a = _llama_cpp_permute(a, c.num_key_value_heads)
            w.add_tensor(f"blk.{idx}.{names[mod]}.{leaf}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg, sd, _ = load_gguf_lm(path)
    ours = LlamaDecoder(cfg)
    ours.load_state_dict(sd)
    ours.eval()
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        assert (ours(ours.embed_tokens(ids)) - ref(ids).logits).abs().max().item() < 1e-4


def _lm(seed=0):
    from tinyalign.config import LMConfig

    torch.manual_seed(seed)
    return LlamaDecoder(LMConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=64, max_seq_len=64)).eval()


def test_kv_cache_generation_equals_no_cache_generation():
    lm = _lm()
    prefix = lm.embed_tokens(torch.randint(0, 97, (1, 12)))
    a = generate(lm, prefix, max_new_tokens=30, use_cache=True)
    b = generate(lm, prefix, max_new_tokens=30, use_cache=False)
    assert a == b and len(a[0]) == 30


def test_kv_cache_logits_equal_full_forward():
    lm = _lm()
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full = lm(lm.embed_tokens(ids))
        lm.setup_cache(1, 64)
        pre = lm(lm.embed_tokens(ids[:, :15]), input_pos=torch.arange(15))
        steps = [lm(lm.embed_tokens(ids[:, i:i + 1]), input_pos=torch.tensor([i])) for i in range(15, 20)]
        lm.drop_cache()
    got = torch.cat([pre] + steps, dim=1)
    assert (got - full).abs().max().item() < 1e-5


def test_left_padded_batch_generates_like_single_rows():
    lm = _lm()
    p1 = lm.embed_tokens(torch.randint(0, 97, (1, 7)))
    p2 = lm.embed_tokens(torch.randint(0, 97, (1, 11)))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, 32), p1], 1), p2], 0)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :4] = False
    got = generate(lm, batch, key_mask=mask, max_new_tokens=8)
    assert got == [generate(lm, p1, max_new_tokens=8)[0], generate(lm, p2, max_new_tokens=8)[0]]


def test_sampling_with_seed_is_deterministic_and_stops_at_eos():
    lm = _lm()
    prefix = lm.embed_tokens(torch.randint(0, 97, (1, 5)))
    a = generate(lm, prefix, max_new_tokens=20, temperature=0.8, top_p=0.9, seed=3)
    assert a == generate(lm, prefix, max_new_tokens=20, temperature=0.8, top_p=0.9, seed=3)
    stop = a[0][2]
    cut = generate(lm, prefix, max_new_tokens=20, temperature=0.8, top_p=0.9, seed=3, stop_ids=[stop])
    assert cut[0] == a[0][: a[0].index(stop)]


def _tiny_vlm_and_tokenizer():
    cfg = tiny_config()
    tok = train_bpe(["a red circle", "a blue square", "what shape is this?"] * 20, 300, cfg.template)
    torch.manual_seed(0)
    return TinyAlignVLM(cfg).eval(), tok


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model, tok = _tiny_vlm_and_tokenizer()
    save_checkpoint(model, tok, tmp_path / "ckpt", meta={"stage": "test"})
    loaded, tok2, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["stage"] == "test" and tok2.encode("a red circle") == tok.encode("a red circle")
    ids = torch.tensor([tok.prompt_ids("what shape is this?")])
    pixels = torch.randn(1, 3, 32, 32)
    values = torch.randint(-1, 300, (1, 2, 4))
    with torch.no_grad():
        a, _ = model(ids, pixels=pixels, values=values)
        b, _ = loaded(ids, pixels=pixels, values=values)
    assert torch.equal(a, b)


def test_save_refuses_existing_output_without_force(tmp_path):
    model, tok = _tiny_vlm_and_tokenizer()
    save_checkpoint(model, tok, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="--force"):
        save_checkpoint(model, tok, tmp_path / "ckpt")
    save_checkpoint(model, tok, tmp_path / "ckpt", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers


def test_truncated_safetensors_gives_clear_error(tmp_path):
    model, tok = _tiny_vlm_and_tokenizer()
    save_checkpoint(model, tok, tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_config_gives_clear_error(tmp_path):
    model, tok = _tiny_vlm_and_tokenizer()
    save_checkpoint(model, tok, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(WeightsError, match="config.json"):
        load_hf_lm(tmp_path / "ckpt")


def test_unsupported_architecture_gives_clear_error(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(WeightsError, match="model_type 'gpt2' is not supported"):
        load_hf_lm(folder)


def test_checkpoint_with_mismatched_config_names_the_part(tmp_path):
    model, tok = _tiny_vlm_and_tokenizer()
    save_checkpoint(model, tok, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["lm"]["hidden_size"] = 64
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "ckpt")


def test_retrieval_off_equals_baseline_forward():
    model, tok = _tiny_vlm_and_tokenizer()
    base_cfg = tiny_config()
    base_cfg.retrieval.enabled = False
    base = TinyAlignVLM(base_cfg).eval()
    base.load_state_dict(model.state_dict())
    ids = torch.tensor([tok.prompt_ids("what shape is this?")])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, _ = model(ids, pixels=pixels, values=None)
        b, _ = base(ids, pixels=pixels, values=torch.randint(0, 300, (1, 2, 4)))  # ignored when off
    assert torch.equal(a, b)


def test_memory_tokens_sit_after_image_tokens_with_ignored_labels():
    model, tok = _tiny_vlm_and_tokenizer()
    prompt = tok.prompt_ids("what shape is this?")
    ans = tok.answer_ids("circle")
    ids = torch.tensor([prompt + ans])
    labels = torch.tensor([[-100] * len(prompt) + ans])
    feats = model.image_features(torch.randn(1, 3, 32, 32))
    img = model.image_tokens(feats)
    mem = model.memory_tokens(torch.randint(0, 300, (1, 2, 4)))
    embeds, lab, _ = model.assemble(ids, img, mem, labels)
    p = prompt.index(IMAGE_TOKEN_ID)
    n, m = img.shape[1], mem.shape[1]
    assert torch.equal(embeds[0, p:p + n], img[0]) and torch.equal(embeds[0, p + n:p + n + m], mem[0])
    assert (lab[0, p:p + n + m] == -100).all()
    assert lab[0, -len(ans):].tolist() == ans


def test_fingerprint_ignores_tokenizer_json_formatting(tmp_path):
    model, tok = _tiny_vlm_and_tokenizer()
    tok.save(tmp_path / "tokenizer.json")  # pretty-printed on disk
    pretty = (tmp_path / "tokenizer.json").read_text()
    assert pretty != tok.tok.to_str()
    assert model.key_fingerprint(pretty) == model.key_fingerprint(tok.tok.to_str())
    other, _ = _tiny_vlm_and_tokenizer()
    torch.nn.init.normal_(other.key_encoder.image_head[0].weight)
    assert other.key_fingerprint(pretty) != model.key_fingerprint(pretty)
