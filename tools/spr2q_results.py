"""SPR²Q ablation on the real MambaIRv2-light weights -> docs/results-spr2q.md.

    python3 tools/spr2q_results.py [--scales 4 2] [--iters 40] [--route-iters 20] [--runs runs/spr2q]
        [--bounds-init mse|minmax] [--rows 2:plain 2:group4 ...] [--beside docs/results-spr2q.json]

Rows per scale, all with the same Q_{a,b} quantizer and the same stated budget:
W4A4 and W2A2 plain PTQ, the bounds trained alone (same budget, no
rectifier: separates the rectifiers' gain from the bounds'), + one rectifier
(PQFR), + a group of 4 with static routing; at W4A4 also groups of 2 and 8. Each row runs
`qmamba_deploy.jobs.quantize.quantize_spr2q` (what `qmamba-deploy quantize
--method spr2q` runs) and is scored on the built-in eval split like
`qmamba-deploy eval`. Finished rows are reused.

``--bounds-init`` says how Q_{a,b} starts (``mse``, the default, or ``minmax`` as in the
first version of this table); ``--rows`` runs a subset (BITS:VARIANT, group rows as
BITS:groupN); ``--beside`` keeps the rows of an earlier JSON (another bounds init) in the
table, each next to its counterpart.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from qmamba_deploy import load_model
from qmamba_deploy.artifacts import write_text
from qmamba_deploy.data.datasets import load_pairs
from qmamba_deploy.data.degrade import Degradation
from qmamba_deploy.evaluate import evaluate_model
from qmamba_deploy.jobs.quantize import SPR2QConfig, quantize_spr2q
from qmamba_deploy.quant.spr2q import BOUND_INITS

ROOT = Path(__file__).resolve().parents[1]

#: (bits, variant, group size)
ROWS = [(4, "plain", 1), (4, "bounds", 1), (4, "single", 1), (4, "group", 2), (4, "group", 4), (4, "group", 8),
        (2, "plain", 1), (2, "bounds", 1), (2, "single", 1), (2, "group", 4), (2, "no-static", 4)]
LABEL = {"plain": "plain PTQ (calibrated bounds)", "bounds": "bounds trained, no rectifier",
         "single": "+ single rectifier (PQFR)", "group": "+ group, static routing",
         "no-static": "+ group, ĝ = calibration mean (routing not optimised)"}


GROUPED = ("group", "no-static")  # variants with a rectifier group (its size in the row key)


def _row_key(row: tuple[int, str, int]) -> str:
    bits, variant, group = row
    return f"{bits}:{variant}{group if variant in GROUPED else ''}"


def _earlier_rows(path: str) -> list[dict]:
    """Rows of an earlier run of this tool (rows written before --bounds-init existed were min/max)."""
    rows = json.loads(Path(path).read_text())["rows"]
    return [{**r, "bounds_init": r.get("bounds_init", "minmax")} for r in rows]


def _side_by_side(new: list[dict], old: list[dict]) -> list[dict]:
    """Every row of ``old`` and ``new`` once, in ``old``'s order, each new row after its old counterpart."""
    key = (lambda r: (r["scale"], r["label"], r.get("bounds_init") if r["label"] != "FP32" else None))
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    order = [key(r) for r in old] + [key(r) for r in new if key(r) not in {key(o) for o in old}]

    def position(k):
        first = next((i for i, o in enumerate(order) if o[:2] == k[:2]), len(order))
        return first, order.index(k)

    return [merged[k] for k in sorted(dict.fromkeys(order), key=position)]


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
    ap.add_argument("--bounds-init", choices=BOUND_INITS, default="mse")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the training patches and the rectifiers' start (runs of another seed get '_seedN')")
    ap.add_argument("--rows", nargs="+", help="subset of rows as BITS:VARIANT (group rows BITS:groupN)")
    ap.add_argument("--beside", help="an earlier results JSON whose rows are shown next to these")
    ap.add_argument("--out", default=str(ROOT / "docs/results-spr2q.md"))
    args = ap.parse_args()
    rows = ROWS if not args.rows else [r for r in ROWS if _row_key(r) in set(args.rows)]
    if args.rows and len(rows) != len(set(args.rows)):
        ap.error(f"--rows: use some of {' '.join(_row_key(r) for r in ROWS)}")
    if args.beside and Path(args.beside).resolve() == Path(args.out).with_suffix(".json").resolve():
        ap.error(f"--beside {args.beside} is the JSON this run writes (--out {args.out}); keep the earlier rows "
                 "under another name (e.g. docs/results-spr2q-minmax.json)")
    beside = _earlier_rows(args.beside) if args.beside else []

    results = []
    for scale in args.scales:
        ckpt = Path(args.checkpoints) / f"mambairv2_light_x{scale}.safetensors"
        fp = load_model(ckpt)
        deg = Degradation("sr", scale)
        pairs = load_pairs("builtin", deg, split="eval")
        fp_score = evaluate_model(fp, pairs, deg).summary
        results.append({"scale": scale, "label": "FP32", "bits": 32, **fp_score})
        print(json.dumps(results[-1]), flush=True)
        for bits, variant, group in rows:
            suffix = "" if args.bounds_init == "minmax" else f"_{args.bounds_init}"  # minmax: the first table's runs
            suffix += f"_seed{args.seed}" if args.seed else ""
            run = Path(args.runs) / f"x{scale}_w{bits}a{bits}_{variant}{group if variant in GROUPED else ''}{suffix}"
            cfg = SPR2QConfig(arch=fp.card.arch, kwargs=dict(fp.card.kwargs), task="sr", scale=scale, data="builtin",
                              val_data=None, patch=args.patch, batch=args.batch, iters=args.iters, lr=args.lr,
                              device="cpu", checkpoint=str(ckpt), w_bits=bits, a_bits=bits,
                              calib_batches=args.calib_batches, rank=args.rank, group_size=group,
                              route_iters=args.route_iters, variant=variant, bounds_init=args.bounds_init,
                              seed=args.seed)
            t0 = time.perf_counter()
            if not (run / "model.safetensors").is_file():
                quantize_spr2q(cfg, run, command=f"tools/spr2q_results.py ({run.name})")
            seconds = time.perf_counter() - t0
            score = evaluate_model(load_model(run / "model.safetensors"), pairs, deg).summary
            label = LABEL[variant] + (f", N = {group}" if variant in GROUPED else "")
            results.append({"scale": scale, "label": f"W{bits}A{bits} {label}", "bits": bits, **score,
                            "bounds_init": args.bounds_init, "seconds_this_run": seconds, "fp_psnr": fp_score["psnr"]})
            print(json.dumps(results[-1]), flush=True)

    lines = [
        "# SPR²Q results",
        "",
        f"Produced by `python3 tools/spr2q_results.py {' '.join(sys.argv[1:])}` on "
        f"{platform.processor() or platform.machine()} "
        f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}.",
        "",
        "- **Models**: the real MambaIRv2-light weights (`../shared/checkpoints`).",
        "- **Quantizer**: Q_{a,b} (learnable clipping bounds, initialised on the first of "
        f"{args.calib_batches} calibration batches: `mse` = the bounds within min/max that minimise the "
        "quantization error, `minmax` = min and max) on every quantized layer's input and weight and on every scan "
        "operand, W = A bits; placement as in docs/quantization.md.",
        f"- **Budget** (every row the same): {args.iters} group-training iterations (Adam lr {args.lr:g}, cosine, "
        f"hybrid loss = L1 to the FP output + 1.0 x block feature MSE, batch {args.batch}, {args.patch}x{args.patch} "
        f"LR patches from the built-in train split), then {args.route_iters} iterations of static routing "
        f"calibration (groups only), then fusion; rank {args.rank}. The paper trains 12k iterations on DF2K: "
        "this is a CPU-sized budget.",
        "- **Scores**: Y-PSNR/SSIM on the built-in eval split, BasicSR conventions.",
        "",
        "| scale | configuration | bounds init | Y-PSNR | SSIM | Δ PSNR vs FP32 | vs bicubic |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in _side_by_side(results, beside):
        delta = r["psnr"] - r.get("fp_psnr", r["psnr"])
        init = "" if r["label"] == "FP32" else r.get("bounds_init", "minmax")
        vs_bicubic = f"{r['psnr'] - r['psnr_baseline']:+.2f}"
        lines.append(f"| x{r['scale']} | {r['label']} | {init} | {r['psnr']:.4f} | {r['ssim']:.4f} | {delta:+.3f} "
                     f"| {vs_bicubic} |")
    bicubic = {r["scale"]: r["psnr_baseline"] for r in results + beside if r["label"] == "FP32"}
    lines += ["", f"Bicubic on the same images (Y-PSNR, the baseline `qmamba-deploy eval` prints): "
              f"{', '.join(f'x{k} {v:.4f} dB' for k, v in bicubic.items())}.", ""]
    write_text(args.out, "\n".join(lines))
    write_text(Path(args.out).with_suffix(".json"),
               json.dumps({"args": vars(args), "rows": _side_by_side(results, beside)}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
