"""Predictions -> nuScenes results JSON (global frame) -> the devkit's DetectionEval metrics.

The devkit is imported inside ``evaluate_results`` only: building and writing results needs numpy alone.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bevdeform import geometry
from bevdeform.data.infos import CLASS_NAMES

MAX_BOXES_PER_SAMPLE = 500  # the devkit rejects a results file with more
# The attribute usually submitted per class when the model predicts none (nuscenes-format.md).
DEFAULT_ATTRIBUTES: dict[str, str] = {
    "car": "vehicle.parked", "truck": "vehicle.parked", "trailer": "vehicle.parked",
    "construction_vehicle": "vehicle.parked", "bus": "vehicle.moving", "pedestrian": "pedestrian.moving",
    "motorcycle": "cycle.without_rider", "bicycle": "cycle.without_rider", "barrier": "", "traffic_cone": "",
}
# How a result's attribute_name is chosen (the detector predicts no attributes), ``model.attribute_rule``:
# "class_default": DEFAULT_ATTRIBUTES of the box's class, whatever the box does;
# "velocity": from the predicted speed, as mmdet3d's NuScenesDataset formats results (what BEVFormer's published NDS
#   was scored with): faster than MOVING_SPEED_MPS, vehicle.moving (car, truck, bus, trailer, construction_vehicle) or
#   cycle.with_rider (bicycle, motorcycle); slower, pedestrian.standing (pedestrian) or vehicle.stopped (bus);
#   every other case the class default.
ATTRIBUTE_RULES = ("class_default", "velocity")
MOVING_SPEED_MPS = 0.2
_MOVING_ATTRIBUTES = {"car": "vehicle.moving", "truck": "vehicle.moving", "bus": "vehicle.moving",
                      "trailer": "vehicle.moving", "construction_vehicle": "vehicle.moving",
                      "bicycle": "cycle.with_rider", "motorcycle": "cycle.with_rider"}
_SLOW_ATTRIBUTES = {"pedestrian": "pedestrian.standing", "bus": "vehicle.stopped"}
CAMERA_ONLY_META: dict[str, bool] = {
    "use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False,
}
# Flat metric names -> the devkit's TP error names.
_TP_METRICS = {"mATE": "trans_err", "mASE": "scale_err", "mAOE": "orient_err", "mAVE": "vel_err", "mAAE": "attr_err"}


def _to_numpy(values, dtype) -> np.ndarray:
    """numpy copy of an array, list or torch tensor (any device) without importing torch here."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def attribute_names_of(labels, velocities, class_names: Sequence[str] = CLASS_NAMES,
                       rule: str = "class_default") -> list[str]:
    """The nuScenes attribute of each predicted box under ``rule`` (``ATTRIBUTE_RULES``, comment above).

    labels: (n,) indices into class_names. velocities: (n, 2) m/s in any frame rotated about z from the ego's (the
    speed is the same in the ego, lidar and global frames), or None for zeros. numpy arrays, lists or tensors.
    """
    if rule not in ATTRIBUTE_RULES:
        raise ValueError(f"attribute rule {rule!r}: expected one of {ATTRIBUTE_RULES}")
    labels = _to_numpy(labels, np.int64).reshape(-1)
    velocities = (np.zeros((len(labels), 2)) if velocities is None else _to_numpy(velocities, np.float64).reshape(-1, 2))
    if len(velocities) != len(labels):
        raise ValueError(f"attribute_names_of: {len(labels)} labels but {len(velocities)} velocities")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"attribute_names_of: labels must lie in [0, {len(class_names)}), got "
                         f"{labels.min()}..{labels.max()}")
    names = [class_names[label] for label in labels]
    if rule == "class_default":
        return [DEFAULT_ATTRIBUTES[name] for name in names]
    moving = np.hypot(velocities[:, 0], velocities[:, 1]) > MOVING_SPEED_MPS  # (n,); NaN speeds count as slow
    table = [(_MOVING_ATTRIBUTES if fast else _SLOW_ATTRIBUTES) for fast in moving]
    return [attrs.get(name, DEFAULT_ATTRIBUTES[name]) for attrs, name in zip(table, names)]


