"""ModelCard: what a built model is, made in one place and carried in one attribute.

``build_model`` makes the card (the official class name and its constructor arguments);
``load_model`` adds the task, the quantization and where the weights came from;
``quantize_model`` and ``fold`` replace the quantization. Every manifest (checkpoint, bundle,
ONNX) is written from ``model.card``, and everything that needs to know what a model is reads
``model.card`` -- as timm's models carry their ``pretrained_cfg``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

__all__ = ["ModelCard", "card_of"]


@dataclass(frozen=True)
class ModelCard:
    """The facts about a model that outlive its tensors.

    * ``arch``: the official class name (``MambaIRv2Light``), ``kwargs``: its constructor arguments;
    * ``task``: the degradation it restores as the manifests write it (``{"task": "sr", "scale": 4}``),
      None when not recorded (super-resolution at its scale is then assumed);
    * ``qconfig``: the :class:`~qmamba_deploy.quant.QConfig` of a quantized model, None for float;
    * ``provenance``: where it came from (``checkpoint``, ``arch_from``, ``qconfig_from``, ...).
    """

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] | None = None
    qconfig: Any = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str | None:
        """The file the weights were read from (None for a model built in memory)."""
        return self.provenance.get("checkpoint")

    def replace(self, **changes: Any) -> ModelCard:
        return dataclasses.replace(self, **changes)


def card_of(model: nn.Module) -> ModelCard:
    """``model.card``; a model built outside ``build_model`` gets a card naming its class."""
    card = getattr(model, "card", None)
    return card if isinstance(card, ModelCard) else ModelCard(type(model).__name__)
