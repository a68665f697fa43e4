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

Every run also scores the untrained encoder (epoch 0: the same backbone and 1x1 fusion before
any step), with a memory bank of its own built the same way, on the same test images, so it shows
what training changed.

Offline CPU run in under a minute (ImageNet EfficientNet-Lite0 from its pip package, a generated
MVTec-style category; README.md gives its expected output):
    python patch_ae.py --synthetic --backbone efficientnet_lite0 --image-size 128 \
        --crop-size 128 --epochs 5
Full run, the paper's protocol (MVTec AD and torchvision's ImageNet weights; a GPU is advised):
    python patch_ae.py --data-root /path/to/mvtec_anomaly_detection --category screw
The paper reports 97.7 image AUROC on screw and 99.48 on average over MVTec AD: the paper's
numbers. Each run writes results.json, results.csv and report.html to --out (results.py,
report.py). Using a model on your own images (a threshold, model files, folder prediction) is
deploy.py.

Names: the paper's conv3 and conv4 are the backbone's stages at stride 8 and 16 (a ResNet's
layer2 and layer3), with c1 and c2 channels; the fusion maps c1 + c2 to c3 (Backbone says which
blocks for each backbone).

Assumptions where the paper is silent (docs/method.md gives the reasons, docs/training.md the
measurements):
- Preprocessing as in PatchCore: resize 256, centre crop 224, the backbone's own normalisation.
- Encoder fusion: conv4 upsampled bilinearly to conv3's grid; 1x1 convs c1+c2 -> c3 -> c3,
  c3 = (c1+c2)/3.
- Decoder hidden width c3, ReLU; it reconstructs the normalised augmented image.
- CutPaste with p = 0.5, then "normal" or "scar" with equal odds.
- Loss: alpha = 0.5; per-patch L2 norms (not squared) summed over patches (Eq. 3), averaged over
  the batch; norm() standardises each patch over its 3*8*8 values (eps 1e-6).
- Training: Adam, 50 epochs, batch 16, cosine decay to 0; the new layers at lr 1e-3, conv3 and
  conv4 at 0.1 x that, the stem (all before conv3) frozen, BatchNorm statistics frozen. The paper
  says "end to end"; this recipe is ours, chosen by measurement (lr on ImageNet EfficientNet-Lite0
  features, the rest on random networks).
- Protocol as the paper: all of train/good trains and fills the bank, the last epoch is kept.
- Memory bank: PatchCore's greedy coreset (10%) on a 128-d random projection, started as
  PatchCore's code starts it.
- kNN (Sec. 2.6, "as PatchCore"): k = 1, L2 distance; maps blurred as PatchCore (sigma 4).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.ndimage
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from sklearn.metrics import f1_score, roc_auc_score

import report
import results
from backbones import BACKBONES, Backbone, Normalized, load_backbone
from cli import Progress, UsageError, check, flag, parse_flags
from layouts import (Layout, find_categories, labelled_test_images, list_images, mvtec_categories,
                     open_image)
from synthetic import make_synthetic_category


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
                        "$TORCH_HOME/hub/checkpoints; efficientnet_lite0's from its pip "
                        "package), none (random) or a state_dict file", METHOD)
    feat_dim: int = flag(0, "c3, the feature size, < c1+c2; 0 = (c1+c2)/3", METHOD)
    fusion_init: str = flag("random", "how the two 1x1 fusion convs start (ours; the paper: not "
                            "stated): random (torch's), or pca: the training patches' principal "
                            "components", METHOD, choices=("random", "pca"))
    alpha: float = flag(0.5, "alpha of Eq. 3, in [0, 1]", METHOD)
    coreset_ratio: float = flag(0.1, "memory bank coreset fraction in (0, 1]", METHOD)
    image_score: str = flag("max", "max patch score (Sec. 2.6) or PatchCore's reweight", METHOD,
                            choices=("max", "reweight"))
    epochs: int = flag(50, "training epochs (the paper: not stated)", TRAINING)
    batch_size: int = flag(16, "training and inference batch size", TRAINING)
    lr: float = flag(1e-3, "Adam learning rate of the new layers", TRAINING)
    backbone_lr: float = flag(0.1, "conv3 and conv4's rate, times --lr (0 = frozen)", TRAINING)
    seed: list = flag(first_seed, "one or more seeds: mean +- std (default: 0)", TRAINING,
                      nargs="+", type=int, aliases=("--seeds",))
    device: str = flag("auto", "auto = cuda when present", OUTPUT, choices=("auto", "cpu", "cuda"))
    out: str = flag("", "output folder (default: runs/<category>__<seed>__<time>)", OUTPUT)
    overwrite: bool = flag(False, "allow writing into an --out folder that has results", OUTPUT)
    save_maps: int = flag(0, "write pictures of this many test images", OUTPUT)
    report_images: int = flag(12, "pictures in each gallery of report.html; 0 = no report", OUTPUT)


