"""Rescale family and elementwise fusion.

A connected region of elementwise nodes whose only variable source is one tensor ``s`` computes ``t = g(s)``
elementwise (ReLU, sigmoid, SiLU = s·σ(s), GELU written out with Erf, LeakyReLU written as Where(s>0, s, αs),
x², ...). The whole region gets one rescale:

    M_s = M_t ⊙ (g(s_x) − g(s_r)) / (s_x − s_r)

with ``g(s_x)``, ``g(s_r)`` already computed by the forward pass (x side) and the reference pass. A single
nonlinear op is the one-node case: the rescale rule of DeepLIFT. Exact: ``M_s ⊙ Δs = M_t ⊙ Δt``.

The secant is replaced by the slope ``(g'(s_x) + g'(s_r)) / 2`` (forward-mode differentiation through the
region, per sample and per reference, not per pair) wherever the two agree to within the float32 rounding of
``t_x`` and ``t_r`` (:func:`rescale_factor`), which always holds as ``Δs → 0``. There the float32 secant's
rounding, ``~eps |t| / |Δs|``, would swamp the multiplier (10 % at ``|Δs| = 1e-6``) while the slope is accurate
to ``O(g‴ Δs²)``; the summation-to-delta error this trades in is within the rounding of ``t`` itself. A slope
that is not finite (``√`` at 0) never agrees, so the secant is used, and it is 0 where ``Δs = 0``.

``DERIVATIVES`` holds, per elementwise op, its partial derivatives ``∂y/∂input_i`` as ONNX ops on the values
of one side; ``is_linear`` says when an op is linear in its variable input (then the linear rule, a cheaper
pass-through, is used instead of a rescale).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxshap.emit import Emitter, op_attr
from onnxshap.pairs import PairContext

ROUNDING = 4 * float(np.finfo(np.float32).eps)  # relative rounding of a float32 value computed by a few ops

Derivative = Callable[[Emitter, ir.Node, list, ir.Value], list]


def rescale_factor(e: Emitter, change: ir.Value, delta: ir.Value, slope: ir.Value,
                   magnitude: ir.Value) -> ir.Value:
    """The multiplier ``change / delta`` of a rescale, or ``slope`` where that secant is no more accurate.

    Args:
        e: the emitter.
        change: the output's change ``Δt`` (or its Shapley share) per pair.
        delta: the input's change ``Δs`` per pair.
        slope: the average of the end-point derivatives, broadcastable against ``delta``.
        magnitude: ``|t_x| + |t_r|`` (the values whose float32 rounding ``change`` carries).

    The slope is taken where ``|change − slope·delta| ≤ ROUNDING · magnitude`` (false for an inf or NaN slope);
    elsewhere the secant, which is 0 where ``delta`` is 0 (``change`` is 0 there: same input, same output).
    """
    gap = e.op("Abs", [e.op("Sub", [change, e.op("Mul", [slope, delta])])])
    agrees = e.op("LessOrEqual", [gap, e.op("Mul", [magnitude, e.scalar(ROUNDING)])], hint="slope_agrees")
    safe = e.op("Where", [e.op("Equal", [delta, e.scalar(0.0)]), e.scalar(1.0), delta])
    return e.op("Where", [agrees, slope, e.op("Div", [change, safe], hint="secant")], hint="rescale")


def _f(e: Emitter, x: float) -> ir.Value:
    return e.scalar(x)


def _step(e: Emitter, a: ir.Value, threshold: float = 0.0) -> ir.Value:
    """1.0 where a > threshold else 0.0."""
    return e.op("Cast", [e.op("Greater", [a, _f(e, threshold)])], {"to": ir.DataType.FLOAT})


def _where_positive(e: Emitter, a: ir.Value, positive: ir.Value, other: ir.Value) -> ir.Value:
    return e.op("Where", [e.op("Greater", [a, _f(e, 0.0)]), positive, other])


def _mul(e, *values):
    out = values[0]
    for v in values[1:]:
        out = e.op("Mul", [out, v])
    return out


def _sigmoid_slope(e, y):  # σ' = y (1 − y)
    return _mul(e, y, e.op("Sub", [_f(e, 1.0), y]))


def _hard_sigmoid_slope(e, a, alpha, beta):
    z = e.op("Add", [e.op("Mul", [a, _f(e, alpha)]), _f(e, beta)])
    inside = e.op("And", [e.op("Greater", [z, _f(e, 0.0)]), e.op("Less", [z, _f(e, 1.0)])])
    return e.op("Mul", [e.op("Cast", [inside], {"to": ir.DataType.FLOAT}), _f(e, alpha)])


def _gelu(e: Emitter, node, ins, y):
    a = ins[0]
    if op_attr(node, "approximate", "none") in ("tanh", b"tanh"):
        c = math.sqrt(2 / math.pi)
        inner = _mul(e, e.op("Add", [a, _mul(e, _f(e, 0.044715), a, a, a)]), _f(e, c))
        th = e.op("Tanh", [inner])
        sech2 = e.op("Sub", [_f(e, 1.0), e.op("Mul", [th, th])])
        d_inner = _mul(e, e.op("Add", [_f(e, 1.0), _mul(e, _f(e, 3 * 0.044715), a, a)]), _f(e, c))
        left = _mul(e, _f(e, 0.5), e.op("Add", [_f(e, 1.0), th]))
        return [e.op("Add", [left, _mul(e, _f(e, 0.5), a, sech2, d_inner)])]
    cdf = _mul(e, _f(e, 0.5), e.op("Add", [_f(e, 1.0), e.op("Erf", [_mul(e, a, _f(e, 1 / math.sqrt(2)))])]))
    pdf = _mul(e, e.op("Exp", [_mul(e, a, a, _f(e, -0.5))]), _f(e, 1 / math.sqrt(2 * math.pi)))
    return [e.op("Add", [cdf, _mul(e, a, pdf)])]


def _clip(e, node, ins, y):
    a = ins[0]
    low = ins[1] if len(ins) > 1 and ins[1] is not None else None
    high = ins[2] if len(ins) > 2 and ins[2] is not None else None
    inside = None
    for bound, op in ((low, "GreaterOrEqual"), (high, "LessOrEqual")):
        if bound is not None:
            test = e.op(op, [a, bound])
            inside = test if inside is None else e.op("And", [inside, test])
    if inside is None:
        return [_f(e, 1.0), None, None]
    return [e.op("Cast", [inside], {"to": ir.DataType.FLOAT}), None, None]


def _pow(e, node, ins, y):
    a, p = ins
    p = e.op("Cast", [p], {"to": ir.DataType.FLOAT})  # the exponent may be an integer tensor
    d_a = _mul(e, p, e.op("Pow", [a, e.op("Sub", [p, _f(e, 1.0)])]))
    d_p = _mul(e, y, e.op("Log", [a]))
    return [d_a, d_p]


def _mish(e, node, ins, y):
    a = ins[0]
    sp = e.op("Softplus", [a])
    th = e.op("Tanh", [sp])
    sech2 = e.op("Sub", [_f(e, 1.0), e.op("Mul", [th, th])])
    return [e.op("Add", [th, _mul(e, a, sech2, e.op("Sigmoid", [a]))])]


def _zero(e, node, ins, y):
    return [None] * len(ins)


def _select(e, node, ins, y):
    cond = e.op("Cast", [ins[0]], {"to": ir.DataType.FLOAT})
    return [None, cond, e.op("Sub", [_f(e, 1.0), cond])]


def _first_extreme(e, node, ins, y):
    """Max/Min of any number of inputs: 1 for the first input equal to the result, 0 for the others."""
    taken, partials = None, []
    for value in ins:
        hit = e.op("Equal", [value, y])
        if taken is not None:
            hit = e.op("And", [hit, e.op("Not", [taken])])
        taken = hit if taken is None else e.op("Or", [taken, hit])
        partials.append(e.op("Cast", [hit], {"to": ir.DataType.FLOAT}))
    return partials


DERIVATIVES: dict[str, Derivative] = {
    "Identity": lambda e, n, ins, y: [_f(e, 1.0)],
    "Neg": lambda e, n, ins, y: [_f(e, -1.0)],
    "Add": lambda e, n, ins, y: [_f(e, 1.0), _f(e, 1.0)],
    "Sub": lambda e, n, ins, y: [_f(e, 1.0), _f(e, -1.0)],
    "Sum": lambda e, n, ins, y: [_f(e, 1.0)] * len(ins),
    "Mean": lambda e, n, ins, y: [_f(e, 1.0 / len(ins))] * len(ins),
    "Mul": lambda e, n, ins, y: [ins[1], ins[0]],
    "Div": lambda e, n, ins, y: [e.op("Reciprocal", [ins[1]]), e.op("Neg", [e.op("Div", [y, ins[1]])])],
    "Relu": lambda e, n, ins, y: [_step(e, ins[0])],
    "LeakyRelu": lambda e, n, ins, y: [
        _where_positive(e, ins[0], _f(e, 1.0), _f(e, op_attr(n, "alpha", 0.01)))],
    "PRelu": lambda e, n, ins, y: [_where_positive(e, ins[0], _f(e, 1.0), ins[1]), None],
    "ThresholdedRelu": lambda e, n, ins, y: [_step(e, ins[0], op_attr(n, "alpha", 1.0))],
    "Elu": lambda e, n, ins, y: [
        _where_positive(e, ins[0], _f(e, 1.0), e.op("Add", [y, _f(e, op_attr(n, "alpha", 1.0))]))],
    "Selu": lambda e, n, ins, y: [_where_positive(
        e, ins[0], _f(e, op_attr(n, "gamma", 1.0507009873554805)),
        e.op("Add", [y, _f(e, op_attr(n, "gamma", 1.0507009873554805) * op_attr(n, "alpha", 1.6732632423543772))]))],
    "Celu": lambda e, n, ins, y: [_where_positive(
        e, ins[0], _f(e, 1.0), e.op("Exp", [e.op("Div", [ins[0], _f(e, op_attr(n, "alpha", 1.0))])]))],
    "Sigmoid": lambda e, n, ins, y: [_sigmoid_slope(e, y)],
    "HardSigmoid": lambda e, n, ins, y: [
        _hard_sigmoid_slope(e, ins[0], op_attr(n, "alpha", 0.2), op_attr(n, "beta", 0.5))],
    "HardSwish": lambda e, n, ins, y: [e.op("Add", [
        e.op("HardSigmoid", [ins[0]], {"alpha": 1 / 6, "beta": 0.5}),
        e.op("Mul", [ins[0], _hard_sigmoid_slope(e, ins[0], 1 / 6, 0.5)])])],
    "Tanh": lambda e, n, ins, y: [e.op("Sub", [_f(e, 1.0), e.op("Mul", [y, y])])],
    "Softplus": lambda e, n, ins, y: [e.op("Sigmoid", [ins[0]])],
    "Softsign": lambda e, n, ins, y: [e.op("Reciprocal", [
        e.op("Mul", [e.op("Add", [_f(e, 1.0), e.op("Abs", [ins[0]])])] * 2)])],
    "Gelu": _gelu,
    "Mish": _mish,
    "Erf": lambda e, n, ins, y: [
        _mul(e, e.op("Exp", [e.op("Neg", [e.op("Mul", [ins[0], ins[0]])])]), _f(e, 2 / math.sqrt(math.pi)))],
    "Exp": lambda e, n, ins, y: [y],
    "Log": lambda e, n, ins, y: [e.op("Reciprocal", [ins[0]])],
    "Sqrt": lambda e, n, ins, y: [e.op("Div", [_f(e, 0.5), y])],
    "Reciprocal": lambda e, n, ins, y: [e.op("Neg", [e.op("Mul", [y, y])])],
    "Abs": lambda e, n, ins, y: [e.op("Sign", [ins[0]])],
    "Sin": lambda e, n, ins, y: [e.op("Cos", [ins[0]])],
    "Cos": lambda e, n, ins, y: [e.op("Neg", [e.op("Sin", [ins[0]])])],
    "Clip": _clip,
    "Pow": _pow,
    "Max": _first_extreme,
    "Min": _first_extreme,
    "Where": _select,
    "Cast": lambda e, n, ins, y: [_f(e, 1.0)],
}
for _op in ("Floor", "Ceil", "Round", "Sign", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal",
            "Not", "And", "Or", "Xor", "IsNaN", "IsInf"):
    DERIVATIVES[_op] = _zero

ELEMENTWISE_OPS = frozenset(DERIVATIVES)


def is_linear(ctx: PairContext, node: ir.Node) -> bool:
    """Whether ``node`` is linear in its variable inputs (so the linear rule is exact and cheaper)."""
    variable = [ctx.is_variable(v) for v in node.inputs]
    op = node.op_type
    if op in ("Identity", "Neg", "Add", "Sub", "Sum", "Mean"):
        return True
    if op == "Cast":
        return np.issubdtype(ctx.dtype(node.outputs[0]), np.floating) and np.issubdtype(
            ctx.dtype(node.inputs[0]), np.floating)
    if op == "Mul":
        return sum(variable) == 1
    if op == "Div":
        return variable == [True, False]
    if op == "Where":
        return not variable[0]
    return False


def region_source(ctx: PairContext, node: ir.Node, sources: dict[str, ir.Value]) -> ir.Value | None:
    """The single variable source of ``node``'s output through elementwise nodes, or None."""
    if node.op_type not in ELEMENTWISE_OPS or len(node.outputs) != 1 or node.domain not in ("", "ai.onnx"):
        return None
    out = node.outputs[0]
    variable_inputs = [v for v in node.inputs if ctx.is_variable(v)]
    if not variable_inputs:
        return None
    found = {sources.get(v.name, v).name: sources.get(v.name, v) for v in variable_inputs}
    if len(found) != 1:
        return None
    source = next(iter(found.values()))
    if ctx.shape(source) != ctx.shape(out) or ctx.lowered.batch_axes.get(source.name) != \
            ctx.lowered.batch_axes.get(out.name):
        return None
    if node.op_type == "Clip" and any(ctx.is_variable(v) for v in node.inputs[1:]):
        return None
    return source


