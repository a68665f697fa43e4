"""Tests of deploy.py, Patch AE on one's own images beyond the paper: held-out images, the
validation set and --select best (Guard, patch_ae.fit's per-epoch hook), the threshold, model
files, --predict, and their errors. CPU only, tiny images, resnet18 with random weights.
Run: pytest -q"""
import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conftest
import deploy
import patch_ae as pa
import report
from conftest import (TINY, ReportParser, help_text, parse_command, readme_commands,
                      spy_on_evaluate, write_nan_tif)

CPU = torch.device("cpu")


def metrics(result: dict) -> dict:
    """A result's three metrics, without the seconds a baseline's record also holds."""
    return {m: result[m] for m in pa.METRICS}


def run_main(args, tmp_path, data_root) -> dict:
    """deploy.main on the synthetic category -> its results.json."""
    return conftest.run_main(deploy.main, args, tmp_path, data_root)


def expect_error(capsys, argv, *fragments) -> str:
    """deploy.main(argv) must exit 2 with one 'error:' line holding every fragment."""
    return conftest.expect_error(capsys, deploy.main, argv, *fragments)


def fake_validation(scores: list):
    """A stand-in for deploy.validate that gives `scores` in turn as the validation score (and as
    both AUROCs it is the mean of)."""
    scores = iter(scores)

    def validate(encoder, val, cfg, device):
        s = next(scores)
        return {"image_auroc": s, "pixel_auroc": s, "pixel_aupro": 0.5, "score": s,
                "feature_norm": 1.0, "dead_units": 0.0, "normal_distance": 1.0}
    return validate


# ---------------------------------------------------------------- held-out images, validation
def test_validation_set_has_one_defect_of_each_kind_per_held_out_image_with_its_mask():
    rng = np.random.default_rng(0)
    held = torch.from_numpy(rng.integers(60, 200, (4, 3, 64, 64), dtype=np.uint8))
    train = torch.from_numpy(rng.integers(0, 255, (100, 3, 64, 64), dtype=np.uint8))
    val = deploy.make_validation(held, train, seed=0)
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
    assert len(val.bank_images) == deploy.VAL_BANK_IMAGES == 64
    assert len(val.bank_rows) == 64 * 8 * 8  # < VAL_BANK_ROWS
    assert len(val.bank_rows.unique()) == len(val.bank_rows)
    assert int(val.bank_rows.max()) < deploy.VAL_BANK_IMAGES * 64
    again = deploy.make_validation(held, train, seed=0)
    assert torch.equal(again.images, val.images) and torch.equal(again.bank_rows, val.bank_rows)
    assert not torch.equal(deploy.make_validation(held, train, seed=1).images, val.images)


def test_validation_score_is_the_mean_of_image_and_pixel_auroc():
    assert deploy.validation_score({"image_auroc": 0.9, "pixel_auroc": 0.7,
                                    "pixel_aupro": 0.1}) == pytest.approx(0.8)


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
    states, decoders = [], []

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
    monkeypatch.setattr(deploy, "validate", validate)
    monkeypatch.setattr(pa, "train_patch_ae", spy_train)
    monkeypatch.setattr(deploy, "VAL_TOLERANCE", tolerance)
    monkeypatch.setattr(deploy, "auto_val_every", lambda *a: 1)
    cfg = deploy.DeployConfig(epochs=4, batch_size=16, image_size=32, crop_size=32,
                              backbone="resnet18", weights="none", select=select, holdout=0.1,
                              lr=1e-3)
    model = deploy.fit_guarded(cfg, data, 0, CPU)
    assert model["selected_epoch"] == expected
    assert [r["epoch"] for r in model["validation_curve"]] == [0, 1, 2, 3, 4]
    assert [r["score"] for r in model["validation_curve"]] == fake
    assert len(model["loss_by_epoch"]) == 4
    final, decoder = model["encoder"].state_dict(), model["decoder"].state_dict()
    assert all(torch.equal(final[k], v) for k, v in states[expected].items())
    assert all(torch.equal(decoder[k], v) for k, v in decoders[expected].items())
    # the weights moved
    assert not all(torch.equal(final[k], v) for k, v in states[4].items()) or expected == 4


@pytest.mark.parametrize("select,kept,why", [
    # 80.50 is not more than 1.00 point above 80.00, in the unit the scores are printed in
    ("best", 1, ["--select best", "no later one beat by more than 1.00 points"]),
    ("last", 3, ["the last epoch", "--select last"])])
