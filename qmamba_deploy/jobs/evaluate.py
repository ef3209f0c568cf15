"""``qmamba-deploy eval`` over any artifact: a runner, tiled to what it accepts, scored like the papers."""

from __future__ import annotations

from collections.abc import Iterable

from ..data.datasets import Pair
from ..data.degrade import Degradation
from ..evaluate import EvalReport, evaluate_pairs
from ..runtime import Runner
from .restore import restore_tensor

__all__ = ["evaluate_runner"]


def evaluate_runner(runner: Runner, pairs: Iterable[Pair], degradation: Degradation, tile: int | None = None,
                    overlap: int = 16, seed: int = 0, progress: bool = False) -> EvalReport:
    """Score an open runner on every pair (tiled when ``tile`` is set or the artifact needs it)."""
    return evaluate_pairs(lambda x: restore_tensor(runner, x, tile=tile, overlap=overlap), pairs, degradation, seed,
                          progress)
