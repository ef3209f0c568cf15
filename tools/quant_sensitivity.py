"""How much a quantized MambaIRv2 amplifies float noise -> docs/results-sensitivity.md.

    python3 tools/quant_sensitivity.py [--qmambair runs/quant/.../model.safetensors]

For the real MambaIRv2-light x4 weights in FP32, W8A8 minmax PTQ and W4A4 Q-MambaIR (the
QAT checkpoint of docs/results-quantization.md), each folded as `qmamba-deploy export` folds
it (static DLS), every built-in eval image is run as it is and then: with every input value
moved by one ulp (`torch.nextafter`), moved by a relative 1e-7, and with the whole model in
float64. The table gives the PSNR between the outputs and how many routing decisions
(argmax over the prompts, every ASSM, every token) changed. The float64 row is the floor
`qmamba-deploy validate` measures: two float32 runtimes that sum in different orders cannot
agree better than this.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
from pathlib import Path

import torch

from qmamba_deploy.artifacts import write_text
from qmamba_deploy.data.datasets import degrade_pair, load_pairs, to_tensor
from qmamba_deploy.data.degrade import Degradation
from qmamba_deploy.fold import with_dls_mode
from qmamba_deploy.jobs.export import DeployConfig, deploy_model
from qmamba_deploy.metrics import psnr_between

ROOT = Path(__file__).resolve().parents[1]


def _routes(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    seen: list[torch.Tensor] = []
    hooks = [m.route.register_forward_hook(lambda mod, i, out: seen.append(out.argmax(-1)))
             for m in model.modules() if hasattr(m, "route") and isinstance(m.route, torch.nn.Module)]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    return y, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT.parent / "shared/checkpoints/mambairv2_light_x4.safetensors"))
    ap.add_argument("--qmambair", default=str(ROOT / "runs/quant/mambairv2_light_x4_qmambair_w4a4/model.safetensors"))
    ap.add_argument("--out", default=str(ROOT / "docs/results-sensitivity.md"))
    args = ap.parse_args()

    configs = [("FP32", DeployConfig(checkpoint=args.checkpoint, method="none")),
               ("W8A8 minmax PTQ", DeployConfig(checkpoint=args.checkpoint, method="minmax"))]
    if Path(args.qmambair).is_file():
        configs.append(("W4A4 Q-MambaIR (static DLS)", DeployConfig(checkpoint=args.qmambair)))
    deg = Degradation("sr", 4)
    pairs = load_pairs("builtin", deg, split="eval")
    rows = []
    for label, cfg in configs:
        deploy, _ = deploy_model(cfg)
        model = with_dls_mode(deploy, "static")
        model64 = copy.deepcopy(model).double()
        for pair in pairs:
            x = to_tensor(degrade_pair(pair, deg, 0))
            y0, r0 = _routes(model, x)
            for nudge, m, x1 in (("input + one ulp", model, torch.nextafter(x, torch.full_like(x, math.inf))),
                                 ("input x (1 + 1e-7)", model, x * (1 + 1e-7)),
                                 ("float64 arithmetic", model64, x.double())):
                y1, r1 = _routes(m, x1)
                y1 = y1.float()
                flips = sum(int((a != b).sum()) for a, b in zip(r0, r1))
                total = sum(a.numel() for a in r0)
                rows.append((label, pair.name, nudge, psnr_between(y0, y1), flips, total))
                print(rows[-1], flush=True)
    lines = ["# Sensitivity of quantized MambaIRv2-light x4 to float noise", "",
             f"Produced by `python3 tools/quant_sensitivity.py` on {platform.processor() or platform.machine()} CPU "
             f"({torch.get_num_threads()} threads), torch {torch.__version__}. Deploy models as `export` folds them "
             "(static DLS); the built-in eval images, x4 (72 px LR inputs).", "",
             "| model | image | second run | PSNR between the outputs (dB) | routing decisions changed |",
             "|---|---|---|---|---|"]
    for label, image, nudge, p, flips, total in rows:
        ptxt = "identical" if math.isinf(p) else f"{p:.2f}"
        lines.append(f"| {label} | {image} | {nudge} | {ptxt} | {flips:,} of {total:,} |")
    lines.append("")
    write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
