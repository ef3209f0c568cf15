"""Where a quantized model's float sensitivity comes from: code flips per quantizer site and routing
flips per block between two runs of the same deploy model (float32 and float64).

Two runtimes that add in different orders see activations that differ by a few ulps. A static
activation quantizer turns that into a different integer code only where a value lies within
those ulps of a rounding boundary; MambaIRv2's router turns it into another prompt only where two
logits nearly tie. Every flip then changes everything downstream of it, so the counts grow along
the network: the first sites with flips are where the cascade starts, and the share of values near
a boundary in the reference run (``near_boundary``: within ``NEAR`` of a half step) says how
exposed each site is by itself.

Three controls say what the disagreement is made of. ``codes_held``: the float32 run again, with every
activation code and routing decision taken from the float64 run — what is left is float rounding
between the quantizers (if it is far above the free run, the disagreement is all flips).
``routing_held``: the same with only the routing decisions held (if it stays at the free run, routing
is not what amplifies the flips, and no routing tie-break can help). ``one_flip``:
the float64 run again with one code flipped, the one nearest a rounding boundary at the first
quantizer — the smallest disagreement two runtimes can have. A model whose single flip already
lands at the free run's PSNR is chaotic: its floor is set by whether any code flips, not by how many.
``quality_shift`` (per image, and per one-flip control): how far that disagreement moves the image's
Y-PSNR against the ground truth — what a per-image "same quality as the reference" check can expect
of any other runtime, since a chaotic model's score moves by about as much under one flip.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import kind as artifact_kind
from ..data.datasets import Pair, degrade_pair, to_tensor
from ..data.degrade import Degradation
from ..evaluate import image_psnr
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
class FlipResponse:
    """What one flipped code does downstream (a float64 run against the unflipped float64 run)."""

    site: str
    distance: float          # how far the flipped value lay from its rounding boundary, in steps
    psnr: float              # PSNR between the two outputs
    codes_flipped: int       # activation codes after it that differ
    routing_changed: int     # routing decisions after it that differ
    quality_shift: float     # the flipped run's Y-PSNR against the ground truth minus the unflipped run's (dB)

    def as_dict(self) -> dict[str, Any]:
        return {"site": self.site, "distance": self.distance, "psnr": self.psnr,
                "codes_flipped": self.codes_flipped, "routing_changed": self.routing_changed,
                "quality_shift": self.quality_shift}


@dataclass
class DiagnoseReport:
    images: list[str]
    sites: list[SiteFlips]
    psnr_between: list[float] = field(default_factory=list)
    codes_held: list[float] = field(default_factory=list)   # PSNR with float64's codes and routing held
    routing_held: list[float] = field(default_factory=list)  # PSNR with float64's routing decisions held
    one_flip: list[FlipResponse] = field(default_factory=list)  # per image
    quality_shift: list[float] = field(default_factory=list)  # Y-PSNR vs ground truth, float32 minus float64 (dB)

    @property
    def first_flips(self) -> list[SiteFlips]:
        """Sites with flips in execution order (the cascade's start first)."""
        return sorted((s for s in self.sites if s.flips), key=lambda s: s.order)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": artifact_kind("diagnosis"), "runs": ["float32", "float64"], "images": self.images,
                "psnr_between": self.psnr_between, "codes_held": self.codes_held, "routing_held": self.routing_held,
                "one_flip": [f.as_dict() for f in self.one_flip], "quality_shift": self.quality_shift, "near": NEAR,
                "sites": [s.as_dict() for s in self.sites]}

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
        if self.codes_held:
            lines.append(f"  float32 with float64's codes and routing held: PSNR between "
                         f"{_db(min(self.codes_held))} at worst (what float rounding alone leaves)")
        if self.routing_held:
            lines.append(f"  float32 with float64's routing held (codes free): PSNR between "
                         f"{_db(min(self.routing_held))} at worst")
        if self.quality_shift:
            lines.append(f"  Y-PSNR against the ground truth, float32 minus float64: "
                         f"{_shifts(self.quality_shift)} dB")
        for f in self.one_flip[:1]:
            lines.append(f"  one code flipped at `{f.site}` ({f.distance:.1e} of a step from its boundary), float64: "
                         f"PSNR {_db(f.psnr)}, {f.codes_flipped:,} codes and {f.routing_changed:,} routing decisions "
                         f"flipped after it")
        if self.one_flip:
            lines.append(f"  Y-PSNR against the ground truth, one flip minus none: "
                         f"{_shifts(f.quality_shift for f in self.one_flip)} dB (what one code's chaos moves an "
                         f"image's score)")
        if not flipped:
            return "\n".join(lines + ["  no flips: the two runs agree code for code"])
        lines += ["", "| # | site | kind | flips | of | near a boundary in float64 |", "|---:|---|---|---:|---:|---:|"]
        for s in flipped[:rows]:
            lines.append(f"| {s.order} | `{s.site}` | {s.kind} | {s.flips:,} | {s.values:,} | {s.near_boundary:,} |")
        if len(flipped) > rows:
            lines.append(f"| | … {len(flipped) - rows} more sites with flips | | | | |")
        return "\n".join(lines)


def _db(p: float) -> str:
    return "identical" if p == float("inf") else f"{p:.2f} dB"


