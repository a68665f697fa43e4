"""Patch AE: "Patch-wise Auto-Encoder for Visual Anomaly Detection" (Cui, Liu, Lian), one file.

Idea (Sec. 1-2): a classic auto-encoder is trained on normal images and hopes to FAIL on defects.
Patch AE does the opposite: it trains an encoder to reconstruct every image patch, artificial
CutPaste defects included, from that patch's own feature vector. The encoder's features then
describe defects well, and a test patch is scored by its distance to the nearest feature of the
normal training images (a memory bank, as in PatchCore).

    image --CutPaste(p=0.5)--> encoder (WideResNet-101 conv1..layer3, layer2 + up(layer3),
    two 1x1 conv+ReLU) --> R (B, c3, H/8, W/8) --> decoder (1x1 conv, ReLU, 1x1 conv, pixel
    shuffle) --> one 8x8 patch per feature vector --> hybrid patch loss (Eq. 3)
    test: ||R_test - nearest(memory bank)||_2 per patch --> anomaly map, image score = max

Offline CPU run in about a minute (random-init resnet18 on a generated MVTec-style category; README.md
gives its expected output):
    python patch_ae.py --synthetic --backbone resnet18 --weights none --image-size 128 \
        --crop-size 128 --epochs 5
Full run (needs MVTec AD and the ImageNet weights, a GPU is strongly advised):
    python patch_ae.py --data-root /path/to/mvtec_anomaly_detection --category screw
VisA and MVTec AD 2 as they unpack: add --dataset visa or --dataset mvtec2. Each run writes
results.json, results.csv and report.html (curves, ROC, the images scored right and wrong) to --out.
The paper reports 97.7 image AUROC on screw and 99.48 on average over MVTec AD: the paper's numbers.

Assumptions where the paper is silent (docs/method.md gives the reasons, docs/training.md the measurements):
- Preprocessing as in PatchCore: resize 256, centre crop 224, ImageNet normalisation (all datasets).
- Encoder fusion: layer3 upsampled bilinearly to layer2's grid; 1x1 convs c1+c2 -> c3 -> c3, c3 = (c1+c2)/3.
- Decoder hidden width c3, ReLU; it reconstructs the ImageNet-normalised augmented image.
- CutPaste with p = 0.5, then "normal" or "scar" with equal odds (CutPaste-3way's two augmentations).
- Loss: alpha = 0.5; per-patch L2 norms (not squared) summed over patches (Eq. 3), averaged over the batch; norm()
  standardises each patch over its 3*8*8 values, prediction and target alike (eps 1e-6).
- Training (chosen by measurement): Adam, 50 epochs, batch 16, BatchNorm statistics frozen; the new 1x1
  layers at lr 1e-4, layer2/layer3 at 0.1 x that, the stem frozen, cosine decay to 0.
- Validation: 10% of train/good held out, each image also with a drawn scratch, blob and stain, scored
  against a bank of the current encoder's features at epoch 0, every k-th epoch (k chosen so that
  validation costs about 15% of training) and after the last; the best mean of image and pixel AUROC
  is kept (a later epoch must beat it by 0.01). --holdout 0 --select last is the paper's protocol.
- Memory bank: PatchCore's greedy coreset (10%) on a 128-d random projection, official start.
- kNN (Sec. 2.6, "as PatchCore"): k = 1, L2 (PatchCore's Eq. 6; its code squares it), in blocks.
- Threshold: 0.99 quantile of the held-out normal images' scores.
"""
from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import html
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

BACKBONES = ("wide_resnet101_2", "wide_resnet50_2", "resnet50", "resnet18")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("mvtec", "visa", "mvtec2")  # --dataset: MVTec AD, VisA, MVTec AD 2, each as it unpacks


class UsageError(Exception):
    """Bad input: main() prints it as one line and exits with code 2, no traceback."""


def flag(default, help: str, **argparse_options):
    """A Config field and its command-line flag: the default (a function: called for each Config), the
    --help text, other argparse options."""
    meta = {"help": help, **argparse_options}
    return field(default_factory=default, metadata=meta) if callable(default) else field(default=default, metadata=meta)


@dataclass
class Config:
    data_root: str = flag(lambda: os.environ.get("MVTEC_ROOT", "./mvtec_anomaly_detection"),
                          "dataset root (default: $MVTEC_ROOT, else ./mvtec_anomaly_detection)")
    dataset: str = flag("mvtec", "layout of --data-root as it unpacks: 'mvtec' (MVTec AD), 'visa' (VisA, split by "
                        "split_csv/1cls.csv), 'mvtec2' (MVTec AD 2)", choices=DATASETS)
    category: str = flag("screw", "category folder under --data-root (VisA: an object of split_csv/1cls.csv), or 'all'")
    synthetic: bool = flag(False, "generate and use the offline MVTec-style category 'synthetic' (in ./synthetic_mvtec "
                           "unless --data-root is given)")
    backbone: str = flag("wide_resnet101_2", "encoder backbone (Sec. 2.3)", choices=BACKBONES)
    weights: str = flag("imagenet", "backbone init: 'imagenet' (torchvision IMAGENET1K_V1, read from "
                        "$TORCH_HOME/hub/checkpoints when offline), 'none' (random init), or a state_dict file")
    image_size: int = flag(256, "resize the shorter side to this (PatchCore: 256)")
    crop_size: int = flag(224, "centre crop, a multiple of 8 (PatchCore: 224)")
    epochs: int = flag(50, "training epochs (paper: not stated)")
    batch_size: int = flag(16, "training and inference batch size")
    lr: float = flag(1e-4, "Adam learning rate of the new layers (paper: not stated)")
    backbone_lr: float = flag(0.1, "learning rate of the pretrained backbone layers as a multiple of --lr (0 = frozen)")
    freeze: str = flag("stem", "pretrained stages kept frozen: none, stem (conv1 + layer1), or stem and layer2",
                       choices=("none", "stem", "layer2"))
    lr_schedule: str = flag("cosine", "'cosine' decay to 0 over --epochs or 'constant'", choices=("constant", "cosine"))
    clip_grad: float = flag(0.0, "clip the gradients' total L2 norm to this; 0 = off")
    norm_eps: float = flag(1e-6, "eps of norm() in Eq. 3: patch standardisation divides by sqrt(var + eps)")
    select: str = flag("best", "encoder kept after training: 'best' validation score (epoch 0 included) or 'last' "
                       "epoch", choices=("best", "last"))
    val_tolerance: float = flag(0.01, "with --select best, a later epoch replaces the kept one only if its validation "
                                "score is higher by more than this (near-ties keep the earlier, less trained encoder)")
    val_every: int = flag(0, "validate every this many epochs (and before the first and after the last); 0 = chosen "
                          "after the first epoch from the measured seconds of one validation and one epoch")
    val_budget: float = flag(0.15, "with --val-every 0: validation's target share of the training time")
    alpha: float = flag(0.5, "alpha in Eq. 3, weight of the patch-normalised term, in [0, 1]")
    feat_dim: int = flag(0, "c3, feature size after the 1x1 convs (Sec. 2.3), < c1+c2; 0 = (c1+c2)/3")
    coreset_ratio: float = flag(0.1, "memory bank coreset fraction in (0, 1]; 1 keeps all")
    image_score: str = flag("max", "image score: 'max' patch score (Sec. 2.6) or PatchCore's 'reweight' (k=9)",
                            choices=("max", "reweight"))
    knn_memory_mb: int = flag(0, "memory budget of one kNN distance block, MB; 0 = 8 on CPU, 256 on CUDA")
    holdout: float = flag(0.1, "fraction of train/good held out to fit the threshold, in [0, 1); 0 = no threshold")
    threshold_quantile: float = flag(0.99, "threshold = this quantile of the held-out normal images' scores, in (0, 1]")
    device: str = flag("auto", "auto = cuda when present", choices=("auto", "cpu", "cuda"))
    seed: list = flag(lambda: [0], "one or more seeds (--seeds 0 1 2 runs each and reports mean +- std)", nargs="+",
                      type=int, aliases=("--seeds",))
    out: str = flag("", "output folder (default: runs/<category>__<seed>__<time>)")
    overwrite: bool = flag(False, "allow writing into an --out folder that has results")
    save: str = flag("", "write the model (encoder, memory bank, threshold) to this file")
    load: str = flag("", "skip training: score with a model file made by --save")
    predict: str = flag("", "score every image under this folder into predictions.csv")
    save_maps: int = flag(0, "write heatmap PNGs for this many test images")
    report_images: int = flag(12, "images in each gallery of report.html (top-scoring defects, false alarms, "
                              "misses); 0 = no report")


