"""The multi-camera nuScenes dataset: six images, their projections, the temporal queue and the GT of a keyframe.

docs/data-format.md is the contract for the info files read here and for the batch ``collate`` returns.

Choices, in one place:
- **Temporal queue**: the ``queue_length - 1`` keyframes right before the current one in its scene, oldest first,
  consecutive (no random gaps as in BEVFormer, so each frame's ``ego_prev2curr`` is the motion from the queue's
  previous frame). It never crosses a scene start: near a scene start the queue is padded at its front with
  repeats of the scene's first frame, e.g. ``[f0, f0, f1]`` for the second frame with ``queue_length = 3``. Every
  copy of f0 has ``has_prev = False`` and an identity ``ego_prev2curr``, so a model that resets its BEV where
  ``has_prev`` is False builds f0 from scratch each time and never mixes scenes; the batch keeps a fixed T.
- **GT**: only boxes whose ``valid_flag`` is set (``num_lidar_pts + num_radar_pts > 0``, what the devkit's
  evaluation keeps; without points a box is often invisible in every camera too), of a class in ``class_names``,
  whose centre lies strictly inside the x/y extent of ``point_cloud_range_m`` (ego frame, as mmdet3d's
  ObjectRangeFilter; z is not filtered). Velocities are the info file's (NaN already stored as 0).
- **Images**: decoded with OpenCV (BGR), at a reduced JPEG size when that is exact (see
  ``transforms.read_image_bgr``), resized to ``image_size_hw`` from the size on disk, optionally jittered
  (photometric only), normalised with ImageNet mean/std in RGB order and padded right/bottom with zeros to a
  multiple of ``pad_multiple``; ``ego2img`` uses intrinsics rescaled with the half-pixel-centre convention
  (``transforms`` module docstring): integer pixel coordinates are pixel centres.

Everything that does not depend on the pixels (projections, ego motion, GT, queue indices) is computed once in the
constructor into numpy arrays, so ``__getitem__`` only decodes and converts images, and forked DataLoader workers
share these arrays instead of touching (and so copying) millions of Python objects.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from bevdeform.data.infos import CAMERA_NAMES, CLASS_NAMES, load_infos
from bevdeform.data.transforms import (
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    ImageDecodeError,
    PhotoMetricDistortion,
    normalize_bgr_into_chw,
    padded_size,
    read_image_bgr,
    resize_image,
    scale_intrinsics,
)
from bevdeform.geometry import ego2img_from

# (x_min, y_min, z_min, x_max, y_max, z_max), metres, ego frame: BEVFormer's LIDAR_TOP range lifted by the lidar's
# ~1.84 m height (bevdeform.config's default). Only x/y filter GT here.
DEFAULT_POINT_CLOUD_RANGE_M: tuple[float, ...] = (-51.2, -51.2, -3.0, 51.2, 51.2, 5.0)

# Keys of a sample (and of the batch) that are arrays stacked along a new batch axis.
_STACKED_KEYS = ("images", "image_hw", "ego2img", "ego_prev2curr", "has_prev", "ego2global", "timestamp_s")
# Stacked too when the samples have them (bevformer_v1_inputs).
_BEVFORMER_V1_KEYS = ("lidar2img", "can_bus_abs", "can_bus_abs_history", "lidar2ego", "img_shape_hw")


class NuScenesCameraDataset(Dataset):
    """Six camera images + calibration + ego motion + GT per keyframe, with a temporal queue of previous keyframes.

    Args:
        info_path: an info file (docs/data-format.md), e.g. ``<out>/v1.0-trainval_infos_train.json``.
        data_root: directory the info file's image paths are relative to.
        image_size_hw: (height, width) in pixels every camera image is resized to before padding.
        queue_length: frames per sample, T >= 1 (history first, the current frame last).
        class_names: detection classes, in label-index order.
        point_cloud_range_m: (x_min, y_min, z_min, x_max, y_max, z_max) in metres, ego frame; GT centres outside
            its x/y extent are dropped.
        photometric_aug: jitter brightness/contrast/saturation/hue of every image independently (training only;
            geometry is untouched).
        pad_multiple: pad images right/bottom to a multiple of this many pixels.
        use_valid_flag: keep only GT boxes with lidar or radar points (see the module docstring).
        reduced_jpeg_decode: let libjpeg decode at 1/2, 1/4 or 1/8 size when the target allows it (exact, faster).
        mean_rgb, std_rgb: normalisation, RGB order, 0-255 scale.
        seed: seeds the photometric jitter's generator in this process; DataLoader workers reseed it through
            ``reseed`` (the data module's ``worker_init_fn`` does).
        bevformer_v1_inputs: also produce the inputs of BEVFormer's published checkpoints (``bevdeform.compat``):
            ``lidar2img``, ``can_bus_abs``, ``can_bus_abs_history``, ``lidar2ego``, ``img_shape_hw`` (see
            ``collate``). Needs info files with ``can_bus_v1`` (created from a data root with the CAN bus
            expansion); a file without it is refused, naming the folder.
        image_pipeline: "bevdeform" (the default path above) or an official test pipeline,
            "bevformer_v1_tiny" / "bevformer_v1_caffe" (``bevdeform.compat.image_pipeline``: full decode,
            mmcv normalisation in the variant's channel order, bilinear resize of the normalised image, zero pad);
            mean_rgb / std_rgb and reduced_jpeg_decode are then unused. Photometric jitter, when on, is applied to
            the decoded image before normalisation, as in the official training pipeline.

    A sample (``__getitem__``) is a dict with the batch's keys and shapes without the leading B (see ``collate``):
    ``images`` a float32 torch tensor (T, N, 3, H_pad, W_pad), the other arrays numpy, ``gt_boxes`` (n, 9) float32,
    ``gt_labels`` (n,) int64 and the two token strings. Inside a DataLoader worker ``images`` is allocated in
    shared memory, so a batch of one (the usual per-GPU batch of the larger configs) reaches the main process
    without a single copy of its pixels.
    """

    def __init__(self, info_path: str | os.PathLike, data_root: str | os.PathLike, image_size_hw: tuple[int, int],
                 queue_length: int = 1, class_names: Sequence[str] = CLASS_NAMES,
                 point_cloud_range_m: Sequence[float] = DEFAULT_POINT_CLOUD_RANGE_M, photometric_aug: bool = False,
                 pad_multiple: int = 32, use_valid_flag: bool = True, reduced_jpeg_decode: bool = True,
                 mean_rgb: tuple[float, float, float] = IMAGENET_MEAN_RGB,
                 std_rgb: tuple[float, float, float] = IMAGENET_STD_RGB, seed: int = 0,
                 bevformer_v1_inputs: bool = False, image_pipeline: str = "bevdeform"):
        if queue_length < 1:
            raise ValueError(f"queue_length must be >= 1, got {queue_length}")
        if len(image_size_hw) != 2 or min(image_size_hw) < 1:
            raise ValueError(f"image_size_hw must be (height, width) in pixels, got {image_size_hw}")
        if len(point_cloud_range_m) != 6:
            raise ValueError(f"point_cloud_range_m must have 6 numbers (x_min, y_min, z_min, x_max, y_max, z_max), "
                             f"got {point_cloud_range_m}")
        self.info_path = Path(info_path)
        self.data_root = Path(data_root)
        self.image_size_hw = (int(image_size_hw[0]), int(image_size_hw[1]))
        self.padded_hw = padded_size(self.image_size_hw, pad_multiple)
        self.queue_length = int(queue_length)
        self.class_names = tuple(class_names)
        self.point_cloud_range_m = tuple(float(v) for v in point_cloud_range_m)
        self.use_valid_flag = bool(use_valid_flag)
        self.reduced_jpeg_decode = bool(reduced_jpeg_decode)
        self.mean_rgb = tuple(mean_rgb)
        self.std_rgb = tuple(std_rgb)
        self.photometric = PhotoMetricDistortion() if photometric_aug else None
        self._rng = np.random.default_rng(seed)
        self.bevformer_v1_inputs = bool(bevformer_v1_inputs)
        self.image_pipeline = str(image_pipeline)
        self._official_norm = None
        if self.image_pipeline != "bevdeform":
            from bevdeform.compat.image_pipeline import IMAGE_PIPELINES, image_norm

            if self.image_pipeline not in IMAGE_PIPELINES:
                raise ValueError(f"image_pipeline {self.image_pipeline!r}: expected 'bevdeform' or one of "
                                 f"{sorted(IMAGE_PIPELINES)}")
            self._official_norm = image_norm(self.image_pipeline)

        self.metadata, infos = load_infos(self.info_path)
        self._build_frame_tables(infos)
        self._build_gt_tables(infos)
        self.queue_indices = self._build_queue_indices(infos)  # (F, T) frame indices, oldest first
        if self.bevformer_v1_inputs:
            self._build_bevformer_v1_tables(infos)

    # ------------------------------------------------------------------------------------------------------------
    # Construction: everything that does not depend on pixels
    # ------------------------------------------------------------------------------------------------------------

    def _build_frame_tables(self, infos: list[dict]) -> None:
        num_frames, num_cams = len(infos), len(CAMERA_NAMES)
        target_height, target_width = self.image_size_hw
        # Fixed-width numpy string arrays: one object, not F*6 refcounted Python strings in every worker.
        image_paths, disk_hw = [], np.zeros((num_frames, num_cams, 2), dtype=np.int64)
        intrinsics = np.zeros((num_frames, num_cams, 3, 3))
        cam2ego = np.zeros((num_frames, num_cams, 4, 4))
        for frame, info in enumerate(infos):
            cams = info.get("cams", {})
            missing = [name for name in CAMERA_NAMES if name not in cams]
            if missing:
                raise ValueError(f"info file {self.info_path}: sample {info.get('token')} lacks cameras {missing}")
            for cam_index, name in enumerate(CAMERA_NAMES):
                cam = cams[name]
                image_paths.append(str(self.data_root / cam["data_path"]))
                height, width = int(cam["height"]), int(cam["width"])
                disk_hw[frame, cam_index] = (height, width)
                # Resize from the size on disk to the target: the map of transforms' module docstring.
                intrinsics[frame, cam_index] = scale_intrinsics(
                    np.asarray(cam["intrinsics"], dtype=np.float64), target_width / width, target_height / height)
                cam2ego[frame, cam_index] = cam["cam2ego"]
        self.image_paths = np.array(image_paths, dtype=np.str_).reshape(num_frames, num_cams)  # (F, N)
        self.disk_hw = disk_hw  # (F, N, 2)
        self.ego2img = ego2img_from(intrinsics, cam2ego).astype(np.float32)  # (F, N, 4, 4), resized image
        self.sample_tokens = np.array([info["token"] for info in infos], dtype=np.str_)
        self.scene_tokens = np.array([info["scene_token"] for info in infos], dtype=np.str_)
        self.ego2global = np.array([info["ego2global"] for info in infos], dtype=np.float64).reshape(-1, 4, 4)
        self.ego_prev2curr = np.array([info["ego_prev2curr"] for info in infos],
                                      dtype=np.float32).reshape(-1, 4, 4)
        self.has_prev = np.array([bool(info["has_prev"]) for info in infos], dtype=bool)
        self.timestamp_s = np.array([info["timestamp"] for info in infos], dtype=np.float64) * 1e-6

    def _build_bevformer_v1_tables(self, infos: list[dict]) -> None:
        """lidar2img (F, N, 4, 4) for the image as fed (plain resize factor, the official convention), lidar2ego
        (F, 4, 4) and the official absolute CAN-bus vectors (F, 18) (``bevdeform.compat``)."""
        from bevdeform.compat.frames import lidar2img_from

        num_frames, num_cams = len(infos), len(CAMERA_NAMES)
        target_height, target_width = self.image_size_hw
        lidar2img = np.zeros((num_frames, num_cams, 4, 4))
        for frame, info in enumerate(infos):
            for cam_index, name in enumerate(CAMERA_NAMES):
                cam = info["cams"][name]
                scale_xy = (target_width / int(cam["width"]), target_height / int(cam["height"]))
                lidar2img[frame, cam_index] = lidar2img_from(cam["intrinsics"], cam["cam2lidar"], scale_xy)
        self.lidar2img = lidar2img.astype(np.float32)
        self.lidar2ego = np.array([info["lidar2ego"] for info in infos], dtype=np.float64).reshape(-1, 4, 4)
        missing = [info["token"] for info in infos if "can_bus_v1" not in info]
        if missing:
            data_root = self.metadata.get("data_root", "<data_root>")
            raise ValueError(
                f"info file {self.info_path}: {len(missing)} of {len(infos)} samples (first {missing[0]}) lack "
                f"can_bus_v1, the CAN-bus input of BEVFormer's checkpoints (data.bevformer_v1_inputs). It is "
                f"written by data_prep/create_infos.py when the CAN bus expansion is there: folder "
                f"{Path(data_root) / 'can_bus'} (or pass --can-bus-root R with R/can_bus); download it from "
                f"https://www.nuscenes.org/download and re-create the info files")
        self.can_bus_abs = np.array([info["can_bus_v1"] for info in infos], dtype=np.float64).reshape(-1, 18)

    def _build_gt_tables(self, infos: list[dict]) -> None:
        label_of = {name: index for index, name in enumerate(self.class_names)}
        x_min, y_min, _, x_max, y_max, _ = self.point_cloud_range_m
        boxes_per_frame, labels_per_frame = [], []
        for info in infos:
            names = info.get("gt_names", [])
            boxes = np.asarray(info.get("gt_boxes", []), dtype=np.float64).reshape(-1, 7)
            velocity = np.asarray(info.get("gt_velocity", []), dtype=np.float64).reshape(-1, 2)
            if not len(names) == len(boxes) == len(velocity):
                raise ValueError(f"info file {self.info_path}: sample {info['token']} has {len(names)} gt_names, "
                                 f"{len(boxes)} gt_boxes and {len(velocity)} gt_velocity rows; expected equal counts")
            keep = np.array([name in label_of for name in names], dtype=bool)
            if self.use_valid_flag and len(names):
                keep &= np.asarray(info["valid_flag"], dtype=bool)
            keep &= (boxes[:, 0] > x_min) & (boxes[:, 0] < x_max) & (boxes[:, 1] > y_min) & (boxes[:, 1] < y_max)
            # (n, 7) boxes + (n, 2) velocities -> (n, 9)
            boxes_per_frame.append(np.concatenate([boxes[keep], np.nan_to_num(velocity[keep])], axis=1))
            labels_per_frame.append(np.array([label_of[name] for name, k in zip(names, keep) if k], dtype=np.int64))
        # Concatenated rows with offsets (CSR): frame f owns rows gt_offsets[f]:gt_offsets[f + 1].
        counts = [len(labels) for labels in labels_per_frame]
        self.gt_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.gt_boxes = (np.concatenate(boxes_per_frame) if boxes_per_frame else np.zeros((0, 9))).astype(np.float32)
        self.gt_labels = (np.concatenate(labels_per_frame) if labels_per_frame
                          else np.zeros((0,), dtype=np.int64)).astype(np.int64)

    def _build_queue_indices(self, infos: list[dict]) -> np.ndarray:
        index_of = {info["token"]: frame for frame, info in enumerate(infos)}
        previous = np.full(len(infos), -1, dtype=np.int64)
        for frame, info in enumerate(infos):
            prev_token = info.get("prev", "")
            if bool(info["has_prev"]) != bool(prev_token):
                raise ValueError(f"info file {self.info_path}: sample {info['token']} has has_prev="
                                 f"{info['has_prev']} but prev={prev_token!r}; expected has_prev true exactly when "
                                 f"prev is set")
            if not prev_token:
                continue
            if prev_token not in index_of:
                raise ValueError(f"info file {self.info_path}: the previous keyframe {prev_token} of sample "
                                 f"{info['token']} is not in the file; an info file must hold whole scenes")
            if infos[index_of[prev_token]]["scene_token"] != info["scene_token"]:
                raise ValueError(f"info file {self.info_path}: sample {info['token']} and its previous keyframe "
                                 f"{prev_token} belong to different scenes")
            previous[frame] = index_of[prev_token]
        queue = np.zeros((len(infos), self.queue_length), dtype=np.int64)
        for frame in range(len(infos)):
            chain = [frame]
            while len(chain) < self.queue_length:
                # At a scene start there is no previous keyframe: repeat the scene's first frame.
                chain.append(previous[chain[-1]] if previous[chain[-1]] >= 0 else chain[-1])
            queue[frame] = chain[::-1]
        return queue

    # ------------------------------------------------------------------------------------------------------------
    # Access
    # ------------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sample_tokens)

    def scene_ids(self) -> list[str]:
        """The scene token of every index, for ``SceneOrderedDistributedSampler``."""
        return self.scene_tokens.tolist()

    def reseed(self, seed: int | Sequence[int] | np.random.SeedSequence) -> None:
        """Restart the photometric jitter's generator (called per DataLoader worker)."""
        self._rng = np.random.default_rng(seed)

    def frame_gt(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (n, 9) float32 [x, y, z, w, l, h, yaw, vx, vy] ego frame, labels (n,) int64) of a frame, copies."""
        start, stop = self.gt_offsets[frame], self.gt_offsets[frame + 1]
        return self.gt_boxes[start:stop].copy(), self.gt_labels[start:stop].copy()

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples of {self.info_path}")
        frames = self.queue_indices[index]  # (T,)
        num_cams = len(CAMERA_NAMES)
        padded_height, padded_width = self.padded_hw
        height, width = self.image_size_hw
        images_tensor = _new_image_buffer((self.queue_length, num_cams, 3, padded_height, padded_width))
        images = images_tensor.numpy()  # the same memory, filled in place
        images[..., height:, :] = 0.0  # bottom padding
        images[..., :height, width:] = 0.0  # right padding
        for slot, frame in enumerate(frames):
            if slot > 0 and frame == frames[slot - 1]:
                # A repeated scene start: same pixels, no second decode.
                images[slot] = images[slot - 1]
                continue
            for cam_index in range(num_cams):
                self._load_camera_image(int(frame), cam_index, images[slot, cam_index], queue_of=index)
        gt_boxes, gt_labels = self.frame_gt(index)
        extra = {}
        if self.bevformer_v1_inputs:
            from bevdeform.compat.frames import ego_boxes_to_lidar

            extra = {
                "lidar2img": self.lidar2img[frames],  # (T, N, 4, 4)
                "can_bus_abs": self.can_bus_abs[index],  # (18,)
                "can_bus_abs_history": self.can_bus_abs[frames[:-1]].reshape(-1, 18),  # (T - 1, 18)
                "lidar2ego": self.lidar2ego[index],  # (4, 4)
                "img_shape_hw": np.array(self.padded_hw, dtype=np.int64),  # (2,)
                "gt_boxes_lidar": ego_boxes_to_lidar(gt_boxes, self.lidar2ego[index]).astype(np.float32),  # (n, 9)
            }
        return {**extra,
            "images": images_tensor,  # (T, N, 3, H_pad, W_pad)
            "image_hw": np.broadcast_to(np.array(self.image_size_hw, dtype=np.int64),
                                        (self.queue_length, num_cams, 2)).copy(),
            "ego2img": self.ego2img[frames],  # (T, N, 4, 4)
            "ego_prev2curr": self.ego_prev2curr[frames],  # (T, 4, 4)
            "has_prev": self.has_prev[frames],  # (T,)
            "ego2global": self.ego2global[frames],  # (T, 4, 4)
            "timestamp_s": self.timestamp_s[frames],  # (T,)
            "gt_boxes": gt_boxes,
            "gt_labels": gt_labels,
            "sample_token": str(self.sample_tokens[index]),
            "scene_token": str(self.scene_tokens[index]),
        }

    def _load_camera_image(self, frame: int, cam_index: int, out_chw: np.ndarray, queue_of: int) -> None:
        """Decode, resize, jitter and normalise one camera image into ``out_chw`` (3, H_pad, W_pad).

        ``queue_of`` is the index whose sample is being built; named in errors when ``frame`` is one of its history
        frames.
        """
        path = str(self.image_paths[frame, cam_index])
        disk_hw = (int(self.disk_hw[frame, cam_index, 0]), int(self.disk_hw[frame, cam_index, 1]))
        try:
            if self._official_norm is not None:
                from bevdeform.compat.image_pipeline import read_image_unchanged

                image = read_image_unchanged(path, disk_hw)
            else:
                image = read_image_bgr(path, disk_hw, self.image_size_hw, self.reduced_jpeg_decode)
        except (FileNotFoundError, ImageDecodeError) as error:
            history = f", history frame of sample {self.sample_tokens[queue_of]}" if queue_of != frame else ""
            raise type(error)(f"{error} (sample {self.sample_tokens[frame]}, camera {CAMERA_NAMES[cam_index]}"
                              f"{history}, info file {self.info_path})") from None
        if self._official_norm is not None:
            from bevdeform.compat.image_pipeline import official_image_into_chw

            if self.photometric is not None:
                image = self.photometric(image, self._rng)
            official_image_into_chw(image, self._official_norm, self.image_size_hw, out_chw)
            return
        image = resize_image(image, self.image_size_hw)
        if self.photometric is not None:
            image = self.photometric(image, self._rng)
        normalize_bgr_into_chw(image, out_chw, self.mean_rgb, self.std_rgb)


def _new_image_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor of ``shape``; inside a DataLoader worker, in shared memory.

    Writing the pixels straight into shared memory saves a copy of the whole sample (tens of MB at 800x450) and the
    page faults of a second fresh buffer; torch's ``default_collate`` allocates its stacked batches the same way.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:  # a torch without the private constructor: a public, slower route (one extra copy)
        return torch.empty(shape, dtype=torch.float32).share_memory_()
    storage = new_shared(math.prod(shape) * 4)  # bytes of float32
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples of ``NuScenesCameraDataset`` into the batch of docs/data-format.md.

    Returns (B samples, T frames, N = 6 cameras):
        images (B, T, N, 3, H_pad, W_pad) float32; image_hw (B, T, N, 2) int64; ego2img (B, T, N, 4, 4) float32;
        ego_prev2curr (B, T, 4, 4) float32; has_prev (B, T) bool; ego2global (B, T, 4, 4) float64;
        timestamp_s (B, T) float64; gt_boxes list of B float32 (n_b, 9); gt_labels list of B int64 (n_b,);
        sample_token, scene_token lists of B str.
        With ``bevformer_v1_inputs`` also: lidar2img (B, T, N, 4, 4) float32 (LIDAR_TOP -> pixels of the image as
        fed, plain resize factor); can_bus_abs (B, 18) float64 (the official absolute CAN-bus vector of the current
        frame, before the detector's delta step); can_bus_abs_history (B, T - 1, 18) float64 (the history frames,
        oldest first); lidar2ego (B, 4, 4) float64 (current frame); img_shape_hw (B, 2) int64 (the padded size);
        gt_boxes_lidar list of B float32 (n_b, 9): gt_boxes in the keyframe LIDAR_TOP frame, the devkit convention
        [x, y, z centre, w, l, h, yaw about lidar z, vx, vy in lidar axes] (``compat.frames.ego_boxes_to_lidar``).

    Inside a DataLoader worker the stacked tensors are allocated in shared memory (``default_collate`` does that), so
    the batch reaches the main process without another copy; a single sample's images are not copied at all.
    """
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample")
    batch: dict[str, Any] = {}
    for key in _STACKED_KEYS + tuple(key for key in _BEVFORMER_V1_KEYS if key in samples[0]):
        shapes = {tuple(np.shape(sample[key])) for sample in samples}
        if len(shapes) > 1:
            tokens = [sample["sample_token"] for sample in samples]
            raise ValueError(f"cannot batch '{key}' of samples {tokens}: shapes {sorted(shapes)} differ "
                             f"(same image_size_hw and queue_length expected)")
        tensors = [torch.as_tensor(sample[key]) for sample in samples]
        # B x (...) -> (B, ...); a batch of one is a view of its sample (shared memory stays shared).
        batch[key] = tensors[0].unsqueeze(0) if len(tensors) == 1 else default_collate(tensors)
    batch["gt_boxes"] = [torch.from_numpy(sample["gt_boxes"]).reshape(-1, 9) for sample in samples]
    batch["gt_labels"] = [torch.from_numpy(sample["gt_labels"]).reshape(-1) for sample in samples]
    if "gt_boxes_lidar" in samples[0]:
        batch["gt_boxes_lidar"] = [torch.from_numpy(sample["gt_boxes_lidar"]).reshape(-1, 9) for sample in samples]
    batch["sample_token"] = [sample["sample_token"] for sample in samples]
    batch["scene_token"] = [sample["scene_token"] for sample in samples]
    return batch
