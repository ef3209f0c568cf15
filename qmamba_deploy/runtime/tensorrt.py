"""TensorRT at run time: the module, the plugin library, the engine manifest and ``TrtRunner``.

TensorRT is an optional extra, imported here only. Two Python modules are accepted:
``tensorrt`` (TensorRT 10.x / 11.x, server GPUs and Jetson) and ``tensorrt_rtx`` (TensorRT for
RTX). The engine builder (``trt/engine.py``) and the Jetson package use what is here.

:class:`TrtRunner` runs ``model.engine`` with its ``engine.json``: it loads the plugin library
the manifest names (or ``--plugin``), deserializes the engine, takes the input sizes it accepts
from the engine's optimization profile, and runs on one CUDA stream with buffers from torch's
CUDA allocator, optionally replaying each input shape as a CUDA graph.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..artifacts import is_kind, kind
from ..errors import EnvironmentMissing, OptionError
from ..ops.contract import OP_TYPE, PLUGIN_LIBRARY
from .base import ModelInfo, Runner, ShapeLimits, fmt_shape, info_from_manifest, limits_from_manifest
from .ort import read_onnx_manifest

__all__ = [
    "TRT_MODULES",
    "ENGINE_KIND",
    "ENGINE_FILE",
    "ENGINE_MANIFEST",
    "ENGINE_FILES",
    "import_tensorrt",
    "trt_version",
    "is_rtx",
    "collecting_logger",
    "find_plugin_library",
    "read_engine_manifest",
    "TrtRunner",
]

TRT_MODULES = ("tensorrt", "tensorrt_rtx")
ENGINE_KIND = kind("engine")
ENGINE_FILE, ENGINE_MANIFEST = "model.engine", "engine.json"
ENGINE_FILES = (ENGINE_FILE, ENGINE_MANIFEST)
_INSTALL_HINT = {
    "tensorrt": "install TensorRT 10/11 for your CUDA (pip install 'qmamba-deploy[trt]' with NVIDIA's index "
                "reachable, or JetPack's python3-libnvinfer on Jetson)",
    "tensorrt_rtx": "pip install tensorrt-rtx-cu13 (the [lint] extra)",
}


def import_tensorrt(module: str = "tensorrt") -> ModuleType:
    """The TensorRT Python module, or one sentence saying how to get it."""
    if module not in TRT_MODULES:
        raise OptionError(f"--tensorrt {module}: pass one of {', '.join(TRT_MODULES)}")
    try:
        trt = importlib.import_module(module)
        if not hasattr(trt, "Builder"):  # a placeholder package that imports but holds nothing
            raise ImportError(f"{module} has no Builder")
    except Exception as exc:  # the PyPI placeholders raise at import, some with odd types
        raise EnvironmentMissing(f"TensorRT Python module `{module}` is not usable here "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                                 f"{_INSTALL_HINT[module]}") from None
    return trt


def trt_version(trt: ModuleType) -> tuple[int, int]:
    major, minor = (int(x) for x in trt.__version__.split(".")[:2])
    return major, minor


def is_rtx(trt: ModuleType) -> bool:
    return trt.__name__.split(".")[0] == "tensorrt_rtx"


def collecting_logger(trt: ModuleType):
    """A TensorRT ILogger that keeps the messages out of the user's terminal; ``errors()``
    lists the error messages (quoted in our exceptions)."""

    class Collect(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):
            self.messages.append((str(severity).rsplit(".", 1)[-1], str(msg)))

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in ("ERROR", "INTERNAL_ERROR")]

    return Collect()


def find_plugin_library(explicit: str | None = None) -> Path | None:
    """--plugin, else $QMAMBA_PLUGIN_LIB, else the CMake build folder next to the sources."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise OptionError(f"--plugin {path}: no such file; build it with "
                              "`cmake -S trt_plugins/selective_scan -B build && cmake --build build`")
        return path
    env = os.environ.get("QMAMBA_PLUGIN_LIB")
    if env:
        if not Path(env).is_file():
            raise OptionError(f"QMAMBA_PLUGIN_LIB={env}: no such file; unset it or point it at {PLUGIN_LIBRARY}")
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    for build in (root / "build", root / "trt_plugins" / "selective_scan" / "build"):
        candidate = build / PLUGIN_LIBRARY
        if candidate.is_file():
            return candidate
    return None


def read_engine_manifest(engine: Path) -> dict[str, Any]:
    """``engine.json`` beside the engine ({} when there is none); one sentence when it is broken."""
    side = Path(engine).with_name(ENGINE_MANIFEST)
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        raise OptionError(f"{side} is not valid JSON; rebuild the engine with `qmamba-deploy build` "
                          f"(or delete the file to run the engine without its manifest)") from None
    if not isinstance(data, dict) or not is_kind(data.get("kind"), "engine"):
        raise OptionError(f"{side} is not a qmamba-deploy engine manifest; rebuild the engine with "
                          f"`qmamba-deploy build`")
    return data


