"""bench.py: inference time and memory footprint of Patch AE against a PatchCore baseline.

The paper's practical claim is that Patch AE is lighter than PatchCore at equal or better accuracy.
This runs both on the same images and device and prints one markdown table: quality (image
AUROC, pixel AUROC, AUPRO; both methods' maps from the L2 distance to the nearest bank row), fit
cost, inference per image split into feature extraction / kNN search / anomaly map (median over
timed passes after warm-up), memory bank, parameters and peak memory; then the kNN step's GFLOP/s
beside torch.mm on the same shapes. Everything else (data, training, coreset, kNN, maps, metrics)
is imported from patch_ae.py; only the timing between its steps is bench's own.

Quick CPU run (offline, random-init resnet18 on the generated category, well under a minute):
    python bench.py --synthetic --backbone resnet18 --baseline-backbone resnet18 --weights none \
        --image-size 64 --crop-size 64 --epochs 1 --repeats 3
Full comparison (MVTec AD and ImageNet weights; a GPU is advised):
    python bench.py --data-root /path/to/mvtec_anomaly_detection --category screw --json bench.json
Bank-size sweep on synthetic features (no images needed):
    python bench.py --scaling --bank-rows 10000 50000 200000 1000000
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import io
import json
import os
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from deploy import DeployConfig, layout_for
from patch_ae import (BACKBONES, IMAGENET_MEAN, IMAGENET_STD, KNN_BLOCK_MB, Backbone,
                      BackboneInput, Category, Encoder, HelpFormatter, Parser, UsageError,
                      add_config_flags, anomaly_maps, atomic_save, build_memory_bank, clock,
                      compute_metrics, extract_features, fit, flatten_patches, fmt,
                      greedy_coreset, image_scores, knn_scores, load_backbone, load_category,
                      make_config, make_synthetic_category, patch_scores, pick_device,
                      seed_everything, torchvision_classifier)

MB = 2**20
# The torch.mm reference writes a (Q, M) output; past this size it runs on the bank's first rows.
MM_REFERENCE_MAX_BYTES = 4 * 2**30

# ----------------------------------------------------------------------------------------------
# PatchCore baseline (Roth et al. 2022, as in amazon-science/patchcore-inspection)
# ----------------------------------------------------------------------------------------------
# Each backbone is tapped where the Patch AE encoder taps it: after the paper's conv3 (stride 8) and
# conv4 (stride 16), as patch_ae.load_backbone cuts it. densenet201 (the ensemble's third member)
# is cut here at the same strides: the outputs of denseblock2 (512 ch, H/8) and denseblock3
# (1792 ch, H/16), the blocks the official multi-model PatchCore taps.
BASELINE_BACKBONES = (*BACKBONES, "resnext101_32x8d", "densenet201")
# The paper's multi-model PatchCore, with the official IM224_Ensemble settings: each layer pooled to
# 1024, then to 384 together, and a 1% coreset (single model: 1024 -> 1024, 10%).
ENSEMBLE = ("wide_resnet101_2", "resnext101_32x8d", "densenet201")
ENSEMBLE_DIM, ENSEMBLE_CORESET = 384, 0.01


def baseline_backbone(name: str, weights: str) -> Backbone:
    """patch_ae.load_backbone, and densenet201 cut at the same strides: features[:6] (conv0 to
    transition1), denseblock2 (stride 8), transition2 + denseblock3 (stride 16)."""
    if name != "densenet201":
        return load_backbone(name, weights)
    f = torchvision_classifier(name, weights).features
    return Backbone(f[:6], f[6:7], f[7:9], IMAGENET_MEAN, IMAGENET_STD)


class PatchCoreFeatures(BackboneInput):
    """(B, 3, H, W) -> (B, target_dim, H/8, W/8): PatchCore's locally aware patch features. Each
    tapped map is aggregated over a 3x3 neighbourhood, brought to the first tap's grid, each
    position's vector reduced to `dim` by adaptive average pooling (the official MeanMapper), then
    the taps reduced to `target_dim` together (the official Aggregator)."""

    def __init__(self, backbone: str, weights: str, dim: int = 1024, target_dim: int = 1024,
                 patch: int = 3):
        super().__init__()
        b = baseline_backbone(backbone, weights)  # what follows conv4 is left out, as in Patch AE
        self.stem, self.conv3, self.conv4 = b.stem, b.conv3, b.conv4
        self.use_input_scaling(b)
        self.dim, self.target_dim, self.patch = dim, target_dim, patch
        self.to(memory_format=torch.channels_last)  # as the Patch AE encoder: alike for timing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x3 = self.conv3(self.stem(x))
        maps = [x3, self.conv4(x3)]                   # [(B, c1, H/8, W/8), (B, c2, H/16, W/16)]
        B, _, h, w = maps[0].shape
        reduced = []
        for f in maps:
            c, grid = f.shape[1], f.shape[-2:]
            # (B, C*9, h'*w'), channel-major (c, dy, dx) as the official unfold; stride 1, padding 1
            p = F.unfold(f, self.patch, padding=self.patch // 2).view(B, c * self.patch**2, *grid)
            if grid != (h, w):  # layer3 -> layer2's grid, each of the C*9 channels bilinearly
                # channels-last: the same values, ~8x faster on CPU with 9216 channels, and the
                # permute below is free
                p = p.contiguous(memory_format=torch.channels_last)
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            p = p.permute(0, 2, 3, 1).reshape(B * h * w, 1, -1)     # (B*h*w, 1, C*9)
            reduced.append(F.adaptive_avg_pool1d(p, self.dim))      # (B*h*w, 1, dim)
        # (B*h*w, 1, taps*dim) -> (B*h*w, 1, target_dim)
        z = F.adaptive_avg_pool1d(torch.cat(reduced, 2), self.target_dim)
        return z.view(B, h, w, self.target_dim).permute(0, 3, 1, 2)        # (B, target_dim, h, w)


# ----------------------------------------------------------------------------------------------
# Memory meters (times come from patch_ae.clock)
# ----------------------------------------------------------------------------------------------
class MemoryMeter:
    """Peak memory of one phase. CUDA: torch.cuda.max_memory_allocated (tensors only). CPU on Linux:
    the process's peak RSS (VmHWM), reset to the current RSS at the start of each phase by writing 5
    to /proc/self/clear_refs. Elsewhere getrusage's ru_maxrss: the lifetime peak, never reset."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = device.type == "cuda" or self._clear_refs()
        self.kind = ("CUDA max_memory_allocated, reset per phase" if device.type == "cuda" else
                     "process peak RSS (VmHWM), reset per phase" if self.resettable else
                     "process lifetime peak RSS (ru_maxrss), not reset per phase")

    @staticmethod
    def _clear_refs() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_mb(key: str) -> float | None:  # a line of /proc/self/status, kB -> MB
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        return None

    def start(self) -> float | None:
        """Begins a phase; returns the memory in use now, MB (None where it cannot be read)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / MB
        # hand freed heap back to the OS, else a phase reusing freed memory shows no growth
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)  # glibc only
        if self.resettable:
            self._clear_refs()
        return self._status_mb("VmRSS")

    def peak(self) -> float:
        """Peak since start(), MB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MB
        if self.resettable:
            return self._status_mb("VmHWM")
        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return lifetime / (MB if sys.platform == "darwin" else 1024)

    def phase(self, name: str, start: float | None) -> dict:
        """Peak of the phase begun by start(), and how far it rose above the memory in use then."""
        peak = self.peak()
        added = peak - start if start is not None and self.resettable else None
        return {f"peak_{name}_mb": peak, f"added_{name}_mb": added}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ----------------------------------------------------------------------------------------------
