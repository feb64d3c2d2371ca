"""An independent, plain transcription of BEVFormer's official TEST-time forward, batch 1: the parity oracle.

What it transcribes: fundamentalvision/BEVFormer at commit 68e6af5 (2022-06-25, "init"), the code the released
bevformer_{tiny,small,base}_epoch_24.pth checkpoints match (encoder.py ``shift_ref_2d = ref_2d`` WITHOUT
``.clone()``; 6bcccec keeps it, 2f37d0d "V2" adds the clone), with the mmcv 1.4 / mmdet 2.x pieces it calls
(ResNet, FPN + ConvModule, MultiheadAttention, FFN, LearnedPositionalEncoding, multi_scale_deformable_attn_pytorch)
and torchvision's ``transforms.functional.rotate`` (tensor path, nearest, fill None).

Deliberately in the OFFICIAL structure: an ``nn.Module`` tree whose ``state_dict`` keys and shapes are exactly the
official checkpoint's (``img_backbone.*``, ``img_neck.*``, ``pts_bbox_head.*``), sequence-first tensors where the
official code is sequence-first, per-camera "rebatching" in spatial cross-attention, the previous BEV rotated per
sample in a Python loop, the in-place shift of the reference points. It shares no code with bevdeform's model; the
only bevdeform import is ``bevdeform.msda.ms_deform_attn_reference`` (the grid_sample formulation of the op,
tested against a brute-force loop in tests/test_msda.py), which is what mmcv's
``multi_scale_deformable_attn_pytorch`` computes.

Only what the test-time forward needs: no losses, no training branches, dropout layers present (for the key names)
but the module is meant for eval mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bevdeform.msda import ms_deform_attn_reference

POINT_CLOUD_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)  # lidar frame, every published config


@dataclass(frozen=True)
class OfficialVariant:
    """The published configs (projects/configs/bevformer/bevformer_{tiny,small,base}.py)."""

    depth: int
    out_indices: tuple[int, ...]
    neck_in_channels: tuple[int, ...]
    num_levels: int  # _num_levels_
    bev_h: int
    bev_w: int
    encoder_layers: int
    style: str = "pytorch"
    dcn_stages: tuple[bool, ...] = (False, False, False, False)


VARIANTS = {
    "tiny": OfficialVariant(depth=50, out_indices=(3,), neck_in_channels=(2048,), num_levels=1, bev_h=50, bev_w=50,
                            encoder_layers=3),
    "small": OfficialVariant(depth=101, out_indices=(3,), neck_in_channels=(2048,), num_levels=1, bev_h=150,
                             bev_w=150, encoder_layers=3, style="caffe", dcn_stages=(False, False, True, True)),
    "base": OfficialVariant(depth=101, out_indices=(1, 2, 3), neck_in_channels=(512, 1024, 2048), num_levels=4,
                            bev_h=200, bev_w=200, encoder_layers=6, style="caffe",
                            dcn_stages=(False, False, True, True)),
}
EMBED_DIMS = 256
FFN_DIMS = 512
NUM_QUERY = 900
NUM_CLASSES = 10
CODE_SIZE = 10
NUM_CAMS = 6


# ----------------------------------------------------------------------------------------------------------------
# mmdet ResNet (style 'pytorch': the 3x3 conv strides) and FPN
# ----------------------------------------------------------------------------------------------------------------
def _dmcn_bilinear(x, y, xx):
    """mmcv's ``dmcn_im2col_bilinear`` at pixel coordinates y, xx (N, Ho, Wo) of x (N, C, H, W): the four corners
    around floor(y), floor(x), each read only when inside the map, weighted (1 - ly)(1 - lx) ...; nothing where
    the point is not inside (-1, H) x (-1, W)."""
    n, c, h, w = x.shape
    inside_map = (y > -1) & (xx > -1) & (y < h) & (xx < w)
    y_low, x_low = torch.floor(y), torch.floor(xx)
    ly, lx = y - y_low, xx - x_low
    hy, hx = 1 - ly, 1 - lx
    flat = x.reshape(n, c, h * w)
    out = torch.zeros(n, c, *y.shape[1:], dtype=x.dtype, device=x.device)
    for cy, cx, weight in ((y_low, x_low, hy * hx), (y_low, x_low + 1, hy * lx), (y_low + 1, x_low, ly * hx),
                           (y_low + 1, x_low + 1, ly * lx)):
        valid = inside_map & (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)
        index = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).long().reshape(n, 1, -1).expand(n, c, -1)
        value = flat.gather(2, index).reshape(out.shape)
        out = out + (weight * valid)[:, None] * value
    return out


def modulated_deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation):
    """mmcv's modulated deformable convolution (DCNv2), groups 1, deform_groups 1, written from its im2col kernel:
    kernel point k = i * kw + j samples x at (h_out * stride - padding + i * dilation + offset[:, 2k],
    w_out * stride - padding + j * dilation + offset[:, 2k + 1]) bilinearly (`_dmcn_bilinear`), times mask[:, k];
    then the convolution's weighted sum over (channel, kernel point)."""
    n, c, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    h_out = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    w_out = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    rows = (torch.arange(h_out, dtype=x.dtype, device=x.device) * stride - padding)[None, :, None]
    cols = (torch.arange(w_out, dtype=x.dtype, device=x.device) * stride - padding)[None, None, :]
    samples = []
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            y = rows + i * dilation + offset[:, 2 * k]
            xx = cols + j * dilation + offset[:, 2 * k + 1]
            samples.append(_dmcn_bilinear(x, y.expand(-1, h_out, w_out), xx.expand(-1, h_out, w_out))
                           * mask[:, k:k + 1])
    columns = torch.stack(samples, dim=2)
    out = torch.einsum("nckhw,ock->nohw", columns, weight.reshape(out_channels, c, kh * kw))
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


