"""Camera data: transforms (resize geometry, normalise, pad, jitter), the scene sampler, the dataset and collate."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from bevdeform.data.samplers import SceneOrderedDistributedSampler, assign_scenes_to_ranks
from bevdeform.data.transforms import (
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    ImageDecodeError,
    PhotoMetricDistortion,
    denormalize_chw_to_bgr,
    jpeg_reduction_factor,
    normalize_bgr_into_chw,
    padded_size,
    read_image_bgr,
    resize_image,
    resize_pixel_coords,
    scale_intrinsics,
)


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------

def blob_image(size_hw: tuple[int, int], centres_uv: np.ndarray, sigma_px: float) -> np.ndarray:
    """uint8 BGR image of Gaussian blobs at sub-pixel centres (integer coordinates = pixel centres)."""
    height, width = size_hw
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    intensity = np.zeros((height, width))
    for u, v in centres_uv:
        intensity += np.exp(-((cols - u) ** 2 + (rows - v) ** 2) / (2 * sigma_px**2))
    grey = np.clip(np.rint(20 + 230 * intensity), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def separated_centres(size_hw: tuple[int, int], rng: np.random.Generator, margin_px: float) -> np.ndarray:
    """Six sub-pixel centres (u, v) on a jittered 3x2 grid, so that blobs never overlap."""
    height, width = size_hw
    grid_u = np.linspace(margin_px, width - margin_px, 3)
    grid_v = np.linspace(margin_px, height - margin_px, 2)
    centres = np.stack(np.meshgrid(grid_u, grid_v), axis=-1).reshape(-1, 2)  # (2, 3, 2) -> (6, 2)
    return centres + rng.uniform(-3, 3, size=centres.shape)


def blob_centroids(image: np.ndarray, approx_uv: np.ndarray, radius_px: float) -> np.ndarray:
    """Intensity centroids (n, 2) around approximate centres, background removed; pixel centres are integers."""
    grey = image[:, :, 1].astype(np.float64) - 20.0
    grey[grey < 0] = 0
    out = []
    for u, v in approx_uv:
        u0, u1 = int(np.floor(u - radius_px)), int(np.ceil(u + radius_px)) + 1
        v0, v1 = int(np.floor(v - radius_px)), int(np.ceil(v + radius_px)) + 1
        patch = grey[v0:v1, u0:u1]
        rows, cols = np.mgrid[v0:v1, u0:u1]
        out.append(((patch * cols).sum() / patch.sum(), (patch * rows).sum() / patch.sum()))
    return np.array(out)


def test_scale_intrinsics_moves_projections_like_the_pixel_map():
    rng = np.random.default_rng(0)
    intrinsics = np.array([[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]])
    points_cam = rng.uniform([-5, -3, 2], [5, 3, 40], size=(50, 3))
    for scale_x, scale_y in [(0.5, 0.5), (0.3, 0.37), (1.25, 0.8)]:
        projected = (intrinsics @ points_cam.T).T
        uv = projected[:, :2] / projected[:, 2:]
        projected_resized = (scale_intrinsics(intrinsics, scale_x, scale_y) @ points_cam.T).T
        uv_resized = projected_resized[:, :2] / projected_resized[:, 2:]
        np.testing.assert_allclose(uv_resized, resize_pixel_coords(uv, scale_x, scale_y), atol=1e-9)
        expected_cx = (816.3 + 0.5) * scale_x - 0.5
        assert scale_intrinsics(intrinsics, scale_x, scale_y)[0, 2] == pytest.approx(expected_cx)


@pytest.mark.parametrize("source_hw, target_hw", [((360, 640), (180, 320)),  # area, factor 0.5
                                                   ((360, 640), (100, 200)),  # area, below half
                                                   ((360, 640), (288, 512)),  # linear, 0.8
                                                   ((180, 320), (234, 416))])  # linear, enlarge
def test_cv2_resize_follows_the_half_pixel_map(source_hw, target_hw):
    # Checks the convention on real pixels: blob centroids move exactly as resize_pixel_coords says.
    rng = np.random.default_rng(1)
    centres = separated_centres(source_hw, rng, margin_px=40)
    image = blob_image(source_hw, centres, sigma_px=4.0)
    resized = resize_image(image, target_hw)
    assert resized.shape == (*target_hw, 3)
    scale_x, scale_y = target_hw[1] / source_hw[1], target_hw[0] / source_hw[0]
    expected = resize_pixel_coords(centres, scale_x, scale_y)
    measured = blob_centroids(resized, expected, radius_px=16 * max(scale_x, scale_y))
    # Scaling cx by sx alone would be off by 0.5 * |1 - s| >= 0.1 px here.
    np.testing.assert_allclose(measured, expected, atol=0.03)


def test_reduced_jpeg_decode_has_the_geometry_of_a_resize(tmp_path):
    rng = np.random.default_rng(2)
    source_hw = (360, 640)
    centres = separated_centres(source_hw, rng, margin_px=40)
    path = tmp_path / "blobs.jpg"
    cv2.imwrite(str(path), blob_image(source_hw, centres, sigma_px=6.0), [cv2.IMWRITE_JPEG_QUALITY, 98])
    assert jpeg_reduction_factor(source_hw, (90, 160)) == 4
    assert jpeg_reduction_factor(source_hw, (91, 160)) == 2
    assert jpeg_reduction_factor((900, 1600), (900, 1600)) == 1
    reduced = read_image_bgr(str(path), source_hw, (90, 160), reduced_jpeg_decode=True)
    assert reduced.shape == (90, 160, 3)
    expected = resize_pixel_coords(centres, 0.25, 0.25)
    np.testing.assert_allclose(blob_centroids(reduced, expected, radius_px=5), expected, atol=0.03)
    # Same pixels as a full decode followed by INTER_AREA, to JPEG rounding.
    full = read_image_bgr(str(path), source_hw, (90, 160), reduced_jpeg_decode=False)
    assert full.shape == (*source_hw, 3)
    area = cv2.resize(full, (160, 90), interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.astype(np.int16) - area).mean() < 0.5


def test_normalize_pad_rgb_order():
    image_bgr = np.zeros((5, 7, 3), dtype=np.uint8)
    image_bgr[..., 0], image_bgr[..., 1], image_bgr[..., 2] = 10, 100, 200  # B, G, R
    assert padded_size((5, 7), 32) == (32, 32)
    assert padded_size((450, 800), 32) == (480, 800)
    out = np.zeros((3, 32, 32), dtype=np.float32)
    normalize_bgr_into_chw(image_bgr, out)
    for channel, value in enumerate((200, 100, 10)):  # RGB
        expected = (value - IMAGENET_MEAN_RGB[channel]) / IMAGENET_STD_RGB[channel]
        np.testing.assert_allclose(out[channel, :5, :7], expected, rtol=1e-6)
    assert not out[:, 5:, :].any() and not out[:, :, 7:].any()  # padding right/bottom stays 0
    np.testing.assert_array_equal(denormalize_chw_to_bgr(out[:, :5, :7]), image_bgr)


def test_photometric_distortion_is_seeded_and_leaves_input_alone():
    rng_image = np.random.default_rng(3)
    image = rng_image.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    original = image.copy()
    jitter = PhotoMetricDistortion(channel_swap=True)
    first = [jitter(image, rng) for rng in [np.random.default_rng(7)] for _ in range(6)]
    second = [jitter(image, rng) for rng in [np.random.default_rng(7)] for _ in range(6)]
    for a, b in zip(first, second):
        assert a.dtype == np.float32 and a.shape == image.shape
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(image, original)
    assert any(np.abs(out - image).max() > 1 for out in first)
    with pytest.raises(ValueError, match="contrast_range"):
        PhotoMetricDistortion(contrast_range=(1.5, 0.5))


def test_read_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image_bgr(str(missing), (32, 48), (32, 48))
    good = tmp_path / "good.jpg"
    cv2.imwrite(str(good), np.full((32, 48, 3), 128, dtype=np.uint8))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated.jpg"):
        read_image_bgr(str(truncated), (32, 48), (32, 48))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match="garbage.png"):
        read_image_bgr(str(garbage), (32, 48), (32, 48))
    with pytest.raises(ImageDecodeError, match="good.jpg.*expected"):
        read_image_bgr(str(good), (64, 48), (32, 48))


# ----------------------------------------------------------------------------------------------------------------
# Scene-ordered sampler
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_replicas", [1, 2, 3, 5, 12])
def test_scene_sampler_covers_every_sample_once_and_keeps_scenes_whole(num_replicas):
    rng = np.random.default_rng(num_replicas)
    lengths = rng.integers(1, 15, size=9)
    scene_ids = [f"scene-{scene:04d}" for scene, length in enumerate(lengths) for _ in range(length)]
    samplers = [SceneOrderedDistributedSampler(scene_ids, num_replicas, rank) for rank in range(num_replicas)]
    yielded = [list(sampler) for sampler in samplers]
    assert sorted(index for indices in yielded for index in indices) == list(range(len(scene_ids)))
    assert [len(sampler) for sampler in samplers] == [len(indices) for indices in yielded]
    owner = {}
    for rank, indices in enumerate(yielded):
        assert indices == sorted(indices)  # temporal (dataset) order within the rank
        for index in indices:
            assert owner.setdefault(scene_ids[index], rank) == rank  # a scene never spans two ranks
    loads = [len(indices) for indices in yielded]
    if num_replicas <= len(lengths):
        assert max(loads) - min(loads) <= lengths.max()
    # Deterministic: a second construction gives the same assignment.
    assert list(SceneOrderedDistributedSampler(scene_ids, num_replicas, 0)) == yielded[0]


def test_scene_sampler_interleaved_scenes_and_bad_arguments():
    # Scenes need not be contiguous in the dataset: each scene's own order is kept.
    scene_ids = ["a", "b", "a", "b", "a", "c"]
    yielded = [list(SceneOrderedDistributedSampler(scene_ids, 2, rank)) for rank in range(2)]
    assert yielded == [[0, 2, 4], [1, 3, 5]]
    assert assign_scenes_to_ranks([3, 2, 1], 2) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="rank"):
        SceneOrderedDistributedSampler(scene_ids, 2, 2)
    with pytest.raises(ValueError, match="num_replicas"):
        SceneOrderedDistributedSampler(scene_ids, 0, 0)


# ----------------------------------------------------------------------------------------------------------------
# Dataset on a synthetic nuScenes set
# ----------------------------------------------------------------------------------------------------------------

SYNTHETIC_VERSION = "v1.0-synthetic"
# On disk the synthetic images are 1600x900 * SYNTHETIC_SCALE = 320x180. The dataset resizes them to 112x200
# (factors 0.625 x 0.622, not 1 and not a JPEG reduction) and pads to 128x224.
SYNTHETIC_SCALE = 0.2
IMAGE_SIZE_HW = (112, 200)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(data_root, {split: info path}) of a tiny synthetic set: 3 train scenes + 1 val scene of 5 keyframes."""
    from bevdeform.data.infos import create_infos
    from bevdeform.data.synthetic import write_synthetic_nuscenes

    out_dir = tmp_path_factory.mktemp("synthetic_nuscenes")
    data_root = write_synthetic_nuscenes(out_dir, num_scenes=3, num_val_scenes=1, samples_per_scene=5, seed=0,
                                         scale=SYNTHETIC_SCALE, objects_per_sample=12, progress=False)
    info_paths = create_infos(data_root, SYNTHETIC_VERSION, progress=False)
    return Path(data_root), info_paths


