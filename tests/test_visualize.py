"""Visualisation: the BEV map puts boxes where their coordinates say, camera overlays clip at the near plane, the
pictures, animations and metric curves of a sample and a scene are written with the expected sizes.

Data: a tiny synthetic nuScenes set (1 train + 1 val scene of 3 keyframes, 240x135 images); predictions from a
results JSON made of the GT (shifted 0.3 m), or from a small random model built from bev_nano with overrides.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bevdeform import geometry
from bevdeform.data.infos import CLASS_NAMES
from bevdeform.visualize import (CLASS_COLORS_BGR, FrameBoxes, boxes_from_results, ego_xy_to_bev_pixels,
                                 project_box_edges, render_bev, render_metric_curves, visualize, write_animation)

REPO = Path(__file__).resolve().parent.parent
VERSION = "v1.0-synthetic"
SMALL_MODEL = ["model.decoder.num_queries=50", "model.max_detections=40", "model.encoder.num_layers=1",
               "model.decoder.num_layers=2", "data.image_size_hw=[64,112]", "model.encoder.bev_h=16",
               "model.encoder.bev_w=16"]


@pytest.fixture(autouse=True)
def _one_thread():
    # The model of the script test runs faster on one thread than on two contended ones (see test_export.py).
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(data_root, val infos, results JSON path): GT of the val split as predictions, 0.3 m off in x."""
    from bevdeform.data.infos import create_infos, load_infos
    from bevdeform.data.synthetic import write_synthetic_nuscenes
    from bevdeform.evaluation import boxes_to_results, write_results_json

    root = tmp_path_factory.mktemp("viz_synthetic")
    data_root = write_synthetic_nuscenes(root / "data", num_scenes=1, num_val_scenes=1, samples_per_scene=3,
                                         scale=0.15, progress=False)
    paths = create_infos(data_root, VERSION, progress=False)
    _, infos = load_infos(paths["synthetic_val"])
    results = {}
    for info in infos:
        keep = [i for i, name in enumerate(info["gt_names"]) if name in CLASS_NAMES]
        boxes = info["gt_boxes"][keep] + np.array([0.3, 0, 0, 0, 0, 0, 0])
        labels = [CLASS_NAMES.index(info["gt_names"][i]) for i in keep]
        scores = np.linspace(0.95, 0.2, len(keep))
        results[info["token"]] = boxes_to_results(info["token"], boxes, info["gt_velocity"][keep], scores, labels,
                                                  info["ego2global"])
    results_path = write_results_json(results, root / "results_nusc.json")
    return Path(data_root), infos, results_path


def _colour_mask(image: np.ndarray, colour_bgr, tolerance: int = 10) -> np.ndarray:
    return np.all(np.abs(image.astype(np.int32) - np.array(colour_bgr)) <= tolerance, axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Bird's-eye view geometry, checked on the pixels
# ----------------------------------------------------------------------------------------------------------------
def test_bev_pixel_map_puts_the_ego_at_the_centre_forward_up_left_left():
    pixels = ego_xy_to_bev_pixels(np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]), size_px=400, range_m=50.0)
    np.testing.assert_allclose(pixels[0], [199.5, 199.5])
    np.testing.assert_allclose(pixels[1], [199.5, 159.5])  # 10 m forward: 40 px up
    np.testing.assert_allclose(pixels[2], [159.5, 199.5])  # 10 m left: 40 px left


@pytest.mark.parametrize("yaw", [0.0, math.pi / 2, 0.6])
def test_bev_box_lands_where_its_coordinates_say(yaw):
    size_px, range_m = 400, 50.0  # 4 px per metre
    box = np.array([[20.0, -10.0, 0.8, 2.0, 6.0, 1.6, yaw, 0.0, 0.0]])  # 20 m ahead, 10 m right
    pred = FrameBoxes(box, np.array([0]), np.array([0.9]))
    image = render_bev(None, pred, CLASS_NAMES, size_px=size_px, range_m=range_m, legend=False, show_scores=False)
    assert image.shape == (size_px, size_px, 3) and image.dtype == np.uint8
    car = _colour_mask(image, CLASS_COLORS_BGR["car"])
    rows, cols = np.nonzero(car)
    assert len(rows) > 20
    # Every car-coloured pixel lies on the box's footprint (up to the 2 px line), and its extent is the footprint's.
    corners_px = ego_xy_to_bev_pixels(geometry.box_corners(box[:, :7])[0, [0, 1, 5, 4], :2], size_px, range_m)
    low, high = corners_px.min(axis=0), corners_px.max(axis=0)
    assert cols.min() >= low[0] - 2 and cols.max() <= high[0] + 2
    assert rows.min() >= low[1] - 2 and rows.max() <= high[1] + 2
    assert cols.min() <= low[0] + 2 and cols.max() >= high[0] - 2
    assert rows.min() <= low[1] + 2 and rows.max() >= high[1] - 2
    # The heading line runs from the centre to the front edge: a pixel 3/4 of the way to the front is drawn, the
    # mirror point towards the back is not.
    centre = ego_xy_to_bev_pixels(box[0, :2], size_px, range_m)
    ahead = box[0, :2] + 0.75 * 3.0 * np.array([math.cos(yaw), math.sin(yaw)])
    behind = box[0, :2] - 0.75 * 3.0 * np.array([math.cos(yaw), math.sin(yaw)])
    for point, expected in ((ahead, True), (behind, False)):
        u, v = np.round(ego_xy_to_bev_pixels(point, size_px, range_m)).astype(int)
        assert bool(car[v - 1:v + 2, u - 1:u + 2].any()) == expected, (point, expected)
    # Nothing at the mirror image across the ego's x axis (a y sign error would put it there).
    mirror = np.round(ego_xy_to_bev_pixels(np.array([20.0, 10.0]), size_px, range_m)).astype(int)
    assert not car[mirror[1] - 6:mirror[1] + 7, mirror[0] - 6:mirror[0] + 7].any()
    assert np.all(np.isfinite(centre))


