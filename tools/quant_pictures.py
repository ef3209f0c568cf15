"""The pictures of docs/quantization.md: PSNR against bits per method, and one eval image cropped side by side.

    python3 tools/quant_pictures.py plot  [--out docs/img/psnr-vs-bits.svg]
    python3 tools/quant_pictures.py crops --model FP32=CKPT --model W8A8=CKPT ... [--image chelsea]
                                          [--box Y X H W] [--out docs/img/crops-x4.png]

``plot`` reads the committed results JSON (docs/results-quantization.json, results-recipe.json,
results-recipe-photos-*.json, results-spr2q.json) and draws one line per method over W2A2 / W4A4 / W8A8, with FP32 and
bicubic as horizontal references; an SVG written by hand (no plotting dependency). Points
below the axis (PTQ collapses) sit on its floor with their value printed.

``crops`` runs each checkpoint on one image of the built-in eval split (whole image,
as `qmamba-deploy eval` does), cuts the same box from the ground truth, the bicubic
baseline and every output, scales the crops 2x (nearest) and writes one PNG with a
label and the whole-image Y-PSNR under each.
"""

from __future__ import annotations

import argparse
import html
import json
import shlex
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from qmamba_deploy.artifacts import atomic_path, write_text

ROOT = Path(__file__).resolve().parents[1]
BITS = (2, 4, 8)
PHOTOS = "recipe on natural photos (QAT)"
#: (series label, results file, row filter) -- the row with the most bits wins per bit width
SERIES = [
    ("Q-MambaIR (QAT)", "results-quantization.json", lambda r: r["method"] == "qmambair"),
    # W4A4 with block features, W2A2 without (docs/quantization.md: they do not help at W2A2)
    ("recommended recipe (QAT)", "results-recipe.json", lambda r: all(
        part in r["label"] for part in ("recommended policy", "per-channel", "MSE-initialised steps"))
     and ("block features" in r["label"]) == (r["bits"] == "4/4")),
    # the same recipes with the QAT on natural photos (docs/quantization.md, "Training photos")
    *((PHOTOS, f"results-recipe-photos-{bits}.json", lambda r: "(docs/" not in r["label"])
      for bits in ("w4a4", "w2a2")),
    ("LSQ (QAT)", "results-quantization.json", lambda r: r["method"] == "lsq"),
    ("SPR²Q group, MSE bounds", "results-spr2q.json", lambda r: r["scale"] == 4 and "N = 4" in r["label"]
     and r.get("bounds_init") == "mse"),
    ("min/max PTQ", "results-quantization.json", lambda r: r["method"] == "minmax"),
]
COLOURS = ["#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#7f7f7f"]


def _bits(row: dict) -> int:
    return int(str(row.get("bits")).split("/")[0])


def series(docs: Path) -> tuple[list[tuple[str, dict[int, float]]], float, float]:
    """[(label, {bits: Y-PSNR})], FP32 and bicubic Y-PSNR of the real x4 model on the eval split."""
    lines: dict[str, dict[int, float]] = {}  # one line per label, its points from one or more files
    fp, bicubic = None, None
    for label, name, keep in SERIES:
        path = docs / name
        if not path.is_file():
            continue
        rows = json.loads(path.read_text())["rows"]
        for r in rows:
            if r["label"] == "FP32" and r.get("scale", 4) == 4:
                fp, bicubic = r["psnr"], r.get("psnr_baseline", bicubic)
        points = {_bits(r): r["psnr"] for r in rows if r["label"] != "FP32" and keep(r) and _bits(r) in BITS}
        if points:
            lines.setdefault(label, {}).update(points)
    if fp is None or bicubic is None:
        raise SystemExit(f"no FP32 row with its bicubic baseline in {docs}/results-*.json")
    return list(lines.items()), fp, bicubic


