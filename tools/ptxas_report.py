"""Registers, spills and 128-bit memory instructions of the selective-scan kernels, per GPU
architecture, I/O type and state size N -> a markdown table (for docs/deploy.md) and JSON.

    python3 tools/ptxas_report.py [--archs 87 90] [--json out.json]

Compiles trt_plugins/selective_scan (kernel + tests/kernel_check.cu) once with nvcc
``-Xptxas -v`` for every architecture given (no GPU needed), reads ptxas's report for each
kernel -- `scan` (one pass, or pass 2 of the segmented mode), `maps` (pass 1) and `fused` (the
fused mode, N <= 12) -- and, with cuobjdump and nvdisasm (the CUDA toolkit's, or `pip install
nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`), counts LDG.E.128 / STG.E.128 / LDS.128 / STS.128 /
LDGSTS.E.BYPASS.128 (cp.async) / MUFU.EX2 / SHFL and local-memory instructions in their SASS.
Exits 1 when a kernel uses more than 128 registers, spills, has a stack frame, uses local memory,
or lacks the 128-bit global loads (and, for `scan`, stores) of its main path. Takes about a minute
per architecture on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from itertools import groupby
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmamba_deploy.trt import plugin  # noqa: E402


def ranges(values: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    out = []
    for _, run in groupby(enumerate(sorted(values)), key=lambda iv: iv[1] - iv[0]):
        run = [v for _, v in run]
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def table(rows: list[plugin.KernelResources]) -> str:
    """One line per (arch, io, kernel): the register range over N, spills, and the SASS counts
    (a range where they grow with N: the staging of N B and C rows is unrolled)."""
    lines = ["| arch | I/O | kernel | N | registers | spill bytes (st/ld), stack | LDG.E.128 | STG.E.128 | "
             "LDS.128 | STS.128 | LDGSTS.128 | MUFU.EX2 | LDL/STL | shared memory (bytes) |",
             "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    key = lambda r: (r.arch, r.io, r.kernel)  # noqa: E731
    for (arch, io, kernel), group in groupby(sorted(rows, key=key), key=key):
        group = list(group)
        regs = sorted({r.registers for r in group})
        spills = {(r.spill_stores, r.spill_loads, r.stack) for r in group}
        sass = {tuple(sorted(r.sass.items())) for r in group}
        s = group[0].sass

        def count(op: str, group=group, s=s) -> str:
            values = sorted({r.sass.get(op, 0) for r in group}) if s else []
            if len(values) > 3:  # grows with N (the staging loop is unrolled per N)
                return f"{values[0]}-{values[-1]}"
            return "/".join(map(str, values)) if values else "-"
        spill_text = ", ".join(f"{a}/{b}, {c}" for a, b, c in sorted(spills))
        local = "-" if not s else "/".join(sorted({f"{r.sass.get('LDL', 0)}/{r.sass.get('STL', 0)}" for r in group}))
        smem = f"{min(r.smem for r in group)}-{max(r.smem for r in group)}"
        lines.append(f"| {arch} | {io} | {kernel} | {ranges([r.state for r in group])} | "
                     f"{regs[0]}-{regs[-1]} | {spill_text} | {count('LDG.E.128')} | {count('STG.E.128')} | "
                     f"{count('LDS.128')} | {count('STS.128')} | {count('LDGSTS.E.BYPASS.128')} | "
                     f"{count('MUFU.EX2')} | {local} | {smem} |")
        del sass
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", type=int, nargs="+", default=[87, 90])
    ap.add_argument("--json", type=Path, help="also write every kernel's figures here")
    args = ap.parse_args()
    log: list = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = plugin.nvcc_compile(Path(tmp), archs=args.archs, ptxas_log=log)
        with_sass = plugin.cuda_binary("cuobjdump") and plugin.cuda_binary("nvdisasm")
        rows = plugin.kernel_report(log[0], exe if with_sass else None)
    print(table(rows))
    if not with_sass:
        print("\n(no cuobjdump/nvdisasm: SASS not checked)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    problems = [f"{r.arch} {r.io} N={r.state} {r.kernel}: {p}" for r in rows for p in r.problems()]
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    print(f"\n{len(rows)} kernels, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
