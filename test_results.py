"""Tests of results.py, what a run writes and shows beside the method: the decoder's
reconstruction and its PSNR, and how its files are written (report.html's size line, UTF-8
whatever the locale). (results.json, results.csv, the pictures and the report are tested end to
end in test_patch_ae.py, test_deploy.py and test_report.py.) Run: pytest -q"""
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import patch_ae as pa
import results

CPU = torch.device("cpu")


class PassThrough(pa.Encoder):
    """An encoder whose features are its normalised input: with an identity decoder, I_hat is the
    normalised image itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zeros(torch.nn.Module):
    """A decoder that outputs 0 everywhere: the normalised mean colour."""

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(r)


@pytest.mark.parametrize("name,mean_pixel", [("resnet18", [124, 116, 104]),     # ImageNet's mean
                                             ("efficientnet_lite0", [127, 127, 127])])
def test_reconstruct_undoes_the_backbones_normalisation(name, mean_pixel):
    encoder = PassThrough(pa.load_backbone(name, "none"))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(results.reconstruct(encoder, torch.nn.Identity(), images, CPU), images)
    assert results.reconstruction_psnr(encoder, torch.nn.Identity(), images, 1, CPU) > 100
    flat = results.reconstruct(encoder, Zeros(), images, CPU)  # the backbone's mean, 0-255
    assert flat.dtype == torch.uint8 and flat.shape == images.shape
    assert [int(flat[0, c].min()) for c in range(3)] == mean_pixel
    assert [int(flat[0, c].max()) for c in range(3)] == mean_pixel
    mse = (torch.tensor(mean_pixel).view(1, 3, 1, 1).float() - images.float()).square().mean()
    assert results.reconstruction_psnr(encoder, Zeros(), images, 1, CPU) == pytest.approx(
        10 * math.log10(255 ** 2 / float(mse)), rel=1e-5)
    assert results.reconstruction_psnr(encoder, Zeros(), images[:0], 1, CPU) is None


REPORTING = SimpleNamespace(report_images=1, backbone="resnet18")  # what write_report reads of cfg


def test_write_report_says_a_small_pages_size_in_kb(tmp_path, capsys):
    page = ["<p>" + "x" * 40_000 + "</p>"]
    results.write_report(REPORTING, tmp_path, "a page", "none", CPU, page)
    assert capsys.readouterr().out == f"report: {tmp_path / 'report.html'} (40 KB)\n"


def test_files_are_utf8_whatever_the_locale(tmp_path):
    """Under the C locale (ASCII; UTF-8 mode and locale coercion off) report.html and a CSV with a
    file name in German are still written, as UTF-8: the encoding the page's <meta charset>
    declares, and the one a spreadsheet is told to read."""
    title, name = "Prüfung: 99 % ≥ Schwelle", "Prüfung/001.png"
    code = (f"import pathlib, types, results; out = pathlib.Path({str(tmp_path)!r}); "
            f"results.write_report(types.SimpleNamespace(report_images=1, backbone='resnet18'), "
            f"out, {title!a}, 'none', 'cpu', []); "
            f"results.atomic_save(results.csv_text([[{name!a}, '0.5']]), out / 'predictions.csv')")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(Path(results.__file__).parent)}  # ascii above: the C locale's argv
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "report.html").read_bytes().decode("utf-8")
    assert "<meta charset='utf-8'>" in page and f"<title>Patch AE: {title}, resnet18" in page
    assert (tmp_path / "predictions.csv").read_bytes().decode("utf-8") == f"{name},0.5\n"
