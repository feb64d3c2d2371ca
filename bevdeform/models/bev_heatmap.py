"""Auxiliary dense supervision of the BEV map: per-class object-centre heatmaps (training only).

The set-prediction loss reaches the BEV encoder only through the few BEV cells the matched queries sample, so an
encoder (and a backbone) trained from scratch learns slowly where objects are. This auxiliary head gives every
BEV cell a target: a small convolutional head predicts, for each class, a heatmap over the BEV grid whose targets
are Gaussians at the ground-truth box centres (CenterNet / CenterPoint), scored with CenterNet's penalty-reduced
focal loss. It changes nothing at inference (the decoder never reads it; ``predict`` and export skip it) and is off
in the published configs (``model.loss.bev_heatmap_weight: 0``); ``bev_nano`` turns it on to learn within minutes
on a CPU.

Frames (docs/model.md): the BEV map ``(B, bev_h * bev_w, C)`` is row-major over ``(i, j)``, row ``i`` along ego y,
column ``j`` along ego x; cell ``(i, j)`` covers ``x in [x_min + j * dx, x_min + (j + 1) * dx)`` and
``y in [y_min + i * dy, y_min + (i + 1) * dy)`` with ``dx = (x_max - x_min) / bev_w``, ``dy = (y_max - y_min) /
bev_h``. Heatmaps are ``(B, num_classes, bev_h, bev_w)`` in the same orientation.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from bevdeform.models.bev_grid import check_point_cloud_range
from bevdeform.models.head import CODE_SIZE, encode_boxes

__all__ = ["BEVHeatmapHead", "BEVBoxRegressionHead", "render_centre_heatmaps", "centre_cell_box_targets",
           "heatmap_focal_loss"]


def _conv_norm_relu(channels: int) -> nn.Sequential:
    """Conv3x3(C, C, no bias) + GroupNorm(gcd(C, 32) groups) + ReLU: the hidden layer of the BEV heads."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(math.gcd(channels, 32), channels),
        nn.ReLU(inplace=True),
    )


def _bev_as_image(bev: torch.Tensor, bev_h: int, bev_w: int, channels: int, owner: str) -> torch.Tensor:
    """``(B, bev_h * bev_w, C)`` row-major BEV -> ``(B, C, bev_h, bev_w)``; a ValueError naming ``owner`` otherwise."""
    if bev.dim() != 3 or bev.shape[1] != bev_h * bev_w or bev.shape[2] != channels:
        raise ValueError(f"{owner}: bev must be (B, bev_h*bev_w={bev_h * bev_w}, C={channels}), got "
                         f"{tuple(bev.shape)}")
    return bev.transpose(1, 2).reshape(bev.shape[0], channels, bev_h, bev_w)  # (B, HW, C) -> (B, C, H, W)


