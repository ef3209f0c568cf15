"""Where a quantized model's float sensitivity comes from: code flips per quantizer site and routing
flips per block between two runs of the same deploy model (float32 and float64).

Two runtimes that add in different orders see activations that differ by a few ulps. A static
activation quantizer turns that into a different integer code only where a value lies within
those ulps of a rounding boundary; MambaIRv2's router turns it into another prompt only where two
logits nearly tie. Every flip then changes everything downstream of it, so the counts grow along
the network: the first sites with flips are where the cascade starts, and the share of values near
a boundary in the reference run (``near_boundary``: within ``NEAR`` of a half step) says how
exposed each site is by itself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import kind as artifact_kind
from ..data.datasets import Pair, degrade_pair, to_tensor
from ..data.degrade import Degradation
from ..metrics import psnr_between
from ..quant.deploy import ActQuant

#: A value within this fraction of a step from a rounding boundary counts as near it.
NEAR = 1e-3


@dataclass
class SiteFlips:
    site: str
    kind: str           # 'act' (a static activation quantizer) or 'route' (an ASSM's argmax routing)
    order: int          # execution order in the forward
    values: int = 0     # codes (or routed tokens) compared, over all images
    flips: int = 0      # of them different between the two runs
    near_boundary: int = 0  # reference values within NEAR of a half step (act) or of a tie (route)

    def as_dict(self) -> dict[str, Any]:
        return {"site": self.site, "kind": self.kind, "order": self.order, "values": self.values,
                "flips": self.flips, "near_boundary": self.near_boundary}


@dataclass
class DiagnoseReport:
    images: list[str]
    sites: list[SiteFlips]
    psnr_between: list[float] = field(default_factory=list)

    @property
    def first_flips(self) -> list[SiteFlips]:
        """Sites with flips in execution order (the cascade's start first)."""
        return sorted((s for s in self.sites if s.flips), key=lambda s: s.order)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": artifact_kind("diagnosis"), "runs": ["float32", "float64"], "images": self.images,
                "psnr_between": self.psnr_between, "near": NEAR, "sites": [s.as_dict() for s in self.sites]}

    def table(self, rows: int = 12) -> str:
        acts = [s for s in self.sites if s.kind == "act"]
        routes = [s for s in self.sites if s.kind == "route"]
        flipped = self.first_flips
        lines = [f"code flips between float32 and float64 runs of the deploy model ({len(self.images)} images; "
                 f"PSNR between the outputs {min(self.psnr_between, default=float('nan')):.2f} dB at worst):",
                 f"  activation codes: {sum(s.flips for s in acts):,} of {sum(s.values for s in acts):,} flipped at "
                 f"{sum(1 for s in acts if s.flips)} of {len(acts)} quantizers",
                 f"  routing decisions: {sum(s.flips for s in routes):,} of {sum(s.values for s in routes):,} changed "
                 f"in {sum(1 for s in routes if s.flips)} of {len(routes)} ASSMs"]
        if not flipped:
            return "\n".join(lines + ["  no flips: the two runs agree code for code"])
        lines += ["", "| # | site | kind | flips | of | near a boundary in float64 |", "|---:|---|---|---:|---:|---:|"]
        for s in flipped[:rows]:
            lines.append(f"| {s.order} | `{s.site}` | {s.kind} | {s.flips:,} | {s.values:,} | {s.near_boundary:,} |")
        if len(flipped) > rows:
            lines.append(f"| | … {len(flipped) - rows} more sites with flips | | | | |")
        return "\n".join(lines)


def _sites(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Static activation quantizers and routers, in module order (a DLS site's static quantizer is
    named after its DLS module)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, ActQuant):
            out.append((name.removesuffix(".static"), m, "act"))
        elif name.endswith("assm.route"):
            out.append((name, m, "route"))
    return out


def _record(model: nn.Module, log: dict[str, tuple[int, torch.Tensor, torch.Tensor]]) -> list[Any]:
    """Hooks that store, per site, (call order, codes or classes, closeness to a boundary)."""
    handles = []
    for name, m, kind in _sites(model):
        def hook(mod, args, out, name=name, kind=kind):
            with torch.no_grad():
                if kind == "act":
                    x = args[0] + mod.offset if mod.has_offset else args[0]
                    t = x / mod.scale
                    codes = torch.round(t).clamp(mod.qmin, mod.qmax)
                    inside = (t > mod.qmin - 0.5) & (t < mod.qmax + 0.5)
                    close = inside & ((t - torch.floor(t) - 0.5).abs() < NEAR)
                else:  # log-probabilities over the prompts: a near tie of the two best
                    top = out.topk(2, dim=-1).values
                    codes, close = out.argmax(-1), (top[..., 0] - top[..., 1]) < NEAR
            log[name] = (log.get(name, (len(log),))[0], codes.to(torch.int64), close)

        handles.append(m.register_forward_hook(hook))
    return handles


def diagnose(model: nn.Module, pairs: Iterable[Pair], degradation: Degradation, seed: int = 0) -> DiagnoseReport:
    """Run every image through ``model`` in float32 and float64 and count the flips per site."""
    model32 = model.eval()
    model64 = copy.deepcopy(model).double().eval()
    sites = {name: SiteFlips(name, kind, 0) for name, _, kind in _sites(model32)}
    names, between = [], []
    for pair in pairs:
        x = to_tensor(degrade_pair(pair, degradation, seed))
        log32: dict = {}
        log64: dict = {}
        handles = _record(model32, log32) + _record(model64, log64)
        try:
            with torch.no_grad():
                y32 = model32(x)
                y64 = model64(x.double())
        finally:
            for h in handles:
                h.remove()
        for name, (order, codes32, _) in log32.items():
            _, codes64, close = log64[name]
            s = sites[name]
            s.order = order
            s.values += codes32.numel()
            s.flips += int((codes32 != codes64).sum())
            s.near_boundary += int(close.sum())
        names.append(pair.name)
        between.append(psnr_between(y32, y64.float()))
    return DiagnoseReport(names, list(sites.values()), between)
