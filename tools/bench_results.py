"""FP32 PyTorch vs W8A8 ONNX Runtime latency on this CPU -> docs/results-bench.md (+ .json).

    python3 tools/bench_results.py [--sizes 64 128] [--iterations 10] [--runs runs/export]

Model: MambaIRv2-light x4 with the real released weights (../shared/checkpoints).
Rows, each one `qmamba-deploy bench ... --json` in its own process (so that its peak
resident memory is its own), one after the other, per input size:

* torch FP32      -- the float checkpoint, eager PyTorch (the op's CPU scan: compiled kernel or chunked torch);
* ORT FP32        -- its FP32 export (`--scan plugin`, no quantization);
* ORT FP32 portable -- the same exported with `--scan portable`;
* ORT W8A8 plugin -- the W8A8 minmax PTQ export with QMambaSelectiveScan nodes;
* ORT W8A8 portable -- the same model exported with `--scan portable`;
* ORT W8A8 portable, exported by 0526ae9 -- the same export made by the code of issue #16's starting
  point (a worktree of 0526ae9 running `qmamba-deploy export ... --scan portable`), run by today's runtime.

The ONNX files are the exports of docs/results-export.md (`python3 tools/export_results.py
--only v2_fp32_plugin v2_w8a8_plugin v2_w8a8_portable` makes them); a row whose folder is missing
under --runs is skipped. In ONNX Runtime the
QMambaSelectiveScan nodes run as the Python custom op (the op's CPU forward, as torch), so the
plugin rows measure ORT's INT8 kernels plus the same scan as PyTorch; the portable rows
run the scan as ONNX Scan/standard ops.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from qmamba_deploy import load_model
from qmamba_deploy.artifacts import write_text
from qmamba_deploy.jobs.bench import compare, forward_flops

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT.parent / "shared" / "checkpoints" / "mambairv2_light_x4.safetensors"
ONNX_ROWS = (("ORT FP32", "v2_fp32_plugin"), ("ORT FP32 portable", "v2_fp32_portable"),
             ("ORT W8A8 plugin", "v2_w8a8_plugin"), ("ORT W8A8 portable", "v2_w8a8_portable"),
             ("ORT W8A8 portable, exported by 0526ae9", "v2_w8a8_portable_0526ae9"))


def _bench(args: list[str]) -> dict:
    """One `qmamba-deploy bench` in a fresh process; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run([sys.executable, "-m", "qmamba_deploy.cli", "bench", *args, "--json", str(out)], check=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "export")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results-bench.md")
    args = ap.parse_args()

    results = []
    model = load_model(CHECKPOINT)
    for size in args.sizes:
        flops = forward_flops(model, (1, 3, size, size))
        common = ["--shape", f"1x3x{size}x{size}", "--warmup", str(args.warmup), "--iterations", str(args.iterations)]
        rows = [("torch FP32", _bench(["--torch", str(CHECKPOINT), *common]))]
        for label, run in ONNX_ROWS:
            path = args.runs / run / "model.onnx"
            if path.is_file():
                rows.append((label, _bench(["--onnx", str(path), *common])))
            else:
                print(f"skipping {label}: {path} is missing (tools/export_results.py --only {run})")
        base = rows[0][1]
        for label, r in rows:
            results.append({"size": size, "row": label, "speedup_vs_torch_fp32": compare(base, r)["speedup_b_vs_a"],
                            "gflop": flops / 1e9, "gflops_per_s": flops / r["latency_ms"]["p50"] / 1e6, "result": r})
            lat = r["latency_ms"]
            print(f"{size}x{size} {label}: p50 {lat['p50']:.1f} ms")

    host = results[0]["result"]["host"]
    gflop_sizes = ", ".join(f"{size}x{size}: {gflop:.1f} GFLOP"
                            for size, gflop in sorted({(i["size"], i["gflop"]) for i in results}))
    lines = [
        "# Latency on the development CPU: FP32 PyTorch vs W8A8 ONNX Runtime",
        "",
        "Command: `python3 tools/bench_results.py "
        f"--sizes {' '.join(map(str, args.sizes))} --iterations {args.iterations} --warmup {args.warmup}` "
        f"on {host['machine']} ({host['cpu_count']} cores, {platform.python_version()}, torch {torch.__version__}). "
        "Each row is one `qmamba-deploy bench` process; the rows of a size ran back to back in one invocation, so "
        "compare ratios within one size (the machine is shared and noisy). Model: MambaIRv2-light x4, real weights; "
        "input 1x3xHxW, output 4x larger. Ratios are vs torch FP32 at the same size (>1: faster).",
        "",
        "| input | row | p50 ms | p90 ms | images/s | output MP/s | GFLOP/s | peak RSS MB | speed vs torch FP32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for item in results:
        r = item["result"]
        lat, thr = r["latency_ms"], r["throughput"]
        lines.append(f"| {item['size']}x{item['size']} | {item['row']} | {lat['p50']:.1f} | {lat['p90']:.1f} | "
                     f"{thr['images_per_s']:.2f} | {thr['output_megapixels_per_s']:.3f} | {item['gflops_per_s']:.1f} | "
                     f"{r['memory']['peak_bytes'] / 1e6:.0f} | {item['speedup_vs_torch_fp32']:.2f}x |")
    lines += [
        "",
        f"GFLOP/s: the model's FLOPs at that size (torch's FlopCounterMode: matmuls and convolutions, "
        f"{gflop_sizes}) "
        "over the p50 latency; the same count for every row, whatever arithmetic the backend does. "
        "Peak RSS is the whole process's high-water mark (Python, torch, ONNX Runtime and the model). "
        "The ORT plugin rows run QMambaSelectiveScan through the Python custom op (the op's CPU forward, "
        "as torch runs it), as `qmamba-deploy validate` does; "
        "on a GPU the scan is the TensorRT plugin instead.",
        "",
        "Any two rows can be compared with `qmamba-deploy bench --compare A.json B.json` from their JSON "
        "(docs/results-bench.json holds every result).",
    ]
    write_text(args.out, "\n".join(lines) + "\n")
    write_text(args.out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
