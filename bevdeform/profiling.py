"""Per-stage latency of the streaming detector, as a vehicle runs it: batch 1, six cameras, a cached previous BEV.

What is timed: :meth:`StreamingBEVFormer.step` on one frame after the scene's first frame has filled the cache, so
every timed frame runs temporal self-attention against a real previous BEV. Stages are timed without touching the
model files, by forward hooks on its submodules and by wrapping the instance's ``decode``:

    backbone                  model.backbone                               (B*N images)
    neck                      model.neck
    temporal_self_attention   model.encoder.layers[i].temporal_attention   (summed over layers)
    spatial_cross_attention   model.encoder.layers[i].spatial_attention    (summed over layers)
    encoder_other             model.encoder minus the two above: visible-pair search, previous-BEV alignment,
                              ego-motion MLP, FFNs and norms
    decoder                   model.decoder (object queries, its class and box branches: the head)
    decode                    model.decode (top-k, box decoding)
    other                     end to end minus the stages: input checks, the streaming cache, Python overhead

Clocks: on CUDA every boundary is a CUDA event recorded on the current stream, read after the frame's last event
has completed (no synchronisation inside the frame beyond the model's own); on the CPU ``time.perf_counter_ns``.
Warm-up frames are run first and not counted. Percentiles are over the timed frames; FPS is 1000 / median
end-to-end milliseconds. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed frames on CUDA and the
process's peak resident set size (``ru_maxrss``, everything Python and torch hold) on the CPU.

Options a deployment asks about: ``threads`` (a CPU budget: ``torch.set_num_threads``), ``precision`` (fp16/bf16 by
``torch.autocast``; the MSDA op runs in float32 under autocast, as its locations are float32), ``compile``
(``torch.compile`` of the backbone, neck, every TSA/SCA module and the decoder, each separately so the hooks stay
outside the compiled code; the encoder as a whole is not compiled: its visible-pair search is data dependent),
``cuda_graphs`` (the same with ``mode='reduce-overhead'``, CUDA only), the MSDA path (``reference``/``native``), and
a comparison of the two MSDA paths in one run, interleaved frame by frame so both see the same machine load.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from bevdeform.models.bevformer import BEVFormer, StreamingBEVFormer

__all__ = [
    "STAGES",
    "PRECISIONS",
    "LatencyStats",
    "ProfileRun",
    "ProfileReport",
    "StageTimer",
    "latency_stats",
    "prepare_model",
    "profile_streaming",
    "export_trace",
    "format_markdown",
    "machine_description",
    "new_report",
    "finish_report",
    "run_profile",
]

STAGES = ("backbone", "neck", "temporal_self_attention", "spatial_cross_attention", "encoder_other", "decoder",
          "decode", "other")
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
_SCENE = "profiled-scene"


@dataclass
class LatencyStats:
    """Milliseconds over the timed frames."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float


