"""Latency profiling: percentiles, per-stage timing by hooks (which time what they claim and leave the model as they
found it), the reference-vs-native comparison, the markdown/JSON report, the trace and the script.

A small bev_nano (64x112 images, 16x16 BEV, 1 encoder and 2 decoder layers, random weights) for a few frames; one
thread, since the numbers checked here are structural, not speeds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bevdeform.export import example_frame_inputs, load_detector
from bevdeform.msda import native_available
from bevdeform.profiling import (STAGES, format_markdown, latency_stats, new_report, finish_report,
                                 profile_streaming, export_trace, run_profile)

REPO = Path(__file__).resolve().parent.parent
SMALL_MODEL = ["model.decoder.num_queries=50", "model.max_detections=40", "model.encoder.num_layers=1",
               "model.decoder.num_layers=2", "data.image_size_hw=[64,112]", "model.encoder.bev_h=16",
               "model.encoder.bev_w=16"]
needs_native = pytest.mark.skipif(not native_available("cpu", torch.float32),
                                  reason="the native MSDA op is not built here (no C++ compiler?)")


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    cfg, model = load_detector("bev_nano", overrides=SMALL_MODEL)
    return cfg, model, example_frame_inputs(cfg)


def test_latency_stats():
    stats = latency_stats(list(range(1, 101)))
    assert stats.median_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert (stats.min_ms, stats.max_ms, stats.mean_ms) == (1.0, 100.0, 50.5)
    with pytest.raises(ValueError, match="no samples"):
        latency_stats([])


def test_stages_add_up_time_what_they_claim_and_hooks_are_removed(small):
    cfg, model, inputs = small
    delay_s = 0.03

    # A 30 ms stall inside the neck (a forward hook registered before the profiler's own, so it runs inside the
    # profiler's neck span) must land in the neck's time and nowhere else.
    def stall(_module, _inputs, _output):
        time.sleep(delay_s)

    handle = model.neck.register_forward_hook(stall)
    try:
        runs = profile_streaming(model, inputs, iters=3, warmup=1, msda_impls=("auto",))
    finally:
        handle.remove()
    (name, run), = runs.items()
    assert name in ("native", "reference") and run.frames == 3
    assert set(run.stages) == set(STAGES)
    assert run.stages["neck"].min_ms >= delay_s * 1000
    assert run.stages["other"].max_ms < delay_s * 1000 / 2  # nor in what the stages leave over
    for stage in ("backbone", "temporal_self_attention", "spatial_cross_attention", "encoder_other", "decoder",
                  "decode"):
        assert run.stages[stage].median_ms > 0, stage
    # "other" closes the sum, so the stages add up to the end-to-end time of each frame (medians need not).
    assert run.stages["other"].min_ms > -0.5
    assert sum(s.mean_ms for s in run.stages.values()) == pytest.approx(run.end_to_end.mean_ms, rel=1e-9)
    assert run.fps == pytest.approx(1000.0 / run.end_to_end.median_ms)
    assert run.peak_memory_mb > 0 and run.peak_memory_kind == "process_max_rss"
    assert run.visible_pairs and run.visible_pairs > 0
    # Nothing of the instrumentation stays on the model.
    assert "decode" not in vars(model)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@needs_native
def test_compare_msda_reports_both_paths_and_their_ratio(small, tmp_path):
    cfg, model, inputs = small
    report = new_report(cfg.name, torch.device("cpu"), "fp32", cfg.data.image_size_hw,
                        tuple(inputs["images"].shape[-2:]), iters=2, warmup=1, compile_modules=False,
                        cuda_graphs=False, checkpoint=None)
    runs = profile_streaming(model, inputs, iters=2, warmup=1, msda_impls=("reference", "native"))
    finish_report(report, runs)
    ratios = report.ratio_reference_over_native()
    assert set(runs) == {"reference", "native"}
    assert ratios["end_to_end"] == pytest.approx(runs["reference"].end_to_end.median_ms
                                                 / runs["native"].end_to_end.median_ms)
    table = format_markdown(report)
    assert "| stage | reference median ms | native median ms | reference / native |" in table
    assert "**end to end**" in table and report.date in table and "load average" in table
    data = json.loads(report.write_json(tmp_path / "r.json").read_text())
    assert data["ratio_reference_over_native"]["end_to_end"] == pytest.approx(ratios["end_to_end"])
    assert set(data["runs"]["native"]["stages"]) == set(STAGES)
    with pytest.raises(ValueError, match="twice"):
        profile_streaming(model, inputs, iters=1, warmup=1, msda_impls=("native", "auto"))


def test_precision_and_argument_errors(small):
    cfg, model, inputs = small
    runs = profile_streaming(model, inputs, iters=1, warmup=1, precision="bf16")
    assert next(iter(runs.values())).end_to_end.median_ms > 0
    with pytest.raises(ValueError, match="precision"):
        profile_streaming(model, inputs, iters=1, warmup=1, precision="int8")
    with pytest.raises(ValueError, match="batch 1"):
        profile_streaming(model, example_frame_inputs(cfg, batch_size=2), iters=1, warmup=1)
    with pytest.raises(ValueError, match="--cuda-graphs needs --device cuda"):
        run_profile("bev_nano", overrides=SMALL_MODEL, cuda_graphs=True)
    with pytest.raises(ValueError, match="--compare-msda"):
        run_profile("bev_nano", overrides=SMALL_MODEL, compile_modules=True, compare_msda=True)


def test_trace_is_a_chrome_trace(small, tmp_path):
    _, model, inputs = small
    path = export_trace(model, inputs, tmp_path / "trace.json", frames=1)
    events = json.loads(path.read_text())["traceEvents"]
    assert any(event.get("name") == "streaming_frame_0" for event in events)


def test_script_prints_a_table_and_writes_json(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import profile_latency as script
    finally:
        sys.path.pop(0)
    json_path = tmp_path / "latency.json"
    code = script.main(["--config", "bev_nano", *SMALL_MODEL, "--iters", "2", "--warmup", "1", "--threads", "1",
                        "--image-size", "64x96", "--json", str(json_path), "--markdown", str(tmp_path / "t.md")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| **end to end** |" in printed and "6 cameras at 64x96 (padded 64x96)" in printed
    data = json.loads(json_path.read_text())
    assert data["threads"] == 1 and data["image_size_hw"] == [64, 96] and data["iters"] == 2
    assert np.isfinite(next(iter(data["runs"].values()))["end_to_end"]["p99_ms"])
    assert script.main(["--config", "bev_nano", "--device", "cuda:0"] if not torch.cuda.is_available()
                       else ["--config", "bev_nano", "--threads", "0"]) == 2


def test_published_bevformer_configs_profile_with_lidar2img_and_can_bus():
    """A `model.frame: lidar` model (configs/bevformer_*.yaml) gets lidar2img (the rig's ego2img after the LIDAR_TOP
    extrinsics) and an absolute CAN-bus vector in the example inputs, and profiles like any other config."""
    from bevdeform.config import load_config
    from bevdeform.data.synthetic import rig_calibration
    from bevdeform.profiling import run_profile

    ego_cfg, lidar_cfg = load_config("bev_tiny"), load_config("bevformer_tiny")
    ego_inputs = example_frame_inputs(ego_cfg, image_size_hw=(64, 112))
    lidar_inputs = example_frame_inputs(lidar_cfg, image_size_hw=(64, 112))
    assert "can_bus_abs" not in ego_inputs and lidar_inputs["can_bus_abs"].shape == (1, 18)
    lidar2ego = torch.tensor(rig_calibration(seed=0, log_index=0, scale=1.0)["LIDAR_TOP"].sensor2ego())
    torch.testing.assert_close(lidar_inputs["ego2img"].double(), ego_inputs["ego2img"].double() @ lidar2ego,
                               rtol=1e-5, atol=1e-3)
    report = run_profile("bevformer_tiny", image_size_hw=(64, 112), iters=1, warmup=1, threads=1)
    assert report.runs["native" if native_available("cpu", torch.float32) else "reference"].end_to_end.median_ms > 0
