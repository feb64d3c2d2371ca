"""Tests of bevdeform.models.head: box coder, matcher, focal loss, DetectionLoss, decoding."""

import itertools
import math

import pytest
import torch

from bevdeform.models.head import (
    ClassificationBranch,
    DetectionLoss,
    HungarianMatcher,
    RegressionBranch,
    decode_box_codes,
    decode_predictions,
    encode_boxes,
    focal_loss,
)

C = 10


def random_boxes(n, generator, dtype=torch.float64, yaw_span=math.pi):
    """(n, 9) boxes with centres within +-40 m, sizes 0.3-12 m, yaw in [-yaw_span, yaw_span), velocities +-10 m/s."""
    centre = (torch.rand(n, 3, generator=generator, dtype=dtype) - 0.5) * torch.tensor([80.0, 80.0, 4.0], dtype=dtype)
    size = 0.3 + torch.rand(n, 3, generator=generator, dtype=dtype) * 11.7
    yaw = (torch.rand(n, 1, generator=generator, dtype=dtype) * 2.0 - 1.0) * yaw_span
    velocity = (torch.rand(n, 2, generator=generator, dtype=dtype) - 0.5) * 20.0
    return torch.cat([centre, size, yaw, velocity], dim=1)  # (n, 3+3+1+2) = (n, 9)


def wrap_angle(angle):
    return torch.remainder(angle + math.pi, 2.0 * math.pi) - math.pi


def perfect_predictions(gt_boxes, gt_labels, num_queries, num_layers=1, logit=20.0):
    """Predictions that the matcher must match to the GT at queries 0..n-1, with ~zero loss."""
    batch = len(gt_boxes)
    logits = torch.full((num_layers, batch, num_queries, C), -logit, dtype=torch.float64)
    codes = torch.zeros(num_layers, batch, num_queries, 10, dtype=torch.float64)
    codes[..., 7] = 1.0  # unmatched queries: unit-size boxes at the origin, yaw 0
    for b, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        n = boxes.shape[0]
        logits[:, b, torch.arange(n), labels] = logit
        codes[:, b, :n] = encode_boxes(boxes)
    return logits, codes


# ------------------------------------------------------------------------------------------------------------------
# Box coder
# ------------------------------------------------------------------------------------------------------------------
def test_encode_layout_on_a_known_box():
    box = torch.tensor([1.0, 2.0, 3.0, 2.0, 4.0, 1.5, math.pi / 2, 5.0, -6.0], dtype=torch.float64)
    expected = torch.tensor(
        [1.0, 2.0, math.log(2.0), math.log(4.0), 3.0, math.log(1.5), 1.0, 0.0, 5.0, -6.0], dtype=torch.float64
    )
    torch.testing.assert_close(encode_boxes(box), expected, atol=1e-12, rtol=0)


def test_encode_decode_round_trip_with_yaw_wrap():
    generator = torch.Generator().manual_seed(0)
    boxes = random_boxes(2000, generator, yaw_span=3.0 * math.pi).reshape(4, 500, 9)  # (2000, 9) -> (4, 500, 9)
    codes = encode_boxes(boxes)
    assert codes.shape == (4, 500, 10) and codes.dtype == torch.float64
    decoded = decode_box_codes(codes)
    assert decoded.shape == (4, 500, 9)
    non_yaw = [0, 1, 2, 3, 4, 5, 7, 8]
    torch.testing.assert_close(decoded[..., non_yaw], boxes[..., non_yaw], atol=1e-10, rtol=1e-12)
    # Yaw comes back wrapped into [-pi, pi), equal to the input modulo 2 pi.
    yaw = decoded[..., 6]
    assert bool((yaw >= -math.pi).all()) and bool((yaw < math.pi).all())
    assert float(wrap_angle(yaw - boxes[..., 6]).abs().max()) < 1e-10
    # Inputs beyond [-pi, pi) were present, so the wrap was exercised.
    assert float(boxes[..., 6].abs().max()) > 2.0 * math.pi


