"""Selective-scan parameters: initialisation (Mamba's S4D-real recipe) and input projections.

Shared by SS2D (MambaIR, K = 4 directions) and MambaIRv2's single-direction
scan (K = 1). Only used when training from scratch; checkpoints overwrite it.
"""

from __future__ import annotations

import math

import torch

from ..ops import selective_scan


@torch.no_grad()
def init_scan_params(m, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
    """Fill x_proj_weight, dt_projs_weight/bias, A_logs and Ds of module ``m``.

    - x_proj: uniform(+-1/sqrt(d_inner)) (nn.Linear's default bound),
    - dt_proj weight: uniform(+-dt_rank^-0.5), bias = softplus^-1(dt) with
      dt log-uniform in [dt_min, dt_max],
    - A_log = log(1..N) per channel (A = -exp(A_log) = -(1..N)), D = 1.
    """
    k, d, rank = m.dt_projs_weight.shape
    bound = 1.0 / math.sqrt(m.x_proj_weight.shape[-1])
    m.x_proj_weight.uniform_(-bound, bound)
    m.dt_projs_weight.uniform_(-rank ** -0.5, rank ** -0.5)
    dt = torch.exp(torch.rand(k, d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    m.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    n = m.A_logs.shape[1]
    m.A_logs.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(m.A_logs))
    m.Ds.fill_(1.0)


#: Where a quantized model puts its quantizers (official Q-MambaIR names): the inputs and
#: weights of the two per-direction projections, and every operand of the scan.
PROJ_QUANT_POINTS = ("x_proj_act_q", "x_proj_weight_q", "dt_proj_act_q", "dt_proj_weight_q")
SCAN_QUANT_POINTS = ("xs_q", "dts_q", "As_q", "Bs_q", "Cs_q", "Ds_q", "dt_projs_bias_q")
#: Scan operands that are parameters (quantized once at fold time, stored as constants); the
#: other scan points quantize activations.
PARAM_POINTS = ("As_q", "Ds_q", "dt_projs_bias_q")
#: The points that quantize activations: the projections' inputs and the scan's live operands.
ACT_QUANT_POINTS = (PROJ_QUANT_POINTS[0], PROJ_QUANT_POINTS[2],
                    *(p for p in SCAN_QUANT_POINTS if p not in PARAM_POINTS))


def quant_point(m: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """x through ``m.<name>`` when a quantizer sits there, else unchanged (float model)."""
    q = m._modules.get(name)
    return x if q is None else q(x)


def _quant_projection(m, x: torch.Tensor, weight: str, act: str, wq: str) -> torch.Tensor:
    """(B, K, D, L) x (K, C, D) -> (B, K, C, L) as Q-MambaIR computes it: matmul(act_q(x^T), weight_q(W^T)).

    In a deploy model (``qmamba_deploy.quant.deploy``) the weight point holds the folded
    integer weight, already in the (K, D, C) layout, and computes the product itself.
    """
    xt = quant_point(m, act, x.permute(0, 1, 3, 2))
    folded = m._modules.get(wq)
    if hasattr(folded, "matmul"):
        y = folded.matmul(xt)
    else:
        y = torch.matmul(xt, quant_point(m, wq, getattr(m, weight).permute(0, 2, 1)))
    return y.permute(0, 1, 3, 2)


def project_scan_inputs(m, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-direction projections of module ``m``: xs (B, K, d, L) -> (delta, B, C).

    x_proj_weight (K, dt_rank + 2N, d) gives dt (low rank), B and C; dt_projs_weight
    (K, d, dt_rank) lifts dt back to d channels. Shared by SS2D (K = 4) and
    MambaIRv2's SelectiveScan (K = 1). With quantizers attached (see
    ``PROJ_QUANT_POINTS``) both products quantize their inputs and weights.
    """
    if not any(n in m._modules for n in PROJ_QUANT_POINTS):
        # (K, C, D) @ (B, K, D, L) -> (B, K, C, L): the official einsum "bkdl,kcd->bkcl" as one
        # broadcast MatMul (ONNX Runtime's Einsum kernel is slower than its MatMul)
        x_dbl = torch.matmul(m.x_proj_weight, xs)
        dts, bs, cs = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=2)
        return torch.matmul(m.dt_projs_weight, dts), bs, cs
    x_dbl = _quant_projection(m, xs, "x_proj_weight", "x_proj_act_q", "x_proj_weight_q")
    dts, bs, cs = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=2)
    return _quant_projection(m, dts, "dt_projs_weight", "dt_proj_act_q", "dt_proj_weight_q"), bs, cs


def at_least_f32(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for a model run in double precision (validation's exact reference)."""
    return t if t.dtype == torch.float64 else t.float()


def scan_A(m) -> torch.Tensor:
    """The state matrix A = −exp(A_log) (D, N); a deploy model stores it precomputed as buffer ``A``."""
    folded = m._buffers.get("A")
    return folded if folded is not None else -torch.exp(at_least_f32(m.A_logs))


def run_scan(m, xs: torch.Tensor, dts: torch.Tensor, bs: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """The selective scan of ``m`` (SS2D or SelectiveScan) on (B, K*d, L) inputs, in float32.

    Float64 stays float64 (a double-precision reference run); anything else computes in
    float32. Every operand passes its quantization point (identity in a float model; a deploy
    model has folded the parameter operands A, D and the bias into constants).
    """

    q = lambda name, x: quant_point(m, name, x)  # noqa: E731
    return selective_scan(
        q("xs_q", at_least_f32(xs)),
        q("dts_q", at_least_f32(dts)),
        q("As_q", scan_A(m)),
        q("Bs_q", at_least_f32(bs)),
        q("Cs_q", at_least_f32(cs)),
        q("Ds_q", at_least_f32(m.Ds)),
        delta_bias=q("dt_projs_bias_q", at_least_f32(m.dt_projs_bias).reshape(-1)),
        delta_softplus=True,
    )
