"""Export self-checks: eager PyTorch vs the ExecuTorch runtime, per method and in generation.

Per method: the largest absolute difference between the eager fp32 model (and, for quantized
presets, the eager quantized model) and the loaded .pte on sample inputs. In generation: the
whole documented pipeline (docs/bundle.md) runs through the .pte and the bank, against the
library's own eager path (`TinyAlignVLM.assemble` + `tinyalign.generate.generate`); reported as
teacher-forced greedy-token agreement (the exported decoder is fed the eager tokens and must
pick the same next token), identical free-running tokens and identical retrieved entries.
A Core ML .pte cannot run off macOS: the report then says so instead of giving numbers.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from tinyalign.tokenizer import IMAGE_TOKEN_ID

from .methods import (RAG_CONNECTOR, RETRIEVAL_QUERY, TEXT_DECODER, TOKEN_EMBEDDING, VISION_ENCODER,
                      build_methods, method_specs)

SAMPLE_QUESTIONS = ("What color is the shape?", "What shape is in the image?", "Is there a circle?")


# ---- inputs ---------------------------------------------------------------------------------
def sample_cases(cfg, tokenizer, n: int = 3, seed: int = 0) -> list[dict]:
    """Sample (pixels, prompt ids) pairs: images uniform in the normalised range, real prompts."""
    g = torch.Generator().manual_seed(seed)
    S = cfg.vision.image_size
    cases = []
    for i in range(n):
        q = SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)]
        cases.append({"question": q, "pixels": torch.rand(1, 3, S, S, generator=g) * 2 - 1,
                      "ids": tokenizer.prompt_ids(q)})
    return cases


def split_prompt(ids: list[int]) -> tuple[list[int], list[int]]:
    p = ids.index(IMAGE_TOKEN_ID)
    return ids[:p], ids[p + 1:]


def retrieve(bank, value_name: str, query: np.ndarray, k: int) -> tuple[np.ndarray, torch.Tensor]:
    """Bank search for one query `[1, dim]` -> (entry ids [k], values tensor [1, k, ...])."""
    ids, _ = bank.search(np.asarray(query, dtype=np.float32), k)
    vals = bank.values(ids[0])[value_name]
    v = torch.from_numpy(np.asarray(vals))
    v = v.to(torch.int64) if not v.is_floating_point() else v.float()
    return ids[0], v[None]


# ---- runtime --------------------------------------------------------------------------------
class PteProgram:
    """A loaded .pte; `run(name, *tensors)` -> list of output tensors. Each instance has its own
    KV cache (a fresh load)."""

    def __init__(self, path: str | Path):
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(str(path))
        self._methods = {}

    def run(self, name: str, *args) -> list[torch.Tensor]:
        if name not in self._methods:
            self._methods[name] = self.program.load_method(name)
        return list(self._methods[name].execute([a.contiguous() for a in args]))


def _max_diff(outs, refs) -> float:
    refs = refs if isinstance(refs, (tuple, list)) else (refs,)
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs, refs))


# ---- per method -----------------------------------------------------------------------------
@torch.no_grad()
def method_parity(pte: Path, model, qmodel, cases: list[dict]) -> dict:
    """Max abs diff per method, runtime vs eager fp32 (`model`) and vs eager quantized (`qmodel`)."""
    cfg = model.cfg
    refs = {"fp32": build_methods(copy.deepcopy(model))}
    if qmodel is not None:
        refs["quantized"] = build_methods(copy.deepcopy(qmodel))
    prog = PteProgram(pte)
    diffs: dict[str, dict[str, float]] = {}

    def record(name, outs, args):
        for key, methods in refs.items():
            want = methods[name](*args)
            d = _max_diff(outs, want)
            slot = diffs.setdefault(name, {})
            col = "max_abs_diff" if key == "fp32" else "max_abs_diff_vs_quantized_eager"
            slot[col] = max(slot.get(col, 0.0), d)
            if key == "fp32":  # output scale, for a limit relative to large outputs (deep LMs' logits)
                flat = [w for w in (want if isinstance(want, (tuple, list)) else (want,)) if torch.is_tensor(w)]
                scale = max((float(w.detach().abs().max()) for w in flat if w.numel()), default=0.0)
                slot["max_abs_eager"] = max(slot.get("max_abs_eager", 0.0), scale)

    r = cfg.retrieval
    g = torch.Generator().manual_seed(1)
    for case in cases:
        px = case["pixels"]
        record(VISION_ENCODER, prog.run(VISION_ENCODER, px), (px,))
        ids = torch.tensor([[i for i in case["ids"] if i >= 0]])
        record(TOKEN_EMBEDDING, prog.run(TOKEN_EMBEDDING, ids), (ids,))
        feats = refs["fp32"][VISION_ENCODER](px)[1]
        full = torch.tensor([case["ids"]])
        mask = torch.ones_like(full)
        record(RETRIEVAL_QUERY, prog.run(RETRIEVAL_QUERY, feats, full, mask), (feats, full, mask))
        spec = method_specs(cfg)[RAG_CONNECTOR].inputs[0]
        if spec.dtype == "int64":
            vals = torch.randint(0, cfg.lm.vocab_size, spec.shape, generator=g)
            vals[..., -1] = -1  # padding
        else:
            vals = torch.randn(spec.shape, generator=g)
        record(RAG_CONNECTOR, prog.run(RAG_CONNECTOR, vals), (vals,))
    # text decoder: prefill then decode steps on one fresh cache (fresh eager caches as well)
    H = cfg.lm.hidden_size
    prog = PteProgram(pte)
    refs = {k: build_methods(copy.deepcopy(m)) for k, m in (("fp32", model), ("quantized", qmodel)) if m is not None}
    T = min(7, cfg.lm.max_seq_len - 4)
    steps = [(torch.randn(1, T, H, generator=g), torch.arange(T))]
    steps += [(torch.randn(1, 1, H, generator=g), torch.tensor([T + i])) for i in range(3)]
    for emb, pos in steps:
        record(TEXT_DECODER, prog.run(TEXT_DECODER, emb, pos), (emb, pos))
    return diffs


# ---- generation ----------------------------------------------------------------------------
@torch.no_grad()
def eager_generate(model, case: dict, bank, value_name: str, n_tokens: int) -> dict:
    """The library's eager path: retrieval, `assemble`, `generate` (greedy, no stop tokens)."""
    from tinyalign.generate import generate

    m = copy.deepcopy(model).eval()
    m.lm.drop_cache()
    dtype = m.lm.norm.weight.dtype  # float16 for the Core ML fp16 simulation
    feats = m.image_features(case["pixels"].to(dtype))
    ids = torch.tensor([case["ids"]])
    memory, entry_ids = None, []
    if m.cfg.retrieval.enabled and bank is not None:
        query = m.key_encoder(feats, ids.clamp(min=0), (ids >= 0).long())
        entry_ids, values = retrieve(bank, value_name, query.float().numpy(), m.cfg.retrieval.k)
        memory = m.memory_tokens(values if not values.is_floating_point() else values.to(dtype))
    prefix, _, _ = m.assemble(ids, m.image_tokens(feats), memory)
    n = max(1, min(n_tokens, m.cfg.lm.max_seq_len - prefix.shape[1]))
    tokens = generate(m.lm, prefix, max_new_tokens=n, stop_ids=())[0]
    return {"tokens": [int(t) for t in tokens], "entries": [int(i) for i in entry_ids], "prefix_len": prefix.shape[1]}


