"""Instructions per step of the selective-scan kernels, counted in their SASS, and the roofline
model built on them (docs/deploy.md, "Roofline model"). No GPU is needed; no GPU measured it.

    python3 tools/sass_steps.py [--archs 90 87] [--states 8 10 16] [--json out.json]

Compiles the kernel (with tests/kernel_check.cu, as tools/ptxas_report.py does), reads each
kernel's SASS with cuobjdump and counts, along the main path of its decaying tiles
(qmamba_deploy/trt/sass_paths.py): the tile loop, the state loop, MUFU and shared-memory bytes
per (channel, step), the block's setup and tail, and the cost per composed map (the fused
kernel: its whole path, with its two state loops). Then the
model for MambaIRv2-light (D = 48, K = 1, N = 8) on H100, H200 (sm_90 counts) and Orin (sm_87):

* compute: an SM issues 4 warp instructions per clock; a share eta_issue = 0.8 of the slots is
  kept busy (an assumption); MUFU: 16 per SM per clock; shared memory: 128 bytes per clock;
* memory: the op's minimum bytes per (channel, step), 3 s + 2 N s / D (s = element size), at
  eta_dram = 0.9 of the peak;
* one pass, a full wave of blocks (large batch); at batch 1, 128x128 (L = 16384): two passes with
  the segments the launcher picks on that GPU (host harness --plan; pass 1 on S - 1 segments,
  pass 2 on S, each block's setup and tail, pass 2's composition of the earlier maps), and the
  fused mode where the launcher picks it (all blocks resident at 4 per SM: one tile per block,
  its whole path once, the composition of the earlier tiles' maps).

The fraction of HBM bandwidth = min(compute rate, memory rate) / (HBM rate at the minimum bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmamba_deploy.trt import plugin, sass_paths  # noqa: E402

ETA_ISSUE = 0.8
ETA_DRAM = 0.9
ISSUE_PER_CLOCK = 128   # thread instructions per SM per clock (4 schedulers x 32 lanes)
MUFU_PER_CLOCK = 16
SMEM_BYTES_PER_CLOCK = 128
THREADS, CHANNELS, ITEMS = 128, 8, sass_paths.ITEMS


@dataclass
class Gpu:
    name: str
    arch: str
    bandwidth: float  # bytes / s
    sms: int
    clock: float      # Hz


GPUS = [Gpu("H100 SXM", "sm_90", 3.35e12, 132, 1.98e9), Gpu("H200 SXM", "sm_90", 4.8e12, 132, 1.98e9),
        Gpu("Jetson AGX Orin 64 GB", "sm_87", 204.8e9, 16, 1.3e9)]
#: MambaIRv2-light's scans: u = [B, 48, L], one group, N = 8; batch 1 at 128x128.
LIGHT = dict(dim=48, groups=1, state=8, length=16384)


def min_bytes(elem: int, dim: int, state: int) -> float:
    """u, delta read and y written once; B and C once per group of `dim` channels."""
    return 3 * elem + 2 * state * elem / dim


@dataclass
class Work:
    """Thread instructions, MUFU and shared-memory bytes per (channel, step)."""
    issue: float
    mufu: float
    smem: float

    def clocks(self) -> float:
        """SM clocks per (channel, step): the slowest of issue, MUFU and shared memory."""
        return max(self.issue / (ETA_ISSUE * ISSUE_PER_CLOCK), self.mufu / MUFU_PER_CLOCK,
                   self.smem / SMEM_BYTES_PER_CLOCK)


def per_block(instructions: float, steps: int) -> float:
    """Once-per-block work of every thread as instructions per (channel, step) of the block."""
    return THREADS * instructions / (CHANNELS * steps)


def one_pass(c: sass_paths.StepCounts, length: int) -> Work:
    return Work(c.per_step + per_block(c.setup + c.tail, length), c.mufu_per_step, c.smem_per_step)


def composed_maps(states: int, segments: int) -> float:
    """Maps of earlier segments one thread composes, on average over the segments
    (scan::compose_parts() threads per (channel, state))."""
    parts = 1
    while 2 * parts * CHANNELS * states <= THREADS:
        parts *= 2
    return sum(math.ceil(s / parts) for s in range(segments)) / segments


def fused(c: sass_paths.StepCounts, segments: int) -> Work:
    """The fused mode: one tile per block, its whole path once per tile."""
    return Work(c.per_step + per_block(composed_maps(c.states, segments) * c.map_cost, ITEMS * sass_paths.ITEMS),
                c.mufu_per_step, c.smem_per_step)


def two_passes(scan: sass_paths.StepCounts, maps: sass_paths.StepCounts, segments: int, seg_len: int) -> list:
    """[pass 1, pass 2] per (channel, step) of the whole sequence."""
    composed = composed_maps(scan.states, segments)
    share = (segments - 1) / segments
    p1 = Work(share * (maps.per_step + per_block(maps.setup + maps.tail, seg_len)), share * maps.mufu_per_step,
              share * maps.smem_per_step)
    p2 = Work(scan.per_step + per_block(scan.setup + scan.tail + composed * scan.map_cost, seg_len),
              scan.mufu_per_step, scan.smem_per_step)
    return [p1, p2]


def fraction(gpu: Gpu, works: list, elem: int, state: int, dim: int) -> dict:
    bytes_min = min_bytes(elem, dim, state)
    hbm_rate = gpu.bandwidth / (bytes_min * gpu.sms * gpu.clock)  # steps per SM per clock
    compute_rate = 1.0 / sum(w.clocks() for w in works)
    rate = min(compute_rate, ETA_DRAM * hbm_rate)
    return {"fraction": rate / hbm_rate, "compute_rate": compute_rate, "hbm_rate": hbm_rate,
            "bound": "compute" if compute_rate < ETA_DRAM * hbm_rate else "HBM",
            "issue": sum(w.issue for w in works), "mufu": sum(w.mufu for w in works)}


def plan(harness: Path, batch: int, gpu: Gpu, fused_blocks_per_sm: int, blocks_per_sm: int = 4) -> dict:
    """The launcher's choice (host harness --plan) at the kernels' 4 resident blocks per SM."""
    out = subprocess.run([str(harness), "--plan", str(batch), str(LIGHT["dim"]), str(LIGHT["groups"]),
                          str(LIGHT["length"]), str(LIGHT["state"]), str(gpu.sms), str(blocks_per_sm),
                          str(fused_blocks_per_sm)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def counts_of(binary: Path, states: set) -> dict:
    """(arch, io, N, kernel) -> StepCounts for the kernels of `binary`."""
    cuobjdump, nvdisasm = plugin.cuda_binary("cuobjdump"), plugin.cuda_binary("nvdisasm")
    if not cuobjdump or not nvdisasm:
        raise SystemExit("cuobjdump and nvdisasm are needed: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    env = {"PATH": f"{Path(nvdisasm).parent}:/usr/bin:/bin"}
    text = subprocess.run([cuobjdump, "-sass", str(binary)], capture_output=True, text=True, check=True, env=env).stdout
    out = {}
    for arch, part in sass_paths.split_architectures(text).items():
        for name, instrs in sass_paths.parse_functions(part).items():
            key = plugin._kernel_key(name)
            if key and key[1] in states:
                count = sass_paths.fused_counts if key[2] == "fused" else sass_paths.decaying_counts
                out[(arch, *key)] = count(instrs, key[1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", type=int, nargs="+", default=[90, 87])
    ap.add_argument("--states", type=int, nargs="+", default=[8, 10, 16])
    ap.add_argument("--json", type=Path, help="also write the counts and the model here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = plugin.nvcc_compile(Path(tmp), archs=args.archs)
        counts = counts_of(exe, set(args.states) | {LIGHT["state"]})
        harness = plugin.compile_host_harness(Path(tmp))
        print("| arch | I/O | N | kernel | tile loop | state loop | instructions / step | MUFU / step | "
              "shared bytes / step | block setup | block tail | per composed map |")
        print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for (arch, io, n, kernel), c in sorted(counts.items()):
            if n in args.states:
                name = {"maps": "pass 1", "scan": "one pass / pass 2", "fused": "fused"}[kernel]
                print(f"| {arch} | {io} | {n} | {name} | {c.tile} | "
                      f"{c.state or '-'} | {c.per_step:.1f} | {c.mufu_per_step:.2f} | {c.smem_per_step:.0f} | "
                      f"{c.setup} | {c.tail} | {c.map_cost or '-'} |")
        model = []
        print("\n| GPU | I/O | mode | instructions / step | MUFU / step | fraction of HBM | bound |")
        print("|---|---|---|---:|---:|---:|---|")
        for gpu in GPUS:
            for io, elem in (("fp32", 4), ("fp16", 2)):
                key = (gpu.arch, io, LIGHT["state"])
                if key + ("scan",) not in counts:
                    continue
                scan, maps, fuse = (counts[key + (k,)] for k in ("scan", "maps", "fused"))
                two = plan(harness, 1, gpu, 0)
                auto = plan(harness, 1, gpu, 4)
                modes = {"one pass, full wave": [one_pass(scan, LIGHT["length"])],
                         f"batch 1: two passes, {two['segments']} segments": two_passes(
                             scan, maps, two["segments"], two["segment_length"])}
                if auto["fused"]:
                    modes[f"batch 1: fused, {auto['segments']} tiles"] = [fused(fuse, auto["segments"])]
                for mode, works in modes.items():
                    f = fraction(gpu, works, elem, LIGHT["state"], LIGHT["dim"])
                    model.append({"gpu": gpu.name, "io": io, "mode": mode, **f})
                    print(f"| {gpu.name} | {io} | {mode} | {f['issue']:.1f} | {f['mufu']:.2f} | "
                          f"{100 * f['fraction']:.0f} % | {f['bound']} |")
    if args.json:
        args.json.write_text(json.dumps({"counts": [{"key": list(k), **{f: v for f, v in asdict(c).items()
                                                                         if not f.endswith("ops")},
                                                     "per_step": c.per_step} for k, c in counts.items()],
                                         "model": model}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
