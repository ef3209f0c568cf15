"""Quantization: fake quantizers, quantized layers, the qconfig and its placement."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from .layers import QuantConv2d, QuantLinear
from .qconfig import METHODS, PTQ_METHODS, QAT_METHODS, RECIPES, QConfig, quantize_model, quantized_layer_names
from .quantizers import DLS, LSQ, RFA, Observer, Quantizer, qrange, quantizers


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[nn.Module]:
    """Quantizers in training mode (lazy init / observation), everything else in eval mode."""
    was = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.train()
    try:
        yield model
    finally:
        for m, t in was.items():
            m.training = t
    for m in model.modules():  # observers fix their scale from what they saw
        if isinstance(m, Observer) and not m.initialized and bool(torch.isfinite(m.x_max).all()):
            m.freeze()


__all__ = ["DLS", "LSQ", "METHODS", "Observer", "PTQ_METHODS", "QAT_METHODS", "QConfig", "QuantConv2d",
           "QuantLinear", "Quantizer", "RECIPES", "RFA", "calibrating", "qrange", "quantize_model",
           "quantized_layer_names", "quantizers"]
