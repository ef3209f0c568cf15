"""The SelectiveScan operator in PyTorch: reference, fast CPU path, custom op.

Semantics (see ``shared/design/selective-scan-op.md`` and :mod:`.contract`)::

    dt       = softplus(delta + delta_bias)          (or delta + delta_bias)
    h[t, n]  = exp(dt[t] A[c, n]) h[t-1, n] + dt[t] B[b, k, n, t] u[b, c, t]
    y[b,c,t] = sum_n C[b, k, n, t] h[t, n] + D_skip[c] u[b, c, t]

with h[-1] = 0 and channel c in group k = c // (D // K).

Layout of this file, like mamba_ssm's split between ``selective_scan_ref`` and the
CUDA kernel:

* :func:`selective_scan_ref` -- the formula as a plain loop over time. Slow, obviously
  right; every other path is tested against it.
* :func:`selective_scan_chunked` -- the fast path in plain torch (CPU, or GPU without
  mamba_ssm). Time is cut into chunks; the recurrence runs over the positions of a
  chunk for all chunks at once, then the chunk states are carried across chunks.
  It only ever multiplies decay factors exp(dt A) <= 1 together, never divides by a
  cumulative product, so it cannot overflow where a log-space cumsum would.
* ``scan_cpu`` -- the forward as one compiled pass over time (a C kernel built at first use,
  ``csrc/scan_cpu.c``, and its gradient in the same blocks); the op's CPU float32 forward and
  backward run it where it could be built, else the chunked paths.
* :func:`selective_scan_backward` -- the hand-written gradient (states recomputed by a
  chunked linear scan, then the adjoint scan run backwards in time).
* ``torch.ops.qmamba.selective_scan`` -- the custom op (fake kernel + autograd) and
  :func:`selective_scan`, the public wrapper the models call. The ONNX exporter maps
  each call of the op to one ``QMambaSelectiveScan`` node (``export/scan_onnx.py``).

Everything is computed in float32 (float64 when an input is float64, for gradcheck);
the output has u's dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import contract, scan_cpu

__all__ = [
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_chunked",
    "selective_scan_backward",
    "default_chunk",
    "chunked_linear_scan",
    "check_inputs",
    "SCAN_OP",
    "selective_scan_portable",
    "scan_backend",
    "SCAN_BACKENDS",
]

# Up to this length the plain loop beats the chunked path (measured at D=384, N=16 on a
# 2-core CPU: L=4 loop 0.14 ms vs chunked 0.17 ms, L=8 loop 0.27 ms vs chunked 0.23 ms).
_REF_MAX_LEN = 4

_BACKWARD_QUALNAME = f"{contract.TORCH_QUALNAME}_backward"


# --------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _step_input(delta: Tensor, delta_bias: Tensor | None, dtype) -> Tensor:
    """z = delta + bias in ``dtype`` (what softplus turns into the step size)."""
    z = delta.to(dtype)
    return z if delta_bias is None else z + delta_bias.to(dtype)[:, None]


def _softplus(z: Tensor, delta_softplus: bool) -> Tensor:
    """dt = softplus(z) with threshold 20 (as F.softplus), or z itself."""
    return F.softplus(z, beta=1.0, threshold=contract.SOFTPLUS_THRESHOLD) if delta_softplus else z


def _softplus_backward(g_dt: Tensor, z: Tensor, delta_softplus: bool) -> Tensor:
    """dLoss/dz from dLoss/d(dt): times sigmoid(z) (1 where z > the threshold); g_dt without softplus."""
    if not delta_softplus:
        return g_dt
    return g_dt * torch.where(z > contract.SOFTPLUS_THRESHOLD, torch.ones_like(z), torch.sigmoid(z))


def _step_size(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype) -> Tensor:
    """dt = softplus(delta + bias) with threshold 20 (as F.softplus), in ``dtype``."""
    return _softplus(_step_input(delta, delta_bias, dtype), delta_softplus)


def _shape_error(name: str, got: tuple, expected: str) -> ValueError:
    return ValueError(f"selective_scan: {name} has shape {tuple(got)}, expected {expected}.")


def check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Tensor | None = None, delta_bias: Tensor | None = None) -> None:
    """Raise ValueError (one sentence naming the tensor) unless the shapes fit the contract."""
    if u.dim() != 3:
        raise _shape_error("u", u.shape, "[B, D, L]")
    bsz, dim, length = u.shape
    if not u.is_floating_point():
        raise ValueError(f"selective_scan: u has dtype {u.dtype}, expected a floating point dtype.")
    if tuple(delta.shape) != (bsz, dim, length):
        raise _shape_error("delta", delta.shape, f"[B, D, L] = {[bsz, dim, length]} like u")
    if A.dim() != 2 or A.shape[0] != dim:
        raise _shape_error("A", A.shape, f"[D, N] with D = {dim}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if (t.dim() != 4 or t.shape[0] != bsz or t.shape[2] != n or t.shape[3] != length
                or t.shape[1] < 1 or dim % t.shape[1] != 0):
            raise _shape_error(name, t.shape, f"[B, K, N, L] = [{bsz}, K, {n}, {length}] with D = {dim} "
                                              "divisible by K")
    if B.shape[1] != C.shape[1]:
        raise _shape_error("C", C.shape, f"the same number of groups K = {B.shape[1]} as B")
    for name, t in (("D_skip", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise _shape_error(name, t.shape, f"[D] = [{dim}]")


def default_chunk(length: int) -> int:
    """Chunk length of the chunked scan: about sqrt(L/2).

    The chunked forward does ~2T python steps over [B, D, L/T, N] tensors plus L/T carry
    steps over [B, D, N]; 2T + L/T is smallest at T = sqrt(L/2). Measured on a 2-core
    CPU (tools/bench_scan.py) the optimum is flat between sqrt(L/4) and sqrt(L).
    """
    return max(1, int(round(math.sqrt(length / 2))))


# --------------------------------------------------------------------------------------
# reference: the formula, one time step at a time
# --------------------------------------------------------------------------------------


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = True) -> Tensor:
    """Sequential reference: u, delta [B, D, L]; A [D, N]; B, C [B, K, N, L]; D, delta_bias [D].

    Returns y [B, D, L] in u's dtype. Differentiable by autograd (used to test the
    hand-written backward), but slow: one python step per time step.
    """
    check_inputs(u, delta, A, B, C, D, delta_bias)
    dtype = _compute_dtype(u, delta, A, B, C)
    bsz, dim, length = u.shape
    k = B.shape[1]
    dt = _step_size(delta, delta_bias, delta_softplus, dtype)          # [B, D, L]
    uf = u.to(dtype)
    # groups -> channels: [B, K, N, L] -> [B, D, N, L]
    Bc = B.to(dtype).repeat_interleave(dim // k, dim=1)
    Cc = C.to(dtype).repeat_interleave(dim // k, dim=1)
    Af = A.to(dtype)

    h = uf.new_zeros(bsz, dim, A.shape[1])                              # [B, D, N]
    ys = []
    for t in range(length):
        dt_t = dt[:, :, t, None]                                        # [B, D, 1]
        h = torch.exp(dt_t * Af) * h + dt_t * Bc[..., t] * uf[:, :, t, None]
        ys.append((h * Cc[..., t]).sum(-1))                             # [B, D]
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(bsz, dim, 0)
    if D is not None:
        y = y + D.to(dtype)[:, None] * uf
    return y.to(u.dtype)


class _ChunkLayout:
    """Time-major chunk layout shared by the chunked forward and backward.

    L is cut into ``nc`` chunks of ``T`` steps (tail padded with zeros: dt = 0 gives
    decay 1 and input 0, so padding steps pass the state through unchanged).
    Per-channel sequences [B, D, L] become [T, B, K, nc, Dk, 1]; per-group sequences
    [B, K, N, L] become [T, B, K, nc, 1, N]; states are [T?, B, K, nc, Dk, N]. Each time
    step t is then one contiguous slice covering every chunk.
    """

    def __init__(self, bsz: int, k: int, dk: int, n: int, length: int, chunk: int | None):
        self.bsz, self.k, self.dk, self.n, self.length = bsz, k, dk, n, length
        T = int(chunk) if chunk else default_chunk(length)
        self.T = max(1, min(T, max(length, 1)))
        self.nc = -(-length // self.T)
        self.pad = self.nc * self.T - length

    def channel(self, x: Tensor) -> Tensor:        # [B, D, L] -> [T, B, K, nc, Dk, 1]
        x = F.pad(x, (0, self.pad)) if self.pad else x
        x = x.reshape(self.bsz, self.k, self.dk, self.nc, self.T)
        return x.permute(4, 0, 1, 3, 2).unsqueeze(-1).contiguous()

    def group(self, x: Tensor) -> Tensor:          # [B, K, N, L] -> [T, B, K, nc, 1, N]
        x = F.pad(x, (0, self.pad)) if self.pad else x
        x = x.reshape(self.bsz, self.k, self.n, self.nc, self.T)
        return x.permute(4, 0, 1, 3, 2).unsqueeze(-2).contiguous()

    def channel_back(self, x: Tensor) -> Tensor:   # [T, B, K, nc, Dk, 1] -> [B, D, L]
        x = x.squeeze(-1).permute(1, 2, 4, 3, 0)
        return x.reshape(self.bsz, self.k * self.dk, self.nc * self.T)[..., :self.length]

    def group_back(self, x: Tensor) -> Tensor:     # [T, B, K, nc, 1, N] -> [B, K, N, L]
        x = x.squeeze(-2).permute(1, 2, 4, 3, 0)
        return x.reshape(self.bsz, self.k, self.n, self.nc * self.T)[..., :self.length]

    @staticmethod
    def shift(x: Tensor, steps: int, fill: float) -> Tensor:
        """x at global time t + steps (steps = +1 or -1), ``fill`` beyond the ends.

        Time runs along dim 0 inside a chunk and along dim 3 (nc) across chunks.
        """
        out = torch.empty_like(x)
        if steps == 1:
            out[:-1] = x[1:]
            out[-1, :, :, :-1] = x[0, :, :, 1:]
            out[-1, :, :, -1] = fill
        else:
            out[1:] = x[:-1]
            out[0, :, :, 1:] = x[-1, :, :, :-1]
            out[0, :, :, 0] = fill
        return out


# --------------------------------------------------------------------------------------
# fast path: chunked scan, no [B, D, L, N] tensor in the forward
# --------------------------------------------------------------------------------------


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, delta_bias: Tensor | None = None,
                           delta_softplus: bool = True, chunk: int | None = None) -> Tensor:
    """Same contract as :func:`selective_scan_ref`, O(B·D·L + B·D·(L/T)·N) memory.

    L is cut into ``nc`` chunks of ``T`` steps (the tail padded with dt = 0 steps:
    decay 1, input 0, so the state passes through unchanged).

    1. Local scan: starting from h = 0 in every chunk, run the T steps for all chunks at
       once ([B, K, nc, Dk, N] state) and keep each chunk's end state.
    2. Carry: h_in[c+1] = P[c] h_in[c] + h_end[c], with P[c] = prod of the chunk's
       decays = exp(A * sum(dt over the chunk)) <= 1 -- a product, never a quotient.
    3. Final pass: rerun the T steps from the true initial states h_in, emitting y.
    """
    check_inputs(u, delta, A, B, C, D, delta_bias)
    dtype = _compute_dtype(u, delta, A, B, C)
    bsz, dim, length = u.shape
    k, n = B.shape[1], A.shape[1]
    dk = dim // k

    uf = u.to(dtype)
    dt = _step_size(delta, delta_bias, delta_softplus, dtype)
    lay = _ChunkLayout(bsz, k, dk, n, length, chunk)
    T, nc = lay.T, lay.nc
    # state h: [B, K, nc, Dk, N]; per-step scalars [T, B, K, nc, Dk, 1]; B_t, C_t [T, B, K, nc, 1, N]
    dt_s, du_s = lay.channel(dt), lay.channel(dt * uf)
    B_s, C_s = lay.group(B.to(dtype)), lay.group(C.to(dtype))
    A_s = A.to(dtype).view(k, 1, dk, n)                                 # broadcasts to [B, K, nc, Dk, N]

    def step(h: Tensor, t: int) -> Tensor:
        a = torch.mul(dt_s[t], A_s).exp_()                              # decay in (0, 1]
        return h.mul_(a).addcmul_(du_s[t], B_s[t])                      # h = a h + dt u B

    # 1. local scan from zero states
    h = uf.new_zeros(bsz, k, nc, dk, n)
    for t in range(T):
        step(h, t)
    h_end = h

    # 2. carry the states across chunks: g[c] = P[c] g[c-1] + h_end[c] is itself a linear
    #    recurrence over nc, solved by the same chunked scan (O(sqrt(nc)) small steps, not nc);
    #    chunk c starts from g[c-1]
    P = torch.exp(dt_s.sum(0) * A_s)                                    # [B, K, nc, Dk, N]
    g = chunked_linear_scan(P.reshape(bsz, k, nc, dk * n), h_end.reshape(bsz, k, nc, dk * n))
    h_in = torch.zeros_like(h_end)
    h_in[:, :, 1:] = g[:, :, :-1].reshape(bsz, k, nc - 1, dk, n)

    # 3. final pass from the true initial states, y on the fly
    h = h_in
    y_s = uf.new_empty(T, bsz, k, nc, dk, 1)
    for t in range(T):
        step(h, t)
        torch.matmul(h, C_s[t].transpose(-1, -2), out=y_s[t])           # sum_n h C -> [B, K, nc, Dk, 1]

    y = lay.channel_back(y_s)
    if D is not None:
        y = y + D.to(dtype)[:, None] * uf
    return y.to(u.dtype)


# --------------------------------------------------------------------------------------
# backward: recompute the states, run the adjoint scan backwards
# --------------------------------------------------------------------------------------


def _scan_time_major(a: Tensor, b: Tensor, chunk_dim: int, reverse: bool = False) -> Tensor:
    """In place on ``b``: all states of h_t = a_t h_{t-1} + b_t (h = 0 before the start).

    a, b: [T, ..., nc, ...] time-major chunks (dim 0 = step inside a chunk, ``chunk_dim``
    = chunk index), same shape. With ``reverse`` time runs backwards: h_t = a_t h_{t+1} + b_t.

    1. local scan inside every chunk from a zero state, all chunks at once, while
       accumulating each chunk's decay product P = prod a (values in (0, 1] for a decay);
    2. carry across chunks: h_in[next] = P[c] h_in[c] + h_local_end[c];
    3. fix-up: h_t += (prod of a from the chunk start to t) h_in, the product running.
    Only products of a are formed, never quotients, so nothing can overflow.
    """
    T = a.shape[0]
    nc = a.shape[chunk_dim]
    steps = list(range(T - 1, -1, -1) if reverse else range(T))
    P = a[steps[0]].clone()
    for prev, t in zip(steps[:-1], steps[1:]):                           # 1. local scan
        b[t].addcmul_(a[t], b[prev])
        P.mul_(a[t])
    cd = chunk_dim - 1                                                  # chunk dim of a step slice
    h_in = torch.zeros_like(b[0])
    chunks = list(range(nc - 1, -1, -1) if reverse else range(nc))
    last = b[steps[-1]]
    for prev, c in zip(chunks[:-1], chunks[1:]):                        # 2. carry
        h_in.select(cd, c).copy_(P.select(cd, prev) * h_in.select(cd, prev) + last.select(cd, prev))
    p = h_in
    for t in steps:                                                     # 3. fix-up
        p = a[t] * p
        b[t].add_(p)
    return b


def chunked_linear_scan(a: Tensor, b: Tensor, chunk: int | None = None, reverse: bool = False) -> Tensor:
    """All states of h_t = a_t h_{t-1} + b_t (h_{-1} = 0) along dim -2 of [..., L, X].

    With ``reverse`` the recurrence runs from the end: h_t = a_t h_{t+1} + b_t.
    Chunked like the forward (see :func:`_scan_time_major`): stable, O(T + L/T) python steps.
    """
    *lead, length, x = b.shape
    a = a.expand_as(b)
    T = int(chunk) if chunk else default_chunk(length)
    T = max(1, min(T, max(length, 1)))
    nc = -(-length // T)
    pad = nc * T - length
    if pad:
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad))
    # time-major inside the chunk: [T, ..., nc, X]
    a = a.reshape(*lead, nc, T, x).movedim(-2, 0).contiguous()
    b = b.reshape(*lead, nc, T, x).movedim(-2, 0).clone(memory_format=torch.contiguous_format)  # scanned in place
    h = _scan_time_major(a, b, chunk_dim=a.dim() - 2, reverse=reverse)
    return h.movedim(0, -2).reshape(*lead, nc * T, x)[..., :length, :]


def selective_scan_backward(gy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            D: Tensor, delta_bias: Tensor, delta_softplus: bool = True,
                            chunk: int | None = None) -> tuple[Tensor, ...]:
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias) of the scan, by hand.

    With a_t = exp(dt_t A), b_t = dt_t u_t B_t and the states h recomputed:

        g_h[t]  = C_t gy_t + a_{t+1} g_h[t+1]         (adjoint scan, backwards in time)
        q[t]    = g_h[t] h[t-1] a_t                    (= dLoss / d(dt_t A))
        s[t]    = sum_n g_h[t, n] B_t[n]
        du      = dt s + D gy
        ddt     = sum_n q A + u s
        dA      = sum_{b,t} q dt
        dB      = sum_{c in group} g_h dt u
        dC      = sum_{c in group} h gy
        dD      = sum_{b,t} gy u
        dz      = ddt sigmoid(z)   (1 where z > 20; dz = ddt without softplus)

    All [.., L, N] tensors live in the forward's time-major chunk layout
    [T, B, K, nc, Dk, N]; padding steps have dt = 0, gy = 0, so they add nothing.
    """
    dtype = _compute_dtype(u, delta, A, B, C, gy)
    bsz, dim, length = u.shape
    k, n = B.shape[1], A.shape[1]
    dk = dim // k
    lay = _ChunkLayout(bsz, k, dk, n, length, chunk)

    uf, gyf = u.to(dtype), gy.to(dtype)
    z = _step_input(delta, delta_bias, dtype)
    dt = _softplus(z, delta_softplus)

    dt_s, u_s, gy_s = lay.channel(dt), lay.channel(uf), lay.channel(gyf)   # [T, B, K, nc, Dk, 1]
    du_s = dt_s * u_s
    B_s, C_s = lay.group(B.to(dtype)), lay.group(C.to(dtype))              # [T, B, K, nc, 1, N]
    A_s = A.to(dtype).view(k, 1, dk, n)

    a = torch.exp(dt_s * A_s)                                           # [T, B, K, nc, Dk, N]
    h = _scan_time_major(a, du_s * B_s, chunk_dim=3)                    # states h_t
    g_h = _scan_time_major(lay.shift(a, +1, 1.0), C_s * gy_s, chunk_dim=3, reverse=True)
    q = lay.shift(h, -1, 0.0).mul_(a).mul_(g_h)                         # g_h h_{t-1} a_t
    del a

    s = torch.matmul(g_h, B_s.transpose(-1, -2))                        # [T, B, K, nc, Dk, 1]
    g_u = lay.channel_back(dt_s * s) + D.to(dtype)[:, None] * gyf
    g_dt = lay.channel_back((q * A_s).sum(-1, keepdim=True) + u_s * s)
    g_A = (q * dt_s).sum((0, 1, 3)).reshape(dim, n)
    g_B = lay.group_back(torch.matmul(du_s.transpose(-1, -2), g_h))     # sum over the group's channels
    g_C = lay.group_back(torch.matmul(gy_s.transpose(-1, -2), h))
    g_D = (gyf * uf).sum((0, 2))

    g_z = _softplus_backward(g_dt, z, delta_softplus)
    g_bias = g_z.sum((0, 2))

    return (g_u.contiguous().to(u.dtype), g_z.contiguous().to(delta.dtype), g_A.to(A.dtype),
            g_B.contiguous().to(B.dtype), g_C.contiguous().to(C.dtype), g_D.to(D.dtype),
            g_bias.to(delta_bias.dtype))


