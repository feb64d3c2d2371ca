"""ResNet image backbone with torchvision-compatible state-dict keys.

The module tree mirrors torchvision's ``resnet{18,34,50,101}`` name for name (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), minus ``avgpool`` and ``fc``: ImageNet weights saved by
torchvision load from a local file with :meth:`ResNet.load_pretrained`, and no torchvision import is needed.

Architecture facts followed (ResNet v1.5, torchvision's and mmdet's ``style='pytorch'``):
- stem: 7x7 conv stride 2 (no bias), BN, ReLU, 3x3 max-pool stride 2;
- BasicBlock (depth 18/34): two 3x3 convs, expansion 1;
- Bottleneck (depth 50/101): 1x1, 3x3, 1x1 convs, expansion 4, the stride sits on the 3x3 conv;
- the first block of a stage gets a ``downsample`` branch (1x1 conv with the stage stride + BN) whenever the
  stride or the channel count changes; all convs are bias-free.

Two named options give mmdet's ResNet-101-DCN of BEVFormer small/base (``style='caffe'``,
``dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False)``, ``stage_with_dcn=(False, False, True, True)``):
- ``style='caffe'``: a Bottleneck's stride sits on its first 1x1 conv instead of the 3x3 one (the same parameters
  and keys, a different function);
- ``dcn_stages``: the 3x3 conv of every Bottleneck of those stages is a ``bevdeform.dcn.ModulatedDeformConv2d``
  (bias-free, one deform group, offsets initialised to zero), keyed like mmcv's ``ModulatedDeformConv2dPack``:
  ``layer3.0.conv2.weight``, ``layer3.0.conv2.conv_offset.weight``, ``layer3.0.conv2.conv_offset.bias``.

Frozen batch norm: the layers are ordinary ``nn.BatchNorm2d`` (so the state dict keeps ``running_mean``,
``running_var`` and ``num_batches_tracked`` exactly as torchvision writes them). With ``norm_eval=True`` they
are kept in eval mode by :meth:`ResNet.train` and their affine parameters get ``requires_grad=False``; this is
what the BEVFormer reference configs do (``norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True``).
"""

from __future__ import annotations

import os

import torch
import torch.utils.checkpoint
from torch import nn

from bevdeform.dcn import ModulatedDeformConv2d

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "RESNET_STAGE_BLOCKS", "RESNET_STYLES"]

# Blocks per stage (layer1..layer4) for each supported depth, as published with the ResNet paper.
RESNET_STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}

RESNET_STYLES = ("pytorch", "caffe")  # where a Bottleneck's stride sits: the 3x3 conv / the first 1x1 conv

