"""The MSDA op on a CUDA device: what only a GPU can show (skipped with the reason elsewhere).

test_msda.py already runs its equality, dtype, NaN/inf/huge, contiguity and int64 tests on CUDA where a device
exists; these add gradients in reduced precision against the float64 reference, gradcheck of the CUDA kernel,
torch.compile / torch.export with CUDA tensors, and capture of forward + backward in a CUDA graph (what
``--cuda-graphs`` deployments do), replayed on new inputs.
"""

from __future__ import annotations

import pytest
import torch

from bevdeform import msda

from test_msda import CUDA_REASON, make_inputs, native_or_skip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)


def _to(inputs, device, dtype):
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_gradients_match_float64_reference(dtype):
    """grad value / locations / weights of the CUDA kernel (fp32 accumulation) against the float64 reference."""
    native_or_skip("cuda", dtype)
    gen = torch.Generator().manual_seed(11)
    # Locations inside the maps and away from the borders: the reduced-precision comparison of location gradients
    # is meaningful only where the function is smooth.
    inputs64 = make_inputs(2, 200, 8, 32, [(15, 25), (8, 13)], 4, torch.float64, "cpu", gen, location_range=(0.05, 0.95))
    grad_out = torch.randn(2, 200, 8 * 32, dtype=torch.float64, generator=gen)

    def grads(inputs, g):
        value, shapes, starts, locations, weights = inputs
        for t in (value, locations, weights):
            t.requires_grad_()
        out = msda.ms_deform_attn(value, shapes, starts, locations, weights) if value.is_cuda else \
            msda.ms_deform_attn_reference(value, shapes, starts, locations, weights)
        out.backward(g)
        return [t.grad.double().cpu() for t in (value, locations, weights)]

    expected = grads(inputs64, grad_out)
    got = grads(_to(inputs64, "cuda", dtype), grad_out.to("cuda", dtype))
    tol = {torch.float32: 2e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}[dtype]
    for name, g, e in zip(("value", "locations", "weights"), got, expected):
        scale = e.abs().max().clamp_min(1e-6)
        err = (g - e).abs().max() / scale
        assert err < tol, f"grad {name} ({dtype}): max error {err:.2e} of the largest gradient, tolerance {tol}"


def test_cuda_gradcheck_float64():
    native_or_skip("cuda", torch.float64)
    gen = torch.Generator().manual_seed(12)
    value, shapes, starts, locations, weights = _to(
        make_inputs(2, 5, 2, 3, [(3, 4), (1, 1), (2, 5)], 2, generator=gen), "cuda", torch.float64)
    value, locations, weights = (t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: msda.ms_deform_attn(v, shapes, starts, loc, w), (value, locations, weights), eps=1e-6)


def test_cuda_compile_and_export_keep_one_node():
    native_or_skip("cuda", torch.float32)
    gen = torch.Generator().manual_seed(13)
    inputs = _to(make_inputs(2, 64, 8, 32, [(15, 25)], 4, torch.float32, generator=gen), "cuda", torch.float32)

    class Attention(torch.nn.Module):
        def forward(self, value, shapes, starts, locations, weights):
            return msda.ms_deform_attn(value, shapes, starts, locations, weights).relu()

    model = Attention()
    compiled = torch.compile(model, fullgraph=True)  # inductor: the op stays an extern call
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    exported = torch.export.export(model, tuple(inputs))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert "bevdeform.ms_deform_attn.default" in targets, targets
    torch.testing.assert_close(exported.module()(*inputs), model(*inputs))


def test_cuda_graph_capture_forward_backward_replays_on_new_inputs():
    """Forward + backward captured once in a CUDA graph, replayed after the static inputs are overwritten, equals
    eager. The op must not synchronise, allocate from the host or read host values inside the captured region."""
    native_or_skip("cuda", torch.float32)
    gen = torch.Generator().manual_seed(14)
    value, shapes, starts, locations, weights = _to(
        make_inputs(2, 300, 8, 32, [(15, 25), (8, 13)], 4, torch.float32, generator=gen), "cuda", torch.float32)
    static = [t.clone().requires_grad_() for t in (value, locations, weights)]
    grad_out = torch.randn(2, 300, 256, device="cuda")

    def step():
        for t in static:
            t.grad = None
        out = torch.ops.bevdeform.ms_deform_attn(static[0], shapes, starts, static[1], static[2])
        out.backward(grad_out)
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as CUDA graph capture requires
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for t in static:
        t.grad = None
    with torch.cuda.graph(graph):
        out_static = torch.ops.bevdeform.ms_deform_attn(static[0], shapes, starts, static[1], static[2])
        out_static.backward(grad_out)

    fresh = _to(make_inputs(2, 300, 8, 32, [(15, 25), (8, 13)], 4, torch.float32, generator=gen), "cuda",
                torch.float32)
    with torch.no_grad():
        for t, new in zip(static, (fresh[0], fresh[3], fresh[4])):
            t.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager = [fresh[i].clone().requires_grad_() for i in (0, 3, 4)]
    out_eager = msda.ms_deform_attn(eager[0], shapes, starts, eager[1], eager[2])
    out_eager.backward(grad_out)
    torch.testing.assert_close(out_static, out_eager)
    for t, e in zip(static, eager):
        torch.testing.assert_close(t.grad, e.grad)
