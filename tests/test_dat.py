"""DAT++ backbone (bevdeform.models.dat) against independent references.

References re-derived from the official LeapLabTHU/DAT code (models/dat.py, models/dat_blocks.py, models/nat.py and
NATTEN's window rule), written here as per-element loops in float64: bilinear sampling (align_corners=True, zeros
outside), the relative-position-bias lookup, neighbourhood attention, softmax(QK^T / sqrt(d) + bias) V; and the
official state-dict names and shapes, generated from the official module structure and configs (not from the model).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import warnings

import numpy as np
import pytest
import torch

from bevdeform.config import build_model, load_config
from bevdeform.models.dat import (
    DAT,
    DeformableAttention,
    NeighborhoodAttention,
    convert_official_dat_state_dict,
)

HAS_ORT = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------------------------
# Brute-force references
# ------------------------------------------------------------------------------------------------------------------
def bilinear(image: torch.Tensor, y_norm: float, x_norm: float) -> torch.Tensor:
    """image (C, H, W) at normalised (y, x), align_corners=True (-1/+1 = first/last pixel centre), zeros outside."""
    _, h, w = image.shape
    py, px = (y_norm + 1.0) / 2.0 * (h - 1), (x_norm + 1.0) / 2.0 * (w - 1)
    y0, x0 = math.floor(py), math.floor(px)
    wy, wx = py - y0, px - x0
    value = torch.zeros(image.shape[0], dtype=image.dtype)
    for yy, weight_y in ((y0, 1.0 - wy), (y0 + 1, wy)):
        for xx, weight_x in ((x0, 1.0 - wx), (x0 + 1, wx)):
            if 0 <= yy < h and 0 <= xx < w:
                value = value + weight_y * weight_x * image[:, yy, xx]
    return value


def natten_window_start(i: int, length: int, kernel: int) -> int:
    """NATTEN's get_window_start (dilation 1)."""
    half = kernel // 2
    return max(i - half, 0) + (i + half >= length) * (length - i - half - 1)


def natten_bias_start(i: int, length: int, kernel: int) -> int:
    """NATTEN's get_pb_start (dilation 1): first row of the (2k-1) bias table used by query i."""
    half = kernel // 2
    return half + (i < half) * (half - i) + (i + half >= length) * (length - i - 1 - half)


def neighborhood_attention_brute_force(module: NeighborhoodAttention, x: torch.Tensor) -> torch.Tensor:
    n, c, h0, w0 = x.shape
    k, heads, d = module.kernel_size, module.num_heads, module.head_dim
    xp = x.permute(0, 2, 3, 1)
    h, w = max(h0, k), max(w0, k)
    padded = torch.zeros(n, h, w, c, dtype=x.dtype)
    padded[:, :h0, :w0] = xp
    qkv = module.qkv(padded)  # (N, H, W, 3C)
    q, key, value = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    out = torch.zeros(n, h0, w0, c, dtype=x.dtype)
    for b in range(n):
        for head in range(heads):
            ch = slice(head * d, (head + 1) * d)
            for i in range(h0):
                for j in range(w0):
                    si, sj = natten_window_start(i, h, k), natten_window_start(j, w, k)
                    bi, bj = natten_bias_start(i, h, k), natten_bias_start(j, w, k)
                    logits, values = [], []
                    for a in range(k):
                        for bb in range(k):
                            logits.append((q[b, i, j, ch] * key[b, si + a, sj + bb, ch]).sum() / math.sqrt(d)
                                          + module.rpb[head, bi + a, bj + bb])
                            values.append(value[b, si + a, sj + bb, ch])
                    weights = torch.softmax(torch.stack(logits), 0)
                    out[b, i, j, ch] = (weights[:, None] * torch.stack(values)).sum(0)
    return module.proj(out).permute(0, 3, 1, 2)


def official_reference_points(hk: int, wk: int) -> np.ndarray:
    """DAttentionBaseline._get_ref_points: linspace(0.5, Hk - 0.5, Hk) / (Hk - 1) * 2 - 1. (Hk, Wk, 2) (y, x)."""
    ys = np.linspace(0.5, hk - 0.5, hk) / (hk - 1.0) * 2.0 - 1.0
    xs = np.linspace(0.5, wk - 0.5, wk) / (wk - 1.0) * 2.0 - 1.0
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1)


