"""Pictures of predictions: bird's-eye views, camera overlays, scene animations and the devkit's metric curves.

An edge module: it reads images with OpenCV, draws with OpenCV, writes GIFs with Pillow and renders the evaluation
curves with the devkit's ``nuscenes.eval.detection.render`` (matplotlib). Nothing in the model package imports it.

Conventions (docs/data-format.md): boxes are ``[x, y, z, w, l, h, yaw, vx, vy]`` in the ego frame of the keyframe
(x forward, y left, z up; metres, radians, m/s), labels index ``class_names``. Images are uint8 BGR (OpenCV).

Bird's-eye view (:func:`render_bev`): a square image with the ego at its centre, ego +x (forward) pointing up and
ego +y (left) pointing left, ``size_px / (2 * range_m)`` pixels per metre; :func:`ego_xy_to_bev_pixels` is the map
(pixel centres at integer coordinates). Ground truth is drawn as a translucent filled footprint with a thin
outline, predictions as a thick outline with the score; both in the class colour (:data:`CLASS_COLORS_BGR`), with
a heading line (centre to the front edge) and a velocity arrow (where the centre will be in ``arrow_seconds``).
Behind them: lidar points (ego frame) when given, else nothing but the range rings (10 m apart) and a 10 m grid.

Cameras (:func:`render_cameras`): the six images in the usual layout (:data:`CAMERA_LAYOUT`: front-left, front,
front-right over back-left, back, back-right), each with the 12 edges of every box projected through its
``ego2img``; edges are clipped at ``near_m`` in front of the camera before the perspective division, so a box that
reaches behind the camera is drawn up to the near plane instead of wrapping around. The front face carries a cross.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import cv2
import numpy as np

from bevdeform import geometry
from bevdeform.data.infos import CAMERA_NAMES, CLASS_NAMES

__all__ = [
    "CAMERA_LAYOUT",
    "CLASS_COLORS_BGR",
    "FrameBoxes",
    "ego_xy_to_bev_pixels",
    "render_bev",
    "project_box_edges",
    "draw_boxes_on_image",
    "render_cameras",
    "compose_frame",
    "load_lidar_points_ego",
    "load_camera_images",
    "gt_boxes_of_info",
    "boxes_from_results",
    "predict_scene",
    "render_sample",
    "write_animation",
    "render_metric_curves",
    "evaluate_and_render_curves",
    "find_info_files",
    "select_frames",
    "visualize",
]

CAMERA_LAYOUT: tuple[tuple[str, ...], ...] = (
    ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"),
    ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"),
)
# One colour per detection class (BGR), distinct on a dark background.
CLASS_COLORS_BGR: dict[str, tuple[int, int, int]] = {
    "car": (0, 158, 255), "truck": (71, 99, 255), "construction_vehicle": (30, 105, 210), "bus": (255, 144, 30),
    "trailer": (255, 191, 0), "barrier": (200, 200, 200), "motorcycle": (147, 20, 255), "bicycle": (180, 105, 255),
    "pedestrian": (0, 0, 255), "traffic_cone": (0, 255, 0),
}
_FALLBACK_COLOR_BGR = (255, 255, 255)
_BACKGROUND_BGR = (24, 24, 24)
_GRID_BGR = (60, 60, 60)
_POINTS_BGR = (150, 150, 150)
_EGO_BGR = (255, 255, 255)
# Edges of a box as corner index pairs (geometry.box_corners order: 0-3 front face, 4-7 back face).
_BOX_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))
_FRONT_CROSS = ((0, 2), (1, 3))
# Footprint: the top face corners in order (front-left, front-right, back-right, back-left) projected on the ground.
_FOOTPRINT = (0, 1, 5, 4)


@dataclass
class FrameBoxes:
    """Boxes of one frame in the ego frame.

    Attributes:
        boxes: (n, 9) [x, y, z, w, l, h, yaw, vx, vy] (metres, radians, m/s); (n, 7) is padded with zero velocity.
        labels: (n,) int indices into the class names.
        scores: (n,) or None (ground truth).
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None

    def __post_init__(self):
        boxes = np.asarray(self.boxes, dtype=np.float64)
        if boxes.size == 0:
            boxes = np.zeros((0, 9))
        if boxes.ndim == 2 and boxes.shape[1] == 7:
            boxes = np.concatenate([boxes, np.zeros((len(boxes), 2))], axis=1)
        if boxes.ndim != 2 or boxes.shape[1] != 9:
            raise ValueError(f"FrameBoxes: boxes must be (n, 9) or (n, 7), got {boxes.shape}")
        self.boxes = boxes
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if len(self.labels) != len(boxes) or (self.scores is not None and len(self.scores) != len(boxes)):
            raise ValueError(f"FrameBoxes: {len(boxes)} boxes, {len(self.labels)} labels"
                             + ("" if self.scores is None else f", {len(self.scores)} scores"))

    def above(self, score_threshold: float | None) -> "FrameBoxes":
        """The boxes whose score is at least ``score_threshold`` (all for ground truth or a None threshold)."""
        if self.scores is None or score_threshold is None:
            return self
        keep = self.scores >= score_threshold
        return FrameBoxes(self.boxes[keep], self.labels[keep], self.scores[keep])


