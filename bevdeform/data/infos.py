"""Info files: one JSON per split with everything the dataset needs per keyframe (docs/data-format.md).

``create_infos`` reads nuScenes (real or synthetic) with the devkit and writes the files; ``load_infos`` reads and
validates one. The devkit is imported inside ``create_infos`` only, so loading info files (the training path)
does not pay for or need it.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bevdeform import geometry

# Index order of the detection classes everywhere in bevdeform (labels, logits, metrics tables).
CLASS_NAMES: tuple[str, ...] = (
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
)
CAMERA_NAMES: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT",
)
LIDAR_NAME = "LIDAR_TOP"

INFO_FORMAT = "bevdeform-infos"
INFO_FORMAT_VERSION = 1

# The tables NuScenes(...) opens; checked up front so a missing one is named instead of a bare open() error.
NUSCENES_TABLES: tuple[str, ...] = (
    "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log", "scene",
    "sample", "sample_data", "sample_annotation", "map",
)
# The devkit's own splits per official version; any version may instead carry <data_root>/<version>/splits.json.
PREDEFINED_SPLITS: dict[str, tuple[str, ...]] = {
    "v1.0-mini": ("mini_train", "mini_val"),
    "v1.0-trainval": ("train", "val"),
    "v1.0-test": ("test",),
}

_METADATA_KEYS = ("format", "format_version", "version", "split", "data_root", "frame", "box", "class_names")
_INFO_KEYS = (
    "token", "scene_token", "scene_name", "frame_idx", "timestamp", "prev", "next", "lidar_token", "lidar_path",
    "lidar2ego", "ego2global", "ego_prev2curr", "has_prev", "cams", "gt_boxes", "gt_velocity", "gt_velocity_valid",
    "gt_names", "gt_attributes", "gt_instance_tokens", "gt_ann_tokens", "num_lidar_pts", "num_radar_pts",
    "valid_flag",
)
_CAM_KEYS = (
    "data_path", "sample_data_token", "timestamp", "width", "height", "intrinsics", "sensor2ego", "ego2global",
    "cam2ego", "cam2lidar",
)
# Per-sample arrays: key -> (numpy dtype, trailing shape after the N axis).
_GT_ARRAYS = {
    "gt_boxes": (np.float64, (7,)),
    "gt_velocity": (np.float64, (2,)),
    "gt_velocity_valid": (bool, ()),
    "num_lidar_pts": (np.int64, ()),
    "num_radar_pts": (np.int64, ()),
    "valid_flag": (bool, ()),
}
_GT_LISTS = ("gt_names", "gt_attributes", "gt_instance_tokens", "gt_ann_tokens")


def info_path(out_dir: str | os.PathLike, version: str, split: str) -> Path:
    """Where the info file of (version, split) lives: ``<out_dir>/<version>_infos_<split>.json``."""
    return Path(out_dir) / f"{version}_infos_{split}.json"


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

def create_infos(data_root: str | os.PathLike, version: str, out_dir: str | os.PathLike | None = None,
                 progress: bool = True, check_images: bool = True,
                 can_bus_root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Convert nuScenes ``<data_root>/<version>`` into one info file per split; returns {split: path}.

    Splits: those of ``<data_root>/<version>/splits.json`` when it exists (e.g. synthetic_train/synthetic_val),
    else the devkit's predefined ones of the version (v1.0-mini: mini_train/mini_val; v1.0-trainval: train/val;
    v1.0-test: test, which has no annotations). Files go to ``out_dir`` (default: data_root).

    check_images: open each camera image's header (PIL, no decode) and compare its size with the sample_data
    record, so a missing or unreadable image is named now rather than in the middle of training.

    Errors name the file or token at fault: FileNotFoundError for a missing data root, version folder, table or
    image; ValueError for a sample without LIDAR_TOP or a camera, an annotation of a category the devkit does not
    know, more than one attribute on an annotation, an image whose size disagrees with its record.
    A sample without annotations is fine: its gt arrays are empty.

    can_bus_root: the folder holding the nuScenes CAN bus expansion's ``can_bus/`` (default: data_root when it has
    ``can_bus/``, else data_root's parent when that has it: the official layout ``data/can_bus`` beside
    ``data/nuscenes``). When ``<can_bus_root>/can_bus`` exists, every sample also gets ``can_bus_v1``: the 18-number
    CAN-bus vector of BEVFormer's published checkpoints, built as the official converter and dataset build it
    (``bevdeform.compat.can_bus.official_can_bus``), read only by the ``data.bevformer_v1_inputs`` path. Without
    the folder the key is left out (and that path refuses the file, naming the folder); a can_bus_root passed
    explicitly must hold it (FileNotFoundError naming the folder).
    """
    data_root = Path(data_root).expanduser().resolve()
    out_dir = data_root if out_dir is None else Path(out_dir).expanduser().resolve()
    table_root = _check_tables(data_root, version)
    splits = _scene_names_of_splits(table_root, version)
    from bevdeform.compat.can_bus import CAN_BUS_DIRNAME, can_bus_dir

    if can_bus_root is not None:
        can_bus_root = Path(can_bus_root).expanduser().resolve()
        can_bus_dir(can_bus_root)  # explicitly asked for: must exist
    elif (data_root / CAN_BUS_DIRNAME).is_dir():
        can_bus_root = data_root
    elif (data_root.parent / CAN_BUS_DIRNAME).is_dir():
        can_bus_root = data_root.parent  # the official BEVFormer layout: data/can_bus beside data/nuscenes
    if can_bus_root is not None and progress:
        print(f"[infos] CAN bus expansion: {can_bus_root / CAN_BUS_DIRNAME} (adds can_bus_v1)", flush=True)

    # Imported here: the devkit pulls matplotlib, cv2 and sklearn (~1 s), which the training path does not need.
    from nuscenes import NuScenes
    from tqdm import tqdm

    nusc = NuScenes(version=version, dataroot=str(data_root), verbose=False)
    scenes_by_name = {scene["name"]: scene for scene in nusc.scene}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, scene_names in splits.items():
        scenes = []
        for name in scene_names:
            if name not in scenes_by_name:
                raise ValueError(f"split {split!r} names scene {name!r}, which {table_root / 'scene.json'} does not "
                                 f"hold ({len(scenes_by_name)} scenes there)")
            scenes.append(scenes_by_name[name])
        num_samples = sum(scene["nbr_samples"] for scene in scenes)
        infos: list[dict[str, Any]] = []
        with tqdm(total=num_samples, desc=f"infos {version} {split}", unit="sample", disable=not progress) as bar:
            for scene in scenes:
                for info in _scene_infos(nusc, data_root, table_root, scene, check_images, can_bus_root):
                    infos.append(info)
                    bar.update(1)
        metadata = {
            "format": INFO_FORMAT, "format_version": INFO_FORMAT_VERSION, "version": version, "split": split,
            "data_root": str(data_root), "frame": "ego@lidar", "box": "xyz_centre_wlh_yaw",
            "class_names": list(CLASS_NAMES),
            "can_bus_root": None if can_bus_root is None else str(can_bus_root),
        }
        paths[split] = _write_json_atomically({"metadata": metadata, "infos": infos},
                                              info_path(out_dir, version, split))
    return paths