# ----------------------------------------------------------------------------------------------
# Data (Sec. 3): MVTec AD as it unpacks, each image resized and centre-cropped as PatchCore.
# layouts.py opens the files (deep greyscale, clear errors) and holds VisA and MVTec AD 2;
# synthetic.py makes the offline category (--synthetic) in this layout
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


MVTEC = Layout("mvtec", MVTEC_TREE, "https://www.mvtec.com/company/research/datasets/mvtec-ad",
               mvtec_categories, read_mvtec)


def load_category(root: Path, category: str, image_size: int, crop_size: int,
                  layout: Layout = MVTEC) -> Category:
    """One category of `layout`: its reader lists (image, label, mask) paths; this reads them."""
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
# normalised as the backbone was trained, from pixels in [0, 1]: ImageNet's mean (0.485, 0.456,
# 0.406) and std (0.229, 0.224, 0.225) for the ResNets; Lite0's (255 x - 127.5) / 128. The
# backbones, their weights and where each is cut: backbones.py
# ----------------------------------------------------------------------------------------------
def out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


class Encoder(Normalized):
    """(B, 3, H, W) -> R (B, c3, H/8, W/8): one feature vector per 8x8 image patch."""
    stride = 8

    def __init__(self, backbone: Backbone, feat_dim: int = 0):
        super().__init__()
        self.stem, self.conv3, self.conv4 = backbone.stem, backbone.conv3, backbone.conv4
        # the backbone's input normalisation: normalize() applies it, results.reconstruct
        # undoes it for the report's picture
        self.use_normalization(backbone)
        c12 = out_channels(self.conv3) + out_channels(self.conv4)  # c1 + c2
        self.feat_dim = feat_dim or c12 // 3
        if not 0 < self.feat_dim < c12:
            raise UsageError(f"--feat-dim {feat_dim}: must be below c1+c2 = {c12} for this "
                             f"backbone (Sec. 2.3)")
        self.fuse = nn.Sequential(nn.Conv2d(c12, self.feat_dim, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(self.feat_dim, self.feat_dim, 1), nn.ReLU(inplace=True))
        self.to(memory_format=torch.channels_last)  # the layout normalize() gives its input

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

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.normalize(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(x)                  # (B, c1+c2, h, w)


@torch.no_grad()
def fusion_from_features(fuse: nn.Sequential, rows: torch.Tensor) -> None:
    """--fusion-init pca (ours; the paper says nothing of how the fusion starts). rows: the raw
    features of the training patches (N, c1+c2). The first 1x1 conv becomes the projection on
    their c3 principal components, the second the identity, so training starts from the raw
    features' main directions rather than from a random projection whose ReLU drops about half
    of them. Each component is shifted so that the training patches lie one range above zero:
    the ReLUs then clip none of them, nor a test patch less than a range below them."""
    first, second = fuse[0], fuse[2]
    mean = rows.mean(0)                                                 # (C,)
    centred = rows - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred)                 # ascending eigenvalues
    v = vectors[:, -first.out_channels:].flip(1)                        # (C, c3), largest first
    low, high = (centred @ v).aminmax(dim=0)                            # (c3,) each
    first.weight.copy_(v.T[:, :, None, None])
    first.bias.copy_(-mean @ v - low + (high - low))
    second.weight.copy_(torch.eye(second.out_channels)[:, :, None, None])
    second.bias.zero_()


# ----------------------------------------------------------------------------------------------
# Decoder (Sec. 2.4): 1x1 conv, ReLU, 1x1 conv, so each feature vector rebuilds its own patch.
# It only teaches the encoder: scoring never uses it (results.reconstruct draws what it rebuilds)
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


# ----------------------------------------------------------------------------------------------
# Loss (Sec. 2.5, Eq. 3):
#   alpha * sum_p ||norm(I_hat_p) - norm(I_p)||_2 + (1 - alpha) * sum_p ||I_hat_p - I_p||_2
# ----------------------------------------------------------------------------------------------
NORM_EPS = 1e-6  # norm() divides by sqrt(var + eps); 1e-2 changed nothing measurable


def patch_loss(recon: torch.Tensor, target: torch.Tensor, alpha: float,
               stride: int = 8) -> torch.Tensor:
    """(B, 3, H, W) x 2 -> scalar: Eq. 3 summed over the P patches, averaged over the batch.
    Both images are in the backbone's normalised units (about 4 x a [0, 1] pixel for ImageNet's
    std), and a patch's terms are norms over its 192 values: so the loss is in the thousands."""
    p_hat = F.unfold(recon, stride, stride=stride).transpose(1, 2)  # Gamma (Eq. 2): (B, P, 3*s*s)
    p = F.unfold(target, stride, stride=stride).transpose(1, 2)

    def norm(v):  # Eq. 3's norm(): each patch standardised over its own 3*s*s values
        return (v - v.mean(-1, keepdim=True)) / (v.var(-1, keepdim=True) + NORM_EPS).sqrt()
    l_norm = (norm(p_hat) - norm(p)).norm(dim=-1).sum(1)   # (B,)
    l_pixel = (p_hat - p).norm(dim=-1).sum(1)              # (B,)
    return (alpha * l_norm + (1 - alpha) * l_pixel).mean()


# ----------------------------------------------------------------------------------------------
# Training (Sec. 2.5): on CutPaste-augmented normal images; the recipe ours (the paper gives none)
# ----------------------------------------------------------------------------------------------
def make_optimizer(model: PatchAE, cfg: Config) -> torch.optim.Adam:
    """Adam: --lr for the new layers (the 1x1 fusion convs, the decoder), --lr x --backbone-lr
    for the pretrained conv3 and conv4 (0: frozen). The stem (all before conv3: a ResNet's conv1
    and layer1) stays frozen:
    with it trained at the same rate the features collapsed (docs/training.md)."""
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
            x = model.encoder.normalize(x.to(device))
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
        out.append(encoder(encoder.normalize(batch.to(device).float() / 255)))
        progress.update(len(batch))
    return torch.cat(out)


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N*h*w, C): one row per image patch."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def greedy_coreset(features: torch.Tensor, n: int, proj_dim: int = 128, seed: int = 0,
                   n_starts: int = 10) -> torch.Tensor:
    """(N, D) -> LongTensor (n,) of rows that greedily cover the set (k-center): each step adds
    the row farthest from those chosen so far, on a 128-d random (Johnson-Lindenstrauss)
    projection. It starts as PatchCore's own code does (its ApproximateGreedyCoresetSampler):
    every row's mean (not squared) distance to `n_starts` random rows stands for its distance to
    the empty set; those rows are not added."""
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
# k by that fast distance, and the nearest k are chosen among them by the exact one.
KNN_CANDIDATES = 4  # contrived near-ties: 99 of 200 wrong picks without, 0 with (method.md)


