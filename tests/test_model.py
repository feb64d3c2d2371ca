"""Decoder, detector wrapper (training, prediction, streaming), weight loading and the config system.

Everything runs a tiny model built from a config written here (ResNet-18 on 64x96 images, 16x16 BEV, 32 dims) on
random images with a 6-camera ring whose calibration is exact, so the tests are fast on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from bevdeform import geometry
from bevdeform.config import (
    BackboneConfig,
    Config,
    ConfigError,
    DataConfig,
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    NeckConfig,
    available_configs,
    build_model,
    config_to_dict,
    count_parameters,
    load_config,
    save_config,
)
from bevdeform.models.bevformer import BEVFormer, StreamingBEVFormer, load_model_weights
from bevdeform.models.decoder import DetectionDecoder, inverse_sigmoid

H, W = 64, 96  # image size of the tests: multiples of 32, no padding
RANGE = (-20.0, -20.0, -3.0, 20.0, 20.0, 5.0)
NUM_CLASSES = 10


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def tiny_config(dropout: float = 0.1, bev: int = 16, num_queries: int = 30, num_cameras: int = 6) -> Config:
    return Config(
        name="test_tiny",
        model=ModelConfig(
            embed_dims=32,
            num_cameras=num_cameras,
            backbone=BackboneConfig(depth=18, out_indices=(3,), frozen_stages=-1, norm_eval=False),
            neck=NeckConfig(num_outs=1),
            encoder=EncoderConfig(num_layers=1, bev_h=bev, bev_w=bev, num_heads=4, ffn_dims=64, dropout=dropout),
            decoder=DecoderConfig(num_layers=2, num_queries=num_queries, num_heads=4, ffn_dims=64, dropout=dropout),
        ),
        data=DataConfig(image_size_hw=(H, W), point_cloud_range_m=RANGE),
    )


def tiny_model(seed: int = 0, **kwargs) -> BEVFormer:
    torch.manual_seed(seed)
    return build_model(tiny_config(**kwargs))


def camera_ring_ego2img(height: int = H, width: int = W) -> torch.Tensor:
    """(6, 4, 4) ego2img of six cameras 60 degrees apart, 70 degree horizontal field of view, 1.5 m up."""
    focal = width / 2 / math.tan(math.radians(35))
    intrinsics = np.array([[focal, 0, width / 2 - 0.5], [0, focal, height / 2 - 0.5], [0, 0, 1]])
    mats = []
    for k in range(6):
        yaw = k * math.pi / 3
        # Columns: the camera's x (right), y (down), z (forward) axes in ego coordinates.
        rotation = np.array([[math.sin(yaw), 0, math.cos(yaw)], [-math.cos(yaw), 0, math.sin(yaw)], [0, -1, 0]])
        cam2ego = np.eye(4)
        cam2ego[:3, :3] = rotation
        cam2ego[:3, 3] = (0.0, 0.0, 1.5)
        mats.append(geometry.ego2img_from(intrinsics, cam2ego))
    return torch.tensor(np.stack(mats), dtype=torch.float32)


def motion(dx: float, yaw: float) -> torch.Tensor:
    """ego_prev2curr (4, 4) of a car that drove dx metres forward then turned by yaw (radians, left positive)."""
    curr2prev = torch.eye(4, dtype=torch.float64)
    curr2prev[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    curr2prev[0, 3] = dx
    return torch.linalg.inv(curr2prev).float()


def make_batch(batch_size: int, frames: int, seed: int = 0, has_prev=None, with_gt: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if has_prev is None:
        has_prev = torch.ones(batch_size, frames, dtype=torch.bool)
        has_prev[:, 0] = False
    has_prev = torch.as_tensor(has_prev, dtype=torch.bool)
    ego_prev2curr = motion(2.0, 0.05).expand(batch_size, frames, 4, 4).clone()
    ego_prev2curr[~has_prev] = torch.eye(4)
    batch = {
        "images": torch.randn(batch_size, frames, 6, 3, H, W, generator=generator),
        "ego2img": camera_ring_ego2img().expand(batch_size, frames, 6, 4, 4).clone(),
        "image_hw": torch.tensor([H, W]).expand(batch_size, frames, 6, 2).clone(),
        "ego_prev2curr": ego_prev2curr,
        "has_prev": has_prev,
        "scene_token": [f"scene{b}" for b in range(batch_size)],
        "sample_token": [f"sample{b}" for b in range(batch_size)],
    }
    if with_gt:
        boxes = torch.tensor(
            [[8.0, 3.0, 0.5, 2.0, 4.5, 1.6, 0.3, 1.0, 0.0],
             [-6.0, -9.0, 0.8, 0.7, 0.7, 1.8, -1.0, 0.0, 0.5],
             [2.0, 12.0, 0.4, 2.5, 10.0, 3.0, 2.0, 0.0, 0.0]]
        )
        labels = torch.tensor([0, 8, 1])
        batch["gt_boxes"] = [boxes[: 3 - b % 2 * 3].clone() for b in range(batch_size)]  # odd rows: no GT
        batch["gt_labels"] = [labels[: 3 - b % 2 * 3].clone() for b in range(batch_size)]
    return batch


def frame(batch: dict, t: int) -> tuple:
    return (batch["images"][:, t], batch["ego2img"][:, t], batch["image_hw"][:, t], batch["ego_prev2curr"][:, t],
            batch["has_prev"][:, t])


# ----------------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------------
def make_decoder(num_layers: int = 3) -> DetectionDecoder:
    torch.manual_seed(0)
    return DetectionDecoder(embed_dims=32, num_layers=num_layers, num_queries=20, num_heads=4, num_points=4,
                            ffn_dims=64, num_classes=NUM_CLASSES, code_size=10, bev_h=8, bev_w=12,
                            point_cloud_range_m=RANGE, dropout=0.0)


def test_decoder_shapes():
    decoder = make_decoder()
    bev = torch.randn(2, 8 * 12, 32)
    logits, codes = decoder(bev)
    assert logits.shape == (3, 2, 20, NUM_CLASSES)
    assert codes.shape == (3, 2, 20, 10)
    assert torch.isfinite(logits).all() and torch.isfinite(codes).all()
    with pytest.raises(ValueError, match="bev must be"):
        decoder(torch.randn(2, 8 * 8, 32))
    with pytest.raises(ValueError, match="code_size"):
        DetectionDecoder(32, 1, 20, 4, 4, 64, NUM_CLASSES, 7, 8, 12, RANGE)


def test_decoder_refinement_codes_are_the_refined_reference_in_metres():
    decoder = make_decoder()
    raw_codes, cross_attn_refs = [], []
    for branch in decoder.reg_branches:
        branch.register_forward_hook(lambda module, inputs, output: raw_codes.append(output))
    for layer in decoder.layers:
        layer.cross_attn.register_forward_pre_hook(lambda module, args: cross_attn_refs.append(args[1]))
    bev = torch.randn(2, 8 * 12, 32)
    _, codes = decoder(bev)

    low = torch.tensor(RANGE[:3])
    size = torch.tensor(RANGE[3:]) - low
    reference = decoder.initial_reference(2)
    assert cross_attn_refs[0].requires_grad, "the first reference must train the reference Linear"
    for layer in range(3):
        torch.testing.assert_close(cross_attn_refs[layer], reference[..., :2])
        refined = (inverse_sigmoid(reference) + raw_codes[layer][..., [0, 1, 4]]).sigmoid()
        torch.testing.assert_close(codes[layer][..., [0, 1, 4]], refined * size + low)
        other = [2, 3, 5, 6, 7, 8, 9]
        torch.testing.assert_close(codes[layer][..., other], raw_codes[layer][..., other])
        centres = codes[layer][..., [0, 1, 4]]
        assert (centres >= low).all() and (centres <= low + size).all()
        if layer > 0:
            assert not cross_attn_refs[layer].requires_grad, f"layer {layer} reads a reference that is not detached"
        reference = refined


def test_decoder_references_are_detached_between_layers():
    """Layer 1's outputs must not send gradient into layer 0's regression branch (only its reference uses it)."""
    decoder = make_decoder(num_layers=2)
    _, codes = decoder(torch.randn(2, 8 * 12, 32))
    codes[1].sum().backward()
    for p in decoder.reg_branches[0].parameters():
        assert p.grad is None or p.grad.abs().max() == 0
    assert decoder.reg_branches[1].codes.weight.grad.abs().max() > 0
    assert decoder.layers[0].self_attn.in_proj_weight.grad.abs().max() > 0  # queries themselves carry gradient


# ----------------------------------------------------------------------------------------------------------------
# Detector: training
# ----------------------------------------------------------------------------------------------------------------
def test_forward_train_batch2_queue2_gradients_and_history_without_grad():
    model = tiny_model()
    model.train()
    calls = []
    model.encoder.register_forward_pre_hook(
        lambda module, args: calls.append((torch.is_grad_enabled(), module.training, bool(args[3] is None)))
    )
    batch = make_batch(2, 2)
    assert batch["gt_boxes"][1].shape == (0, 9)  # a sample without GT
    losses = model.forward_train(batch)
    assert set(losses) == {"loss", "loss_cls_layer0", "loss_bbox_layer0", "loss_cls_layer1", "loss_bbox_layer1"}
    assert all(torch.isfinite(v) for v in losses.values())
    # History frame: no grad, eval mode, no previous BEV; current frame: grad, train mode, previous BEV given.
    assert calls == [(False, False, True), (True, True, False)]
    assert model.training and model.encoder.training and model.backbone.layer1.training
    losses["loss"].backward()
    for name, part in (("backbone", model.backbone), ("neck", model.neck), ("encoder", model.encoder),
                       ("decoder", model.decoder)):
        grads = [p.grad for p in part.parameters() if p.requires_grad and p.grad is not None]
        assert grads and any(g.abs().max() > 0 for g in grads), f"no gradient reached the {name}"
        assert all(torch.isfinite(g).all() for g in grads), f"non-finite gradient in the {name}"
    prev_bev = model.history_bev(batch)
    assert prev_bev is not None and not prev_bev.requires_grad


def test_history_skips_frames_nothing_depends_on():
    model = tiny_model()
    calls = []
    model.encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0][0].shape[0]))
    # [f0, f0, f1] near a scene start: frame 1 has no history, so frame 0 is never needed.
    batch = make_batch(1, 3, has_prev=[[False, False, True]])
    model.forward_train(batch)
    assert len(calls) == 2
    calls.clear()
    model.forward_train(make_batch(1, 3, has_prev=[[False, False, False]]))  # current frame without history
    assert len(calls) == 1


def test_overfits_one_synthetic_batch(tmp_path):
    """Loss falls 10x on one real batch of the synthetic nuScenes set (6 rendered cameras, its GT boxes)."""
    from bevdeform.data.dataset import NuScenesCameraDataset, collate
    from bevdeform.data.infos import create_infos
    from bevdeform.data.synthetic import write_synthetic_nuscenes

    root = write_synthetic_nuscenes(
        tmp_path / "synthetic", num_scenes=1, num_val_scenes=1, samples_per_scene=2, scale=0.15, progress=False
    )
    infos = create_infos(root, "v1.0-synthetic", progress=False)
    dataset = NuScenesCameraDataset(infos["synthetic_train"], root, image_size_hw=(H, W), queue_length=1,
                                    point_cloud_range_m=RANGE)
    batch = collate([dataset[1]])
    assert len(batch["gt_boxes"][0]) >= 5, "the test needs a frame with several objects in range"
    model = tiny_model(dropout=0.0)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = None
    for step in range(150):  # ~55 steps measured (11 boxes, seed 0)
        loss = model.forward_train(batch)["loss"]
        first = loss.item() if first is None else first
        if loss.item() < first / 10:
            break
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < first / 10, f"loss {first:.3f} -> {loss.item():.3f} after {step} steps"


# ----------------------------------------------------------------------------------------------------------------
# Detector: inference
# ----------------------------------------------------------------------------------------------------------------
def _sorted_detections(detections: dict) -> dict:
    key = detections["query_idx"] * NUM_CLASSES + detections["labels"]
    order = key.argsort()
    return {k: v[order] for k, v in detections.items()}


def test_batch_of_two_equals_two_batches_of_one():
    model = tiny_model().eval()
    # Keep every (query, class) pair so that score ties cannot reorder what the top-k keeps.
    model.max_detections = model.decoder.num_queries * NUM_CLASSES
    model.post_center_range_m = None
    batch = make_batch(2, 2, has_prev=[[False, True], [False, True]])
    together = model.predict(batch)
    for b in range(2):
        single = {k: (v[b : b + 1] if isinstance(v, torch.Tensor) else v[b : b + 1]) for k, v in batch.items()}
        alone = model.predict(single)[0]
        a, t = _sorted_detections(alone), _sorted_detections(together[b])
        assert torch.equal(a["query_idx"], t["query_idx"]) and torch.equal(a["labels"], t["labels"])
        torch.testing.assert_close(t["scores"], a["scores"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t["boxes"], a["boxes"], atol=1e-4, rtol=1e-4)


def test_streaming_matches_explicit_prev_bev_and_resets_on_new_scene():
    model = tiny_model().eval()
    model.max_detections = model.decoder.num_queries * NUM_CLASSES
    model.post_center_range_m = None
    frames = 3
    batch = make_batch(2, frames, seed=5)  # two scenes, frames 0..2, has_prev False at frame 0
    stream = StreamingBEVFormer(model)
    streamed = []
    for t in range(frames):
        images, ego2img, image_hw, ego_prev2curr, has_prev = frame(batch, t)
        streamed.append(stream.step(images, ego2img, image_hw, ego_prev2curr, has_prev, ["sceneA", "sceneB"]))

    with torch.no_grad():
        prev_bev = None
        for t in range(frames):
            out = model.forward_frame(*frame(batch, t)[:3], prev_bev, *frame(batch, t)[3:])
            prev_bev = out.bev
            explicit = model.decode(out.all_cls_logits, out.all_box_codes)
            for b in range(2):
                torch.testing.assert_close(streamed[t][b]["scores"], explicit[b]["scores"], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(streamed[t][b]["boxes"], explicit[b]["boxes"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stream.cached_bev("sceneA"), prev_bev[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stream.cached_bev("sceneB"), prev_bev[1], atol=1e-5, rtol=1e-4)
    # The queue path of predict (history frames without gradient) gives what streaming gave for the last frame.
    queued = model.predict(batch)
    for b in range(2):
        torch.testing.assert_close(queued[b]["scores"], streamed[-1][b]["scores"], atol=1e-5, rtol=1e-4)

    # A new scene token in row 0 (has_prev still True) and has_prev False in row 1 both start cold.
    images, ego2img, image_hw, ego_prev2curr, _ = frame(batch, 2)
    warm = stream.step(images, ego2img, image_hw, ego_prev2curr, torch.tensor([True, False]), ["sceneC", "sceneB"])
    with torch.no_grad():
        cold = model.forward_frame(images, ego2img, image_hw, None, ego_prev2curr, torch.tensor([False, False]))
    cold_detections = model.decode(cold.all_cls_logits, cold.all_box_codes)
    for b in range(2):
        torch.testing.assert_close(warm[b]["scores"], cold_detections[b]["scores"], atol=1e-5, rtol=1e-4)
    assert stream.cached_scenes == ["sceneA", "sceneC", "sceneB"]
    stream.reset()
    assert stream.cached_scenes == [] and stream.cached_bev("sceneA") is None


def test_frame_without_previous_bev_is_encoded_as_a_scene_start():
    """Mid-scene queue starts and streaming cold starts must look like the scene starts seen in training."""
    model = tiny_model().eval()
    images, ego2img, image_hw, _, _ = frame(make_batch(2, 1, seed=9), 0)
    moved = motion(3.0, 0.1).expand(2, 4, 4)
    with torch.no_grad():
        reference = model.forward_frame(images, ego2img, image_hw, None, torch.eye(4).expand(2, 4, 4),
                                        torch.tensor([False, False]))
        no_prev = model.forward_frame(images, ego2img, image_hw, None, moved, torch.tensor([True, True]))
        ignored_prev = model.forward_frame(images, ego2img, image_hw, torch.randn_like(reference.bev), moved,
                                           torch.tensor([False, True]))
    torch.testing.assert_close(no_prev.bev, reference.bev)
    torch.testing.assert_close(ignored_prev.bev[0], reference.bev[0])
    assert not torch.allclose(ignored_prev.bev[1], reference.bev[1], atol=1e-3)


def test_forward_frame_with_a_pair_capacity_equals_the_data_dependent_path():
    """The export path (a fixed-length pair list) computes the eval path's numbers, bit for bit."""
    model = tiny_model().eval()
    batch = make_batch(2, 1, seed=11)
    images, ego2img, image_hw, ego_prev2curr, has_prev = frame(batch, 0)
    image_hw[1, 3] = torch.tensor([40, 70])  # a smaller image in one camera: the samples' counts differ
    prev_bev = torch.randn(2, 16 * 16, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.forward_frame(images, ego2img, image_hw, prev_bev, ego_prev2curr, torch.tensor([True, True]))
        counts = expected.num_visible_pairs.tolist()
        assert counts[0] != counts[1] and min(counts) > 0
        for capacity in (max(counts), 6 * 16 * 16):
            got = model.forward_frame(images, ego2img, image_hw, prev_bev, ego_prev2curr,
                                      torch.tensor([True, True]), sca_pair_capacity=capacity)
            assert got.num_visible_pairs.tolist() == counts
            for name in ("bev", "all_cls_logits", "all_box_codes"):
                assert torch.equal(getattr(got, name), getattr(expected, name)), (capacity, name)
        with pytest.raises(ValueError, match=rf"capacity={max(counts) - 1} is smaller"):
            model.forward_frame(images, ego2img, image_hw, prev_bev, ego_prev2curr, torch.tensor([True, True]),
                                sca_pair_capacity=max(counts) - 1)


def test_value_checks_of_frame_inputs_are_skipped_only_while_exporting(monkeypatch):
    from bevdeform.models import bevformer

    model = tiny_model().eval()
    images, ego2img, image_hw, ego_prev2curr, has_prev = frame(make_batch(1, 1), 0)
    with pytest.raises(ValueError, match="image_hw holds"):
        model.check_frame_inputs(images, ego2img, image_hw.flip(-1), ego_prev2curr, has_prev)
    monkeypatch.setattr(bevformer, "is_tracing_or_exporting", lambda: True)
    model.check_frame_inputs(images, ego2img, image_hw.flip(-1), ego_prev2curr, has_prev)
    with pytest.raises(ValueError, match="image_hw"):  # shapes are still checked
        model.check_frame_inputs(images, ego2img, image_hw[:, :5], ego_prev2curr, has_prev)


def test_streaming_rows_of_one_scene_run_in_order():
    """A scene-ordered loader with batch 2 puts consecutive frames of a scene in one batch: same as one by one."""
    model = tiny_model().eval()
    model.max_detections = model.decoder.num_queries * NUM_CLASSES
    model.post_center_range_m = None
    batch = make_batch(1, 2, seed=7)
    one_by_one = StreamingBEVFormer(model)
    expected = [one_by_one.step(*frame(batch, t), ["s"])[0] for t in range(2)]
    together = StreamingBEVFormer(model)
    # (1, T, ...) -> (T, ...): the two frames become two rows of one call.
    got = together.step(batch["images"][0], batch["ego2img"][0], batch["image_hw"][0], batch["ego_prev2curr"][0],
                        batch["has_prev"][0], ["s", "s"])
    for t in range(2):
        torch.testing.assert_close(got[t]["scores"], expected[t]["scores"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together.cached_bev("s"), one_by_one.cached_bev("s"), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Bad input and weights
# ----------------------------------------------------------------------------------------------------------------
def test_inconsistent_inputs_raise_value_errors_naming_the_tensor():
    model = tiny_model().eval()
    batch = make_batch(2, 2)
    bad = dict(batch, images=batch["images"][:, :, :5])
    with pytest.raises(ValueError, match=r"images.*5 cameras.*N=6"):
        model.predict(bad)
    bad = dict(batch, ego2img=batch["ego2img"][:, :, :5])
    with pytest.raises(ValueError, match=r"batch\['ego2img'\].*\(B=2, T=2, N=6, 4, 4\)"):
        model.predict(bad)
    bad = dict(batch, image_hw=batch["image_hw"][:1])
    with pytest.raises(ValueError, match=r"batch\['image_hw'\]"):
        model.forward_train(bad)
    bad = dict(batch, has_prev=batch["has_prev"][:, :1])
    with pytest.raises(ValueError, match=r"batch\['has_prev'\]"):
        model.predict(bad)
    bad = dict(batch, images=batch["images"][..., :50, :])
    with pytest.raises(ValueError, match="multiples of 32"):
        model.predict(bad)
    bad = dict(batch, image_hw=batch["image_hw"].flip(-1))  # (W, H) instead of (H, W)
    with pytest.raises(ValueError, match="image_hw"):
        model.predict(bad)
    bad = dict(batch, gt_boxes=batch["gt_boxes"][:1])
    with pytest.raises(ValueError, match="gt_boxes"):
        model.forward_train(bad)
    stream = StreamingBEVFormer(model)
    images, ego2img, image_hw, ego_prev2curr, has_prev = frame(batch, 0)
    with pytest.raises(ValueError, match="ego_prev2curr"):
        stream.step(images, ego2img, image_hw, ego_prev2curr[:1], has_prev, ["a", "b"])
    with pytest.raises(ValueError, match="scene_tokens"):
        stream.step(images, ego2img, image_hw, ego_prev2curr, has_prev, ["a"])


def test_load_model_weights_round_trip_and_mismatch(tmp_path):
    model = tiny_model(seed=0)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    other = tiny_model(seed=1)
    load_model_weights(other, path)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    # Lightning-style checkpoint with the detector under 'model.'
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "lit.ckpt")
    load_model_weights(other, tmp_path / "lit.ckpt", key_prefix="model.")

    bigger_grid = tiny_model(bev=20)
    mis_shaped = r"mis-shaped keys: .*encoder\.bev_queries\.weight: saved \(256, 32\) vs model \(400, 32\)"
    with pytest.raises(ValueError, match=mis_shaped):
        load_model_weights(bigger_grid, path)
    state = dict(model.state_dict())
    del state["decoder.reference_points.weight"]
    state["decoder.extra"] = torch.zeros(1)
    with pytest.raises(ValueError,
                       match=r"missing keys: decoder\.reference_points\.weight.*unexpected keys: decoder\.extra"):
        load_model_weights(model, state)


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
def test_all_configs_load_and_report_parameter_counts():
    assert {"bev_nano", "bev_tiny", "bev_small", "bev_base"} <= set(available_configs())
    expected = {  # published facts the files must keep
        "bev_tiny": dict(depth=50, levels=1, bev=50, enc=3, queue=3, hw=(450, 800)),
        "bev_small": dict(depth=101, levels=1, bev=150, enc=3, queue=3, hw=(720, 1280)),
        "bev_base": dict(depth=101, levels=4, bev=200, enc=6, queue=4, hw=(900, 1600)),
        "bev_nano": dict(depth=18, levels=2, bev=32, enc=2, queue=2, hw=(126, 224)),
    }
    for name, facts in expected.items():
        cfg = load_config(name)
        assert cfg.name == name
        m = cfg.model
        assert (m.backbone.depth, m.neck.num_outs, m.encoder.bev_h, m.encoder.bev_w, m.encoder.num_layers,
                cfg.data.queue_length, cfg.data.image_size_hw) == (
            facts["depth"], facts["levels"], facts["bev"], facts["bev"], facts["enc"], facts["queue"], facts["hw"])
        if name != "bev_nano":
            assert (m.embed_dims, m.encoder.ffn_dims, m.decoder.num_queries, m.decoder.num_layers) == (256, 512, 900, 6)
            assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_mult, cfg.train.grad_clip_norm) == (
                2e-4, 0.01, 0.1, 35.0)
        counts = count_parameters(cfg)
        print(f"{name}: {counts['total'] / 1e6:.2f} M parameters ({counts['trainable'] / 1e6:.2f} M trainable); "
              + ", ".join(f"{k} {counts[k] / 1e6:.2f} M" for k in ("backbone", "neck", "encoder", "decoder")))


def test_class_names_match_the_data_contract():
    from bevdeform.data.infos import CLASS_NAMES

    assert DataConfig().class_names == CLASS_NAMES
    for name in ("bev_nano", "bev_tiny", "bev_small", "bev_base"):
        assert load_config(name).data.class_names == CLASS_NAMES


def test_unknown_key_suggests_the_closest(tmp_path):
    text = (tmp_path / "cfg.yaml")
    text.write_text("model:\n  decoder:\n    num_querys: 100\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.decoder\.num_querys'; did you mean 'num_queries'"):
        load_config(text)
    text.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'train'"):
        load_config(text)
    with pytest.raises(ConfigError, match=r"unknown key 'warmup_step' in train; did you mean 'warmup_steps'"):
        load_config("bev_tiny", ["train.warmup_step=10"])


def test_overrides_change_nested_values_with_yaml_typing():
    cfg = load_config("bev_tiny", ["model.decoder.num_queries=300", "train.lr=1e-4", "data.image_size_hw=[256, 448]",
                                   "model.backbone.pretrained_path=/weights/r50.pth", "train.max_steps=null"])
    assert cfg.model.decoder.num_queries == 300
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.image_size_hw == (256, 448)
    assert cfg.model.backbone.pretrained_path == "/weights/r50.pth"
    assert cfg.train.max_steps is None
    assert load_config("bev_tiny").model.decoder.num_queries == 900  # the file is untouched
    merged = load_config("bev_small", ["model.encoder={num_layers: 2}"]).model.encoder
    assert (merged.num_layers, merged.bev_h) == (2, 150)  # a section override keeps the file's other keys
    with pytest.raises(ConfigError, match=r"model\.decoder\.num_queries must be an integer"):
        load_config("bev_tiny", ["model.decoder.num_queries=many"])
    with pytest.raises(ConfigError, match=r"model\.encoder\.num_heads"):
        load_config("bev_tiny", ["model.encoder.num_heads=7"])  # 256 is not divisible by 7
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config("bev_tiny", ["train.lr"])


def test_unknown_config_name_lists_the_available_ones():
    listing = r"unknown config name 'bev_tinny'; did you mean 'bev_tiny'.*available: .*bev_base.*bev_nano.*bev_small.*bev_tiny"
    with pytest.raises(FileNotFoundError, match=listing):
        load_config("bev_tinny")


def test_save_config_round_trip(tmp_path):
    cfg = load_config("bev_nano", ["train.seed=7"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert config_to_dict(again)["train"]["seed"] == 7


def test_build_model_maps_the_config():
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_detections=50))
    model = build_model(cfg)
    assert isinstance(model, BEVFormer)
    assert model.max_detections == 50
    assert model.decoder.num_queries == 30 and model.decoder.point_cloud_range_m == RANGE
    assert model.encoder.bev_h == 16 and model.neck.out_channels == 32


def test_bev_heatmap_head_is_built_from_the_config_adds_its_loss_and_is_skipped_at_inference():
    cfg = tiny_config()
    assert build_model(cfg).bev_heatmap_head is None  # weight 0: BEVFormer's losses only
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, loss=dataclasses.replace(cfg.model.loss, bev_heatmap_weight=0.5)))
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.bev_heatmap_head
    assert head is not None and head.weight == 0.5 and (head.bev_h, head.bev_w) == (16, 16)
    assert head.point_cloud_range_m == tuple(RANGE)
    batch = make_batch(2, 1)
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model.train()
    losses = model.forward_train(batch)
    assert losses["loss_bev_heatmap"] > 0
    others = sum(v for k, v in losses.items() if k not in ("loss", "loss_bev_heatmap"))
    torch.testing.assert_close(losses["loss"], others + losses["loss_bev_heatmap"])
    model.zero_grad()
    losses["loss_bev_heatmap"].backward()  # the auxiliary loss alone trains the encoder and the backbone
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.encoder.parameters())
    model.eval()
    model.predict(batch)
    assert len(seen) == 1  # training only
    bad = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, loss=dataclasses.replace(cfg.model.loss, bev_heatmap_weight=-1.0)))
    with pytest.raises(ValueError, match="bev_heatmap_weight"):
        build_model(bad)


