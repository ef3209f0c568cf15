"""A self-contained folder (and tarball) to build and check an engine on a Jetson.

``package(onnx, target, out)`` writes ``out/`` and ``out.tar.gz`` (both or neither):

    model.onnx, model.json        the exported graph and its manifest
    plugin/                       the selective-scan plugin sources + CMakeLists.txt
    build_engine.sh               builds the plugin with CMake, then the engine with trtexec
                                  (--dynamicPlugins, timing cache, the profile's shapes)
    check_parity.sh               polygraphy run on the engine against the reference outputs
    reference/inputs.json         one image at the --opt shape (polygraphy JSON)
    reference/outputs.json        ONNX Runtime's output for it (polygraphy RunResults JSON)
    manifest.json                 target, JetPack/TensorRT expectations, profile, checksums
    README.md                     the three commands to run on the device
    bundle.safetensors/.json      the deploy bundle (validate compares the engine with its PyTorch model)

Engines are specific to a GPU and a TensorRT version, so the engine is built on the
device; what ships is everything the build and the parity check need.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from polygraphy.comparator import IterationResult, RunResults
from polygraphy.json import save_json

from ..artifacts import atomic_path, check_outputs, is_kind, kind, make_manifest, sha256_file, staged_folder, write_json
from ..data.builtin import centre_crop, sample_photo
from ..data.datasets import to_tensor
from ..data.degrade import bicubic_down, bicubic_up
from ..errors import OptionError
from ..fold import BUNDLE_NAME
from ..ops import contract
from ..runtime.base import fmt_shape
from ..runtime.ort import ort_session
from .engine import Profile, _read_onnx_io
from .plugin import PLUGIN_LIBRARY, PLUGIN_LIBRARY_DLOPEN, plugin_checksum, plugin_source_dir, plugin_source_files

__all__ = ["TARGETS", "Target", "PACKAGE_KIND", "package", "verify_package"]

PACKAGE_KIND = kind("package")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Target:
    name: str
    cuda_arch: str
    jetpack: str
    tensorrt: str
    cuda: str


TARGETS: dict[str, Target] = {
    "jetson-orin": Target("jetson-orin", "87", "6.1 / 6.2 (or 7.2+)", "10.3 (JetPack 6) or 10.13+ / 11.x (JetPack 7)",
                          "12.6 (JetPack 6) or 13 (JetPack 7)"),
    "jetson-thor": Target("jetson-thor", "110", "7.x", "10.13+ / 11.x", "13"),
}

#: polygraphy's comparison of the engine's output with ONNX Runtime's: mean |difference|
#: (images in [0, 1]); a W8A8 MambaIRv2 flips a few routing decisions under any float change
#: (docs/results-sensitivity.md), so single pixels may differ while the mean stays tiny.
PARITY_ATOL = 5e-3

_BUILD_SH = """#!/usr/bin/env bash
# Builds the TensorRT engine for this package on the device ({target}, CUDA arch {arch}).
#   ./build_engine.sh [extra trtexec flags]
# Environment: TRTEXEC (default: trtexec on PATH, else /usr/src/tensorrt/bin/trtexec),
# TENSORRT_ROOT (where NvInfer.h / libnvinfer live if not in the system paths),
# CUDA_ARCH (default {arch}), VERSION_COMPATIBLE=1 (a version-compatible engine with the
# plugin library serialized into it).
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
DEFAULT_ARCH={arch}
CUDA_ARCH="${{CUDA_ARCH:-$DEFAULT_ARCH}}"
HAS_SCAN={has_scan}   # 1: the graph has QMambaSelectiveScan nodes (the plugin is built and loaded)
PLUGIN_FLAGS=()
if [ "$HAS_SCAN" = 1 ]; then
  cmake -S plugin -B plugin/build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" \\
    ${{TENSORRT_ROOT:+-DTENSORRT_ROOT="$TENSORRT_ROOT"}}
  cmake --build plugin/build -j"$(nproc)"
  PLUGIN_FLAGS=({dynamic_plugins})
  if [ "${{VERSION_COMPATIBLE:-0}}" = 1 ]; then
    PLUGIN_FLAGS+=(--versionCompatible {serialize_plugins})
  fi
