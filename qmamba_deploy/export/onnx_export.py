"""Export: a deploy model (or bundle) -> ONNX with Q/DQ and the SelectiveScan node.

:func:`export_onnx` traces the deploy model with ``torch.onnx.export(dynamo=True)``:

* integer weights are int8 initializers feeding DequantizeLinear (zero point 0; per
  channel on the output axis where the scale is a vector); with ``int4_weights`` the
  2-D MatMul weights become INT4 initializers with a blocked DequantizeLinear (opset 21),
  which TensorRT runs as weight-only INT4 and ONNX Runtime as MatMulNBits;
* activations are [Clip] → QuantizeLinear → DequantizeLinear, int8, zero point 0, offsets
  as explicit Add/Sub around them; ``--dls dynamic`` DLS sites are float Reduce/Round ops;
* each selective scan is one ``QMambaSelectiveScan`` node (``scan="plugin"``) or standard
  ops with an ONNX Scan over chunks (``scan="portable"``);
* batch, height and width are dynamic; opset 21, IR version 10; onnx.checker and shape
  inference run on the result; the same input gives a byte-identical file.

Beside ``model.onnx`` goes ``model.json``: the options, what the graph holds (node
counts, Q/DQ pairs, scan nodes, INT4 weights), the bundle it came from and checksums.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxscript.optimizer as opt
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import DeduplicateInitializersPass, LiftConstantsToInitializersPass, RemoveUnusedNodesPass

from .. import __version__
from ..artifacts import atomic_path, kind, make_manifest, manifest_path, sha256_file, write_json
from ..errors import OptionError
from ..fold import with_dls_mode
from ..models.card import card_of
from ..ops import contract
from ..ops.selective_scan import scan_backend
from ..quant.deploy import DLS_MODES, DLSAct, FoldedWeight
from .graph import scan_nodes, strip_debug_metadata
from .qdq_onnx import qdq_translation_table
from .scan_onnx import DEFAULT_IR_VERSION, DEFAULT_OPSET, custom_translation_table, finalize_scan_model

ONNX_KIND = kind("onnx")
SCAN_MODES = ("plugin", "portable")
INPUT_NAME, OUTPUT_NAME = "input", "output"
#: Above this many bytes of initializers the weights go to an external data file
#: (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_BYTES = 2 * 1024 ** 3 - 64 * 1024 ** 2
INT4_BLOCK = 32

__all__ = ["ExportOptions", "export_onnx", "graph_summary", "SCAN_MODES", "ONNX_KIND", "INPUT_NAME", "OUTPUT_NAME"]


@dataclass(frozen=True)
class ExportOptions:
    scan: str = "plugin"
    dls: str = "static"
    int4_weights: bool = False
    opset: int = DEFAULT_OPSET
    ir_version: int = DEFAULT_IR_VERSION
    example_size: int = 32  # height/width of the tracing input (any size works afterwards)

    def __post_init__(self):
        if self.scan not in SCAN_MODES:
            raise OptionError(f"--scan {self.scan!r} is unknown; use plugin or portable")
        if self.dls not in DLS_MODES:
            raise OptionError(f"--dls {self.dls!r} is unknown; use static or dynamic")
        if self.opset < DEFAULT_OPSET:
            raise OptionError(f"--opset {self.opset} is too old; Q/DQ with INT4 and blocked scales need >= 21")
        if not 1 <= self.example_size <= 512:
            raise OptionError(f"--example-size {self.example_size} is out of range; use 8..512")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_int4(deploy: nn.Module) -> list[str]:
    """Names of the 2-D MatMul weights that go to INT4; an error for any wider one."""
    names = []
    for name, m in deploy.named_modules():
        if isinstance(m, FoldedWeight) and len(m.shape) == 2 and name.endswith(".weight"):
            if m.bits > 4:
                raise OptionError(f"--int4-weights needs MatMul weights of at most 4 bits, but {name} has "
                                  f"{m.bits}-bit weights; quantize with --w-bits 4 (or 2), or drop --int4-weights")
            names.append(name)
    if not names:
        raise OptionError("--int4-weights found no quantized MatMul weight to store as INT4; "
                          "export a W4 (or W2) bundle, or drop --int4-weights")
    return names


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _to_int4(proto: onnx.ModelProto, weight_names: list[str], block: int = INT4_BLOCK) -> int:
    """Re-store the DQ weights named ``<w>.q`` as INT4 with a blocked scale along K; returns the count."""

    graph = proto.graph
    inits = _initializers(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    wanted = {f"{n}.q" for n in weight_names}
    converted = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in wanted or node.input[0] not in inits:
            continue
        if not all(c.op_type == "MatMul" and c.input[1] == node.output[0] for c in consumers.get(node.output[0], [])):
            continue
        q_init, s_init = inits[node.input[0]], inits[node.input[1]]
        q = numpy_helper.to_array(q_init)
        scale = numpy_helper.to_array(s_init)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if q.ndim != 2 or not (scale.ndim == 0 or (scale.ndim == 1 and axis in (1, -1) and len(scale) == q.shape[1])):
            continue
        k, n = q.shape
        # per tensor: one value everywhere; per output channel: the channel's scale in every block along K
        blocked = np.ascontiguousarray(np.broadcast_to(scale.astype(np.float32), (math.ceil(k / block), n)))
        new_q = numpy_helper.from_array(q.astype(ml_dtypes.int4), q_init.name + "_int4")  # packed, 2 per byte
        new_s = numpy_helper.from_array(blocked, s_init.name + "_blocked_" + q_init.name)
        graph.initializer.extend([new_q, new_s])
        del node.input[:]
        node.input.extend([new_q.name, new_s.name])  # no zero point: 0 of the input type
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)])
        converted += 1
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return converted


def graph_summary(proto: onnx.ModelProto) -> dict[str, Any]:
    """What a graph holds: op counts, Q/DQ and scan nodes, integer initializers by type."""
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in proto.graph.node)
    int_types = Counter(TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer
                        if t.data_type in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4))
    return {
        "nodes": len(proto.graph.node),
        "ops": dict(sorted(ops.items())),
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "scan_nodes": len(scan_nodes(proto)),
        "integer_initializers": dict(sorted(int_types.items())),
        "opset_import": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "ir_version": proto.ir_version,
    }


def input_limits(deploy: nn.Module) -> dict[str, Any]:
    """The input sizes the exported graph handles (``model.json``'s ``limits``).

    MambaIRv2 pads each side up to a multiple of its window by appending one mirrored copy; a
    side shorter than half a window would need several copies, a loop the trace fixes at zero
    turns (the example input is larger), so the graph takes sides >= ceil(window / 2). MambaIR
    (no window) takes any size."""
    window = getattr(deploy, "window_size", None)
    side = -(-int(window) // 2) if window else 1
    return {"min_hw": [side, side], "max_hw": [None, None], "max_batch": None,
            "window": int(window) if window else None}


def _metadata(proto: onnx.ModelProto, deploy: nn.Module, options: ExportOptions) -> None:
    card = card_of(deploy)
    qconfig = card.qconfig
    proto.producer_name, proto.producer_version = "qmamba-deploy", __version__
    proto.doc_string = (f"{card.arch} ({qconfig.label if qconfig else 'float'}), "
                        f"scan={options.scan}, dls={options.dls}")
    props = {"qmamba.arch": card.arch, "qmamba.qconfig": qconfig.label if qconfig else "float",
             "qmamba.scan": options.scan, "qmamba.dls": options.dls,
             "qmamba.plugin": f"{contract.PLUGIN_NAMESPACE}::{contract.PLUGIN_NAME} v{contract.PLUGIN_VERSION}",
             "qmamba.upscale": str(int(getattr(deploy, "upscale", 1)))}
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def trace_onnx(deploy: nn.Module, options: ExportOptions) -> onnx.ModelProto:
    """The finished ModelProto of a deploy model (DLS sites already in the wanted mode)."""
    channels = int(getattr(deploy, "in_chans", 3))
    size = options.example_size
    # batch 2 and a non-square example keep the exporter from specialising any of the three dims.
    # Dim.DYNAMIC lets torch.export keep the guards the window padding produces as run-time
    # conditions instead of failing (a failed strict pass falls back to draft export: minutes).
    x = torch.rand(2, channels, size, size + 8, generator=torch.Generator().manual_seed(0))
    dynamic = {"x": {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    table = {**custom_translation_table(), **qdq_translation_table()}
    backend = "op" if options.scan == "plugin" else "portable"
    with torch.no_grad(), scan_backend(backend):
        program = torch.onnx.export(deploy, (x,), dynamo=True, opset_version=options.opset,
                                    dynamic_shapes=dynamic, custom_translation_table=table,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], optimize=False,
                                    verbose=False)
    _clean(program.model)
    return program.model_proto


def _clean(model) -> None:
    """Constant folding, constants as initializers, dead nodes removed (an onnx_ir model, in place).

    Not onnxscript's full ``optimize``: its pattern rewriter is quadratic in the graph size
    (about 4 minutes on MambaIRv2-light with dynamic DLS, against 1 s for these passes).
    """

    opt.fold_constants_ir(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    DeduplicateInitializersPass()(model)
    RemoveUnusedNodesPass()(model)


def export_onnx(deploy: nn.Module, path: str | os.PathLike, options: ExportOptions = ExportOptions(),
                source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``path`` (.onnx) and its manifest; returns the manifest. Nothing is left on failure."""

    path = Path(path)
    if path.suffix != ".onnx":
        raise OptionError(f"output {path} must end in .onnx")
    int4 = _check_int4(deploy) if options.int4_weights else []
    model = with_dls_mode(deploy, options.dls).eval()
    dls_sites = sum(isinstance(m, DLSAct) for m in model.modules())
    proto = trace_onnx(model, options)
    strip_debug_metadata(proto)  # the tracer's stack traces: most of the file, and this machine's paths
    converted = _to_int4(proto, int4) if int4 else 0
    if options.scan == "portable" and scan_nodes(proto):
        raise RuntimeError("the portable export still has QMambaSelectiveScan nodes")
    _metadata(proto, model, options)
    finalize_scan_model(proto, ir_version=options.ir_version, check=False)
    onnx.checker.check_model(proto, full_check=False)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=False)

    external = sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    with atomic_path(path) as tmp:
        if external:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data")
        else:
            onnx.save_model(proto, str(tmp))
    summary = graph_summary(proto)
    card = card_of(deploy)
    manifest = make_manifest(
        ONNX_KIND, arch=card.arch, qconfig=card.qconfig.as_dict() if card.qconfig else None, task=card.task,
        upscale=int(getattr(deploy, "upscale", 1)),
        options=options.as_dict(), dls_sites=dls_sites, int4_weights=converted,
        inputs={INPUT_NAME: ["batch", int(getattr(deploy, "in_chans", 3)), "height", "width"]},
        limits=input_limits(deploy),
        outputs={OUTPUT_NAME: ["batch", int(getattr(deploy, "in_chans", 3)), "height*s", "width*s"]},
        graph=summary, external_data=external, source=dict(source or {}),
        plugin={"name": contract.PLUGIN_NAME, "version": contract.PLUGIN_VERSION,
                "namespace": contract.PLUGIN_NAMESPACE} if summary["scan_nodes"] else None,
    )
    manifest["sha256"] = sha256_file(path)
    write_json(manifest_path(path), manifest)
    return manifest
