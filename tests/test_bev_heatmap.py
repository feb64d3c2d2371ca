"""The auxiliary BEV heads: centre heatmaps (target frames, the loss against a float64 brute force, the BEV layout)
and the dense box regression at the centre cells (targets by hand, the cell it reads, that it learns)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevdeform.models.bev_grid import bev_cell_centres_xy
from bevdeform.models.bev_heatmap import (BEVBoxRegressionHead, BEVHeatmapHead, centre_cell_box_targets,
                                         heatmap_focal_loss, render_centre_heatmaps)

RANGE_M = (-32.0, -32.0, -3.0, 32.0, 32.0, 5.0)


def box(x, y, w=1.8, l=4.5):
    return [x, y, 0.0, w, l, 1.6, 0.3, 0.0, 0.0]


def test_peak_sits_in_the_cell_holding_the_centre_row_along_y_column_along_x():
    # 32 x 32 cells of 2 m over +-32 m: x = 10.5 m -> column (10.5 + 32) // 2 = 21; y = -4.5 m -> row 13.
    heatmaps = render_centre_heatmaps([torch.tensor([box(10.5, -4.5)])], [torch.tensor([3])], num_classes=10,
                                      bev_h=32, bev_w=32, point_cloud_range_m=RANGE_M)
    assert heatmaps.shape == (1, 10, 32, 32)
    assert heatmaps[0, 3, 13, 21] == 1.0
    assert (heatmaps == 1.0).sum() == 1
    assert heatmaps[0, [k for k in range(10) if k != 3]].abs().sum() == 0  # other classes' maps stay empty
    # The Gaussian falls off symmetrically around the peak, along both axes.
    assert heatmaps[0, 3, 12, 21] == pytest.approx(heatmaps[0, 3, 14, 21].item())
    assert heatmaps[0, 3, 13, 20] == pytest.approx(heatmaps[0, 3, 13, 22].item())
    assert 0.0 < heatmaps[0, 3, 13, 22] < 1.0


def test_peaks_match_the_nearest_cell_centre_of_the_grid_for_random_boxes_on_a_non_square_grid():
    rng = np.random.default_rng(0)
    bev_h, bev_w = 12, 20  # rows along y, columns along x; not square so a transposition cannot pass
    xy = rng.uniform(-31.9, 31.9, size=(25, 2))
    boxes = torch.tensor([box(x, y, w=0.5, l=0.5) for x, y in xy], dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 10, size=25))
    heatmaps = render_centre_heatmaps([boxes], [labels], 10, bev_h, bev_w, RANGE_M)
    centres = bev_cell_centres_xy(bev_h, bev_w, RANGE_M).double().numpy()  # (H*W, 2), row-major over (i, j)
    for (x, y), k in zip(xy, labels.tolist()):
        nearest = int(np.argmin(((centres - [x, y]) ** 2).sum(axis=1)))
        i, j = divmod(nearest, bev_w)
        assert heatmaps[0, k, i, j] == 1.0, (x, y, i, j)
    assert int((heatmaps == 1.0).sum()) <= 25


def test_boxes_outside_the_range_add_nothing_and_empty_samples_give_zero_maps():
    boxes = torch.tensor([box(40.0, 0.0), box(0.0, -33.0)])
    heatmaps = render_centre_heatmaps([boxes, torch.zeros(0, 9)], [torch.tensor([0, 1]), torch.zeros(0, dtype=torch.int64)],
                                      10, 32, 32, RANGE_M)
    assert heatmaps.abs().sum() == 0


def test_big_objects_spread_wider_than_small_ones():
    small = render_centre_heatmaps([torch.tensor([box(0.5, 0.5, w=0.4, l=0.4)])], [torch.tensor([9])], 10, 32, 32, RANGE_M)
    big = render_centre_heatmaps([torch.tensor([box(0.5, 0.5, w=2.9, l=12.0)])], [torch.tensor([3])], 10, 32, 32, RANGE_M)
    # Sums ~ 2 pi sigma^2: sigma 1 cell (big) against the 0.75-cell floor (small).
    assert big[0, 3].sum().item() == pytest.approx(2 * math.pi * 1.0, rel=1e-3)
    assert small[0, 9].sum().item() == pytest.approx(2 * math.pi * 0.75 ** 2, rel=2e-2)
    # sigma of the big one: max(w, l) = 12 m = 6 cells -> sigma 1 cell; one cell away exp(-1/2).
    assert big[0, 3, 16, 17].item() == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_focal_loss_matches_a_float64_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 7, dtype=torch.float64) * 3
    targets = torch.rand(2, 3, 5, 7, dtype=torch.float64) * 0.9
    targets[0, 1, 2, 3] = 1.0
    targets[1, 2, 4, 6] = 1.0
    expected = 0.0
    for value, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1.0 / (1.0 + math.exp(-value))
        expected += -((1 - p) ** 2) * math.log(p) if t == 1.0 else -((1 - t) ** 4) * p ** 2 * math.log(1 - p)
    assert heatmap_focal_loss(logits, targets).item() == pytest.approx(expected / 2, rel=1e-9)


def test_focal_loss_is_near_zero_for_a_confident_right_answer_and_large_for_a_transposed_one():
    targets = render_centre_heatmaps([torch.tensor([box(10.5, -20.5), box(-7.0, 3.0)])], [torch.tensor([0, 8])], 10,
                                     32, 32, RANGE_M)
    right = torch.where(targets == 1.0, torch.tensor(20.0), torch.tensor(-20.0))
    transposed = right.transpose(-1, -2)
    assert heatmap_focal_loss(right, targets).item() < 1e-6
    assert heatmap_focal_loss(transposed, targets).item() > 10.0


def test_head_reads_the_bev_map_row_major_with_rows_along_y():
    bev_h, bev_w, channels = 4, 6, 8
    head = BEVHeatmapHead(channels, 10, bev_h, bev_w, RANGE_M)
    bev = torch.randn(2, bev_h * bev_w, channels)
    seen = {}
    head.hidden[0].register_forward_hook(lambda module, args, out: seen.update(image=args[0]))
    logits = head(bev)
    assert logits.shape == (2, 10, bev_h, bev_w)
    for i, j in ((0, 5), (3, 1), (2, 2)):
        torch.testing.assert_close(seen["image"][1, :, i, j], bev[1, i * bev_w + j])
    with pytest.raises(ValueError, match="bev must be"):
        head(torch.randn(2, bev_w * bev_h, channels + 1))


def test_head_loss_trains_the_head_to_find_an_object():
    torch.manual_seed(0)
    head = BEVHeatmapHead(16, 10, 16, 16, RANGE_M, weight=2.0)
    cell = torch.randn(16)
    bev = torch.zeros(1, 256, 16)
    bev[0, 5 * 16 + 11] = cell  # a distinctive feature at row 5, column 11 (x = -32 + 11.5 * 4 m, y = -32 + 5.5 * 4 m)
    gt = [torch.tensor([box(-32 + 11.5 * 4, -32 + 5.5 * 4)])]
    labels = [torch.tensor([2])]
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = head.loss(bev, gt, labels)
        first = loss.item() if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.2 * first
    with torch.no_grad():
        prob = head(bev).sigmoid()[0, 2]  # (16, 16)
    assert divmod(int(prob.argmax()), 16) == (5, 11)


# ----------------------------------------------------------------------------------------------------------------
# Dense box regression at the centre cells (model.loss.bev_box_weight)
# ----------------------------------------------------------------------------------------------------------------
def test_box_targets_by_hand_on_a_non_square_grid():
    # 8 rows (along y, 8 m cells) x 16 columns (along x, 4 m cells) over +-32 m.
    boxes = torch.tensor([
        [10.5, -4.5, 0.7, 1.8, 4.5, 1.6, 0.3, 7.0, -2.0],   # column (10.5 + 32) / 4 = 10.625, row 27.5 / 8 = 3.4375
        [-31.0, 31.0, -0.2, 0.6, 0.8, 1.7, -2.5, 0.0, 1.0],  # column 0.25, row 7.875
        [40.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0],     # outside the grid: dropped
    ])
    cells, targets = centre_cell_box_targets(boxes, bev_h=8, bev_w=16, point_cloud_range_m=RANGE_M,
                                             velocity_scale_mps=10.0)
    assert cells.tolist() == [3 * 16 + 10, 7 * 16 + 0]
    expected = torch.tensor([
        [0.125, -0.0625, math.log(1.8), math.log(4.5), 0.7, math.log(1.6), math.sin(0.3), math.cos(0.3), 0.7, -0.2],
        [-0.25, 0.375, math.log(0.6), math.log(0.8), -0.2, math.log(1.7), math.sin(-2.5), math.cos(-2.5), 0.0, 0.1],
    ])
    torch.testing.assert_close(targets, expected)


def test_box_loss_reads_the_centre_cell_and_is_zero_only_for_the_right_codes():
    torch.manual_seed(0)
    bev_h, bev_w, channels = 6, 10, 8
    head = BEVBoxRegressionHead(channels, bev_h, bev_w, RANGE_M, weight=0.5, velocity_scale_mps=10.0)
    boxes = [torch.tensor([[5.0, -13.0, 0.5, 1.8, 4.5, 1.6, 2.0, 6.0, -3.0]]), torch.zeros(0, 9)]
    cells, targets = centre_cell_box_targets(boxes[0], bev_h, bev_w, RANGE_M, 10.0)
    codes = torch.randn(2, 10, bev_h, bev_w)
    codes.view(2, 10, -1)[0, :, cells[0]] = targets[0]
    head.forward = lambda bev: codes  # the loss must read exactly that cell of sample 0
    assert head.loss(torch.zeros(2, bev_h * bev_w, channels), boxes).item() == pytest.approx(0.0, abs=1e-6)
    transposed = codes.view(2, 10, bev_h, bev_w).clone()
    row, col = divmod(int(cells[0]), bev_w)
    transposed[0, :, row, col] = 0.0
    transposed[0, :, col % bev_h, row % bev_w] = targets[0]
    head.forward = lambda bev: transposed
    wrong = head.loss(torch.zeros(2, bev_h * bev_w, channels), boxes).item()
    assert wrong == pytest.approx(0.5 * targets[0].abs().sum().item(), rel=1e-5)


def test_box_head_learns_a_planted_objects_velocity_and_heading():
    torch.manual_seed(0)
    head = BEVBoxRegressionHead(16, 16, 16, RANGE_M, weight=1.0, velocity_scale_mps=10.0)
    bev = torch.zeros(2, 256, 16)
    bev[0, 5 * 16 + 11] = torch.randn(16)  # a distinctive feature at row 5, column 11
    bev[1, 9 * 16 + 2] = torch.randn(16)
    gt = [torch.tensor([[-32 + 11.5 * 4, -32 + 5.5 * 4, 0.5, 1.8, 4.5, 1.6, 2.5, 8.0, -4.0]]),
          torch.tensor([[-32 + 2.3 * 4, -32 + 9.5 * 4, 0.2, 0.7, 0.8, 1.7, -1.0, -1.0, 1.5]])]
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, 300)
    for _ in range(300):
        loss = head.loss(bev, gt)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        codes = head(bev)
    for b, (row, col) in enumerate(((5, 11), (9, 2))):
        velocity = 10.0 * codes[b, 8:10, row, col]
        yaw = torch.atan2(codes[b, 6, row, col], codes[b, 7, row, col])
        torch.testing.assert_close(velocity, gt[b][0, 7:9], atol=0.3, rtol=0.0)
        assert abs(float(yaw) - float(gt[b][0, 6])) < 0.1
    with pytest.raises(ValueError, match="bev must be"):
        head(torch.zeros(2, 255, 16))
    with pytest.raises(ValueError, match="velocity_scale_mps"):
        BEVBoxRegressionHead(16, 16, 16, RANGE_M, velocity_scale_mps=0.0)