class ModulatedDeformConv2dPack(nn.Module):
    """mmcv ModulatedDeformConv2dPack (as mmdet's ResNet builds it for dcn=DCNv2: bias False)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, dilation=1):
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.register_parameter("bias", None)
        self.conv_offset = nn.Conv2d(in_channels, 3 * kernel_size * kernel_size, kernel_size, stride=stride,
                                     padding=padding, dilation=dilation, bias=True)

    def forward(self, x):
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, style: str,
                 dcn: bool = False):
        super().__init__()
        # mmdet: 'pytorch' puts the stride on the 3x3 conv, 'caffe' on the first 1x1 conv
        conv1_stride, conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=conv1_stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        if dcn:
            self.conv2 = ModulatedDeformConv2dPack(planes, planes, 3, stride=conv2_stride, padding=1)
        else:
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=conv2_stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    arch_settings = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

    def __init__(self, depth: int, out_indices: tuple[int, ...], style: str = "pytorch",
                 dcn_stages: tuple[bool, ...] = (False, False, False, False)):
        super().__init__()
        self.out_indices = out_indices
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.res_layers = []
        inplanes = 64
        for i, num_blocks in enumerate(self.arch_settings[depth]):
            planes = 64 * 2 ** i
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
            dcn = dcn_stages[i]
            blocks = [Bottleneck(inplanes, planes, stride, downsample, style, dcn)]
            inplanes = planes * 4
            blocks += [Bottleneck(inplanes, planes, 1, None, style, dcn) for _ in range(1, num_blocks)]
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.res_layers.append(name)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


class ConvModule(nn.Module):
    """mmcv ConvModule without norm and activation (what FPN builds): only ``.conv``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=True)

    def forward(self, x):
        return self.conv(x)


class FPN(nn.Module):
    """mmdet FPN, start_level 0, add_extra_convs 'on_output', relu_before_extra_convs True."""

    def __init__(self, in_channels, out_channels, num_outs):
        super().__init__()
        self.num_ins = len(in_channels)
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for _ in range(num_outs - self.num_ins):
            self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, stride=2, padding=1))

    def forward(self, inputs):
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(self.num_ins - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        outs = [self.fpn_convs[i](laterals[i]) for i in range(self.num_ins)]
        if self.num_outs > len(outs):
            outs.append(self.fpn_convs[self.num_ins](outs[-1]))  # 'on_output'
            for i in range(self.num_ins + 1, self.num_outs):
                outs.append(self.fpn_convs[i](F.relu(outs[-1])))
        return tuple(outs)


# ----------------------------------------------------------------------------------------------------------------
# torchvision.transforms.functional.rotate (tensor, nearest, expand False, fill None)
# ----------------------------------------------------------------------------------------------------------------
def _get_inverse_affine_matrix(center, angle, translate, scale, shear):
    rot = math.radians(angle)
    sx, sy = [math.radians(s) for s in shear]
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix = [x / scale for x in matrix]
    matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
    matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
    matrix[2] += cx
    matrix[5] += cy
    return matrix


def _gen_affine_grid(theta, w, h, ow, oh):
    d = 0.5
    base_grid = torch.empty(1, oh, ow, 3, dtype=theta.dtype, device=theta.device)
    x_grid = torch.linspace(-ow * 0.5 + d, ow * 0.5 + d - 1, steps=ow, device=theta.device)
    base_grid[..., 0].copy_(x_grid)
    y_grid = torch.linspace(-oh * 0.5 + d, oh * 0.5 + d - 1, steps=oh, device=theta.device).unsqueeze_(-1)
    base_grid[..., 1].copy_(y_grid)
    base_grid[..., 2].fill_(1)
    rescaled_theta = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=theta.dtype, device=theta.device)
    output_grid = base_grid.view(1, oh * ow, 3).bmm(rescaled_theta)
    return output_grid.view(1, oh, ow, 2)


