"""The modulated deformable convolution (DCNv2) op: reference vs brute force and conv2d, native vs reference, module.

Implementations are compared on fresh random inputs drawn by hypothesis: kernels 1x1, 3x3 and 1x3, strides 1-2,
padding, dilation 1-2, conv groups and deform groups > 1, offsets that push samples off the map, offsets on the
half-pixel lattice (samples exactly on pixel centres, where gradients are one-sided, and on the borders -1 and H
of the support), NaN / inf / huge offsets, and non-contiguous inputs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bevdeform import dcn

CUDA_REASON = "no CUDA device on this machine: the CUDA kernel is only compile-checked (test_dcn_cuda_compile.py)"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason=CUDA_REASON)])]


def native_or_skip(device: str, dtype: torch.dtype) -> None:
    if not dcn.native_available(device, dtype):
        from bevdeform import msda

        pytest.skip(f"native DCN kernel not available for {device}/{dtype}: {msda._native_problem}")


def make_inputs(n, c, h, w, c_out, kernel, stride, padding, dilation, groups, deform_groups, dtype=torch.float64,
                generator=None, offset_scale=2.0, lattice=False, bias=True):
    """Random (input, offset, mask, weight, bias) and the conv arguments; offsets in pixels."""
    kh, kw = kernel
    ho, wo = dcn.output_size(h, w, kernel, stride, padding, dilation)
    x = torch.randn(n, c, h, w, dtype=dtype, generator=generator)
    weight = torch.randn(c_out, c // groups, kh, kw, dtype=dtype, generator=generator)
    b = torch.randn(c_out, dtype=dtype, generator=generator) if bias else None
    offset = offset_scale * torch.randn(n, 2 * deform_groups * kh * kw, ho, wo, dtype=dtype, generator=generator)
    if lattice:
        # Half-pixel lattice: samples exactly on pixel centres (one-sided gradients) and on the support's edge.
        offset = torch.round(2 * offset) / 2
    mask = torch.rand(n, deform_groups * kh * kw, ho, wo, dtype=dtype, generator=generator)
    return [x, offset, mask, weight, b], (stride, padding, dilation, groups, deform_groups)


def run_with_grads(fn, tensors, conv_args, grad_output=None, device="cpu"):
    leaves = [None if t is None else t.detach().clone().to(device).requires_grad_() for t in tensors]
    out = fn(*leaves, *conv_args)
    if grad_output is None:
        grad_output = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(11))
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_output.to(device))
    return out, grads


def assert_close(actual, expected, dtype, what):
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol, equal_nan=True,
                               msg=what)


# --- the reference itself ------------------------------------------------------------------------------------------


def brute_force(x, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups):
    """mmcv's formula, one output element at a time with Python floats."""
    n_, c_, h_, w_ = x.shape
    c_out, cg, kh, kw = weight.shape
    _, _, ho_, wo_ = offset.shape
    cd = c_ // deform_groups
    out = torch.zeros(n_, c_out, ho_, wo_, dtype=torch.float64)
    xs = x.tolist()

    def pixel(n, c, yy, xx):
        return xs[n][c][yy][xx] if 0 <= yy < h_ and 0 <= xx < w_ else 0.0

    for n in range(n_):
        for o in range(c_out):
            grp = o // (c_out // groups)
            for ho in range(ho_):
                for wo in range(wo_):
                    total = 0.0 if bias is None else bias[o].item()
                    for ci in range(cg):
                        c = grp * cg + ci
                        g = c // cd
                        for i in range(kh):
                            for j in range(kw):
                                k = i * kw + j
                                dy = offset[n, g * 2 * kh * kw + 2 * k, ho, wo].item()
                                dx = offset[n, g * 2 * kh * kw + 2 * k + 1, ho, wo].item()
                                y = ho * stride[0] - padding[0] + i * dilation[0] + dy
                                xx_ = wo * stride[1] - padding[1] + j * dilation[1] + dx
                                if not (-1 < y < h_ and -1 < xx_ < w_):
                                    continue
                                y0, x0 = math.floor(y), math.floor(xx_)
                                value = 0.0
                                for yy in (y0, y0 + 1):
                                    for xc in (x0, x0 + 1):
                                        value += (1 - abs(y - yy)) * (1 - abs(xx_ - xc)) * pixel(n, c, yy, xc)
                                total += weight[o, ci, i, j].item() * mask[n, g * kh * kw + k, ho, wo].item() * value
                    out[n, o, ho, wo] = total
    return out


