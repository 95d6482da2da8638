"""Rescale family: nonlinear elementwise ops, and the rescale factor every single-source rule shares.

A connected region of elementwise nodes whose only variable source is one tensor ``s`` computes ``t = g(s)``
elementwise (ReLU, sigmoid, SiLU = s·σ(s), GELU written out with Erf, LeakyReLU written as Where(s>0, s, αs),
x², ...). The whole region gets one rescale (``augment/fusion.py``):

    M_s = M_t ⊙ (g(s_x) − g(s_r)) / (s_x − s_r)

with ``g(s_x)``, ``g(s_r)`` already computed by the forward pass. A single nonlinear op is the one-node case:
DeepLIFT's rescale rule. Exact: ``M_s ⊙ Δs = M_t ⊙ Δt``.

The secant is replaced by the slope ``(g'(s_x) + g'(s_r)) / 2`` (forward-mode differentiation through the
region, per sample and per reference, not per pair) wherever the two agree to within the float32 rounding of
``t_x`` and ``t_r`` (:func:`rescale_factor`), which always holds as ``Δs → 0``. There the float32 secant's
rounding, ``~eps |t| / |Δs|``, would swamp the multiplier (10 % at ``|Δs| = 1e-6``) while the slope is accurate
to ``O(g‴ Δs²)``; the summation-to-delta error this trades in is within the rounding of ``t`` itself. An end
point whose derivative is not finite (``√`` at 0) counts as 0 in the average, so a slope is always finite and is
taken where ``Δs = 0`` (the change is 0 there up to rounding). The test is relative to the values, so the rule
gives the same φ in any units.

This module holds each elementwise op's partial derivatives (``∂y/∂inputᵢ`` as ONNX ops on the values of one
side) and the table entries of the nonlinear ones; the linear elementwise ops (Add, Sub, Neg, ...) and the
two-input Shapley ops (Mul, Div, Max, Min, Pow) take their derivatives from here for their own entries.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxshap.graph.builder import Builder
from onnxshap.graph.edit import op_attr
from onnxshap.rules.table import elementwise

ROUNDING = 4 * float(np.finfo(np.float32).eps)  # relative rounding of a float32 value computed by a few ops

# Ops whose derivative is finite wherever their inputs and output are: a fusion region of these only needs no
# guard on its slope (see PairContext.pair_average). Not here: Log, Sqrt, Reciprocal, Pow, Div and Tan (poles),
# Gelu and Mish (their derivatives square the input, which overflows float32 before the op does).
FINITE_SLOPES = frozenset({
    "Relu", "LeakyRelu", "PRelu", "ThresholdedRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Softplus", "Softsign", "Erf", "Exp", "Abs", "Sin", "Cos", "Clip", "Floor", "Ceil", "Round", "Sign",
    "Identity", "Cast", "Neg", "Add", "Sub", "Sum", "Mean", "Where", "Mul", "Max", "Min"})


def rescale_factor(b: Builder, change: ir.Value, delta: ir.Value, slope: ir.Value, magnitude: ir.Value) -> ir.Value:
    """The multiplier ``change / delta`` of a rescale, or ``slope`` where that secant is no more accurate.

    Args:
        b: the builder.
        change: the output's change ``Δt`` (or its Shapley share) per pair.
        delta: the input's change ``Δs`` per pair.
        slope: the average of the end-point derivatives, broadcastable against ``delta``; finite
            (:meth:`onnxshap.pairs.PairContext.pair_average` makes it so).
        magnitude: ``|t_x| + |t_r|`` (the values whose float32 rounding ``change`` carries).

    The slope is taken where ``|change − slope·delta| ≤ ROUNDING · magnitude``; elsewhere the secant
    ``change / delta``. Where ``delta`` is 0 the change is 0 up to the rounding of the output (same input, same
    output, within a few ulp however the kernel visits the element), so with a finite slope the test holds and
    the slope is taken: the secant's ``0/0`` there is never selected, and no pair-sized guard is built for it
    (the ``Equal``/``Cast``/``Add`` of :func:`nonzero` were 12 % of a stacked LSTM's explain time).
    """
    gap = b.op("Abs", [b.op("Sub", [change, b.op("Mul", [slope, delta])])])
    agrees = b.op("LessOrEqual", [gap, b.op("Mul", [magnitude, b.scalar(ROUNDING)])], hint="slope_agrees")
    return b.op("Where", [agrees, slope, b.op("Div", [change, delta], hint="secant")], hint="rescale")


def secant(b: Builder, change: ir.Value, delta: ir.Value) -> ir.Value:
    """``change / delta``, and 0 where ``delta`` is 0 (``change`` is 0 there: same input, same output)."""
    return b.op("Div", [change, nonzero(b, delta)], hint="secant")


def nonzero(b: Builder, delta: ir.Value) -> ir.Value:
    """``delta`` with its exact zeros replaced by 1, as ``delta + (delta == 0)``: the same numbers as a Where,
    which ONNX Runtime runs ~1.5× slower (6.8 against 10.1 ms with the Div after it, 6.8 M elements)."""
    return b.op("Add", [delta, b.cast(b.op("Equal", [delta, b.scalar(0.0)]), ir.DataType.FLOAT)], hint="safe_delta")


# -- derivatives: (builder, node, inputs of one side, output of that side) -> one partial per input ------------


def _one(b):
    return b.scalar(1.0)


def _step(b: Builder, a: ir.Value, threshold: float = 0.0) -> ir.Value:
    """1.0 where a > threshold else 0.0."""
    return b.cast(b.op("Greater", [a, b.scalar(threshold)]), ir.DataType.FLOAT)


def _where_positive(b: Builder, a: ir.Value, positive: ir.Value, other: ir.Value) -> ir.Value:
    return b.op("Where", [b.op("Greater", [a, b.scalar(0.0)]), positive, other])


def _hard_sigmoid_slope(b: Builder, a, alpha: float, beta: float):
    z = b.op("Add", [b.op("Mul", [a, b.scalar(alpha)]), b.scalar(beta)])
    inside = b.op("And", [b.op("Greater", [z, b.scalar(0.0)]), b.op("Less", [z, b.scalar(1.0)])])
    return b.op("Mul", [b.cast(inside, ir.DataType.FLOAT), b.scalar(alpha)])


def d_gelu(b: Builder, node, ins, y):
    """GELU: ``Φ(a) + a φ(a)`` exactly; the tanh approximation differentiated as written."""
    a = ins[0]
    if op_attr(node, "approximate", "none") == "tanh":
        c = math.sqrt(2 / math.pi)
        inner = b.product(b.op("Add", [a, b.product(b.scalar(0.044715), a, a, a)]), b.scalar(c))
        th = b.op("Tanh", [inner])
        sech2 = b.op("Sub", [_one(b), b.op("Mul", [th, th])])
        d_inner = b.product(b.op("Add", [_one(b), b.product(b.scalar(3 * 0.044715), a, a)]), b.scalar(c))
        left = b.product(b.scalar(0.5), b.op("Add", [_one(b), th]))
        return [b.op("Add", [left, b.product(b.scalar(0.5), a, sech2, d_inner)])]
    cdf = b.product(b.scalar(0.5), b.op("Add", [_one(b), b.op("Erf", [b.product(a, b.scalar(1 / math.sqrt(2)))])]))
    pdf = b.product(b.op("Exp", [b.product(a, a, b.scalar(-0.5))]), b.scalar(1 / math.sqrt(2 * math.pi)))
    return [b.op("Add", [cdf, b.product(a, pdf)])]


def d_clip(b: Builder, node, ins, y):
    """1 inside ``[min, max]``, 0 outside (bounds are constants here)."""
    inside = None
    for bound, op in ((ins[1] if len(ins) > 1 else None, "GreaterOrEqual"),
                      (ins[2] if len(ins) > 2 else None, "LessOrEqual")):
        if bound is not None:
            test = b.op(op, [ins[0], bound])
            inside = test if inside is None else b.op("And", [inside, test])
    return [_one(b) if inside is None else b.cast(inside, ir.DataType.FLOAT), None, None]


def d_pow(b: Builder, node, ins, y):
    """``∂a^p/∂a = p·a^(p−1)``, ``∂a^p/∂p = a^p·log a``."""
    a, p = ins
    p = b.cast(p, ir.DataType.FLOAT)  # the exponent may be an integer tensor
    return [b.product(p, b.op("Pow", [a, b.op("Sub", [p, _one(b)])])), b.product(y, b.op("Log", [a]))]


def d_mish(b: Builder, node, ins, y):
    """Mish ``a·tanh(softplus(a))``: ``tanh(sp) + a·sech²(sp)·σ(a)``."""
    a = ins[0]
    th = b.op("Tanh", [b.op("Softplus", [a])])
    sech2 = b.op("Sub", [_one(b), b.op("Mul", [th, th])])
    return [b.op("Add", [th, b.product(a, sech2, b.op("Sigmoid", [a]))])]


def d_none(b: Builder, node, ins, y):
    """Piecewise-constant or boolean ops: zero slope everywhere it exists."""
    return [None] * len(ins)


def d_select(b: Builder, node, ins, y):
    """``Where(c, a, b)``: 1 towards the chosen branch."""
    chosen = b.cast(ins[0], ir.DataType.FLOAT)
    return [None, chosen, b.op("Sub", [_one(b), chosen])]


def d_first_extreme(b: Builder, node, ins, y):
    """Max/Min of any number of inputs: 1 for the first input equal to the result, 0 for the others."""
    taken, partials = None, []
    for value in ins:
        hit = b.op("Equal", [value, y])
        if taken is not None:
            hit = b.op("And", [hit, b.op("Not", [taken])])
        taken = hit if taken is None else b.op("Or", [taken, hit])
        partials.append(b.cast(hit, ir.DataType.FLOAT))
    return partials


def d_identity(b, node, ins, y):
    return [_one(b)]


def d_neg(b, node, ins, y):
    return [b.scalar(-1.0)]


def d_add(b, node, ins, y):
    return [_one(b)] * len(ins)


def d_sub(b, node, ins, y):
    return [_one(b), b.scalar(-1.0)]


def d_mean(b, node, ins, y):
    return [b.scalar(1.0 / len(ins))] * len(ins)


def d_mul(b, node, ins, y):
    return [ins[1], ins[0]]


def d_div(b, node, ins, y):
    return [b.op("Reciprocal", [ins[1]]), b.op("Neg", [b.op("Div", [y, ins[1]])])]


def _alpha(node, default):
    return op_attr(node, "alpha", default)


SELU_GAMMA, SELU_ALPHA = 1.0507009873554805, 1.6732632423543772


OPS = [
    elementwise("Relu", lambda b, n, ins, y: [_step(b, ins[0])]),
    elementwise("LeakyRelu", lambda b, n, ins, y: [_where_positive(b, ins[0], _one(b), b.scalar(_alpha(n, 0.01)))]),
    elementwise("PRelu", lambda b, n, ins, y: [_where_positive(b, ins[0], _one(b), ins[1]), None]),
    elementwise("ThresholdedRelu", lambda b, n, ins, y: [_step(b, ins[0], _alpha(n, 1.0))]),
    elementwise("Elu", lambda b, n, ins, y: [
        _where_positive(b, ins[0], _one(b), b.op("Add", [y, b.scalar(_alpha(n, 1.0))]))]),
    elementwise("Selu", lambda b, n, ins, y: [_where_positive(
        b, ins[0], b.scalar(op_attr(n, "gamma", SELU_GAMMA)),
        b.op("Add", [y, b.scalar(op_attr(n, "gamma", SELU_GAMMA) * _alpha(n, SELU_ALPHA))]))]),
    elementwise("Celu", lambda b, n, ins, y: [_where_positive(
        b, ins[0], _one(b), b.op("Exp", [b.op("Div", [ins[0], b.scalar(_alpha(n, 1.0))])]))]),
    elementwise("Sigmoid", lambda b, n, ins, y: [b.product(y, b.op("Sub", [_one(b), y]))]),
    elementwise("HardSigmoid", lambda b, n, ins, y: [
        _hard_sigmoid_slope(b, ins[0], _alpha(n, 0.2), op_attr(n, "beta", 0.5))]),
    elementwise("HardSwish", lambda b, n, ins, y: [b.op("Add", [
        b.op("HardSigmoid", [ins[0]], {"alpha": 1 / 6, "beta": 0.5}),
        b.op("Mul", [ins[0], _hard_sigmoid_slope(b, ins[0], 1 / 6, 0.5)])])]),
    elementwise("Tanh", lambda b, n, ins, y: [b.op("Sub", [_one(b), b.op("Mul", [y, y])])]),
    elementwise("Softplus", lambda b, n, ins, y: [b.op("Sigmoid", [ins[0]])]),
    elementwise("Softsign", lambda b, n, ins, y: [b.op("Reciprocal", [
        b.op("Mul", [b.op("Add", [_one(b), b.op("Abs", [ins[0]])])] * 2)])]),
    elementwise("Gelu", d_gelu),
    elementwise("Mish", d_mish),
    elementwise("Erf", lambda b, n, ins, y: [
        b.product(b.op("Exp", [b.op("Neg", [b.op("Mul", [ins[0], ins[0]])])]), b.scalar(2 / math.sqrt(math.pi)))]),
    elementwise("Exp", lambda b, n, ins, y: [y]),
    elementwise("Log", lambda b, n, ins, y: [b.op("Reciprocal", [ins[0]])]),
    elementwise("Sqrt", lambda b, n, ins, y: [b.op("Div", [b.scalar(0.5), y])]),
    elementwise("Reciprocal", lambda b, n, ins, y: [b.op("Neg", [b.op("Mul", [y, y])])]),
    elementwise("Abs", lambda b, n, ins, y: [b.op("Sign", [ins[0]])]),
    elementwise("Sin", lambda b, n, ins, y: [b.op("Cos", [ins[0]])]),
    elementwise("Cos", lambda b, n, ins, y: [b.op("Neg", [b.op("Sin", [ins[0]])])]),
    elementwise("Tan", lambda b, n, ins, y: [b.op("Add", [_one(b), b.op("Mul", [y, y])])]),
    elementwise("Clip", d_clip),
    *(elementwise(op, d_none) for op in (
        "Floor", "Ceil", "Round", "Sign", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "Not",
        "And", "Or", "Xor", "IsNaN", "IsInf")),
]
