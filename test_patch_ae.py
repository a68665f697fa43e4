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
                 pa.MVTEC_URL)


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


# ---------------------------------------------------------------- issue 8: PatchCore's distances, coreset start, predict
def test_squared_distance_squares_the_patch_scores_before_the_blur():
    torch.manual_seed(0)
    encoder = pa.Encoder(pa.load_backbone("resnet18", "none")).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    cpu = torch.device("cpu")
    feats = pa.extract_features(encoder, images[:1], 1, cpu)                     # (1, C, 4, 4)
    bank = feats.permute(0, 2, 3, 1).reshape(16, -1)[::2]   # half of image 0's patches: distances 0 and > 0
    s_l2, m_l2 = pa.score_images(encoder, bank, images, 2, cpu, distance="l2")
    s_sq, m_sq = pa.score_images(encoder, bank, images, 2, cpu, distance="squared")
    with torch.no_grad():
        r = encoder(pa.normalize(images.float() / 255))                          # (3, C, 4, 4)
    d, _ = pa.knn_scores(r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]), bank)
    patch = d.view(3, 4, 4)
    torch.testing.assert_close(m_l2, pa.anomaly_maps(patch, 32))
    torch.testing.assert_close(m_sq, pa.anomaly_maps(patch.square(), 32))    # squared, then upsampled and blurred
    assert not torch.allclose(m_sq, m_l2.square(), rtol=1e-3)                # not the square of the blurred map
    np.testing.assert_allclose(s_sq, s_l2 ** 2, rtol=1e-5)                   # max: the same ranking
    with pytest.raises(ValueError, match="distance"):
        pa.score_images(encoder, bank, images, 2, cpu, distance="l1")


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
    """A resnet18 model file at 32 px (random weights, a bank of 4 random images' patches) and its threshold."""
    torch.manual_seed(0)
    path, cpu = tmp_path_factory.mktemp("model") / "model.pt", torch.device("cpu")
    encoder = pa.Encoder(pa.load_backbone("resnet18", "none")).eval()
    bank = pa.build_memory_bank(pa.extract_features(encoder, torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
                                                    4, cpu), 1.0)
    scores, _ = pa.score_images(encoder, bank, torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), 6, cpu)
    threshold = float(np.median(scores))
    pa.save_model(str(path), pa.Config(backbone="resnet18", weights="none", image_size=32, crop_size=32),
                  {"encoder": encoder, "bank": bank, "threshold": threshold, "map_range": (0.0, 2 * threshold),
                   "n_train": 4, "n_holdout": 0})
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


def test_predict_gives_an_unreadable_file_its_row_and_scores_the_others(tiny_model, tmp_path, capsys):
    model, threshold = tiny_model
    folder = image_folder(tmp_path / "in", 6)
    pa.main(["--load", str(model), "--predict", str(folder), "--out", str(tmp_path / "clean"), "--batch-size", "4"])
    clean = read_predictions(tmp_path / "clean")
    assert len(clean) == 6 and all(err == "" for *_, err in clean.values())
    assert all(flag == str(int(float(s) >= threshold)) for s, flag, _ in clean.values())
    (folder / "sub" / "broken.png").write_bytes(b"not an image")
    capsys.readouterr()
    err = expect_error(capsys, ["--load", str(model), "--predict", str(folder), "--out", str(tmp_path / "out"),
                                "--batch-size", "4"], "1 of 7 files could not be read", "the other 6 were scored")
    assert str(tmp_path / "out" / "predictions.csv") in err
    rows = read_predictions(tmp_path / "out")
    assert list(rows) == sorted(rows) and len(rows) == 7
    score, flag, reason = rows.pop(str(Path("sub") / "broken.png"))
    assert score == flag == "" and "cannot decode" in reason
    assert rows == clean                                     # the others: scored, and as without the broken file
    assert len(list((tmp_path / "out" / "heatmaps").rglob("*.png"))) == 6


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
    pa.main(["--load", str(model), "--predict", str(folder), "--out", str(tmp_path / "out"), "--batch-size", "2"])
    assert counts == {"read": 7, "written": 7, "largest score_images call": 2}
    assert len(read_predictions(tmp_path / "out")) == 7


def test_predict_heatmap_colours_use_the_models_range_else_each_images_own(tiny_model, tmp_path, monkeypatch, capsys):
    model, threshold = tiny_model
    folder = image_folder(tmp_path / "in", 3)
    ranges = []
    monkeypatch.setattr(pa, "save_heatmap", lambda path, image, amap, vrange, mask=None: ranges.append(
        (vrange, (float(amap.min()), float(amap.max())))))
    pa.main(["--load", str(model), "--predict", str(folder), "--out", str(tmp_path / "a")])
    assert len(ranges) == 3 and all(vrange == (0.0, 2 * threshold) for vrange, _ in ranges)
    blob = torch.load(model, weights_only=True)
    blob["map_range"] = None                                  # as a model trained with --holdout 0
    torch.save(blob, tmp_path / "no_range.pt")
    ranges.clear()
    pa.main(["--load", str(tmp_path / "no_range.pt"), "--predict", str(folder), "--out", str(tmp_path / "b")])
    assert "each heatmap is coloured from its own lowest to its highest pixel" in capsys.readouterr().out
    assert len(ranges) == 3 and all(vrange == own for vrange, own in ranges)
