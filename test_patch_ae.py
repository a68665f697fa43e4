"""Tests for patch_ae.py: CPU only, tiny images, resnet18 with random weights (no downloads).
Run: pytest -q"""
import base64
import contextlib
import functools
import importlib.util
import io
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import torchvision
from PIL import Image
from sklearn.neighbors import NearestNeighbors

import bench
import patch_ae as pa
import report

TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "64", "--crop-size", "64",
        "--epochs", "1"]
HOLDOUT = ["--holdout", "0.1"]  # ours: held-out images to validate on and fit a threshold


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    pa.make_synthetic_category(root)
    return root


@pytest.fixture
def data_root(synthetic_root, tmp_path) -> Path:
    """A private copy of the synthetic category, for tests that damage it."""
    shutil.copytree(synthetic_root, tmp_path / "data")
    return tmp_path / "data"


def run_main(args, tmp_path, data_root):
    out = tmp_path / "out"
    pa.main(["--data-root", str(data_root), "--category", "synthetic", "--out", str(out), *args])
    return json.loads((out / "results.json").read_text())


def expect_error(capsys, argv, *fragments):
    """main(argv) must exit 2 with one 'error:' line that contains every fragment, no traceback."""
    with pytest.raises(SystemExit) as e:
        pa.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    return err


# ---------------------------------------------------------------- data
def test_synthetic_category_layout_and_determinism(synthetic_root, tmp_path):
    base = synthetic_root / "synthetic"
    assert len(list((base / "train" / "good").glob("*.png"))) == 60
    for kind in ("scratch", "blob", "stain"):
        images = sorted(p.stem for p in (base / "test" / kind).glob("*.png"))
        masks = sorted(p.stem[:-5] for p in (base / "ground_truth" / kind).glob("*_mask.png"))
        assert images == masks and len(images) == 8
        assert all(np.asarray(Image.open(p)).any()
                   for p in (base / "ground_truth" / kind).glob("*.png"))
    again = pa.make_synthetic_category(tmp_path)
    for rel in ("train/good/000.png", "test/blob/003.png", "ground_truth/stain/002_mask.png"):
        assert (again / rel).read_bytes() == (base / rel).read_bytes()


def test_read_image_converts_grey_rgba_and_16bit(tmp_path):
    grey, rgba = tmp_path / "g.png", tmp_path / "a.png"
    Image.fromarray(np.full((40, 60), 100, np.uint8)).save(grey)
    Image.fromarray(np.full((40, 60, 4), 200, np.uint8)).save(rgba)
    deep = tmp_path / "d.png"
    Image.fromarray(np.full((40, 60), 65535, np.uint16)).save(deep)
    for path, value in ((grey, 100), (rgba, 200), (deep, 255)):
        t = pa.read_image(path, 36, 32)
        assert t.shape == (3, 32, 32) and t.dtype == torch.uint8
        assert int(t.min()) == int(t.max()) == value


