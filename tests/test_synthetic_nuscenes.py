"""The synthetic nuScenes writer, checked with the UNMODIFIED nuScenes devkit: loading, schema, evaluation, lidar
point counts, rendering against devkit projections, determinism.

A tiny set (1 train + 1 val scene of 4 keyframes at 240x135) is written once for the module.
"""

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from nuscenes import NuScenes
from nuscenes.can_bus.can_bus_api import NuScenesCanBus
from nuscenes.eval.detection.config import config_factory
from nuscenes.eval.detection.evaluate import DetectionEval
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.utils.data_classes import Box, LidarPointCloud
from nuscenes.utils.geometry_utils import BoxVisibility, points_in_box, view_points
from pyquaternion import Quaternion

from bevdeform.data import synthetic
from bevdeform.data import synthetic_render as render

VERSION = "v1.0-synthetic"
TINY = dict(num_scenes=1, num_val_scenes=1, samples_per_scene=4, seed=0, scale=0.15, objects_per_sample=20,
            progress=False)
DETECTION_CLASSES = {"car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle", "bicycle",
                     "traffic_cone", "barrier"}
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")

# Every field of the real nuScenes v1.0 tables (category gained `index` with the lidarseg release).
REAL_SCHEMA = {
    "category": {"token", "name", "description", "index"},
    "attribute": {"token", "name", "description"},
    "visibility": {"token", "level", "description"},
    "instance": {"token", "category_token", "nbr_annotations", "first_annotation_token", "last_annotation_token"},
    "sensor": {"token", "channel", "modality"},
    "calibrated_sensor": {"token", "sensor_token", "translation", "rotation", "camera_intrinsic"},
    "ego_pose": {"token", "timestamp", "rotation", "translation"},
    "log": {"token", "logfile", "vehicle", "date_captured", "location"},
    "scene": {"token", "log_token", "nbr_samples", "first_sample_token", "last_sample_token", "name", "description"},
    "sample": {"token", "timestamp", "prev", "next", "scene_token"},
    "sample_data": {"token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "timestamp", "fileformat",
                    "is_key_frame", "height", "width", "filename", "prev", "next"},
    "sample_annotation": {"token", "sample_token", "instance_token", "visibility_token", "attribute_tokens",
                          "translation", "size", "rotation", "prev", "next", "num_lidar_pts", "num_radar_pts"},
    "map": {"category", "token", "filename", "log_tokens"},
}
VALID_ATTRIBUTES = {  # category prefix -> attributes nuScenes uses for it
    "vehicle.bicycle": {"cycle.with_rider", "cycle.without_rider"},
    "vehicle.motorcycle": {"cycle.with_rider", "cycle.without_rider"},
    "vehicle.": {"vehicle.moving", "vehicle.stopped", "vehicle.parked"},
    "human.pedestrian.": {"pedestrian.moving", "pedestrian.standing", "pedestrian.sitting_lying_down"},
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return synthetic.write_synthetic_nuscenes(tmp_path_factory.mktemp("synthetic"), **TINY)


@pytest.fixture(scope="module")
def nusc(data_root) -> NuScenes:
    return NuScenes(VERSION, str(data_root), verbose=False)


def pose_matrix(record) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Quaternion(record["rotation"]).rotation_matrix
    out[:3, 3] = record["translation"]
    return out


def lidar_points_global(nusc, data_root, sample) -> np.ndarray:
    """The keyframe's point cloud as the devkit reads it, moved lidar -> ego -> global with the devkit's records."""
    sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    pc = LidarPointCloud.from_file(str(data_root / sd["filename"]))
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    pc.rotate(Quaternion(cs["rotation"]).rotation_matrix)
    pc.translate(np.array(cs["translation"]))
    pc.rotate(Quaternion(pose["rotation"]).rotation_matrix)
    pc.translate(np.array(pose["translation"]))
    return pc.points[:3]


# ----------------------------------------------------------------------------------------------------------------
# Loading and schema
# ----------------------------------------------------------------------------------------------------------------


def test_devkit_loads_every_table_with_the_real_schema(data_root, nusc):
    for table, fields in REAL_SCHEMA.items():
        records = getattr(nusc, table)
        assert records, f"table {table} is empty"
        raw = json.loads((data_root / VERSION / f"{table}.json").read_text())
        for record in raw:
            assert set(record) == fields, f"{table} record fields {sorted(record)} != {sorted(fields)}"
    assert all(re.fullmatch(r"[0-9a-f]{32}", s["token"]) for s in nusc.sample)
    assert {c["name"] for c in nusc.category} >= set(synthetic.CATEGORY_TO_DETECTION)
    assert len(nusc.attribute) == 8 and len(nusc.visibility) == 4
    assert {s["channel"]: s["modality"] for s in nusc.sensor} == {**{c: "camera" for c in CAMERAS},
                                                                  "LIDAR_TOP": "lidar"}
    splits = json.loads((data_root / VERSION / "splits.json").read_text())
    scene_names = {s["name"] for s in nusc.scene}
    assert set(splits) == {"synthetic_train", "synthetic_val"}
    assert set(splits["synthetic_train"]) | set(splits["synthetic_val"]) == scene_names
    assert all(re.fullmatch(r"scene-\d{4}", name) for name in scene_names)
    for log in nusc.log:  # every log has a map, whose PNG exists
        maps = [m for m in nusc.map if log["token"] in m["log_tokens"]]
        assert len(maps) == 1 and (data_root / maps[0]["filename"]).is_file()
        assert re.fullmatch(r"n\d{3}-\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d[+-]\d{4}", log["logfile"])


def test_scenes_samples_and_sample_data_are_linked(data_root, nusc):
    width, height = synthetic.image_size(TINY["scale"])
    assert (width, height) == (240, 135)
    for scene in nusc.scene:
        chain = [nusc.get("sample", scene["first_sample_token"])]
        while chain[-1]["next"]:
            chain.append(nusc.get("sample", chain[-1]["next"]))
        assert chain[-1]["token"] == scene["last_sample_token"] and len(chain) == scene["nbr_samples"] == 4
        assert np.allclose(np.diff([s["timestamp"] for s in chain]), 500_000, atol=5_000)  # 2 Hz keyframes
        for sample in chain:
            assert set(sample["data"]) == set(CAMERAS) | {"LIDAR_TOP"}
            lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
            assert lidar["timestamp"] == sample["timestamp"] and lidar["fileformat"] == "pcd"
            times = {}
            for channel in CAMERAS:
                sd = nusc.get("sample_data", sample["data"][channel])
                pose = nusc.get("ego_pose", sd["ego_pose_token"])
                assert pose["timestamp"] == sd["timestamp"]
                assert (sd["width"], sd["height"], sd["fileformat"]) == (width, height, "jpg")
                assert re.fullmatch(rf"samples/{channel}/n\d{{3}}-[0-9+-]+__{channel}__{sd['timestamp']}\.jpg",
                                    sd["filename"])
                image = cv2.imread(str(data_root / sd["filename"]))
                assert image.shape == (height, width, 3)
                times[channel] = sd["timestamp"] - lidar["timestamp"]
                intrinsics = np.array(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"])
                assert intrinsics.shape == (3, 3) and 0 < intrinsics[0, 2] < width and 0 < intrinsics[1, 2] < height
            # Cameras fire before the lidar timestamp, each at its own time, in the lidar's sweep order.
            order = sorted(times, key=times.get)
            assert order == ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK",
                             "CAM_BACK_LEFT"]
            assert all(-50_000 < dt < 0 for dt in times.values())
        for channel in CAMERAS + ("LIDAR_TOP",):
            records = [nusc.get("sample_data", s["data"][channel]) for s in chain]
            assert [r["prev"] for r in records] == [""] + [r["token"] for r in records[:-1]]
            assert [r["next"] for r in records] == [r["token"] for r in records[1:]] + [""]


def test_annotations_tracks_and_attributes(nusc):
    categories = set()
    for instance in nusc.instance:
        chain = [nusc.get("sample_annotation", instance["first_annotation_token"])]
        while chain[-1]["next"]:
            chain.append(nusc.get("sample_annotation", chain[-1]["next"]))
        assert len(chain) == instance["nbr_annotations"] and chain[-1]["token"] == instance["last_annotation_token"]
        category = nusc.get("category", instance["category_token"])["name"]
        categories.add(category)
        for ann in chain:
            attributes = {nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]}
            valid = next((v for prefix, v in VALID_ATTRIBUTES.items() if category.startswith(prefix)), set())
            if valid:
                assert len(attributes) == 1 and attributes <= valid, (category, attributes)
            else:  # cones, barriers, animals, debris, ...
                assert not attributes, (category, attributes)
            assert ann["visibility_token"] in {"1", "2", "3", "4"}
            assert ann["rotation"][1] == 0.0 and ann["rotation"][2] == 0.0  # yaw-only boxes
    assert {category_to_detection_name(c) for c in categories} >= DETECTION_CLASSES
    assert any(category_to_detection_name(c) is None for c in categories), "expected some non-detection categories"
    # Moving objects really move: vehicle.moving boxes have a velocity, parked ones none.
    speeds = {"vehicle.moving": [], "vehicle.parked": []}
    for ann in nusc.sample_annotation:
        names = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        if names and names[0] in speeds:
            velocity = nusc.box_velocity(ann["token"])
            if not np.isnan(velocity).any():
                speeds[names[0]].append(np.linalg.norm(velocity[:2]))
    assert min(speeds["vehicle.moving"]) > 0.2 and max(speeds["vehicle.parked"]) < 1e-6