def _check_tables(data_root: Path, version: str) -> Path:
    """The version folder, after checking it and its 13 tables exist (named when missing)."""
    if not data_root.is_dir():
        raise FileNotFoundError(f"nuScenes data root {data_root} does not exist or is not a folder")
    table_root = data_root / version
    if not table_root.is_dir():
        present = sorted(p.name for p in data_root.iterdir() if p.is_dir() and p.name.startswith("v"))
        raise FileNotFoundError(f"version folder {table_root} does not exist (version folders in {data_root}: "
                                f"{present or 'none'})")
    for table in NUSCENES_TABLES:
        if not (table_root / f"{table}.json").is_file():
            raise FileNotFoundError(f"nuScenes table {table_root / (table + '.json')} is missing; NuScenes needs all of "
                                    f"{', '.join(NUSCENES_TABLES)}")
    return table_root


def _scene_names_of_splits(table_root: Path, version: str) -> dict[str, list[str]]:
    """{split: scene names}: from splits.json when present, else the devkit's predefined splits of the version."""
    splits_path = table_root / "splits.json"
    if splits_path.is_file():
        try:
            splits = json.loads(splits_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{splits_path} is not valid JSON: {error}") from None
        if not isinstance(splits, dict) or not splits or not all(
                isinstance(names, list) and all(isinstance(n, str) for n in names) for names in splits.values()):
            raise ValueError(f"{splits_path} must map split names to lists of scene names, e.g. "
                             '{"synthetic_train": ["scene-0001", ...], "synthetic_val": [...]}')
        return splits
    if version not in PREDEFINED_SPLITS:
        raise ValueError(f"version {version!r} has no predefined splits (known: {', '.join(PREDEFINED_SPLITS)}) and "
                         f"{splits_path} does not exist")
    from nuscenes.utils.splits import create_splits_scenes

    predefined = create_splits_scenes(verbose=False)
    return {split: list(predefined[split]) for split in PREDEFINED_SPLITS[version]}


def _scene_infos(nusc, data_root: Path, table_root: Path, scene: dict, check_images: bool,
                 can_bus_root: Path | None = None):
    """Yield the info dicts of one scene's keyframes, in time order (with ``can_bus_v1`` when can_bus_root is set)."""
    pose_messages = None
    if can_bus_root is not None:
        from bevdeform.compat.can_bus import read_pose_messages

        pose_messages = read_pose_messages(can_bus_root, scene["name"])
        if pose_messages is None:
            warnings.warn(f"scene {scene['name']} has no CAN bus pose messages under {can_bus_root / 'can_bus'}: "
                          f"its can_bus_v1 accel / rotation rate / velocity are zeros, as the official converter "
                          f"writes them")
    sample_token = scene["first_sample_token"]
    frame_idx = 0
    ego2global_prev = None
    seen: set[str] = set()
    while sample_token:
        if sample_token in seen:
            raise ValueError(f"scene {scene['name']!r}: sample {sample_token} appears twice in the prev/next chain "
                             f"of {table_root / 'sample.json'}")
        seen.add(sample_token)
        sample = nusc.get("sample", sample_token)
        info = _sample_info(nusc, data_root, table_root, scene, sample, frame_idx, check_images)
        if can_bus_root is not None:
            from bevdeform.compat.can_bus import official_can_bus

            # The LIDAR_TOP ego pose record itself: the sign of its stored quaternion decides the vector's [3:7].
            pose = nusc.get("ego_pose", nusc.get("sample_data", info["lidar_token"])["ego_pose_token"])
            info["can_bus_v1"] = official_can_bus(pose["translation"], pose["rotation"], pose_messages,
                                                  int(sample["timestamp"])).tolist()
        ego2global = np.asarray(info["ego2global"])
        if ego2global_prev is None:
            info["ego_prev2curr"], info["has_prev"] = np.eye(4).tolist(), False
        else:
            info["ego_prev2curr"] = geometry.ego_prev2curr_from(ego2global_prev, ego2global).tolist()
            info["has_prev"] = True
        ego2global_prev = ego2global
        yield info
        sample_token = sample["next"]
        frame_idx += 1


def _pose_of(nusc, sample_data: dict) -> tuple[np.ndarray, np.ndarray]:
    """(sensor2ego, ego2global) 4x4 float64 of a sample_data record."""
    calibrated = nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sample_data["ego_pose_token"])
    return (geometry.transform_from(calibrated["rotation"], calibrated["translation"]),
            geometry.transform_from(pose["rotation"], pose["translation"]))


