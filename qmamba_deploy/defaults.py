"""The embedded default models (used when a command gets no --checkpoint).

They are our own small MambaIRv2-light-style models (preset
``mambairv2-tiny-x{2,4}``), trained by ``qmamba-deploy train`` on the
built-in train split; each has a manifest and a model card in ``models/``.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

#: scale -> file in the repository's models/ folder.
DEFAULT_MODELS = {2: "mambairv2_tiny_x2.safetensors", 4: "mambairv2_tiny_x4.safetensors"}
DEFAULT_SCALE = 2


def models_dir() -> Path:
    """models/ of the source tree (the package is installed editable from it)."""
    return Path(__file__).resolve().parent.parent / "models"


def default_checkpoint(scale: int | None = None) -> Path:
    scale = DEFAULT_SCALE if scale is None else int(scale)
    if scale not in DEFAULT_MODELS:
        raise CheckpointError(f"there is no embedded default model for x{scale} (only "
                              f"{', '.join(f'x{s}' for s in DEFAULT_MODELS)}); pass --checkpoint")
    path = models_dir() / DEFAULT_MODELS[scale]
    if not path.is_file():
        raise CheckpointError(
            f"the embedded default model {path} is missing; install qmamba-deploy from a clone "
            f"(pip install -e .) or pass --checkpoint")
    return path
