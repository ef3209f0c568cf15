"""ONNX mapping of the SelectiveScan op: one ``QMambaSelectiveScan`` node per call.

Export (``torch.onnx.export(..., dynamo=True)``): ``custom_translation_table()`` maps
``torch.ops.qmamba.selective_scan.default`` to an onnxscript function that emits a
single node of op_type ``contract.OP_TYPE`` in domain ``contract.DOMAIN`` with the
attributes of ``contract.node_attributes``. ``export_with_scan`` wraps the export,
fixes the opset / IR version, strips any embedded function of that name (TensorRT
would inline it instead of calling the plugin), runs the checker and writes the file.

Validation on CPU (``ort_session_with_scan``): onnxruntime-extensions only runs Python
custom ops in the domain ``ai.onnx.contrib``, so an in-memory copy of the model gets
its scan nodes moved there (the file on disk is never touched) and the node is
computed by :func:`qmamba_deploy.ops.selective_scan.selective_scan_chunked` (the fast
torch path, itself tested against the sequential reference).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import onnx
import torch
from onnx import TensorProto, helper

from ..ops import contract
from ..ops.selective_scan import SCAN_OP, selective_scan_chunked

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_IR_VERSION",
    "ORT_CONTRIB_DOMAIN",
    "scan_op_schema",
    "custom_translation_table",
    "finalize_scan_model",
    "export_with_scan",
    "scan_nodes",
    "ort_session_with_scan",
]

DEFAULT_OPSET = 21
#: onnx 1.23 writes IR 14 by default; ONNX Runtime 1.32 and TensorRT 10 read <= 10 safely.
DEFAULT_IR_VERSION = 10
#: The only domain where onnxruntime-extensions looks up Python custom ops.
ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"

_ONNX_ATTR_TYPES = {"int": onnx.defs.OpSchema.AttrType.INT, "string": onnx.defs.OpSchema.AttrType.STRING}
# Inputs that carry the activation dtype (float32/float16); the others are float32 params.
_ACTIVATION_INPUTS = {"u", "delta", "B", "C"}


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def scan_op_schema() -> onnx.defs.OpSchema:
    """An OpSchema for the node (onnxscript's graph builder needs one to emit it).

    It is handed to onnxscript only; nothing is registered with onnx globally.
    """
    schema_cls = onnx.defs.OpSchema
    io = schema_cls.FormalParameter
    return schema_cls(
        contract.OP_TYPE,
        contract.DOMAIN,
        contract.DOMAIN_VERSION,
        doc="Mamba selective scan; see shared/design/selective-scan-op.md.",
        inputs=[io(name, "T" if name in _ACTIVATION_INPUTS else "P") for name in contract.INPUT_NAMES],
        outputs=[io(name, "T") for name in contract.OUTPUT_NAMES],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(double)"], "activations"),
            ("P", ["tensor(float)", "tensor(float16)", "tensor(double)"], "parameters"),
        ],
        attributes=[schema_cls.Attribute(a.name, _ONNX_ATTR_TYPES[a.kind], "") for a in contract.ATTRIBUTES],
    )


def _translate_selective_scan(u, delta, A, B, C, D_skip, delta_bias, delta_softplus: bool = True):
    """onnxscript translation of ``qmamba::selective_scan``: exactly one custom node."""
    from onnxscript.values import Op, Opset

    scan = Op(Opset(contract.DOMAIN, contract.DOMAIN_VERSION), contract.OP_TYPE, scan_op_schema())
    return scan(u, delta, A, B, C, D_skip, delta_bias, **contract.node_attributes(delta_softplus))


def custom_translation_table() -> dict[Callable, Callable]:
    """The ``custom_translation_table`` argument of ``torch.onnx.export(dynamo=True)``."""
    return {SCAN_OP.default: _translate_selective_scan}


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and all its subgraphs (If / Loop / Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def scan_nodes(model: onnx.ModelProto, domain: str = contract.DOMAIN) -> list[onnx.NodeProto]:
    """All QMambaSelectiveScan nodes of ``domain`` in the model (subgraphs included)."""
    return [n for g in _graphs(model.graph) for n in g.node
            if n.op_type == contract.OP_TYPE and n.domain == domain]


def _set_opset(model: onnx.ModelProto, domain: str, version: Optional[int]) -> None:
    """Set (version) or drop (None) the opset_import entry of ``domain``."""
    kept = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    if version is not None:
        model.opset_import.append(helper.make_opsetid(domain, version))


def finalize_scan_model(model: onnx.ModelProto, ir_version: int = DEFAULT_IR_VERSION,
                        check: bool = True) -> onnx.ModelProto:
    """Make an exported model fit the contract (in place; also returned).

    Drops any embedded ONNX function named OP_TYPE, declares (DOMAIN, DOMAIN_VERSION)
    when scan nodes exist, pins the IR version and runs onnx.checker.
    """
    kept = [f for f in model.functions if f.name != contract.OP_TYPE]
    if len(kept) != len(model.functions):
        del model.functions[:]
        model.functions.extend(kept)
    if scan_nodes(model):
        _set_opset(model, contract.DOMAIN, contract.DOMAIN_VERSION)
    model.ir_version = ir_version
    if check:
        onnx.checker.check_model(model)
    return model


def export_with_scan(model: torch.nn.Module, args: tuple, path: Union[str, os.PathLike, None] = None, *,
                     kwargs: Optional[dict[str, Any]] = None, dynamic_shapes: Any = None,
                     opset: int = DEFAULT_OPSET, ir_version: int = DEFAULT_IR_VERSION,
                     input_names: Optional[Sequence[str]] = None,
                     output_names: Optional[Sequence[str]] = None,
                     optimize: bool = True) -> onnx.ModelProto:
    """Export ``model`` with every selective scan as one QMambaSelectiveScan node.

    Returns the final ModelProto and writes it to ``path`` (atomically) when given.
    """
    if opset < DEFAULT_OPSET:
        raise ValueError(f"export_with_scan: opset {opset} is too old, expected >= {DEFAULT_OPSET}.")
    program = torch.onnx.export(
        model, args, kwargs=kwargs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
        custom_translation_table=custom_translation_table(), input_names=input_names,
        output_names=output_names, optimize=optimize, verbose=False,
    )
    proto = finalize_scan_model(program.model_proto, ir_version=ir_version)
    if path is not None:
        from ..manifest import atomic_path

        with atomic_path(path) as tmp:
            onnx.save_model(proto, str(tmp))
    return proto


# --------------------------------------------------------------------------------------
# ONNX Runtime (CPU validation) via onnxruntime-extensions
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _register_ort_python_op() -> str:
    """Register the Python kernel with onnxruntime-extensions (once); return its library path."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    attr_types = {"int": PyCustomOpDef.dt_int64, "string": PyCustomOpDef.dt_string}

    @onnx_op(op_type=contract.OP_TYPE,
             inputs=[PyCustomOpDef.dt_float] * len(contract.INPUT_NAMES),
             outputs=[PyCustomOpDef.dt_float] * len(contract.OUTPUT_NAMES),
             attrs={a.name: attr_types[a.kind] for a in contract.ATTRIBUTES})
    def _qmamba_selective_scan(u, delta, A, B, C, D_skip, delta_bias, **attrs):
        tensors = [torch.from_numpy(x.copy()) for x in (u, delta, A, B, C, D_skip, delta_bias)]
        softplus = bool(int(attrs.get("delta_softplus", 1)))
        with torch.no_grad():
            y = selective_scan_chunked(*tensors, delta_softplus=softplus)
        return y.numpy()

    return get_library_path()


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


def ort_session_with_scan(model: Union[str, os.PathLike, onnx.ModelProto],
                          providers: Optional[Sequence[str]] = None,
                          session_options: Any = None, disabled_optimizers: Sequence[str] = ()):
    """An onnxruntime InferenceSession that runs the QMambaSelectiveScan nodes in Python.

    ``model`` is a path or a ModelProto; either way only an in-memory copy is changed
    (scan nodes moved to ``ai.onnx.contrib``), never the file or the caller's proto.
    """
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        work = onnx.ModelProto()
        work.CopyFrom(model)
    else:
        work = onnx.load(os.fspath(model))     # a fresh copy, external data included
    for graph in _graphs(work.graph):
        _move_scans_to_contrib(graph)
    _set_opset(work, contract.DOMAIN, None)
    if scan_nodes(work, ORT_CONTRIB_DOMAIN):
        _set_opset(work, ORT_CONTRIB_DOMAIN, 1)

    options = session_options or ort.SessionOptions()
    options.register_custom_ops_library(_register_ort_python_op())
    return ort.InferenceSession(work.SerializeToString(), options,
                                providers=list(providers or ["CPUExecutionProvider"]),
                                disabled_optimizers=list(disabled_optimizers) or None)
