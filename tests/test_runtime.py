"""Runners: one interface over checkpoints, bundles, ONNX graphs and TensorRT engines.

* kind detection from the file, its name and its manifest, with one sentence for anything else;
* the torch and ONNX Runtime runners end to end on a tiny export (same outputs, limits, description);
* tiling against limits smaller (and larger) than the image, with a fake limit on the ORT runner;
* the TensorRT runner's logic against a fake TensorRT module with CPU buffers (no GPU here);
* restore / eval / validate / bench over --model of every kind the CPU runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qmamba_deploy import build_model, save_checkpoint
from qmamba_deploy.cli import main
from qmamba_deploy.errors import EnvironmentMissing, OptionError
from qmamba_deploy.jobs.export import ExportConfig, run_export
from qmamba_deploy.jobs.restore import restore_tensor
from qmamba_deploy.metrics import psnr_between
from qmamba_deploy.runtime import (
    OrtRunner,
    ShapeLimits,
    TorchRunner,
    TrtRunner,
    artifact_kind,
    open_runner,
    plan_tiles,
    tiled_run,
)
from qmamba_deploy.runtime.tensorrt import ENGINE_KIND

from .conftest import CHECKPOINTS, IMAGES, TINY_V2, need


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny float MambaIRv2-light-style x2 model: checkpoint, and its FP32 export (plugin + portable)."""
    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    ckpt = root / "tiny.safetensors"
    save_checkpoint(build_model("MambaIRv2Light", **TINY_V2).eval(), ckpt)
    out = {"checkpoint": ckpt}
    for scan in ("plugin", "portable"):
        cfg = ExportConfig(checkpoint=str(ckpt), method="none", calib_batches=1, calib_patch=16, scan=scan,
                           validate=False)
        run_export(cfg, root / scan, progress=False)
        out[scan] = root / scan / "model.onnx"
    out["bundle"] = root / "plugin" / "bundle.safetensors"
    return out


def _x(h, w, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


class _Probe(np.ndarray):
    """An array that records whether onnxruntime-extensions turned it into a Python list."""

    listed: list[bool] = []

    def tolist(self):
        _Probe.listed.append(True)
        return super().tolist()


def _probe_session(op_type: str):
    """A session of one Python op ``op_type`` (domain ai.onnx.contrib) on a [2, 3] float input."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from qmamba_deploy.runtime.ort import _register_ort_python_op

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node(op_type, ["x"], ["y"], domain="ai.onnx.contrib")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.contrib", 1)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(_register_ort_python_op())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_python_scan_results_reach_onnx_runtime_as_arrays_and_other_python_ops_keep_the_stock_path():
    """onnxruntime-extensions' stock hook lists every result element by element (9 ms per scan at 64x64);
    the ops registered through runtime.ort take the array path, every other Python op the stock one."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    from qmamba_deploy.runtime.ort import _register_ort_python_op, _return_arrays_for

    _register_ort_python_op()

    @onnx_op(op_type="QmdProbeFast", inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float])
    def fast(x):
        return (x * 2).view(_Probe)

    @onnx_op(op_type="QmdProbeStock", inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float])
    def stock(x):
        return (x * 3).view(_Probe)

    assert _return_arrays_for(fast)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    _Probe.listed.clear()
    np.testing.assert_array_equal(_probe_session("QmdProbeFast").run(None, {"x": x})[0], x * 2)
    assert _Probe.listed == []
    np.testing.assert_array_equal(_probe_session("QmdProbeStock").run(None, {"x": x})[0], x * 3)
    assert _Probe.listed == [True]
    assert not _return_arrays_for(object())  # not an op of onnxruntime-extensions: nothing changes


