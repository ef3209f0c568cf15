"""Latency benchmarks with one JSON schema for PyTorch, ONNX Runtime and TensorRT.

``bench_torch`` (eager, CPU or CUDA), ``bench_onnx`` (ONNX Runtime, CPU or CUDA provider)
and ``bench_engine`` (TensorRT, ``qmamba_deploy.trt.engine``) all return a :class:`BenchResult`
whose ``as_dict()`` has the same keys, so two runs compare side by side
(:func:`compare`, ``qmamba-deploy bench --compare A.json B.json``):

* ``backend``, ``target`` (file, sha256, what the manifest beside it says), ``device``;
* ``input`` / ``output`` shapes, ``settings`` (warm-up, iterations, threads, CUDA graph);
* ``latency_ms``: mean, std, min, p50, p90, p99, max over the timed iterations;
* ``throughput``: images/s and output megapixels/s, both from the median latency;
* ``memory``: the peak the backend can report (GPU: peak device memory; CPU: the
  process's peak resident set, which includes the Python interpreter and libraries).

Timing: CPU runs time each iteration with ``time.perf_counter``; CUDA runs with CUDA
events on the stream. The input is a fixed pseudo-random image in [0, 1) (seed 0):
MambaIR's cost does not depend on the content.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .errors import OptionError
from .manifest import make_manifest, sha256_file

__all__ = [
    "BENCH_KIND",
    "BenchSettings",
    "BenchResult",
    "parse_shape",
    "latency_stats",
    "bench_torch",
    "bench_onnx",
    "time_cuda",
    "load_result",
    "compare",
    "compare_table",
]

BENCH_KIND = "qmamba-deploy bench"
BACKENDS = ("torch", "onnxruntime", "tensorrt")
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


def _describe_file(path: Path, manifest_name: Optional[str] = None) -> dict[str, Any]:
    """The file, its checksum and the fields of the manifest beside it that identify the model."""
    info: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path)}
    side = path.with_name(manifest_name) if manifest_name else path.with_suffix(".json")
    if side.is_file():
        try:
            m = json.loads(side.read_text())
        except (OSError, ValueError):
            m = {}
        for key in ("kind", "arch", "qconfig", "upscale", "options", "plugin", "tensorrt", "profile", "precision"):
            if key in m:
                info[key] = m[key]
    return info


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _cpu_memory() -> dict[str, Any]:
    return {"peak_bytes": _peak_rss_bytes(), "what": "process peak resident set (includes Python and libraries)"}


def _time_cpu(run: Callable[[], Any], settings: BenchSettings) -> tuple[list[float], Any]:
    out = None
    for _ in range(settings.warmup):
        out = run()
    times = []
    for _ in range(settings.iterations):
        start = time.perf_counter()
        out = run()
        times.append((time.perf_counter() - start) * 1000.0)
    return times, out


def time_cuda(run: Callable[[], Any], settings: BenchSettings, stream=None) -> tuple[list[float], Any]:
    """Times ``run`` with CUDA events recorded on ``stream`` (default: the current stream)."""
    stream = stream or torch.cuda.current_stream()
    out = None
    with torch.cuda.stream(stream):
        for _ in range(settings.warmup):
            out = run()
        stream.synchronize()
        times = []
        for _ in range(settings.iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            out = run()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return times, out


def _need_cuda(flag: str) -> None:
    if not torch.cuda.is_available():
        raise OptionError(f"{flag}: no CUDA device is visible to torch {torch.__version__} here; "
                          "run on a GPU machine with a CUDA build of torch, or pass --device cpu")


def _cpu_device(threads: int) -> dict[str, Any]:
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": threads or None}


def bench_torch(checkpoint: str | os.PathLike, settings: BenchSettings, **model_kwargs: Any) -> BenchResult:
    """Eager PyTorch: the checkpoint (float or fake-quantized) as ``load_model`` builds it."""
    from .checkpoints import load_model

    path = Path(checkpoint)
    if not path.is_file():
        raise OptionError(f"--torch {path}: no such file; pass a .safetensors/.pth checkpoint")
    if settings.cuda_graph:
        raise OptionError("--cuda-graph applies to --engine only")
    model = load_model(path, **model_kwargs)
    x = settings.example()
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        if settings.device == "cuda":
            _need_cuda("--device cuda")
            model, x = model.cuda(), x.cuda()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                times, y = time_cuda(lambda: model(x), settings)
            memory = {"peak_bytes": int(torch.cuda.max_memory_allocated()), "what": "torch peak CUDA memory allocated"}
            device = {"type": "cuda", "name": torch.cuda.get_device_name(), "threads": None}
        else:
            with torch.inference_mode():
                times, y = _time_cpu(lambda: model(x), settings)
            memory = _cpu_memory()
            device = _cpu_device(torch.get_num_threads())
    finally:
        torch.set_num_threads(threads_before)
    target = _describe_file(path)
    target.update({"arch": type(model).__name__, "precision": "fake-quant" if _is_quantized(model) else "fp32"})
    return BenchResult("torch", target, device, settings, tuple(y.shape), times, memory)


def _is_quantized(model: torch.nn.Module) -> bool:
    from .quant.layers import QuantLinear, QuantConv2d

    return any(isinstance(m, (QuantLinear, QuantConv2d)) for m in model.modules())


_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def bench_onnx(onnx_path: str | os.PathLike, settings: BenchSettings) -> BenchResult:
    """ONNX Runtime with the validation session settings (``runtime/ort.py``).

    QMambaSelectiveScan nodes run as the Python custom op (torch's chunked scan) there is
    no native ORT kernel for; a ``--scan portable`` graph runs in ORT alone."""
    import onnxruntime as ort

    from .runtime.ort import ort_session

    path = Path(onnx_path)
    if not path.is_file():
        raise OptionError(f"--onnx {path}: no such file; pass the model.onnx that `qmamba-deploy export` wrote")
    if settings.cuda_graph:
        raise OptionError("--cuda-graph applies to --engine only")
    provider = _ORT_PROVIDERS[settings.device]
    if provider not in ort.get_available_providers():
        raise OptionError(f"--device {settings.device}: this onnxruntime has no {provider} "
                          f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                          "in place of onnxruntime (the [gpu] extra) or pass --device cpu")
    session = ort_session(path, providers=[provider], threads=settings.threads)
    name = session.get_inputs()[0].name
    feed = {name: settings.example().numpy()}
    times, outs = _time_cpu(lambda: session.run(None, feed), settings)  # run() returns host arrays: synchronous
    scans = _scan_node_count(path)
    notes = []
    if scans:
        notes.append(f"{scans} QMambaSelectiveScan nodes ran as ONNX Runtime Python custom ops (torch chunked scan)")
    device = _cpu_device(settings.threads) if settings.device == "cpu" else {"type": "cuda", "name": provider,
                                                                             "threads": None}
    memory = _cpu_memory() if settings.device == "cpu" else {"peak_bytes": None, "what": "not reported by ONNX Runtime"}
    target = _describe_file(path, "model.json")
    target["provider"] = provider
    return BenchResult("onnxruntime", target, device, settings, tuple(outs[0].shape), times, memory, notes)


def _scan_node_count(path: Path) -> int:
    import onnx

    from .export.scan_onnx import scan_nodes

    return len(scan_nodes(onnx.load(str(path), load_external_data=False)))


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """A bench JSON written by ``qmamba-deploy bench --json`` (checked)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OptionError(f"--compare {path}: no such file; pass JSON files written by `qmamba-deploy bench --json`") from None
    except ValueError as exc:
        raise OptionError(f"--compare {path}: not JSON ({exc}); pass a file written by `qmamba-deploy bench --json`") from None
    if not isinstance(data, dict) or data.get("kind") != BENCH_KIND or "latency_ms" not in data:
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
