"""ONNX mapping of the SelectiveScan op: one ``QMambaSelectiveScan`` node per call.

Export (``torch.onnx.export(..., dynamo=True)``): ``custom_translation_table()`` maps
``torch.ops.qmamba.selective_scan.default`` to an onnxscript function that emits a
single node of op_type ``contract.OP_TYPE`` in domain ``contract.DOMAIN`` with the
attributes of ``contract.node_attributes``. :func:`finalize_scan_model` fixes the opset / IR
version of an exported model and strips any embedded function of that name (TensorRT would
inline it instead of calling the plugin). ``export/onnx_export.py`` is the one export path.

Running the node in ONNX Runtime (a Python custom op) is ``runtime/ort.py``'s business.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import onnx
from onnxscript.values import Op, Opset

from ..ops import contract
from ..ops.selective_scan import SCAN_OP
from .graph import scan_nodes, set_opset

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_IR_VERSION",
    "scan_op_schema",
    "custom_translation_table",
    "finalize_scan_model",
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

    scan = Op(Opset(contract.DOMAIN, contract.DOMAIN_VERSION), contract.OP_TYPE, scan_op_schema())
    return scan(u, delta, A, B, C, D_skip, delta_bias, **contract.node_attributes(delta_softplus))


def custom_translation_table() -> dict[Callable, Callable]:
    """The ``custom_translation_table`` argument of ``torch.onnx.export(dynamo=True)``."""
    return {SCAN_OP.default: _translate_selective_scan}


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
