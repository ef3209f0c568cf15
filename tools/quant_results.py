"""Quality of every quantization method at W8A8 / W4A4 / W2A2 -> docs/results-quantization.md.

    python3 tools/quant_results.py [--checkpoint ../shared/checkpoints/mambairv2_light_x4.safetensors]
        [--iters 150] [--runs runs/quant] [--out docs/results-quantization.md]

Each row runs `qmamba_deploy.jobs.quantize.quantize` (what `qmamba-deploy
quantize` runs) on the built-in train split (or --data's folder, e.g. the one
tools/natural_photos.py writes) with the same budget for every QAT method,
then scores the result on the built-in eval split with the same code as
`qmamba-deploy eval`. Finished runs are reused (delete the run folder
to redo one); an interrupted QAT run resumes.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from qmamba_deploy import load_model
from qmamba_deploy.artifacts import write_text
from qmamba_deploy.data.builtin import eval_photo_in_file
from qmamba_deploy.data.datasets import load_pairs
from qmamba_deploy.data.degrade import Degradation
from qmamba_deploy.data.io import list_images
from qmamba_deploy.errors import ImageError
from qmamba_deploy.evaluate import evaluate_model
from qmamba_deploy.jobs.quantize import QuantizeConfig, qat_start, quantize
from qmamba_deploy.jobs.sensitivity import read_policy
from qmamba_deploy.train.losses import SCHEDULES

ROOT = Path(__file__).resolve().parents[1]
#: the recommended precision policy's file (docs/); rows with another --policy file name theirs
RECOMMENDED_POLICY = "results-layer-sensitivity.json"

#: (method, w_bits, a_bits) in table order
ROWS = [("minmax", 8, 8), ("percentile", 8, 8),
        ("minmax", 4, 4), ("lsq", 4, 4), ("qmambair", 4, 4), ("dls", 4, 4), ("rfa", 4, 4),
        ("lsq", 2, 2), ("qmambair", 2, 2)]


def mean_of(runs: list[dict]) -> dict:
    """One row from one run per seed: the mean of every number the runs share (PSNR, SSIM, seconds, ...)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"]
    return {k: sum(r[k] for r in runs) / len(runs) for k in keys}


