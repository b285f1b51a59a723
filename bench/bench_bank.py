#!/usr/bin/env python
"""Benchmark the memory bank (tinyalign.bank): bytes per entry, build time, single-query
latency, recall@10 against exact numpy search, and the speed-up over numpy exact search.

Key dim 128 by default: the tiny model's key dim (``--dim 128 576`` adds the SmolLM2-135M
hidden size).  Two synthetic data sets of unit vectors, measured side by side in one run:

* ``uniform``: keys and queries are independent random unit vectors.  No structure at all:
  the hardest case for a graph (HNSW) index and the one the brief asks for.  All key dtypes.
* ``clustered``: keys = one of N/100 random centres plus noise (cosine ~0.8 to the centre);
  queries = fresh points around a random centre (a new image of a known kind).  Closer to
  real learned keys.  f16 keys only; this bank also carries the two value kinds, whose
  bytes per entry are measured from its saved files.

Single-query timing runs numpy and usearch on one thread each (BLAS threads are pinned to 1
before numpy is imported) so the ratio compares like with like.  Prints markdown, the exact
command first.  Example:

    python bench/bench_bank.py --sizes 10000 100000 --dim 128 --queries 500 --out docs/bank_bench.md
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy: single-query numpy exact search on one thread

import argparse  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyalign.bank import DEFAULT_EXPANSION_SEARCH, BankMetadata, MemoryBank  # noqa: E402

K = 10
PAPER_H = 2560
PAPER_VALUE = (32, 96)
PAPER_ENTRIES = 558_000
RAW_BYTES = {"f16": 2, "i8": 1, "f32": 4}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(kind: str, n: int, dim: int, nq: int, rng: np.random.Generator):
    if kind == "uniform":
        return unit(rng.standard_normal((n, dim), dtype=np.float32)), unit(
            rng.standard_normal((nq, dim), dtype=np.float32)
        )
    centres = unit(rng.standard_normal((max(1, n // 100), dim), dtype=np.float32))

    def around(m):
        lab = rng.integers(0, len(centres), size=m)
        return unit(centres[lab] + 0.75 * unit(rng.standard_normal((m, dim), dtype=np.float32)))

    return around(n), around(nq)


def numpy_exact(keys: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k by cosine for one query (keys are unit rows, float32 in memory)."""
    s = keys @ (q / np.linalg.norm(q))
    top = np.argpartition(-s, k)[:k]
    return top[np.argsort(-s[top], kind="stable")]


def time_single(fn, queries: np.ndarray, warmup: int = 20):
    for q in queries[:warmup]:
        fn(q)
    out, lat = [], np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter_ns()
        r = fn(q)
        lat[i] = (time.perf_counter_ns() - t0) / 1e3  # microseconds
        out.append(r)
    return np.stack(out), lat


