"""Feature pyramid network (FPN) neck, as configured in BEVFormer (mmdet's FPN with ``add_extra_convs='on_output'``).

Data path for inputs C_0..C_{L-1} (finest first) and ``num_outs`` outputs:
1. lateral 1x1 convs: C_i -> M_i with ``out_channels`` channels;
2. top-down: for i = L-1 .. 1, M_{i-1} += nearest-upsample(M_i) to M_{i-1}'s exact size (odd sizes are fine:
   the upsample targets the size, not a factor of 2);
3. output 3x3 convs: P_i = conv(M_i);
4. extra levels P_L .. P_{num_outs-1}, each at half the previous size (ceil):
   - ``add_extra_convs=True``: stride-2 3x3 convs, the first on P_{L-1}, each next one on the previous extra
     level, with a ReLU in front of the second and later extra convs when ``relu_before_extra_convs`` (the
     reference's placement: the first extra conv reads the linear output P_{L-1} directly);
   - ``add_extra_convs=False``: 1x1 max-pool with stride 2 (subsampling) of the previous level, no parameters.

BEVFormer tiny: ``FPN([2048], 256, num_outs=1)``; base: ``FPN([512, 1024, 2048], 256, num_outs=4)``.

Initialisation (the reference's): every conv Xavier-uniform weights, zero bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FPN"]


class FPN(nn.Module):
    """Feature pyramid network.

    Args:
        in_channels: channels of each input level, finest (highest resolution) first, e.g. ResNet
            ``out_channels``.
        out_channels: channels of every output level.
        num_outs: number of output levels, >= ``len(in_channels)``; the levels beyond the inputs are extra levels.
        add_extra_convs: extra levels by stride-2 3x3 convs (True) or by stride-2 subsampling (False).
        relu_before_extra_convs: ReLU before the second and later extra convs (see the module docstring).

    Attributes:
        lateral_convs: one 1x1 conv per input level (bias, no norm).
        fpn_convs: one 3x3 conv per input level, then one stride-2 3x3 conv per extra level if
            ``add_extra_convs``; the indices follow the output levels.
    """

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        num_outs: int,
        add_extra_convs: bool = True,
        relu_before_extra_convs: bool = True,
    ):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels or any(c <= 0 for c in in_channels):
            raise ValueError(f"FPN: in_channels={in_channels!r}, expected a non-empty list of positive channel counts")
        if out_channels <= 0:
            raise ValueError(f"FPN: out_channels={out_channels!r}, expected a positive channel count")
        if num_outs < len(in_channels):
            raise ValueError(
                f"FPN: num_outs={num_outs!r} < len(in_channels)={len(in_channels)}; expected one output per input "
                f"level at least (pick the backbone's out_indices to drop levels)"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.add_extra_convs = add_extra_convs
        self.relu_before_extra_convs = relu_before_extra_convs

        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) for _ in in_channels
        )
        if add_extra_convs:
            for _ in range(num_outs - len(in_channels)):
                self.fpn_convs.append(nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Build the pyramid.

        Args:
            features: ``len(in_channels)`` maps, finest first; level i is (N, in_channels[i], H_i, W_i) with
                H_i >= H_{i+1} (any sizes, e.g. ceil halvings of an odd image size).

        Returns:
            ``num_outs`` maps (N, out_channels, H'_j, W'_j): H'_j = H_j for the input levels, then each extra
            level ceil-halves the previous one.
        """
        if len(features) != len(self.in_channels):
            raise ValueError(f"FPN.forward: got {len(features)} feature maps, expected {len(self.in_channels)}")
        for i, (feat, channels) in enumerate(zip(features, self.in_channels)):
            if feat.dim() != 4 or feat.shape[1] != channels:
                raise ValueError(
                    f"FPN.forward: features[{i}] has shape {tuple(feat.shape)}, expected (N, {channels}, H, W)"
                )

        laterals = [conv(feat) for conv, feat in zip(self.lateral_convs, features)]
        # Top-down, coarsest first; out-of-place adds so autograd sees each lateral once.
        for i in range(len(laterals) - 1, 0, -1):
            upsampled = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + upsampled

        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]
        for j in range(len(self.in_channels), self.num_outs):
            if not self.add_extra_convs:
                # A 1x1 max-pool with stride 2 = take every other pixel; ceil(s / 2) sizes like the convs.
                outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
                continue
            source = outs[-1]
            if self.relu_before_extra_convs and j > len(self.in_channels):
                source = F.relu(source)
            outs.append(self.fpn_convs[j](source))
        return outs
