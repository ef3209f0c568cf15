"""Fold: a fake-quant model -> a deploy bundle (static integer weights, scales, a manifest).

:func:`fold` walks the quantized sites of a model (QuantLinear / QuantConv2d and the
scan modules), turns every quantizer into its deploy form (:mod:`qmamba_deploy.quant.deploy`)
and returns a *deploy model*: the float architecture with integer weights, constant
scales, explicit offsets and the scan's parameter operands precomputed. Its output
equals the fake-quant model's (bit-exact for LSQ, RFA and PTQ weights; within float
rounding where an offset is re-expressed) — with DLS in ``dynamic`` mode; ``static``
mode replaces each DLS by the α, β that :func:`calibrate_dls` freezes.

A bundle on disk is ``bundle.safetensors`` (the deploy model's tensors, every integer
weight packed at its real bit width: four 2-bit or two 4-bit values per byte) and
``bundle.json`` (the manifest: architecture, qconfig, one entry per site with its
bits, grids and scales, the DLS calibration, sizes against FP32, checksums, tool
versions). :func:`load_bundle` rebuilds the deploy model from the two files alone.
The structure is rebuilt by the same :func:`convert` that fold uses, from the specs.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from .artifacts import (
    atomic_path,
    is_kind,
    jsonable,
    kind,
    make_manifest,
    manifest_path,
    save_safetensors,
    sha256_file,
    write_json,
)
from .checkpoints import check_finite, float_state_dict
from .errors import CheckpointError, OptionError
from .models import ModelCard, build_model
from .models.registry import count_parameters
from .models.routing import routing_mode
from .models.scan_params import PARAM_POINTS, PROJ_QUANT_POINTS, SCAN_QUANT_POINTS, quant_point
from .quant import QConfig
from .quant.deploy import (
    ActQuant,
    DeployConv2d,
    DeployLinear,
    DLSAct,
    FoldedWeight,
    act_from_spec,
    set_dls_mode,
    weight_from_spec,
)
from .quant.layers import QuantConv2d, QuantLinear
from .quant.qconfig import scan_modules
from .quant.quantizers import Quantizer, WeightCodes

BUNDLE_KIND = kind("bundle")
BUNDLE_NAME = "bundle.safetensors"
_META_KEY = "qmamba_deploy_bundle"
PACKABLE_BITS = (2, 4, 8)
#: (weight point, parameter, permutation into the stored [..., in, out] layout)
WEIGHT_POINTS = (("x_proj_weight_q", "x_proj_weight", (0, 2, 1)), ("dt_proj_weight_q", "dt_projs_weight", (0, 2, 1)))

__all__ = ["fold", "convert", "calibrate_dls", "save_bundle", "load_bundle", "pack_bits", "unpack_bits",
           "BUNDLE_KIND", "BUNDLE_NAME"]


# ------------------------------------------------------------------------ quantizer -> codes


def weight_codes(wq: nn.Module, w: torch.Tensor) -> WeightCodes:
    """The deploy form of a weight quantizer: ŵ = scale·q + offset exactly as ``wq`` quantizes ``w``."""
    if not isinstance(wq, Quantizer):
        raise CheckpointError(f"weight quantizer {type(wq).__name__} is not foldable")
    return wq.weight_codes(w)


def act_quantizer(aq: nn.Module) -> nn.Module:
    """The deploy form of an activation quantizer (values filled in); an unquantized input stays as is."""
    if isinstance(aq, nn.Identity):
        return aq
    if not isinstance(aq, Quantizer):
        raise CheckpointError(f"activation quantizer {type(aq).__name__} is not foldable")
    return aq.deploy_act()


# ------------------------------------------------------------------------ sites and specs


def _points(m: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    return {n: m._modules[n] for n in names if n in m._modules}


@dataclass(frozen=True)
class LayerSpec:
    """A quantized Linear / Conv2d site as the bundle manifest records it (``as_dict`` is the JSON)."""

    name: str
    kind: str                     # "linear" | "conv2d"
    act: dict[str, Any] | None    # the activation deploy module's spec (None: the input stays float)
    weight: dict[str, Any]        # the FoldedWeight's spec
    bias: bool
    in_: int
    out: int
    conv: dict[str, Any] | None = None  # kernel, stride, padding, dilation, groups

    @classmethod
    def of(cls, name: str, m: nn.Module, act: nn.Module, weight: FoldedWeight) -> LayerSpec:
        act_spec = act.spec() if hasattr(act, "spec") else None
        if isinstance(m, nn.Linear):
            return cls(name, "linear", act_spec, weight.spec(), m.bias is not None, m.in_features, m.out_features)
        conv = {"kernel": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups}
        return cls(name, "conv2d", act_spec, weight.spec(), m.bias is not None, m.in_channels, m.out_channels, conv)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "act": self.act, "weight": self.weight, "bias": self.bias, "kind": self.kind,
                "in": self.in_, "out": self.out, **(self.conv or {})}

    def module(self) -> nn.Module:
        """The deploy layer of this site (values zero until loaded or filled)."""
        act, weight = act_from_spec(self.act), weight_from_spec(self.weight)
        if self.kind == "linear":
            return DeployLinear(self.in_, self.out, self.bias, act, weight)
        c = self.conv
        return DeployConv2d(self.in_, self.out, c["kernel"], c["stride"], c["padding"], c["dilation"], c["groups"],
                            self.bias, act, weight)


@dataclass(frozen=True)
class ScanSpec:
    """A scan module's deploy points (folded weights, activation quantizers) and folded parameters."""

    name: str
    points: dict[str, dict[str, Any]]   # point -> {"weight": spec} | {"act": spec or None}
    folded_params: list[str]
    kind: str = "scan"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "points": self.points, "folded_params": self.folded_params}


