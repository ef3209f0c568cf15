"""The selective-scan CUDA kernel on a GPU: correctness vs a float64 reference, speed vs the
PyTorch scan and vs the memory-bandwidth bound -> docs/results-scan-gpu.md (+ .json).

    python3 tools/bench_scan_gpu.py [--iterations 50] [--out docs/results-scan-gpu.md]

Needs an NVIDIA GPU, nvcc, and (for the PyTorch column) a CUDA build of torch. Builds
trt_plugins/selective_scan/tests/kernel_check.cu with the kernel for this GPU
(-arch=native), then for each scan shape of the released models at 64x64, 128x128 and 256x256
inputs (MambaIRv2-light: D = 48, K = 1, N = 8; MambaIR-light: D = 288, K = 4, N = 10):

* kernel_check: max error vs float64 (fp32 and fp16 I/O), ms per call in one pass and in
  the segmented mode the plugin uses, bytes moved at least, GB/s and the fraction of the
  GPU's peak bandwidth;
* torch: qmamba_deploy.ops.selective_scan_chunked on the same shapes (CUDA events), the
  path the PyTorch models use on a GPU without mamba_ssm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch

from qmamba_deploy.artifacts import write_text
from qmamba_deploy.ops.selective_scan import selective_scan_chunked
from qmamba_deploy.trt import plugin

ROOT = Path(__file__).resolve().parents[1]
# (model, input side, B, D, K, L, N)
SHAPES = [("MambaIRv2-light", side, 1, 48, 1, side * side, 8) for side in (64, 128, 256)] + \
         [("MambaIR-light", side, 1, 288, 4, side * side, 10) for side in (64, 128, 256)]


def torch_ms(b: int, d: int, k: int, length: int, n: int, iterations: int) -> float:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    u = torch.rand(b, d, length, device=dev, generator=g) * 2 - 1
    delta = torch.rand(b, d, length, device=dev, generator=g) * 4 - 3
    A = -torch.rand(d, n, device=dev, generator=g) * 2 - 0.05
    B = torch.rand(b, k, n, length, device=dev, generator=g) * 2 - 1
    C = torch.rand(b, k, n, length, device=dev, generator=g) * 2 - 1
    D = torch.rand(d, device=dev, generator=g)
    bias = torch.rand(d, device=dev, generator=g) - 0.5
    for _ in range(3):
        selective_scan_chunked(u, delta, A, B, C, D, bias, delta_softplus=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        selective_scan_chunked(u, delta, A, B, C, D, bias, delta_softplus=True)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iterations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--peak-gbps", type=float, default=0.0, help="the GPU's peak bandwidth (default: from the driver)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results-scan-gpu.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_scan_gpu: no CUDA device visible to torch; run this on a GPU machine")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = plugin.nvcc_compile(Path(tmp), arch_flags=["-arch=native"])
        for model, side, b, d, k, length, n in SHAPES:
            for io in ("fp32", "fp16"):
                proc = subprocess.run([str(exe), str(b), str(d), str(k), str(length), str(n), io,
                                       str(args.iterations), str(args.peak_gbps)], capture_output=True, text=True)
                if proc.returncode not in (0, 1):
                    raise SystemExit(f"kernel_check failed: {proc.stderr}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row.update(model=model, side=side, passed=proc.returncode == 0)
                if io == "fp32":
                    row["torch_ms"] = torch_ms(b, d, k, length, n, args.iterations)
                rows.append(row)
                print(json.dumps(row))
    gpu = rows[0]["gpu"]
    lines = [f"# The selective-scan kernel on {gpu}", "",
             f"Command: `python3 tools/bench_scan_gpu.py --iterations {args.iterations}`, torch {torch.__version__}. "
             "Error: max |kernel - float64 reference| / max(1, max |y|). Bandwidth: the bytes the op must move at "
             "least (u, delta, y per channel, B and C once) over the time per call.", "",
             "| model | input | I/O | segments | max error | one pass ms | segmented ms | torch chunked ms | "
             "speed-up vs torch | GB/s | of peak | of peak, one pass |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        torch_col = f"{r['torch_ms']:.3f}" if "torch_ms" in r else "-"
        speed = f"{r['torch_ms'] / r['ms']:.1f}x" if "torch_ms" in r else "-"
        lines.append(f"| {r['model']} | {r['side']}x{r['side']} | {r['io']} | {r['segments']} | "
                     f"{r['max_rel_error']:.1e} | {r['ms_one_pass']:.3f} | {r['ms']:.3f} | {torch_col} | {speed} | "
                     f"{r['GBps']:.0f} | {r['fraction_of_peak'] * 100:.0f} % | "
                     f"{r['fraction_of_peak_one_pass'] * 100:.0f} % |")
    write_text(args.out, "\n".join(lines) + "\n")
    write_text(args.out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
