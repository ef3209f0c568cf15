"""Score the real MambaIRv2-light weights against bicubic on ../shared/images.

    python3 tools/eval_real_weights.py [--images ../shared/images] [--checkpoints ../shared/checkpoints] \
        [--out docs/results-real-weights.md]

LR made with MATLAB-bicubic (antialiased) and rounded to uint8; Y-PSNR/SSIM with
crop_border = scale (BasicSR conventions, see qmamba_deploy.evaluate).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from qmamba_deploy import load_model
from qmamba_deploy.artifacts import write_text
from qmamba_deploy.data.datasets import load_pairs
from qmamba_deploy.data.degrade import Degradation
from qmamba_deploy.evaluate import evaluate_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "images"))
    ap.add_argument("--checkpoints", default=str(ROOT.parent / "shared" / "checkpoints"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results-real-weights.md"))
    args = ap.parse_args()

    rows = []
    for scale in (2, 4):
        model = load_model(Path(args.checkpoints) / f"mambairv2_light_x{scale}.safetensors")
        deg = Degradation("sr", scale)
        for pair in load_pairs(args.images, deg):
            t0 = time.perf_counter()
            (score,) = evaluate_model(model, [pair], deg).scores
            rows.append({**score.as_dict(), "scale": scale, "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]))
    lines = [
        "# Real MambaIRv2-light weights vs bicubic",
        "",
        "Produced by `python3 tools/eval_real_weights.py` on "
        f"{platform.processor() or platform.machine()} "
        f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "Deterministic routing (argmax + stable counting sort); LR = MATLAB-bicubic downscale "
        "(antialiased) rounded to uint8; Y-PSNR / SSIM with crop_border = scale (BasicSR conventions).",
        "",
        "| scale | image | LR size | Y-PSNR model | SSIM model | Y-PSNR bicubic | SSIM bicubic | gain (dB) | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| x{r['scale']} | {r['image']} | {r['input_size'][1]}x{r['input_size'][0]} | {r['psnr']:.4f} | "
                     f"{r['ssim']:.4f} | {r['psnr_baseline']:.4f} | {r['ssim_baseline']:.4f} | "
                     f"{r['gain_db']:+.2f} | {r['seconds']:.1f} |")
    lines += ["", "Reference (checkpoints/README.md, official code + BasicSR): example.png x2 33.0933 / 0.9277 vs "
              "bicubic 29.9143 / 0.8853; x4 29.3833 / 0.8275 vs 25.5842 / 0.7433.", ""]
    write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
