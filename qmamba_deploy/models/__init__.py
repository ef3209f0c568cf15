"""MambaIR-family networks written from the papers, official state_dict layout."""

from .card import ModelCard, card_of
from .mambair import RSSB, RSSG, SS2D, MambaIR
from .mambairv2 import ASSB, ASSM, AttentiveLayer, MambaIRv2, MambaIRv2Light, WindowAttention
from .registry import ARCHS, PRESETS, Preset, build_model, count_parameters, resolve_arch
from .routing import PROMPT_ORDERS, ROUTING_MODES

__all__ = [
    "ARCHS", "ModelCard", "card_of", "PRESETS", "PROMPT_ORDERS", "ROUTING_MODES", "ASSB", "ASSM", "AttentiveLayer",
    "MambaIR", "MambaIRv2", "MambaIRv2Light", "Preset", "RSSB", "RSSG", "SS2D", "WindowAttention", "build_model",
    "count_parameters", "resolve_arch",
]