def test_reference_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    tensors, conv = make_inputs(2, 4, 5, 6, 4, (3, 3), (2, 1), (1, 2), (1, 2), 2, 2, generator=gen)
    tensors[1][0, 0, 0, 0] = float("nan")  # a non-finite offset: that sample contributes nothing
    tensors[1][1, 5, 1, 1] = 1e30
    out = dcn.modulated_deform_conv2d_reference(*tensors, *conv)
    torch.testing.assert_close(out, brute_force(*tensors, *conv))
    # the 1x3 kernel, no bias, one group
    tensors, conv = make_inputs(1, 3, 4, 5, 2, (1, 3), (1, 2), (0, 1), (1, 1), 1, 3, generator=gen, bias=False)
    torch.testing.assert_close(dcn.modulated_deform_conv2d_reference(*tensors, *conv), brute_force(*tensors, *conv))


CONV_CASES = [
    ((3, 3), (1, 1), (1, 1), (1, 1), 1, 1),
    ((3, 3), (2, 2), (1, 1), (1, 1), 1, 1),
    ((3, 3), (1, 2), (2, 1), (2, 1), 2, 2),
    ((1, 1), (2, 2), (0, 0), (1, 1), 2, 4),
    ((1, 3), (1, 1), (0, 1), (1, 2), 1, 2),
]


@pytest.mark.parametrize("impl", ["reference", "native"])
@pytest.mark.parametrize("kernel, stride, padding, dilation, groups, deform_groups", CONV_CASES)
def test_zero_offset_and_unit_mask_equal_conv2d(impl, kernel, stride, padding, dilation, groups, deform_groups):
    if impl == "native":
        native_or_skip("cpu", torch.float64)
    fn = dcn.modulated_deform_conv2d_reference if impl == "reference" else dcn.modulated_deform_conv2d
    gen = torch.Generator().manual_seed(1)
    (x, offset, mask, weight, bias), conv = make_inputs(2, 8, 7, 9, 6, kernel, stride, padding, dilation, groups,
                                                        deform_groups, generator=gen)
    out = fn(x, torch.zeros_like(offset), torch.ones_like(mask), weight, bias, *conv)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, stride, padding, dilation, groups))


@pytest.mark.parametrize("impl", ["reference", "native"])
def test_offset_channel_order_is_dy_then_dx(impl):
    """Offset channel 2k moves kernel point k down the rows, channel 2k + 1 along the columns (mmcv's order)."""
    if impl == "native":
        native_or_skip("cpu", torch.float64)
    fn = dcn.modulated_deform_conv2d_reference if impl == "reference" else dcn.modulated_deform_conv2d
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    weight = torch.randn(3, 2, 1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, 5, 6, dtype=torch.float64)
    dy_one = torch.zeros(1, 2, 5, 6, dtype=torch.float64)
    dy_one[:, 0] = 1.0
    shifted_rows = F.pad(x[:, :, 1:], (0, 0, 0, 1))  # sample (y + 1, x), zero past the last row
    torch.testing.assert_close(fn(x, dy_one, mask, weight, None), F.conv2d(shifted_rows, weight))
    dx_one = dy_one.flip(1)
    shifted_cols = F.pad(x[:, :, :, 1:], (0, 1))
    torch.testing.assert_close(fn(x, dx_one, mask, weight, None), F.conv2d(shifted_cols, weight))


# --- native vs reference -------------------------------------------------------------------------------------------


