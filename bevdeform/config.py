"""Typed configuration: dataclasses loaded from YAML, command-line overrides, and the one model builder.

A config file reads top to bottom as "this model, these data, this optimiser"::

    model:   embed_dims, num_cameras, backbone, neck, encoder, decoder, loss, decoding
    data:    where the info files are, image size, temporal queue, point-cloud range, classes, loaders
    train:   AdamW + cosine schedule with linear warm-up, clipping, epochs, precision, seed

Rules:
- Every key of a YAML file must be a field of the dataclass at that place; an unknown key is an error that names
  the file, the dotted key and the closest valid keys (a typo would otherwise silently fall back to a default).
  A key left out takes the dataclass default (the BEVFormer-tiny values), but the shipped files spell out every key.
- Values are checked against the field's type (an int is accepted where a float is expected; lists become tuples).
- Overrides are ``dotted.key=value`` strings, the value parsed as YAML (``train.lr=1e-4``, ``data.image_size_hw=[256,
  448]``, ``model.decoder.num_queries=300``, ``train.max_steps=null``); they are applied to the file's contents
  before the types are checked, so an override is checked exactly like the file.
- Model classes never see a :class:`Config`: :func:`build_model` is the one place that maps config -> constructor
  arguments.

``load_config(name_or_path, overrides)``: a bare name (``bev_tiny``) is looked up as ``<name>.yaml`` in the
config directories (:func:`config_dirs`): ``configs/`` beside the package in a source checkout, then the package
data ``bevdeform._configs`` of an installed wheel (mapped from ``configs/`` in pyproject.toml). Anything with a
path separator or a ``.yaml``/``.yml`` suffix is read as a file path.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "BackboneConfig",
    "NeckConfig",
    "EncoderConfig",
    "DecoderConfig",
    "LossConfig",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "Config",
    "ConfigError",
    "available_configs",
    "config_dirs",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "build_model",
    "count_parameters",
]

# The index order of docs/data-format.md (bevdeform.data.infos.CLASS_NAMES); repeated here so that reading a config
# does not import the data package. tests/test_model.py checks the two stay equal.
NUSCENES_CLASS_NAMES: tuple[str, ...] = (
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (unknown key, wrong type, inconsistent values)."""


# ----------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class BackboneConfig:
    """Image backbone: ResNet (``bevdeform.models.backbone.ResNet``) or DAT++ (``bevdeform.models.dat.DAT``)."""

    type: str = "resnet"  # resnet | dat (DAT++: reads variant, out_indices, frozen_stages, with_checkpoint, ...)
    variant: str = "tiny"  # dat only: tiny | small | base (bevdeform.models.dat.DAT_VARIANTS); resnet uses depth
    drop_path_rate: float = 0.0  # dat only: stochastic depth, linear over the blocks up to this rate
    depth: int = 50  # 18, 34, 50, 101
    out_indices: tuple[int, ...] = (3,)  # stages fed to the neck, 0..3 = C2..C5 (strides 4..32)
    frozen_stages: int = 1  # -1 none, 0 stem, k stem + layer1..layerk
    norm_eval: bool = True  # frozen BN: running statistics used, affine parameters not trained
    with_checkpoint: bool = False  # recompute residual blocks in backward to save memory
    pretrained_path: str | None = None  # local torchvision-style ResNet state dict (.pth), None = random init
    # resnet only: where a Bottleneck's stride sits (pytorch: the 3x3 conv; caffe: the first 1x1, mmdet's caffe
    # style) and which stages (layer1..layer4) use modulated deformable 3x3 convs (DCNv2, bevdeform.dcn).
    style: str = "pytorch"
    dcn_stages: tuple[bool, bool, bool, bool] = (False, False, False, False)


@dataclass
class NeckConfig:
    """FPN (``bevdeform.models.neck.FPN``); its width is ``model.embed_dims`` and its inputs the backbone stages."""

    num_outs: int = 1  # feature levels out = len(backbone.out_indices) + extra levels
    add_extra_convs: bool = True
    relu_before_extra_convs: bool = True


