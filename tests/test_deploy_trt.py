"""`qmamba-deploy build`, `bench` and `package`: everything that runs without a GPU.

* bench --torch / --onnx run here and write the same JSON schema; --compare reads two;
* build runs end to end with TensorRT-RTX (whose builder needs no GPU) on small graphs,
  refuses what cannot work (a plugin graph without the plugin, --fp16 on a strongly typed
  TensorRT, bad profiles) and says clearly when TensorRT is missing;
* bench --engine says clearly why it cannot run here;
* package writes a folder and a tarball that unpack complete and self-consistent, whose
  references polygraphy reads, and whose build script calls cmake and trtexec as documented.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from qmamba_deploy.cli import main
from qmamba_deploy.errors import EnvironmentMissing, OptionError
from qmamba_deploy.jobs.bench import BENCH_KIND, BenchSettings, bench, compare, parse_shape
from qmamba_deploy.trt import engine as trt_engine
from qmamba_deploy.trt.engine import BuildConfig, Profile, build_engine
from qmamba_deploy.trt.package import PACKAGE_KIND, package, verify_package

TINY_SETTINGS = BenchSettings(shape=(1, 3, 16, 16), warmup=1, iterations=3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny MambaIRv2-light-style model, W8A8 PTQ, exported with the plugin scan and portable."""
    import torch

    from qmamba_deploy import build_model, save_checkpoint
    from qmamba_deploy.jobs.export import ExportConfig, run_export
    from tests.conftest import TINY_V2

    root = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    ckpt = root / "tiny.safetensors"
    save_checkpoint(build_model("MambaIRv2Light", **TINY_V2).eval(), ckpt)
    out = {}
    for scan in ("plugin", "portable"):
        cfg = ExportConfig(checkpoint=str(ckpt), calib_batches=1, calib_patch=16, scan=scan, validate=False)
        run_export(cfg, root / scan, progress=False)
        out[scan] = root / scan / "model.onnx"
    out["checkpoint"] = ckpt
    return out


