"""Max-type family: MaxPool, GlobalMaxPool, ReduceMax, ReduceMin — the cross-max rule.

For a window with maxima ``z_x`` (sample) and ``z_r`` (reference) and ``c = max(z_x, z_r)``, route
``M_z ⊙ (c − z_r)`` to the argmax of the x window and ``M_z ⊙ (z_x − c)`` to the argmax of the r window
(overlapping windows add up), then divide by ``Δa``. Summed over a window the routed amounts are
``z_x − z_r = Δz``, so the rule is additive by construction.

No threshold decides anything, so the rule is scale-equivariant. The amount routed to an element is never larger
than its ``|Δa|``, also in float32: at the x argmax ``a_x = z_x`` and ``a_r ≤ z_r``, so
``fl(z_x − a_r) ≥ fl(z_x − z_r) = fl(c − z_r)`` when ``z_x ≥ z_r`` (rounding is monotonic) and the amount is 0
otherwise; the r argmax is the mirror image. Where ``Δa`` is exactly 0 the amount is exactly 0
(``z_x = a_r ≤ z_r`` gives ``c = z_r``), so the quotient is taken with ``Δa`` replaced by 1 there and is 0; where
``Δa`` is tiny but not zero the amount is as tiny and the quotient (at most 1 per window sharing the element) is
exact — dropping it below an absolute cut, as this rule once did at ``|Δa| < 1e-7``, broke additivity for inputs
in small units.
For min-type ops ``c = min(z_x, z_r)`` and the argmin; the same formulas hold.

MaxPool windows that tile the input (stride = kernel, the common case) are a reshape of it, so the routing
weights and ``1/Δa`` combine per pair, and the multiplier is copied to its windows and scaled in one pass
(``graph/tiles.py``). General windows are gathered with a depthwise Conv whose kernel is the identity over window
positions (im2col) and routed back with the matching ConvTranspose (col2im), which sums overlapping windows. In
both, the one-hot marks the first maximum of each window (ArgMax picks the first, like MaxPool's Indices).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap.graph.edit import op_attr
from onnxshap.graph.tiles import Tiles
from onnxshap.graph.windows import window_of
from onnxshap.pairs import PairContext, Scaled
from onnxshap.rules.elementwise import nonzero
from onnxshap.rules.linear import reduce_axes, reduce_check
from onnxshap.rules.table import Family, rule

LOWEST = float(np.finfo(np.float32).min)


def _cross_weights(ctx: PairContext, z: ir.Value, minimum: bool):
    """Per pair ``(c − z_r, z_x − c)`` with ``c`` the max (or min) of the two window values."""
    e = ctx.build
    z_x, z_r = ctx.pair_x(z), ctx.pair_r(z)
    c = e.op("Min" if minimum else "Max", [z_x, z_r], hint="cross_max")
    return e.op("Sub", [c, z_r]), e.op("Sub", [z_x, c])


def _per_delta(ctx: PairContext, routed: ir.Value, a: ir.Value) -> ir.Value:
    """``routed / Δa`` per pair, expanded; 0 where ``Δa`` is exactly 0 (the routed amount is exactly 0 there)."""
    return ctx.build.op("Div", [routed, nonzero(ctx.build, ctx.pair_delta(a))], hint="per_delta")


def _plain_batch(ctx: PairContext, node: ir.Node) -> str | None:
    if ctx.merged(node.inputs[0]):
        return f"{node.op_type} of a tensor whose batch axis is merged with others is not supported"
    return None


def _reduce_check(ctx: PairContext, node: ir.Node) -> str | None:
    return _plain_batch(ctx, node) or reduce_check(ctx, node)


def _maxpool_check(ctx: PairContext, node: ir.Node) -> str | None:
    if _plain_batch(ctx, node):
        return _plain_batch(ctx, node)
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return "MaxPool whose Indices output is used is not supported"
    if op_attr(node, "storage_order", 0):
        return "MaxPool with storage_order=1 is not supported"
    return None


def _window_geometry(ctx: PairContext, node: ir.Node):
    """The pool's window with ceil mode folded into the end pads."""
    in_size, out_size = ctx.shape(node.inputs[0])[2:], ctx.shape(node.outputs[0])[2:]
    return window_of(node, in_size).with_ceil_mode(in_size, out_size)


def _identity_kernel(channels: int, kernel: list[int]) -> np.ndarray:
    """(C·K, 1, *kernel): output channel ``c·K + j`` copies window position ``j`` of channel ``c``."""
    size = int(np.prod(kernel))
    eye = np.eye(size, dtype=np.float32).reshape(size, 1, *kernel)
    return np.tile(eye, (channels, 1) + (1,) * len(kernel))


def max_pool(ctx: PairContext, node: ir.Node, outs):
    window = _window_geometry(ctx, node)
    tiled = window.strides == window.kernel and all(d == 1 for d in window.dilations) and not any(window.pads)
    return [(_tiled_max_pool if tiled else _overlapping_max_pool)(ctx, node, outs[0])]


