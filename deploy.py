"""deploy.py: Patch AE on your own images, beyond the paper: a threshold fitted on held-out normal
images, best-epoch selection on a validation set made from them, model files, and the scoring of
a folder of new images into predictions.csv and pictures. Also the runs on VisA and MVTec AD 2
(--dataset, layouts.py). The method itself is patch_ae.py's: this file adds a per-epoch guard to
its training loop and what comes after it.

    python deploy.py --data-root ./my_data --category my_part --save my_part.pt
    python deploy.py --load my_part.pt --predict ./incoming --out runs/incoming

Held-out images (--holdout, 0.1 by default here) are normal train/good images that neither train
nor fill the memory bank: their scores give the threshold (their THRESHOLD_QUANTILE quantile) and,
with drawn defects, a validation set that --select best uses to keep the best epoch.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

import patch_ae as pa
import report
from layouts import MVTEC2, VISA
from patch_ae import (DEFECT_KINDS, IMAGE_EXTS, MVTEC, Category, Config, Encoder, Layout, Progress,
                      UsageError, atomic_save, check, clock, compute_metrics, draw_defect,
                      extract_features, flag, flatten_patches, fmt, load_backbone,
                      make_synthetic_category, parse_flags, score_images)

LAYOUTS = {layout.name: layout for layout in (MVTEC, VISA, MVTEC2)}  # --dataset


def layout_for(dataset: str, synthetic: bool = False) -> Layout:
    """--dataset's layout; --synthetic writes MVTec AD's alone."""
    if synthetic and dataset != MVTEC.name:
        raise UsageError(f"--synthetic writes MVTec AD's layout; drop --dataset {dataset}")
    return LAYOUTS[dataset]


OURS = "validation, threshold and model files (ours, not in the paper)"


@dataclass
class DeployConfig(Config):
    dataset: str = flag("mvtec", "layout of --data-root: MVTec AD, VisA, MVTec AD 2", pa.DATA,
                        choices=tuple(LAYOUTS))
    holdout: float = flag(0.1, "share of train/good held out to validate on and set the "
                          "threshold (0: the paper's protocol, no threshold)", OURS)
    select: str = flag("last", "keep the last epoch (the paper's) or the best validated one",
                       OURS, choices=("last", "best"))
    save: str = flag("", "write the model to this file", OURS)
    load: str = flag("", "skip training: score with a model file made by --save", OURS)
    predict: str = flag("", "score every image under this folder into predictions.csv", OURS)


EXAMPLES = """examples:
  train on your own images (MVTec AD layout), fit a threshold, keep the model:
    python deploy.py --data-root ./my_data --category my_part --save my_part.pt
  score new images with it:
    python deploy.py --load my_part.pt --predict ./incoming --out runs/incoming
  the paper's protocol on VisA (no held-out images):
    python deploy.py --dataset visa --data-root ./VisA_20220922 --category all --holdout 0"""


def check_deploy(cfg: DeployConfig) -> None:
    one_run = len(cfg.seed) == 1 and cfg.category != "all"  # what one model file can hold
    check([(0 <= cfg.holdout < 1, "--holdout must be in [0, 1)"),
           (not (cfg.save and cfg.load), "--save and --load together: a loaded model has nothing "
            "new to save"),
           (one_run or not (cfg.save or cfg.load or cfg.predict),
            "--save, --load and --predict take one --category and one --seed")])
    layout_for(cfg.dataset, cfg.synthetic)


# ----------------------------------------------------------------------------------------------
# Validation (ours): held-out normal images with drawn defects, scored every k-th epoch
# ----------------------------------------------------------------------------------------------
VAL_BANK_IMAGES, VAL_BANK_ROWS = 64, 16384  # validation bank: patch rows of some training images
VAL_BUDGET = 0.15     # validation's target share of the training time: sets its period
VAL_TOLERANCE = 0.01  # --select best: a later epoch must beat the kept one by this (noisy score)
THRESHOLD_QUANTILE = 0.99  # the threshold: this quantile of the held-out normal images' scores


@dataclass
class Validation:
    images: torch.Tensor   # (V, 3, S, S) uint8: the held-out images, then each once per defect kind
    labels: np.ndarray     # (V,) 1 = defect
    masks: torch.Tensor    # (V, S, S) bool
    bank_images: torch.Tensor  # (<= 64, 3, S, S) uint8 training images whose features form the bank
    bank_rows: torch.Tensor    # (<= 16384,) rows of their (n*h*w, C) features, the same every epoch


def make_validation(held: torch.Tensor, train: torch.Tensor, seed: int) -> Validation:
    """Held-out normal images -> a labelled validation set: each image as it is and with one
    scratch, one blob and one stain (draw_defect), with masks. Made once per run, from `seed`."""
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    clean = held.permute(0, 2, 3, 1).numpy() / 255.0                    # (n, S, S, 3) in [0, 1]
    images, masks = [held], [torch.zeros(len(held), *held.shape[-2:], dtype=torch.bool)]
    for kind in DEFECT_KINDS:
        pairs = [draw_defect(img, kind, rng) for img in clean]          # [(image, mask), ...]
        defective = np.stack([(a * 255).round() for a, _ in pairs]).astype(np.uint8)
        images.append(torch.from_numpy(defective).permute(0, 3, 1, 2))  # (n, 3, S, S)
        masks.append(torch.from_numpy(np.stack([m for _, m in pairs])))
    labels = np.repeat([0] + [1] * len(DEFECT_KINDS), len(held))
    bank_images = train[torch.randperm(len(train), generator=g)[:VAL_BANK_IMAGES]]
    h, w = (s // Encoder.stride for s in train.shape[-2:])
    rows = torch.randperm(len(bank_images) * h * w, generator=g)[:VAL_BANK_ROWS].sort().values
    return Validation(torch.cat(images).contiguous(), labels, torch.cat(masks), bank_images, rows)


def validation_score(metrics: dict) -> float:
    """What --select best maximises: the mean of image AUROC (the paper's metric; few images, so
    coarse) and pixel AUROC (every pixel of every validation image)."""
    return (metrics["image_auroc"] + metrics["pixel_auroc"]) / 2


@torch.no_grad()
def validate(encoder: Encoder, val: Validation, cfg: Config, device: torch.device) -> dict:
    """Scores the validation set against a bank of the current encoder's training features; also
    what the features do: mean ||R||, the share of R's channels that are 0 on every bank patch
    (dead ReLUs), and the held-out normal images' mean map (their distance to the bank)."""
    feats = extract_features(encoder, val.bank_images, cfg.batch_size, device, desc="")
    flat = flatten_patches(feats)                                       # (n*h*w, C)
    bank = flat[val.bank_rows.to(flat.device)]
    scores, maps = score_images(encoder, bank, val.images, cfg.batch_size, device,
                                cfg.image_score, desc="")
    out = compute_metrics(val.labels, scores, val.masks, maps)
    out["score"] = validation_score(out)
    out["feature_norm"] = float(flat.norm(dim=1).mean())
    out["dead_units"] = float((flat.amax(0) <= 0).float().mean())
    out["normal_distance"] = float(maps[torch.from_numpy(val.labels == 0)].mean())
    return out