# Base width of each stage; a stage outputs width * block expansion channels.
_STAGE_WIDTHS = (64, 128, 256, 512)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or projected) shortcut; ResNet-18/34.

    Args:
        in_channels: channels of the block input.
        width: channels of both convs; the block outputs ``width * expansion`` = ``width`` channels.
        stride: stride of the first conv (and of the shortcut projection).
        downsample: shortcut projection, ``None`` for the identity.

    Shapes: (N, in_channels, H, W) -> (N, width, ceil(H / stride), ceil(W / stride)).
    """

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 style: str = "pytorch", with_dcn: bool = False):
        super().__init__()
        if with_dcn:  # mmdet's BasicBlock has no DCN either
            raise ValueError("BasicBlock: with_dcn=True is not supported (DCN is for Bottleneck depths 50/101)")
        # Attribute names are torchvision's: they become the state-dict keys. `style` does not matter here: the
        # stride sits on the first 3x3 conv in both (as mmdet's BasicBlock).
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, ResNet v1.5), 1x1 expand; ResNet-50/101.

    Args:
        in_channels: channels of the block input.
        width: channels of the 1x1 and 3x3 convs; the block outputs ``width * 4`` channels.
        stride: stride of the 3x3 conv (``style='pytorch'``) or of the first 1x1 conv (``style='caffe'``), and of
            the shortcut projection.
        downsample: shortcut projection, ``None`` for the identity.
        style: ``'pytorch'`` or ``'caffe'`` (see the module docstring).
        with_dcn: the 3x3 conv is a modulated deformable conv (``ModulatedDeformConv2d``, bias-free).

    Shapes: (N, in_channels, H, W) -> (N, 4 * width, ceil(H / stride), ceil(W / stride)).
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 style: str = "pytorch", with_dcn: bool = False):
        super().__init__()
        if style not in RESNET_STYLES:
            raise ValueError(f"Bottleneck: style={style!r}, expected one of {RESNET_STYLES}")
        conv1_stride, conv2_stride = (stride, 1) if style == "caffe" else (1, stride)
        self.conv1 = _conv1x1(in_channels, width, conv1_stride)
        self.bn1 = nn.BatchNorm2d(width)
        if with_dcn:
            # mmdet builds it with bias=False and padding = dilation = 1; its keys are conv2.weight and
            # conv2.conv_offset.{weight,bias}.
            self.conv2 = ModulatedDeformConv2d(width, width, 3, stride=conv2_stride, padding=1, bias=False)
        else:
            self.conv2 = _conv3x3(width, width, conv2_stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _run_checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``block`` under activation checkpointing without updating BN running stats twice.

    Checkpointing re-runs the block's forward during backward. A BatchNorm in training mode would then update
    its running mean/var (and ``num_batches_tracked``) a second time for the same batch; the recomputation here
    restores those buffers afterwards, so the statistics match a run without checkpointing.
    """
    calls = 0

    def forward_once(inp: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        training_bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d) and m.training]
        if calls == 1 or not training_bns:
            return block(inp)
        saved = [[buf.clone() for buf in bn.buffers()] for bn in training_bns]
        try:
            return block(inp)
        finally:
            # `finally`: the non-reentrant recomputation stops early by raising once it has every tensor it needs.
            with torch.no_grad():
                for bn, bufs in zip(training_bns, saved):
                    for buf, old in zip(bn.buffers(), bufs):
                        buf.copy_(old)

    return torch.utils.checkpoint.checkpoint(forward_once, x, use_reentrant=False)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 feature extractor (no pooling head, no classifier).

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101 (Bottleneck).
        out_indices: which stages to return, 0..3 = layer1..layer4 (strides 4, 8, 16, 32). Must be strictly
            increasing. Stages after the last requested one are still built (the state dict stays
            torchvision's) but are not run; their parameters get no gradient.
        frozen_stages: -1 freezes nothing, 0 the stem (conv1 + bn1), k >= 1 the stem and layer1..layerk.
            Frozen parts have ``requires_grad=False`` and stay in eval mode.
        norm_eval: frozen batch norm: every BN layer stays in eval mode (running statistics are used and
            never updated) and its weight/bias get ``requires_grad=False``.
        with_checkpoint: recompute each residual block in backward (``torch.utils.checkpoint``) to save
            activation memory; only active in training mode with grad enabled.
        pretrained_path: optional local ``.pth`` file, loaded by :meth:`load_pretrained` after initialisation: a
            torchvision-style ResNet state dict, or an mmdet/mmcv checkpoint whose backbone keys carry the
            ``backbone.`` prefix (e.g. FCOS3D's ``r101_dcn_fcos3d_pretrain.pth`` for the DCN models).
        style: ``'pytorch'`` (torchvision, default) or ``'caffe'`` (stride on the first 1x1 conv of a Bottleneck,
            mmdet's caffe style, which the FCOS3D-pretrained ResNet-101-DCN uses).
        dcn_stages: four booleans, one per stage (layer1..layer4): the 3x3 convs of those stages' Bottlenecks are
            modulated deformable convs (DCNv2), e.g. ``(False, False, True, True)`` for BEVFormer small/base.

    Attributes:
        out_channels: channels of each returned map, in ``out_indices`` order: ``64 * 2**i * expansion``
            (expansion 1 for 18/34, 4 for 50/101), e.g. ResNet-50 ``out_indices=(1, 2, 3)`` -> [512, 1024, 2048].
        strides: stride of each returned map w.r.t. the input (4, 8, 16, 32 for stages 0..3).

    Initialisation (what torchvision does): convs kaiming-normal (fan_out, ReLU gain), BN weight 1 and bias 0.
    """

    def __init__(
        self,
        depth: int,
        out_indices: tuple[int, ...] = (3,),
        frozen_stages: int = -1,
        norm_eval: bool = True,
        with_checkpoint: bool = False,
        pretrained_path: str | None = None,
        style: str = "pytorch",
        dcn_stages: tuple[bool, bool, bool, bool] = (False, False, False, False),
    ):
        super().__init__()
        if depth not in RESNET_STAGE_BLOCKS:
            raise ValueError(f"ResNet: depth={depth!r}, expected one of {sorted(RESNET_STAGE_BLOCKS)}")
        if style not in RESNET_STYLES:
            raise ValueError(f"ResNet: style={style!r}, expected one of {RESNET_STYLES}")
        dcn_stages = tuple(dcn_stages)
        if len(dcn_stages) != 4 or not all(isinstance(flag, bool) for flag in dcn_stages):
            raise ValueError(
                f"ResNet: dcn_stages={dcn_stages!r}, expected four booleans (layer1..layer4), e.g. "
                f"(False, False, True, True)"
            )
        if any(dcn_stages) and depth in (18, 34):
            raise ValueError(f"ResNet: dcn_stages={dcn_stages!r} needs a Bottleneck depth (50 or 101), got {depth}")
        out_indices = tuple(int(i) for i in out_indices)
        if (
            not out_indices
            or any(i not in (0, 1, 2, 3) for i in out_indices)
            or any(a >= b for a, b in zip(out_indices, out_indices[1:]))
        ):
            raise ValueError(
                f"ResNet: out_indices={out_indices!r}, expected a non-empty strictly increasing tuple of "
                f"stage indices in 0..3 (0 = layer1, stride 4 ... 3 = layer4, stride 32)"
            )
        if not -1 <= frozen_stages <= 4:
            raise ValueError(
                f"ResNet: frozen_stages={frozen_stages!r}, expected -1 (none), 0 (stem) or 1..4 (stem + layer1..layerk)"
            )
        self.depth = depth
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_checkpoint = with_checkpoint
        self.style = style
        self.dcn_stages = dcn_stages

        block = BasicBlock if depth in (18, 34) else Bottleneck
        # Stem; names are torchvision's state-dict keys.
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels = 64
        stage_channels = []
        for stage, (num_blocks, width) in enumerate(zip(RESNET_STAGE_BLOCKS[depth], _STAGE_WIDTHS)):
            stride = 1 if stage == 0 else 2  # layer1 follows the max-pool, which already halved the size
            layer, in_channels = self._make_stage(block, in_channels, width, num_blocks, stride, style,
                                                  dcn_stages[stage])
            self.add_module(f"layer{stage + 1}", layer)
            stage_channels.append(in_channels)

        self.out_channels: list[int] = [stage_channels[i] for i in out_indices]
        self.strides: list[int] = [4 * 2**i for i in out_indices]

        self._init_weights()
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)
        self._freeze()

    @staticmethod
    def _make_stage(
        block: type[BasicBlock] | type[Bottleneck], in_channels: int, width: int, num_blocks: int, stride: int,
        style: str = "pytorch", with_dcn: bool = False,
    ) -> tuple[nn.Sequential, int]:
        out_channels = width * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            # Index 0 = conv, 1 = BN: torchvision's `downsample.0.weight`, `downsample.1.*` keys.
            downsample = nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        blocks = [block(in_channels, width, stride, downsample, style=style, with_dcn=with_dcn)]
        blocks += [block(out_channels, width, style=style, with_dcn=with_dcn) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks), out_channels

    def _init_weights(self) -> None:
        offset_convs = {id(m.conv_offset) for m in self.modules() if isinstance(m, ModulatedDeformConv2d)}
        for m in self.modules():
            if isinstance(m, ModulatedDeformConv2d):
                # Like the plain 3x3 conv it replaces; its offset conv stays at zero (mmdet's init of DCN ResNets).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Conv2d) and id(m) not in offset_convs:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.bn1] + [getattr(self, f"layer{k}") for k in range(1, self.frozen_stages + 1)]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        if self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNet:
        """Set training mode, but keep frozen stages (and every BN when ``norm_eval``) in eval mode."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.eval()
        return self

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load ResNet weights from a local file: a torchvision state dict or an mmdet/mmcv backbone checkpoint.

        Accepted layouts: a flat ``{name: tensor}`` dict with torchvision names (e.g. ``resnet50-0676ba61.pth``;
        ``fc.*``, the ImageNet classifier, is ignored), or an mmcv checkpoint ``{'state_dict': {...}, 'meta': ...}``
        / a flat dict whose backbone keys start with ``backbone.`` (e.g. FCOS3D's ``r101_dcn_fcos3d_pretrain.pth``):
        then only the ``backbone.*`` keys are used, with the prefix stripped, and the detector's other parts
        (``neck.*``, ``bbox_head.*``) are ignored. mmdet's ResNet names are torchvision's, and its DCN convs'
        (``conv2.conv_offset.*``) are this module's.

        ``num_batches_tracked`` buffers absent from old checkpoints (saved before PyTorch 0.4.1) are kept at their
        current value: they only matter for BN with ``momentum=None``. Any other missing, unexpected or mis-shaped
        key raises ``ValueError`` naming the file and every such key; nothing is loaded in that case.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ResNet.load_pretrained: no file at {path!r} (expected a local .pth state dict)")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or pickled-object file: say which file
            raise ValueError(f"ResNet.load_pretrained: cannot read {path!r} as a tensor state dict: {exc}") from exc
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]  # mmcv's checkpoint layout: {'meta': ..., 'state_dict': ..., ...}
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ValueError(
                f"ResNet.load_pretrained: {path!r} holds a {type(loaded).__name__}, expected a flat state dict "
                f"{{name: tensor}} (torchvision) or an mmcv checkpoint with a 'state_dict' of tensors"
            )
        prefix = "backbone."
        if any(k.startswith(prefix) for k in loaded):
            source = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
            naming = "mmdet backbone key names after stripping 'backbone.'"
        else:
            source = {k: v for k, v in loaded.items() if not k.startswith("fc.")}
            naming = "torchvision key names"
        target = self.state_dict()
        missing = [k for k in target if k not in source and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in source if k not in target]
        mis_shaped = [
            f"{k}: file {tuple(source[k].shape)} vs model {tuple(target[k].shape)}"
            for k in source
            if k in target and source[k].shape != target[k].shape
        ]
        if missing or unexpected or mis_shaped:
            problems = []
            for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
                if items:
                    count = f" ({len(items)} in all)" if len(items) > 10 else ""
                    problems.append(f"{title} keys: {', '.join(items)}{count}")
            variant = f"ResNet-{self.depth}" + (f" style={self.style}" if self.style != "pytorch" else "")
            if any(self.dcn_stages):
                variant += f" dcn_stages={list(self.dcn_stages)}"
            raise ValueError(
                f"ResNet.load_pretrained: {path!r} does not match {variant} ({naming} expected); "
                + "; ".join(problems)
            )
        for k, v in target.items():  # old checkpoints without num_batches_tracked keep the model's counter
            source.setdefault(k, v)
        self.load_state_dict(source, strict=True)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Extract feature maps.

        Args:
            images: (N, 3, H, W), normalised as the weights expect (torchvision ImageNet weights: RGB in [0, 1]
                minus mean (0.485, 0.456, 0.406) over std (0.229, 0.224, 0.225), or the same scaled by 255).

        Returns:
            one map per ``out_indices`` entry i: (N, out_channels[i], H_i, W_i) with H_i = ceil(H / 2**(i + 2))
            (every stride-2 layer maps a size s to ceil(s / 2)), likewise W_i.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ResNet.forward: images of shape {tuple(images.shape)}, expected (N, 3, H, W)")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        checkpointing = self.with_checkpoint and self.training and torch.is_grad_enabled()
        outs = []
        for stage in range(self.out_indices[-1] + 1):
            for block in getattr(self, f"layer{stage + 1}"):
                # A frozen block fed by frozen blocks keeps no activations for backward anyway.
                needs_grad = x.requires_grad or any(p.requires_grad for p in block.parameters())
                x = _run_checkpointed(block, x) if checkpointing and needs_grad else block(x)
            if stage in self.out_indices:
                outs.append(x)
        return outs
