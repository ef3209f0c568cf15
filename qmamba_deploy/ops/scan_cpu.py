"""The compiled CPU path of the selective scan's forward (``csrc/scan_cpu.c``).

The chunked torch path spends most of its time moving [B, D, L/T, N] slabs through memory, a few
element-wise passes per step; this kernel keeps each channel block's state in registers and makes one
pass over time (see the C file). It is a plain C shared library, built at first use with the system
compiler (``$CC``, else ``cc``) into a per-user cache and called through ctypes — no torch headers, no
build step at install, so the README's two set-up commands stay the whole set-up. ctypes releases the
GIL during the call, so the channel blocks are split among ``torch.get_num_threads()`` threads.

Where there is no compiler, the build fails, or ``QMAMBA_SCAN_CPU=torch`` is set, :func:`available` is
False and the op keeps its torch path; :func:`backend` says which one runs (benchmarks record it).
float32 only (float64, e.g. gradcheck, stays on the torch path). The backward (:func:`scan_backward`) runs
the forward again keeping the states, then the adjoint scan backwards in time, in the same blocks.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from . import native

__all__ = ["available", "backend", "supports", "scan_forward", "scan_backward", "MAX_STATE", "library_path",
           "load_library"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "scan_cpu.c"
MAX_STATE = 16  # the C file's MAX_STATE
# -ffp-contract=fast: fused multiply-adds (ISO C mode would forbid contracting a * b + c)
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c11", "-shared", "-fPIC")
_ENV = "QMAMBA_SCAN_CPU"


def library_path(compiler: str, flags: tuple[str, ...] = _FLAGS) -> Path:
    return native.library_path(SOURCE, compiler, flags)


def load_library(compiler: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The kernel built by ``compiler`` (with ``extra_flags`` after the usual ones: e.g. -mno-avx512f
    builds the 8-lane variant an AVX2 CPU gets), from the cache or built into it; raises OSError or
    SubprocessError when it cannot be built or loaded."""
    lib = native.load(SOURCE, compiler, (*_FLAGS, *extra_flags))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qmamba_scan_forward_f32.argtypes = [ptr] * 7 + [i64] * 7
    lib.qmamba_scan_forward_f32.restype = ctypes.c_int
    lib.qmamba_scan_backward_f32.argtypes = [ptr] * 14 + [i64] * 7
    lib.qmamba_scan_backward_f32.restype = ctypes.c_int
    lib.qmamba_scan_items.argtypes = [i64, i64, i64]
    lib.qmamba_scan_items.restype = i64
    lib.qmamba_scan_lanes.argtypes = []
    lib.qmamba_scan_lanes.restype = ctypes.c_int
    return lib


_LIBRARY = native.OptionalLibrary(SOURCE, _ENV, load_library)
_library = _LIBRARY.get
available = _LIBRARY.available
backend = _LIBRARY.backend  # 'compiled' or 'torch': what the op's CPU float32 forward runs


@functools.cache  # one pool per thread count a process uses (usually one)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qmamba-scan")


def supports(u: Tensor, A: Tensor) -> bool:
    return (available() and u.device.type == "cpu" and u.dtype == torch.float32 and A.dtype == torch.float32
            and 1 <= A.shape[1] <= MAX_STATE)


def _time_major(dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, D_skip: Tensor) -> list[Tensor]:
    """The backward kernel's operands, float32 and contiguous: dt, u [B, L, D]; A [D, N]; B, C [B, K, L, N];
    D [D] (the forward kernel reads the op's own layouts)."""
    return [dt.float().transpose(1, 2).contiguous(), u.float().transpose(1, 2).contiguous(), A.float().contiguous(),
            B.float().transpose(2, 3).contiguous(), C.float().transpose(2, 3).contiguous(),
            D_skip.float().contiguous()]


def _workers(items: int) -> int:
    return max(1, min(torch.get_num_threads(), items))