def _exported_prefix(prog: PteProgram, case: dict, bank, value_name: str, k: int, retrieval: bool):
    """The documented runtime steps up to the prefill embeddings."""
    img_tokens, feats = prog.run(VISION_ENCODER, case["pixels"])[:2]
    entries, parts = [], []
    before, after = split_prompt(case["ids"])
    if before:
        parts.append(prog.run(TOKEN_EMBEDDING, torch.tensor([before]))[0])
    parts.append(img_tokens)
    if retrieval and bank is not None:
        full = torch.tensor([case["ids"]])
        query = prog.run(RETRIEVAL_QUERY, feats, full, torch.ones_like(full))[0]
        entries, values = retrieve(bank, value_name, query.numpy(), k)
        parts.append(prog.run(RAG_CONNECTOR, values)[0])
    if after:
        parts.append(prog.run(TOKEN_EMBEDDING, torch.tensor([after]))[0])
    return torch.cat(parts, 1), [int(i) for i in entries]


def exported_generate(pte: Path, cfg, case: dict, bank, value_name: str, n_tokens: int,
                      teacher: list[int] | None = None) -> dict:
    """Greedy decoding through the .pte; with `teacher`, feed those tokens instead of its own and
    return its argmax at every step (teacher forcing)."""
    prog = PteProgram(pte)
    prefix, entries = _exported_prefix(prog, case, bank, value_name, cfg.retrieval.k, cfg.retrieval.enabled)
    P = prefix.shape[1]
    n = len(teacher) if teacher is not None else max(1, min(n_tokens, cfg.lm.max_seq_len - P))
    logits = prog.run(TEXT_DECODER, prefix, torch.arange(P))[0]
    out = []
    for step in range(n):
        tok = int(logits.argmax(-1)[0])
        out.append(tok)
        if step == n - 1:
            break
        feed = teacher[step] if teacher is not None else tok
        emb = prog.run(TOKEN_EMBEDDING, torch.tensor([[feed]]))[0]
        logits = prog.run(TEXT_DECODER, emb, torch.tensor([P + step]))[0]
    return {"tokens": out, "entries": entries, "prefix_len": P}


def _agreement(ref: list[int], got: list[int]) -> tuple[int, int]:
    same = sum(a == b for a, b in zip(ref, got))
    prefix = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return same, prefix


