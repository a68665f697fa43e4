"""Tests of bench.py: CPU only, random-init resnet18 on the synthetic category, about 20 s on 2
cores. No timing is asserted: times only have to be positive; sizes, shapes and memory bounds are
exact."""
import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import patch_ae

TINY = ["--synthetic", "--backbone", "resnet18", "--baseline-backbone", "resnet18",
        "--weights", "none", "--image-size", "64", "--crop-size", "64", "--epochs", "1",
        "--batch-size", "8", "--max-train", "20", "--max-test", "24", "--coreset-ratio", "0.25",
        "--baseline-coreset-ratio", "0.5", "--baseline-dim", "512", "--warmup", "1",
        "--repeats", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out, stdout = tmp / "bench.json", io.StringIO()
    with contextlib.redirect_stdout(stdout):  # capsys is per test; this run serves several
        returned = bench.main(TINY + ["--data-root", str(tmp / "data"), "--json", str(out)])
    return stdout.getvalue(), json.loads(out.read_text()), returned


def table(stdout: str, first_column: str) -> list[dict]:
    """The markdown table whose header starts with `first_column`, as dicts of cell text."""
    lines = stdout.splitlines()
    top = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_column} |"))
    keys = [c.strip() for c in lines[top].strip("|").split("|")]
    rows = []
    for ln in lines[top + 2:]:
        if not ln.startswith("|"):
            break
        rows.append(dict(zip(keys, (c.strip() for c in ln.strip("|").split("|")))))
    return rows


def test_table_and_json_hold_every_field(tiny_run):
    stdout, result, returned = tiny_run
    assert returned == result
    head = result["header"]
    assert head["device"] == "cpu" and head["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", head["date"])
    assert "device cpu" in stdout and f"torch {torch.__version__}" in stdout
    assert head["date"] in stdout
    rows = table(stdout, "method")
    assert [r["method"] for r in rows] == ["Patch AE", "PatchCore"]
    assert [k for k, _ in bench.METHOD_COLUMNS] == list(rows[0])
    assert all(cell not in ("", "n/a") for r in rows for cell in r.values())
    for row, printed in zip(result["methods"], rows):
        assert printed["bank rows x dims"] == f"{row['bank_rows']} x {row['bank_dims']}"
        for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            assert 0 <= row[key] <= 1
        for key in ("fit_s", "features_ms", "knn_ms", "map_ms", "total_ms", "images_per_s",
                    "params_m", "peak_fit_mb", "peak_infer_mb"):
            assert row[key] > 0, key
        assert row["total_ms_min"] <= row["total_ms"] <= row["total_ms_max"]
        assert all(len(v) == 2 for v in row["passes_ms"].values())  # --repeats 2
        stages = row["features_ms"] + row["knn_ms"] + row["map_ms"]
        assert row["total_ms"] == pytest.approx(stages, rel=1e-6)
        assert row["images_per_s"] == pytest.approx(1000 / row["total_ms"])
        assert row["n_test"] == 24 and row["n_train"] == 20


