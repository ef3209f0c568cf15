"""Benchmark the SelectiveScan paths on CPU: reference loop, chunked torch, compiled kernel; and the
gradient, torch's hand-written backward vs the compiled one.

    python tools/bench_scan.py [--lengths 1024 4096 16384] [--shape D N K] [--repeats 5] [--json out.json]

The paths are timed interleaved (each path in turn, each repeat) so that machine noise hits them
alike; the table shows medians. Default D=384, N=16, K=4 (MambaIRv2-light's scans: --shape 48 8 1),
B=1, float32, torch's default thread count. The compiled columns are '-' where no C compiler built
the kernel (ops/scan_cpu.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from qmamba_deploy.ops import scan_cpu
from qmamba_deploy.ops.selective_scan import (
    _step_size,
    default_chunk,
    selective_scan_backward,
    selective_scan_chunked,
    selective_scan_ref,
)


def make_inputs(length: int, bsz: int = 1, dim: int = 384, n: int = 16, k: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(bsz, dim, length, generator=g),                    # u
        torch.randn(bsz, dim, length, generator=g) * 0.5,              # delta
        -torch.exp(torch.randn(dim, n, generator=g) * 0.5),            # A
        torch.randn(bsz, k, n, length, generator=g),                   # B
        torch.randn(bsz, k, n, length, generator=g),                   # C
        torch.randn(dim, generator=g),                                 # D
        torch.randn(dim, generator=g) * 0.5 - 1.0,                     # delta_bias
    ]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(length: int, repeats: int, with_backward: bool, shape: tuple[int, int, int], with_ref: bool) -> dict:
    dim, n, k = shape
    x = make_inputs(length, dim=dim, n=n, k=k)
    gy = torch.randn(x[0].shape, generator=torch.Generator().manual_seed(1))
    paths = {"chunked": lambda: selective_scan_chunked(*x)}
    if with_ref:
        paths["reference"] = lambda: selective_scan_ref(*x)
    if scan_cpu.available():
        paths["compiled"] = lambda: scan_cpu.scan_forward(x[0], _step_size(x[1], x[6], True, torch.float32), *x[2:6])
    if with_backward:
        paths["torch_backward"] = lambda: selective_scan_backward(gy, *x)
        if scan_cpu.available():
            paths["compiled_backward"] = lambda: torch.ops.qmamba.selective_scan_backward(gy, *x, True)
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        for fn in paths.values():                  # warm-up (and the kernel's first build)
            fn()
        for _ in range(repeats):
            for name, fn in paths.items():
                times[name].append(_timed(fn))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"L": length, "chunk": default_chunk(length), "median_s": med, "all_s": times}


def _ms(m: dict, key: str, width: int) -> str:
    return f"{m[key] * 1e3:{width}.1f}" if key in m else f"{'-':>{width}}"


def _ratio(m: dict, a: str, b: str) -> str:
    return f"{m[a] / m[b]:7.1f}x" if a in m and b in m else f"{'-':>8}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-backward", action="store_true", help="skip the gradient timings")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference loop (slow at long L)")
    parser.add_argument("--shape", type=int, nargs=3, default=[384, 16, 4], metavar=("D", "N", "K"))
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()

    shape = tuple(args.shape)
    rows = [bench(length, args.repeats, not args.no_backward, shape, not args.no_reference) for length in args.lengths]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={shape[0]} N={shape[1]} K={shape[2]} "
          f"B=1 float32, median of {args.repeats}; compiled kernel: {scan_cpu.backend()}")
    print(f"{'L':>6} {'reference ms':>13} {'chunked ms':>11} {'compiled ms':>12} {'speed-up':>8} "
          f"{'torch bwd ms':>13} {'compiled bwd ms':>16} {'speed-up':>8}")
    for r in rows:
        m = r["median_s"]
        print(f"{r['L']:>6} {_ms(m, 'reference', 13)} {_ms(m, 'chunked', 11)} {_ms(m, 'compiled', 12)} "
              f"{_ratio(m, 'chunked', 'compiled')} {_ms(m, 'torch_backward', 13)} {_ms(m, 'compiled_backward', 16)} "
              f"{_ratio(m, 'torch_backward', 'compiled_backward')}")
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.machine(), "processor": platform.processor(), "compiled": scan_cpu.backend(),
                "shape": {"B": 1, "D": shape[0], "N": shape[1], "K": shape[2], "dtype": "float32"},
                "repeats": args.repeats}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
