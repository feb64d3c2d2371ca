"""The BEV grid: cell centres, normalised <-> metric coordinates, pillar reference points. Small pure functions.

Convention (docs/model.md is the contract), all in the current ego frame (x forward, y left, z up, metres):
- ``point_cloud_range_m = (x_min, y_min, z_min, x_max, y_max, z_max)``.
- A BEV map is ``(B, bev_h * bev_w, C)``, flattened row-major over ``(i, j)``: row i runs along ego y, column j
  along ego x. Cell ``(i, j)`` has centre ``x = x_min + (j + 0.5) * (x_max - x_min) / bev_w``,
  ``y = y_min + (i + 0.5) * (y_max - y_min) / bev_h``. As an image ``(B, C, bev_h, bev_w)`` x grows to the right
  and y grows downwards.
- Normalised BEV coordinates ``(u, v) = ((x - x_min) / (x_max - x_min), (y - y_min) / (y_max - y_min))``: the MSDA
  op's locations on a BEV value map of spatial shape ``(bev_h, bev_w)``; cell centres sit at
  ``((j + 0.5) / bev_w, (i + 0.5) / bev_h)``, which the op samples exactly at pixel ``(j, i)``.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "check_point_cloud_range",
    "bev_cell_centres_xy",
    "bev_cell_centres_normalised",
    "bev_xy_to_normalised",
    "bev_normalised_to_xy",
    "pillar_heights_m",
    "pillar_reference_points",
    "official_pillar_heights_m",
    "PILLAR_HEIGHT_MODES",
]


def check_point_cloud_range(point_cloud_range_m: Sequence[float]) -> tuple[float, ...]:
    """The range as a tuple of 6 floats; ValueError unless it is (x_min, y_min, z_min, x_max, y_max, z_max) with
    every max above its min."""
    values = tuple(float(v) for v in point_cloud_range_m)
    if len(values) != 6:
        raise ValueError(
            f"point_cloud_range_m must hold 6 numbers (x_min, y_min, z_min, x_max, y_max, z_max), got {values}")
    for axis, (low, high) in zip("xyz", zip(values[:3], values[3:])):
        if not high > low:
            raise ValueError(f"point_cloud_range_m: {axis}_max = {high} must exceed {axis}_min = {low}")
    return values


def _check_grid(bev_h: int, bev_w: int) -> None:
    if int(bev_h) <= 0 or int(bev_w) <= 0:
        raise ValueError(f"bev_h, bev_w must be positive cell counts, got ({bev_h}, {bev_w})")


def bev_cell_centres_normalised(bev_h: int, bev_w: int, device=None,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised (u, v) of every cell centre, (bev_h * bev_w, 2), row-major over (i, j): ``((j+0.5)/W, (i+0.5)/H)``."""
    _check_grid(bev_h, bev_w)
    v = (torch.arange(bev_h, device=device, dtype=dtype) + 0.5) / bev_h  # (H,)
    u = (torch.arange(bev_w, device=device, dtype=dtype) + 0.5) / bev_w  # (W,)
    grid_v, grid_u = torch.meshgrid(v, u, indexing="ij")  # (H, W) each
    return torch.stack([grid_u, grid_v], dim=-1).reshape(bev_h * bev_w, 2)  # (H, W, 2) -> (H*W, 2)


def bev_normalised_to_xy(uv: torch.Tensor, point_cloud_range_m: Sequence[float]) -> torch.Tensor:
    """Metric ego (x, y) (..., 2), metres, from normalised BEV (u, v) (..., 2)."""
    x_min, y_min, _, x_max, y_max, _ = check_point_cloud_range(point_cloud_range_m)
    low = uv.new_tensor([x_min, y_min])
    size = uv.new_tensor([x_max - x_min, y_max - y_min])
    return uv * size + low


def bev_xy_to_normalised(xy: torch.Tensor, point_cloud_range_m: Sequence[float]) -> torch.Tensor:
    """Normalised BEV (u, v) (..., 2) from metric ego (x, y) (..., 2), metres. Outside the range gives u, v
    outside [0, 1] (not clamped: the sampler reads zeros there)."""
    x_min, y_min, _, x_max, y_max, _ = check_point_cloud_range(point_cloud_range_m)
    low = xy.new_tensor([x_min, y_min])
    size = xy.new_tensor([x_max - x_min, y_max - y_min])
    return (xy - low) / size


