"""The LIDAR_TOP frame of BEVFormer's published checkpoints: projections into the cameras and boxes out to the world.

The official model works in the keyframe's LIDAR_TOP frame (lidar x = ego -y, lidar y = ego x, ~1.84 m above the
ego origin). What this module computes, following the official code's semantics:

- ``lidar2img_from``: per camera, LIDAR_TOP -> pixels. The official converter stores ``sensor2lidar`` (camera ->
  ego at the camera time -> global -> ego at the lidar time -> lidar, ``obtain_sensor2top``), the dataset inverts
  it and left-multiplies the intrinsics padded to 4x4 (``get_data_info``); the test pipeline's
  ``RandomScaleImageMultiViewImage`` then left-multiplies ``diag(s, s, 1, 1)``, the plain resize factor (no
  half-pixel term), and padding right/bottom moves no pixel. bevdeform's info files hold exactly that camera ->
  lidar transform as ``cam2lidar``.
- ``lidar_boxes_to_global``: boxes in the devkit convention in the LIDAR_TOP frame ([x, y, z of the centre, w, l,
  h, yaw about lidar z, vx, vy in lidar axes]) -> the results-JSON fields in the global frame, by the chain of
  mmdet3d 0.17's ``lidar_nusc_box_to_global``: the devkit ``Box`` rotated by lidar2ego's quaternion and
  translated, then rotated by ego2global's and translated (the velocity is rotated with the box; full 3D rotations,
  so a tilted lidar tilts the box).
- ``lidar_boxes_to_ego``: the same boxes in bevdeform's ego-frame box format ([x, y, z centre, w, l, h, yaw about
  ego z, vx, vy in ego axes]), the input of ``bevdeform.evaluation.boxes_to_results``; the yaw is the heading of
  the box's rotated +x axis in the ego xy plane (pitch/roll from a tilted lidar are dropped, as bevdeform's ego boxes
  have none).

numpy float64 throughout; inputs may be lists, numpy arrays or torch tensors (converted to numpy).
"""

from __future__ import annotations

import numpy as np

from bevdeform import geometry


def _numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def lidar2img_from(intrinsics, cam2lidar, resize_scale_xy=(1.0, 1.0)) -> np.ndarray:
    """(..., 4, 4) LIDAR_TOP -> image pixels of the image as fed, as the official dataset + test pipeline compose it.

    intrinsics: (..., 3, 3) of the image on disk. cam2lidar: (..., 4, 4) camera -> LIDAR_TOP at the keyframe's lidar
    time (the info file's ``cam2lidar`` = the official ``sensor2lidar_rotation/translation``). resize_scale_xy: the
    plain factor the image was resized by (official: the variant's scale; here target size / size on disk), applied
    as ``diag(sx, sy, 1, 1) @ lidar2img`` (the official convention: no half-pixel shift of the principal point).
    Pixel u of a lidar point p: ``(lidar2img @ p)[0] / (lidar2img @ p)[2]``.
    """
    intrinsics = _numpy(intrinsics)
    cam2lidar = _numpy(cam2lidar)
    if intrinsics.shape[-2:] != (3, 3) or cam2lidar.shape[-2:] != (4, 4):
        raise ValueError(f"intrinsics must be (..., 3, 3) and cam2lidar (..., 4, 4), got {intrinsics.shape} and "
                         f"{cam2lidar.shape}")
    lidar2cam = geometry.invert_rigid_transform(cam2lidar)
    lidar2img = geometry.intrinsics_to_4x4(intrinsics) @ lidar2cam
    scale = np.diag([float(resize_scale_xy[0]), float(resize_scale_xy[1]), 1.0, 1.0])
    return scale @ lidar2img


def _check_boxes(boxes_lidar) -> np.ndarray:
    boxes = _numpy(boxes_lidar)
    if boxes.ndim != 2 or boxes.shape[1] != 9:
        raise ValueError(f"boxes_lidar must be (n, 9) [x, y, z, w, l, h, yaw, vx, vy], got shape {boxes.shape}")
    return boxes


def _check_transform(matrix, name: str) -> np.ndarray:
    matrix = _numpy(matrix)
    if matrix.shape != (4, 4):
        raise ValueError(f"{name} must be a 4x4 matrix, got shape {matrix.shape}")
    return matrix