def test_bev_box_head_is_built_from_the_config_adds_its_loss_and_is_skipped_at_inference():
    cfg = tiny_config()
    assert build_model(cfg).bev_box_head is None  # weight 0: no head
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, loss=dataclasses.replace(cfg.model.loss, bev_box_weight=0.5),
        decoder=dataclasses.replace(cfg.model.decoder, velocity_scale_mps=10.0)))
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.bev_box_head
    assert head.weight == 0.5 and head.velocity_scale_mps == 10.0 and (head.bev_h, head.bev_w) == (16, 16)
    assert head.point_cloud_range_m == tuple(RANGE)
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    batch = make_batch(2, 2)
    model.train()
    losses = model.forward_train(batch)
    assert losses["loss_bev_box"] > 0
    others = sum(v for k, v in losses.items() if k not in ("loss", "loss_bev_box"))
    torch.testing.assert_close(losses["loss"], others + losses["loss_bev_box"])
    model.zero_grad()
    losses["loss_bev_box"].backward()  # the dense regression alone trains the encoder (TSA included)
    tsa = model.encoder.layers[0].temporal_attention
    assert tsa.sampling_offsets.weight.grad.abs().max() > 0
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.backbone.parameters())
    model.eval()
    model.predict(batch)
    assert len(seen) == 1  # training only
    bad = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, loss=dataclasses.replace(cfg.model.loss, bev_box_weight=-1.0)))
    with pytest.raises(ValueError, match="bev_box_weight"):
        build_model(bad)


