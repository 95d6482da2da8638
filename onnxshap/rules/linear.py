"""Linear family, arithmetic part: ``M_in = Jᵀ M_out``, the ordinary vector-Jacobian product.

A linear map ``y = L(a) + c`` has ``Δy = L(Δa)``, so multipliers pass through the transpose of ``L`` and
biases vanish. Ops here: Identity, Cast (float→float), Neg, Add, Sub, Sum, Mean, Mul/Div by a constant,
MatMul with one constant operand, Conv (VJP: ConvTranspose) and ConvTranspose (VJP: Conv) with constant
weights, ReduceSum, ReduceMean. Broadcasting is undone with ReduceSum (``PairContext.unbroadcast``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap.emit import const_array, op_attr
from onnxshap.pairs import PairContext
from onnxshap.rules.registry import register


@register("Identity", "Cast", family="linear")
def identity(ctx: PairContext, node: ir.Node, outs):
    if node.op_type == "Cast" and not np.issubdtype(ctx.dtype(node.outputs[0]), np.floating):
        return [None]
    return [outs[0]]


@register("Neg", family="linear")
def neg(ctx: PairContext, node: ir.Node, outs):
    return [ctx.emit.op("Neg", [outs[0]])]


@register("Add", "Sub", "Sum", "Mean", family="linear")
def add(ctx: PairContext, node: ir.Node, outs):
    out, multiplier = node.outputs[0], outs[0]
    if node.op_type == "Mean":
        multiplier = ctx.emit.op("Mul", [multiplier, ctx.emit.scalar(1.0 / len(node.inputs))])
    result = []
    for i, value in enumerate(node.inputs):
        if not ctx.is_variable(value):
            result.append(None)
            continue
        m_in = ctx.unbroadcast(multiplier, out, value)
        if node.op_type == "Sub" and i == 1:
            m_in = ctx.emit.op("Neg", [m_in])
        result.append(m_in)
    return result


def scale_by_constant(ctx: PairContext, node: ir.Node, multiplier: ir.Value) -> list[ir.Value | None]:
    """Mul or Div with exactly one variable input: ``M_a = M_y · c`` (or ``/ c`` for ``a / c``)."""
    out = node.outputs[0]
    a_index = 0 if ctx.is_variable(node.inputs[0]) else 1
    a, c = node.inputs[a_index], ctx.const(node.inputs[1 - a_index])
    if node.op_type == "Div" and a_index == 1:
        raise AssertionError("c / a is not linear in a; the elementwise rescale handles it")
    op = "Mul" if node.op_type == "Mul" else "Div"
    if ctx.dtype(node.inputs[1 - a_index]) != np.float32:  # multipliers are float32 whatever the tensor's float type
        c = ctx.emit.op("Cast", [c], {"to": ir.DataType.FLOAT})
    scaled = ctx.emit.op(op, [multiplier, c])
    result: list[ir.Value | None] = [None, None]
    result[a_index] = ctx.unbroadcast(scaled, out, a)
    return result


def matmul_linear(ctx: PairContext, node: ir.Node, multiplier: ir.Value):
    """``Y = A·W`` (W constant): ``M_A = M_Y·Wᵀ``; ``Y = W·B`` (W constant): ``M_B = Wᵀ·M_Y``."""
    a, b = node.inputs[0], node.inputs[1]
    emit = ctx.emit
    if ctx.is_variable(a):
        w = const_array(b)
        w = w.reshape(w.shape[-2:]) if w is not None and w.ndim > 2 else w
        if w is None:
            w_t = emit.transpose(b, [1, 0]) if ctx.rank(b) == 2 else None
        elif w.ndim == 1:
            return [emit.op("Mul", [emit.unsqueeze(multiplier, [-1]), emit.const(w, "matvec")]), None]
        else:
            w_t = emit.const(np.ascontiguousarray(w.T), "matmul_weight_t")
        return [emit.op("MatMul", [multiplier, w_t]), None]
    w = const_array(a)
    if w.ndim == 1:  # y[..., l] = Σ_j w_j B[..., j, l]
        return [None, emit.op("Mul", [emit.unsqueeze(multiplier, [-2]), emit.const(w.reshape(-1, 1), "vecmat")])]
    w = w.reshape(w.shape[-2:])
    return [None, emit.op("MatMul", [emit.const(np.ascontiguousarray(w.T), "matmul_weight_t"), multiplier])]


def _conv_check(ctx: PairContext, node: ir.Node) -> str | None:
    if any(ctx.is_variable(v) for v in node.inputs[1:]):
        return f"{node.op_type} with a weight or bias computed from the input is not supported"
    if node.op_type == "ConvTranspose" and op_attr(node, "output_shape") is not None:
        return "ConvTranspose with output_shape is not supported (export with explicit pads)"
    return None


def _window_attrs(node: ir.Node, spatial: int) -> dict:
    return {
        "strides": list(op_attr(node, "strides", [1] * spatial)),
        "pads": list(op_attr(node, "pads", [0] * (2 * spatial))),
        "dilations": list(op_attr(node, "dilations", [1] * spatial)),
        "group": int(op_attr(node, "group", 1)),
    }


@register("Conv", family="linear", check=_conv_check)
def conv(ctx: PairContext, node: ir.Node, outs):
    """``M_x = ConvTranspose(M_y, W)`` with the conv's strides, pads, dilations and groups; output_padding
    restores the input size the conv's floor division lost. For stride 1 the same map is a Conv with the
    kernel flipped in space and its channel axes swapped, padded by ``d·(k−1) − pad`` (faster in ONNX Runtime).
    """
    x, w = node.inputs[0], node.inputs[1]
    spatial = ctx.rank(x) - 2
    attrs = _window_attrs(node, spatial)
    kernel = ctx.shape(w)[2:]
    in_size, out_size = ctx.shape(x)[2:], ctx.shape(node.outputs[0])[2:]
    pads, strides, dilations = attrs["pads"], attrs["strides"], attrs["dilations"]
    weight = const_array(w)
    full = [dilations[i] * (kernel[i] - 1) for i in range(spatial)]
    flipped_pads = [full[i] - pads[i] for i in range(spatial)] + [full[i] - pads[spatial + i] for i in range(spatial)]
    wide = ctx.shape(x)[1] >= 8  # ONNX Runtime's blocked Conv pads channels to 8/16: no gain for a few
    if weight is not None and wide and all(s == 1 for s in strides) and all(p >= 0 for p in flipped_pads):
        groups = attrs["group"]
        c_out, c_in_group = weight.shape[:2]
        swapped = weight.reshape(groups, c_out // groups, c_in_group, *kernel).swapaxes(1, 2)
        swapped = swapped.reshape(groups * c_in_group, c_out // groups, *kernel)
        flipped = np.ascontiguousarray(np.flip(swapped, axis=tuple(range(2, 2 + spatial))))
        vjp_attrs = {"pads": flipped_pads, "dilations": dilations, "group": groups}
        m_x = ctx.emit.op("Conv", [outs[0], ctx.emit.const(flipped, "conv_vjp_weight")], vjp_attrs, hint="conv_vjp")
        return [m_x] + [None] * (len(node.inputs) - 1)
    output_padding = [
        in_size[i] - ((out_size[i] - 1) * strides[i] - pads[i] - pads[i + spatial] + dilations[i] * (kernel[i] - 1) + 1)
        for i in range(spatial)
    ]
    if any(output_padding):
        attrs["output_padding"] = output_padding
    m_x = ctx.emit.op("ConvTranspose", [outs[0], w], attrs, hint="conv_vjp")
    return [m_x] + [None] * (len(node.inputs) - 1)


@register("ConvTranspose", family="linear", check=_conv_check)
def conv_transpose(ctx: PairContext, node: ir.Node, outs):
    """``M_x = Conv(M_y, W)``: a conv with the same strides, pads, dilations, groups is its adjoint."""
    x = node.inputs[0]
    attrs = _window_attrs(node, ctx.rank(x) - 2)
    m_x = ctx.emit.op("Conv", [outs[0], node.inputs[1]], attrs, hint="convtranspose_vjp")
    return [m_x] + [None] * (len(node.inputs) - 1)


def reduce_axes(ctx: PairContext, node: ir.Node) -> list[int]:
    """The normalised axes a Reduce* node reduces (attribute or input form)."""
    rank = ctx.rank(node.inputs[0])
    axes = op_attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1]).tolist()
    if axes is None or len(axes) == 0:
        if op_attr(node, "noop_with_empty_axes", 0):
            return []
        axes = list(range(rank))
    return sorted(a + rank if a < 0 else a for a in axes)


def reduce_check(axes_of=reduce_axes):
    """A check for reduce-type ops: constant axes, never the batch axis (``axes_of(ctx, node)``)."""

    def check(ctx: PairContext, node: ir.Node) -> str | None:
        if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is None:
            return f"{node.op_type} with computed axes is not supported"
        if ctx.batch_axis(node.inputs[0]) in axes_of(ctx, node):
            return f"{node.op_type} reduces over the batch axis: rows must be explained independently"
        return None

    return check


@register("ReduceSum", "ReduceMean", family="linear", check=reduce_check())
def reduce_sum(ctx: PairContext, node: ir.Node, outs):
    """``M_a = broadcast(M_y)`` (divided by the window size for the mean)."""
    a = node.inputs[0]
    axes = reduce_axes(ctx, node)
    multiplier = outs[0]
    if not op_attr(node, "keepdims", 1):
        multiplier = ctx.emit.unsqueeze(multiplier, axes)
    if node.op_type == "ReduceMean":
        count = int(np.prod([ctx.shape(a)[i] for i in axes]))
        multiplier = ctx.emit.op("Mul", [multiplier, ctx.emit.scalar(1.0 / count)])
    target = [1 if i == ctx.batch_axis(a) else d for i, d in enumerate(ctx.shape(a))]
    return [ctx.emit.op("Expand", [multiplier, ctx.emit.ints(target)])] + [None] * (len(node.inputs) - 1)