SiteSpec = LayerSpec | ScanSpec


def site_spec(d: dict[str, Any]) -> SiteSpec:
    """A site spec from its JSON form (a bundle manifest's ``sites`` entry)."""
    if d["kind"] == "scan":
        return ScanSpec(d["name"], d["points"], list(d.get("folded_params", [])))
    conv = {k: d[k] for k in ("kernel", "stride", "padding", "dilation", "groups")} if d["kind"] == "conv2d" else None
    if d["kind"] not in ("linear", "conv2d"):
        raise ValueError(f"site {d.get('name')!r} has kind {d['kind']!r}")
    return LayerSpec(d["name"], d["kind"], d["act"], d["weight"], bool(d["bias"]), int(d["in"]), int(d["out"]), conv)


def _fold_layer(name: str, m: nn.Module) -> tuple[LayerSpec, nn.Module]:
    linear = isinstance(m, QuantLinear)
    aq = m.linear_act_quant if linear else m.conv_act_quant
    wq = m.linear_weight_quant if linear else m.conv_weight_quant
    w = m.weight.detach().float()
    # Linear: the [in, out] MatMul operand (output channels on axis 1); Conv: as it is (axis 0)
    weight = _fold_weight(name, wq, w, (lambda t: t.t()) if linear else (lambda t: t), axis=1 if linear else 0)
    act = act_quantizer(aq)
    spec = LayerSpec.of(name, m, act, weight)
    deploy = spec.module()
    deploy.act, deploy.weight = act, weight
    if m.bias is not None:
        deploy.bias.data.copy_(m.bias.detach())
    return spec, deploy


def _fold_weight(name: str, wq: nn.Module, w: torch.Tensor, to_layout: Callable[[torch.Tensor], torch.Tensor],
                 axis: int) -> FoldedWeight:
    """The deploy form of weight ``w`` under quantizer ``wq``: its codes (taken in the layout the
    quantizer was trained on, so per-channel step sizes meet their channels) moved into the stored
    layout, whose output-channel axis is ``axis``; checked against the fake-quant weight."""
    codes = weight_codes(wq, w)
    q = to_layout(codes.q)
    weight = FoldedWeight(tuple(q.shape), codes.bits, axis=axis, per_channel=codes.per_channel,
                          has_offset=bool(codes.offset != 0))
    weight.q.copy_(q)
    weight.scale.copy_(codes.scale)
    weight.offset.copy_(codes.offset)
    _check_weight(name, weight, to_layout(wq.eval()(w)), w)
    return weight


def _check_weight(name: str, weight: FoldedWeight, expected: torch.Tensor, w: torch.Tensor) -> None:
    """The folded weight must reproduce the fake-quant weight (guards the codes above)."""
    with torch.no_grad():
        err = (weight.value() - expected).abs().max().item()
    tol = 1e-6 * max(1.0, w.abs().max().item())
    if not err <= tol:
        raise CheckpointError(f"{name}: the folded weight differs from the fake-quant one by {err:.3g}; "
                              f"this quantizer state cannot be folded exactly")


