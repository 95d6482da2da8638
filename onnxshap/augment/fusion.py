"""Elementwise fusion: regions of elementwise nodes with one variable source get one rescale.

A region is a connected set of elementwise nodes (entries with a derivative) whose variable inputs all trace
back, through elementwise nodes of the same shape and batch axis, to one tensor ``s``. For its exit tensor
``t = g(s)`` the sweep uses one rescale (``rules.elementwise.rescale_factor``)

    M_s = M_t ⊙ (t_x − t_r) / (s_x − s_r)      (the slope (g'(s_x) + g'(s_r))/2 where the secant is unreliable)

where ``g'`` is computed by forward-mode differentiation through the region, on each side, from each op's
table derivative. SiLU, GELU written out with Erf, Mish, HardSwish as x·HardSigmoid(x) are all one rescale:
exact, and more faithful than splitting them into products.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxshap.graph.edit import is_default_domain
from onnxshap.pairs import Multiplier, PairContext
from onnxshap.rules.elementwise import FINITE_SLOPES, rescale_factor, secant
from onnxshap.rules.table import OpRule

_ONE = object()  # the tangent of the source itself


def _plain_relu(out: ir.Value, source: ir.Value) -> bool:
    """Whether the region is one Relu of ``source``: its float32 secant is already exact, no slope needed.

    Both sides positive: ``Δt`` and ``Δs`` are the same float32 subtraction of the same values, the secant is
    exactly 1; both ≤ 0: ``Δt = 0``, the secant is 0; one of each: ``Δt`` is the positive side's value, exact,
    and ``|Δs| ≥ |Δt|``, so the quotient carries one rounding. The slope test of ``rescale_factor`` picks the
    same values in all three cases (it agrees only where the secant is 1 or 0), at ~10 more pair-sized ops.
    """
    node = out.producer()
    return node is not None and node.op_type == "Relu" and is_default_domain(node) and node.inputs[0] is source


def region_sources(ctx: PairContext, nodes: list[ir.Node], table: dict[str, OpRule]) -> dict[str, ir.Value]:
    """For every tensor computed inside a fusion region, by name: the region's single variable source."""
    sources: dict[str, ir.Value] = {}
    for node in nodes:
        entry = table.get(node.op_type)
        if entry is None or not entry.elementwise or len(node.outputs) != 1 or not is_default_domain(node):
            continue
        out = node.outputs[0]
        variable_inputs = [v for v in node.inputs if ctx.is_variable(v)]
        if not ctx.is_variable(out) or not variable_inputs:
            continue
        found = {sources.get(v.name, v).name: sources.get(v.name, v) for v in variable_inputs}
        if len(found) != 1:
            continue
        source = next(iter(found.values()))
        if ctx.shape(source) != ctx.shape(out) or ctx.split(source) != ctx.split(out) or \
                ctx.lowered.batch_axes.get(source.name) != ctx.lowered.batch_axes.get(out.name):
            continue
        if node.op_type == "Clip" and any(ctx.is_variable(v) for v in node.inputs[1:]):
            continue
        sources[out.name] = source
    return sources


class Fusion:
    """The rescale from a region's exit tensor to its source, with forward-mode tangents built once.

    Tangents are computed on the stacked ``[X; R]`` rows (n + m of them, every side at once) and split into
    the sample and reference sides only where a slope is needed.
    """

    def __init__(self, ctx: PairContext, sources: dict[str, ir.Value], table: dict[str, OpRule]) -> None:
        self.ctx, self.sources, self.table = ctx, sources, table
        self._tangents: dict[str, ir.Value | None] = {}
        self._from_data: dict[str, bool] = {}

    def source_of(self, value: ir.Value) -> ir.Value | None:
        return self.sources.get(value.name)

    def rescale(self, multiplier: Multiplier, out: ir.Value) -> Multiplier:
        """``M_s`` from ``M_t`` for the exit tensor ``out`` of the region with source ``s`` (lazy)."""
        ctx, b = self.ctx, self.ctx.build
        source = self.sources[out.name]
        if _plain_relu(out, source):
            return ctx.scale(multiplier, secant(b, ctx.pair_delta(out), ctx.pair_delta(source)), out)
        magnitude = b.op("Add", [b.op("Abs", [ctx.pair_x(out)]), b.op("Abs", [ctx.pair_r(out)])])
        factor = rescale_factor(b, ctx.pair_delta(out), ctx.pair_delta(source), self._slope(out, source), magnitude)
        return ctx.scale(multiplier, factor, out)

    def _slope(self, out: ir.Value, source: ir.Value) -> ir.Value:
        """``(g'(s_x) + g'(s_r)) / 2`` per pair (expanded, k = 1), from one tangent on the stacked rows."""
        b = self.ctx.build
        tangent = self._tangent(out, source)
        if tangent is None:
            return b.scalar(0.0)
        if not self._depends_on_data(tangent):  # a constant slope (a region of linear ops): in out's layout
            tangent = b.op("Expand", [tangent, b.op("Shape", [out])])
        x_side, r_side = self.ctx.split_rows(tangent, like=out)
        finite = all(v.producer().op_type in FINITE_SLOPES for v in self._region_order(out, source))
        return self.ctx.pair_average(x_side, r_side, out, finite=finite)

    def _tangent(self, value: ir.Value, source: ir.Value) -> ir.Value | None:
        """d value / d source on the stacked rows (None: zero), by forward mode through the region in
        topological order (no recursion: regions may be long). ``d source / d source = 1`` is not multiplied."""
        b = self.ctx.build
        for current in self._region_order(value, source):
            if current.name in self._tangents:
                continue
            node = current.producer()
            inners = [None if v is None or not self.ctx.is_variable(v) else
                      _ONE if v is source else self._tangents.get(v.name) for v in node.inputs]
            if node.op_type == "Where":  # the tangent of the chosen branch (no 0·inf from a weighted sum)
                branches = [b.scalar(0.0) if t is None else b.scalar(1.0) if t is _ONE else t for t in inners[1:]]
                self._tangents[current.name] = None if inners[1] is None and inners[2] is None else \
                    b.op("Where", [node.inputs[0], *branches])
                continue
            tangent = None
            partials = self.table[node.op_type].derivative(b, node, list(node.inputs), current)
            for partial, inner in zip(partials, inners):
                if partial is not None and inner is not None:
                    tangent = b.add(tangent, partial if inner is _ONE else b.op("Mul", [partial, inner]))
            self._tangents[current.name] = tangent
        return self._tangents[value.name]

    def _depends_on_data(self, value: ir.Value) -> bool:
        """Whether a tangent reads a variable tensor (else it is made of constants only)."""
        if value.name not in self._from_data:
            if value.name in self.ctx.lowered.shapes:
                found = self.ctx.is_variable(value)
            else:
                node = value.producer()
                found = node is not None and any(self._depends_on_data(v) for v in node.inputs if v is not None)
            self._from_data[value.name] = found
        return self._from_data[value.name]

    def _region_order(self, value: ir.Value, source: ir.Value) -> list[ir.Value]:
        """The region's tensors that ``value`` depends on, inputs before outputs."""
        order, seen, stack = [], set(), [(value, False)]
        while stack:
            current, expanded = stack.pop()
            if current is source or self.sources.get(current.name) is not source:
                continue
            if expanded:
                order.append(current)
                continue
            if current.name in seen:
                continue
            seen.add(current.name)
            stack.append((current, True))
            stack.extend((v, False) for v in current.producer().inputs
                         if v is not None and self.ctx.is_variable(v))
        return order
