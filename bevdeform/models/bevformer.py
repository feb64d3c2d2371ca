"""The whole detector: images + calibration -> BEV -> boxes, with a streaming API for inference.

Data path of one frame (shapes for B samples, N cameras, C = embed_dims):

    images (B, N, 3, H, W) --backbone + neck on B*N images--> L feature levels (B, N, C, H_l, W_l)
    --encoder (+ previous BEV, ego motion)--> bev (B, bev_h * bev_w, C)
    --decoder--> class logits (L_dec, B, Q, num_classes), box codes (L_dec, B, Q, 10)
    --decode_predictions (last layer)--> per sample boxes (k, 9) [x, y, z, w, l, h, yaw, vx, vy], ego frame

Temporal training (BEVFormer's): a sample holds T frames, history first. The history frames run without gradient
and in eval mode (no dropout: the BEV they hand on must be what inference will hand on) and build ``prev_bev``
recurrently, each frame from the previous one's BEV; only the current frame gets gradients and losses. Near a scene
start a frame with ``has_prev == False`` ignores the BEV before it (the encoder's per-row rule); the queue's first
frame never has a previous BEV.

Inference streams frames in scene order: :class:`StreamingBEVFormer` keeps the last BEV of every scene it is
following, keyed by scene token, and hands it to the next frame of that scene, so one frame costs one pass.

The batch format is docs/data-format.md; the interfaces between the parts docs/model.md.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bevdeform.models.attention import is_tracing_or_exporting
from bevdeform.models.head import DEFAULT_POST_CENTER_RANGE_M, decode_predictions

__all__ = ["BEVFormer", "DetectorOutput", "StreamingBEVFormer", "load_model_weights"]


@dataclass
class DetectorOutput:
    """What one frame of the detector produces.

    Attributes:
        bev: (B, bev_h * bev_w, C) BEV features of the frame (the next frame's ``prev_bev``), current ego frame.
        all_cls_logits: (L_dec, B, Q, num_classes) class logits of every decoder layer.
        all_box_codes: (L_dec, B, Q, 10) box codes of every decoder layer (``bevdeform.models.head`` layout,
            centre in metres, ego frame).
        num_visible_pairs: (B,) int64 (BEV cell, camera) pairs that see their pillar, spatial cross-attention's
            work; more than ``sca_pair_capacity`` means an export dropped pairs.
        heatmap_logits: (B, num_classes, bev_h, bev_w) the BEV heatmap head's logits when the decoder's queries
            start from them (``query_init='heatmap'``), else None.
    """

    bev: torch.Tensor
    all_cls_logits: torch.Tensor | None  # None when the decoder was skipped (history frames)
    all_box_codes: torch.Tensor | None
    num_visible_pairs: torch.Tensor | None = None
    heatmap_logits: torch.Tensor | None = None


def _check_shape(name: str, tensor: Any, expected: Sequence[int | None], meaning: str) -> None:
    """ValueError naming ``name`` unless ``tensor`` is a tensor of shape ``expected`` (None = any size)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {meaning}, got {type(tensor).__name__}")
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        shown = tuple("?" if e is None else e for e in expected)
        raise ValueError(f"{name} has shape {shape}, expected {shown} = {meaning}")


class BEVFormer(nn.Module):
    """Multi-camera 3D detector: ResNet + FPN image features, BEV encoder, object-query decoder, detection loss.

    Args:
        backbone: image backbone, ``(B*N, 3, H, W) -> list of (B*N, C_i, H_i, W_i)``, with ``strides`` (the
            stride of each output, used to check that images tile into whole feature cells).
        neck: ``list of (B*N, C_i, H_i, W_i) -> list of (B*N, C, H_l, W_l)``.
        encoder: ``BEVEncoder`` (docs/model.md).
        decoder: ``DetectionDecoder`` (docs/model.md).
        loss: ``DetectionLoss``: ``(all_cls_logits, all_box_codes, gt_boxes, gt_labels) -> dict of losses``.
        num_cameras: N, cameras per frame; inputs with another count are rejected.
        score_threshold: decoding keeps scores strictly above it; None keeps the whole top-k.
        max_detections: top-k of decoding over the Q x num_classes scores.
        post_center_range_m: decoded centres outside ``(x_min, y_min, z_min, x_max, y_max, z_max)`` (ego frame,
            metres) are dropped; None keeps all.
        bev_heatmap_head: optional training-only auxiliary head on the current frame's BEV
            (``bev_heatmap.BEVHeatmapHead``): its ``loss(bev, gt_boxes, gt_labels)`` joins the losses as
            ``loss_bev_heatmap``. Inference never runs it.
        bev_box_head: optional training-only auxiliary head (``bev_heatmap.BEVBoxRegressionHead``): its
            ``loss(bev, gt_boxes)`` (dense box regression at the centre cells) joins the losses as ``loss_bev_box``.
            Inference never runs it.
        input_frame: 'ego' (default) or 'lidar': which camera matrices and ego-motion input the batch paths
            (:meth:`forward_train`, :meth:`predict`, :class:`StreamingBEVFormer`) feed to :meth:`forward_frame`
            (docs/model.md "BEVFormer compatibility").

    ``forward(batch)`` is ``forward_train(batch)`` (so a DDP wrapper sees the training pass); inference is
    :meth:`predict` or :class:`StreamingBEVFormer`, in eval mode.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        loss: nn.Module,
        num_cameras: int,
        score_threshold: float | None = None,
        max_detections: int = 300,
        post_center_range_m: Sequence[float] | None = DEFAULT_POST_CENTER_RANGE_M,
        bev_heatmap_head: nn.Module | None = None,
        input_frame: str = "ego",
        bev_box_head: nn.Module | None = None,
    ):
        super().__init__()
        if input_frame not in ("ego", "lidar"):
            raise ValueError(f"BEVFormer: input_frame={input_frame!r}, expected 'ego' or 'lidar'")
        # "ego": the batch's ego2img and ego_prev2curr (bevdeform). "lidar" (the bevformer_v1 compatibility path):
        # the batch's lidar2img (B, T, N, 4, 4) and BEVFormer's CAN-bus vector, made from can_bus_abs_history and
        # can_bus_abs by the official delta step; the BEV and the boxes are then in the LIDAR_TOP frame.
        self.input_frame = input_frame
        if num_cameras < 1:
            raise ValueError(f"BEVFormer: num_cameras={num_cameras}, expected >= 1")
        if max_detections < 1:
            raise ValueError(f"BEVFormer: max_detections={max_detections}, expected >= 1")
        if post_center_range_m is not None and len(post_center_range_m) != 6:
            raise ValueError(
                f"BEVFormer: post_center_range_m={post_center_range_m}, expected (x_min, y_min, z_min, x_max, "
                f"y_max, z_max) or None"
            )
        self.backbone = backbone
        self.neck = neck
        self.encoder = encoder
        self.decoder = decoder
        self.loss = loss
        self.bev_heatmap_head = bev_heatmap_head
        self.bev_box_head = bev_box_head
        # The decoder's queries start at the heatmap's peaks (query_init='heatmap'): the head runs every frame.
        self.queries_from_heatmap = getattr(decoder, "query_init", "learned") == "heatmap"
        if self.queries_from_heatmap and bev_heatmap_head is None:
            raise ValueError("BEVFormer: the decoder's queries start at the BEV heatmap's peaks (query_init='heatmap') "
                             "but there is no bev_heatmap_head (model.loss.bev_heatmap_weight must be > 0)")
        self.num_cameras = int(num_cameras)
        self.score_threshold = score_threshold
        self.max_detections = int(max_detections)
        self.post_center_range_m = None if post_center_range_m is None else tuple(float(v) for v in post_center_range_m)
        strides = getattr(backbone, "strides", None)
        # Images must be a whole number of cells of the coarsest backbone map, or ego2img (for the padded image)
        # and the feature grid disagree about where a pixel lies.
        self.image_multiple = int(max(strides)) if strides else 1

    # ------------------------------------------------------------------------------------------------------------
    # One frame
    # ------------------------------------------------------------------------------------------------------------
    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone + neck on every camera image.

        Args:
            images: (B, N, 3, H, W) normalised, padded images.
        Returns:
            the neck's levels, finest first, each (B, N, C, H_l, W_l).
        """
        _check_shape("images", images, (None, self.num_cameras, 3, None, None), f"(B, N={self.num_cameras}, 3, H, W)")
        batch, cameras = images.shape[:2]
        feats = self.neck(self.backbone(images.flatten(0, 1)))  # (B, N, 3, H, W) -> (B*N, 3, H, W) -> levels
        # (B*N, C, H_l, W_l) -> (B, N, C, H_l, W_l)
        return [f.view(batch, cameras, *f.shape[1:]) for f in feats]

    def check_frame_inputs(
        self,
        images: torch.Tensor,
        ego2img: torch.Tensor,
        image_hw: torch.Tensor,
        ego_prev2curr: torch.Tensor,
        has_prev: torch.Tensor,
        prev_bev: torch.Tensor | None = None,
    ) -> None:
        """Checks of one frame's inputs; ValueError naming the tensor and what was expected.

        The shape checks always run; the check of the ``image_hw`` values is skipped while tracing, compiling or
        exporting (`attention.is_tracing_or_exporting`): reading a value into Python is a branch on data that
        torch.export refuses and that a trace would bake in as a constant.
        """
        n = self.num_cameras
        _check_shape("images", images, (None, None, 3, None, None), f"(B, N={n}, 3, H, W)")
        batch, cameras, _, height, width = images.shape
        if cameras != n:
            raise ValueError(
                f"images has {cameras} cameras (shape {tuple(images.shape)}), the model expects N={n}"
            )
        if height % self.image_multiple or width % self.image_multiple:
            raise ValueError(
                f"images are {height}x{width} pixels; H and W must be multiples of {self.image_multiple} "
                f"(the backbone's largest stride): pad right/bottom as the dataset does (pad_multiple)"
            )
        _check_shape("ego2img", ego2img, (batch, n, 4, 4), f"(B={batch}, N={n}, 4, 4) to match images")
        _check_shape("image_hw", image_hw, (batch, n, 2), f"(B={batch}, N={n}, 2) to match images")
        _check_shape("ego_prev2curr", ego_prev2curr, (batch, 4, 4), f"(B={batch}, 4, 4) to match images")
        _check_shape("has_prev", has_prev, (batch,), f"(B={batch},) to match images")
        if image_hw.numel() and not is_tracing_or_exporting() and (
            bool((image_hw[..., 0] > height).any()) or bool((image_hw[..., 1] > width).any())
            or bool((image_hw <= 0).any())
        ):
            raise ValueError(
                f"image_hw holds (H, W) sizes outside (0, {height}] x (0, {width}] (the padded image size "
                f"of images): got values from {image_hw.amin().item()} to {image_hw.amax().item()}; expected the "
                f"unpadded (height, width) of each camera image"
            )
        if prev_bev is not None:
            cells = getattr(self.decoder, "bev_h", 0) * getattr(self.decoder, "bev_w", 0)
            channels = getattr(self.decoder, "embed_dims", None)
            _check_shape("prev_bev", prev_bev, (batch, cells or None, channels),
                         f"(B={batch}, bev_h*bev_w={cells}, C={channels})")

    def forward_frame(
        self,
        images: torch.Tensor,
        ego2img: torch.Tensor,
        image_hw: torch.Tensor,
        prev_bev: torch.Tensor | None,
        ego_prev2curr: torch.Tensor,
        has_prev: torch.Tensor,
        run_decoder: bool = True,
        sca_pair_capacity: int | None = None,
        can_bus: torch.Tensor | None = None,
    ) -> DetectorOutput:
        """One frame through the network (gradients as the caller's grad mode says).

        Args:
            images: (B, N, 3, H, W) normalised, padded images.
            ego2img: (B, N, 4, 4) ego -> pixels of the padded image.
            image_hw: (B, N, 2) unpadded (H, W) of each camera image.
            prev_bev: (B, bev_h * bev_w, C) BEV of the previous frame in its own ego frame, or None (no row has one).
            ego_prev2curr: (B, 4, 4) previous ego frame -> current ego frame.
            has_prev: (B,) bool; rows with False ignore ``prev_bev``.
            run_decoder: False skips the decoder (history frames need only the BEV); the logits and codes of the
                output are then None.
            sca_pair_capacity: None lists spatial cross-attention's (BEV cell, camera) pairs in a list sized to the
                batch's visible count (data dependent); an int K in [1, N * Q] gives a list of fixed length K, the
                static shapes torch.export and ONNX need, with the same result while every visible pair fits
                (``attention.find_visible_pairs``: a ValueError in eager mode when they do not; pairs dropped when
                tracing or exporting, and ``num_visible_pairs`` > K says so).
            can_bus: (B, 18) BEVFormer's CAN-bus vector after the detector's delta step, for an encoder built with
                the bevformer_v1 options that read it (``encoder.needs_can_bus``); None otherwise. Rows without a
                previous BEV get its deltas ([0:3] and [17]) zeroed, as the official detector does at a scene start.
        Returns:
            :class:`DetectorOutput`.

        A row without a previous BEV (``prev_bev`` None, or ``has_prev`` False) is encoded exactly as a scene
        start: ``has_prev`` False and an identity ``ego_prev2curr``, whatever the data said. The first frame of a
        training queue in mid-scene and a streaming cold start in mid-scene then look like the scene starts the
        model was trained on (the data contract gives scene starts an identity motion).
        """
        self.check_frame_inputs(images, ego2img, image_hw, ego_prev2curr, has_prev, prev_bev=prev_bev)
        has_prev = has_prev.bool()
        if prev_bev is None:
            has_prev = torch.zeros_like(has_prev)
        identity = torch.eye(4, dtype=ego_prev2curr.dtype, device=ego_prev2curr.device)
        ego_prev2curr = torch.where(has_prev[:, None, None], ego_prev2curr, identity)  # (B, 4, 4)
        encoder_kwargs = {}
        if can_bus is not None:
            _check_shape("can_bus", can_bus, (images.shape[0], 18), f"(B={images.shape[0]}, 18) CAN-bus vectors")
            delta_dims = torch.zeros(18, dtype=torch.bool, device=can_bus.device)
            delta_dims[0:3] = True
            delta_dims[17] = True
            # (B, 1) & (18,) -> (B, 18): the deltas of rows without a previous BEV are zeroed
            scene_start = (~has_prev)[:, None].to(can_bus.device) & delta_dims
            encoder_kwargs["can_bus"] = torch.where(scene_start, torch.zeros_like(can_bus), can_bus)
        feats = self.extract_features(images)
        # The padded size is the images' own: no need for the encoder to infer it from the feature size.
        padded_image_hw = (int(images.shape[-2]), int(images.shape[-1]))
        pairs = self.encoder.visible_pairs(ego2img, image_hw, padded_image_hw, capacity=sca_pair_capacity)
        bev = self.encoder(feats, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev, padded_image_hw, pairs=pairs,
                           **encoder_kwargs)
        if not run_decoder:
            return DetectorOutput(bev=bev, all_cls_logits=None, all_box_codes=None, num_visible_pairs=pairs.num_pairs)
        heatmap_logits = None
        if self.queries_from_heatmap:
            heatmap_logits = self.bev_heatmap_head(bev)  # (B, K, bev_h, bev_w): the queries start at its peaks
        all_cls_logits, all_box_codes = self.decoder(bev, heatmap_logits)
        return DetectorOutput(bev=bev, all_cls_logits=all_cls_logits, all_box_codes=all_box_codes,
                              num_visible_pairs=pairs.num_pairs, heatmap_logits=heatmap_logits)

    def decode(self, all_cls_logits: torch.Tensor, all_box_codes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Boxes from the last decoder layer: B dicts ``boxes (k, 9)`` ego frame, ``scores (k,)``, ``labels (k,)``
        int64, ``query_idx (k,)``, in descending score order (see ``head.decode_predictions``)."""
        return decode_predictions(
            all_cls_logits[-1].float(),
            all_box_codes[-1].float(),
            max_num=self.max_detections,
            score_threshold=self.score_threshold,
            post_center_range_m=self.post_center_range_m,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Batches with a temporal queue (docs/data-format.md)
    # ------------------------------------------------------------------------------------------------------------
    def check_batch(self, batch: Mapping[str, Any], with_targets: bool) -> None:
        """Shape checks of a collated batch; ValueError naming the key and the expected shape."""
        keys = ("images", "ego2img", "image_hw", "ego_prev2curr", "has_prev")
        if self.input_frame == "lidar":
            keys += ("lidar2img", "can_bus_abs", "can_bus_abs_history")
        for key in keys:
            if key not in batch:
                hint = (" (the bevformer_v1 model needs data.bevformer_v1_inputs: true)"
                        if key in ("lidar2img", "can_bus_abs", "can_bus_abs_history") else "")
                raise ValueError(f"batch has no {key!r}{hint} (keys: {sorted(batch)}); see docs/data-format.md")
        images = batch["images"]
        n = self.num_cameras
        _check_shape("batch['images']", images, (None, None, None, 3, None, None), f"(B, T, N={n}, 3, H, W)")
        batch_size, frames, cameras = images.shape[:3]
        if cameras != n:
            raise ValueError(
                f"batch['images'] has {cameras} cameras (shape {tuple(images.shape)}), the model expects N={n}"
            )
        if frames < 1 or batch_size < 1:
            raise ValueError(f"batch['images'] has shape {tuple(images.shape)}: B and T must be >= 1")
        bt = f"B={batch_size}, T={frames}"
        _check_shape("batch['ego2img']", batch["ego2img"], (batch_size, frames, n, 4, 4), f"({bt}, N={n}, 4, 4)")
        _check_shape("batch['image_hw']", batch["image_hw"], (batch_size, frames, n, 2), f"({bt}, N={n}, 2)")
        _check_shape("batch['ego_prev2curr']", batch["ego_prev2curr"], (batch_size, frames, 4, 4), f"({bt}, 4, 4)")
        _check_shape("batch['has_prev']", batch["has_prev"], (batch_size, frames), f"({bt})")
        if self.input_frame == "lidar":
            _check_shape("batch['lidar2img']", batch["lidar2img"], (batch_size, frames, n, 4, 4),
                         f"({bt}, N={n}, 4, 4)")
            _check_shape("batch['can_bus_abs']", batch["can_bus_abs"], (batch_size, 18), f"(B={batch_size}, 18)")
            _check_shape("batch['can_bus_abs_history']", batch["can_bus_abs_history"], (batch_size, frames - 1, 18),
                         f"(B={batch_size}, T-1={frames - 1}, 18)")
        if with_targets:
            for key in ("gt_boxes", "gt_labels") + (("gt_boxes_lidar",) if self.input_frame == "lidar" else ()):
                value = batch.get(key)
                if not isinstance(value, (list, tuple)) or len(value) != batch_size:
                    raise ValueError(
                        f"batch[{key!r}] must be a list of B={batch_size} tensors (one per sample), got "
                        f"{type(value).__name__}{'' if value is None else f' of length {len(value)}'}"
                    )

    def _frame(self, batch: Mapping[str, Any], t: int) -> tuple[torch.Tensor, ...]:
        """Frame ``t`` of the queue: images (B, N, 3, H, W), ego2img, image_hw, ego_prev2curr, has_prev (the
        'ego' frame). With ``input_frame='lidar'`` the camera matrices are ``lidar2img`` of that frame."""
        cameras = batch["lidar2img"] if self.input_frame == "lidar" else batch["ego2img"]
        return (
            batch["images"][:, t],
            cameras[:, t],
            batch["image_hw"][:, t],
            batch["ego_prev2curr"][:, t],
            batch["has_prev"][:, t].bool(),
        )

    def _frame_can_bus(self, batch: Mapping[str, Any], t: int) -> dict[str, torch.Tensor]:
        """``{'can_bus': (B, 18)}`` for frame ``t`` of the queue ('lidar' frame; empty for 'ego'): the official
        detector's delta step (``bevdeform.compat.can_bus.official_can_bus_delta_masked``) between frame t and the
        frame before it in the queue, zeroed where ``has_prev`` is False, computed in float64."""
        if self.input_frame != "lidar":
            return {}
        from bevdeform.compat.can_bus import official_can_bus_delta_masked

        frames = batch["images"].shape[1]
        # (B, T-1, 18) history + (B, 18) current -> (B, T, 18), absolute values
        absolute = torch.cat([batch["can_bus_abs_history"], batch["can_bus_abs"][:, None]], dim=1).double()
        t = t % frames
        previous = absolute[:, t - 1] if t > 0 else absolute[:, t]
        has_prev = batch["has_prev"][:, t].bool() if t > 0 else torch.zeros_like(batch["has_prev"][:, t].bool())
        return {"can_bus": official_can_bus_delta_masked(absolute[:, t], previous, has_prev)}

    def history_bev(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The BEV of the frame before the current one, built recurrently over the queue's history frames.

        Runs without gradient and in eval mode (restored afterwards). Frames that no later frame depends on are
        skipped: the chain starts at the last history frame where no row has a previous frame (or at frame 0).

        Returns:
            (B, bev_h * bev_w, C) or None when T == 1 or no row of the current frame uses it.
        """
        has_prev = batch["has_prev"].bool()  # (B, T)
        frames = has_prev.shape[1]
        if frames == 1 or not bool(has_prev[:, -1].any()):
            return None
        start = 0
        for t in range(frames - 2, 0, -1):
            if not bool(has_prev[:, t].any()):
                start = t
                break
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                # The chain's first frame gets no previous BEV (nothing before it is in the queue, or needed), so
                # forward_frame encodes it as a scene start.
                prev_bev = None
                for t in range(start, frames - 1):
                    images, ego2img, image_hw, ego_prev2curr, frame_has_prev = self._frame(batch, t)
                    out = self.forward_frame(
                        images, ego2img, image_hw, prev_bev, ego_prev2curr, frame_has_prev, run_decoder=False,
                        **self._frame_can_bus(batch, t)
                    )
                    prev_bev = out.bev
        finally:
            self.train(was_training)
        return prev_bev

    def forward_train(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of the current (last) frame of every sample; history frames give the previous BEV, no gradient.

        Args:
            batch: docs/data-format.md, with ``gt_boxes`` (B tensors (n_b, 9), ego frame) and ``gt_labels``.
        Returns:
            ``DetectionLoss``'s dict: ``loss_cls_layer{i}``, ``loss_bbox_layer{i}`` and their sum ``loss``; with a
            ``bev_heatmap_head`` also ``loss_bev_heatmap``, with a ``bev_box_head`` ``loss_bev_box``, included in
            ``loss``.
        """
        self.check_batch(batch, with_targets=True)
        prev_bev = self.history_bev(batch)
        images, ego2img, image_hw, ego_prev2curr, has_prev = self._frame(batch, -1)
        out = self.forward_frame(images, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev,
                                 **self._frame_can_bus(batch, -1))
        # The targets live in the frame the model predicts in: a lidar-frame model (input_frame 'lidar', BEVFormer's
        # published checkpoints) learns from the same boxes in the keyframe LIDAR_TOP frame.
        gt_boxes = batch["gt_boxes_lidar"] if self.input_frame == "lidar" else batch["gt_boxes"]
        losses = self.loss(out.all_cls_logits, out.all_box_codes, gt_boxes, batch["gt_labels"])
        if self.bev_heatmap_head is not None:
            losses["loss_bev_heatmap"] = self.bev_heatmap_head.loss(out.bev, gt_boxes, batch["gt_labels"],
                                                                    logits=out.heatmap_logits)
            losses["loss"] = losses["loss"] + losses["loss_bev_heatmap"]
        if self.bev_box_head is not None:
            losses["loss_bev_box"] = self.bev_box_head.loss(out.bev, gt_boxes)
            losses["loss"] = losses["loss"] + losses["loss_bev_box"]
        return losses

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """:meth:`forward_train`."""
        return self.forward_train(batch)

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Detections for the current (last) frame of every sample, its history frames building the previous BEV.

        Call in eval mode. For frames streamed one batch after another (T = 1) use :class:`StreamingBEVFormer`,
        which carries the BEV between calls.

        Returns:
            B dicts: ``boxes`` (k, 9) ``[x, y, z, w, l, h, yaw, vx, vy]`` in the current ego frame, ``scores``
            (k,), ``labels`` (k,) int64, ``query_idx`` (k,) int64; descending scores.
        """
        self.check_batch(batch, with_targets=False)
        prev_bev = self.history_bev(batch)
        images, ego2img, image_hw, ego_prev2curr, has_prev = self._frame(batch, -1)
        out = self.forward_frame(images, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev,
                                 **self._frame_can_bus(batch, -1))
        return self.decode(out.all_cls_logits, out.all_box_codes)


class StreamingBEVFormer:
    """Frame-by-frame inference with the previous BEV cached per scene: what a vehicle runs, what evaluation uses.

    Each row of a :meth:`step` is one frame of the scene named by its scene token. The cache keeps, per scene
    token, the BEV of the last frame seen; a row uses it when its ``has_prev`` is True and the cache holds its
    scene, else it starts cold (a new scene, a scene start, or a scene evicted from the cache). Rows of one call
    that share a scene token are consecutive frames of that scene, in row order (what a scene-ordered loader
    with batch size > 1 yields): they are run one after the other, rows of different scenes together.

    Args:
        model: the detector, put in eval mode by this class.
        max_cached_scenes: scenes kept; the least recently stepped one is dropped beyond that (one BEV each:
            bev_h * bev_w * C floats, 2.5 MB for tiny, 41 MB for base).
    """

    def __init__(self, model: BEVFormer, max_cached_scenes: int = 16):
        if max_cached_scenes < 1:
            raise ValueError(f"StreamingBEVFormer: max_cached_scenes={max_cached_scenes}, expected >= 1")
        self.model = model.eval()
        self.max_cached_scenes = int(max_cached_scenes)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # scene token -> (bev_h * bev_w, C)
        # scene token -> (18,) absolute CAN-bus vector of the cached frame (input_frame 'lidar' only)
        self._can_bus_cache: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget every cached BEV (the next frame of any scene starts cold)."""
        self._cache.clear()
        self._can_bus_cache.clear()

    def cached_bev(self, scene_token: str) -> torch.Tensor | None:
        """The cached BEV (bev_h * bev_w, C) of the last frame stepped in this scene, or None."""
        return self._cache.get(scene_token)

    @property
    def cached_scenes(self) -> list[str]:
        """Scene tokens in the cache, least recently stepped first."""
        return list(self._cache)

    @torch.no_grad()
    def step(
        self,
        images: torch.Tensor,
        ego2img: torch.Tensor,
        image_hw: torch.Tensor,
        ego_prev2curr: torch.Tensor,
        has_prev: torch.Tensor,
        scene_tokens: Sequence[str],
        can_bus_abs: torch.Tensor | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Detect in one frame per row and update the cache.

        Args:
            images: (B, N, 3, H, W) normalised, padded images.
            ego2img: (B, N, 4, 4); image_hw: (B, N, 2); ego_prev2curr: (B, 4, 4) motion from the scene's previous
                frame; has_prev: (B,) bool, False at a scene start (resets that scene's cache entry).
            scene_tokens: B strings.
            can_bus_abs: (B, 18) BEVFormer's absolute CAN-bus vectors, required by a model with
                ``input_frame='lidar'`` (then ``ego2img`` holds lidar2img): the official delta step is taken against
                the vector cached with the scene's previous BEV, as the official detector's ``prev_frame_info``.
        Returns:
            B dicts as :meth:`BEVFormer.predict` (boxes in each row's current ego frame).
        """
        model = self.model
        if model.training:
            model.eval()  # a caller may have trained in between; streaming is inference
        model.check_frame_inputs(images, ego2img, image_hw, ego_prev2curr, has_prev)
        batch_size = images.shape[0]
        if isinstance(scene_tokens, str) or len(scene_tokens) != batch_size:
            raise ValueError(
                f"scene_tokens must be a list of B={batch_size} strings (one per row of images), got {scene_tokens!r}"
            )
        has_prev = has_prev.bool()
        if model.input_frame == "lidar":
            _check_shape("can_bus_abs", can_bus_abs, (batch_size, 18), f"(B={batch_size}, 18) absolute CAN-bus vectors")

        # Waves: the k-th occurrence of every scene token in the call, so a wave holds each scene at most once and
        # each wave can read the BEV the previous wave left in the cache.
        waves: list[list[int]] = []
        seen: dict[str, int] = {}
        for row, token in enumerate(scene_tokens):
            occurrence = seen.get(token, 0)
            seen[token] = occurrence + 1
            if occurrence == len(waves):
                waves.append([])
            waves[occurrence].append(row)

        has_prev_list = has_prev.tolist()
        results: list[dict[str, torch.Tensor] | None] = [None] * batch_size
        for rows in waves:
            tokens = [scene_tokens[r] for r in rows]
            cached = [self._cache.get(t) if has_prev_list[r] else None for r, t in zip(rows, tokens)]
            use_prev = torch.tensor([c is not None for c in cached], dtype=torch.bool, device=images.device)
            prev_bev = None
            if bool(use_prev.any()):
                template = next(c for c in cached if c is not None)
                # Rows without a usable BEV get zeros, which the encoder ignores (their has_prev is False).
                prev_bev = torch.stack([c if c is not None else torch.zeros_like(template) for c in cached])
            inputs = (images, ego2img, image_hw, ego_prev2curr)
            if rows != list(range(batch_size)):  # the common single wave needs no copy
                index = torch.tensor(rows, dtype=torch.int64, device=images.device)
                inputs = tuple(x.index_select(0, index) for x in inputs)
            wave_images, wave_ego2img, wave_image_hw, wave_ego_prev2curr = inputs
            extra = {}
            if model.input_frame == "lidar":
                from bevdeform.compat.can_bus import official_can_bus_delta_masked

                current = can_bus_abs[rows].double()  # (W, 18)
                previous = torch.stack([self._can_bus_cache.get(t, current[i]) if cached[i] is not None else current[i]
                                        for i, t in enumerate(tokens)])
                extra["can_bus"] = official_can_bus_delta_masked(current, previous, use_prev)
            # A cache miss with has_prev True (new token, evicted scene) starts cold: forward_frame treats a row
            # without a previous BEV as a scene start.
            out = model.forward_frame(wave_images, wave_ego2img, wave_image_hw, prev_bev, wave_ego_prev2curr, use_prev,
                                      **extra)
            for position, (row, token) in enumerate(zip(rows, tokens)):
                self._cache[token] = out.bev[position]
                self._cache.move_to_end(token)
                if model.input_frame == "lidar":
                    self._can_bus_cache[token] = can_bus_abs[row].double()
            while len(self._cache) > self.max_cached_scenes:
                evicted, _ = self._cache.popitem(last=False)
                self._can_bus_cache.pop(evicted, None)
            for position, detections in enumerate(model.decode(out.all_cls_logits, out.all_box_codes)):
                results[rows[position]] = detections
        return results  # type: ignore[return-value]

    def step_batch(self, batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        """:meth:`step` on the current (last) frame of a collated batch (docs/data-format.md); earlier frames of a
        queue are ignored: the cache stands in for them."""
        lidar = self.model.input_frame == "lidar"
        keys = ("images", "ego2img", "image_hw", "ego_prev2curr", "has_prev", "scene_token")
        for key in keys + (("lidar2img", "can_bus_abs") if lidar else ()):
            if key not in batch:
                raise ValueError(f"batch has no {key!r} (keys: {sorted(batch)}); see docs/data-format.md")
        if batch["images"].dim() != 6:
            raise ValueError(
                f"batch['images'] has shape {tuple(batch['images'].shape)}, expected (B, T, N, 3, H, W)"
            )
        cameras = batch["lidar2img"] if lidar else batch["ego2img"]
        return self.step(
            batch["images"][:, -1],
            cameras[:, -1],
            batch["image_hw"][:, -1],
            batch["ego_prev2curr"][:, -1],
            batch["has_prev"][:, -1],
            batch["scene_token"],
            can_bus_abs=batch["can_bus_abs"] if lidar else None,
        )


def load_model_weights(
    model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], key_prefix: str = ""
) -> None:
    """Load a state dict into ``model`` after checking it matches exactly (keys and shapes).

    Args:
        model: the module to load into.
        path_or_state_dict: a ``{name: tensor}`` mapping, or a file saved with ``torch.save`` holding one, or a
            checkpoint dict with it under ``'state_dict'`` (Lightning). Files are read with ``weights_only=True``
            (no arbitrary pickled objects are executed).
        key_prefix: only keys starting with it are used, with it removed (e.g. ``'model.'`` for a Lightning
            module that holds the detector as ``self.model``).
    Raises:
        ValueError: the state dict does not match the model (weights of another config): the message lists the
            missing, unexpected and mis-shaped keys. Nothing is loaded then.
    """
    source_name = "the state dict"
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source_name = repr(os.fspath(path_or_state_dict))
        if not os.path.isfile(path_or_state_dict):
            raise FileNotFoundError(f"load_model_weights: no file at {source_name}")
        try:
            loaded = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        except Exception as error:  # corrupt file or pickled objects: say which file
            raise ValueError(
                f"load_model_weights: cannot read {source_name} as a tensor state dict: {error}"
            ) from error
    else:
        loaded = path_or_state_dict
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"load_model_weights: {source_name} is not a {{name: tensor}} state dict")
    state = {k[len(key_prefix):]: v for k, v in loaded.items() if k.startswith(key_prefix)}
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mis_shaped = [
        f"{k}: saved {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if missing or unexpected or mis_shaped:
        problems = []
        for title, items in (("mis-shaped", mis_shaped), ("missing", missing), ("unexpected", unexpected)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                problems.append(f"{title} keys: {shown}")
        raise ValueError(
            f"load_model_weights: {source_name} does not match the model (saved from another config?); "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
