"""Smoke test: both model families export to ONNX (fold + export_onnx, the product's path) with
the scan as one custom node each, and ONNX Runtime (scan as a Python custom op) reproduces the
official outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from qmamba_deploy import load_model
from qmamba_deploy.export.graph import scan_nodes
from qmamba_deploy.export.onnx_export import ExportOptions, export_onnx
from qmamba_deploy.fold import fold
from qmamba_deploy.ops import contract
from qmamba_deploy.runtime.ort import ort_session_with_scan

from .conftest import parity_case


@pytest.mark.parametrize("case,scans", [("mambair_light_x2_tiny", 4), ("mambairv2_light_x2_tiny", 4)])
def test_fp_model_exports_with_scan_nodes(tmp_path, case, scans):
    """The product's export path (fold, then export_onnx) on the official float models."""
    config, sd, x, expected = parity_case(case)
    model = load_model(sd, arch=config["class"], **config["kwargs"])
    path = tmp_path / "model.onnx"
    export_onnx(fold(model), path, ExportOptions(scan="plugin"))
    proto = onnx.load(str(path))
    nodes = scan_nodes(proto)
    assert len(nodes) == scans  # MambaIR: 1 per block (4 directions inside); MambaIRv2: 1 per ASSM
    assert all(n.op_type == contract.OP_TYPE and n.domain == contract.DOMAIN for n in nodes)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {"delta_softplus": 1, "plugin_version": b"1", "plugin_namespace": b"qmamba"}
    assert not any(f.name == contract.OP_TYPE for f in proto.functions)
    assert "Sort" not in {n.op_type for n in proto.graph.node} and "TopK" not in {n.op_type for n in proto.graph.node}
    session = ort_session_with_scan(path)
    y = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(y - expected).max() <= 1e-4
    other = torch.rand(2, 3, 33, 17, generator=torch.Generator().manual_seed(0))  # another batch and size
    with torch.no_grad():
        ref = model(other).numpy()
    y = session.run(None, {"input": other.numpy()})[0]
    assert y.shape == ref.shape == (2, 3, 66, 34)
    assert np.abs(y - ref).max() <= 1e-4