def test_can_bus_poses_and_map(nusc, data_root):
    can_bus = NuScenesCanBus(dataroot=str(data_root))
    for scene in nusc.scene:
        messages = can_bus.get_messages(scene["name"], "pose")
        assert set(messages[0]) == {"utime", "pos", "orientation", "vel", "accel", "rotation_rate"}
        utime = np.array([m["utime"] for m in messages])
        assert np.allclose(np.diff(utime), 20_000, atol=1)  # 50 Hz
        sample = nusc.get("sample", scene["first_sample_token"])
        pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        nearest = messages[int(np.argmin(np.abs(utime - pose["timestamp"])))]
        assert np.linalg.norm(np.subtract(nearest["pos"], pose["translation"])) < 0.3
        # The ego drives on the drivable surface of the map mask.
        map_record = next(m for m in nusc.map if scene["log_token"] in m["log_tokens"])
        assert map_record["mask"].is_on_mask(pose["translation"][0], pose["translation"][1]).all()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and lidar
# ----------------------------------------------------------------------------------------------------------------


def test_ground_truth_as_predictions_scores_perfectly(nusc, data_root, tmp_path):
    splits = json.loads((data_root / VERSION / "splits.json").read_text())
    results = {}
    for sample in nusc.sample:
        if nusc.get("scene", sample["scene_token"])["name"] not in splits["synthetic_val"]:
            continue
        rows = []
        for token in sample["anns"]:
            ann = nusc.get("sample_annotation", token)
            name = category_to_detection_name(ann["category_name"])
            if name is None or ann["num_lidar_pts"] + ann["num_radar_pts"] == 0:
                continue  # the evaluation drops such GT boxes; as predictions they would be false positives
            velocity = np.nan_to_num(nusc.box_velocity(token)[:2])
            attribute = nusc.get("attribute", ann["attribute_tokens"][0])["name"] if ann["attribute_tokens"] else ""
            rows.append({"sample_token": sample["token"], "translation": ann["translation"], "size": ann["size"],
                         "rotation": ann["rotation"], "velocity": velocity.tolist(), "detection_name": name,
                         "detection_score": 0.9, "attribute_name": attribute})
        results[sample["token"]] = rows
    meta = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": meta, "results": results}))
    evaluation = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(path), "synthetic_val",
                               str(tmp_path / "eval"), verbose=False)
    metrics, _ = evaluation.evaluate()
    assert set(metrics.mean_dist_aps) == DETECTION_CLASSES
    assert all(ap == pytest.approx(1.0) for ap in metrics.mean_dist_aps.values()), metrics.mean_dist_aps
    assert metrics.mean_ap == pytest.approx(1.0, abs=1e-9)
    assert metrics.nd_score == pytest.approx(1.0, abs=1e-6)


