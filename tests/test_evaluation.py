"""bevdeform.evaluation without a dataset: result dicts, the results file, the metrics table.

The devkit scoring itself (GT as predictions -> NDS 1.0, empty predictions, missing samples) runs on the synthetic
set in test_infos.py.
"""

import json
import math

import numpy as np
import pytest
import torch
from nuscenes.eval.detection.data_classes import DetectionBox
from nuscenes.utils.data_classes import Box
from pyquaternion import Quaternion

from bevdeform import geometry
from bevdeform.data.infos import CLASS_NAMES
from bevdeform.evaluation import (
    CAMERA_ONLY_META, DEFAULT_ATTRIBUTES, MAX_BOXES_PER_SAMPLE, attribute_names_of, boxes_to_results,
    format_metrics_table, write_results_json,
)


def make_predictions(rng, n):
    boxes = np.concatenate([rng.uniform(-50, 50, size=(n, 2)), rng.uniform(-1, 2, size=(n, 1)),
                            rng.uniform(0.4, 10, size=(n, 3)), rng.uniform(-math.pi, math.pi, size=(n, 1))], axis=1)
    return boxes, rng.normal(size=(n, 2)) * 5, rng.uniform(size=n), rng.integers(0, len(CLASS_NAMES), size=n)


def test_results_are_global_boxes_as_the_devkit_moves_them():
    rng = np.random.default_rng(0)
    ego2global = geometry.transform_from(geometry.yaw_to_quaternion(2.1), [411.3, 1180.9, 0.0])
    boxes, velocities, scores, labels = make_predictions(rng, 30)
    results = boxes_to_results("tok", boxes, velocities, scores, labels, ego2global)
    assert len(results) == 30
    assert [r["detection_score"] for r in results] == sorted(scores.tolist(), reverse=True)
    by_score = {r["detection_score"]: r for r in results}
    for box, velocity, score, label in zip(boxes, velocities, scores, labels):
        result = by_score[float(score)]
        devkit_box = Box(box[:3], box[3:6], Quaternion(axis=[0, 0, 1], angle=box[6]),
                         velocity=(velocity[0], velocity[1], 0.0))
        devkit_box.rotate(Quaternion(matrix=ego2global[:3, :3]))
        devkit_box.translate(ego2global[:3, 3])
        np.testing.assert_allclose(result["translation"], devkit_box.center, atol=1e-9)
        np.testing.assert_allclose(result["size"], box[3:6])
        q = devkit_box.orientation.elements
        assert min(np.abs(np.subtract(result["rotation"], q)).max(), np.abs(np.add(result["rotation"], q)).max()) < 1e-9
        np.testing.assert_allclose(result["velocity"], devkit_box.velocity[:2], atol=1e-9)
        name = CLASS_NAMES[label]
        assert result["detection_name"] == name and result["attribute_name"] == DEFAULT_ATTRIBUTES[name]
        # The devkit's own parser accepts it.
        DetectionBox.deserialize(dict(result, ego_translation=[0.0, 0.0, 0.0], num_pts=-1))


def test_top_500_kept_nan_dropped_torch_accepted():
    rng = np.random.default_rng(1)
    boxes, velocities, scores, labels = make_predictions(rng, 700)
    boxes[5, 0] = np.nan
    velocities[6, 1] = np.inf
    boxes[7, 3] = 0.0  # zero width: no IoU to score
    scores[5] = scores[6] = scores[7] = 2.0  # would be the top three
    with pytest.warns(UserWarning, match="sample tok: dropped 3 of 700"):
        results = boxes_to_results("tok", torch.from_numpy(boxes).float(), torch.from_numpy(velocities),
                                   torch.from_numpy(scores), torch.from_numpy(labels), np.eye(4))
    assert len(results) == MAX_BOXES_PER_SAMPLE
    kept_scores = [r["detection_score"] for r in results]
    usable = np.delete(scores, [5, 6, 7])
    np.testing.assert_allclose(kept_scores, np.sort(usable)[::-1][:500], rtol=1e-7)
    assert all(np.all(np.isfinite(r["translation"] + r["velocity"] + r["size"])) for r in results)