def _section(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    """A sub-object of a manifest ({} when absent or not an object)."""
    value = manifest.get(key)
    return value if isinstance(value, dict) else {}


def _torch_dtype(trt: ModuleType, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if dtype not in table:
        raise OptionError(f"engine I/O type {dtype} is not supported; export float32 or float16 I/O")
    return table[dtype]


class TrtRunner(Runner):
    """A TensorRT engine (``.engine``/``.plan`` + ``engine.json``) on one CUDA stream."""

    kind = "tensorrt"
    #: where I/O buffers live; tests without a GPU override the three methods below.
    buffer_device = "cuda"

    def __init__(self, path: str | os.PathLike, device: str = "cuda", plugin: str | None = None,
                 tensorrt: str | None = None, cuda_graph: bool = False):
        super().__init__(path, device)
        if not str(device).startswith("cuda"):
            raise OptionError(f"--device {device}: a TensorRT engine runs on the GPU; pass --device cuda")
        self.plugin = plugin
        self.tensorrt = tensorrt
        self.cuda_graph = cuda_graph
        self.manifest: dict[str, Any] = {}
        self.onnx_manifest: dict[str, Any] = {}
        self.trt: Any = None
        self.engine: Any = None
        self.context: Any = None
        self._stream: Any = None
        self._graphs: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._info: ModelInfo | None = None
        self._limits: ShapeLimits | None = None
        self._memory: dict[str, Any] = {}
        self._bound: tuple[torch.Tensor, ...] = ()

    # -- device seams (CUDA through torch) --------------------------------------------------
    def _check_device(self) -> None:
        if not torch.cuda.is_available():
            raise EnvironmentMissing(f"{self.path}: torch {torch.__version__} sees no CUDA device; the TensorRT "
                                     "runner uses torch's CUDA runtime for buffers and the stream: run on the GPU "
                                     "machine with a CUDA build of torch")

    def _new_stream(self) -> Any:
        return torch.cuda.Stream()

    def _stream_handle(self) -> int:
        return self._stream.cuda_stream

    def _free_memory(self) -> int:
        return int(torch.cuda.mem_get_info()[0])

    def _on_stream(self):
        return torch.cuda.stream(self._stream)

    # -- loading ----------------------------------------------------------------------------
    def _load(self) -> None:
        path = self.path
        if not path.is_file():
            raise OptionError(f"{path}: no such file; build one with `qmamba-deploy build`")
        self.manifest = read_engine_manifest(path)
        # an engine trtexec built beside an export's model.onnx (the Jetson package): its manifest says the rest
        self.onnx_manifest = read_onnx_manifest(path.with_name("model.onnx"))
        module = self.tensorrt or _section(self.manifest, "tensorrt").get("module") or "tensorrt"
        if module not in TRT_MODULES:
            module = "tensorrt"  # a damaged manifest names no module we know: the deployment default
        trt = self.trt = import_tensorrt(module)
        self._check_device()
        logger = self._logger = collecting_logger(trt)
        runtime = self._runtime = trt.Runtime(logger)
        lib = self._plugin_library()
        if lib is not None and runtime.get_plugin_registry().load_library(str(lib)) is None:
            raise OptionError(f"plugin library {lib}: TensorRT could not load it "
                              f"({'; '.join(logger.errors()[-2:]) or 'no detail'}); was it built for this TensorRT "
                              f"and CUDA?")
        flags = _section(self.manifest, "settings").get("flags")
        if isinstance(flags, list) and "VERSION_COMPATIBLE" in flags:
            runtime.engine_host_code_allowed = True
        free_before = self._free_memory()
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise OptionError(f"{path}: TensorRT {trt.__version__} could not load it "
                              f"({'; '.join(logger.errors()[-2:]) or 'no detail'}); engines are specific to the "
                              "TensorRT version and GPU that built them (and need the plugin: --plugin)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise OptionError(f"{path}: expected one input and one output, found {inputs} -> {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._limits = self._profile_limits()
        self._info = self._model_info()
        self._stream = self._new_stream()
        device_memory = (getattr(self.engine, "device_memory_size_v2", None)
                         or getattr(self.engine, "device_memory_size", None))
        self._memory = {"engine_device_memory_bytes": device_memory, "free_before": free_before}

    def _plugin_library(self) -> Path | None:
        lib = find_plugin_library(self.plugin)
        recorded = _section(self.manifest, "plugin")
        if lib is None and isinstance(recorded.get("library"), str) and Path(recorded["library"]).is_file():
            lib = Path(recorded["library"])
        packaged = self.path.parent / "plugin" / "build" / PLUGIN_LIBRARY  # a Jetson package's own build
        if lib is None and packaged.is_file():
            lib = packaged
        if lib is None and recorded:
            raise OptionError(f"{self.path} holds {OP_TYPE} plugin layers and the plugin library "
                              f"{recorded.get('library') or PLUGIN_LIBRARY} is not here; build it "
                              f"(cmake -S trt_plugins/selective_scan -B build && cmake --build build) and pass "
                              f"--plugin build/{PLUGIN_LIBRARY}")
        return lib

    def _profile_limits(self) -> ShapeLimits:
        lo, _, hi = (tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(self._input, 0))
        profile = ShapeLimits(int(hi[1]), (lo[2], lo[3]), (hi[2], hi[3]), hi[0],
                              f"engine profile {fmt_shape(lo)}..{fmt_shape(hi)}")
        saved = self.manifest.get("limits") if self.manifest.get("limits") is not None \
            else self.onnx_manifest.get("limits")
        # the ONNX's own limits (e.g. the window's minimum) where the profile is wider
        onnx_limits = limits_from_manifest(saved, profile.channels, str(self.path.with_name(ENGINE_MANIFEST)), "ONNX")
        return profile.narrowed(onnx_limits) if onnx_limits else profile

    def _model_info(self) -> ModelInfo:
        saved = _section(self.manifest, "model") or self.onnx_manifest
        if saved:
            return info_from_manifest(saved, self._limits.channels, str(self.path.with_name(ENGINE_MANIFEST)),
                                      self._limits.window)
        # an engine without our manifest: the scale from the shapes TensorRT infers for the smallest input
        lo = (1, self._limits.channels, *self._limits.min_hw)
        self.context.set_input_shape(self._input, lo)
        out = tuple(self.context.get_tensor_shape(self._output))
        return ModelInfo(arch=None, scale=max(1, int(out[2]) // int(lo[2])), in_chans=self._limits.channels)

    def _release(self) -> None:
        self._graphs.clear()
        self._bound = ()
        self.context = self.engine = self._stream = None

    @property
    def info(self) -> ModelInfo:
        self._need_open()
        return self._info

    @property
    def limits(self) -> ShapeLimits:
        self._need_open()
        return self._limits

    def _describe(self) -> dict[str, Any]:
        return {"backend": "tensorrt", "backend_version": self.trt.__version__, "module": self.trt.__name__,
                "device": self.device, "cuda_graph": self.cuda_graph,
                "built_with": self.manifest.get("tensorrt"), "profile": self.manifest.get("profile")}

    # -- running ----------------------------------------------------------------------------
    @property
    def stream(self) -> Any:
        return self._stream

    def _buffers(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.context.set_input_shape(self._input, shape):
            raise OptionError(f"input {fmt_shape(shape)} is outside the engine's profile ({self._limits.describe()})")
        x = torch.empty(shape, dtype=self._dtypes[self._input], device=self.buffer_device)
        y = torch.empty(tuple(self.context.get_tensor_shape(self._output)), dtype=self._dtypes[self._output],
                        device=self.buffer_device)
        self.context.set_tensor_address(self._input, x.data_ptr())
        self.context.set_tensor_address(self._output, y.data_ptr())
        self._bound = (x, y)  # the context holds their addresses: they live until the next binding
        return x, y

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self._stream_handle()):
            raise OptionError(f"{self.path}: TensorRT execution failed "
                              f"({'; '.join(self._logger.errors()[-2:]) or 'no detail'})")

    def _graph_for(self, shape: tuple[int, ...]):
        """(replay, x buffer, y buffer) of a CUDA graph captured for ``shape`` (kept per shape)."""
        if shape not in self._graphs:
            x, y = self._buffers(shape)
            with self._on_stream():
                self._enqueue()  # TensorRT allocates what it needs on the first launch, outside the capture
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):  # as trtexec
                self._enqueue()
            self._graphs[shape] = (graph.replay, x, y)
        replay, x, y = self._graphs[shape]
        self.context.set_input_shape(self._input, shape)
        self.context.set_tensor_address(self._input, x.data_ptr())
        self.context.set_tensor_address(self._output, y.data_ptr())
        return replay, x, y

    def _prepared(self, shape: tuple[int, ...]):
        if self.cuda_graph:
            return self._graph_for(shape)
        x, y = self._buffers(shape)
        return self._enqueue, x, y

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        step, xb, yb = self._prepared(tuple(x.shape))
        with self._on_stream():  # the copies are ordered with the enqueue on the runner's stream
            xb.copy_(x.to(xb.dtype), non_blocking=False)
            step()
            y = yb.float().cpu()
        self._stream.synchronize()
        return y

    def bench_step(self, x: torch.Tensor):
        self._need_open()
        self.limits.check(tuple(x.shape))
        step, xb, yb = self._prepared(tuple(x.shape))
        with self._on_stream():
            xb.copy_(x.to(xb.dtype))
        self._stream.synchronize()
        return step, tuple(yb.shape)

    def memory(self) -> dict[str, Any]:
        taken = self._memory.get("free_before", 0) - self._free_memory()
        return {"peak_bytes": int(taken), "engine_device_memory_bytes": self._memory.get("engine_device_memory_bytes"),
                "what": "device memory taken by the engine, context and buffers (cudaMemGetInfo before/after)"}

    def device_info(self) -> dict[str, Any]:
        major, minor = torch.cuda.get_device_capability()
        return {"type": "cuda", "name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
                "threads": None}
