"""Latency benchmarks with one JSON schema for PyTorch, ONNX Runtime and TensorRT.

:func:`bench` opens any artifact as a runner (``runtime.open_runner``: a checkpoint or bundle
in PyTorch, an ONNX in ONNX Runtime, an engine in TensorRT) and :func:`bench_runner` times it
with one loop; the :class:`BenchResult` has the same keys whatever the backend, so two runs
compare side by side (:func:`compare`, ``qmamba-deploy bench --compare A.json B.json``):

* ``backend``, ``target`` (file, sha256, what the manifest beside it says), ``device``;
* ``input`` / ``output`` shapes, ``settings`` (warm-up, iterations, threads, CUDA graph);
* ``latency_ms``: mean, std, min, p50, p90, p99, max over the timed iterations;
* ``throughput``: images/s and output megapixels/s, both from the median latency;
* ``memory``: the peak the backend can report (GPU: peak device memory; CPU: the
  process's peak resident set, which includes the Python interpreter and libraries).

Timing: runners without a CUDA stream are timed with ``time.perf_counter`` per iteration;
CUDA runners with CUDA events on the runner's stream, on buffers already on the device. The
input is a fixed pseudo-random image in [0, 1) (seed 0):
MambaIR's cost does not depend on the content.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..artifacts import is_kind, kind, make_manifest, sha256_file
from ..errors import OptionError
from ..runtime import Runner, artifact_kind, open_runner

__all__ = [
    "BENCH_KIND",
    "BenchSettings",
    "BenchResult",
    "parse_shape",
    "latency_stats",
    "bench",
    "bench_runner",
    "describe_target",
    "time_host",
    "time_cuda",
    "load_result",
    "compare",
    "compare_table",
]

BENCH_KIND = kind("bench")
PERCENTILES = (50, 90, 99)


def parse_shape(text: str, flag: str = "--shape") -> tuple[int, ...]:
    """'1x3x64x64' -> (1, 3, 64, 64); a clear error for anything else."""
    try:
        dims = tuple(int(d) for d in str(text).lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise OptionError(f"{flag} {text!r} is not a shape NxCxHxW of positive integers (e.g. 1x3x64x64)")
    return dims


@dataclass(frozen=True)
class BenchSettings:
    shape: tuple[int, ...] = (1, 3, 64, 64)
    warmup: int = 3
    iterations: int = 20
    threads: int = 0          # 0: the library's default
    device: str = "cpu"       # cpu | cuda
    cuda_graph: bool = False  # TensorRT only

    def __post_init__(self):
        if self.warmup < 0:
            raise OptionError(f"--warmup {self.warmup}: pass 0 or more")
        if self.iterations < 1:
            raise OptionError(f"--iterations {self.iterations}: pass 1 or more")
        if self.device not in ("cpu", "cuda"):
            raise OptionError(f"--device {self.device}: pass cpu or cuda")
        if self.threads < 0:
            raise OptionError(f"--threads {self.threads}: pass 0 (library default) or more")

    def example(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.rand(self.shape, generator=g)


def latency_stats(times_ms: Sequence[float]) -> dict[str, float]:
    t = np.asarray(times_ms, dtype=np.float64)
    stats = {"mean": float(t.mean()), "std": float(t.std()), "min": float(t.min())}
    stats.update({f"p{q}": float(np.percentile(t, q)) for q in PERCENTILES})
    stats["max"] = float(t.max())
    return stats


@dataclass
class BenchResult:
    backend: str
    target: dict[str, Any]
    device: dict[str, Any]
    settings: BenchSettings
    output_shape: tuple[int, ...]
    times_ms: list[float]
    memory: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        stats = latency_stats(self.times_ms)
        batch = self.settings.shape[0]
        out_pixels = int(np.prod(self.output_shape[2:])) * batch
        per_s = 1000.0 / stats["p50"]
        return make_manifest(
            BENCH_KIND,
            backend=self.backend,
            target=self.target,
            device=self.device,
            input={"shape": list(self.settings.shape), "dtype": "float32"},
            output={"shape": list(self.output_shape)},
            settings={"warmup": self.settings.warmup, "iterations": self.settings.iterations,
                      "threads": self.settings.threads, "cuda_graph": self.settings.cuda_graph},
            latency_ms=stats,
            throughput={"images_per_s": batch * per_s, "output_megapixels_per_s": out_pixels * per_s / 1e6},
            memory=self.memory,
            notes=self.notes,
            host={"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                  "cpu_count": os.cpu_count(), "system": platform.system()},
        )


def describe_target(runner: Runner) -> dict[str, Any]:
    """The file, its checksum, the manifest fields beside it that identify the model, and what the
    runner says of itself (arch, precision, provider, TensorRT version)."""
    path = runner.path
    info: dict[str, Any] = {"path": str(path) if path else None}
    if path is not None and path.is_file():
        info["sha256"] = sha256_file(path)
        side = manifest_beside(path)
        if side is not None:
            try:
                m = json.loads(side.read_text())
            except (OSError, ValueError):
                m = {}
            for key in ("kind", "arch", "qconfig", "upscale", "options", "plugin", "tensorrt", "profile"):
                if isinstance(m, dict) and key in m:
                    info[key] = m[key]
    described = runner.describe()
    info.update(artifact=runner.kind, arch=runner.info.arch, precision=runner.info.precision)
    for key in ("providers", "backend_version", "dls", "scan", "module"):
        if described.get(key) is not None:
            info[key] = described[key]
    return info


def manifest_beside(path: Path) -> Path | None:
    """The JSON manifest of an artifact: ``engine.json`` for engines, ``x.json`` for ``x.*``."""
    for side in (path.with_name("engine.json"), path.with_suffix(".json")):
        if side.is_file() and (side.name != "engine.json" or path.suffix in (".engine", ".plan", ".trt")):
            return side
    return None


def time_host(run: Callable[[], Any], settings: BenchSettings) -> list[float]:
    """Times ``run`` with the host clock (CPU backends: their calls return when done)."""
    for _ in range(settings.warmup):
        run()
    times = []
    for _ in range(settings.iterations):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def time_cuda(run: Callable[[], Any], settings: BenchSettings, stream) -> list[float]:
    """Times ``run`` with CUDA events recorded on ``stream``."""
    with torch.cuda.stream(stream):
        for _ in range(settings.warmup):
            run()
        stream.synchronize()
        times = []
        for _ in range(settings.iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            run()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return times


def bench_runner(runner: Runner, settings: BenchSettings) -> BenchResult:
    """One timing loop for every backend: the runner's :meth:`~Runner.bench_step` on a fixed
    input, timed by CUDA events on the runner's stream when it has one, else the host clock."""
    if settings.cuda_graph and runner.kind != "tensorrt":
        raise OptionError("--cuda-graph applies to TensorRT engines only")
    with runner:
        step, out_shape = runner.bench_step(settings.example())
        stream = runner.stream
        times = time_cuda(step, settings, stream) if stream is not None else time_host(step, settings)
        return BenchResult(runner.kind, describe_target(runner), runner.device_info(), settings, out_shape, times,
                           runner.memory(), list(runner.notes))


