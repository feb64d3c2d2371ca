"""The MSDA op: every available implementation equals the grid_sample reference; registration, gradcheck, compile.

Implementations are compared on fresh random inputs drawn by hypothesis, including the awkward places: 1x1 and
1xN levels, channel counts that are not a multiple of any vector width, locations outside [0, 1], exactly on pixel
centres (integer pixel positions: one-sided gradients) and on the borders, NaN and inf, and non-contiguous inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bevdeform import msda

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CUDA_REASON = "no CUDA device on this machine: the CUDA kernel is only compile-checked (test_msda_cuda_compile.py)"


def native_or_skip(device: str, dtype: torch.dtype) -> None:
    if not msda.native_available(device, dtype):
        pytest.skip(f"native MSDA kernel not available for {device}/{dtype}: {msda._native_problem}")


def make_inputs(
    batch: int,
    num_queries: int,
    num_heads: int,
    channels: int,
    shapes: list[tuple[int, int]],
    num_points: int,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    generator: torch.Generator | None = None,
    location_range: tuple[float, float] = (-0.1, 1.1),
):
    shapes_t = torch.tensor(shapes, dtype=torch.int64)
    sizes = shapes_t[:, 0] * shapes_t[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), num_heads, channels, dtype=dtype, generator=generator)
    low, high = location_range
    locations = low + (high - low) * torch.rand(
        batch, num_queries, num_heads, num_levels, num_points, 2, dtype=dtype, generator=generator
    )
    weights = torch.rand(batch, num_queries, num_heads, num_levels, num_points, dtype=dtype, generator=generator)
    # normalised over levels x points, as the callers do
    weights = weights / weights.flatten(-2).sum(-1)[..., None, None]
    return [t.to(device) for t in (value, shapes_t, starts, locations, weights)]


def exact_locations(shapes, locations: torch.Tensor, generator: torch.Generator, fraction: float) -> torch.Tensor:
    """Overwrite a fraction of the locations with exactly representable special places per level.

    Pixel centres (integer pixel positions, where gradients are one-sided), the map borders (pixel -0.5 and
    W - 0.5), the edge of the support (pixel -1 and W), and points just outside. Levels get sizes that are
    powers of two in the tests that use this, so (k + 0.5) / W is exact in binary and every implementation
    sees the same pixel coordinate.
    """
    locations = locations.clone()
    for level, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            k = torch.randint(0, size, locations[..., level, :, axis].shape, generator=generator).to(locations)
            specials = torch.stack(
                [
                    (k + 0.5) / size,  # pixel centre k
                    torch.zeros_like(k),  # pixel -0.5
                    torch.ones_like(k),  # pixel size - 0.5
                    torch.full_like(k, -0.5 / size),  # pixel -1: adds 0, one-sided gradient
                    torch.full_like(k, (size + 0.5) / size),  # pixel size: outside
                    torch.full_like(k, -1.5 / size),  # pixel -2: outside
                ],
                dim=-1,
            )
            choice = torch.randint(0, specials.shape[-1], k.shape, generator=generator)
            special = specials.gather(-1, choice.to(locations.device)[..., None])[..., 0]
            use = torch.rand(k.shape, generator=generator).to(locations.device) < fraction
            locations[..., level, :, axis] = torch.where(use, special, locations[..., level, :, axis])
    return locations


def run_with_grads(fn, inputs, grad_output):
    value, shapes, starts, locations, weights = [
        t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs
    ]
    out = fn(value, shapes, starts, locations, weights)
    grads = torch.autograd.grad(out, (value, locations, weights), grad_output)
    return out, grads


def assert_close(actual, expected, dtype, what):
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, equal_nan=True, msg=what)


level_shape = st.one_of(
    st.tuples(st.integers(1, 9), st.integers(1, 11)),
    st.sampled_from([(1, 1), (1, 7), (6, 1), (1, 2)]),
)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    num_queries=st.integers(1, 17),
    num_heads=st.integers(1, 3),
    channels=st.sampled_from([1, 3, 4, 5, 8, 13, 32, 33]),
    shapes=st.lists(level_shape, min_size=1, max_size=4),
    num_points=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_native_equals_reference_random(device, batch, num_queries, num_heads, channels, shapes, num_points, seed):
    dtype = torch.float64
    native_or_skip(device, dtype)
    gen = torch.Generator().manual_seed(seed)
    inputs = make_inputs(batch, num_queries, num_heads, channels, shapes, num_points, dtype, device, gen)
    grad_output = torch.randn(batch, num_queries, num_heads * channels, dtype=dtype, generator=gen).to(device)
    ref_out, ref_grads = run_with_grads(msda.ms_deform_attn_reference, inputs, grad_output)
    out, grads = run_with_grads(msda.ms_deform_attn, inputs, grad_output)
    assert_close(out, ref_out, dtype, "forward")
    for name, got, want in zip(("value", "locations", "weights"), grads, ref_grads):
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    num_queries=st.integers(1, 12),
    num_heads=st.integers(1, 2),
    channels=st.sampled_from([1, 5, 8]),
    shapes=st.lists(
        st.tuples(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 16])), min_size=1, max_size=3
    ),
    num_points=st.integers(1, 4),
    fraction=st.sampled_from([0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_native_equals_reference_on_pixel_centres_and_borders(
    device, batch, num_queries, num_heads, channels, shapes, num_points, fraction, seed
):
    dtype = torch.float64
    native_or_skip(device, dtype)
    gen = torch.Generator().manual_seed(seed)
    inputs = make_inputs(batch, num_queries, num_heads, channels, shapes, num_points, dtype, "cpu", gen)
    inputs[3] = exact_locations(shapes, inputs[3], gen, fraction)
    inputs = [t.to(device) for t in inputs]
    grad_output = torch.randn(batch, num_queries, num_heads * channels, dtype=dtype, generator=gen).to(device)
    ref_out, ref_grads = run_with_grads(msda.ms_deform_attn_reference, inputs, grad_output)
    out, grads = run_with_grads(msda.ms_deform_attn, inputs, grad_output)
    assert_close(out, ref_out, dtype, "forward")
    for name, got, want in zip(("value", "locations", "weights"), grads, ref_grads):
        assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
def test_non_finite_and_huge_locations(device, bad):
    """NaN/inf poison exactly the (b, q, m) they belong to, as in the reference; huge values contribute nothing.

    Nothing is read or written out of bounds (the CPU kernel would crash or corrupt the other outputs)."""
    dtype = torch.float64
    native_or_skip(device, dtype)
    gen = torch.Generator().manual_seed(1)
    inputs = make_inputs(2, 9, 3, 5, [(3, 4), (1, 1), (2, 6)], 3, dtype, "cpu", gen)
    locations = inputs[3]
    locations[0, 2, 1, 0, 1, 0] = bad  # x of one sample
    locations[1, 5, 2, 2, 0, 1] = bad  # y of another
    inputs = [t.to(device) for t in inputs]
    grad_output = torch.randn(2, 9, 15, dtype=dtype, generator=gen).to(device)
    ref_out, ref_grads = run_with_grads(msda.ms_deform_attn_reference, inputs, grad_output)
    out, grads = run_with_grads(msda.ms_deform_attn, inputs, grad_output)
    assert_close(out, ref_out, dtype, "forward")
    poisoned = out.isnan().view(2, 9, 3, 5).all(-1)
    if bad != bad or abs(bad) == float("inf"):
        assert poisoned.sum() == 2 and poisoned[0, 2, 1] and poisoned[1, 5, 2]
    else:
        assert not out.isnan().any()
    # grad_value and grad_weights match the reference (NaN where it is NaN); the reference's grad of a
    # non-finite location is partly NaN, partly 0 (a grid_sample artefact), so only finite places are compared.
    assert_close(grads[0], ref_grads[0], dtype, "grad value")
    assert_close(grads[2], ref_grads[2], dtype, "grad weights")
    finite = ref_grads[1].isfinite() & grads[1].isfinite()
    assert_close(grads[1][finite], ref_grads[1][finite], dtype, "grad locations")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    dtype = torch.float32
    native_or_skip(device, dtype)
    gen = torch.Generator().manual_seed(2)
    value, shapes, starts, locations, weights = make_inputs(2, 11, 2, 6, [(4, 5), (2, 3)], 3, dtype, "cpu", gen)
    # Same numbers, strided storage: transposed copies viewed back, and a sliced value.
    value_nc = value.transpose(0, 2).contiguous().transpose(0, 2)
    locations_nc = locations.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.randn(2, value.shape[1], 2, 12, generator=gen)
    wide[..., ::2] = value
    value_sliced = wide[..., ::2]
    for v in (value_nc, value_sliced):
        assert not v.is_contiguous()
        inputs = [t.to(device) for t in (v, shapes, starts, locations_nc, weights_nc)]
        assert not inputs[3].is_contiguous() and not inputs[4].is_contiguous()
        ref = msda.ms_deform_attn_reference(*[t.to(device) for t in (value, shapes, starts, locations, weights)])
        assert_close(msda.ms_deform_attn(*inputs), ref, dtype, "forward, non-contiguous")
        grad_output = torch.randn(ref.shape, generator=gen).to(device)
        _, grads = run_with_grads(msda.ms_deform_attn, inputs, grad_output)
        _, ref_grads = run_with_grads(msda.ms_deform_attn_reference, inputs, grad_output)
        for got, want in zip(grads, ref_grads):
            assert_close(got, want, dtype, "backward, non-contiguous")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_dtypes_at_model_shape(device, dtype):
    """A BEVFormer-like shape (D = 32, M = 8): reduced precision compared against the float64 reference."""
    native_or_skip(device, dtype)
    gen = torch.Generator().manual_seed(3)
    inputs64 = make_inputs(2, 300, 8, 32, [(15, 25), (8, 13)], 4, torch.float64, "cpu", gen)
    ref = msda.ms_deform_attn_reference(*inputs64)
    inputs = [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in inputs64]
    out = msda.ms_deform_attn(*inputs)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)


def test_gradcheck_cpu_kernel_float64():
    native_or_skip("cpu", torch.float64)
    gen = torch.Generator().manual_seed(4)
    value, shapes, starts, locations, weights = make_inputs(2, 5, 2, 3, [(3, 4), (1, 1), (2, 5)], 2, generator=gen)
    # keep samples away from integer pixel positions, where the function is not differentiable
    value, locations, weights = (t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: msda.ms_deform_attn(v, shapes, starts, loc, w), (value, locations, weights), eps=1e-6
    )


def test_opcheck_registered_op():
    native_or_skip("cpu", torch.float32)
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        inputs = make_inputs(2, 7, 2, 4, [(3, 4), (2, 2)], 2, dtype, generator=gen)
        inputs[0].requires_grad_()
        inputs[3].requires_grad_()
        inputs[4].requires_grad_()
        torch.library.opcheck(torch.ops.bevdeform.ms_deform_attn.default, inputs)


def test_torch_compile_fullgraph_and_export():
    native_or_skip("cpu", torch.float32)
    gen = torch.Generator().manual_seed(6)
    inputs = make_inputs(2, 7, 2, 4, [(3, 4), (2, 2)], 2, torch.float32, generator=gen)

    class Attention(torch.nn.Module):
        def forward(self, value, shapes, starts, locations, weights):
            return msda.ms_deform_attn(value, shapes, starts, locations, weights).relu()

    model = Attention()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    exported = torch.export.export(model, tuple(inputs))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert "bevdeform.ms_deform_attn.default" in targets, targets
    torch.testing.assert_close(exported.module()(*inputs), model(*inputs))


def test_reference_matches_brute_force():
    """The reference itself against a float64 loop over samples and corners (its grid_sample convention)."""
    gen = torch.Generator().manual_seed(7)
    value, shapes, starts, locations, weights = make_inputs(1, 4, 2, 3, [(3, 5), (2, 2)], 2, generator=gen)
    out = msda.ms_deform_attn_reference(value, shapes, starts, locations, weights)
    expected = torch.zeros_like(out).view(1, 4, 2, 3)
    for q in range(4):
        for m in range(2):
            for level, (h, w) in enumerate(shapes.tolist()):
                grid = value[0, starts[level] : starts[level] + h * w, m].view(h, w, 3)
                for p in range(2):
                    x = locations[0, q, m, level, p, 0].item() * w - 0.5
                    y = locations[0, q, m, level, p, 1].item() * h - 0.5
                    x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                    for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                        if 0 <= yy < h and 0 <= xx < w:
                            bilinear = (1 - abs(x - xx)) * (1 - abs(y - yy))
                            expected[0, q, m] += weights[0, q, m, level, p] * bilinear * grid[yy, xx]
    torch.testing.assert_close(out, expected.view(1, 4, 6))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "value must be (B, S, M, D)"),
        (lambda a: a.__setitem__(1, a[1].flatten()), "spatial_shapes must be (L, 2)"),
        (lambda a: a.__setitem__(2, a[2][:1]), "level_start_index must be (L,)"),
        (lambda a: a.__setitem__(2, a[2] + 1), "level_start_index[0] = 1"),
        (lambda a: a.__setitem__(0, a[0][:, :-1]), "value has S = 7 rows but spatial_shapes [[2, 3], [1, 2]] sum to 8"),
        (lambda a: a.__setitem__(3, a[3][..., 0]), "sampling_locations must be (B, Q, M, L, P, 2)"),
        (lambda a: a.__setitem__(3, a[3][:, :, :1]), "sampling_locations must be (B, Q, M, L, P, 2) = (2, 3, 2, 2, 2, 2)"),
        (lambda a: a.__setitem__(4, a[4][..., :1]), "attention_weights must be (B, Q, M, L, P)"),
        (lambda a: a.__setitem__(0, a[0].long()), "value must be a floating-point tensor"),
        (lambda a: a.__setitem__(3, a[3].double()), "sampling_locations must have value's dtype"),
        (lambda a: a.__setitem__(1, a[1].int()), "spatial_shapes must be int64"),
        (lambda a: a.__setitem__(4, a[4].to("meta")), "attention_weights is on meta"),
        (lambda a: a.__setitem__(1, torch.zeros(0, 2, dtype=torch.int64)), "at least one level"),
    ],
)
def test_bad_input_names_the_argument(mutate, message):
    inputs = make_inputs(2, 3, 2, 4, [(2, 3), (1, 2)], 2, torch.float32)
    mutate(inputs)
    with pytest.raises(ValueError) as error:
        msda.ms_deform_attn(*inputs)
    assert message in str(error.value)


def test_env_var_forces_the_reference_path():
    """BEVDEFORM_MSDA_IMPL=reference never touches the native library (checked in a fresh process)."""
    code = (
        "import torch, bevdeform.msda as m\n"
        "a = [torch.rand(1, 6, 1, 2), torch.tensor([[2, 3]]), torch.tensor([0]), torch.rand(1, 4, 1, 1, 2, 2),"
        " torch.rand(1, 4, 1, 1, 2)]\n"
        "m.ms_deform_attn(*a)\n"
        "assert m._native_state is None, m._native_state\n"
        "assert not hasattr(torch.ops.bevdeform, 'ms_deform_attn')\n"
        "print('reference only')\n"
    )
    env = dict(os.environ, BEVDEFORM_MSDA_IMPL="reference")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "reference only" in result.stdout
    env[msda.IMPL_ENV] = "bogus"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "BEVDEFORM_MSDA_IMPL='bogus'" in result.stderr


def test_failed_build_warns_once_and_falls_back(tmp_path):
    """With no C++ compiler the reference serves after one clear warning (fresh process, empty cache)."""
    code = (
        "import warnings, torch, bevdeform.msda as m\n"
        "a = [torch.rand(1, 6, 1, 2), torch.tensor([[2, 3]]), torch.tensor([0]), torch.rand(1, 4, 1, 1, 2, 2),"
        " torch.rand(1, 4, 1, 1, 2)]\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    out1 = m.ms_deform_attn(*a); out2 = m.ms_deform_attn(*a)\n"
        "msgs = [str(w.message) for w in caught if 'bevdeform' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'no C++ compiler' in msgs[0], msgs\n"
        "torch.testing.assert_close(out1, m.ms_deform_attn_reference(*a))\n"
        "print('fell back')\n"
    )
    env = dict(os.environ, CXX="definitely-not-a-compiler", BEVDEFORM_CACHE_DIR=str(tmp_path))
    env.pop(msda.IMPL_ENV, None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fell back" in result.stdout
    # Forcing the native path where it cannot be built is an error, not a silent fallback.
    env[msda.IMPL_ENV] = "native"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "BEVDEFORM_MSDA_IMPL=native" in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_cuda_large_index_and_empty():
    """Empty queries launch nothing; a value tensor past 2^31 elements would need int64 offsets (memory permitting)."""
    native_or_skip("cuda", torch.float32)
    inputs = make_inputs(1, 0, 2, 4, [(3, 4)], 2, torch.float32, "cuda")
    assert msda.ms_deform_attn(*inputs).shape == (1, 0, 8)
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory for a > 2^31-element value tensor")
    # value (1, S, 1, 32) with S * 32 > 2^31: the sampled rows lie past the int32 range
    h, w = 8192, 8200
    value = torch.zeros(1, h * w, 1, 32, device="cuda")
    value[0, -w:] = 1.0  # the last image row
    shapes = torch.tensor([[h, w]], device="cuda")
    starts = torch.tensor([0], device="cuda")
    locations = torch.tensor([0.5, (h - 0.5) / h], device="cuda", dtype=torch.float32).view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, device="cuda")
    out = msda.ms_deform_attn(value, shapes, starts, locations, weights)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_cpu_backward_allocates_only_its_gradients():
    """The native backward allocates exactly the three gradients it returns (no per-thread grad_value copies)."""
    native_or_skip("cpu", torch.float32)
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(8)
    value, shapes, starts, locations, weights = make_inputs(4, 300, 8, 32, [(15, 25)], 8, torch.float32, generator=gen)
    grad_output = torch.randn(4, 300, 256, generator=gen)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grads = torch.ops.bevdeform.ms_deform_attn_backward(value, shapes, starts, locations, weights, grad_output)
    allocated = [e.cpu_memory_usage for e in prof.events() if e.name == "bevdeform::ms_deform_attn_backward"]
    assert len(allocated) == 1
    assert allocated[0] == sum(g.numel() * g.element_size() for g in grads)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_native_kernel_ignores_a_level_that_is_not_inside_value(device):
    """The Python side refuses an inconsistent level table, except while torch.compile traces or a CUDA graph
    captures; the kernels themselves must then neither read nor write outside value / grad_value. A level whose
    rows run past S is skipped (as if every location missed it): the output and gradients are those of the valid
    levels alone, computed by the reference."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    native_or_skip(device, torch.float64)
    gen = torch.Generator().manual_seed(21)
    value, shapes, starts, locations, weights = make_inputs(2, 7, 2, 4, [(4, 4), (3, 5)], 3, torch.float64,
                                                            generator=gen, location_range=(0.0, 1.0))
    value, shapes, starts, locations, weights = (t.to(device) for t in (value, shapes, starts, locations, weights))
    bad_starts = torch.tensor([0, 20], device=device)  # rows 20..34 of S = 31: past the end of value
    out = torch.ops.bevdeform.ms_deform_attn(value, shapes, bad_starts, locations, weights)
    kept = weights.clone()
    kept[:, :, :, 1] = 0  # (B, Q, M, L, P): level 1 contributes nothing
    torch.testing.assert_close(out, msda.ms_deform_attn_reference(value, shapes, starts, locations, kept))
    grad_output = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
    grad_value, grad_locations, grad_weights = torch.ops.bevdeform.ms_deform_attn_backward(
        value, shapes, bad_starts, locations, weights, grad_output)
    assert float(grad_value[:, 16:].abs().max()) == 0  # nothing written past level 0's rows
    assert float(grad_locations[:, :, :, 1].abs().max()) == 0 and float(grad_weights[:, :, :, 1].abs().max()) == 0
    assert float(grad_weights[:, :, :, 0].abs().max()) > 0
