"""tools/recipe_study.py: the training recipe on pretrained features, over categories and seeds.

Runs patch_ae.py once per (variant, category, seed) and bench.py's PatchCore once per (category,
seed), each as its own process, `--jobs` at a time with one thread each, and keeps every
results.json under --out. Then, or with --table alone, prints one markdown table per metric:
mean +- std over the seeds of every variant, the untrained encoder, PatchCore and the decoder's
PSNR on normal test images. docs/training.md gives the commands and the tables.
    python tools/recipe_study.py --data-root /tmp/tex --categories brick grass gravel \
        --synthetic --out runs/study
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> flags beyond the common ones; "paper" is the default recipe (--lr 1e-3 since the study
# of 2026-12-03) and "lr-1e-4" the recipe it was chosen against. patch_ae.py runs each, but those
# that hold images out (deploy.py's flags) run with deploy.py.
VARIANTS = {
    "paper": [],
    "holdout-best": ["--holdout", "0.1", "--select", "best"],
    "backbone-lr-0": ["--backbone-lr", "0"],
    "backbone-lr-1": ["--backbone-lr", "1"],
    "lr-1e-4": ["--lr", "1e-4"],
    "alpha-1": ["--alpha", "1"],
    "epochs-20": ["--epochs", "20"],
    "feat-dim-100": ["--feat-dim", "100"],
}


def common(args) -> list[str]:
    return ["--backbone", args.backbone, "--weights", "imagenet", "--image-size",
            str(args.size), "--crop-size", str(args.size)]


def jobs(args) -> list[tuple[Path, list[str]]]:
    """(result file, command) for every run not yet done."""
    places = [(c, ["--data-root", args.data_root, "--category", c]) for c in args.categories]
    if args.synthetic:
        places.append(("synthetic", ["--synthetic", "--data-root", f"{args.out}/synthetic_data"]))
    todo = []
    for seed in args.seeds:
        for category, where in places:
            for name in args.variants:
                out = Path(args.out) / name / f"{category}__{seed}"
                script = "deploy.py" if "--holdout" in VARIANTS[name] else "patch_ae.py"
                cmd = [sys.executable, str(ROOT / script), *where, *common(args),
                       "--seed", str(seed), "--out", str(out), "--overwrite",
                       "--report-images", "0", *VARIANTS[name]]
                todo.append((out / "results.json", cmd))
            result = Path(args.out) / "patchcore" / f"{category}__{seed}.json"
            cmd = [sys.executable, str(ROOT / "bench.py"), *where, *common(args), "--seed",
                   str(seed), "--baseline-backbone", args.backbone, "--epochs", "0",
                   "--repeats", "1", "--warmup", "0", "--json", str(result)]
            todo.append((result, cmd))
    return [(path, cmd) for path, cmd in todo if not path.exists()]


def run_all(args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running = jobs(args), []
    print(f"{len(pending)} runs to make", flush=True)
    while pending or running:
        while pending and len(running) < args.jobs:
            path, cmd = pending.pop(0)
            path.parent.mkdir(parents=True, exist_ok=True)
            log = open(path.with_suffix(".log"), "w")
            running.append((path, subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))
        path, proc, log = running.pop(0)
        rc = proc.wait()
        log.close()
        print(f"{'ok' if rc == 0 else f'FAILED ({rc})'}: {path}", flush=True)


def mean_std(values: list, seeds: int) -> str:
    """mean +- std; fewer runs than seeds say how many they are."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    text = f"{values[0]:.1f}" if len(values) == 1 else (
        f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}")
    return text if len(values) == seeds else f"{text} ({len(values)} run{'s' * (len(values) > 1)})"


def table(args) -> str:
    """Markdown: one row per method, one column per category, each cell mean +- std (seeds)."""
    categories = [*args.categories, *(["synthetic"] if args.synthetic else [])]
    lines = []
    for metric, scale in (("image_auroc", 100), ("pixel_auroc", 100),
                          ("reconstruction_psnr", 1)):
        rows = {}
        for name in args.variants:
            runs = {c: [json.loads(p.read_text()) for p in
                        sorted((Path(args.out) / name).glob(f"{c}__*/results.json"))]
                    for c in categories}
            rows[name] = {c: [r.get(metric) for r in rs] for c, rs in runs.items()}
            if name == "paper" and metric != "reconstruction_psnr":
                rows["untrained encoder"] = {c: [r["untrained"][metric] for r in rs]
                                             for c, rs in runs.items()}
        if metric != "reconstruction_psnr":
            rows["PatchCore, same backbone"] = {
                c: [json.loads(p.read_text())["methods"][1][metric] for p in
                    sorted((Path(args.out) / "patchcore").glob(f"{c}__*.json"))]
                for c in categories}
        lines += [f"\n{metric} ({'points' if scale == 100 else 'dB'}), mean +- std over seeds "
                  f"{' '.join(map(str, args.seeds))}\n",
                  "| recipe | " + " | ".join(categories) + " | mean |",
                  "|---" * (len(categories) + 2) + "|"]
        for name, cells in rows.items():
            scaled = {c: [v * scale for v in vs if v is not None] for c, vs in cells.items()}
            # the mean over categories, seed by seed: only where every category has that seed
            per_seed = [statistics.mean(vs) for vs in zip(*scaled.values())] if all(
                scaled.values()) else []
            n = len(args.seeds)
            lines.append(f"| {name} | " + " | ".join(mean_std(scaled[c], n) for c in categories)
                         + f" | {mean_std(per_seed, n)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="")
    p.add_argument("--categories", nargs="*", default=[])
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=128, help="image and crop size, every row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--table", action="store_true", help="only print the tables")
    args = p.parse_args()
    if not args.table:
        run_all(args)
    print(table(args))


if __name__ == "__main__":
    main()