class Fusion:
    """Region sources and the rescale from a region's exit tensor to its source."""

    def __init__(self, ctx: PairContext, nodes: list[ir.Node]) -> None:
        self.ctx = ctx
        self.source: dict[str, ir.Value] = {}
        for node in nodes:
            if all(not ctx.is_variable(v) for v in node.outputs):
                continue
            source = region_source(ctx, node, self.source)
            if source is not None:
                self.source[node.outputs[0].name] = source
        self._tangents: dict[tuple[str, str], ir.Value | None] = {}

    def source_of(self, value: ir.Value) -> ir.Value | None:
        return self.source.get(value.name)

    def rescale(self, multiplier: ir.Value, out: ir.Value) -> ir.Value:
        """``M_s`` from ``M_t`` for the exit tensor ``out`` of the region with source ``s``."""
        ctx, e = self.ctx, self.ctx.emit
        source = self.source[out.name]
        b = ctx.batch_axis(out)
        slope_x = self._tangent(out, source, "x")
        slope_r = self._tangent(out, source, "r")
        slope = e.op("Mul", [e.op("Add", [e.unsqueeze(slope_x, [b + 1, b + 2]),
                                          e.unsqueeze(slope_r, [b, b + 2])]), e.scalar(0.5)])
        magnitude = e.op("Add", [e.op("Abs", [ctx.pair_x(out)]), e.op("Abs", [ctx.pair_r(out)])])
        factor = rescale_factor(e, ctx.pair_delta(out), ctx.pair_delta(source), slope, magnitude)
        return ctx.scale(multiplier, factor, out, source)

    def _tangent(self, value: ir.Value, source: ir.Value, side: str) -> ir.Value:
        """d value / d source on one side (forward mode through the region), broadcast to value's shape."""
        t = self._tangent_or_none(value, source, side)
        if t is None:
            return self.ctx.emit.op("Mul", [self.ctx.side(value, side), self.ctx.emit.scalar(0.0)])
        return self.ctx.emit.op("Expand", [t, self.ctx.emit.op("Shape", [self.ctx.side(value, side)])])

    def _tangent_or_none(self, value: ir.Value, source: ir.Value, side: str) -> ir.Value | None:
        if value is source:
            return self.ctx.emit.scalar(1.0)
        key = (value.name, side)
        if key in self._tangents:
            return self._tangents[key]
        node = value.producer()
        e = self.ctx.emit
        tangent = None
        if self.source.get(value.name) is source and node is not None:
            inputs = [self.ctx.side(v, side) if v is not None else None for v in node.inputs]
            partials = DERIVATIVES[node.op_type](e, node, inputs, self.ctx.side(value, side))
            for v, partial in zip(node.inputs, partials):
                if partial is None or not self.ctx.is_variable(v):
                    continue
                inner = self._tangent_or_none(v, source, side)
                if inner is not None:
                    tangent = e.add(tangent, e.op("Mul", [partial, inner]))
        self._tangents[key] = tangent
        return tangent


def unfusable_reason(ctx: PairContext, node: ir.Node) -> str | None:
    """Why an elementwise node that could not join a region has no exact rule, or None."""
    if node.op_type in ("Mul", "Div", "Max", "Min", "Pow") or is_linear(ctx, node):
        return None
    return f"elementwise {node.op_type} whose variable input is broadcast to a larger output is not supported"
