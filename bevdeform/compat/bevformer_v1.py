"""BEVFormer's published checkpoints in bevdeform: the ``bevformer_v1`` compatibility path.

The released bevformer_{tiny,small,base}_epoch_24.pth were trained with fundamentalvision/BEVFormer at commit
68e6af5 (2022-06-25, "init"; see :data:`OFFICIAL_COMMIT`): its encoder.py shifts the TSA reference points in place
(``shift_ref_2d = ref_2d`` without ``.clone()``), which the later commits 2f37d0d / 001242c fix. bevdeform's own
modules reproduce that forward when built with the named options of :func:`official_model_config` (each option is
documented in docs/model.md "BEVFormer compatibility (bevformer_v1)" and tested on its own in
tests/test_compat_model.py; the defaults of bevdeform stay untouched).

    from bevdeform.compat import bevformer_v1 as v1
    model = v1.build_model("tiny")                                   # eval mode, random weights
    model.load_state_dict(v1.convert_state_dict(official_state_dict, "tiny"))
    out = v1.official_frame(model, img, lidar2img, img_shape_hw, can_bus, prev_bev)

Frames: the BEV and every box of this path are in the LIDAR_TOP frame of the keyframe (the official range
[-51.2, -51.2, -5, 51.2, 51.2, 3]); ``bevdeform.compat.frames`` maps boxes to ego / global.

Box codes: bevdeform's (cx, cy, log w, log l, cz, log h, sin, cos, vx, vy) and its decoding (yaw = atan2(sin, cos),
l along the heading, the nuScenes devkit's convention). The official yaw is mmdet3d 0.17's, yaw_devkit =
-yaw_official - pi/2 (mmdet3d's ``output_to_nusc_box``), with the same (w, l, h). :func:`convert_state_dict` rewrites
the last regression layer's rows 6 and 7 so that bevdeform's atan2 decodes the devkit yaw directly:
sin(-t - pi/2) = -cos t and cos(-t - pi/2) = -sin t, so new row 6 = -(official row 7) and new row 7 = -(official
row 6) (weights and biases; the decoded angle is exact, the (sin, cos) pair keeps its length).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import torch

from bevdeform.config import (BackboneConfig, Config, DataConfig, DecoderConfig, EncoderConfig, ModelConfig,
                              NeckConfig)
from bevdeform.config import build_model as build_from_config

__all__ = ["OFFICIAL_COMMIT", "VARIANTS", "LIDAR_POINT_CLOUD_RANGE_M", "official_model_config", "official_config",
           "build_model", "convert_state_dict", "official_frame", "IGNORED_OFFICIAL_KEYS",
           "read_official_checkpoint", "convert_checkpoint_file"]

OFFICIAL_COMMIT = "68e6af5"  # fundamentalvision/BEVFormer "init", 2022-06-25: the released checkpoints' code
VARIANTS = ("tiny", "small", "base")
LIDAR_POINT_CLOUD_RANGE_M = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
# Official keys with no bevdeform counterpart, consumed without a copy: the loss constant of the head (bevdeform's
# is model.loss.code_weights).
IGNORED_OFFICIAL_KEYS = ("pts_bbox_head.code_weights",)

_OFFICIAL_ENCODER_OPTIONS = dict(
    temporal_alignment="official_rotate",
    rotate_center_px=(100.0, 100.0),
    official_shift_ref_inplace_bug=True,
    tsa_value="initial_queries",
    pillar_heights="official_linspace",
    sca_half_pixel=False,
    sca_visibility="padded",
    ego_motion_input="can_bus18",
)
# (bev size, encoder layers, ResNet depth, out_indices, neck levels): projects/configs/bevformer/*.py
_VARIANT_SHAPES = {
    "tiny": (50, 3, 50, (3,), 1),
    "small": (150, 3, 101, (3,), 1),
    "base": (200, 6, 101, (1, 2, 3), 4),
}


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}, expected one of {VARIANTS}")
    return variant


def official_model_config(variant: str, bev_hw: tuple[int, int] | None = None) -> ModelConfig:
    """The ``model:`` section that reproduces the published ``variant`` (what configs/bevformer_<variant>.yaml
    holds; tests/test_compat_model.py checks they agree). ``bev_hw`` replaces the BEV grid size (a reduced grid for
    tests; the published checkpoints need the published size)."""
    bev, encoder_layers, depth, out_indices, levels = _VARIANT_SHAPES[_check_variant(variant)]
    bev_h, bev_w = (bev, bev) if bev_hw is None else (int(bev_hw[0]), int(bev_hw[1]))
    # tiny: ResNet-50 pytorch style; small/base: ResNet-101 caffe style (stride on the first 1x1 conv) with DCNv2
    # in stages 3-4 (mmdet dcn=DCNv2, deform_groups 1, fallback_on_stride False). small trains with checkpointing
    # (with_cp=True); that changes memory, not outputs.
    caffe_dcn = variant != "tiny"
    return ModelConfig(
        embed_dims=256,
        num_cameras=6,
        backbone=BackboneConfig(depth=depth, out_indices=out_indices, frozen_stages=1, norm_eval=True,
                                with_checkpoint=variant == "small", pretrained_path=None,
                                style="caffe" if caffe_dcn else "pytorch",
                                dcn_stages=(False, False, True, True) if caffe_dcn else (False, False, False, False)),
        neck=NeckConfig(num_outs=levels, add_extra_convs=True, relu_before_extra_convs=True),
        encoder=EncoderConfig(num_layers=encoder_layers, bev_h=bev_h, bev_w=bev_w, num_heads=8, ffn_dims=512,
                              num_points_in_pillar=4, sca_num_points=8, tsa_num_points=4, dropout=0.1,
                              **_OFFICIAL_ENCODER_OPTIONS),
        decoder=DecoderConfig(num_layers=6, num_queries=900, num_heads=8, num_points=4, ffn_dims=512, dropout=0.1),
        max_detections=300,
        score_threshold=None,
        post_center_range_m=(-61.2, -61.2, -10.0, 61.2, 61.2, 10.0),  # lidar frame, the official coder's
        frame="lidar",
        point_cloud_range_m=LIDAR_POINT_CLOUD_RANGE_M,
        attribute_rule="velocity",  # mmdet3d's NuScenesDataset._format_bbox: the published NDS was scored so
    )


def official_config(variant: str, bev_hw: tuple[int, int] | None = None) -> Config:
    """A whole :class:`Config` for ``variant``: :func:`official_model_config` and bevdeform's default data and
    train sections (the shipped configs/bevformer_*.yaml hold the official data options; the model reads only the
    class names from the data section, its BEV range being ``model.point_cloud_range_m``)."""
    return Config(name=f"bevformer_{variant}", model=official_model_config(variant, bev_hw), data=DataConfig())


def build_model(variant: str, cfg: Config | None = None, bev_hw: tuple[int, int] | None = None):
    """The published architecture of ``variant`` as a bevdeform ``BEVFormer`` in eval mode, random weights.

    ``cfg`` (optional) is a config to build instead of :func:`official_config`; its ``model:`` section must be the
    official one of ``variant`` (ValueError otherwise, naming the first differing field). ``bev_hw``: a reduced
    BEV grid (tests), see :func:`official_model_config`.
    """
    if cfg is None:
        cfg = official_config(variant, bev_hw)
    else:
        expected = official_model_config(variant, bev_hw)
        for field in dataclasses.fields(expected):
            if field.name == "backbone":
                ours, theirs = dataclasses.replace(cfg.model.backbone, pretrained_path=None), expected.backbone
            else:
                ours, theirs = getattr(cfg.model, field.name), getattr(expected, field.name)
            if field.name == "backbone":
                ours = dataclasses.replace(ours, with_checkpoint=theirs.with_checkpoint)  # memory, not outputs
            if field.name not in ("loss",) and ours != theirs:
                raise ValueError(f"build_model({variant!r}): cfg.model.{field.name} = {ours!r} differs from the "
                                 f"published {variant} architecture {theirs!r}")
    return build_from_config(cfg).eval()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint conversion
# ----------------------------------------------------------------------------------------------------------------
def _rewrite_yaw_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Last regression layer (10, C) weight or (10,) bias: rows (6, 7) = (sin, cos) of the official yaw t become
    (-cos t, -sin t) = (sin, cos) of the devkit yaw -t - pi/2 (module docstring)."""
    out = tensor.clone()
    out[6] = -tensor[7]
    out[7] = -tensor[6]
    return out


