"""Small C libraries built at first use with the system compiler (the CPU scan kernel, the fake
quantizers' training kernel).

A library is one C file with no torch headers, compiled into a per-user cache under a name that hashes
its source, compiler, flags and the CPU's feature flags (so that a cache shared between machines never
loads a library built for another CPU), and called through ctypes. No build step at install: the
README's two set-up commands stay the whole set-up. Where there is no compiler the callers keep their
torch paths.

Each library has an environment switch (``QMAMBA_SCAN_CPU``, ``QMAMBA_FAKE_QUANT_CPU``): unset or
``auto`` uses the library where it builds, ``torch`` keeps the torch path, ``compiled`` insists on the
library (an error naming the reason where it cannot be built); any other value is an error.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import EnvironmentMissing, OptionError

__all__ = ["cache_dir", "compiler", "library_path", "load", "load_optional", "OptionalLibrary", "SWITCH_VALUES"]

#: what an environment switch of a library may say (see the module docstring)
SWITCH_VALUES = ("auto", "torch", "compiled")


def cache_dir() -> Path:
    root = os.environ.get("QMAMBA_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qmamba_deploy"


def _cpu_fingerprint() -> str:
    """What -march=native depends on."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                     "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else ``cc``; None where there is none (or on Windows)."""
    if sys.platform == "win32":
        return None
    return shutil.which(os.environ.get("CC") or "cc")


def library_path(source: Path, compiler: str, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256("\0".join([source.read_text(), compiler, *flags, _cpu_fingerprint()]).encode())
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def _build(source: Path, compiler: str, target: Path, flags: tuple[str, ...]) -> None:
    """Compile into a temporary file beside ``target`` and move it in place (atomic: two processes
    building at once both end with a whole library)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", tmp, str(source)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(source: Path, compiler: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """``source`` built by ``compiler`` with ``flags``, from the cache or built into it; raises OSError
    or SubprocessError when it cannot be built or loaded."""
    target = library_path(source, compiler, flags)
    if not target.is_file():
        try:
            _build(source, compiler, target, flags)
        except OSError:  # an unwritable cache: build into a private temporary folder of this process
            target = Path(tempfile.mkdtemp(prefix=f"qmamba_{source.stem}-")) / target.name
            _build(source, compiler, target, flags)
    return ctypes.CDLL(str(target))


def switch_value(switch: str) -> str:
    """The environment variable ``switch`` as one of SWITCH_VALUES (unset or empty: ``auto``)."""
    value = os.environ.get(switch, "").strip().lower() or "auto"
    if value not in SWITCH_VALUES:
        raise OptionError(f"environment variable {switch}={os.environ[switch]!r} is not understood; set it to "
                          f"{', '.join(SWITCH_VALUES)} or unset it")
    return value


def load_optional(source: Path, switch: str, loader: Callable[[str], ctypes.CDLL]) -> ctypes.CDLL | None:
    """``loader(compiler)``, or None — the caller keeps its torch path — where the environment variable
    ``switch`` is ``torch``, or (``auto``) there is no compiler or source, or the build fails. With
    ``switch=compiled`` those last cases raise EnvironmentMissing instead."""
    value = switch_value(switch)
    if value == "torch":
        return None
    cc = compiler()
    why = None
    if cc is None:
        why = f"no C compiler ({os.environ.get('CC') or 'cc'}) was found"
    elif not source.is_file():
        why = f"its source {source} is missing"
    else:
        try:
            return loader(cc)
        except (OSError, subprocess.SubprocessError) as e:
            first = str(e).splitlines()[0] if str(e) else ""
            why = f"building {source.name} with {cc} failed ({type(e).__name__}: {first})"
    if value == "compiled":
        raise EnvironmentMissing(f"{switch}=compiled asks for the compiled {source.stem} library, but {why}; install a "
                                 f"C compiler (or set CC), or unset {switch} to fall back to the torch path")
    return None


class OptionalLibrary:
    """A C library its module uses where it can: loaded on first use by :func:`load_optional` (once per
    process), else None and the module's torch path runs."""

    def __init__(self, source: Path, switch: str, loader: Callable[[str], ctypes.CDLL]):
        self.source, self.switch, self.loader = source, switch, loader
        self._tried, self._lib = False, None

    def get(self) -> ctypes.CDLL | None:
        if not self._tried:
            self._lib, self._tried = load_optional(self.source, self.switch, self.loader), True
        return self._lib

    def available(self) -> bool:
        return self.get() is not None

    def backend(self) -> str:
        """'compiled' where the library is loaded, else 'torch' (benchmarks record it)."""
        return "compiled" if self.available() else "torch"
