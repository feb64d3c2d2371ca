"""bevdeform.geometry against the nuScenes devkit and pyquaternion as independent references (float64, random)."""

import math

import numpy as np
import pytest
import torch
from nuscenes.eval.common.utils import quaternion_yaw
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import view_points
from pyquaternion import Quaternion

from bevdeform import geometry


def random_quaternions(rng, n):
    q = rng.normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def random_rigid(rng, yaw_only=False):
    """A random 4x4 float64 rigid transform (translation up to 1 km, as nuScenes global poses)."""
    if yaw_only:
        q = Quaternion(axis=[0, 0, 1], angle=rng.uniform(-math.pi, math.pi))
    else:
        q = Quaternion(random_quaternions(rng, 1)[0])
    out = np.eye(4)
    out[:3, :3] = q.rotation_matrix
    out[:3, 3] = rng.uniform(-1000, 1000, size=3)
    return out


def random_boxes(rng, n):
    """Boxes (n, 7) [x, y, z, w, l, h, yaw] in the ego frame."""
    return np.concatenate([
        rng.uniform(-60, 60, size=(n, 2)), rng.uniform(-3, 3, size=(n, 1)),
        rng.uniform(0.3, 12, size=(n, 3)), rng.uniform(-math.pi, math.pi, size=(n, 1)),
    ], axis=1)


def same_rotation(q1_wxyz, q2_wxyz, atol=1e-9):
    """Quaternions q and -q are the same rotation."""
    return min(np.abs(np.asarray(q1_wxyz) - q2_wxyz).max(), np.abs(np.asarray(q1_wxyz) + q2_wxyz).max()) < atol


# ------------------------------------------------------------------------------------------------ quaternions

def test_quaternion_to_matrix_matches_pyquaternion():
    rng = np.random.default_rng(0)
    quats = random_quaternions(rng, 200) * rng.uniform(0.5, 2.0, size=(200, 1))  # unnormalised on purpose
    rotations = geometry.quaternion_to_rotation_matrix(quats)
    assert rotations.shape == (200, 3, 3) and rotations.dtype == np.float64
    for q, rotation in zip(quats, rotations):
        np.testing.assert_allclose(rotation, Quaternion(q).rotation_matrix, atol=1e-12)


def test_matrix_to_quaternion_round_trip_including_half_turns():
    rng = np.random.default_rng(1)
    quats = random_quaternions(rng, 300)
    # Rotations by ~180 degrees (w ~ 0) are where naive trace-based conversions lose precision.
    half_turns = np.concatenate([np.zeros((20, 1)), random_quaternions(rng, 20)[:, 1:]], axis=1)
    half_turns /= np.linalg.norm(half_turns, axis=1, keepdims=True)
    quats = np.concatenate([quats, half_turns, np.eye(4)], axis=0)
    recovered = geometry.rotation_matrix_to_quaternion(geometry.quaternion_to_rotation_matrix(quats))
    assert np.all(recovered[:, 0] >= 0)
    for q, r in zip(quats, recovered):
        assert same_rotation(q, r, atol=1e-12), (q, r)
        pyq = Quaternion(matrix=Quaternion(q).rotation_matrix)
        assert same_rotation(pyq.elements, r, atol=1e-9)


def test_quaternion_multiply_matches_pyquaternion():
    rng = np.random.default_rng(2)
    a, b = random_quaternions(rng, 50), random_quaternions(rng, 50)
    product = geometry.quaternion_multiply(a, b)
    for qa, qb, qp in zip(a, b, product):
        np.testing.assert_allclose(qp, (Quaternion(qa) * Quaternion(qb)).elements, atol=1e-12)


def test_zero_quaternion_is_an_error():
    with pytest.raises(ValueError, match="zero-norm"):
        geometry.quaternion_to_rotation_matrix([0.0, 0.0, 0.0, 0.0])


def test_yaw_from_rotation_matrix_matches_devkit_quaternion_yaw():
    rng = np.random.default_rng(3)
    quats = random_quaternions(rng, 100)
    yaws = geometry.yaw_from_rotation_matrix(geometry.quaternion_to_rotation_matrix(quats))
    for q, yaw in zip(quats, yaws):
        assert abs(geometry.wrap_angle(yaw - quaternion_yaw(Quaternion(q)))) < 1e-9
    assert geometry.wrap_angle(math.pi) == pytest.approx(-math.pi)
    assert geometry.wrap_angle(3 * math.pi / 2) == pytest.approx(-math.pi / 2)


# ------------------------------------------------------------------------------------------ rigid transforms

