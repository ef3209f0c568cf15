"""SPR²Q ablation on the real MambaIRv2-light weights -> docs/results-spr2q.md.

    python3 tools/spr2q_results.py [--scales 4 2] [--iters 40] [--route-iters 20] [--runs runs/spr2q]

Rows per scale, all with the same Q_{a,b} quantizer and the same stated budget:
W4A4 and W2A2 plain PTQ, the bounds trained alone (same budget, no
rectifier: separates the rectifiers' gain from the bounds'), + one rectifier
(PQFR), + a group of 4 with static routing; at W4A4 also groups of 2 and 8. Each row runs
`qmamba_deploy.jobs.quantize.quantize_spr2q` (what `qmamba-deploy quantize
--method spr2q` runs) and is scored on the built-in eval split like
`qmamba-deploy eval`. Finished rows are reused.
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
from qmamba_deploy.jobs.quantize import SPR2QConfig, quantize_spr2q

ROOT = Path(__file__).resolve().parents[1]

#: (bits, variant, group size)
ROWS = [(4, "plain", 1), (4, "bounds", 1), (4, "single", 1), (4, "group", 2), (4, "group", 4), (4, "group", 8),
        (2, "plain", 1), (2, "bounds", 1), (2, "single", 1), (2, "group", 4)]
LABEL = {"plain": "plain PTQ (calibrated bounds)", "bounds": "bounds trained, no rectifier",
         "single": "+ single rectifier (PQFR)", "group": "+ group, static routing"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--checkpoints", default=str(ROOT.parent / "shared/checkpoints"))
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--route-iters", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--runs", default=str(ROOT / "runs/spr2q"))
    ap.add_argument("--out", default=str(ROOT / "docs/results-spr2q.md"))
    args = ap.parse_args()

    results = []
    for scale in args.scales:
        ckpt = Path(args.checkpoints) / f"mambairv2_light_x{scale}.safetensors"
        fp = load_model(ckpt)
        deg = Degradation("sr", scale)
        pairs = load_pairs("builtin", deg, split="eval")
        fp_score = evaluate_model(fp, pairs, deg).summary
        results.append({"scale": scale, "label": "FP32", "bits": 32, **fp_score})
        print(json.dumps(results[-1]), flush=True)
        for bits, variant, group in ROWS:
            run = Path(args.runs) / f"x{scale}_w{bits}a{bits}_{variant}{group if variant == 'group' else ''}"
            cfg = SPR2QConfig(arch=fp.card.arch, kwargs=dict(fp.card.kwargs), task="sr", scale=scale, data="builtin",
                              val_data=None, patch=args.patch, batch=args.batch, iters=args.iters, lr=args.lr,
                              device="cpu", checkpoint=str(ckpt), w_bits=bits, a_bits=bits,
                              calib_batches=args.calib_batches, rank=args.rank, group_size=group,
                              route_iters=args.route_iters, variant=variant)
            t0 = time.perf_counter()
            if not (run / "model.safetensors").is_file():
                quantize_spr2q(cfg, run, command=f"tools/spr2q_results.py ({run.name})")
            seconds = time.perf_counter() - t0
            score = evaluate_model(load_model(run / "model.safetensors"), pairs, deg).summary
            label = LABEL[variant] + (f", N = {group}" if variant == "group" else "")
            results.append({"scale": scale, "label": f"W{bits}A{bits} {label}", "bits": bits, **score,
                            "seconds_this_run": seconds, "fp_psnr": fp_score["psnr"]})
            print(json.dumps(results[-1]), flush=True)

    lines = [
        "# SPR²Q results",
        "",
        f"Produced by `python3 tools/spr2q_results.py --iters {args.iters} --route-iters {args.route_iters}` on "
        f"{platform.processor() or platform.machine()} "
        f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}.",
        "",
        "- **Models**: the real MambaIRv2-light weights (`../shared/checkpoints`).",
        "- **Quantizer**: Q_{a,b} (learnable clipping bounds, min/max initialised on the first of "
        f"{args.calib_batches} calibration batches) on every quantized layer's input and weight and on every scan "
        "operand, W = A bits; placement as in docs/quantization.md.",
        f"- **Budget** (every row the same): {args.iters} group-training iterations (Adam lr {args.lr:g}, cosine, "
        f"hybrid loss = L1 to the FP output + 1.0 x block feature MSE, batch {args.batch}, {args.patch}x{args.patch} "
        f"LR patches from the built-in train split), then {args.route_iters} iterations of static routing "
        f"calibration (groups only), then fusion; rank {args.rank}. The paper trains 12k iterations on DF2K: "
        "this is a CPU-sized budget.",
        "- **Scores**: Y-PSNR/SSIM on the built-in eval split, BasicSR conventions.",
        "",
        "| scale | configuration | Y-PSNR | SSIM | Δ PSNR vs FP32 |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        delta = r["psnr"] - r.get("fp_psnr", r["psnr"])
        lines.append(f"| x{r['scale']} | {r['label']} | {r['psnr']:.4f} | {r['ssim']:.4f} | {delta:+.3f} |")
    lines.append("")
    write_text(args.out, "\n".join(lines))
    write_text(Path(args.out).with_suffix(".json"), json.dumps({"args": vars(args), "rows": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
