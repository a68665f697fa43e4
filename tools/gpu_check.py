"""tools/gpu_check.py: the GPU measurements in one run of at most 8 minutes, all in one JSON.

For whoever has a CUDA GPU: this measures what a 2-core CPU cannot (docs/gpu.md says what each
figure decides). Steps, most important first; each runs as a child process under its own time
cap inside one overall budget (--budget, 450 s), so one slow step cannot eat the rest, and each
keeps what it measured before a failure or a timeout; what the budget leaves out is the end of
the list:
  inventory   versions, GPU, driver, and the model-weight caches on the machine (one line)
  tests       the whole test suite as CI runs it (GPU hidden), then the CUDA tests with the GPU
  quickstart  the README's quick-start command with --device
  paper       wide_resnet101_2 at 224 px, --weights none: an end-to-end run, seconds per
              training step at batch 16 and feature ms/img, in float32 and with the encoder
              under bf16 autocast
  bench       bench.py at the paper's backbones with 25,088 bank rows (a 10% coreset of 320
              images)
  coreset     the greedy coreset of 250,000 x 512 rows to 10%
  scaling     bench.py --scaling up to 10 million bank rows (knn_scores beside torch.mm)
  sweep       the kNN block budget (bench.py --knn-memory-mb) at a batch of 16 images' queries,
              beside torch.mm
  quality     image AUROC on the synthetic category, 3 seeds, float32 against bf16 encoder
              autocast
  ensemble    bench.py --baseline ensemble
  weights     only if ImageNet weights of a backbone are cached: the synthetic category and a
              generated grain texture with those weights, three ways on the same images: the
              paper's protocol (the last epoch; its results carry the untrained encoder's
              metrics too), the guarded one (--holdout 0.1 --select best), and bench.py's
              PatchCore on the same backbone
  suite_on_gpu  the whole suite with the GPU visible (device auto = CUDA), for information
Before the first step, every patch_ae.py and bench.py command line the steps build is parsed by
that script's own parser; one that does not parse stops the run at once (exit 2).
bf16 is tried here only, by wrapping Encoder.forward in torch.autocast (its output cast back to
float32, so the memory bank, kNN distances and loss stay float32); it is no product flag.

How long: at most --budget (450 s) for all steps, plus a few seconds to start; nothing is
downloaded. Where the figures go: --out (default $OUT if set, else gpu_check_out/ at the
repository root): gpu_check.json (every figure, step by step, rewritten after each step) and
gpu_check.log (each step's own output); the last lines printed are a table of every step with
its status and figures.

Run it from the repository root, with the project's requirements installed (torch 2.11 or newer
with CUDA); allow 9 minutes:
    PYTHONUNBUFFERED=1 python tools/gpu_check.py --device cuda --out gpu_check_out
Only some steps again (here within 200 s):
    python tools/gpu_check.py --device cuda --out gpu_check_out --only bench,sweep --budget 200
Dry run on the CPU, tiny sizes, on any machine (--tiny also puts random resnet18 weights under
torchvision's file name into a temporary $TORCH_HOME, so that the weights step runs too; its
figures measure nothing; docs/gpu.md lists the dry runs and their times on this project's 2-core
machine):
    nice -n 10 python tools/gpu_check.py --device cpu --tiny --out /tmp/gpu_check_out
Sizes and flags live in FULL and TINY below; they use only flags that patch_ae.py and bench.py
have, and the check before the first step holds them to it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the repository root: patch_ae.py, bench.py, README.md
sys.path.insert(0, str(REPO))               # so that the steps import them from tools/
# step -> its own cap in seconds on the GPU (x10 with --tiny, for a shared CPU); --budget caps
# the sum
CAPS = {"inventory": 45, "tests": 120, "quickstart": 60, "paper": 120, "bench": 100,
        "coreset": 60, "scaling": 120, "sweep": 90, "quality": 90, "ensemble": 120,
        "weights": 180, "suite_on_gpu": 120}
MIN_STEP_S = 20          # a step is skipped when less than this is left of the budget
# The guarded protocol (ours, not the paper's), which the weights step runs beside the paper's
GUARDED = ["--holdout", "0.1", "--select", "best"]
# Patch AE on wide_resnet101_2; PatchCore on bench.py's default, wide_resnet50_2 (the ensemble:
# its three)
BENCH_PAPER = ["--backbone", "wide_resnet101_2", "--weights", "none", "--image-size", "256",
               "--crop-size", "224", "--epochs", "1"]
FULL = {
    "tests": [],                      # the whole suite
    "paper": ["--backbone", "wide_resnet101_2", "--weights", "none", "--image-size", "256",
              "--crop-size", "224", "--epochs", "2"],
    "timed_steps": (3, 2),            # batches of 16 per epoch x epochs, timed per precision
    "feature_passes": 3,              # timed passes over the test images per precision
    # 32 images at coreset ratio 1 = 32 x 784 = 25,088 rows: what a 10% coreset of 320 images
    # (screw) gives
    "bench": BENCH_PAPER + ["--max-train", "32", "--coreset-ratio", "1", "--warmup", "2",
                            "--repeats", "5"],
    # 10% of 32 images gives the rows a 1% coreset of 320 images would, as the ensemble's
    # official 1%
    "ensemble": BENCH_PAPER + ["--max-train", "32", "--coreset-ratio", "1", "--baseline",
                               "ensemble", "--baseline-coreset-ratio", "0.1", "--warmup", "1",
                               "--repeats", "3"],
    "coreset": ["--bank-rows", "1000", "--coreset-rows", "250000", "--coreset-ratio", "0.1",
                "--repeats", "1"],
    "scaling": ["--bank-rows", "10000", "100000", "1000000", "10000000", "--coreset-rows", "0",
                "--repeats", "3"],
    # --crop-size 896 gives (896/8)^2 = 12,544 queries: one batch of 16 images at 224 px, as
    # score_images sends them
    "sweep": ["--image-size", "896", "--crop-size", "896", "--bank-rows", "25088", "1000000",
              "--coreset-rows", "0", "--repeats", "3"],
    "sweep_mb": [16, 64, 256, 1024, 4096],
    "quality": ["--backbone", "resnet18", "--weights", "none", "--image-size", "128",
                "--crop-size", "128", "--epochs", "5", "--seeds", "0", "1", "2"],
    "weights": ["--image-size", "256", "--crop-size", "224"],
    "weights_epochs": None,           # None: Config().epochs, the default recipe
}
TINY = {
    "tests": ["-k", "end_to_end_on_cuda or chunked_knn_equals_brute_force"],
    "paper": ["--backbone", "resnet18", "--weights", "none", "--image-size", "64",
              "--crop-size", "64", "--epochs", "1"],
    "timed_steps": (2, 1),
    "feature_passes": 1,
    "bench": ["--backbone", "resnet18", "--baseline-backbone", "resnet18", "--weights", "none",
              "--image-size", "64", "--crop-size", "64", "--epochs", "1", "--max-train", "4",
              "--max-test", "8", "--coreset-ratio", "1", "--warmup", "0", "--repeats", "1"],
    "ensemble": ["--weights", "none", "--image-size", "64", "--crop-size", "64", "--epochs", "1",
                 "--backbone", "resnet18", "--max-train", "2", "--max-test", "4", "--baseline",
                 "ensemble", "--warmup", "0", "--repeats", "1"],
    "coreset": ["--bank-rows", "1000", "--coreset-rows", "2000", "--coreset-ratio", "0.1",
                "--repeats", "1"],
    "scaling": ["--bank-rows", "1000", "10000", "--coreset-rows", "0", "--repeats", "1"],
    "sweep": ["--image-size", "64", "--crop-size", "64", "--bank-rows", "2000", "--coreset-rows",
              "0", "--repeats", "1"],
    "sweep_mb": [1, 8],
    "quality": ["--backbone", "resnet18", "--weights", "none", "--image-size", "64",
                "--crop-size", "64", "--epochs", "1", "--seeds", "0", "1"],
    "weights": ["--image-size", "64", "--crop-size", "64"],
    "weights_epochs": 1,
}
FIGURES = ("image_auroc", "pixel_auroc", "pixel_aupro", "untrained", "untrained_seconds",
           "f1_at_threshold", "selected_epoch", "n_holdout", "train_seconds", "bank_seconds",
           "ms_per_image", "memory_bank_shape", "n_train", "n_test", "device", "torch",
           "torchvision")
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


# ----------------------------------------------------------------------------------------------
# What every step shares (each runs in its own child process: python tools/gpu_check.py --step)
# ----------------------------------------------------------------------------------------------
class Step:
    """What a step gets: its sizes, the device, a work folder, and record(), which rewrites the
    step's JSON at once, so the figures taken before a crash or a timeout are kept."""

    def __init__(self, args):
        self.name, self.device = args.step, args.device
        self.s, self.work = (TINY if args.tiny else FULL), Path(args.work)
        self.data = {}

    def record(self, **figures) -> None:
        self.data.update(figures)
        path = self.work / f"{self.name}.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(path.with_suffix(".tmp"), path)

    def common(self, out: str) -> list[str]:
        """--device, and an --out folder under the work folder."""
        return ["--device", self.device, "--out", str(self.work / out)]

    @property
    def synthetic(self) -> list[str]:
        return ["--synthetic", "--data-root", str(self.work / "synthetic_mvtec")]


