"""Export: Q/DQ ONNX (plugin and portable scan), INT4 weights, determinism, ORT parity, lint, CLI, errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from qmamba_deploy.cli import main
from qmamba_deploy.errors import OptionError
from qmamba_deploy.export.graph import graphs, scan_nodes
from qmamba_deploy.export.onnx_export import ExportOptions, export_onnx
from qmamba_deploy.export.qdq_onnx import qdq_translation_table
from qmamba_deploy.fold import calibrate_dls, fold, with_dls_mode
from qmamba_deploy.metrics import psnr_between
from qmamba_deploy.quant.deploy import ActQuant
from qmamba_deploy.runtime.ort import onnx_runner
from qmamba_deploy.trt.lint import lint_onnx

from .test_fold import _quantized, _x


@pytest.fixture(scope="module")
def w4a4_v2():
    """A folded, DLS-calibrated W4A4 Q-MambaIR tiny MambaIRv2 (offsets on every RFA weight)."""
    deploy = fold(_quantized("v2", "qmambair", 4, 4, beta=0.01))
    calibrate_dls(deploy, [_x(s, 24, 24) for s in range(2)])
    return deploy


@pytest.fixture(scope="module")
def w4a4_exports(w4a4_v2, tmp_path_factory):
    """``get(**options) -> (path, manifest)``: each distinct export of ``w4a4_v2`` made once per module
    (tracing is the slow part of these tests); callers read the files, never change them."""
    folder, cache = tmp_path_factory.mktemp("w4a4_exports"), {}

    def get(**options):
        key = json.dumps(ExportOptions(**options).as_dict(), sort_keys=True)
        if key not in cache:
            path = folder / f"model{len(cache)}.onnx"
            cache[key] = (path, export_onnx(w4a4_v2, path, ExportOptions(**options)))
        return cache[key]

    return get


def _zero_points(proto: onnx.ModelProto) -> list[np.ndarray]:
    inits = {t.name: t for t in proto.graph.initializer}
    return [onnx.numpy_helper.to_array(inits[n.input[2]]) for n in proto.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]


@pytest.mark.parametrize("scan,dls", [("plugin", "static"), ("plugin", "dynamic"), ("portable", "dynamic")])
def test_w4a4_export_is_qdq_clean_and_matches_torch_in_onnxruntime(w4a4_v2, w4a4_exports, scan, dls):
    path, manifest = w4a4_exports(scan=scan, dls=dls)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 10 and {o.domain: o.version for o in proto.opset_import}[""] == 21
    graph = manifest["graph"]
    assert graph["dequantize_linear"] > 0 and graph["integer_initializers"].get("INT8", 0) > 0
    assert graph["scan_nodes"] == (2 if scan == "plugin" else 0)
    if scan == "portable":
        assert "Scan" in graph["ops"]
    # static DLS are real Q/DQ pairs; dynamic ones are float arithmetic (fewer QuantizeLinear)
    static_q = w4a4_exports(dls="static")[1]["graph"]["quantize_linear"]
    assert (graph["quantize_linear"] == static_q) == (dls == "static")
    # symmetric everywhere: every zero point is an int8 0
    zps = _zero_points(proto)
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    assert lint_onnx(path, use_parser=False).passed
    # the graph computes what the deploy model computes, for other sizes and batch too
    reference = with_dls_mode(w4a4_v2, dls)
    run = onnx_runner(path)
    for x in (_x(7), torch.rand(2, 3, 33, 17, generator=torch.Generator().manual_seed(3))):
        with torch.no_grad():
            y_ref = reference(x)
        y = run(x)
        assert y.shape == y_ref.shape
        assert psnr_between(y, y_ref) >= 45.0


def test_fp_export_of_the_embedded_default_is_exact_in_onnxruntime(tmp_path):
    from qmamba_deploy import load_model
    from qmamba_deploy.defaults import default_checkpoint

    model = load_model(default_checkpoint(2))
    deploy = fold(model)
    manifest = export_onnx(deploy, tmp_path / "fp.onnx", ExportOptions(dls="dynamic"))
    assert manifest["graph"]["quantize_linear"] == 0 and manifest["qconfig"] is None
    x = _x(2, 24, 32)
    with torch.no_grad():
        ref = model(x)
    assert (onnx_runner(tmp_path / "fp.onnx")(x) - ref).abs().max() <= 1e-4


def test_diagnose_finds_every_static_quantizer_of_a_w4a4_deploy_model(w4a4_v2):
    """validate --diagnose's counting on a W4A4 deploy model: each static activation quantizer (a DLS
    site named after its DLS module) and router is a site, in forward order, with 0 <= flips <= values."""
    from qmamba_deploy.data.datasets import load_pairs
    from qmamba_deploy.data.degrade import model_degradation
    from qmamba_deploy.fold import with_dls_mode
    from qmamba_deploy.jobs.diagnose import diagnose

    deploy = with_dls_mode(w4a4_v2, "static")
    deg = model_degradation(deploy)
    report = diagnose(deploy, load_pairs("builtin", deg, 3, split="eval")[:1], deg)
    acts = [s for s in report.sites if s.kind == "act"]
    assert len(acts) == sum(isinstance(m, ActQuant) for m in deploy.modules())
    assert any(s.site.endswith("xs_q") for s in acts)  # DLS sites by their own name, not '.static'
    assert sorted(s.order for s in report.sites) == list(range(len(report.sites)))
    assert all(0 <= s.flips <= s.values and 0 <= s.near_boundary <= s.values for s in report.sites)
    assert all(s.values > 0 for s in report.sites)
    # the controls: codes held, and one flip at the first quantizer (which must change the output)
    assert len(report.codes_held) == len(report.routing_held) == len(report.one_flip) == len(report.images) == 1
    first = min(acts, key=lambda s: s.order)
    flip = report.one_flip[0]
    assert flip.site == first.site and 0 <= flip.distance <= 0.5 and flip.codes_flipped >= 0
    assert "one code flipped at" in report.table()
    # how far the disagreement moves the image's score: float32's Y-PSNR minus float64's, scored as eval does
    import copy

    from qmamba_deploy.data.datasets import degrade_pair, to_tensor
    from qmamba_deploy.evaluate import image_psnr
    pair = load_pairs("builtin", deg, 3, split="eval")[0]
    x = to_tensor(degrade_pair(pair, deg, 0))
    with torch.no_grad():
        y32, y64 = deploy.eval()(x), copy.deepcopy(deploy).double().eval()(x.double())
    expected = image_psnr(y32, pair.gt, deg.crop_border) - image_psnr(y64, pair.gt, deg.crop_border)
    assert report.quality_shift == [pytest.approx(expected, abs=1e-9)]
    assert math.isfinite(flip.quality_shift) and (flip.psnr != math.inf or flip.quality_shift == 0)
    assert "one flip minus none" in report.table() and report.as_dict()["one_flip"][0]["quality_shift"] == \
        flip.quality_shift


def test_diagnose_holds_codes_exactly_as_the_quantizers_produce_them(w4a4_v2):
    """Holding a run's own codes reproduces that run bit for bit: the held outputs are the codes times
    the scale (minus the offset) exactly as each static quantizer computes them."""
    from qmamba_deploy.jobs.diagnose import _hold, _record, _run

    deploy = with_dls_mode(w4a4_v2, "static").eval()
    x, log = _x(2, 24, 24), {}
    free = _run(deploy, x, _record(deploy, log))
    assert torch.equal(_run(deploy, x, _hold(deploy, log)), free)
    other = {}
    _run(deploy, _x(5, 24, 24), _record(deploy, other))   # another image's codes: a different output
    assert not torch.equal(_run(deploy, x, _hold(deploy, other)), free)


def test_one_flip_moves_the_value_nearest_a_boundary_by_one_step(w4a4_v2):
    from qmamba_deploy.jobs.diagnose import _flip_nearest

    site = next(m for m in with_dls_mode(w4a4_v2, "static").modules() if isinstance(m, ActQuant))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(-3, 3, (64,), generator=g).float() + 0.25 * torch.rand(64, generator=g)
    offset = site.offset if site.has_offset else 0
    for value, codes in ((1.4999, (1, 2)), (2.5, (2, 3)), (-0.5001, (-1, 0))):  # (rounds to, flips to) as a set
        t[17] = value                                        # the nearest to a boundary
        x = t * site.scale - offset
        info = {}
        plain = site(x)
        handles = _flip_nearest(site, info)
        flipped = site(x)
        for h in handles:
            h.remove()
        assert (flipped != plain).nonzero().flatten().tolist() == [17]
        pair = {round(float((v + offset) / site.scale)) for v in (plain[17], flipped[17])}
        assert pair == set(codes) and info["distance"] < 2e-4


def test_export_is_byte_identical_for_identical_input(tmp_path, w4a4_v2, w4a4_exports):
    a, b = w4a4_exports()[0], tmp_path / "b.onnx"
    export_onnx(w4a4_v2, b, ExportOptions())
    assert a.read_bytes() == b.read_bytes()
    # no tracer debug metadata (stack traces naming this checkout's files) on any node or value
    proto = onnx.load(str(a))
    assert proto.metadata_props and all(p.key.startswith("qmamba.") for p in proto.metadata_props)
    for graph in graphs(proto.graph):
        assert not any(node.metadata_props for node in graph.node), "node metadata left in the graph"
        assert not any(v.metadata_props for v in (*graph.value_info, *graph.input, *graph.output))


def test_int4_weights_are_blocked_int4_and_compute_the_same(tmp_path, w4a4_v2, w4a4_exports):
    int8, m8 = w4a4_exports(dls="static")
    m4 = export_onnx(w4a4_v2, tmp_path / "int4.onnx", ExportOptions(dls="static", int4_weights=True))
    assert m4["int4_weights"] > 0 and m4["graph"]["integer_initializers"]["INT4"] == m4["int4_weights"]
    assert m8["graph"]["integer_initializers"].get("INT4", 0) == 0
    proto = onnx.load(str(tmp_path / "int4.onnx"))
    dq4 = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
           and any(a.name == "block_size" and a.i > 0 for a in n.attribute)]
    assert len(dq4) == m4["int4_weights"]
    assert (tmp_path / "int4.onnx").stat().st_size < int8.stat().st_size
    x = _x(4)
    y8, y4 = onnx_runner(int8)(x), onnx_runner(tmp_path / "int4.onnx")(x)
    assert psnr_between(y4, y8) >= 45.0  # same integers, same scales; only the kernels differ


def test_per_channel_weights_export_with_axis_and_run_in_onnxruntime(tmp_path):
    """A per-channel W4A8 PTQ model: every Linear/Conv weight's DequantizeLinear carries a per-channel
    scale along the output axis (INT4 too, one scale per channel in every block), and ONNX Runtime
    reproduces the PyTorch deploy model."""
    from .test_fold import _per_channel

    deploy = with_dls_mode(fold(_per_channel("v2", "minmax", 4, 8)), "static")
    m8 = export_onnx(deploy, tmp_path / "pc.onnx", ExportOptions(dls="static"))
    m4 = export_onnx(deploy, tmp_path / "pc4.onnx", ExportOptions(dls="static", int4_weights=True))
    assert m4["int4_weights"] > 0
    proto = onnx.load(str(tmp_path / "pc.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".q")]
    weight_dq = [n for n in dq if n.input[0].endswith(".weight.q")]            # Linear / Conv weights
    proj_dq = [n for n in dq if not n.input[0].endswith(".weight.q")]          # the scan's projections
    assert weight_dq and all(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in weight_dq)
    assert proj_dq and all(len(inits[n.input[1]].dims) == 0 for n in proj_dq)  # per tensor (see quantize_model)
    assert lint_onnx(tmp_path / "pc.onnx", use_parser=False).passed
    x = _x(4)
    with torch.no_grad():
        ref = deploy(x)
    assert psnr_between(onnx_runner(tmp_path / "pc.onnx")(x), ref) >= 50.0
    assert psnr_between(onnx_runner(tmp_path / "pc4.onnx")(x), ref) >= 45.0
    assert m8["graph"]["dequantize_linear"] >= len(weight_dq)


def test_int4_weights_refuse_wider_weights_and_leave_nothing(tmp_path):
    deploy = fold(_quantized("v1", "minmax", 8, 8))
    out = tmp_path / "m.onnx"
    with pytest.raises(OptionError, match="at most 4 bits"):
        export_onnx(deploy, out, ExportOptions(int4_weights=True))
    assert not any(tmp_path.iterdir())


def test_export_options_are_checked():
    with pytest.raises(OptionError, match="--scan"):
        ExportOptions(scan="kernel")
    with pytest.raises(OptionError, match="--dls"):
        ExportOptions(dls="auto")
    with pytest.raises(OptionError, match="opset"):
        ExportOptions(opset=17)


# --------------------------------------------------------------------------- lint


def _qdq_model(zero_point=0, zp_type=TensorProto.INT8, dynamic_scale=False, extra_nodes=(), scale_len=0):
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq"), *extra_nodes]
    scale = helper.make_tensor("s", TensorProto.FLOAT, [scale_len] if scale_len else [],
                               [0.1] * max(1, scale_len))
    zp = helper.make_tensor("zp", zp_type, [scale_len] if scale_len else [], [zero_point] * max(1, scale_len))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    inits = [zp] if dynamic_scale else [scale, zp]
    if dynamic_scale:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("kwargs,code", [
    (dict(zero_point=3), "nonzero-zero-point"),
    (dict(zp_type=TensorProto.UINT8), "unsigned-zero-point"),
    (dict(dynamic_scale=True), "dynamic-scale"),
    (dict(scale_len=4), "per-channel-activation"),
    (dict(extra_nodes=[helper.make_node("Unique", ["y"], ["u"], name="u")]), "unsupported-op"),
])
def test_lint_flags_what_tensorrt_rejects(tmp_path, kwargs, code):
    path = tmp_path / "bad.onnx"
    onnx.save(_qdq_model(**kwargs), str(path))
    report = lint_onnx(path, use_parser=False)
    assert not report.passed and code in {f.code for f in report.errors}
    clean = tmp_path / "ok.onnx"
    onnx.save(_qdq_model(), str(clean))
    assert lint_onnx(clean, use_parser=False).passed


def test_lint_checks_the_plugin_node_against_the_contract(tmp_path, w4a4_exports):
    proto = onnx.load(str(w4a4_exports()[0]))
    node = scan_nodes(proto)[0]
    kept = [a for a in node.attribute if a.name != "plugin_namespace"]   # one attribute missing ...
    del node.attribute[:]
    node.attribute.extend(kept)
    next(a for a in node.attribute if a.name == "plugin_version").s = b"2"  # ... and one wrong
    topk = helper.make_node("TopK", ["output", "k"], ["v", "i"], name="topk")
    proto.graph.node.append(topk)
    proto.graph.initializer.append(helper.make_tensor("k", TensorProto.INT64, [1], [4096]))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    codes = [f.code for f in lint_onnx(bad, use_parser=False).errors]
    assert codes.count("plugin-attribute") == 2 and "topk-k" in codes


def test_lint_parses_with_tensorrt_where_available(w4a4_exports):
    from qmamba_deploy.trt.lint import _import_parser

    if _import_parser()[1] is None:
        pytest.skip("no TensorRT parser importable (pip install tensorrt-rtx-cu13 gives one that runs without a GPU)")
    plugin, portable = w4a4_exports(dls="static")[0], w4a4_exports(dls="static", scan="portable")[0]
    report = lint_onnx(portable)
    assert report.passed and report.parser["parsed"], report.text()
    report = lint_onnx(plugin)  # the plugin library is not loaded here: only "plugin not found" errors
    assert report.passed and report.parser["plugin_not_loaded"] == 2 and report.parser["other_errors"] == 0


# --------------------------------------------------------------------------- the export job and CLI


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def test_default_export_writes_a_validated_folder_and_validate_and_lint_agree(tmp_path):
    out = tmp_path / "export"
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--out", str(out), "--quiet", "--calib-batches", "2"])
    assert result.exit_code == 0, result.output
    assert _files(out) == {"bundle.safetensors", "bundle.json", "model.onnx", "model.json", "report.json",
                           "report.md"}
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["passed"] and report["bundle"]["qconfig"]["method"] == "minmax"
    onnx_row = next(o for o in report["validation"]["outputs"] if o["reference"])
    assert onnx_row["mean"]["min_psnr_between"] >= 50.0
    assert report["bundle"]["size"]["change_vs_fp32"] < -0.4  # int8 weights, float head and tail
    assert "onnxruntime" in result.output and "passed" in result.output
    # validate and lint on what export wrote
    result = runner.invoke(main, ["validate", str(out / "model.onnx"), "--quiet", "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "v.json").read_text())["passed"]
    result = runner.invoke(main, ["validate", str(out / "model.onnx"), "--quiet", "--min-psnr-between", "400",
                                  "--max-abs", "0"])
    assert result.exit_code == 1 and "validation failed" in result.output
    result = runner.invoke(main, ["lint", str(out / "model.onnx"), "--no-parser"])
    assert result.exit_code == 0, result.output
    # no staging folder left behind (reruns replacing the folder: test_reliability's staged_folder tests;
    # identical bytes for identical input: test_export_is_byte_identical_for_identical_input)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fold_cli_writes_a_bundle_that_export_accepts(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["fold", "--out", str(tmp_path / "b"), "--w-bits", "4", "--a-bits", "8",
                                  "--calib-batches", "2"])
    assert result.exit_code == 0, result.output
    assert "MB vs" in result.output and _files(tmp_path / "b") == {"bundle.safetensors", "bundle.json"}
    result = runner.invoke(main, ["export", "--bundle", str(tmp_path / "b"), "--out", str(tmp_path / "e"),
                                  "--quiet", "--int4-weights", "--scan", "portable"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "e" / "model.json").read_text())
    assert meta["int4_weights"] > 0 and meta["graph"]["scan_nodes"] == 0


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "no/such/model.safetensors"], "is not a file"),
    (["--int4-weights"], "--w-bits is 8"),
    (["--method", "qmambair"], "Invalid value for '--method'"),
    (["--w-bits", "9"], "--w-bits 9 is out of range"),
    (["--checkpoint", "x.safetensors", "--bundle", "y"], "both given"),
    (["--scan", "kernel"], "Invalid value for '--scan'"),
])
def test_export_errors_are_one_sentence_and_leave_no_files(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", "--out", str(out), "--quiet", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_refuses_an_unusable_output_folder(tmp_path):
    runner = CliRunner()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = runner.invoke(main, ["export", "--out", str(foreign), "--quiet"])
    assert result.exit_code == 2 and "did not write" in result.output
    assert _files(foreign) == {"notes.txt"}
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    result = runner.invoke(main, ["export", "--out", str(a_file / "sub"), "--quiet"])
    assert result.exit_code == 2 and "--out" in result.output
    if os.geteuid() == 0 and os.access("/proc", os.W_OK):
        unwritable = Path("/proc/qmamba-deploy-test-out")  # no one may create folders in /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        unwritable = locked / "out"
    result = runner.invoke(main, ["export", "--out", str(unwritable), "--quiet"])
    assert result.exit_code == 2 and "not writable" in result.output
    assert not unwritable.exists()


def test_validate_and_lint_explain_bad_files(tmp_path):
    runner = CliRunner()
    bogus = tmp_path / "m.onnx"
    bogus.write_bytes(b"\x00garbage")
    result = runner.invoke(main, ["lint", str(bogus)])
    assert result.exit_code == 2 and "not a readable ONNX model" in result.output
    result = runner.invoke(main, ["validate", str(bogus)])
    assert result.exit_code == 2 and "not a readable ONNX model" in result.output


def test_per_channel_weights_dequantize_on_the_output_axis(tmp_path):
    from qmamba_deploy.quant.deploy import ActQuant, DeployLinear, FoldedWeight

    g = torch.Generator().manual_seed(0)
    weight = FoldedWeight((16, 8), 8, axis=1, per_channel=True)   # [in, out] MatMul operand
    weight.q.copy_(torch.randint(-127, 128, (16, 8), generator=g, dtype=torch.int8))
    weight.scale.copy_(torch.rand(8, generator=g) / 100 + 1e-3)
    layer = DeployLinear(16, 8, True, ActQuant(8, -128, 127, False).set(0.02), weight).eval()
    layer.upscale = 1
    x = torch.randn(3, 5, 16, generator=g)
    prog = torch.onnx.export(layer, (x,), dynamo=True, opset_version=21, verbose=False,
                             custom_translation_table=qdq_translation_table())
    proto = prog.model_proto
    proto.ir_version = 10
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear"
              and any(a.name == "axis" and a.i == 1 for a in n.attribute))
    assert dq is not None
    path = tmp_path / "pc.onnx"
    onnx.save(proto, str(path))
    assert lint_onnx(path, use_parser=False).passed
    y = onnx_runner(path)(x)  # (a plain InferenceSession hits ORT's QDQ propagation bug, see runtime/ort.py)
    with torch.no_grad():
        assert (y - layer(x)).abs().max() <= 1e-5


def test_large_models_go_to_external_data(tmp_path, w4a4_v2, monkeypatch):
    import qmamba_deploy.export.onnx_export as ox

    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 0)
    manifest = export_onnx(w4a4_v2, tmp_path / "m.onnx", ExportOptions())
    assert manifest["external_data"] and (tmp_path / "m.onnx.data").is_file()
    x = _x(3)
    with torch.no_grad():
        ref = with_dls_mode(w4a4_v2, "static")(x)
    assert psnr_between(onnx_runner(tmp_path / "m.onnx")(x), ref) >= 45.0


def test_a_quantized_w4_checkpoint_exports_with_int4_weights(tmp_path):
    from qmamba_deploy import save_checkpoint

    q = _quantized("v2", "lsq", 4, 4)
    save_checkpoint(q, tmp_path / "q.safetensors", extra={"task": {"task": "sr", "scale": 2}})
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(tmp_path / "q.safetensors"), "--int4-weights",
                                       "--no-validate", "--out", str(tmp_path / "e"), "--quiet"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "e" / "model.json").read_text())
    assert meta["int4_weights"] > 0 and meta["qconfig"]["method"] == "lsq"
