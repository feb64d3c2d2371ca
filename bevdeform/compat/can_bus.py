"""The 18-number CAN-bus input of BEVFormer's published checkpoints, built as the official code builds it.

Official code (fundamentalvision/BEVFormer, master; the files the released checkpoints were trained with):
``tools/data_converter/nuscenes_converter.py`` ``_get_can_bus_info`` writes an 18-vector per sample into the info
file, ``projects/mmdet3d_plugin/datasets/nuscenes_dataset.py`` ``get_data_info`` overwrites parts of it, and the
detector (``detectors/bevformer.py``, and ``union2one`` for training queues) turns two of its parts into deltas.
The vector as the dataset hands it over ("absolute", before the delta step):

====== =============================================================================================================
[0:3]  translation of the keyframe LIDAR_TOP sample_data's ego pose (ego2global, metres, global frame)
[3:7]  meant to be that pose's rotation quaternion, but ``can_bus[3:7] = pyquaternion.Quaternion(...)`` makes numpy
       call ``float(q)`` (= q.w) and broadcast it: all four entries are q.w. The checkpoints were trained on this.
[7:16] accel (3), rotation_rate (3), vel (3) of a CAN-bus ``pose`` message (ego frame), in the order the message's
       keys appear in the file (accel, rotation_rate, vel in the expansion's files), taken from the first message
       whose ``utime`` is strictly AFTER the sample timestamp (the converter's loop breaks there and reads ``pose``,
       not ``last_pose``); the last message when none is after. Zeros for a scene without CAN-bus data (the
       devkit refuses the scenes of its ``can_blacklist``; the converter catches that and writes zeros).
[16]   patch angle in radians, [17] in degrees: the yaw of that ego pose (``quaternion_yaw``) in degrees, +360 when
       negative, so [17] lies in [0, 360) and [16] = [17] / 180 * pi in [0, 2 pi).
====== =============================================================================================================

The detector's step (``official_can_bus_delta``): [0:3] and [17] become the differences to the previous frame's
absolute values, both zero at a scene start; [16] stays absolute. The yaw delta is not wrapped (359 -> 1 degree
gives -358).

Where the files are: the devkit's ``NuScenesCanBus(dataroot=R)`` reads ``R/can_bus/<scene>_pose.json``; the official
converter passes ``--canbus ./data`` with the tables in ``./data/nuscenes``, i.e. the expansion beside the data
root; bevdeform's default is ``<data_root>/can_bus`` (``can_bus_root`` = data_root), either works.

Only numpy and the standard library: the devkit is what the tests compare against.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CAN_BUS_DIRNAME = "can_bus"
CAN_BUS_SIZE = 18
# The devkit's NuScenesCanBus.can_blacklist: real scenes without any CAN-bus data.
SCENES_WITHOUT_CAN_BUS = frozenset({161, 162, 163, 164, 165, 166, 167, 168, 170, 171, 172, 173, 174, 175, 176,
                                    309, 310, 311, 312, 313, 314})
_POSE_VECTOR_KEYS = ("accel", "rotation_rate", "vel")
_SCENE_NAME = re.compile(r"^scene-\d{4}$")


def can_bus_dir(can_bus_root: str | os.PathLike) -> Path:
    """``<can_bus_root>/can_bus`` after checking it exists; FileNotFoundError naming it (and a hint) otherwise."""
    root = Path(can_bus_root)
    folder = root / CAN_BUS_DIRNAME
    if folder.is_dir():
        return folder
    hint = ""
    if (root.parent / CAN_BUS_DIRNAME).is_dir():
        hint = (f"; there is one at {root.parent / CAN_BUS_DIRNAME} (the official layout, beside the data root): "
                f"pass its parent {root.parent} as the CAN-bus root")
    raise FileNotFoundError(
        f"nuScenes CAN bus expansion not found: folder {folder} does not exist{hint}. BEVFormer's checkpoints take "
        f"the 18-number CAN-bus input built from <root>/can_bus/<scene>_pose.json: download 'CAN bus expansion' "
        f"from https://www.nuscenes.org/download and unpack it so that {folder} holds scene-XXXX_pose.json")


def read_pose_messages(can_bus_root: str | os.PathLike, scene_name: str) -> list[dict[str, Any]] | None:
    """The ``pose`` messages of a scene (``<can_bus_root>/can_bus/<scene_name>_pose.json``, in file order), or None
    when the scene has no CAN-bus data (a scene of the devkit's blacklist, or no file for it), where the official
    converter writes zeros.

    Raises FileNotFoundError naming the folder when ``<can_bus_root>/can_bus`` does not exist at all (the expansion
    is missing, not one scene), ValueError for a scene name the devkit refuses or a file that is not a non-empty
    list of pose messages.
    """
    folder = can_bus_dir(can_bus_root)
    if not _SCENE_NAME.match(scene_name):
        raise ValueError(f"scene name {scene_name!r}: the CAN bus expansion names files by scene-NNNN (four digits)")
    if int(scene_name[-4:]) in SCENES_WITHOUT_CAN_BUS:
        return None
    path = folder / f"{scene_name}_pose.json"
    if not path.is_file():
        return None
    try:
        messages = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"CAN bus file {path} is not valid JSON: {error}") from None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"CAN bus file {path} must hold a non-empty list of pose messages")
    for index, message in enumerate(messages):
        _check_message(message, f"{path} message {index}")
    return messages


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise ValueError(f"{where} is not an object")
    rest = [key for key in message if key not in ("utime", "pos", "orientation")]
    if "utime" not in message or sorted(rest) != sorted(_POSE_VECTOR_KEYS):
        raise ValueError(f"{where} has keys {sorted(message)}; a pose message has utime, pos, orientation, "
                         f"{', '.join(_POSE_VECTOR_KEYS)}")
    for key in rest:
        if len(message[key]) != 3:
            raise ValueError(f"{where}: {key} has {len(message[key])} numbers, expected 3")


def pose_message_vector(pose_messages: Sequence[dict[str, Any]] | None, sample_timestamp_us: int) -> np.ndarray:
    """[7:16] of the official vector: the 9 numbers of the first pose message strictly after the sample time.

    pose_messages: a scene's messages in file order (``read_pose_messages``), None for a scene without CAN-bus data
    (zeros, as the converter writes). The numbers follow the message's key order without utime/pos/orientation.
    """
    if pose_messages is None:
        return np.zeros(9)
    chosen = pose_messages[-1]  # the converter's loop variable when it never breaks
    for message in pose_messages:
        if message["utime"] > sample_timestamp_us:
            chosen = message
            break
    # The converter iterates the keys of the last message at or before the sample time, which has the same keys.
    keys = [key for key in chosen if key not in ("utime", "pos", "orientation")]
    return np.array([float(v) for key in keys for v in chosen[key]], dtype=np.float64)


def quaternion_heading_rad(rotation_wxyz: Sequence[float]) -> float:
    """Yaw (rad, (-pi, pi]) of the rotated ego +x axis: atan2 of its global y and x (the devkit's quaternion_yaw)."""
    w, x, y, z = (float(v) for v in rotation_wxyz)
    norm = math.sqrt(w * w + x * x + y * y + z * z)  # pyquaternion normalises before building the matrix
    if norm == 0.0:
        raise ValueError("ego2global_rotation_wxyz is a zero quaternion")
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    # First column of the rotation matrix of a unit quaternion: (1 - 2(y^2 + z^2), 2(xy + wz), 2(xz - wy)).
    return math.atan2(2.0 * (x * y + w * z), 1.0 - 2.0 * (y * y + z * z))


def official_can_bus(ego2global_translation: Sequence[float], ego2global_rotation_wxyz: Sequence[float],
                     pose_messages: Sequence[dict[str, Any]] | None, sample_timestamp_us: int) -> np.ndarray:
    """The official absolute 18-vector (float64) of one sample, before the detector's delta step.

    ego2global_translation / ego2global_rotation_wxyz: the ``ego_pose`` record of the sample's keyframe LIDAR_TOP
    sample_data, as stored (the record's quaternion, not one recovered from a matrix: its sign decides [3:7]).
    pose_messages: the scene's CAN-bus pose messages (``read_pose_messages``) or None (zeros at [7:16]).
    sample_timestamp_us: the sample's timestamp (microseconds).
    """
    translation = np.asarray(ego2global_translation, dtype=np.float64).reshape(-1)
    rotation = np.asarray(ego2global_rotation_wxyz, dtype=np.float64).reshape(-1)
    if translation.shape != (3,) or rotation.shape != (4,):
        raise ValueError(f"ego2global_translation must have 3 numbers and ego2global_rotation_wxyz 4, got "
                         f"{translation.shape} and {rotation.shape}")
    out = np.zeros(CAN_BUS_SIZE, dtype=np.float64)
    out[0:3] = translation
    out[3:7] = rotation[0]  # the q.w broadcast of the official assignment (module docstring)
    out[7:16] = pose_message_vector(pose_messages, sample_timestamp_us)
    # The official arithmetic, in its order (radians -> degrees -> +360 -> radians), so the float64 bits agree.
    patch_angle_deg = quaternion_heading_rad(rotation) / np.pi * 180
    if patch_angle_deg < 0:
        patch_angle_deg += 360
    out[16] = patch_angle_deg / 180 * np.pi
    out[17] = patch_angle_deg
    return out


def official_can_bus_delta(can_bus_abs_curr, can_bus_abs_prev=None):
    """The detector's delta step: (18,) or (B, 18) absolute vectors -> (B, 18) as the model's MLP takes them.

    [0:3] and [17] become ``curr - prev``; with ``can_bus_abs_prev`` None (a scene start, no previous BEV) both are
    zeroed; everything else, [16] included, stays as it is. numpy arrays or torch tensors (the result has the input's
    type, dtype and device; the input is not modified). For a batch mixing scene starts and continuing frames use
    ``official_can_bus_delta_masked``.
    """
    curr = _as_batch(can_bus_abs_curr, "can_bus_abs_curr")
    out = curr.clone() if hasattr(curr, "clone") else curr.copy()
    if can_bus_abs_prev is None:
        out[:, 0:3] = 0
        out[:, 17] = 0
        return out
    prev = _as_batch(can_bus_abs_prev, "can_bus_abs_prev")
    if tuple(prev.shape) != tuple(curr.shape):
        raise ValueError(f"can_bus_abs_prev has shape {tuple(prev.shape)}, can_bus_abs_curr {tuple(curr.shape)}")
    out[:, 0:3] = curr[:, 0:3] - prev[:, 0:3]
    out[:, 17] = curr[:, 17] - prev[:, 17]
    return out


def official_can_bus_delta_masked(can_bus_abs_curr, can_bus_abs_prev, has_prev):
    """``official_can_bus_delta`` per row: rows where ``has_prev`` (B,) is False are scene starts (zeroed)."""
    with_prev = official_can_bus_delta(can_bus_abs_curr, can_bus_abs_prev)
    start = official_can_bus_delta(can_bus_abs_curr, None)
    mask = has_prev.reshape(-1, 1) if hasattr(has_prev, "reshape") else np.asarray(has_prev).reshape(-1, 1)
    if hasattr(with_prev, "clone"):
        import torch

        return torch.where(mask.to(torch.bool), with_prev, start)
    return np.where(np.asarray(mask, dtype=bool), with_prev, start)


def _as_batch(values, name: str):
    if not hasattr(values, "clone"):
        values = np.asarray(values)
    if values.ndim == 1:
        values = values.reshape(1, -1)  # (18,) -> (1, 18)
    if values.ndim != 2 or values.shape[-1] != CAN_BUS_SIZE:
        raise ValueError(f"{name} must have shape (18,) or (B, 18), got {tuple(values.shape)}")
    return values