@dataclass
class EncoderConfig:
    """BEV encoder (``bevdeform.models.encoder.BEVEncoder``): temporal + spatial cross-attention layers."""

    num_layers: int = 3
    bev_h: int = 50  # rows, along ego y
    bev_w: int = 50  # columns, along ego x
    num_heads: int = 8
    ffn_dims: int = 512
    num_points_in_pillar: int = 4  # height anchors per BEV pillar
    sca_num_points: int = 8  # spatial cross-attention points per query per level
    tsa_num_points: int = 4  # temporal self-attention points
    dropout: float = 0.1
    # bevformer_v1 compatibility options (docs/model.md "BEVFormer compatibility"); defaults = bevdeform's own path.
    temporal_alignment: str = "exact_warp"  # exact_warp | official_rotate (torchvision rotate + reference shift)
    rotate_center_px: tuple[float, float] = (100.0, 100.0)  # official_rotate's centre (x = column, y = row)
    official_shift_ref_inplace_bug: bool = False  # official_rotate: shift both TSA queues (released checkpoints)
    tsa_value: str = "per_layer"  # per_layer | initial_queries (BEVFormer: value built once before the layers)
    pillar_heights: str = "slab_centres"  # slab_centres | official_linspace
    sca_half_pixel: bool = True  # False: reference u / W_pad and visibility 0 < u / W_pad (official)
    sca_visibility: str = "unpadded"  # unpadded | padded (official: visible anywhere in the padded image)
    ego_motion_input: str = "ego_motion6"  # ego_motion6 | can_bus18 (batch field can_bus, official 18 numbers)


@dataclass
class DecoderConfig:
    """Object-query decoder (``bevdeform.models.decoder.DetectionDecoder``) with iterative box refinement."""

    num_layers: int = 6
    num_queries: int = 900
    num_heads: int = 8
    num_points: int = 4  # deformable cross-attention points on the BEV
    ffn_dims: int = 512
    dropout: float = 0.1
    # learned (BEVFormer) | heatmap (two-stage: queries start at the BEV heatmap's peaks; needs
    # model.loss.bev_heatmap_weight > 0, and the heatmap head then runs at inference too)
    query_init: str = "learned"
    # the velocity outputs of the regression branch times this are (vx, vy) in m/s; 1.0 = BEVFormer (raw m/s)
    velocity_scale_mps: float = 1.0
    # the heading outputs of the regression branch times this are (sin, cos) of the yaw; 1.0 = BEVFormer
    heading_scale: float = 1.0


@dataclass
class LossConfig:
    """Hungarian matching + focal / L1 losses on every decoder layer (``bevdeform.models.head.DetectionLoss``)."""

    cls_weight: float = 2.0
    reg_weight: float = 0.25
    code_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
    alpha: float = 0.25
    gamma: float = 2.0
    # Auxiliary dense BEV centre-heatmap loss (bevdeform.models.bev_heatmap, training only): 0 builds no head, as
    # BEVFormer; > 0 adds BEVHeatmapHead with this weight, which speeds up learning from scratch (bev_nano).
    bev_heatmap_weight: float = 0.0
    # Auxiliary dense box regression at the ground-truth centre cells of the BEV (bev_heatmap.BEVBoxRegressionHead,
    # training only; CenterPoint's regression heads): 0 builds no head; > 0 its weight. Its velocity unit is
    # model.decoder.velocity_scale_mps.
    bev_box_weight: float = 0.0


@dataclass
class ModelConfig:
    """The detector. The point-cloud range and the classes come from :class:`DataConfig` (one source for both)."""

    embed_dims: int = 256  # width of the neck, BEV features and queries
    num_cameras: int = 6
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    max_detections: int = 300  # top-k of the Q x C scores kept by decoding
    score_threshold: float | None = None  # None keeps all top-k (what the nuScenes metrics want)
    # Decoded centres outside this box (ego frame, metres) are dropped: BEVFormer's range +-10 m around the grid.
    post_center_range_m: tuple[float, ...] | None = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    # The model's frame: "ego" (bevdeform: batch ego2img, ego_prev2curr; BEV and boxes in the ego frame) or "lidar"
    # (bevformer_v1: batch lidar2img, the CAN-bus vector from can_bus_abs(_history) through the official delta step;
    # BEV, boxes and post_center_range_m in the keyframe's LIDAR_TOP frame).
    frame: str = "ego"
    # The BEV range in the model's frame; null = data.point_cloud_range_m (ego frame). bevformer_v1: the official
    # lidar range [-51.2, -51.2, -5, 51.2, 51.2, 3].
    point_cloud_range_m: tuple[float, ...] | None = None
    # The attribute_name of each result (bevdeform.evaluation.ATTRIBUTE_RULES): "class_default" (one per class) or
    # "velocity" (from the predicted speed, as mmdet3d / the official BEVFormer evaluation formats results).
    attribute_rule: str = "class_default"


