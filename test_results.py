"""Tests of what a run of patch_ae.py writes and prints (its supporting section "What a run writes
and prints"): the decoder's reconstruction and its PSNR, the differences the table and the result
line print, and how its files are written (report.html's size line, UTF-8 whatever the locale).
(results.json, results.csv, the pictures and the report are tested end to end in
test_patch_ae.py, test_deploy.py and test_report.py.) Run: pytest -q"""
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import patch_ae as pa
import report

CPU = torch.device("cpu")


class PassThrough(pa.Encoder):
    """An encoder whose features are its scaled input: with an identity decoder, I_hat is the
    scaled image itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zeros(torch.nn.Module):
    """A decoder that outputs 0 everywhere: the backbone's mean colour, scaled."""

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(r)


@pytest.mark.parametrize("name,mean_pixel", [("resnet18", [124, 116, 104]),     # ImageNet's mean
                                             ("efficientnet_lite0", [127, 127, 127])])
def test_reconstruct_undoes_the_backbones_input_scaling(name, mean_pixel):
    encoder = PassThrough(pa.load_backbone(name, "none"))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(pa.reconstruct(encoder, torch.nn.Identity(), images, CPU), images)
    assert pa.reconstruction_psnr(encoder, torch.nn.Identity(), images, 1, CPU) > 100
    flat = pa.reconstruct(encoder, Zeros(), images, CPU)  # the backbone's mean, 0-255
    assert flat.dtype == torch.uint8 and flat.shape == images.shape
    assert [int(flat[0, c].min()) for c in range(3)] == mean_pixel
    assert [int(flat[0, c].max()) for c in range(3)] == mean_pixel
    mse = (torch.tensor(mean_pixel).view(1, 3, 1, 1).float() - images.float()).square().mean()
    assert pa.reconstruction_psnr(encoder, Zeros(), images, 1, CPU) == pytest.approx(
        10 * math.log10(255 ** 2 / float(mse)), rel=1e-5)
    assert pa.reconstruction_psnr(encoder, Zeros(), images[:0], 1, CPU) is None


# what write_report reads of cfg
REPORTING = SimpleNamespace(report_images=1, save_maps=0, backbone="resnet18")


def test_write_report_says_a_small_pages_size_in_kb(tmp_path, capsys):
    page = ["<p>" + "x" * 40_000 + "</p>"]
    pa.write_report(REPORTING, tmp_path, "a page", "none", CPU, None, page)
    assert capsys.readouterr().out == f"report: {tmp_path / 'report.html'} (40 KB)\n"


def test_files_are_utf8_whatever_the_locale(tmp_path):
    """Under the C locale (ASCII; UTF-8 mode and locale coercion off) report.html and a CSV with a
    file name in German are still written, as UTF-8: the encoding the page's <meta charset>
    declares, and the one a spreadsheet is told to read."""
    title, name = "Prüfung: 99 % ≥ Schwelle", "Prüfung/001.png"
    code = (f"import pathlib, types, patch_ae as pa; out = pathlib.Path({str(tmp_path)!r}); "
            f"pa.write_report(types.SimpleNamespace(report_images=1, save_maps=0, "
            f"backbone='resnet18'), out, {title!a}, 'none', 'cpu', None, []); "
            f"pa.atomic_save(pa.csv_text([[{name!a}, '0.5']]), out / 'predictions.csv')")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(Path(pa.__file__).parent)}  # ascii above: the C locale's argv
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "report.html").read_bytes().decode("utf-8")
    assert "<meta charset='utf-8'>" in page and f"<title>Patch AE: {title}, resnet18" in page
    assert (tmp_path / "predictions.csv").read_bytes().decode("utf-8") == f"{name},0.5\n"


def test_change_is_the_difference_of_the_shown_values():
    # unrounded: 87.44 - 87.66 = -0.22 -> '-0.2', beside 87.4 and 87.7 that differ by 0.3
    assert pa.change(0.8744, 0.8766) == "-0.3"
    assert pa.change(0.8766, 0.8744) == "+0.3"
    assert pa.change(0.87449, 0.87351) == "+0.0"  # both shown as 87.4
    assert pa.change(None, 0.5) == pa.change(0.5, float("nan")) == "n/a"
    header, cells, notes = pa.table_cells([{
        "category": "bottle", "selected_epochs": "10", "protocol": "p", "image_auroc": 0.8744,
        "image_auroc_std": None, "untrained_image_auroc": 0.8766,
        "raw_features_image_auroc": 0.9011, "pixel_auroc": None, "pixel_aupro": None,
        "train_seconds": 1.0, "ms_per_image": 1.0}], [], "")
    assert cells[0][header.index("image AUROC")] == "87.4 (raw 90.1, before 87.7)"
    assert cells[0][header.index("pixel AUROC")] == "n/a"
    assert "raw = the raw features" in notes[0] and "before = the encoder before" in notes[0]
    r = {"category": "bottle", "seed": 0, "selected_epoch": 10, "threshold": None,
         "image_auroc": 0.8744, "pixel_auroc": None, "pixel_aupro": None, "ms_per_image": 1.0,
         "f1_at_threshold": None, "untrained": {"image_auroc": 0.8766, "pixel_auroc": None,
                                                "pixel_aupro": None},
         "raw_features": {"image_auroc": 0.9011, "pixel_auroc": None, "pixel_aupro": None}}
    text = pa.run_text(r)
    header, rows = text["comparison"]
    assert header == ["metric", "raw features", "encoder before training", "Patch AE, epoch 10",
                      "change from raw features", "change from encoder before training"]
    assert rows[0] == ["image AUROC", "90.1", "87.7", "87.4", "-2.7", "-0.3"]
    assert report.training_sentence(10, rows, True) == (
        "Training changed image AUROC by -0.3 points (87.7 to 87.4; -2.7 from the raw features' "
        "90.1).")
    lines = text["summary"].splitlines()
    assert lines[1].startswith("  raw features (") and lines[1].endswith(
        "90.1 / n/a / n/a; the kept encoder -2.7 / n/a / n/a points")
    assert lines[2].startswith("  encoder before training (") and lines[2].endswith(
        "87.7 / n/a / n/a; the kept encoder -0.3 / n/a / n/a points")
