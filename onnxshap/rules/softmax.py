"""Softmax family: Softmax and LogSoftmax along any axis, as their decomposition — never one rescale.

With ``s`` the maximum over both rows of a pair (shared by x and r, so it cancels exactly),
``e = exp(a − s)``, ``S = Σ e`` and

- Softmax ``y = e / S``: division rule ``M_e = M_y ⊙ ½(1/S_x + 1/S_r)``,
  ``M_S = −Σ M_y ⊙ (e_x + e_r) / (2 S_x S_r)``; the sum is linear (``M_e += M_S``); the exp is a rescale
  ``M_a = M_e ⊙ (e_x − e_r) / Δa`` (slope ``(e_x + e_r)/2`` where the float32 secant is unreliable).
- LogSoftmax ``y = a − log S``: ``M_a = M_y + M_e ⊙ (e_x − e_r)/Δa`` with
  ``M_e = −Σ M_y ⊙ (log S_x − log S_r)/(S_x − S_r)`` (log rescale; slope ``½(1/S_x + 1/S_r)`` where the
  secant is unreliable). Both rescales choose secant or slope with ``elementwise.rescale_factor``.

Equal to the unshifted decomposition ``exp(a) / Σ exp(a)``, computed stably; the shift is per pair.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxshap.graph.edit import op_attr
from onnxshap.pairs import PairContext
from onnxshap.rules.elementwise import rescale_factor
from onnxshap.rules.table import Family, rule


def _axis_check(ctx: PairContext, node: ir.Node) -> str | None:
    a = node.inputs[0]
    axis = op_attr(node, "axis", -1)
    axis = axis + ctx.rank(a) if axis < 0 else axis
    if axis == ctx.batch_axis(a):
        return f"{node.op_type} over the batch axis: rows must be explained independently"
    return None


def softmax(ctx: PairContext, node: ir.Node, outs):
    e = ctx.build
    a, y = node.inputs[0], node.outputs[0]
    b = ctx.batch_axis(a)
    axis = op_attr(node, "axis", -1)
    axis = axis + ctx.rank(a) if axis < 0 else axis
    axis = axis + 2 if axis > b else axis  # in the expanded layout
    a_x, a_r = ctx.pair_x(a), ctx.pair_r(a)
    shift = e.op("Max", [e.reduce("ReduceMax", a_x, [axis]), e.reduce("ReduceMax", a_r, [axis])], hint="shift")
    exp_x = e.op("Exp", [e.op("Sub", [a_x, shift])])
    exp_r = e.op("Exp", [e.op("Sub", [a_r, shift])])
    sum_x, sum_r = e.reduce("ReduceSum", exp_x, [axis]), e.reduce("ReduceSum", exp_r, [axis])
    m_y = ctx.expand(outs[0], y)
    half = e.scalar(0.5)

    if node.op_type == "Softmax":
        through_e = e.op("Mul", [e.op("Add", [e.op("Reciprocal", [sum_x]), e.op("Reciprocal", [sum_r])]), half])
        through_sum = e.op("Div", [e.op("Mul", [e.op("Add", [exp_x, exp_r]), half]), e.op("Mul", [sum_x, sum_r])])
        m_sum = e.reduce("ReduceSum", e.op("Mul", [m_y, through_sum]), [axis])
        m_e = e.op("Sub", [e.op("Mul", [m_y, through_e]), m_sum])
    else:
        log_x, log_r = e.op("Log", [sum_x]), e.op("Log", [sum_r])
        log_slope = e.op("Mul", [e.op("Add", [e.op("Reciprocal", [sum_x]), e.op("Reciprocal", [sum_r])]), half])
        log_factor = rescale_factor(e, e.op("Sub", [log_x, log_r]), e.op("Sub", [sum_x, sum_r]), log_slope,
                                    e.op("Add", [e.op("Abs", [log_x]), e.op("Abs", [log_r])]))
        m_e = e.op("Neg", [e.op("Mul", [e.reduce("ReduceSum", m_y, [axis]), log_factor])])

    exp_sum = e.op("Add", [exp_x, exp_r])
    exp_factor = rescale_factor(e, e.op("Sub", [exp_x, exp_r]), ctx.pair_delta(a), e.op("Mul", [exp_sum, half]),
                                exp_sum)
    m_a = e.op("Mul", [m_e, exp_factor])
    if node.op_type == "LogSoftmax":
        m_a = e.op("Add", [m_a, m_y])
    return [ctx.collapse(m_a, a)]


OPS = [rule(op, Family.SOFTMAX, softmax, check=_axis_check) for op in ("Softmax", "LogSoftmax")]
