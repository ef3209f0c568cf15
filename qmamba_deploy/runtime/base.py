"""The Runner interface: one way to run every artifact qmamba-deploy writes.

A runner (after Polygraphy's runners) is opened and closed, takes a float32 NCHW batch in
[0, 1] on the CPU and returns the restored batch on the CPU, and describes itself as a dict.
What it accepts is in :class:`ShapeLimits` (from an engine's profile, an ONNX's axes and
window, a checkpoint's window), and what it restores is in :class:`ModelInfo` (scale,
channels, task). Implementations: ``TorchRunner`` (checkpoints and bundles),
``OrtRunner`` (ONNX Runtime), ``TrtRunner`` (TensorRT engines).

Benchmarks use :meth:`Runner.bench_step`: one inference on buffers already on the device,
timed by the host clock or, when the runner has a CUDA :attr:`Runner.stream`, by CUDA
events on that stream.
"""

from __future__ import annotations

import abc
import os
import platform
import resource
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..artifacts import sha256_file
from ..errors import ModelError, OptionError

__all__ = ["ModelInfo", "ShapeLimits", "Runner", "fmt_shape", "peak_rss_bytes", "cpu_memory", "cpu_device",
           "info_from_manifest", "limits_from_manifest"]


def fmt_shape(shape) -> str:
    return "x".join(str(d) for d in shape)


@dataclass(frozen=True)
class ModelInfo:
    """What a runner restores: the network, its scale and channels, and the task it was made for."""

    arch: str | None
    scale: int
    in_chans: int
    task: dict[str, Any] | None = None      # {"task": "denoise", "sigma": 25, ...} as the manifests write it
    qconfig: dict[str, Any] | None = None   # None: float
    window_size: int | None = None

    @property
    def precision(self) -> str:
        q = self.qconfig
        return f"W{q['w_bits']}A{q['a_bits']}" if q else "fp32"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ShapeLimits:
    """The input sizes a runner accepts: batch and H, W ranges (None: unbounded)."""

    channels: int
    min_hw: tuple[int, int] = (1, 1)
    max_hw: tuple[int | None, int | None] = (None, None)
    max_batch: int | None = None
    source: str = "any size"
    window: int | None = None  # the model's window (tiles that are multiples of it waste no padding)

    def __post_init__(self):
        for lo, hi in zip(self.min_hw, self.max_hw):
            if lo < 1 or (hi is not None and hi < lo):
                raise OptionError(f"input limits {self.min_hw}..{self.max_hw} ({self.source}) are empty")

    @property
    def fixed(self) -> bool:
        return tuple(self.min_hw) == tuple(self.max_hw)

    def narrowed(self, other: ShapeLimits) -> ShapeLimits:
        """The sizes both accept (e.g. an engine's profile within its ONNX's limits)."""
        lo = tuple(max(a, b) for a, b in zip(self.min_hw, other.min_hw))
        hi = tuple(b if a is None else a if b is None else min(a, b) for a, b in zip(self.max_hw, other.max_hw))
        batch = other.max_batch if self.max_batch is None else (
            self.max_batch if other.max_batch is None else min(self.max_batch, other.max_batch))
        return ShapeLimits(self.channels, lo, hi, batch, f"{self.source}; {other.source}",  # type: ignore[arg-type]
                           self.window or other.window)

    def describe(self) -> str:
        lo, hi = self.min_hw, self.max_hw
        h = f"{lo[0]}..{hi[0] if hi[0] else 'any'}"
        w = f"{lo[1]}..{hi[1] if hi[1] else 'any'}"
        batch = f", batch <= {self.max_batch}" if self.max_batch else ""
        return f"H {h}, W {w}{batch} ({self.source})"

    def check(self, shape: tuple[int, ...], what: str = "input") -> None:
        """One sentence when ``shape`` (NCHW) is outside the limits."""
        if len(shape) != 4:
            raise OptionError(f"{what} has shape {tuple(shape)}; runners take NCHW batches")
        n, c, h, w = shape
        if c != self.channels:
            raise OptionError(f"{what} has {c} channels; the model takes {self.channels}")
        if self.max_batch is not None and n > self.max_batch:
            raise OptionError(f"{what} has batch {n}; the artifact accepts at most {self.max_batch} ({self.source})")
        for size, lo, hi, name in ((h, self.min_hw[0], self.max_hw[0], "height"),
                                   (w, self.min_hw[1], self.max_hw[1], "width")):
            if size < lo or (hi is not None and size > hi):
                raise OptionError(f"{what} {name} {size} is outside what the artifact accepts ({self.describe()}); "
                                  f"restore/eval tile and pad to fit, or rebuild the artifact for this size")

    def as_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "min_hw": list(self.min_hw), "max_hw": list(self.max_hw),
                "max_batch": self.max_batch, "window": self.window, "source": self.source}


def _field(m: dict[str, Any], key: str, kinds: tuple[type, ...], source: str, default: Any = None) -> Any:
    value = m.get(key, default)
    if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
        raise OptionError(f"{source}: field {key!r} is {type(value).__name__}, not {kinds[0].__name__}; the "
                          f"manifest is damaged: re-export the artifact (or delete the manifest)")
    return value


