"""PyTorch runner: a float or quantized checkpoint, a deploy bundle, or a model in memory."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..checkpoints import load_model
from ..errors import OptionError
from ..fold import load_bundle, with_dls_mode
from ..models.card import card_of
from ..ops import scan_cpu
from .base import ModelInfo, Runner, ShapeLimits, cpu_memory

__all__ = ["TorchRunner", "model_info", "model_limits"]


def model_info(model: nn.Module) -> ModelInfo:
    """The ModelInfo of a built model (``load_model``, ``load_bundle``, ``build_model``)."""
    card = card_of(model)
    window = getattr(model, "window_size", None)
    return ModelInfo(arch=card.arch, scale=int(getattr(model, "upscale", 1)),
                     in_chans=int(getattr(model, "in_chans", 3)), task=card.task,
                     qconfig=card.qconfig.as_dict() if card.qconfig is not None else None,
                     window_size=int(window) if window else None)


def model_limits(model: nn.Module) -> ShapeLimits:
    """An eager model takes any size (it pads to its window itself)."""
    info = model_info(model)
    return ShapeLimits(info.in_chans, source="PyTorch: any size", window=info.window_size)


def _cuda_ok(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {device}: no CUDA device is visible to torch {torch.__version__} here; "
                          "run on a GPU machine with a CUDA build of torch, or pass --device cpu")


class TorchRunner(Runner):
    """Eager PyTorch on CPU or CUDA.

    ``path``: a checkpoint (``.pth``/``.pt``/``.safetensors``, float or quantized) or a deploy
    bundle (``bundle.safetensors`` or its folder; ``dls`` picks the DLS mode, default static
    when the bundle is calibrated). :meth:`from_module` wraps a model already in memory.
    """

    kind = "torch"

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu", threads: int = 0,
                 bundle: bool = False, dls: str | None = None, arch: str | None = None,
                 kwargs: dict[str, Any] | None = None, model: nn.Module | None = None,
                 name: str | None = None):
        super().__init__(path, device)
        self.threads = int(threads)
        self.bundle = bundle
        self.dls = dls
        self.arch = arch
        self.kwargs = dict(kwargs or {})
        self.model = model
        self._name = name
        self._threads_before: int | None = None

    @classmethod
    def from_module(cls, model: nn.Module, name: str = "torch", device: str = "cpu") -> TorchRunner:
        return cls(None, device=device, model=model, name=name)

    @property
    def name(self) -> str:
        return self._name or super().name

    def _load(self) -> None:
        _cuda_ok(self.device)
        if self.bundle and (self.arch or self.kwargs):
            raise OptionError(f"{self.path}: --arch/--kwarg apply to checkpoints; a bundle records its architecture")
        if not self.bundle and self.dls:
            raise OptionError(f"--dls applies to deploy bundles; {self.path} is a checkpoint")
        if self.model is None:
            self.model = self._read()
        self.model = self.model.to(self.device).eval()
        if self.threads:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def _read(self) -> nn.Module:
        if self.bundle:
            model = load_bundle(self.path)
            mode = self.dls or ("static" if getattr(model, "dls_calibration", None) else "dynamic")
            return with_dls_mode(model, mode)

        return load_model(self.path, arch=self.arch, **self.kwargs)

    def _release(self) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        if self.path is not None:  # loaded here: free it (a wrapped module stays the caller's)
            self.model = None

    @property
    def info(self) -> ModelInfo:
        self._need_open()
        return model_info(self.model)

    @property
    def limits(self) -> ShapeLimits:
        self._need_open()
        return model_limits(self.model)

    def exact(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The same model in float64 (the validation floor): a function float64 NCHW -> output."""
        self._need_open()
        model = copy.deepcopy(self.model).double()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(x.to(self.device, torch.float64)).cpu()

        return run

    def _describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "torch", "backend_version": torch.__version__, "device": self.device,
                               "artifact": "bundle" if self.bundle else "checkpoint" if self.path else "module"}
        if self.bundle:
            out["dls"] = self.dls or ("static" if getattr(self.model, "dls_calibration", None) else "dynamic")
        return out

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x.to(self.device)).cpu()

    @property
    def stream(self) -> Any:
        return torch.cuda.current_stream() if self.device.startswith("cuda") else None

    def bench_step(self, x: torch.Tensor):
        self._need_open()
        self.limits.check(tuple(x.shape))
        x = x.to(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

        def step():
            with torch.inference_mode():
                return self.model(x)

        return step, tuple(step().shape)

    def memory(self) -> dict[str, Any]:
        if self.device.startswith("cuda"):
            return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "what": "torch peak CUDA memory allocated"}
        return cpu_memory()

    def device_info(self) -> dict[str, Any]:
        if self.device.startswith("cuda"):
            major, minor = torch.cuda.get_device_capability()
            return {"type": "cuda", "name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
                    "threads": None}
        # which selective-scan forward the CPU runs: the compiled kernel or the chunked torch path
        return {**super().device_info(), "scan": scan_cpu.backend()}