conv_config = st.tuples(
    st.sampled_from([(1, 1), (3, 3), (1, 3)]),  # kernel
    st.tuples(st.integers(1, 2), st.integers(1, 2)),  # stride
    st.tuples(st.integers(0, 2), st.integers(0, 2)),  # padding
    st.tuples(st.integers(1, 2), st.integers(1, 2)),  # dilation
    st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)]),  # (groups, deform_groups)
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config=conv_config,
    batch=st.integers(1, 2),
    size=st.tuples(st.integers(1, 7), st.integers(1, 8)),
    channels_per_group=st.sampled_from([1, 3]),
    offset_scale=st.sampled_from([0.5, 3.0, 20.0]),
    lattice=st.booleans(),
    poison=st.sampled_from([None, float("nan"), float("inf"), -1e30]),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_native_equals_reference_random(config, batch, size, channels_per_group, offset_scale, lattice, poison, bias,
                                        seed):
    native_or_skip("cpu", torch.float64)
    kernel, stride, padding, dilation, (groups, deform_groups) = config
    h, w = size
    ho, wo = dcn.output_size(h, w, kernel, stride, padding, dilation)
    if ho < 1 or wo < 1:
        return  # too small for this kernel: the ValueError is tested below
    channels = 4 * channels_per_group  # divisible by every groups / deform_groups drawn
    gen = torch.Generator().manual_seed(seed)
    tensors, conv = make_inputs(batch, channels, h, w, 2 * groups, kernel, stride, padding, dilation, groups,
                                deform_groups, generator=gen, offset_scale=offset_scale, lattice=lattice, bias=bias)
    if poison is not None:
        flat = tensors[1].view(-1)
        flat[torch.randint(0, flat.numel(), (2,), generator=gen)] = poison
    ref_out, ref_grads = run_with_grads(dcn.modulated_deform_conv2d_reference, tensors, conv)
    out, grads = run_with_grads(dcn.modulated_deform_conv2d, tensors, conv)
    assert not out.isnan().any()
    assert_close(out, ref_out, torch.float64, "forward")
    for name, got, want in zip(("input", "offset", "mask", "weight", "bias"), grads, ref_grads):
        assert_close(got, want, torch.float64, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
def test_non_finite_and_huge_offsets_contribute_nothing(device, bad):
    """Such a sample adds 0 and gets zero gradient; nothing is read or written out of bounds."""
    native_or_skip(device, torch.float32)
    gen = torch.Generator().manual_seed(2)
    tensors, conv = make_inputs(2, 4, 6, 7, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, dtype=torch.float32,
                                generator=gen)
    tensors[1][0, 4, 2, 3] = bad  # dy of kernel point 2, deform group 0
    tensors[1][1, 18 + 7, 0, 0] = bad  # dx of kernel point 3, deform group 1
    ref_out, ref_grads = run_with_grads(dcn.modulated_deform_conv2d_reference, tensors, conv)
    out, grads = run_with_grads(dcn.modulated_deform_conv2d, tensors, conv, device=device)
    assert out.isfinite().all()
    assert_close(out, ref_out, torch.float32, "forward")
    for got, want in zip(grads, ref_grads):
        assert got.isfinite().all()
        assert_close(got, want, torch.float32, "backward")
    assert grads[1][0, 4, 2, 3] == 0 and grads[2][0, 2, 2, 3] == 0  # grad offset, grad mask of that sample


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    native_or_skip(device, torch.float32)
    gen = torch.Generator().manual_seed(3)
    tensors, conv = make_inputs(2, 6, 8, 9, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2, 3, dtype=torch.float32,
                                generator=gen)
    strided = [t.transpose(2, 3).contiguous().transpose(2, 3) if t.dim() == 4 else t for t in tensors[:4]]
    strided[3] = tensors[3].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert not any(t.is_contiguous() for t in strided)
    strided = [t.to(device) for t in strided] + [tensors[4].to(device)]
    ref_out, ref_grads = run_with_grads(dcn.modulated_deform_conv2d_reference, tensors, conv)
    out, grads = run_with_grads(dcn.modulated_deform_conv2d, strided, conv, device=device)
    assert_close(out, ref_out, torch.float32, "forward")
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, torch.float32, "backward")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_dtypes_at_resnet_shape(device, dtype):
    """A ResNet-DCN 3x3 conv (C = 64 here), reduced precision against the float64 reference, forward and backward."""
    native_or_skip(device, dtype)
    gen = torch.Generator().manual_seed(4)
    tensors, conv = make_inputs(2, 64, 12, 14, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, generator=gen,
                                offset_scale=1.5, bias=False)
    tensors[0] = tensors[0] * 0.5
    tensors[3] = tensors[3] / 24.0  # ~unit-variance outputs, so one tolerance serves
    grad_output = torch.randn(2, 64, 12, 14, dtype=torch.float64, generator=gen)
    ref_out, ref_grads = run_with_grads(dcn.modulated_deform_conv2d_reference, tensors, conv, grad_output)
    low = [None if t is None else t.to(dtype) for t in tensors]
    out, grads = run_with_grads(dcn.modulated_deform_conv2d, low, conv, grad_output.to(dtype), device=device)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for got, want, name in zip((out, *grads), (ref_out, *ref_grads), ("out", "input", "offset", "mask", "weight")):
        scale = want.abs().max().item()
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= tol * max(scale, 1.0), f"{name}: max error {err} vs scale {scale} ({dtype})"


