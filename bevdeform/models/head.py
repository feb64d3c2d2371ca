"""3D detection head: box coder, prediction branches, Hungarian matcher, losses and NMS-free decoding.

Conventions (see docs/data-format.md):

- A **box** is 9 numbers ``[x, y, z, w, l, h, yaw, vx, vy]`` in the ego frame: ``(x, y, z)`` the box centre in
  metres, ``w, l, h`` in metres (``l`` along the heading), ``yaw`` in radians counter-clockwise about +z from +x,
  ``(vx, vy)`` in m/s along the ego axes.
- A **box code** is the 10 numbers the regression branch predicts and the L1 loss compares, BEVFormer's layout:
  ``(cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy)``. The coder does no normalisation by the
  point-cloud range: the regression targets for ``cx, cy, cz`` are **metres in the ego frame**. The decoder keeps
  its reference points in sigmoid space for the iterative refinement and must map them to metres (with the BEV
  range) before it hands the codes to :class:`DetectionLoss` or :func:`decode_predictions`.
- **Classes**: index order of ``bevdeform.data.infos.CLASS_NAMES``; classification is ``num_classes`` independent
  sigmoids (no background logit). A query with all sigmoids low is background.

Matching and losses follow the BEVFormer reference: Hungarian matching per decoder layer and per sample with
cost = 2.0 * focal cost + 0.25 * L1 over the first 8 code dims; sigmoid focal loss (alpha 0.25, gamma 2, weight
2.0) over every query; L1 (weight 0.25, code weights 1 x 8, 0.2 x 2 for the velocity) over matched queries; both
normalised by the number of ground-truth boxes in the batch. There is no GIoU term.

Imports only torch at module level; scipy is imported when a matching is first computed, so inference
(:func:`decode_predictions`) runs without scipy installed.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BOX_DIM = 9
CODE_SIZE = 10
# Code dims the matching cost compares: everything but the velocity (as the reference does), because the
# velocity of a single frame is too noisy to decide which query owns an object.
MATCH_CODE_DIMS = 8
DEFAULT_CODE_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
DEFAULT_POST_CENTER_RANGE_M = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)


# ----------------------------------------------------------------------------------------------------------------
# Box coder
# ----------------------------------------------------------------------------------------------------------------
def encode_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes -> box codes.

    Args:
        boxes: (..., 9) ``[x, y, z, w, l, h, yaw, vx, vy]``, ego frame, metres / radians / m/s. Sizes must be
            positive (their log is taken); the caller validates that (:class:`DetectionLoss` does).
    Returns:
        (..., 10) ``(cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy)``, same dtype and device. No
        normalisation by the range: ``cx, cy, cz`` stay in metres.
    """
    if boxes.shape[-1] != BOX_DIM:
        raise ValueError(f"encode_boxes: boxes must have shape (..., {BOX_DIM}), got {tuple(boxes.shape)}")
    x, y, z, w, l, h, yaw, vx, vy = boxes.unbind(dim=-1)
    return torch.stack(
        (x, y, w.log(), l.log(), z, h.log(), yaw.sin(), yaw.cos(), vx, vy), dim=-1
    )  # 10 x (...) -> (..., 10)


def decode_box_codes(codes: torch.Tensor) -> torch.Tensor:
    """Box codes -> boxes (the inverse of :func:`encode_boxes`).

    Args:
        codes: (..., 10) ``(cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy)``, metres / m/s. The
            (sin, cos) pair need not be unit length: only its direction is used.
    Returns:
        (..., 9) ``[x, y, z, w, l, h, yaw, vx, vy]``, ego frame; sizes ``exp`` of the log sizes; yaw
        ``atan2(sin, cos)`` wrapped to [-pi, pi) as in docs/data-format.md.
    """
    if codes.shape[-1] != CODE_SIZE:
        raise ValueError(f"decode_box_codes: codes must have shape (..., {CODE_SIZE}), got {tuple(codes.shape)}")
    cx, cy, log_w, log_l, cz, log_h, sin_yaw, cos_yaw, vx, vy = codes.unbind(dim=-1)
    yaw = torch.atan2(sin_yaw, cos_yaw)
    # atan2 returns (-pi, pi]; the data contract's interval is half-open at +pi.
    yaw = torch.where(yaw >= math.pi, yaw - 2.0 * math.pi, yaw)
    return torch.stack(
        (cx, cy, cz, log_w.exp(), log_l.exp(), log_h.exp(), yaw, vx, vy), dim=-1
    )  # 9 x (...) -> (..., 9)


