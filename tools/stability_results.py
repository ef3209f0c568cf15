"""Where quantized MambaIRv2-light x4 models lose float stability -> docs/results-stability.md (+ JSON).

    python3 tools/stability_results.py [--model LABEL=CHECKPOINT ...] [--out docs/results-stability.md]

Each model is folded as `qmamba-deploy export` folds it (static DLS; a float checkpoint gets W8A8 min/max
PTQ) and run on the built-in eval images in float32 and float64 (`jobs.diagnose`, what `validate
--diagnose` prints): the PSNR between the two outputs per image, how many activation codes and routing
decisions flip, where the first flips happen, and which kinds of sites flip most. Defaults: the real x4
weights in FP32 and W8A8, and the LSQ W4A4 QAT checkpoints of docs/results-granularity.md when present.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import torch

from qmamba_deploy.artifacts import write_text
from qmamba_deploy.data.datasets import load_pairs
from qmamba_deploy.data.degrade import Degradation
from qmamba_deploy.fold import with_dls_mode
from qmamba_deploy.jobs.diagnose import NEAR, diagnose
from qmamba_deploy.jobs.export import DeployConfig, deploy_model

ROOT = Path(__file__).resolve().parents[1]
X4 = ROOT.parent / "shared/checkpoints/mambairv2_light_x4.safetensors"
DEFAULTS = [("FP32", str(X4), "none"), ("W8A8 min/max PTQ", str(X4), "minmax"),
            ("W4A4 LSQ QAT, per-tensor weights", str(ROOT / "runs/granularity/lsq_w4a4_tensor/model.safetensors"), ""),
            ("W4A4 LSQ QAT, per-channel weights", str(ROOT / "runs/granularity/lsq_w4a4_channel/model.safetensors"),
             "")]


def db(values) -> str:
    return ", ".join("identical" if math.isinf(p) else f"{p:.1f}" for p in values)


def signed(values) -> str:
    return ", ".join(f"{v:+.3f}" for v in values)


def kind_of(site: str) -> str:
    """'layers.1.residual_group.layers.3.assm.selectiveScan.xs_q' -> 'assm.selectiveScan.xs_q'."""
    return re.sub(r"^layers\.\d+\.residual_group\.layers\.\d+\.", "", re.sub(r"^layers\.\d+\.(?=conv)", "", site))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=CHECKPOINT",
                    help="a quantized (or float, then W8A8 PTQ) checkpoint; repeatable (default: see above)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results-stability.md")
    ap.add_argument("--first", type=int, default=6, help="first sites with flips listed per model")
    args = ap.parse_args()
    models = [(m.split("=", 1)[0], m.split("=", 1)[1], "minmax") for m in args.model] or \
        [(label, path, method) for label, path, method in DEFAULTS if Path(path).is_file()]
    deg = Degradation("sr", 4)
    pairs = load_pairs("builtin", deg, split="eval")
    results = []
    for label, path, method in models:
        cfg = DeployConfig(checkpoint=path, method=method) if method else DeployConfig(checkpoint=path)
        deploy, _ = deploy_model(cfg)
        report = diagnose(with_dls_mode(deploy, "static"), pairs, deg)
        results.append((label, path, report))
        print(label, [round(p, 2) for p in report.psnr_between], flush=True)

    lines = ["# Float stability of quantized MambaIRv2-light x4: where codes flip", "",
             f"Produced by `{shlex.join(['python3', 'tools/stability_results.py', *sys.argv[1:]])}` on "
             f"{platform.machine()} CPU, "
             f"torch {torch.__version__}. "
             "Deploy models as `export` folds them (static DLS); the built-in eval images at x4 (72 px LR inputs), "
             "each run in float32 and in float64 (`jobs.diagnose`, which `qmamba-deploy validate --diagnose` "
             "prints). A flip is an activation code or a routing decision that differs between the two runs; "
             f"'near' counts float64 values within {NEAR:g} of a step from a rounding boundary (or routing "
             "log-probabilities that tie within it).", "",
             "| model | PSNR float32 vs float64, per image (dB) | activation codes flipped | quantizers with flips | "
             "routing decisions changed |", "|---|---|---:|---:|---:|"]
    for label, _, r in results:
        acts = [s for s in r.sites if s.kind == "act"]
        routes = [s for s in r.sites if s.kind == "route"]
        lines.append(f"| {label} | {db(r.psnr_between)} | {sum(s.flips for s in acts):,} of "
                     f"{sum(s.values for s in acts):,} | {sum(1 for s in acts if s.flips)} of {len(acts)} | "
                     f"{sum(s.flips for s in routes):,} of {sum(s.values for s in routes):,} |")
    lines += ["", "Three controls per image (`jobs.diagnose`): the float32 run again with every activation code and "
              "routing decision taken from the float64 run (what float rounding between the quantizers leaves), the "
              "same with only the routing decisions held, and "
              "the float64 run again with ONE code flipped — the value nearest a rounding boundary at the first "
              "quantizer, the smallest disagreement two runtimes can have — against the unflipped float64 run.", "",
              "| model | PSNR float32 vs float64, free (dB) | with codes and routing held (dB) | with routing held "
              "(dB) | one flipped code: PSNR (dB) | one flipped code: codes flipped after it | its distance from the "
              "boundary (steps) |", "|---|---|---|---|---|---|---|"]
    shifts = ["", "What that disagreement does to each image's score (Y-PSNR against the ground truth, as `eval` "
              "scores it): float32's minus float64's, and the one-flip run's minus the unflipped run's. A per-image "
              "check that another runtime scores within a tolerance of the reference can only be as tight as "
              "what one flipped code moves.", "",
              "| model | Y-PSNR shift, float32 − float64 (dB) | Y-PSNR shift, one flipped code (dB) | largest of "
              "either (dB) |", "|---|---|---|---:|"]
    for label, _, r in results:
        if not r.one_flip:
            continue
        lines.append(f"| {label} | {db(r.psnr_between)} | {db(r.codes_held)} | {db(r.routing_held)} | "
                     f"{db(f.psnr for f in r.one_flip)} | "
                     f"{', '.join(f'{f.codes_flipped:,}' for f in r.one_flip)} | "
                     f"{', '.join(f'{f.distance:.0e}' for f in r.one_flip)} |")
        moved = [*r.quality_shift, *(f.quality_shift for f in r.one_flip)]
        shifts.append(f"| {label} | {signed(r.quality_shift)} | {signed(f.quality_shift for f in r.one_flip)} | "
                      f"{max(map(abs, moved)):.3f} |")
    lines += shifts
    for label, _, r in results:
        first = r.first_flips[:args.first]
        if not first:
            continue
        lines += ["", f"## {label}", "", f"First sites with flips, in forward order (of {len(r.sites)} sites):", "",
                  "| # | site | flips | of | near a boundary |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {s.order} | `{s.site}` | {s.flips:,} | {s.values:,} | {s.near_boundary:,} |" for s in first]
        by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for s in r.sites:
            k = by_kind[kind_of(s.site)]
            k[0] += s.flips
            k[1] += s.values
            k[2] += s.near_boundary
            k[3] += 1
        lines += ["", "Flips by kind of site (every block together), most first:", "",
                  "| kind of site | sites | flips | of | flipped share | near a boundary |",
                  "|---|---:|---:|---:|---:|---:|"]
        for kind, (flips, values, near, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0] / kv[1][1]):
            if flips:
                lines.append(f"| `{kind}` | {count} | {flips:,} | {values:,} | {flips / values:.3%} | {near:,} |")
    lines.append("")
    write_text(args.out, "\n".join(lines))
    write_text(args.out.with_suffix(".json"), json.dumps(
        [{"label": label, "checkpoint": path, **r.as_dict()} for label, path, r in results], indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