def _conv_onnx(path: Path, channels: int = 3) -> Path:
    """A small dynamic-shape Conv + Relu graph (what TensorRT-RTX can build in a second)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [channels, channels, 3, 3],
                           np.random.default_rng(0).standard_normal(channels * channels * 9).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["output"])],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, "height", "width"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", channels, "height", "width"])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _rtx_available() -> bool:
    try:
        trt_engine.import_tensorrt("tensorrt_rtx")
        return True
    except EnvironmentMissing:
        return False


needs_rtx = pytest.mark.skipif(not _rtx_available(), reason="tensorrt-rtx-cu13 is not installed (the [lint] extra)")


# ----------------------------------------------------------------------------- bench


def test_parse_shape_accepts_nchw_and_names_the_flag():
    assert parse_shape("1x3x64x128") == (1, 3, 64, 128)
    for bad in ("1x3x64", "1x3x0x8", "ax3x8x8"):
        with pytest.raises(OptionError, match="--opt"):
            parse_shape(bad, "--opt")


def test_bench_torch_and_onnx_share_one_schema_and_compare(exported, tmp_path):
    a = bench(exported["checkpoint"], TINY_SETTINGS).as_dict()
    b = bench(exported["plugin"], TINY_SETTINGS).as_dict()
    assert a.keys() == b.keys()
    for r in (a, b):
        assert r["kind"] == BENCH_KIND and r["input"]["shape"] == [1, 3, 16, 16]
        assert r["output"]["shape"] == [1, 3, 32, 32]  # x2 model
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["throughput"]["images_per_s"] == pytest.approx(1000.0 / lat["p50"])
        assert r["throughput"]["output_megapixels_per_s"] == pytest.approx(32 * 32 * 1000.0 / lat["p50"] / 1e6)
        assert r["memory"]["peak_bytes"] > 0
    assert a["backend"] == "torch" and a["target"]["precision"] == "fp32"
    assert b["backend"] == "onnxruntime" and b["target"]["qconfig"]["w_bits"] == 8
    assert any("QMambaSelectiveScan" in n for n in b["notes"])
    c = compare(a, b)
    assert c["speedup_b_vs_a"] == pytest.approx(a["latency_ms"]["p50"] / b["latency_ms"]["p50"])
    assert not c["warnings"]

    # the CLI writes the same JSON and compares two files
    runner = CliRunner()
    ja, jb = tmp_path / "a.json", tmp_path / "b.json"
    r1 = runner.invoke(main, ["bench", "--torch", str(exported["checkpoint"]), "--shape", "1x3x16x16", "--warmup", "0",
                              "--iterations", "2", "--json", str(ja)])
    r2 = runner.invoke(main, ["bench", "--onnx", str(exported["portable"]), "--shape", "1x3x16x16", "--warmup", "0",
                              "--iterations", "2", "--json", str(jb)])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert json.loads(ja.read_text()).keys() == a.keys()
    r3 = runner.invoke(main, ["bench", "--compare", str(ja), str(jb)])
    assert r3.exit_code == 0, r3.output
    assert "latency p50 ms" in r3.output and "B is" in r3.output


def test_compare_warns_about_unlike_runs():
    base = {"input": {"shape": [1, 3, 64, 64]}, "host": {"machine": "x"}, "latency_ms": dict.fromkeys(
        ("p50", "p90", "p99", "mean"), 10.0), "throughput": {"images_per_s": 100.0}}
    other = {**base, "input": {"shape": [1, 3, 128, 128]},
             "latency_ms": dict.fromkeys(("p50", "p90", "p99", "mean"), 40.0),
             "throughput": {"images_per_s": 25.0}}
    c = compare(base, other)
    assert c["speedup_b_vs_a"] == pytest.approx(0.25)
    assert c["latency_ratio_b_over_a"]["p50"] == pytest.approx(4.0)
    assert any("input shape" in w for w in c["warnings"])


def test_bench_cli_refuses_bad_arguments(tmp_path):
    runner = CliRunner()
    none = runner.invoke(main, ["bench"])
    assert none.exit_code == 2 and "exactly one of --model, --engine, --onnx, --torch, --compare" in none.output
    two = runner.invoke(main, ["bench", "--onnx", "a.onnx", "--torch", "b.pth"])
    assert two.exit_code == 2 and "--onnx, --torch" in two.output
    missing = runner.invoke(main, ["bench", "--onnx", str(tmp_path / "none.onnx")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"kind": "something else"}))
    cmp_bad = runner.invoke(main, ["bench", "--compare", str(bad), str(bad)])
    assert cmp_bad.exit_code == 2 and "not a `qmamba-deploy bench --json` result" in cmp_bad.output
    bad_onnx = tmp_path / "x.onnx"
    bad_onnx.write_bytes(b"\x08\x07")
    for args, message in ((["--iterations", "0"], "'--iterations': 0 is not in the range x>=1"),
                          (["--shape", "3x3"], "--shape"),
                          (["--cuda-graph"], "--cuda-graph applies to TensorRT engines only")):
        r = runner.invoke(main, ["bench", "--onnx", str(bad_onnx), *args])
        assert r.exit_code == 2 and message in r.output, r.output


def test_bench_engine_says_why_it_cannot_run_here(tmp_path, monkeypatch):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    runner = CliRunner()
    cpu = runner.invoke(main, ["bench", "--engine", str(engine), "--device", "cpu"])
    assert cpu.exit_code == 2 and "a TensorRT engine runs on the GPU; pass --device cuda" in cpu.output
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    r = runner.invoke(main, ["bench", "--engine", str(engine)])
    assert r.exit_code == 2
    assert "TensorRT Python module `tensorrt` is not usable here" in r.output and "install TensorRT" in r.output


# ----------------------------------------------------------------------------- build


def test_build_without_tensorrt_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    r = CliRunner().invoke(main, ["build", str(_conv_onnx(tmp_path / "m.onnx")), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "`tensorrt` is not usable here" in r.output
    assert not (tmp_path / "e").exists()


def test_build_refuses_a_bad_out_folder_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # the folder is checked before TensorRT is even needed
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    r = CliRunner().invoke(main, ["build", str(_conv_onnx(tmp_path / "m.onnx")), "--out", str(a_file)])
    assert r.exit_code == 2 and "--out" in r.output and "is a file" in r.output


def test_profiles_are_checked():
    with pytest.raises(OptionError, match="min <= opt <= max"):
        Profile((1, 3, 64, 64), (1, 3, 32, 32), (1, 3, 128, 128))
    with pytest.raises(OptionError, match="channel count"):
        Profile((1, 1, 32, 32), (1, 3, 64, 64), (1, 3, 64, 64))
    with pytest.raises(OptionError, match="--exclude-lean-runtime"):
        BuildConfig("m.onnx", Profile((1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8)), exclude_lean_runtime=True)


def test_build_refuses_a_plugin_graph_without_the_plugin(exported, tmp_path, monkeypatch):
    monkeypatch.delenv("QMAMBA_PLUGIN_LIB", raising=False)
    monkeypatch.setattr(trt_engine, "find_plugin_library", lambda explicit=None: None)
    p = Profile((1, 3, 16, 16), (1, 3, 16, 16), (1, 3, 16, 16))
    with pytest.raises(OptionError, match="QMambaSelectiveScan nodes and no plugin library"):
        build_engine(BuildConfig(str(exported["plugin"]), p), tmp_path / "e")
    with pytest.raises(OptionError, match="takes 3 channels"):
        build_engine(BuildConfig(str(exported["portable"]), Profile((1, 1, 16, 16), (1, 1, 16, 16), (1, 1, 16, 16))),
                     tmp_path / "e")


def test_plugin_library_paths_are_checked(tmp_path, monkeypatch):
    with pytest.raises(OptionError, match="--plugin .*nope.so: no such file"):
        trt_engine.find_plugin_library(str(tmp_path / "nope.so"))
    monkeypatch.setenv("QMAMBA_PLUGIN_LIB", str(tmp_path / "gone.so"))
    with pytest.raises(OptionError, match="QMAMBA_PLUGIN_LIB=.*gone.so: no such file"):
        trt_engine.find_plugin_library()
    lib = tmp_path / "libqmamba_scan_plugin.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv("QMAMBA_PLUGIN_LIB", str(lib))
    assert trt_engine.find_plugin_library() == lib


@needs_rtx
def test_build_with_tensorrt_rtx_writes_engine_manifest_and_timing_cache(tmp_path):
    onnx_path = _conv_onnx(tmp_path / "conv.onnx")
    cache = tmp_path / "timing.cache"
    cfg = BuildConfig(str(onnx_path), Profile((1, 3, 8, 8), (1, 3, 32, 32), (2, 3, 64, 64)), timing_cache=str(cache),
                      hardware_compatibility="ampere+", tensorrt="tensorrt_rtx")
    m = build_engine(cfg, tmp_path / "engine")
    files = sorted(p.name for p in (tmp_path / "engine").iterdir())
    assert files == ["engine.json", "model.engine"]
    assert m["engine_bytes"] == (tmp_path / "engine" / "model.engine").stat().st_size > 0
    assert json.loads((tmp_path / "engine" / "engine.json").read_text()) == m
    assert m["tensorrt"]["module"] == "tensorrt_rtx" and m["profile"]["max"] == [2, 3, 64, 64]
    assert m["settings"]["strongly_typed"] and m["settings"]["hardware_compatibility"] == "ampere+"
    assert m["plugin"] is None and m["onnx"]["scan"] == "portable"
    assert "no timing cache" in m["settings"]["timing_cache"] and not cache.exists()  # RTX has none: said, not faked
    # builder options that TensorRT-RTX has reach the manifest
    vc = build_engine(BuildConfig(str(onnx_path), cfg.profile, version_compatible=True, exclude_lean_runtime=True,
                                  optimization_level=1,
                                  workspace_mib=64, tensorrt="tensorrt_rtx"), tmp_path / "vc")
    assert vc["settings"]["flags"] == ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    assert "plugins_serialized" not in vc["settings"]
    assert vc["settings"]["optimization_level"] == 1 and vc["settings"]["workspace_mib"] == 64
    # one RTX architecture instead of all of them, recorded in the manifest (the engine is no
    # smaller: TensorRT-RTX 1.7 writes the same bytes count either way, see docs/performance.md)
    one = build_engine(BuildConfig(str(onnx_path), cfg.profile, compute_capabilities=("SM89",),
                                   tensorrt="tensorrt_rtx"), tmp_path / "sm89")
    assert one["settings"]["compute_capabilities"] == ["SM89"] and one["engine_bytes"] > 0
    with pytest.raises(OptionError, match="--compute-capability SM99: TensorRT-RTX .* knows .*SM89"):
        build_engine(BuildConfig(str(onnx_path), cfg.profile, compute_capabilities=("SM99",), tensorrt="tensorrt_rtx"),
                     tmp_path / "sm99")
    assert not (tmp_path / "sm99").exists()
    with pytest.raises(OptionError, match="--compute-capability applies to --tensorrt tensorrt_rtx"):
        BuildConfig(str(onnx_path), cfg.profile, compute_capabilities=("SM89",))
    # strongly typed TensorRT: --fp16 is refused, not silently dropped
    with pytest.raises(OptionError, match="strongly typed networks only"):
        build_engine(BuildConfig(str(onnx_path), cfg.profile, fp16=True, tensorrt="tensorrt_rtx"), tmp_path / "e2")
    assert not (tmp_path / "e2").exists()


@needs_rtx
def test_build_cli_with_tensorrt_rtx_on_a_portable_export(exported, tmp_path):
    r = CliRunner().invoke(main, ["build", str(exported["portable"]), "--opt", "1x3x16x16", "--out",
                                  str(tmp_path / "engine"), "--tensorrt", "tensorrt_rtx"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "engine" / "engine.json").read_text())
    assert m["profile"]["min"] == m["profile"]["opt"] == m["profile"]["max"] == [1, 3, 16, 16]


# ----------------------------------------------------------------------------- package


@pytest.fixture(scope="module")
def packaged(exported, tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    out = root / "qmamba-jetson-orin"
    m = package(exported["plugin"], "jetson-orin", out, Profile((1, 3, 16, 16), (1, 3, 24, 24), (1, 3, 32, 32)))
    return out, m


def test_package_tarball_unpacks_complete_and_consistent(packaged, tmp_path):
    out, m = packaged
    tarball = out.with_name(out.name + ".tar.gz")
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        assert all(n.startswith("qmamba-jetson-orin/") for n in names)
        tar.extractall(tmp_path, filter="data")
    unpacked = tmp_path / "qmamba-jetson-orin"
    assert verify_package(unpacked) == []
    manifest = json.loads((unpacked / "manifest.json").read_text())
    assert manifest == m and manifest["kind"] == PACKAGE_KIND
    assert manifest["target"]["cuda_arch"] == "87"
    for rel in ("model.onnx", "model.json", "build_engine.sh", "check_parity.sh", "reference/inputs.json",
                "reference/outputs.json", "plugin/CMakeLists.txt", "plugin/include/qmamba/scan_math.h",
                "plugin/src/selective_scan_kernel.cu", "plugin/src/exports.map", "README.md", "bundle.safetensors",
                "bundle.json"):
        assert rel in manifest["files"], rel
    assert not any(f.startswith("plugin/tests/") for f in manifest["files"])
    assert "qmamba-deploy validate model.engine --bundle bundle.safetensors" in (unpacked / "README.md").read_text()
    # an engine trtexec builds in the package is validated against the packaged bundle (no engine.json)
    from qmamba_deploy.jobs.validate import candidate

    (unpacked / "model.engine").write_bytes(b"\x01built on the device")
    found = candidate(str(unpacked / "model.engine"))
    assert (found.kind, Path(found.bundle), found.dls) == ("engine", unpacked / "bundle.safetensors", "static")
    assert os.access(unpacked / "build_engine.sh", os.X_OK)
    # SHA256SUMS agrees with the files (what README tells the user to run on the device)
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=unpacked, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # tampering is caught
    (unpacked / "model.onnx").write_bytes(b"x")
    (unpacked / "stray.txt").write_text("?")
    problems = verify_package(unpacked)
    assert "model.onnx does not match its checksum" in problems and "stray.txt is not in the manifest" in problems


def test_package_references_load_in_polygraphy_and_match_onnxruntime(packaged, exported):
    from polygraphy.json import load_json

    from qmamba_deploy.runtime.ort import ort_session

    out, m = packaged
    inputs = load_json(str(out / "reference" / "inputs.json"))
    results = load_json(str(out / "reference" / "outputs.json"))
    x = inputs[0]["input"]
    assert x.shape == (1, 3, 24, 24) and x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.05
    runner, iterations = results[0]
    y = iterations[0]["output"]
    assert y.shape == (1, 3, 48, 48)
    want = ort_session(exported["plugin"]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(y, want)
    assert m["reference"]["output_shape"] == [1, 3, 48, 48]


def _fake_tool(folder: Path, name: str, banner: str = "") -> None:
    script = folder / name
    script.write_text(f"#!/usr/bin/env bash\necho \"{name} $*\" >> \"$CALLS\"\n"
                      + (f"echo '{banner}'\n" if banner else ""))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("trt_banner,typed", [("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec", True),
                                              ("&&&& RUNNING TensorRT.trtexec [TensorRT v110100] # trtexec", False)])
def test_package_build_script_calls_cmake_and_trtexec(packaged, tmp_path, trt_banner, typed):
    out, _ = packaged
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("cmake", "nproc"):
        _fake_tool(bin_dir, tool)
    _fake_tool(bin_dir, "trtexec", trt_banner)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
    r = subprocess.run(["bash", str(out / "build_engine.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("cmake -S plugin -B plugin/build") and "-DCMAKE_CUDA_ARCHITECTURES=87" in lines[0]
    build = [ln for ln in lines if ln.startswith("trtexec --onnx")]
    assert len(build) == 1
    assert "--dynamicPlugins=plugin/build/libqmamba_scan_plugin.so" in build[0]
    assert "--minShapes=input:1x3x16x16 --optShapes=input:1x3x24x24 --maxShapes=input:1x3x32x32" in build[0]
    assert "--timingCacheFile=timing.cache" in build[0] and "--saveEngine=model.engine" in build[0]
    assert ("--stronglyTyped" in build[0]) == typed
    assert "--setPluginsToSerialize" not in build[0]
    r = subprocess.run(["bash", "-n", str(out / "check_parity.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # polygraphy dlopens plugins: the self-registering build
    assert "--plugins plugin/build/libqmamba_scan_plugin_static.so" in (out / "check_parity.sh").read_text()


def test_package_refuses_bad_input(tmp_path, exported):
    runner = CliRunner()
    r = runner.invoke(main, ["package", str(tmp_path / "none.onnx"), "--target", "jetson-orin"])
    assert r.exit_code == 2 and "no such file" in r.output
    r = runner.invoke(main, ["package", str(exported["plugin"]), "--target", "jetson-nano"])
    assert r.exit_code == 2 and "jetson-nano" in r.output
    r = runner.invoke(main, ["package", str(exported["plugin"]), "--target", "jetson-thor", "--opt", "1x1x16x16",
                             "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "takes 3 channels" in r.output
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.tar.gz").exists()


def test_package_of_a_portable_graph_needs_no_plugin(exported, tmp_path):
    out = tmp_path / "qmamba-jetson-thor"
    m = package(exported["portable"], "jetson-thor", out, Profile((1, 3, 16, 16), (1, 3, 16, 16), (1, 3, 16, 16)))
    assert m["plugin"] is None and m["model"]["scan"] == "portable" and m["target"]["cuda_arch"] == "110"
    assert verify_package(out) == []
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("cmake", "nproc"):
        _fake_tool(bin_dir, tool)
    _fake_tool(bin_dir, "trtexec", "&&&& RUNNING TensorRT.trtexec [TensorRT v101300] # trtexec")
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
    r = subprocess.run(["bash", str(out / "build_engine.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = calls.read_text().splitlines()
    assert not any(ln.startswith("cmake") for ln in lines)
    build = [ln for ln in lines if ln.startswith("trtexec --onnx")]
    assert len(build) == 1 and "--dynamicPlugins" not in build[0] and "--stronglyTyped" in build[0]


def test_reference_input_fills_any_profile_shape_like_the_eval_data():
    from qmamba_deploy.trt.package import _reference_input

    for shape, scale in (((1, 3, 24, 24), 2), ((2, 3, 300, 200), 2), ((1, 1, 16, 16), 4)):
        x = _reference_input(shape, scale)
        assert x.shape == shape and x.dtype == np.float32  # 300 x 2 = 600 px: larger than the 512 px photo
        assert np.array_equal(x * 255.0, np.round(x * 255.0))  # LR rounded to uint8, as the eval data
        assert x.std() > 0.05
