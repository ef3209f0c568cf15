"""Selective-scan parameters: initialisation (Mamba's S4D-real recipe) and input projections.

Shared by SS2D (MambaIR, K = 4 directions) and MambaIRv2's single-direction
scan (K = 1). Only used when training from scratch; checkpoints overwrite it.
"""

from __future__ import annotations

import math

import torch


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


def project_scan_inputs(m, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-direction projections of module ``m``: xs (B, K, d, L) -> (delta, B, C).

    x_proj_weight (K, dt_rank + 2N, d) gives dt (low rank), B and C; dt_projs_weight
    (K, d, dt_rank) lifts dt back to d channels. Shared by SS2D (K = 4) and
    MambaIRv2's SelectiveScan (K = 1).
    """
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, m.x_proj_weight)
    dts, bs, cs = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=2)
    return torch.einsum("bkrl,kdr->bkdl", dts, m.dt_projs_weight), bs, cs