def validation_line(row: dict) -> str:
    return (f"  validation, epoch {row['epoch']}: score {fmt(row['score'], 2)} = mean of image "
            f"AUROC {fmt(row['image_auroc'])} and pixel AUROC {fmt(row['pixel_auroc'])}; AUPRO "
            f"{fmt(row['pixel_aupro'])}, |R| {row['feature_norm']:.3g}, dead "
            f"{fmt(row['dead_units'], 0)}%, normal distance {row['normal_distance']:.3g}, "
            f"{row['seconds']:.1f}s")


def auto_val_every(val_seconds: float, epoch_seconds: float) -> int:
    """Validate every k-th epoch, the smallest k at which one validation costs at most VAL_BUDGET
    of k epochs. Validation's cost is mostly fixed (its bank, four copies of each held-out image,
    every pixel's AUROC) while an epoch shrinks with the category, so a fixed k would cost 13%
    at the paper's size and half the training time on a small category."""
    return max(1, math.ceil(val_seconds / (VAL_BUDGET * max(epoch_seconds, 1e-9))))


class Guard:
    """patch_ae.fit's per-epoch hook: validates before the first epoch, every k-th epoch
    (auto_val_every, k chosen after epoch 1) and after the last; finish() then, with --select
    best, loads the kept state. The kept epoch changes only when a later one beats it by
    VAL_TOLERANCE, so a noisy rise does not move it."""

    def __init__(self, val: Validation, cfg: DeployConfig, device: torch.device):
        self.val, self.cfg, self.device = val, cfg, device
        self.curve, self.kept, self.state, self.val_every = [], None, None, None
        self.start = time.perf_counter()

    def on_epoch(self, epoch: int, model: pa.PatchAE, epoch_seconds: float) -> None:
        if epoch == 1:  # the period, chosen once from epoch 0's validation and the first epoch
            self.val_every = auto_val_every(self.curve[0]["seconds"], epoch_seconds)
            print(f"  validating every {self.val_every} epoch(s): one validation "
                  f"{self.curve[0]['seconds']:.1f}s, one epoch {epoch_seconds:.1f}s", flush=True)
        if epoch and epoch % self.val_every and epoch != self.cfg.epochs:
            return
        t0 = clock(self.device)
        row = {"epoch": epoch, **validate(model.encoder, self.val, self.cfg, self.device)}
        row["seconds"] = clock(self.device) - t0
        self.curve.append(row)
        if self.kept is None or row["score"] > self.kept["score"] + VAL_TOLERANCE:
            self.kept = row
            self.state = {k: v.clone() for k, v in model.state_dict().items()}
        print(validation_line(row), flush=True)

    def finish(self, model: pa.PatchAE) -> int:
        """-> the epoch kept: the last, or with --select best the kept validated one."""
        top = max(self.curve, key=lambda row: row["score"])
        kept = self.cfg.epochs
        if self.cfg.select == "best":
            model.load_state_dict(self.state)
            kept = self.kept["epoch"]
        seconds = sum(row["seconds"] for row in self.curve)
        share = fmt(seconds / max(time.perf_counter() - self.start - seconds, 1e-9), 0)
        why = ("the last epoch, --select last" if self.cfg.select == "last" else
               f"--select best: the first score that no later one beat by more than "
               f"{fmt(VAL_TOLERANCE, 2)} points")
        print(f"top validation score {fmt(top['score'], 2)} at epoch {top['epoch']}; kept epoch "
              f"{kept} ({why}); validation {seconds:.1f}s = {share}% of the training time",
              flush=True)
        self.seconds = seconds
        return kept