def test_given_attributes_no_velocity_and_bad_arguments():
    boxes = np.array([[1.0, 2.0, 0.5, 2.0, 4.5, 1.6, 0.3], [5.0, -2.0, 0.5, 0.6, 0.7, 1.8, -1.0]])
    results = boxes_to_results("tok", boxes, None, [0.9, 0.8], [0, 8], np.eye(4),
                               attribute_names=["vehicle.moving", "pedestrian.standing"])
    assert [r["attribute_name"] for r in results] == ["vehicle.moving", "pedestrian.standing"]
    assert results[0]["velocity"] == [0.0, 0.0]
    assert boxes_to_results("tok", np.zeros((0, 7)), np.zeros((0, 2)), [], [], np.eye(4)) == []
    with pytest.raises(ValueError, match="sample tok: boxes_ego has 2 rows"):
        boxes_to_results("tok", boxes, None, [0.9], [0, 8], np.eye(4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        boxes_to_results("tok", boxes, None, [0.9, 0.8], [0, 10], np.eye(4))


def official_attribute(name, velocity_global_xy):
    """mmdet3d 0.17 NuScenesDataset._format_bbox's choice, written out as its if-chain (the official semantics)."""
    defaults = {"car": "vehicle.parked", "pedestrian": "pedestrian.moving", "trailer": "vehicle.parked",
                "truck": "vehicle.parked", "bus": "vehicle.moving", "motorcycle": "cycle.without_rider",
                "construction_vehicle": "vehicle.parked", "bicycle": "cycle.without_rider", "barrier": "",
                "traffic_cone": ""}
    if math.sqrt(velocity_global_xy[0] ** 2 + velocity_global_xy[1] ** 2) > 0.2:
        if name in ["car", "construction_vehicle", "bus", "truck", "trailer"]:
            return "vehicle.moving"
        if name in ["bicycle", "motorcycle"]:
            return "cycle.with_rider"
        return defaults[name]
    if name == "pedestrian":
        return "pedestrian.standing"
    if name == "bus":
        return "vehicle.stopped"
    return defaults[name]


def test_attributes_from_velocity_are_the_official_choice_in_the_global_frame():
    rng = np.random.default_rng(7)
    n = 400
    labels = rng.integers(0, len(CLASS_NAMES), size=n)
    # Speeds around the 0.2 m/s threshold (a hair either side of it included) and well above it.
    speed = np.concatenate([rng.uniform(0.0, 0.4, n // 2), rng.uniform(0.4, 15.0, n - n // 2)])
    speed[:10] = 0.2 - 1e-6
    speed[10:20] = 0.2 + 1e-6
    heading = rng.uniform(-math.pi, math.pi, n)
    velocities_ego = np.stack([speed * np.cos(heading), speed * np.sin(heading)], axis=1)  # (n, 2)
    ego2global = np.eye(4)
    ego2global[:3, :3] = Quaternion(axis=[0, 0, 1], degrees=131.0).rotation_matrix
    ego2global[:3, 3] = [600.0, 1700.0, 0.0]
    boxes, _, scores, _ = make_predictions(rng, n)
    attributes = attribute_names_of(torch.from_numpy(labels), torch.from_numpy(velocities_ego), rule="velocity")
    results = boxes_to_results("tok", boxes, velocities_ego, scores, labels, ego2global, attribute_names=attributes)
    # The official code decides on the global-frame velocity of each result.
    for result in results:
        assert result["attribute_name"] == official_attribute(result["detection_name"], result["velocity"])
    assert {"vehicle.moving", "vehicle.stopped", "pedestrian.standing", "cycle.with_rider", "vehicle.parked",
            "cycle.without_rider", "pedestrian.moving", ""} <= set(attributes)
    assert attribute_names_of(labels, velocities_ego) == [DEFAULT_ATTRIBUTES[CLASS_NAMES[k]] for k in labels]
    assert attribute_names_of(labels, None, rule="velocity") == [official_attribute(CLASS_NAMES[k], (0, 0))
                                                                 for k in labels]
    with pytest.raises(ValueError, match="attribute rule 'speed'"):
        attribute_names_of(labels, velocities_ego, rule="speed")
    with pytest.raises(ValueError, match="3 labels but 2 velocities"):
        attribute_names_of([0, 1, 2], np.zeros((2, 2)), rule="velocity")


def test_validation_results_carry_the_configured_attribute_rule():
    from bevdeform.lit import BEVFormerModule

    class EgoFrameDetector(torch.nn.Module):
        input_frame = "ego"

    boxes = torch.tensor([[1.0, 2.0, 0.5, 1.9, 4.5, 1.6, 0.3, 3.0, -1.0],   # moving car
                          [5.0, -2.0, 0.5, 0.6, 0.7, 1.8, -1.0, 0.0, 0.1],  # standing pedestrian
                          [9.0, 4.0, 1.5, 2.9, 11.0, 3.4, 2.0, 0.05, 0.0]], dtype=torch.float64)  # stopped bus
    found = [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 8, 3])}]
    batch = {"sample_token": ["s0"], "ego2global": torch.eye(4, dtype=torch.float64)[None, None]}
    by_velocity = BEVFormerModule(EgoFrameDetector(), attribute_rule="velocity").results_of_batch(batch, found)["s0"]
    assert [r["attribute_name"] for r in by_velocity] == ["vehicle.moving", "pedestrian.standing", "vehicle.stopped"]
    default = BEVFormerModule(EgoFrameDetector()).results_of_batch(batch, found)["s0"]
    assert [r["attribute_name"] for r in default] == ["vehicle.parked", "pedestrian.moving", "vehicle.moving"]
    with pytest.raises(ValueError, match="attribute_rule='fast'"):
        BEVFormerModule(EgoFrameDetector(), attribute_rule="fast")


def test_results_file_layout_and_nan_rejected(tmp_path):
    results = {"a": boxes_to_results("a", [[1, 2, 0, 2, 4, 1.5, 0]], [[1, 0]], [0.5], [0], np.eye(4)), "b": []}
    path = write_results_json(results, tmp_path / "sub" / "results.json")
    content = json.loads(path.read_text())
    assert content["meta"] == CAMERA_ONLY_META and content["meta"]["use_camera"] is True
    assert content["results"] == results
    results["a"][0]["detection_score"] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        write_results_json(results, tmp_path / "nan.json")


def test_format_metrics_table():
    metrics = {"mAP": 0.25, "NDS": 0.3, "mATE": 0.7, "mASE": 0.3, "mAOE": 0.5, "mAVE": 0.9, "mAAE": 0.2}
    metrics.update({f"AP/{name}": 0.1 * i for i, name in enumerate(CLASS_NAMES)})
    table = format_metrics_table(metrics)
    assert table.splitlines()[0].startswith("mAP 0.2500  NDS 0.3000  mATE 0.7000")
    assert "traffic_cone          0.9000" in table
    assert len(table.splitlines()) == 2 + len(CLASS_NAMES)