_Rule = tuple[re.Pattern, Callable[[re.Match, torch.Tensor], list[tuple[str, torch.Tensor]]]]


def _rules(num_levels: int) -> list[_Rule]:
    """(official key pattern, match + tensor -> [(bevdeform key, tensor)]) in the official module structure."""

    def rename(template: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        def apply(match: re.Match, tensor: torch.Tensor):
            return [(match.expand(template), tensor if transform is None else transform(tensor))]
        return apply

    def split_query(match: re.Match, tensor: torch.Tensor):
        # transformer.py: query_pos, query = torch.split(query_embedding.weight, embed_dims, dim=1)
        half = tensor.shape[1] // 2
        return [("decoder.query_pos_embedding.weight", tensor[:, :half].clone()),
                ("decoder.query_embedding.weight", tensor[:, half:].clone())]

    head = r"pts_bbox_head\."
    enc = head + r"transformer\.encoder\.layers\.(\d+)\."
    dec = head + r"transformer\.decoder\.layers\.(\d+)\."
    deform = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
    wb = r"(weight|bias)"
    encoder_norms = {"0": "norm_temporal", "1": "norm_spatial", "2": "norm_ffn"}
    return [
        (re.compile(r"img_backbone\.(.+)"), rename(r"backbone.\1")),
        (re.compile(r"img_neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\." + wb), rename(r"neck.\1.\2.\3")),
        (re.compile(head + r"bev_embedding\.weight"), rename("encoder.bev_queries.weight")),
        (re.compile(head + r"positional_encoding\.(row|col)_embed\.weight"), rename(r"encoder.\1_embed")),
        (re.compile(head + r"query_embedding\.weight"), split_query),
        (re.compile(head + r"transformer\.level_embeds"),
         rename("encoder.level_embeds", lambda t: t[:num_levels].clone())),  # rows past the model's levels unused
        (re.compile(head + r"transformer\.cams_embeds"), rename("encoder.camera_embeds")),
        (re.compile(head + r"transformer\.reference_points\." + wb), rename(r"decoder.reference_points.\1")),
        (re.compile(head + r"transformer\.can_bus_mlp\.([02])\." + wb), rename(r"encoder.ego_motion_mlp.\1.\2")),
        (re.compile(head + r"transformer\.can_bus_mlp\.norm\." + wb), rename(r"encoder.ego_motion_mlp.4.\1")),
        (re.compile(enc + r"attentions\.0\." + deform), rename(r"encoder.layers.\1.temporal_attention.\2.\3")),
        (re.compile(enc + r"attentions\.1\.deformable_attention\.(sampling_offsets|attention_weights|value_proj)\."
                    + wb), rename(r"encoder.layers.\1.spatial_attention.\2.\3")),
        (re.compile(enc + r"attentions\.1\.output_proj\." + wb),
         rename(r"encoder.layers.\1.spatial_attention.output_proj.\2")),
        (re.compile(enc + r"ffns\.0\.layers\.0\.0\." + wb), rename(r"encoder.layers.\1.ffn.0.\2")),
        (re.compile(enc + r"ffns\.0\.layers\.1\." + wb), rename(r"encoder.layers.\1.ffn.3.\2")),
        (re.compile(enc + r"norms\.([012])\." + wb),
         lambda m, t: [(f"encoder.layers.{m.group(1)}.{encoder_norms[m.group(2)]}.{m.group(3)}", t)]),
        (re.compile(dec + r"attentions\.0\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"),
         rename(r"decoder.layers.\1.self_attn.\2")),
        (re.compile(dec + r"attentions\.1\." + deform), rename(r"decoder.layers.\1.cross_attn.\2.\3")),
        (re.compile(dec + r"ffns\.0\.layers\.0\.0\." + wb), rename(r"decoder.layers.\1.ffn.0.\2")),
        (re.compile(dec + r"ffns\.0\.layers\.1\." + wb), rename(r"decoder.layers.\1.ffn.3.\2")),
        (re.compile(dec + r"norms\.([012])\." + wb),
         lambda m, t: [(f"decoder.layers.{m.group(1)}.norm{int(m.group(2)) + 1}.{m.group(3)}", t)]),
        (re.compile(head + r"cls_branches\.(\d+)\.([0134])\." + wb), rename(r"decoder.cls_branches.\1.hidden.\2.\3")),
        (re.compile(head + r"cls_branches\.(\d+)\.6\." + wb), rename(r"decoder.cls_branches.\1.logits.\2")),
        (re.compile(head + r"reg_branches\.(\d+)\.([02])\." + wb), rename(r"decoder.reg_branches.\1.hidden.\2.\3")),
        (re.compile(head + r"reg_branches\.(\d+)\.4\." + wb),
         rename(r"decoder.reg_branches.\1.codes.\2", _rewrite_yaw_rows)),
    ]


def _target_shapes(variant: str, bev_hw: tuple[int, int] | None = None) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build_from_config(official_config(variant, bev_hw))
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_state_dict(official_state_dict: Mapping[str, torch.Tensor], variant: str,
                       target_shapes: Mapping[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """Official BEVFormer key names -> bevdeform's, every tensor accounted for.

    Args:
        official_state_dict: the checkpoint's ``state_dict`` (``img_backbone.*``, ``img_neck.*``,
            ``pts_bbox_head.*``; a ``module.`` prefix on every key is removed).
        variant: 'tiny' | 'small' | 'base'.
        target_shapes: bevdeform key -> shape to fill (default: the state dict of ``build_model(variant)``, built on
            the meta device, with the BEV grid of the checkpoint's positional embeddings).
    Returns:
        a state dict that ``load_model_weights`` / ``load_state_dict(strict=True)`` accept for that model.
    Raises:
        ValueError: listing, in one message, every official key no rule maps (and that is not in
            :data:`IGNORED_OFFICIAL_KEYS`), every bevdeform key left without a value, every shape mismatch and
            every bevdeform key two official keys would fill.
    """
    _check_variant(variant)
    if not isinstance(official_state_dict, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in official_state_dict.values()):
        raise ValueError("convert_state_dict: official_state_dict must be a {name: tensor} mapping (the "
                         "checkpoint's 'state_dict')")
    state = dict(official_state_dict)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if target_shapes is None:
        bev_key = "pts_bbox_head.positional_encoding.row_embed.weight"
        col_key = "pts_bbox_head.positional_encoding.col_embed.weight"
        bev_hw = None
        if bev_key in state and col_key in state:  # the grid size the checkpoint was built for
            bev_hw = (int(state[bev_key].shape[0]), int(state[col_key].shape[0]))
            if bev_hw == (_VARIANT_SHAPES[variant][0],) * 2:
                bev_hw = None
        target_shapes = _target_shapes(variant, bev_hw)
    num_levels = _VARIANT_SHAPES[variant][4]
    rules = _rules(num_levels)
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unmapped, duplicates, mis_shaped = [], [], []
    for key, tensor in state.items():
        if key in IGNORED_OFFICIAL_KEYS:
            continue
        for pattern, apply in rules:
            match = pattern.fullmatch(key)
            if match is not None:
                break
        else:
            unmapped.append(key)
            continue
        for target, value in apply(match, tensor):
            if target in converted:
                duplicates.append(f"{target} (from {sources[target]} and {key})")
                continue
            if target not in target_shapes:
                unmapped.append(f"{key} (-> {target}, which the bevdeform model does not have)")
                continue
            if tuple(value.shape) != tuple(target_shapes[target]):
                mis_shaped.append(f"{key} {tuple(value.shape)} -> {target} {tuple(target_shapes[target])}")
                continue
            converted[target] = value
            sources[target] = key
    unfilled = [k for k in target_shapes if k not in converted]
    if unmapped or unfilled or mis_shaped or duplicates:
        parts = []
        for title, items in (("official keys without a bevdeform counterpart", unmapped),
                             ("bevdeform parameters left without a value", unfilled),
                             ("shape mismatches", mis_shaped), ("filled twice", duplicates)):
            if items:
                parts.append(f"{title} ({len(items)}): " + ", ".join(items))
        raise ValueError(f"convert_state_dict({variant!r}): the checkpoint does not match the published "
                         f"{variant} architecture; " + "; ".join(parts))
    return converted


# ----------------------------------------------------------------------------------------------------------------
# One frame as the official detector's simple_test sees it
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def official_frame(model, img: torch.Tensor, lidar2img: torch.Tensor, img_shape_hw, can_bus: torch.Tensor,
                   prev_bev: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One frame of a bevformer_v1 model with the inputs the official detector holds at test time.

    Args:
        model: :func:`build_model`'s model (eval mode; weights from :func:`convert_state_dict`).
        img: (1, 6, 3, H, W) float32, normalised and padded as the official test pipeline does.
        lidar2img: (1, 6, 4, 4) LIDAR_TOP -> pixels of that image.
        img_shape_hw: (H, W), the padded size (the official ``img_shape``); must equal the image's size.
        can_bus: (1, 18) after the detector's delta step (``bevdeform.compat.can_bus.official_can_bus_delta``).
        prev_bev: None (scene start) or the previous call's ``out["bev"]``.
    Returns:
        ``bev`` (1, bev_h * bev_w, 256) in the official cell order (row along lidar y, column along lidar x,
        row-major); ``cls_logits`` (6, 1, 900, 10) every decoder layer; ``box_codes`` (6, 1, 900, 10) bevdeform's
        codes (centre in metres, lidar frame); ``query_boxes_lidar`` (1, 900, 9) the last layer's box of every
        query decoded, LIDAR_TOP frame, devkit convention [x, y, z (centre), w, l, h, yaw, vx, vy].
    """
    from bevdeform.models.head import decode_box_codes

    if img.dim() != 5 or img.shape[0] != 1 or img.shape[2] != 3:
        raise ValueError(f"official_frame: img must be (1, N, 3, H, W), got {tuple(img.shape)}")
    batch, cameras, _, height, width = img.shape
    if tuple(lidar2img.shape) != (1, cameras, 4, 4):
        raise ValueError(f"official_frame: lidar2img must be (1, {cameras}, 4, 4), got {tuple(lidar2img.shape)}")
    img_shape_hw = tuple(int(v) for v in img_shape_hw)
    if img_shape_hw != (height, width):
        raise ValueError(f"official_frame: img_shape_hw={img_shape_hw} must be the padded image size (H, W) = "
                         f"{(height, width)} of img")
    if tuple(can_bus.shape) != (1, 18):
        raise ValueError(f"official_frame: can_bus must be (1, 18) after the delta step, got {tuple(can_bus.shape)}")
    device = img.device
    image_hw = torch.tensor(img_shape_hw, device=device).expand(1, cameras, 2)  # (2,) -> (1, N, 2)
    has_prev = torch.tensor([prev_bev is not None], device=device)
    ego_prev2curr = torch.eye(4, device=device)[None]  # unused by the official options
    out = model.forward_frame(img, lidar2img.to(img.dtype), image_hw, prev_bev, ego_prev2curr, has_prev,
                              can_bus=can_bus)  # any float dtype: the shift and angle are read in float64
    return {"bev": out.bev, "cls_logits": out.all_cls_logits, "box_codes": out.all_box_codes,
            "query_boxes_lidar": decode_box_codes(out.all_box_codes[-1])}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------------------------
def read_official_checkpoint(path, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an official (mmcv) checkpoint file.

    Read with ``torch.load(weights_only=True)`` first. mmcv checkpoints also hold a ``meta`` dict, which may contain
    objects that weights_only refuses to unpickle; then this raises a ValueError saying so, unless
    ``trust_checkpoint`` is True (the caller vouches for the file: it is unpickled with weights_only=False, which
    can run arbitrary code). A file that is a bare state dict is accepted too.
    """
    import os

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError for refused globals; anything else: unreadable
        if not trust_checkpoint:
            raise ValueError(
                f"--checkpoint {path}: torch.load(weights_only=True) refuses it ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else error!r}). mmcv checkpoints keep Python objects in "
                f"their 'meta'; if you trust where the file comes from, rerun with --trust-checkpoint to unpickle it "
                f"in full (that can run arbitrary code)") from None
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--checkpoint {path}: expected a dict with a 'state_dict' of tensors (an mmcv checkpoint) "
                         f"or a bare state dict, got {type(state).__name__}")
    return dict(state)


def convert_checkpoint_file(checkpoint, variant: str, out, trust_checkpoint: bool = False):
    """Convert an official checkpoint file into one bevdeform loads; returns the written path.

    The file written holds ``{'state_dict': converted, 'converted_from': {...}}`` (plain tensors and strings: it
    loads with ``weights_only=True``), the format ``load_model_weights`` and the ``--checkpoint`` of
    scripts/evaluate.py, visualize.py, profile_latency.py and export.py read (with ``--config bevformer_<variant>``).
    It is written to a temporary file beside ``out`` and renamed, so ``out`` is either the old file or the whole
    new one.
    """
    import os
    from pathlib import Path

    _check_variant(variant)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out}: is a folder, expected a file path (e.g. bevformer_{variant}.pth)")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    state = read_official_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint)
    converted = convert_state_dict(state, variant)
    payload = {"state_dict": converted,
               "converted_from": {"format": "bevformer_v1", "variant": variant, "official_commit": OFFICIAL_COMMIT,
                                  "checkpoint": os.path.basename(os.fspath(checkpoint))}}
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, temporary)
        os.replace(temporary, out)
    finally:
        if temporary.exists():
            temporary.unlink()
    return out