def lidar_boxes_to_ego(boxes_lidar, lidar2ego) -> np.ndarray:
    """(n, 9) boxes in the LIDAR_TOP frame (devkit convention, see the module docstring) -> (n, 9) in bevdeform's ego
    frame [x, y, z centre, w, l, h, yaw_ego (rad, wrapped to [-pi, pi)), vx, vy (m/s, ego axes)].

    Centre: the full rigid transform. Yaw: the heading, in the ego xy plane, of the box's +x axis rotated by
    lidar2ego (for the real rig's -90 degree lidar: yaw_lidar - pi/2 up to a few millidegrees of mounting tilt).
    Velocity: (vx, vy, 0) rotated by lidar2ego, its ego x and y.
    """
    boxes = _check_boxes(boxes_lidar)
    lidar2ego = _check_transform(lidar2ego, "lidar2ego")
    centres_ego = geometry.transform_points(lidar2ego, boxes[:, 0:3])
    # The box's heading vector (cos, sin, 0) in lidar axes, then in ego axes.
    heading_lidar = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), np.zeros(len(boxes))], axis=1)
    heading_ego = geometry.rotate_vectors(lidar2ego, heading_lidar)
    yaw_ego = geometry.wrap_angle(np.arctan2(heading_ego[:, 1], heading_ego[:, 0]))
    velocity_lidar = np.concatenate([boxes[:, 7:9], np.zeros((len(boxes), 1))], axis=1)
    velocity_ego = geometry.rotate_vectors(lidar2ego, velocity_lidar)[:, 0:2]
    return np.concatenate([centres_ego, boxes[:, 3:6], yaw_ego[:, None], velocity_ego], axis=1)


def lidar_boxes_to_global(boxes_lidar, lidar2ego, ego2global):
    """(n, 9) LIDAR_TOP-frame boxes -> results-JSON fields in the global frame, by the official chain.

    Returns (translation (n, 3), size_wlh (n, 3), rotation_wxyz (n, 4) with w >= 0, velocity (n, 2)), float64:
    the devkit Box's ``center``, ``wlh``, ``orientation`` and ``velocity[:2]`` after ``rotate(lidar2ego q)``,
    ``translate(lidar2ego t)``, ``rotate(ego2global q)``, ``translate(ego2global t)``.
    """
    boxes = _check_boxes(boxes_lidar)
    lidar2ego = _check_transform(lidar2ego, "lidar2ego")
    ego2global = _check_transform(ego2global, "ego2global")
    lidar2global = ego2global @ lidar2ego
    translation = geometry.transform_points(lidar2global, boxes[:, 0:3])
    rotation_lidar2global = geometry.rotation_matrix_to_quaternion(lidar2global[:3, :3])
    rotation = geometry.quaternion_multiply(rotation_lidar2global, geometry.yaw_to_quaternion(boxes[:, 6]))
    rotation = np.where(rotation[:, :1] < 0, -rotation, rotation)
    velocity_lidar = np.concatenate([boxes[:, 7:9], np.zeros((len(boxes), 1))], axis=1)
    velocity = geometry.rotate_vectors(lidar2global, velocity_lidar)[:, 0:2]
    return translation, boxes[:, 3:6].copy(), rotation, velocity


def ego_boxes_to_lidar(boxes_ego, lidar2ego) -> np.ndarray:
    """Inverse of ``lidar_boxes_to_ego``: (n, 9) bevdeform ego-frame boxes (the batch's ``gt_boxes``) -> (n, 9) in the
    LIDAR_TOP frame, devkit convention [x, y, z centre, w, l, h, yaw about lidar z, vx, vy in lidar axes], e.g. GT
    targets for fine-tuning a model that predicts in the lidar frame. (The official converter's mmdet3d yaw is
    ``-yaw - pi/2`` of this yaw, with the same w, l, h.)"""
    boxes = _check_boxes(boxes_ego)
    lidar2ego = _check_transform(lidar2ego, "lidar2ego")
    return lidar_boxes_to_ego(boxes, geometry.invert_rigid_transform(lidar2ego))
