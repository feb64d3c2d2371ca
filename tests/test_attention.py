"""BEV encoder attention: plain deformable attention, spatial cross-attention (retrieval geometry and the packed
mosaic against a per-camera brute force), temporal alignment and TSA, and the encoder. Small shapes, CPU."""

import math

import numpy as np
import pytest
import torch

from bevdeform import geometry
from bevdeform.models import attention, bev_grid
from bevdeform.models.attention import (DeformableAttention, SpatialCrossAttention, TemporalSelfAttention,
                                        align_prev_bev, find_visible_pairs)
from bevdeform.models.encoder import BEVEncoder, ego_motion_features, infer_padded_image_hw
from bevdeform.msda import ms_deform_attn

PC_RANGE = (-51.2, -51.2, -3.0, 51.2, 51.2, 5.0)

# The nuScenes rig (nuscenes-format.md): name, optical-axis yaw (deg) in the ego frame, translation (m), focal
# length (px at 1600x900), principal point ~(800, 450).
NUSCENES_RIG = (
    ("CAM_FRONT", 0.0, (1.70, 0.02, 1.51), 1266.0),
    ("CAM_FRONT_RIGHT", -55.0, (1.55, -0.49, 1.50), 1261.0),
    ("CAM_FRONT_LEFT", 55.0, (1.52, 0.49, 1.51), 1273.0),
    ("CAM_BACK", 180.0, (0.03, 0.0, 1.57), 809.0),
    ("CAM_BACK_LEFT", 110.0, (1.04, 0.48, 1.56), 1257.0),
    ("CAM_BACK_RIGHT", -110.0, (1.05, -0.48, 1.56), 1260.0),
)
FRONT, FRONT_LEFT = 0, 2


def nuscenes_ego2img(scale: float, rig_yaw_rad: float = 0.0) -> torch.Tensor:
    """(6, 4, 4) float64 ego2img of the nuScenes rig for 1600x900 images resized by `scale` (half-pixel-centre
    convention); `rig_yaw_rad` turns the whole rig about the ego z axis (a different-looking second sample)."""
    out = []
    for _, yaw_deg, translation, focal in NUSCENES_RIG:
        yaw = math.radians(yaw_deg) + rig_yaw_rad
        # Camera axes (x right, y down, z forward) as ego vectors: the columns of the camera's rotation.
        rotation = np.array([[math.sin(yaw), 0.0, math.cos(yaw)],
                             [-math.cos(yaw), 0.0, math.sin(yaw)],
                             [0.0, -1.0, 0.0]])
        cam2ego = np.eye(4)
        cam2ego[:3, :3] = rotation
        cam2ego[:3, 3] = geometry.yaw_rotation_matrix(np.float64(rig_yaw_rad)) @ np.asarray(translation)
        intrinsics = np.array([[focal * scale, 0.0, (800.0 + 0.5) * scale - 0.5],
                               [0.0, focal * scale, (450.0 + 0.5) * scale - 0.5],
                               [0.0, 0.0, 1.0]])
        out.append(geometry.ego2img_from(intrinsics, cam2ego))
    return torch.from_numpy(np.stack(out))


def set_identity_sampling(module):
    """Zero offsets, uniform weights, identity value/output projections: the attention returns the plain mean of
    the bilinear samples at the reference points."""
    with torch.no_grad():
        module.sampling_offsets.weight.zero_()
        module.sampling_offsets.bias.zero_()
        module.attention_weights.weight.zero_()
        module.attention_weights.bias.zero_()
        for linear in (module.value_proj, module.output_proj):
            linear.weight.copy_(torch.eye(linear.weight.shape[0], dtype=linear.weight.dtype))
            linear.bias.zero_()


