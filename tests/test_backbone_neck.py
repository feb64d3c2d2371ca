"""Backbone (ResNet) and neck (FPN): torchvision compatibility, shapes, freezing, checkpointing, top-down path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bevdeform.models.backbone import RESNET_STAGE_BLOCKS, ResNet
from bevdeform.models.neck import FPN

# torchvision's published parameter counts (docs "Classification" table), which include the 1000-class fc head.
TORCHVISION_PARAMS_WITH_FC = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}
EXPANSION = {18: 1, 34: 1, 50: 4, 101: 4}
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fc_params(depth: int) -> int:
    """The torchvision classifier our backbone lacks: Linear(512 * expansion, 1000) weight + bias."""
    return 512 * EXPANSION[depth] * 1000 + 1000


def torchvision_keys_without_fc(depth: int) -> set[str]:
    """torchvision resnet state-dict names, written from the architecture (no torchvision import)."""

    def bn(prefix: str) -> set[str]:
        return {f"{prefix}.{suffix}" for suffix in BN_SUFFIXES}

    keys = {"conv1.weight"} | bn("bn1")
    convs_per_block = 2 if EXPANSION[depth] == 1 else 3
    in_channels = 64
    for stage, num_blocks in enumerate(RESNET_STAGE_BLOCKS[depth]):
        out_channels = 64 * 2**stage * EXPANSION[depth]
        for b in range(num_blocks):
            prefix = f"layer{stage + 1}.{b}"
            for c in range(1, convs_per_block + 1):
                keys |= {f"{prefix}.conv{c}.weight"} | bn(f"{prefix}.bn{c}")
            # The first block projects the shortcut when the stride (stages 2..4) or the width changes.
            if b == 0 and (stage > 0 or in_channels != out_channels):
                keys |= {f"{prefix}.downsample.0.weight"} | bn(f"{prefix}.downsample.1")
        in_channels = out_channels
    return keys


@pytest.fixture(scope="module")
def resnet101() -> ResNet:
    # Built once: it is the slowest model to construct.
    return ResNet(101)


@pytest.fixture(scope="module")
def resnet18_state(tmp_path_factory) -> tuple[dict[str, torch.Tensor], str]:
    """A ResNet-18 state dict with non-default values in every tensor, saved with torchvision's fc keys."""
    torch.manual_seed(0)
    model = ResNet(18)
    state = {
        k: v + torch.rand_like(v) if v.is_floating_point() else v + 7  # num_batches_tracked is an integer
        for k, v in model.state_dict().items()
    }
    on_disk = dict(state)
    on_disk["fc.weight"] = torch.randn(1000, 512)
    on_disk["fc.bias"] = torch.randn(1000)
    path = tmp_path_factory.mktemp("weights") / "resnet18-test.pth"
    torch.save(on_disk, path)
    return state, str(path)


# --- torchvision compatibility -------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_parameter_count_equals_torchvision_minus_fc(depth):
    assert num_params(ResNet(depth)) == TORCHVISION_PARAMS_WITH_FC[depth] - fc_params(depth)


def test_resnet101_parameter_count_and_keys(resnet101):
    assert num_params(resnet101) == TORCHVISION_PARAMS_WITH_FC[101] - fc_params(101)
    assert set(resnet101.state_dict()) == torchvision_keys_without_fc(101)


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_state_dict_keys_equal_torchvision_minus_fc(depth):
    assert set(ResNet(depth).state_dict()) == torchvision_keys_without_fc(depth)


