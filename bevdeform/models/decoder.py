"""Object-query decoder with iterative box refinement (BEVFormer's detection decoder).

``num_queries`` learned object queries, each with a learned positional embedding, read the BEV map:

    reference_0 = sigmoid(Linear(query_pos))                    (B, Q, 3) normalised (x, y, z) in the range
    for each layer l:
        queries = norm(queries + self_attn(q = k = queries + query_pos, v = queries))
        queries = norm(queries + deform_attn(queries + query_pos, around reference_l (x, y), on the BEV))
        queries = norm(queries + ffn(queries))
        logits_l = cls_branch_l(queries)
        codes_l  = reg_branch_l(queries)
        reference_{l+1} = sigmoid(inverse_sigmoid(reference_l) + codes_l[0, 1, 4])     refined (x, y, z)
        codes_l[0, 1, 4] = reference_{l+1} mapped to metres
        reference_{l+1} is detached before layer l + 1 reads it

Frames and units: normalised reference ``(x, y, z)`` in [0, 1] is ``((x - x_min) / (x_max - x_min), ...)`` in the
current ego frame (docs/model.md); its (x, y) part is directly the MSDA op's normalised location on the BEV map,
whose rows run along y and columns along x. Box codes follow ``bevdeform.models.head``: dims 0, 1, 4 are the centre
in metres, the others as the regression branch predicts them.

Why detach between layers (Deformable DETR's refinement): each layer learns a correction of the previous estimate;
letting the gradient of layer l + 1 flow into layer l's estimate couples the layers and destabilises training.
The first reference is not detached, so the reference Linear and the query embeddings learn from every layer's
location loss through layer 0 (as in the reference implementation).

Two-stage initialisation (``query_init='heatmap'``, a bevdeform option; BEVFormer's default is ``'learned'``): the
queries start at the Q highest local maxima of the BEV centre heatmap (``bev_heatmap.BEVHeatmapHead``) over all
classes and cells, as CenterPoint / TransFusion-style detectors do. A proposal at class k, BEV row i (along y) and
column j (along x) gives

    reference_0 = ((j + 0.5) / bev_w, (i + 0.5) / bev_h, 0.5)     the cell centre, normalised; z mid-range
    queries_0   = bev[i * bev_w + j] + class_embedding[k]          the BEV feature of the cell + its class
    query_pos   = MLP(reference_0[:2])

The choice of cells (top-k of the detached heatmap) is not differentiable; the gathered features are, so the
decoder's losses reach the BEV through the chosen cells. The heatmap head is then part of inference (and export).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bevdeform.models.attention import DeformableAttention
from bevdeform.models.bev_grid import check_point_cloud_range
from bevdeform.models.head import CODE_SIZE, ClassificationBranch, RegressionBranch

__all__ = ["DetectionDecoder", "DecoderLayer", "inverse_sigmoid"]

# Code dims that hold the box centre: cx, cy (0, 1) and cz (4) in the head's code layout.
_CENTRE_CODE_DIMS = (0, 1, 4)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] so a reference at the border of the range stays finite."""
    x = x.clamp(min=eps, max=1.0 - eps)
    return torch.log(x / (1.0 - x))


