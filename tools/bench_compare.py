"""Two checkouts side by side: the same benchmark, interleaved, in one run -> ratios and GFLOP/s.

    python3 tools/bench_compare.py --base 0526ae9 [--new .] [--sizes 64 128] [--rounds 5]
                                   [--what forward qat ort-fp32 ort-w8a8] [--json out.json]

``--base`` is a commit (checked out into a git worktree under /tmp) or a folder; ``--new`` the
same (default: this checkout). Each round runs every benchmark once for each checkout, in
alternating order, each in a fresh process with that checkout first on ``sys.path`` and the same
thread count, so slow phases of a noisy machine hit both sides; the result per side is the
median over rounds of the per-round median latency. Benchmarks (MambaIRv2-light x4, the real
weights of ../shared/checkpoints):

* ``forward``: FP32 PyTorch forward at 1x3xSxS (inference mode);
* ``qat``: one QAT iteration of W4A4 Q-MambaIR (DLS + RFA + LSQ+, gumbel routing as in
  training): batch 2 of 24-pixel LR patches, L1 loss, backward, Adam step (the checkout's own
  ``qmamba_deploy.train.adam`` where it has one, as its training loops build it; torch's default
  ``Adam`` for older checkouts);
* ``ort-fp32`` / ``ort-w8a8``: ONNX Runtime on each checkout's own export of the model (FP32,
  plugin scan; W8A8 minmax with the scan of ``--base-w8a8-scan`` / ``--new-w8a8-scan``, portable by
  default: the fastest graph 0526ae9 exported), made once per checkout into the cache folder and run
  by that checkout's runtime.

GFLOP/s divide the forward's FLOPs (``torch.utils.flop_counter``, counted once) by the latency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT.parent / "shared" / "checkpoints" / "mambairv2_light_x4.safetensors"
CACHE = Path(tempfile.gettempdir()) / "qmamba-bench-compare"


# ----------------------------------------------------------------------------- the worker


def _worker(what: str, size: int, iterations: int, threads: int, export_dir: str | None) -> dict:
    """Runs in the checkout under test (its qmamba_deploy first on sys.path)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    times = []
    if what == "forward":
        from qmamba_deploy import load_model

        model = load_model(CHECKPOINT).eval()
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            model(x)
            for _ in range(iterations):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    elif what == "qat":
        from qmamba_deploy import load_model
        from qmamba_deploy.quant import QConfig, calibrating, quantize_model

        model = quantize_model(load_model(CHECKPOINT), QConfig("qmambair", 4, 4))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad(), calibrating(model):
            model(torch.rand(2, 3, size, size, generator=g))
        model.train()
        if hasattr(model, "set_routing"):
            model.set_routing("gumbel")
        params = [p for p in model.parameters() if p.requires_grad]
        try:  # the checkout's own training optimizer (fused Adam since it exists), else torch's default Adam
            from qmamba_deploy.train import adam
        except ImportError:
            opt = torch.optim.Adam(params, lr=1e-5)
        else:
            opt = adam(params, lr=1e-5)
        x, gt = torch.rand(2, 3, size, size, generator=g), torch.rand(2, 3, 4 * size, 4 * size, generator=g)
        for i in range(iterations + 1):
            start = time.perf_counter()
            loss = torch.nn.functional.l1_loss(model(x), gt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:  # the first iteration allocates
                times.append(time.perf_counter() - start)
    elif what.startswith("ort-"):
        import numpy as np

        from qmamba_deploy.runtime.ort import ort_session

        session = ort_session(Path(export_dir) / "model.onnx", threads=threads)
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)}
        session.run(None, feed)
        for _ in range(iterations):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
    else:
        raise SystemExit(f"unknown benchmark {what}")
    return {"median_ms": 1000 * statistics.median(times), "times_ms": [1000 * t for t in times]}


def _export(checkout: Path, what: str, w8a8_scan: str = "portable") -> Path:
    """The checkout's own export of the x4 model for ``what`` (cached per checkout): FP32 with the plugin
    scan, or W8A8 minmax with ``w8a8_scan``."""
    tag = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or checkout.name
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "qmamba_deploy"],
                           capture_output=True, text=True).stdout.strip()
    folder = what if what == "ort-fp32" else f"{what}-{w8a8_scan}"
    out = CACHE / f"{tag}{'-dirty' if dirty else ''}" / folder
    if (out / "model.onnx").is_file() and not dirty:
        return out
    args = ["export", "--checkpoint", str(CHECKPOINT), "--out", str(out), "--no-validate", "--quiet"]
    args += ["--method", "none"] if what == "ort-fp32" else ["--method", "minmax", "--scan", w8a8_scan]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    subprocess.run([sys.executable, "-m", "qmamba_deploy.cli", *args], cwd=checkout, env=env, check=True,
                   capture_output=True)
    return out