def boxes_to_results(sample_token: str, boxes_ego, velocities_ego, scores, labels, ego2global,
                     attribute_names: Sequence[str] | None = None, class_names: Sequence[str] = CLASS_NAMES,
                     max_boxes: int = MAX_BOXES_PER_SAMPLE) -> list[dict[str, Any]]:
    """One sample's predictions in the ego frame -> its list of nuScenes result dicts in the GLOBAL frame.

    boxes_ego: (n, 7) [x, y, z, w, l, h, yaw] (m, rad), ego frame at the sample's LIDAR_TOP timestamp.
    velocities_ego: (n, 2) m/s in ego axes, or None for zeros. scores: (n,). labels: (n,) indices into class_names.
    ego2global: (4, 4), the sample's (info file ``ego2global``). numpy arrays, lists or torch tensors.
    attribute_names: one per box ('' or a nuScenes attribute); None gives each class's DEFAULT_ATTRIBUTES.

    Keeps the max_boxes highest scores (the devkit allows 500 per sample). Rows with a non-finite value or a
    non-positive size cannot be scored (the devkit would reject the whole file): they are dropped with a warning
    naming the sample, so a diverging model still gets a score rather than a crash.
    """
    boxes_ego, velocities_ego, scores, labels, keep = _checked_predictions(
        sample_token, boxes_ego, velocities_ego, scores, labels, attribute_names, class_names, max_boxes, "ego")
    translation, size, rotation = geometry.boxes_ego_to_global(boxes_ego[keep], ego2global)
    velocity = geometry.velocities_ego_to_global(velocities_ego[keep], ego2global)
    return _result_dicts(sample_token, translation, size, rotation, velocity, scores, labels, keep, attribute_names,
                         class_names)


def lidar_boxes_to_results(sample_token: str, boxes_lidar, velocities_lidar, scores, labels, lidar2ego, ego2global,
                           attribute_names: Sequence[str] | None = None, class_names: Sequence[str] = CLASS_NAMES,
                           max_boxes: int = MAX_BOXES_PER_SAMPLE) -> list[dict[str, Any]]:
    """``boxes_to_results`` for predictions in the keyframe's LIDAR_TOP frame (the ``bevformer_v1`` compatibility
    path): boxes_lidar (n, 7) [x, y, z centre, w, l, h, yaw about lidar z] in the devkit convention, velocities_lidar
    (n, 2) in lidar axes (or None), lidar2ego and ego2global (4, 4) of the keyframe LIDAR_TOP sample_data.

    The global fields follow mmdet3d 0.17's ``lidar_nusc_box_to_global`` exactly (``bevdeform.compat.frames.
    lidar_boxes_to_global``: the devkit Box rotated/translated by lidar2ego, then by ego2global, velocity rotated
    with it), so a results file matches the official code's. Selection and dropping as in ``boxes_to_results``.
    """
    from bevdeform.compat.frames import lidar_boxes_to_global

    boxes_lidar, velocities_lidar, scores, labels, keep = _checked_predictions(
        sample_token, boxes_lidar, velocities_lidar, scores, labels, attribute_names, class_names, max_boxes, "lidar")
    boxes9 = np.concatenate([boxes_lidar[keep], velocities_lidar[keep]], axis=1)  # (k, 7) + (k, 2) -> (k, 9)
    translation, size, rotation, velocity = lidar_boxes_to_global(boxes9, lidar2ego, ego2global)
    return _result_dicts(sample_token, translation, size, rotation, velocity, scores, labels, keep, attribute_names,
                         class_names)