def test_state_dict_shapes_for_a_few_keys(resnet101):
    r18 = ResNet(18).state_dict()
    assert r18["conv1.weight"].shape == (64, 3, 7, 7)
    assert r18["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)
    assert r18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert r18["layer4.1.bn2.running_var"].shape == (512,)
    r101 = resnet101.state_dict()
    assert r101["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert r101["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    # v1.5: the stride-2 conv of a Bottleneck is the 3x3 one.
    assert r101["layer3.0.conv2.weight"].shape == (256, 256, 3, 3)
    assert resnet101.layer3[0].conv2.stride == (2, 2) and resnet101.layer3[0].conv1.stride == (1, 1)
    assert r101["layer3.22.conv3.weight"].shape == (1024, 256, 1, 1)
    assert r101["layer4.2.bn3.weight"].shape == (2048,)
    assert r101["bn1.num_batches_tracked"].dtype == torch.long


def test_load_pretrained_round_trip_ignores_fc(resnet18_state):
    state, path = resnet18_state
    model = ResNet(18, pretrained_path=path)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    # Loading does not undo the freezing done by the constructor.
    assert not any(p.requires_grad for p in model.bn1.parameters())


def test_load_pretrained_accepts_old_checkpoints_without_num_batches_tracked(resnet18_state, tmp_path):
    state, _ = resnet18_state
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(old, path)
    model = ResNet(18)
    model.load_pretrained(path)
    assert torch.equal(model.state_dict()["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])


def test_load_pretrained_missing_key_names_file_and_key(resnet18_state, tmp_path):
    state, _ = resnet18_state
    broken = {k: v for k, v in state.items() if k != "layer2.1.conv1.weight"}
    path = tmp_path / "missing.pth"
    torch.save(broken, path)
    model = ResNet(18)
    before = model.conv1.weight.clone()
    with pytest.raises(ValueError, match=r"missing\.pth.*missing keys: layer2\.1\.conv1\.weight"):
        model.load_pretrained(path)
    assert torch.equal(model.conv1.weight, before), "a failed load must leave the model untouched"


def test_load_pretrained_mis_shaped_and_unexpected_keys(resnet18_state, tmp_path):
    state, _ = resnet18_state
    broken = dict(state)
    broken["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    broken["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(broken, path)
    with pytest.raises(ValueError) as info:
        ResNet(18, pretrained_path=str(path))
    message = str(info.value)
    assert "bad.pth" in message
    assert "mis-shaped keys: layer1.0.conv2.weight: file (64, 64, 1, 1) vs model (64, 64, 3, 3)" in message
    assert "unexpected keys: layer5.0.conv1.weight" in message


def test_load_pretrained_wrong_depth_is_an_error(resnet18_state):
    _, path = resnet18_state
    with pytest.raises(ValueError, match="ResNet-34.*missing keys: layer1.2"):
        ResNet(34, pretrained_path=path)


def test_load_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        ResNet(18).load_pretrained(tmp_path / "nowhere.pth")


def test_constructor_argument_errors():
    with pytest.raises(ValueError, match="depth=152"):
        ResNet(152)
    with pytest.raises(ValueError, match="out_indices"):
        ResNet(18, out_indices=(3, 2))
    with pytest.raises(ValueError, match="out_indices"):
        ResNet(18, out_indices=(4,))
    with pytest.raises(ValueError, match="frozen_stages"):
        ResNet(18, frozen_stages=5)


# --- shapes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 50])
def test_output_strides_and_channels_for_odd_input(depth):
    model = ResNet(depth, out_indices=(0, 1, 2, 3)).eval()
    e = EXPANSION[depth]
    assert model.out_channels == [64 * e, 128 * e, 256 * e, 512 * e]
    assert model.strides == [4, 8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 75, 133))
    # Every stride-2 layer (7x7/p3 conv, 3x3/p1 max-pool, 3x3/p1 convs) maps s -> floor((s - 1) / 2) + 1 = ceil(s / 2):
    # 75 -> 38 -> 19 -> 10 -> 5 -> 3 and 133 -> 67 -> 34 -> 17 -> 9 -> 5.
    expected_hw = [(19, 34), (10, 17), (5, 9), (3, 5)]
    assert [tuple(o.shape) for o in outs] == [(1, c, h, w) for c, (h, w) in zip(model.out_channels, expected_hw)]
    for o, stride, (h, w) in zip(outs, model.strides, expected_hw):
        assert (math.ceil(75 / stride), math.ceil(133 / stride)) == (h, w)


def test_c5_only_default_and_early_stop():
    model = ResNet(18).train()
    outs = model(torch.randn(2, 3, 64, 96))
    assert len(outs) == 1 and outs[0].shape == (2, 512, 2, 3)
    # Stages after the last requested index are not run: they get no gradient.
    model = ResNet(18, out_indices=(1,), norm_eval=False).train()
    model(torch.randn(1, 3, 64, 96))[0].sum().backward()
    assert model.layer2[0].conv1.weight.grad is not None
    assert model.layer3[0].conv1.weight.grad is None and model.layer4[0].conv1.weight.grad is None


# --- freezing ------------------------------------------------------------------------------------------------


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_frozen_stages_and_norm_eval_tiny_config():
    # BEVFormer tiny: ResNet-50 C5, frozen stem + layer1, frozen BN (here on ResNet-18 for speed: same logic).
    model = ResNet(18, out_indices=(3,), frozen_stages=1, norm_eval=True)
    model.train()
    frozen = ("conv1.", "bn1.", "layer1.")
    for name, p in model.named_parameters():
        is_bn = ".bn" in name or name.startswith("bn1") or "downsample.1" in name
        assert p.requires_grad == (not name.startswith(frozen) and not is_bn), name
    assert not model.layer1.training and not model.bn1.training
    assert model.layer2.training and model.layer2[0].conv1.training
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    before = bn_buffers(model)
    model(torch.randn(2, 3, 64, 96))[0].sum().backward()
    after = bn_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name

    # eval() then train() again keeps the frozen parts frozen.
    model.eval().train()
    assert not model.layer1.training and not model.layer2[0].bn1.training and model.layer2[0].conv1.training


def test_frozen_stem_only_with_training_bn():
    model = ResNet(18, frozen_stages=0, norm_eval=False).train()
    assert not model.conv1.weight.requires_grad and not model.bn1.weight.requires_grad
    assert model.layer1[0].conv1.weight.requires_grad and model.layer1[0].bn1.weight.requires_grad
    assert not model.bn1.training and model.layer1[0].bn1.training
    before = bn_buffers(model)
    model(torch.randn(2, 3, 64, 96))
    after = bn_buffers(model)
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # frozen stem: stats kept
    assert not torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])


# --- gradient checkpointing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_eval", [True, False])
def test_checkpointing_matches_plain_forward_and_backward(norm_eval):
    torch.manual_seed(0)
    plain = ResNet(18, out_indices=(1, 3), frozen_stages=0, norm_eval=norm_eval).double().train()
    ckpt = ResNet(18, out_indices=(1, 3), frozen_stages=0, norm_eval=norm_eval, with_checkpoint=True).double()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train()
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    x_plain = images.clone().requires_grad_()
    x_ckpt = images.clone().requires_grad_()

    outs_plain, outs_ckpt = plain(x_plain), ckpt(x_ckpt)
    for a, b in zip(outs_plain, outs_ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    weights = [torch.randn_like(o) for o in outs_plain]
    sum((o * w).sum() for o, w in zip(outs_plain, weights)).backward()
    sum((o * w).sum() for o, w in zip(outs_ckpt, weights)).backward()

    torch.testing.assert_close(x_plain.grad, x_ckpt.grad, rtol=1e-10, atol=1e-12)
    grads_ckpt = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is None:
            assert grads_ckpt[name].grad is None, name
        else:
            torch.testing.assert_close(p.grad, grads_ckpt[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    # The recomputation in backward must not update BN running statistics a second time.
    state_plain, state_ckpt = plain.state_dict(), ckpt.state_dict()
    for k in state_plain:
        torch.testing.assert_close(state_plain[k], state_ckpt[k], rtol=0, atol=0, msg=k)


# --- FPN -----------------------------------------------------------------------------------------------------


def odd_pyramid(channels=(8, 16, 32), sizes=((19, 34), (10, 17), (5, 9)), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=g, dtype=torch.float64) for c, (h, w) in zip(channels, sizes)]


def test_fpn_output_count_and_shapes_for_odd_sizes_with_extra_levels():
    feats = odd_pyramid()
    fpn = FPN([8, 16, 32], 12, num_outs=5).double()
    outs = fpn(feats)
    # Two extra levels, each ceil-halving: 5x9 -> 3x5 -> 2x3.
    assert [tuple(o.shape) for o in outs] == [(2, 12, 19, 34), (2, 12, 10, 17), (2, 12, 5, 9), (2, 12, 3, 5),
                                              (2, 12, 2, 3)]
    assert len(fpn.fpn_convs) == 5 and len(fpn.lateral_convs) == 3


def test_fpn_single_level_tiny_config_on_backbone():
    backbone = ResNet(18).eval()
    fpn = FPN(backbone.out_channels, 16, num_outs=1).eval()
    with torch.no_grad():
        outs = fpn(backbone(torch.randn(1, 3, 75, 133)))
    assert len(outs) == 1 and outs[0].shape == (1, 16, 3, 5)


def test_fpn_top_down_path_adds_the_coarser_level():
    fpn = FPN([8, 16, 32], 12, num_outs=3).double()
    feats = odd_pyramid()
    base = fpn(feats)
    coarse_changed = feats[:2] + [feats[2] + 1.0]
    outs = fpn(coarse_changed)
    assert all(not torch.allclose(a, b) for a, b in zip(base, outs)), "the coarsest input must reach every level"
    fine_changed = [feats[0] + 1.0] + feats[1:]
    outs = fpn(fine_changed)
    assert not torch.allclose(base[0], outs[0])
    assert torch.equal(base[1], outs[1]) and torch.equal(base[2], outs[2]), "no bottom-up path in the FPN"


def test_fpn_matches_hand_written_top_down_with_nearest_indexing():
    fpn = FPN([8, 16], 12, num_outs=2).double()
    c0, c1 = odd_pyramid(channels=(8, 16), sizes=((19, 34), (10, 17)))
    m1 = fpn.lateral_convs[1](c1)
    # Nearest upsampling to an exact size picks source index floor(i * in / out) (PyTorch's 'nearest').
    rows = torch.arange(19) * 10 // 19
    cols = torch.arange(34) * 17 // 34
    m0 = fpn.lateral_convs[0](c0) + m1[:, :, rows][:, :, :, cols]
    expected = [fpn.fpn_convs[0](m0), fpn.fpn_convs[1](m1)]
    for a, b in zip(fpn([c0, c1]), expected):
        torch.testing.assert_close(a, b)


def test_fpn_extra_levels_relu_placement_and_subsampling():
    feats = odd_pyramid()
    fpn = FPN([8, 16, 32], 12, num_outs=5, relu_before_extra_convs=True).double()
    outs = fpn(feats)
    # First extra conv reads the (linear) last output, the next one its ReLU, as in the reference.
    torch.testing.assert_close(outs[3], fpn.fpn_convs[3](outs[2]))
    torch.testing.assert_close(outs[4], fpn.fpn_convs[4](F.relu(outs[3])))
    no_relu = FPN([8, 16, 32], 12, num_outs=5, relu_before_extra_convs=False).double()
    no_relu.load_state_dict(fpn.state_dict())
    torch.testing.assert_close(no_relu(feats)[4], fpn.fpn_convs[4](outs[3]))

    pooled = FPN([8, 16, 32], 12, num_outs=5, add_extra_convs=False).double()
    assert len(pooled.fpn_convs) == 3
    outs = pooled(feats)
    torch.testing.assert_close(outs[3], outs[2][:, :, ::2, ::2])
    torch.testing.assert_close(outs[4], outs[3][:, :, ::2, ::2])


def test_fpn_init_and_argument_errors():
    fpn = FPN([8, 16], 12, num_outs=3)
    assert all(torch.count_nonzero(m.bias) == 0 for m in fpn.modules() if isinstance(m, nn.Conv2d))
    bound = math.sqrt(6.0 / (12 * 9 + 12 * 9))  # Xavier-uniform bound of a 12->12 3x3 conv
    assert fpn.fpn_convs[0].weight.abs().max() <= bound
    with pytest.raises(ValueError, match="num_outs=1"):
        FPN([8, 16], 12, num_outs=1)
    with pytest.raises(ValueError, match="got 1 feature maps, expected 2"):
        fpn([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match=r"features\[1\].*expected \(N, 16, H, W\)"):
        fpn([torch.randn(1, 8, 4, 4), torch.randn(1, 15, 2, 2)])