def latency_stats(samples_ms: Sequence[float]) -> LatencyStats:
    """Median, p90, p99 (linear interpolation between order statistics), mean, min and max of ``samples_ms``."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("latency_stats: no samples (iters must be >= 1)")
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return LatencyStats(float(p50), float(p90), float(p99), float(values.mean()), float(values.min()),
                        float(values.max()))


@dataclass
class ProfileRun:
    """One configuration's measurement.

    Attributes:
        msda: the MSDA path timed (reference or native).
        end_to_end: latency of a whole streaming step (images in, boxes out).
        stages: per-stage latency (``STAGES``), each over the same frames.
        fps: 1000 / end_to_end.median_ms.
        peak_memory_mb: see the module docstring (what it measures depends on the device).
        peak_memory_kind: ``cuda_max_allocated`` or ``process_max_rss``.
        frames: timed frames; visible_pairs: (BEV cell, camera) pairs spatial cross-attention attends to.
    """

    msda: str
    end_to_end: LatencyStats
    stages: dict[str, LatencyStats]
    fps: float
    peak_memory_mb: float
    peak_memory_kind: str
    frames: int
    visible_pairs: int | None = None


@dataclass
class ProfileReport:
    """A profiling session: what was measured, where, and the runs (one per MSDA path)."""

    config: str
    device: str
    device_name: str
    precision: str
    threads: int
    image_size_hw: tuple[int, int]
    padded_image_hw: tuple[int, int]
    iters: int
    warmup: int
    compile: bool
    cuda_graphs: bool
    checkpoint: str | None
    torch_version: str
    date: str
    load_average_before: tuple[float, float, float] | None
    load_average_after: tuple[float, float, float] | None = None
    omp_wait_policy: str | None = None  # the OMP_WAIT_POLICY environment variable: it matters on shared cores
    runs: dict[str, ProfileRun] = field(default_factory=dict)

    def ratio_reference_over_native(self) -> dict[str, float] | None:
        """Median latency of the reference path divided by the native one's, end to end and per stage (>1: the
        native op is faster); None unless both were run."""
        if "reference" not in self.runs or "native" not in self.runs:
            return None
        reference, native = self.runs["reference"], self.runs["native"]
        ratios = {"end_to_end": reference.end_to_end.median_ms / native.end_to_end.median_ms}
        for stage in STAGES:
            denominator = native.stages[stage].median_ms
            if denominator > 0:
                ratios[stage] = reference.stages[stage].median_ms / denominator
        return ratios

    def to_json(self) -> dict[str, Any]:
        """Plain data (what ``--json`` writes)."""
        data = asdict(self)
        data["ratio_reference_over_native"] = self.ratio_reference_over_native()
        return data

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path


def machine_description(device: torch.device) -> str:
    """The CPU model (from /proc/cpuinfo where there is one) or the CUDA device name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def _load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
