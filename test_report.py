"""Tests for report.py: the page's text, the gallery rule and the pictures, on made-up numbers
(no model; a run's words from patch_ae.run_text). Run: pytest -q test_report.py"""
import base64
import html
import io
import re

import numpy as np
from PIL import Image, ImageFont

import patch_ae as pa
import report
from conftest import ReportParser


def galleries(labels, scores, threshold, n=10) -> dict:
    """report.galleries of images img0, img1, ... -> {heading: the image names in its captions,
    in order}."""
    names = [f"img{i}" for i in range(len(scores))]
    pixels = np.zeros((4, 4, 3), np.uint8)
    return ReportParser(report.galleries(np.array(labels), np.array(scores), threshold, names,
                                         lambda i: pixels, n)).galleries


def test_an_image_scoring_exactly_the_threshold_is_flagged():
    assert report.flagged(0.5, 0.5) and not report.flagged(0.4999, 0.5)
    assert list(report.flagged(np.array([0.4, 0.5, 0.6]), 0.5)) == [False, True, True]
    assert report.verdict(0.5, 0.5) == "flagged" and report.verdict(0.49, 0.5) == "normal"
    assert report.verdict(0.5, None) == "no threshold"


def test_galleries_at_the_threshold_a_normal_image_is_a_false_alarm_and_a_defect_no_miss():
    # img0: a normal image exactly at the threshold, a false alarm; img2: a defect exactly at it,
    # flagged, so not a miss; img3: a defect below it, the one miss
    shown = galleries([0, 0, 1, 1], [0.5, 0.1, 0.5, 0.2], 0.5)
    assert shown["False alarms: normal images at or above the threshold (1)"] == ["img0"]
    assert shown["Misses: defective images below the threshold (1)"] == ["img3"]
    # every defect at or above it: no misses, and the heading says so
    shown = galleries([0, 1, 1], [0.1, 0.5, 0.9], 0.5)
    assert "Lowest-scoring defective images: none below the threshold" in shown


def test_galleries_name_false_alarms_and_misses_only_by_the_threshold():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.5, 0.9, 0.3, 0.6, 0.95])
    names = [f"img{i}" for i in range(6)]
    # normal img2 (0.9) at or above the threshold; defect img3 (0.3) below it
    some = galleries(labels, scores, 0.55)
    assert some["False alarms: normal images at or above the threshold (1)"] == ["img2"]
    assert some["Misses: defective images below the threshold (1)"] == ["img3"]
    for threshold in np.linspace(0, 1, 21):  # whatever the threshold, the rule holds
        for heading, shown in galleries(labels, scores, threshold).items():
            if heading.startswith("False alarms"):
                assert all(labels[names.index(n)] == 0 and scores[names.index(n)] >= threshold
                           for n in shown)
            if heading.startswith("Misses"):
                assert all(labels[names.index(n)] == 1 and scores[names.index(n)] < threshold
                           for n in shown)
    none = galleries(labels, scores, 0.25)  # every normal image but one below, no defect below
    assert none["Lowest-scoring defective images: none below the threshold"] == ["img3", "img4",
                                                                                 "img5"]
    assert none["False alarms: normal images at or above the threshold (2)"] == ["img2", "img1"]
    high = galleries(labels, scores, 0.99)
    assert high["Highest-scoring normal images: none at or above the threshold"] == ["img2", "img1",
                                                                                     "img0"]


def test_misses_are_listed_lowest_score_first():
    labels = [1, 1, 1, 1, 0, 1]
    scores = [0.4, 0.1, 0.3, 0.9, 0.2, 0.1]
    shown = galleries(labels, scores, 0.5)
    assert shown["Misses: defective images below the threshold (4)"] == ["img1", "img5", "img2",
                                                                         "img0"]
    assert galleries(labels, scores, 0.5, n=2)["Misses: defective images below the threshold "
                                               "(4)"] == ["img1", "img5"]  # the lowest two
    no_threshold = galleries(labels, scores, None)
    assert no_threshold["Lowest-scoring defective images (no threshold, so no misses to name)"] \
        == ["img1", "img5", "img2", "img0", "img3"]


HELD_OUT = {"low": 0.1, "mid": 0.3, "source": "the held-out normal images", "quantile": 0.99}


