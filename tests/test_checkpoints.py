"""Checkpoints: official layouts, detection, safe loading, clear errors, save/load round trip."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from qmamba_deploy import build_model, load_model, save_checkpoint
from qmamba_deploy.checkpoints import detect_arch, read_checkpoint
from qmamba_deploy.errors import CheckpointError

from .conftest import CHECKPOINTS, TINY_V1, TINY_V2, need


def _tiny(arch="MambaIRv2Light", kwargs=TINY_V2, seed=0):
    torch.manual_seed(seed)
    return build_model(arch, **kwargs).eval()


@pytest.mark.parametrize("arch,kwargs", [("MambaIRv2Light", TINY_V2), ("MambaIR", TINY_V1),
                                         ("MambaIRv2", dict(TINY_V2, upsampler="", upscale=1)),
                                         ("MambaIR", dict(TINY_V1, upsampler="pixelshuffle", upscale=3))])
def test_detect_arch_recovers_constructor_arguments(arch, kwargs):
    model = _tiny(arch, kwargs)
    detected = detect_arch(model.state_dict())
    assert detected.arch == arch
    for key, value in kwargs.items():
        assert detected.kwargs[key] == value, key


@pytest.mark.parametrize("scale", [2, 4])
def test_real_weights_load_by_detection(scale):
    path = need(CHECKPOINTS / f"mambairv2_light_x{scale}.safetensors")
    model = load_model(path)
    assert model.card.arch == "MambaIRv2Light" and model.upscale == scale
    assert model.card.kwargs["depths"] == [5, 5, 5, 5] and model.card.kwargs["num_tokens"] == 64
    assert model.card.provenance["arch_from"] == "detected"
    assert not model.training


def test_basicsr_nesting_and_module_prefix(tmp_path):
    model = _tiny()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    other = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    torch.save({"params": sd, "params_ema": other, "iter": torch.tensor(3)}, tmp_path / "net_g.pth")
    loaded = load_model(tmp_path / "net_g.pth")
    assert torch.equal(loaded.conv_first.weight, model.conv_first.weight)
    ema = load_model(tmp_path / "net_g.pth", prefer_ema=True)
    assert ema.conv_first.weight.abs().sum() == 0


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"params": Evil()}, f)
    with pytest.raises(CheckpointError, match="holds Python objects beyond tensors, which qmamba-deploy never "
                                              "unpickles") as info:
        read_checkpoint(path)
    assert "weights_only" not in str(info.value)  # torch's advice to unpickle anyway is never repeated
    torch.save({"params": Evil()}, path)  # torch's own format names the refused global
    with pytest.raises(CheckpointError, match=r"beyond tensors \((builtins\.)?print\)") as info:
        read_checkpoint(path)
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize("name,payload", [("corrupt.pth", b"\x00not a checkpoint" * 10),
                                          ("corrupt.safetensors", b"\xff" * 64),
                                          ("empty.safetensors", b"")])
def test_corrupt_files(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_model(path)


def test_missing_file():
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("no/such/file.pth")


def test_wrong_keys_are_named():
    sd = _tiny().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["norm.weight"]
    with pytest.raises(CheckpointError) as err:
        load_model(sd, arch="MambaIRv2Light", **TINY_V2)
    msg = str(err.value)
    assert "1 missing keys (e.g. norm.weight)" in msg and "1 unexpected keys (e.g. extra.weight)" in msg


def test_wrong_size_suggests_detected_arguments():
    sd = _tiny().state_dict()
    with pytest.raises(CheckpointError, match=r"shape mismatches.*Its keys describe MambaIRv2Light\(.*embed_dim=24"):
        load_model(sd, arch="mambairv2-light-x2")


def test_legacy_light_cab_layout():
    legacy = _tiny("MambaIR", dict(TINY_V1, legacy_light_cab=True))
    sd = legacy.state_dict()
    assert "layers.0.residual_group.blocks.0.conv_blk.cab.3.attention.1.weight" in sd
    assert detect_arch(sd).kwargs["legacy_light_cab"] is True
    assert load_model(sd).conv_first.weight.shape[0] == 32
    with pytest.raises(CheckpointError, match="before 2024-11"):
        load_model(sd, arch="MambaIR", **TINY_V1)


def test_save_and_reload_with_manifest(tmp_path):
    model = _tiny()
    manifest = save_checkpoint(model, tmp_path / "m.safetensors", provenance={"note": "test"})
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["arch"] == "MambaIRv2Light" and side["kwargs"]["embed_dim"] == 24
    assert side["sha256"] == manifest["sha256"] and side["params"] == sum(p.numel() for p in model.parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]  # no temp files left
    again = load_model(tmp_path / "m.safetensors")
    assert again.card.provenance["arch_from"] == "manifest"
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_save_refuses_other_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="must end in .safetensors"):
        save_checkpoint(_tiny(), tmp_path / "m.pth")
    assert not any(tmp_path.iterdir())


def test_safetensors_files_are_byte_identical_across_processes(tmp_path):
    """safetensors keeps metadata in a hash map whose order changes from process to process; our
    files sort it, so a checkpoint or bundle written twice has the same bytes (and still loads)."""
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file

    script = ("import sys, torch\nfrom qmamba_deploy.artifacts import save_safetensors\n"
              "save_safetensors({'w': torch.arange(6.).reshape(2, 3), 'q': torch.ones(3, dtype=torch.int8)}, "
              "sys.argv[1], {'format': 'pt', 'qmamba_deploy_checkpoint': '{}', 'b': 'c'})\n")
    files = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for f in files:
        subprocess.run([sys.executable, "-c", script, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    assert torch.equal(load_file(str(files[0]))["w"], torch.arange(6.).reshape(2, 3))
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt", "qmamba_deploy_checkpoint": "{}", "b": "c"}
