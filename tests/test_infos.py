"""Info files on the synthetic nuScenes set, checked against the devkit's own records and its DetectionEval."""

import json
import os
import re
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
from nuscenes import NuScenes
from nuscenes.eval.common.utils import quaternion_yaw
from nuscenes.utils.geometry_utils import BoxVisibility, view_points
from pyquaternion import Quaternion

from bevdeform import geometry
from bevdeform.data.infos import CAMERA_NAMES, CLASS_NAMES, create_infos, info_path, load_infos
from bevdeform.evaluation import boxes_to_results, evaluate_results, write_results_json

VERSION = "v1.0-synthetic"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    from bevdeform.data.synthetic import write_synthetic_nuscenes

    # Small, but with all 10 classes in the val scenes (mAP averages every class) and several keyframes per scene.
    return write_synthetic_nuscenes(tmp_path_factory.mktemp("synthetic"), num_scenes=3, num_val_scenes=2,
                                    samples_per_scene=5, seed=0, scale=0.1, objects_per_sample=24, progress=False)


@pytest.fixture(scope="module")
def info_files(synthetic_root, tmp_path_factory) -> dict:
    return create_infos(synthetic_root, VERSION, out_dir=tmp_path_factory.mktemp("infos"), progress=False)


@pytest.fixture(scope="module")
def nusc(synthetic_root) -> NuScenes:
    return NuScenes(VERSION, str(synthetic_root), verbose=False)


@pytest.fixture(scope="module")
def val_infos(info_files):
    return load_infos(info_files["synthetic_val"], expected_version=VERSION)[1]


def all_infos(info_files):
    return [info for path in info_files.values() for info in load_infos(path)[1]]


def pose_matrix(record) -> np.ndarray:
    """4x4 from a devkit record with pyquaternion (the independent path)."""
    out = np.eye(4)
    out[:3, :3] = Quaternion(record["rotation"]).rotation_matrix
    out[:3, 3] = record["translation"]
    return out


# --------------------------------------------------------------------------------------------- files and layout

def test_info_files_per_split_load_back(synthetic_root, info_files, nusc):
    splits = json.loads((synthetic_root / VERSION / "splits.json").read_text())
    assert set(info_files) == set(splits) == {"synthetic_train", "synthetic_val"}
    for split, path in info_files.items():
        assert path == info_path(path.parent, VERSION, split)
        assert path.name == f"{VERSION}_infos_{split}.json"
        metadata, infos = load_infos(path, expected_version=VERSION)
        assert metadata["split"] == split and metadata["version"] == VERSION
        assert metadata["class_names"] == list(CLASS_NAMES) and metadata["frame"] == "ego@lidar"
        scenes = [s for s in nusc.scene if s["name"] in splits[split]]
        assert len(infos) == sum(s["nbr_samples"] for s in scenes)
        # Ordered by scene, then by time; frame_idx counts from 0 per scene; has_prev exactly when prev.
        for previous, info in zip([None] + infos[:-1], infos):
            if previous is not None and previous["scene_token"] == info["scene_token"]:
                assert info["prev"] == previous["token"] and previous["next"] == info["token"]
                assert info["timestamp"] > previous["timestamp"] and info["frame_idx"] == previous["frame_idx"] + 1
            else:
                assert info["frame_idx"] == 0 and info["prev"] == "" and not info["has_prev"]
            assert info["has_prev"] == (info["prev"] != "")
            assert list(info["cams"]) == list(CAMERA_NAMES)
            n = len(info["gt_names"])
            assert info["gt_boxes"].shape == (n, 7) and info["gt_velocity"].shape == (n, 2)
            assert info["valid_flag"].dtype == bool and info["num_lidar_pts"].dtype == np.int64
            assert set(info["gt_names"]) <= set(CLASS_NAMES)
            np.testing.assert_array_equal(info["valid_flag"], info["num_lidar_pts"] + info["num_radar_pts"] > 0)
            for cam in info["cams"].values():
                assert (synthetic_root / cam["data_path"]).is_file()