def test_transform_from_inverse_and_points_numpy_and_torch():
    rng = np.random.default_rng(4)
    quats, translations = random_quaternions(rng, 8), rng.uniform(-100, 100, size=(8, 3))
    a2b = geometry.transform_from(quats, translations)  # (8, 4, 4)
    points_a = rng.uniform(-50, 50, size=(8, 20, 3))
    points_b = geometry.transform_points(a2b, points_a)
    for i in range(8):
        expected = (Quaternion(quats[i]).rotation_matrix @ points_a[i].T).T + translations[i]
        np.testing.assert_allclose(points_b[i], expected, atol=1e-9)
        np.testing.assert_allclose(geometry.invert_rigid_transform(a2b[i]), np.linalg.inv(a2b[i]), atol=1e-12)
    np.testing.assert_allclose(
        geometry.transform_points(geometry.invert_rigid_transform(a2b), points_b), points_a, atol=1e-9)
    # torch gives the same numbers, keeps dtype, batches and broadcasts a single transform.
    points_b_torch = geometry.transform_points(torch.from_numpy(a2b), torch.from_numpy(points_a))
    assert points_b_torch.dtype == torch.float64
    np.testing.assert_allclose(points_b_torch.numpy(), points_b, atol=1e-12)
    inverse_torch = geometry.invert_rigid_transform(torch.from_numpy(a2b).float())
    assert inverse_torch.dtype == torch.float32
    np.testing.assert_allclose(inverse_torch.double().numpy(), np.linalg.inv(a2b), atol=1e-3)
    single = geometry.transform_points(a2b[0], points_a)
    np.testing.assert_allclose(single[0], points_b[0], atol=1e-12)


# ----------------------------------------------------------------------------------------------- projection

def test_projection_matches_devkit_view_points():
    rng = np.random.default_rng(5)
    intrinsics = np.array([[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]])
    # CAM_FRONT-like mounting: quaternion (0.5, -0.5, 0.5, -0.5) turns camera z (forward) into ego x.
    cam2ego = geometry.transform_from([0.5, -0.5, 0.5, -0.5], [1.70, 0.02, 1.51])
    ego2img = geometry.ego2img_from(intrinsics, cam2ego)
    np.testing.assert_allclose(ego2img, geometry.intrinsics_to_4x4(intrinsics) @ np.linalg.inv(cam2ego), atol=1e-9)

    points_ego = np.concatenate([rng.uniform(-40, 40, size=(500, 2)), rng.uniform(-2, 4, size=(500, 1))], axis=1)
    pixels, depth = geometry.project_points(ego2img, points_ego)
    # The devkit's way: ego -> camera with the calibrated sensor's inverse, then view_points with K.
    points_cam = (cam2ego[:3, :3].T @ (points_ego - cam2ego[:3, 3]).T)  # (3, n)
    expected = view_points(points_cam, intrinsics, normalize=True)
    in_front = depth > 1e-3
    assert in_front.sum() > 100 and (~in_front).sum() > 100
    np.testing.assert_allclose(depth, points_cam[2], atol=1e-9)
    np.testing.assert_allclose(pixels[in_front], expected[:2, in_front].T, rtol=1e-9, atol=1e-6)
    assert np.all(np.isfinite(pixels))

    # A point straight ahead of CAM_FRONT lands on the principal point.
    pixel, d = geometry.project_points(ego2img, np.array([[21.70, 0.02, 1.51]]))
    np.testing.assert_allclose(pixel[0], [816.3, 491.5], atol=1e-6)
    assert d[0] == pytest.approx(20.0)

    # torch, batched (B, N cams, 4, 4) x (B, N, n, 3).
    ego2img_t = torch.from_numpy(np.broadcast_to(ego2img, (2, 3, 4, 4)).copy())
    points_t = torch.from_numpy(np.broadcast_to(points_ego, (2, 3, 500, 3)).copy())
    pixels_t, depth_t = geometry.project_points(ego2img_t, points_t)
    assert pixels_t.shape == (2, 3, 500, 2) and depth_t.shape == (2, 3, 500)
    np.testing.assert_allclose(pixels_t[1, 2].numpy(), pixels, atol=1e-9)
    ego2img_torch = geometry.ego2img_from(torch.from_numpy(intrinsics), torch.from_numpy(cam2ego))
    np.testing.assert_allclose(ego2img_torch.numpy(), ego2img, atol=1e-9)


# ---------------------------------------------------------------------------------------------------- boxes

