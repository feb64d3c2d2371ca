"""Frames, rigid transforms, projections and boxes: torch and numpy only.

Conventions (docs/data-format.md is the contract):
- ego frame: x forward, y left, z up, metres, at the keyframe's LIDAR_TOP timestamp.
- camera frame: x right, y down, z forward (the nuScenes devkit's).
- quaternions are (w, x, y, z), as nuScenes stores them and pyquaternion takes them.
- a 4x4 named ``a2b`` maps homogeneous points from frame a to frame b: ``p_b = a2b @ p_a``.
- a box is ``[x, y, z, w, l, h, yaw]``: centre (m), size (m, ``l`` along the heading), yaw (rad)
  counter-clockwise about +z from +x to the box's heading, wrapped to [-pi, pi).

Functions whose docstring says "numpy or torch" take either and return the same kind (torch keeps dtype and
device; numpy integers are promoted to float64). Leading batch dimensions broadcast where stated.

This module is imported by the model: keep its imports to math, numpy and torch.
"""

import math

import numpy as np
import torch

# Devkit `Box.corners()` order: corners 0-3 face forward (+l/2), 4-7 backward; within each group the pattern in
# (y, z) is (+,+), (-,+), (-,-), (+,-). Unit half-extents, multiplied by (l, w, h) / 2.
_CORNER_SIGNS_XYZ = (
    (1, 1, 1), (1, -1, 1), (1, -1, -1), (1, 1, -1),
    (-1, 1, 1), (-1, -1, 1), (-1, -1, -1), (-1, 1, -1),
)


def _xp(x):
    """The array module of x: torch for tensors, numpy otherwise (both name the functions used here alike)."""
    return torch if isinstance(x, torch.Tensor) else np


def _as_float(x):
    """x as a floating array of its own kind: numpy input -> float64 unless already floating."""
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.double()
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def _constant_like(values, like):
    """A constant array with like's kind, dtype and device."""
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return np.asarray(values, dtype=like.dtype)


def _swap_last_two(x):
    return x.transpose(-1, -2) if isinstance(x, torch.Tensor) else np.swapaxes(x, -1, -2)


# ----------------------------------------------------------------------------------------------------------------
# Angles and quaternions (numpy)
# ----------------------------------------------------------------------------------------------------------------

def wrap_angle(angle_rad):
    """Wrap angles (rad, numpy or torch or float) to [-pi, pi)."""
    return (angle_rad + math.pi) % (2.0 * math.pi) - math.pi


