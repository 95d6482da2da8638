"""Decompose composite ops into primitives the rule table knows.

Rewrites (every parameter must be constant, which real exports guarantee after folding):

- ``Gemm(A, B, C)`` → ``MatMul(A', B') · alpha + beta · C`` (A', B' transposed as the flags say).
- ``BatchNormalization`` (inference) → ``x · s + t`` with ``s = scale / sqrt(var + eps)``, ``t = bias − mean · s``.
- ``Flatten`` → ``Reshape``; ``Dropout`` (inference) → ``Identity``.
- ``AveragePool`` → depthwise ``Conv`` with a kernel of ones, times the constant map ``1 / divisor`` (so pads,
  ``count_include_pad`` and ``ceil_mode`` all keep ONNX Runtime's exact divisor).
- ``GlobalAveragePool`` → ``ReduceMean`` over the spatial axes.
- ``LayerNormalization`` → ``c = x − mean(x)``, ``v = mean(c·c)``, ``y = c / sqrt(v + eps) · scale + bias``;
  ``InstanceNormalization`` the same over the spatial axes, ``GroupNormalization`` over each group of channels
  (a Reshape to ``(n, G, −1)`` and back), both with per-channel scale and bias.
- ``auto_pad`` of Conv / ConvTranspose / MaxPool / AveragePool becomes explicit ``pads``.
- ``Squeeze`` without axes (``torch.squeeze()``) gets the axes it squeezes at the probe batch size: with a batch
  of one it would squeeze the batch axis too.

After this pass every linear op carries its parameters as constants and the remaining ops each have one rule.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxshap.emit import Emitter, const_array, op_attr
from onnxshap.errors import unsupported_nodes_error


def replace_output(old: ir.Value, new: ir.Value) -> None:
    """Make ``new`` take over every use of ``old``, graph outputs included (keeping the output's name)."""
    if old.is_graph_output():
        name = old.name
        old.name = f"{name}__replaced"
        new.name = name
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def decompose_composites(model: ir.Model, shapes: dict[str, tuple[int, ...]], opset: int) -> bool:
    """Apply every rewrite of this module to ``model.graph`` in place.

    Args:
        model: the model.
        shapes: static shape of every tensor by name (from the probe).
        opset: the default-domain opset.

    Returns:
        Whether the graph changed.
    """
    graph = model.graph
    emit = Emitter(graph, opset, prefix="lower")
    refused = []
    changed = False
    for node in list(graph):
        rewrite = _REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rewrite is None:
            continue
        result = rewrite(emit, node, shapes)
        if result is None:
            refused.append(node)
            continue
        if result is _KEEP:
            continue
        for old, new in zip(node.outputs, result):
            if new is not None:
                replace_output(old, new)
        graph.remove(node, safe=False)
        changed = True
    if refused:
        raise unsupported_nodes_error(
            refused, "these composite ops cannot be rewritten into primitives (parameters computed from the "
                     "input, BatchNormalization in training mode, an optional output that is used, or "
                     "ConvTranspose auto_pad SAME with a kernel smaller than its stride)")
    graph.sort()
    return changed


_KEEP = object()


def _gemm(emit: Emitter, node: ir.Node, shapes):
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    alpha, beta = op_attr(node, "alpha", 1.0), op_attr(node, "beta", 1.0)
    if op_attr(node, "transA", 0):
        a = emit.transpose(a, [1, 0])
    b_const = const_array(b)
    if op_attr(node, "transB", 0):
        b = emit.const(np.ascontiguousarray(b_const.T), "gemm_weight") if b_const is not None else (
            emit.transpose(b, [1, 0]))
    y = emit.op("MatMul", [a, b])
    if alpha != 1.0:
        y = emit.op("Mul", [y, emit.scalar(alpha)])
    if c is not None:
        c_const = const_array(c)
        bias = emit.const((beta * c_const).astype(np.float32), "gemm_bias") if c_const is not None else (
            emit.op("Mul", [c, emit.scalar(beta)]) if beta != 1.0 else c)
        y = emit.op("Add", [y, bias])
    return [y]


def _batchnorm(emit: Emitter, node: ir.Node, shapes):
    scale, bias, mean, var = (const_array(v) for v in node.inputs[1:5])
    if any(p is None for p in (scale, bias, mean, var)) or op_attr(node, "training_mode", 0):
        return None
    eps = op_attr(node, "epsilon", 1e-5)
    s = scale / np.sqrt(var + eps)
    t = bias - mean * s
    rank = len(shapes[node.inputs[0].name])
    param_shape = (-1,) + (1,) * (rank - 2)
    x = node.inputs[0]
    y = emit.op("Mul", [x, emit.const(s.reshape(param_shape).astype(np.float32), "bn_scale")])
    y = emit.op("Add", [y, emit.const(t.reshape(param_shape).astype(np.float32), "bn_shift")])
    return [y] + [None] * (len(node.outputs) - 1)


def _flatten(emit: Emitter, node: ir.Node, shapes):
    shape = shapes[node.inputs[0].name]
    axis = op_attr(node, "axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    if axis == 0:
        return [emit.reshape(node.inputs[0], [1, -1])]
    return [emit.reshape(node.inputs[0], [-1, int(np.prod(shape[axis:], dtype=np.int64))])]


def _dropout(emit: Emitter, node: ir.Node, shapes):
    if len(node.outputs) > 1 and node.outputs[1].uses():
        return None
    return [emit.op("Identity", [node.inputs[0]])] + [None] * (len(node.outputs) - 1)


def _global_average_pool(emit: Emitter, node: ir.Node, shapes):
    rank = len(shapes[node.inputs[0].name])
    return [emit.reduce("ReduceMean", node.inputs[0], list(range(2, rank)), keepdims=True)]


def explicit_pads(node: ir.Node, in_shape, kernel, strides, dilations) -> list[int]:
    """The node's ``pads`` with ``auto_pad`` resolved for input spatial shape ``in_shape``."""
    spatial = len(kernel)
    auto_pad = op_attr(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", ""):
        return list(op_attr(node, "pads", [0] * (2 * spatial)))
    if auto_pad == "VALID":
        return [0] * (2 * spatial)
    begins, ends = [], []
    for size, k, s, d in zip(in_shape, kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _window_params(node: ir.Node, shapes, kernel):
    spatial = len(kernel)
    strides = list(op_attr(node, "strides", [1] * spatial))
    dilations = list(op_attr(node, "dilations", [1] * spatial))
    in_shape = shapes[node.inputs[0].name][2:]
    return strides, dilations, explicit_pads(node, in_shape, kernel, strides, dilations)


def _resolve_auto_pad(emit: Emitter, node: ir.Node, shapes):
    if op_attr(node, "auto_pad", "NOTSET") in ("NOTSET", b"NOTSET", ""):
        return _KEEP
    weight = const_array(node.inputs[1]) if node.op_type in ("Conv", "ConvTranspose") else None
    kernel = list(op_attr(node, "kernel_shape", [])) or list(weight.shape[2:])
    if node.op_type == "ConvTranspose":
        if op_attr(node, "output_shape") is not None:
            return _KEEP  # the rule refuses it, by name
        pads = _conv_transpose_pads(node, shapes[node.inputs[0].name][2:], kernel)
        if pads is None:
            return None
    else:
        _, _, pads = _window_params(node, shapes, kernel)
    node.attributes.pop("auto_pad")
    node.attributes["pads"] = ir.AttrInt64s("pads", pads)
    return _KEEP


def _conv_transpose_pads(node: ir.Node, in_shape, kernel) -> list[int] | None:
    """ConvTranspose's ``auto_pad`` as explicit pads (ONNX spec): SAME makes the output ``in · stride`` and
    splits ``total = stride·(in − 1) + output_padding + (k − 1)·dilation + 1 − in·stride`` with the odd one
    at the end (SAME_UPPER) or the beginning (SAME_LOWER); None where the total is negative."""
    spatial = len(kernel)
    auto_pad = op_attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return [0] * (2 * spatial)
    strides = list(op_attr(node, "strides", [1] * spatial))
    dilations = list(op_attr(node, "dilations", [1] * spatial))
    output_padding = list(op_attr(node, "output_padding", [0] * spatial))
    begins, ends = [], []
    for size, k, s, d, extra in zip(in_shape, kernel, strides, dilations, output_padding):
        total = s * (size - 1) + extra + (k - 1) * d + 1 - size * s
        if total < 0:
            return None
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _average_pool(emit: Emitter, node: ir.Node, shapes):
    x = node.inputs[0]
    shape = shapes[x.name]
    channels = shape[1]
    kernel = list(op_attr(node, "kernel_shape"))
    strides, dilations, pads = _window_params(node, shapes, kernel)
    ceil_mode = op_attr(node, "ceil_mode", 0)
    out_spatial = shapes[node.outputs[0].name][2:]
    # Conv has no ceil_mode: extend the end pads until it yields the pool's output size.
    ends = list(pads[len(kernel):])
    for i, (size, k, s, d) in enumerate(zip(shape[2:], kernel, strides, dilations)):
        while (size + pads[i] + ends[i] - d * (k - 1) - 1) // s + 1 < out_spatial[i]:
            ends[i] += 1
    conv_pads = list(pads[: len(kernel)]) + ends
    ones = np.ones((channels, 1, *kernel), dtype=np.float32)
    window_sum = emit.op(
        "Conv", [x, emit.const(ones, "avgpool_ones")],
        {"group": channels, "strides": strides, "pads": conv_pads, "dilations": dilations},
    )
    scale = _average_pool_scale(node, shape, kernel, strides, pads, dilations, ceil_mode, conv_pads)
    return [emit.op("Mul", [window_sum, emit.const(scale, "avgpool_scale")])]


def _average_pool_scale(node, shape, kernel, strides, pads, dilations, ceil_mode, conv_pads) -> np.ndarray:
    """``1 / divisor`` per output position, measured with ONNX Runtime on an all-ones input."""
    import onnx
    import onnx.helper as oh

    from onnxshap.lower.probe import run_values

    one = np.ones((1, 1, *shape[2:]), dtype=np.float32)
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": list(pads), "ceil_mode": int(ceil_mode),
             "count_include_pad": int(op_attr(node, "count_include_pad", 0))}
    if any(d != 1 for d in dilations):
        attrs["dilations"] = dilations
    pool = oh.make_node("AveragePool", ["x"], ["avg"], **attrs)
    conv = oh.make_node("Conv", ["x", "w"], ["sum"], strides=strides, pads=conv_pads, dilations=dilations)
    weight = oh.make_tensor("w", onnx.TensorProto.FLOAT, [1, 1, *kernel], np.ones(int(np.prod(kernel))))
    graph = oh.make_graph(
        [pool, conv], "avgpool_divisor",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, one.shape)],
        [oh.make_tensor_value_info("avg", onnx.TensorProto.FLOAT, None),
         oh.make_tensor_value_info("sum", onnx.TensorProto.FLOAT, None)],
        initializer=[weight],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)])
    proto.ir_version = 9
    values = run_values(proto, {"x": one}, [])
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(values["sum"] > 0, values["avg"] / values["sum"], 0.0)
    return scale[0].astype(np.float32)  # (1, *out_spatial) broadcasts over batch and channels