def test_box_corners_match_devkit_box_corners():
    rng = np.random.default_rng(6)
    boxes = random_boxes(rng, 100)
    corners = geometry.box_corners(boxes)
    assert corners.shape == (100, 8, 3)
    for box, box_corners in zip(boxes, corners):
        devkit_box = Box(box[:3], box[3:6], Quaternion(axis=[0, 0, 1], angle=box[6]))
        np.testing.assert_allclose(box_corners, devkit_box.corners().T, atol=1e-9)
    corners_torch = geometry.box_corners(torch.from_numpy(boxes).reshape(10, 10, 7))
    assert corners_torch.shape == (10, 10, 8, 3)
    np.testing.assert_allclose(corners_torch.reshape(100, 8, 3).numpy(), corners, atol=1e-12)


def test_boxes_ego_to_global_matches_devkit_box_rotate_translate():
    rng = np.random.default_rng(7)
    for yaw_only in (True, False):  # real ego poses carry a little pitch and roll
        ego2global = random_rigid(rng, yaw_only=yaw_only)
        boxes_ego = random_boxes(rng, 50)
        translation, size, rotation = geometry.boxes_ego_to_global(boxes_ego, ego2global)
        for i, box in enumerate(boxes_ego):
            devkit_box = Box(box[:3], box[3:6], Quaternion(axis=[0, 0, 1], angle=box[6]))
            devkit_box.rotate(Quaternion(matrix=ego2global[:3, :3]))
            devkit_box.translate(ego2global[:3, 3])
            np.testing.assert_allclose(translation[i], devkit_box.center, atol=1e-8)
            np.testing.assert_allclose(size[i], devkit_box.wlh, atol=0)
            assert same_rotation(rotation[i], devkit_box.orientation.elements, atol=1e-9)


def test_boxes_global_to_ego_matches_devkit_and_round_trips():
    rng = np.random.default_rng(8)
    for yaw_only in (True, False):
        ego2global = random_rigid(rng, yaw_only=yaw_only)
        # Global annotations as nuScenes stores them: yaw-only rotations.
        yaw_global = rng.uniform(-math.pi, math.pi, size=40)
        rotation_global = np.stack([Quaternion(axis=[0, 0, 1], angle=y).elements for y in yaw_global])
        translation_global = ego2global[:3, 3] + rng.uniform(-50, 50, size=(40, 3))
        size = rng.uniform(0.3, 12, size=(40, 3))
        boxes_ego = geometry.boxes_global_to_ego(translation_global, size, rotation_global, ego2global)
        assert np.all(boxes_ego[:, 6] >= -math.pi) and np.all(boxes_ego[:, 6] < math.pi)
        pose_q = Quaternion(matrix=ego2global[:3, :3])
        for i in range(40):
            devkit_box = Box(translation_global[i], size[i], Quaternion(rotation_global[i]))
            devkit_box.translate(-ego2global[:3, 3])
            devkit_box.rotate(pose_q.inverse)
            np.testing.assert_allclose(boxes_ego[i, :3], devkit_box.center, atol=1e-8)
            assert abs(geometry.wrap_angle(boxes_ego[i, 6] - quaternion_yaw(devkit_box.orientation))) < 1e-9
        if yaw_only:  # exact round trip when the ego pose has no pitch/roll
            translation_back, size_back, rotation_back = geometry.boxes_ego_to_global(boxes_ego, ego2global)
            np.testing.assert_allclose(translation_back, translation_global, atol=1e-8)
            np.testing.assert_allclose(size_back, size)
            for q, q_back in zip(rotation_global, rotation_back):
                assert same_rotation(q, q_back, atol=1e-9)


def test_velocity_ego_global_round_trip():
    rng = np.random.default_rng(9)
    ego2global = random_rigid(rng, yaw_only=True)
    velocity_global = np.concatenate([rng.normal(size=(30, 2)) * 10, np.zeros((30, 1))], axis=1)
    velocity_ego = geometry.velocities_global_to_ego(velocity_global, ego2global)
    expected = (ego2global[:3, :3].T @ velocity_global.T).T[:, :2]
    np.testing.assert_allclose(velocity_ego, expected, atol=1e-12)
    np.testing.assert_allclose(geometry.velocities_ego_to_global(velocity_ego, ego2global), velocity_global[:, :2],
                               atol=1e-9)
    np.testing.assert_allclose(geometry.velocities_global_to_ego(velocity_global[:, :2], ego2global), expected,
                               atol=1e-12)
    assert geometry.velocities_global_to_ego(np.zeros((0, 3)), ego2global).shape == (0, 2)


# ----------------------------------------------------------------------------------------------- ego motion