def quaternion_to_rotation_matrix(quaternion_wxyz) -> np.ndarray:
    """Rotation matrices (..., 3, 3) float64 from quaternions (..., 4) as (w, x, y, z); normalised first.

    Raises ValueError for a zero-norm quaternion (nuScenes records never hold one: it marks corrupt input).
    """
    q = np.asarray(quaternion_wxyz, dtype=np.float64)
    if q.shape[-1] != 4:
        raise ValueError(f"quaternion_wxyz must have a last dimension of 4 (w, x, y, z), got shape {q.shape}")
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(norm < 1e-12):
        raise ValueError(f"quaternion_wxyz contains a zero-norm quaternion: {q.reshape(-1, 4)[norm.reshape(-1) < 1e-12][0]}")
    w, x, y, z = np.moveaxis(q / norm, -1, 0)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def rotation_matrix_to_quaternion(rotation) -> np.ndarray:
    """Quaternions (..., 4) float64 as (w, x, y, z) with w >= 0 from rotation matrices (..., 3, 3).

    Shepperd's method: each matrix uses the formula built on its largest of (trace, R00, R11, R22), so no division
    by a small number happens near 180-degree rotations.
    """
    r = np.asarray(rotation, dtype=np.float64)
    if r.shape[-2:] != (3, 3):
        raise ValueError(f"rotation must have shape (..., 3, 3), got {r.shape}")
    r00, r01, r02 = r[..., 0, 0], r[..., 0, 1], r[..., 0, 2]
    r10, r11, r12 = r[..., 1, 0], r[..., 1, 1], r[..., 1, 2]
    r20, r21, r22 = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
    # One candidate per pivot; clamp under the root so the unused candidates stay finite.
    s_w = 2.0 * np.sqrt(np.maximum(1.0 + r00 + r11 + r22, 1e-12))
    s_x = 2.0 * np.sqrt(np.maximum(1.0 + r00 - r11 - r22, 1e-12))
    s_y = 2.0 * np.sqrt(np.maximum(1.0 - r00 + r11 - r22, 1e-12))
    s_z = 2.0 * np.sqrt(np.maximum(1.0 - r00 - r11 + r22, 1e-12))
    candidates = np.stack([
        np.stack([s_w / 4, (r21 - r12) / s_w, (r02 - r20) / s_w, (r10 - r01) / s_w], axis=-1),
        np.stack([(r21 - r12) / s_x, s_x / 4, (r01 + r10) / s_x, (r02 + r20) / s_x], axis=-1),
        np.stack([(r02 - r20) / s_y, (r01 + r10) / s_y, s_y / 4, (r12 + r21) / s_y], axis=-1),
        np.stack([(r10 - r01) / s_z, (r02 + r20) / s_z, (r12 + r21) / s_z, s_z / 4], axis=-1),
    ], axis=-2)  # (..., 4 candidates, 4)
    pivot = np.argmax(np.stack([r00 + r11 + r22, r00, r11, r22], axis=-1), axis=-1)
    q = np.take_along_axis(candidates, pivot[..., None, None], axis=-2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


def yaw_to_quaternion(yaw_rad) -> np.ndarray:
    """Quaternions (..., 4) (w, x, y, z) of rotations by yaw_rad (...,) about +z (counter-clockwise seen from above)."""
    half = 0.5 * np.asarray(yaw_rad, dtype=np.float64)
    zeros = np.zeros_like(half)
    return np.stack([np.cos(half), zeros, zeros, np.sin(half)], axis=-1)


def quaternion_multiply(q1_wxyz, q2_wxyz) -> np.ndarray:
    """Hamilton product q1 * q2 (..., 4), (w, x, y, z): the rotation q2 first, then q1 (as R1 @ R2)."""
    a = np.asarray(q1_wxyz, dtype=np.float64)
    b = np.asarray(q2_wxyz, dtype=np.float64)
    w1, x1, y1, z1 = np.moveaxis(a, -1, 0)
    w2, x2, y2, z2 = np.moveaxis(b, -1, 0)
    return np.stack([
        w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
    ], axis=-1)


def yaw_from_rotation_matrix(rotation):
    """Yaw (rad, (...,)) of rotation matrices (..., 3, 3), numpy or torch.

    The heading of the rotated +x axis projected on the xy plane, counter-clockwise from +x: what the devkit's
    `quaternion_yaw` and pyquaternion's `yaw_pitch_roll[0]` give. In [-pi, pi].
    """
    xp = _xp(rotation)
    return xp.arctan2(rotation[..., 1, 0], rotation[..., 0, 0])


# ----------------------------------------------------------------------------------------------------------------
# Rigid transforms (4x4)
# ----------------------------------------------------------------------------------------------------------------

def transform_from(rotation_wxyz, translation) -> np.ndarray:
    """4x4 float64 transform(s) (..., 4, 4) from a quaternion (..., 4) (w, x, y, z) and a translation (..., 3) (m).

    With a nuScenes record (calibrated_sensor, ego_pose) this is ``sensor2ego`` or ``ego2global``.
    """
    rotation = quaternion_to_rotation_matrix(rotation_wxyz)
    translation = np.asarray(translation, dtype=np.float64)
    if translation.shape[-1] != 3:
        raise ValueError(f"translation must have a last dimension of 3 (metres), got shape {translation.shape}")
    batch_shape = np.broadcast_shapes(rotation.shape[:-2], translation.shape[:-1])
    out = np.zeros(batch_shape + (4, 4), dtype=np.float64)
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out


def invert_rigid_transform(a2b):
    """b2a from a rigid a2b (..., 4, 4), numpy or torch: [R^T, -R^T t], exact where a general inverse is not."""
    a2b = _as_float(a2b)
    rotation_t = _swap_last_two(a2b[..., :3, :3])
    out = _xp(a2b).zeros_like(a2b)
    out[..., :3, :3] = rotation_t
    out[..., :3, 3] = -(rotation_t @ a2b[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def transform_points(a2b, points_a):
    """Points in frame b (..., n, 3) from points in frame a (..., n, 3) and a2b (..., 4, 4), numpy or torch.

    Batch dimensions broadcast: a2b (B, 4, 4) with points (B, n, 3), or a single a2b (4, 4) with any points.
    """
    a2b = _as_float(a2b)
    points_a = _as_float(points_a)
    # (..., n, 3) @ (..., 3, 3)^T + (..., 1, 3)
    return points_a @ _swap_last_two(a2b[..., :3, :3]) + a2b[..., None, :3, 3]


def rotate_vectors(a2b, vectors_a):
    """Direction vectors (velocities, offsets) (..., n, 3) from frame a's axes into frame b's axes: rotation only."""
    a2b = _as_float(a2b)
    vectors_a = _as_float(vectors_a)
    return vectors_a @ _swap_last_two(a2b[..., :3, :3])


# ----------------------------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------------------------

def intrinsics_to_4x4(intrinsics):
    """The 3x3 camera matrix (..., 3, 3) (pixels) padded to (..., 4, 4) with a 1 at [3, 3], numpy or torch."""
    intrinsics = _as_float(intrinsics)
    if isinstance(intrinsics, torch.Tensor):
        out = intrinsics.new_zeros(intrinsics.shape[:-2] + (4, 4))
    else:
        out = np.zeros(intrinsics.shape[:-2] + (4, 4), dtype=intrinsics.dtype)
    out[..., :3, :3] = intrinsics
    out[..., 3, 3] = 1.0
    return out


def ego2img_from(intrinsics, cam2ego):
    """ego2img (..., 4, 4) = K4 @ inv(cam2ego), numpy or torch (BEVFormer's "lidar2img" for the ego frame).

    intrinsics: (..., 3, 3) pixels, for the image as fed to the network. cam2ego: (..., 4, 4), camera -> ego.
    """
    return intrinsics_to_4x4(intrinsics) @ invert_rigid_transform(cam2ego)


def project_points(ego2img, points_ego, eps: float = 1e-5):
    """Project ego points onto the image: (pixels_uv (..., n, 2), depth (..., n)), numpy or torch.

    ego2img: (..., 4, 4); points_ego: (..., n, 3) metres. depth is metres along the optical axis; the pixels are
    meaningful only where depth > 0 (in front of the camera): the divisor is clamped at eps, as BEVFormer does, so
    points behind the camera give finite, far-off pixels instead of NaN/inf. Mask with ``depth > eps``.
    """
    points_img = transform_points(ego2img, points_ego)  # (..., n, 3): (u*d, v*d, d)
    depth = points_img[..., 2]
    xp = _xp(points_img)
    divisor = xp.maximum(depth, _constant_like(eps, depth))
    return points_img[..., :2] / divisor[..., None], depth


# ----------------------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------------------

def yaw_rotation_matrix(yaw_rad):
    """Rotation matrices (..., 3, 3) about +z by yaw_rad (...,), numpy or torch."""
    yaw_rad = _as_float(yaw_rad)
    xp = _xp(yaw_rad)
    cos, sin = xp.cos(yaw_rad), xp.sin(yaw_rad)
    zeros, ones = xp.zeros_like(yaw_rad), xp.ones_like(yaw_rad)
    return xp.stack([
        xp.stack([cos, -sin, zeros], -1),
        xp.stack([sin, cos, zeros], -1),
        xp.stack([zeros, zeros, ones], -1),
    ], -2)


def box_corners(boxes):
    """Corners (..., 8, 3) of boxes (..., 7) [x, y, z, w, l, h, yaw] in the boxes' frame, numpy or torch.

    Same order as the devkit's ``Box.corners().T``: 0-3 the front face (+l/2 along the heading), 4-7 the back;
    in each face (left/right, up/down) = (+,+), (-,+), (-,-), (+,-) where left is +w/2.
    """
    boxes = _as_float(boxes)
    if boxes.shape[-1] != 7:
        raise ValueError(f"boxes must have a last dimension of 7 [x, y, z, w, l, h, yaw], got shape {tuple(boxes.shape)}")
    signs = _constant_like(_CORNER_SIGNS_XYZ, boxes)  # (8, 3)
    # Local half extents along (heading, left, up) = (l, w, h) / 2.
    half_extents = boxes[..., [4, 3, 5]] * 0.5  # (..., 3)
    corners_local = signs * half_extents[..., None, :]  # (..., 8, 3)
    rotation = yaw_rotation_matrix(boxes[..., 6])  # (..., 3, 3)
    return corners_local @ _swap_last_two(rotation) + boxes[..., None, :3]


def boxes_ego_to_global(boxes_ego, ego2global):
    """Boxes (n, 7) in the ego frame -> (translation_global (n, 3), size_wlh (n, 3), rotation_global_wxyz (n, 4)).

    numpy, float64. ego2global: (4, 4). The global rotation is ego2global's rotation composed with the yaw about the
    ego's +z, so a pitched/rolled ego pose tilts the box with it, as the devkit's ``Box.rotate`` does.
    """
    boxes_ego = np.asarray(boxes_ego, dtype=np.float64).reshape(-1, 7)
    ego2global = np.asarray(ego2global, dtype=np.float64)
    translation_global = transform_points(ego2global, boxes_ego[:, :3])
    rotation_ego2global_wxyz = rotation_matrix_to_quaternion(ego2global[:3, :3])
    rotation_global = quaternion_multiply(rotation_ego2global_wxyz, yaw_to_quaternion(boxes_ego[:, 6]))
    rotation_global = np.where(rotation_global[:, :1] < 0, -rotation_global, rotation_global)
    return translation_global, boxes_ego[:, 3:6].copy(), rotation_global


def boxes_global_to_ego(translation_global, size_wlh, rotation_global_wxyz, ego2global) -> np.ndarray:
    """Boxes in the global frame (nuScenes annotation fields, (n, 3), (n, 3), (n, 4)) -> boxes (n, 7) in the ego frame.

    numpy, float64. The ego yaw is the heading of the box's +x axis projected on the ego xy plane, wrapped to
    [-pi, pi); pitch and roll relative to the ego frame are dropped (nuScenes annotations have none, and the
    ego pose's are fractions of a degree).
    """
    translation_global = np.asarray(translation_global, dtype=np.float64).reshape(-1, 3)
    size_wlh = np.asarray(size_wlh, dtype=np.float64).reshape(-1, 3)
    rotation_global = quaternion_to_rotation_matrix(np.asarray(rotation_global_wxyz, dtype=np.float64).reshape(-1, 4))
    global2ego = invert_rigid_transform(np.asarray(ego2global, dtype=np.float64))
    centres_ego = transform_points(global2ego, translation_global)
    yaw_ego = wrap_angle(yaw_from_rotation_matrix(global2ego[:3, :3] @ rotation_global))
    return np.concatenate([centres_ego, size_wlh, yaw_ego[:, None]], axis=1)


def velocities_global_to_ego(velocity_global, ego2global) -> np.ndarray:
    """Velocities (n, 2) m/s in ego axes from global-frame velocities (n, 3) (or (n, 2), vz taken as 0).

    numpy. A rotation only: no ego-motion compensation (the devkit evaluates velocities that way).
    """
    velocity_global = np.atleast_2d(np.asarray(velocity_global, dtype=np.float64))
    if velocity_global.shape[1] not in (2, 3):
        raise ValueError(f"velocity_global must have shape (n, 3) or (n, 2), got {velocity_global.shape}")
    if velocity_global.shape[1] == 2:
        velocity_global = np.concatenate([velocity_global, np.zeros_like(velocity_global[:, :1])], axis=1)
    global2ego = invert_rigid_transform(np.asarray(ego2global, dtype=np.float64))
    return rotate_vectors(global2ego, velocity_global)[:, :2]


def velocities_ego_to_global(velocity_ego, ego2global) -> np.ndarray:
    """Velocities (n, 2) m/s in global axes from (n, 2) in ego axes (vz taken as 0 in the ego frame). numpy."""
    velocity_ego = np.asarray(velocity_ego, dtype=np.float64).reshape(-1, 2)
    velocity_ego3 = np.concatenate([velocity_ego, np.zeros_like(velocity_ego[:, :1])], axis=1)
    return rotate_vectors(np.asarray(ego2global, dtype=np.float64), velocity_ego3)[:, :2]


# ----------------------------------------------------------------------------------------------------------------
# Ego motion between keyframes
# ----------------------------------------------------------------------------------------------------------------

def ego_prev2curr_from(ego2global_prev, ego2global_curr):
    """ego_prev2curr (..., 4, 4) = inv(ego2global_curr) @ ego2global_prev, numpy or torch."""
    return invert_rigid_transform(ego2global_curr) @ _as_float(ego2global_prev)


def planar_ego_motion(ego_prev2curr):
    """What the ego did between the previous and the current keyframe, from ego_prev2curr (..., 4, 4).

    Returns (translation_xy_prev (..., 2), yaw_change_rad (...,)), numpy or torch:
    - translation_xy_prev: where the current ego origin lies in the previous ego frame (m): the planar distance
      driven, in the axes the car had before moving (driving straight forward 5 m gives (5, 0); a left turn ends
      at y > 0).
    - yaw_change_rad: yaw_curr - yaw_prev about +z, positive = turned left (counter-clockwise), in [-pi, pi).
    """
    ego_curr2prev = invert_rigid_transform(ego_prev2curr)
    translation_xy_prev = ego_curr2prev[..., :2, 3]
    yaw_change_rad = wrap_angle(yaw_from_rotation_matrix(ego_curr2prev[..., :3, :3]))
    return translation_xy_prev, yaw_change_rad


def bev_xy_curr_to_prev(points_xy_curr: torch.Tensor, ego_prev2curr: torch.Tensor) -> torch.Tensor:
    """Warp BEV positions: current-frame ego xy (B, ..., 2) -> previous-frame ego xy (B, ..., 2), metres, torch.

    ego_prev2curr: (B, 4, 4). The points are taken on the current ego's z = 0 plane (BEV cells), so with a
    yaw-only ego motion this is exact at any height. Temporal self-attention samples the previous BEV at these
    positions. Identity ego_prev2curr (no previous frame) maps every point to itself.
    """
    if ego_prev2curr.shape[-2:] != (4, 4) or ego_prev2curr.dim() != 3:
        raise ValueError(f"ego_prev2curr must have shape (B, 4, 4), got {tuple(ego_prev2curr.shape)}")
    if points_xy_curr.shape[0] != ego_prev2curr.shape[0] or points_xy_curr.shape[-1] != 2:
        raise ValueError(f"points_xy_curr must have shape (B={ego_prev2curr.shape[0]}, ..., 2), "
                         f"got {tuple(points_xy_curr.shape)}")
    ego_curr2prev = invert_rigid_transform(ego_prev2curr.to(points_xy_curr.dtype))
    batch, point_shape = points_xy_curr.shape[0], points_xy_curr.shape[1:-1]
    points = points_xy_curr.reshape(batch, -1, 2)  # (B, ..., 2) -> (B, P, 2)
    # xy_prev = R[:2, :2] @ xy_curr + t[:2]: the z = 0 column drops out.
    points_prev = points @ ego_curr2prev[:, :2, :2].transpose(1, 2) + ego_curr2prev[:, None, :2, 3]
    return points_prev.reshape(batch, *point_shape, 2)  # (B, P, 2) -> (B, ..., 2)
