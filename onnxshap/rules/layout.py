"""Linear family, data-movement part: ops that copy, select or rearrange elements.

Each is linear with a 0/1 Jacobian, so ``M_in = Jᵀ M_out`` routes multipliers back to the elements they came
from, summing where one element fed several outputs:

- Reshape, Squeeze, Unsqueeze, Flatten: reshape back; Transpose: the inverse permutation.
- Concat: slice each input's part; Split: concatenate the parts (zeros where no multiplier arrived).
- Slice (steps 1): Pad with zeros; Pad (constant mode, pads ≥ 0): Slice.
- Gather (constant indices), Slice with steps, Pad in reflect/edge/wrap mode: a one-hot selection matrix ``S``
  along the axis (``y = S·a`` along it, so ``M_a = Sᵀ·M_y``), applied as a MatMul on that axis.
- Expand: ReduceSum over the broadcast axes; Tile: ReduceSum over the repeats.
- Where with a constant condition: ``M_a = cond · M_y``, ``M_b = (1 − cond) · M_y``.
None of these may move data across the batch axis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap.graph.edit import const_array, normalize_axis, op_attr
from onnxshap.pairs import PairContext
from onnxshap.rules.elementwise import d_select
from onnxshap.rules.table import linear


def _p_shape(ctx: PairContext, value: ir.Value) -> list[int]:
    """Static shape with -1 at the batch axis: a Reshape target for ``value``'s P-form."""
    b = ctx.batch_axis(value)
    return [-1 if i == b else d for i, d in enumerate(ctx.shape(value))]


def reshape(ctx: PairContext, node: ir.Node, outs):
    return [ctx.build.reshape(outs[0], _p_shape(ctx, node.inputs[0]))]


def transpose(ctx: PairContext, node: ir.Node, outs):
    rank = ctx.rank(node.inputs[0])
    perm = op_attr(node, "perm", list(reversed(range(rank))))
    return [ctx.build.transpose(outs[0], [int(i) for i in np.argsort(perm)])]


def _axis(node: ir.Node, rank: int, default: int = 0) -> int:
    return normalize_axis(op_attr(node, "axis", default), rank)


def _not_on_batch_axis(ctx: PairContext, node: ir.Node) -> str | None:
    value = next(v for v in node.inputs if ctx.is_variable(v))
    if _axis(node, ctx.rank(value)) == ctx.batch_axis(value):
        return f"{node.op_type} along the batch axis mixes rows: rows must be explained independently"
    return None


def concat(ctx: PairContext, node: ir.Node, outs):
    out = node.outputs[0]
    axis = _axis(node, ctx.rank(out))
    sizes = [ctx.shape(v)[axis] for v in node.inputs]
    parts = ctx.build.op_multi("Split", [outs[0], ctx.build.ints(sizes)], {"axis": axis}, num_outputs=len(sizes))
    return [part if ctx.is_variable(v) else None for part, v in zip(parts, node.inputs)]


def split(ctx: PairContext, node: ir.Node, outs):
    axis = _axis(node, ctx.rank(node.inputs[0]))
    parts = [m if m is not None else ctx.zeros(v) for m, v in zip(outs, node.outputs)]
    return [ctx.build.op("Concat", parts, {"axis": axis})]


def _slice_spec(ctx: PairContext, node: ir.Node):
    """Per axis of the input: the index map (np array of input indices) the Slice selects."""
    shape = ctx.shape(node.inputs[0])
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    axes = np.arange(len(starts)) if axes is None else axes
    steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps
    spec = {}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) + len(shape) if axis < 0 else int(axis)
        start, end, step = int(start), int(end), int(step)
        # numpy's slice clamping is ONNX's (slice(...).indices() would turn an end before 0 into −1)
        spec[axis] = np.arange(shape[axis])[start:end:step]
    return spec


def _slice_check(ctx: PairContext, node: ir.Node) -> str | None:
    if any(v is not None and v.const_value is None for v in node.inputs[1:]):
        return "Slice with computed starts/ends/axes/steps is not supported"
    spec = _slice_spec(ctx, node)
    b = ctx.batch_axis(node.inputs[0])
    if b in spec and not np.array_equal(spec[b], np.arange(ctx.shape(node.inputs[0])[b])):
        return "Slice along the batch axis: rows must be explained independently"
    return None