def test_the_colour_bars_middle_is_named_for_what_it_is_not_the_threshold():
    for threshold in (True, False):
        bar = report.colour_bar(HELD_OUT, threshold)
        assert "middle: the maps of 99% of the held-out normal images peak below this value" in bar
        assert "level on the maps" not in bar
        said = re.findall(r"<text[^>]*>([^<]*)</text>", bar)
        assert said[:3] == ["0.1", "0.3", "0.5"]  # low, mid, and 2 mid - low at the red end
        # the only sentence with the word threshold says the colours are not on its scale
        assert [t for t in said if "threshold" in t] == (
            ["the threshold applies to image scores, not to these colours"] if threshold else [])


def test_the_colour_bar_names_the_scales_source_and_nothing_else():
    bar = report.colour_bar({"low": 0.0, "mid": 2.0, "source": "the test set's own range"}, False)
    assert "middle: halfway up the test set&#x27;s own range" in bar
    assert "map&#x27;s own" not in bar and "quantile" not in bar


def test_a_page_with_several_colour_bars_repeats_no_id():
    sections = [report.colour_bar(HELD_OUT, True), report.colour_bar(HELD_OUT, False)]
    ids = re.findall(r"""\bid=["']([^"']*)""", report.page("two runs", sections))
    assert len(ids) == len(set(ids))
    uri = re.search(r'href="data:image/png;base64,([^"]*)"', sections[0]).group(1)
    ramp = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))))
    assert np.array_equal(ramp, report.ramp(600))  # the heatmaps' colours, exactly
    assert ramp[0, 0, 2] > 100 and ramp[0, 0, 0] == 0 and ramp[0, -1, 0] > 100  # blue to red


def test_sizes_read_in_the_unit_that_shows_them():
    assert report.size_text(800) == "800 bytes"
    assert report.size_text(40 * 1024) == "40 KB"
    assert report.size_text(999 * 1024) == "999 KB"
    assert report.size_text(1000 * 1024) == "1.0 MB"
    assert report.size_text(int(1.3 * 2**20)) == "1.3 MB"


def run_record(**changes) -> dict:
    """A run's record as run_section reads it (results.json's fields): a trained run, epoch 3
    kept, no threshold, its baselines scored (the raw features 0.05 below it, the encoder before
    training 0.1 below)."""
    metrics = {"image_auroc": 0.9, "pixel_auroc": 0.95, "pixel_aupro": 0.8}
    return {"category": "bottle", "seed": 0, "selected_epoch": 3, "threshold": None,
            "f1_at_threshold": None, "ms_per_image": 5.0, "validation_curve": [],
            "loss_by_epoch": [0.3, 0.2, 0.1], "untrained": {m: v - 0.1 for m, v in metrics.items()},
            "raw_features": {m: v - 0.05 for m, v in metrics.items()}, **metrics, **changes}


def run_page(r: dict, labels=(0, 0, 1, 1), reconstruction=True) -> str:
    """run_section's HTML for record r on four test images, as text."""
    labels, scores = np.array(labels), np.linspace(0.1, 0.4, len(labels))
    pixels = np.zeros((4, 8, 3), np.uint8)
    baselines = {"raw features": scores - 0.01, "encoder before training": scores - 0.02}
    section = report.run_section(r, pa.run_text(r), labels, scores, baselines,
                                 [f"img{i}" for i in range(len(labels))], HELD_OUT,
                                 lambda i: pixels, 2, masks=True, reconstruction=reconstruction)
    return html.unescape(re.sub(r"<[^>]+>", " ", section))


def test_a_trained_run_with_no_defined_metric_is_not_called_loaded():
    none = {"image_auroc": None, "pixel_auroc": None, "pixel_aupro": None}
    trained = run_page(run_record(**none, untrained=dict(none), raw_features=dict(none)),
                       labels=(0, 0, 0, 0))
    assert "loaded" not in trained
    assert "No metric is defined on this test set" in trained
    loaded = run_page(run_record(untrained=None, raw_features=None))
    assert "The baselines are scored only in runs that train (this model was loaded)." in loaded
    assert ("Training changed image AUROC by +10.0 points (80.0 to 90.0; +5.0 from the raw "
            "features' 85.0)") in run_page(run_record())


def test_with_epoch_0_kept_the_reconstruction_panel_is_named_the_decoder_before_training():
    untrained = run_page(run_record(selected_epoch=0))
    assert ("Each picture: input | decoder before training | anomaly map | ground truth."
            in untrained)
    assert "flat: epoch 0 was kept, so the decoder has had no training step" in untrained
    assert "paper's idea" not in untrained
    trained = run_page(run_record())
    assert "Each picture: input | reconstruction | anomaly map | ground truth." in trained
    assert "paper's idea" in trained and "decoder before training" not in trained
    no_decoder = run_page(run_record(selected_epoch=0), reconstruction=False)
    assert "Each picture: input | anomaly map | ground truth." in no_decoder
    assert "decoder" not in no_decoder.split("Each picture")[1]


