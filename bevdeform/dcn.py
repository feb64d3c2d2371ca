"""Modulated deformable convolution (DCNv2): the op's Python face and the `ModulatedDeformConv2d` module.

The function is mmcv's ``modulated_deform_conv2d`` (the DCNv2 paper's), with mmcv's argument order and tensor
layouts, so mmcv / mmdet checkpoints (``ModulatedDeformConv2dPack``) load and compute the same numbers::

    out = modulated_deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation, groups,
                                  deform_groups)

    input   (N, C, H, W)
    offset  (N, 2 * G * kh * kw, Ho, Wo)   G = deform_groups, k = i * kw + j the kernel point (row i, column j):
                                          channel g * 2 * kh * kw + 2 * k     = dy (rows, pixels)
                                          channel g * 2 * kh * kw + 2 * k + 1 = dx (columns, pixels)
    mask    (N, G * kh * kw, Ho, Wo)       channel g * kh * kw + k (the modulation scalar, used as given)
    weight  (C_out, C / groups, kh, kw)
    bias    (C_out,) or None
    out     (N, C_out, Ho, Wo)             Ho = (H + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1, likewise Wo

Input channel c belongs to deform group g = c // (C / G). For output pixel (ho, wo) and kernel point (i, j) the
sample sits at pixel coordinates (pixel centres on integers, no half-pixel shift)::

    y = ho * stride_h - pad_h + i * dil_h + dy        x = wo * stride_w - pad_w + j * dil_w + dx

and is read bilinearly from the four pixels around it, a pixel outside the map reading 0. A sample contributes
only when -1 < y < H and -1 < x < W (strictly, as mmcv's kernels test); otherwise, and whenever dy or dx is NaN or
infinite, it contributes 0 and gets zero gradient (mmcv does the same; note the difference from the MSDA op, whose
grid_sample reference turns a non-finite location into NaN). The sampled value is multiplied by the mask and the
result convolved with the weight like im2col + GEMM: ``out[n, o] = bias[o] + sum_{c, k} weight[o, c, k] *
mask[n, g(c), k] * bilinear(input[n, c], y, x)``. Gradients with respect to y and x are those of y0 = floor(y):
one-sided at integer positions.

Three implementations compute that function:
- `modulated_deform_conv2d_reference`: gather-based bilinear sampling and a matmul, pure PyTorch, autograd by
  PyTorch. It defines the function; it materialises (N, C * kh * kw, Ho * Wo) columns and four gathered copies.
- the native CPU kernel (float32, float64) and CUDA kernel (float32, float16, bfloat16, float64) in `ops/`
  (dcn_cpu.cpp, dcn_cuda.cu), built into the same extension as the MSDA op (``bevdeform-build-ops``) and
  registered as ``torch.ops.bevdeform.modulated_deform_conv2d`` with a fake kernel and autograd, so
  torch.compile(fullgraph=True) and torch.export see one opaque node.

`modulated_deform_conv2d` validates its inputs (ValueError naming the argument and the expected shape), then calls
the native kernel when it is built for the tensors' device and dtype, else the reference.
``BEVDEFORM_DCN_IMPL=reference|native|auto`` (default auto) forces a path; ``native`` raises when the kernel cannot
serve the call.

ONNX: `register_onnx_symbolic` maps the native op to ONNX's own ``DeformConv`` (opset 19, which has the mask
input and the same offset layout); onnxruntime runs it on the CPU, and it is a standard op for TensorRT's ONNX
parser rather than a plugin to write.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bevdeform import msda

__all__ = [
    "IMPL_ENV",
    "NATIVE_DTYPES",
    "ModulatedDeformConv2d",
    "check_inputs",
    "modulated_deform_conv2d",
    "modulated_deform_conv2d_reference",
    "native_available",
    "register_onnx_symbolic",
]

IMPL_ENV = "BEVDEFORM_DCN_IMPL"
_IMPLS = ("auto", "reference", "native")

# dtypes each native kernel implements
NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}

ONNX_OPSET = 19  # the first opset with DeformConv


# ----------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a tuple (h, w); ValueError naming `name` otherwise."""
    if isinstance(value, (int,)) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"modulated_deform_conv2d: {name} must be an int or a pair of ints (h, w), got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"modulated_deform_conv2d: {name} must be >= {minimum}, got {value!r}")
    return pair


