"""Export: quantize a TinyAlign checkpoint, lower it to ExecuTorch (XNNPACK or Core ML) and Core ML
packages, check the result against eager PyTorch, and write a bundle beside its memory bank.

`export_bundle(**kwargs)` is the entry point (its keywords match the `tinyalign-export` flags);
docs/bundle.md is the bundle format and the contract every runtime follows.
"""

from .bundle import DriftError, export_bundle, verify_bundle
from .executorch_export import TARGETS, ExportError
from .methods import METHOD_NAMES, method_specs
from .quantize import PRESETS, QuantizeError, get_preset, quantize_model

__all__ = ["export_bundle", "verify_bundle", "ExportError", "DriftError", "QuantizeError", "TARGETS", "PRESETS",
           "METHOD_NAMES", "method_specs", "get_preset", "quantize_model"]
