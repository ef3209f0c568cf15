"""The codebase's own rules, checked in CI: layers only look down (import-linter, the contract in
pyproject.toml) and ruff is clean (line length, import order, the usual bug patterns)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_layers_only_look_down():
    pytest.importorskip("importlinter", reason="import-linter is not installed (the [dev] extra)")
    lint_imports = shutil.which("lint-imports")
    cmd = [lint_imports] if lint_imports else [sys.executable, "-c", "from importlinter.cli import lint_imports_command"
                                                                    " as c; c()"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_ruff_is_clean():
    pytest.importorskip("ruff", reason="ruff is not installed (the [dev] extra)")
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "qmamba_deploy", "tools", "tests"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_the_contract_names_every_package():
    """A new top-level package or module must take a place in the layers (or the contract would
    silently not look at it)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    listed = {name.strip() for layer in config["layers"] for name in layer.split("|")}
    package = ROOT / "qmamba_deploy"
    found = {f"qmamba_deploy.{p.stem}" for p in package.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert found == listed, (sorted(found - listed), sorted(listed - found))
