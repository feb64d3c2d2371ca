"""Multi-scale deformable attention (MSDA): the op's Python face.

The contract is the one of Deformable DETR, mmcv and BEVFormer, so the op is a drop-in::

    out = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    value               (B, S, M, D)        S = sum over levels of H_l * W_l, levels flattened row-major
    spatial_shapes      (L, 2)   int64      (H_l, W_l): H first
    level_start_index   (L,)     int64      offset of each level in S
    sampling_locations  (B, Q, M, L, P, 2)  normalised (x, y): x first; pixel x = loc_x * W_l - 0.5
    attention_weights   (B, Q, M, L, P)     already normalised by the caller
    out                 (B, Q, M * D)

Sampling is `grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)` on each level: corners
outside a level's map read as zero, so a sample below -1 or at/above W_l (H_l) pixels contributes nothing and
gets zero gradient. Gradients are those of x0 = floor(x): one-sided at integer pixel positions, and at exactly
x = -1 the sample adds 0 but has a gradient (grid_sample's behaviour, which every implementation matches). A
non-finite location makes the output of its (b, q, m) NaN in every implementation (grid_sample does so).

Three implementations compute that function:
- `ms_deform_attn_reference`: grid_sample per level, pure PyTorch, autograd by PyTorch. It defines the function.
  It materialises a (B*M, D, Q, L*P) tensor, so it is slow and memory-hungry.
- the native CPU kernel (float32, float64) and CUDA kernel (float32, float16, bfloat16, float64) in `ops/`,
  compiled on first use into a cache directory and registered as `torch.ops.bevdeform.ms_deform_attn` with a
  fake kernel and autograd, so torch.compile(fullgraph=True) and torch.export see one opaque node.

`ms_deform_attn` validates its inputs, then calls the native kernel when it is built for the tensors' device and
dtype, else the reference. `BEVDEFORM_MSDA_IMPL=reference|native|auto` (default auto) forces a path; `native`
raises when the kernel cannot serve the call. Build ahead of time with `bevdeform-build-ops` (or
`python -m bevdeform.msda`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

IMPL_ENV = "BEVDEFORM_MSDA_IMPL"
CACHE_ENV = "BEVDEFORM_CACHE_DIR"
_IMPLS = ("auto", "reference", "native")

# dtypes each native kernel implements
NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}

# One extension holds every native op of the package: MSDA and the modulated deformable convolution (bevdeform.dcn).
_CPU_SOURCES = ("msda_registration.cpp", "msda_cpu.cpp", "dcn_registration.cpp", "dcn_cpu.cpp")
_CUDA_SOURCES = ("msda_cuda.cu", "dcn_cuda.cu")
_HEADERS = ("msda.h", "dcn.h")


# ----------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise ValueError naming the argument at fault and what was expected; does nothing on valid input.

    Shape, dtype and device checks are free. The check that `spatial_shapes` and `level_start_index` agree with
    each other and with S reads their values (a device sync on CUDA); it is skipped while torch.compile traces.
    """
    args = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, tensor in args.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (B, S, M, D), got shape {tuple(value.shape)}")
    B, S, M, D = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be (L, 2) holding (H, W) per level, got shape "
            f"{tuple(spatial_shapes.shape)}"
        )
    L = spatial_shapes.shape[0]
    if L == 0:
        raise ValueError("ms_deform_attn: spatial_shapes must hold at least one level, got L = 0")
    if tuple(level_start_index.shape) != (L,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be (L,) = ({L},) to match spatial_shapes, got shape "
            f"{tuple(level_start_index.shape)}"
        )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be (B, Q, M, L, P, 2) with (x, y) last, got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    loc_B, Q, loc_M, loc_L, P, _ = sampling_locations.shape
    expected = (B, Q, M, L, P, 2)
    if (loc_B, loc_M, loc_L) != (B, M, L):
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be (B, Q, M, L, P, 2) = {_shape_str(expected)} given value "
            f"(B={B}, M={M}) and spatial_shapes (L={L}), got shape {tuple(sampling_locations.shape)}"
        )
    if tuple(attention_weights.shape) != (B, Q, M, L, P):
        raise ValueError(
            f"ms_deform_attn: attention_weights must be (B, Q, M, L, P) = {(B, Q, M, L, P)} to match "
            f"sampling_locations, got shape {tuple(attention_weights.shape)}"
        )
    if not value.is_floating_point():
        raise ValueError(f"ms_deform_attn: value must be a floating-point tensor, got {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if args[name].dtype != value.dtype:
            raise ValueError(f"ms_deform_attn: {name} must have value's dtype {value.dtype}, got {args[name].dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        if args[name].dtype != torch.int64:
            raise ValueError(f"ms_deform_attn: {name} must be int64, got {args[name].dtype}")
    for name, tensor in args.items():
        if tensor.device != value.device:
            raise ValueError(
                f"ms_deform_attn: all tensors must be on one device; value is on {value.device} but {name} is on "
                f"{tensor.device}"
            )
    if torch.compiler.is_compiling():
        return
    if value.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return  # reading values would sync inside a CUDA graph capture
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    expected_start = 0
    for level, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h <= 0 or w <= 0:
            raise ValueError(f"ms_deform_attn: spatial_shapes[{level}] = ({h}, {w}) must be positive (H, W)")
        if start != expected_start:
            raise ValueError(
                f"ms_deform_attn: level_start_index[{level}] = {start} but spatial_shapes put level {level} at "
                f"{expected_start} (the cumulative sum of H*W of the levels before it); level_start_index = "
                f"{starts}, spatial_shapes = {shapes}"
            )
        expected_start += h * w
    if expected_start != S:
        raise ValueError(
            f"ms_deform_attn: value has S = {S} rows but spatial_shapes {shapes} sum to {expected_start} (H*W per "
            f"level)"
        )


def _shape_str(shape: tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


# ----------------------------------------------------------------------------------------------------------------
# Reference implementation
# ----------------------------------------------------------------------------------------------------------------


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The function, written with grid_sample; see the module docstring for the contract. Returns (B, Q, M*D)."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # (H, W) per level as Python ints: grid_sample needs them to reshape, and they are constants under compile.
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    # grid_sample's normalised grid is in [-1, 1]: g = 2 * loc - 1
    grids = 2 * sampling_locations - 1
    sampled_per_level = []
    for level, (h, w) in enumerate(shapes):
        # (B, S, M, D) -> (B, H*W, M, D) for this level
        value_l = value[:, starts[level] : starts[level] + h * w]
        # (B, H*W, M, D) -> (B, M, D, H*W) -> (B*M, D, H, W)
        value_l = value_l.permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        # (B, Q, M, L, P, 2) -> (B, Q, M, P, 2) for level l -> (B, M, Q, P, 2) -> (B*M, Q, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (B*M, D, Q, P)
        sampled_per_level.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # L x (B*M, D, Q, P) -> (B*M, D, Q, L, P) -> (B*M, D, Q, L*P)
    sampled = torch.stack(sampled_per_level, dim=3).flatten(-2)
    # (B, Q, M, L, P) -> (B, M, Q, L, P) -> (B*M, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * P)
    # (B*M, D, Q, L*P) -> sum over samples -> (B*M, D, Q) -> (B, M*D, Q)
    out = (sampled * weights).sum(-1).view(B, M * D, Q)
    # (B, M*D, Q) -> (B, Q, M*D)
    return out.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Native kernels: build, load, register
# ----------------------------------------------------------------------------------------------------------------

# device type -> whether the native kernel serves it; filled once by _load_native()
_native_state: dict[str, bool] | None = None
_native_problem: str | None = None


def ops_source_dir() -> Path:
    """Folder holding the native sources: `ops/` in a checkout, `bevdeform/_ops` in an installed wheel."""
    return Path(str(importlib.resources.files("bevdeform._ops")))


def cache_dir() -> Path:
    """Root of the build cache: $BEVDEFORM_CACHE_DIR, else ~/.cache/bevdeform."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "bevdeform")
    return Path(root)


def _cuda_buildable() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return False, "CUDA_HOME is not set and nvcc was not found"
    if not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return False, f"no nvcc under CUDA_HOME={cpp_extension.CUDA_HOME}"
    return True, ""


def _extension_name(with_cuda: bool, sources: list[Path]) -> str:
    """A name that changes with the sources, the flags and torch, so a stale build is never loaded."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(str(torch.version.cuda).encode())
    digest.update(repr(_cflags(with_cuda)).encode())
    return f"bevdeform_msda_{'cuda' if with_cuda else 'cpu'}_{digest.hexdigest()[:12]}"


def _cflags(with_cuda: bool) -> list[str]:
    # -fopenmp compiles at::parallel_for's OpenMP region into the kernel; the OpenMP runtime is the one torch
    # already loaded (the extension links libtorch_cpu), so torch.set_num_threads governs the kernel too.
    flags = ["-O3", "-fopenmp"]
    # Wider vectors for the channel loops where this CPU has them. The flags are part of the build's cache key,
    # so a machine without AVX2 never loads a build made with it.
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if with_cuda:
        flags.append("-DBEVDEFORM_WITH_CUDA")
    return flags


def build(with_cuda: bool | None = None, verbose: bool = False) -> Path:
    """Compile the native op (if not cached) and load it into this process. Returns the build directory.

    with_cuda=None builds the CUDA kernel when torch has CUDA and nvcc exists. Raises RuntimeError if the build
    fails (the caller decides whether to fall back).
    """
    from torch.utils import cpp_extension

    if with_cuda is None:
        with_cuda = _cuda_buildable()[0]
    src_dir = ops_source_dir()
    names = list(_CPU_SOURCES) + (list(_CUDA_SOURCES) if with_cuda else [])
    sources = [src_dir / n for n in names]
    missing = [str(p) for p in sources + [src_dir / h for h in _HEADERS] if not p.exists()]
    if missing:
        raise RuntimeError(f"bevdeform: native MSDA sources missing: {missing}")
    name = _extension_name(with_cuda, sources + [src_dir / h for h in _HEADERS])
    build_dir = cache_dir() / "ops" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(p) for p in sources],
        extra_cflags=_cflags(with_cuda),
        extra_cuda_cflags=["-O3", "-DBEVDEFORM_WITH_CUDA", "--expt-relaxed-constexpr"],
        extra_include_paths=[str(src_dir)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    _register_python_side()
    from bevdeform import dcn  # imported here: bevdeform.dcn imports this module

    dcn._register_python_side()
    return build_dir


def _load_native() -> dict[str, bool]:
    """Build/load once per process; on failure warn once and let the reference serve."""
    global _native_state, _native_problem
    if _native_state is not None:
        return _native_state
    state = {"cpu": False, "cuda": False}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _native_problem = f"no C++ compiler ({cxx!r} not on PATH)"
    else:
        want_cuda, cuda_reason = _cuda_buildable()
        try:
            build(with_cuda=want_cuda)
            state = {"cpu": True, "cuda": want_cuda}
            if not want_cuda and torch.cuda.is_available():
                _native_problem = f"CUDA kernel not built: {cuda_reason}"
        except Exception as error:  # a failed compile must not take the model down: the reference serves
            problem = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
            if want_cuda:
                try:
                    build(with_cuda=False)
                    state = {"cpu": True, "cuda": False}
                    problem = f"the CUDA build failed ({problem}); CUDA tensors use the reference"
                except Exception:
                    pass
            _native_problem = problem
    if _native_problem is not None:
        warnings.warn(
            f"bevdeform: native MSDA / DCN kernels unavailable ({_native_problem}); using the PyTorch references "
            f"(slower, more memory). Set {IMPL_ENV}=reference (and BEVDEFORM_DCN_IMPL=reference) to silence this, "
            f"or run `bevdeform-build-ops -v` "
            f"to see the build log.",
            RuntimeWarning,
            stacklevel=3,
        )
    _native_state = state
    return state


_python_side_registered = False


def _register_python_side() -> None:
    """Fake kernels and autograd for the ops the native library just registered (once per process)."""
    global _python_side_registered
    if _python_side_registered:
        return

    @torch.library.register_fake("bevdeform::ms_deform_attn")
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        B, _, M, D = value.shape
        Q = sampling_locations.shape[1]
        return value.new_empty((B, Q, M * D))

    @torch.library.register_fake("bevdeform::ms_deform_attn_backward")
    def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
        return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.bevdeform.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous()
        )
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd("bevdeform::ms_deform_attn", _backward, setup_context=_setup_context)
    _python_side_registered = True


def _requested_impl(env: str = IMPL_ENV) -> str:
    """The path the environment variable ``env`` asks for (BEVDEFORM_MSDA_IMPL, BEVDEFORM_DCN_IMPL): auto,
    reference or native."""
    impl = os.environ.get(env, "auto").strip().lower() or "auto"
    if impl not in _IMPLS:
        raise ValueError(f"{env}={impl!r}: expected one of {', '.join(_IMPLS)}")
    return impl


@torch.compiler.assume_constant_result
def _use_native(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the native kernel serves this device and dtype. torch.compile evaluates this once, as a constant."""
    impl = _requested_impl()
    if impl == "reference":
        return False
    served = _load_native().get(device_type, False) and dtype in NATIVE_DTYPES.get(device_type, ())
    if impl == "native" and not served:
        reason = _native_problem or f"the {device_type} kernel does not implement {dtype}"
        raise RuntimeError(f"{IMPL_ENV}=native but the native MSDA kernel cannot serve {device_type}/{dtype}: {reason}")
    return served


def native_available(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """True when the native kernel is built (building it now if needed) for this device type and dtype."""
    return _load_native().get(device_type, False) and dtype in NATIVE_DTYPES.get(device_type, ())


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention; see the module docstring for shapes. Returns (B, Q, M*D)."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _use_native(value.device.type, value.dtype):
        return torch.ops.bevdeform.ms_deform_attn(
            value.contiguous(),
            spatial_shapes.contiguous(),
            level_start_index.contiguous(),
            sampling_locations.contiguous(),
            attention_weights.contiguous(),
        )
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def build_main(argv: list[str] | None = None) -> int:
    """`bevdeform-build-ops`: compile the native op ahead of time into the cache and report what was built."""
    parser = argparse.ArgumentParser(prog="bevdeform-build-ops", description=build_main.__doc__)
    parser.add_argument("--cuda", choices=("auto", "yes", "no"), default="auto", help="build the CUDA kernel too")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the compiler's output")
    args = parser.parse_args(argv)
    with_cuda = {"auto": None, "yes": True, "no": False}[args.cuda]
    if with_cuda is None:
        with_cuda, reason = _cuda_buildable()
        if not with_cuda:
            print(f"CUDA kernel skipped: {reason}")
    try:
        build_dir = build(with_cuda=with_cuda, verbose=args.verbose)
    except Exception as error:
        print(f"bevdeform-build-ops: build failed: {error}", file=sys.stderr)
        return 1
    print(f"built the native ops, MSDA and DCNv2 ({'CPU + CUDA' if with_cuda else 'CPU'}), in {build_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(build_main())