def test_bev_draws_velocity_arrows_ground_truth_fills_and_applies_the_score_threshold():
    size_px, range_m = 400, 50.0
    gt = FrameBoxes(np.array([[0.0, 20.0, 0.5, 0.6, 0.6, 1.7, 0.0, 5.0, 0.0]]), np.array([8]))  # pedestrian, 5 m/s
    pred = FrameBoxes(np.array([[-20.0, 0.0, 0.5, 2.0, 4.5, 1.6, 0.0, 0.0, 0.0]] * 2), np.array([0, 1]),
                      np.array([0.8, 0.1]))
    image = render_bev(gt, pred, CLASS_NAMES, size_px=size_px, range_m=range_m, score_threshold=0.3, legend=False,
                       show_scores=False)
    pedestrian = _colour_mask(image, CLASS_COLORS_BGR["pedestrian"])
    tip = np.round(ego_xy_to_bev_pixels(np.array([5.0, 20.0]), size_px, range_m)).astype(int)  # after 1 s
    assert pedestrian[tip[1] - 2:tip[1] + 3, tip[0] - 2:tip[0] + 3].any()
    # The filled GT footprint tints its inside towards the class colour.
    inside = np.round(ego_xy_to_bev_pixels(np.array([0.0, 20.0]), size_px, range_m)).astype(int)
    assert image[inside[1], inside[0], 2] > 60  # red channel of the pedestrian colour, over a dark background
    assert _colour_mask(image, CLASS_COLORS_BGR["car"]).any()
    assert not _colour_mask(image, CLASS_COLORS_BGR["truck"]).any()  # score 0.1 < 0.3


# ----------------------------------------------------------------------------------------------------------------
# Camera projection
# ----------------------------------------------------------------------------------------------------------------
def _forward_camera_ego2img(focal: float = 100.0, centre: float = 50.0) -> np.ndarray:
    intrinsics = np.array([[focal, 0, centre], [0, focal, centre], [0, 0, 1.0]])
    cam2ego = np.eye(4)
    cam2ego[:3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)  # columns: cam x, y, z in ego
    return geometry.ego2img_from(intrinsics, cam2ego)


def test_projected_box_edges_match_the_projection_and_clip_at_the_near_plane():
    ego2img = _forward_camera_ego2img()
    in_front = np.array([[10.0, 1.0, 0.0, 2.0, 4.0, 1.5, 0.3]])
    segments = project_box_edges(in_front, ego2img)[0]
    assert len(segments) == 12
    corners = geometry.box_corners(in_front)[0]
    expected, _ = geometry.project_points(ego2img, corners)
    np.testing.assert_allclose(segments[0][0], expected[0], atol=1e-9)
    np.testing.assert_allclose(segments[0][1], expected[1], atol=1e-9)

    # A box from 1 m behind to 3 m in front of the camera: the back face is dropped, the 4 long edges are cut at
    # the near plane, the front face stays.
    straddling = np.array([[1.0, 0.5, 0.0, 2.0, 4.0, 1.5, 0.0]])
    near_m = 0.1
    segments = project_box_edges(straddling, ego2img, near_m=near_m)[0]
    assert len(segments) == 8
    for start, end in segments:
        assert np.all(np.isfinite(start)) and np.all(np.isfinite(end))
    # A point cut at the near plane projects at u = c + f * (-y) / near; the box spans y in [-0.5, 1.5], so the
    # cut points sit at u = 50 - 1500 and u = 50 + 500 (the points of the front face, 3 m away, within 50 px).
    cut_u = sorted({round(float(p[0]), 6) for segment in segments for p in segment if abs(p[0] - 50) > 400})
    np.testing.assert_allclose(cut_u, [50.0 - 100.0 * 1.5 / near_m, 50.0 + 100.0 * 0.5 / near_m], atol=1e-6)
    behind = np.array([[-5.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0]])
    assert project_box_edges(behind, ego2img)[0] == []


