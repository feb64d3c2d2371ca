"""The data / evaluation side of the bevformer_v1 compatibility path (bevdeform.compat: can_bus, frames,
image_pipeline; the dataset's bevformer_v1 inputs), each against an independent formulation: the devkit's
NuScenesCanBus, pyquaternion and its real numpy-slice assignment, the devkit Box transforms, the official converter's
row-vector formulas re-derived, and a float64 per-pixel bilinear resize."""

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from nuscenes import NuScenes
from nuscenes.can_bus.can_bus_api import NuScenesCanBus
from nuscenes.eval.common.utils import quaternion_yaw
from nuscenes.utils.data_classes import Box
from pyquaternion import Quaternion

from bevdeform.compat import can_bus as cb
from bevdeform.compat import frames
from bevdeform.compat import image_pipeline as ip
from bevdeform.data.dataset import NuScenesCameraDataset, collate
from bevdeform.data.infos import CAMERA_NAMES, create_infos, load_infos
from bevdeform.evaluation import evaluate_results, lidar_boxes_to_results, write_results_json

VERSION = "v1.0-synthetic"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from bevdeform.data.synthetic import write_synthetic_nuscenes

    # Tiny: 1 train + 1 val scene of 3 keyframes at 80x45 pixels; enough objects for the GT round trip.
    return write_synthetic_nuscenes(tmp_path_factory.mktemp("compat_synthetic"), num_scenes=1, num_val_scenes=1,
                                    samples_per_scene=3, seed=3, scale=0.05, objects_per_sample=10, progress=False)


@pytest.fixture(scope="module")
def info_files(data_root, tmp_path_factory) -> dict:
    return create_infos(data_root, VERSION, out_dir=tmp_path_factory.mktemp("compat_infos"), progress=False)


@pytest.fixture(scope="module")
def nusc(data_root) -> NuScenes:
    return NuScenes(VERSION, str(data_root), verbose=False)


def all_infos(info_files):
    return [info for path in info_files.values() for info in load_infos(path)[1]]


def pose_matrix(record) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Quaternion(record["rotation"]).rotation_matrix
    out[:3, 3] = record["translation"]
    return out


# ------------------------------------------------------------------------------------------------------- CAN bus

def official_vector_by_devkit(nusc, can_api, sample) -> np.ndarray:
    """The official converter + dataset re-derived with the devkit's objects and the real numpy quirk."""
    scene_name = nusc.get("scene", sample["scene_token"])["name"]
    messages = can_api.get_messages(scene_name, "pose")
    utimes = np.array([m["utime"] for m in messages])
    after = int(np.searchsorted(utimes, sample["timestamp"], side="right"))  # first utime > sample time
    message = messages[min(after, len(messages) - 1)]
    vector = np.zeros(18)
    vector[7:16] = np.concatenate([message["accel"], message["rotation_rate"], message["vel"]])
    pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
    rotation = Quaternion(pose["rotation"])
    vector[:3] = pose["translation"]
    vector[3:7] = rotation  # what the official dataset writes: numpy takes float(q) for every entry
    degrees = quaternion_yaw(rotation) / np.pi * 180
    degrees = degrees + 360 if degrees < 0 else degrees
    vector[-2], vector[-1] = degrees / 180 * np.pi, degrees
    return vector, messages, after


def test_can_bus_vectors_match_the_devkit_can_bus_api_and_the_official_quirks(data_root, nusc, info_files):
    can_api = NuScenesCanBus(dataroot=str(data_root))
    infos = all_infos(info_files)
    assert len(infos) == 6 and all("can_bus_v1" in info for info in infos)
    strictly_after_mattered = 0
    for info in infos:
        sample = nusc.get("sample", info["token"])
        expected, messages, after = official_vector_by_devkit(nusc, can_api, sample)
        np.testing.assert_allclose(info["can_bus_v1"], expected, rtol=0, atol=1e-12)
        # The quirk is real: all four of [3:7] are the record's w, not the quaternion.
        assert np.all(info["can_bus_v1"][3:7] == info["can_bus_v1"][3])
        assert 0 <= info["can_bus_v1"][17] < 360 and info["can_bus_v1"][16] == pytest.approx(
            math.radians(info["can_bus_v1"][17]), abs=1e-12)
        # The message at or before the sample time would give other numbers (the test can tell the two apart).
        before = messages[max(after - 1, 0)]
        if not np.allclose(np.concatenate([before["accel"], before["rotation_rate"], before["vel"]]),
                           info["can_bus_v1"][7:16], atol=1e-9):
            strictly_after_mattered += 1
    assert strictly_after_mattered >= 3


