"""The official BEVFormer test image pipeline, per published variant, for the ``bevformer_v1`` compatibility path.

What the official configs (projects/configs/bevformer/bevformer_{tiny,small,base}.py, ``test_pipeline``) run, with
mmcv 1.4's semantics:

1. ``LoadMultiViewImageFromFiles(to_float32=True)``: ``mmcv.imread(path, 'unchanged')`` = ``cv2.imread`` with
   ``IMREAD_UNCHANGED`` at full size (BGR uint8; no reduced-size JPEG decode, no EXIF rotation), then float32.
2. ``NormalizeMultiviewImage``: ``mmcv.imnormalize``: optional BGR -> RGB swap, ``cv2.subtract(img, mean)``,
   ``cv2.multiply(img, 1 / std)`` in float32, mean and std given as float32 and widened to float64 by mmcv.
   tiny: mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375), to RGB (torchvision-style ResNet-50).
   small/base: "caffe" mean (103.53, 116.28, 123.675), std 1, BGR kept (the FCOS3D ResNet-101-DCN).
3. ``RandomScaleImageMultiViewImage(scales=[s])`` (tiny 0.5, small 0.8; base has none): ``mmcv.imresize`` to
   ``(int(W * s), int(H * s))`` = ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)`` on the normalised float32
   image (cv2's bilinear: pixel centres aligned, source x = (x + 0.5) / s - 0.5 clamped to the image), and
   ``lidar2img = diag(s, s, 1, 1) @ lidar2img`` (``bevdeform.compat.frames.lidar2img_from``).
4. ``PadMultiViewImage(size_divisor=32)``: ``mmcv.impad_to_multiple`` with 0 right and bottom; the metas'
   ``img_shape`` becomes the PADDED shape (what the official spatial cross-attention normalises by).

Here the target size is the data config's ``image_size_hw`` (for nuScenes' 1600x900: tiny [450, 800], small
[720, 1280], base [900, 1600]), and the projection scale is the plain ratio target / size on disk per axis.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from bevdeform.data.transforms import ImageDecodeError


@dataclass(frozen=True)
class OfficialImageNorm:
    """Normalisation of an official variant: ``(x - mean) / std`` per channel on the 0-255 scale, in the channel
    order of the model's input (RGB when ``to_rgb``, else the decoded BGR)."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    to_rgb: bool


# data.image_pipeline value -> normalisation; "bevdeform" is the default path (bevdeform.data.transforms).
IMAGE_PIPELINES: dict[str, OfficialImageNorm] = {
    "bevformer_v1_tiny": OfficialImageNorm("bevformer_v1_tiny", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375),
                                           True),
    "bevformer_v1_caffe": OfficialImageNorm("bevformer_v1_caffe", (103.53, 116.28, 123.675), (1.0, 1.0, 1.0), False),
}
# The variant's test-time resize factor for nuScenes' 1600x900 images and the pipeline it uses.
VARIANT_IMAGE = {
    "tiny": ("bevformer_v1_tiny", 0.5),
    "small": ("bevformer_v1_caffe", 0.8),
    "base": ("bevformer_v1_caffe", 1.0),
}


def image_norm(name: str) -> OfficialImageNorm:
    """The normalisation of ``data.image_pipeline`` = name; ValueError naming the known ones otherwise."""
    if name not in IMAGE_PIPELINES:
        raise ValueError(f"image pipeline {name!r} is not an official one; expected one of {sorted(IMAGE_PIPELINES)}")
    return IMAGE_PIPELINES[name]


