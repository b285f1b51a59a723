"""Core ML packages (`.mlpackage`) for Swift apps: one per exported method, the towers first.

`vision_encoder.mlpackage` (vision tower + connector) and `text_decoder.mlpackage` (the decoder
with its KV cache as Core ML state: `torch.export` -> `run_decompositions({})` -> `ct.convert`
with iOS 18 / macOS 15 as minimum target) are the two towers; `token_embedding`,
`retrieval_query` and `rag_connector` are small packages so a Swift app needs nothing else.
If the stateful decoder does not convert, a stateless one is written instead: every cache is
an input and its updated copy an output (`k_cache_0`, ... -> `k_cache_0_out`, ...).
Conversion and spec read-back work on Linux; prediction needs macOS.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from .executorch_export import ExportError, coreml_deployment_target
from .methods import (METHOD_NAMES, TEXT_DECODER, VISION_ENCODER, build_methods, dynamic_shapes, method_specs,
                      sample_inputs)
from .quantize import QuantPreset

TOWERS = (VISION_ENCODER, TEXT_DECODER)


def _ct_inputs(spec, stateless_caches: list[tuple[str, tuple]] = ()):
    import coremltools as ct
    import numpy as np

    dims = {k: ct.RangeDim(lo, hi, default=lo) for k, (lo, hi) in spec.dims.items()}
    out = []
    for t in spec.inputs:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in t.shape)
        out.append(ct.TensorType(name=t.name, shape=shape, dtype=np.float32 if t.dtype == "float32" else np.int32))
    for name, shape in stateless_caches:
        out.append(ct.TensorType(name=name, shape=shape, dtype=np.float32))
    return out


class StatelessDecoder(nn.Module):
    """`(embeds, input_pos, *caches) -> (logits, *updated caches)`: the KV cache passed in and out."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.names = [f"layers.{i}.self_attn.{c}" for i in range(len(lm.layers)) for c in ("k_cache", "v_cache")]

    def forward(self, embeds, input_pos, *caches):
        caches = [c.clone() for c in caches]
        logits = torch.func.functional_call(self.lm, dict(zip(self.names, caches)), (embeds, input_pos))
        return (logits[:, -1], *caches)


def cache_io_names(n_layers: int) -> list[str]:
    return [f"{c}_{i}" for i in range(n_layers) for c in ("k_cache", "v_cache")]


def convert_method(model, name: str, out: Path, target: str, preset: QuantPreset, *, stateful: bool = True):
    """Convert one method of the (already quantized) `model` and save it to `out`.
    Returns the coremltools MLModel."""
    import coremltools as ct

    spec = method_specs(model.cfg)[name]
    methods = build_methods(model)
    module = methods[name]
    args = sample_inputs(spec, vocab=model.cfg.lm.vocab_size)
    ds = dynamic_shapes(spec)
    caches = []
    if name == TEXT_DECODER and not stateful:
        lm = model.lm
        shapes = [tuple(l.self_attn.k_cache.shape) for l in lm.layers for _ in range(2)]
        caches = list(zip(cache_io_names(len(lm.layers)), shapes))
        module = StatelessDecoder(lm).eval()
        args = args + tuple(torch.zeros(s) for s in shapes)
        ds = (*ds, tuple(None for _ in shapes))  # *caches is one varargs entry
    outputs = [ct.TensorType(name=t.name) for t in spec.outputs] + [ct.TensorType(name=f"{c}_out") for c, _ in caches]
    with torch.no_grad():
        ep = torch.export.export(module, args, dynamic_shapes=ds, strict=False).run_decompositions({})
    mlmodel = ct.convert(
        ep, inputs=_ct_inputs(spec, caches), outputs=outputs, convert_to="mlprogram",
        minimum_deployment_target=coreml_deployment_target(target),
        compute_precision=ct.precision.FLOAT16 if preset.coreml_precision == "fp16" else ct.precision.FLOAT32,
        skip_model_load=True,
    )
    mlmodel.short_description = f"TinyAlign {name} ({preset.name})"
    mlmodel.save(str(out))
    return mlmodel


def describe_package(path: Path) -> dict:
    """Inputs, outputs, states, shapes and precision of a saved .mlpackage, read back from its spec."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    ft = ct.proto.FeatureTypes_pb2.ArrayFeatureType

    def feature(f):
        a = f.type.multiArrayType
        d = {"name": f.name, "dtype": ft.ArrayDataType.Name(a.dataType).lower()}
        if a.HasField("shapeRange"):
            d["shape"] = [[r.lowerBound, r.upperBound] if r.lowerBound != r.upperBound else r.lowerBound
                          for r in a.shapeRange.sizeRanges]
        else:
            d["shape"] = list(a.shape)
        return d

    def state(s):
        a = s.type.stateType.arrayType
        return {"name": s.name, "dtype": ft.ArrayDataType.Name(a.dataType).lower(), "shape": list(a.shape)}

    return {
        "inputs": [feature(f) for f in spec.description.input],
        "outputs": [feature(f) for f in spec.description.output],
        "states": [state(s) for s in spec.description.state],
        "spec_version": spec.specificationVersion,
    }


def export_coreml(model, folder: Path, target: str, preset: QuantPreset, *, stateful: bool = True) -> dict:
    """Write `<method>.mlpackage` for every method into `folder`; returns per-package info for the
    manifest. A failing stateful decoder conversion falls back to the stateless form."""
    import coremltools as ct

    info = {}
    for name in METHOD_NAMES:
        out = folder / f"{name}.mlpackage"
        kind = "stateless" if name == TEXT_DECODER and not stateful else ("stateful" if name == TEXT_DECODER else "plain")
        note = None
        try:
            convert_method(model, name, out, target, preset, stateful=kind != "stateless")
        except Exception as exc:
            if name != TEXT_DECODER or kind == "stateless":
                raise ExportError(f"Core ML conversion of {name!r} failed: {exc}") from exc
            shutil.rmtree(out, ignore_errors=True)
            note = f"stateful conversion failed ({type(exc).__name__}: {exc}); wrote the stateless form"
            kind = "stateless"
            try:
                convert_method(model, name, out, target, preset, stateful=False)
            except Exception as exc2:
                raise ExportError(f"Core ML conversion of {name!r} failed, stateful ({exc}) and "
                                  f"stateless ({exc2})") from exc2
        d = describe_package(out)
        d.update(file=out.name, kind=kind, compute_precision=preset.coreml_precision,
                 minimum_deployment_target="macOS15" if target == "macos" else "iOS18",
                 coremltools_version=ct.__version__)
        if note:
            d["note"] = note
        info[name] = d
    return info
