"""Distillation from the float model: its blocks' outputs, recorded during a forward.

SPR²Q's hybrid loss (:func:`qmamba_deploy.quant.spr2q.hybrid_loss`) and the QAT loop's
``--distill-features`` term both align a quantized student's block outputs with its float
teacher's; the blocks are the models' repeated units (MambaIR's RSSB, MambaIRv2's
AttentiveLayer).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from ..models.mambair import RSSB
from ..models.mambairv2 import AttentiveLayer


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks whose outputs are aligned: MambaIR's RSSB, MambaIRv2's AttentiveLayer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (RSSB, AttentiveLayer))]


class BlockFeatures:
    """Every block's output of ``model`` during a forward, in block order.

    As a context manager the hooks live for the ``with`` body; :meth:`attach` keeps them until
    :meth:`detach`. With ``training_only`` a forward in eval mode (validation) records nothing.
    """

    def __init__(self, model: nn.Module, training_only: bool = False):
        self.model, self.training_only = model, training_only
        self.outputs: dict[str, torch.Tensor] = {}
        self._hooks: list = []

    def attach(self) -> BlockFeatures:
        for name, m in block_modules(self.model):
            self._hooks.append(m.register_forward_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        """Remove the hooks and forget what they recorded."""
        self._remove_hooks()
        self.outputs.clear()

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            if module.training or not self.training_only:
                self.outputs[name] = output

        return record

    def values(self) -> list[torch.Tensor]:
        return list(self.outputs.values())

    def __enter__(self) -> BlockFeatures:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self._remove_hooks()  # the outputs stay readable after the ``with`` body


def feature_alignment(student: Iterable[torch.Tensor], teacher: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ‖s − t‖² / ‖t‖²: each block's relative squared error, so that the deep
    blocks' larger activations do not outweigh the shallow ones."""
    terms = [(s - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-12) for s, t in zip(student, teacher, strict=True)]
    if not terms:
        raise ValueError("feature alignment needs at least one block (the model has no RSSB / AttentiveLayer)")
    return torch.stack(terms).mean()
