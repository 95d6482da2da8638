"""The pair layout: where sample values, reference values and multipliers live in the augmented graph.

The augmented graph runs the lowered forward pass **once** on the samples and the references stacked along
the batch axis, ``[X; R]`` (n + m rows); every tensor ``t`` used by a rule is split into its sample part
``t_x`` (the first n rows) and its reference part ``t_r`` (the other m). The sizes n, m and k (outputs per
sample) are read from the feeds at run time, so one graph serves any number of samples, references and
explained outputs, and the runner may chunk any of them.

Multipliers of a tensor ``t`` with batch axis ``b`` have ``t``'s shape with the batch dimension replaced by
``P = n·m·k`` rows, ordered sample-major, then reference, then output ("P-form"). A rule that needs values
works in the *expanded* form ``t.shape[:b] + (n, m, k) + t.shape[b+1:]``, where ``t_x`` broadcasts as
``(n, 1, 1)`` and ``t_r`` as ``(1, m, 1)`` at the batch position: factors that depend on the pair only are
computed once per pair (n·m elements) and broadcast over the k outputs (:meth:`PairContext.pair_average`,
:meth:`PairContext.pair_mean`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from onnxshap.graph.builder import Builder
from onnxshap.graph.tiles import Tiles
from onnxshap.lower.lowered import LoweredModel

INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Scaled:
    """A multiplier kept as ``base ⊙ factor``: a P-form ``base`` of ``like`` and a per-pair ``factor``.

    Rescales and tiled max-pools only multiply by per-pair factors (n·m elements per feature, not n·m·k), so
    a chain of them multiplies the factors and touches the n·m·k-row base once, when a rule needs the
    multiplier itself (:meth:`PairContext.materialize`).

    With ``tiles`` (a tiled max-pool), ``base`` is the per-window multiplier of the pool's output; the product
    copies it to the windows' elements of ``like`` on the way (:meth:`Tiles.times`), never materialised alone.
    """

    base: ir.Value
    factor: ir.Value
    like: ir.Value
    tiles: Tiles | None = None


Multiplier = ir.Value | Scaled


@dataclass(frozen=True)
class PairSizes:
    """1-D int64 tensors of one element each, read from the feeds at run time."""

    n: ir.Value  # samples
    m: ir.Value  # references
    k: ir.Value  # explained outputs per sample


@dataclass
class PairContext:
    """What rules see of the graph being built.

    Attributes:
        lowered: the lowered forward model and its probed shapes.
        build: the builder that appends nodes to the augmented graph.
        variable: names of tensors that depend on an explained tensor.
        sizes: the run-time sizes n, m, k (None while only checking).
    """

    lowered: LoweredModel
    build: Builder
    variable: set[str]
    sizes: PairSizes | None
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

    def split(self, value: ir.Value) -> tuple[int, int]:
        """``(outer, inner)``: the batch axis has size ``outer · rows · inner`` (``(1, 1)``: a plain batch axis)."""
        return self.lowered.split(value.name)

    def merged(self, value: ir.Value) -> bool:
        return self.split(value) != (1, 1)

    def expanded_rank(self, value: ir.Value) -> int:
        """Rank of the expanded form: ``(n, m, k)`` replace the batch — ``(o, n, m, k, i)`` a merged one."""
        return self.rank(value) + (4 if self.merged(value) else 2)

    def expanded_axis(self, value: ir.Value, axis: int) -> int:
        """Where axis ``axis`` of ``value`` (not its batch axis) sits in the expanded form."""
        b = self.batch_axis(value)
        assert axis != b, f"axis {axis} of {value.name} holds the batch"
        return axis + self.expanded_rank(value) - self.rank(value) if axis > b else axis

    def _around_batch(self, value: ir.Value) -> tuple[list[int], list[int]]:
        """The static dims before and after the rows in the expanded form (``o``/``i`` of a merged axis too)."""
        b, shape = self.batch_axis(value), self.shape(value)
        outer, inner = self.split(value)
        if self.merged(value):
            return [*shape[:b], outer], [inner, *shape[b + 1:]]
        return list(shape[:b]), list(shape[b + 1:])

    def _cached(self, key: tuple, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- values ---------------------------------------------------------------------------------------
    def const(self, value: ir.Value) -> ir.Value:
        """A tensor that is the same for samples and references, in a form that broadcasts against any rows.

        A row-constant tensor (sized from the batch but equal in every row, like a zero initial state) is
        replaced by its first row; any other constant is returned as is.
        """
        axis = self.lowered.batch_axes.get(value.name)
        if not isinstance(axis, int) or value.name not in self.lowered.row_constant:
            return value
        return self._cached(("first_row", value.name),
                            lambda: self.build.slice(value, [0], [1], [axis], hint="first_row"))

    def x(self, value: ir.Value) -> ir.Value:
        """The sample side (n rows) of a variable tensor; a constant tensor is its own."""
        return self.side(value, "x")

    def r(self, value: ir.Value) -> ir.Value:
        """The reference side (m rows) of a variable tensor; a constant tensor is its own."""
        return self.side(value, "r")

    def split_rows(self, stacked: ir.Value, like: ir.Value | None = None) -> tuple[ir.Value, ir.Value]:
        """``(x, r)``: the sample rows (the first n) and the reference rows (the other m) of a tensor computed
        on the stacked ``[X; R]`` and laid out like ``like`` (default: ``stacked`` itself, a forward tensor).

        One Split (sizes ``[n, m]`` as fed; two Slices before opset 13) on the batch axis, or on the batch
        factor of a merged axis (reshaped there and back).
        """
        like = like if like is not None else stacked
        key = ("rows", stacked.name)
        if key in self._cache:
            return self._cache[key]
        b, shape = self.batch_axis(like), self.shape(like)
        dtype = ir.DataType.from_numpy(self.dtype(like))
        before, after = self._around_batch(like)
        merged = self.merged(like)
        rows = self.build.reshape(stacked, [*before, -1, *after]) if merged else stacked
        axis = len(before) if merged else b
        if self.build.opset >= 13:
            sizes = self._cached(("row_sizes",), lambda: self.build.concat([self.sizes.n, self.sizes.m], 0,
                                                                           hint="row_sizes"))
            parts = self.build.op_multi("Split", [rows, sizes], {"axis": axis}, hint="rows", num_outputs=2)
        else:
            parts = [self.build.slice(rows, self.build.ints([0]), self.sizes.n, [axis], hint="x"),
                     self.build.slice(rows, self.sizes.n, self.build.ints([INT64_MAX]), [axis], hint="r")]
        sides = []
        for part, named in zip(parts, ("n", "m")):
            if not merged:
                sides.append(self._typed(part, [*shape[:b], named, *shape[b + 1:]], dtype))
                continue
            self._typed(part, [*before, named, *after], dtype)
            outer, inner = self.split(like)
            sides.append(self._typed(self.build.reshape(part, [*shape[:b], -1, *shape[b + 1:]]),
                                     [*shape[:b], f"{named}*{outer * inner}", *shape[b + 1:]], dtype))
        self._cache[key] = tuple(sides)
        return self._cache[key]

    @staticmethod
    def _typed(value: ir.Value, dims: list, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Value:
        """Record ``value``'s shape, with ``n``, ``m``, ``k`` and ``pairs`` (= n·m·k) as named dims: ONNX Runtime
        plans buffer reuse from shapes, and with unknown shapes its planner takes seconds per thousand nodes."""
        value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in dims])
        value.type = ir.TensorType(dtype)
        return value

    def side(self, value: ir.Value, which: str) -> ir.Value:
        """``x(value)`` or ``r(value)`` by name of the side ("x" or "r")."""
        if not self.is_variable(value):
            return self.const(value)
        return self._cached((which, value.name), lambda: self.split_rows(value)["xr".index(which)])

    def pair_x(self, value: ir.Value) -> ir.Value:
        """Sample values broadcastable against an expanded tensor: (n, 1, 1) at the batch position."""
        if not self.is_variable(value):
            return self.pair_constant(value)
        return self._cached(("pair_x", value.name), lambda: self.as_pairs(self.x(value), value, "x"))

    def pair_r(self, value: ir.Value) -> ir.Value:
        """Reference values broadcastable against an expanded tensor: (1, m, 1) at the batch position."""
        if not self.is_variable(value):
            return self.pair_constant(value)
        return self._cached(("pair_r", value.name), lambda: self.as_pairs(self.r(value), value, "r"))

    def as_pairs(self, side: ir.Value, like: ir.Value, which: str) -> ir.Value:
        """A tensor laid out like ``like``'s sample (``which="x"``) or reference side, as (n, 1, 1) or (1, m, 1)
        at the batch position of the expanded form."""
        before, after = self._around_batch(like)
        named = ["n", 1, 1] if which == "x" else [1, "m", 1]
        dtype = side.type.dtype if side.type is not None else ir.DataType.FLOAT
        if not self.merged(like):
            b = self.batch_axis(like)
            pairs = self.build.unsqueeze(side, [b + 1, b + 2] if which == "x" else [b, b + 2])
        else:
            pairs = self.build.reshape(side, [*before, *[-1 if isinstance(d, str) else d for d in named], *after])
        return self._typed(pairs, [*before, *named, *after], dtype)

    def pair_side(self, value: ir.Value, which: str) -> ir.Value:
        return self.pair_x(value) if which == "x" else self.pair_r(value)

    def pair_delta(self, value: ir.Value) -> ir.Value:
        """``Δ = x − r`` per pair, shape (n, m, 1) at the batch position."""
        return self._cached(("delta", value.name), lambda: self.build.op(
            "Sub", [self.pair_x(value), self.pair_r(value)], hint="delta"))

    def pair_mean(self, value: ir.Value) -> ir.Value:
        """``(x + r) / 2`` per pair: the Shapley weight of the other player in a product.

        A piece of a Split (LSTM gates) takes its piece of the mean of the whole: one Add, Mul and Split for
        all the pieces instead of one each.
        """
        key = ("mean", value.name)
        if key not in self._cache and not self._split_pair_means(value):
            self._cache[key] = self.build.op("Mul", [self.build.op("Add", [self.pair_x(value), self.pair_r(value)]),
                                                    self.build.scalar(0.5)], hint="pair_mean")
        return self._cache[key]

    def _split_pair_means(self, value: ir.Value) -> bool:
        """Cache the pair means of every output of the Split that made ``value`` from the mean of its input (on
        an axis that is not the batch's); False when ``value`` is not such a piece."""
        node = value.producer()
        if node is None or node.op_type != "Split" or node.domain not in ("", "ai.onnx") or \
                not self.is_variable(node.inputs[0]) or not all(self.is_variable(o) for o in node.outputs):
            return False
        whole = node.inputs[0]
        axis = node.attributes.get_int("axis", 0)
        axis = axis + self.rank(whole) if axis < 0 else axis
        if axis == self.batch_axis(whole) or self.merged(whole) or \
                any(self.batch_axis(o) != self.batch_axis(whole) or self.merged(o) for o in node.outputs):
            return False
        sizes = [self.shape(o)[axis] for o in node.outputs]
        pieces = self.build.split(self.pair_mean(whole), self.expanded_axis(whole, axis), sizes, hint="pair_mean")
        for out, piece in zip(node.outputs, pieces):
            self._cache[("mean", out.name)] = piece
        return True

    def pair_average(self, x_side: ir.Value, r_side: ir.Value, like: ir.Value, finite: bool = False) -> ir.Value:
        """``(x_side + r_side) / 2`` per pair, for slopes computed separately on the sample side (n rows) and
        the reference side (m rows) in ``like``'s layout: the end-point average of a slope, always finite.

        Each side is halved before the sides meet (n + m rows, not n·m: the pair-sized work is one Add), and,
        unless the caller knows the sides are ``finite``, its non-finite entries (``√`` or ``log`` at 0) are set
        to 0. A slope is only ever used where it predicts the pair's change to within rounding
        (:func:`onnxshap.rules.elementwise.rescale_factor`), so a replaced entry cannot make a value wrong; a
        finite slope is what lets that rule skip guarding ``Δs = 0``.
        """
        halves = [self._half(side, finite) for side in (x_side, r_side)]
        return self.build.op("Add", [self.as_pairs(halves[0], like, "x"), self.as_pairs(halves[1], like, "r")],
                             hint="pair_average")

    def _half(self, value: ir.Value, finite: bool) -> ir.Value:
        """``value / 2``, and 0 where not finite unless ``finite`` (``v − v`` is 0 exactly for finite ``v``,
        NaN for ±inf and NaN)."""
        b = self.build
        half = b.op("Mul", [value, b.scalar(0.5)])
        if finite:
            return half
        is_finite = b.op("Equal", [b.op("Sub", [half, half]), b.scalar(0.0)])
        return b.op("Where", [is_finite, half, b.scalar(0.0)])

    def pair_constant(self, value: ir.Value, like: ir.Value | None = None) -> ir.Value:
        """A batch-independent tensor reshaped to broadcast against expanded tensors shaped like ``like``.

        Constants broadcast right-aligned; the expanded form has two more axes after the batch axis, so a
        constant of full rank needs two unit axes inserted there. A row-constant tensor counts by its first row.
        """
        like = like or value
        if value.name in self.lowered.row_constant:
            axis = self.lowered.batch_axes[value.name]
            shape = tuple(1 if i == axis else d for i, d in enumerate(self.shape(value)))
        else:
            shape = tuple(value.shape) if value.shape is not None else self.shape(value)
        value = self.const(value)
        if not self.is_variable(like):
            return value
        b, rank = self.batch_axis(like), self.rank(like)
        if len(shape) <= rank - b - 1:
            return value  # only covers axes after the batch: broadcasts as is
        padded = (1,) * (rank - len(shape)) + tuple(shape)
        extra = (1,) * (self.expanded_rank(like) - rank)
        return self.build.reshape(value, list(padded[: b + 1] + extra + padded[b + 1:]))

    # -- multiplier layouts ---------------------------------------------------------------------------
    def shape_with_pairs(self, before: list[int], after: list[int], k: bool = True) -> ir.Value:
        """A Reshape target ``before + [-1, m, k] + after`` (``[-1, m] + after`` without k), m and k as fed."""
        key = ("pair_shape", tuple(before), tuple(after), k)
        parts = [self.build.ints([*before, -1]), self.sizes.m, *([self.sizes.k] if k else []), self.build.ints(after)]
        return self._cached(key, lambda: self.build.concat(parts, 0, hint="pair_shape"))

    def expand(self, multiplier: ir.Value, like: ir.Value) -> ir.Value:
        """P-form → expanded form ``shape[:b] + (n, m, k) + shape[b+1:]`` (``(o, n, m, k, i)`` when merged).

        Made once per multiplier and layout; a multiplier that :meth:`collapse` made gets its expanded form back.
        """
        before, after = self._around_batch(like)
        return self._cached(("expanded", multiplier.name, tuple(before), tuple(after)), lambda: self._typed(
            self.build.reshape(multiplier, self.shape_with_pairs(before, after)), [*before, "n", "m", "k", *after]))

    def collapse(self, expanded: ir.Value, like: ir.Value, remember: bool = False) -> ir.Value:
        """Expanded form → P-form of ``like``'s shape; ``remember``: :meth:`expand` of the result gives
        ``expanded`` back (only for a tensor known to have exactly the expanded shape of ``like``)."""
        b, shape = self.batch_axis(like), self.shape(like)
        collapsed = self._typed(self.build.reshape(expanded, [*shape[:b], -1, *shape[b + 1:]]), self.p_shape(like))
        if remember:
            before, after = self._around_batch(like)
            self._cache[("expanded", collapsed.name, tuple(before), tuple(after))] = expanded
        return collapsed

    def p_shape(self, like: ir.Value) -> list:
        """``like``'s P-form shape with named dims: ``pairs`` (n·m·k rows) at the batch position."""
        b, shape = self.batch_axis(like), self.shape(like)
        outer, inner = self.split(like)
        rows = "pairs" if not self.merged(like) else f"pairs*{outer * inner}"
        return [*shape[:b], rows, *shape[b + 1:]]

    def scale(self, multiplier: Multiplier, factor: ir.Value, out: ir.Value) -> Scaled:
        """``multiplier`` of ``out`` times a per-pair ``factor`` (expanded, k = 1), kept lazy."""
        if isinstance(multiplier, Scaled):
            combined = self.build.op("Mul", [multiplier.factor, factor], hint="combined_factor")
            return replace(multiplier, factor=combined, like=out)
        return Scaled(multiplier, factor, out)

    def materialize(self, multiplier: Multiplier | None) -> ir.Value | None:
        """The P-form tensor of a multiplier (applies a pending per-pair factor)."""
        if not isinstance(multiplier, Scaled):
            return multiplier
        like, tiles = multiplier.like, multiplier.tiles
        if tiles is None:
            product = self.build.op("Mul", [self.expand(multiplier.base, like), multiplier.factor], hint="scaled")
        else:
            product = tiles.times(self.build, self.expand(multiplier.base, tiles.source), multiplier.factor)
        return self.collapse(product, like, remember=True)  # the factor is per pair: the base's shape

    def add(self, a: Multiplier | None, b: Multiplier | None) -> Multiplier | None:
        """The sum of two multipliers of one tensor (either may be absent)."""
        if a is None or b is None:
            return a if b is None else b
        return self.build.op("Add", [self.materialize(a), self.materialize(b)])

    def unbroadcast(self, multiplier: Multiplier, out: ir.Value, into: ir.Value) -> Multiplier:
        """A multiplier of ``out`` as one of ``into``, which numpy-broadcast to ``out``'s shape: sum over the
        broadcast axes (a lazy multiplier stays lazy when nothing was broadcast)."""
        out_shape, in_shape = self.shape(out), self.shape(into)
        if out_shape == in_shape and self.batch_axis(out) == self.batch_axis(into):
            return replace(multiplier, like=into) if isinstance(multiplier, Scaled) else multiplier
        multiplier = self.materialize(multiplier)
        b = self.batch_axis(out)
        padded = (1,) * (len(out_shape) - len(in_shape)) + tuple(in_shape)
        axes = [i for i, (o, s) in enumerate(zip(out_shape, padded)) if s == 1 and o != 1 and i != b]
        # summed in float64: ONNX Runtime's float32 ReduceSum accumulates in order, off by ~count·eps for
        # equal terms (3e-3 over the 3e6 copies an Expand → ReduceMean makes)
        wide = self.build.reduce("ReduceSum", self.build.cast(multiplier, ir.DataType.DOUBLE), axes, keepdims=True)
        summed = self.build.cast(wide, ir.DataType.FLOAT)
        if len(padded) == len(in_shape):
            return summed
        return self.build.reshape(summed, [-1 if i == self.batch_axis(into) else d for i, d in enumerate(in_shape)])

    def pair_rows(self) -> ir.Value:
        """1-D int64: ``[n·m·k]``, the number of P-form rows."""
        return self._cached(("rows",), lambda: self.build.op(
            "Mul", [self.build.op("Mul", [self.sizes.n, self.sizes.m]), self.sizes.k], hint="pair_rows"))

    def zeros(self, like: ir.Value) -> ir.Value:
        """A P-form zero multiplier for ``like``."""
        b, shape = self.batch_axis(like), self.shape(like)
        outer, inner = self.split(like)
        rows = self.pair_rows() if not self.merged(like) else self.build.op(
            "Mul", [self.pair_rows(), self.build.ints([outer * inner])])
        target = self.build.concat([self.build.ints(shape[:b]), rows, self.build.ints(shape[b + 1:])], 0)
        return self.build.op("Expand", [self.build.const(np.zeros(1, np.float32), "zero"), target])

    def onehot(self, index: ir.Value, depth: int, axis: int = -1) -> ir.Value:
        """Float32 one-hot of an int64 ``index`` tensor with ``depth`` classes along ``axis``."""
        values = self.build.const(np.array([0, 1], np.float32), "onehot")
        return self.build.op("OneHot", [index, self.build.ints([depth]), values], {"axis": axis})
