"""MambaIRv2 (Guo et al., CVPR 2025): attentive state-space restoration.

    MambaIRv2 = conv_first -> PatchEmbed(LayerNorm) -> ASSB x n -> LayerNorm
                -> conv_after_body (+ shallow skip) -> reconstruction head
    ASSB      = AttentiveLayer x depth -> 3x3 conv, + group input
    AttentiveLayer:
        window MHSA (shifted on odd layers) + FFN        -> x = s1*shortcut + x_win
        ASSM (attentive state space) + FFN               -> x = s2*shortcut + ...
    ASSM = route tokens to T prompts -> semantic order -> 1-direction scan whose
           C gets the prompt ("attentive state-space equation") -> back to raster.

MambaIRv2 uses ConvFFN (S/B/L); MambaIRv2Light uses GatedMLP. Inputs are
padded to a multiple of the window by flip-and-concatenate and the output is
cropped back. Our own code; parameter names follow the official layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (
    PatchEmbed,
    build_head,
    image_mean,
    init_official_weights,
    residual_conv,
    run_head,
    to_image,
    to_tokens,
)
from .routing import PROMPT_ORDERS, ROUTING_MODES, gather_tokens, route, semantic_order
from .scan_params import at_least_f32, init_scan_params, project_scan_inputs, run_scan


# --------------------------------------------------------------------------- FFNs
class DWConv(nn.Module):
    """Depthwise conv + GELU over tokens (ConvFFN's local branch)."""

    def __init__(self, hidden: int, kernel_size: int = 5):
        super().__init__()
        self.depthwise_conv = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel_size, 1, (kernel_size - 1) // 2, groups=hidden), nn.GELU())

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return to_tokens(self.depthwise_conv(to_image(x, hw)))


class ConvFFN(nn.Module):
    """fc1 -> GELU -> x + DWConv(x) -> fc2 (MambaIRv2 S/B/L)."""

    def __init__(self, dim: int, hidden: int, kernel_size: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dwconv = DWConv(hidden, kernel_size)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.act(self.fc1(x))
        return self.fc2(x + self.dwconv(x, hw))


class Gate(nn.Module):
    """Spatial gate: first half * DWConv5x5(LayerNorm(second half))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x1 * to_tokens(self.conv(to_image(self.norm(x2), hw)))


class GatedMLP(nn.Module):
    """fc1 -> GELU -> Gate -> fc2 (hidden/2 -> dim) (MambaIRv2-light)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.sg = Gate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return self.fc2(self.sg(self.act(self.fc1(x)), hw))


# ---------------------------------------------------------------- window attention
def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, ws*ws, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B*nW, ws*ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) index into the (2ws-1)^2 relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


def _window_regions(h: int, w: int, ws: int, device=None) -> torch.Tensor:
    """(nW, ws*ws) region id of every token of every window, for windows shifted by ws/2: the
    tokens that the cyclic shift brought together from the image's far edges get other ids.

    Computed arithmetically (no slicing assignments), so it follows symbolic H, W when exported.
    """
    shift = ws // 2
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    rid = (rows >= h - ws).to(torch.int64) + (rows >= h - shift).to(torch.int64)
    cid = (cols >= w - ws).to(torch.int64) + (cols >= w - shift).to(torch.int64)
    region = (rid[:, None] * 3 + cid[None, :]).to(torch.float32)
    return window_partition(region.reshape(1, h, w, 1), ws).squeeze(-1)


def _region_mask(win: torch.Tensor) -> torch.Tensor:
    """(..., n) region ids -> (..., n, n) additive mask: -100 between tokens of different regions."""
    diff = win.unsqueeze(-2) - win.unsqueeze(-1)
    return torch.where(diff != 0, torch.full_like(diff, -100.0), torch.zeros_like(diff))


def shifted_window_mask(h: int, w: int, ws: int, device=None) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) additive mask (0 / -100) for windows shifted by ws/2 (the form the
    exported graph adds to the scores)."""
    return _region_mask(_window_regions(h, w, ws, device))


class WindowGroups:
    """The shifted layers' windows grouped by their mask, for PyTorch's fused attention.

    Only the windows on the last row and column of the shifted grid are masked, and all of a
    kind share one mask: inside (no mask), right edge, bottom edge, corner. Attending group by
    group with one (n, n) mask each avoids the (nW, heads, n, n) bias + mask sum, a fresh tensor
    of 16 MB per layer at 64x64 that cost more than the attention itself. ``groups``: (window
    indices, mask (n, n) or None); ``order``: the permutation that puts the groups' windows back.
    """

    def __init__(self, h: int, w: int, ws: int, device=None, dtype=torch.float32):
        regions = _window_regions(h, w, ws, device)
        patterns, kind = torch.unique(regions, dim=0, return_inverse=True)
        self.count = regions.shape[0]
        self.groups = []
        for j, pattern in enumerate(patterns):
            index = (kind == j).nonzero().flatten()
            masked = bool((pattern != pattern[0]).any())
            self.groups.append((index, _region_mask(pattern).to(dtype) if masked else None))
        self.order = torch.argsort(torch.cat([index for index, _ in self.groups]))


def shifted_windows(h: int, w: int, ws: int, device=None, dtype=torch.float32) -> torch.Tensor | WindowGroups:
    """What the shifted layers attend with: the dense (nW, n, n) mask in an exported graph (one Add, the
    pattern the runtimes fuse), WindowGroups in PyTorch (faster at every size measured on a 2-core CPU:
    1.3x per forward at 64x64, and a W4A4 QAT step on 24 px patches, 4 windows, 3.0 vs 3.5 s)."""
    if torch.onnx.is_in_onnx_export():
        return shifted_window_mask(h, w, ws, device=device).to(dtype)
    return WindowGroups(h, w, ws, device=device, dtype=dtype)


class _GatherRows(torch.autograd.Function):
    """table[index] whose gradient is one bincount per column: autograd's own backward of the
    gather (index_put with accumulate, 65k rows into 961 at a 16-px window) is 7x slower on a CPU."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return table.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        columns = [torch.bincount(index, weights=grad[:, j], minlength=ctx.rows) for j in range(grad.shape[1])]
        return torch.stack(columns, dim=1).to(grad.dtype), None


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of a 2-D ``table`` (the relative-position bias) at ``index``; in training, the gradient by
    bincount (``_GatherRows``); elsewhere (eval, export) a plain index_select, the same values."""
    if torch.is_grad_enabled() and table.requires_grad and table.device.type == "cpu":
        return _GatherRows.apply(table, index)
    return table.index_select(0, index)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def attention_bias(self, rpi: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The additive term of the softmax, 4-D: relative-position bias (1, heads, n, n), plus the
        shifted windows' mask as (nW, heads, n, n) when there is one -- one tensor, one Add in the
        graph. (4-D matters: torch's fused CPU attention takes only a 4-D mask; with a 3-D one it
        falls back to the unfused path, 7x slower here.)"""
        n = rpi.shape[0]
        bias = gather_rows(self.relative_position_bias_table, rpi.reshape(-1)).reshape(n, n, -1).permute(2, 0, 1)
        bias = bias.unsqueeze(0)
        # contiguous before the add: the permuted gather would hand its strides to the
        # (nW, heads, n, n) sum, written 4x slower and copied again inside the fused kernel
        bias = bias.contiguous()
        return bias if mask is None else bias + mask.unsqueeze(1)

    def forward(self, qkv: torch.Tensor, rpi: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """qkv: (B*nW, n, 3C) -> (B*nW, n, C)."""
        b_, n, c3 = qkv.shape
        c = c3 // 3
        heads = self.num_heads
        qkv = qkv.reshape(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                  # (B*nW, heads, n, d)
        if isinstance(mask, WindowGroups):
            x = self.grouped_attention(q, k, v, rpi, mask)
        elif torch.onnx.is_in_onnx_export():
            x = self.exported_attention(q, k, v, rpi, mask)
        else:
            bias = self.attention_bias(rpi, mask)                       # (1 or nW, heads, n, n)
            if mask is not None and b_ != mask.shape[0]:                # windows of several images
                bias = bias.repeat(b_ // mask.shape[0], 1, 1, 1)
            x = self.fused_attention(q, k, v, bias)
        return self.proj(x.transpose(1, 2).reshape(b_, n, c))

    def exported_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpi: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
        """The graph's attention: MatMul -> Add (relative-position bias) -> Softmax -> MatMul, the pattern
        ONNX Runtime and TensorRT fuse. The shifted windows' (nW, n, n) mask is a second Add on a view of
        the scores as (images, nW, heads, n, n), broadcast over images and heads, so that the graph
        builds no (B*nW, heads, n, n) bias per call (a sum and a Tile of 16 MB each at 64x64)."""
        scores = (q * self.scale) @ k.transpose(-2, -1) + self.attention_bias(rpi, None)
        if mask is not None:
            b_, heads, n, _ = scores.shape
            windows = mask.shape[0]
            scores = (scores.reshape(b_ // windows, windows, heads, n, n) + mask.unsqueeze(1)).reshape(b_, heads, n, n)
        return scores.softmax(dim=-1) @ v

    def fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """PyTorch: one fused kernel (4-D operands: the fused CPU kernel; 5-D ones fall back to the
        unfused math path), no (B*nW, heads, n, n) score tensor written and read back."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)

    def grouped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpi: torch.Tensor,
                          windows: WindowGroups) -> torch.Tensor:
        """The shifted windows, one fused attention per group of windows that share a mask."""
        b_, heads, n, d = q.shape
        bias = self.attention_bias(rpi, None)                           # (1, heads, n, n)
        qkv = torch.stack((q, k, v)).reshape(3, b_ // windows.count, windows.count, heads, n, d)
        outs = []
        for index, mask in windows.groups:
            gq, gk, gv = qkv.index_select(2, index).flatten(1, 2)
            outs.append(self.fused_attention(gq, gk, gv, bias if mask is None else bias + mask)
                        .reshape(-1, index.numel(), heads, n, d))
        return torch.cat(outs, dim=1).index_select(1, windows.order).reshape(b_, heads, n, d)


# ------------------------------------------------------------ attentive state space
class SelectiveScan(nn.Module):
    """Single-direction selective scan with a prompt added to C (K = 1)."""

    def __init__(self, d_inner: int, d_state: int):
        super().__init__()
        self.d_inner = d_inner
        self.d_state = d_state
        self.dt_rank = math.ceil(d_inner / 16)
        self.x_proj_weight = nn.Parameter(torch.empty(1, self.dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(1, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(1, d_inner))
        self.A_logs = nn.Parameter(torch.empty(d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(d_inner))
        init_scan_params(self)

    def scan_inputs(self, xs: torch.Tensor):
        """xs (B, 1, d, L) -> (delta, B, C) of the scan."""
        return project_scan_inputs(self, xs)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), prompt (B, L, N) -> (B, L, d)."""
        b, length, d = x.shape
        xs = x.permute(0, 2, 1).reshape(b, 1, d, length)
        dts, bs, cs = self.scan_inputs(xs)
        cs = at_least_f32(cs) + at_least_f32(prompt.permute(0, 2, 1).reshape(b, 1, self.d_state, length))
        y = run_scan(self, xs.reshape(b, d, length), dts.reshape(b, d, length), bs, cs)
        return y.permute(0, 2, 1)


class ASSM(nn.Module):
    """Attentive state-space module: routed prompts + semantic-order scan."""

    def __init__(self, dim: int, d_state: int, num_tokens: int = 64, inner_rank: int = 128,
                 mlp_ratio: float = 2.0, routing: str = "deterministic", prompt_order: str = "official"):
        super().__init__()
        self.dim = dim
        self.num_tokens = num_tokens
        self.d_state = d_state
        hidden = int(dim * mlp_ratio)
        self.selectiveScan = SelectiveScan(hidden, d_state)
        self.out_norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, dim, bias=True)
        self.in_proj = nn.Sequential(nn.Conv2d(dim, hidden, 1))
        self.CPE = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden))
        self.embeddingB = nn.Embedding(num_tokens, inner_rank)
        nn.init.uniform_(self.embeddingB.weight, -1 / num_tokens, 1 / num_tokens)
        self.route = nn.Sequential(nn.Linear(dim, dim // 3), nn.GELU(), nn.Linear(dim // 3, num_tokens),
                                   nn.LogSoftmax(dim=-1))
        self.routing = routing
        self.prompt_order = prompt_order

    def forward(self, x: torch.Tensor, hw: tuple[int, int], embedding_a: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) tokens; embedding_a (inner_rank, N) of the enclosing layer."""
        prompts = self.embeddingB.weight @ embedding_a  # (T, N)
        policy, cls = route(self.route(x), self.routing)
        prompt = policy @ prompts  # (B, L, N), raster order
        sort_idx, pos = semantic_order(cls, self.num_tokens, self.routing)
        if self.prompt_order == "sorted":  # corrected variant: prompt follows its token
            prompt = gather_tokens(prompt, sort_idx)
        # (official: the raster-order prompt is added to C of the sorted sequence, upstream issue #115)

        feat = self.in_proj(to_image(x, hw))
        feat = to_tokens(feat * torch.sigmoid(self.CPE(feat)))
        y = self.selectiveScan(gather_tokens(feat, sort_idx), prompt)
        y = self.out_proj(self.out_norm(y))
        return gather_tokens(y, pos)

    def extra_repr(self) -> str:
        return f"routing={self.routing}, prompt_order={self.prompt_order}"


# ------------------------------------------------------------------------ layers
class AttentiveLayer(nn.Module):
    """Window MHSA + FFN, then ASSM + FFN, with learned layer scales."""

    def __init__(self, dim: int, d_state: int, num_heads: int, window_size: int, shift_size: int,
                 inner_rank: int, num_tokens: int, convffn_kernel_size: int, mlp_ratio: float,
                 qkv_bias: bool = True, ffn: str = "convffn", routing: str = "deterministic",
                 prompt_order: str = "official"):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.scale1 = nn.Parameter(1e-4 * torch.ones(dim))
        self.scale2 = nn.Parameter(1e-4 * torch.ones(dim))
        self.wqkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.win_mhsa = WindowAttention(dim, window_size, num_heads)
        self.assm = ASSM(dim, d_state, num_tokens=num_tokens, inner_rank=inner_rank, mlp_ratio=mlp_ratio,
                         routing=routing, prompt_order=prompt_order)
        hidden = int(dim * mlp_ratio)
        if ffn == "convffn":
            self.convffn1 = ConvFFN(dim, hidden, convffn_kernel_size)
            self.convffn2 = ConvFFN(dim, hidden, convffn_kernel_size)
        else:
            self.convffn1 = GatedMLP(dim, hidden)
            self.convffn2 = GatedMLP(dim, hidden)
        self.embeddingA = nn.Embedding(inner_rank, d_state)
        nn.init.uniform_(self.embeddingA.weight, -1 / inner_rank, 1 / inner_rank)

    def window_attention(self, x: torch.Tensor, hw: tuple[int, int], rpi: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        h, w = hw
        b, n, c = x.shape
        qkv = self.wqkv(x).reshape(b, h, w, 3 * c)
        if self.shift_size > 0:
            qkv = torch.roll(qkv, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(qkv, self.window_size)
        attn = self.win_mhsa(windows, rpi, mask if self.shift_size > 0 else None)
        out = window_reverse(attn, self.window_size, h, w)
        if self.shift_size > 0:
            out = torch.roll(out, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return out.reshape(b, n, c)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], rpi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x_win = self.window_attention(self.norm1(x), hw, rpi, mask) + shortcut
        x_win = self.convffn1(self.norm2(x_win), hw) + x_win
        x = shortcut * self.scale1 + x_win

        shortcut = x
        x_aca = self.assm(self.norm3(x), hw, self.embeddingA.weight) + x
        x = x_aca + self.convffn2(self.norm4(x_aca), hw)
        return shortcut * self.scale2 + x


class AttentiveLayerStack(nn.Module):
    """The layers of one ASSB (official name: BasicBlock, key ``layers``)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, hw, rpi, mask):
        for layer in self.layers:
            x = layer(x, hw, rpi, mask)
        return x


class ASSB(nn.Module):
    """Attentive state-space block group: layers, a closing conv, a group skip."""

    def __init__(self, dim: int, depth: int, resi_connection: str, **layer_kwargs):
        super().__init__()
        ws = layer_kwargs["window_size"]
        self.residual_group = AttentiveLayerStack([
            AttentiveLayer(dim, shift_size=0 if i % 2 == 0 else ws // 2, **layer_kwargs) for i in range(depth)])
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x, hw, rpi, mask):
        return to_tokens(self.conv(to_image(self.residual_group(x, hw, rpi, mask), hw))) + x


# ------------------------------------------------------------------------- models
class MambaIRv2(nn.Module):
    """MambaIRv2 with the official constructor signature (ConvFFN).

    Ours on top of the official arguments: ``routing`` (see
    ``qmamba_deploy.models.routing``: deterministic | gumbel | official) and
    ``prompt_order`` ('official' reproduces upstream's prompt-order quirk,
    'sorted' is the corrected variant). Unused official arguments (img_size,
    use_checkpoint, norm_layer, ...) are accepted and ignored.
    """

    ffn = "convffn"

    def __init__(self, img_size=64, patch_size=1, in_chans=3, embed_dim=96, d_state=8, depths=(6, 6, 6, 6),
                 num_heads=(6, 6, 6, 6), window_size=16, inner_rank=32, num_tokens=64, convffn_kernel_size=5,
                 mlp_ratio=2.0, qkv_bias=True, norm_layer=None, ape=False, patch_norm=True, use_checkpoint=False,
                 upscale=2, img_range=1.0, upsampler="", resi_connection="1conv",
                 routing="deterministic", prompt_order="official", **kwargs):
        super().__init__()
        if ape:
            raise ValueError("ape=True (absolute position embedding) is not supported; no released MambaIRv2 uses it")
        if patch_size not in (1, (1, 1)):
            raise ValueError(f"patch_size {patch_size} is not supported; MambaIRv2 uses patch_size 1")
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads {list(num_heads)} and depths {list(depths)} must have the same length")
        _check_mode(routing, prompt_order)
        self.in_chans = in_chans
        self.img_range = float(img_range)
        self.upscale = int(upscale)
        self.upsampler = upsampler or ""
        self.window_size = int(window_size)
        self.register_buffer("mean", image_mean(in_chans), persistent=False)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim, norm=patch_norm)
        self.register_buffer("relative_position_index_SA", relative_position_index(self.window_size))
        self.layers = nn.ModuleList([
            ASSB(embed_dim, depth, resi_connection, d_state=d_state, num_heads=heads, window_size=self.window_size,
                 inner_rank=inner_rank, num_tokens=num_tokens, convffn_kernel_size=convffn_kernel_size,
                 mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, ffn=self.ffn, routing=routing, prompt_order=prompt_order)
            for depth, heads in zip(depths, num_heads)])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)
        build_head(self, self.upsampler, self.upscale, embed_dim, in_chans)
        self.apply(init_official_weights)

    def set_routing(self, routing: str | None = None, prompt_order: str | None = None) -> MambaIRv2:
        """Switch every ASSM's routing mode and/or prompt order; returns self."""
        for m in self.modules():
            if isinstance(m, ASSM):
                m.routing = routing or m.routing
                m.prompt_order = prompt_order or m.prompt_order
                _check_mode(m.routing, m.prompt_order)
        return self

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad H, W up to a multiple of the window by appending mirrored copies
        (flip-and-concatenate, edge pixel included), as the official code."""
        ws = self.window_size
        h, w = x.shape[-2:]
        hp = (h + ws - 1) // ws * ws
        wp = (w + ws - 1) // ws * ws
        while 2 * x.shape[-2] < hp:  # only inputs smaller than half a window
            x = torch.cat([x, torch.flip(x, [2])], 2)
        while 2 * x.shape[-1] < wp:
            x = torch.cat([x, torch.flip(x, [3])], 3)
        x = torch.cat([x, torch.flip(x, [2])], 2)[:, :, :hp, :]
        return torch.cat([x, torch.flip(x, [3])], 3)[:, :, :, :wp]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        hw = (x.shape[2], x.shape[3])
        mask = shifted_windows(hw[0], hw[1], self.window_size, device=x.device, dtype=x.dtype)
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, hw, self.relative_position_index_SA, mask)
        return to_image(self.norm(tokens), hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self.pad(x)
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        x = run_head(self, x, self.forward_features)
        x = x / self.img_range + mean
        return x[..., : h * self.upscale, : w * self.upscale]


class MambaIRv2Light(MambaIRv2):
    """MambaIRv2-light: the same network with GatedMLP instead of ConvFFN."""

    ffn = "gated"

    def __init__(self, img_size=64, patch_size=1, in_chans=3, embed_dim=48, d_state=8, depths=(6, 6, 6, 6),
                 num_heads=(4, 4, 4, 4), window_size=16, inner_rank=32, num_tokens=64, convffn_kernel_size=5,
                 mlp_ratio=2.0, **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         d_state=d_state, depths=depths, num_heads=num_heads, window_size=window_size,
                         inner_rank=inner_rank, num_tokens=num_tokens, convffn_kernel_size=convffn_kernel_size,
                         mlp_ratio=mlp_ratio, **kwargs)


def _check_mode(routing: str, prompt_order: str) -> None:
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing {routing!r} is unknown; use one of {', '.join(ROUTING_MODES)}")
    if prompt_order not in PROMPT_ORDERS:
        raise ValueError(f"prompt_order {prompt_order!r} is unknown; use one of {', '.join(PROMPT_ORDERS)}")