def test_python_scan_node_runs_single_threaded_and_leaves_torch_threads_as_they_were(artifacts, monkeypatch):
    """ONNX Runtime's workers spin between kernels: the scan node runs on one thread (a second one would
    fight a spinning worker for the core), and torch's thread count is restored after each node."""
    import qmamba_deploy.runtime.ort as ort_runtime

    seen = []
    real = ort_runtime.SCAN_OP

    def recording(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(ort_runtime, "SCAN_OP", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        session = ort_runtime.ort_session(artifacts["plugin"])
        session.run(None, {session.get_inputs()[0].name: _x(16, 16).numpy()})
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- kind detection


def test_kind_comes_from_the_file_and_its_manifest(artifacts):
    plugin = artifacts["plugin"]
    assert artifact_kind(artifacts["checkpoint"]) == ("checkpoint", artifacts["checkpoint"])
    assert artifact_kind(artifacts["checkpoint"].with_suffix(".json"))[0] == "checkpoint"
    assert artifact_kind(plugin) == ("onnx", plugin)
    assert artifact_kind(plugin.with_suffix(".json")) == ("onnx", plugin)
    assert artifact_kind(artifacts["bundle"]) == ("bundle", artifacts["bundle"])
    assert artifact_kind(plugin.parent / "bundle.json") == ("bundle", artifacts["bundle"])
    assert isinstance(open_runner(artifacts["bundle"]), TorchRunner)
    assert isinstance(open_runner(plugin), OrtRunner)


def test_engine_kind_and_folders(tmp_path, artifacts):
    folder = tmp_path / "engine"
    folder.mkdir()
    (folder / "model.engine").write_bytes(b"\x01engine bytes")
    (folder / "engine.json").write_text(json.dumps({"kind": ENGINE_KIND, "engine": "model.engine"}))
    assert artifact_kind(folder) == ("engine", folder / "model.engine")
    assert artifact_kind(folder / "engine.json") == ("engine", folder / "model.engine")
    assert isinstance(open_runner(folder / "model.engine"), TrtRunner)
    bundle_only = tmp_path / "b"
    bundle_only.mkdir()
    for name in ("bundle.safetensors", "bundle.json"):
        (bundle_only / name).write_bytes((artifacts["bundle"].parent / name).read_bytes())
    assert artifact_kind(bundle_only) == ("bundle", bundle_only / "bundle.safetensors")
    with pytest.raises(OptionError, match="holds both bundle.safetensors and model.onnx; pass the one to run"):
        artifact_kind(artifacts["plugin"].parent)


@pytest.mark.parametrize("name,content,message", [
    ("none.onnx", None, "does not exist"),
    ("empty.onnx", b"", "is empty"),
    ("ckpt.onnx", b"PK\x03\x04zipzipzip", "is named .onnx but is a zip archive"),
    ("st.engine", (12).to_bytes(8, "little") + b'{"a": 1}    ', "is named .engine but is a safetensors file"),
    ("model.bin", b"\x08\x07data", "cannot tell what kind of model file this is"),
    ("x.json", b"{not json", "is not valid JSON"),
    ("y.json", b'{"kind": "qmamba-deploy bench"}', "is a 'qmamba-deploy bench' manifest, not one of a model"),
    ("folder", "dir", "is a folder without model.engine, bundle.safetensors or model.onnx"),
])
def test_kind_detection_refusals(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(OptionError, match=message):
        open_runner(path)


def test_expected_kind_and_options_that_do_not_apply(artifacts):
    with pytest.raises(OptionError, match=r"tiny.safetensors is a checkpoint, not an onnx"):
        open_runner(artifacts["checkpoint"], kind="onnx")
    with pytest.raises(OptionError, match=r"--plugin does not apply to .*tiny.safetensors \(a checkpoint\)"):
        open_runner(artifacts["checkpoint"], plugin="lib.so")
    with pytest.raises(OptionError, match=r"--arch, --dls do not apply to .*model.onnx \(a onnx\)"):
        open_runner(artifacts["plugin"], arch="MambaIR", dls="static")
    with pytest.raises(OptionError, match="ONNX Runtime runs on cpu or cuda"):
        open_runner(artifacts["plugin"], device="tpu")
    with pytest.raises(OptionError, match="a TensorRT engine runs on the GPU"):
        TrtRunner("x.engine", device="cpu")


# ----------------------------------------------------------------------------- torch and ORT


def test_torch_and_ort_runners_agree_and_describe_themselves(artifacts):
    x = _x(20, 26)
    with open_runner(artifacts["checkpoint"]) as torch_r, open_runner(artifacts["plugin"]) as ort_r, \
            open_runner(artifacts["portable"]) as portable_r, open_runner(artifacts["bundle"]) as bundle_r:
        ref = torch_r(x)
        assert ref.shape == (1, 3, 40, 52) and ref.dtype == torch.float32
        for r in (ort_r, portable_r, bundle_r):
            assert (r(x) - ref).abs().max() <= 1e-4
        d = ort_r.describe()
        assert d["kind"] == "onnxruntime" and d["providers"] == ["CPUExecutionProvider"] and len(d["sha256"]) == 64
        assert d["scan"] == "plugin" and d["precision"] == "fp32" and d["model"]["scale"] == 2
        assert d["accepts"]["min_hw"] == [4, 4] and d["accepts"]["window"] == 8  # ceil(window / 2)
        assert torch_r.describe()["accepts"]["min_hw"] == [1, 1]
        assert bundle_r.describe()["artifact"] == "bundle" and bundle_r.describe()["dls"] == "dynamic"
        assert any("QMambaSelectiveScan" in n for n in ort_r.notes) and not portable_r.notes
        with pytest.raises(OptionError, match="height 3 is outside what the artifact accepts"):
            ort_r(_x(3, 8))
        with pytest.raises(OptionError, match="has 1 channels; the model takes 3"):
            ort_r(torch.rand(1, 1, 8, 8))
    with pytest.raises(RuntimeError, match="is not open"):
        ort_r(x)


def test_a_closed_runner_is_reopened_by_with(artifacts):
    runner = open_runner(artifacts["plugin"])
    for _ in range(2):
        with runner:
            assert runner(_x(8, 8)).shape == (1, 3, 16, 16)
    assert runner.session is None


# ----------------------------------------------------------------------------- tiling


def test_plan_fits_tiles_to_limits():
    lim = ShapeLimits(3, (16, 16), (32, 48), 1, "engine profile")
    plan = plan_tiles(100, 20, tile=64, overlap=8, limits=lim)
    assert plan.tile == (32, 20) and plan.padded == (100, 20)
    assert plan.starts[0][0] == 0 and plan.starts[0][-1] == 100 - 32 and len(plan.starts[1]) == 1
    assert any("tile height 64 lowered to 32" in n for n in plan.notes)
    small = plan_tiles(10, 40, tile=0, overlap=16, limits=lim)
    assert small.padded == (16, 40) and small.tile == (16, 40) and small.whole
    assert any("image height 10 mirror-padded to 16" in n for n in small.notes)
    tight = plan_tiles(200, 200, tile=256, overlap=40, limits=ShapeLimits(3, (8, 8), (32, 32)))
    assert tight.tile == (32, 32) and tight.overlap == (8, 8)  # the overlap no longer fit the tile
    assert plan_tiles(50, 60).whole and plan_tiles(50, 60, tile=64).whole
    with pytest.raises(OptionError, match="--overlap 8 must be smaller than --tile 8"):
        plan_tiles(50, 50, tile=8, overlap=8)
    with pytest.raises(OptionError, match="--tile -1: pass 0"):
        plan_tiles(50, 50, tile=-1)
    with pytest.raises(OptionError, match="--overlap -5: pass 0 or more"):
        plan_tiles(50, 50, tile=16, overlap=-5)


def test_ort_runner_with_a_fake_limit_tiles_like_torch(artifacts):
    """An ONNX that takes at most 16x16 restores a 40x36 image through tiles; torch with the same
    tiles gives the same pixels (the FP32 graph reproduces the model)."""
    limits = ShapeLimits(3, (4, 4), (16, 16), 1, "fake limit")
    x = _x(40, 36, seed=3)
    with OrtRunner(artifacts["plugin"], limits=limits) as ort_r, open_runner(artifacts["checkpoint"]) as torch_r:
        assert ort_r.limits.max_hw == (16, 16)
        got = restore_tensor(ort_r, x, tile=64, overlap=6)
        want = tiled_run(torch_r, x, 2, limits=limits, tile=64, overlap=6)
        assert got.shape == (1, 3, 80, 72)
        assert (got - want).abs().max() <= 1e-4
        whole = torch_r(x)
        assert psnr_between(got, whole) > 15  # tiles see less context; nothing is lost or shifted
        tiny = restore_tensor(ort_r, _x(3, 5))  # smaller than the graph's minimum: padded, then cropped
        assert tiny.shape == (1, 3, 6, 10)
        assert (tiny - tiled_run(torch_r, _x(3, 5), 2, limits=limits)).abs().max() <= 1e-4


def test_batches_are_split_to_the_runner_limit(artifacts):
    limits = ShapeLimits(3, (4, 4), (None, None), 1, "batch 1 only")
    with OrtRunner(artifacts["plugin"], limits=limits) as r:
        x = torch.cat([_x(8, 8, 1), _x(8, 8, 2), _x(8, 8, 3)])
        y = restore_tensor(r, x)
        assert y.shape == (3, 3, 16, 16)
        assert (y[1:2] - r(x[1:2])).abs().max() == 0


# ----------------------------------------------------------------------------- TensorRT (fake)


class _FakeContext:
    def __init__(self, engine):
        self.engine, self.shape, self.addresses = engine, None, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile
        ok = all(a <= s <= b for a, s, b in zip(lo, shape, hi))
        self.shape = tuple(shape) if ok else self.shape
        return ok

    def get_tensor_shape(self, name):
        n, c, h, w = self.shape
        return (n, c, 2 * h, 2 * w)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        """y = 2x nearest upsample of x + 0.25, read and written at the bound addresses."""
        n, c, h, w = self.shape
        x = np.ctypeslib.as_array((ctypes.c_float * (n * c * h * w)).from_address(self.addresses["input"]))
        y = np.ctypeslib.as_array((ctypes.c_float * (n * c * 4 * h * w)).from_address(self.addresses["output"]))
        up = x.reshape(n, c, h, w).repeat(2, axis=2).repeat(2, axis=3) + 0.25
        y[:] = up.ravel()
        self.engine.launches += 1
        return True


class _FakeEngine:
    num_io_tensors = 2
    device_memory_size_v2 = 1234

    def __init__(self, trt):
        self.trt, self.launches = trt, 0
        self.profile = [(1, 3, 8, 8), (1, 3, 16, 16), (2, 3, 24, 24)]

    def get_tensor_name(self, i):
        return ("input", "output")[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "input" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.trt.float32

    def get_tensor_profile_shape(self, name, profile):
        return self.profile

    def create_execution_context(self):
        return _FakeContext(self)


def _fake_tensorrt():
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.float32, trt.float16 = "float32", "float16"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.Builder = object
    trt.loaded = []

    class ILogger:
        def __init__(self):
            pass

    class Registry:
        def load_library(self, path):
            trt.loaded.append(path)
            return object()

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def get_plugin_registry(self):
            return Registry()

        def deserialize_cuda_engine(self, data):
            trt.engine = _FakeEngine(trt) if data == b"fake engine" else None
            return trt.engine

    trt.ILogger, trt.Runtime = ILogger, Runtime
    return trt


class CpuTrtRunner(TrtRunner):
    """TrtRunner with its CUDA seams on the CPU (the fake engine reads and writes host memory)."""

    buffer_device = "cpu"

    def _check_device(self):
        pass

    def _new_stream(self):
        return types.SimpleNamespace(synchronize=lambda: None)

    def _stream_handle(self):
        return 0

    def _free_memory(self):
        return 0

    def _on_stream(self):
        return contextlib.nullcontext()


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):
    trt = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"fake engine")
    lib = tmp_path / "libqmamba_scan_plugin.so"
    lib.write_bytes(b"\x7fELF")
    manifest = {"kind": ENGINE_KIND, "engine": "model.engine", "tensorrt": {"module": "tensorrt", "version": "10.3.0"},
                "plugin": {"library": str(lib)},
                "model": {"arch": "MambaIRv2Light", "scale": 2, "in_chans": 3, "task": None,
                          "qconfig": {"method": "minmax", "w_bits": 8, "a_bits": 8}, "window_size": 16},
                "limits": {"min_hw": [10, 10], "max_hw": [None, None], "max_batch": None, "window": 16}}
    (tmp_path / "engine.json").write_text(json.dumps(manifest))
    return trt, engine, manifest


def _upsampled(x):
    return x.repeat_interleave(2, 2).repeat_interleave(2, 3) + 0.25


def test_trt_runner_takes_its_limits_from_the_profile_and_the_onnx(fake_engine):
    trt, engine, _ = fake_engine
    with CpuTrtRunner(engine) as r:
        assert trt.loaded and trt.loaded[0].endswith("libqmamba_scan_plugin.so")  # the library engine.json names
        assert r.limits.min_hw == (10, 10) and r.limits.max_hw == (24, 24) and r.limits.max_batch == 2
        assert r.info.scale == 2 and r.info.precision == "W8A8"
        x = _x(12, 20)
        assert torch.equal(r(x), _upsampled(x))
        big = _x(50, 37, seed=1)  # larger than the profile: tiles of at most 24
        y = restore_tensor(r, big, tile=256, overlap=4)
        assert y.shape == (1, 3, 100, 74) and (y - _upsampled(big)).abs().max() <= 1e-5
        small = _x(5, 7, seed=2)  # smaller than the ONNX minimum: mirror-padded, cropped back
        assert torch.equal(restore_tensor(r, small), _upsampled(small))
        d = r.describe()
        assert d["kind"] == "tensorrt" and d["backend_version"] == "10.3.0" and d["accepts"]["max_hw"] == [24, 24]
        step, shape = r.bench_step(_x(16, 16))
        before = trt.engine.launches
        step()
        assert shape == (1, 3, 32, 32) and trt.engine.launches == before + 1
        assert r.memory()["engine_device_memory_bytes"] == 1234


def test_trt_runner_without_our_manifest_infers_the_scale(fake_engine):
    trt, engine, _ = fake_engine
    (engine.parent / "engine.json").unlink()
    with CpuTrtRunner(engine, plugin=str(engine.parent / "libqmamba_scan_plugin.so")) as r:
        assert r.info.scale == 2 and r.info.arch is None and r.limits.min_hw == (8, 8)


def test_trt_runner_refusals(fake_engine, tmp_path):
    trt, engine, manifest = fake_engine
    side = engine.parent / "engine.json"
    side.write_text(json.dumps({**manifest, "plugin": {"library": "/nowhere/libqmamba_scan_plugin.so"}}))
    with pytest.raises(OptionError, match="plugin library .*is not here; build it"):
        CpuTrtRunner(engine).open()
    side.write_text("{broken")
    with pytest.raises(OptionError, match="engine.json is not valid JSON"):
        CpuTrtRunner(engine).open()
    side.write_text(json.dumps({**manifest, "plugin": None}))
    engine.write_bytes(b"another GPU's engine")
    with pytest.raises(OptionError, match="could not load it .*specific to the TensorRT version and GPU"):
        CpuTrtRunner(engine).open()
    sys.modules["tensorrt"] = None  # as on a machine without TensorRT
    with pytest.raises(EnvironmentMissing, match="TensorRT Python module `tensorrt` is not usable here"):
        TrtRunner(engine).open()


# ----------------------------------------------------------------------------- commands


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_restore_any_kind_same_tiling_same_image(artifacts, tmp_path):
    img = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    src = tmp_path / "photo.png"
    cv2.imwrite(str(src), img)
    outs = {}
    for kind in ("checkpoint", "plugin", "portable", "bundle"):
        out = tmp_path / kind
        r = _invoke("restore", "--model", artifacts[kind], "--input", src, "--output", out, "--tile", 24,
                    "--overlap", 8)
        assert r.exit_code == 0, r.output
        outs[kind] = cv2.imread(str(out / "photo.png")).astype(np.float64)
        assert outs[kind].shape == (80, 104, 3)
    for kind in ("plugin", "portable", "bundle"):
        assert np.abs(outs[kind] - outs["checkpoint"]).max() <= 1  # uint8 rounding at most
    r = _invoke("restore", "--checkpoint", artifacts["plugin"], "--input", src, "--output", tmp_path / "alias")
    assert r.exit_code == 0 and "onnxruntime on cpu" in r.output
    r = _invoke("restore", "--model", artifacts["plugin"], "--input", src, "--output", tmp_path / "x", "--arch", "a")
    assert r.exit_code == 2 and "--arch does not apply" in r.output


def test_eval_prints_the_same_table_and_json_for_every_kind(artifacts, tmp_path):
    reports = {}
    for kind in ("checkpoint", "plugin"):
        js = tmp_path / f"{kind}.json"
        r = _invoke("eval", "--model", artifacts[kind], "--data", "builtin", "--quiet", "--json", js)
        assert r.exit_code == 0, r.output
        reports[kind] = (r.output, json.loads(js.read_text()))
    (out_a, a), (out_b, b) = reports["checkpoint"], reports["plugin"]
    assert a.keys() == b.keys() and a["kind"] == b["kind"] == "qmamba-deploy eval report"
    assert a["artifact"]["kind"] == "torch" and b["artifact"]["kind"] == "onnxruntime"
    head = [line for line in out_a.splitlines() if line.startswith("image")]
    assert head and head == [line for line in out_b.splitlines() if line.startswith("image")]
    assert b["mean"]["psnr"] == pytest.approx(a["mean"]["psnr"], abs=1e-3)


def test_validate_takes_several_artifacts_and_refuses_others(artifacts, tmp_path):
    js = tmp_path / "v.json"
    r = _invoke("validate", artifacts["plugin"], artifacts["portable"], "--bundle", artifacts["bundle"], "--quiet",
                "--diagnose", "--json", js)
    assert r.exit_code == 0, r.output
    report = json.loads(js.read_text())
    # --diagnose: every router of the (FP32) reference, flips counted per site (quantizers: test_export)
    sites = report["diagnosis"]["sites"]
    assert {s["kind"] for s in sites} == {"route"} and all(0 <= s["flips"] <= s["values"] for s in sites)
    assert sorted(s["order"] for s in sites) == list(range(len(sites)))
    assert "code flips between float32 and float64 runs" in r.output
    names = [o["name"] for o in report["outputs"] if o["reference"]]
    assert names == ["onnxruntime: model.onnx (plugin)", "onnxruntime: model.onnx (portable)"]
    assert all(o["mean"]["min_psnr_between"] in ("inf",) or o["mean"]["min_psnr_between"] > 80
               for o in report["outputs"] if o["reference"])
    r = _invoke("validate", artifacts["plugin"], artifacts["portable"], "--quiet")
    assert r.exit_code == 2 and "come from different bundles" in r.output
    r = _invoke("validate", artifacts["checkpoint"])
    assert r.exit_code == 2 and "is a checkpoint; validate compares exported graphs" in r.output


def test_bench_model_for_checkpoints_and_onnx(artifacts, tmp_path):
    files = []
    for kind in ("checkpoint", "plugin", "bundle"):
        js = tmp_path / f"{kind}.json"
        r = _invoke("bench", "--model", artifacts[kind], "--shape", "1x3x16x16", "--warmup", 0, "--iterations", 2,
                    "--json", js)
        assert r.exit_code == 0, r.output
        files.append(json.loads(js.read_text()))
    assert files[0].keys() == files[1].keys() == files[2].keys()
    assert [f["backend"] for f in files] == ["torch", "onnxruntime", "torch"]
    assert files[1]["target"]["providers"] == ["CPUExecutionProvider"]
    r = _invoke("bench", "--onnx", artifacts["checkpoint"])
    assert r.exit_code == 2 and "is a checkpoint, not an onnx" in r.output
    r = _invoke("bench", "--torch", artifacts["plugin"])
    assert r.exit_code == 2 and "--torch runs checkpoints and bundles" in r.output


# ----------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_real_x4_onnx_restores_like_the_checkpoint(tmp_path):
    """README's promise on the released MambaIRv2-light x4 weights: export FP32, restore an image larger
    than the tile through ONNX Runtime and through PyTorch with the same tiles: >= 60 dB apart."""
    ckpt = need(CHECKPOINTS / "mambairv2_light_x4.safetensors")
    r = _invoke("export", "--checkpoint", ckpt, "--method", "none", "--out", tmp_path / "A", "--no-validate",
                "--quiet")
    assert r.exit_code == 0, r.output
    photo = cv2.imread(str(need(IMAGES / "baboon.png")))[:72, :48]  # two 64-pixel tiles
    src = tmp_path / "in" / "baboon.png"
    src.parent.mkdir()
    cv2.imwrite(str(src), photo)
    outs = []
    for model in (tmp_path / "A" / "model.onnx", ckpt):
        out = tmp_path / Path(model).suffix.strip(".")
        r = _invoke("restore", "--model", model, "--input", src, "--output", out, "--tile", 64)
        assert r.exit_code == 0, r.output
        outs.append(cv2.imread(str(out / "baboon.png")).astype(np.float64))
    assert outs[0].shape == (288, 192, 3)
    mse = ((outs[0] - outs[1]) ** 2).mean()
    assert mse == 0 or 10 * np.log10(255.0 ** 2 / mse) >= 60.0


# ----------------------------------------------------------------------------- on a GPU


def _tensorrt_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (torch sees no CUDA device)")
    try:
        from qmamba_deploy.runtime.tensorrt import import_tensorrt

        import_tensorrt("tensorrt")
    except EnvironmentMissing as exc:
        pytest.skip(f"needs TensorRT: {exc}")


@pytest.mark.gpu
def test_torch_runner_on_cuda_matches_the_cpu(artifacts):
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (torch sees no CUDA device)")
    x = _x(24, 20)
    with open_runner(artifacts["checkpoint"]) as cpu, open_runner(artifacts["checkpoint"], device="cuda") as gpu:
        assert psnr_between(gpu(x), cpu(x)) >= 50.0
        assert gpu.stream is not None and gpu.device_info()["type"] == "cuda"


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_restores_and_validates_on_the_gpu(artifacts, tmp_path):
    """A real TensorRT engine of the portable export: TrtRunner against ONNX Runtime, validate on the GPU."""
    _tensorrt_or_skip()
    from qmamba_deploy.jobs.validate import validate_artifacts
    from qmamba_deploy.trt.engine import BuildConfig, Profile, build_engine

    profile = Profile((1, 3, 8, 8), (1, 3, 32, 32), (1, 3, 48, 48))
    build_engine(BuildConfig(str(artifacts["portable"]), profile), tmp_path / "engine")
    engine = tmp_path / "engine" / "model.engine"
    x = _x(40, 64)  # wider than the profile: tiled
    with open_runner(engine) as trt_r, open_runner(artifacts["portable"]) as ort_r:
        assert trt_r.limits.max_hw == (48, 48) and trt_r.limits.min_hw == (8, 8)
        got = restore_tensor(trt_r, x, tile=32, overlap=8)
        want = tiled_run(ort_r, x, 2, limits=trt_r.limits, tile=32, overlap=8)
        assert psnr_between(got, want) >= 50.0
    report = validate_artifacts([str(engine)], data="builtin")
    assert report.passed, report.table()


@pytest.mark.slow
def test_device_check_runs_its_steps_on_the_cpu(tmp_path):
    """tools/device_check.py (the prepared GPU check) with --device cpu: every step runs or says why not."""
    import subprocess

    need(CHECKPOINTS / "mambairv2_light_x4.safetensors")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "tools" / "device_check.py"), "--out", str(tmp_path),
                           "--device", "cpu", "--quick"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "device_check.json").read_text())
    status = {s["step"]: s["status"] for s in data["steps"]}
    assert status == {"environment": "ok", "kernel": "skipped", "torch-cuda": "ok", "bundle-cuda": "ok",
                      "bench": "ok", "tensorrt": "skipped", "ort-cuda": "skipped"}
    parity = next(s for s in data["steps"] if s["step"] == "torch-cuda")["cpu_vs_official"]
    assert parity["mean_abs"] <= 1e-4
    assert "# Device check (passed)" in (tmp_path / "device_check.md").read_text()
