"""Training with perturbed activation codes (``quantize --margin-noise σ``, ``quantize --qdrop p``).

A deployed low-bit model is discontinuous: two runtimes whose float sums differ by a few ulps move
some activations across a rounding boundary, and every flipped code perturbs what follows by a whole
step (docs/quantization.md, Deployment stability). :class:`MarginNoise` adds σ·U(−½, ½) of a step to
the input of every activation quantizer in training forwards, so that the network learns outputs that
do not depend on which side of a boundary a value falls — codes near a boundary flip at random during
training, as a runtime's rounding flips them at deployment. The noise is a training-time device only:
calibration (no gradient), validation (eval mode) and the deployed model never see it.

:class:`ActivationDrop` is QDrop's device (Wei et al., ICLR 2022, "QDrop: randomly dropping quantization
for extremely low-bit post-training quantization"), used here in QAT: in a training forward each
activation quantizer hands on its float input instead of its quantized output at a random fraction
``p`` of the elements, so the weights learn under a mix of quantized and float activations — the flatter
optimum the paper finds — and the step sizes still train on the rest. Also training-time only.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .qconfig import activation_quantizers
from .quantizers import DLS, Quantizer


def current_step(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """The step this activation quantizer applies to ``x`` (DLS: from the live tensor), no gradient."""
    with torch.no_grad():
        if isinstance(q, DLS):
            return q.scale_offset(x)[0].detach()
        alpha = getattr(q, "alpha", None)
        if alpha is None:
            raise ValueError(f"a {q.kind} quantizer has no step size to scale the margin noise by")
        return q.along(alpha.detach(), x)


def _in_training(q: Quantizer) -> bool:
    """A training forward of an initialised quantizer (not calibration, validation or export)."""
    return q.training and torch.is_grad_enabled() and q.initialized


class ActivationHooks:
    """Hooks on every activation quantizer of ``model`` for the duration of training: :meth:`attach` /
    :meth:`detach`, or a context. A subclass names itself (``what``) and implements :meth:`register`."""

    what = "hooks"

    def __init__(self, model: nn.Module):
        self.model = model
        self._hooks: list = []

    def register(self, q: Quantizer):
        raise NotImplementedError

    def attach(self) -> ActivationHooks:
        sites = activation_quantizers(self.model)
        if not sites:
            raise ValueError(f"{self.what} needs a quantized model (it has no activation quantizers)")
        self._hooks = [self.register(q) for _, q in sites]
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> ActivationHooks:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


class MarginNoise(ActivationHooks):
    """Perturbs every activation quantizer's input by ``sigma``·U(−½, ½) steps in training forwards
    (``sigma`` ≤ 1: at most a step wide)."""

    what = "margin noise"

    def __init__(self, model: nn.Module, sigma: float):
        if not 0 < sigma <= 1:
            raise ValueError(f"margin noise {sigma} must be in (0, 1] (a fraction of a step)")
        super().__init__(model)
        self.sigma = float(sigma)

    def register(self, q: Quantizer):
        return q.register_forward_pre_hook(self._perturb)

    def _perturb(self, q: Quantizer, args: tuple) -> tuple | None:
        if not _in_training(q):
            return None  # calibration, validation, export: the plain quantizer
        x = args[0]
        noise = (torch.rand_like(x) - 0.5) * (self.sigma * current_step(q, x))
        return (x + noise, *args[1:])


class ActivationDrop(ActivationHooks):
    """Keeps a random fraction ``p`` of every activation quantizer's outputs at their float inputs in
    training forwards (QDrop; 0 < ``p`` < 1)."""

    what = "qdrop"

    def __init__(self, model: nn.Module, p: float):
        if not 0 < p < 1:
            raise ValueError(f"qdrop {p} must be in (0, 1) (the fraction of activations left in float)")
        super().__init__(model)
        self.p = float(p)

    def register(self, q: Quantizer):
        return q.register_forward_hook(self._drop)

    def _drop(self, q: Quantizer, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not _in_training(q):
            return None  # calibration, validation, export: the plain quantizer
        keep = torch.rand_like(out) >= self.p
        return torch.where(keep, out, args[0])