def _run(checkout: Path, what: str, size: int, iterations: int, threads: int, export_dir: Path | None,
         allocator: dict[str, str]) -> dict:
    env = {**os.environ, **allocator, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", what, "--size", str(size), "--iterations",
           str(iterations), "--threads", str(threads)] + (["--export-dir", str(export_dir)] if export_dir else [])
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark {what} at {size} in {checkout} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _checkout(ref: str) -> Path:
    path = Path(ref)
    if path.is_dir():
        return path.resolve()
    target = CACHE / f"worktree-{ref}"
    if not target.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(target), ref], check=True,
                       capture_output=True)
    return target


def _flops(size: int, qat: bool) -> float:
    """Forward FLOPs of the x4 model at 1x3xSxS (x2 batch and x3 for forward + backward in QAT)."""
    from qmamba_deploy import load_model
    from qmamba_deploy.jobs.bench import forward_flops

    return forward_flops(load_model(CHECKPOINT), (1, 3, size, size)) * (2 * 3 if qat else 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--export-dir", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--base", default="0526ae9")
    ap.add_argument("--new", default=str(ROOT))
    ap.add_argument("--what", nargs="+", default=["forward", "qat"],
                    choices=["forward", "qat", "ort-fp32", "ort-w8a8"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--qat-size", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-w8a8-scan", choices=["portable", "plugin"], default="portable",
                    help="the scan of the base side's ort-w8a8 export (portable: the fastest graph 0526ae9 exported)")
    ap.add_argument("--new-w8a8-scan", choices=["portable", "plugin"], default="portable",
                    help="the scan of the new side's ort-w8a8 export")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--allocator", choices=["default", "cli"], default="default",
                    help="cli: run the new side with the allocator settings the qmamba-deploy command sets "
                         "(qmamba_deploy.runtime.allocator), the base side as it is")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.size, args.iterations, args.threads, args.export_dir)))
        return 0
    if not CHECKPOINT.is_file():
        raise SystemExit(f"{CHECKPOINT} is missing (../shared beside the clone)")
    sides = {"base": _checkout(args.base), "new": _checkout(args.new)}
    allocator = {"base": {}, "new": {}}
    if args.allocator == "cli":
        from qmamba_deploy.runtime.allocator import ENVIRONMENT
        allocator["new"] = ENVIRONMENT
    jobs = [(w, s) for w in args.what for s in ([args.qat_size] if w == "qat" else args.sizes)]
    scans = {"base": args.base_w8a8_scan, "new": args.new_w8a8_scan}
    exports = {(name, w): _export(path, w, scans[name]) for name, path in sides.items() for w in args.what
               if w.startswith("ort-")}
    samples: dict[tuple[str, str, int], list[float]] = {}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for what, size in jobs:
            for name in order:
                res = _run(sides[name], what, size, args.iterations, args.threads, exports.get((name, what)),
                           allocator[name])
                samples.setdefault((name, what, size), []).append(res["median_ms"])
                print(f"round {r + 1} {name} {what} {size}: {res['median_ms']:.1f} ms", flush=True)
    rows = []
    for what, size in jobs:
        base = statistics.median(samples[("base", what, size)])
        new = statistics.median(samples[("new", what, size)])
        flops = _flops(size, what == "qat")
        rows.append({"what": what, "size": size, "base_ms": base, "new_ms": new, "speedup": base / new,
                     "base_gflops": flops / base / 1e6, "new_gflops": flops / new / 1e6,
                     "base_samples": samples[("base", what, size)], "new_samples": samples[("new", what, size)]})
    scan_note = f", W8A8 scan {scans['base']} / {scans['new']}" if "ort-w8a8" in args.what else ""
    print(f"\nbase {sides['base']} vs new {sides['new']}{scan_note}"
          f"{' (allocator as the CLI sets it)' if args.allocator == 'cli' else ''}, {args.threads} threads, "
          f"{args.rounds} rounds, median of per-round medians over {args.iterations} iterations\n")
    print("| benchmark | input | base ms | new ms | speed-up | base GFLOP/s | new GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        shape = f"2x3x{row['size']}x{row['size']}" if row["what"] == "qat" else f"1x3x{row['size']}x{row['size']}"
        print(f"| {row['what']} | {shape} | {row['base_ms']:.1f} | {row['new_ms']:.1f} | {row['speedup']:.2f}x | "
              f"{row['base_gflops']:.1f} | {row['new_gflops']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"base": str(sides["base"]), "new": str(sides["new"]), "threads": args.threads,
                                         "allocator": args.allocator, "rounds": args.rounds, "w8a8_scan": scans,
                                         "iterations": args.iterations, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
