"""Synthetic nuScenes: a small dataset in the exact nuScenes on-disk format, written from a simulated 3D world.

`write_synthetic_nuscenes(out_dir, ...)` writes, under out_dir (the data root):
- `v1.0-synthetic/*.json`: the 13 nuScenes tables with the real schema, and `splits.json` with the custom splits
  `synthetic_train` / `synthetic_val` (the devkit >= 1.2.0 evaluates custom splits);
- `samples/CAM_*/<log>__CAM_*__<timestamp>.jpg` (6 cameras of the real rig, intrinsics scaled by `scale`) and
  `samples/LIDAR_TOP/<log>__LIDAR_TOP__<timestamp>.pcd.bin` (float32 x, y, z, intensity, ring; LIDAR frame);
- `can_bus/scene-NNNN_pose.json` (50 Hz ego pose messages), `maps/<token>.png` (drivable surface + sidewalk
  masks at the devkit's 0.1 m/px), and `synthetic_generator.json` (the arguments, to re-render any frame).

The world: the ego drives a road (straight, turning left/right, stopping; per scene) with lanes, markings and
sidewalks, among objects of all 10 detection classes plus a few other nuScenes categories, with real size priors,
per-instance variation, plausible placement (vehicles in lanes/parking, pedestrians on sidewalks, cone and barrier
groups) and motion (constant speed along the lane, gentle turns). Keyframes only (2 Hz), every sample_data with its
own timestamp and ego pose; cameras fire 0.5-43 ms before the lidar in the real rotation order, and show the objects
where they are at the camera's time, as real data does. `num_lidar_pts` is counted on the written point cloud with
the devkit's rule; the visibility level is the unoccluded fraction of the object's lidar rays.

Frames: global x, y on the ground (z = 0 is the ground; ego poses have z = 0 and yaw only). Quaternions (w, x, y, z).
Only numpy, OpenCV, bevdeform.geometry and the standard library are used; the nuScenes devkit is not imported (it is
what the tests load the result with).
"""

import calendar
import datetime
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from bevdeform.geometry import quaternion_to_rotation_matrix, rotation_matrix_to_quaternion, yaw_to_quaternion
from bevdeform.data import synthetic_render as render

VERSION = "v1.0-synthetic"
TRAIN_SPLIT = "synthetic_train"
VAL_SPLIT = "synthetic_val"
GENERATOR_FILE = "synthetic_generator.json"
KEYFRAME_INTERVAL_S = 0.5  # 2 Hz keyframes
ANNOTATION_RANGE_M = 70.0  # objects farther than this from the ego (xy) at a keyframe are not annotated
RENDER_RANGE_M = 130.0  # objects farther than this are not drawn
MIN_SUN_ELEVATION_DEG = 12.0  # lowest sun (dusk): bounds shadow length at height / tan(12 deg) = 4.7 x height

# Defaults of the writer: 8 + 2 scenes of 10 keyframes at 320x180 (scale 0.2), written in seconds. The training
# scripts' embedded default is many shorter scenes (bevdeform.train.EMBEDDED_SYNTHETIC: 80 + 8 scenes of 4), because
# a detector must generalise over object layouts, of which 8 scenes hold only 8.
DEFAULT_NUM_SCENES = 8
DEFAULT_NUM_VAL_SCENES = 2
DEFAULT_SAMPLES_PER_SCENE = 10
DEFAULT_SCALE = 0.2
DEFAULT_OBJECTS_PER_SAMPLE = 20

# ----------------------------------------------------------------------------------------------------------------
# The sensor rig (nuScenes' Renault Zoe; docs: /work/shared/design/nuscenes-format.md)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CameraSpec:
    """A camera of the rig at 1600x900: optical-axis yaw in the ego frame (deg, CCW from ego +x), mounting
    translation (ego frame, m), focal length and principal point (px), a small mounting tilt (pitch about the
    camera x axis, roll about its z axis, deg), and when it fires relative to the lidar keyframe (s)."""

    channel: str
    yaw_deg: float
    translation_m: Tuple[float, float, float]
    focal_px: float
    principal_px: Tuple[float, float]
    tilt_deg: Tuple[float, float]
    time_offset_s: float


# Time offsets: the cameras are triggered as the top lidar (spinning clockwise seen from above) sweeps across each
# camera's field of view, so FRONT_LEFT fires first and BACK_LEFT last, 0.5-43 ms before the lidar timestamp.
CAMERA_RIG = (
    CameraSpec("CAM_FRONT", 0.0, (1.70, 0.02, 1.51), 1266.4, (816.3, 491.5), (0.35, -0.20), -0.0355),
    CameraSpec("CAM_FRONT_RIGHT", -55.0, (1.55, -0.49, 1.50), 1260.8, (808.0, 495.3), (0.55, 0.25), -0.0276),
    CameraSpec("CAM_FRONT_LEFT", 55.0, (1.52, 0.49, 1.51), 1272.6, (826.6, 479.8), (0.20, -0.15), -0.0431),
    CameraSpec("CAM_BACK", 180.0, (0.03, 0.0, 1.57), 809.2, (829.2, 481.8), (0.45, 0.10), -0.0104),
    CameraSpec("CAM_BACK_LEFT", 110.0, (1.04, 0.48, 1.56), 1256.7, (817.8, 452.0), (0.30, 0.20), -0.0005),
    CameraSpec("CAM_BACK_RIGHT", -110.0, (1.05, -0.48, 1.56), 1259.5, (807.3, 501.2), (0.60, -0.25), -0.0201),
)
CAMERA_CHANNELS = tuple(cam.channel for cam in CAMERA_RIG)
LIDAR_CHANNEL = "LIDAR_TOP"
LIDAR_TRANSLATION_M = (0.943713, 0.0, 1.84023)
LIDAR_YAW_DEG = -90.0  # lidar x = ego -y
FULL_WIDTH_PX, FULL_HEIGHT_PX = 1600, 900
EGO_LENGTH_M, EGO_WIDTH_M, EGO_REAR_OVERHANG_M = 4.08, 1.73, 0.80  # origin at the rear axle, on the ground

LOCATIONS = (  # (location, vehicle, UTC offset, traffic side: +1 drives on the right, -1 on the left)
    ("singapore-onenorth", "n015", "+0800", -1),
    ("boston-seaport", "n008", "-0400", 1),
    ("singapore-queenstown", "n015", "+0800", -1),
    ("singapore-hollandvillage", "n015", "+0800", -1),
)
SCENES_PER_LOG = 3
# The devkit's CAN bus API refuses these scene numbers (real scenes without CAN data): never name a scene so.
_CAN_BLACKLIST = {161, 162, 163, 164, 165, 166, 167, 168, 170, 171, 172, 173, 174, 175, 176, 309, 310, 311, 312,
                  313, 314}

# ----------------------------------------------------------------------------------------------------------------
# Fixed tables: category (with the lidarseg index), attribute, visibility
# ----------------------------------------------------------------------------------------------------------------

CATEGORIES = (
    ("noise", "Any lidar return that does not correspond to a physical object, such as dust, vapor, noise, fog, "
              "raindrops, smoke and reflections."),
    ("animal", "All animals, e.g. cats, rats, dogs, deer, birds."),
    ("human.pedestrian.adult", "Adult subcategory."),
    ("human.pedestrian.child", "Child subcategory."),
    ("human.pedestrian.construction_worker", "Construction worker"),
    ("human.pedestrian.personal_mobility", "A small electric or self-propelled vehicle, e.g. skateboard, segway, or "
                                           "scooters, on which the person typically travels in a upright position."),
    ("human.pedestrian.police_officer", "Police officer."),
    ("human.pedestrian.stroller", "Strollers. If a person is in the stroller, include in the annotation."),
    ("human.pedestrian.wheelchair", "Wheelchairs. If a person is in the wheelchair, include in the annotation."),
    ("movable_object.barrier", "Temporary road barrier placed in the scene in order to redirect traffic."),
    ("movable_object.debris", "Movable object that is left on the driveable surface that is too large to be driven "
                              "over safely, e.g tree branch, full trash bag etc."),
    ("movable_object.pushable_pullable", "Objects that a pedestrian may push or pull. For example dolleys, "
                                         "wheel barrows, garbage-bins, or shopping carts."),
    ("movable_object.trafficcone", "All types of traffic cone."),
    ("static_object.bicycle_rack", "Area or device intended to park or secure the bicycles in a row."),
    ("vehicle.bicycle", "Human or electric powered 2-wheeled vehicle designed to travel at lower speeds either on "
                        "road surface, sidewalks or bike paths."),
    ("vehicle.bus.bendy", "Bendy bus subcategory. Annotate each section of the bendy bus individually."),
    ("vehicle.bus.rigid", "Rigid bus subcategory."),
    ("vehicle.car", "Vehicle designed primarily for personal use, e.g. sedans, hatch-backs, wagons, vans, mini-vans, "
                    "SUVs and jeeps."),
    ("vehicle.construction", "Vehicles primarily designed for construction. Typically very slow moving or "
                             "stationary. Cranes and extremities of construction vehicles are only included in "
                             "annotations if they interfere with traffic."),
    ("vehicle.emergency.ambulance", "All types of ambulances."),
    ("vehicle.emergency.police", "All types of police vehicles including police bicycles and motorcycles."),
    ("vehicle.motorcycle", "Gasoline or electric powered 2-wheeled vehicle designed to move rapidly (at the speed "
                           "of standard cars) on the road surface."),
    ("vehicle.trailer", "Any vehicle trailer, both for trucks, cars and bikes."),
    ("vehicle.truck", "Vehicles primarily designed to haul cargo including pick-ups, lorrys, trucks and "
                      "semi-tractors."),
    ("flat.driveable_surface", "All paved or unpaved surfaces that a car can drive on with no concern of traffic "
                               "rules."),
    ("flat.other", "All other forms of horizontal ground-level structures that do not belong to any of "
                   "driveable_surface, curb, sidewalk and terrain."),
    ("flat.sidewalk", "Sidewalk, pedestrian walkways, bike paths, etc. Part of the ground designated for "
                      "pedestrians or cyclists."),
    ("flat.terrain", "Natural horizontal surfaces such as ground level horizontal vegetation (< 20 cm tall), grass, "
                     "rolling hills, soil, sand and gravel."),
    ("static.manmade", "Includes man-made structures but not limited to: buildings, walls, guard rails, fences, "
                       "poles, drainages, hydrants, flags, banners, street signs, electric circuit boxes, traffic "
                       "lights, parking meters and stairs with less than 20% vegetation."),
    ("static.other", "Points in the background that are not distinguishable, or objects that do not match any of "
                     "the above labels."),
    ("static.vegetation", "Any vegetation in the frame that is higher than the ground, including bushes, plants, "
                          "potted plants, trees, etc. Only tall grass (> 20cm) is part of this, ground level grass "
                          "is part of `flat.terrain`."),
    ("vehicle.ego", "The vehicle on which the cameras, radar and lidar are mounted, that is sometimes visible at the "
                    "bottom of the image."),
)

ATTRIBUTES = (
    ("vehicle.moving", "Vehicle is moving."),
    ("vehicle.stopped", "Vehicle, with a driver/rider in/on it, is currently stationary but has an intent to move."),
    ("vehicle.parked", "Vehicle is stationary (usually for longer duration) with no immediate intent to move."),
    ("cycle.with_rider", "There is a rider on the bicycle or motorcycle."),
    ("cycle.without_rider", "There is NO rider on the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The human is sitting or lying down."),
    ("pedestrian.standing", "The human is standing."),
    ("pedestrian.moving", "The human is moving."),
)

VISIBILITY_LEVELS = (  # (token, level, description, lower bound of the visible fraction)
    ("1", "v0-40", "visibility of whole object is between 0 and 40%", 0.0),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%", 0.4),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%", 0.6),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%", 0.8),
)

DETECTION_CLASSES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
                     "pedestrian", "traffic_cone")
# The devkit's category -> detection class mapping (nuscenes.eval.detection.utils.category_to_detection_name).
CATEGORY_TO_DETECTION = {
    "movable_object.barrier": "barrier", "vehicle.bicycle": "bicycle", "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus", "vehicle.car": "car", "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle", "human.pedestrian.adult": "pedestrian", "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian", "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone", "vehicle.trailer": "trailer", "vehicle.truck": "truck",
}
# The devkit's evaluation ranges (detection_cvpr_2019 class_range), metres from the ego.
CLASS_RANGE_M = {"car": 50, "truck": 50, "bus": 50, "trailer": 50, "construction_vehicle": 50, "pedestrian": 40,
                 "motorcycle": 40, "bicycle": 40, "traffic_cone": 30, "barrier": 30}