def test_command_line_writes_the_same_files(synthetic_root, info_files, tmp_path):
    script = runpy.run_path(str(REPO_ROOT / "data_prep" / "create_infos.py"), run_name="create_infos")
    script["main"](["--data-root", str(synthetic_root), "--version", VERSION, "--out", str(tmp_path),
                    "--skip-image-check"])
    for split, path in info_files.items():
        written = json.loads((tmp_path / path.name).read_text())
        assert written["infos"] == json.loads(path.read_text())["infos"]


# --------------------------------------------------------------------------------- frames against the devkit

def test_gt_boxes_and_velocities_match_devkit(info_files, nusc):
    for info in all_infos(info_files)[::3]:
        lidar2ego = info["lidar2ego"]
        # The devkit's boxes in the LIDAR_TOP frame, moved into ego with the calibration.
        _, boxes_lidar, _ = nusc.get_sample_data(info["lidar_token"])
        boxes_by_token = {box.token: box for box in boxes_lidar}
        pose = nusc.get("ego_pose", nusc.get("sample_data", info["lidar_token"])["ego_pose_token"])
        for row, ann_token in enumerate(info["gt_ann_tokens"]):
            box = boxes_by_token[ann_token]
            box.rotate(Quaternion(matrix=lidar2ego[:3, :3]))
            box.translate(lidar2ego[:3, 3])
            np.testing.assert_allclose(info["gt_boxes"][row, :3], box.center, atol=1e-6)
            np.testing.assert_allclose(info["gt_boxes"][row, 3:6], box.wlh, atol=1e-9)
            assert abs(geometry.wrap_angle(info["gt_boxes"][row, 6] - quaternion_yaw(box.orientation))) < 1e-6
            velocity_global = nusc.box_velocity(ann_token)
            valid = bool(np.all(np.isfinite(velocity_global[:2])))
            assert info["gt_velocity_valid"][row] == valid
            expected = Quaternion(pose["rotation"]).inverse.rotate(velocity_global)[:2] if valid else [0.0, 0.0]
            np.testing.assert_allclose(info["gt_velocity"][row], expected, atol=1e-9)
        # Only the detection classes, every one of them.
        sample = nusc.get("sample", info["token"])
        detection = [a for a in sample["anns"]
                     if nusc.get("sample_annotation", a)["category_name"] in _DETECTION_CATEGORIES]
        assert sorted(detection) == sorted(info["gt_ann_tokens"])


_DETECTION_CATEGORIES = {
    "movable_object.barrier", "vehicle.bicycle", "vehicle.bus.bendy", "vehicle.bus.rigid", "vehicle.car",
    "vehicle.construction", "vehicle.motorcycle", "human.pedestrian.adult", "human.pedestrian.child",
    "human.pedestrian.construction_worker", "human.pedestrian.police_officer", "movable_object.trafficcone",
    "vehicle.trailer", "vehicle.truck",
}


def test_ego_motion_matches_devkit_ego_poses(info_files, nusc):
    num_checked = 0
    for info in all_infos(info_files):
        sample = nusc.get("sample", info["token"])
        pose_curr = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        np.testing.assert_allclose(info["ego2global"], pose_matrix(pose_curr), atol=1e-9)
        if not info["has_prev"]:
            np.testing.assert_array_equal(info["ego_prev2curr"], np.eye(4))
            continue
        prev = nusc.get("sample", sample["prev"])
        pose_prev = nusc.get("ego_pose", nusc.get("sample_data", prev["data"]["LIDAR_TOP"])["ego_pose_token"])
        np.testing.assert_allclose(info["ego_prev2curr"],
                                   np.linalg.inv(pose_matrix(pose_curr)) @ pose_matrix(pose_prev), atol=1e-9)
        # The driven translation (in the previous ego's axes) and the turn, from the raw records.
        translation_xy, yaw_change = geometry.planar_ego_motion(info["ego_prev2curr"])
        offset_global = np.subtract(pose_curr["translation"], pose_prev["translation"])
        expected_xy = Quaternion(pose_prev["rotation"]).inverse.rotate(offset_global)[:2]
        np.testing.assert_allclose(translation_xy, expected_xy, atol=1e-6)
        expected_yaw = quaternion_yaw(Quaternion(pose_curr["rotation"])) - quaternion_yaw(Quaternion(pose_prev["rotation"]))
        assert abs(geometry.wrap_angle(yaw_change - expected_yaw)) < 1e-6
        num_checked += 1
    assert num_checked > 0


