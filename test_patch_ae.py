"""Tests for patch_ae.py: CPU only, tiny images, resnet18 with random weights (no downloads).
Run: pytest -q"""
import json
import math
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.neighbors import NearestNeighbors

import patch_ae as pa

TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "64", "--crop-size", "64", "--epochs", "1"]


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
        assert all(np.asarray(Image.open(p)).any() for p in (base / "ground_truth" / kind).glob("*.png"))
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
    assert result["image_auroc"] is not None and result["pixel_auroc"] is None and result["pixel_aupro"] is None


# ---------------------------------------------------------------- other layouts: VisA and MVTec AD 2
def save_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def band(k: int, height: int, width: int, value: int = 255, left: int = 0) -> np.ndarray:
    """A (height, width) uint8 mask that marks the 8 columns from left + 8k: each test mask its own band."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, left + 8 * k:left + 8 * k + 8] = value
    return mask


def textured(seed: int, height: int, width: int, mask: np.ndarray | None = None) -> np.ndarray:
    img = np.random.default_rng(seed).integers(90, 110, (height, width, 3)).astype(np.uint8)
    if mask is not None:
        img[mask > 0] = 250  # the defect: a bright band
    return img


def write_visa(root: Path, objects=("candle",)) -> Path:
    """A tiny VisA tree: per object 4 train and 2 test normal images, 2 anomalies (JPG, 48 wide x 32 high,
    as VisA's are wider than high), masks of value 1 (not 255). The anomalies are listed as 010 then 002,
    neither sorted nor in the order of the mask files, so only the CSV row can pair image and mask."""
    rows = ["object,split,label,image,mask"]
    for obj in objects:
        images, masks = f"{obj}/Data/Images", f"{obj}/Data/Masks/Anomaly"
        for i in range(6):
            save_image(root / images / "Normal" / f"{i:04d}.JPG", textured(i, 32, 48))
            rows.append(f"{obj},{'train' if i < 4 else 'test'},normal,{images}/Normal/{i:04d}.JPG,")
        for k, name in enumerate(("010", "002")):
            mask = band(k, 32, 48, value=1, left=12)  # columns 12+8k.. of 48: inside the centre crop
            save_image(root / images / "Anomaly" / f"{name}.JPG", textured(10 + k, 32, 48, mask))
            save_image(root / masks / f"{name}.png", mask)
            rows.append(f"{obj},test,anomaly,{images}/Anomaly/{name}.JPG,{masks}/{name}.png")
    (root / pa.VISA_CSV).parent.mkdir(parents=True, exist_ok=True)
    (root / pa.VISA_CSV).write_text("\n".join(rows) + "\n")
    return root


def write_mvtec2(root: Path, category: str = "can") -> Path:
    """A tiny MVTec AD 2 category: 4 train, 2 validation, 2 good and 3 bad public test images (32 px) whose
    sorted names (img1, img10, img2) differ from their masks' (img10_mask, img1_mask, img2_mask), and an
    unlabelled test_private folder."""
    base = root / category
    for folder, n in (("train/good", 4), ("validation/good", 2), ("test_public/good", 2), ("test_private", 1)):
        for i in range(n):
            save_image(base / folder / f"{i:03d}.png", textured(i, 32, 32))
    for k, name in enumerate(("img1", "img10", "img2")):
        mask = band(k, 32, 32)
        save_image(base / "test_public" / "bad" / f"{name}.png", textured(20 + k, 32, 32, mask))
        save_image(base / "test_public" / "ground_truth" / "bad" / f"{name}_mask.png", mask)
    return root


SMALL = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--crop-size", "32", "--epochs", "0"]


def test_visa_is_read_as_its_csv_says(tmp_path):
    root = write_visa(tmp_path)
    assert pa.find_categories(root, "visa") == ["candle"]
    data = pa.load_category(root, "candle", 32, 32, "visa")
    assert data.train.shape == (4, 3, 32, 32) and data.train.dtype == torch.uint8 and data.validation is None
    names = [f"{p.parent.name}/{p.stem}" for p in data.test_paths]
    assert names == ["Normal/0004", "Normal/0005", "Anomaly/010", "Anomaly/002"]  # the CSV's order
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert not data.masks[:2].any()
    for k in (0, 1):  # resized 48x32 -> 48x32, centre crop drops 8 columns each side: band k at 4+8k
        assert data.masks[2 + k][:, 4 + 8 * k:12 + 8 * k].all() and data.masks[2 + k].sum() == 32 * 8  # value 1
    edge = tmp_path / "edge.png"  # a defect at the left edge of a wide image falls outside the centre crop
    save_image(edge, band(0, 32, 48))
    assert not pa.read_image(edge, 32, 32, mask=True).any()


def test_mvtec2_is_read_with_its_validation_set_and_masks_by_name(tmp_path):
    root = write_mvtec2(tmp_path)
    assert pa.find_categories(root, "mvtec2") == ["can"]
    data = pa.load_category(root, "can", 32, 32, "mvtec2")
    assert data.train.shape == (4, 3, 32, 32) and data.validation.shape == (2, 3, 32, 32)
    assert data.validation.dtype == torch.uint8
    assert [f"{p.parent.name}/{p.stem}" for p in data.test_paths] == ["bad/img1", "bad/img10", "bad/img2",
                                                                        "good/000", "good/001"]
    assert data.labels.tolist() == [1, 1, 1, 0, 0] and not data.masks[3:].any()
    for k, path in enumerate(data.test_paths[:3]):
        b = {"img1": 0, "img10": 1, "img2": 2}[path.stem]
        assert data.masks[k][:, 8 * b:8 * b + 8].all() and data.masks[k].sum() == 32 * 8


VISA_BREAKS = {  # what breaks the tiny VisA tree -> what the one-line error must say
    "no csv": (lambda r: (r / pa.VISA_CSV).unlink(), ["split_csv/1cls.csv: not found", "Data/Images"]),
    "no mask column": (lambda r: edit(r / pa.VISA_CSV, "image,mask\n", "image\n"),
                       ["1cls.csv: no column mask in its header row", "object,split,label,image,mask"]),
    "image gone": (lambda r: (r / "candle/Data/Images/Anomaly/002.JPG").unlink(),
                   ["1cls.csv, line 9: image", "002.JPG not found", "Data/Images/{Normal,Anomaly}"]),
    "mask gone": (lambda r: (r / "candle/Data/Masks/Anomaly/010.png").unlink(),
                  ["1cls.csv, line 8: mask", "010.png not found", "Data/Masks/Anomaly"]),
    "no mask": (lambda r: edit(r / pa.VISA_CSV, ",candle/Data/Masks/Anomaly/002.png", ","),
                ["1cls.csv, line 9: an anomaly row without a mask"]),
    "bad label": (lambda r: edit(r / pa.VISA_CSV, "test,anomaly,candle/Data/Images/Anomaly/010",
                                 "test,defect,candle/Data/Images/Anomaly/010"),
                  ["1cls.csv, line 8: split 'test', label 'defect'", "normal|anomaly"]),
    "anomaly in train": (lambda r: edit(r / pa.VISA_CSV, "test,anomaly,candle/Data/Images/Anomaly/010",
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
    "image without mask": (lambda r: (r / "can/test_public/ground_truth/bad/img10_mask.png").unlink(),
                           ["test_public/bad/img10: defect image with no mask"]),
}


@pytest.mark.parametrize("dataset,what", [("visa", w) for w in VISA_BREAKS] + [("mvtec2", w) for w in MVTEC2_BREAKS])
def test_broken_layouts(capsys, tmp_path, dataset, what):
    write, category, broken = {"visa": (write_visa, "candle", VISA_BREAKS),
                               "mvtec2": (write_mvtec2, "can", MVTEC2_BREAKS)}[dataset]
    root = write(tmp_path)
    breaks, fragments = broken[what]
    breaks(root)
    expect_error(capsys, ["--dataset", dataset, "--data-root", str(root), "--category", category, *SMALL], *fragments)


def test_dataset_errors_name_the_layout_they_expected(capsys, tmp_path):
    visa, mvtec2 = write_visa(tmp_path / "visa"), write_mvtec2(tmp_path / "mvtec2")
    expect_error(capsys, ["--dataset", "visa", "--data-root", str(visa), "--category", "candel", *SMALL],
                 "--category candel", "found: candle", "split_csv/1cls.csv")
    expect_error(capsys, ["--dataset", "mvtec2", "--data-root", str(mvtec2), "--category", "cna", *SMALL],
                 "--category cna", "found: can", "test_public")
    expect_error(capsys, ["--data-root", str(mvtec2), "--category", "can", *SMALL],  # MVTec AD 2 read as MVTec AD
                 "can/test: no images", "ROOT/<category>/test/<good|defect_type>")
    expect_error(capsys, ["--dataset", "visa", "--data-root", str(tmp_path / "nope"), *SMALL],
                 "folder not found", pa.DATASET_URLS["visa"])
    expect_error(capsys, ["--synthetic", "--dataset", "visa", *SMALL], "--synthetic", "drop --dataset visa")


def test_all_visa_categories_end_to_end_beside_im_iad(tmp_path, capsys):
    root = write_visa(tmp_path / "visa", ("candle", "pcb1"))
    out = tmp_path / "out"
    pa.main(["--dataset", "visa", "--data-root", str(root), "--category", "all", "--out", str(out), *SMALL])
    printed = capsys.readouterr().out
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["dataset"], r["category"], r["n_train"] + r["n_holdout"], r["n_test"]) for r in runs] == [
        ("visa", "candle", 4, 4), ("visa", "pcb1", 4, 4)]
    assert all(r["image_auroc"] is not None and r["pixel_auroc"] is not None for r in runs)
    assert runs[0]["published_image_auroc"]["IM-IAD PatchCore"] == 98.6 and "IM-IAD" in runs[0][
        "published_image_auroc"]["source"]
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].endswith("| ms/img | IM-IAD PatchCore |")
    assert table[1].startswith("| candle |") and table[1].endswith("| 98.6 |")
    assert table[2].startswith("| pcb1 |") and table[2].endswith("| 98.5 |")
    assert table[3].startswith("| mean |") and table[3].endswith("| n/a |")  # theirs is over all 12 objects
    assert "IM-IAD PatchCore: published image AUROC, theirs, not ours (the IM-IAD benchmark" in printed


def test_all_mvtec2_categories_end_to_end_without_peer_columns(tmp_path, capsys):
    root = write_mvtec2(tmp_path / "mvtec2")
    out = tmp_path / "out"
    pa.main(["--dataset", "mvtec2", "--data-root", str(root), "--category", "all", "--out", str(out), *SMALL])
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"] == "mvtec2" and result["n_test"] == 5 and result["pixel_auroc"] is not None
    assert "| category | image AUROC | pixel AUROC | pixel AUPRO@30% | train s | ms/img |\n" in capsys.readouterr().out


def test_peer_mean_is_shown_only_when_every_category_ran():
    run = {"seed": 0, "image_auroc": 0.9, "pixel_auroc": None, "pixel_aupro": None, "train_seconds": 1.0,
           "ms_per_image": 1.0}
    objects = [c for c in pa.PEER_AUROC["visa"][1]["IM-IAD PatchCore"] if c != "mean"]
    assert len(objects) == 12
    rows = pa.summarize([dict(run, category=c) for c in objects], "visa")
    assert rows[-1]["category"] == "mean" and rows[-1]["IM-IAD PatchCore"] == 95.1
    assert rows[-1]["image_auroc"] == pytest.approx(0.9)
    rows = pa.summarize([dict(run, category=c) for c in objects[1:]], "visa")
    assert rows[-1]["IM-IAD PatchCore"] is None
    published = [v for c, v in pa.PEER_AUROC["visa"][1]["IM-IAD PatchCore"].items() if c != "mean"]
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
    assert 2 * 10 * 0.5 <= mask.sum() <= 16 * 25 * 1.2  # area of a 2-16 x 10-25 strip after rotation
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
    assert not torch.equal(model.encoder.layer2[0].conv1.weight, weight_before)  # trained end to end


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
                z = lambda v: (v - v.mean()) / torch.sqrt(v.var() + 1e-6)  # noqa: E731
                expected += 0.3 * torch.linalg.norm(z(p_hat) - z(p)) + 0.7 * torch.linalg.norm(p_hat - p)
    assert pa.patch_loss(recon, target, alpha=0.3).item() == pytest.approx(expected.item() / 2, rel=1e-5)


# ---------------------------------------------------------------- memory bank, kNN, maps, metrics
def test_coreset_returns_the_requested_count_and_covers_better_than_random():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(1900, 4), torch.randn(100, 4) * 0.2 + 6])  # a big and a small cluster
    idx = pa.greedy_coreset(x, 50)
    assert len(idx) == 50 and len(idx.unique()) == 50

    def radius(sel):  # covering radius: the farthest any point is from its nearest selected point
        return torch.cdist(x, x[sel]).min(1).values.max().item()
    random_radii = [radius(torch.randperm(len(x))[:50]) for _ in range(10)]
    assert radius(idx) < min(random_radii)


@pytest.mark.parametrize("method", ["mm", "cdist"])
@pytest.mark.parametrize("memory_mb,k", [(256, 1), (1, 1), (1, 3)])
def test_chunked_knn_equals_brute_force(method, memory_mb, k):
    torch.manual_seed(0)
    bank, queries = torch.randn(20000, 24) * 5 + 3, torch.randn(5000, 24) * 5 + 3
    d, idx = pa.knn_scores(queries, bank, k=k, memory_mb=memory_mb, method=method)
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
    assert abs(peak[0] - 28) <= 4 and abs(peak[1] - 36) <= 4  # the patch (3, 4) covers pixels 24-31 x 32-39
    assert m[0].max() < 1.0 and m[0, 0, 0] < m[0].max() / 10


def test_aupro_on_a_hand_made_case():
    # image A: 4 normal pixels, region R1 of 2; image B: 2 normal, region R2 of 4
    masks = np.array([[[0, 0, 0, 0, 1, 1]], [[0, 0, 1, 1, 1, 1]]], bool)
    maps = np.array([[[0.9, 0.2, 0.3, 0.4, 0.8, 0.1]], [[0.5, 0.6, 0.95, 0.7, 0.05, 0.06]]])
    # descending: 0.95 (R2: PRO 1/8) 0.9 (normal: FPR 1/6) 0.8 (R1: +1/4) 0.7 (R2: +1/8 -> PRO 1/2) 0.6 (FPR 2/6)
    expected = (0.125 * (1 / 6) + 0.5 * (0.3 - 1 / 6)) / 0.3
    assert pa.aupro(masks, maps) == pytest.approx(expected)


def test_aupro_regions_use_8_connectivity():
    mask = np.zeros((1, 3, 3), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True  # one region with 8-connectivity, two with 4
    amap = np.linspace(0.2, 0.8, 9).reshape(1, 3, 3)
    amap[0, 0, 0], amap[0, 1, 1], amap[0, 1, 2] = 0.9, 0.0, 0.01
    assert pa.aupro(mask, amap) == pytest.approx(1 / 3)  # 4-connectivity would give 1/2


# ---------------------------------------------------------------- end to end
def test_end_to_end_on_the_synthetic_category(synthetic_root, tmp_path, capsys):
    args = ["--backbone", "resnet18", "--weights", "none", "--image-size", "128", "--crop-size", "128",
            "--epochs", "2", "--save-maps", "3"]
    result = run_main(args, tmp_path, synthetic_root)
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "device cpu" in printed
    assert result["image_auroc"] >= 0.9            # random weights score ~0.5; this run gave 0.997 (seed 0)
    assert result["pixel_auroc"] >= 0.8 and result["pixel_aupro"] >= 0.5
    assert result["n_train"] == 54 and result["n_holdout"] == 6 and result["n_test"] == 40
    assert result["memory_bank_shape"] == [round(54 * 16 * 16 * 0.1), 128]
    assert result["threshold"] > 0 and 0 <= result["f1_at_threshold"] <= 1
    for key in ("train_seconds", "ms_per_image"):
        assert result[key] > 0
    assert result["config"]["crop_size"] == 128 and result["torch"] == torch.__version__
    maps = sorted((tmp_path / "out" / "maps").glob("*.png"))
    assert len(maps) == 3 and Image.open(maps[0]).size == (3 * 128, 128)  # input | overlay | mask


def test_same_seed_gives_the_same_scores_on_cpu(synthetic_root, tmp_path):
    a = run_main(TINY + ["--seed", "3"], tmp_path / "a", synthetic_root)
    b = run_main(TINY + ["--seed", "3"], tmp_path / "b", synthetic_root)
    keys = ("image_auroc", "pixel_auroc", "pixel_aupro", "threshold")
    assert [a[k] for k in keys] == [b[k] for k in keys]
    c = run_main(TINY + ["--seed", "4"], tmp_path / "c", synthetic_root)
    assert c["threshold"] != a["threshold"]


def test_save_load_and_predict_a_folder(synthetic_root, tmp_path, capsys):
    model = tmp_path / "model.pt"
    trained = run_main(TINY + ["--save", str(model)], tmp_path / "train", synthetic_root)
    loaded = run_main(["--load", str(model)], tmp_path / "eval", synthetic_root)
    for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "threshold"):
        assert loaded[k] == trained[k]
    folder = tmp_path / "new_images"
    shutil.copytree(synthetic_root / "synthetic" / "test", folder)
    out = tmp_path / "pred"
    pa.main(["--load", str(model), "--predict", str(folder), "--out", str(out)])
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,score,is_anomalous" and len(rows) == 1 + 40
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
    pa.main(["--data-root", str(root), "--category", "all", "--seeds", "0", "1", "--out", str(out), *TINY])
    table = capsys.readouterr().out
    assert "| screw |" in table and "| mean |" in table and " +- " in table
    assert "| 97.7 | 98.9 |" in table  # the paper's Table 1 screw values, beside ours
    rows = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["category", "screw", "synthetic", "mean"]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted((r["category"], r["seed"]) for r in runs) == [("screw", 0), ("screw", 1), ("synthetic", 0),
                                                                 ("synthetic", 1)]


def test_pretrained_weights_are_read_offline_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    ckpt = tmp_path / "hub" / "checkpoints" / Path(enum.url).name
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, ckpt)
    model = pa.load_backbone("resnet18", "imagenet")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(pa.UsageError, match=f"put {ckpt.name} .* into {ckpt.parent}.* or pass --weights none"):
        pa.load_backbone("resnet18", "imagenet")


# ---------------------------------------------------------------- bad input: one line, exit 2
def test_missing_data_root(capsys, tmp_path):
    expect_error(capsys, ["--data-root", str(tmp_path / "nope"), *TINY], "folder not found", "train/good",
                 pa.DATASET_URLS["mvtec"])


def test_unknown_category_lists_the_found_ones(capsys, synthetic_root):
    expect_error(capsys, ["--data-root", str(synthetic_root), "--category", "scre", *TINY],
                 "--category scre", "found: synthetic")


def test_empty_train_good(capsys, data_root):
    for p in (data_root / "synthetic" / "train" / "good").glob("*.png"):
        p.unlink()
    expect_error(capsys, ["--data-root", str(data_root), "--category", "synthetic", *TINY], "train/good: no images")


def test_undecodable_image_is_named(capsys, data_root):
    bad = data_root / "synthetic" / "test" / "good" / "005.png"
    bad.write_bytes(b"\x89PNG garbage")
    expect_error(capsys, ["--data-root", str(data_root), "--category", "synthetic", *TINY], str(bad), "cannot decode")


def test_mask_without_image_and_image_without_mask(capsys, data_root):
    base = data_root / "synthetic"
    (base / "test" / "blob" / "002.png").unlink()
    expect_error(capsys, ["--data-root", str(data_root), "--category", "synthetic", *TINY],
                 "002_mask.png: mask with no test image")
    (base / "ground_truth" / "blob" / "002_mask.png").unlink()
    (base / "ground_truth" / "scratch" / "004_mask.png").unlink()
    expect_error(capsys, ["--data-root", str(data_root), "--category", "synthetic", *TINY],
                 "scratch/004: defect image with no mask")


def test_one_class_test_set_reports_auroc_as_not_defined(capsys, data_root, tmp_path):
    for kind in ("scratch", "blob", "stain"):
        shutil.rmtree(data_root / "synthetic" / "test" / kind)
    shutil.rmtree(data_root / "synthetic" / "ground_truth")
    result = run_main(TINY, tmp_path, data_root)
    assert result["image_auroc"] is None and result["f1_at_threshold"] is None
    assert "image AUROC n/a" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so --device cuda is valid")
def test_device_cuda_without_gpu(capsys, synthetic_root):
    expect_error(capsys, ["--data-root", str(synthetic_root), "--category", "synthetic", "--device", "cuda", *TINY],
                 "--device cuda", "--device cpu")


def test_load_a_file_that_is_not_a_model(capsys, tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"some": torch.zeros(2)}, junk)
    expect_error(capsys, ["--load", str(junk)], "not a patch_ae/1 model file")
    junk.write_text("hello")
    expect_error(capsys, ["--load", str(junk)], f"--load {junk}: not a model file")


@pytest.mark.parametrize("flag,value,message", [
    ("--epochs", "-1", "--epochs must be >= 0"), ("--coreset-ratio", "0", "--coreset-ratio must be in (0, 1]"),
    ("--coreset-ratio", "1.5", "--coreset-ratio must be in (0, 1]"), ("--alpha", "2", "--alpha must be in [0, 1]"),
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
                          str(tmp_path / "o"), "--save", str(model), "--lr", "1e30", *TINY[:-1], "3"],
                 "training loss became", "at epoch", "lower --lr")
    assert model.read_bytes() == b"an earlier model"


def test_every_config_field_is_a_flag_and_help_works(capsys):
    with pytest.raises(SystemExit) as e:
        pa.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in pa.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_end_to_end_on_cuda(synthetic_root, tmp_path):
    result = run_main(TINY + ["--device", "cuda"], tmp_path, synthetic_root)
    assert result["device"] == "cuda" and result["image_auroc"] is not None


def readme_commands(section: str) -> list[list[str]]:
    """The `python patch_ae.py ...` lines of the README's section whose title starts with `section`."""
    text = (Path(__file__).parent / "README.md").read_text()
    body = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if "python patch_ae.py" in line]
    return [shlex.split(line.split("python patch_ae.py", 1)[1]) for line in lines]


