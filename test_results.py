"""Tests of results.py, what a run writes and shows beside the method: the decoder's
reconstruction and its PSNR. (results.json, results.csv, the pictures and the report are tested
end to end in test_patch_ae.py, test_deploy.py and test_report.py.) Run: pytest -q"""
import math

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
                                             ("efficientnet_lite0", [128, 128, 128])])  # 127.5
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