def test_can_bus_edge_cases_negative_w_and_timestamps_outside_the_messages():
    rng = np.random.default_rng(11)
    messages = [{"accel": list(rng.normal(size=3)), "orientation": [1, 0, 0, 0], "pos": [0, 0, 0],
                 "rotation_rate": list(rng.normal(size=3)), "utime": 1000 * k, "vel": list(rng.normal(size=3))}
                for k in range(1, 6)]
    for trial in range(20):
        q = Quaternion(rng.normal(size=4)).normalised
        q = -q if q.w > 0 else q  # a stored record may have w < 0: its sign reaches [3:7]
        translation = rng.normal(size=3) * 1000
        for timestamp, index in ((0, 0), (1000, 1), (2500, 2), (5000, 4), (99999, 4)):
            vector = cb.official_can_bus(translation, q.elements, messages, timestamp)
            reference = np.zeros(18)
            reference[:3] = translation
            reference[3:7] = q
            m = messages[index]
            reference[7:16] = m["accel"] + m["rotation_rate"] + m["vel"]
            yaw_deg = quaternion_yaw(q) / np.pi * 180
            yaw_deg += 360 if yaw_deg < 0 else 0
            reference[16:] = yaw_deg / 180 * np.pi, yaw_deg
            np.testing.assert_allclose(vector, reference, rtol=0, atol=1e-9)
            assert vector[3] < 0
    # A stored quaternion that is not exactly unit: [3:7] is its w as stored, the yaw that of the normalised one.
    vector = cb.official_can_bus([0, 0, 0], [2.0, 0.0, 0.0, 2.0], None, 0)
    assert np.all(vector[3:7] == 2.0) and vector[17] == pytest.approx(90.0, abs=1e-12)
    # A scene without CAN data: zeros at [7:16], the rest still filled.
    vector = cb.official_can_bus([1, 2, 3], [0, 0, 0, 1], None, 5)
    assert np.all(vector[7:16] == 0) and vector[17] == pytest.approx(180.0) and np.all(vector[3:7] == 0)


def test_missing_can_bus_expansion_is_named(tmp_path):
    root = tmp_path / "nuscenes"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=r"nuscenes/can_bus does not exist"):
        cb.read_pose_messages(root, "scene-0001")
    (tmp_path / "can_bus").mkdir()  # the official layout, beside the data root: suggested
    with pytest.raises(FileNotFoundError, match=r"there is one at .*can_bus .*pass its parent"):
        cb.read_pose_messages(root, "scene-0001")
    assert cb.read_pose_messages(tmp_path, "scene-0161") is None  # the devkit's blacklist: no CAN data
    assert cb.read_pose_messages(tmp_path, "scene-0002") is None  # no file for the scene
    with pytest.raises(ValueError, match="scene-NNNN"):
        cb.read_pose_messages(tmp_path, "my-scene")
    (tmp_path / "can_bus" / "scene-0003_pose.json").write_text(json.dumps([{"utime": 1, "pos": [0, 0, 0]}]))
    with pytest.raises(ValueError, match=r"scene-0003_pose.json message 0 has keys"):
        cb.read_pose_messages(tmp_path, "scene-0003")


def test_official_can_bus_delta_numpy_and_torch():
    rng = np.random.default_rng(5)
    curr, prev = rng.normal(size=(3, 18)) * 100, rng.normal(size=(3, 18)) * 100
    curr[0, 17], prev[0, 17] = 1.0, 359.0  # not wrapped: -358
    out = cb.official_can_bus_delta(curr, prev)
    expected = curr.copy()
    expected[:, :3] -= prev[:, :3]
    expected[:, 17] -= prev[:, 17]
    np.testing.assert_array_equal(out, expected)
    assert out[0, 17] == -358.0 and np.all(out[:, 16] == curr[:, 16])
    start = cb.official_can_bus_delta(curr[1], None)
    assert start.shape == (1, 18) and np.all(start[0, :3] == 0) and start[0, 17] == 0
    np.testing.assert_array_equal(start[0, 3:17], curr[1, 3:17])
    masked = cb.official_can_bus_delta_masked(torch.from_numpy(curr), torch.from_numpy(prev),
                                              torch.tensor([True, False, True]))
    np.testing.assert_array_equal(masked.numpy()[[0, 2]], expected[[0, 2]])
    np.testing.assert_array_equal(masked.numpy()[1], cb.official_can_bus_delta(curr[1])[0])
    assert np.all(curr == curr) and curr[0, 17] == 1.0  # input untouched
    with pytest.raises(ValueError, match="can_bus_abs_curr must have shape"):
        cb.official_can_bus_delta(np.zeros(17))


# -------------------------------------------------------------------------------------------------------- frames

def devkit_box_to_global(box_lidar_row, lidar_record, pose_record) -> Box:
    x, y, z, w, l, h, yaw, vx, vy = box_lidar_row
    box = Box([x, y, z], [w, l, h], Quaternion(axis=[0, 0, 1], radians=yaw), velocity=(vx, vy, 0.0))
    box.rotate(Quaternion(lidar_record["rotation"]))
    box.translate(np.array(lidar_record["translation"]))
    box.rotate(Quaternion(pose_record["rotation"]))
    box.translate(np.array(pose_record["translation"]))
    return box


