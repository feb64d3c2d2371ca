"""Deformable-attention vision transformer (DAT++) image backbone, with the official state-dict key names.

Re-derived from the published DAT++ model (Xia et al., "DAT++: Spatially Dynamic Vision Transformer with
Deformable Attention", arXiv 2309.01430; code LeapLabTHU/DAT ``models/dat.py`` and ``models/dat_blocks.py``,
configs ``configs/dat_{tiny,small,base}.yaml``). The repository publishes ImageNet-1K weights of DAT++ only (the
CVPR 2022 DAT checkpoints are no longer listed), so DAT++ is what the module tree and the defaults follow; the
DAT (2022) tanh-bounded offsets are available as a named option (``offset_range_factor >= 0``).

Data path, images (N, 3, H, W) with H, W multiples of 32 (any multiple of 4 works):

- ``patch_proj``: conv 3x3 stride 2 -> LayerNorm -> GELU -> conv 3x3 stride 2 -> LayerNorm: stride 4, ``dim_stem``.
- four stages (strides 4, 8, 16, 32), a ``down_projs[i]`` (conv 3x3 stride 2 without bias -> LayerNorm) between
  stage i and i + 1. Every block of a stage is
  ``x += dwconv3x3(x)`` (local perception unit), ``x += attn(LN(x))``, ``x += ConvMLP(LN(x))``;
  ConvMLP is 1x1 conv (x4 wider) -> ``h + dwconv3x3(h)`` -> GELU -> 1x1 conv.
- attention per block, DAT++'s stage spec ``[N, D], [N, D] * 2, [N, D] * 9, [D, D]``:

  N, :class:`NeighborhoodAttention` (NATTEN semantics, kernel 7): each query attends to the 7x7 keys around it,
  the window shifted inwards at the borders so it always holds 49 keys, plus a learned bias per head indexed by
  the key-minus-query displacement (a (2k-1)^2 table). A map smaller than the kernel is zero-padded
  right/bottom to the kernel first (as the official module does); those pad tokens take part as keys.

  D, :class:`DeformableAttention`: a query map ``q = proj_q(x)``; per offset group, an offset network
  (depthwise conv with kernel ``ksize`` and stride ``stride`` -> LayerNorm -> GELU -> 1x1 conv to 2 channels)
  predicts (dy, dx) for a uniform grid of ``ceil(H / stride) x ceil(W / stride)`` reference points; keys and
  values are ``proj_k``/``proj_v`` of ``x`` sampled bilinearly at the deformed points; every query attends to
  all sampled keys of its group's heads with a continuous relative position bias, bilinear samples of a
  learned (2 Hq - 1) x (2 Wq - 1) table at the query-minus-key displacement.

Coordinates (the official ones, kept bit for bit so that published weights mean what they were trained to mean):
normalised (y, x) in [-1, 1] with ``align_corners=True`` (-1 = centre of the first pixel, +1 = centre of the
last). Reference point a of Hk along y sits at ``(a + 0.5) / (Hk - 1) * 2 - 1`` (normalised by ``Hk - 1``, so the
last ones lie past +1; that is the official grid). Offsets: DAT++ (``offset_range_factor < 0``) adds them
unbounded and clamps the positions to [-1, 1]; DAT (``offset_range_factor = s >= 0``) bounds them to
``s * tanh(.) / (Hk - 1)`` (resp. ``Wk - 1``) and zero-pads samples that fall outside. Query q at row i sits at
``i / (H - 1) * 2 - 1``. Degenerate one-row / one-column grids (official code divides by zero there) put the
point at 0.

Any image size: the offset network's output size is ``ceil(H / stride)`` for every H, the bias table is
interpolated, never indexed, so the deformable blocks take any feature size; neighbourhood attention takes any
size >= 7 and pads smaller maps to 7, exactly as the official module. No window partition constrains H, W.

The published ``rpe_table`` shapes depend on the ImageNet resolution (224: 56x56 queries at stride 4, tables
(heads, 111, 111), (heads, 55, 55), (heads, 27, 27), (heads, 13, 13)); ``pretrain_img_size`` fixes them, and at
any other input size the table is read by interpolation (what the official code does at a new resolution).

Implementation: attention through ``F.scaled_dot_product_attention`` (the bias as a float ``attn_mask``); the
bilinear sampling through ``F.grid_sample(..., align_corners=True)`` (exportable: ONNX GridSample, opset >= 16);
neighbourhood attention in tiles of 7x7 queries against the 13x13 keys holding all their windows, keys outside a
query's window masked in the SDPA bias (index tensors depend on the map size only).
Torch and numpy only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

__all__ = [
    "DATVariant",
    "DAT_VARIANTS",
    "ChannelsLayerNorm",
    "ConvMLP",
    "NeighborhoodAttention",
    "DeformableAttention",
    "DATStage",
    "DAT",
    "neighborhood_window_starts",
    "deformable_reference_points",
    "query_grid_points",
    "convert_official_dat_state_dict",
    "dat_complexity",
]


@dataclass(frozen=True)
class DATVariant:
    """Hyper-parameters of one published DAT++ model (LeapLabTHU/DAT ``configs/dat_<name>.yaml``).

    ``published_params_m`` / ``published_gflops`` / ``published_top1``: the DAT++ ImageNet-1K numbers at 224x224
    (FLOPs there are multiply-accumulates, the field's convention). The top-1 values are the repository README's;
    params and FLOPs were transcribed from the paper's table from memory, not re-checked against it here
    (docs/benchmarks.md says so beside the measured counts).
    """

    dim_stem: int
    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    heads: tuple[int, int, int, int]
    groups: tuple[int, int, int, int]
    drop_path_rate: float  # the ImageNet training value, for reference only
    published_params_m: float
    published_gflops: float
    published_top1: float


DAT_VARIANTS: dict[str, DATVariant] = {
    "tiny": DATVariant(64, (64, 128, 256, 512), (2, 4, 18, 2), (2, 4, 8, 16), (1, 2, 4, 8), 0.2, 24.0, 4.3, 83.9),
    "small": DATVariant(96, (96, 192, 384, 768), (2, 4, 18, 2), (3, 6, 12, 24), (1, 2, 3, 6), 0.4, 53.0, 9.4, 84.6),
    "base": DATVariant(128, (128, 256, 512, 1024), (2, 4, 18, 2), (4, 8, 16, 32), (2, 4, 8, 16), 0.7, 93.0, 16.6,
                       84.9),
}

# Shared by all three DAT++ configs.
_STAGE_SPEC_DATPP: tuple[str, ...] = ("ND", "NDND", "ND" * 9, "DD")  # N neighbourhood, D deformable, per block
_REFERENCE_STRIDES = (8, 4, 2, 1)  # reference-point grid stride in each stage's feature map
_OFFSET_KERNELS = (9, 7, 5, 3)  # depthwise kernel of the offset network in each stage
_NEIGHBORHOOD_KERNEL = 7
_MLP_EXPANSION = 4


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``conv`` applied as one batched matrix product (the same function; on CPU PyTorch runs 1x1 convs
    through its slow im2col path). (N, Cin, H, W) -> (N, Cout, H, W)."""
    n, _, h, w = x.shape
    weight = conv.weight.flatten(1)  # (Cout, Cin, 1, 1) -> (Cout, Cin)
    # (N, Cin, H*W) -> (N, Cout, H*W) -> (N, Cout, H, W)
    if conv.bias is None:
        out = torch.matmul(weight, x.reshape(n, x.shape[1], h * w))
    else:
        out = torch.baddbmm(conv.bias[None, :, None], weight.expand(n, -1, -1), x.reshape(n, x.shape[1], h * w))
    return out.reshape(n, weight.shape[0], h, w)


class ChannelsLayerNorm(nn.Module):
    """LayerNorm over the channels of a (N, C, H, W) map (the official ``LayerNormProxy``: key ``norm.*``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, H, W, C) -> norm -> (N, C, H, W)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvMLP(nn.Module):
    """DAT++'s MLP (official ``TransformerMLPWithConv``): 1x1 conv up, ``h + dwconv3x3(h)``, GELU, 1x1 conv down.

    Shapes: (N, C, H, W) -> (N, C, H, W). ``linear1``/``linear2`` are one-element Sequentials so the keys are the
    official ``linear1.0.*``/``linear2.0.*``.
    """

    def __init__(self, channels: int, expansion: int = _MLP_EXPANSION):
        super().__init__()
        hidden = channels * expansion
        self.linear1 = nn.Sequential(nn.Conv2d(channels, hidden, 1))
        self.dwc = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.linear2 = nn.Sequential(nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _pointwise(self.linear1[0], x)
        h = F.gelu(h + self.dwc(h))
        return _pointwise(self.linear2[0], h)


def neighborhood_window_starts(length: int, kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """First key index of every query's window along one axis, NATTEN's rule (dilation 1): the window of
    ``kernel_size`` keys is centred on the query and shifted inwards at the borders. (length,) int64; needs
    ``length >= kernel_size``."""
    half = kernel_size // 2
    return (torch.arange(length, device=device) - half).clamp(0, length - kernel_size)


def _axis_tiles(length: int, kernel_size: int, tile: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Query tiles and key regions along one axis for tiled neighbourhood attention (``length >= kernel_size``).

    Tile t holds the ``T = min(tile, length)`` queries ``q_index[t]`` (the last tile is moved back to end at the
    border, so it may overlap its neighbour) and the ``R = min(length, T + k - 1)`` keys ``k_index[t]``, which
    contain every window of its queries. ``allowed[t, i, a]``: key a is in query i's window; ``relative[t, i, a]``
    is key - query + k - 1 (the bias-table row; clamped where not allowed). ``out_index[p]``: the position of
    query p in the flattened (tiles * T) axis that is read back (each query once).
    """
    k = kernel_size
    t_size = min(tile, length)
    num_tiles = (length + t_size - 1) // t_size  # (ceil; no negative floor division: ONNX Div truncates)
    region = min(length, t_size + k - 1)
    q_start = (torch.arange(num_tiles, device=device) * t_size).clamp(max=length - t_size)  # (tiles,)
    q_index = q_start[:, None] + torch.arange(t_size, device=device)  # (tiles, T)
    window_start = neighborhood_window_starts(length, k, device)  # (length,)
    k_start = window_start[q_start].clamp(max=length - region)  # (tiles,)
    k_index = k_start[:, None] + torch.arange(region, device=device)  # (tiles, R)
    first = window_start[q_index][:, :, None]  # (tiles, T, 1)
    keys = k_index[:, None, :]  # (tiles, 1, R)
    allowed = (keys >= first) & (keys < first + k)  # (tiles, T, R)
    relative = (keys - q_index[:, :, None] + k - 1).clamp(0, 2 * k - 2)  # (tiles, T, R)
    positions = torch.arange(length, device=device)
    owner = torch.div(positions, t_size, rounding_mode="floor").clamp(max=num_tiles - 1)
    out_index = owner * t_size + (positions - q_start[owner])  # (length,)
    return {"q_index": q_index, "k_index": k_index, "allowed": allowed, "relative": relative,
            "out_index": out_index}


class NeighborhoodAttention(nn.Module):
    """2-D neighbourhood attention with relative position bias (the official ``NeighborhoodAttention2D``, NATTEN).

    Args:
        dim: channels C; ``num_heads`` must divide it.
        num_heads: attention heads.
        kernel_size: odd window side k (7 in DAT++).
        tile_size: queries are processed in tiles of ``tile_size x tile_size``, each against the
            ``(tile_size + k - 1)^2`` keys that hold all its windows, the keys outside a query's window masked
            (-inf) in the SDPA bias. The result does not depend on it; larger tiles trade wasted dot products for
            fewer duplicated keys.

    Keys (official): ``qkv`` (Linear C -> 3C), ``rpb`` (heads, 2k - 1, 2k - 1), ``proj`` (Linear C -> C).
    Shapes: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = _NEIGHBORHOOD_KERNEL, tile_size: int = 7):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"NeighborhoodAttention: dim={dim} is not divisible by num_heads={num_heads}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"NeighborhoodAttention: kernel_size={kernel_size}, expected an odd number >= 3")
        if tile_size < 1:
            raise ValueError(f"NeighborhoodAttention: tile_size={tile_size}, expected >= 1")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.tile_size = int(tile_size)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        self.proj = nn.Linear(dim, dim)

    def tiled_bias(self, rows: dict[str, torch.Tensor], cols: dict[str, torch.Tensor], dtype: torch.dtype
                   ) -> torch.Tensor:
        """SDPA bias (heads, tiles, T_h*T_w, R_h*R_w): rpb at (key - query) inside each window, -inf outside."""
        k2 = 2 * self.kernel_size - 1
        # (tr, Th, Rh) x (tc, Tw, Rw) -> (tr, tc, Th, Tw, Rh, Rw)
        index = rows["relative"][:, None, :, None, :, None] * k2 + cols["relative"][None, :, None, :, None, :]
        allowed = rows["allowed"][:, None, :, None, :, None] & cols["allowed"][None, :, None, :, None, :]
        tr, tc, th, tw, rh, rw = index.shape
        bias = self.rpb.flatten(1).to(dtype)[:, index.reshape(-1)].reshape(self.num_heads, tr, tc, th, tw, rh, rw)
        bias = bias.masked_fill(~allowed, float("-inf"))
        return bias.reshape(self.num_heads, tr * tc, th * tw, rh * rw)  # (heads, tiles, queries, keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h0, w0 = x.shape
        k, heads, d = self.kernel_size, self.num_heads, self.head_dim
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        pad_h, pad_w = max(0, k - h0), max(0, k - w0)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # zeros right/bottom, before qkv (the official order)
        h, w = h0 + pad_h, w0 + pad_w
        rows = _axis_tiles(h, k, self.tile_size, x.device)
        cols = _axis_tiles(w, k, self.tile_size, x.device)
        tr, th = rows["q_index"].shape
        tc, tw = cols["q_index"].shape
        rh, rw = rows["k_index"].shape[1], cols["k_index"].shape[1]
        # (N, H, W, 3C) -> (N, H, W, 3, heads, d) -> (3, N, heads, H, W, d)
        qkv = self.qkv(x).reshape(n, h, w, 3, heads, d).permute(3, 0, 4, 1, 2, 5)

        def tiles(t: torch.Tensor, row_index: torch.Tensor, col_index: torch.Tensor) -> torch.Tensor:
            # (N, heads, H, W, d) -> (N, heads, tr*Th, W, d) -> (N, heads, tr*Th, tc*Tw, d)
            t = t.index_select(2, row_index.reshape(-1)).index_select(3, col_index.reshape(-1))
            a, b = row_index.shape[1], col_index.shape[1]
            t = t.reshape(n, heads, tr, a, tc, b, d).permute(0, 1, 2, 4, 3, 5, 6)  # -> (N, heads, tr, tc, a, b, d)
            return t.reshape(n, heads * tr * tc, a * b, d)  # -> (N, heads*tiles, a*b, d)

        query = tiles(qkv[0], rows["q_index"], cols["q_index"])  # (N, heads*tiles, Th*Tw, d)
        key = tiles(qkv[1], rows["k_index"], cols["k_index"])  # (N, heads*tiles, Rh*Rw, d)
        value = tiles(qkv[2], rows["k_index"], cols["k_index"])
        bias = self.tiled_bias(rows, cols, query.dtype).reshape(1, heads * tr * tc, th * tw, rh * rw)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)  # (N, heads*tiles, Th*Tw, d)
        # (N, heads*tiles, Th*Tw, d) -> (N, heads, tr, tc, Th, Tw, d) -> (N, heads, tr, Th, tc, Tw, d)
        out = out.reshape(n, heads, tr, tc, th, tw, d).permute(0, 1, 2, 4, 3, 5, 6)
        out = out.reshape(n, heads, tr * th, tc * tw, d)  # -> (N, heads, tr*Th, tc*Tw, d)
        out = out.index_select(2, rows["out_index"][:h0]).index_select(3, cols["out_index"][:w0])  # (N, h, H0, W0, d)
        out = out.permute(0, 2, 3, 1, 4).reshape(n, h0, w0, c)  # (N, heads, H0, W0, d) -> (N, H0, W0, C)
        return self.proj(out).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)


def _normalise(coords: torch.Tensor, denominator: float) -> torch.Tensor:
    """Pixel-index-like coordinates -> [-1, 1] as ``coords / denominator * 2 - 1``; a zero denominator (a map of
    one row or column, where the official code divides by zero) maps every point to 0."""
    if denominator == 0:
        return torch.zeros_like(coords)
    return coords / denominator * 2.0 - 1.0


def deformable_reference_points(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uniform reference points of a (height, width) key grid, normalised (y, x) as the official code:
    ``(a + 0.5) / (height - 1) * 2 - 1`` (resp. width). (height, width, 2)."""
    ys = _normalise(torch.arange(height, dtype=dtype, device=device) + 0.5, height - 1.0)
    xs = _normalise(torch.arange(width, dtype=dtype, device=device) + 0.5, width - 1.0)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_y, grid_x), dim=-1)