# ----------------------------------------------------------------------------------------------------------------
# Branches
# ----------------------------------------------------------------------------------------------------------------
class ClassificationBranch(nn.Module):
    """Per-query class logits: (Linear, LayerNorm, ReLU) x ``num_fcs``, then Linear(``num_classes``).

    The last bias starts at ``-log((1 - 0.01) / 0.01)`` so every sigmoid starts at probability 0.01: with 900
    queries and few objects, a 0.5 start would make the background focal loss swamp the first steps.

    Input (..., embed_dims) -> output (..., num_classes) logits (one sigmoid per class, no background logit).
    """

    def __init__(self, embed_dims: int, num_classes: int, num_fcs: int = 2, prior_prob: float = 0.01):
        super().__init__()
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"ClassificationBranch: prior_prob must be in (0, 1), got {prior_prob}")
        layers: list[nn.Module] = []
        for _ in range(num_fcs):
            layers += [nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True)]
        self.hidden = nn.Sequential(*layers)
        self.logits = nn.Linear(embed_dims, num_classes)
        nn.init.constant_(self.logits.bias, -math.log((1.0 - prior_prob) / prior_prob))

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(queries))


class RegressionBranch(nn.Module):
    """Per-query box code: (Linear, ReLU) x ``num_fcs``, then Linear(``code_size``).

    Input (..., embed_dims) -> output (..., code_size), the box code layout of :func:`encode_boxes`. With
    iterative refinement the decoder adds its reference points (inverse-sigmoid space) to dims 0, 1 and 4 and
    maps them to metres; the other dims are used as they come.
    """

    def __init__(self, embed_dims: int, code_size: int = CODE_SIZE, num_fcs: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_fcs):
            layers += [nn.Linear(embed_dims, embed_dims), nn.ReLU(inplace=True)]
        self.hidden = nn.Sequential(*layers)
        self.codes = nn.Linear(embed_dims, code_size)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.codes(self.hidden(queries))


