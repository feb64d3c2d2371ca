"""Export: the static-shape streaming wrapper computes what the eval path computes; ONNX (decomposed MSDA) run by
onnxruntime matches PyTorch; the custom-op ONNX carries bevdeform-domain nodes; torch.export takes the model with
the op as one node.

A small bev_nano (ResNet-18, 64x112 images, 16x16 BEV, 1 encoder and 2 decoder layers, random weights) on one
frame of the nuScenes camera rig.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bevdeform.export import (INPUT_NAMES, ONNX_CUSTOM_OP, OUTPUT_NAMES, ExportableStreamingDetector,
                              decode_topk_fixed, example_frame_inputs, export_onnx, export_program, load_detector,
                              msda_implementation, run_onnxruntime)
from bevdeform.models.attention import find_visible_pairs, is_tracing_or_exporting
from bevdeform.models.head import decode_predictions
from bevdeform.msda import native_available

REPO = Path(__file__).resolve().parent.parent
SMALL_MODEL = ["model.decoder.num_queries=50", "model.max_detections=40", "model.encoder.num_layers=1",
               "model.decoder.num_layers=2", "data.image_size_hw=[64,112]", "model.encoder.bev_h=16",
               "model.encoder.bev_w=16"]
HAS_ONNX = importlib.util.find_spec("onnx") is not None
HAS_ONNXRUNTIME = importlib.util.find_spec("onnxruntime") is not None
needs_native = pytest.mark.skipif(not native_available("cpu", torch.float32),
                                  reason="the native MSDA op is not built here (no C++ compiler?)")


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread: these tests check numbers, not speed, and on 2 cores shared with other jobs two OpenMP threads
    # stall each other (this file: 38 s with 2 threads, 11 s with 1, under a load average of 3).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    cfg, model = load_detector("bev_nano", overrides=SMALL_MODEL)
    # Spread the class logits so the top-k order is not decided by float rounding between near-equal scores.
    with torch.no_grad():
        for branch in model.decoder.cls_branches:
            branch.logits.weight.mul_(4.0)
    return cfg, model


def _args(inputs):
    return tuple(inputs[name] for name in INPUT_NAMES)


def assert_program_equals_eager(program, module, inputs):
    """The exported program and the eager wrapper give the same outputs on ``inputs`` (another frame than traced)."""
    from bevdeform.export import input_tuple

    with torch.no_grad():
        got = program.module()(*input_tuple(module, inputs))
        expected = module(*input_tuple(module, inputs))
    for name, a, b in zip(OUTPUT_NAMES, got, expected):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_tracing_and_exporting_are_detected():
    """The value checks of the model are skipped under exactly these: torch.export (non-strict, as export_program
    runs it), torch.jit.trace (the TorchScript ONNX exporter) and torch.compile; never in eager mode."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(is_tracing_or_exporting())
            return x + 1

    x = torch.ones(3)
    Probe()(x)
    torch.export.export(Probe(), (x,), strict=False)
    torch.jit.trace(Probe(), (x,), check_trace=False)
    assert seen == [False, True, True]


def test_wrapper_with_too_small_a_pair_capacity_raises_in_eager_mode(small):
    cfg, model = small
    inputs = example_frame_inputs(cfg)
    module = ExportableStreamingDetector(model, sca_pair_capacity=10)
    with torch.no_grad(), pytest.raises(ValueError, match="capacity=10 is smaller"):
        module(*_args(inputs))
    with pytest.raises(ValueError, match="sca_pair_capacity=0"):
        ExportableStreamingDetector(model, sca_pair_capacity=0)


def test_decode_topk_fixed_marks_the_rows_decode_predictions_keeps():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 30, 10, generator=generator) * 3
    codes = torch.randn(2, 30, 10, generator=generator) * 20
    bounds = (-15.0, -15.0, -10.0, 15.0, 15.0, 10.0)
    boxes, scores, labels, valid = decode_topk_fixed(logits, codes, 40, score_threshold=0.2, post_center_range_m=bounds)
    expected = decode_predictions(logits, codes, max_num=40, score_threshold=0.2, post_center_range_m=bounds)
    for b in range(2):
        assert 0 < int(valid[b].sum()) < 40
        torch.testing.assert_close(boxes[b][valid[b]], expected[b]["boxes"])
        torch.testing.assert_close(scores[b][valid[b]], expected[b]["scores"])
        torch.testing.assert_close(labels[b][valid[b]], expected[b]["labels"])


