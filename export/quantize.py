"""Named quantization presets, chosen per component (linears, embeddings, Core ML compute precision).

A preset names what happens to each kind of layer (optimum-executorch's `--qlinear` /
`--qembedding`), applied with torchao's `quantize_` to a *copy* of the model: deploy-time
transforms never mutate the caller's model. Only the generation path is quantized: the LM
(decoder linears, lm_head, token table), the connector and the RAG connector. The vision tower
and the key encoder stay fp32 because the memory bank's keys were computed by them in fp32;
quantizing them would move every query away from the keys it has to find.

What each backend can run decides the scheme actually applied (`QuantPreset.scheme(target)`,
stored in the manifest):
- XNNPACK (desktop, android) has no weight-only linear in ExecuTorch 1.5.1 (a dequantized
  weight feeding a float linear is taken for a static-quantized linear and computes garbage,
  and outside the delegate `torchao::dequantize_affine` has no runtime kernel: "Missing out
  variants", as in huggingface/optimum-executorch#182), so `8w` runs there as 8-bit dynamic
  activations + 8-bit per-channel weights. `8da4w` is native.
- Core ML (ios, macos) has no dynamic activation quantization, so `8da4w` runs there as 4-bit
  weight-only linears in groups of 32; `8w` is weight-only int8. `fp16` sets Core ML's compute
  precision and is refused on XNNPACK targets.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

GROUP_SIZE = 32
# Module-name prefixes (inside TinyAlignVLM) that non-fp32 presets quantize.
QUANTIZED_PARTS = ("lm.", "connector.", "rag_connector.")
COREML_TARGETS = ("ios", "macos")
XNNPACK_TARGETS = ("desktop", "android")


class QuantizeError(ValueError):
    pass


@dataclass(frozen=True)
class QuantPreset:
    name: str
    linear_bits: int | None  # weight bits of linears (None: float)
    linear_group: int | None  # group size (None: per output channel)
    embedding_bits: int | None  # weight bits of embedding tables (None: float)
    coreml_precision: str  # "fp32" | "fp16": Core ML compute precision
    min_token_agreement: float  # export fails below this greedy-token agreement, unless allow_drift
    max_abs_diff: float | None  # per-method limit vs eager fp32 (None: reported only)
    xnnpack: bool = True  # usable on desktop / android
    description: str = ""

    @property
    def quantizes(self) -> bool:
        return self.linear_bits is not None or self.embedding_bits is not None

    def scheme(self, target: str) -> dict:
        """What is applied on `target` (for the manifest)."""
        coreml = target in COREML_TARGETS
        linear = None
        if self.linear_bits is not None:
            gran = f"groups of {self.linear_group}" if self.linear_group else "per channel"
            act = "float activations" if coreml else "int8 dynamic activations"
            linear = f"int{self.linear_bits} weights ({gran}), {act}"
        return {
            "preset": self.name,
            "description": self.description,
            "linear": linear,
            "embedding": f"int{self.embedding_bits} weights (per row)" if self.embedding_bits else None,
            "coreml_compute_precision": self.coreml_precision if coreml else None,
            "quantized_parts": [p.rstrip(".") for p in QUANTIZED_PARTS] if self.quantizes else [],
            "float_parts": ["vision", "key_encoder"] if self.quantizes else [],
            "min_token_agreement": self.min_token_agreement,
            "max_abs_diff": self.max_abs_diff,
        }


PRESETS: dict[str, QuantPreset] = {
    "fp32": QuantPreset("fp32", None, None, None, "fp32", 1.0, 1e-4,
                        description="no quantization, float32 everywhere"),
    "8w": QuantPreset("8w", 8, None, None, "fp32", 0.5, None,
                      description="8-bit per-channel weights for linears"),
    "8da4w": QuantPreset("8da4w", 4, GROUP_SIZE, 8, "fp32", 0.5, None,
                         description=f"8-bit dynamic activations + 4-bit weights in groups of {GROUP_SIZE} "
                                     "for linears, 8-bit embeddings"),
    "fp16": QuantPreset("fp16", None, None, None, "fp16", 0.5, None, xnnpack=False,
                        description="Core ML float16 compute precision (ios / macos only)"),
}


def get_preset(name: str, target: str | None = None) -> QuantPreset:
    """The preset called `name`, checked against `target`; errors list the valid choices."""
    if name not in PRESETS:
        raise QuantizeError(f"unknown quantization preset {name!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    if target is not None and target not in COREML_TARGETS and not p.xnnpack:
        raise QuantizeError(
            f"quantization preset {name!r} is a Core ML compute precision and only applies to "
            f"{' / '.join(COREML_TARGETS)}; for target {target!r} choose one of: "
            f"{', '.join(n for n, q in PRESETS.items() if q.xnnpack)}"
        )
    return p


def _in_parts(fqn: str) -> bool:
    return any(fqn.startswith(p) for p in QUANTIZED_PARTS)


def quantize_model(model: nn.Module, preset: QuantPreset | str, target: str = "desktop") -> nn.Module:
    """A quantized deep copy of `model` for `target`; `model` itself is left untouched.
    fp32 / fp16 return a plain copy (fp16 is applied by the Core ML converter)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    preset = get_preset(preset, target) if isinstance(preset, str) else preset
    q = copy.deepcopy(model).eval()
    coreml = target in COREML_TARGETS
    with torch.no_grad():
        if preset.embedding_bits:
            # Tied tables: this replaces the Parameter of the embedding module only; lm_head keeps
            # its own (float or separately quantized) copy, which is what each side needs.
            quantize_(q, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{preset.embedding_bits}"),
                                              granularity=PerAxis(0)),
                      filter_fn=lambda m, fqn: isinstance(m, nn.Embedding) and _in_parts(fqn))
        if preset.linear_bits:
            group = preset.linear_group
            wdtype = getattr(torch, f"int{preset.linear_bits}")
            gran = PerGroup(group) if group else PerAxis(0)
            if coreml:
                cfg = IntxWeightOnlyConfig(weight_dtype=wdtype, granularity=gran)
            else:
                cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=wdtype, weight_granularity=gran)

            def is_target_linear(m, fqn):
                return (isinstance(m, nn.Linear) and _in_parts(fqn)
                        and (group is None or m.in_features % group == 0))

            quantize_(q, cfg, filter_fn=is_target_linear)
    return q


def count_quantized(model: nn.Module) -> dict[str, int]:
    """How many linears / embeddings carry a quantized (torchao tensor subclass) weight."""
    out = {"linear": 0, "embedding": 0}
    for m in model.modules():
        kind = "linear" if isinstance(m, nn.Linear) else "embedding" if isinstance(m, nn.Embedding) else None
        if kind and type(m.weight) not in (torch.Tensor, nn.Parameter):
            out[kind] += 1
    return out