def tv_rotate(img, angle, center):
    """torchvision F.rotate(img (C, H, W) float tensor, angle degrees, center=[x, y])."""
    w, h = img.shape[-1], img.shape[-2]
    center_f = [1.0 * (c - s * 0.5) for c, s in zip(center, [w, h])]
    matrix = _get_inverse_affine_matrix(center_f, -angle, [0.0, 0.0], 1.0, [0.0, 0.0])
    theta = torch.tensor(matrix, dtype=img.dtype, device=img.device).reshape(1, 2, 3)
    grid = _gen_affine_grid(theta, w=w, h=h, ow=w, oh=h)
    out = F.grid_sample(img.unsqueeze(0), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.squeeze(0)


# ----------------------------------------------------------------------------------------------------------------
# Attention modules
# ----------------------------------------------------------------------------------------------------------------
def multi_scale_deformable_attn_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    areas = value_spatial_shapes[:, 0] * value_spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return ms_deform_attn_reference(value, value_spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights)


class TemporalSelfAttention(nn.Module):
    def __init__(self, embed_dims=256, num_heads=8, num_levels=1, num_points=4, num_bev_queue=2):
        super().__init__()
        self.embed_dims, self.num_heads, self.num_levels = embed_dims, num_heads, num_levels
        self.num_points, self.num_bev_queue = num_points, num_bev_queue
        self.dropout = nn.Dropout(0.1)
        self.sampling_offsets = nn.Linear(embed_dims * num_bev_queue,
                                          num_bev_queue * num_levels * num_heads * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims * num_bev_queue,
                                           num_bev_queue * num_levels * num_heads * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, query, key=None, value=None, identity=None, query_pos=None, reference_points=None,
                spatial_shapes=None, level_start_index=None):
        if value is None:
            bs, len_bev, c = query.shape
            value = torch.stack([query, query], 1).reshape(bs * 2, len_bev, c)
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        bs, num_query, embed_dims = query.shape
        _, num_value, _ = value.shape
        query = torch.cat([value[:bs], query], -1)
        value = self.value_proj(value)
        value = value.reshape(bs * self.num_bev_queue, num_value, self.num_heads, -1)
        sampling_offsets = self.sampling_offsets(query).view(
            bs, num_query, self.num_heads, self.num_bev_queue, self.num_levels, self.num_points, 2)
        attention_weights = self.attention_weights(query).view(
            bs, num_query, self.num_heads, self.num_bev_queue, self.num_levels * self.num_points)
        attention_weights = attention_weights.softmax(-1)
        attention_weights = attention_weights.view(bs, num_query, self.num_heads, self.num_bev_queue,
                                                   self.num_levels, self.num_points)
        attention_weights = attention_weights.permute(0, 3, 1, 2, 4, 5).reshape(
            bs * self.num_bev_queue, num_query, self.num_heads, self.num_levels, self.num_points).contiguous()
        sampling_offsets = sampling_offsets.permute(0, 3, 1, 2, 4, 5, 6).reshape(
            bs * self.num_bev_queue, num_query, self.num_heads, self.num_levels, self.num_points, 2)
        offset_normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        sampling_locations = reference_points[:, :, None, :, None, :] \
            + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        output = multi_scale_deformable_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
        output = output.permute(1, 2, 0)
        output = output.view(num_query, embed_dims, bs, self.num_bev_queue)
        output = output.mean(-1)
        output = output.permute(2, 0, 1)
        output = self.output_proj(output)
        return self.dropout(output) + identity


class MSDeformableAttention3D(nn.Module):
    def __init__(self, embed_dims=256, num_heads=8, num_levels=4, num_points=8):
        super().__init__()
        self.embed_dims, self.num_heads, self.num_levels, self.num_points = embed_dims, num_heads, num_levels, \
            num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = None

    def forward(self, query, value, reference_points, spatial_shapes):
        bs, num_query, _ = query.shape
        bs, num_value, _ = value.shape
        value = self.value_proj(value).view(bs, num_value, self.num_heads, -1)
        sampling_offsets = self.sampling_offsets(query).view(
            bs, num_query, self.num_heads, self.num_levels, self.num_points, 2)
        attention_weights = self.attention_weights(query).view(
            bs, num_query, self.num_heads, self.num_levels * self.num_points).softmax(-1)
        attention_weights = attention_weights.view(bs, num_query, self.num_heads, self.num_levels, self.num_points)
        offset_normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        bs, num_query, num_z_anchors, xy = reference_points.shape
        reference_points = reference_points[:, :, None, None, None, :, :]
        sampling_offsets = sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        bs, num_query, num_heads, num_levels, num_all_points, xy = sampling_offsets.shape
        sampling_offsets = sampling_offsets.view(bs, num_query, num_heads, num_levels,
                                                 num_all_points // num_z_anchors, num_z_anchors, xy)
        sampling_locations = reference_points + sampling_offsets
        sampling_locations = sampling_locations.view(bs, num_query, num_heads, num_levels, num_all_points, xy)
        return multi_scale_deformable_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)


class SpatialCrossAttention(nn.Module):
    def __init__(self, embed_dims=256, num_cams=6, num_levels=1, num_points=8):
        super().__init__()
        self.dropout = nn.Dropout(0.1)
        self.deformable_attention = MSDeformableAttention3D(embed_dims, 8, num_levels, num_points)
        self.embed_dims, self.num_cams = embed_dims, num_cams
        self.output_proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, query, key, value, spatial_shapes=None, reference_points_cam=None, bev_mask=None):
        inp_residual = query
        slots = torch.zeros_like(query)
        bs, num_query, _ = query.size()
        D = reference_points_cam.size(3)
        indexes = []
        for i, mask_per_img in enumerate(bev_mask):
            index_query_per_img = mask_per_img[0].sum(-1).nonzero().squeeze(-1)
            indexes.append(index_query_per_img)
        max_len = max([len(each) for each in indexes])
        queries_rebatch = query.new_zeros([bs, self.num_cams, max_len, self.embed_dims])
        reference_points_rebatch = reference_points_cam.new_zeros([bs, self.num_cams, max_len, D, 2])
        for j in range(bs):
            for i, reference_points_per_img in enumerate(reference_points_cam):
                index_query_per_img = indexes[i]
                queries_rebatch[j, i, :len(index_query_per_img)] = query[j, index_query_per_img]
                reference_points_rebatch[j, i, :len(index_query_per_img)] = \
                    reference_points_per_img[j, index_query_per_img]
        num_cams, l, bs, embed_dims = key.shape
        value = value.permute(2, 0, 1, 3).reshape(bs * self.num_cams, l, self.embed_dims)
        queries = self.deformable_attention(
            query=queries_rebatch.view(bs * self.num_cams, max_len, self.embed_dims), value=value,
            reference_points=reference_points_rebatch.view(bs * self.num_cams, max_len, D, 2),
            spatial_shapes=spatial_shapes).view(bs, self.num_cams, max_len, self.embed_dims)
        for j in range(bs):
            for i, index_query_per_img in enumerate(indexes):
                slots[j, index_query_per_img] += queries[j, i, :len(index_query_per_img)]
        count = bev_mask.sum(-1) > 0
        count = count.permute(1, 2, 0).sum(-1)
        count = torch.clamp(count, min=1.0)
        slots = slots / count[..., None]
        slots = self.output_proj(slots)
        return self.dropout(slots) + inp_residual


