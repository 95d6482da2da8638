"""Window geometry of Conv, ConvTranspose and the pools: explicit pads, ceil mode, output padding.

One place for the arithmetic every window op needs, with ONNX's definitions:

- output size (floor mode): ``out = ⌊(in + begin + end − d·(k − 1) − 1) / s⌋ + 1``;
- ``auto_pad`` SAME: ``out = ⌈in / s⌉`` and ``total = (out − 1)·s + d·(k − 1) + 1 − in`` split in two, the odd
  one at the end (SAME_UPPER) or the beginning (SAME_LOWER);
- ceil mode equals floor mode with the end pad grown until the window count matches;
- the transposed map ``in ← out`` loses ``output_padding = in − ((out − 1)·s − begin − end + d·(k − 1) + 1)``
  positions to the floor division; ConvTranspose puts them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

from onnxshap.graph.edit import op_attr


@dataclass(frozen=True)
class Window:
    """Kernel, strides, dilations and explicit pads of one window op, per spatial axis."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    begins: list[int]
    ends: list[int]

    @property
    def pads(self) -> list[int]:
        """ONNX's ``pads`` attribute: every begin, then every end."""
        return self.begins + self.ends

    def output_padding(self, in_size, out_size) -> list[int]:
        """What a ConvTranspose from ``out_size`` needs to reproduce ``in_size``."""
        return [i - ((o - 1) * s - b - e + d * (k - 1) + 1) for i, o, k, s, d, b, e in
                zip(in_size, out_size, self.kernel, self.strides, self.dilations, self.begins, self.ends)]

    def with_ceil_mode(self, in_size, out_size) -> Window:
        """The same window with the end pads grown until floor-mode arithmetic yields ``out_size``."""
        ends = list(self.ends)
        for i, (size, k, s, d) in enumerate(zip(in_size, self.kernel, self.strides, self.dilations)):
            while (size + self.begins[i] + ends[i] - d * (k - 1) - 1) // s + 1 < out_size[i]:
                ends[i] += 1
        return Window(self.kernel, self.strides, self.dilations, self.begins, ends)


def window_of(node: ir.Node, in_size, kernel=None) -> Window:
    """The window of a Conv/ConvTranspose/MaxPool/AveragePool/LpPool node on an input of spatial ``in_size``
    (``auto_pad`` resolved; ``kernel`` defaults to the ``kernel_shape`` attribute)."""
    kernel = list(kernel if kernel is not None else op_attr(node, "kernel_shape"))
    spatial = len(kernel)
    strides = list(op_attr(node, "strides", [1] * spatial))
    dilations = list(op_attr(node, "dilations", [1] * spatial))
    pads = explicit_pads(node, in_size, kernel, strides, dilations)
    return Window(kernel, strides, dilations, pads[:spatial], pads[spatial:])


def _declared_pads(node: ir.Node, spatial: int) -> list[int] | None:
    """The pads ``auto_pad`` NOTSET (the attribute) or VALID (none) declare; None for the SAME modes."""
    auto_pad = op_attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return list(op_attr(node, "pads", [0] * (2 * spatial)))
    return [0] * (2 * spatial) if auto_pad == "VALID" else None


def explicit_pads(node: ir.Node, in_size, kernel, strides, dilations) -> list[int]:
    """The node's ``pads`` with ``auto_pad`` resolved for an input of spatial size ``in_size``."""
    declared = _declared_pads(node, len(kernel))
    if declared is not None:
        return declared
    totals = [max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
              for size, k, s, d in zip(in_size, kernel, strides, dilations)]
    return _split_same(totals, op_attr(node, "auto_pad"))


def conv_transpose_pads(node: ir.Node, in_size, kernel) -> list[int] | None:
    """ConvTranspose's ``auto_pad`` as explicit pads: SAME makes the output ``in · stride`` and splits
    ``total = s·(in − 1) + output_padding + (k − 1)·d + 1 − in·s``; None where that total is negative."""
    spatial = len(kernel)
    declared = _declared_pads(node, spatial)
    if declared is not None:
        return declared
    strides = list(op_attr(node, "strides", [1] * spatial))
    dilations = list(op_attr(node, "dilations", [1] * spatial))
    extra = list(op_attr(node, "output_padding", [0] * spatial))
    totals = [s * (size - 1) + e + (k - 1) * d + 1 - size * s
              for size, k, s, d, e in zip(in_size, kernel, strides, dilations, extra)]
    return None if any(t < 0 for t in totals) else _split_same(totals, op_attr(node, "auto_pad"))


def _split_same(totals: list[int], auto_pad: str) -> list[int]:
    small = [t // 2 for t in totals]
    large = [t - t // 2 for t in totals]
    return small + large if auto_pad == "SAME_UPPER" else large + small
