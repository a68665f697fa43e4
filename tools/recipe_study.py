"""tools/recipe_study.py: the training recipe on pretrained features, over categories, splits and
seeds, paired against the baselines that every run scores.

Runs patch_ae.py once per (variant, category, split, seed) and bench.py's PatchCore on the same
backbone once per (category, split, seed), each as its own process, `--jobs` at a time with one
thread each, and keeps every results.json under --out. A split is one --data-root: the same
categories drawn into another train/test split (make_elpv.py --split N). Then, or with --table
alone, prints per category and metric: each variant's mean +- std over its runs, the raw
features' and PatchCore's, and each variant's paired differences (same split, same seed) to the
raw features, to its own encoder before training and to the reference variant, as mean +- std
and how many runs went up / down. docs/training.md gives the commands and the tables.
    python tools/recipe_study.py --data-root /tmp/elpv0 /tmp/elpv1 \
        --categories elpv_mono elpv_poly --size 224 --out runs/study
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
# name -> its flags, every recipe setting written out, so that a record keeps its meaning when a
# default changes. "pca-1e-4" is the default recipe since the real-image study (docs/training.md);
# "random-1e-3" the one before it, "random-1e-4" the one before that.
VARIANTS = {
    "random-1e-3": ["--fusion-init", "random", "--lr", "1e-3", "--backbone-lr", "0.1"],
    "random-1e-4": ["--fusion-init", "random", "--lr", "1e-4", "--backbone-lr", "0.1"],
    "random-1e-3-frozen": ["--fusion-init", "random", "--lr", "1e-3", "--backbone-lr", "0"],
    "pca-1e-3": ["--fusion-init", "pca", "--lr", "1e-3", "--backbone-lr", "0.1"],
    "pca-3e-4": ["--fusion-init", "pca", "--lr", "3e-4", "--backbone-lr", "0.1"],
    "pca-1e-4": ["--fusion-init", "pca", "--lr", "1e-4", "--backbone-lr", "0.1"],
    "pca-1e-3-frozen": ["--fusion-init", "pca", "--lr", "1e-3", "--backbone-lr", "0"],
    "pca-1e-4-frozen": ["--fusion-init", "pca", "--lr", "1e-4", "--backbone-lr", "0"],
    "pca-1e-4-20ep": ["--fusion-init", "pca", "--lr", "1e-4", "--backbone-lr", "0.1",
                      "--epochs", "20"],
    "pca-1e-4-c100": ["--fusion-init", "pca", "--lr", "1e-4", "--backbone-lr", "0.1",
                      "--feat-dim", "100"],
}
METRICS = ("image_auroc", "pixel_auroc")


def common(args) -> list[str]:
    return ["--backbone", args.backbone, "--weights", "imagenet", "--image-size",
            str(args.size), "--crop-size", str(args.size)]


def places(args) -> list[tuple[str, str, list[str]]]:
    """(category, split, data flags) for every category in every split (--data-root), and the
    synthetic category (its own split 0)."""
    out = [(c, str(k), ["--data-root", root, "--category", c])
           for k, root in enumerate(args.data_root) for c in args.categories]
    if args.synthetic:
        out.append(("synthetic", "0", ["--synthetic", "--data-root", f"{args.out}/synthetic"]))
    return out


def jobs(args) -> list[tuple[Path, list[str]]]:
    """(result file, command) for every run not yet done."""
    todo, runs = [], [(f"{category}__{split}__{seed}", seed, where) for seed in args.seeds
                      for category, split, where in places(args)]
    for run, seed, where in runs if args.patchcore else []:  # first: they are short
        result = Path(args.out) / "patchcore" / f"{run}.json"
        cmd = [sys.executable, str(ROOT / "bench.py"), *where, *common(args), "--seed",
               str(seed), "--baseline-backbone", args.backbone, "--epochs", "0",
               "--repeats", "1", "--warmup", "0", "--json", str(result)]
        todo.append((result, cmd))
    for name in args.variants:  # each variant whole before the next, in the order given
        for run, seed, where in runs:
            out = Path(args.out) / name / run
            cmd = [sys.executable, str(ROOT / "patch_ae.py"), *where, *common(args),
                   "--seed", str(seed), "--out", str(out), "--overwrite",
                   "--report-images", "0", *VARIANTS[name]]
            todo.append((out / "results.json", cmd))
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


def load(args) -> dict:
    """{(row, category): {(split, seed): {metric: value}}} for every variant, its two baselines
    (the raw features once, from any variant's run) and PatchCore."""
    cells = {}

    def put(row, category, split, seed, values):
        cells.setdefault((row, category), {})[(split, seed)] = values
    for name in args.variants:
        for path in sorted((Path(args.out) / name).glob("*/results.json")):
            category, split, seed = path.parent.name.split("__")
            r = json.loads(path.read_text())
            put(name, category, split, seed, r)
            put(f"{name}: before training", category, split, seed, r["untrained"])
            put("raw features", category, split, seed, r["raw_features"])
    for path in sorted((Path(args.out) / "patchcore").glob("*.json")):
        category, split, seed = path.stem.split("__")
        put("PatchCore, same backbone", category, split, seed,
            json.loads(path.read_text())["methods"][1])
    return cells


def spread(values: list) -> str:
    """mean +- std (n) of the values that exist, in points."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f} (1)"
    return f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f} ({len(values)})"


def paired(a: dict, b: dict, metric: str) -> str:
    """a - b over the (split, seed) pairs both have: mean +- std, and the count up / down."""
    diffs = [100 * (a[k][metric] - b[k][metric]) for k in a.keys() & b.keys()
             if a[k].get(metric) is not None and b[k].get(metric) is not None]
    if not diffs:
        return "n/a"
    std = f" +- {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
    up, down = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return f"{statistics.mean(diffs):+.1f}{std} ({up} up, {down} down)"


def table(args) -> str:
    """Markdown: per metric and category, one row per variant and baseline: the runs' mean +- std,
    and each variant's paired difference to the raw features, to its encoder before training and
    to the reference variant."""
    cells, lines = load(args), []
    categories = list(dict.fromkeys(c for _, c in cells))
    for metric in METRICS:
        for category in categories:
            raw, ref = cells.get(("raw features", category)), cells.get((args.reference, category))
            rows = [row for row, c in cells if c == category]
            if not any(v.get(metric) is not None for row in rows
                       for v in cells[(row, category)].values()):
                continue
            lines += [f"\n{category}, {metric} (points; runs: splits x seeds)\n",
                      f"| run | mean +- std (n) | vs raw features | vs its encoder before "
                      f"training | vs {args.reference} |", "|---|---|---|---|---|"]
            for row in rows:
                runs = cells[(row, category)]
                mean = spread([v.get(metric) for v in runs.values()])
                if row in args.variants:
                    before = cells[(f"{row}: before training", category)]
                    to_ref = paired(runs, ref, metric) if ref and row != args.reference else ""
                    lines.append(f"| {row} | {mean} | {paired(runs, raw, metric)} | "
                                 f"{paired(runs, before, metric)} | {to_ref} |")
                else:
                    lines.append(f"| {row} | {mean} | | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", nargs="*", default=[], help="one folder per split")
    p.add_argument("--categories", nargs="*", default=[])
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=224, help="image and crop size, every row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--reference", default="random-1e-3", choices=list(VARIANTS),
                   help="the variant every other is paired against")
    p.add_argument("--no-patchcore", dest="patchcore", action="store_false")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--table", action="store_true", help="only print the tables")
    args = p.parse_args()
    if not args.table:
        run_all(args)
    print(table(args))


if __name__ == "__main__":
    main()
