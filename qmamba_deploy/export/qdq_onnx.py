"""ONNX translations of the quantize/dequantize ops (``qmamba_deploy.ops.qdq``).

* ``qmamba::fake_quant(x, s, lo, hi, clip)`` -> [Clip(x, lo, hi)] -> QuantizeLinear(s, 0) ->
  DequantizeLinear(s, 0): symmetric int8, zero point an int8 0 initializer.
* ``qmamba::dequantize(q, s, axis)`` -> DequantizeLinear(q, s, 0, axis).

The scales, bounds and integer weights are buffers of the deploy model, so they reach
the graph as initializers: constant, as TensorRT requires.
"""

from __future__ import annotations

from collections.abc import Callable

from onnx import TensorProto, helper
from onnxscript import opset21 as op

from ..ops.qdq import DEQUANTIZE_OP, FAKE_QUANT_OP


def _zero_point(op, length: int | None = None):
    """An int8 zero point of 0: a scalar, or ``length`` zeros for a per-channel scale."""
    dims = [] if length is None else [length]
    return op.Constant(value=helper.make_tensor("zero_point", TensorProto.INT8, dims, [0] * (length or 1)))


def _translate_fake_quant(x, scale, lo, hi, clip: bool = True):
    zp = _zero_point(op)
    if clip:
        x = op.Clip(x, lo, hi)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)


def _translate_dequantize(q, scale, axis: int = 0):
    if len(scale.shape or ()) == 0:
        return op.DequantizeLinear(q, scale, _zero_point(op))
    return op.DequantizeLinear(q, scale, _zero_point(op, int(scale.shape[0])), axis=axis)


def qdq_translation_table() -> dict[Callable, Callable]:
    return {FAKE_QUANT_OP.default: _translate_fake_quant, DEQUANTIZE_OP.default: _translate_dequantize}
