"""ONNX -> TensorRT engine (``build_engine``); running it is ``runtime.tensorrt.TrtRunner``.

TensorRT is an optional extra, imported lazily (``runtime/tensorrt.py``). Two Python modules are accepted:

* ``tensorrt`` -- TensorRT 10.x or 11.x, the deployment target (server GPUs, Jetson);
* ``tensorrt_rtx`` -- TensorRT for RTX. Its builder runs without a GPU (ahead-of-time
  builds for RTX cards), which is how the build path is exercised in CI on portable graphs.

Version differences are handled by asking the module, never by assuming: TensorRT 11 and
TensorRT-RTX have no precision flags (networks are strongly typed; precision comes from
the ONNX's Q/DQ nodes and tensor types), TensorRT 10 has them and also accepts
``STRONGLY_TYPED``. A flag the installed TensorRT does not have is refused with its name,
never silently dropped.

The engine lands in one folder (``model.engine`` + ``engine.json``, written together or not
at all); the manifest records the TensorRT module and version, the GPU, the ONNX and
plugin checksums, the optimization profile and every builder setting, and what the runner
needs from the ONNX's manifest: the model (scale, channels, task, precision), the input sizes
the graph handles, and the bundle it came from (``validate`` compares the engine with it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..artifacts import (
    atomic_path,
    check_out_folder,
    check_outputs,
    make_manifest,
    sha256_file,
    staged_folder,
    write_json,
)
from ..errors import EnvironmentMissing, OptionError
from ..export.graph import read_onnx, scan_nodes
from ..ops import contract
from ..runtime.base import ModelInfo, fmt_shape
from ..runtime.ort import read_onnx_manifest
from ..runtime.tensorrt import (
    ENGINE_FILE,
    ENGINE_FILES,
    ENGINE_KIND,
    ENGINE_MANIFEST,
    TRT_MODULES,
    collecting_logger,
    find_plugin_library,
    import_tensorrt,
    is_rtx,
    trt_version,
)
from .plugin import plugin_checksum

__all__ = [
    "TRT_MODULES",
    "ENGINE_KIND",
    "ENGINE_FILES",
    "BuildConfig",
    "Profile",
    "import_tensorrt",
    "collecting_logger",
    "find_plugin_library",
    "build_engine",
]

HARDWARE_LEVELS = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}


@dataclass(frozen=True)
class Profile:
    """One optimization profile for the image input (NCHW)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self):
        for name in ("min", "opt", "max"):
            shape = getattr(self, name)
            if len(shape) != 4 or min(shape) < 1:
                raise OptionError(f"--{name} {shape}: pass NxCxHxW with positive sizes")
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            raise OptionError(f"--min {fmt_shape(self.min)} --opt {fmt_shape(self.opt)} --max {fmt_shape(self.max)}: "
                              "each dimension must satisfy min <= opt <= max")
        if len({self.min[1], self.opt[1], self.max[1]}) != 1:
            raise OptionError("--min/--opt/--max: the channel count must be the same in all three")

    def as_dict(self, input_name: str) -> dict[str, Any]:
        """The profile as the engine and package manifests record it."""
        return {"input": input_name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class BuildConfig:
    onnx: str
    profile: Profile
    plugin: str | None = None            # the plugin .so (found automatically when None)
    timing_cache: str | None = None      # read when present, written back after the build
    fp16: bool = False                      # TensorRT 10 only: weakly typed + FP16/INT8 flags
    version_compatible: bool = False        # + the plugin library serialized into the engine
    exclude_lean_runtime: bool = False
    hardware_compatibility: str = "none"    # none | ampere+ | same-cc
    optimization_level: int | None = None
    workspace_mib: int | None = None
    tensorrt: str = "tensorrt"              # tensorrt | tensorrt_rtx
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX: target SMs (SM89, SM120...); () every one it knows
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.hardware_compatibility not in HARDWARE_LEVELS:
            raise OptionError(f"--hardware-compatibility {self.hardware_compatibility}: pass one of "
                              f"{', '.join(HARDWARE_LEVELS)}")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise OptionError(f"--optimization-level {self.optimization_level}: pass 0..5")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise OptionError("--exclude-lean-runtime only applies with --version-compatible")
        if self.compute_capabilities and self.tensorrt != "tensorrt_rtx":
            raise OptionError("--compute-capability applies to --tensorrt tensorrt_rtx (full TensorRT builds for the "
                              "GPU it runs on)")


def _flag(trt: ModuleType, name: str, option: str):
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise OptionError(f"{option}: TensorRT {trt.__version__} ({trt.__name__}) has no BuilderFlag.{name}; "
                          "drop the option for this TensorRT")
    return flag


def _read_onnx_io(onnx_path: Path) -> tuple[str, list, bool]:
    """The input name, its declared dims and whether the graph holds QMambaSelectiveScan nodes."""
    model = read_onnx(onnx_path)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise OptionError(f"{onnx_path} has {len(inputs)} inputs; qmamba-deploy engines take one NCHW image input")
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims, bool(scan_nodes(model))


def _gpu_description() -> dict[str, Any]:
    try:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:  # a CPU torch, or no driver: the manifest says so
        pass
    return {"name": None, "compute_capability": None}


@dataclass
class _Build:
    """What the steps of :func:`build_engine` hand each other (in the manner of Polygraphy's loaders)."""

    cfg: BuildConfig
    onnx: Path
    input_name: str
    has_scan: bool
    plugin: Path | None
    trt: ModuleType = None
    rtx: bool = False
    logger: Any = None
    builder: Any = None
    network: Any = None
    config: Any = None
    settings: dict[str, Any] = field(default_factory=lambda: {"flags": []})


def _inspect(cfg: BuildConfig) -> _Build:
    """The ONNX's input and scan nodes against the profile, and the plugin library it needs."""
    onnx_path = Path(cfg.onnx)
    input_name, dims, has_scan = _read_onnx_io(onnx_path)
    if len(dims) != 4:
        raise OptionError(f"{onnx_path}: input {input_name!r} has rank {len(dims)}; expected NCHW")
    if isinstance(dims[1], int) and dims[1] != cfg.profile.opt[1]:
        raise OptionError(f"--opt {fmt_shape(cfg.profile.opt)}: {onnx_path} takes {dims[1]} channels; "
                          f"use {cfg.profile.opt[0]}x{dims[1]}x{cfg.profile.opt[2]}x{cfg.profile.opt[3]}")
    plugin = find_plugin_library(cfg.plugin)
    if has_scan and plugin is None:
        raise OptionError(f"{onnx_path} has {contract.OP_TYPE} nodes and no plugin library was found: build it "
                          "(cmake -S trt_plugins/selective_scan -B build && cmake --build build) and pass --plugin "
                          "build/libqmamba_scan_plugin.so, or export with --scan portable")
    if not has_scan and not cfg.plugin:
        plugin = None  # a portable graph needs no plugin (one found lying around is not loaded)
    return _Build(cfg, onnx_path, input_name, has_scan, plugin)


def _builder(b: _Build) -> None:
    """TensorRT, a builder (which needs a GPU unless TensorRT-RTX) and the plugin loaded into it."""
    trt = b.trt = import_tensorrt(b.cfg.tensorrt)
    b.rtx = is_rtx(trt)
    if b.cfg.fp16 and (b.rtx or trt_version(trt)[0] >= 11):
        raise OptionError(f"--fp16: TensorRT {trt.__version__} ({trt.__name__}) builds strongly typed networks only; "
                          "precision comes from the ONNX (its Q/DQ nodes and tensor types). Drop --fp16")
    b.logger = collecting_logger(trt)
    try:
        b.builder = trt.Builder(b.logger)
    except Exception as exc:
        raise EnvironmentMissing(f"TensorRT could not create a builder ({type(exc).__name__}): {trt.__name__} "
                                 f"{trt.__version__} needs an NVIDIA GPU and driver here"
                                 + ("" if b.rtx else "; build on the machine that will run the engine")) from None
    if b.plugin is not None and b.builder.get_plugin_registry().load_library(str(b.plugin)) is None:
        detail = "; ".join(b.logger.errors()) or "no detail"
        raise OptionError(f"--plugin {b.plugin}: TensorRT could not load it ({detail}); "
                          "was it built for this TensorRT and CUDA?")


def _parse(b: _Build) -> None:
    """The network from the ONNX: strongly typed wherever the TensorRT at hand allows choosing."""
    trt, flags = b.trt, 0
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if typed is not None and not b.cfg.fp16 and (b.rtx or trt_version(trt)[0] < 11):  # 11: always, flag deprecated
        flags |= 1 << int(typed)
    b.network = b.builder.create_network(flags)
    parser = trt.OnnxParser(b.network, b.logger)
    if not parser.parse_from_file(str(b.onnx)):
        errors = [f"{parser.get_error(i).node_operator() or '?'}: {parser.get_error(i).desc().strip()}"
                  for i in range(parser.num_errors)]
        raise OptionError(f"{b.onnx}: the TensorRT ONNX parser refused it ({'; '.join(errors[:3])}); "
                          "run `qmamba-deploy lint` on it for the full list")


def _config(b: _Build) -> None:
    """The builder config: flags, compatibility, optimization level, workspace (recorded in settings)."""
    cfg, trt, settings = b.cfg, b.trt, b.settings
    config = b.config = b.builder.create_builder_config()
    settings["strongly_typed"] = not cfg.fp16
    if cfg.fp16:
        for name in ("FP16", "INT8"):
            config.set_flag(_flag(trt, name, "--fp16"))
            settings["flags"].append(name)
    if cfg.version_compatible:
        config.set_flag(_flag(trt, "VERSION_COMPATIBLE", "--version-compatible"))
        settings["flags"].append("VERSION_COMPATIBLE")
        if cfg.exclude_lean_runtime:
            config.set_flag(_flag(trt, "EXCLUDE_LEAN_RUNTIME", "--exclude-lean-runtime"))
            settings["flags"].append("EXCLUDE_LEAN_RUNTIME")
        if b.plugin is not None and not cfg.exclude_lean_runtime:
            # As trtexec: an engine without the lean runtime loads in the full runtime, where the
            # plugin is loaded from the file (--plugin); an embedded copy would register twice.
            config.plugins_to_serialize = [str(b.plugin)]
            settings["plugins_serialized"] = [b.plugin.name]
    if cfg.hardware_compatibility != "none":
        levels = getattr(trt, "HardwareCompatibilityLevel", None)
        level = getattr(levels, HARDWARE_LEVELS[cfg.hardware_compatibility], None) if levels else None
        if level is None:
            raise OptionError(f"--hardware-compatibility {cfg.hardware_compatibility}: TensorRT {trt.__version__} "
                              "does not offer it; drop the option")
        config.hardware_compatibility_level = level
    settings["hardware_compatibility"] = cfg.hardware_compatibility
    if cfg.optimization_level is not None:
        config.builder_optimization_level = cfg.optimization_level
        settings["optimization_level"] = cfg.optimization_level
    if cfg.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
        settings["workspace_mib"] = cfg.workspace_mib
    if cfg.compute_capabilities:
        # TensorRT-RTX targets every RTX architecture it knows unless told otherwise
        known = list(trt.ComputeCapability.__members__)
        config.num_compute_capabilities = len(cfg.compute_capabilities)
        for i, name in enumerate(cfg.compute_capabilities):
            if name not in known or name == "NONE":
                raise OptionError(f"--compute-capability {name}: TensorRT-RTX {trt.__version__} knows "
                                  f"{', '.join(k for k in known if k != 'NONE')}")
            config.set_compute_capability(getattr(trt.ComputeCapability, name), i)
        settings["compute_capabilities"] = list(cfg.compute_capabilities)


def _profile_and_cache(b: _Build) -> None:
    """The optimization profile of the image input, and the timing cache when one is asked for."""
    name = b.network.get_input(0).name
    profile = b.builder.create_optimization_profile()
    profile.set_shape(name, b.cfg.profile.min, b.cfg.profile.opt, b.cfg.profile.max)
    b.config.add_optimization_profile(profile)
    b.input_name = name
    if b.cfg.timing_cache and b.rtx:
        b.settings["timing_cache"] = "none: TensorRT-RTX has no timing cache (its cache calls are no-ops)"
    elif b.cfg.timing_cache:
        cache_file = Path(b.cfg.timing_cache)
        cache = b.config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        if not b.config.set_timing_cache(cache, False):
            raise OptionError(f"--timing-cache {cache_file}: TensorRT refused it (made by another TensorRT version "
                              "or GPU?); delete the file to start a new cache")
        b.settings["timing_cache"] = str(cache_file)


def _serialize(b: _Build) -> tuple[Any, float]:
    """(the serialized engine, seconds the build took)."""
    start = time.perf_counter()
    serialized = b.builder.build_serialized_network(b.network, b.config)
    seconds = time.perf_counter() - start
    if serialized is None:
        detail = "; ".join(b.logger.errors()[-3:]) or "no detail"
        raise OptionError(f"{b.onnx}: TensorRT failed to build an engine ({detail})")
    return serialized, seconds


def _manifest(b: _Build, serialized: Any, seconds: float, command: str | None) -> dict[str, Any]:
    plugin = b.plugin
    return make_manifest(
        ENGINE_KIND,
        engine=ENGINE_FILE,
        tensorrt={"module": b.trt.__name__, "version": b.trt.__version__},
        gpu=_gpu_description(),
        onnx={"path": str(b.onnx), "sha256": sha256_file(b.onnx), "input": b.input_name,
              "scan": contract.OP_TYPE if b.has_scan else "portable"},
        plugin=None if plugin is None else {
            "library": str(plugin), "sha256": sha256_file(plugin), "source_sha256": _source_checksum(),
            "name": contract.PLUGIN_NAME, "version": contract.PLUGIN_VERSION, "namespace": contract.PLUGIN_NAMESPACE},
        profile=b.cfg.profile.as_dict(b.input_name),
        **_from_onnx_manifest(b.onnx),
        settings=b.settings,
        build_seconds=round(seconds, 3),
        engine_bytes=int(serialized.nbytes),
        command=command,
    )


def _save(b: _Build, out: str | os.PathLike, serialized: Any, manifest: dict[str, Any]) -> None:
    """``model.engine`` + ``engine.json`` together or not at all; the timing cache written back."""
    with staged_folder(out, owned=ENGINE_FILES) as tmp:
        (tmp / ENGINE_FILE).write_bytes(bytes(memoryview(serialized)))
        manifest["sha256"] = sha256_file(tmp / ENGINE_FILE)
        write_json(tmp / ENGINE_MANIFEST, manifest)
    if b.cfg.timing_cache and not b.rtx:
        with atomic_path(b.cfg.timing_cache) as tmp_cache:
            tmp_cache.write_bytes(bytes(memoryview(b.config.get_timing_cache().serialize())))


def build_engine(cfg: BuildConfig, out: str | os.PathLike, command: str | None = None) -> dict[str, Any]:
    """Build ``out/model.engine`` + ``out/engine.json`` from ``cfg.onnx``; returns the manifest.

    Steps: check the output and the ONNX (before any minutes are spent) -> TensorRT and the
    plugin -> parse -> builder config -> profile and timing cache -> serialize -> save."""
    check_outputs({"ONNX_FILE": cfg.onnx, "--plugin": cfg.plugin, "--timing-cache": cfg.timing_cache},
                  folders={"--out": out})
    check_out_folder(Path(out), ENGINE_FILES)
    b = _inspect(cfg)
    _builder(b)
    _parse(b)
    _config(b)
    _profile_and_cache(b)
    serialized, seconds = _serialize(b)
    manifest = _manifest(b, serialized, seconds, command)
    _save(b, out, serialized, manifest)
    return manifest


def _from_onnx_manifest(onnx_path: Path) -> dict[str, Any]:
    """What the engine's runner and ``validate`` need from the export manifest beside the ONNX:
    the model (scale, channels, task, precision), the sizes the graph handles, and the bundle
    (absolute path and checksum) with the scan and DLS modes the graph was exported with."""
    m = read_onnx_manifest(onnx_path)
    if not m:
        return {}
    channels = (m.get("inputs") or {}).get("input", [None, 3])[1]
    limits = m.get("limits") or {}
    source = m.get("source") or {}
    options = m.get("options") or {}
    bundle = source.get("bundle")
    return {
        "model": ModelInfo(arch=m.get("arch"), scale=int(m.get("upscale", 1)), in_chans=int(channels or 3),
                           task=m.get("task"), qconfig=m.get("qconfig"), window_size=limits.get("window")).as_dict(),
        "limits": limits or None,
        "source": {"bundle": str((onnx_path.parent / bundle).resolve()) if bundle else None,
                   "bundle_sha256": source.get("bundle_sha256"), "scan": options.get("scan"),
                   "dls": options.get("dls")},
    }


def _source_checksum() -> str | None:
    try:
        return plugin_checksum()
    except EnvironmentMissing:  # installed without the sources: the library checksum still identifies it
        return None
