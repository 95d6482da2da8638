"""Max-type family: MaxPool, GlobalMaxPool, ReduceMax, ReduceMin — the cross-max rule.

For a window with maxima ``z_x`` (sample) and ``z_r`` (reference) and ``c = max(z_x, z_r)``, route
``M_z ⊙ (c − z_r)`` to the argmax of the x window and ``M_z ⊙ (z_x − c)`` to the argmax of the r window
(overlapping windows add up), then divide by ``Δa`` (zero where ``|Δa| < 1e-7``, where nothing is routed).
Summed over a window the routed amounts are ``z_x − z_r = Δz``, so the rule is additive by construction.
For min-type ops ``c = min(z_x, z_r)`` and the argmin; the same formulas hold.

MaxPool's windows are gathered with a depthwise Conv whose kernel is the identity over window positions
(im2col); the one-hot of the first maximum in each window (ArgMax picks the first, like MaxPool's Indices)
is routed back with the matching ConvTranspose (col2im), which sums overlapping windows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap.emit import op_attr
from onnxshap.pairs import PairContext
from onnxshap.rules.linear import reduce_axes
from onnxshap.rules.registry import register

TINY_DELTA = 1e-7
LOWEST = float(np.finfo(np.float32).min)


def _cross_weights(ctx: PairContext, z: ir.Value, minimum: bool):
    """Per pair ``(c − z_r, z_x − c)`` with ``c`` the max (or min) of the two window values."""
    e = ctx.emit
    z_x, z_r = ctx.pair_x(z), ctx.pair_r(z)
    c = e.op("Min" if minimum else "Max", [z_x, z_r], hint="cross_max")
    return e.op("Sub", [c, z_r]), e.op("Sub", [z_x, c])


def _divide_by_delta(ctx: PairContext, routed: ir.Value, a: ir.Value) -> ir.Value:
    e = ctx.emit
    delta = ctx.pair_delta(a)
    tiny = e.op("Less", [e.op("Abs", [delta]), e.scalar(TINY_DELTA)])
    safe = e.op("Where", [tiny, e.scalar(1.0), delta])
    return e.op("Where", [tiny, e.scalar(0.0), e.op("Div", [routed, safe])])


def _maxpool_check(ctx: PairContext, node: ir.Node) -> str | None:
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return "MaxPool whose Indices output is used is not supported"
    if op_attr(node, "storage_order", 0):
        return "MaxPool with storage_order=1 is not supported"
    return None


def _window_geometry(ctx: PairContext, node: ir.Node):
    a = node.inputs[0]
    kernel = list(op_attr(node, "kernel_shape"))
    spatial = len(kernel)
    strides = list(op_attr(node, "strides", [1] * spatial))
    dilations = list(op_attr(node, "dilations", [1] * spatial))
    pads = list(op_attr(node, "pads", [0] * (2 * spatial)))
    in_size, out_size = ctx.shape(a)[2:], ctx.shape(node.outputs[0])[2:]
    ends = pads[spatial:]
    for i in range(spatial):  # ceil_mode: extend the end pad until a floor-mode window count matches
        while (in_size[i] + pads[i] + ends[i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 < out_size[i]:
            ends[i] += 1
    return kernel, strides, dilations, pads[:spatial], ends


def _identity_kernel(channels: int, kernel: list[int]) -> np.ndarray:
    """(C·K, 1, *kernel): output channel ``c·K + j`` copies window position ``j`` of channel ``c``."""
    size = int(np.prod(kernel))
    eye = np.eye(size, dtype=np.float32).reshape(size, 1, *kernel)
    return np.tile(eye, (channels, 1) + (1,) * len(kernel))


@register("MaxPool", family="max-type", check=_maxpool_check)
def max_pool(ctx: PairContext, node: ir.Node, outs):
    e = ctx.emit
    a, z = node.inputs[0], node.outputs[0]
    channels = ctx.shape(a)[1]
    kernel, strides, dilations, begins, ends = _window_geometry(ctx, node)
    window = int(np.prod(kernel))
    weight = e.const(_identity_kernel(channels, kernel), "window_identity")
    conv_attrs = {"group": channels, "strides": strides, "dilations": dilations}
    out_spatial = list(ctx.shape(z)[2:])

    def first_max_onehot(side: str) -> ir.Value:
        value = ctx.side(a, side)
        if any(begins) or any(ends):
            zeros = [0, 0]
            value = e.op("Pad", [value, e.ints(zeros + begins + zeros + ends), e.scalar(LOWEST)],
                         {"mode": "constant"})
        patches = e.op("Conv", [value, weight], conv_attrs, hint="im2col")
        patches = e.reshape(patches, [0, channels, window] + out_spatial)
        first = e.op("ArgMax", [patches], {"axis": 2, "keepdims": 0})
        onehot = e.op("OneHot", [first, e.ints([window]), e.const(np.array([0, 1], np.float32), "onehot")],
                      {"axis": 2})
        return onehot  # (rows, C, K, *out_spatial)

    onehot_x = e.unsqueeze(first_max_onehot("x"), [1, 2])
    onehot_r = e.unsqueeze(first_max_onehot("r"), [0, 2])
    to_x, to_r = _cross_weights(ctx, z, minimum=False)
    window_axis = 4  # expanded layout (n, m, k, C, K, *spatial)
    routed = e.op("Add", [e.op("Mul", [e.unsqueeze(to_x, [window_axis]), onehot_x]),
                          e.op("Mul", [e.unsqueeze(to_r, [window_axis]), onehot_r])])
    routed = e.op("Mul", [e.unsqueeze(ctx.expand(outs[0], z), [window_axis]), routed])
    columns = e.reshape(routed, [-1, channels * window] + out_spatial)
    in_size = ctx.shape(a)[2:]
    output_padding = [
        in_size[i] - ((out_spatial[i] - 1) * strides[i] - begins[i] - ends[i] + dilations[i] * (kernel[i] - 1) + 1)
        for i in range(len(kernel))
    ]
    col2im = {**conv_attrs, "pads": begins + ends}
    if any(output_padding):
        col2im["output_padding"] = output_padding
    summed = e.op("ConvTranspose", [columns, weight], col2im, hint="col2im")
    per_pair = _divide_by_delta(ctx, ctx.expand(summed, a), a)
    return [ctx.collapse(per_pair, a)]


def _reduce_check(ctx: PairContext, node: ir.Node) -> str | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is None:
        return f"{node.op_type} with computed axes is not supported"
    if ctx.batch_axis(node.inputs[0]) in _max_axes(ctx, node):
        return f"{node.op_type} over the batch axis: rows must be explained independently"
    return None


def _max_axes(ctx: PairContext, node: ir.Node) -> list[int]:
    if node.op_type == "GlobalMaxPool":
        return list(range(2, ctx.rank(node.inputs[0])))
    return reduce_axes(ctx, node)


@register("ReduceMax", "ReduceMin", "GlobalMaxPool", family="max-type", check=_reduce_check)
def reduce_max(ctx: PairContext, node: ir.Node, outs):
    e = ctx.emit
    a, z = node.inputs[0], node.outputs[0]
    axes = _max_axes(ctx, node)
    shape, rank = ctx.shape(a), ctx.rank(a)
    minimum = node.op_type == "ReduceMin"
    keep = [i for i in range(rank) if i not in axes]
    perm = keep + axes
    reduced = int(np.prod([shape[i] for i in axes]))

    def first_extreme_onehot(side: str) -> ir.Value:
        moved = e.transpose(ctx.side(a, side), perm)
        flat = e.reshape(moved, [0] * len(keep) + [reduced])
        first = e.op("ArgMin" if minimum else "ArgMax", [flat], {"axis": -1, "keepdims": 0})
        onehot = e.op("OneHot", [first, e.ints([reduced]), e.const(np.array([0, 1], np.float32), "onehot")])
        unflat = e.reshape(onehot, [0] * len(keep) + [shape[i] for i in axes])
        return e.transpose(unflat, [int(i) for i in np.argsort(perm)])

    b = ctx.batch_axis(a)
    onehot_x = e.unsqueeze(first_extreme_onehot("x"), [b + 1, b + 2])
    onehot_r = e.unsqueeze(first_extreme_onehot("r"), [b, b + 2])
    z_kept = z
    keepdims = node.op_type == "GlobalMaxPool" or op_attr(node, "keepdims", 1)
    m_z = ctx.expand(outs[0], z)
    to_x, to_r = _cross_weights(ctx, z_kept, minimum)
    if not keepdims:
        expanded_axes = [i + 2 if i > b else i for i in axes]
        m_z, to_x, to_r = (e.unsqueeze(v, expanded_axes) for v in (m_z, to_x, to_r))
    routed = e.op("Add", [e.op("Mul", [to_x, onehot_x]), e.op("Mul", [to_r, onehot_r])])
    per_pair = _divide_by_delta(ctx, e.op("Mul", [m_z, routed]), a)
    return [ctx.collapse(per_pair, a)] + [None] * (len(node.inputs) - 1)
