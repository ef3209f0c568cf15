"""TensorRT lint: what in an ONNX graph TensorRT would reject or run slowly, before a GPU sees it.

Static checks (always; see shared/design/tensorrt-notes.md):

* Q/DQ: zero points constant and 0 (symmetric), of a signed type (INT8, or INT4 for
  weights); scales constant and positive; activation (QuantizeLinear) scales per tensor;
  per-channel DequantizeLinear on the output-channel axis of the Conv / MatMul it feeds;
  blocked (INT4) DequantizeLinear on 2-D MatMul weights, blocked along K;
* the SelectiveScan nodes: domain, opset import, ``plugin_version`` / ``plugin_namespace`` /
  field attributes as in the op contract, no ONNX function of the same name;
* TopK with a constant k ≤ 3840; no op TensorRT lacks; no node left in the
  validation-only ``ai.onnx.contrib`` domain.

The TensorRT parser's own verdict is added by :func:`qmamba_deploy.trt.lint.lint_onnx` (the
``lint`` command), where TensorRT lives.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..ops import contract
from .graph import read_onnx, scan_node_problems

TOPK_MAX = 3840
#: ONNX ops the TensorRT ONNX parser does not import (10.x / 11.x).
TRT_UNSUPPORTED = frozenset({
    "Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Unique", "StringNormalizer", "TfIdfVectorizer", "Optional", "OptionalGetElement", "OptionalHasElement",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SplitToSequence", "ConcatFromSequence", "ImageDecoder", "RegexFullMatch", "StringConcat", "StringSplit",
    "MatMulNBits",
})
SIGNED_ZERO_POINT_TYPES = (TensorProto.INT8, TensorProto.INT4)

__all__ = ["Finding", "LintReport", "lint_static", "TOPK_MAX"]


@dataclass
class Finding:
    level: str  # "error" | "warning" | "info"
    code: str
    message: str
    node: str | None = None


@dataclass
class LintReport:
    path: str
    findings: list[Finding] = field(default_factory=list)
    parser: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def passed(self) -> bool:
        return not self.errors

    def add(self, level: str, code: str, message: str, node: str | None = None) -> None:
        self.findings.append(Finding(level, code, message, node))

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "passed": self.passed, "counts": self.counts, "parser": self.parser,
                "findings": [asdict(f) for f in self.findings]}

    def text(self) -> str:
        lines = [f"{self.path}: {'ok' if self.passed else 'FAILED'} "
                 f"({len(self.errors)} errors, {sum(f.level == 'warning' for f in self.findings)} warnings)",
                 "  " + ", ".join(f"{k} {v}" for k, v in self.counts.items())]
        for f in self.findings:
            where = f" [{f.node}]" if f.node else ""
            lines.append(f"  {f.level:<7} {f.code}{where}: {f.message}")
        if self.parser:
            p = self.parser
            lines.append(f"  parser  {p['module']} {p['version']}: "
                         f"{'parsed' if p['parsed'] else 'did not parse'}"
                         + (f", {len(p['errors'])} errors" if p["errors"] else ""))
            for e in p["errors"][:10]:
                lines.append(f"          {e['node']} ({e['op']}): {e['message']}")
        return "\n".join(lines)


class _Graph:
    """Constants and consumers of the main graph (initializers and Constant nodes)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.const: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        self.const[n.output[0]] = a.t
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def array(self, name: str) -> np.ndarray | None:
        t = self.const.get(name)
        return numpy_helper.to_array(t) if t is not None else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _check_qdq(g: _Graph, node: onnx.NodeProto, report: LintReport) -> None:
    name = node.name or node.output[0]
    scale_name = node.input[1] if len(node.input) > 1 else ""
    scale = g.array(scale_name)
    if scale is None:
        report.add("error", "dynamic-scale", f"{node.op_type} scale {scale_name!r} is not a constant; TensorRT "
                   f"needs build-time scales (export DLS with --dls static, or keep it as float ops)", name)
        return
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        report.add("error", "bad-scale", f"{node.op_type} scale has non-positive or non-finite values", name)
    if len(node.input) > 2 and node.input[2]:
        zp_t = g.const.get(node.input[2])
        if zp_t is None:
            report.add("error", "dynamic-zero-point", f"{node.op_type} zero point is not a constant", name)
        else:
            if zp_t.data_type not in SIGNED_ZERO_POINT_TYPES:
                report.add("error", "unsigned-zero-point",
                           f"{node.op_type} zero point is {TensorProto.DataType.Name(zp_t.data_type)}; TensorRT "
                           f"quantizes to signed INT8 (or INT4 weights)", name)
            if np.any(numpy_helper.to_array(zp_t) != 0):
                report.add("error", "nonzero-zero-point", f"{node.op_type} has a non-zero zero point; TensorRT is "
                           f"symmetric only (express offsets as explicit Add nodes)", name)
    elif node.op_type == "QuantizeLinear" and _attr(node, "output_dtype", 0) != TensorProto.INT8:
        report.add("error", "unsigned-zero-point", "QuantizeLinear without a zero point outputs UINT8; give it an "
                   "INT8 zero point of 0", name)
    block = int(_attr(node, "block_size", 0) or 0)
    if node.op_type == "QuantizeLinear":
        if scale.size > 1:
            report.add("error", "per-channel-activation", "QuantizeLinear has a per-channel scale; TensorRT "
                       "quantizes activations per tensor", name)
        return
    # DequantizeLinear
    data = g.const.get(node.input[0])
    consumers = g.consumers.get(node.output[0], [])
    if data is not None and data.data_type in (TensorProto.INT4, TensorProto.UINT4):
        ok = (block > 0 and len(data.dims) == 2 and consumers
              and all(c.op_type == "MatMul" and c.input[1] == node.output[0] for c in consumers))
        if not ok:
            report.add("warning", "int4-layout", "INT4 weights run in TensorRT only as blocked 2-D MatMul weights "
                       "(weight-only); this one will be rejected or dequantized", name)
        elif int(_attr(node, "axis", 1)) not in (0, -2):
            report.add("error", "int4-axis", "blocked INT4 DequantizeLinear must block along K (axis 0)", name)
        return
    if scale.size > 1 and block == 0 and data is not None:
        axis = int(_attr(node, "axis", 1)) % len(data.dims)
        for c in consumers:
            if c.op_type == "Conv" and c.input[1] == node.output[0] and axis != 0:
                report.add("error", "per-channel-axis", f"per-channel weight scale on axis {axis} of a Conv weight; "
                           f"TensorRT needs the output-channel axis 0", name)
            if c.op_type in ("MatMul", "Gemm") and c.input[1] == node.output[0] and axis != len(data.dims) - 1:
                report.add("error", "per-channel-axis", f"per-channel weight scale on axis {axis} of a MatMul "
                           f"weight; TensorRT needs the output-channel (last) axis", name)


