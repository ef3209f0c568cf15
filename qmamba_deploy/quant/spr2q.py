"""SPR²Q: low-rank rectifier groups fused into the weights before quantization.

Per quantized layer with frozen float weight W (out × in; a Conv2d as out ×
in/groups·kh·kw):

* a **rectifier group** of N low-rank increments ΔW_i = B_i A_i (rank r), B
  initialised to 0 so the group starts as the identity;
* a **gate** (mean over positions -> Linear -> softmax) giving per-sample
  weights g_i while the group trains: W′_q = Q_{a,b}(W + Σ g_i ΔW_i);
* **static routing**: after group training the gate is replaced by fixed
  ĝ (initialised with the gate's mean over the calibration data, then
  optimised on the same loss);
* **fusion**: W ← W + Σ ĝ_i ΔW_i; the rectifiers and the gate are removed
  and what is left is an ordinary quantized layer (same keys as the
  float model plus the quantizers), so the deployment path never sees them.

Q_{a,b} is :class:`BoundedQuant`: learnable clipping bounds a < b,
s = (b − a)/(2^n − 1), x̂ = R((clip(x, a, b) − a)/s)·s + a, straight-through
rounding (gradients for a and b by autograd through that expression).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distill import BlockFeatures
from .layers import QuantConv2d, QuantLinear
from .quantizers import Quantizer, round_ste

#: how Q_{a,b} sets its bounds on the first tensor it sees: ``minmax`` (a = min, b = max), or
#: ``mse`` (the a, b trimmed from min/max that minimise ‖Q_{a,b}(x) − x‖²; at 2 bits min/max puts
#: four levels across the outliers' range and rounds almost every value far from itself)
BOUND_INITS = ("minmax", "mse")


def mse_bounds(x: torch.Tensor, bits: int, sample: int = 1 << 14, candidates: int = 41,
               rounds: int = 3) -> tuple[float, float]:
    """Bounds (a, b) of Q_{a,b} minimising ‖Q_{a,b}(x) − x‖².

    a = m + α (min − m), b = m + β (max − m) around the median m, with α and β on a geometric
    grid from 1 (min/max) down to 0.01 (outliers can make the best range a small part of
    min…max); coordinate descent, α then β, ``rounds`` times. The error is estimated on
    the 64 smallest and 64 largest values (the rare ones a clipped range loses most on)
    plus a fixed random sample of ``sample`` values standing for the rest.
    """
    v = x.detach().float().reshape(-1)
    total = v.numel()
    weights = None
    if total > sample + 128:
        g = torch.Generator(device="cpu").manual_seed(total)
        ends = torch.cat([v.topk(64).values, (-v).topk(64).values.neg()])
        rest = v[torch.randint(total, (sample,), generator=g).to(v.device)]
        v = torch.cat([ends, rest])
        weights = torch.cat([torch.ones(128, device=v.device),
                             torch.full((sample,), (total - 128) / sample, device=v.device)])
    lo0, hi0, mid = float(v.min()), float(v.max()), float(v.median())
    if hi0 <= lo0:
        return lo0, hi0
    levels = 2 ** bits - 1
    grid = torch.logspace(-2, 0, candidates, device=v.device)

    def errors(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:   # (n,) bounds -> (n,) error
        step = ((hi - lo) / levels).clamp(min=1e-12)[:, None]
        clipped = torch.minimum(torch.maximum(v[None], lo[:, None]), hi[:, None])
        sq = (torch.round((clipped - lo[:, None]) / step) * step + lo[:, None] - v[None]) ** 2
        return sq.mean(1) if weights is None else sq @ weights

    lo, hi = torch.tensor(lo0, device=v.device), torch.tensor(hi0, device=v.device)
    for _ in range(rounds):
        los = mid + grid * (lo0 - mid)
        lo = los[errors(los, hi.expand_as(los)).argmin()]
        his = mid + grid * (hi0 - mid)
        hi = his[errors(lo.expand_as(his), his).argmin()]
    if hi <= lo:
        return lo0, hi0
    return float(lo), float(hi)


class BoundedQuant(Quantizer):
    """Q_{a,b}: asymmetric uniform quantizer with learnable bounds (initialised by ``init``, see BOUND_INITS)."""

    kind = "bounded"

    def __init__(self, bits: int, init: str = "mse"):
        super().__init__(bits, signed=False)
        if init not in BOUND_INITS:
            raise ValueError(f"bounds init {init!r} is unknown; use {' or '.join(BOUND_INITS)}")
        self.init = init
        self.lo = nn.Parameter(torch.zeros(1))
        self.hi = nn.Parameter(torch.ones(1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init}"

    def step(self) -> torch.Tensor:
        return (self.hi - self.lo).clamp(min=1e-8) / (2 ** self.bits - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.initialized:
            with torch.no_grad():
                lo, hi = mse_bounds(x, self.bits) if self.init == "mse" else (float(x.min()), float(x.max()))
                self.lo.fill_(lo)
                self.hi.fill_(hi)
                self.init_state.fill_(1.0)
        s = self.step()
        clipped = torch.maximum(torch.minimum(x, self.hi), self.lo)
        return round_ste((clipped - self.lo) / s) * s + self.lo

    def _weight_grid(self, w):
        s = self.step()
        clipped = torch.maximum(torch.minimum(w, self.hi), self.lo)
        return torch.round((clipped - self.lo) / s), s, self.lo, (0, 2 ** self.bits - 1)

    def _act_scale(self):
        return self.step(), -self.lo, False


def set_bounds_init(model: nn.Module, init: str) -> int:
    """Use ``init`` (BOUND_INITS) for every Q_{a,b} of ``model`` not initialised yet; returns how many."""
    if init not in BOUND_INITS:
        raise ValueError(f"bounds init {init!r} is unknown; use {' or '.join(BOUND_INITS)}")
    qs = [m for m in model.modules() if isinstance(m, BoundedQuant) and not m.initialized]
    for q in qs:
        q.init = init
    return len(qs)


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


class RectifierGroup(nn.Module):
    """N low-rank increments of one weight, mixed by a gate (training) or by fixed ĝ (static)."""

    def __init__(self, weight_shape: torch.Size, in_features: int, n: int = 4, rank: int = 8):
        super().__init__()
        out_f = int(weight_shape[0])
        cols = int(math.prod(weight_shape[1:]))
        self.weight_shape = tuple(weight_shape)
        self.n, self.rank = n, min(rank, out_f, cols)
        self.A = nn.Parameter(torch.randn(n, self.rank, cols) / math.sqrt(cols))
        self.B = nn.Parameter(torch.zeros(n, out_f, self.rank))
        self.gate = nn.Linear(in_features, n)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.register_buffer("static", torch.zeros(1))  # 1.0 once routed statically
        self.g_static = nn.Parameter(torch.full((n,), 1.0 / n))

    @property
    def is_static(self) -> bool:
        return bool(self.static.item() == 1)

    def increments(self) -> torch.Tensor:
        """ΔW_i as (N, out, cols)."""
        return torch.matmul(self.B, self.A)

    def gates(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Per-sample gate weights (batch, N) from the layer input."""
        if self.is_static:
            return self.g_static.expand(x.shape[0], -1)
        dims = [d for d in range(1, x.dim()) if d != channel_dim % x.dim()]
        pooled = x.mean(dim=dims) if dims else x
        return torch.softmax(self.gate(pooled), dim=-1)

    def rectified(self, weight: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """W + Σ g_i ΔW_i for every sample: (batch, *weight.shape).

        Statically routed, this is exactly the fused weight (same operations),
        so fusion changes nothing.
        """
        if self.is_static:
            return (weight + self.fused_increment()).unsqueeze(0).expand(g.shape[0], *self.weight_shape)
        delta = torch.einsum("bn,noc->boc", g, self.increments())
        return (_as_matrix(weight).unsqueeze(0) + delta).reshape(g.shape[0], *self.weight_shape)

    def fused_increment(self) -> torch.Tensor:
        """Σ ĝ_i ΔW_i with the static weights, shaped like the weight."""
        return torch.einsum("n,noc->oc", self.g_static, self.increments()).reshape(self.weight_shape)

    @torch.no_grad()
    def route_statically(self, mean_gate: torch.Tensor | None = None) -> None:
        """Switch to fixed ĝ (initialised with ``mean_gate``, e.g. the gate's calibration mean)."""
        if mean_gate is not None:
            self.g_static.copy_(mean_gate)
        self.static.fill_(1.0)


class SPR2QLinear(QuantLinear):
    """QuantLinear whose weight passes a rectifier group before its quantizer."""

    CHANNEL_DIM = -1  # the input dimension the gate reads channels from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.rectifier.gates(x, self.CHANNEL_DIM)
        w = self.rectifier.rectified(self.weight, g)  # (b, out, in)
        xq = self.linear_act_quant(x)
        wq = torch.stack([self.linear_weight_quant(w[i]) for i in range(w.shape[0])])
        lead = xq.shape[1:-1]
        y = torch.matmul(xq.reshape(xq.shape[0], -1, xq.shape[-1]), wq.transpose(1, 2))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(xq.shape[0], *lead, -1)


class SPR2QConv2d(QuantConv2d):
    """QuantConv2d whose weight passes a rectifier group before its quantizer (per-sample weights)."""

    CHANNEL_DIM = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.rectifier.gates(x, self.CHANNEL_DIM)
        w = self.rectifier.rectified(self.weight, g)  # (b, out, in/g, kh, kw)
        xq = self.conv_act_quant(x)
        b = x.shape[0]
        wq = torch.cat([self.conv_weight_quant(w[i]) for i in range(b)])  # (b*out, in/g, kh, kw)
        y = F.conv2d(xq.reshape(1, b * x.shape[1], *x.shape[2:]), wq, None, self.stride, self.padding,
                     self.dilation, self.groups * b)
        y = y.reshape(b, self.out_channels, *y.shape[2:])
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)