def figures(result: dict) -> dict:
    return {k: result.get(k) for k in FIGURES}


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def three(metrics: dict | None) -> str:
    """image AUROC / pixel AUROC / AUPRO in percent."""
    return "/".join(pct((metrics or {}).get(m)) for m in METRICS)


@contextlib.contextmanager
def encoder_autocast(dtype):
    """Runs patch_ae's Encoder under torch.autocast(dtype) (None: float32, as the product runs).
    The output is cast back to float32, so the memory bank, the kNN distances and the loss stay
    float32."""
    import torch

    import patch_ae
    plain = patch_ae.Encoder.forward

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=dtype):
            return plain(self, x).float()
    if dtype is not None:
        patch_ae.Encoder.forward = forward
    try:
        yield
    finally:
        patch_ae.Encoder.forward = plain


def precisions():
    import torch
    return (("fp32", None), ("bf16", torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# The command lines the steps run, built in one place: the steps run them, and drive() parses
# them all before the first step
# ----------------------------------------------------------------------------------------------
def paper_argv(st: Step, mode: str) -> list[str]:
    return st.s["paper"] + st.synthetic + st.common(f"paper_{mode}")


def quality_argv(st: Step, mode: str) -> list[str]:
    return st.s["quality"] + st.synthetic + st.common(f"quality_{mode}")


def bench_argv(st: Step, name: str) -> list[str]:
    """The method comparison of bench.py with st.s[name] ('bench' or 'ensemble')."""
    return st.s[name] + st.synthetic + ["--device", st.device]


def scaling_argv(st: Step, *flags: str) -> list[str]:
    return ["--scaling", "--feat-dim", "512", "--device", st.device, *flags]


def sweep_argv(st: Step, mb: int) -> list[str]:
    return scaling_argv(st, *st.s["sweep"], "--knn-memory-mb", str(mb))


def weights_categories(st: Step) -> dict[str, list[str]]:
    """The weights step's two categories and the data flags that name each."""
    grain = ["--data-root", str(st.work / "grain_mvtec"), "--category", "grain"]
    return {"synthetic": st.synthetic, "grain": grain}


def weights_commands(st: Step, backbone: str, category: str) -> dict[str, tuple[str, list]]:
    """The weights step's three runs on one category, all with --weights imagenet on the same
    images, as (script, argv): the paper's protocol (trained, the last epoch; every run also
    scores the untrained encoder), bench.py's PatchCore on the same backbone (its Patch AE at
    0 epochs, so only the bank is built: the untrained encoder again, a cross-check), and the
    guarded protocol (held-out images, the best validated epoch)."""
    import patch_ae as pa
    epochs = str(st.s["weights_epochs"] or pa.Config().epochs)
    data = ["--backbone", backbone, "--weights", "imagenet", *st.s["weights"],
            *weights_categories(st)[category]]
    return {
        "paper": ("patch_ae.py", data + ["--epochs", epochs,
                                         *st.common(f"weights_{category}_paper")]),
        "patchcore": ("bench.py", data + ["--baseline-backbone", backbone, "--epochs", "0",
                                          "--warmup", "0", "--repeats", "1", "--device",
                                          st.device]),
        "guarded": ("patch_ae.py", data + ["--epochs", epochs, *GUARDED,
                                           *st.common(f"weights_{category}_guarded")]),
    }


def planned_commands(st: Step) -> list[tuple[str, list[str]]]:
    """Every patch_ae.py and bench.py command line the steps build from st.s (the weights step's
    for resnet18, the backbone --tiny fakes; the others differ only in the backbone's name)."""
    cmds = []
    for mode in ("fp32", "bf16"):
        cmds += [("patch_ae.py", paper_argv(st, mode)), ("patch_ae.py", quality_argv(st, mode))]
    cmds += [("bench.py", bench_argv(st, "bench")), ("bench.py", bench_argv(st, "ensemble")),
             ("bench.py", scaling_argv(st, *st.s["coreset"])),
             ("bench.py", scaling_argv(st, *st.s["scaling"]))]
    cmds += [("bench.py", sweep_argv(st, mb)) for mb in st.s["sweep_mb"]]
    for category in weights_categories(st):
        cmds += weights_commands(st, "resnet18", category).values()
    return cmds


def unparsed_commands(st: Step) -> list[str]:
    """The planned command lines that their script's parser refuses, each with the reason."""
    import bench
    import patch_ae as pa
    parsers = {"patch_ae.py": pa.parse_config, "bench.py": bench.parse_args}
    failed = []
    for script, argv in planned_commands(st):
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                parsers[script](argv)
        except SystemExit:  # argparse: usage, then the reason on the last line of stderr
            reason = (err.getvalue().strip().splitlines() or ["exit"])[-1]
            failed.append(f"python {script} {shlex.join(argv)}: {reason}")
        except pa.UsageError as e:
            failed.append(f"python {script} {shlex.join(argv)}: {e}")
    return failed


def run_command(script: str, argv: list[str]):
    """patch_ae.main or bench.main in this process: the list of runs, or bench's result."""
    import bench
    import patch_ae as pa
    print(f"$ python {script} {shlex.join(argv)}", flush=True)
    return (pa.main if script == "patch_ae.py" else bench.main)(argv)


# ----------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------
def weight_caches() -> list[Path]:
    """Where model weights may lie: $TORCH_HOME, torch hub's checkpoints, Hugging Face's cache
    (timm's too)."""
    import torch
    home, env = Path.home(), os.environ
    dirs = [Path(env["TORCH_HOME"]) if env.get("TORCH_HOME") else None,
            Path(torch.hub.get_dir()) / "checkpoints", home / ".cache/torch/hub/checkpoints",
            Path(env.get("HF_HOME", home / ".cache/huggingface")),
            Path(env["HF_HUB_CACHE"]) if env.get("HF_HUB_CACHE") else None,
            Path(env["TIMM_CACHE_DIR"]) if env.get("TIMM_CACHE_DIR") else None,
            home / ".cache/timm"]
    return list(dict.fromkeys(d for d in dirs if d is not None))


def step_inventory(st: Step) -> int:
    import numpy
    import torch
    import torchvision

    from patch_ae import BACKBONES
    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cpus": os.cpu_count(),
            # float32 as the product runs: TF32 in cuDNN's convolutions (torch's default), none
            # in matmul
            "tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                     "matmul": torch.backends.cuda.matmul.allow_tf32},
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        query = "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True,
                timeout=20).stdout.strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO,
                                        capture_output=True, text=True,
                                        timeout=10).stdout.strip()
    caches, line, files = {}, [], {}
    suffixes = (".pth", ".pt", ".safetensors", ".bin")
    for d in weight_caches():
        found_files = [Path(r) / f for r, _, fs in os.walk(d) for f in fs] if d.is_dir() else []
        files[d] = found_files[:20000]
        weights = [str(f.relative_to(d)) for f in files[d] if f.suffix in suffixes]
        size = sum(f.stat().st_size for f in files[d] if f.is_file())
        caches[str(d)] = {"exists": d.is_dir(), "files": len(files[d]), "gb": size / 1e9,
                          "weight_files": weights[:50]}
        listed = f" ({', '.join(weights[:5])})" if weights else ""
        line.append(f"{d}: {len(files[d])} files, {size / 1e9:.2f} GB{listed}" if d.is_dir()
                    else f"{d}: absent")
    # ImageNet weights of our backbones: torchvision's own file, or timm's copy of it
    # (<name>.tv_in1k)
    found = {}
    for name in BACKBONES:
        fname = Path(torchvision.models.get_model_weights(name).IMAGENET1K_V1.url).name
        hits = [f for fs in files.values() for f in fs if f.name == fname or (
            f"timm--{name}.tv_in1k" in str(f) and f.suffix in (".safetensors", ".bin"))]
        if hits:
            kind = "torchvision" if hits[0].name == fname else "timm"
            found[name] = {"path": str(hits[0]), "kind": kind}
    cached = ", ".join(found) or "none"
    inventory = "; ".join(line) + f". ImageNet weights of our backbones: {cached}"
    print(f"inventory: {inventory}", flush=True)
    machine = info.get("nvidia_smi") or info.get("gpu") or "no GPU"
    st.record(**info, caches=caches, imagenet_weights=found, inventory=inventory,
              summary=f"{machine}, torch {torch.__version__}; ImageNet weights cached: {cached}")
    return 0


