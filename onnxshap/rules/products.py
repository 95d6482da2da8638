"""Ops with two variable inputs from different sources: Shapley rules for two players.

With ``a`` and ``b`` the players and ``z = g(a, b)``, the exact 2-player Shapley split of ``Δz`` is

    Δz_a = ½[g(a_x, b_r) − g(a_r, b_r)] + ½[g(a_x, b_x) − g(a_r, b_x)],   Δz_b = Δz − Δz_a

and ``M_a = M_z ⊙ Δz_a / Δa``. For the common ops it has closed forms without division:

- product ``z = a·b``: ``M_a = M_z ⊙ (b_x + b_r)/2``, ``M_b = M_z ⊙ (a_x + a_r)/2``;
- division ``z = a/b``: ``M_a = M_z ⊙ ½(1/b_x + 1/b_r)``, ``M_b = −M_z ⊙ (a_x + a_r)/(2 b_x b_r)``;
- bilinear ``Z = A·B`` (MatMul): ``M_A = M_Z·((B_x + B_r)/2)ᵀ``, ``M_B = ((A_x + A_r)/2)ᵀ·M_Z``.

Max, Min and Pow with two variable inputs use the four-corner form (the slope of ``g`` in that input, averaged
over the x and r sides, where ``Δz_a / Δa`` is unreliable in float32: see ``elementwise.rescale_factor``); the
constant inputs of a variadic ``Max(a, b, c)`` take part in every corner unchanged.
With one variable input Mul/Div/MatMul are linear and go to the linear rules.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap.pairs import PairContext
from onnxshap.rules.elementwise import FINITE_SLOPES, d_div, d_first_extreme, d_mul, d_pow, rescale_factor
from onnxshap.rules.linear import matmul_linear, scale_by_constant
from onnxshap.rules.table import Derivative, Family, rule, shapley


def _aligned(ctx: PairContext, node: ir.Node) -> str | None:
    """Both variable inputs must carry the batch on the same axis counted from the right."""
    out = node.outputs[0]
    inputs = [v for v in node.inputs if ctx.is_variable(v)]
    if len(inputs) > 2:
        return f"{node.op_type} with more than two variable inputs is not supported"
    offsets = {ctx.rank(v) - ctx.batch_axis(v) for v in inputs} | {ctx.rank(out) - ctx.batch_axis(out)}
    if len(offsets) != 1 or len({ctx.split(v) for v in [*inputs, out]}) != 1:
        return f"{node.op_type} whose inputs carry the batch on different axes is not supported"
    return None


def mul(ctx: PairContext, node: ir.Node, outs):
    a, b = node.inputs
    if not (ctx.is_variable(a) and ctx.is_variable(b)):
        return scale_by_constant(ctx, node, outs[0])
    z = node.outputs[0]
    return [ctx.scale(outs[0], ctx.pair_mean(b), z), ctx.scale(outs[0], ctx.pair_mean(a), z)]


def div(ctx: PairContext, node: ir.Node, outs):
    """``z = a / b``: ``M_a = M_z ⊙ ½(1/b_x + 1/b_r)``, ``M_b = −M_z ⊙ ((a_x + a_r)/2 / b_x) / b_r``.

    The per-pair factors are float64 (cast back to float32 once): ``b_x·b_r`` leaves float32's range at
    ``|b| ≈ 1e19`` (or 1e-19) although ``z`` is moderate, and dividing twice keeps every intermediate at the
    size of ``z``.
    """
    a, b = node.inputs
    if not ctx.is_variable(b):
        return scale_by_constant(ctx, node, outs[0])
    e, z = ctx.build, node.outputs[0]

    def wide(value: ir.Value) -> ir.Value:
        return e.cast(value, ir.DataType.DOUBLE)

    bx, br = wide(ctx.pair_x(b)), wide(ctx.pair_r(b))
    half = e.scalar(0.5, np.float64)
    factor_a = e.op("Mul", [e.op("Add", [e.op("Reciprocal", [bx]), e.op("Reciprocal", [br])]), half])
    numerator = e.op("Mul", [e.op("Add", [wide(ctx.pair_x(a)), wide(ctx.pair_r(a))]), half]) \
        if ctx.is_variable(a) else wide(ctx.pair_constant(a, like=z))
    factor_b = e.op("Neg", [e.op("Div", [e.op("Div", [numerator, bx]), br])])
    m_a = ctx.scale(outs[0], e.cast(factor_a, ir.DataType.FLOAT), z) if ctx.is_variable(a) else None
    return [m_a, ctx.scale(outs[0], e.cast(factor_b, ir.DataType.FLOAT), z)]


def _bilinear_check(ctx: PairContext, node: ir.Node) -> str | None:
    a, b = node.inputs
    a_var, b_var = ctx.is_variable(a), ctx.is_variable(b)
    # A·B contracts A's last axis and B's second-to-last (a 1-D B's only axis)
    if a_var and ctx.batch_axis(a) == ctx.rank(a) - 1 or b_var and (
            ctx.rank(b) < 2 or ctx.batch_axis(b) == ctx.rank(b) - 2):
        return "MatMul that contracts over the batch axis mixes rows: not supported"
    if a_var and b_var and (ctx.batch_axis(a) >= ctx.rank(a) - 2 or ctx.batch_axis(b) >= ctx.rank(b) - 2):
        return "MatMul of two variable tensors with the batch on one of the matrix axes is not supported"
    if a_var and b_var:
        if ctx.shape(node.inputs[0])[:-2] != ctx.shape(node.inputs[1])[:-2]:
            return "MatMul of two variable tensors with broadcast leading axes is not supported"
        return _aligned(ctx, node)
    const = next(v for v in node.inputs if not ctx.is_variable(v))
    if len(ctx.shape(const)) > 2 and any(d != 1 for d in ctx.shape(const)[:-2]):
        return "MatMul with a batched constant operand is not supported"
    return None


def matmul(ctx: PairContext, node: ir.Node, outs):
    a, b = node.inputs
    if not (ctx.is_variable(a) and ctx.is_variable(b)):
        return matmul_linear(ctx, node, outs[0])
    e, z = ctx.build, node.outputs[0]
    m_z = ctx.expand(outs[0], z)
    rank = ctx.expanded_rank(z)
    swap = list(range(rank - 2)) + [rank - 1, rank - 2]
    m_a = e.op("MatMul", [m_z, e.transpose(ctx.pair_mean(b), swap)])
    m_b = e.op("MatMul", [e.transpose(ctx.pair_mean(a), swap), m_z])
    return [ctx.collapse(m_a, a), ctx.collapse(m_b, b)]


def four_corners(derivative: Derivative):
    """The exact 2-player Shapley split from the four corners (x/r of each input) for an op whose partials
    are ``derivative``; constant inputs (a variadic ``Max(a, b, c)``) stay where they are."""

    def four_corner_rule(ctx: PairContext, node: ir.Node, outs):
        players = [i for i, v in enumerate(node.inputs) if ctx.is_variable(v)]
        if len(players) != 2:
            raise AssertionError(f"{node.op_type} with one variable input belongs to an elementwise region")
        ia, ib = players
        a, b = node.inputs[ia], node.inputs[ib]
        e, z = ctx.build, node.outputs[0]

        def corner(side_a: str, side_b: str) -> ir.Value:
            args = [ctx.pair_side(a, side_a) if i == ia else ctx.pair_side(b, side_b) if i == ib
                    else ctx.pair_constant(v, like=z) for i, v in enumerate(node.inputs)]
            return e.op(node.op_type, args)

        g_xr, g_rx = corner("x", "r"), corner("r", "x")
        z_x, z_r = ctx.pair_x(z), ctx.pair_r(z)
        half = e.scalar(0.5)
        dz_a = e.op("Mul", [e.op("Add", [e.op("Sub", [g_xr, z_r]), e.op("Sub", [z_x, g_rx])]), half])
        dz_b = e.op("Mul", [e.op("Add", [e.op("Sub", [g_rx, z_r]), e.op("Sub", [z_x, g_xr])]), half])
        slopes = {side: derivative(e, node, [ctx.side(v, side) for v in node.inputs], ctx.side(z, side))
                  for side in ("x", "r")}
        magnitude = e.op("Mul", [e.op("Sum", [e.op("Abs", [v]) for v in (g_xr, g_rx, z_x, z_r)]), half])
        result: list = [None] * len(node.inputs)
        for index, player, dz in ((ia, a, dz_a), (ib, b, dz_b)):
            slope = ctx.pair_average(slopes["x"][index], slopes["r"][index], z,
                                     finite=node.op_type in FINITE_SLOPES)
            factor = rescale_factor(e, dz, ctx.pair_delta(player), slope, magnitude)
            result[index] = ctx.scale(outs[0], factor, z)
        return result

    return four_corner_rule


def _one_variable(ctx: PairContext, node: ir.Node) -> bool:
    return sum(ctx.is_variable(v) for v in node.inputs) == 1


def _numerator_only(ctx: PairContext, node: ir.Node) -> bool:
    return ctx.is_variable(node.inputs[0]) and not ctx.is_variable(node.inputs[1])


OPS = [
    shapley("Mul", Family.PRODUCT, mul, d_mul, is_linear=_one_variable, check=_aligned),
    shapley("Div", Family.DIVISION, div, d_div, is_linear=_numerator_only, check=_aligned),
    rule("MatMul", Family.BILINEAR, matmul, check=_bilinear_check),
    *(shapley(op, Family.SHAPLEY, four_corners(d), d, check=_aligned)
      for op, d in (("Max", d_first_extreme), ("Min", d_first_extreme), ("Pow", d_pow))),
]