# Size priors (w, l, h) mean and spread (m). Cycles and sitting pedestrians are sized per attribute (see _size).
SIZE_PRIORS = {
    "vehicle.car": ((1.95, 4.6, 1.7), (0.10, 0.35, 0.13)),
    "vehicle.emergency.police": ((1.95, 4.8, 1.6), (0.05, 0.2, 0.08)),
    "vehicle.truck": ((2.5, 7.0, 3.0), (0.18, 1.2, 0.35)),
    "vehicle.bus.rigid": ((2.9, 11.0, 3.5), (0.08, 0.9, 0.15)),
    "vehicle.bus.bendy": ((2.9, 17.5, 3.3), (0.08, 0.8, 0.12)),
    "vehicle.trailer": ((2.9, 12.0, 3.9), (0.15, 1.8, 0.3)),
    "vehicle.construction": ((2.8, 6.5, 3.2), (0.3, 1.0, 0.4)),
    "human.pedestrian.adult": ((0.67, 0.73, 1.77), (0.07, 0.09, 0.09)),
    "human.pedestrian.child": ((0.5, 0.5, 1.25), (0.05, 0.05, 0.12)),
    "human.pedestrian.construction_worker": ((0.7, 0.75, 1.78), (0.06, 0.08, 0.08)),
    "human.pedestrian.police_officer": ((0.7, 0.75, 1.8), (0.05, 0.06, 0.06)),
    "vehicle.motorcycle": ((0.77, 2.1, 1.5), (0.07, 0.15, 0.08)),
    "vehicle.bicycle": ((0.6, 1.7, 1.3), (0.06, 0.1, 0.08)),
    "movable_object.trafficcone": ((0.41, 0.41, 1.07), (0.04, 0.04, 0.08)),
    "movable_object.barrier": ((2.5, 0.5, 1.0), (0.3, 0.08, 0.1)),
    "animal": ((0.35, 0.9, 0.7), (0.06, 0.15, 0.12)),
    "movable_object.pushable_pullable": ((0.62, 0.68, 1.05), (0.06, 0.06, 0.06)),
    "movable_object.debris": ((0.6, 0.9, 0.25), (0.15, 0.2, 0.06)),
}
LIDAR_INTENSITY = {  # typical lidar return strength (0-255) per category family
    "vehicle": (15.0, 60.0), "human": (8.0, 25.0), "movable_object.trafficcone": (60.0, 110.0),
    "movable_object.barrier": (35.0, 80.0), "other": (5.0, 30.0),
}