def test_results_boxes_come_back_in_the_ego_frame(synthetic):
    _, infos, results_path = synthetic
    info = infos[1]
    results = json.loads(Path(results_path).read_text())["results"][info["token"]]
    frame = boxes_from_results(results, info["ego2global"])
    keep = [i for i, name in enumerate(info["gt_names"]) if name in CLASS_NAMES]
    expected = info["gt_boxes"][keep] + np.array([0.3, 0, 0, 0, 0, 0, 0])
    order = np.argsort(-np.linspace(0.95, 0.2, len(keep)), kind="stable")
    np.testing.assert_allclose(frame.boxes[:, :6], expected[order, :6], atol=1e-6)
    yaw_error = np.angle(np.exp(1j * (frame.boxes[:, 6] - expected[order, 6])))
    np.testing.assert_allclose(yaw_error, 0.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Files: a sample, a scene and its animation, metric curves
# ----------------------------------------------------------------------------------------------------------------
def test_scene_from_results_writes_pictures_of_the_expected_size_an_mp4_and_curves(synthetic, tmp_path):
    data_root, infos, results_path = synthetic
    written = visualize(tmp_path, results=results_path, data_root=data_root, version=VERSION,
                        scene=infos[0]["scene_name"], bev_size_px=200, tile_width_px=160, animation="mp4",
                        curves=True, log=lambda message: None)
    pngs = [p for p in written if p.suffix == ".png" and p.parent == tmp_path]
    assert len(pngs) == 3 * len(infos)
    tile_h = round(160 * 135 / 240)  # the 240x135 images at 160 px wide
    for path in pngs:
        image = cv2.imread(str(path))
        kind = path.stem.rsplit("_", 1)[1]
        expected = {"bev": (200, 200), "cameras": (2 * tile_h, 3 * 160), "frame": (2 * tile_h, 2 * tile_h + 480)}[kind]
        assert image.shape[:2] == expected, path
    video_path = tmp_path / f"{infos[0]['scene_name']}.mp4"
    assert video_path in written
    capture = cv2.VideoCapture(str(video_path))
    count = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        count += 1
        assert frame.shape[:2] == (2 * tile_h, 2 * tile_h + 480)  # even already: no padding
    capture.release()
    assert count == len(infos)
    curves = [p for p in written if p.parent.name == "curves"]
    names = {p.name for p in curves}
    assert {"summary.png", "car_pr.png", "car_tp.png", "dist_pr_2.0.png"} <= names
    assert all(p.stat().st_size > 1000 for p in curves)
    # The same curves from the evaluation folder alone.
    again = render_metric_curves(tmp_path / "curves" / "metrics_summary.json",
                                 tmp_path / "curves" / "metrics_details.json", tmp_path / "again")
    assert {p.name for p in again} == names


def test_sample_from_a_model_and_the_script(synthetic, tmp_path, monkeypatch):
    data_root, infos, _ = synthetic
    token = infos[2]["token"]
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import visualize as script
    finally:
        sys.path.pop(0)
    code = script.main(["--config", "bev_nano", *SMALL_MODEL, "--data-root", str(data_root), "--version", VERSION,
                        "--sample", token, "--score-threshold", "0", "--bev-size", "120", "--tile-width", "96",
                        "--out", str(tmp_path)])
    assert code == 0
    written = sorted(tmp_path.glob("*.png"))
    assert [p.stem.rsplit("_", 1)[1] for p in written] == ["bev", "cameras", "frame"]
    assert all(token[:12] in p.name for p in written)
    assert cv2.imread(str(written[0])).shape == (120, 120, 3)
    assert not list(tmp_path.glob("*.mp4"))  # a single sample gets no animation
    assert script.main(["--results", str(tmp_path / "missing.json"), "--data-root", str(data_root),
                        "--out", str(tmp_path)]) == 2


def test_gif_animation_and_errors(tmp_path):
    frames = [np.full((21, 31, 3), value, dtype=np.uint8) for value in (0, 128, 255)]
    gif = write_animation(frames, tmp_path / "a.gif", fps=4)
    from PIL import Image

    with Image.open(gif) as picture:
        assert picture.size == (31, 21) and picture.n_frames == 3
    mp4 = write_animation(frames, tmp_path / "a.mp4")
    capture = cv2.VideoCapture(str(mp4))
    ok, frame = capture.read()
    capture.release()
    assert ok and frame.shape[:2] == (22, 32)  # padded to even sides for the codec
    with pytest.raises(ValueError, match="must end in .mp4 or .gif"):
        write_animation(frames, tmp_path / "a.avi")
    with pytest.raises(ValueError, match="different sizes"):
        write_animation([frames[0], np.zeros((4, 4, 3), np.uint8)], tmp_path / "b.gif")