def test_cam2ego_composes_devkit_records_and_projects_like_devkit(val_infos, nusc):
    rng = np.random.default_rng(0)
    num_projected = 0
    for info in val_infos[::2]:
        lidar_sd = nusc.get("sample_data", info["lidar_token"])
        lidar_pose = nusc.get("ego_pose", lidar_sd["ego_pose_token"])
        lidar_cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
        for name, cam in info["cams"].items():
            sd = nusc.get("sample_data", cam["sample_data_token"])
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            # Camera -> ego at camera time -> global -> ego at lidar time (-> lidar), step by step with pyquaternion.
            points_cam = rng.uniform(-20, 20, size=(10, 3))
            expected = []
            for point in points_cam:
                p = Quaternion(cs["rotation"]).rotate(point) + cs["translation"]
                p = Quaternion(pose["rotation"]).rotate(p) + pose["translation"]
                p = Quaternion(lidar_pose["rotation"]).inverse.rotate(p - np.array(lidar_pose["translation"]))
                expected.append(p)
            expected = np.array(expected)
            np.testing.assert_allclose(geometry.transform_points(cam["cam2ego"], points_cam), expected, atol=1e-6)
            expected_lidar = [Quaternion(lidar_cs["rotation"]).inverse.rotate(p - np.array(lidar_cs["translation"]))
                              for p in expected]
            np.testing.assert_allclose(geometry.transform_points(cam["cam2lidar"], points_cam), expected_lidar,
                                       atol=1e-6)
            np.testing.assert_allclose(cam["intrinsics"], cs["camera_intrinsic"])
            assert (cam["width"], cam["height"]) == (sd["width"], sd["height"])

            # GT centres (ego at lidar time) through ego2img land where the devkit projects the annotations.
            ego2img = geometry.ego2img_from(cam["intrinsics"], cam["cam2ego"])
            _, boxes_cam, intrinsics = nusc.get_sample_data(sd["token"], box_vis_level=BoxVisibility.NONE)
            boxes_cam = {box.token: box for box in boxes_cam}
            pixels, depth = geometry.project_points(ego2img, info["gt_boxes"][:, :3])
            for row, ann_token in enumerate(info["gt_ann_tokens"]):
                centre_cam = boxes_cam[ann_token].center
                assert depth[row] == pytest.approx(centre_cam[2], abs=1e-6)
                if centre_cam[2] > 0.5:
                    devkit_pixel = view_points(centre_cam[:, None], intrinsics, normalize=True)[:2, 0]
                    np.testing.assert_allclose(pixels[row], devkit_pixel, atol=1e-5)
                    num_projected += 1
    assert num_projected > 10


# ------------------------------------------------------------------------------------------ evaluation edge

def gt_as_results(infos):
    """The info files' GT (ego frame) as predictions (global frame), through the project's own conversions.

    Only valid_flag boxes: the devkit drops GT without lidar/radar points, so submitting those would make them
    false positives.
    """
    results = {}
    for info in infos:
        keep = np.flatnonzero(info["valid_flag"])
        results[info["token"]] = boxes_to_results(
            info["token"], info["gt_boxes"][keep], info["gt_velocity"][keep],
            scores=np.linspace(1.0, 0.5, len(keep)), labels=[CLASS_NAMES.index(info["gt_names"][i]) for i in keep],
            ego2global=info["ego2global"], attribute_names=[info["gt_attributes"][i] for i in keep])
    return results