def _split(lib: ctypes.CDLL, kernel: str, items: int, per_worker, *args) -> None:
    """Run ``kernel`` over the ``items`` (batch x channel block), split among :func:`_workers` threads;
    ``per_worker(i)`` gives worker i's pointer arguments (its own scratch included)."""
    workers = _workers(items)
    bounds = [items * i // workers for i in range(workers + 1)]
    fn = getattr(lib, kernel)

    def run(i: int) -> int:
        return fn(*per_worker(i), *args, bounds[i], bounds[i + 1])

    codes = [run(0)] if workers == 1 else list(_pool(workers).map(run, range(workers)))
    if any(codes):
        raise RuntimeError(f"selective_scan: the compiled CPU kernel {kernel} refused its sizes "
                           f"(batch, D, K, L, N) = {args}")


def scan_forward(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D_skip: Tensor) -> Tensor:
    """y [B, D, L] (float32) of the op's forward on the compiled kernel, given the step sizes dt [B, D, L]
    (the op glue forms them; inputs checked by the caller; :func:`supports` true)."""
    lib = _library()
    bsz, dim, length = u.shape
    k, n = B.shape[1], A.shape[1]
    ops = [t.float().contiguous() for t in (dt, u, A, B, C, D_skip)]   # the op's own layouts, no transposes
    y = torch.empty_like(ops[1])
    pointers = [t.data_ptr() for t in (*ops, y)]
    _split(lib, "qmamba_scan_forward_f32", lib.qmamba_scan_items(bsz, dim, k), lambda i: pointers,
           bsz, dim, k, length, n)
    return y


def scan_backward(gy: Tensor, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  D_skip: Tensor) -> tuple[Tensor, ...]:
    """(du, d dt, dA, dB, dC, dD) on the compiled kernel: the forward again with every state kept (one
    [L, N, lanes] scratch per thread), then the adjoint backwards in time; per-block sums over a group's
    channels and the batch are added here. The op glue turns d dt into the delta and bias gradients."""
    lib = _library()
    bsz, dim, length = u.shape
    k, n = B.shape[1], A.shape[1]
    dk = dim // k
    ops = _time_major(dt, u, A, B, C, D_skip)
    gy_t = gy.float().transpose(1, 2).contiguous()
    items = lib.qmamba_scan_items(bsz, dim, k)
    blocks = items // (bsz * k)
    lanes = lib.qmamba_scan_lanes()  # channels per block: 16 where the build has AVX-512, else 8
    g_u, g_dt = torch.empty_like(gy_t), torch.empty_like(gy_t)
    g_A, g_D = u.new_empty(items, lanes, n, dtype=torch.float32), u.new_empty(items, lanes, dtype=torch.float32)
    g_B, g_C = (u.new_empty(items, length, n, dtype=torch.float32) for _ in range(2))
    scratch = [torch.empty(length, n, lanes) for _ in range(_workers(items))]
    pointers = [t.data_ptr() for t in (*ops, gy_t)]
    outs = [t.data_ptr() for t in (g_u, g_dt, g_A, g_B, g_C, g_D)]
    _split(lib, "qmamba_scan_backward_f32", items, lambda i: [*pointers, scratch[i].data_ptr(), *outs],
           bsz, dim, k, length, n)

    def per_channel(x: Tensor) -> Tensor:   # [items, lanes, ...] -> [B, D, ...]: a group's blocks, lanes cut at Dk
        x = x.reshape(bsz, k, blocks * lanes, *x.shape[2:])[:, :, :dk]
        return x.reshape(bsz, dim, *x.shape[3:])

    g_B = g_B.reshape(bsz, k, blocks, length, n).sum(2).transpose(2, 3)
    g_C = g_C.reshape(bsz, k, blocks, length, n).sum(2).transpose(2, 3)
    return (g_u.transpose(1, 2).contiguous().to(u.dtype), g_dt.transpose(1, 2).contiguous(),
            per_channel(g_A).sum(0).to(A.dtype), g_B.contiguous().to(B.dtype), g_C.contiguous().to(C.dtype),
            per_channel(g_D).sum(0).to(D_skip.dtype))