def _color(label: int, class_names: Sequence[str]) -> tuple[int, int, int]:
    if 0 <= label < len(class_names):
        return CLASS_COLORS_BGR.get(class_names[label], _FALLBACK_COLOR_BGR)
    return _FALLBACK_COLOR_BGR


# ----------------------------------------------------------------------------------------------------------------
# Bird's-eye view
# ----------------------------------------------------------------------------------------------------------------
def ego_xy_to_bev_pixels(xy_m: np.ndarray, size_px: int, range_m: float) -> np.ndarray:
    """Ego (x, y) metres (..., 2) -> BEV image pixels (u, v) (..., 2), floats, pixel centres at integers.

    The image spans ``[-range_m, range_m]`` on both axes, ego at its centre, +x up and +y left:
    ``u = (size_px / 2 - 0.5) - y * s``, ``v = (size_px / 2 - 0.5) - x * s`` with ``s = size_px / (2 * range_m)``.
    """
    xy_m = np.asarray(xy_m, dtype=np.float64)
    scale = size_px / (2.0 * range_m)
    centre = size_px / 2.0 - 0.5
    return np.stack([centre - xy_m[..., 1] * scale, centre - xy_m[..., 0] * scale], axis=-1)


def _to_cv_points(pixels: np.ndarray, shift: int = 4) -> np.ndarray:
    """Float pixels -> int32 with ``shift`` fractional bits (OpenCV's sub-pixel drawing)."""
    return np.round(np.asarray(pixels) * (1 << shift)).astype(np.int32)


def _draw_bev_background(canvas: np.ndarray, range_m: float, points_ego: np.ndarray | None) -> None:
    size_px = canvas.shape[0]
    if points_ego is not None and len(points_ego):
        pixels = np.round(ego_xy_to_bev_pixels(points_ego[:, :2], size_px, range_m)).astype(np.int64)
        inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < size_px) & (pixels[:, 1] >= 0) & (pixels[:, 1] < size_px)
        pixels = pixels[inside]
        canvas[pixels[:, 1], pixels[:, 0]] = _POINTS_BGR
    else:
        step_m = 10.0
        ticks = np.arange(-np.floor(range_m / step_m) * step_m, range_m + 1e-6, step_m)
        for tick in ticks:
            start = ego_xy_to_bev_pixels(np.array([[tick, -range_m], [-range_m, tick]]), size_px, range_m)
            end = ego_xy_to_bev_pixels(np.array([[tick, range_m], [range_m, tick]]), size_px, range_m)
            for a, b in zip(start, end):
                cv2.line(canvas, tuple(_to_cv_points(a)), tuple(_to_cv_points(b)), _GRID_BGR, 1, cv2.LINE_AA, 4)
    scale = size_px / (2.0 * range_m)
    centre = _to_cv_points(ego_xy_to_bev_pixels(np.zeros(2), size_px, range_m))
    for radius_m in np.arange(10.0, range_m * 1.5, 10.0):
        cv2.circle(canvas, tuple(centre), int(round(radius_m * scale * 16)), _GRID_BGR, 1, cv2.LINE_AA, 4)


def _draw_ego(canvas: np.ndarray, range_m: float) -> None:
    # nuScenes' Renault Zoe: 4.08 x 1.73 m, origin at the rear axle 0.8 m in front of the rear bumper.
    footprint = np.array([[3.28, 0.865], [3.28, -0.865], [-0.8, -0.865], [-0.8, 0.865]])
    pixels = _to_cv_points(ego_xy_to_bev_pixels(footprint, canvas.shape[0], range_m))
    cv2.polylines(canvas, [pixels], True, _EGO_BGR, 1, cv2.LINE_AA, 4)


def _draw_bev_boxes(canvas: np.ndarray, frame: FrameBoxes, class_names: Sequence[str], range_m: float,
                    is_prediction: bool, arrow_seconds: float, show_scores: bool = True) -> None:
    size_px = canvas.shape[0]
    if not len(frame.boxes):
        return
    corners = geometry.box_corners(frame.boxes[:, :7])  # (n, 8, 3) ego frame
    for index in range(len(frame.boxes)):
        color = _color(int(frame.labels[index]), class_names)
        box = frame.boxes[index]
        footprint = _to_cv_points(ego_xy_to_bev_pixels(corners[index, list(_FOOTPRINT), :2], size_px, range_m))
        centre_xy = box[:2]
        front_xy = corners[index, [0, 1], :2].mean(axis=0)
        if is_prediction:
            cv2.polylines(canvas, [footprint], True, color, 2, cv2.LINE_AA, 4)
        else:
            overlay = canvas.copy()
            cv2.fillPoly(overlay, [footprint], color, cv2.LINE_AA, 4)
            cv2.addWeighted(overlay, 0.35, canvas, 0.65, 0.0, dst=canvas)
            cv2.polylines(canvas, [footprint], True, color, 1, cv2.LINE_AA, 4)
        centre_px, front_px = ego_xy_to_bev_pixels(np.stack([centre_xy, front_xy]), size_px, range_m)
        cv2.line(canvas, tuple(_to_cv_points(centre_px)), tuple(_to_cv_points(front_px)), color,
                 2 if is_prediction else 1, cv2.LINE_AA, 4)
        velocity = box[7:9]
        if np.hypot(*velocity) * arrow_seconds * size_px / (2.0 * range_m) >= 2.0:  # at least 2 px long
            tip_px = ego_xy_to_bev_pixels(centre_xy + velocity * arrow_seconds, size_px, range_m)
            cv2.arrowedLine(canvas, tuple(_to_cv_points(centre_px)), tuple(_to_cv_points(tip_px)), color, 1,
                            cv2.LINE_AA, 4, 0.25)
        if is_prediction and show_scores and frame.scores is not None:
            anchor = np.round(ego_xy_to_bev_pixels(corners[index, 0, :2], size_px, range_m)).astype(int)
            cv2.putText(canvas, f"{frame.scores[index]:.2f}", (int(anchor[0]) + 2, int(anchor[1]) - 2),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.35, color, 1, cv2.LINE_AA)