def make_token(*parts) -> str:
    """A 32-hex-digit token (nuScenes tokens look like this), a deterministic function of its parts."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def scene_number(scene_index: int) -> int:
    """The NNNN of `scene-NNNN` for the scene_index-th scene (1-based, skipping numbers the CAN API refuses)."""
    number = 0
    for _ in range(scene_index + 1):
        number += 1
        while number in _CAN_BLACKLIST:
            number += 1
    return number


# ----------------------------------------------------------------------------------------------------------------
# Road and ego motion
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RoadPath:
    """The road's reference line: the centre of the ego's lane, by arc length s (m), in the global frame.

    Offsets d (m) are to the left of the driving direction; `pose(s, d)` gives the global position and heading.
    """

    s_m: np.ndarray  # (S,) uniform
    xy_global_m: np.ndarray  # (S, 2)
    heading_rad: np.ndarray  # (S,) unwrapped
    curvature_per_m: np.ndarray  # (S,)

    def pose(self, s_m, d_m=0.0) -> Tuple[np.ndarray, np.ndarray]:
        """(xy (n, 2), heading (n,)) at arc lengths s_m (n,) and left offsets d_m (n,) or scalar."""
        s_m = np.atleast_1d(np.asarray(s_m, dtype=np.float64))
        heading = np.interp(s_m, self.s_m, self.heading_rad)
        x = np.interp(s_m, self.s_m, self.xy_global_m[:, 0])
        y = np.interp(s_m, self.s_m, self.xy_global_m[:, 1])
        d_m = np.broadcast_to(np.asarray(d_m, dtype=np.float64), s_m.shape)
        xy = np.stack([x - d_m * np.sin(heading), y + d_m * np.cos(heading)], axis=1)
        return xy, heading

    def curvature(self, s_m) -> np.ndarray:
        return np.interp(np.asarray(s_m, dtype=np.float64), self.s_m, self.curvature_per_m)


def _build_path(origin_xy_m, heading0_rad, s_lo_m, s_hi_m, curvature_fn, ds_m=0.5) -> RoadPath:
    """Integrate heading and position along s from the curvature profile; s = 0 is at origin_xy_m."""
    s = np.arange(math.floor(s_lo_m), math.ceil(s_hi_m) + ds_m, ds_m)
    kappa = curvature_fn(s)
    # heading(s) = heading0 + integral of kappa from 0 to s (trapezoids), anchored at s = 0.
    heading = np.concatenate([[0.0], np.cumsum(0.5 * (kappa[1:] + kappa[:-1]) * ds_m)])
    heading = heading - np.interp(0.0, s, heading) + heading0_rad
    mid = 0.5 * (heading[1:] + heading[:-1])
    xy = np.zeros((len(s), 2))
    xy[1:, 0] = np.cumsum(np.cos(mid) * ds_m)
    xy[1:, 1] = np.cumsum(np.sin(mid) * ds_m)
    xy = xy - np.array([np.interp(0.0, s, xy[:, 0]), np.interp(0.0, s, xy[:, 1])]) + np.asarray(origin_xy_m)
    return RoadPath(s, xy, heading, kappa)


def _ramp_profile(s, start, ramp, length, value):
    """A curvature bump: 0 before start, linear up to value over ramp, flat for length, linear back to 0."""
    up = np.clip((s - start) / ramp, 0.0, 1.0)
    down = np.clip((start + ramp + length + ramp - s) / ramp, 0.0, 1.0)
    return value * np.minimum(up, down)


@dataclass
class EgoMotion:
    """The ego's progress along the road path over scene time t (s, 0 at the first keyframe's lidar timestamp)."""

    kind: str
    t_s: np.ndarray  # (T,) uniform grid
    s_m: np.ndarray  # (T,)
    speed_mps: np.ndarray  # (T,)
    accel_mps2: np.ndarray  # (T,)

    def s_at(self, t_s):
        return np.interp(t_s, self.t_s, self.s_m)

    def speed_at(self, t_s):
        return np.interp(t_s, self.t_s, self.speed_mps)

    def accel_at(self, t_s):
        return np.interp(t_s, self.t_s, self.accel_mps2)


EGO_MANEUVERS = ("straight", "left", "right", "stop", "curve")


def _speed_profile(kind, rng, duration_s, t_grid):
    """Ego speed (m/s) over t_grid for a maneuver kind: cruising with a slow drift, turning slower, or stopping."""
    if kind == "stop":
        v0 = rng.uniform(5.0, 10.0)
        if rng.uniform() < 0.3:  # waiting (at a light) when the scene starts, then pulling away
            t_go = rng.uniform(0.2, 0.6) * duration_s
            return np.clip((t_grid - t_go) * rng.uniform(1.2, 2.2), 0.0, v0)
        t_brake = rng.uniform(0.05, 0.4) * duration_s
        decel = rng.uniform(1.5, 3.0)
        t_stop = t_brake + v0 / decel
        t_go = t_stop + rng.uniform(1.0, 4.0)
        accel = rng.uniform(1.0, 2.0)
        v = np.where(t_grid < t_brake, v0, np.maximum(v0 - decel * (t_grid - t_brake), 0.0))
        return np.where(t_grid > t_go, np.minimum(accel * (t_grid - t_go), v0), v)
    v0 = rng.uniform(4.5, 8.0) if kind in ("left", "right") else rng.uniform(6.0, 12.0)
    drift = rng.uniform(-0.35, 0.35)
    return np.clip(v0 + drift * (t_grid - 0.5 * duration_s), 2.5, 14.0)


def _build_ego(kind, rng, duration_s, origin_xy_m, heading0_rad, margin_m=140.0):
    """(EgoMotion, RoadPath) for one scene: the path is laid out around where the ego drives, with margin_m of
    road before its first and after its last position (objects and the visible road need it)."""
    t_grid = np.arange(-1.0, duration_s + 1.0 + 1e-9, 0.01)
    speed = _speed_profile(kind, rng, duration_s, t_grid)
    s = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * 0.01)])
    s = s - np.interp(0.0, t_grid, s)
    accel = np.gradient(speed, t_grid)
    s_first, s_last = float(s[0]), float(s[-1])
    travel = max(float(np.interp(duration_s, t_grid, s)), 1.0)
    if kind in ("left", "right"):
        radius = rng.uniform(22.0, 40.0)
        angle = math.radians(rng.uniform(50.0, 90.0))
        ramp = 6.0
        start = rng.uniform(-0.25, 0.4) * travel
        flat = max(angle * radius - ramp, 0.0)
        sign = 1.0 if kind == "left" else -1.0  # positive curvature turns counter-clockwise = left

        def curvature(sv):
            return _ramp_profile(sv, start, ramp, flat, sign / radius)
    elif kind == "curve":
        radius = rng.uniform(70.0, 160.0) * (1.0 if rng.uniform() < 0.5 else -1.0)

        def curvature(sv):
            return _ramp_profile(sv, -50.0, 15.0, travel + 70.0, 1.0 / radius)
    else:
        bend = rng.uniform(-1.0, 1.0) / 600.0 if rng.uniform() < 0.5 else 0.0

        def curvature(sv):
            return _ramp_profile(sv, -30.0, 10.0, travel + 40.0, bend)
    path = _build_path(origin_xy_m, heading0_rad, s_first - margin_m, s_last + margin_m, curvature)
    return EgoMotion(kind, t_grid, s, speed, accel), path


@dataclass
class RoadLayout:
    """Lateral layout of the road, as left offsets d (m) from the ego lane's centre line.

    side is +1 where traffic drives on the right (oncoming lanes to the ego's left, d > 0), -1 on the left.
    Lane centres, curbs etc. are given already multiplied by side, so they are true left offsets.
    """

    side: int
    lane_width_m: float
    same_lane_d_m: Tuple[float, ...]  # lanes in the ego's direction (index 0 at the curb)
    ego_lane: int
    oncoming_lane_d_m: Tuple[float, ...]  # index 0 next to the median
    parking_same_d_m: Optional[float]  # centre of the parking strip on the ego's side (None if no strip)
    parking_opp_d_m: Optional[float]
    curb_same_d_m: float  # road edge on the ego's side
    curb_opp_d_m: float
    sidewalk_width_m: float

    def outward(self, curb_d_m: float) -> float:
        """+1 or -1: the direction of increasing d away from the road at this curb."""
        return 1.0 if curb_d_m > 0 else -1.0


def _road_layout(rng, side: int) -> RoadLayout:
    lane = rng.uniform(3.2, 3.7)
    n_same = 1 if rng.uniform() < 0.45 else 2
    n_opp = 1 if rng.uniform() < 0.5 else 2
    ego = int(rng.integers(n_same))
    parking_same = rng.uniform() < 0.5
    parking_opp = rng.uniform() < 0.5
    strip = 2.4
    # Canonical offsets d' (positive towards the oncoming side); d = side * d'.
    same = tuple(side * (k - ego) * lane for k in range(n_same))
    oncoming = tuple(side * (n_same - ego + j) * lane for j in range(n_opp))
    edge_same = -(ego + 0.5) * lane
    edge_opp = (n_same + n_opp - ego - 0.5) * lane
    curb_same = edge_same - (strip if parking_same else 0.0)
    curb_opp = edge_opp + (strip if parking_opp else 0.0)
    return RoadLayout(
        side=side, lane_width_m=lane, same_lane_d_m=same, ego_lane=ego, oncoming_lane_d_m=oncoming,
        parking_same_d_m=side * (edge_same - 0.5 * strip) if parking_same else None,
        parking_opp_d_m=side * (edge_opp + 0.5 * strip) if parking_opp else None,
        curb_same_d_m=side * curb_same, curb_opp_d_m=side * curb_opp, sidewalk_width_m=rng.uniform(2.5, 4.0))


# ----------------------------------------------------------------------------------------------------------------
# Objects: motion, appearance, placement
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Motion:
    """How an object moves over scene time t (s).

    mode "road": along the road at arc length s0_m + speed_mps * t (negative speed = against the road direction),
    at left offset d_m, heading = road heading + yaw_offset_rad (pi for oncoming traffic): follows the road's bends.
    mode "free": from (x0_m, y0_m) at heading yaw0_rad, constant speed_mps and yaw rate yaw_rate_rps (a circle arc;
    speed 0 = static).
    With follow_ego (road mode), the arc length is the ego's plus s0_m instead: a car queueing behind or ahead of
    the ego in its lane, braking and pulling away with it (ego_t_s / ego_s_m: the ego's progress).
    """

    mode: str
    s0_m: float = 0.0
    speed_mps: float = 0.0
    d_m: float = 0.0
    yaw_offset_rad: float = 0.0
    x0_m: float = 0.0
    y0_m: float = 0.0
    yaw0_rad: float = 0.0
    yaw_rate_rps: float = 0.0
    follow_ego: bool = False
    ego_t_s: Optional[np.ndarray] = None
    ego_s_m: Optional[np.ndarray] = None
    ego_speed_mps: Optional[np.ndarray] = None

    def pose(self, t_s, path: RoadPath) -> Tuple[np.ndarray, np.ndarray]:
        """(xy_global (n, 2), yaw (n,)) at times t_s (n,)."""
        t = np.atleast_1d(np.asarray(t_s, dtype=np.float64))
        if self.mode == "road":
            travelled = np.interp(t, self.ego_t_s, self.ego_s_m) if self.follow_ego else self.speed_mps * t
            xy, heading = path.pose(self.s0_m + travelled, self.d_m)
            return xy, heading + self.yaw_offset_rad
        yaw = self.yaw0_rad + self.yaw_rate_rps * t
        if abs(self.yaw_rate_rps) < 1e-9:
            dist = self.speed_mps * t
            xy = np.stack([self.x0_m + dist * math.cos(self.yaw0_rad), self.y0_m + dist * math.sin(self.yaw0_rad)], 1)
        else:
            r = self.speed_mps / self.yaw_rate_rps
            xy = np.stack([self.x0_m + r * (np.sin(yaw) - math.sin(self.yaw0_rad)),
                           self.y0_m - r * (np.cos(yaw) - math.cos(self.yaw0_rad))], axis=1)
        return xy, yaw

    def is_moving(self) -> bool:
        return abs(self.speed_mps) > 0.2 or (self.follow_ego and float(np.max(self.ego_speed_mps)) > 0.2)

    def speed_at(self, t_s: float) -> float:
        """Speed (m/s) along the path at time t_s (for road/free motion its constant |speed|)."""
        if self.follow_ego:
            return float(np.interp(t_s, self.ego_t_s, self.ego_speed_mps))
        return abs(self.speed_mps)


@dataclass
class Instance:
    """One object of a scene: nuScenes category, its (constant) attribute name or '', box size (w, l, h) m,
    motion, drawn parts and lidar intensity."""

    index: int
    category: str
    attribute: str
    size_wlh_m: np.ndarray
    motion: Motion
    parts: tuple
    intensity: float
    annotated: bool = True  # False for scenery (poles, trees): drawn and scanned, never annotated

    def attribute_at(self, t_s: float) -> str:
        """The attribute at time t_s: queueing vehicles switch between moving and stopped with the ego."""
        if self.motion.follow_ego and self.attribute in ("vehicle.moving", "vehicle.stopped"):
            return "vehicle.moving" if self.motion.speed_at(t_s) > 0.5 else "vehicle.stopped"
        return self.attribute

    def poses(self, t_s, path: RoadPath) -> Tuple[np.ndarray, np.ndarray]:
        """(box centres global (n, 3), yaw (n,)) at times t_s: boxes stand on the ground plane."""
        xy, yaw = self.motion.pose(t_s, path)
        z = np.full((len(xy), 1), render.GROUND_Z_M + 0.5 * self.size_wlh_m[2])
        return np.concatenate([xy, z], axis=1), yaw


def _boxes_overlap(c1, y1, h1, c2, y2, h2) -> np.ndarray:
    """Separating-axis test for oriented rectangles, broadcasting: centres (..., 2), yaws (...), half sizes (..., 2)
    as (half length, half width). True where they overlap."""
    u1 = np.stack([np.cos(y1), np.sin(y1)], -1)
    v1 = np.stack([-np.sin(y1), np.cos(y1)], -1)
    u2 = np.stack([np.cos(y2), np.sin(y2)], -1)
    v2 = np.stack([-np.sin(y2), np.cos(y2)], -1)
    d = c2 - c1
    separated = np.zeros(np.broadcast_shapes(d.shape[:-1], u1.shape[:-1], u2.shape[:-1]), dtype=bool)
    for axis in (u1, v1, u2, v2):
        r1 = h1[..., 0] * np.abs(np.sum(u1 * axis, -1)) + h1[..., 1] * np.abs(np.sum(v1 * axis, -1))
        r2 = h2[..., 0] * np.abs(np.sum(u2 * axis, -1)) + h2[..., 1] * np.abs(np.sum(v2 * axis, -1))
        separated |= np.abs(np.sum(d * axis, -1)) > r1 + r2
    return ~separated


class _Placer:
    """Accepts candidate objects that never overlap the ego or each other over the scene (checked every 0.1 s, from
    before the first camera fires to after the last keyframe: 0.1 s at 30 m/s closing speed is less than a car)."""

    EGO_MARGIN_M = 0.7
    OBJECT_MARGIN_M = 0.2

    def __init__(self, path: RoadPath, ego: EgoMotion, duration_s: float):
        self.path = path
        self.check_t = np.linspace(-0.1, duration_s + 0.1, int(round((duration_s + 0.2) / 0.1)) + 1)
        ego_xy, ego_yaw = path.pose(ego.s_at(self.check_t))
        centre_offset = 0.5 * EGO_LENGTH_M - EGO_REAR_OVERHANG_M
        self.ego_centre = ego_xy + centre_offset * np.stack([np.cos(ego_yaw), np.sin(ego_yaw)], 1)
        self.ego_yaw = ego_yaw
        self.ego_half = np.array([0.5 * EGO_LENGTH_M, 0.5 * EGO_WIDTH_M]) + self.EGO_MARGIN_M
        self.instances: List[Instance] = []
        self.centres = np.zeros((0, len(self.check_t), 2))
        self.yaws = np.zeros((0, len(self.check_t)))
        self.halves = np.zeros((0, 2))

    def try_add(self, inst: Instance) -> bool:
        xy, yaw = inst.motion.pose(self.check_t, self.path)
        half = np.array([0.5 * inst.size_wlh_m[1], 0.5 * inst.size_wlh_m[0]])
        if _boxes_overlap(self.ego_centre, self.ego_yaw, self.ego_half, xy, yaw, half).any():
            return False
        if len(self.instances):
            grown = half + self.OBJECT_MARGIN_M
            if _boxes_overlap(self.centres, self.yaws, self.halves[:, None, :], xy[None], yaw[None], grown).any():
                return False
        inst.index = len(self.instances)
        self.instances.append(inst)
        self.centres = np.concatenate([self.centres, xy[None]], axis=0)
        self.yaws = np.concatenate([self.yaws, yaw[None]], axis=0)
        self.halves = np.concatenate([self.halves, half[None]], axis=0)
        return True


def _size(category: str, attribute: str, rng) -> np.ndarray:
    """Box size (w, l, h) m: the category's prior with per-instance variation (truncated normal)."""
    if category == "vehicle.bicycle":
        mean, spread = ((0.62, 1.75, 1.68), (0.05, 0.1, 0.07)) if attribute == "cycle.with_rider" else \
            ((0.55, 1.7, 1.08), (0.05, 0.1, 0.06))
    elif category == "vehicle.motorcycle":
        mean, spread = ((0.82, 2.12, 1.62), (0.06, 0.14, 0.07)) if attribute == "cycle.with_rider" else \
            ((0.74, 2.05, 1.25), (0.06, 0.14, 0.07))
    elif attribute == "pedestrian.sitting_lying_down":
        mean, spread = (0.65, 0.9, 1.25), (0.06, 0.1, 0.08)
    else:
        mean, spread = SIZE_PRIORS[category]
    z = np.clip(rng.standard_normal(3), -2.2, 2.2)
    return np.maximum(np.asarray(mean) + z * np.asarray(spread), 0.1)


def _intensity(category: str, rng) -> float:
    key = category if category in LIDAR_INTENSITY else category.split(".")[0]
    lo, hi = LIDAR_INTENSITY.get(key, LIDAR_INTENSITY["other"])
    return float(rng.uniform(lo, hi))


class _SceneObjects:
    """Proposes objects by class at plausible places of the road layout; `_Placer` keeps the non-overlapping ones."""

    def __init__(self, rng, path: RoadPath, layout: RoadLayout, ego: EgoMotion, duration_s: float):
        self.rng, self.path, self.layout, self.ego, self.duration_s = rng, path, layout, ego, duration_s
        self.placer = _Placer(path, ego, duration_s)
        self.ego_max_speed = float(ego.speed_mps.max())

    # -- helpers --------------------------------------------------------------------------------------------------
    def _make(self, category, attribute, motion, size=None) -> Instance:
        size = _size(category, attribute, self.rng) if size is None else np.asarray(size, dtype=np.float64)
        parts = render.object_parts(category, size, attribute, self.rng)
        return Instance(-1, category, attribute, size, motion, parts, _intensity(category, self.rng))

    def _anchor(self, near: bool) -> Tuple[float, float]:
        """(time, arc length) where the object should be: near the ego at some moment of the scene."""
        rng = self.rng
        t = rng.uniform(0.0, self.duration_s)
        sign = 1.0 if rng.uniform() < 0.6 else -1.0  # a little more ahead than behind
        if near:
            ds = rng.uniform(7.0, 24.0)
        elif rng.uniform() < 0.85:
            ds = rng.uniform(2.0, 46.0)
        else:
            ds = rng.uniform(46.0, 66.0)
        return t, float(self.ego.s_at(t)) + sign * ds

    def _static_at(self, s, d, yaw_offset=0.0, yaw_noise=0.05) -> Motion:
        xy, heading = self.path.pose([s], d)
        yaw = float(heading[0]) + yaw_offset + self.rng.normal(0.0, yaw_noise)
        return Motion("free", x0_m=float(xy[0, 0]), y0_m=float(xy[0, 1]), yaw0_rad=yaw)

    def _along_road(self, t_anchor, s_anchor, d, speed_signed) -> Motion:
        return Motion("road", s0_m=s_anchor - speed_signed * t_anchor, speed_mps=speed_signed, d_m=d,
                      yaw_offset_rad=0.0 if speed_signed >= 0 else math.pi)

    def _lanes(self, include_ego_lane=True):
        """[(lane centre d, direction +1 with the ego / -1 oncoming, is the ego's lane)]."""
        lay = self.layout
        lanes = [(d, 1.0, k == lay.ego_lane) for k, d in enumerate(lay.same_lane_d_m)
                 if include_ego_lane or k != lay.ego_lane]
        lanes += [(d, -1.0, False) for d in lay.oncoming_lane_d_m]
        return lanes

    def _curbs(self):
        return (self.layout.curb_same_d_m, self.layout.curb_opp_d_m)

    def _sidewalk_d(self, curb, lo_frac=0.1, hi_frac=0.9):
        out = self.layout.outward(curb)
        return curb + out * self.rng.uniform(lo_frac, hi_frac) * self.layout.sidewalk_width_m

    def _lot_d(self, curb):
        out = self.layout.outward(curb)
        return curb + out * (self.layout.sidewalk_width_m + self.rng.uniform(2.0, 14.0))

    # -- proposals: each returns a list of candidate Instances ---------------------------------------------------
    def vehicle_in_lane(self, category, near, speed_range, stopped=False) -> List[Instance]:
        rng = self.rng
        t, s = self._anchor(near)
        lanes = self._lanes()
        d, direction, ego_lane = lanes[int(rng.integers(len(lanes)))]
        if stopped:
            speed = 0.0
        elif ego_lane:
            # Only traffic pulling away from the ego may share its lane (the ego never catches up with it).
            speed = self.ego_max_speed + rng.uniform(1.0, 3.0)
            s = float(self.ego.s_at(t)) + rng.uniform(12.0, 45.0)
        else:
            speed = rng.uniform(*speed_range)
        attribute = "vehicle.stopped" if stopped else "vehicle.moving"
        if category in ("vehicle.motorcycle", "vehicle.bicycle"):
            attribute = "cycle.with_rider"
        motion = self._along_road(t, s, d + rng.normal(0.0, 0.15), direction * speed)
        if stopped and direction < 0:
            motion.yaw_offset_rad = math.pi
        return [self._make(category, attribute, motion)]

    def queue_in_ego_lane(self, category, near) -> List[Instance]:
        """A vehicle ahead of or behind the ego in its lane that keeps its distance: it brakes, stops and pulls
        away with the ego (stop-and-go scenes get a realistic queue)."""
        rng = self.rng
        size = _size(category, "vehicle.moving", rng)
        ego_front = EGO_LENGTH_M - EGO_REAR_OVERHANG_M
        if rng.uniform() < 0.5:
            gap = (rng.uniform(4.0, 12.0) if near else rng.uniform(4.0, 35.0)) + ego_front + 0.5 * size[1]
        else:
            gap = -((rng.uniform(4.0, 12.0) if near else rng.uniform(4.0, 30.0)) + EGO_REAR_OVERHANG_M + 0.5 * size[1])
        ego = self.ego
        motion = Motion("road", s0_m=gap, d_m=rng.normal(0.0, 0.12), follow_ego=True, ego_t_s=ego.t_s,
                        ego_s_m=ego.s_m, ego_speed_mps=ego.speed_mps)
        return [self._make(category, "vehicle.moving", motion, size)]

    def vehicle_parked(self, category, near) -> List[Instance]:
        rng = self.rng
        t, s = self._anchor(near)
        lay = self.layout
        strips = [(d, 1.0) for d in (lay.parking_same_d_m,) if d is not None]
        strips += [(d, -1.0) for d in (lay.parking_opp_d_m,) if d is not None]
        attribute = "cycle.without_rider" if category in ("vehicle.motorcycle", "vehicle.bicycle") else "vehicle.parked"
        if strips and rng.uniform() < 0.6:
            d, direction = strips[int(rng.integers(len(strips)))]
            offset = 0.0 if direction > 0 else math.pi
            return [self._make(category, attribute, self._static_at(s, d + rng.normal(0, 0.1), offset))]
        curb = self._curbs()[int(rng.integers(2))]
        yaw_offset = float(rng.choice([0.0, math.pi, 0.5 * math.pi, -0.5 * math.pi]))
        return [self._make(category, attribute, self._static_at(s, self._lot_d(curb), yaw_offset, 0.08))]

    def bus(self, near) -> List[Instance]:
        rng = self.rng
        category = "vehicle.bus.bendy" if rng.uniform() < 0.15 else "vehicle.bus.rigid"
        t, s = self._anchor(near)
        lay = self.layout
        # Buses keep to the curb-side lane of either direction.
        options = [(lay.same_lane_d_m[0], 1.0)] if lay.ego_lane != 0 else []
        options.append((lay.oncoming_lane_d_m[-1], -1.0))
        d, direction = options[int(rng.integers(len(options)))]
        if rng.uniform() < 0.35:  # at a stop
            motion = self._static_at(s, d, 0.0 if direction > 0 else math.pi, 0.02)
            return [self._make(category, "vehicle.stopped", motion)]
        speed = rng.uniform(4.0, 10.0)
        return [self._make(category, "vehicle.moving", self._along_road(t, s, d, direction * speed))]

    def truck_with_trailer(self, near) -> List[Instance]:
        rng = self.rng
        t, s = self._anchor(near)
        lanes = self._lanes(include_ego_lane=False)
        d, direction, _ = lanes[int(rng.integers(len(lanes)))]
        speed = direction * rng.uniform(4.0, 10.0)
        truck_size = _size("vehicle.truck", "", rng)
        truck_size[1] = rng.uniform(5.5, 7.0)  # a tractor unit
        trailer_size = _size("vehicle.trailer", "", rng)
        gap = 0.5 * truck_size[1] + 0.6 + 0.5 * trailer_size[1]
        truck = self._make("vehicle.truck", "vehicle.moving", self._along_road(t, s, d, speed), truck_size)
        trailer = self._make("vehicle.trailer", "vehicle.moving",
                             self._along_road(t, s - direction * gap, d, speed), trailer_size)
        return [truck, trailer]

    def pedestrian(self, near) -> List[Instance]:
        rng = self.rng
        r = rng.uniform()
        category = ("human.pedestrian.adult" if r < 0.82 else "human.pedestrian.child" if r < 0.89 else
                    "human.pedestrian.construction_worker" if r < 0.96 else "human.pedestrian.police_officer")
        t, s = self._anchor(near)
        curb = self._curbs()[int(rng.integers(2))]
        mode = rng.uniform()
        if mode < 0.5:  # walking along the sidewalk, sometimes in a pair
            speed = rng.choice([-1.0, 1.0]) * rng.uniform(0.9, 1.7)
            d = self._sidewalk_d(curb, 0.15, 0.85)
            out = [self._make(category, "pedestrian.moving", self._along_road(t, s, d, speed))]
            if rng.uniform() < 0.25:
                d2 = d - self.layout.outward(curb) * 0.8 if abs(d - curb) > 1.2 else d + self.layout.outward(curb) * 0.8
                out.append(self._make("human.pedestrian.adult", "pedestrian.moving",
                                      self._along_road(t, s + rng.normal(0, 0.3), d2, speed)))
            return out
        if mode < 0.75:
            motion = self._static_at(s, self._sidewalk_d(curb), rng.uniform(-math.pi, math.pi), 0.0)
            return [self._make(category, "pedestrian.standing", motion)]
        if mode < 0.82:
            motion = self._static_at(s, self._sidewalk_d(curb, 0.6, 0.9), rng.uniform(-math.pi, math.pi), 0.0)
            return [self._make("human.pedestrian.adult", "pedestrian.sitting_lying_down", motion)]
        # Crossing the road, from one curb towards the other.
        out_dir = self.layout.outward(curb)
        speed = rng.uniform(1.0, 1.6)
        xy, heading = self.path.pose([s], curb - out_dir * 0.3)
        yaw = float(heading[0]) - out_dir * 0.5 * math.pi + rng.normal(0.0, 0.1)
        start = xy[0] - speed * t * np.array([math.cos(yaw), math.sin(yaw)]) * rng.uniform(0.0, 1.0)
        motion = Motion("free", x0_m=float(start[0]), y0_m=float(start[1]), yaw0_rad=yaw, speed_mps=speed,
                        yaw_rate_rps=rng.normal(0.0, 0.05))  # a gently curving path across
        return [self._make(category, "pedestrian.moving", motion)]

    def cycle(self, category, near) -> List[Instance]:
        rng = self.rng
        r = rng.uniform()
        if r < 0.4:
            if rng.uniform() < 0.4:
                return self.vehicle_parked(category, near)
            return self._cycle_on_sidewalk(category, near)
        if category == "vehicle.bicycle":
            # Riding along the curb-side edge of the road, either direction.
            t, s = self._anchor(near)
            lay = self.layout
            options = [(lay.same_lane_d_m[0] - lay.side * 0.3 * lay.lane_width_m, 1.0),
                       (lay.oncoming_lane_d_m[-1] + lay.side * 0.3 * lay.lane_width_m, -1.0)]
            d, direction = options[int(rng.integers(2))]
            speed = direction * rng.uniform(3.0, 6.5)
            return [self._make(category, "cycle.with_rider", self._along_road(t, s, d, speed))]
        return self.vehicle_in_lane(category, near, (6.0, 13.0), stopped=rng.uniform() < 0.15)

    def _cycle_on_sidewalk(self, category, near) -> List[Instance]:
        t, s = self._anchor(near)
        curb = self._curbs()[int(self.rng.integers(2))]
        d = curb + self.layout.outward(curb) * 0.6
        yaw = float(self.rng.choice([0.5 * math.pi, -0.5 * math.pi])) + self.rng.normal(0, 0.2)
        return [self._make(category, "cycle.without_rider", self._static_at(s, d, yaw, 0.0))]

    def cone_group(self, near) -> List[Instance]:
        rng = self.rng
        t, s = self._anchor(near)
        lay = self.layout
        lines = [lay.same_lane_d_m[0] - lay.side * 0.5 * lay.lane_width_m + lay.side * 0.3,
                 lay.oncoming_lane_d_m[-1] + lay.side * 0.5 * lay.lane_width_m - lay.side * 0.3]
        lines += [d for d in (lay.parking_same_d_m, lay.parking_opp_d_m) if d is not None]
        if len(lay.oncoming_lane_d_m) > 1:
            lines.append(0.5 * (lay.oncoming_lane_d_m[0] + lay.oncoming_lane_d_m[1]))
        d = lines[int(rng.integers(len(lines)))]
        spacing = rng.uniform(1.5, 3.5)
        size = _size("movable_object.trafficcone", "", rng)
        return [self._make("movable_object.trafficcone", "",
                           self._static_at(s + i * spacing, d + rng.normal(0, 0.08), rng.uniform(-math.pi, math.pi), 0),
                           size * rng.uniform(0.97, 1.03, 3))
                for i in range(int(rng.integers(2, 4) if near else rng.integers(2, 6)))]

    def barrier_row(self, near) -> List[Instance]:
        rng = self.rng
        t, s = self._anchor(near)
        lay = self.layout
        curb = self._curbs()[int(rng.integers(2))]
        r = rng.uniform() * (0.75 if near else 1.0)  # near rows stay by the road, where the ego sees them
        if r < 0.5:
            d = curb + lay.outward(curb) * rng.uniform(0.35, 0.7)  # along the sidewalk's edge
        elif r < 0.75 and (lay.parking_same_d_m is not None or lay.parking_opp_d_m is not None):
            d = lay.parking_same_d_m if lay.parking_same_d_m is not None else lay.parking_opp_d_m
        else:
            d = self._lot_d(curb)
        size = _size("movable_object.barrier", "", rng)
        spacing = size[0] + rng.uniform(0.05, 0.4)
        flip = math.pi if rng.uniform() < 0.5 else 0.0
        return [self._make("movable_object.barrier", "",
                           self._static_at(s + i * spacing, d, 0.5 * math.pi + flip, 0.03), size)
                for i in range(int(rng.integers(2, 4) if near else rng.integers(2, 6)))]

    def construction(self, near) -> List[Instance]:
        rng = self.rng
        r = rng.uniform()
        if r < 0.2:
            return self.vehicle_in_lane("vehicle.construction", near, (1.5, 4.0))
        if r < 0.35:
            return self.vehicle_in_lane("vehicle.construction", near, (0.0, 0.0), stopped=True)
        return self.vehicle_parked("vehicle.construction", near)

    def other(self, near) -> List[Instance]:
        """Objects of categories outside the 10 detection classes (the converter must drop them)."""
        rng = self.rng
        t, s = self._anchor(near)
        curb = self._curbs()[int(rng.integers(2))]
        r = rng.uniform()
        if r < 0.3:
            if rng.uniform() < 0.5:  # a dog wandering on a slow arc
                motion = self._static_at(s, self._sidewalk_d(curb), rng.uniform(-math.pi, math.pi), 0.0)
                motion.speed_mps, motion.yaw_rate_rps = rng.uniform(0.5, 2.0), rng.normal(0.0, 0.15)
            else:
                motion = self._static_at(s, self._sidewalk_d(curb), rng.uniform(-math.pi, math.pi), 0.0)
            return [self._make("animal", "", motion)]
        if r < 0.65:
            motion = self._static_at(s, curb + self.layout.outward(curb) * 0.5, rng.uniform(-0.3, 0.3), 0.05)
            return [self._make("movable_object.pushable_pullable", "", motion)]
        if r < 0.8:
            motion = self._static_at(s, curb - self.layout.outward(curb) * 0.6, rng.uniform(-math.pi, math.pi), 0.0)
            return [self._make("movable_object.debris", "", motion)]
        if rng.uniform() < 0.5:
            return self.vehicle_in_lane("vehicle.emergency.police", near, (5.0, 12.0))
        return self.vehicle_parked("vehicle.emergency.police", near)

    def scenery(self, s_lo_m: float, s_hi_m: float) -> List[Instance]:
        """Street lamps and trees along the sidewalks' outer edges: unannotated occluders and lidar returns."""
        rng = self.rng
        out = []
        for curb in self._curbs():
            edge = curb + self.layout.outward(curb) * (self.layout.sidewalk_width_m + 0.3)
            s = s_lo_m + rng.uniform(0.0, 20.0)
            while s < s_hi_m:
                if rng.uniform() < 0.5:
                    size = np.array([0.3, 0.3, rng.uniform(5.5, 8.0)])
                    category = "static.manmade"
                else:
                    crown = rng.uniform(2.5, 4.5)
                    size = np.array([crown, crown, rng.uniform(4.5, 8.0)])
                    category = "static.vegetation"
                motion = self._static_at(s, edge + self.layout.outward(curb) * 0.5 * size[0],
                                         rng.uniform(-math.pi, math.pi), 0.0)
                parts = render.scenery_parts(category, size, rng)
                out.append(Instance(-1, category, "", size, motion, parts, rng.uniform(10.0, 40.0), annotated=False))
                s += rng.uniform(15.0, 40.0)
        return out

    def propose(self, det_class: Optional[str], near: bool) -> List[Instance]:
        rng = self.rng
        if det_class == "car":
            r = rng.uniform()
            if r < 0.1:
                return self.queue_in_ego_lane("vehicle.car", near)
            if r < 0.5:
                return self.vehicle_in_lane("vehicle.car", near, (5.0, 13.0))
            if r < 0.62:
                return self.vehicle_in_lane("vehicle.car", near, (0.0, 0.0), stopped=True)
            return self.vehicle_parked("vehicle.car", near)
        if det_class == "truck":
            r = rng.uniform()
            if r < 0.45:
                return self.vehicle_in_lane("vehicle.truck", near, (4.0, 11.0))
            if r < 0.55:
                return self.vehicle_in_lane("vehicle.truck", near, (0.0, 0.0), stopped=True)
            return self.vehicle_parked("vehicle.truck", near)
        if det_class == "trailer":
            if rng.uniform() < 0.45:
                return self.truck_with_trailer(near)
            return self.vehicle_parked("vehicle.trailer", near)
        if det_class == "bus":
            return self.bus(near)
        if det_class == "construction_vehicle":
            return self.construction(near)
        if det_class == "pedestrian":
            return self.pedestrian(near)
        if det_class == "motorcycle":
            return self.cycle("vehicle.motorcycle", near)
        if det_class == "bicycle":
            return self.cycle("vehicle.bicycle", near)
        if det_class == "traffic_cone":
            return self.cone_group(near)
        if det_class == "barrier":
            return self.barrier_row(near)
        return self.other(near)


# Share of each class among the objects (beyond one guaranteed near instance of each); None = other categories.
# Weights are per proposal (a cone proposal is a group of ~3.5 cones, a barrier one a row of ~3.5 barriers), set
# so that the filled-in objects are roughly car 40%, pedestrian 20%, barrier 10%, traffic cone 8%, truck 6% (real
# nuScenes: car 43%, pedestrian 19%, barrier 15%, traffic cone 8%, truck 8%). With few objects per scene the one
# guaranteed instance of each class flattens this.
_CLASS_MIX = (("car", 0.38), ("pedestrian", 0.18), ("barrier", 0.03), ("traffic_cone", 0.024), ("truck", 0.06),
              ("motorcycle", 0.035), ("bicycle", 0.035), ("bus", 0.03), ("trailer", 0.02),
              ("construction_vehicle", 0.025), (None, 0.04))


def _add_near(scene: "_SceneObjects", det_class: str) -> None:
    """Add one instance of det_class near the ego (retrying proposals until one lands)."""
    for _ in range(30):  # a proposal may hold several objects (a truck with its trailer, a group of cones)
        landed = [inst for inst in scene.propose(det_class, near=True) if scene.placer.try_add(inst)]
        if any(CATEGORY_TO_DETECTION.get(inst.category) == det_class for inst in landed):
            return


def _populate(rng, path: RoadPath, layout: RoadLayout, ego: EgoMotion, duration_s: float,
              objects_per_sample: int) -> "_SceneObjects":
    """Objects of a scene: one near instance of every detection class first, then a class mix up to a density of
    about objects_per_sample within +-60 m of road around the ego (the count grows with the distance driven)."""
    scene = _SceneObjects(rng, path, layout, ego, duration_s)
    travel = float(ego.s_at(duration_s) - ego.s_at(0.0))
    target = max(int(round(objects_per_sample * (travel + 120.0) / 120.0)), len(DETECTION_CLASSES))
    for det_class in DETECTION_CLASSES:
        _add_near(scene, det_class)
    # And at least one object of another category (animal, debris, ...), which converters must drop.
    for _ in range(30):
        if any(scene.placer.try_add(inst) for inst in scene.propose(None, near=False)):
            break
    names = [name for name, _ in _CLASS_MIX]
    weights = np.array([w for _, w in _CLASS_MIX])
    attempts = 0
    while len(scene.placer.instances) < target and attempts < 8 * target:
        attempts += 1
        det_class = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        for inst in scene.propose(det_class, near=False):
            if len(scene.placer.instances) >= target:
                break
            scene.placer.try_add(inst)
    # Scenery last, where there is room left.
    s_lo, s_hi = float(ego.s_at(0.0)) - 80.0, float(ego.s_at(duration_s)) + 80.0
    for inst in scene.scenery(s_lo, s_hi):
        scene.placer.try_add(inst)
    return scene


# ----------------------------------------------------------------------------------------------------------------
# Scene plan: everything about one scene except the files
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorConfig:
    """The arguments that decide a scene's content (the scene count only decides how many there are)."""

    seed: int
    samples_per_scene: int
    scale: float
    objects_per_sample: int


@dataclass
class Calibration:
    """One sensor's calibrated_sensor values: translation (ego frame, m), rotation (w, x, y, z), and for cameras
    the 3x3 intrinsics for the written image size."""

    channel: str
    translation_m: Tuple[float, float, float]
    rotation_wxyz: Tuple[float, float, float, float]
    intrinsics: Optional[np.ndarray]

    def sensor2ego(self) -> np.ndarray:
        out = np.eye(4)
        out[:3, :3] = quaternion_to_rotation_matrix(np.asarray(self.rotation_wxyz))
        out[:3, 3] = self.translation_m
        return out


def image_size(scale: float) -> Tuple[int, int]:
    """(width, height) in pixels of the written camera images: 1600x900 times scale."""
    return max(int(round(FULL_WIDTH_PX * scale)), 8), max(int(round(FULL_HEIGHT_PX * scale)), 8)


def _rotation_about(axis: int, angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _quaternion_from_matrix(rotation: np.ndarray) -> Tuple[float, ...]:
    return tuple(float(v) for v in rotation_matrix_to_quaternion(rotation))


def rig_calibration(seed: int, log_index: int, scale: float) -> Dict[str, Calibration]:
    """The calibrated sensors of a log: the real rig with a per-log mounting jitter of a few mm / ~0.1 deg (real
    logs differ a little too), and camera intrinsics scaled to the written image size with the pixel-centre
    convention (cx' = (cx + 0.5) * s - 0.5)."""
    rng = np.random.default_rng([seed, 7919, log_index])
    width, height = image_size(scale)
    sx, sy = width / FULL_WIDTH_PX, height / FULL_HEIGHT_PX
    out = {}
    for cam in CAMERA_RIG:
        yaw = math.radians(cam.yaw_deg)
        # Columns: camera x (right), y (down), z (optical axis) in ego axes for a level camera looking along yaw.
        base = np.array([[math.sin(yaw), 0.0, math.cos(yaw)],
                         [-math.cos(yaw), 0.0, math.sin(yaw)],
                         [0.0, -1.0, 0.0]])
        pitch = math.radians(cam.tilt_deg[0] + rng.normal(0.0, 0.1))
        roll = math.radians(cam.tilt_deg[1] + rng.normal(0.0, 0.1))
        yaw_jitter = math.radians(rng.normal(0.0, 0.1))
        rotation = _rotation_about(2, yaw_jitter) @ base @ _rotation_about(0, pitch) @ _rotation_about(2, roll)
        translation = tuple(float(v) for v in np.asarray(cam.translation_m) + rng.normal(0.0, 0.004, 3))
        f = cam.focal_px * (1.0 + rng.normal(0.0, 0.001))
        intrinsics = np.array([[f * sx, 0.0, (cam.principal_px[0] + 0.5) * sx - 0.5],
                               [0.0, f * sy, (cam.principal_px[1] + 0.5) * sy - 0.5],
                               [0.0, 0.0, 1.0]])
        out[cam.channel] = Calibration(cam.channel, translation, _quaternion_from_matrix(rotation), intrinsics)
    lidar_rotation = _rotation_about(2, math.radians(LIDAR_YAW_DEG + rng.normal(0.0, 0.05)))
    lidar_rotation = lidar_rotation @ _rotation_about(0, math.radians(rng.normal(0.0, 0.1))) \
        @ _rotation_about(1, math.radians(rng.normal(0.0, 0.1)))
    translation = tuple(float(v) for v in np.asarray(LIDAR_TRANSLATION_M) + rng.normal(0.0, 0.003, 3))
    out[LIDAR_CHANNEL] = Calibration(LIDAR_CHANNEL, translation, _quaternion_from_matrix(lidar_rotation), None)
    return out


def _motion_arrays(instances: Sequence[Instance]) -> dict:
    """The motion parameters of all instances as arrays (n,), for posing them all at once."""
    fields = ("s0_m", "speed_mps", "d_m", "yaw_offset_rad", "x0_m", "y0_m", "yaw0_rad", "yaw_rate_rps")
    arrays = {name: np.array([getattr(inst.motion, name) for inst in instances], dtype=np.float64) for name in fields}
    arrays["road"] = np.array([inst.motion.mode == "road" for inst in instances])
    arrays["follow"] = np.array([inst.motion.follow_ego for inst in instances])
    followers = [inst.motion for inst in instances if inst.motion.follow_ego]
    arrays["ego"] = (followers[0].ego_t_s, followers[0].ego_s_m) if followers else None
    arrays["half_height"] = np.array([0.5 * inst.size_wlh_m[2] for inst in instances])
    return arrays


def _pose_arrays(a: dict, t: float, path: RoadPath) -> Tuple[np.ndarray, np.ndarray]:
    """(centres (n, 3), yaws (n,)) of all instances at time t: Motion.pose, vectorised over instances."""
    n = len(a["road"])
    xy = np.zeros((n, 2))
    yaw = np.zeros(n)
    road = a["road"]
    if road.any():
        travelled = a["speed_mps"] * t
        if a["ego"] is not None:
            travelled = np.where(a["follow"], np.interp(t, *a["ego"]), travelled)
        xy_road, heading = path.pose(a["s0_m"][road] + travelled[road], a["d_m"][road])
        xy[road], yaw[road] = xy_road, heading + a["yaw_offset_rad"][road]
    free = ~road
    if free.any():
        yaw0, rate, speed = a["yaw0_rad"][free], a["yaw_rate_rps"][free], a["speed_mps"][free]
        yaw_t = yaw0 + rate * t
        turning = np.abs(rate) > 1e-9
        safe_rate = np.where(turning, rate, 1.0)
        dx = np.where(turning, speed / safe_rate * (np.sin(yaw_t) - np.sin(yaw0)), speed * t * np.cos(yaw0))
        dy = np.where(turning, -speed / safe_rate * (np.cos(yaw_t) - np.cos(yaw0)), speed * t * np.sin(yaw0))
        xy[free] = np.stack([a["x0_m"][free] + dx, a["y0_m"][free] + dy], axis=1)
        yaw[free] = yaw_t
    centres = np.concatenate([xy, (render.GROUND_Z_M + a["half_height"])[:, None]], axis=1)
    return centres, yaw


@dataclass
class Annotation:
    """An instance at a keyframe: box in the global frame and its point counts / visibility token."""

    instance_index: int
    centre_global_m: np.ndarray
    yaw_rad: float
    num_lidar_pts: int
    num_radar_pts: int
    visibility_token: str
    distance_m: float
    attribute: str


@dataclass
class ScenePlan:
    """One scene, laid out: timing, road, ego motion, objects, lighting, and per keyframe the lidar sweep (LIDAR
    frame, points on ambiguous box faces removed) and the annotations."""

    index: int
    name: str
    log_index: int
    location: str
    weather: str
    duration_s: float
    keyframe_t_s: np.ndarray  # (K,) lidar times, scene seconds (0 = first keyframe)
    camera_t_s: np.ndarray  # (K, 6) in CAMERA_RIG order
    exposure: np.ndarray  # (6,) per camera
    path: RoadPath
    ego: EgoMotion
    layout: RoadLayout
    instances: List[Instance]
    env: render.Environment
    ground_layers: List[render.GroundLayer]
    map_polygons: List[np.ndarray]  # drivable surface and sidewalks (global xy), for the map mask
    terrain_bgr: Tuple[float, float, float]
    calibration: Dict[str, Calibration]
    sweeps: List[render.LidarSweep] = field(default_factory=list)
    annotations: List[List[Annotation]] = field(default_factory=list)
    _motion_arrays: Optional[dict] = None  # cache for posed_objects; reset when instances change

    def ego_pose(self, t_s: float) -> Tuple[Tuple[float, float, float], Tuple[float, float, float, float]]:
        """(translation, rotation wxyz) of the ego in the global frame at scene time t_s, as an ego_pose record."""
        xy, heading = self.path.pose([self.ego.s_at(t_s)])
        yaw = (float(heading[0]) + math.pi) % (2 * math.pi) - math.pi
        return (float(xy[0, 0]), float(xy[0, 1]), 0.0), tuple(float(v) for v in yaw_to_quaternion(yaw))

    def posed_objects(self, t_s: float, exclude: Sequence[int] = ()) -> List[render.PosedObject]:
        """Every instance (but the excluded indices) at scene time t_s, posed in one vectorised pass."""
        if not self.instances:
            return []
        if self._motion_arrays is None:
            self._motion_arrays = _motion_arrays(self.instances)
        centres, yaws = _pose_arrays(self._motion_arrays, float(t_s), self.path)
        excluded = set(int(i) for i in exclude)
        return [render.PosedObject(inst.index, centres[i], float(yaws[i]), inst.size_wlh_m, inst.parts,
                                   inst.intensity)
                for i, inst in enumerate(self.instances) if inst.index not in excluded]

    def ego2global(self, t_s: float) -> np.ndarray:
        translation, rotation = self.ego_pose(t_s)
        out = np.eye(4)
        out[:3, :3] = quaternion_to_rotation_matrix(np.asarray(rotation))
        out[:3, 3] = translation
        return out


def _environment(rng, location: str) -> Tuple[str, render.Environment, Tuple[float, float, float]]:
    """Weather, lighting, sky and skyline of a scene, and its terrain colour (BGR)."""
    r = rng.uniform()
    weather = "sunny" if r < 0.55 else "overcast" if r < 0.85 else "dusk"
    azimuth = rng.uniform(-math.pi, math.pi)
    if weather == "sunny":
        elevation = math.radians(rng.uniform(25.0, 65.0))
        ambient, diffuse, shadow = 0.55, 0.6, 0.45
        horizon, zenith, fog_m = (235, 215, 195), (215, 150, 90), 420.0
    elif weather == "overcast":
        elevation = math.radians(rng.uniform(30.0, 70.0))
        ambient, diffuse, shadow = 0.8, 0.25, 0.15
        horizon, zenith, fog_m = (205, 205, 200), (175, 172, 168), 220.0
    else:
        elevation = math.radians(rng.uniform(MIN_SUN_ELEVATION_DEG, 20.0))
        ambient, diffuse, shadow = 0.45, 0.5, 0.35
        horizon, zenith, fog_m = (150, 175, 230), (125, 95, 80), 300.0
    sun = np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                    math.sin(elevation)])
    # Skyline: blocks of buildings (and trees in Singapore) around the horizon, fixed in global azimuth, so a
    # turning camera sees it slide.
    n_bins = 720
    elev = np.zeros(n_bins)
    colours = np.zeros((n_bins, 3))
    i = 0
    singapore = location.startswith("singapore")
    while i < n_bins:
        width = int(rng.integers(4, 30))
        if singapore and rng.uniform() < 0.35:
            colour = np.array([50, 95, 60]) * rng.uniform(0.8, 1.2)
            height = rng.uniform(1.5, 5.0)
        else:
            colour = np.array([150, 150, 150]) * rng.uniform(0.55, 1.2) + rng.uniform(-15, 15, 3)
            height = rng.uniform(1.0, 11.0)
        elev[i:i + width] = math.radians(height)
        colours[i:i + width] = colour
        i += width
    terrain = (75, 118, 88) if singapore else (112, 122, 128)
    env = render.Environment(
        sun_direction_global=sun, ambient=ambient, diffuse=diffuse, sky_horizon_bgr=np.array(horizon, float),
        sky_zenith_bgr=np.array(zenith, float), fog_bgr=np.array(horizon, float) * 0.95, fog_distance_m=fog_m,
        shadow_strength=shadow, skyline_elevation_rad=elev, skyline_bgr=np.clip(colours, 0, 255),
        noise_sigma=float(rng.uniform(1.5, 3.0)))
    return weather, env, terrain


def _ground_layers(rng, path: RoadPath, layout: RoadLayout, location: str):
    """Road, sidewalks and markings as ground layers, and the map-mask polygons (drivable + sidewalk)."""
    s = np.arange(path.s_m[0], path.s_m[-1] + 0.5, 1.0)

    def band(d_a, d_b):
        a, _ = path.pose(s, d_a)
        b, _ = path.pose(s, d_b)
        return np.concatenate([a, b[::-1]], axis=0)

    def line(d):
        return path.pose(s, d)[0]

    lay = layout
    side = lay.side
    layers = []
    map_polygons = []
    asphalt = tuple(float(c) for c in np.array([78, 80, 82]) * rng.uniform(0.85, 1.15))
    sidewalk = tuple(float(c) for c in np.array([165, 168, 170]) * rng.uniform(0.9, 1.05))
    for curb in (lay.curb_same_d_m, lay.curb_opp_d_m):
        polygon = band(curb, curb + lay.outward(curb) * lay.sidewalk_width_m)
        layers.append(render.GroundLayer("polygon", polygon, sidewalk))
        layers.append(render.GroundLayer("line", line(curb), (200, 200, 200), 0.2))
        map_polygons.append(polygon)
    road = band(lay.curb_same_d_m, lay.curb_opp_d_m)
    layers.append(render.GroundLayer("polygon", road, asphalt))
    map_polygons.append(road)
    white, yellow = (235, 235, 235), (40, 190, 230)
    half = 0.5 * lay.lane_width_m
    # Edge lines at the outer lanes' edges (between the lanes and parking strips / curbs).
    layers.append(render.GroundLayer("line", line(lay.same_lane_d_m[0] - side * half), white, 0.15))
    layers.append(render.GroundLayer("line", line(lay.oncoming_lane_d_m[-1] + side * half), white, 0.15))
    for k in range(len(lay.same_lane_d_m) - 1):
        layers.append(render.GroundLayer("line", line(lay.same_lane_d_m[k] + side * half), white, 0.15, (3.0, 6.0)))
    for j in range(len(lay.oncoming_lane_d_m) - 1):
        layers.append(render.GroundLayer("line", line(lay.oncoming_lane_d_m[j] + side * half), white, 0.15,
                                         (3.0, 6.0)))
    median = lay.same_lane_d_m[-1] + side * half
    if side > 0:  # Boston: double yellow centre line
        layers.append(render.GroundLayer("line", line(median - 0.1), yellow, 0.12))
        layers.append(render.GroundLayer("line", line(median + 0.1), yellow, 0.12))
    else:  # Singapore: white centre line
        dash = (6.0, 3.0) if rng.uniform() < 0.5 else None
        layers.append(render.GroundLayer("line", line(median), white, 0.15, dash))
    # Zebra crossings at a few places along the road.
    for s_cross in rng.uniform(path.s_m[0] + 40.0, path.s_m[-1] - 40.0, size=int(rng.integers(0, 3))):
        xy, heading = path.pose([s_cross])
        direction = np.array([math.cos(heading[0]), math.sin(heading[0])])
        normal = np.array([-direction[1], direction[0]])
        d_lo, d_hi = sorted((lay.curb_same_d_m, lay.curb_opp_d_m))
        for d in np.arange(d_lo + 0.3, d_hi - 0.3, 1.0):
            centre = xy[0] + normal * (d + 0.25)
            corners = [centre + direction * sx * 1.5 + normal * sy * 0.25 for sx, sy in
                       ((-1, -1), (1, -1), (1, 1), (-1, 1))]
            layers.append(render.GroundLayer("polygon", np.array(corners), white))
    return layers, map_polygons


def _location_of_log(log_index: int):
    return LOCATIONS[log_index % len(LOCATIONS)]


def _scene_keyframes(plan: ScenePlan, config: GeneratorConfig) -> set:
    """Simulate the lidar at every keyframe and annotate. Returns the detection classes that have no annotation
    with points inside their evaluation range on an instance seen at least twice (what a scored split needs)."""
    lidar2ego = plan.calibration[LIDAR_CHANNEL].sensor2ego()
    plan.sweeps, plan.annotations = [], []
    keyframe_positions = []
    for k, t in enumerate(plan.keyframe_t_s):
        ego2global = plan.ego2global(float(t))
        keyframe_positions.append(ego2global[:2, 3])
        lidar2global = ego2global @ lidar2ego
        posed = plan.posed_objects(float(t))
        near = [p for p in posed if np.linalg.norm(p.centre_global_m[:2] - ego2global[:2, 3]) <
                render.LIDAR_MAX_RANGE_M + 20.0]
        rng = np.random.default_rng([config.seed, plan.index, k, 17])
        sweep = render.cast_lidar(lidar2global, near, rng, texture=None)
        plan.sweeps.append(sweep)
    # Which keyframes each instance is annotated in: the contiguous run between its first and last keyframe within
    # ANNOTATION_RANGE_M (tracks do not break).
    positions = np.array(keyframe_positions)
    annotated = {}
    for inst in plan.instances:
        if not inst.annotated:
            continue
        centres, _ = inst.poses(plan.keyframe_t_s, plan.path)
        inside = np.nonzero(np.linalg.norm(centres[:, :2] - positions, axis=1) <= ANNOTATION_RANGE_M)[0]
        if len(inside):
            annotated[inst.index] = range(int(inside[0]), int(inside[-1]) + 1)
    covered = set()
    for k, t in enumerate(plan.keyframe_t_s):
        ego2global = plan.ego2global(float(t))
        lidar2global = ego2global @ lidar2ego
        sweep = plan.sweeps[k]
        posed = plan.posed_objects(float(t))
        members = [inst for inst in plan.instances if inst.index in annotated and k in annotated[inst.index]]
        boxes = [posed[inst.index] for inst in members]
        counts, ambiguous = render.box_point_stats(sweep, lidar2global, boxes)
        sweep = render.filter_sweep(sweep, ~ambiguous)
        plan.sweeps[k] = sweep
        # Per-object ray statistics are indexed like the objects passed to cast_lidar (those near the lidar).
        near_keys = [p.key for p in posed
                     if np.linalg.norm(p.centre_global_m[:2] - ego2global[:2, 3]) < render.LIDAR_MAX_RANGE_M + 20.0]
        ray_stats = {key: (int(u), int(f)) for key, u, f in zip(near_keys, sweep.rays_unoccluded, sweep.rays_first_hit)}
        rng = np.random.default_rng([config.seed, plan.index, k, 29])
        frame = []
        for inst, box, count in zip(members, boxes, counts):
            unoccluded, first = ray_stats.get(inst.index, (0, 0))
            visible = first / unoccluded if unoccluded > 0 else 0.0
            token = [v[0] for v in VISIBILITY_LEVELS if visible >= v[3]][-1]
            dist = float(np.linalg.norm(box.centre_global_m[:2] - ego2global[:2, 3]))
            radar = _radar_points(inst.category, int(count), dist, visible, rng)
            frame.append(Annotation(inst.index, box.centre_global_m, box.yaw_rad, int(count), radar, token, dist,
                                    inst.attribute_at(float(t))))
            det = CATEGORY_TO_DETECTION.get(inst.category)
            if det and count > 0 and dist < CLASS_RANGE_M[det] - 1.0 and len(annotated[inst.index]) >= 2:
                covered.add(det)
        plan.annotations.append(frame)
    return set(DETECTION_CLASSES) - covered


_RADAR_RATE = {"car": 4.0, "truck": 6.0, "bus": 8.0, "trailer": 6.0, "construction_vehicle": 5.0, "motorcycle": 2.0,
               "bicycle": 1.0, "pedestrian": 0.6, "barrier": 1.0, "traffic_cone": 0.3}


def _radar_points(category: str, num_lidar_pts: int, distance_m: float, visible_fraction: float, rng) -> int:
    """A plausible radar return count (the 5 radars are not simulated): 0 when the lidar sees nothing, so the
    devkit's "lidar + radar points > 0" filter keeps exactly the objects with lidar points."""
    if num_lidar_pts == 0:
        return 0
    rate = _RADAR_RATE.get(CATEGORY_TO_DETECTION.get(category, ""), 0.5)
    rate *= min(max(25.0 / max(distance_m, 1.0), 0.3), 2.0) * max(visible_fraction, 0.2)
    return int(rng.poisson(rate))


def plan_scene(config: GeneratorConfig, scene_index: int) -> ScenePlan:
    """Lay out scene scene_index (deterministic in config.seed and scene_index), lidar and annotations included."""
    rng = np.random.default_rng([config.seed, scene_index])
    log_index = scene_index // SCENES_PER_LOG
    location, _, _, side = _location_of_log(log_index)
    k = config.samples_per_scene
    duration = (k - 1) * KEYFRAME_INTERVAL_S
    keyframe_t = np.arange(k) * KEYFRAME_INTERVAL_S + np.concatenate([[0.0], rng.uniform(-0.002, 0.002, k - 1)])
    offsets = np.array([cam.time_offset_s for cam in CAMERA_RIG])
    camera_t = keyframe_t[:, None] + offsets[None, :] + rng.uniform(-0.0005, 0.0005, (k, len(CAMERA_RIG)))
    # Whole microseconds, as the tables store them: renders, poses and annotations then use the same instants.
    keyframe_t, camera_t = np.round(keyframe_t * 1e6) / 1e6, np.round(camera_t * 1e6) / 1e6
    kind = EGO_MANEUVERS[(scene_index + config.seed) % len(EGO_MANEUVERS)]
    origin = rng.uniform(350.0, 550.0, 2)
    ego, path = _build_ego(kind, rng, duration, origin, rng.uniform(-math.pi, math.pi))
    layout = _road_layout(rng, side)
    weather, env, terrain = _environment(rng, location)
    layers, map_polygons = _ground_layers(rng, path, layout, location)
    exposure = rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, len(CAMERA_RIG))
    calibration = rig_calibration(config.seed, log_index, config.scale)
    plan = ScenePlan(scene_index, f"scene-{scene_number(scene_index):04d}", log_index, location, weather, duration,
                     keyframe_t, camera_t, exposure, path, ego, layout, [], env, layers, map_polygons, terrain,
                     calibration)
    for _ in range(5):
        scene = _populate(rng, path, layout, ego, duration, config.objects_per_sample)
        for _ in range(3):
            plan.instances = list(scene.placer.instances)
            plan._motion_arrays = None
            missing = _scene_keyframes(plan, config)
            if not missing:
                return plan
            # A class may end up hidden (behind a bus) or out of range: add another near instance and simulate
            # again; if that does not help (a trailer driving alongside the ego all scene), start over.
            for det_class in sorted(missing, key=DETECTION_CLASSES.index):
                _add_near(scene, det_class)
    raise RuntimeError(f"{plan.name}: could not make classes {sorted(missing)} visible; "
                       f"objects_per_sample={config.objects_per_sample} may leave no room")