class FFN(nn.Module):
    """mmcv FFN: layers = Sequential(Sequential(Linear, ReLU, Dropout), Linear, Dropout); identity added."""

    def __init__(self, embed_dims=256, feedforward_channels=512):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(0.1)),
            nn.Linear(feedforward_channels, embed_dims), nn.Dropout(0.1))
        self.dropout_layer = nn.Identity()

    def forward(self, x, identity=None):
        out = self.layers(x)
        if identity is None:
            identity = x
        return identity + self.dropout_layer(out)


class BEVFormerLayer(nn.Module):
    def __init__(self, num_levels):
        super().__init__()
        self.attentions = nn.ModuleList([TemporalSelfAttention(EMBED_DIMS, 8, 1, 4),
                                         SpatialCrossAttention(EMBED_DIMS, NUM_CAMS, num_levels, 8)])
        self.ffns = nn.ModuleList([FFN(EMBED_DIMS, FFN_DIMS)])
        self.norms = nn.ModuleList([nn.LayerNorm(EMBED_DIMS) for _ in range(3)])

    def forward(self, query, key, value, bev_pos, ref_2d, bev_h, bev_w, spatial_shapes, reference_points_cam,
                bev_mask, prev_bev):
        # operation_order = ('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm'), post-norm
        query = self.attentions[0](query, prev_bev, prev_bev, None, query_pos=bev_pos, reference_points=ref_2d,
                                   spatial_shapes=torch.tensor([[bev_h, bev_w]], device=query.device),
                                   level_start_index=torch.tensor([0], device=query.device))
        query = self.norms[0](query)
        query = self.attentions[1](query, key, value, spatial_shapes=spatial_shapes,
                                   reference_points_cam=reference_points_cam, bev_mask=bev_mask)
        query = self.norms[1](query)
        query = self.ffns[0](query, None)
        return self.norms[2](query)


class BEVFormerEncoder(nn.Module):
    def __init__(self, num_layers, num_levels, pc_range=POINT_CLOUD_RANGE, num_points_in_pillar=4):
        super().__init__()
        self.layers = nn.ModuleList(BEVFormerLayer(num_levels) for _ in range(num_layers))
        self.pc_range = pc_range
        self.num_points_in_pillar = num_points_in_pillar

    @staticmethod
    def get_reference_points(H, W, Z=8, num_points_in_pillar=4, dim="3d", bs=1, device="cpu", dtype=torch.float):
        if dim == "3d":
            zs = torch.linspace(0.5, Z - 0.5, num_points_in_pillar, dtype=dtype, device=device).view(-1, 1, 1).expand(
                num_points_in_pillar, H, W) / Z
            xs = torch.linspace(0.5, W - 0.5, W, dtype=dtype, device=device).view(1, 1, W).expand(
                num_points_in_pillar, H, W) / W
            ys = torch.linspace(0.5, H - 0.5, H, dtype=dtype, device=device).view(1, H, 1).expand(
                num_points_in_pillar, H, W) / H
            ref_3d = torch.stack((xs, ys, zs), -1)
            ref_3d = ref_3d.permute(0, 3, 1, 2).flatten(2).permute(0, 2, 1)
            return ref_3d[None].repeat(bs, 1, 1, 1)
        ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, H - 0.5, H, dtype=dtype, device=device),
                                      torch.linspace(0.5, W - 0.5, W, dtype=dtype, device=device), indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / H
        ref_x = ref_x.reshape(-1)[None] / W
        ref_2d = torch.stack((ref_x, ref_y), -1)
        return ref_2d.repeat(bs, 1, 1).unsqueeze(2)

    @staticmethod
    def point_sampling(reference_points, pc_range, lidar2img_np, img_shape):
        lidar2img = reference_points.new_tensor(np.asarray(lidar2img_np))  # (B, N, 4, 4)
        reference_points = reference_points.clone()
        reference_points[..., 0:1] = reference_points[..., 0:1] * (pc_range[3] - pc_range[0]) + pc_range[0]
        reference_points[..., 1:2] = reference_points[..., 1:2] * (pc_range[4] - pc_range[1]) + pc_range[1]
        reference_points[..., 2:3] = reference_points[..., 2:3] * (pc_range[5] - pc_range[2]) + pc_range[2]
        reference_points = torch.cat((reference_points, torch.ones_like(reference_points[..., :1])), -1)
        reference_points = reference_points.permute(1, 0, 2, 3)
        D, B, num_query = reference_points.size()[:3]
        num_cam = lidar2img.size(1)
        reference_points = reference_points.view(D, B, 1, num_query, 4).repeat(1, 1, num_cam, 1, 1).unsqueeze(-1)
        lidar2img = lidar2img.view(1, B, num_cam, 1, 4, 4).repeat(D, 1, 1, num_query, 1, 1)
        reference_points_cam = torch.matmul(lidar2img.to(torch.float32),
                                            reference_points.to(torch.float32)).squeeze(-1)
        eps = 1e-5
        bev_mask = reference_points_cam[..., 2:3] > eps
        reference_points_cam = reference_points_cam[..., 0:2] / torch.maximum(
            reference_points_cam[..., 2:3], torch.ones_like(reference_points_cam[..., 2:3]) * eps)
        reference_points_cam[..., 0] /= img_shape[1]
        reference_points_cam[..., 1] /= img_shape[0]
        bev_mask = (bev_mask & (reference_points_cam[..., 1:2] > 0.0) & (reference_points_cam[..., 1:2] < 1.0)
                    & (reference_points_cam[..., 0:1] < 1.0) & (reference_points_cam[..., 0:1] > 0.0))
        bev_mask = torch.nan_to_num(bev_mask)
        reference_points_cam = reference_points_cam.permute(2, 1, 3, 0, 4)
        bev_mask = bev_mask.permute(2, 1, 3, 0, 4).squeeze(-1)
        return reference_points_cam, bev_mask

    def forward(self, bev_query, key, value, bev_h, bev_w, bev_pos, spatial_shapes, prev_bev, shift, lidar2img,
                img_shape):
        ref_3d = self.get_reference_points(bev_h, bev_w, self.pc_range[5] - self.pc_range[2],
                                           self.num_points_in_pillar, dim="3d", bs=bev_query.size(1),
                                           device=bev_query.device, dtype=bev_query.dtype)
        ref_2d = self.get_reference_points(bev_h, bev_w, dim="2d", bs=bev_query.size(1), device=bev_query.device,
                                           dtype=bev_query.dtype)
        reference_points_cam, bev_mask = self.point_sampling(ref_3d, self.pc_range, lidar2img, img_shape)
        # The released checkpoints' code: no .clone(), so the += below also shifts ref_2d (both queues).
        shift_ref_2d = ref_2d
        shift_ref_2d += shift[:, None, None, :]
        bev_query = bev_query.permute(1, 0, 2)
        bev_pos = bev_pos.permute(1, 0, 2)
        bs, len_bev, num_bev_level, _ = ref_2d.shape
        if prev_bev is not None:
            prev_bev = prev_bev.permute(1, 0, 2)
            prev_bev = torch.stack([prev_bev, bev_query], 1).reshape(bs * 2, len_bev, -1)
            hybird_ref_2d = torch.stack([shift_ref_2d, ref_2d], 1).reshape(bs * 2, len_bev, num_bev_level, 2)
        else:
            hybird_ref_2d = torch.stack([ref_2d, ref_2d], 1).reshape(bs * 2, len_bev, num_bev_level, 2)
        output = bev_query
        for layer in self.layers:
            output = layer(bev_query, key, value, bev_pos=bev_pos, ref_2d=hybird_ref_2d, bev_h=bev_h, bev_w=bev_w,
                           spatial_shapes=spatial_shapes, reference_points_cam=reference_points_cam,
                           bev_mask=bev_mask, prev_bev=prev_bev)
            bev_query = output
        return output


