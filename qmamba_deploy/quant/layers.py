"""Quantized Linear and Conv2d: a quantizer on the input activation and one on the weight.

Subclasses of the float layers with the same ``weight``/``bias`` keys, plus
the quantizers under Q-MambaIR's names (``linear_act_quant`` /
``linear_weight_quant``, ``conv_act_quant`` / ``conv_weight_quant``), so a
float checkpoint loads into the quantized model unchanged and Q-MambaIR's
checkpoints load strictly. The bias stays in float (it folds into the
integer accumulator's scale at export).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _or_identity(q: nn.Module | None) -> nn.Module:
    return q if q is not None else nn.Identity()


def _copy_float(q: nn.Module, m: nn.Module) -> nn.Module:
    """The float layer's weight and bias (and device) into its quantized replacement."""
    q.to(m.weight.device)
    with torch.no_grad():
        q.weight.copy_(m.weight)
        if m.bias is not None:
            q.bias.copy_(m.bias)
    return q


class QuantLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 act_quant: nn.Module | None = None, weight_quant: nn.Module | None = None):
        super().__init__(in_features, out_features, bias=bias)
        self.linear_act_quant = _or_identity(act_quant)
        self.linear_weight_quant = _or_identity(weight_quant)

    @classmethod
    def from_float(cls, m: nn.Linear, act_quant: nn.Module | None, weight_quant: nn.Module | None) -> QuantLinear:
        return _copy_float(cls(m.in_features, m.out_features, m.bias is not None, act_quant, weight_quant), m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.linear_act_quant(x), self.linear_weight_quant(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    def __init__(self, *args, act_quant: nn.Module | None = None, weight_quant: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_act_quant = _or_identity(act_quant)
        self.conv_weight_quant = _or_identity(weight_quant)

    @classmethod
    def from_float(cls, m: nn.Conv2d, act_quant: nn.Module | None, weight_quant: nn.Module | None) -> QuantConv2d:
        if m.padding_mode != "zeros":
            raise ValueError(f"padding_mode {m.padding_mode!r} is not supported for quantized convolutions")
        q = cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                act_quant=act_quant, weight_quant=weight_quant)
        return _copy_float(q, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.conv_act_quant(x), self.conv_weight_quant(self.weight), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)
