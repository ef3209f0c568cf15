"""Benchmark the SelectiveScan paths on CPU: reference loop vs chunked, and op fwd+bwd.

    python tools/bench_scan.py [--lengths 1024 4096 16384] [--repeats 5] [--json out.json]

The paths are timed interleaved (ref, chunked, op fwd+bwd in turn, each repeat) so
that machine noise hits them alike; the table shows medians. D=384, N=16, K=4, B=1,
float32, torch's default thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from qmamba_deploy.ops.selective_scan import (
    default_chunk,
    selective_scan,
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


def bench(length: int, repeats: int, with_backward: bool) -> dict:
    x = make_inputs(length)
    xg = [t.clone().requires_grad_() for t in x]

    def fwd_bwd():
        y = selective_scan(*xg)
        y.backward(torch.ones_like(y))

    paths = {"reference": lambda: selective_scan_ref(*x), "chunked": lambda: selective_scan_chunked(*x)}
    if with_backward:
        paths["op_fwd_bwd"] = fwd_bwd
    with torch.no_grad():                      # warm-up
        selective_scan_chunked(*x)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            if name == "op_fwd_bwd":
                times[name].append(_timed(fn))
            else:
                with torch.no_grad():
                    times[name].append(_timed(fn))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "L": length,
        "chunk": default_chunk(length),
        "median_s": med,
        "all_s": times,
        "speedup_chunked_vs_reference": med["reference"] / med["chunked"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-backward", action="store_true", help="skip the op forward+backward timing")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()

    rows = [bench(length, args.repeats, not args.no_backward) for length in args.lengths]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D=384 N=16 K=4 B=1 float32, "
          f"median of {args.repeats}")
    print(f"{'L':>6} {'T':>4} {'reference ms':>13} {'chunked ms':>11} {'speedup':>8} {'op fwd+bwd ms':>14}")
    for r in rows:
        m = r["median_s"]
        bwd = f"{m['op_fwd_bwd'] * 1e3:14.1f}" if "op_fwd_bwd" in m else f"{'-':>14}"
        print(f"{r['L']:>6} {r['chunk']:>4} {m['reference'] * 1e3:13.1f} {m['chunked'] * 1e3:11.1f} "
              f"{r['speedup_chunked_vs_reference']:7.1f}x {bwd}")
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.machine(), "processor": platform.processor(),
                "shape": {"B": 1, "D": 384, "N": 16, "K": 4, "dtype": "float32"}, "repeats": args.repeats}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
