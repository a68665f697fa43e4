"""Dataset layouts beside MVTec AD (patch_ae.py reads that one): VisA and MVTec AD 2, as each
unpacks. Each is a patch_ae.Layout: its tree in words for error messages, where to get it, its
categories and its reader. deploy.py and bench.py take them with --dataset."""
from __future__ import annotations

import csv
from pathlib import Path

from cli import UsageError
from patch_ae import MVTEC, Layout, labelled_test_images, list_images, mvtec_categories

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
LAYOUTS = {layout.name: layout for layout in (MVTEC, VISA, MVTEC2)}  # --dataset


def layout_for(dataset: str, synthetic: bool = False) -> Layout:
    """--dataset's layout; --synthetic writes MVTec AD's alone."""
    if synthetic and dataset != MVTEC.name:
        raise UsageError(f"--synthetic writes MVTec AD's layout; drop --dataset {dataset}")
    return LAYOUTS[dataset]