def _scene_description(plan: ScenePlan) -> str:
    maneuver = {"straight": "straight road", "left": "turn left", "right": "turn right", "stop": "stop and go",
                "curve": "long curve"}[plan.ego.kind]
    categories = [inst.category for inst in plan.instances if inst.annotated]
    notes = [plan.weather.capitalize(), maneuver]
    if any(c == "vehicle.construction" for c in categories):
        notes.append("construction")
    if any(c.startswith("vehicle.bus") for c in categories):
        notes.append("bus")
    moving_peds = sum(1 for inst in plan.instances if inst.attribute == "pedestrian.moving")
    if moving_peds:
        notes.append("peds" if moving_peds < 4 else "many peds")
    if plan.layout.parking_same_d_m is not None or plan.layout.parking_opp_d_m is not None:
        notes.append("parked cars")
    return ", ".join(notes)


_TEXTURE_CACHE: Dict[Tuple, render.GroundTexture] = {}


def ground_texture(plan: ScenePlan, config: GeneratorConfig) -> render.GroundTexture:
    """The scene's ground texture (built once per scene and cached for the last few scenes)."""
    key = (config, plan.index)
    texture = _TEXTURE_CACHE.get(key)
    if texture is None:
        points = np.concatenate([layer.points_global_m for layer in plan.ground_layers], axis=0)
        margin = 60.0
        bounds = (points[:, 0].min() - margin, points[:, 1].min() - margin, points[:, 0].max() + margin,
                  points[:, 1].max() + margin)
        rng = np.random.default_rng([config.seed, plan.index, 3])
        resolution = 0.1 if config.scale <= 0.5 else 0.05
        texture = render.build_ground_texture(bounds, plan.ground_layers, plan.terrain_bgr, rng, resolution)
        if len(_TEXTURE_CACHE) >= 2:
            _TEXTURE_CACHE.clear()
        _TEXTURE_CACHE[key] = texture
    return texture