# ----------------------------------------------------------------------------------------------------------------
# Two-stage query initialisation (model.decoder.query_init: heatmap)
# ----------------------------------------------------------------------------------------------------------------
def make_heatmap_decoder(num_queries: int = 4) -> DetectionDecoder:
    torch.manual_seed(0)
    return DetectionDecoder(embed_dims=32, num_layers=2, num_queries=num_queries, num_heads=4, num_points=4,
                            ffn_dims=64, num_classes=NUM_CLASSES, code_size=10, bev_h=8, bev_w=12,
                            point_cloud_range_m=RANGE, dropout=0.0, query_init="heatmap")


def planted_heatmap(peaks, batch_size: int = 1) -> torch.Tensor:
    """Logits (B, K, 8, 12) of -10 everywhere except the planted (class, row i, column j, logit) peaks."""
    logits = torch.full((batch_size, NUM_CLASSES, 8, 12), -10.0)
    for k, i, j, value in peaks:
        logits[:, k, i, j] = value
    return logits


def test_heatmap_proposals_start_at_the_peaks_cell_centres_with_their_bev_feature_and_class():
    """On a non-square 8 x 12 grid (rows along y, columns along x), so a transposed index lands elsewhere."""
    decoder = make_heatmap_decoder(num_queries=3)
    # A neighbour of the first peak scores just below it: local-maximum suppression must skip it.
    peaks = [(0, 2, 9, 5.0), (0, 2, 10, 4.9), (8, 6, 1, 3.0), (3, 0, 0, 1.0)]
    bev = torch.randn(1, 8 * 12, 32)
    queries, query_pos, reference, labels, cells = decoder.heatmap_proposals(bev, planted_heatmap(peaks))
    assert labels.tolist() == [[0, 8, 3]] and cells.tolist() == [[2 * 12 + 9, 6 * 12 + 1, 0]]
    expected_xy = torch.tensor([[(9 + 0.5) / 12, (2 + 0.5) / 8], [(1 + 0.5) / 12, (6 + 0.5) / 8],
                                [0.5 / 12, 0.5 / 8]])
    torch.testing.assert_close(reference[0, :, :2], expected_xy)
    assert (reference[..., 2] == 0.5).all()
    for q, (cell, label) in enumerate(zip(cells[0].tolist(), labels[0].tolist())):
        torch.testing.assert_close(queries[0, q], bev[0, cell] + decoder.class_embedding.weight[label])
    torch.testing.assert_close(query_pos, decoder.position_embedding(reference[..., :2]))
    # In metres: the first proposal is the centre of cell (row 2, column 9) of the +-20 m grid (3.33 x 5 m cells).
    centre_m = decoder.normalised_to_metres(reference[0, 0])
    torch.testing.assert_close(centre_m[:2], torch.tensor([-20.0 + 9.5 * 40 / 12, -20.0 + 2.5 * 40 / 8]))