def query_grid_points(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Query positions of a (height, width) map, normalised (y, x) with align_corners=True: ``i / (height - 1) * 2
    - 1``. (height, width, 2)."""
    ys = _normalise(torch.arange(height, dtype=dtype, device=device), height - 1.0)
    xs = _normalise(torch.arange(width, dtype=dtype, device=device), width - 1.0)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_y, grid_x), dim=-1)


class DeformableAttention(nn.Module):
    """Deformable multi-head attention (the official ``DAttentionBaseline`` with DAT++'s options: relative
    position bias table, no depthwise-conv PE, no fixed PE, no log-CPB).

    Args:
        dim: channels C.
        num_heads: heads; ``num_groups`` must divide it, and it must divide ``dim``.
        num_groups: offset groups; each group's C / groups channels get their own offsets and sampled keys, shared
            by its heads / groups heads.
        stride: reference-point stride: the key grid is ``ceil(H / stride) x ceil(W / stride)``.
        offset_kernel: depthwise kernel of the offset network (padding ``kernel // 2``, or 0 when it equals the
            stride, as official).
        offset_range_factor: < 0 (DAT++): offsets unbounded, sampling positions clamped to [-1, 1]; s >= 0 (DAT
            2022): offsets ``s * tanh(.)`` in units of 1 / (Hk - 1) (resp. Wk - 1), positions not clamped
            (samples outside the map read zeros).
        query_size_hw: query map size the bias table is built for (the ImageNet-training size): the table is
            (heads, 2 Hq - 1, 2 Wq - 1); any runtime size interpolates it.

    Keys (official): ``conv_offset.{0,1.norm,3}``, ``proj_q``, ``proj_k``, ``proj_v``, ``proj_out`` (1x1 convs),
    ``rpe_table``. Shapes: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, dim: int, num_heads: int, num_groups: int, stride: int, offset_kernel: int,
                 offset_range_factor: float, query_size_hw: tuple[int, int]):
        super().__init__()
        if dim % num_heads != 0 or num_heads % num_groups != 0:
            raise ValueError(f"DeformableAttention: dim={dim}, num_heads={num_heads}, num_groups={num_groups}: "
                             f"expected heads | dim and groups | heads")
        if stride < 1 or offset_kernel < 1:
            raise ValueError(f"DeformableAttention: stride={stride}, offset_kernel={offset_kernel}, expected >= 1")
        self.dim = dim
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.head_dim = dim // num_heads
        self.group_channels = dim // num_groups
        self.group_heads = num_heads // num_groups
        self.stride = stride
        self.offset_range_factor = float(offset_range_factor)
        gc = self.group_channels
        pad = offset_kernel // 2 if offset_kernel != stride else 0
        # Index 0 dwconv, 1 LayerNorm, 2 GELU, 3 1x1 conv to (dy, dx): the official Sequential and its keys.
        self.conv_offset = nn.Sequential(
            nn.Conv2d(gc, gc, offset_kernel, stride, pad, groups=gc),
            ChannelsLayerNorm(gc),
            nn.GELU(),
            nn.Conv2d(gc, 2, 1, bias=False),
        )
        self.proj_q = nn.Conv2d(dim, dim, 1)
        self.proj_k = nn.Conv2d(dim, dim, 1)
        self.proj_v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        hq, wq = query_size_hw
        self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * hq - 1, 2 * wq - 1))
        nn.init.trunc_normal_(self.rpe_table, std=0.01)

    def sampling_positions(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Offsets and deformed positions from the query map.

        Args:
            q: (N, C, H, W) queries (``proj_q`` of the input).

        Returns:
            offsets (N*G, Hk, Wk, 2) after the bound (normalised (dy, dx)), and positions (N*G, Hk, Wk, 2),
            normalised (y, x): reference + offset (clamped to [-1, 1] in DAT++ mode).
        """
        n, c, h, w = q.shape
        q_groups = q.reshape(n * self.num_groups, self.group_channels, h, w)  # (N, G*Cg, H, W) -> (N*G, Cg, H, W)
        offsets = self.conv_offset(q_groups)  # (N*G, 2, Hk, Wk), channel 0 = dy, 1 = dx
        hk, wk = offsets.shape[2], offsets.shape[3]
        if self.offset_range_factor >= 0:
            scale = [0.0 if hk == 1 else 1.0 / (hk - 1.0), 0.0 if wk == 1 else 1.0 / (wk - 1.0)]
            scale_t = torch.tensor(scale, dtype=q.dtype, device=q.device).reshape(1, 2, 1, 1)
            offsets = offsets.tanh() * scale_t * self.offset_range_factor
        offsets = offsets.permute(0, 2, 3, 1)  # (N*G, 2, Hk, Wk) -> (N*G, Hk, Wk, 2)
        positions = deformable_reference_points(hk, wk, q.dtype, q.device) + offsets
        if self.offset_range_factor < 0:
            positions = positions.clamp(-1.0, 1.0)
        return offsets, positions

    def relative_position_bias(self, height: int, width: int, positions: torch.Tensor) -> torch.Tensor:
        """Continuous relative position bias: the table sampled bilinearly (align_corners=True) at half the
        normalised query-minus-key displacement, per group.

        Args:
            positions: (N*G, Hk, Wk, 2) normalised (y, x) key positions.

        Returns:
            (N, heads, H*W, Hk*Wk).
        """
        ng, hk, wk, _ = positions.shape
        n = ng // self.num_groups
        # Halved and in grid_sample's (x, y) order on the small tensors, so the big one is made by one subtraction.
        queries = query_grid_points(height, width, positions.dtype, positions.device).flip(-1) * 0.5
        keys = positions.flip(-1).reshape(ng, 1, hk * wk, 2) * 0.5  # (N*G, 1, Hk*Wk, 2) (x, y)
        # (1, H*W, 1, 2) - (N*G, 1, Hk*Wk, 2) -> (N*G, H*W, Hk*Wk, 2): half the query-minus-key displacement
        displacement = queries.reshape(1, height * width, 1, 2) - keys
        table = self.rpe_table.to(positions.dtype)
        # (heads, Th, Tw) -> (G, heads/G, Th, Tw) -> (N*G, heads/G, Th, Tw)
        table = table.reshape(1, self.num_groups, self.group_heads, table.shape[1], table.shape[2])
        table = table.expand(n, -1, -1, -1, -1).reshape(ng, self.group_heads, table.shape[3], table.shape[4])
        bias = F.grid_sample(table, displacement, mode="bilinear", align_corners=True)  # (N*G, heads/G, HW, Ns)
        return bias.reshape(n, self.num_heads, height * width, hk * wk)  # (N*G, heads/G, HW, Ns) -> (N, heads, ..)

    def sample_features(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Bilinear samples of each group's channels of ``x`` (N, C, H, W) at its ``positions`` (N*G, Hk, Wk, 2)
        (normalised (y, x), align_corners=True: -1/+1 = centres of the first/last pixel; zeros outside).
        Returns (N*G, C/G, Hk, Wk)."""
        n, c, h, w = x.shape
        x_groups = x.reshape(n * self.num_groups, self.group_channels, h, w)  # (N, G*Cg, H, W) -> (N*G, Cg, H, W)
        # grid_sample wants (x, y): flip the last axis.
        return F.grid_sample(x_groups, positions.flip(-1), mode="bilinear", padding_mode="zeros", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        heads, d = self.num_heads, self.head_dim
        q = _pointwise(self.proj_q, x)
        _, positions = self.sampling_positions(q)
        ng, hk, wk, _ = positions.shape
        sampled = self.sample_features(x, positions)  # (N*G, Cg, Hk, Wk)
        sampled = sampled.reshape(n, c, 1, hk * wk)  # (N*G, Cg, Hk, Wk) -> (N, C, 1, Ns)
        # SDPA's fused CPU kernel wants the head dimension contiguous: (N, C, L) -> (N, heads, d, L) -> (N, heads, L, d)
        key = _pointwise(self.proj_k, sampled).reshape(n, heads, d, hk * wk).transpose(2, 3).contiguous()
        value = _pointwise(self.proj_v, sampled).reshape(n, heads, d, hk * wk).transpose(2, 3).contiguous()
        query = q.reshape(n, heads, d, h * w).transpose(2, 3).contiguous()  # (N, heads, HW, d)
        bias = self.relative_position_bias(h, w, positions)  # (N, heads, HW, Ns)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)  # (N, heads, HW, d)
        out = out.transpose(2, 3).reshape(n, c, h, w)  # (N, heads, HW, d) -> (N, heads, d, HW) -> (N, C, H, W)
        return _pointwise(self.proj_out, out)


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability ``rate`` in training (scaled)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class DATStage(nn.Module):
    """One DAT++ stage: ``len(spec)`` blocks of LPU, attention (``spec[d]``: 'N' or 'D') and ConvMLP.

    Keys (official ``TransformerStage``): ``local_perception_units.{d}``, ``layer_norms.{2d, 2d+1}.norm``,
    ``attns.{d}``, ``mlps.{d}``. Shapes: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, dim: int, spec: str, num_heads: int, num_groups: int, stride: int, offset_kernel: int,
                 offset_range_factor: float, query_size_hw: tuple[int, int], drop_path_rates: list[float],
                 neighborhood_kernel: int = _NEIGHBORHOOD_KERNEL):
        super().__init__()
        if any(s not in "ND" for s in spec) or len(drop_path_rates) != len(spec):
            raise ValueError(f"DATStage: spec={spec!r} (expected 'N'/'D' letters), {len(drop_path_rates)} rates")
        self.spec = spec
        self.local_perception_units = nn.ModuleList(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in spec)
        self.layer_norms = nn.ModuleList(ChannelsLayerNorm(dim) for _ in range(2 * len(spec)))
        self.attns = nn.ModuleList(
            NeighborhoodAttention(dim, num_heads, neighborhood_kernel) if s == "N" else
            DeformableAttention(dim, num_heads, num_groups, stride, offset_kernel, offset_range_factor,
                                query_size_hw)
            for s in spec)
        self.mlps = nn.ModuleList(ConvMLP(dim) for _ in spec)
        self.drop_paths = nn.ModuleList(DropPath(r) for r in drop_path_rates)

    def block(self, d: int, x: torch.Tensor) -> torch.Tensor:
        x = x + self.local_perception_units[d](x)
        x = x + self.drop_paths[d](self.attns[d](self.layer_norms[2 * d](x)))
        return x + self.drop_paths[d](self.mlps[d](self.layer_norms[2 * d + 1](x)))

    def forward(self, x: torch.Tensor, with_checkpoint: bool = False) -> torch.Tensor:
        for d in range(len(self.spec)):
            if with_checkpoint and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(self.block, d, x, use_reentrant=False)
            else:
                x = self.block(d, x)
        return x


def convert_official_dat_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """An official LeapLabTHU/DAT checkpoint -> this module's backbone state dict.

    Accepts the training script's ``{'model': state_dict, ...}``, a ``{'state_dict': ...}`` wrapper or a flat
    state dict; strips a DistributedDataParallel ``module.`` prefix; drops the ImageNet classifier
    (``cls_norm.*``, ``cls_head.*``). The remaining names are the official ones unchanged (this module's tree
    mirrors the official one), so no renaming is needed.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f"convert_official_dat_state_dict: got a {type(checkpoint).__name__}, expected a dict")
    for wrapper in ("model", "state_dict"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], dict):
            checkpoint = checkpoint[wrapper]
            break
    out = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"convert_official_dat_state_dict: entry {key!r} is a {type(value).__name__}, "
                             f"expected a tensor (a flat {{name: tensor}} state dict)")
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith(("cls_norm.", "cls_head.")):
            continue
        out[key] = value
    return out


