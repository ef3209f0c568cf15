"""Quantizer arithmetic shared by the fake quantizers (training) and their deploy modules.

Grids, LSQ's gradient scale, straight-through rounding, and DLS's live scale and offset:
the deploy modules compute DLS in-graph with the very same functions, so the exported
statistics are the trained ones, operation for operation.
"""

from __future__ import annotations

import math

import torch

SIGN_EPS = 1e-5  # a tensor is "signed" when min(x) < -SIGN_EPS at initialisation


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) of a b-bit grid."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Forward: exactly x. Backward: gradient multiplied by g (LSQ's step-size gradient scale).

    Written as x + (x·g − x·g) so that the forward value is bit-identical to x (the
    usual (x − x·g).detach() + x·g can be one ulp off, which would make folded scales
    differ from the fake-quant ones).
    """
    xg = x * g
    return x.detach() + (xg - xg.detach())


def step_grad_scale(count: float, qp: int) -> float:
    """LSQ's gradient scale of a step size shared by ``count`` values on a grid up to Qp: 1/√(count·Qp)."""
    return 1.0 / math.sqrt(count * qp)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Forward: round half to even. Backward: identity (straight-through)."""
    return (torch.round(x) - x).detach() + x


#: DLS's eight learnable scalars, in the official order (α from weight1..4, β from weight21..24).
DLS_WEIGHTS = ("weight1", "weight2", "weight3", "weight4", "weight21", "weight22", "weight23", "weight24")
DLS_ALPHA_MIN = 1e-6


def dls_scale_offset(x: torch.Tensor, w, bits: int, qp: int) -> tuple[torch.Tensor, ...]:
    """DLS's (α, β, min(x), max(x)) for the live tensor ``x``; ``w`` maps DLS_WEIGHTS to scalars.

    Shared by the training quantizer and the deploy module (``--dls dynamic``), so
    that the exported in-graph statistics are the trained ones, operation for operation.
    """
    x_min, x_max = x.min(), x.max()
    beta = w["weight21"] * x.mean() + w["weight22"] * x.std() + w["weight23"] * x_min + w["weight24"] * x_max
    xb = x + beta
    alpha = (w["weight1"] * xb.mean().abs() + w["weight2"] * xb.std() + w["weight3"] * xb.min()
             + w["weight4"] * xb.max()).abs()
    alpha = grad_scale(alpha, step_grad_scale(x.numel(), qp))
    alpha = torch.clamp(alpha, min=DLS_ALPHA_MIN)
    cap = ((x_max - x_min) / 2 ** bits).detach()
    # a constant tensor (cap 0) would divide by zero (NaN in the official code); any α
    # reproduces it exactly through the final clamp, so take 1
    alpha = torch.where(cap > 0, torch.minimum(alpha, cap), torch.ones_like(alpha))
    return alpha, beta, x_min, x_max


def dls_quantize(x: torch.Tensor, w, bits: int, grid: tuple[int, int]) -> torch.Tensor:
    """x̂ = clamp(R(clamp((x + β)/α, Qn, Qp))·α − β, min(x), max(x)) with DLS's live α, β."""
    qn, qp = grid
    alpha, beta, x_min, x_max = dls_scale_offset(x, w, bits, qp)
    out = round_ste(((x + beta) / alpha).clamp(qn, qp)) * alpha - beta
    return torch.minimum(torch.maximum(out, x_min), x_max)
