"""report.py: what a run of patch_ae.py shows a person beyond its printed lines: report.html,
one self-contained page per run, and the pictures (input | reconstruction | anomaly map | ground
truth) with their colour scale.

patch_ae.py runs without this file; beside it, a run writes report.html and --save-maps
pictures. It renders what a run gives it (numbers, numpy arrays, text that patch_ae.py wrote, and
a function that draws a test image's picture) and imports nothing of the project, so patch_ae.py
can import it. Inline SVG plots and JPEG pictures, no script, font or style from the network: the
page opens offline and can be mailed as one file. The PNG pictures come from here too (panels):
with a caption, each names its panels and says its score, its verdict and its colour scale.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import roc_curve

# A jet-like colour map, blue (low) to red (high), its anchors evenly spaced over [0, 1]
JET = np.array([[0, 0, .5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [.5, 0, 0]])
STYLE = """
body{font-family:sans-serif;max-width:1400px;margin:0 auto;padding:8px 16px;line-height:1.4}
h2{border-top:2px solid #ddd;padding-top:12px}
table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}
th:first-child,td:first-child{text-align:left}
.scroll{overflow-x:auto}
.plots{display:flex;flex-wrap:wrap;gap:8px 24px}
.plots svg{width:100%;max-width:640px;height:auto}
svg.bar{width:100%;max-width:640px;height:auto}
figure{display:inline-block;margin:6px 8px 6px 0;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto}
figcaption{font-size:13px}
.note{color:#555}
@media (max-width:600px){body{padding:4px 8px}th,td{padding:2px 3px;font-size:12px}}
"""


def esc(text) -> str:
    return html.escape(str(text))


# ------------------------------------------------------------------------------------------------
# The heatmaps' colour scale: where normal images' maps end
# ------------------------------------------------------------------------------------------------
HEAT_QUANTILE = 0.99  # the heatmap colours' middle: this quantile of normal images' map peaks


def heat_scale(normal_maps: np.ndarray, source: str) -> dict:
    """The heatmap colours from normal images' maps (N, S, S): 'low', their lowest pixel, and
    'mid', the HEAT_QUANTILE quantile of each map's highest pixel. colorize puts 'mid' at the
    middle of its colour map, so yellow to red is above what normal images reach."""
    peaks = normal_maps.reshape(len(normal_maps), -1).max(1)
    return {"low": float(normal_maps.min()), "mid": float(np.quantile(peaks, HEAT_QUANTILE)),
            "source": source, "quantile": HEAT_QUANTILE}


def own_scale(maps: np.ndarray, source: str = "the test set's own range") -> dict:
    """The colours when no normal image anchors them: these maps' own range, red at the top."""
    low, high = float(maps.min()), float(maps.max())
    return {"low": low, "mid": (low + high) / 2, "source": source}


def colour_scale(model: dict, maps: np.ndarray, labels: np.ndarray) -> dict:
    """The heatmap colours of a test set's pictures: the model's (from its held-out images, in
    deploy.py), else from the normal test images' maps, else the maps' own range."""
    if model.get("heat_scale") is not None:
        return model["heat_scale"]
    normal = maps[labels == 0]
    source = "the normal test images (the model has no held-out images)"
    return heat_scale(normal, source) if len(normal) else own_scale(maps)


# ------------------------------------------------------------------------------------------------
# Heatmaps: the colour rule, shared with the PNGs patch_ae.py writes
# ------------------------------------------------------------------------------------------------
def colorize(x: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 on the JET colour map."""
    pos = np.clip(x, 0, 1) * (len(JET) - 1)
    rgb = [np.interp(pos, np.arange(len(JET)), JET[:, c]) for c in range(3)]
    return (np.stack(rgb, -1) * 255).astype(np.uint8)


def heat_position(amap: np.ndarray, scale: dict) -> np.ndarray:
    """Map values -> positions on the colour map: scale['low'] at 0, scale['mid'] at the middle
    (0.5), twice as far from 'low' at 1 (red); clipped outside."""
    return (amap - scale["low"]) / max(2 * (scale["mid"] - scale["low"]), 1e-12)


def reconstruction_title(selected_epoch: int | None) -> str:
    """The reconstruction panel's name: with epoch 0 kept, the decoder is the one before
    training."""
    return "decoder before training" if selected_epoch == 0 else "reconstruction"


def panel_titles(recon: str | None, mask: bool) -> list[str]:
    """The panels' names, left to right; recon: the reconstruction panel's, None without it."""
    return ["input", *([] if recon is None else [recon]), "anomaly map",
            *(["ground truth"] if mask else [])]


def panels(image: np.ndarray, recon: np.ndarray | None, amap: np.ndarray, scale: dict,
           mask: np.ndarray | None = None, *, caption: str | None = None,
           recon_title: str = "reconstruction") -> np.ndarray:
    """(S, S*k, 3) uint8: input | reconstruction (if given) | anomaly map over the input | ground
    truth mask (if given). image, recon: (S, S, 3) uint8; amap: (S, S) float; mask: (S, S) bool.
    With a caption (picture_caption's line), the picture explains itself, as a PNG seen alone
    must: each panel's name above it (recon_title names the reconstruction's) and, below, the
    caption and the colour scale; the panels themselves unchanged, (S + strips, S*k, 3)."""
    heat = colorize(heat_position(amap, scale))
    row = [image] + ([] if recon is None else [recon])
    row.append((0.5 * image + 0.5 * heat).astype(np.uint8))
    if mask is not None:
        row.append(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2))
    pixels = np.concatenate(row, axis=1)
    if caption is None:  # report.html labels its pictures in HTML
        return pixels
    titles = panel_titles(None if recon is None else recon_title, mask is not None)
    return explained(pixels, titles, caption, scale)


def scale_ticks(scale: dict) -> list[tuple[float, str]]:
    """The colour scale's marked values, (position on the colour map in [0, 1], value as text):
    'low' at 0, 'mid' at the middle, and the value that heat_position puts at the red end."""
    low, mid = scale["low"], scale["mid"]
    return [(at, f"{v:.4g}") for at, v in ((0.0, low), (0.5, mid), (1.0, 2 * mid - low))]


def middle_text(scale: dict) -> str:
    """What the colour map's middle is, from the scale's own record: a quantile of some normal
    images' map peaks (the highest value of each blurred map), else halfway up a range. Not the
    threshold, which is a quantile of image scores, a different number."""
    if scale.get("quantile"):
        return (f"middle: the maps of {100 * scale['quantile']:g}% of {scale['source']} peak "
                f"below this value")
    return f"middle: halfway up {scale['source']}"


def ramp(width: int) -> np.ndarray:
    """The colour map from its low to its high end: (1, width, 3) uint8."""
    return colorize(np.linspace(0, 1, width))[None]


def colour_bar(scale: dict, threshold: bool) -> str:
    """The heatmaps' colour bar as inline SVG: the ramp as a PNG (no gradient id, which would
    repeat when a page holds several bars), the values at its ends and middle, what the middle
    is, and, with a threshold, that the threshold is not on this scale."""
    ticks = "".join(f'<text x="{20 + 600 * at:g}" y="46" text-anchor="{anchor}">{v}</text>'
                    for (at, v), anchor in zip(scale_ticks(scale), ("start", "middle", "end")))
    lines = [middle_text(scale)]
    if threshold:
        lines.append("the threshold applies to image scores, not to these colours")
    notes = "".join(f'<text x="320" y="{64 + 16 * k}" text-anchor="middle">{esc(line)}</text>'
                    for k, line in enumerate(lines))
    return (f'<svg class="bar" viewBox="0 0 640 {54 + 16 * len(lines)}" font-size="12" '
            f'font-family="sans-serif"><image x="20" y="8" width="600" height="22" '
            f'preserveAspectRatio="none" href="{image_uri(ramp(600), "PNG")}"/>'
            f'<line x1="320" y1="4" x2="320" y2="34" stroke="black" stroke-width="2"/>{ticks}'
            f'{notes}</svg>')


def image_uri(pixels: np.ndarray, kind: str = "JPEG") -> str:
    """(H, W, 3) uint8 -> a data: URI, JPEG for the pictures, PNG where colours must be exact."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, kind, **({"quality": 85} if kind == "JPEG" else {}))
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------------------
# Pictures that explain themselves: the PNGs' panel names, caption and colour scale, drawn in
# with Pillow's own font (no font file, no network)
# ------------------------------------------------------------------------------------------------
def flagged(score, threshold):
    """The decision rule, the one place it is written: an image is flagged when its score is at or
    above the threshold. score: a float or an array of them (then an array of bools)."""
    return score >= threshold


def verdict(score: float, threshold: float | None) -> str:
    """One image's decision in a word: 'flagged', 'normal', or 'no threshold' when there is none."""
    if threshold is None:
        return "no threshold"
    return "flagged" if flagged(score, threshold) else "normal"


def picture_caption(score: float, threshold: float | None, name: str | None = None) -> str:
    """A PNG's caption: '[name: ]flagged, score 0.412 >= threshold 0.38', '..normal, score 0.2 <
    threshold 0.38', or '..score 0.412, no threshold'."""
    if threshold is None:
        text = f"score {score:.4g}, {verdict(score, threshold)}"
    else:
        sign = ">=" if flagged(score, threshold) else "<"
        text = f"{verdict(score, threshold)}, score {score:.4g} {sign} threshold {threshold:.4g}"
    return text if name is None else f"{name}: {text}"


@functools.lru_cache(maxsize=None)
def typeface(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at px pixels; Pillow before 10.1 has only its fixed bitmap font."""
    try:
        return ImageFont.load_default(px)
    except TypeError:
        return ImageFont.load_default()


def line_height(face) -> int:
    """Pixels from one line of text to the next in this face."""
    return face.getbbox("Ag")[3] + 3


def wrapped(text: str, face, width: float) -> list[str]:
    """text in lines within width pixels, broken between words (a longer word keeps its line)."""
    lines = []
    for word in text.split(" "):
        if lines and face.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def explained(pixels: np.ndarray, titles: list[str], caption: str, scale: dict) -> np.ndarray:
    """(S, S*k, 3) panels -> (top + S + bottom, S*k, 3): a strip with each panel's title over
    it, and a strip under them with the caption, the colour ramp marked at its low, middle and
    high values, and what the middle is. Text scales with S: 1/16 of it, at least 10 px."""
    side, width = pixels.shape[:2]
    px = max(10, side // 16)
    pad, face = px // 2, typeface(px)
    heading = next((typeface(k) for k in range(px, 6, -1)  # the largest at which all fit
                    if all(typeface(k).getlength(t) <= side - 4 for t in titles)), typeface(6))
    inner = width - 2 * pad                                # the caption's and the ramp's width
    lines, about = wrapped(caption, face, inner), wrapped(middle_text(scale), face, inner)
    top, step = line_height(heading) + pad, line_height(face)
    # pad, the caption's lines, pad, the ramp (px + 2), its values' line, the middle's lines, pad
    bottom = 3 * pad + step * (len(lines) + 1 + len(about)) + px + 2
    canvas = Image.new("RGB", (width, top + side + bottom), "white")
    canvas.paste(Image.fromarray(pixels), (0, top))
    draw = ImageDraw.Draw(canvas)
    for k, title in enumerate(titles):
        draw.text((k * side + (side - heading.getlength(title)) / 2, pad / 2), title, "black",
                  heading)
    y = top + side + pad
    for line in lines:
        draw.text((pad, y), line, "black", face)
        y += step
    y += pad
    canvas.paste(Image.fromarray(np.repeat(ramp(inner), px, axis=0)), (pad, y))
    draw.line([(width // 2, y - 2), (width // 2, y + px + 1)], "black", 2)  # the middle
    y += px + 2
    for (at, value), align in zip(scale_ticks(scale), (0, 0.5, 1)):  # left, centred, right
        draw.text((pad + at * inner - align * face.getlength(value), y), value, "black", face)
    y += step
    for line in about:
        draw.text((pad, y), line, "black", face)
        y += step
    return np.asarray(canvas)


# ------------------------------------------------------------------------------------------------
# Plots: inline SVG line charts
# ------------------------------------------------------------------------------------------------
def nice_ticks(lo: float, hi: float, integer: bool = False, n: int = 5) -> list[float]:
    """About n round tick values (1, 2 or 5 times a power of ten apart) within [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1) or 1.0
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    step = max(1.0, round(step)) if integer else step
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def tick_text(v: float, step: float) -> str:
    """A tick label in plain digits, as many decimals as the step needs (never 3.3e+03)."""
    decimals = -math.floor(math.log10(step)) if step < 1 else 0
    return f"{v:.{decimals}f}"


def svg_plot(title: str, xlabel: str, series: list, marks: list = (),
             integer_x: bool = False, width: int = 640, height: int = 280) -> str:
    """A line chart: title and legend above, round ticks, plain numbers. series: [(name, xs,
    ys, colour)]; marks: [(x, label)], dashed red vertical lines labelled inside the plot, the
    x range padded so that a mark on its first value stays clear of the axis."""
    series = [(name, [float(x) for x in xs], [float(y) for y in ys], colour)
              for name, xs, ys, colour in series if len(xs)]
    if not series:
        return f"<p>{esc(title)}: nothing to draw in this run.</p>"
    xs = [x for _, sx, _, _ in series for x in sx] + [float(x) for x, _ in marks]
    ys = [y for _, _, sy, _ in series for y in sy]
    x_pad = 0.04 * (max(xs) - min(xs)) or 0.5
    y_pad = 0.06 * (max(ys) - min(ys)) or 0.5
    x0, x1, y0, y1 = min(xs) - x_pad, max(xs) + x_pad, min(ys) - y_pad, max(ys) + y_pad
    left, right, top, bottom = 64, width - 16, 44, height - 40            # the plot area

    def px(x: float) -> float:
        return left + (right - left) * (x - x0) / (x1 - x0)

    def py(y: float) -> float:
        return bottom - (bottom - top) * (y - y0) / (y1 - y0)
    out = [f'<svg viewBox="0 0 {width} {height}" font-size="12" font-family="sans-serif">'
           f'<text x="{left}" y="14" font-weight="bold">{esc(title)}</text>'
           f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
           f'fill="none" stroke="#999"/><text x="{(left + right) / 2}" y="{height - 6}" '
           f'text-anchor="middle">{esc(xlabel)}</text>']
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs), integer_x), nice_ticks(min(ys), max(ys))
    for ticks, axis in ((x_ticks, "x"), (y_ticks, "y")):
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        for t in ticks:
            if axis == "x":
                out.append(f'<text x="{px(t):.1f}" y="{bottom + 16}" text-anchor="middle">'
                           f'{tick_text(t, step)}</text>')
            else:
                out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">'
                           f'{tick_text(t, step)}</text>')
    legend_x = left
    for name, sx, sy, colour in series:
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(sx, sy))
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>'
                   f'<text x="{legend_x}" y="32" fill="{colour}">&#9644; {esc(name)}</text>')
        legend_x += 30 + 7 * len(name)  # about 6.5 px a character at 12 px, and a gap
    for x, label in marks:
        out.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{bottom}" '
                   f'stroke="red" stroke-width="2" stroke-dasharray="5 3"/>')
        if label:
            anchor = "start" if px(x) < (left + right) / 2 else "end"
            shift = 4 if anchor == "start" else -4
            out.append(f'<text x="{px(x) + shift:.1f}" y="{top + 14}" fill="red" '
                       f'text-anchor="{anchor}">{esc(label)}</text>')
    return "".join(out) + "</svg>"


