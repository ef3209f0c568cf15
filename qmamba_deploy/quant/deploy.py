"""Deploy modules: what each fake quantizer becomes once folded (shared/design/quantization.md).

A deploy model is the float architecture with, at every quantized site, modules that
compute exactly what the exported ONNX computes — integer weights, constant scales,
zero points of 0 and explicit offsets:

* :class:`FoldedWeight` — a b-bit weight (b ≤ 8) as an int8 tensor q, a scale s and an
  optional constant offset c: ŵ = s·q + c. The offset (RFA's and LSQ+'s −β, the lower
  bound of SPR²Q's Q_{a,b}) never becomes a zero point: the layer adds c·Σx (a row sum
  for a MatMul, a box sum for a convolution) as a separate float term, exact.
* :class:`ActQuant` — a static activation quantizer:
  x̂ = DQ(Q(Clip(x + o, Qn·s, Qp·s))) − o with an int8 container. A b-bit grid narrower
  than int8 is the Clip; an unsigned 8-bit grid (0…255) is moved down by 128 steps,
  the shift going into the offset o.
* :class:`DLSAct` — DLS on an activation, in one of two deploy modes: ``dynamic`` (the
  statistics computed in-graph, exact, float arithmetic) or ``static`` (α, β frozen from
  calibration: an :class:`ActQuant`, real INT8).
* :class:`DeployLinear` / :class:`DeployConv2d` — the quantized layers, weights in the
  layout of the exported op (a Linear's weight is stored as the [in, out] MatMul operand).

Scan operands that are parameters (A, D, the Δ bias) are quantized once at fold time and
stored as constants; A is stored as A = −exp(A_log), precomputed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.qdq import INT8_MAX, INT8_MIN, dequantize, fake_quant
from .grid import DLS_WEIGHTS, dls_quantize, dls_scale_offset, qrange

DLS_MODES = ("static", "dynamic")


def act_grid(bits: int, signed: bool) -> tuple[int, int, int]:
    """(Qn, Qp, shift): the b-bit grid in an int8 container, ``shift`` steps below the trained one."""
    qn, qp = qrange(bits, signed)
    if qp <= INT8_MAX:
        return qn, qp, 0
    shift = 2 ** (bits - 1)  # unsigned 8-bit: 0..255 -> -128..127
    return qn - shift, qp - shift, shift


def _scalar(value: float = 0.0) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


class ActQuant(nn.Module):
    """Static activation quantizer: x̂ = DQ(Q(Clip(x + o, Qn·s, Qp·s), s), s) − o (int8 container)."""

    def __init__(self, bits: int, qmin: int, qmax: int, has_offset: bool):
        super().__init__()
        if not INT8_MIN <= qmin < qmax <= INT8_MAX:
            raise ValueError(f"activation grid [{qmin}, {qmax}] does not fit an int8 container")
        self.bits, self.qmin, self.qmax, self.has_offset = int(bits), int(qmin), int(qmax), bool(has_offset)
        for name in ("scale", "offset", "lo", "hi"):
            self.register_buffer(name, _scalar())

    @torch.no_grad()
    def set(self, scale: float | torch.Tensor, offset: float | torch.Tensor = 0.0) -> ActQuant:
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(())
        self.scale.copy_(scale)
        self.offset.copy_(torch.as_tensor(offset, dtype=torch.float32).reshape(()))
        self.lo.copy_(self.qmin * scale)
        self.hi.copy_(self.qmax * scale)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_offset:
            x = x + self.offset
        y = fake_quant(x, self.scale, self.lo, self.hi, clip=(self.qmin, self.qmax) != (INT8_MIN, INT8_MAX))
        return y - self.offset if self.has_offset else y

    def steps(self, x: torch.Tensor) -> torch.Tensor:
        """Where ``x`` lies on the grid, in steps, before rounding and clipping: (x + o)/s."""
        return (x + self.offset if self.has_offset else x) / self.scale

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The output for integer ``codes`` on the grid: s·q − o (what :meth:`forward` returns for them)."""
        y = codes.to(self.scale.dtype) * self.scale
        return y - self.offset if self.has_offset else y

    def spec(self) -> dict:
        return {"type": "static", "bits": self.bits, "qmin": self.qmin, "qmax": self.qmax,
                "offset": self.has_offset}

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid=[{self.qmin}, {self.qmax}], offset={self.has_offset}"