def randomise(module, generator, offset_bias_px=0.0):
    """Random parameters (normal, std 0.3), offset biases with std `offset_bias_px` pixels."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3)
        if offset_bias_px:
            bias = module.sampling_offsets.bias
            bias.copy_(torch.randn(bias.shape, generator=generator, dtype=bias.dtype) * offset_bias_px)


# ------------------------------------------------------------------------------------------------ BEV grid

def test_bev_grid_cell_centres_and_pillars():
    xy = bev_grid.bev_cell_centres_xy(4, 5, (0.0, -4.0, -1.0, 10.0, 4.0, 3.0), dtype=torch.float64)
    assert xy.shape == (20, 2)
    # Cell (i=1, j=3) is flat index 1 * 5 + 3: x = 0 + 3.5 * 2, y = -4 + 1.5 * 2.
    assert xy[8].tolist() == [7.0, -1.0]
    uv = bev_grid.bev_xy_to_normalised(xy, (0.0, -4.0, -1.0, 10.0, 4.0, 3.0))
    torch.testing.assert_close(uv, bev_grid.bev_cell_centres_normalised(4, 5, dtype=torch.float64))
    torch.testing.assert_close(bev_grid.bev_normalised_to_xy(uv, (0.0, -4.0, -1.0, 10.0, 4.0, 3.0)), xy)
    pillars = bev_grid.pillar_reference_points(4, 5, (0.0, -4.0, -1.0, 10.0, 4.0, 3.0), 4, dtype=torch.float64)
    assert pillars.shape == (20, 4, 3)
    assert pillars[8, :, 2].tolist() == [-0.5, 0.5, 1.5, 2.5]  # slab centres of the 4 m z range
    with pytest.raises(ValueError, match="x_max"):
        bev_grid.check_point_cloud_range((1.0, 0.0, 0.0, 0.0, 1.0, 1.0))


# ---------------------------------------------------------------------------------------- plain deformable attention

def bilinear_zero_padded(image_hwc: torch.Tensor, x_px: float, y_px: float) -> torch.Tensor:
    """Bilinear sample (C,) of an (H, W, C) map at pixel (x, y), corners outside the map read 0."""
    height, width, _ = image_hwc.shape
    x0, y0 = math.floor(x_px), math.floor(y_px)
    out = torch.zeros(image_hwc.shape[-1], dtype=image_hwc.dtype)
    for cx, wx in ((x0, 1 - (x_px - x0)), (x0 + 1, x_px - x0)):
        for cy, wy in ((y0, 1 - (y_px - y0)), (y0 + 1, y_px - y0)):
            if 0 <= cx < width and 0 <= cy < height:
                out = out + wx * wy * image_hwc[cy, cx]
    return out


def test_deformable_attention_matches_manual_computation():
    generator = torch.Generator().manual_seed(0)
    embed_dims, heads, levels, points = 4, 2, 2, 2
    attention = DeformableAttention(embed_dims, heads, levels, points).double()
    randomise(attention, generator, offset_bias_px=1.5)
    shapes = [(3, 4), (2, 2)]
    spatial_shapes = torch.tensor(shapes)
    level_start_index = torch.tensor([0, 12])
    query = torch.randn(1, 2, embed_dims, generator=generator, dtype=torch.float64)
    query_pos = torch.randn(1, 2, embed_dims, generator=generator, dtype=torch.float64)
    reference = torch.rand(1, 2, 2, generator=generator, dtype=torch.float64)
    value = torch.randn(1, 16, embed_dims, generator=generator, dtype=torch.float64)
    out = attention(query, reference, value, spatial_shapes, level_start_index, query_pos=query_pos)

    with torch.no_grad():
        q = query + query_pos
        projected = attention.value_proj(value)[0]  # (S, C)
        offsets = attention.sampling_offsets(q)[0].view(2, heads, levels, points, 2)
        weights = attention.attention_weights(q)[0].view(2, heads, levels * points).softmax(-1)
        weights = weights.view(2, heads, levels, points)
        expected = torch.zeros(2, embed_dims, dtype=torch.float64)
        head_dims = embed_dims // heads
        for qi in range(2):
            for m in range(heads):
                for level, (h, w) in enumerate(shapes):
                    start = int(level_start_index[level])
                    image = projected[start:start + h * w, m * head_dims:(m + 1) * head_dims].view(h, w, head_dims)
                    for p in range(points):
                        loc_x = reference[0, qi, 0] + offsets[qi, m, level, p, 0] / w
                        loc_y = reference[0, qi, 1] + offsets[qi, m, level, p, 1] / h
                        sample = bilinear_zero_padded(image, float(loc_x * w - 0.5), float(loc_y * h - 0.5))
                        expected[qi, m * head_dims:(m + 1) * head_dims] += weights[qi, m, level, p] * sample
        expected = attention.output_proj(expected)
    torch.testing.assert_close(out[0], expected, rtol=1e-10, atol=1e-10)


def test_deformable_attention_init_and_errors():
    attention = DeformableAttention(16, 4, 1, 3)
    # Circle pattern: head 1 of 4 looks along +y (90 deg), point p at radius p + 1 pixels.
    bias = attention.sampling_offsets.bias.view(4, 1, 3, 2)
    torch.testing.assert_close(bias[1, 0], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]), atol=1e-6, rtol=0)
    assert attention.attention_weights.weight.abs().sum() == 0
    with pytest.raises(ValueError, match="reference_points"):
        attention(torch.zeros(1, 2, 16), torch.zeros(1, 3, 2), torch.zeros(1, 4, 16), torch.tensor([[2, 2]]),
                  torch.tensor([0]))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        DeformableAttention(10, 4, 1, 1)


# ------------------------------------------------------------------------------------------------ SCA geometry

RETRIEVAL_BEV = 20  # 5.12 m cells
RETRIEVAL_SCALE = 0.5  # 800x450 images, padded to 800x480
RETRIEVAL_STRIDE = 16  # features 30 x 50


def retrieval_setup(image_hw_front=(450, 800)):
    """One sample, 6 nuScenes cameras, 1 level of one-hot-per-camera features, an identity-sampling SCA."""
    heads, anchors, points = 2, 4, 8
    channels = 8  # channel k marks camera k
    sca = SpatialCrossAttention(channels, heads, 1, points, 6, anchors).double()
    set_identity_sampling(sca)
    ego2img = nuscenes_ego2img(RETRIEVAL_SCALE)[None]  # (1, 6, 4, 4)
    image_hw = torch.tensor([[450, 800]] * 6)[None]
    image_hw[0, FRONT] = torch.tensor(image_hw_front)
    pillars = bev_grid.pillar_reference_points(RETRIEVAL_BEV, RETRIEVAL_BEV, PC_RANGE, anchors, dtype=torch.float64)
    pairs = find_visible_pairs(pillars, ego2img, image_hw, (480, 800))
    return sca, ego2img, image_hw, pillars, pairs


def feature_pixel(ego2img_cam, point_ego):
    """Feature-map pixel (x, y) (stride RETRIEVAL_STRIDE) where an ego point projects, and its image pixel."""
    uv, depth = geometry.project_points(ego2img_cam, point_ego[None])
    u, v = uv[0].tolist()
    assert depth[0] > 0
    return ((u + 0.5) / RETRIEVAL_STRIDE - 0.5, (v + 0.5) / RETRIEVAL_STRIDE - 0.5), (u, v)


def plant(features, camera, pixel_xy, vector):
    """Write `vector` into the 4 feature pixels around `pixel_xy`, so a bilinear sample there reads it exactly."""
    x0, y0 = math.floor(pixel_xy[0]), math.floor(pixel_xy[1])
    for y in (y0, y0 + 1):
        for x in (x0, x0 + 1):
            features[0, camera, :, y, x] = vector


def find_cell(pillars, ego2img, cameras, margin_px=2.0, anchor=1):
    """A BEV cell whose anchor `anchor` projects into each camera of `cameras` with a margin, >= 2 feature rows from
    the pillar's other anchors, and whose pillar no other camera sees."""
    for cell in range(pillars.shape[0]):
        seen = []
        for camera in range(6):
            uv, depth = geometry.project_points(ego2img[0, camera], pillars[cell])
            inside = ((depth > 1.0) & (uv[:, 0] > -0.5) & (uv[:, 0] < 799.5) & (uv[:, 1] > -0.5)
                      & (uv[:, 1] < 449.5))
            if inside.any():
                seen.append(camera)
            if camera in cameras:
                fx = (uv[anchor, 0] + 0.5) / RETRIEVAL_STRIDE - 0.5
                fy = (uv[anchor, 1] + 0.5) / RETRIEVAL_STRIDE - 0.5
                if not (depth[anchor] > 1 and margin_px <= fx <= 49 - margin_px and margin_px <= fy <= 29 - margin_px):
                    break
                # The other anchors must sample rows disjoint from the planted 2x2 patch.
                other_fy = (uv[:, 1] + 0.5) / RETRIEVAL_STRIDE - 0.5
                if ((other_fy - fy).abs() < 2.0).sum() > 1:
                    break
        else:
            if sorted(seen) == sorted(cameras):
                return cell
    raise AssertionError(f"no BEV cell seen by exactly cameras {cameras}")