def picture_parts(side=64, seed=0):
    """image, reconstruction (S, S, 3) uint8, anomaly map (S, S) and mask (S, S) of a test image."""
    rng = np.random.default_rng(seed)
    image, recon = rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    amap = rng.uniform(0, 1, (side, side))
    return image, recon, amap, amap > 0.9


def test_plain_panels_are_the_pictures_side_by_side():
    image, recon, amap, mask = picture_parts()
    pixels = report.panels(image, recon, amap, HELD_OUT, mask)
    assert pixels.shape == (64, 4 * 64, 3) and pixels.dtype == np.uint8
    heat = report.colorize(report.heat_position(amap, HELD_OUT))
    assert np.array_equal(pixels[:, :64], image) and np.array_equal(pixels[:, 64:128], recon)
    assert np.array_equal(pixels[:, 128:192], (0.5 * image + 0.5 * heat).astype(np.uint8))
    assert np.array_equal(pixels[:, 192:], np.repeat(mask[..., None] * np.uint8(255), 3, 2))
    assert report.panels(image, None, amap, HELD_OUT).shape == (64, 2 * 64, 3)


def test_a_captioned_picture_holds_the_panels_unchanged_between_its_strips():
    image, recon, amap, mask = picture_parts()
    plain = report.panels(image, recon, amap, HELD_OUT, mask)
    caption = report.picture_caption(0.7, 0.5, "broken/000.png")
    pixels = report.panels(image, recon, amap, HELD_OUT, mask, caption=caption)
    assert pixels.dtype == np.uint8 and pixels.shape[1:] == (4 * 64, 3)
    top = next(t for t in range(pixels.shape[0] - 64) if np.array_equal(pixels[t:t + 64], plain))
    titles, below = pixels[:top], pixels[top + 64:]
    assert 10 <= top and len(below) > 3 * top  # the caption, the ramp, its values, its middle
    for k in range(4):  # a name over each panel: dark text on white
        assert titles[:, 64 * k:64 * (k + 1)].min() < 100
    # the ramp's two ends in the caption strip: colours that the text (grey) never has
    blue, red = report.ramp(2)[0]
    colours = set(map(tuple, below.reshape(-1, 3)))
    assert tuple(blue) in colours and tuple(red) in colours
    # the strips follow their arguments: another caption, another reconstruction title
    other = report.panels(image, recon, amap, HELD_OUT, mask,
                          caption=report.picture_caption(0.3, 0.5, "broken/000.png"))
    assert np.array_equal(other[:top], titles) and not np.array_equal(other[top + 64:], below)
    # at 224 px both names fit at the full size: only the reconstruction's name changes
    image, recon, amap, mask = picture_parts(224)
    named = [report.panels(image, recon, amap, HELD_OUT, mask, caption=caption, recon_title=title)
             for title in ("reconstruction", "decoder before training")]
    changed = np.any(named[0] != named[1], axis=(0, 2))  # (4 * 224,): which columns differ
    assert changed[224:448].any() and not changed[:224].any() and not changed[448:].any()


def test_captions_say_the_score_and_the_verdict_by_the_threshold_rule():
    assert report.picture_caption(0.5, 0.5, "a.png") == "a.png: flagged, score 0.5 >= threshold 0.5"
    assert report.picture_caption(0.49, 0.5) == "normal, score 0.49 < threshold 0.5"
    assert report.picture_caption(0.123456, None) == "score 0.1235, no threshold"
    assert report.reconstruction_title(0) == "decoder before training"
    assert report.reconstruction_title(5) == report.reconstruction_title(None) == "reconstruction"


def test_pictures_are_captioned_with_the_bitmap_font_of_older_pillow(monkeypatch):
    """Pillow before 10.1 has no sized default font: load_default() takes no size there."""
    bitmap = ImageFont.load_default_imagefont()
    monkeypatch.setattr(report.ImageFont, "load_default", lambda: bitmap)
    report.typeface.cache_clear()
    try:
        assert report.typeface(14) is bitmap
        image, recon, amap, mask = picture_parts()
        pixels = report.panels(image, recon, amap, HELD_OUT, mask,
                               caption=report.picture_caption(0.7, None, "a.png"))
        assert pixels.shape[0] > 64 and pixels.shape[1:] == (4 * 64, 3)
    finally:
        report.typeface.cache_clear()