def bench(path: str | os.PathLike, settings: BenchSettings, kind: str | None = None, **options: Any) -> BenchResult:
    """``qmamba-deploy bench``: open ``path`` as a runner (``runtime.open_runner``) and time it."""
    found, _ = artifact_kind(path)
    if settings.cuda_graph and found != "engine":
        raise OptionError("--cuda-graph applies to TensorRT engines only")
    options = {"device": settings.device, "threads": settings.threads, "cuda_graph": settings.cuda_graph, **options}
    return bench_runner(open_runner(path, kind=kind, **options), settings)


def forward_flops(model: torch.nn.Module, shape: Sequence[int]) -> int:
    """Floating-point operations of one forward at ``shape`` (NCHW), as torch's FlopCounterMode counts
    them: matrix products and convolutions (2 per multiply-add), not element-wise work. Attention
    runs as explicit matmuls here (the math SDPA backend), so the count does not depend on which
    fused kernel a build would pick."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        model.eval()(x)
    return int(counter.get_total_flops())


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """A bench JSON written by ``qmamba-deploy bench --json`` (checked)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OptionError(f"--compare {path}: no such file; pass JSON files written by "
                          f"`qmamba-deploy bench --json`") from None
    except ValueError as exc:
        raise OptionError(f"--compare {path}: not JSON ({exc}); pass a file written by "
                          f"`qmamba-deploy bench --json`") from None
    if not isinstance(data, dict) or not is_kind(data.get("kind"), "bench") or "latency_ms" not in data:
        raise OptionError(f"--compare {path}: not a `qmamba-deploy bench --json` result (kind {data.get('kind')!r})"
                          if isinstance(data, dict) else f"--compare {path}: not a bench result")
    return data


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Ratios B / A of latency (p50, p90, p99, mean) and throughput; warnings for unlike runs."""
    warnings = []
    for key, label in (("input", "input shape"), ("host", "host")):
        if a.get(key) != b.get(key):
            warnings.append(f"different {label}: {a.get(key)} vs {b.get(key)}")
    latency = {k: b["latency_ms"][k] / a["latency_ms"][k] for k in ("p50", "p90", "p99", "mean")}
    throughput = {k: b["throughput"][k] / a["throughput"][k] for k in a["throughput"]}
    return {"latency_ratio_b_over_a": latency, "throughput_ratio_b_over_a": throughput,
            "speedup_b_vs_a": a["latency_ms"]["p50"] / b["latency_ms"]["p50"], "warnings": warnings}


def _label(r: dict[str, Any]) -> str:
    t = r["target"]
    what = t.get("precision") or (f"W{t['qconfig']['w_bits']}A{t['qconfig']['a_bits']}" if t.get("qconfig") else "")
    return f"{r['backend']} {what} {Path(t['path']).name}".replace("  ", " ")


def compare_table(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Markdown table of two runs and their ratios."""
    c = compare(a, b)
    rows = [("", "A", "B", "B / A")]
    rows.append(("run", _label(a), _label(b), ""))
    rows.append(("input", "x".join(map(str, a["input"]["shape"])), "x".join(map(str, b["input"]["shape"])), ""))
    for k in ("p50", "p90", "p99", "mean"):
        rows.append((f"latency {k} ms", f"{a['latency_ms'][k]:.2f}", f"{b['latency_ms'][k]:.2f}",
                     f"{c['latency_ratio_b_over_a'][k]:.3f}"))
    for k in a["throughput"]:
        rows.append((k.replace("_", " "), f"{a['throughput'][k]:.3f}", f"{b['throughput'][k]:.3f}",
                     f"{c['throughput_ratio_b_over_a'][k]:.3f}"))
    pa, pb = a["memory"].get("peak_bytes"), b["memory"].get("peak_bytes")
    rows.append(("peak memory MB", "-" if pa is None else f"{pa / 1e6:.1f}", "-" if pb is None else f"{pb / 1e6:.1f}",
                 "" if not (pa and pb) else f"{pb / pa:.3f}"))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|---|---|---|---:|")
    text = "\n".join(lines) + f"\n\nB is {c['speedup_b_vs_a']:.2f}x the speed of A (median latency)."
    for w in c["warnings"]:
        text += f"\nwarning: {w}"
    return text
