"""`export_bundle`: checkpoint + memory bank -> a self-describing bundle folder for one target.

The bundle (format and runtime contract: docs/bundle.md) holds `model.pte`, on ios / macos one
`.mlpackage` per method, the memory bank, `tokenizer.json` and `manifest.json` (versions,
preprocessing, chat template, retrieval settings, method argument order, parity report and a
sha256 per file). Everything is written into a temporary sibling folder that is renamed into
place only when every file and check succeeded: a failed export leaves nothing behind, and the
inputs (checkpoint, bank) are only read.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from tinyalign import __version__
from tinyalign.fsutil import atomic_dir, check_output, sha256_file

from .executorch_export import ExportError, backend_of, build_pte, check_target, constant_methods, runtime_available
from .methods import METHOD_NAMES, method_specs
from .quantize import PRESETS, QuantizeError, get_preset, quantize_model

MANIFEST_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PTE = "model.pte"
BANK_DIR = "bank"
TOKENIZER = "tokenizer.json"
KEY_DTYPES = ("f16", "i8", "f32")
# The steps a runtime follows, in order (docs/bundle.md explains each).
PIPELINE = (
    "verify sha256 of every file in manifest.files",
    "preprocess the image (manifest.image)",
    "vision_encoder(pixels) -> image_tokens, feats",
    "retrieval_query(feats, prompt ids, mask) -> query",
    "bank search: top-k entries by cosine similarity",
    "rag_connector(values of the k entries) -> memory_tokens",
    "assemble [embeds of prompt before <image>, image_tokens, memory_tokens, embeds of prompt after <image>]",
    "text_decoder(prefix, 0..P-1) -> logits (prefill)",
    "decode loop: token_embedding(next id) -> text_decoder(embeds, [pos]) until an eos id or max_seq_len",
)
VALUE_NAME_PREFERENCE = ("caption_ids", "ids", "tokens", "caption", "latent", "latents", "values")


class DriftError(ExportError):
    """Exported outputs drift from eager beyond the preset's thresholds."""


def _log(verbose: bool, msg: str):
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def _resolve(p) -> Path:
    return Path(p).expanduser().resolve()


def _check_not_input(out: Path, inputs: list[Path]):
    o = _resolve(out)
    for p in inputs:
        p = _resolve(p)
        if o == p or o in p.parents or p in o.parents:
            raise ExportError(f"output {out} would replace, contain or sit inside the input {p}; inputs are "
                              "never modified, choose another output folder")


def value_name_of(bank, cfg) -> str:
    """The bank value array that feeds `rag_connector`, checked against the model's config."""
    names = bank.value_names
    if not names:
        raise ExportError("the memory bank stores no values; rebuild it with values for the RAG connector")
    name = names[0] if len(names) == 1 else next((n for n in VALUE_NAME_PREFERENCE if n in names), None)
    if name is None:
        raise ExportError(f"cannot tell which bank value feeds the RAG connector among {names}; "
                          f"name it one of {', '.join(VALUE_NAME_PREFERENCE)}")
    import numpy as np

    shape = tuple(bank.values(np.array([0]))[name].shape[1:])
    spec = method_specs(cfg)["rag_connector"].inputs[0]
    want = tuple(spec.shape[2:])
    if shape != want:
        raise ExportError(f"bank value {name!r} has per-entry shape {list(shape)} but the model's RAG connector "
                          f"expects {list(want)}; rebuild the bank with this model's retrieval settings")
    return name


def _copy_bank(src, dst: Path, key_dtype: str | None):
    """Copy the bank folder; with `key_dtype`, re-encode its keys (values and captions unchanged)."""
    from tinyalign.bank import MemoryBank

    if key_dtype is None or key_dtype == src.meta.key_dtype:
        shutil.copytree(src.path, dst)
        return MemoryBank.open(dst)
    if key_dtype not in KEY_DTYPES:
        raise ExportError(f"unknown bank key dtype {key_dtype!r}; choose one of: {', '.join(KEY_DTYPES)}")
    import numpy as np

    ids = np.arange(len(src))
    new = MemoryBank(meta=replace(src.meta, key_dtype=key_dtype, count=0, extra=dict(src.meta.extra)))
    new.add(src.stored_keys(ids).astype(np.float32), src.values(ids) if src.value_names else {},
            list(src.captions_of(ids)) if len(src) else [])
    new.save(dst)
    return MemoryBank.open(dst)