def _normalise(emit: Emitter, x: ir.Value, axes: list[int], eps: float) -> ir.Value:
    """``(x − mean(x)) / sqrt(mean((x − mean(x))²) + eps)`` over ``axes``."""
    centred = emit.op("Sub", [x, emit.reduce("ReduceMean", x, axes)], hint="norm_centred")
    variance = emit.reduce("ReduceMean", emit.op("Mul", [centred, centred]), axes)
    std = emit.op("Sqrt", [emit.op("Add", [variance, emit.scalar(eps)])], hint="norm_std")
    return emit.op("Div", [centred, std], hint="norm_normalised")


def _affine(emit: Emitter, y: ir.Value, scale: ir.Value | None, bias: ir.Value | None, shape) -> ir.Value:
    """``y · scale + bias`` with the parameters reshaped to ``shape`` (None: as they are)."""
    for param, op in ((scale, "Mul"), (bias, "Add")):
        if param is None:
            continue
        if shape is not None:
            value = const_array(param)
            param = (emit.const(value.reshape(shape), "norm_param") if value is not None
                     else emit.reshape(param, list(shape)))
        y = emit.op(op, [y, param])
    return y


def _layer_norm(emit: Emitter, node: ir.Node, shapes):
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return None
    x = node.inputs[0]
    rank = len(shapes[x.name])
    axis = op_attr(node, "axis", -1)
    axis = axis + rank if axis < 0 else axis
    y = _normalise(emit, x, list(range(axis, rank)), op_attr(node, "epsilon", 1e-5))
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return [_affine(emit, y, node.inputs[1], bias, None)] + [None] * (len(node.outputs) - 1)