@pytest.fixture(scope="module")
def train_infos(synthetic):
    from bevdeform.data.infos import load_infos

    return load_infos(synthetic[1]["synthetic_train"])[1]


@pytest.fixture(scope="module")
def train_dataset(synthetic):
    from bevdeform.data.dataset import NuScenesCameraDataset

    data_root, info_paths = synthetic
    return NuScenesCameraDataset(info_paths["synthetic_train"], data_root, IMAGE_SIZE_HW, queue_length=3)


def expected_gt_rows(info: dict, class_names, point_cloud_range_m) -> np.ndarray:
    """Indices of an info's GT rows the dataset must keep: valid_flag, known class, centre inside the x/y range."""
    x_min, y_min, _, x_max, y_max, _ = point_cloud_range_m
    boxes = info["gt_boxes"]
    keep = (np.asarray(info["valid_flag"], dtype=bool) & np.isin(info["gt_names"], class_names)
            & (boxes[:, 0] > x_min) & (boxes[:, 0] < x_max) & (boxes[:, 1] > y_min) & (boxes[:, 1] < y_max))
    return np.flatnonzero(keep)


@pytest.mark.parametrize("image_size_hw", [IMAGE_SIZE_HW, (90, 160)])  # a plain resize; an exact 1/2 JPEG decode
def test_gt_corners_project_to_the_devkit_pixels(synthetic, train_infos, train_dataset, image_size_hw):
    from nuscenes import NuScenes
    from nuscenes.utils.geometry_utils import view_points
    from pyquaternion import Quaternion

    from bevdeform.data.dataset import NuScenesCameraDataset, collate
    from bevdeform.data.infos import CAMERA_NAMES, CLASS_NAMES
    from bevdeform.geometry import box_corners, project_points

    data_root, info_paths = synthetic
    dataset = train_dataset if image_size_hw == IMAGE_SIZE_HW else NuScenesCameraDataset(
        info_paths["synthetic_train"], data_root, image_size_hw, queue_length=1)
    nusc = NuScenes(SYNTHETIC_VERSION, str(data_root), verbose=False)
    indices = np.random.default_rng(4).choice(len(dataset), size=2, replace=False)
    batch = collate([dataset[int(index)] for index in indices])
    padded_height, padded_width = batch["images"].shape[-2:]
    assert (padded_height % 32, padded_width % 32) == (0, 0)
    assert batch["image_hw"][0, -1, 0].tolist() == list(image_size_hw)
    # Padding right/bottom only: the image proper starts at pixel (0, 0).
    assert not batch["images"][..., image_size_hw[0]:, :].any() and not batch["images"][..., image_size_hw[1]:].any()
    num_compared = 0
    for b, index in enumerate(indices):
        info = train_infos[index]
        rows = expected_gt_rows(info, CLASS_NAMES, dataset.point_cloud_range_m)
        gt_boxes = batch["gt_boxes"][b].double().numpy()
        np.testing.assert_allclose(gt_boxes[:, :7], info["gt_boxes"][rows], atol=1e-4)
        assert batch["gt_labels"][b].tolist() == [CLASS_NAMES.index(info["gt_names"][row]) for row in rows]
        corners_ego = box_corners(gt_boxes[:, :7])  # (n, 8, 3), devkit corner order
        sample = nusc.get("sample", info["token"])
        for cam_index, channel in enumerate(CAMERA_NAMES):
            ego2img = batch["ego2img"][b, -1, cam_index].double().numpy()
            uv, depth = project_points(ego2img, corners_ego)  # (n, 8, 2), (n, 8)
            sample_data = nusc.get("sample_data", sample["data"][channel])
            calibrated = nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", sample_data["ego_pose_token"])
            scale_x = image_size_hw[1] / sample_data["width"]
            scale_y = image_size_hw[0] / sample_data["height"]
            for box_index, row in enumerate(rows):
                # The devkit's way: global box -> ego at the camera's timestamp -> camera -> pixels on disk.
                box = nusc.get_box(info["gt_ann_tokens"][row])
                box.translate(-np.array(pose["translation"]))
                box.rotate(Quaternion(pose["rotation"]).inverse)
                box.translate(-np.array(calibrated["translation"]))
                box.rotate(Quaternion(calibrated["rotation"]).inverse)
                corners_cam = box.corners()  # (3, 8)
                in_front = corners_cam[2] > 0.1
                if not in_front.any():
                    continue
                uv_disk = view_points(corners_cam, np.array(calibrated["camera_intrinsic"]), normalize=True)[:2].T
                uv_devkit = resize_pixel_coords(uv_disk, scale_x, scale_y)  # (8, 2) in the resized image
                np.testing.assert_allclose(depth[box_index][in_front], corners_cam[2][in_front], atol=1e-4)
                # Where a network samples (the image, with a margin of its own size): 1e-3 px. Corners just in front
                # of the lens land thousands of pixels away, where float32 ego2img allows a relative 1e-6.
                near_image = in_front & np.all((uv_devkit > -np.array(image_size_hw[::-1]))
                                               & (uv_devkit < 2 * np.array(image_size_hw[::-1])), axis=1)
                np.testing.assert_allclose(uv[box_index][near_image], uv_devkit[near_image], atol=1e-3)
                np.testing.assert_allclose(uv[box_index][in_front], uv_devkit[in_front], rtol=2e-6, atol=1e-3)
                num_compared += int(near_image.sum())
    assert num_compared > 50