def test_sca_retrieves_planted_feature_from_the_camera_that_sees_the_point():
    sca, ego2img, image_hw, pillars, pairs = retrieval_setup()
    cell = find_cell(pillars, ego2img, [FRONT])
    point = pillars[cell, 1]  # the anchor at z = 0 m: a point on the ground ahead
    assert point[0] > 5 and pairs.cameras_per_query[0, cell] == 1
    features = torch.zeros(1, 6, 8, 30, 50, dtype=torch.float64)
    # Every other camera is filled with its own one-hot channel: none of it may reach the cell.
    for camera in range(6):
        if camera != FRONT:
            features[0, camera, camera] = 1.0
    pixel, _ = feature_pixel(ego2img[0, FRONT], point)
    plant(features, FRONT, pixel, torch.eye(8, dtype=torch.float64)[FRONT] * 3.0)
    out = sca(torch.zeros(1, pillars.shape[0], 8, dtype=torch.float64), [features], pairs)
    expected = torch.zeros(8, dtype=torch.float64)
    # 8 points, 2 per anchor, uniform weights: the 2 samples at the planted anchor carry 2/8 of the feature; the
    # other anchors project >= 2 feature pixels away onto zeros.
    expected[FRONT] = 3.0 * 2 / 8
    torch.testing.assert_close(out[0, cell], expected, rtol=1e-9, atol=1e-9)


def test_sca_averages_the_cameras_that_see_a_cell():
    sca, ego2img, image_hw, pillars, pairs = retrieval_setup()
    cell = find_cell(pillars, ego2img, [FRONT, FRONT_LEFT], margin_px=1.0)
    assert pairs.cameras_per_query[0, cell] == 2
    point = pillars[cell, 1]
    features = torch.zeros(1, 6, 8, 30, 50, dtype=torch.float64)
    for camera in (FRONT, FRONT_LEFT):
        pixel, _ = feature_pixel(ego2img[0, camera], point)
        plant(features, camera, pixel, torch.eye(8, dtype=torch.float64)[camera] * 4.0)
    out = sca(torch.zeros(1, pillars.shape[0], 8, dtype=torch.float64), [features], pairs)
    expected = torch.zeros(8, dtype=torch.float64)
    expected[FRONT] = expected[FRONT_LEFT] = 4.0 * (2 / 8) / 2  # each camera's share, averaged over the two
    torch.testing.assert_close(out[0, cell], expected, rtol=1e-9, atol=1e-9)


