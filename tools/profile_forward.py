"""Where one PyTorch forward spends its time -> a markdown table (docs/performance.md).

    python3 tools/profile_forward.py [--size 64] [--threads 2] [--top 15] [--checkpoint PATH]

MambaIRv2-light x4 (real weights of ../shared/checkpoints by default), FP32, inference mode, one
warm-up forward, then torch.profiler over ``--repeat`` forwards. Rows: aten operators by self CPU
time (summed over the repeats, divided by them), with call counts per forward; plus the share of
the selective scan (the custom op's total, its inner operators included) and the FLOP count
(jobs.bench.forward_flops), so the achieved GFLOP/s can be read off the same run.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from qmamba_deploy import load_model
from qmamba_deploy.jobs.bench import forward_flops
from qmamba_deploy.ops import contract

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT.parent / "shared" / "checkpoints" / "mambairv2_light_x4.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).eval()
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    flops = forward_flops(model, x.shape)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeat):
                model(x)
        wall = (time.perf_counter() - start) / args.repeat
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) / args.repeat / 1e3
    scan = [e for e in events if e.key == f"{contract.TORCH_NAMESPACE}::{contract.TORCH_OP_NAME}"]
    scan_ms = (scan[0].cpu_time_total / args.repeat / 1e3) if scan else 0.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]

    print(f"MambaIRv2-light x4, 1x3x{args.size}x{args.size}, FP32, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.machine()}; {flops / 1e9:.2f} GFLOP; one forward {wall * 1e3:.0f} ms under the profiler "
          f"({flops / wall / 1e9:.1f} GFLOP/s); the selective scan {scan_ms:.0f} ms "
          f"({100 * scan_ms / (wall * 1e3):.0f} %) in total.\n")
    print("| operator | self ms / forward | share | calls / forward |")
    print("|---|---:|---:|---:|")
    for e in rows:
        ms = e.self_cpu_time_total / args.repeat / 1e3
        print(f"| `{e.key}` | {ms:.1f} | {100 * ms / total_self:.0f} % | {e.count // args.repeat} |")


if __name__ == "__main__":
    main()
