"""The streaming detector for deployment: loading a trained model, example inputs, ONNX and torch.export.

What runs on a vehicle is one frame of :class:`bevdeform.models.bevformer.StreamingBEVFormer` at batch 1: six images
and their calibration, the ego motion since the previous frame and that frame's BEV in; boxes and the new BEV out.
:class:`ExportableStreamingDetector` is that step as an ``nn.Module`` with tensors only:

    inputs   images (B, N, 3, H, W) float32, normalised and padded (docs/data-format.md)
             ego2img (B, N, 4, 4) float32, ego frame -> pixels of the padded image
             image_hw (B, N, 2) int64, unpadded (H, W) pixels
             ego_prev2curr (B, 4, 4) float32, previous ego frame -> current ego frame
             has_prev (B,) bool, False at a scene start (the previous BEV is then ignored)
             prev_bev (B, bev_h * bev_w, C) float32, the previous frame's ``bev`` output (zeros at a scene start)
             can_bus (B, 18) float32, only for the published-checkpoint configs (``configs/bevformer_*.yaml``,
                 ``model.frame: lidar``): BEVFormer's CAN-bus vector after the detector's delta step against the
                 previous frame's absolute vector (``bevdeform.compat.can_bus.official_can_bus_delta_masked``, on
                 the host; ``ego2img`` then holds lidar2img). The official rotation of the previous BEV by
                 ``can_bus[:, 17]`` degrees stays a graph computation (``attention.official_rotate_bev``).
    outputs  boxes (B, K, 9) float32 [x, y, z, w, l, h, yaw, vx, vy], current ego frame, metres / radians / m/s
             scores (B, K) float32, descending; labels (B, K) int64 class indices
             valid (B, K) bool: inside the post-centre range and above the score threshold (the boxes
                 ``BEVFormer.decode`` keeps, in the same order)
             bev (B, bev_h * bev_w, C) float32: the next frame's ``prev_bev``
             num_visible_pairs (B,) int64: (BEV cell, camera) pairs that see their pillar; more than the export's
                 ``sca_pair_capacity`` means pairs were dropped (see below)

K = ``max_detections``: decoding keeps a fixed top-k and marks the rows ``BEVFormer.decode`` would drop instead of
removing them, so every output has a static shape.

The wrapper runs ``BEVFormer.forward_frame`` itself, the code path of training and evaluation, with two export
settings:

1. ``sca_pair_capacity``: spatial cross-attention lists its visible (BEV cell, camera) pairs in a list of fixed
   length (``attention.find_visible_pairs(..., capacity=K)``; all N * Q pairs by default, so none can be dropped)
   instead of one sized to the frame's count, a data-dependent shape that torch.export refuses and that ONNX
   tracing would bake in. The visible pairs are listed in the same order, so the BEV and the boxes are those of the
   eval path (``tests/test_export.py`` checks it). While exporting nothing can check the count: a frame with more
   visible pairs than K drops the rest, and ``num_visible_pairs`` > K says so.
2. ``head.decode_predictions`` returns per-sample tensors of data-dependent length (boolean masks):
   :func:`decode_topk_fixed` keeps the top-k with a ``valid`` mask.

The value checks of ``BEVFormer.check_frame_inputs`` (``image_hw`` within the image) are skipped while tracing or
exporting; the shape checks run.

The MSDA op in an export:
- ``msda="custom"``: one node ``bevdeform::MultiScaleDeformableAttn`` per call (the op's contract, the spatial shapes
  and level starts as int64 inputs), for a TensorRT plugin or an onnxruntime custom op to implement. The native op
  must be built (the traced call is ``torch.ops.bevdeform.ms_deform_attn``).
- ``msda="decomposed"``: the PyTorch reference (``BEVDEFORM_MSDA_IMPL=reference`` while tracing), i.e. standard
  ONNX GridSample (opset >= 16) and arithmetic that onnxruntime runs as it is.

ONNX is written by torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): it needs only
``onnx`` (and ``onnxruntime`` to run the result), and the spatial shapes, which the reference reads with
``.tolist()``, are constants of the trace. torch.export (:func:`export_program`) takes the native op as one node (its
fake kernel gives the output shape), which is what the dynamo-based ONNX exporter and AOTInductor start from.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from bevdeform import geometry
from bevdeform.config import Config, build_model, load_config
from bevdeform.models.bevformer import BEVFormer, load_model_weights
from bevdeform.models.head import CODE_SIZE, decode_box_codes

__all__ = [
    "INPUT_NAMES",
    "CAN_BUS_INPUT",
    "input_tuple",
    "OUTPUT_NAMES",
    "ONNX_CUSTOM_OP",
    "DEFAULT_OPSET",
    "load_detector",
    "example_frame_inputs",
    "decode_topk_fixed",
    "ExportableStreamingDetector",
    "msda_implementation",
    "register_onnx_custom_op",
    "export_onnx",
    "run_onnxruntime",
    "export_program",
]

INPUT_NAMES = ("images", "ego2img", "image_hw", "ego_prev2curr", "has_prev", "prev_bev")
CAN_BUS_INPUT = "can_bus"  # the extra input of the published-checkpoint configs (module docstring)
OUTPUT_NAMES = ("boxes", "scores", "labels", "valid", "bev", "num_visible_pairs")
ONNX_CUSTOM_DOMAIN = "bevdeform"
ONNX_CUSTOM_OP = "MultiScaleDeformableAttn"
# GridSample (the decomposed MSDA) needs opset 16; 17 adds LayerNormalization, which the encoder and decoder use.
DEFAULT_OPSET = 17


# ----------------------------------------------------------------------------------------------------------------
# A model and inputs
# ----------------------------------------------------------------------------------------------------------------
def load_detector(config: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                  overrides: Sequence[str] = ()) -> tuple[Config, BEVFormer]:
    """(config, detector in eval mode) from a config name or path (+ ``key=value`` overrides) and a checkpoint.

    ``checkpoint``: a Lightning checkpoint written by ``scripts/train.py`` (state dict under ``'state_dict'`` with
    keys ``model.*``) or a bare state dict of the detector; None keeps the random initialisation. The weights must
    match the config exactly (``load_model_weights`` names the keys that do not).
    """
    cfg = load_config(config, list(overrides))
    model = build_model(cfg)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"--checkpoint {path}: no such file")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # corrupt file, or pickled objects that weights_only refuses
            raise ValueError(f"--checkpoint {path}: cannot be read with torch.load(weights_only=True): "
                             f"{error}") from None
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(state, dict):
            raise ValueError(f"--checkpoint {path}: holds a {type(state).__name__}, expected a state dict")
        prefix = "model." if any(str(key).startswith("model.") for key in state) else ""
        try:
            load_model_weights(model, state, key_prefix=prefix)
        except ValueError as error:
            raise ValueError(f"--checkpoint {path} does not fit config {cfg.name!r}: {error}") from None
    return cfg, model.eval()


def _padded(size: int, multiple: int) -> int:
    return -(-int(size) // multiple) * multiple


def example_frame_inputs(cfg: Config, image_size_hw: Sequence[int] | None = None, batch_size: int = 1,
                         seed: int = 0, has_prev: bool = True, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One frame of streaming inputs with a real camera rig: what a vehicle feeds the detector.

    The calibration is the synthetic dataset's copy of the nuScenes rig (``bevdeform.data.synthetic.rig_calibration``
    at 1600x900, intrinsics rescaled to ``image_size_hw`` with the half-pixel convention), so spatial
    cross-attention sees as many visible (BEV cell, camera) pairs as on nuScenes; images and the previous BEV are
    random normal, the ego drove 5 m forward and turned 0.05 rad left since the previous frame.

    Args:
        cfg: the model's config (cameras, BEV size, channels, padding multiple).
        image_size_hw: (H, W) pixels before padding; default ``cfg.data.image_size_hw``.
        has_prev: False gives a scene start (identity motion, zero previous BEV).
    Returns:
        ``{images (B, N, 3, H_pad, W_pad), ego2img (B, N, 4, 4), image_hw (B, N, 2) int64, ego_prev2curr (B, 4, 4),
        has_prev (B,) bool, prev_bev (B, bev_h * bev_w, C)}``; floats in ``dtype`` except ego2img (float32).
    """
    from bevdeform.data.infos import CAMERA_NAMES
    from bevdeform.data.synthetic import FULL_HEIGHT_PX, FULL_WIDTH_PX, rig_calibration
    from bevdeform.data.transforms import scale_intrinsics

    height, width = (int(v) for v in (image_size_hw or cfg.data.image_size_hw))
    if height < 1 or width < 1:
        raise ValueError(f"image_size_hw must be (H, W) >= 1 pixels, got {image_size_hw}")
    num_cameras = cfg.model.num_cameras
    if num_cameras != len(CAMERA_NAMES):
        raise ValueError(f"example_frame_inputs: config {cfg.name!r} has model.num_cameras={num_cameras}; the example "
                         f"rig has the {len(CAMERA_NAMES)} nuScenes cameras")
    padded_h, padded_w = _padded(height, cfg.data.pad_multiple), _padded(width, cfg.data.pad_multiple)
    rig = rig_calibration(seed=0, log_index=0, scale=1.0)
    ego2img = []
    for name in CAMERA_NAMES:
        intrinsics = scale_intrinsics(rig[name].intrinsics, width / FULL_WIDTH_PX, height / FULL_HEIGHT_PX)
        ego2img.append(geometry.ego2img_from(intrinsics, rig[name].sensor2ego()))
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, num_cameras, 3, padded_h, padded_w, generator=generator)
    images[..., height:, :] = 0.0  # padding is zeros, as the dataset writes it
    images[..., :, width:] = 0.0
    cells = cfg.model.encoder.bev_h * cfg.model.encoder.bev_w
    prev_bev = torch.randn(batch_size, cells, cfg.model.embed_dims, generator=generator)
    ego_curr2prev = torch.eye(4, dtype=torch.float64)
    yaw = 0.05
    ego_curr2prev[:2, :2] = torch.tensor([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    ego_curr2prev[0, 3] = 5.0
    ego_prev2curr = torch.linalg.inv(ego_curr2prev)
    if not has_prev:
        ego_prev2curr = torch.eye(4, dtype=torch.float64)
        prev_bev.zero_()
    extra = {}
    if getattr(cfg.model, "frame", "ego") == "lidar":
        # BEVFormer's published models (model.frame: lidar) take lidar2img where the others take ego2img, and the
        # absolute 18-number CAN-bus vector (bevdeform.compat.can_bus): a pose 600 m / 1600 m into a map, heading
        # 30 degrees; the streaming detector takes the delta against the previous frame's vector itself.
        lidar2ego = rig["LIDAR_TOP"].sensor2ego()
        ego2img = [matrix @ lidar2ego for matrix in ego2img]
        can_bus = torch.zeros(batch_size, 18, dtype=torch.float64)
        can_bus[:, 0:3] = torch.tensor([600.0, 1600.0, 0.0], dtype=torch.float64)
        can_bus[:, 3:7] = float(np.cos(np.radians(15.0)))  # the official quirk: q.w in all four entries
        can_bus[:, 16], can_bus[:, 17] = float(np.radians(30.0)), 30.0
        extra["can_bus_abs"] = can_bus.to(device)
        # The exported frame's input: the delta step against a previous frame 1.5 m behind, 2 degrees of turn ago.
        from bevdeform.compat.can_bus import official_can_bus_delta_masked

        previous = can_bus.clone()
        previous[:, 0] -= 1.5 * np.cos(np.radians(30.0))
        previous[:, 1] -= 1.5 * np.sin(np.radians(30.0))
        previous[:, 16], previous[:, 17] = float(np.radians(28.0)), 28.0
        delta = official_can_bus_delta_masked(can_bus, previous, torch.full((batch_size,), bool(has_prev)))
        extra[CAN_BUS_INPUT] = delta.to(device=device, dtype=dtype)
    return {**extra,
        "images": images.to(device=device, dtype=dtype),
        "ego2img": torch.tensor(np.stack(ego2img), dtype=torch.float32, device=device).expand(
            batch_size, num_cameras, 4, 4).contiguous(),
        "image_hw": torch.tensor([height, width], dtype=torch.int64, device=device).expand(
            batch_size, num_cameras, 2).contiguous(),
        "ego_prev2curr": ego_prev2curr.to(device=device, dtype=torch.float32).expand(batch_size, 4, 4).contiguous(),
        "has_prev": torch.full((batch_size,), bool(has_prev), dtype=torch.bool, device=device),
        "prev_bev": prev_bev.to(device=device, dtype=dtype),
    }


# ----------------------------------------------------------------------------------------------------------------
# Export-friendly pieces (same numbers as the eval path, static shapes)
# ----------------------------------------------------------------------------------------------------------------
def decode_topk_fixed(cls_logits: torch.Tensor, box_codes: torch.Tensor, max_num: int,
                      score_threshold: float | None = None,
                      post_center_range_m: Sequence[float] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``head.decode_predictions`` with static shapes: the top-k and a mask instead of a filtered list.

    Args:
        cls_logits: (B, Q, C) logits of the last decoder layer; box_codes: (B, Q, 10) metric codes.
        max_num: k (clipped to Q * C). score_threshold, post_center_range_m: as ``decode_predictions``.
    Returns:
        boxes (B, k, 9) ego frame, scores (B, k) descending, labels (B, k) int64, valid (B, k) bool: the rows
        ``decode_predictions`` keeps are ``boxes[b][valid[b]]``, in the same order.
    """
    batch_size, num_queries, num_classes = cls_logits.shape
    k = min(int(max_num), num_queries * num_classes)
    scores_flat = torch.sigmoid(cls_logits).flatten(1)  # (B, Q, C) -> (B, Q*C), index = query * C + class
    scores, top_index = scores_flat.topk(k, dim=1, sorted=True)  # (B, k)
    labels = top_index % num_classes
    query_idx = torch.div(top_index, num_classes, rounding_mode="floor")
    top_codes = torch.gather(box_codes, 1, query_idx[..., None].expand(batch_size, k, CODE_SIZE))  # (B, k, 10)
    boxes = decode_box_codes(top_codes)  # (B, k, 9)
    valid = torch.ones_like(scores, dtype=torch.bool)
    if post_center_range_m is not None:
        bounds = torch.tensor([float(v) for v in post_center_range_m], dtype=boxes.dtype, device=boxes.device)
        centres = boxes[..., :3]  # (B, k, 3)
        valid = valid & ((centres >= bounds[:3]) & (centres <= bounds[3:])).all(dim=-1)
    if score_threshold is not None:
        valid = valid & (scores > float(score_threshold))
    return boxes, scores, labels, valid


class ExportableStreamingDetector(nn.Module):
    """One streaming frame of a ``BEVFormer`` with tensor inputs and static-shape outputs (module docstring).

    Args:
        model: the detector (its weights are shared, not copied); used in eval mode.
        max_detections: K of the fixed top-k; default the model's ``max_detections``.
        sca_pair_capacity: length of the (BEV cell, camera) pair list of spatial cross-attention
            (``BEVFormer.forward_frame``); None = N * Q (exact for any calibration). A vehicle with a fixed rig can
            pass its visible count plus a margin (the ``num_visible_pairs`` output of a frame tells it) to skip the
            invisible pairs' work: ~81% of all pairs at bev_tiny. Run eagerly, a frame with more visible pairs is a
            ValueError; in an export the extra pairs are dropped (module docstring).
    """

    def __init__(self, model: BEVFormer, max_detections: int | None = None, sca_pair_capacity: int | None = None):
        super().__init__()
        self.model = model.eval()
        self.max_detections = int(model.max_detections if max_detections is None else max_detections)
        if self.max_detections < 1:
            raise ValueError(f"ExportableStreamingDetector: max_detections={self.max_detections}, expected >= 1")
        encoder = model.encoder
        total = encoder.num_cameras * encoder.bev_h * encoder.bev_w
        if sca_pair_capacity is not None and not 1 <= int(sca_pair_capacity) <= total:
            raise ValueError(f"ExportableStreamingDetector: sca_pair_capacity={sca_pair_capacity}, expected 1..N*Q = "
                             f"{total} or None")
        self.sca_pair_capacity = total if sca_pair_capacity is None else int(sca_pair_capacity)
        self.needs_can_bus = bool(getattr(encoder, "needs_can_bus", False))

    @property
    def input_names(self) -> tuple[str, ...]:
        """``INPUT_NAMES``, plus ``can_bus`` for a model whose encoder reads BEVFormer's CAN-bus vector."""
        return INPUT_NAMES + ((CAN_BUS_INPUT,) if self.needs_can_bus else ())

    def forward(self, images: torch.Tensor, ego2img: torch.Tensor, image_hw: torch.Tensor,
                ego_prev2curr: torch.Tensor, has_prev: torch.Tensor, prev_bev: torch.Tensor,
                can_bus: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Inputs and outputs: the module docstring (``input_names`` -> ``OUTPUT_NAMES``)."""
        model = self.model
        if self.needs_can_bus and can_bus is None:
            raise ValueError("ExportableStreamingDetector: this model's encoder reads BEVFormer's CAN-bus vector: "
                             "pass can_bus (B, 18), the official delta step of the absolute vectors")
        # prev_bev is always given: rows with has_prev False ignore it (and get identity motion), as forward_frame's
        # rows do, so a scene start needs no other graph.
        out = model.forward_frame(images, ego2img, image_hw, prev_bev, ego_prev2curr, has_prev,
                                  sca_pair_capacity=self.sca_pair_capacity,
                                  can_bus=can_bus if self.needs_can_bus else None)
        boxes, scores, labels, valid = decode_topk_fixed(
            out.all_cls_logits[-1].float(), out.all_box_codes[-1].float(), self.max_detections,
            score_threshold=model.score_threshold, post_center_range_m=model.post_center_range_m)
        return boxes, scores, labels, valid, out.bev, out.num_visible_pairs


# ----------------------------------------------------------------------------------------------------------------
# The MSDA op in exports
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def msda_implementation(impl: str) -> Iterator[None]:
    """Within the block, ``bevdeform.msda.ms_deform_attn`` takes the path ``impl`` (reference, native or auto), by
    setting ``BEVDEFORM_MSDA_IMPL``; the previous value is restored afterwards."""
    from bevdeform.msda import IMPL_ENV

    if impl not in ("reference", "native", "auto"):
        raise ValueError(f"msda implementation {impl!r}: expected reference, native or auto")
    previous = os.environ.get(IMPL_ENV)
    os.environ[IMPL_ENV] = impl
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(IMPL_ENV, None)
        else:
            os.environ[IMPL_ENV] = previous


_registered_opsets: set[int] = set()


def _ms_deform_attn_symbolic(g, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """TorchScript-exporter symbolic: one ``bevdeform::MultiScaleDeformableAttn`` node with the op's five inputs in
    the op's order and its one output (B, Q, M*D). ONNX shape inference does not know the node (torch prints a
    warning saying so); the plugin that implements it defines the output shape."""
    return g.op(f"{ONNX_CUSTOM_DOMAIN}::{ONNX_CUSTOM_OP}", value, spatial_shapes, level_start_index,
                sampling_locations, attention_weights)


def register_onnx_custom_op(opset: int = DEFAULT_OPSET) -> None:
    """Register the ONNX symbolic of ``torch.ops.bevdeform.ms_deform_attn`` (TorchScript-based exporter) for
    ``opset``; idempotent."""
    if opset in _registered_opsets:
        return
    torch.onnx.register_custom_op_symbolic("bevdeform::ms_deform_attn", _ms_deform_attn_symbolic, opset)
    _registered_opsets.add(opset)


def input_tuple(module: ExportableStreamingDetector, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The module's positional inputs from a dict (``example_frame_inputs``), in ``module.input_names`` order."""
    missing = [name for name in module.input_names if name not in inputs]
    if missing:
        raise ValueError(f"inputs lack {missing}; expected the keys {list(module.input_names)} (example_frame_inputs)")
    return tuple(inputs[name] for name in module.input_names)


def export_onnx(module: ExportableStreamingDetector, inputs: dict[str, torch.Tensor], path: str | os.PathLike,
                msda: str = "decomposed", opset: int = DEFAULT_OPSET) -> Path:
    """Write ``module`` as an ONNX file at ``path`` (traced on ``inputs``: batch, image and BEV sizes are fixed).

    Args:
        module: the wrapper around the detector.
        inputs: ``example_frame_inputs(...)`` (any values of the deployed shapes).
        msda: ``custom`` (the op as ``bevdeform::MultiScaleDeformableAttn`` nodes; needs the native op built) or
            ``decomposed`` (the grid_sample reference, standard ONNX).
        opset: ONNX opset of the default domain, >= 16 (GridSample).
    Returns:
        the path written. The graph is checked with ``onnx.checker`` when onnx is installed.
    """
    import warnings

    if msda not in ("custom", "decomposed"):
        raise ValueError(f"msda={msda!r}: expected custom or decomposed")
    if opset < 16:
        raise ValueError(f"opset={opset}: GridSample (align_prev_bev, the decomposed MSDA) needs opset >= 16")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = input_tuple(module, inputs)
    if msda == "custom":
        from bevdeform.msda import native_available

        device_type = args[0].device.type
        if not native_available(device_type, args[0].dtype):
            raise RuntimeError(f"msda=custom traces torch.ops.bevdeform.ms_deform_attn, but the native op is not "
                               f"built for {device_type}/{args[0].dtype} (run `bevdeform-build-ops -v`)")
        register_onnx_custom_op(opset)
    impl = "native" if msda == "custom" else "reference"
    module = module.eval()
    with msda_implementation(impl), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python int taken from a tensor (shapes, the spatial shapes of the levels):
        # they are constants of this export by design.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # The exporter's notes on how it lowers advanced indexing and what it could not constant-fold.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(
            module, args, str(path), dynamo=False, input_names=list(module.input_names),
            output_names=list(OUTPUT_NAMES),
            opset_version=opset, do_constant_folding=True,
            custom_opsets={ONNX_CUSTOM_DOMAIN: 1} if msda == "custom" else None)
    try:
        import onnx
    except ImportError:
        return path
    onnx.checker.check_model(str(path))
    return path


def run_onnxruntime(path: str | os.PathLike, inputs: dict[str, torch.Tensor], num_threads: int | None = None
                    ) -> dict[str, np.ndarray]:
    """Run an exported file with onnxruntime on the CPU: ``{output name: array}``.

    Only a ``decomposed`` export runs as it is; a ``custom`` one needs the op registered with onnxruntime.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if num_threads is not None:
        options.intra_op_num_threads = int(num_threads)
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {name: inputs[name].detach().cpu().numpy() for name in (*INPUT_NAMES, CAN_BUS_INPUT)
             if name in {i.name for i in session.get_inputs()}}
    outputs = session.run(None, feeds)
    return {meta.name: value for meta, value in zip(session.get_outputs(), outputs)}


def export_program(module: ExportableStreamingDetector, inputs: dict[str, torch.Tensor],
                   msda: str = "native") -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``module`` on ``inputs`` (non-strict).

    ``msda="native"``: the op stays one ``torch.ops.bevdeform.ms_deform_attn`` node (its fake kernel gives shapes).
    """
    if msda not in ("native", "auto"):
        raise ValueError(f"export_program: msda={msda!r}; torch.export takes the native op as one node (native or "
                         f"auto); the reference reads spatial shapes with .tolist(), which export cannot trace")
    with msda_implementation(msda), torch.no_grad():
        return torch.export.export(module.eval(), input_tuple(module, inputs), strict=False)