def add_config_flags(p: argparse.ArgumentParser, suppress_defaults: bool = False, exclude: tuple = ()) -> None:
    """One typed flag per Config field but those in `exclude` (bench.py adds Patch AE's flags this way)."""
    for f in dataclasses.fields(Config):
        if f.name in exclude:
            continue
        md, names = dict(f.metadata), ["--" + f.name.replace("_", "-")]
        names += list(md.pop("aliases", ()))
        if f.type == "bool":  # annotations are strings here (from __future__ import annotations)
            p.add_argument(*names, dest=f.name, action="store_true", **md)
            continue
        md.setdefault("type", {"int": int, "float": float}.get(f.type, str))
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        p.add_argument(*names, dest=f.name, **({} if suppress_defaults else {"default": default}), **md)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """argparse from Config: one typed flag per field. With suppress_defaults only given flags appear."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                argument_default=argparse.SUPPRESS if suppress_defaults else None)
    add_config_flags(p, suppress_defaults)
    return p


def check_config(cfg: Config) -> None:
    """Raises UsageError, naming the flag, for a value that makes no sense."""
    checks = [(cfg.epochs >= 0, "--epochs must be >= 0"), (cfg.batch_size >= 1, "--batch-size must be >= 1"),
              (cfg.lr > 0, "--lr must be > 0"), (cfg.backbone_lr >= 0, "--backbone-lr must be >= 0 (0 = frozen)"),
              (cfg.clip_grad >= 0, "--clip-grad must be >= 0 (0 = off)"), (cfg.norm_eps > 0, "--norm-eps must be > 0"),
              (cfg.val_every >= 0, "--val-every must be >= 0 (0 = automatic)"),
              (cfg.val_budget > 0, "--val-budget must be > 0"), (cfg.val_tolerance >= 0, "--val-tolerance must be >= 0"),
              (0 <= cfg.alpha <= 1, "--alpha must be in [0, 1]"),
              (0 < cfg.coreset_ratio <= 1, "--coreset-ratio must be in (0, 1]"),
              (0 <= cfg.holdout < 1, "--holdout must be in [0, 1)"),
              (0 < cfg.threshold_quantile <= 1, "--threshold-quantile must be in (0, 1]"),
              (cfg.crop_size >= 32 and cfg.crop_size % 8 == 0, "--crop-size must be a multiple of 8, at least 32"),
              (cfg.image_size >= cfg.crop_size, "--image-size must be >= --crop-size"),
              (cfg.feat_dim >= 0, "--feat-dim must be >= 0 (0 = automatic)"),
              (cfg.knn_memory_mb >= 0, "--knn-memory-mb must be >= 0 (0 = automatic)"),
              (cfg.save_maps >= 0, "--save-maps must be >= 0"), (cfg.report_images >= 0, "--report-images must be >= 0"),
              (not (cfg.save and cfg.load), "--save and --load together: a loaded model has nothing new to save")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def make_config(values: dict, given: set) -> Config:
    """Parsed flag values (other keys ignored, missing fields at their defaults) -> the checked Config,
    --synthetic resolved. `given`: the flags on the command line."""
    cfg = Config(**{f.name: values[f.name] for f in dataclasses.fields(Config) if f.name in values})
    check_config(cfg)
    if cfg.synthetic:
        if "category" in given:
            raise UsageError("--synthetic makes its own category; drop --category")
        if cfg.dataset != "mvtec":
            raise UsageError(f"--synthetic writes MVTec AD's layout; drop --dataset {cfg.dataset}")
        cfg.category = "synthetic"
        if "data_root" not in given:
            cfg.data_root = "./synthetic_mvtec"
    return cfg


def parse_config(argv=None) -> tuple[Config, set]:
    """Returns the checked config and the names of the flags given on the command line."""
    values = vars(build_parser().parse_args(argv))
    given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    return make_config(values, given), given


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


class Progress:
    """Prints 'desc: done/total, rate, ETA' at most every `every` seconds, and once at the end
    unless final=False (when the caller prints its own summary); nothing when desc is empty."""

    def __init__(self, desc: str, total: int, unit: str = "it", every: float = 2.0, final: bool = True):
        self.desc, self.total, self.unit, self.every, self.final = desc, total, unit, every, final
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.desc and (now - self.last >= self.every or (self.final and self.done >= self.total)):
            self.last, rate = now, self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"  {self.desc}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, ETA {eta:.0f}s",
                  flush=True)


# ----------------------------------------------------------------------------------------------
# Data (Sec. 3: MVTec AD): MVTec AD, VisA and MVTec AD 2 as they unpack; a synthetic MVTec-style category
# ----------------------------------------------------------------------------------------------
MVTEC_TREE = ("ROOT/<category>/train/good/*.png, ROOT/<category>/test/<good|defect_type>/*.png, "
              "ROOT/<category>/ground_truth/<defect_type>/<name>_mask.png (optional)")
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_TREE = (f"ROOT/{VISA_CSV.as_posix()} (header object,split,label,image,mask; split train|test; label "
             "normal|anomaly; paths relative to ROOT), ROOT/<object>/Data/Images/{Normal,Anomaly}/*.JPG, "
             "ROOT/<object>/Data/Masks/Anomaly/*.png")
MVTEC2_TREE = ("ROOT/<category>/train/good/*.png, ROOT/<category>/validation/good/*.png, "
               "ROOT/<category>/test_public/{good,bad}/*.png, "
               "ROOT/<category>/test_public/ground_truth/bad/<name>_mask.png")
LAYOUTS = {"mvtec": MVTEC_TREE, "visa": VISA_TREE, "mvtec2": MVTEC2_TREE}
DATASET_URLS = {"mvtec": "https://www.mvtec.com/company/research/datasets/mvtec-ad",
                "visa": "https://github.com/amazon-science/spot-diff",
                "mvtec2": "https://www.mvtec.com/company/research/datasets/mvtec-ad-2"}


def read_image(path: Path, image_size: int, crop_size: int, mask: bool = False) -> torch.Tensor:
    """File -> uint8 (3, crop, crop) RGB, or bool (crop, crop) for a mask. Resize the shorter side, centre
    crop: on a wide image (VisA's are about 1500 x 1000) the crop drops the sides. Deep greyscale (16-bit,
    32-bit 'I' as which older Pillow opens 16-bit PNGs, float 'F') is brought to 8 bit first."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{path}: cannot decode this image ({e}); replace or remove the file") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():  # min-max scaling would turn the whole image into NaN, then black
            raise UsageError(f"{path}: holds NaN or infinite pixel values; replace or remove the file")
        lo, hi = a.min(), a.max()
        if mask:                           # a mask pixel is a defect when it is non-zero, at any depth
            a = (a > 0) * 255.0
        elif img.mode != "F":              # integers: the full 16-bit range, the same for every image, 65535 -> 255
            a = a / 257.0
        elif lo >= 0 and hi <= 1:          # floats in [0, 1]
            a = a * 255.0
        else:                              # any other floats: min-max per image, there is no common range
            a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
    img = img.convert("L" if mask else "RGB")
    interp = TF.InterpolationMode.NEAREST if mask else TF.InterpolationMode.BILINEAR
    img = TF.center_crop(TF.resize(img, image_size, interpolation=interp), crop_size)
    t = TF.pil_to_tensor(img)
    return t[0] > 0 if mask else t


