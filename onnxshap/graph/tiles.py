"""Windows that tile a tensor (stride = kernel, no pads, no dilation): copy one value per window to the window's
elements and multiply, in one pass over the result.

On every spatial axis ``j`` the element ``i = k_j·o + t`` (``0 ≤ t < k_j``) belongs to window ``o``; the elements
past ``k_j·out_j`` (``leftover_j``, which floor mode drops) belong to none. For a per-window tensor ``small``
(``(…, C, *out)``) and a per-element tensor ``big`` (``(…, C, *in)``), :meth:`Tiles.times` computes

    ``result[…, c, i_1, …, i_s] = small[…, c, o_1, …, o_s] · big[…, c, i_1, …, i_s]``  (0 at leftover elements)

without materialising the copied ``small``:

- the last (contiguous) axis is copied by a MatMul with the 0/1 matrix ``E`` (``out_s × in_s``,
  ``E[o, k_s·o + t] = 1``; its leftover columns are zero) — one GEMM over every row;
- every other axis needs no copy: in row-major order, element ``k_j·o + t`` sits at ``(o, t)`` of the
  ``(out_j, k_j)`` view, so ``big`` viewed ``(…, out_j, k_j, …)`` times ``small`` viewed ``(…, out_j, 1, …)``
  is a broadcast Mul whose innermost span is a whole row (``in_s`` elements); leftover rows are sliced off
  ``big`` before and padded back with zeros after.

Measured on 2 cores (a CNN's pool, 1 200 pair rows, (32, 13, 13) → 26 × 26, times a per-pair factor): 14 ms
against 35 ms for a depthwise ConvTranspose with a kernel of ones followed by the Mul (ONNX Runtime loops over
rows × channels small GEMMs there).

The tensors keep three leading axes (the expanded pair form ``(n, m, k)``, any of them 1 where broadcast), so
every reshape copies them with ``0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxshap.graph.builder import Builder

LEADING = 3  # (n, m, k) of the expanded pair form


@dataclass(frozen=True)
class Tiles:
    """Tiling of ``in_size`` by windows of ``kernel`` (``out_size`` windows per axis), ``channels`` channels.

    ``source`` is the per-window tensor the copied values belong to (a lazy multiplier's base describes it).
    """

    source: ir.Value
    channels: int
    kernel: tuple[int, ...]
    out_size: tuple[int, ...]
    in_size: tuple[int, ...]

    @property
    def covered(self) -> list[int]:
        return [o * k for o, k in zip(self.out_size, self.kernel)]

    @property
    def leftover(self) -> list[int]:
        """Elements past the last window on each axis (floor mode drops them)."""
        return [s - c for s, c in zip(self.in_size, self.covered)]

    def _copy_last_axis(self, b: Builder, small: ir.Value) -> ir.Value:
        out, size, k = self.out_size[-1], self.in_size[-1], self.kernel[-1]
        if k == 1 and out == size:
            return small
        copy = np.zeros((out, size), np.float32)
        for o in range(out):
            copy[o, o * k:(o + 1) * k] = 1
        return b.op("MatMul", [small, b.const(copy, "tile_copy")], hint="tile_copy")

    def times(self, b: Builder, small: ir.Value, big: ir.Value) -> ir.Value:
        """``small`` (``(a, b, c, C, *out_size)``) copied to its windows' elements times ``big``
        (``(a', b', c', C, *in_size)``, broadcast against it on the three leading axes): ``(…, C, *in_size)``."""
        leading = [0] * LEADING
        inner, windows = self.out_size[:-1], self.kernel[:-1]
        grouped = [d for o in inner for d in (o, 1)]
        spread = b.reshape(self._copy_last_axis(b, small), leading + [self.channels, *grouped, self.in_size[-1]])
        leftover = self.leftover[:-1]  # the copy matrix's zero columns handle the last axis
        if any(leftover):
            axes = list(range(LEADING + 1, LEADING + len(self.in_size)))
            big = b.slice(big, [0] * len(axes), self.covered[:-1], axes)
        grouped = [d for o, k in zip(inner, windows) for d in (o, k)]
        big = b.reshape(big, leading + [self.channels, *grouped, self.in_size[-1]])
        product = b.op("Mul", [spread, big], hint="tile_times")
        product = b.reshape(product, leading + [self.channels, *self.covered[:-1], self.in_size[-1]])
        if not any(leftover):
            return product
        rank = LEADING + 1 + len(self.in_size)
        ends = [0] * (LEADING + 1) + leftover + [0]
        return b.op("Pad", [product, b.ints([0] * rank + ends)], hint="tile_leftover")
