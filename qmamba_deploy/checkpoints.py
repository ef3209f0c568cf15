"""Checkpoints: read official and our own weights safely, detect the architecture, save.

- ``.pth``/``.pt``: ``torch.load(weights_only=True)`` only (nothing is
  unpickled beyond tensors and plain containers); BasicSR nesting
  (``params`` / ``params_ema``) and a ``module.`` prefix are unwrapped.
- ``.safetensors``: official layout or ours; ours carry a JSON manifest
  (``x.json`` beside ``x.safetensors``, also embedded in the file's metadata).
- Architecture detection reads the key set and tensor shapes, so a user can
  load an official checkpoint without knowing its constructor arguments.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open

from .artifacts import (
    atomic_path,
    jsonable,
    kind,
    make_manifest,
    manifest_path,
    save_safetensors,
    sha256_file,
    write_json,
)
from .errors import CheckpointError
from .models.card import ModelCard, card_of
from .models.registry import build_model, count_parameters, resolve_arch
from .quant import QConfig, quantize_model
from .quant.qconfig import split_official_quant_class

CHECKPOINT_KIND = kind("checkpoint")
_META_KEY = "qmamba_manifest"

StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike, prefer_ema: bool = False) -> tuple[StateDict, dict[str, Any] | None]:
    """(state_dict, manifest or None) from a .pth/.pt/.safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pth or .safetensors file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's concern
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a refused global: the file holds objects, maybe code
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path} holds Python objects beyond tensors{what}, which qmamba-deploy never unpickles; "
            f"pass a .pth saved with torch.save(model.state_dict()) or a .safetensors file") from None
    except Exception as exc:  # zip errors, truncated files
        raise CheckpointError(
            f"checkpoint {path} could not be read as a torch checkpoint ({_first_line(exc)}); "
            f"pass a .pth saved with torch.save of a state_dict, or a .safetensors file"
        ) from None
    return unwrap_state_dict(obj, source=str(path), prefer_ema=prefer_ema), None


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, Any] | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a valid safetensors file ({_first_line(exc)}); re-export or re-download it"
        ) from None
    manifest = None
    side = manifest_path(path)
    try:
        if side.is_file():
            manifest, where = json.loads(side.read_text()), side
        elif _META_KEY in metadata:
            manifest, where = json.loads(metadata[_META_KEY]), path
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"manifest {side if side.is_file() else path} is not valid JSON ({exc}); "
                              f"delete or fix it") from None
    if manifest is not None:
        _check_manifest(manifest, where)
    return unwrap_state_dict(sd, source=str(path)), manifest


def _check_manifest(manifest: Any, where: Path) -> None:
    """The fields load_model reads have the types it expects (else one sentence)."""
    problem = None
    if not isinstance(manifest, dict):
        problem = f"it is a JSON {type(manifest).__name__}, not an object"
    elif "arch" in manifest and not isinstance(manifest["arch"], str):
        problem = "'arch' is not a string"
    elif "kwargs" in manifest and not isinstance(manifest["kwargs"], dict):
        problem = "'kwargs' is not an object"
    elif manifest.get("qconfig") is not None and not isinstance(manifest["qconfig"], dict):
        problem = "'qconfig' is not an object"
    elif manifest.get("task") is not None and not isinstance(manifest["task"], dict):
        problem = "'task' is not an object"
    if problem:
        raise CheckpointError(f"manifest {where} is damaged ({problem}); delete it to load the weights alone, "
                              f"or re-save the checkpoint")


