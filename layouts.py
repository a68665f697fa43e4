"""Image files and dataset layouts as they unpack on disk, beside the method: decoding a file
with a clear error, deep greyscale to 8 bit, listing a folder, matching each test image to its
mask by name, and the Layout record with which patch_ae.py reads MVTec AD. Also the layouts
beside MVTec AD: VisA and MVTec AD 2, which deploy.py and bench.py take with --dataset."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from cli import UsageError

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
    dataset's own held-out normal images, or [])."""
    name: str
    tree: str
    url: str
    categories: Callable[[Path], list]
    read: Callable[[Path, str], tuple]


def find_categories(root: Path, layout: Layout) -> list[str]:
    if not root.is_dir():
        which = "" if layout.name == "mvtec" else f" (--dataset {layout.name})"
        raise UsageError(f"--data-root {root}: folder not found; expected {layout.tree}"
                         f"{which}. Get it from {layout.url} and pass "
                         f"--data-root (or set MVTEC_ROOT), or run with --synthetic")
    return layout.categories(root)


# ----------------------------------------------------------------------------------------------
# VisA and MVTec AD 2
# ----------------------------------------------------------------------------------------------
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_TREE = (f"ROOT/{VISA_CSV.as_posix()} (header object,split,label,image,mask; split "
             "train|test; label normal|anomaly; paths relative to ROOT), "
             "ROOT/<object>/Data/Images/{Normal,Anomaly}/*.JPG, "
             "ROOT/<object>/Data/Masks/Anomaly/*.png")
MVTEC2_TREE = ("ROOT/<category>/train/good/*.png, ROOT/<category>/validation/good/*.png, "
               "ROOT/<category>/test_public/{good,bad}/*.png, "
               "ROOT/<category>/test_public/ground_truth/bad/<name>_mask.png")


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


def read_mvtec2(root: Path, category: str) -> tuple[list, list, list]:
    """MVTec AD 2: test_public holds the labelled test set; the test_private* folders have no
    labels (score them with --predict); validation/good is the held-out normal set."""
    base, public = root / category, root / category / "test_public"
    return (list_images(base / "train" / "good", MVTEC2_TREE),
            labelled_test_images(public, public / "ground_truth", MVTEC2_TREE),
            list_images(base / "validation" / "good", MVTEC2_TREE))


def visa_categories(root: Path) -> list[str]:
    return sorted({row["object"] for row in visa_rows(root)})


VISA = Layout("visa", VISA_TREE, "https://github.com/amazon-science/spot-diff", visa_categories,
              read_visa)
MVTEC2 = Layout("mvtec2", MVTEC2_TREE, "https://www.mvtec.com/company/research/datasets/mvtec-ad-2",
                mvtec_categories, read_mvtec2)
