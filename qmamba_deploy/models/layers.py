"""Building blocks shared by MambaIR and MambaIRv2.

Module and parameter names follow the official code so that official
state_dicts load strictly; the computations are written from the papers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

#: RGB mean subtracted from the input by every MambaIR-family model (a plain
#: attribute in the official code, not part of the state_dict).
RGB_MEAN = (0.4488, 0.4371, 0.4040)


def image_mean(in_chans: int) -> torch.Tensor:
    """The (1, C, 1, 1) mean the official models subtract (zeros unless RGB)."""
    if in_chans == 3:
        return torch.tensor(RGB_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    return torch.zeros(1, 1, 1, 1)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def to_image(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw[0], hw[1])


class PatchEmbed(nn.Module):
    """Image -> token sequence with an optional LayerNorm (patch size 1)."""

    def __init__(self, embed_dim: int, norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_tokens(x)
        return self.norm(x) if self.norm is not None else x


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention (RCAN)."""

    def __init__(self, num_feat: int, squeeze_factor: int = 16):
        super().__init__()
        squeezed = num_feat // squeeze_factor
        if squeezed < 1:
            raise ValueError(
                f"ChannelAttention: {num_feat} channels // squeeze {squeeze_factor} = 0; "
                f"the official MambaIR CAB needs embed_dim >= {squeeze_factor}"
            )
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, squeezed, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(squeezed, num_feat, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel-attention block of MambaIR's VSS block.

    light: 1x1 C->C/2, depthwise 3x3, GELU, 1x1 C/2->C, depthwise 3x3 dilation 2, CA.
    classic: 3x3 C->C/3, GELU, 3x3 C/3->C, CA.
    legacy_light: the light-SR layout published before 2024-11 (classic shape
    with compress ratio 6: keys cab.0, cab.2, cab.3.attention).
    """

    def __init__(self, num_feat: int, variant: str = "classic", squeeze_factor: int = 30):
        super().__init__()
        self.variant = variant
        if variant == "light":
            mid = num_feat // 2
            self.cab = nn.Sequential(
                nn.Conv2d(num_feat, mid, 1),
                nn.Conv2d(mid, mid, 3, 1, 1, groups=mid),
                nn.GELU(),
                nn.Conv2d(mid, num_feat, 1),
                nn.Conv2d(num_feat, num_feat, 3, 1, padding=2, groups=num_feat, dilation=2),
                ChannelAttention(num_feat, squeeze_factor),
            )
        elif variant in ("classic", "legacy_light"):
            mid = num_feat // (3 if variant == "classic" else 6)
            self.cab = nn.Sequential(
                nn.Conv2d(num_feat, mid, 3, 1, 1),
                nn.GELU(),
                nn.Conv2d(mid, num_feat, 3, 1, 1),
                ChannelAttention(num_feat, squeeze_factor),
            )
        else:
            raise ValueError(f"CAB variant {variant!r} is unknown; use 'light', 'classic' or 'legacy_light'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cab(x)


def residual_conv(dim: int, resi_connection: str) -> nn.Module:
    """The conv closing each residual group and the body ('1conv' or '3conv')."""
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    raise ValueError(f"resi_connection {resi_connection!r} is unknown; use '1conv' or '3conv'")


class Upsample(nn.Sequential):
    """Conv + PixelShuffle stages (classic SR head): scale 2^n or 3."""

    def __init__(self, scale: int, num_feat: int):
        layers: list[nn.Module] = []
        if scale >= 2 and (scale & (scale - 1)) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upscale {scale} is not supported by the pixelshuffle head; use 2, 3, 4 or 8")
        super().__init__(*layers)


class UpsampleOneStep(nn.Sequential):
    """One conv + one PixelShuffle (lightweight SR head)."""

    def __init__(self, scale: int, num_feat: int, num_out_ch: int):
        super().__init__(nn.Conv2d(num_feat, scale * scale * num_out_ch, 3, 1, 1), nn.PixelShuffle(scale))


def build_head(model: nn.Module, upsampler: str, upscale: int, embed_dim: int, out_ch: int,
               num_feat: int = 64) -> None:
    """Register the official tail modules on ``model`` for ``upsampler``."""
    if upsampler == "pixelshuffle":
        model.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                   nn.LeakyReLU(inplace=True))
        model.upsample = Upsample(upscale, num_feat)
        model.conv_last = nn.Conv2d(num_feat, out_ch, 3, 1, 1)
    elif upsampler == "pixelshuffledirect":
        model.upsample = UpsampleOneStep(upscale, embed_dim, out_ch)
    elif upsampler in ("", None):
        if upscale != 1:
            raise ValueError(f"upscale {upscale} needs an upsampler; the residual head (upsampler '') is for upscale 1")
        model.conv_last = nn.Conv2d(embed_dim, out_ch, 3, 1, 1)
    else:
        raise ValueError(
            f"upsampler {upsampler!r} is not supported; use 'pixelshuffle', 'pixelshuffledirect' or '' (denoise/JPEG)"
        )


def run_head(model: nn.Module, x: torch.Tensor, body) -> torch.Tensor:
    """conv_first -> body (+ shallow skip) -> tail, per the model's upsampler.

    ``x`` is the mean-subtracted input; ``body`` maps shallow features to deep
    features of the same shape. The residual head (denoising/JPEG) adds the
    restored residual to the input image.
    """
    shallow = model.conv_first(x)
    feat = model.conv_after_body(body(shallow)) + shallow
    if model.upsampler == "pixelshuffle":
        return model.conv_last(model.upsample(model.conv_before_upsample(feat)))
    if model.upsampler == "pixelshuffledirect":
        return model.upsample(feat)
    return x + model.conv_last(feat)


def init_official_weights(m: nn.Module) -> None:
    """Training-from-scratch init of the official code (Linear trunc-normal, LN 1/0)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