def bev_cell_centres_xy(bev_h: int, bev_w: int, point_cloud_range_m: Sequence[float], device=None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Metric ego (x, y) of every cell centre, (bev_h * bev_w, 2), metres, row-major over (i, j)."""
    uv = bev_cell_centres_normalised(bev_h, bev_w, device=device, dtype=dtype)
    return bev_normalised_to_xy(uv, point_cloud_range_m)


def pillar_heights_m(num_points_in_pillar: int, point_cloud_range_m: Sequence[float], device=None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Heights (Z,) metres of the pillar anchors: ``z_min + linspace(0.5, Z - 0.5, Z) / Z * (z_max - z_min)``,
    i.e. the centres of Z equal slabs of the z range (BEVFormer's anchors)."""
    if int(num_points_in_pillar) <= 0:
        raise ValueError(f"num_points_in_pillar must be positive, got {num_points_in_pillar}")
    _, _, z_min, _, _, z_max = check_point_cloud_range(point_cloud_range_m)
    z = num_points_in_pillar
    fractions = torch.linspace(0.5, z - 0.5, z, device=device, dtype=dtype) / z
    return z_min + fractions * (z_max - z_min)


PILLAR_HEIGHT_MODES = ("slab_centres", "official_linspace")


def official_pillar_heights_m(num_points_in_pillar: int, point_cloud_range_m: Sequence[float], device=None,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """BEVFormer's released anchors (encoder.py ``get_reference_points(dim='3d')``), (Z,) metres:
    ``z_min + linspace(0.5, D - 0.5, Z) / D * D`` with D = z_max - z_min in METRES (not the anchor count): Z heights
    from half a metre above the bottom to half a metre below the top, evenly spaced. For the official lidar range
    (-5, 3) and Z = 4: -4.5, -2.1667, 0.1667, 2.5 m (slab centres would be -4, -2, 0, 2)."""
    if int(num_points_in_pillar) <= 0:
        raise ValueError(f"num_points_in_pillar must be positive, got {num_points_in_pillar}")
    _, _, z_min, _, _, z_max = check_point_cloud_range(point_cloud_range_m)
    depth_m = z_max - z_min
    fractions = torch.linspace(0.5, depth_m - 0.5, int(num_points_in_pillar), device=device, dtype=dtype) / depth_m
    return z_min + fractions * depth_m


def pillar_reference_points(bev_h: int, bev_w: int, point_cloud_range_m: Sequence[float], num_points_in_pillar: int,
                            device=None, dtype: torch.dtype = torch.float32,
                            heights: str = "slab_centres") -> torch.Tensor:
    """3D anchors of every BEV pillar, (bev_h * bev_w, Z, 3), metres, ego frame: each cell centre's (x, y) at the
    Z heights of `pillar_heights_m` (``heights='slab_centres'``, the default) or `official_pillar_heights_m`
    (``'official_linspace'``, the bevformer_v1 compatibility path), lowest first."""
    if heights not in PILLAR_HEIGHT_MODES:
        raise ValueError(f"pillar_reference_points: heights={heights!r}, expected one of {PILLAR_HEIGHT_MODES}")
    xy = bev_cell_centres_xy(bev_h, bev_w, point_cloud_range_m, device=device, dtype=dtype)  # (Q, 2)
    height_fn = pillar_heights_m if heights == "slab_centres" else official_pillar_heights_m
    z = height_fn(num_points_in_pillar, point_cloud_range_m, device=device, dtype=dtype)  # (Z,)
    num_cells, num_heights = xy.shape[0], z.shape[0]
    xy = xy[:, None, :].expand(num_cells, num_heights, 2)  # (Q, 2) -> (Q, Z, 2)
    z = z[None, :, None].expand(num_cells, num_heights, 1)  # (Z,) -> (Q, Z, 1)
    return torch.cat([xy, z], dim=-1)  # (Q, Z, 3)