def pytest_run(st: Step, label: str, flags: list[str], env: dict) -> dict:
    """One pytest run; its counts, the tests that did not pass, and the CUDA test's outcome."""
    import importlib.util
    import xml.etree.ElementTree as ET
    xml = st.work / f"tests_{label}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *flags]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", "100"]
    hidden = "CUDA_VISIBLE_DEVICES= " if env.get("CUDA_VISIBLE_DEVICES") == "" else ""
    print(f"$ {hidden}{shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    result = {"command": shlex.join(cmd[1:]), "rc": subprocess.call(cmd, cwd=REPO, env=env)}
    result["wall_s"] = time.perf_counter() - t0
    if xml.is_file():
        outcomes = ("failure", "error", "skipped")
        status = {c.get("name"): next((x.tag for x in c if x.tag in outcomes), "passed")
                  for c in ET.parse(xml).getroot().iter("testcase")}
        counts = {k: sum(v == k for v in status.values()) for k in ("passed", *outcomes)}
        result.update(counts=counts, not_passed={k: v for k, v in status.items() if v != "passed"},
                      cuda_test=status.get("test_end_to_end_on_cuda", "not collected"))
        result["summary"] = (f"{label}: {counts['passed']} passed, {counts['failure']} failed, "
                             f"{counts['error']} errors, {counts['skipped']} skipped in "
                             f"{result['wall_s']:.0f} s")
    st.record(**{label: result})
    return result


def step_tests(st: Step) -> int:
    """The suite as CI runs it (the GPU hidden: the tests are written for auto = CPU), then the
    CUDA tests."""
    hidden = pytest_run(st, "gpu_hidden", st.s["tests"], dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    cuda = pytest_run(st, "cuda_tests", ["-k", "cuda"], dict(os.environ))
    st.record(summary=f"{hidden.get('summary')}; {cuda.get('summary')}; CUDA test "
                      f"{cuda.get('cuda_test')}")
    return hidden["rc"] or cuda["rc"]


def step_suite_on_gpu(st: Step) -> int:
    """Last, for information: the whole suite with the GPU visible, so that device auto picks
    CUDA."""
    r = pytest_run(st, "gpu_visible", st.s["tests"], dict(os.environ))
    not_passed = ", ".join(r.get("not_passed", {})) or "none"
    st.record(summary=f"{r.get('summary')}; not passed: {not_passed}")
    return 0


def step_quickstart(st: Step) -> int:
    """The README's quick-start command as it stands, plus --device."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    line = next(ln for ln in section.splitlines() if "python patch_ae.py" in ln)
    cmd = [sys.executable, str(REPO / "patch_ae.py"),
           *shlex.split(line.split("python patch_ae.py", 1)[1]), "--device", st.device]
    folder = st.work / "quickstart"
    folder.mkdir(exist_ok=True)
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=folder)
    st.record(command=shlex.join(cmd[1:]), rc=rc, wall_s=time.perf_counter() - t0)
    found = sorted(folder.glob("runs/*/results.json"))
    if found:
        r = figures(json.loads(found[-1].read_text()))
        st.record(**r, summary=f"image AUROC {pct(r['image_auroc'])}, pixel AUROC "
                               f"{pct(r['pixel_auroc'])}, AUPRO {pct(r['pixel_aupro'])} "
                               f"(untrained {three(r['untrained'])}), "
                               f"{r['ms_per_image']:.1f} ms/img, train "
                               f"{r['train_seconds']:.1f} s, wall {st.data['wall_s']:.0f} s")
    return rc


def time_training_and_features(st: Step, cfg, device) -> dict:
    """Seconds per training step at batch 16 (CutPaste on the CPU included, as train_patch_ae
    runs it), peak memory of training, and encoder ms per test image, on the synthetic images at
    cfg's size."""
    import dataclasses

    import torch

    import patch_ae as pa
    data = pa.load_category(st.work / "synthetic_mvtec", "synthetic", cfg.image_size,
                            cfg.crop_size)
    cfg = dataclasses.replace(cfg, batch_size=16)
    per_epoch, epochs = st.s["timed_steps"]
    images = data.train[:16 * per_epoch]
    pa.seed_everything(0)
    model = pa.PatchAE(pa.load_backbone(cfg.backbone, cfg.weights), cfg.feat_dim)
    # one warm-up step, untimed
    pa.train_patch_ae(model, data.train[:16], dataclasses.replace(cfg, epochs=1), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = pa.clock(device)
    pa.train_patch_ae(model, images, dataclasses.replace(cfg, epochs=epochs), device)
    step_s = (pa.clock(device) - t0) / (per_epoch * epochs)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    encoder = model.encoder.eval()
    pa.extract_features(encoder, data.test, 16, device)                 # warm-up pass
    t0, passes = pa.clock(device), st.s["feature_passes"]
    for _ in range(passes):
        pa.extract_features(encoder, data.test, 16, device)
    ms = (pa.clock(device) - t0) / (passes * len(data.test)) * 1000
    return {"train_step_s": step_s, "timed_steps": per_epoch * epochs, "peak_train_mb": peak,
            "features_ms_per_image": ms}


def step_paper(st: Step) -> int:
    """Paper size, --weights none: one end-to-end run per precision, then timed steps and
    features."""
    import patch_ae as pa
    # the same flags, as patch_ae reads them
    cfg, _ = pa.parse_config(st.s["paper"] + ["--device", st.device])
    device = pa.pick_device(st.device)
    for mode, dtype in precisions():
        with encoder_autocast(dtype):
            runs = run_command("patch_ae.py", paper_argv(st, mode))
            st.record(**{f"{mode}_run": figures(runs[0])})
            st.record(**{f"{mode}_timing": time_training_and_features(st, cfg, device)})
    fp, bf = st.data["fp32_timing"], st.data["bf16_timing"]
    # a 320-image category (screw): all of train/good trains under the paper's protocol
    # (--holdout 0, the default), ceil(n/16) steps per epoch
    n_train = round(320 * (1 - cfg.holdout))
    epochs = pa.Config().epochs
    steps = math.ceil(n_train / 16) * epochs
    projected = {"n_train": n_train, "steps": steps, "train_s_fp32": steps * fp["train_step_s"],
                 "train_s_bf16": steps * bf["train_step_s"],
                 "bank_features_s_fp32": n_train * fp["features_ms_per_image"] / 1000}
    st.record(projected_320_images=projected, bf16_speedup={
        "train": fp["train_step_s"] / bf["train_step_s"],
        "features": fp["features_ms_per_image"] / bf["features_ms_per_image"]},
        summary=f"{cfg.backbone} {cfg.crop_size} px: {fp['train_step_s']:.3f} s/step fp32, "
                f"{bf['train_step_s']:.3f} bf16; features {fp['features_ms_per_image']:.2f} / "
                f"{bf['features_ms_per_image']:.2f} ms/img; projected 320 images x {epochs} "
                f"epochs: {projected['train_s_fp32']:.0f} s training (fp32) + bank; image AUROC "
                f"after {cfg.epochs} epochs fp32 {pct(st.data['fp32_run']['image_auroc'])}, "
                f"bf16 {pct(st.data['bf16_run']['image_auroc'])}")
    return 0


def method_line(result: dict) -> str:
    return "; ".join(f"{m['method']} {m['total_ms']:.2f} ms/img (features "
                     f"{m['features_ms']:.2f}, kNN {m['knn_ms']:.2f}), fit {m['fit_s']:.1f} s, "
                     f"peak infer {m['peak_infer_mb'] or 0:.0f} MB"
                     for m in result["methods"])


def step_bench(st: Step) -> int:
    result = run_command("bench.py", bench_argv(st, "bench"))
    st.record(**result, summary=method_line(result))
    return 0


def step_ensemble(st: Step) -> int:
    result = run_command("bench.py", bench_argv(st, "ensemble"))
    st.record(**result, summary=method_line(result))
    return 0


def step_coreset(st: Step) -> int:
    c = run_command("bench.py", scaling_argv(st, *st.s["coreset"]))["coreset"]
    st.record(**c, summary=f"{c['rows']} x {c['dims']} -> {c['selected']} rows in "
                           f"{c['seconds']:.2f} s")
    return 0


def step_scaling(st: Step) -> int:
    result = run_command("bench.py", scaling_argv(st, *st.s["scaling"]))
    st.record(**result, summary="knn_scores: " + ", ".join(
        f"{r['bank_rows']:,} rows {r['ms']:.1f} ms (x{r['ratio_to_mm']:.2f} of mm)"
        for r in result["scaling"]))
    return 0


def step_sweep(st: Step) -> int:
    """The kNN block budget against torch.mm on the same shapes; the best budget per bank
    size."""
    rows = []
    for mb in st.s["sweep_mb"]:
        rows += run_command("bench.py", sweep_argv(st, mb))["scaling"]
        st.record(rows=rows)
    best = {}
    for r in rows:
        key = f"{r['queries']}x{r['bank_rows']}"
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = {"budget_mb": r["budget_mb"], "ms": r["ms"],
                         "ratio_to_mm": r["ratio_to_mm"]}
    st.record(best=best, summary="fastest budget: " + ", ".join(
        f"{k}: {v['budget_mb']} MB (x{v['ratio_to_mm']:.2f} of mm)" for k, v in best.items()))
    return 0


def step_quality(st: Step) -> int:
    """Image AUROC on the synthetic category, several seeds, float32 against bf16 encoder
    autocast."""
    import numpy as np
    for mode, dtype in precisions():
        with encoder_autocast(dtype):
            runs = run_command("patch_ae.py", quality_argv(st, mode))
        st.record(**{mode: [figures(r) | {"seed": r["seed"]} for r in runs]})
    auroc = {m: [r["image_auroc"] for r in st.data[m]] for m in ("fp32", "bf16")}
    ms = {m: float(np.mean([r["ms_per_image"] for r in st.data[m]])) for m in ("fp32", "bf16")}
    diff = 100 * (np.mean(auroc["bf16"]) - np.mean(auroc["fp32"]))
    st.record(image_auroc=auroc, bf16_minus_fp32_points=diff,
              fp32_seed_range_points=100 * np.ptp(auroc["fp32"]), ms_per_image=ms,
              summary=f"image AUROC fp32 {[pct(a) for a in auroc['fp32']]}, bf16 "
                      f"{[pct(a) for a in auroc['bf16']]}: mean moves {diff:+.2f} points "
                      f"(<= 0.5: {abs(diff) <= 0.5}); ms/img {ms['fp32']:.2f} / "
                      f"{ms['bf16']:.2f}")
    return 0


def make_grain_category(root: Path, size: int = 128, n_train: int = 60, n_good: int = 16,
                        n_defect: int = 12, seed: int = 0) -> Path:
    """A second, texture-like category in MVTec layout: isotropic grain (1/f noise, as leather or
    carpet) with two defect kinds unlike the synthetic weave's: a coarse-grained patch and a
    colour spot."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    yy, xx = np.mgrid[0:size, 0:size] / size

    def grain(beta):  # standardised noise with a 1/f^beta spectrum: larger beta, coarser grain
        spectrum = np.fft.fft2(rng.standard_normal((size, size)))
        g = np.fft.ifft2(spectrum / np.maximum(freq, 1 / size) ** beta).real
        return (g - g.mean()) / g.std()

    def texture(v):
        tint = np.array([0.75, 0.55, 0.4]) + rng.normal(0, 0.015, 3)
        return np.clip((0.5 + 0.12 * v)[..., None] * tint * 1.3, 0, 1)

    def save(a, path, mode="RGB"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((a * 255).round().astype(np.uint8), mode).save(path)
    base = root / "grain"
    for i in range(n_train):
        save(texture(grain(0.8)), base / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        save(texture(grain(0.8)), base / "test/good" / f"{i:03d}.png")
    for kind in ("coarse", "spot"):
        for i in range(n_defect):
            (cy, cx), (ry, rx) = rng.uniform(0.25, 0.75, 2), rng.uniform(0.05, 0.1, 2)
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img = texture(np.where(mask, grain(2.0), grain(0.8)) if kind == "coarse"
                          else grain(0.8))
            if kind == "spot":
                img[mask] = np.clip(img[mask] * [0.6, 0.8, 1.2], 0, 1)
            save(img, base / "test" / kind / f"{i:03d}.png")
            save(mask.astype(float), base / "ground_truth" / kind / f"{i:03d}_mask.png", "L")
    return root


def imagenet_torch_home(st: Step, backbone: str, source: dict) -> None:
    """Points $TORCH_HOME at the cached ImageNet weights of `backbone`, so that --weights
    imagenet finds them offline in patch_ae.py and bench.py alike. timm's tv_in1k file holds
    torchvision's tensors under the same names: it is copied under torchvision's file name into
    a torch home in the work folder."""
    import torch
    import torchvision
    path = Path(source["path"])
    if source["kind"] == "timm":
        fname = Path(torchvision.models.get_model_weights(backbone).IMAGENET1K_V1.url).name
        home = st.work / "timm_torch_home"
        (home / "hub/checkpoints").mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        torch.save(state, home / "hub/checkpoints" / fname)
        os.environ["TORCH_HOME"] = str(home)
    elif path.parent != Path(torch.hub.get_dir()) / "checkpoints":
        os.environ["TORCH_HOME"] = str(path.parents[2])  # <home>/hub/checkpoints/<file>


def step_weights(st: Step) -> int:
    """Only where the inventory found ImageNet weights of a backbone: Patch AE trained from
    pretrained features under the paper's protocol (with the untrained encoder's metrics beside
    it), bench.py's PatchCore with the same weights, and the guarded protocol, on two categories.
    The guarded runs come last, so a timeout costs them first."""
    import patch_ae as pa
    inventory = st.work / "inventory.json"
    found = {}
    if inventory.is_file():
        found = json.loads(inventory.read_text()).get("imagenet_weights", {})
    if not found:
        st.record(summary="not run: no ImageNet weights of our backbones in the caches "
                          "(see inventory)")
        return 0
    backbone = next(b for b in pa.BACKBONES if b in found)
    imagenet_torch_home(st, backbone, found[backbone])
    make_grain_category(st.work / "grain_mvtec")
    st.record(backbone=backbone, weights="imagenet", source=found[backbone],
              torch_home=os.environ.get("TORCH_HOME"))
    plans = {category: weights_commands(st, backbone, category)
             for category in weights_categories(st)}
    order = [(c, run) for run in ("paper", "patchcore") for c in plans]
    order += [(c, "guarded") for c in plans]
    lines = {c: [] for c in plans}
    for category, run in order:
        script, argv = plans[category][run]
        result = run_command(script, argv)
        if run == "patchcore":  # bench's rows: Patch AE at 0 epochs, then PatchCore
            ae, pc = result["methods"]
            # the untrained encoder twice, through patch_ae.py and through bench.py: in points,
            # how far apart (0 where both paths score alike)
            untrained = st.data[f"{category}_paper"]["untrained"] or {}
            apart = max((100 * abs(ae[m] - untrained[m]) for m in METRICS
                         if ae.get(m) is not None and untrained.get(m) is not None), default=None)
            st.record(**{f"{category}_patchcore": pc,
                         f"{category}_bench_patch_ae_0_epochs": {m: ae[m] for m in METRICS},
                         f"{category}_untrained_apart_points": apart})
            lines[category].append(f"PatchCore {three(pc)}")
        else:
            r = figures(result[0])
            st.record(**{f"{category}_{run}": r})
            lines[category].append(f"{run} {three(r)}")
            if run == "paper":
                lines[category].append(f"untrained {three(r['untrained'])}")
        parts = "; ".join(f"{c}: {', '.join(v)}" for c, v in lines.items() if v)
        st.record(summary=f"{backbone} ImageNet ({found[backbone]['kind']}), image AUROC / "
                          f"pixel AUROC / AUPRO: {parts}")
    return 0


STEPS = {"inventory": step_inventory, "tests": step_tests, "quickstart": step_quickstart,
         "paper": step_paper, "bench": step_bench, "coreset": step_coreset,
         "scaling": step_scaling, "sweep": step_sweep, "quality": step_quality,
         "ensemble": step_ensemble, "weights": step_weights, "suite_on_gpu": step_suite_on_gpu}


# ----------------------------------------------------------------------------------------------
# The driver: one child process per step, each under min(its cap, what is left of the budget)
# ----------------------------------------------------------------------------------------------
def fake_torch_home(work: Path) -> Path:
    """--tiny only: random resnet18 weights under torchvision's file name, so the dry run takes
    the weights step's path too. Never used on the GPU; the JSON says 'tiny'."""
    import torch
    import torchvision
    folder = work / "fake_torch_home"
    fname = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    (folder / "hub/checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(),
               folder / "hub/checkpoints" / fname)
    return folder


def tail(path: Path, start: int, lines: int = 15) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])


