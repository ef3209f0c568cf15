"""Quantize/dequantize as torch custom ops that export to ONNX QuantizeLinear / DequantizeLinear.

Two ops, each computing in eager PyTorch exactly what its ONNX nodes compute, so a
deploy model (``qmamba_deploy.quant.deploy``) gives the same numbers in torch as its
exported graph does in a runtime:

* ``qmamba::dequantize(q, scale, axis)`` — an integer weight (int8 container) times its
  scale: ``DequantizeLinear(q, scale, 0, axis)``. ``scale`` is 0-d (per tensor) or 1-d
  along ``axis`` (per channel).
* ``qmamba::fake_quant(x, scale, lo, hi)`` — an activation through a symmetric int8 grid:
  ``Clip(x, lo, hi) → QuantizeLinear(scale, 0) → DequantizeLinear(scale, 0)``.
  ``lo = Qn·scale`` and ``hi = Qp·scale`` carry a grid narrower than int8 (b < 8 bits);
  the Clip is left out of the graph when the grid is the full int8 one.

Zero points are always 0 (TensorRT's explicit quantization is symmetric); offsets are
explicit Adds around these ops, written by the deploy modules.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import contract

INT8_MIN, INT8_MAX = -128, 127

__all__ = ["dequantize", "fake_quant", "DEQUANTIZE_OP", "FAKE_QUANT_OP", "INT8_MIN", "INT8_MAX"]


def _broadcast_scale(scale: Tensor, ndim: int, axis: int) -> Tensor:
    if scale.dim() == 0:
        return scale
    shape = [1] * ndim
    shape[axis % ndim] = scale.numel()
    return scale.reshape(shape)


@torch.library.custom_op(f"{contract.TORCH_NAMESPACE}::dequantize", mutates_args=())
def _dequantize(q: Tensor, scale: Tensor, axis: int) -> Tensor:
    return q.to(scale.dtype) * _broadcast_scale(scale, q.dim(), axis)


@_dequantize.register_fake
def _(q, scale, axis):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


@torch.library.custom_op(f"{contract.TORCH_NAMESPACE}::fake_quant", mutates_args=())
def _fake_quant(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, clip: bool) -> Tensor:
    clipped = torch.minimum(torch.maximum(x, lo.to(x.dtype)), hi.to(x.dtype))
    q = torch.round(clipped / scale.to(x.dtype)).clamp(INT8_MIN, INT8_MAX)
    return q * scale.to(x.dtype)


@_fake_quant.register_fake
def _(x, scale, lo, hi, clip):
    return torch.empty_like(x)


def _fake_quant_backward(ctx, grad):  # straight-through inside [lo, hi] (deploy models are not trained;
    x, lo, hi = ctx.saved_tensors      # this keeps them differentiable for sensitivity analysis)
    inside = (x >= lo) & (x <= hi)
    return grad * inside, None, None, None, None


def _fake_quant_setup(ctx, inputs, output):
    x, _, lo, hi, _ = inputs
    ctx.save_for_backward(x, lo, hi)


_fake_quant.register_autograd(_fake_quant_backward, setup_context=_fake_quant_setup)

DEQUANTIZE_OP = torch.ops.qmamba.dequantize
FAKE_QUANT_OP = torch.ops.qmamba.fake_quant


def dequantize(q: Tensor, scale: Tensor, axis: int = 0) -> Tensor:
    """``q`` (int8) · ``scale`` (0-d, or 1-d along ``axis``) in the scale's dtype (float32 in a graph)."""
    if q.dtype != torch.int8:
        raise TypeError(f"dequantize: expected an int8 tensor, got {q.dtype}")
    return DEQUANTIZE_OP(q, scale, int(axis))


def fake_quant(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, clip: bool = True) -> Tensor:
    """Clip to [lo, hi], round to the int8 grid of ``scale`` (half to even), back to float.

    ``clip=False`` says the grid is the full int8 one, so that the exported graph can
    leave the Clip out (QuantizeLinear saturates to the same range).
    """
    return FAKE_QUANT_OP(x, scale, lo, hi, bool(clip))
