"""Memory bank (tinyalign.bank): retrieval quality, persistence, safety checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyalign.bank import SCHEMA_VERSION, BankError, BankMetadata, MemoryBank

N = 3000
DIM = 128  # the tiny model's key dim
K = 10
NQ = 200
FP = "ab" * 32


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1234)
    keys = rng.standard_normal((N, DIM)).astype(np.float32)
    queries = rng.standard_normal((NQ, DIM)).astype(np.float32)
    sims = _unit(queries) @ _unit(keys).T
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :K]
    values = {
        "caption_ids": rng.integers(0, 30000, size=(N, 8)),
        "latent": rng.standard_normal((N, 4, 6)).astype(np.float32),
    }
    captions = [f"caption {i}" for i in range(N)]
    return {"keys": keys, "queries": queries, "sims": sims, "ref": ref, "values": values, "captions": captions}


def _build(data, n=N, lo=0, **meta_kw) -> MemoryBank:
    meta_kw.setdefault("fingerprint", FP)
    bank = MemoryBank(meta=BankMetadata(dim=DIM, **meta_kw))
    vals = {k: v[lo : lo + n] for k, v in data["values"].items()}
    bank.add(data["keys"][lo : lo + n], vals, data["captions"][lo : lo + n])
    return bank


def _recall(ids: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / ref.shape[1] for a, b in zip(ids, ref)]))


@pytest.fixture(scope="module")
def f16_bank(data):
    return _build(data)


# ------------------------------------------------------------------ retrieval quality


def test_f16_hnsw_recall_at_10_vs_exact_numpy_is_at_least_0_98(data, f16_bank):
    ids, _ = f16_bank.search(data["queries"], K)
    rec = _recall(ids, data["ref"])
    assert rec >= 0.98, f"f16 HNSW recall@10 = {rec:.4f}"


def test_i8_per_vector_scaled_recall_at_10_is_at_least_0_9(data):
    bank = _build(data, key_dtype="i8")
    ids, _ = bank.search(data["queries"], K)
    rec = _recall(ids, data["ref"])
    print(f"i8 (per-vector scaled) HNSW recall@10 = {rec:.4f}")
    assert rec >= 0.9, f"i8 scaled recall@10 = {rec:.4f}"


def test_i8_keys_use_the_full_int8_range_per_vector(data):
    bank = _build(data, n=50, key_dtype="i8")
    stored = bank.stored_keys()
    assert stored.dtype == np.int8
    assert np.all(np.abs(stored.astype(np.int16)).max(axis=1) == 127)


def test_f32_exact_search_equals_numpy_topk(data):
    bank = _build(data, key_dtype="f32", exact=True)
    ids, sims = bank.search(data["queries"], K)
    np.testing.assert_array_equal(ids, data["ref"])
    np.testing.assert_allclose(sims, np.take_along_axis(data["sims"], data["ref"], 1), atol=1e-5)


@pytest.mark.parametrize("key_dtype", ["f16", "i8", "f32"])
def test_returned_similarities_are_true_cosines_within_0_02_and_sorted(data, key_dtype):
    bank = _build(data, n=1000, key_dtype=key_dtype)
    ids, sims = bank.search(data["queries"][:50], K)
    true = np.take_along_axis(data["sims"][:50, :1000], ids, axis=1)
    assert ids.dtype == np.int64 and sims.dtype == np.float32 and ids.shape == sims.shape == (50, K)
    assert np.abs(true - sims).max() < 0.02
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def test_single_vector_query_returns_one_row(data, f16_bank):
    ids, sims = f16_bank.search(data["queries"][0], 3)
    ids2, sims2 = f16_bank.search(data["queries"][:1], 3)
    assert ids.shape == sims.shape == (1, 3)
    np.testing.assert_array_equal(ids, ids2)


def test_leave_one_out_never_returns_the_excluded_id(data, f16_bank):
    # query with the keys themselves: each one's own entry is its best match and must be dropped
    q = data["keys"][:300]
    own = np.arange(300)
    plain, _ = f16_bank.search(q, 4)
    assert np.mean(plain[:, 0] == own) > 0.99
    exclude = own.copy()
    exclude[::2] = -1  # -1 = exclude nothing for that query
    ids, sims = f16_bank.search(q, 4, exclude=exclude)
    assert ids.shape == (300, 4)
    assert not np.any(ids[1::2] == own[1::2, None])
    np.testing.assert_array_equal(ids[::2], plain[::2])
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def test_fewer_entries_than_k_raises(data):
    bank = _build(data, n=5)
    with pytest.raises(BankError, match="5 entries"):
        bank.search(data["queries"][:1], 6)
    with pytest.raises(BankError, match="excluded"):
        bank.search(data["queries"][:1], 5, exclude=np.array([0]))


def test_query_dim_mismatch_raises_naming_both_dims(f16_bank):
    with pytest.raises(BankError, match=r"dim 128.*dim 64"):
        f16_bank.search(np.ones((2, 64), np.float32), 3)


def test_key_dim_mismatch_on_add_raises(data):
    bank = MemoryBank(meta=BankMetadata(dim=DIM))
    with pytest.raises(BankError, match="128"):
        bank.add(np.ones((3, 64), np.float32), {}, ["a", "b", "c"])


# ------------------------------------------------------------------ values


def test_values_are_stored_compactly(f16_bank):
    vals = f16_bank.values(np.array([0]))
    assert vals["caption_ids"].dtype == np.int16  # token ids < 32768
    assert vals["latent"].dtype == np.float16
    bank = MemoryBank(meta=BankMetadata(dim=4))
    bank.add(np.eye(4, dtype=np.float32), {"small": np.arange(4), "big": np.arange(4) * 100_000}, list("abcd"))
    v = bank.values(np.arange(4))
    assert v["small"].dtype == np.int8 and v["big"].dtype == np.int32


def test_values_and_captions_gather_for_ids_of_any_shape(data, f16_bank):
    ids = np.array([[3, 1, 4], [1, 5, 9]])
    vals = f16_bank.values(ids)
    assert vals["latent"].shape == (2, 3, 4, 6)
    assert vals["caption_ids"].shape == (2, 3, 8)
    np.testing.assert_array_equal(vals["caption_ids"][1, 2], data["values"]["caption_ids"][9])
    assert f16_bank.captions_of(ids) == [[f"caption {i}" for i in row] for row in ids.tolist()]
    assert f16_bank.captions_of(7) == "caption 7"
    with pytest.raises(BankError):
        f16_bank.values(np.array([N]))


def test_len_contains_and_repr(f16_bank):
    assert len(f16_bank) == N
    assert 0 in f16_bank and N - 1 in f16_bank and N not in f16_bank and -1 not in f16_bank
    r = repr(f16_bank)
    assert "\n" not in r and f"count={N}" in r


# ------------------------------------------------------------------ persistence


@pytest.mark.parametrize("key_dtype,exact", [("f16", False), ("i8", False), ("f32", True)])
def test_save_then_open_memory_mapped_gives_identical_results_and_values(data, tmp_path, key_dtype, exact):
    bank = _build(data, n=1500, key_dtype=key_dtype, exact=exact)
    ids, sims = bank.search(data["queries"], K)
    bank.save(tmp_path / "bank")
    opened = MemoryBank.open(tmp_path / "bank")
    assert isinstance(opened._values["latent"], np.memmap)
    ids2, sims2 = opened.search(data["queries"], K)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(sims, sims2)
    for name, arr in bank.values(ids).items():
        np.testing.assert_array_equal(arr, opened.values(ids)[name])
    assert opened.captions_of(ids[:3]) == bank.captions_of(ids[:3])
    assert opened.meta == bank.meta


def test_saved_bank_folder_holds_only_the_documented_files(f16_bank, tmp_path):
    path = f16_bank.save(tmp_path / "bank")
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["index.usearch", "meta.json", "captions.json", "values_caption_ids.npy", "values_latent.npy"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION and meta["count"] == N and meta["fingerprint"] == FP


def test_memory_mapped_bank_refuses_add_but_loaded_bank_grows(data, tmp_path):
    bank = _build(data, n=100)
    bank.save(tmp_path / "b")
    viewed = MemoryBank.open(tmp_path / "b")
    with pytest.raises(BankError, match="view=False"):
        viewed.add(data["keys"][100:110], {k: v[100:110] for k, v in data["values"].items()}, ["x"] * 10)
    loaded = MemoryBank.open(tmp_path / "b", view=False)
    loaded.add(data["keys"][100:110], {k: v[100:110] for k, v in data["values"].items()}, ["x"] * 10)
    assert len(loaded) == 110 and loaded.captions_of(109) == "x"


def test_save_onto_existing_path_without_overwrite_refuses_and_keeps_old_bank(data, tmp_path):
    old = _build(data, n=100)
    old.save(tmp_path / "bank")
    before = {p.name: p.read_bytes() for p in (tmp_path / "bank").iterdir()}
    new = _build(data, n=200, lo=100)
    with pytest.raises(BankError, match="overwrite=True"):
        new.save(tmp_path / "bank")
    after = {p.name: p.read_bytes() for p in (tmp_path / "bank").iterdir()}
    assert before == after
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]
    assert len(MemoryBank.open(tmp_path / "bank")) == 100


def test_save_with_overwrite_replaces_the_bank_and_leaves_no_temporary_folders(data, tmp_path):
    _build(data, n=100).save(tmp_path / "bank")
    _build(data, n=200, lo=100).save(tmp_path / "bank", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]
    reopened = MemoryBank.open(tmp_path / "bank")
    assert len(reopened) == 200 and reopened.captions_of(0) == "caption 100"


def test_save_overwrite_refuses_to_replace_a_folder_that_is_not_a_bank(f16_bank, tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("keep me")
    with pytest.raises(BankError, match="not a memory bank"):
        f16_bank.save(tmp_path / "stuff", overwrite=True)
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "keep me"


def test_failed_save_leaves_nothing_half_written(data, tmp_path, monkeypatch):
    bank = _build(data, n=100)

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr("tinyalign.bank.np.save", boom)
    with pytest.raises(OSError, match="disk full"):
        bank.save(tmp_path / "bank")
    assert list(tmp_path.iterdir()) == []


def test_truncated_index_file_raises_bank_error_saying_damaged(f16_bank, tmp_path):
    path = f16_bank.save(tmp_path / "bank")
    idx = path / "index.usearch"
    with open(idx, "r+b") as f:
        f.truncate(idx.stat().st_size // 2)
    with pytest.raises(BankError, match="damaged.*rebuild"):
        MemoryBank.open(path)


def test_corrupt_index_file_of_the_right_size_raises_bank_error(f16_bank, tmp_path):
    path = f16_bank.save(tmp_path / "bank")
    idx = path / "index.usearch"
    size = idx.stat().st_size
    idx.write_bytes(b"\0" * size)  # size check passes, usearch header does not
    with pytest.raises(BankError, match="damaged.*rebuild"):
        MemoryBank.open(path)


def test_sha256_verification_catches_flipped_bytes(data, tmp_path):
    path = _build(data, n=100).save(tmp_path / "bank")
    vals = path / "values_latent.npy"
    raw = bytearray(vals.read_bytes())
    raw[-1] ^= 0xFF
    vals.write_bytes(bytes(raw))
    MemoryBank.open(path)  # the default open checks sizes only
    with pytest.raises(BankError, match="sha256"):
        MemoryBank.open(path, verify=True)


@pytest.mark.parametrize("missing", ["meta.json", "index.usearch", "captions.json", "values_latent.npy"])
def test_missing_file_raises_bank_error_naming_it(data, tmp_path, missing):
    path = _build(data, n=50).save(tmp_path / "bank")
    (path / missing).unlink()
    with pytest.raises(BankError, match=missing.replace(".", r"\.")):
        MemoryBank.open(path)


def test_newer_schema_version_raises(data, tmp_path):
    path = _build(data, n=50).save(tmp_path / "bank")
    meta = json.loads((path / "meta.json").read_text())
    meta["schema_version"] = SCHEMA_VERSION + 1
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BankError, match="newer"):
        MemoryBank.open(path)


def test_fingerprint_mismatch_raises_naming_both(f16_bank):
    f16_bank.check_fingerprint(FP)
    other = "cd" * 32
    with pytest.raises(BankError) as e:
        f16_bank.check_fingerprint(other)
    assert FP in str(e.value) and other in str(e.value)


def test_bytes_per_entry_measures_keys_and_each_value(f16_bank, tmp_path):
    mem = f16_bank.bytes_per_entry()
    assert mem["caption_ids"] == 16 and mem["latent"] == 4 * 6 * 2
    assert mem["keys"] > DIM * 2  # f16 vector plus the HNSW graph
    path = f16_bank.save(tmp_path / "bank")
    disk = MemoryBank.open(path).bytes_per_entry()
    assert disk["keys"] == pytest.approx((path / "index.usearch").stat().st_size / N)
    assert disk["keys"] == pytest.approx(mem["keys"])


# ------------------------------------------------------------------ shards


@pytest.mark.parametrize("key_dtype", ["f16", "i8"])
def test_merge_of_two_shards_equals_a_bank_built_at_once(data, key_dtype):
    whole = _build(data, n=2000, key_dtype=key_dtype, source="s")
    a = _build(data, n=1200, key_dtype=key_dtype, source="s")
    b = _build(data, n=800, lo=1200, key_dtype=key_dtype, source="s")
    merged = MemoryBank.merge([a, b])
    assert len(merged) == 2000
    ids_w, sims_w = whole.search(data["queries"], K)
    ids_m, sims_m = merged.search(data["queries"], K)
    np.testing.assert_array_equal(ids_w, ids_m)
    np.testing.assert_array_equal(sims_w, sims_m)
    for name, arr in whole.values(ids_w).items():
        np.testing.assert_array_equal(arr, merged.values(ids_m)[name])
    assert merged.captions_of(ids_m[:5]) == whole.captions_of(ids_w[:5])


@pytest.mark.parametrize(
    "change", [{"fingerprint": "cd" * 32}, {"key_dtype": "i8"}, {"value_kind": "latent"}]
)
def test_merge_refuses_banks_that_differ_in_keys_or_values(data, change):
    a = _build(data, n=20)
    b = _build(data, n=20, lo=20, **change)
    with pytest.raises(BankError, match=next(iter(change))):
        MemoryBank.merge([a, b])


def test_merge_refuses_differing_dim(data):
    a = _build(data, n=20)
    b = MemoryBank(meta=BankMetadata(dim=64, fingerprint=FP))
    with pytest.raises(BankError, match="dim"):
        MemoryBank.merge([a, b])


# ------------------------------------------------------------------ runtime constraint


def test_bank_module_imports_without_torch():
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "import tinyalign.bank as b\n"
        "bank = b.MemoryBank(meta=b.BankMetadata(dim=4))\n"
        "bank.add(np.eye(4, dtype=np.float32), {}, list('abcd'))\n"
        "assert bank.search(np.eye(4, dtype=np.float32), 1)[0][:, 0].tolist() == [0, 1, 2, 3]\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert r.returncode == 0, r.stderr