class DLSAct(nn.Module):
    """DLS on an activation: ``dynamic`` (in-graph statistics, exact) or ``static`` (calibrated α, β).

    The static quantizer (``self.static``) holds the α and β frozen by
    :func:`qmamba_deploy.fold.calibrate_dls`; with ``recording`` set, dynamic calls
    append their live (α, β) to it.
    """

    def __init__(self, bits: int, signed: bool, mode: str = "dynamic"):
        super().__init__()
        self.bits, self.signed = int(bits), bool(signed)
        self.grid = qrange(self.bits, self.signed)
        for name in DLS_WEIGHTS:
            self.register_buffer(name, torch.zeros(1))
        qmin, qmax, _ = act_grid(self.bits, self.signed)
        self.static = ActQuant(self.bits, qmin, qmax, has_offset=True)
        self.mode = mode
        self.recording: list[tuple[float, float]] | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in DLS_MODES:
            raise ValueError(f"DLS deploy mode {mode!r} is unknown; use static or dynamic")
        self._mode = mode

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in DLS_WEIGHTS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "static":
            return self.static(x)
        if self.recording is not None:
            alpha, beta, _, _ = dls_scale_offset(x, self.weights(), self.bits, self.grid[1])
            self.recording.append((float(alpha), float(beta)))
        return dls_quantize(x, self.weights(), self.bits, self.grid)

    def spec(self) -> dict:
        return {"type": "dls", "bits": self.bits, "signed": self.signed}

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, mode={self._mode}"


def act_from_spec(spec: dict | None) -> nn.Module:
    if spec is None:
        return nn.Identity()
    if spec["type"] == "static":
        return ActQuant(spec["bits"], spec["qmin"], spec["qmax"], spec["offset"])
    if spec["type"] == "dls":
        return DLSAct(spec["bits"], spec["signed"])
    raise ValueError(f"activation quantizer type {spec['type']!r} is unknown")


class FoldedWeight(nn.Module):
    """ŵ = s·q + c: int8 ``q`` (b-bit values), scale ``s`` (0-d, or 1-d along ``axis``), offset ``c``."""

    def __init__(self, shape: tuple[int, ...], bits: int, axis: int, per_channel: bool = False,
                 has_offset: bool = False):
        super().__init__()
        self.shape, self.bits, self.axis = tuple(int(s) for s in shape), int(bits), int(axis)
        self.per_channel, self.has_offset = bool(per_channel), bool(has_offset)
        self.register_buffer("q", torch.zeros(self.shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(self.shape[axis]) if per_channel else _scalar(1.0))
        self.register_buffer("offset", _scalar())

    def dequantized(self) -> torch.Tensor:
        """s·q (the offset is applied by the consumer, see :meth:`matmul`)."""
        return dequantize(self.q, self.scale, self.axis)

    def value(self) -> torch.Tensor:
        """The full float weight s·q + c (for checks; the graph never materialises it)."""
        w = self.dequantized()
        return w + self.offset if self.has_offset else w

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ ŵ for a weight stored as the right MatMul operand [..., in, out]."""
        y = torch.matmul(x, self.dequantized())
        if self.has_offset:
            y = y + self.offset * x.sum(dim=-1, keepdim=True)
        return y

    def spec(self) -> dict:
        return {"bits": self.bits, "shape": list(self.shape), "axis": self.axis, "per_channel": self.per_channel,
                "offset": self.has_offset}

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, bits={self.bits}, axis={self.axis}, per_channel={self.per_channel}, "
                f"offset={self.has_offset}")


def weight_from_spec(spec: dict) -> FoldedWeight:
    return FoldedWeight(tuple(spec["shape"]), spec["bits"], spec["axis"], spec.get("per_channel", False),
                        spec.get("offset", False))


class DeployLinear(nn.Module):
    """y = act(x) @ ŵ + bias, ŵ stored as the [in, out] MatMul operand."""

    def __init__(self, in_features: int, out_features: int, bias: bool, act: nn.Module, weight: FoldedWeight):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act, self.weight = act, weight
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight.matmul(self.act(x))
        return y + self.bias if self.bias is not None else y


class DeployConv2d(nn.Module):
    """y = conv(act(x), s·q) + bias (+ c·box-sum of act(x) when the weight has an offset)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                 bias: bool, act: nn.Module, weight: FoldedWeight):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.act, self.weight = act, weight
        self.bias = nn.Parameter(torch.zeros(out_channels), requires_grad=False) if bias else None

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias, groups: int) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        y = self._conv(x, self.weight.dequantized(), self.bias, self.groups)
        if self.weight.has_offset:
            # c · Σ over each output's receptive field (same for every output channel of a group)
            ones = torch.ones(self.groups, self.in_channels // self.groups, *self.kernel_size,
                              dtype=x.dtype, device=x.device)
            box = self._conv(x, ones, None, self.groups)
            if self.groups > 1 and self.groups != self.out_channels:
                box = box.repeat_interleave(self.out_channels // self.groups, dim=1)
            y = y + self.weight.offset * box
        return y


def set_dls_mode(model: nn.Module, mode: str) -> int:
    """Put every DLSAct of ``model`` in ``mode`` (static/dynamic); returns how many there are."""
    sites = [m for m in model.modules() if isinstance(m, DLSAct)]
    for m in sites:
        m.mode = mode
    return len(sites)