# --------------------------------------------------------------------------------------
# dispatch + torch custom op
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mamba_selective_scan_fn():
    """mamba_ssm's CUDA selective_scan_fn if installed (same math), else None."""
    try:  # optional: a CUDA extension that may not be installed
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return selective_scan_fn


def _forward_impl(u, delta, A, B, C, D_skip, delta_bias, delta_softplus: bool) -> Tensor:
    length = u.shape[-1]
    if u.is_cuda and u.dtype != torch.float64:
        fn = _mamba_selective_scan_fn()
        if fn is not None:
            y = fn(u.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(),
                   C.contiguous(), D_skip.float(), None, delta_bias.float(), delta_softplus)
            return y.to(u.dtype)
    if scan_cpu.supports(u, A):
        return scan_cpu.scan_forward(u, _step_size(delta, delta_bias, delta_softplus, torch.float32), A, B, C,
                                     D_skip)
    if length <= _REF_MAX_LEN:
        return selective_scan_ref(u, delta, A, B, C, D_skip, delta_bias, delta_softplus)
    return selective_scan_chunked(u, delta, A, B, C, D_skip, delta_bias, delta_softplus)


@torch.library.custom_op(contract.TORCH_QUALNAME, mutates_args=())
def _selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D_skip: Tensor,
                       delta_bias: Tensor, delta_softplus: bool) -> Tensor:
    check_inputs(u, delta, A, B, C, D_skip, delta_bias)
    return _forward_impl(u, delta, A, B, C, D_skip, delta_bias, delta_softplus)


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D_skip, delta_bias, delta_softplus):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