def unwrap_state_dict(obj: Any, source: str = "state_dict", prefer_ema: bool = False) -> StateDict:
    """The flat tensor dict inside a BasicSR / DDP / plain checkpoint object."""
    if isinstance(obj, Mapping):
        order = ("params_ema", "params") if prefer_ema else ("params", "params_ema")
        for key in order + ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} holds no state_dict (expected a dict of tensors, or BasicSR's 'params')")
    out: StateDict = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            raise CheckpointError(
                f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor; pass a plain state_dict")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def check_finite(tensors: Mapping[str, Any], source: str) -> None:
    """One CheckpointError naming the first tensor that holds NaN or infinity (float tensors and arrays)."""
    for key, value in tensors.items():
        t = value if torch.is_tensor(value) else torch.from_numpy(np.asarray(value, dtype=np.float64))
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor {key!r} holds {bad} NaN/infinite values of {t.numel()}; the "
                                  f"file is damaged or the training diverged: use another checkpoint")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- detection
@dataclass
class DetectedArch:
    """What the keys and shapes of a state_dict say about the network."""

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def scale(self) -> int:
        return int(self.kwargs.get("upscale", 1))


_V1_PROBE = "layers.0.residual_group.blocks.0.self_attention.A_logs"
_V2_PROBE = "layers.0.residual_group.layers.0.assm.selectiveScan.A_logs"
# a key inside a quantizer module: Q-MambaIR's names (…_act_quant, …_weight_quant, xs_q, …) and ours
_QUANT_KEY = re.compile(r"(^|\.)\w*(_act_quant|_weight_quant|_q)\.\w+$")


def is_quantized_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(_QUANT_KEY.search(k) for k in sd)


def float_state_dict(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The keys of the float network (every quantizer tensor removed)."""
    return {k: v for k, v in sd.items() if not _QUANT_KEY.search(k)}


def detect_qconfig(sd: Mapping[str, torch.Tensor], source: str = "state_dict"):
    """The QConfig of a Q-MambaIR checkpoint without a manifest (official ``QuantBL_L_MambaIR`` layout).

    Its bit width is not stored; the RFA anchors (2^b of them) give it.
    """

    anchors = {int(v.numel()) for k, v in sd.items() if re.search(r"_(weight_quant|weight_q)\.a$", k)}
    has_dls = any(k.endswith("xs_q.weight21") for k in sd)
    if len(anchors) != 1 or not has_dls:
        raise CheckpointError(
            f"{source} holds quantizer tensors but not in Q-MambaIR's layout (RFA anchors '*_weight_quant.a' of "
            f"one size and DLS scan quantizers 'xs_q.weight*'), and has no qmamba-deploy manifest saying how it "
            f"was quantized; save it with qmamba-deploy quantize, or pass the float checkpoint")
    n = anchors.pop()
    bits = n.bit_length() - 1
    if 2 ** bits != n or not 2 <= bits <= 8:
        raise CheckpointError(f"{source}: RFA anchors have {n} entries, not 2^b for b in 2..8")
    return QConfig("qmambair", w_bits=bits, a_bits=bits)


def detect_arch(sd: Mapping[str, torch.Tensor]) -> DetectedArch:
    """Infer the official class and constructor kwargs from keys and shapes (quantizer keys ignored)."""
    try:
        return _detect(float_state_dict(sd))
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError, OverflowError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        what = f"has no {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else f"has odd shapes ({exc})"
        raise CheckpointError(f"the state_dict looks like a MambaIR-family checkpoint but {what}; the file is "
                              f"damaged or a variant: pass arch= and its arguments explicitly") from None


def _detect(sd: Mapping[str, torch.Tensor]) -> DetectedArch:
    if "conv_first.weight" not in sd:
        raise CheckpointError(
            "the state_dict has no 'conv_first.weight', so it is not a MambaIR-family checkpoint; "
            "check the file, or pass arch= with the matching class")
    embed_dim, in_chans = sd["conv_first.weight"].shape[:2]
    common: dict[str, Any] = {"in_chans": int(in_chans), "embed_dim": int(embed_dim), "img_range": 1.0}
    common.update(_detect_tail(sd, int(embed_dim), int(in_chans)))
    if "patch_embed.norm.weight" not in sd:
        common["patch_norm"] = False
    if _V1_PROBE in sd:
        return _detect_v1(sd, common)
    if _V2_PROBE in sd:
        return _detect_v2(sd, common)
    raise CheckpointError(
        "the state_dict matches neither MambaIR (…blocks.0.self_attention.A_logs) nor MambaIRv2 "
        "(…layers.0.assm.selectiveScan.A_logs); pass arch= explicitly if it is a variant")


def _count(sd: Mapping[str, Any], pattern: str) -> list[int]:
    """Per group i, how many j make ``pattern.format(i=i, j=j)`` a key."""
    counts = []
    while pattern.format(i=len(counts), j=0) in sd:
        i = len(counts)
        j = 0
        while pattern.format(i=i, j=j) in sd:
            j += 1
        counts.append(j)
    return counts


def _ratio(hidden: int, dim: int) -> float:
    """The short decimal r with int(r * dim) == hidden (how option files write it)."""
    for digits in range(1, 6):
        r = round(hidden / dim, digits)
        if int(r * dim) == hidden:
            return r
    return hidden / dim


def _detect_tail(sd: Mapping[str, torch.Tensor], embed_dim: int, in_chans: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["resi_connection"] = "3conv" if "conv_after_body.0.weight" in sd else "1conv"
    if "conv_before_upsample.0.weight" in sd:
        num_feat = sd["conv_before_upsample.0.weight"].shape[0]
        convs = [k for k in sd if re.fullmatch(r"upsample\.\d+\.weight", k)]
        first = sd["upsample.0.weight"].shape[0]
        scale = 3 if first == 9 * num_feat else 2 ** len(convs)
        out.update(upsampler="pixelshuffle", upscale=scale)
    elif "upsample.0.weight" in sd:
        scale = int(round(math.sqrt(sd["upsample.0.weight"].shape[0] / in_chans)))
        out.update(upsampler="pixelshuffledirect", upscale=scale)
    else:
        out.update(upsampler="", upscale=1)
    return out


def _detect_v1(sd: Mapping[str, torch.Tensor], common: dict[str, Any]) -> DetectedArch:
    depths = _count(sd, "layers.{i}.residual_group.blocks.{j}.ln_1.weight")
    a_logs = sd[_V1_PROBE]
    d_inner = a_logs.shape[0] // 4
    kwargs = dict(common, depths=depths, d_state=int(a_logs.shape[1]),
                  mlp_ratio=_ratio(d_inner, common["embed_dim"]))
    notes = []
    if "layers.0.residual_group.blocks.0.conv_blk.cab.3.attention.1.weight" in sd:
        kwargs["legacy_light_cab"] = True
        notes.append("light-SR CAB layout published before 2024-11 (cab.0/cab.2/cab.3): loaded with "
                     "legacy_light_cab=True")
    return DetectedArch("MambaIR", kwargs, notes)


def _detect_v2(sd: Mapping[str, torch.Tensor], common: dict[str, Any]) -> DetectedArch:
    prefix = "layers.{i}.residual_group.layers.{j}."
    depths = _count(sd, prefix + "norm1.weight")
    heads = [int(sd[f"layers.{i}.residual_group.layers.0.win_mhsa.relative_position_bias_table"].shape[1])
             for i in range(len(depths))]
    table = sd["layers.0.residual_group.layers.0.win_mhsa.relative_position_bias_table"].shape[0]
    window = (int(round(math.sqrt(table))) + 1) // 2
    first = "layers.0.residual_group.layers.0."
    emb_a = sd[first + "embeddingA.weight"]
    hidden = sd[first + "assm.in_proj.0.weight"].shape[0]
    light = (first + "convffn1.sg.norm.weight") in sd
    kernel = 5 if light else int(sd[first + "convffn1.dwconv.depthwise_conv.0.weight"].shape[-1])
    kwargs = dict(common, depths=depths, num_heads=heads, window_size=window, d_state=int(emb_a.shape[1]),
                  inner_rank=int(emb_a.shape[0]), num_tokens=int(sd[first + "assm.embeddingB.weight"].shape[0]),
                  convffn_kernel_size=kernel, mlp_ratio=_ratio(hidden, common["embed_dim"]))
    return DetectedArch("MambaIRv2Light" if light else "MambaIRv2", kwargs)


# ----------------------------------------------------------------------------- loading
def load_model(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], arch: str | None = None,
               strict: bool = True, prefer_ema: bool = False, **kwargs: Any) -> nn.Module:
    """An eval-mode model with the checkpoint's weights.

    ``checkpoint``: a path (.pth/.pt/.safetensors) or a state_dict.
    ``arch``: an official class name or a preset; omitted, it comes from the
    checkpoint's manifest or is detected from the keys. ``kwargs`` override the
    constructor arguments (official ones, and ours such as routing=...).
    """
    if isinstance(checkpoint, Mapping):
        sd, manifest, source = unwrap_state_dict(checkpoint, prefer_ema=prefer_ema), None, "state_dict"
    else:
        sd, manifest = read_checkpoint(checkpoint, prefer_ema=prefer_ema)
        source = str(checkpoint)

    provenance: dict[str, Any] = {"checkpoint": source}
    official, given = arch, split_official_quant_class(arch, kwargs) if arch is not None else None
    if given is not None:  # QuantBL_L_MambaIR(k_bits=...): the float class plus its quantizers
        arch, kwargs, given_qconfig = given
    qconfig = None
    if manifest is not None and manifest.get("qconfig"):
        try:
            qconfig = QConfig.from_dict(manifest["qconfig"])
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{source}: its manifest's qconfig is not one qmamba-deploy knows ({exc}); "
                                  f"re-save the checkpoint") from None
    elif is_quantized_state_dict(sd):
        qconfig = detect_qconfig(sd, source)
        provenance["qconfig_from"] = "detected (Q-MambaIR layout)"
    if given is not None:
        if qconfig is not None and (qconfig.method, qconfig.w_bits, qconfig.a_bits) != (
                given_qconfig.method, given_qconfig.w_bits, given_qconfig.a_bits):
            raise CheckpointError(f"{source} holds a {qconfig.label} model but arch={official!r} was given "
                                  f"k_bits={given_qconfig.w_bits}; pass k_bits={qconfig.w_bits}, or omit arch")
        if qconfig is None:
            qconfig, provenance["qconfig_from"] = given_qconfig, "given (official class and k_bits)"
    if arch is None and manifest is not None and "arch" in manifest:
        arch, full = manifest["arch"], {**manifest.get("kwargs", {}), **kwargs}
        provenance["arch_from"] = "manifest"
    elif arch is None:
        detected = _detect_or_explain(sd, source)
        arch, full = detected.arch, {**detected.kwargs, **kwargs}
        provenance["arch_from"] = "detected"
    else:
        full = kwargs
        provenance["arch_from"] = "given"
    try:
        model = build_model(arch, **full)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot build {arch} for {source}: {exc}") from None
    if qconfig is not None:
        quantize_model(model, qconfig)
    check_state_dict(model, sd, source, strict=strict)
    check_finite(sd, source)
    model.load_state_dict(sd, strict=strict)
    model.card = model.card.replace(task=(manifest or {}).get("task"), provenance=provenance)
    return model.eval()


def _detect_or_explain(sd: Mapping[str, torch.Tensor], source: str) -> DetectedArch:
    try:
        return detect_arch(sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Raise one CheckpointError that names missing/unexpected/mis-shaped keys and the likely cause."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if not shapes and not (strict and (missing or unexpected)):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
    name = card_of(model).arch
    raise CheckpointError(f"{source} does not fit {name}: {', '.join(parts)}. {_suggest(sd, model)}")


def _suggest(sd: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    if is_quantized_state_dict(sd) and card_of(model).qconfig is None:
        return "The file holds quantizer tensors: it is a quantized (Q-MambaIR) checkpoint, not an FP one."
    if any(k.endswith("conv_blk.cab.3.attention.1.weight") for k in sd) and \
            not card_of(model).kwargs.get("legacy_light_cab"):
        return ("Its CAB keys (cab.0, cab.2, cab.3.attention) are the light MambaIR layout published before "
                "2024-11: pass legacy_light_cab=True, or omit arch to detect it.")
    try:
        detected = detect_arch(sd)
    except CheckpointError as exc:
        return f"The keys do not describe a known network ({exc})."
    return (f"Its keys describe {detected.arch}({_kwargs_text(detected.kwargs)}): omit arch to detect it, "
            f"or pass those arguments.")


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


# ------------------------------------------------------------------------------ saving
def save_checkpoint(model: nn.Module, path: str | os.PathLike, provenance: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``path`` (.safetensors) and its manifest ``path.with_suffix('.json')``.

    Both writes are atomic. Returns the manifest.
    """

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint path {path} must end in .safetensors")
    card = getattr(model, "card", None)
    if not isinstance(card, ModelCard):
        raise CheckpointError("the model has no ModelCard (model.card); build it with build_model() or load_model()")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fields = {"qconfig": card.qconfig.as_dict()} if card.qconfig is not None else {}
    manifest = make_manifest(CHECKPOINT_KIND, arch=card.arch, kwargs=jsonable(card.kwargs),
                             params=count_parameters(model), provenance=dict(provenance or {}),
                             **fields, **dict(extra or {}))
    with atomic_path(path) as tmp:
        save_safetensors(sd, tmp, metadata={"format": "pt", _META_KEY: json.dumps(manifest, sort_keys=True)})
    manifest["sha256"] = sha256_file(path)
    write_json(manifest_path(path), manifest)
    return manifest


__all__ = ["CheckpointError", "DetectedArch", "check_state_dict", "detect_arch", "load_model", "read_checkpoint",
           "resolve_arch", "save_checkpoint", "unwrap_state_dict"]