def test_lidar_boxes_to_global_and_ego_match_the_devkit_box_chain():
    rng = np.random.default_rng(7)
    for trial in range(5):
        # Tilted lidar and ego poses (the real rig's lidar is within a degree of -90 deg yaw).
        lidar = {"rotation": (Quaternion(axis=[0, 0, 1], degrees=-90 + rng.normal())
                              * Quaternion(axis=rng.normal(size=3), degrees=rng.normal() * 0.5)).elements,
                 "translation": [0.94, 0.0, 1.84] + rng.normal(size=3) * 0.01}
        pose = {"rotation": (Quaternion(axis=[0, 0, 1], radians=rng.uniform(-np.pi, np.pi))
                             * Quaternion(axis=rng.normal(size=3), degrees=rng.normal())).elements,
                "translation": rng.normal(size=3) * 500}
        boxes = np.concatenate([rng.uniform(-50, 50, (8, 2)), rng.uniform(-3, 1, (8, 1)), rng.uniform(0.3, 10, (8, 3)),
                                rng.uniform(-4, 4, (8, 1)), rng.normal(size=(8, 2)) * 5], axis=1)
        translation, size, rotation, velocity = frames.lidar_boxes_to_global(boxes, pose_matrix(lidar),
                                                                             pose_matrix(pose))
        boxes_ego = frames.lidar_boxes_to_ego(boxes, pose_matrix(lidar))
        for row in range(len(boxes)):
            box = devkit_box_to_global(boxes[row], lidar, pose)
            np.testing.assert_allclose(translation[row], box.center, atol=1e-9)
            np.testing.assert_allclose(size[row], box.wlh, atol=1e-12)
            assert abs(abs(np.dot(rotation[row], box.orientation.elements)) - 1) < 1e-12
            np.testing.assert_allclose(velocity[row], box.velocity[:2], atol=1e-9)
            # Ego frame: the devkit box after the first step only.
            ego_box = Box(boxes[row, :3], boxes[row, 3:6], Quaternion(axis=[0, 0, 1], radians=boxes[row, 6]),
                          velocity=(*boxes[row, 7:9], 0.0))
            ego_box.rotate(Quaternion(lidar["rotation"]))
            ego_box.translate(np.array(lidar["translation"]))
            np.testing.assert_allclose(boxes_ego[row, :3], ego_box.center, atol=1e-9)
            assert abs(math.remainder(boxes_ego[row, 6] - quaternion_yaw(ego_box.orientation), 2 * math.pi)) < 1e-9
            np.testing.assert_allclose(boxes_ego[row, 7:9], ego_box.velocity[:2], atol=1e-9)
        assert np.all((-math.pi <= boxes_ego[:, 6]) & (boxes_ego[:, 6] < math.pi))
        # Back to the lidar frame: the round trip is exact up to the tilt dropped by the yaw-only ego boxes.
        flat_lidar = pose_matrix({"rotation": Quaternion(axis=[0, 0, 1], radians=quaternion_yaw(
            Quaternion(lidar["rotation"]))).elements, "translation": lidar["translation"]})
        back = frames.ego_boxes_to_lidar(frames.lidar_boxes_to_ego(boxes, flat_lidar), flat_lidar)
        np.testing.assert_allclose(back[:, [0, 1, 2, 3, 4, 5, 7, 8]], boxes[:, [0, 1, 2, 3, 4, 5, 7, 8]], atol=1e-9)
        assert np.all(np.abs(np.vectorize(math.remainder)(back[:, 6] - boxes[:, 6], 2 * math.pi)) < 1e-9)


