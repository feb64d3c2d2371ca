"""The LightningModule: a detector, its optimisation, its logging and its validation metrics.

The module is handed a built detector (``bevdeform.config.build_model`` builds it from a config) and plain
numbers; it never reads a config. What it adds to the detector:

- **Optimisation** (BEVFormer's recipe): AdamW over two parameter groups, the image backbone at
  ``lr * backbone_lr_mult`` and everything else at ``lr``, weight decay on all of them; a learning-rate factor
  that rises linearly from ``warmup_ratio`` over ``warmup_steps`` optimiser steps and follows a cosine from 1 down to
  ``min_lr_ratio`` over the whole run (mmcv's ``CosineAnnealing`` with a linear warm-up), stepped once per
  optimiser step. Gradient clipping belongs to the Trainer (``gradient_clip_val``).
- **Logging**: every loss of ``BEVFormer.forward_train`` as ``train/<name>`` (the sum as ``train/loss``, on the
  progress bar) and the learning rate of both groups.
- **Validation**: the streaming detector (``StreamingBEVFormer``) runs over the frames of each scene in order, the
  BEV carried from one frame to the next exactly as on a vehicle; the loader keeps each scene whole on one rank
  (``SceneOrderedDistributedSampler``). Each frame's boxes go to the global frame with the frame's own ego pose
  (``boxes_to_results``). At the end of the epoch the predictions of all ranks are gathered on rank 0, written as
  a nuScenes results JSON into ``<results_dir>/<epoch>-<step>/`` and scored by the devkit's ``DetectionEval``;
  the metrics are broadcast so that every rank logs the same ``val/NDS``, ``val/mAP`` (and the TP errors and the
  per-class APs).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning
import torch
from torch import nn

from bevdeform.data.infos import CLASS_NAMES
from bevdeform.evaluation import (ATTRIBUTE_RULES, attribute_names_of, boxes_to_results, evaluate_results,
                                  lidar_boxes_to_results, write_results_json)
from bevdeform.models.bevformer import StreamingBEVFormer

__all__ = ["BEVFormerModule", "EvaluationTarget", "WarmupCosineFactor", "optimizer_param_groups"]


class WarmupCosineFactor:
    """Learning-rate factor at optimiser step ``step`` (a ``LambdaLR`` lambda; plain numbers, so its state dict
    loads with ``torch.load(weights_only=True)``).

    ``cosine(step) = min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * step / total_steps)) / 2`` over the whole run;
    during the first ``warmup_steps`` steps it is multiplied by ``1 - (1 - step / warmup_steps) * (1 - warmup_ratio)``,
    which rises linearly from ``warmup_ratio`` to 1 (mmcv's ``CosineAnnealingLrUpdaterHook`` with ``warmup='linear'``,
    the schedule of the BEVFormer configs). Past ``total_steps`` the factor stays at ``min_lr_ratio``.
    ``total_steps`` may be set after construction (None until then, which reads as "step 0 of any length").
    """

    def __init__(self, total_steps: int | None, warmup_steps: int, warmup_ratio: float, min_lr_ratio: float):
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"WarmupCosineFactor: total_steps={total_steps}, expected >= 1 or None")
        if warmup_steps < 0:
            raise ValueError(f"WarmupCosineFactor: warmup_steps={warmup_steps}, expected >= 0")
        if not 0.0 < warmup_ratio <= 1.0:
            raise ValueError(f"WarmupCosineFactor: warmup_ratio={warmup_ratio}, expected in (0, 1]")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"WarmupCosineFactor: min_lr_ratio={min_lr_ratio}, expected in [0, 1]")
        self.total_steps = None if total_steps is None else int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_ratio = float(warmup_ratio)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        progress = 0.0 if self.total_steps is None else min(step, self.total_steps) / self.total_steps
        factor = self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if step < self.warmup_steps:
            factor *= 1.0 - (1.0 - step / self.warmup_steps) * (1.0 - self.warmup_ratio)
        return factor


def optimizer_param_groups(model: nn.Module, lr: float, weight_decay: float,
                           backbone_lr_mult: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``model.backbone``'s trainable parameters at ``lr * backbone_lr_mult``, the rest at
    ``lr``; frozen parameters (``requires_grad == False``) are left out. Empty groups are dropped."""
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    backbone_params, other_params = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (backbone_params if id(parameter) in backbone_ids else other_params).append(parameter)
    groups = [
        {"name": "backbone", "params": backbone_params, "lr": lr * backbone_lr_mult, "weight_decay": weight_decay},
        {"name": "others", "params": other_params, "lr": lr, "weight_decay": weight_decay},
    ]
    return [group for group in groups if group["params"]]


