"""Camera image transforms: decode, resize (with the intrinsics that follow it), photometric jitter, normalise, pad.

Everything here works on numpy arrays with OpenCV; nothing touches torch.

Pixel convention (used by every function here and by ``ego2img`` in the batch): integer pixel coordinates are pixel
*centres*, the top-left pixel's centre is (0, 0) and its area spans [-0.5, 0.5]^2. This is the convention of the
nuScenes calibration (OpenCV's pinhole model) and of ``nuscenes.utils.geometry_utils.view_points``. ``cv2.resize``
(every interpolation used here) and libjpeg's reduced-size decoding keep the image *edges* aligned, so a resize by
``(scale_x, scale_y)`` maps a pixel position as

    u' = (u + 0.5) * scale_x - 0.5,        v' = (v + 0.5) * scale_y - 0.5,

which for the pinhole model ``u = fx * X / Z + cx`` gives ``fx' = fx * scale_x`` and
``cx' = (cx + 0.5) * scale_x - 0.5`` (the same for y). Scaling ``cx`` by ``scale_x`` alone (as BEVFormer does) is
off by ``0.5 * (1 - scale_x)`` pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

# ImageNet statistics in RGB order on the 0-255 scale: what torchvision's ImageNet weights expect.
IMAGENET_MEAN_RGB: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB: tuple[float, float, float] = (58.395, 57.12, 57.375)

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
# A JPEG may legally carry a few bytes after its end-of-image marker (some encoders pad); look this far back for it.
_JPEG_EOI_SEARCH_BYTES = 64
_REDUCED_DECODE_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageDecodeError(RuntimeError):
    """An image file exists but cannot be decoded completely (corrupt or truncated)."""


def read_image_bgr(path: str, size_on_disk_hw: tuple[int, int], target_hw: tuple[int, int],
                   reduced_jpeg_decode: bool = True) -> np.ndarray:
    """Read an image file as uint8 BGR (H, W, 3), optionally decoded directly at 1/2, 1/4 or 1/8 of its size.

    Args:
        path: image file.
        size_on_disk_hw: (height, width) the file is expected to have, pixels (from the info file). A file of another
            size is an error: the intrinsics were calibrated for the stated size.
        target_hw: (height, width) the caller will resize to. When ``reduced_jpeg_decode`` is set, the file is a JPEG
            and a power-of-two reduction r in (8, 4, 2) divides both sides and keeps the image at least as large as
            the target, libjpeg decodes at 1/r directly (several times faster than a full decode). That reduction
            keeps the image edges aligned like ``cv2.resize`` (the half-pixel map of the module docstring) and matches
            ``INTER_AREA`` to within ~0.01 grey levels, so the geometry is exactly that of a resize by 1/r.

    Returns:
        uint8 array (h, w, 3), BGR, where (h, w) is ``size_on_disk_hw`` divided by the reduction used (1 when none).

    Raises:
        FileNotFoundError: no file at ``path``.
        ImageDecodeError: the file cannot be decoded, a JPEG lacks its end-of-image marker (truncated; OpenCV would
            otherwise return a silently grey-filled image), or the decoded size is not the expected one.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    is_jpeg = data[:2] == _JPEG_SOI
    if is_jpeg and data.find(_JPEG_EOI, max(0, len(data) - _JPEG_EOI_SEARCH_BYTES)) < 0:
        raise ImageDecodeError(f"image file {path} is truncated: no JPEG end-of-image marker in its last "
                               f"{_JPEG_EOI_SEARCH_BYTES} bytes ({len(data)} bytes in all)")
    height, width = size_on_disk_hw
    reduction = 1
    if reduced_jpeg_decode and is_jpeg:
        reduction = jpeg_reduction_factor(size_on_disk_hw, target_hw)
    flag = _REDUCED_DECODE_FLAGS[reduction] if reduction > 1 else cv2.IMREAD_COLOR
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if image is None:
        raise ImageDecodeError(f"image file {path} ({len(data)} bytes) cannot be decoded by OpenCV")
    expected_shape = (height // reduction, width // reduction, 3)
    if image.shape != expected_shape:
        raise ImageDecodeError(f"image file {path} decodes to shape {image.shape} (at reduction 1/{reduction}), "
                               f"expected {expected_shape}: the info file gives {width}x{height} pixels")
    return image


def jpeg_reduction_factor(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> int:
    """Largest r in (8, 4, 2) that divides both sides of ``size_hw`` and keeps size / r >= ``target_hw``; else 1."""
    height, width = size_hw
    target_height, target_width = target_hw
    for reduction in (8, 4, 2):
        if (height % reduction == 0 and width % reduction == 0
                and height // reduction >= target_height and width // reduction >= target_width):
            return reduction
    return 1


def resize_image(image: np.ndarray, target_hw: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, C) image to ``target_hw`` = (height, width) pixels with ``cv2.resize``.

    Interpolation: ``INTER_AREA`` when a side shrinks below half (anti-aliasing matters there), ``INTER_LINEAR``
    otherwise (a milder shrink or an enlargement: it is 4-5x faster than ``INTER_AREA`` at non-integer factors and
    is what BEVFormer's scale augmentation uses). Both follow the half-pixel map of the module docstring. An image
    already at the target size is returned as is.
    """
    height, width = image.shape[:2]
    target_height, target_width = target_hw
    if (height, width) == (target_height, target_width):
        return image
    shrinks_below_half = target_width * 2 < width or target_height * 2 < height
    interpolation = cv2.INTER_AREA if shrinks_below_half else cv2.INTER_LINEAR
    # cv2 takes dsize as (width, height).
    return cv2.resize(image, (target_width, target_height), interpolation=interpolation)


def scale_intrinsics(intrinsics: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """The 3x3 intrinsics of an image resized by (scale_x, scale_y), half-pixel-centre convention.

    ``fx' = fx * sx``, ``cx' = (cx + 0.5) * sx - 0.5`` and the same for y (see the module docstring); the skew term is
    scaled by ``sx``. Returns a new float64 array.
    """
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    if intrinsics.shape != (3, 3):
        raise ValueError(f"intrinsics must be 3x3, got shape {intrinsics.shape}")
    # Left-multiplying by this affine pixel map applies u' = sx * u + 0.5 * (sx - 1) to every projected point.
    pixel_map = np.array([[scale_x, 0.0, 0.5 * (scale_x - 1.0)],
                          [0.0, scale_y, 0.5 * (scale_y - 1.0)],
                          [0.0, 0.0, 1.0]])
    return pixel_map @ intrinsics


def resize_pixel_coords(uv: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Map pixel coordinates (..., 2) = (u, v) of an image to those of the image resized by (scale_x, scale_y)."""
    uv = np.asarray(uv, dtype=np.float64)
    scale = np.array([scale_x, scale_y])
    return (uv + 0.5) * scale - 0.5


def padded_size(size_hw: tuple[int, int], multiple: int = 32) -> tuple[int, int]:
    """(height, width) rounded up to a multiple of ``multiple`` (padding goes right and bottom)."""
    if multiple < 1:
        raise ValueError(f"pad multiple must be >= 1, got {multiple}")
    height, width = size_hw
    return (-(-height // multiple) * multiple, -(-width // multiple) * multiple)


def normalize_bgr_into_chw(image_bgr: np.ndarray, out_chw: np.ndarray,
                           mean_rgb: tuple[float, float, float] = IMAGENET_MEAN_RGB,
                           std_rgb: tuple[float, float, float] = IMAGENET_STD_RGB) -> None:
    """Write ``(rgb - mean) / std`` of a BGR (h, w, 3) image into the top-left (3, h, w) of ``out_chw``.

    ``out_chw`` is a float32 (3, H_pad, W_pad) buffer with H_pad >= h, W_pad >= w, whose padding the caller has
    zeroed (0 after normalisation is the mean colour, as mmdet pads). Converting, swapping BGR to RGB, transposing
    to channels-first and normalising happen in one pass per channel, with no full-size temporary. ``image_bgr`` may
    be uint8 or float32 (after photometric jitter).
    """
    height, width = image_bgr.shape[:2]
    if out_chw.dtype != np.float32 or out_chw.ndim != 3 or out_chw.shape[0] != 3:
        raise ValueError(f"out_chw must be float32 (3, H, W), got {out_chw.dtype} {out_chw.shape}")
    if out_chw.shape[1] < height or out_chw.shape[2] < width:
        raise ValueError(f"image of {height}x{width} pixels does not fit the buffer {out_chw.shape[1:]}")
    for channel_rgb in range(3):
        target = out_chw[channel_rgb, :height, :width]
        # BGR channel 2 is red: RGB channel c sits at BGR index 2 - c.
        target[...] = image_bgr[:, :, 2 - channel_rgb]
        target -= np.float32(mean_rgb[channel_rgb])
        target *= np.float32(1.0 / std_rgb[channel_rgb])


def denormalize_chw_to_bgr(image_chw: np.ndarray, mean_rgb: tuple[float, float, float] = IMAGENET_MEAN_RGB,
                           std_rgb: tuple[float, float, float] = IMAGENET_STD_RGB) -> np.ndarray:
    """Inverse of ``normalize_bgr_into_chw`` for display: float (3, H, W) RGB-normalised -> uint8 (H, W, 3) BGR."""
    mean = np.asarray(mean_rgb, dtype=np.float32)[:, None, None]
    std = np.asarray(std_rgb, dtype=np.float32)[:, None, None]
    rgb_chw = image_chw * std + mean
    # (3, H, W) RGB -> (H, W, 3) BGR
    bgr_hwc = rgb_chw[::-1].transpose(1, 2, 0)
    return np.clip(np.rint(bgr_hwc), 0, 255).astype(np.uint8)


class PhotoMetricDistortion:
    """Random brightness, contrast, saturation and hue jitter, the steps and ranges of mmdet's PhotoMetricDistortion.

    Each step happens with probability 1/2, in this order: brightness (add U(-brightness_delta, +brightness_delta)
    grey levels); contrast (multiply by U(contrast_range)) either here or after the colour steps, chosen with
    probability 1/2; conversion to HSV; saturation (multiply S by U(saturation_range)); hue (add
    U(-hue_delta_deg, +hue_delta_deg) degrees, wrapped to [0, 360)); back to BGR; contrast if it was not done first;
    optionally a random permutation of the channels (mmdet does this; off by default here, as it turns red lights blue).
    Values are not clipped, as in mmdet. Pixels change; geometry never does.

    All randomness comes from the ``numpy.random.Generator`` passed to ``__call__``, so a seeded generator gives the
    same result on every run and in every process.
    """

    def __init__(self, brightness_delta: float = 32.0, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta_deg: float = 18.0,
                 channel_swap: bool = False):
        if brightness_delta < 0 or hue_delta_deg < 0:
            raise ValueError(f"brightness_delta ({brightness_delta}) and hue_delta_deg ({hue_delta_deg}) must be >= 0")
        for name, (low, high) in (("contrast_range", contrast_range), ("saturation_range", saturation_range)):
            if not 0 <= low <= high:
                raise ValueError(f"{name} must satisfy 0 <= low <= high, got ({low}, {high})")
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta_deg = float(hue_delta_deg)
        self.channel_swap = bool(channel_swap)

    def __call__(self, image_bgr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Jitter a BGR (H, W, 3) image (uint8 or float32, 0-255 scale); returns a new float32 BGR image."""
        image = image_bgr.astype(np.float32)  # a copy: the caller's array is never modified
        if rng.integers(2):
            image += np.float32(rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = bool(rng.integers(2))
        if contrast_first and rng.integers(2):
            image *= np.float32(rng.uniform(*self.contrast_range))
        apply_saturation = bool(rng.integers(2))
        saturation = rng.uniform(*self.saturation_range) if apply_saturation else 1.0
        apply_hue = bool(rng.integers(2))
        hue_shift_deg = rng.uniform(-self.hue_delta_deg, self.hue_delta_deg) if apply_hue else 0.0
        if apply_saturation or apply_hue:
            # float32 HSV in OpenCV: H in [0, 360), S in [0, 1], V on the input's scale.
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            if apply_saturation:
                hsv[:, :, 1] *= np.float32(saturation)
            if apply_hue:
                hue = hsv[:, :, 0]
                hue += np.float32(hue_shift_deg)
                hue[hue >= 360.0] -= 360.0
                hue[hue < 0.0] += 360.0
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if not contrast_first and rng.integers(2):
            image *= np.float32(rng.uniform(*self.contrast_range))
        if self.channel_swap and rng.integers(2):
            image = np.ascontiguousarray(image[:, :, rng.permutation(3)])
        return image