def _shifts(values: Iterable[float]) -> str:
    return ", ".join(f"{v:+.3f}" for v in values)


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
                    t = mod.steps(args[0])
                    codes = torch.round(t).clamp(mod.qmin, mod.qmax)
                    inside = (t > mod.qmin - 0.5) & (t < mod.qmax + 0.5)
                    close = inside & ((t - torch.floor(t) - 0.5).abs() < NEAR)
                else:  # log-probabilities over the prompts: a near tie of the two best
                    top = out.topk(2, dim=-1).values
                    codes, close = out.argmax(-1), (top[..., 0] - top[..., 1]) < NEAR
            log[name] = (log.get(name, (len(log),))[0], codes.to(torch.int64), close)

        handles.append(m.register_forward_hook(hook))
    return handles


def _hold(model: nn.Module, log: dict[str, tuple[int, torch.Tensor, torch.Tensor]],
          kinds: tuple[str, ...] = ("act", "route")) -> list[Any]:
    """Hooks that replace the codes (``act``) and/or routing classes (``route``) of every site by those in
    ``log``."""
    handles = []
    for name, m, kind in _sites(model):
        if kind not in kinds:
            continue
        def hook(mod, args, out, name=name, kind=kind):
            codes = log[name][1]
            if kind == "route":  # only the argmax of the router's log-probabilities is used
                return torch.nn.functional.one_hot(codes, out.shape[-1]).to(out.dtype)
            return mod.from_codes(codes)

        handles.append(m.register_forward_hook(hook))
    return handles


def _flip_nearest(site: nn.Module, report: dict[str, float]) -> list[Any]:
    """A hook that moves the value nearest a rounding boundary of ``site`` to the neighbouring code."""
    def hook(mod, args, out):
        t = mod.steps(args[0]).flatten()
        frac = t - torch.floor(t)
        dist = torch.where((t > mod.qmin) & (t < mod.qmax), (frac - 0.5).abs(), torch.full_like(t, 2.0))
        i = int(dist.argmin())
        if float(dist[i]) > 1:
            return None  # every value is clipped: nothing to flip
        report["distance"] = float(dist[i])
        y = out.flatten().clone()
        up = bool(torch.round(t[i]) <= t[i])  # rounded down (half to even included): the other side is up
        y[i] += (1.0 if up else -1.0) * mod.scale
        return y.view_as(out)

    return [site.register_forward_hook(hook)]


def _run(model: nn.Module, x: torch.Tensor, *hooks: list[Any]) -> torch.Tensor:
    """``model(x)`` without gradient; then the hook handles (lists, as the functions above return) go."""
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for handles in hooks:
            for h in handles:
                h.remove()


def diagnose(model: nn.Module, pairs: Iterable[Pair], degradation: Degradation, seed: int = 0) -> DiagnoseReport:
    """Run every image through ``model`` in float32 and float64 and count the flips per site; then the
    three controls of the module's docstring (codes held, routing held, one flip)."""
    model32 = model.eval()
    model64 = copy.deepcopy(model).double().eval()
    kinds = {name: kind for name, _, kind in _sites(model32)}
    sites = {name: SiteFlips(name, kind, 0) for name, kind in kinds.items()}
    first = next((name for name, kind in kinds.items() if kind == "act"), None)
    report = DiagnoseReport([], list(sites.values()))
    for pair in pairs:
        x = to_tensor(degrade_pair(pair, degradation, seed))
        log32: dict = {}
        log64: dict = {}
        y32 = _run(model32, x, _record(model32, log32))
        y64 = _run(model64, x.double(), _record(model64, log64))
        for name, (order, codes32, _) in log32.items():
            _, codes64, close = log64[name]
            s = sites[name]
            s.order = order
            s.values += codes32.numel()
            s.flips += int((codes32 != codes64).sum())
            s.near_boundary += int(close.sum())
        report.images.append(pair.name)
        report.psnr_between.append(psnr_between(y32, y64.float()))
        base = image_psnr(y64, pair.gt, degradation.crop_border)

        def shift(y: torch.Tensor, gt=pair.gt, base=base) -> float:
            """y's Y-PSNR against the ground truth minus the float64 run's (scored once per image)."""
            return image_psnr(y, gt, degradation.crop_border) - base

        report.quality_shift.append(shift(y32))
        report.codes_held.append(psnr_between(_run(model32, x, _hold(model32, log64)), y64.float()))
        if any(kind == "route" for kind in kinds.values()):
            report.routing_held.append(psnr_between(_run(model32, x, _hold(model32, log64, ("route",))), y64.float()))
        if first is not None:
            report.one_flip.append(_one_flip(model64, x.double(), first, y64, log64, kinds, shift))
    return report


def _one_flip(model64: nn.Module, x: torch.Tensor, site: str, y64: torch.Tensor,
              log64: dict[str, tuple[int, torch.Tensor, torch.Tensor]], kinds: dict[str, str],
              shift: Callable[[torch.Tensor], float]) -> FlipResponse:
    info: dict[str, float] = {"distance": float("nan")}
    log: dict = {}
    y = _run(model64, x, _flip_nearest(model64.get_submodule(_module_name(model64, site)), info), _record(model64, log))
    changed = {name: int((codes != log64[name][1]).sum()) for name, (_, codes, _) in log.items() if name != site}
    return FlipResponse(site, info["distance"], psnr_between(y.float(), y64.float()),
                        sum(n for name, n in changed.items() if kinds[name] == "act"),
                        sum(n for name, n in changed.items() if kinds[name] == "route"), shift(y))


def _module_name(model: nn.Module, site: str) -> str:
    """The module behind a site name (a DLS site's static quantizer is ``<site>.static``)."""
    names = dict(model.named_modules())
    return site if isinstance(names.get(site), ActQuant) else f"{site}.static"