def _instance_norm(emit: Emitter, node: ir.Node, shapes):
    """Normalise each (row, channel) over the spatial axes; scale and bias per channel."""
    x, scale, bias = node.inputs[:3]
    rank = len(shapes[x.name])
    y = _normalise(emit, x, list(range(2, rank)), op_attr(node, "epsilon", 1e-5))
    return [_affine(emit, y, scale, bias, (-1,) + (1,) * (rank - 2))]


def _group_norm(emit: Emitter, node: ir.Node, shapes):
    """Normalise each (row, group of C/G channels) over those channels and the spatial axes; scale and bias
    per channel (opset 21; the per-group form of opset 18 is deprecated and refused by the ONNX checker)."""
    x, scale, bias = node.inputs[:3]
    shape = shapes[x.name]
    channels, groups = shape[1], int(op_attr(node, "num_groups"))
    grouped = emit.reshape(x, [0, groups, -1])
    y = emit.reshape(_normalise(emit, grouped, [2], op_attr(node, "epsilon", 1e-5)), [0, *shape[1:]])
    return [_affine(emit, y, scale, bias, (channels,) + (1,) * (len(shape) - 2))]


def _squeeze(emit: Emitter, node: ir.Node, shapes):
    if len(node.inputs) > 1 and node.inputs[1] is not None or op_attr(node, "axes") is not None:
        return _KEEP
    x = node.inputs[0]
    # shapes are probed with a batch > 1, except a graph input's (the background's rows, maybe one), whose
    # batch axis is 0 by contract
    axes = [i for i, d in enumerate(shapes[x.name]) if d == 1 and not (i == 0 and x.is_graph_input())]
    return [emit.op("Squeeze", [x, emit.ints(axes)])]


_REWRITES = {
    "Gemm": _gemm,
    "BatchNormalization": _batchnorm,
    "Flatten": _flatten,
    "Dropout": _dropout,
    "GlobalAveragePool": _global_average_pool,
    "AveragePool": _average_pool,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "GroupNormalization": _group_norm,
    "Conv": _resolve_auto_pad,
    "ConvTranspose": _resolve_auto_pad,
    "MaxPool": _resolve_auto_pad,
    "Squeeze": _squeeze,
}
REWRITTEN_OPS = frozenset(_REWRITES)