def _keyframe_data(nusc, table_root: Path, scene: dict, sample: dict, channel: str) -> dict:
    token = sample["data"].get(channel)
    if token is None:
        raise ValueError(f"sample {sample['token']} (scene {scene['name']!r}) has no keyframe {channel} in "
                         f"{table_root / 'sample_data.json'} (channels present: {sorted(sample['data'])})")
    return nusc.get("sample_data", token)


def _sample_info(nusc, data_root: Path, table_root: Path, scene: dict, sample: dict, frame_idx: int,
                 check_images: bool) -> dict[str, Any]:
    lidar = _keyframe_data(nusc, table_root, scene, sample, LIDAR_NAME)
    lidar2ego, ego2global = _pose_of(nusc, lidar)
    global2ego = geometry.invert_rigid_transform(ego2global)
    ego2lidar = geometry.invert_rigid_transform(lidar2ego)

    cams = {}
    for channel in CAMERA_NAMES:
        cam = _keyframe_data(nusc, table_root, scene, sample, channel)
        if check_images:
            _check_image(data_root / cam["filename"], cam, sample["token"])
        sensor2ego, ego2global_cam = _pose_of(nusc, cam)
        intrinsics = np.asarray(nusc.get("calibrated_sensor", cam["calibrated_sensor_token"])["camera_intrinsic"],
                                dtype=np.float64)
        if intrinsics.shape != (3, 3):
            raise ValueError(f"calibrated_sensor {cam['calibrated_sensor_token']} of {channel} (sample "
                             f"{sample['token']}) has camera_intrinsic of shape {intrinsics.shape}, expected 3x3")
        # Cameras fire up to ~50 ms away from the lidar: route through the global frame so cam2ego lands in the
        # ego frame at the lidar timestamp, the frame the boxes are in.
        cam2ego = global2ego @ ego2global_cam @ sensor2ego
        cams[channel] = {
            "data_path": cam["filename"], "sample_data_token": cam["token"], "timestamp": int(cam["timestamp"]),
            "width": int(cam["width"]), "height": int(cam["height"]), "intrinsics": intrinsics.tolist(),
            "sensor2ego": sensor2ego.tolist(), "ego2global": ego2global_cam.tolist(), "cam2ego": cam2ego.tolist(),
            "cam2lidar": (ego2lidar @ cam2ego).tolist(),
        }

    gt = _sample_annotations(nusc, table_root, sample, ego2global)
    return {
        "token": sample["token"], "scene_token": scene["token"], "scene_name": scene["name"], "frame_idx": frame_idx,
        "timestamp": int(sample["timestamp"]), "prev": sample["prev"], "next": sample["next"],
        "lidar_token": lidar["token"], "lidar_path": lidar["filename"],
        "lidar2ego": lidar2ego.tolist(), "ego2global": ego2global.tolist(),
        "ego_prev2curr": None, "has_prev": None,  # filled by the scene walk
        "cams": cams, **gt,
    }