def render_camera(plan: ScenePlan, config: GeneratorConfig, keyframe_index: int, channel: str,
                  exclude_instance_indices: Sequence[int] = (), noise_seed: Optional[int] = None) -> np.ndarray:
    """Render one camera image of a keyframe (uint8 BGR, before JPEG), optionally without some instances.

    Objects are placed where they are at the camera's own timestamp, seen from the ego pose at that timestamp.
    noise_seed defaults to the one the writer uses for this sample_data, so that the render matches the file.
    """
    cam_index = CAMERA_CHANNELS.index(channel)
    t = float(plan.camera_t_s[keyframe_index, cam_index])
    calib = plan.calibration[channel]
    ego2global = plan.ego2global(t)
    cam2global = ego2global @ calib.sensor2ego()
    objects = [posed for posed in plan.posed_objects(t, exclude_instance_indices)
               if np.linalg.norm(posed.centre_global_m[:2] - ego2global[:2, 3]) < RENDER_RANGE_M]
    if noise_seed is None:
        noise_seed = _noise_seed(make_token(config.seed, "sample_data", plan.index, keyframe_index, channel))
    width, height = image_size(config.scale)
    return render.render_camera_image(ground_texture(plan, config), plan.env, calib.intrinsics, cam2global, width,
                                      height, objects, noise_seed, float(plan.exposure[cam_index]))


