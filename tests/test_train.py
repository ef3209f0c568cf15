"""The training loop: schedule, EMA, losses, resume with nothing lost, DDP under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qmamba_deploy.cli import main
from qmamba_deploy.data.io import write_image
from qmamba_deploy.errors import OptionError
from qmamba_deploy.train import EMA, Schedule, TrainConfig, charbonnier_loss, state_digest, train_restoration

from .conftest import REPO, TINY_V2


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory):
    """Three small smooth-ish colour images (a model can learn something from them quickly)."""
    folder = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    for i in range(3):
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy) + 2 * i)], -1)
        img = 0.5 + 0.35 * base + 0.05 * rng.standard_normal((64, 64, 3))
        write_image(folder / f"img{i}.png", np.clip(img, 0, 1).astype(np.float32))
    return folder


def _cfg(data, **kw) -> TrainConfig:
    base = dict(arch="MambaIRv2Light", kwargs=dict(TINY_V2), scale=2, data=str(data), val_data=None, patch=16,
                batch=2, iters=8, lr=1e-3, save_every=3, log_every=1, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_schedule_is_a_pure_function_of_the_iteration():
    ms = Schedule("multistep", total=100, milestones=(0.5, 0.8), gamma=0.1)
    assert [ms.factor(i) for i in (0, 49, 50, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = Schedule("cosine", total=100, eta_min=0.0)
    assert cos.factor(0) == pytest.approx(1.0) and cos.factor(50) == pytest.approx(0.5)
    assert cos.factor(100) == pytest.approx(0.0)
    warm = Schedule("constant", total=100, warmup=4)
    assert [warm.factor(i) for i in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    with pytest.raises(OptionError, match="--milestones"):
        Schedule("multistep", milestones=(50,))
    with pytest.raises(OptionError, match="--schedule"):
        Schedule("step")


def test_charbonnier_loss():
    a, b = torch.zeros(4), torch.tensor([0.0, 3.0, 4.0, 0.0])
    expected = (2 * 1e-3 + np.sqrt(9 + 1e-6) + np.sqrt(16 + 1e-6)) / 4
    assert float(charbonnier_loss(a, b)) == pytest.approx(expected, rel=1e-6)


def test_ema_update():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.9 * before + 0.1 * model.weight)
    assert not ema.model.weight.requires_grad


def _final_weights(out):
    return load_file(str(out / "model.safetensors"))


def _logged_iters(out):
    return [json.loads(line)["iter"] for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]


class _Stop:
    def __init__(self, at, exc):
        self.at, self.exc = at, exc

    def __call__(self, it, loss):
        if it == self.at:
            raise self.exc


@pytest.fixture(scope="module")
def uninterrupted(hr_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = train_restoration(_cfg(hr_folder, ema=0.9), out, progress=False)
    assert result.iteration == 8 and result.resumed_from is None
    return out


@pytest.mark.parametrize("exc,resumes_at", [(KeyboardInterrupt(), 5), (RuntimeError("simulated crash"), 3)])
def test_interrupted_run_resumes_to_the_same_weights(hr_folder, tmp_path, uninterrupted, exc, resumes_at):
    """Ctrl-C saves the completed step; a crash falls back to the last periodic checkpoint (every 3)."""
    cfg = _cfg(hr_folder, ema=0.9)
    with pytest.raises(type(exc)):
        train_restoration(cfg, tmp_path, on_step=_Stop(5, exc), progress=False)
    assert not (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "last.json").read_text())["iteration"] == resumes_at
    result = train_restoration(cfg, tmp_path, progress=False)
    assert result.resumed_from == resumes_at
    full, resumed = _final_weights(uninterrupted), _final_weights(tmp_path)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert _logged_iters(tmp_path) == list(range(1, 9))  # no duplicated or missing log lines
    # only the newest two checkpoints are kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.state.pt")) == \
        ["iter_000006.state.pt", "iter_000008.state.pt"]


def test_training_changes_the_weights_and_ships_the_ema(hr_folder, uninterrupted):
    manifest = json.loads((uninterrupted / "model.json").read_text())
    assert manifest["provenance"]["weights"] == "ema" and manifest["provenance"]["iterations"] == 8
    torch.manual_seed(0)
    from qmamba_deploy import build_model

    init = build_model("MambaIRv2Light", **TINY_V2).state_dict()
    trained = _final_weights(uninterrupted)
    assert any(not torch.equal(init[k], trained[k]) for k in trained)


def test_rerun_with_other_settings_is_refused(hr_folder, uninterrupted):
    with pytest.raises(OptionError, match=r"other settings \(lr\)"):
        train_restoration(_cfg(hr_folder, ema=0.9, lr=5e-4), uninterrupted, progress=False)


def test_a_setting_the_run_record_lacks_counts_as_its_default(hr_folder, uninterrupted, tmp_path):
    """A run made before an option existed resumes while that option keeps its default, not after."""
    import shutil

    run = tmp_path / "older"
    shutil.copytree(uninterrupted, run)
    record = json.loads((run / "run.json").read_text())
    del record["config"]["grad_clip"]  # at its default (0.0) in this run
    del record["config"]["lr"]  # 1e-3 here, not the default 2e-4
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(OptionError, match=r"other settings \(lr\)"):
        train_restoration(_cfg(hr_folder, ema=0.9), run, progress=False)
    record["config"]["lr"] = 1e-3
    (run / "run.json").write_text(json.dumps(record))
    result = train_restoration(_cfg(hr_folder, ema=0.9), run, progress=False)
    assert result.resumed_from == 8 and result.iteration == 8


def test_loss_goes_down(hr_folder, tmp_path):
    cfg = _cfg(hr_folder, iters=40, save_every=100, lr=2e-3, batch=4)
    train_restoration(cfg, tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


def test_train_then_eval_cli(hr_folder, tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    args = ["train", "--arch", "MambaIRv2Light", "--out", str(out), "--data", str(hr_folder),
            "--val-data", str(hr_folder), "--iters", "4", "--patch", "16", "--batch", "2", "--device", "cpu",
            "--quiet"] + [x for k, v in TINY_V2.items() for x in ("--kwarg", f"{k}={json.dumps(v)}")]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "trained 4 iterations" in res.output and "validation: psnr" in res.output
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["task"]["label"] == "sr-x2"
    assert manifest["provenance"]["command"].startswith("qmamba-deploy train --arch MambaIRv2Light")
    report = tmp_path / "eval.json"
    res = runner.invoke(main, ["eval", "--checkpoint", str(out / "model.safetensors"), "--data", str(hr_folder),
                               "--json", str(report), "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    assert [r["image"] for r in data["images"]] == ["img0", "img1", "img2"]
    # the manifest's final validation ran the same evaluation on the same images
    assert data["mean"]["psnr"] == pytest.approx(manifest["validation"]["psnr"], abs=1e-5)
    # rerunning a finished run resumes at the end and does no more steps
    res = runner.invoke(main, args)
    assert res.exit_code == 0 and "resumed at 4" in res.output


def test_train_cli_errors(hr_folder, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--out", str(tmp_path), "--arch", "mambairv2-tiny-x2", "--task", "denoise",
                               "--data", str(hr_folder)])
    assert res.exit_code == 2 and "upscales x2 but --task denoise needs x1" in res.output
    res = runner.invoke(main, ["train", "--out", str(tmp_path), "--milestones", "a,b"])
    assert res.exit_code == 2 and "--milestones" in res.output
    res = runner.invoke(main, ["train", "--out", str(tmp_path), "--arch", "mambairv3"])
    assert res.exit_code == 2 and "unknown" in res.output


def test_state_digest_sees_every_byte():
    m = torch.nn.Linear(3, 2)
    d = state_digest(m)
    with torch.no_grad():
        m.bias[0] = torch.nextafter(m.bias[0], torch.tensor(9.0))
    assert state_digest(m) != d


@pytest.mark.slow
def test_torchrun_two_gloo_processes_end_with_identical_weights(hr_folder, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qmamba_deploy.cli", "train", "--arch", "MambaIRv2Light", "--out", str(out),
           "--data", str(hr_folder), "--val-data", "none", "--iters", "4", "--patch", "16", "--batch", "2",
           "--device", "cpu", "--quiet"] + [x for k, v in TINY_V2.items() for x in ("--kwarg", f"{k}={json.dumps(v)}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    manifest = json.loads((out / "model.json").read_text())
    digests = manifest["provenance"]["rank_digests"]
    assert manifest["provenance"]["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    from qmamba_deploy.checkpoints import load_model

    assert state_digest(load_model(out / "model.safetensors")) == digests[0]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
