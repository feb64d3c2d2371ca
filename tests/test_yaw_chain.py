"""Issue 14: no frame or sign error on the yaw path, from the synthetic world to the devkit's score.

- The chain: GT boxes of a synthetic set (moving, turning ego with a non-zero global yaw; boxes in every yaw
  quadrant) -> info files -> dataset batch targets -> head box codes -> an oracle query set built from those codes ->
  ``decode_predictions`` -> ``boxes_to_results`` (global frame, the batch's lidar-time ego pose) -> the devkit's
  DetectionEval: AP 1 for every class present, mATE, mASE, mAOE and mAVE ~0. The same oracle with the errors the issue
  suspects (the camera-time ego pose instead of the lidar-time one; the yaw negated; sin and cos swapped) must score
  clearly worse, so the chain would catch them.
- The renderer against the devkit's box: every drawn part of every annotated object is where the devkit's ``Box``
  (from the written annotation) puts the same box-frame point, and the parts that mark a vehicle's front (truck cab,
  trailer hitch, construction arm, cycle handlebar; a car's bonnet, its cabin set back) lie in the front half, the
  one holding corners 0-3 of ``Box.corners()``.
- Front/back is visible: a side view of each vehicle class at yaw 0 and yaw pi differs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bevdeform.data import synthetic
from bevdeform.data import synthetic_render as render

VERSION = "v1.0-synthetic"
# Scenes 0 and 1 of seed 1: turning left and turning right (synthetic.EGO_MANEUVERS), both held out.
CHAIN = dict(num_scenes=0, num_val_scenes=2, samples_per_scene=3, seed=1, scale=0.1, objects_per_sample=16,
             progress=False)


@pytest.fixture(scope="module")
def chain_data(tmp_path_factory):
    from bevdeform.data.infos import create_infos

    root = synthetic.write_synthetic_nuscenes(tmp_path_factory.mktemp("yaw_chain"), **CHAIN)
    infos = create_infos(root, VERSION, progress=False)
    return Path(root), infos


@pytest.fixture(scope="module")
def nusc(chain_data):
    from nuscenes import NuScenes

    return NuScenes(VERSION, str(chain_data[0]), verbose=False)


def _oracle_samples(chain_data):
    """Per held-out sample: token, the batch's GT (n, 9) and labels, the oracle's decoded detections, the info."""
    from bevdeform.data.dataset import NuScenesCameraDataset, collate
    from bevdeform.data.infos import CLASS_NAMES, load_infos
    from bevdeform.models.head import encode_boxes, decode_predictions

    root, infos = chain_data
    dataset = NuScenesCameraDataset(infos["synthetic_val"], root, (36, 64), queue_length=2, pad_multiple=32)
    _, info_list = load_infos(infos["synthetic_val"])
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index in range(len(dataset)):
        batch = collate([dataset[index]])
        gt_boxes, gt_labels = batch["gt_boxes"][0].double(), batch["gt_labels"][0]  # (n, 9), (n,)
        num_gt, num_queries = len(gt_boxes), len(gt_boxes) + 7
        # The oracle: n queries carry the encoded targets with a confident logit for their class, the others are
        # unit boxes at the origin scored as background; the query order is shuffled.
        codes = torch.zeros(num_queries, 10, dtype=torch.float64)
        codes[:, 7] = 1.0
        logits = torch.full((num_queries, len(CLASS_NAMES)), -12.0, dtype=torch.float64)
        order = torch.randperm(num_queries, generator=generator)[:num_gt]
        codes[order] = encode_boxes(gt_boxes)
        logits[order, gt_labels] = 12.0
        found = decode_predictions(logits[None], codes[None], max_num=300, score_threshold=0.5)[0]
        samples.append({"token": batch["sample_token"][0], "gt_boxes": gt_boxes, "found": found,
                        "ego2global": batch["ego2global"][0, -1].double().numpy(), "info": info_list[index]})
    return samples


def _score(samples, nusc, tmp_path, name, boxes_fn=lambda s: s["found"]["boxes"],
           pose_fn=lambda s: s["ego2global"]):
    from bevdeform.evaluation import boxes_to_results, evaluate_results, write_results_json

    results = {}
    for s in samples:
        boxes = boxes_fn(s)
        results[s["token"]] = boxes_to_results(s["token"], boxes[:, :7], boxes[:, 7:9], s["found"]["scores"],
                                               s["found"]["labels"], pose_fn(s))
    path = write_results_json(results, tmp_path / name / "results.json")
    root = Path(samples[0]["info_root"])
    return evaluate_results(path, root, VERSION, "synthetic_val", tmp_path / name, nusc=nusc)


def test_oracle_from_encoded_targets_scores_perfectly_and_frame_errors_are_caught(chain_data, nusc, tmp_path):
    from bevdeform.data.infos import CLASS_NAMES
    from bevdeform.geometry import planar_ego_motion, wrap_angle, yaw_from_rotation_matrix

    samples = _oracle_samples(chain_data)
    for s in samples:
        s["info_root"] = str(chain_data[0])
    # What the chain covers: boxes in all four yaw quadrants of the ego frame, non-zero ego yaw in the global frame,
    # a moving ego that turns both ways between keyframes.
    gt_yaw = torch.cat([s["gt_boxes"][:, 6] for s in samples]).numpy()
    quadrant_counts = np.histogram(gt_yaw, bins=[-math.pi, -math.pi / 2, 0.0, math.pi / 2, math.pi])[0]
    assert (quadrant_counts >= 5).all(), quadrant_counts
    ego_yaw = np.array([float(yaw_from_rotation_matrix(s["ego2global"])) for s in samples])
    assert np.abs(ego_yaw).min() > 0.05 or np.abs(wrap_angle(ego_yaw)).max() > 0.5
    turns = np.array([float(planar_ego_motion(s["info"]["ego_prev2curr"])[1]) for s in samples
                      if s["info"]["has_prev"]])
    assert turns.max() > math.radians(2.0) and turns.min() < -math.radians(2.0), np.degrees(turns)
    speeds = np.array([np.linalg.norm(planar_ego_motion(s["info"]["ego_prev2curr"])[0]) / 0.5 for s in samples
                       if s["info"]["has_prev"]])
    assert speeds.max() > 3.0, speeds

    perfect = _score(samples, nusc, tmp_path, "oracle")
    present = {CLASS_NAMES[int(label)] for s in samples for label in s["found"]["labels"][s["found"]["scores"] > 0.5]}
    assert len(present) >= 6, present
    for name in present:
        assert perfect[f"AP/{name}"] == pytest.approx(1.0, abs=1e-6), (name, perfect)
    assert perfect["mATE"] < 1e-3 and perfect["mASE"] < 1e-3 and perfect["mAOE"] < 1e-3, perfect
    assert perfect["mAVE"] < 1e-3, perfect  # velocities: ego axes in the batch, global axes in the devkit

    # The camera-time ego pose (CAM_BACK fires ~40 ms before the lidar) instead of the lidar-time one.
    camera_time = _score(samples, nusc, tmp_path, "camera_time_pose",
                         pose_fn=lambda s: s["info"]["cams"]["CAM_BACK"]["ego2global"])
    assert camera_time["mATE"] > 20 * max(perfect["mATE"], 1e-3), camera_time

    def negated_yaw(s):
        boxes = s["found"]["boxes"].clone()
        boxes[:, 6] = -boxes[:, 6]
        return boxes

    def swapped_sin_cos(s):
        boxes = s["found"]["boxes"].clone()
        boxes[:, 6] = torch.atan2(boxes[:, 6].cos(), boxes[:, 6].sin())
        return boxes

    for name, fn in (("negated_yaw", negated_yaw), ("swapped_sin_cos", swapped_sin_cos)):
        wrong = _score(samples, nusc, tmp_path, name, boxes_fn=fn)
        assert wrong["mAOE"] > 0.5, (name, wrong)


# ----------------------------------------------------------------------------------------------------------------
# Renderer vs the devkit's box
# ----------------------------------------------------------------------------------------------------------------
# (category, index of the part that marks the front in object_parts, expected sign of its centre along +x).
FRONT_MARKERS = {
    "vehicle.truck": (1, +1),  # cab
    "vehicle.trailer": (1, +1),  # hitch
    "vehicle.construction": (3, +1),  # arm
    "vehicle.motorcycle": (3, +1),  # handlebar
    "vehicle.bicycle": (3, +1),  # handlebar
    "vehicle.car": (2, -1),  # glass cabin set back: the bonnet is in front
}


def test_rendered_parts_sit_where_the_devkit_box_puts_them_fronts_at_corners_0_to_3(chain_data, nusc):
    from pyquaternion import Quaternion

    config = synthetic.GeneratorConfig(seed=CHAIN["seed"], samples_per_scene=CHAIN["samples_per_scene"],
                                       scale=CHAIN["scale"], objects_per_sample=CHAIN["objects_per_sample"])
    instance_of = {}  # instance token -> (scene index, instance index)
    plans = [synthetic.plan_scene(config, si) for si in range(CHAIN["num_val_scenes"])]
    for si, plan in enumerate(plans):
        for inst in plan.instances:
            instance_of[synthetic.make_token(CHAIN["seed"], "instance", si, inst.index)] = (si, inst.index)
    checked_parts, checked_fronts = 0, {}
    for scene in nusc.scene:
        sample_token = scene["first_sample_token"]
        k = 0
        while sample_token:
            sample = nusc.get("sample", sample_token)
            for ann_token in sample["anns"]:
                ann = nusc.get("sample_annotation", ann_token)
                si, index = instance_of[ann["instance_token"]]
                plan = plans[si]
                posed = {p.key: p for p in plan.posed_objects(float(plan.keyframe_t_s[k]))}[index]
                box = nusc.get_box(ann_token)
                np.testing.assert_allclose(posed.centre_global_m, box.center, atol=1e-6)
                rotation_devkit = Quaternion(ann["rotation"]).rotation_matrix
                corners = box.corners()  # (3, 8): 0-3 the front face
                front_centre, back_centre = corners[:, :4].mean(axis=1), corners[:, 4:].mean(axis=1)
                for part in posed.parts:
                    # What the renderer draws (synthetic_render._draw_objects) vs the devkit's box frame -> global.
                    drawn = part.vertices_local_m @ posed.rotation().T + posed.centre_global_m
                    devkit = part.vertices_local_m @ rotation_devkit.T + box.center
                    np.testing.assert_allclose(drawn, devkit, atol=1e-6)
                    checked_parts += 1
                category = plan.instances[index].category
                if category in FRONT_MARKERS:
                    part_index, sign = FRONT_MARKERS[category]
                    marker = posed.parts[part_index].aabb_centre_local_m @ rotation_devkit.T + box.center
                    nearer_front = np.linalg.norm(marker - front_centre) < np.linalg.norm(marker - back_centre)
                    assert nearer_front == (sign > 0), (category, ann_token)
                    checked_fronts[category] = checked_fronts.get(category, 0) + 1
            sample_token = sample["next"]
            k += 1
    assert checked_parts > 200
    assert set(checked_fronts) >= {"vehicle.car", "vehicle.truck", "vehicle.motorcycle", "vehicle.bicycle"}, \
        checked_fronts


def _side_view(parts, size_wlh, yaw_rad, distance_m, grey=128):
    """A 320x180 render of one object at the origin seen from its side (camera at -y looking at +y, 1.5 m up),
    lit from straight above so that the front and back faces are shaded alike."""
    env = render.Environment(
        sun_direction_global=np.array([0.0, 0.0, 1.0]), ambient=0.6, diffuse=0.4, sky_horizon_bgr=np.zeros(3),
        sky_zenith_bgr=np.zeros(3), fog_bgr=np.zeros(3), fog_distance_m=1e9, shadow_strength=0.0,
        skyline_elevation_rad=np.zeros(8), skyline_bgr=np.zeros((8, 3)), noise_sigma=0.0)
    width, height, focal = 320, 180, 200.0
    intrinsics = np.array([[focal, 0, width / 2 - 0.5], [0, focal, height / 2 - 0.5], [0, 0, 1.0]])
    size = np.asarray(size_wlh, dtype=np.float64)
    obj = render.PosedObject(0, np.array([0.0, 0.0, 0.5 * size[2]]), yaw_rad, size, parts)
    cam_position = np.array([0.0, -distance_m, 1.5])
    cam_axes = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # columns x right, y down, z fwd
    global2cam = np.eye(4)
    global2cam[:3, :3] = cam_axes.T
    global2cam[:3, 3] = -cam_axes.T @ cam_position
    image = np.full((height, width, 3), grey, dtype=np.uint8)
    render._draw_objects(image, [obj], env, intrinsics, global2cam, cam_position, width, height, 1.0)
    return image


FRONT_BACK_VISIBLE = (
    ("vehicle.car", "vehicle.parked"), ("vehicle.truck", "vehicle.moving"), ("vehicle.bus.rigid", "vehicle.moving"),
    ("vehicle.trailer", "vehicle.parked"), ("vehicle.construction", "vehicle.parked"),
    ("vehicle.motorcycle", "cycle.with_rider"), ("vehicle.bicycle", "cycle.with_rider"),
)


@pytest.mark.parametrize("category, attribute", FRONT_BACK_VISIBLE)
def test_front_and_back_of_vehicles_look_different(category, attribute):
    """A vehicle turned by pi must not look the same: else its heading is learnable only modulo pi."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        size = synthetic._size(category, attribute, rng)
        parts = render.object_parts(category, size, attribute, rng)
        distance = 2.5 * max(size[1], size[2]) + 2.0
        a = _side_view(parts, size, 0.0, distance).astype(np.int64)
        b = _side_view(parts, size, math.pi, distance).astype(np.int64)
        drawn = (np.abs(a - 128).max(axis=-1) > 8) | (np.abs(b - 128).max(axis=-1) > 8)
        differing = (np.abs(a - b).max(axis=-1) > 40)[drawn].mean()
        assert differing > 0.03, (category, seed, differing)