def _noise_seed(token: str) -> int:
    return int(token[:12], 16)


# ----------------------------------------------------------------------------------------------------------------
# Writing the dataset
# ----------------------------------------------------------------------------------------------------------------

TABLE_NAMES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
               "scene", "sample", "sample_data", "sample_annotation", "map")
MAP_RESOLUTION_M = 0.1  # the devkit's MapMask default


def _log_start(log_index: int) -> datetime.datetime:
    """When a log starts (local clock time): one log per day, at varying times of the morning."""
    return datetime.datetime(2018, 7, 2, 9, 0, 0) + datetime.timedelta(days=log_index, minutes=37 * (log_index % 13))


def _log_record(seed: int, log_index: int) -> dict:
    location, vehicle, utc_offset, _ = _location_of_log(log_index)
    start = _log_start(log_index)
    return {"token": make_token(seed, "log", log_index), "logfile": f"{vehicle}-{start:%Y-%m-%d-%H-%M-%S}{utc_offset}",
            "vehicle": vehicle, "date_captured": f"{start:%Y-%m-%d}", "location": location}


def _log_start_us(log_index: int) -> int:
    """Epoch microseconds at which a log starts (local clock time read as UTC: only differences matter)."""
    return calendar.timegm(_log_start(log_index).timetuple()) * 1_000_000