def test_temporal_queue_stays_in_its_scene_in_time_order(train_dataset, train_infos):
    queue_length = train_dataset.queue_length
    assert queue_length == 3
    starts = [index for index, info in enumerate(train_infos) if info["frame_idx"] == 0]
    assert len(starts) >= 2 and max(info["frame_idx"] for info in train_infos) >= queue_length
    for index, info in enumerate(train_infos):
        frames = train_dataset.queue_indices[index]
        queue_infos = [train_infos[frame] for frame in frames]
        assert {q["scene_token"] for q in queue_infos} == {info["scene_token"]}
        # Consecutive keyframes ending at this one; the scene's first frame repeated at the front near a start.
        expected_frame_idx = [max(info["frame_idx"] - (queue_length - 1 - t), 0) for t in range(queue_length)]
        assert [q["frame_idx"] for q in queue_infos] == expected_frame_idx
        sample = train_dataset[index]
        assert sample["sample_token"] == info["token"] and sample["scene_token"] == info["scene_token"]
        assert sample["has_prev"].tolist() == [frame_idx > 0 for frame_idx in expected_frame_idx]
        assert bool(sample["has_prev"][-1]) == (index not in starts)  # False exactly at scene starts
        timestamps = sample["timestamp_s"]
        assert np.all(np.diff(timestamps) >= 0)
        assert np.all((np.diff(timestamps) > 0) == (np.diff(expected_frame_idx) > 0))
        for slot, queue_info in enumerate(queue_infos):
            np.testing.assert_allclose(sample["ego2global"][slot], queue_info["ego2global"])
            np.testing.assert_allclose(sample["ego_prev2curr"][slot], queue_info["ego_prev2curr"], atol=1e-6)
            if not sample["has_prev"][slot]:
                np.testing.assert_array_equal(sample["ego_prev2curr"][slot], np.eye(4))
        # A repeated scene start holds the same pixels.
        for slot in range(1, queue_length):
            if frames[slot] == frames[slot - 1]:
                np.testing.assert_array_equal(sample["images"][slot], sample["images"][slot - 1])