def test_sca_ignores_projections_into_the_image_padding():
    _, ego2img, _, pillars, _ = retrieval_setup()
    cell = find_cell(pillars, ego2img, [FRONT])
    uv, _ = geometry.project_points(ego2img[0, FRONT], pillars[cell])
    # The front image keeps only the rows above every anchor of the pillar: the anchors land in the padding.
    unpadded_h = int(uv[:, 1].min().item()) - 1
    sca, _, _, _, pairs = retrieval_setup(image_hw_front=(unpadded_h, 800))
    assert pairs.cameras_per_query[0, cell] == 0
    features = torch.zeros(1, 6, 8, 30, 50, dtype=torch.float64)
    features[0, FRONT, FRONT] = 1.0  # the whole front map, padding included, holds a feature
    out = sca(torch.zeros(1, pillars.shape[0], 8, dtype=torch.float64), [features], pairs)
    assert out[0, cell].abs().max() == 0
    # A cell higher in the image is still seen and reads the front camera.
    seen_cells = (pairs.camera_index[0][pairs.valid[0]] == FRONT).sum()
    assert seen_cells > 0


def test_sca_with_no_visible_pair_returns_the_projection_of_zero():
    sca = SpatialCrossAttention(8, 2, 1, 4, 6, 2)
    pillars = bev_grid.pillar_reference_points(4, 4, PC_RANGE, 2)
    # Cameras turned to look straight up (depth along ego +z): no pillar anchor is in front of any of them.
    ego2img = torch.zeros(1, 6, 4, 4)
    ego2img[..., 0, 0] = ego2img[..., 1, 1] = ego2img[..., 3, 3] = 1.0
    ego2img[..., 2, 2] = 1.0
    ego2img[..., 2, 3] = -100.0  # depth = z - 100 < 0 everywhere in the range
    pairs = find_visible_pairs(pillars, ego2img, torch.tensor([[[225, 400]] * 6]), (256, 416))
    assert pairs.query_index.shape == (1, 0)
    query, feats = torch.randn(1, 16, 8), [torch.randn(1, 6, 8, 8, 13)]
    out = sca(query, feats, pairs)
    torch.testing.assert_close(out, sca.output_proj.bias.expand(1, 16, 8))
    # A fixed capacity has only padding slots then, and the general path (no branch on the count) gives the same.
    fixed = find_visible_pairs(pillars, ego2img, torch.tensor([[[225, 400]] * 6]), (256, 416), capacity=5)
    assert fixed.query_index.shape == (1, 5) and not fixed.valid.any() and fixed.num_pairs.tolist() == [0]
    assert torch.equal(sca(query, feats, fixed), out)


def visible_pairs_brute_force(pillars, ego2img, image_hw, padded_hw, depth_eps=1e-5):
    """Per sample, the visible (camera, query) pairs in (camera, query) order and their reference points, written
    the obvious way (one camera and one pillar anchor at a time)."""
    out = []
    for b in range(ego2img.shape[0]):
        cameras, queries, references = [], [], []
        for n in range(ego2img.shape[1]):
            uv, depth = geometry.project_points(ego2img[b, n], pillars.reshape(-1, 3), eps=depth_eps)  # (Q*Z, 2)
            height, width = image_hw[b, n].tolist()
            seen = ((depth > depth_eps) & (uv[:, 0] > -0.5) & (uv[:, 0] < width - 0.5) & (uv[:, 1] > -0.5)
                    & (uv[:, 1] < height - 0.5))
            seen = seen.view(pillars.shape[0], pillars.shape[1]).any(dim=1)  # (Q*Z,) -> (Q,)
            uv = uv.view(pillars.shape[0], pillars.shape[1], 2)  # (Q*Z, 2) -> (Q, Z, 2)
            for q in seen.nonzero()[:, 0].tolist():
                cameras.append(n)
                queries.append(q)
                references.append((uv[q] + 0.5) / torch.tensor([padded_hw[1], padded_hw[0]], dtype=uv.dtype))
        out.append((torch.tensor(cameras, dtype=torch.int64), torch.tensor(queries, dtype=torch.int64),
                    torch.stack(references)))
    return out


def two_rig_samples():
    """Two samples of the nuScenes rig at 400x225 (the second turned, with a smaller image in one camera) and
    pillars of a 20x20 BEV: different visible counts."""
    ego2img = torch.stack([nuscenes_ego2img(0.25), nuscenes_ego2img(0.25, rig_yaw_rad=0.3)])  # (2, 6, 4, 4)
    image_hw = torch.tensor([[[225, 400]] * 6] * 2)
    image_hw[1, 2] = torch.tensor([150, 300])
    pillars = bev_grid.pillar_reference_points(20, 20, PC_RANGE, 4, dtype=torch.float64)
    return pillars, ego2img, image_hw, (256, 416)


