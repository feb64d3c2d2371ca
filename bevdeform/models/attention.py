"""Deformable attention modules on the MSDA op: the decoder's plain deformable attention, the encoder's temporal
self-attention (TSA) and spatial cross-attention (SCA), and the geometry they need (previous-BEV alignment,
camera visibility of the BEV pillars).

Notation: B batch, Q queries, C = embed_dims, M heads, D = C / M channels per head, L feature levels, P sampling
points per (query, head, level), N cameras, Z pillar anchors (heights) per BEV cell, K visible (query, camera)
pairs of one sample (padded to the batch's largest count, or to a fixed capacity for export).

Frames: everything metric is in the current ego frame (x forward, y left, z up, metres); BEV maps follow
docs/model.md (row i along y, column j along x, flattened row-major) and `bevdeform.models.bev_grid`.

Initialisation (the reference's, Deformable DETR / BEVFormer): sampling-offset weights zero and biases in a circle
pattern (head m points at angle 2*pi*m/M, point p at radius p + 1 in pixels of its level, before any training);
attention-weight projections zero (uniform weights after the softmax); value and output projections
Xavier-uniform with zero bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bevdeform import geometry
from bevdeform.models import bev_grid
from bevdeform.msda import ms_deform_attn

__all__ = [
    "DeformableAttention",
    "TemporalSelfAttention",
    "SpatialCrossAttention",
    "CameraPairs",
    "find_visible_pairs",
    "align_prev_bev",
    "official_rotate_bev",
    "official_reference_shift",
    "is_tracing_or_exporting",
]


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------

def is_tracing_or_exporting() -> bool:
    """True while torch.export (strict or not; also under the dynamo ONNX exporter), torch.compile, torch.jit.trace or
    the TorchScript ONNX exporter runs the model: checks that read tensor values into Python are skipped then, since
    export refuses a branch on data (GuardOnDataDependentSymNode) and a trace would bake the value in."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _check_heads(owner: str, embed_dims: int, num_heads: int) -> int:
    """Channels per head; ValueError unless embed_dims splits evenly over num_heads."""
    if embed_dims <= 0 or num_heads <= 0 or embed_dims % num_heads != 0:
        raise ValueError(f"{owner}: embed_dims={embed_dims} must be a positive multiple of num_heads={num_heads}")
    return embed_dims // num_heads


def _circle_offset_bias(num_heads: int, num_groups: int, num_points: int) -> torch.Tensor:
    """The reference's initial sampling offsets, (num_heads, num_groups, num_points, 2) in pixels of a level.

    Head m points along angle 2*pi*m/M, scaled so the larger of |cos|, |sin| is 1 (so offsets land on pixel
    centres), and point p sits at p + 1 times that: each head starts looking in its own direction at growing
    distances. `num_groups` = levels (times queues for TSA); every group gets the same pattern.
    """
    thetas = torch.arange(num_heads, dtype=torch.float64) * (2.0 * math.pi / num_heads)  # (M,)
    directions = torch.stack([thetas.cos(), thetas.sin()], dim=-1)  # (M, 2) as (x, y)
    directions = directions / directions.abs().max(dim=-1, keepdim=True).values
    radii = torch.arange(1, num_points + 1, dtype=torch.float64)  # (P,)
    # (M, 1, 1, 2) * (1, 1, P, 1) -> (M, 1, P, 2) -> (M, G, P, 2)
    pattern = directions[:, None, None, :] * radii[None, None, :, None]
    return pattern.expand(num_heads, num_groups, num_points, 2).float()


def _reset_deformable_projections(sampling_offsets: nn.Linear, attention_weights: nn.Linear, value_proj: nn.Linear,
                                  output_proj: nn.Linear, num_heads: int, num_groups: int, num_points: int) -> None:
    """The reference initialisation (see the module docstring); `sampling_offsets` outputs (M, G, P, 2) flattened."""
    with torch.no_grad():
        nn.init.zeros_(sampling_offsets.weight)
        sampling_offsets.bias.copy_(_circle_offset_bias(num_heads, num_groups, num_points).reshape(-1))
        nn.init.zeros_(attention_weights.weight)
        nn.init.zeros_(attention_weights.bias)
        for linear in (value_proj, output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)


