"""qmamba-deploy: MambaIR-family restoration networks from checkpoint to TensorRT engine.

Public API::

    model = qmamba_deploy.load_model("mambairv2_light_x4.safetensors")   # arch detected
    model = qmamba_deploy.build_model("mambairv2-light-x4")              # untrained preset
"""

from .checkpoints import load_model, save_checkpoint
from .models import PRESETS, build_model

__version__ = "0.1.0"
__all__ = ["PRESETS", "__version__", "build_model", "load_model", "save_checkpoint"]
