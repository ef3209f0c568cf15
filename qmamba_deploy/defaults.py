"""The embedded default model (used when a command gets no --checkpoint)."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

#: Shipped in the repository's models/ folder, with a manifest and a model card.
DEFAULT_MODEL = "mambairv2_light_x2.safetensors"


def models_dir() -> Path:
    """models/ of the source tree (the package is installed editable from it)."""
    return Path(__file__).resolve().parent.parent / "models"


def default_checkpoint() -> Path:
    path = models_dir() / DEFAULT_MODEL
    if not path.is_file():
        raise CheckpointError(
            f"the embedded default model {path} is missing; install qmamba-deploy from a clone "
            f"(pip install -e .) or pass --checkpoint")
    return path