def test_heatmap_decoder_boxes_start_at_the_proposal_and_gradients_reach_the_bev_not_the_cell_choice():
    decoder = make_heatmap_decoder(num_queries=2)
    for branch in decoder.reg_branches:  # no refinement: every layer's centre is the proposal's cell centre
        torch.nn.init.zeros_(branch.codes.weight)
        torch.nn.init.zeros_(branch.codes.bias)
    bev = torch.randn(1, 8 * 12, 32, requires_grad=True)
    heat = planted_heatmap([(1, 5, 3, 4.0), (2, 1, 7, 3.0)]).requires_grad_()
    logits, codes = decoder(bev, heat)
    low, size = torch.tensor(RANGE[:2]), torch.tensor(RANGE[3:5]) - torch.tensor(RANGE[:2])
    expected = torch.tensor([[(3.5) / 12, 5.5 / 8], [7.5 / 12, 1.5 / 8]]) * size + low  # (x, y) metres
    for layer in range(2):
        torch.testing.assert_close(codes[layer, 0, :, :2], expected)
    (logits.sum() + codes.sum()).backward()
    assert bev.grad[0, 5 * 12 + 3].abs().max() > 0  # the proposal's cell feeds its query
    assert heat.grad is None  # the choice of cells is not differentiable
    assert decoder.class_embedding.weight.grad[[1, 2]].abs().max() > 0
    assert decoder.class_embedding.weight.grad[0].abs().max() == 0