@pytest.mark.parametrize("stride, groups, deform_groups", [((1, 1), 1, 1), ((2, 1), 2, 4)])
def test_cpu_kernel_across_column_chunks(stride, groups, deform_groups):
    """Wide layers are processed in chunks of output pixels (~4 MiB of columns each): at 256 channels and 2 threads
    a chunk is 256 pixels, so these maps (720 / 400 output pixels) span 3 / 2 chunks, the last one partial. Native
    equals the reference (float64, forward and every gradient) and the backward's peak memory stays below one
    image's columns."""
    native_or_skip("cpu", torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(21)
        tensors, conv = make_inputs(2, 256, 24 * stride[0], 30, 8, (3, 3), stride, (1, 1), (1, 1), groups,
                                    deform_groups, generator=gen, offset_scale=3.0)
        ho, wo = tensors[1].shape[-2:]
        assert ho * wo > 256 * 2 - 128 and (ho * wo) % 256 != 0  # at least two chunks, the last one partial
        ref_out, ref_grads = run_with_grads(dcn.modulated_deform_conv2d_reference, tensors, conv)
        out, grads = run_with_grads(dcn.modulated_deform_conv2d, tensors, conv)
        assert_close(out, ref_out, torch.float64, "forward")
        for name, got, want in zip(("input", "offset", "mask", "weight", "bias"), grads, ref_grads):
            assert_close(got, want, torch.float64, f"grad {name}")

        from torch.profiler import ProfilerActivity, profile

        x, offset, mask, weight, bias = tensors
        grad_output = torch.randn(out.shape, dtype=out.dtype, generator=gen)
        stride_, padding, dilation, groups_, deform_groups_ = conv
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            grads = torch.ops.bevdeform.modulated_deform_conv2d_backward(
                x, offset, mask, weight, bias, grad_output, list(stride_), list(padding), list(dilation), groups_,
                deform_groups_)
        running, peak = 0, 0
        for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                            key=lambda e: e.start_ns()):
            running += event.nbytes()
            peak = max(peak, running)
        gradient_bytes = sum(g.numel() * g.element_size() for g in grads)
        image_column_bytes = 256 * 9 * ho * wo * 8
        assert gradient_bytes < peak < gradient_bytes + image_column_bytes, (peak, gradient_bytes)
    finally:
        torch.set_num_threads(threads)


def test_gradcheck_cpu_kernel_float64():
    native_or_skip("cpu", torch.float64)
    gen = torch.Generator().manual_seed(5)
    tensors, conv = make_inputs(1, 4, 4, 5, 4, (3, 3), (1, 2), (1, 1), (2, 1), 2, 2, generator=gen,
                                offset_scale=0.7)
    leaves = [t.requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(lambda *a: dcn.modulated_deform_conv2d(*a, *conv), leaves, eps=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_registered_op(bias):
    native_or_skip("cpu", torch.float32)
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.float64):
        tensors, (stride, padding, dilation, groups, deform_groups) = make_inputs(
            2, 4, 5, 6, 4, (3, 3), (2, 1), (1, 1), (1, 1), 2, 2, dtype=dtype, generator=gen, bias=bias)
        for t in tensors:
            if t is not None:
                t.requires_grad_()
        torch.library.opcheck(torch.ops.bevdeform.modulated_deform_conv2d.default,
                              (*tensors, [*stride], [*padding], [*dilation], groups, deform_groups))


def test_torch_compile_fullgraph_and_export_see_one_node():
    native_or_skip("cpu", torch.float32)
    torch.manual_seed(7)
    module = dcn.ModulatedDeformConv2d(4, 6, 3, padding=1, deform_groups=2)
    torch.nn.init.normal_(module.conv_offset.weight, std=0.3)
    x = torch.randn(2, 4, 7, 8)
    expected = module(x)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected)
    exported = torch.export.export(module, (x,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count("bevdeform.modulated_deform_conv2d.default") == 1, targets
    torch.testing.assert_close(exported.module()(x), expected)


def test_onnx_export_as_deform_conv_runs_in_onnxruntime(tmp_path):
    """The native op exports as ONNX DeformConv (opset 19) and onnxruntime computes the reference's numbers."""
    native_or_skip("cpu", torch.float32)
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(8)
    for bias in (True, False):
        module = dcn.ModulatedDeformConv2d(4, 6, 3, stride=(1, 2), padding=1, dilation=(2, 1), groups=2,
                                           deform_groups=2, bias=bias).eval()
        torch.nn.init.normal_(module.conv_offset.weight, std=0.5)
        x = torch.randn(1, 4, 9, 10)
        dcn.register_onnx_symbolic()
        path = tmp_path / f"dcn_{bias}.onnx"
        with torch.no_grad():
            torch.onnx.export(module, (x,), str(path), opset_version=dcn.ONNX_OPSET, dynamo=False,
                              input_names=["x"], output_names=["y"])
        graph = onnx.load(str(path)).graph
        assert [n.op_type for n in graph.node].count("DeformConv") == 1
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            offset, mask = module.offset_and_mask(x)
            want = dcn.modulated_deform_conv2d_reference(x, offset, mask, module.weight, module.bias, module.stride,
                                                         module.padding, module.dilation, 2, 2)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


# --- bad input -----------------------------------------------------------------------------------------------------


def _valid():
    tensors, conv = make_inputs(2, 4, 5, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, 2, dtype=torch.float32)
    return tensors + list(conv)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "input must be (N, C, H, W)"),
        (lambda a: a.__setitem__(3, a[3][0]), "weight must be (C_out, C / groups, kh, kw)"),
        (lambda a: a.__setitem__(3, torch.randn(6, 4, 3, 3)),
         "weight must be (C_out, C / groups, kh, kw) = (6, 2, 3, 3)"),
        (lambda a: a.__setitem__(1, a[1][:, :-1]),
         "offset must be (N, 2 * deform_groups * kh * kw, Ho, Wo) = (2, 36, 5, 6)"),
        (lambda a: a.__setitem__(2, a[2][:, :9]), "mask must be (N, deform_groups * kh * kw, Ho, Wo) = (2, 18, 5, 6)"),
        (lambda a: a.__setitem__(9, 3), "deform_groups=3 must divide input channels C=4"),
        (lambda a: a.__setitem__(8, 3), "groups=3 must divide input channels C=4"),
        (lambda a: a.__setitem__(4, torch.randn(5)), "bias must be (C_out,) = (6,)"),
        (lambda a: a.__setitem__(0, a[0].double()), "offset must have input's dtype torch.float64"),
        (lambda a: a.__setitem__(0, a[0].long()), "input must be a floating-point tensor"),
        (lambda a: a.__setitem__(2, a[2].to("meta")), "mask is on meta"),
        (lambda a: a.__setitem__(5, 0), "stride must be >= 1"),
        (lambda a: a.__setitem__(6, (1, 1, 1)), "padding must be an int or a pair"),
        (lambda a: a.__setitem__(7, -1), "dilation must be >= 1"),
        (lambda a: (a.__setitem__(0, a[0][:, :, :1, :1]), a.__setitem__(6, 0)), "is too small for kernel (3, 3)"),
    ],
)
def test_bad_input_names_the_argument(mutate, message):
    args = _valid()
    mutate(args)
    with pytest.raises(ValueError) as error:
        dcn.modulated_deform_conv2d(*args)
    assert message in str(error.value)