# ----------------------------------------------------------------------------------------------------------------
# Focal loss
# ----------------------------------------------------------------------------------------------------------------
def focal_loss(
    logits: torch.Tensor,
    targets_onehot: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), elementwise over independent per-class sigmoids.

    ``loss = alpha_t * (1 - p_t) ** gamma * BCE(logit, target)`` with ``p_t = p`` for a positive and ``1 - p``
    for a negative, ``alpha_t = alpha`` for a positive and ``1 - alpha`` for a negative. The cross entropy comes
    from ``binary_cross_entropy_with_logits`` and ``1 - p_t`` from a sigmoid of the logit of the right sign, so
    neither loses precision at large logits (1 - sigmoid(x) would round to 0 at x > 17 in float32).

    Args:
        logits: (...) raw scores.
        targets_onehot: (...) same shape, 1 for the true class of a matched query, 0 elsewhere (an all-zero row
            is background). Values in [0, 1] are accepted.
        alpha: weight of the positives, in [0, 1].
        gamma: focusing exponent, >= 0.
        reduction: 'sum', 'mean' or 'none'.
    Returns:
        a scalar ('sum', 'mean') or a tensor of the logits' shape ('none').
    """
    if logits.shape != targets_onehot.shape:
        raise ValueError(
            f"focal_loss: targets_onehot shape {tuple(targets_onehot.shape)} must equal logits shape "
            f"{tuple(logits.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"focal_loss: alpha must be in [0, 1], got {alpha}")
    if gamma < 0.0:
        raise ValueError(f"focal_loss: gamma must be >= 0, got {gamma}")
    targets = targets_onehot.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    one_minus_p_t = targets * torch.sigmoid(-logits) + (1.0 - targets) * torch.sigmoid(logits)
    alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    loss = alpha_t * one_minus_p_t.pow(gamma) * bce
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"focal_loss: reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------------------------------------------
# Hungarian matcher
# ----------------------------------------------------------------------------------------------------------------
class HungarianMatcher:
    """One-to-one assignment of ground-truth boxes to queries (DETR), cost as in BEVFormer.

    ``cost[q, g] = cls_weight * (pos_cost - neg_cost)[q, label_g] + reg_weight * |code_q - code_g|_1[:8]`` with,
    for ``p = sigmoid(logit)``, ``pos_cost = alpha (1 - p)^gamma (-log p)`` (the focal loss if the class were
    positive) and ``neg_cost = (1 - alpha) p^gamma (-log(1 - p))`` (the focal loss if it were negative): the cost
    is the change in focal loss that assigning the GT's class to the query would cause.

    Every GT is matched, so a sample must have at most as many GT boxes as there are queries (900 in the
    reference configs); more raises a ValueError rather than silently dropping boxes from the loss.

    The cost is built with torch on the inputs' device (batched over decoder layers), detached, and solved on the
    CPU with ``scipy.optimize.linear_sum_assignment``.
    """

    def __init__(self, cls_weight: float = 2.0, reg_weight: float = 0.25, alpha: float = 0.25, gamma: float = 2.0):
        self.cls_weight = float(cls_weight)
        self.reg_weight = float(reg_weight)
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    @torch.no_grad()
    def cost_matrix(
        self, cls_logits: torch.Tensor, box_codes: torch.Tensor, gt_labels: torch.Tensor, gt_codes: torch.Tensor
    ) -> torch.Tensor:
        """The matching cost, batched over any leading dims of the predictions.

        Args:
            cls_logits: (..., Q, C) logits.
            box_codes: (..., Q, 10) predicted codes (metric, see the module docstring).
            gt_labels: (n,) int64 class indices in [0, C).
            gt_codes: (n, 10) target codes (:func:`encode_boxes` of the GT boxes).
        Returns:
            (..., Q, n) cost, lower is better, in the predictions' dtype (half precision promoted to float32).
        """
        self._check_inputs(cls_logits, box_codes, gt_labels, gt_codes)
        if cls_logits.dtype in (torch.float16, torch.bfloat16):
            cls_logits = cls_logits.float()
        box_codes = box_codes.to(cls_logits.dtype)
        gt_codes = gt_codes.to(device=cls_logits.device, dtype=cls_logits.dtype)
        gt_labels = gt_labels.to(cls_logits.device)

        # -log p = softplus(-x) and -log(1 - p) = softplus(x), exact without an epsilon at any logit.
        prob = torch.sigmoid(cls_logits)
        one_minus_prob = torch.sigmoid(-cls_logits)
        pos_cost = self.alpha * one_minus_prob.pow(self.gamma) * F.softplus(-cls_logits)
        neg_cost = (1.0 - self.alpha) * prob.pow(self.gamma) * F.softplus(cls_logits)
        cls_cost = (pos_cost - neg_cost)[..., gt_labels]  # (..., Q, C) -> (..., Q, n)

        pred = box_codes[..., :MATCH_CODE_DIMS]  # (..., Q, 8)
        target = gt_codes[:, :MATCH_CODE_DIMS].expand(*pred.shape[:-2], -1, -1)  # (n, 8) -> (..., n, 8)
        reg_cost = torch.cdist(pred, target, p=1.0)  # (..., Q, n)
        return self.cls_weight * cls_cost + self.reg_weight * reg_cost

    def match_layers(
        self, all_cls_logits: torch.Tensor, all_box_codes: torch.Tensor, gt_labels: torch.Tensor, gt_codes: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match one sample's GT to its queries in each of L decoder layers (one device -> CPU copy for all).

        Args:
            all_cls_logits: (L, Q, C); all_box_codes: (L, Q, 10); gt_labels: (n,); gt_codes: (n, 10).
        Returns:
            L pairs ``(query_idx (n,), gt_idx (n,))`` of int64 on the predictions' device, ordered by GT
            (``gt_idx == arange(n)``).
        """
        if all_cls_logits.dim() != 3:
            raise ValueError(f"match_layers: all_cls_logits must be (L, Q, C), got {tuple(all_cls_logits.shape)}")
        num_layers, num_queries = all_cls_logits.shape[:2]
        device = all_cls_logits.device
        num_gt = int(gt_labels.shape[0]) if gt_labels.dim() == 1 else -1
        if num_gt == 0:
            # Check shapes anyway so a malformed empty target fails the same way a full one does.
            self._check_inputs(all_cls_logits, all_box_codes, gt_labels, gt_codes)
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return [(empty, empty.clone()) for _ in range(num_layers)]
        if num_gt > num_queries:
            raise ValueError(
                f"HungarianMatcher: {num_gt} GT boxes but only {num_queries} queries; one-to-one matching needs "
                f"num_queries >= GT boxes per sample (raise the number of queries or filter the targets)"
            )
        cost = self.cost_matrix(all_cls_logits, all_box_codes, gt_labels, gt_codes)  # (L, Q, n)
        if not bool(torch.isfinite(cost).all()):
            raise ValueError(
                "HungarianMatcher: the matching cost is not finite; the predicted logits or box codes contain "
                "NaN/inf (diverged training, or an fp16 overflow)"
            )
        # Lazy import: inference never matches, so the detector runs without scipy.
        from scipy.optimize import linear_sum_assignment

        # (L, Q, n) -> (L, n, Q): rows are GT, so scipy returns the rows as arange(n) and one query per GT.
        cost_np = cost.transpose(1, 2).double().cpu().numpy()
        matches = []
        for layer in range(num_layers):
            gt_idx, query_idx = linear_sum_assignment(cost_np[layer])
            matches.append(
                (
                    torch.as_tensor(query_idx, dtype=torch.int64).to(device),
                    torch.as_tensor(gt_idx, dtype=torch.int64).to(device),
                )
            )
        return matches

    def match(
        self, cls_logits: torch.Tensor, box_codes: torch.Tensor, gt_labels: torch.Tensor, gt_codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Match one sample's GT to the queries of one layer.

        Args:
            cls_logits: (Q, C) logits; box_codes: (Q, 10); gt_labels: (n,) int64; gt_codes: (n, 10).
        Returns:
            ``(query_idx (n,), gt_idx (n,))`` int64 on the predictions' device, ordered by GT; empty for n = 0.
        Raises:
            ValueError: n > Q, malformed shapes, labels out of range, non-finite cost.
        """
        if cls_logits.dim() != 2:
            raise ValueError(f"match: cls_logits must be (Q, C), got {tuple(cls_logits.shape)}")
        return self.match_layers(cls_logits[None], box_codes[None], gt_labels, gt_codes)[0]  # (Q, .) -> (1, Q, .)

    @staticmethod
    def _check_inputs(cls_logits, box_codes, gt_labels, gt_codes) -> None:
        if cls_logits.dim() < 2:
            raise ValueError(f"HungarianMatcher: cls_logits must be (..., Q, C), got {tuple(cls_logits.shape)}")
        if box_codes.shape[:-1] != cls_logits.shape[:-1] or box_codes.shape[-1] != CODE_SIZE:
            raise ValueError(
                f"HungarianMatcher: box_codes must be {(*cls_logits.shape[:-1], CODE_SIZE)} to go with cls_logits "
                f"{tuple(cls_logits.shape)}, got {tuple(box_codes.shape)}"
            )
        if gt_labels.dim() != 1 or gt_codes.shape != (gt_labels.shape[0], CODE_SIZE):
            raise ValueError(
                f"HungarianMatcher: gt_labels must be (n,) and gt_codes (n, {CODE_SIZE}), got "
                f"{tuple(gt_labels.shape)} and {tuple(gt_codes.shape)}"
            )
        if gt_labels.dtype.is_floating_point or gt_labels.dtype == torch.bool:
            raise ValueError(f"HungarianMatcher: gt_labels must be an integer tensor, got {gt_labels.dtype}")
        num_classes = cls_logits.shape[-1]
        if gt_labels.numel() > 0 and (int(gt_labels.min()) < 0 or int(gt_labels.max()) >= num_classes):
            raise ValueError(
                f"HungarianMatcher: gt_labels must be in [0, {num_classes}), got values in "
                f"[{int(gt_labels.min())}, {int(gt_labels.max())}]"
            )


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """All-reduce mean of a tensor over the torch.distributed process group; the value itself without one.

    Meant as ``DetectionLoss(num_gt_normaliser=mean_across_ranks)`` under DDP, as the reference does: every rank
    then divides by the mean GT count per rank, and DDP's gradient averaging turns the sum of the ranks' losses
    into the global sum divided by the global GT count, whatever each rank's own count. The tensor must be on the
    device the backend communicates on (CUDA for NCCL), which is where :class:`DetectionLoss` puts it.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    total = value.detach().clone()  # all_reduce works in place; the caller's tensor stays the local count
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total / torch.distributed.get_world_size()


class DetectionLoss(nn.Module):
    """Hungarian-matched focal + L1 losses on every decoder layer (BEVFormer's set-prediction loss).

    For each layer ``i``:

    - ``loss_cls_layer{i} = cls_weight * sum_{b, q, c} focal(logit, onehot) / N``: over **all** queries of all
      samples; a matched query's target is the one-hot of its GT class, an unmatched one's is all zeros.
    - ``loss_bbox_layer{i} = reg_weight * sum_{matched (b, q)} sum_k code_weights[k] |code - target|_k / N``:
      matched queries only; the targets are :func:`encode_boxes` of the GT (metric ``cx, cy, cz``).

    ``N`` is ``max(sum_b N_b, 1)`` with ``N_b`` the GT count of sample b (every GT is matched, in every layer):
    sums over the samples divided by the batch's total, as the reference does, so a sample with many objects
    weighs more than one with few. Hence ``loss(batch) * N = sum_b loss(sample b alone) * max(N_b, 1)``; a sample
    without GT adds its background focal loss, which still trains the classifier. ``loss`` is the sum of all
    per-layer terms (no averaging over layers, as the reference).

    ``num_gt_normaliser`` replaces the local count ``N`` before the clamp at 1:

    - ``None``: ``N`` itself.
    - a callable: called once per forward, on every rank, with ``N`` as a float32 scalar tensor on the
      predictions' device; returns the normaliser (tensor or float). Under DDP pass :func:`mean_across_ranks`.
    - a float: that constant (e.g. an expected count per batch, for a loss scale that does not follow the batch).

    Targets: ``gt_boxes`` must be finite with positive sizes. The dataset stores an unknown GT velocity (a
    single-annotation instance, NaN in nuScenes) as 0 with ``gt_velocity_valid`` False, so NaN velocity rows must
    never reach the loss; non-finite targets raise a ValueError naming the sample and row instead of a NaN loss
    (the reference loss masked such rows out silently). Predictions in half precision are promoted to float32.

    Every GT box must be matched, so ``n_b <= Q`` for every sample (see :class:`HungarianMatcher`).
    """

    def __init__(
        self,
        num_classes: int = 10,
        cls_weight: float = 2.0,
        reg_weight: float = 0.25,
        code_weights: Sequence[float] = DEFAULT_CODE_WEIGHTS,
        alpha: float = 0.25,
        gamma: float = 2.0,
        matcher: HungarianMatcher | None = None,
        num_gt_normaliser: Callable[[torch.Tensor], torch.Tensor | float] | float | None = None,
    ):
        """
        Args:
            num_classes: C, number of sigmoid classes.
            cls_weight, reg_weight: weights of the focal and L1 terms.
            code_weights: 10 per-dim weights of the L1 term (code layout of :func:`encode_boxes`).
            alpha, gamma: focal loss parameters.
            matcher: the assignment; None builds ``HungarianMatcher(cls_weight, reg_weight, alpha, gamma)``, the
                reference's choice of matching with the loss's own weights.
            num_gt_normaliser: see the class docstring.
        """
        super().__init__()
        if len(code_weights) != CODE_SIZE:
            raise ValueError(f"DetectionLoss: code_weights must have {CODE_SIZE} entries, got {len(code_weights)}")
        if num_gt_normaliser is not None and not callable(num_gt_normaliser):
            num_gt_normaliser = float(num_gt_normaliser)
            if not num_gt_normaliser > 0.0:
                raise ValueError(f"DetectionLoss: a constant num_gt_normaliser must be > 0, got {num_gt_normaliser}")
        self.num_classes = int(num_classes)
        self.cls_weight = float(cls_weight)
        self.reg_weight = float(reg_weight)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.matcher = matcher if matcher is not None else HungarianMatcher(cls_weight, reg_weight, alpha, gamma)
        self.num_gt_normaliser = num_gt_normaliser
        # Plain floats, made a tensor of the loss's dtype at use: a float32 buffer would give a float64 loss
        # float32's 0.2000000030, and a float64 buffer would not move to devices without float64 (MPS).
        self.code_weights = tuple(float(w) for w in code_weights)

    def forward(
        self,
        all_cls_logits: torch.Tensor,
        all_box_codes: torch.Tensor,
        gt_boxes: Sequence[torch.Tensor],
        gt_labels: Sequence[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            all_cls_logits: (L, B, Q, C) class logits of every decoder layer.
            all_box_codes: (L, B, Q, 10) box codes of every decoder layer, metric (module docstring).
            gt_boxes: B tensors (n_b, 9) ``[x, y, z, w, l, h, yaw, vx, vy]``, ego frame; n_b may be 0.
            gt_labels: B int64 tensors (n_b,) in [0, C).
        Returns:
            ``{'loss_cls_layer{i}', 'loss_bbox_layer{i}'}`` for i in range(L), scalars, and ``'loss'``, their sum.
        """
        if all_cls_logits.dim() != 4 or all_cls_logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"DetectionLoss: all_cls_logits must be (L, B, Q, {self.num_classes}), got "
                f"{tuple(all_cls_logits.shape)}"
            )
        num_layers, batch_size, num_queries, _ = all_cls_logits.shape
        if all_box_codes.shape != (num_layers, batch_size, num_queries, CODE_SIZE):
            raise ValueError(
                f"DetectionLoss: all_box_codes must be {(num_layers, batch_size, num_queries, CODE_SIZE)}, got "
                f"{tuple(all_box_codes.shape)}"
            )
        if len(gt_boxes) != batch_size or len(gt_labels) != batch_size:
            raise ValueError(
                f"DetectionLoss: gt_boxes and gt_labels must be lists of B={batch_size} tensors, got "
                f"{len(gt_boxes)} and {len(gt_labels)}"
            )
        if num_layers == 0 or batch_size == 0 or num_queries == 0:
            raise ValueError(f"DetectionLoss: empty predictions {tuple(all_cls_logits.shape)}")
        if all_cls_logits.dtype in (torch.float16, torch.bfloat16):
            all_cls_logits = all_cls_logits.float()
        all_box_codes = all_box_codes.to(all_cls_logits.dtype)
        device, dtype = all_cls_logits.device, all_cls_logits.dtype

        # --- match every (sample, layer); gather flat lists of matched (layer, sample, query, label, target) ---
        layer_ids, sample_ids, query_ids, matched_labels, target_codes = [], [], [], [], []
        num_gt_total = 0
        for b in range(batch_size):
            boxes_b, labels_b = self._checked_targets(b, gt_boxes[b], gt_labels[b], num_queries)
            boxes_b = boxes_b.to(device=device, dtype=dtype)
            labels_b = labels_b.to(device=device, dtype=torch.int64)
            codes_b = encode_boxes(boxes_b)  # (n_b, 10)
            num_gt_total += int(boxes_b.shape[0])
            matches = self.matcher.match_layers(
                all_cls_logits[:, b].detach(), all_box_codes[:, b].detach(), labels_b, codes_b
            )  # (L, B, Q, .) -> (L, Q, .) for sample b
            for layer, (query_idx, gt_idx) in enumerate(matches):
                layer_ids.append(torch.full_like(query_idx, layer))
                sample_ids.append(torch.full_like(query_idx, b))
                query_ids.append(query_idx)
                matched_labels.append(labels_b[gt_idx])
                target_codes.append(codes_b[gt_idx])
        layer_ids = torch.cat(layer_ids)  # (M,), M = L * sum_b n_b matched queries
        sample_ids = torch.cat(sample_ids)
        query_ids = torch.cat(query_ids)
        matched_labels = torch.cat(matched_labels)
        target_codes = torch.cat(target_codes)  # (M, 10)

        normaliser = self._normaliser(num_gt_total, device, dtype)

        # --- classification: focal over every query and class, one-hot at the matched (query, GT class) ---
        cls_targets = torch.zeros_like(all_cls_logits)  # (L, B, Q, C)
        cls_targets[layer_ids, sample_ids, query_ids, matched_labels] = 1.0
        focal = focal_loss(all_cls_logits, cls_targets, self.alpha, self.gamma, reduction="none")
        cls_per_layer = focal.sum(dim=(1, 2, 3))  # (L, B, Q, C) -> (L,)

        # --- regression: weighted L1 on the matched queries ---
        matched_codes = all_box_codes[layer_ids, sample_ids, query_ids]  # (L, B, Q, 10) -> (M, 10)
        code_weights = torch.tensor(self.code_weights, dtype=dtype, device=device)  # (10,)
        l1_rows = ((matched_codes - target_codes).abs() * code_weights).sum(dim=-1)  # (M, 10) -> (M,)
        # Start from 0 * sum(codes), not a fresh zero: when no sample of this rank has GT, the regression branch
        # must still be in the autograd graph, or DDP (find_unused_parameters=False) stalls on its parameters.
        bbox_per_layer = (all_box_codes.sum(dim=(1, 2, 3)) * 0.0).index_add(0, layer_ids, l1_rows)  # (L,)

        cls_per_layer = self.cls_weight * cls_per_layer / normaliser
        bbox_per_layer = self.reg_weight * bbox_per_layer / normaliser
        losses: dict[str, torch.Tensor] = {}
        for layer in range(num_layers):
            losses[f"loss_cls_layer{layer}"] = cls_per_layer[layer]
            losses[f"loss_bbox_layer{layer}"] = bbox_per_layer[layer]
        losses["loss"] = cls_per_layer.sum() + bbox_per_layer.sum()
        return losses

    def _normaliser(self, num_gt_total: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """max(N, 1) with N the batch's GT count or what num_gt_normaliser makes of it; a scalar tensor."""
        if self.num_gt_normaliser is None:
            value = torch.tensor(float(num_gt_total), device=device, dtype=dtype)
        elif callable(self.num_gt_normaliser):
            count = torch.tensor(float(num_gt_total), device=device, dtype=torch.float32)
            value = torch.as_tensor(self.num_gt_normaliser(count), device=device, dtype=dtype)
            if value.numel() != 1:
                raise ValueError(
                    f"DetectionLoss: num_gt_normaliser must return a scalar, got shape {tuple(value.shape)}"
                )
            value = value.reshape(())  # (1,) or () -> ()
        else:
            value = torch.tensor(self.num_gt_normaliser, device=device, dtype=dtype)
        return value.detach().clamp(min=1.0)

    def _checked_targets(
        self, b: int, boxes: torch.Tensor, labels: torch.Tensor, num_queries: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if boxes.dim() != 2 or boxes.shape[1] != BOX_DIM:
            raise ValueError(f"DetectionLoss: gt_boxes[{b}] must be (n, {BOX_DIM}), got {tuple(boxes.shape)}")
        if labels.shape != (boxes.shape[0],):
            raise ValueError(
                f"DetectionLoss: gt_labels[{b}] must be ({boxes.shape[0]},) to go with gt_boxes[{b}], got "
                f"{tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"DetectionLoss: gt_labels[{b}] must be an integer tensor, got {labels.dtype}")
        if boxes.shape[0] == 0:
            return boxes, labels
        finite = torch.isfinite(boxes).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0])
            raise ValueError(
                f"DetectionLoss: gt_boxes[{b}] row {row} is not finite ({boxes[row].tolist()}); unknown velocities "
                f"must be stored as 0 (flagged by gt_velocity_valid), never NaN"
            )
        positive = (boxes[:, 3:6] > 0).all(dim=1)
        if not bool(positive.all()):
            row = int((~positive).nonzero()[0])
            raise ValueError(
                f"DetectionLoss: gt_boxes[{b}] row {row} has a non-positive size w, l, h = {boxes[row, 3:6].tolist()}"
            )
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"DetectionLoss: gt_labels[{b}] must be in [0, {self.num_classes}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        if boxes.shape[0] > num_queries:
            raise ValueError(
                f"DetectionLoss: sample {b} has {boxes.shape[0]} GT boxes but there are only {num_queries} queries; "
                f"one-to-one matching needs num_queries >= GT boxes per sample"
            )
        return boxes, labels


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------
def decode_predictions(
    cls_logits: torch.Tensor,
    box_codes: torch.Tensor,
    max_num: int = 300,
    score_threshold: float | None = None,
    post_center_range_m: Sequence[float] | None = DEFAULT_POST_CENTER_RANGE_M,
) -> list[dict[str, torch.Tensor]]:
    """NMS-free decoding of the last decoder layer: top-k over all (query, class) scores.

    Each query may contribute several (class, score) pairs, as in the reference: the top ``max_num`` of the
    ``Q * C`` sigmoid scores are kept, ``label = index % C`` and ``query = index // C``.

    Args:
        cls_logits: (B, Q, C) logits.
        box_codes: (B, Q, 10) box codes, metric (module docstring).
        max_num: k of the top-k (clipped to Q * C).
        score_threshold: if given, keep only scores strictly above it.
        post_center_range_m: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` metres in the boxes' frame; boxes
            whose centre lies outside (bounds inclusive) are dropped. None keeps all.
    Returns:
        B dicts, in descending score order: ``boxes`` (k, 9) ``[x, y, z, w, l, h, yaw, vx, vy]`` (ego frame),
        ``scores`` (k,), ``labels`` (k,) int64, ``query_idx`` (k,) int64 (which query each box came from).
    """
    if cls_logits.dim() != 3:
        raise ValueError(f"decode_predictions: cls_logits must be (B, Q, C), got {tuple(cls_logits.shape)}")
    batch_size, num_queries, num_classes = cls_logits.shape
    if box_codes.shape != (batch_size, num_queries, CODE_SIZE):
        raise ValueError(
            f"decode_predictions: box_codes must be {(batch_size, num_queries, CODE_SIZE)}, got "
            f"{tuple(box_codes.shape)}"
        )
    if max_num < 1:
        raise ValueError(f"decode_predictions: max_num must be >= 1, got {max_num}")
    if post_center_range_m is not None and len(post_center_range_m) != 6:
        raise ValueError(
            f"decode_predictions: post_center_range_m must be (x_min, y_min, z_min, x_max, y_max, z_max), got "
            f"{post_center_range_m}"
        )
    k = min(int(max_num), num_queries * num_classes)
    scores_flat = torch.sigmoid(cls_logits).flatten(1)  # (B, Q, C) -> (B, Q*C), index = query * C + class
    top_scores, top_index = scores_flat.topk(k, dim=1, sorted=True)  # (B, k)
    labels = top_index % num_classes
    query_idx = torch.div(top_index, num_classes, rounding_mode="floor")
    top_codes = torch.gather(box_codes, 1, query_idx[..., None].expand(-1, -1, CODE_SIZE))  # (B, k, 10)
    boxes = decode_box_codes(top_codes)  # (B, k, 9)

    keep = torch.ones_like(top_scores, dtype=torch.bool)  # (B, k)
    if post_center_range_m is not None:
        bounds = torch.as_tensor(post_center_range_m, dtype=boxes.dtype, device=boxes.device)
        centres = boxes[..., :3]  # (B, k, 3)
        keep &= ((centres >= bounds[:3]) & (centres <= bounds[3:])).all(dim=-1)
    if score_threshold is not None:
        keep &= top_scores > score_threshold

    results = []
    for b in range(batch_size):
        mask = keep[b]
        results.append(
            {
                "boxes": boxes[b][mask],
                "scores": top_scores[b][mask],
                "labels": labels[b][mask],
                "query_idx": query_idx[b][mask],
            }
        )
    return results