def test_heatmap_query_init_errors():
    decoder = make_heatmap_decoder()
    with pytest.raises(ValueError, match="needs heatmap_logits"):
        decoder(torch.randn(1, 8 * 12, 32))
    with pytest.raises(ValueError, match="heatmap_logits must be"):
        decoder(torch.randn(1, 8 * 12, 32), torch.randn(1, NUM_CLASSES, 12, 8))
    with pytest.raises(ValueError, match="too many queries"):
        DetectionDecoder(32, 1, 8 * 12 * NUM_CLASSES + 1, 4, 4, 64, NUM_CLASSES, 10, 8, 12, RANGE,
                         query_init="heatmap")
    with pytest.raises(ValueError, match="query_init"):
        DetectionDecoder(32, 1, 4, 4, 4, 64, NUM_CLASSES, 10, 8, 12, RANGE, query_init="peaks")
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, decoder=dataclasses.replace(cfg.model.decoder, query_init="heatmap")))
    with pytest.raises(ValueError, match="bev_heatmap_weight"):
        build_model(cfg)
    with pytest.raises(ConfigError, match="model.decoder.query_init"):
        load_config("bev_nano", ["model.decoder.query_init=heatmap", "model.loss.bev_heatmap_weight=0"])


def test_two_stage_detector_trains_predicts_and_streams():
    cfg = tiny_config(dropout=0.0)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, decoder=dataclasses.replace(cfg.model.decoder, query_init="heatmap"),
        loss=dataclasses.replace(cfg.model.loss, bev_heatmap_weight=1.0)))
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not hasattr(model.decoder, "query_embedding")  # no unused learned queries (DDP needs every parameter)
    head_calls = []
    model.bev_heatmap_head.register_forward_hook(lambda module, args, out: head_calls.append(1))
    batch = make_batch(2, 2)
    model.train()
    losses = model.forward_train(batch)
    assert len(head_calls) == 1  # one heatmap for the queries and its loss
    assert losses["loss_bev_heatmap"] > 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
    model.eval()
    detections = model.predict(batch)
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 9
    streaming = StreamingBEVFormer(model)
    for t in range(2):
        streamed = streaming.step(*[x[:1] for x in frame(batch, t)], scene_tokens=["scene0"])
        assert streamed[0]["boxes"].shape[1] == 9