# kNN throughput: patch_ae.knn_scores beside torch.mm on the same shapes
# ----------------------------------------------------------------------------------------------
def knn_bench(queries: torch.Tensor, bank: torch.Tensor, args, meter: MemoryMeter) -> list[dict]:
    """(Q, D) x (M, D): knn_scores and torch.mm, interleaved within each repeat so that load from
    other processes hits both alike. GFLOP/s counts the distance GEMM, 2*Q*M*D."""
    device, (Q, D), M = queries.device, queries.shape, len(bank)
    ref_rows = max(1, min(M, MM_REFERENCE_MAX_BYTES // (4 * Q)))
    ref_out = torch.empty(Q, ref_rows, device=device)  # preallocated: torch.mm's pure compute speed
    times, working = {"torch.mm": [], "knn_scores": []}, 0.0
    for rep in range(args.warmup + args.repeats):
        t0 = clock(device)
        torch.mm(queries, bank[:ref_rows].T, out=ref_out)
        t1 = clock(device)
        before = meter.start()
        t2 = clock(device)
        knn_scores(queries, bank, block_mb=args.knn_memory_mb)
        t3 = clock(device)
        if rep >= args.warmup:
            times["torch.mm"].append(t1 - t0)
            times["knn_scores"].append(t3 - t2)
            if before is not None:  # what the scorer adds on top of queries and bank
                working = max(working, meter.peak() - before)
    del ref_out
    mm_gflops = 2 * Q * ref_rows * D / statistics.median(times["torch.mm"]) / 1e9
    t = spread([seconds * 1000 for seconds in times["knn_scores"]])
    gflops = 2 * Q * M * D / (t["median"] / 1000) / 1e9
    return [{"queries": Q, "dims": D, "bank_rows": M, "bank_mb": M * D * 4 / MB, "ms": t["median"],
             "ms_min": t["min"], "ms_max": t["max"], "gflops": gflops, "mm_gflops": mm_gflops,
             "mm_reference_rows": ref_rows, "ratio_to_mm": gflops / mm_gflops,
             "working_mb": working if meter.resettable else None, "budget_mb": args.knn_memory_mb}]


# ----------------------------------------------------------------------------------------------
# One method: fit, then timed inference passes split into stages
# ----------------------------------------------------------------------------------------------
def normalise01(v):
    return (v - v.min()) / max(float(v.max() - v.min()), 1e-12)


def timed_pass(method: dict, images: torch.Tensor, args,
               device: torch.device) -> tuple[dict, np.ndarray, torch.Tensor]:
    """One pass over `images` per member (extractor, bank) of `method`: the steps of
    patch_ae.score_images, timed apart. Returns seconds per stage (features, kNN with the image
    score, map), image scores (N,) and anomaly maps (N, S, S). An ensemble's members are min-max
    normalised over the images and averaged, as the official multi-model PatchCore does."""
    seconds, all_scores, all_maps = {"features": 0.0, "knn": 0.0, "map": 0.0}, [], []
    for extractor, bank in method["members"]:
        scores, maps = [], []
        for batch in images.split(args.batch_size):
            t0 = clock(device)
            r = extract_features(extractor, batch, args.batch_size, device, desc="")
            t1 = clock(device)
            patch, idx, q = patch_scores(r, bank, args.knn_memory_mb)    # (B, h, w)
            scores.append(image_scores(patch.flatten(1), idx, q, bank, method["image_score"]))
            t2 = clock(device)
            maps.append(anomaly_maps(patch, images.shape[-1]).cpu())
            t3 = clock(device)
            for stage, t in (("features", t1 - t0), ("knn", t2 - t1), ("map", t3 - t2)):
                seconds[stage] += t
        all_scores.append(torch.cat(scores).cpu().numpy())
        all_maps.append(torch.cat(maps))
    if len(all_scores) == 1:
        return seconds, all_scores[0], all_maps[0]
    return (seconds, np.mean([normalise01(s) for s in all_scores], 0),
            torch.stack([normalise01(m) for m in all_maps]).mean(0))


def fit_patch_ae(data: Category, args, device: torch.device, meter: MemoryMeter) -> dict:
    start = meter.start()
    model = fit(args.patch_ae, data.train, args.seed, device, baselines=False)  # no validation
    fit_info = {"fit_s": model["train_seconds"], "bank_s": model["bank_seconds"],
                "n_train": model["n_train"], "coreset_ratio": args.coreset_ratio,
                **meter.phase("fit", start)}
    return {"name": "Patch AE", "backbones": [args.backbone],
            "members": [(model["encoder"], model["bank"])],
            "image_score": args.patch_ae.image_score, "fit": fit_info}


def fit_patchcore(data: Category, args, device: torch.device, meter: MemoryMeter) -> dict:
    backbones = list(ENSEMBLE) if args.baseline == "ensemble" else [args.baseline_backbone]
    members, extract_s, coreset_s = [], 0.0, 0.0
    start = meter.start()
    for name in backbones:
        seed_everything(args.seed)
        extractor = PatchCoreFeatures(name, args.weights, target_dim=args.baseline_dim)
        extractor = extractor.to(device).eval()
        t0 = clock(device)
        feats = extract_features(extractor, data.train, args.batch_size, device,
                                 f"PatchCore {name}")
        t1 = clock(device)
        bank = build_memory_bank(feats, args.baseline_coreset_ratio, args.seed)   # (M, target_dim)
        t2 = clock(device)
        del feats
        members.append((extractor, bank))
        extract_s, coreset_s = extract_s + t1 - t0, coreset_s + t2 - t1
        print(f"PatchCore {name}: memory bank {tuple(bank.shape)}, {t2 - t0:.1f}s", flush=True)
    fit_info = {"fit_s": extract_s + coreset_s, "extract_s": extract_s, "coreset_s": coreset_s,
                "n_train": len(data.train), "coreset_ratio": args.baseline_coreset_ratio,
                **meter.phase("fit", start)}
    name = "PatchCore ensemble" if args.baseline == "ensemble" else "PatchCore"
    # the image score is the max of the patch scores. Both methods' patch scores are L2 distances
    # (the PatchCore paper's Eq. 6), so their maps compare like for like; the official code
    # squares them (FAISS IndexFlatL2), which ranks the images the same but blurs other maps.
    return {"name": name, "backbones": backbones, "members": members, "image_score": "max",
            "fit": fit_info}


def bench_methods(methods: list[dict], data: Category, args, device: torch.device,
                  meter: MemoryMeter) -> tuple[list[dict], list[dict]]:
    """Timed passes, quality and footprint of each method; then the kNN throughput on one test
    batch. The methods take turns pass by pass, so a busy machine slows them alike."""
    n = len(data.test)
    stages = [{"features": [], "knn": [], "map": [], "total": []} for _ in methods]
    memory = [{} for _ in methods]
    outputs = [None for _ in methods]
    # extract_features reports progress on every call: one line per batch would bury the tables
    with contextlib.redirect_stdout(io.StringIO()):
        for rep in range(args.warmup + args.repeats):
            for m, method in enumerate(methods):
                start = meter.start()
                seconds, scores, maps = timed_pass(method, data.test, args, device)
                if rep < args.warmup:
                    continue
                phase = meter.phase("infer", start)
                memory[m] = {k: max(v, memory[m].get(k, v)) for k, v in phase.items()
                             if v is not None}
                for k, v in seconds.items():
                    stages[m][k].append(v / n * 1000)                    # ms per image
                stages[m]["total"].append(sum(seconds.values()) / n * 1000)
                outputs[m] = scores, maps
    rows, knn = [], []
    for method, st, mem, (scores, maps) in zip(methods, stages, memory, outputs):
        banks = [bank for _, bank in method["members"]]
        params = [p for extractor, _ in method["members"] for p in extractor.parameters()]
        total = spread(st["total"])
        rows.append({
            "method": method["name"], "backbone": " + ".join(method["backbones"]),
            **compute_metrics(data.labels, scores, data.masks, maps), **method["fit"],
            "n_test": n, "batch_size": args.batch_size,
            **{f"{k}_ms": statistics.median(v) for k, v in st.items()},
            "total_ms_min": total["min"], "total_ms_max": total["max"], "passes_ms": st,
            "images_per_s": 1000 / total["median"],
            "bank_rows": sum(len(b) for b in banks), "bank_dims": banks[0].shape[1],
            "bank_mb": sum(b.numel() * b.element_size() for b in banks) / MB,
            "params_m": sum(p.numel() for p in params) / 1e6,
            "params_mb": sum(p.numel() * p.element_size() for p in params) / MB,
            "peak_infer_mb": mem.get("peak_infer_mb"),
            "added_infer_mb": mem.get("added_infer_mb")})
        extractor, bank = method["members"][0]
        r = extract_features(extractor, data.test[:args.batch_size], args.batch_size, device, "")
        q = flatten_patches(r)                                          # one batch's patches
        knn += [{"method": method["name"], "backbone": method["backbones"][0], **k}
                for k in knn_bench(q, bank, args, meter)]
    return rows, knn


def evenly(n: int, total: int) -> np.ndarray:
    """`n` indices spread over range(total) (all when n is 0): a subset keeps every test folder."""
    if n == 0 or n >= total:
        return np.arange(total)
    return np.linspace(0, total - 1, n).round().astype(int)


def load_data(args) -> Category:
    root = Path(args.data_root)
    if args.synthetic:
        make_synthetic_category(root)
    data = load_category(root, args.category, args.image_size, args.crop_size,
                         layout_for(args.dataset))
    keep = evenly(args.max_test, len(data.test))
    return dataclasses.replace(
        data, train=data.train[:args.max_train or None], test=data.test[keep],
        labels=data.labels[keep], masks=None if data.masks is None else data.masks[keep],
        test_paths=[data.test_paths[i] for i in keep])


# ----------------------------------------------------------------------------------------------
# Scaling: kNN time and working memory against the bank size, and the coreset's time
# ----------------------------------------------------------------------------------------------
def scaling(args, device: torch.device, meter: MemoryMeter) -> dict:
    """knn_bench for --scaling-images images' patches against each bank size in --bank-rows,
    then one timed coreset."""
    with torch.device("meta"):  # c3 of --backbone from the real Encoder, without its weights
        dims = Encoder(load_backbone(args.backbone, "none"), args.feat_dim).feat_dim
    n_queries = args.scaling_images * (args.crop_size // Encoder.stride) ** 2  # their patches
    g = torch.Generator().manual_seed(args.seed)
    queries = torch.randn(n_queries, dims, generator=g).to(device)               # (Q, D)
    rows = []
    for n in args.bank_rows:
        bank = torch.randn(n, dims, generator=g).to(device)          # (M, D): random, for timing
        print(f"scaling: {n} x {dims} bank", flush=True)
        rows += knn_bench(queries, bank, args, meter)
        del bank
    coreset = None
    if args.coreset_rows:
        feats = torch.randn(args.coreset_rows, dims, generator=g).to(device)
        n_keep = int(args.coreset_rows * args.coreset_ratio)
        t0 = clock(device)
        greedy_coreset(feats, n_keep, seed=args.seed)
        coreset = {"rows": args.coreset_rows, "dims": dims, "selected": n_keep,
                   "seconds": clock(device) - t0}
    return {"scaling": rows, "coreset": coreset}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def markdown(rows: list[dict], columns: list[tuple[str, Callable[[dict], object]]]) -> str:
    lines = ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def num(key: str, digits: int = 1, scale: float = 1):
    return lambda r: fmt(r[key], digits, scale)


def peak_cell(r: dict, phase: str) -> str:
    added = r[f"added_{phase}_mb"]
    return fmt(r[f"peak_{phase}_mb"], 0, 1) + ("" if added is None else f" (+{added:.0f})")


def total_cell(r: dict) -> str:
    return f"{r['total_ms']:.2f} ({r['total_ms_min']:.2f}-{r['total_ms_max']:.2f})"


def first(key: str):
    return lambda r: r[key]


METHOD_COLUMNS = [
    ("method", first("method")), ("backbone", first("backbone")),
    ("image AUROC %", num("image_auroc", 1, 100)), ("pixel AUROC %", num("pixel_auroc", 1, 100)),
    ("AUPRO@30% %", num("pixel_aupro", 1, 100)), ("fit s", num("fit_s")),
    ("features ms/img", num("features_ms", 2)), ("kNN ms/img", num("knn_ms", 2)),
    ("map ms/img", num("map_ms", 2)), ("total ms/img (min-max)", total_cell),
    ("img/s", num("images_per_s")),
    ("bank rows x dims", lambda r: f"{r['bank_rows']} x {r['bank_dims']}"),
    ("bank MB", num("bank_mb", 2)), ("params M", num("params_m", 2)),
    ("params MB", num("params_mb")), ("peak fit MB (+added)", lambda r: peak_cell(r, "fit")),
    ("peak infer MB (+added)", lambda r: peak_cell(r, "infer")),
]
KNN_COLUMNS = [
    ("queries x dims", lambda r: f"{r['queries']} x {r['dims']}"),
    ("bank rows", first("bank_rows")),
    ("bank MB", num("bank_mb", 2)),
    ("ms (min-max)", lambda r: f"{r['ms']:.2f} ({r['ms_min']:.2f}-{r['ms_max']:.2f})"),
    ("GFLOP/s", num("gflops")), ("torch.mm GFLOP/s", num("mm_gflops")),
    ("ratio to mm", num("ratio_to_mm", 2)), ("working MB", num("working_mb")),
    ("budget MB", first("budget_mb")),
]


def header(args, device: torch.device, meter: MemoryMeter, argv: list[str]) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")]
        name = (f"{models[0] if models else 'CPU'}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch threads")
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "peak_memory": meter.kind, "argv": argv,
            "weights": "n/a (random features)" if args.scaling else args.weights}


def cpu_seconds() -> tuple[float, float, float] | None:
    """(wall time, busy CPU seconds of the whole machine, CPU seconds of this process); None off
    Linux. Another busy process slows every figure here."""
    try:
        first_line = Path("/proc/stat").read_text().split("\n", 1)[0]
        jiffies = [int(v) for v in first_line.split()[1:]]
    except (OSError, ValueError):
        return None
    busy = (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")  # not idle, iowait
    return time.perf_counter(), busy, sum(os.times()[:2])  # this process: user + system


def other_cpu_share(start: tuple | None) -> float | None:
    """Fraction of all CPUs that other processes kept busy since `start`."""
    end = cpu_seconds()
    if start is None or end is None:
        return None
    wall, busy, own = (e - s for e, s in zip(end, start))
    return max(0.0, busy - own) / (wall * (os.cpu_count() or 1))


def header_line(h: dict) -> str:
    others = h.get("other_cpu_share")
    busy = "" if others is None else f", other processes used {others:.0%} of the CPUs meanwhile"
    return (f"device {h['device']} ({h['device_name']}), torch {h['torch']}, torchvision "
            f"{h['torchvision']}, {h['date']}{busy}, weights {h['weights']}, peak memory = "
            f"{h['peak_memory']}")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
# patch_ae.Config fields that bench.py does not take: one seed (bench's own --seed, which also
# seeds the baseline and the random features); bench writes only its tables and --json. Patch AE
# trains on every train/good image and keeps the last epoch, the paper's protocol, as PatchCore
# uses every image (deploy.py's held-out images are not bench's).
NOT_IN_BENCH = ("seed", "out", "overwrite", "save_maps", "report_images")
# deploy.DeployConfig's own fields but --dataset, which bench.py takes from it
DEPLOY_ONLY = ("holdout", "select", "save", "load", "predict")


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """Every patch_ae.Config flag but NOT_IN_BENCH (a field added to Config appears here by
    itself), then bench's own. Abbreviations are refused. With suppress_defaults only given flags
    appear."""
    p = Parser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
               allow_abbrev=False,
               argument_default=argparse.SUPPRESS if suppress_defaults else None)
    flags = p.add_argument_group("Patch AE and data: patch_ae.py's flags (the data flags, "
                                 "--weights, --batch-size and --device serve the baseline too)")
    add_config_flags(p, DeployConfig, suppress_defaults, exclude=NOT_IN_BENCH + DEPLOY_ONLY,
                     group=flags)
    b = p.add_argument_group("PatchCore baseline and benchmark")
    b.add_argument("--baseline", type=str, default="single", choices=("single", "ensemble"),
                   help=f"PatchCore on --baseline-backbone, or the multi-model one: "
                        f"{' + '.join(ENSEMBLE)}")
    b.add_argument("--baseline-backbone", type=str, default=None, choices=BASELINE_BACKBONES,
                   help="PatchCore backbone with --baseline single (default: wide_resnet50_2)")
    b.add_argument("--baseline-dim", type=int, default=None,
                   help=f"PatchCore's final feature size (default: 1024 single, {ENSEMBLE_DIM} "
                        f"ensemble, as published)")
    b.add_argument("--baseline-coreset-ratio", type=float, default=None,
                   help=f"PatchCore's coreset fraction (default: --coreset-ratio single, "
                        f"{ENSEMBLE_CORESET} ensemble)")
    b.add_argument("--knn-memory-mb", type=int, default=0,
                   help=f"memory of one kNN distance block, MB (default: 0 = patch_ae's "
                        f"KNN_BLOCK_MB, {KNN_BLOCK_MB})")
    b.add_argument("--max-train", type=int, default=0,
                   help="use the first N train/good images; 0 = all")
    b.add_argument("--max-test", type=int, default=0,
                   help="use N test images spread over all folders; 0 = all")
    b.add_argument("--warmup", type=int, default=1, help="untimed passes before the timed ones")
    b.add_argument("--repeats", type=int, default=5,
                   help="timed passes; the table shows their median")
    b.add_argument("--scaling", action="store_true",
                   help="instead of the method comparison: kNN time and memory against "
                        "--bank-rows, and the coreset")
    b.add_argument("--bank-rows", type=int, nargs="+", default=[10_000, 50_000, 200_000, 1_000_000],
                   help="with --scaling: memory bank sizes (rows of --feat-dim random features)")
    b.add_argument("--scaling-images", type=int, default=1,
                   help="with --scaling: the queries are this many images' patches (16 = one "
                        "batch at the defaults)")
    b.add_argument("--coreset-rows", type=int, default=100_000,
                   help="with --scaling: time the greedy coreset of this many rows to "
                        "--coreset-ratio; 0 = skip")
    b.add_argument("--seed", type=int, default=0,
                   help="seed for training, coreset and synthetic features")
    b.add_argument("--json", type=str, default="", help="also write every figure to this JSON file")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    # Patch AE's settings, checked and resolved (--synthetic) by patch_ae itself
    args.patch_ae = make_config({**vars(args), "seed": [args.seed]}, given)
    args.category, args.data_root = args.patch_ae.category, args.patch_ae.data_root
    layout_for(args.dataset, args.synthetic)  # --synthetic writes MVTec AD's layout alone
    checks = [(args.weights in ("imagenet", "none"), f"--weights {args.weights}: bench.py loads "
               f"two different backbones; use 'imagenet' or 'none'"),
              (args.category != "all",
               "--category all: bench.py compares the methods on one category; name it"),
              (args.repeats >= 1, "--repeats must be >= 1"),
              (args.warmup >= 0, "--warmup must be >= 0"),
              (args.baseline_dim is None or args.baseline_dim >= 1, "--baseline-dim must be >= 1"),
              (args.baseline_coreset_ratio is None or 0 < args.baseline_coreset_ratio <= 1,
               "--baseline-coreset-ratio must be in (0, 1]"),
              (args.knn_memory_mb >= 0, "--knn-memory-mb must be >= 0 (0 = automatic)"),
              (args.max_train >= 0 and args.max_test >= 0,
               "--max-train and --max-test must be >= 0 (0 = all)"),
              (min(args.bank_rows) >= 1, "--bank-rows must all be >= 1"),
              (args.scaling_images >= 1, "--scaling-images must be >= 1"),
              (args.coreset_rows >= 0, "--coreset-rows must be >= 0 (0 = skip)"),
              (not (args.baseline == "ensemble" and args.baseline_backbone),
               "--baseline-backbone is for --baseline single; the ensemble is "
               + " + ".join(ENSEMBLE)),
              (not (args.json and Path(args.json).is_dir()),
               f"--json {args.json}: is a folder; give a file path")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    ensemble = args.baseline == "ensemble"
    args.baseline_backbone = args.baseline_backbone or "wide_resnet50_2"
    args.baseline_dim = args.baseline_dim or (ENSEMBLE_DIM if ensemble else 1024)
    default_ratio = ENSEMBLE_CORESET if ensemble else args.coreset_ratio
    args.baseline_coreset_ratio = args.baseline_coreset_ratio or default_ratio
    return args


def run(args, argv: list[str]) -> dict:
    device = pick_device(args.device)
    args.knn_memory_mb = args.knn_memory_mb or KNN_BLOCK_MB.get(device.type, 8)  # in use
    seed_everything(args.seed)
    meter = MemoryMeter(device)
    head, cpu_start = header(args, device, meter, argv), cpu_seconds()
    print(header_line(head), flush=True)
    if args.scaling:
        result = {"header": head, **scaling(args, device, meter)}
    else:
        data = load_data(args)
        print(f"{args.category}: {len(data.train)} train, {len(data.test)} test images", flush=True)
        methods = [fit_patch_ae(data, args, device, meter),
                   fit_patchcore(data, args, device, meter)]
        rows, knn = bench_methods(methods, data, args, device, meter)
        ae, pc = rows
        ratios = {"inference_time": ae["total_ms"] / pc["total_ms"],
                  "bank_mb": ae["bank_mb"] / pc["bank_mb"],
                  "params": ae["params_m"] / pc["params_m"]}
        result = {"header": head, "category": args.category, "methods": rows, "knn": knn,
                  "patch_ae_over_patchcore": ratios}
    head["other_cpu_share"] = other_cpu_share(cpu_start)
    print(f"\n{header_line(head)}\n")
    if args.scaling:
        print(f"kNN scaling: {result['scaling'][0]['queries']} query patches "
              f"({args.scaling_images} image(s)) against a random bank, {args.repeats} timed runs "
              f"after {args.warmup} warm-up\n")
        print(markdown(result["scaling"], KNN_COLUMNS))
        if result["coreset"]:
            c = result["coreset"]
            print(f"\ncoreset: {c['rows']} x {c['dims']} -> {c['selected']} rows in "
                  f"{c['seconds']:.2f} s")
    else:
        print(f"{args.category}: {ae['n_train']} train, {ae['n_test']} test images, crop "
              f"{args.crop_size}, batch {args.batch_size}, {args.repeats} timed passes after "
              f"{args.warmup} warm-up\n")
        print(markdown(rows, METHOD_COLUMNS))
        print("\nPatch AE / PatchCore: inference time x{inference_time:.2f}, memory bank MB "
              "x{bank_mb:.2f}, parameters x{params:.2f}".format(**ratios))
        print("\nkNN step on one batch of test patches: knn_scores beside torch.mm\n")
        columns = [("method", first("method")), ("backbone", first("backbone"))] + KNN_COLUMNS
        print(markdown(knn, columns))
    if args.json:
        atomic_save(json.dumps(result, indent=1), Path(args.json))
        print(f"JSON: {args.json}")
    return result


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(parse_args(argv), argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