@torch.no_grad()
def _fold_scan(name: str, m: nn.Module) -> tuple[ScanSpec, dict[str, torch.Tensor], dict[str, nn.Module]]:
    """Spec, folded parameter values (A, Ds, dt_projs_bias) and deploy point modules of a scan module."""

    for point in PROJ_QUANT_POINTS + SCAN_QUANT_POINTS:
        q = m._modules.get(point)
        if q is not None:
            q.eval()
    values = {
        "A": quant_point(m, "As_q", -torch.exp(m.A_logs.detach().float())),
        "Ds": quant_point(m, "Ds_q", m.Ds.detach().float()),
        "dt_projs_bias": quant_point(m, "dt_projs_bias_q",
                                     m.dt_projs_bias.detach().float().reshape(-1)).reshape(m.dt_projs_bias.shape),
    }
    points: dict[str, nn.Module] = {}
    spec_points: dict[str, Any] = {}
    for point, param, perm in WEIGHT_POINTS:
        wq = m._modules.get(point)
        if wq is None:
            continue
        # the quantizer sees the weight as the MatMul operand (K, in, out), the stored layout
        w = getattr(m, param).detach().float().permute(*perm)
        weight = _fold_weight(f"{name}.{point}", wq, w, lambda t: t, axis=w.dim() - 1)
        points[point] = weight
        spec_points[point] = {"weight": weight.spec()}
    for point in PROJ_QUANT_POINTS + SCAN_QUANT_POINTS:
        if point in points or point in PARAM_POINTS or point not in m._modules:
            continue
        act = act_quantizer(m._modules[point])
        points[point] = act
        spec_points[point] = {"act": act.spec() if hasattr(act, "spec") else None}
    spec = ScanSpec(name, spec_points, sorted(p for p in PARAM_POINTS if p in m._modules))
    return spec, values, points


def convert(model: nn.Module, specs: list[SiteSpec]) -> nn.Module:
    """Turn a float model into the deploy structure of ``specs`` (in place; values zero).

    Quantized layers become DeployLinear / DeployConv2d; each scan module gets its
    deploy points, a precomputed ``A`` buffer instead of ``A_logs``, and loses the
    projection weights that live in folded form.
    """
    for spec in specs:
        if isinstance(spec, LayerSpec):
            model.set_submodule(spec.name, spec.module())
            continue
        m = model.get_submodule(spec.name)
        for point in PARAM_POINTS:
            m._modules.pop(point, None)
        a_shape = m.A_logs.shape
        del m.A_logs
        m.register_buffer("A", torch.zeros(a_shape))
        for point, param, _ in WEIGHT_POINTS:
            if "weight" in spec.points.get(point, {}):
                delattr(m, param)
                m.add_module(point, weight_from_spec(spec.points[point]["weight"]))
        for point, entry in spec.points.items():
            if "act" in entry:
                m.add_module(point, act_from_spec(entry["act"]))
    model.deploy_specs = specs
    return model


def _fresh_float(model: nn.Module) -> nn.Module:
    card = getattr(model, "card", None)
    if not isinstance(card, ModelCard):
        raise CheckpointError("the model has no ModelCard (model.card); load it with load_model() before folding")
    fresh = build_model(card.arch, **card.kwargs)
    fresh.load_state_dict(float_state_dict(model.state_dict()), strict=True)
    return fresh


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """The deploy model of a fake-quant (or float) model; DLS sites start in ``dynamic`` mode.

    Raises CheckpointError for a quantizer that is not initialised or cannot be folded
    (an SPR²Q model whose rectifiers were never fused, for instance).
    """
    model = model.eval()
    specs: list[SiteSpec] = []
    folded_layers: dict[str, nn.Module] = {}
    scans: dict[str, tuple[dict[str, torch.Tensor], dict[str, nn.Module]]] = {}
    covered: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            if any("rectifier" in n for n, _ in m.named_children()):
                raise CheckpointError(f"{name} still has SPR²Q rectifiers; fuse them first "
                                      f"(quantize --method spr2q fuses them at the end)")
            spec, folded_layers[name] = _fold_layer(name, m)
            specs.append(spec)
            covered.update(id(q) for q in m.modules() if isinstance(q, Quantizer))
    for name, m in scan_modules(model):
        spec, values, points = _fold_scan(name, m)
        specs.append(spec)
        scans[name] = (values, points)
        covered.update(id(q) for q in m.modules() if isinstance(q, Quantizer))
    stray = [n for n, q in model.named_modules() if isinstance(q, Quantizer) and id(q) not in covered]
    if stray:
        raise CheckpointError(f"quantizers outside the known sites cannot be folded: {', '.join(stray[:3])}")

    deploy = convert(_fresh_float(model), specs)
    for name, layer in folded_layers.items():
        deploy.set_submodule(name, layer)
    for name, (values, points) in scans.items():
        m = deploy.get_submodule(name)
        m.A.copy_(values["A"])
        m.Ds.data.copy_(values["Ds"])
        m.dt_projs_bias.data.copy_(values["dt_projs_bias"])
        for point, module in points.items():
            m.add_module(point, module)
    deploy.card = model.card
    deploy.dls_calibration = None
    return deploy.eval().requires_grad_(False)