def _scene_start_us(plan: ScenePlan) -> int:
    spacing_s = max(40.0, plan.duration_s + 20.0)
    return _log_start_us(plan.log_index) + int(round((plan.index % SCENES_PER_LOG) * spacing_s * 1e6)) + 123_456


def _to_us(start_us: int, t_s: float) -> int:
    return start_us + int(round(t_s * 1e6))


def _floats(values) -> List[float]:
    return [float(v) for v in values]


def _link(records: List[dict]) -> None:
    """Set prev/next of a time-ordered chain of records."""
    for i, record in enumerate(records):
        record["prev"] = records[i - 1]["token"] if i > 0 else ""
        record["next"] = records[i + 1]["token"] if i + 1 < len(records) else ""


def _can_bus_pose_messages(plan: ScenePlan, start_us: int) -> List[dict]:
    """50 Hz pose messages as the CAN bus expansion's `scene-NNNN_pose.json`: position and orientation in the
    global frame, velocity / acceleration / rotation rate in the ego frame (accelerometer-style: gravity in +z)."""
    times = np.arange(-0.1, plan.duration_s + 0.1 + 1e-9, 0.02)
    messages = []
    for t in times:
        translation, rotation = plan.ego_pose(float(t))
        s = float(plan.ego.s_at(t))
        speed = float(plan.ego.speed_at(t))
        yaw_rate = speed * float(plan.path.curvature(s))
        messages.append({
            "accel": [float(plan.ego.accel_at(t)), speed * yaw_rate, 9.80665],
            "orientation": list(rotation),
            "pos": list(translation),
            "rotation_rate": [0.0, 0.0, yaw_rate],
            "utime": _to_us(start_us, float(t)),
            "vel": [speed, 0.0, 0.0],
        })
    return messages


class _Tables:
    """The 13 tables being filled, plus the per-location map polygons."""

    def __init__(self, seed: int):
        self.seed = seed
        self.records: Dict[str, List[dict]] = {name: [] for name in TABLE_NAMES}
        self.category_token = {name: make_token("category", name) for name, _ in CATEGORIES}
        self.attribute_token = {name: make_token("attribute", name) for name, _ in ATTRIBUTES}
        self.sensor_token = {ch: make_token("sensor", ch) for ch in CAMERA_CHANNELS + (LIDAR_CHANNEL,)}
        self.records["category"] = [{"token": self.category_token[name], "name": name, "description": desc,
                                     "index": i} for i, (name, desc) in enumerate(CATEGORIES)]
        self.records["attribute"] = [{"token": self.attribute_token[name], "name": name, "description": desc}
                                     for name, desc in ATTRIBUTES]
        self.records["visibility"] = [{"description": desc, "token": token, "level": level}
                                      for token, level, desc, _ in VISIBILITY_LEVELS]
        self.records["sensor"] = [{"token": self.sensor_token[ch], "channel": ch,
                                   "modality": "lidar" if ch == LIDAR_CHANNEL else "camera"}
                                  for ch in CAMERA_CHANNELS + (LIDAR_CHANNEL,)]
        self.logs: Dict[int, dict] = {}
        self.map_polygons: Dict[str, List[np.ndarray]] = {}

    def log(self, log_index: int) -> dict:
        if log_index not in self.logs:
            record = _log_record(self.seed, log_index)
            self.logs[log_index] = record
            self.records["log"].append(record)
        return self.logs[log_index]


