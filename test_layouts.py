"""Tests of layouts.py, the dataset layouts beside MVTec AD: VisA (its split CSV) and MVTec AD 2
(its validation set), read by deploy.py --dataset; their errors, their runs end to end and the
published numbers beside them. CPU only, tiny trees written by the tests. Run: pytest -q"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conftest
import deploy
import layouts
import patch_ae as pa
from conftest import parse_command, readme_commands


def expect_error(capsys, argv, *fragments) -> str:
    """deploy.main(argv) must exit 2 with one 'error:' line holding every fragment."""
    return conftest.expect_error(capsys, deploy.main, argv, *fragments)


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
    (root / layouts.VISA_CSV).parent.mkdir(parents=True, exist_ok=True)
    (root / layouts.VISA_CSV).write_text("\n".join(rows) + "\n")
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
    assert pa.find_categories(root, layouts.VISA) == ["candle"]
    assert deploy.LAYOUTS["visa"] is layouts.VISA
    data = pa.load_category(root, "candle", 32, 32, layouts.VISA)
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
    assert pa.find_categories(root, layouts.MVTEC2) == ["can"]
    assert deploy.LAYOUTS["mvtec2"] is layouts.MVTEC2 and deploy.LAYOUTS["mvtec"] is pa.MVTEC
    data = pa.load_category(root, "can", 32, 32, layouts.MVTEC2)
    assert data.train.shape == (4, 3, 32, 32) and data.validation.shape == (2, 3, 32, 32)
    assert data.validation.dtype == torch.uint8
    assert [f"{p.parent.name}/{p.stem}" for p in data.test_paths] == [
        "bad/img1", "bad/img10", "bad/img2", "good/000", "good/001"]
    assert data.labels.tolist() == [1, 1, 1, 0, 0] and not data.masks[3:].any()
    for k, path in enumerate(data.test_paths[:3]):
        b = {"img1": 0, "img10": 1, "img2": 2}[path.stem]
        assert data.masks[k][:, 8 * b:8 * b + 8].all() and data.masks[k].sum() == 32 * 8


VISA_BREAKS = {  # what breaks the tiny VisA tree -> what the one-line error must say
    "no csv": (lambda r: (r / layouts.VISA_CSV).unlink(),
               ["split_csv/1cls.csv: not found", "Data/Images"]),
    "no mask column": (lambda r: edit(r / layouts.VISA_CSV, "image,mask\n", "image\n"),
                       ["1cls.csv: no column mask in its header row",
                        "object,split,label,image,mask"]),
    "image gone": (lambda r: (r / "candle/Data/Images/Anomaly/002.JPG").unlink(),
                   ["1cls.csv, line 9: image", "002.JPG not found",
                    "Data/Images/{Normal,Anomaly}"]),
    "mask gone": (lambda r: (r / "candle/Data/Masks/Anomaly/010.png").unlink(),
                  ["1cls.csv, line 8: mask", "010.png not found", "Data/Masks/Anomaly"]),
    "no mask": (lambda r: edit(r / layouts.VISA_CSV, ",candle/Data/Masks/Anomaly/002.png", ","),
                ["1cls.csv, line 9: an anomaly row without a mask"]),
    "bad label": (lambda r: edit(r / layouts.VISA_CSV,
                                 "test,anomaly,candle/Data/Images/Anomaly/010",
                                 "test,defect,candle/Data/Images/Anomaly/010"),
                  ["1cls.csv, line 8: split 'test', label 'defect'", "normal|anomaly"]),
    "anomaly in train": (lambda r: edit(r / layouts.VISA_CSV,
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
    # MVTec AD 2 read as MVTec AD: deploy.py's default layout, and patch_ae.py's only one
    for main in (deploy.main, pa.main):
        conftest.expect_error(capsys, main, ["--data-root", str(mvtec2), "--category", "can",
                                             *SMALL], "can/test: no images",
                              "ROOT/<category>/test/<good|defect_type>")
    expect_error(capsys, ["--dataset", "visa", "--data-root", str(tmp_path / "nope"), *SMALL],
                 "folder not found", layouts.VISA.url)
    expect_error(capsys, ["--synthetic", "--dataset", "visa", *SMALL], "--synthetic",
                 "drop --dataset visa")


def test_all_visa_categories_end_to_end_beside_im_iad(tmp_path, capsys):
    root = write_visa(tmp_path / "visa", ("candle", "pcb1"))
    out = tmp_path / "out"
    deploy.main(["--dataset", "visa", "--data-root", str(root), "--category", "all", "--out",
                 str(out), "--holdout", "0", *SMALL])  # the paper's protocol, as IM-IAD's
    printed = capsys.readouterr().out
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["dataset"], r["category"], r["n_train"], r["n_holdout"], r["n_test"])
            for r in runs] == [("visa", "candle", 4, 0, 4), ("visa", "pcb1", 4, 0, 4)]
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
    deploy.main(["--dataset", "mvtec2", "--data-root", str(root), "--category", "all", "--out",
                 str(out), *SMALL])
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"] == "mvtec2" and result["n_test"] == 5
    assert result["pixel_auroc"] is not None
    # all of train/good trains; the dataset's own validation/good sets the threshold
    assert (result["n_train"], result["n_holdout"]) == (4, 2) and result["threshold"] is not None
    assert "the dataset's own 2 validation/good images" in result["protocol"]
    header = ("| category | kept epoch | image AUROC | pixel AUROC | pixel AUPRO@30% | train s "
              "| ms/img |\n")
    assert header in capsys.readouterr().out


def test_peer_mean_is_shown_only_when_every_category_ran():
    run = {"seed": 0, "image_auroc": 0.9, "pixel_auroc": None, "pixel_aupro": None,
           "train_seconds": 1.0, "ms_per_image": 1.0, "protocol": "test", "selected_epoch": 1,
           "untrained": None, "raw_features": None}
    listed = layouts.IM_IAD[1]["IM-IAD PatchCore"]
    objects = [c for c in listed if c != "mean"]
    assert len(objects) == 12 and layouts.VISA.published is layouts.IM_IAD
    rows = pa.summarize([dict(run, category=c) for c in objects], layouts.VISA)
    assert rows[-1]["category"] == "mean" and rows[-1]["IM-IAD PatchCore"] == 95.1
    assert rows[-1]["image_auroc"] == pytest.approx(0.9)
    rows = pa.summarize([dict(run, category=c) for c in objects[1:]], layouts.VISA)
    assert rows[-1]["IM-IAD PatchCore"] is None
    published = [v for c, v in listed.items() if c != "mean"]
    assert round(sum(published) / 12, 1) == 95.1  # the listed mean is the mean of the listed values


def test_readme_dataset_commands_parse():
    """The README's data-layout commands: the paper's protocol on MVTec AD, VisA, MVTec AD 2 with
    a model file, and that model on MVTec AD 2's unlabelled test_private images."""
    commands = readme_commands("Data layout")
    cfgs = [parse_command(script, argv) for script, argv in commands]
    assert [getattr(c, "dataset", "mvtec") for c in cfgs] == ["mvtec", "visa", "mvtec2", "mvtec"]
    assert [script for script, _ in commands[1:]] == ["deploy.py"] * 3  # other layouts, models
    assert cfgs[0].category == "all" and cfgs[0].seed == [0, 1, 2]
    # the paper's protocol, as it says: patch_ae.py, or deploy.py holding nothing out
    assert commands[0][0] == "patch_ae.py" or (cfgs[0].holdout, cfgs[0].select) == (0.0, "last")
    assert cfgs[3].load == cfgs[2].save and cfgs[3].predict.endswith("/can/test_private")