# ------------------------------------------------------------------------ static DLS


STATIC_DLS_STATISTIC = "mean"


@torch.no_grad()
def calibrate_dls(deploy: nn.Module, batches: Iterable[torch.Tensor], source: str = "") -> dict[str, Any] | None:
    """Freeze every DLS site's α, β for ``--dls static``: the mean of its live values over ``batches``.

    Returns the calibration record (also stored on the model), or None when the
    model has no DLS activation.
    """

    sites = [(n, m) for n, m in deploy.named_modules() if isinstance(m, DLSAct)]
    if not sites:
        return None
    modes = {n: m.mode for n, m in sites}
    for _, m in sites:
        m.mode, m.recording = "dynamic", []
    count = 0
    try:
        with routing_mode(deploy, "deterministic"):
            for x in batches:
                deploy(x)
                count += 1
    finally:
        for n, m in sites:
            seen, m.recording = m.recording, None
            m.mode = modes[n]
            if seen:
                alphas, betas = zip(*seen)
                m.static.set(statistics.fmean(alphas), statistics.fmean(betas))
    if count == 0:
        raise OptionError("DLS calibration got no images; pass at least one calibration batch")
    deploy.dls_calibration = {"statistic": STATIC_DLS_STATISTIC, "batches": count, "source": source,
                              "sites": len(sites)}
    return deploy.dls_calibration


# ------------------------------------------------------------------------ bundle I/O


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed b-bit codes (int8) -> uint8 bytes, 8/b codes per byte, first code in the low bits."""
    if bits not in PACKABLE_BITS:
        raise OptionError(f"{bits}-bit weights cannot be packed; bundles store 2, 4 or 8 bits")
    half = 2 ** (bits - 1)
    flat = q.flatten().to(torch.int16)
    if flat.numel() and (int(flat.min()) < -half or int(flat.max()) > half - 1):
        raise ValueError(f"codes out of the signed {bits}-bit range")
    u = (flat + half).to(torch.uint8)
    per = 8 // bits
    pad = (-u.numel()) % per
    u = torch.cat([u, u.new_zeros(pad)]).reshape(-1, per).to(torch.int32)
    packed = torch.zeros(u.shape[0], dtype=torch.int32)
    for i in range(per):
        packed |= u[:, i] << (i * bits)
    return packed.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    per, half = 8 // bits, 2 ** (bits - 1)
    p = packed.to(torch.int32)
    codes = torch.stack([(p >> (i * bits)) & ((1 << bits) - 1) for i in range(per)], dim=1).flatten()
    n = int(np.prod(shape)) if shape else 1
    return (codes[:n] - half).to(torch.int8).reshape(shape)


def _storage_bits(bits: int) -> int:
    return next(b for b in PACKABLE_BITS if b >= bits)


def _bundle_tensors(deploy: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, Any]] = {}
    folded = {f"{n}.q": m for n, m in deploy.named_modules() if isinstance(m, FoldedWeight)}
    for key, value in deploy.state_dict().items():
        value = value.detach().contiguous().cpu()
        if key in folded:
            bits = _storage_bits(folded[key].bits)
            tensors[key + "_packed"] = pack_bits(value, bits)
            packed[key] = {"bits": folded[key].bits, "storage_bits": bits, "shape": list(value.shape)}
        else:
            tensors[key] = value
    return tensors, packed


def _site_values(deploy: nn.Module) -> dict[str, dict[str, float]]:
    """Every scale and offset, by module name (a copy of the tensors, for people and diff tools)."""
    out: dict[str, dict[str, float]] = {}
    for name, m in deploy.named_modules():
        if isinstance(m, FoldedWeight):
            scale = m.scale.tolist()
            out[name] = {"scale": scale, "offset": float(m.offset), "bits": m.bits}
        elif isinstance(m, ActQuant):
            out[name] = {"scale": float(m.scale), "offset": float(m.offset), "grid": [m.qmin, m.qmax], "bits": m.bits}
    return out


def _sizes(deploy: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Bundle bytes against the FP32 parameters they replace (the papers' storage figure).

    ``weight_bytes`` counts what stands for parameters (packed integer weights, scales,
    float parameters, the precomputed A) and leaves out the buffers the float model
    carries as well (e.g. MambaIRv2's relative position index); ``bundle_tensor_bytes``
    is everything.
    """

    reference = build_model(deploy.card.arch, **deploy.card.kwargs)
    shared_buffers = {n for n, _ in reference.named_buffers()}
    fp32 = 4 * count_parameters(reference)
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    weights = sum(b for k, b in nbytes.items() if k not in shared_buffers)
    return {"weight_bytes": weights, "bundle_tensor_bytes": sum(nbytes.values()), "fp32_param_bytes": fp32,
            "change_vs_fp32": round(weights / fp32 - 1.0, 4)}