def plot_svg(lines: list[tuple[str, dict[int, float]]], fp: float, bicubic: float, floor: float = 24.0) -> str:
    w, h, left, right, top, bottom = 640, 400, 60, 230, 20, 50
    top_db = float(np.ceil(fp + 0.5))

    def x(bits: int) -> float:
        return left + (BITS.index(bits) + 0.5) * (w - left - right) / len(BITS)

    def y(db: float) -> float:
        return top + (top_db - max(db, floor)) / (top_db - floor) * (h - top - bottom)

    e = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
         f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>']
    for db in np.arange(floor, top_db + 0.01, 1.0):
        e.append(f'<line x1="{left}" x2="{w - right}" y1="{y(db):.1f}" y2="{y(db):.1f}" stroke="#e5e5e5"/>'
                 f'<text x="{left - 6}" y="{y(db) + 4:.1f}" text-anchor="end">{db:.0f}</text>')
    for bits in BITS:
        e.append(f'<text x="{x(bits):.1f}" y="{h - bottom + 18}" text-anchor="middle">W{bits}A{bits}</text>')
    e.append(f'<text x="{(left + w - right) / 2:.1f}" y="{h - 10}" text-anchor="middle">bits (weights / '
             f'activations)</text><text x="14" y="{(top + h - bottom) / 2:.1f}" text-anchor="middle" '
             f'transform="rotate(-90 14 {(top + h - bottom) / 2:.1f})">Y-PSNR (dB), real MambaIRv2-light x4</text>')
    for label, db, dash in (("FP32", fp, "6,3"), ("bicubic", bicubic, "2,3")):
        e.append(f'<line x1="{left}" x2="{w - right}" y1="{y(db):.1f}" y2="{y(db):.1f}" stroke="black" '
                 f'stroke-dasharray="{dash}"/><text x="{w - right + 4}" y="{y(db) + 4:.1f}">{label} {db:.2f}</text>')
    for i, (label, points) in enumerate(lines):
        colour = COLOURS[i % len(COLOURS)]
        xs = sorted(points)
        e.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                 + " ".join(f"{x(b):.1f},{y(points[b]):.1f}" for b in xs) + '"/>')
        for b in xs:
            e.append(f'<circle cx="{x(b):.1f}" cy="{y(points[b]):.1f}" r="3.5" fill="{colour}"/>')
            if points[b] < floor:
                e.append(f'<text x="{x(b) + 6:.1f}" y="{y(points[b]) - 6:.1f}" fill="{colour}">'
                         f'{points[b]:.1f}</text>')
        ly = top + 60 + i * 18
        e.append(f'<line x1="{w - right + 4}" x2="{w - right + 24}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                 f'stroke-width="2"/><text x="{w - right + 28}" y="{ly + 4}">{html.escape(label)}</text>')
    e.append("</svg>")
    return "\n".join(e) + "\n"


def crops(models: list[tuple[str, str]], image: str, box: tuple[int, int, int, int],
          zoom: int = 2) -> tuple[np.ndarray, list[tuple[str, float | None]]]:
    from qmamba_deploy import load_model
    from qmamba_deploy.data.datasets import degrade_pair, load_pairs, to_tensor
    from qmamba_deploy.data.degrade import model_degradation
    from qmamba_deploy.evaluate import score_image, to_uint8_image

    first = load_model(models[0][1])
    deg = model_degradation(first)
    pairs = [p for p in load_pairs("builtin", deg, split="eval") if p.name.startswith(image)]
    if not pairs:
        raise SystemExit(f"--image {image}: not an image of the built-in eval split")
    pair = pairs[0]
    lq = degrade_pair(pair, deg)
    bicubic = deg.baseline(lq)
    y0, x0, hh, ww = box
    panels = [("ground truth", pair.gt, None), ("bicubic", bicubic, score_image(bicubic, pair.gt, bicubic, pair.name,
                                                                               lq.shape[:2], deg.crop_border).psnr)]
    for label, path in models:
        model = first if path == models[0][1] else load_model(path)
        with torch.no_grad():
            out = to_uint8_image(model.eval()(to_tensor(lq)))
        panels.append((label, out, score_image(out, pair.gt, bicubic, pair.name, lq.shape[:2], deg.crop_border).psnr))
    tiles = []
    for label, img, psnr in panels:
        crop = cv2.resize(img[y0:y0 + hh, x0:x0 + ww], (ww * zoom, hh * zoom), interpolation=cv2.INTER_NEAREST)
        tile = np.full((crop.shape[0] + 40, crop.shape[1] + 8, 3), 255, np.uint8)
        tile[4:4 + crop.shape[0], 4:4 + crop.shape[1]] = crop
        cv2.putText(tile, label, (6, crop.shape[0] + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        if psnr is not None:
            cv2.putText(tile, f"{psnr:.2f} dB", (6, crop.shape[0] + 36), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                        cv2.LINE_AA)
        tiles.append(tile)
    return np.concatenate(tiles, axis=1), [(label, psnr) for label, _, psnr in panels]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("plot")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--out", default=str(ROOT / "docs/img/psnr-vs-bits.svg"))
    c = sub.add_parser("crops")
    c.add_argument("--model", action="append", required=True, help="LABEL=CHECKPOINT, in panel order")
    c.add_argument("--image", default="chelsea")
    c.add_argument("--box", type=int, nargs=4, default=(96, 96, 96, 96), metavar=("Y", "X", "H", "W"))
    c.add_argument("--out", default=str(ROOT / "docs/img/crops-x4.png"))
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.what == "plot":
        lines, fp, bicubic = series(Path(args.docs))
        write_text(out, plot_svg(lines, fp, bicubic))
    else:
        models = []
        for spec in args.model:
            label, sep, path = spec.partition("=")
            if not sep or not Path(path).is_file():
                raise SystemExit(f"--model {spec}: use LABEL=CHECKPOINT with an existing checkpoint file")
            models.append((label, path))
        rgb, scores = crops(models, args.image, tuple(args.box))
        ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise SystemExit(f"--out {out}: could not encode the PNG")
        with atomic_path(out) as tmp:
            tmp.write_bytes(png.tobytes())
        write_text(out.with_suffix(".txt"),
            "python3 tools/quant_pictures.py " + shlex.join(sys.argv[1:]) + "\n\n"
            + "".join(f"{label}: {'' if p is None else f'{p:.4f} dB Y-PSNR (whole image)'}\n" for label, p in scores))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