# ---------------------------------------------------------------- image files and masks
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


def test_masks_are_matched_by_name_not_by_position(tmp_path):
    base, black = tmp_path / "cat", np.zeros((32, 32, 3), np.uint8)
    for i in range(2):
        save_image(base / "train" / "good" / f"{i}.png", black)
    # sorted images: img1, img10, img2; sorted masks: img10_mask, img1_mask, img2_mask
    for k, name in enumerate(("img1", "img10", "img2")):
        save_image(base / "test" / "crack" / f"{name}.png", black)
        save_image(base / "ground_truth" / "crack" / f"{name}_mask.png", band(k, 32, 32))
    data = pa.load_category(tmp_path, "cat", 32, 32)
    assert [p.stem for p in data.test_paths] == ["img1", "img10", "img2"]
    for k, path in enumerate(data.test_paths):
        b = {"img1": 0, "img10": 1, "img2": 2}[path.stem]  # the band its mask was drawn with
        assert data.masks[k][:, 8 * b:8 * b + 8].all() and data.masks[k].sum() == 32 * 8


def test_two_masks_with_the_same_name_are_an_error_naming_both(data_root):
    gt = data_root / "synthetic" / "ground_truth" / "blob"
    Image.open(gt / "003_mask.png").save(gt / "003_mask.bmp")
    with pytest.raises(pa.UsageError) as e:
        pa.load_category(data_root, "synthetic", 64, 64)
    assert f"{gt / '003_mask.bmp'} and {gt / '003_mask.png'}: two masks for" in str(e.value)
    assert "keep one" in str(e.value)
