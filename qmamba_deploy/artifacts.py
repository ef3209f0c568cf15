"""Artifacts on disk: JSON manifests, atomic writes, and output folders that are checked before
the work starts, staged, swapped in whole, and never written over one of the command's inputs.

**Manifests.** Each artifact (checkpoint, bundle, ONNX, engine, report) carries a manifest:
what it is (``kind``, one of :data:`KINDS`, always spelled ``"qmamba-deploy <what>"``), a
format version, the tool versions that made it, and the artifact-specific fields.

**Writes** go to a temporary file in the target folder and are renamed into place, so an
interrupted run leaves no partial file.

**Output folders and inputs:**

* :func:`check_outputs` -- the one place that compares what a command writes with what it
  reads: an output file that is one of the inputs, an output folder (replaced as a whole) that
  holds an input, or two inputs that would be written to the same output, each get one sentence
  before any work starts;
* :func:`check_out_folder` / :func:`staged_folder` -- a folder a command writes as a whole: refused
  early when it cannot be written or holds files the command did not write, built beside its
  place under a name that carries the writer's pid, and renamed into place on success (nothing
  is left on failure). Staging folders whose writer died (SIGKILL, power loss) are removed by
  the next run that writes the same folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch

from .errors import OptionError

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


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """Write a safetensors file whose bytes depend only on its tensors and metadata.

    safetensors keeps ``__metadata__`` in a hash map, so the same call could write its keys in
    either order (two exports of one model differed only there); the header is written again
    with the metadata keys sorted and the tensors in data order, padded to 8 bytes as the
    format asks. Tensor bytes and offsets are untouched."""
    raw = safetensors.torch.save(dict(tensors), metadata=dict(metadata))
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    meta = header.pop("__metadata__", None) or {}
    ordered: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(ordered, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(raw[8 + size:])


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


#: What an artifact can be; its manifest's ``kind`` is ``"qmamba-deploy <what>"`` (:func:`kind`).
KINDS = ("checkpoint", "bundle", "onnx", "engine", "package", "bench", "export report", "eval report", "train run",
         "train state", "device check", "precision policy", "sensitivity report", "diagnosis")


def kind(what: str) -> str:
    """The ``kind`` of a manifest: one spelling for every artifact."""
    if what not in KINDS:
        raise ValueError(f"unknown artifact kind {what!r}; one of {', '.join(KINDS)}")
    return f"qmamba-deploy {what}"


def is_kind(value: Any, what: str) -> bool:
    """Whether a manifest's ``kind`` is ``what`` (manifests written before the one spelling said
    ``qmamba-deploy/<what-with-dashes>``; they still read)."""
    return value in (kind(what), f"qmamba-deploy/{what.replace(' ', '-')}")


def make_manifest(kind_: str, **fields: Any) -> dict[str, Any]:
    """A manifest of ``kind_`` (a :func:`kind` string) with ``fields`` and the tool versions."""
    if not any(kind_ == kind(w) for w in KINDS):
        raise ValueError(f"{kind_!r} is not an artifact kind; use artifacts.kind(...)")
    return {"kind": kind_, "format_version": FORMAT_VERSION, **fields, "tools": tool_versions()}


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON writes it back: mappings with string keys, tuples as lists."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def manifest_path(artifact: str | os.PathLike) -> Path:
    """The manifest that sits beside an artifact: ``x.safetensors`` -> ``x.json``."""
    return Path(artifact).with_suffix(".json")


__all__ = ["FORMAT_VERSION", "KINDS", "kind", "is_kind", "make_manifest", "jsonable", "manifest_path", "tool_versions",
           "sha256_file", "atomic_path", "write_text", "write_json", "current_umask", "check_outputs", "check_writable",
           "check_out_folder", "staged_folder", "clean_stale_staging", "same_file"]

PathLike = str | os.PathLike


def _resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file (links and relative paths included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _resolved(a) == _resolved(b)


def _inside(path: PathLike, folder: PathLike) -> bool:
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


Paths = PathLike | None | Iterable[PathLike]


def _flat(named: Mapping[str, Paths]) -> list[tuple[str, Path]]:
    out = []
    for flag, value in named.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        out += [(flag, Path(v)) for v in values if v is not None]
    return out


def check_outputs(inputs: Mapping[str, Paths], files: Mapping[str, Paths] = {},
                  folders: Mapping[str, Paths] = {}) -> None:
    """Refuse, before any work, outputs that would overwrite or remove one of the inputs.

    Each argument maps a flag to a path or several (None skipped): ``inputs`` what the command
    reads, ``files`` the files it writes, ``folders`` the folders it replaces or fills."""
    ins = _flat(inputs)
    for out_flag, out in _flat(files):
        for in_flag, path in ins:
            if same_file(out, path):
                raise OptionError(f"{out_flag} {out} is the input {in_flag} {path}; writing it would destroy the "
                                  f"input: pass another name")
    for out_flag, folder in _flat(folders):
        for in_flag, path in ins:
            if path.exists() and _inside(path, folder):
                raise OptionError(f"{out_flag} {folder} holds the input {in_flag} {path}, and the command replaces "
                                  f"or writes into that folder: pass an output folder outside the inputs' folders")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_stale_staging(out: PathLike) -> list[Path]:
    """Remove ``.<name>.<pid>.*.tmp`` / ``.<name>.old-<pid>`` beside ``out`` whose process is gone."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:(\d+)\..*\.tmp|old-(\d+))$")
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(m.group(1) or m.group(2))
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def check_writable(path: PathLike, flag: str, folder: bool = True) -> None:
    """Refuse early a file or folder path that cannot be written (its nearest existing parent is
    a file or not writable; a folder path that is a file; a file path that is a folder)."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OptionError(f"{flag} {path} is a file; pass a folder")
    if not folder and path.is_dir():
        raise OptionError(f"{flag} {path} is a folder; pass a file name")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(f"{flag} {path}: {parent} is a file, not a folder; pass a path in a folder")
    try:  # permissions alone do not tell (root, read-only mounts, /proc): try it
        os.rmdir(tempfile.mkdtemp(prefix=".qmamba-probe-", dir=parent))
    except OSError:
        raise OptionError(f"{flag} {path}: {parent} is not writable; pass a path you can write to") from None


def check_out_folder(out: PathLike, owned: tuple[str, ...], flag: str = "--out") -> None:
    """Refuse early (before any work) an output folder that cannot be written or is not ours."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptionError(f"{flag} {out} is a file; pass a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in owned)
        if foreign:
            raise OptionError(f"{flag} {out} already holds files that this command did not write "
                              f"({', '.join(foreign[:3])}); pass a new or empty folder")
    check_writable(out.parent, flag)  # the folder is built beside OUT and renamed into place


@contextlib.contextmanager
def staged_folder(out: PathLike, owned: tuple[str, ...]) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` (else it is removed).

    ``owned``: the names the command writes; a folder holding anything else is refused."""
    out = Path(out)
    check_out_folder(out, owned)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