def check_reuse(run: Path, cfg: QuantizeConfig) -> None:
    """A finished run folder is reused only when it was trained with ``cfg`` (one sentence naming what differs)."""
    try:
        old = json.loads((run / "model.json").read_text())["provenance"]["config"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        raise SystemExit(f"{run}: a finished run without a readable model.json; delete the folder to redo it") from None
    new = json.loads(json.dumps(cfg.as_dict()))
    defaults = json.loads(json.dumps(QuantizeConfig(checkpoint="x").as_dict()))
    differ = sorted(k for k in new if k not in ("save_every", "checkpoint") and old.get(k, defaults.get(k)) != new[k])
    if differ:
        raise SystemExit(f"{run} was trained with other settings ({', '.join(f'{k}={old.get(k)!r}' for k in differ)}"
                         f"); delete it or pass another --runs folder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT.parent / "shared/checkpoints/mambairv2_light_x4.safetensors"))
    ap.add_argument("--iters", type=int, default=150, help="QAT iterations per method")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, nargs="+", default=[0],
                    help="seed of the training patches, the Gumbel noise and the init; several: each row runs once per "
                         "seed and the table shows their mean and each seed's difference from FP32")
    ap.add_argument("--schedule", choices=SCHEDULES, default="multistep",
                    help="learning-rate schedule (multistep: halved at 50/80/90/95 %% of the run)")
    ap.add_argument("--quant-lr", type=float, default=None, help="learning rate of quantizer parameters (default --lr)")
    ap.add_argument("--data", default="builtin",
                    help="training and calibration images: 'builtin' (the built-in train split) or a folder of HR "
                         "images (keep the eval photos out of it)")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--ema", type=float, default=0.0, help="decay of an exponential moving average of the QAT "
                                                            "parameters shipped instead of the last ones (0: off)")
    ap.add_argument("--rows", nargs="*",
                    help="only these rows, e.g. qmambair:4:4; a fourth field changes the recipe: 'policy' "
                         "(--policy's precision policy), 'distill' (--distill's weight of L1 to the float model's "
                         "output), 'features' (--distill-features's weight of the float model's block outputs), "
                         "'noise' (--margin-noise's perturbation of the activation quantizers' inputs), "
                         "'qdrop' (--qdrop's fraction of activations left in float during training), "
                         "'channel' (per-channel weights), 'mse' (steps start at the MSE-optimal "
                         "step, --step-init mse), or several joined by '+', e.g. "
                         "qmambair:4:4:policy+channel")
    ap.add_argument("--policy", help="a precision policy file (qmamba-deploy sensitivity --json) for 'policy' rows")
    ap.add_argument("--distill", type=float, default=0.5, help="teacher weight of 'distill' rows")
    ap.add_argument("--distill-features", type=float, default=1.0,
                    help="weight of the block feature-alignment term of 'features' rows (1: the recommended W4A4 "
                         "recipe)")
    ap.add_argument("--margin-noise", type=float, default=0.5,
                    help="width of 'noise' rows' perturbation of activation quantizer inputs, in steps")
    ap.add_argument("--qdrop", type=float, default=0.5,
                    help="fraction of activations 'qdrop' rows leave in float in training forwards")
    ap.add_argument("--beside", type=Path, action="append", default=[],
                    help="an earlier results JSON of this tool: its rows whose label matches one of --beside-rows "
                         "are listed beside the new ones, marked with the file's name")
    ap.add_argument("--beside-rows", nargs="*", default=["W4A4 qmambair", "W2A2 qmambair"])
    ap.add_argument("--start", action="store_true",
                    help="score each QAT row where its training starts (quantizers initialised on the calibration "
                         "batches, no step taken) instead of training it")
    ap.add_argument("--runs", default=str(ROOT / "runs/quant"))
    ap.add_argument("--out", default=str(ROOT / "docs/results-quantization.md"))
    args = ap.parse_args()

    if args.data != "builtin":  # a table scored on its own training images would mean nothing
        try:
            leaks = [(path, eval_photo_in_file(path)) for path in list_images(args.data)]
        except ImageError as exc:
            raise SystemExit(f"--data: {exc}") from None
        for path, leak in leaks:
            if leak:
                raise SystemExit(f"--data {args.data} holds {path.name}, the eval photo {leak}; take it out of the "
                                 f"folder (tools/natural_photos.py builds one without)")
    fp = load_model(args.checkpoint)
    deg = Degradation("sr", int(fp.upscale))
    pairs = load_pairs("builtin", deg, split="eval")
    if args.rows:
        rows = [(f[0], int(f[1]), int(f[2]), f[3] if len(f) > 3 else "") for f in (r.split(":") for r in args.rows)]
    else:
        rows = [(m, w, a, "") for m, w, a in ROWS]
    policy = read_policy(args.policy) if args.policy else None
    if any("policy" in v.split("+") for *_, v in rows) and policy is None:
        raise SystemExit("'policy' rows need --policy FILE")
    results = [{"label": "FP32", "method": "float", "bits": "32/32", "qat": False,
                **evaluate_model(fp, pairs, deg).summary, "seconds": 0.0}]
    print(json.dumps(results[-1]), flush=True)
    seeds = list(dict.fromkeys(args.seed))
    for method, w, a, variant in rows:
        extra: dict = {}
        for part in filter(None, variant.split("+")):
            if part == "policy":
                extra.update(overrides=tuple(tuple(o) for o in policy["overrides"]), keep_fp=tuple(policy["keep_fp"]))
            elif part == "distill":
                extra.update(distill=args.distill)
            elif part == "features":
                extra.update(distill_features=args.distill_features)
            elif part == "noise":
                extra.update(margin_noise=args.margin_noise)
            elif part == "qdrop":
                extra.update(qdrop=args.qdrop)
            elif part == "channel":
                extra.update(w_granularity="channel")
            elif part == "mse":
                extra.update(step_init="mse")
            else:
                raise SystemExit(f"row variant {part!r} is unknown; use policy, distill, features, noise, qdrop, "
                                 f"channel, mse or several joined by '+'")
        names = {"policy": "recommended policy" if Path(args.policy or "").name == RECOMMENDED_POLICY
                 else f"policy {Path(args.policy or '').name}", "distill": f"distill {args.distill:g}",
                 "features": f"block features {args.distill_features:g}",
                 "noise": f"margin noise {args.margin_noise:g}", "qdrop": f"QDrop {args.qdrop:g}",
                 "channel": "per-channel weights", "mse": "MSE-initialised steps"}
        label = " + ".join([f"W{w}A{a} {method}"] + [names[p] for p in filter(None, variant.split("+"))])
        per_seed = []
        for seed in seeds:
            run = Path(args.runs) / (f"{Path(args.checkpoint).stem}_{method}_w{w}a{a}"
                                     + (f"_{variant.replace('+', '_')}" if variant else "")
                                     + (f"_seed{seed}" if seed else ""))
            cfg = QuantizeConfig(arch=fp.card.arch, kwargs=dict(fp.card.kwargs), task="sr", scale=int(fp.upscale),
                                 data=args.data, val_data=None, patch=args.patch, batch=args.batch, iters=args.iters,
                                 lr=args.lr, schedule=args.schedule, seed=seed, quant_lr=args.quant_lr, ema=args.ema,
                                 device="cpu", checkpoint=args.checkpoint,
                                 method=method, w_bits=w, a_bits=a, calib_batches=args.calib_batches,
                                 save_every=max(args.iters // 4, 1), **extra)
            start = args.start and cfg.trains_in_loop
            t0 = time.perf_counter()
            if start:
                model = qat_start(cfg)
                seconds = time.perf_counter() - t0
            else:
                if (run / "model.safetensors").is_file():
                    check_reuse(run, cfg)
                else:
                    quantize(cfg, run, command=f"tools/quant_results.py ({method} W{w}A{a})", progress=False)
                seconds = time.perf_counter() - t0
                log = run / "log.jsonl"
                if seconds < 60 and log.is_file():  # reused: the run's own training time
                    seconds = json.loads(log.read_text().splitlines()[-1]).get("elapsed_s", seconds)
                model = load_model(run / "model.safetensors")
            per_seed.append({"seed": seed, **evaluate_model(model, pairs, deg).summary, "seconds": seconds})
            print(json.dumps({"label": label, **per_seed[-1]}), flush=True)
        if start:
            label += " (start: no training step)"
        row = {"label": label, "method": method, "bits": f"{w}/{a}", "qat": cfg.qconfig().recipe.qat,
               **mean_of(per_seed)}
        if len(seeds) > 1:
            row["per_seed"] = per_seed
        results.append(row)

    for earlier in args.beside:
        for r in json.loads(earlier.read_text())["rows"]:
            if r["label"] in args.beside_rows:
                results.append({**r, "label": f"{r['label']} (docs/{earlier.stem}.md)"})
    if args.beside:  # the earlier rows among the new ones, by bits then quality
        results[1:] = sorted(results[1:], key=lambda r: (-int(r["bits"].split("/")[0]), -r["psnr"]))
    fp_psnr = results[0]["psnr"]
    lines = [
        "# Quantization results",
        "",
        f"Produced by `python3 tools/quant_results.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}` on "
        f"{platform.processor() or platform.machine()} "
        f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}.",
        "",
        f"- **Model**: `{Path(args.checkpoint).name}` ({fp.card.arch}, x{fp.upscale}), the real released weights.",
        "- **Data**: QAT and calibration on "
        + ("the built-in train split" if args.data == "builtin" else f"the images of `{args.data}`")
        + "; scores on the built-in eval split "
        "(astronaut, chelsea, coffee, rocket; 288 px crops), Y-PSNR/SSIM with BasicSR's conventions, "
        "deterministic routing. Bicubic on the same images: "
        f"{results[0]['psnr_baseline']:.4f} dB / {results[0]['ssim_baseline']:.4f}.",
        f"- **Budget**: every QAT method gets the same {args.iters} iterations, batch {args.batch}, "
        f"{args.patch}x{args.patch} LR patches, Adam lr {args.lr:g} "
        + (f"(weights; quantizers {args.quant_lr:g})" if args.quant_lr is not None else "(weights and quantizers)")
        + ", L1 to the ground truth (the rows' variants add to the loss: 'distill' rows L1 to the float model's "
        "output, 'features' rows the block feature term), "
        f"{args.schedule} schedule, "
        + (f"seed {seeds[0]}" if len(seeds) == 1 else
           f"seeds {', '.join(map(str, seeds))} (each row: the mean of one run per seed; 'per seed' lists each "
           f"run's Δ PSNR)")
        + "; quantizers initialised on the first of "
        f"{args.calib_batches} calibration "
        f"batches. PTQ methods calibrate on the same {args.calib_batches} batches. "
        "This is a CPU-sized budget (the Q-MambaIR recipe is 20k iterations on DF2K); the ranking, not the "
        "absolute values, is what it measures.",
        "- **Placement**: Q-MambaIR's analogue for MambaIRv2 (every Linear/Conv2d inside the residual groups, "
        "the x_proj/dt_proj products, every scan operand); head and tail in float. See docs/quantization.md.",
        *(["- **Start points** (`--start`): the QAT rows are scored where their training would start — "
           "quantizers inserted and initialised on the calibration batches, no training step taken; "
           "'seconds' is that initialisation."] if args.start else []),
        "",
        "| configuration | QAT | Y-PSNR | SSIM | Δ PSNR vs FP32 | seconds |"
        + (" per seed |" if len(seeds) > 1 else ""),
        "|---|---|---|---|---|---|" + ("---|" if len(seeds) > 1 else ""),
    ]
    for r in results:
        each = " / ".join(f"{x['psnr'] - fp_psnr:+.3f}" for x in r.get("per_seed", []))
        lines.append(f"| {r['label']} | {'yes' if r['qat'] else 'no'} | {r['psnr']:.4f} | {r['ssim']:.4f} | "
                     f"{r['psnr'] - fp_psnr:+.3f} | {r['seconds']:.0f} |" + (f" {each} |" if len(seeds) > 1 else ""))
    lines.append("")
    write_text(args.out, "\n".join(lines))
    write_text(Path(args.out).with_suffix(".json"),
               json.dumps({"iters": args.iters, "checkpoint": args.checkpoint, "rows": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
