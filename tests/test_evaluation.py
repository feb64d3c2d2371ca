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
    CAMERA_ONLY_META, DEFAULT_ATTRIBUTES, MAX_BOXES_PER_SAMPLE, boxes_to_results, format_metrics_table,
    write_results_json,
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
