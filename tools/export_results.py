"""ONNX Runtime vs PyTorch for every deploy configuration -> docs/results-export.md (+ .json).

    python3 tools/export_results.py [--runs runs/export] [--out docs/results-export.md]

Each row is one `qmamba_deploy.jobs.export.run_export` (what `qmamba-deploy export`
runs): fold, export, then the built-in eval images through the fake-quant model, the
deploy model and the ONNX in ONNX Runtime (CPU; the scan as the Python custom op for
`plugin` graphs, standard ops for `portable` ones).

Models:
* MambaIRv2-light x4, the real released weights (../shared/checkpoints). The W4A4
  checkpoints are the QAT / SPR²Q runs of docs/results-quantization.md and
  docs/results-spr2q.md (`python3 tools/quant_results.py --rows qmambair:4:4` and
  `python3 tools/spr2q_results.py --scales 4` write them into runs/).
* MambaIR-light x4, the official architecture with seeded random weights (no trained
  MambaIR-light weights are available here): its rows measure parity only; their PSNR
  against the ground truth means nothing. Its W4A4 quantizers are initialised on
  calibration batches without training.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch

from qmamba_deploy import build_model, save_checkpoint
from qmamba_deploy.artifacts import write_text
from qmamba_deploy.jobs.export import ExportConfig, run_export

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _random_mambair_light(runs: Path) -> tuple[Path, Path, Path]:
    """Seeded random MambaIR-light x4 (float), its W4A4 Q-MambaIR and SPR²Q-bounds copies (calibrated)."""
    from qmamba_deploy.data.datasets import PatchSampler, load_pairs
    from qmamba_deploy.data.degrade import Degradation
    from qmamba_deploy.jobs.quantize import calibrate
    from qmamba_deploy.quant import QConfig, quantize_model

    runs.mkdir(parents=True, exist_ok=True)
    paths = {k: runs / f"mambair_light_x4_random_{k}.safetensors" for k in ("fp32", "qmambair", "spr2q")}
    if all(p.is_file() for p in paths.values()):
        return paths["fp32"], paths["qmambair"], paths["spr2q"]
    torch.manual_seed(0)
    fp = build_model("mambair-light-x4").eval()
    task = {"task": {"task": "sr", "scale": 4, "sigma": 25.0, "quality": 40}}
    note = {"note": "seeded random weights (torch.manual_seed(0)); parity only"}
    save_checkpoint(fp, paths["fp32"], provenance=note, extra=task)
    deg = Degradation("sr", 4)
    sampler = PatchSampler(load_pairs("builtin", deg, split="train"), deg, 32, 1, seed=0)
    batches = [sampler.batch(i, 0)[0] for i in range(4)]
    for key, method in (("qmambair", "qmambair"), ("spr2q", "spr2q")):
        q = quantize_model(copy.deepcopy(fp), QConfig(method, 4, 4))
        calibrate(q, batches)
        save_checkpoint(q.eval(), paths[key], provenance={**note, "quantizers": "initialised on 4 batches, no QAT"},
                        extra=task)
    return paths["fp32"], paths["qmambair"], paths["spr2q"]


def _rows(args) -> list[dict]:
    real = SHARED / "checkpoints/mambairv2_light_x4.safetensors"
    qm = Path(args.qmambair)
    sp = Path(args.spr2q)
    for path, how in ((real, "../shared/checkpoints"), (qm, "python3 tools/quant_results.py --rows qmambair:4:4"),
                      (sp, "python3 tools/spr2q_results.py --scales 4")):
        if not path.is_file():
            raise SystemExit(f"{path} is missing; make it with: {how}")
    v1_fp, v1_qm, v1_sp = _random_mambair_light(Path(args.runs))
    rows = []
    for model, fp, qmambair, spr2q in (("MambaIRv2-light x4 (real weights)", real, qm, sp),
                                       ("MambaIR-light x4 (random weights, parity only)", v1_fp, v1_qm, v1_sp)):
        tag = "v2" if "v2" in model else "v1"
        rows += [
            dict(model=model, tag=f"{tag}_fp32_plugin", label="FP32", checkpoint=fp, method="none", scan="plugin"),
            dict(model=model, tag=f"{tag}_fp32_portable", label="FP32", checkpoint=fp, method="none",
                 scan="portable"),
            dict(model=model, tag=f"{tag}_w8a8_plugin", label="W8A8 PTQ minmax", checkpoint=fp, method="minmax",
                 scan="plugin"),
            dict(model=model, tag=f"{tag}_w8a8_portable", label="W8A8 PTQ minmax", checkpoint=fp, method="minmax",
                 scan="portable"),
            dict(model=model, tag=f"{tag}_qmambair_static", label="W4A4 Q-MambaIR", checkpoint=qmambair,
                 dls="static", scan="plugin"),
            dict(model=model, tag=f"{tag}_qmambair_dynamic", label="W4A4 Q-MambaIR", checkpoint=qmambair,
                 dls="dynamic", scan="plugin"),
            dict(model=model, tag=f"{tag}_qmambair_dynamic_portable", label="W4A4 Q-MambaIR", checkpoint=qmambair,
                 dls="dynamic", scan="portable"),
            dict(model=model, tag=f"{tag}_qmambair_static_int4", label="W4A4 Q-MambaIR, INT4 weights",
                 checkpoint=qmambair, dls="static", scan="plugin", int4=True),
            dict(model=model, tag=f"{tag}_spr2q", label="W4A4 SPR²Q" if tag == "v2" else "W4A4 SPR²Q bounds",
                 checkpoint=spr2q, scan="plugin"),
        ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(ROOT / "runs/export"))
    ap.add_argument("--qmambair", default=str(ROOT / "runs/quant/mambairv2_light_x4_qmambair_w4a4/model.safetensors"))
    ap.add_argument("--spr2q", default=str(ROOT / "runs/spr2q/x4_w4a4_group4/model.safetensors"))
    ap.add_argument("--only", nargs="*", help="only these row tags")
    ap.add_argument("--skip", nargs="*", default=[], help="leave these row tags out")
    ap.add_argument("--out", default=str(ROOT / "docs/results-export.md"))
    ap.add_argument("--doc-only", action="store_true", help="rewrite the doc from the .json and the run folders")
    args = ap.parse_args()

    if args.doc_only:
        rows = json.loads(Path(args.out).with_suffix(".json").read_text())["rows"]
        for r in rows:
            for key in ("min_psnr_between", "floor"):
                r[key] = float(r[key])  # "inf" strings back to floats
        write_doc(rows, args)
        return
    results = []
    for row in _rows(args):
        if (args.only and row["tag"] not in args.only) or row["tag"] in args.skip:
            continue
        cfg = ExportConfig(checkpoint=str(row["checkpoint"]), method=row.get("method", "minmax"),
                           scan=row["scan"], dls=row.get("dls", "static"), int4_weights=row.get("int4", False))
        folder = Path(args.runs) / row["tag"]
        if not _finished(folder, cfg):  # finished runs are reused (delete the folder to redo one)
            run_export(cfg, folder, command=f"tools/export_results.py ({row['tag']})")
        results.append(_result(row, cfg, folder))
        print(json.dumps(results[-1]), flush=True)
    write_doc(results, args)


def _finished(folder: Path, cfg: ExportConfig) -> bool:
    from dataclasses import asdict

    report = folder / "report.json"
    return report.is_file() and json.loads(report.read_text())["config"] == json.loads(json.dumps(asdict(cfg)))


def _result(row: dict, cfg: ExportConfig, folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    bundle, onnx_meta = report["bundle"], report["onnx"]
    outputs = {o["name"]: o for o in report["validation"]["outputs"]}
    onnx_out = next(o for o in outputs.values() if o["reference"])
    fake = outputs.get("torch fake-quant") or outputs.get("torch float")
    deploy = outputs[onnx_out["reference"]]
    return {
        "model": row["model"], "tag": row["tag"], "config": row["label"], "scan": row["scan"],
        "dls": cfg.dls if bundle["dls_calibration"] else "-",
        "size_change": bundle["size"]["change_vs_fp32"], "bundle_bytes": bundle["size"]["weight_bytes"],
        "torch_psnr": fake["mean"]["psnr"], "torch_ssim": fake["mean"]["ssim"],
        "deploy_psnr": deploy["mean"]["psnr"], "ort_psnr": onnx_out["mean"]["psnr"],
        "ort_ssim": onnx_out["mean"]["ssim"], "min_psnr_between": float(onnx_out["mean"]["min_psnr_between"]),
        "max_abs": onnx_out["mean"]["max_abs"], "floor": float(deploy["mean"]["min_sensitivity_floor"]),
        "passed": report["validation"]["passed"], "seconds": report["seconds"], "qdq": onnx_meta["quantize_linear"],
        "int4": onnx_meta["int4_weights"], "baseline_psnr": report["validation"]["baseline"]["psnr"],
    }


def _fmt_between(v: float) -> str:
    return "identical" if v == float("inf") else f"{v:.2f}"


def write_doc(results: list[dict], args) -> None:
    lines = [
        "# Export results: ONNX Runtime vs PyTorch",
        "",
        f"Produced by `python3 tools/export_results.py` on {platform.processor() or platform.machine()} CPU "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}, onnxruntime "
        f"{__import__('onnxruntime').__version__}, CPUExecutionProvider.",
        "",
        "Each row is one `qmamba-deploy export` (fold -> ONNX -> validation) and scores the built-in eval split "
        "(astronaut, chelsea, coffee, rocket; 288 px crops, x4 -> 72 px LR inputs) with BasicSR's Y-PSNR. "
        "*torch* is the fake-quant model (the float model for FP32) as `quantize` made it; *deploy* is the folded "
        "model in the exported DLS mode (what the ONNX means); *ORT* is the ONNX in ONNX Runtime. "
        "*PSNR-between* is ORT vs deploy on the float outputs (the lowest of the four images). *Floor* is the "
        "deploy model in float32 against the same model in float64 (the lowest of the four): how far a "
        "low-bit network's roundings and MambaIRv2's argmax routing amplify float32 rounding. A row passes when "
        "PSNR-between >= min(50 dB, floor - 6 dB) on every image (qmamba_deploy/validate.py).",
        "",
        "| model | configuration | scan | DLS | bundle vs FP32 | torch Y-PSNR | deploy Y-PSNR | ORT Y-PSNR | "
        "ORT SSIM | min PSNR-between (dB) | floor (dB) | max abs diff | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['model']} | {r['config']} | {r['scan']} | {r['dls']} | {r['size_change'] * 100:+.1f} % | "
                     f"{r['torch_psnr']:.4f} | {r['deploy_psnr']:.4f} | {r['ort_psnr']:.4f} | {r['ort_ssim']:.4f} | "
                     f"{_fmt_between(r['min_psnr_between'])} | {_fmt_between(r['floor'])} | {r['max_abs']:.2e} | "
                     f"{'yes' if r['passed'] else 'NO'} |")
    static = {r["model"]: r for r in results if r["tag"].endswith("qmambair_static")}
    dynamic = {r["model"]: r for r in results if r["tag"].endswith("qmambair_dynamic")}
    lines += ["", "## Static vs dynamic DLS", ""]
    for model in static:
        if model in dynamic:
            s, d = static[model], dynamic[model]
            lines.append(f"- {model}: static {s['ort_psnr']:.4f} dB vs dynamic {d['ort_psnr']:.4f} dB in ONNX "
                         f"Runtime: **{s['ort_psnr'] - d['ort_psnr']:+.3f} dB** for static scales "
                         f"(torch deploy: {s['deploy_psnr'] - d['deploy_psnr']:+.3f} dB).")
    lines += ["", "## Per image: ONNX Runtime against the model's own float32 noise", "",
              "PSNR between ORT and the deploy model, and between the deploy model in float32 and in float64 "
              "(the floor), per eval image (from each row's `report.json` in the run folder).", "",
              "| model | configuration | scan | DLS | image | ORT vs torch (dB) | float64 vs float32 torch (dB) |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        report = Path(args.runs) / r["tag"] / "report.json"
        if "W4A4" not in r["config"] or not report.is_file():
            continue
        outputs = json.loads(report.read_text())["validation"]["outputs"]
        ref = next(o for o in outputs if o["name"].startswith("torch deploy"))
        cand = next(o for o in outputs if o["reference"])
        for a, b in zip(cand["images"], ref["images"]):
            lines.append(f"| {r['model']} | {r['config']} | {r['scan']} | {r['dls']} | {a['image']} | "
                         f"{_fmt_between(float(a['psnr_between']))} | "
                         f"{_fmt_between(float(b['sensitivity_floor']))} |")
    lines.append("")
    write_text(args.out, "\n".join(lines))
    write_text(Path(args.out).with_suffix(".json"),
               json.dumps({"rows": results}, indent=2, default=str).replace("Infinity", '"inf"'))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