class MultiheadAttention(nn.Module):
    """mmcv MultiheadAttention (batch_first False)."""

    def __init__(self, embed_dims=256, num_heads=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=0.1)
        self.proj_drop = nn.Dropout(0.0)
        self.dropout_layer = nn.Dropout(0.1)

    def forward(self, query, key=None, value=None, identity=None, query_pos=None, key_pos=None):
        if key is None:
            key = query
        if value is None:
            value = key
        if identity is None:
            identity = query
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        out = self.attn(query=query, key=key, value=value, attn_mask=None, key_padding_mask=None)[0]
        return identity + self.dropout_layer(self.proj_drop(out))


class CustomMSDeformableAttention(nn.Module):
    def __init__(self, embed_dims=256, num_heads=8, num_levels=1, num_points=4):
        super().__init__()
        self.embed_dims, self.num_heads, self.num_levels, self.num_points = embed_dims, num_heads, num_levels, \
            num_points
        self.dropout = nn.Dropout(0.1)
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, query, value, query_pos, reference_points, spatial_shapes):
        identity = query
        query = query + query_pos
        query = query.permute(1, 0, 2)  # batch_first False
        value = value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        bs, num_value, _ = value.shape
        value = self.value_proj(value).view(bs, num_value, self.num_heads, -1)
        sampling_offsets = self.sampling_offsets(query).view(bs, num_query, self.num_heads, self.num_levels,
                                                             self.num_points, 2)
        attention_weights = self.attention_weights(query).view(bs, num_query, self.num_heads,
                                                               self.num_levels * self.num_points).softmax(-1)
        attention_weights = attention_weights.view(bs, num_query, self.num_heads, self.num_levels, self.num_points)
        offset_normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        sampling_locations = reference_points[:, :, None, :, None, :] \
            + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        output = multi_scale_deformable_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
        output = self.output_proj(output).permute(1, 0, 2)
        return self.dropout(output) + identity


class DetrTransformerDecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attentions = nn.ModuleList([MultiheadAttention(EMBED_DIMS, 8),
                                         CustomMSDeformableAttention(EMBED_DIMS, 8, 1, 4)])
        self.ffns = nn.ModuleList([FFN(EMBED_DIMS, FFN_DIMS)])
        self.norms = nn.ModuleList([nn.LayerNorm(EMBED_DIMS) for _ in range(3)])

    def forward(self, query, value, query_pos, reference_points, spatial_shapes):
        query = self.attentions[0](query, query, query, None, query_pos=query_pos, key_pos=query_pos)
        query = self.norms[0](query)
        query = self.attentions[1](query, value, query_pos, reference_points, spatial_shapes)
        query = self.norms[1](query)
        query = self.ffns[0](query, None)
        return self.norms[2](query)


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


class DetectionTransformerDecoder(nn.Module):
    def __init__(self, num_layers=6):
        super().__init__()
        self.layers = nn.ModuleList(DetrTransformerDecoderLayer() for _ in range(num_layers))

    def forward(self, query, value, query_pos, reference_points, reg_branches, spatial_shapes):
        output = query
        intermediate, intermediate_reference_points = [], []
        for lid, layer in enumerate(self.layers):
            reference_points_input = reference_points[..., :2].unsqueeze(2)
            output = layer(output, value, query_pos, reference_points_input, spatial_shapes)
            output = output.permute(1, 0, 2)
            tmp = reg_branches[lid](output)
            new_reference_points = torch.zeros_like(reference_points)
            new_reference_points[..., :2] = tmp[..., :2] + inverse_sigmoid(reference_points[..., :2])
            new_reference_points[..., 2:3] = tmp[..., 4:5] + inverse_sigmoid(reference_points[..., 2:3])
            reference_points = new_reference_points.sigmoid().detach()
            output = output.permute(1, 0, 2)
            intermediate.append(output)
            intermediate_reference_points.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_reference_points)


