"""ONNX mapping of the SelectiveScan op: one ``QMambaSelectiveScan`` node per call.

Export (``torch.onnx.export(..., dynamo=True)``): ``custom_translation_table()`` maps
``torch.ops.qmamba.selective_scan.default`` to an onnxscript function that emits a
single node of op_type ``contract.OP_TYPE`` in domain ``contract.DOMAIN`` with the
attributes of ``contract.node_attributes``. ``export_with_scan`` wraps the export,
fixes the opset / IR version, strips any embedded function of that name (TensorRT
would inline it instead of calling the plugin), runs the checker and writes the file.

Running the node in ONNX Runtime (a Python custom op) is ``runtime/ort.py``'s business.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import onnx
import torch
from onnx import helper

from ..errors import OptionError
from ..ops import contract
from ..ops.selective_scan import SCAN_OP

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_IR_VERSION",
    "scan_op_schema",
    "custom_translation_table",
    "finalize_scan_model",
    "export_with_scan",
    "scan_nodes",
    "graphs",
    "set_opset",
    "read_onnx",
    "scan_node_problems",
]

DEFAULT_OPSET = 21
#: onnx 1.23 writes IR 14 by default; ONNX Runtime 1.32 and TensorRT 10 read <= 10 safely.
DEFAULT_IR_VERSION = 10

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


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and all its subgraphs (If / Loop / Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graphs(g)


def scan_nodes(model: onnx.ModelProto, domain: str = contract.DOMAIN) -> list[onnx.NodeProto]:
    """All QMambaSelectiveScan nodes of ``domain`` in the model (subgraphs included)."""
    return [n for g in graphs(model.graph) for n in g.node
            if n.op_type == contract.OP_TYPE and n.domain == domain]


def scan_node_problems(node: onnx.NodeProto) -> list[tuple[str, str, str]]:
    """(level, code, message) for a QMambaSelectiveScan node against the op contract: domain,
    attributes (names, types, values) and input count. Lint reports them; runners refuse errors."""
    problems = []
    if node.domain != contract.DOMAIN:
        problems.append(("error", "plugin-domain", f"{contract.OP_TYPE} is in domain {node.domain!r}, expected "
                                                   f"{contract.DOMAIN!r}"))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    for a in contract.ATTRIBUTES:
        if a.name not in attrs:
            problems.append(("error", "plugin-attribute", f"attribute {a.name!r} is missing"))
            continue
        value = attrs[a.name].decode(errors="replace") if isinstance(attrs[a.name], bytes) else attrs[a.name]
        if a.kind == "string" and value != a.default:
            problems.append(("error", "plugin-attribute", f"{a.name}={value!r}, the plugin is {a.default!r}"))
        elif a.kind == "int" and (not isinstance(value, int) or value not in (0, 1)):
            problems.append(("error", "plugin-attribute", f"{a.name}={value!r}, expected 0 or 1"))
    extra = sorted(set(attrs) - {a.name for a in contract.ATTRIBUTES})
    if extra:
        problems.append(("warning", "plugin-attribute", f"attributes the plugin ignores: {', '.join(extra)}"))
    if len(node.input) != len(contract.INPUT_NAMES):
        problems.append(("error", "plugin-inputs", f"{len(node.input)} inputs, the contract has "
                                                   f"{len(contract.INPUT_NAMES)}"))
    return problems


def read_onnx(path: Union[str, os.PathLike], check_scans: bool = True) -> onnx.ModelProto:
    """An exported graph from disk (external data not loaded), or one sentence: no such file,
    empty, not ONNX, no graph in it, or (``check_scans``) a QMambaSelectiveScan node that breaks
    the op contract (a tampered or foreign graph)."""
    path = Path(path)
    hint = "pass the model.onnx that `qmamba-deploy export` wrote"
    if not path.is_file():
        raise OptionError(f"{path}: no such file; {hint}")
    if path.stat().st_size == 0:
        raise OptionError(f"{path} is empty; {hint}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise OptionError(f"{path} is not a readable ONNX model ({type(exc).__name__}); {hint}") from None
    if not model.graph.node or not model.graph.output or not model.opset_import:
        raise OptionError(f"{path} holds no ONNX graph (no nodes, outputs or opset); {hint}")
    if check_scans:
        for g in graphs(model.graph):
            for node in g.node:
                if node.op_type != contract.OP_TYPE:
                    continue
                errors = [m for level, _, m in scan_node_problems(node) if level == "error"]
                if errors:
                    raise OptionError(f"{path}: node {node.name or node.output[0]!r}: {errors[0]}; the graph breaks "
                                      f"the {contract.OP_TYPE} contract (tampered, or made by other tools): "
                                      f"re-export it")
    return model


def set_opset(model: onnx.ModelProto, domain: str, version: Optional[int]) -> None:
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
        set_opset(model, contract.DOMAIN, contract.DOMAIN_VERSION)
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