def _check_scan_node(node: onnx.NodeProto, report: LintReport) -> None:
    for level, code, message in scan_node_problems(node):
        report.add(level, code, message, node.name or node.output[0])


def _static_checks(model: onnx.ModelProto, report: LintReport) -> None:
    g = _Graph(model.graph)
    scans = 0
    for node in model.graph.node:
        name = node.name or (node.output[0] if node.output else node.op_type)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx"):
            _check_qdq(g, node, report)
        elif node.op_type == contract.OP_TYPE:
            scans += 1
            _check_scan_node(node, report)
        elif node.domain == "ai.onnx.contrib":
            report.add("error", "contrib-domain", f"{node.op_type} is in ai.onnx.contrib, the domain used only "
                       f"for ONNX Runtime validation; export again (the shipped file keeps 'qmamba')", name)
        elif node.op_type == "TopK":
            k = g.array(node.input[1]) if len(node.input) > 1 else None
            if k is None:
                report.add("warning", "topk-dynamic-k", f"TopK k is computed at run time; TensorRT needs "
                           f"k <= {TOPK_MAX}", name)
            elif int(np.max(k)) > TOPK_MAX:
                report.add("error", "topk-k", f"TopK k = {int(np.max(k))} > {TOPK_MAX}", name)
        elif node.op_type in TRT_UNSUPPORTED or node.domain not in ("", "ai.onnx", contract.DOMAIN):
            report.add("error", "unsupported-op", f"{node.domain + '::' if node.domain else ''}{node.op_type} "
                       f"has no TensorRT importer", name)
    if any(f.name == contract.OP_TYPE for f in model.functions):
        report.add("error", "plugin-function", f"an ONNX function named {contract.OP_TYPE} is embedded; TensorRT "
                   f"would inline it instead of calling the plugin")
    opsets = {o.domain: o.version for o in model.opset_import}
    if scans and opsets.get(contract.DOMAIN) != contract.DOMAIN_VERSION:
        report.add("error", "plugin-opset", f"opset_import has no ({contract.DOMAIN!r}, {contract.DOMAIN_VERSION})")
    ops = [n.op_type for n in model.graph.node]
    report.counts = {"nodes": len(ops), "QuantizeLinear": ops.count("QuantizeLinear"),
                     "DequantizeLinear": ops.count("DequantizeLinear"), contract.OP_TYPE: scans}


def lint_static(path: str | os.PathLike) -> LintReport:
    """The static checks of ``path`` (the TensorRT parser's verdict is added by ``trt.lint.lint_onnx``)."""
    path = str(path)
    model = read_onnx(path, check_scans=False)  # scan-node problems become findings below
    report = LintReport(path)
    _static_checks(model, report)
    return report
