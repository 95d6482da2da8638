"""The pair layout: where x values, reference values and multipliers live in the augmented graph.

The augmented graph runs the forward pass on the n samples only; every reference-side tensor ``t_r`` (m rows)
is computed once per explanation and stored as a constant. Multipliers of a tensor ``t`` with batch axis ``b``
have ``t``'s shape with the batch dimension replaced by ``P = n·m·k`` rows, ordered sample-major, then
reference, then output ("P-form"). A rule that needs values reshapes a multiplier to the *expanded* form
``t.shape[:b] + (n, m, k) + t.shape[b+1:]``, where ``x`` broadcasts as ``(n, 1, 1)`` and ``r`` as ``(1, m, 1)``
at the batch position, so factors that depend on the pair only are computed once and broadcast over outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxshap.emit import Emitter
from onnxshap.lower import LoweredModel


@dataclass(frozen=True)
class Scaled:
    """A multiplier kept as ``base ⊙ factor``: a P-form ``base`` of ``like`` and a per-pair ``factor``.

    Rescales and tiled max-pools only multiply by per-pair factors (n·m elements per feature, not n·m·k), so
    a chain of them multiplies the factors and touches the n·m·k-row base once, when a rule needs the
    multiplier itself (:meth:`PairContext.materialize`).
    """

    base: ir.Value
    factor: ir.Value
    like: ir.Value


Multiplier = ir.Value | Scaled


@dataclass
class PairContext:
    """What rules see of the graph being built.

    Attributes:
        lowered: the lowered forward model and its probed shapes.
        emit: builder that appends nodes to the augmented graph.
        m: number of references (background rows).
        k: number of explained outputs per sample.
        variable: names of tensors that depend on an explained tensor.
        reference_requests: tensor name → placeholder initializer that will hold the reference values.
    """

    lowered: LoweredModel
    emit: Emitter
    m: int
    k: int
    variable: set[str]
    reference_requests: dict[str, ir.Value] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)

    # -- facts about tensors --------------------------------------------------------------------------
    def is_variable(self, value: ir.Value | None) -> bool:
        return value is not None and value.name in self.variable

    def shape(self, value: ir.Value) -> tuple[int, ...]:
        """Static shape at the probe batch (the batch dimension's size is meaningless)."""
        return self.lowered.shapes[value.name]

    def rank(self, value: ir.Value) -> int:
        return len(self.shape(value))

    def batch_axis(self, value: ir.Value) -> int:
        axis = self.lowered.batch_axes[value.name]
        assert isinstance(axis, int), f"{value.name} has no single batch axis"
        return axis

    def dtype(self, value: ir.Value) -> np.dtype:
        return self.lowered.dtypes[value.name]

    # -- values ---------------------------------------------------------------------------------------
    def const(self, value: ir.Value) -> ir.Value:
        """A tensor that is the same for x and r, in a form that broadcasts against any number of rows.

        A row-constant tensor (sized from the batch but equal in every row, like a zero initial state) is
        replaced by its first row; any other constant is returned as is.
        """
        axis = self.lowered.batch_axes.get(value.name)
        if not isinstance(axis, int) or value.name not in self.lowered.row_constant:
            return value
        key = ("first_row", value.name)
        if key not in self._cache:
            e = self.emit
            self._cache[key] = e.op("Slice", [value, e.ints([0]), e.ints([1]), e.ints([axis])], hint="first_row")
        return self._cache[key]

    def x(self, value: ir.Value) -> ir.Value:
        """The sample-side tensor (n rows): the forward value itself."""
        return value if self.is_variable(value) else self.const(value)

    def r(self, value: ir.Value) -> ir.Value:
        """The reference-side tensor (m rows) of a variable tensor; a constant tensor is its own."""
        if not self.is_variable(value):
            return self.const(value)
        if value.name not in self.reference_requests:
            placeholder = ir.Value(name=f"reference/{value.name}")
            self.reference_requests[value.name] = placeholder
        return self.reference_requests[value.name]

    def side(self, value: ir.Value, which: str) -> ir.Value:
        """``x(value)`` or ``r(value)`` by name of the side ("x" or "r")."""
        return self.x(value) if which == "x" else self.r(value)

    def pair_x(self, value: ir.Value) -> ir.Value:
        """x values broadcastable against an expanded tensor: (n, 1, 1) at the batch position."""
        if not self.is_variable(value):
            return self.pair_constant(value)
        key = ("pair_x", value.name)
        if key not in self._cache:
            b = self.batch_axis(value)
            self._cache[key] = self.emit.unsqueeze(value, [b + 1, b + 2])
        return self._cache[key]

    def pair_r(self, value: ir.Value) -> ir.Value:
        """Reference values broadcastable against an expanded tensor: (1, m, 1) at the batch position."""
        if not self.is_variable(value):
            return self.pair_constant(value)
        key = ("pair_r", value.name)
        if key not in self._cache:
            b = self.batch_axis(value)
            self._cache[key] = self.emit.unsqueeze(self.r(value), [b, b + 2])
        return self._cache[key]

    def pair_side(self, value: ir.Value, which: str) -> ir.Value:
        return self.pair_x(value) if which == "x" else self.pair_r(value)

    def pair_delta(self, value: ir.Value) -> ir.Value:
        """Δ = x − r per pair, shape (n, m, 1) at the batch position."""
        key = ("delta", value.name)
        if key not in self._cache:
            self._cache[key] = self.emit.op("Sub", [self.pair_x(value), self.pair_r(value)], hint="delta")
        return self._cache[key]

    def pair_constant(self, value: ir.Value, like: ir.Value | None = None) -> ir.Value:
        """A batch-independent tensor reshaped to broadcast against expanded tensors shaped like ``like``.

        Constants broadcast right-aligned; the expanded form has two more axes after the batch axis, so a
        constant of full rank needs two unit axes inserted there.
        """
        like = like or value
        value = self.const(value)
        if self.is_variable(like):
            b, rank = self.batch_axis(like), self.rank(like)
        else:
            return value
        shape = tuple(value.shape) if value.shape is not None else self.shape(value)
        if len(shape) <= rank - b - 1:
            return value  # only covers axes after the batch: broadcasts as is
        padded = (1,) * (rank - len(shape)) + tuple(shape)
        target = padded[: b + 1] + (1, 1) + padded[b + 1 :]
        return self.emit.reshape(value, list(target))

    # -- multiplier layouts ---------------------------------------------------------------------------
    def expand(self, multiplier: ir.Value, like: ir.Value) -> ir.Value:
        """P-form → expanded form ``shape[:b] + (n, m, k) + shape[b+1:]``."""
        b, shape = self.batch_axis(like), self.shape(like)
        return self.emit.reshape(multiplier, list(shape[:b]) + [-1, self.m, self.k] + list(shape[b + 1 :]))

    def collapse(self, expanded: ir.Value, like: ir.Value) -> ir.Value:
        """Expanded form → P-form of ``like``'s shape."""
        b, shape = self.batch_axis(like), self.shape(like)
        return self.emit.reshape(expanded, list(shape[:b]) + [-1] + list(shape[b + 1 :]))

    def scale(self, multiplier: Multiplier, factor: ir.Value, out: ir.Value, into: ir.Value) -> Multiplier:
        """``multiplier`` of ``out`` times a per-pair ``factor`` (expanded, k = 1), as a multiplier of ``into``
        (summing over axes where ``into`` was broadcast to ``out``'s shape).

        Without broadcasting the product stays lazy (:class:`Scaled`): factors multiply per pair.
        """
        if self.shape(out) == self.shape(into) and self.batch_axis(out) == self.batch_axis(into):
            if isinstance(multiplier, Scaled):
                combined = self.emit.op("Mul", [multiplier.factor, factor], hint="combined_factor")
                return Scaled(multiplier.base, combined, into)
            return Scaled(multiplier, factor, into)
        product = self.emit.op("Mul", [self.expand(self.materialize(multiplier), out), factor])
        return self.unbroadcast(self.collapse(product, out), out, into)

    def materialize(self, multiplier: Multiplier | None) -> ir.Value | None:
        """The P-form tensor of a multiplier (applies a pending per-pair factor)."""
        if not isinstance(multiplier, Scaled):
            return multiplier
        like = multiplier.like
        product = self.emit.op("Mul", [self.expand(multiplier.base, like), multiplier.factor], hint="scaled")
        return self.collapse(product, like)

    def add(self, a: Multiplier | None, b: Multiplier | None) -> Multiplier | None:
        """The sum of two multipliers of one tensor (either may be absent)."""
        if a is None or b is None:
            return a if b is None else b
        return self.emit.op("Add", [self.materialize(a), self.materialize(b)])

    def unbroadcast(self, multiplier: ir.Value, out: ir.Value, into: ir.Value) -> ir.Value:
        """Sum a P-form multiplier of ``out`` down to ``into``'s shape (undo numpy broadcasting)."""
        out_shape, in_shape = self.shape(out), self.shape(into)
        if out_shape == in_shape:
            return multiplier
        b = self.batch_axis(out)
        padded = (1,) * (len(out_shape) - len(in_shape)) + tuple(in_shape)
        axes = [i for i, (o, s) in enumerate(zip(out_shape, padded)) if s == 1 and o != 1 and i != b]
        summed = self.emit.reduce("ReduceSum", multiplier, axes, keepdims=True)
        if len(padded) == len(in_shape):
            return summed
        target = [-1 if i == self.batch_axis(into) else d for i, d in enumerate(in_shape)]
        return self.emit.reshape(summed, target)

    def pair_count_shape(self, like: ir.Value) -> ir.Value:
        """1-D int64 tensor: ``like``'s P-form shape (for building zeros)."""
        key = ("pshape", like.name)
        if key not in self._cache:
            b, shape = self.batch_axis(like), self.shape(like)
            rows = self.emit.op("Mul", [self.emit.op("Shape", [like], {"start": b, "end": b + 1}),
                                        self.emit.ints([self.m * self.k])])
            parts = [self.emit.ints(shape[:b]), rows, self.emit.ints(shape[b + 1 :])]
            self._cache[key] = self.emit.op("Concat", [p for p in parts], {"axis": 0})
        return self._cache[key]

    def zeros(self, like: ir.Value) -> ir.Value:
        """A P-form zero multiplier for ``like``."""
        zero = self.emit.const(np.zeros(1, dtype=np.float32), "zero")
        return self.emit.op("Expand", [zero, self.pair_count_shape(like)])
