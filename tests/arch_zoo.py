"""The architectures people ship, as small seeded PyTorch models (helpers for ``test_arch_zoo.py``, not tests).

torchvision's wheel here is a CUDA build that does not import next to the CPU torch, so its blocks are written
out below, following torchvision's code (in-place residual ``out += identity``, ``nn.ReLU(inplace=True)``
modules reused inside a block, ``torch.flatten(x, 1)`` heads). Hugging Face models come from tiny configs
(no download). Every model:

* is built from ``torch.manual_seed(SEED)`` and returned in eval mode;
* has its BatchNorm statistics re-estimated on a few batches of the zoo's own input distribution (BatchNorm
  modules alone in train mode, ``momentum=None``: the cumulative mean), with non-trivial affine parameters,
  so activations are neither dead nor exploding — see :func:`recalibrate_batchnorm`;
* ends in a non-zero head (default or widened initialisation), so its outputs vary across rows
  (:func:`assert_outputs_vary`, run by the test fixture).

A :class:`Case` names a model, how its inputs are drawn and, for token models, whether it is the ``input_ids``
export (integer input; explained at the word-embedding output) or the ``inputs_embeds`` export of the *same*
weights. ``CASES`` lists them all; ``export(case, exporter, folder)`` exports through
``converters.export_torch`` and caches the file in ``folder``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
N, M = 3, 5  # rows explained, background rows
K = 3  # classes of the classification heads
IMAGE = (3, 16, 16)  # CNN blocks
L, D = 6, 16  # sequence length and width of the attention blocks and the Hugging Face models
VOCAB = 24
EXPORTERS = ("torchscript", "dynamo")
# Each exporter at its native opset. The dynamo exporter writes opset 18 and converts down otherwise; at 17
# its conversion leaves Split's opset-18 ``num_outputs`` attribute on GPT-2's qkv split (ONNX Runtime:
# "Unrecognized attribute: num_outputs for operator Split").
OPSETS = {"torchscript": 17, "dynamo": 18}


# --------------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------------


def recalibrate_batchnorm(model: nn.Module, draw: Callable[[int], list[torch.Tensor]], batches: int = 4,
                          rows: int = 32) -> nn.Module:
    """Give every BatchNorm random affine parameters and the running statistics of the data it sees.

    The affine parameters are drawn as ``γ ~ U(0.5, 1.5)``, ``β ~ N(0, 0.2²)`` (a trained network's are not
    1 and 0). Then, with only the BatchNorm modules in train mode and ``momentum=None`` (cumulative average),
    ``batches`` forward passes over ``draw(rows)`` set ``running_mean``/``running_var`` to the statistics of the
    activations the model actually produces. The model is returned in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    if not norms:
        return model
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for _ in range(batches):
            model(*draw(rows))
    for bn in norms:
        bn.momentum = 0.1
    return model.eval()


def assert_outputs_vary(outputs: np.ndarray, what: str, spread: float = 1e-2) -> None:
    """Every output column must move across rows by more than ``spread`` times the outputs' magnitude.

    A model whose output is (nearly) constant makes additivity and agreement vacuous.
    """
    outputs = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    assert np.isfinite(outputs).all(), f"{what}: the model's outputs are not finite"
    scale = max(float(np.abs(outputs).max()), 1e-12)
    ranges = outputs.max(0) - outputs.min(0)
    worst = int(ranges.argmin())
    assert ranges[worst] > spread * scale, (
        f"{what}: output {worst} barely varies across {len(outputs)} rows (range {ranges[worst]:.3g}, "
        f"outputs up to {scale:.3g}): the model is degenerate, its explanation would prove nothing")


# --------------------------------------------------------------------------------------------------
# torchvision-style CNN blocks
# --------------------------------------------------------------------------------------------------


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision ``resnet.BasicBlock``: conv-bn-relu-conv-bn, ``out += identity``, one reused in-place ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision ``resnet.Bottleneck`` (expansion 4): 1×1 → 3×3 (stride) → 1×1, ``out += identity``."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = conv1x1(cin, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv1x1(width, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetLike(nn.Module):
    """A stem, some blocks, and torchvision's head: ``AdaptiveAvgPool2d((1, 1))``, ``torch.flatten``, Linear."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], width: int, k: int = K):
        super().__init__()
        self.stem = stem
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_stem(cout: int = 8) -> nn.Sequential:
    return nn.Sequential(conv3x3(3, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def resnet18_stem(cout: int = 8) -> nn.Sequential:
    """torchvision's ResNet stem: 7×7/2 conv (pad 3), BN, in-place ReLU, overlapping MaxPool 3/2/1."""
    return nn.Sequential(nn.Conv2d(3, cout, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))