def test_validation_lines_give_each_score_and_the_kept_epoch_with_why(synthetic_root, monkeypatch,
                                                                      capsys, select, kept, why):
    """Each validated epoch's line gives its score; after training one line gives the top score
    and its epoch, then the epoch kept and why: here the kept one is not the top one."""
    data = pa.load_category(synthetic_root, "synthetic", 32, 32)
    scores = [0.5, 0.8, 0.805, 0.6]  # the top at epoch 2, within VAL_TOLERANCE of epoch 1
    assert deploy.VAL_TOLERANCE == 0.01
    monkeypatch.setattr(deploy, "validate", fake_validation(scores))
    monkeypatch.setattr(deploy, "auto_val_every", lambda *a: 1)
    cfg = deploy.DeployConfig(epochs=3, image_size=32, crop_size=32, backbone="resnet18",
                              weights="none", select=select)
    model = deploy.fit_guarded(cfg, data, 0, CPU)
    printed = capsys.readouterr().out
    for epoch, s in enumerate(scores):
        score = pa.fmt(s, 2)
        assert (f"  validation, epoch {epoch}: score {score} = mean of image AUROC "
                f"{pa.fmt(s)} and pixel AUROC {pa.fmt(s)};") in printed
    (line,) = [line for line in printed.splitlines() if line.startswith("top validation score")]
    found = re.match(rf"top validation score {re.escape(pa.fmt(0.805, 2))} at epoch 2; kept "
                     rf"epoch {kept} \((.+)\); validation ", line)
    assert found, line
    assert all(words in found.group(1) for words in why), line
    assert model["selected_epoch"] == kept
    assert [row["score"] for row in model["validation_curve"]] == scores


def test_validation_every_n_epochs_and_after_the_last(synthetic_root, monkeypatch):
    data = pa.load_category(synthetic_root, "synthetic", 32, 32)
    monkeypatch.setattr(deploy, "validate", lambda *a: {
        "image_auroc": 1.0, "pixel_auroc": 1.0, "pixel_aupro": 1.0, "score": 1.0,
        "feature_norm": 1.0, "dead_units": 0.0, "normal_distance": 1.0})
    monkeypatch.setattr(deploy, "auto_val_every", lambda *a: 2)
    cfg = deploy.DeployConfig(epochs=5, image_size=32, crop_size=32, backbone="resnet18",
                              weights="none", holdout=0.1, select="best")
    model = deploy.fit_guarded(cfg, data, 0, CPU)
    assert [r["epoch"] for r in model["validation_curve"]] == [0, 2, 4, 5]
    assert model["selected_epoch"] == 0 and model["untrained"]["encoder"] is model["encoder"]


def test_automatic_validation_period_keeps_validation_near_its_budget(synthetic_root, monkeypatch):
    assert deploy.VAL_BUDGET == 0.15
    assert deploy.auto_val_every(10.0, 100.0) == 1     # cheap validation: every epoch
    assert deploy.auto_val_every(95.0, 360.0) == 2     # the paper's size (WRN-101, 2-core CPU)
    assert deploy.auto_val_every(4.5, 4.15) == 8       # a 120-image category at 224 px, resnet18
    data = pa.load_category(synthetic_root, "synthetic", 32, 32)

    now = [0.0]  # the clock that times validation: each takes 1000 s, far more than an epoch here

    def slow_validation(*args):
        now[0] += 1000.0
        return {"image_auroc": 1.0, "pixel_auroc": 1.0, "pixel_aupro": 1.0, "score": 1.0,
                "feature_norm": 1.0, "dead_units": 0.0, "normal_distance": 1.0}
    monkeypatch.setattr(deploy, "validate", slow_validation)
    monkeypatch.setattr(deploy, "clock", lambda device: now[0])
    for budget, epochs in ((0.15, [0, 3]), (1e9, [0, 1, 2, 3])):
        monkeypatch.setattr(deploy, "VAL_BUDGET", budget)
        cfg = deploy.DeployConfig(epochs=3, image_size=32, crop_size=32, backbone="resnet18",
                                  weights="none", holdout=0.1)
        model = deploy.fit_guarded(cfg, data, 0, CPU)
        assert [r["epoch"] for r in model["validation_curve"]] == epochs
        assert (model["val_every"] > 3) if budget < 1 else (model["val_every"] == 1)


