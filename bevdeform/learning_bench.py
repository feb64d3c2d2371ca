"""Learning benchmark (issue 14): train a config on the synthetic set, score held-out scenes with the devkit,
print the per-metric table and the learning curve, with the controls that show geometry and time carry the result.

- :func:`run_learning` trains one run (``bevdeform.train.train``, validation every ``val_every_n_epochs`` epochs
  and at the end) and returns its final metrics, its learning curve (``val/*`` of the run's metrics.csv by step),
  its wall time and the machine's load average around it.
- Controls, built as modified info files (images and boxes untouched):
  :func:`scramble_extrinsics` (every camera gets its neighbour's ``cam2ego``: the geometry linking pixels and BEV is
  wrong) and :func:`drop_history` (every keyframe a scene start: ``has_prev`` False, identity ``ego_prev2curr``,
  so neither the training queue nor the streaming evaluation can use a previous BEV).
- :func:`yaw_error_breakdown`: a trained model's confident detections matched to GT of the same class within 2 m,
  the predicted minus true yaw binned as in the issue (near 0, near 180 deg, negative, positive) and broken down by
  class, by the camera that sees the box centre and by the ego's turn rate, to tell a frame or sign error (a bias
  that depends on the camera or on the turn rate) from slow learning.
- :func:`dataset_statistics`: what the training set offers (object mix, yaw distribution, box heights in pixels at
  the training resolution by distance), from the info files alone.
- :func:`gt_bev_oracle`: the decoder, matcher and loss of the config trained alone on ground-truth BEV features
  (:func:`gt_bev_features`) and scored with the devkit: what the head path can learn in a budget when the BEV
  carries the answer (heading in full, or modulo pi as a coarse image gives it).

``scripts/bench_learning.py`` only parses arguments and calls :func:`main`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bevdeform.evaluation import format_metrics_table

CURVE_METRICS = ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE")


def load_average() -> tuple[float, float, float]:
    """(1, 5, 15)-minute load averages of the machine (0s where the OS does not report them)."""
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Controls: modified info files
# ----------------------------------------------------------------------------------------------------------------
def scramble_extrinsics(info_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Copy an info file with each camera's ``cam2ego`` (and ``cam2lidar``) replaced by the next camera's
    (CAM_FRONT gets CAM_FRONT_RIGHT's, ..., the last gets the first's): pixels and boxes untouched."""
    content = json.loads(Path(info_path).read_text())
    for info in content["infos"]:
        names = list(info["cams"])
        for key in ("cam2ego", "cam2lidar"):
            values = [info["cams"][name][key] for name in names]
            for position, name in enumerate(names):
                info["cams"][name][key] = values[(position + 1) % len(names)]
    out_path = Path(out_path)
    out_path.write_text(json.dumps(content))
    return out_path


