"""Run every artifact qmamba-deploy writes behind one interface (``Runner``).

``open_runner(path, **options)`` picks the implementation from the file and its manifest:

=========================================  ==============  =============
what ``path`` is                           artifact kind   runner
=========================================  ==============  =============
``.pth`` / ``.pt`` / ``.safetensors``      checkpoint      TorchRunner
``bundle.safetensors``, its folder, JSON   bundle          TorchRunner
``.onnx`` (or its ``model.json``)          onnx            OrtRunner
``.engine`` / ``.plan`` (or engine.json)   engine          TrtRunner
=========================================  ==============  =============

TensorRT and onnxruntime-gpu are optional and imported when a runner of theirs opens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..artifacts import is_kind
from ..errors import OptionError
from ..fold import BUNDLE_NAME
from .base import ModelInfo, Runner, ShapeLimits
from .ort import OrtRunner
from .tensorrt import ENGINE_FILE, TrtRunner
from .tiling import TilePlan, plan_tiles, tiled_run
from .torch_runner import TorchRunner

__all__ = ["ModelInfo", "Runner", "ShapeLimits", "TorchRunner", "OrtRunner", "TrtRunner", "ARTIFACT_KINDS",
           "artifact_kind", "open_runner", "TilePlan", "plan_tiles", "tiled_run"]

ARTIFACT_KINDS = ("checkpoint", "bundle", "onnx", "engine")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
_ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
_HINT = ("pass a checkpoint (.pth/.safetensors), a bundle (bundle.safetensors or its folder), an ONNX (.onnx) "
         "or a TensorRT engine (.engine/.plan)")


def _sniff(path: Path) -> str | None:
    """What the first bytes say the file is (for sentences about a misnamed file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if not head:
        return "empty"
    if head[:2] == b"PK":
        return "a zip archive (a torch.save checkpoint)"
    if head[:1] == b"\x80":
        return "a pickle (a torch.save checkpoint)"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 27):
        return "a safetensors file"
    if head[:1] in (b"{", b"["):
        return "JSON"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff" or head[:2] == b"BM":
        return "an image"
    return None


def _kind_of_manifest(path: Path) -> tuple[str, Path]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise OptionError(f"{path} is not valid JSON; {_HINT}") from None
    found = data.get("kind") if isinstance(data, dict) else None
    if is_kind(found, "bundle"):
        return "bundle", path.with_name(BUNDLE_NAME)
    if is_kind(found, "onnx"):
        return "onnx", path.with_suffix(".onnx")
    if is_kind(found, "engine"):
        engine = data.get("engine")
        return "engine", path.with_name(engine if isinstance(engine, str) and "/" not in engine else ENGINE_FILE)
    if is_kind(found, "checkpoint"):
        return "checkpoint", path.with_suffix(".safetensors")
    raise OptionError(f"{path} is a {found!r} manifest, not one of a model artifact; {_HINT}")


def artifact_kind(path: str | os.PathLike) -> tuple[str, Path]:
    """(kind, the file to open) for ``path``; one sentence for anything else."""
    path = Path(path)
    if path.is_dir():
        found = {k: path / f for k, f in (("engine", ENGINE_FILE), ("bundle", BUNDLE_NAME), ("onnx", "model.onnx"))
                 if (path / f).is_file()}
        if "engine" in found:
            return "engine", found["engine"]
        if len(found) > 1:
            raise OptionError(f"{path} holds both {found['bundle'].name} and {found['onnx'].name}; pass the one "
                              f"to run ({found['onnx']} for ONNX Runtime, {found['bundle']} for PyTorch)")
        if found:
            return next(iter(found.items()))
        raise OptionError(f"{path} is a folder without model.engine, bundle.safetensors or model.onnx; {_HINT}")
    if not path.exists():
        raise OptionError(f"{path} does not exist; {_HINT}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        kind, target = _kind_of_manifest(path)
        if not target.is_file():
            raise OptionError(f"{path} describes {target.name}, which is not beside it; pass the artifact itself")
        return kind, target
    sniffed = _sniff(path)
    if sniffed == "empty":
        raise OptionError(f"{path} is empty; {_HINT}")
    if suffix in _CHECKPOINT_SUFFIXES:
        if suffix == ".safetensors" and _is_bundle(path):
            return "bundle", path
        return "checkpoint", path
    if suffix == ".onnx":
        if sniffed is not None:
            raise OptionError(f"{path} is named .onnx but is {sniffed}; pass the model.onnx that "
                              f"`qmamba-deploy export` wrote")
        return "onnx", path
    if suffix in _ENGINE_SUFFIXES:
        if sniffed is not None:
            raise OptionError(f"{path} is named {suffix} but is {sniffed}; pass the model.engine that "
                              f"`qmamba-deploy build` wrote")
        return "engine", path
    if sniffed == "an image":
        raise OptionError(f"{path} is an image, not a model; {_HINT} (images go to --input)")
    what = f" (it is {sniffed})" if sniffed else ""
    raise OptionError(f"{path}: cannot tell what kind of model file this is from its name{what}; {_HINT}")


def _is_bundle(path: Path) -> bool:
    side = path.with_suffix(".json")
    if path.name == BUNDLE_NAME:
        return True
    if side.is_file():
        try:
            return is_kind(json.loads(side.read_text()).get("kind"), "bundle")
        except (OSError, ValueError, AttributeError):
            return False
    return False


#: Which options each kind takes (others given are refused with a sentence).
_OPTIONS = {
    "checkpoint": {"device", "threads", "arch", "kwargs"},
    "bundle": {"device", "threads", "dls"},
    "onnx": {"device", "threads", "limits"},
    "engine": {"device", "plugin", "tensorrt", "cuda_graph"},
}
_FLAGS = {"arch": "--arch", "kwargs": "--kwarg", "dls": "--dls", "plugin": "--plugin", "tensorrt": "--tensorrt",
          "cuda_graph": "--cuda-graph", "threads": "--threads", "limits": "limits"}


def open_runner(path: str | os.PathLike, kind: str | None = None, **options: Any) -> Runner:
    """The runner for ``path`` (not opened yet: use ``with open_runner(p) as r``).

    ``kind``: the artifact kind the caller expects (``--onnx`` expects "onnx", ...); a file of
    another kind is refused. ``options``: device, threads, arch, kwargs, dls, plugin,
    tensorrt, cuda_graph, limits; unset ones (None, False, 0, {}) are ignored.
    """
    found, target = artifact_kind(path)
    if kind is not None and found != kind:
        raise OptionError(f"{path} is a {found}, not a{'n' if kind[0] in 'aeiou' else ''} {kind}; "
                          f"pass it with --model (any kind) or pass a{'n' if kind[0] in 'aeiou' else ''} {kind}")
    given = {k: v for k, v in options.items() if v not in (None, False, 0, {}, ())}
    extra = sorted(set(given) - _OPTIONS[found] - {"device"})
    if extra:
        raise OptionError(f"{', '.join(_FLAGS.get(e, e) for e in extra)} do{'es' if len(extra) == 1 else ''} not "
                          f"apply to {path} (a {found}); drop {'it' if len(extra) == 1 else 'them'}")
    device = given.pop("device", "cuda" if found == "engine" else "cpu")
    if found == "checkpoint":
        return TorchRunner(target, device=device, **given)
    if found == "bundle":
        return TorchRunner(target, device=device, bundle=True, **given)
    if found == "onnx":
        return OrtRunner(target, device=device, **given)
    return TrtRunner(target, device=device, **given)