def test_threshold_is_the_chosen_quantile_of_the_held_out_scores_not_their_maximum(synthetic_root,
                                                                                   monkeypatch,
                                                                                   capsys):
    data = pa.load_category(synthetic_root, "synthetic", 32, 32)
    held = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 10.0])  # the 6 held-out images' scores: one far above
    score_images = pa.score_images

    def fake(encoder, bank, images, *args, desc="scoring", **kwargs):
        scores, maps = score_images(encoder, bank, images, *args, desc=desc, **kwargs)
        return (held.copy(), maps) if desc == "held-out" else (scores, maps)
    monkeypatch.setattr(pa, "score_images", fake)
    for q, expected in ((0.5, 0.35), (0.99, 9.525)):
        monkeypatch.setattr(deploy, "THRESHOLD_QUANTILE", q)
        cfg = deploy.DeployConfig(epochs=0, image_size=32, crop_size=32, backbone="resnet18",
                                  weights="none", holdout=0.1)
        model = deploy.fit_guarded(cfg, data, 0, CPU)
        assert model["threshold"] == pytest.approx(expected)
        assert model["heat_scale"]["source"] == "the held-out normal images"
        # 6 held-out images: the 0.99 quantile is about their largest score, and it says so
        assert ("note: the threshold comes from only 6 held-out images" in
                capsys.readouterr().out) == (q == 0.99)


def test_validation_uses_the_datasets_own_held_out_images(synthetic_root):
    """A dataset that ships held-out normal images (MVTec AD 2's validation/good): all of
    train/good trains."""
    data = pa.load_category(synthetic_root, "synthetic", 32, 32)
    data.validation = data.train[:5]
    cfg = deploy.DeployConfig(epochs=0, image_size=32, crop_size=32, backbone="resnet18",
                              weights="none")
    model = deploy.fit_guarded(cfg, data, 0, CPU)
    assert model["n_train"] == 60 and model["n_holdout"] == 5 and model["threshold"] is not None


# ---------------------------------------------------------------- deploy.main: runs, model files
def test_a_run_that_keeps_epoch_0_is_labelled_so_everywhere(synthetic_root, tmp_path, capsys):
    model = tmp_path / "m.pt"
    trained = run_main(TINY[:-1] + ["0", "--save", str(model)], tmp_path / "a",
                       synthetic_root)
    printed = capsys.readouterr().out
    assert trained["selected_epoch"] == 0
    assert [r["epoch"] for r in trained["validation_curve"]] == [0]
    assert metrics(trained["untrained"]) == metrics(trained)
    assert "validation, epoch 0: score " in printed
    assert re.search(r"^top validation score \S+ at epoch 0; kept epoch 0 ", printed, re.M)
    # the result line
    assert "synthetic seed 0, encoder before training kept (epoch 0): image AUROC" in printed
    assert "| synthetic | 0: encoder before training kept |" in printed  # the table
    assert not re.search(r"synthetic seed 0, Patch AE", printed)
    report = (tmp_path / "a" / "out" / "report.html").read_text()
    assert trained["loss_by_epoch"] == [] and "selected: epoch 0" in report
    assert "encoder before training kept (epoch 0)" in report
    assert "The encoder before training was kept" in report
    assert "training loss (Eq. 3), mean per image: nothing to draw in this run" in report
    blob = torch.load(model, weights_only=True)
    assert blob["selected_epoch"] == 0 and blob["validation_curve"] == trained["validation_curve"]
    loaded = run_main(["--load", str(model)], tmp_path / "b", synthetic_root)
    assert loaded["selected_epoch"] == 0
    assert loaded["validation_curve"] == trained["validation_curve"]
    # a loaded model has no baseline to score
    assert loaded["untrained"] is None and loaded["raw_features"] is None
    assert "encoder before training kept (epoch 0): image AUROC" in capsys.readouterr().out


def test_select_best_without_held_out_images_is_refused(capsys, synthetic_root, tmp_path):
    argv = ["--data-root", str(synthetic_root), "--category", "synthetic", "--out", str(tmp_path),
            *TINY]
    expect_error(capsys, argv + ["--holdout", "0", "--select", "best"], "--select best",
                 "--holdout 0",
                 "pass --holdout 0.1, or drop --select best")
    result = deploy.main(argv + ["--holdout", "0"])[0]  # the paper's protocol
    assert result["selected_epoch"] == 1 and result["n_holdout"] == 0
    assert result["n_train"] == 60 and result["validation_curve"] is None
    assert result["threshold"] is None
    assert result["protocol"].startswith("the paper's: all 60 train/good images train and fill the "
                                         "memory bank, the last epoch kept; the recipe ours")
    assert ("the stem (all before conv3) frozen, conv3 and conv4 at 0.1 x the learning rate"
            in result["protocol"])
    assert f"protocol: {result['protocol']}" in capsys.readouterr().out
    # patch_ae.py's run: the same protocol, images and order, so the same numbers
    paper = pa.main(argv + ["--out", str(tmp_path / "paper")])[0]
    assert paper["protocol"] == result["protocol"]
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "loss_by_epoch"):
        assert paper[key] == result[key], key
    for key in ("untrained", "raw_features"):
        assert metrics(paper[key]) == metrics(result[key]), key