def _select_along(ctx: PairContext, multiplier: ir.Value, axis: int, rank: int, index: np.ndarray,
                  size: int) -> ir.Value:
    """``M_a`` along ``axis`` from ``M_y`` where ``y[..., j, ...] = a[..., index[j], ...]`` (index −1: none)."""
    selection = np.zeros((len(index), size), dtype=np.float32)
    rows = np.nonzero(index >= 0)[0]
    selection[rows, index[rows]] = 1.0
    perm = [i for i in range(rank) if i != axis] + [axis]
    moved = ctx.build.transpose(multiplier, perm)
    routed = ctx.build.op("MatMul", [moved, ctx.build.const(selection, "selection")])
    return ctx.build.transpose(routed, [int(i) for i in np.argsort(perm)])


def slice_(ctx: PairContext, node: ir.Node, outs):
    a = node.inputs[0]
    shape, rank = ctx.shape(a), ctx.rank(a)
    spec = _slice_spec(ctx, node)
    contiguous = all(len(idx) == 0 or np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))
                     for idx in spec.values())
    if contiguous and all(len(idx) for idx in spec.values()):
        begins = [int(spec[i][0]) if i in spec else 0 for i in range(rank)]
        ends = [shape[i] - int(spec[i][-1]) - 1 if i in spec else 0 for i in range(rank)]
        m_a = ctx.build.op("Pad", [outs[0], ctx.build.ints(begins + ends)], {"mode": "constant"})
    else:
        m_a = outs[0]
        for axis, index in spec.items():
            if axis != ctx.batch_axis(a):  # the batch axis is never sliced (checked)
                m_a = _select_along(ctx, m_a, axis, rank, index, shape[axis])
    return [m_a]


def _gather_check(ctx: PairContext, node: ir.Node) -> str | None:
    if ctx.is_variable(node.inputs[1]) or node.inputs[1].const_value is None:
        return "Gather with indices computed from the input is not supported (explain the embedding output)"
    if _axis(node, ctx.rank(node.inputs[0])) == ctx.batch_axis(node.inputs[0]):
        return "Gather along the batch axis: rows must be explained independently"
    return None


def gather(ctx: PairContext, node: ir.Node, outs):
    data = node.inputs[0]
    shape, rank = ctx.shape(data), ctx.rank(data)
    axis, b = _axis(node, rank), ctx.batch_axis(data)
    index = const_array(node.inputs[1]).astype(np.int64).reshape(-1) % shape[axis]
    target = list(shape)
    target[axis] = len(index)
    target[b] = -1
    flat = ctx.build.reshape(outs[0], target)
    return [_select_along(ctx, flat, axis, rank, index, shape[axis]), None]


def pad_index(size: int, before: int, after: int, mode: str) -> np.ndarray:
    """Input index of each output position of a 1-D pad (−1 where the constant is written)."""
    index = np.arange(size)
    index = index[max(-before, 0) : size - max(-after, 0)]
    before, after = max(before, 0), max(after, 0)
    if mode == "constant":
        return np.pad(index, (before, after), constant_values=-1)
    numpy_mode = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode]
    return np.pad(index, (before, after), mode=numpy_mode)


def _pad_spec(ctx: PairContext, node: ir.Node):
    rank = ctx.rank(node.inputs[0])
    pads = const_array(node.inputs[1]).tolist()
    axes = const_array(node.inputs[3]).tolist() if len(node.inputs) > 3 and node.inputs[3] is not None else None
    axes = [a + rank if a < 0 else a for a in axes] if axes is not None else list(range(rank))
    half = len(pads) // 2
    return {axis: (pads[i], pads[i + half]) for i, axis in enumerate(axes)}


