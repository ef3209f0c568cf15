"""Quantizer arithmetic shared by the fake quantizers (training) and their deploy modules.

Grids, LSQ's gradient scale, straight-through rounding, and DLS's live scale and offset:
the deploy modules compute DLS in-graph with the very same functions, so the exported
statistics are the trained ones, operation for operation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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


def mse_step(rows: torch.Tensor, peak: torch.Tensor, grid: tuple[int, int], candidates: int = 100) -> torch.Tensor:
    """The step α per row of ``rows`` (channels, values) among ``candidates`` evenly spaced in
    0.2 … 1 × ``peak``/Qp that minimises ‖R(clamp(x/α, Qn, Qp))·α − x‖²; returns (channels,)."""
    qn, qp = grid
    cands = peak.to(rows)[None, :] * torch.linspace(0.2, 1.0, candidates, dtype=rows.dtype,
                                                     device=rows.device)[:, None] / qp    # (candidates, channels)
    errs = torch.stack([((torch.round(rows / c[:, None]).clamp(qn, qp) * c[:, None] - rows) ** 2).mean(1)
                        for c in cands])                                                   # (candidates, channels)
    return cands.gather(0, errs.argmin(0, keepdim=True)).reshape(-1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Forward: round half to even. Backward: identity (straight-through)."""
    return (torch.round(x) - x).detach() + x


#: DLS's eight learnable scalars, in the official order (α from weight1..4, β from weight21..24).
DLS_WEIGHTS = ("weight1", "weight2", "weight3", "weight4", "weight21", "weight22", "weight23", "weight24")
DLS_ALPHA_MIN = 1e-6


class DLSStatistics(NamedTuple):
    """Every intermediate of DLS's live scale and offset (the training kernel's backward reads them)."""

    x_min: torch.Tensor
    x_max: torch.Tensor
    mean_x: torch.Tensor
    std_x: torch.Tensor
    beta: torch.Tensor
    mean_b: torch.Tensor  # statistics of x + β
    std_b: torch.Tensor
    min_b: torch.Tensor
    max_b: torch.Tensor
    a_raw: torch.Tensor  # w1·|mean| + w2·std + w3·min + w4·max of x + β
    a1: torch.Tensor  # max(|a_raw|, DLS_ALPHA_MIN)
    cap: torch.Tensor  # (max(x) − min(x))/2^b
    alpha: torch.Tensor


def dls_statistics(x: torch.Tensor, w, bits: int, gs: float | None = None) -> DLSStatistics:
    """DLS's live statistics of ``x`` and the α, β they give; ``w`` maps DLS_WEIGHTS to scalars.

    The one definition of DLS's scale and offset: the training composition (with ``gs``, LSQ's
    gradient scale on α), the training kernel (``fused``, which writes the gradient out) and the
    deploy module (``--dls dynamic``, traced into the graph) all call it, so the exported in-graph
    statistics are the trained ones, operation for operation.
    """
    x_min, x_max = x.min(), x.max()
    mean_x = x.mean()
    beta = w["weight21"] * mean_x
    std_x = x.std()
    beta = beta + w["weight22"] * std_x + w["weight23"] * x_min + w["weight24"] * x_max
    xb = x + beta
    mean_b = xb.mean()
    a_raw = w["weight1"] * mean_b.abs()
    std_b = xb.std()
    a_raw = a_raw + w["weight2"] * std_b
    min_b = xb.min()
    a_raw = a_raw + w["weight3"] * min_b
    max_b = xb.max()
    a_raw = a_raw + w["weight4"] * max_b
    a = a_raw.abs()
    if gs is not None:
        a = grad_scale(a, gs)
    a1 = torch.clamp(a, min=DLS_ALPHA_MIN)
    cap = ((x_max - x_min) / 2 ** bits).detach()
    # a constant tensor (cap 0) would divide by zero (NaN in the official code); any α
    # reproduces it exactly through the final clamp, so take 1
    alpha = torch.where(cap > 0, torch.minimum(a1, cap), torch.ones_like(a1))
    return DLSStatistics(x_min, x_max, mean_x, std_x, beta, mean_b, std_b, min_b, max_b, a_raw, a1, cap, alpha)


def dls_scale_offset(x: torch.Tensor, w, bits: int, qp: int) -> tuple[torch.Tensor, ...]:
    """DLS's (α, β, min(x), max(x)) for the live tensor ``x``, α with LSQ's gradient scale."""
    s = dls_statistics(x, w, bits, step_grad_scale(x.numel(), qp))
    return s.alpha, s.beta, s.x_min, s.x_max


def dls_quantize(x: torch.Tensor, w, bits: int, grid: tuple[int, int]) -> torch.Tensor:
    """x̂ = clamp(R(clamp((x + β)/α, Qn, Qp))·α − β, min(x), max(x)) with DLS's live α, β."""
    qn, qp = grid
    alpha, beta, x_min, x_max = dls_scale_offset(x, w, bits, qp)
    out = round_ste(((x + beta) / alpha).clamp(qn, qp)) * alpha - beta
    return torch.minimum(torch.maximum(out, x_min), x_max)
