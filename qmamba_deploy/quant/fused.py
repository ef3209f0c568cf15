"""Training kernels for the fake quantizers: the same forward, the backward written out.

The quantizers' definitions are compositions of torch operators (``quantizers.py``, ``grid.py``):
straight-through rounding, clamps, LSQ's gradient scale, RFA's piecewise-linear surrogate. Under
autograd each of those operators records a node and keeps its inputs, so one quantizer call costs
10-30 small operator calls forward and as many backward — on a W4A4 Q-MambaIR step at 24 px
patches, 750 quantizer calls and more than half of the step's operator calls. The functions here
compute the **identical forward** (the same operators in the same order, so the values are
bit-for-bit those of the composition) as one autograd node each, and their backward computes the
gradients the composition defines in a few tensor passes (the same mathematics; the float
rounding of the gradients may differ from autograd's chain in the last bits).

On a CPU with a C compiler the passes themselves run compiled (``fake_quant_cpu.py``: each forward one
pass over the tensor, each backward one or two, the forward still bit-for-bit the composition); the
torch passes below are the fallback and the statement of what the compiled passes compute.

The reference composition stays the definition: it runs whenever no gradient is recorded (eval,
calibration, export), on GPUs, and under :func:`reference_autograd` (tests compare the two).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from . import fake_quant_cpu
from .grid import DLS_ALPHA_MIN, DLS_WEIGHTS, dls_statistics

_ENABLED = True


@contextlib.contextmanager
def reference_autograd() -> Iterator[None]:
    """Within this block the fake quantizers record their reference composition (for tests)."""
    global _ENABLED
    before, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = before


_COMPILED = True


@contextlib.contextmanager
def torch_passes() -> Iterator[None]:
    """Within this block the kernels run their torch passes even where the compiled ones are built
    (tests and benchmarks compare the two)."""
    global _COMPILED
    before, _COMPILED = _COMPILED, False
    try:
        yield
    finally:
        _COMPILED = before


def use_fused(*tensors: torch.Tensor | None) -> bool:
    """True when a gradient will be recorded through one of ``tensors`` (the first is the input),
    the kernels are on and the input is on the CPU. On a GPU the compositions run: the kernels'
    scalar bookkeeping (DLS's statistics as Python floats) would synchronise the device every call."""
    return (_ENABLED and torch.is_grad_enabled() and tensors[0].device.type == "cpu"
            and any(t is not None and t.requires_grad for t in tensors))


def _compiled(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """True when the compiled passes take ``x`` and the quantizer's ``params`` (all float32, on a CPU with
    the library built; anything else would promote in torch and must take the torch passes)."""
    return (_COMPILED and fake_quant_cpu.supports(x)
            and all(p is None or p.dtype == torch.float32 for p in params))


def _sign(v: float) -> float:
    return float((v > 0) - (v < 0))


def _reduce_to(t: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Sum ``t`` to the shape of a parameter ``like``: a scalar-like one, or one value per channel
    along ``axis`` of ``t``."""
    if axis is None or like.numel() == 1:
        return t.sum().reshape(like.shape)
    dims = [d for d in range(t.dim()) if d != axis]
    return t.sum(dims).reshape(like.shape)


class _LSQ(torch.autograd.Function):
    """x̂ = R(clamp((x + β)/α, Qn, Qp))·α − β, α's gradient scaled by ``gs`` (β optional)."""

    @staticmethod
    def forward(ctx, x, alpha, beta, qn, qp, gs, axis):
        xb = x + beta if beta is not None else x
        u = xb / alpha
        v = u.clamp(qn, qp)
        q = torch.round(v)
        out = q * alpha
        if beta is not None:
            out = out - beta
        inside = v == u                            # clamp passes the gradient: Qn <= u <= Qp
        # d/dα [R(clamp(xb/α))·α] = R(·) − [inside]·xb/α, kept per element for the backward
        ctx.save_for_backward(inside, torch.where(inside, q - u, q), alpha, beta)
        ctx.args = (gs, axis)
        return out

    @staticmethod
    def backward(ctx, g):
        inside, dalpha, alpha, beta = ctx.saved_tensors
        gs, axis = ctx.args
        gx = torch.where(inside, g, 0.0)
        galpha = _reduce_to(g * dalpha, alpha, axis) * gs
        gbeta = None
        if beta is not None and ctx.needs_input_grad[2]:
            gbeta = (gx.sum() - g.sum()).reshape(beta.shape)
        return gx, galpha, gbeta, None, None, None, None


class _LSQCompiled(torch.autograd.Function):
    """_LSQ on the compiled passes: the forward one pass, the backward one pass recomputing u from x."""

    @staticmethod
    def forward(ctx, x, alpha, beta, qn, qp, gs, axis):
        xc = x.detach().contiguous()
        ctx.save_for_backward(xc, alpha, beta)
        ctx.args = (qn, qp, gs, axis)
        return fake_quant_cpu.lsq_forward(xc, alpha, beta, qn, qp, axis)

    @staticmethod
    def backward(ctx, g):
        xc, alpha, beta = ctx.saved_tensors
        qn, qp, gs, axis = ctx.args
        gx, galpha, s_gx, s_g = fake_quant_cpu.lsq_backward(xc, g, alpha, beta, qn, qp, axis)
        galpha = (galpha * gs).to(alpha.dtype).reshape(alpha.shape)
        gbeta = None
        if beta is not None and ctx.needs_input_grad[2]:
            gbeta = torch.tensor([s_gx - s_g], dtype=beta.dtype).reshape(beta.shape)
        return gx, galpha, gbeta, None, None, None, None


def lsq_quantize(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor | None, qn: int, qp: int,
                 gs: float, axis: int | None) -> torch.Tensor:
    """LSQ / LSQ+ fake quantization as one autograd node; ``alpha`` already shaped to broadcast over
    ``x`` (per channel along ``axis``, or per tensor with ``axis`` None)."""
    node = _LSQCompiled if _compiled(x, alpha, beta) else _LSQ
    return node.apply(x, alpha, beta, float(qn), float(qp), gs, axis)


def _min_max_backward(g: torch.Tensor, out: torch.Tensor, bound: torch.Tensor, upper: bool):
    """torch.minimum(out, bound) (``upper``) or torch.maximum: (gradient to ``out``, to ``bound``
    per element); the chosen side takes it, half each at a tie."""
    beyond = out > bound if upper else out < bound
    to_bound = torch.where(beyond, g, torch.where(out == bound, g * 0.5, 0.0))
    return g - to_bound, to_bound


def _extreme_backward(t: torch.Tensor, value: torch.Tensor, grad: float) -> torch.Tensor | float:
    """Gradient of t.min() / t.max() (= ``value``) spread evenly over the elements that attain it."""
    if grad == 0.0:
        return 0.0
    hit = t == value
    return torch.where(hit, grad / hit.sum(), 0.0)


class _DLS(torch.autograd.Function):
    """DLS as one node: β and α from the live statistics of x (grid.dls_statistics, the function
    the composition calls) and x̂ = clamp(R(clamp((x + β)/α, Qn, Qp))·α − β, min x, max x);
    the backward carries the gradient through the statistics (mean, unbiased std, min, max of x
    and of x + β) analytically."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, w4, w21, w22, w23, w24, bits, qn, qp, gs):
        w = dict(zip(DLS_WEIGHTS, (w1, w2, w3, w4, w21, w22, w23, w24)))
        stats = dls_statistics(x, w, bits)  # the gradient scale is applied in backward
        alpha, beta = stats.alpha, stats.beta
        o0 = torch.round(((x + beta) / alpha).clamp(qn, qp)) * alpha - beta
        out = torch.minimum(torch.maximum(o0, stats.x_min), stats.x_max)
        ctx.save_for_backward(x, w1, w2, w3, w4, w21, w22, w23, w24)
        ctx.stats = stats
        ctx.args = (qn, qp, gs)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w1, w2, w3, w4, w21, w22, w23, w24 = ctx.saved_tensors
        x_min, x_max, mean_x, std_x, beta, mean_b, std_b, min_b, max_b, a_raw, a1, cap, alpha = ctx.stats
        qn, qp, gs = ctx.args
        n = x.numel()
        # the element-wise part
        xb = x + beta
        u = xb / alpha
        v = u.clamp(qn, qp)
        q = torch.round(v)
        o0 = q * alpha - beta
        g1, g_max = _min_max_backward(g, torch.maximum(o0, x_min), x_max, upper=True)
        g0, g_min = _min_max_backward(g1, o0, x_min, upper=False)
        inside = v == u
        gx = torch.where(inside, g0, 0.0)
        g_alpha = (g0 * q).sum() - (gx * u).sum()
        g_beta = gx.sum() - g0.sum()
        # α = where(cap > 0, min(clamp(|a_raw|, 1e-6), cap), 1), its gradient scaled by gs
        g_a1 = torch.where(cap > 0, torch.where(a1 < cap, g_alpha, torch.where(a1 == cap, g_alpha * 0.5, 0.0)), 0.0)
        g_raw = torch.where(a_raw.abs() >= DLS_ALPHA_MIN, g_a1, 0.0) * torch.sign(a_raw) * gs
        gw1, gw2, gw3, gw4 = g_raw * mean_b.abs(), g_raw * std_b, g_raw * min_b, g_raw * max_b
        # the statistics of x + β
        g_mean_b = float(g_raw * w1 * torch.sign(mean_b))
        g_std_b = float(g_raw * w2)
        g_xb = (_extreme_backward(xb, min_b, float(g_raw * w3))
                + _extreme_backward(xb, max_b, float(g_raw * w4)))
        k_b = g_std_b / ((n - 1) * float(std_b)) if g_std_b != 0.0 else 0.0
        g_xb = g_xb + (g_mean_b / n + k_b * (xb - mean_b) if k_b != 0.0 else g_mean_b / n)
        g_beta = g_beta + (g_xb.sum() if torch.is_tensor(g_xb) else g_xb * n)
        # β = w21·mean + w22·std + w23·min + w24·max of x
        gw21, gw22, gw23, gw24 = g_beta * mean_x, g_beta * std_x, g_beta * x_min, g_beta * x_max
        g_std_x = float(g_beta * w22)
        k_x = g_std_x / ((n - 1) * float(std_x)) if g_std_x != 0.0 else 0.0
        gx = gx + g_xb + float(g_beta * w21) / n
        if k_x != 0.0:
            gx = gx + k_x * (x - mean_x)
        gx = gx + _extreme_backward(x, x_min, float(g_beta * w23 + g_min.sum()))
        gx = gx + _extreme_backward(x, x_max, float(g_beta * w24 + g_max.sum()))
        shape = w1.shape
        grads = [t.reshape(shape) for t in (gw1, gw2, gw3, gw4, gw21, gw22, gw23, gw24)]
        return (gx, *grads, None, None, None, None)


class _DLSCompiled(torch.autograd.Function):
    """_DLS with its element-wise passes compiled: the statistics by grid.dls_statistics as before (the
    one definition of α and β), the quantization one pass; the backward one pass for the element-wise
    gradient and its sums, the algebra of the statistics on Python floats, one pass adding their
    gradient to every element."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, w4, w21, w22, w23, w24, bits, qn, qp, gs):
        weights = (w1, w2, w3, w4, w21, w22, w23, w24)
        stats = dls_statistics(x, dict(zip(DLS_WEIGHTS, weights)), bits)
        values = torch.cat([t.detach().reshape(1) for t in (*stats, *weights)]).tolist()
        st = dict(zip(stats._fields, values))
        st["w"] = values[len(stats):]
        xc = x.detach().contiguous()
        ctx.save_for_backward(xc)
        ctx.stats, ctx.args, ctx.shape, ctx.dtype = st, (qn, qp, gs), w1.shape, w1.dtype
        return fake_quant_cpu.dls_forward(xc, st["beta"], st["alpha"], qn, qp, st["x_min"], st["x_max"])

    @staticmethod
    def backward(ctx, g):
        (xc,) = ctx.saved_tensors
        st, (qn, qp, gs) = ctx.stats, ctx.args
        w1, w2, w3, w4, w21, w22, w23, w24 = st["w"]
        n = xc.numel()
        gx, s = fake_quant_cpu.dls_backward1(xc, g, st["beta"], st["alpha"], qn, qp, st["x_min"], st["x_max"],
                                             st["min_b"], st["max_b"], st["mean_b"])
        g_alpha = s["g0_q"] - s["gx_u"]
        g_beta = s["gx"] - s["g0"]
        # α = where(cap > 0, min(clamp(|a_raw|, 1e-6), cap), 1), its gradient scaled by gs
        a1, cap, a_raw = st["a1"], st["cap"], st["a_raw"]
        g_a1 = (g_alpha if a1 < cap else g_alpha * 0.5 if a1 == cap else 0.0) if cap > 0 else 0.0
        g_raw = (g_a1 if abs(a_raw) >= DLS_ALPHA_MIN else 0.0) * _sign(a_raw) * gs
        gw = [g_raw * abs(st["mean_b"]), g_raw * st["std_b"], g_raw * st["min_b"], g_raw * st["max_b"]]
        # the statistics of x + β: mean, unbiased std, min, max
        g_mean_b, g_std_b = g_raw * w1 * _sign(st["mean_b"]), g_raw * w2
        k_b = g_std_b / ((n - 1) * st["std_b"]) if g_std_b != 0.0 and st["std_b"] != 0.0 else 0.0
        g_beta += g_raw * w3 + g_raw * w4 + g_mean_b + k_b * s["dev_b"]
        # β = w21·mean + w22·std + w23·min + w24·max of x
        gw += [g_beta * st["mean_x"], g_beta * st["std_x"], g_beta * st["x_min"], g_beta * st["x_max"]]
        g_std_x = g_beta * w22
        k_x = g_std_x / ((n - 1) * st["std_x"]) if g_std_x != 0.0 and st["std_x"] != 0.0 else 0.0
        coef = [g_raw * w3 / max(s["n_min_b"], 1.0), g_raw * w4 / max(s["n_max_b"], 1.0), k_b,
                (g_mean_b + g_beta * w21) / n, k_x, (g_beta * w23 + s["to_min"]) / max(s["n_min_x"], 1.0),
                (g_beta * w24 + s["to_max"]) / max(s["n_max_x"], 1.0)]
        gx = fake_quant_cpu.dls_backward2(xc, gx, st["beta"], st["mean_b"], st["min_b"], st["max_b"], st["mean_x"],
                                          st["x_min"], st["x_max"], coef)
        grads = torch.tensor(gw, dtype=ctx.dtype).reshape(8, *ctx.shape).unbind(0)
        return (gx.view(g.shape), *grads, None, None, None, None)


def dls_quantize(x: torch.Tensor, weights, bits: int, qn: int, qp: int, gs: float) -> torch.Tensor:
    """DLS fake quantization as one autograd node (``weights``: the eight scalars, DLS_WEIGHTS order)."""
    weights = tuple(weights)
    node = _DLSCompiled if _compiled(x, *weights) else _DLS
    return node.apply(x, *weights, bits, float(qn), float(qp), gs)


class _RFA(torch.autograd.Function):
    """RFA: ŵ = level(v)·α − β with v = clamp((w + β)/α, Qn, Qp); the level by the anchors'
    thresholds (``hard``), the gradient through the piecewise-linear surrogate whose cell
    ``cells`` gives (slope ``outer`` below the first and above the last anchor)."""

    @staticmethod
    def forward(ctx, x, alpha, beta, a, hard, cells, qn, qp, gs, axis, outer):
        u = (x + beta) / alpha
        v = u.clamp(qn, qp)
        level = hard(v)
        out = level * alpha - beta
        ctx.save_for_backward(u, v, level, alpha, a)
        ctx.args = (cells, gs, axis, outer)
        return out

    @staticmethod
    def backward(ctx, g):
        u, v, level, alpha, a = ctx.saved_tensors
        cells, gs, axis, outer = ctx.args
        n = a.numel()
        k = (cells(v) + 1).reshape(-1)            # 0: below a[0]; i + 1: between a[i] and a[i+1]; n: above
        gl = g * alpha                            # the level's gradient, taken by the surrogate
        glf = gl.reshape(-1)
        s0 = torch.bincount(k, weights=glf, minlength=n + 1)
        s1 = torch.bincount(k, weights=glf * v.reshape(-1), minlength=n + 1)
        den = a[1:] - a[:-1]
        slope = torch.cat([a.new_full((1,), outer), 1.0 / den, a.new_full((1,), outer)])
        gv = gl * slope[k].reshape(gl.shape)
        # the anchors: Σ gl·(v − a[i+1])/den², Σ gl·(a[i] − v)/den² over cell i; ∓outer·Σ gl outside
        d2 = den * den
        inner0, inner1 = s0[1:n], s1[1:n]
        ga = torch.zeros_like(a)
        ga[:-1] += (inner1 - a[1:] * inner0) / d2
        ga[1:] += (a[:-1] * inner0 - inner1) / d2
        ga[0] -= outer * s0[0]
        ga[-1] -= outer * s0[n]
        gx = torch.where(v == u, gv, 0.0) / alpha
        # d/dα [level·α] = level; through u = xb/α: −gx·u
        galpha = _reduce_to(g * level - gx * u, alpha, axis) * gs
        gbeta = (gx.sum() - g.sum()).reshape(1)
        return gx, galpha, gbeta, ga, None, None, None, None, None, None, None


class _RFACompiled(torch.autograd.Function):
    """_RFA on the compiled passes: the level by the anchors' midpoints (``thresholds``), the backward's
    surrogate, per-cell sums and the anchors' gradient in one pass."""

    @staticmethod
    def forward(ctx, x, alpha, beta, a, thresholds, qn, qp, gs, axis, outer):
        xc, thr = x.detach().contiguous(), thresholds.detach()
        ctx.save_for_backward(xc, alpha, beta, a, thr)
        ctx.args = (qn, qp, gs, axis, outer)
        return fake_quant_cpu.rfa_forward(xc, alpha, float(beta), thr, a.numel() // 2, qn, qp, axis)

    @staticmethod
    def backward(ctx, g):
        xc, alpha, beta, a, thr = ctx.saved_tensors
        qn, qp, gs, axis, outer = ctx.args
        gx, galpha, ga, s_gx, s_g = fake_quant_cpu.rfa_backward(xc, g, alpha, float(beta), thr, a, a.numel() // 2,
                                                                qn, qp, outer, axis)
        galpha = (galpha * gs).to(alpha.dtype).reshape(alpha.shape)
        gbeta = torch.tensor([s_gx - s_g], dtype=beta.dtype).reshape(beta.shape)
        return gx, galpha, gbeta, ga.to(a.dtype), None, None, None, None, None, None


def rfa_quantize(x, alpha, beta, a, hard, cells, thresholds: Callable[[], torch.Tensor], qn: int, qp: int,
                 gs: float, axis: int | None, outer: float) -> torch.Tensor:
    """RFA fake quantization as one autograd node (``alpha`` shaped to broadcast over ``x``; ``hard``,
    ``cells`` and ``thresholds`` the quantizer's own rules)."""
    if _compiled(x, alpha, beta, a) and a.numel() <= fake_quant_cpu.MAX_ANCHORS:
        return _RFACompiled.apply(x, alpha, beta, a, thresholds(), float(qn), float(qp), gs, axis, outer)
    return _RFA.apply(x, alpha, beta, a, hard, cells, float(qn), float(qp), gs, axis, outer)