# ----------------------------------------------------------------------------------------------
# Held-out images, threshold and the guarded fit
# ----------------------------------------------------------------------------------------------
def split_holdout(cfg: DeployConfig, data: Category) -> tuple[torch.Tensor, torch.Tensor, str]:
    """-> (training images, held-out normal images, the protocol in words). The paper trains on
    all of train/good; --holdout (ours) holds a share out; MVTec AD 2 brings its own."""
    kept = "the best validated epoch kept (ours)" if cfg.select == "best" else "the last epoch kept"
    recipe = pa.recipe_words(cfg)
    if data.validation is not None:  # MVTec AD 2's validation/good
        return data.train, data.validation, (
            f"all {len(data.train)} train/good images train and fill the bank, as the paper's; "
            f"the dataset's own {len(data.validation)} validation/good images validate and set "
            f"the threshold; {kept}; {recipe}")
    n_hold = int(round(len(data.train) * cfg.holdout))
    if not n_hold:  # the paper's protocol, the same images in the same order as patch_ae.py
        return data.train, data.train[:0], pa.paper_protocol(cfg, len(data.train))
    if len(data.train) - n_hold < 1:
        raise UsageError(f"--holdout {cfg.holdout} leaves no training image of "
                         f"{len(data.train)}; lower it")
    order = torch.randperm(len(data.train))
    train, held = data.train[order[n_hold:]], data.train[order[:n_hold]]
    return train, held, (f"ours, not the paper's: {n_hold} of {len(order)} train/good images "
                         f"held out to validate and set the threshold, {kept}; {recipe}")


def fit_guarded(cfg: DeployConfig, data: Category, seed: int, device: torch.device) -> dict:
    """patch_ae.fit on the images not held out, with the validation guard; then the threshold and
    the heatmap colours from the held-out images' scores and maps."""
    pa.seed_everything(seed)
    train, held, protocol = split_holdout(cfg, data)
    if not len(held) and cfg.select == "best" and cfg.epochs > 0:
        raise UsageError("--select best validates on held-out normal images, and --holdout 0 "
                         "leaves none; pass --holdout 0.1, or drop --select best")
    print(f"training on {len(train)} images, {len(held)} held out\nprotocol: {protocol}",
          flush=True)
    guard = Guard(make_validation(held, train, seed), cfg, device) if len(held) else None
    model = pa.fit(cfg, train, seed, device, guard)
    model.update(protocol=protocol, n_holdout=len(held), grey=is_grey(train))
    if guard is not None:
        model.update(validation_curve=guard.curve, val_every=guard.val_every,
                     validation_seconds=guard.seconds)
    if len(held):  # from normal images alone: the THRESHOLD_QUANTILE quantile of their scores
        scores, maps = pa.score_images(model["encoder"], model["bank"], held, cfg.batch_size,
                                       device, cfg.image_score, desc="held-out")
        model["threshold"] = float(np.quantile(scores, THRESHOLD_QUANTILE))
        model["heat_scale"] = report.heat_scale(maps.numpy(), "the held-out normal images")
        print(f"threshold {model['threshold']:.4f} = {THRESHOLD_QUANTILE:g} quantile of "
              f"{len(held)} held-out scores", flush=True)
        if len(held) < 1 / (1 - THRESHOLD_QUANTILE):
            print(f"note: the threshold comes from only {len(held)} held-out images; with fewer "
                  f"than {round(1 / (1 - THRESHOLD_QUANTILE))} the {THRESHOLD_QUANTILE:g} "
                  f"quantile is about their largest score; hold out more images for a steadier "
                  f"one", flush=True)
    return model