def test_readme_commands_run(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (quick,) = readme_commands("Quick start")
    result = pa.main(quick)[0]
    assert result["image_auroc"] >= 0.95 and "image AUROC" in capsys.readouterr().out
    shutil.copytree(synthetic_root / "synthetic", tmp_path / "my_data" / "my_part")
    shutil.copytree(synthetic_root / "synthetic" / "test", tmp_path / "incoming")
    train, predict = readme_commands("Using it on your own images")
    assert "--save" in train and "--predict" in predict
    pa.main(train + ["--backbone", "resnet18", "--weights", "none", "--image-size", "128", "--crop-size", "128",
                     "--epochs", "5"])  # the offline variant the README gives
    assert len(list((tmp_path / "runs" / "my_part" / "maps").glob("*.png"))) == 8
    pa.main(predict)
    assert len((tmp_path / "runs" / "incoming" / "predictions.csv").read_text().splitlines()) == 41


def test_readme_dataset_commands_parse():
    cfgs = [pa.parse_config(argv)[0] for argv in readme_commands("Data layout")]
    assert [c.dataset for c in cfgs[:3]] == ["visa", "mvtec2", "mvtec2"] and cfgs[0].category == "all"
    assert cfgs[3].load == cfgs[2].save and cfgs[3].predict.endswith("/can/test_private")