def rpe_bias_brute_force(module: DeformableAttention, h: int, w: int, positions: torch.Tensor) -> torch.Tensor:
    """The official table lookup: grid_sample(table, 0.5 * (q_grid - pos), align_corners=True) written per element."""
    ng, hk, wk, _ = positions.shape
    groups, group_heads = module.num_groups, module.group_heads
    n = ng // groups
    bias = torch.zeros(n, module.num_heads, h * w, hk * wk, dtype=positions.dtype)
    for b in range(n):
        for g in range(groups):
            pos = positions[b * groups + g].reshape(-1, 2)
            for jh in range(group_heads):
                head = g * group_heads + jh
                table = module.rpe_table[head][None].to(positions.dtype)
                for i in range(h):
                    for j in range(w):
                        qy, qx = i / (h - 1) * 2 - 1, j / (w - 1) * 2 - 1
                        for m in range(hk * wk):
                            dy, dx = 0.5 * (qy - pos[m, 0]), 0.5 * (qx - pos[m, 1])
                            bias[b, head, i * w + j, m] = bilinear(table, float(dy), float(dx))[0]
    return bias


# ------------------------------------------------------------------------------------------------------------------
# Deformable attention
# ------------------------------------------------------------------------------------------------------------------
def make_deformable(offset_range_factor: float, stride: int = 2, kernel: int = 5, dim: int = 16, heads: int = 4,
                    groups: int = 2, seed: int = 0) -> DeformableAttention:
    torch.manual_seed(seed)
    module = DeformableAttention(dim, heads, groups, stride, kernel, offset_range_factor, (6, 7)).double()
    with torch.no_grad():
        module.rpe_table.normal_()  # a table with structure, so that interpolation errors show
    return module


@pytest.mark.parametrize("hw", [(12, 20), (9, 13)])
def test_offset_network_shape_and_tanh_bound(hw):
    module = make_deformable(offset_range_factor=2.0, stride=4, kernel=7)
    h, w = hw
    q = torch.randn(3, 16, h, w, dtype=torch.float64) * 50  # saturate the tanh
    with torch.no_grad():
        module.conv_offset[3].weight.mul_(100)
        offsets, positions = module.sampling_positions(q)
    hk, wk = math.ceil(h / 4), math.ceil(w / 4)
    assert offsets.shape == positions.shape == (3 * 2, hk, wk, 2)
    bound = torch.tensor([2.0 / (hk - 1), 2.0 / (wk - 1)], dtype=torch.float64)
    assert (offsets.abs() <= bound + 1e-12).all()
    assert (offsets.abs().amax(dim=(0, 1, 2)) > 0.99 * bound).all()  # the bound is reached, not just respected
    reference = torch.from_numpy(official_reference_points(hk, wk))
    torch.testing.assert_close(positions - offsets, reference.expand_as(positions))


def test_datpp_mode_clamps_positions_to_the_map():
    module = make_deformable(offset_range_factor=-1.0)
    q = torch.randn(2, 16, 10, 14, dtype=torch.float64)
    with torch.no_grad():
        module.conv_offset[3].weight.mul_(10)  # (the offset network's LayerNorm fixes the scale before this conv)
        offsets, positions = module.sampling_positions(q)
    reference = torch.from_numpy(official_reference_points(5, 7))
    assert offsets.abs().max() > 1.0  # unbounded offsets
    torch.testing.assert_close(positions, (reference + offsets).clamp(-1, 1))


def test_zero_offsets_sample_the_reference_grid_features():
    # H = W = 9, stride 4: Hk = 3 reference points at pixels (a + 0.5) * (9 - 1) / (3 - 1) = 2, 6, 10.
    for factor, last in ((-1.0, 8), (1.0, None)):  # DAT++ clamps 10 to the last pixel 8; DAT reads zeros there
        module = make_deformable(offset_range_factor=factor, stride=4, kernel=7)
        with torch.no_grad():
            module.conv_offset[3].weight.zero_()
        x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
        with torch.no_grad():
            offsets, positions = module.sampling_positions(module.proj_q(x))
            sampled = module.sample_features(x, positions)  # (N*G, Cg, 3, 3)
        assert (offsets == 0).all()
        grouped = x.reshape(4, 8, 9, 9)
        expected = torch.zeros(4, 8, 3, 3, dtype=torch.float64)
        pixels = [2, 6, last]
        for a, ya in enumerate(pixels):
            for b, xb in enumerate(pixels):
                if ya is not None and xb is not None:
                    expected[:, :, a, b] = grouped[:, :, ya, xb]
        torch.testing.assert_close(sampled, expected, rtol=0, atol=1e-12)