def test_same_seed_gives_the_same_scores_on_cpu(synthetic_root, tmp_path):
    a = run_main(TINY + ["--seed", "3"], tmp_path / "a", synthetic_root)
    b = run_main(TINY + ["--seed", "3"], tmp_path / "b", synthetic_root)
    keys = ("image_auroc", "pixel_auroc", "pixel_aupro", "threshold")
    assert [a[k] for k in keys] == [b[k] for k in keys]
    for key in ("untrained", "raw_features"):
        assert metrics(a[key]) == metrics(b[key]), key
    c = run_main(TINY + ["--seed", "4"], tmp_path / "c", synthetic_root)
    assert c["threshold"] != a["threshold"]


def test_save_load_and_predict_a_folder(synthetic_root, tmp_path, capsys):
    model = tmp_path / "model.pt"
    trained = run_main(TINY + ["--save", str(model)], tmp_path / "train", synthetic_root)
    # deploy.py holds out a tenth of train/good by default: the threshold comes from them
    assert deploy.DeployConfig().holdout == 0.1
    assert (trained["n_train"], trained["n_holdout"]) == (54, 6) and trained["threshold"] > 0
    blob = torch.load(model, weights_only=True)
    assert blob["format"] == deploy.MODEL_FORMAT == "patch_ae/2"
    assert blob["threshold"] == trained["threshold"] and blob["config"]["holdout"] == 0.1
    loaded = run_main(["--load", str(model)], tmp_path / "eval", synthetic_root)
    for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "threshold"):
        assert loaded[k] == trained[k]
    folder = tmp_path / "new_images"
    shutil.copytree(synthetic_root / "synthetic" / "test", folder)
    out = tmp_path / "pred"
    deploy.main(["--load", str(model), "--predict", str(folder), "--out", str(out)])
    rows = read_predictions(out)
    assert len(rows) == 40
    scores = {p: (float(score), int(flag)) for p, (score, flag, _, _) in rows.items()}
    assert all(flag == int(s >= trained["threshold"]) for s, flag in scores.values())
    flagged_defects = np.mean([f for p, (_, f) in scores.items() if not p.startswith("good")])
    flagged_good = np.mean([f for p, (_, f) in scores.items() if p.startswith("good")])
    assert flagged_defects > flagged_good
    assert len(list((out / "heatmaps").rglob("*.png"))) == 40
    assert all((out / heatmap).is_file() for _, _, heatmap, _ in rows.values())
    expect_error(capsys, ["--load", str(model), "--backbone", "resnet50", "--predict",
                          str(folder)], "--backbone resnet18, not resnet50")


def test_one_class_test_set_reports_auroc_as_not_defined(capsys, data_root, tmp_path, monkeypatch):
    for kind in ("scratch", "blob", "stain"):
        shutil.rmtree(data_root / "synthetic" / "test" / kind)
    shutil.rmtree(data_root / "synthetic" / "ground_truth")
    seen = spy_on_evaluate(monkeypatch)
    result = run_main(TINY, tmp_path, data_root)
    assert result["image_auroc"] is None and result["f1_at_threshold"] is None
    assert "image AUROC n/a" in capsys.readouterr().out
    report = (tmp_path / "out" / "report.html").read_text()
    assert "ROC: not defined, the test set holds one class only." in report
    assert report.count("None: the test set has no defective image.") == 2  # top defects, misses
    alarms = int((seen["scores"] >= result["threshold"]).sum())  # every test image is normal
    assert "no defective test image to miss" in report
    assert report.count("<img ") == (alarms or 12)  # the false alarms, else the 12 highest normals


def test_gallery_headings_follow_the_runs_threshold(synthetic_root, tmp_path, monkeypatch):
    """A run whose threshold flags some normal test images, and one whose threshold flags none."""
    seen = spy_on_evaluate(monkeypatch)
    for quantile, name in ((0.0, "low"), (0.9999, "high")):  # about the highest
        monkeypatch.setattr(deploy, "THRESHOLD_QUANTILE", quantile)
        result = run_main(TINY + ["--report-images", "40"], tmp_path / name,
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


def test_holdout_that_leaves_no_training_image_is_refused(capsys, data_root):
    for p in sorted((data_root / "synthetic" / "train" / "good").glob("*.png"))[1:]:
        p.unlink()
    expect_error(capsys, ["--data-root", str(data_root), "--category", "synthetic", *TINY,
                          "--holdout", "0.9"], "--holdout 0.9 leaves no training image of 1",
                 "lower it")


@pytest.mark.parametrize("flags", [["--seeds", "0", "1"], ["--category", "all"]])
def test_a_model_file_takes_one_category_and_one_seed(capsys, tmp_path, flags):
    """--save writes one model: several seeds or every category are refused before any training,
    not narrowed to the first without a word."""
    data = ["--data-root", str(tmp_path)] if "--category" in flags else ["--synthetic"]
    expect_error(capsys, [*data, *TINY, *flags, "--save", str(tmp_path / "m.pt")],
                 "--save, --load and --predict take one --category and one --seed")
    assert not (tmp_path / "m.pt").exists()


def test_load_a_file_that_is_not_a_model(capsys, tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"some": torch.zeros(2)}, junk)
    expect_error(capsys, ["--load", str(junk)], "not a patch_ae/2 model file")
    torch.save({"format": "patch_ae/1", "config": {}}, junk)  # the format before deploy.py
    expect_error(capsys, ["--load", str(junk)], f"--load {junk}: not a patch_ae/2 model file",
                 "--save")
    junk.write_text("hello")
    expect_error(capsys, ["--load", str(junk)], f"--load {junk}: not a model file")
    expect_error(capsys, ["--load", str(tmp_path / "nowhere.pt")], "file not found")