def test_gt_through_project_frames_scores_perfectly(synthetic_root, val_infos, nusc, tmp_path):
    assert set(name for info in val_infos for name in info["gt_names"]) == set(CLASS_NAMES), \
        "the synthetic val split must hold every class for mAP 1.0"
    results_path = write_results_json(gt_as_results(val_infos), tmp_path / "results.json")
    metrics = evaluate_results(results_path, synthetic_root, VERSION, "synthetic_val", tmp_path / "eval", nusc=nusc)
    assert metrics["mAP"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["NDS"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["mATE"] < 1e-6 and metrics["mASE"] < 1e-6 and metrics["mAOE"] < 1e-6 and metrics["mAVE"] < 1e-6
    assert all(metrics[f"AP/{name}"] == pytest.approx(1.0) for name in CLASS_NAMES)
    assert (tmp_path / "eval" / "metrics_summary.json").is_file()

    # The check has teeth: the same boxes 3 m off score poorly.
    shifted = {token: [dict(r, translation=[r["translation"][0] + 3.0, *r["translation"][1:]]) for r in rows]
               for token, rows in gt_as_results(val_infos).items()}
    metrics_shifted = evaluate_results(write_results_json(shifted, tmp_path / "shifted.json"), synthetic_root,
                                       VERSION, "synthetic_val", tmp_path / "eval_shifted", nusc=nusc)
    assert metrics_shifted["mAP"] < 0.9


def test_empty_predictions_give_zero_scores_not_a_crash(synthetic_root, val_infos, nusc, tmp_path):
    results_path = write_results_json({info["token"]: [] for info in val_infos}, tmp_path / "empty.json")
    metrics = evaluate_results(results_path, synthetic_root, VERSION, "synthetic_val", tmp_path / "eval", nusc=nusc)
    assert metrics["mAP"] == 0.0 and metrics["NDS"] == 0.0
    assert all(metrics[f"AP/{name}"] == 0.0 for name in CLASS_NAMES)
    assert metrics["mATE"] == 1.0  # the devkit's value for a class without true positives


def test_results_missing_a_sample_name_it(synthetic_root, val_infos, nusc, tmp_path):
    results = gt_as_results(val_infos)
    missing_token = val_infos[1]["token"]
    del results[missing_token]
    results_path = write_results_json(results, tmp_path / "partial.json")
    with pytest.raises(ValueError, match=f"lacks sample {missing_token}"):
        evaluate_results(results_path, synthetic_root, VERSION, "synthetic_val", tmp_path / "eval", nusc=nusc)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        evaluate_results(tmp_path / "absent.json", synthetic_root, VERSION, "synthetic_val", tmp_path / "eval",
                         nusc=nusc)


# ----------------------------------------------------------------------------------------------- bad input

def broken_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    """A copy whose tables can be edited; sensor files and maps are linked, not copied."""
    root = tmp_path / "broken"
    root.mkdir()
    for entry in synthetic_root.iterdir():
        if entry.name == VERSION:
            shutil.copytree(entry, root / VERSION)
        elif entry.is_dir():
            os.symlink(entry, root / entry.name)
    return root


def edit_table(root: Path, table: str, edit) -> None:
    path = root / VERSION / f"{table}.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def test_missing_root_version_or_table_is_named(synthetic_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        create_infos(tmp_path / "nowhere", VERSION, progress=False)
    with pytest.raises(FileNotFoundError, match="v1.0-trainval"):
        create_infos(synthetic_root, "v1.0-trainval", out_dir=tmp_path, progress=False)
    root = broken_copy(synthetic_root, tmp_path)
    (root / VERSION / "sample_annotation.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"sample_annotation\.json"):
        create_infos(root, VERSION, out_dir=tmp_path, progress=False)


@pytest.mark.parametrize("channel", ["LIDAR_TOP", "CAM_BACK"])
def test_sample_without_a_sensor_is_named(synthetic_root, tmp_path, nusc, channel):
    sample = nusc.sample[3]
    data_token = sample["data"][channel]
    root = broken_copy(synthetic_root, tmp_path)
    # No keyframe of that channel for the sample: what the devkit sees when a sweep is all there is.
    edit_table(root, "sample_data", lambda rows: [dict(r, is_key_frame=False) if r["token"] == data_token else r
                                                  for r in rows])
    with pytest.raises(ValueError, match=f"sample {sample['token']}.*{channel}"):
        create_infos(root, VERSION, out_dir=tmp_path, progress=False)


def test_unknown_category_is_named_not_dropped(synthetic_root, tmp_path, nusc):
    root = broken_copy(synthetic_root, tmp_path)
    edit_table(root, "category", lambda rows: [dict(r, name="vehicle.kar") if r["name"] == "vehicle.car" else r
                                               for r in rows])
    car_anns = {a["token"] for a in nusc.sample_annotation if a["category_name"] == "vehicle.car"}
    with pytest.raises(ValueError, match="vehicle.kar") as error:
        create_infos(root, VERSION, out_dir=tmp_path, progress=False)
    named = re.search(r"sample_annotation (\w+)", str(error.value)).group(1)
    assert named in car_anns
    assert "vehicle.car" in str(error.value)  # the list of what the devkit knows


def test_sample_without_annotations_and_unknown_velocity(synthetic_root, tmp_path, nusc):
    sample = nusc.sample[2]
    dropped = set(sample["anns"])
    # An annotation cut off from its track: the devkit cannot estimate its velocity (NaN).
    isolated = next(a for a in nusc.sample_annotation if a["sample_token"] == nusc.sample[6]["token"]
                    and a["category_name"] == "vehicle.car")
    assert dropped
    root = broken_copy(synthetic_root, tmp_path)

    def edit(rows):
        # Unlink the tracks around the removed annotations, so the devkit's box_velocity finds no dangling token.
        kept = [r for r in rows if r["token"] not in dropped]
        cut = dropped | {isolated["token"]}
        kept = [dict(r, prev="" if r["prev"] in cut else r["prev"], next="" if r["next"] in cut else r["next"])
                for r in kept]
        return [dict(r, prev="", next="") if r["token"] == isolated["token"] else r for r in kept]

    edit_table(root, "sample_annotation", edit)
    paths = create_infos(root, VERSION, out_dir=tmp_path, progress=False)
    infos = {info["token"]: info for path in paths.values() for info in load_infos(path)[1]}
    empty = infos[sample["token"]]
    assert empty["gt_boxes"].shape == (0, 7) and empty["gt_velocity"].shape == (0, 2)
    assert empty["gt_names"] == [] and empty["valid_flag"].shape == (0,) and empty["valid_flag"].dtype == bool
    with_isolated = infos[isolated["sample_token"]]
    row = with_isolated["gt_ann_tokens"].index(isolated["token"])
    assert not with_isolated["gt_velocity_valid"][row]
    np.testing.assert_array_equal(with_isolated["gt_velocity"][row], [0.0, 0.0])
    assert with_isolated["gt_velocity_valid"].sum() == len(with_isolated["gt_ann_tokens"]) - 1


def test_corrupt_or_missing_image_is_named(synthetic_root, tmp_path, nusc):
    sd = nusc.get("sample_data", nusc.sample[1]["data"]["CAM_FRONT_LEFT"])
    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    image = root / sd["filename"]
    image.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=re.escape(str(image))):
        create_infos(root, VERSION, out_dir=tmp_path, progress=False)
    image.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(image))):
        create_infos(root, VERSION, out_dir=tmp_path, progress=False)


