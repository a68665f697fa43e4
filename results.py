"""What a Patch AE run writes and shows, beside the method: where its files go, what it prints
first, results.json and results.csv (each written whole or not at all), the decoder's
reconstruction (the report's panel and its PSNR: the decoder never scores), the heatmap colours
and the pictures, and report.html's section of a run (report.py draws the HTML). patch_ae.py and
deploy.py call these; this file imports nothing from them. `cfg` is patch_ae.Config or
deploy.DeployConfig; `data` is patch_ae.Category."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import report
from cli import UsageError


# ----------------------------------------------------------------------------------------------
# Where the files go, and how they are written
# ----------------------------------------------------------------------------------------------
def output_folder(cfg) -> Path:
    """--out, else runs/<category>__<seed>__<time>; one that holds results is refused unless
    --overwrite, so nothing written before is lost."""
    out = Path(cfg.out or f"runs/{cfg.category}__{cfg.seed[0]}__{time.strftime('%Y%m%d-%H%M%S')}")
    results = ("results.json", "results.csv", "predictions.csv")
    if not cfg.overwrite and any((out / n).exists() for n in results):
        raise UsageError(f"--out {out}: already holds results; pick another --out or pass "
                         f"--overwrite")
    return out


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: an interrupted run leaves the old.
    Text is written as UTF-8 whatever the locale: file and category names may be in any
    language, and report.html declares that charset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(obj, str):
        tmp.write_text(obj, encoding="utf-8")
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# What a run prints and records
# ----------------------------------------------------------------------------------------------
def print_header(cfg, device: torch.device, weights: str) -> None:
    print(f"device {device}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"backbone {cfg.backbone}, weights {weights}", flush=True)
    if weights == "none":
        print("note: --weights none (random init): results are not comparable with the paper's")


def paper_protocol(cfg, n_train: int) -> str:
    """The protocol line: the paper's, and where the recipe is ours."""
    return (f"the paper's: all {n_train} train/good images train and fill the memory bank, the "
            f"last epoch kept; {recipe_words(cfg)}")


def recipe_words(cfg) -> str:
    layers = "frozen" if cfg.backbone_lr == 0 else f"at {cfg.backbone_lr:g} x the learning rate"
    return (f"the recipe ours, not the paper's 'end to end': the stem (all before conv3) frozen, "
            f"conv3 and conv4 {layers}, BatchNorm statistics frozen")


# What results.json keeps of a model beside the metrics; deploy.py fills the guard's part
# (threshold, heat_scale, validation_curve, val_every, validation_seconds), None without it.
RUN_FIELDS = ("threshold", "heat_scale", "n_train", "n_holdout", "protocol", "selected_epoch",
              "val_every", "validation_curve", "loss_by_epoch", "train_seconds", "bank_seconds",
              "validation_seconds")


def record(cfg, layout: str, category: str, seed: int, data, model: dict,
           result: dict, device: torch.device) -> dict:
    """What results.json keeps of one run: the metrics, RUN_FIELDS, the config, the versions."""
    theirs = {**report.published(layout, category), "source": report.PEER_AUROC[layout][0]}
    return {"dataset": layout, "category": category, "seed": seed, "backbone": cfg.backbone,
            "weights": model.get("weights", cfg.weights), **result,
            **{key: model.get(key) for key in RUN_FIELDS}, "n_test": len(data.test),
            "memory_bank_shape": list(model["bank"].shape), "config": dataclasses.asdict(cfg),
            "device": str(device), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "published_image_auroc": theirs}


def write_results(runs: list[dict], dataset: str, out: Path) -> tuple[list, list, list]:
    """Prints the table and writes results.json (every run's record) and results.csv (the table's
    rows). Returns the table's cells for the report."""
    rows = report.summarize(runs, dataset)
    source, peers = report.PEER_AUROC[dataset]
    table = report.table_cells(rows, list(peers), source)
    print(report.table_text(*table))
    results = runs[0] if len(runs) == 1 else {"runs": runs, "table": rows}
    atomic_save(json.dumps(results, indent=1), out / "results.json")
    keys = list(rows[0])
    lines = [keys] + [["" if r[k] is None else r[k] for k in keys] for r in rows]
    atomic_save(csv_text(lines), out / "results.csv")
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}")
    return table