def _draw_legend(canvas: np.ndarray, class_names: Sequence[str], labels_present: Iterable[int]) -> None:
    present = sorted({int(label) for label in labels_present if 0 <= int(label) < len(class_names)})
    lines = [("GT: filled   prediction: outline", _EGO_BGR)]
    lines += [(class_names[label], _color(label, class_names)) for label in present]
    for row, (text, color) in enumerate(lines):
        cv2.putText(canvas, text, (8, canvas.shape[0] - 10 - 16 * (len(lines) - 1 - row)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, color, 1, cv2.LINE_AA)


def render_bev(gt: FrameBoxes | None, pred: FrameBoxes | None, class_names: Sequence[str] = CLASS_NAMES,
               points_ego: np.ndarray | None = None, size_px: int = 800, range_m: float = 51.2,
               score_threshold: float | None = 0.3, arrow_seconds: float = 1.0, title: str | None = None,
               legend: bool = True, show_scores: bool = True) -> np.ndarray:
    """A bird's-eye view (module docstring) as a (size_px, size_px, 3) uint8 BGR image.

    Args:
        gt, pred: boxes in the ego frame (either may be None). Predictions below ``score_threshold`` are skipped.
        class_names: label index -> class name (colours).
        points_ego: (m, >=2) lidar points, ego frame, metres; None draws a 10 m grid instead.
        size_px: image side in pixels. range_m: metres from the ego to each image edge.
        arrow_seconds: velocity arrows end where the centre will be after this many seconds.
        title: text at the top left (e.g. the sample token). legend: class colours of the boxes drawn.
        show_scores: write each prediction's score beside it.
    """
    if size_px < 16 or range_m <= 0:
        raise ValueError(f"render_bev: size_px={size_px} (>= 16) and range_m={range_m} (> 0) expected")
    canvas = np.empty((size_px, size_px, 3), dtype=np.uint8)
    canvas[:] = _BACKGROUND_BGR
    _draw_bev_background(canvas, range_m, None if points_ego is None else np.asarray(points_ego))
    _draw_ego(canvas, range_m)
    labels_present: list[int] = []
    if gt is not None:
        _draw_bev_boxes(canvas, gt, class_names, range_m, is_prediction=False, arrow_seconds=arrow_seconds)
        labels_present += gt.labels.tolist()
    if pred is not None:
        shown = pred.above(score_threshold)
        _draw_bev_boxes(canvas, shown, class_names, range_m, is_prediction=True, arrow_seconds=arrow_seconds,
                        show_scores=show_scores)
        labels_present += shown.labels.tolist()
    if title:
        cv2.putText(canvas, title, (8, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, _EGO_BGR, 1, cv2.LINE_AA)
    if legend:
        _draw_legend(canvas, class_names, labels_present)
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------------------------
def project_box_edges(boxes: np.ndarray, ego2img: np.ndarray, near_m: float = 0.1,
                      edges: Sequence[tuple[int, int]] = _BOX_EDGES) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The image segments of every box's edges: per box, a list of ((u0, v0), (u1, v1)) pixel pairs.

    Args:
        boxes: (n, >=7) [x, y, z, w, l, h, yaw, ...], ego frame.
        ego2img: (4, 4) ego -> pixels of the image drawn on (intrinsics padded to 4x4 times ego2cam), so row 2 of
            ``ego2img @ p`` is the depth along the optical axis in metres.
        near_m: the near plane: each edge is cut where its depth is ``near_m`` (the homogeneous image point is
            linear along the 3D segment, so the cut is exact); edges wholly behind it are dropped.
        edges: corner index pairs (``geometry.box_corners`` order).
    Segments are not clipped to the image: OpenCV's line drawing does that.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(len(boxes), -1)
    if not len(boxes):
        return []
    corners = geometry.box_corners(boxes[:, :7])  # (n, 8, 3)
    ego2img = np.asarray(ego2img, dtype=np.float64)
    homogeneous = corners @ ego2img[:3, :3].T + ego2img[:3, 3]  # (n, 8, 3): (u*d, v*d, d)
    result = []
    for box_points in homogeneous:
        segments = []
        for a, b in edges:
            start, end = box_points[a], box_points[b]
            depth_start, depth_end = start[2], end[2]
            if depth_start < near_m and depth_end < near_m:
                continue
            if depth_start < near_m:
                start = start + (end - start) * (near_m - depth_start) / (depth_end - depth_start)
            elif depth_end < near_m:
                end = end + (start - end) * (near_m - depth_end) / (depth_start - depth_end)
            segments.append((start[:2] / start[2], end[:2] / end[2]))
        result.append(segments)
    return result


def draw_boxes_on_image(image_bgr: np.ndarray, frame: FrameBoxes, ego2img: np.ndarray,
                        class_names: Sequence[str] = CLASS_NAMES, is_prediction: bool = True,
                        near_m: float = 0.1) -> np.ndarray:
    """Draw ``frame``'s boxes onto ``image_bgr`` (in place; returned) through ``ego2img`` (for this image's size).

    Predictions: 2 px edges; ground truth: 1 px. The front face of each box carries a cross."""
    for index, segments in enumerate(project_box_edges(frame.boxes, ego2img, near_m,
                                                       edges=_BOX_EDGES + _FRONT_CROSS)):
        color = _color(int(frame.labels[index]), class_names)
        thickness = 2 if is_prediction else 1
        for start, end in segments:
            if not (np.all(np.isfinite(start)) and np.all(np.isfinite(end))):
                continue
            # Far-off points overflow OpenCV's int coordinates: clip the segment to a generous box first.
            ok, p0, p1 = cv2.clipLine((-10000, -10000, 20000 + image_bgr.shape[1], 20000 + image_bgr.shape[0]),
                                      tuple(int(v) for v in np.clip(np.round(start), -1e9, 1e9)),
                                      tuple(int(v) for v in np.clip(np.round(end), -1e9, 1e9)))
            if ok:
                cv2.line(image_bgr, p0, p1, color, thickness, cv2.LINE_AA)
    return image_bgr


def render_cameras(images_bgr: Mapping[str, np.ndarray], ego2img: Mapping[str, np.ndarray], gt: FrameBoxes | None,
                   pred: FrameBoxes | None, class_names: Sequence[str] = CLASS_NAMES, tile_width_px: int = 480,
                   score_threshold: float | None = 0.3, near_m: float = 0.1) -> np.ndarray:
    """The six cameras in :data:`CAMERA_LAYOUT` with the boxes drawn: (2 * tile_h, 3 * tile_width_px, 3) uint8.

    Args:
        images_bgr: camera name -> image (any size; every image is resized to ``tile_width_px`` wide, keeping the
            front camera's aspect ratio for the tile height).
        ego2img: camera name -> (4, 4) for the image as given (full resolution from the info file).
        gt, pred: boxes in the ego frame; predictions below ``score_threshold`` are skipped.
    """
    from bevdeform.data.transforms import scale_intrinsics

    missing = [name for row in CAMERA_LAYOUT for name in row if name not in images_bgr or name not in ego2img]
    if missing:
        raise ValueError(f"render_cameras: no image or ego2img for {missing}")
    front_h, front_w = images_bgr["CAM_FRONT"].shape[:2]
    tile_w = int(tile_width_px)
    tile_h = int(round(tile_w * front_h / front_w))
    shown_pred = None if pred is None else pred.above(score_threshold)
    rows = []
    for row in CAMERA_LAYOUT:
        tiles = []
        for name in row:
            image = images_bgr[name]
            height, width = image.shape[:2]
            tile = cv2.resize(image, (tile_w, tile_h), interpolation=cv2.INTER_AREA)
            # ego2img = K4 @ ego2cam: rescale K by the resize (half-pixel convention), keep ego2cam.
            matrix = np.asarray(ego2img[name], dtype=np.float64)
            scale = scale_intrinsics(np.eye(3), tile_w / width, tile_h / height)
            scale4 = np.eye(4)
            scale4[:3, :3] = scale
            tile_ego2img = scale4 @ matrix
            if gt is not None:
                draw_boxes_on_image(tile, gt, tile_ego2img, class_names, is_prediction=False, near_m=near_m)
            if shown_pred is not None:
                draw_boxes_on_image(tile, shown_pred, tile_ego2img, class_names, is_prediction=True, near_m=near_m)
            cv2.putText(tile, name, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(tile)
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def compose_frame(bev: np.ndarray, cameras: np.ndarray) -> np.ndarray:
    """BEV (scaled to the camera grid's height) on the left, the camera grid on the right: one animation frame."""
    height = cameras.shape[0]
    bev = cv2.resize(bev, (height, height), interpolation=cv2.INTER_AREA) if bev.shape[0] != height else bev
    return np.concatenate([bev, cameras], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Data of a sample
# ----------------------------------------------------------------------------------------------------------------
def load_lidar_points_ego(data_root: str | os.PathLike, info: Mapping[str, Any]) -> np.ndarray:
    """The keyframe's LIDAR_TOP points in the ego frame, (m, 3) metres (nuScenes .pcd.bin: float32 x 5 per point)."""
    path = Path(data_root) / info["lidar_path"]
    if not path.is_file():
        raise FileNotFoundError(f"lidar file {path} of sample {info['token']} does not exist")
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % 5:
        raise ValueError(f"lidar file {path}: {raw.size} floats, not a multiple of 5 (x, y, z, intensity, ring)")
    points_lidar = raw.reshape(-1, 5)[:, :3].astype(np.float64)
    return geometry.transform_points(np.asarray(info["lidar2ego"], dtype=np.float64), points_lidar)


def load_camera_images(data_root: str | os.PathLike, info: Mapping[str, Any]
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(camera name -> BGR image as on disk, camera name -> ego2img (4, 4) for that image) of a keyframe."""
    images, ego2img = {}, {}
    for name in CAMERA_NAMES:
        cam = info["cams"][name]
        path = Path(data_root) / cam["data_path"]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"camera image {path} ({name} of sample {info['token']}) cannot be read")
        images[name] = image
        ego2img[name] = geometry.ego2img_from(np.asarray(cam["intrinsics"], dtype=np.float64),
                                              np.asarray(cam["cam2ego"], dtype=np.float64))
    return images, ego2img


def gt_boxes_of_info(info: Mapping[str, Any], class_names: Sequence[str] = CLASS_NAMES) -> FrameBoxes:
    """The keyframe's annotations of ``class_names`` (ego frame, velocity NaN -> 0), all of them (also those
    without lidar points, which the evaluation skips)."""
    label_of = {name: index for index, name in enumerate(class_names)}
    names = list(info["gt_names"])
    keep = np.array([name in label_of for name in names], dtype=bool)
    boxes = np.asarray(info["gt_boxes"], dtype=np.float64).reshape(-1, 7)[keep]
    velocity = np.nan_to_num(np.asarray(info["gt_velocity"], dtype=np.float64).reshape(-1, 2)[keep])
    labels = np.array([label_of[name] for name, k in zip(names, keep) if k], dtype=np.int64)
    return FrameBoxes(np.concatenate([boxes, velocity], axis=1), labels)


def boxes_from_results(results: Sequence[Mapping[str, Any]], ego2global: np.ndarray,
                       class_names: Sequence[str] = CLASS_NAMES) -> FrameBoxes:
    """One sample's nuScenes result dicts (global frame) -> boxes in the sample's ego frame.

    Results of a class outside ``class_names`` are an error naming the class (a results file of other classes)."""
    label_of = {name: index for index, name in enumerate(class_names)}
    if not results:
        return FrameBoxes(np.zeros((0, 9)), np.zeros(0, dtype=np.int64), np.zeros(0))
    unknown = sorted({r["detection_name"] for r in results if r["detection_name"] not in label_of})
    if unknown:
        raise ValueError(f"results of sample {results[0]['sample_token']} name classes {unknown}, not among "
                         f"{list(class_names)}")
    boxes_ego = geometry.boxes_global_to_ego([r["translation"] for r in results], [r["size"] for r in results],
                                             [r["rotation"] for r in results], ego2global)
    velocity_ego = geometry.velocities_global_to_ego(np.array([r["velocity"][:2] for r in results], dtype=np.float64),
                                                     ego2global)
    labels = np.array([label_of[r["detection_name"]] for r in results], dtype=np.int64)
    scores = np.array([r["detection_score"] for r in results], dtype=np.float64)
    return FrameBoxes(np.concatenate([boxes_ego, velocity_ego], axis=1), labels, scores)


def find_info_files(data_root: str | os.PathLike, version: str) -> list[Path]:
    """The info files ``<data_root>/<version>_infos_*.json``, sorted."""
    return sorted(Path(data_root).glob(f"{version}_infos_*.json"))


def select_frames(info_paths: Sequence[str | os.PathLike], scene: str | None = None, sample: str | None = None
                  ) -> tuple[Path, list[dict[str, Any]], int]:
    """Find a scene (by name or token) or a sample (by token) in the info files.

    Returns (the info file holding it, the infos of its whole scene in time order, the index of the requested
    sample in that list, or of the scene's last frame when a scene was asked for). With neither, the first scene
    of the first file. Errors name what was searched.
    """
    from bevdeform.data.infos import load_infos

    if scene is not None and sample is not None:
        raise ValueError("pass --scene or --sample, not both")
    if not info_paths:
        raise FileNotFoundError("no info files to search (create them with data_prep/create_infos.py)")
    for path in info_paths:
        _, infos = load_infos(path)
        if not infos:
            continue
        if scene is None and sample is None:
            first = infos[0]["scene_token"]
            frames = [info for info in infos if info["scene_token"] == first]
            return Path(path), frames, len(frames) - 1
        for info in infos:
            if (sample is not None and info["token"] == sample) or \
                    (scene is not None and scene in (info["scene_name"], info["scene_token"])):
                frames = [other for other in infos if other["scene_token"] == info["scene_token"]]
                frames.sort(key=lambda other: other["frame_idx"])
                index = len(frames) - 1 if sample is None else \
                    next(i for i, other in enumerate(frames) if other["token"] == sample)
                return Path(path), frames, index
    what = f"scene {scene!r}" if scene is not None else f"sample {sample!r}"
    raise ValueError(f"{what} is in none of the info files {[str(p) for p in info_paths]}")


def predict_scene(model, cfg, info_path: str | os.PathLike, data_root: str | os.PathLike,
                  sample_tokens: Sequence[str], progress: Callable[[str], None] | None = None
                  ) -> dict[str, FrameBoxes]:
    """Run the streaming detector over frames of one scene in time order (the BEV carried from frame to frame).

    Args:
        model: a ``BEVFormer`` (eval mode is set). cfg: its config (image size, classes, range, padding).
        info_path: the info file holding the frames; data_root: what its paths are relative to.
        sample_tokens: the frames to run, consecutive from the scene's first one you want history from.
    Returns:
        sample token -> predicted boxes in that frame's ego frame (all of the model's top-k, with scores).
    """
    import torch

    from bevdeform.data.dataset import NuScenesCameraDataset, collate
    from bevdeform.models.bevformer import StreamingBEVFormer

    dataset = NuScenesCameraDataset(info_path, data_root, cfg.data.image_size_hw, queue_length=1,
                                    class_names=cfg.data.class_names, point_cloud_range_m=cfg.data.point_cloud_range_m,
                                    pad_multiple=cfg.data.pad_multiple,
                                    bevformer_v1_inputs=cfg.data.bevformer_v1_inputs,
                                    image_pipeline=cfg.data.image_pipeline)
    # A bevformer_v1 compatibility detector predicts in the LIDAR_TOP frame: its boxes are moved into the ego frame.
    in_lidar_frame = getattr(model, "input_frame", "ego") == "lidar"
    index_of = {token: index for index, token in enumerate(dataset.sample_tokens.tolist())}
    missing = [token for token in sample_tokens if token not in index_of]
    if missing:
        raise ValueError(f"samples {missing[:3]} are not in {info_path}")
    stream = StreamingBEVFormer(model.eval(), max_cached_scenes=1)
    device = next(model.parameters()).device
    predictions = {}
    for position, token in enumerate(sample_tokens):
        batch = collate([dataset[index_of[token]]])
        batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        with torch.no_grad():
            found = stream.step_batch(batch)[0]
        boxes = found["boxes"].double().cpu().numpy()  # (k, 9) [x, y, z, w, l, h, yaw, vx, vy]
        if in_lidar_frame:
            from bevdeform.compat.frames import lidar_boxes_to_ego

            boxes = lidar_boxes_to_ego(boxes, batch["lidar2ego"][0].cpu().numpy())
        predictions[token] = FrameBoxes(boxes.astype(np.float32), found["labels"].cpu().numpy(),
                                        found["scores"].float().cpu().numpy())
        if progress:
            progress(f"predicted {position + 1}/{len(sample_tokens)} frames")
    return predictions


def render_sample(info: Mapping[str, Any], data_root: str | os.PathLike, pred: FrameBoxes | None,
                  class_names: Sequence[str] = CLASS_NAMES, score_threshold: float | None = 0.3,
                  bev_size_px: int = 800, range_m: float = 51.2, tile_width_px: int = 480, with_gt: bool = True,
                  with_lidar: bool = True) -> dict[str, np.ndarray]:
    """The pictures of one keyframe: ``{'bev', 'cameras', 'frame'}`` (BGR uint8; frame = BEV beside the cameras).

    Lidar points are drawn when the info's lidar file exists and ``with_lidar`` is set (else the grid).
    """
    gt = gt_boxes_of_info(info, class_names) if with_gt else None
    points = None
    if with_lidar and (Path(data_root) / info["lidar_path"]).is_file():
        points = load_lidar_points_ego(data_root, info)
    title = f"{info.get('scene_name', '')} #{info.get('frame_idx', '')} {info['token'][:12]}"
    bev = render_bev(gt, pred, class_names, points_ego=points, size_px=bev_size_px, range_m=range_m,
                     score_threshold=score_threshold, title=title)
    images, ego2img = load_camera_images(data_root, info)
    cameras = render_cameras(images, ego2img, gt, pred, class_names, tile_width_px=tile_width_px,
                             score_threshold=score_threshold)
    return {"bev": bev, "cameras": cameras, "frame": compose_frame(bev, cameras)}


# ----------------------------------------------------------------------------------------------------------------
# Animation
# ----------------------------------------------------------------------------------------------------------------
def write_animation(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: float = 2.0) -> Path:
    """Write BGR frames (all of one size) as an MP4 (OpenCV's VideoWriter, codec mp4v) or a GIF (Pillow), chosen
    by the suffix of ``path`` (.mp4 or .gif). Odd frame sizes are padded by a pixel for the MP4 codec."""
    path = Path(path)
    if not frames:
        raise ValueError(f"write_animation: no frames for {path}")
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise ValueError(f"write_animation: frames of different sizes {sorted(shapes)} for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        from PIL import Image

        pictures = [Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)) for frame in frames]
        pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=int(round(1000.0 / fps)), loop=0)
        return path
    if suffix != ".mp4":
        raise ValueError(f"write_animation: {path} must end in .mp4 or .gif")
    height, width = frames[0].shape[:2]
    even_h, even_w = height + height % 2, width + width % 2
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (even_w, even_h))
    if not writer.isOpened():
        raise RuntimeError(f"write_animation: OpenCV cannot open an MP4 writer for {path} (no mp4v encoder in this "
                           f"OpenCV build?); write a .gif instead")
    try:
        for frame in frames:
            if (even_h, even_w) != (height, width):
                frame = cv2.copyMakeBorder(frame, 0, even_h - height, 0, even_w - width, cv2.BORDER_CONSTANT)
            writer.write(np.ascontiguousarray(frame))
    finally:
        writer.release()
    return path


# ----------------------------------------------------------------------------------------------------------------
# The devkit's evaluation curves
# ----------------------------------------------------------------------------------------------------------------
def render_metric_curves(metrics_summary_path: str | os.PathLike, metrics_details_path: str | os.PathLike,
                         out_dir: str | os.PathLike) -> list[Path]:
    """The devkit's PR and TP-error plots (``nuscenes.eval.detection.render``) of an evaluation, as PNG files.

    Args:
        metrics_summary_path: ``metrics_summary.json`` (``DetectionMetrics.serialize()``, with its ``cfg``).
        metrics_details_path: ``metrics_details.json`` (``DetectionMetricDataList.serialize()``), what the devkit's
            ``DetectionEval.main`` writes (:func:`evaluate_and_render_curves` writes it too).
        out_dir: receives summary.png, <class>_pr.png, <class>_tp.png and dist_pr_<threshold>.png.
    """
    import matplotlib

    matplotlib.use("Agg")
    from nuscenes.eval.detection.data_classes import DetectionMetricDataList, DetectionMetrics
    from nuscenes.eval.detection.render import class_pr_curve, class_tp_curve, dist_pr_curve, summary_plot

    summary_path, details_path = Path(metrics_summary_path), Path(metrics_details_path)
    for path in (summary_path, details_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (render_metric_curves needs metrics_summary.json and "
                                    f"metrics_details.json of one evaluation)")
    summary = json.loads(summary_path.read_text())
    if "cfg" not in summary:
        raise ValueError(f"{summary_path} has no 'cfg': not a DetectionMetrics.serialize() output")
    metrics = DetectionMetrics.deserialize(summary)
    md_list = DetectionMetricDataList.deserialize(json.loads(details_path.read_text()))
    cfg = metrics.cfg
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "summary.png"]
    summary_plot(md_list, metrics, min_precision=cfg.min_precision, min_recall=cfg.min_recall,
                 dist_th_tp=cfg.dist_th_tp, savepath=str(written[0]))
    for name in cfg.class_names:
        pr_path, tp_path = out_dir / f"{name}_pr.png", out_dir / f"{name}_tp.png"
        class_pr_curve(md_list, metrics, name, cfg.min_precision, cfg.min_recall, savepath=str(pr_path))
        class_tp_curve(md_list, metrics, name, cfg.min_recall, cfg.dist_th_tp, savepath=str(tp_path))
        written += [pr_path, tp_path]
    for dist_th in cfg.dist_ths:
        dist_path = out_dir / f"dist_pr_{dist_th}.png"
        dist_pr_curve(md_list, metrics, dist_th, cfg.min_precision, cfg.min_recall, savepath=str(dist_path))
        written.append(dist_path)
    return written


def evaluate_and_render_curves(results_path: str | os.PathLike, data_root: str | os.PathLike, version: str,
                               eval_set: str, out_dir: str | os.PathLike, nusc=None) -> list[Path]:
    """Score a results JSON with the devkit's DetectionEval (``detection_cvpr_2019``), write its
    metrics_summary.json and metrics_details.json into ``out_dir`` and render the curves there
    (:func:`render_metric_curves`). ``eval_set`` as ``bevdeform.evaluation.evaluate_results``."""
    from nuscenes import NuScenes
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    results_path, out_dir = Path(results_path), Path(out_dir)
    if not results_path.is_file():
        raise FileNotFoundError(f"--results {results_path}: no such file")
    out_dir.mkdir(parents=True, exist_ok=True)
    if nusc is None:
        nusc = NuScenes(version=version, dataroot=str(data_root), verbose=False)
    evaluator = DetectionEval(nusc, config=config_factory("detection_cvpr_2019"), result_path=str(results_path),
                              eval_set=eval_set, output_dir=str(out_dir), verbose=False)
    metrics, md_list = evaluator.evaluate()
    summary_path, details_path = out_dir / "metrics_summary.json", out_dir / "metrics_details.json"
    summary_path.write_text(json.dumps(metrics.serialize(), indent=2))
    details_path.write_text(json.dumps(md_list.serialize()))
    return render_metric_curves(summary_path, details_path, out_dir)


# ----------------------------------------------------------------------------------------------------------------
# What scripts/visualize.py does
# ----------------------------------------------------------------------------------------------------------------
def _resolve_data(data_root: str | os.PathLike | None, version: str | None,
                  log: Callable[[str], None]) -> tuple[Path, str, list[Path]]:
    """(data root, version, info files) of the data to draw; the embedded synthetic set without a data root; info
    files are made (``create_infos``) when the version has none yet."""
    if data_root is None:
        from bevdeform.data.synthetic import VERSION
        from bevdeform.train import prepare_synthetic_data

        if version is not None and version != VERSION:
            raise ValueError(f"--version {version} without --data-root: the embedded synthetic set is {VERSION}")
        root, version = prepare_synthetic_data(), VERSION
    else:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data-root {root}: no such folder")
        if version is None:
            versions = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "sample.json").is_file())
            if len(versions) != 1:
                raise ValueError(f"--data-root {root}: pass --version (folders with nuScenes tables: "
                                 f"{versions or 'none'})")
            version = versions[0]
    paths = find_info_files(root, version)
    if not paths:
        from bevdeform.data.infos import create_infos

        log(f"no info files {root}/{version}_infos_*.json: creating them (create_infos)")
        create_infos(root, version, progress=False)
        paths = find_info_files(root, version)
    return root, version, paths


def visualize(out_dir: str | os.PathLike, config: str | None = None, checkpoint: str | None = None,
              overrides: Sequence[str] = (), results: str | os.PathLike | None = None,
              data_root: str | os.PathLike | None = None, version: str | None = None, scene: str | None = None,
              sample: str | None = None, score_threshold: float = 0.3, range_m: float = 55.0, bev_size_px: int = 800,
              tile_width_px: int = 480, animation: str | None = "mp4", fps: float = 2.0, curves: bool = False,
              metrics_dir: str | os.PathLike | None = None, device: str = "cpu",
              log: Callable[[str], None] = print) -> list[Path]:
    """Draw predictions of a model (``config`` + ``checkpoint``) or of a results JSON (``results``) on a scene or a
    sample; returns the files written into ``out_dir``.

    Per keyframe: ``<scene>_<frame>_<token>_bev.png``, ``..._cameras.png`` and ``..._frame.png`` (BEV beside the
    cameras). A scene (``scene``, or the first scene of the data when neither scene nor sample is given) also gets
    ``<scene>.mp4`` (or .gif, ``animation``; None for none). A model runs over the scene from its first frame so
    the BEV history is that of evaluation. ``curves``: score ``results`` with the devkit on the split that holds
    its samples and render the PR and TP curves into ``out_dir/curves``; ``metrics_dir``: render them from an
    evaluation folder's metrics_summary.json and metrics_details.json instead.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if metrics_dir is not None:
        metrics_dir = Path(metrics_dir)
        written += render_metric_curves(metrics_dir / "metrics_summary.json", metrics_dir / "metrics_details.json",
                                        out_dir / "curves")
        if config is None and results is None:
            return written
    if (config is None) == (results is None):
        raise ValueError("pass --config (with --checkpoint: a model predicts) or --results FILE (a results JSON), "
                         "not both")
    if curves and results is None:
        raise ValueError("--curves scores a results JSON: pass --results FILE")
    root, version, info_paths = _resolve_data(data_root, version, log)
    info_path, frames, index = select_frames(info_paths, scene, sample)
    wanted = frames if sample is None else frames[index:index + 1]
    class_names: Sequence[str] = CLASS_NAMES
    predictions: dict[str, FrameBoxes | None] = {}
    if config is not None:
        import torch

        from bevdeform.export import load_detector

        cfg, model = load_detector(config, checkpoint, overrides)
        model = model.to(torch.device(device))
        class_names = cfg.data.class_names
        if checkpoint is None:
            log("no --checkpoint: the model has random weights (its boxes are noise)")
        history = [info["token"] for info in frames[:index + 1]] if sample is not None \
            else [info["token"] for info in frames]
        predictions.update(predict_scene(model, cfg, info_path, root, history, progress=log))
    else:
        results_path = Path(results)
        if not results_path.is_file():
            raise FileNotFoundError(f"--results {results_path}: no such file")
        by_token = json.loads(results_path.read_text()).get("results")
        if not isinstance(by_token, dict):
            raise ValueError(f"--results {results_path}: no 'results' object (not a nuScenes results file)")
        for info in wanted:
            found = by_token.get(info["token"])
            if found is None:
                log(f"--results {results_path} has no entry for sample {info['token']}: drawing its GT only")
            predictions[info["token"]] = None if found is None else boxes_from_results(found, info["ego2global"],
                                                                                          class_names)
        if curves:
            holder = next((path for path in info_paths
                           if any(i["token"] in by_token for i in _infos_of(path))), None)
            if holder is None:
                raise ValueError(f"--results {results_path}: none of its samples is in {[str(p) for p in info_paths]}")
            split = _infos_metadata(holder)["split"]
            log(f"scoring {results_path} on {version} {split} and rendering the curves")
            written += evaluate_and_render_curves(results_path, root, version, split, out_dir / "curves")
    frame_images = []
    for info in wanted:
        pictures = render_sample(info, root, predictions.get(info["token"]), class_names, score_threshold,
                                 bev_size_px=bev_size_px, range_m=range_m, tile_width_px=tile_width_px)
        stem = f"{info['scene_name']}_{int(info['frame_idx']):03d}_{info['token'][:12]}"
        for kind in ("bev", "cameras", "frame"):
            path = out_dir / f"{stem}_{kind}.png"
            if not cv2.imwrite(str(path), pictures[kind]):
                raise RuntimeError(f"cannot write {path}")
            written.append(path)
        frame_images.append(pictures["frame"])
    if sample is None and animation is not None:
        written.append(write_animation(frame_images, out_dir / f"{wanted[0]['scene_name']}.{animation}", fps=fps))
    return written


def _infos_of(path: str | os.PathLike) -> list[dict[str, Any]]:
    from bevdeform.data.infos import load_infos

    return load_infos(path)[1]


def _infos_metadata(path: str | os.PathLike) -> dict[str, Any]:
    from bevdeform.data.infos import load_infos

    return load_infos(path)[0]