def test_decode_yaw_at_pi_wraps_to_minus_pi_and_ignores_code_norm():
    codes = torch.zeros(3, 10, dtype=torch.float64)
    codes[0, 6:8] = torch.tensor([0.0, -1.0])  # yaw = pi exactly -> -pi
    codes[1, 6:8] = torch.tensor([3.0, 3.0])  # not unit length: yaw = pi/4
    codes[2, 6:8] = torch.tensor([-0.5, 0.0])  # yaw = -pi/2
    yaw = decode_box_codes(codes)[:, 6]
    torch.testing.assert_close(yaw, torch.tensor([-math.pi, math.pi / 4, -math.pi / 2], dtype=torch.float64))


def test_coder_rejects_wrong_last_dim():
    with pytest.raises(ValueError, match="boxes"):
        encode_boxes(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="codes"):
        decode_box_codes(torch.zeros(3, 9))


# ------------------------------------------------------------------------------------------------------------------
# Branches
# ------------------------------------------------------------------------------------------------------------------
def test_branches_shapes_and_prior_bias():
    torch.manual_seed(0)
    cls_branch = ClassificationBranch(embed_dims=32, num_classes=C)
    reg_branch = RegressionBranch(embed_dims=32)
    layer_types = [type(m) for m in cls_branch.hidden]
    assert layer_types == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.ReLU] * 2
    assert [type(m) for m in reg_branch.hidden] == [torch.nn.Linear, torch.nn.ReLU] * 2
    torch.testing.assert_close(torch.sigmoid(cls_branch.logits.bias), torch.full((C,), 0.01))
    queries = torch.randn(2, 7, 32)
    assert cls_branch(queries).shape == (2, 7, C)
    assert reg_branch(queries).shape == (2, 7, 10)
    assert len(ClassificationBranch(16, 3, num_fcs=1).hidden) == 3


# ------------------------------------------------------------------------------------------------------------------
# Focal loss
# ------------------------------------------------------------------------------------------------------------------
def direct_focal(logits, targets, alpha, gamma):
    p = torch.sigmoid(logits)
    p_t = torch.where(targets > 0.5, p, 1.0 - p)
    alpha_t = torch.where(targets > 0.5, torch.full_like(p, alpha), torch.full_like(p, 1.0 - alpha))
    return -alpha_t * (1.0 - p_t) ** gamma * torch.log(p_t)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.9, 1.5)])
