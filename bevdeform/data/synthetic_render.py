"""Rendering and lidar simulation for the synthetic nuScenes writer (`bevdeform.data.synthetic`).

Everything here works on a scene already laid out in the GLOBAL frame (x, y on the ground plane z = 0, z up,
metres), and knows nothing about nuScenes tables:
- object shapes: each annotated object is a few convex solids (`Part`) inside its annotation box, with a colour;
- `cast_lidar`: a 32-beam spinning lidar ray-cast against the ground plane and the object parts, giving a point
  cloud in the LIDAR frame, which points hit which object, and per-object visibility;
- `count_points_in_boxes` / `ambiguous_points_mask`: the devkit's `points_in_box` rule (inclusive faces), and the
  points lying within a few millimetres of a box face, which the writer drops so that float32 storage cannot flip
  a point in or out of a box;
- `render_camera_image`: a pinhole camera image: textured ground plane (road, lane markings) by per-pixel
  ray-plane intersection, sky and skyline, object shadows, objects as shaded polygons drawn far to near
  (painter's algorithm) after clipping against the near plane, then lens/sensor effects.

Only numpy and OpenCV: this module is part of the library, not a test.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

NEAR_PLANE_M = 0.1  # polygons are clipped to camera depth >= this before projection
GROUND_Z_M = 0.0  # the ground plane in the global frame (ego poses sit on it, as in nuScenes)

# ----------------------------------------------------------------------------------------------------------------
# Object shapes
# ----------------------------------------------------------------------------------------------------------------

# Cuboid vertex i has corner signs (x, y, z) = bits (4, 2, 1) of i: 0 -> (-,-,-), 7 -> (+,+,+).
_CUBOID_FACES = ((4, 6, 7, 5), (0, 1, 3, 2), (2, 3, 7, 6), (0, 4, 5, 1), (1, 5, 7, 3), (0, 2, 6, 4))
_CUBOID_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)


@dataclass(frozen=True)
class Part:
    """One convex solid of an object, in the object's box frame (x along the heading, y left, z up, metres,
    origin at the annotation box centre).

    faces: convex polygons as vertex-index tuples; normals_local: (F, 3) outward unit normals. level/base_m order
    stacked parts for the painter's algorithm (see `_ordered_parts`). aabb_*: the part's axis-aligned bounds in the
    box frame, which the lidar ray-casts against.
    """

    vertices_local_m: np.ndarray
    faces: Tuple[Tuple[int, ...], ...]
    normals_local: np.ndarray
    colour_bgr: Tuple[float, float, float]
    level: int
    base_m: float
    aabb_centre_local_m: np.ndarray
    aabb_half_m: np.ndarray


def _cuboid(size_wlh, x_frac, y_frac, z_frac, colour_bgr, level) -> Part:
    """An axis-aligned cuboid part; x_frac/y_frac in [-0.5, 0.5] of l/w, z_frac in [0, 1] of h from the bottom."""
    w, l, h = size_wlh
    lo = np.array([x_frac[0] * l, y_frac[0] * w, -0.5 * h + z_frac[0] * h])
    hi = np.array([x_frac[1] * l, y_frac[1] * w, -0.5 * h + z_frac[1] * h])
    bits = np.array([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], dtype=np.float64)
    vertices = lo + bits * (hi - lo)
    return Part(vertices, _CUBOID_FACES, _CUBOID_NORMALS, tuple(float(c) for c in colour_bgr), level,
                float(z_frac[0] * h), 0.5 * (lo + hi), 0.5 * (hi - lo))


def _frustum(size_wlh, bottom_half_frac, top_half_frac, z_frac, colour_bgr, level, sides=8) -> Part:
    """A regular n-sided truncated pyramid (a cone's stand-in) centred on the box axis; radii as fractions of w/l."""
    w, l, h = size_wlh
    z0, z1 = -0.5 * h + z_frac[0] * h, -0.5 * h + z_frac[1] * h
    angles = (np.arange(sides) + 0.5) * (2 * np.pi / sides)
    ring = np.stack([np.cos(angles) * l, np.sin(angles) * w], axis=1)  # (n, 2) radius 1 in units of (l, w)
    bottom = np.concatenate([ring * bottom_half_frac, np.full((sides, 1), z0)], axis=1)
    top = np.concatenate([ring * top_half_frac, np.full((sides, 1), z1)], axis=1)
    vertices = np.concatenate([bottom, top], axis=0)
    faces = [(i, (i + 1) % sides, sides + (i + 1) % sides, sides + i) for i in range(sides)]
    faces.append(tuple(range(2 * sides - 1, sides - 1, -1)))  # top
    faces.append(tuple(range(sides)))  # bottom
    normals = []
    centre = vertices.mean(axis=0)
    for face in faces:
        p = vertices[list(face)]
        n = np.cross(p[1] - p[0], p[2] - p[0])
        if np.linalg.norm(n) < 1e-12:
            n = np.cross(p[2] - p[0], p[3] - p[0])
        n = n / np.linalg.norm(n)
        if np.dot(n, p.mean(axis=0) - centre) < 0:  # outward
            n = -n
        normals.append(n)
    # The lidar sees the cone as a box of its mean radius: close enough for point counts and visibility.
    mean_half = 0.5 * (bottom_half_frac + top_half_frac) * np.array([l, w])
    aabb_half = np.array([mean_half[0], mean_half[1], 0.5 * (z1 - z0)])
    return Part(vertices, tuple(faces), np.array(normals), tuple(float(c) for c in colour_bgr), level,
                float(z_frac[0] * h), np.array([0.0, 0.0, 0.5 * (z0 + z1)]), aabb_half)


# Base colours, BGR 0-255.
_CAR_PAINTS = ((235, 235, 232), (28, 28, 30), (185, 182, 178), (115, 112, 110), (40, 40, 175), (150, 85, 30),
               (60, 105, 60), (50, 120, 190), (170, 150, 120))
_GLASS = (72, 58, 48)
_TYRE = (32, 32, 34)
_CLOTHES = ((40, 40, 40), (160, 60, 30), (40, 40, 150), (200, 200, 200), (50, 110, 60), (120, 120, 120),
            (30, 80, 150), (140, 50, 120), (60, 150, 190))
_SKIN = ((130, 160, 205), (95, 130, 180), (60, 90, 140), (45, 65, 100))


def _jitter(colour, rng, amount=14.0):
    """A colour with per-instance variation, clipped to 0-255."""
    return tuple(np.clip(np.asarray(colour, dtype=np.float64) + rng.uniform(-amount, amount, 3), 0, 255))


def _pick(rng, palette):
    return palette[int(rng.integers(len(palette)))]


def object_parts(category: str, size_wlh, attribute: str, rng: np.random.Generator) -> Tuple[Part, ...]:
    """The solids an object of this nuScenes category is drawn (and lidar-scanned) as, inside its box.

    The silhouettes differ by class (car body + glass cabin, truck cab + cargo box, bus window band, pedestrian
    legs/torso/head, riders on cycles, cones, striped barriers) so that a detector must use shape and size, not only
    colour; colours vary per instance.
    """
    s = tuple(float(v) for v in size_wlh)
    full = (-0.5, 0.5)
    if category in ("vehicle.car", "vehicle.emergency.police", "vehicle.emergency.ambulance"):
        if category == "vehicle.emergency.police":
            paint = _jitter((245, 245, 245), rng, 6)
        elif category == "vehicle.emergency.ambulance":
            paint = _jitter((225, 235, 240), rng, 6)
        else:
            paint = _jitter(_pick(rng, _CAR_PAINTS), rng)
        cabin_front = rng.uniform(0.12, 0.24)
        parts = [
            _cuboid(s, (-0.40, 0.40), (-0.47, 0.47), (0.0, 0.30), _TYRE, 0),
            _cuboid(s, full, full, (0.20, 0.58), paint, 1),
            _cuboid(s, (-0.36, cabin_front), (-0.44, 0.44), (0.58, 1.0), _jitter(_GLASS, rng, 8), 2),
        ]
        if category == "vehicle.emergency.police":
            parts.append(_cuboid(s, (-0.12, -0.02), (-0.25, 0.25), (0.96, 1.0), (200, 60, 30), 3))
        return tuple(parts)
    if category == "vehicle.truck":
        cab = _jitter(_pick(rng, ((230, 230, 230), (150, 80, 30), (40, 40, 170), (60, 120, 60), (30, 140, 220))), rng)
        cargo = _jitter(_pick(rng, ((225, 225, 222), (160, 160, 160), (80, 100, 130), (120, 140, 150))), rng)
        cab_len = rng.uniform(0.22, 0.30)
        return (
            _cuboid(s, (-0.45, 0.45), (-0.48, 0.48), (0.0, 0.20), _TYRE, 0),
            _cuboid(s, (0.5 - cab_len, 0.5), full, (0.15, 0.82), cab, 1),
            _cuboid(s, (0.5 - cab_len + 0.02, 0.5), (-0.46, 0.46), (0.82, 0.86), _GLASS, 2),
            _cuboid(s, (-0.5, 0.5 - cab_len - 0.03), full, (0.15, 1.0), cargo, 1),
        )
    if category in ("vehicle.bus.rigid", "vehicle.bus.bendy"):
        body = _jitter(_pick(rng, ((40, 40, 190), (60, 140, 60), (225, 225, 225), (160, 100, 40), (40, 160, 220))), rng)
        parts = [
            _cuboid(s, (-0.42, 0.44), (-0.48, 0.48), (0.0, 0.14), _TYRE, 0),
            _cuboid(s, full, full, (0.10, 0.52), body, 1),
            _cuboid(s, (-0.49, 0.49), (-0.49, 0.49), (0.52, 0.88), _jitter(_GLASS, rng, 6), 2),
            _cuboid(s, full, full, (0.88, 1.0), body, 3),
            # The windscreen: glass down to the bumper over the front face only, so front and back look different
            # (else a bus's heading is learnable only modulo pi). A fixed colour: no draw from rng, so the rest
            # of the scene comes out as before.
            _cuboid(s, (0.47, 0.5), full, (0.16, 0.88), _GLASS, 4),
        ]
        return tuple(parts)
    if category == "vehicle.trailer":
        colour = _jitter(_pick(rng, ((205, 205, 205), (90, 95, 140), (150, 150, 150), (60, 70, 90))), rng)
        return (
            _cuboid(s, (-0.46, -0.18), (-0.47, 0.47), (0.0, 0.26), _TYRE, 0),
            _cuboid(s, (0.38, 0.44), (-0.30, 0.30), (0.0, 0.26), (70, 70, 70), 0),
            _cuboid(s, full, full, (0.24, 1.0), colour, 1),
        )
    if category == "vehicle.construction":
        yellow = _jitter(_pick(rng, ((20, 190, 240), (10, 140, 235), (30, 200, 210))), rng, 10)
        return (
            _cuboid(s, (-0.46, 0.30), (-0.5, 0.5), (0.0, 0.28), (40, 40, 40), 0),
            _cuboid(s, (-0.5, 0.28), (-0.48, 0.48), (0.25, 0.58), yellow, 1),
            _cuboid(s, (-0.38, 0.02), (-0.46, 0.18), (0.58, 1.0), _jitter((90, 110, 110), rng, 8), 2),
            _cuboid(s, (0.30, 0.5), (-0.12, 0.12), (0.15, 0.88), _jitter(yellow, rng, 20), 1),
        )
    if category.startswith("human.pedestrian"):
        skin = _pick(rng, _SKIN)
        if category == "human.pedestrian.construction_worker":
            shirt = _jitter((0, 140, 250), rng, 10)
        elif category == "human.pedestrian.police_officer":
            shirt = _jitter((90, 40, 20), rng, 8)
        else:
            shirt = _jitter(_pick(rng, _CLOTHES), rng)
        trousers = _jitter(_pick(rng, _CLOTHES[:3] + ((90, 70, 50),)), rng)
        if attribute == "pedestrian.sitting_lying_down":
            return (
                _cuboid(s, (-0.5, 0.5), (-0.35, 0.35), (0.0, 0.40), trousers, 0),
                _cuboid(s, (-0.45, 0.05), (-0.45, 0.45), (0.40, 0.80), shirt, 1),
                _cuboid(s, (-0.32, -0.02), (-0.18, 0.18), (0.82, 1.0), skin, 2),
            )
        return (
            _cuboid(s, (-0.16, 0.16), (-0.32, 0.32), (0.0, 0.47), trousers, 0),
            _cuboid(s, (-0.24, 0.24), (-0.5, 0.5), (0.47, 0.83), shirt, 1),
            _cuboid(s, (-0.17, 0.17), (-0.17, 0.17), (0.86, 1.0), skin, 2),
        )
    if category in ("vehicle.motorcycle", "vehicle.bicycle"):
        frame = _jitter(_pick(rng, ((30, 30, 30), (40, 40, 170), (150, 90, 30), (200, 200, 200), (30, 150, 220))), rng)
        with_rider = attribute == "cycle.with_rider"
        # Two wheels (thin dark slabs front and back) and a frame / body between them, the rider on top.
        if category == "vehicle.motorcycle":
            top = 0.55 if with_rider else 1.0
            wheel_top, tyre_half_width, body = 0.40 * top / 0.55, 0.12, (-0.36, 0.32)
        else:
            top = 0.58 if with_rider else 1.0
            wheel_top, tyre_half_width, body = 0.55 * top / 0.58, 0.06, (-0.28, 0.28)
        parts = [
            _cuboid(s, (0.20, 0.5), (-tyre_half_width, tyre_half_width), (0.0, wheel_top), _TYRE, 0),
            _cuboid(s, (-0.5, -0.20), (-tyre_half_width, tyre_half_width), (0.0, wheel_top), _TYRE, 0),
            _cuboid(s, body, (-0.3, 0.3) if category == "vehicle.motorcycle" else (-0.1, 0.1),
                    (0.35 * wheel_top, top - 0.08), frame, 1),
            _cuboid(s, (0.28, 0.40), (-0.5, 0.5), (top - 0.08, top), (40, 40, 40), 2),  # handlebar
        ]
        if with_rider:
            clothes = _jitter(_pick(rng, _CLOTHES), rng)
            helmet = _jitter(_pick(rng, ((30, 30, 30), (220, 220, 220), (40, 40, 170))), rng)
            parts.append(_cuboid(s, (-0.30, 0.06), (-0.5, 0.5), (top, 0.86), clothes, 3))
            parts.append(_cuboid(s, (-0.20, 0.02), (-0.26, 0.26), (0.87, 1.0), helmet, 4))
        return tuple(parts)
    if category == "movable_object.trafficcone":
        orange = _jitter((10, 100, 250), rng, 10)
        return (
            _cuboid(s, full, full, (0.0, 0.05), (35, 35, 35), 0),
            _frustum(s, 0.36, 0.07, (0.05, 1.0), orange, 1),
            _frustum(s, 0.27, 0.19, (0.42, 0.62), (235, 235, 235), 2),
        )
    if category == "movable_object.barrier":
        # nuScenes barriers are wide across their heading (w ~ 2.5 m, l ~ 0.5 m): stripes run along y.
        if rng.uniform() < 0.5:
            a, b = _jitter((40, 40, 200), rng, 10), _jitter((235, 235, 235), rng, 8)
        else:
            a, b = _jitter((170, 170, 165), rng, 10), _jitter((20, 190, 230), rng, 10)
        edges = np.linspace(-0.5, 0.5, 5)
        parts = [_cuboid(s, (-0.5, 0.5), full, (0.0, 0.30), _jitter((150, 150, 150), rng, 10), 0)]
        for i in range(4):
            parts.append(_cuboid(s, (-0.28, 0.28), (edges[i], edges[i + 1]), (0.30, 1.0), a if i % 2 == 0 else b, 1))
        return tuple(parts)
    if category == "animal":
        fur = _jitter(_pick(rng, ((40, 70, 110), (30, 30, 30), (150, 160, 170))), rng)
        return (
            _cuboid(s, (-0.42, 0.42), (-0.38, 0.38), (0.0, 0.45), fur, 0),
            _cuboid(s, (-0.5, 0.30), full, (0.45, 0.80), fur, 1),
            _cuboid(s, (0.30, 0.5), (-0.32, 0.32), (0.62, 1.0), _jitter(fur, rng, 20), 1),
        )
    if category == "movable_object.pushable_pullable":
        colour = _jitter(_pick(rng, ((50, 110, 50), (90, 90, 90), (40, 90, 160))), rng)
        return (_cuboid(s, full, full, (0.0, 0.92), colour, 0),
                _cuboid(s, (-0.5, 0.5), full, (0.92, 1.0), _jitter(colour, rng, 25), 1))
    # debris and anything else: a plain block
    return (_cuboid(s, full, full, (0.0, 1.0), _jitter((80, 100, 120), rng, 25), 0),)


def scenery_parts(category: str, size_wlh, rng: np.random.Generator) -> Tuple[Part, ...]:
    """Street furniture that is never annotated: a lamp post (static.manmade) or a tree (static.vegetation)."""
    s = tuple(float(v) for v in size_wlh)
    if category == "static.manmade":
        grey = _jitter((120, 120, 118), rng, 10)
        return (_cuboid(s, (-0.5, 0.5), (-0.5, 0.5), (0.0, 1.0), grey, 0),)
    w = s[0]
    trunk = 0.35 / w
    green = _jitter(_pick(rng, ((45, 100, 55), (40, 85, 60), (55, 115, 75))), rng, 10)
    return (
        _cuboid(s, (-trunk / 2, trunk / 2), (-trunk / 2, trunk / 2), (0.0, 0.40), _jitter((45, 65, 85), rng, 8), 0),
        _frustum(s, 0.5, 0.25, (0.40, 1.0), green, 1),
    )


@dataclass
class PosedObject:
    """An object at one instant: annotation box (centre, yaw, size) in the global frame plus its parts.

    key: the caller's identifier (the writer uses the instance index); intensity: lidar return strength 0-255.
    """

    key: int
    centre_global_m: np.ndarray  # (3,)
    yaw_rad: float
    size_wlh_m: np.ndarray  # (3,)
    parts: Tuple[Part, ...]
    intensity: float = 30.0

    def rotation(self) -> np.ndarray:
        c, s = math.cos(self.yaw_rad), math.sin(self.yaw_rad)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def corners_global(self) -> np.ndarray:
        """(8, 3) box corners in the global frame."""
        w, l, h = self.size_wlh_m
        bits = np.array([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], dtype=np.float64) - 0.5
        return (bits * np.array([l, w, h])) @ self.rotation().T + self.centre_global_m


# ----------------------------------------------------------------------------------------------------------------
# Lidar
# ----------------------------------------------------------------------------------------------------------------

# Velodyne HDL-32E as on the nuScenes car: 32 rings from -30.67 to +10.67 deg, ~1084 firings per ring per 20 Hz sweep.
LIDAR_RING_ELEVATIONS_RAD = np.deg2rad(np.linspace(-30.67, 10.67, 32))
LIDAR_AZIMUTH_STEPS = 1084
LIDAR_MAX_RANGE_M = 80.0
_LIDAR_AZIMUTHS_RAD = -np.pi + (np.arange(LIDAR_AZIMUTH_STEPS) + 0.5) * (2 * np.pi / LIDAR_AZIMUTH_STEPS)
# Unit ray directions in the lidar frame, (32 rings, azimuth steps, 3).
_LIDAR_DIRS = np.stack([
    np.cos(LIDAR_RING_ELEVATIONS_RAD)[:, None] * np.cos(_LIDAR_AZIMUTHS_RAD)[None, :],
    np.cos(LIDAR_RING_ELEVATIONS_RAD)[:, None] * np.sin(_LIDAR_AZIMUTHS_RAD)[None, :],
    np.broadcast_to(np.sin(LIDAR_RING_ELEVATIONS_RAD)[:, None], (32, LIDAR_AZIMUTH_STEPS)),
], axis=-1)
# The same rays in firing order (all rings of azimuth column 0, then column 1, ...), with their ring and column.
_LIDAR_DIRS_FIRING = _LIDAR_DIRS.transpose(1, 0, 2).reshape(-1, 3)
_LIDAR_RING_FIRING = np.tile(np.arange(32), LIDAR_AZIMUTH_STEPS)
_LIDAR_COLUMN_FIRING = np.repeat(np.arange(LIDAR_AZIMUTH_STEPS), 32)
_INSIDE_OFFSET_M = 0.03  # object returns are placed this far inside the surface along the ray
AMBIGUITY_MARGIN_M = 0.005  # points closer than this to a box face are dropped (see module docstring)


@dataclass
class LidarSweep:
    """One simulated sweep.

    points_lidar: (N, 5) float32 x, y, z (m, LIDAR frame), intensity (0-255), ring index (0 = lowest beam), ordered
    by azimuth column as a spinning lidar fires. column: (N,) azimuth column of each point (for fast box queries).
    object_key: (N,) the PosedObject.key each point hit, -1 for ground. rays_unoccluded / rays_first_hit: per
    object (in the order given), rays that would hit it without occluders and rays whose first hit it is.
    """

    points_lidar: np.ndarray
    column: np.ndarray
    object_key: np.ndarray
    rays_unoccluded: np.ndarray
    rays_first_hit: np.ndarray


def _azimuth_columns(points_lidar_m: np.ndarray, pad: int) -> np.ndarray:
    """Azimuth columns (wrapped indices) spanned by a convex point set seen from the lidar origin, padded."""
    centre = points_lidar_m.mean(axis=0)
    centre_az = math.atan2(centre[1], centre[0])
    delta = np.arctan2(points_lidar_m[:, 1], points_lidar_m[:, 0]) - centre_az
    delta = (delta + np.pi) % (2 * np.pi) - np.pi
    step = 2 * np.pi / LIDAR_AZIMUTH_STEPS
    lo = int(math.floor((centre_az + delta.min() + np.pi) / step - 0.5)) - pad
    hi = int(math.ceil((centre_az + delta.max() + np.pi) / step - 0.5)) + pad
    return np.arange(lo, hi + 1) % LIDAR_AZIMUTH_STEPS


def _elevation_rows(corners_lidar_m: np.ndarray, centre_lidar_m: np.ndarray, radius_m: float) -> np.ndarray:
    """Ring indices that may hit a box: elevation bounds from its height span over its nearest/farthest distance."""
    rho_c = float(np.hypot(centre_lidar_m[0], centre_lidar_m[1]))
    rho_min, rho_max = max(rho_c - radius_m, 0.05), rho_c + radius_m
    z_min, z_max = corners_lidar_m[:, 2].min(), corners_lidar_m[:, 2].max()
    e_max = math.atan2(z_max, rho_min if z_max > 0 else rho_max)
    e_min = math.atan2(z_min, rho_min if z_min < 0 else rho_max)
    rows = np.nonzero((LIDAR_RING_ELEVATIONS_RAD >= e_min - 0.03) & (LIDAR_RING_ELEVATIONS_RAD <= e_max + 0.03))[0]
    return rows


def cast_lidar(lidar2global: np.ndarray, objects: Sequence[PosedObject], rng: np.random.Generator,
               texture: Optional["GroundTexture"] = None, dropout: float = 0.03,
               range_noise_m: float = 0.008) -> LidarSweep:
    """Ray-cast one 360-degree sweep from the lidar pose lidar2global (4x4) against the ground and the objects.

    Object returns lie slightly inside the hit part (so they count in its box), ground returns on z = GROUND_Z_M;
    rays that hit nothing within LIDAR_MAX_RANGE_M give no point, and a random `dropout` fraction is lost as on a
    real sensor. Ground intensity follows the texture's brightness (lane paint is bright, asphalt dark).
    """
    rotation = lidar2global[:3, :3]
    origin = lidar2global[:3, 3]
    dirs = _LIDAR_DIRS
    # Ground plane in the lidar frame: points p with (R^T e_z) . p = GROUND_Z_M - origin_z.
    normal_lidar = rotation.T @ np.array([0.0, 0.0, 1.0])
    denom = dirs @ normal_lidar  # (32, A)
    with np.errstate(divide="ignore"):
        t_ground = np.where(denom < -1e-6, (GROUND_Z_M - origin[2]) / denom, np.inf)
    depth = t_ground.copy()
    point_depth = t_ground.copy()  # where the point is placed (inside offset for objects)
    hit_object = np.full(depth.shape, -1, dtype=np.int64)
    rays_unoccluded = np.zeros(len(objects), dtype=np.int64)

    for k, obj in enumerate(objects):
        centre_lidar = rotation.T @ (obj.centre_global_m - origin)
        radius = 0.5 * float(np.linalg.norm(obj.size_wlh_m))
        if np.hypot(centre_lidar[0], centre_lidar[1]) - radius > LIDAR_MAX_RANGE_M:
            continue
        corners_lidar = (obj.corners_global() - origin) @ rotation
        cols = _azimuth_columns(corners_lidar, pad=1)
        rows = _elevation_rows(corners_lidar, centre_lidar, radius)
        if len(rows) == 0 or len(cols) == 0:
            continue
        sub_dirs = dirs[np.ix_(rows, cols)]  # (nr, nc, 3)
        obj_rotation_lidar = rotation.T @ obj.rotation()
        t_obj = np.full(sub_dirs.shape[:2], np.inf)
        t_obj_exit = np.full(sub_dirs.shape[:2], np.inf)
        # Ray directions in the object's axes (R^T d), and their inverses for the slab test; a zero component is
        # nudged so the slabs give +-inf bounds instead of NaN.
        dirs_local = sub_dirs @ obj_rotation_lidar
        dirs_local = np.where(np.abs(dirs_local) < 1e-12, 1e-12, dirs_local)
        inv = [1.0 / dirs_local[..., axis] for axis in range(3)]
        for part in obj.parts:
            part_centre_lidar = centre_lidar + obj_rotation_lidar @ part.aabb_centre_local_m
            origin_local = -(part_centre_lidar @ obj_rotation_lidar)  # R^T (0 - c): the lidar in the part's axes
            t_near = t_far = None
            for axis in range(3):
                t1 = (-part.aabb_half_m[axis] - origin_local[axis]) * inv[axis]
                t2 = (part.aabb_half_m[axis] - origin_local[axis]) * inv[axis]
                lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
                t_near = lo if t_near is None else np.maximum(t_near, lo)
                t_far = hi if t_far is None else np.minimum(t_far, hi)
            hit = (t_far >= t_near) & (t_near > 0)
            closer = hit & (t_near < t_obj)
            t_obj = np.where(closer, t_near, t_obj)
            t_obj_exit = np.where(closer, t_far, t_obj_exit)
        hit_any = np.isfinite(t_obj) & (t_obj < LIDAR_MAX_RANGE_M)
        rays_unoccluded[k] = int(hit_any.sum())
        if rays_unoccluded[k] == 0:
            continue
        index = np.ix_(rows, cols)
        current = depth[index]
        win = hit_any & (t_obj < current)
        depth[index] = np.where(win, t_obj, current)
        with np.errstate(invalid="ignore"):  # inf - inf where no part is hit; those rays are not used
            inside = t_obj + np.minimum(_INSIDE_OFFSET_M, 0.5 * (t_obj_exit - t_obj))
        point_depth[index] = np.where(win, inside, point_depth[index])
        hit_object[index] = np.where(win, k, hit_object[index])

    rays_first_hit = np.bincount(hit_object[hit_object >= 0], minlength=len(objects)).astype(np.int64)

    # Column-major order (all rings of azimuth 0, then azimuth 1, ...) as the sensor fires.
    depth_c = depth.T.reshape(-1)
    point_depth_c = point_depth.T.reshape(-1)
    hit_c = hit_object.T.reshape(-1)
    dirs_c, ring_c, column_c = _LIDAR_DIRS_FIRING, _LIDAR_RING_FIRING, _LIDAR_COLUMN_FIRING
    keep = (depth_c < LIDAR_MAX_RANGE_M) & (depth_c > 0.5) & (rng.uniform(size=depth_c.shape) >= dropout)
    noise = np.clip(rng.normal(0.0, range_noise_m, size=depth_c.shape), -2 * range_noise_m, 2 * range_noise_m)
    ranges = (point_depth_c + noise)[keep]
    xyz = dirs_c[keep] * ranges[:, None]
    hit_kept = hit_c[keep]

    intensity = np.empty(len(xyz))
    is_ground = hit_kept < 0
    if texture is not None and is_ground.any():
        ground_global = xyz[is_ground] @ rotation.T + origin
        brightness = texture.sample_brightness(ground_global[:, 0], ground_global[:, 1])
        intensity[is_ground] = 2.0 + 90.0 * np.clip(brightness - 0.15, 0.0, 1.0) ** 2
    else:
        intensity[is_ground] = 8.0
    if (~is_ground).any():
        object_intensity = np.array([obj.intensity for obj in objects], dtype=np.float64)
        intensity[~is_ground] = object_intensity[hit_kept[~is_ground]]
    intensity = np.clip(intensity + rng.normal(0.0, 2.0, size=intensity.shape), 0.0, 255.0).round()

    points = np.concatenate([xyz, intensity[:, None], ring_c[keep][:, None]], axis=1).astype(np.float32)
    object_key = np.array([obj.key for obj in objects] + [-1], dtype=np.int64)[hit_kept]  # -1 indexes the ground
    return LidarSweep(points, column_c[keep], object_key, rays_unoccluded, rays_first_hit)


def _points_box_signed_distance(points_global_m: np.ndarray, centre_global_m, rotation_global, size_wlh_m):
    """max over the box axes of (|local coordinate| - half extent): <= 0 inside (faces included), > 0 outside."""
    local = (points_global_m - np.asarray(centre_global_m)) @ np.asarray(rotation_global)
    w, l, h = size_wlh_m
    half = np.array([l, w, h]) * 0.5
    return np.max(np.abs(local) - half, axis=1)


def _box_point_range(sweep: LidarSweep, box_corners_lidar_m: np.ndarray) -> np.ndarray:
    """Indices of the sweep's points whose azimuth column may lie inside a box (plus 2 columns each side)."""
    cols = _azimuth_columns(box_corners_lidar_m, pad=2)
    selected = np.zeros(LIDAR_AZIMUTH_STEPS, dtype=bool)
    selected[cols] = True
    return np.nonzero(selected[sweep.column])[0]


def box_point_stats(sweep: LidarSweep, lidar2global: np.ndarray, boxes: Sequence[PosedObject]):
    """(counts (B,), ambiguous (N,) bool) for boxes in the global frame over the sweep's float32 points.

    ambiguous marks points within AMBIGUITY_MARGIN_M of any box's surface (inside or out), whose membership float
    rounding could flip; counts are the devkit's `points_in_box` counts (inside or on a face) over the other
    points, i.e. exact for the sweep once the ambiguous points are dropped (`filter_sweep`).
    """
    rotation, origin = lidar2global[:3, :3], lidar2global[:3, 3]
    points_lidar = sweep.points_lidar[:, :3].astype(np.float64)  # the float32 values a reader gets
    ambiguous = np.zeros(len(points_lidar), dtype=bool)
    inside = []
    for box in boxes:
        corners_lidar = (box.corners_global() - origin) @ rotation
        idx = _box_point_range(sweep, corners_lidar)
        if len(idx) == 0:
            inside.append(idx)
            continue
        points_global = points_lidar[idx] @ rotation.T + origin
        signed = _points_box_signed_distance(points_global, box.centre_global_m, box.rotation(), box.size_wlh_m)
        ambiguous[idx[np.abs(signed) < AMBIGUITY_MARGIN_M]] = True
        inside.append(idx[signed <= 0])
    counts = np.array([int((~ambiguous[idx]).sum()) for idx in inside], dtype=np.int64)
    return counts, ambiguous


def filter_sweep(sweep: LidarSweep, keep: np.ndarray) -> LidarSweep:
    """The sweep restricted to the points where keep is True (per-object ray statistics unchanged)."""
    return LidarSweep(sweep.points_lidar[keep], sweep.column[keep], sweep.object_key[keep], sweep.rays_unoccluded,
                      sweep.rays_first_hit)


# ----------------------------------------------------------------------------------------------------------------
# Ground texture and environment
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class GroundLayer:
    """Something painted on the ground, in global x/y metres: a filled polygon or a (dashed) line."""

    kind: str  # "polygon" or "line"
    points_global_m: np.ndarray  # (n, 2)
    colour_bgr: Tuple[float, float, float]
    width_m: float = 0.15
    dash_m: Optional[Tuple[float, float]] = None  # (painted, gap) lengths for dashed lines


_MOTTLE_CELL = 30  # texture pixels per mottling cell (3 m at 0.1 m/px)


@dataclass
class GroundTexture:
    """A top-down colour image of the ground around a scene: pixel (row, col) centre lies at global
    x = x_min + col * resolution, y = y_max - row * resolution."""

    image_bgr: np.ndarray  # (H, W, 3) uint8
    x_min_m: float
    y_max_m: float
    resolution_m: float
    border_bgr: Tuple[float, float, float]
    mottle: Optional[np.ndarray] = None  # (H / _MOTTLE_CELL + 2, W / _MOTTLE_CELL + 2) brightness factors

    def to_pixels(self, x_m, y_m):
        col = (np.asarray(x_m) - self.x_min_m) / self.resolution_m
        row = (self.y_max_m - np.asarray(y_m)) / self.resolution_m
        return col, row

    def sample_brightness(self, x_m, y_m) -> np.ndarray:
        """Mean colour (0-1) at global points (nearest pixel; the border colour outside)."""
        col, row = self.to_pixels(x_m, y_m)
        col = np.round(col).astype(np.int64)
        row = np.round(row).astype(np.int64)
        height, width = self.image_bgr.shape[:2]
        inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
        out = np.full(len(col), float(np.mean(self.border_bgr)) / 255.0)
        out[inside] = self.image_bgr[row[inside], col[inside]].mean(axis=1) / 255.0
        return out


def build_ground_texture(bounds_m: Tuple[float, float, float, float], layers: Sequence[GroundLayer],
                         base_bgr, rng: np.random.Generator, resolution_m: float = 0.1) -> GroundTexture:
    """Rasterise ground layers over bounds (x_min, y_min, x_max, y_max) onto a mottled base colour."""
    x_min, y_min, x_max, y_max = bounds_m
    width = int(math.ceil((x_max - x_min) / resolution_m)) + 1
    height = int(math.ceil((y_max - y_min) / resolution_m)) + 1
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = np.asarray(base_bgr, dtype=np.uint8)
    shift = 3  # sub-pixel bits for cv2 drawing

    def to_px(points):
        col = (points[:, 0] - x_min) / resolution_m
        row = (y_max - points[:, 1]) / resolution_m
        return np.round(np.stack([col, row], axis=1) * (1 << shift)).astype(np.int32)

    for layer in layers:
        colour = tuple(float(c) for c in layer.colour_bgr)
        if layer.kind == "polygon":
            cv2.fillPoly(image, [to_px(layer.points_global_m)], colour, lineType=cv2.LINE_AA, shift=shift)
            continue
        thickness = max(1, int(round(layer.width_m / resolution_m)))
        points = layer.points_global_m
        if layer.dash_m is None:
            cv2.polylines(image, [to_px(points)], False, colour, thickness, lineType=cv2.LINE_AA, shift=shift)
            continue
        on_m, off_m = layer.dash_m
        seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        starts = np.arange(0.0, arc[-1], on_m + off_m)
        dashes = []
        for start in starts:
            ss = np.linspace(start, min(start + on_m, arc[-1]), 4)
            dash = np.stack([np.interp(ss, arc, points[:, 0]), np.interp(ss, arc, points[:, 1])], axis=1)
            dashes.append(to_px(dash))
        cv2.polylines(image, dashes, False, colour, thickness, lineType=cv2.LINE_AA, shift=shift)

    # Low-frequency mottling (worn asphalt, grass patches) so the ground is not a flat colour: it gives the cameras
    # texture to match between frames, as real road surfaces do. Kept coarse (one value per _MOTTLE_CELL pixels)
    # and multiplied in at render time, which is far cheaper than modulating the full-resolution texture.
    mottle = rng.normal(1.0, 0.07, size=(height // _MOTTLE_CELL + 2, width // _MOTTLE_CELL + 2)).astype(np.float32)
    return GroundTexture(image, float(x_min), float(y_max), float(resolution_m), tuple(float(c) for c in base_bgr),
                         mottle)


@dataclass
class Environment:
    """Lighting and sky of a scene. sun_direction_global points from the ground towards the sun (unit)."""

    sun_direction_global: np.ndarray
    ambient: float
    diffuse: float
    sky_horizon_bgr: np.ndarray
    sky_zenith_bgr: np.ndarray
    fog_bgr: np.ndarray
    fog_distance_m: float
    shadow_strength: float
    skyline_elevation_rad: np.ndarray  # (n_bins,) over global azimuth [-pi, pi)
    skyline_bgr: np.ndarray  # (n_bins, 3)
    noise_sigma: float


# ----------------------------------------------------------------------------------------------------------------
# Camera
# ----------------------------------------------------------------------------------------------------------------

_RAY_CACHE = {}


def _camera_rays(intrinsics: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H*W, 3) camera-frame rays K^-1 [u, v, 1] through pixel centres (integer u, v), cached per camera."""
    key = (intrinsics.tobytes(), width, height)
    rays = _RAY_CACHE.get(key)
    if rays is None:
        u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
        pixels = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
        rays = (pixels @ np.linalg.inv(intrinsics).T).astype(np.float32)
        if len(_RAY_CACHE) > 32:
            _RAY_CACHE.clear()
        _RAY_CACHE[key] = rays
    return rays


_VIGNETTE_CACHE = {}


def _vignette(width: int, height: int) -> np.ndarray:
    key = (width, height)
    if key not in _VIGNETTE_CACHE:
        u = (np.arange(width) - 0.5 * (width - 1)) / (0.5 * width)
        v = (np.arange(height) - 0.5 * (height - 1)) / (0.5 * width)
        r2 = u[None, :] ** 2 + v[:, None] ** 2
        _VIGNETTE_CACHE[key] = (1.0 - 0.18 * r2).astype(np.float32)[..., None]
    return _VIGNETTE_CACHE[key]


def _background(texture: GroundTexture, env: Environment, intrinsics, cam2global, width, height) -> np.ndarray:
    """Ground (textured, lit, fogged), far haze and sky with a skyline: (H, W, 3) float32 BGR."""
    rays_cam = _camera_rays(intrinsics, width, height)
    rays = rays_cam @ cam2global[:3, :3].T.astype(np.float32)  # (H*W, 3) global directions (not unit)
    origin = cam2global[:3, 3]
    dz = rays[:, 2]
    is_ground = dz < -1e-4  # the ground within ~15 km; farther pixels are haze
    image = np.empty((height * width, 3), dtype=np.float32)

    # Ground: intersect with z = GROUND_Z_M, look the texture up with cv2.remap, light and fog it.
    ground_rays = rays[is_ground]
    t = np.float32(GROUND_Z_M - origin[2]) / ground_rays[:, 2]
    col = (np.float32(origin[0] - texture.x_min_m) + t * ground_rays[:, 0]) / np.float32(texture.resolution_m)
    row = (np.float32(texture.y_max_m - origin[1]) - t * ground_rays[:, 1]) / np.float32(texture.resolution_m)
    map_x = np.full(height * width, -10.0, dtype=np.float32)
    map_y = np.full(height * width, -10.0, dtype=np.float32)
    map_x[is_ground], map_y[is_ground] = col, row
    map_x, map_y = map_x.reshape(height, width), map_y.reshape(height, width)
    ground = cv2.remap(texture.image_bgr, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                       borderValue=texture.border_bgr).reshape(-1, 3)[is_ground].astype(np.float32)
    light = (env.ambient + env.diffuse * max(0.0, float(env.sun_direction_global[2]))) * 1.05
    if texture.mottle is not None:
        cell = np.float32(1.0 / _MOTTLE_CELL)
        mottle = cv2.remap(texture.mottle, map_x * cell, map_y * cell, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE).reshape(-1)[is_ground]
        ground *= (mottle * np.float32(light))[:, None]
    else:
        ground *= np.float32(light)
    distance = t * np.sqrt(np.einsum("ij,ij->i", ground_rays, ground_rays))
    fog = (1.0 - np.exp(-distance / np.float32(env.fog_distance_m)))[:, None]
    image[is_ground] = ground + (env.fog_bgr.astype(np.float32)[None, :] - ground) * fog

    # Sky: gradient from the horizon colour up to the zenith colour, buildings/trees along the horizon.
    sky_rays = rays[~is_ground]
    elevation = np.arctan2(sky_rays[:, 2], np.hypot(sky_rays[:, 0], sky_rays[:, 1]))
    azimuth = np.arctan2(sky_rays[:, 1], sky_rays[:, 0])
    n_bins = len(env.skyline_elevation_rad)
    bins = ((azimuth + np.float32(np.pi)) * np.float32(n_bins / (2 * np.pi))).astype(np.int64) % n_bins
    blend = np.clip(elevation / np.float32(0.6), 0.0, 1.0)[:, None]
    horizon, zenith = env.sky_horizon_bgr.astype(np.float32), env.sky_zenith_bgr.astype(np.float32)
    sky = horizon[None, :] + (zenith - horizon)[None, :] * blend
    skyline = elevation < env.skyline_elevation_rad[bins]
    sky[skyline] = (env.skyline_bgr[bins[skyline]] * 0.75 + env.fog_bgr[None, :] * 0.25).astype(np.float32)
    image[~is_ground] = sky
    return image.reshape(height, width, 3)


def _clip_polygon_near(poly_cam: np.ndarray) -> Optional[np.ndarray]:
    """Sutherland-Hodgman clip of a camera-frame polygon (n, 3) to depth z >= NEAR_PLANE_M; None if nothing left."""
    out = []
    n = len(poly_cam)
    for i in range(n):
        a, b = poly_cam[i], poly_cam[(i + 1) % n]
        a_in, b_in = a[2] >= NEAR_PLANE_M, b[2] >= NEAR_PLANE_M
        if a_in:
            out.append(a)
        if a_in != b_in:
            t = (NEAR_PLANE_M - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out) if len(out) >= 3 else None


_SHIFT = 4  # sub-pixel bits for cv2.fillPoly


def _project(points_cam: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Camera points (n, 3) with z > 0 -> fixed-point pixel coordinates for cv2 (n, 2) int32."""
    uv = points_cam[:, :2] / points_cam[:, 2:3] * np.array([intrinsics[0, 0], intrinsics[1, 1]]) + intrinsics[:2, 2]
    # Beyond ~1e6 px int32 fixed point would overflow; such vertices only arise within mm of the near plane.
    return np.round(np.clip(uv, -1e6, 1e6) * (1 << _SHIFT)).astype(np.int32)


def _polygon_pixels(poly_cam: np.ndarray, intrinsics: np.ndarray) -> Optional[np.ndarray]:
    if np.all(poly_cam[:, 2] >= NEAR_PLANE_M):
        return _project(poly_cam, intrinsics)
    clipped = _clip_polygon_near(poly_cam)
    return None if clipped is None else _project(clipped, intrinsics)


def _ordered_parts(obj: PosedObject, camera_position: np.ndarray):
    """Part order for the painter's algorithm within one object.

    Parts stack in levels (wheels, body, cabin). Seen from above a level's base, lower levels are drawn first and
    the upper part covers the top face below it; levels whose base is above the camera are seen from below, so they
    go first, highest first, and the levels under them cover their bottom faces. Within a level (side by side, like
    a cycle's two wheels), farther parts first.
    """
    height_above_bottom = camera_position[2] - (obj.centre_global_m[2] - 0.5 * obj.size_wlh_m[2])
    rotation = obj.rotation()

    def key(part):
        distance = float(np.linalg.norm(obj.centre_global_m + rotation @ part.aabb_centre_local_m - camera_position))
        if part.base_m > height_above_bottom:
            return (0, -part.level, -distance)
        return (1, part.level, -distance)

    return sorted(obj.parts, key=key)


def _draw_objects(image: np.ndarray, objects: Sequence[PosedObject], env: Environment, intrinsics: np.ndarray,
                  global2cam: np.ndarray, cam_position: np.ndarray, width: int, height: int,
                  exposure: float) -> None:
    """Fill each object's visible faces, objects far to near, shaded by face normal vs the sun, with haze."""
    rotation_g2c, translation_g2c = global2cam[:3, :3], global2cam[:3, 3]
    fx, fy = intrinsics[0, 0], intrinsics[1, 1]
    cx, cy = intrinsics[0, 2], intrinsics[1, 2]
    half_fov_x = max(cx + 0.5, width - 0.5 - cx) / fx
    half_fov_y = max(cy + 0.5, height - 0.5 - cy) / fy
    visible = []
    for obj in objects:
        centre_cam = rotation_g2c @ obj.centre_global_m + translation_g2c
        radius = 0.5 * float(np.linalg.norm(obj.size_wlh_m))
        if centre_cam[2] + radius < NEAR_PLANE_M:
            continue
        reach = max(centre_cam[2] + radius, NEAR_PLANE_M)
        if abs(centre_cam[0]) - radius > half_fov_x * reach or abs(centre_cam[1]) - radius > half_fov_y * reach:
            continue
        visible.append((float(np.linalg.norm(obj.centre_global_m - cam_position)), obj))
    visible.sort(key=lambda item: -item[0])

    sun = env.sun_direction_global
    for distance, obj in visible:
        obj_rotation = obj.rotation()
        for part in _ordered_parts(obj, cam_position):
            vertices_global = part.vertices_local_m @ obj_rotation.T + obj.centre_global_m
            vertices_cam = vertices_global @ rotation_g2c.T + translation_g2c
            normals_global = part.normals_local @ obj_rotation.T
            to_camera = cam_position - vertices_global  # per vertex
            fog = 1.0 - math.exp(-distance / env.fog_distance_m)
            for f, face in enumerate(part.faces):
                face_idx = list(face)
                if np.dot(normals_global[f], to_camera[face_idx[0]]) <= 1e-9:
                    continue  # back face
                pixels = _polygon_pixels(vertices_cam[face_idx], intrinsics)
                if pixels is None:
                    continue
                n = normals_global[f]
                light = env.ambient + env.diffuse * max(0.0, float(n @ sun)) + 0.12 * max(0.0, float(n[2]))
                colour = np.asarray(part.colour_bgr) * light * exposure
                colour = colour * (1.0 - fog) + env.fog_bgr * fog
                cv2.fillPoly(image, [pixels], tuple(float(c) for c in np.clip(colour, 0, 255)),
                             lineType=cv2.LINE_AA, shift=_SHIFT)


def _draw_shadows(image: np.ndarray, objects: Sequence[PosedObject], env: Environment, intrinsics, global2cam,
                  width: int, height: int) -> None:
    """Darken the ground under each object where its box blocks the sun (box corners projected along the sun)."""
    sun = env.sun_direction_global
    if env.shadow_strength <= 0 or sun[2] < 0.05:
        return
    mask = np.zeros((height, width), dtype=np.uint8)
    rotation_g2c, translation_g2c = global2cam[:3, :3], global2cam[:3, 3]
    cam_position = -rotation_g2c.T @ translation_g2c
    half_fov_x = max(intrinsics[0, 2] + 0.5, width - 0.5 - intrinsics[0, 2]) / intrinsics[0, 0]
    # A shadow reaches at most the object's height / tan(sun elevation) beyond the object.
    reach_m = min(4.5 * math.hypot(sun[0], sun[1]) / sun[2], 30.0)
    drawn = False
    for obj in objects:
        if np.linalg.norm(obj.centre_global_m[:2] - cam_position[:2]) > 90.0:
            continue
        centre_cam = rotation_g2c @ obj.centre_global_m + translation_g2c
        radius = 0.5 * float(np.linalg.norm(obj.size_wlh_m)) + reach_m
        if centre_cam[2] + radius < NEAR_PLANE_M or abs(centre_cam[0]) - radius > half_fov_x * (centre_cam[2] + radius):
            continue
        corners = obj.corners_global()
        footprint = corners[:, :2] - (corners[:, 2:3] - GROUND_Z_M) / sun[2] * sun[None, :2]
        hull = cv2.convexHull(footprint.astype(np.float32)).reshape(-1, 2).astype(np.float64)
        ground = np.concatenate([hull, np.full((len(hull), 1), GROUND_Z_M + 0.01)], axis=1)
        pixels = _polygon_pixels(ground @ rotation_g2c.T + translation_g2c, intrinsics)
        if pixels is not None:
            cv2.fillPoly(mask, [pixels], 255, lineType=cv2.LINE_AA, shift=_SHIFT)
            drawn = True
    if drawn:
        shade = 1.0 - env.shadow_strength * (mask.astype(np.float32) / 255.0)
        image *= shade[..., None]


def render_camera_image(texture: GroundTexture, env: Environment, intrinsics: np.ndarray, cam2global: np.ndarray,
                        width: int, height: int, objects: Sequence[PosedObject], noise_seed: int,
                        exposure: float = 1.0) -> np.ndarray:
    """Render one camera image, (height, width, 3) uint8 BGR, before JPEG compression.

    intrinsics: 3x3 pixels for this image size; cam2global: 4x4 (camera axes x right, y down, z forward).
    The sensor noise depends only on noise_seed, so two renders of the same frame differ only where the drawn
    objects differ (the tests remove one object and compare).
    """
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    cam2global = np.asarray(cam2global, dtype=np.float64)
    global2cam = np.eye(4)
    global2cam[:3, :3] = cam2global[:3, :3].T
    global2cam[:3, 3] = -cam2global[:3, :3].T @ cam2global[:3, 3]
    image = _background(texture, env, intrinsics, cam2global, width, height)
    image *= exposure
    _draw_shadows(image, objects, env, intrinsics, global2cam, width, height)
    image8 = np.clip(image, 0, 255).astype(np.uint8)
    _draw_objects(image8, objects, env, intrinsics, global2cam, cam2global[:3, 3], width, height, exposure)
    out = image8.astype(np.float32) * _vignette(width, height)
    out = cv2.GaussianBlur(out, (3, 3), 0.6)
    out += _sensor_noise(width, height, noise_seed) * np.float32(env.noise_sigma)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


_NOISE_CACHE = {}


def _sensor_noise(width: int, height: int, noise_seed: int) -> np.ndarray:
    """(H, W, 3) float32 unit-scale sensor noise (a luminance part and a weaker colour part) for one image.

    A crop at a seeded offset of a cached noise field twice the image size: as random as needed for training,
    and much cheaper than drawing fresh normals per pixel. Depends only on noise_seed and the image size.
    """
    key = (width, height)
    field = _NOISE_CACHE.get(key)
    if field is None:
        rng = np.random.default_rng(12345)
        luminance = rng.standard_normal((2 * height, 2 * width, 1), dtype=np.float32)
        field = luminance + 0.5 * rng.standard_normal((2 * height, 2 * width, 3), dtype=np.float32)
        if len(_NOISE_CACHE) > 8:
            _NOISE_CACHE.clear()
        _NOISE_CACHE[key] = field
    rng = np.random.default_rng(noise_seed)
    top, left = int(rng.integers(height)), int(rng.integers(width))
    return field[top:top + height, left:left + width]