def info_from_manifest(m: dict[str, Any], channels: int, source: str, window: int | None = None) -> ModelInfo:
    """ModelInfo from an export manifest (``model.json``) or the ``model`` entry of ``engine.json``,
    every field type-checked (one sentence for a damaged or hostile file)."""
    if not isinstance(m, dict):
        raise OptionError(f"{source} is not a JSON object; the manifest is damaged: re-export the artifact")
    scale = _field(m, "upscale", (int,), source, None)
    scale = _field(m, "scale", (int,), source, 1) if scale is None else scale
    if not 1 <= scale <= 8:
        raise OptionError(f"{source}: scale {scale} is not 1..8; the manifest is damaged: re-export the artifact")
    return ModelInfo(arch=_field(m, "arch", (str,), source), scale=scale, in_chans=channels,
                     task=_field(m, "task", (dict,), source), qconfig=_field(m, "qconfig", (dict,), source),
                     window_size=window if window is not None else _field(m, "window_size", (int,), source))


def limits_from_manifest(saved: Any, channels: int, source: str, label: str) -> ShapeLimits | None:
    """The ``limits`` entry export writes into model.json (and build copies into engine.json)."""
    if saved is None:
        return None

    def sizes(key, allow_none):
        v = saved.get(key) if isinstance(saved, dict) else None
        ok = isinstance(v, list) and len(v) == 2 and all(
            (x is None and allow_none) or (isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 1 << 20)
            for x in v)
        if not ok:
            raise OptionError(f"{source}: limits.{key} is {v!r}, not two sizes; the manifest is damaged: "
                              f"re-export the artifact")
        return tuple(v)

    window = saved.get("window") if isinstance(saved, dict) else None
    batch = saved.get("max_batch") if isinstance(saved, dict) else None
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or not 0 < window <= 4096):
        raise OptionError(f"{source}: limits.window is {window!r}; the manifest is damaged: re-export the artifact")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise OptionError(f"{source}: limits.max_batch is {batch!r}; the manifest is damaged: re-export the artifact")
    return ShapeLimits(channels, sizes("min_hw", False), sizes("max_hw", True), batch, label, window)


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def cpu_memory() -> dict[str, Any]:
    return {"peak_bytes": peak_rss_bytes(), "what": "process peak resident set (includes Python and libraries)"}


def cpu_device(threads: int | None) -> dict[str, Any]:
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": threads or None}


class Runner(abc.ABC):
    """One artifact, ready to run. Use as a context manager (``with open_runner(p) as r:``)."""

    #: "torch", "onnxruntime" or "tensorrt" (the ``backend`` of bench results).
    kind: ClassVar[str]

    def __init__(self, path: str | os.PathLike | None, device: str = "cpu"):
        self.path = Path(path) if path is not None else None
        self.device = device
        self._open = False
        self.notes: list[str] = []

    # -- life cycle ------------------------------------------------------------------------
    def open(self) -> Runner:
        if not self._open:
            self._load()
            self._open = True
        return self

    def close(self) -> None:
        if self._open:
            self._release()
            self._open = False

    def __enter__(self) -> Runner:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @abc.abstractmethod
    def _load(self) -> None:
        """Read the artifact and make it runnable (sets what ``info`` and ``limits`` return)."""

    def _release(self) -> None:  # noqa: B027 - runners without resources to free keep this default
        """Free what ``_load`` took."""

    def _need_open(self) -> None:
        if not self._open:
            raise RuntimeError(f"{type(self).__name__} is not open; use `with runner:` or runner.open()")

    # -- what it is --------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def info(self) -> ModelInfo:
        ...

    @property
    @abc.abstractmethod
    def limits(self) -> ShapeLimits:
        ...

    @property
    def scale(self) -> int:
        return self.info.scale

    @property
    def name(self) -> str:
        return f"{self.kind}: {self.path.name}" if self.path else self.kind

    def describe(self) -> dict[str, Any]:
        """Kind, file, checksum, backend version, device, precision and the sizes it accepts."""
        out: dict[str, Any] = {"kind": self.kind, "file": str(self.path) if self.path else None}
        if self.path is not None and self.path.is_file():
            out["sha256"] = sha256_file(self.path)
        out.update(self._describe())
        out.update(precision=self.info.precision, model=self.info.as_dict(), accepts=self.limits.as_dict())
        return out

    @abc.abstractmethod
    def _describe(self) -> dict[str, Any]:
        """Backend version, device / providers."""

    # -- running -----------------------------------------------------------------------------
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Restore a float32 NCHW batch in [0, 1]; returns float32 NCHW on the CPU."""
        self._need_open()
        self.limits.check(tuple(x.shape))
        with torch.no_grad():
            y = self._run(x.detach().float().cpu().contiguous()).float().cpu()
        if not bool(torch.isfinite(y).all()):
            raise ModelError(f"{self.path or self.name} produced NaN or infinite values for a {fmt_shape(x.shape)} "
                             f"input; the artifact is damaged or its weights diverged: re-export it from a good "
                             f"checkpoint")
        return y

    __call__ = run

    @abc.abstractmethod
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        ...

    @property
    def stream(self) -> Any:
        """The CUDA stream the runner enqueues on (CUDA events time it), or None (host timer)."""
        return None

    def bench_step(self, x: torch.Tensor) -> tuple[Callable[[], Any], tuple[int, ...]]:
        """(one inference on inputs already where the backend wants them, the output shape)."""
        self._need_open()
        self.limits.check(tuple(x.shape))
        y = self._run(x)
        return (lambda: self._run(x)), tuple(y.shape)

    def memory(self) -> dict[str, Any]:
        """The peak memory the backend can report (see bench)."""
        return cpu_memory()

    def device_info(self) -> dict[str, Any]:
        return cpu_device(torch.get_num_threads())