def test_fixed_capacity_pairs_are_the_visible_pairs_in_order():
    pillars, ego2img, image_hw, padded_hw = two_rig_samples()
    expected = visible_pairs_brute_force(pillars, ego2img, image_hw, padded_hw)
    counts = [len(cameras) for cameras, _, _ in expected]
    assert counts[0] != counts[1] and 0 < min(counts)
    num_queries, total = pillars.shape[0], 6 * pillars.shape[0]
    dynamic = find_visible_pairs(pillars, ego2img, image_hw, padded_hw)
    assert dynamic.query_index.shape == (2, max(counts))
    for capacity in (None, max(counts), max(counts) + 17, total):
        pairs = find_visible_pairs(pillars, ego2img, image_hw, padded_hw, capacity=capacity)
        assert pairs.query_index.shape[1] == (max(counts) if capacity is None else capacity)
        assert pairs.num_pairs.tolist() == counts
        torch.testing.assert_close(pairs.cameras_per_query, dynamic.cameras_per_query, rtol=0, atol=0)
        for b, (cameras, queries, references) in enumerate(expected):
            # The visible pairs first, in (camera, query) order, then padding slots.
            assert pairs.valid[b].tolist() == [True] * counts[b] + [False] * (pairs.valid.shape[1] - counts[b])
            assert torch.equal(pairs.camera_index[b, :counts[b]], cameras)
            assert torch.equal(pairs.query_index[b, :counts[b]], queries)
            torch.testing.assert_close(pairs.reference_points[b, :counts[b]], references, rtol=0, atol=1e-12)
            assert (pairs.query_index[b, counts[b]:] == num_queries).all()
            assert (pairs.camera_index[b, counts[b]:] == 0).all() and (pairs.reference_points[b, counts[b]:] == 0).all()
        if capacity is not None:
            # Bit for bit the data-dependent list, plus padding slots.
            for name in ("camera_index", "query_index", "valid", "reference_points"):
                assert torch.equal(getattr(pairs, name)[:, :max(counts)], getattr(dynamic, name)), name


def test_too_small_a_pair_capacity_raises_in_eager_mode_and_truncates_in_an_export(monkeypatch):
    pillars, ego2img, image_hw, padded_hw = two_rig_samples()
    dynamic = find_visible_pairs(pillars, ego2img, image_hw, padded_hw)
    counts = dynamic.num_pairs.tolist()
    with pytest.raises(ValueError, match=rf"capacity=100 is smaller .*{counts}.*capacity >= {max(counts)}"):
        find_visible_pairs(pillars, ego2img, image_hw, padded_hw, capacity=100)
    for capacity in (0, 6 * pillars.shape[0] + 1):
        with pytest.raises(ValueError, match=rf"capacity={capacity}, expected None or 1\.\.N\*Q"):
            find_visible_pairs(pillars, ego2img, image_hw, padded_hw, capacity=capacity)
    # While exporting the count cannot be read: the first 100 pairs are kept and num_pairs tells the true count.
    monkeypatch.setattr(attention, "is_tracing_or_exporting", lambda: True)
    short = find_visible_pairs(pillars, ego2img, image_hw, padded_hw, capacity=100)
    assert short.valid.all() and short.num_pairs.tolist() == counts
    for name in ("camera_index", "query_index", "reference_points"):
        assert torch.equal(getattr(short, name), getattr(dynamic, name)[:, :100]), name


def test_visible_pairs_statistics_on_the_nuscenes_rig():
    ego2img = nuscenes_ego2img(0.5)[None]
    image_hw = torch.tensor([[450, 800]] * 6)[None]
    pillars = bev_grid.pillar_reference_points(50, 50, PC_RANGE, 4, dtype=torch.float64)
    pairs = find_visible_pairs(pillars, ego2img, image_hw, (480, 800))
    # The six cameras cover the surround: almost every cell is seen, by 1 or 2 cameras (about 19 % of the pairs).
    assert 0.15 < pairs.visible_fraction() < 0.25
    assert (pairs.cameras_per_query == 0).float().mean() < 0.01
    assert pairs.cameras_per_query.max() <= 3
    assert pairs.valid.all() and pairs.query_index.shape[1] == int(pairs.num_pairs[0])


# ---------------------------------------------------------------------------------------- SCA packed == brute force