def official_resized_hw(size_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """(int(H * s), int(W * s)): the size RandomScaleImageMultiViewImage resizes to (truncation, not rounding)."""
    return int(size_hw[0] * scale), int(size_hw[1] * scale)


def read_image_unchanged(path: str, size_on_disk_hw: tuple[int, int]) -> np.ndarray:
    """Decode an image file at full size as ``cv2.imread(path, IMREAD_UNCHANGED)`` does (uint8 BGR (H, W, 3)).

    FileNotFoundError for a missing file; ImageDecodeError for an undecodable file, a JPEG without its end marker
    (truncated), or a decoded shape other than (H, W, 3) of ``size_on_disk_hw``.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    if data[:2] == b"\xff\xd8" and data.find(b"\xff\xd9", max(0, len(data) - 64)) < 0:
        raise ImageDecodeError(f"image file {path} is truncated: no JPEG end-of-image marker ({len(data)} bytes)")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageDecodeError(f"image file {path} ({len(data)} bytes) cannot be decoded by OpenCV")
    expected = (int(size_on_disk_hw[0]), int(size_on_disk_hw[1]), 3)
    if image.shape != expected:
        raise ImageDecodeError(f"image file {path} decodes to shape {image.shape}, expected {expected} (BGR at the "
                               f"size the info file gives)")
    return image


def normalize_official(image_bgr: np.ndarray, norm: OfficialImageNorm) -> np.ndarray:
    """mmcv.imnormalize of a BGR (H, W, 3) image (uint8 or float32): float32 (H, W, 3) in the model's channel order.

    A uint8 image goes through a per-channel 256-entry table built by the very same OpenCV operations (``cv2.LUT``):
    the operations act on each pixel alone, so the result is bit-identical and ~10x faster at 1600x900.
    """
    if image_bgr.dtype == np.uint8 and image_bgr.ndim == 3 and image_bgr.shape[2] == 3:
        table = _normalisation_table(norm)  # (1, 256, 3) float32, indexed by the BGR value of each channel
        if norm.to_rgb:
            return cv2.LUT(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB), table)
        return cv2.LUT(image_bgr, table)
    return _normalize_with_cv2(image_bgr, norm)


@functools.lru_cache(maxsize=8)
def _normalisation_table(norm: OfficialImageNorm) -> np.ndarray:
    """(1, 256, 3) float32: what mmcv.imnormalize makes of value v in (model-order) channel c, at [0, v, c]."""
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3): v in every channel
    plain = OfficialImageNorm(norm.name, norm.mean, norm.std, to_rgb=False)  # the channel swap happens before
    return _normalize_with_cv2(ramp, plain)


def _normalize_with_cv2(image_bgr: np.ndarray, norm: OfficialImageNorm) -> np.ndarray:
    """mmcv.imnormalize's own operations: float32 copy, optional BGR -> RGB, cv2.subtract, cv2.multiply."""
    image = image_bgr.astype(np.float32)  # a copy
    mean = np.float64(np.asarray(norm.mean, dtype=np.float32).reshape(1, -1))
    std_inv = 1.0 / np.float64(np.asarray(norm.std, dtype=np.float32).reshape(1, -1))
    if norm.to_rgb:
        cv2.cvtColor(image, cv2.COLOR_BGR2RGB, image)
    cv2.subtract(image, mean, image)
    cv2.multiply(image, std_inv, image)
    return image


def resize_official(image: np.ndarray, target_hw: tuple[int, int]) -> np.ndarray:
    """mmcv.imresize(img, (w, h)) with its default 'bilinear': cv2.resize with INTER_LINEAR (no anti-aliasing)."""
    if image.shape[:2] == tuple(target_hw):
        return image
    return cv2.resize(image, (int(target_hw[1]), int(target_hw[0])), interpolation=cv2.INTER_LINEAR)


def official_image_into_chw(image_bgr: np.ndarray, norm: OfficialImageNorm, target_hw: tuple[int, int],
                            out_chw: np.ndarray) -> None:
    """Normalise, resize to ``target_hw`` and write channels-first into the top-left of ``out_chw``.

    out_chw: float32 (3, H_pad, W_pad) whose padding the caller has zeroed (PadMultiViewImage pads with 0 AFTER
    normalisation, so the padding is 0, not the mean colour's value).
    """
    height, width = int(target_hw[0]), int(target_hw[1])
    if out_chw.dtype != np.float32 or out_chw.ndim != 3 or out_chw.shape[0] != 3 \
            or out_chw.shape[1] < height or out_chw.shape[2] < width:
        raise ValueError(f"out_chw must be float32 (3, >= {height}, >= {width}), got {out_chw.dtype} {out_chw.shape}")
    image = resize_official(normalize_official(image_bgr, norm), (height, width))
    # (h, w, 3) -> (3, h, w)
    out_chw[:, :height, :width] = image.transpose(2, 0, 1)


def official_test_image(image_bgr: np.ndarray, norm: OfficialImageNorm, target_hw: tuple[int, int],
                        size_divisor: int = 32) -> np.ndarray:
    """The whole official test transform of one decoded image: float32 (3, H_pad, W_pad), padding 0."""
    from bevdeform.data.transforms import padded_size

    padded_h, padded_w = padded_size((int(target_hw[0]), int(target_hw[1])), size_divisor)
    out = np.zeros((3, padded_h, padded_w), dtype=np.float32)
    official_image_into_chw(image_bgr, norm, target_hw, out)
    return out