@dataclass
class DataConfig:
    """Dataset and loaders (``bevdeform.data``); the batch format is docs/data-format.md."""

    data_root: str = "data/nuscenes"
    train_info_path: str | None = "data/nuscenes/v1.0-trainval_infos_train.json"
    val_info_path: str | None = "data/nuscenes/v1.0-trainval_infos_val.json"
    image_size_hw: tuple[int, int] = (450, 800)  # (height, width) each camera is resized to, before padding
    pad_multiple: int = 32  # right/bottom zero padding to a multiple of this (the backbone's largest stride)
    queue_length: int = 3  # training frames per sample: history + current
    val_queue_length: int = 1  # evaluation streams frames in scene order and carries the BEV between batches
    # Ego frame (x forward, y left, z up), metres: BEVFormer's lidar-frame range lifted by LIDAR_TOP's ~1.84 m.
    point_cloud_range_m: tuple[float, ...] = (-51.2, -51.2, -3.0, 51.2, 51.2, 5.0)
    class_names: tuple[str, ...] = NUSCENES_CLASS_NAMES
    train_batch_size: int = 1  # per process
    val_batch_size: int = 1
    num_workers: int = 4
    photometric_aug: bool = True
    # BEVFormer's published checkpoints (bevdeform.compat, configs/bevformer_*.yaml): the batch also carries
    # lidar2img, can_bus_abs, can_bus_abs_history, lidar2ego, img_shape_hw (info files need can_bus_v1, written by
    # data_prep/create_infos.py from a data root with the nuScenes CAN bus expansion).
    bevformer_v1_inputs: bool = False
    # bevdeform (default) | bevformer_v1_tiny (RGB, ImageNet mean/std) | bevformer_v1_caffe (BGR, caffe mean, std 1):
    # the official test image pipeline (full decode, normalise, bilinear resize to image_size_hw, zero pad).
    image_pipeline: str = "bevdeform"


@dataclass
class TrainConfig:
    """Optimisation (BEVFormer's): AdamW, cosine decay after a linear warm-up, grad-norm clipping."""

    lr: float = 2.0e-4
    weight_decay: float = 0.01
    backbone_lr_mult: float = 0.1  # the (ImageNet-initialised) backbone learns 10x slower
    grad_clip_norm: float | None = 35.0
    warmup_steps: int = 500
    warmup_ratio: float = 0.333333  # lr starts at lr * warmup_ratio and rises linearly to lr
    min_lr_ratio: float = 1.0e-3  # cosine floor = lr * min_lr_ratio
    epochs: int = 24
    max_steps: int | None = None  # stop earlier than `epochs` (smoke runs); None = no limit
    accumulate_grad_batches: int = 1
    precision: str = "32-true"  # Lightning precision string: 32-true, 16-mixed, bf16-mixed
    seed: int = 0
    # Backbone and neck weights (hence their activations) in channels-last memory format: the same numbers, faster
    # convolutions on CPUs (oneDNN) and on GPUs with mixed precision (docs/benchmarks.md, "Main job").
    channels_last: bool = False