def test_collate_batch_shapes_and_empty_gt(synthetic, train_dataset):
    from bevdeform.data.dataset import NuScenesCameraDataset, collate

    batch = collate([train_dataset[0], train_dataset[7]])
    batch_size, queue_length, num_cams = 2, 3, 6
    padded_hw = (128, 224)
    expected = {
        "images": ((batch_size, queue_length, num_cams, 3, *padded_hw), torch.float32),
        "image_hw": ((batch_size, queue_length, num_cams, 2), torch.int64),
        "ego2img": ((batch_size, queue_length, num_cams, 4, 4), torch.float32),
        "ego_prev2curr": ((batch_size, queue_length, 4, 4), torch.float32),
        "has_prev": ((batch_size, queue_length), torch.bool),
        "ego2global": ((batch_size, queue_length, 4, 4), torch.float64),
        "timestamp_s": ((batch_size, queue_length), torch.float64),
    }
    assert set(batch) == set(expected) | {"gt_boxes", "gt_labels", "sample_token", "scene_token"}
    for key, (shape, dtype) in expected.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    assert (batch["image_hw"] == torch.tensor(IMAGE_SIZE_HW)).all()
    for key, width, dtype in (("gt_boxes", 9, torch.float32), ("gt_labels", None, torch.int64)):
        assert isinstance(batch[key], list) and len(batch[key]) == batch_size
        for tensor in batch[key]:
            assert tensor.dtype == dtype and (width is None or tensor.shape[1:] == (width,))
    assert sum(len(boxes) for boxes in batch["gt_boxes"]) > 0
    assert batch["sample_token"] == [train_dataset[0]["sample_token"], train_dataset[7]["sample_token"]]

    # A range that holds no box centre: every sample is empty, and empty samples batch with full ones.
    data_root, info_paths = synthetic
    empty = NuScenesCameraDataset(info_paths["synthetic_train"], data_root, IMAGE_SIZE_HW, queue_length=3,
                                  point_cloud_range_m=(1000, 1000, -5, 1001, 1001, 3))
    batch = collate([empty[0], train_dataset[7]])
    assert tuple(batch["gt_boxes"][0].shape) == (0, 9) and tuple(batch["gt_labels"][0].shape) == (0,)
    assert len(batch["gt_boxes"][1]) == len(train_dataset[7]["gt_boxes"])


