"""Architecture registry: official class names and named presets.

``build_model("MambaIRv2Light", **kwargs_from_official_yml)`` and
``build_model("mambairv2-light-x4")`` both work. Presets cover every released
configuration of the official repositories (options/test/*.yml); their
parameter counts are pinned by the tests.
"""

from __future__ import annotations

import difflib
import inspect
import reprlib
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .card import ModelCard
from .mambair import MambaIR
from .mambairv2 import MambaIRv2, MambaIRv2Light

#: Official class name -> our implementation.
ARCHS: dict[str, type[nn.Module]] = {
    "MambaIR": MambaIR,
    "MambaIRv2": MambaIRv2,
    "MambaIRv2Light": MambaIRv2Light,
}


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    task: str = "sr"  # sr | denoise | jpeg
    description: str = ""


def _mambair(scale: int, *, light: bool) -> dict[str, Any]:
    if light:
        return dict(upscale=scale, in_chans=3, img_size=64, img_range=1.0, d_state=10, depths=[6, 6, 6, 6],
                    embed_dim=60, mlp_ratio=1.2, upsampler="pixelshuffledirect", resi_connection="1conv")
    return dict(upscale=scale, in_chans=3, img_size=64, img_range=1.0, d_state=16, depths=[6] * 6,
                embed_dim=180, mlp_ratio=2.0, upsampler="pixelshuffle", resi_connection="1conv")


_V2_SIZES = {
    # name: embed_dim, d_state, depths, heads, inner_rank, num_tokens, mlp_ratio
    "light": (48, 8, [5] * 4, [4] * 4, 32, 64, 1.0),
    "s": (132, 16, [4] * 6, [4] * 6, 64, 128, 2.0),
    "b": (174, 16, [6] * 6, [6] * 6, 64, 128, 2.0),
    "l": (174, 16, [6] * 9, [6] * 9, 64, 128, 2.0),
    # ours, not an official configuration: the embedded default, small enough to train on a CPU
    "tiny": (32, 8, [2] * 2, [2] * 2, 16, 32, 1.0),
}


def _mambairv2(size: str, scale: int, in_chans: int = 3) -> dict[str, Any]:
    embed, d_state, depths, heads, rank, tokens, mlp = _V2_SIZES[size]
    if scale == 1:
        upsampler = ""
    else:
        upsampler = "pixelshuffledirect" if size in ("light", "tiny") else "pixelshuffle"
    return dict(upscale=scale, in_chans=in_chans, img_size=64, img_range=1.0, embed_dim=embed, d_state=d_state,
                depths=depths, num_heads=heads, window_size=8 if size == "tiny" else 16, inner_rank=rank,
                num_tokens=tokens, convffn_kernel_size=5, mlp_ratio=mlp, upsampler=upsampler, resi_connection="1conv")


def _presets() -> dict[str, Preset]:
    out: list[Preset] = []
    for s in (2, 3, 4):
        out.append(Preset(f"mambair-x{s}", "MambaIR", _mambair(s, light=False),
                          description=f"MambaIR classic SR x{s}"))
        out.append(Preset(f"mambair-light-x{s}", "MambaIR", _mambair(s, light=True),
                          description=f"MambaIR lightweight SR x{s}"))
        out.append(Preset(f"mambairv2-light-x{s}", "MambaIRv2Light", _mambairv2("light", s),
                          description=f"MambaIRv2 lightweight SR x{s}"))
        out.append(Preset(f"mambairv2-tiny-x{s}", "MambaIRv2Light", _mambairv2("tiny", s),
                          description=f"ours (not official): reduced MambaIRv2-light x{s}, the embedded default"))
        for size in ("s", "b", "l"):
            out.append(Preset(f"mambairv2-{size}-x{s}", "MambaIRv2", _mambairv2(size, s),
                              description=f"MambaIRv2-{size.upper()} classic SR x{s}"))
    dn = dict(upscale=1, img_size=128, img_range=1.0, d_state=16, depths=[6] * 6, embed_dim=180, mlp_ratio=1.2,
              upsampler="", resi_connection="1conv")
    out.append(Preset("mambair-dn-color", "MambaIR", dict(dn, in_chans=3), task="denoise",
                      description="MambaIR color denoising (one model per noise level)"))
    out.append(Preset("mambair-car", "MambaIR", dict(dn, in_chans=1, img_size=126), task="jpeg",
                      description="MambaIR grayscale JPEG artifact removal (one model per quality)"))
    out.append(Preset("mambairv2-dn-color", "MambaIRv2", dict(_mambairv2("b", 1), img_size=128), task="denoise",
                      description="MambaIRv2 color denoising"))
    out.append(Preset("mambairv2-car", "MambaIRv2", dict(_mambairv2("b", 1, in_chans=1), img_size=126),
                      task="jpeg", description="MambaIRv2 grayscale JPEG artifact removal"))
    return {p.name: p for p in out}


