"""The compiled CPU passes of the fake quantizers' training kernels (``csrc/fake_quant_cpu.c``).

quant/fused.py writes each quantizer's forward and backward as one autograd node of torch operators;
on the tensors of a QAT step (a few thousand to a hundred thousand values) those 10-40 operator calls
per quantizer cost more in dispatch and passes over memory than in arithmetic. The C file does each
forward in one pass and each backward in one (DLS: two) — the forward bit-for-bit the torch definition
(no fused multiply-adds, rounding half to even), the backward's sums by vector lanes in float over
chunks of values, then in double. The scalar algebra of
DLS's statistics stays in quant/fused.py; this module only moves tensors in and out of the passes.

Built at first use like the scan kernel (ops/native.py). Where there is no compiler, the build fails or
``QMAMBA_FAKE_QUANT_CPU=torch`` is set, :func:`available` is False and fused.py runs its torch passes.
float32 only.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch
from torch import Tensor

from ..ops import native

__all__ = ["available", "backend", "supports", "lsq_forward", "lsq_backward", "dls_forward", "dls_backward1",
           "dls_backward2", "rfa_forward", "rfa_backward", "load_library", "DLS_SUMS"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "fake_quant_cpu.c"
# -ffp-contract=off: no fused multiply-adds, so that every forward value is the torch composition's;
# -fopenmp-simd: the backward's sums as vector reductions (no OpenMP runtime); -fno-trapping-math lets
# the compiler evaluate both sides of a select (it changes no value)
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp-simd", "-std=c11", "-shared",
          "-fPIC")
_ENV = "QMAMBA_FAKE_QUANT_CPU"
MAX_ANCHORS = 256  # the C file's
#: the first DLS backward pass's sums, in the C file's order
DLS_SUMS = ("g0_q", "gx_u", "gx", "g0", "to_min", "to_max", "n_min_b", "n_max_b", "n_min_x", "n_max_x", "dev_b")


def load_library(compiler: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    lib = native.load(SOURCE, compiler, (*_FLAGS, *extra_flags))
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    signatures = {
        "qmamba_lsq_forward_f32": [ptr, ptr, f32, i32, f32, f32, i64, i64, i64, ptr],
        "qmamba_lsq_backward_f32": [ptr, ptr, ptr, f32, i32, f32, f32, i64, i64, i64, ptr, ptr, ptr],
        "qmamba_dls_forward_f32": [ptr, i64, f32, f32, f32, f32, f32, f32, ptr],
        "qmamba_dls_backward1_f32": [ptr, ptr, i64, *[f32] * 9, ptr, ptr],
        "qmamba_dls_backward2_f32": [ptr, i64, *[f32] * 7, ptr, ptr],
        "qmamba_rfa_forward_f32": [ptr, ptr, f32, ptr, i64, f32, f32, f32, i64, i64, i64, ptr],
        "qmamba_rfa_backward_f32": [ptr, ptr, ptr, f32, ptr, i64, ptr, i64, f32, f32, f32, f32, i64, i64, i64,
                                    ptr, ptr, ptr, ptr],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


_LIBRARY = native.OptionalLibrary(SOURCE, _ENV, load_library)
_library = _LIBRARY.get
available = _LIBRARY.available
backend = _LIBRARY.backend  # 'compiled' or 'torch': what the quantizers' CPU float32 training passes run


def supports(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


def _layout(x: Tensor, alpha: Tensor, axis: int | None) -> tuple[int, int, int]:
    """(outer, channels, inner) of ``x`` around ``axis`` (None: one channel), checked against the number
    of step sizes (the C loops index ``alpha`` by channel: a mismatch must not reach them)."""
    if axis is None:
        layout = (1, 1, x.numel())
    else:
        shape = x.shape
        layout = (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))
    if alpha.numel() != layout[1]:
        raise ValueError(f"fake quantizer: {alpha.numel()} step sizes for {layout[1]} channels of a "
                         f"{tuple(x.shape)} tensor (axis {axis})")
    return layout


def _flat(t: Tensor) -> Tensor:
    return t.detach().float().contiguous()


def _beta(beta: Tensor | None) -> tuple[float, int]:
    return (float(beta), 1) if beta is not None else (0.0, 0)


def lsq_forward(x: Tensor, alpha: Tensor, beta: Tensor | None, qn: float, qp: float, axis: int | None) -> Tensor:
    x, alpha = _flat(x), _flat(alpha)
    out = torch.empty_like(x)
    _library().qmamba_lsq_forward_f32(x.data_ptr(), alpha.data_ptr(), *_beta(beta), qn, qp,
                                      *_layout(x, alpha, axis), out.data_ptr())
    return out


def lsq_backward(x: Tensor, g: Tensor, alpha: Tensor, beta: Tensor | None, qn: float, qp: float,
                 axis: int | None) -> tuple[Tensor, Tensor, float, float]:
    """(gx, Σ g·dx̂/dα per channel (float64, unscaled), Σ gx, Σ g)."""
    x, g, alpha = _flat(x), _flat(g), _flat(alpha)
    layout = _layout(x, alpha, axis)
    gx = torch.empty_like(x)
    galpha = torch.empty(layout[1], dtype=torch.float64)
    sums = torch.empty(2, dtype=torch.float64)
    _library().qmamba_lsq_backward_f32(x.data_ptr(), g.data_ptr(), alpha.data_ptr(), *_beta(beta), qn, qp, *layout,
                                       gx.data_ptr(), galpha.data_ptr(), sums.data_ptr())
    s_gx, s_g = sums.tolist()
    return gx, galpha, s_gx, s_g


def dls_forward(x: Tensor, beta: float, alpha: float, qn: float, qp: float, lo: float, hi: float) -> Tensor:
    x = _flat(x)
    out = torch.empty_like(x)
    _library().qmamba_dls_forward_f32(x.data_ptr(), x.numel(), beta, alpha, qn, qp, lo, hi, out.data_ptr())
    return out


def dls_backward1(x: Tensor, g: Tensor, beta: float, alpha: float, qn: float, qp: float, x_min: float,
                  x_max: float, min_b: float, max_b: float, mean_b: float) -> tuple[Tensor, dict[str, float]]:
    """DLS's element-wise gradient (gx before the statistics' part) and the sums named in DLS_SUMS."""
    x, g = _flat(x), _flat(g)
    gx = torch.empty_like(x)
    sums = torch.empty(len(DLS_SUMS), dtype=torch.float64)
    _library().qmamba_dls_backward1_f32(x.data_ptr(), g.data_ptr(), x.numel(), beta, alpha, qn, qp, x_min, x_max,
                                        min_b, max_b, mean_b, gx.data_ptr(), sums.data_ptr())
    return gx, dict(zip(DLS_SUMS, sums.tolist()))


def dls_backward2(x: Tensor, gx: Tensor, beta: float, mean_b: float, min_b: float, max_b: float, mean_x: float,
                  x_min: float, x_max: float, coef: list[float]) -> Tensor:
    """gx (in place) plus the gradient through the statistics, from the seven coefficients the C file names."""
    x = _flat(x)
    c = torch.tensor(coef, dtype=torch.float32)
    _library().qmamba_dls_backward2_f32(x.data_ptr(), x.numel(), beta, mean_b, min_b, max_b, mean_x, x_min, x_max,
                                        c.data_ptr(), gx.data_ptr())
    return gx


def rfa_forward(x: Tensor, alpha: Tensor, beta: float, thresholds: Tensor, half: int, qn: float, qp: float,
                axis: int | None) -> Tensor:
    x, alpha, thr = _flat(x), _flat(alpha), _flat(thresholds)
    out = torch.empty_like(x)
    _library().qmamba_rfa_forward_f32(x.data_ptr(), alpha.data_ptr(), beta, thr.data_ptr(), thr.numel(),
                                      float(half), qn, qp, *_layout(x, alpha, axis), out.data_ptr())
    return out


def rfa_backward(x: Tensor, g: Tensor, alpha: Tensor, beta: float, thresholds: Tensor, anchors: Tensor, half: int,
                 qn: float, qp: float, outer: float, axis: int | None) -> tuple[Tensor, Tensor, Tensor, float, float]:
    """(gx, Σ g·level − gx·u per channel (float64, unscaled), the anchors' gradient, Σ gx, Σ g)."""
    x, g, alpha = _flat(x), _flat(g), _flat(alpha)
    thr, a = _flat(thresholds), _flat(anchors)
    if a.numel() > MAX_ANCHORS:
        raise ValueError(f"RFA: {a.numel()} anchors, the compiled kernel takes at most {MAX_ANCHORS} (8 bits)")
    layout = _layout(x, alpha, axis)
    gx, ga = torch.empty_like(x), torch.empty_like(a)
    galpha = torch.empty(layout[1], dtype=torch.float64)
    sums = torch.empty(2, dtype=torch.float64)
    code = _library().qmamba_rfa_backward_f32(
        x.data_ptr(), g.data_ptr(), alpha.data_ptr(), beta, thr.data_ptr(), thr.numel(), a.data_ptr(), a.numel(),
        float(half), qn, qp, outer, *layout, gx.data_ptr(), galpha.data_ptr(), ga.data_ptr(), sums.data_ptr())
    if code:
        raise RuntimeError(f"RFA: the compiled kernel refused {a.numel()} anchors")
    s_gx, s_g = sums.tolist()
    return gx, galpha, ga, s_gx, s_g
