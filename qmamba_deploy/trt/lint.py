"""``qmamba-deploy lint``: the static checks of ``export.lint`` plus the TensorRT ONNX parser's verdict.

Where a TensorRT parser is importable (``tensorrt``, else ``tensorrt_rtx``), the graph is
parsed and the parser's errors are reported, with the plugin's "not found" errors told apart
(they mean the plugin library was not loaded, not that the graph is wrong).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import EnvironmentMissing
from ..export.lint import LintReport, lint_static
from ..ops import contract
from ..runtime.tensorrt import TRT_MODULES, collecting_logger, import_tensorrt

__all__ = ["lint_onnx", "parse_with_tensorrt"]


def _import_parser():
    """The first usable TensorRT module (full TensorRT, else TensorRT-RTX), or (None, None)."""
    for module in TRT_MODULES:
        try:
            return module, import_tensorrt(module)
        except EnvironmentMissing:
            continue
    return None, None


def _plugin_not_found(error: dict[str, Any]) -> bool:
    """A parser error that only says our plugin library was not loaded."""
    return error["op"] == contract.OP_TYPE and "Plugin not found" in error["message"]


def parse_with_tensorrt(path: str) -> dict[str, Any] | None:
    """Parse ``path`` with the TensorRT ONNX parser when one is importable; None otherwise."""
    module, trt = _import_parser()
    if trt is None:
        return None
    logger = collecting_logger(trt)  # keeps the parser's messages out of the user's terminal
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    parsed = bool(parser.parse_from_file(str(path)))
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        errors.append({"node": e.node_name(), "op": e.node_operator(), "message": e.desc().strip()})
    plugin_missing = [e for e in errors if _plugin_not_found(e)]
    return {"module": module, "version": trt.__version__, "parsed": parsed, "errors": errors,
            "plugin_not_loaded": len(plugin_missing), "other_errors": len(errors) - len(plugin_missing),
            "layers": network.num_layers if parsed else None}


def lint_onnx(path: str | os.PathLike, use_parser: bool = True) -> LintReport:
    """Static checks, then (``use_parser``) the TensorRT parser's errors as findings."""
    report = lint_static(path)
    if use_parser:
        report.parser = parse_with_tensorrt(str(path))
        if report.parser is None:
            report.add("info", "no-parser", "no TensorRT parser importable (pip install tensorrt-rtx-cu13 for one "
                       "that runs without a GPU); static checks only")
        else:
            p = report.parser
            if p["plugin_not_loaded"]:
                report.add("info", "plugin-not-loaded", f"the parser found no {contract.OP_TYPE} plugin for "
                           f"{p['plugin_not_loaded']} nodes (expected unless the plugin library is loaded)")
            for e in p["errors"]:
                if not _plugin_not_found(e):
                    report.add("error", "parser", e["message"].splitlines()[0][:300], e["node"] or None)
    return report
