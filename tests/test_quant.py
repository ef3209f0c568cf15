"""Quantizer semantics (quantization.md), placement, checkpoints, and the Q-MambaIR fixture."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qmamba_deploy import build_model, load_model, save_checkpoint
from qmamba_deploy.errors import CheckpointError, OptionError
from qmamba_deploy.quant import (
    DLS,
    LSQ,
    RFA,
    Observer,
    QConfig,
    QuantConv2d,
    QuantLinear,
    calibrating,
    qrange,
    quantize_model,
    quantized_layer_names,
    quantizers,
)

from .conftest import PARITY, TINY_V1, TINY_V2, need, parity_case


def _init(q, x):
    q.train()
    with torch.no_grad(), calibrating(q):
        q(x)
    return q.eval()


def _x(n=4000, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) + shift


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("make", [lambda b: LSQ(b), lambda b: LSQ(b, offset=True), lambda b: RFA(b)])
def test_outputs_lie_on_the_grid(make, bits):
    q = make(bits)
    x = _x()
    _init(q, x)
    with torch.no_grad():
        q.beta.add_(0.03) if getattr(q, "beta", None) is not None else None
        y = q(x)
    beta = q.beta if getattr(q, "beta", None) is not None else 0
    k = ((y + beta) / q.alpha).detach()
    torch.testing.assert_close(k, torch.round(k), atol=1e-4, rtol=0)
    lo, hi = qrange(bits, True)
    assert float(k.min()) >= lo - 1e-4 and float(k.max()) <= hi + 1e-4


def test_unsigned_data_gets_the_unsigned_grid():
    q = _init(LSQ(4, offset=True), _x().abs())
    assert not q.is_signed and q.grid() == (0, 15)
    q = _init(LSQ(4, offset=True), _x())
    assert q.is_signed and q.grid() == (-8, 7)
    assert "bits=4" in repr(q) and "initialized=True" in repr(q)


def test_lsq_init_and_gradient_scale():
    x = _x()
    q = LSQ(4)
    q.train()
    y = q(x)
    qp = 7
    assert float(q.alpha.detach()) == pytest.approx(2 * float(x.abs().mean()) / math.sqrt(qp), rel=1e-6)
    y.sum().backward()
    v = x / q.alpha.detach()
    d_alpha = torch.where(v <= -8, torch.tensor(-8.0), torch.where(v >= 7, torch.tensor(7.0), torch.round(v) - v))
    g = 1 / math.sqrt(x.numel() * qp)
    assert float(q.alpha.grad) == pytest.approx(float(d_alpha.sum()) * g, rel=1e-4)


def test_rfa_equals_rounding_at_init_and_moves_with_its_anchors():
    x = _x()
    rfa, lsq = _init(RFA(4), x), _init(LSQ(4, offset=True), x)
    assert torch.equal(rfa.a.detach(), torch.arange(-8, 8, dtype=torch.float32))
    with torch.no_grad():
        lsq.alpha.copy_(rfa.alpha)
        torch.testing.assert_close(rfa(x), lsq(x), rtol=0, atol=0)
        before = rfa(x)
        rfa.a[9] += 0.6  # thresholds around anchor 1 move: 0.5 -> 0.8 and 1.5 -> 1.8
        after = rfa(x)
    v = (x / rfa.alpha).detach()
    moved = ((v > 0.5) & (v <= 0.8)) | ((v > 1.5) & (v <= 1.8))
    assert moved.any()
    torch.testing.assert_close((before - after)[moved], rfa.alpha.detach().expand(int(moved.sum())))
    assert torch.equal(before[~moved], after[~moved])


def test_rfa_backward_slopes():
    q = RFA(3)  # levels -4..3, grid -4..3 once signed
    q.init_state.fill_(1)
    q.signed.fill_(1)
    with torch.no_grad():
        q.alpha.fill_(1.0)
        q.a.copy_(torch.tensor([-3.5, -3.0, -2.0, -1.0, 0.0, 2.0, 2.5, 2.8]))
    q.eval()
    v = torch.tensor([-3.8, -3.2, -1.5, 0.5, 1.5, 2.2, 2.9], requires_grad=True)
    q(v).sum().backward()
    # below a[0] and above a[-1]: 0.1; inside cell i: 1 / (a[i+1] - a[i])
    expected = torch.tensor([0.1, 2.0, 1.0, 0.5, 0.5, 2.0, 0.1])
    torch.testing.assert_close(v.grad, expected)
    assert q.a.grad is not None and q.a.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [2, 4])
def test_dls_init_and_alpha_clamp(bits):
    q = DLS(bits)
    x = _x(shift=3.0) * 0.5
    q.train()
    q(x)
    alpha, beta, _, _ = q.scale_offset(x)
    assert float(beta) == pytest.approx(-float(x.mean()), rel=1e-6)
    qp = 2 ** (bits - 1) - 1
    xb = x - x.mean()
    raw = (abs(float(xb.mean())) + 3 * float(xb.std())) / qp
    cap = float(x.max() - x.min()) / 2 ** bits
    assert float(alpha) == pytest.approx(min(max(raw, 1e-6), cap), rel=1e-5)
    assert (raw > cap) == (bits == 2)  # at 2 bits the range cap is what binds
    y = q(x)
    assert float(y.min()) >= float(x.min()) and float(y.max()) <= float(x.max())


def test_dls_passes_a_constant_tensor():
    q = DLS(4)
    q.train()
    x = torch.ones(10)
    assert torch.equal(q(x), x)


def test_observers():
    x = torch.cat([_x(100_000), torch.tensor([12.0])])  # one outlier
    mm, pc, ms = (_init(Observer(4, m), x) for m in ("minmax", "percentile", "mse"))
    assert float(mm.alpha) == pytest.approx(12.0 / 7)
    assert float(pc.alpha) < float(mm.alpha) and float(ms.alpha) < float(mm.alpha)
    err = {o.method: float(((o(x) - x) ** 2).mean()) for o in (mm, pc, ms)}
    assert err["mse"] <= err["minmax"]
    with pytest.raises(RuntimeError, match="no data"):
        Observer(4).eval()(x)


def test_qconfig_validation_and_round_trip():
    with pytest.raises(OptionError, match="--method"):
        QConfig("gptq")
    with pytest.raises(OptionError, match="--w-bits 1"):
        QConfig("lsq", w_bits=1)
    qc = QConfig("lsq+", 4, 8, keep_fp=("*.out_proj",), overrides=(("layers.1.*", 8, 8),))
    assert QConfig.from_dict(qc.as_dict()) == qc
    assert qc.bits_for("layers.1.conv") == (8, 8) and qc.bits_for("layers.0.conv") == (4, 8)


def test_placement_mambair_keeps_head_tail_and_channel_attention_fp():
    torch.manual_seed(0)
    model = build_model("MambaIR", **TINY_V1)
    names = quantized_layer_names(model)
    assert "layers.0.residual_group.blocks.0.self_attention.in_proj" in names
    assert "layers.0.residual_group.blocks.0.self_attention.out_proj" in names
    assert "layers.0.conv" in names
    assert not any("attention.1" in n or "attention.3" in n for n in names)
    assert not any(n.startswith(("conv_first", "conv_after_body", "upsample")) for n in names)
    quantize_model(model, QConfig("qmambair", keep_fp=("*.conv_blk.*",)))
    out_proj = model.get_submodule("layers.0.residual_group.blocks.0.self_attention.out_proj")
    assert isinstance(out_proj, QuantLinear) and isinstance(out_proj.linear_act_quant, DLS)
    assert isinstance(out_proj.linear_weight_quant, RFA)
    assert not isinstance(model.get_submodule("layers.0.residual_group.blocks.0.conv_blk.cab.0"), QuantConv2d)
    ss2d = model.get_submodule("layers.0.residual_group.blocks.0.self_attention")
    assert isinstance(ss2d.xs_q, DLS) and isinstance(ss2d.x_proj_act_q, LSQ)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, QConfig("lsq"))


@pytest.mark.parametrize("method", ["qmambair", "dls", "rfa", "lsq", "lsq+", "minmax", "percentile", "mse"])
def test_quantized_checkpoint_round_trip(tmp_path, method):
    torch.manual_seed(0)
    model = quantize_model(build_model("MambaIRv2Light", **TINY_V2), QConfig(method, 4, 4))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad(), calibrating(model):
        model(x)
    model.eval()
    assert all(q.initialized for _, q in quantizers(model))  # observers freeze when calibration ends
    with torch.no_grad():
        y = model(x)
    path = tmp_path / "q.safetensors"
    manifest = save_checkpoint(model, path)
    assert manifest["qconfig"]["method"] == method
    again = load_model(path)
    assert again.card.qconfig == model.card.qconfig
    with torch.no_grad():
        torch.testing.assert_close(again(x), y, rtol=0, atol=0)
    assert all(q.initialized for _, q in quantizers(again))


def test_qat_step_lowers_the_loss():
    torch.manual_seed(0)
    fp = build_model("MambaIRv2Light", **TINY_V2).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        target = fp(x)
    q = quantize_model(build_model("MambaIRv2Light", **TINY_V2), QConfig("qmambair", 4, 4))
    q.load_state_dict(fp.state_dict(), strict=False)
    q.train()
    opt = torch.optim.Adam(q.parameters(), lr=1e-4)
    losses = []
    for _ in range(10):
        loss = (q(x) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[1] < losses[0] and losses[-1] < 0.9 * losses[0]


def test_qmambair_fixture_reproduces_output():
    config, _, x, y = parity_case("qmambair_light_x4_w4a4_tiny")
    model = load_model(PARITY / "qmambair_light_x4_w4a4_tiny" / "state_dict.safetensors")
    assert model.card.qconfig == QConfig("qmambair", 4, 4)
    assert model.card.provenance["qconfig_from"].startswith("detected")
    with torch.no_grad():
        out = model(x).numpy()
    assert np.abs(out - y).max() <= 1e-4
    signed = {n: q.is_signed for n, q in quantizers(model)}
    assert signed["layers.0.residual_group.blocks.0.self_attention.Ds_q"] is False
    assert signed["layers.0.residual_group.blocks.0.self_attention.xs_q"] is True


def test_qmambair_official_class_name_and_k_bits():
    """load_model(sd, arch="QuantBL_L_MambaIR", **official kwargs with k_bits) builds what the official
    constructor builds; a k_bits that disagrees with the checkpoint, or none, is one clear sentence."""
    from safetensors.torch import load_file

    config, _, x, y = parity_case("qmambair_light_x4_w4a4_tiny")
    sd = load_file(str(PARITY / "qmambair_light_x4_w4a4_tiny" / "state_dict.safetensors"))
    assert config["class"] == "QuantBL_L_MambaIR" and config["kwargs"]["k_bits"] == 4
    model = load_model(sd, arch="QuantBL_L_MambaIR", **config["kwargs"])
    assert model.card.arch == "MambaIR" and model.card.qconfig == QConfig("qmambair", 4, 4)
    with torch.no_grad():
        assert np.abs(model(x).numpy() - y).max() <= 1e-4
    with pytest.raises(CheckpointError, match="W4A4 model but arch='QuantBL_L_MambaIR' was given k_bits=2"):
        load_model(sd, arch="QuantBL_L_MambaIR", **{**config["kwargs"], "k_bits": 2})
    without = {k: v for k, v in config["kwargs"].items() if k != "k_bits"}
    with pytest.raises(OptionError, match="needs its official k_bits"):
        load_model(sd, arch="QuantBL_L_MambaIR", **without)
    # a float state_dict through the quantized class: the quantizers' tensors are named as missing
    float_sd = {k: v for k, v in sd.items() if "_quant." not in k and "_q." not in k}
    with pytest.raises(CheckpointError, match="missing"):
        load_model(float_sd, arch="QuantBL_L_MambaIR", **config["kwargs"])


def test_unknown_quantized_layout_is_explained():
    from safetensors.torch import load_file

    sd = load_file(str(need(PARITY / "qmambair_light_x4_w4a4_tiny" / "state_dict.safetensors")))
    sd = {k: v for k, v in sd.items() if not k.endswith("_quant.a") and not k.endswith("weight_q.a")}
    with pytest.raises(CheckpointError, match="not in Q-MambaIR's layout"):
        load_model(sd)


def _quant_cli(ckpt, out, *extra):
    from click.testing import CliRunner

    from qmamba_deploy.cli import main

    return CliRunner().invoke(main, ["quantize", "--checkpoint", str(ckpt), "--out", str(out), "--patch", "16",
                                     "--batch", "2", "--device", "cpu", "--quiet", *extra])


def test_quantize_cli_ptq_and_qat_then_eval(tmp_path, tiny_ckpt):
    import json

    from click.testing import CliRunner

    from qmamba_deploy.cli import main

    res = _quant_cli(tiny_ckpt, tmp_path / "ptq", "--method", "percentile", "--w-bits", "8", "--a-bits", "8",
                     "--val-data", "none", "--calib-batches", "2")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "ptq" / "model.json").read_text())
    assert manifest["qconfig"]["method"] == "percentile" and manifest["qconfig"]["w_bits"] == 8
    assert manifest["quantized_from"] == str(tiny_ckpt)
    assert "natural photos" not in res.output  # calibration only: the training data's note is for QAT
    ptq = load_model(tmp_path / "ptq" / "model.safetensors")
    assert all(q.initialized for _, q in quantizers(ptq))

    res = _quant_cli(tiny_ckpt, tmp_path / "qat", "--method", "qmambair", "--iters", "3", "--distill", "0.5")
    assert res.exit_code == 0, res.output
    assert "qmambair W4A4" in res.output and "validation: psnr" in res.output
    assert "note: this QAT trained on the built-in train split" in res.output and "--data DIR" in res.output
    qat = load_model(tmp_path / "qat" / "model.safetensors")
    assert qat.card.qconfig.method == "qmambair"
    from qmamba_deploy.ops import scan_cpu
    from qmamba_deploy.quant import fake_quant_cpu

    # which passes trained it is on record (compiled C or torch: the gradients differ in the last bits)
    kernels = {"scan": scan_cpu.backend(), "fake_quant": fake_quant_cpu.backend()}
    assert json.loads((tmp_path / "qat" / "model.json").read_text())["provenance"]["cpu_kernels"] == kernels
    assert json.loads((tmp_path / "qat" / "run.json").read_text())["cpu_kernels"] == kernels
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "qat" / "model.safetensors"), "--quiet"])
    assert res.exit_code == 0 and "mean" in res.output

    res = _quant_cli(tmp_path / "qat" / "model.safetensors", tmp_path / "again", "--method", "lsq")
    assert res.exit_code == 2 and "already quantized" in res.output
    res = _quant_cli(tiny_ckpt, tmp_path / "bad", "--w-bits", "1")
    assert res.exit_code == 2 and "--w-bits 1" in res.output


@pytest.mark.slow
def test_qat_under_torchrun_two_gloo_processes(tmp_path, tiny_ckpt):
    import json
    import os
    import subprocess
    import sys

    from .conftest import REPO

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qmamba_deploy.cli", "quantize", "--checkpoint", str(tiny_ckpt), "--out", str(out),
           "--method", "qmambair", "--iters", "3", "--patch", "16", "--batch", "2", "--val-data", "none",
           "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    manifest = json.loads((out / "model.json").read_text())
    digests = manifest["provenance"]["rank_digests"]
    assert manifest["provenance"]["world_size"] == 2 and digests[0] == digests[1]
    assert manifest["qconfig"]["method"] == "qmambair"


# ------------------------------------------------------------------ sensitivity and precision policies
def test_layer_groups_cover_the_placement_exactly(tiny_v2):
    """Every quantized module is in exactly one group, and each group's key matches its own modules and no
    other (a '*' also matches dots, so keys that would over-match are written out)."""
    import fnmatch

    from qmamba_deploy.quant.qconfig import group_patterns, layer_groups, quantized_layer_names, scan_modules

    names = quantized_layer_names(tiny_v2) + [n for n, _ in scan_modules(tiny_v2)]
    for by in ("kind", "block"):
        groups = layer_groups(tiny_v2, by)
        assert sorted(n for members in groups.values() for n in members) == sorted(names)
        for key, members in groups.items():
            matched = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in group_patterns(key))}
            assert matched == set(members), key
    kinds = layer_groups(tiny_v2, "kind")
    assert "layers.*.residual_group.layers.*.wqkv" in kinds
    assert any(k.startswith("layers.[0-9].conv") for k in kinds)  # 'layers.*.conv' would match '...sg.conv'
    with pytest.raises(OptionError, match="--by"):
        layer_groups(tiny_v2, "row")


def test_only_one_group_quantized(tiny_v2):
    """The 'alone' configuration of sensitivity: keep_fp = every other module -> quantizers only in the group."""
    from qmamba_deploy.quant.qconfig import layer_groups

    groups = layer_groups(tiny_v2, "kind")
    key = "layers.*.residual_group.layers.*.wqkv"
    others = tuple(n for k, members in groups.items() if k != key for n in members)
    q = quantize_model(copy.deepcopy(tiny_v2), QConfig("minmax", 4, 4, keep_fp=others))
    owners = {n.rsplit(".", 1)[0] for n, _ in quantizers(q)}
    assert owners == set(groups[key])


def test_recommend_respects_the_budget_and_ranks_by_gain_per_weight():
    from qmamba_deploy.jobs.sensitivity import GroupScore, recommend

    groups = [GroupScore("a", 1, 100, 30.0, 29.0),   # buys 1 dB for 100 weights
              GroupScore("b", 1, 10, 30.0, 28.5),    # buys 0.5 dB for 10 weights: first
              GroupScore("c", 1, 500, 30.0, 29.5),   # buys 1.5 dB but does not fit
              GroupScore("d", 1, 5, 30.0, 27.9)]     # buys nothing
    policy = recommend(groups, 28.0, 1000, 0.15, 8)
    assert [o[0] for o in policy["overrides"]] == ["b", "a"]
    assert policy["promoted_share"] == pytest.approx(0.11)
    assert recommend(groups, 28.0, 1000, 0.0, 8)["overrides"] == []


def _tiny_sensitivity(ckpt, out, by: str, budget: str):
    """`sensitivity` of the tiny model at W2A2 minmax into ``out``: the report and the CLI result."""
    import json

    from click.testing import CliRunner

    from qmamba_deploy.cli import main

    res = CliRunner().invoke(main, ["sensitivity", str(ckpt), "--by", by, "--method", "minmax", "--w-bits", "2",
                                    "--a-bits", "2", "--budget", budget, "--patch", "16", "--batch", "2",
                                    "--calib-batches", "1", "--json", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text()), res


def test_sensitivity_from_an_earlier_report_rebudgets_without_measuring_the_groups(tmp_path, tiny_ckpt,
                                                                                   monkeypatch):
    """`sensitivity --from REPORT --budget B`: the policy re-derived from the report's measured groups, only the
    new policy measured; a file that is not a report, or the report as its own output, is one sentence."""
    import json

    from click.testing import CliRunner

    from qmamba_deploy.cli import main
    from qmamba_deploy.jobs import sensitivity as sens

    out = tmp_path / "sens.json"
    report, _ = _tiny_sensitivity(tiny_ckpt, out, by="kind", budget="0")
    assert report["policy"]["overrides"] == [] and len(report["groups"]) > 1
    buying = [g for g in report["groups"] if g["psnr_kept"] > report["psnr_quantized"]]
    assert buying  # at W2A2 keeping some group in float buys PSNR back

    calls = []
    measured = sens._Bench.measured
    monkeypatch.setattr(sens._Bench, "measured", lambda self, qc: calls.append(qc) or measured(self, qc))
    again = tmp_path / "sens-all.json"
    res = CliRunner().invoke(main, ["sensitivity", "--from", str(out), "--budget", "1", "--json", str(again),
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    new = json.loads(again.read_text())
    assert new["groups"] == report["groups"] and new["psnr_fp"] == report["psnr_fp"]
    assert new["config"] == {**report["config"], "budget": 1.0}
    assert len(calls) == 1 and calls[0].overrides  # the groups are not measured again; the policy is
    promoted = {o[0] for o in new["policy"]["overrides"]}
    assert promoted == {p for g in buying for p in sens.group_patterns(g["group"])}
    assert new["policy"]["promoted_share"] > 0 and new["psnr_policy"] != report["psnr_quantized"]

    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(report["policy"]))
    for args, message in ((["--from", str(tiny_ckpt)], "not a readable JSON file"),
                          (["--from", str(policy_file)], "not a sensitivity report"),
                          (["--from", str(out), "--json", str(out)], "--json"),
                          (["--from", str(out), "--w-bits", "4", "--patch", "32"],
                           "--w-bits, --patch cannot change a report read with --from")):
        res = CliRunner().invoke(main, ["sensitivity", *args, "--quiet"])
        assert res.exit_code == 2 and message in res.output, res.output


def test_sensitivity_cli_then_quantize_with_its_policy(tmp_path, tiny_ckpt):
    """`sensitivity --json` measures every group, writes a policy; `quantize --policy` applies it (the promoted
    modules get 8-bit quantizers) and --layer-bits / --keep-fp add to it; a bad policy is one sentence."""



    out = tmp_path / "sens.json"
    report, res = _tiny_sensitivity(tiny_ckpt, out, by="block", budget="1")
    assert [g["group"] for g in report["groups"]] == ["layers.0.*"]
    g = report["groups"][0]
    # one block is the whole placement: quantizing it alone is quantizing everything, keeping it is FP32
    assert g["psnr_alone"] == pytest.approx(report["psnr_quantized"], abs=1e-9)
    assert g["psnr_kept"] == pytest.approx(report["psnr_fp"], abs=1e-9)
    assert report["psnr_quantized"] < report["psnr_fp"]
    assert report["policy"]["overrides"] == [["layers.0.*", 8, 8]]
    assert report["psnr_policy"] > report["psnr_quantized"]
    assert "recommended policy: 1 group(s) at W8A8" in res.output

    res = _quant_cli(tiny_ckpt, tmp_path / "q", "--method", "minmax", "--w-bits", "4", "--a-bits", "4",
                     "--val-data", "none", "--calib-batches", "1", "--policy", str(out),
                     "--layer-bits", "*.wqkv=W6A6", "--keep-fp", "*.fc2")
    assert res.exit_code == 0, res.output
    q = load_model(tmp_path / "q" / "model.safetensors")
    assert q.card.qconfig.overrides == (("layers.0.*", 8, 8), ("*.wqkv", 6, 6))
    bits = {n: m.bits for n, m in quantizers(q)}
    assert bits["layers.0.residual_group.layers.0.wqkv.linear_weight_quant"] == 6
    assert bits["layers.0.residual_group.layers.0.win_mhsa.proj.linear_weight_quant"] == 8
    assert not any(".fc2." in n for n in bits)

    for bad, message in ((["--layer-bits", "*.wqkv=8"], "is not PATTERN=WxAy"),
                         (["--policy", str(tiny_ckpt)], "not a JSON file"),
                         (["--policy", "papers"], "neither a policy name"),
                         (["--layer-bits", "*.wqkvv=W8A8"], "'*.wqkvv' matches no module"),
                         (["--keep-fp", "*.ffn.fc2"], "'*.ffn.fc2' matches no module")):
        res = _quant_cli(tiny_ckpt, tmp_path / "bad", "--method", "minmax", "--val-data", "none", *bad)
        assert res.exit_code == 2 and message in res.output, res.output
        assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_a_policy_pattern_that_matches_nothing_is_refused():
    """A typo, or a policy measured on another architecture (MambaIRv2's modules on a MambaIR), is one sentence
    instead of a model quantized as if there were no policy."""
    from qmamba_deploy import build_model
    from qmamba_deploy.errors import OptionError
    from qmamba_deploy.jobs.sensitivity import read_policy
    from qmamba_deploy.quant.qconfig import QConfig, quantize_model

    from .test_fold import ARCHS

    def model(arch):
        name, kw = ARCHS[arch]
        return build_model(name, **kw).eval()

    docs_policy = Path(__file__).parents[1] / "docs/results-layer-sensitivity.json"
    v2_policy = tuple(tuple(o) for o in read_policy(str(docs_policy))["overrides"])
    quantize_model(model("v2"), QConfig("minmax", 4, 4, overrides=v2_policy))  # its own architecture: fine
    with pytest.raises(OptionError, match=r"matches no module this MambaIR quantizes .*measured on this arch"):
        quantize_model(model("v1"), QConfig("minmax", 4, 4, overrides=v2_policy))
    with pytest.raises(OptionError, match=r"--keep-fp / policy pattern 'layers\.9\.\*'"):
        quantize_model(model("v2"), QConfig("minmax", 4, 4, keep_fp=("layers.9.*",)))


# ------------------------------------------------------------------ step-size initialisation


def test_mse_step_is_the_rounding_error_minimum_among_its_candidates():
    from qmamba_deploy.quant.grid import mse_step

    g = torch.Generator().manual_seed(3)
    rows = torch.stack([torch.randn(5000, generator=g), torch.randn(5000, generator=g) ** 3])  # normal, heavy tail
    peak = rows.abs().amax(1)
    alpha = mse_step(rows, peak, (-8, 7))

    def err(r, a):
        return float(((torch.round(r / a).clamp(-8, 7) * a - r) ** 2).mean())

    for i in range(2):
        brute = min((err(rows[i], float(peak[i]) * f / 7), float(peak[i]) * f / 7)
                    for f in torch.linspace(0.2, 1.0, 100).tolist())
        assert err(rows[i], float(alpha[i])) <= brute[0] * (1 + 1e-6)
        assert err(rows[i], float(alpha[i])) < err(rows[i], float(peak[i]) / 7)  # better than min/max
    assert alpha[1] / peak[1] < alpha[0] / peak[0]  # the heavy tail is clipped harder


@pytest.mark.parametrize("make", [lambda: LSQ(4, offset=True), lambda: LSQ(4, signed=True, channels=6),
                                  lambda: RFA(4, channels=6)])
def test_step_init_mse_starts_at_a_lower_rounding_error_than_lsq(make):
    from qmamba_deploy.quant.quantizers import set_step_init

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 400, generator=g) ** 3 * torch.linspace(0.5, 3, 6)[:, None]  # heavy tails, per-row scales
    errs = {}
    for init in ("lsq", "mse"):
        q = make()
        assert set_step_init(q, init) == 1 and q.step_init == init
        q = _init(q, x)
        assert q.initialized and q.alpha.shape == (q.channels,)
        with torch.no_grad():
            errs[init] = float(((q(x) - x) ** 2).mean())
    assert errs["mse"] < 0.8 * errs["lsq"], errs
    with pytest.raises(ValueError, match="step init 'minmax' is unknown"):
        set_step_init(make(), "minmax")


def test_step_init_reaches_only_uninitialised_learnable_steps():
    from qmamba_deploy.quant.quantizers import set_step_init

    model = quantize_model(build_model("MambaIRv2Light", **TINY_V2).eval(), QConfig("qmambair", 4, 4))
    learnable = [q for _, q in quantizers(model) if isinstance(q, (LSQ, RFA))]
    assert learnable and set_step_init(model, "mse") == len(learnable)
    assert all(q.step_init == "lsq" for _, q in quantizers(model) if isinstance(q, DLS))
    learnable[0].init_state.fill_(1.0)
    assert set_step_init(model, "lsq") == len(learnable) - 1


def test_quantize_step_init_mse_cli_and_where_it_does_not_apply(tmp_path, tiny_ckpt):
    import json

    from qmamba_deploy.jobs.quantize import QuantizeConfig

    res = _quant_cli(tiny_ckpt, tmp_path / "qat", "--method", "lsq", "--iters", "1", "--step-init", "mse",
                     "--val-data", "none")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "qat" / "model.json").read_text())["provenance"]["config"]["step_init"] == "mse"
    for method in ("mse", "spr2q"):
        res = _quant_cli(tiny_ckpt, tmp_path / method, "--method", method, "--step-init", "mse")
        assert res.exit_code == 2 and "--step-init mse" in res.output and method in res.output, res.output
        assert not (tmp_path / method).exists()
    with pytest.raises(OptionError, match="--step-init 'max' is unknown"):
        QuantizeConfig(checkpoint=str(tiny_ckpt), step_init="max")


def test_qat_start_is_the_initialised_model_a_run_begins_from(tiny_ckpt):
    from qmamba_deploy.jobs.quantize import QuantizeConfig, qat_start

    def cfg(**kw):
        return QuantizeConfig(checkpoint=str(tiny_ckpt), arch="MambaIRv2Light", kwargs=dict(TINY_V2), scale=2,
                              patch=16, batch=2, calib_batches=1, device="cpu", **kw)

    starts = {init: qat_start(cfg(method="lsq", step_init=init)) for init in ("lsq", "mse")}
    for m in starts.values():
        assert not m.training and all(q.initialized for _, q in quantizers(m))
    alphas = {k: torch.cat([q.alpha.detach().flatten() for _, q in quantizers(m)]) for k, m in starts.items()}
    assert alphas["lsq"].shape == alphas["mse"].shape and not torch.allclose(alphas["lsq"], alphas["mse"])
    with pytest.raises(OptionError, match="not a QAT method"):
        qat_start(cfg(method="minmax"))