def save_bundle(deploy: nn.Module, out_dir: str | os.PathLike, provenance: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Write ``out_dir/bundle.safetensors`` and ``bundle.json`` (atomically); returns the manifest."""


    path = Path(out_dir) / BUNDLE_NAME
    tensors, packed = _bundle_tensors(deploy)
    card = deploy.card
    manifest = make_manifest(
        BUNDLE_KIND, arch=card.arch, kwargs=jsonable(card.kwargs),
        qconfig=card.qconfig.as_dict() if card.qconfig is not None else None,
        task=card.task, sites=[spec.as_dict() for spec in deploy.deploy_specs], packed=packed,
        values=_site_values(deploy),
        dls_calibration=getattr(deploy, "dls_calibration", None),
        size=_sizes(deploy, tensors),
        provenance=dict(provenance or {}),
    )
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata={"format": "pt", _META_KEY: json.dumps(manifest, sort_keys=True)})
    manifest["sha256"] = sha256_file(path)
    write_json(manifest_path(path), manifest)
    return manifest


def load_bundle(path: str | os.PathLike) -> nn.Module:
    """The deploy model of a bundle (``bundle.safetensors`` or its folder); DLS in ``dynamic`` mode."""


    path = Path(path)
    if path.is_dir():
        path = path / BUNDLE_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is not a bundle file; pass the bundle.safetensors that `fold` wrote "
                              f"(or its folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        manifest = json.loads(meta[_META_KEY])
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path} is not a readable deploy bundle ({exc}); re-run `qmamba-deploy fold`") from None
    if not isinstance(manifest, dict) or not is_kind(manifest.get("kind"), "bundle"):
        kind = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path} is a {kind!r}, not a deploy bundle")
    check_finite(tensors, str(path))
    try:
        if not isinstance(manifest.get("kwargs"), dict) or not isinstance(manifest.get("arch"), str):
            raise ValueError("its manifest has no architecture name and argument dict")
        model = convert(build_model(manifest["arch"], **manifest["kwargs"]), [site_spec(d) for d in manifest["sites"]])
        state: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if key.endswith(".q_packed"):
                info = manifest["packed"][key[: -len("_packed")]]
                state[key[: -len("_packed")]] = unpack_bits(value, info["storage_bits"], tuple(info["shape"]))
            else:
                state[key] = value
        model.load_state_dict(state, strict=True)
        qconfig = QConfig.from_dict(manifest["qconfig"]) if manifest.get("qconfig") else None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: the bundle does not describe a model that can be built ({text}); "
                              f"re-run `qmamba-deploy fold`") from None
    model.card = model.card.replace(task=manifest.get("task"), qconfig=qconfig, provenance={"bundle": str(path)})
    model.dls_calibration = manifest.get("dls_calibration")
    return model.eval().requires_grad_(False)


def with_dls_mode(deploy: nn.Module, mode: str) -> nn.Module:
    """A copy of ``deploy`` with every DLS site in ``mode``; static needs a calibrated bundle."""
    if mode == "static" and any(isinstance(m, DLSAct) for m in deploy.modules()) and not deploy.dls_calibration:
        raise OptionError("--dls static needs DLS calibration; fold with calibration images (the default) "
                          "or use --dls dynamic")
    out = copy.deepcopy(deploy)
    set_dls_mode(out, mode)
    return out
