"""One ExecuTorch program (.pte) holding every method of `methods.METHOD_NAMES` plus constant methods.

Each method is exported on its own with `torch.export` and all are lowered together with
`to_edge_transform_and_lower`: XNNPACK for desktop / android, the Core ML delegate for
ios / macos. The KV cache lives in `text_decoder` as mutable buffers, planned with
`share_mutable_buffers` and serialised zero-initialised, so prefill and decode calls on one
loaded program see the same cache. This module knows nothing about bundles or banks.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from tinyalign.fsutil import atomic_write_bytes

from .methods import METHOD_NAMES, build_methods, dynamic_shapes, method_specs, sample_inputs
from .quantize import COREML_TARGETS, XNNPACK_TARGETS, QuantPreset

TARGETS = XNNPACK_TARGETS + COREML_TARGETS
CACHE_BUFFERS = ("k_cache", "v_cache")


class ExportError(ValueError):
    """The export cannot proceed as asked; the message says what to do."""


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    return target


def backend_of(target: str) -> str:
    return "coreml" if check_target(target) in COREML_TARGETS else "xnnpack"


def constant_methods(model, tokenizer) -> dict:
    """Constant methods: ExecuTorch's runner names plus TinyAlign's. `get_bos_id` is -1 when the
    chat template has no BOS token."""
    cfg = model.cfg
    r = cfg.retrieval
    return {
        "get_max_seq_len": cfg.lm.max_seq_len,
        "get_max_context_len": cfg.lm.max_seq_len,
        "get_bos_id": -1 if tokenizer.bos_id is None else int(tokenizer.bos_id),
        "get_eos_ids": [int(i) for i in tokenizer.eos_ids],
        "get_vocab_size": cfg.lm.vocab_size,
        "get_hidden_size": cfg.lm.hidden_size,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_image_size": cfg.vision.image_size,
        "get_image_tokens": cfg.vision.num_tokens,
        "get_memory_k": r.k if r.enabled else 0,
        "get_memory_len": model.memory_len(),
    }


# ---- XNNPACK workaround ------------------------------------------------------------------------
def _gelu_tanh(x, approximate="none"):
    """XNNPACK in ExecuTorch 1.5.1 lowers every aten.gelu as the exact (erf) GELU and ignores
    `approximate="tanh"` (measured 4.7e-4 off; fixed upstream later by pytorch/executorch#22851);
    spell the tanh form out so that SigLIP-style towers stay exact. Exact GELU is left alone."""
    if approximate != "tanh":
        return NotImplemented
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def export_methods(model, target: str) -> dict[str, torch.export.ExportedProgram]:
    """`torch.export` of every method of (a copy of) the already quantized `model`."""
    specs = method_specs(model.cfg)
    methods = build_methods(model)
    eps = {}
    with torch.no_grad():
        for name in METHOD_NAMES:
            spec = specs[name]
            args = sample_inputs(spec, vocab=model.cfg.lm.vocab_size)
            try:
                ep = torch.export.export(methods[name], args, dynamic_shapes=dynamic_shapes(spec), strict=False)
            except Exception as exc:
                raise ExportError(f"torch.export failed for method {name!r}: {exc}") from exc
            if backend_of(target) == "xnnpack":
                ep = ep.run_decompositions({torch.ops.aten.gelu.default: _gelu_tanh})
            eps[name] = ep
    return eps


def _partitioners(target: str, preset: QuantPreset):
    if backend_of(target) == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=coreml_deployment_target(target),
        compute_precision=ct.precision.FLOAT16 if preset.coreml_precision == "fp16" else ct.precision.FLOAT32,
    )
    return [CoreMLPartitioner(compile_specs=specs)]


def coreml_deployment_target(target: str):
    import coremltools as ct

    return ct.target.macOS15 if target == "macos" else ct.target.iOS18


def build_pte(model, tokenizer, target: str, preset: QuantPreset) -> bytes:
    """The .pte bytes for the (already quantized) `model` on `target`."""
    import executorch.kernels.quantized  # noqa: F401  (registers quantized embedding ops)
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    eps = export_methods(model, target)
    try:
        edge = to_edge_transform_and_lower(
            eps, partitioner=_partitioners(target, preset),
            constant_methods=constant_methods(model, tokenizer),
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        with torch.no_grad():
            prog = edge.to_executorch(ExecutorchBackendConfig(
                passes=[InitializedMutableBufferPass(list(CACHE_BUFFERS))],
                memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
                emit_mutable_buffer_names=True,
                do_quant_fusion_and_const_prop=True,
            ))
    except Exception as exc:
        raise ExportError(f"lowering to ExecuTorch ({backend_of(target)}) failed: {exc}") from exc
    return prog.buffer


def export_pte(model, tokenizer, path: str | Path, target: str = "desktop", preset: QuantPreset | None = None) -> Path:
    """Write the .pte for `model` (quantized copy, not the caller's) to `path`, atomically."""
    from .quantize import PRESETS, quantize_model

    preset = preset or PRESETS["fp32"]
    q = quantize_model(model, preset, target)
    path = Path(path)
    atomic_write_bytes(path, build_pte(q, tokenizer, target, preset))
    return path


def runtime_available(target: str) -> bool:
    """Whether the .pte of `target` can run on this machine (Core ML delegates need macOS)."""
    return backend_of(target) == "xnnpack" or sys.platform == "darwin"