def planar_pose(x, y, yaw):
    """ego2global (4, 4) of a car at (x, y) m heading yaw rad (global frame)."""
    return geometry.transform_from(geometry.yaw_to_quaternion(yaw), [x, y, 0.0])


@pytest.mark.parametrize("turn_sign", [1.0, -1.0], ids=["left", "right"])
def test_planar_ego_motion_known_turn(turn_sign):
    # A quarter circle of radius 10 m, starting at global (100, 50) heading global +y (yaw 90 deg).
    # Turning left ends at (90, 60) heading -x; turning right at (110, 60) heading +x.
    radius, start_yaw = 10.0, math.pi / 2
    ego2global_prev = planar_pose(100.0, 50.0, start_yaw)
    end_x = 100.0 - turn_sign * radius
    ego2global_curr = planar_pose(end_x, 60.0, start_yaw + turn_sign * math.pi / 2)
    ego_prev2curr = geometry.ego_prev2curr_from(ego2global_prev, ego2global_curr)
    np.testing.assert_allclose(ego_prev2curr, np.linalg.inv(ego2global_curr) @ ego2global_prev, atol=1e-12)

    translation_xy_prev, yaw_change = geometry.planar_ego_motion(ego_prev2curr)
    # In the car's starting axes: 10 m forward and 10 m to the side it turned to.
    np.testing.assert_allclose(translation_xy_prev, [radius, turn_sign * radius], atol=1e-9)
    assert yaw_change == pytest.approx(turn_sign * math.pi / 2, abs=1e-12)
    assert np.linalg.norm(translation_xy_prev) == pytest.approx(radius * math.sqrt(2))

    # Straight ahead: the previous origin lies behind (negative x in the current frame), as the doc says.
    straight = geometry.ego_prev2curr_from(planar_pose(0, 0, 0.3), planar_pose(5 * math.cos(0.3), 5 * math.sin(0.3), 0.3))
    assert straight[0, 3] == pytest.approx(-5.0)
    translation_straight, yaw_straight = geometry.planar_ego_motion(torch.from_numpy(straight)[None])
    np.testing.assert_allclose(translation_straight.numpy(), [[5.0, 0.0]], atol=1e-9)
    assert abs(float(yaw_straight[0])) < 1e-12


def test_bev_warp_maps_world_point_current_xy_to_previous_xy():
    rng = np.random.default_rng(10)
    batch = 4
    poses_prev = [random_rigid(rng, yaw_only=True) for _ in range(batch)]
    # The current pose: a few metres and up to ~30 degrees away, as between 2 Hz keyframes (and more).
    poses_curr = []
    for pose in poses_prev:
        step = planar_pose(rng.uniform(-8, 8), rng.uniform(-3, 3), rng.uniform(-0.5, 0.5))
        poses_curr.append(pose @ step)
    ego_prev2curr = np.stack([geometry.ego_prev2curr_from(p, c) for p, c in zip(poses_prev, poses_curr)])

    # World points on the ground and above it; their xy seen from each frame.
    points_global = np.stack([p[:3, 3] + rng.uniform(-50, 50, size=(6, 5, 3)).reshape(30, 3) for p in poses_curr])
    points_curr = np.stack([geometry.transform_points(np.linalg.inv(c), g) for c, g in zip(poses_curr, points_global)])
    points_prev = np.stack([geometry.transform_points(np.linalg.inv(p), g) for p, g in zip(poses_prev, points_global)])

    warped = geometry.bev_xy_curr_to_prev(torch.from_numpy(points_curr[..., :2]).reshape(batch, 6, 5, 2),
                                          torch.from_numpy(ego_prev2curr))
    assert warped.shape == (batch, 6, 5, 2) and warped.dtype == torch.float64
    np.testing.assert_allclose(warped.reshape(batch, 30, 2).numpy(), points_prev[..., :2], atol=1e-8)

    # No previous frame: the identity leaves the grid where it is.
    grid = torch.rand(batch, 7, 2, dtype=torch.float64) * 100 - 50
    identity = torch.eye(4, dtype=torch.float64).expand(batch, 4, 4)
    torch.testing.assert_close(geometry.bev_xy_curr_to_prev(grid, identity), grid)
    # float32 input keeps float32 (the model's dtype).
    warped32 = geometry.bev_xy_curr_to_prev(torch.from_numpy(points_curr[..., :2]).float(),
                                            torch.from_numpy(ego_prev2curr).float())
    assert warped32.dtype == torch.float32
    np.testing.assert_allclose(warped32.numpy(), points_prev[..., :2], atol=1e-3)
