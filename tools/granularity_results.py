"""Per-tensor vs per-channel weight step sizes, PTQ on the real weights -> docs/results-granularity.md.

    python3 tools/granularity_results.py [--checkpoint ../shared/checkpoints/mambairv2_light_x4.safetensors]
        [--rows minmax:8:8 minmax:4:8 mse:4:8 minmax:4:4] [--calib-batches 8]

For each (PTQ method, weight bits, activation bits) the float model is quantized twice, with
``--w-granularity tensor`` and ``channel``, calibrated on the same training patches as
``qmamba-deploy export`` uses (``PatchStream``, 48 px, the ``ptq`` stream), then folded into its
deploy model (what the ONNX graph computes) and scored on the built-in eval split with the
code of ``qmamba-deploy eval``. Besides Y-PSNR/SSIM it reports the weights' relative
quantization error (||ŵ − w|| / ||w|| over every quantized Linear/Conv weight).
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
from qmamba_deploy.data.datasets import STREAM_STARTS, PatchStream, load_pairs
from qmamba_deploy.data.degrade import model_degradation
from qmamba_deploy.evaluate import evaluate_model
from qmamba_deploy.fold import fold
from qmamba_deploy.jobs.quantize import ptq
from qmamba_deploy.quant import QConfig, QuantConv2d, QuantLinear

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("minmax:8:8", "minmax:4:8", "mse:4:8", "minmax:4:4")


def weight_error(model: torch.nn.Module) -> float:
    """||ŵ − w|| / ||w|| over all quantized Linear / Conv2d weights of a fake-quant model."""
    num = den = 0.0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (QuantLinear, QuantConv2d)):
                wq = m.linear_weight_quant if isinstance(m, QuantLinear) else m.conv_weight_quant
                num += float((wq(m.weight) - m.weight).pow(2).sum())
                den += float(m.weight.pow(2).sum())
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT.parent / "shared/checkpoints/mambairv2_light_x4.safetensors"))
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "docs/results-granularity.md"))
    args = ap.parse_args()

    fp = load_model(args.checkpoint)
    deg = model_degradation(fp)
    pairs = load_pairs("builtin", deg, split="eval")
    stream = PatchStream("builtin", 48, batch=1, seed=0, augment=False)
    batches = stream.take(deg, int(getattr(fp, "in_chans", 3)), args.calib_batches, start=STREAM_STARTS["ptq"])
    base = evaluate_model(fp, pairs, deg).summary
    results = []
    for row in args.rows:
        method, w, a = row.split(":")
        for granularity in ("tensor", "channel"):
            start = time.perf_counter()
            q = ptq(fp, QConfig(method, int(w), int(a), w_granularity=granularity), batches)
            deploy = fold(q)
            score = evaluate_model(deploy, pairs, deg).summary
            results.append({"method": method, "w_bits": int(w), "a_bits": int(a), "granularity": granularity,
                            "weight_rel_error": weight_error(q), **score,
                            "seconds": time.perf_counter() - start})
            print(json.dumps(results[-1]), flush=True)

    lines = [
        "# Per-tensor vs per-channel weight step sizes (PTQ, real MambaIRv2-light x4)",
        "",
        f"Produced by `python3 tools/granularity_results.py --rows {' '.join(args.rows)} --calib-batches "
        f"{args.calib_batches}` on {platform.machine()} CPU, torch {torch.__version__}. Float model: "
        f"`{Path(args.checkpoint).name}`, FP32 {base['psnr']:.2f} dB / {base['ssim']:.4f} on the built-in eval "
        "split (x4, Y channel, BasicSR conventions). Each row: the same float model, the same calibration "
        "patches, folded into the deploy model the ONNX graph computes; the scan's projections stay per tensor "
        "in both (docs/quantization.md).",
        "",
        "| method | W/A | weights | weight error ‖ŵ−w‖/‖w‖ | Y-PSNR (dB) | Δ vs FP32 | SSIM |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['method']} | W{r['w_bits']}A{r['a_bits']} | per {r['granularity']} | "
                     f"{r['weight_rel_error']:.4f} | {r['psnr']:.2f} | {r['psnr'] - base['psnr']:+.2f} | "
                     f"{r['ssim']:.4f} |")
    write_text(args.out, "\n".join(lines) + "\n")
    write_text(Path(args.out).with_suffix(".json"), json.dumps({"fp32": base, "rows": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
