"""Side-by-side benchmark of the DCNv2 implementations (reference vs native) on the ResNet-101-DCN shapes.

The shapes are the 3x3 modulated deformable convs of BEVFormer small/base's ResNet-101 (caffe style, DCN in stages
3 and 4): stage 3 runs 256 -> 256 channels at stride 16, stage 4 512 -> 512 at stride 32, over the 6 camera images
(the batch). Both implementations run in the same process on the same inputs; each timing is the median over
repeats after warm-up, forward alone and forward + backward (gradients of input, offset, mask and weight). Peak
memory of a call beyond what was allocated before it: CUDA's allocator statistics on CUDA, the CPU allocator's
events (torch.profiler) on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from bevdeform import dcn
from bevdeform.msda_benchmark import median_ms  # the same timing for both ops' benchmarks


@dataclasses.dataclass(frozen=True)
class Shape:
    """One DCN conv: N images of (C, H, W) -> (C, H, W), 3x3, stride 1, padding 1, one deform group, no bias."""

    name: str
    batch: int
    channels: int
    height: int
    width: int


# ResNet-101 stage 3 / stage 4 feature maps of the configs' images (bev_small 720x1280, bev_base 928x1600 padded).
FULL_SHAPES = (
    Shape("bev_small stage 3 (6 cameras, 45x80, C 256)", 6, 256, 45, 80),
    Shape("bev_small stage 4 (6 cameras, 23x40, C 512)", 6, 512, 23, 40),
    Shape("bev_base stage 3 (6 cameras, 58x100, C 256)", 6, 256, 58, 100),
    Shape("bev_base stage 4 (6 cameras, 29x50, C 512)", 6, 512, 29, 50),
)

# Scaled for the CPU (the reference would take tens of seconds per call at 6 cameras): one camera image.
CPU_SHAPES = (
    Shape("bev_base stage 3, 1 of 6 cameras (58x100, C 256)", 1, 256, 58, 100),
    Shape("bev_base stage 4, 1 of 6 cameras (29x50, C 512)", 1, 512, 29, 50),
)


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """(input, offset, mask, weight): offsets of a few pixels, masks in (0, 1), weight scaled like a trained conv."""
    gen = torch.Generator().manual_seed(seed)
    N, C, H, W = shape.batch, shape.channels, shape.height, shape.width
    x = torch.randn(N, C, H, W, generator=gen)
    offset = 2.0 * torch.randn(N, 18, H, W, generator=gen)
    mask = torch.rand(N, 9, H, W, generator=gen)
    weight = torch.randn(C, C, 3, 3, generator=gen) / math.sqrt(9 * C)
    return [t.to(device=device, dtype=dtype) for t in (x, offset, mask, weight)]


def peak_memory_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory allocated during one call of fn beyond what was allocated before it, MiB."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    running, peak = 0, 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak / 2**20


IMPLEMENTATIONS = {"reference": dcn.modulated_deform_conv2d_reference, "native": dcn.modulated_deform_conv2d}


def bench_shape(shape: Shape, dtype: torch.dtype, device: str, warmup: int, repeats: int) -> dict:
    """Time both implementations on one shape; returns a flat dict of numbers (ms, MiB, ratios)."""
    inputs = make_inputs(shape, dtype, device)
    grad_output = torch.randn(shape.batch, shape.channels, shape.height, shape.width, device=device, dtype=dtype)
    row: dict = {"name": shape.name, "dtype": str(dtype).replace("torch.", ""), "device": device}
    outputs = {}
    for impl, fn in IMPLEMENTATIONS.items():
        x, offset, mask, weight = inputs
        leaves = [t.detach().requires_grad_() for t in inputs]

        def forward(fn=fn):
            with torch.no_grad():
                return fn(x, offset, mask, weight, None, 1, 1, 1, 1, 1)

        def forward_backward(fn=fn):
            out = fn(leaves[0], leaves[1], leaves[2], leaves[3], None, 1, 1, 1, 1, 1)
            return torch.autograd.grad(out, leaves, grad_output)

        outputs[impl] = forward()
        row[f"{impl}_fwd_ms"] = median_ms(forward, device, warmup, repeats)
        row[f"{impl}_fwdbwd_ms"] = median_ms(forward_backward, device, warmup, repeats)
        row[f"{impl}_fwd_peak_mib"] = peak_memory_mib(forward, device)
        row[f"{impl}_fwdbwd_peak_mib"] = peak_memory_mib(forward_backward, device)
    row["gemm_fwdbwd_ms"] = median_ms(gemms_of_forward_backward(shape, dtype, device), device, warmup, repeats)
    diff = (outputs["native"].double() - outputs["reference"].double()).norm().item()
    row["rel_diff"] = diff / max(outputs["reference"].double().norm().item(), 1e-30)
    row["speedup_fwd"] = row["reference_fwd_ms"] / row["native_fwd_ms"]
    row["speedup_fwdbwd"] = row["reference_fwdbwd_ms"] / row["native_fwdbwd_ms"]
    # What a sampler that cost nothing would give: both implementations run these three GEMMs.
    row["speedup_fwdbwd_bound"] = row["reference_fwdbwd_ms"] / row["gemm_fwdbwd_ms"]
    return row


def gemms_of_forward_backward(shape: Shape, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """The three GEMMs of a 3x3 conv's forward + backward on this shape, alone: out = W @ col, grad_W =
    grad_out @ col^T, grad_col = W^T @ grad_out, per image, with col (C * 9, H * W). The arithmetic floor that
    the reference and the native kernel share (both spend the rest sampling and scattering)."""
    gen = torch.Generator().manual_seed(1)
    C, L = shape.channels, shape.height * shape.width
    weight = torch.randn(C, C * 9, generator=gen).to(device=device, dtype=dtype)
    col = torch.randn(C * 9, L, generator=gen).to(device=device, dtype=dtype)
    grad_out = torch.randn(C, L, generator=gen).to(device=device, dtype=dtype)

    def run():
        for _ in range(shape.batch):
            weight @ col
            grad_out @ col.t()
            weight.t() @ grad_out

    return run


def markdown_table(rows: list[dict]) -> str:
    header = ["shape", "dtype", "ref fwd ms", "native fwd ms", "fwd x", "ref fwd+bwd ms", "native fwd+bwd ms",
              "fwd+bwd x", "3 GEMMs ms", "fwd+bwd x bound", "peak MiB ref / native fwd",
              "peak MiB ref / native fwd+bwd", "rel diff"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["name"], r["dtype"], f"{r['reference_fwd_ms']:.1f}", f"{r['native_fwd_ms']:.1f}",
                 f"{r['speedup_fwd']:.1f}", f"{r['reference_fwdbwd_ms']:.1f}", f"{r['native_fwdbwd_ms']:.1f}",
                 f"{r['speedup_fwdbwd']:.1f}", f"{r['gemm_fwdbwd_ms']:.1f}", f"{r['speedup_fwdbwd_bound']:.1f}",
                 f"{r['reference_fwd_peak_mib']:.0f} / {r['native_fwd_peak_mib']:.0f}",
                 f"{r['reference_fwdbwd_peak_mib']:.0f} / {r['native_fwdbwd_peak_mib']:.0f}", f"{r['rel_diff']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