def sca_brute_force(sca, query, mlvl_feats, pillars, ego2img, image_hw, padded_hw):
    """SCA written the obvious way: for every (sample, camera) the visible queries attend to that camera's own
    projected feature maps (one op call each, grid_sample zero padding at the camera's borders)."""
    batch, num_queries, channels = query.shape
    heads, levels, points, anchors = sca.num_heads, sca.num_levels, sca.num_points, sca.num_points_in_pillar
    shapes = [tuple(f.shape[-2:]) for f in mlvl_feats]
    spatial_shapes = torch.tensor(shapes)
    areas = [h * w for h, w in shapes]
    level_start_index = torch.tensor([sum(areas[:i]) for i in range(levels)])
    sizes_xy = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype)
    summed = torch.zeros_like(query)
    count = torch.zeros(batch, num_queries, dtype=query.dtype)
    for b in range(batch):
        for camera in range(sca.num_cameras):
            uv, depth = geometry.project_points(ego2img[b, camera], pillars.reshape(-1, 3))
            h_img, w_img = image_hw[b, camera].tolist()
            seen = (depth > 1e-5) & (uv[:, 0] > -0.5) & (uv[:, 0] < w_img - 0.5) & (uv[:, 1] > -0.5) & (
                uv[:, 1] < h_img - 0.5)
            visible = seen.view(num_queries, anchors).any(-1).nonzero()[:, 0]
            if visible.numel() == 0:
                continue
            reference = ((uv + 0.5) / torch.tensor([padded_hw[1], padded_hw[0]], dtype=uv.dtype))
            reference = reference.view(num_queries, anchors, 2)[visible]  # (V, Z, 2)
            q = query[b, visible]  # (V, C)
            offsets = sca.sampling_offsets(q).view(-1, heads, levels, points // anchors, anchors, 2)
            weights = sca.attention_weights(q).view(-1, heads, levels * points).softmax(-1)
            locations = reference[:, None, None, None] + offsets / sizes_xy[None, None, :, None, None]
            value = torch.cat([sca.value_proj(f[b, camera].flatten(1).T) for f in mlvl_feats])  # (S, C)
            out = ms_deform_attn(value.view(1, -1, heads, channels // heads), spatial_shapes, level_start_index,
                                 locations.reshape(1, -1, heads, levels, points, 2),
                                 weights.view(1, -1, heads, levels, points))[0]
            summed = summed.index_add(1, visible, out[None].expand(batch, -1, -1) * (torch.arange(batch) == b)
                                      .to(out.dtype)[:, None, None])
            count[b, visible] += 1
    return sca.output_proj(summed / count.clamp(min=1)[..., None])


def test_sca_packed_mosaic_matches_per_camera_brute_force_with_gradients():
    generator = torch.Generator().manual_seed(3)
    channels, heads, levels, points, anchors = 16, 2, 2, 4, 2
    sca = SpatialCrossAttention(channels, heads, levels, points, 6, anchors).double()
    # Offset biases of several pixels push many samples past the cameras' top and bottom edges, where the mosaic
    # would read a neighbour camera unless the band mask works.
    randomise(sca, generator, offset_bias_px=4.0)
    scale = 0.25  # 400x225 images, padded to 416x256; levels at stride 32 and 64
    ego2img = torch.stack([nuscenes_ego2img(scale), nuscenes_ego2img(scale, rig_yaw_rad=0.4)])  # (2, 6, 4, 4)
    image_hw = torch.tensor([[[225, 400]] * 6, [[150, 400]] * 6])  # sample 1: turned rig, shorter images,
    image_hw[1, 3] = torch.tensor([1, 1])  # and a blind back camera, so some cells are seen by none
    padded_hw = (256, 416)
    pillars = bev_grid.pillar_reference_points(8, 8, PC_RANGE, anchors, dtype=torch.float64)
    pairs = find_visible_pairs(pillars, ego2img, image_hw, padded_hw)
    assert pairs.num_pairs[0] != pairs.num_pairs[1] and not pairs.valid.all()  # one sample is padded
    assert (pairs.cameras_per_query == 0).any() and (pairs.cameras_per_query >= 2).any()

    query = torch.randn(2, 64, channels, generator=generator, dtype=torch.float64, requires_grad=True)
    feats = [torch.randn(2, 6, channels, 8, 13, generator=generator, dtype=torch.float64, requires_grad=True),
             torch.randn(2, 6, channels, 4, 7, generator=generator, dtype=torch.float64, requires_grad=True)]
    grad_out = torch.randn(2, 64, channels, generator=generator, dtype=torch.float64)

    def run(fn):
        sca.zero_grad()
        for tensor in [query] + feats:
            tensor.grad = None
        out = fn()
        out.backward(grad_out)
        grads = [query.grad.clone()] + [f.grad.clone() for f in feats]
        grads += [p.grad.clone() for p in sca.parameters()]
        return out.detach(), grads

    packed, packed_grads = run(lambda: sca(query, feats, pairs))
    brute, brute_grads = run(lambda: sca_brute_force(sca, query, feats, pillars, ego2img, image_hw, padded_hw))
    torch.testing.assert_close(packed, brute, rtol=1e-10, atol=1e-10)
    names = ["query", "feats0", "feats1"] + [n for n, _ in sca.named_parameters()]
    for name, got, want in zip(names, packed_grads, brute_grads):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


# ------------------------------------------------------------------------------------------------ temporal alignment

def pose(x, y, yaw):
    """ego2global (4, 4) float64 of a car at (x, y) heading yaw (rad)."""
    out = np.eye(4)
    out[:3, :3] = geometry.yaw_rotation_matrix(np.float64(yaw))
    out[:2, 3] = (x, y)
    return out


@pytest.mark.parametrize("bev_size", [50, 200])
@pytest.mark.parametrize("turn_deg", [0.0, 25.0, -25.0])
def test_aligned_previous_bev_puts_a_world_point_in_its_current_cell(bev_size, turn_deg):
    # A car at (300, 600) heading 40 deg drives half a second along an arc (8 m chord) and turns by turn_deg.
    yaw_prev = math.radians(40.0)
    turn = math.radians(turn_deg)
    chord_yaw = yaw_prev + turn / 2  # the chord of a circular arc points half-way through the turn
    ego2global_prev = pose(300.0, 600.0, yaw_prev)
    ego2global_curr = pose(300.0 + 8 * math.cos(chord_yaw), 600.0 + 8 * math.sin(chord_yaw), yaw_prev + turn)
    ego_prev2curr = torch.from_numpy(geometry.ego_prev2curr_from(ego2global_prev, ego2global_curr))[None].float()
    translation_prev, yaw_change = geometry.planar_ego_motion(ego_prev2curr)
    assert math.isclose(float(yaw_change), turn, abs_tol=1e-6)
    # Forward, and ending on the side of the turn (left = +y of the previous frame).
    lateral = float(translation_prev[0, 1])
    assert float(translation_prev[0, 0]) > 7.5 and (lateral > 0.5 if turn > 0 else lateral < -0.5 if turn < 0
                                                    else abs(lateral) < 1e-5)

    # Points well off the grid centre, so a rotation about the wrong centre would move them by several cells.
    for point_prev in ([30.0, 20.0], [-25.0, -35.0], [10.0, 40.0]):
        cell_size = 102.4 / bev_size
        j_prev = int((point_prev[0] + 51.2) / cell_size)
        i_prev = int((point_prev[1] + 51.2) / cell_size)
        centre_prev = torch.tensor([-51.2 + (j_prev + 0.5) * cell_size, -51.2 + (i_prev + 0.5) * cell_size])
        prev_bev = torch.zeros(1, bev_size * bev_size, 3)
        prev_bev[0, i_prev * bev_size + j_prev] = torch.tensor([1.0, 2.0, 3.0])

        aligned = align_prev_bev(prev_bev, ego_prev2curr, bev_size, bev_size, PC_RANGE)
        # Where the world point is now: transform prev -> global -> curr with the poses (independent of the op).
        point_global = ego2global_prev @ np.array([*centre_prev.tolist(), 0.0, 1.0])
        point_curr = np.linalg.inv(ego2global_curr) @ point_global
        j_curr = int((point_curr[0] + 51.2) / cell_size)
        i_curr = int((point_curr[1] + 51.2) / cell_size)
        peak = int(aligned[0, :, 0].argmax())
        i_peak, j_peak = divmod(peak, bev_size)
        assert abs(i_peak - i_curr) <= 1 and abs(j_peak - j_curr) <= 1, (point_prev, (i_peak, j_peak), (i_curr, j_curr))
        assert aligned[0, peak, 0] > 0.25  # the feature travelled, not merely a faint edge of it
        torch.testing.assert_close(aligned[0, peak], aligned[0, peak, 0] * torch.tensor([1.0, 2.0, 3.0]))


def test_align_identity_motion_is_exact_and_outside_is_zero():
    prev_bev = torch.randn(2, 6 * 4, 5)
    identity = torch.eye(4).expand(2, 4, 4)
    torch.testing.assert_close(align_prev_bev(prev_bev, identity, 6, 4, PC_RANGE), prev_bev)
    # Driving 200 m forward leaves nothing of the previous grid in view.
    far = torch.eye(4).repeat(2, 1, 1)
    far[:, 0, 3] = -200.0
    assert align_prev_bev(prev_bev, far, 6, 4, PC_RANGE).abs().max() == 0


# ------------------------------------------------------------------------------------------------ TSA

def test_tsa_batch_of_two_equals_two_batches_and_has_prev_false_ignores_history():
    generator = torch.Generator().manual_seed(5)
    tsa = TemporalSelfAttention(16, 2, 3, 6, 7).double()
    randomise(tsa, generator, offset_bias_px=1.0)
    query = torch.randn(2, 42, 16, generator=generator, dtype=torch.float64)
    query_pos = torch.randn(1, 42, 16, generator=generator, dtype=torch.float64)
    prev = torch.randn(2, 42, 16, generator=generator, dtype=torch.float64)
    has_prev = torch.tensor([True, False])
    out = tsa(query, query_pos, prev, has_prev)
    for b in range(2):
        single = tsa(query[b:b + 1], query_pos, prev[b:b + 1], has_prev[b:b + 1])
        torch.testing.assert_close(out[b:b + 1], single, rtol=1e-12, atol=1e-12)
    # Row 1 has no history: the same as no previous BEV at all, and blind to whatever prev_bev holds.
    torch.testing.assert_close(out[1:], tsa(query[1:], query_pos, None, None), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1:], tsa(query, query_pos, prev * 5 + 1, has_prev)[1:], rtol=1e-12, atol=1e-12)
    # Row 0 does use it.
    assert (out[0] - tsa(query, query_pos, prev * 5 + 1, has_prev)[0]).abs().max() > 1e-3


def test_tsa_identity_sampling_averages_the_aligned_history_and_the_query_cell_by_cell():
    tsa = TemporalSelfAttention(8, 2, 4, 5, 6).double()
    set_identity_sampling(tsa)
    query = torch.randn(1, 30, 8, dtype=torch.float64)
    prev = torch.randn(1, 30, 8, dtype=torch.float64)
    out = tsa(query, torch.randn(1, 30, 8, dtype=torch.float64), prev, torch.tensor([True]))
    # The circle-pattern offsets are zeroed: every point samples its own cell centre exactly.
    torch.testing.assert_close(out, (query + prev) / 2, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ encoder

def tiny_encoder_inputs(generator, batch):
    scale = 0.25  # 400x225 images padded to 416x256, one level at stride 32: 8 x 13
    ego2img = torch.stack([nuscenes_ego2img(scale, rig_yaw_rad=0.3 * b) for b in range(batch)]).float()
    image_hw = torch.tensor([[[225, 400]] * 6] * batch)
    feats = [torch.randn(batch, 6, 32, 8, 13, generator=generator)]
    prev_bev = torch.randn(batch, 12 * 12, 32, generator=generator)
    ego_prev2curr = torch.from_numpy(np.stack([
        geometry.ego_prev2curr_from(pose(0, 0, 0.1 * b), pose(5, 1, 0.1 * b + 0.2)) for b in range(batch)])).float()
    has_prev = torch.tensor([True, False, True][:batch])
    return feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev


def make_tiny_encoder():
    return BEVEncoder(32, 2, 12, 12, PC_RANGE, num_cameras=6, num_feature_levels=1, num_heads=4, ffn_dims=64)


def test_encoder_batch_of_two_equals_two_batches_of_one():
    torch.manual_seed(0)
    encoder = make_tiny_encoder().eval()
    inputs = tiny_encoder_inputs(torch.Generator().manual_seed(1), 2)
    feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev = inputs
    with torch.no_grad():
        out = encoder(feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev)
        assert out.shape == (2, 144, 32) and torch.isfinite(out).all()
        for b in range(2):
            single = encoder([f[b:b + 1] for f in feats], ego2img[b:b + 1], image_hw[b:b + 1], prev_bev[b:b + 1],
                             ego_prev2curr[b:b + 1], has_prev[b:b + 1])
            torch.testing.assert_close(out[b:b + 1], single, rtol=1e-4, atol=1e-4)
        without_history = encoder(feats, ego2img, image_hw, None, ego_prev2curr, has_prev)
        # Row 1 has has_prev False: prev_bev None changes nothing for it; row 0 uses its history.
        torch.testing.assert_close(without_history[1], out[1], rtol=1e-5, atol=1e-5)
        assert (without_history[0] - out[0]).abs().max() > 1e-3


def test_encoder_with_fixed_capacity_pairs_equals_the_data_dependent_path():
    torch.manual_seed(0)
    encoder = make_tiny_encoder().eval()
    feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev = tiny_encoder_inputs(
        torch.Generator().manual_seed(3), 2)
    image_hw[1, 0] = torch.tensor([150, 300])  # a smaller image in one camera: the samples' counts differ
    padded_hw = (256, 416)
    with torch.no_grad():
        expected = encoder(feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev, padded_hw)
        counts = encoder.visible_pairs(ego2img, image_hw, padded_hw).num_pairs.tolist()
        assert counts[0] != counts[1]
        for capacity in (max(counts), max(counts) + 50, 6 * 12 * 12):
            pairs = encoder.visible_pairs(ego2img, image_hw, padded_hw, capacity=capacity)
            got = encoder(feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev, padded_hw, pairs=pairs)
            assert torch.equal(got, expected), capacity


def test_encoder_gradients_reach_queries_embeddings_and_image_features():
    torch.manual_seed(0)
    encoder = make_tiny_encoder().train()
    # At the reference init the offset and weight predictors are zero, so the positional embedding (which only
    # feeds them) would get its first gradient after one optimiser step; give them a step's worth of weights.
    with torch.no_grad():
        encoder.layers[0].temporal_attention.attention_weights.weight.normal_(0.0, 0.01)
    inputs = tiny_encoder_inputs(torch.Generator().manual_seed(2), 2)
    feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev = inputs
    feats = [f.requires_grad_() for f in feats]
    out = encoder(feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev, padded_image_hw=(256, 416))
    (out * torch.randn_like(out)).sum().backward()
    assert feats[0].grad.abs().sum() > 0
    for name in ("bev_queries.weight", "row_embed", "col_embed", "camera_embeds", "level_embeds",
                 "ego_motion_mlp.0.weight", "layers.0.spatial_attention.sampling_offsets.weight",
                 "layers.0.temporal_attention.sampling_offsets.weight", "layers.1.ffn.3.weight"):
        grad = dict(encoder.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_encoder_helpers():
    assert infer_padded_image_hw((15, 25), torch.tensor([[[450, 800]]])) == (480, 800)
    assert infer_padded_image_hw((116, 200), torch.tensor([[[900, 1600]]])) == (928, 1600)
    with pytest.raises(ValueError, match="padded_image_hw"):
        infer_padded_image_hw((10, 25), torch.tensor([[[450, 800]]]))
    # Driving 5 m forward while turning left by 0.2 rad: the current origin at (5, 1) of the previous frame.
    motion = torch.from_numpy(geometry.ego_prev2curr_from(pose(0, 0, 0.0), pose(5, 1, 0.2)))[None]
    features = ego_motion_features(motion, torch.tensor([True]))
    torch.testing.assert_close(features[0], torch.tensor([5.0, 1.0, 0.0, math.sin(0.2), math.cos(0.2), 1.0],
                                                         dtype=torch.float64))
    encoder = make_tiny_encoder()
    with pytest.raises(ValueError, match="image_hw"):
        feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev = tiny_encoder_inputs(torch.Generator(), 1)
        encoder(feats, ego2img, image_hw[:, :5], prev_bev, ego_prev2curr, has_prev)