def _files(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def build_manifest(*, model, tokenizer, meta: dict, bank, value_name, target, preset, fingerprint,
                   coreml: dict | None, parity: dict, timings: dict, root: Path) -> dict:
    from tinyalign.images import preprocess_spec

    cfg = model.cfg
    r = cfg.retrieval
    t = cfg.template
    specs = method_specs(cfg)
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "kit_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": target,
        "backend": backend_of(target),
        "quantization": preset.scheme(target),
        "model": {
            "preset": cfg.preset,
            "vision": cfg.vision.kind.value,
            "image_tokens": cfg.vision.num_tokens,
            "hidden_size": cfg.lm.hidden_size,
            "num_layers": cfg.lm.num_layers,
            "vocab_size": cfg.lm.vocab_size,
            "checkpoint": {k: meta[k] for k in sorted(meta) if isinstance(meta[k], (str, int, float, bool))},
        },
        "max_seq_len": cfg.lm.max_seq_len,
        "image": preprocess_spec(cfg.vision.image_size, cfg.vision.image_mean, cfg.vision.image_std),
        "template": {
            "system": t.system, "user_prefix": t.user_prefix, "user_suffix": t.user_suffix,
            "assistant_prefix": t.assistant_prefix, "assistant_suffix": t.assistant_suffix,
            "image_placeholder": t.image_placeholder,
            # Encoded separately (no special tokens added), then joined around the image slot:
            # [bos_id if not null] + encode(before_image) + [image slot] + encode(after_image)
            "before_image": "{system}{user_prefix}",
            "after_image": "\n{question}{user_suffix}{assistant_prefix}",
            "question": "stripped of leading and trailing whitespace",
        },
        "special_tokens": {
            "bos": t.bos_token or None, "bos_id": tokenizer.bos_id,
            "eos": list(t.eos_tokens), "eos_ids": [int(i) for i in tokenizer.eos_ids],
            "pad": t.pad_token or None, "pad_id": tokenizer.pad_id,
            "image_token_id": -200,
        },
        "tokenizer": TOKENIZER,
        "retrieval": {
            "enabled": bool(r.enabled and bank is not None),
            "k": r.k, "recipe": r.recipe.value, "alpha": r.alpha, "value_kind": r.value_kind.value,
            "value_name": value_name, "caption_len": r.caption_len, "value_tokens": r.value_tokens,
            "value_dim": r.value_dim, "key_dim": specs["retrieval_query"].outputs[0].shape[-1],
            "memory_len": model.memory_len(), "similarity": "cosine",
            "query_text": "the prompt's ids (prompt_ids(question)); ids < 0 are masked out",
        },
        "bank": None if bank is None else {
            "path": BANK_DIR, "fingerprint": bank.meta.fingerprint, "count": len(bank),
            "key_dtype": bank.meta.key_dtype, "dim": bank.meta.dim, "exact": bank.meta.exact,
            "source": bank.meta.source, "schema_version": bank.meta.schema_version,
        },
        "fingerprint": fingerprint,
        "programs": {
            "executorch": PTE,
            "coreml": None if coreml is None else {name: d["file"] for name, d in coreml.items()},
        },
        "methods": {name: specs[name].to_dict() for name in METHOD_NAMES},
        "method_order": list(METHOD_NAMES),
        "constant_methods": constant_methods(model, tokenizer),
        "coreml": coreml,
        "pipeline": list(PIPELINE),
        "parity": parity,
        "environment": {
            "python": platform.python_version(), "platform": sys.platform,
            **{m: _version(m) for m in ("torch", "executorch", "torchao", "coremltools", "usearch")},
        },
        "timings_s": timings,
        "files": _files(root),
    }


def _version(mod: str):
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def _check_import_order():
    """usearch 2.26.6 imported before torch breaks torch's operator-schema printing, and
    torch.export then fails deep inside torchgen; say so plainly instead."""
    import torch

    if "stride=[1, 1]" not in str(torch.ops.aten.conv2d.default._schema):
        raise ExportError(
            "this process imported usearch before torch, which breaks torch.export (usearch 2.26.6 "
            "conflict); import torch (or tinyalign.export) before tinyalign.bank / usearch, or run the "
            "export in a fresh process (tinyalign-export)"
        )


