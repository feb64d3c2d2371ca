"""Side-by-side benchmark of the MSDA implementations (reference vs native) on the shapes of the design notes.

Both implementations run in the same process on the same inputs; each timing is the median over repeats after
warm-up, forward alone and forward + backward. On CUDA it also reports the achieved bandwidth against the
compulsory bytes (every input read once, every output written once) and the device's measured copy bandwidth,
and the peak memory of each call.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

import torch

from bevdeform import msda


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark case: B, Q, M, D, P and the (H, W) of every level."""

    name: str
    batch: int
    num_queries: int
    levels: tuple[tuple[int, int], ...]
    num_heads: int = 8
    channels: int = 32
    num_points: int = 4

    @property
    def num_values(self) -> int:
        return sum(h * w for h, w in self.levels)


# msda-op.md's table, at full size (what a GPU runs)
FULL_SHAPES = (
    Shape("BEVFormer-tiny SCA", 6, 1250, ((15, 25),), num_points=8),
    Shape("BEVFormer-tiny TSA", 2, 2500, ((50, 50),)),
    Shape("BEVFormer-base SCA", 6, 10000, ((116, 200), (58, 100), (29, 50), (15, 25)), num_points=8),
    Shape("BEVFormer-base TSA", 2, 40000, ((200, 200),)),
    Shape("decoder on BEV", 1, 900, ((200, 200),)),
    Shape("Deformable-DETR encoder", 2, 22223, ((100, 167), (50, 84), (25, 42), (13, 21))),
)