# --- implementation switch and fallback ----------------------------------------------------------------------------

_SUBPROCESS_CODE = (
    "import warnings, torch, bevdeform.dcn as d, bevdeform.msda as m\n"
    "a = [torch.rand(1, 2, 4, 5), torch.rand(1, 18, 4, 5), torch.rand(1, 9, 4, 5), torch.rand(3, 2, 3, 3), None,"
    " 1, 1, 1, 1, 1]\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "    warnings.simplefilter('always')\n"
    "    out = d.modulated_deform_conv2d(*a); d.modulated_deform_conv2d(*a)\n"
    "torch.testing.assert_close(out, d.modulated_deform_conv2d_reference(*a))\n"
    "msgs = [str(w.message) for w in caught if 'bevdeform' in str(w.message)]\n"
    "print('state', m._native_state, 'warnings', len(msgs), msgs)\n"
)


def _run_subprocess(env):
    return subprocess.run([sys.executable, "-c", _SUBPROCESS_CODE], env=env, capture_output=True, text=True,
                          timeout=180)


def test_env_var_forces_the_reference_path(monkeypatch):
    """BEVDEFORM_DCN_IMPL=reference never touches the native library (fresh process); a bad value is an error."""
    env = dict(os.environ, BEVDEFORM_DCN_IMPL="reference")
    result = _run_subprocess(env)
    assert result.returncode == 0, result.stderr
    assert "state None warnings 0" in result.stdout
    monkeypatch.setenv(dcn.IMPL_ENV, "bogus")
    with pytest.raises(ValueError, match="BEVDEFORM_DCN_IMPL='bogus': expected one of auto, reference, native"):
        dcn.modulated_deform_conv2d(*_valid())


def test_native_forced_where_it_cannot_serve_is_an_error(monkeypatch):
    monkeypatch.setenv(dcn.IMPL_ENV, "native")
    with pytest.raises(RuntimeError, match="BEVDEFORM_DCN_IMPL=native but the native DCN kernel cannot serve cpu/"
                                           "torch.float16"):
        dcn.modulated_deform_conv2d(*[t.half() if isinstance(t, torch.Tensor) else t for t in _valid()])


