"""JSON manifests and atomic writes shared by every artifact on disk.

Each artifact (checkpoint, bundle, ONNX, engine, report) carries a manifest:
what it is (``kind``), a format version, the tool versions that made it, and
the artifact-specific fields. Writes go to a temporary file in the target
folder and are renamed into place, so an interrupted run leaves no partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator

FORMAT_VERSION = 1


def tool_versions() -> dict[str, str]:
    """Versions of the packages that shape an artifact (lazy, optional ones skipped)."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("qmamba-deploy", "torch", "numpy", "safetensors", "onnx", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (complete or absent)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def make_manifest(kind: str, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "format_version": FORMAT_VERSION, **fields, "tools": tool_versions()}


def manifest_path(artifact: str | os.PathLike) -> Path:
    """The manifest that sits beside an artifact: ``x.safetensors`` -> ``x.json``."""
    return Path(artifact).with_suffix(".json")