def _level_sizes_xy(spatial_shapes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(W_l, H_l) per level, (L, 2), as `dtype`: what pixel offsets are divided by to become normalised offsets."""
    return spatial_shapes.flip(-1).to(dtype)  # (L, 2) (H, W) -> (W, H)


def _coordinate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sampling coordinates are computed in at least float32: in bfloat16 a normalised location near 1 is off by
    up to 1/256 of the map, a pixel on a 200-wide BEV."""
    return torch.promote_types(dtype, torch.float32)


def _run_msda(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
              locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The op in the widest dtype of its floating inputs (it takes one dtype for all three). Outside autocast they
    already agree; under autocast the projections give half-precision values and weights while the locations are
    float32, so the op runs in float32 (BEVFormer forces MSDA to float32 too) rather than rounding the locations."""
    dtype = torch.promote_types(torch.promote_types(value.dtype, locations.dtype), weights.dtype)
    return ms_deform_attn(value.to(dtype), spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype))


def _shapes_tensor(shapes: Sequence[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """spatial_shapes (L, 2) int64 and level_start_index (L,) int64 of levels with the given (H, W)."""
    spatial_shapes = torch.tensor([[int(h), int(w)] for h, w in shapes], dtype=torch.int64, device=device)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


# ----------------------------------------------------------------------------------------------------------------
# Plain deformable attention (the decoder's cross-attention on the BEV)
# ----------------------------------------------------------------------------------------------------------------

class DeformableAttention(nn.Module):
    """Multi-scale deformable attention of one query set over one value map (Deformable DETR's MSDeformAttn).

    Each query predicts, per head, level and point, a sampling offset (pixels of that level) around its reference
    point and a weight (softmax over levels x points); the heads' bilinear samples of the projected value are
    weighted, summed, concatenated and projected. No residual, no dropout: the caller's layer adds those.

    Args:
        embed_dims: C, channels of query, value and output.
        num_heads: M; C must be a multiple of it.
        num_levels: L, levels of the value map.
        num_points: P, sampling points per (query, head, level).
    """

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.head_dims = _check_heads("DeformableAttention", embed_dims, num_heads)
        if num_levels <= 0 or num_points <= 0:
            raise ValueError(f"DeformableAttention: num_levels={num_levels} and num_points={num_points} must be "
                             f"positive")
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_deformable_projections(self.sampling_offsets, self.attention_weights, self.value_proj,
                                      self.output_proj, self.num_heads, self.num_levels, self.num_points)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                query_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from the queries to the value map.

        Args:
            query: (B, Q, C).
            reference_points: (B, Q, 2) normalised (x, y) in [0, 1] of the value map (for a BEV value: the BEV's
                normalised (u, v), docs/model.md), shared by all levels; or (B, Q, L, 2), one per level.
            value: (B, S, C), the L levels flattened row-major and concatenated, S = sum of H_l * W_l.
            spatial_shapes: (L, 2) int64 (H_l, W_l). level_start_index: (L,) int64.
            query_pos: (B, Q, C) or None, added to the query for predicting offsets and weights.

        Returns:
            (B, Q, C), output projection applied, no residual.
        """
        if query.dim() != 3 or query.shape[-1] != self.embed_dims:
            raise ValueError(f"DeformableAttention: query must be (B, Q, {self.embed_dims}), got {tuple(query.shape)}")
        batch, num_queries, _ = query.shape
        if value.dim() != 3 or value.shape[0] != batch or value.shape[-1] != self.embed_dims:
            raise ValueError(f"DeformableAttention: value must be (B={batch}, S, {self.embed_dims}), got "
                             f"{tuple(value.shape)}")
        if tuple(spatial_shapes.shape) != (self.num_levels, 2):
            raise ValueError(f"DeformableAttention: spatial_shapes must be (L={self.num_levels}, 2), got "
                             f"{tuple(spatial_shapes.shape)}")
        if reference_points.dim() == 3:
            reference_points = reference_points[:, :, None, :]  # (B, Q, 2) -> (B, Q, 1, 2), same for every level
        if (reference_points.dim() != 4 or reference_points.shape[:2] != (batch, num_queries)
                or reference_points.shape[2] not in (1, self.num_levels) or reference_points.shape[3] != 2):
            raise ValueError(f"DeformableAttention: reference_points must be (B={batch}, Q={num_queries}, 2) or "
                             f"(B, Q, L={self.num_levels}, 2), got {tuple(reference_points.shape)}")
        if query_pos is not None:
            query = query + query_pos
        num_values = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points

        # (B, S, C) -> (B, S, M, D)
        value = self.value_proj(value).view(batch, num_values, heads, self.head_dims)
        # (B, Q, M*L*P*2) -> (B, Q, M, L, P, 2), pixels of each level
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        # (B, Q, M*L*P) -> (B, Q, M, L*P), softmax over all samples of a head -> (B, Q, M, L, P)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(dim=-1).view(batch, num_queries, heads, levels, points)
        coordinate_dtype = _coordinate_dtype(reference_points.dtype)
        sizes_xy = _level_sizes_xy(spatial_shapes, coordinate_dtype)  # (L, 2)
        # (B, Q, 1 or L, 2) -> (B, Q, 1, 1 or L, 1, 2); offsets / (W_l, H_l) become normalised
        locations = (reference_points.to(coordinate_dtype)[:, :, None, :, None, :]
                     + offsets.to(coordinate_dtype) / sizes_xy[None, None, None, :, None, :])
        out = _run_msda(value, spatial_shapes, level_start_index, locations, weights)  # (B, Q, C)
        return self.output_proj(out)


# ----------------------------------------------------------------------------------------------------------------
# Temporal self-attention
# ----------------------------------------------------------------------------------------------------------------

def align_prev_bev(prev_bev: torch.Tensor, ego_prev2curr: torch.Tensor, bev_h: int, bev_w: int,
                   point_cloud_range_m: Sequence[float]) -> torch.Tensor:
    """Warp the previous frame's BEV into the current ego frame, (B, bev_h * bev_w, C).

    For every current cell centre (x, y) (metres, current ego frame) the position of the same ground point in the
    previous ego frame is ``bevdeform.geometry.bev_xy_curr_to_prev`` (the inverse of ego_prev2curr: rotation about
    the ego origin plus translation, wherever the origin sits in the grid and whatever the grid size), and the
    previous BEV is sampled there bilinearly (`grid_sample`, align_corners=False, zeros outside the previous grid).
    After this, cell k of the result and cell k of the current queries describe the same ground point, so TSA can
    use one set of reference points for both queues and concatenate them cell by cell.

    Args:
        prev_bev: (B, bev_h * bev_w, C), the previous frame's encoder output, in its own ego frame.
        ego_prev2curr: (B, 4, 4), maps previous-ego points into the current ego frame (identity: no motion).
        bev_h, bev_w: grid size. point_cloud_range_m: (x_min, y_min, z_min, x_max, y_max, z_max), metres.
    """
    if prev_bev.dim() != 3 or prev_bev.shape[1] != bev_h * bev_w:
        raise ValueError(f"align_prev_bev: prev_bev must be (B, bev_h*bev_w={bev_h * bev_w}, C), got "
                         f"{tuple(prev_bev.shape)}")
    batch, num_cells, channels = prev_bev.shape
    if tuple(ego_prev2curr.shape) != (batch, 4, 4):
        raise ValueError(f"align_prev_bev: ego_prev2curr must be (B={batch}, 4, 4), got {tuple(ego_prev2curr.shape)}")
    # Coordinates in at least float32 whatever the BEV's dtype: a 0.5 m cell at 50 m needs more than fp16 gives.
    coord_dtype = torch.promote_types(prev_bev.dtype, torch.float32)
    xy_curr = bev_grid.bev_cell_centres_xy(bev_h, bev_w, point_cloud_range_m, device=prev_bev.device,
                                           dtype=coord_dtype)  # (H*W, 2)
    xy_prev = geometry.bev_xy_curr_to_prev(xy_curr.expand(batch, num_cells, 2), ego_prev2curr.to(coord_dtype))
    uv_prev = bev_grid.bev_xy_to_normalised(xy_prev, point_cloud_range_m)  # (B, H*W, 2) in [0, 1] inside the grid
    # grid_sample's grid is 2 * uv - 1 (align_corners=False): uv at a cell centre samples that cell exactly.
    grid = (2.0 * uv_prev - 1.0).view(batch, bev_h, bev_w, 2).to(prev_bev.dtype)  # (B, H*W, 2) -> (B, H, W, 2)
    # (B, H*W, C) -> (B, C, H*W) -> (B, C, H, W): row i along y, column j along x, as grid_sample's (y, x)
    image = prev_bev.transpose(1, 2).reshape(batch, channels, bev_h, bev_w)
    aligned = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return aligned.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, C, H*W) -> (B, H*W, C)


def _torchvision_rotate_grid(angle_deg: torch.Tensor, height: int, width: int, center_px: Sequence[float],
                             dtype: torch.dtype) -> torch.Tensor:
    """The sampling grids (B, H, W, 2) of ``torchvision.transforms.functional.rotate(img, angle_deg[b],
    center=center_px)`` (expand False) for an (H, W) image, for ``grid_sample(align_corners=False)``; the angles
    stay tensors (exports keep them an input).

    torchvision's arithmetic, step for step, so that nearest sampling rounds exactly as it does: the inverse
    affine matrix in doubles (float64 tensors here, Python floats there) for the angle -angle_deg about
    ``center - size / 2`` (torchvision's centred pixel coordinates), cast to the image dtype; the output pixel
    centres ``j - W/2 + 0.5``, ``i - H/2 + 0.5`` as linspaces; one bmm with the matrix divided by (W/2, H/2). In
    pixel indices the result samples, for output pixel p = (j, i), the input at ``R(angle) (p + 0.5 - center) +
    center - 0.5`` with R the rotation matrix [[cos, -sin], [sin, cos]] (x = column, y = row):
    `tests/test_compat_model.py` checks that per pixel, and bit for bit against a transcription of torchvision's
    code path with Python floats.
    """
    rot = -angle_deg.to(torch.float64) * (math.pi / 180.0)  # (B,) radians, as math.radians(-angle)
    centre_x = float(center_px[0]) - width * 0.5
    centre_y = float(center_px[1]) - height * 0.5
    m00, m01 = torch.cos(rot), torch.sin(rot)
    m10, m11 = -torch.sin(rot), torch.cos(rot)
    m02 = (m00 * -centre_x + m01 * -centre_y) + centre_x
    m12 = (m10 * -centre_x + m11 * -centre_y) + centre_y
    # (B, 2, 3) in double, then cast as torchvision casts its matrix to the image dtype
    theta = torch.stack((torch.stack((m00, m01, m02), dim=-1), torch.stack((m10, m11, m12), dim=-1)), dim=1)
    theta = theta.to(dtype)
    device = angle_deg.device
    # torchvision's linspaces are float32 (the default dtype), copied into a grid of the image dtype
    xs = torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, steps=width, device=device).to(dtype)
    ys = torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, steps=height, device=device).to(dtype)
    base = torch.stack((xs[None, :].expand(height, width), ys[:, None].expand(height, width),
                        torch.ones(height, width, dtype=dtype, device=device)), dim=-1)  # (H, W, 3)
    # (B, 2, 3) -> (B, 3, 2), columns divided by (W/2, H/2) -> normalised grid units
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], dtype=dtype, device=device)
    batch = angle_deg.shape[0]
    grid = base.reshape(1, height * width, 3).expand(batch, -1, -1).bmm(scaled)  # (B, H*W, 2)
    return grid.reshape(batch, height, width, 2)


