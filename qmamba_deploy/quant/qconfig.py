"""QConfig: which quantizer goes where, at how many bits — one dataclass, saved in every manifest.

A method names a recipe (which quantizer for layer inputs, layer weights,
the out_proj input and the scan operands). Placement follows Q-MambaIR for
MambaIR and the analogous one for MambaIRv2 (shared/design/quantization.md):

* quantized: every Linear / Conv2d inside the residual groups (SS2D in_proj,
  depthwise conv, out_proj, CAB convs; MambaIRv2's wqkv, attention proj,
  ASSM in_proj / CPE / route / out_proj, FFN fc1 / fc2 / gate conv) and each
  group's closing conv (``layers.{i}.conv``); the x_proj / dt_proj products;
  every operand of the selective scan;
* float: conv_first, LayerNorms, channel-attention convs, conv_after_body,
  the reconstruction head, skip scales, the scan recurrence itself.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from ..errors import OptionError
from ..models.card import card_of
from ..models.layers import ChannelAttention
from ..models.mambair import SS2D
from ..models.mambairv2 import SelectiveScan
from ..models.scan_params import ACT_QUANT_POINTS, PROJ_QUANT_POINTS, SCAN_QUANT_POINTS
from .layers import QuantConv2d, QuantLinear
from .quantizers import DLS, LSQ, OBSERVERS, RFA, Observer, Quantizer
from .spr2q import BoundedQuant

QAT_METHODS = ("qmambair", "dls", "rfa", "lsq", "lsq+")
PTQ_METHODS = OBSERVERS
METHODS = QAT_METHODS + PTQ_METHODS  # what `quantize --method` offers
#: `quantize --method spr2q --spr2q-variant`: the full method and its ablations
SPR2Q_VARIANTS = ("group", "single", "plain", "bounds", "no-static")
# "spr2q" (RECIPES below) is the qconfig of a fused SPR²Q checkpoint; its job is qmamba_deploy.quant.spr2q


@dataclass(frozen=True)
class Recipe:
    act: str  # input activations of Linear / Conv2d and of the projections
    weight: str
    out_proj_act: str  # the SSM output entering out_proj
    scan: str  # every scan operand
    qat: bool
    description: str


RECIPES: dict[str, Recipe] = {
    "qmambair": Recipe("lsq+", "rfa", "dls", "dls", True, "Q-MambaIR: DLS on out_proj input and scan operands, "
                                                        "RFA weights, LSQ+ elsewhere"),
    "dls": Recipe("lsq+", "lsq", "dls", "dls", True, "ablation: DLS only (LSQ weights)"),
    "rfa": Recipe("lsq+", "rfa", "lsq+", "lsq+", True, "ablation: RFA only (LSQ+ activations everywhere)"),
    "lsq": Recipe("lsq", "lsq", "lsq", "lsq", True, "LSQ (Esser et al.) everywhere"),
    "lsq+": Recipe("lsq+", "lsq", "lsq+", "lsq+", True, "LSQ+ activations (learnable offset), LSQ weights"),
    **{m: Recipe(m, m, m, m, False, f"PTQ, {m} observers, symmetric") for m in OBSERVERS},
    "spr2q": Recipe("bounded", "bounded", "bounded", "bounded", True,
                    "SPR²Q: learnable-bounds quantizers; rectifier groups fused into the weights"),
}


#: ``--w-granularity``: one weight step size per tensor (the papers) or per output channel
W_GRANULARITIES = ("tensor", "channel")
#: weight quantizer kinds that can keep one step size per output channel
PER_CHANNEL_KINDS = ("lsq", "rfa", *OBSERVERS)


def make_quantizer(kind: str, bits: int, weight: bool = False, channels: int = 1, axis: int = 0) -> nn.Module:
    """A quantizer of ``kind``; ``channels`` > 1 gives a weight quantizer one step size per output
    channel along ``axis`` of the weight."""
    if channels > 1 and kind not in PER_CHANNEL_KINDS:
        raise OptionError(f"--w-granularity channel: {kind} quantizers have one step size per tensor; use a method "
                          f"whose weights use {', '.join(PER_CHANNEL_KINDS)}")
    if kind == "lsq":
        return LSQ(bits, offset=False, signed=True if weight else None, channels=channels, axis=axis)
    if kind == "lsq+":
        return LSQ(bits, offset=True)
    if kind == "dls":
        return DLS(bits)
    if kind == "rfa":
        return RFA(bits, channels=channels, axis=axis)
    if kind in OBSERVERS:
        return Observer(bits, kind, signed=True if weight else None, channels=channels, axis=axis)
    if kind == "bounded":
        return BoundedQuant(bits)
    raise ValueError(f"quantizer kind {kind!r} is unknown")


@dataclass(frozen=True)
class QConfig:
    """What to quantize and how. ``keep_fp`` / ``overrides`` match module names with fnmatch."""

    method: str = "qmambair"
    w_bits: int = 4
    a_bits: int = 4
    scan_bits: int | None = None  # default: a_bits
    quantize_scan: bool = True
    keep_fp: tuple[str, ...] = ()
    overrides: tuple[tuple[str, int, int], ...] = field(default_factory=tuple)  # (pattern, w_bits, a_bits)
    w_granularity: str = "tensor"  # weight step sizes: per tensor, or per output channel

    def __post_init__(self):
        if self.method not in RECIPES:
            raise OptionError(f"--method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if self.w_granularity not in W_GRANULARITIES:
            raise OptionError(f"--w-granularity {self.w_granularity!r} is unknown; use {' or '.join(W_GRANULARITIES)}")
        if self.w_granularity == "channel" and RECIPES[self.method].weight not in PER_CHANNEL_KINDS:
            raise OptionError(f"--w-granularity channel does not apply to --method {self.method} (its weight "
                              f"quantizers keep one step size per tensor)")
        for flag, bits in (("--w-bits", self.w_bits), ("--a-bits", self.a_bits),
                           ("--scan-bits", self.scan_bits if self.scan_bits is not None else self.a_bits)):
            if not 2 <= int(bits) <= 8:
                raise OptionError(f"{flag} {bits} is out of range; use 2 to 8 bits")

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.method]

    @property
    def label(self) -> str:
        return f"{self.method} W{self.w_bits}A{self.a_bits}" + (" per-channel" if self.per_channel else "")

    @property
    def per_channel(self) -> bool:
        return self.w_granularity == "channel"

    def bits_for(self, name: str) -> tuple[int, int]:
        w, a = self.w_bits, self.a_bits
        for pattern, ow, oa in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                w, a = ow, oa
        return w, a

    def is_fp(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.keep_fp)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_fp"], d["overrides"] = list(self.keep_fp), [list(o) for o in self.overrides]
        if not self.per_channel:  # the papers' default: manifests read as before
            del d["w_granularity"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QConfig:
        d = dict(d)
        d["keep_fp"] = tuple(d.get("keep_fp", ()))
        d["overrides"] = tuple(tuple(o) for o in d.get("overrides", ()))
        return cls(**d)


# --------------------------------------------------------------------------- placement


def _channel_attention_names(model: nn.Module) -> set[str]:
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, ChannelAttention):
            out.update(f"{name}.{sub}" if sub else name for sub, _ in m.named_modules())
    return out


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Linear / Conv2d modules the default placement quantizes (see the module docstring)."""
    skip = _channel_attention_names(model)
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and n.startswith("layers.") and n not in skip]