def list_images(folder: Path, layout: str = "") -> list[Path]:
    """The images in `folder`, sorted; with `layout`, none is an error that names the expected layout."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []
    if layout and not paths:
        raise UsageError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}); expected {layout}")
    return paths


def find_categories(root: Path, dataset: str = "mvtec") -> list[str]:
    if not root.is_dir():
        raise UsageError(f"--data-root {root}: folder not found; expected {LAYOUTS[dataset]} (--dataset {dataset}). "
                         f"Get it from {DATASET_URLS[dataset]} and pass --data-root (or set MVTEC_ROOT), "
                         f"or run with --synthetic")
    if dataset == "visa":
        return sorted({row["object"] for row in visa_rows(root)})
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


@dataclass
class Category:
    train: torch.Tensor            # (N, 3, S, S) uint8, train/good
    test: torch.Tensor             # (M, 3, S, S) uint8
    labels: np.ndarray             # (M,) 1 = defect
    masks: torch.Tensor | None     # (M, S, S) bool, None when no test image has a mask
    test_paths: list[Path]
    validation: torch.Tensor | None = None  # (V, 3, S, S) uint8: held-out normal images the dataset provides


def labelled_test_images(test_dir: Path, gt_dir: Path, layout: str) -> list[tuple[Path, int, Path | None]]:
    """test_dir/<good|defect_type>/<name>.* -> (image, label 1 = defect, mask or None); the mask of a defect
    image is gt_dir/<defect_type>/<name>_mask.*, matched by name, never by sorted position."""
    dirs = sorted(p for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    paths = [p for d in dirs for p in list_images(d)]
    if not paths:
        raise UsageError(f"{test_dir}: no images; expected {layout}")
    mask_of = {}
    for p in sorted(gt_dir.glob("*/*_mask.*")):  # none without a ground-truth folder
        key = (p.parent.name, p.stem[:-5])
        if key in mask_of:  # 003_mask.png and 003_mask.bmp: which one is meant cannot be guessed
            raise UsageError(f"{mask_of[key]} and {p}: two masks for {test_dir / key[0] / key[1]}.*; keep one")
        mask_of[key] = p
    if gt_dir.is_dir():  # with ground truth, every defect image needs its mask and every mask its image
        defects = {(p.parent.name, p.stem) for p in paths if p.parent.name != "good"}
        orphans, unmasked = sorted(set(mask_of) - defects), sorted(defects - set(mask_of))
        if orphans:
            key = orphans[0]
            raise UsageError(f"{mask_of[key]}: mask with no test image {test_dir / key[0] / key[1]}.*; remove it")
        if unmasked:
            key = unmasked[0]
            raise UsageError(f"{test_dir / key[0] / key[1]}: defect image with no mask "
                             f"{gt_dir / key[0] / (key[1] + '_mask.png')}; add the mask or remove {gt_dir.name}/")
    return [(p, int(p.parent.name != "good"), mask_of.get((p.parent.name, p.stem))) for p in paths]


def visa_rows(root: Path) -> list[dict]:
    """VisA's split_csv/1cls.csv as dicts, each with its line number under 'line'."""
    path = root / VISA_CSV
    if not path.is_file():
        raise UsageError(f"{path}: not found; expected {VISA_TREE} (--dataset visa)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [dict(row, line=n) for n, row in enumerate(reader, start=2)]
        missing = [c for c in ("object", "split", "label", "image", "mask") if c not in (reader.fieldnames or ())]
    if missing:
        raise UsageError(f"{path}: no column {', '.join(missing)} in its header row; expected {VISA_TREE}")
    return rows


def read_visa(root: Path, category: str) -> tuple[list, list, list]:
    """VisA's 1cls split: train = the object's 'train' rows (normal), test = its 'test' rows."""
    train, test = [], []
    for row in visa_rows(root):
        if row["object"] != category:
            continue
        image, mask = root / row["image"], (root / row["mask"]) if row["mask"] else None
        split, anomaly = row["split"], row["label"] == "anomaly"
        problems = [(split not in ("train", "test") or row["label"] not in ("normal", "anomaly"),
                     f"split {split!r}, label {row['label']!r}"),
                    (not image.is_file(), f"image {image} not found"),
                    (split == "train" and anomaly, "an anomaly row in the train split"),
                    (split == "test" and anomaly and mask is None, "an anomaly row without a mask"),
                    (not anomaly and mask is not None, "a normal row with a mask"),
                    (mask is not None and not mask.is_file(), f"mask {mask} not found")]
        for bad, problem in problems:
            if bad:
                raise UsageError(f"{root / VISA_CSV}, line {row['line']}: {problem}; expected {VISA_TREE}")
        if split == "train":
            train.append(image)
        else:
            test.append((image, int(anomaly), mask))
    for items, split in ((train, "train"), (test, "test")):
        if not items:
            raise UsageError(f"{root / VISA_CSV}: no {split} row for {category}; expected {VISA_TREE}")
    return train, test, []


def read_mvtec(root: Path, category: str) -> tuple[list, list, list]:
    base = root / category
    return (list_images(base / "train" / "good", MVTEC_TREE),
            labelled_test_images(base / "test", base / "ground_truth", MVTEC_TREE), [])


def read_mvtec2(root: Path, category: str) -> tuple[list, list, list]:
    """MVTec AD 2: test_public holds the labelled test set; the test_private* folders have no labels
    (score them with --predict); validation/good is the held-out normal set."""
    base, public = root / category, root / category / "test_public"
    return (list_images(base / "train" / "good", MVTEC2_TREE),
            labelled_test_images(public, public / "ground_truth", MVTEC2_TREE),
            list_images(base / "validation" / "good", MVTEC2_TREE))


# --dataset -> reader: (root, category) -> (train image paths, test (image, label 1 = defect, mask path or None),
# validation image paths: held-out normal images the dataset provides, [] when it has none)
READERS = {"mvtec": read_mvtec, "visa": read_visa, "mvtec2": read_mvtec2}


def load_category(root: Path, category: str, image_size: int, crop_size: int, dataset: str = "mvtec") -> Category:
    """One category of --dataset: its reader lists (image, label, mask) paths, this reads them all."""
    found = find_categories(root, dataset)
    if category not in found:
        raise UsageError(f"--category {category}: not found under {root}; found: {', '.join(found) or 'none'} "
                         f"(expected {LAYOUTS[dataset]}; --dataset {dataset})")
    train_paths, test_items, validation_paths = READERS[dataset](root, category)
    test_paths, labels, mask_paths = (list(column) for column in zip(*test_items))
    progress = Progress(f"reading {category}", len(train_paths) + len(test_paths) + len(validation_paths), "img")

    def read(paths):
        images = []
        for p in paths:
            images.append(read_image(p, image_size, crop_size))
            progress.update()
        return torch.stack(images) if images else None
    masks, empty = None, torch.zeros(crop_size, crop_size, dtype=torch.bool)
    if any(mask_paths):  # good images get an empty mask
        masks = torch.stack([empty if path is None else read_image(path, image_size, crop_size, mask=True)
                             for path in mask_paths])
    return Category(read(train_paths), read(test_paths), np.array(labels), masks, test_paths, read(validation_paths))


DEFECT_KINDS = ("scratch", "blob", "stain")  # shapes CutPaste never pastes


def draw_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float in [0, 1] -> (a copy with one defect, bool (H, W) mask). The synthetic
    category's test defects and the validation defects on held-out normal images (training):
    a thin straight scratch, an irregular blob of a foreign colour, or a soft stain."""
    size = max(img.shape[:2])
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32) / size
    cy, cx = rng.uniform(0.2, 0.8, 2)
    if kind == "scratch":  # bright or dark line, 2-4 px wide, a quarter to half the image long
        ang, length, width = rng.uniform(0, np.pi), rng.uniform(0.25, 0.5), rng.uniform(1.2, 2.2) / size
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
    Deterministic for `seed`; an existing folder made by this function is reused."""
    base, marker = root / "synthetic", root / "synthetic" / ".made_by_patch_ae"
    stamp = json.dumps({"seed": seed, "size": size, "counts": [n_train, n_test_good, n_test_defect], "version": 1})
    if base.exists():
        if marker.is_file() and marker.read_text() == stamp:
            return base
        raise UsageError(f"{base}: exists but was not made by this version of --synthetic; move it away or pass "
                         f"another --data-root")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def texture():  # an aligned weave (as an MVTec object is aligned): small shift, tint and noise
        px, py = rng.normal(0, 0.3, 2)
        v = 0.5 + 0.18 * np.sin(2 * np.pi * 14 * xx + px) * np.sin(2 * np.pi * 9 * yy + py)
        v = v + 0.03 * rng.standard_normal((size, size))
        tint = np.array([0.85, 0.7, 0.5]) + rng.normal(0, 0.015, 3)
        return np.clip(v[..., None] * tint * 1.3, 0, 1)

    def save(arr, path, mode="RGB"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode).save(path)
    for i in range(n_train):
        save(texture(), base / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        save(texture(), base / "test" / "good" / f"{i:03d}.png")
    for kind in DEFECT_KINDS:
        for i in range(n_test_defect):
            img, mask = draw_defect(texture(), kind, rng)
            save(img, base / "test" / kind / f"{i:03d}.png")
            save(mask.astype(np.float32), base / "ground_truth" / kind / f"{i:03d}_mask.png", "L")
    marker.write_text(stamp)
    return base


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised, channels-last (as the encoder's weights)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# CutPaste (Li et al. 2021, Sec. 2.1); our reading: the augmented image is also the reconstruction target
# ----------------------------------------------------------------------------------------------
def cutpaste(img: torch.Tensor, scar: bool, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
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
        w, h = min(W, max(1, round(math.sqrt(area * aspect)))), min(H, max(1, round(math.sqrt(area / aspect))))
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
    """(B, 3, H, W) in [0, 1]: CutPaste on each image with probability p, normal or scar at random."""
    out = batch.clone()
    for i in range(len(batch)):
        if torch.rand(()) < p:
            out[i] = cutpaste(batch[i], scar=bool(torch.rand(()) < 0.5), scale=image_size / 256)[0]
    return out


# ----------------------------------------------------------------------------------------------
# Encoder (Sec. 2.3, Fig. 2): conv1..layer3 of a pretrained backbone, multi-scale fusion, 2x(1x1 conv+ReLU)
# ----------------------------------------------------------------------------------------------
def load_backbone(name: str, weights: str) -> nn.Module:
    """torchvision classifier with `weights`: 'imagenet' | 'none' | path to a state_dict file."""
    build = getattr(torchvision.models, name)
    if weights == "none":
        return build(weights=None)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:  # torchvision's own loader: reads $TORCH_HOME/hub/checkpoints first, renames DenseNet's legacy keys
            return build(weights=enum, progress=False)
        except Exception as e:  # offline, proxy, corrupt file: all end the same way for the user
            folder = Path(torch.hub.get_dir()) / "checkpoints"
            raise UsageError(f"--weights imagenet: cannot load {name} weights ({type(e).__name__}); put "
                             f"{Path(enum.url).name} (from {enum.url}) into {folder}, or pass --weights none") from None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--weights {weights}: cannot read a state_dict ({type(e).__name__}: {e})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    model = build(weights=None)
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise UsageError(f"--weights {weights}: not {name} weights ({str(e).splitlines()[0]})") from None
    return model


def out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


class Encoder(nn.Module):
    """(B, 3, H, W) -> R (B, c3, H/8, W/8): one feature vector per 8x8 image patch."""
    stride = 8

    def __init__(self, backbone: nn.Module, feat_dim: int = 0):
        super().__init__()
        b = backbone  # conv1 + layer1 = the paper's conv1, conv2; layer2, layer3 = conv3, conv4
        self.stem = nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool, b.layer1)
        self.layer2, self.layer3 = b.layer2, b.layer3
        c12 = out_channels(b.layer2) + out_channels(b.layer3)  # c1 + c2
        self.feat_dim = feat_dim or c12 // 3
        if not 0 < self.feat_dim < c12:
            raise UsageError(f"--feat-dim {feat_dim}: must be below c1+c2 = {c12} for this backbone (Sec. 2.3)")
        self.fuse = nn.Sequential(nn.Conv2d(c12, self.feat_dim, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(self.feat_dim, self.feat_dim, 1), nn.ReLU(inplace=True))
        self.to(memory_format=torch.channels_last)  # the layout normalize() gives its input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f2 = self.layer2(self.stem(x))                   # (B, c1, H/8, W/8)
        f3 = self.layer3(f2)                             # (B, c2, H/16, W/16)
        f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([f2, f3], dim=1))     # (B, c1+c2, H/8, W/8) -> (B, c3, H/8, W/8)

    def train(self, mode: bool = True):
        """The backbone trains end to end, but its BatchNorm keeps the pretrained statistics."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


# ----------------------------------------------------------------------------------------------
# Decoder (Sec. 2.4): 1x1 conv, ReLU, 1x1 conv, so each feature vector rebuilds only its own patch
# ----------------------------------------------------------------------------------------------
class Decoder(nn.Module):
    """R (B, c3, h, w) -> I_hat (B, 3, h*s, w*s); output patch (i, j) depends on R[:, :, i, j] alone."""

    def __init__(self, feat_dim: int, stride: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(feat_dim, feat_dim, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(feat_dim, 3 * stride * stride, 1))
        self.to_patches = nn.PixelShuffle(stride)  # (B, 3*s*s, h, w) -> (B, 3, h*s, w*s)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.to_patches(self.net(r))


class PatchAE(nn.Module):
    def __init__(self, backbone: nn.Module, feat_dim: int = 0):
        super().__init__()
        self.encoder = Encoder(backbone, feat_dim)
        self.decoder = Decoder(self.encoder.feat_dim, Encoder.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


# ----------------------------------------------------------------------------------------------
# Loss (Sec. 2.5, Eq. 3): alpha * sum_p ||norm(I_hat_p) - norm(I_p)||_2 + (1 - alpha) * sum_p ||I_hat_p - I_p||_2
# ----------------------------------------------------------------------------------------------
def patch_loss(recon: torch.Tensor, target: torch.Tensor, alpha: float, stride: int = 8,
               eps: float = 1e-6) -> torch.Tensor:
    """(B, 3, H, W) x 2 -> scalar: Eq. 3 summed over the P patches, averaged over the batch."""
    p_hat = F.unfold(recon, stride, stride=stride).transpose(1, 2)  # Gamma (Eq. 1-2): (B, P, 3*s*s)
    p = F.unfold(target, stride, stride=stride).transpose(1, 2)

    def norm(v):  # standardise within each patch, as MAE's normalised-pixel target
        return (v - v.mean(-1, keepdim=True)) / (v.var(-1, keepdim=True) + eps).sqrt()
    l_norm = (norm(p_hat) - norm(p)).norm(dim=-1).sum(1)   # (B,)
    l_pixel = (p_hat - p).norm(dim=-1).sum(1)              # (B,)
    return (alpha * l_norm + (1 - alpha) * l_pixel).mean()


# ----------------------------------------------------------------------------------------------
# Training (Sec. 2.5): end to end on CutPaste-augmented normal images. Not in the paper: validated on
# held-out normal images with defects training never sees; the encoder of the best validated epoch is kept
# ----------------------------------------------------------------------------------------------
VAL_BANK_IMAGES, VAL_BANK_ROWS = 64, 16384  # validation bank: random patch rows of some training images


@dataclass
class Validation:
    images: torch.Tensor   # (V, 3, S, S) uint8: the held-out normal images, then each of them once per defect kind
    labels: np.ndarray     # (V,) 1 = defect
    masks: torch.Tensor    # (V, S, S) bool
    bank_images: torch.Tensor  # (<= 64, 3, S, S) uint8 training images whose patch features form the bank
    bank_rows: torch.Tensor    # (<= 16384,) rows of their (n*h*w, C) features kept, the same at every epoch


def make_validation(held: torch.Tensor, train: torch.Tensor, seed: int) -> Validation:
    """Held-out normal images -> a labelled validation set: each image as it is and with one scratch,
    one blob and one stain (draw_defect), with masks. Made once per run, from `seed`."""
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    clean = held.permute(0, 2, 3, 1).numpy() / 255.0                     # (n, S, S, 3) in [0, 1]
    images, masks = [held], [torch.zeros(len(held), *held.shape[-2:], dtype=torch.bool)]
    for kind in DEFECT_KINDS:
        pairs = [draw_defect(img, kind, rng) for img in clean]                # [(image, mask), ...]
        defective = np.stack([(a * 255).round() for a, _ in pairs]).astype(np.uint8)  # (n, S, S, 3)
        images.append(torch.from_numpy(defective).permute(0, 3, 1, 2))
        masks.append(torch.from_numpy(np.stack([m for _, m in pairs])))
    labels = np.repeat([0] + [1] * len(DEFECT_KINDS), len(held))
    bank_images = train[torch.randperm(len(train), generator=g)[:VAL_BANK_IMAGES]]
    h, w = (s // Encoder.stride for s in train.shape[-2:])
    rows = torch.randperm(len(bank_images) * h * w, generator=g)[:VAL_BANK_ROWS].sort().values  # of n*h*w rows
    return Validation(torch.cat(images).contiguous(), labels, torch.cat(masks), bank_images, rows)


def validation_score(metrics: dict) -> float:
    """What best-epoch selection maximises: the mean of image AUROC (the paper's metric; few normal
    images, so coarse) and pixel AUROC (every pixel of every validation image) on the validation set."""
    return (metrics["image_auroc"] + metrics["pixel_auroc"]) / 2


@torch.no_grad()
def validate(encoder: Encoder, val: Validation, cfg: Config, device: torch.device) -> dict:
    """Scores the validation set against a bank of the current encoder's training features; also
    what the features do: mean ||R||, the share of R's channels that are 0 on every bank image's
    patch (dead ReLUs), and the mean anomaly map of the held-out normal images (their distance to the bank)."""
    feats = extract_features(encoder, val.bank_images, cfg.batch_size, device, desc="")  # (n, C, h, w)
    flat = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])                        # (n*h*w, C)
    scores, maps = score_images(encoder, flat[val.bank_rows.to(flat.device)], val.images, cfg.batch_size, device,
                                cfg.image_score, cfg.knn_memory_mb, desc="")
    out = compute_metrics(val.labels, scores, val.masks, maps)
    out["score"] = validation_score(out)
    out["feature_norm"] = float(flat.norm(dim=1).mean())
    out["dead_units"] = float((flat.amax(0) <= 0).float().mean())
    out["normal_distance"] = float(maps[torch.from_numpy(val.labels == 0)].mean())
    return out


def make_optimizer(model: PatchAE, cfg: Config) -> torch.optim.Adam:
    """Adam: --lr for the new layers (1x1 fusion convs, decoder), --lr x --backbone-lr for the
    pretrained stages that --freeze leaves trainable; frozen parameters get no gradient at all."""
    enc = model.encoder
    frozen = {"none": [], "stem": [enc.stem], "layer2": [enc.stem, enc.layer2]}[cfg.freeze]
    backbone = [m for m in (enc.stem, enc.layer2, enc.layer3) if cfg.backbone_lr > 0 and m not in frozen]
    for m in (enc.stem, enc.layer2, enc.layer3):
        m.requires_grad_(m in backbone)
    groups = [{"params": [*enc.fuse.parameters(), *model.decoder.parameters()], "lr": cfg.lr}]
    if backbone:
        groups.append({"params": [p for m in backbone for p in m.parameters()], "lr": cfg.lr * cfg.backbone_lr})
    return torch.optim.Adam(groups)


def auto_val_every(val_seconds: float, epoch_seconds: float, budget: float) -> int:
    """--val-every 0: validate every k-th epoch, the smallest k at which one validation costs at most
    `budget` of k epochs. Validation's cost is mostly fixed (its bank, four copies of each held-out image,
    every pixel's AUROC) while an epoch shrinks with the category, so a fixed k that costs 13% at the
    paper's size costs half the training time on a small category."""
    return max(1, math.ceil(val_seconds / (budget * max(epoch_seconds, 1e-9))))


def train_patch_ae(model: PatchAE, images: torch.Tensor, cfg: Config, device: torch.device,
                   val: Validation | None = None) -> dict:
    """images: (N, 3, S, S) uint8 normal images. Validates before the first epoch, every --val-every
    epochs (0: as auto_val_every chooses after epoch 1) and after the last; with --select best the encoder
    ends in the state of the best validation score (within --val-tolerance: the earlier epoch). Returns the
    loss per epoch, the validation curve, the selected epoch and the validation period."""
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    n, steps = len(images), max(1, math.ceil(len(images) / cfg.batch_size) * cfg.epochs)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))  # noqa: E731, per optimiser step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine if cfg.lr_schedule == "cosine" else lambda step: 1.0)
    losses, curve, best_row, best_state, start = [], [], None, None, time.perf_counter()
    val_every = cfg.val_every

    def checkpoint(epoch: int) -> None:
        nonlocal best_row, best_state
        t0 = clock(device)
        row = {"epoch": epoch, "loss": losses[-1] if losses else None, **validate(model.encoder, val, cfg, device)}
        row["seconds"] = clock(device) - t0
        curve.append(row)
        if best_row is None or row["score"] > best_row["score"] + cfg.val_tolerance:  # else the earlier one stays
            best_row, best_state = row, {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
        model.train()
        print(f"  validation, epoch {epoch}: image AUROC {fmt(row['image_auroc'])}, pixel AUROC "
              f"{fmt(row['pixel_auroc'])}, AUPRO {fmt(row['pixel_aupro'])}, |R| {row['feature_norm']:.3g}, dead "
              f"{fmt(row['dead_units'], 0)}%, normal distance {row['normal_distance']:.3g}, {row['seconds']:.1f}s",
              flush=True)
    if val is not None:
        checkpoint(0)
    for epoch in range(1, cfg.epochs + 1):
        t0, total = time.perf_counter(), 0.0
        progress = Progress(f"epoch {epoch}", n, "img", every=5.0, final=False)  # for slow epochs (CPU)
        for idx in torch.randperm(n).split(cfg.batch_size):
            x = augment(images[idx].float() / 255, cfg.image_size)
            x = normalize(x.to(device))
            loss = patch_loss(model(x), x, cfg.alpha, Encoder.stride, cfg.norm_eps)  # target = the augmented image
            if not torch.isfinite(loss):
                raise UsageError(f"training loss became {loss.item()} at epoch {epoch}; lower --lr "
                                 f"(now {cfg.lr}); nothing was saved by this run")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            progress.update(len(idx))
        losses.append(total / n)
        now = time.perf_counter()
        eta = (now - start) / epoch * (cfg.epochs - epoch)
        print(f"  epoch {epoch}/{cfg.epochs}: loss {losses[-1]:.4f}, {now - t0:.1f}s, ETA {eta:.0f}s", flush=True)
        if val is not None and not val_every:  # chosen once, from epoch 0's validation and epoch 1
            val_every = auto_val_every(curve[0]["seconds"], now - t0, cfg.val_budget)
            print(f"  validating every {val_every} epoch(s): one validation {curve[0]['seconds']:.1f}s, one epoch "
                  f"{now - t0:.1f}s, --val-budget {cfg.val_budget:g} of the training time", flush=True)
        if val is not None and (epoch % val_every == 0 or epoch == cfg.epochs):
            checkpoint(epoch)
    selected, val_seconds = cfg.epochs, sum(row["seconds"] for row in curve)
    if val is not None:
        if cfg.select == "best":
            model.encoder.load_state_dict(best_state)
            selected = best_row["epoch"]
        train_seconds = time.perf_counter() - start - val_seconds
        print(f"selected epoch {selected} ({cfg.select}; best validation score {fmt(best_row['score'])} at epoch "
              f"{best_row['epoch']}); validation {val_seconds:.1f}s = {fmt(val_seconds / max(train_seconds, 1e-9), 0)}"
              f"% of the training time", flush=True)
    model.encoder.eval()
    return {"loss_by_epoch": losses, "validation_curve": curve, "selected_epoch": selected,
            "validation_seconds": val_seconds, "val_every": val_every or None}


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                     desc: str = "features") -> torch.Tensor:
    """uint8 (N, 3, S, S) -> features (N, C, h, w) on `device`. `encoder`: any image -> feature map module."""
    encoder.eval()
    progress, out = Progress(desc, len(images), "img"), []
    for batch in images.split(batch_size):
        out.append(encoder(normalize(batch.to(device).float() / 255)))
        progress.update(len(batch))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Memory bank (Sec. 2.6, the "normal representation set"): PatchCore's greedy coreset on a random projection
# ----------------------------------------------------------------------------------------------
def greedy_coreset(features: torch.Tensor, n: int, proj_dim: int = 128, seed: int = 0,
                   n_starts: int = 10) -> torch.Tensor:
    """(N, D) -> LongTensor (n,) of rows that greedily cover the set (k-center): each step adds the
    row farthest from those chosen so far. Distances on a 128-d random (Johnson-Lindenstrauss) projection.
    Start as the official ApproximateGreedyCoresetSampler: every row's mean (not squared) distance
    to `n_starts` random rows stands for its distance to the empty set; those rows are not added."""
    N, D = features.shape
    n = max(1, min(n, N))
    g = torch.Generator().manual_seed(seed)
    proj = (torch.randn(D, proj_dim, generator=g) / math.sqrt(proj_dim)).to(features)
    rows = features @ proj if D > proj_dim else features                # (N, k)
    cols = rows.T.contiguous()                                          # (k, N)
    # cols.T @ c runs as one transposed gemv, ~3x faster on CPU than rows @ c; the centre c is
    # read from `rows`, where it is contiguous.
    sq = (rows * rows).sum(1)                                           # ||z_i||^2, (N,)
    starts = torch.randperm(N, generator=g)[:n_starts].to(features.device)
    d_starts = torch.addmm(sq[:, None], cols.T, rows[starts].T, alpha=-2).add_(sq[starts])  # (N, n_starts) squared
    min_d = d_starts.clamp_(min=0).sqrt_().mean(1).square_()            # squared distance to the chosen set
    chosen = torch.empty(n, dtype=torch.long, device=features.device)
    progress = Progress("coreset", n, "pts")
    for k in range(n):
        i = int(min_d.argmax())
        chosen[k] = i
        d = torch.addmv(sq, cols.T, rows[i], alpha=-2).add_(sq[i])  # ||z - z_i||^2 for all rows
        torch.minimum(min_d, d, out=min_d)
        progress.update()
    return chosen


def build_memory_bank(features: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor:
    """(N, C, h, w) -> (M, C) normal patch features, M = ratio * N*h*w."""
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (N*h*w, C)
    if ratio >= 1:
        return flat
    return flat[greedy_coreset(flat, int(len(flat) * ratio), seed=seed)]


# ----------------------------------------------------------------------------------------------
# kNN scorer (Sec. 2.6): distance of each test patch to its nearest memory-bank feature
# ----------------------------------------------------------------------------------------------
def knn_budget_mb(memory_mb: int, device: torch.device) -> int:
    """0 = automatic: 8 MB on CPU (measured at a batch's queries: level with 4 MB and faster than 2 MB on a
    quiet host, the fastest with another process busy; docs/benchmark.md); 256 MB on CUDA, not yet measured."""
    return memory_mb or (256 if device.type == "cuda" else 8)


def knn_scores(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, memory_mb: int = 0,
               method: str = "mm") -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, D) x (M, D) -> L2 distances (Q, k) and bank indices (Q, k), nearest first. The bank is walked
    in chunks so that one distance block fits `memory_mb` (0 = knn_budget_mb's choice): the only memory
    that grows with the work. method 'mm': ||q||^2 - 2 q.m + ||m||^2, one addmm per block into a reused
    buffer (faster than cdist on every shape in bench.py); 'cdist': torch.cdist per block."""
    queries, bank = queries.float(), bank.to(queries.device, torch.float32)
    memory_mb = knn_budget_mb(memory_mb, queries.device)
    q_chunk = min(len(queries), 4096)
    m_chunk = max(k, memory_mb * 2**20 // (4 * q_chunk))
    bank_sq = torch.linalg.vector_norm(bank, dim=1).square_()            # ||m||^2, (M,), no (M, D) temporary
    buffer = torch.empty(q_chunk * min(m_chunk, len(bank)), device=queries.device)
    dists, idxs = [], []
    for q in queries.split(q_chunk):
        best_d = torch.full((len(q), k), float("inf"), device=q.device)
        best_i = torch.zeros((len(q), k), dtype=torch.long, device=q.device)
        for start in range(0, len(bank), m_chunk):
            m = bank[start:start + m_chunk]
            if method == "mm":  # (q, m) block of squared distances minus ||q||^2, the same for every m
                d = torch.addmm(bank_sq[start:start + m_chunk], q, m.T, alpha=-2,
                                out=buffer[:len(q) * len(m)].view(len(q), len(m)))
            else:
                d = torch.cdist(q, m)
            v, i = d.min(1, keepdim=True) if k == 1 else d.topk(min(k, len(m)), dim=1, largest=False)
            del d  # so that a new cdist block is never allocated while the last one is alive
            v, j = torch.cat([best_d, v], 1).topk(k, dim=1, largest=False)  # merge with the best so far
            best_i, best_d = torch.cat([best_i, i + start], 1).gather(1, j), v
        # exact distances to the chosen neighbours: the expanded form loses digits when d << ||q||
        dists.append((q[:, None, :] - bank[best_i]).norm(dim=-1))
        idxs.append(best_i)
    return torch.cat(dists), torch.cat(idxs)


def image_scores(patch_scores: torch.Tensor, nn_idx: torch.Tensor, queries: torch.Tensor,
                 bank: torch.Tensor, mode: str = "max", b: int = 9) -> torch.Tensor:
    """patch_scores (N, P) -> (N,). 'max': the largest patch score (Sec. 2.6). 'reweight': PatchCore
    Eq. 7, s* x (1 - softmax over the distances from the worst test patch to the b nearest bank
    neighbours of its nearest bank vector m*, taken at m*)."""
    s, worst = patch_scores.max(1)                                   # (N,), (N,)
    if mode == "max":
        return s
    rows = torch.arange(len(s), device=s.device)
    m_star = nn_idx.view(len(s), -1)[rows, worst]                    # (N,)
    _, nb = knn_scores(bank[m_star], bank, k=min(b, len(bank)))      # N_b(m*) (m* itself first)
    q = queries.view(len(s), -1, queries.shape[-1])[rows, worst]     # (N, D)
    d = (q[:, None, :] - bank[nb]).norm(dim=-1)                      # (N, b)
    return (1 - torch.softmax(d, dim=1)[:, 0]) * s


# ----------------------------------------------------------------------------------------------
# Anomaly map (Sec. 2.6; as PatchCore): patch scores -> bilinear upsampling to the crop -> Gaussian blur, sigma 4
# ----------------------------------------------------------------------------------------------
def anomaly_maps(patch_scores: torch.Tensor, size: int, sigma: float = 4.0) -> torch.Tensor:
    """(N, h, w) -> (N, size, size)."""
    m = F.interpolate(patch_scores[:, None], size=(size, size), mode="bilinear", align_corners=False)
    k = 2 * int(4 * sigma + 0.5) + 1  # truncate at 4 sigma, as scipy.ndimage.gaussian_filter
    return TF.gaussian_blur(m, [k, k], [sigma, sigma])[:, 0]


@torch.no_grad()
def score_images(encoder: nn.Module, bank: torch.Tensor, images: torch.Tensor, batch_size: int, device: torch.device,
                 image_score: str = "max", memory_mb: int = 0, method: str = "mm", distance: str = "l2",
                 desc: str = "scoring", times: dict | None = None,
                 progress: Progress | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """uint8 (N, 3, S, S) -> image scores (N,) and anomaly maps (N, S, S) on the CPU. `times` gets the
    seconds of each stage (features, knn, map). distance: a patch's score is its L2 distance to the
    nearest bank vector ('l2', the paper's) or its square ('squared': the official PatchCore's FAISS
    IndexFlatL2); the same image ranking under 'max', other maps. progress: a caller's, to advance."""
    if distance not in ("l2", "squared"):
        raise ValueError(f"distance {distance!r}: expected 'l2' or 'squared'")
    encoder.eval()
    progress, scores, maps = progress or Progress(desc, len(images), "img"), [], []

    def now() -> float:  # with `times`, wait for the GPU at each stage's end: each stage gets its own seconds
        return clock(device) if times is not None else time.perf_counter()
    for batch in images.split(batch_size):
        t0 = now()
        r = encoder(normalize(batch.to(device).float() / 255))          # (B, C, h, w)
        t1 = now()
        q = r.permute(0, 2, 3, 1).reshape(-1, r.shape[1])               # (B*h*w, C)
        d, idx = knn_scores(q, bank, memory_mb=memory_mb, method=method)  # (B*h*w, 1)
        patch = (d if distance == "l2" else d.square()).view(len(batch), *r.shape[2:])  # (B, h, w)
        scores.append(image_scores(patch.flatten(1), idx, q, bank, image_score).cpu())
        t2 = now()
        maps.append(anomaly_maps(patch, images.shape[-1]).cpu())
        t3 = now()
        if times is not None:
            for stage, seconds in (("features", t1 - t0), ("knn", t2 - t1), ("map", t3 - t2)):
                times[stage] = times.get(stage, 0.0) + seconds
        progress.update(len(batch))
    return torch.cat(scores).numpy(), torch.cat(maps)


# ----------------------------------------------------------------------------------------------
# Metrics (Sec. 3): image AUROC, the paper's; pixel AUROC and AUPRO up to 30% FPR (MVTec AD's definition)
# ----------------------------------------------------------------------------------------------
def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve for FPR in [0, max_fpr], divided by max_fpr.
    Regions: 8-connected components of each ground-truth mask. One threshold per distinct score."""
    regions, n = np.zeros(masks.shape, np.int64), 0
    for i, m in enumerate(masks):
        label, count = scipy.ndimage.label(m, structure=np.ones((3, 3)))
        regions[i] = np.where(label > 0, label + n, 0)
        n += count
    normal = regions == 0
    if n == 0 or normal.all():
        return float("nan")
    order = np.argsort(-maps.ravel(), kind="stable")                 # thresholds from high to low
    r, s = regions.ravel()[order], maps.ravel()[order]
    sizes = np.bincount(regions.ravel(), minlength=n + 1)
    fpr = np.cumsum(r == 0) / normal.sum()
    pro = np.cumsum(np.where(r == 0, 0.0, 1.0 / (sizes[r] * n)))    # mean over regions of the overlap
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
# Outputs (not in the paper): model file, heatmaps, tables
# ----------------------------------------------------------------------------------------------
def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: an interrupted run leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(obj, str):
        tmp.write_text(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


MODEL_FORMAT = "patch_ae/1"  # the model file's "format" key: load_model refuses any other
# What a run records of fit()'s result: results.json takes them all, and the model file keeps them beside the
# encoder and the bank (a file from an older version may lack some: they read as None).
RUN_FIELDS = ("threshold", "map_range", "n_train", "n_holdout", "protocol", "selected_epoch", "val_every",
              "validation_curve", "loss_by_epoch", "train_seconds", "bank_seconds", "validation_seconds")


def save_model(path: str, cfg: Config, model: dict) -> None:
    """One file with all that scoring needs: encoder weights, memory bank, threshold, config, versions."""
    atomic_save({"format": MODEL_FORMAT, "config": dataclasses.asdict(cfg), "encoder": model["encoder"].state_dict(),
                 "memory_bank": model["bank"].cpu(), **{key: model[key] for key in RUN_FIELDS},
                 "versions": {"torch": str(torch.__version__), "torchvision": torchvision.__version__}}, Path(path))
    print(f"saved model to {path}")


def load_model(path: str, cfg: Config, given: set, device: torch.device) -> dict:
    """Model file -> the model as fit() returns it, on `device`; the file's settings replace cfg's."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = "file not found" if isinstance(e, FileNotFoundError) else f"not a model file ({type(e).__name__})"
        raise UsageError(f"--load {path}: {reason}; make one with --save") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise UsageError(f"--load {path}: not a {MODEL_FORMAT} model file of patch_ae.py; make one with --save")
    for key in ("backbone", "feat_dim", "image_size", "crop_size"):  # the settings a model file fixes
        if key in given and getattr(cfg, key) != blob["config"][key]:
            raise UsageError(f"--load {path}: the model was made with --{key.replace('_', '-')} "
                             f"{blob['config'][key]}, not {getattr(cfg, key)}; drop the flag or retrain")
        setattr(cfg, key, blob["config"][key])
    if "image_score" not in given:
        cfg.image_score = blob["config"]["image_score"]
    encoder = Encoder(load_backbone(cfg.backbone, "none"), cfg.feat_dim)
    try:
        encoder.load_state_dict(blob["encoder"])
    except RuntimeError as e:
        raise UsageError(f"--load {path}: its encoder does not fit {cfg.backbone} ({str(e).splitlines()[0]})") from None
    return {"encoder": encoder.to(device), "bank": blob["memory_bank"].to(device),
            **{key: blob.get(key) for key in RUN_FIELDS}}


def csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def colorize(x: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, a jet-like colour map (blue = low, red = high)."""
    anchors = np.array([[0, 0, .5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [.5, 0, 0]])
    pos = np.clip(x, 0, 1) * (len(anchors) - 1)
    rgb = [np.interp(pos, np.arange(len(anchors)), anchors[:, c]) for c in range(3)]
    return (np.stack(rgb, -1) * 255).astype(np.uint8)


def heat_range(maps: torch.Tensor, fixed: tuple[float, float] | None = None) -> tuple[float, float]:
    """The heatmap colour range: `fixed` (a model's map_range: the held-out normal images', so red is above
    every held-out pixel), else the lowest and highest pixel of `maps` themselves."""
    return fixed or (float(maps.min()), float(maps.max()))


def heatmap_panels(image: torch.Tensor, amap: torch.Tensor, vrange: tuple[float, float],
                   mask: torch.Tensor | None = None) -> np.ndarray:
    """(S, S*k, 3) uint8: input | map over input (same colour range for every image) | ground truth if any."""
    img = image.permute(1, 2, 0).numpy()
    heat = colorize((amap.numpy() - vrange[0]) / max(vrange[1] - vrange[0], 1e-12))
    panels = [img, (0.5 * img + 0.5 * heat).astype(np.uint8)]
    if mask is not None:
        panels.append(np.repeat(mask.numpy()[..., None].astype(np.uint8) * 255, 3, axis=2))
    return np.concatenate(panels, axis=1)


def save_heatmap(path: Path, image: torch.Tensor, amap: torch.Tensor, vrange: tuple[float, float],
                 mask: torch.Tensor | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(heatmap_panels(image, amap, vrange, mask)).save(path)


def fmt(v, digits: int = 1, scale: float = 100) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:.{digits}f}"


# Published image AUROC (%) that the summary prints beside ours: THEIR numbers, not ours. Per dataset: the
# source, then one column per method, {category: value, "mean": the mean over all the dataset's categories}.
PEER_AUROC = {
    "mvtec": ("the Patch AE paper, Table 1", {
        "paper Patch AE": {"bottle": 100, "cable": 99.56, "capsule": 99.1, "carpet": 99.87, "grid": 99,
                           "hazelnut": 100, "leather": 100, "metal_nut": 99.8, "pill": 98.2, "screw": 97.7,
                           "tile": 100, "toothbrush": 100, "transistor": 99.65, "wood": 99.69, "zipper": 99.7,
                           "mean": 99.48},
        "paper PatchCore-1": {"bottle": 100, "cable": 99.6, "capsule": 98.2, "carpet": 98.4, "grid": 99.8,
                              "hazelnut": 100, "leather": 100, "metal_nut": 100, "pill": 97.2, "screw": 98.9,
                              "tile": 98.9, "toothbrush": 100, "transistor": 100, "wood": 99.5, "zipper": 99.9,
                              "mean": 99.36}}),
    "visa": ("the IM-IAD benchmark, github.com/M-3LAB/IM-IAD, 'vanilla setting on VisA', PatchCore row; "
             "no Patch AE number is published for VisA", {
        "IM-IAD PatchCore": {"candle": 98.6, "capsules": 81.6, "cashew": 97.3, "chewinggum": 99.1, "fryum": 96.2,
                             "macaroni1": 97.5, "macaroni2": 78.1, "pcb1": 98.5, "pcb2": 97.3, "pcb3": 97.9,
                             "pcb4": 99.6, "pipe_fryum": 99.8, "mean": 95.1}}),
    "mvtec2": ("none listed here", {}),
}


def published(dataset: str, category: str) -> dict:
    """Their published image AUROC (PEER_AUROC) for one category or 'mean': column name -> value or None."""
    return {name: values.get(category) for name, values in PEER_AUROC[dataset][1].items()}


def summarize(runs: list[dict], dataset: str = "mvtec") -> list[dict]:
    """One row per category (mean +- std over seeds), then a mean row, with the published peer numbers."""
    rows, metrics = [], ("image_auroc", "pixel_auroc", "pixel_aupro", "train_seconds", "ms_per_image")
    for cat in dict.fromkeys(r["category"] for r in runs):
        group, row = [r for r in runs if r["category"] == cat], {"category": cat}
        row["seeds"] = " ".join(str(r["seed"]) for r in group)
        row["protocol"] = "; ".join(dict.fromkeys(r["protocol"] for r in group))
        for m in metrics:
            vals = [r[m] for r in group if r[m] is not None]
            row[m] = float(np.mean(vals)) if vals else None
            row[m + "_std"] = float(np.std(vals)) if len(vals) > 1 else None
        rows.append({**row, **published(dataset, cat)})
    if len(rows) > 1:
        mean = {"category": "mean", "seeds": "", "protocol": "; ".join(dict.fromkeys(r["protocol"] for r in rows))}
        for m in metrics:
            vals = [r[m] for r in rows if r[m] is not None]
            mean[m], mean[m + "_std"] = (float(np.mean(vals)) if vals else None), None
        # their mean is over all the dataset's categories: shown only when we ran all of them
        full = all({r["category"] for r in rows} >= set(v) - {"mean"} for v in PEER_AUROC[dataset][1].values())
        rows.append({**mean, **{name: v if full else None for name, v in published(dataset, "mean").items()}})
    return rows


def table_text(rows: list[dict], dataset: str = "mvtec") -> str:
    """summarize()'s rows as the markdown table that a run prints, the peers' source and the protocol below it."""
    def pm(row, m, d=1, scale=100):
        std = row.get(m + "_std")
        return fmt(row[m], d, scale) + ("" if std is None else f" +- {fmt(std, d, scale)}")
    source, peers = PEER_AUROC[dataset]
    lines = ["| category | image AUROC | pixel AUROC | pixel AUPRO@30% | train s | ms/img |"
             + "".join(f" {name} |" for name in peers), "|" + "---|" * (6 + len(peers))]
    for r in rows:
        theirs = "".join(f" {'n/a' if r[name] is None else r[name]} |" for name in peers)
        lines.append(f"| {r['category']} | {pm(r, 'image_auroc')} | {pm(r, 'pixel_auroc')} | {pm(r, 'pixel_aupro')} | "
                     f"{pm(r, 'train_seconds', 0, 1)} | {pm(r, 'ms_per_image', 1, 1)} |{theirs}")
    if any(r[name] is not None for r in rows for name in peers):
        lines.append(f"{', '.join(peers)}: published image AUROC, theirs, not ours ({source})")
    return "\n".join(lines + [f"protocol: {rows[-1]['protocol']}"])


def result_line(r: dict) -> str:
    return (f"{r['category']} seed {r['seed']}: image AUROC {fmt(r['image_auroc'])}, pixel AUROC "
            f"{fmt(r['pixel_auroc'])}, pixel AUPRO@30% {fmt(r['pixel_aupro'])}, F1 at threshold "
            f"{fmt(r['f1_at_threshold'])}, {r['ms_per_image']:.1f} ms/image")


def write_results(runs: list[dict], dataset: str, out: Path) -> str:
    """Prints the table and writes results.json (every run's record) and results.csv (the table's rows)."""
    rows = summarize(runs, dataset)
    print(table := table_text(rows, dataset))
    atomic_save(json.dumps(runs[0] if len(runs) == 1 else {"runs": runs, "table": rows}, indent=1),
                out / "results.json")
    keys = list(rows[0])
    atomic_save(csv_text([keys] + [["" if r[k] is None else r[k] for k in keys] for r in rows]), out / "results.csv")
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}")
    return table


# ----------------------------------------------------------------------------------------------
# Report (not in the paper): report.html, one self-contained page per run: inline SVG curves and JPEG
# images, no script, font or style from the network, so it opens offline and can be mailed as one file
# ----------------------------------------------------------------------------------------------
def jpeg_uri(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def svg_plot(title: str, xlabel: str, series: list, marks: list = (), width: int = 440, height: int = 250) -> str:
    """A line chart as inline SVG: the title and a legend above the plot, ticks at the data's lowest, middle
    and highest values. series: [(name, xs, ys, colour)]; marks: [(x, label)], red vertical lines named
    under the x axis."""
    series = [(name, list(map(float, xs)), list(map(float, ys)), colour) for name, xs, ys, colour in series if len(xs)]
    if not series:
        return f"<p>{html.escape(title)}: nothing to draw in this run.</p>"
    xs = [x for _, sx, _, _ in series for x in sx] + [float(x) for x, _ in marks]
    ys = [y for _, _, sy, _ in series for y in sy]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    pad = 0.05 * (y1 - y0) or 0.5                               # lines off the frame; one value still spans
    left, right, top, bottom = 52, width - 18, 34, height - 34  # the plot area
    X = lambda x: left + (right - left) * (float(x) - x0) / ((x1 - x0) or 1)  # noqa: E731
    Y = lambda y: bottom - (bottom - top) * (y - y0 + pad) / (y1 - y0 + 2 * pad)  # noqa: E731
    named = [label for _, label in marks if label]
    out = [f'<svg width="{width}" height="{height}" font-size="11" font-family="sans-serif">'
           f'<text x="{left}" y="12" font-weight="bold">{html.escape(title)}</text><rect x="{left}" y="{top}" '
           f'width="{right - left}" height="{bottom - top}" fill="none" stroke="#999"/><text x="{(left + right) / 2}" '
           f'y="{height - 4}" text-anchor="middle">{html.escape(xlabel)}'
           f'{html.escape("; red line: " + ", ".join(named)) if named else ""}</text>']
    for t in (0, 0.5, 1):  # three ticks on each axis
        x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        out.append(f'<text x="{X(x):.1f}" y="{bottom + 14}" text-anchor="middle">{x:.3g}</text>'
                   f'<text x="{left - 4}" y="{Y(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    legend_x = left
    for name, sx, sy, colour in series:
        points = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(sx, sy))
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>'
                   f'<text x="{legend_x}" y="27" fill="{colour}">&#9644; {html.escape(name)}</text>')
        legend_x += 24 + 7 * len(name)  # about 6 px a character at 11 px, and a gap
    for x, _ in marks:
        out.append(f'<line x1="{X(x):.1f}" y1="{top}" x2="{X(x):.1f}" y2="{bottom}" stroke="red"/>')
    return "".join(out) + "</svg>"


def score_histogram(groups: list, threshold: float | None) -> str:
    """groups: [(name, scores, colour)] -> one step line per non-empty group on shared bins, the threshold marked."""
    groups = [(name, s, colour) for name, s, colour in groups if len(s)]
    edges = np.histogram_bin_edges(np.concatenate([s for _, s, _ in groups]) if groups else [0.0], bins=24)
    return svg_plot("image scores: number of images", "image score",
                    [(f"{name} ({len(s)})", np.repeat(edges, 2)[1:-1], np.repeat(np.histogram(s, edges)[0], 2), colour)
                     for name, s, colour in groups], [] if threshold is None else [(threshold, "threshold")])


def gallery(title: str, entries: list, empty: str) -> str:
    """entries: [(pixels (H, W, 3) uint8, caption)]; `empty` says why there are none."""
    figures = "".join(f'<figure><img src="{jpeg_uri(pixels)}" alt="{html.escape(caption)}"><figcaption>'
                      f'{html.escape(caption)}</figcaption></figure>' for pixels, caption in entries)
    return f"<h3>{html.escape(title)}</h3>" + (figures or f"<p>{html.escape(empty)}</p>")


def report_run(result: dict, model: dict, data: Category, scores: np.ndarray, maps: torch.Tensor, n: int) -> str:
    """One category and seed: result line, training curves, ROC and score distribution, three galleries."""
    labels, thr, sel = data.labels, model["threshold"], model["selected_epoch"]
    curve, losses = model["validation_curve"] or [], model["loss_by_epoch"] or []
    normal, defect = scores[labels == 0], scores[labels == 1]
    validation = [(name, [r["epoch"] for r in curve if r[key] is not None],
                   [100 * r[key] for r in curve if r[key] is not None], colour) for name, key, colour in
                  (("image AUROC", "image_auroc", "blue"), ("pixel AUROC", "pixel_auroc", "green"),
                   ("AUPRO@30%", "pixel_aupro", "darkorange"))]
    roc = "<p>ROC: not defined, the test set holds one class only.</p>"
    if result["image_auroc"] is not None:
        fpr, tpr, _ = roc_curve(labels, scores)
        roc = svg_plot(f"ROC of the image scores, AUROC {fmt(result['image_auroc'])}", "false positive rate",
                       [("ROC", fpr, tpr, "blue"), ("chance", [0, 1], [0, 1], "#bbb")])
    verdict = "No threshold: no normal training image was held out to fit one (--holdout 0)."
    if thr is not None:
        missed = (f"misses {int((defect < thr).sum())} of {len(defect)} defective images" if len(defect)
                  else "no defective test image to miss")
        verdict = (f"Threshold {thr:.4g} (from the held-out normal images): flags {int((normal >= thr).sum())} of "
                   f"{len(normal)} normal test images, {missed}; F1 {fmt(result['f1_at_threshold'])}.")
    masks = " | ground-truth mask" if data.masks is not None else " (this test set has no masks)"
    span = ("the held-out normal images' maps (red: above every held-out pixel)" if model["map_range"] else
            "this test set's maps (no image was held out: --holdout 0)")
    parts = [f"<h2>{html.escape(result['category'])}, seed {result['seed']}</h2>",
             f"<pre>{html.escape(result_line(result))}</pre><h3>Training</h3>",
             svg_plot("validation: held-out normal images + drawn defects, %", "epoch", validation,
                      [(sel, f"selected: epoch {sel}")]),
             svg_plot("training loss (Eq. 3)", "epoch", [("loss", range(1, len(losses) + 1), losses, "dimgray")],
                      [(sel, "")]),
             "<h3>Image scores</h3>", roc,
             score_histogram([("normal", normal, "green"), ("defective", defect, "red")], thr),
             f"<p>{html.escape(verdict)}</p><p>Each picture: input | heatmap over the input{masks}; heatmap colours "
             f"span {html.escape(span)}.</p>"]
    order, vrange = np.argsort(-scores, kind="stable"), heat_range(maps, model["map_range"])
    defects, normals = [i for i in order if labels[i]], [i for i in order if not labels[i]]

    def entries(indices: list) -> list:
        return [(heatmap_panels(data.test[i], maps[i], vrange, None if data.masks is None else data.masks[i]),
                 f"{data.test_paths[i].parent.name}/{data.test_paths[i].name}: "
                 f"{'defect' if labels[i] else 'normal'}, score {scores[i]:.4g}") for i in indices[:n]]
    no_defect, no_normal = "None: the test set has no defective image.", "None: the test set has no normal image."
    return "".join(parts + [gallery("Defective images that scored highest", entries(defects), no_defect),
                            gallery("Normal images that scored highest (the false alarms)", entries(normals), no_normal),
                            gallery("Defective images that scored lowest (the misses)", entries(defects[::-1]),
                                    no_defect)])


def report_predictions(folder: Path, scores: np.ndarray, thr: float | None, flagged: str, top: list,
                       errors: dict) -> str:
    """--predict: the folder's score distribution, its highest-scoring images (top: [(score, path, image, map,
    colour range)]) and every file that could not be read with its reason."""
    unread = "".join(f"<p><b>{html.escape(str(rel))}</b>: {html.escape(why)}</p>" for rel, why in errors.items())
    return "".join([f"<h2>Predictions for {html.escape(str(folder))}</h2><p>{len(scores)} images scored, "
                    f"{html.escape(flagged)}; every score in predictions.csv.</p>",
                    score_histogram([("scored", scores, "black")], thr),
                    gallery("Highest-scoring images (input | heatmap over the input)",
                            [(heatmap_panels(im, a, r), f"{rel}: score {s:.4g}") for s, rel, im, a, r in top],
                            "None: no image could be scored."),
                    "<h3>Files that could not be read</h3>", unread or "<p>None.</p>"])


def write_report(path: Path, title: str, sections: list[str]) -> None:
    style = ("body{font-family:sans-serif;margin:20px;max-width:1400px}pre{background:#f3f3f3;padding:8px;"
             "overflow-x:auto}figure{display:inline-block;margin:4px;vertical-align:top}figure img{height:160px}"
             "figcaption{font-size:12px;max-width:480px}svg{margin:4px;border:1px solid #eee}")
    atomic_save(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
                f"{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>", path)
    print(f"report: {path} ({path.stat().st_size / 2**20:.1f} MB)", flush=True)


# ----------------------------------------------------------------------------------------------
# One run: train (Sec. 2.5), memory bank (Sec. 2.6), threshold (ours, not the paper's), test (Sec. 3)
# ----------------------------------------------------------------------------------------------
def fit(cfg: Config, data: Category, seed: int, device: torch.device) -> dict:
    """Train Patch AE on train/good minus the held-out images, validating on those; then the memory
    bank and the threshold from the selected encoder. Returns encoder, bank, threshold, curves, timing."""
    seed_everything(seed)
    paper_protocol = "all of train/good trains and fills the bank, as the paper's"
    if data.validation is not None:  # the dataset holds out its own normal images (MVTec AD 2)
        train, held = data.train, data.validation
        protocol = paper_protocol + " (the dataset's own normal images validate)"
    else:
        order = torch.randperm(len(data.train))
        n_hold = int(round(len(order) * cfg.holdout))
        if len(order) - n_hold < 1:
            raise UsageError(f"--holdout {cfg.holdout} leaves no training image of {len(order)}; lower it")
        train, held = data.train[order[n_hold:]], data.train[order[:n_hold]]
        protocol = paper_protocol if not n_hold else (f"{n_hold} of {len(data.train)} train/good images held "
                                                      f"out for validation and the threshold, not the paper's protocol")
    if not len(held) and cfg.select == "best" and cfg.epochs > 0:
        raise UsageError("--select best validates on held-out normal images, and --holdout 0 leaves none; "
                         "pass --holdout > 0, or --select last to keep the last epoch")
    print(f"training on {len(train)} images, {len(held)} held out for validation and the threshold", flush=True)
    model = PatchAE(load_backbone(cfg.backbone, cfg.weights), cfg.feat_dim)
    cfg.feat_dim = model.encoder.feat_dim
    t0 = clock(device)
    training = train_patch_ae(model, train, cfg, device, make_validation(held, train, seed) if len(held) else None)
    encoder = model.encoder
    t1 = clock(device)
    bank = build_memory_bank(extract_features(encoder, train, cfg.batch_size, device), cfg.coreset_ratio, seed)
    t2 = clock(device)
    train_seconds, bank_seconds = t2 - t0, t2 - t1
    print(f"memory bank {tuple(bank.shape)} ({cfg.coreset_ratio:g} coreset) in {bank_seconds:.1f}s; "
          f"training + bank {train_seconds:.1f}s", flush=True)
    threshold, map_range = None, None
    if len(held):  # a threshold from normal images alone: the q-quantile of their image scores
        s, maps = score_images(encoder, bank, held, cfg.batch_size, device, cfg.image_score, cfg.knn_memory_mb,
                               desc="held-out")
        threshold = float(np.quantile(s, cfg.threshold_quantile))
        map_range = heat_range(maps)  # heatmap colours from here on: red = above any held-out pixel
        print(f"threshold {threshold:.4f} = {cfg.threshold_quantile:g} quantile of {len(held)} held-out scores")
    return {"encoder": encoder, "bank": bank, "threshold": threshold, "map_range": map_range,
            "n_train": len(train), "n_holdout": len(held), "protocol": protocol, "train_seconds": train_seconds,
            "bank_seconds": bank_seconds, **training}


def evaluate(cfg: Config, model: dict, data: Category, device: torch.device, out: Path) -> tuple:
    """The test set's metrics, F1 at the threshold and ms per image, and --save-maps heatmaps. Returns
    (result, image scores (M,), anomaly maps (M, S, S))."""
    t0 = clock(device)
    scores, maps = score_images(model["encoder"], model["bank"], data.test, cfg.batch_size, device, cfg.image_score,
                                cfg.knn_memory_mb, desc="test")
    ms = (clock(device) - t0) / len(data.test) * 1000
    thr, both_classes = model["threshold"], len(np.unique(data.labels)) == 2
    f1 = float(f1_score(data.labels, scores >= thr)) if thr is not None and both_classes else None
    result = {**compute_metrics(data.labels, scores, data.masks, maps), "f1_at_threshold": f1, "ms_per_image": ms}
    vrange = heat_range(maps, model["map_range"])
    for i in np.linspace(0, len(scores) - 1, min(cfg.save_maps, len(scores))).round().astype(int):
        p = data.test_paths[i]
        save_heatmap(out / "maps" / f"{p.parent.name}_{p.stem}.png", data.test[i], maps[i], vrange,
                     None if data.masks is None else data.masks[i])
    return result, scores, maps


def predict_folder(cfg: Config, model: dict, folder: Path, device: torch.device, out: Path) -> tuple[str, str | None]:
    """Scores every image under `folder` (recursively) into predictions.csv and one heatmap each, named after
    the whole file name (a.png, a.jpg -> a.png.png, a.jpg.png), one batch at a time: memory stays flat whatever
    the folder size (but for the CSV rows and the report's top images). An unreadable file gets a row saying
    why; the others are scored. Returns the report's section and None, or, when some files could not be
    read, the line that ends the run (exit code 2)."""
    if not folder.is_dir():
        raise UsageError(f"--predict {folder}: folder not found")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise UsageError(f"--predict {folder}: no images ({', '.join(IMAGE_EXTS)}) in it or below it")
    thr = model["threshold"]
    if model["map_range"] is None:
        print("note: the model has no heatmap colour range (it was trained with --holdout 0): each heatmap "
              "is coloured from its own lowest to its highest pixel")
    rows, errors, top, all_scores = [["path", "score", "is_anomalous", "error"]], {}, [], []
    progress = Progress("predict", len(paths), "img")
    for start in range(0, len(paths), cfg.batch_size):
        batch, images = paths[start:start + cfg.batch_size], []
        for p in batch:
            try:
                images.append(read_image(p, cfg.image_size, cfg.crop_size))
            except UsageError as e:  # this file's row says why; the others are scored
                errors[p.relative_to(folder)] = str(e).removeprefix(f"{p}: ")
                progress.update()
        scores, maps = score_images(model["encoder"], model["bank"], torch.stack(images), cfg.batch_size, device,
                                    cfg.image_score, cfg.knn_memory_mb, progress=progress) if images else ([], [])
        scored = iter(zip(scores, images, maps))
        for rel in (p.relative_to(folder) for p in batch):
            if rel in errors:
                rows.append([str(rel), "", "", errors[rel]])
                continue
            s, image, amap = next(scored)
            rows.append([str(rel), f"{s:.6f}", "" if thr is None else int(s >= thr), ""])
            all_scores.append(float(s))
            own = heat_range(amap, model["map_range"])
            save_heatmap(out / "heatmaps" / rel.with_name(rel.name + ".png"), image, amap, own)
            top = sorted(top + [(float(s), str(rel), image, amap, own)], key=lambda t: -t[0])[:cfg.report_images]
    atomic_save(csv_text(rows), out / "predictions.csv")
    scores = np.array(all_scores)
    flagged = "no threshold in the model" if thr is None else f"{int((scores >= thr).sum())} above {thr:.4f}"
    print(f"predicted {len(scores)} images ({flagged}): {out / 'predictions.csv'}")
    section = report_predictions(folder, scores, thr, flagged, top, errors)
    if errors:
        return section, (f"--predict {folder}: {len(errors)} of {len(paths)} files could not be read (the error "
                         f"column of {out / 'predictions.csv'} says why); the other {len(scores)} were scored")
    return section, None


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def output_folder(cfg: Config) -> Path:
    out = Path(cfg.out or f"runs/{cfg.category}__{cfg.seed[0]}__{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.overwrite and any((out / n).exists() for n in ("results.json", "results.csv", "predictions.csv")):
        raise UsageError(f"--out {out}: already holds results; pick another --out or pass --overwrite")
    return out


def categories_and_seeds(cfg: Config, root: Path):
    """Yields (category, seed, data) for every run that the flags ask for, each category read once."""
    categories = find_categories(root, cfg.dataset) if cfg.category == "all" else [cfg.category]
    if not categories:
        raise UsageError(f"--category all: no category under {root}; expected {LAYOUTS[cfg.dataset]} "
                         f"(--dataset {cfg.dataset})")
    seeds = cfg.seed[:1] if cfg.load else cfg.seed
    if (cfg.save or cfg.predict) and len(categories) * len(seeds) > 1:
        raise UsageError("--save and --predict take one category and one seed")
    for category in categories:
        data = load_category(root, category, cfg.image_size, cfg.crop_size, cfg.dataset)
        for seed in seeds:
            print(f"== {category}, seed {seed}: {len(data.train)} train, {len(data.test)} test images", flush=True)
            yield category, seed, data


def record(cfg: Config, category: str, seed: int, data: Category, model: dict, result: dict,
           device: torch.device) -> dict:
    """What results.json keeps of one run: the metrics, RUN_FIELDS, the config and the versions."""
    return {"dataset": cfg.dataset, "category": category, "seed": seed, **result,
            **{key: model[key] for key in RUN_FIELDS}, "n_test": len(data.test),
            "memory_bank_shape": list(model["bank"].shape), "config": dataclasses.asdict(cfg), "device": str(device),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "published_image_auroc": {**published(cfg.dataset, category), "source": PEER_AUROC[cfg.dataset][0]}}


def run(cfg: Config, given: set) -> list[dict]:
    """Each step the flags ask for: train (or load) and test, results, --predict, report.html. Returns the records."""
    device, out, root = pick_device(cfg.device), output_folder(cfg), Path(cfg.data_root)
    if cfg.synthetic:
        make_synthetic_category(root)
    model = load_model(cfg.load, cfg, given, device) if cfg.load else None
    weights = "from " + cfg.load if cfg.load else cfg.weights
    print(f"device {device}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"backbone {cfg.backbone}, weights {weights}", flush=True)
    if cfg.weights == "none" and not cfg.load:
        print("note: --weights none (random init): results are not comparable with the paper's")
    runs, sections, unreadable = [], [], None
    if not (cfg.load and cfg.predict):  # a loaded model with --predict only scores the folder
        for category, seed, data in categories_and_seeds(cfg, root):
            model = model if cfg.load else fit(cfg, data, seed, device)
            result, scores, maps = evaluate(cfg, model, data, device, out)
            runs.append(record(cfg, category, seed, data, model, result, device))
            print(result_line(runs[-1]), flush=True)
            if cfg.report_images:
                sections.append(report_run(runs[-1], model, data, scores, maps, cfg.report_images))
            if cfg.save:
                save_model(cfg.save, cfg, model)
        sections.insert(0, f"<pre>{html.escape(write_results(runs, cfg.dataset, out))}</pre>")
    if cfg.predict:
        section, unreadable = predict_folder(cfg, model, Path(cfg.predict), device, out)
        sections.append(section)
    if cfg.report_images:
        write_report(out / "report.html", f"Patch AE: {cfg.predict if cfg.load and cfg.predict else cfg.category}, "
                     f"{cfg.backbone}, weights {weights}, {device}, {time.strftime('%Y-%m-%d %H:%M')}", sections)
    if unreadable:
        raise UsageError(unreadable)
    return runs


def main(argv=None) -> list[dict]:
    try:
        cfg, given = parse_config(argv)
        return run(cfg, given)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