def test_focal_loss_equals_direct_formula(alpha, gamma):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, C, generator=generator, dtype=torch.float64) * 4.0
    targets = (torch.rand(6, 50, C, generator=generator, dtype=torch.float64) < 0.2).double()
    expected = direct_focal(logits, targets, alpha, gamma)
    torch.testing.assert_close(focal_loss(logits, targets, alpha, gamma, "none"), expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(focal_loss(logits, targets, alpha, gamma), expected.sum(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(focal_loss(logits, targets, alpha, gamma, "mean"), expected.mean())


def test_focal_loss_extreme_logits_are_finite_and_graded():
    logits = torch.tensor([-200.0, -30.0, 30.0, 200.0], requires_grad=True)
    targets = torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss = focal_loss(logits, targets, reduction="none")
    assert bool(torch.isfinite(loss).all()) and bool((loss > 0).all())
    # Confidently wrong: loss ~ alpha_t * |logit|.
    torch.testing.assert_close(loss[0], torch.tensor(0.25 * 200.0))
    loss.sum().backward()
    assert bool(torch.isfinite(logits.grad).all())
    with pytest.raises(ValueError, match="reduction"):
        focal_loss(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="targets_onehot shape"):
        focal_loss(logits, targets[:3])


# ------------------------------------------------------------------------------------------------------------------
# Matcher
# ------------------------------------------------------------------------------------------------------------------
def reference_cost(logits, codes, gt_labels, gt_codes, cls_weight=2.0, reg_weight=0.25, alpha=0.25, gamma=2.0):
    """The matching cost written out from its definition, (Q, n)."""
    p = torch.sigmoid(logits)
    pos = alpha * (1 - p) ** gamma * -torch.log(p)
    neg = (1 - alpha) * p**gamma * -torch.log(1 - p)
    cls = (pos - neg)[:, gt_labels]
    reg = (codes[:, None, :8] - gt_codes[None, :, :8]).abs().sum(-1)  # (Q, 1, 8) - (1, n, 8) -> (Q, n)
    return cls_weight * cls + reg_weight * reg


def test_matcher_equals_brute_force():
    generator = torch.Generator().manual_seed(2)
    matcher = HungarianMatcher()
    cases = 0
    for num_queries in range(1, 6):
        for num_gt in range(0, num_queries + 1):
            for _ in range(3):
                logits = torch.randn(num_queries, C, generator=generator, dtype=torch.float64) * 3.0
                codes = encode_boxes(random_boxes(num_queries, generator)) * 0.1  # costs of a similar scale
                gt_labels = torch.randint(0, C, (num_gt,), generator=generator)
                gt_codes = encode_boxes(random_boxes(num_gt, generator)) * 0.1
                query_idx, gt_idx = matcher.match(logits, codes, gt_labels, gt_codes)
                assert query_idx.dtype == gt_idx.dtype == torch.int64
                assert query_idx.shape == gt_idx.shape == (num_gt,)
                assert gt_idx.tolist() == list(range(num_gt))  # ordered by GT
                assert len(set(query_idx.tolist())) == num_gt  # one-to-one
                cost = reference_cost(logits, codes, gt_labels, gt_codes)
                torch.testing.assert_close(matcher.cost_matrix(logits, codes, gt_labels, gt_codes), cost)
                best = min(
                    itertools.permutations(range(num_queries), num_gt),
                    key=lambda queries: sum(float(cost[q, g]) for g, q in enumerate(queries)),
                )
                assert tuple(query_idx.tolist()) == best
                cases += 1
    assert cases == 3 * sum(q + 1 for q in range(1, 6))


def test_matcher_empty_gt_and_too_many_gt():
    matcher = HungarianMatcher()
    logits, codes = torch.randn(4, C), torch.randn(4, 10)
    query_idx, gt_idx = matcher.match(logits, codes, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 10))
    assert query_idx.shape == gt_idx.shape == (0,) and query_idx.dtype == torch.int64
    with pytest.raises(ValueError, match="5 GT boxes but only 4 queries"):
        matcher.match(logits, codes, torch.zeros(5, dtype=torch.int64), torch.zeros(5, 10))
    with pytest.raises(ValueError, match="gt_labels must be in"):
        matcher.match(logits, codes, torch.tensor([C]), torch.zeros(1, 10))
    with pytest.raises(ValueError, match="not finite"):
        matcher.match(logits.clone().fill_(float("nan")), codes, torch.tensor([1]), torch.zeros(1, 10))


def test_matcher_layers_match_single_calls():
    generator = torch.Generator().manual_seed(3)
    matcher = HungarianMatcher()
    logits = torch.randn(3, 20, C, generator=generator)
    codes = torch.randn(3, 20, 10, generator=generator) * 5.0
    gt_labels = torch.randint(0, C, (7,), generator=generator)
    gt_codes = torch.randn(7, 10, generator=generator) * 5.0
    for layer, (query_idx, gt_idx) in enumerate(matcher.match_layers(logits, codes, gt_labels, gt_codes)):
        single_query, single_gt = matcher.match(logits[layer], codes[layer], gt_labels, gt_codes)
        assert torch.equal(query_idx, single_query) and torch.equal(gt_idx, single_gt)


# ------------------------------------------------------------------------------------------------------------------
# DetectionLoss
# ------------------------------------------------------------------------------------------------------------------
def make_targets(sizes, generator, dtype=torch.float64):
    boxes = [random_boxes(n, generator, dtype) for n in sizes]
    labels = [torch.randint(0, C, (n,), generator=generator) for n in sizes]
    return boxes, labels


def test_loss_is_zero_for_perfect_predictions_and_positive_for_wrong_ones():
    generator = torch.Generator().manual_seed(4)
    boxes, labels = make_targets([5, 3], generator)
    logits, codes = perfect_predictions(boxes, labels, num_queries=12, num_layers=3)
    criterion = DetectionLoss()
    losses = criterion(logits, codes, boxes, labels)
    assert set(losses) == {f"loss_{kind}_layer{i}" for kind in ("cls", "bbox") for i in range(3)} | {"loss"}
    assert float(losses["loss"]) < 1e-7
    torch.testing.assert_close(
        losses["loss"], sum(value for key, value in losses.items() if key != "loss"), atol=1e-12, rtol=0
    )

    wrong_class = logits.clone()
    wrong_class[:, 0, 0] = logits[:, 0, 0].roll(1, dims=-1)  # query 0 of sample 0 scores another class
    wrong = criterion(wrong_class, codes, boxes, labels)
    assert float(wrong["loss_cls_layer0"]) > 1.0 and float(wrong["loss_bbox_layer0"]) < 1e-7

    wrong_box = codes.clone()
    wrong_box[:, 1, 2, 0] += 3.0  # query 2 of sample 1 is 3 m off in x
    wrong = criterion(logits, wrong_box, boxes, labels)
    # reg_weight * 3 m / 8 GT boxes in the batch, on every layer.
    torch.testing.assert_close(wrong["loss_bbox_layer2"], torch.tensor(0.25 * 3.0 / 8.0, dtype=torch.float64))


def test_code_weights_scale_velocity_error_by_0p2():
    generator = torch.Generator().manual_seed(5)
    boxes, labels = make_targets([4], generator)
    logits, codes = perfect_predictions(boxes, labels, num_queries=6)
    criterion = DetectionLoss()
    base = float(criterion(logits, codes, boxes, labels)["loss_bbox_layer0"])
    deltas = {}
    for dim in (0, 8):  # x, vx
        moved = codes.clone()
        moved[0, 0, 1, dim] += 0.5
        deltas[dim] = float(criterion(logits, moved, boxes, labels)["loss_bbox_layer0"]) - base
    assert deltas[0] == pytest.approx(0.25 * 0.5 / 4, rel=1e-9)
    assert deltas[8] == pytest.approx(0.2 * deltas[0], rel=1e-9)


def test_empty_gt_in_one_sample_gives_finite_loss_and_gradients():
    generator = torch.Generator().manual_seed(6)
    boxes, labels = make_targets([0, 3], generator)
    logits = torch.randn(2, 2, 8, C, generator=generator, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(2, 2, 8, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    losses = DetectionLoss()(logits, codes, boxes, labels)
    assert all(bool(torch.isfinite(value)) for value in losses.values())
    losses["loss"].backward()
    assert bool(torch.isfinite(logits.grad).all()) and bool(torch.isfinite(codes.grad).all())
    # The empty sample still trains its classifier towards background, and gets no box gradient.
    assert float(logits.grad[:, 0].abs().min()) > 0.0
    assert float(codes.grad[:, 0].abs().max()) == 0.0
    assert float(codes.grad[:, 1].abs().sum()) > 0.0


def test_all_samples_empty_keeps_codes_in_the_graph():
    logits = torch.randn(1, 2, 5, C, requires_grad=True)
    codes = torch.randn(1, 2, 5, 10, requires_grad=True)
    empty_boxes = [torch.zeros(0, 9), torch.zeros(0, 9)]
    empty_labels = [torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)]
    losses = DetectionLoss()(logits, codes, empty_boxes, empty_labels)
    assert float(losses["loss_bbox_layer0"].detach()) == 0.0
    # Normaliser max(0, 1) = 1: the classification loss is the plain focal sum times cls_weight.
    torch.testing.assert_close(losses["loss_cls_layer0"], 2.0 * focal_loss(logits, torch.zeros_like(logits)))
    losses["loss"].backward()
    assert codes.grad is not None and float(codes.grad.abs().max()) == 0.0


def test_loss_gradients_match_finite_differences():
    generator = torch.Generator().manual_seed(7)
    boxes, labels = make_targets([0, 2], generator)
    logits = torch.randn(2, 2, 4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(2, 2, 4, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = [label % 3 for label in labels]
    criterion = DetectionLoss(num_classes=3)
    assert torch.autograd.gradcheck(lambda x, y: criterion(x, y, boxes, labels)["loss"], (logits, codes))


def test_batch_loss_is_gt_weighted_sum_of_sample_losses():
    """Normalisation: sums over samples / total GT, so L_batch * N = sum_b L_b * max(N_b, 1)."""
    generator = torch.Generator().manual_seed(8)
    sizes = [4, 0, 2]
    boxes, labels = make_targets(sizes, generator)
    logits = torch.randn(2, 3, 9, C, generator=generator, dtype=torch.float64)
    codes = torch.randn(2, 3, 9, 10, generator=generator, dtype=torch.float64) * 3.0
    criterion = DetectionLoss()
    batch = criterion(logits, codes, boxes, labels)
    for key in batch:
        per_sample = sum(
            criterion(logits[:, b : b + 1], codes[:, b : b + 1], boxes[b : b + 1], labels[b : b + 1])[key] * max(n, 1)
            for b, n in enumerate(sizes)
        )
        torch.testing.assert_close(batch[key] * sum(sizes), per_sample, rtol=1e-10, atol=1e-12)
    # Order of the samples does not matter.
    order = [2, 0, 1]
    shuffled = criterion(logits[:, order], codes[:, order], [boxes[i] for i in order], [labels[i] for i in order])
    torch.testing.assert_close(shuffled["loss"], batch["loss"])


def test_num_gt_normaliser_callable_and_constant():
    generator = torch.Generator().manual_seed(9)
    boxes, labels = make_targets([3, 2], generator)
    logits = torch.randn(3, 2, 6, C, generator=generator)
    codes = torch.randn(3, 2, 6, 10, generator=generator)
    plain = DetectionLoss()(logits, codes, boxes, labels)["loss"]
    calls = []

    def hook(count):
        calls.append(float(count))
        return count * 0.0 + 2.5

    hooked = DetectionLoss(num_gt_normaliser=hook)(logits, codes, boxes, labels)["loss"]
    assert calls == [5.0]  # once per forward, whatever the number of layers
    torch.testing.assert_close(hooked, plain * 5.0 / 2.5)
    constant = DetectionLoss(num_gt_normaliser=10.0)(logits, codes, boxes, labels)["loss"]
    torch.testing.assert_close(constant, plain * 5.0 / 10.0)
    clamped = DetectionLoss(num_gt_normaliser=lambda count: count * 0.0 + 0.1)(logits, codes, boxes, labels)["loss"]
    torch.testing.assert_close(clamped, plain * 5.0)  # clamped at 1


def test_loss_rejects_bad_targets():
    criterion = DetectionLoss()
    logits, codes = torch.zeros(1, 1, 3, C), torch.zeros(1, 1, 3, 10)
    good = torch.tensor([[1.0, 2.0, 0.5, 2.0, 4.0, 1.5, 0.3, 0.0, 0.0]])
    label = torch.tensor([2])
    nan_velocity = good.clone()
    nan_velocity[0, 7] = float("nan")
    with pytest.raises(ValueError, match=r"gt_boxes\[0\] row 0 is not finite"):
        criterion(logits, codes, [nan_velocity], [label])
    zero_size = good.clone()
    zero_size[0, 4] = 0.0
    with pytest.raises(ValueError, match="non-positive size"):
        criterion(logits, codes, [zero_size], [label])
    with pytest.raises(ValueError, match="4 GT boxes but there are only 3 queries"):
        criterion(logits, codes, [good.repeat(4, 1)], [label.repeat(4)])
    with pytest.raises(ValueError, match="must be in"):
        criterion(logits, codes, [good], [torch.tensor([C])])
    with pytest.raises(ValueError, match="lists of B=1"):
        criterion(logits, codes, [good, good], [label, label])
    with pytest.raises(ValueError, match="all_box_codes"):
        criterion(logits, codes[..., :9], [good], [label])


def test_half_precision_logits_are_promoted():
    generator = torch.Generator().manual_seed(10)
    boxes, labels = make_targets([2], generator, dtype=torch.float32)
    logits = torch.randn(1, 1, 4, C, generator=generator)
    codes = torch.randn(1, 1, 4, 10, generator=generator)
    losses = DetectionLoss()(logits.bfloat16(), codes.bfloat16(), boxes, labels)
    assert losses["loss"].dtype == torch.float32 and bool(torch.isfinite(losses["loss"]))


# ------------------------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------------------------
def test_decode_top_k_order_and_planted_query_class():
    generator = torch.Generator().manual_seed(11)
    batch, num_queries = 2, 30
    logits = torch.randn(batch, num_queries, C, generator=generator) - 3.0
    boxes = random_boxes(batch * num_queries, generator, torch.float32).reshape(batch, num_queries, 9)
    codes = encode_boxes(boxes)  # (B, Q, 10)
    planted = {0: (17, 6), 1: (3, 9)}  # sample -> (query, class)
    for b, (query, cls) in planted.items():
        logits[b, query, cls] = 8.0
    results = decode_predictions(logits, codes, max_num=50, post_center_range_m=None)
    assert len(results) == batch
    for b, result in enumerate(results):
        assert result["boxes"].shape == (50, 9) and result["scores"].shape == result["labels"].shape == (50,)
        assert bool((result["scores"][:-1] >= result["scores"][1:]).all())  # descending
        torch.testing.assert_close(result["scores"], torch.sigmoid(logits[b]).flatten().topk(50).values)
        query, cls = planted[b]
        assert int(result["labels"][0]) == cls and int(result["query_idx"][0]) == query
        non_yaw = [0, 1, 2, 3, 4, 5, 7, 8]
        torch.testing.assert_close(result["boxes"][0, non_yaw], boxes[b, query, non_yaw])
        assert abs(float(wrap_angle(result["boxes"][0, 6] - boxes[b, query, 6]))) < 1e-5
        # Every output is (query, class) consistent with the logits it came from.
        torch.testing.assert_close(
            result["scores"], torch.sigmoid(logits[b, result["query_idx"], result["labels"]])
        )
    # k is clipped to Q * C.
    clipped = decode_predictions(logits[:, :2], codes[:, :2], max_num=300, post_center_range_m=None)
    assert clipped[0]["scores"].shape == (2 * C,)


def test_decode_range_filter_and_score_threshold():
    logits = torch.full((1, 4, C), -5.0)
    logits[0, :, 0] = torch.tensor([5.0, 4.0, 3.0, -1.0])
    boxes = torch.tensor(
        [
            [70.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],  # x beyond 61.2: dropped
            [10.0, -61.2, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],  # on the bound: kept
            [0.0, 5.0, -12.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],  # z below -10: dropped
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
        ]
    )[None]
    codes = encode_boxes(boxes)  # (1, 4, 10)
    result = decode_predictions(logits, codes, max_num=4)[0]
    assert result["query_idx"].tolist() == [1, 3]  # top 4: queries 0, 1, 2, 3 at class 0
    assert result["labels"].tolist() == [0, 0]
    torch.testing.assert_close(result["boxes"][0], boxes[0, 1], atol=1e-5, rtol=0)
    thresholded = decode_predictions(logits, codes, max_num=4, score_threshold=0.5)[0]
    assert thresholded["query_idx"].tolist() == [1]
    unfiltered = decode_predictions(logits, codes, max_num=3, post_center_range_m=None)[0]
    assert unfiltered["query_idx"].tolist() == [0, 1, 2]


def test_mean_across_ranks_single_process_group(tmp_path):
    from bevdeform.models.head import mean_across_ranks

    count = torch.tensor(7.0)
    assert mean_across_ranks(count) is count  # no process group: the local value
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mean = mean_across_ranks(count)
        assert float(mean) == 7.0 and float(count) == 7.0 and mean is not count
    finally:
        torch.distributed.destroy_process_group()