def test_masks_are_matched_by_name_not_by_position(tmp_path):
    base = tmp_path / "cat"
    for i in range(2):
        d = base / "train" / "good"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / f"{i}.png")
    # sorted images: img1, img10, img2; sorted masks: img10_mask, img1_mask, img2_mask
    for k, name in enumerate(("img1", "img10", "img2")):
        for sub in ("test/crack", "ground_truth/crack"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(base / "test/crack" / f"{name}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[:, 8 * k:8 * k + 8] = 255  # each mask marks a different column band
        Image.fromarray(mask).save(base / "ground_truth/crack" / f"{name}_mask.png")
    data = pa.load_category(tmp_path, "cat", 32, 32)
    for k, path in enumerate(data.test_paths):
        band = {"img1": 0, "img10": 1, "img2": 2}[path.stem]
        assert data.masks[k][:, 8 * band:8 * band + 8].all() and data.masks[k].sum() == 32 * 8


def test_category_without_ground_truth_gives_image_metrics_only(data_root, tmp_path):
    shutil.rmtree(data_root / "synthetic" / "ground_truth")
    data = pa.load_category(data_root, "synthetic", 64, 64)
    assert data.masks is None
    result = run_main(TINY, tmp_path, data_root)
    assert result["image_auroc"] is not None
    assert result["pixel_auroc"] is None and result["pixel_aupro"] is None
    report = (tmp_path / "out" / "report.html").read_text()
    assert "(this test set has no masks)" in report and report.count("<img ") == 36  # 3 galleries


# ---------------------------------------------------------------- other layouts: VisA, MVTec AD 2
def save_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def band(k: int, height: int, width: int, value: int = 255, left: int = 0) -> np.ndarray:
    """A (height, width) uint8 mask that marks the 8 columns from left + 8k: each test mask its
    own band."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, left + 8 * k:left + 8 * k + 8] = value
    return mask


def textured(seed: int, height: int, width: int, mask: np.ndarray | None = None) -> np.ndarray:
    img = np.random.default_rng(seed).integers(90, 110, (height, width, 3)).astype(np.uint8)
    if mask is not None:
        img[mask > 0] = 250  # the defect: a bright band
    return img


def write_visa(root: Path, objects=("candle",)) -> Path:
    """A tiny VisA tree: per object 4 train and 2 test normal images, 2 anomalies (JPG, 48 wide x
    32 high, as VisA's are wider than high), masks of value 1 (not 255). The anomalies are listed
    as 010 then 002, neither sorted nor in the order of the mask files, so only the CSV row can
    pair image and mask."""
    rows = ["object,split,label,image,mask"]
    for obj in objects:
        images, masks = f"{obj}/Data/Images", f"{obj}/Data/Masks/Anomaly"
        for i in range(6):
            save_image(root / images / "Normal" / f"{i:04d}.JPG", textured(i, 32, 48))
            rows.append(f"{obj},{'train' if i < 4 else 'test'},normal,{images}/Normal/{i:04d}.JPG,")
        for k, name in enumerate(("010", "002")):
            # columns 12+8k.. of 48: inside the centre crop
            mask = band(k, 32, 48, value=1, left=12)
            save_image(root / images / "Anomaly" / f"{name}.JPG", textured(10 + k, 32, 48, mask))
            save_image(root / masks / f"{name}.png", mask)
            rows.append(f"{obj},test,anomaly,{images}/Anomaly/{name}.JPG,{masks}/{name}.png")
    (root / pa.VISA_CSV).parent.mkdir(parents=True, exist_ok=True)
    (root / pa.VISA_CSV).write_text("\n".join(rows) + "\n")
    return root


def write_mvtec2(root: Path, category: str = "can") -> Path:
    """A tiny MVTec AD 2 category: 4 train, 2 validation, 2 good and 3 bad public test images
    (32 px) whose sorted names (img1, img10, img2) differ from their masks' (img10_mask,
    img1_mask, img2_mask), and an unlabelled test_private folder."""
    base = root / category
    for folder, n in (("train/good", 4), ("validation/good", 2), ("test_public/good", 2),
                      ("test_private", 1)):
        for i in range(n):
            save_image(base / folder / f"{i:03d}.png", textured(i, 32, 32))
    for k, name in enumerate(("img1", "img10", "img2")):
        mask = band(k, 32, 32)
        save_image(base / "test_public" / "bad" / f"{name}.png", textured(20 + k, 32, 32, mask))
        save_image(base / "test_public" / "ground_truth" / "bad" / f"{name}_mask.png", mask)
    return root


SMALL = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--crop-size", "32",
         "--epochs", "0"]


def test_visa_is_read_as_its_csv_says(tmp_path):
    root = write_visa(tmp_path)
    assert pa.find_categories(root, "visa") == ["candle"]
    data = pa.load_category(root, "candle", 32, 32, "visa")
    assert data.train.shape == (4, 3, 32, 32) and data.train.dtype == torch.uint8
    assert data.validation is None
    names = [f"{p.parent.name}/{p.stem}" for p in data.test_paths]
    assert names == ["Normal/0004", "Normal/0005", "Anomaly/010", "Anomaly/002"]  # the CSV's order
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert not data.masks[:2].any()
    # resized 48x32 -> 48x32, centre crop drops 8 columns each side: band k at 4+8k
    for k in (0, 1):
        assert data.masks[2 + k][:, 4 + 8 * k:12 + 8 * k].all()
        assert data.masks[2 + k].sum() == 32 * 8  # value 1
    # a defect at the left edge of a wide image falls outside the centre crop
    edge = tmp_path / "edge.png"
    save_image(edge, band(0, 32, 48))
    assert not pa.read_image(edge, 32, 32, mask=True).any()


def test_mvtec2_is_read_with_its_validation_set_and_masks_by_name(tmp_path):
    root = write_mvtec2(tmp_path)
    assert pa.find_categories(root, "mvtec2") == ["can"]
    data = pa.load_category(root, "can", 32, 32, "mvtec2")
    assert data.train.shape == (4, 3, 32, 32) and data.validation.shape == (2, 3, 32, 32)
    assert data.validation.dtype == torch.uint8
    assert [f"{p.parent.name}/{p.stem}" for p in data.test_paths] == [
        "bad/img1", "bad/img10", "bad/img2", "good/000", "good/001"]
    assert data.labels.tolist() == [1, 1, 1, 0, 0] and not data.masks[3:].any()
    for k, path in enumerate(data.test_paths[:3]):
        b = {"img1": 0, "img10": 1, "img2": 2}[path.stem]
        assert data.masks[k][:, 8 * b:8 * b + 8].all() and data.masks[k].sum() == 32 * 8


VISA_BREAKS = {  # what breaks the tiny VisA tree -> what the one-line error must say
    "no csv": (lambda r: (r / pa.VISA_CSV).unlink(),
               ["split_csv/1cls.csv: not found", "Data/Images"]),
    "no mask column": (lambda r: edit(r / pa.VISA_CSV, "image,mask\n", "image\n"),
                       ["1cls.csv: no column mask in its header row",
                        "object,split,label,image,mask"]),
    "image gone": (lambda r: (r / "candle/Data/Images/Anomaly/002.JPG").unlink(),
                   ["1cls.csv, line 9: image", "002.JPG not found",
                    "Data/Images/{Normal,Anomaly}"]),
    "mask gone": (lambda r: (r / "candle/Data/Masks/Anomaly/010.png").unlink(),
                  ["1cls.csv, line 8: mask", "010.png not found", "Data/Masks/Anomaly"]),
    "no mask": (lambda r: edit(r / pa.VISA_CSV, ",candle/Data/Masks/Anomaly/002.png", ","),
                ["1cls.csv, line 9: an anomaly row without a mask"]),
    "bad label": (lambda r: edit(r / pa.VISA_CSV, "test,anomaly,candle/Data/Images/Anomaly/010",
                                 "test,defect,candle/Data/Images/Anomaly/010"),
                  ["1cls.csv, line 8: split 'test', label 'defect'", "normal|anomaly"]),
    "anomaly in train": (lambda r: edit(r / pa.VISA_CSV,
                                        "test,anomaly,candle/Data/Images/Anomaly/010",
                                        "train,anomaly,candle/Data/Images/Anomaly/010"),
                         ["1cls.csv, line 8: an anomaly row in the train split"]),
}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


MVTEC2_BREAKS = {
    "no validation": (lambda r: shutil.rmtree(r / "can" / "validation"),
                      ["validation/good: no images", "ROOT/<category>/validation/good/*.png"]),
    "mask without image": (lambda r: (r / "can/test_public/bad/img2.png").unlink(),
                           ["img2_mask.png: mask with no test image", "test_public/bad/img2"]),
    "image without mask": (lambda r: (r / "can/test_public/ground_truth/bad/"
                                          "img10_mask.png").unlink(),
                           ["test_public/bad/img10: defect image with no mask"]),
}


@pytest.mark.parametrize("dataset,what", [("visa", w) for w in VISA_BREAKS]
                         + [("mvtec2", w) for w in MVTEC2_BREAKS])
def test_broken_layouts(capsys, tmp_path, dataset, what):
    write, category, broken = {"visa": (write_visa, "candle", VISA_BREAKS),
                               "mvtec2": (write_mvtec2, "can", MVTEC2_BREAKS)}[dataset]
    root = write(tmp_path)
    breaks, fragments = broken[what]
    breaks(root)
    expect_error(capsys, ["--dataset", dataset, "--data-root", str(root), "--category", category,
                          *SMALL], *fragments)


def test_dataset_errors_name_the_layout_they_expected(capsys, tmp_path):
    visa, mvtec2 = write_visa(tmp_path / "visa"), write_mvtec2(tmp_path / "mvtec2")
    expect_error(capsys, ["--dataset", "visa", "--data-root", str(visa), "--category", "candel",
                          *SMALL], "--category candel", "found: candle", "split_csv/1cls.csv")
    expect_error(capsys, ["--dataset", "mvtec2", "--data-root", str(mvtec2), "--category", "cna",
                          *SMALL], "--category cna", "found: can", "test_public")
    # MVTec AD 2 read as MVTec AD
    expect_error(capsys, ["--data-root", str(mvtec2), "--category", "can", *SMALL],
                 "can/test: no images", "ROOT/<category>/test/<good|defect_type>")
    expect_error(capsys, ["--dataset", "visa", "--data-root", str(tmp_path / "nope"), *SMALL],
                 "folder not found", pa.DATASET_URLS["visa"])
    expect_error(capsys, ["--synthetic", "--dataset", "visa", *SMALL], "--synthetic",
                 "drop --dataset visa")


def test_all_visa_categories_end_to_end_beside_im_iad(tmp_path, capsys):
    root = write_visa(tmp_path / "visa", ("candle", "pcb1"))
    out = tmp_path / "out"
    pa.main(["--dataset", "visa", "--data-root", str(root), "--category", "all", "--out", str(out),
             *SMALL])
    printed = capsys.readouterr().out
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["dataset"], r["category"], r["n_train"] + r["n_holdout"], r["n_test"])
            for r in runs] == [("visa", "candle", 4, 4), ("visa", "pcb1", 4, 4)]
    assert all(r["image_auroc"] is not None and r["pixel_auroc"] is not None for r in runs)
    assert runs[0]["published_image_auroc"]["IM-IAD PatchCore"] == 98.6 and "IM-IAD" in runs[0][
        "published_image_auroc"]["source"]
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].endswith("| ms/img | IM-IAD PatchCore |")
    assert table[1].startswith("| candle |") and table[1].endswith("| 98.6 |")
    assert table[2].startswith("| pcb1 |") and table[2].endswith("| 98.5 |")
    # theirs is over all 12 objects
    assert table[3].startswith("| mean |") and table[3].endswith("| n/a |")
    assert ("IM-IAD PatchCore: published image AUROC, theirs, not ours (the IM-IAD benchmark"
            in printed)


def test_all_mvtec2_categories_end_to_end_without_peer_columns(tmp_path, capsys):
    root = write_mvtec2(tmp_path / "mvtec2")
    out = tmp_path / "out"
    pa.main(["--dataset", "mvtec2", "--data-root", str(root), "--category", "all", "--out",
             str(out), *SMALL])
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"] == "mvtec2" and result["n_test"] == 5
    assert result["pixel_auroc"] is not None
    header = ("| category | kept epoch | image AUROC | pixel AUROC | pixel AUPRO@30% | train s "
              "| ms/img |\n")
    assert header in capsys.readouterr().out


def test_peer_mean_is_shown_only_when_every_category_ran():
    run = {"seed": 0, "image_auroc": 0.9, "pixel_auroc": None, "pixel_aupro": None,
           "train_seconds": 1.0, "ms_per_image": 1.0, "protocol": "test", "selected_epoch": 1,
           "untrained": None}
    objects = [c for c in report.PEER_AUROC["visa"][1]["IM-IAD PatchCore"] if c != "mean"]
    assert len(objects) == 12
    rows = report.summarize([dict(run, category=c) for c in objects], "visa")
    assert rows[-1]["category"] == "mean" and rows[-1]["IM-IAD PatchCore"] == 95.1
    assert rows[-1]["image_auroc"] == pytest.approx(0.9)
    rows = report.summarize([dict(run, category=c) for c in objects[1:]], "visa")
    assert rows[-1]["IM-IAD PatchCore"] is None
    listed = report.PEER_AUROC["visa"][1]["IM-IAD PatchCore"]
    published = [v for c, v in listed.items() if c != "mean"]
    assert round(sum(published) / 12, 1) == 95.1  # the listed mean is the mean of the listed values


# ---------------------------------------------------------------- CutPaste
@pytest.mark.parametrize("seed", range(5))
def test_cutpaste_normal_changes_only_a_rectangle_of_2_to_15_percent(seed):
    torch.manual_seed(seed)
    img = torch.rand(3, 64, 64)
    out, mask = pa.cutpaste(img, scar=False)
    changed = (out != img).any(0)
    assert changed.any() and not (changed & ~mask).any()
    ys, xs = torch.where(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert box == mask.sum()                     # the pasted region is one full rectangle
    assert 0.015 <= mask.float().mean() <= 0.16  # 2-15% of the image, up to rounding of the sides


@pytest.mark.parametrize("seed", range(5))
def test_cutpaste_scar_is_a_thin_rotated_strip(seed):
    torch.manual_seed(seed)
    img = torch.rand(3, 256, 256)
    out, mask = pa.cutpaste(img, scar=True, scale=1.0)
    changed = (out != img).any(0)
    assert changed.any() and not (changed & ~mask).any()
    # area of a 2-16 x 10-25 strip after rotation
    assert 2 * 10 * 0.5 <= mask.sum() <= 16 * 25 * 1.2
    ys, xs = torch.where(mask)
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= math.hypot(16, 25) + 2


# ---------------------------------------------------------------- encoder, decoder, loss
@pytest.mark.parametrize("name,c12", [("resnet18", 128 + 256), ("resnet50", 512 + 1024)])
def test_encoder_decoder_shapes(name, c12):
    model = pa.PatchAE(pa.load_backbone(name, "none"))
    assert model.encoder.feat_dim == c12 // 3
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        r = model.encoder(x)
        assert r.shape == (2, c12 // 3, 8, 12)   # one vector per 8x8 patch
        assert model.decoder(r).shape == x.shape
    with pytest.raises(pa.UsageError, match="feat-dim"):
        pa.Encoder(pa.load_backbone(name, "none"), feat_dim=c12)  # the paper needs c3 < c1 + c2


def test_decoder_patch_depends_only_on_its_own_feature_vector():
    torch.manual_seed(0)
    dec = pa.Decoder(16)
    r = torch.randn(1, 16, 4, 5)
    r2 = r.clone()
    r2[0, :, 2, 3] += torch.randn(16)
    with torch.no_grad():
        diff = (dec(r2) - dec(r)).abs().sum(1)[0]  # (32, 40)
    inside = torch.zeros_like(diff, dtype=torch.bool)
    inside[16:24, 24:32] = True
    assert diff[inside].min() > 0 and diff[~inside].max() == 0


def test_backbone_batchnorm_statistics_stay_frozen_while_training():
    torch.manual_seed(0)
    model = pa.PatchAE(pa.load_backbone("resnet18", "none")).train()
    bn = model.encoder.stem[1]
    before = bn.running_mean.clone()
    weight_before = model.encoder.layer2[0].conv1.weight.clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(2, 3, 64, 64) * 3 + 1
    pa.patch_loss(model(x), x, 0.5).backward()
    opt.step()
    assert torch.equal(bn.running_mean, before) and not bn.training
    # trained end to end
    assert not torch.equal(model.encoder.layer2[0].conv1.weight, weight_before)


def standardised(v: torch.Tensor) -> torch.Tensor:
    return (v - v.mean()) / torch.sqrt(v.var() + 1e-6)


def test_patch_loss_is_zero_for_a_perfect_reconstruction_and_matches_hand_computation():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 16, 24)
    assert pa.patch_loss(target.clone(), target, 0.5).item() == 0.0
    recon = torch.randn(2, 3, 16, 24)
    expected = 0.0
    for b in range(2):
        for i in range(2):
            for j in range(3):  # the 8x8 patch (i, j), all 3 channels: 192 values
                p_hat = recon[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8].flatten().double()
                p = target[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8].flatten().double()
                expected += (0.3 * torch.linalg.norm(standardised(p_hat) - standardised(p))
                             + 0.7 * torch.linalg.norm(p_hat - p))
    assert (pa.patch_loss(recon, target, alpha=0.3).item()
            == pytest.approx(expected.item() / 2, rel=1e-5))


# ---------------------------------------------------------------- training: optimiser,
# validation, selection
def test_validation_set_has_one_defect_of_each_kind_per_held_out_image_with_its_mask():
    rng = np.random.default_rng(0)
    held = torch.from_numpy(rng.integers(60, 200, (4, 3, 64, 64), dtype=np.uint8))
    train = torch.from_numpy(rng.integers(0, 255, (100, 3, 64, 64), dtype=np.uint8))
    val = pa.make_validation(held, train, seed=0)
    n = len(held)
    assert val.images.shape == (4 * n, 3, 64, 64) and val.images.dtype == torch.uint8
    assert list(val.labels) == [0] * n + [1] * (3 * n)
    assert torch.equal(val.images[:n], held) and not val.masks[:n].any()
    for k, kind in enumerate(pa.DEFECT_KINDS):
        for i in range(n):
            img, mask = val.images[n * (k + 1) + i].int(), val.masks[n * (k + 1) + i]
            changed = (img - held[i].int()).abs().amax(0) > 1             # rounding aside
            assert mask.sum() >= 8, kind
            if kind == "stain":  # a multiplicative darkening, at least 16% inside the mask
                ratio = img[:, mask].float() / held[i][:, mask].float()
                assert (ratio <= 0.85).all() and (img <= held[i].int() + 1).all()
            else:
                # one foreign colour painted exactly on the mask: not image content moved, as
                # CutPaste does
                assert torch.equal(changed & ~mask, torch.zeros_like(mask))
                assert changed[mask].float().mean() > 0.9
                assert (img[:, mask] == img[:, mask][:, :1]).all()
    # the bank: at most VAL_BANK_IMAGES training images and VAL_BANK_ROWS of their patch rows,
    # all distinct
    assert len(val.bank_images) == pa.VAL_BANK_IMAGES == 64
    assert len(val.bank_rows) == 64 * 8 * 8  # < VAL_BANK_ROWS
    assert len(val.bank_rows.unique()) == len(val.bank_rows)
    assert int(val.bank_rows.max()) < pa.VAL_BANK_IMAGES * 64
    again = pa.make_validation(held, train, seed=0)
    assert torch.equal(again.images, val.images) and torch.equal(again.bank_rows, val.bank_rows)
    assert not torch.equal(pa.make_validation(held, train, seed=1).images, val.images)


def test_optimiser_groups_follow_backbone_lr_and_the_stem_stays_frozen():
    def trainable_and_lrs(**kw):
        model = pa.PatchAE(pa.load_backbone("resnet18", "none"))
        opt = pa.make_optimizer(model, pa.Config(lr=1e-3, **kw))
        enc = model.encoder
        parts = {"stem": enc.stem, "layer2": enc.layer2, "layer3": enc.layer3, "fuse": enc.fuse,
                 "dec": model.decoder}
        trainable = {k for k, m in parts.items() if all(p.requires_grad for p in m.parameters())}
        in_opt = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        lrs = {k: {in_opt.get(id(p)) for p in m.parameters()} for k, m in parts.items()}
        return trainable, lrs
    trainable, lrs = trainable_and_lrs(backbone_lr=0.1)
    assert trainable == {"layer2", "layer3", "fuse", "dec"}
    assert lrs["stem"] == {None} and lrs["layer2"] == lrs["layer3"] == {1e-3 * 0.1}
    assert lrs["fuse"] == lrs["dec"] == {1e-3}
    trainable, lrs = trainable_and_lrs(backbone_lr=1.0)
    assert trainable == {"layer2", "layer3", "fuse", "dec"} and lrs["layer3"] == {1e-3}
    trainable, _ = trainable_and_lrs(backbone_lr=0.0)
    assert trainable == {"fuse", "dec"}
    assert trainable_and_lrs() == trainable_and_lrs(backbone_lr=0.1)  # the default


def test_frozen_stem_does_not_change_and_cosine_schedule_ends_near_zero(synthetic_root):
    torch.manual_seed(0)
    images = pa.load_category(synthetic_root, "synthetic", 32, 32).train[:8]
    model = pa.PatchAE(pa.load_backbone("resnet18", "none"))
    stem, layer3 = [{k: v.clone() for k, v in m.state_dict().items()}
                    for m in (model.encoder.stem, model.encoder.layer3)]
    seen = []
    original_step = torch.optim.Adam.step

    def step(self, *a, **k):  # record the learning rate of every optimiser step
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *a, **k)
    cfg = pa.Config(epochs=3, batch_size=4, image_size=32, crop_size=32, lr=1e-3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Adam, "step", step)
        result = pa.train_patch_ae(model, images, cfg, torch.device("cpu"))
    assert all(torch.equal(v, model.encoder.stem.state_dict()[k]) for k, v in stem.items())
    assert any(not torch.equal(v, model.encoder.layer3.state_dict()[k]) for k, v in layer3.items())
    assert len(seen) == 6 and seen[0] == pytest.approx(1e-3) and seen[-1] < 0.1 * 1e-3
    assert all(a > b for a, b in zip(seen, seen[1:]))                   # decays at every step
    assert result["selected_epoch"] == 3 and result["validation_curve"] == []
    assert len(result["loss_by_epoch"]) == 3


@pytest.mark.parametrize("fake,select,tolerance,expected", [
    ([0.5, 0.7, 0.9, 0.9, 0.6], "best", 0.0, 2),     # the tie at 3 goes to the earlier epoch
    ([0.5, 0.7, 0.9, 0.9, 0.6], "last", 0.0, 4),
    ([0.8, 0.805, 0.809, 0.6, 0.81], "best", 0.01, 0),  # no epoch beats epoch 0 by more than 0.01
    ([0.8, 0.805, 0.809, 0.6, 0.81], "best", 0.0, 4),
    ([0.8, 0.805, 0.812, 0.6, 0.82], "best", 0.01, 2)])  # 0.812 > 0.81; 0.82 is not above 0.822
def test_selection_keeps_the_state_of_the_best_validation_score(synthetic_root, monkeypatch, fake,
                                                                 select, tolerance, expected):
    """A fake validation curve over epochs 0-4; the encoder and the decoder end with exactly the
    selected epoch's weights."""
    data = pa.load_category(synthetic_root, "synthetic", 32, 32)
    states, decoders, fit = [], [], pa.fit

    def validate(encoder, val, cfg, device):
        states.append({k: v.clone() for k, v in encoder.state_dict().items()})
        decoders.append({k: v.clone() for k, v in model_seen[0].decoder.state_dict().items()})
        return {"image_auroc": 0.0, "pixel_auroc": None, "pixel_aupro": 0.0,
                "score": fake[len(states) - 1], "feature_norm": 1.0, "dead_units": 0.0,
                "normal_distance": 1.0}
    model_seen, train = [], pa.train_patch_ae

    def spy_train(model, *args, **kwargs):
        model_seen.append(model)
        return train(model, *args, **kwargs)
    monkeypatch.setattr(pa, "validate", validate)
    monkeypatch.setattr(pa, "train_patch_ae", spy_train)
    monkeypatch.setattr(pa, "VAL_TOLERANCE", tolerance)
    monkeypatch.setattr(pa, "auto_val_every", lambda *a: 1)
    cfg = pa.Config(epochs=4, batch_size=16, image_size=32, crop_size=32, backbone="resnet18",
                    weights="none", select=select, holdout=0.1, lr=1e-3)
    model = fit(cfg, data, 0, torch.device("cpu"))
    assert model["selected_epoch"] == expected
    assert [r["epoch"] for r in model["validation_curve"]] == [0, 1, 2, 3, 4]
    assert [r["score"] for r in model["validation_curve"]] == fake
    assert len(model["loss_by_epoch"]) == 4
    final, decoder = model["encoder"].state_dict(), model["decoder"].state_dict()
    assert all(torch.equal(final[k], v) for k, v in states[expected].items())
    assert all(torch.equal(decoder[k], v) for k, v in decoders[expected].items())
    # the weights moved
    assert not all(torch.equal(final[k], v) for k, v in states[4].items()) or expected == 4


def test_validation_every_n_epochs_and_after_the_last(synthetic_root, monkeypatch):
    data = pa.load_category(synthetic_root, "synthetic", 32, 32)
    calls = []
    monkeypatch.setattr(pa, "validate", lambda *a: calls.append(1) or {
        "image_auroc": 1.0, "pixel_auroc": 1.0, "pixel_aupro": 1.0, "score": 1.0,
        "feature_norm": 1.0, "dead_units": 0.0, "normal_distance": 1.0})
    monkeypatch.setattr(pa, "auto_val_every", lambda *a: 2)
    cfg = pa.Config(epochs=5, image_size=32, crop_size=32, backbone="resnet18", weights="none",
                    holdout=0.1, select="best")
    model = pa.fit(cfg, data, 0, torch.device("cpu"))
    assert [r["epoch"] for r in model["validation_curve"]] == [0, 2, 4, 5]
    assert model["selected_epoch"] == 0 and model["untrained"]["encoder"] is model["encoder"]


def test_a_run_that_keeps_epoch_0_is_labelled_so_everywhere(synthetic_root, tmp_path, capsys):
    model = tmp_path / "m.pt"
    trained = run_main(TINY[:-1] + ["0", *HOLDOUT, "--save", str(model)], tmp_path / "a",
                       synthetic_root)
    printed = capsys.readouterr().out
    assert trained["selected_epoch"] == 0
    assert [r["epoch"] for r in trained["validation_curve"]] == [0]
    assert trained["untrained"] == {k: trained[k]
                                    for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}
    assert "validation, epoch 0: image AUROC" in printed and "selected epoch 0" in printed
    # the result line
    assert "synthetic seed 0, untrained encoder kept (epoch 0): image AUROC" in printed
    assert "| synthetic | 0: untrained encoder kept |" in printed  # the table
    assert not re.search(r"synthetic seed 0, Patch AE", printed)
    report = (tmp_path / "a" / "out" / "report.html").read_text()
    assert trained["loss_by_epoch"] == [] and "selected: epoch 0" in report
    assert "untrained encoder kept (epoch 0)" in report
    assert "The untrained encoder was kept" in report
    assert "training loss (Eq. 3), mean per image: nothing to draw in this run" in report
    blob = torch.load(model, weights_only=True)
    assert blob["selected_epoch"] == 0 and blob["validation_curve"] == trained["validation_curve"]
    loaded = run_main(["--load", str(model)], tmp_path / "b", synthetic_root)
    assert loaded["selected_epoch"] == 0
    assert loaded["validation_curve"] == trained["validation_curve"]
    assert loaded["untrained"] is None  # a loaded model has no untrained encoder to score
    assert "untrained encoder kept (epoch 0): image AUROC" in capsys.readouterr().out


def test_select_best_without_held_out_images_is_refused(capsys, synthetic_root, tmp_path):
    argv = ["--data-root", str(synthetic_root), "--category", "synthetic", "--out", str(tmp_path),
            *TINY]
    expect_error(capsys, argv + ["--select", "best"], "--select best", "--holdout 0",
                 "pass --holdout 0.1, or drop --select best")
    result = pa.main(argv)[0]  # the default: the paper's protocol
    assert result["selected_epoch"] == 1 and result["n_holdout"] == 0
    assert result["threshold"] is None
    assert result["protocol"].startswith("the paper's: all 60 train/good images train and fill the "
                                         "memory bank, the last epoch kept; the recipe ours")
    assert "the stem frozen, layer2 and layer3 at 0.1 x the learning rate" in result["protocol"]
    assert f"protocol: {result['protocol']}" in capsys.readouterr().out


def test_validation_uses_the_datasets_own_held_out_images(synthetic_root):
    """A dataset that ships held-out normal images (MVTec AD 2's validation/good): all of
    train/good trains."""
    data = pa.load_category(synthetic_root, "synthetic", 32, 32)
    data.validation = data.train[:5]
    cfg = pa.Config(epochs=0, image_size=32, crop_size=32, backbone="resnet18", weights="none")
    model = pa.fit(cfg, data, 0, torch.device("cpu"))
    assert model["n_train"] == 60 and model["n_holdout"] == 5 and model["threshold"] is not None


# ---------------------------------------------------------------- memory bank, kNN, maps, metrics
def test_coreset_returns_the_requested_count_and_covers_better_than_random():
    torch.manual_seed(0)
    # a big and a small cluster
    x = torch.cat([torch.randn(1900, 4), torch.randn(100, 4) * 0.2 + 6])
    idx = pa.greedy_coreset(x, 50)
    assert len(idx) == 50 and len(idx.unique()) == 50

    def radius(sel):  # covering radius: the farthest any point is from its nearest selected point
        return torch.cdist(x, x[sel]).min(1).values.max().item()
    random_radii = [radius(torch.randperm(len(x))[:50]) for _ in range(10)]
    assert radius(idx) < min(random_radii)


@pytest.mark.parametrize("block_mb,k", [(256, 1), (1, 1), (1, 3)])
def test_chunked_knn_equals_brute_force(block_mb, k):
    torch.manual_seed(0)
    bank, queries = torch.randn(20000, 24) * 5 + 3, torch.randn(5000, 24) * 5 + 3
    d, idx = pa.knn_scores(queries, bank, k=k, block_mb=block_mb)  # 1 MB: 52 bank rows a block
    ref_d, ref_idx = NearestNeighbors(n_neighbors=k).fit(bank.numpy()).kneighbors(queries.numpy())
    assert d.shape == idx.shape == (5000, k)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-4, atol=1e-4)
    assert (idx.numpy() == ref_idx).mean() > 0.999  # exact ties aside, the same neighbours


def test_reweighted_image_score_is_a_fraction_of_the_max():
    torch.manual_seed(0)
    bank, queries = torch.randn(500, 8), torch.randn(3 * 16, 8) * 2
    d, idx = pa.knn_scores(queries, bank)
    patch = d.view(3, 16)
    s_max = pa.image_scores(patch, idx, queries, bank, "max")
    s_rw = pa.image_scores(patch, idx, queries, bank, "reweight")
    assert torch.equal(s_max, patch.max(1).values)
    assert ((s_rw > 0) & (s_rw < s_max)).all()


def test_anomaly_map_is_upsampled_and_smoothed():
    scores = torch.zeros(1, 8, 8)
    scores[0, 3, 4] = 1.0
    m = pa.anomaly_maps(scores, 64)
    assert m.shape == (1, 64, 64)
    peak = divmod(int(m[0].argmax()), 64)
    # the patch (3, 4) covers pixels 24-31 x 32-39
    assert abs(peak[0] - 28) <= 4 and abs(peak[1] - 36) <= 4
    assert m[0].max() < 1.0 and m[0, 0, 0] < m[0].max() / 10


def test_aupro_on_a_hand_made_case():
    # image A: 4 normal pixels, region R1 of 2; image B: 2 normal, region R2 of 4
    masks = np.array([[[0, 0, 0, 0, 1, 1]], [[0, 0, 1, 1, 1, 1]]], bool)
    maps = np.array([[[0.9, 0.2, 0.3, 0.4, 0.8, 0.1]], [[0.5, 0.6, 0.95, 0.7, 0.05, 0.06]]])
    # descending: 0.95 (R2: PRO 1/8) 0.9 (normal: FPR 1/6) 0.8 (R1: +1/4)
    # 0.7 (R2: +1/8 -> PRO 1/2) 0.6 (FPR 2/6)
    expected = (0.125 * (1 / 6) + 0.5 * (0.3 - 1 / 6)) / 0.3
    assert pa.aupro(masks, maps) == pytest.approx(expected)


def test_aupro_regions_use_8_connectivity():
    mask = np.zeros((1, 3, 3), bool)
    # one region with 8-connectivity, two with 4
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True
    amap = np.linspace(0.2, 0.8, 9).reshape(1, 3, 3)
    amap[0, 0, 0], amap[0, 1, 1], amap[0, 1, 2] = 0.9, 0.0, 0.01
    assert pa.aupro(mask, amap) == pytest.approx(1 / 3)  # 4-connectivity would give 1/2


# ---------------------------------------------------------------- end to end
def test_end_to_end_on_the_synthetic_category(synthetic_root, tmp_path, capsys):
    args = ["--backbone", "resnet18", "--weights", "none", "--image-size", "128", "--crop-size",
            "128", "--epochs", "2", "--save-maps", "3"]
    result = run_main(args, tmp_path, synthetic_root)
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "device cpu" in printed
    assert result["image_auroc"] >= 0.9  # random weights score ~0.5; this run gave 1.0 (seed 0)
    assert result["pixel_auroc"] >= 0.8 and result["pixel_aupro"] >= 0.5
    # the paper's protocol: every training image trains and fills the bank, the last epoch is kept
    assert result["n_train"] == 60 and result["n_holdout"] == 0 and result["n_test"] == 40
    assert result["selected_epoch"] == 2 and result["validation_curve"] == []
    assert result["memory_bank_shape"] == [round(60 * 16 * 16 * 0.1), 128]
    assert result["threshold"] is None and result["f1_at_threshold"] is None
    assert set(result["untrained"]) == {"image_auroc", "pixel_auroc", "pixel_aupro"}
    assert result["untrained"]["image_auroc"] >= 0.9 and result["untrained_seconds"] > 0
    assert "untrained encoder (epoch 0, same bank construction and test images)" in printed
    for key in ("train_seconds", "ms_per_image"):
        assert result[key] > 0
    assert result["config"]["crop_size"] == 128 and result["torch"] == torch.__version__
    maps = sorted((tmp_path / "out" / "maps").glob("*.png"))
    assert len(maps) == 3
    assert Image.open(maps[0]).size == (4 * 128, 128)  # input | recon | heat | mask


def test_same_seed_gives_the_same_scores_on_cpu(synthetic_root, tmp_path):
    a = run_main(TINY + HOLDOUT + ["--seed", "3"], tmp_path / "a", synthetic_root)
    b = run_main(TINY + HOLDOUT + ["--seed", "3"], tmp_path / "b", synthetic_root)
    keys = ("image_auroc", "pixel_auroc", "pixel_aupro", "threshold", "untrained")
    assert [a[k] for k in keys] == [b[k] for k in keys]
    c = run_main(TINY + HOLDOUT + ["--seed", "4"], tmp_path / "c", synthetic_root)
    assert c["threshold"] != a["threshold"]


def test_the_untrained_encoder_is_the_one_training_started_from(synthetic_root, tmp_path):
    """A run's 'untrained' metrics are those of --epochs 0 with the same seed: the same backbone
    and 1x1 fusion at their initialisation, the same bank construction and test images."""
    trained = run_main(TINY[:-1] + ["2", "--seed", "5"], tmp_path / "a", synthetic_root)
    untrained = run_main(TINY[:-1] + ["0", "--seed", "5"], tmp_path / "b", synthetic_root)
    metrics = ("image_auroc", "pixel_auroc", "pixel_aupro")
    assert trained["untrained"] == {m: untrained[m] for m in metrics}
    assert trained["memory_bank_shape"] == untrained["memory_bank_shape"]
    assert any(trained[m] != untrained[m] for m in metrics)  # training moved the features


def test_save_load_and_predict_a_folder(synthetic_root, tmp_path, capsys):
    model = tmp_path / "model.pt"
    trained = run_main(TINY + HOLDOUT + ["--save", str(model)], tmp_path / "train", synthetic_root)
    loaded = run_main(["--load", str(model)], tmp_path / "eval", synthetic_root)
    for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "threshold"):
        assert loaded[k] == trained[k]
    folder = tmp_path / "new_images"
    shutil.copytree(synthetic_root / "synthetic" / "test", folder)
    out = tmp_path / "pred"
    pa.main(["--load", str(model), "--predict", str(folder), "--out", str(out)])
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,score,is_anomalous,error" and len(rows) == 1 + 40
    scores = {r.split(",")[0]: (float(r.split(",")[1]), int(r.split(",")[2])) for r in rows[1:]}
    assert all(flag == int(s >= trained["threshold"]) for s, flag in scores.values())
    flagged_defects = np.mean([f for p, (_, f) in scores.items() if not p.startswith("good")])
    flagged_good = np.mean([f for p, (_, f) in scores.items() if p.startswith("good")])
    assert flagged_defects > flagged_good
    assert len(list((out / "heatmaps").rglob("*.png"))) == 40
    expect_error(capsys, ["--load", str(model), "--backbone", "resnet50", "--predict", str(folder)],
                 "--backbone resnet18, not resnet50")