class DecoderLayer(nn.Module):
    """Self-attention -> norm -> deformable cross-attention on the BEV -> norm -> FFN -> norm (post-norm).

    Args:
        embed_dims: C, query width.
        num_heads: heads of both attentions (C must be divisible by it).
        num_points: sampling points per head around each query's reference point on the BEV (1 level).
        ffn_dims: hidden width of the FFN.
        dropout: dropout on the self-attention weights and on each residual branch.
    """

    def __init__(self, embed_dims: int, num_heads: int, num_points: int, ffn_dims: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
        self.self_attn_dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.cross_attn = DeformableAttention(embed_dims, num_heads, num_levels=1, num_points=num_points)
        self.cross_attn_dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = nn.Sequential(
            nn.Linear(embed_dims, ffn_dims),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(ffn_dims, embed_dims),
        )
        self.ffn_dropout = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(embed_dims)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        reference_xy: torch.Tensor,
        bev: torch.Tensor,
        bev_spatial_shapes: torch.Tensor,
        bev_level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            queries: (B, Q, C) object queries.
            query_pos: (B, Q, C) their positional embedding (added to queries and keys, not to values).
            reference_xy: (B, Q, 2) normalised BEV (u, v) = normalised ego (x, y) of each query's reference point.
            bev: (B, bev_h * bev_w, C) BEV features, row-major over (i along y, j along x).
            bev_spatial_shapes: (1, 2) int64 ``[[bev_h, bev_w]]``; bev_level_start_index: (1,) int64 ``[0]``.
        Returns:
            (B, Q, C) updated queries.
        """
        q = k = queries + query_pos
        attended, _ = self.self_attn(q, k, queries, need_weights=False)
        queries = self.norm1(queries + self.self_attn_dropout(attended))
        attended = self.cross_attn(
            queries, reference_xy, bev, bev_spatial_shapes, bev_level_start_index, query_pos=query_pos
        )
        queries = self.norm2(queries + self.cross_attn_dropout(attended))
        queries = self.norm3(queries + self.ffn_dropout(self.ffn(queries)))
        return queries


class DetectionDecoder(nn.Module):
    """Learned object queries read the BEV map; every layer predicts class logits and box codes.

    Args:
        embed_dims: C, width of the queries and of the BEV features.
        num_layers: decoder layers; each has its own classification and regression branch (box refinement).
        num_queries: Q, object queries (900 in BEVFormer).
        num_heads: attention heads.
        num_points: deformable cross-attention points per head (4 in BEVFormer).
        ffn_dims: FFN hidden width.
        num_classes: sigmoid classes (no background logit).
        code_size: box code length, must be 10 (``bevdeform.models.head`` layout).
        bev_h, bev_w: BEV grid rows (along ego y) and columns (along ego x).
        point_cloud_range_m: ``(x_min, y_min, z_min, x_max, y_max, z_max)``, ego frame, metres: what normalised
            reference coordinates 0 and 1 mean.
        dropout: dropout of the layers.
        query_init: ``'learned'`` (BEVFormer: learned query embeddings and reference points) or ``'heatmap'``
            (two-stage: the queries start at the BEV heatmap's peaks, module docstring; :meth:`forward` then needs
            the heatmap logits).
        velocity_scale_mps: the regression branch's velocity outputs (code dims 8, 9) are multiplied by this
            before they become the codes' (vx, vy) in m/s: 1.0 is BEVFormer's (raw outputs in m/s, so published
            checkpoints load unchanged); 10.0 lets a freshly initialised branch (outputs ~0.1) reach traffic speeds
            with the step sizes of the other dims (measured in docs/benchmarks.md "Learning (issue 14)").
        heading_scale: the regression branch's heading outputs (code dims 6, 7) are multiplied by this before
            they become the codes' (sin, cos) of the yaw: 1.0 is BEVFormer's (published checkpoints load unchanged);
            10.0 lets a freshly initialised branch move them as fast as the velocity's (on 8 overfit frames mAOE
            0.27 -> 0.009, docs/benchmarks.md "1 m BEV cells").

    Forward: ``bev (B, bev_h * bev_w, C) [, heatmap_logits (B, num_classes, bev_h, bev_w)] -> (all_cls_logits
    (L, B, Q, num_classes), all_box_codes (L, B, Q, 10))`` with L = num_layers; codes in metres (ego frame) for
    dims 0, 1, 4.
    """

    def __init__(
        self,
        embed_dims: int,
        num_layers: int,
        num_queries: int,
        num_heads: int,
        num_points: int,
        ffn_dims: int,
        num_classes: int,
        code_size: int,
        bev_h: int,
        bev_w: int,
        point_cloud_range_m: Sequence[float],
        dropout: float = 0.1,
        query_init: str = "learned",
        velocity_scale_mps: float = 1.0,
        heading_scale: float = 1.0,
    ):
        super().__init__()
        for name, scale in (("velocity_scale_mps", velocity_scale_mps), ("heading_scale", heading_scale)):
            if not scale > 0:
                raise ValueError(f"DetectionDecoder: {name}={scale}, expected > 0")
        self.velocity_scale_mps = float(velocity_scale_mps)
        self.heading_scale = float(heading_scale)
        if query_init not in ("learned", "heatmap"):
            raise ValueError(f"DetectionDecoder: query_init={query_init!r}, expected 'learned' or 'heatmap'")
        if query_init == "heatmap" and num_queries > num_classes * bev_h * bev_w:
            raise ValueError(
                f"DetectionDecoder: query_init='heatmap' takes num_queries={num_queries} peaks from "
                f"num_classes * bev_h * bev_w = {num_classes * bev_h * bev_w} heatmap cells: too many queries"
            )
        if code_size != CODE_SIZE:
            raise ValueError(
                f"DetectionDecoder: code_size={code_size}, expected {CODE_SIZE} (the box code layout of "
                f"bevdeform.models.head: cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy)"
            )
        for name, value in (("embed_dims", embed_dims), ("num_layers", num_layers), ("num_queries", num_queries),
                            ("num_heads", num_heads), ("num_points", num_points), ("ffn_dims", ffn_dims),
                            ("num_classes", num_classes), ("bev_h", bev_h), ("bev_w", bev_w)):
            if int(value) < 1:
                raise ValueError(f"DetectionDecoder: {name}={value}, expected >= 1")
        if embed_dims % num_heads != 0:
            raise ValueError(f"DetectionDecoder: embed_dims={embed_dims} must be divisible by num_heads={num_heads}")
        self.embed_dims = int(embed_dims)
        self.num_layers = int(num_layers)
        self.num_queries = int(num_queries)
        self.num_classes = int(num_classes)
        self.code_size = int(code_size)
        self.bev_h = int(bev_h)
        self.bev_w = int(bev_w)
        self.point_cloud_range_m = check_point_cloud_range(point_cloud_range_m)
        self.query_init = query_init

        if query_init == "learned":
            self.query_embedding = nn.Embedding(num_queries, embed_dims)  # content of each query
            self.query_pos_embedding = nn.Embedding(num_queries, embed_dims)  # where it looks: feeds the reference
            self.reference_points = nn.Linear(embed_dims, 3)  # query_pos -> initial normalised (x, y, z) logits
        else:
            self.class_embedding = nn.Embedding(num_classes, embed_dims)  # added to the proposal cell's feature
            # normalised (x, y) of the proposal -> query_pos
            self.position_embedding = nn.Sequential(
                nn.Linear(2, embed_dims), nn.ReLU(inplace=True), nn.Linear(embed_dims, embed_dims)
            )
        self.layers = nn.ModuleList(
            DecoderLayer(embed_dims, num_heads, num_points, ffn_dims, dropout) for _ in range(num_layers)
        )
        self.cls_branches = nn.ModuleList(ClassificationBranch(embed_dims, num_classes) for _ in range(num_layers))
        self.reg_branches = nn.ModuleList(RegressionBranch(embed_dims, code_size) for _ in range(num_layers))

        # The BEV is a single-level value map for the op; buffers so they follow .to(device).
        self.register_buffer("bev_spatial_shapes", torch.tensor([[bev_h, bev_w]], dtype=torch.int64), persistent=False)
        self.register_buffer("bev_level_start_index", torch.zeros(1, dtype=torch.int64), persistent=False)
        x_min, y_min, z_min, x_max, y_max, z_max = self.point_cloud_range_m
        # Normalised (x, y, z) -> metres: low + normalised * size. Plain floats, applied in the codes' dtype.
        self._range_low = (x_min, y_min, z_min)
        self._range_size = (x_max - x_min, y_max - y_min, z_max - z_min)
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier-uniform with zero bias (the reference's init): the initial references spread over the range
        # around its centre (sigmoid(0) = 0.5) instead of collapsing to one point.
        if self.query_init == "learned":
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        for layer in self.layers:
            for module in layer.ffn:
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)

    def normalised_to_metres(self, reference: torch.Tensor) -> torch.Tensor:
        """Normalised (x, y, z) (..., 3) -> ego-frame metres (..., 3)."""
        low = reference.new_tensor(self._range_low)
        size = reference.new_tensor(self._range_size)
        return reference * size + low

    def initial_reference(self, batch_size: int) -> torch.Tensor:
        """The first layer's reference points, (B, Q, 3) normalised (x, y, z), not detached."""
        reference = self.reference_points(self.query_pos_embedding.weight).sigmoid()  # (Q, 3)
        return reference[None].expand(batch_size, -1, -1)  # (Q, 3) -> (B, Q, 3)

    def heatmap_proposals(
        self, bev: torch.Tensor, heatmap_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two-stage initial queries (``query_init='heatmap'``, module docstring).

        Args:
            bev: (B, bev_h * bev_w, C), row-major over (i along y, j along x).
            heatmap_logits: (B, num_classes, bev_h, bev_w) centre-heatmap logits of the same BEV.
        Returns:
            queries (B, Q, C), query_pos (B, Q, C), reference (B, Q, 3) normalised (x, y, z), labels (B, Q) int64
            class of each proposal, cells (B, Q) int64 BEV cell index i * bev_w + j; in descending heatmap score.
        """
        batch_size, num_classes = heatmap_logits.shape[:2]
        if tuple(heatmap_logits.shape) != (bev.shape[0], self.num_classes, self.bev_h, self.bev_w):
            raise ValueError(
                f"DetectionDecoder: heatmap_logits must be (B={bev.shape[0]}, {self.num_classes}, {self.bev_h}, "
                f"{self.bev_w}), got {tuple(heatmap_logits.shape)}"
            )
        heat = heatmap_logits.detach().float().sigmoid()  # (B, K, H, W)
        # Local maxima of each class map (3x3), CenterNet's peak extraction; other cells score 0.
        pooled = nn.functional.max_pool2d(heat, kernel_size=3, stride=1, padding=1)
        peaks = torch.where(heat == pooled, heat, torch.zeros_like(heat))
        cells_per_map = self.bev_h * self.bev_w
        top = peaks.reshape(batch_size, num_classes * cells_per_map).topk(self.num_queries, dim=1).indices  # (B, Q)
        labels = top // cells_per_map  # (B, Q) class k
        cells = top % cells_per_map  # (B, Q) i * bev_w + j
        rows = torch.div(cells, self.bev_w, rounding_mode="floor")  # i, along y
        cols = cells % self.bev_w  # j, along x
        x = (cols.to(bev.dtype) + 0.5) / self.bev_w
        y = (rows.to(bev.dtype) + 0.5) / self.bev_h
        reference = torch.stack((x, y, torch.full_like(x, 0.5)), dim=-1)  # (B, Q, 3)
        gathered = bev.gather(1, cells[..., None].expand(-1, -1, bev.shape[2]))  # (B, HW, C) -> (B, Q, C)
        queries = gathered + self.class_embedding(labels)  # (B, Q, C)
        query_pos = self.position_embedding(reference[..., :2])  # (B, Q, 2) -> (B, Q, C)
        return queries, query_pos, reference, labels, cells

    def forward(
        self, bev: torch.Tensor, heatmap_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            bev: (B, bev_h * bev_w, C) BEV features of the current frame, row-major over (i along y, j along x).
            heatmap_logits: (B, num_classes, bev_h, bev_w) the BEV centre-heatmap logits; required with
                ``query_init='heatmap'``, ignored otherwise.
        Returns:
            all_cls_logits: (num_layers, B, Q, num_classes) logits of every layer.
            all_box_codes: (num_layers, B, Q, 10) box codes of every layer, dims 0, 1, 4 the refined reference
                centre in metres (ego frame).
        """
        if bev.dim() != 3 or bev.shape[1] != self.bev_h * self.bev_w or bev.shape[2] != self.embed_dims:
            raise ValueError(
                f"DetectionDecoder: bev must be (B, bev_h*bev_w={self.bev_h * self.bev_w}, C={self.embed_dims}), "
                f"got {tuple(bev.shape)}"
            )
        batch_size = bev.shape[0]
        if self.query_init == "heatmap":
            if heatmap_logits is None:
                raise ValueError("DetectionDecoder: query_init='heatmap' needs heatmap_logits (B, K, bev_h, bev_w)")
            queries, query_pos, reference, _, _ = self.heatmap_proposals(bev, heatmap_logits)
        else:
            queries = self.query_embedding.weight[None].expand(batch_size, -1, -1)  # (Q, C) -> (B, Q, C)
            query_pos = self.query_pos_embedding.weight[None].expand(batch_size, -1, -1)  # (Q, C) -> (B, Q, C)
            reference = self.initial_reference(batch_size)  # (B, Q, 3)

        all_cls_logits, all_box_codes = [], []
        for layer, cls_branch, reg_branch in zip(self.layers, self.cls_branches, self.reg_branches):
            queries = layer(
                queries, query_pos, reference[..., :2], bev, self.bev_spatial_shapes, self.bev_level_start_index
            )
            cls_logits = cls_branch(queries)  # (B, Q, num_classes)
            codes = reg_branch(queries)  # (B, Q, 10)
            centre_deltas = codes[..., _CENTRE_CODE_DIMS]  # (B, Q, 10) -> (B, Q, 3): deltas for x, y, z
            refined = (inverse_sigmoid(reference) + centre_deltas).sigmoid()  # (B, Q, 3) normalised
            centre_m = self.normalised_to_metres(refined)  # (B, Q, 3) metres
            # Write the metric centre into dims 0, 1, 4 out of place, keeping the autograd graph of the others.
            # Dims 6, 7 (sin, cos of the yaw): the branch's outputs times heading_scale; dims 8, 9 (vx, vy) in m/s:
            # times velocity_scale_mps.
            codes = torch.cat(
                (centre_m[..., 0:2], codes[..., 2:4], centre_m[..., 2:3], codes[..., 5:6],
                 codes[..., 6:8] * self.heading_scale, codes[..., 8:10] * self.velocity_scale_mps), dim=-1
            )  # (B, Q, 10)
            all_cls_logits.append(cls_logits)
            all_box_codes.append(codes)
            reference = refined.detach()
        # L x (B, Q, .) -> (L, B, Q, .)
        return torch.stack(all_cls_logits), torch.stack(all_box_codes)
