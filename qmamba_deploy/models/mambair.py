"""MambaIR (Guo et al., ECCV 2024): residual state-space groups of VSS blocks.

Structure, from the paper and the official code's state_dict layout:

    MambaIR = conv_first -> PatchEmbed(LayerNorm) -> RSSG x n -> LayerNorm
              -> conv_after_body (+ shallow skip) -> reconstruction head
    RSSG    = RSSB x depth -> 3x3 conv, + group input
    RSSB    = x*s  + SS2D(LN(x));  x*s2 + CAB(LN(x))        (the "VSSBlock")
    SS2D    = in_proj -> dwconv3x3 + SiLU -> 4-direction selective scan
              -> LayerNorm -> * SiLU(z) -> out_proj

Our own code; only the parameter names follow the official layout so that
official checkpoints load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (
    CAB,
    DropPath,
    PatchEmbed,
    build_head,
    image_mean,
    init_official_weights,
    residual_conv,
    run_head,
    to_image,
    to_tokens,
)
from .scan_params import init_scan_params, project_scan_inputs, run_scan


class SS2D(nn.Module):
    """2D selective scan: four scan directions of one feature map, one scan op.

    The four sequences (row-major, column-major, and both reversed) are stacked
    as K = 4 groups of d_inner channels and run through one selective scan
    (``qmamba_deploy.ops.selective_scan``); the outputs are merged back to
    raster order and summed.
    """

    K = 4

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: float = 2.0,
                 dt_rank: int | str = "auto", bias: bool = False, conv_bias: bool = True):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        d = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d, bias=bias)
        self.conv2d = nn.Conv2d(d, d, d_conv, padding=(d_conv - 1) // 2, groups=d, bias=conv_bias)
        self.act = nn.SiLU()
        # Per-direction projections, stacked like the official code:
        #   x_proj_weight (K, dt_rank + 2N, d), dt_projs_weight (K, d, dt_rank)
        self.x_proj_weight = nn.Parameter(torch.empty(self.K, self.dt_rank + 2 * d_state, d))
        self.dt_projs_weight = nn.Parameter(torch.empty(self.K, d, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(self.K, d))
        self.A_logs = nn.Parameter(torch.empty(self.K * d, d_state))
        self.Ds = nn.Parameter(torch.empty(self.K * d))
        init_scan_params(self)
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d_model, bias=bias)

    # -- the four scan directions ------------------------------------------------
    @staticmethod
    def directions(x: torch.Tensor) -> torch.Tensor:
        """(B, d, H, W) -> (B, 4, d, L): row-major, column-major, reversed both."""
        b, d, h, w = x.shape
        hw = torch.stack([x.reshape(b, d, h * w), x.transpose(2, 3).reshape(b, d, h * w)], dim=1)
        return torch.cat([hw, torch.flip(hw, dims=[-1])], dim=1)

    @staticmethod
    def merge(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, 4, d, L) -> (B, d, L) in raster order, summed over directions."""
        b, _, d, length = y.shape
        inv = torch.flip(y[:, 2:4], dims=[-1])
        col = y[:, 1].reshape(b, d, w, h).transpose(2, 3).reshape(b, d, length)
        inv_col = inv[:, 1].reshape(b, d, w, h).transpose(2, 3).reshape(b, d, length)
        return y[:, 0] + inv[:, 0] + col + inv_col

    def scan_inputs(self, xs: torch.Tensor):
        """Per-direction projections: xs (B, K, d, L) -> (delta, B, C) of the scan."""
        return project_scan_inputs(self, xs)

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w = x.shape
        length = h * w
        xs = self.directions(x)
        dts, bs, cs = self.scan_inputs(xs)
        y = run_scan(self, xs.reshape(b, -1, length), dts.reshape(b, -1, length), bs, cs)
        return self.merge(y.reshape(b, self.K, d, length), h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2)))
        y = self.forward_core(x)
        y = y.transpose(1, 2).reshape(b, h, w, -1)
        y = self.out_norm(y) * F.silu(z)
        return self.out_proj(y)


class RSSB(nn.Module):
    """Residual state-space block (official name: VSSBlock)."""

    def __init__(self, dim: int, d_state: int, expand: float, cab_variant: str, drop_path: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = SS2D(dim, d_state=d_state, expand=expand)
        self.drop_path = DropPath(drop_path)
        self.skip_scale = nn.Parameter(torch.ones(dim))
        self.conv_blk = CAB(dim, cab_variant)
        self.ln_2 = nn.LayerNorm(dim)
        self.skip_scale2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, length, c = x.shape
        x = x.reshape(b, hw[0], hw[1], c)
        x = x * self.skip_scale + self.drop_path(self.self_attention(self.ln_1(x)))
        cab = self.conv_blk(self.ln_2(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x * self.skip_scale2 + cab
        return x.reshape(b, length, c)


class RSSBStack(nn.Module):
    """The blocks of one RSSG (official name: BasicLayer, key ``blocks``)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, hw)
        return x


class RSSG(nn.Module):
    """Residual state-space group: blocks, a closing conv, and a group skip."""

    def __init__(self, dim: int, depth: int, d_state: int, expand: float, cab_variant: str,
                 drop_path: list[float], resi_connection: str):
        super().__init__()
        self.residual_group = RSSBStack(
            [RSSB(dim, d_state, expand, cab_variant, drop_path[i]) for i in range(depth)])
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return to_tokens(self.conv(to_image(self.residual_group(x, hw), hw))) + x


class MambaIR(nn.Module):
    """MambaIR with the official constructor signature.

    ``upsampler``: 'pixelshuffle' (classic SR), 'pixelshuffledirect' (light SR,
    light CAB) or '' (denoising / JPEG: residual head, upscale 1).
    ``legacy_light_cab``: the light-SR CAB layout of checkpoints published
    before 2024-11 (cab.0/cab.2/cab.3). Unused official arguments (img_size,
    patch_size, drop_rate, use_checkpoint, ...) are accepted and ignored.
    """

    def __init__(self, img_size=64, patch_size=1, in_chans=3, embed_dim=96, depths=(6, 6, 6, 6),
                 drop_rate=0.0, d_state=16, mlp_ratio=2.0, drop_path_rate=0.1, norm_layer=None,
                 patch_norm=True, use_checkpoint=False, upscale=2, img_range=1.0, upsampler="",
                 resi_connection="1conv", legacy_light_cab=False, **kwargs):
        super().__init__()
        if patch_size not in (1, (1, 1)):
            raise ValueError(f"patch_size {patch_size} is not supported; MambaIR uses patch_size 1")
        self.in_chans = in_chans
        self.img_range = float(img_range)
        self.upscale = int(upscale)
        self.upsampler = upsampler or ""
        self.register_buffer("mean", image_mean(in_chans), persistent=False)

        if self.upsampler == "pixelshuffledirect":
            cab_variant = "legacy_light" if legacy_light_cab else "light"
        else:
            cab_variant = "classic"
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim, norm=patch_norm)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear decay rule
        self.layers = nn.ModuleList()
        start = 0
        for depth in depths:
            self.layers.append(RSSG(embed_dim, depth, d_state, mlp_ratio, cab_variant,
                                    dpr[start:start + depth], resi_connection))
            start += depth
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)
        build_head(self, self.upsampler, self.upscale, embed_dim, in_chans)
        self.apply(init_official_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        hw = (x.shape[2], x.shape[3])
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, hw)
        return to_image(self.norm(tokens), hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        x = run_head(self, x, self.forward_features)
        return x / self.img_range + mean