@dataclass
class Config:
    """A whole run: model, data and optimisation. ``name`` is the config's file stem (informational)."""

    name: str = "bev_tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Cross-field checks the types cannot express; raises :class:`ConfigError` naming the key."""
        m, d, t = self.model, self.data, self.train
        _require(m.embed_dims > 0, "model.embed_dims", m.embed_dims, "> 0")
        _require(m.embed_dims % m.encoder.num_heads == 0, "model.encoder.num_heads", m.encoder.num_heads,
                 f"a divisor of model.embed_dims={m.embed_dims}")
        _require(m.embed_dims % m.decoder.num_heads == 0, "model.decoder.num_heads", m.decoder.num_heads,
                 f"a divisor of model.embed_dims={m.embed_dims}")
        _require(m.num_cameras >= 1, "model.num_cameras", m.num_cameras, ">= 1")
        _require(m.backbone.type in ("resnet", "dat"), "model.backbone.type", m.backbone.type, "resnet or dat")
        _require(m.backbone.type != "dat" or m.backbone.variant in ("tiny", "small", "base"),
                 "model.backbone.variant", m.backbone.variant, "tiny, small or base (DAT++)")
        _require(m.backbone.style in ("pytorch", "caffe"), "model.backbone.style", m.backbone.style, "pytorch or caffe")
        _require(not any(m.backbone.dcn_stages) or m.backbone.depth in (50, 101), "model.backbone.dcn_stages",
                 m.backbone.dcn_stages, f"all false for depth {m.backbone.depth} (DCN needs a Bottleneck depth 50/101)")
        _require(m.neck.num_outs >= len(m.backbone.out_indices), "model.neck.num_outs", m.neck.num_outs,
                 f">= len(model.backbone.out_indices)={len(m.backbone.out_indices)}")
        _require(m.encoder.bev_h >= 1 and m.encoder.bev_w >= 1, "model.encoder.bev_h/bev_w",
                 (m.encoder.bev_h, m.encoder.bev_w), ">= 1")
        for option, allowed in (("temporal_alignment", ("exact_warp", "official_rotate")),
                                ("tsa_value", ("per_layer", "initial_queries")),
                                ("pillar_heights", ("slab_centres", "official_linspace")),
                                ("sca_visibility", ("unpadded", "padded")),
                                ("ego_motion_input", ("ego_motion6", "can_bus18"))):
            _require(getattr(m.encoder, option) in allowed, f"model.encoder.{option}", getattr(m.encoder, option),
                     " or ".join(allowed))
        _require(m.decoder.num_queries >= 1, "model.decoder.num_queries", m.decoder.num_queries, ">= 1")
        for scale in ("velocity_scale_mps", "heading_scale"):
            _require(getattr(m.decoder, scale) > 0, f"model.decoder.{scale}", getattr(m.decoder, scale), "> 0")
        _require(m.decoder.query_init in ("learned", "heatmap"), "model.decoder.query_init", m.decoder.query_init,
                 "learned or heatmap")
        _require(m.decoder.query_init != "heatmap" or m.loss.bev_heatmap_weight > 0, "model.decoder.query_init",
                 m.decoder.query_init, "learned, or heatmap together with model.loss.bev_heatmap_weight > 0 (the "
                 "queries start at that head's peaks)")
        _require(m.frame in ("ego", "lidar"), "model.frame", m.frame, "ego or lidar")
        _require(m.attribute_rule in ("class_default", "velocity"), "model.attribute_rule", m.attribute_rule,
                 "class_default or velocity")
        _require(m.point_cloud_range_m is None or (len(m.point_cloud_range_m) == 6 and all(
            m.point_cloud_range_m[k] < m.point_cloud_range_m[k + 3] for k in range(3))), "model.point_cloud_range_m",
            m.point_cloud_range_m, "null or 6 numbers (x_min, y_min, z_min, x_max, y_max, z_max), min < max")
        _require(len(m.loss.code_weights) == 10, "model.loss.code_weights", m.loss.code_weights, "10 numbers")
        _require(m.post_center_range_m is None or len(m.post_center_range_m) == 6, "model.post_center_range_m",
                 m.post_center_range_m, "6 numbers (x_min, y_min, z_min, x_max, y_max, z_max) or null")
        pcr = d.point_cloud_range_m
        _require(len(pcr) == 6 and all(pcr[k] < pcr[k + 3] for k in range(3)),
                 "data.point_cloud_range_m", pcr, "6 numbers (x_min, y_min, z_min, x_max, y_max, z_max), min < max")
        _require(len(d.class_names) >= 1 and len(set(d.class_names)) == len(d.class_names), "data.class_names",
                 d.class_names, "a non-empty list of distinct names")
        _require(min(d.image_size_hw) >= 1, "data.image_size_hw", d.image_size_hw, "(height, width) >= 1")
        largest_stride = 4 * 2 ** max(m.backbone.out_indices)
        _require(d.pad_multiple >= 1 and d.pad_multiple % largest_stride == 0, "data.pad_multiple", d.pad_multiple,
                 f"a multiple of the backbone's largest stride {largest_stride}, so feature maps tile the padded "
                 f"image exactly")
        _require(d.queue_length >= 1 and d.val_queue_length >= 1, "data.queue_length/val_queue_length",
                 (d.queue_length, d.val_queue_length), ">= 1")
        _require(d.image_pipeline in ("bevdeform", "bevformer_v1_tiny", "bevformer_v1_caffe"), "data.image_pipeline",
                 d.image_pipeline, "bevdeform, bevformer_v1_tiny or bevformer_v1_caffe")
        _require(d.train_batch_size >= 1 and d.val_batch_size >= 1, "data.train_batch_size/val_batch_size",
                 (d.train_batch_size, d.val_batch_size), ">= 1")
        _require(t.lr > 0, "train.lr", t.lr, "> 0")
        _require(0.0 < t.warmup_ratio <= 1.0, "train.warmup_ratio", t.warmup_ratio, "in (0, 1]")
        _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio, "in [0, 1]")
        _require(t.epochs >= 1, "train.epochs", t.epochs, ">= 1")
        _require(t.precision in ("32-true", "32", "16-mixed", "bf16-mixed", "64-true"), "train.precision",
                 t.precision, "one of 32-true, 16-mixed, bf16-mixed, 64-true")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


