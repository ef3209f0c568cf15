"""Where the TensorRT and CUDA C++ headers are on this machine (for building the plugin).

No pip wheel ships TensorRT's headers: they come from the user's TensorRT install
(TENSORRT_ROOT, a tarball, the Debian packages, or JetPack's /usr/include/aarch64-linux-gnu).
Nothing here imports TensorRT.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

#: Searched after $TENSORRT_INCLUDE_DIR and $TENSORRT_ROOT/include, in this order.
TENSORRT_INCLUDE_CANDIDATES: tuple[Path, ...] = (
    Path("/usr/include/x86_64-linux-gnu"),
    Path("/usr/include/aarch64-linux-gnu"),  # JetPack
    Path("/usr/include"),
    Path("/usr/local/tensorrt/include"),
    Path("/opt/tensorrt/include"),
)


def _first_holding(candidates: list[Path], header: str) -> Path | None:
    for folder in candidates:
        if (folder / header).is_file():
            return folder
    return None


def find_tensorrt_include() -> Path | None:
    """The first folder holding NvInfer.h: $TENSORRT_INCLUDE_DIR, $TENSORRT_ROOT/include, then
    the usual install places; None when there is none."""
    candidates: list[Path] = []
    if os.environ.get("TENSORRT_INCLUDE_DIR"):
        candidates.append(Path(os.environ["TENSORRT_INCLUDE_DIR"]))
    if os.environ.get("TENSORRT_ROOT"):
        candidates.append(Path(os.environ["TENSORRT_ROOT"]) / "include")
    candidates.extend(TENSORRT_INCLUDE_CANDIDATES)
    return _first_holding(candidates, "NvInfer.h")


def tensorrt_header_version(include: Path) -> tuple[int, int]:
    """(major, minor) from include/NvInferVersion.h.

    TensorRT 10.x defines ``NV_TENSORRT_MAJOR 10`` directly; 11.x defines it through another
    macro (``#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE``), which is followed here.
    """
    path = Path(include) / "NvInferVersion.h"
    defines = dict(re.findall(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(\w+)", path.read_text(), flags=re.MULTILINE))

    def value(macro: str) -> int:
        token, seen = defines.get(macro), {macro}
        while token is not None and not token.isdigit():
            if token in seen:
                break
            seen.add(token)
            token = defines.get(token)
        if token is None or not token.isdigit():
            raise ValueError(f"{path}: cannot resolve {macro}")
        return int(token)

    return value("NV_TENSORRT_MAJOR"), value("NV_TENSORRT_MINOR")


def find_cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (holding cuda_runtime_api.h): $CUDA_HOME, $CUDA_PATH,
    /usr/local/cuda, then the toolkit of the ``nvcc`` on PATH; None when there is none."""
    candidates = [Path(os.environ[var]) / "include" for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    candidates.append(Path("/usr/local/cuda/include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    return _first_holding(candidates, "cuda_runtime_api.h")