fi
# Precision comes from the Q/DQ nodes: TensorRT 10 needs --stronglyTyped (11 always is strongly
# typed and deprecates the flag); when the version cannot be read the flag is passed.
version=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*TensorRT v\\([0-9]\\{{5,\\}}\\).*/\\1/p' | head -n 1)
TYPED=(--stronglyTyped)
if [ -n "$version" ] && [ "$((version / 10000))" -ge 11 ]; then TYPED=(); fi
"$TRTEXEC" --onnx=model.onnx "${{PLUGIN_FLAGS[@]}}" "${{TYPED[@]}}" \\
  {min_shapes} {opt_shapes} {max_shapes} \\
  --timingCacheFile=timing.cache --saveEngine=model.engine "$@"
echo "built model.engine; check it with ./check_parity.sh"
"""

_CHECK_SH = """#!/usr/bin/env bash
# On-device parity: the engine's output for reference/inputs.json against ONNX Runtime's
# (reference/outputs.json, made on the packaging machine). Mean |difference| <= ATOL.
set -euo pipefail
cd "$(dirname "$0")"
DEFAULT_ATOL={atol}
ATOL="${{ATOL:-$DEFAULT_ATOL}}"
HAS_SCAN={has_scan}
PLUGINS=()
# polygraphy loads plugins with dlopen: the self-registering build of the plugin.
if [ "$HAS_SCAN" = 1 ]; then PLUGINS=(--plugins {dlopen_path}); fi
polygraphy run model.engine --model-type engine --trt "${{PLUGINS[@]}}" \\
  --load-inputs reference/inputs.json --load-outputs reference/outputs.json \\
  --atol "$ATOL" --rtol 0 --check-error-stat mean "$@"
"""

_README = """# {name}: MambaIR engine package for {target}

Made by `qmamba-deploy package` from `model.onnx` ({arch_name}, {precision}, scan: {scan}).
Target: {target}, CUDA arch sm_{arch}, JetPack {jetpack}, TensorRT {tensorrt}, CUDA {cuda}.

On the device:

```bash
tar xzf {tarball} && cd {name}
sha256sum -c SHA256SUMS        # the files are the ones packaged
./build_engine.sh              # plugin (CMake) + engine (trtexec), about minutes
./check_parity.sh              # polygraphy: engine vs ONNX Runtime reference, mean |diff| <= {atol_text}
trtexec --loadEngine=model.engine {plugin_flag}{shapes}   # latency
```

With qmamba-deploy installed on the device (`pip install qmamba-deploy` beside JetPack's TensorRT and a
CUDA build of torch), the engine runs like every other artifact (the plugin is found in plugin/build/):

```bash
qmamba-deploy validate model.engine --bundle bundle.safetensors   # eval images: engine vs PyTorch on the GPU
qmamba-deploy restore --model model.engine --input photo.png --output restored/   # any size: tiled to the profile
qmamba-deploy bench --model model.engine --shape {opt_word}
```