def test_failed_build_warns_once_and_falls_back(tmp_path):
    """With no C++ compiler the reference serves after one warning (fresh process, empty cache)."""
    env = dict(os.environ, CXX="definitely-not-a-compiler", BEVDEFORM_CACHE_DIR=str(tmp_path))
    env.pop(dcn.IMPL_ENV, None)
    result = _run_subprocess(env)
    assert result.returncode == 0, result.stderr
    assert "warnings 1" in result.stdout and "no C++ compiler" in result.stdout, result.stdout


# --- memory --------------------------------------------------------------------------------------------------------


def test_cpu_backward_allocates_only_gradients_and_one_column_buffer():
    """Peak memory of the native backward = its five gradients + one (C * kh * kw, Ho * Wo) buffer, nothing more."""
    native_or_skip("cpu", torch.float32)
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(9)
    (x, offset, mask, weight, bias), conv = make_inputs(3, 32, 20, 24, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1,
                                                        dtype=torch.float32, generator=gen)
    stride, padding, dilation, groups, deform_groups = conv
    grad_output = torch.randn(3, 32, 20, 24, generator=gen)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grads = torch.ops.bevdeform.modulated_deform_conv2d_backward(
            x, offset, mask, weight, bias, grad_output, list(stride), list(padding), list(dilation), groups,
            deform_groups)
    gradient_bytes = sum(g.numel() * g.element_size() for g in grads)
    column_bytes = 32 * 9 * 20 * 24 * 4  # C * K * L of one image
    # Every allocation and free of the CPU allocator, in time order (kineto's raw events: FunctionEvents fold the
    # ones inside an op into its net usage); the running total's maximum is the op's peak.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running, peak = 0, 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    assert peak == gradient_bytes + column_bytes, (peak, gradient_bytes, column_bytes)
    assert running == gradient_bytes  # the column buffer was freed


# --- module --------------------------------------------------------------------------------------------------------


def test_module_starts_as_half_a_plain_convolution_and_keeps_mmcv_keys():
    torch.manual_seed(10)
    module = dcn.ModulatedDeformConv2d(8, 16, 3, stride=2, padding=1, bias=False)
    assert set(module.state_dict()) == {"weight", "conv_offset.weight", "conv_offset.bias"}
    assert module.conv_offset.weight.shape == (27, 8, 3, 3) and module.conv_offset.out_channels == 27
    assert module.conv_offset.stride == (2, 2) and module.conv_offset.padding == (1, 1)
    with_bias = dcn.ModulatedDeformConv2d(8, 16, 3, padding=1, deform_groups=2)
    assert set(with_bias.state_dict()) == {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}
    assert with_bias.conv_offset.out_channels == 3 * 2 * 9
    x = torch.randn(2, 8, 9, 11)
    # Zero offsets and sigmoid(0) = 0.5 masks: half the plain convolution, as mmcv's ModulatedDeformConv2dPack.
    torch.testing.assert_close(module(x), 0.5 * F.conv2d(x, module.weight, None, 2, 1), rtol=1e-5, atol=1e-5)


def test_module_chunks_conv_offset_like_mmcv():
    """conv_offset's 3 * G * K channels are (o1, o2, mask logits): offset = cat(o1, o2), mask = sigmoid(logits)."""
    torch.manual_seed(11)
    module = dcn.ModulatedDeformConv2d(4, 4, 3, padding=1, deform_groups=2).double()
    torch.nn.init.normal_(module.conv_offset.weight, std=0.2)
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64)
    raw = F.conv2d(x, module.conv_offset.weight, module.conv_offset.bias, 1, 1)  # (1, 54, 6, 7)
    offset = raw[:, :36]  # o1 = channels 0..17, o2 = 18..35, concatenated in that order
    mask = torch.sigmoid(raw[:, 36:])
    want = dcn.modulated_deform_conv2d_reference(x, offset, mask, module.weight, module.bias, 1, 1, 1, 1, 2)
    torch.testing.assert_close(module(x), want)
    got_offset, got_mask = module.offset_and_mask(x)
    torch.testing.assert_close(got_offset, offset)
    torch.testing.assert_close(got_mask, mask)