def test_num_lidar_pts_is_the_devkit_count_on_the_point_cloud(nusc, data_root):
    counts = []
    for sample in nusc.sample:
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        raw = np.fromfile(data_root / sd["filename"], dtype=np.float32).reshape(-1, 5)
        assert 10_000 < len(raw) < 40_000 and set(np.unique(raw[:, 4])) <= set(range(32))
        points = lidar_points_global(nusc, data_root, sample)
        assert np.abs(points[2]).min() < 0.05  # ground returns
        for token in sample["anns"]:
            ann = nusc.get("sample_annotation", token)
            inside = int(points_in_box(nusc.get_box(token), points).sum())
            assert inside == ann["num_lidar_pts"], (token, inside, ann["num_lidar_pts"])
            counts.append(inside)
    counts = np.array(counts)
    assert (counts == 0).any() and (counts > 50).any()  # far or hidden boxes get no points, near ones many


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def projected_mask(corners_cam, intrinsics, width, height, near_m=0.1) -> np.ndarray:
    """Pixels inside the convex hull of a camera-frame point set (3, n), projected with the devkit's view_points.

    The hull is clipped at depth near_m first: its part in front of the camera is the hull of the points in front
    and of the crossings of the near plane by the segments between any two points.
    """
    points = corners_cam.T
    front = [p for p in points if p[2] >= near_m]
    for i in range(len(points)):
        for j in range(i + 1, len(points)):
            a, b = points[i], points[j]
            if (a[2] - near_m) * (b[2] - near_m) < 0:
                front.append(a + (near_m - a[2]) / (b[2] - a[2]) * (b - a))
    mask = np.zeros((height, width), dtype=np.uint8)
    if len(front) < 3:
        return mask.astype(bool)
    uv = view_points(np.array(front).T, intrinsics, normalize=True)[:2].T
    uv = np.clip(uv, -1e5, 1e5)
    cv2.fillConvexPoly(mask, np.round(cv2.convexHull(uv.astype(np.float32))[:, 0] * 16).astype(np.int32), 1, shift=4)
    return mask.astype(bool)


