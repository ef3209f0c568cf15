"""ONNX Runtime sessions for exported graphs (CPU validation).

:func:`ort_session` opens an exported ONNX with the settings parity runs need:

* the ``QMambaSelectiveScan`` nodes run through the Python custom op (an in-memory copy
  with the nodes moved to ``ai.onnx.contrib``; see ``export/scan_onnx.py``);
* ``session.qdq_matmulnbits_accuracy_level = 0``: an INT4 DequantizeLinear + MatMul fused
  into MatMulNBits computes in float32 instead of ORT's default reduced accuracy;
* ``QDQPropagationTransformer`` is disabled: in ONNX Runtime 1.32 it combines with
  ``QDQS8ToU8Transformer`` into a QuantizeLinear whose output type and zero point type
  disagree, and the session fails to load (seen on the portable scan graphs). It only
  moves Q/DQ pairs for speed; the graph's values are unchanged without it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import OptionError

DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)

__all__ = ["ort_session", "onnx_runner", "DISABLED_OPTIMIZERS"]


def ort_session(path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0) -> Any:
    """An InferenceSession for an exported graph (custom scan op registered, parity settings)."""
    import onnxruntime as ort

    from ..export.scan_onnx import ort_session_with_scan

    if not os.path.isfile(path):
        raise OptionError(f"{path} is not a file; pass the .onnx that `qmamba-deploy export` wrote")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort_session_with_scan(path, providers=providers, session_options=options,
                                 disabled_optimizers=DISABLED_OPTIMIZERS)


def onnx_runner(path: str | os.PathLike, providers: Sequence[str] | None = None,
                threads: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A float NCHW -> float NCHW function that runs the graph (one input, one output)."""
    session = ort_session(path, providers, threads)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        y = session.run(None, {name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(y)

    return run