def _check_image(path: Path, cam: dict, sample_token: str) -> None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"image {path} of sample_data {cam['token']} (sample {sample_token}) does not exist")
    try:
        with Image.open(path) as image:
            size = image.size
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image {path} of sample_data {cam['token']} (sample {sample_token}) cannot be read: "
                         f"{error}") from None
    if size != (cam["width"], cam["height"]):
        raise ValueError(f"image {path} of sample_data {cam['token']} (sample {sample_token}) is {size[0]}x{size[1]} "
                         f"pixels, its record says {cam['width']}x{cam['height']}")


@functools.lru_cache(maxsize=1)
def _known_category_names() -> list[str]:
    """Every category name the devkit knows: the nuScenes annotation categories and the lidarseg classes."""
    from nuscenes.utils.color_map import get_colormap

    return sorted(get_colormap())


def _sample_annotations(nusc, table_root: Path, sample: dict, ego2global: np.ndarray) -> dict[str, Any]:
    """The gt_* fields of one sample: detection-class annotations in the ego frame at the lidar timestamp."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    translations, sizes, rotations, velocities = [], [], [], []
    names, attributes, instance_tokens, ann_tokens, lidar_pts, radar_pts = [], [], [], [], [], []
    for ann_token in sample["anns"]:
        ann = nusc.get("sample_annotation", ann_token)
        category = ann["category_name"]
        detection_name = category_to_detection_name(category)
        if detection_name is None:
            known = _known_category_names()
            if category not in known:
                # The devkit maps any unknown name to None too: silently dropping it would hide a renamed or
                # misspelt category (and its boxes) from training and evaluation alike.
                raise ValueError(
                    f"sample_annotation {ann_token} (sample {sample['token']}) has category {category!r}, which the "
                    f"nuScenes devkit does not know ({table_root / 'category.json'}); known categories: "
                    f"{', '.join(known)}")
            continue  # a known non-detection category (animal, debris, bicycle_rack, ...): not a target
        if len(ann["attribute_tokens"]) > 1:
            raise ValueError(f"sample_annotation {ann_token} has {len(ann['attribute_tokens'])} attribute_tokens; "
                             f"nuScenes detection allows at most one")
        translations.append(ann["translation"])
        sizes.append(ann["size"])
        rotations.append(ann["rotation"])
        velocities.append(nusc.box_velocity(ann_token))
        names.append(detection_name)
        attributes.append(nusc.get("attribute", ann["attribute_tokens"][0])["name"] if ann["attribute_tokens"] else "")
        instance_tokens.append(ann["instance_token"])
        ann_tokens.append(ann_token)
        lidar_pts.append(int(ann["num_lidar_pts"]))
        radar_pts.append(int(ann["num_radar_pts"]))

    if ann_tokens:
        boxes_ego = geometry.boxes_global_to_ego(translations, sizes, rotations, ego2global)
        velocity_global = np.asarray(velocities, dtype=np.float64)  # (n, 3); NaN where the devkit cannot estimate
        velocity_valid = np.all(np.isfinite(velocity_global[:, :2]), axis=1)
        velocity_ego = geometry.velocities_global_to_ego(np.where(np.isfinite(velocity_global), velocity_global, 0.0),
                                                         ego2global)
        velocity_ego[~velocity_valid] = 0.0
    else:
        boxes_ego, velocity_ego, velocity_valid = np.zeros((0, 7)), np.zeros((0, 2)), np.zeros(0, dtype=bool)
    return {
        "gt_boxes": boxes_ego.tolist(), "gt_velocity": velocity_ego.tolist(),
        "gt_velocity_valid": velocity_valid.tolist(), "gt_names": names, "gt_attributes": attributes,
        "gt_instance_tokens": instance_tokens, "gt_ann_tokens": ann_tokens,
        "num_lidar_pts": lidar_pts, "num_radar_pts": radar_pts,
        "valid_flag": [lidar + radar > 0 for lidar, radar in zip(lidar_pts, radar_pts)],
    }


def _write_json_atomically(content: dict, path: Path) -> Path:
    """Write JSON to a temporary file beside path, then rename: a crash never leaves half a file at path."""
    tmp_path = path.with_name(path.name + ".tmp")
    with open(tmp_path, "w") as f:
        # allow_nan=False: a NaN slipping through is a bug to surface now, and strict JSON readers reject it.
        json.dump(content, f, separators=(",", ":"), allow_nan=False)
    os.replace(tmp_path, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def load_infos(path: str | os.PathLike, expected_version: str | None = None) -> tuple[dict, list[dict]]:
    """Read and validate an info file; returns (metadata, infos).

    In the returned infos, matrices are float64 numpy arrays (4x4; intrinsics 3x3) and the gt fields are numpy
    arrays with a leading N axis even when N = 0 (gt_boxes (N, 7) float64, gt_velocity (N, 2) float64,
    gt_velocity_valid / valid_flag (N,) bool, num_lidar_pts / num_radar_pts (N,) int64); gt_names, gt_attributes
    and the token lists stay lists of str. Everything else is as stored (docs/data-format.md).

    Raises FileNotFoundError for a missing file, ValueError (naming the file, and the sample token where one is at
    fault) for anything else: not this format, another format_version, other class names, a version other than
    expected_version, a sample missing a key or with gt fields of inconsistent lengths.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"info file {path} does not exist (create it with data_prep/create_infos.py)")
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"info file {path} is not valid JSON: {error}") from None
    if not isinstance(content, dict) or not isinstance(content.get("metadata"), dict) \
            or not isinstance(content.get("infos"), list):
        raise ValueError(f"{path} is not a bevdeform info file: expected a JSON object with 'metadata' (object) and "
                         f"'infos' (list)")
    metadata = content["metadata"]
    if metadata.get("format") != INFO_FORMAT:
        raise ValueError(f"{path} is not a bevdeform info file: metadata.format is {metadata.get('format')!r}, "
                         f"expected {INFO_FORMAT!r}")
    if metadata.get("format_version") != INFO_FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {metadata.get('format_version')!r}, this bevdeform reads "
                         f"{INFO_FORMAT_VERSION}: re-create it with data_prep/create_infos.py")
    missing = [key for key in _METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{path}: metadata lacks {missing}")
    if tuple(metadata["class_names"]) != CLASS_NAMES:
        raise ValueError(f"{path} was written for classes {metadata['class_names']}, expected {list(CLASS_NAMES)}")
    if expected_version is not None and metadata["version"] != expected_version:
        raise ValueError(f"{path} holds infos of version {metadata['version']!r}, expected {expected_version!r}")
    infos = [_info_from_json(info, path, index) for index, info in enumerate(content["infos"])]
    return metadata, infos


def _info_from_json(info: Any, path: Path, index: int) -> dict[str, Any]:
    """One stored sample with its arrays as numpy, after checking its keys and gt lengths."""
    if not isinstance(info, dict):
        raise ValueError(f"{path}: infos[{index}] is not an object")
    where = f"{path}: sample {info.get('token', f'infos[{index}]')}"
    missing = [key for key in _INFO_KEYS if key not in info]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    missing_cams = [name for name in CAMERA_NAMES if name not in info["cams"]]
    if missing_cams:
        raise ValueError(f"{where} lacks cameras {missing_cams}")
    out = dict(info)
    for key in ("lidar2ego", "ego2global", "ego_prev2curr"):
        out[key] = _matrix(info[key], (4, 4), f"{where} {key}")
    if "can_bus_v1" in info:
        can_bus = np.asarray(info["can_bus_v1"], dtype=np.float64)
        if can_bus.shape != (18,) or not np.all(np.isfinite(can_bus)):
            raise ValueError(f"{where}: can_bus_v1 must be 18 finite numbers, got shape {can_bus.shape}")
        out["can_bus_v1"] = can_bus
    out["cams"] = {}
    for name in CAMERA_NAMES:
        cam = info["cams"][name]
        missing = [key for key in _CAM_KEYS if key not in cam]
        if missing:
            raise ValueError(f"{where} camera {name} lacks {missing}")
        cam = dict(cam)
        cam["intrinsics"] = _matrix(cam["intrinsics"], (3, 3), f"{where} {name} intrinsics")
        for key in ("sensor2ego", "ego2global", "cam2ego", "cam2lidar"):
            cam[key] = _matrix(cam[key], (4, 4), f"{where} {name} {key}")
        out["cams"][name] = cam
    num_boxes = len(info["gt_boxes"])
    for key, (dtype, trailing_shape) in _GT_ARRAYS.items():
        try:
            # An empty JSON list has no trailing shape: give it one, so (0, 7) boxes stay (0, 7).
            array = np.asarray(info[key], dtype=dtype) if len(info[key]) else np.zeros((0,) + trailing_shape, dtype)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {key} is not a regular array of numbers: {error}") from None
        if array.shape != (num_boxes,) + trailing_shape:
            raise ValueError(f"{where}: {key} has shape {array.shape}, expected {(num_boxes,) + trailing_shape}")
        out[key] = array
    for key in _GT_LISTS:
        if len(info[key]) != num_boxes:
            raise ValueError(f"{where}: {key} has {len(info[key])} entries, gt_boxes has {num_boxes}")
    return out


def _matrix(value: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    matrix = np.asarray(value, dtype=np.float64)
    if matrix.shape != shape or not np.all(np.isfinite(matrix)):
        raise ValueError(f"{where} must be a finite {shape[0]}x{shape[1]} matrix, got shape {matrix.shape}")
    return matrix