def test_removing_an_object_changes_its_projected_box_only(nusc, data_root):
    width, height = synthetic.image_size(TINY["scale"])
    rng = np.random.default_rng(0)
    checked = 0
    for sample in nusc.sample:
        for channel in CAMERAS:
            sd_token = sample["data"][channel]
            _, boxes, intrinsics = nusc.get_sample_data(sd_token, box_vis_level=BoxVisibility.ALL)
            # Boxes at the camera's own ego pose, in the camera frame (the devkit's global->ego->camera).
            candidates = [b for b in boxes if nusc.get("sample_annotation", b.token)["visibility_token"] == "4"
                          and nusc.get("sample_annotation", b.token)["num_lidar_pts"] > 30]
            if not candidates:
                continue
            box = candidates[int(rng.integers(len(candidates)))]
            mask = projected_mask(box.corners(), intrinsics, width, height)
            if mask.sum() < 40:
                continue
            instance = nusc.get("sample_annotation", box.token)["instance_token"]
            full = synthetic.render_sample_data(data_root, sd_token).astype(np.int16)
            without = synthetic.render_sample_data(data_root, sd_token, [instance]).astype(np.int16)
            changed = np.abs(full - without).max(axis=2) > 8
            assert changed[mask].mean() > 0.3, (channel, box.name, changed[mask].mean())
            # Elsewhere only the object's shadow may change: the box's footprint grown by the longest shadow.
            w, l, h = box.wlh
            reach = h / np.tan(np.radians(synthetic.MIN_SUN_ELEVATION_DEG)) + 0.5
            shadow_box = Box(box.center, [w + 2 * reach, l + 2 * reach, h], box.orientation)
            region = projected_mask(np.concatenate([box.corners(), shadow_box.corners()], axis=1), intrinsics,
                                    width, height)
            region = cv2.dilate(region.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            assert not changed[~region].any(), (channel, box.name, int(changed[~region].sum()))
            checked += 1
            if checked >= 6:
                return
    assert checked >= 3


def test_written_images_are_the_renders(nusc, data_root):
    sample = nusc.sample[1]
    for channel in ("CAM_FRONT", "CAM_BACK_LEFT"):
        sd = nusc.get("sample_data", sample["data"][channel])
        on_disk = cv2.imread(str(data_root / sd["filename"])).astype(np.float32)
        rendered = synthetic.render_sample_data(data_root, sd["token"]).astype(np.float32)
        assert np.abs(on_disk - rendered).mean() < 3.0  # JPEG loss only


def test_clipping_objects_behind_and_beside_the_camera():
    """A box reaching from behind the camera to in front of it is clipped at the near plane, not mirrored."""
    width, height = 160, 90
    intrinsics = np.array([[100.0, 0.0, 79.5], [0.0, 100.0, 44.5], [0.0, 0.0, 1.0]])
    cam2global = np.eye(4)  # camera axes = global axes here: x right, y down, z forward; ground z = 0 is unused
    cam2global[:3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # look along global +x, camera 1.5 m high
    cam2global[:3, 3] = [0.0, 0.0, 1.5]
    texture = render.GroundTexture(np.full((10, 10, 3), 90, np.uint8), -50.0, 50.0, 10.0, (90, 90, 90))
    env = render.Environment(np.array([0.0, 0.0, 1.0]), 0.6, 0.4, np.full(3, 200.0), np.full(3, 230.0),
                             np.full(3, 200.0), 1e6, 0.0, np.zeros(8), np.zeros((8, 3)), 0.0)
    size = np.array([2.0, 8.0, 3.0])
    parts = (render._cuboid(size, (-0.5, 0.5), (-0.5, 0.5), (0.0, 1.0), (0, 0, 255), 0),)
    # Centre 1 m ahead, 8 m long: it spans from 3 m behind the camera to 5 m in front, 2 m to the left.
    box = render.PosedObject(0, np.array([1.0, 1.6, 1.5]), 0.0, size, parts)
    empty = render.render_camera_image(texture, env, intrinsics, cam2global, width, height, [], 1)
    image = render.render_camera_image(texture, env, intrinsics, cam2global, width, height, [box], 1)
    changed = np.abs(image.astype(int) - empty.astype(int)).max(axis=2) > 20
    assert changed[:, :20].mean() > 0.9  # the left edge is covered by the box's side wall
    assert not changed[:, 90:].any()  # nothing is mirrored onto the right half
    behind = render.PosedObject(0, np.array([-6.0, 0.0, 1.5]), 0.0, size, parts)
    assert np.array_equal(render.render_camera_image(texture, env, intrinsics, cam2global, width, height, [behind],
                                                     1), empty)


# ----------------------------------------------------------------------------------------------------------------
# Determinism and the default-size set
# ----------------------------------------------------------------------------------------------------------------


def _dataset_files(root: Path):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_same_seed_is_byte_identical_and_another_seed_differs(data_root, tmp_path):
    again = synthetic.write_synthetic_nuscenes(tmp_path / "again", **TINY)
    files = _dataset_files(data_root)
    assert files == _dataset_files(again)
    for relative in files:
        assert (data_root / relative).read_bytes() == (again / relative).read_bytes(), relative
    other = synthetic.write_synthetic_nuscenes(tmp_path / "other", **{**TINY, "seed": 1})
    for table in ("sample_annotation", "ego_pose", "sample"):
        assert (data_root / VERSION / f"{table}.json").read_bytes() != (other / VERSION / f"{table}.json").read_bytes()
    first_image = next(p for p in files if p.suffix == ".jpg")
    other_images = sorted((other / first_image.parent).glob("*.jpg"))
    assert (data_root / first_image).read_bytes() != other_images[0].read_bytes()


def test_default_size_scenes_have_every_class_and_plausible_objects():
    """The default set's 10 scenes (planned, not written): every class visible in every scene, varied ego motion,
    no overlapping objects, objects near the ego."""
    config = synthetic.GeneratorConfig(0, synthetic.DEFAULT_SAMPLES_PER_SCENE, synthetic.DEFAULT_SCALE,
                                       synthetic.DEFAULT_OBJECTS_PER_SAMPLE)
    kinds = set()
    for scene_index in range(synthetic.DEFAULT_NUM_SCENES + synthetic.DEFAULT_NUM_VAL_SCENES):
        plan = synthetic.plan_scene(config, scene_index)
        kinds.add(plan.ego.kind)
        visible = {synthetic.CATEGORY_TO_DETECTION.get(plan.instances[a.instance_index].category)
                   for frame in plan.annotations for a in frame if a.num_lidar_pts > 0}
        assert visible >= DETECTION_CLASSES, (plan.name, DETECTION_CLASSES - visible)
        per_frame = [len(frame) for frame in plan.annotations]
        assert 10 <= np.mean(per_frame) <= 60
        distances = np.array([a.distance_m for frame in plan.annotations for a in frame])
        assert np.mean(distances < 50.0) > 0.6
        for k, t in enumerate(plan.keyframe_t_s):
            posed = plan.posed_objects(float(t))
            centres = np.array([p.centre_global_m[:2] for p in posed])
            yaws = np.array([p.yaw_rad for p in posed])
            halves = np.array([[0.5 * p.size_wlh_m[1], 0.5 * p.size_wlh_m[0]] for p in posed])
            overlap = synthetic._boxes_overlap(centres[:, None], yaws[:, None], halves[:, None],
                                               centres[None], yaws[None], halves[None])
            np.fill_diagonal(overlap, False)
            assert not overlap.any(), plan.name
        moving = [inst for inst in plan.instances if inst.motion.is_moving()]
        assert moving, plan.name
    assert kinds == set(synthetic.EGO_MANEUVERS)


def test_extra_training_scenes_keep_the_validation_scenes(data_root, tmp_path):
    """Scenes added with extra_train_scenes join the training split; the validation scenes, their annotations
    and images are those of the set without them (the learning benchmark compares runs on both)."""
    bigger = synthetic.write_synthetic_nuscenes(tmp_path / "bigger", **TINY, extra_train_scenes=2)
    small_splits = json.loads((data_root / VERSION / "splits.json").read_text())
    splits = json.loads((bigger / VERSION / "splits.json").read_text())
    assert splits[synthetic.VAL_SPLIT] == small_splits[synthetic.VAL_SPLIT]
    assert splits[synthetic.TRAIN_SPLIT][:TINY["num_scenes"]] == small_splits[synthetic.TRAIN_SPLIT]
    extra = splits[synthetic.TRAIN_SPLIT][TINY["num_scenes"]:]
    assert len(extra) == 2 and not set(extra) & set(small_splits[synthetic.TRAIN_SPLIT] + splits[synthetic.VAL_SPLIT])

    def annotations_of(root, scene_names):
        nusc = NuScenes(VERSION, dataroot=str(root), verbose=False)
        scenes = [s for s in nusc.scene if s["name"] in scene_names]
        out = []
        for scene in scenes:
            token = scene["first_sample_token"]
            while token:
                sample = nusc.get("sample", token)
                for ann_token in sample["anns"]:
                    ann = nusc.get("sample_annotation", ann_token)
                    out.append((scene["name"], ann["translation"], ann["size"], ann["rotation"]))
                camera = nusc.get("sample_data", sample["data"]["CAM_FRONT"])
                out.append((root / camera["filename"]).read_bytes())
                token = sample["next"]
        return out

    val_scenes = small_splits[synthetic.VAL_SPLIT]
    assert annotations_of(bigger, val_scenes) == annotations_of(data_root, val_scenes)
    meta = json.loads((bigger / synthetic.GENERATOR_FILE).read_text())
    assert meta["extra_train_scenes"] == 2
    assert "extra_train_scenes" not in json.loads((data_root / synthetic.GENERATOR_FILE).read_text())
    with pytest.raises(ValueError, match="extra_train_scenes"):
        synthetic.write_synthetic_nuscenes(tmp_path / "bad", **TINY, extra_train_scenes=-1)