def test_load_infos_rejects_other_version_and_other_formats(info_files, tmp_path):
    path = info_files["synthetic_val"]
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{VERSION}.*v1\.0-trainval"):
        load_infos(path, expected_version="v1.0-trainval")
    content = json.loads(path.read_text())

    def write_variant(name, edit):
        variant = json.loads(json.dumps(content))
        edit(variant)
        variant_path = tmp_path / name
        variant_path.write_text(json.dumps(variant))
        return variant_path

    with pytest.raises(ValueError, match="format_version"):
        load_infos(write_variant("old.json", lambda c: c["metadata"].update(format_version=0)))
    with pytest.raises(ValueError, match="not a bevdeform info file"):
        load_infos(write_variant("other.json", lambda c: c["metadata"].update(format="mmdet3d")))
    token = content["infos"][0]["token"]
    with pytest.raises(ValueError, match=f"{token}.*cam2ego|{token}.*lacks"):
        load_infos(write_variant("nokey.json", lambda c: c["infos"][0]["cams"]["CAM_BACK"].pop("cam2ego")))
    with pytest.raises(ValueError, match=f"{token}.*gt_velocity"):
        load_infos(write_variant("short.json", lambda c: c["infos"][0]["gt_velocity"].append([0.0, 0.0])))
    with pytest.raises(FileNotFoundError):
        load_infos(tmp_path / "absent.json")