def scan_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (SS2D, SelectiveScan))]


#: How ``layer_groups`` groups the quantized modules: by what they are (the same layer in every block)
#: or by where they are (every quantized module of one residual group).
GROUPINGS = ("kind", "block")


def activation_quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """The quantizers placed on activations, in module order: the inputs of quantized Linear and Conv2d
    layers, of the scan's projections and the scan's live operands (not weights, not parameters)."""
    scans = {id(m) for _, m in scan_modules(model)}
    out = []
    for name, m in model.named_modules():
        points = (("linear_act_quant",) if isinstance(m, QuantLinear) else ("conv_act_quant",)
                  if isinstance(m, QuantConv2d) else ACT_QUANT_POINTS if id(m) in scans else ())
        out += [(f"{name}.{p}", m._modules[p]) for p in points if isinstance(m._modules.get(p), Quantizer)]
    return out


def layer_groups(model: nn.Module, by: str = "kind") -> dict[str, list[str]]:
    """The modules the placement quantizes (layers and scans, as ``keep_fp`` / ``overrides`` name them),
    grouped: ``kind`` -> ``layers.*.residual_group.layers.*.wqkv`` (block indices as ``*``), ``block``
    -> ``layers.0.*``. Keys are fnmatch patterns, several joined by ``|`` where ``*`` would also match
    another group's module (it matches dots too): digits as ``[0-9]``, else the names themselves."""
    if by not in GROUPINGS:
        raise OptionError(f"--by {by!r} is unknown; use {' or '.join(GROUPINGS)}")
    names = quantized_layer_names(model) + [n for n, _ in scan_modules(model)]
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = (".".join("*" if p.isdigit() else p for p in parts) if by == "kind"
               else ".".join(parts[:2]) + ".*")
        groups.setdefault(key, []).append(name)
    def exact(key: str, members: list[str]) -> bool:
        return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in group_patterns(key))} == set(members)

    out = {}
    for key, members in groups.items():
        digits = "|".join(sorted({re.sub(r"\d", "[0-9]", n) for n in members}))
        out[next(k for k in (key, digits, "|".join(members)) if exact(k, members))] = members
    return out


