"""The on-device runtime (`tinyalign.runtime`): a desktop fp32 bundle of a tiny trained model,
opened and asked questions without torch, against the library's eager path.

The bundle is exported once per test session (`runtime_bundle`, also used by tests/test_demo.py):
a tiny model (tests/conftest.py `tiny_config`) with a bank built by `build_bank` from drawn
shapes, whose connectors and LM are then trained for a few seconds on (image, question) ->
answer, so that answers depend on the image and the comparisons are not trivial.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402
from helpers import COLOURS, SHAPES, draw  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["what color is the shape?", "what shape is this?", "what color is the circle?"]


# ---- the bundle (built once per session) ----------------------------------------------------------
def _train(model, tok, feats, bank, entries, steps=150):
    """A few seconds of training of the connector, RAG connector and LM on (image, question) ->
    answer with retrieved memories, so that answers depend on the image (the vision tower and the
    key encoder stay frozen: the bank's keys and fingerprint remain valid)."""
    import torch

    k = model.cfg.retrieval.k
    nn_ids, _ = bank.search(bank.stored_keys().astype(np.float32), k)
    values = torch.from_numpy(bank.values(nn_ids)["caption_ids"].astype(np.int64))  # [n, k, L]
    rows, labels, which = [], [], []
    for i, e in enumerate(entries):
        colour, shape = Path(e.image).stem.split("_")[:2]
        for q, a in ((QUESTIONS[0], colour), (QUESTIONS[1], shape)):
            prompt, answer = tok.prompt_ids(q), tok.answer_ids(a)
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
            which.append(i)
    L = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (L - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (L - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    which = torch.tensor(which)
    model.set_trainable(vision=False, connector=True, lm=True, rag=True, keys=False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in range(steps):
            _, loss = model(ids, feats=feats[which], values=values[which], labels=lab, attn_mask=mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def build_runtime_inputs(root: Path) -> dict:
    """Checkpoint, bank, images and a desktop fp32 bundle under `root` (paths in a dict)."""
    import torch

    from tinyalign.checkpoint import save_checkpoint
    from tinyalign.data import Example
    from tinyalign.export import export_bundle
    from tinyalign.images import load_image, preprocess
    from tinyalign.models.vlm import TinyAlignVLM
    from tinyalign.tokenizer import train_bpe
    from tinyalign.train.pipeline import build_bank

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = tiny_config()
    texts = [f"a {c} {s}." for c in COLOURS for s in SHAPES] + QUESTIONS + list(COLOURS) + list(SHAPES)
    tok = train_bpe(texts * 10, 300, cfg.template)
    model = TinyAlignVLM(cfg).eval()
    images = root / "images"
    images.mkdir(exist_ok=True)
    entries = []
    for c in COLOURS:
        for s in SHAPES:
            for j in range(2):
                p = images / f"{c}_{s}_{j}.png"
                draw(c, s, jitter=j).save(p)
                entries.append(Example(image=str(p), image_id=p.stem, turns=[], caption=f"a {c} {s}."))
    v = cfg.vision
    px = np.stack([preprocess(load_image(e.image), v.image_size, v.image_mean, v.image_std) for e in entries])
    with torch.no_grad():
        feats = model.image_features(torch.from_numpy(px))
    bank = build_bank(model, tok, entries, feats, source="test")
    model = _train(model, tok, feats, bank, entries)
    ckpt = save_checkpoint(model, tok, root / "ckpt", meta={"stage": "test", "step": 1})
    # build_bank's fingerprint hashes `tok.tok.to_str()`; write tokenizer.json in that same form so
    # that the fingerprint does not depend on how a reader serialises the checkpoint's tokenizer.
    (ckpt / "tokenizer.json").write_text(tok.tok.to_str())
    bank.save(root / "bank")
    bundle = export_bundle(checkpoint=ckpt, bank=root / "bank", out=root / "bundle", target="desktop",
                           quantize="fp32", verbose=False)
    return {"root": root, "ckpt": ckpt, "bank": root / "bank", "images": images, "bundle": bundle}


def runtime_bundle(tmp_path_factory) -> dict:
    """The session's bundle, exported on first use (tests/test_demo.py shares it)."""
    root = tmp_path_factory.getbasetemp() / "runtime-inputs"
    done = root / "done.json"
    if not done.is_file():
        if root.exists():
            shutil.rmtree(root)
        build_runtime_inputs(root)
        done.write_text("{}")
    os.environ.setdefault("TINYALIGN_CACHE", str(tmp_path_factory.getbasetemp() / "tinyalign-cache"))
    return {"root": root, "ckpt": root / "ckpt", "bank": root / "bank", "images": root / "images",
            "bundle": root / "bundle"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return runtime_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(inputs):
    from tinyalign.runtime import Bundle

    b = Bundle.open(inputs["bundle"])
    yield b
    b.close()


@pytest.fixture(scope="module")
def eager(inputs):
    from tinyalign.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(inputs["ckpt"])
    return model.eval(), tok


def _copy(inputs, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(inputs["bundle"], dst)
    return dst


# ---- without torch ---------------------------------------------------------------------------------
def test_runtime_answers_in_a_process_where_torch_cannot_be_imported(inputs, bundle):
    images = [str(inputs["images"] / n) for n in ("red_circle_0.png", "blue_square_1.png", "green_circle_1.png")]
    code = f"""
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from tinyalign.runtime import Bundle
from tinyalign.runtime.cli import run_command  # the CLI module is torch-free too
import tinyalign.demo  # and so is the demo module (Qt is imported only when a window is made)
b = Bundle.open({str(inputs["bundle"])!r})
out = []
for img in {images!r}:
    for q in {QUESTIONS!r}:
        a = b.ask(img, q, max_new_tokens=12)
        out.append({{"text": a.text, "ids": a.token_ids, "memories": [m.id for m in a.memories]}})
loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "torchao", "coremltools", "transformers")]
print(json.dumps({{"answers": out, "backend": b.program.backend,
                  "heavy_modules": [m for m in loaded if sys.modules[m] is not None]}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(ROOT))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["backend"] == "native" and got["heavy_modules"] == []
    rows = iter(got["answers"])
    for img in images:
        for q in QUESTIONS:
            a = bundle.ask(img, q, max_new_tokens=12)
            assert next(rows) == {"text": a.text, "ids": a.token_ids, "memories": [m.id for m in a.memories]}
    # the answers depend on the image and the question, so the comparisons above are not trivial
    assert len({row["text"] for row in got["answers"]}) >= 4


# ---- equal to the eager model ----------------------------------------------------------------------
def _eager_answer(model, tok, pixels: np.ndarray, question: str, entry_ids, bank, max_new_tokens: int):
    """The library's eager path on the same pixels and the same retrieved entries."""
    import torch

    from tinyalign.generate import generate
    from tinyalign.train.evaluate import answer_batch

    with torch.no_grad():
        feats = model.image_features(torch.from_numpy(pixels))
        values = torch.from_numpy(bank.values(np.asarray(entry_ids))["caption_ids"].astype(np.int64))[None]
        text = answer_batch(model, tok, feats, [question], values, max_new_tokens=max_new_tokens)[0]
        ids = torch.tensor([tok.prompt_ids(question)])
        prefix, _, _ = model.assemble(ids, model.image_tokens(feats), model.memory_tokens(values))
        tokens = generate(model.lm, prefix, max_new_tokens=max_new_tokens, stop_ids=tok.eos_ids)[0]
        query = model.key_encoder(feats, ids.clamp(min=0), (ids >= 0).long()).numpy()
    return text, [int(t) for t in tokens], query


@pytest.mark.parametrize("image", ["red_circle_0.png", "blue_square_1.png", "green_circle_1.png"])
def test_bundle_answers_equal_eager_answers(bundle, eager, inputs, image):
    model, tok = eager
    path = inputs["images"] / image
    pixels = bundle.engine.pixels(path)
    for q in QUESTIONS:
        a = bundle.ask(path, q, max_new_tokens=10)
        text, tokens, query = _eager_answer(model, tok, pixels, q, [m.id for m in a.memories], bundle.bank, 10)
        assert a.token_ids == tokens, (q, a.token_ids, tokens)
        assert a.text == text
        want_ids, want_sims = bundle.bank.search(query, len(a.memories))
        assert [m.id for m in a.memories] == want_ids[0].tolist()  # the eager query finds the same entries
        assert np.allclose([m.similarity for m in a.memories], want_sims[0], atol=1e-3)
        assert a.prompt_tokens == len(tok.prompt_ids(q)) - 1 + 16 + model.memory_len()


def test_answer_has_memories_timings_and_streams(bundle, inputs):
    pieces = []
    a = bundle.ask(inputs["images"] / "blue_circle_0.png", "what color is the circle?", max_new_tokens=8,
                   stream=pieces.append)
    assert "".join(pieces).strip() == a.text
    k = bundle.manifest["retrieval"]["k"]
    assert len(a.memories) == k and a.memories[0].caption in bundle.bank.captions_of(np.arange(len(bundle.bank)))
    sims = [m.similarity for m in a.memories]
    assert sims == sorted(sims, reverse=True) and all(-1.0 <= s <= 1.0 for s in sims)
    t = a.timings
    assert t.total_s >= t.encode_s + t.retrieve_s + t.prefill_s > 0
    assert len(t.decode_s) == max(0, len(a.token_ids) + (a.stop_reason == "eos") - 1)
    assert a.stop_reason in ("eos", "max_new_tokens", "max_seq_len")
    d = a.to_dict()
    assert json.loads(json.dumps(d))["memories"][0]["caption"] == a.memories[0].caption


def test_kv_cache_restarts_at_each_question(bundle, inputs):
    img = inputs["images"] / "green_square_0.png"
    first = bundle.ask(img, QUESTIONS[0], max_new_tokens=12)
    bundle.ask(inputs["images"] / "red_circle_1.png", "what shape is this? " * 3, max_new_tokens=12)
    again = bundle.ask(img, QUESTIONS[0], max_new_tokens=12)
    assert again.token_ids == first.token_ids


def test_sampling_is_reproducible_and_top_p_near_zero_is_greedy(bundle, inputs):
    img = inputs["images"] / "red_square_0.png"
    greedy = bundle.ask(img, QUESTIONS[2], max_new_tokens=8)
    a = bundle.ask(img, QUESTIONS[2], max_new_tokens=8, temperature=1.5, seed=7)
    b = bundle.ask(img, QUESTIONS[2], max_new_tokens=8, temperature=1.5, seed=7)
    assert a.token_ids == b.token_ids
    nucleus = bundle.ask(img, QUESTIONS[2], max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=1)
    assert nucleus.token_ids == greedy.token_ids
    with pytest.raises(ValueError, match="top_p"):
        bundle.ask(img, QUESTIONS[2], top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        bundle.ask(img, QUESTIONS[2], temperature=-1)


def test_pybindings_backend_gives_the_same_answers(inputs, bundle):
    from tinyalign.runtime import Bundle

    img = inputs["images"] / "blue_square_0.png"
    with Bundle.open(inputs["bundle"], backend="pybindings") as pb:
        assert pb.program.backend == "pybindings"
        for q in QUESTIONS:
            assert pb.ask(img, q).token_ids == bundle.ask(img, q).token_ids


@pytest.mark.slow
def test_quantized_android_bundle_runs_natively_like_pybindings(inputs, tmp_path):
    """The phone preset (8da4w: int8 dynamic activations, int4 grouped weights, int8 embeddings)
    needs the quantized kernels; the torch-free native backend must give what ExecuTorch's own
    Python bindings give on the same program."""
    from tinyalign.export import export_bundle
    from tinyalign.runtime import Bundle

    out = export_bundle(checkpoint=inputs["ckpt"], bank=inputs["bank"], out=tmp_path / "android-8da4w",
                        target="android", quantize="8da4w", allow_drift=True, verbose=False)
    with Bundle.open(out, backend="native") as nat, Bundle.open(out, backend="pybindings") as pyb:
        assert nat.manifest["quantization"]["preset"] == "8da4w"
        for name in ("red_circle_0.png", "blue_square_1.png"):
            for q in QUESTIONS:
                a, b = nat.ask(inputs["images"] / name, q), pyb.ask(inputs["images"] / name, q)
                assert a.token_ids == b.token_ids and [m.id for m in a.memories] == [m.id for m in b.memories]


def test_native_backend_without_a_compiler_falls_back_or_says_why(inputs, tmp_path, monkeypatch):
    from tinyalign.runtime import ProgramError, open_program

    monkeypatch.setenv("TINYALIGN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    pte = inputs["bundle"] / "model.pte"
    with pytest.raises(ProgramError, match="building the ExecuTorch shim failed"):
        open_program(pte, "native")
    prog = open_program(pte, "auto")  # torch is importable here: ExecuTorch's own bindings
    assert prog.backend == "pybindings" and "text_decoder" in prog.method_names
    with pytest.raises(ValueError, match="unknown backend"):
        open_program(pte, "cuda")


# ---- images ----------------------------------------------------------------------------------------
def _odd_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    base = draw("red", "circle", size=48)
    out = {}
    out["cmyk.jpg"] = folder / "cmyk.jpg"
    base.convert("CMYK").save(out["cmyk.jpg"], quality=95)
    out["grey16.png"] = folder / "grey16.png"
    grey = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey).save(out["grey16.png"])  # mode I;16
    out["palette_transparent.png"] = folder / "palette_transparent.png"
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0
    pal.save(out["palette_transparent.png"], transparency=0)
    out["rgba.png"] = folder / "rgba.png"
    rgba = base.convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:24, :, 3] = 0  # top half transparent: must become white
    Image.fromarray(a, "RGBA").save(out["rgba.png"])
    out["exif_rotated.jpg"] = folder / "exif_rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    draw("blue", "square", size=48).crop((0, 0, 48, 30)).save(out["exif_rotated.jpg"], exif=exif, quality=95)
    return out


def test_odd_images_are_preprocessed_like_training_and_answered(bundle, eager, tmp_path):
    import torch

    from tinyalign.images import load_image, preprocess

    model, _ = eager
    spec = bundle.manifest["image"]
    files = _odd_images(tmp_path)
    assert Image.open(files["grey16.png"]).mode.startswith("I")
    assert Image.open(files["cmyk.jpg"]).mode == "CMYK"
    for name, path in files.items():
        want = preprocess(load_image(path), spec["size"], spec["mean"], spec["std"])[None]
        got = bundle.engine.pixels(path)
        assert got.dtype == np.float32 and got.shape == (1, 3, 32, 32), name
        assert np.array_equal(got, want), name
        assert np.array_equal(bundle.engine.pixels(path.read_bytes()), want), name  # bytes work the same
        tokens, feats = bundle.program.run("vision_encoder", got)
        with torch.no_grad():
            f = model.image_features(torch.from_numpy(got))
        assert np.abs(feats - f.numpy()).max() < 1e-4, name
        a = bundle.ask(path, "what color is the circle?", max_new_tokens=6)
        assert a.stop_reason in ("eos", "max_new_tokens") and len(a.memories) == 2, name
    # the EXIF rotation was applied (a 48x30 landscape stored, portrait shown) and alpha went to white
    assert load_image(files["exif_rotated.jpg"]).size == (30, 48)
    assert load_image(files["rgba.png"]).getpixel((24, 2)) == (255, 255, 255)


def test_truncated_corrupt_and_bomb_images_give_clear_errors(bundle, tmp_path):
    from tinyalign.runtime import ImageError

    good = io.BytesIO()
    draw("green", "square", size=64).save(good, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 M pixels in a few kB: over the 40 M pixel guard
    assert bomb.stat().st_size < 100_000
    cases = {truncated: "truncated", junk: "not an image|corrupt", bomb: "decompression bomb",
             tmp_path / "missing.png": "not found"}
    for path, msg in cases.items():
        t0 = time.perf_counter()
        with pytest.raises(ImageError, match=msg):
            bundle.ask(path, "what shape is this?")
        assert time.perf_counter() - t0 < 10, path  # refused quickly, never decoded
    assert bundle.ask(good.getvalue(), "what shape is this?").prompt_tokens > 0  # still usable afterwards


# ---- prompts -------------------------------------------------------------------------------------
def test_too_long_prompt_is_refused_before_running_anything(bundle, inputs, monkeypatch):
    from tinyalign.runtime import PromptTooLongError

    calls = []
    monkeypatch.setattr(bundle.program, "run", lambda *a: calls.append(a[0]))
    question = "what color is the circle? " * 20
    with pytest.raises(PromptTooLongError, match="maximum sequence length is 64"):
        bundle.ask(inputs["images"] / "missing-on-purpose.png", question)
    assert calls == []
    monkeypatch.undo()
    assert bundle.engine.prefix_len(QUESTIONS[0]) < bundle.max_seq_len


def test_answer_stops_at_max_seq_len(bundle, inputs):
    engine = bundle.engine
    q = "what color is the circle? " * 3
    P = engine.prefix_len(q)
    assert P < bundle.max_seq_len
    a = bundle.ask(inputs["images"] / "red_circle_0.png", q, max_new_tokens=200, temperature=2.0, seed=0)
    assert len(a.token_ids) <= bundle.max_seq_len - P
    assert a.stop_reason in ("eos", "max_seq_len")


# ---- bundle verification -----------------------------------------------------------------------
def test_tampered_files_are_refused_naming_the_file(inputs, tmp_path):
    from tinyalign.runtime import Bundle, BundleError

    root = _copy(inputs, tmp_path)
    pte = root / "model.pte"
    data = bytearray(pte.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    pte.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.pte does not match its sha256"):
        Bundle.open(root)
    shutil.copyfile(inputs["bundle"] / "model.pte", pte)
    tok = root / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:-10])  # a truncated copy
    with pytest.raises(BundleError, match=r"tokenizer\.json has \d+ bytes"):
        Bundle.open(root)
    shutil.copyfile(inputs["bundle"] / "tokenizer.json", tok)
    vals = root / "bank" / "values_caption_ids.npy"
    raw = bytearray(vals.read_bytes())
    raw[-1] ^= 0x01
    vals.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"bank/values_caption_ids\.npy"):
        Bundle.open(root)
    shutil.copyfile(inputs["bundle"] / "bank" / "values_caption_ids.npy", vals)
    assert Bundle.open(root).ask(inputs["images"] / "red_circle_0.png", "what shape is this?").prompt_tokens > 0


def test_missing_files_are_refused_naming_the_file(inputs, tmp_path):
    from tinyalign.runtime import Bundle, BundleError

    root = _copy(inputs, tmp_path)
    (root / "bank" / "captions.json").unlink()
    with pytest.raises(BundleError, match=r"missing bank/captions\.json"):
        Bundle.open(root)
    (root / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        Bundle.open(root)
    with pytest.raises(BundleError, match="not found"):
        Bundle.open(tmp_path / "nowhere")


def test_newer_schema_and_foreign_bank_are_refused(inputs, tmp_path):
    from tinyalign.runtime import Bundle, BundleError

    root = _copy(inputs, tmp_path)
    mf = root / "manifest.json"
    m = json.loads(mf.read_text())
    mf.write_text(json.dumps({**m, "schema_version": 2}))
    with pytest.raises(BundleError, match="schema version 2"):
        Bundle.open(root)
    mf.write_text(json.dumps({**m, "bank": {**m["bank"], "fingerprint": "0" * 64}}))
    with pytest.raises(BundleError, match="fingerprint"):
        Bundle.open(root)
    mf.write_text(json.dumps({**m, "fingerprint": "1" * 64, "bank": {**m["bank"], "fingerprint": "1" * 64}}))
    with pytest.raises(BundleError, match="fingerprint"):  # the bank's own meta.json disagrees
        Bundle.open(root)
    if sys.platform != "darwin":
        mf.write_text(json.dumps({**m, "target": "ios", "backend": "coreml"}))
        with pytest.raises(BundleError, match="only on Apple devices"):
            Bundle.open(root)
    files = dict(m["files"])
    files.pop("model.pte")
    mf.write_text(json.dumps({**m, "files": files}))
    with pytest.raises(BundleError, match=r"model\.pte is not listed"):
        Bundle.open(root)


# ---- no network ----------------------------------------------------------------------------------
def test_runtime_opens_no_network_connection(inputs, monkeypatch):
    from tinyalign.runtime import Bundle

    def refuse(*a, **k):
        raise AssertionError("the runtime tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with Bundle.open(inputs["bundle"]) as b:
        a = b.ask(inputs["images"] / "green_circle_0.png", "what color is the circle?", stream=lambda p: None)
    assert a.memories and a.timings.total_s > 0


# ---- the command line --------------------------------------------------------------------------
def test_run_command_streams_text_and_prints_json(inputs, bundle):
    from click.testing import CliRunner

    from tinyalign.runtime.cli import run_command

    img = inputs["images"] / "red_circle_0.png"
    want = bundle.ask(img, QUESTIONS[0])
    runner = CliRunner()
    res = runner.invoke(run_command, ["--bundle", str(inputs["bundle"]), "--image", str(img), QUESTIONS[0]])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == want.text
    res = runner.invoke(run_command, ["--bundle", str(inputs["bundle"]), "--image", str(img), "--json",
                                      "--max-new-tokens", "5", QUESTIONS[0]])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["answer"] == bundle.ask(img, QUESTIONS[0], max_new_tokens=5).text
    assert [m["id"] for m in d["memories"]] == [m.id for m in want.memories]
    assert {"encode_s", "retrieve_s", "prefill_s", "decode_s", "total_s"} <= set(d["timings"])
    bad = inputs["root"] / "not-an-image.png"
    bad.write_bytes(b"nope")
    res = runner.invoke(run_command, ["--bundle", str(inputs["bundle"]), "--image", str(bad), "hi"])
    assert res.exit_code == 1 and "Error:" in res.output and "not an image" in res.output
    res = runner.invoke(run_command, ["--bundle", str(inputs["bundle"]), "--image", str(img), "long " * 100])
    assert res.exit_code == 1 and "maximum sequence length" in res.output