def test_photometric_aug_changes_pixels_not_geometry(synthetic, train_dataset):
    from bevdeform.data.dataset import NuScenesCameraDataset

    data_root, info_paths = synthetic

    def jittered(seed: int) -> NuScenesCameraDataset:
        return NuScenesCameraDataset(info_paths["synthetic_train"], data_root, IMAGE_SIZE_HW, queue_length=3,
                                     photometric_aug=True, seed=seed)

    plain, first, again = train_dataset[6], jittered(5)[6], jittered(5)[6]
    height, width = IMAGE_SIZE_HW
    assert np.abs(first["images"] - plain["images"]).max() > 0.1
    np.testing.assert_array_equal(first["images"], again["images"])  # seeded
    assert not first["images"][..., height:, :].any() and not first["images"][..., width:].any()
    for key in ("ego2img", "image_hw", "ego_prev2curr", "has_prev", "ego2global", "timestamp_s", "gt_boxes",
                "gt_labels"):
        np.testing.assert_array_equal(first[key], plain[key])


def test_scene_sampler_on_the_dataset(train_dataset, train_infos):
    scene_ids = train_dataset.scene_ids()
    seen = []
    for rank in range(2):
        sampler = SceneOrderedDistributedSampler(scene_ids, num_replicas=2, rank=rank)
        indices = list(sampler)
        seen += indices
        for scene in sampler.scene_ids_of_rank(rank):
            frame_idx = [train_infos[index]["frame_idx"] for index in indices if scene_ids[index] == scene]
            assert frame_idx == list(range(len(frame_idx)))  # the whole scene, in time order
    assert sorted(seen) == list(range(len(train_dataset)))