def attach_rectifiers(model: nn.Module, n: int = 4, rank: int = 8) -> list[str]:
    """Give every quantized Linear/Conv2d of ``model`` a rectifier group; float weights are frozen."""
    names = []
    for name, m in list(model.named_modules()):
        if type(m) in (QuantLinear, QuantConv2d):
            in_features = m.in_features if isinstance(m, QuantLinear) else m.in_channels
            m.rectifier = RectifierGroup(m.weight.shape, in_features, n, rank).to(m.weight.device)
            m.__class__ = SPR2QLinear if isinstance(m, QuantLinear) else SPR2QConv2d
            names.append(name)
    for p_name, p in model.named_parameters():
        if ".rectifier." not in p_name and not _is_quantizer_param(model, p_name):
            p.requires_grad_(False)
    return names


def _is_quantizer_param(model: nn.Module, p_name: str) -> bool:
    owner = model.get_submodule(p_name.rpartition(".")[0]) if "." in p_name else model
    return isinstance(owner, Quantizer)


def rectified_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, (SPR2QLinear, SPR2QConv2d)))


@torch.no_grad()
def route_statically(model: nn.Module, mean_gates: dict[str, torch.Tensor] | None = None) -> None:
    for name, m in rectified_layers(model):
        m.rectifier.route_statically(None if mean_gates is None else mean_gates.get(name))