def output_size(
    height: int, width: int, kernel_hw: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """(Ho, Wo) of the convolution, as for torch.nn.functional.conv2d."""
    sizes = []
    for size, k, s, p, d in zip((height, width), kernel_hw, stride, padding, dilation):
        sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


def check_inputs(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups):
    """Raise ValueError naming the argument at fault and what was expected; return the normalised conv parameters.

    Returns (stride, padding, dilation) as (h, w) pairs. No tensor values are read (no device sync).
    """
    tensors = {"input": input, "offset": offset, "mask": mask, "weight": weight}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"modulated_deform_conv2d: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError(f"modulated_deform_conv2d: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    for name, value in (("groups", groups), ("deform_groups", deform_groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"modulated_deform_conv2d: {name} must be a positive int, got {value!r}")
    if input.dim() != 4:
        raise ValueError(f"modulated_deform_conv2d: input must be (N, C, H, W), got shape {tuple(input.shape)}")
    N, C, H, W = input.shape
    if weight.dim() != 4:
        raise ValueError(
            f"modulated_deform_conv2d: weight must be (C_out, C / groups, kh, kw), got shape {tuple(weight.shape)}"
        )
    C_out, C_per_group, kh, kw = weight.shape
    if C % groups != 0 or C_out % groups != 0:
        raise ValueError(
            f"modulated_deform_conv2d: groups={groups} must divide input channels C={C} and weight's C_out={C_out}"
        )
    if C_per_group != C // groups:
        raise ValueError(
            f"modulated_deform_conv2d: weight must be (C_out, C / groups, kh, kw) = ({C_out}, {C // groups}, {kh}, "
            f"{kw}) for input C={C} and groups={groups}, got shape {tuple(weight.shape)}"
        )
    if kh < 1 or kw < 1:
        raise ValueError(f"modulated_deform_conv2d: weight's kernel size must be >= 1, got {(kh, kw)}")
    if C % deform_groups != 0:
        raise ValueError(f"modulated_deform_conv2d: deform_groups={deform_groups} must divide input channels C={C}")
    Ho, Wo = output_size(H, W, (kh, kw), stride, padding, dilation)
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"modulated_deform_conv2d: input (H, W) = ({H}, {W}) is too small for kernel {(kh, kw)}, stride "
            f"{stride}, padding {padding}, dilation {dilation}: the output would be {Ho}x{Wo}"
        )
    K = kh * kw
    expected_offset = (N, 2 * deform_groups * K, Ho, Wo)
    if tuple(offset.shape) != expected_offset:
        raise ValueError(
            f"modulated_deform_conv2d: offset must be (N, 2 * deform_groups * kh * kw, Ho, Wo) = {expected_offset} "
            f"(deform_groups={deform_groups}, kernel {kh}x{kw}, output {Ho}x{Wo}), got shape {tuple(offset.shape)}"
        )
    expected_mask = (N, deform_groups * K, Ho, Wo)
    if tuple(mask.shape) != expected_mask:
        raise ValueError(
            f"modulated_deform_conv2d: mask must be (N, deform_groups * kh * kw, Ho, Wo) = {expected_mask} "
            f"(deform_groups={deform_groups}, kernel {kh}x{kw}, output {Ho}x{Wo}), got shape {tuple(mask.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ValueError(f"modulated_deform_conv2d: bias must be (C_out,) = ({C_out},), got shape {tuple(bias.shape)}")
    if not input.is_floating_point():
        raise ValueError(f"modulated_deform_conv2d: input must be a floating-point tensor, got {input.dtype}")
    others = {"offset": offset, "mask": mask, "weight": weight, **({"bias": bias} if bias is not None else {})}
    for name, tensor in others.items():
        if tensor.dtype != input.dtype:
            raise ValueError(
                f"modulated_deform_conv2d: {name} must have input's dtype {input.dtype}, got {tensor.dtype}"
            )
    for name, tensor in others.items():
        if tensor.device != input.device:
            raise ValueError(
                f"modulated_deform_conv2d: all tensors must be on one device; input is on {input.device} but {name} "
                f"is on {tensor.device}"
            )
    return stride, padding, dilation


# ----------------------------------------------------------------------------------------------------------------
# Reference implementation
# ----------------------------------------------------------------------------------------------------------------


def sample_columns_reference(input, offset, mask, kernel_hw, stride, padding, dilation, deform_groups):
    """The modulated deformable columns: (N, C, kh * kw, Ho * Wo) = mask * bilinear(input at the sample positions).

    Pure PyTorch (gathers), differentiable in input, offset and mask; see the module docstring for the convention.
    """
    N, C, H, W = input.shape
    kh, kw = kernel_hw
    G = deform_groups
    K = kh * kw
    Ho, Wo = offset.shape[-2:]
    # Regular grid positions in pixels: base_y[i, ho] = ho * stride - pad + i * dilation.
    ys = torch.arange(Ho, device=input.device, dtype=input.dtype) * stride[0] - padding[0]
    xs = torch.arange(Wo, device=input.device, dtype=input.dtype) * stride[1] - padding[1]
    ki = torch.arange(kh, device=input.device, dtype=input.dtype) * dilation[0]
    kj = torch.arange(kw, device=input.device, dtype=input.dtype) * dilation[1]
    # (kh, 1, Ho, 1) + (1, 1, Ho, 1) -> per kernel point k = i * kw + j: (K, Ho, 1) and (K, 1, Wo)
    base_y = (ki[:, None, None, None] + ys[None, None, :, None]).expand(kh, kw, Ho, 1).reshape(K, Ho, 1)
    base_x = (kj[None, :, None, None] + xs[None, None, None, :]).expand(kh, kw, 1, Wo).reshape(K, 1, Wo)
    # offset (N, G * 2 * K, Ho, Wo) -> (N, G, K, 2, Ho, Wo): [..., 0, :, :] = dy, [..., 1, :, :] = dx (mmcv's order)
    offset = offset.view(N, G, K, 2, Ho, Wo)
    y = base_y + offset[:, :, :, 0]  # (N, G, K, Ho, Wo)
    x = base_x + offset[:, :, :, 1]
    # Strict bounds, as mmcv's kernels: NaN and inf fail them. Invalid samples are moved to 0 before floor so that
    # no NaN reaches an index; torch.where then zeroes their value and their gradient.
    valid = (y > -1) & (y < H) & (x > -1) & (x < W)
    y = torch.where(valid, y, torch.zeros_like(y))
    x = torch.where(valid, x, torch.zeros_like(x))
    y0 = torch.floor(y).detach()
    x0 = torch.floor(x).detach()
    fy = y - y0  # gradient of the cell [y0, y0 + 1]: one-sided at integer positions
    fx = x - x0
    # input (N, C, H, W) -> (N, G, C / G, H * W)
    flat = input.reshape(N, G, C // G, H * W)
    sampled = input.new_zeros(())
    for dy_corner, wy in ((0, 1 - fy), (1, fy)):
        for dx_corner, wx in ((0, 1 - fx), (1, fx)):
            yy = y0.long() + dy_corner
            xx = x0.long() + dx_corner
            inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            index = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1))  # (N, G, K, Ho, Wo)
            # (N, G, K, Ho, Wo) -> (N, G, 1, K * Ho * Wo) -> expanded over the group's channels
            index = index.reshape(N, G, 1, K * Ho * Wo).expand(N, G, C // G, K * Ho * Wo)
            corner = torch.gather(flat, 3, index)  # (N, G, C / G, K * Ho * Wo)
            weight = (wy * wx * inside.to(input.dtype)).reshape(N, G, 1, K * Ho * Wo)
            sampled = sampled + corner * weight
    gate = (mask.view(N, G, K, Ho, Wo) * valid.to(input.dtype)).reshape(N, G, 1, K * Ho * Wo)
    # (N, G, C / G, K * Ho * Wo) -> (N, C, K, Ho * Wo)
    return (sampled * gate).reshape(N, C, K, Ho * Wo)


def modulated_deform_conv2d_reference(
    input, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, deform_groups=1
):
    """The function, in pure PyTorch (bilinear gathers + a grouped matmul); returns (N, C_out, Ho, Wo)."""
    stride, padding, dilation = check_inputs(
        input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups
    )
    N, C = input.shape[:2]
    C_out, _, kh, kw = weight.shape
    Ho, Wo = offset.shape[-2:]
    columns = sample_columns_reference(input, offset, mask, (kh, kw), stride, padding, dilation, deform_groups)
    # (N, C, K, L) -> (N, groups, C / groups * K, L): row c * K + k, the order of weight's (C / groups, kh, kw)
    columns = columns.reshape(N, groups, (C // groups) * kh * kw, Ho * Wo)
    # weight (C_out, C / groups, kh, kw) -> (groups, C_out / groups, C / groups * K)
    w = weight.reshape(groups, C_out // groups, (C // groups) * kh * kw)
    out = torch.matmul(w, columns)  # (N, groups, C_out / groups, L)
    out = out.reshape(N, C_out, Ho, Wo)  # (N, groups, C_out / groups, L) -> (N, C_out, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, C_out, 1, 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Native kernels (built with the MSDA op, one extension), registration of fake kernels and autograd
# ----------------------------------------------------------------------------------------------------------------

_python_side_registered = False


def _register_python_side() -> None:
    """Fake kernels and autograd of the DCN ops the native library registered (once per process).

    Called by `bevdeform.msda.build` after it loads the extension, so every load path registers them.
    """
    global _python_side_registered
    if _python_side_registered:
        return

    @torch.library.register_fake("bevdeform::modulated_deform_conv2d")
    def _forward_fake(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups):
        return input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))

    @torch.library.register_fake("bevdeform::modulated_deform_conv2d_backward")
    def _backward_fake(input, offset, mask, weight, bias, grad_output, stride, padding, dilation, groups,
                       deform_groups):
        return (torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask), torch.empty_like(weight),
                weight.new_empty((weight.shape[0],)))

    def _setup_context(ctx, inputs, output):
        input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups = inputs
        ctx.save_for_backward(input, offset, mask, weight, bias)
        ctx.conv = (stride, padding, dilation, groups, deform_groups)
        ctx.has_bias = bias is not None

    def _backward(ctx, grad_output):
        input, offset, mask, weight, bias = ctx.saved_tensors
        stride, padding, dilation, groups, deform_groups = ctx.conv
        grad_input, grad_offset, grad_mask, grad_weight, grad_bias = (
            torch.ops.bevdeform.modulated_deform_conv2d_backward(
                input, offset, mask, weight, bias, grad_output.contiguous(), stride, padding, dilation, groups,
                deform_groups,
            )
        )
        return (grad_input, grad_offset, grad_mask, grad_weight, grad_bias if ctx.has_bias else None,
                None, None, None, None, None)

    torch.library.register_autograd("bevdeform::modulated_deform_conv2d", _backward, setup_context=_setup_context)
    _python_side_registered = True


def _requested_impl() -> str:
    return msda._requested_impl(IMPL_ENV)


def _served(device_type: str, dtype: torch.dtype) -> bool:
    state = msda._load_native()
    served = state.get(device_type, False) and dtype in NATIVE_DTYPES.get(device_type, ())
    if served and not _python_side_registered:  # the library loaded but the Python side is missing: never
        served = False
    return served


@torch.compiler.assume_constant_result
def _use_native(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the native kernel serves this device and dtype. torch.compile evaluates this once, as a constant."""
    impl = _requested_impl()
    if impl == "reference":
        return False
    served = _served(device_type, dtype)
    if impl == "native" and not served:
        reason = msda._native_problem or f"the {device_type} kernel does not implement {dtype}"
        raise RuntimeError(f"{IMPL_ENV}=native but the native DCN kernel cannot serve {device_type}/{dtype}: {reason}")
    return served


def native_available(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """True when the native kernel is built (building it now if needed) for this device type and dtype."""
    return _served(device_type, dtype)


def modulated_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> torch.Tensor:
    """Modulated deformable convolution (mmcv's argument order), see the module docstring; (N, C_out, Ho, Wo)."""
    stride, padding, dilation = check_inputs(
        input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups
    )
    if _use_native(input.device.type, input.dtype):
        return torch.ops.bevdeform.modulated_deform_conv2d(
            input.contiguous(), offset.contiguous(), mask.contiguous(), weight.contiguous(),
            None if bias is None else bias.contiguous(), list(stride), list(padding), list(dilation), groups,
            deform_groups,
        )
    return modulated_deform_conv2d_reference(
        input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups
    )


# ----------------------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------------------


def _deform_conv_symbolic(g, input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups):
    from torch.onnx import symbolic_helper

    stride = symbolic_helper._get_const(stride, "is", "stride")
    padding = symbolic_helper._get_const(padding, "is", "padding")
    dilation = symbolic_helper._get_const(dilation, "is", "dilation")
    groups = symbolic_helper._get_const(groups, "i", "groups")
    deform_groups = symbolic_helper._get_const(deform_groups, "i", "deform_groups")
    weight_sizes = symbolic_helper._get_tensor_sizes(weight)
    if symbolic_helper._is_none(bias):
        bias = _onnx_zeros_bias(g, weight)  # DeformConv's B input is positional: it sits before the mask
    return g.op(
        "DeformConv", input, weight, offset, bias, mask,
        dilations_i=list(dilation), group_i=groups, kernel_shape_i=list(weight_sizes[2:]),
        offset_group_i=deform_groups, pads_i=list(padding) * 2, strides_i=list(stride),
    )


def _onnx_zeros_bias(g, weight):
    """A zero bias of weight's dtype and C_out: DeformConv's B input sits before the mask input."""
    shape = g.op("Slice", g.op("Shape", weight), g.op("Constant", value_t=torch.tensor([0])),
                 g.op("Constant", value_t=torch.tensor([1])))
    zero = g.op("CastLike", g.op("Constant", value_t=torch.tensor([0.0])), weight)
    return g.op("Expand", zero, shape)


def register_onnx_symbolic(opset: int = ONNX_OPSET) -> None:
    """Export ``bevdeform::modulated_deform_conv2d`` as ONNX ``DeformConv`` (opset >= 19) in torch.onnx.export.

    The offset layout (N, G * kh * kw * 2, Ho, Wo) with (dy, dx) per kernel point and the mask (N, G * kh * kw,
    Ho, Wo) are ONNX's too, and its bilinear sampling is grid_sample(align_corners=1, zero padding) on pixel
    coordinates: the same function.
    """
    if opset < ONNX_OPSET:
        raise ValueError(f"register_onnx_symbolic: opset={opset}; ONNX DeformConv needs opset >= {ONNX_OPSET}")
    torch.onnx.register_custom_op_symbolic("bevdeform::modulated_deform_conv2d", _deform_conv_symbolic, opset)


# ----------------------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------------------


class ModulatedDeformConv2d(nn.Module):
    """A 2-D convolution whose sampling grid is deformed and modulated per pixel (DCNv2), predicting its own offsets.

    ``conv_offset`` (a plain conv with the same kernel, stride, padding and dilation) maps the input to
    3 * deform_groups * kh * kw channels, split in three equal chunks o1, o2, m: offset = cat(o1, o2) (so channel
    2k / 2k + 1 of the offset are dy / dx of kernel point k, as the op reads them) and mask = sigmoid(m). It is
    initialised to zero, so a fresh module computes mask 0.5 times a plain convolution of ``weight`` (mmcv's
    ModulatedDeformConv2dPack does the same). Attribute names are mmcv's: a ``conv2`` of mmdet's ResNet-DCN loads
    as ``conv2.weight``, ``conv2.conv_offset.weight``, ``conv2.conv_offset.bias`` (and ``conv2.bias`` when
    ``bias=True``; mmdet's ResNet builds it with bias=False).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as ``nn.Conv2d``.
        deform_groups: groups of input channels sharing one offset/mask field.
        bias: whether the deformable conv has a bias (the offset conv always has one).

    Shapes: (N, in_channels, H, W) -> (N, out_channels, Ho, Wo), Ho/Wo as ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        kh, kw = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        if in_channels % groups or out_channels % groups or in_channels % deform_groups:
            raise ValueError(
                f"ModulatedDeformConv2d: groups={groups} must divide in_channels={in_channels} and out_channels="
                f"{out_channels}, and deform_groups={deform_groups} must divide in_channels"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kh, kw)
        self.groups = groups
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(
            in_channels, 3 * deform_groups * kh * kw, kernel_size=(kh, kw), stride=self.stride,
            padding=self.padding, dilation=self.dilation, bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's initialisation: weight uniform(+-1/sqrt(C_in * kh * kw)), bias 0, offset conv 0."""
        if self.weight.is_meta:
            return
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset (N, 2 * G * K, Ho, Wo), mask (N, G * K, Ho, Wo)) predicted from x."""
        o1, o2, m = torch.chunk(self.conv_offset(x), 3, dim=1)  # 3 x (N, G * K, Ho, Wo)
        return torch.cat((o1, o2), dim=1), torch.sigmoid(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offset_and_mask(x)
        return modulated_deform_conv2d(
            x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
            self.deform_groups,
        )

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}, bias={self.bias is not None}")