# ----------------------------------------------------------------------------------------------
# The decoder's reconstruction: only the report shows it
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruct(encoder: nn.Module, decoder: nn.Module, images: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> the decoder's I_hat of each image as uint8 (N, 3, S, S): what the
    features describe, brought back from the backbone's input normalisation."""
    encoder.eval()
    recon = decoder.eval()(encoder(encoder.normalize(images.to(device).float() / 255))).float()
    recon = recon * encoder.std + encoder.mean                          # undo the normalisation
    return (recon.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def reconstruction_psnr(encoder: nn.Module, decoder: nn.Module, images: torch.Tensor,
                        batch_size: int, device: torch.device) -> float | None:
    """How well the decoder rebuilds uint8 (N, 3, S, S) images: PSNR in dB over all their pixels
    (peak 255). The paper's idea is that every patch, normal or not, is rebuilt well."""
    if not len(images):
        return None
    squared = sum(float((reconstruct(encoder, decoder, b, device).float() - b.float()).square()
                        .sum()) for b in images.split(batch_size))
    mse = squared / images.numel()
    return 10 * math.log10(255**2 / max(mse, 1e-12))


# ----------------------------------------------------------------------------------------------
# Heatmap colours, pictures, report.html
# ----------------------------------------------------------------------------------------------
HEAT_QUANTILE = 0.99  # the heatmap colours' middle: this quantile of normal images' map peaks


def heat_scale(normal_maps: torch.Tensor, source: str) -> dict:
    """The heatmap colours from normal images' maps (N, S, S): 'low', their lowest pixel, and
    'mid', the HEAT_QUANTILE quantile of each map's highest pixel. report.colorize puts
    'mid' at the middle of its colour map, so yellow to red is above what normal images reach."""
    peaks = normal_maps.flatten(1).amax(1).numpy()
    return {"low": float(normal_maps.min()), "mid": float(np.quantile(peaks, HEAT_QUANTILE)),
            "source": source, "quantile": HEAT_QUANTILE}


def own_scale(maps: torch.Tensor, source: str = "the test set's own range") -> dict:
    """The colours when no normal image anchors them: these maps' own range, red at the top."""
    low, high = float(maps.min()), float(maps.max())
    return {"low": low, "mid": (low + high) / 2, "source": source}


def colour_scale(model: dict, maps: torch.Tensor, labels: np.ndarray) -> dict:
    """The heatmap colours of a test set's pictures: the model's (from its held-out images, in
    deploy.py), else from the normal test images' maps, else the maps' own range."""
    if model.get("heat_scale") is not None:
        return model["heat_scale"]
    normal = maps[torch.from_numpy(labels == 0)]
    source = "the normal test images (the model has no held-out images)"
    return heat_scale(normal, source) if len(normal) else own_scale(maps)


def save_maps(n: int, model: dict, data, scored: dict, device: torch.device, out: Path) -> None:
    """--save-maps: the pictures of n test images spread over the test set, under out/maps/."""
    scores, thr = scored["scores"], model.get("threshold")
    for i in np.linspace(0, len(scores) - 1, min(n, len(scores))).round().astype(int):
        p, mask = data.test_paths[i], None if data.masks is None else data.masks[i]
        caption = report.picture_caption(float(scores[i]), thr, f"{p.parent.name}/{p.name}")
        save_heatmap(out / "maps" / f"{p.parent.name}_{p.stem}.png",
                     picture(model, data.test[i], scored["maps"][i], scored["scale"], device,
                             mask, caption=caption))


def picture(model: dict, image: torch.Tensor, amap: torch.Tensor, scale: dict,
            device: torch.device, mask: torch.Tensor | None = None,
            reconstruction: bool = True, caption: str | None = None) -> np.ndarray:
    """One picture as report.html and --save-maps show it: input | the decoder's reconstruction
    (when the model has its decoder; --predict's PNGs leave it out, to spare a second forward
    pass per image) | heatmap over the input | ground-truth mask (if any). With a caption (the
    PNG files), the panels' names, the caption and the colour scale are drawn in."""
    recon = None
    if reconstruction and model.get("decoder") is not None:
        recon = reconstruct(model["encoder"], model["decoder"], image[None], device)[0]
        recon = recon.permute(1, 2, 0).numpy()
    return report.panels(image.permute(1, 2, 0).numpy(), recon, amap.numpy(), scale,
                         None if mask is None else mask.numpy(), caption=caption,
                         recon_title=report.reconstruction_title(model.get("selected_epoch")))


def save_heatmap(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def report_run(r: dict, model: dict, data, scored: dict, n: int,
               device: torch.device) -> str:
    """report.html's section of one run: report.py gets plain values and, to draw a test image's
    picture, a function of its index."""
    def test_picture(i: int) -> np.ndarray:
        mask = None if data.masks is None else data.masks[i]
        return picture(model, data.test[i], scored["maps"][i], scored["scale"], device, mask)
    names = [f"{p.parent.name}/{p.name}" for p in data.test_paths]
    return report.run_section(r, data.labels, scored["scores"], scored["untrained_scores"], names,
                              scored["scale"], test_picture, n, masks=data.masks is not None,
                              reconstruction=model.get("decoder") is not None)


def write_report(cfg, out: Path, subject: str, weights: str, device: torch.device,
                 sections: list) -> None:
    """out/report.html (unless --report-images 0), written as every result file is."""
    if cfg.report_images:
        path = out / "report.html"
        atomic_save(report.page(f"Patch AE: {subject}, {cfg.backbone}, weights {weights}, "
                                f"{device}, {time.strftime('%Y-%m-%d %H:%M')}", sections), path)
        print(f"report: {path} ({report.size_text(path.stat().st_size)})", flush=True)