def test_ground_truth_in_the_lidar_frame_scores_one_through_lidar_boxes_to_results(data_root, nusc, info_files,
                                                                                     tmp_path):
    """GT moved into LIDAR_TOP with the devkit (inverse chain, mmdet3d 0.17's yaw convention round trip), then
    lidar_boxes_to_results -> DetectionEval: mAP = NDS = 1 only if every frame step is right."""
    _, val_infos = load_infos(info_files["synthetic_val"])
    results = {}
    for info in val_infos:
        sample = nusc.get("sample", info["token"])
        lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        lidar = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", lidar_sd["ego_pose_token"])
        rows, labels, attributes = [], [], []
        for ann_token, name, attribute, valid in zip(info["gt_ann_tokens"], info["gt_names"], info["gt_attributes"],
                                                     info["valid_flag"]):
            if not valid:  # the devkit drops GT without points: submitted, it would be a false positive
                continue
            box = nusc.get_box(ann_token)
            box.velocity = nusc.box_velocity(ann_token)
            box.velocity = np.nan_to_num(box.velocity)
            box.translate(-np.array(pose["translation"]))
            box.rotate(Quaternion(pose["rotation"]).inverse)
            box.translate(-np.array(lidar["translation"]))
            box.rotate(Quaternion(lidar["rotation"]).inverse)
            # The official converter's yaw and its inverse in output_to_nusc_box: yaw_devkit = -(-yaw - pi/2) - pi/2.
            yaw_mmdet3d = -box.orientation.yaw_pitch_roll[0] - np.pi / 2
            yaw_devkit = -yaw_mmdet3d - np.pi / 2
            rows.append([*box.center, *box.wlh, yaw_devkit, *box.velocity[:2]])
            labels.append(["car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle",
                           "bicycle", "pedestrian", "traffic_cone"].index(name))
            attributes.append(attribute)
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, 9)
        results[info["token"]] = lidar_boxes_to_results(
            info["token"], rows[:, :7], rows[:, 7:9], np.linspace(1.0, 0.5, len(rows)), labels,
            info["lidar2ego"], info["ego2global"], attribute_names=attributes)
    path = write_results_json(results, tmp_path / "results.json")
    metrics = evaluate_results(path, data_root, VERSION, "synthetic_val", tmp_path / "eval", nusc=nusc)
    assert metrics["mAP"] == pytest.approx(1.0, abs=1e-9) and metrics["NDS"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["mATE"] < 1e-6 and metrics["mAOE"] < 1e-6 and metrics["mAVE"] < 1e-5


def test_dataset_gt_in_the_lidar_frame_scores_one(data_root, nusc, info_files, tmp_path):
    """The batch's gt_boxes_lidar (fine-tuning targets of a lidar-frame model) back through lidar_boxes_to_results:
    the devkit finds the GT exactly (the dataset keeps only boxes with points inside the range, as it evaluates)."""
    from bevdeform.data.infos import CLASS_NAMES

    path = info_files["synthetic_val"]
    dataset = NuScenesCameraDataset(path, data_root, (22, 40), bevformer_v1_inputs=True)
    _, infos = load_infos(path)
    results = {}
    for index in range(len(dataset)):
        sample, info = dataset[index], infos[index]
        boxes = sample["gt_boxes_lidar"].astype(np.float64)
        np.testing.assert_allclose(boxes, frames.ego_boxes_to_lidar(sample["gt_boxes"], sample["lidar2ego"]),
                                   atol=1e-4)
        # Attributes of the kept boxes, matched by position (the dataset keeps a subset of the info's GT).
        attributes = []
        for box in sample["gt_boxes"]:
            row = int(np.argmin(np.linalg.norm(info["gt_boxes"][:, :3] - box[:3], axis=1)))
            attributes.append(info["gt_attributes"][row])
        results[sample["sample_token"]] = lidar_boxes_to_results(
            sample["sample_token"], boxes[:, :7], boxes[:, 7:9], np.linspace(1.0, 0.5, len(boxes)),
            sample["gt_labels"], sample["lidar2ego"], info["ego2global"], attribute_names=attributes,
            class_names=CLASS_NAMES)
    written = write_results_json(results, tmp_path / "results.json")
    metrics = evaluate_results(written, data_root, VERSION, "synthetic_val", tmp_path / "eval", nusc=nusc)
    assert metrics["mAP"] == pytest.approx(1.0, abs=1e-9) and metrics["mATE"] < 1e-4 and metrics["mAOE"] < 1e-4


def official_lidar2img(nusc, sample, channel) -> np.ndarray:
    """obtain_sensor2top's R, T (row-vector form) and get_data_info's lidar2img, transcribed from their formulas."""
    lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    l2e = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
    e2g = nusc.get("ego_pose", lidar_sd["ego_pose_token"])
    cam_sd = nusc.get("sample_data", sample["data"][channel])
    s2e = nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"])
    e2g_s = nusc.get("ego_pose", cam_sd["ego_pose_token"])
    l2e_r, e2g_r = Quaternion(l2e["rotation"]).rotation_matrix, Quaternion(e2g["rotation"]).rotation_matrix
    s2e_r, e2g_s_r = Quaternion(s2e["rotation"]).rotation_matrix, Quaternion(e2g_s["rotation"]).rotation_matrix
    back = np.linalg.inv(e2g_r).T @ np.linalg.inv(l2e_r).T
    rot = (s2e_r.T @ e2g_s_r.T) @ back
    trans = (np.array(s2e["translation"]) @ e2g_s_r.T + np.array(e2g_s["translation"])) @ back
    trans -= np.array(e2g["translation"]) @ back + np.array(l2e["translation"]) @ np.linalg.inv(l2e_r).T
    sensor2lidar_rotation, sensor2lidar_translation = rot.T, trans
    lidar2cam_r = np.linalg.inv(sensor2lidar_rotation)
    lidar2cam_t = sensor2lidar_translation @ lidar2cam_r.T
    lidar2cam_rt = np.eye(4)
    lidar2cam_rt[:3, :3] = lidar2cam_r.T
    lidar2cam_rt[3, :3] = -lidar2cam_t
    viewpad = np.eye(4)
    viewpad[:3, :3] = np.array(s2e["camera_intrinsic"])
    return viewpad @ lidar2cam_rt.T


def test_lidar2img_matches_the_official_composition(nusc, info_files):
    info = load_infos(info_files["synthetic_train"])[1][1]
    sample = nusc.get("sample", info["token"])
    for channel in CAMERA_NAMES:
        cam = info["cams"][channel]
        expected = np.diag([0.5, 0.5, 1.0, 1.0]) @ official_lidar2img(nusc, sample, channel)
        ours = frames.lidar2img_from(cam["intrinsics"], cam["cam2lidar"], (0.5, 0.5))
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-9)