def is_grey(images: torch.Tensor) -> bool:
    """uint8 (N, 3, S, S): every image's three channels equal (grey files read as RGB)."""
    return bool((images[:, 0] == images[:, 1]).all() and (images[:, 1] == images[:, 2]).all())


# ----------------------------------------------------------------------------------------------
# Model files
# ----------------------------------------------------------------------------------------------
MODEL_FORMAT = "patch_ae/2"  # the model file's "format" key: load_model refuses any other
# The flags that only training reads: with --load, the model file's values stand
TRAINING_ONLY = ("weights", "fusion_init", "alpha", "coreset_ratio", "epochs", "lr",
                 "backbone_lr", "seed", "holdout", "select")
KEPT = (*pa.RUN_FIELDS, "grey")  # what the file keeps beside the networks and the bank


def save_model(path: str, cfg: DeployConfig, model: dict) -> None:
    """One file with the trained encoder and its memory bank (all that scoring needs), the
    threshold and heatmap colours, the decoder (only the report's reconstruction panel uses it),
    the config and the versions."""
    atomic_save({"format": MODEL_FORMAT, "config": vars(cfg).copy(),
                 "encoder": model["encoder"].state_dict(),
                 "decoder": model["decoder"].state_dict(),
                 "memory_bank": model["bank"].cpu(),
                 **{key: model.get(key) for key in KEPT},
                 "versions": {"torch": str(torch.__version__),
                              "torchvision": torchvision.__version__}}, Path(path))
    print(f"saved model to {path}")
    if model.get("threshold") is None:
        print("note: the model has no threshold (no held-out images), so --predict will leave "
              "is_anomalous empty; train with --holdout 0.1 for one")


