"""Fake quantizers: LSQ, LSQ+, DLS, RFA and PTQ observers (semantics: shared/design/quantization.md).

Every quantizer is a module ``x -> x̂`` that keeps its whole state in the
state_dict: its parameters (α, β, anchors, DLS weights) and two float32
buffers, ``init_state`` (1.0 once lazily initialised) and ``signed`` (1.0:
grid −2^(b−1) … 2^(b−1)−1; 0.0: grid 0 … 2^b−1). Bit widths are plain
attributes, recorded in the qconfig of every manifest.

Initialisation is lazy, as in Q-MambaIR: the first forward **in training
mode** sets signedness and scale from the live tensor. Calibration therefore
runs quantizers in training mode (see :func:`qmamba_deploy.quant.calibrating`).
Rounding is round-half-to-even (``torch.round``), as ONNX QuantizeLinear and
TensorRT do.

The buffer and parameter names follow the official Q-MambaIR layout
(``Act_Quant`` = :class:`LSQ` with an offset, ``oneRK_U`` = :class:`RFA`,
``DDA_Quant`` = :class:`DLS`), so its checkpoints load strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import CheckpointError
from . import fused
from .deploy import ActQuant, DLSAct, act_grid
from .grid import (
    DLS_ALPHA_MIN,
    DLS_WEIGHTS,
    SIGN_EPS,
    dls_quantize,
    dls_scale_offset,
    grad_scale,
    mse_step,
    qrange,
    round_ste,
    step_grad_scale,
)


@dataclass(frozen=True)
class WeightCodes:
    """A quantized weight as deployed: ŵ = scale·q + offset, q int8 on the signed b-bit grid, in the
    layout of the weight given (``axis``: its output-channel axis, where a per-channel scale runs)."""

    q: torch.Tensor
    scale: torch.Tensor   # float32: a scalar, or one per output channel (per-channel weights)
    offset: torch.Tensor  # float32 scalar
    bits: int
    axis: int = 0

    @property
    def per_channel(self) -> bool:
        return self.scale.dim() == 1


#: how learnable step sizes (LSQ, LSQ+, RFA) start: LSQ's rule, or the rounding-error minimum
STEP_INITS = ("lsq", "mse")


def set_step_init(model: nn.Module, init: str) -> int:
    """Start every learnable step size of ``model`` not initialised yet by ``init`` (STEP_INITS);
    returns how many quantizers it applies to. Training-time only: nothing of it is saved."""
    if init not in STEP_INITS:
        raise ValueError(f"step init {init!r} is unknown; use {' or '.join(STEP_INITS)}")
    qs = [m for m in model.modules() if isinstance(m, (LSQ, RFA)) and not m.initialized]
    for q in qs:
        q.step_init = init
    return len(qs)


class Quantizer(nn.Module):
    """Base: bit width, ``init_state`` and ``signed`` buffers, lazy initialisation.

    Each quantizer owns its deploy form (what ``fold`` turns it into): :meth:`weight_codes` for
    a weight it quantizes, :meth:`deploy_act` for an activation. A subclass that can be
    deployed implements :meth:`_weight_grid` and/or :meth:`_act_scale` (or overrides the two
    public methods); the base class checks initialisation and maps unsigned grids into the
    signed int8 container.
    """

    kind = "quantizer"
    #: how a learnable step size starts (STEP_INITS; set per module by ``set_step_init``)
    step_init = "lsq"
    SAMPLE = 1 << 18  # values per channel that statistics-based initialisations look at

    def __init__(self, bits: int, signed: bool | None = None, channels: int = 1, axis: int = 0):
        super().__init__()
        if not 1 <= int(bits) <= 16:
            raise ValueError(f"bits={bits} is out of range; use 2..8 (1..16 accepted)")
        if int(channels) < 1:
            raise ValueError(f"channels={channels}: a quantizer has one scale, or one per channel (>= 1)")
        self.bits = int(bits)
        self.fixed_sign = signed  # None: decided from the data at initialisation
        #: one step size per output channel along ``axis`` of the weight (1: per tensor)
        self.channels, self.axis = int(channels), int(axis)
        self.register_buffer("init_state", torch.zeros(1))
        self.register_buffer("signed", torch.full((1,), 1.0 if signed else 0.0))

    @property
    def initialized(self) -> bool:
        return bool(self.init_state.item() == 1)

    @property
    def is_signed(self) -> bool:
        return bool(self.signed.item() == 1)

    def grid(self) -> tuple[int, int]:
        return qrange(self.bits, self.is_signed)

    def _decide_sign(self, x: torch.Tensor) -> None:
        signed = self.fixed_sign if self.fixed_sign is not None else bool(x.min() < -SIGN_EPS)
        if signed:  # the official code only ever sets the flag, never clears it
            self.signed.fill_(1.0)

    # -- per-channel step sizes ----------------------------------------------------------------
    @property
    def per_channel(self) -> bool:
        return self.channels > 1

    def along(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-channel parameter shaped to broadcast over ``x`` along the channel axis (a
        per-tensor one as it is)."""
        if not self.per_channel:
            return t
        if x.dim() <= self.axis or x.shape[self.axis] != self.channels:
            raise ValueError(f"a per-channel {self.kind} quantizer of {self.channels} channels along axis "
                             f"{self.axis} was given a tensor of shape {tuple(x.shape)}")
        shape = [1] * x.dim()
        shape[self.axis] = self.channels
        return t.reshape(shape)

    def channel_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (channels, values of that channel), or (1, all values) per tensor."""
        return x.movedim(self.axis, 0).reshape(self.channels, -1) if self.per_channel else x.reshape(1, -1)

    def sample_rows(self, rows: torch.Tensor, seed: int) -> torch.Tensor:
        """``rows`` (channels, values), or SAMPLE of its columns drawn with a seeded CPU generator."""
        if rows.shape[1] <= self.SAMPLE:
            return rows
        g = torch.Generator(device="cpu").manual_seed(seed)
        return rows[:, torch.randint(rows.shape[1], (self.SAMPLE,), generator=g).to(rows.device)]

    def _init_lsq_step(self, x: torch.Tensor) -> None:
        """The step's initialisation (LSQ, LSQ+, RFA): signedness, then α per ``step_init``
        (STEP_INITS; per channel when the quantizer has one α per channel):

        * ``lsq`` (LSQ's rule, the default): α = 2·mean|x|/√Qp;
        * ``mse``: the α that minimises the rounding error on this tensor (``grid.mse_step``, the
          search the ``mse`` PTQ observer runs), on at most SAMPLE values per channel.
        """
        self._decide_sign(x)
        qn, qp = self.grid()
        if self.step_init == "mse":
            rows = self.sample_rows(self.channel_rows(x.detach().float()), seed=0)
            peak = rows.abs().amax(1) if self.is_signed else rows.amax(1).clamp(min=0)
            self.alpha.copy_(mse_step(rows, peak.clamp(min=1e-8), (qn, qp)).to(self.alpha))
        elif self.per_channel:
            self.alpha.copy_(2 * self.channel_rows(x).abs().mean(1).clamp(min=1e-8) / math.sqrt(qp))
        else:
            self.alpha.copy_(2 * x.abs().mean() / math.sqrt(qp))

    def extra_repr(self) -> str:
        sign = {None: "auto", True: "signed", False: "unsigned"}[self.fixed_sign]
        channels = f", channels={self.channels} (axis {self.axis})" if self.per_channel else ""
        return f"bits={self.bits}, sign={sign}, initialized={self.initialized}{channels}"

    # -- deploy forms ------------------------------------------------------------------------
    def _require_initialized(self, role: str) -> None:
        if not self.initialized:
            raise CheckpointError(f"a {self.kind} {role} quantizer was never initialised; calibrate or train the "
                                  f"quantized model before folding it")

    def _weight_grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(codes on this quantizer's grid, scale, offset, grid) with ŵ = scale·codes + offset."""
        raise CheckpointError(f"a {self.kind} quantizer cannot quantize weights for deployment; "
                              f"use rfa, lsq, a PTQ observer or SPR²Q bounds")

    def _act_scale(self) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(scale, offset or None, signed) of the static activation quantizer this one deploys as."""
        if self.per_channel:
            raise CheckpointError(f"a per-channel {self.kind} quantizer cannot quantize activations for deployment")
        raise CheckpointError(f"a {self.kind} quantizer cannot quantize activations for deployment")

    @torch.no_grad()
    def weight_codes(self, w: torch.Tensor) -> WeightCodes:
        """``w`` exactly as this quantizer quantizes it, as integer codes, scale and offset.

        An unsigned grid (SPR²Q's bounds) is moved down by 2^(b−1) steps into the signed
        container and the shift goes into the offset."""
        self._require_initialized("weight")
        q, scale, offset, grid = self._weight_grid(w)
        scale = scale.detach().float().reshape(-1 if self.per_channel else ())
        offset = offset.detach().reshape(()).float()
        if grid[0] == 0:  # unsigned grid -> signed codes, shift into the offset
            if self.per_channel:
                raise CheckpointError(f"a per-channel {self.kind} quantizer with an unsigned grid cannot be folded")
            half = 2 ** (self.bits - 1)
            q = q - half
            offset = offset + half * scale
        return WeightCodes(q.to(torch.int8), scale, offset, self.bits, self.axis)

    @torch.no_grad()
    def deploy_act(self) -> nn.Module:
        """The static deploy module of this activation quantizer (values filled in)."""
        self._require_initialized("activation")
        scale, offset, signed = self._act_scale()
        qmin, qmax, shift = act_grid(self.bits, signed)
        scale = scale.detach().reshape(()).float()
        o = offset.detach().reshape(()).float() if offset is not None else torch.zeros(())
        return ActQuant(self.bits, qmin, qmax, has_offset=offset is not None or shift > 0).set(scale, o - shift * scale)


# ------------------------------------------------------------------------------- LSQ


class LSQ(Quantizer):
    """LSQ, or LSQ+ with ``offset=True`` (Q-MambaIR's ``Act_Quant``).

    x̂ = R(clamp((x + β)/α, Qn, Qp))·α − β; α initialised to 2·mean|x + β|/√Qp on the
    first training batch, its gradient scaled by 1/√(numel·Qp); β learnable
    (LSQ+) or absent (LSQ).
    """

    kind = "lsq"

    def __init__(self, bits: int, offset: bool = False, signed: bool | None = None, channels: int = 1,
                 axis: int = 0):
        super().__init__(bits, signed, channels, axis)
        self.alpha = nn.Parameter(torch.ones(self.channels))
        self.beta = nn.Parameter(torch.zeros(1)) if offset else None
        if offset:
            self.kind = "lsq+"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.initialized:
            with torch.no_grad():
                self._init_lsq_step(x + self.beta if self.beta is not None else x)
                self.init_state.fill_(1.0)
        qn, qp = self.grid()
        gs = step_grad_scale(x.numel() / self.channels, qp)
        if fused.use_fused(x, self.alpha, self.beta):
            return fused.lsq_quantize(x, self.along(self.alpha, x), self.beta, qn, qp, gs,
                                      self.axis if self.per_channel else None)
        if self.beta is not None:
            x = x + self.beta
        alpha = self.along(grad_scale(self.alpha, gs), x)
        out = round_ste((x / alpha).clamp(qn, qp)) * alpha
        return out - self.beta if self.beta is not None else out

    def _offset(self) -> torch.Tensor:
        return self.beta if self.beta is not None else torch.zeros((), device=self.alpha.device)

    def _weight_grid(self, w):
        beta = self._offset()
        grid = self.grid()
        return torch.round(((w + beta) / self.along(self.alpha, w)).clamp(*grid)), self.alpha, -beta, grid

    def _act_scale(self):
        return self.alpha, self.beta, self.is_signed


# ------------------------------------------------------------------------------- DLS


class DLS(Quantizer):
    """Dynamic-balancing Learnable Scalar (Q-MambaIR's ``DDA_Quant``), per tensor, every call.

    β = w21·mean(x) + w22·std(x) + w23·min(x) + w24·max(x);  x′ = x + β;
    α = |w1·|mean(x′)| + w2·std(x′) + w3·min(x′) + w4·max(x′)|, LSQ gradient scale,
    clamped to [1e-6, (max(x) − min(x))/2^b];
    x̂ = clamp(R(clamp(x′/α, Qn, Qp))·α − β, min(x), max(x)). std is unbiased.
    A constant tensor (e.g. the Ds = 1 of a freshly initialised model) passes
    unchanged, where the official code returns NaN.
    """

    kind = "dls"
    ALPHA_MIN = DLS_ALPHA_MIN

    def __init__(self, bits: int, signed: bool | None = None):
        super().__init__(bits, signed)
        qp = 2 ** (self.bits - 1) - 1
        init = {"weight1": 1.0 / qp, "weight2": 3.0 / qp, "weight3": 0.0, "weight4": 0.0,
                "weight21": -1.0, "weight22": 0.0, "weight23": 0.0, "weight24": 0.0}
        for name in DLS_WEIGHTS:
            setattr(self, name, nn.Parameter(torch.tensor([init[name]])))

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in DLS_WEIGHTS}

    def scale_offset(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(α, β, min(x), max(x)) for the live tensor ``x`` (α clamped, gradient-scaled)."""
        return dls_scale_offset(x, self.weights(), self.bits, self.grid()[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.initialized:
            with torch.no_grad():
                self._decide_sign(x)
                self.init_state.fill_(1.0)
        w = self.weights()
        if fused.use_fused(x, *w.values()):
            qn, qp = self.grid()
            return fused.dls_quantize(x, w.values(), self.bits, qn, qp, step_grad_scale(x.numel(), qp))
        return dls_quantize(x, w, self.bits, self.grid())

    @torch.no_grad()
    def deploy_act(self) -> nn.Module:
        """DLS stays DLS: its eight scalars in a :class:`DLSAct` (dynamic, or static once calibrated)."""
        out = DLSAct(self.bits, self.is_signed)
        for name, value in self.weights().items():
            getattr(out, name).copy_(value.detach())
        return out


# ------------------------------------------------------------------------------- RFA


def _count_below(v: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """For each value, the largest i with v > edges[i − 1] (0 if none): a bucketize while the edges
    are in order, the rule literally once training has crossed them (RFA's anchors can)."""
    v, edges = v.detach(), edges.detach()
    if bool((edges[1:] >= edges[:-1]).all()):
        return torch.bucketize(v.contiguous(), edges, right=False)   # the number of edges < v
    idx = torch.zeros_like(v, dtype=torch.long)
    for i in range(1, edges.numel() + 1):
        idx = torch.where(v > edges[i - 1], torch.full_like(idx, i), idx)
    return idx


class RFA(Quantizer):
    """Range-floating Flexible Allocator (Q-MambaIR's ``oneRK_U``), for weights, per tensor (or with
    one α per output channel; β and the anchors stay shared).

    v = clamp((w + β)/α, Qn, Qp). Forward: level = L_i for the largest i ≥ 1 with
    v > (a[i−1] + a[i])/2, else L_0, where L = −2^(b−1) … 2^(b−1)−1 (the official
    levels, whatever the signedness). Backward: piecewise-linear through the
    anchors (slope 1/(a[i+1] − a[i]) in cell i) and slope 0.1 below a[0] and
    above a[−1]. ŵ = level·α − β. Anchors start on the integer grid, where RFA
    equals ordinary rounding.
    """

    kind = "rfa"
    OUTER_SLOPE = 0.1

    def __init__(self, bits: int, signed: bool | None = None, channels: int = 1, axis: int = 0):
        super().__init__(bits, signed, channels, axis)
        self.alpha = nn.Parameter(torch.ones(self.channels))
        self.beta = nn.Parameter(torch.zeros(1))
        qn, qp = qrange(self.bits, True)
        self.a = nn.Parameter(torch.arange(qn, qp + 1, dtype=torch.float32))

    def levels(self, device=None) -> torch.Tensor:
        half = 2 ** (self.bits - 1)
        return torch.arange(-half, half, dtype=torch.float32, device=device)

    def thresholds(self) -> torch.Tensor:
        return (self.a[:-1] + self.a[1:]) / 2

    def hard_level(self, v: torch.Tensor) -> torch.Tensor:
        """The forward rule: index of the largest threshold below v (0 if none) -> level."""
        return self.levels(v.device)[_count_below(v, self.thresholds())]

    def cells(self, v: torch.Tensor) -> torch.Tensor:
        """The surrogate's cell of each value: the largest i with v > a[i], or −1."""
        return _count_below(v, self.a) - 1

    def soft_level(self, v: torch.Tensor) -> torch.Tensor:
        """The backward surrogate: piecewise linear through (a[i], L_i), slope 0.1 outside."""
        a, lv = self.a, self.levels(v.device)
        n = a.numel()
        cell = self.cells(v)
        lo = cell.clamp(0, n - 1)
        hi = (cell + 1).clamp(max=n - 1)
        a_lo, a_hi, l_lo = a[lo], a[hi], lv[lo]
        inner = l_lo + (v - a_lo) / torch.where(hi == lo, torch.ones_like(a_hi), a_hi - a_lo)
        below = self.OUTER_SLOPE * (v - a[0]) + lv[0]
        above = self.OUTER_SLOPE * (v - a[-1]) + lv[-1]
        return torch.where(cell < 0, below, torch.where(cell >= n - 1, above, inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.initialized:
            with torch.no_grad():
                self._init_lsq_step(x + self.beta)
                qn, qp = self.grid()
                self.a.copy_(torch.arange(qn, qp + 1, dtype=torch.float32, device=x.device))
                self.init_state.fill_(1.0)
        qn, qp = self.grid()
        gs = step_grad_scale(x.numel() / self.channels, qp)
        if fused.use_fused(x, self.alpha, self.beta, self.a):
            return fused.rfa_quantize(x, self.along(self.alpha, x), self.beta, self.a, self.hard_level, self.cells,
                                      self.thresholds,
                                      qn, qp, gs, self.axis if self.per_channel else None, self.OUTER_SLOPE)
        x = x + self.beta
        alpha = self.along(grad_scale(self.alpha, gs), x)
        v = (x / alpha).clamp(qn, qp)
        soft = self.soft_level(v)
        level = self.hard_level(v) + (soft - soft.detach())
        return level * alpha - self.beta

    def _weight_grid(self, w):
        qn, qp = self.grid()
        q = self.hard_level(((w + self.beta) / self.along(self.alpha, w)).clamp(qn, qp))
        return q, self.alpha, -self.beta, (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1)


# ------------------------------------------------------------------------- PTQ observers

OBSERVERS = ("minmax", "percentile", "mse")


class Observer(Quantizer):
    """Post-training quantizer: statistics on calibration data fix α, then x̂ = R(clamp(x/α))·α.

    ``minmax``: α = max|x|/Qp (max/Qp for unsigned data); ``percentile``: the
    ``percentile`` quantile of |x| instead of the max; ``mse``: the α among 100
    candidates (0.2 … 1 × max) that minimises ‖x̂ − x‖² on the calibration sample.
    Calibration (training mode) keeps a bounded random sample of the values
    seen; :meth:`freeze` (or the first eval-mode call) computes α. Symmetric,
    zero point 0: what TensorRT runs. With ``channels`` > 1 (weights) every statistic is taken
    per output channel along ``axis`` and α has one value per channel.
    """

    kind = "observer"

    def __init__(self, bits: int, method: str = "minmax", signed: bool | None = None, percentile: float = 99.99,
                 channels: int = 1, axis: int = 0):
        super().__init__(bits, signed, channels, axis)
        if method not in OBSERVERS:
            raise ValueError(f"observer {method!r} is unknown; use {', '.join(OBSERVERS)}")
        self.method, self.percentile = method, percentile
        self.alpha = nn.Parameter(torch.ones(self.channels), requires_grad=False)
        self.register_buffer("x_min", torch.full((self.channels,), float("inf")))
        self.register_buffer("x_max", torch.full((self.channels,), float("-inf")))
        self._sample: list[torch.Tensor] = []

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method}"

    def observe(self, x: torch.Tensor) -> None:
        rows = self.channel_rows(x.detach().float())                 # (channels, values)
        self.x_min.copy_(torch.minimum(self.x_min, rows.amin(1)))
        self.x_max.copy_(torch.maximum(self.x_max, rows.amax(1)))
        if self.method != "minmax":
            self._sample.append(self.sample_rows(rows, seed=len(self._sample)).cpu())

    @torch.no_grad()
    def freeze(self) -> None:
        if not torch.isfinite(self.x_max).all():
            raise RuntimeError("the observer saw no data; run calibration batches before freezing it")
        signed = self.fixed_sign if self.fixed_sign is not None else bool(self.x_min.min() < -SIGN_EPS)
        self.signed.fill_(1.0 if signed else 0.0)
        qn, qp = self.grid()
        peak = torch.maximum(self.x_max.abs(), self.x_min.abs()) if signed else self.x_max.clamp(min=0)
        peak = peak.clamp(min=1e-8)                                   # (channels,)
        if self.method == "minmax":
            alpha = peak / qp
        else:
            sample = torch.cat(self._sample, 1) if self._sample else torch.zeros(self.channels, 1)
            mag = sample.abs() if signed else sample.clamp(min=0)
            if self.method == "percentile":
                k = max(1, min(mag.shape[1], int(math.ceil(self.percentile / 100 * mag.shape[1]))))
                alpha = mag.kthvalue(k, dim=1).values.clamp(min=1e-8) / qp
            else:
                alpha = mse_step(sample, peak.cpu(), (qn, qp))
        self.alpha.copy_(alpha.to(self.alpha.device))
        self._sample = []
        self.init_state.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.initialized:
            self.observe(x)
            return x  # calibration passes see the float tensor
        if not self.initialized:
            self.freeze()
        qn, qp = self.grid()
        alpha = self.along(self.alpha, x)
        return round_ste((x / alpha).clamp(qn, qp)) * alpha

    def _weight_grid(self, w):
        grid = self.grid()
        return (torch.round((w / self.along(self.alpha, w)).clamp(*grid)), self.alpha,
                torch.zeros((), device=w.device), grid)

    def _act_scale(self):
        if self.per_channel:
            return super()._act_scale()
        return self.alpha, None, self.is_signed


def quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]
