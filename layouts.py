"""The dataset layouts beside MVTec AD, which deploy.py and bench.py take with --dataset: VisA
and MVTec AD 2, each as it unpacks, read into the same tensors as patch_ae.py's MVTec AD reader
(patch_ae.Layout, with the image and mask rules of patch_ae.list_images and
labelled_test_images)."""
from __future__ import annotations

import csv
from pathlib import Path

from patch_ae import Layout, UsageError, labelled_test_images, list_images, mvtec_categories

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


# Published image AUROC (%) printed beside ours on VisA: THEIR numbers, not ours
IM_IAD = ("the IM-IAD benchmark, github.com/M-3LAB/IM-IAD, 'vanilla setting on VisA', PatchCore "
          "row; no Patch AE number is published for VisA", {
              "IM-IAD PatchCore": {
                  "candle": 98.6, "capsules": 81.6, "cashew": 97.3, "chewinggum": 99.1,
                  "fryum": 96.2, "macaroni1": 97.5, "macaroni2": 78.1, "pcb1": 98.5, "pcb2": 97.3,
                  "pcb3": 97.9, "pcb4": 99.6, "pipe_fryum": 99.8, "mean": 95.1}})
VISA = Layout("visa", VISA_TREE, "https://github.com/amazon-science/spot-diff", visa_categories,
              read_visa, IM_IAD)
MVTEC2 = Layout("mvtec2", MVTEC2_TREE, "https://www.mvtec.com/company/research/datasets/mvtec-ad-2",
                mvtec_categories, read_mvtec2)