# The backward is its own custom op, so that it stays one opaque call under
# torch.compile / export, and its python loops are never traced.
@torch.library.custom_op(_BACKWARD_QUALNAME, mutates_args=())
def _selective_scan_backward_op(
    gy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D_skip: Tensor,
    delta_bias: Tensor, delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if scan_cpu.supports(u, A) and gy.dtype == torch.float32:
        z = _step_input(delta, delta_bias, torch.float32)
        g_u, g_dt, g_A, g_B, g_C, g_D = scan_cpu.scan_backward(gy, u, _softplus(z, delta_softplus), A, B, C, D_skip)
        g_z = _softplus_backward(g_dt, z, delta_softplus)
        return g_u, g_z.to(delta.dtype), g_A, g_B, g_C, g_D, g_z.sum((0, 2)).to(delta_bias.dtype)
    return selective_scan_backward(gy, u, delta, A, B, C, D_skip, delta_bias, delta_softplus)


@_selective_scan_backward_op.register_fake
def _(gy, u, delta, A, B, C, D_skip, delta_bias, delta_softplus):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (u, delta, A, B, C, D_skip, delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D_skip, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D_skip, delta_bias)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, gy):
    grads = _selective_scan_backward_op(gy, *ctx.saved_tensors, ctx.delta_softplus)
    return (*grads, None)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)

