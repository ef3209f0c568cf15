"""Every artifact of MambaIRv2-light x4 (real weights) run by the same commands -> docs/results-runners.md.

    python3 tools/runner_results.py [--runs runs/runners] [--tile 64] [--iterations 5]

Artifacts (made here when missing, from ../shared/checkpoints/mambairv2_light_x4.safetensors):
the float checkpoint; its FP32 export (plugin scan); a W8A8 minmax PTQ export with the plugin scan
and with the portable scan, and the W8A8 deploy bundle they share. For each, through its runner
(``runtime.open_runner``), as ``restore``, ``eval``, ``validate`` and ``bench --model`` do:

* restore: a 200x180 crop of baboon.png in 64-pixel tiles (the same tiles for every kind); wall
  time, and the PSNR between the written 8-bit PNG and the reference's (the checkpoint for FP32
  artifacts, the W8A8 bundle's PyTorch model for W8A8 ones);
* eval: Y-PSNR / SSIM on the built-in eval split (4 photos, x4 bicubic LR), as `eval --model`;
* validate: the ONNX files against their bundle's PyTorch model (min PSNR-between over the images);
* bench: p50 latency at 1x3x64x64.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from qmamba_deploy.artifacts import write_text
from qmamba_deploy.data.datasets import load_pairs
from qmamba_deploy.data.degrade import degradation_for
from qmamba_deploy.jobs.bench import BenchSettings, bench
from qmamba_deploy.jobs.evaluate import evaluate_runner
from qmamba_deploy.jobs.export import ExportConfig, run_export
from qmamba_deploy.jobs.restore import restore_files
from qmamba_deploy.jobs.validate import validate_artifacts
from qmamba_deploy.runtime import open_runner

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CHECKPOINT = SHARED / "checkpoints" / "mambairv2_light_x4.safetensors"
EXPORTS = {"fp32_plugin": dict(method="none", scan="plugin"), "w8a8_plugin": dict(method="minmax", scan="plugin"),
           "w8a8_portable": dict(method="minmax", scan="portable")}


def _exports(runs: Path) -> dict[str, Path]:
    out = {}
    for name, opts in EXPORTS.items():
        folder = runs / name
        if not (folder / "model.onnx").is_file():
            print(f"exporting {name} -> {folder}", flush=True)
            run_export(ExportConfig(checkpoint=str(CHECKPOINT), validate=False, **opts), folder)
        out[name] = folder / "model.onnx"
    return out


def _psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "runners")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results-runners.md")
    args = ap.parse_args()
    if not CHECKPOINT.is_file():
        raise SystemExit(f"{CHECKPOINT} is missing (../shared beside the clone)")
    onnx = _exports(args.runs)
    bundle = args.runs / "w8a8_plugin" / "bundle.safetensors"
    rows = [("checkpoint (torch FP32)", CHECKPOINT, "checkpoint (torch FP32)"),
            ("ONNX FP32, plugin scan (ORT)", onnx["fp32_plugin"], "checkpoint (torch FP32)"),
            ("bundle W8A8 (torch)", bundle, "bundle W8A8 (torch)"),
            ("ONNX W8A8, plugin scan (ORT)", onnx["w8a8_plugin"], "bundle W8A8 (torch)"),
            ("ONNX W8A8, portable scan (ORT)", onnx["w8a8_portable"], "bundle W8A8 (torch)")]

    photo = cv2.imread(str(SHARED / "images" / "baboon.png"))[100:300, 100:280]
    src = args.runs / "input" / "baboon_200x180.png"
    src.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(src), photo)
    deg = degradation_for(4, None)
    pairs = load_pairs("builtin", deg, 3, split="eval")

    results, restored = [], {}
    for label, path, reference in rows:
        entry = {"row": label, "path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name)}
        with open_runner(path) as runner:
            entry["accepts"] = runner.limits.describe()
            out = args.runs / "restored" / re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
            start = time.perf_counter()
            restore_files(runner, [src], out, tile=args.tile, overlap=16, progress=False)
            entry["restore_s"] = time.perf_counter() - start
            restored[label] = cv2.imread(str(out / src.name))
            start = time.perf_counter()
            report = evaluate_runner(runner, pairs, deg)
            entry.update(eval_s=time.perf_counter() - start, psnr=report.summary["psnr"], ssim=report.summary["ssim"],
                         bicubic_psnr=report.summary["psnr_baseline"])
        entry["restore_psnr_vs_reference"] = _psnr_u8(restored[label], restored[reference]) if label != reference \
            else None
        entry["reference"] = reference
        settings = BenchSettings(shape=(1, 3, 64, 64), warmup=1, iterations=args.iterations)
        entry["bench_p50_ms"] = bench(path, settings).as_dict()["latency_ms"]["p50"]
        results.append(entry)
        print(json.dumps(entry), flush=True)

    start = time.perf_counter()
    # the two W8A8 exports each folded the same model into their own folder's bundle: compare both
    # with one of them (validate refuses artifacts of different bundles unless --bundle names one)
    report = validate_artifacts([str(onnx["w8a8_plugin"]), str(onnx["w8a8_portable"])], bundle=str(bundle))
    validation = {"seconds": time.perf_counter() - start, "passed": report.passed,
                  "outputs": [{"name": o.name, "min_psnr_between": o.min_psnr_between, "required": min(
                      im["required"] for im in o.images)} for o in report.outputs if o.reference]}
    fp32 = validate_artifacts([str(onnx["fp32_plugin"])])
    validation["fp32"] = [{"name": o.name, "min_psnr_between": o.min_psnr_between} for o in fp32.outputs
                          if o.reference]

    lines = ["# Running the artifacts: one runner interface, MambaIRv2-light x4 (real weights)", "",
             f"Command: `python3 tools/runner_results.py --tile {args.tile} --iterations {args.iterations}` on "
             f"{platform.machine()} ({torch.get_num_threads()} threads, torch {torch.__version__}). Every row ran "
             f"through `open_runner` as `restore --model`, `eval --model` and `bench --model` do. Restore: a 200x180 "
             f"crop of baboon.png (output 800x720) in {args.tile}-pixel tiles, overlap 16; PSNR vs reference is "
             f"between the written 8-bit PNGs. Eval: Y-PSNR/SSIM on the built-in eval split (4 photos, x4 bicubic "
             f"LR 72x72). ONNX files: " + "; ".join(
                 f"{name} exported "
                 f"{datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
                 for name, path in onnx.items())
             + f" (reused from {args.runs.relative_to(ROOT) if args.runs.is_relative_to(ROOT) else args.runs} when "
               "present; delete it to export afresh).", "",
             "| artifact | accepts | restore s | PSNR vs reference (dB) | eval Y-PSNR | SSIM | eval s | "
             "bench 64x64 p50 ms |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in results:
        ref = "(reference)" if e["restore_psnr_vs_reference"] is None else (
            "identical" if np.isinf(e["restore_psnr_vs_reference"]) else f"{e['restore_psnr_vs_reference']:.2f}")
        lines.append(f"| {e['row']} | {e['accepts']} | {e['restore_s']:.1f} | {ref} | {e['psnr']:.4f} | "
                     f"{e['ssim']:.4f} | {e['eval_s']:.1f} | {e['bench_p50_ms']:.0f} |")
    lines += ["", f"Bicubic on the same eval images: {results[0]['bicubic_psnr']:.4f} dB.", "",
              f"`qmamba-deploy validate {onnx['w8a8_plugin'].relative_to(ROOT)} "
              f"{onnx['w8a8_portable'].relative_to(ROOT)} --bundle {bundle.relative_to(ROOT)}` "
              f"(one call, {validation['seconds']:.0f} s): "
              + ("passed" if validation["passed"] else "FAILED") + "; min PSNR-between over the images: "
              + "; ".join(f"{o['name']} {o['min_psnr_between']:.2f} dB (required {o['required']:.2f})"
                          for o in validation["outputs"])
              + ". FP32 export: " + "; ".join(f"{o['name']} {o['min_psnr_between']:.2f} dB"
                                              for o in validation["fp32"]) + "."]
    write_text(args.out, "\n".join(lines) + "\n")
    write_text(args.out.with_suffix(".json"), json.dumps({"rows": results, "validate": validation}, indent=1,
                                                         default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
