"""The prepared GPU check: everything that needs an NVIDIA GPU, in one run of a few minutes.

    python3 tools/device_check.py --out OUT [--shared ../shared] [--device cuda] [--quick]

Steps (each recorded as ok / failed / skipped with the reason, timed):

1. environment: GPU, driver, torch and its CUDA, nvcc, TensorRT, ONNX Runtime providers;
2. kernel: ``tools/gpu_kernel_check.sh`` (the selective-scan kernel against a float64 reference
   in one-pass and segmented modes, timed against the bandwidth bound, compute-sanitizer) when
   present, and ``tools/bench_scan_gpu.py`` (the kernel next to the PyTorch scan on the released
   models' shapes);
3. torch-cuda: the real MambaIRv2-light x4 weights on CUDA against the official output (the
   parity fixture) and against the same model on the CPU, for a real photo;
4. bundle-cuda: the same weights quantized W8A8 (PTQ) and folded into a deploy bundle, run by the
   TorchRunner on CUDA and on the CPU over the eval images (PSNR-between, Y-PSNR of each);
5. bench: ``bench_runner`` latency of the x4 model on CUDA at 64, 128 and 256 pixels (fp32 and
   the W8A8 bundle);
6. tensorrt: when TensorRT imports, the W8A8 portable export built into an engine and validated
   with ``validate`` (TrtRunner against the bundle's PyTorch model on the GPU); else skipped;
7. ort-cuda: ONNX Runtime's CUDA provider on the portable export, when onnxruntime-gpu is there.

Writes OUT/device_check.json and OUT/device_check.md; exits 1 when a step failed. The real
weights and fixtures come from ``--shared`` (``../shared`` beside a clone; on the device machine,
a copy carried into the repository, see docs/deploy.md). ``--device cpu`` runs the same steps on
the CPU with the GPU-only steps skipped (how CI checks this script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout too (no pip install on the device machine)

from qmamba_deploy.artifacts import kind, write_json, write_text  # noqa: E402
from qmamba_deploy.errors import QMambaError  # noqa: E402


class Skip(Exception):
    """A step that cannot run here; the message says why."""


def _run(cmd: list[str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _first_line(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        proc = _run(cmd, 30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    from qmamba_deploy.metrics import psnr_between

    return psnr_between(a.float().cpu(), b.float().cpu())


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cuda = args.device == "cuda"
        self.shared = Path(args.shared) if args.shared else None
        self.out = Path(args.out)
        self.work = Path(tempfile.mkdtemp(prefix="device-check-"))
        self.steps: list[dict[str, Any]] = []
        self.bundle: Path | None = None

    # -- plumbing -----------------------------------------------------------------------------
    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        start = time.perf_counter()
        entry: dict[str, Any] = {"step": name}
        try:
            entry.update(status="ok", **fn())
        except Skip as exc:
            entry.update(status="skipped", reason=str(exc))
        except (QMambaError, AssertionError, subprocess.SubprocessError, OSError, RuntimeError, ValueError) as exc:
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc(limit=6))
        entry["seconds"] = round(time.perf_counter() - start, 1)
        self.steps.append(entry)
        print(f"[{entry['status']:>7}] {name} ({entry['seconds']} s)"
              + (f": {entry.get('reason') or entry.get('error')}" if entry["status"] != "ok" else ""), flush=True)

    def need_gpu(self) -> None:
        if not self.cuda:
            raise Skip("--device cpu (no GPU step)")
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")

    def shared_file(self, rel: str) -> Path:
        path = self.shared / rel if self.shared else None
        if path is None or not path.exists():
            raise Skip(f"{rel} is not under --shared {self.shared} (carry ../shared/checkpoints and "
                       f"../shared/fixtures/parity, see docs/deploy.md)")
        return path

    # -- steps --------------------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        import onnxruntime as ort

        env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                               "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__,
                               "ort_providers": ort.get_available_providers(),
                               "nvcc": _first_line(["nvcc", "--version"]),
                               "nvidia_smi": _first_line(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                                          "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"])}
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                       memory_gib=round(p.total_memory / 2 ** 30, 1))
        try:
            from qmamba_deploy.runtime.tensorrt import import_tensorrt

            env["tensorrt"] = import_tensorrt("tensorrt").__version__
        except QMambaError as exc:
            env["tensorrt"] = f"not usable: {exc}"
        return env

    def kernel(self) -> dict[str, Any]:
        self.need_gpu()
        if not shutil.which("nvcc"):
            raise RuntimeError("nvcc is not on PATH")
        out: dict[str, Any] = {}
        script = ROOT / "tools" / "gpu_kernel_check.sh"
        if script.is_file():
            folder = self.out / "kernel"
            proc = _run(["bash", str(script), str(folder)], timeout=300)
            out["gpu_kernel_check"] = {"returncode": proc.returncode, "tail": (proc.stdout + proc.stderr)[-3000:]}
            summary = folder / "summary.json"
            if summary.is_file():
                out["gpu_kernel_check"]["summary"] = json.loads(summary.read_text())
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr)[-500:]
                raise RuntimeError(f"gpu_kernel_check.sh exited {proc.returncode}: {tail}")
        md = self.out / "results-scan-gpu.md"
        proc = _run([sys.executable, str(ROOT / "tools" / "bench_scan_gpu.py"), "--iterations",
                     "5" if self.args.quick else "30", "--out", str(md)], timeout=240)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_scan_gpu.py exited {proc.returncode}: {(proc.stdout + proc.stderr)[-800:]}")
        rows = json.loads(md.with_suffix(".json").read_text())
        out["scan_shapes"] = rows
        failed = [r for r in rows if not r.get("passed")]
        if failed:
            raise AssertionError(f"{len(failed)} kernel runs missed the float64 reference: {failed[:2]}")
        return out

    def torch_cuda(self) -> dict[str, Any]:
        from qmamba_deploy.runtime import TorchRunner

        ckpt = self.shared_file("checkpoints/mambairv2_light_x4.safetensors")
        fixture = self.shared_file("fixtures/parity/mambairv2_light_x4_real")
        x = torch.from_numpy(np.load(fixture / "input.npy"))
        official = torch.from_numpy(np.load(fixture / "output.npy"))
        out: dict[str, Any] = {}
        devices = ["cpu"] + (["cuda"] if self.cuda else [])
        if self.cuda:
            self.need_gpu()
            # parity in float32 (TF32 convolutions are cuDNN's default and cost ~1e-3 relative per layer)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        ys = {}
        for dev in devices:
            with TorchRunner(ckpt, device=dev) as r:
                ys[dev] = r(x)
                diff = (ys[dev] - official).abs()
                out[f"{dev}_vs_official"] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                                             "psnr_between_db": _psnr(ys[dev], official)}
        assert out["cpu_vs_official"]["mean_abs"] <= 1e-4, out["cpu_vs_official"]
        if self.cuda:
            assert out["cuda_vs_official"]["mean_abs"] <= 1e-3, out["cuda_vs_official"]
            out["cuda_vs_cpu_psnr_between_db"] = _psnr(ys["cuda"], ys["cpu"])
            out["cuda_tf32"] = False
        return out

    def bundle_cuda(self) -> dict[str, Any]:
        from qmamba_deploy.data.datasets import degrade_pair, load_pairs, to_tensor
        from qmamba_deploy.data.degrade import degradation_for
        from qmamba_deploy.jobs.export import DeployConfig, run_fold
        from qmamba_deploy.runtime import TorchRunner

        ckpt = self.shared_file("checkpoints/mambairv2_light_x4.safetensors")
        folder = self.work / "bundle"
        run_fold(DeployConfig(checkpoint=str(ckpt), method="minmax", calib_batches=2 if self.args.quick else 8),
                 folder)
        self.bundle = folder / "bundle.safetensors"
        deg = degradation_for(4, None)
        pairs = load_pairs("builtin", deg, 3, split="eval")[: 1 if self.args.quick else None]
        devices = ["cpu"] + (["cuda"] if self.cuda else [])
        ys: dict[str, list[torch.Tensor]] = {d: [] for d in devices}
        for dev in devices:
            with TorchRunner(self.bundle, device=dev, bundle=True) as r:
                for pair in pairs:
                    ys[dev].append(r(to_tensor(degrade_pair(pair, deg))))
        out: dict[str, Any] = {"images": [p.name for p in pairs], "qconfig": "minmax W8A8"}
        if self.cuda:
            out["cuda_vs_cpu_psnr_between_db"] = [_psnr(a, b) for a, b in zip(ys["cuda"], ys["cpu"])]
        return out

    def bench(self) -> dict[str, Any]:
        from qmamba_deploy.jobs.bench import BenchSettings, bench_runner
        from qmamba_deploy.runtime import TorchRunner

        ckpt = self.shared_file("checkpoints/mambairv2_light_x4.safetensors")
        sizes = (64,) if self.args.quick or not self.cuda else (64, 128, 256)
        device = "cuda" if self.cuda else "cpu"
        if self.cuda:
            self.need_gpu()
        rows = []
        targets = [("fp32", ckpt, False)] + ([("W8A8 bundle", self.bundle, True)]
                                             if self.bundle and not self.args.quick else [])
        for label, path, is_bundle in targets:
            for side in sizes:
                settings = BenchSettings(shape=(1, 3, side, side), warmup=0 if self.args.quick else 5,
                                         iterations=1 if self.args.quick else 20, device=device)
                result = bench_runner(TorchRunner(path, device=device, bundle=is_bundle), settings).as_dict()
                write_json(self.out / f"bench-torch-{label.split()[0].lower()}-{side}.json", result)
                rows.append({"model": label, "side": side, "p50_ms": result["latency_ms"]["p50"],
                             "p90_ms": result["latency_ms"]["p90"],
                             "output_mp_per_s": result["throughput"]["output_megapixels_per_s"],
                             "peak_mb": (result["memory"]["peak_bytes"] or 0) / 1e6})
        return {"rows": rows}

    def tensorrt(self) -> dict[str, Any]:
        self.need_gpu()
        from qmamba_deploy.runtime.tensorrt import import_tensorrt

        try:
            import_tensorrt("tensorrt")
        except QMambaError as exc:
            raise Skip(str(exc)) from None
        from qmamba_deploy.jobs.export import ExportConfig, run_export
        from qmamba_deploy.jobs.validate import validate_artifacts
        from qmamba_deploy.trt.engine import BuildConfig, Profile, build_engine

        if self.bundle is None:
            raise Skip("no bundle (the bundle-cuda step did not run)")
        export = self.work / "export"
        run_export(ExportConfig(bundle=str(self.bundle), scan="portable", validate=False), export)
        profile = Profile((1, 3, 32, 32), (1, 3, 64, 64), (1, 3, 128, 128))
        manifest = build_engine(BuildConfig(str(export / "model.onnx"), profile), self.work / "engine")
        report = validate_artifacts([str(self.work / "engine" / "model.engine")], data="builtin")
        return {"engine_mb": manifest["engine_bytes"] / 1e6, "build_seconds": manifest["build_seconds"],
                "validation": report.as_dict(), "passed": report.passed}

    def ort_cuda(self) -> dict[str, Any]:
        self.need_gpu()
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
        from qmamba_deploy.jobs.export import ExportConfig, run_export
        from qmamba_deploy.jobs.validate import validate_artifacts

        if self.bundle is None:
            raise Skip("no bundle (the bundle-cuda step did not run)")
        export = self.work / "export-ort"
        run_export(ExportConfig(bundle=str(self.bundle), scan="portable", validate=False), export)
        report = validate_artifacts([str(export / "model.onnx")], device="cuda")
        return {"validation": report.as_dict(), "passed": report.passed}

    # -- report -------------------------------------------------------------------------------
    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, fn in (("environment", self.environment), ("kernel", self.kernel), ("torch-cuda", self.torch_cuda),
                         ("bundle-cuda", self.bundle_cuda), ("bench", self.bench), ("tensorrt", self.tensorrt),
                         ("ort-cuda", self.ort_cuda)):
            self.step(name, fn)
        shutil.rmtree(self.work, ignore_errors=True)
        failed = [s["step"] for s in self.steps if s["status"] == "failed"]
        data = {"kind": kind("device check"), "device": self.args.device, "quick": self.args.quick,
                "command": " ".join(["python3", "tools/device_check.py", *sys.argv[1:]]),
                "passed": not failed, "steps": self.steps}
        write_json(self.out / "device_check.json", data)
        write_text(self.out / "device_check.md", markdown(data))
        print(f"wrote {self.out / 'device_check.json'} and device_check.md; "
              + ("all steps ok or skipped" if not failed else f"FAILED: {', '.join(failed)}"))
        return 1 if failed else 0


def markdown(data: dict[str, Any]) -> str:
    """The summary a person reads (and docs/deploy.md quotes)."""
    steps = {s["step"]: s for s in data["steps"]}
    env = steps["environment"]
    lines = [f"# Device check ({'passed' if data['passed'] else 'FAILED'})", "",
             f"Command: `{data['command']}`", "",
             f"GPU: {env.get('gpu', 'none')} (cc {env.get('compute_capability', '-')}, {env.get('sms', '-')} SMs), "
             f"driver: {env.get('nvidia_smi') or '-'}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); "
             f"nvcc: {env.get('nvcc') or '-'}; TensorRT: {env.get('tensorrt')}; ONNX Runtime {env.get('onnxruntime')} "
             f"({', '.join(env.get('ort_providers') or [])}).", "",
             "| step | status | seconds | note |", "|---|---|---:|---|"]
    for s in data["steps"]:
        note = s.get("reason") or s.get("error") or ""
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {note[:200]} |")
    tc = steps.get("torch-cuda", {})
    if tc.get("status") == "ok":
        lines += ["", "**Real MambaIRv2-light x4 vs the official output** (parity fixture, 48x40 baboon crop):", ""]
        for key in ("cpu_vs_official", "cuda_vs_official"):
            if key in tc:
                v = tc[key]
                lines.append(f"- {key.replace('_', ' ')}: max |Δ| {v['max_abs']:.2e}, mean |Δ| {v['mean_abs']:.2e}, "
                             f"PSNR-between {v['psnr_between_db']:.1f} dB")
        if "cuda_vs_cpu_psnr_between_db" in tc:
            lines.append(f"- CUDA vs CPU: PSNR-between {tc['cuda_vs_cpu_psnr_between_db']:.1f} dB")
    bc = steps.get("bundle-cuda", {})
    if bc.get("status") == "ok" and "cuda_vs_cpu_psnr_between_db" in bc:
        lines += ["", f"**W8A8 bundle, CUDA vs CPU** (eval images {', '.join(bc['images'])}): PSNR-between "
                      + ", ".join(f"{v:.1f}" for v in bc["cuda_vs_cpu_psnr_between_db"]) + " dB"]
    bench = steps.get("bench", {})
    if bench.get("status") == "ok":
        lines += ["", "| model | input | p50 ms | p90 ms | output MP/s | peak MB |", "|---|---|---:|---:|---:|---:|"]
        for r in bench["rows"]:
            lines.append(f"| {r['model']} | {r['side']}x{r['side']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                         f"{r['output_mp_per_s']:.2f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for device_check.json / .md and the step outputs")
    default_shared = ROOT.parent / "shared"
    ap.add_argument("--shared", default=str(default_shared) if default_shared.is_dir() else None,
                    help="folder with checkpoints/ and fixtures/parity/ (default: ../shared)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer iterations and images (the CPU self-test)")
    args = ap.parse_args()
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
