"""The run folder: checkpoints (weights + weights_only-safe state), ``last.json``, the JSONL log."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import (
    atomic_path,
    is_kind,
    kind,
    write_json,
    write_text,
)
from ..checkpoints import save_checkpoint
from ..errors import CheckpointError
from .losses import EMA

RUN_KIND = kind("train run")

STATE_KIND = kind("train state")

class RunFolder:
    """The files of one training run (see the module docstring) and their atomic updates."""

    def __init__(self, out: str | os.PathLike):
        self.root = Path(out)
        self.ckpt_dir = self.root / "checkpoints"
        self.log = self.root / "log.jsonl"
        self.last = self.root / "last.json"
        self.run = self.root / "run.json"

    def weights(self, it: int) -> Path:
        return self.ckpt_dir / f"iter_{it:06d}.safetensors"

    def state(self, it: int) -> Path:
        return self.ckpt_dir / f"iter_{it:06d}.state.pt"

    def last_checkpoint(self) -> dict[str, Any] | None:
        if not self.last.is_file():
            return None
        return json.loads(self.last.read_text())

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, upto: int) -> None:
        """Drop log lines of iterations after ``upto`` (written before an interruption)."""
        if not self.log.is_file():
            return
        keep = [line for line in self.log.read_text().splitlines()
                if line.strip() and json.loads(line).get("iter", 0) <= upto]
        write_text(self.log, "".join(line + "\n" for line in keep))

def save_state(folder: RunFolder, it: int, model: nn.Module, optimizer, ema: EMA | None, ship: nn.Module,
          keep: int = 2) -> None:
    save_checkpoint(ship, folder.weights(it), provenance={"iteration": it, "run": str(folder.root)})
    state = {"kind": STATE_KIND, "iteration": it, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "ema": ema.model.state_dict() if ema else None}
    with atomic_path(folder.state(it)) as tmp:
        torch.save(state, tmp)
    write_json(folder.last, {"iteration": it, "weights": folder.weights(it).name, "state": folder.state(it).name})
    # older checkpoints are only removed once the new one is complete and pointed at
    done = sorted(folder.ckpt_dir.glob("iter_*.state.pt"))
    for old in done[:-keep]:
        stem = old.name[: -len(".state.pt")]
        for path in (old, folder.ckpt_dir / f"{stem}.safetensors", folder.ckpt_dir / f"{stem}.json"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

def load_state(folder: RunFolder, model: nn.Module, optimizer, ema: EMA | None) -> int:
    last = folder.last_checkpoint()
    state_file = folder.ckpt_dir / last["state"]
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one sentence
        raise CheckpointError(f"{state_file} could not be read ({exc.__class__.__name__}); delete {folder.last} "
                              f"to restart the run from scratch, or pass a new --out") from None
    if not is_kind(state.get("kind"), "train state"):
        raise CheckpointError(f"{state_file} is not a training state written by qmamba-deploy train")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        if state["ema"] is None:
            raise CheckpointError(f"{state_file} was saved without EMA but this run has --ema; use the same options")
        ema.model.load_state_dict(state["ema"])
    return int(state["iteration"])
