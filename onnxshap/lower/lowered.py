"""The result of lowering: a model of primitive ops and what the probe learned about every tensor."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxshap.lower.probe import PROBE_BATCHES


@dataclass
class LoweredModel:
    """A lowered forward model and what the probe learned about it.

    Attributes:
        model: the lowered model (primitive ops only, parameters constant).
        opset: its default-domain opset.
        shapes: static shape of every tensor at the first probe batch size, by name.
        batch_axes: per tensor name, the axis that holds the batch, None (batch-independent) or "merged" (the
            rows mix: no layout).
        batch_split: per tensor whose batch axis is merged with others, ``(outer, inner)``: that axis has size
            ``outer · B · inner`` (``lower/layout.py``); absent for a plain batch axis.
        guards: gathers lowered for the positions the probe rows select, computed from token ids; every data
            and background row must select the same (``lower/row_gather.py``).
        dtypes: numpy dtype of every tensor, by name.
        row_constant: tensors with a batch axis whose value does not depend on the data and is the same in
            every row (zero initial states sized from the batch); rules may use their first row.
    """

    model: ir.Model
    opset: int
    shapes: dict[str, tuple[int, ...]]
    batch_axes: dict[str, int | None | str]
    dtypes: dict[str, np.dtype]
    row_constant: frozenset[str] = frozenset()
    batch_split: dict[str, tuple[int, int]] = field(default_factory=dict)
    guards: list = field(default_factory=list)  # lower.row_gather.RowGuard: checked on every row fed

    def feature_shape(self, name: str) -> tuple[int, ...]:
        """The shape with the batch axis dropped (a tensor with a plain batch axis)."""
        shape, axis = self.shapes[name], self.batch_axes[name]
        return tuple(d for i, d in enumerate(shape) if i != axis)

    def split(self, name: str) -> tuple[int, int]:
        """``(outer, inner)`` of the batch axis: ``(1, 1)`` for a plain one."""
        return self.batch_split.get(name, (1, 1))

    def output_size(self, name: str) -> int:
        """Number of output values per row of tensor ``name``."""
        return int(np.prod(self.feature_shape(name), dtype=np.int64))

    def row_elements(self) -> int:
        """Elements of one row over every tensor with a batch axis (plain or merged), from the probe's shapes
        (recorded at the first probe batch): what a forward pass holds at most per row (ONNX Runtime frees
        activations once read, so it usually holds less)."""
        batched = (shape for name, shape in self.shapes.items() if self.batch_axes.get(name) is not None)
        return max(1, sum(int(np.prod(shape, dtype=np.int64)) for shape in batched) // PROBE_BATCHES[0])