def group_patterns(key: str) -> tuple[str, ...]:
    """The fnmatch patterns of one ``layer_groups`` key."""
    return tuple(key.split("|"))


#: Official class names of quantized networks -> (the float class they extend, the method of their
#: quantizers). Their constructor's ``k_bits`` is the bit width of weights and activations alike.
OFFICIAL_QUANT_CLASSES: dict[str, tuple[str, str]] = {"QuantBL_L_MambaIR": ("MambaIR", "qmambair")}


def split_official_quant_class(arch: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], QConfig] | None:
    """``QuantBL_L_MambaIR`` + kwargs with ``k_bits`` -> (float class, the other kwargs, the QConfig the
    official constructor builds); None for any other name."""
    if arch not in OFFICIAL_QUANT_CLASSES:
        return None
    float_arch, method = OFFICIAL_QUANT_CLASSES[arch]
    rest = dict(kwargs)
    bits = rest.pop("k_bits", None)
    if bits is None:
        raise OptionError(f"{arch} needs its official k_bits argument (the bit width of weights and activations), "
                          f"e.g. k_bits=4")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise OptionError(f"{arch}: k_bits={bits!r} is not an integer; use 2 to 8")
    return float_arch, rest, QConfig(method, w_bits=bits, a_bits=bits)


def _check_patterns(model: nn.Module, qconfig: QConfig) -> None:
    """Every keep_fp / override pattern names at least one module the placement quantizes: a pattern that
    matches nothing (a typo, or a policy measured on another architecture) would silently change nothing."""
    names = quantized_layer_names(model) + [n for n, _ in scan_modules(model)]
    rules = [("--keep-fp", p) for p in qconfig.keep_fp] + [("--layer-bits", o[0]) for o in qconfig.overrides]
    for flag, pattern in rules:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            example = next((n for n in names if "layers." in n), names[0] if names else "(none)")
            raise OptionError(f"{flag} / policy pattern {pattern!r} matches no module this {type(model).__name__} "
                              f"quantizes (they are named like {example!r}); fix the pattern or use a policy "
                              f"measured on this architecture")


def quantize_model(model: nn.Module, qconfig: QConfig) -> nn.Module:
    """Insert the quantizers of ``qconfig`` into ``model`` in place; returns it (its card's qconfig set).

    Float weights are kept: the quantized model starts from the float one
    and its state_dict is the float keys plus the quantizer keys.
    """
    if card_of(model).qconfig is not None:
        raise ValueError("the model is already quantized")
    _check_patterns(model, qconfig)
    r = qconfig.recipe
    for name in quantized_layer_names(model):
        if qconfig.is_fp(name):
            continue
        m = model.get_submodule(name)
        w_bits, a_bits = qconfig.bits_for(name)
        act_kind = r.out_proj_act if name.endswith("out_proj") else r.act
        cls: Callable = QuantLinear.from_float if isinstance(m, nn.Linear) else QuantConv2d.from_float
        out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        wq = make_quantizer(r.weight, w_bits, True, channels=out if qconfig.per_channel else 1, axis=0)
        model.set_submodule(name, cls(m, make_quantizer(act_kind, a_bits), wq))
    for name, m in scan_modules(model):
        if qconfig.is_fp(name):
            continue
        w_bits, a_bits = qconfig.bits_for(name)
        act_q, w_q, dt_act_q, dt_w_q = PROJ_QUANT_POINTS
        # The scan's projection weights keep one step size even with --w-granularity channel: they are
        # batched (K, in, out) MatMul operands, whose per-channel DequantizeLinear ONNX Runtime's
        # integer MatMul fusion refuses ("b zero point is not valid"); they are 2 % of the weights.
        for point, kind, bits, weight in ((act_q, r.act, a_bits, False), (w_q, r.weight, w_bits, True),
                                          (dt_act_q, r.act, a_bits, False), (dt_w_q, r.weight, w_bits, True)):
            m.add_module(point, make_quantizer(kind, bits, weight).to(m.x_proj_weight.device))
        if qconfig.quantize_scan:
            s_bits = qconfig.scan_bits if qconfig.scan_bits is not None else a_bits
            for point in SCAN_QUANT_POINTS:
                m.add_module(point, make_quantizer(r.scan, s_bits).to(m.x_proj_weight.device))
    model.card = card_of(model).replace(qconfig=qconfig)
    return model