def export_bundle(checkpoint, bank, out, target: str = "desktop", quantize: str = "fp32", force: bool = False,
                  allow_drift: bool = False, *, bank_key_dtype: str | None = None, parity_prompts: int = 3,
                  parity_tokens: int = 8, coreml_stateful: bool = True, verbose: bool = True) -> Path:
    """Export `checkpoint` + `bank` to a bundle folder `out` for `target` with preset `quantize`.

    Refuses unknown targets / presets, a bank whose fingerprint is not the checkpoint's, an
    existing `out` (unless `force`) and an export whose parity checks fail (unless
    `allow_drift`). Returns the bundle path. Example::

        export_bundle(checkpoint="runs/tiny", bank="banks/easy", out="bundles/tiny-desktop",
                      target="desktop", quantize="8da4w")
    """
    import warnings

    # torch.export's pytree emits a FutureWarning per exported method (LeafSpec); not actionable here
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    _check_import_order()
    from tinyalign.bank import BankError, MemoryBank
    from tinyalign.checkpoint import load_checkpoint

    t_start = time.perf_counter()
    check_target(target)
    try:
        preset = get_preset(quantize, target)
    except QuantizeError as exc:
        raise ExportError(str(exc)) from None
    if bank_key_dtype is not None and bank_key_dtype not in KEY_DTYPES:
        raise ExportError(f"unknown bank key dtype {bank_key_dtype!r}; choose one of: {', '.join(KEY_DTYPES)}")
    out = Path(out)
    check_output(out, force)
    inputs = [Path(checkpoint)] + ([Path(bank)] if bank is not None else [])
    _check_not_input(out, inputs)

    model, tokenizer, meta = load_checkpoint(checkpoint)
    tok_text = (Path(checkpoint) / TOKENIZER).read_text(encoding="utf-8")
    fingerprint = model.key_fingerprint(tok_text)
    mb, value_name = None, None
    if model.cfg.retrieval.enabled:
        if bank is None:
            raise ExportError("this model uses retrieval: pass the memory bank built with it (--bank)")
        try:
            mb = MemoryBank.open(bank, verify=True)
            mb.check_fingerprint(fingerprint)
        except BankError as exc:
            raise ExportError(f"refusing to export: {exc}") from None
        value_name = value_name_of(mb, model.cfg)
        r = model.cfg.retrieval
        if mb.meta.value_kind != r.value_kind.value:
            raise ExportError(f"bank values are {mb.meta.value_kind!r} but the model expects {r.value_kind.value!r}")
        if len(mb) < r.k:
            raise ExportError(f"the bank holds {len(mb)} entries, fewer than the model's k={r.k}")
    _log(verbose, f"exporting {checkpoint} for {target} ({preset.name}) -> {out}")

    timings = {}
    with atomic_dir(out, force=force) as tmp:
        t0 = time.perf_counter()
        qmodel = quantize_model(model, preset, target)
        (tmp / PTE).write_bytes(build_pte(qmodel, tokenizer, target, preset))
        timings["executorch"] = round(time.perf_counter() - t0, 2)
        _log(verbose, f"  {PTE}: {os.path.getsize(tmp / PTE)} bytes in {timings['executorch']} s")
        coreml = None
        if backend_of(target) == "coreml":
            from .coreml_export import export_coreml

            t0 = time.perf_counter()
            coreml = export_coreml(qmodel, tmp, target, preset, stateful=coreml_stateful)
            timings["coreml"] = round(time.perf_counter() - t0, 2)
            _log(verbose, f"  Core ML packages: {', '.join(d['file'] for d in coreml.values())} in {timings['coreml']} s")
        bank_copy = None
        if mb is not None:
            bank_copy = _copy_bank(mb, tmp / BANK_DIR, bank_key_dtype)
        shutil.copyfile(Path(checkpoint) / TOKENIZER, tmp / TOKENIZER)

        from . import parity as par

        t0 = time.perf_counter()
        runnable = runtime_available(target)
        report = par.check(tmp / PTE, model, qmodel, tokenizer, bank_copy, value_name, preset, runnable=runnable,
                           platform_note=f"{platform.system()} (Core ML programs need macOS)",
                           n_prompts=parity_prompts, n_tokens=parity_tokens)
        timings["parity"] = round(time.perf_counter() - t0, 2)
        _log(verbose, par.format_table(report))
        if report.get("failures"):
            if not allow_drift:
                raise DriftError(
                    "exported program drifts from eager PyTorch: " + "; ".join(report["failures"])
                    + f". Nothing was written. Pass --allow-drift to export anyway, or use a milder preset "
                      f"(choices: {', '.join(PRESETS)})"
                )
            report["status"] = "failed (allowed by --allow-drift)"
        timings["total"] = round(time.perf_counter() - t_start, 2)
        manifest = build_manifest(model=model, tokenizer=tokenizer, meta=meta, bank=bank_copy, value_name=value_name,
                                  target=target, preset=preset, fingerprint=fingerprint, coreml=coreml,
                                  parity=report, timings=timings, root=tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=_json_default))
    _log(verbose, f"bundle written to {out}")
    return out


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    if hasattr(o, "value"):
        return o.value
    return str(o)


def verify_bundle(path) -> dict:
    """Re-read a bundle's manifest and check every file's size and sha256; returns the manifest."""
    root = Path(path)
    manifest = json.loads((root / MANIFEST).read_text())
    for rel, info in manifest["files"].items():
        f = root / rel
        if not f.is_file():
            raise ExportError(f"bundle {root} is missing {rel}")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise ExportError(f"bundle {root}: {rel} does not match its sha256 in {MANIFEST}")
    return manifest