def _raw_info_copy(info_path: Path, out_path: Path, edit) -> Path:
    content = json.loads(Path(info_path).read_text())
    edit(content["infos"])
    out_path.write_text(json.dumps(content))
    return out_path


def test_bad_input_errors_name_path_and_token(synthetic, train_infos, tmp_path):
    from bevdeform.data.dataset import NuScenesCameraDataset

    data_root, info_paths = synthetic
    missing_info = tmp_path / "no_such_infos.json"
    with pytest.raises(FileNotFoundError, match="no_such_infos.json"):
        NuScenesCameraDataset(missing_info, data_root, IMAGE_SIZE_HW)

    token = train_infos[1]["token"]

    def point_cam_back_to(relative_path: str):
        def edit(infos):
            infos[1]["cams"]["CAM_BACK"]["data_path"] = relative_path
        return edit

    missing_image = "samples/CAM_BACK/not_there.jpg"
    dataset = NuScenesCameraDataset(
        _raw_info_copy(info_paths["synthetic_train"], tmp_path / "missing.json", point_cam_back_to(missing_image)),
        data_root, IMAGE_SIZE_HW, queue_length=2)
    with pytest.raises(FileNotFoundError, match=f"not_there.jpg.*{token}.*CAM_BACK"):
        dataset[1]
    # Loaded as a history frame of the next sample: both tokens named.
    with pytest.raises(FileNotFoundError, match=f"{token}.*history frame of sample {train_infos[2]['token']}"):
        dataset[2]

    good_image = data_root / train_infos[1]["cams"]["CAM_BACK"]["data_path"]
    truncated = good_image.with_name("truncated_for_test" + good_image.suffix)
    truncated.write_bytes(good_image.read_bytes()[: good_image.stat().st_size // 2])
    relative = str(truncated.relative_to(data_root))
    dataset = NuScenesCameraDataset(
        _raw_info_copy(info_paths["synthetic_train"], tmp_path / "truncated.json", point_cam_back_to(relative)),
        data_root, IMAGE_SIZE_HW, queue_length=1)
    with pytest.raises(ImageDecodeError, match=f"truncated_for_test.*{token}"):
        dataset[1]
    dataset[0]  # the other samples still load


def test_datamodule_loaders(synthetic):
    from bevdeform.data.datamodule import NuScenesDataModule

    data_root, info_paths = synthetic

    def make(num_workers: int) -> NuScenesDataModule:
        data = NuScenesDataModule(data_root, info_paths["synthetic_train"], info_paths["synthetic_val"],
                                  IMAGE_SIZE_HW, queue_length=2, train_batch_size=2, val_batch_size=1,
                                  num_workers=num_workers, persistent_workers=False, pin_memory=False, seed=3)
        data.setup("fit")
        return data

    data = make(num_workers=0)
    first = next(iter(data.train_dataloader()))
    assert tuple(first["images"].shape[:3]) == (2, 2, 6)
    # Seeded shuffle: the same order from a fresh data module, here through one worker process.
    first_from_worker = next(iter(make(num_workers=1).train_dataloader()))
    assert first_from_worker["sample_token"] == first["sample_token"]

    val_loader = data.val_dataloader()
    assert isinstance(val_loader.sampler, torch.utils.data.SequentialSampler)
    assert next(iter(val_loader))["images"].shape[1] == 1  # validation streams single frames
    data.trainer = SimpleNamespace(global_rank=1, world_size=2)
    val_loader = data.val_dataloader()
    assert isinstance(val_loader.sampler, SceneOrderedDistributedSampler) and val_loader.sampler.rank == 1


def test_worker_batch_of_one_arrives_in_shared_memory_intact(train_dataset):
    from bevdeform.data.dataset import collate

    loader = torch.utils.data.DataLoader(train_dataset, batch_size=1, sampler=[5], num_workers=1, collate_fn=collate)
    batch = next(iter(loader))
    expected = train_dataset[5]["images"]  # built in this process, plain memory
    assert batch["images"].is_shared()
    assert torch.equal(batch["images"][0], expected)  # padding zeroed, pixels identical