def _centres_in_cells(boxes: torch.Tensor, bev_h: int, bev_w: int, point_cloud_range_m: Sequence[float]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box centres in continuous cell units of the grid, and which lie on it.

    Returns ``col_f`` (n,) ``(x - x_min) / dx`` (column j = floor, along x), ``row_f`` (n,) ``(y - y_min) / dy``
    (row i = floor, along y), ``inside`` (n,) bool: the centre's cell is on the ``bev_h x bev_w`` grid.
    """
    x_min, y_min, _, x_max, y_max, _ = check_point_cloud_range(point_cloud_range_m)
    col_f = (boxes[:, 0] - x_min) / ((x_max - x_min) / bev_w)  # (n,)
    row_f = (boxes[:, 1] - y_min) / ((y_max - y_min) / bev_h)  # (n,)
    col, row = torch.floor(col_f), torch.floor(row_f)
    inside = (col >= 0) & (col < bev_w) & (row >= 0) & (row < bev_h)
    return col_f, row_f, inside


class BEVHeatmapHead(nn.Module):
    """BEV features -> per-class centre-heatmap logits: Conv3x3(C, C) + GroupNorm + ReLU, then Conv1x1(C, K).

    The last bias starts at ``logit(prior_prob)`` (CenterNet's 0.1) so the mostly-empty map starts near zero.

    Args:
        embed_dims: C, the BEV feature width.
        num_classes: K heatmaps, class order of the detector.
        bev_h, bev_w: BEV grid rows (along ego y) and columns (along ego x).
        point_cloud_range_m: ``(x_min, y_min, z_min, x_max, y_max, z_max)``, ego frame, metres: the grid's extent.
        weight: factor of :meth:`loss`.
    Forward: ``bev (B, bev_h * bev_w, C) -> logits (B, K, bev_h, bev_w)``; :meth:`loss` is the weighted auxiliary loss.
    """

    def __init__(self, embed_dims: int, num_classes: int, bev_h: int, bev_w: int,
                 point_cloud_range_m: Sequence[float], weight: float = 1.0, prior_prob: float = 0.1):
        super().__init__()
        if min(embed_dims, num_classes, bev_h, bev_w) < 1:
            raise ValueError(f"BEVHeatmapHead: embed_dims={embed_dims}, num_classes={num_classes}, bev_h={bev_h}, "
                             f"bev_w={bev_w}, expected all >= 1")
        self.embed_dims = int(embed_dims)
        self.num_classes = int(num_classes)
        self.point_cloud_range_m = check_point_cloud_range(point_cloud_range_m)
        self.weight = float(weight)
        self.bev_h = int(bev_h)
        self.bev_w = int(bev_w)
        self.hidden = _conv_norm_relu(self.embed_dims)
        self.logits = nn.Conv2d(embed_dims, num_classes, kernel_size=1)
        nn.init.constant_(self.logits.bias, -math.log((1.0 - prior_prob) / prior_prob))

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        image = _bev_as_image(bev, self.bev_h, self.bev_w, self.embed_dims, "BEVHeatmapHead")  # (B, C, H, W)
        return self.logits(self.hidden(image))  # (B, K, H, W)

    def loss(self, bev: torch.Tensor, gt_boxes: Sequence[torch.Tensor], gt_labels: Sequence[torch.Tensor],
             logits: torch.Tensor | None = None) -> torch.Tensor:
        """``weight * heatmap_focal_loss(self(bev), render_centre_heatmaps(gt...))``, a scalar.

        Args:
            bev: (B, bev_h * bev_w, C); gt_boxes: B tensors (n_b, 9) ego frame; gt_labels: B int64 tensors (n_b,).
            logits: ``self(bev)`` when the caller already has it (the two-stage decoder ran the head), else None.
        """
        if logits is None:
            logits = self(bev)  # (B, K, H, W)
        targets = render_centre_heatmaps(gt_boxes, gt_labels, self.num_classes, self.bev_h, self.bev_w,
                                         self.point_cloud_range_m).to(logits.device)
        return self.weight * heatmap_focal_loss(logits, targets)


class BEVBoxRegressionHead(nn.Module):
    """Dense box regression at the ground-truth centre cells of the BEV (CenterPoint's regression heads; training
    only, a bevdeform option: ``model.loss.bev_box_weight``).

    The heatmap head teaches the BEV where objects are; this one teaches the cell holding an object's centre what
    the object is like: its centre within the cell, height, size, heading and velocity. The decoder's set loss
    reaches those through the few cells its queries sample, so without it the encoder learns heading slowly and
    velocity (which it can read only by comparing the current BEV with the aligned previous BEV in temporal
    self-attention) hardly at all. Inference never runs it.

    Conv3x3(C, C) + GroupNorm + ReLU, then Conv1x1(C, 10) -> per cell the code of :func:`centre_cell_box_targets`:
    ``(dx, dy, log w, log l, z, log h, sin yaw, cos yaw, vx / s, vy / s)``, ``(dx, dy)`` the centre's offset from
    the cell centre in cells, ``s = velocity_scale_mps``. Loss: ``weight * sum |code - target| / num_boxes`` over
    the centre cells of the in-range boxes (L1, as the decoder's).

    Args:
        embed_dims: C. bev_h, bev_w: grid rows (along ego y) and columns (along ego x).
        point_cloud_range_m: ``(x_min, y_min, z_min, x_max, y_max, z_max)``, the grid's extent, metres.
        weight: factor of :meth:`loss`.
        velocity_scale_mps: the head predicts velocity in units of this many m/s (a raw-m/s output moves too
            slowly under L1 and Adam, docs/benchmarks.md).
    Forward: ``bev (B, bev_h * bev_w, C) -> codes (B, 10, bev_h, bev_w)``.
    """

    def __init__(self, embed_dims: int, bev_h: int, bev_w: int, point_cloud_range_m: Sequence[float],
                 weight: float = 1.0, velocity_scale_mps: float = 1.0):
        super().__init__()
        if min(embed_dims, bev_h, bev_w) < 1 or not velocity_scale_mps > 0:
            raise ValueError(f"BEVBoxRegressionHead: embed_dims={embed_dims}, bev_h={bev_h}, bev_w={bev_w} must be "
                             f">= 1 and velocity_scale_mps={velocity_scale_mps} > 0")
        self.embed_dims, self.bev_h, self.bev_w = int(embed_dims), int(bev_h), int(bev_w)
        self.point_cloud_range_m = check_point_cloud_range(point_cloud_range_m)
        self.weight = float(weight)
        self.velocity_scale_mps = float(velocity_scale_mps)
        self.hidden = _conv_norm_relu(self.embed_dims)
        self.codes = nn.Conv2d(embed_dims, CODE_SIZE, kernel_size=1)

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        image = _bev_as_image(bev, self.bev_h, self.bev_w, self.embed_dims, "BEVBoxRegressionHead")  # (B, C, H, W)
        return self.codes(self.hidden(image))  # (B, 10, H, W)

    def loss(self, bev: torch.Tensor, gt_boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """The weighted L1 loss at the centre cells, a scalar (0, still connected to the graph, without boxes).

        Args: bev (B, bev_h * bev_w, C); gt_boxes: B tensors (n_b, 9) ``[x, y, z, w, l, h, yaw, vx, vy]``, the
            frame the model predicts in.
        """
        codes = self(bev).flatten(2)  # (B, 10, H, W) -> (B, 10, H*W)
        total = codes.sum() * 0.0
        num_boxes = 0
        for b, boxes in enumerate(gt_boxes):
            cells, targets = centre_cell_box_targets(boxes.to(codes.device), self.bev_h, self.bev_w,
                                                     self.point_cloud_range_m, self.velocity_scale_mps)
            if cells.numel() == 0:
                continue
            predicted = codes[b][:, cells].transpose(0, 1)  # (10, m) -> (m, 10)
            total = total + (predicted - targets.to(predicted.dtype)).abs().sum()
            num_boxes += int(cells.numel())
        return self.weight * total / max(num_boxes, 1)


def centre_cell_box_targets(
    boxes: torch.Tensor, bev_h: int, bev_w: int, point_cloud_range_m: Sequence[float], velocity_scale_mps: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The BEV cell holding each box centre and the box's code relative to that cell.

    Args:
        boxes: (n, 9) ``[x, y, z, w, l, h, yaw, vx, vy]``, metres / radians / m/s, in the grid's frame.
        bev_h, bev_w, point_cloud_range_m: the grid (module docstring: cell ``(i, j)``, row ``i`` along y).
        velocity_scale_mps: velocity unit of the code.
    Returns:
        cells (m,) int64 ``i * bev_w + j`` of the m boxes whose centre lies in the grid's (x, y) range;
        targets (m, 10) float32 ``(dx, dy, log w, log l, z, log h, sin yaw, cos yaw, vx / s, vy / s)``, ``dx, dy``
        the centre minus the cell centre in cells (in [-0.5, 0.5)).
    """
    boxes = boxes.detach().float()
    col_f, row_f, inside = _centres_in_cells(boxes, bev_h, bev_w, point_cloud_range_m)
    col, row = torch.floor(col_f), torch.floor(row_f)
    codes = encode_boxes(boxes[inside])  # (m, 10) (cx, cy, log w, log l, cz, log h, sin, cos, vx, vy)
    offsets = torch.stack((col_f[inside] - col[inside] - 0.5, row_f[inside] - row[inside] - 0.5), dim=-1)  # (m, 2)
    targets = torch.cat((offsets, codes[:, 2:8], codes[:, 8:10] / velocity_scale_mps), dim=-1)  # (m, 10)
    cells = (row[inside] * bev_w + col[inside]).long()  # (m,)
    return cells, targets


def render_centre_heatmaps(
    gt_boxes: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor],
    num_classes: int,
    bev_h: int,
    bev_w: int,
    point_cloud_range_m: Sequence[float],
    min_sigma_cells: float = 0.75,
) -> torch.Tensor:
    """Target heatmaps: for each GT box a Gaussian on its class's map, peak 1 at the cell holding its centre.

    ``target[b, k, i, j] = max over boxes g of class k of exp(-((i - i_g)^2 + (j - j_g)^2) / (2 sigma_g^2))`` with
    ``(i_g, j_g)`` the cell containing the box centre and ``sigma_g = max(min_sigma_cells, diameter_g / 6)`` cells,
    ``diameter_g`` the box footprint's longer side (``max(w, l)``) in cells of the grid. Boxes whose centre lies
    outside the grid's (x, y) range add nothing.

    Args:
        gt_boxes: B tensors (n_b, >= 6) ``[x, y, z, w, l, h, ...]``, ego frame, metres.
        gt_labels: B int64 tensors (n_b,) in [0, num_classes).
        num_classes: K.
        bev_h, bev_w: grid rows (along y) and columns (along x).
        point_cloud_range_m: ``(x_min, y_min, z_min, x_max, y_max, z_max)``.
        min_sigma_cells: smallest Gaussian sigma, in cells.
    Returns:
        (B, K, bev_h, bev_w) float32 in [0, 1] on the boxes' device; exactly 1 at each in-range centre cell.
    """
    x_min, y_min, _, x_max, y_max, _ = check_point_cloud_range(point_cloud_range_m)
    if len(gt_boxes) != len(gt_labels):
        raise ValueError(f"render_centre_heatmaps: {len(gt_boxes)} box tensors but {len(gt_labels)} label tensors")
    cell_x = (x_max - x_min) / bev_w
    cell_y = (y_max - y_min) / bev_h
    device = gt_boxes[0].device if len(gt_boxes) else torch.device("cpu")
    heatmaps = torch.zeros(len(gt_boxes), num_classes, bev_h, bev_w, dtype=torch.float32, device=device)
    rows = torch.arange(bev_h, dtype=torch.float32, device=device)[:, None]  # (H, 1)
    cols = torch.arange(bev_w, dtype=torch.float32, device=device)[None, :]  # (1, W)
    for b, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        if boxes.shape[0] != labels.shape[0]:
            raise ValueError(f"render_centre_heatmaps: sample {b} has {boxes.shape[0]} boxes, {labels.shape[0]} labels")
        if boxes.shape[0] == 0:
            continue
        boxes = boxes.detach().float().to(device)
        col_f, row_f, inside = _centres_in_cells(boxes, bev_h, bev_w, point_cloud_range_m)
        col, row = torch.floor(col_f), torch.floor(row_f)  # (n,) column j along x, row i along y
        if not bool(inside.any()):
            continue
        diameter_cells = torch.maximum(boxes[:, 3] / cell_x, boxes[:, 4] / cell_y)  # (n,) max(w, l) in cells
        sigma = torch.clamp(diameter_cells / 6.0, min=min_sigma_cells)[inside, None, None]  # (m, 1, 1)
        row, col = row[inside, None, None], col[inside, None, None]  # (m, 1, 1) each
        gaussians = torch.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2.0 * sigma ** 2))  # (m, H, W)
        # Per class, the maximum over its boxes (the maps start at 0, so including them changes nothing).
        class_of_box = labels[inside].to(device=device, dtype=torch.int64)[:, None].expand(-1, bev_h * bev_w)  # (m, HW)
        heatmaps[b].view(num_classes, bev_h * bev_w).scatter_reduce_(
            0, class_of_box, gaussians.reshape(-1, bev_h * bev_w), "amax")  # (K, H*W) <- (m, H*W)
    return heatmaps


def heatmap_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of peaks (``targets == 1``, >= 1).

    ``-(1 - p)^alpha log p`` at peaks; ``-(1 - t)^beta p^alpha log(1 - p)`` elsewhere, so cells near a centre are
    penalised less for firing. Log-probabilities come from ``logsigmoid`` (exact at any logit).

    Args:
        logits: (B, K, H, W); targets: same shape, in [0, 1].
    Returns:
        scalar, in the logits' dtype (half promoted to float32).
    """
    if logits.shape != targets.shape:
        raise ValueError(f"heatmap_focal_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = targets.to(logits.dtype)
    prob = torch.sigmoid(logits)
    log_p = nn.functional.logsigmoid(logits)
    log_one_minus_p = nn.functional.logsigmoid(-logits)
    peaks = targets.eq(1.0)
    pos = -((1.0 - prob) ** alpha) * log_p
    neg = -((1.0 - targets) ** beta) * prob ** alpha * log_one_minus_p
    loss = torch.where(peaks, pos, neg).sum()
    return loss / peaks.sum().clamp(min=1).to(loss.dtype)
