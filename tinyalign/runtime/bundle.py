"""`Bundle.open(path)`: a verified, loaded bundle (docs/bundle.md, "What a runtime does", step 1).

Opening checks `schema_version`, the size and sha256 of every file the manifest lists (and that
the files the runtime reads are among them), and that the bank's fingerprint is the model's;
then loads the ExecuTorch program, `tokenizer.json` and the memory-mapped bank. It owns no
inference logic (see `engine.py`) and imports no torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from tinyalign.bank import BankError, MemoryBank
from tinyalign.fsutil import sha256_file

from .errors import BundleError, ProgramError
from .program import Program, open_program

__all__ = ["Bundle", "SCHEMA_VERSION", "verify_files"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("schema_version", "target", "backend", "model", "max_seq_len", "image", "template",
                 "special_tokens", "tokenizer", "retrieval", "bank", "fingerprint", "programs", "method_order",
                 "files")
REQUIRED_METHODS = ("vision_encoder", "token_embedding", "text_decoder")


def _read_manifest(root: Path) -> dict:
    if not root.is_dir():
        raise BundleError(f"no bundle at {root}: folder not found; export one with tinyalign-export")
    f = root / MANIFEST
    if not f.is_file():
        raise BundleError(f"bundle {root} has no {MANIFEST}; it is not a bundle or the copy is incomplete")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {root}: {MANIFEST} is not valid JSON ({exc}); copy the bundle again") from None
    if not isinstance(m, dict) or not isinstance(m.get("schema_version"), int):
        raise BundleError(f"bundle {root}: {MANIFEST} has no integer schema_version; copy the bundle again")
    if m["schema_version"] > SCHEMA_VERSION:
        raise BundleError(f"bundle {root} has schema version {m['schema_version']}, newer than this runtime reads "
                          f"({SCHEMA_VERSION}); upgrade tinyalign")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise BundleError(f"bundle {root}: {MANIFEST} lacks {', '.join(missing)}; re-export the bundle")
    if not isinstance(m["files"], dict):
        raise BundleError(f"bundle {root}: {MANIFEST} 'files' is not an object; re-export the bundle")
    return m


def verify_files(root: Path, manifest: dict, *, needed: list[str] = ()) -> None:
    """Size and sha256 of every file in `manifest['files']`; every path in `needed` must be listed."""
    files = manifest["files"]
    for rel in needed:
        if rel not in files:
            raise BundleError(f"bundle {root}: {rel} is not listed in {MANIFEST} 'files', so it cannot be verified; "
                              f"re-export the bundle")
    for rel, info in files.items():
        p = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise BundleError(f"bundle {root}: {MANIFEST} lists a path outside the bundle: {rel}")
        if not p.is_file():
            raise BundleError(f"bundle {root} is missing {rel}; copy the bundle again")
        size = p.stat().st_size
        if size != info.get("bytes"):
            raise BundleError(f"bundle {root}: {rel} has {size} bytes but {MANIFEST} says {info.get('bytes')} "
                              f"(truncated or modified); copy the bundle again")
        if sha256_file(p) != info.get("sha256"):
            raise BundleError(f"bundle {root}: {rel} does not match its sha256 in {MANIFEST} (modified or "
                              f"corrupt); copy the bundle again")


class Bundle:
    """A verified bundle: `manifest`, `tokenizer` (tokenizers.Tokenizer), `bank` (MemoryBank or
    None when retrieval is off) and `program` (the loaded model.pte). Example::

        b = Bundle.open("bundles/tiny-desktop")
        print(b.ask("shape.png", "What color is the shape?").text)
    """

    def __init__(self, *, path: Path, manifest: dict, tokenizer: HFTokenizer, bank: MemoryBank | None,
                 program: Program):
        self.path = path
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.bank = bank
        self.program = program
        self._engine = None

    @classmethod
    def open(cls, path, *, backend: str = "auto", verify: bool = True) -> "Bundle":
        """Verify and load the bundle at `path`. `backend`: "auto", "native" (torch-free) or
        "pybindings" (needs torch); see `program.py`. Raises BundleError (or ProgramError)."""
        root = Path(path).expanduser()
        m = _read_manifest(root)
        pte = (m.get("programs") or {}).get("executorch")
        if not pte:
            raise BundleError(f"bundle {root}: {MANIFEST} names no ExecuTorch program (programs.executorch)")
        retrieval = bool((m.get("retrieval") or {}).get("enabled"))
        bank_info = m.get("bank")
        if retrieval and not isinstance(bank_info, dict):
            raise BundleError(f"bundle {root}: retrieval is enabled but {MANIFEST} describes no bank")
        needed = [pte, m["tokenizer"]]
        if retrieval:
            needed += [f"{bank_info['path']}/meta.json", f"{bank_info['path']}/index.usearch"]
        if verify:
            verify_files(root, m, needed=needed)
        if m.get("backend") == "coreml" and sys.platform != "darwin":
            raise BundleError(f"bundle {root} is for {m.get('target')} (Core ML delegate), which runs only on "
                              f"Apple devices; export a desktop bundle (--target desktop) for this machine")
        bank = None
        if retrieval:
            if bank_info.get("fingerprint") != m["fingerprint"]:
                raise BundleError(f"bundle {root}: the bank fingerprint in {MANIFEST} is not the model's; the bank "
                                  f"belongs to another model; re-export the bundle with the bank built by this model")
            try:
                bank = MemoryBank.open(root / bank_info["path"])
                bank.check_fingerprint(m["fingerprint"])
            except BankError as exc:
                raise BundleError(f"bundle {root}: {exc}") from None
            if len(bank) < int(m["retrieval"]["k"]):
                raise BundleError(f"bundle {root}: the bank holds {len(bank)} entries, fewer than k="
                                  f"{m['retrieval']['k']}")
        try:
            tok = HFTokenizer.from_file(str(root / m["tokenizer"]))
        except Exception as exc:
            raise BundleError(f"bundle {root}: {m['tokenizer']} is not a valid tokenizer.json ({exc})") from None
        try:
            program = open_program(root / pte, backend)
        except ProgramError as exc:
            raise BundleError(f"bundle {root}: {exc}") from exc
        want = set(REQUIRED_METHODS) | ({"retrieval_query", "rag_connector"} if retrieval else set())
        lacking = sorted(want - set(program.method_names))
        if lacking:
            raise BundleError(f"bundle {root}: {pte} lacks the methods {', '.join(lacking)}; re-export the bundle")
        return cls(path=root, manifest=m, tokenizer=tok, bank=bank, program=program)

    # ---- convenience ---------------------------------------------------------------------------
    @property
    def engine(self):
        if self._engine is None:
            from .engine import Engine

            self._engine = Engine(self)
        return self._engine

    def ask(self, image, question: str, **kw):
        """`Engine(bundle).ask(...)`; see `Engine.ask`."""
        return self.engine.ask(image, question, **kw)

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["max_seq_len"])

    def close(self):
        self.program.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        q = (self.manifest.get("quantization") or {}).get("preset", "?")
        n = len(self.bank) if self.bank is not None else 0
        return (f"Bundle({str(self.path)!r}, target={self.target}, quantization={q}, bank={n} entries, "
                f"backend={self.program.backend})")
