"""Memory bank: a usearch index of retrieval keys plus compact per-entry values.

One bank entry is one training (image, caption) pair (see shared/DESIGN.md, sections 1-2):

* **key**: one vector per entry (L2-normalised; similarity is cosine), stored in a usearch
  index as ``f16`` (default), ``f32``, or ``i8``.  ``i8`` keys are quantised here with a
  per-vector scale (``127 / max|x|``) before they reach usearch, because usearch's own
  float->int8 cast (``round(127 * x)``) wastes most of the int8 range on unit vectors and
  loses recall.  Cosine is scale-invariant, so the per-vector scales need not be stored.
* **values**: named arrays with one row per entry (caption token ids, latents, ...);
  floats are stored as float16, integers as the smallest integer dtype that holds them.
* **captions**: one string per entry, for display and evaluation.

On disk a bank is a folder::

    meta.json            metadata, value layout, index settings, file sizes and sha256
    index.usearch        the usearch index (entry id = usearch key = insertion order)
    values_<name>.npy    one array per value (np.save, no pickles)
    captions.json        list of strings

:meth:`MemoryBank.open` memory-maps the index and the value arrays by default.
This module must stay importable without torch: it is used by the on-device runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from usearch.index import Index

__all__ = ["SCHEMA_VERSION", "BankError", "BankMetadata", "MemoryBank"]

SCHEMA_VERSION = 1

INDEX_FILE = "index.usearch"
META_FILE = "meta.json"
CAPTIONS_FILE = "captions.json"
VALUE_PREFIX = "values_"

KEY_DTYPES = ("f16", "i8", "f32")
_USEARCH_SCALAR = {"f16": "F16", "f32": "F32", "i8": "I8"}
_NUMPY_KEY_DTYPE = {"f16": np.float16, "f32": np.float32, "i8": np.int8}

# HNSW settings.  Defaults picked on random unit vectors (the hardest case for a graph index):
# connectivity 16 keeps the graph at ~150 B/entry; expansion_search 256 gives recall@10 ~0.99
# at a few thousand entries (usearch's default of 64 gives ~0.85 there).
DEFAULT_CONNECTIVITY = 16
DEFAULT_EXPANSION_ADD = 128
DEFAULT_EXPANSION_SEARCH = 256

_RESERVED_VALUE_NAMES = {"keys", "captions", "total", "index", "meta"}
_VALUE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_INT_CANDIDATES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64)
_F16_MAX = float(np.finfo(np.float16).max)


class BankError(ValueError):
    """A memory bank cannot be built, opened or used as asked; the message says what to do."""


@dataclass
class BankMetadata:
    """What a bank is and how its keys were made (stored in ``meta.json``)."""

    dim: int
    key_dtype: str = "f16"  # "f16" | "i8" | "f32"
    exact: bool = False  # exact (brute-force) search instead of HNSW
    alpha: float = 0.4
    k: int = 4
    recipe: str = "learned"
    value_kind: str = "caption"
    source: str = ""  # e.g. "easy-vqa:train"
    fingerprint: str = ""  # sha256 hex of the model parts that made the keys
    count: int = 0
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim <= 0:
            raise BankError(f"BankMetadata.dim must be a positive integer, got {self.dim!r}")
        if self.key_dtype not in KEY_DTYPES:
            raise BankError(
                f"BankMetadata.key_dtype must be one of {', '.join(KEY_DTYPES)}, got {self.key_dtype!r}"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k <= 0:
            raise BankError(f"BankMetadata.k must be a positive integer, got {self.k!r}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise BankError(f"BankMetadata.alpha must lie in [0, 1], got {self.alpha!r}")
        if self.schema_version > SCHEMA_VERSION:
            raise BankError(
                f"bank schema version {self.schema_version} is newer than this tinyalign supports "
                f"({SCHEMA_VERSION}); upgrade tinyalign or rebuild the bank"
            )
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError) as e:
            raise BankError(f"BankMetadata.extra must be JSON-serialisable: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dim"] = int(d["dim"])
        d["k"] = int(d["k"])
        d["alpha"] = float(d["alpha"])
        d["count"] = int(d["count"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BankMetadata":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------
# helpers


def _normalise(x: np.ndarray, what: str) -> np.ndarray:
    """float32 rows scaled to unit L2 norm; refuses non-finite and zero rows."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise BankError(f"{what} contain NaN or inf; check the model that produced them")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if x.shape[0] and float(norms.min()) == 0.0:
        bad = int(np.argmin(norms[:, 0]))
        raise BankError(f"{what} row {bad} is all zeros; a zero vector has no cosine similarity")
    return x / norms


