"""Bad and hostile input (issue 14): every case of tools/reliability.py, plus what an exit code cannot show.

* each case of ``tools/reliability.CASES`` (the table of docs/reliability.md): the exit status, one
  sentence with the expected words, no traceback, protected inputs unchanged, nothing left that must
  not exist;
* restore/eval over a folder with one bad image write the others;
* a staging folder left by a killed run is removed by the next run; Ctrl-C exits 130;
* the package's scripts pass names through as single words;
* --quiet output carries no third-party warnings.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import pytest

from qmamba_deploy.artifacts import clean_stale_staging, staged_folder

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reliability", ROOT / "tools" / "reliability.py")
reliability = importlib.util.module_from_spec(_spec)
sys.modules["reliability"] = reliability  # dataclasses look their module up while it loads
_spec.loader.exec_module(reliability)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return reliability.Workspace(tmp_path_factory.mktemp("reliability"))


def test_there_are_at_least_40_cases_in_every_class():
    assert len(reliability.CASES) >= 40
    assert {c.kind for c in reliability.CASES} == {"scripts", "overwrite", "sentence", "wrong-answer", "partial"}
    assert len({c.id for c in reliability.CASES}) == len(reliability.CASES)


@pytest.mark.parametrize("case", reliability.CASES, ids=lambda c: c.id)
def test_bad_input_gets_one_sentence_and_keeps_the_inputs(ws, case):
    outcome = reliability.run_case(case, ws)
    assert not outcome.traceback, outcome.message
    assert outcome.exit == case.exit, outcome.message
    assert case.expect.lower() in outcome.message.lower(), outcome.message
    assert not outcome.changed and not outcome.present, (outcome.changed, outcome.present)


def test_partial_runs_write_the_good_images(ws):
    reliability.run_case(next(c for c in reliability.CASES if c.id == "restore-folder-one-unreadable"), ws)
    assert cv2.imread(str(ws.out("partial") / "good.png")).shape == (80, 80, 3)
    assert not (ws.out("partial") / "broken.png").exists()


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "export"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = tmp_path / f".export.{dead.pid}.abc123.tmp"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    mine = tmp_path / f".export.{os.getpid()}.live.tmp"  # a live writer's folder stays
    mine.mkdir()
    with staged_folder(out, ("a.txt",)) as tmp:
        (tmp / "a.txt").write_text("done")
    assert not stale.exists() and mine.exists()
    assert (out / "a.txt").read_text() == "done"
    assert clean_stale_staging(out) == []
    # a rerun replaces the folder as a whole: files of the first run that the second does not write are gone
    with staged_folder(out, ("a.txt", "b.txt")) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.") and p != mine]


@pytest.mark.slow
def test_ctrl_c_exits_130_and_keeps_nothing_half_written(tmp_path):
    out = tmp_path / "export"
    # the child starts with SIGINT at its default, as under a terminal: a test run started in the
    # background by a non-interactive shell has SIGINT ignored, and children inherit that
    proc = subprocess.Popen([sys.executable, "-m", "qmamba_deploy.cli", "export", "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".export.") for p in tmp_path.iterdir()):
        time.sleep(0.1)  # wait for the staging folder: the job is under way (~40 s of export left)
    time.sleep(0.3)
    assert proc.poll() is None, "the export finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_ctrl_c_exits_130_even_after_a_nested_interpreter_saw_it(tmp_path):
    """A KeyboardInterrupt that passed through a nested PyRun_* call (as C extensions make) sets CPython's
    "unhandled interrupt" flag; under `python -m` the interpreter then killed itself with SIGINT (-2)
    whatever sys.exit asked for. The CLI must still exit 130."""
    (tmp_path / "boom_cli.py").write_text(textwrap.dedent("""
        import ctypes
        from qmamba_deploy import cli

        @cli.main.command("boom")
        def boom():
            run = ctypes.pythonapi.PyRun_String
            run.restype, run.argtypes = ctypes.py_object, [ctypes.c_char_p, ctypes.c_int,
                                                             ctypes.py_object, ctypes.py_object]
            run(b"raise KeyboardInterrupt", 257, {}, {})  # 257: Py_file_input

        if __name__ == "__main__":
            cli.main()
    """))
    proc = subprocess.run([sys.executable, "-m", "boom_cli", "boom"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr


def test_package_scripts_take_each_value_as_one_word(ws, tmp_path):
    from qmamba_deploy.trt.package import shell_words

    hostile = "x$(touch PWNED); `id` 'q' \"d\" \n y"
    word = shell_words(v=hostile)["v"]
    echoed = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, text=True, cwd=tmp_path)
    assert echoed.stdout == hostile and not (tmp_path / "PWNED").exists()


def test_quiet_output_has_no_library_noise(ws, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qmamba_deploy.cli", "export", "--checkpoint", str(ws.ckpt),
                           "--out", str(tmp_path / "e"), "--quiet", "--no-validate", "--calib-batches", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in (proc.stdout + proc.stderr).splitlines()
             if "Warning" in line or "torchvision" in line or line.startswith("W1")]
    assert noise == []