def resnet18(size: int = 224, k: int = 1000) -> nn.Module:
    """torchvision's ResNet-18 layout (7×7/2 stem, max pool, 2+2+2+2 BasicBlocks of 64/128/256/512, average pool,
    ``k`` classes), random init, BatchNorm affine parameters random and its statistics from one pass over uniform
    images of ``size``² (activations stay O(1) on such images); in eval mode."""
    torch.manual_seed(0)
    blocks, width = [], 64
    for stage, channels in enumerate((64, 128, 256, 512)):
        blocks += [BasicBlock(width, channels, 1 if stage == 0 else 2), BasicBlock(channels, channels)]
        width = channels
    model = ResNetLike(resnet18_stem(64), blocks, 512, k=k)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average: one pass sets the statistics
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(1)))
    return model.eval()


class ConvNormActivation(nn.Sequential):
    """torchvision ``ops.Conv2dNormActivation``: conv (same padding), BN, activation (or none)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = nn.ReLU6):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups,
                                             bias=False), nn.BatchNorm2d(cout)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """torchvision ``mobilenetv2.InvertedResidual``: expand 1×1 ReLU6, depthwise 3×3 ReLU6, project 1×1
    (linear); ``x + conv(x)`` when stride 1 and widths match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvNormActivation(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvNormActivation(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Like(nn.Module):
    """MobileNetV2 in miniature; torchvision's head: ``adaptive_avg_pool2d``, flatten, Dropout, Linear."""

    def __init__(self, k: int = K):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormActivation(3, 8, 3, stride=2), InvertedResidual(8, 8, 1, 4), InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4), ConvNormActivation(12, 24, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcitation(nn.Module):
    """torchvision ``ops.SqueezeExcitation``: ``x * gate(fc2(act(fc1(avgpool(x)))))``."""

    def __init__(self, channels: int, squeeze: int, activation=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = activation(), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidualV3(nn.Module):
    """torchvision ``mobilenetv3.InvertedResidual`` with HardSwish and a Hardsigmoid squeeze-excite."""

    def __init__(self, cin: int, hidden: int, cout: int, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        self.block = nn.Sequential(
            ConvNormActivation(cin, hidden, 1, activation=nn.Hardswish),
            ConvNormActivation(hidden, hidden, 3, stride, groups=hidden, activation=nn.Hardswish),
            SqueezeExcitation(hidden, max(hidden // 4, 4), gate=nn.Hardsigmoid),
            ConvNormActivation(hidden, cout, 1, activation=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNetV3Like(nn.Module):
    """MobileNetV3 in miniature; torchvision's head: avgpool, flatten, Linear, HardSwish, Dropout, Linear."""

    def __init__(self, k: int = K):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormActivation(3, 8, 3, stride=2, activation=nn.Hardswish),
            InvertedResidualV3(8, 24, 8, 1), InvertedResidualV3(8, 24, 12, 2),
            ConvNormActivation(12, 24, 1, activation=nn.Hardswish))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(24, 16), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(16, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class DepthwiseSeparable(nn.Module):
    """MobileNetV1-style depthwise 3×3 (groups = channels) + pointwise 1×1, each BN + ReLU (own modules)."""

    def __init__(self, k: int = K):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class DenseLayer(nn.Module):
    """torchvision ``densenet._DenseLayer``: BN → ReLU → 1×1 conv → BN → ReLU → 3×3 conv on the concatenation."""

    def __init__(self, cin: int, growth: int, bn_size: int = 2):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    """torchvision ``densenet._DenseBlock``: each layer reads the concatenation of all earlier outputs."""

    def __init__(self, layers: int, cin: int, growth: int):
        super().__init__({f"denselayer{i + 1}": DenseLayer(cin + i * growth, growth) for i in range(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """torchvision ``densenet._Transition``: BN → ReLU → 1×1 conv → AvgPool 2/2."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2, 2))


class DenseNetLike(nn.Module):
    """Stem, dense block, transition (AvgPool → the next block's BN), dense block, final BN, torchvision's
    head: ``F.relu(inplace=True)``, ``adaptive_avg_pool2d``, flatten, Linear."""

    def __init__(self, k: int = K):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            DenseBlock(2, 8, 4), Transition(16, 8), DenseBlock(2, 8, 4), nn.BatchNorm2d(16))
        self.classifier = nn.Linear(16, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


class MBConv(nn.Module):
    """torchvision ``efficientnet.MBConv``: expand 1×1 SiLU, depthwise SiLU, SE (SiLU, Sigmoid), project 1×1;
    residual when stride 1 and widths match (stochastic depth is the identity in eval)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.block = nn.Sequential(
            ConvNormActivation(cin, hidden, 1, activation=nn.SiLU),
            ConvNormActivation(hidden, hidden, 3, stride, groups=hidden, activation=nn.SiLU),
            SqueezeExcitation(hidden, max(1, cin // 4), activation=nn.SiLU),
            ConvNormActivation(hidden, cout, 1, activation=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        return result + x if self.use_res_connect else result


class EfficientNetLike(nn.Module):
    """EfficientNet in miniature: SiLU stem, MBConv blocks, 1×1 head conv, avgpool, flatten, Dropout, Linear."""

    def __init__(self, k: int = K):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormActivation(3, 8, 3, stride=2, activation=nn.SiLU), MBConv(8, 8, 1), MBConv(8, 12, 2),
            ConvNormActivation(12, 24, 1, activation=nn.SiLU))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class ChannelsLastMean(nn.Module):
    """Conv + ReLU, then adaptive pooling written channels-last: ``x.permute(0, 2, 3, 1).mean((1, 2))``."""

    def __init__(self, k: int = K):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()
        self.fc = nn.Linear(8, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(x)).permute(0, 2, 3, 1)
        return self.fc(h.mean(dim=(1, 2)))


class ChannelsLastGather(nn.Module):
    """Adaptive 2×2 average pooling written as ``permute(0, 2, 3, 1).reshape(-1)`` and a Gather of flat
    indices ``b·HWC + offset`` (one offset per (cell, pixel, channel)), then ``mean`` over each cell's pixels."""

    def __init__(self, k: int = K, channels: int = 8, size: int = 8):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU()
        half = size // 2
        offsets = [((ci * half + i) * size + cj * half + j) * channels + c
                   for ci in range(2) for cj in range(2) for i in range(half) for j in range(half)
                   for c in range(channels)]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        self.cell = half * half
        self.fc = nn.Linear(4 * channels, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(x)).permute(0, 2, 3, 1)
        b, per_row = h.shape[0], h.shape[1] * h.shape[2] * h.shape[3]
        flat = h.reshape(-1)
        index = torch.arange(b, device=x.device).unsqueeze(1) * per_row + self.offsets.unsqueeze(0)
        cells = flat[index].view(b, 4, self.cell, -1).mean(2)
        return self.fc(cells.flatten(1))


def gap_head() -> nn.Module:
    """The TorchScript GAP → Flatten head of issue 9, verbatim: conv, ReLU, AdaptiveAvgPool2d(1), Flatten, Linear."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


# --------------------------------------------------------------------------------------------------
# attention blocks (input (batch, L, D) unless stated)
# --------------------------------------------------------------------------------------------------


class MeanPoolHead(nn.Module):
    """Mean over the sequence axis (1), then Linear(D, K)."""

    def __init__(self, width: int = D, k: int = K):
        super().__init__()
        self.fc = nn.Linear(width, k)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.mean(1))


class MHASelfAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention + residual; batch_first=False transposes to (L, B, D) and
    back, so the explained input is (B, L, D) either way."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(D, 2, batch_first=batch_first)
        self.head = MeanPoolHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.batch_first else x.transpose(0, 1)
        h, _ = self.attn(h, h, h, need_weights=False)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(x + h)


class Encoder(nn.Module):
    """``nn.TransformerEncoder``: 2 layers, batch_first, post-norm or pre-norm (``norm_first``)."""

    def __init__(self, norm_first: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = MeanPoolHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _decoder(layers: int = 2) -> nn.TransformerDecoder:
    layer = nn.TransformerDecoderLayer(D, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerDecoder(layer, layers)


class DecoderMemoryInput(nn.Module):
    """``nn.TransformerDecoder`` (2 layers, causal target mask) with the memory as a second graph input."""

    def __init__(self):
        super().__init__()
        self.decoder = _decoder()
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(L), persistent=False)
        self.head = MeanPoolHead()

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(tgt, memory, tgt_mask=self.mask, tgt_is_causal=True))


class DecoderMemoryComputed(nn.Module):
    """``nn.TransformerDecoder`` whose memory is computed from the input (a Linear + tanh encoder)."""

    def __init__(self):
        super().__init__()
        self.encode, self.tanh = nn.Linear(D, D), nn.Tanh()
        self.decoder = _decoder()
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(L), persistent=False)
        self.head = MeanPoolHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.tanh(self.encode(x))
        return self.head(self.decoder(x, memory, tgt_mask=self.mask, tgt_is_causal=True))


class CausalSDPA(nn.Module):
    """Fused qkv projection, heads split as (B, H, L, d), ``F.scaled_dot_product_attention(is_causal=True)``."""

    def __init__(self, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.head = MeanPoolHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.head(x + self.proj(y))


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: ``addmm(bias, x.view(-1, d), W).view(*x.shape[:-1], out)`` — B·L rows."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) / math.sqrt(nx))
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.weight.shape[1],))


class GPT2MLP(nn.Module):
    """GPT-2's MLP block with a residual: ``x + c_proj(gelu_tanh(c_fc(x)))``, both as ``x.view(-1, d) @ W``."""

    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(D, 4 * D), Conv1D(4 * D, D)
        self.head = MeanPoolHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class LastTokenPool(nn.Module):
    """Linear + tanh per token, then last-token pooling ``h[torch.arange(b), -1]`` and a Linear head."""

    def __init__(self):
        super().__init__()
        self.proj, self.tanh, self.fc = nn.Linear(D, D), nn.Tanh(), nn.Linear(D, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tanh(self.proj(x))
        return self.fc(h[torch.arange(h.shape[0], device=h.device), -1])


class SwinWindowBlock(nn.Module):
    """Swin-style block on a 14×14 image: 1×1 patch embedding, LayerNorm, 7×7 window partition to
    (B·4, 49, C), window attention with a learned relative-position bias, window reverse, residual, MLP."""

    def __init__(self, channels: int = 8, heads: int = 2, window: int = 7):
        super().__init__()
        self.c, self.heads, self.window = channels, heads, window
        self.embed = nn.Conv2d(3, channels, 1)
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.qkv, self.proj = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)
        self.bias = nn.Parameter(torch.randn(heads, window * window, window * window) * 0.5)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))
        self.fc = nn.Linear(channels, K)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s = self.window
        x = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, s * s, c)

    def reverse(self, windows: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        s = self.window
        x = windows.view(b, h // s, w // s, s, s, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, -1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1) + self.bias.unsqueeze(0)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(y)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.embed(image).permute(0, 2, 3, 1)  # (B, H, W, C)
        b, h, w, _ = x.shape
        x = x + self.reverse(self.attention(self.partition(self.norm1(x))), b, h, w)
        x = x + self.mlp(self.norm2(x))
        return self.fc(x.mean((1, 2)))


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers from tiny configs (no download)
# --------------------------------------------------------------------------------------------------

HF_SIZES = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
            "max_position_embeddings": 16, "initializer_range": 0.1}


def _bert(classify: bool) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=D, num_labels=K, **HF_SIZES)
    return (BertForSequenceClassification if classify else BertModel)(config)


def _distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=VOCAB, dim=D, n_layers=2, n_heads=2, hidden_dim=32,
                              max_position_embeddings=16, num_labels=K, initializer_range=0.1)
    return DistilBertForSequenceClassification(config)


def _gpt2(classify: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=D, n_layer=2, n_head=2, num_labels=K,
                        pad_token_id=0, initializer_range=0.1)
    return (GPT2ForSequenceClassification if classify else GPT2LMHeadModel)(config)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=D, num_labels=K, **HF_SIZES)
    return ViTForImageClassification(config)


# (builder, how the wrapper reads a tensor out of the model's output)
HF_TOKEN_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable]] = {
    "bert_cls": (lambda: _bert(True), lambda out: out.logits),
    "bert_model": (lambda: _bert(False), lambda out: out.pooler_output),
    "distilbert": (_distilbert, lambda out: out.logits),
    "gpt2_lm": (lambda: _gpt2(False), lambda out: out.logits[:, -1]),
    "gpt2_cls": (lambda: _gpt2(True), lambda out: out.logits),
}


class TokenWrapper(nn.Module):
    """A Hugging Face token model as ``forward(tensor) -> tensor``: ``input_ids`` or ``inputs_embeds``."""

    def __init__(self, model: nn.Module, read: Callable, feed: str):
        super().__init__()
        assert feed in ("input_ids", "inputs_embeds")
        self.model, self.read, self.feed = model, read, feed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.read(self.model(**{self.feed: tokens}))


class ImageWrapper(nn.Module):
    """``ViTForImageClassification`` as ``forward(pixel_values) -> logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


# --------------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One zoo model.

    Attributes:
        name: the case id (``family/model`` style names are avoided: ids appear in pytest node ids).
        family: ``"cnn"``, ``"attention"`` or ``"hf"``.
        build: returns the (unseeded) module; :func:`module` seeds, calibrates and caches it.
        shapes: per graph input, the shape of one row (token models: ``(L,)`` integer ids).
        token: None, ``"ids"`` (the ``input_ids`` export) or ``"embeds"`` (``inputs_embeds``, same weights).
    """

    name: str
    family: str
    build: Callable[[], nn.Module]
    shapes: tuple[tuple[int, ...], ...]
    token: str | None = None

    @property
    def base(self) -> str:
        """The token model both exports of a pair share (``bert_cls`` for ``bert_cls_ids``)."""
        return self.name.rsplit("_", 1)[0] if self.token else self.name


def _cnn(name: str, build: Callable[[], nn.Module], shape=IMAGE) -> Case:
    return Case(name, "cnn", build, (shape,))


def _seq(name: str, build: Callable[[], nn.Module], shapes=((L, D),)) -> Case:
    return Case(name, "attention", build, shapes)


def _token_cases(base: str) -> list[Case]:
    build, read = HF_TOKEN_MODELS[base]
    return [Case(f"{base}_ids", "hf", lambda: TokenWrapper(build(), read, "input_ids"), ((L,),), "ids"),
            Case(f"{base}_embeds", "hf", lambda: TokenWrapper(build(), read, "inputs_embeds"), ((L, D),),
                 "embeds")]


CASES: dict[str, Case] = {c.name: c for c in [
    _cnn("gap_head", gap_head, (3, 8, 8)),
    _cnn("resnet_basic", lambda: ResNetLike(small_stem(), [BasicBlock(8, 8), BasicBlock(8, 16, 2)], 16)),
    _cnn("resnet_bottleneck", lambda: ResNetLike(small_stem(), [Bottleneck(8, 4), Bottleneck(16, 4, 2)], 16)),
    _cnn("resnet18_stem", lambda: ResNetLike(resnet18_stem(), [BasicBlock(8, 8)], 8)),
    _cnn("mobilenet_v2", MobileNetV2Like),
    _cnn("mobilenet_v3", MobileNetV3Like),
    _cnn("depthwise_separable", DepthwiseSeparable),
    _cnn("densenet", DenseNetLike),
    _cnn("efficientnet", EfficientNetLike),
    _cnn("channels_last_mean", ChannelsLastMean),
    _cnn("channels_last_gather", ChannelsLastGather),
    _seq("mha_seq_first", lambda: MHASelfAttention(batch_first=False)),
    _seq("mha_batch_first", lambda: MHASelfAttention(batch_first=True)),
    _seq("encoder_postnorm", lambda: Encoder(norm_first=False)),
    _seq("encoder_prenorm", lambda: Encoder(norm_first=True)),
    _seq("decoder_memory_input", DecoderMemoryInput, ((L, D), (L, D))),
    _seq("decoder_memory_computed", DecoderMemoryComputed),
    _seq("sdpa_causal", CausalSDPA),
    _seq("gpt2_view", GPT2MLP),
    _seq("last_token", LastTokenPool),
    _seq("swin_window", SwinWindowBlock, ((3, 14, 14),)),
    *[c for base in HF_TOKEN_MODELS for c in _token_cases(base)],
    Case("vit", "hf", lambda: ImageWrapper(_vit()), ((3, 32, 32),)),
]}

TOKEN_BASES = tuple(HF_TOKEN_MODELS)


def word_embedding(module: nn.Module) -> nn.Embedding:
    """The word-embedding table of a :class:`TokenWrapper`."""
    return module.model.get_input_embeddings()


def _draw_ids(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Token ids in ``[1, VOCAB)`` (0 is GPT-2's pad token here: no row is padded)."""
    return rng.integers(1, VOCAB, size=(rows, L), dtype=np.int64)


def draw(case: Case, rows: int, seed: int) -> list[np.ndarray]:
    """``rows`` rows of every input of ``case``: standard normal floats, or token ids (``"ids"`` and
    ``"embeds"`` cases draw the same ids; ``"embeds"`` looks them up in the model's embedding table)."""
    rng = np.random.default_rng(seed)
    if case.token:
        ids = _draw_ids(rng, rows)
        if case.token == "ids":
            return [ids]
        with torch.no_grad():
            return [word_embedding(module(case.name))(torch.from_numpy(ids)).numpy()]
    return [rng.standard_normal((rows, *shape), dtype=np.float32) for shape in case.shapes]


def data(case: Case) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(X, background)``: N explained rows and M background rows, disjoint draws, per input."""
    return draw(case, N, SEED + 1), draw(case, M, SEED + 2)


@functools.cache
def module(name: str) -> nn.Module:
    """The seeded, calibrated, eval-mode module of a case (cached: treat it as read-only; deep-copy to mutate).

    Both exports of a token model pair build the same weights (same seed, same config).
    """
    case = CASES[name]
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = case.build()
    rng = np.random.default_rng(SEED + 3)
    return recalibrate_batchnorm(
        net, lambda rows: [torch.from_numpy(a) for a in _draw_float(case, rng, rows)])


def _draw_float(case: Case, rng: np.random.Generator, rows: int) -> list[np.ndarray]:
    if case.token == "ids":
        return [_draw_ids(rng, rows)]
    return [rng.standard_normal((rows, *shape), dtype=np.float32) for shape in case.shapes]


def torch_outputs(net: nn.Module, arrays: list[np.ndarray]) -> np.ndarray:
    """The module's output on ``arrays``, flattened to ``(rows, k)`` float64."""
    with torch.no_grad():
        out = net(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
    return out.detach().numpy().reshape(out.shape[0], -1).astype(np.float64)


# --------------------------------------------------------------------------------------------------
# exports, cached on disk
# --------------------------------------------------------------------------------------------------


def input_names(case: Case) -> list[str]:
    if case.token:
        return ["input_ids" if case.token == "ids" else "inputs_embeds"]
    return ["x"] if len(case.shapes) == 1 else [f"x{i}" for i in range(len(case.shapes))]


def _source_key() -> str:
    """Exports are valid while this file, torch and transformers are unchanged."""
    import transformers

    text = Path(__file__).read_bytes() + f"{torch.__version__} {transformers.__version__}".encode()
    return hashlib.sha256(text).hexdigest()[:12]


def export(case: Case, exporter: str, folder: Path) -> onnx.ModelProto:
    """The ONNX export of ``module(case.name)`` through ``converters.export_torch`` (checked against torch on
    two batch sizes) at the exporter's native opset, cached as ``folder/<case>-<exporter>-<key>.onnx`` (see
    :func:`cached_export`)."""
    from converters import export_torch

    assert exporter in EXPORTERS
    path = Path(folder) / f"{case.name}-{exporter}-{_source_key()}.onnx"
    x, _ = data(case)
    return cached_export(path, lambda: export_torch(module(case.name), x, path, exporter=exporter,
                                                    opset=OPSETS[exporter], input_names=input_names(case),
                                                    output_names=["logits"]))


class CachedExportFailure(Exception):
    """An export that failed in an earlier run; the message starts with the original exception's class."""


def cached_export(path: Path, run: Callable[[], onnx.ModelProto]) -> onnx.ModelProto:
    """``path`` if an earlier run wrote it; else ``run()`` (which writes it). A failure is cached next to it as
    ``.error`` and raised again as :class:`CachedExportFailure` (re-exporting costs seconds, fails the same)."""
    failed = path.with_suffix(".error")
    if path.exists():
        return onnx.load(str(path))
    if failed.exists():
        raise CachedExportFailure(failed.read_text())
    stem = path.stem.rsplit("-", 1)[0]  # drop exports of this model from older sources (another key)
    for stale in path.parent.glob(f"{stem}-*"):
        if stale.stem.rsplit("-", 1)[0] == stem:
            stale.unlink()
    try:
        return run()
    except Exception as exc:
        failed.write_text(f"{type(exc).__name__}: {exc}")
        raise