def _checked_predictions(sample_token, boxes, velocities, scores, labels, attribute_names, class_names, max_boxes,
                         frame: str):
    """(boxes (n, 7), velocities (n, 2), scores (n,), labels (n,), kept row indices best first) after the checks of
    ``boxes_to_results``; ``frame`` names the inputs in errors."""
    boxes = _to_numpy(boxes, np.float64).reshape(-1, 7)
    num_boxes = len(boxes)
    velocities = (np.zeros((num_boxes, 2)) if velocities is None
                  else _to_numpy(velocities, np.float64).reshape(-1, 2))
    scores = _to_numpy(scores, np.float64).reshape(-1)
    labels = _to_numpy(labels, np.int64).reshape(-1)
    if not len(velocities) == len(scores) == len(labels) == num_boxes or \
            (attribute_names is not None and len(attribute_names) != num_boxes):
        raise ValueError(f"sample {sample_token}: boxes_{frame} has {num_boxes} rows but velocities_{frame} "
                         f"{len(velocities)}, scores {len(scores)}, labels {len(labels)}"
                         + ("" if attribute_names is None else f", attribute_names {len(attribute_names)}"))
    if num_boxes and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"sample {sample_token}: labels must lie in [0, {len(class_names)}), got "
                         f"{labels.min()}..{labels.max()}")

    usable = np.all(np.isfinite(boxes), axis=1) & np.all(np.isfinite(velocities), axis=1) \
        & np.isfinite(scores) & np.all(boxes[:, 3:6] > 0, axis=1)
    if not np.all(usable):
        warnings.warn(f"sample {sample_token}: dropped {int((~usable).sum())} of {num_boxes} predicted boxes with a "
                      f"non-finite value or a non-positive size")
    # Highest scores first; stable, so equal scores keep the model's order.
    keep = np.flatnonzero(usable)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:max_boxes]
    return boxes, velocities, scores, labels, keep


def _result_dicts(sample_token, translation, size, rotation, velocity, scores, labels, keep, attribute_names,
                  class_names) -> list[dict[str, Any]]:
    results = []
    for row, index in enumerate(keep):
        name = class_names[labels[index]]
        results.append({
            "sample_token": sample_token,
            "translation": translation[row].tolist(),
            "size": size[row].tolist(),
            "rotation": rotation[row].tolist(),
            "velocity": velocity[row].tolist(),
            "detection_name": name,
            "detection_score": float(scores[index]),
            "attribute_name": DEFAULT_ATTRIBUTES[name] if attribute_names is None else attribute_names[index],
        })
    return results


