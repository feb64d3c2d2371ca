"""The BEV encoder: learned BEV queries refined by temporal self-attention over the previous BEV and spatial
cross-attention into the camera features (BEVFormer's encoder; interface in docs/model.md).

Data path of `BEVEncoder.forward`:
1. queries = learned BEV queries (bev_h*bev_w, C) + ego-motion MLP(features of ego_prev2curr), the same vector
   added to every cell (BEVFormer's CAN-bus MLP); positional embedding = learned row/column embeddings, passed to
   TSA as query_pos.
2. once per forward: the previous BEV is warped into the current frame (`attention.align_prev_bev`); the BEV
   pillars are projected into the cameras and the visible (query, camera) pairs listed
   (`BEVEncoder.visible_pairs`, unless the caller passes them: a fixed-capacity list for export); camera and level
   embeddings are added to the image features.
3. num_layers x `BEVEncoderLayer`: TSA -> add & norm -> SCA -> add & norm -> FFN -> add & norm (post-norm).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from bevdeform import geometry
from bevdeform.models import bev_grid
from bevdeform.models.attention import (CameraPairs, SpatialCrossAttention, TemporalSelfAttention, align_prev_bev,
                                        find_visible_pairs, official_reference_shift, official_rotate_bev)

__all__ = ["BEVEncoderLayer", "BEVEncoder", "ego_motion_features", "NUM_EGO_MOTION_FEATURES",
           "NUM_CAN_BUS_FEATURES", "infer_padded_image_hw", "ENCODER_OPTION_VALUES"]

NUM_EGO_MOTION_FEATURES = 6
NUM_CAN_BUS_FEATURES = 18  # BEVFormer's CAN-bus vector (bevdeform.compat.can_bus)

# The named options of the bevformer_v1 compatibility path (docs/model.md); the first value is the default.
ENCODER_OPTION_VALUES = {
    "temporal_alignment": ("exact_warp", "official_rotate"),
    "tsa_value": ("per_layer", "initial_queries"),
    "pillar_heights": ("slab_centres", "official_linspace"),
    "sca_visibility": ("unpadded", "padded"),
    "ego_motion_input": ("ego_motion6", "can_bus18"),
}


def ego_motion_features(ego_prev2curr: torch.Tensor, has_prev: torch.Tensor) -> torch.Tensor:
    """Ego-motion input of the MLP, (B, 6): where the current ego origin lies in the previous ego frame (x, y, z,
    metres: driving 5 m forward gives (5, 0, 0)), sin and cos of the yaw change (positive = turned left), has_prev.

    Rows without history have an identity ego_prev2curr, hence (0, 0, 0, 0, 1, 0).
    """
    ego_curr2prev = geometry.invert_rigid_transform(ego_prev2curr)  # (B, 4, 4)
    translation = ego_curr2prev[:, :3, 3]  # (B, 3)
    _, yaw_change = geometry.planar_ego_motion(ego_prev2curr)  # (B,)
    return torch.cat([translation, yaw_change.sin()[:, None], yaw_change.cos()[:, None],
                      has_prev.to(translation.dtype)[:, None]], dim=-1)


def infer_padded_image_hw(feature_hw: tuple[int, int], image_hw: torch.Tensor) -> tuple[int, int]:
    """(H_pad, W_pad) of the images as fed to the network, from the finest feature level and the unpadded sizes.

    The padded image is stride x feature size (docs/model.md); the stride is taken as the power of two closest to
    max(image W) / W_0 (ResNet/FPN strides are powers of two). Pass `padded_image_hw` to the encoder explicitly
    to skip this guess.
    """
    feature_h, feature_w = feature_hw
    max_h, max_w = (int(v) for v in image_hw.reshape(-1, 2).max(dim=0).values.tolist())
    stride = 2 ** round(math.log2(max(max_w / feature_w, max_h / feature_h)))
    padded = (stride * feature_h, stride * feature_w)
    if padded[0] < max_h or padded[1] < max_w:
        raise ValueError(f"cannot infer the padded image size: finest features {feature_hw} at stride {stride} cover "
                         f"{padded} pixels, less than the images {(max_h, max_w)} (image_hw); pass padded_image_hw")
    return padded


class BEVEncoderLayer(nn.Module):
    """TSA -> dropout + residual -> LayerNorm -> SCA -> dropout + residual -> LayerNorm -> FFN (Linear, ReLU,
    dropout, Linear, dropout) + residual -> LayerNorm. The BEV positional embedding goes to TSA only (as in
    BEVFormer, where the cross-attention gets no query_pos).

    Args: see `BEVEncoder`; `num_levels` = feature levels of the cameras.
    """

    def __init__(self, embed_dims: int, num_heads: int, ffn_dims: int, bev_h: int, bev_w: int, num_cameras: int,
                 num_levels: int, num_points_in_pillar: int, sca_num_points: int, tsa_num_points: int,
                 dropout: float):
        super().__init__()
        self.temporal_attention = TemporalSelfAttention(embed_dims, num_heads, tsa_num_points, bev_h, bev_w)
        self.spatial_attention = SpatialCrossAttention(embed_dims, num_heads, num_levels, sca_num_points,
                                                       num_cameras, num_points_in_pillar)
        self.norm_temporal = nn.LayerNorm(embed_dims)
        self.norm_spatial = nn.LayerNorm(embed_dims)
        self.norm_ffn = nn.LayerNorm(embed_dims)
        self.dropout_temporal = nn.Dropout(dropout)
        self.dropout_spatial = nn.Dropout(dropout)
        self.ffn = nn.Sequential(nn.Linear(embed_dims, ffn_dims), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dims, embed_dims), nn.Dropout(dropout))

    def forward(self, bev: torch.Tensor, bev_pos: torch.Tensor, prev_bev_aligned: torch.Tensor | None,
                has_prev: torch.Tensor | None, mlvl_feats: Sequence[torch.Tensor], pairs: CameraPairs,
                tsa_value_current: torch.Tensor | None = None, history_reference_shift: torch.Tensor | None = None,
                current_reference_shift: torch.Tensor | None = None) -> torch.Tensor:
        """bev (B, H*W, C), bev_pos (1 or B, H*W, C), prev_bev_aligned (B, H*W, C) or None, has_prev (B,) bool,
        mlvl_feats L x (B, N, C, H_l, W_l) with embeddings added, pairs for the BEV pillars -> (B, H*W, C).
        The last three go to `TemporalSelfAttention` (None on bevdeform's default path)."""
        temporal = self.temporal_attention(bev, bev_pos, prev_bev_aligned, has_prev, value_current=tsa_value_current,
                                           history_reference_shift=history_reference_shift,
                                           current_reference_shift=current_reference_shift)
        bev = self.norm_temporal(bev + self.dropout_temporal(temporal))
        spatial = self.spatial_attention(bev, mlvl_feats, pairs)
        bev = self.norm_spatial(bev + self.dropout_spatial(spatial))
        return self.norm_ffn(bev + self.ffn(bev))


class BEVEncoder(nn.Module):
    """BEVFormer's BEV encoder (docs/model.md).

    Args:
        embed_dims: C, channels of the BEV and of the image features.
        num_layers: encoder layers.
        bev_h, bev_w: BEV grid (rows along ego y, columns along ego x).
        point_cloud_range_m: (x_min, y_min, z_min, x_max, y_max, z_max), metres, ego frame.
        num_cameras: N. num_feature_levels: L. num_heads: M. ffn_dims: hidden size of the FFN.
        num_points_in_pillar: Z height anchors per BEV cell. sca_num_points: SCA points per (query, camera, head,
        level), a multiple of Z. tsa_num_points: TSA points per (query, head, queue). dropout: probability.

    bevformer_v1 compatibility options (docs/model.md "BEVFormer compatibility"; the defaults are bevdeform's):
        temporal_alignment: 'exact_warp' (`attention.align_prev_bev` from ego_prev2curr) or 'official_rotate'
            (`attention.official_rotate_bev` by can_bus[:, 17] degrees about `rotate_center_px`, plus the
            reference shift `attention.official_reference_shift` of the history queue; needs `can_bus`).
        rotate_center_px: (x = column, y = row) pixel of the official rotation, (100, 100) as released.
        official_shift_ref_inplace_bug: with 'official_rotate', True shifts the reference points of BOTH queues (the
            released checkpoints' ``shift_ref_2d = ref_2d`` without ``.clone()``, whose ``+=`` also moves the current
            queue's points, even at a scene start), False only the history queue's, and only where there is one.
        tsa_value: 'per_layer' (the current queue's TSA value is each layer's query) or 'initial_queries' (rows
            with a previous BEV use the initial BEV queries, CAN-bus embedding added, in every layer).
        pillar_heights: 'slab_centres' (`bev_grid.pillar_heights_m`) or 'official_linspace'
            (`bev_grid.official_pillar_heights_m`).
        sca_half_pixel: True (bevdeform) or False (reference u / W_pad, `attention.find_visible_pairs`).
        sca_visibility: 'unpadded' (projections into the padding are not seen) or 'padded' (visible anywhere in the
            padded image, the official ``img_shape`` being the padded shape).
        ego_motion_input: 'ego_motion6' (`ego_motion_features` of ego_prev2curr) or 'can_bus18' (the 18-number
            CAN-bus vector after the detector's delta step, `can_bus` of `forward`; MLP 18 -> C/2 -> C).

    Parameters: `bev_queries` (Embedding(H*W, C)); `row_embed` (H, C/2) and `col_embed` (W, C/2) positional
    embeddings (position = concat(col_embed[j], row_embed[i])); `camera_embeds` (N, C) and `level_embeds` (L, C)
    added to the image features; `ego_motion_mlp` (6 or 18 -> C/2 -> C, ReLUs, LayerNorm).
    """

    def __init__(self, embed_dims: int, num_layers: int, bev_h: int, bev_w: int,
                 point_cloud_range_m: Sequence[float], num_cameras: int, num_feature_levels: int, num_heads: int,
                 ffn_dims: int, num_points_in_pillar: int = 4, sca_num_points: int = 8, tsa_num_points: int = 4,
                 dropout: float = 0.1, temporal_alignment: str = "exact_warp",
                 rotate_center_px: Sequence[float] = (100.0, 100.0), official_shift_ref_inplace_bug: bool = False,
                 tsa_value: str = "per_layer", pillar_heights: str = "slab_centres", sca_half_pixel: bool = True,
                 sca_visibility: str = "unpadded", ego_motion_input: str = "ego_motion6"):
        super().__init__()
        options = {"temporal_alignment": temporal_alignment, "tsa_value": tsa_value,
                   "pillar_heights": pillar_heights, "sca_visibility": sca_visibility,
                   "ego_motion_input": ego_motion_input}
        for name, value in options.items():
            if value not in ENCODER_OPTION_VALUES[name]:
                raise ValueError(f"BEVEncoder: {name}={value!r}, expected one of {ENCODER_OPTION_VALUES[name]}")
        if len(tuple(rotate_center_px)) != 2:
            raise ValueError(f"BEVEncoder: rotate_center_px={rotate_center_px!r}, expected (x, y) pixels")
        self.temporal_alignment, self.tsa_value = temporal_alignment, tsa_value
        self.pillar_heights, self.sca_visibility = pillar_heights, sca_visibility
        self.ego_motion_input = ego_motion_input
        self.rotate_center_px = tuple(float(v) for v in rotate_center_px)
        self.official_shift_ref_inplace_bug = bool(official_shift_ref_inplace_bug)
        self.sca_half_pixel = bool(sca_half_pixel)
        if embed_dims <= 0 or embed_dims % 2 != 0:
            raise ValueError(f"BEVEncoder: embed_dims={embed_dims} must be positive and even (row and column "
                             f"embeddings take half each)")
        if num_layers <= 0:
            raise ValueError(f"BEVEncoder: num_layers={num_layers} must be positive")
        self.embed_dims, self.num_layers = embed_dims, num_layers
        self.bev_h, self.bev_w = bev_h, bev_w
        self.point_cloud_range_m = bev_grid.check_point_cloud_range(point_cloud_range_m)
        self.num_cameras, self.num_feature_levels = num_cameras, num_feature_levels
        self.num_points_in_pillar = num_points_in_pillar
        self.bev_queries = nn.Embedding(bev_h * bev_w, embed_dims)
        self.row_embed = nn.Parameter(torch.empty(bev_h, embed_dims // 2))
        self.col_embed = nn.Parameter(torch.empty(bev_w, embed_dims // 2))
        self.camera_embeds = nn.Parameter(torch.empty(num_cameras, embed_dims))
        self.level_embeds = nn.Parameter(torch.empty(num_feature_levels, embed_dims))
        self.ego_motion_mlp = nn.Sequential(
            nn.Linear(NUM_CAN_BUS_FEATURES if ego_motion_input == "can_bus18" else NUM_EGO_MOTION_FEATURES,
                      embed_dims // 2), nn.ReLU(inplace=True),
            nn.Linear(embed_dims // 2, embed_dims), nn.ReLU(inplace=True),
            nn.LayerNorm(embed_dims))
        self.layers = nn.ModuleList(
            BEVEncoderLayer(embed_dims, num_heads, ffn_dims, bev_h, bev_w, num_cameras, num_feature_levels,
                            num_points_in_pillar, sca_num_points, tsa_num_points, dropout)
            for _ in range(num_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: BEV queries N(0, 1), positional embeddings U(0, 1), camera and level embeddings
        N(0, 1), Xavier-uniform for the MLP and FFN linears, the attention modules their own init."""
        nn.init.normal_(self.bev_queries.weight)
        nn.init.uniform_(self.row_embed)
        nn.init.uniform_(self.col_embed)
        nn.init.normal_(self.camera_embeds)
        nn.init.normal_(self.level_embeds)
        linears = [m for m in self.ego_motion_mlp if isinstance(m, nn.Linear)]
        linears += [m for layer in self.layers for m in layer.ffn if isinstance(m, nn.Linear)]
        for linear in linears:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def pillar_points_ego(self, device=None) -> torch.Tensor:
        """(H*W, Z, 3) metres, ego frame: the pillar anchors SCA projects. Built on the fly in float32 (10k points)
        rather than kept as a buffer, which ``.half()`` would round to centimetres."""
        return bev_grid.pillar_reference_points(self.bev_h, self.bev_w, self.point_cloud_range_m,
                                                self.num_points_in_pillar, device=device, dtype=torch.float32,
                                                heights=self.pillar_heights)

    def visible_pairs(self, ego2img: torch.Tensor, image_hw: torch.Tensor, padded_image_hw: Sequence[int],
                      capacity: int | None = None) -> CameraPairs:
        """The (BEV query, camera) pairs that see this encoder's pillars (`attention.find_visible_pairs`): what
        `forward` computes when it is given no `pairs`. ego2img (B, N, 4, 4), image_hw (B, N, 2), padded_image_hw
        (H_pad, W_pad) pixels; capacity None (list sized to the batch's count) or a fixed length for export.
        With ``sca_visibility='padded'`` image_hw is replaced by the padded size."""
        if self.sca_visibility == "padded":
            image_hw = torch.tensor([int(v) for v in padded_image_hw], dtype=image_hw.dtype,
                                    device=image_hw.device).expand(image_hw.shape)  # (2,) -> (B, N, 2)
        return find_visible_pairs(self.pillar_points_ego(ego2img.device), ego2img, image_hw, padded_image_hw,
                                  capacity=capacity, half_pixel=self.sca_half_pixel)

    def positional_embedding(self) -> torch.Tensor:
        """(H*W, C): concat(col_embed[j], row_embed[i]) for cell (i, j), row-major."""
        half = self.embed_dims // 2
        cols = self.col_embed[None, :, :].expand(self.bev_h, self.bev_w, half)  # (W, C/2) -> (H, W, C/2)
        rows = self.row_embed[:, None, :].expand(self.bev_h, self.bev_w, half)  # (H, C/2) -> (H, W, C/2)
        return torch.cat([cols, rows], dim=-1).reshape(self.bev_h * self.bev_w, self.embed_dims)  # (H*W, C)

    @property
    def needs_can_bus(self) -> bool:
        """True when `forward` needs the 18-number `can_bus` (an official option reads it)."""
        return self.ego_motion_input == "can_bus18" or self.temporal_alignment == "official_rotate"

    def _check_inputs(self, mlvl_feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev) -> int:
        if len(mlvl_feats) != self.num_feature_levels:
            raise ValueError(f"BEVEncoder: mlvl_feats must hold num_feature_levels={self.num_feature_levels} "
                             f"levels, got {len(mlvl_feats)}")
        batch = mlvl_feats[0].shape[0]
        for level, feat in enumerate(mlvl_feats):
            if feat.dim() != 5 or feat.shape[:3] != (batch, self.num_cameras, self.embed_dims):
                raise ValueError(f"BEVEncoder: mlvl_feats[{level}] must be (B={batch}, N={self.num_cameras}, "
                                 f"C={self.embed_dims}, H, W), got {tuple(feat.shape)}")
        expected = {"ego2img": (ego2img, (batch, self.num_cameras, 4, 4)),
                    "image_hw": (image_hw, (batch, self.num_cameras, 2)),
                    "ego_prev2curr": (ego_prev2curr, (batch, 4, 4)),
                    "has_prev": (has_prev, (batch,))}
        if prev_bev is not None:
            expected["prev_bev"] = (prev_bev, (batch, self.bev_h * self.bev_w, self.embed_dims))
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"BEVEncoder: {name} must have shape {shape}, got {tuple(tensor.shape)}")
        if has_prev.dtype != torch.bool:
            raise ValueError(f"BEVEncoder: has_prev must be a bool tensor, got {has_prev.dtype}")
        return batch

    def forward(self, mlvl_feats: Sequence[torch.Tensor], ego2img: torch.Tensor, image_hw: torch.Tensor,
                prev_bev: torch.Tensor | None, ego_prev2curr: torch.Tensor, has_prev: torch.Tensor,
                padded_image_hw: Sequence[int] | None = None, pairs: CameraPairs | None = None,
                can_bus: torch.Tensor | None = None) -> torch.Tensor:
        """Encode one frame.

        Args:
            mlvl_feats: L tensors (B, N, C, H_l, W_l), finest first.
            ego2img: (B, N, 4, 4) for the padded image as fed to the network. image_hw: (B, N, 2) unpadded (H, W).
            prev_bev: (B, H*W, C) the previous frame's output (its own ego frame), or None (no row has history).
            ego_prev2curr: (B, 4, 4) previous ego -> current ego. has_prev: (B,) bool; False rows ignore prev_bev.
            padded_image_hw: (H_pad, W_pad) of the images fed to the backbone (``images.shape[-2:]``); None infers
                it from the finest level (`infer_padded_image_hw`).
            pairs: the visible (query, camera) pairs of these cameras, `visible_pairs(ego2img, image_hw,
                padded_image_hw, capacity)`; None computes them with a data-dependent length (capacity None).
            can_bus: (B, 18) BEVFormer's CAN-bus vector after the detector's delta step
                (`bevdeform.compat.can_bus.official_can_bus_delta`): required by ``ego_motion_input='can_bus18'``
                and ``temporal_alignment='official_rotate'``, ignored otherwise.

        Returns:
            bev (B, H*W, C), current ego frame.
        """
        self._check_inputs(mlvl_feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev)
        dtype = mlvl_feats[0].dtype
        if pairs is None and padded_image_hw is None:
            padded_image_hw = infer_padded_image_hw(tuple(mlvl_feats[0].shape[-2:]), image_hw)

        batch = has_prev.shape[0]
        if self.needs_can_bus and (can_bus is None or tuple(can_bus.shape) != (batch, NUM_CAN_BUS_FEATURES)):
            raise ValueError(f"BEVEncoder: ego_motion_input={self.ego_motion_input!r} / temporal_alignment="
                             f"{self.temporal_alignment!r} need can_bus of shape (B={batch}, 18) (BEVFormer's CAN-bus "
                             f"vector after the delta step), got "
                             f"{None if can_bus is None else tuple(can_bus.shape)}")
        if self.ego_motion_input == "can_bus18":
            ego_motion = self.ego_motion_mlp(can_bus.to(dtype))  # (B, 18) -> (B, C)
        else:
            ego_motion = self.ego_motion_mlp(ego_motion_features(ego_prev2curr.to(dtype), has_prev))  # (B, C)
        # (H*W, C) -> (1, H*W, C) + (B, 1, C) -> (B, H*W, C)
        bev = self.bev_queries.weight.to(dtype)[None] + ego_motion[:, None, :]
        bev_pos = self.positional_embedding().to(dtype)[None]  # (H*W, C) -> (1, H*W, C)

        prev_bev_aligned = None
        history_shift = current_shift = None
        if self.temporal_alignment == "official_rotate":
            shift = official_reference_shift(can_bus, self.bev_h, self.bev_w, self.point_cloud_range_m)  # (B, 2)
            if self.official_shift_ref_inplace_bug:
                history_shift = current_shift = shift  # the in-place += moved both queues' points, every row
            else:
                history_shift = torch.where(has_prev[:, None], shift, torch.zeros_like(shift))
            if prev_bev is not None:
                prev_bev_aligned = official_rotate_bev(prev_bev.to(dtype), can_bus[:, 17], self.bev_h, self.bev_w,
                                                       self.rotate_center_px)
        elif prev_bev is not None:
            prev_bev_aligned = align_prev_bev(prev_bev.to(dtype), ego_prev2curr, self.bev_h, self.bev_w,
                                              self.point_cloud_range_m)
        tsa_value_current = bev if self.tsa_value == "initial_queries" else None
        if pairs is None:
            pairs = self.visible_pairs(ego2img, image_hw, padded_image_hw)
        mlvl_feats = [
            # (N, C) -> (1, N, C, 1, 1); (C,) -> (1, 1, C, 1, 1)
            feat + self.camera_embeds.to(dtype)[None, :, :, None, None]
            + self.level_embeds[level].to(dtype)[None, None, :, None, None]
            for level, feat in enumerate(mlvl_feats)]
        for layer in self.layers:
            bev = layer(bev, bev_pos, prev_bev_aligned, has_prev, mlvl_feats, pairs, tsa_value_current,
                        history_shift, current_shift)
        return bev