def _write_scene(root: Path, config: GeneratorConfig, plan: ScenePlan, tables: _Tables) -> None:
    """Append one scene's records to the tables and write its images, point clouds and CAN bus messages."""
    seed, si = config.seed, plan.index
    log = tables.log(plan.log_index)
    start_us = _scene_start_us(plan)
    width, height = image_size(config.scale)
    scene_token = make_token(seed, "scene", si)

    calibrated = {}
    for channel in CAMERA_CHANNELS + (LIDAR_CHANNEL,):
        calib = plan.calibration[channel]
        token = make_token(seed, "calibrated_sensor", si, channel)
        calibrated[channel] = token
        tables.records["calibrated_sensor"].append({
            "token": token, "sensor_token": tables.sensor_token[channel],
            "translation": list(calib.translation_m), "rotation": list(calib.rotation_wxyz),
            "camera_intrinsic": [] if calib.intrinsics is None else [_floats(row) for row in calib.intrinsics]})

    samples = []
    sample_data_by_channel: Dict[str, List[dict]] = {ch: [] for ch in CAMERA_CHANNELS + (LIDAR_CHANNEL,)}
    annotations_by_instance: Dict[int, List[dict]] = {}
    for k, t_lidar in enumerate(plan.keyframe_t_s):
        sample_token = make_token(seed, "sample", si, k)
        lidar_us = _to_us(start_us, float(t_lidar))
        samples.append({"token": sample_token, "timestamp": lidar_us, "prev": "", "next": "",
                        "scene_token": scene_token})
        channel_times = [(LIDAR_CHANNEL, float(t_lidar))] + \
            [(ch, float(plan.camera_t_s[k, c])) for c, ch in enumerate(CAMERA_CHANNELS)]
        for channel, t in channel_times:
            timestamp = _to_us(start_us, t)
            # The ego pose and the objects are taken at the (microsecond-rounded) timestamp written to the table.
            t = (timestamp - start_us) * 1e-6
            translation, rotation = plan.ego_pose(t)
            pose_token = make_token(seed, "ego_pose", si, k, channel)
            tables.records["ego_pose"].append({"token": pose_token, "timestamp": timestamp,
                                               "rotation": list(rotation), "translation": list(translation)})
            token = make_token(seed, "sample_data", si, k, channel)
            is_lidar = channel == LIDAR_CHANNEL
            extension = "pcd.bin" if is_lidar else "jpg"
            filename = f"samples/{channel}/{log['logfile']}__{channel}__{timestamp}.{extension}"
            sample_data_by_channel[channel].append({
                "token": token, "sample_token": sample_token, "ego_pose_token": pose_token,
                "calibrated_sensor_token": calibrated[channel], "timestamp": timestamp,
                "fileformat": "pcd" if is_lidar else "jpg", "is_key_frame": True,
                "height": 0 if is_lidar else height, "width": 0 if is_lidar else width,
                "filename": filename, "prev": "", "next": ""})
            if is_lidar:
                plan.sweeps[k].points_lidar.astype(np.float32).tofile(root / filename)
            else:
                image = render_camera(plan, config, k, channel, noise_seed=_noise_seed(token))
                if not cv2.imwrite(str(root / filename), image, [cv2.IMWRITE_JPEG_QUALITY, 92]):
                    raise OSError(f"could not write image {root / filename}")
        for ann in plan.annotations[k]:
            inst = plan.instances[ann.instance_index]
            yaw = (ann.yaw_rad + math.pi) % (2 * math.pi) - math.pi
            annotations_by_instance.setdefault(inst.index, []).append({
                "token": make_token(seed, "sample_annotation", si, inst.index, k),
                "sample_token": sample_token,
                "instance_token": make_token(seed, "instance", si, inst.index),
                "visibility_token": ann.visibility_token,
                "attribute_tokens": [tables.attribute_token[ann.attribute]] if ann.attribute else [],
                "translation": _floats(ann.centre_global_m),
                "size": _floats(inst.size_wlh_m),
                "rotation": _floats(yaw_to_quaternion(yaw)),
                "prev": "", "next": "",
                "num_lidar_pts": ann.num_lidar_pts,
                "num_radar_pts": ann.num_radar_pts})

    _link(samples)
    tables.records["sample"].extend(samples)
    for channel, records in sample_data_by_channel.items():
        _link(records)
        tables.records["sample_data"].extend(records)
    for index in sorted(annotations_by_instance):
        records = annotations_by_instance[index]
        _link(records)
        tables.records["sample_annotation"].extend(records)
        tables.records["instance"].append({
            "token": make_token(seed, "instance", si, index),
            "category_token": tables.category_token[plan.instances[index].category],
            "nbr_annotations": len(records), "first_annotation_token": records[0]["token"],
            "last_annotation_token": records[-1]["token"]})
    tables.records["scene"].append({
        "token": scene_token, "log_token": log["token"], "nbr_samples": len(samples),
        "first_sample_token": samples[0]["token"], "last_sample_token": samples[-1]["token"],
        "name": plan.name, "description": _scene_description(plan)})
    with open(root / "can_bus" / f"{plan.name}_pose.json", "w") as f:
        json.dump(_can_bus_pose_messages(plan, start_us), f)
    tables.map_polygons.setdefault(plan.location, []).extend(plan.map_polygons)


def _write_maps(root: Path, seed: int, tables: _Tables) -> None:
    """One semantic-prior mask per location (255 = drivable surface or sidewalk) at 0.1 m/px, pixel (row, col)
    covering global (col * 0.1, (H - row) * 0.1) as the devkit's MapMask reads it, and its map record."""
    for location in sorted(tables.map_polygons):
        polygons = tables.map_polygons[location]
        extent = np.max([poly.max(axis=0) for poly in polygons], axis=0) + 20.0
        width = int(math.ceil(extent[0] / MAP_RESOLUTION_M))
        height = int(math.ceil(extent[1] / MAP_RESOLUTION_M))
        mask = np.zeros((height, width), dtype=np.uint8)
        pixels = [np.round(np.stack([poly[:, 0] / MAP_RESOLUTION_M, height - poly[:, 1] / MAP_RESOLUTION_M],
                                    axis=1)).astype(np.int32) for poly in polygons]
        cv2.fillPoly(mask, pixels, 255)
        token = make_token(seed, "map", location)
        filename = f"maps/{token}.png"
        if not cv2.imwrite(str(root / filename), mask, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"could not write map {root / filename}")
        tables.records["map"].append({
            "category": "semantic_prior", "token": token, "filename": filename,
            "log_tokens": [log["token"] for log in tables.records["log"] if log["location"] == location]})


def _prepare_root(root: Path) -> None:
    """Clear a previous synthetic set in root (so no stale file survives a rewrite); refuse other nuScenes data."""
    ours = [root / VERSION, root / "maps", root / "can_bus", root / "samples", root / GENERATOR_FILE]
    if (root / GENERATOR_FILE).is_file():
        for path in ours:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    elif any((root / name).exists() for name in ("samples", "sweeps", "maps", VERSION)):
        raise ValueError(f"{root} already holds nuScenes-like data not written by write_synthetic_nuscenes; "
                         f"choose an empty or new directory")


def write_synthetic_nuscenes(out_dir, num_scenes: int = DEFAULT_NUM_SCENES,
                             num_val_scenes: int = DEFAULT_NUM_VAL_SCENES,
                             samples_per_scene: int = DEFAULT_SAMPLES_PER_SCENE, seed: int = 0,
                             scale: float = DEFAULT_SCALE, objects_per_sample: int = DEFAULT_OBJECTS_PER_SAMPLE,
                             progress: bool = True, extra_train_scenes: int = 0) -> Path:
    """Write a synthetic nuScenes dataset (version `v1.0-synthetic`) under out_dir and return the data root.

    num_scenes training scenes (split `synthetic_train`) and num_val_scenes validation scenes (`synthetic_val`)
    of samples_per_scene keyframes (2 Hz) each; images of 1600x900 * scale pixels; about objects_per_sample
    objects within 60 m of the ego. The same arguments always give byte-identical files.
    extra_train_scenes more training scenes come after the validation scenes (scene indices num_scenes +
    num_val_scenes onwards), so a larger training set keeps the validation scenes of the smaller one: the
    validation scenes of (80, 8, extra 160) are those of (80, 8); each scene depends on its index and the seed only.
    Load it with `NuScenes('v1.0-synthetic', dataroot=out_dir)`; evaluate with eval_set='synthetic_val'.
    """
    if num_scenes < 0 or num_val_scenes < 0 or num_scenes + num_val_scenes < 1:
        raise ValueError(f"need at least one scene, got num_scenes={num_scenes}, num_val_scenes={num_val_scenes}")
    if extra_train_scenes < 0:
        raise ValueError(f"extra_train_scenes must be >= 0, got {extra_train_scenes}")
    if samples_per_scene < 2:
        raise ValueError(f"samples_per_scene must be >= 2 (velocities need two keyframes), got {samples_per_scene}")
    if not 0.01 <= scale <= 2.0:
        raise ValueError(f"scale must be in [0.01, 2] (1.0 = 1600x900 images), got {scale}")
    if objects_per_sample < 0:
        raise ValueError(f"objects_per_sample must be >= 0, got {objects_per_sample}")
    root = Path(out_dir)
    _prepare_root(root)
    config = GeneratorConfig(int(seed), int(samples_per_scene), float(scale), int(objects_per_sample))
    for sub in [VERSION, "maps", "can_bus"] + [f"samples/{ch}" for ch in CAMERA_CHANNELS + (LIDAR_CHANNEL,)]:
        (root / sub).mkdir(parents=True, exist_ok=True)
    tables = _Tables(config.seed)
    total = num_scenes + num_val_scenes + extra_train_scenes
    names = []
    start = time.perf_counter()
    for scene_index in range(total):
        plan = plan_scene(config, scene_index)
        _write_scene(root, config, plan, tables)
        names.append(plan.name)
        if progress:
            n_ann = sum(len(frame) for frame in plan.annotations)
            print(f"[synthetic] {plan.name} ({scene_index + 1}/{total}, {plan.ego.kind}, {plan.weather}, "
                  f"{len(plan.instances)} objects, {n_ann} annotations) {time.perf_counter() - start:.1f} s",
                  flush=True)
        _TEXTURE_CACHE.clear()
    _write_maps(root, config.seed, tables)
    for name in TABLE_NAMES:
        with open(root / VERSION / f"{name}.json", "w") as f:
            json.dump(tables.records[name], f, indent=0)
    num_first = num_scenes + num_val_scenes
    splits = {TRAIN_SPLIT: names[:num_scenes] + names[num_first:], VAL_SPLIT: names[num_scenes:num_first]}
    with open(root / VERSION / "splits.json", "w") as f:
        json.dump(splits, f, indent=0)
    with open(root / GENERATOR_FILE, "w") as f:
        json.dump({"format": "bevdeform-synthetic-nuscenes", "format_version": 1, "version": VERSION,
                   "seed": config.seed, "num_scenes": num_scenes, "num_val_scenes": num_val_scenes,
                   "samples_per_scene": config.samples_per_scene, "scale": config.scale,
                   "objects_per_sample": config.objects_per_sample, "scene_names": names,
                   # only when used, so the files of a set without extra scenes stay as they were
                   **({"extra_train_scenes": extra_train_scenes} if extra_train_scenes else {})}, f, indent=1)
    if progress:
        print(f"[synthetic] wrote {total} scenes x {samples_per_scene} samples to {root} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    return root


# ----------------------------------------------------------------------------------------------------------------
# Re-rendering a written frame (tests remove objects and compare)
# ----------------------------------------------------------------------------------------------------------------


def read_generator_config(data_root) -> Tuple[GeneratorConfig, dict]:
    """(config, the raw generator file) of a dataset written by write_synthetic_nuscenes."""
    path = Path(data_root) / GENERATOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {data_root} was not written by write_synthetic_nuscenes")
    meta = json.loads(path.read_text())
    config = GeneratorConfig(int(meta["seed"]), int(meta["samples_per_scene"]), float(meta["scale"]),
                             int(meta["objects_per_sample"]))
    return config, meta


@lru_cache(maxsize=4)
def _cached_plan(config: GeneratorConfig, scene_index: int) -> ScenePlan:
    return plan_scene(config, scene_index)


def render_sample_data(data_root, sample_data_token: str, exclude_instance_tokens: Sequence[str] = ()) -> np.ndarray:
    """Re-render the camera image of a written sample_data (uint8 BGR, before JPEG), without the given instances.

    With no exclusions this is the image the writer compressed into the JPEG file. The frame is found from the
    token's own construction (the writer's tokens are deterministic), so no table needs loading.
    """
    config, meta = read_generator_config(data_root)
    for scene_index in range(len(meta["scene_names"])):
        for k in range(config.samples_per_scene):
            for channel in CAMERA_CHANNELS:
                if make_token(config.seed, "sample_data", scene_index, k, channel) == sample_data_token:
                    plan = _cached_plan(config, scene_index)
                    wanted = set(exclude_instance_tokens)
                    exclude = [inst.index for inst in plan.instances
                               if make_token(config.seed, "instance", scene_index, inst.index) in wanted]
                    return render_camera(plan, config, k, channel, exclude)
    raise KeyError(f"sample_data token {sample_data_token} is not a camera image of the synthetic set at {data_root}")
