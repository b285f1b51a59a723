"""Export: per-method wrappers, quantization presets, ExecuTorch / Core ML programs and bundles.

Every test uses a tiny random model (tests/conftest.py `tiny_config`) saved as a checkpoint, and a
small memory bank built from random images with that model's own key encoder.
"""

import copy
import inspect
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from tinyalign.checkpoint import save_checkpoint
from tinyalign.models.vlm import TinyAlignVLM
from tinyalign.tokenizer import IMAGE_TOKEN_ID, train_bpe

DOC = Path(__file__).parent.parent / "docs" / "bundle.md"
TEXTS = ["a red circle", "a blue square", "a green triangle", "what shape is this?", "what color is it?",
         "is there a circle?"] * 20
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle"]


QA = [("what shape is this?", "a red circle"), ("what color is it?", "blue"),
      ("is there a circle?", "yes, a green circle"), ("what is it?", "a blue square")]


def _train_lm(model, tok, steps=120):
    """A few seconds of LM training on chat-formatted QA, so that greedy decoding gives varied,
    input-dependent tokens (a random tiny LM repeats one token, which makes agreement trivial)."""
    import torch.nn.functional as F

    seqs = [[i for i in tok.prompt_ids(q) if i >= 0] + tok.answer_ids(a) for q, a in QA]
    L = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_id] * (L - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.lm.parameters(), lr=1e-2)
    model.train()
    # one thread and no denormals: 0.3 s instead of a minute on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            logits = model.lm(model.lm.embed_tokens(ids), key_mask=mask)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _build_bank(model, tok, path, *, fingerprint=None, n=12, seed=0):
    from tinyalign.bank import BankMetadata, MemoryBank

    r = model.cfg.retrieval
    g = torch.Generator().manual_seed(seed)
    S = model.cfg.vision.image_size
    pixels = torch.rand(n, 3, S, S, generator=g) * 2 - 1
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    ids = np.full((n, r.caption_len), -1, dtype=np.int64)
    for i, c in enumerate(captions):
        t = tok.encode(c)[: r.caption_len]
        ids[i, : len(t)] = t
    with torch.no_grad():
        feats = model.image_features(pixels)
        cap = torch.from_numpy(ids)
        keys = model.key_encoder(feats, cap.clamp(min=0), (cap >= 0).long()).numpy()
    fp = fingerprint if fingerprint is not None else model.key_fingerprint(tok.tok.to_str())
    bank = MemoryBank(meta=BankMetadata(dim=keys.shape[1], k=r.k, alpha=r.alpha, recipe=r.recipe.value,
                                        value_kind=r.value_kind.value, source="test", fingerprint=fp))
    bank.add(keys, {"caption_ids": ids}, captions)
    bank.save(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(checkpoint folder, bank folder, model, tokenizer) of a tiny random model."""
    root = tmp_path_factory.mktemp("export_inputs")
    cfg = tiny_config()
    tok = train_bpe(TEXTS, 300, cfg.template)
    torch.manual_seed(0)
    model = _train_lm(TinyAlignVLM(cfg), tok)
    ckpt = save_checkpoint(model, tok, root / "ckpt", meta={"stage": "test", "step": 1})
    # the fingerprint is over the saved tokenizer.json text, exactly as export reads it
    fp = model.key_fingerprint((ckpt / "tokenizer.json").read_text())
    bank = _build_bank(model, tok, root / "bank", fingerprint=fp)
    return ckpt, bank, model, tok


@pytest.fixture(scope="module")
def desktop_fp32(inputs, tmp_path_factory):
    from tinyalign.export import export_bundle

    ckpt, bank, _, _ = inputs
    out = tmp_path_factory.mktemp("bundles") / "desktop-fp32"
    return export_bundle(checkpoint=ckpt, bank=bank, out=out, target="desktop", quantize="fp32", verbose=False)


def _leftovers(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if name in p.name]


# ---- methods and presets -------------------------------------------------------------------------
def test_argument_order_is_defined_once_and_matches_wrappers():
    from tinyalign.export.methods import METHOD_NAMES, WRAPPERS, method_specs

    specs = method_specs(tiny_config())
    assert tuple(specs) == METHOD_NAMES
    assert METHOD_NAMES == ("vision_encoder", "token_embedding", "retrieval_query", "rag_connector", "text_decoder")
    for name in METHOD_NAMES:
        params = list(inspect.signature(WRAPPERS[name].forward).parameters)[1:]
        assert params == [t.name for t in specs[name].inputs], name
    assert [t.name for t in specs["text_decoder"].inputs] == ["embeds", "input_pos"]
    assert specs["text_decoder"].dims["T"] == (1, tiny_config().lm.max_seq_len - 1)


def test_wrappers_equal_model_pieces():
    from tinyalign.export.methods import build_methods, method_specs, sample_inputs

    model = TinyAlignVLM(tiny_config()).eval()
    ref = copy.deepcopy(model)
    m = build_methods(model)
    px = torch.rand(1, 3, 32, 32)
    ids = torch.tensor([[5, 6, IMAGE_TOKEN_ID, 7]])
    with torch.no_grad():
        tokens, feats = m["vision_encoder"](px)
        assert torch.allclose(tokens, ref.image_tokens(ref.image_features(px)), atol=1e-6)
        q = m["retrieval_query"](feats, ids, torch.ones_like(ids))
        keep = torch.tensor([[5, 6, 7]])
        assert torch.allclose(q, ref.key_encoder(feats, keep, torch.ones_like(keep)), atol=1e-6)
        vals = sample_inputs(method_specs(model.cfg)["rag_connector"], vocab=300)[0]
        assert torch.equal(m["rag_connector"](vals), ref.memory_tokens(vals))


def test_quantize_returns_a_copy_and_never_mutates():
    from tinyalign.export.quantize import count_quantized, quantize_model

    model = TinyAlignVLM(tiny_config()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for preset, target in (("8da4w", "desktop"), ("8w", "ios")):
        q = quantize_model(model, preset, target)
        n = count_quantized(q)
        assert n["linear"] > 0 and (n["embedding"] == 1) == (preset == "8da4w")
        # the vision tower and the key encoder (which made the bank's keys) stay float
        assert all(type(p) is torch.nn.Parameter for p in q.vision.parameters())
        assert all(type(p) is torch.nn.Parameter for p in q.key_encoder.parameters())
    assert count_quantized(model) == {"linear": 0, "embedding": 0}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_target_and_preset_give_clear_errors_and_write_nothing(inputs, tmp_path):
    from tinyalign.export import ExportError, export_bundle

    ckpt, bank, _, _ = inputs
    with pytest.raises(ExportError, match="desktop, android, ios, macos"):
        export_bundle(checkpoint=ckpt, bank=bank, out=tmp_path / "b", target="windows", verbose=False)
    with pytest.raises(ExportError, match="fp32, 8w, 8da4w, fp16"):
        export_bundle(checkpoint=ckpt, bank=bank, out=tmp_path / "b", quantize="4bit", verbose=False)
    with pytest.raises(ExportError, match="ios / macos"):
        export_bundle(checkpoint=ckpt, bank=bank, out=tmp_path / "b", target="android", quantize="fp16",
                      verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_mismatch_is_refused_and_leaves_nothing(inputs, tmp_path):
    from tinyalign.export import ExportError, export_bundle

    ckpt, _, model, tok = inputs
    other = _build_bank(model, tok, tmp_path / "other-bank", fingerprint="0" * 64)
    with pytest.raises(ExportError, match="fingerprint"):
        export_bundle(checkpoint=ckpt, bank=other, out=tmp_path / "b", verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-bank"]


def test_existing_output_is_refused_without_force(inputs, tmp_path):
    from tinyalign.export import export_bundle

    ckpt, bank, _, _ = inputs
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export_bundle(checkpoint=ckpt, bank=bank, out=out, verbose=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    for inside in (ckpt, ckpt / "bundle", bank.parent):
        with pytest.raises(ValueError, match="input"):
            export_bundle(checkpoint=ckpt, bank=bank, out=inside, force=True, verbose=False)
    assert (ckpt / "model.safetensors").is_file() and not (ckpt / "bundle").exists()


def test_bank_copy_can_reencode_keys(inputs, tmp_path):
    from tinyalign.bank import MemoryBank
    from tinyalign.export.bundle import _copy_bank

    _, bank_path, _, _ = inputs
    src = MemoryBank.open(bank_path)
    same = _copy_bank(src, tmp_path / "same", None)
    assert same.meta.key_dtype == src.meta.key_dtype and (tmp_path / "same" / "meta.json").is_file()
    i8 = _copy_bank(src, tmp_path / "i8", "i8")
    assert i8.meta.key_dtype == "i8" and len(i8) == len(src) and i8.meta.fingerprint == src.meta.fingerprint
    ids = np.arange(len(src))
    assert np.array_equal(i8.values(ids)["caption_ids"], src.values(ids)["caption_ids"])
    assert i8.captions_of(ids) == src.captions_of(ids)
    found, _ = i8.search(src.stored_keys(ids).astype(np.float32), 1)
    assert (found[:, 0] == ids).mean() >= 0.9


# ---- desktop fp32: runs in the ExecuTorch runtime and matches eager -------------------------------
def test_desktop_fp32_bundle_matches_eager_per_method_and_in_generation(desktop_fp32):
    m = json.loads((desktop_fp32 / "manifest.json").read_text())
    p = m["parity"]
    assert p["runnable"] and p["status"] == "passed", p
    assert set(p["methods"]) == set(m["method_order"])
    for name, d in p["methods"].items():
        assert d["max_abs_diff"] <= 1e-4, (name, d)
    gen = p["generation"]
    assert gen["token_agreement"] == 1.0 and gen["free_run_prefix_agreement"] == 1.0
    assert gen["retrieval_agreement"] == 1.0 and gen["tokens"] >= 3 * 4
    # the trained tiny LM gives varied tokens, so agreement is not trivially 1
    assert len({t for row in gen["per_prompt"] for t in row["eager_tokens"]}) >= 3


def test_pte_methods_match_eager_when_called_directly(desktop_fp32, inputs):
    """Independent of the export's own report: call the loaded program like a runtime would."""
    from executorch.runtime import Runtime

    _, _, model, _ = inputs
    prog = Runtime.get().load_program(str(desktop_fp32 / "model.pte"))
    assert {"vision_encoder", "token_embedding", "retrieval_query", "rag_connector", "text_decoder",
            "get_max_seq_len", "get_bos_id", "get_eos_ids", "get_vocab_size"} <= set(prog.method_names)
    assert prog.load_method("get_max_seq_len").execute([])[0] == model.cfg.lm.max_seq_len
    assert prog.load_method("get_vocab_size").execute([])[0] == model.cfg.lm.vocab_size
    px = torch.rand(1, 3, 32, 32) * 2 - 1
    tokens, feats = prog.load_method("vision_encoder").execute([px])
    with torch.no_grad():
        want = model.image_features(px)
        assert (feats - want).abs().max() < 1e-4
        assert (tokens - model.image_tokens(want)).abs().max() < 1e-4
    # prefill of 9 positions then 6 single-token steps, against the eager decoder with a cache
    lm = copy.deepcopy(model.lm)
    lm.setup_cache(1, model.cfg.lm.max_seq_len)
    dec = prog.load_method("text_decoder")
    embeds = torch.randn(1, 15, model.cfg.lm.hidden_size)
    chunks = [(0, 9)] + [(i, i + 1) for i in range(9, 15)]
    for a, b in chunks:
        got = dec.execute([embeds[:, a:b], torch.arange(a, b)])[0]
        with torch.no_grad():
            want = lm(embeds[:, a:b], input_pos=torch.arange(a, b))[:, -1]
        assert got.shape == (1, model.cfg.lm.vocab_size)
        assert (got - want).abs().max() < 1e-4


def test_manifest_sha256_match_the_files(desktop_fp32):
    from tinyalign.export import verify_bundle
    from tinyalign.fsutil import sha256_file

    m = verify_bundle(desktop_fp32)
    on_disk = {p.relative_to(desktop_fp32).as_posix() for p in desktop_fp32.rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert set(m["files"]) == on_disk
    assert {"model.pte", "tokenizer.json", "bank/meta.json", "bank/index.usearch"} <= on_disk
    for rel, info in m["files"].items():
        assert sha256_file(desktop_fp32 / rel) == info["sha256"]
        assert (desktop_fp32 / rel).stat().st_size == info["bytes"]
    assert m["bank"]["fingerprint"] == m["fingerprint"]
    assert m["method_order"] == list(m["methods"])


def _doc_manifest_keys() -> list[str]:
    text = DOC.read_text()
    blocks = re.findall(r"```manifest-keys\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/bundle.md needs exactly one ```manifest-keys block"
    return [ln.split("#")[0].strip() for ln in blocks[0].splitlines() if ln.split("#")[0].strip()]


def test_manifest_keys_match_docs(desktop_fp32):
    m = json.loads((desktop_fp32 / "manifest.json").read_text())
    keys = _doc_manifest_keys()
    assert {k for k in keys if "." not in k} == set(m), "top-level manifest keys differ from docs/bundle.md"
    for dotted in keys:
        node = m
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"manifest lacks {dotted} (listed in docs/bundle.md)"
            node = node[part]
    # the doc's method table lists the same argument order as the manifest
    text = DOC.read_text()
    steps = text.split("## What a runtime does, in order")[1].split("\n## ")[0]
    order = ["vision_encoder(", "retrieval_query(", "Bank search", "rag_connector(", "Assemble", "Prefill",
             "Decode loop"]
    where = [steps.find(s) for s in order]
    assert -1 not in where and where == sorted(where), where
    pipe = " | ".join(m["pipeline"])
    where = [pipe.find(s) for s in ("sha256", "preprocess", "vision_encoder", "retrieval_query", "bank search",
                                    "rag_connector", "assemble", "prefill", "decode loop")]
    assert -1 not in where and where == sorted(where), m["pipeline"]
    for name, spec in m["methods"].items():
        args = ", ".join(i["name"] for i in spec["inputs"])
        assert f"`{name}({args})`" in text, f"docs/bundle.md does not show {name}({args})"


def test_bundle_alone_reproduces_eager_generation(desktop_fp32, inputs):
    """Follow docs/bundle.md with only the bundle (manifest, tokenizer.json, bank, model.pte)."""
    from executorch.runtime import Runtime
    from PIL import Image
    from tokenizers import Tokenizer as HFTokenizer

    from tinyalign.bank import MemoryBank
    from tinyalign.generate import generate
    from tinyalign.images import preprocess

    _, _, model, tok = inputs
    root = desktop_fp32
    m = json.loads((root / "manifest.json").read_text())
    hf = HFTokenizer.from_file(str(root / m["tokenizer"]))
    t, sp = m["template"], m["special_tokens"]
    question = "what color is it?"
    before = ([sp["bos_id"]] if sp["bos_id"] is not None else []) + hf.encode(
        t["system"] + t["user_prefix"], add_special_tokens=False).ids
    after = hf.encode("\n" + question + t["user_suffix"] + t["assistant_prefix"], add_special_tokens=False).ids
    assert before + [IMAGE_TOKEN_ID] + after == tok.prompt_ids(question)
    img = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    px = torch.from_numpy(preprocess(img, m["image"]["size"], m["image"]["mean"], m["image"]["std"]))[None]

    prog = Runtime.get().load_program(str(root / m["programs"]["executorch"]))
    run = {n: prog.load_method(n) for n in m["method_order"]}
    img_tokens, feats = run["vision_encoder"].execute([px])
    full = torch.tensor([before + [IMAGE_TOKEN_ID] + after])
    query = run["retrieval_query"].execute([feats, full, torch.ones_like(full)])[0]
    bank = MemoryBank.open(root / m["bank"]["path"])
    r = m["retrieval"]
    ids, _ = bank.search(query.numpy(), r["k"])
    values = torch.from_numpy(bank.values(ids[0])[r["value_name"]].astype(np.int64))[None]
    memory = run["rag_connector"].execute([values])[0]
    prefix = torch.cat([run["token_embedding"].execute([torch.tensor([before])])[0], img_tokens, memory,
                        run["token_embedding"].execute([torch.tensor([after])])[0]], 1)
    n = 6
    logits = run["text_decoder"].execute([prefix, torch.arange(prefix.shape[1])])[0]
    got = []
    for i in range(n):
        got.append(int(logits.argmax(-1)[0]))
        emb = run["token_embedding"].execute([torch.tensor([[got[-1]]])])[0]
        logits = run["text_decoder"].execute([emb, torch.tensor([prefix.shape[1] + i])])[0]

    with torch.no_grad():  # the library's eager path
        f = model.image_features(px)
        mem = model.memory_tokens(values)
        eager_prefix, _, _ = model.assemble(full, model.image_tokens(f), mem)
        want = generate(copy.deepcopy(model.lm), eager_prefix, max_new_tokens=n, stop_ids=())[0]
    assert (prefix - eager_prefix).abs().max() < 1e-4
    assert got == [int(x) for x in want]


# ---- quantized presets ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("target,preset", [("desktop", "8w"), ("android", "8da4w")])
def test_quantized_bundles_run_and_report_agreement(inputs, desktop_fp32, tmp_path, target, preset):
    from executorch.runtime import Runtime

    from tinyalign.export import export_bundle

    ckpt, bank, _, _ = inputs
    out = export_bundle(checkpoint=ckpt, bank=bank, out=tmp_path / preset, target=target, quantize=preset,
                        allow_drift=True, verbose=False)
    m = json.loads((out / "manifest.json").read_text())
    p = m["parity"]
    assert p["runnable"] and p["status"] in ("passed", "failed (allowed by --allow-drift)")
    gen = p["generation"]
    for key in ("token_agreement", "free_run_prefix_agreement", "eager_preset_token_agreement"):
        assert 0.0 <= gen[key] <= 1.0
    for d in p["methods"].values():
        assert np.isfinite(d["max_abs_diff"]) and np.isfinite(d["max_abs_diff_vs_quantized_eager"])
    assert p["methods"]["retrieval_query"]["max_abs_diff"] < 1e-4  # the key encoder stays fp32
    assert m["quantization"]["preset"] == preset and m["quantization"]["linear"]
    if preset == "8da4w":
        assert m["quantization"]["embedding"] and "groups of 32" in m["quantization"]["linear"]
        assert (out / "model.pte").stat().st_size < (desktop_fp32 / "model.pte").stat().st_size
    logits = Runtime.get().load_program(str(out / "model.pte")).load_method("text_decoder").execute(
        [torch.randn(1, 5, 32), torch.arange(5)])[0]
    assert logits.shape == (1, 300) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_drift_beyond_threshold_fails_and_leaves_nothing(inputs, tmp_path, monkeypatch):
    from dataclasses import replace

    from tinyalign.export import DriftError, export_bundle
    from tinyalign.export import quantize as qz

    ckpt, bank, _, _ = inputs
    monkeypatch.setitem(qz.PRESETS, "fp32", replace(qz.PRESETS["fp32"], max_abs_diff=0.0))
    with pytest.raises(DriftError, match="allow-drift"):
        export_bundle(checkpoint=ckpt, bank=bank, out=tmp_path / "b", verbose=False)
    assert list(tmp_path.iterdir()) == []


# ---- Core ML targets --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("target,preset", [("ios", "8da4w"), ("macos", "fp16")])
def test_coreml_targets_write_pte_and_readable_mlpackages(inputs, tmp_path, target, preset):
    import coremltools as ct

    from tinyalign.export import export_bundle, verify_bundle
    from tinyalign.export.methods import method_specs

    ckpt, bank, model, _ = inputs
    out = export_bundle(checkpoint=ckpt, bank=bank, out=tmp_path / target, target=target, quantize=preset,
                        verbose=False)
    m = verify_bundle(out)
    assert m["backend"] == "coreml" and (out / "model.pte").stat().st_size > 0
    p = m["parity"]
    if sys.platform != "darwin":
        assert p["runnable"] is False and "not runnable" in p["status"] and p["methods"] is None
        # what can be measured off macOS: the preset's effect in eager PyTorch
        assert 0.0 <= p["generation"]["eager_preset_token_agreement"] <= 1.0
    specs = method_specs(model.cfg)
    for name, file in m["programs"]["coreml"].items():
        spec = ct.utils.load_spec(str(out / file))
        assert [i.name for i in spec.description.input] == [t.name for t in specs[name].inputs]
        assert [o.name for o in spec.description.output] == [t.name for t in specs[name].outputs]
        assert m["coreml"][name]["compute_precision"] == ("fp16" if preset == "fp16" else "fp32")
    dec = m["coreml"]["text_decoder"]
    assert dec["kind"] == "stateful" and len(dec["states"]) == 2 * model.cfg.lm.num_layers
    assert dec["inputs"][0]["shape"] == [1, [1, model.cfg.lm.max_seq_len - 1], model.cfg.lm.hidden_size]
    assert dec["outputs"][0]["shape"] == [1, model.cfg.lm.vocab_size]
    vis = m["coreml"]["vision_encoder"]
    assert vis["inputs"][0]["shape"] == [1, 3, 32, 32] and vis["outputs"][0]["shape"] == [1, 16, 32]
    ops = {op.type for f in ct.utils.load_spec(str(out / "text_decoder.mlpackage")).mlProgram.functions.values()
           for blk in f.block_specializations.values() for op in blk.operations}
    if preset == "8da4w":  # 4-bit weight-only linears on Core ML
        assert "constexpr_blockwise_shift_scale" in ops
        assert "int4 weights (groups of 32), float activations" == m["quantization"]["linear"]


def test_stateless_coreml_decoder_fallback(tmp_path):
    import coremltools as ct

    from tinyalign.export.coreml_export import StatelessDecoder, cache_io_names, convert_method
    from tinyalign.export.methods import build_methods
    from tinyalign.export.quantize import PRESETS

    model = TinyAlignVLM(tiny_config()).eval()
    convert_method(copy.deepcopy(model), "text_decoder", tmp_path / "dec.mlpackage", "ios", PRESETS["fp32"],
                   stateful=False)
    spec = ct.utils.load_spec(str(tmp_path / "dec.mlpackage"))
    names = cache_io_names(model.cfg.lm.num_layers)
    assert [i.name for i in spec.description.input] == ["embeds", "input_pos", *names]
    assert [o.name for o in spec.description.output] == ["logits", *[f"{n}_out" for n in names]]
    assert len(spec.description.state) == 0
    # the stateless form computes what the stateful one does when the caches are carried along
    stateful = build_methods(copy.deepcopy(model))["text_decoder"]
    lm = copy.deepcopy(model.lm)
    lm.setup_cache(1, model.cfg.lm.max_seq_len)
    sl = StatelessDecoder(lm).eval()
    caches = [torch.zeros(lm.layers[0].self_attn.k_cache.shape) for _ in names]
    x = torch.randn(1, 8, model.cfg.lm.hidden_size)
    with torch.no_grad():
        for a, b in ((0, 6), (6, 7), (7, 8)):
            want = stateful(x[:, a:b], torch.arange(a, b))
            got, *caches = sl(x[:, a:b], torch.arange(a, b), *caches)
            assert torch.allclose(got, want, atol=1e-6)