@pytest.mark.parametrize("has_prev", [True, False])
@pytest.mark.parametrize("capacity", [None, "count"])
def test_wrapper_matches_the_streaming_eval_path(small, has_prev, capacity):
    cfg, model = small
    inputs = example_frame_inputs(cfg, has_prev=has_prev)
    if capacity == "count":
        pairs = find_visible_pairs(model.encoder.pillar_points_ego(), inputs["ego2img"], inputs["image_hw"],
                                   tuple(inputs["images"].shape[-2:]))
        capacity = int(pairs.num_pairs.max())
    module = ExportableStreamingDetector(model, sca_pair_capacity=capacity)
    with torch.no_grad():
        boxes, scores, labels, valid, bev, num_pairs = module(*_args(inputs))
        out = model.forward_frame(inputs["images"], inputs["ego2img"], inputs["image_hw"],
                                  inputs["prev_bev"] if has_prev else None, inputs["ego_prev2curr"],
                                  inputs["has_prev"])
        expected = model.decode(out.all_cls_logits, out.all_box_codes)[0]
    torch.testing.assert_close(bev, out.bev, rtol=1e-6, atol=1e-6)
    assert num_pairs.shape == (1,) and int(num_pairs) > 0
    assert boxes.shape == (1, model.max_detections, 9) and valid.dtype == torch.bool
    torch.testing.assert_close(boxes[0][valid[0]], expected["boxes"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[0][valid[0]], expected["scores"], rtol=1e-5, atol=1e-6)
    assert torch.equal(labels[0][valid[0]], expected["labels"])


def test_msda_implementation_restores_the_environment(monkeypatch):
    monkeypatch.delenv("BEVDEFORM_MSDA_IMPL", raising=False)
    import os

    with msda_implementation("reference"):
        assert os.environ["BEVDEFORM_MSDA_IMPL"] == "reference"
    assert "BEVDEFORM_MSDA_IMPL" not in os.environ
    with pytest.raises(ValueError, match="expected reference, native or auto"):
        with msda_implementation("fast"):
            pass


@pytest.mark.skipif(not (HAS_ONNX and HAS_ONNXRUNTIME),
                    reason="onnx/onnxruntime not installed (the 'export' extra: pip install -e '.[dev,export]')")
def test_decomposed_onnx_runs_in_onnxruntime_and_matches_pytorch(small, tmp_path):
    cfg, model = small
    module = ExportableStreamingDetector(model)
    path = export_onnx(module, example_frame_inputs(cfg, seed=1), tmp_path / "nano.onnx", msda="decomposed")
    import onnx

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == list(INPUT_NAMES)
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    assert not [n for n in graph.node if n.domain not in ("", "ai.onnx")]
    assert any(n.op_type == "GridSample" for n in graph.node)
    # Run on another frame than the one traced: the graph must not have baked in its values.
    inputs = example_frame_inputs(cfg, seed=2)
    inputs["ego_prev2curr"][0, 0, 3] = -3.0
    with torch.no_grad(), msda_implementation("reference"):
        expected = dict(zip(OUTPUT_NAMES, module(*_args(inputs))))
    got = run_onnxruntime(path, inputs, num_threads=2)
    np.testing.assert_allclose(got["bev"], expected["bev"].numpy(), rtol=1e-4, atol=1e-4)
    scores = expected["scores"].numpy()[0]
    np.testing.assert_allclose(got["scores"][0], scores, rtol=1e-4, atol=1e-5)
    # Rows whose score is within float noise of a neighbour's may swap places; compare the others one to one.
    gaps = np.abs(np.diff(scores))
    distinct = np.ones_like(scores, dtype=bool)
    distinct[1:] &= gaps > 1e-4
    distinct[:-1] &= gaps > 1e-4
    assert distinct.sum() >= len(scores) // 2
    np.testing.assert_array_equal(got["labels"][0][distinct], expected["labels"].numpy()[0][distinct])
    np.testing.assert_array_equal(got["valid"][0][distinct], expected["valid"].numpy()[0][distinct])
    np.testing.assert_allclose(got["boxes"][0][distinct], expected["boxes"].numpy()[0][distinct], rtol=1e-3,
                               atol=1e-3)
    np.testing.assert_array_equal(got["num_visible_pairs"], expected["num_visible_pairs"].numpy())


@needs_native
@pytest.mark.skipif(not HAS_ONNX, reason="onnx not installed (the 'export' extra: pip install -e '.[dev,export]')")
def test_custom_op_onnx_has_one_bevdeform_node_per_msda_call(small, tmp_path):
    cfg, model = small
    path = export_onnx(ExportableStreamingDetector(model), example_frame_inputs(cfg), tmp_path / "custom.onnx",
                       msda="custom")
    import onnx

    proto = onnx.load(str(path))
    custom = [n for n in proto.graph.node if n.domain == "bevdeform"]
    # TSA and SCA per encoder layer, one deformable attention per decoder layer.
    assert len(custom) == 2 * len(model.encoder.layers) + len(model.decoder.layers)
    assert {n.op_type for n in custom} == {ONNX_CUSTOM_OP}
    assert all(len(n.input) == 5 and len(n.output) == 1 for n in custom)
    assert not any(n.op_type == "GridSample" and n.domain == "" and "msda" in n.name for n in proto.graph.node)
    assert {(o.domain, o.version) for o in proto.opset_import} >= {("bevdeform", 1)}


@needs_native
def test_torch_export_takes_the_op_as_one_node(small):
    cfg, model = small
    module = ExportableStreamingDetector(model)
    inputs = example_frame_inputs(cfg)
    program = export_program(module, inputs)
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert sum(target is torch.ops.bevdeform.ms_deform_attn.default for target in targets) == \
        2 * len(model.encoder.layers) + len(model.decoder.layers)
    assert_program_equals_eager(program, module, example_frame_inputs(cfg, seed=3))
    with pytest.raises(ValueError, match="reference reads spatial shapes"):
        export_program(module, inputs, msda="reference")


@pytest.mark.skipif(not (HAS_ONNX and HAS_ONNXRUNTIME), reason="onnx/onnxruntime not installed (the 'export' extra)")
def test_export_script_writes_and_verifies(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import export as script
    finally:
        sys.path.pop(0)
    out = tmp_path / "nano.onnx"
    code = script.main(["--config", "bev_nano", *SMALL_MODEL, "--format", "onnx", "--msda", "decomposed",
                        "--out", str(out), "--verify"])
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "max |onnxruntime - torch|" in printed
    assert script.main(["--config", "bev_nano", "--checkpoint", str(tmp_path / "none.ckpt")]) == 2


def test_two_stage_model_exports_with_its_heatmap_proposals():
    """model.decoder.query_init=heatmap puts the heatmap head, its peak extraction and top-k into the graph:
    torch.export takes it and the exported program equals eager on another frame."""
    torch.manual_seed(0)
    cfg, model = load_detector("bev_nano", overrides=[*SMALL_MODEL, "model.decoder.query_init=heatmap"])
    module = ExportableStreamingDetector(model)
    program = export_program(module, example_frame_inputs(cfg))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert any("topk" in target for target in targets) and any("max_pool2d" in target for target in targets)
    assert_program_equals_eager(program, module, example_frame_inputs(cfg, seed=4))


@pytest.mark.skipif(not (HAS_ONNX and HAS_ONNXRUNTIME), reason="onnx/onnxruntime not installed (the 'export' extra)")
def test_published_checkpoint_config_exports_with_a_can_bus_input(tmp_path):
    """configs/bevformer_tiny.yaml (model.frame lidar, official rotation by can_bus[17] degrees, CAN-bus input): the
    wrapper takes can_bus as a seventh input; torch.export and the decomposed ONNX (onnxruntime) equal eager on a
    frame whose turn differs from the traced one, so the angle is an input of the graph, not a constant."""
    from bevdeform.export import CAN_BUS_INPUT, input_tuple

    torch.manual_seed(0)
    cfg, model = load_detector("bevformer_tiny", overrides=SMALL_MODEL)
    module = ExportableStreamingDetector(model)
    assert module.input_names == (*INPUT_NAMES, CAN_BUS_INPUT)
    traced_on = example_frame_inputs(cfg)
    other = example_frame_inputs(cfg, seed=5)
    other[CAN_BUS_INPUT][:, 17] = -7.5  # another yaw delta (degrees) than the traced frame's 2
    other[CAN_BUS_INPUT][:, 0:2] = torch.tensor([0.4, -1.2])
    with torch.no_grad():
        expected = module(*input_tuple(module, other))
        straight = dict(other, **{CAN_BUS_INPUT: other[CAN_BUS_INPUT].clone()})
        straight[CAN_BUS_INPUT][:, 17] = 0.0
        assert (module(*input_tuple(module, straight))[4] - expected[4]).abs().max() > 1e-3  # the angle matters
    assert_program_equals_eager(export_program(module, traced_on), module, other)
    path = export_onnx(module, traced_on, tmp_path / "bevformer_tiny.onnx", msda="decomposed")
    with torch.no_grad(), msda_implementation("reference"):
        reference = dict(zip(OUTPUT_NAMES, module(*input_tuple(module, other))))
    onnx_out = run_onnxruntime(path, other, num_threads=2)
    np.testing.assert_allclose(onnx_out["bev"], reference["bev"].numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="can_bus"):
        module(*input_tuple(module, other)[:6])