@dataclass
class EvaluationTarget:
    """What validation predicts on and scores against.

    Attributes:
        data_root: the nuScenes data root (tables under ``<data_root>/<version>``).
        version: e.g. ``v1.0-trainval``, ``v1.0-mini``, ``v1.0-synthetic``.
        split: the evaluated split (``val``, ``mini_val``, ``synthetic_val``): the validation loader must yield
            exactly its samples.
        results_dir: where validation writes ``results_nusc.json``, ``metrics.json`` (flat) and the devkit's
            ``metrics_summary.json``.
        per_epoch_subfolders: into ``results_dir/epochEEE-stepSSSSSSS/`` (training), else into ``results_dir``
            itself (a one-off evaluation).
        score: False writes the results file only (a split without annotations, e.g. v1.0-test); the metrics are
            then empty.
    """

    data_root: str
    version: str
    split: str
    results_dir: str
    per_epoch_subfolders: bool = True
    score: bool = True


class BEVFormerModule(lightning.LightningModule):
    """Training and validation of a ``BEVFormer`` (see the module docstring).

    Args:
        model: the detector (``bevdeform.config.build_model``).
        lr, weight_decay, backbone_lr_mult: AdamW; the backbone learns at ``lr * backbone_lr_mult``.
        warmup_steps, warmup_ratio, min_lr_ratio: :class:`WarmupCosineFactor`; the cosine spans the Trainer's
            ``estimated_stepping_batches`` (``max_steps``, or epochs x optimiser steps per epoch).
        class_names: label index -> nuScenes detection name, for the results file.
        evaluation: where validation scores its predictions; None runs no validation metrics (the validation loop
            then only streams the frames).
        run_config: the resolved run config as plain data (``bevdeform.config.config_to_dict``), stored in every
            checkpoint under ``'bevdeform_config'`` so a checkpoint names the model it holds; None stores nothing.
        max_cached_scenes: scenes the streaming validator keeps a BEV for (a rank walks its scenes one by one, so a
            few suffice).
    """

    def __init__(self, model: nn.Module, lr: float = 2e-4, weight_decay: float = 0.01, backbone_lr_mult: float = 0.1,
                 warmup_steps: int = 500, warmup_ratio: float = 1.0 / 3.0, min_lr_ratio: float = 1e-3,
                 class_names: Sequence[str] = CLASS_NAMES, evaluation: EvaluationTarget | None = None,
                 run_config: dict | None = None, max_cached_scenes: int = 4, attribute_rule: str = "class_default"):
        super().__init__()
        if attribute_rule not in ATTRIBUTE_RULES:
            raise ValueError(f"BEVFormerModule: attribute_rule={attribute_rule!r}, expected one of {ATTRIBUTE_RULES}")
        self.attribute_rule = attribute_rule
        self.model = model
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.warmup_steps = int(warmup_steps)
        self.warmup_ratio = float(warmup_ratio)
        self.min_lr_ratio = float(min_lr_ratio)
        self.class_names = tuple(class_names)
        self.evaluation = evaluation
        self.run_config = run_config
        self.max_cached_scenes = int(max_cached_scenes)
        # Filled by validation: the flat metrics of the last scored validation and the global step it ran at.
        self.last_metrics: dict[str, float] | None = None
        self.last_metrics_step: int | None = None
        self.last_results_path: Path | None = None
        self._streaming: StreamingBEVFormer | None = None
        self._results: dict[str, list[dict]] = {}
        self._nusc = None  # the devkit's NuScenes of the evaluation target, loaded once on rank 0

    # ------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.model.forward_train(batch)
        batch_size = len(batch["gt_boxes"])
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, prog_bar=(name == "loss"),
                     batch_size=batch_size)
        for optimizer in self.trainer.optimizers:  # the learning rates this step uses
            for group in optimizer.param_groups:
                self.log(f"lr/{group.get('name', 'group')}", group["lr"], on_step=True, on_epoch=False, batch_size=1)
        return losses["loss"]

    def configure_optimizers(self):
        groups = optimizer_param_groups(self.model, self.lr, self.weight_decay, self.backbone_lr_mult)
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        # The cosine's length is set in on_train_start: asking the Trainer for estimated_stepping_batches here
        # would make it build and iterate the training loader before a resumed run has restored the loader's
        # position (Lightning 2.6 restores loader states only in the loader's first setup).
        factor = WarmupCosineFactor(None, self.warmup_steps, self.warmup_ratio, self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                continue
            for factor, group, base_lr in zip(scheduler.lr_lambdas, scheduler.optimizer.param_groups,
                                              scheduler.base_lrs):
                if isinstance(factor, WarmupCosineFactor):
                    factor.total_steps = total_steps
                    group["lr"] = base_lr * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["bevdeform_config"] = self.run_config

    # ------------------------------------------------------------------------------------------------------------
    # Validation: stream each scene in order, gather, write the results JSON, score it
    # ------------------------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._streaming = StreamingBEVFormer(self.model, max_cached_scenes=self.max_cached_scenes)
        self._results = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self._streaming is not None
        detections = self._streaming.step_batch(batch)
        self._results.update(self.results_of_batch(batch, detections))

    def results_of_batch(self, batch: dict[str, Any], detections: list[dict[str, torch.Tensor]]) -> dict[str, list]:
        """{sample_token: nuScenes result dicts (global frame)} of a batch's current frames.

        A detector whose ``input_frame`` attribute is "lidar" (``model.frame: lidar``, the bevformer_v1 model)
        predicts in the keyframe's LIDAR_TOP frame, devkit convention; its boxes go lidar -> ego -> global with the
        batch's ``lidar2ego`` (``data.bevformer_v1_inputs``) as the official code does (``lidar_boxes_to_results``).
        """
        results = {}
        in_lidar_frame = getattr(self.model, "input_frame", "ego") == "lidar"
        if in_lidar_frame and "lidar2ego" not in batch:
            raise ValueError("the detector predicts boxes in the LIDAR_TOP frame (input_frame='lidar') but the batch "
                             "has no lidar2ego: set data.bevformer_v1_inputs: true")
        for row, (token, found) in enumerate(zip(batch["sample_token"], detections)):
            boxes = found["boxes"].detach().double().cpu()  # (k, 9) [x, y, z, w, l, h, yaw, vx, vy]
            attributes = attribute_names_of(found["labels"].cpu(), boxes[:, 7:9], self.class_names, self.attribute_rule)
            if in_lidar_frame:
                results[token] = lidar_boxes_to_results(
                    token, boxes[:, :7], boxes[:, 7:9], found["scores"], found["labels"],
                    batch["lidar2ego"][row].cpu(), batch["ego2global"][row, -1].cpu(), attribute_names=attributes,
                    class_names=self.class_names)
            else:
                results[token] = boxes_to_results(
                    token, boxes[:, :7], boxes[:, 7:9], found["scores"], found["labels"],
                    batch["ego2global"][row, -1].cpu(), attribute_names=attributes, class_names=self.class_names)
        return results

    def on_validation_epoch_end(self) -> None:
        self._streaming = None
        if self.trainer.sanity_checking or self.evaluation is None:
            self._results = {}
            return
        results = self.gather_results(self._results)
        self._results = {}
        outcome: dict[str, Any] = {"metrics": None, "error": None}
        failure: Exception | None = None
        if self.trainer.is_global_zero:
            try:
                outcome["metrics"] = self.score_results(results)
            except Exception as error:  # handed to every rank below, so that none waits for rank 0 forever
                failure = error
                outcome["error"] = f"{type(error).__name__}: {error}"
        outcome = self.broadcast(outcome)
        if outcome["error"] is not None:
            if failure is not None:
                raise failure
            raise RuntimeError(f"scoring the validation results failed on rank 0: {outcome['error']}")
        metrics = outcome["metrics"]
        self.last_metrics = metrics
        self.last_metrics_step = int(self.trainer.global_step)
        for name, value in metrics.items():
            if math.isfinite(value):
                # The same number on every rank (broadcast above); sync_dist's mean of equal numbers leaves it so.
                self.log(f"val/{name}", value, prog_bar=name in ("NDS", "mAP"), sync_dist=True, batch_size=1)

    def gather_results(self, results: dict[str, list]) -> dict[str, list] | None:
        """All ranks' results merged on rank 0 (None on the other ranks); scenes never span ranks, tokens are
        disjoint."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_world_size() == 1:
            return results
        gathered = [None] * torch.distributed.get_world_size() if self.trainer.is_global_zero else None
        torch.distributed.gather_object(results, gathered, dst=0)
        if not self.trainer.is_global_zero:
            return None
        merged: dict[str, list] = {}
        for part in gathered:
            merged.update(part)
        return merged

    @staticmethod
    def broadcast(value: Any) -> Any:
        """Rank 0's ``value`` (picklable) on every rank."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_world_size() == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def score_results(self, results: dict[str, list]) -> dict[str, float]:
        """Write ``results`` as a nuScenes results JSON under ``results_dir`` and score it (rank 0)."""
        target = self.evaluation
        assert target is not None
        out_dir = Path(target.results_dir)
        if target.per_epoch_subfolders:
            out_dir = out_dir / f"epoch{self.current_epoch:03d}-step{self.trainer.global_step:07d}"
        results_path = write_results_json(results, out_dir / "results_nusc.json")
        self.last_results_path = results_path
        if not target.score:
            return {}
        start = time.perf_counter()
        if self._nusc is None:
            from nuscenes import NuScenes  # the devkit costs ~1 s to import: only where scoring happens

            self._nusc = NuScenes(version=target.version, dataroot=str(target.data_root), verbose=False)
        metrics = evaluate_results(results_path, target.data_root, target.version, target.split, out_dir,
                                   nusc=self._nusc)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self.print(f"[val] epoch {self.current_epoch} step {self.trainer.global_step}: NDS {metrics['NDS']:.4f} "
                   f"mAP {metrics['mAP']:.4f} ({len(results)} samples scored in {time.perf_counter() - start:.1f} s, "
                   f"results {os.fspath(results_path)})")
        return metrics