class StageTimer:
    """Collects (stage, start, end) marks of one frame and turns them into milliseconds per stage.

    A mark is ``time.perf_counter_ns()`` on the CPU and a recorded ``torch.cuda.Event`` on CUDA; nothing is
    synchronised until :meth:`frame_ms`, which waits for the frame's last event.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._open: dict[str, list[Any]] = {}
        self._spans: list[tuple[str, Any, Any]] = []

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter_ns()

    def start(self, stage: str) -> None:
        self._open.setdefault(stage, []).append(self.mark())

    def stop(self, stage: str) -> None:
        start = self._open[stage].pop()  # a stack: a module may run inside another call of itself
        self._spans.append((stage, start, self.mark()))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1e-6

    def frame_ms(self, frame_start: Any, frame_end: Any) -> tuple[float, dict[str, float]]:
        """(end-to-end ms, {stage: ms summed over its calls}) of the frame; clears the marks."""
        if self.cuda:
            frame_end.synchronize()
        per_stage: dict[str, float] = {}
        for stage, start, end in self._spans:
            per_stage[stage] = per_stage.get(stage, 0.0) + self.elapsed_ms(start, end)
        self._spans.clear()
        return self.elapsed_ms(frame_start, frame_end), per_stage


def _hooked_modules(model: BEVFormer) -> list[tuple[str, nn.Module]]:
    modules = [("backbone", model.backbone), ("neck", model.neck), ("encoder", model.encoder)]
    for layer in model.encoder.layers:
        modules.append(("temporal_self_attention", layer.temporal_attention))
        modules.append(("spatial_cross_attention", layer.spatial_attention))
    modules.append(("decoder", model.decoder))
    return modules


@contextmanager
def _instrumented(model: BEVFormer, timer: StageTimer) -> Iterator[None]:
    """Forward hooks on the stage modules and a timed ``decode`` on the instance, removed afterwards."""
    handles = []
    for stage, module in _hooked_modules(model):
        handles.append(module.register_forward_pre_hook(lambda _m, _a, stage=stage: timer.start(stage)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o, stage=stage: timer.stop(stage)))
    decode = model.decode

    def timed_decode(*args, **kwargs):
        timer.start("decode")
        try:
            return decode(*args, **kwargs)
        finally:
            timer.stop("decode")

    model.decode = timed_decode  # an instance attribute shadows the method; deleted below
    try:
        yield
    finally:
        del model.decode
        for handle in handles:
            handle.remove()


def _stage_breakdown(frame_ms: float, raw: dict[str, float]) -> dict[str, float]:
    """``STAGES`` from the hooked spans: encoder_other = encoder - TSA - SCA; other = frame - the rest."""
    stages = {stage: raw.get(stage, 0.0) for stage in ("backbone", "neck", "temporal_self_attention",
                                                       "spatial_cross_attention", "decoder", "decode")}
    stages["encoder_other"] = raw.get("encoder", 0.0) - stages["temporal_self_attention"] \
        - stages["spatial_cross_attention"]
    stages["other"] = frame_ms - sum(stages.values())
    return {stage: stages[stage] for stage in STAGES}


# ----------------------------------------------------------------------------------------------------------------
# Model preparation and the measurement
# ----------------------------------------------------------------------------------------------------------------
def prepare_model(model: BEVFormer, compile_modules: bool = False, cuda_graphs: bool = False) -> BEVFormer:
    """Optionally replace the stage modules of ``model`` by ``torch.compile`` wrappers (in place; returns it).

    Compiled: backbone, neck, every encoder layer's TSA and SCA module, the decoder. Hooks registered later on the
    wrappers run outside the compiled code. ``cuda_graphs`` compiles with ``mode='reduce-overhead'`` (CUDA graphs).
    """
    if not (compile_modules or cuda_graphs):
        return model
    mode = "reduce-overhead" if cuda_graphs else None
    model.backbone = torch.compile(model.backbone, mode=mode)
    model.neck = torch.compile(model.neck, mode=mode)
    for layer in model.encoder.layers:
        layer.temporal_attention = torch.compile(layer.temporal_attention, mode=mode)
        layer.spatial_attention = torch.compile(layer.spatial_attention, mode=mode)
    model.decoder = torch.compile(model.decoder, mode=mode)
    return model


def _visible_pairs(model: BEVFormer, inputs: dict[str, torch.Tensor]) -> int:
    from bevdeform.models.attention import find_visible_pairs

    encoder = model.encoder
    padded_hw = tuple(int(v) for v in inputs["images"].shape[-2:])
    pairs = find_visible_pairs(encoder.pillar_points_ego(inputs["ego2img"].device), inputs["ego2img"],
                               inputs["image_hw"], padded_hw)
    return int(pairs.num_pairs.sum().item())


def profile_streaming(model: BEVFormer, inputs: dict[str, torch.Tensor], iters: int = 20, warmup: int = 3,
                      msda_impls: Sequence[str] = ("auto",), precision: str = "fp32",
                      cuda_graphs: bool = False, progress: Callable[[str], None] | None = None
                      ) -> dict[str, ProfileRun]:
    """Time ``iters`` streaming frames per MSDA path after ``warmup`` frames (module docstring).

    Args:
        model: the detector on its device (eval mode is set); ``prepare_model`` first for --compile.
        inputs: one frame (``bevdeform.export.example_frame_inputs``): images, ego2img, image_hw, ego_prev2curr,
            prev_bev (unused: the cache provides it), has_prev (unused: the first warm-up frame starts the scene,
            the rest continue it).
        msda_impls: MSDA paths (``auto``, ``reference``, ``native``); with several, frames alternate between them
            (each path keeps its own BEV cache), so they share the machine's load.
        precision: ``fp32``, ``fp16`` or ``bf16`` (autocast).
        cuda_graphs: mark a CUDA-graph step at every frame (with a model prepared for CUDA graphs).
    Returns:
        ``{impl: ProfileRun}``; an ``auto`` request is reported under the path it took.
    """
    from bevdeform.export import msda_implementation
    from bevdeform.msda import native_available

    if iters < 1 or warmup < 1:
        raise ValueError(f"profile_streaming: iters={iters} and warmup={warmup} must be >= 1 (the first warm-up "
                         f"frame starts the scene; timed frames reuse its BEV)")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    images = inputs["images"]
    device = images.device
    if images.shape[0] != 1:
        raise ValueError(f"profile_streaming: batch 1 expected (what a vehicle runs), got images {tuple(images.shape)}")
    names = []
    for impl in msda_impls:
        name = impl
        if impl == "auto":
            name = "native" if native_available(device.type, images.dtype) else "reference"
        if name in names:
            raise ValueError(f"msda_impls {list(msda_impls)} name the path {name!r} twice")
        names.append(name)
    model.eval()
    autocast_dtype = PRECISIONS[precision]
    timer = StageTimer(device)
    streams = {name: StreamingBEVFormer(model, max_cached_scenes=1) for name in names}
    start_frame = torch.zeros(1, dtype=torch.bool, device=device)
    continue_frame = torch.ones(1, dtype=torch.bool, device=device)
    frame_args = (inputs["images"], inputs["ego2img"], inputs["image_hw"], inputs["ego_prev2curr"])
    samples: dict[str, tuple[list[float], dict[str, list[float]]]] = {
        name: ([], {stage: [] for stage in STAGES}) for name in names}

    def run_frame(name: str, has_prev: torch.Tensor, timed: bool) -> None:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with ExitStack() as stack:
            stack.enter_context(msda_implementation(name))
            stack.enter_context(torch.no_grad())
            if autocast_dtype is not None:
                stack.enter_context(torch.autocast(device.type, dtype=autocast_dtype))
            frame_start = timer.mark()
            streams[name].step(*frame_args, has_prev, [_SCENE], can_bus_abs=inputs.get("can_bus_abs"))
            frame_end = timer.mark()
        frame_ms, raw = timer.frame_ms(frame_start, frame_end)
        if timed:
            total, stages = samples[name]
            total.append(frame_ms)
            for stage, value in _stage_breakdown(frame_ms, raw).items():
                stages[stage].append(value)

    peak_memory: dict[str, float] = {}
    with _instrumented(model, timer):
        for frame in range(warmup):
            for name in names:
                run_frame(name, start_frame if frame == 0 else continue_frame, timed=False)
            if progress:
                progress(f"warm-up frame {frame + 1}/{warmup}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for frame in range(iters):
            for name in names:
                run_frame(name, continue_frame, timed=True)
            if progress and (frame + 1) % max(1, iters // 5) == 0:
                progress(f"timed frame {frame + 1}/{iters}")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        kind = "cuda_max_allocated"
    else:
        # ru_maxrss is in KiB on Linux (bytes on macOS).
        scale = 1.0 / 2**20 if platform.system() == "Darwin" else 1.0 / 2**10
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        kind = "process_max_rss"
    for name in names:
        peak_memory[name] = peak
    pairs = _visible_pairs(model, inputs)
    runs = {}
    for name in names:
        total, stages = samples[name]
        end_to_end = latency_stats(total)
        runs[name] = ProfileRun(msda=name, end_to_end=end_to_end,
                                stages={stage: latency_stats(values) for stage, values in stages.items()},
                                fps=1000.0 / end_to_end.median_ms, peak_memory_mb=peak_memory[name],
                                peak_memory_kind=kind, frames=iters, visible_pairs=pairs)
    return runs


def export_trace(model: BEVFormer, inputs: dict[str, torch.Tensor], path: str | os.PathLike, frames: int = 3,
                 msda_impl: str = "auto", precision: str = "fp32") -> Path:
    """Run ``frames`` streaming frames (after one scene-start frame) under ``torch.profiler`` and write a Chrome
    trace (open in chrome://tracing or Perfetto) to ``path``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from bevdeform.export import msda_implementation

    device = inputs["images"].device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    stream = StreamingBEVFormer(model.eval(), max_cached_scenes=1)
    frame_args = (inputs["images"], inputs["ego2img"], inputs["image_hw"], inputs["ego_prev2curr"])
    autocast_dtype = PRECISIONS[precision]
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with msda_implementation(msda_impl), torch.no_grad(), autocast:
        stream.step(*frame_args, torch.zeros(1, dtype=torch.bool, device=device), [_SCENE],
                    can_bus_abs=inputs.get("can_bus_abs"))
        with profile(activities=activities, record_shapes=True, profile_memory=True) as profiler:
            for frame in range(frames):
                with record_function(f"streaming_frame_{frame}"):
                    stream.step(*frame_args, torch.ones(1, dtype=torch.bool, device=device), [_SCENE],
                                can_bus_abs=inputs.get("can_bus_abs"))
    profiler.export_chrome_trace(str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------
def _header(report: ProfileReport) -> list[str]:
    load = ""
    if report.load_average_before is not None:
        load = f", load average {report.load_average_before[0]:.2f} before"
        if report.load_average_after is not None:
            load += f" / {report.load_average_after[0]:.2f} after"
    h, w = report.image_size_hw
    ph, pw = report.padded_image_hw
    options = [report.precision, f"{report.threads} threads"]
    if report.omp_wait_policy:
        options.append(f"OMP_WAIT_POLICY={report.omp_wait_policy}")
    if report.compile:
        options.append("torch.compile")
    if report.cuda_graphs:
        options.append("CUDA graphs")
    weights = report.checkpoint or "random weights"
    return [f"**{report.config}** — {report.device} ({report.device_name}), torch {report.torch_version}, "
            f"{', '.join(options)}, {report.date}{load}",
            f"batch 1, 6 cameras at {h}x{w} (padded {ph}x{pw}), streaming with a cached previous BEV, {weights}; "
            f"{report.iters} timed frames after {report.warmup} warm-up"]


def format_markdown(report: ProfileReport) -> str:
    """The report as markdown: a header line (device, date, load) and a stage table per MSDA path, or, with both
    paths, one table with both and their ratio."""
    lines = _header(report) + [""]
    ratios = report.ratio_reference_over_native()
    if ratios is not None:
        reference, native = report.runs["reference"], report.runs["native"]
        lines += ["| stage | reference median ms | native median ms | reference / native |", "|---|---:|---:|---:|"]
        for stage in STAGES:
            ratio = ratios.get(stage)
            lines.append(f"| {stage} | {reference.stages[stage].median_ms:.2f} | {native.stages[stage].median_ms:.2f} "
                         f"| {'' if ratio is None else f'{ratio:.2f}x'} |")
        lines.append(f"| **end to end** | **{reference.end_to_end.median_ms:.2f}** | "
                     f"**{native.end_to_end.median_ms:.2f}** | **{ratios['end_to_end']:.2f}x** |")
        lines += ["", f"FPS: reference {reference.fps:.2f}, native {native.fps:.2f}; p90 reference "
                      f"{reference.end_to_end.p90_ms:.2f} ms, native {native.end_to_end.p90_ms:.2f} ms; peak memory "
                      f"{native.peak_memory_mb:.0f} MB ({native.peak_memory_kind}); visible pairs "
                      f"{native.visible_pairs}"]
        return "\n".join(lines)
    for name, run in report.runs.items():
        total = run.end_to_end.median_ms
        lines += [f"MSDA: {name}", "", "| stage | median ms | p90 ms | p99 ms | share of median |",
                  "|---|---:|---:|---:|---:|"]
        for stage in STAGES:
            stats = run.stages[stage]
            lines.append(f"| {stage} | {stats.median_ms:.2f} | {stats.p90_ms:.2f} | {stats.p99_ms:.2f} | "
                         f"{100.0 * stats.median_ms / total:.1f}% |")
        e2e = run.end_to_end
        lines.append(f"| **end to end** | **{e2e.median_ms:.2f}** | **{e2e.p90_ms:.2f}** | **{e2e.p99_ms:.2f}** | "
                     f"100% |")
        lines += ["", f"FPS {run.fps:.2f} (1000 / median); peak memory {run.peak_memory_mb:.0f} MB "
                      f"({run.peak_memory_kind}); spatial cross-attention over {run.visible_pairs} visible "
                      f"(BEV cell, camera) pairs", ""]
    return "\n".join(lines).rstrip() + "\n"


def new_report(config: str, device: torch.device, precision: str, image_size_hw: Sequence[int],
               padded_image_hw: Sequence[int], iters: int, warmup: int, compile_modules: bool, cuda_graphs: bool,
               checkpoint: str | None) -> ProfileReport:
    """A :class:`ProfileReport` with the machine's description, the date and the load average filled in."""
    return ProfileReport(
        config=config, device=device.type, device_name=machine_description(device), precision=precision,
        threads=torch.get_num_threads(), image_size_hw=tuple(int(v) for v in image_size_hw),
        padded_image_hw=tuple(int(v) for v in padded_image_hw), iters=iters, warmup=warmup,
        compile=compile_modules, cuda_graphs=cuda_graphs, checkpoint=checkpoint, torch_version=torch.__version__,
        date=datetime.date.today().isoformat(), load_average_before=_load_average(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY") or None)


def finish_report(report: ProfileReport, runs: dict[str, ProfileRun]) -> ProfileReport:
    """Add the runs and the load average after them."""
    report.runs.update(runs)
    report.load_average_after = _load_average()
    return report


def run_profile(config: str, checkpoint: str | None = None, overrides: Sequence[str] = (), device: str = "cpu",
                precision: str = "fp32", threads: int | None = None, image_size_hw: Sequence[int] | None = None,
                iters: int = 20, warmup: int = 3, compile_modules: bool = False, cuda_graphs: bool = False,
                msda: str = "auto", compare_msda: bool = False, trace_path: str | os.PathLike | None = None,
                progress: Callable[[str], None] | None = None) -> ProfileReport:
    """What ``scripts/profile_latency.py`` does: build the detector (random weights without a checkpoint), make one
    frame of inputs on the real rig (``bevdeform.export.example_frame_inputs``), time it, return the report.

    Args:
        config, checkpoint, overrides: the model (``bevdeform.export.load_detector``).
        device: ``cpu`` or ``cuda`` (``cuda:N``). precision: fp32, fp16, bf16. threads: ``torch.set_num_threads``
            (a CPU budget); None leaves torch's default. image_size_hw: (H, W) before padding; default the
            config's. iters, warmup: timed and untimed frames. compile_modules, cuda_graphs: ``prepare_model``.
        msda: the MSDA path (auto, reference, native); compare_msda: time reference and native, interleaved.
        trace_path: also write a torch.profiler Chrome trace of a few frames there.
    """
    from bevdeform.export import example_frame_inputs, load_detector

    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device (torch {torch.__version__})")
    if torch_device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: expected cpu or cuda")
    if cuda_graphs and torch_device.type != "cuda":
        raise ValueError("--cuda-graphs needs --device cuda")
    if compare_msda and (compile_modules or cuda_graphs):
        raise ValueError("--compare-msda runs the two MSDA paths through one model; with --compile the first "
                         "compiled path would serve both. Compare without --compile, or run twice with --msda")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads}: expected >= 1")
        torch.set_num_threads(int(threads))
    cfg, model = load_detector(config, checkpoint, overrides)
    model = model.to(torch_device)
    inputs = example_frame_inputs(cfg, image_size_hw=image_size_hw, device=torch_device)
    height, width = (int(v) for v in (image_size_hw or cfg.data.image_size_hw))
    model = prepare_model(model, compile_modules=compile_modules, cuda_graphs=cuda_graphs)
    report = new_report(cfg.name, torch_device, precision, (height, width), tuple(inputs["images"].shape[-2:]),
                        iters, warmup, compile_modules or cuda_graphs, cuda_graphs, checkpoint)
    impls = ("reference", "native") if compare_msda else (msda,)
    runs = profile_streaming(model, inputs, iters=iters, warmup=warmup, msda_impls=impls, precision=precision,
                             cuda_graphs=cuda_graphs, progress=progress)
    finish_report(report, runs)
    if trace_path is not None:
        export_trace(model, inputs, trace_path, msda_impl=impls[-1], precision=precision)
    return report