# --- CUDA ----------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("config", CONV_CASES)
def test_cuda_float64_equals_reference(config):
    native_or_skip("cuda", torch.float64)
    kernel, stride, padding, dilation, groups, deform_groups = config
    gen = torch.Generator().manual_seed(12)
    tensors, conv = make_inputs(2, 8, 9, 10, 4, kernel, stride, padding, dilation, groups, deform_groups,
                                generator=gen, lattice=True)
    ref_out, ref_grads = run_with_grads(dcn.modulated_deform_conv2d_reference, tensors, conv)
    out, grads = run_with_grads(dcn.modulated_deform_conv2d, tensors, conv, device="cuda")
    assert_close(out, ref_out, torch.float64, "forward")
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, torch.float64, "backward")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_cuda_float32_matches_reference_to_1e4_relative():
    """The floor's accuracy clause on a stage-3-like shape: CUDA float32 vs the float32 reference, 1e-4 relative."""
    native_or_skip("cuda", torch.float32)
    gen = torch.Generator().manual_seed(13)
    tensors, conv = make_inputs(2, 256, 29, 50, 256, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, dtype=torch.float32,
                                generator=gen, bias=False)
    tensors = [None if t is None else t.cuda() for t in tensors]
    ref_out, ref_grads = run_with_grads(dcn.modulated_deform_conv2d_reference, tensors, conv, device="cuda")
    out, grads = run_with_grads(dcn.modulated_deform_conv2d, tensors, conv, device="cuda")
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        rel = (got - want).norm() / want.norm()
        assert rel <= 1e-4, rel


# --- ResNet-101-DCN (caffe style) of BEVFormer small/base ----------------------------------------------------------

R101_BLOCKS = (3, 4, 23, 3)
TORCHVISION_R101_PARAMS_WITHOUT_FC = 44_549_160 - (2048 * 1000 + 1000)


def mmdet_r101_dcn_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of mmdet's ResNet-101 with DCNv2 in stages 3-4, written from the architecture."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{suffix}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    in_c = 64
    for stage, blocks in enumerate(R101_BLOCKS):
        width = 64 * 2**stage
        for b in range(blocks):
            p = f"layer{stage + 1}.{b}"
            shapes[f"{p}.conv1.weight"] = (width, in_c if b == 0 else 4 * width, 1, 1)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            if stage >= 2:  # DCNv2: conv_offset predicts 3 * 1 deform group * 9 channels, with a bias
                shapes[f"{p}.conv2.conv_offset.weight"] = (27, width, 3, 3)
                shapes[f"{p}.conv2.conv_offset.bias"] = (27,)
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv3.weight"] = (4 * width, width, 1, 1)
            bn(f"{p}.bn3", 4 * width)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * width, in_c, 1, 1)
                bn(f"{p}.downsample.1", 4 * width)
        in_c = 4 * width
    return shapes


def test_resnet101_dcn_keys_shapes_and_parameter_count():
    from bevdeform.models.backbone import ResNet

    with torch.device("meta"):
        model = ResNet(101, out_indices=(1, 2, 3), style="caffe", dcn_stages=(False, False, True, True))
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == mmdet_r101_dcn_shapes()
    offset_params = 23 * (27 * 256 * 9 + 27) + 3 * (27 * 512 * 9 + 27)  # 1,804,734
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_R101_PARAMS_WITHOUT_FC + offset_params
    assert isinstance(model.layer3[0].conv2, dcn.ModulatedDeformConv2d) and model.layer3[0].conv2.bias is None
    assert not isinstance(model.layer2[0].conv2, dcn.ModulatedDeformConv2d)
    # caffe style: the stage stride sits on the first 1x1 conv; the DCN 3x3 conv has stride 1
    assert model.layer3[0].conv1.stride == (2, 2) and model.layer3[0].conv2.stride == (1, 1)


def test_caffe_style_moves_the_stride_and_dcn_starts_from_zero_offsets():
    from bevdeform.models.backbone import ResNet

    torch.manual_seed(12)
    pytorch_style = ResNet(50, out_indices=(1, 3)).eval()
    caffe = ResNet(50, out_indices=(1, 3), style="caffe").eval()
    caffe.load_state_dict(pytorch_style.state_dict())  # same keys and shapes
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert pytorch_style.layer2[0].conv1.stride == (1, 1) and pytorch_style.layer2[0].conv2.stride == (2, 2)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = pytorch_style(x), caffe(x)
    assert [t.shape for t in a] == [t.shape for t in b]
    assert not torch.allclose(a[0], b[0])
    # A DCN block with zero offsets is its plain block with the 3x3 conv's output halved (mask = sigmoid(0)).
    block = ResNet(50, style="caffe", dcn_stages=(False, False, True, True)).layer3[1].eval()
    assert torch.count_nonzero(block.conv2.conv_offset.weight) == 0
    feat = torch.randn(1, 1024, 6, 7)
    with torch.no_grad():
        half_conv = 0.5 * F.conv2d(block.relu(block.bn1(block.conv1(feat))), block.conv2.weight, None, 1, 1)
        torch.testing.assert_close(block.conv2(block.relu(block.bn1(block.conv1(feat)))), half_conv, rtol=1e-4,
                                   atol=1e-4)


