"""tools/natural_photos.py: a QAT folder of natural photos that never holds an eval photo."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from qmamba_deploy.data.builtin import builtin_split, sample_photo
from qmamba_deploy.data.datasets import load_pairs
from qmamba_deploy.data.degrade import Degradation
from qmamba_deploy.data.io import write_image

_spec = importlib.util.spec_from_file_location("natural_photos", Path(__file__).parents[1] / "tools/natural_photos.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, arr.astype(np.float32) / 255.0)


def test_the_folder_holds_the_skimage_photos_and_the_added_ones_with_their_hashes(tmp_path):
    rng = np.random.default_rng(0)
    _png(tmp_path / "extra/noise.png", rng.integers(0, 256, (64, 80, 3)))
    assert tool.main(["--out", str(tmp_path / "photos"), "--add", str(tmp_path / "extra")]) == 0
    listing = json.loads((tmp_path / "photos/photos.json").read_text())["photos"]
    assert [e["file"] for e in listing] == ["motorcycle_left.png", "motorcycle_right.png", "noise.png"]
    assert all(len(e["sha256"]) == 64 for e in listing)
    pairs = load_pairs(str(tmp_path / "photos"), Degradation("sr", 4), split="train")
    assert sorted(p.name for p in pairs) == ["motorcycle_left", "motorcycle_right", "noise"]


@pytest.mark.parametrize("which", ["whole", "crop"])
def test_an_eval_photo_is_refused_and_nothing_is_written(tmp_path, capsys, which):
    arr = sample_photo("coffee") if which == "whole" else dict(builtin_split("eval"))["coffee"]
    _png(tmp_path / "extra/innocent_name.png", arr)
    with pytest.raises(SystemExit) as exc:
        tool.main(["--out", str(tmp_path / "photos"), "--add", str(tmp_path / "extra")])
    assert "is the eval photo coffee" in str(exc.value) and "innocent_name.png" in str(exc.value)
    assert not (tmp_path / "photos").exists()


def test_a_folder_that_is_not_empty_is_refused_before_anything_is_read(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos/keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an empty folder"):
        tool.main(["--out", str(tmp_path / "photos")])
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["keep.txt"]


def test_an_add_folder_without_images_is_one_sentence(tmp_path):
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra/notes.txt").write_text("no pictures here")
    with pytest.raises(SystemExit, match="^--add: folder .*extra contains no images"):
        tool.main(["--out", str(tmp_path / "photos"), "--add", str(tmp_path / "extra")])
    assert not (tmp_path / "photos").exists()


def test_a_copy_that_fails_leaves_no_partial_folder(tmp_path, monkeypatch):
    _png(tmp_path / "extra/noise.png", np.zeros((64, 64, 3), np.uint8))

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tool.shutil, "copyfile", full_disk)
    with pytest.raises(SystemExit, match="was not written: .*No space left"):
        tool.main(["--out", str(tmp_path / "photos"), "--add", str(tmp_path / "extra")])
    assert not (tmp_path / "photos").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["extra"]


def test_eval_photo_of_names_whole_and_cropped_eval_photos_and_nothing_else():
    from qmamba_deploy.data.builtin import eval_photo_of

    assert eval_photo_of(sample_photo("rocket")) == "rocket"
    assert eval_photo_of(dict(builtin_split("eval"))["astronaut"]) == "astronaut (eval crop)"
    assert eval_photo_of(sample_photo("motorcycle_left")) is None
    shifted = dict(builtin_split("eval"))["chelsea"].copy()
    shifted[0, 0, 0] ^= 1  # one pixel differs: another image
    assert eval_photo_of(shifted) is None


def test_quant_results_refuses_a_training_folder_with_an_eval_photo_before_any_work(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quant_results", Path(__file__).parents[1] / "tools/quant_results.py")
    quant_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quant_results)
    _png(tmp_path / "photos/mine.png", sample_photo("coffee"))
    monkeypatch.setattr("sys.argv", ["quant_results.py", "--data", str(tmp_path / "photos"), "--checkpoint",
                                     str(tmp_path / "absent.safetensors"), "--runs", str(tmp_path / "runs")])
    with pytest.raises(SystemExit, match="holds mine.png, the eval photo coffee"):
        quant_results.main()
    monkeypatch.setattr("sys.argv", ["quant_results.py", "--data", str(tmp_path / "absent"), "--runs",
                                     str(tmp_path / "runs")])
    with pytest.raises(SystemExit, match="^--data: input .*absent does not exist"):
        quant_results.main()
    assert not (tmp_path / "runs").exists()