# -------------------------------------------------------------------------------------------------- image pipeline

def bilinear_reference(image: np.ndarray, out_hw) -> np.ndarray:
    """float64 per-pixel bilinear with cv2's convention: centres aligned, source index clamped to the image."""
    in_h, in_w = image.shape[:2]
    out = np.zeros((out_hw[0], out_hw[1], image.shape[2]))
    for y in range(out_hw[0]):
        for x in range(out_hw[1]):
            taps = []
            for position, in_size, out_size in ((y, in_h, out_hw[0]), (x, in_w, out_hw[1])):
                source = (position + 0.5) * in_size / out_size - 0.5
                lower = math.floor(source)
                frac = source - lower
                if lower < 0:
                    lower, frac = 0, 0.0
                if lower >= in_size - 1:
                    lower, frac = in_size - 1, 0.0
                taps.append([(lower, 1 - frac), (min(lower + 1, in_size - 1), frac)])
            for (yy, wy) in taps[0]:
                for (xx, wx) in taps[1]:
                    out[y, x] += wy * wx * image[yy, xx]
    return out


@pytest.mark.parametrize("pipeline, in_hw, scale", [("bevformer_v1_tiny", (18, 30), 0.5),
                                                   ("bevformer_v1_caffe", (25, 40), 0.8),
                                                   ("bevformer_v1_caffe", (20, 36), 1.0)])
