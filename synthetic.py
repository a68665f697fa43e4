"""The synthetic category: an offline stand-in for an MVTec AD category, so that the quick start
and the tests run without a download. A woven texture with a random shift and tint; its test
defects are scratches, blobs and stains, shapes CutPaste never pastes, each with its mask, in
MVTec AD's layout (patch_ae.py --synthetic reads it as MVTec AD). deploy.py draws the same
defects on held-out normal images to validate on. Not part of the paper."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from cli import UsageError

DEFECT_KINDS = ("scratch", "blob", "stain")  # shapes CutPaste never pastes


def draw_defect(img: np.ndarray, kind: str,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float in [0, 1] -> (a copy with one defect, bool (H, W) mask). The synthetic
    category's test defects and the validation defects on held-out normal images (training):
    a thin straight scratch, an irregular blob of a foreign colour, or a soft stain."""
    size = max(img.shape[:2])
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32) / size
    cy, cx = rng.uniform(0.2, 0.8, 2)
    if kind == "scratch":  # bright or dark line, 2-4 px wide, a quarter to half the image long
        ang, length = rng.uniform(0, np.pi), rng.uniform(0.25, 0.5)
        width = rng.uniform(1.2, 2.2) / size
        t = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
        n = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
        mask = (np.abs(t) < length / 2) & (np.abs(n) < width)
        colour = rng.choice([0.05, 0.95])
    elif kind == "blob":  # filled ellipse with a wobbly edge, radius 4-9% of the image
        ry, rx = rng.uniform(0.04, 0.09, 2)
        wobble = 1 + 0.25 * np.sin(5 * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 6))
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < wobble
        colour = rng.uniform(0, 1, 3) * [0.4, 0.8, 1.0]
    elif kind == "stain":  # soft darkening (Gaussian, radius 6-12%), masked where it is noticeable
        r = rng.uniform(0.06, 0.12)
        soft = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        return img * (1 - 0.55 * soft[..., None]), soft > 0.3
    else:
        raise ValueError(f"unknown defect kind {kind!r}; one of {DEFECT_KINDS}")
    img = img.copy()
    img[mask] = colour
    return img, mask


def make_synthetic_category(root: Path, seed: int = 0, size: int = 128, n_train: int = 60,
                            n_test_good: int = 16, n_test_defect: int = 8) -> Path:
    """Writes root/synthetic in MVTec layout: a woven texture with random phase and tint; test
    defects are scratches, blobs and stains (shapes CutPaste never pastes), with masks.
    Deterministic for `seed`; an existing folder made by this function is reused. The files are
    written to a temporary folder that is then renamed, so two runs that start together both
    find a whole category."""
    base = root / "synthetic"
    counts = [n_train, n_test_good, n_test_defect]
    stamp = json.dumps({"seed": seed, "size": size, "counts": counts, "version": 1})
    if base.exists():
        return reuse(base, stamp)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def texture():  # an aligned weave (as MVTec objects are aligned): a small shift, tint, noise
        px, py = rng.normal(0, 0.3, 2)
        v = 0.5 + 0.18 * np.sin(2 * np.pi * 14 * xx + px) * np.sin(2 * np.pi * 9 * yy + py)
        v = v + 0.03 * rng.standard_normal((size, size))
        tint = np.array([0.85, 0.7, 0.5]) + rng.normal(0, 0.015, 3)
        return np.clip(v[..., None] * tint * 1.3, 0, 1)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic.", dir=root))  # one of its own per call

    def save(arr, path, mode="RGB"):
        path = tmp / path
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode).save(path)
    for i in range(n_train):
        save(texture(), Path("train", "good", f"{i:03d}.png"))
    for i in range(n_test_good):
        save(texture(), Path("test", "good", f"{i:03d}.png"))
    for kind in DEFECT_KINDS:
        for i in range(n_test_defect):
            img, mask = draw_defect(texture(), kind, rng)
            save(img, Path("test", kind, f"{i:03d}.png"))
            save(mask.astype(np.float32), Path("ground_truth", kind, f"{i:03d}_mask.png"), "L")
    (tmp / MARKER).write_text(stamp)
    try:
        tmp.rename(base)
    except OSError:  # another run renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
        return reuse(base, stamp)
    return base


MARKER = ".made_by_patch_ae"  # holds the settings the category was made with


def reuse(base: Path, stamp: str) -> Path:
    """An existing root/synthetic: reused when this function made it with the same settings."""
    marker = base / MARKER
    if marker.is_file() and marker.read_text() == stamp:
        return base
    raise UsageError(f"{base}: exists but was not made by this version of --synthetic; move "
                     f"it away or pass another --data-root")
