"""The fake quantizers' training kernels against their reference compositions, in one process.

    python3 tools/bench_quantizers.py [--rounds 10] [--threads 2] [--no-step]

Two measurements, each alternating three sides in the same process so that a noisy machine hits
all: the reference compositions (``quant.fused.reference_autograd``), the kernels on their torch
passes (``quant.fused.torch_passes``) and the kernels on their compiled passes
(``quant/fake_quant_cpu.py``; the torch passes again where no C compiler is installed):

* per quantizer kind, forward and backward of one call at the sizes a W4A4 Q-MambaIR step at
  24 px patches sees (activations of 2·24·24 tokens × 48/192 channels, weights 48×48 and 192×48);
* the whole QAT step of ``tools/bench_compare.py --what qat`` (MambaIRv2-light ×4 real weights,
  W4A4 Q-MambaIR, batch 2 of 24 px patches, gumbel routing, L1, backward, Adam): forward,
  backward and optimizer step separately; the reference side with torch's default Adam (a
  Python loop per parameter), the kernel sides with ``train.adam`` (fused).

The allocator is set as the CLI sets it (runtime/allocator.py). Prints medians in ms.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from qmamba_deploy.quant import fake_quant_cpu, fused
from qmamba_deploy.quant.quantizers import DLS, LSQ, RFA
from qmamba_deploy.runtime.allocator import keep_freed_memory

CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "mambairv2_light_x4.safetensors"

CASES = [("lsq+ activation", lambda: LSQ(4, offset=True), (2, 576, 48)),
         ("lsq+ activation", lambda: LSQ(4, offset=True), (2, 576, 192)),
         ("dls activation", lambda: DLS(4), (2, 576, 48)),
         ("dls scan operand", lambda: DLS(4), (1, 96, 1152)),
         ("rfa weight", lambda: RFA(4), (48, 48)),
         ("rfa weight", lambda: RFA(4), (192, 48))]


SIDES = ("reference", "torch", "compiled")


def _mode(side: str):
    if side == "reference":
        return fused.reference_autograd()
    return fused.torch_passes() if side == "torch" else contextlib.nullcontext()


def _orders(r: int) -> tuple[str, ...]:
    """The sides in round ``r``'s order (rotating, so that no side always runs first)."""
    k = r % len(SIDES)
    return SIDES[k:] + SIDES[:k]


def bench_quantizers(rounds: int, calls: int = 30) -> list[dict]:
    rows = []
    for name, make, shape in CASES:
        q = make().train()
        x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            q(x0)
        x = x0.clone().requires_grad_(True)
        times = {side: ([], []) for side in SIDES}
        for r in range(rounds):
            for side in _orders(r):
                with _mode(side):
                    q(x).sum().backward()
                    fwd = bwd = 0.0
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        y = q(x)
                        t1 = time.perf_counter()
                        y.backward(torch.ones_like(y))
                        fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
                times[side][0].append(fwd / calls * 1e3)
                times[side][1].append(bwd / calls * 1e3)
        rows.append({"case": name, "shape": "x".join(map(str, shape)),
                     **{f"{side}_{part}": statistics.median(times[side][i])
                        for side in SIDES for i, part in enumerate(("fwd", "bwd"))}})
    return rows


def bench_step(rounds: int, size: int = 24) -> dict:
    from qmamba_deploy import load_model
    from qmamba_deploy.quant import QConfig, calibrating, quantize_model
    from qmamba_deploy.train import adam

    torch.manual_seed(0)
    model = quantize_model(load_model(CHECKPOINT), QConfig("qmambair", 4, 4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), calibrating(model):
        model(torch.rand(2, 3, size, size, generator=g))
    model.train()
    model.set_routing("gumbel")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = {"reference": torch.optim.Adam(params, lr=1e-5), "torch": adam(params, lr=1e-5),
                  "compiled": adam(params, lr=1e-5)}
    x, gt = torch.rand(2, 3, size, size, generator=g), torch.rand(2, 3, 4 * size, 4 * size, generator=g)

    def step(side: str) -> tuple[float, float, float]:
        opt = optimizers[side]
        with _mode(side):
            t0 = time.perf_counter()
            loss = torch.nn.functional.l1_loss(model(x), gt)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            return t1 - t0, t2 - t1, time.perf_counter() - t2

    for side in SIDES:
        step(side)
    samples = {side: [] for side in SIDES}
    for r in range(rounds):
        for side in _orders(r):
            samples[side].append(step(side))
    out = {"quantizers": len([m for m in model.modules() if isinstance(m, (LSQ, RFA, DLS))]),
           "parameters": len(params)}
    for side in SIDES:
        parts = list(zip(*samples[side]))
        out[side] = {k: statistics.median(v) * 1e3 for k, v in zip(("forward", "backward", "optimizer"), parts)}
        out[side]["step"] = statistics.median(sum(s) for s in samples[side]) * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-step", action="store_true", help="only the per-quantizer table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds (the three sides "
          f"alternating), medians; compiled passes: {fake_quant_cpu.backend()}\n")
    print("| quantizer | input | reference fwd / bwd ms | torch passes fwd / bwd ms | compiled fwd / bwd ms "
          "| compiled vs reference | compiled vs torch passes |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in bench_quantizers(args.rounds):
        tot = {side: row[f"{side}_fwd"] + row[f"{side}_bwd"] for side in SIDES}
        cells = " | ".join(f"{row[f'{side}_fwd']:.2f} / {row[f'{side}_bwd']:.2f}" for side in SIDES)
        print(f"| {row['case']} | {row['shape']} | {cells} | {tot['reference'] / tot['compiled']:.2f}x | "
              f"{tot['torch'] / tot['compiled']:.2f}x |")
    if not args.no_step:
        if not CHECKPOINT.is_file():
            raise SystemExit(f"{CHECKPOINT} is missing (../shared beside the clone); use --no-step")
        s = bench_step(args.rounds)
        print(f"\nQAT step, W4A4 Q-MambaIR, MambaIRv2-light x4, 2x3x24x24 ({s['quantizers']} quantizers, "
              f"{s['parameters']} trained tensors)\n")
        print("| side | forward ms | backward ms | optimizer ms | step ms |")
        print("|---|---:|---:|---:|---:|")
        for side, label in (("reference", "reference compositions + torch Adam"),
                            ("torch", "kernels, torch passes + fused Adam (train.adam)"),
                            ("compiled", "kernels, compiled passes + fused Adam")):
            t = s[side]
            print(f"| {label} | {t['forward']:.0f} | {t['backward']:.0f} | {t['optimizer']:.0f} | {t['step']:.0f} |")
        print(f"\nstep speed-up: compiled passes {s['reference']['step'] / s['compiled']['step']:.2f}x the reference, "
              f"{s['torch']['step'] / s['compiled']['step']:.2f}x the torch passes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