def test_official_test_image_pipeline_against_a_float64_reference(pipeline, in_hw, scale):
    rng = np.random.default_rng(1)
    image_bgr = rng.integers(0, 256, size=(*in_hw, 3), dtype=np.uint8)
    norm = ip.image_norm(pipeline)
    target_hw = ip.official_resized_hw(in_hw, scale)
    out = ip.official_test_image(image_bgr, norm, target_hw)
    assert out.dtype == np.float32 and out.shape == (3, -(-target_hw[0] // 32) * 32, -(-target_hw[1] // 32) * 32)
    if pipeline == "bevformer_v1_tiny":
        channels, mean, std = image_bgr[..., ::-1], [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    else:
        channels, mean, std = image_bgr, [103.53, 116.28, 123.675], [1.0, 1.0, 1.0]
    normalised = (channels.astype(np.float64) - mean) / std
    expected = bilinear_reference(normalised, target_hw)
    np.testing.assert_allclose(out[:, :target_hw[0], :target_hw[1]].transpose(1, 2, 0), expected, atol=2e-4)
    assert np.all(out[:, target_hw[0]:, :] == 0) and np.all(out[:, :, target_hw[1]:] == 0)
    # The uint8 fast path (a cv2.LUT table) is bit-identical to mmcv's operations on the float image.
    np.testing.assert_array_equal(ip.normalize_official(image_bgr, norm),
                                  ip.normalize_official(image_bgr.astype(np.float32), norm))
    with pytest.raises(ValueError, match="expected one of"):
        ip.image_norm("bevformer_v2")


# ------------------------------------------------------------------------------------------------------- dataset

def test_dataset_bevformer_v1_inputs(data_root, info_files, tmp_path):
    path = info_files["synthetic_train"]
    _, infos = load_infos(path)
    disk_h, disk_w = infos[0]["cams"]["CAM_FRONT"]["height"], infos[0]["cams"]["CAM_FRONT"]["width"]
    target_hw = ip.official_resized_hw((disk_h, disk_w), 0.5)
    dataset = NuScenesCameraDataset(path, data_root, target_hw, queue_length=2, bevformer_v1_inputs=True,
                                    image_pipeline="bevformer_v1_tiny")
    batch = collate([dataset[2], dataset[0]])
    assert batch["lidar2img"].shape == (2, 2, 6, 4, 4) and batch["lidar2img"].dtype == torch.float32
    assert batch["can_bus_abs"].shape == (2, 18) and batch["can_bus_abs"].dtype == torch.float64
    assert batch["can_bus_abs_history"].shape == (2, 1, 18) and batch["lidar2ego"].shape == (2, 4, 4)
    assert batch["img_shape_hw"].tolist() == [[32, 64], [32, 64]]  # 22x40 padded to /32
    np.testing.assert_array_equal(batch["can_bus_abs"][0].numpy(), infos[2]["can_bus_v1"])
    np.testing.assert_array_equal(batch["can_bus_abs_history"][0, 0].numpy(), infos[1]["can_bus_v1"])
    np.testing.assert_array_equal(batch["can_bus_abs_history"][1, 0].numpy(), infos[0]["can_bus_v1"])  # scene start
    np.testing.assert_array_equal(batch["lidar2ego"][0].numpy(), infos[2]["lidar2ego"])
    for cam_index, channel in enumerate(CAMERA_NAMES):
        cam = infos[2]["cams"][channel]
        expected = frames.lidar2img_from(cam["intrinsics"], cam["cam2lidar"],
                                         (target_hw[1] / disk_w, target_hw[0] / disk_h))
        np.testing.assert_allclose(batch["lidar2img"][0, 1, cam_index].numpy(), expected, rtol=1e-6, atol=1e-4)
        image = cv2.imread(str(data_root / cam["data_path"]), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(batch["images"][0, 1, cam_index].numpy(),
                                      ip.official_test_image(image, ip.image_norm("bevformer_v1_tiny"), target_hw))
    # The default path has none of these keys.
    default = NuScenesCameraDataset(path, data_root, target_hw, queue_length=2)
    assert not {"lidar2img", "can_bus_abs", "img_shape_hw"} & set(collate([default[0]]))
    # Info files without can_bus_v1 (a data root without the CAN bus expansion) are refused, naming the folder.
    content = json.loads(Path(path).read_text())
    for info in content["infos"]:
        del info["can_bus_v1"]
    stripped = tmp_path / "no_can_bus.json"
    stripped.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"lack can_bus_v1.*can_bus"):
        NuScenesCameraDataset(stripped, data_root, target_hw, bevformer_v1_inputs=True)
    with pytest.raises(ValueError, match="image_pipeline 'caffe'"):
        NuScenesCameraDataset(path, data_root, target_hw, image_pipeline="caffe")


def test_create_infos_without_the_expansion_leaves_can_bus_out(data_root, info_files, tmp_path):
    bare = tmp_path / "data" / "nuscenes"
    shutil.copytree(data_root / VERSION, bare / VERSION)
    shutil.copytree(data_root / "maps", bare / "maps")
    paths = create_infos(bare, VERSION, out_dir=tmp_path / "a", progress=False, check_images=False)
    metadata, infos = load_infos(paths["synthetic_val"])
    assert metadata["can_bus_root"] is None and not any("can_bus_v1" in info for info in infos)
    # The official layout, data/can_bus beside data/nuscenes, is found: the same vectors as from data_root/can_bus.
    shutil.copytree(data_root / "can_bus", tmp_path / "data" / "can_bus")
    paths = create_infos(bare, VERSION, out_dir=tmp_path / "b", progress=False, check_images=False)
    metadata, infos = load_infos(paths["synthetic_val"])
    assert metadata["can_bus_root"] == str(tmp_path / "data")
    reference = load_infos(info_files["synthetic_val"])[1]
    for info, expected in zip(infos, reference):
        np.testing.assert_array_equal(info["can_bus_v1"], expected["can_bus_v1"])
    with pytest.raises(FileNotFoundError, match=r"elsewhere/can_bus does not exist"):
        create_infos(data_root, VERSION, out_dir=tmp_path, progress=False, check_images=False,
                     can_bus_root=tmp_path / "elsewhere")


def test_validation_results_of_a_lidar_frame_detector_use_lidar2ego():
    from bevdeform.evaluation import boxes_to_results
    from bevdeform.lit import BEVFormerModule

    class LidarFrameDetector(torch.nn.Module):
        input_frame = "lidar"

    rng = np.random.default_rng(2)
    lidar2ego = pose_matrix({"rotation": Quaternion(axis=[0, 0, 1], degrees=-90.3).elements,
                             "translation": [0.94, 0.01, 1.84]})
    ego2global = pose_matrix({"rotation": Quaternion(axis=[0, 0, 1], degrees=37.0).elements,
                              "translation": [400.0, 1200.0, 0.0]})
    boxes = torch.from_numpy(np.concatenate([rng.uniform(-40, 40, (5, 3)), rng.uniform(0.5, 5, (5, 3)),
                                             rng.uniform(-3, 3, (5, 1)), rng.normal(size=(5, 2))], axis=1))
    found = [{"boxes": boxes, "scores": torch.linspace(0.9, 0.1, 5), "labels": torch.arange(5)}]
    batch = {"sample_token": ["s0"], "lidar2ego": torch.from_numpy(lidar2ego)[None],
             "ego2global": torch.from_numpy(ego2global)[None, None]}
    results = BEVFormerModule(LidarFrameDetector()).results_of_batch(batch, found)["s0"]
    expected = lidar_boxes_to_results("s0", boxes[:, :7], boxes[:, 7:9], found[0]["scores"], found[0]["labels"],
                                      lidar2ego, ego2global)
    assert results == expected
    # The same boxes taken as ego-frame boxes land elsewhere: the lidar path is really taken.
    as_ego = boxes_to_results("s0", boxes[:, :7], boxes[:, 7:9], found[0]["scores"], found[0]["labels"], ego2global)
    assert not np.allclose(results[0]["translation"], as_ego[0]["translation"], atol=0.5)
    with pytest.raises(ValueError, match="bevformer_v1_inputs"):
        BEVFormerModule(LidarFrameDetector()).results_of_batch({k: v for k, v in batch.items() if k != "lidar2ego"},
                                                               found)


def test_train_init_weights_is_checked_before_any_work(tmp_path):
    from bevdeform.train import RunError, train

    with pytest.raises(RunError, match=r"checkpoint .*missing\.pth does not exist"):
        train("bev_nano", init_weights=tmp_path / "missing.pth", out=tmp_path / "run")
    torch.save({"state_dict": {}}, tmp_path / "w.pth")
    with pytest.raises(RunError, match="pass one of them"):
        train("bev_nano", init_weights=tmp_path / "w.pth", resume=tmp_path / "w.pth", out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_train_init_weights_are_loaded_into_the_model(data_root, info_files, tmp_path):
    """The weights reach load_model_weights (a state dict of another model is refused, naming the keys) before any
    training step."""
    from bevdeform.train import RunError, train

    torch.save({"state_dict": {"encoder.not_a_parameter": torch.zeros(3)}}, tmp_path / "other.pth")
    overrides = [f"data.train_info_path={info_files['synthetic_train']}",
                 f"data.val_info_path={info_files['synthetic_val']}", "data.num_workers=0"]
    with pytest.raises(RunError, match=r"--init-weights .*other\.pth: .*unexpected keys: encoder\.not_a_parameter"):
        train("bev_nano", overrides, data_root=str(data_root), version=VERSION, out=tmp_path / "run",
              init_weights=tmp_path / "other.pth", enable_progress_bar=False)


def test_compat_configs_choose_the_official_inputs():
    from bevdeform.config import ConfigError, load_config

    expected = {"tiny": ("bevformer_v1_tiny", (450, 800)), "small": ("bevformer_v1_caffe", (720, 1280)),
                "base": ("bevformer_v1_caffe", (900, 1600))}
    for variant, (pipeline, size_hw) in expected.items():
        data = load_config(f"bevformer_{variant}").data
        assert data.bevformer_v1_inputs and data.image_pipeline == pipeline and data.image_size_hw == size_hw
        scale = ip.VARIANT_IMAGE[variant][1]
        assert ip.VARIANT_IMAGE[variant][0] == pipeline and ip.official_resized_hw((900, 1600), scale) == size_hw
    default = load_config("bev_tiny").data
    assert default.image_pipeline == "bevdeform" and not default.bevformer_v1_inputs
    with pytest.raises(ConfigError, match="data.image_pipeline"):
        load_config("bevformer_tiny", ["data.image_pipeline=caffe"])


# ------------------------------------------------------------------------------------------ round trip (issue 11)

def official_top_k(cls_logits_last, boxes_lidar, k=300):
    """NMSFreeCoder's decoding on (Q, 10) logits and (Q, 9) boxes: top-k of the sigmoid scores over Q x 10, label =
    index % 10, query = index // 10, centres outside post_center_range [-61.2, -61.2, -10, 61.2, 61.2, 10] dropped."""
    scores = torch.sigmoid(cls_logits_last).flatten()  # (Q, 10) -> (Q * 10,)
    top, index = scores.topk(k)
    labels, query = index % 10, torch.div(index, 10, rounding_mode="floor")
    boxes = boxes_lidar[query]
    keep = (boxes[:, :3] >= torch.tensor([-61.2, -61.2, -10.0])).all(1) & \
        (boxes[:, :3] <= torch.tensor([61.2, 61.2, 10.0])).all(1)
    return boxes[keep], top[keep], labels[keep]


def test_round_trip_official_checkpoint_convert_script_evaluate_script(data_root, info_files, tmp_path):
    """A checkpoint in the official layout (random weights, the official key names and shapes, mmcv's
    {'meta', 'state_dict'}) -> scripts/convert_bevformer_checkpoint.py -> scripts/evaluate.py's ``evaluate`` with
    configs/bevformer_tiny on the synthetic set (official image pipeline, lidar2img, CAN-bus vector, streamed over
    the val scene) -> the results JSON, scored by the devkit. Random weights score nothing; what must hold is that
    the file is complete and that its boxes are the official model's: the oracle (tests/official_bevformer_oracle.py)
    fed this data path's inputs with the official delta step, decoded as NMSFreeCoder and mapped by
    lidar_boxes_to_results, gives the same boxes at the scene start and after a temporal step."""
    import runpy

    from official_bevformer_oracle import OfficialBEVFormer, devkit_boxes_from_bbox_preds, randomize_

    from bevdeform.train import evaluate

    repo = Path(__file__).resolve().parents[1]
    official = randomize_(OfficialBEVFormer("tiny"), seed=0).eval()
    checkpoint, converted = tmp_path / "bevformer_tiny_epoch_24.pth", tmp_path / "bevformer_tiny.pth"
    torch.save({"meta": {"epoch": 24}, "state_dict": official.state_dict()}, checkpoint)
    convert_main = runpy.run_path(str(repo / "scripts" / "convert_bevformer_checkpoint.py"))["main"]
    assert convert_main(["--checkpoint", str(checkpoint), "--variant", "tiny", "--out", str(converted)]) == 0

    _, infos = load_infos(info_files["synthetic_val"])
    disk_hw = (infos[0]["cams"]["CAM_FRONT"]["height"], infos[0]["cams"]["CAM_FRONT"]["width"])
    target_hw = ip.official_resized_hw(disk_hw, 0.5)  # the official tiny resize of the synthetic images
    overrides = [f"data.image_size_hw=[{target_hw[0]},{target_hw[1]}]", "data.num_workers=0",
                 f"data.val_info_path={info_files['synthetic_val']}"]
    metrics = evaluate("bevformer_tiny", checkpoint=converted, overrides=overrides, data_root=str(data_root),
                       version=VERSION, out=tmp_path / "eval", enable_progress_bar=False)
    assert all(math.isfinite(metrics[name]) for name in ("mAP", "NDS", "mATE"))
    results = json.loads((tmp_path / "eval" / "results_nusc.json").read_text())["results"]
    assert set(results) == {info["token"] for info in infos} and all(0 < len(r) <= 300 for r in results.values())

    dataset = NuScenesCameraDataset(info_files["synthetic_val"], data_root, target_hw, bevformer_v1_inputs=True,
                                    image_pipeline="bevformer_v1_tiny")
    prev_bev, prev_can_bus = None, None
    for index in range(2):  # the scene start and one temporal step (the oracle loops over cameras in Python)
        batch = collate([dataset[index]])
        assert bool(batch["has_prev"][0, -1]) == (index > 0)
        can_bus = cb.official_can_bus_delta(batch["can_bus_abs"], prev_can_bus)[0].numpy()  # (18,)
        prev_can_bus = batch["can_bus_abs"]
        out = official.simple_test(batch["images"][:, -1], batch["lidar2img"][:, -1],
                                   tuple(batch["img_shape_hw"][0].tolist()), can_bus, prev_bev)
        prev_bev = out["bev_embed"]
        boxes, scores, labels = official_top_k(out["all_cls_scores"][-1, 0],
                                               devkit_boxes_from_bbox_preds(out["all_bbox_preds"][-1, 0]))
        token = str(batch["sample_token"][0])
        expected = lidar_boxes_to_results(token, boxes[:, :7], boxes[:, 7:9], scores, labels,
                                          batch["lidar2ego"][0], batch["ego2global"][0, -1])
        written = results[token]
        # The 50 best boxes (clear of ties at the top-300 cut) are in the file, at the same place with the same score.
        for box in expected[:50]:
            same_class = [r for r in written if r["detection_name"] == box["detection_name"]]
            nearest = min(same_class, key=lambda r: np.linalg.norm(np.subtract(r["translation"], box["translation"])))
            np.testing.assert_allclose(nearest["translation"], box["translation"], atol=1e-3)
            np.testing.assert_allclose(nearest["size"], box["size"], rtol=1e-3)
            np.testing.assert_allclose(nearest["velocity"], box["velocity"], atol=1e-3)
            assert abs(abs(np.dot(nearest["rotation"], box["rotation"])) - 1) < 1e-5
            assert nearest["detection_score"] == pytest.approx(box["detection_score"], abs=1e-4)


def test_a_lidar_frame_model_trains_on_lidar_frame_targets(data_root, info_files):
    """forward_train of a `model.frame: lidar` model (fine-tuning a converted checkpoint) computes its loss from
    batch['gt_boxes_lidar']: the ego-frame boxes may be anything, and the loss equals the loss of the outputs against
    the lidar-frame boxes; without gt_boxes_lidar the batch is refused, naming the key."""
    from bevdeform.compat import bevformer_v1 as v1

    path = info_files["synthetic_train"]
    _, infos = load_infos(path)
    disk_h, disk_w = infos[0]["cams"]["CAM_FRONT"]["height"], infos[0]["cams"]["CAM_FRONT"]["width"]
    target_hw = ip.official_resized_hw((disk_h, disk_w), 0.5)
    dataset = NuScenesCameraDataset(path, data_root, target_hw, queue_length=2, bevformer_v1_inputs=True,
                                    image_pipeline="bevformer_v1_tiny")
    batch = collate([dataset[2]])
    torch.manual_seed(0)
    model = v1.build_model("tiny", bev_hw=(20, 20)).eval()
    with torch.no_grad():
        losses = model.forward_train(batch)
        garbage = dict(batch, gt_boxes=[b + 1000.0 for b in batch["gt_boxes"]])
        assert float(model.forward_train(garbage)["loss"]) == pytest.approx(float(losses["loss"]), rel=1e-6)
        swapped = dict(batch, gt_boxes_lidar=batch["gt_boxes"])  # the ego-frame boxes would train another target
        assert float(model.forward_train(swapped)["loss"]) != pytest.approx(float(losses["loss"]), rel=1e-3)
    missing = {k: v for k, v in batch.items() if k != "gt_boxes_lidar"}
    with pytest.raises(ValueError, match="gt_boxes_lidar"):
        model.forward_train(missing)
