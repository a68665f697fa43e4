"""Tests for report.py: the page's text, the gallery rule and the pictures, on made-up numbers
(no model, no torch). Run: pytest -q test_report.py"""
import report


def test_change_is_the_difference_of_the_shown_values():
    # unrounded: 87.44 - 87.66 = -0.22 -> '-0.2', beside 87.4 and 87.7 that differ by 0.3
    assert report.change(0.8744, 0.8766) == "-0.3"
    assert report.change(0.8766, 0.8744) == "+0.3"
    assert report.change(0.87449, 0.87351) == "+0.0"  # both shown as 87.4
    assert report.change(None, 0.5) == report.change(0.5, float("nan")) == "n/a"
    header, cells, _ = report.table_cells([{
        "category": "bottle", "selected_epochs": "10", "protocol": "p", "image_auroc": 0.8744,
        "image_auroc_std": None, "untrained_image_auroc": 0.8766, "pixel_auroc": None,
        "pixel_aupro": None, "train_seconds": 1.0, "ms_per_image": 1.0}], [], "")
    assert cells[0][header.index("image AUROC")] == "87.4 (87.7, -0.3)"
    sentence = report.training_sentence(10, [("image AUROC", 0.8766, 0.8744)])
    assert sentence == "Training changed image AUROC by -0.3 points (87.7 to 87.4)."