def test_all_categories_and_several_seeds_make_one_table(synthetic_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "synthetic", root / "synthetic")
    shutil.copytree(synthetic_root / "synthetic", root / "screw")  # named as a paper category
    out = tmp_path / "out"
    pa.main(["--data-root", str(root), "--category", "all", "--seeds", "0", "1", "--out", str(out),
             *TINY])
    table = capsys.readouterr().out
    assert "| screw |" in table and "| mean |" in table and " +- " in table
    assert "| 97.7 | 98.9 |" in table  # the paper's Table 1 screw values, beside ours
    assert "protocol: the paper's: all 60 train/good images train and fill the memory bank" in table
    rows = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["category", "screw", "synthetic", "mean"]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted((r["category"], r["seed"]) for r in runs) == [
        ("screw", 0), ("screw", 1), ("synthetic", 0), ("synthetic", 1)]


def checkpoint_in_torch_home(tmp_path, monkeypatch, weights) -> Path:
    """The file torchvision reads `weights` from offline, under a temporary $TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    ckpt.parent.mkdir(parents=True)
    return ckpt


def test_pretrained_weights_are_read_offline_from_torch_home(tmp_path, monkeypatch):
    ckpt = checkpoint_in_torch_home(tmp_path, monkeypatch,
                                    torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, ckpt)
    model = pa.load_backbone("resnet18", "imagenet")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(pa.UsageError,
                       match=f"put {ckpt.name} .* into {ckpt.parent}.* or pass --weights none"):
        pa.load_backbone("resnet18", "imagenet")


# ---------------------------------------------------------------- bad input: one line, exit 2
def test_missing_data_root(capsys, tmp_path):
    expect_error(capsys, ["--data-root", str(tmp_path / "nope"), *TINY], "folder not found",
                 "train/good", pa.DATASET_URLS["mvtec"])


def test_unknown_category_lists_the_found_ones(capsys, synthetic_root):
    expect_error(capsys, ["--data-root", str(synthetic_root), "--category", "scre", *TINY],
                 "--category scre", "found: synthetic")


def test_empty_train_good(capsys, data_root):
    for p in (data_root / "synthetic" / "train" / "good").glob("*.png"):
        p.unlink()
    expect_error(capsys, ["--data-root", str(data_root), "--category", "synthetic", *TINY],
                 "train/good: no images")


def test_undecodable_image_is_named(capsys, data_root):
    bad = data_root / "synthetic" / "test" / "good" / "005.png"
    bad.write_bytes(b"\x89PNG garbage")
    expect_error(capsys, ["--data-root", str(data_root), "--category", "synthetic", *TINY],
                 str(bad), "cannot decode")


def test_mask_without_image_and_image_without_mask(capsys, data_root):
    base = data_root / "synthetic"
    (base / "test" / "blob" / "002.png").unlink()
    expect_error(capsys, ["--data-root", str(data_root), "--category", "synthetic", *TINY],
                 "002_mask.png: mask with no test image")
    (base / "ground_truth" / "blob" / "002_mask.png").unlink()
    (base / "ground_truth" / "scratch" / "004_mask.png").unlink()
    expect_error(capsys, ["--data-root", str(data_root), "--category", "synthetic", *TINY],
                 "scratch/004: defect image with no mask")


def test_one_class_test_set_reports_auroc_as_not_defined(capsys, data_root, tmp_path, monkeypatch):
    for kind in ("scratch", "blob", "stain"):
        shutil.rmtree(data_root / "synthetic" / "test" / kind)
    shutil.rmtree(data_root / "synthetic" / "ground_truth")
    seen = spy_on_evaluate(monkeypatch)
    result = run_main(TINY + HOLDOUT, tmp_path, data_root)
    assert result["image_auroc"] is None and result["f1_at_threshold"] is None
    assert "image AUROC n/a" in capsys.readouterr().out
    report = (tmp_path / "out" / "report.html").read_text()
    assert "ROC: not defined, the test set holds one class only." in report
    assert report.count("None: the test set has no defective image.") == 2  # top defects, misses
    alarms = int((seen["scores"] >= result["threshold"]).sum())  # every test image is normal
    assert "no defective test image to miss" in report
    assert report.count("<img ") == (alarms or 12)  # the false alarms, else the 12 highest normals


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so --device cuda is valid")
def test_device_cuda_without_gpu(capsys, synthetic_root):
    expect_error(capsys, ["--data-root", str(synthetic_root), "--category", "synthetic", "--device",
                          "cuda", *TINY], "--device cuda", "--device cpu")


def test_load_a_file_that_is_not_a_model(capsys, tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"some": torch.zeros(2)}, junk)
    expect_error(capsys, ["--load", str(junk)], "not a patch_ae/1 model file")
    junk.write_text("hello")
    expect_error(capsys, ["--load", str(junk)], f"--load {junk}: not a model file")


@pytest.mark.parametrize("flag,value,message", [
    ("--epochs", "-1", "--epochs must be >= 0"),
    ("--coreset-ratio", "0", "--coreset-ratio must be in (0, 1]"),
    ("--coreset-ratio", "1.5", "--coreset-ratio must be in (0, 1]"),
    ("--alpha", "2", "--alpha must be in [0, 1]"),
    ("--crop-size", "60", "multiple of 8"), ("--holdout", "1", "--holdout must be in [0, 1)")])
def test_nonsensical_options(capsys, flag, value, message):
    expect_error(capsys, [flag, value], message)


def test_existing_results_are_not_overwritten(capsys, synthetic_root, tmp_path):
    run_main(TINY, tmp_path, synthetic_root)
    before = (tmp_path / "out" / "results.json").read_text()
    expect_error(capsys, ["--data-root", str(synthetic_root), "--category", "synthetic", "--out",
                          str(tmp_path / "out"), *TINY], "already holds results", "--overwrite")
    assert (tmp_path / "out" / "results.json").read_text() == before


def test_nan_loss_stops_and_keeps_the_saved_model(capsys, synthetic_root, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"an earlier model")
    expect_error(capsys, ["--data-root", str(synthetic_root), "--category", "synthetic", "--out",
                          str(tmp_path / "o"), "--save", str(model), "--lr", "1e30",
                          *TINY[:-1], "3"],
                 "training loss became", "at epoch", "lower --lr")
    assert model.read_bytes() == b"an earlier model"


def test_every_config_field_is_a_flag_in_its_help_group_and_abbreviations_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        pa.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in pa.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in text
    for title in pa.HELP_GROUPS.values():
        assert f"\n{title}:\n" in text
    assert "examples:" in text and text.count("default: $MVTEC_ROOT") == 1
    assert "(default: ./mvtec_anomaly_detection)" not in text and "(default: 50)" in text
    assert len(pa.Config.__dataclass_fields__) <= 28
    expect_error(capsys, ["--epoch", "3"], "unrecognized arguments: --epoch")
    expect_error(capsys, ["--hold", "0.1"], "unrecognized arguments: --hold")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_end_to_end_on_cuda(synthetic_root, tmp_path):
    result = run_main(TINY + ["--device", "cuda"], tmp_path, synthetic_root)
    assert result["device"] == "cuda" and result["image_auroc"] is not None


def readme_commands(section: str) -> list[list[str]]:
    """The `python patch_ae.py ...` lines of the README's section whose title starts with
    `section`."""
    text = (Path(__file__).parent / "README.md").read_text()
    body = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if "python patch_ae.py" in line]
    return [shlex.split(line.split("python patch_ae.py", 1)[1]) for line in lines]


def test_readme_commands_run(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (quick,) = readme_commands("Quick start")
    result = pa.main(quick)[0]
    printed = capsys.readouterr().out
    # the paper's protocol: every training image, the last epoch, the untrained encoder beside it
    assert result["n_holdout"] == 0 and result["selected_epoch"] == 5
    assert result["image_auroc"] >= 0.95 and result["untrained"]["image_auroc"] >= 0.95
    assert "protocol: the paper's: all 60 train/good images" in printed
    assert "synthetic seed 0, Patch AE, epoch 5: image AUROC" in printed
    assert "untrained encoder (epoch 0, same bank construction and test images)" in printed
    # self-contained: every picture inline
    (report,) = (tmp_path / "runs").glob("synthetic__0__*/report.html")
    page = ReportParser(report.read_text())
    assert len(page.images) == 36
    assert not any("http:" in v or "https:" in v for v in page.attributes)
    for src in page.images:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).load()
    shutil.copytree(synthetic_root / "synthetic", tmp_path / "my_data" / "my_part")
    shutil.copytree(synthetic_root / "synthetic" / "test", tmp_path / "incoming")
    train, predict = readme_commands("Using it on your own images")
    assert "--save" in train and "--predict" in predict and "--holdout" in train
    pa.main(train + ["--backbone", "resnet18", "--weights", "none", "--image-size", "128",
                     "--crop-size", "128", "--epochs", "5"])  # the offline variant the README gives
    assert len(list((tmp_path / "runs" / "my_part" / "maps").glob("*.png"))) == 8
    assert "threshold " in capsys.readouterr().out  # a model for --predict has its threshold
    pa.main(predict)
    assert len((tmp_path / "runs" / "incoming" / "predictions.csv").read_text().splitlines()) == 41
    assert "Highest-scoring images" in (tmp_path / "runs" / "incoming" / "report.html").read_text()


def test_readme_paper_to_code_map_names_exist():
    """Every backticked name in the code column of the README's paper-to-code map is in
    patch_ae.py."""
    text = (Path(__file__).parent / "README.md").read_text()
    body = text.split("\n## Paper-to-code map", 1)[1].split("\n## ", 1)[0]
    # after the header and its rule
    rows = [line for line in body.splitlines() if line.startswith("|")][2:]
    assert len(rows) >= 12, f"the paper-to-code map has {len(rows)} rows"
    missing = []
    for row in rows:
        names = re.findall(r"`([^`]+)`", row.strip().strip("|").split("|")[-1])
        assert names, f"a map row names no code: {row}"
        for name in names:
            assert re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name), \
                f"not a name: {name!r} in {row}"
            try:
                functools.reduce(getattr, name.split("."), pa)
            except AttributeError:
                missing.append(name)
    assert not missing, f"the paper-to-code map names what patch_ae.py lacks: {missing}"


DOC_SCRIPTS = ("patch_ae.py", "bench.py", "tools/gpu_check.py")


def doc_commands() -> dict[str, list[tuple[str, list[str], str]]]:
    """Every `python <script> ...` command line of README.md and docs/*.md, by script, as (file,
    argv, context): in a fenced block one per line (a line ending in a backslash joined with the
    next, comment lines skipped), in the text every inline code span that holds one. The context
    is the command's paragraph (for a fenced block: the paragraph before it and the block)."""
    root, found = Path(__file__).parent, {s: [] for s in DOC_SCRIPTS}
    scripts = "|".join(re.escape(s) for s in DOC_SCRIPTS)
    command = re.compile(r"\bpython3? (" + scripts + r")(?=\s|$)(.*)", re.S)
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        before = ""
        for i, part in enumerate(path.read_text().split("```")):
            if i % 2:  # inside a fenced block
                lines = part.replace("\\\n", " ").splitlines()
                spans = [(ln, before + part) for ln in lines if not ln.lstrip().startswith("#")]
            else:
                paragraphs = part.split("\n\n")
                spans = [(s.replace("\n", " "), para) for para in paragraphs
                         for s in re.findall(r"`([^`]+)`", para)]
                before = paragraphs[-1]
            for span, context in spans:
                m = command.search(span)
                if m:
                    argv = shlex.split(m.group(2), comments=True)
                    ends = [j for j, tok in enumerate(argv) if tok in ("&&", "||", "|", ";")]
                    found[m.group(1)].append((path.name, argv[:ends[0]] if ends else argv, context))
    return found


PARSE_AT_COMMIT = """
import contextlib, importlib.util, io, json, sys
sys.path.insert(0, sys.argv[1])
import patch_ae, bench
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1] + "/gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
parsers = {"patch_ae.py": patch_ae.parse_config, "bench.py": bench.parse_args,
           "tools/gpu_check.py": gpu_check.build_parser().parse_args}
failed = []
for script, argv in json.loads(sys.stdin.read()):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            parsers[script](argv)
    except (SystemExit, Exception) as e:
        failed.append([script, argv, repr(e)])
print(json.dumps(failed))
"""


def parse_at_commit(commit: str, commands: list, folder: Path) -> list | None:
    """The commands that the scripts of `commit` refuse; None where this checkout has no history
    to show it from (no git, or a shallow clone)."""
    root = Path(__file__).parent
    shallow = subprocess.run(["git", "-C", str(root), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True)
    if shallow.returncode or shallow.stdout.strip() != "false":
        return None
    for path, name in (("patch_ae.py", "patch_ae.py"), ("bench.py", "bench.py"),
                       ("tools/gpu_check.py", "gpu_check.py"), ("report.py", "report.py")):
        shown = subprocess.run(["git", "-C", str(root), "show", f"{commit}:{path}"],
                               capture_output=True, text=True)
        if shown.returncode and path != "report.py":  # report.py came later
            return [["all", [], f"git cannot show {commit}:{path}"]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(shown.stdout)
    done = subprocess.run([sys.executable, "-c", PARSE_AT_COMMIT, str(folder)], capture_output=True,
                          text=True, input=json.dumps(commands), check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_doc_commands_parse(tmp_path):
    """Every command line in README.md and docs/ is accepted by the parser of the script it runs
    (placeholders such as /path/to/... are fine: parsing does not read the disk), or, for a
    record made with a flag since removed, its paragraph names a commit whose scripts accept it."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parent / "tools" /
                                                  "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    parsers = {"patch_ae.py": pa.parse_config, "bench.py": bench.parse_args,
               "tools/gpu_check.py": gpu_check.build_parser().parse_args}
    found, failed, older = doc_commands(), [], {}
    for script, commands in found.items():
        for where, argv, context in commands:
            try:
                with contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    parsers[script](argv)
                continue
            except SystemExit as e:  # argparse: --help exits 0, a bad flag 2
                if e.code == 0 and "--help" in argv:
                    continue
            except (pa.UsageError, ValueError):
                pass
            named = re.findall(r"\bcommit ([0-9a-f]{7,40})\b", context)
            if named:
                older.setdefault(named[-1], []).append([script, argv])
            else:
                failed.append(f"{where}: python {script} {shlex.join(argv)}")
    assert not failed, ("commands in the docs that do not parse, naming no commit:\n"
                        + "\n".join(failed))
    for k, (commit, commands) in enumerate(older.items()):
        refused = (parse_at_commit(commit, commands, tmp_path / str(k)) if shutil.which("git")
                   else None)
        if refused is None:
            pytest.skip(f"no git history here to show commit {commit} (a shallow clone?)")
        assert not refused, f"commands that commit {commit} does not accept either: {refused}"
    counts = {script: len(commands) for script, commands in found.items()}
    assert counts["patch_ae.py"] >= 10 and counts["bench.py"] >= 4, counts
    assert counts["tools/gpu_check.py"] >= 3, counts
    files = {where for commands in found.values() for where, _, _ in commands}
    assert files >= {"README.md", "usage.md", "gpu.md"}


# ---------------------------------------------------------------- review findings: bugs, and
# tests that fail on code that is wrong in ways the tests above let pass
def test_imagenet_densenet_checkpoint_with_legacy_key_names_loads_offline(tmp_path, monkeypatch):
    # torchvision's DenseNet checkpoints still name a dense layer's parts 'norm.1', 'conv.2', ...
    # (from before '.' was forbidden in module names); only torchvision's builder renames them.
    # bench.py's --baseline ensemble loads densenet201 this way.
    ckpt = checkpoint_in_torch_home(tmp_path, monkeypatch,
                                    torchvision.models.DenseNet201_Weights.IMAGENET1K_V1)
    torch.manual_seed(0)
    state = torchvision.models.densenet201().state_dict()
    legacy = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # the legacy files predate this buffer
        for part in ("norm1", "norm2", "conv1", "conv2"):  # only dense layers have numbered parts
            key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        legacy[key] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, ckpt)
    model = pa.load_backbone("densenet201", "imagenet").state_dict()
    for key in ("features.denseblock1.denselayer1.norm1.weight",
                "features.denseblock4.denselayer32.conv2.weight",
                "features.transition3.norm.running_var", "classifier.bias"):
        assert torch.equal(model[key], state[key]), key
    weights_file = tmp_path / "densenet.pt"  # --weights PATH still takes a current state_dict
    torch.save(state, weights_file)
    assert torch.equal(pa.load_backbone("densenet201", str(weights_file)).features.conv0.weight,
                       state["features.conv0.weight"])


def test_read_image_scales_float_and_deep_greyscale_by_their_range(tmp_path):
    halves = np.full((40, 60), 10.0, np.float32)
    halves[:, 30:] = 1000.0
    deep_mask = np.zeros((40, 60), np.uint16)
    deep_mask[:, 30:] = 1  # a 16-bit label mask: 1 = defect
    cases = {
        "unit.tif": np.full((40, 60), 0.5, np.float32),       # float in [0, 1]: x 255 -> 128, not 0
        "halves.tif": halves,                                 # other floats: min-max -> 0 | 255
        "deep.png": np.full((40, 60), 257 * 100, np.uint16),  # 16 bit: / 257 -> 100
        "dark.png": np.full((40, 60), 200, np.uint16),        # the same scale for a dark image: 1
    }
    for name, array in cases.items():
        Image.fromarray(array).save(tmp_path / name)
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    read = {name: pa.read_image(tmp_path / name, 36, 32) for name in cases}
    assert int(read["unit.tif"].min()) == int(read["unit.tif"].max()) == 128
    assert (read["halves.tif"][:, :, :4] == 0).all()
    assert (read["halves.tif"][:, :, -4:] == 255).all()
    assert int(read["deep.png"].min()) == int(read["deep.png"].max()) == 100
    assert int(read["dark.png"].min()) == int(read["dark.png"].max()) == 1
    Image.fromarray(deep_mask).save(tmp_path / "mask.png")
    mask = pa.read_image(tmp_path / "mask.png", 36, 32, mask=True)
    assert mask[:, -4:].all() and not mask[:, :4].any()


def test_two_masks_with_the_same_name_are_an_error_naming_both(data_root):
    gt = data_root / "synthetic" / "ground_truth" / "blob"
    Image.open(gt / "003_mask.png").save(gt / "003_mask.bmp")
    with pytest.raises(pa.UsageError) as e:
        pa.load_category(data_root, "synthetic", 64, 64)
    assert f"{gt / '003_mask.bmp'} and {gt / '003_mask.png'}: two masks for" in str(e.value)
    assert "keep one" in str(e.value)


def test_anomaly_map_is_bilinear_upsampling_then_a_gaussian_blur_of_sigma_4():
    torch.manual_seed(0)
    scores = torch.rand(2, 8, 8)
    up = torch.nn.functional.interpolate(scores[:, None], size=(64, 64), mode="bilinear",
                                         align_corners=False)
    # the reference blur, PatchCore's: scipy's Gaussian, sigma 4, truncated at 4 sigma, the border
    # reflected with its edge pixel (mode 'reflect'; torch's own 'reflect' is scipy's 'mirror')
    expected = np.stack([scipy.ndimage.gaussian_filter(u.double().numpy(), sigma=4, mode="reflect",
                                                       truncate=4) for u in up[:, 0]])
    np.testing.assert_allclose(pa.anomaly_maps(scores, 64).numpy(), expected, atol=1e-5)


def test_augment_applies_cutpaste_with_probability_p_normal_and_scar_alike():
    torch.manual_seed(0)
    batch = torch.rand(200, 3, 32, 32)
    before = batch.clone()

    def changed_pixels(batch, p=None):  # (N,) changed pixels per image; p=None: augment's default
        out = pa.augment(batch, 32) if p is None else pa.augment(batch, 32, p=p)
        return (out != batch).any(1).flatten(1).sum(1)
    assert (changed_pixels(batch[:40], 0.0) == 0).all()
    assert (changed_pixels(batch[:40], 1.0) > 0).all()
    n = changed_pixels(batch)
    assert 0.38 <= (n > 0).float().mean() <= 0.62          # p = 0.5 (mean of 200 draws: +- 0.035)
    # at 32 px a scar is at most 2 x 3 px (before rotation), a normal cut-out at least 2% = 20 px
    scars = ((n > 0) & (n < 16)).sum() / (n > 0).sum()
    assert 0.35 <= scars <= 0.65                           # (of ~100: +- 0.05)
    assert torch.equal(batch, before)                      # the clean batch itself is not changed


def test_training_step_input_and_target_are_the_same_cutpaste_augmented_batch(monkeypatch):
    augmented, inputs, targets = [], [], []
    real_augment, real_loss = pa.augment, pa.patch_loss

    def spy_augment(*args, **kwargs):
        augmented.append(real_augment(*args, **kwargs))
        return augmented[-1]

    def spy_loss(recon, target, *args, **kwargs):
        targets.append(target.detach().clone())
        return real_loss(recon, target, *args, **kwargs)
    monkeypatch.setattr(pa, "augment", spy_augment)
    monkeypatch.setattr(pa, "patch_loss", spy_loss)
    torch.manual_seed(0)
    model = pa.PatchAE(pa.load_backbone("resnet18", "none"))
    model.encoder.register_forward_pre_hook(
        lambda module, args: inputs.append(args[0].detach().clone()))
    images = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    pa.train_patch_ae(model, images, pa.Config(epochs=1, batch_size=8, image_size=32, crop_size=32),
                      torch.device("cpu"))
    assert len(augmented) == len(inputs) == len(targets) == 1
    expected = pa.normalize(augmented[0])
    assert torch.equal(inputs[0], expected) and torch.equal(targets[0], expected)
    clean = images.float() / 255
    pasted = [not any(torch.equal(a, c) for c in clean) for a in augmented[0]]
    assert any(pasted)  # CutPaste changed some images of the batch (p = 0.5)


def test_cutpaste_scars_are_rotated_by_up_to_45_degrees():
    tilts, rectangles = [], 0
    for seed in range(30):
        torch.manual_seed(seed)
        _, mask = pa.cutpaste(torch.rand(3, 256, 256), scar=True)
        ys, xs = torch.where(mask)
        rectangles += int((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) == len(ys))
        evals, evecs = np.linalg.eigh(np.cov(np.stack([xs.numpy(), ys.numpy()]).astype(float)))
        # an elongated strip: its long axis, from the pixels' second moments
        if evals[1] > 3 * evals[0]:
            vx, vy = np.abs(evecs[:, 1])
            # from the nearest image axis
            tilts.append(math.degrees(math.atan2(min(vx, vy), max(vx, vy))))
    assert rectangles <= 4             # an unrotated strip fills its bounding box
    assert len(tilts) >= 10 and max(tilts) >= 30 and np.median(tilts) >= 10


def test_coreset_on_the_random_projection_covers_as_well_as_without_it():
    torch.manual_seed(0)
    # a big and a small cluster
    z = torch.cat([torch.randn(1900, 4), torch.randn(100, 4) * 0.2 + 6])
    x = z @ torch.randn(4, 256) / 4 + 0.01 * torch.randn(2000, 256)  # D = 256 > proj_dim = 128
    projected = pa.greedy_coreset(x, 50)
    exact = pa.greedy_coreset(x, 50, proj_dim=256)                   # D = proj_dim: no projection
    assert len(projected.unique()) == 50

    def radius(sel):  # covering radius in the full space
        return torch.cdist(x, x[sel]).min(1).values.max().item()
    random_radii = [radius(torch.randperm(len(x))[:50]) for _ in range(10)]
    assert radius(projected) < min(random_radii) and radius(projected) <= 1.25 * radius(exact)


def test_training_leaves_every_batchnorm_statistic_of_the_backbone_unchanged():
    torch.manual_seed(0)
    model = pa.PatchAE(pa.load_backbone("resnet18", "none"))
    bns = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(bns) == 15  # resnet18 up to layer3: stem 1, layer1 4, layer2 5, layer3 5
    before = {name: [b.clone() for b in m.buffers()] for name, m in bns.items()}
    conv_before = model.encoder.layer3[1].conv2.weight.clone()
    images = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    pa.train_patch_ae(model, images, pa.Config(epochs=1, batch_size=4, image_size=32, crop_size=32),
                      torch.device("cpu"))
    for name, m in bns.items():
        assert not m.training, name
        assert all(torch.equal(a, b) for a, b in zip(m.buffers(), before[name])), name
    assert not torch.equal(model.encoder.layer3[1].conv2.weight, conv_before)  # trained end to end


def test_encoder_fuse_layers_map_each_position_on_its_own():
    torch.manual_seed(0)
    encoder = pa.Encoder(pa.load_backbone("resnet18", "none")).eval()
    z = torch.rand(1, 128 + 256, 5, 6)          # (1, c1+c2, h, w), the fused input
    z2 = z.clone()
    z2[0, :, 2, 3] += torch.rand(128 + 256)
    with torch.no_grad():
        diff = (encoder.fuse(z2) - encoder.fuse(z)).abs().sum(1)[0]  # (5, 6)
    assert diff[2, 3] > 0 and int((diff > 0).sum()) == 1  # 1x1 convs: no neighbour sees the change


def test_aupro_averages_over_regions_not_images():
    # image A: regions R1 (1 px) and R2 (2 px), 3 normal px; image B: region R3 (3 px), 3 normal px
    masks = np.array([[[1, 0, 1, 1, 0, 0]], [[1, 1, 1, 0, 0, 0]]], bool)
    maps = np.array([[[0.95, 0.9, 0.2, 0.3, 0.8, 0.05]], [[0.4, 0.5, 0.6, 0.7, 0.1, 0.15]]])
    # 0.95 covers R1: PRO = (1 + 0 + 0) / 3 regions; then 0.9 and 0.8 (normal) pass FPR 0.3 with
    # PRO 1/3. Per image it would be (1/3 + 0) / 2 = 1/6 (the mean of each image's regions: 1/4).
    assert pa.aupro(masks, maps) == pytest.approx(1 / 3)


def test_aupro_ties_share_one_threshold():
    mask = np.array([[[0, 1, 0, 0, 0]]], bool)  # one region of 1 px, 4 normal px
    amap = np.array([[[0.9, 0.9, 0.1, 0.1, 0.1]]])
    # at 0.9 FPR 1/4 and PRO 1 together: the curve goes straight from (0, 0) to (1/4, 1), then flat.
    # Stepping inside the tie gives 0.05 / 0.3 (normal pixel first) or 1 (region pixel first).
    assert pa.aupro(mask, amap) == pytest.approx((0.5 * 0.25 + 0.05) / 0.3)


# ---------------------------------------------------------------- scoring, coreset start,
# streaming predict
def test_score_images_is_the_nearest_bank_distance_upsampled_and_blurred():
    torch.manual_seed(0)
    encoder = pa.Encoder(pa.load_backbone("resnet18", "none")).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    cpu = torch.device("cpu")
    feats = pa.extract_features(encoder, images[:1], 1, cpu)                     # (1, C, 4, 4)
    bank = pa.flatten_patches(feats)[::2]  # half of image 0's patches: distances 0 and > 0
    scores, maps = pa.score_images(encoder, bank, images, 2, cpu)
    with torch.no_grad():
        r = encoder(pa.normalize(images.float() / 255))                          # (3, C, 4, 4)
    q = pa.flatten_patches(r)
    d = (q[:, None] - bank[None]).norm(dim=-1).min(1).values.view(3, 4, 4)      # brute force
    torch.testing.assert_close(maps, pa.anomaly_maps(d, 32), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(scores, d.flatten(1).amax(1).numpy(), atol=1e-5)
    assert float(d[0].flatten()[::2].abs().max()) < 1e-3 and float(d[0].max()) > 0.1


def test_coreset_starts_from_the_mean_distance_to_random_rows_not_added():
    # <= 10 rows: every row is a start row, so the first pick is fixed: the largest mean Euclidean
    # distance to all rows (row 0); the largest mean squared distance would be row 1
    x = torch.tensor([[-4., 3], [1, 4], [-1, -4], [-2, -4], [1, 3], [-3, -4], [0, -1], [2, -4]])
    d = torch.cdist(x, x)
    assert int(d.mean(1).argmax()) == 0 and int(d.square().mean(1).argmax()) == 1
    for seed in range(3):
        assert pa.greedy_coreset(x, 1, seed=seed).tolist() == [0]
        # then the row farthest from row 0, unless its mean distance to the start rows is smaller
        expected = int(torch.minimum(d.mean(1), d[0]).argmax())
        assert pa.greedy_coreset(x, 2, seed=seed).tolist() == [0, expected]
    # many rows: whichever 10 start rows are drawn, the lone outlier is the farthest from them and
    # comes first; the start rows themselves are not in the coreset
    torch.manual_seed(0)
    y = torch.randn(2000, 16)
    y[1234] += 50
    for seed in range(3):
        assert pa.greedy_coreset(y, 1, seed=seed).tolist() == [1234]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, float]:
    """A resnet18 model file at 32 px (random weights, a bank of 4 random images' patches) and its
    threshold."""
    torch.manual_seed(0)
    path, cpu = tmp_path_factory.mktemp("model") / "model.pt", torch.device("cpu")
    model = pa.PatchAE(pa.load_backbone("resnet18", "none")).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    bank = pa.build_memory_bank(pa.extract_features(model.encoder, images, 4, cpu), 1.0)
    held = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    scores, _ = pa.score_images(model.encoder, bank, held, 6, cpu)
    threshold = float(np.median(scores))
    scale = {"low": 0.0, "mid": threshold, "source": "test"}
    pa.save_model(str(path),
                  pa.Config(backbone="resnet18", weights="none", image_size=32, crop_size=32),
                  {**dict.fromkeys(pa.RUN_FIELDS), "encoder": model.encoder,
                   "decoder": model.decoder, "bank": bank, "threshold": threshold,
                   "heat_scale": scale, "n_train": 4, "n_holdout": 0, "protocol": "test"})
    return path, threshold


def image_folder(root: Path, n: int) -> Path:
    """n random 40x48 PNGs, the second half in a sub-folder."""
    rng = np.random.default_rng(0)
    for i in range(n):
        p = root / ("sub" if i >= n // 2 else ".") / f"{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(p)
    return root


def read_predictions(out: Path) -> dict:
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "path,score,is_anomalous,error"
    return {r[0]: r[1:] for r in (line.split(",", 3) for line in lines[1:])}


def test_predict_gives_an_unreadable_file_its_row_and_scores_the_others(tiny_model, tmp_path,
                                                                        capsys):
    model, threshold = tiny_model
    folder = image_folder(tmp_path / "in", 6)
    pa.main(["--load", str(model), "--predict", str(folder), "--out", str(tmp_path / "clean"),
             "--batch-size", "4"])
    clean = read_predictions(tmp_path / "clean")
    assert len(clean) == 6 and all(err == "" for *_, err in clean.values())
    assert all(flag == str(int(float(s) >= threshold)) for s, flag, _ in clean.values())
    (folder / "sub" / "broken.png").write_bytes(b"not an image")
    capsys.readouterr()
    err = expect_error(capsys, ["--load", str(model), "--predict", str(folder), "--out",
                                str(tmp_path / "out"), "--batch-size", "4"],
                       "1 of 7 files could not be read", "the other 6 were scored")
    assert str(tmp_path / "out" / "predictions.csv") in err
    rows = read_predictions(tmp_path / "out")
    assert list(rows) == sorted(rows) and len(rows) == 7
    score, flag, reason = rows.pop(str(Path("sub") / "broken.png"))
    assert score == flag == "" and "cannot decode" in reason
    assert rows == clean  # the others: scored, and as without the broken file
    assert len(list((tmp_path / "out" / "heatmaps").rglob("*.png"))) == 6
    report = (tmp_path / "out" / "report.html").read_text()
    assert f"<b>{Path('sub') / 'broken.png'}</b>: cannot decode" in report
    assert report.count("<img ") == 6


def test_predict_reads_scores_and_writes_one_batch_at_a_time(tiny_model, tmp_path, monkeypatch):
    model, _ = tiny_model
    folder = image_folder(tmp_path / "in", 7)
    counts = {"read": 0, "written": 0, "largest score_images call": 0}
    read, write, score = pa.read_image, pa.save_heatmap, pa.score_images

    def counting_read(*a, **k):
        counts["read"] += 1
        assert counts["read"] - counts["written"] <= 2, counts   # never more than one batch waiting
        return read(*a, **k)

    def counting_write(*a, **k):
        counts["written"] += 1
        return write(*a, **k)

    def counting_score(encoder, bank, images, *a, **k):
        counts["largest score_images call"] = max(counts["largest score_images call"], len(images))
        return score(encoder, bank, images, *a, **k)
    monkeypatch.setattr(pa, "read_image", counting_read)
    monkeypatch.setattr(pa, "save_heatmap", counting_write)
    monkeypatch.setattr(pa, "score_images", counting_score)
    pa.main(["--load", str(model), "--predict", str(folder), "--out", str(tmp_path / "out"),
             "--batch-size", "2"])
    assert counts == {"read": 7, "written": 7, "largest score_images call": 2}
    assert len(read_predictions(tmp_path / "out")) == 7


def test_predict_heatmap_colours_use_the_models_scale_else_each_images_own(tiny_model, tmp_path,
                                                                          monkeypatch, capsys):
    model, threshold = tiny_model
    folder = image_folder(tmp_path / "in", 3)
    scales, panels = [], pa.report.panels

    def spy(image, recon, amap, scale, mask=None):
        scales.append((scale, (float(amap.min()), float(amap.max()))))
        return panels(image, recon, amap, scale, mask)
    monkeypatch.setattr(pa.report, "panels", spy)
    pa.main(["--load", str(model), "--predict", str(folder), "--out", str(tmp_path / "a")])
    # one heatmap PNG and one report picture per image (3 images, all in the report's top 12)
    assert len(scales) == 6 and all(s == {"low": 0.0, "mid": threshold, "source": "test"}
                                    for s, _ in scales)
    blob = torch.load(model, weights_only=True)
    blob["heat_scale"] = blob["threshold"] = None             # as a model trained with --holdout 0
    torch.save(blob, tmp_path / "no_scale.pt")
    scales.clear()
    pa.main(["--load", str(tmp_path / "no_scale.pt"), "--predict", str(folder), "--out",
             str(tmp_path / "b")])
    printed = capsys.readouterr().out
    assert "each heatmap is coloured from its own lowest to its highest pixel" in printed
    assert "the model has no threshold" in printed and "--holdout 0.1" in printed
    assert len(scales) == 6
    for scale, (low, high) in scales:  # red at the map's own highest pixel, blue at its lowest
        assert scale["low"] == low and scale["mid"] == pytest.approx((low + high) / 2)
    rows = read_predictions(tmp_path / "b")
    assert all(flag == "" for _, flag, _ in rows.values())


def test_readme_dataset_commands_parse():
    cfgs = [pa.parse_config(argv)[0] for argv in readme_commands("Data layout")]
    assert [c.dataset for c in cfgs] == ["mvtec", "visa", "mvtec2", "mvtec"]  # the last: --load
    assert cfgs[0].category == "all" and cfgs[0].seed == [0, 1, 2]
    assert (cfgs[0].holdout, cfgs[0].select) == (0.0, "last")  # the paper's protocol, as it says
    assert cfgs[3].load == cfgs[2].save and cfgs[3].predict.endswith("/can/test_private")


# ---------------------------------------------------------------- the report, and review findings:
# tests that fail on code that is wrong in ways the tests above let pass
class ReportParser(HTMLParser):
    """report.html -> every attribute value, the <img> sources, and each <h3> gallery's captions
    in order."""

    def __init__(self, text: str):
        super().__init__()
        self.attributes, self.images, self.galleries = [], [], {}
        self.tag, self.heading = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tag, attrs = tag, dict(attrs)
        self.attributes += [v for v in attrs.values() if v]
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        self.tag = None

    def handle_data(self, data):
        if self.tag == "h3":
            self.heading = data
            self.galleries[data] = []
        elif self.tag == "figcaption":
            self.galleries[self.heading].append(data.split(":")[0])


def spy_on_evaluate(monkeypatch) -> dict:
    """What evaluate() gave the run: its scores, labels, the names of the test images, the model."""
    seen, evaluate = {}, pa.evaluate

    def spy(cfg, model, data, device, out):
        result, scored = evaluate(cfg, model, data, device, out)
        names = [f"{p.parent.name}/{p.name}" for p in data.test_paths]
        seen.update(scores=scored["scores"], labels=data.labels, names=names, model=model,
                    data=data)
        return result, scored
    monkeypatch.setattr(pa, "evaluate", spy)
    return seen


def test_report_is_self_contained_and_its_galleries_hold_the_right_images(synthetic_root, tmp_path,
                                                                          monkeypatch):
    seen = spy_on_evaluate(monkeypatch)
    run_main(TINY + ["--report-images", "5"], tmp_path, synthetic_root)
    text = (tmp_path / "out" / "report.html").read_text()
    report = ReportParser(text)
    assert not any("http:" in v or "https:" in v for v in report.attributes)
    assert len(report.images) == 15
    for src in report.images:
        head, data = src.split(",", 1)
        assert head == "data:image/jpeg;base64"
        size = Image.open(io.BytesIO(base64.b64decode(data))).size
        assert size == (4 * 64, 64)  # input | reconstruction | heatmap | mask
    scores, labels, names = seen["scores"], seen["labels"], np.array(seen["names"])
    down = [i for i in np.argsort(-scores) if labels[i]]                # defects, highest first
    assert report.galleries["Defective images that scored highest"] == list(names[down[:5]])
    assert report.galleries["Defective images that scored highest"][0] == names[np.argmax(scores)]
    normals = [i for i in np.argsort(-scores) if not labels[i]]
    # no threshold (the paper's protocol): the headings name no false alarms and no misses
    assert report.galleries["Highest-scoring normal images (no threshold, so no false alarms to "
                            "name)"] == list(names[normals[:5]])
    assert report.galleries["Lowest-scoring defective images (no threshold, so no misses to "
                            "name)"] == list(names[down[::-1][:5]])
    assert "<table>" in text and "|---|" not in text and "<pre>" not in text  # HTML tables
    assert "untrained encoder" in text and "ROC of the image scores" in text
    assert text.count("<polyline") >= 3 + 1  # ROC: trained, untrained, chance; the loss curve
    run_main(TINY + ["--report-images", "0"], tmp_path / "none", synthetic_root)
    assert (tmp_path / "none" / "out" / "results.json").is_file()
    assert not (tmp_path / "none" / "out" / "report.html").exists()


def test_galleries_name_false_alarms_and_misses_only_by_the_threshold():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.5, 0.9, 0.3, 0.6, 0.95])
    names = [f"img{i}" for i in range(6)]
    pixels = np.zeros((8, 8, 3), np.uint8)

    def galleries(threshold):
        page = ReportParser(report.galleries(labels, scores, threshold, names,
                                             lambda i: pixels, 10))
        return page.galleries
    some = galleries(0.55)  # normal img2 (0.9) at or above it; defect img3 (0.3) below it
    assert some["False alarms: normal images at or above the threshold (1)"] == ["img2"]
    assert some["Misses: defective images below the threshold (1)"] == ["img3"]
    for threshold in np.linspace(0, 1, 21):  # whatever the threshold, the rule holds
        for heading, shown in galleries(threshold).items():
            if heading.startswith("False alarms"):
                assert all(labels[names.index(n)] == 0 and scores[names.index(n)] >= threshold
                           for n in shown)
            if heading.startswith("Misses"):
                assert all(labels[names.index(n)] == 1 and scores[names.index(n)] < threshold
                           for n in shown)
    none = galleries(0.25)  # every normal image but one below, no defect below
    assert none["Lowest-scoring defective images: none below the threshold"] == ["img3", "img4",
                                                                                  "img5"]
    assert none["False alarms: normal images at or above the threshold (2)"] == ["img2", "img1"]
    high = galleries(0.99)
    assert high["Highest-scoring normal images: none at or above the threshold"] == ["img2", "img1",
                                                                                      "img0"]


def test_gallery_headings_follow_the_runs_threshold(synthetic_root, tmp_path, monkeypatch):
    """A run whose threshold flags some normal test images, and one whose threshold flags none."""
    seen = spy_on_evaluate(monkeypatch)
    for quantile, name in ((0.0, "low"), (1.0, "high")):
        monkeypatch.setattr(pa, "THRESHOLD_QUANTILE", quantile)
        result = run_main(TINY + HOLDOUT + ["--report-images", "40"], tmp_path / name,
                          synthetic_root)
        page = ReportParser((tmp_path / name / "out" / "report.html").read_text())
        scores, labels, names = seen["scores"], seen["labels"], seen["names"]
        thr = result["threshold"]
        alarms = [names[i] for i in np.argsort(-scores, kind="stable")
                  if not labels[i] and scores[i] >= thr]
        heading = next(h for h in page.galleries if "normal images" in h.lower() or "False" in h)
        if alarms:
            assert heading == ("False alarms: normal images at or above the threshold "
                               f"({len(alarms)})")
            assert page.galleries[heading] == alarms
        else:
            assert heading == "Highest-scoring normal images: none at or above the threshold"
    low = (tmp_path / "low" / "out" / "report.html").read_text()
    assert low.count("False alarms:") == 1  # the threshold at the lowest held-out score: some
    assert "Lowest-scoring defective images: none below the threshold" in low  # and no misses


def test_the_reconstruction_panel_is_the_decoders_output_for_that_image(synthetic_root, tmp_path,
                                                                        monkeypatch):
    seen = spy_on_evaluate(monkeypatch)
    run_main(TINY + ["--save-maps", "40", "--report-images", "3"], tmp_path, synthetic_root)
    model, data = seen["model"], seen["data"]
    expected = pa.reconstruct(model["encoder"], model["decoder"], data.test, torch.device("cpu"))
    with torch.no_grad():  # the decoder's I_hat, brought back from ImageNet normalisation by hand
        i_hat = model["decoder"](model["encoder"](pa.normalize(data.test.float() / 255)))
    mean, std = (torch.tensor(pa.IMAGENET_MEAN).view(3, 1, 1),
                 torch.tensor(pa.IMAGENET_STD).view(3, 1, 1))
    by_hand = ((i_hat * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    assert (expected.int() - by_hand.int()).abs().max() <= 1
    assert (expected.int() - data.test.int()).abs().float().mean() > 2  # not the input again
    for i, path in enumerate(data.test_paths):  # --save-maps: lossless PNGs, input | recon | ...
        png = np.asarray(Image.open(tmp_path / "out" / "maps"
                                    / f"{path.parent.name}_{path.stem}.png"))
        assert np.array_equal(png[:, :64], data.test[i].permute(1, 2, 0).numpy())
        recon = expected[i].permute(1, 2, 0).numpy().astype(int)  # batch of 1 there: rounding
        assert np.abs(png[:, 64:128].astype(int) - recon).max() <= 1
    page = ReportParser((tmp_path / "out" / "report.html").read_text())
    first = seen["names"].index(page.galleries["Defective images that scored highest"][0])
    jpeg = np.asarray(Image.open(io.BytesIO(base64.b64decode(page.images[0].split(",", 1)[1]))))
    panel = jpeg[:, 64:128].astype(int)                   # JPEG: close to the decoder's output
    assert np.abs(panel - expected[first].permute(1, 2, 0).numpy()).mean() < 4
    assert np.abs(panel - data.test[first].permute(1, 2, 0).numpy()).mean() > 4


def test_threshold_is_the_chosen_quantile_of_the_held_out_scores_not_their_maximum(synthetic_root,
                                                                                    monkeypatch):
    data = pa.load_category(synthetic_root, "synthetic", 32, 32)
    held = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 10.0])  # the 6 held-out images' scores: one far above
    score_images = pa.score_images

    def fake(encoder, bank, images, *args, desc="scoring", **kwargs):
        scores, maps = score_images(encoder, bank, images, *args, desc=desc, **kwargs)
        return (held.copy(), maps) if desc == "held-out" else (scores, maps)
    monkeypatch.setattr(pa, "score_images", fake)
    for q, expected in ((0.5, 0.35), (0.99, 9.525)):
        monkeypatch.setattr(pa, "THRESHOLD_QUANTILE", q)
        cfg = pa.Config(epochs=0, image_size=32, crop_size=32, backbone="resnet18", weights="none",
                        holdout=0.1)
        model = pa.fit(cfg, data, 0, torch.device("cpu"))
        assert model["threshold"] == pytest.approx(expected)
        assert model["heat_scale"]["source"] == "the held-out normal images"


def test_automatic_validation_period_keeps_validation_near_its_budget(synthetic_root, monkeypatch):
    assert pa.VAL_BUDGET == 0.15
    assert pa.auto_val_every(10.0, 100.0) == 1     # cheap validation: every epoch
    assert pa.auto_val_every(95.0, 360.0) == 2     # the paper's size (WRN-101, 2-core CPU)
    assert pa.auto_val_every(4.5, 4.15) == 8       # a 120-image category at 224 px, resnet18
    data = pa.load_category(synthetic_root, "synthetic", 32, 32)

    now = [0.0]  # the clock that times validation: each takes 1000 s, far more than an epoch here

    def slow_validation(*args):
        now[0] += 1000.0
        return {"image_auroc": 1.0, "pixel_auroc": 1.0, "pixel_aupro": 1.0, "score": 1.0,
                "feature_norm": 1.0, "dead_units": 0.0, "normal_distance": 1.0}
    monkeypatch.setattr(pa, "validate", slow_validation)
    monkeypatch.setattr(pa, "clock", lambda device: now[0])
    for budget, epochs in ((0.15, [0, 3]), (1e9, [0, 1, 2, 3])):
        monkeypatch.setattr(pa, "VAL_BUDGET", budget)
        cfg = pa.Config(epochs=3, image_size=32, crop_size=32, backbone="resnet18", weights="none",
                        holdout=0.1)
        model = pa.fit(cfg, data, 0, torch.device("cpu"), untrained=False)
        assert [r["epoch"] for r in model["validation_curve"]] == epochs
        assert (model["val_every"] > 3) if budget < 1 else (model["val_every"] == 1)


def test_predict_keeps_one_heatmap_per_file_when_names_share_a_stem(tiny_model, tmp_path):
    model, _ = tiny_model
    folder, rng = tmp_path / "in", np.random.default_rng(1)
    folder.mkdir()
    for name in ("a.png", "a.jpg"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    pa.main(["--load", str(model), "--predict", str(folder), "--out", str(tmp_path / "out")])
    heatmaps = tmp_path / "out" / "heatmaps"
    assert sorted(p.name for p in heatmaps.iterdir()) == ["a.jpg.png", "a.png.png"]
    assert (heatmaps / "a.jpg.png").read_bytes() != (heatmaps / "a.png.png").read_bytes()
    assert set(read_predictions(tmp_path / "out")) == {"a.png", "a.jpg"}


def test_a_float_image_with_a_nan_pixel_is_refused_not_read_as_black(capsys, data_root, tiny_model,
                                                                     tmp_path):
    # out of [0, 1]: min-max scaled
    pixels = np.random.default_rng(0).uniform(0, 3, (64, 64)).astype(np.float32)
    pixels[5, 7] = np.nan
    bad = data_root / "synthetic" / "train" / "good" / "007.tif"
    (data_root / "synthetic" / "train" / "good" / "007.png").unlink()
    Image.fromarray(pixels).save(bad)
    expect_error(capsys, ["--data-root", str(data_root), "--category", "synthetic", *TINY],
                 str(bad), "NaN")
    model, _ = tiny_model
    folder = image_folder(tmp_path / "in", 2)
    shutil.copy(bad, folder / "nan.tif")
    expect_error(capsys, ["--load", str(model), "--predict", str(folder), "--out",
                          str(tmp_path / "out")], "1 of 3 files could not be read")
    rows = read_predictions(tmp_path / "out")
    assert rows["nan.tif"][:2] == ["", ""] and "NaN" in rows["nan.tif"][2]
    assert rows["00.png"][0] != ""
