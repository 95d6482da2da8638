"""The result of lowering: a model of primitive ops and what the probe learned about every tensor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass
class LoweredModel:
    """A lowered forward model and what the probe learned about it.

    Attributes:
        model: the lowered model (primitive ops only, parameters constant).
        opset: its default-domain opset.
        shapes: static shape of every tensor at the first probe batch size, by name.
        batch_axes: per tensor name, the batch axis, None (batch-independent) or "merged".
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

    def feature_shape(self, name: str) -> tuple[int, ...]:
        """The shape with the batch axis dropped."""
        shape, axis = self.shapes[name], self.batch_axes[name]
        return tuple(d for i, d in enumerate(shape) if i != axis)

    def output_size(self, name: str) -> int:
        """Number of output values per row of tensor ``name``."""
        return int(np.prod(self.feature_shape(name), dtype=np.int64))