def write_results_json(results_by_token: dict[str, list[dict]], path: str | os.PathLike,
                       meta: dict[str, bool] | None = None) -> Path:
    """Write ``{"meta": camera-only meta, "results": results_by_token}`` as the devkit reads it; returns the path.

    Every sample of the evaluated split must be a key, with an empty list where nothing was detected.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"meta": dict(CAMERA_ONLY_META if meta is None else meta), "results": results_by_token}
    try:
        text = json.dumps(content, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"results for {path} contain NaN or inf ({error}); the devkit cannot score them") from None
    path.write_text(text)
    return path


def evaluate_results(results_path: str | os.PathLike, data_root: str | os.PathLike, version: str, eval_set: str,
                     out_dir: str | os.PathLike, verbose: bool = False, nusc=None) -> dict[str, float]:
    """Score a results JSON with the devkit's DetectionEval (config ``detection_cvpr_2019``).

    Returns a flat dict: mAP, NDS, mATE, mASE, mAOE, mAVE, mAAE and ``AP/<class>`` for the 10 classes; the devkit's
    metrics_summary.json (and, when there are predictions, the devkit's metrics_details.json with the PR and TP-error
    curves) is written to out_dir. eval_set is a predefined split (val, mini_val, ...) or one of
    ``<data_root>/<version>/splits.json`` (e.g. synthetic_val). nusc: an already loaded NuScenes of (data_root,
    version), to skip reloading the tables.

    When every sample's list is empty (an untrained model behind a score threshold) the devkit crashes
    ("Invalid box type: None"); this returns the scores it would give instead: AP 0 for every class, each TP
    error at its worst (1, NaN where the devkit does not score it), hence mAP 0 and NDS 0.
    Raises FileNotFoundError for a missing results file; ValueError naming the first sample of the split missing
    from the results (or, for a predefined split, the first sample the results have beyond it: the devkit demands
    an exact match there), or for a split without any annotation of the 10 classes (nothing to score).
    """
    results_path = Path(results_path)
    out_dir = Path(out_dir)
    from nuscenes import NuScenes
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.data_classes import DetectionMetrics
    from nuscenes.eval.detection.evaluate import DetectionEval
    from nuscenes.eval.detection.utils import category_to_detection_name
    from nuscenes.utils.splits import get_scenes_of_split, is_predefined_split

    if nusc is None:
        nusc = NuScenes(version=version, dataroot=str(data_root), verbose=verbose)
    config = config_factory("detection_cvpr_2019")
    scene_names = set(get_scenes_of_split(eval_set, nusc))
    split_tokens = [sample["token"] for sample in nusc.sample
                    if nusc.get("scene", sample["scene_token"])["name"] in scene_names]
    if not split_tokens:
        raise ValueError(f"split {eval_set!r} has no samples in {Path(data_root) / version}")

    if not results_path.is_file():
        raise FileNotFoundError(f"results file {results_path} does not exist")
    try:
        results = json.loads(results_path.read_text())["results"]
        if not isinstance(results, dict):
            raise TypeError(f"'results' is a {type(results).__name__}, expected an object")
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{results_path} is not a readable nuScenes results file with a 'results' object: "
                         f"{error!r}") from None
    missing = [token for token in split_tokens if token not in results]
    if missing:
        raise ValueError(f"{results_path} lacks sample {missing[0]} of split {eval_set!r} ({len(missing)} of "
                         f"{len(split_tokens)} samples missing); every sample needs a key, [] when nothing is found")
    if is_predefined_split(eval_set):
        split_token_set = set(split_tokens)
        extra = [token for token in results if token not in split_token_set]
        if extra:
            raise ValueError(f"{results_path} has sample {extra[0]} outside split {eval_set!r} ({len(extra)} extra); "
                             f"the devkit scores a predefined split only from results of exactly its samples")
    has_gt = any(category_to_detection_name(nusc.get("sample_annotation", ann)["category_name"]) is not None
                 for token in split_tokens for ann in nusc.get("sample", token)["anns"])
    if not has_gt:
        raise ValueError(f"split {eval_set!r} of {Path(data_root) / version} has no annotation of the 10 detection "
                         f"classes: there is nothing to score")

    out_dir.mkdir(parents=True, exist_ok=True)
    if all(len(results[token]) == 0 for token in split_tokens):
        metrics = _metrics_without_predictions(config, DetectionMetrics)
    else:
        evaluator = DetectionEval(nusc, config=config, result_path=str(results_path), eval_set=eval_set,
                                  output_dir=str(out_dir), verbose=verbose)
        metrics, metric_data = evaluator.evaluate()  # not main(): it renders plots and prints whatever verbose says
        # The per-class PR / TP-error curves, as the devkit's main() saves them: bevdeform.visualize draws them.
        (out_dir / "metrics_details.json").write_text(json.dumps(metric_data.serialize(), indent=2))
    summary = metrics.serialize()
    (out_dir / "metrics_summary.json").write_text(json.dumps(summary, indent=2))
    flat = {"mAP": float(summary["mean_ap"]), "NDS": float(summary["nd_score"])}
    for flat_name, devkit_name in _TP_METRICS.items():
        flat[flat_name] = float(summary["tp_errors"][devkit_name])
    for name in CLASS_NAMES:
        flat[f"AP/{name}"] = float(summary["mean_dist_aps"][name])
    return flat


def _metrics_without_predictions(config, metrics_cls):
    """DetectionMetrics as the devkit's evaluate() computes them when no class has a prediction."""
    from nuscenes.eval.detection.constants import TP_METRICS

    metrics = metrics_cls(config)
    for class_name in config.class_names:
        for dist_th in config.dist_ths:
            metrics.add_label_ap(class_name, dist_th, 0.0)
        for metric_name in TP_METRICS:
            # The devkit leaves these unscored (NaN); calc_tp gives 1.0 to a class without true positives.
            unscored = (class_name == "traffic_cone" and metric_name in ("attr_err", "vel_err", "orient_err")) or \
                (class_name == "barrier" and metric_name in ("attr_err", "vel_err"))
            metrics.add_label_tp(class_name, metric_name, float("nan") if unscored else 1.0)
    metrics.add_runtime(0.0)
    return metrics


def format_metrics_table(metrics: dict[str, float]) -> str:
    """A plain-text table of a flat metrics dict from evaluate_results: the summary line, then AP per class."""
    lines = ["  ".join(f"{name} {metrics[name]:.4f}" for name in ("mAP", "NDS", *_TP_METRICS) if name in metrics)]
    class_rows = [(name, metrics[f"AP/{name}"]) for name in CLASS_NAMES if f"AP/{name}" in metrics]
    if class_rows:
        width = max(len(name) for name, _ in class_rows)
        lines.append(f"{'class':<{width}}  AP")
        lines.extend(f"{name:<{width}}  {ap:.4f}" for name, ap in class_rows)
    return "\n".join(lines)