def drive(args) -> int:
    unknown = set(args.only.split(",")) - set(STEPS) if args.only else set()
    if unknown:
        print(f"error: --only {args.only}: unknown step(s) {', '.join(sorted(unknown))}; "
              f"steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    out = Path(args.out or os.environ.get("OUT") or REPO / "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    # every command line the steps will run, parsed now: a flag that patch_ae.py or bench.py no
    # longer has stops the run here, not minutes into it
    failed = unparsed_commands(Step(argparse.Namespace(step="plan", device=args.device,
                                                        tiny=args.tiny, work=str(work))))
    if failed:
        print("error: command lines that their script refuses:\n  " + "\n  ".join(failed),
              file=sys.stderr)
        return 2
    log_path, json_path = out / "gpu_check.log", out / "gpu_check.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.tiny:
        env["TORCH_HOME"] = str(fake_torch_home(work))
    # the weights step reads the inventory's findings
    only = set(args.only.split(",")) | ({"inventory"} if "weights" in args.only else set())
    names = [n for n in STEPS if not args.only or n in only]
    report = {"argv": sys.argv[1:], "device": args.device, "tiny": args.tiny,
              "budget_s": args.budget,
              "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
              "steps": {}}
    start = time.perf_counter()
    with open(log_path, "a") as log:
        for name in names:
            left = args.budget - (time.perf_counter() - start)
            cap = min(CAPS[name] * (10 if args.tiny else 1), left)
            if cap < MIN_STEP_S:
                report["steps"][name] = {"status": "skipped",
                                         "reason": f"{left:.0f} s left of the budget"}
                print(f"{name}: skipped, {left:.0f} s left of the budget", flush=True)
                continue
            print(f"\n===== {name} (cap {cap:.0f} s) =====", file=log, flush=True)
            at = log.tell()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--device",
                   args.device, "--work", str(work)] + (["--tiny"] if args.tiny else [])
            step_json = work / f"{name}.json"
            # a reused --work folder: no figures of an earlier run
            step_json.unlink(missing_ok=True)
            t0 = time.perf_counter()
            # its own process group: a timeout kills its children too
            child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
            try:
                code = child.wait(timeout=cap)
                status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                status = f"timed out after {cap:.0f} s"
            seconds = time.perf_counter() - t0
            found = json.loads(step_json.read_text()) if step_json.is_file() else {}
            report["steps"][name] = {"status": status, "wall_s": seconds, "cap_s": cap,
                                     "figures": found}
            json_path.write_text(json.dumps(report, indent=1, default=str))
            print(f"{name}: {status}, {seconds:.0f} s. {found.get('summary', '')}", flush=True)
            if status != "ok":
                log.flush()
                print("  " + tail(log_path, at).replace("\n", "\n  "), flush=True)
    report["wall_s"] = time.perf_counter() - start
    json_path.write_text(json.dumps(report, indent=1, default=str))
    print("\n| step | status | s | figures |\n|---|---|---|---|")
    for name, r in report["steps"].items():
        figures_line = r.get("figures", {}).get("summary", r.get("reason", ""))
        print(f"| {name} | {r['status']} | {r.get('wall_s', 0):.0f} | {figures_line} |")
    print(f"\n{report['wall_s']:.0f} s in all; every figure: {json_path}; log: {log_path}")
    return 0 if all(r["status"] == "ok" for r in report["steps"].values()) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="device for every step")
    p.add_argument("--tiny", action="store_true",
                   help="tiny sizes (TINY), for a dry run on the CPU")
    p.add_argument("--out", default="", help="folder for gpu_check.log and gpu_check.json "
                   "(default: $OUT if set, else gpu_check_out/ at the repository root)")
    p.add_argument("--work", default="",
                   help="folder for data and runs (default: a new temporary folder)")
    p.add_argument("--only", default="",
                   help=f"comma-separated steps to run (default all: {','.join(STEPS)})")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all steps (default 450; 7200 with --tiny)")
    # internal: run one step in this process
    p.add_argument("--step", choices=tuple(STEPS), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.budget is None:
        args.budget = 7200 if args.tiny else 450
    if args.step:
        return STEPS[args.step](Step(args))
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