@torch.no_grad()
def fuse_rectifiers(model: nn.Module) -> dict[str, dict[str, float | list[float]]]:
    """W ← W + Σ ĝ_i ΔW_i, drop the rectifiers; returns the routing table (ĝ and ‖increment‖ per layer)."""
    table = {}
    for name, m in list(rectified_layers(model)):
        if not m.rectifier.is_static:
            raise RuntimeError(f"{name}: route the rectifiers statically before fusing them")
        inc = m.rectifier.fused_increment()
        table[name] = {"g": [round(float(v), 6) for v in m.rectifier.g_static],
                       "increment_norm": float(inc.norm()), "weight_norm": float(m.weight.norm())}
        m.weight.copy_(m.weight + inc)
        del m.rectifier
        m.__class__ = QuantLinear if isinstance(m, SPR2QLinear) else QuantConv2d
    for p in model.parameters():
        p.requires_grad_(True)
    return table


# ------------------------------------------------------------------------ hybrid loss


def hybrid_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """L1(student(x), teacher(x)) + λ · Σ_blocks MSE(student block output, teacher block output)."""
    with torch.no_grad(), BlockFeatures(teacher) as t:
        target = teacher(x)
    with BlockFeatures(student) as s:
        out = student(x)
    loss = F.l1_loss(out, target)
    if lam:
        loss = loss + lam * sum(F.mse_loss(s.outputs[k], t.outputs[k]) for k in t.outputs)
    return loss