def test_velocity_scale_multiplies_only_the_velocity_outputs():
    """velocity_scale_mps: code dims 8, 9 (vx, vy, m/s) are the branch's outputs times the scale; every other dim is
    untouched, and the loss sees the scaled velocity (so the gradient reaching the branch is scaled too)."""
    raw, scaled = [], []
    for scale, store in ((1.0, raw), (10.0, scaled)):
        torch.manual_seed(0)
        decoder = DetectionDecoder(32, 2, 20, 4, 4, 64, NUM_CLASSES, 10, 8, 12, RANGE, dropout=0.0,
                                   velocity_scale_mps=scale)
        outputs = []
        decoder.reg_branches[-1].register_forward_hook(lambda module, inputs, output: outputs.append(output))
        _, codes = decoder(torch.randn(2, 8 * 12, 32, generator=torch.Generator().manual_seed(1)))
        store.extend([codes[-1], outputs[0]])
    torch.testing.assert_close(scaled[1], raw[1])  # same branch outputs (same weights and inputs)
    torch.testing.assert_close(scaled[0][..., 8:10], 10.0 * raw[1][..., 8:10])
    torch.testing.assert_close(scaled[0][..., :8], raw[0][..., :8])
    torch.testing.assert_close(raw[0][..., 8:10], raw[1][..., 8:10])  # BEVFormer's default: raw m/s
    with pytest.raises(ValueError, match="velocity_scale_mps"):
        DetectionDecoder(32, 1, 4, 4, 4, 64, NUM_CLASSES, 10, 8, 12, RANGE, velocity_scale_mps=0.0)
    cfg = load_config("bev_nano", ["model.decoder.velocity_scale_mps=10"])
    assert build_model(cfg).decoder.velocity_scale_mps == 10.0