class PerceptionTransformer(nn.Module):
    def __init__(self, encoder_layers, num_levels, num_feature_levels=4, num_cams=6, rotate_center=(100, 100)):
        super().__init__()
        self.encoder = BEVFormerEncoder(encoder_layers, num_levels)
        self.decoder = DetectionTransformerDecoder(6)
        self.embed_dims = EMBED_DIMS
        self.rotate_center = list(rotate_center)
        self.level_embeds = nn.Parameter(torch.Tensor(num_feature_levels, EMBED_DIMS))
        self.cams_embeds = nn.Parameter(torch.Tensor(num_cams, EMBED_DIMS))
        self.reference_points = nn.Linear(EMBED_DIMS, 3)
        self.can_bus_mlp = nn.Sequential(nn.Linear(18, EMBED_DIMS // 2), nn.ReLU(inplace=True),
                                         nn.Linear(EMBED_DIMS // 2, EMBED_DIMS), nn.ReLU(inplace=True))
        self.can_bus_mlp.add_module("norm", nn.LayerNorm(EMBED_DIMS))

    def get_bev_features(self, mlvl_feats, bev_queries, bev_h, bev_w, grid_length, bev_pos, prev_bev, img_metas):
        bs = mlvl_feats[0].size(0)
        bev_queries = bev_queries.unsqueeze(1).repeat(1, bs, 1)
        bev_pos = bev_pos.flatten(2).permute(2, 0, 1)
        delta_x = np.array([each["can_bus"][0] for each in img_metas])
        delta_y = np.array([each["can_bus"][1] for each in img_metas])
        ego_angle = np.array([each["can_bus"][-2] / np.pi * 180 for each in img_metas])
        grid_length_y, grid_length_x = grid_length
        translation_length = np.sqrt(delta_x ** 2 + delta_y ** 2)
        translation_angle = np.arctan2(delta_y, delta_x) / np.pi * 180
        bev_angle = ego_angle - translation_angle
        shift_y = translation_length * np.cos(bev_angle / 180 * np.pi) / grid_length_y / bev_h
        shift_x = translation_length * np.sin(bev_angle / 180 * np.pi) / grid_length_x / bev_w
        shift = bev_queries.new_tensor(np.array([shift_x, shift_y])).permute(1, 0)  # xy, bs -> bs, xy
        if prev_bev is not None:
            if prev_bev.shape[1] == bev_h * bev_w:
                prev_bev = prev_bev.permute(1, 0, 2)
            prev_bev = prev_bev.clone()  # the official code rotates the caller's tensor in place; spare ours
            for i in range(bs):
                rotation_angle = img_metas[i]["can_bus"][-1]
                tmp_prev_bev = prev_bev[:, i].reshape(bev_h, bev_w, -1).permute(2, 0, 1)
                tmp_prev_bev = tv_rotate(tmp_prev_bev, float(rotation_angle), center=self.rotate_center)
                tmp_prev_bev = tmp_prev_bev.permute(1, 2, 0).reshape(bev_h * bev_w, 1, -1)
                prev_bev[:, i] = tmp_prev_bev[:, 0]
        can_bus = bev_queries.new_tensor(np.array([each["can_bus"] for each in img_metas]))
        can_bus = self.can_bus_mlp(can_bus)[None, :, :]
        bev_queries = bev_queries + can_bus
        feat_flatten, spatial_shapes = [], []
        for lvl, feat in enumerate(mlvl_feats):
            bs, num_cam, c, h, w = feat.shape
            spatial_shapes.append((h, w))
            feat = feat.flatten(3).permute(1, 0, 3, 2)
            feat = feat + self.cams_embeds[:, None, None, :].to(feat.dtype)
            feat = feat + self.level_embeds[None, None, lvl:lvl + 1, :].to(feat.dtype)
            feat_flatten.append(feat)
        feat_flatten = torch.cat(feat_flatten, 2)
        spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=bev_pos.device)
        feat_flatten = feat_flatten.permute(0, 2, 1, 3)  # (num_cam, H*W, bs, embed_dims)
        return self.encoder(bev_queries, feat_flatten, feat_flatten, bev_h=bev_h, bev_w=bev_w, bev_pos=bev_pos,
                            spatial_shapes=spatial_shapes, prev_bev=prev_bev, shift=shift,
                            lidar2img=[m["lidar2img"] for m in img_metas], img_shape=img_metas[0]["img_shape"][0])

    def forward(self, mlvl_feats, bev_queries, object_query_embed, bev_h, bev_w, grid_length, bev_pos, reg_branches,
                prev_bev, img_metas):
        bev_embed = self.get_bev_features(mlvl_feats, bev_queries, bev_h, bev_w, grid_length, bev_pos, prev_bev,
                                          img_metas)
        bs = mlvl_feats[0].size(0)
        query_pos, query = torch.split(object_query_embed, self.embed_dims, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
        query = query.unsqueeze(0).expand(bs, -1, -1)
        reference_points = self.reference_points(query_pos).sigmoid()
        init_reference_out = reference_points
        query = query.permute(1, 0, 2)
        query_pos = query_pos.permute(1, 0, 2)
        bev_embed = bev_embed.permute(1, 0, 2)
        inter_states, inter_references = self.decoder(query, bev_embed, query_pos, reference_points, reg_branches,
                                                      torch.tensor([[bev_h, bev_w]], device=query.device))
        return bev_embed, inter_states, init_reference_out, inter_references


class LearnedPositionalEncoding(nn.Module):
    def __init__(self, num_feats, row_num_embed, col_num_embed):
        super().__init__()
        self.row_embed = nn.Embedding(row_num_embed, num_feats)
        self.col_embed = nn.Embedding(col_num_embed, num_feats)

    def forward(self, mask):
        h, w = mask.shape[-2:]
        x = torch.arange(w, device=mask.device)
        y = torch.arange(h, device=mask.device)
        x_embed = self.col_embed(x)
        y_embed = self.row_embed(y)
        pos = torch.cat((x_embed.unsqueeze(0).repeat(h, 1, 1), y_embed.unsqueeze(1).repeat(1, w, 1)),
                        dim=-1).permute(2, 0, 1).unsqueeze(0).repeat(mask.shape[0], 1, 1, 1)
        return pos


class BEVFormerHead(nn.Module):
    def __init__(self, variant: OfficialVariant, pc_range=POINT_CLOUD_RANGE):
        super().__init__()
        self.bev_h, self.bev_w = variant.bev_h, variant.bev_w
        self.pc_range = pc_range
        self.real_h = pc_range[3] - pc_range[0]
        self.real_w = pc_range[4] - pc_range[1]
        self.code_weights = nn.Parameter(torch.tensor([1.0] * 8 + [0.2, 0.2]), requires_grad=False)
        self.positional_encoding = LearnedPositionalEncoding(EMBED_DIMS // 2, self.bev_h, self.bev_w)
        self.transformer = PerceptionTransformer(variant.encoder_layers, variant.num_levels)
        cls_branch = []
        for _ in range(2):
            cls_branch += [nn.Linear(EMBED_DIMS, EMBED_DIMS), nn.LayerNorm(EMBED_DIMS), nn.ReLU(inplace=True)]
        cls_branch.append(nn.Linear(EMBED_DIMS, NUM_CLASSES))
        reg_branch = []
        for _ in range(2):
            reg_branch += [nn.Linear(EMBED_DIMS, EMBED_DIMS), nn.ReLU()]
        reg_branch.append(nn.Linear(EMBED_DIMS, CODE_SIZE))
        num_pred = 6
        self.cls_branches = nn.ModuleList(_clone(nn.Sequential(*cls_branch)) for _ in range(num_pred))
        self.reg_branches = nn.ModuleList(_clone(nn.Sequential(*reg_branch)) for _ in range(num_pred))
        self.bev_embedding = nn.Embedding(self.bev_h * self.bev_w, EMBED_DIMS)
        self.query_embedding = nn.Embedding(NUM_QUERY, EMBED_DIMS * 2)

    def forward(self, mlvl_feats, img_metas, prev_bev=None):
        bs = mlvl_feats[0].shape[0]
        dtype = mlvl_feats[0].dtype
        object_query_embeds = self.query_embedding.weight.to(dtype)
        bev_queries = self.bev_embedding.weight.to(dtype)
        bev_mask = torch.zeros((bs, self.bev_h, self.bev_w), device=bev_queries.device).to(dtype)
        bev_pos = self.positional_encoding(bev_mask).to(dtype)
        bev_embed, hs, init_reference, inter_references = self.transformer(
            mlvl_feats, bev_queries, object_query_embeds, self.bev_h, self.bev_w,
            grid_length=(self.real_h / self.bev_h, self.real_w / self.bev_w), bev_pos=bev_pos,
            reg_branches=self.reg_branches, prev_bev=prev_bev, img_metas=img_metas)
        hs = hs.permute(0, 2, 1, 3)
        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = init_reference if lvl == 0 else inter_references[lvl - 1]
            reference = inverse_sigmoid(reference)
            outputs_class = self.cls_branches[lvl](hs[lvl])
            tmp = self.reg_branches[lvl](hs[lvl])
            tmp[..., 0:2] += reference[..., 0:2]
            tmp[..., 0:2] = tmp[..., 0:2].sigmoid()
            tmp[..., 4:5] += reference[..., 2:3]
            tmp[..., 4:5] = tmp[..., 4:5].sigmoid()
            tmp[..., 0:1] = tmp[..., 0:1] * (self.pc_range[3] - self.pc_range[0]) + self.pc_range[0]
            tmp[..., 1:2] = tmp[..., 1:2] * (self.pc_range[4] - self.pc_range[1]) + self.pc_range[1]
            tmp[..., 4:5] = tmp[..., 4:5] * (self.pc_range[5] - self.pc_range[2]) + self.pc_range[2]
            outputs_classes.append(outputs_class)
            outputs_coords.append(tmp)
        return {"bev_embed": bev_embed, "all_cls_scores": torch.stack(outputs_classes),
                "all_bbox_preds": torch.stack(outputs_coords)}


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


class OfficialBEVFormer(nn.Module):
    """The detector: img_backbone (mmdet ResNet), img_neck (mmdet FPN), pts_bbox_head (BEVFormerHead)."""

    def __init__(self, variant: str = "tiny", bev_hw: tuple[int, int] | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}, expected one of {sorted(VARIANTS)}")
        v = VARIANTS[variant]
        if bev_hw is not None:  # a reduced BEV grid for fast tests (the official code takes any bev_h, bev_w)
            v = OfficialVariant(**{**v.__dict__, "bev_h": int(bev_hw[0]), "bev_w": int(bev_hw[1])})
        self.variant = v
        self.img_backbone = ResNet(v.depth, v.out_indices, v.style, v.dcn_stages)
        self.img_neck = FPN(list(v.neck_in_channels), EMBED_DIMS, v.num_levels)
        self.pts_bbox_head = BEVFormerHead(v)

    def extract_img_feat(self, img):
        B = img.size(0)
        img = img.reshape(B * img.size(1), *img.shape[2:])
        img_feats = self.img_neck(self.img_backbone(img))
        return [f.view(B, int(f.size(0) / B), *f.shape[1:]) for f in img_feats]

    @torch.no_grad()
    def simple_test(self, img, lidar2img, img_shape_hw, can_bus, prev_bev=None):
        """One frame as ``BEVFormer.simple_test`` runs it (batch 1).

        Args:
            img: (1, N, 3, H, W) normalised, padded. lidar2img: (1, N, 4, 4) (numpy or tensor).
            img_shape_hw: the padded (H, W) (img_metas 'img_shape'). can_bus: (18,) numpy float64 AFTER the
            detector's delta step (forward_test). prev_bev: None or the previous call's ``bev_embed``.
        Returns:
            dict: bev_embed (H*W, 1, C) as the official head returns it, all_cls_scores (6, 1, 900, 10),
            all_bbox_preds (6, 1, 900, 10).
        """
        lidar2img = np.asarray(lidar2img.cpu() if isinstance(lidar2img, torch.Tensor) else lidar2img)[0]
        can_bus = np.asarray(can_bus.cpu() if isinstance(can_bus, torch.Tensor) else can_bus,
                             dtype=np.float64).reshape(18)
        img_metas = [{"can_bus": can_bus, "lidar2img": lidar2img,
                      "img_shape": [(int(img_shape_hw[0]), int(img_shape_hw[1]), 3)] * NUM_CAMS}]
        feats = self.extract_img_feat(img)
        return self.pts_bbox_head(feats, img_metas, prev_bev=prev_bev)


def devkit_boxes_from_bbox_preds(bbox_preds: torch.Tensor) -> torch.Tensor:
    """(..., 10) official box codes -> (..., 9) nuScenes devkit boxes in the lidar frame, every query, no top-k.

    NMSFreeCoder's denormalize_bbox (exp sizes, atan2 yaw), get_bboxes' ``z - h / 2`` (bottom centre) into
    LiDARInstance3DBoxes (mmdet3d 0.17: dims (w, l, h), gravity centre = bottom + h / 2), then mmdet3d 0.17's
    output_to_nusc_box: ``NuScenesBox(gravity_center, dims, Quaternion(axis=[0, 0, 1], radians=-yaw - pi/2),
    velocity=(vx, vy, 0))``. Returned as [x, y, z (centre), w, l, h, devkit yaw, vx, vy].
    """
    rot = torch.atan2(bbox_preds[..., 6:7], bbox_preds[..., 7:8])
    cx, cy, cz = bbox_preds[..., 0:1], bbox_preds[..., 1:2], bbox_preds[..., 4:5]
    w, l, h = bbox_preds[..., 2:3].exp(), bbox_preds[..., 3:4].exp(), bbox_preds[..., 5:6].exp()
    bottom_z = cz - h * 0.5
    gravity_z = bottom_z + h * 0.5
    yaw_devkit = -rot - np.pi / 2
    return torch.cat([cx, cy, gravity_z, w, l, h, yaw_devkit, bbox_preds[..., 8:9], bbox_preds[..., 9:10]], dim=-1)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial random values in every parameter and BN buffer, so no option can hide behind a zero or a one.

    Linear/embedding weights ~ N(0, 0.02) plus N(0, 0.02) biases, with the deformable sampling offsets' biases
    N(0, 2) pixels; convs He-normal (so ResNet features neither vanish nor explode); LayerNorm / BatchNorm weights
    1 + N(0, 0.1), biases N(0, 0.1); BN running statistics random (mean N(0, 0.1), var U(0.5, 1.5)); the BEV and
    object query embeddings and the level / camera embeddings N(0, 1) as their official init.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(t, std, mean=0.0):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * std + mean)

    for name, module in model.named_modules():
        if isinstance(module, ModulatedDeformConv2dPack):
            normal(module.weight, math.sqrt(2.0 / module.weight[0].numel()))
        elif isinstance(module, nn.Conv2d) and name.endswith("conv_offset"):
            # offsets and mask logits ~N(0, 0.5) per channel plus a smaller position-dependent part: sub-pixel
            # offsets that vary over the image (larger ones make the random ResNet-101-DCN chaotic in float32)
            normal(module.weight, 0.002)
            normal(module.bias, 0.5)
        elif isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            normal(module.weight, math.sqrt(2.0 / fan_in))
            if module.bias is not None:
                normal(module.bias, 0.02)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            normal(module.weight, 0.1, 1.0)
            normal(module.bias, 0.1)
            if isinstance(module, nn.BatchNorm2d):
                normal(module.running_mean, 0.1)
                with torch.no_grad():
                    module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
        elif isinstance(module, nn.Linear):
            normal(module.weight, 0.02)
            normal(module.bias, 2.0 if name.endswith("sampling_offsets") else 0.02)
        elif isinstance(module, nn.Embedding):
            normal(module.weight, 1.0)
        elif isinstance(module, nn.MultiheadAttention):
            normal(module.in_proj_weight, 0.05)
            normal(module.in_proj_bias, 0.02)
    for name, param in model.named_parameters(recurse=True):
        if name.endswith(("level_embeds", "cams_embeds")):
            normal(param, 1.0)
    return model


@torch.no_grad()
def calibrate_batchnorm_(backbone: nn.Module, images: torch.Tensor) -> nn.Module:
    """Replace every BN's running statistics by the statistics of its input on ``images`` (N, 3, H, W) (one pass
    in train mode, cumulative averages), layer after layer, then back to eval mode.

    Random BN statistics do not normalise anything: activations then grow stage after stage, the DCNv2 offsets
    (computed from them) reach many pixels, and the network becomes chaotic: float32 rounding differences of
    1e-7 between two correct implementations grow to 1e-1 through ResNet-101's 26 DCN blocks (float64 agrees to
    1e-14). Calibrated statistics keep activations O(1), as in a trained network.
    """
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    backbone.train()
    backbone(images)
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return backbone.eval()