def generation_parity(pte: Path | None, model, qmodel, cases: list[dict], bank, value_name: str,
                      n_tokens: int = 8) -> dict:
    """Greedy-token agreement over the sample prompts. `qmodel` is the eager model with the preset
    applied (quantized, or float16 for Core ML fp16), compared with eager fp32; `pte=None` skips
    the runtime (all that can be measured for Core ML off macOS)."""
    per, total, same_tf, same_free, same_q, ret_same = [], 0, 0, 0, 0, 0
    for case in cases:
        ref = eager_generate(model, case, bank, value_name, n_tokens)
        row = {"question": case["question"], "eager_tokens": ref["tokens"], "prefix_len": ref["prefix_len"]}
        total += len(ref["tokens"])
        if qmodel is not None:
            q = eager_generate(qmodel, case, bank, value_name, n_tokens)
            row["eager_preset_tokens"] = q["tokens"]
            same_q += _agreement(ref["tokens"], q["tokens"])[0]
        if pte is not None:
            free = exported_generate(pte, model.cfg, case, bank, value_name, len(ref["tokens"]))
            forced = exported_generate(pte, model.cfg, case, bank, value_name, 0, teacher=ref["tokens"])
            s_tf, _ = _agreement(ref["tokens"], forced["tokens"])
            _, s_free = _agreement(ref["tokens"], free["tokens"])
            same_tf += s_tf
            same_free += s_free
            ret_same += int(free["entries"] == ref["entries"])
            row.update(exported_tokens=free["tokens"], teacher_forced_tokens=forced["tokens"],
                       entries_eager=ref["entries"], entries_exported=free["entries"])
        per.append(row)
    out = {"prompts": len(cases), "tokens": total, "per_prompt": per}
    if pte is not None:
        out.update(token_agreement=same_tf / max(total, 1), free_run_prefix_agreement=same_free / max(total, 1),
                   retrieval_agreement=ret_same / max(len(cases), 1))
    if qmodel is not None:
        out["eager_preset_token_agreement"] = same_q / max(total, 1)
    return out


# ---- the check ------------------------------------------------------------------------------
def check(pte: Path, model, qmodel, tokenizer, bank, value_name: str, preset, *, runnable: bool,
          platform_note: str = "", n_prompts: int = 3, n_tokens: int = 8) -> dict:
    """Run all checks and return the report (does not raise; see `gate`)."""
    cases = sample_cases(model.cfg, tokenizer, n_prompts)
    report: dict = {"thresholds": {"max_abs_diff": preset.max_abs_diff,
                                   "min_token_agreement": preset.min_token_agreement}}
    q = qmodel if preset.quantizes else None
    if not runnable:
        # Off macOS a Core ML program cannot run: measure what the preset alone does, in eager.
        if q is None and preset.coreml_precision == "fp16":
            q = copy.deepcopy(model).half()
        report["runnable"] = False
        report["status"] = f"not runnable on {platform_note or 'this platform'}"
        report["methods"] = None
        report["failures"] = []
        report["generation"] = generation_parity(None, model, q, cases, bank, value_name, n_tokens) if q else None
        return report
    report["runnable"] = True
    report["methods"] = method_parity(pte, model, q, cases)
    report["generation"] = generation_parity(pte, model, q, cases, bank, value_name, n_tokens)
    report["failures"] = failures(report, preset)
    report["status"] = "passed" if not report["failures"] else "failed"
    return report


def failures(report: dict, preset) -> list[str]:
    out = []
    lim = preset.max_abs_diff
    if lim is not None:
        for name, d in (report.get("methods") or {}).items():
            # the limit is absolute for outputs of magnitude <= 1 and relative above (a 30-layer
            # LM's fp32 logits of magnitude ~20 differ by ~1e-4 from reordered float arithmetic alone)
            allowed = lim * max(1.0, d.get("max_abs_eager", 0.0))
            if d["max_abs_diff"] > allowed:
                out.append(f"{name}: max abs diff {d['max_abs_diff']:.3g} > {allowed:.3g}")
    gen = report.get("generation") or {}
    agree = gen.get("token_agreement")
    if agree is not None and agree < preset.min_token_agreement:
        out.append(f"greedy-token agreement {agree:.3f} < {preset.min_token_agreement:g}")
    return out


def format_table(report: dict) -> str:
    """The report as a plain-text table."""
    lines = [f"parity: {report['status']}"]
    if report.get("methods"):
        lines.append(f"{'method':<18}{'max|diff| vs fp32':>20}{'vs quantized eager':>20}")
        for name, d in report["methods"].items():
            qd = d.get("max_abs_diff_vs_quantized_eager")
            lines.append(f"{name:<18}{d['max_abs_diff']:>20.3g}{'' if qd is None else format(qd, '.3g'):>20}")
    gen = report.get("generation") or {}
    if "token_agreement" in gen:
        lines.append(f"greedy tokens (teacher-forced): {gen['token_agreement']:.3f} of {gen['tokens']}; "
                     f"free-run identical prefix: {gen['free_run_prefix_agreement']:.3f}; "
                     f"same retrieved entries: {gen['retrieval_agreement']:.3f}")
    if "eager_preset_token_agreement" in gen:
        lines.append(f"eager with preset vs eager fp32, greedy tokens: {gen['eager_preset_token_agreement']:.3f}")
    for f in report.get("failures") or []:
        lines.append(f"FAILED {f}")
    return "\n".join(lines)