def _tiled_max_pool(ctx: PairContext, node: ir.Node, multiplier: ir.Value) -> ir.Value:
    """Windows that tile the input (stride = kernel, no pads): windows are a reshape of the input.

    Every input element lies in at most one window, so the routing weights and ``1/Δa`` combine into one
    per-pair factor in the input's layout, and the multiplier is copied to its window's elements and scaled by
    it in one pass when it is needed (:class:`onnxshap.graph.tiles.Tiles`; elements floor mode drops get zero).
    The routing weights reach their windows' elements the same way, times each side's first-max one-hot.
    """
    e = ctx.build
    a, z = node.inputs[0], node.outputs[0]
    kernel = list(op_attr(node, "kernel_shape"))
    spatial = len(kernel)
    channels, in_size, out_size = ctx.shape(a)[1], list(ctx.shape(a)[2:]), list(ctx.shape(z)[2:])
    tiles = Tiles(z, channels, tuple(kernel), tuple(out_size), tuple(in_size))
    covered, leftover = tiles.covered, tiles.leftover
    interleaved = [d for o, k in zip(out_size, kernel) for d in (o, k)]
    grouped = [0, 1] + [2 + 2 * i for i in range(spatial)] + [3 + 2 * i for i in range(spatial)]
    window = int(np.prod(kernel))

    def first_max_onehot(side: str) -> ir.Value:  # (rows, C, *in_size), 1 at each window's first max
        value = ctx.side(a, side)
        if any(leftover):
            axes = list(range(2, 2 + spatial))
            value = e.op("Slice", [value, e.ints([0] * spatial), e.ints(covered), e.ints(axes)])
        windows = e.reshape(value, [0, channels] + interleaved)
        flat = e.reshape(e.transpose(windows, grouped), [0, channels] + out_size + [window])
        first = e.op("ArgMax", [flat], {"axis": -1, "keepdims": 0})
        onehot = ctx.onehot(first, window)
        unflat = e.transpose(e.reshape(onehot, [0, channels] + out_size + kernel), list(np.argsort(grouped)))
        onehot = e.reshape(unflat, [0, channels] + covered)
        if any(leftover):
            onehot = e.op("Pad", [onehot, e.ints([0, 0] + [0] * spatial + [0, 0] + leftover)])
        return onehot

    to_x, to_r = _cross_weights(ctx, z, minimum=False)  # (n, m, 1, C, *out_size)
    routed = e.op("Add", [tiles.times(e, to_x, e.unsqueeze(first_max_onehot("x"), [1, 2])),
                          tiles.times(e, to_r, e.unsqueeze(first_max_onehot("r"), [0, 2]))])
    return Scaled(multiplier, _per_delta(ctx, routed, a), a, tiles)  # copied to the windows when needed


def column_elements(ctx: PairContext, node: ir.Node) -> int:
    """Elements per pair row of the window columns (C·K·out) a MaxPool with overlapping windows routes through:
    K times its output, more than its input when the windows overlap (3×3 stride 2: 2.25×); 0 when tiled."""
    window = _window_geometry(ctx, node)
    if window.strides == window.kernel and all(d == 1 for d in window.dilations) and not any(window.pads):
        return 0
    return ctx.shape(node.inputs[0])[1] * int(np.prod(window.kernel)) * int(np.prod(ctx.shape(node.outputs[0])[2:]))


def _overlapping_max_pool(ctx: PairContext, node: ir.Node, multiplier: ir.Value) -> ir.Value:
    """General windows: im2col by a depthwise identity Conv, col2im by the matching ConvTranspose."""
    e = ctx.build
    a, z = node.inputs[0], node.outputs[0]
    channels = ctx.shape(a)[1]
    geometry = _window_geometry(ctx, node)
    kernel, strides, dilations, begins, ends = (geometry.kernel, geometry.strides, geometry.dilations,
                                                geometry.begins, geometry.ends)
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
        onehot = ctx.onehot(first, window, axis=2)
        return onehot  # (rows, C, K, *out_spatial)

    onehot_x = e.unsqueeze(first_max_onehot("x"), [1, 2])
    onehot_r = e.unsqueeze(first_max_onehot("r"), [0, 2])
    to_x, to_r = _cross_weights(ctx, z, minimum=False)
    window_axis = 4  # expanded layout (n, m, k, C, K, *spatial)
    routed = e.op("Add", [e.op("Mul", [e.unsqueeze(to_x, [window_axis]), onehot_x]),
                          e.op("Mul", [e.unsqueeze(to_r, [window_axis]), onehot_r])])
    routed = e.op("Mul", [e.unsqueeze(ctx.expand(multiplier, z), [window_axis]), routed])
    columns = e.reshape(routed, [-1, channels * window] + out_spatial)
    in_size = ctx.shape(a)[2:]
    output_padding = geometry.output_padding(in_size, out_spatial)
    col2im = {**conv_attrs, "pads": begins + ends}
    if any(output_padding):
        col2im["output_padding"] = output_padding
    summed = e.op("ConvTranspose", [columns, weight], col2im, hint="col2im")
    per_pair = _per_delta(ctx, ctx.expand(summed, a), a)
    return ctx.collapse(per_pair, a)


def reduce_max(ctx: PairContext, node: ir.Node, outs):
    e = ctx.build
    a, z = node.inputs[0], node.outputs[0]
    axes = reduce_axes(ctx, node)
    shape, rank = ctx.shape(a), ctx.rank(a)
    minimum = node.op_type == "ReduceMin"
    keep = [i for i in range(rank) if i not in axes]
    perm = keep + axes
    reduced = int(np.prod([shape[i] for i in axes]))

    def first_extreme_onehot(side: str) -> ir.Value:
        moved = e.transpose(ctx.side(a, side), perm)
        flat = e.reshape(moved, [0] * len(keep) + [reduced])
        first = e.op("ArgMin" if minimum else "ArgMax", [flat], {"axis": -1, "keepdims": 0})
        onehot = ctx.onehot(first, reduced)
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
    per_pair = e.op("Mul", [m_z, _per_delta(ctx, routed, a)])
    return [ctx.collapse(per_pair, a)]


OPS = [
    rule("MaxPool", Family.MAX_TYPE, max_pool, check=_maxpool_check),
    *(rule(op, Family.MAX_TYPE, reduce_max, check=_reduce_check) for op in ("ReduceMax", "ReduceMin", "GlobalMaxPool")),
]