def recall(ids: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / ref.shape[1] for a, b in zip(ids, ref)]))


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="bank sizes (entries)")
    ap.add_argument("--dim", type=int, nargs="+", default=[128], help="key dims (128 = tiny model; try 576)")
    ap.add_argument("--queries", type=int, default=500, help="single queries timed per setting (>= 200)")
    ap.add_argument("--dtypes", nargs="+", default=["f16", "i8", "f32"], choices=["f16", "i8", "f32"])
    ap.add_argument("--ef", type=int, nargs="+", default=[64, DEFAULT_EXPANSION_SEARCH],
                    help=f"HNSW expansion_search values to time (the bank's default is {DEFAULT_EXPANSION_SEARCH})")
    ap.add_argument("--threads", type=int, default=1, help="usearch build threads (1 = deterministic, the default)")
    ap.add_argument("--no-clustered", action="store_true", help="skip the clustered data set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    if args.queries < 200:
        ap.error("--queries must be at least 200 (p50/p99 over single queries)")

    lines: list[str] = []

    def emit(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    emit("## Memory bank (`tinyalign.bank`)")
    emit()
    emit("Command (repository root, venv active):")
    emit()
    emit(f"    {cmd}")
    emit()
    import usearch

    emit(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible (shared with other jobs while this ran), "
        f"Python {platform.python_version()}, numpy {np.__version__}, usearch {usearch.__version__}. "
        f"Key dim {', '.join(map(str, args.dim))} (128 = the tiny model's key dim). k = {K}; "
        f"{args.queries} single queries per setting after 20 warm-up; banks built with threads={args.threads}, "
        f"searched memory-mapped (`MemoryBank.open`)."
    )
    emit()
    rng = np.random.default_rng(args.seed)
    t_start = time.time()

    size_rows, speed_rows = [], []
    value_bytes: dict[tuple[int, int], dict[str, float]] = {}  # (dim, entries) -> B/entry per value
    kinds = ["uniform"] + ([] if args.no_clustered else ["clustered"])
    with tempfile.TemporaryDirectory(prefix="bench_bank_") as tmp:
        for dim in args.dim:
            for n in args.sizes:
                for kind in kinds:
                    keys, queries = make_data(kind, n, dim, args.queries, rng)
                    ref, lat_np = time_single(lambda q: numpy_exact(keys, q, K), queries)
                    np_p50 = float(np.median(lat_np))
                    speed_rows.append((kind, dim, n, "f32 (numpy array)", "numpy exact", "–", np_p50,
                                       float(np.percentile(lat_np, 99)), 1.0, 1.0))
                    dtypes = args.dtypes if kind == "uniform" else ["f16"]
                    for dt in dtypes:
                        bank = MemoryBank(meta=BankMetadata(dim=dim, key_dtype=dt))
                        values, note = {}, ""
                        if kind == "clustered":  # this bank carries both value kinds
                            latent = np.empty((n, 32, 96), np.float16)
                            for s in range(0, n, 10_000):
                                e = min(n, s + 10_000)
                                latent[s:e] = rng.standard_normal((e - s, 32, 96), dtype=np.float32)
                            values = {"caption_ids": rng.integers(0, 30_000, size=(n, 8)), "latent": latent}
                            note = " (incl. values)"
                        t0 = time.perf_counter()
                        bank.add(keys, values, None, threads=args.threads)
                        build_s = time.perf_counter() - t0
                        del values
                        path = bank.save(Path(tmp) / f"{kind}_{dim}_{n}_{dt}")
                        del bank
                        bank = MemoryBank.open(path)  # memory-mapped, as on a device
                        bpe = bank.bytes_per_entry()
                        if kind == "clustered":
                            value_bytes[(dim, n)] = {"caption_ids": bpe["caption_ids"], "latent": bpe["latent"]}
                        size_rows.append((dim, n, dt, kind, bpe["keys"]))
                        modes = [(False, ef) for ef in args.ef] + [(True, None)]
                        for exact, ef in modes:
                            bank.meta.exact = exact  # same index: HNSW or usearch brute force
                            if ef is not None:
                                bank.expansion_search = ef
                            ids, lat = time_single(lambda q: bank.search(q, K)[0][0], queries)  # noqa: B023
                            p50 = float(np.median(lat))
                            speed_rows.append((
                                kind, dim, n, dt, "usearch exact" if exact else f"HNSW ef={ef}",
                                f"{build_s:.1f}{note}" if (exact, ef) == modes[0] else "same index",
                                p50, float(np.percentile(lat, 99)), recall(ids, ref), np_p50 / p50,
                            ))
                        del bank
                        if kind == "clustered":
                            shutil.rmtree(path)  # large (latent values); keep /tmp small

    emit("### Bytes per entry (measured from saved files)")
    emit()
    emit("Keys = `index.usearch` size / entries: the key vector plus the HNSW graph (connectivity 16) "
         "and usearch's per-entry key/level. Values = `values_<name>.npy` size / entries "
         f"({'measured on the clustered bank of the same size' if value_bytes else 'not measured'}; "
         "npy header included): caption ids = 8 tokens "
         "int16 (16 B), latent = 32×96 f16 (6,144 B). Captions (`captions.json`, UTF-8, a few bytes per "
         "short caption) not included.")
    emit()
    emit("| dim | entries | keys | raw key vector B | keys B/entry (index file) | keys + caption ids B/entry "
         "| keys + latent B/entry | bank with latent, MB |")
    emit("|---|---|---|---|---|---|---|---|")
    for dim, n, dt, kind, kb in size_rows:
        if kind != "uniform":
            continue
        vb = value_bytes.get((dim, n))
        cap = f"{kb + vb['caption_ids']:.1f}" if vb else "–"
        lat = f"{kb + vb['latent']:.1f}" if vb else "–"
        mb = f"{(kb + vb['latent']) * n / 1e6:.1f}" if vb else "–"
        emit(f"| {dim} | {n:,} | {dt} | {dim * RAW_BYTES[dt]} | {kb:.1f} | {cap} | {lat} | {mb} |")
    paper = PAPER_H * 4 + PAPER_VALUE[0] * PAPER_VALUE[1] * 4
    emit(f"| {PAPER_H} | {PAPER_ENTRIES:,} | paper's fp32 layout (reference, computed: flat index, no graph) "
         f"| {PAPER_H * 4:,} | {PAPER_H * 4:,} | – | {paper:,} | {paper * PAPER_ENTRIES / 1e6:,.0f} |")
    emit()
    emit("### Build time, single-query latency, recall@10")
    emit()
    emit("Latency = one `MemoryBank.search(q, 10)` call (query checks and normalisation included). "
         "Recall@10 against exact numpy top-10 on the float32 keys. Speed-up = numpy exact p50 / this p50 "
         "(same data set and size). Build = `MemoryBank.add` of all keys, one thread.")
    emit()
    emit("| data | dim | entries | keys | search | build s | p50 µs | p99 µs | recall@10 | speed-up vs numpy exact |")
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for kind, dim, n, dt, mode, build, p50, p99, rec, sp in speed_rows:
        emit(f"| {kind} | {dim} | {n:,} | {dt} | {mode} | {build} | {p50:.0f} | {p99:.0f} | {rec:.3f} | {sp:.1f}× |")
    emit()
    emit(f"Total benchmark time: {time.time() - t_start:.0f} s.")
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    main()
