"""Linear family, arithmetic part: ``M_in = Jᵀ M_out``, the ordinary vector-Jacobian product.

A linear map ``y = L(a) + c`` has ``Δy = L(Δa)``, so multipliers pass through the transpose of ``L`` and
biases vanish. Ops here: Identity, Dropout (inference), Cast (float→float), Neg, Add, Sub, Sum, Mean,
Conv (VJP: ConvTranspose, or a flipped Conv for stride 1) and ConvTranspose (VJP: Conv) with constant weights,
ReduceSum, ReduceMean; and the one-constant-operand forms of Mul, Div and MatMul (whose entries live with
their two-variable Shapley rules in ``products.py``). Broadcasting is undone by the sweep.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap.graph.edit import const_array, is_used, normalize_axis, op_attr
from onnxshap.graph.windows import window_of
from onnxshap.pairs import PairContext
from onnxshap.rules.elementwise import d_add, d_identity, d_mean, d_neg, d_sub
from onnxshap.rules.table import linear


def identity(ctx: PairContext, node: ir.Node, outs):
    if not np.issubdtype(ctx.dtype(node.outputs[0]), np.floating):
        return []
    return [outs[0]]


def _float_cast(ctx: PairContext, node: ir.Node) -> bool:
    return all(np.issubdtype(ctx.dtype(v), np.floating) for v in (node.inputs[0], node.outputs[0]))


def _dropout_check(ctx: PairContext, node: ir.Node) -> str | None:
    if len(node.outputs) > 1 and is_used(node.outputs[1]):
        return "Dropout whose mask output is used is not supported"
    training = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if training is not None and bool(training):
        return "Dropout in training mode is not supported"
    return None


def neg(ctx: PairContext, node: ir.Node, outs):
    return [ctx.build.op("Neg", [outs[0]])]


def add(ctx: PairContext, node: ir.Node, outs):
    """Add/Sub/Sum/Mean: every variable input gets ``M_y`` (``−M_y`` for Sub's second, ``M_y/len`` for Mean)."""
    multiplier = outs[0]
    if node.op_type == "Mean":
        multiplier = ctx.build.op("Mul", [multiplier, ctx.build.scalar(1.0 / len(node.inputs))])
    result = [multiplier if ctx.is_variable(v) else None for v in node.inputs]
    if node.op_type == "Sub" and result[1] is not None:
        result[1] = ctx.build.op("Neg", [multiplier])
    return result


def scale_by_constant(ctx: PairContext, node: ir.Node, multiplier: ir.Value) -> list[ir.Value | None]:
    """Mul or Div with exactly one variable input: ``M_a = M_y · c`` (or ``/ c`` for ``a / c``), in the
    output's shape."""
    a_index = 0 if ctx.is_variable(node.inputs[0]) else 1
    c = ctx.const(node.inputs[1 - a_index])
    if node.op_type == "Div" and a_index == 1:
        raise AssertionError("c / a is not linear in a; the elementwise rescale handles it")
    if ctx.dtype(node.inputs[1 - a_index]) != np.float32:  # multipliers are float32 whatever the tensor's type
        c = ctx.build.cast(c, ir.DataType.FLOAT)
    result: list[ir.Value | None] = [None, None]
    result[a_index] = ctx.build.op("Mul" if node.op_type == "Mul" else "Div", [multiplier, c])
    return result


def matmul_linear(ctx: PairContext, node: ir.Node, multiplier: ir.Value):
    """``Y = A·W`` (W constant): ``M_A = M_Y·Wᵀ``; ``Y = W·B`` (W constant): ``M_B = Wᵀ·M_Y``."""
    a, b = node.inputs[0], node.inputs[1]
    build = ctx.build
    if ctx.is_variable(a):
        w = const_array(b)
        if w is None:
            return [build.op("MatMul", [multiplier, build.transpose(b, [1, 0])])]
        w = w.reshape(w.shape[-2:]) if w.ndim > 2 else w
        if w.ndim == 1:
            return [build.op("Mul", [build.unsqueeze(multiplier, [-1]), build.const(w, "matvec")])]
        return [build.op("MatMul", [multiplier, build.const(np.ascontiguousarray(w.T), "matmul_weight_t")])]
    w = const_array(a)
    if w.ndim == 1:  # y[..., l] = Σ_j w_j B[..., j, l]
        return [None, build.op("Mul", [build.unsqueeze(multiplier, [-2]), build.const(w.reshape(-1, 1), "vecmat")])]
    w = w.reshape(w.shape[-2:])
    return [None, build.op("MatMul", [build.const(np.ascontiguousarray(w.T), "matmul_weight_t"), multiplier])]


def _conv_check(ctx: PairContext, node: ir.Node) -> str | None:
    if any(ctx.is_variable(v) for v in node.inputs[1:]):
        return f"{node.op_type} with a weight or bias computed from the input is not supported"
    if node.op_type == "ConvTranspose" and op_attr(node, "output_shape") is not None:
        return "ConvTranspose with output_shape is not supported (export with explicit pads)"
    return None


def conv(ctx: PairContext, node: ir.Node, outs):
    """``M_x = ConvTranspose(M_y, W)`` with the conv's strides, pads, dilations and groups; output_padding
    restores the input size the conv's floor division lost. For stride 1 the same map is a Conv with the
    kernel flipped in space and its channel axes swapped, padded by ``d·(k−1) − pad`` (faster in ONNX Runtime:
    134 vs 206 ms for a 3×3, 64→32 channel VJP on 2 cores).
    """
    x, w = node.inputs[0], node.inputs[1]
    kernel = ctx.shape(w)[2:]
    window = window_of(node, ctx.shape(x)[2:], kernel)
    groups = int(op_attr(node, "group", 1))
    full = [d * (k - 1) for d, k in zip(window.dilations, kernel)]
    flipped_pads = [f - p for f, p in zip(full + full, window.begins + window.ends)]
    weight = const_array(w)
    wide = ctx.shape(x)[1] >= 8  # ONNX Runtime's blocked Conv pads channels to 8/16: no gain for a few
    if weight is not None and wide and all(s == 1 for s in window.strides) and min(flipped_pads) >= 0:
        c_out, c_in_group = weight.shape[:2]
        swapped = weight.reshape(groups, c_out // groups, c_in_group, *kernel).swapaxes(1, 2)
        swapped = swapped.reshape(groups * c_in_group, c_out // groups, *kernel)
        flipped = np.ascontiguousarray(np.flip(swapped, axis=tuple(range(2, 2 + len(kernel)))))
        attrs = {"pads": flipped_pads, "dilations": window.dilations, "group": groups}
        return [ctx.build.op("Conv", [outs[0], ctx.build.const(flipped, "conv_vjp_weight")], attrs, hint="conv_vjp")]
    attrs = {"strides": window.strides, "pads": window.pads, "dilations": window.dilations, "group": groups}
    output_padding = window.output_padding(ctx.shape(x)[2:], ctx.shape(node.outputs[0])[2:])
    if any(output_padding):
        attrs["output_padding"] = output_padding
    return [ctx.build.op("ConvTranspose", [outs[0], w], attrs, hint="conv_vjp")]


def conv_transpose(ctx: PairContext, node: ir.Node, outs):
    """``M_x = Conv(M_y, W)``: a conv with the same strides, pads, dilations, groups is its adjoint."""
    x = node.inputs[0]
    spatial = ctx.rank(x) - 2
    attrs = {"strides": list(op_attr(node, "strides", [1] * spatial)),
             "pads": list(op_attr(node, "pads", [0] * (2 * spatial))),
             "dilations": list(op_attr(node, "dilations", [1] * spatial)), "group": int(op_attr(node, "group", 1))}
    return [ctx.build.op("Conv", [outs[0], node.inputs[1]], attrs, hint="convtranspose_vjp")]


def reduce_axes(ctx: PairContext, node: ir.Node) -> list[int]:
    """The normalised axes a Reduce* node reduces (attribute or input form; GlobalMaxPool: the spatial axes)."""
    rank = ctx.rank(node.inputs[0])
    if node.op_type.startswith("Global"):
        return list(range(2, rank))
    axes = op_attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1]).tolist()
    if axes is None or len(axes) == 0:
        return [] if op_attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(normalize_axis(a, rank) for a in axes)


def reduce_check(ctx: PairContext, node: ir.Node) -> str | None:
    """Reduce-type ops: constant axes, never the batch axis."""
    if len(node.inputs) > 1 and node.inputs[1] is not None and const_array(node.inputs[1]) is None:
        return f"{node.op_type} with computed axes is not supported"
    if ctx.batch_axis(node.inputs[0]) in reduce_axes(ctx, node):
        return f"{node.op_type} reduces over the batch axis: rows must be explained independently"
    return None


def reduce_sum(ctx: PairContext, node: ir.Node, outs):
    """``M_a = broadcast(M_y)`` (divided by the window size for the mean)."""
    a = node.inputs[0]
    axes = reduce_axes(ctx, node)
    multiplier = outs[0]
    if not op_attr(node, "keepdims", 1):
        multiplier = ctx.build.unsqueeze(multiplier, axes)
    if node.op_type == "ReduceMean":
        count = int(np.prod([ctx.shape(a)[i] for i in axes]))
        multiplier = ctx.build.op("Mul", [multiplier, ctx.build.scalar(1.0 / count)])
    target = [1 if i == ctx.batch_axis(a) else d for i, d in enumerate(ctx.shape(a))]
    return [ctx.build.op("Expand", [multiplier, ctx.build.ints(target)])]


OPS = [
    linear("Identity", identity, derivative=d_identity),
    linear("Cast", identity, derivative=d_identity, is_linear=_float_cast),
    linear("Dropout", identity, check=_dropout_check),
    linear("Neg", neg, derivative=d_neg),
    linear("Add", add, derivative=d_add, broadcasts=True),
    linear("Sub", add, derivative=d_sub, broadcasts=True),
    linear("Sum", add, derivative=d_add, broadcasts=True),
    linear("Mean", add, derivative=d_mean, broadcasts=True),
    linear("Conv", conv, check=_conv_check),
    linear("ConvTranspose", conv_transpose, check=_conv_check),
    linear("ReduceSum", reduce_sum, check=reduce_check),
    linear("ReduceMean", reduce_sum, check=reduce_check),
]