def _pad_check(ctx: PairContext, node: ir.Node) -> str | None:
    if any(v is not None and v.const_value is None for v in node.inputs[1:]):
        return "Pad with computed pads is not supported"
    pads = _pad_spec(ctx, node).get(ctx.batch_axis(node.inputs[0]), (0, 0))
    return "Pad along the batch axis is not supported" if any(pads) else None


def pad(ctx: PairContext, node: ir.Node, outs):
    a = node.inputs[0]
    shape, rank = ctx.shape(a), ctx.rank(a)
    mode = op_attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    spec = _pad_spec(ctx, node)
    spec = {axis: pair for axis, pair in spec.items() if any(pair)}  # never the batch axis (checked)
    if mode == "constant" and all(p >= 0 for pair in spec.values() for p in pair):
        out_shape = ctx.shape(node.outputs[0])
        axes = sorted(spec)
        starts = [spec[i][0] for i in axes]
        ends = [out_shape[i] - spec[i][1] for i in axes]
        m_a = ctx.build.op("Slice", [outs[0], ctx.build.ints(starts), ctx.build.ints(ends), ctx.build.ints(axes)])
    else:
        m_a = outs[0]
        for axis, (before, after) in spec.items():
            if before or after:
                m_a = _select_along(ctx, m_a, axis, rank, pad_index(shape[axis], before, after, mode), shape[axis])
    return [m_a]


def expand(ctx: PairContext, node: ir.Node, outs):
    """Expand is broadcasting itself: the sweep sums the multiplier back over the broadcast axes."""
    return [outs[0]]


def _tile_check(ctx: PairContext, node: ir.Node) -> str | None:
    if node.inputs[1].const_value is None:
        return "Tile with computed repeats is not supported"
    if const_array(node.inputs[1])[ctx.batch_axis(node.inputs[0])] != 1:
        return "Tile along the batch axis is not supported"
    return None


def tile(ctx: PairContext, node: ir.Node, outs):
    """``y = tile(a, reps)``: view ``y`` as (..., reps_i, size_i, ...) and sum over the repeat axes."""
    a = node.inputs[0]
    shape, b = ctx.shape(a), ctx.batch_axis(a)
    repeats = const_array(node.inputs[1]).tolist()
    split_shape = []
    for i, (r, d) in enumerate(zip(repeats, shape)):
        split_shape += [-1] if i == b else [int(r), d]
    viewed = ctx.build.reshape(outs[0], split_shape)
    repeat_axes, position = [], 0
    for i in range(len(shape)):
        if i != b:
            repeat_axes.append(position)
            position += 2
        else:
            position += 1
    summed = ctx.build.reduce("ReduceSum", viewed, repeat_axes, keepdims=False)
    return [summed]


def _where_check(ctx: PairContext, node: ir.Node) -> str | None:
    if ctx.is_variable(node.inputs[0]):
        return ("Where whose condition depends on the input, over branches from different tensors, "
                "is not supported")
    return None


def where(ctx: PairContext, node: ir.Node, outs):
    """``M_a = cond · M_y``, ``M_b = (1 − cond) · M_y`` in the output's shape (the condition is constant)."""
    cond = ctx.const(node.inputs[0])
    zero = ctx.build.const(np.zeros(1, dtype=np.float32), "zero")
    return [None] + [ctx.build.op("Where", [cond, outs[0], zero] if keep else [cond, zero, outs[0]])
                     if ctx.is_variable(branch) else None
                     for branch, keep in ((node.inputs[1], True), (node.inputs[2], False))]


def _constant_condition(ctx: PairContext, node: ir.Node) -> bool:
    return not ctx.is_variable(node.inputs[0])


OPS = [
    *(linear(op, reshape) for op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten")),
    linear("Transpose", transpose),
    linear("Concat", concat, check=_not_on_batch_axis),
    linear("Split", split, check=_not_on_batch_axis),
    linear("Slice", slice_, check=_slice_check),
    linear("Gather", gather, check=_gather_check),
    linear("Pad", pad, check=_pad_check),
    linear("Expand", expand, broadcasts=True),
    linear("Tile", tile, check=_tile_check),
    linear("Where", where, check=_where_check, derivative=d_select, broadcasts=True, is_linear=_constant_condition),
]