def test_bank_sizes_match_the_data(tiny_run):
    _, result, _ = tiny_run
    ae, pc = result["methods"]
    patches = 20 * (64 // 8) ** 2                 # --max-train 20 images, one feature per 8x8 patch
    assert ae["bank_rows"] == int(0.25 * patches) == 320      # --coreset-ratio
    assert pc["bank_rows"] == int(0.5 * patches) == 640       # --baseline-coreset-ratio
    assert ae["bank_dims"] == (128 + 256) // 3    # resnet18: c3 = (c1 + c2) / 3
    assert pc["bank_dims"] == 512                 # --baseline-dim
    for row in (ae, pc):
        assert row["bank_mb"] == row["bank_rows"] * row["bank_dims"] * 4 / 2**20
    # same backbone: the Patch AE encoder has exactly the two 1x1 fusion convs more than PatchCore
    fuse = (384 * 128 + 128) + (128 * 128 + 128)
    assert round((ae["params_m"] - pc["params_m"]) * 1e6) == fuse
    ratios = result["patch_ae_over_patchcore"]
    assert ratios["bank_mb"] == pytest.approx((320 * 128) / (640 * 512))


def test_knn_table_times_knn_scores_beside_torch_mm(tiny_run):
    stdout, result, _ = tiny_run
    knn = result["knn"]
    assert [r["method"] for r in knn] == ["Patch AE", "PatchCore"]
    for r in knn:
        assert r["queries"] == 8 * 64                         # one batch of 8 images vs the bank
        assert r["gflops"] > 0 and r["mm_gflops"] > 0 and r["budget_mb"] == 8  # the CPU default
        assert r["ratio_to_mm"] == pytest.approx(r["gflops"] / r["mm_gflops"])
    assert len(table(stdout, "method")) == 2 and "knn_scores beside torch.mm" in stdout


def test_scaling_memory_stays_far_below_the_distance_matrix(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    # 784 queries x 100k rows: the whole distance matrix is 300 MB; the budget allows 8 MB blocks
    result = bench.main(["--scaling", "--backbone", "resnet18", "--bank-rows", "2000", "100000",
                         "--knn-memory-mb", "8", "--coreset-rows", "3000", "--warmup", "1",
                         "--repeats", "1", "--json", str(out)])
    stdout = capsys.readouterr().out
    assert json.loads(out.read_text()) == result
    rows = result["scaling"]
    assert [r["bank_rows"] for r in rows] == [2000, 100000]
    assert all(r["queries"] == 28 * 28 and r["dims"] == 128 and r["ms"] > 0 for r in rows)
    assert len(table(stdout, "queries x dims")) == 2
    # RSS also counts BLAS and OpenMP scratch (tens of MB here), so the bound is loose but still
    # far below what an unchunked scorer would add
    full_matrix_mb = 784 * 100000 * 4 / 2**20
    if rows[1]["working_mb"] is not None:         # None where peak RSS cannot be reset (not Linux)
        assert rows[1]["working_mb"] < full_matrix_mb / 3, rows[1]
    assert result["coreset"]["selected"] == 300 and result["coreset"]["seconds"] > 0


def official_patchcore_features(maps: list[torch.Tensor], dim: int,
                                target_dim: int) -> torch.Tensor:
    """patchcore-inspection's path, written its way: patchify to (B, L, C, 3, 3), upsample each of
    the C*3*3 values as its own image, MeanMapper per layer, Aggregator over the stacked layers."""
    B, _, h, w = maps[0].shape
    per_layer = []
    for f in maps:
        C, H, W = f.shape[1:]
        p = F.unfold(f, 3, padding=1).reshape(B, C, 3, 3, -1)
        p = p.permute(0, 4, 1, 2, 3)                                    # (B, L, C, 3, 3)
        if (H, W) != (h, w):
            p = p.reshape(B, H, W, C, 3, 3).permute(0, 3, 4, 5, 1, 2).reshape(-1, 1, H, W)
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            p = p.reshape(B, C, 3, 3, h, w).permute(0, 4, 5, 1, 2, 3).reshape(B, h * w, C, 3, 3)
        p = p.reshape(-1, C * 9)
        per_layer.append(F.adaptive_avg_pool1d(p[:, None], dim)[:, 0])                # MeanMapper
    stacked = torch.stack(per_layer, 1).reshape(len(per_layer[0]), 1, -1)
    aggregated = F.adaptive_avg_pool1d(stacked, target_dim)                         # Aggregator
    return aggregated.reshape(B, h, w, target_dim).permute(0, 3, 1, 2)


@pytest.mark.parametrize("backbone", ["resnet18", "densenet201"])
def test_patchcore_features_match_the_official_path(backbone):
    torch.manual_seed(0)
    model = bench.PatchCoreFeatures(backbone, "none", dim=96, target_dim=40).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        z = model(x)
        x3 = model.conv3(model.stem(x))         # the same cut as the Patch AE encoder's
        taps = [x3, model.conv4(x3)]
    assert [t.shape[-1] for t in taps] == [8, 4]            # stride 8 and stride 16
    assert z.shape == (2, 40, 8, 8)
    assert torch.allclose(z, official_patchcore_features(taps, 96, 40), atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--knn-method", "mm"], "unrecognized arguments: --knn-method"),
    (["--knn-memory", "8"], "unrecognized arguments: --knn-memory"),  # no abbreviations
    (["--epochs", "two"], "invalid int value: 'two'"),
    (["--baseline", "ensemble", "--baseline-backbone", "resnet18"],
     "--baseline-backbone is for --baseline single"),
    (["--weights", "my_backbone.pt"], "use 'imagenet' or 'none'"),
    (["--category", "all"], "--category all"),
    (["--synthetic", "--category", "screw"], "--synthetic makes its own category"),
    (["--alpha", "2"], "--alpha must be in [0, 1]"),
    (["--seeds", "0", "1"], "unrecognized arguments: --seeds"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_missing_data_root_is_a_usage_error(tmp_path, capsys):
    """patch_ae's UsageError (here: no MVTec folder) ends the same way as bench's own."""
    with pytest.raises(SystemExit) as e:
        bench.main(["--data-root", str(tmp_path / "nowhere"), "--weights", "none", "--backbone",
                    "resnet18", "--baseline-backbone", "resnet18", "--crop-size", "32",
                    "--image-size", "32"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --data-root") and err.count("\n") == 1


# ------------------------------------------------------------ Config flags, distances, --scaling
def test_patch_ae_flags_come_from_config_and_reach_training(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    fields = set(patch_ae.Config.__dataclass_fields__) - set(bench.NOT_IN_BENCH)
    for name in fields:  # a field added to Config comes by itself
        assert "--" + name.replace("_", "-") + " " in text, name
    assert "--holdout" not in text and "--predict" not in text and "--seeds" not in text

    class Stop(Exception):
        pass

    def spy(cfg, train, seed, device, baselines=True):
        seen.append((cfg, train, seed, baselines))
        raise Stop
    seen = []
    monkeypatch.setattr(bench, "fit", spy)
    with pytest.raises(Stop):
        bench.main(TINY + ["--data-root", str(tmp_path / "data"), "--lr", "1e-5", "--alpha", "0.3",
                           "--seed", "2"])
    cfg, train, seed, baselines = seen[0]
    assert (cfg.lr, cfg.alpha, cfg.epochs, cfg.batch_size) == (1e-5, 0.3, 1, 8)
    assert (cfg.backbone, cfg.crop_size) == ("resnet18", 64)
    assert (cfg.category, cfg.data_root) == ("synthetic", str(tmp_path / "data"))
    # the paper's protocol (every train/good image trains; no held-out images exist in Config),
    # as PatchCore uses every image; bench times no baseline encoder
    assert not hasattr(cfg, "holdout") and len(train) == 20   # --max-train 20: all of them
    assert (cfg.seed, seed, baselines) == ([2], 2, False)


def test_timed_pass_scores_both_methods_as_patch_ae_does(tmp_path):
    """The timed steps give what patch_ae.score_images gives: both methods' maps and scores from
    the L2 distance to the nearest bank row, so the pixel metrics compare like for like."""
    args = bench.parse_args(TINY + ["--data-root", str(tmp_path / "data")])
    cpu = torch.device("cpu")
    data = bench.load_data(args)
    with contextlib.redirect_stdout(io.StringIO()):
        patchcore = bench.fit_patchcore(data, args, cpu, bench.MemoryMeter(cpu))
        patch_ae_method = bench.fit_patch_ae(data, args, cpu, bench.MemoryMeter(cpu))
    for method in (patchcore, patch_ae_method):
        seconds, scores, maps = bench.timed_pass(method, data.test[:4], args, cpu)
        (extractor, bank), = method["members"]
        expected_scores, expected_maps = patch_ae.score_images(extractor, bank, data.test[:4], 4,
                                                               cpu)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
        torch.testing.assert_close(maps, expected_maps)
        assert maps.shape == (4, 64, 64) and all(t > 0 for t in seconds.values())


def test_scaling_reads_c3_without_building_the_backbone(monkeypatch, capsys):
    devices, load = [], bench.load_backbone

    def spy(name, weights):
        model = load(name, weights)
        devices.append((name, next(model.conv4.parameters()).device.type))
        return model
    monkeypatch.setattr(bench, "load_backbone", spy)
    result = bench.main(["--scaling", "--bank-rows", "50", "--coreset-rows", "0", "--warmup", "0",
                         "--repeats", "1", "--crop-size", "32", "--image-size", "32"])
    assert devices == [("wide_resnet101_2", "meta")]           # no 127M-parameter network built
    assert {r["dims"] for r in result["scaling"]} == {512}     # c3 = (512 + 1024) / 3


def test_scaling_images_sets_the_queries_to_that_many_images_patches(capsys):
    argv = ["--scaling", "--backbone", "resnet18", "--bank-rows", "50", "--coreset-rows", "0",
            "--warmup", "0", "--repeats", "1", "--crop-size", "32", "--image-size", "32"]
    one = bench.main(argv)["scaling"]
    batch = bench.main(argv + ["--scaling-images", "16"])["scaling"]
    assert {r["queries"] for r in one} == {16}                 # (32 / 8)^2 patches an image
    assert {r["queries"] for r in batch} == {16 * 16}


def test_dataset_flag_reaches_the_reader(tmp_path, capsys):
    """--dataset is one of patch_ae's flags that bench takes: it chooses the layout bench reads."""
    with pytest.raises(SystemExit):
        bench.main(["--dataset", "visa", "--data-root", str(tmp_path / "nowhere"), "--weights",
                    "none", "--backbone", "resnet18", "--baseline-backbone", "resnet18",
                    "--crop-size", "32", "--image-size", "32"])
    err = capsys.readouterr().err
    assert "--dataset visa" in err and "split_csv/1cls.csv" in err
