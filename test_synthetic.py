"""Tests of patch_ae.py's offline category (its supporting section "The synthetic category"): its
MVTec AD layout, its masks, that it is made the same for a seed, and that two runs making it at
once both find it whole. Run: pytest -q"""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import patch_ae as pa
from patch_ae import UsageError


def test_synthetic_category_layout_and_determinism(synthetic_root, tmp_path):
    base = synthetic_root / "synthetic"
    assert len(list((base / "train" / "good").glob("*.png"))) == 60
    for kind in ("scratch", "blob", "stain"):
        images = sorted(p.stem for p in (base / "test" / kind).glob("*.png"))
        masks = sorted(p.stem[:-5] for p in (base / "ground_truth" / kind).glob("*_mask.png"))
        assert images == masks and len(images) == 8
        assert all(np.asarray(Image.open(p)).any()
                   for p in (base / "ground_truth" / kind).glob("*.png"))
    again = pa.make_synthetic_category(tmp_path)
    for rel in ("train/good/000.png", "test/blob/003.png", "ground_truth/stain/002_mask.png"):
        assert (again / rel).read_bytes() == (base / rel).read_bytes()


def test_a_run_that_makes_the_category_while_another_does_finds_it_whole(tmp_path, monkeypatch):
    """Another run makes the category while this one is drawing its defects: this run's own
    copy is dropped and the other's, made with the same settings, is used."""
    draw, other = pa.draw_defect, {}

    def draw_while_another_run_finishes(*args):
        if "started" not in other:  # once: the other run draws with the real function
            other["started"] = True
            monkeypatch.setattr(pa, "draw_defect", draw)
            other["base"] = pa.make_synthetic_category(tmp_path, size=32)
        return draw(*args)
    monkeypatch.setattr(pa, "draw_defect", draw_while_another_run_finishes)
    base = pa.make_synthetic_category(tmp_path, size=32)
    assert base == other["base"] == tmp_path / "synthetic"
    assert len(list((base / "test" / "blob").glob("*.png"))) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no temporary folder left


def test_a_folder_made_otherwise_is_refused_not_overwritten(tmp_path):
    mine = tmp_path / "synthetic" / "train" / "good" / "mine.png"
    mine.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mine)
    with pytest.raises(UsageError, match="exists but was not made by this version"):
        pa.make_synthetic_category(tmp_path)
    assert sorted(Path(tmp_path / "synthetic").rglob("*.png")) == [mine]
    pa.make_synthetic_category(tmp_path / "x", size=32)
    with pytest.raises(UsageError, match="exists but was not made by this version"):
        pa.make_synthetic_category(tmp_path / "x", size=32, seed=1)  # other settings