def load_model(path: str, cfg: Config, given: set, device: torch.device) -> dict:
    """Model file -> the model as fit() returns it, on `device`; the file's settings replace
    cfg's."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = ("file not found" if isinstance(e, FileNotFoundError)
                  else f"not a model file ({type(e).__name__})")
        raise UsageError(f"--load {path}: {reason}; make one with --save") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise UsageError(f"--load {path}: not a {MODEL_FORMAT} model file of deploy.py; make "
                         f"one with --save")
    made = blob["config"]
    for key in ("backbone", "feat_dim", "image_size", "crop_size"):  # what a model file fixes
        if key in given and getattr(cfg, key) != made[key]:
            raise UsageError(f"--load {path}: the model was made with --{key.replace('_', '-')} "
                             f"{made[key]}, not {getattr(cfg, key)}; drop the flag or retrain")
        setattr(cfg, key, made[key])
    pa.check_config(cfg)  # the sizes, now the model's
    ignored = [f"--{key.replace('_', '-')}" for key in TRAINING_ONLY
               if key in given and getattr(cfg, key) != made.get(key)]
    if ignored:
        print(f"note: --load {path}: the model was trained already, so {', '.join(ignored)} "
              f"{'is' if len(ignored) == 1 else 'are'} ignored; its own settings stay",
              flush=True)
    for key in TRAINING_ONLY:
        setattr(cfg, key, made.get(key, getattr(cfg, key)))
    made_with = blob["config"]["image_score"]
    if "image_score" in given and cfg.image_score != made_with and blob.get("threshold"):
        raise UsageError(f"--load {path}: its threshold was fitted on --image-score {made_with} "
                         f"scores, and {cfg.image_score} scores are on another scale; drop "
                         f"--image-score, or retrain with it")
    cfg.image_score = cfg.image_score if "image_score" in given else made_with
    encoder = Encoder(load_backbone(cfg.backbone, "none"), cfg.feat_dim)
    decoder = pa.Decoder(encoder.feat_dim, Encoder.stride) if "decoder" in blob else None
    try:
        encoder.load_state_dict(blob["encoder"])
        if decoder is not None:
            decoder.load_state_dict(blob["decoder"])
    except RuntimeError as e:
        raise UsageError(f"--load {path}: its networks do not fit {cfg.backbone} "
                         f"({str(e).splitlines()[0]})") from None
    return {"encoder": encoder.to(device), "bank": blob["memory_bank"].to(device),
            "decoder": None if decoder is None else decoder.to(device), "untrained": None,
            "weights": f"from {path}",
            **{key: blob.get(key) for key in KEPT}}


# ----------------------------------------------------------------------------------------------
# --predict: a folder of new images
# ----------------------------------------------------------------------------------------------
def heatmap_names(paths: list[Path], folder: Path) -> dict[Path, Path]:
    """Each image's picture under heatmaps/, relative: a/b.jpg -> a/b.png, unless two images in
    one folder share a stem (b.jpg and b.png), which then keep their whole names (b.jpg.png)."""
    rels = [p.relative_to(folder) for p in paths]
    stems = [r.with_suffix("") for r in rels]
    shared = {s for s in stems if stems.count(s) > 1}
    return {r: r.with_name(r.name + ".png") if s in shared else r.with_suffix(".png")
            for r, s in zip(rels, stems)}


class Notes:
    """One-line warnings about inputs a user cannot see a problem in, each said once."""

    def __init__(self, cfg: DeployConfig, model: dict):
        self.cfg, self.grey, self.said = cfg, model.get("grey"), set()

    def say(self, kind: str, text: str) -> None:
        if kind not in self.said:
            self.said.add(kind)
            print(f"note: {text} (said once)", flush=True)

    def check(self, path: Path, image: torch.Tensor) -> None:
        with Image.open(path) as img:
            w, h = img.size
        if min(w, h) * 2 < self.cfg.image_size:
            self.say("small", f"{path} is {w}x{h} px, under half of --image-size "
                     f"{self.cfg.image_size}: it is upscaled before scoring, so its score says "
                     f"little")
        grey = is_grey(image[None])
        if self.grey is not None and grey != self.grey:
            trained, this = ("grey", "colour") if self.grey else ("colour", "grey")
            self.say("colour", f"the model was trained on {trained} images and {path} is "
                     f"{this}: its colours alone may raise its score")


def predict_folder(cfg: DeployConfig, model: dict, folder: Path, device: torch.device,
                   out: Path) -> tuple[str, str | None]:
    """Scores every image under `folder` (recursively) into predictions.csv and one picture each
    under heatmaps/ (input | heatmap, with its score and verdict), a batch at a time: memory stays
    flat but for the CSV rows and the report's top images. An unreadable file gets a row saying
    why; the others are scored. Returns the report's section and None, or, when some files could
    not be read, the line that ends the run (exit code 2)."""
    if not folder.is_dir():
        raise UsageError(f"--predict {folder}: folder not found")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise UsageError(f"--predict {folder}: no images ({', '.join(IMAGE_EXTS)}) in or below it")
    thr, scale = model.get("threshold"), model.get("heat_scale")
    if thr is None:
        print("note: the model has no threshold (trained without held-out images), so "
              "is_anomalous stays empty; train with --holdout 0.1 for one")
    if scale is None:
        print("note: the model has no heatmap colour scale (no held-out images): each heatmap is "
              "coloured from its own lowest to its highest pixel")
    names, notes = heatmap_names(paths, folder), Notes(cfg, model)
    rows = [["path", "score", "is_anomalous", "heatmap", "error"]]
    errors, top, all_scores = {}, [], []
    progress = Progress("predict", len(paths), "img")
    for start in range(0, len(paths), cfg.batch_size):
        batch, images = paths[start:start + cfg.batch_size], []
        for p in batch:
            try:
                images.append(pa.read_image(p, cfg.image_size, cfg.crop_size))
                notes.check(p, images[-1])
            except UsageError as e:  # this file's row says why; the others are scored
                errors[p.relative_to(folder)] = str(e).removeprefix(f"{p}: ")
        scores, maps = [], []
        if images:
            scores, maps = pa.score_images(model["encoder"], model["bank"], torch.stack(images),
                                           cfg.batch_size, device, cfg.image_score, desc="")
        progress.update(len(batch))
        scored = iter(zip(scores, images, maps))
        for rel in (p.relative_to(folder) for p in batch):
            if rel in errors:
                rows.append([str(rel), "", "", "", errors[rel]])
                continue
            s, image, amap = next(scored)
            heatmap = Path("heatmaps") / names[rel]
            rows.append([str(rel), f"{s:.6f}", "" if thr is None else int(s >= thr), heatmap, ""])
            all_scores.append(float(s))
            colours = scale or report.own_scale(amap.numpy(), "this image's own range")
            caption = report.picture_caption(float(s), thr, str(rel))
            pa.save_heatmap(out / heatmap, pa.picture(
                model, image, amap, colours, device, reconstruction=False, caption=caption))
            top = sorted(top + [(float(s), str(rel), image, amap, colours)],
                         key=lambda t: -t[0])[:cfg.report_images]
    atomic_save(pa.csv_text(rows), out / "predictions.csv")
    scores = np.array(all_scores)
    flagged = ("no threshold in the model" if thr is None else
               f"{int((scores >= thr).sum())} at or above the threshold {thr:.4f}")
    print(f"predicted {len(scores)} images ({flagged}): {out / 'predictions.csv'}")
    pictures = [(pa.picture(model, image, amap, colours, device), f"{rel}: score {s:.4g}")
                for s, rel, image, amap, colours in top]
    section = report.predictions_section(str(folder), scores, thr, flagged, pictures,
                                         {str(k): v for k, v in errors.items()}, scale,
                                         model["decoder"] is not None)
    if errors:
        return section, (f"--predict {folder}: {len(errors)} of {len(paths)} files could not be "
                         f"read (the error column of {out / 'predictions.csv'} says why); the "
                         f"other {len(scores)} were scored")
    return section, None


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def output_folder(cfg: DeployConfig) -> Path:
    """--out, else runs/<what was scored>__<seed>__<time>: the model file's name when a loaded
    model scores a folder, the category otherwise. --save's file is checked with it, before any
    image is read: a model file there is kept unless --overwrite."""
    if not cfg.out and cfg.load and cfg.predict:
        cfg.out = f"runs/{Path(cfg.load).stem}__predict__{time.strftime('%Y%m%d-%H%M%S')}"
    if cfg.save:
        pa.check_writable(Path(cfg.save), "--save")
        if Path(cfg.save).exists() and not cfg.overwrite:
            raise UsageError(f"--save {cfg.save}: a file is there already; pick another name or "
                             f"pass --overwrite")
    return pa.output_folder(cfg)


def run(cfg: DeployConfig, given: set) -> list[dict]:
    """Each step the flags ask for: train with the guard (or load) and test, the results,
    --predict, report.html. Returns the records."""
    device, out, root = pa.pick_device(cfg.device), output_folder(cfg), Path(cfg.data_root)
    if cfg.synthetic:
        make_synthetic_category(root)
    model = load_model(cfg.load, cfg, given, device) if cfg.load else None
    weights = "from " + cfg.load if cfg.load else cfg.weights
    pa.print_header(cfg, device, weights)
    runs, sections, unreadable, table = [], [], None, None
    if not (cfg.load and cfg.predict):  # a loaded model with --predict only scores the folder
        layout = layout_for(cfg.dataset)
        for category, seed, data in pa.categories_and_seeds(cfg, root, layout):
            model = model if cfg.load else fit_guarded(cfg, data, seed, device)
            r, section = pa.test_run(cfg, layout, category, seed, data, model, device, out)
            runs.append(r)
            sections.append(section)
        table = pa.write_results(runs, layout, out)
        if cfg.save:  # after results.json: a failure here loses no result
            save_model(cfg.save, cfg, model)
    if cfg.predict:
        section, unreadable = predict_folder(cfg, model, Path(cfg.predict), device, out)
        sections.append(section)
    subject = cfg.predict if cfg.load and cfg.predict else cfg.category
    pa.write_report(cfg, out, subject, weights, device, table, sections)
    if unreadable:
        raise UsageError(unreadable)
    return runs


def main(argv=None) -> list[dict]:
    try:
        values, given = parse_flags(DeployConfig, argv, __doc__.split("\n")[0], EXAMPLES)
        # with --load the model file sets the sizes: checked once it is read (load_model)
        cfg = pa.make_config(values, given, DeployConfig, sizes=not values["load"])
        check_deploy(cfg)
        return run(cfg, given)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