PRESETS: dict[str, Preset] = _presets()


def resolve_arch(arch: str, kwargs: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(official class name, full kwargs) for an official class name or a preset.

    Explicit kwargs override a preset's. Raises ValueError with the closest
    names when ``arch`` is unknown.
    """
    kwargs = dict(kwargs or {})
    if arch in ARCHS:
        return arch, kwargs
    key = arch.lower()
    if key in PRESETS:
        preset = PRESETS[key]
        return preset.arch, {**preset.kwargs, **kwargs}
    names = list(ARCHS) + list(PRESETS)
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"architecture {arch!r} is unknown.{hint} Use an official class name ({', '.join(ARCHS)}) "
        f"or a preset (`qmamba-deploy presets` lists them)."
    )


#: Official option-file arguments the classes accept and ignore (training-only or unused at inference).
IGNORED_KWARGS = frozenset({"type", "drop_rate", "attn_drop_rate", "drop_path_rate", "qk_scale"})
#: Inclusive ranges of the arguments that size a network: a value outside them (a hostile or
#: corrupted manifest, a typo in --kwarg) is refused before anything is allocated.
INT_RANGES = {"embed_dim": (1, 4096), "d_state": (1, 256), "window_size": (1, 256), "inner_rank": (1, 4096),
              "num_tokens": (1, 4096), "in_chans": (1, 4), "upscale": (1, 8), "img_size": (1, 8192),
              "convffn_kernel_size": (1, 31), "patch_size": (1, 16)}
LIST_RANGES = {"depths": (1, 64), "num_heads": (1, 64)}  # each entry; at most 16 entries
FLOAT_RANGES = {"mlp_ratio": (0.01, 16.0), "img_range": (1e-6, 1e6)}


def _short(value: Any) -> str:
    return reprlib.repr(value)


def constructor_arguments(name: str) -> set[str]:
    """The constructor arguments of an official class (its own and its bases')."""
    names: set[str] = set()
    for cls in ARCHS[name].__mro__:
        init = cls.__dict__.get("__init__")
        if init is None or cls is nn.Module:
            continue
        names |= {p.name for p in inspect.signature(init).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    return names


def check_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """ValueError naming the argument when one is unknown, of the wrong type or out of range."""
    known = constructor_arguments(name)
    for key, value in kwargs.items():
        if key not in known and key not in IGNORED_KWARGS:
            close = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ValueError(f"{name} has no argument {key!r}{hint}")
        if key in INT_RANGES:
            lo, hi = INT_RANGES[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{key}={_short(value)} is not an integer in {lo}..{hi}")
        elif key in LIST_RANGES:
            lo, hi = LIST_RANGES[key]
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 16 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in value):
                raise ValueError(f"{key}={_short(value)} is not a list of 1..16 integers in {lo}..{hi}")
        elif key in FLOAT_RANGES:
            lo, hi = FLOAT_RANGES[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"{key}={_short(value)} is not a number in {lo:g}..{hi:g}")


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build an untrained model from an official class name or a preset name.

    The module carries a :class:`ModelCard` (``model.card``: the class name and its arguments)
    from which checkpoints and manifests describe it. Arguments are checked first
    (:func:`check_kwargs`).
    """
    name, full = resolve_arch(arch, kwargs)
    check_kwargs(name, full)
    model = ARCHS[name](**full)
    model.card = ModelCard(name, full)
    return model


def count_parameters(model: nn.Module) -> int:
    """Sum of numel over parameters (buffers excluded), as the papers count."""
    return sum(p.numel() for p in model.parameters())
