"""Fuzzing the readers (issue 14): every file a command reads either loads or raises the project's
one-sentence error (QMambaError) -- never another exception, never a hang.

Targets, each a few seconds (hypothesis, derandomized so CI sees the same examples):

* safetensors files with mutated headers and bytes, and checkpoint manifests (``x.json``);
* the export manifest ``model.json`` beside a real ONNX, and ``engine.json`` (fake TensorRT);
* the deploy bundle's embedded manifest;
* ONNX files with flipped bytes and truncations, opened and run by the ONNX Runtime runner;
* image headers (PNG chunks with valid checksums and any sizes, flipped bytes) for read_image.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmamba_deploy import build_model, load_model, save_checkpoint
from qmamba_deploy.data.io import read_image
from qmamba_deploy.errors import QMambaError
from qmamba_deploy.fold import _META_KEY as BUNDLE_META_KEY
from qmamba_deploy.fold import load_bundle
from qmamba_deploy.jobs.export import ExportConfig, run_export
from qmamba_deploy.runtime import OrtRunner

from .conftest import TINY_V2

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) |
                    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@lru_cache(maxsize=1)
def _seed() -> Path:
    """A tiny checkpoint and its W8A8 export, made once for every target."""
    root = Path(tempfile.mkdtemp(prefix="qmamba-fuzz-"))
    torch.manual_seed(0)
    save_checkpoint(build_model("MambaIRv2Light", **TINY_V2).eval(), root / "tiny.safetensors")
    run_export(ExportConfig(checkpoint=str(root / "tiny.safetensors"), calib_batches=1, calib_patch=16,
                            validate=False), root / "export")
    return root


def _only_ours(fn) -> None:
    """Run ``fn``: success or a QMambaError pass; anything else fails the test with its type."""
    with contextlib.suppress(QMambaError):
        fn()


def _mutated(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut else out)


def _work(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))


def _write_variant(path: Path, manifest: dict, key: str | None, value) -> None:
    """``manifest`` with ``key`` set to ``value`` (the whole file replaced by ``value`` when key is None)."""
    path.write_text(json.dumps(value if key is None else {**manifest, key: value}))


FLIPS = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=6)


@FUZZ
@given(flips=FLIPS, cut=st.none() | st.integers(0, 400))
def test_safetensors_bytes(flips, cut):
    work = _work("st")
    data = (_seed() / "tiny.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little") + 8  # flips land in the header, where parsing happens
    path = work / "tiny.safetensors"
    path.write_bytes(_mutated(data[:header], flips, cut) + data[header:])
    _only_ours(lambda: load_model(path))
    shutil.rmtree(work)


@FUZZ
@given(value=JSON, key=st.sampled_from(["arch", "kwargs", "qconfig", "task", "kind", None]))
def test_checkpoint_manifest(value, key):
    work = _work("manifest")
    shutil.copyfile(_seed() / "tiny.safetensors", work / "tiny.safetensors")
    _write_variant(work / "tiny.json", json.loads((_seed() / "tiny.json").read_text()), key, value)
    _only_ours(lambda: load_model(work / "tiny.safetensors"))
    shutil.rmtree(work)


@FUZZ
@given(value=JSON, key=st.sampled_from(["limits", "upscale", "arch", "task", "qconfig", "inputs", "options",
                                        "source", None]))
def test_model_json(value, key):
    work = _work("modeljson")
    for f in ("model.onnx", "model.json"):
        shutil.copyfile(_seed() / "export" / f, work / f)
    _write_variant(work / "model.json", json.loads((work / "model.json").read_text()), key, value)

    def run():
        with OrtRunner(work / "model.onnx") as r:
            r(torch.rand(1, 3, 8, 8))

    _only_ours(run)
    shutil.rmtree(work)


@FUZZ
@given(value=JSON, key=st.sampled_from(["model", "limits", "plugin", "settings", "tensorrt", "source", None]))
def test_engine_json(value, key, monkeypatch_module):
    from qmamba_deploy.runtime.tensorrt import ENGINE_KIND

    from .test_runtime import CpuTrtRunner, _fake_tensorrt

    monkeypatch_module.setitem(__import__("sys").modules, "tensorrt", _fake_tensorrt())
    work = _work("engine")
    (work / "model.engine").write_bytes(b"fake engine")
    manifest = {"kind": ENGINE_KIND, "engine": "model.engine", "model": {"arch": "x", "scale": 2, "in_chans": 3},
                "limits": {"min_hw": [8, 8], "max_hw": [None, None], "max_batch": None, "window": 16}}
    _write_variant(work / "engine.json", manifest, key, value)

    def run():
        with CpuTrtRunner(work / "model.engine") as r:
            r(torch.rand(1, 3, 8, 8))

    _only_ours(run)
    shutil.rmtree(work)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@FUZZ
@given(value=JSON, key=st.sampled_from(["arch", "kwargs", "sites", "packed", "qconfig", "kind", None]))
def test_bundle_manifest(value, key):
    from safetensors import safe_open
    from safetensors.torch import save_file

    work = _work("bundle")
    src = _seed() / "export" / "bundle.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    manifest = json.loads(meta[BUNDLE_META_KEY])
    meta[BUNDLE_META_KEY] = json.dumps(value if key is None else {**manifest, key: value})
    save_file(tensors, str(work / "bundle.safetensors"), metadata=meta)
    _only_ours(lambda: load_bundle(work / "bundle.safetensors"))
    shutil.rmtree(work)


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(flips=FLIPS, cut=st.none() | st.integers(1, 1 << 30))
def test_onnx_bytes(flips, cut):
    work = _work("onnx")
    data = (_seed() / "export" / "model.onnx").read_bytes()
    (work / "model.onnx").write_bytes(_mutated(data, flips, cut % len(data) if cut else None))
    shutil.copyfile(_seed() / "export" / "model.json", work / "model.json")

    def run():
        with OrtRunner(work / "model.onnx") as r:
            r(torch.rand(1, 3, 8, 8))

    _only_ours(run)
    shutil.rmtree(work)


def _png(width: int, height: int, depth: int, color: int, body: bytes) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


@FUZZ
@given(width=st.integers(0, 1 << 31), height=st.integers(0, 1 << 31), depth=st.sampled_from([1, 2, 4, 8, 16, 3]),
       color=st.sampled_from([0, 2, 3, 4, 6, 7]), body=st.binary(max_size=64))
def test_png_headers(width, height, depth, color, body):
    work = _work("png")
    path = work / "x.png"
    path.write_bytes(_png(width, height, depth, color, body))
    _only_ours(lambda: read_image(path))
    shutil.rmtree(work)


@FUZZ
@given(flips=FLIPS, cut=st.none() | st.integers(1, 2000), suffix=st.sampled_from([".png", ".jpg", ".bmp", ".tif"]))
def test_image_bytes(flips, cut, suffix):
    work = _work("img")
    ok, encoded = cv2.imencode(suffix, (np.arange(16 * 12 * 3) % 256).astype(np.uint8).reshape(16, 12, 3))
    assert ok
    path = work / f"x{suffix}"
    path.write_bytes(_mutated(encoded.tobytes(), flips, cut))
    _only_ours(lambda: read_image(path))
    shutil.rmtree(work)