Profile: min {min}, opt {opt}, max {max} (rebuild with other shapes by editing build_engine.sh).
"""


def _reference_input(shape: tuple[int, ...], upscale: int) -> np.ndarray:
    """One real photo (scikit-image's astronaut) at ``shape``, made like the eval data: an HR crop
    MATLAB-bicubic-downscaled by the model's scale and rounded to uint8 (``data.degrade``)."""

    batch, channels, h, w = shape
    scale = max(int(upscale or 1), 1)
    photo = sample_photo("astronaut")
    side = max(h, w) * scale
    if min(photo.shape[:2]) < side:  # large profiles: enlarge the 512 px photo first
        photo = bicubic_up(photo, -(-side // min(photo.shape[:2])))
    hr = np.ascontiguousarray(centre_crop(photo, side)[: h * scale, : w * scale])
    lr = bicubic_down(hr, scale) if scale > 1 else hr
    if channels == 1:
        lr = np.round(lr.mean(axis=2, keepdims=True)).astype(np.uint8)
    x = to_tensor(lr[:, :, :channels]).numpy()
    return np.repeat(x, batch, axis=0)


def _reference_files(onnx_path: Path, input_name: str, x: np.ndarray, folder: Path) -> dict[str, Any]:
    """polygraphy-format inputs.json / outputs.json, the outputs from ONNX Runtime."""


    session = ort_session(onnx_path)
    out_name = session.get_outputs()[0].name
    y = session.run(None, {input_name: x})[0]
    folder.mkdir()
    save_json([{input_name: x}], str(folder / "inputs.json"))
    results = RunResults([("onnxruntime-cpu", [IterationResult({out_name: y}, runner_name="onnxruntime-cpu")])])
    save_json(results, str(folder / "outputs.json"))
    return {"input": input_name, "input_shape": list(x.shape), "output": out_name, "output_shape": list(y.shape),
            "made_by": "onnxruntime (CPU), the QMambaSelectiveScan nodes as the reference Python custom op"}


def package(onnx: str | os.PathLike, target: str, out: str | os.PathLike, profile: Profile,
            command: str | None = None) -> dict[str, Any]:
    """Write the package folder ``out`` and ``out.tar.gz``; returns the manifest."""
    if target not in TARGETS:
        raise OptionError(f"--target {target}: pass one of {', '.join(TARGETS)}")
    tgt = TARGETS[target]
    onnx_path = Path(onnx)
    if not onnx_path.is_file():
        raise OptionError(f"{onnx_path}: no such file; pass the model.onnx that `qmamba-deploy export` wrote")
    input_name, dims, has_scan = _read_onnx_io(onnx_path)
    check_name(input_name, f"{onnx_path}: the graph's input name")
    if isinstance(dims[1], int) and dims[1] != profile.opt[1]:
        raise OptionError(f"--opt {fmt_shape(profile.opt)}: {onnx_path} takes {dims[1]} channels")
    side = onnx_path.with_name("model.json")
    onnx_manifest = _load_json(side) if side.is_file() else {}
    if onnx_path.stat().st_size > 2 ** 31 or any(onnx_path.parent.glob(onnx_path.name + ".data")):
        raise OptionError(f"{onnx_path} uses external data; package supports single-file ONNX models")
    out = Path(out)
    tarball = out.with_name(out.name + ".tar.gz")
    check_outputs({"ONNX_FILE": onnx_path}, files={"--out (tarball)": tarball}, folders={"--out": out})
    if tarball.exists() and not tarball.is_file():
        raise OptionError(f"--out {out}: {tarball} exists and is not a file; remove it")
    owned = ("model.onnx", "model.json", "plugin", "build_engine.sh", "check_parity.sh", "reference", MANIFEST,
             "README.md", "SHA256SUMS", BUNDLE_NAME, "bundle.json")
    bundle = onnx_path.parent / str((onnx_manifest.get("source") or {}).get("bundle") or BUNDLE_NAME)
    with staged_folder(out, owned=owned) as tmp:
        shutil.copyfile(onnx_path, tmp / "model.onnx")
        if onnx_manifest:
            shutil.copyfile(side, tmp / "model.json")
        if onnx_manifest and bundle.is_file() and bundle.with_suffix(".json").is_file():
            # `qmamba-deploy validate model.engine` on the device compares with the bundle's PyTorch model
            shutil.copyfile(bundle, tmp / BUNDLE_NAME)
            shutil.copyfile(bundle.with_suffix(".json"), tmp / "bundle.json")
        src = plugin_source_dir()
        plugin_files = [rel for rel in plugin_source_files(src) if rel.parts[0] != "tests"]
        for rel in plugin_files:
            (tmp / "plugin" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, tmp / "plugin" / rel)
        lib, dlopen_lib = f"plugin/build/{PLUGIN_LIBRARY}", f"plugin/build/{PLUGIN_LIBRARY_DLOPEN}"
        shapes = {"min": fmt_shape(profile.min), "opt": fmt_shape(profile.opt), "max": fmt_shape(profile.max)}
        # The one quoting rule: every value in a shell line is one shlex-quoted word.
        words = shell_words(
            arch=tgt.cuda_arch, has_scan=int(has_scan), atol=PARITY_ATOL,
            dynamic_plugins=f"--dynamicPlugins={lib}", serialize_plugins=f"--setPluginsToSerialize={lib}",
            dlopen_path=dlopen_lib, opt_word=shapes["opt"], shapes=f"--shapes={input_name}:{shapes['opt']}",
            tarball=f"{out.name}.tar.gz", name=out.name,
            **{f"{k}_shapes": f"--{k}Shapes={input_name}:{v}" for k, v in shapes.items()})
        comments = dict(target=tgt.name)
        _write_script(tmp / "build_engine.sh", _BUILD_SH.format(**comments, **words))
        _write_script(tmp / "check_parity.sh", _CHECK_SH.format(**comments, **words))
        example = _reference_input(profile.opt, onnx_manifest.get("upscale", 1))
        reference = _reference_files(onnx_path, input_name, example, tmp / "reference")
        qc = onnx_manifest.get("qconfig") or {}
        precision = f"W{qc['w_bits']}A{qc['a_bits']} {qc.get('method', '')}".strip() if qc else "fp32"
        (tmp / "README.md").write_text(_README.format(
            **words, target=tgt.name, arch_name=prose(onnx_manifest.get("arch", "model")), precision=prose(precision),
            scan=contract.OP_TYPE if has_scan else "portable", jetpack=tgt.jetpack, tensorrt=tgt.tensorrt,
            cuda=tgt.cuda, plugin_flag=words["dynamic_plugins"] + " " if has_scan else "",
            min=shapes["min"], opt=shapes["opt"], max=shapes["max"], atol_text=PARITY_ATOL))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        checksums = {rel: sha256_file(tmp / rel) for rel in files}
        (tmp / "SHA256SUMS").write_text("".join(f"{h}  {rel}\n" for rel, h in checksums.items()))
        manifest = make_manifest(
            PACKAGE_KIND,
            target={"name": tgt.name, "cuda_arch": tgt.cuda_arch, "jetpack": tgt.jetpack, "tensorrt": tgt.tensorrt,
                    "cuda": tgt.cuda},
            model={"arch": onnx_manifest.get("arch"), "precision": precision, "upscale": onnx_manifest.get("upscale"),
                   "scan": "plugin" if has_scan else "portable", "onnx_sha256": checksums["model.onnx"]},
            plugin={"name": contract.PLUGIN_NAME, "version": contract.PLUGIN_VERSION,
                    "namespace": contract.PLUGIN_NAMESPACE, "library": PLUGIN_LIBRARY,
                    "source_sha256": plugin_checksum(src), "files": [f"plugin/{r.as_posix()}" for r in plugin_files]}
            if has_scan else None,
            profile=profile.as_dict(input_name),
            reference=reference,
            parity={"tool": "polygraphy", "check_error_stat": "mean", "atol": PARITY_ATOL},
            commands={"build": "./build_engine.sh", "check": "./check_parity.sh"},
            files=checksums,
            command=command,
        )
        write_json(tmp / MANIFEST, manifest)
        with atomic_path(tarball) as tmp_tar, tarfile.open(tmp_tar, "w:gz") as tar:
            for path in sorted(tmp.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=f"{out.name}/{path.relative_to(tmp).as_posix()}", filter=_normalise)
    return manifest


#: What an ONNX input name may hold to be written into the package's scripts (trtexec's
#: --minShapes=NAME:DIMS syntax also reserves ':' and ','); anything else refuses the graph.
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,128}$")


def check_name(value: str, what: str) -> str:
    if not SAFE_NAME.match(value):
        raise OptionError(f"{what} {value!r} has characters that are unsafe in the package's shell scripts "
                          f"(allowed: letters, digits, _ . + -); re-export the graph with qmamba-deploy "
                          f"(its input is named 'input') or rename it")
    return value


def shell_words(**values: Any) -> dict[str, str]:
    """Each value as one shell word (shlex.quote): nothing in it is expanded or executed."""
    return {k: shlex.quote(str(v)) for k, v in values.items()}


def prose(value: Any) -> str:
    """A manifest value written into README prose: printable, no markup or line breaks."""
    return re.sub(r"[^A-Za-z0-9 _.+/()-]", "?", str(value))[:80]


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise OptionError(f"{path}: not JSON ({exc}); re-export the model") from None


def verify_package(folder: str | os.PathLike) -> list[str]:
    """Problems with an unpacked package (empty when complete and self-consistent)."""
    folder = Path(folder)
    problems = []
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        return [f"{manifest_file} is missing"]
    manifest = _load_json(manifest_file)
    if not is_kind(manifest.get("kind"), "package"):
        problems.append(f"{manifest_file}: kind {manifest.get('kind')!r}")
    for rel, digest in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel} does not match its checksum")
    listed = set(manifest.get("files", {})) | {MANIFEST, "SHA256SUMS"}
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                   and p.relative_to(folder).as_posix() not in listed)
    problems += [f"{rel} is not in the manifest" for rel in extra]
    for script in ("build_engine.sh", "check_parity.sh"):
        if (folder / script).is_file() and not os.access(folder / script, os.X_OK):
            problems.append(f"{script} is not executable")
    return problems