def drop_history(info_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Copy an info file with every keyframe made a scene start (``prev``/``next`` empty, ``has_prev`` False,
    identity ``ego_prev2curr``): the training queue repeats the current frame, the streaming evaluation never
    reuses a BEV. Scene tokens stay, so the devkit scores the same samples."""
    content = json.loads(Path(info_path).read_text())
    identity = np.eye(4).tolist()
    for info in content["infos"]:
        info["prev"], info["next"], info["has_prev"], info["ego_prev2curr"] = "", "", False, identity
    out_path = Path(out_path)
    out_path.write_text(json.dumps(content))
    return out_path


# ----------------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------------
def read_curve(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The run's validations from its metrics.csv: one dict per validation with ``step`` and the val/* metrics
    (``AP/<class>`` included), in step order."""
    rows: dict[int, dict[str, float]] = {}
    for path in sorted((Path(run_dir) / "csv").glob("version_*/metrics.csv")):
        with open(path) as stream:
            for row in csv.DictReader(stream):
                values = {key[4:]: float(value) for key, value in row.items()
                          if key.startswith("val/") and value not in ("", None)}
                if values:
                    rows.setdefault(int(row["step"]), {}).update(values)
    return [{"step": float(step), **values} for step, values in sorted(rows.items())]


# A bound on epochs that never binds: a benchmark run's length is its max_steps.
UNBOUNDED_EPOCHS = 1_000_000


def run_learning(name: str, config: str, overrides: Sequence[str], data_root: str | os.PathLike,
                 out_dir: str | os.PathLike, max_steps: int, val_every_n_epochs: int = 1,
                 version: str = "v1.0-synthetic") -> dict[str, Any]:
    """Train ``config`` with ``overrides`` for ``max_steps`` steps on ``data_root`` and score the held-out split.

    Returns ``{name, config, overrides, max_steps, wall_s, load_before, load_after, metrics, curve, run_dir}``;
    the run folder is ``out_dir / name``.
    """
    from bevdeform.train import read_checkpoint, train

    if max_steps < 1:
        raise ValueError(f"run_learning: max_steps={max_steps}, expected >= 1")
    run_dir = Path(out_dir) / name
    load_before = load_average()
    start = time.perf_counter()
    # The run is max_steps long whatever the config's train.epochs says: Lightning stops at whichever limit comes
    # first, and bev_nano's 12 epochs of the embedded set are 1920 steps (a --steps 2880 run stopped there,
    # 2026-12-03). The learning-rate schedule spans the same max_steps.
    metrics = train(config, overrides=list(overrides), data_root=str(data_root), version=version, out=run_dir,
                    max_steps=max_steps, max_epochs=UNBOUNDED_EPOCHS, accelerator="cpu", devices=1,
                    enable_progress_bar=False, checkpoint_every_n_steps=100_000, log_every_n_steps=20,
                    val_every_n_epochs=val_every_n_epochs)
    wall_s = time.perf_counter() - start
    steps_done = int(read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"])
    if steps_done != max_steps:
        raise RuntimeError(f"run_learning: run {name!r} stopped at step {steps_done} of max_steps={max_steps} "
                           f"({run_dir / 'checkpoints' / 'last.ckpt'})")
    return {"name": name, "config": config, "overrides": list(overrides), "max_steps": max_steps,
            "wall_s": round(wall_s, 1), "load_before": load_before, "load_after": load_average(),
            "metrics": metrics, "curve": read_curve(run_dir), "run_dir": str(run_dir)}


def format_curve(curve: Sequence[dict[str, float]]) -> str:
    """The learning curve as a plain-text table: one row per validation."""
    lines = ["  step  " + "  ".join(f"{name:>6}" for name in CURVE_METRICS)]
    for point in curve:
        cells = [f"{point[name]:6.3f}" if name in point and math.isfinite(point[name]) else "     -"
                 for name in CURVE_METRICS]
        lines.append(f"{int(point['step']):6d}  " + "  ".join(cells))
    return "\n".join(lines)


def format_run(run: dict[str, Any]) -> str:
    """A run's header (config, overrides, steps, wall time, load), final metrics table and learning curve."""
    head = (f"== {run['name']}: {run['config']} {' '.join(run['overrides'])} | {run['max_steps']} steps, "
            f"{run['wall_s']:.0f} s, load avg before {run['load_before']} after {run['load_after']}")
    metrics = format_metrics_table(run["metrics"]) if run.get("metrics") else "(no metrics)"
    return f"{head}\n{metrics}\nlearning curve (held-out scenes):\n{format_curve(run['curve'])}"


# ----------------------------------------------------------------------------------------------------------------
# Yaw error breakdown
# ----------------------------------------------------------------------------------------------------------------
def _camera_of_points(ego2img: np.ndarray, image_hw: np.ndarray, points_ego: np.ndarray) -> np.ndarray:
    """Index (n,) of the camera whose image holds each ego point nearest its centre column (-1: none)."""
    from bevdeform.geometry import project_points

    best = np.full(len(points_ego), -1, dtype=np.int64)
    best_offset = np.full(len(points_ego), np.inf)
    for cam in range(ego2img.shape[0]):
        uv, depth = project_points(ego2img[cam], points_ego)  # (n, 2), (n,)
        height, width = image_hw[cam]
        inside = (depth > 0.1) & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
        offset = np.abs(uv[:, 0] - 0.5 * width) / width
        better = inside & (offset < best_offset)
        best[better], best_offset[better] = cam, offset[better]
    return best


def yaw_error_pairs(model, info_path: str | os.PathLike, data_root: str | os.PathLike,
                    image_size_hw: Sequence[int], class_names: Sequence[str], score_threshold: float = 0.3,
                    max_distance_m: float = 2.0, limit: int | None = None) -> list[dict[str, Any]]:
    """Confident detections of ``model`` (streamed over each scene of ``info_path`` in order) matched greedily,
    highest score first, to unmatched GT of the same class within ``max_distance_m`` (centre, ego xy).

    Returns one dict per pair: ``class``, ``camera`` (name of the camera seeing the GT centre, '' for none),
    ``yaw_error_deg`` (predicted minus true, wrapped to [-180, 180)), ``gt_yaw_deg``, ``turn_rate_dps`` (the ego's
    yaw change since the previous keyframe over the elapsed time, deg/s, 0 at a scene start), ``distance_m`` (GT
    centre from the ego origin).
    """
    import torch

    from bevdeform.data.dataset import NuScenesCameraDataset, collate
    from bevdeform.data.infos import CAMERA_NAMES
    from bevdeform.geometry import planar_ego_motion, wrap_angle
    from bevdeform.models.bevformer import StreamingBEVFormer

    dataset = NuScenesCameraDataset(info_path, data_root, tuple(image_size_hw), queue_length=1,
                                    class_names=class_names)
    streaming = StreamingBEVFormer(model)
    previous_time: dict[str, float] = {}
    pairs: list[dict[str, Any]] = []
    count = len(dataset) if limit is None else min(limit, len(dataset))
    with torch.no_grad():
        for index in range(count):
            batch = collate([dataset[index]])
            found = streaming.step_batch(batch)[0]
            gt_boxes, gt_labels = dataset.frame_gt(index)
            scene = str(batch["scene_token"][0])
            now_s = float(batch["timestamp_s"][0, -1])
            _, yaw_change = planar_ego_motion(batch["ego_prev2curr"][0, -1].double().numpy())
            elapsed_s = now_s - previous_time.get(scene, now_s)
            turn_rate_dps = math.degrees(float(yaw_change)) / elapsed_s if bool(batch["has_prev"][0, -1]) and \
                elapsed_s > 0 else 0.0
            previous_time[scene] = now_s
            cameras = _camera_of_points(batch["ego2img"][0, -1].double().numpy(),
                                        batch["image_hw"][0, -1].numpy(), gt_boxes[:, :3].astype(np.float64))
            keep = found["scores"] > score_threshold
            boxes = found["boxes"][keep].double().numpy()
            labels = found["labels"][keep].numpy()
            taken = np.zeros(len(gt_boxes), dtype=bool)
            for box, label in zip(boxes, labels):  # already in descending score order
                distance = np.linalg.norm(gt_boxes[:, :2] - box[None, :2], axis=1)
                candidates = np.flatnonzero((gt_labels == label) & ~taken & (distance <= max_distance_m))
                if not len(candidates):
                    continue
                gt = candidates[np.argmin(distance[candidates])]
                taken[gt] = True
                error = float(wrap_angle(np.array(box[6] - gt_boxes[gt, 6])))
                pairs.append({"class": class_names[int(label)],
                              "camera": CAMERA_NAMES[cameras[gt]] if cameras[gt] >= 0 else "",
                              "yaw_error_deg": math.degrees(error), "gt_yaw_deg": math.degrees(float(gt_boxes[gt, 6])),
                              "turn_rate_dps": turn_rate_dps,
                              "distance_m": float(np.linalg.norm(gt_boxes[gt, :2]))})
    return pairs


def yaw_bins(errors_deg: Sequence[float]) -> dict[str, int]:
    """Counts of yaw errors (deg, in [-180, 180)) near 0, near 180, in (-150, -30) and in (30, 150)."""
    d = np.asarray(errors_deg, dtype=np.float64)
    return {"n": int(len(d)), "near0": int((np.abs(d) < 30).sum()), "near180": int((np.abs(d) > 150).sum()),
            "neg": int(((d > -150) & (d < -30)).sum()), "pos": int(((d > 30) & (d < 150)).sum()),
            "mean_deg": round(float(d.mean()), 1) if len(d) else float("nan")}


def format_yaw_breakdown(pairs: Sequence[dict[str, Any]]) -> str:
    """Yaw error bins overall and by class, camera and ego turn rate (|rate| < 2 deg/s, left, right)."""
    def rate_group(pair):
        rate = pair["turn_rate_dps"]
        return "straight(|r|<2dps)" if abs(rate) < 2.0 else ("turn-left" if rate > 0 else "turn-right")

    lines = [f"{'group':<28} {'n':>4} {'|d|<30':>7} {'|d|>150':>8} {'-150..-30':>10} {'30..150':>8} {'mean':>6}"]

    def add(label, subset):
        b = yaw_bins([p["yaw_error_deg"] for p in subset])
        lines.append(f"{label:<28} {b['n']:>4} {b['near0']:>7} {b['near180']:>8} {b['neg']:>10} {b['pos']:>8} "
                     f"{b['mean_deg']:>6}")

    add("all", pairs)
    for key, title in (("class", "class"), ("camera", "camera"), (None, "turn")):
        groups: dict[str, list] = {}
        for pair in pairs:
            groups.setdefault(pair[key] if key else rate_group(pair), []).append(pair)
        for group in sorted(groups):
            add(f"{title}={group or '(none)'}", groups[group])
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
def main(config: str = "bev_nano", overrides: Sequence[str] = (), steps: int = 600,
         data_root: str | os.PathLike | None = None, out_dir: str | os.PathLike = "runs/bench_learning",
         controls: Sequence[str] = ("scrambled", "no_history"), val_every_n_epochs: int = 1,
         yaw_breakdown: bool = True, synthetic_parent: str | os.PathLike = "data",
         gt_bev_oracle_steps: int = 0, temporal_oracle_steps: int = 0,
         extra_train_scenes: int = 0) -> list[dict[str, Any]]:
    """Print the training set's statistics; with ``gt_bev_oracle_steps`` train and score the decoder on
    ground-truth BEV features (full heading, then heading modulo pi); with ``temporal_oracle_steps`` the temporal
    oracle (`gt_bev_oracle` without velocity in the features, one TSA layer over the aligned previous BEV, against
    its unaligned and no-history controls and the velocity-in-the-features ceiling); train ``config``
    (+ ``overrides``) for ``steps`` steps on the embedded synthetic set (with ``extra_train_scenes`` more training
    scenes and the same held-out scenes; written on first use) or on ``data_root``, then each control the
    same way; print each run's table and curve, the yaw breakdown of the main run, and a summary; write the runs
    to ``out_dir/bench.json``. ``steps`` 0 skips the training runs."""
    import torch

    from bevdeform.config import build_model, load_config
    from bevdeform.data.infos import info_path
    from bevdeform.data.synthetic import TRAIN_SPLIT, VAL_SPLIT, VERSION
    from bevdeform.models.bevformer import load_model_weights
    from bevdeform.train import EMBEDDED_SYNTHETIC, prepare_synthetic_data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = [name for name in controls if name not in ("scrambled", "no_history")]
    if unknown:
        raise ValueError(f"controls: unknown {unknown}, expected 'scrambled' and/or 'no_history'")
    if extra_train_scenes < 0 or (extra_train_scenes and data_root is not None):
        raise ValueError(f"extra_train_scenes={extra_train_scenes}: expected >= 0, and 0 with data_root "
                         f"(got data_root={data_root!r})")
    spec = dataclasses.replace(EMBEDDED_SYNTHETIC, extra_train_scenes=int(extra_train_scenes))
    root = Path(data_root) if data_root is not None else prepare_synthetic_data(spec, synthetic_parent)
    train_infos, val_infos = (info_path(root, VERSION, split) for split in (TRAIN_SPLIT, VAL_SPLIT))
    cfg = load_config(config, list(overrides))
    print(format_dataset_statistics(dataset_statistics(train_infos, cfg.data.image_size_hw,
                                                       cfg.data.point_cloud_range_m)), flush=True)
    # The config's sizes, for both oracles.
    oracle_sizes = dict(embed_dims=cfg.model.embed_dims, bev_hw=(cfg.model.encoder.bev_h, cfg.model.encoder.bev_w),
                        point_cloud_range_m=cfg.data.point_cloud_range_m, num_layers=cfg.model.decoder.num_layers,
                        num_queries=cfg.model.decoder.num_queries, class_names=cfg.data.class_names)
    if gt_bev_oracle_steps:
        for heading in ("full", "mod_pi"):
            oracle = gt_bev_oracle(train_infos, val_infos, root, out_dir, steps=gt_bev_oracle_steps, heading=heading,
                                   **oracle_sizes)
            print(f"== decoder on ground-truth BEV features (heading {heading}), {oracle['steps']} steps, "
                  f"{oracle['wall_s']:.0f} s, load avg {load_average()}\n{format_metrics_table(oracle['metrics'])}\n"
                  f"{format_yaw_breakdown(oracle['yaw_pairs'])}", flush=True)
    if temporal_oracle_steps:
        print("== temporal oracle: can TSA read velocity from the aligned previous BEV? (velocity outputs x10, "
              "velocity code weight 1)", flush=True)
        for source in VELOCITY_SOURCES:
            oracle = gt_bev_oracle(train_infos, val_infos, root, out_dir, steps=temporal_oracle_steps,
                                   loss_kwargs={"code_weights": [1.0] * 10}, velocity_scale_mps=10.0,
                                   velocity_source=source, name=f"temporal_{source}", **oracle_sizes)
            m = oracle["metrics"]
            print(f"  velocity from {source:<17} {oracle['steps']} steps, {oracle['wall_s']:.0f} s: "
                  + "  ".join(f"{k} {m[k]:.4f}" for k in CURVE_METRICS), flush=True)
    runs = []
    plans = [("learned", list(overrides))]
    for control in controls:
        make = scramble_extrinsics if control == "scrambled" else drop_history
        paths = [make(path, out_dir / f"{control}_{path.name}") for path in (train_infos, val_infos)]
        plans.append((control, [*overrides, f"data.train_info_path={paths[0]}", f"data.val_info_path={paths[1]}"]))
    for name, run_overrides in (plans if steps > 0 else []):
        run = run_learning(name, config, run_overrides, root, out_dir, steps, val_every_n_epochs)
        runs.append(run)
        print(format_run(run), flush=True)
        if name == "learned" and yaw_breakdown:
            cfg = load_config(Path(run["run_dir"]) / "config.yaml")
            model = build_model(cfg)
            state = torch.load(Path(run["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu",
                               weights_only=True)["state_dict"]
            load_model_weights(model, state, key_prefix="model.")
            pairs = yaw_error_pairs(model, val_infos, root, cfg.data.image_size_hw, cfg.data.class_names)
            run["yaw_pairs"] = pairs
            print(f"yaw error (pred - true) of detections with score > 0.3 matched within 2 m, held-out scenes:\n"
                  f"{format_yaw_breakdown(pairs)}", flush=True)
        (out_dir / "bench.json").write_text(json.dumps(runs, indent=1, default=str))
    print("\nsummary (held-out scenes, devkit):")
    for run in runs:
        m = run["metrics"] or {}
        print(f"  {run['name']:<11} " + "  ".join(f"{k} {m[k]:.4f}" for k in CURVE_METRICS if k in m)
              + f"  ({run['wall_s']:.0f} s)")
    return runs


# ----------------------------------------------------------------------------------------------------------------
# What the data offers: object mix, yaw distribution, object size in pixels at the training resolution
# ----------------------------------------------------------------------------------------------------------------
def dataset_statistics(info_path: str | os.PathLike, image_size_hw: Sequence[int],
                       point_cloud_range_m: Sequence[float] = (-32.0, -32.0, -3.0, 32.0, 32.0, 5.0),
                       distance_bands_m: Sequence[float] = (0.0, 10.0, 20.0, 32.0, 46.0)) -> dict[str, Any]:
    """Per class, over the GT boxes a dataset with ``point_cloud_range_m`` trains on (valid_flag, centre in x/y):
    the count, the ego-frame yaw histogram (quadrants around 0, +90, 180, -90 deg) and, per distance band, the
    median height in pixels of the box on the image it projects to at ``image_size_hw`` (the tallest projection
    over the cameras that see its centre). Uses the info files only (no pixels)."""
    from bevdeform.data.infos import CAMERA_NAMES, load_infos
    from bevdeform.data.transforms import scale_intrinsics
    from bevdeform.geometry import box_corners, ego2img_from, project_points

    height, width = int(image_size_hw[0]), int(image_size_hw[1])
    x_min, y_min, _, x_max, y_max, _ = point_cloud_range_m
    _, infos = load_infos(info_path)
    stats: dict[str, dict[str, Any]] = {}
    for info in infos:
        boxes = info["gt_boxes"]
        keep = np.asarray(info["valid_flag"], dtype=bool)
        if not len(boxes):
            continue
        keep &= (boxes[:, 0] > x_min) & (boxes[:, 0] < x_max) & (boxes[:, 1] > y_min) & (boxes[:, 1] < y_max)
        ego2img = np.stack([ego2img_from(scale_intrinsics(info["cams"][name]["intrinsics"],
                                                          width / info["cams"][name]["width"],
                                                          height / info["cams"][name]["height"]),
                                         info["cams"][name]["cam2ego"]) for name in CAMERA_NAMES])  # (6, 4, 4)
        for row in np.flatnonzero(keep):
            name = info["gt_names"][row]
            entry = stats.setdefault(name, {"count": 0, "yaw_quadrants": [0, 0, 0, 0],
                                            "px_height_by_band": [[] for _ in distance_bands_m[1:]]})
            entry["count"] += 1
            yaw_deg = math.degrees(float(boxes[row, 6]))
            entry["yaw_quadrants"][int(((yaw_deg + 45.0) % 360.0) // 90.0)] += 1  # 0: ~0, 1: ~+90, 2: ~180, 3: ~-90
            corners = box_corners(boxes[row])  # (8, 3)
            best = 0.0
            for cam in range(len(CAMERA_NAMES)):
                uv, depth = project_points(ego2img[cam], corners)
                centre_uv, centre_depth = project_points(ego2img[cam], boxes[row, None, :3])
                if centre_depth[0] <= 0.1 or not (0 <= centre_uv[0, 0] < width and 0 <= centre_uv[0, 1] < height) \
                        or (depth <= 0.1).any():
                    continue
                best = max(best, float(uv[:, 1].max() - uv[:, 1].min()))
            distance = float(np.linalg.norm(boxes[row, :2]))
            band = int(np.searchsorted(distance_bands_m, distance, side="right")) - 1
            if best > 0 and 0 <= band < len(distance_bands_m) - 1:
                entry["px_height_by_band"][band].append(best)
    for entry in stats.values():
        entry["median_px_height_by_band"] = [round(float(np.median(v)), 1) if v else None
                                             for v in entry.pop("px_height_by_band")]
    return {"bands_m": list(distance_bands_m), "image_size_hw": [height, width], "classes": stats}


def format_dataset_statistics(stats: dict[str, Any]) -> str:
    bands = stats["bands_m"]
    band_names = [f"{int(a)}-{int(b)}m" for a, b in zip(bands[:-1], bands[1:])]
    lines = [f"GT boxes used for training, yaw quadrants (ego frame) and median box height in pixels at "
             f"{stats['image_size_hw'][0]}x{stats['image_size_hw'][1]}:",
             f"{'class':<22} {'n':>5}  {'~0':>5} {'~+90':>5} {'~180':>5} {'~-90':>5}  "
             + "  ".join(f"{b:>8}" for b in band_names)]
    for name, entry in sorted(stats["classes"].items(), key=lambda item: -item[1]["count"]):
        q = entry["yaw_quadrants"]
        px = "  ".join(f"{v:>8}" if v is not None else f"{'-':>8}" for v in entry["median_px_height_by_band"])
        lines.append(f"{name:<22} {entry['count']:>5}  {q[0]:>5} {q[1]:>5} {q[2]:>5} {q[3]:>5}  {px}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The head alone on ground-truth BEV features (the "oracle that feeds ground-truth BEV features")
# ----------------------------------------------------------------------------------------------------------------
GT_BEV_CHANNELS = 20  # 10 class one-hots, 2 heading, log w l h, z, centre offset in the cell (2), vx vy


def gt_bev_features(gt_boxes, gt_labels, bev_h: int, bev_w: int, point_cloud_range_m: Sequence[float],
                    heading: str = "full", num_classes: int = 10):
    """Ground-truth BEV features (bev_h * bev_w, 20) float32, row-major over (i along y, j along x) as the BEV.

    Every cell whose centre lies in a box's footprint (and the cell holding its centre) gets: the class one-hot,
    the heading as (sin yaw, cos yaw) (``heading='full'``), (sin 2 yaw, cos 2 yaw) (``'mod_pi'``: front and back
    alike, what an image too coarse to show a vehicle's front gives) or zeros (``'none'``), log w, l, h, the centre
    z, the offset of the box centre from the cell centre in cells, and (vx, vy) / 10 m/s. Boxes are painted in
    order (a later box wins a shared cell).
    """
    import torch

    if heading not in ("full", "mod_pi", "none"):
        raise ValueError(f"heading must be 'full', 'mod_pi' or 'none', got {heading!r}")
    x_min, y_min, _, x_max, y_max, _ = point_cloud_range_m
    cell_x, cell_y = (x_max - x_min) / bev_w, (y_max - y_min) / bev_h
    features = torch.zeros(bev_h, bev_w, GT_BEV_CHANNELS)
    xs = x_min + (torch.arange(bev_w) + 0.5) * cell_x  # (W,)
    ys = y_min + (torch.arange(bev_h) + 0.5) * cell_y  # (H,)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    for box, label in zip(torch.as_tensor(gt_boxes, dtype=torch.float32), torch.as_tensor(gt_labels)):
        x, y, z, w, l, h, yaw, vx, vy = box.tolist()
        c, s = math.cos(yaw), math.sin(yaw)
        along = (grid_x - x) * c + (grid_y - y) * s  # (H, W) metres along the heading
        across = -(grid_x - x) * s + (grid_y - y) * c
        inside = (along.abs() <= 0.5 * l) & (across.abs() <= 0.5 * w)  # (H, W)
        col, row = int((x - x_min) // cell_x), int((y - y_min) // cell_y)
        if 0 <= row < bev_h and 0 <= col < bev_w:
            inside[row, col] = True
        if heading == "full":
            head = [s, c]
        elif heading == "mod_pi":
            head = [math.sin(2 * yaw), math.cos(2 * yaw)]
        else:
            head = [0.0, 0.0]
        onehot = [0.0] * num_classes
        onehot[int(label)] = 1.0
        values = torch.tensor(onehot + head + [math.log(w), math.log(l), math.log(h), z])  # (16,)
        offsets = torch.stack([(x - grid_x) / cell_x, (y - grid_y) / cell_y], dim=-1)  # (H, W, 2)
        features[inside] = torch.cat([values.expand(int(inside.sum()), -1), offsets[inside],
                                      torch.tensor([vx / 10.0, vy / 10.0]).expand(int(inside.sum()), -1)], dim=1)
    return features.reshape(bev_h * bev_w, GT_BEV_CHANNELS)  # (H, W, 20) -> (H*W, 20)


VELOCITY_SOURCES = ("features", "history", "history_unaligned", "none")


def _temporal_oracle_layer(embed_dims: int, num_heads: int, num_points: int, bev_h: int, bev_w: int):
    """One encoder layer without the cameras: TSA (bev_nano's) + residual -> LayerNorm -> FFN + residual ->
    LayerNorm, with a learned BEV positional embedding (H*W, C) for TSA's offset predictor, no dropout."""
    import torch
    from torch import nn

    from bevdeform.models.attention import TemporalSelfAttention

    layer = nn.ModuleDict({
        "tsa": TemporalSelfAttention(embed_dims, num_heads, num_points, bev_h, bev_w),
        "norm_tsa": nn.LayerNorm(embed_dims),
        "ffn": nn.Sequential(nn.Linear(embed_dims, 2 * embed_dims), nn.ReLU(), nn.Linear(2 * embed_dims, embed_dims)),
        "norm_ffn": nn.LayerNorm(embed_dims),
    })
    layer.bev_pos = nn.Parameter(0.02 * torch.randn(1, bev_h * bev_w, embed_dims))  # (1, H*W, C)
    return layer


def _temporal_oracle_forward(layer, bev, prev_bev_aligned, has_prev):
    """bev (B, H*W, C), prev_bev_aligned (B, H*W, C) or None, has_prev (B,) bool or None -> (B, H*W, C)."""
    bev = layer["norm_tsa"](bev + layer["tsa"](bev, layer.bev_pos, prev_bev_aligned, has_prev))
    return layer["norm_ffn"](bev + layer["ffn"](bev))


def gt_bev_oracle(train_info_path, val_info_path, data_root, out_dir, steps: int = 400, heading: str = "full",
                  embed_dims: int = 64, bev_hw: Sequence[int] = (32, 32),
                  point_cloud_range_m: Sequence[float] = (-32.0, -32.0, -3.0, 32.0, 32.0, 5.0),
                  num_layers: int = 3, num_queries: int = 150, lr: float = 1e-3, batch_size: int = 2,
                  seed: int = 0, version: str = "v1.0-synthetic", eval_split: str = "synthetic_val",
                  class_names: Sequence[str] | None = None, loss_kwargs: dict[str, Any] | None = None,
                  name: str | None = None, velocity_scale_mps: float = 1.0,
                  velocity_source: str = "features") -> dict[str, Any]:
    """Train bev_nano's detection decoder and loss (its dims, layers, queries, matcher and loss weights) on
    :func:`gt_bev_features` (through a learned Linear(20, embed_dims)) of the training frames, then score the
    held-out frames with the devkit. What the head path learns when the BEV carries the answer: a yaw that
    cannot be learnt here is lost in the head, matcher, loss, decoding or evaluation, not in the images.

    ``loss_kwargs`` go to :class:`DetectionLoss` (cls_weight, reg_weight, code_weights: the matcher follows
    cls_weight and reg_weight); ``velocity_scale_mps`` goes to the decoder (its velocity outputs' factor); the results
    land in ``out_dir / (name or 'gt_bev_<heading>')``.

    ``velocity_source`` says where the velocity can come from: ``'features'`` (the (vx, vy) channels of the features),
    ``'history'`` (those channels zeroed; one temporal encoder layer, bevdeform's TemporalSelfAttention with
    residual, LayerNorm and FFN, runs on the lifted features with the previous keyframe's output BEV, computed as
    training computes it: without gradient, from that frame alone in training and streamed in evaluation, warped
    by `align_prev_bev` with the frame's ego motion, so the velocity must be read from the displacement of moving
    objects between the two BEVs), ``'history_unaligned'`` (the same with the ego motion taken as identity: the
    control that shows what the alignment is worth, since a static object then appears to move by the ego's own
    displacement) or ``'none'`` (channels zeroed and the same layer without a previous BEV: the control, which can
    only predict a velocity from class, heading and position).

    Returns ``{heading, steps, wall_s, metrics, yaw_pairs, loss_curve}``.
    """
    import torch

    from bevdeform.data.dataset import NuScenesCameraDataset
    from bevdeform.data.infos import CAMERA_NAMES, CLASS_NAMES
    from bevdeform.evaluation import boxes_to_results, evaluate_results, write_results_json
    from bevdeform.geometry import planar_ego_motion, wrap_angle
    from bevdeform.models.attention import align_prev_bev
    from bevdeform.models.decoder import DetectionDecoder
    from bevdeform.models.head import DetectionLoss, decode_predictions

    if velocity_source not in VELOCITY_SOURCES:
        raise ValueError(f"velocity_source must be one of {VELOCITY_SOURCES}, got {velocity_source!r}")
    class_names = tuple(class_names or CLASS_NAMES)
    torch.manual_seed(seed)
    bev_h, bev_w = int(bev_hw[0]), int(bev_hw[1])
    datasets = {name: NuScenesCameraDataset(path, data_root, (32, 32), queue_length=1, class_names=class_names,
                                            point_cloud_range_m=point_cloud_range_m)
                for name, path in (("train", train_info_path), ("val", val_info_path))}
    features = {name: torch.stack([gt_bev_features(*ds.frame_gt(i), bev_h, bev_w, point_cloud_range_m, heading,
                                                   len(class_names)) for i in range(len(ds))])
                for name, ds in datasets.items()}  # (F, H*W, 20)
    temporal = None
    if velocity_source != "features":
        for frames in features.values():
            frames[..., GT_BEV_CHANNELS - 2:] = 0.0  # no (vx, vy) channels
        temporal = _temporal_oracle_layer(embed_dims, 4, 4, bev_h, bev_w)
    decoder = DetectionDecoder(embed_dims, num_layers, num_queries, 4, 4, 2 * embed_dims, len(class_names), 10,
                               bev_h, bev_w, point_cloud_range_m, velocity_scale_mps=velocity_scale_mps)
    lift = torch.nn.Linear(GT_BEV_CHANNELS, embed_dims)
    loss_fn = DetectionLoss(num_classes=len(class_names), **dict(loss_kwargs or {}))
    params = list(decoder.parameters()) + list(lift.parameters())
    params += list(temporal.parameters()) if temporal is not None else []

    def encode(split, frame_indices, prev_bev=None):
        """BEV (B, H*W, C) of these frames of ``split``: the lifted features, through the temporal layer with
        ``prev_bev`` (B, H*W, C), each row the previous keyframe's output in its own ego frame, or None."""
        ds = datasets[split]
        bev = lift(features[split][frame_indices])  # (B, H*W, 20) -> (B, H*W, C)
        if temporal is None:
            return bev
        if prev_bev is None or velocity_source == "none":
            return _temporal_oracle_forward(temporal, bev, None, None)
        has_prev = torch.from_numpy(ds.has_prev[frame_indices].astype(bool))  # (B,)
        motion = torch.from_numpy(ds.ego_prev2curr[frame_indices].astype(np.float32))  # (B, 4, 4)
        if velocity_source == "history_unaligned":
            motion = torch.eye(4).expand_as(motion)
        aligned = align_prev_bev(prev_bev, motion, bev_h, bev_w, point_cloud_range_m)
        return _temporal_oracle_forward(temporal, bev, aligned, has_prev)

    def history_bev(split, frame_indices):
        """The previous keyframe's BEV for training, (B, H*W, C): that frame alone, without gradient (rows at a scene
        start get their own frame, which `encode` masks out by has_prev); None without a temporal source."""
        if not velocity_source.startswith("history"):
            return None
        ds = datasets[split]
        previous = np.where(ds.has_prev[frame_indices], frame_indices - 1, frame_indices)  # (B,)
        with torch.no_grad():
            return encode(split, previous, None)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    train_ds = datasets["train"]
    loss_curve = []
    start = time.perf_counter()
    decoder.train()
    for step in range(steps):
        index = torch.randint(len(train_ds), (batch_size,), generator=generator).numpy()
        all_logits, all_codes = decoder(encode("train", index, history_bev("train", index)))
        gts = [train_ds.frame_gt(int(i)) for i in index]
        losses = loss_fn(all_logits, all_codes, [torch.from_numpy(b) for b, _ in gts],
                         [torch.from_numpy(lab) for _, lab in gts])
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 35.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == steps - 1:
            loss_curve.append((step, round(losses["loss"].item(), 4)))
    decoder.eval()
    val_ds = datasets["val"]
    streamed_bev = None  # (1, H*W, C): the previous keyframe's output, streamed as in evaluation
    results, pairs = {}, []
    image_hw = np.array([val_ds.image_size_hw] * val_ds.ego2img.shape[1])  # (N, 2)
    with torch.no_grad():
        for i in range(len(val_ds)):
            _, yaw_change = planar_ego_motion(val_ds.ego_prev2curr[i].astype(np.float64))
            # Info files hold whole scenes in time order: the previous keyframe is the row before.
            elapsed_s = float(val_ds.timestamp_s[i] - val_ds.timestamp_s[i - 1]) if val_ds.has_prev[i] else 0.0
            turn_rate_dps = math.degrees(float(yaw_change)) / elapsed_s if elapsed_s > 0 else 0.0
            cameras = _camera_of_points(val_ds.ego2img[i].astype(np.float64), image_hw,
                                        val_ds.frame_gt(i)[0][:, :3].astype(np.float64))
            frame = np.array([i])
            streamed_bev = encode("val", frame, streamed_bev if val_ds.has_prev[i] else None)
            logits, codes = decoder(streamed_bev)
            found = decode_predictions(logits[-1], codes[-1], max_num=100)[0]
            boxes = found["boxes"].double()
            token = str(val_ds.sample_tokens[i])
            results[token] = boxes_to_results(token, boxes[:, :7], boxes[:, 7:9], found["scores"], found["labels"],
                                              val_ds.ego2global[i], class_names=class_names)
            gt_boxes, gt_labels = val_ds.frame_gt(i)
            taken = np.zeros(len(gt_boxes), dtype=bool)
            keep = found["scores"] > 0.3
            for box, label in zip(boxes[keep].numpy(), found["labels"][keep].numpy()):
                distance = np.linalg.norm(gt_boxes[:, :2] - box[None, :2], axis=1)
                candidates = np.flatnonzero((gt_labels == label) & ~taken & (distance <= 2.0))
                if len(candidates):
                    gt = candidates[np.argmin(distance[candidates])]
                    taken[gt] = True
                    pairs.append({"class": class_names[int(label)],
                                  "camera": CAMERA_NAMES[cameras[gt]] if cameras[gt] >= 0 else "",
                                  "turn_rate_dps": turn_rate_dps,
                                  "yaw_error_deg": math.degrees(float(wrap_angle(np.array(box[6] - gt_boxes[gt, 6])))),
                                  "gt_yaw_deg": math.degrees(float(gt_boxes[gt, 6])),
                                  "distance_m": float(np.linalg.norm(gt_boxes[gt, :2]))})
    out_dir = Path(out_dir)
    folder = out_dir / (name or f"gt_bev_{heading}")
    path = write_results_json(results, folder / "results.json")
    metrics = evaluate_results(path, data_root, version, eval_split, folder)
    return {"heading": heading, "velocity_source": velocity_source, "steps": steps,
            "wall_s": round(time.perf_counter() - start, 1),
            "metrics": metrics, "yaw_pairs": pairs, "loss_curve": loss_curve}