#: The registered op packet, ``torch.ops.qmamba.selective_scan`` (its ``.default``
#: overload is what the ONNX translation table maps).
SCAN_OP = getattr(getattr(torch.ops, contract.TORCH_NAMESPACE), contract.TORCH_OP_NAME)


# --------------------------------------------------------------------------------------
# portable path: standard ops only, for an ONNX graph without the custom node
# --------------------------------------------------------------------------------------

#: Steps per chunk of the portable scan (the chunks run side by side; the steps in one ONNX Scan).
PORTABLE_CHUNK = 16


def selective_scan_portable(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                            delta_bias: Tensor, delta_softplus: bool = True, chunk: int = PORTABLE_CHUNK) -> Tensor:
    """The chunked algorithm of :func:`selective_scan_chunked` in export-friendly torch.

    Same three steps, written for ``torch.export`` with a dynamic L, as two loops that the
    ONNX exporter turns into ONNX ``Scan`` nodes (``torch._higher_order_ops.scan``):

    1. the T steps of every chunk at once from zero states (a loop of T iterations over
       [B, K, Dk, nc, N] tensors), keeping each step's state; the decay products within a
       chunk are exp(A · cumsum(Δ)) over at most T steps (exponents ≤ 0 for Δ ≥ 0);
    2. the carry across the dynamic number of chunks;
    3. y from the true states, all steps at once.

    A few dozen nodes per scan whatever T is (unrolling the T steps in the graph made ~350
    nodes per scan and a 13k-node graph for MambaIRv2-light x4). Memory: four tensors of
    B·D·L·N floats (decays, inputs, states, decay products). Float32 throughout.
    """
    from torch._higher_order_ops.scan import scan  # torch's export-only HOP; private, loaded on use

    bsz, dim, length = u.shape
    k, n = B.shape[1], A.shape[1]
    dk, T = dim // k, int(chunk)
    uf, A32 = u.float(), A.float()
    z = delta.float() + delta_bias.float()[:, None]
    dt = F.softplus(z, beta=1.0, threshold=contract.SOFTPLUS_THRESHOLD) if delta_softplus else z
    pad = (T - length % T) % T

    def steps(x: Tensor, rows: int) -> Tensor:                         # [B, K*rows, L] -> [T, B, K, rows, nc]
        return F.pad(x, (0, pad)).reshape(bsz, k, rows, -1, T).permute(4, 0, 1, 2, 3)

    def state_steps(x: Tensor) -> Tensor:                              # [B, K, N, L] -> [T, B, K, 1, nc, N]
        return steps(x.float().reshape(bsz, k * n, length), n).transpose(-1, -2).unsqueeze(3)

    dt_s, du_s = steps(dt, dk), steps(dt * uf, dk)                     # [T, B, K, Dk, nc]
    A_k = A32.reshape(k, dk, 1, n)
    # every step's decay and input at once, [T, B, K, Dk, nc, N]; the loop body then has no
    # broadcasting (the exporter traces it with symbolic sizes and cannot broadcast a size-1 dim)
    a_s = torch.exp(dt_s.unsqueeze(-1) * A_k).contiguous()
    bu_s = (du_s.unsqueeze(-1) * state_steps(B)).contiguous()
    C_s = state_steps(C)

    # 1. local scan from zero states, every chunk at once; decay products by a cumulative sum
    def local(h: Tensor, xs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        a_t, bu_t = xs
        h = a_t * h + bu_t
        return h, h.clone()

    h_end, states = scan(local, bu_s.new_zeros(bu_s.shape[1:]), (a_s, bu_s))
    decays = torch.exp(torch.cumsum(dt_s, 0).unsqueeze(-1) * A_k)     # P_t = prod_{s<=t} a_s
    P_end = decays[-1]

    # 2. carry across chunks: h_in[c+1] = P[c] h_in[c] + h_end[c]
    def carry(h_prev: Tensor, xs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        p_end, h_last = xs
        return p_end * h_prev + h_last, h_prev.clone()

    _, h_in = scan(carry, torch.zeros_like(h_end[:, :, :, 0]), (P_end.movedim(3, 0), h_end.movedim(3, 0)))
    h_in = h_in.movedim(0, 3)

    # 3. y from the true states: local state + decay product x incoming state
    y = ((states + decays * h_in) * C_s).sum(-1)                       # [T, B, K, Dk, nc]
    y = y.permute(1, 2, 3, 4, 0).reshape(bsz, dim, -1)[..., :length]
    return (y + D.float()[:, None] * uf).to(u.dtype)


SCAN_BACKENDS = ("op", "portable")
_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("qmamba_scan_backend", default="op")


@contextlib.contextmanager
def scan_backend(name: str) -> Iterator[None]:
    """Inside the block, :func:`selective_scan` runs ``name``: ``op`` (the custom op, exported as
    one QMambaSelectiveScan node) or ``portable`` (standard ops only)."""
    if name not in SCAN_BACKENDS:
        raise ValueError(f"scan backend {name!r} is unknown; use {' or '.join(SCAN_BACKENDS)}")
    token = _BACKEND.set(name)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, delta_bias: Tensor | None = None,
                   delta_softplus: bool = True) -> Tensor:
    """The SelectiveScan op (``torch.ops.qmamba.selective_scan``), differentiable and exportable.

    u, delta [B, D, L]; A [D, N] (negative); B, C [B, K, N, L]; D, delta_bias [D] (zeros
    when None). Returns y [B, D, L] in u's dtype. Exported to ONNX as one
    ``QMambaSelectiveScan`` node (see :mod:`qmamba_deploy.export.scan_onnx`), or as
    standard ops inside ``scan_backend("portable")``.
    """
    check_inputs(u, delta, A, B, C, D, delta_bias)
    dim = u.shape[1]
    if D is None:
        D = torch.zeros(dim, dtype=torch.float32, device=u.device)
    if delta_bias is None:
        delta_bias = torch.zeros(dim, dtype=torch.float32, device=u.device)
    if _BACKEND.get() == "portable":
        return selective_scan_portable(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))
    return SCAN_OP(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))
