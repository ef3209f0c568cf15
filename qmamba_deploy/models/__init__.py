"""MambaIR-family networks written from the papers, official state_dict layout."""

from .mambair import SS2D, MambaIR, RSSB, RSSG
from .mambairv2 import ASSB, ASSM, AttentiveLayer, MambaIRv2, MambaIRv2Light, WindowAttention
from .registry import ARCHS, PRESETS, Preset, build_model, count_parameters, resolve_arch
from .routing import PROMPT_ORDERS, ROUTING_MODES

__all__ = [
    "ARCHS", "PRESETS", "PROMPT_ORDERS", "ROUTING_MODES", "ASSB", "ASSM", "AttentiveLayer", "MambaIR",
    "MambaIRv2", "MambaIRv2Light", "Preset", "RSSB", "RSSG", "SS2D", "WindowAttention", "build_model",
    "count_parameters", "resolve_arch",
]