def knn_scores(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
               block_mb: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, D) x (M, D) -> L2 distances (Q, k) to the k nearest bank rows and their indices (Q, k),
    nearest first (k is at most M). Brute force, as its meaning: torch.cdist(queries,
    bank).topk(k, largest=False), computed in blocks of KNN_QUERIES queries x as many bank rows
    as fit `block_mb` (0: KNN_BLOCK_MB), each block's nearest merged with the best so far, so
    memory stays flat; the final choice and its distances are exact (KNN_CANDIDATES)."""
    if not len(queries) or not len(bank):
        raise ValueError(f"knn_scores: {len(queries)} queries against a bank of {len(bank)} "
                         f"rows; both need at least one")
    queries, bank = queries.float(), bank.to(queries.device, torch.float32)
    block_mb = block_mb or KNN_BLOCK_MB.get(queries.device.type, 8)
    k = min(k, len(bank))
    c = min(k + KNN_CANDIDATES, len(bank))                              # candidates kept
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
        dists.append(exact)
        idxs.append(best_i.gather(1, j))
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
        r = encoder(encoder.normalize(batch.to(device).float() / 255))  # (B, C, h, w)
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


# ----------------------------------------------------------------------------------------------
# One run (Sec. 2.5-3): train, the memory bank, the untrained encoder beside it, the test set
# ----------------------------------------------------------------------------------------------
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
        untrained: bool = True) -> dict:
    """Train Patch AE on the normal images `train` (uint8 (N, 3, S, S)), then fill its memory bank
    from them with the trained encoder. With `untrained`, two baselines get a bank of their own,
    built the same way, to be scored beside it: the encoder as it was before the first step, and
    the backbone's raw features. `guard` (deploy.py, ours): on_epoch(epoch, model, seconds) during
    training, then finish(model) -> the epoch kept (it may load an earlier one). Returns the model
    as evaluate() takes it."""
    seed_everything(seed)
    model = PatchAE(load_backbone(cfg.backbone, cfg.weights), cfg.feat_dim)
    cfg.feat_dim = model.encoder.feat_dim  # c3 as built (0 = automatic): results.json keeps it
    backbone_only, t_raw = None, clock(device)
    if untrained or cfg.fusion_init == "pca":  # the backbone's features of the training images
        raw = extract_features(RawFeatures(model.encoder.to(device)), train, cfg.batch_size,
                               device, "raw features")                  # (N, c1+c2, h, w)
        if cfg.fusion_init == "pca":
            fusion_from_features(model.encoder.fuse, flatten_patches(raw))
        if untrained:  # its encoder is the untrained one's, whose backbone never trains
            backbone_only = {"bank": build_memory_bank(raw, cfg.coreset_ratio, seed),
                             "seconds": clock(device) - t_raw}
        del raw
    initial = copy.deepcopy(model.encoder) if untrained else None  # epoch 0, before any step
    if backbone_only is not None:
        backbone_only["encoder"] = RawFeatures(initial)
    t0 = clock(device)
    losses = train_patch_ae(model, train, cfg, device, guard.on_epoch if guard else None)
    kept = guard.finish(model) if guard else cfg.epochs  # the paper's: the last epoch
    t1 = clock(device)
    bank = memory_bank(model.encoder, train, cfg, seed, device)
    t2 = clock(device)
    print(f"memory bank {tuple(bank.shape)} ({cfg.coreset_ratio:g} coreset) in {t2 - t1:.1f}s; "
          f"training + bank {t2 - t0:.1f}s", flush=True)
    epoch0 = None
    if untrained and kept == 0:  # the kept encoder is the untrained one: nothing to build twice
        epoch0 = {"encoder": model.encoder, "bank": bank, "seconds": 0.0}
    elif untrained:
        epoch0 = {"encoder": initial.to(device),
                  "bank": memory_bank(initial, train, cfg, seed, device, "untrained encoder")}
        epoch0["seconds"] = clock(device) - t2
    return {"encoder": model.encoder, "decoder": model.decoder, "bank": bank, "untrained": epoch0,
            "raw_features": backbone_only,
            "selected_epoch": kept, "loss_by_epoch": losses, "n_train": len(train),
            "train_seconds": t2 - t0, "bank_seconds": t2 - t1}


def evaluate(cfg: Config, model: dict, data: Category,
             device: torch.device) -> tuple[dict, dict]:
    """The test set, scored by the trained encoder and its memory bank: the metrics, ms per image,
    F1 at the model's threshold (deploy.py's; None here), the decoder's PSNR on the normal test
    images. Then the untrained encoder with its own bank on the same images, for comparison
    only. Returns (result, scored: the image scores, maps and the untrained encoder's scores)."""
    t0 = clock(device)
    scores, maps = score_images(model["encoder"], model["bank"], data.test, cfg.batch_size,
                                device, cfg.image_score, desc="test")
    ms = (clock(device) - t0) / len(data.test) * 1000
    thr, both_classes = model.get("threshold"), len(np.unique(data.labels)) == 2
    f1 = float(f1_score(data.labels, scores >= thr)) if thr is not None and both_classes else None
    result = {**compute_metrics(data.labels, scores, data.masks, maps), "f1_at_threshold": f1,
              "ms_per_image": ms, "untrained": None, "untrained_seconds": None,
              "reconstruction_psnr": None}
    if model["decoder"] is not None:  # on the normal test images
        normal = data.test[torch.from_numpy(data.labels == 0)]
        result["reconstruction_psnr"] = results.reconstruction_psnr(
            model["encoder"], model["decoder"], normal, cfg.batch_size, device)
    epoch0, untrained_scores = model["untrained"], None
    if epoch0 is not None and epoch0["encoder"] is model["encoder"]:  # epoch 0 was kept
        untrained_scores, untrained_maps = scores, maps
    elif epoch0 is not None:
        t0 = clock(device)
        untrained_scores, untrained_maps = score_images(
            epoch0["encoder"], epoch0["bank"], data.test, cfg.batch_size, device,
            cfg.image_score, desc="test, untrained encoder")
        epoch0["seconds"] += clock(device) - t0
    if epoch0 is not None:
        result["untrained"] = compute_metrics(data.labels, untrained_scores, data.masks,
                                              untrained_maps)
        result["untrained_seconds"] = epoch0["seconds"]
    result["raw_features"], raw_scores = None, None
    if model.get("raw_features") is not None:
        raw, t0 = model["raw_features"], clock(device)
        raw_scores, raw_maps = score_images(raw["encoder"], raw["bank"], data.test,
                                            cfg.batch_size, device, cfg.image_score,
                                            desc="test, raw features")
        result["raw_features"] = {**compute_metrics(data.labels, raw_scores, data.masks, raw_maps),
                                  "seconds": raw["seconds"] + clock(device) - t0}
    return result, {"scores": scores, "maps": maps, "untrained_scores": untrained_scores,
                    "raw_scores": raw_scores}


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


def check_config(cfg: Config) -> None:
    """Raises UsageError, naming the flag, for a value that makes no sense."""
    check([(cfg.epochs >= 0, "--epochs must be >= 0"),
           (cfg.batch_size >= 1, "--batch-size must be >= 1"),
           (cfg.lr > 0, "--lr must be > 0"),
           (cfg.backbone_lr >= 0, "--backbone-lr must be >= 0 (0 = frozen)"),
           (0 <= cfg.alpha <= 1, "--alpha must be in [0, 1]"),
           (0 < cfg.coreset_ratio <= 1, "--coreset-ratio must be in (0, 1]"),
           (cfg.crop_size >= 32 and cfg.crop_size % 8 == 0,
            "--crop-size must be a multiple of 8, at least 32"),
           (cfg.image_size >= cfg.crop_size, "--image-size must be >= --crop-size"),
           (cfg.feat_dim >= 0, "--feat-dim must be >= 0 (0 = automatic)"),
           (cfg.save_maps >= 0, "--save-maps must be >= 0"),
           (cfg.report_images >= 0, "--report-images must be >= 0")])


def make_config(values: dict, given: set, config: type = Config):
    """Parsed flag values (other keys ignored, missing fields at their defaults) -> the checked
    `config`, --synthetic resolved. `given`: the flags on the command line."""
    fields = dataclasses.fields(config)
    cfg = config(**{f.name: values[f.name] for f in fields if f.name in values})
    check_config(cfg)
    if cfg.synthetic:
        if "category" in given:
            raise UsageError("--synthetic makes its own category; drop --category")
        cfg.category = "synthetic"
        if "data_root" not in given:
            cfg.data_root = "./synthetic_mvtec"
    return cfg


def categories_and_seeds(cfg: Config, root: Path, layout: Layout = MVTEC):
    """Yields (category, seed, data) for every run the flags ask for, each category read once."""
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


def test_run(cfg: Config, layout: str, category: str, seed: int, data: Category, model: dict,
             device: torch.device, out: Path) -> tuple[dict, str | None]:
    """Scores the test set with the trained encoder (the untrained one beside it), prints the
    result line, writes the --save-maps pictures. Returns the record and report.html's section
    (None without a report)."""
    result, scored = evaluate(cfg, model, data, device)
    r = results.record(cfg, layout, category, seed, data, model, result, device)
    print(report.result_line(r), flush=True)
    if result["untrained_seconds"]:
        print(f"untrained encoder: its bank and the test set in "
              f"{result['untrained_seconds']:.1f}s", flush=True)
    scored["scale"] = results.colour_scale(model, scored["maps"], data.labels)
    results.save_maps(cfg.save_maps, model, data, scored, device, out)
    section = None
    if cfg.report_images:
        section = results.report_run(r, model, data, scored, cfg.report_images, device)
    return r, section


def run(cfg: Config) -> list[dict]:
    """The paper's protocol on each category and seed: train, bank, test; then results and
    report. Returns the records."""
    device, out, root = pick_device(cfg.device), results.output_folder(cfg), Path(cfg.data_root)
    if cfg.synthetic:
        make_synthetic_category(root)
    results.print_header(cfg, device, cfg.weights)
    runs, sections = [], []
    for category, seed, data in categories_and_seeds(cfg, root):
        print(f"training on all {len(data.train)} train/good images", flush=True)
        model = fit(cfg, data.train, seed, device)
        # nothing held out, as deploy.py --holdout 0 records it
        model.update(protocol=results.paper_protocol(cfg, len(data.train)), n_holdout=0)
        print(f"protocol: {model['protocol']}", flush=True)
        r, section = test_run(cfg, MVTEC.name, category, seed, data, model, device, out)
        runs.append(r)
        sections.append(section)
    table = report.table_section(*results.write_results(runs, MVTEC.name, out))
    results.write_report(cfg, out, cfg.category, cfg.weights, device, [table, *sections])
    return runs


def main(argv=None) -> list[dict]:
    try:
        values, given = parse_flags(Config, argv, __doc__.split("\n")[0], EXAMPLES)
        return run(make_config(values, given))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
