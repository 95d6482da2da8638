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
from onnxshap.rules.elementwise import rescale_factor
from onnxshap.rules.table import OpRule


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
    """The rescale from a region's exit tensor to its source, with forward-mode tangents built once per side."""

    def __init__(self, ctx: PairContext, sources: dict[str, ir.Value], table: dict[str, OpRule]) -> None:
        self.ctx, self.sources, self.table = ctx, sources, table
        self._tangents: dict[tuple[str, str], ir.Value | None] = {}

    def source_of(self, value: ir.Value) -> ir.Value | None:
        return self.sources.get(value.name)

    def rescale(self, multiplier: Multiplier, out: ir.Value) -> Multiplier:
        """``M_s`` from ``M_t`` for the exit tensor ``out`` of the region with source ``s`` (lazy)."""
        ctx, b = self.ctx, self.ctx.build
        source = self.sources[out.name]
        slope = ctx.pair_average(self._tangent(out, source, "x"), self._tangent(out, source, "r"), out)
        magnitude = b.op("Add", [b.op("Abs", [ctx.pair_x(out)]), b.op("Abs", [ctx.pair_r(out)])])
        factor = rescale_factor(b, ctx.pair_delta(out), ctx.pair_delta(source), slope, magnitude)
        return ctx.scale(multiplier, factor, out)

    def _tangent(self, value: ir.Value, source: ir.Value, side: str) -> ir.Value:
        """d value / d source on one side, broadcast to the value's shape."""
        b, ctx = self.ctx.build, self.ctx
        tangent = self._tangent_or_none(value, source, side)
        if tangent is None:
            return b.op("Mul", [ctx.side(value, side), b.scalar(0.0)])
        return b.op("Expand", [tangent, b.op("Shape", [ctx.side(value, side)])])

    def _tangent_or_none(self, value: ir.Value, source: ir.Value, side: str) -> ir.Value | None:
        """Forward mode through the region, in topological order (no recursion: regions may be long)."""
        order = self._region_order(value, source)
        for current in order:
            key = (current.name, side)
            if key in self._tangents:
                continue
            node = current.producer()
            tangent = None
            inputs = [self.ctx.side(v, side) if v is not None else None for v in node.inputs]
            partials = self.table[node.op_type].derivative(self.ctx.build, node, inputs, self.ctx.side(current, side))
            for v, partial in zip(node.inputs, partials):
                if partial is None or not self.ctx.is_variable(v):
                    continue
                inner = self.ctx.build.scalar(1.0) if v is source else self._tangents.get((v.name, side))
                if inner is not None:
                    tangent = self.ctx.build.add(tangent, self.ctx.build.op("Mul", [partial, inner]))
            self._tangents[key] = tangent
        return self.ctx.build.scalar(1.0) if value is source else self._tangents[(value.name, side)]

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