# ----------------------------------------------------------------------------------------------------------------
# Conversion between plain dicts (YAML) and the dataclasses
# ----------------------------------------------------------------------------------------------------------------
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields (the module uses postponed annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _closest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}valid keys: {', '.join(valid)}"


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check / convert a YAML value to the field type ``tp``; ``key`` is the dotted path for error messages."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key, source)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key}={value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _dataclass_from_dict(tp, value, key, source)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it rather than make users write 1.0e-4.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        # An override such as train.precision=32 arrives as a YAML number; the text the user typed is meant.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"config schema: unsupported field type {tp!r} at {key}")  # a bug in this module


def _dataclass_from_dict(cls: type, data: dict, prefix: str, source: str) -> Any:
    field_types = _field_types(cls)
    unknown = [k for k in data if k not in field_types]
    if unknown:
        key = unknown[0]
        dotted = f"{prefix}.{key}" if prefix else str(key)
        raise ConfigError(f"{source}: unknown key {dotted!r}; {_closest(str(key), list(field_types))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, field_types[name], f"{prefix}.{name}" if prefix else name, source)
    return cls(**kwargs)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config` from nested plain data (what ``yaml.safe_load`` returns)."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a config must be a mapping with model/data/train sections, got {type(data).__name__}"
        )
    cfg = _dataclass_from_dict(Config, data, "", source)
    try:
        cfg.validate()
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Nested plain data (tuples as lists), in field order: what :func:`save_config` writes."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------------------------
def _merge(base: dict, update: dict) -> None:
    """Deep-merge ``update`` into ``base`` in place (mappings merge, anything else replaces)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _apply_override(data: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override to the raw config dict, checking the key path against the schema."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value, e.g. train.lr=1e-4")
    dotted, text = override.split("=", 1)
    dotted = dotted.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {error}") from None
    parts = dotted.split(".")
    cls: Any = Config
    node = data
    for depth, part in enumerate(parts):
        field_types = _field_types(cls)
        if part not in field_types:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(
                f"override {override!r}: unknown key {part!r} in {where}; {_closest(part, list(field_types))}"
            )
        if depth == len(parts) - 1:
            if isinstance(value, dict) and isinstance(node.get(part), dict):
                _merge(node[part], value)  # section=<mapping> changes the keys it names, keeps the file's others
            else:
                node[part] = value
            return
        tp = field_types[part]
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: depth + 1])} in the file is not a mapping")
        node, cls = child, tp


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------
def config_dirs() -> list[Path]:
    """Where config names are looked up, in order: the checkout's ``configs/``, then the installed package data."""
    dirs = []
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        dirs.append(checkout)
    try:
        packaged = importlib.resources.files("bevdeform._configs")
        packaged_path = Path(str(packaged))
        if packaged_path.is_dir() and packaged_path not in dirs:
            dirs.append(packaged_path)
    except (ModuleNotFoundError, TypeError):
        pass  # a checkout without an installed wheel
    return dirs


def available_configs() -> list[str]:
    """Names accepted by :func:`load_config` (YAML stems found in :func:`config_dirs`), sorted."""
    names = set()
    for directory in config_dirs():
        names.update(p.stem for p in directory.glob("*.yaml"))
    return sorted(names)


def _resolve(name_or_path: str | os.PathLike) -> Path:
    text = os.fspath(name_or_path)
    looks_like_path = os.sep in text or "/" in text or text.endswith((".yaml", ".yml"))
    if looks_like_path:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"config file {text!r} does not exist")
        return path
    for directory in config_dirs():
        candidate = directory / f"{text}.yaml"
        if candidate.is_file():
            return candidate
    names = available_configs()
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    searched = ", ".join(str(d) for d in config_dirs()) or "no config directory found"
    raise FileNotFoundError(
        f"unknown config name {text!r}; {hint}available: {', '.join(names) or 'none'} (searched {searched})"
    )


def load_config(name_or_path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a config by name (``bev_tiny``) or path, apply ``dotted.key=value`` overrides, check it.

    Raises:
        FileNotFoundError: unknown name (the message lists the available ones) or missing file.
        ConfigError: unknown key (with the closest valid keys), wrong type, inconsistent values.
    """
    path = _resolve(name_or_path)
    with open(path, encoding="utf-8") as stream:
        try:
            data = yaml.safe_load(stream)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping with model/data/train sections")
    data.setdefault("name", path.stem)
    for override in overrides:
        _apply_override(data, override)
    source = str(path) + (f" with overrides {list(overrides)}" if overrides else "")
    return config_from_dict(data, source)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (every key, in schema order): loading it gives back an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        yaml.safe_dump(config_to_dict(cfg), stream, sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------------------------------------------
# The builder
# ----------------------------------------------------------------------------------------------------------------
def build_model(cfg: Config):
    """Config -> ``BEVFormer`` (randomly initialised, or with the backbone's ``pretrained_path`` loaded).

    The only place where config fields become constructor arguments. Use ``with torch.device('meta'):
    build_model(cfg)`` to count parameters without allocating them (``pretrained_path`` must then be null).
    """
    # Imported here so that reading a config does not import torch.
    from bevdeform.models.backbone import ResNet
    from bevdeform.models.bev_heatmap import BEVBoxRegressionHead, BEVHeatmapHead
    from bevdeform.models.bevformer import BEVFormer
    from bevdeform.models.decoder import DetectionDecoder
    from bevdeform.models.encoder import BEVEncoder
    from bevdeform.models.head import CODE_SIZE, DetectionLoss
    from bevdeform.models.neck import FPN

    m, d = cfg.model, cfg.data
    bev_range_m = d.point_cloud_range_m if m.point_cloud_range_m is None else m.point_cloud_range_m
    if m.backbone.type not in ("resnet", "dat"):
        raise ValueError(f"model.backbone.type={m.backbone.type!r}, expected 'resnet' or 'dat'")
    if m.backbone.type == "dat":
        from bevdeform.models.dat import DAT

        backbone = DAT(
            variant=m.backbone.variant,
            out_indices=m.backbone.out_indices,
            frozen_stages=m.backbone.frozen_stages,
            drop_path_rate=m.backbone.drop_path_rate,
            with_checkpoint=m.backbone.with_checkpoint,
            pretrained_path=m.backbone.pretrained_path,
        )
    else:
        backbone = ResNet(
            depth=m.backbone.depth,
            out_indices=m.backbone.out_indices,
            frozen_stages=m.backbone.frozen_stages,
            norm_eval=m.backbone.norm_eval,
            with_checkpoint=m.backbone.with_checkpoint,
            pretrained_path=m.backbone.pretrained_path,
            style=m.backbone.style,
            dcn_stages=m.backbone.dcn_stages,
        )
    neck = FPN(
        in_channels=backbone.out_channels,
        out_channels=m.embed_dims,
        num_outs=m.neck.num_outs,
        add_extra_convs=m.neck.add_extra_convs,
        relu_before_extra_convs=m.neck.relu_before_extra_convs,
    )
    encoder = BEVEncoder(
        embed_dims=m.embed_dims,
        num_layers=m.encoder.num_layers,
        bev_h=m.encoder.bev_h,
        bev_w=m.encoder.bev_w,
        point_cloud_range_m=bev_range_m,
        num_cameras=m.num_cameras,
        num_feature_levels=m.neck.num_outs,
        num_heads=m.encoder.num_heads,
        ffn_dims=m.encoder.ffn_dims,
        num_points_in_pillar=m.encoder.num_points_in_pillar,
        sca_num_points=m.encoder.sca_num_points,
        tsa_num_points=m.encoder.tsa_num_points,
        dropout=m.encoder.dropout,
        temporal_alignment=m.encoder.temporal_alignment,
        rotate_center_px=m.encoder.rotate_center_px,
        official_shift_ref_inplace_bug=m.encoder.official_shift_ref_inplace_bug,
        tsa_value=m.encoder.tsa_value,
        pillar_heights=m.encoder.pillar_heights,
        sca_half_pixel=m.encoder.sca_half_pixel,
        sca_visibility=m.encoder.sca_visibility,
        ego_motion_input=m.encoder.ego_motion_input,
    )
    decoder = DetectionDecoder(
        embed_dims=m.embed_dims,
        num_layers=m.decoder.num_layers,
        num_queries=m.decoder.num_queries,
        num_heads=m.decoder.num_heads,
        num_points=m.decoder.num_points,
        ffn_dims=m.decoder.ffn_dims,
        num_classes=len(d.class_names),
        code_size=CODE_SIZE,
        bev_h=m.encoder.bev_h,
        bev_w=m.encoder.bev_w,
        point_cloud_range_m=bev_range_m,
        dropout=m.decoder.dropout,
        query_init=m.decoder.query_init,
        velocity_scale_mps=m.decoder.velocity_scale_mps,
        heading_scale=m.decoder.heading_scale,
    )
    loss = DetectionLoss(
        num_classes=len(d.class_names),
        cls_weight=m.loss.cls_weight,
        reg_weight=m.loss.reg_weight,
        code_weights=m.loss.code_weights,
        alpha=m.loss.alpha,
        gamma=m.loss.gamma,
    )
    bev_heatmap_head = None
    if m.loss.bev_heatmap_weight < 0:
        raise ValueError(f"model.loss.bev_heatmap_weight={m.loss.bev_heatmap_weight}, expected >= 0 (0 = no head)")
    if m.loss.bev_heatmap_weight > 0:
        bev_heatmap_head = BEVHeatmapHead(
            embed_dims=m.embed_dims,
            num_classes=len(d.class_names),
            bev_h=m.encoder.bev_h,
            bev_w=m.encoder.bev_w,
            point_cloud_range_m=bev_range_m,
            weight=m.loss.bev_heatmap_weight,
        )
    if m.loss.bev_box_weight < 0:
        raise ValueError(f"model.loss.bev_box_weight={m.loss.bev_box_weight}, expected >= 0 (0 = no head)")
    bev_box_head = None
    if m.loss.bev_box_weight > 0:
        bev_box_head = BEVBoxRegressionHead(
            embed_dims=m.embed_dims,
            bev_h=m.encoder.bev_h,
            bev_w=m.encoder.bev_w,
            point_cloud_range_m=bev_range_m,
            weight=m.loss.bev_box_weight,
            velocity_scale_mps=m.decoder.velocity_scale_mps,
        )
    return BEVFormer(
        backbone=backbone,
        neck=neck,
        encoder=encoder,
        decoder=decoder,
        loss=loss,
        num_cameras=m.num_cameras,
        score_threshold=m.score_threshold,
        max_detections=m.max_detections,
        post_center_range_m=m.post_center_range_m,
        bev_heatmap_head=bev_heatmap_head,
        input_frame=m.frame,
        bev_box_head=bev_box_head,
    )


def count_parameters(cfg: Config) -> dict[str, int]:
    """Parameter counts of the model ``cfg`` describes, built on the meta device (no memory, no init cost).

    Returns ``{'total', 'trainable', 'backbone', 'neck', 'encoder', 'decoder'}``; ``trainable`` excludes frozen
    stages and frozen BN affine parameters.
    """
    import torch

    if cfg.model.backbone.pretrained_path is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, backbone=dataclasses.replace(cfg.model.backbone, pretrained_path=None)))
    with torch.device("meta"):
        model = build_model(cfg)
    counts = {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    for part in ("backbone", "neck", "encoder", "decoder"):
        counts[part] = sum(p.numel() for p in getattr(model, part).parameters())
    return counts