@pytest.mark.parametrize("argv,message", [
    (["--holdout", "1"], "--holdout must be in [0, 1)"),
    (["--holdout", "-0.1"], "--holdout must be in [0, 1)"),
    (["--save", "a.pt", "--load", "b.pt"], "--save and --load together"),
    (["--select", "first"], "invalid choice: 'first'"),
    (["--epochs", "-1"], "--epochs must be >= 0")])  # patch_ae's checks hold here too
def test_nonsensical_options(capsys, argv, message):
    expect_error(capsys, argv, message)


def test_nan_loss_stops_and_keeps_the_saved_model(capsys, synthetic_root, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"an earlier model")
    expect_error(capsys, ["--data-root", str(synthetic_root), "--category", "synthetic", "--out",
                          str(tmp_path / "o"), "--save", str(model), "--overwrite", "--lr",
                          "1e30", *TINY[:-1], "3"],
                 "training loss became", "at epoch", "lower --lr")
    assert model.read_bytes() == b"an earlier model"


def test_every_flag_is_in_its_help_group_and_abbreviations_are_refused(capsys):
    text = help_text(capsys, deploy.main)
    for f in dataclasses.fields(deploy.DeployConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert f"\n{f.metadata['group']}:\n" in text
    holdout = " ".join(text.split("--holdout HOLDOUT", 1)[1].split("\n  --", 1)[0].split())
    assert "examples:" in text and holdout.endswith("(default: 0.1)")  # held out by default
    assert len(dataclasses.fields(deploy.DeployConfig)) <= 28
    expect_error(capsys, ["--hold", "0.1"], "unrecognized arguments: --hold")
    expect_error(capsys, ["--pred", "x"], "unrecognized arguments: --pred")


# ---------------------------------------------------------------- model files and --predict
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, float]:
    """A resnet18 model file at 32 px (random weights, a bank of 4 random images' patches) and its
    threshold."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model = pa.PatchAE(pa.load_backbone("resnet18", "none")).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    bank = pa.build_memory_bank(pa.extract_features(model.encoder, images, 4, CPU), 1.0)
    held = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    scores, _ = pa.score_images(model.encoder, bank, held, 6, CPU)
    threshold = float(np.median(scores))
    scale = {"low": 0.0, "mid": threshold, "source": "test"}
    deploy.save_model(str(path), deploy.DeployConfig(backbone="resnet18", weights="none",
                                                     image_size=32, crop_size=32),
                      {**dict.fromkeys(deploy.KEPT), "encoder": model.encoder,
                       "decoder": model.decoder, "bank": bank, "threshold": threshold,
                       "heat_scale": scale, "n_train": 4, "n_holdout": 0, "protocol": "test"})
    return path, threshold


def without_threshold(model: Path, path: Path) -> Path:
    """A copy of a model file as a model trained with --holdout 0 is: no threshold, no colours."""
    blob = torch.load(model, weights_only=True)
    blob["heat_scale"] = blob["threshold"] = None
    torch.save(blob, path)
    return path


def image_folder(root: Path, n: int) -> Path:
    """n random 40x48 PNGs, the second half in a sub-folder."""
    rng = np.random.default_rng(0)
    for i in range(n):
        p = root / ("sub" if i >= n // 2 else ".") / f"{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(p)
    return root


def read_predictions(out: Path) -> dict:
    """predictions.csv -> {path: [score, is_anomalous, heatmap, error]}, its header checked."""
    with open(out / "predictions.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["path", "score", "is_anomalous", "heatmap", "error"]
    return {row[0]: row[1:] for row in lines[1:]}


def test_predict_notes_a_tiny_image_and_colour_images_for_a_grey_model_once_each(tiny_model,
                                                                                 tmp_path, capsys):
    model, _ = tiny_model
    blob = torch.load(model, weights_only=True)
    blob["grey"] = True                                  # as a model trained on grey images
    grey_model = tmp_path / "grey.pt"
    torch.save(blob, grey_model)
    folder = image_folder(tmp_path / "in", 4)            # 40 x 48 colour images
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(folder / "tiny.png")  # grey, tiny
    deploy.main(["--load", str(grey_model), "--predict", str(folder), "--out",
                 str(tmp_path / "out")])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    tiny = [n for n in notes if "tiny.png is 8x8 px, under half of --image-size 32" in n]
    colour = [n for n in notes if "trained on grey images" in n and "is colour" in n]
    assert len(tiny) == len(colour) == 1                 # four colour images, said once
    assert len(read_predictions(tmp_path / "out")) == 5  # notes, not errors: all are scored


def test_predict_gives_an_unreadable_file_its_row_and_scores_the_others(tiny_model, tmp_path,
                                                                        capsys):
    model, threshold = tiny_model
    folder = image_folder(tmp_path / "in", 6)
    deploy.main(["--load", str(model), "--predict", str(folder), "--out", str(tmp_path / "clean"),
                 "--batch-size", "4"])
    clean = read_predictions(tmp_path / "clean")
    assert len(clean) == 6 and all(err == "" for *_, err in clean.values())
    assert all(flag == str(int(float(s) >= threshold)) for s, flag, _, _ in clean.values())
    (folder / "sub" / "broken.png").write_bytes(b"not an image")
    capsys.readouterr()
    err = expect_error(capsys, ["--load", str(model), "--predict", str(folder), "--out",
                                str(tmp_path / "out"), "--batch-size", "4"],
                       "1 of 7 files could not be read", "the other 6 were scored")
    assert str(tmp_path / "out" / "predictions.csv") in err
    rows = read_predictions(tmp_path / "out")
    assert list(rows) == sorted(rows) and len(rows) == 7
    score, flag, heatmap, reason = rows.pop(str(Path("sub") / "broken.png"))
    assert score == flag == heatmap == "" and "cannot decode" in reason
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
    deploy.main(["--load", str(model), "--predict", str(folder), "--out", str(tmp_path / "out"),
                 "--batch-size", "2"])
    assert counts == {"read": 7, "written": 7, "largest score_images call": 2}
    assert len(read_predictions(tmp_path / "out")) == 7


def test_predict_heatmap_colours_use_the_models_scale_else_each_images_own(tiny_model, tmp_path,
                                                                           monkeypatch, capsys):
    model, threshold = tiny_model
    folder = image_folder(tmp_path / "in", 3)
    scales, panels = [], report.panels

    def spy(image, recon, amap, scale, *args, **kwargs):
        scales.append((scale, (float(amap.min()), float(amap.max()))))
        return panels(image, recon, amap, scale, *args, **kwargs)
    monkeypatch.setattr(report, "panels", spy)
    deploy.main(["--load", str(model), "--predict", str(folder), "--out", str(tmp_path / "a")])
    # one heatmap PNG and one report picture per image (3 images, all in the report's top 12)
    assert len(scales) == 6 and all(s == {"low": 0.0, "mid": threshold, "source": "test"}
                                    for s, _ in scales)
    without_threshold(model, tmp_path / "no_scale.pt")
    scales.clear()
    deploy.main(["--load", str(tmp_path / "no_scale.pt"), "--predict", str(folder), "--out",
                 str(tmp_path / "b")])
    printed = capsys.readouterr().out
    assert "each heatmap is coloured from its own lowest to its highest pixel" in printed
    assert "the model has no threshold" in printed and "--holdout 0.1" in printed
    assert len(scales) == 6
    for scale, (low, high) in scales:  # red at the map's own highest pixel, blue at its lowest
        assert scale["low"] == low and scale["mid"] == pytest.approx((low + high) / 2)
    rows = read_predictions(tmp_path / "b")
    assert all(flag == "" for _, flag, _, _ in rows.values())


def test_heatmap_names_are_plain_unless_two_files_share_a_stem(tmp_path):
    folder = tmp_path / "in"
    paths = [folder / "a.png", folder / "c.png", folder / "c.jpg", folder / "sub" / "b.jpg",
             folder / "sub" / "c.png"]
    assert deploy.heatmap_names(paths, folder) == {
        Path("a.png"): Path("a.png"), Path("c.png"): Path("c.png.png"),
        Path("c.jpg"): Path("c.jpg.png"), Path("sub/b.jpg"): Path("sub/b.png"),
        Path("sub/c.png"): Path("sub/c.png")}  # another folder: no clash with c.png


def test_predictions_name_each_files_heatmap(tiny_model, tmp_path):
    """The heatmap column holds each picture's path relative to --out: heatmaps/<name>.png, or,
    where two files share a stem, heatmaps/<whole name>.png, one picture each."""
    model, _ = tiny_model
    folder, rng = tmp_path / "in", np.random.default_rng(1)
    folder.mkdir()
    (folder / "sub").mkdir()
    for name in ("a.png", "a.jpg", "b.png", "sub/c.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "out"
    deploy.main(["--load", str(model), "--predict", str(folder), "--out", str(out)])
    rows = read_predictions(out)
    heatmaps = {p: heatmap for p, (_, _, heatmap, _) in rows.items()}
    assert heatmaps == {"a.jpg": "heatmaps/a.jpg.png", "a.png": "heatmaps/a.png.png",
                        "b.png": "heatmaps/b.png", "sub/c.png": "heatmaps/sub/c.png"}
    written = {p.relative_to(out).as_posix() for p in (out / "heatmaps").rglob("*.png")}
    assert written == set(heatmaps.values())
    assert (out / "heatmaps/a.jpg.png").read_bytes() != (out / "heatmaps/a.png.png").read_bytes()
    for heatmap in heatmaps.values():  # input | heatmap, under their titles, over the caption
        width, height = Image.open(out / heatmap).size
        assert width == 2 * 32 and height > 32


def test_predict_without_out_writes_under_the_model_files_name(tiny_model, tmp_path, monkeypatch):
    model = Path(shutil.copy(tiny_model[0], tmp_path / "my_part.pt"))
    folder = image_folder(tmp_path / "in", 2)
    monkeypatch.chdir(tmp_path)
    deploy.main(["--load", str(model), "--predict", str(folder)])
    (out,) = (tmp_path / "runs").iterdir()  # runs/<model file stem>__predict__<time>
    assert re.fullmatch(r"my_part__predict__\d{8}-\d{6}", out.name), out.name
    assert len(read_predictions(out)) == 2 and (out / "report.html").is_file()
    # trained or tested on a category, the folder is named for the category, as patch_ae.py's
    cfg = deploy.DeployConfig(load="models/my_part.pt")
    assert re.fullmatch(r"runs/screw__0__\d{8}-\d{6}", deploy.output_folder(cfg).as_posix())


def test_load_keeps_the_image_score_its_threshold_was_fitted_on(tiny_model, synthetic_root,
                                                                tmp_path, capsys):
    """A threshold is a quantile of one image score's values: --image-score reweight on a model
    whose threshold was fitted on max scores is refused; without a threshold it is allowed."""
    model, _ = tiny_model
    folder = image_folder(tmp_path / "in", 2)
    argv = ["--load", str(model), "--image-score", "reweight", "--predict", str(folder), "--out",
            str(tmp_path / "refused")]
    expect_error(capsys, argv, f"--load {model}", "--image-score max", "reweight",
                 "drop --image-score")
    assert not (tmp_path / "refused").exists()
    cfg = deploy.DeployConfig(image_score="max")  # the model's own: nothing overridden
    assert deploy.load_model(str(model), cfg, {"image_score"}, CPU)["threshold"] is not None
    bare = without_threshold(model, tmp_path / "bare.pt")
    cfg = deploy.DeployConfig(image_score="reweight")  # not on the command line: the model's
    deploy.load_model(str(bare), cfg, set(), CPU)
    assert cfg.image_score == "max"
    runs = run_main(["--load", str(bare), "--image-score", "reweight"], tmp_path / "run",
                    synthetic_root)
    assert runs["config"]["image_score"] == "reweight" and runs["threshold"] is None


def test_predict_gives_a_float_image_with_a_nan_pixel_its_error_row(capsys, tiny_model,
                                                                    tmp_path):
    model, _ = tiny_model
    folder = image_folder(tmp_path / "in", 2)
    write_nan_tif(folder / "nan.tif")
    expect_error(capsys, ["--load", str(model), "--predict", str(folder), "--out",
                          str(tmp_path / "out")], "1 of 3 files could not be read")
    rows = read_predictions(tmp_path / "out")
    assert rows["nan.tif"][:3] == ["", "", ""] and "NaN" in rows["nan.tif"][3]
    assert rows["00.png"][0] != ""


# ---------------------------------------------------------------- README.md
def test_readme_own_images_commands_run(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(synthetic_root / "synthetic", tmp_path / "my_data" / "my_part")
    shutil.copytree(synthetic_root / "synthetic" / "test", tmp_path / "incoming")
    (s1, train), (s2, predict) = readme_commands("Using it on your own images")
    assert s1 == s2 == "deploy.py" and "--save" in train and "--predict" in predict
    made = parse_command("deploy.py", train)
    assert made.out and made.save_maps > 0 and made.holdout > 0  # a threshold, pictures
    # the offline variant the README gives: ImageNet EfficientNet-Lite0 from its package
    deploy.main(train + ["--backbone", "efficientnet_lite0", "--image-size", "128", "--crop-size",
                         "128", "--epochs", "5"])
    assert len(list((tmp_path / made.out / "maps").glob("*.png"))) == made.save_maps
    result = json.loads((tmp_path / made.out / "results.json").read_text())
    assert result["n_holdout"] > 0 and result["threshold"] is not None
    assert result["image_auroc"] >= 0.9  # 1.0 when measured (2026-12-03)
    assert "threshold " in capsys.readouterr().out  # a model for --predict has its threshold
    deploy.main(predict)
    scored = parse_command("deploy.py", predict)
    assert len(read_predictions(tmp_path / scored.out)) == 40
    assert "Highest-scoring images" in (tmp_path / scored.out / "report.html").read_text()


# ---------------------------------------------------------------- paths a run writes
def test_output_paths_are_checked_before_any_image_is_read(synthetic_root, tmp_path, capsys,
                                                           monkeypatch):
    """--save on a folder or over a model file, --out on a file or below one: one line naming
    the path, before any image is read or any epoch runs; nothing left behind. With
    --overwrite the model file is written over."""
    reads = []
    real_read = pa.read_image
    monkeypatch.setattr(pa, "read_image", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    a_file, a_folder = tmp_path / "a_file", tmp_path / "a_folder"
    a_file.write_text("keep me")
    a_folder.mkdir()
    data = ["--data-root", str(synthetic_root), "--category", "synthetic", *TINY]
    out = ["--out", str(tmp_path / "out")]
    cases = [(data + out + ["--save", str(a_folder)], f"--save {a_folder}: is a folder"),
             (data + out + ["--save", str(a_file)], f"--save {a_file}: a file is there already",
              "--overwrite"),
             (data + ["--out", str(a_file)], f"--out {a_file}: is a file"),
             (data + ["--out", str(a_file / "sub")], f"{a_file} is a file"),
             (data + out + ["--save", str(a_file / "m.pt")], f"{a_file} is a file")]
    for argv, *fragments in cases:
        expect_error(capsys, argv, *fragments)
    assert not reads and not (tmp_path / "out").exists()
    assert a_file.read_text() == "keep me" and not any(a_folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]  # no .tmp files
    deploy.main(data + out + ["--save", str(a_file), "--overwrite"])
    assert torch.load(a_file, weights_only=True)["format"] == deploy.MODEL_FORMAT
    # patch_ae.py checks --out the same way
    conftest.expect_error(capsys, pa.main, data + ["--out", str(a_file / "x")],
                          f"{a_file} is a file")


def test_results_are_written_before_the_model_file(synthetic_root, tmp_path, monkeypatch):
    """A model file that cannot be written (a full disk, say) loses no result: results.json is
    already there, and no temporary file is left."""
    def fail(obj, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", fail)
    out, model = tmp_path / "out", tmp_path / "m.pt"
    with pytest.raises(OSError):
        deploy.main(["--data-root", str(synthetic_root), "--category", "synthetic", "--out",
                     str(out), "--save", str(model), *TINY])
    assert (out / "results.json").is_file() and (out / "results.csv").is_file()
    assert not model.exists() and not list(tmp_path.glob(".m.pt.tmp*"))


def test_load_takes_the_model_files_settings_and_names_the_flags_it_ignores(
        synthetic_root, tmp_path, capsys):
    """--load: a size flag is checked against the model's own size once the file is read (not
    against the defaults: --image-size 64 alone is the model's, though the default crop is
    224); a training flag is ignored, named in one line; the model's settings stay."""
    model = tmp_path / "m.pt"
    trained = run_main(TINY + ["--save", str(model)], tmp_path / "a", synthetic_root)
    capsys.readouterr()
    other_init = {"pca": "random", "random": "pca"}[trained["config"]["fusion_init"]]
    loaded = run_main(["--load", str(model), "--image-size", "64", "--epochs", "7", "--lr",
                       "0.5", "--fusion-init", other_init], tmp_path / "b", synthetic_root)
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if "ignored" in line]
    assert notes == [f"note: --load {model}: the model was trained already, so --fusion-init, "
                     f"--epochs, --lr are ignored; its own settings stay"]
    assert loaded["image_auroc"] == trained["image_auroc"]
    assert (loaded["config"]["epochs"], loaded["config"]["lr"]) == (1, trained["config"]["lr"])
    assert loaded["config"]["fusion_init"] == trained["config"]["fusion_init"]
    expect_error(capsys, ["--load", str(model), "--crop-size", "32"],
                 "the model was made with --crop-size 64, not 32")