def official_rotate_bev(prev_bev: torch.Tensor, angle_deg: torch.Tensor, bev_h: int, bev_w: int,
                        center_px: Sequence[float] = (100.0, 100.0)) -> torch.Tensor:
    """BEVFormer's temporal alignment of the released checkpoints (transformer.py ``get_bev_features``): each
    sample's previous BEV, as a (C, bev_h, bev_w) image (row i, column j), rotated by ``angle_deg`` degrees with
    torchvision's ``rotate`` about pixel ``center_px`` (x = column, y = row; [100, 100] in the official code
    whatever the grid: the grid centre only for 200 x 200, a point outside a 50 x 50 grid), nearest neighbour,
    zero outside. No translation: the official code turns the translation into a reference shift
    (`official_reference_shift`).

    Args:
        prev_bev: (B, bev_h * bev_w, C). angle_deg: (B,) degrees (the CAN-bus yaw delta, ``can_bus[:, 17]``), used
            in float64 as the official code uses the numpy value of its image metas, but never read into Python,
            so that exports keep it an input.
    Returns:
        (B, bev_h * bev_w, C).
    """
    if prev_bev.dim() != 3 or prev_bev.shape[1] != bev_h * bev_w:
        raise ValueError(f"official_rotate_bev: prev_bev must be (B, bev_h*bev_w={bev_h * bev_w}, C), got "
                         f"{tuple(prev_bev.shape)}")
    batch, num_cells, channels = prev_bev.shape
    if tuple(angle_deg.shape) != (batch,):
        raise ValueError(f"official_rotate_bev: angle_deg must be (B={batch},) degrees, got {tuple(angle_deg.shape)}")
    grid = _torchvision_rotate_grid(angle_deg, bev_h, bev_w, center_px, prev_bev.dtype)  # (B, H, W, 2)
    # (B, H*W, C) -> (B, C, H*W) -> (B, C, H, W): row i along y, column j along x
    image = prev_bev.transpose(1, 2).reshape(batch, channels, bev_h, bev_w)
    out = F.grid_sample(image, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.reshape(batch, channels, num_cells).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


def official_reference_shift(can_bus: torch.Tensor, bev_h: int, bev_w: int,
                             point_cloud_range_m: Sequence[float]) -> torch.Tensor:
    """BEVFormer's reference-point shift for the previous BEV (transformer.py ``get_bev_features``), (B, 2)
    normalised BEV (x, y) units, float32.

    From the CAN-bus vector after the detector's delta step: the translation (dx, dy) = can_bus[0:2] (global frame,
    metres) and the absolute ego yaw psi = can_bus[16] (radians). With L = |(dx, dy)| and
    a = psi - atan2(dy, dx): shift_x = L sin(a) / real_w, shift_y = L cos(a) / real_h, where the official code
    names real_h = x_max - x_min and real_w = y_max - y_min (grid_length = (real_h / bev_h, real_w / bev_w)); that
    naming is kept, it only matters for a non-square range. Computed in float64 (the official numpy), then cast.
    """
    if can_bus.dim() != 2 or can_bus.shape[1] != 18:
        raise ValueError(f"official_reference_shift: can_bus must be (B, 18), got {tuple(can_bus.shape)}")
    x_min, y_min, _, x_max, y_max, _ = bev_grid.check_point_cloud_range(point_cloud_range_m)
    real_h, real_w = x_max - x_min, y_max - y_min
    values = can_bus.detach().to(torch.float64)
    delta_x, delta_y = values[:, 0], values[:, 1]
    if torch.jit.is_tracing():
        # The ONNX (TorchScript) exporter: onnxruntime has no float64 Atan, so the same shift in closed form,
        # L sin(psi - atan2(dy, dx)) = dx sin psi - dy cos psi, L cos(...) = dx cos psi + dy sin psi (tested equal).
        psi = values[:, 16]
        shift_x = (delta_x * torch.sin(psi) - delta_y * torch.cos(psi)) / real_w
        shift_y = (delta_x * torch.cos(psi) + delta_y * torch.sin(psi)) / real_h
        return torch.stack([shift_x, shift_y], dim=-1).to(torch.float32)  # (B, 2) as (x, y)
    ego_angle_deg = values[:, 16] / math.pi * 180.0
    length = torch.sqrt(delta_x ** 2 + delta_y ** 2)
    translation_angle_deg = torch.atan2(delta_y, delta_x) / math.pi * 180.0
    bev_angle_rad = (ego_angle_deg - translation_angle_deg) / 180.0 * math.pi
    shift_y = length * torch.cos(bev_angle_rad) / (real_h / bev_h) / bev_h
    shift_x = length * torch.sin(bev_angle_rad) / (real_w / bev_w) / bev_w
    return torch.stack([shift_x, shift_y], dim=-1).to(torch.float32)  # (B, 2) as (x, y)


class TemporalSelfAttention(nn.Module):
    """BEVFormer's temporal self-attention over two BEV "queues": the previous BEV (already aligned to the current
    frame by `align_prev_bev`) and the current BEV queries.

    The two queues are folded into the batch (B*2, b-major: rows 2b, 2b+1 are sample b's history and current
    queue). Offsets and weights come from Linear(concat(history, query + query_pos)), one set per queue; each queue
    is sampled (MSDA, 1 level, P points around the cell centre) on its own BEV; the two results are averaged and
    projected. Rows without history use the current queries (without query_pos) as their history queue, as
    BEVFormer does at a scene start. No residual, no dropout: the encoder layer adds those.

    Alignment design: the previous BEV is resampled into the current frame once per forward of the encoder
    (`align_prev_bev`), rather than shifting the reference points of the history queue, because the offset
    predictor concatenates the two queues cell by cell and that concatenation is only meaningful once both describe
    the same ground point.

    Args:
        embed_dims: C. num_heads: M. num_points: P per (query, head, queue).
        bev_h, bev_w: BEV grid size (the value maps are (bev_h, bev_w)).
    """

    num_queues = 2

    def __init__(self, embed_dims: int, num_heads: int, num_points: int, bev_h: int, bev_w: int):
        super().__init__()
        self.head_dims = _check_heads("TemporalSelfAttention", embed_dims, num_heads)
        if num_points <= 0 or bev_h <= 0 or bev_w <= 0:
            raise ValueError(f"TemporalSelfAttention: num_points={num_points}, bev_h={bev_h}, bev_w={bev_w} must be "
                             f"positive")
        self.embed_dims, self.num_heads, self.num_points = embed_dims, num_heads, num_points
        self.bev_h, self.bev_w = bev_h, bev_w
        queues = self.num_queues
        self.sampling_offsets = nn.Linear(queues * embed_dims, queues * num_heads * num_points * 2)
        self.attention_weights = nn.Linear(queues * embed_dims, queues * num_heads * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        spatial_shapes, level_start_index = _shapes_tensor([(bev_h, bev_w)], device=None)
        self.register_buffer("spatial_shapes", spatial_shapes, persistent=False)  # (1, 2)
        self.register_buffer("level_start_index", level_start_index, persistent=False)  # (1,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets laid out (M, queue, P, 2): the circle pattern repeats for both queues.
        _reset_deformable_projections(self.sampling_offsets, self.attention_weights, self.value_proj,
                                      self.output_proj, self.num_heads, self.num_queues, self.num_points)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor | None, prev_bev_aligned: torch.Tensor | None,
                has_prev: torch.Tensor | None, value_current: torch.Tensor | None = None,
                history_reference_shift: torch.Tensor | None = None,
                current_reference_shift: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            query: (B, H*W, C) current BEV queries. query_pos: (B or 1, H*W, C) or None.
            prev_bev_aligned: (B, H*W, C) previous BEV in the current frame (`align_prev_bev`), or None (no row
                has history).
            has_prev: (B,) bool or None (= all True); rows with False ignore prev_bev_aligned.
            value_current: (B, H*W, C) or None. None (bevdeform's default): the current queue's value is this
                layer's ``query``. Given (the bevformer_v1 option ``tsa_value: initial_queries``): rows with a
                previous BEV use it as the current queue's value instead (BEVFormer builds value =
                stack(prev_bev, initial BEV queries) once before the layers); rows without keep ``query``.
            history_reference_shift, current_reference_shift: (B, 2) or None, normalised BEV (x, y) offsets added
                to the reference points (cell centres) of the history / current queue (BEVFormer's ``shift``,
                `official_reference_shift`); None adds nothing (bevdeform's default: the history is already
                warped).

        Returns:
            (B, H*W, C), output projection applied, no residual.
        """
        num_cells = self.bev_h * self.bev_w
        if query.dim() != 3 or query.shape[1:] != (num_cells, self.embed_dims):
            raise ValueError(f"TemporalSelfAttention: query must be (B, bev_h*bev_w={num_cells}, {self.embed_dims}), "
                             f"got {tuple(query.shape)}")
        batch = query.shape[0]
        if prev_bev_aligned is None:
            history = query
        else:
            if prev_bev_aligned.shape != query.shape:
                raise ValueError(f"TemporalSelfAttention: prev_bev_aligned must match query {tuple(query.shape)}, "
                                 f"got {tuple(prev_bev_aligned.shape)}")
            if has_prev is None:
                history = prev_bev_aligned
            else:
                if tuple(has_prev.shape) != (batch,) or has_prev.dtype != torch.bool:
                    raise ValueError(f"TemporalSelfAttention: has_prev must be bool (B={batch},), got "
                                     f"{has_prev.dtype} {tuple(has_prev.shape)}")
                history = torch.where(has_prev[:, None, None], prev_bev_aligned, query)
        query_with_pos = query if query_pos is None else query + query_pos
        heads, points, queues = self.num_heads, self.num_points, self.num_queues

        current = query
        if value_current is not None:
            if value_current.shape != query.shape:
                raise ValueError(f"TemporalSelfAttention: value_current must match query {tuple(query.shape)}, got "
                                 f"{tuple(value_current.shape)}")
            if prev_bev_aligned is not None:
                current = value_current if has_prev is None else torch.where(has_prev[:, None, None], value_current,
                                                                              query)
        # (B, 2, H*W, C) -> (B*2, H*W, C): the queues folded into the batch, sample-major
        value = torch.stack([history, current], dim=1).flatten(0, 1)
        # (B*2, H*W, C) -> (B*2, H*W, M, D)
        value = self.value_proj(value).view(batch * queues, num_cells, heads, self.head_dims)
        predictor_input = torch.cat([history, query_with_pos], dim=-1)  # (B, H*W, 2C)
        # (B, H*W, M*2*P*2) -> (B, H*W, M, 2, P, 2) -> (B, 2, H*W, M, P, 2) -> (B*2, H*W, M, 1, P, 2)
        offsets = self.sampling_offsets(predictor_input).view(batch, num_cells, heads, queues, points, 2)
        offsets = offsets.permute(0, 3, 1, 2, 4, 5).reshape(batch * queues, num_cells, heads, 1, points, 2)
        # (B, H*W, M*2*P) -> (B, H*W, M, 2, P), softmax per queue -> (B, 2, H*W, M, P) -> (B*2, H*W, M, 1, P)
        weights = self.attention_weights(predictor_input).view(batch, num_cells, heads, queues, points)
        weights = weights.softmax(dim=-1).permute(0, 3, 1, 2, 4).reshape(batch * queues, num_cells, heads, 1, points)
        coordinate_dtype = _coordinate_dtype(query.dtype)
        sizes_xy = _level_sizes_xy(self.spatial_shapes, coordinate_dtype)  # (1, 2) = (W, H)
        # Normalised (u, v) of the cell centres, (H*W, 2), built in the coordinate dtype (exact in float64).
        reference = bev_grid.bev_cell_centres_normalised(self.bev_h, self.bev_w, device=offsets.device,
                                                         dtype=coordinate_dtype)
        if history_reference_shift is None and current_reference_shift is None:
            reference = reference[None]  # (H*W, 2) -> (1, H*W, 2), shared by every row and queue
        else:
            zero = reference.new_zeros(batch, 2)
            shifts = []
            for shift in (history_reference_shift, current_reference_shift):
                if shift is not None and tuple(shift.shape) != (batch, 2):
                    raise ValueError(f"TemporalSelfAttention: reference shifts must be (B={batch}, 2), got "
                                     f"{tuple(shift.shape)}")
                shifts.append(zero if shift is None else shift.to(coordinate_dtype))
            # 2 x (B, 2) -> (B, 2, 2) -> (B*2, 1, 2), queue order as the value's; (1, H*W, 2) + -> (B*2, H*W, 2)
            reference = reference[None] + torch.stack(shifts, dim=1).reshape(batch * queues, 1, 2)
        # (1 or B*2, H*W, 2) -> (1 or B*2, H*W, 1, 1, 1, 2); offsets in BEV pixels -> normalised
        locations = (reference[:, :, None, None, None, :]
                     + offsets.to(coordinate_dtype) / sizes_xy[None, None, None, :, None, :])
        out = _run_msda(value, self.spatial_shapes, self.level_start_index, locations, weights)  # (B*2, H*W, C)
        # (B*2, H*W, C) -> (B, 2, H*W, C) -> mean over the queues -> (B, H*W, C)
        out = out.view(batch, queues, num_cells, self.embed_dims).mean(dim=1)
        return self.output_proj(out)


# ----------------------------------------------------------------------------------------------------------------
# Spatial cross-attention
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class CameraPairs:
    """The (BEV query, camera) pairs that see their pillar, per sample, padded to K slots: the batch's largest count,
    or the fixed capacity asked of `find_visible_pairs`.

    Computed once per encoder forward by `find_visible_pairs` and shared by every layer's SCA.

    Attributes:
        camera_index: (B, K) int64 camera of each pair (0 in padding slots).
        query_index: (B, K) int64 BEV query (cell) of each pair; padding slots hold Q (one past the last query).
        valid: (B, K) bool, False in padding slots.
        reference_points: (B, K, Z, 2) normalised (x, y) of the pillar's Z anchors projected into the pair's
            camera: ``((u + 0.5) / W_pad, (v + 0.5) / H_pad)`` with (u, v) pixels of the padded image (anchors that
            are behind the camera or off the image are kept, as BEVFormer does: their samples read zeros or
            padding).
        cameras_per_query: (B, Q) int64, how many cameras see each cell (0: no camera, SCA gives it nothing).
        num_pairs: (B,) int64 visible pairs of each sample (more than K only if an export dropped pairs).
        num_cameras: N.
    """

    camera_index: torch.Tensor
    query_index: torch.Tensor
    valid: torch.Tensor
    reference_points: torch.Tensor
    cameras_per_query: torch.Tensor
    num_pairs: torch.Tensor
    num_cameras: int

    def visible_fraction(self) -> float:
        """Fraction of all (query, camera) pairs of the batch that are visible."""
        batch, num_queries = self.cameras_per_query.shape
        return float(self.num_pairs.sum().item()) / max(batch * self.num_cameras * num_queries, 1)


def find_visible_pairs(pillar_points_ego: torch.Tensor, ego2img: torch.Tensor, image_hw: torch.Tensor,
                       padded_image_hw: Sequence[int], depth_eps: float = 1e-5,
                       capacity: int | None = None, half_pixel: bool = True) -> CameraPairs:
    """Project the BEV pillars into every camera and list the (query, camera) pairs that see them.

    A pillar anchor is seen by a camera when its depth exceeds `depth_eps` and its pixel (u, v) lies inside the
    unpadded image, ``-0.5 < u < W - 0.5`` and ``-0.5 < v < H - 0.5`` (pixel centres at integers, docs/data-format.md),
    so projections into the right/bottom padding do not count. A pair is visible when at least one of its pillar's
    anchors is seen.

    Each sample's visible pairs are listed in (camera, query) order, then padding slots (``valid`` False, camera 0,
    query Q, reference 0). The list's length K is the batch's largest count when `capacity` is None: a
    data-dependent shape (read with ``.item()``, a GPU sync) that torch.export cannot trace. With a `capacity` K is
    that fixed number and no shape depends on the data, which is what an export needs; the listed pairs are the same,
    in the same order, so spatial cross-attention gives the same result as long as every visible pair fits. In eager
    mode a sample with more visible pairs than `capacity` is a ValueError; while tracing or exporting (values cannot
    be read then) the pairs past the capacity are dropped, and ``num_pairs`` (the true count) exceeds `capacity`.

    Args:
        pillar_points_ego: (Q, Z, 3) metres, ego frame (`bev_grid.pillar_reference_points`).
        ego2img: (B, N, 4, 4) for the padded image as fed to the network.
        image_hw: (B, N, 2) unpadded (H, W) pixels.
        padded_image_hw: (H_pad, W_pad) pixels of the image as fed to the network; normalises the pixels.
        depth_eps: minimum depth in metres.
        capacity: K, the fixed length of the pair list, in [1, N * Q] (N * Q can never drop a pair); None sizes the
            list to the batch's largest visible count.
        half_pixel: True (bevdeform's default): pixel centres at integers, reference ``(u + 0.5) / W_pad`` and seen
            when ``-0.5 < u < W - 0.5``. False (BEVFormer's released code, the bevformer_v1 option
            ``sca_half_pixel: false``): reference ``u / W_pad`` and seen when ``0 < u / W_pad < W / W_pad`` (and
            likewise for v), compared on the normalised value as the official ``point_sampling`` does; pass the
            padded size as `image_hw` for its visibility against the padded image.
    """
    if pillar_points_ego.dim() != 3 or pillar_points_ego.shape[-1] != 3:
        raise ValueError(f"find_visible_pairs: pillar_points_ego must be (Q, Z, 3), got "
                         f"{tuple(pillar_points_ego.shape)}")
    if ego2img.dim() != 4 or ego2img.shape[-2:] != (4, 4):
        raise ValueError(f"find_visible_pairs: ego2img must be (B, N, 4, 4), got {tuple(ego2img.shape)}")
    batch, num_cameras = ego2img.shape[:2]
    if tuple(image_hw.shape) != (batch, num_cameras, 2):
        raise ValueError(f"find_visible_pairs: image_hw must be (B={batch}, N={num_cameras}, 2), got "
                         f"{tuple(image_hw.shape)}")
    padded_h, padded_w = (int(s) for s in padded_image_hw)
    num_queries, num_anchors, _ = pillar_points_ego.shape
    total = num_cameras * num_queries
    if capacity is not None and not 1 <= int(capacity) <= total:
        raise ValueError(f"find_visible_pairs: capacity={capacity}, expected None or 1..N*Q = {total} "
                         f"(N={num_cameras} cameras x Q={num_queries} queries)")
    # Projection in at least float32 (and float64 when the calibration is): pixels far from the centre need it.
    dtype = torch.promote_types(ego2img.dtype, torch.float32)
    points = pillar_points_ego.to(dtype).reshape(1, 1, num_queries * num_anchors, 3)  # (Q, Z, 3) -> (1, 1, Q*Z, 3)
    pixels_uv, depth = geometry.project_points(ego2img.to(dtype), points, eps=depth_eps)  # (B, N, Q*Z, 2), (B, N, Q*Z)
    image_hw = image_hw.to(dtype)
    image_w, image_h = image_hw[..., 1, None], image_hw[..., 0, None]  # (B, N, 1) each
    padded_size = pixels_uv.new_tensor([padded_w, padded_h])
    if half_pixel:
        seen = ((depth > depth_eps)
                & (pixels_uv[..., 0] > -0.5) & (pixels_uv[..., 0] < image_w - 0.5)
                & (pixels_uv[..., 1] > -0.5) & (pixels_uv[..., 1] < image_h - 0.5))  # (B, N, Q*Z)
        reference_cam = (pixels_uv + 0.5) / padded_size  # (B, N, Q*Z, 2) normalised (x, y) of the padded image
    else:
        reference_cam = pixels_uv / padded_size  # (B, N, Q*Z, 2)
        seen = ((depth > depth_eps)
                & (reference_cam[..., 0] > 0.0) & (reference_cam[..., 0] < image_w / padded_w)
                & (reference_cam[..., 1] > 0.0) & (reference_cam[..., 1] < image_h / padded_h))  # (B, N, Q*Z)
    visible = seen.view(batch, num_cameras, num_queries, num_anchors).any(dim=-1)  # (B, N, Q)
    # (B, N, Q*Z, 2) -> (B, N*Q, Z, 2): flat pair index = camera * Q + query
    reference_cam = reference_cam.view(batch, total, num_anchors, 2)
    visible_flat = visible.flatten(1)  # (B, N, Q) -> (B, N*Q)
    num_pairs = visible_flat.sum(dim=1)  # (B,)

    if capacity is None:
        capacity = int(num_pairs.max().item()) if batch else 0
    else:
        capacity = int(capacity)
        if not is_tracing_or_exporting() and bool((num_pairs > capacity).any()):
            raise ValueError(f"find_visible_pairs: capacity={capacity} is smaller than the visible (query, camera) "
                             f"pairs of the batch, {num_pairs.tolist()} per sample: pairs would be dropped; pass a "
                             f"capacity >= {int(num_pairs.max())} (N*Q = {total} always fits)")

    # Each visible pair's slot in its sample's list is its rank among the sample's visible pairs (a running count,
    # so the list keeps (camera, query) order). Pairs without a slot (invisible, or past the capacity) are written to
    # slots K, K+1, ... of their own and cut off: every target is distinct, as ONNX ScatterElements requires.
    pair_ids = torch.arange(total, device=visible.device)  # (N*Q,)
    slot = visible_flat.long().cumsum(dim=1) - 1  # (B, N*Q); int64 first, ONNX CumSum takes no bool
    target = torch.where(visible_flat & (slot < capacity), slot, capacity + pair_ids)  # (B, N*Q)
    # (B, K + N*Q) with pair ids at the listed slots -> (B, K)
    flat_pair = torch.zeros(batch, capacity + total, dtype=torch.int64, device=visible.device).scatter(
        1, target, pair_ids.expand(batch, total))[:, :capacity]
    valid = torch.arange(capacity, device=visible.device)[None, :] < num_pairs[:, None]  # (B, K)
    camera_index = torch.where(valid, torch.div(flat_pair, num_queries, rounding_mode="floor"),
                               torch.zeros_like(flat_pair))
    query_index = torch.where(valid, flat_pair % num_queries, torch.full_like(flat_pair, num_queries))
    # (B, N*Q, Z, 2) gathered at (B, K) -> (B, K, Z, 2)
    reference_points = torch.gather(reference_cam, 1, flat_pair[:, :, None, None].expand(
        batch, capacity, num_anchors, 2))
    reference_points = torch.where(valid[:, :, None, None], reference_points, torch.zeros_like(reference_points))
    return CameraPairs(camera_index=camera_index, query_index=query_index, valid=valid,
                       reference_points=reference_points, cameras_per_query=visible.sum(dim=1),
                       num_pairs=num_pairs, num_cameras=num_cameras)


class SpatialCrossAttention(nn.Module):
    """BEVFormer's spatial cross-attention: each BEV query reads the cameras that see its pillar.

    For every visible (query, camera) pair (`CameraPairs`) the query samples that camera's multi-scale features with
    deformable attention: per head and level, P points spread over the pillar's Z projected anchors (P / Z offsets
    around each, in pixels of the level, so normalised by (W_l, H_l)); weights are a softmax over L x P per head.
    The results are averaged over the cameras that see the cell, then projected. Cells no camera sees get zeros
    before the output projection (so the projection's bias after it, as in the reference). No residual, no dropout:
    the encoder layer adds those. Camera and level embeddings are added to the features by the caller
    (`BEVEncoder`, once for all layers, as BEVFormer does).

    Packed design (work only for visible pairs, one MSDA call per forward): per level, the N cameras' projected
    value maps of a sample are stacked vertically into one "mosaic" map with a zero row before, between and after
    the cameras (height N * (H_l + 1) + 1, camera n's rows starting at 1 + n * (H_l + 1)). Bilinear sampling
    half a pixel beyond a camera's top or bottom edge then reads the zero separator exactly as grid_sample's zero
    padding would, and left/right edges are the map's own edges. All visible pairs of a sample are the queries of
    one MSDA call (batch B, queries padded to the K slots of `CameraPairs`), with locations shifted into the
    mosaic. A sample whose row lies outside its camera's band [-1, H_l) (pixels) would read a neighbour camera;
    in the per-camera reference it reads nothing and has zero gradient, so its weight is set to 0 here.

    Args:
        embed_dims: C. num_heads: M. num_levels: L. num_points: P per (query, camera, head, level), a multiple of
        num_points_in_pillar: Z. num_cameras: N.
    """

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, num_cameras: int,
                 num_points_in_pillar: int):
        super().__init__()
        self.head_dims = _check_heads("SpatialCrossAttention", embed_dims, num_heads)
        if num_levels <= 0 or num_cameras <= 0 or num_points_in_pillar <= 0:
            raise ValueError(f"SpatialCrossAttention: num_levels={num_levels}, num_cameras={num_cameras}, "
                             f"num_points_in_pillar={num_points_in_pillar} must be positive")
        if num_points <= 0 or num_points % num_points_in_pillar != 0:
            raise ValueError(f"SpatialCrossAttention: num_points={num_points} must be a positive multiple of "
                             f"num_points_in_pillar={num_points_in_pillar} (the points are spread evenly over the "
                             f"pillar's anchors)")
        self.embed_dims, self.num_heads, self.num_levels = embed_dims, num_heads, num_levels
        self.num_points, self.num_cameras, self.num_points_in_pillar = num_points, num_cameras, num_points_in_pillar
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_deformable_projections(self.sampling_offsets, self.attention_weights, self.value_proj,
                                      self.output_proj, self.num_heads, self.num_levels, self.num_points)

    def _check_features(self, mlvl_feats: Sequence[torch.Tensor], batch: int) -> list[tuple[int, int]]:
        if len(mlvl_feats) != self.num_levels:
            raise ValueError(f"SpatialCrossAttention: mlvl_feats must hold num_levels={self.num_levels} levels, got "
                             f"{len(mlvl_feats)}")
        shapes = []
        for level, feat in enumerate(mlvl_feats):
            if feat.dim() != 5 or feat.shape[:3] != (batch, self.num_cameras, self.embed_dims):
                raise ValueError(f"SpatialCrossAttention: mlvl_feats[{level}] must be (B={batch}, "
                                 f"N={self.num_cameras}, C={self.embed_dims}, H, W), got {tuple(feat.shape)}")
            shapes.append((int(feat.shape[3]), int(feat.shape[4])))
        return shapes

    def _value_mosaic(self, mlvl_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Projected camera features stacked per level into zero-separated mosaics, (B, S_mosaic, M, D)."""
        levels = []
        for feat in mlvl_feats:
            batch, cameras, channels, height, width = feat.shape
            # (B, N, C, H, W) -> (B, N, H, W, C), projected per pixel
            value = self.value_proj(feat.permute(0, 1, 3, 4, 2))
            # Project first, then pad: the separators must be exact zeros, not the projection's bias.
            # (B, N, H, W, C) -> (B, N, H+1, W, C): a zero row under every camera
            value = F.pad(value, (0, 0, 0, 0, 0, 1))
            # (B, N, H+1, W, C) -> (B, N*(H+1), W, C) -> (B, N*(H+1)+1, W, C): and one zero row on top
            value = F.pad(value.reshape(batch, cameras * (height + 1), width, channels), (0, 0, 0, 0, 1, 0))
            # (B, H_mosaic, W, C) -> (B, H_mosaic*W, M, D)
            levels.append(value.reshape(batch, -1, self.num_heads, self.head_dims))
        return torch.cat(levels, dim=1)

    def forward(self, query: torch.Tensor, mlvl_feats: Sequence[torch.Tensor], pairs: CameraPairs,
                query_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            query: (B, Q, C) BEV queries. mlvl_feats: L tensors (B, N, C, H_l, W_l) (camera and level embeddings
            already added). pairs: `find_visible_pairs` for these queries' pillars. query_pos: (B or 1, Q, C) or
            None, added to the query for predicting offsets and weights.

        Returns:
            (B, Q, C), output projection applied, no residual.
        """
        if query.dim() != 3 or query.shape[-1] != self.embed_dims:
            raise ValueError(f"SpatialCrossAttention: query must be (B, Q, {self.embed_dims}), got "
                             f"{tuple(query.shape)}")
        batch, num_queries, _ = query.shape
        shapes = self._check_features(mlvl_feats, batch)
        if tuple(pairs.cameras_per_query.shape) != (batch, num_queries):
            raise ValueError(f"SpatialCrossAttention: pairs were computed for {tuple(pairs.cameras_per_query.shape)} "
                             f"(B, Q) queries, the query is {(batch, num_queries)}")
        if pairs.reference_points.shape[2] != self.num_points_in_pillar:
            raise ValueError(f"SpatialCrossAttention: pairs hold {pairs.reference_points.shape[2]} anchors per pillar, "
                             f"expected num_points_in_pillar={self.num_points_in_pillar}")
        # K is a shape, not a value: the batch's largest count, or the fixed capacity (>= 1) of an export, for which
        # this branch is decided when tracing. With a capacity and no visible pair, the general path below gives the
        # same output (every weight masked to 0, every sum 0).
        num_pairs = pairs.query_index.shape[1]
        if num_pairs == 0:  # no camera sees any cell of any sample
            return self.output_proj(query.new_zeros(batch, num_queries, self.embed_dims))
        if query_pos is not None:
            query = query + query_pos
        heads, levels, points, anchors = self.num_heads, self.num_levels, self.num_points, self.num_points_in_pillar
        dtype, device = _coordinate_dtype(query.dtype), query.device  # locations, mosaic rows, masks, averaging

        # Offsets and weights depend only on the query, so compute them once per query and gather them per pair.
        # (B, Q, M*L*P*2) -> (B, Q, M, L, P, 2), pixels of each level
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        # (B, Q, M*L*P) -> (B, Q, M, L*P), softmax per head -> (B, Q, M, L, P)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(dim=-1).view(batch, num_queries, heads, levels, points)
        batch_rows = torch.arange(batch, device=device)[:, None]  # (B, 1)
        pair_query = pairs.query_index.clamp(max=num_queries - 1)  # padding slots read query Q-1, weight 0 below
        offsets = offsets[batch_rows, pair_query]  # (B, K, M, L, P, 2)
        weights = weights[batch_rows, pair_query]  # (B, K, M, L, P)

        # Camera-local normalised locations. Point p belongs to anchor p % Z (BEVFormer's layout): P / Z offsets
        # around each projected anchor.
        camera_sizes = torch.tensor([[w, h] for h, w in shapes], dtype=dtype, device=device)  # (L, 2) (W_l, H_l)
        # (B, K, M, L, P, 2) -> (B, K, M, L, P/Z, Z, 2)
        offsets = offsets.to(dtype).view(batch, num_pairs, heads, levels, points // anchors, anchors, 2)
        reference = pairs.reference_points.to(dtype)  # (B, K, Z, 2)
        # (B, K, Z, 2) -> (B, K, 1, 1, 1, Z, 2); (L, 2) -> (1, 1, 1, L, 1, 1, 2)
        locations = (reference[:, :, None, None, None, :, :]
                     + offsets / camera_sizes[None, None, None, :, None, None, :])
        locations = locations.view(batch, num_pairs, heads, levels, points, 2)  # (B, K, M, L, P/Z, Z, 2) -> (..., P, 2)

        # Shift the rows into the mosaic. Camera pixel row y = loc_y * H_l - 0.5; mosaic row = y + 1 + n (H_l + 1).
        heights = camera_sizes[:, 1]  # (L,)
        mosaic_heights = self.num_cameras * (heights + 1) + 1  # (L,)
        camera = pairs.camera_index.to(dtype)[:, :, None, None, None]  # (B, K) -> (B, K, 1, 1, 1)
        row_pixels = locations[..., 1] * heights[:, None]  # (B, K, M, L, P): y + 0.5 in camera pixels
        mosaic_y = (row_pixels + 1 + camera * (heights[:, None] + 1)) / mosaic_heights[:, None]
        locations = torch.stack([locations[..., 0], mosaic_y], dim=-1)  # (B, K, M, L, P, 2) in the mosaic
        # Inside the band [-1, H_l) (camera pixels) the bilinear corners stay within the camera's rows and its two
        # separators, exactly as in the per-camera reference. Outside it the reference reads nothing and, its four
        # corners all being off the map, gets zero gradient; here the corners would be a neighbour camera's rows,
        # so the weight is multiplied by a constant 0: the output term is 0, d out / d location is proportional to
        # the (masked) weight, hence 0, and d out / d weight is mask * sample = 0 -- the reference's gradients. The
        # mask itself is a comparison, outside autograd.
        in_band = (row_pixels >= 0.5 - 1.0) & (row_pixels < heights[:, None] + 0.5)  # y >= -1 and y < H_l
        keep = in_band & pairs.valid[:, :, None, None, None]  # padding slots contribute nothing either
        weights = weights * keep.to(weights.dtype)

        mosaic_shapes = [(self.num_cameras * (h + 1) + 1, w) for h, w in shapes]
        spatial_shapes, level_start_index = _shapes_tensor(mosaic_shapes, device)
        value = self._value_mosaic(mlvl_feats)  # (B, S_mosaic, M, D)
        out = _run_msda(value, spatial_shapes, level_start_index, locations, weights)  # (B, K, C)

        # Sum each query's pairs (padding slots go to the extra slot Q, dropped), then average over its cameras.
        index = pairs.query_index[:, :, None].expand(batch, num_pairs, self.embed_dims)  # (B, K) -> (B, K, C)
        summed = out.new_zeros(batch, num_queries + 1, self.embed_dims).scatter_add(1, index, out)[:, :num_queries]
        count = pairs.cameras_per_query.clamp(min=1).to(out.dtype)[:, :, None]  # (B, Q) -> (B, Q, 1)
        return self.output_proj(summed / count)
