"""ONNX graphs as exported: read them with checks, walk them, find the scan nodes.

Only ``onnx`` is needed here (no exporter): the runtimes, lint, the engine build and the
package read graphs through :func:`read_onnx` and check scan nodes with
:func:`scan_node_problems`, one source of truth for what the op contract requires of a node.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import helper

from ..errors import OptionError
from ..ops import contract

__all__ = ["graphs", "scan_nodes", "scan_node_problems", "read_onnx", "set_opset", "strip_debug_metadata"]


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


def strip_debug_metadata(model: onnx.ModelProto) -> int:
    """Remove the exporter's per-node and per-value metadata (``pkg.torch.onnx.*``: the Python stack
    trace, source file paths and line numbers of the checkout that traced the model), in place, in
    every graph; returns the bytes removed. It was ~80 % of an exported file, named the machine's
    paths, and made two checkouts write different bytes for the same graph. Model-level metadata
    (ours) stays."""
    before = model.ByteSize()
    for graph in graphs(model.graph):
        del graph.metadata_props[:]
        for value in (*graph.value_info, *graph.input, *graph.output, *graph.initializer):
            del value.metadata_props[:]
        for node in graph.node:
            del node.metadata_props[:]
    return before - model.ByteSize()


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


def read_onnx(path: str | os.PathLike, check_scans: bool = True) -> onnx.ModelProto:
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


def set_opset(model: onnx.ModelProto, domain: str, version: int | None) -> None:
    """Set (version) or drop (None) the opset_import entry of ``domain``."""
    kept = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    if version is not None:
        model.opset_import.append(helper.make_opsetid(domain, version))