def test_heading_scale_multiplies_only_the_heading_outputs():
    """heading_scale: code dims 6, 7 (sin, cos of the yaw) are the branch's outputs times the scale; every other
    dim is untouched; 1.0 (BEVFormer) is the branch's raw output, so published checkpoints decode unchanged."""
    raw, scaled = [], []
    for scale, store in ((1.0, raw), (7.0, scaled)):
        torch.manual_seed(0)
        decoder = DetectionDecoder(32, 2, 20, 4, 4, 64, NUM_CLASSES, 10, 8, 12, RANGE, dropout=0.0,
                                   velocity_scale_mps=3.0, heading_scale=scale)
        outputs = []
        decoder.reg_branches[-1].register_forward_hook(lambda module, inputs, output: outputs.append(output))
        _, codes = decoder(torch.randn(2, 8 * 12, 32, generator=torch.Generator().manual_seed(1)))
        store.extend([codes[-1], outputs[0]])
    torch.testing.assert_close(scaled[1], raw[1])  # same branch outputs (same weights and inputs)
    torch.testing.assert_close(scaled[0][..., 6:8], 7.0 * raw[1][..., 6:8])
    torch.testing.assert_close(scaled[0][..., :6], raw[0][..., :6])
    torch.testing.assert_close(scaled[0][..., 8:10], raw[0][..., 8:10])
    assert torch.equal(raw[0][..., 6:8], raw[1][..., 6:8])  # BEVFormer's default: the raw outputs, bit for bit
    torch.testing.assert_close(raw[0][..., 8:10], 3.0 * raw[1][..., 8:10])
    with pytest.raises(ValueError, match="heading_scale"):
        DetectionDecoder(32, 1, 4, 4, 4, 64, NUM_CLASSES, 10, 8, 12, RANGE, heading_scale=0.0)
    cfg = load_config("bev_nano", ["model.decoder.heading_scale=10"])
    assert build_model(cfg).decoder.heading_scale == 10.0
    with pytest.raises(ValueError, match="model.decoder.heading_scale"):
        load_config("bev_nano", ["model.decoder.heading_scale=-1"])