class DAT(nn.Module):
    """DAT++ image backbone (tiny / small / base) returning multi-scale maps for the FPN.

    Args:
        variant: 'tiny', 'small' or 'base' (:data:`DAT_VARIANTS`).
        out_indices: stages to return, 0..3 (strides 4, 8, 16, 32), strictly increasing; stages after the last
            one are built (the state dict stays the official one) but not run.
        frozen_stages: -1 nothing, 0 ``patch_proj``, k >= 1 ``patch_proj`` + stages 0..k-1 with the
            ``down_projs`` into them (``requires_grad=False``).
        drop_path_rate: stochastic depth, linear from 0 to this over the 26 blocks (official schedule).
        offset_range_factor: < 0 DAT++ (official for the published weights); >= 0 DAT-2022 tanh bound (the same
            factor in every stage; the 2022 configs used 1, 2, 3, 4).
        pretrain_img_size: ImageNet resolution the ``rpe_table`` shapes follow (224 for the published weights).
        with_checkpoint: recompute each block in backward (activation checkpointing) in training.
        pretrained_path: optional local official checkpoint (.pth), loaded by :meth:`load_pretrained`.
        stage_specs: attention kind of every block per stage ('N' neighbourhood, 'D' deformable), None = DAT++'s
            ``('ND', 'NDND', 'ND' * 9, 'DD')`` (the published weights need it); shorter specs give smaller models
            for experiments and tests.

    Attributes:
        out_channels: channels of each returned map (``dims[i]``); strides: 4 * 2**i for each.
    """

    def __init__(self, variant: str = "tiny", out_indices: tuple[int, ...] = (1, 2, 3), frozen_stages: int = -1,
                 drop_path_rate: float = 0.0, offset_range_factor: float = -1.0, pretrain_img_size: int = 224,
                 with_checkpoint: bool = False, pretrained_path: str | None = None,
                 stage_specs: tuple[str, str, str, str] | None = None):
        super().__init__()
        if variant not in DAT_VARIANTS:
            raise ValueError(f"DAT: variant={variant!r}, expected one of {sorted(DAT_VARIANTS)}")
        out_indices = tuple(int(i) for i in out_indices)
        if (not out_indices or any(i not in (0, 1, 2, 3) for i in out_indices)
                or any(a >= b for a, b in zip(out_indices, out_indices[1:]))):
            raise ValueError(f"DAT: out_indices={out_indices!r}, expected a non-empty strictly increasing tuple of "
                             f"stage indices in 0..3 (strides 4, 8, 16, 32)")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"DAT: frozen_stages={frozen_stages!r}, expected -1 (none), 0 (patch_proj) or 1..4")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"DAT: drop_path_rate={drop_path_rate!r}, expected in [0, 1)")
        if pretrain_img_size < 32 or pretrain_img_size % 32 != 0:
            raise ValueError(f"DAT: pretrain_img_size={pretrain_img_size!r}, expected a multiple of 32")
        cfg = DAT_VARIANTS[variant]
        self.variant = variant
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.with_checkpoint = with_checkpoint
        stem = cfg.dim_stem
        # Indices 0 conv, 1 LN, 2 GELU, 3 conv, 4 LN: the official `patch_proj` keys.
        self.patch_proj = nn.Sequential(
            nn.Conv2d(3, stem // 2, 3, 2, 1), ChannelsLayerNorm(stem // 2), nn.GELU(),
            nn.Conv2d(stem // 2, stem, 3, 2, 1), ChannelsLayerNorm(stem))
        if stem != cfg.dims[0]:
            raise ValueError("DAT: dim_stem must equal dims[0] (the official stage-0 projection is then Identity)")
        stage_specs = _STAGE_SPEC_DATPP if stage_specs is None else tuple(stage_specs)
        if len(stage_specs) != 4 or any(not spec or set(spec) - {"N", "D"} for spec in stage_specs):
            raise ValueError(f"DAT: stage_specs={stage_specs!r}, expected 4 non-empty strings of 'N'/'D'")
        total_blocks = sum(len(s) for s in stage_specs)
        rates = [drop_path_rate * b / max(1, total_blocks - 1) for b in range(total_blocks)]  # linspace(0, rate)
        self.stages = nn.ModuleList()
        size = pretrain_img_size // 4
        first = 0
        for i, spec in enumerate(stage_specs):
            self.stages.append(DATStage(cfg.dims[i], spec, cfg.heads[i], cfg.groups[i], _REFERENCE_STRIDES[i],
                                        _OFFSET_KERNELS[i], offset_range_factor, (size, size),
                                        rates[first:first + len(spec)]))
            first += len(spec)
            size //= 2
        self.down_projs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cfg.dims[i], cfg.dims[i + 1], 3, 2, 1, bias=False),
                          ChannelsLayerNorm(cfg.dims[i + 1]))
            for i in range(3))
        self.out_channels: list[int] = [cfg.dims[i] for i in out_indices]
        self.strides: list[int] = [4 * 2**i for i in out_indices]
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules: list[nn.Module] = [self.patch_proj]
        for k in range(self.frozen_stages):
            modules.append(self.stages[k])
            if k > 0:
                modules.append(self.down_projs[k - 1])
        return modules

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> DAT:
        """Set training mode; frozen parts stay in eval mode (no stochastic depth in them)."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
        return self

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load an official DAT++ ImageNet checkpoint (e.g. ``dat_pp_tiny_in1k_224.pth``) from a local file.

        Goes through :func:`convert_official_dat_state_dict` (unwraps ``'model'``, drops the classifier). Any
        missing, unexpected or mis-shaped key raises ``ValueError`` naming the file and every such key; nothing is
        loaded then. The file is read with ``torch.load(weights_only=True)``: a training checkpoint that also
        pickles its yacs config cannot be read that way, and the error says how to extract the weights.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DAT.load_pretrained: no file at {path!r} (expected a local .pth checkpoint)")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"DAT.load_pretrained: cannot read {path!r} with torch.load(weights_only=True): {exc}. If the file "
                f"is a trusted official checkpoint that pickles Python objects besides the weights, extract them "
                f"once: torch.save(torch.load(path, weights_only=False)['model'], 'dat_weights.pth')") from exc
        try:
            source = convert_official_dat_state_dict(loaded)
        except ValueError as exc:
            raise ValueError(f"DAT.load_pretrained: {path!r}: {exc}") from None
        self.load_official_state_dict(source, source_name=repr(path))

    def load_official_state_dict(self, source: dict[str, torch.Tensor], source_name: str = "state dict") -> None:
        """Strictly load an (already converted) official state dict; see :meth:`load_pretrained`."""
        target = self.state_dict()
        missing = [k for k in target if k not in source]
        unexpected = [k for k in source if k not in target]
        mis_shaped = [f"{k}: file {tuple(source[k].shape)} vs model {tuple(target[k].shape)}"
                      for k in source if k in target and source[k].shape != target[k].shape]
        if missing or unexpected or mis_shaped:
            problems = [f"{title} keys: {', '.join(items)}" for title, items in
                        (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)) if items]
            raise ValueError(f"DAT.load_pretrained: {source_name} does not match DAT++-{self.variant} (official "
                             f"LeapLabTHU/DAT key names expected); " + "; ".join(problems))
        self.load_state_dict(source, strict=True)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Extract feature maps.

        Args:
            images: (N, 3, H, W), ImageNet-normalised RGB (the official weights: mean (0.485, 0.456, 0.406), std
                (0.229, 0.224, 0.225) on [0, 1]); H, W multiples of 32 give exact strides.

        Returns:
            one map per ``out_indices`` entry i: (N, dims[i], H_i, W_i), H_i = H / 2**(i + 2) for H a multiple
            of 32 (ceil in general).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DAT.forward: images of shape {tuple(images.shape)}, expected (N, 3, H, W)")
        x = self.patch_proj(images)
        checkpointing = self.with_checkpoint and self.training and torch.is_grad_enabled()
        outs = []
        for i in range(self.out_indices[-1] + 1):
            if i > 0:
                x = self.down_projs[i - 1](x)
            x = self.stages[i](x, with_checkpoint=checkpointing)
            if i in self.out_indices:
                outs.append(x)
        return outs


def dat_complexity(variant: str, image_size: int = 224) -> dict[str, float]:
    """Parameters and FLOPs of a DAT++ variant on one ``image_size`` x ``image_size`` image, as published numbers
    are stated (the ImageNet classifier included: LayerNorm + linear to 1000 classes on the pooled map).

    FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, linears, matmuls; 1 MAC = 2
    FLOPs), plus the CPU flash-attention kernel that it does not know (2 * B * heads * L * S * (E + Ev)). The tiled
    neighbourhood attention computes every query against its whole tile's key region (masked); ``natten_gmac``
    replaces those products by the 49 keys per query that NATTEN computes, the count comparable with the paper.

    Returns ``{'params_m', 'params_backbone_m', 'gflop', 'gmac', 'natten_gmac'}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    def sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
        b, h, length, e = query
        return 2 * b * h * length * key[-2] * (e + value[-1])

    model = DAT(variant, out_indices=(3,)).eval()
    channels = model.out_channels[-1]
    classifier_params = 2 * channels + channels * 1000 + 1000
    backbone_params = sum(p.numel() for p in model.parameters())
    attention_flops = {"tiled": 0, "window": 0}

    def count_neighborhood(module: NeighborhoodAttention, args: tuple) -> None:
        n, c, h, w = args[0].shape
        k = module.kernel_size
        h, w = max(h, k), max(w, k)
        th, tw = min(module.tile_size, h), min(module.tile_size, w)
        tiles = ((h + th - 1) // th) * ((w + tw - 1) // tw)
        rh, rw = min(h, th + k - 1), min(w, tw + k - 1)
        attention_flops["tiled"] += 2 * n * tiles * th * tw * rh * rw * 2 * c
        attention_flops["window"] += 2 * n * h * w * k * k * 2 * c

    handles = [m.register_forward_pre_hook(count_neighborhood) for m in model.modules()
               if isinstance(m, NeighborhoodAttention)]
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops})
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
    flops = counter.get_total_flops() + 2 * channels * 1000  # + the classifier's linear
    natten = flops - attention_flops["tiled"] + attention_flops["window"]
    return {"params_m": (backbone_params + classifier_params) / 1e6, "params_backbone_m": backbone_params / 1e6,
            "gflop": flops / 1e9, "gmac": flops / 2e9, "natten_gmac": natten / 2e9}