# The same cases scaled where the CPU reference would take seconds per call (the name says how).
CPU_SHAPES = (
    FULL_SHAPES[0],
    FULL_SHAPES[1],
    Shape("BEVFormer-base SCA, Q/4", 6, 2500, ((116, 200), (58, 100), (29, 50), (15, 25)), num_points=8),
    Shape("BEVFormer-base TSA, 100x100 BEV", 2, 10000, ((100, 100),)),
    FULL_SHAPES[4],
    Shape("Deformable-DETR encoder, 400x667 image", 2, 5600, ((50, 84), (25, 42), (13, 21), (7, 11))),
)


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Random inputs of the op for one shape (locations in [0, 1], weights softmax-normalised)."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor(shape.levels, dtype=torch.int64)
    sizes = levels[:, 0] * levels[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_levels = len(shape.levels)
    B, Q, M, D, P = shape.batch, shape.num_queries, shape.num_heads, shape.channels, shape.num_points
    value = torch.randn(B, shape.num_values, M, D, generator=gen)
    locations = torch.rand(B, Q, M, num_levels, P, 2, generator=gen)
    # (B, Q, M, L, P) normalised over L*P
    weights = torch.randn(B, Q, M, num_levels * P, generator=gen).softmax(-1).view(B, Q, M, num_levels, P)
    floats = [t.to(device=device, dtype=dtype) for t in (value, locations, weights)]
    return [floats[0], levels.to(device), starts.to(device), floats[1], floats[2]]


def compulsory_bytes(shape: Shape, dtype: torch.dtype, backward: bool) -> int:
    """Bytes every implementation must move at least: inputs read once, outputs written once."""
    elem = torch.empty((), dtype=dtype).element_size()
    num_samples = shape.batch * shape.num_queries * shape.num_heads * len(shape.levels) * shape.num_points
    value = shape.batch * shape.num_values * shape.num_heads * shape.channels
    out = shape.batch * shape.num_queries * shape.num_heads * shape.channels
    forward = (value + 3 * num_samples + out) * elem
    if not backward:
        return forward
    # backward reads value, locations, weights, grad_out and writes grad_value, grad_locations, grad_weights
    return forward + (2 * value + 6 * num_samples + out) * elem


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    """Median wall time of fn in milliseconds, device work included (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn: Callable[[], object], device: str) -> float:
    """Peak device memory allocated during one call beyond what was allocated before it (CUDA only)."""
    if device != "cuda":
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth_gbs(device: str) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), GB/s; CUDA only."""
    if device != "cuda":
        return math.nan
    src = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


IMPLEMENTATIONS = {"reference": msda.ms_deform_attn_reference, "native": msda.ms_deform_attn}


def bench_shape(shape: Shape, dtype: torch.dtype, device: str, warmup: int, repeats: int) -> dict:
    """Time both implementations on one shape; returns a flat dict of numbers (ms, MiB, GB/s, ratios)."""
    inputs = make_inputs(shape, dtype, device)
    grad_output = torch.randn(
        shape.batch, shape.num_queries, shape.num_heads * shape.channels, device=device, dtype=dtype
    )
    row: dict = {"name": shape.name, "dtype": str(dtype).replace("torch.", ""), "device": device}
    outputs = {}
    for impl, fn in IMPLEMENTATIONS.items():
        value, shapes, starts, locations, weights = inputs
        grad_inputs = [t.detach().requires_grad_() for t in (value, locations, weights)]

        def forward(fn=fn):
            with torch.no_grad():
                return fn(value, shapes, starts, locations, weights)

        def forward_backward(fn=fn):
            out = fn(grad_inputs[0], shapes, starts, grad_inputs[1], grad_inputs[2])
            return torch.autograd.grad(out, grad_inputs, grad_output)

        outputs[impl] = forward()
        row[f"{impl}_fwd_ms"] = median_ms(forward, device, warmup, repeats)
        row[f"{impl}_fwdbwd_ms"] = median_ms(forward_backward, device, warmup, repeats)
        row[f"{impl}_fwd_peak_mib"] = peak_memory_mib(forward, device)
        row[f"{impl}_fwdbwd_peak_mib"] = peak_memory_mib(forward_backward, device)
    diff = (outputs["native"].double() - outputs["reference"].double()).abs().max().item()
    scale = outputs["reference"].double().abs().max().item()
    row["max_rel_diff"] = diff / max(scale, 1e-30)
    row["speedup_fwd"] = row["reference_fwd_ms"] / row["native_fwd_ms"]
    row["speedup_fwdbwd"] = row["reference_fwdbwd_ms"] / row["native_fwdbwd_ms"]
    row["compulsory_fwd_mb"] = compulsory_bytes(shape, dtype, backward=False) / 1e6
    row["compulsory_fwdbwd_mb"] = compulsory_bytes(shape, dtype, backward=True) / 1e6
    row["native_fwd_gbs"] = row["compulsory_fwd_mb"] / row["native_fwd_ms"]  # MB/ms = GB/s
    row["native_fwdbwd_gbs"] = row["compulsory_fwdbwd_mb"] / row["native_fwdbwd_ms"]
    return row


def markdown_table(rows: list[dict], copy_gbs: float) -> str:
    """Rows of bench_shape as a markdown table (bandwidth columns only when measured)."""
    with_bw = not math.isnan(copy_gbs)
    header = ["shape", "dtype", "ref fwd ms", "native fwd ms", "fwd x", "ref fwd+bwd ms", "native fwd+bwd ms",
              "fwd+bwd x", "max rel diff"]
    if with_bw:
        header += ["native fwd GB/s (% copy)", "native fwd+bwd GB/s (% copy)", "peak MiB ref/native fwd+bwd"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["name"], r["dtype"], f"{r['reference_fwd_ms']:.3f}", f"{r['native_fwd_ms']:.3f}",
                 f"{r['speedup_fwd']:.1f}", f"{r['reference_fwdbwd_ms']:.3f}", f"{r['native_fwdbwd_ms']:.3f}",
                 f"{r['speedup_fwdbwd']:.1f}", f"{r['max_rel_diff']:.1e}"]
        if with_bw:
            cells += [
                f"{r['native_fwd_gbs']:.0f} ({100 * r['native_fwd_gbs'] / copy_gbs:.0f}%)",
                f"{r['native_fwdbwd_gbs']:.0f} ({100 * r['native_fwdbwd_gbs'] / copy_gbs:.0f}%)",
                f"{r['reference_fwdbwd_peak_mib']:.0f} / {r['native_fwdbwd_peak_mib']:.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