def test_deformed_sampling_matches_per_point_bilinear():
    module = make_deformable(offset_range_factor=-1.0)
    torch.manual_seed(1)
    x = torch.randn(2, 16, 7, 11, dtype=torch.float64)
    positions = torch.rand(4, 3, 5, 2, dtype=torch.float64) * 2.4 - 1.2  # some outside the map
    positions[0, 0, 0] = torch.tensor([1.0, -1.0], dtype=torch.float64)  # exact corners
    got = module.sample_features(x, positions)
    grouped = x.reshape(4, 8, 7, 11)
    for p in range(4):
        for a in range(3):
            for b in range(5):
                want = bilinear(grouped[p], float(positions[p, a, b, 0]), float(positions[p, a, b, 1]))
                torch.testing.assert_close(got[p, :, a, b], want, rtol=0, atol=1e-12)


def test_relative_position_bias_matches_the_official_lookup():
    module = make_deformable(offset_range_factor=-1.0, stride=2)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        _, positions = module.sampling_positions(module.proj_q(x))
        got = module.relative_position_bias(5, 6, positions)
    want = rpe_bias_brute_force(module, 5, 6, positions)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_relative_position_bias_at_the_training_size_is_the_pixel_offset_table():
    """At the table's own query size (6x7) and keys on query pixels, the bias is rpe_table[h, Hq-1+dy, Wq-1+dx]."""
    module = make_deformable(offset_range_factor=-1.0)
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    # keys at the query pixels (2, 3), (5, 0), (0, 6) of a 6x7 map, normalised align_corners=True
    pixels = torch.tensor([[2.0, 3.0], [5.0, 0.0], [0.0, 6.0]], dtype=torch.float64)
    norm = torch.stack([pixels[:, 0] / 5 * 2 - 1, pixels[:, 1] / 6 * 2 - 1], -1)
    positions = norm.reshape(1, 1, 3, 2).expand(4, 1, 3, 2).contiguous()  # N=2, G=2
    with torch.no_grad():
        bias = module.relative_position_bias(6, 7, positions)  # (2, 4, 42, 3)
    for head in range(4):
        for qi in range(42):
            i, j = divmod(qi, 7)
            for m, (pi, pj) in enumerate(pixels.long().tolist()):
                want = module.rpe_table[head, 5 + i - pi, 6 + j - pj]
                torch.testing.assert_close(bias[0, head, qi, m], want, rtol=0, atol=1e-12)
    assert ys.shape == xs.shape


