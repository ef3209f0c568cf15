"""ONNX Runtime: sessions for exported graphs and the ONNX Runtime runner.

:func:`ort_session` opens an exported ONNX with the settings parity runs need:

* the ``QMambaSelectiveScan`` nodes run through a Python custom op: onnxruntime-extensions
  only runs Python custom ops in the domain ``ai.onnx.contrib``, so an in-memory copy of the
  model gets its scan nodes moved there (the file on disk is never touched) and the node is
  computed by the op's CPU forward (``torch.ops.qmamba.selective_scan``: the compiled kernel of
  ``ops/scan_cpu.py``, or the chunked torch path without a compiler; both tested against the
  sequential reference);
* ``session.qdq_matmulnbits_accuracy_level = 0``: an INT4 DequantizeLinear + MatMul fused
  into MatMulNBits computes in float32 instead of ORT's default reduced accuracy;
* ``QDQPropagationTransformer`` is disabled: in ONNX Runtime 1.32 it combines with
  ``QDQS8ToU8Transformer`` into a QuantizeLinear whose output type and zero point type
  disagree, and the session fails to load (seen on the portable scan graphs). It only
  moves Q/DQ pairs for speed; the graph's values are unchanged without it.

:class:`OrtRunner` runs a graph on the CPU or CUDA execution provider; what sizes it accepts
comes from the graph's input axes (fixed or dynamic) and the export manifest ``model.json``
(the smallest size the traced window padding handles).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from ..artifacts import manifest_path
from ..checkpoints import check_finite
from ..errors import ModelError, OptionError
from ..export.graph import graphs, read_onnx, scan_nodes, set_opset
from ..ops import contract, scan_cpu
from ..ops.selective_scan import SCAN_OP
from .base import (
    ModelInfo,
    Runner,
    ShapeLimits,
    cpu_device,
    cpu_memory,
    fmt_shape,
    info_from_manifest,
    limits_from_manifest,
)

DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)
#: The only domain where onnxruntime-extensions looks up Python custom ops.
ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)

__all__ = ["read_onnx_manifest", "ort_session", "ort_session_with_scan", "onnx_runner", "OrtRunner", "onnx_limits",
           "DISABLED_OPTIMIZERS",
           "ORT_CONTRIB_DOMAIN", "PROVIDERS"]


# --------------------------------------------------------------------------------------
# the scan node as an onnxruntime-extensions Python op
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _register_ort_python_op() -> str:
    """Register the Python kernel with onnxruntime-extensions (once); return its library path."""

    attr_types = {"int": PyCustomOpDef.dt_int64, "string": PyCustomOpDef.dt_string}

    @onnx_op(op_type=contract.OP_TYPE,
             inputs=[PyCustomOpDef.dt_float] * len(contract.INPUT_NAMES),
             outputs=[PyCustomOpDef.dt_float] * len(contract.OUTPUT_NAMES),
             attrs={a.name: attr_types[a.kind] for a in contract.ATTRIBUTES})
    def _qmamba_selective_scan(u, delta, A, B, C, D_skip, delta_bias, **attrs):
        # onnxruntime-extensions hands each input over as a fresh, writable copy (older releases: maybe a
        # read-only view, copied here)
        tensors = [torch.from_numpy(x if x.flags.writeable else x.copy())
                   for x in (u, delta, A, B, C, D_skip, delta_bias)]
        softplus = bool(int(attrs.get("delta_softplus", 1)))
        # one thread: ONNX Runtime's intra-op workers spin on the other cores between kernels, and
        # torch's OpenMP workers would spin after the op's parallel regions, each taking a core from
        # the other (docs/performance.md: 231 ms single-threaded against 480 ms at 64x64)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                y = SCAN_OP(*tensors, softplus)
        finally:
            torch.set_num_threads(threads)
        return y.numpy()

    _return_arrays_for(_qmamba_selective_scan)
    return get_library_path()


#: Python ops whose results go back to ONNX Runtime as arrays (obj_id -> the op's definition).
_ARRAY_RESULT_OPS: dict[int, Any] = {}


def _return_arrays_for(opdef: Any) -> bool:
    """Let ``opdef``'s results reach ONNX Runtime as arrays instead of Python lists.

    onnxruntime-extensions' stock hook turns every Python op's result into a list of Python floats
    (``tolist()``) that its C++ side turns back into an array: about 45 ns per element, 9 ms for one
    scan output at 64x64, half of the plugin graph's run time (docs/performance.md). Its C++ side
    takes any array-like (``numpy.ascontiguousarray``, then one memcpy), so the hook installed here
    returns the array itself for the ops registered through this function and hands every other
    Python op to the stock hook. The hook is a private part of onnxruntime-extensions: where it is
    not as expected nothing is changed (the stock path is correct, only slower). Returns whether
    ``opdef`` takes the fast path.
    """
    from onnxruntime_extensions import _ocos

    stock = getattr(_ocos, "_on_pyop_invocation", None)
    registry = getattr(getattr(_ocos, "Opdef", None), "_odlist", None)
    native = getattr(opdef, "_nativedef", None)
    if (stock is None or not isinstance(registry, dict) or native is None
            or registry.get(native.obj_id) is not opdef or not hasattr(opdef, "cast_attributes")):
        return False
    if not _ARRAY_RESULT_OPS:
        def hook(k_id, feed, attributes):
            op = _ARRAY_RESULT_OPS.get(k_id)
            if op is None:
                return stock(k_id, feed, attributes)
            y = op.body(*feed, **op.cast_attributes(attributes))
            return (k_id, *(v for r in (y if isinstance(y, tuple) else (y,)) for v in (r.shape, r)))

        PyCustomOpDef.install_hooker(hook)
    _ARRAY_RESULT_OPS[native.obj_id] = opdef
    return True


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:                     # Constant nodes carry their type in the value
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _move_scans_to_contrib(graph: onnx.GraphProto) -> None:
    """Move the scan nodes of one graph to ai.onnx.contrib, with float32 I/O via Casts.

    The Python kernel is registered for float32 only; float16 models get Cast nodes
    around each scan (the op computes in float32 anyway).
    """
    types = _elem_types(graph)
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not (node.op_type == contract.OP_TYPE and node.domain == contract.DOMAIN):
            new_nodes.append(node)
            continue
        node.domain = ORT_CONTRIB_DOMAIN
        # y has u's dtype (the exporter records it; fall back to u's, then float32)
        out_type = types.get(node.output[0]) or types.get(node.input[0]) or TensorProto.FLOAT
        for i, name in enumerate(node.input):
            if types.get(name, TensorProto.FLOAT) not in (TensorProto.FLOAT, TensorProto.UNDEFINED):
                cast = f"{name}__f32_for_{node.name or i}"
                new_nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT))
                node.input[i] = cast
        new_nodes.append(node)
        if out_type != TensorProto.FLOAT:
            y = node.output[0]
            node.output[0] = f"{y}__f32"
            new_nodes.append(helper.make_node("Cast", [node.output[0]], [y], to=out_type))
    del graph.node[:]
    graph.node.extend(new_nodes)


def ort_session_with_scan(model: str | os.PathLike | onnx.ModelProto,
                          providers: Sequence[str] | None = None,
                          session_options: Any = None, disabled_optimizers: Sequence[str] = ()):
    """An onnxruntime InferenceSession that runs the QMambaSelectiveScan nodes in Python.

    ``model`` is a path or a ModelProto; either way only an in-memory copy is changed
    (scan nodes moved to ``ai.onnx.contrib``), never the file or the caller's proto.
    """

    if isinstance(model, onnx.ModelProto):
        work = onnx.ModelProto()
        work.CopyFrom(model)
    else:
        work = onnx.load(os.fspath(model))     # a fresh copy, external data included
    for graph in graphs(work.graph):
        _move_scans_to_contrib(graph)
    set_opset(work, contract.DOMAIN, None)
    if scan_nodes(work, ORT_CONTRIB_DOMAIN):
        set_opset(work, ORT_CONTRIB_DOMAIN, 1)

    options = session_options or ort.SessionOptions()
    options.register_custom_ops_library(_register_ort_python_op())
    return ort.InferenceSession(work.SerializeToString(), options,
                                providers=list(providers or ["CPUExecutionProvider"]),
                                disabled_optimizers=list(disabled_optimizers) or None)


def ort_session(path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0) -> Any:
    """An InferenceSession for an exported graph (custom scan op registered, parity settings)."""

    if not os.path.isfile(path):
        raise OptionError(f"{path} is not a file; pass the .onnx that `qmamba-deploy export` wrote")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort_session_with_scan(path, providers=providers, session_options=options,
                                 disabled_optimizers=DISABLED_OPTIMIZERS)


# --------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------


def read_onnx_manifest(path: Path) -> dict[str, Any]:
    """``model.json`` beside an exported ONNX ({} when there is none); one sentence when it is broken."""
    side = manifest_path(path)
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        raise OptionError(f"{side} (the manifest beside {path.name}) is not valid JSON; "
                          f"re-run `qmamba-deploy export` or delete it") from None
    return data if isinstance(data, dict) else {}


def onnx_limits(proto_input: onnx.ValueInfoProto, manifest: dict[str, Any], source: str) -> ShapeLimits:
    """What the graph accepts: its input's fixed or dynamic axes and the manifest's minimum size."""
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in proto_input.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise OptionError(f"{source}: input {proto_input.name!r} has rank {len(dims)}; runners take NCHW images")
    channels = dims[1] or 3
    if dims[1] is None:  # a dynamic channel axis: the export manifest says what the model takes
        declared = (manifest.get("inputs") or {}).get(proto_input.name) if isinstance(manifest.get("inputs"), dict) \
            else None
        channels = declared[1] if isinstance(declared, list) and len(declared) == 4 and isinstance(declared[1], int) \
            else 3
    saved = limits_from_manifest(manifest.get("limits"), channels, str(manifest_path(Path(source))), "ONNX")
    window = saved.window if saved else None
    lo = saved.min_hw if saved else (1, 1)  # older exports recorded no minimum
    min_hw = tuple(d if d is not None else int(m) for d, m in zip(dims[2:], lo))
    what = "fixed input size" if all(dims[2:]) else "dynamic H, W" + (f", window {window}" if window else "")
    return ShapeLimits(channels, min_hw, tuple(dims[2:]), dims[0], f"ONNX {what}", window)  # type: ignore[arg-type]


class OrtRunner(Runner):
    """An exported ONNX (plugin or portable scan) in ONNX Runtime, CPU or CUDA provider."""

    kind = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int = 0,
                 limits: ShapeLimits | None = None):
        super().__init__(path, device)
        if device not in PROVIDERS:
            raise OptionError(f"--device {device}: ONNX Runtime runs on cpu or cuda")
        self.threads = int(threads)
        self._limits_override = limits
        self.session: Any = None
        self.manifest: dict[str, Any] = {}
        self._input = self._output = ""
        self._info: ModelInfo | None = None
        self._limits: ShapeLimits | None = None
        self.scan_nodes = 0

    def _load(self) -> None:
        path = self.path
        proto = read_onnx(path)
        check_finite({t.name: numpy_helper.to_array(t) for t in proto.graph.initializer
                      if t.data_type in _FLOAT_TYPES and t.data_location != onnx.TensorProto.EXTERNAL}, str(path))
        inits = {i.name for i in proto.graph.initializer}
        inputs = [i for i in proto.graph.input if i.name not in inits]
        if len(inputs) != 1 or len(proto.graph.output) != 1:
            raise OptionError(f"{path} has {len(inputs)} inputs and {len(proto.graph.output)} outputs; "
                              f"qmamba-deploy graphs take one NCHW image and return one")
        provider = PROVIDERS[self.device]
        if provider not in ort.get_available_providers():
            raise OptionError(f"--device {self.device}: this onnxruntime has no {provider} "
                              f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                              "in place of onnxruntime (the [gpu] extra) or pass --device cpu")
        self.manifest = read_onnx_manifest(path)
        self._limits = self._limits_override or onnx_limits(inputs[0], self.manifest, str(path))
        self.scan_nodes = len(scan_nodes(proto))
        meta = {p.key: p.value for p in proto.metadata_props}
        fallback = {"arch": meta.get("qmamba.arch"),  # a graph without model.json: its metadata props
                    "upscale": int(meta["qmamba.upscale"]) if meta.get("qmamba.upscale", "").isdigit() else 1}
        self._info = info_from_manifest(self.manifest or fallback, self._limits.channels,
                                        str(manifest_path(path)), self._limits.window)
        try:
            self.session = ort_session(path, providers=[provider], threads=self.threads)
        except OptionError:
            raise
        except Exception as exc:  # ORT's own errors: a graph it cannot load
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise OptionError(f"{path}: ONNX Runtime could not load it ({first}); run `qmamba-deploy lint` on it, "
                              f"or re-export it") from None
        self._input, self._output = self.session.get_inputs()[0].name, self.session.get_outputs()[0].name
        if self.scan_nodes:
            self.notes.append(f"{self.scan_nodes} {contract.OP_TYPE} nodes ran as ONNX Runtime Python custom ops "
                              f"(the op's CPU forward: {scan_cpu.backend()} scan)")

    def _release(self) -> None:
        self.session = None

    @property
    def info(self) -> ModelInfo:
        self._need_open()
        return self._info

    @property
    def limits(self) -> ShapeLimits:
        self._need_open()
        return self._limits

    def _describe(self) -> dict[str, Any]:
        return {"backend": "onnxruntime", "backend_version": ort.__version__, "device": self.device,
                "providers": list(self.session.get_providers()),
                "scan": (self.manifest.get("options") or {}).get("scan"),
                "dls": (self.manifest.get("options") or {}).get("dls")}

    def _feed(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        return {self._input: np.ascontiguousarray(x.numpy(), dtype=np.float32)}

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return torch.from_numpy(self.session.run([self._output], self._feed(x))[0])
        except Exception as exc:  # ORT's errors: a graph that loads but cannot run this input
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.path}: ONNX Runtime failed on a {fmt_shape(x.shape)} input ({first}); "
                             f"run `qmamba-deploy lint` on it, or re-export it") from None

    def bench_step(self, x: torch.Tensor):
        self._need_open()
        self.limits.check(tuple(x.shape))
        feed = self._feed(x.float().cpu())
        out = self.session.run([self._output], feed)[0]
        return (lambda: self.session.run([self._output], feed)), tuple(out.shape)  # host arrays: synchronous

    def memory(self) -> dict[str, Any]:
        if self.device == "cpu":
            return cpu_memory()
        return {"peak_bytes": None, "what": "not reported by ONNX Runtime"}

    def device_info(self) -> dict[str, Any]:
        if self.device == "cpu":
            return cpu_device(self.threads)
        return {"type": "cuda", "name": PROVIDERS["cuda"], "threads": None}


def onnx_runner(path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0):
    """A float NCHW -> float NCHW function that runs the graph (one input, one output)."""
    session = ort_session(path, providers, threads)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        y = session.run(None, {name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(y)

    return run