def quantize_i8(unit: np.ndarray) -> np.ndarray:
    """Per-vector scaled int8: each row times 127 / max|row|, rounded (cosine is unchanged)."""
    scale = 127.0 / np.abs(unit).max(axis=1, keepdims=True)
    return np.clip(np.rint(unit * scale), -127, 127).astype(np.int8)


def _smallest_int_dtype(lo: int, hi: int) -> np.dtype:
    for dt in _INT_CANDIDATES:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise BankError(f"integer values span [{lo}, {hi}], which int64 cannot hold")


def _compact(name: str, arr: np.ndarray) -> np.ndarray:
    """float -> float16; int -> smallest integer dtype holding the values; bool kept."""
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise BankError(f"value {name!r} contains NaN or inf")
        if arr.size and float(np.abs(arr).max()) > _F16_MAX:
            raise BankError(
                f"value {name!r} has magnitude up to {float(np.abs(arr).max()):.4g}, beyond float16's "
                f"{_F16_MAX:.0f}; scale it down before adding it to the bank"
            )
        return arr.astype(np.float16)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size == 0:
            return arr.astype(np.int8)
        return arr.astype(_smallest_int_dtype(int(arr.min()), int(arr.max())))
    raise BankError(
        f"value {name!r} has dtype {arr.dtype}; only float, integer and bool arrays can be stored"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _damaged(path: Path, what: str) -> BankError:
    return BankError(
        f"memory bank file {path} is damaged ({what}); rebuild the bank (or copy it again)"
    )


def _as_ids(ids, count: int, what: str = "entry ids") -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype == np.bool_ or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise BankError(f"{what} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= count):
        raise BankError(
            f"{what} must lie in [0, {count}) for this bank of {count} entries; "
            f"got values in [{int(arr.min())}, {int(arr.max())}]"
        )
    return arr


# --------------------------------------------------------------------------------------------


class MemoryBank:
    """Keys in a usearch index, values in compact numpy arrays, captions as strings.

    Entry ids are ``0 .. count-1`` in insertion order.
    """

    def __init__(
        self,
        *,
        meta: BankMetadata,
        connectivity: int = DEFAULT_CONNECTIVITY,
        expansion_add: int = DEFAULT_EXPANSION_ADD,
        expansion_search: int = DEFAULT_EXPANSION_SEARCH,
    ):
        meta = replace(meta, extra=dict(meta.extra))
        meta.validate()
        if meta.count != 0:
            raise BankError(
                "a new MemoryBank starts empty: leave BankMetadata.count at 0 (add() counts entries); "
                "use MemoryBank.open() to load a saved bank"
            )
        self.meta = meta
        self._index = Index(
            ndim=int(meta.dim),
            metric="cos",
            dtype=meta.key_dtype,
            connectivity=int(connectivity),
            expansion_add=int(expansion_add),
            expansion_search=int(expansion_search),
        )
        self._values: dict[str, np.ndarray] = {}
        self._pending: dict[str, list[np.ndarray]] = {}
        self._value_order: list[str] = []
        self._captions: list[str] = []
        self._path: Path | None = None  # folder this bank was opened from / last saved to
        self._opened_from: Path | None = None  # folder whose files back this bank (open())
        self._read_only = False

    # ---------------------------------------------------------------- basic protocol

    def __len__(self) -> int:
        return int(self.meta.count)

    def __contains__(self, entry_id) -> bool:
        if isinstance(entry_id, (bool, np.bool_)) or not isinstance(entry_id, (int, np.integer)):
            return False
        return 0 <= int(entry_id) < len(self)

    def __repr__(self) -> str:
        m = self.meta
        vals = ", ".join(f"{n}:{a.dtype}{list(a.shape[1:])}" for n, a in self._value_arrays().items())
        fp = (m.fingerprint[:12] + "…") if m.fingerprint else "none"
        where = f", path={str(self._path)!r}" if self._path is not None else ""
        return (
            f"MemoryBank(count={m.count}, dim={m.dim}, keys={m.key_dtype}, "
            f"search={'exact' if m.exact else 'hnsw'}, value_kind={m.value_kind!r}, values=[{vals}], "
            f"source={m.source!r}, fingerprint={fp}{where})"
        )

    @property
    def expansion_search(self) -> int:
        return int(self._index.expansion_search)

    @expansion_search.setter
    def expansion_search(self, v: int) -> None:
        self._index.expansion_search = int(v)

    @property
    def value_names(self) -> list[str]:
        return list(self._value_arrays())

    @property
    def path(self) -> Path | None:
        """The folder this bank was opened from or last saved to (None after changes)."""
        return self._path

    # ---------------------------------------------------------------- building

    def add(
        self,
        keys: np.ndarray,
        values: dict[str, np.ndarray],
        captions: list[str] | None,
        batch_size: int = 4096,
        progress: bool = False,
        *,
        threads: int = 1,
    ) -> None:
        """Append ``N`` entries.

        keys: float ``[N, dim]`` (L2-normalised here).  values: arrays with leading dim ``N``;
        the first add fixes the value names.  captions: ``N`` strings (None -> empty strings).
        threads: usearch workers.  1 (default) makes the index deterministic: the same
        entries in the same order give the same graph and the same search results
        (merged shards equal a bank built at once); 0 uses all cores (faster, not reproducible).
        """
        if self._read_only:
            raise BankError(
                "this bank was opened memory-mapped (read-only); open it with "
                "MemoryBank.open(path, view=False) to add entries"
            )
        keys = np.asarray(keys)
        if keys.ndim != 2 or keys.shape[1] != self.meta.dim:
            raise BankError(
                f"keys must have shape [N, {self.meta.dim}] (the bank's dim is {self.meta.dim}); "
                f"got shape {list(keys.shape)}"
            )
        if not (np.issubdtype(keys.dtype, np.floating) or np.issubdtype(keys.dtype, np.integer)):
            raise BankError(f"keys must be a float array, got dtype {keys.dtype}")
        stored = self._to_stored(_normalise(keys, "keys"))
        self._add_stored(stored, values, captions, batch_size=batch_size, progress=progress, threads=threads)

    def _to_stored(self, unit: np.ndarray) -> np.ndarray:
        if self.meta.key_dtype == "i8":
            return quantize_i8(unit)
        return unit.astype(_NUMPY_KEY_DTYPE[self.meta.key_dtype])

    def _add_stored(
        self,
        stored: np.ndarray,
        values: dict[str, np.ndarray],
        captions: list[str] | None,
        *,
        batch_size: int,
        progress: bool,
        threads: int,
    ) -> None:
        n = int(stored.shape[0])
        if batch_size <= 0:
            raise BankError(f"batch_size must be positive, got {batch_size}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise BankError("values must be a dict of name -> array with one row per entry")
        compact = self._check_values(values, n)
        if captions is None:
            captions = [""] * n
        captions = list(captions)
        if len(captions) != n:
            raise BankError(f"got {len(captions)} captions for {n} keys; pass one caption per entry")
        if not all(isinstance(c, str) for c in captions):
            raise BankError("captions must be strings")
        if n == 0:
            return

        start = len(self)
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=n, desc="bank add", unit="entry")
            except ImportError:  # tqdm is optional
                bar = None
        try:
            for s in range(0, n, batch_size):
                e = min(n, s + batch_size)
                ids = np.arange(start + s, start + e, dtype=np.uint64)
                self._index.add(ids, np.ascontiguousarray(stored[s:e]), threads=int(threads))
                if bar is not None:
                    bar.update(e - s)
        except Exception:
            # keep the bank consistent: drop what this call added to the index
            for i in range(start, start + n):
                if self._index.contains(i):
                    self._index.remove(i)
            raise
        finally:
            if bar is not None:
                bar.close()

        first = not self._values and not self._pending and start == 0
        for name, arr in compact.items():
            self._pending.setdefault(name, []).append(arr)
        if first:
            self._value_order = list(compact)
        self._captions.extend(captions)
        self.meta.count = start + n
        self._path = None
        self._opened_from = None

    def _check_values(self, values: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        existing = self._value_arrays_spec()
        if len(self) > 0 and set(values) != set(existing):
            raise BankError(
                f"values must have the same names as the bank's: {sorted(existing)}; got {sorted(values)}"
            )
        out = {}
        for name, arr in values.items():
            if not isinstance(name, str) or not _VALUE_NAME_RE.match(name) or name in _RESERVED_VALUE_NAMES:
                raise BankError(
                    f"value name {name!r} is not allowed: use letters, digits, '_', '-', '.', "
                    f"and none of {sorted(_RESERVED_VALUE_NAMES)}"
                )
            arr = np.asarray(arr)
            if arr.ndim == 0 or arr.shape[0] != n:
                raise BankError(
                    f"value {name!r} must have leading dimension {n} (one row per key); "
                    f"got shape {list(arr.shape)}"
                )
            if name in existing and tuple(arr.shape[1:]) != existing[name][1]:
                raise BankError(
                    f"value {name!r} has per-entry shape {list(arr.shape[1:])} but the bank stores "
                    f"{list(existing[name][1])}"
                )
            out[name] = _compact(name, arr)
        return out

    def _value_arrays_spec(self) -> dict[str, tuple[np.dtype, tuple]]:
        spec = {n: (a.dtype, tuple(a.shape[1:])) for n, a in self._values.items()}
        for n, chunks in self._pending.items():
            if n not in spec:
                spec[n] = (chunks[0].dtype, tuple(chunks[0].shape[1:]))
        return spec

    def _value_arrays(self) -> dict[str, np.ndarray]:
        """Consolidate appended chunks (promoting integer dtypes as needed)."""
        if self._pending:
            for name, chunks in self._pending.items():
                parts = ([self._values[name]] if name in self._values else []) + chunks
                dt = np.result_type(*[p.dtype for p in parts])
                if np.issubdtype(dt, np.floating):
                    dt = np.dtype(np.float16)
                merged = np.concatenate([np.asarray(p).astype(dt, copy=False) for p in parts], axis=0)
                if np.issubdtype(dt, np.integer):
                    merged = _compact(name, merged)
                self._values[name] = merged
            self._pending = {}
        return {n: self._values[n] for n in self._value_order if n in self._values}

    # ---------------------------------------------------------------- querying

    def search(
        self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k entries by cosine similarity.

        queries: ``[Q, dim]`` or ``[dim]`` (treated as ``Q = 1``).  Returns ids int64 ``[Q, k]``
        and cosine similarities float32 ``[Q, k]``, best first.  exclude: int ``[Q]``, one entry id
        per query never to return (leave-one-out); -1 means none.
        """
        dim = int(self.meta.dim)
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != dim:
            got = q.shape[-1] if q.ndim >= 1 else "scalar"
            raise BankError(
                f"query dim mismatch: the bank's keys have dim {dim} but the query has dim {got} "
                f"(shape {list(np.shape(queries))}); query with the model that built the bank"
            )
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise BankError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        nq = q.shape[0]
        if exclude is None:
            excl = np.full(nq, -1, dtype=np.int64)
        else:
            excl = np.asarray(exclude).astype(np.int64).reshape(-1)
            if excl.shape[0] != nq:
                raise BankError(
                    f"exclude must hold one entry id per query ({nq}), got {excl.shape[0]}"
                )
        use_excl = bool(np.any(excl >= 0))
        need = k + 1 if use_excl else k
        if len(self) < need:
            extra = " plus one excluded entry" if use_excl else ""
            raise BankError(
                f"the bank holds {len(self)} entries, fewer than the {k}{extra} asked for; "
                f"lower k or build a bigger bank"
            )
        if nq == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        stored = self._to_stored(_normalise(q, "queries"))

        ids, sims, counts = self._raw_search(stored, need, exact=bool(self.meta.exact))
        if not use_excl and bool(np.all(counts >= k)):  # common case: nothing to drop
            return ids, sims
        ids, sims, short = self._drop_excluded(ids, sims, counts, excl, k)
        if short.any():  # HNSW found too few candidates for some rows: brute force those
            rows = np.nonzero(short)[0]
            i2, s2, c2 = self._raw_search(stored[rows], need, exact=True)
            i2, s2, _ = self._drop_excluded(i2, s2, c2, excl[rows], k)
            ids[rows], sims[rows] = i2, s2
        return ids, sims

    def _raw_search(self, stored: np.ndarray, count: int, exact: bool):
        # one query runs on the calling thread (no pool start-up); batches use all cores
        threads = 1 if stored.shape[0] == 1 else 0
        m = self._index.search(stored, count, exact=exact, threads=threads)
        if hasattr(m, "counts"):  # BatchMatches: [Q, count], sentinel past counts
            keys = np.asarray(m.keys, dtype=np.int64).reshape(stored.shape[0], count)
            dist = np.asarray(m.distances, dtype=np.float32).reshape(stored.shape[0], count)
            counts = np.asarray(m.counts, dtype=np.int64).reshape(-1)
        else:  # one query: usearch returns Matches holding only the valid hits
            got = len(m.keys)
            keys = np.zeros((1, count), np.int64)
            dist = np.full((1, count), 2.0, np.float32)
            keys[0, :got] = np.asarray(m.keys, dtype=np.int64)
            dist[0, :got] = np.asarray(m.distances, dtype=np.float32)
            counts = np.array([got], np.int64)
        return keys, np.clip(1.0 - dist, -1.0, 1.0), counts

    @staticmethod
    def _drop_excluded(ids, sims, counts, excl, k):
        cols = np.arange(ids.shape[1])[None, :]
        bad = (cols >= counts[:, None]) | (ids == excl[:, None])
        # stable sort puts valid hits first, keeping their (best-first) order
        order = np.argsort(bad, axis=1, kind="stable")[:, :k]
        short = (~bad).sum(axis=1) < k
        return (
            np.take_along_axis(ids, order, axis=1),
            np.take_along_axis(sims, order, axis=1).astype(np.float32),
            short,
        )

    def values(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Values for ``ids`` of any shape: arrays shaped ``ids.shape + value shape``."""
        ids = _as_ids(ids, len(self))
        flat = ids.reshape(-1)
        return {
            n: np.asarray(a[flat]).reshape(ids.shape + a.shape[1:]) for n, a in self._value_arrays().items()
        }

    def captions_of(self, ids):
        """Caption(s) of ``ids``: a str for a scalar id, else (nested) lists shaped like ``ids``."""
        arr = _as_ids(ids, len(self))
        if arr.ndim == 0:
            return self._captions[int(arr)]
        flat = [self._captions[i] for i in arr.reshape(-1).tolist()]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(arr.shape).tolist()

    def stored_keys(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Stored key vectors (f16/f32 unit vectors, or per-vector scaled int8) for ``ids``."""
        ids = np.arange(len(self)) if ids is None else _as_ids(ids, len(self)).reshape(-1)
        if ids.size == 0:
            return np.zeros((0, self.meta.dim), _NUMPY_KEY_DTYPE[self.meta.key_dtype])
        out = []
        for s in range(0, ids.size, 65536):
            got = self._index.get(ids[s : s + 65536].astype(np.uint64))
            out.append(np.vstack(got))
        return np.concatenate(out, axis=0).astype(_NUMPY_KEY_DTYPE[self.meta.key_dtype], copy=False)

    def check_fingerprint(self, fingerprint: str) -> None:
        if self.meta.fingerprint != fingerprint:
            raise BankError(
                f"memory bank fingerprint {self.meta.fingerprint or '(none)'} does not match the "
                f"model's fingerprint {fingerprint or '(none)'}: this bank was built with other model "
                f"weights; rebuild the bank with this model (tinyalign bank build)"
            )

    # ---------------------------------------------------------------- sizes

    def bytes_per_entry(self) -> dict[str, float]:
        """Bytes per entry of the keys (index file incl. graph), each value array, captions, total.

        Measured from the files for a bank opened from a folder, else from memory (the index's
        serialised length = its file size, the arrays' nbytes, the UTF-8 JSON of the captions).
        """
        n = max(len(self), 1)
        arrays = self._value_arrays()
        out: dict[str, float] = {}
        if self._opened_from is not None:
            p = self._opened_from
            out["keys"] = os.path.getsize(p / INDEX_FILE) / n
            for name in arrays:
                out[name] = os.path.getsize(p / f"{VALUE_PREFIX}{name}.npy") / n
            out["captions"] = os.path.getsize(p / CAPTIONS_FILE) / n
        else:
            out["keys"] = int(self._index.serialized_length) / n
            for name, a in arrays.items():
                out[name] = a.nbytes / n
            out["captions"] = len(json.dumps(self._captions, ensure_ascii=False).encode("utf-8")) / n
        out["total"] = sum(out.values())
        return out

    # ---------------------------------------------------------------- persistence

    def save(self, path, overwrite: bool = False) -> Path:
        """Write the bank to folder ``path`` atomically (temporary sibling folder, then rename)."""
        path = Path(path)
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise BankError(
                    f"{path} already exists; pass overwrite=True to replace it, or save to another path"
                )
            if not path.is_dir() or path.is_symlink():
                raise BankError(f"{path} exists and is not a folder; refusing to replace it with a bank")
            if not (path / META_FILE).exists() and any(path.iterdir()):
                raise BankError(
                    f"{path} is a non-empty folder that is not a memory bank (no {META_FILE}); "
                    f"refusing to replace it — choose another path"
                )
        parent = path.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a bank folder is a normal folder
            self._write_files(tmp)
            _fsync_dir(tmp)
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=parent))
                os.rmdir(old)
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._path = path
        return path

    def _write_files(self, folder: Path) -> None:
        arrays = self._value_arrays()
        index_path = folder / INDEX_FILE
        self._index.save(str(index_path))
        files = [INDEX_FILE]
        layout = {}
        for name, a in arrays.items():
            fname = f"{VALUE_PREFIX}{name}.npy"
            np.save(folder / fname, np.ascontiguousarray(a), allow_pickle=False)
            files.append(fname)
            layout[name] = {"dtype": a.dtype.str, "shape": [int(s) for s in a.shape[1:]], "file": fname}
        with open(folder / CAPTIONS_FILE, "w", encoding="utf-8") as f:
            json.dump(self._captions, f, ensure_ascii=False)
        files.append(CAPTIONS_FILE)
        for fname in files:
            _fsync_file(folder / fname)
        doc = self.meta.to_dict()
        doc["values"] = layout
        doc["index"] = {
            "metric": "cos",
            "connectivity": int(self._index.connectivity),
            "expansion_add": int(self._index.expansion_add),
            "expansion_search": int(self._index.expansion_search),
            "i8_scaling": "per-vector 127/max|x|" if self.meta.key_dtype == "i8" else None,
        }
        doc["files"] = {
            fname: {"bytes": os.path.getsize(folder / fname), "sha256": _sha256(folder / fname)}
            for fname in files
        }
        with open(folder / META_FILE, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def open(cls, path, view: bool = True, *, verify: bool = False) -> "MemoryBank":
        """Open a saved bank.  view=True memory-maps index and values (read-only);
        view=False loads them into memory (the bank can then grow with add()).
        verify=True also checks every file's sha256 against meta.json."""
        path = Path(path)
        if not path.is_dir():
            raise BankError(f"no memory bank at {path}: folder not found; build one or fix the path")
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise BankError(f"memory bank {path} is missing {META_FILE}; rebuild the bank")
        try:
            with open(meta_path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _damaged(meta_path, f"unreadable JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("schema_version"), int):
            raise _damaged(meta_path, "no schema_version")
        if doc["schema_version"] > SCHEMA_VERSION:
            raise BankError(
                f"memory bank {path} has schema version {doc['schema_version']}, newer than this "
                f"tinyalign supports ({SCHEMA_VERSION}); upgrade tinyalign or rebuild the bank"
            )
        try:
            meta = BankMetadata.from_dict(doc)
            meta.validate()
            layout = dict(doc.get("values", {}))
            files = dict(doc["files"])
            idx_cfg = dict(doc.get("index", {}))
        except (TypeError, KeyError, ValueError) as e:
            raise _damaged(meta_path, f"bad metadata: {e}") from None
        count = int(meta.count)

        needed = [INDEX_FILE, CAPTIONS_FILE] + [spec["file"] for spec in layout.values()]
        for fname in needed:
            if not (path / fname).is_file():
                raise BankError(f"memory bank {path} is missing {fname}; rebuild the bank or copy it again")
        for fname in needed:
            want = files.get(fname, {}).get("bytes")
            have = os.path.getsize(path / fname)
            if want is not None and have != want:
                raise _damaged(path / fname, f"{have} bytes, expected {want}; truncated or overwritten")
            if verify:
                want_sha = files.get(fname, {}).get("sha256")
                if want_sha and _sha256(path / fname) != want_sha:
                    raise _damaged(path / fname, "sha256 differs from meta.json")

        index_path = path / INDEX_FILE
        try:
            info = Index.metadata(str(index_path))
            if not info:
                raise ValueError("no usearch header")
            if int(info["dimensions"]) != meta.dim:
                raise ValueError(f"index dim {info['dimensions']} but meta.json says {meta.dim}")
            if getattr(info["kind_scalar"], "name", None) != _USEARCH_SCALAR[meta.key_dtype]:
                raise ValueError(f"index scalar {info['kind_scalar']} but meta.json says {meta.key_dtype}")
            if int(info["count_present"]) != count:
                raise ValueError(f"index holds {info['count_present']} entries but meta.json says {count}")
            index = Index.restore(str(index_path), view=bool(view and count > 0))
            if index is None or len(index) != count:
                raise ValueError("index could not be restored")
        except (ValueError, RuntimeError, KeyError) as e:
            raise _damaged(index_path, str(e)) from None
        if "expansion_search" in idx_cfg:
            index.expansion_search = int(idx_cfg["expansion_search"])
        if "expansion_add" in idx_cfg:
            index.expansion_add = int(idx_cfg["expansion_add"])

        values: dict[str, np.ndarray] = {}
        for name, spec in layout.items():
            vpath = path / spec["file"]
            try:
                arr = np.load(vpath, mmap_mode="r" if (view and count > 0) else None, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise _damaged(vpath, str(e)) from None
            if arr.shape != (count, *spec["shape"]) or arr.dtype.str != spec["dtype"]:
                raise _damaged(
                    vpath,
                    f"holds {arr.dtype.str} {list(arr.shape)}, expected {spec['dtype']} {[count, *spec['shape']]}",
                )
            values[name] = arr

        cap_path = path / CAPTIONS_FILE
        try:
            with open(cap_path, encoding="utf-8") as f:
                captions = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _damaged(cap_path, f"unreadable JSON: {e}") from None
        if not isinstance(captions, list) or len(captions) != count or not all(isinstance(c, str) for c in captions):
            raise _damaged(cap_path, f"expected a list of {count} strings")

        bank = cls.__new__(cls)
        bank.meta = meta
        bank._index = index
        bank._values = values
        bank._pending = {}
        bank._value_order = list(layout)
        bank._captions = captions
        bank._path = path
        bank._opened_from = path
        bank._read_only = bool(view)
        return bank

    # ---------------------------------------------------------------- shards

    @staticmethod
    def merge(banks: list["MemoryBank"]) -> "MemoryBank":
        """One bank holding the entries of ``banks`` in order (ids renumbered 0..N-1).

        Refuses banks whose keys are not comparable (dim, key dtype, fingerprint, recipe,
        alpha, search mode) or whose values differ (value kind, names, per-entry shapes).
        The index is rebuilt from the stored key vectors with one thread, so merging shards
        gives the same index as adding all their entries to one bank.
        """
        banks = list(banks)
        if not banks:
            raise BankError("merge needs at least one bank")
        first = banks[0]
        m0 = first.meta
        spec0 = {n: s for n, (_, s) in first._value_arrays_spec().items()}
        for i, b in enumerate(banks[1:], start=1):
            m = b.meta
            for attr in ("dim", "key_dtype", "fingerprint", "value_kind", "recipe", "alpha", "exact"):
                if getattr(m, attr) != getattr(m0, attr):
                    raise BankError(
                        f"cannot merge: bank {i} has {attr}={getattr(m, attr)!r} but bank 0 has "
                        f"{getattr(m0, attr)!r}; build all shards with the same model and settings"
                    )
            spec = {n: s for n, (_, s) in b._value_arrays_spec().items()}
            if spec != spec0:
                raise BankError(
                    f"cannot merge: bank {i} stores values {spec} but bank 0 stores {spec0}"
                )
        sources = []
        for b in banks:
            if b.meta.source and b.meta.source not in sources:
                sources.append(b.meta.source)
        extra: dict = {}
        for b in banks:
            for key, val in b.meta.extra.items():
                extra.setdefault(key, val)
        meta = replace(m0, count=0, source="+".join(sources), extra=extra)
        out = MemoryBank(
            meta=meta,
            connectivity=int(first._index.connectivity),
            expansion_add=int(first._index.expansion_add),
            expansion_search=int(first._index.expansion_search),
        )
        for b in banks:
            if len(b) == 0:
                continue
            all_ids = np.arange(len(b))
            vals = b.values(all_ids) if spec0 else {}
            out._add_stored(
                b.stored_keys(all_ids), vals, list(b._captions), batch_size=4096, progress=False, threads=1
            )
        return out