def test_resnet_style_and_dcn_argument_errors():
    from bevdeform.models.backbone import ResNet

    with pytest.raises(ValueError, match="style='tf'"):
        ResNet(18, style="tf")
    with pytest.raises(ValueError, match="dcn_stages=.*four booleans"):
        ResNet(50, dcn_stages=(True, True))
    with pytest.raises(ValueError, match="needs a Bottleneck depth"):
        ResNet(18, dcn_stages=(False, False, True, True))


def test_load_fcos3d_r101_dcn_mmdet_checkpoint(tmp_path):
    """An mmcv checkpoint with the official key names and shapes loads through pretrained_path ('backbone.' stripped,
    neck / head keys ignored); a missing and an unexpected backbone key are both named."""
    from bevdeform.models.backbone import ResNet

    gen = torch.Generator().manual_seed(13)
    backbone = {}
    for key, shape in mmdet_r101_dcn_shapes().items():
        if key.endswith("num_batches_tracked"):
            backbone[key] = torch.tensor(5)
        else:
            backbone[key] = torch.randn(shape, generator=gen) if "conv_offset" in key or "layer4.2" in key else (
                torch.full(shape, 0.01))
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 512, 1, 1)
    state["bbox_head.cls_convs.0.conv.weight"] = torch.zeros(1)
    path = tmp_path / "r101_dcn_fcos3d_pretrain.pth"
    torch.save({"meta": {"epoch": 12, "mmdet_version": "2.x"}, "state_dict": state}, path)
    model = ResNet(101, out_indices=(1, 2, 3), frozen_stages=1, style="caffe", dcn_stages=(False, False, True, True),
                   pretrained_path=str(path))
    loaded = model.state_dict()
    for key in ("layer3.7.conv2.conv_offset.weight", "layer4.2.conv2.conv_offset.bias", "layer4.2.conv3.weight"):
        assert torch.equal(loaded[key], backbone[key]), key
    assert not model.layer1[0].conv1.weight.requires_grad  # frozen after loading

    broken = dict(state)
    del broken["backbone.layer3.4.conv2.conv_offset.bias"]
    broken["backbone.layer3.4.conv2.offset_extra"] = torch.zeros(1)
    torch.save({"state_dict": broken}, path)
    with torch.device("meta"):  # the checks fail before anything is copied: a meta model is enough (and fast)
        meta_model = ResNet(101, style="caffe", dcn_stages=(False, False, True, True))
    with pytest.raises(ValueError) as info:
        meta_model.load_pretrained(path)
    message = str(info.value)
    assert "missing keys: layer3.4.conv2.conv_offset.bias" in message
    assert "unexpected keys: layer3.4.conv2.offset_extra" in message
    # A plain (torchvision-style, no DCN) ResNet-101 file names all 52 offset-conv keys as missing.
    plain = {k: v for k, v in backbone.items() if "conv_offset" not in k}
    torch.save(plain, path)
    with pytest.raises(ValueError) as info:
        meta_model.load_pretrained(path)
    missing = str(info.value).split("missing keys: ")[1].split(" (52 in all)")[0].split(", ")
    assert len(missing) == 52 and all("conv_offset" in k for k in missing)


def test_bev_small_and_base_configs_build_the_published_backbone():
    from bevdeform.config import count_parameters, load_config

    for name, levels in (("bev_small", 1), ("bev_base", 4)):
        cfg = load_config(name)
        assert cfg.model.backbone.style == "caffe" and cfg.model.backbone.dcn_stages == (False, False, True, True)
        assert cfg.model.neck.num_outs == levels and cfg.model.neck.add_extra_convs
        counts = count_parameters(cfg)
        assert counts["backbone"] == TORCHVISION_R101_PARAMS_WITHOUT_FC + 1_804_734, counts


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_cuda_indices_past_2_31():
    """An input plane of more than 2^31 elements: int32 offsets would wrap (memory permitting, ~26 GiB)."""
    native_or_skip("cuda", torch.float32)
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs ~40 GiB of free GPU memory for a > 2^31-element input")
    h = w = 46341  # h * w > 2^31
    x = torch.zeros(1, 1, h, w, device="cuda")
    x[0, 0, -1, -3:] = torch.tensor([1.0, 2.0, 3.0], device="cuda")
    offset = torch.zeros(1, 2, h, w, device="cuda")
    offset[0, 1, -1, -2] = 0.5  # dx: halfway between the last two pixels of the last row
    mask = torch.ones(1, 1, h, w, device="cuda")
    weight = torch.ones(1, 1, 1, 1, device="cuda")
    out = dcn.modulated_deform_conv2d(x, offset, mask, weight, None)
    torch.testing.assert_close(out[0, 0, -1, -3:].cpu(), torch.tensor([1.0, 2.5, 3.0]))