@pytest.mark.parametrize("factor", [-1.0, 2.0])
def test_deformable_attention_matches_naive_softmax_attention(factor):
    module = make_deformable(offset_range_factor=factor, stride=2)
    torch.manual_seed(2)
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        got = module(x)
        q = module.proj_q(x)
        _, positions = module.sampling_positions(q)
        grouped = x.reshape(4, 8, 6, 5)
        hk, wk = positions.shape[1:3]
        sampled = torch.zeros(4, 8, hk * wk, dtype=torch.float64)
        for p in range(4):
            for m in range(hk * wk):
                y, xx = positions[p].reshape(-1, 2)[m].tolist()
                sampled[p, :, m] = bilinear(grouped[p], y, xx)
        sampled = sampled.reshape(2, 16, 1, hk * wk)
        key = module.proj_k(sampled).reshape(2, 4, 4, -1)  # (N, heads, d, Ns)
        value = module.proj_v(sampled).reshape(2, 4, 4, -1)
        query = q.reshape(2, 4, 4, 30)  # (N, heads, d, HW)
        logits = torch.einsum("bhcm,bhcn->bhmn", query, key) / math.sqrt(4)
        logits = logits + rpe_bias_brute_force(module, 6, 5, positions)
        out = torch.einsum("bhmn,bhcn->bhcm", torch.softmax(logits, -1), value).reshape(2, 16, 6, 5)
        want = module.proj_out(out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("factor", [-1.0, 2.0])
def test_gradient_reaches_the_offset_network(factor):
    module = make_deformable(offset_range_factor=factor, stride=2)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    module(x).square().sum().backward()
    for index in (0, 3):  # the depthwise conv and the final 1x1 conv of the offset network
        grad = module.conv_offset[index].weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert module.rpe_table.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------------
# Neighbourhood attention
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw, tile", [((9, 11), 7), ((10, 13), 4), ((4, 8), 7)])  # borders, overlapping last
def test_neighborhood_attention_matches_the_natten_rule(hw, tile):  # tiles, a map smaller than the kernel (padded)
    torch.manual_seed(3)
    module = NeighborhoodAttention(dim=8, num_heads=2, kernel_size=7, tile_size=tile).double()
    with torch.no_grad():
        module.rpb.normal_()
    x = torch.randn(2, 8, *hw, dtype=torch.float64)
    with torch.no_grad():
        got = module(x)
        want = neighborhood_attention_brute_force(module, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------------------------
# The backbone
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dat_short() -> DAT:
    """DAT-T widths with one N + D block in stages 0-2 and stage 3's two D blocks (8 of the 26 blocks): every
    kind of block at every stride, at a third of the cost."""
    torch.manual_seed(1)
    return DAT("tiny", out_indices=(0, 1, 2, 3), stage_specs=("ND", "ND", "ND", "DD")).eval()


def test_multi_scale_shapes_for_any_multiple_of_32(dat_short):
    for h, w in ((64, 96), (96, 32), (160, 224)):
        with torch.no_grad():
            outs = dat_short(torch.randn(1, 3, h, w))
        assert [tuple(o.shape) for o in outs] == [
            (1, c, h // s, w // s) for c, s in zip((64, 128, 256, 512), (4, 8, 16, 32))]
        assert all(torch.isfinite(o).all() for o in outs)
    assert dat_short.strides == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="variant"):
        DAT("huge")
    with pytest.raises(ValueError, match="out_indices"):
        DAT("tiny", out_indices=(2, 1))
    with pytest.raises(ValueError, match="stage_specs"):
        DAT("tiny", stage_specs=("ND", "NX", "D", "D"))


def test_batch_equals_batches_of_one(dat_short):
    model = copy.deepcopy(dat_short).double()  # float64: batched kernels sum in another order than single ones
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        batched = model(images)
        single = [model(images[i:i + 1]) for i in range(2)]
    for level, out in enumerate(batched):
        torch.testing.assert_close(out, torch.cat([s[level] for s in single]), rtol=0, atol=1e-9)


def test_frozen_stages_and_activation_checkpointing():
    with torch.device("meta"):
        model = DAT("tiny", frozen_stages=2)
    frozen = {name.split(".")[0] + "." + name.split(".")[1] for name, p in model.named_parameters()
              if not p.requires_grad}
    assert frozen == {"patch_proj.0", "patch_proj.1", "patch_proj.3", "patch_proj.4", "stages.0", "stages.1",
                      "down_projs.0"}
    # Checkpointed blocks give the same gradients as plain ones.
    grads = []
    for with_checkpoint in (False, True):
        torch.manual_seed(5)
        model = DAT("tiny", out_indices=(1,), stage_specs=("N", "ND", "D", "D"), with_checkpoint=with_checkpoint)
        model.train()
        images = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(6))
        model(images)[0].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxruntime not installed (the 'export' extra)")
def test_onnx_export_runs_in_onnxruntime_and_matches_torch(dat_short, tmp_path):
    import onnxruntime

    images = torch.randn(2, 3, 64, 64)
    path = tmp_path / "dat_short.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(dat_short, (images,), str(path), input_names=["images"],
                          output_names=[f"c{i}" for i in range(4)], opset_version=17, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fresh = torch.randn(2, 3, 64, 64)  # not the tracing input
    got = session.run(None, {"images": fresh.numpy()})
    with torch.no_grad():
        want = dat_short(fresh)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------------------------------
# Official checkpoints
# ------------------------------------------------------------------------------------------------------------------
# LeapLabTHU/DAT configs/dat_{tiny,small,base}.yaml, copied as numbers (dim_stem, dims, heads, groups).
OFFICIAL_CONFIGS = {
    "tiny": (64, (64, 128, 256, 512), (2, 4, 8, 16), (1, 2, 4, 8)),
    "small": (96, (96, 192, 384, 768), (3, 6, 12, 24), (1, 2, 3, 6)),
    "base": (128, (128, 256, 512, 1024), (4, 8, 16, 32), (2, 4, 8, 16)),
}


def official_state_shapes(variant: str, img_size: int = 224, num_classes: int = 1000) -> dict[str, tuple]:
    """Key -> shape of the official DAT model's state dict, from its module structure (dat.py / dat_blocks.py /
    nat.py) with the DAT++ config options: use_conv_patches, use_lpus, use_dwc_mlps, use_pes (rpe_table), stage
    spec [N, D], [N, D] x 2, [N, D] x 9, [D, D], ksizes 9/7/5/3, nat_ksize 7, expansion 4."""
    stem, dims, heads, groups = OFFICIAL_CONFIGS[variant]
    specs = [["N", "D"], ["N", "D"] * 2, ["N", "D"] * 9, ["D", "D"]]
    ksizes = [9, 7, 5, 3]
    shapes = {
        "patch_proj.0.weight": (stem // 2, 3, 3, 3), "patch_proj.0.bias": (stem // 2,),
        "patch_proj.1.norm.weight": (stem // 2,), "patch_proj.1.norm.bias": (stem // 2,),
        "patch_proj.3.weight": (stem, stem // 2, 3, 3), "patch_proj.3.bias": (stem,),
        "patch_proj.4.norm.weight": (stem,), "patch_proj.4.norm.bias": (stem,),
    }
    fmap = img_size // 4
    for i, spec in enumerate(specs):
        c, cg = dims[i], dims[i] // groups[i]
        p = f"stages.{i}."
        for d, kind in enumerate(spec):
            shapes[p + f"local_perception_units.{d}.weight"] = (c, 1, 3, 3)
            shapes[p + f"local_perception_units.{d}.bias"] = (c,)
            for ln in (2 * d, 2 * d + 1):
                shapes[p + f"layer_norms.{ln}.norm.weight"] = (c,)
                shapes[p + f"layer_norms.{ln}.norm.bias"] = (c,)
            m = p + f"mlps.{d}."
            shapes.update({m + "linear1.0.weight": (4 * c, c, 1, 1), m + "linear1.0.bias": (4 * c,),
                           m + "dwc.weight": (4 * c, 1, 3, 3), m + "dwc.bias": (4 * c,),
                           m + "linear2.0.weight": (c, 4 * c, 1, 1), m + "linear2.0.bias": (c,)})
            a = p + f"attns.{d}."
            if kind == "N":
                shapes.update({a + "qkv.weight": (3 * c, c), a + "qkv.bias": (3 * c,),
                               a + "rpb": (heads[i], 13, 13), a + "proj.weight": (c, c), a + "proj.bias": (c,)})
            else:
                shapes.update({a + "conv_offset.0.weight": (cg, 1, ksizes[i], ksizes[i]),
                               a + "conv_offset.0.bias": (cg,), a + "conv_offset.1.norm.weight": (cg,),
                               a + "conv_offset.1.norm.bias": (cg,), a + "conv_offset.3.weight": (2, cg, 1, 1),
                               a + "rpe_table": (heads[i], 2 * fmap - 1, 2 * fmap - 1)})
                for proj in ("proj_q", "proj_k", "proj_v", "proj_out"):
                    shapes[a + proj + ".weight"] = (c, c, 1, 1)
                    shapes[a + proj + ".bias"] = (c,)
        fmap //= 2
    for i in range(3):
        shapes[f"down_projs.{i}.0.weight"] = (dims[i + 1], dims[i], 3, 3)
        shapes[f"down_projs.{i}.1.norm.weight"] = (dims[i + 1],)
        shapes[f"down_projs.{i}.1.norm.bias"] = (dims[i + 1],)
    shapes.update({"cls_norm.norm.weight": (dims[-1],), "cls_norm.norm.bias": (dims[-1],),
                   "cls_head.weight": (num_classes, dims[-1]), "cls_head.bias": (num_classes,)})
    return shapes


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_module_tree_has_the_official_names_and_shapes(variant):
    with torch.device("meta"):
        model = DAT(variant)
    official = {k: v for k, v in official_state_shapes(variant).items() if not k.startswith("cls_")}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    assert {k: ours[k] for k in official if ours[k] != official[k]} == {}


def test_official_checkpoint_loads_through_pretrained_path(tmp_path):
    generator = torch.Generator().manual_seed(4)
    official = {k: torch.randn(s, generator=generator) for k, s in official_state_shapes("tiny").items()}
    path = tmp_path / "dat_pp_tiny_in1k_224.pth"
    torch.save({"model": official, "epoch": 299, "max_accuracy": 83.864}, path)  # the training script's layout
    model = DAT("tiny", pretrained_path=str(path))
    loaded = model.state_dict()
    for key, value in official.items():
        if not key.startswith("cls_"):
            assert torch.equal(loaded[key], value), key
    # A DDP-prefixed flat dict converts to the same names.
    assert set(convert_official_dat_state_dict({"module." + k: v for k, v in official.items()})) == set(loaded)

    # Missing, unexpected and mis-shaped keys are all named; nothing is loaded.
    broken = dict(official)
    del broken["stages.2.attns.5.rpe_table"], broken["down_projs.1.0.weight"]
    broken["stages.0.attns.1.offset_net.weight"] = torch.zeros(1)
    broken["stages.3.attns.0.rpe_table"] = torch.zeros(16, 5, 5)
    torch.save(broken, tmp_path / "broken.pth")
    fresh = DAT("tiny")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError) as error:
        fresh.load_pretrained(tmp_path / "broken.pth")
    message = str(error.value)
    for key in ("stages.2.attns.5.rpe_table", "down_projs.1.0.weight", "stages.0.attns.1.offset_net.weight",
                "stages.3.attns.0.rpe_table: file (16, 5, 5) vs model (16, 13, 13)", "broken.pth"):
        assert key in message
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(FileNotFoundError):
        DAT("tiny", pretrained_path=str(tmp_path / "absent.pth"))


# ------------------------------------------------------------------------------------------------------------------
# Config and training
# ------------------------------------------------------------------------------------------------------------------
def test_bev_tiny_dat_config_builds_and_default_configs_keep_resnet():
    cfg = load_config("bev_tiny_dat")
    assert (cfg.model.backbone.type, cfg.model.backbone.variant, cfg.model.backbone.out_indices,
            cfg.model.neck.num_outs) == ("dat", "tiny", (1, 2, 3), 3)
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model.backbone, DAT) and model.backbone.strides == [8, 16, 32]
    assert model.neck.in_channels == [128, 256, 512]
    for name in ("bev_nano", "bev_tiny", "bev_small", "bev_base"):
        assert load_config(name).model.backbone.type == "resnet"
    with pytest.raises(ValueError, match="model.backbone.type"):
        load_config("bev_tiny", ["model.backbone.type=vit"])
    with pytest.raises(ValueError, match="model.backbone.variant"):
        load_config("bev_tiny_dat", ["model.backbone.variant=huge"])


@pytest.mark.slow
def test_bev_tiny_dat_trains_a_few_steps_on_the_synthetic_set(tmp_path):
    """test_train's small synthetic set and fast model overrides at 32x64 images (stage maps 8x16 .. 1x2: the
    neighbourhood blocks pad, stage 0's deformable block has a single reference row), 2 steps and the final
    validation."""
    from test_train import FAST_MODEL, SMALL_DATA

    from bevdeform.train import prepare_synthetic_data, train

    data = prepare_synthetic_data(SMALL_DATA, tmp_path / "synthetic")
    metrics = train("bev_tiny_dat", overrides=[*FAST_MODEL, "data.image_size_hw=[32,64]", "train.max_steps=2"],
                    data_root=str(data), version="v1.0-synthetic", out=tmp_path / "run", log_every_n_steps=1,
                    enable_progress_bar=False, accelerator="cpu", devices=1, checkpoint_every_n_steps=100)
    assert metrics is not None and math.isfinite(metrics["NDS"])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert any(k.startswith("model.backbone.stages.3.attns.1.conv_offset") for k in checkpoint["state_dict"])