def score_histogram(groups: list, threshold: float | None) -> str:
    """groups: [(name, scores, colour)] -> a step line per non-empty group on shared bins, the
    threshold marked."""
    groups = [(name, s, colour) for name, s, colour in groups if len(s)]
    values = np.concatenate([s for _, s, _ in groups]) if groups else np.zeros(1)
    edges = np.histogram_bin_edges(values, bins=24)
    series = [(f"{name} ({len(s)})", np.repeat(edges, 2)[1:-1],
               np.repeat(np.histogram(s, edges)[0], 2), colour) for name, s, colour in groups]
    marks = [] if threshold is None else [(threshold, "threshold")]
    return svg_plot("image scores: number of images", "image score", series, marks)


def html_table(header: list, rows: list, notes: list = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    foot = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>{foot}'


# ------------------------------------------------------------------------------------------------
# Galleries
# ------------------------------------------------------------------------------------------------
def gallery(title: str, entries: list, empty: str) -> str:
    """entries: [(pixels (H, W, 3) uint8, caption)]; `empty` says why there are none."""
    figures = "".join(f'<figure><img src="{image_uri(pixels)}" alt="{esc(caption)}">'
                      f'<figcaption>{esc(caption)}</figcaption></figure>'
                      for pixels, caption in entries)
    return f"<h3>{esc(title)}</h3>" + (figures or f"<p>{esc(empty)}</p>")


def galleries(labels: np.ndarray, scores: np.ndarray, threshold: float | None, names: list,
              picture: Callable[[int], np.ndarray], n: int) -> str:
    """Three galleries whose headings say what they hold: the defects that scored highest; the
    false alarms (normal images at or above the threshold) and the misses (defects below it),
    or, where there are none or no threshold, the highest-scoring normal and the lowest-scoring
    defective images under headings that say so."""
    falling = np.argsort(-scores, kind="stable")  # highest first, ties in file order
    rising = np.argsort(scores, kind="stable")    # lowest first, ties in file order
    defects, lowest_defects = [i for i in falling if labels[i]], [i for i in rising if labels[i]]
    normals = [i for i in falling if not labels[i]]

    def entries(indices):
        return [(picture(i), f"{names[i]}: {'defect' if labels[i] else 'normal'}, score "
                 f"{scores[i]:.4g}") for i in indices[:n]]
    no_defect = "None: the test set has no defective image."
    no_normal = "None: the test set has no normal image."
    parts = [gallery("Defective images that scored highest", entries(defects), no_defect)]
    if threshold is None:
        parts.append(gallery("Highest-scoring normal images (no threshold, so no false alarms "
                             "to name)", entries(normals), no_normal))
        parts.append(gallery("Lowest-scoring defective images (no threshold, so no misses to "
                             "name)", entries(lowest_defects), no_defect))
        return "".join(parts)
    alarms = [i for i in normals if flagged(scores[i], threshold)]
    misses = [i for i in lowest_defects if not flagged(scores[i], threshold)]
    if alarms:
        parts.append(gallery(f"False alarms: normal images at or above the threshold "
                             f"({len(alarms)})", entries(alarms), no_normal))
    else:
        parts.append(gallery("Highest-scoring normal images: none at or above the threshold",
                             entries(normals), no_normal))
    if misses:
        parts.append(gallery(f"Misses: defective images below the threshold ({len(misses)})",
                             entries(misses), no_defect))
    else:
        parts.append(gallery("Lowest-scoring defective images: none below the threshold",
                             entries(lowest_defects), no_defect))
    return "".join(parts)


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
def training_sentence(selected_epoch: int | None, rows: list, baselines_scored: bool) -> str:
    """One sentence on what training changed, or why the numbers are the encoder's before
    training, or why there is no change to show. rows: comparison_rows()'s, [metric, raw
    features, before training, kept, change from raw, change from before] as text;
    baselines_scored: whether this run scored them (a loaded model has none)."""
    if selected_epoch == 0:
        return ("The encoder before training was kept (epoch 0: no training, or no trained epoch "
                "beat it on validation), so every number here is that encoder's.")
    if not baselines_scored:
        return "The baselines are scored only in runs that train (this model was loaded)."
    rows = [row for row in rows if "n/a" not in row[2:4]]
    if not rows:
        return ("No metric is defined on this test set (AUROC needs normal and defective images, "
                "the pixel metrics need defect masks), so what training changed is not measured.")
    changes = [f"{name} by {to_before} points ({before} to {kept}; {to_raw} from the raw "
               f"features' {raw})" for name, raw, before, kept, to_raw, to_before in rows]
    return "Training changed " + ", ".join(changes) + "."


def run_section(r: dict, text: dict, labels: np.ndarray, scores: np.ndarray,
                baseline_scores: dict, names: list, scale: dict,
                picture: Callable[[int], np.ndarray], n: int, masks: bool,
                reconstruction: bool) -> str:
    """One category and seed. r: the run's record (results.json's); text: what patch_ae.py says
    of it ('summary', its result line; 'kept', the kept encoder's name; 'comparison', (header,
    rows) of the metrics beside the baselines'; 'f1'); labels, scores: the test images';
    baseline_scores: {name: image scores or None}; scale: the heatmap colours {low, mid, source,
    and quantile where normal maps set mid}; picture(i): test image i's panels; n: pictures per
    gallery; masks, reconstruction: whether the pictures have those panels."""
    thr, sel, kept = r["threshold"], r["selected_epoch"], text["kept"]
    curve, losses = r["validation_curve"] or [], r["loss_by_epoch"] or []
    summary = "<br>".join(esc(line) for line in text["summary"].splitlines())
    table = html_table(*text["comparison"])
    validation = [(name, [r["epoch"] for r in curve if r[key] is not None],
                   [100 * r[key] for r in curve if r[key] is not None], colour)
                  for name, key, colour in (("image AUROC", "image_auroc", "blue"),
                                            ("pixel AUROC", "pixel_auroc", "green"),
                                            ("AUPRO@30%", "pixel_aupro", "darkorange"))]
    mark = [] if sel is None else [(sel, f"selected: epoch {sel}")]
    plots = [svg_plot("validation: held-out normal images + drawn defects, %", "epoch",
                      validation, mark, integer_x=True) if curve else
             "<p>No validation curve: no image was held out (--holdout 0, the paper's "
             "protocol).</p>",
             svg_plot("training loss (Eq. 3), mean per image", "epoch",
                      [("loss", range(1, len(losses) + 1), losses, "dimgray")], mark,
                      integer_x=True)]
    normal, defect = scores[labels == 0], scores[labels == 1]
    histogram = score_histogram([("normal", normal, "green"), ("defective", defect, "red")], thr)
    roc = "<p>ROC: not defined, the test set holds one class only.</p>"
    if len(normal) and len(defect):
        curves = [(name, s, colour) for (name, s), colour in
                  zip(baseline_scores.items(), ("darkorange", "green")) if s is not None
                  and sel != 0]  # drawn first, so the kept one lies on top
        curves.append((kept, scores, "blue"))
        series = [(name, *roc_curve(labels, s)[:2], colour) for name, s, colour in curves]
        roc = svg_plot("ROC of the image scores", "false positive rate",
                       series + [("chance", [0, 1], [0, 1], "#bbb")])
    decision = ("No threshold: no normal image was held out to fit one (the paper's protocol; "
                "--holdout 0.1 gives one).")
    if thr is not None:
        alarms, misses = int(flagged(normal, thr).sum()), int((~flagged(defect, thr)).sum())
        missed = (f"misses {misses} of {len(defect)} defective images" if len(defect) else
                  "no defective test image to miss")
        decision = (f"Threshold {thr:.4g} (from the held-out normal images): flags {alarms} of "
                    f"{len(normal)} normal test images, {missed}; "
                    f"F1 {text['f1']}.")
    recon = reconstruction_title(sel) if reconstruction else None
    psnr = r.get("reconstruction_psnr")
    fidelity = ("" if psnr is None else
                f"On the normal test images it comes within {psnr:.1f} dB PSNR of the input; "
                f"the decoder learns more slowly than the features, so after few epochs, or at "
                f"a low learning rate, it may show little more than each patch's colour and "
                f"pixel noise. ")
    about = {"reconstruction": "The reconstruction is the decoder's output for that image: where "
                               "it also rebuilds the defect, the features describe it, which is "
                               "the paper's idea. " + fidelity,
             "decoder before training": "The decoder's output is flat: epoch 0 was kept, so "
                                  "the decoder has had no training step. ",
             None: ""}[recon]
    guide = (f"Each picture: {' | '.join(panel_titles(recon, masks))}"
             f"{'' if masks else ' (this test set has no masks)'}. {about}The anomaly map, over "
             f"the input, is each patch's distance to its nearest normal feature.")
    return "".join([
        f"<h2>{esc(r['category'])}, seed {esc(r['seed'])}</h2><p>{summary}</p>",
        "<h3>What training changed, against the raw features and the encoder before it</h3>",
        table,
        f"<p>{esc(training_sentence(sel, text['comparison'][1], r['untrained'] is not None))}"
        f"</p>",
        "<h3>Training</h3>", f'<div class="plots">{"".join(plots)}</div>',
        "<h3>Image scores</h3>",
        f'<div class="plots">{roc}{histogram}</div>',
        f"<p>{esc(decision)}</p>",
        f"<h3>Pictures</h3><p>{esc(guide)}</p>", colour_bar(scale, thr is not None),
        galleries(labels, scores, thr, names, picture, n)])


def predictions_section(folder: str, scores: np.ndarray, thr: float | None, flagged: str,
                        pictures: list, errors: dict, scale: dict | None,
                        reconstruction: bool) -> str:
    """--predict: the folder's score distribution, its highest-scoring images (pictures:
    [(pixels, caption)]) and every file that could not be read, with its reason."""
    unread = "".join(f"<p><b>{esc(path)}</b>: {esc(why)}</p>" for path, why in errors.items())
    titles = " | ".join(panel_titles("reconstruction" if reconstruction else None, False))
    no_decoder = "" if reconstruction else " (the model file has no decoder)"
    colours = (colour_bar(scale, thr is not None)
               if scale else "<p>Each heatmap is coloured from its own lowest to its highest "
               "pixel: the model has no held-out normal images to anchor the colours.</p>")
    return "".join([
        f"<h2>Predictions for {esc(folder)}</h2><p>{len(scores)} images scored, {esc(flagged)}; "
        f"every score in predictions.csv.</p>",
        f'<div class="plots">{score_histogram([("scored", scores, "black")], thr)}</div>',
        f"<p>Each picture: {titles}{no_decoder}.</p>", colours,
        gallery("Highest-scoring images", pictures, "None: no image could be scored."),
        "<h3>Files that could not be read</h3>", unread or "<p>None.</p>"])


def table_section(header: list, rows: list, notes: list) -> str:
    """The run's results table (patch_ae.table_cells) as an HTML table."""
    return "<h2>Results</h2>" + html_table(header, rows, notes)


def page(title: str, sections: list[str]) -> str:
    """The whole page, one self-contained HTML document (patch_ae.write_report saves it as UTF-8,
    the charset it declares)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width, initial-scale=1'><title>{esc(title)}</title><style>"
            f"{STYLE}</style></head><body><h1>{esc(title)}</h1>{''.join(sections)}</body></html>")


def size_text(n_bytes: int) -> str:
    """A file's size for a person: '800 bytes', '40 KB', '1.3 MB' (1,024 bytes a KB)."""
    if n_bytes < 1024:
        return f"{n_bytes} bytes"
    if n_bytes < 1000 * 1024:  # from 1,000 KB on, in MB: never '1024 KB'
        return f"{n_bytes / 1024:.0f} KB"
    return f"{n_bytes / 2**20:.1f} MB"
