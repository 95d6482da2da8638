"""Decompose composite ops into primitives the rule table knows: one (check, rewrite) pair per op type.

Rewrites (every parameter must be constant, which real exports guarantee after folding):

- ``Gemm(A, B, C)`` → ``MatMul(A', B') · alpha + beta · C`` (A', B' transposed as the flags say).
- ``BatchNormalization`` (inference) → ``x · s + t`` with ``s = scale / sqrt(var + eps)``, ``t = bias − mean · s``.
- ``AveragePool`` → depthwise ``Conv`` with a kernel of ones, times the constant map ``1 / divisor`` (so pads,
  ``count_include_pad`` and ``ceil_mode`` all keep ONNX Runtime's exact divisor).
- ``GlobalAveragePool`` → ``ReduceMean`` over the spatial axes.
- ``LayerNormalization`` → ``c = x − mean(x)``, ``v = mean(c·c)``, ``y = c / sqrt(v + eps) · scale + bias``;
  ``InstanceNormalization`` the same over the spatial axes, ``GroupNormalization`` over each group of channels
  (a Reshape to ``(n, G, −1)`` and back), both with per-channel scale and bias.
- ``auto_pad`` of Conv / ConvTranspose / MaxPool becomes explicit ``pads`` (the node is edited in place).
- ``Squeeze`` without axes (``torch.squeeze()``) gets the axes it squeezes: with a batch of one it would
  squeeze the batch axis too.

A rewrite reads the probed shapes written into the graph (``probe.annotate``); the tensor that replaces a
node's output takes over its name and shape (``graph.edit.replace_output``), so a rewrite may feed another.
A rewrite whose input has no known shape yet (it was made by another rewrite of the same pass) is deferred;
the driver probes again and repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxshap import runtime
from onnxshap.errors import Refusals
from onnxshap.graph.builder import Builder
from onnxshap.graph.edit import const_array, is_default_domain, is_used, normalize_axis, op_attr, replace_node
from onnxshap.graph.windows import conv_transpose_pads, window_of
from onnxshap.lower.probe import static_shape


@dataclass(frozen=True)
class Rewrite:
    """How to decompose one op type.

    Attributes:
        check: why this node cannot be rewritten (None when it can).
        rewrite: the replacement of each output (None for outputs nothing reads), or None when the node was
            edited in place; called with the input's static shape.
    """

    check: Callable[[ir.Node], str | None]
    rewrite: Callable[[Builder, ir.Node, tuple], list[ir.Value | None] | None]


def _always(node: ir.Node) -> str | None:
    return None


def _constant_parameters(node: ir.Node) -> str | None:
    if any(const_array(v) is None for v in node.inputs[1:] if v is not None):
        return "its parameters are computed from the input"
    return None


def _only_first_output_used(node: ir.Node) -> str | None:
    if any(is_used(out) for out in node.outputs[1:]):
        return "an optional output (mean, inverse std dev, mask) is used"
    return None


class DecomposeComposites(ir.passes.InPlacePass):
    """Apply every rewrite of :data:`REWRITES` whose input shape is known; refuse what cannot be rewritten.

    After a call, ``deferred`` counts the nodes left for a later call (their input shape was not known) and
    ``rewritten`` the nodes replaced by new ones (whose shapes a new probe must learn; a node edited in place,
    like an ``auto_pad`` resolved into ``pads``, keeps its shapes).
    """

    def __init__(self) -> None:
        super().__init__()
        self.deferred = 0
        self.rewritten = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        builder = Builder(graph, "lower")
        refusals = Refusals()
        changed, self.deferred, self.rewritten = False, 0, 0
        for node in list(graph):
            entry = REWRITES.get(node.op_type) if is_default_domain(node) else None
            if entry is None:
                continue
            shape = static_shape(node.inputs[0])
            if shape is None:
                self.deferred += 1
                continue
            reason = entry.check(node)
            if reason:
                refusals.add(node, f"cannot be rewritten into primitive ops: {reason}")
                continue
            outputs = entry.rewrite(builder, node, shape)
            if outputs is not None:
                replace_node(node, {i: v for i, v in enumerate(outputs) if v is not None})
                self.rewritten += 1
            changed = True
        refusals.raise_if_any()
        if changed:
            graph.sort()
        return ir.passes.PassResult(model, modified=changed)


def _gemm(b: Builder, node: ir.Node, shape: tuple):
    a, weight = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    alpha, beta = op_attr(node, "alpha", 1.0), op_attr(node, "beta", 1.0)
    if op_attr(node, "transA", 0):
        a = b.transpose(a, [1, 0])
    w = const_array(weight)
    if op_attr(node, "transB", 0):
        weight = b.const(np.ascontiguousarray(w.T), "gemm_weight") if w is not None else b.transpose(weight, [1, 0])
    y = b.op("MatMul", [a, weight])
    if alpha != 1.0:
        y = b.op("Mul", [y, b.scalar(alpha)])
    if c is not None:
        c_const = const_array(c)
        bias = b.const((beta * c_const).astype(np.float32), "gemm_bias") if c_const is not None else (
            b.op("Mul", [c, b.scalar(beta)]) if beta != 1.0 else c)
        y = b.op("Add", [y, bias])
    return [y]


def _batchnorm_check(node: ir.Node) -> str | None:
    if op_attr(node, "training_mode", 0):
        return "BatchNormalization in training mode"
    return _constant_parameters(node) or _only_first_output_used(node)


def _batchnorm(b: Builder, node: ir.Node, shape: tuple):
    scale, bias, mean, var = (const_array(v) for v in node.inputs[1:5])
    s = scale / np.sqrt(var + op_attr(node, "epsilon", 1e-5))
    t = bias - mean * s
    param_shape = (-1,) + (1,) * (len(shape) - 2)
    y = b.op("Mul", [node.inputs[0], b.const(s.reshape(param_shape).astype(np.float32), "bn_scale")])
    return [b.op("Add", [y, b.const(t.reshape(param_shape).astype(np.float32), "bn_shift")])]


def _global_average_pool(b: Builder, node: ir.Node, shape: tuple):
    return [b.reduce("ReduceMean", node.inputs[0], list(range(2, len(shape))), keepdims=True)]


def _resolve_auto_pad(b: Builder, node: ir.Node, shape: tuple):
    if op_attr(node, "auto_pad", "NOTSET") in ("NOTSET", ""):
        return None
    weight = const_array(node.inputs[1]) if node.op_type in ("Conv", "ConvTranspose") else None
    kernel = list(op_attr(node, "kernel_shape", [])) or list(weight.shape[2:])
    if node.op_type == "ConvTranspose":
        pads = conv_transpose_pads(node, shape[2:], kernel)
    else:
        pads = window_of(node, shape[2:], kernel).pads
    node.attributes.pop("auto_pad")
    node.attributes["pads"] = ir.AttrInt64s("pads", pads)
    return None


def _auto_pad_check(node: ir.Node) -> str | None:
    if node.op_type != "ConvTranspose" or op_attr(node, "auto_pad", "NOTSET") in ("NOTSET", "", "VALID"):
        return None
    if op_attr(node, "output_shape") is not None:
        return None  # the ConvTranspose rule refuses it, by name
    kernel = list(op_attr(node, "kernel_shape", []))
    weight = const_array(node.inputs[1])
    if not kernel and weight is not None:
        kernel = list(weight.shape[2:])
    if not kernel or conv_transpose_pads(node, static_shape(node.inputs[0])[2:], kernel) is None:
        return "ConvTranspose auto_pad SAME with a kernel smaller than its stride"
    return None


def _average_pool(b: Builder, node: ir.Node, shape: tuple):
    out_spatial = static_shape(node.outputs[0])[2:]
    window = window_of(node, shape[2:])
    conv_window = window.with_ceil_mode(shape[2:], out_spatial)  # Conv has no ceil_mode
    ones = np.ones((shape[1], 1, *window.kernel), dtype=np.float32)
    window_sum = b.op("Conv", [node.inputs[0], b.const(ones, "avgpool_ones")],
                      {"group": shape[1], "strides": window.strides, "pads": conv_window.pads,
                       "dilations": window.dilations})
    scale = _average_pool_scale(node, shape, window, conv_window)
    return [b.op("Mul", [window_sum, b.const(scale, "avgpool_scale")])]


def _average_pool_scale(node: ir.Node, shape: tuple, window, conv_window) -> np.ndarray:
    """``1 / divisor`` per output position, measured with ONNX Runtime on an all-ones input."""
    one = np.ones((1, 1, *shape[2:]), dtype=np.float32)
    graph = ir.Graph([ir.Value(name="x", shape=ir.Shape(one.shape), type=ir.TensorType(ir.DataType.FLOAT))],
                     [], nodes=[], opset_imports={"": 19})
    b = Builder(graph, "divisor")
    attrs = {"kernel_shape": window.kernel, "strides": window.strides, "pads": window.pads,
             "ceil_mode": int(op_attr(node, "ceil_mode", 0)),
             "count_include_pad": int(op_attr(node, "count_include_pad", 0))}
    if any(d != 1 for d in window.dilations):
        attrs["dilations"] = window.dilations
    average = b.op("AveragePool", [graph.inputs[0]], attrs)
    total = b.op("Conv", [graph.inputs[0], b.const(np.ones((1, 1, *window.kernel), np.float32))],
                 {"strides": window.strides, "pads": conv_window.pads, "dilations": window.dilations})
    graph.outputs.extend([average, total])
    values = runtime.evaluate(ir.Model(graph, ir_version=9), {"x": one}, [average.name, total.name])
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(values[total.name] > 0, values[average.name] / values[total.name], 0.0)
    return scale[0].astype(np.float32)  # (1, *out_spatial) broadcasts over batch and channels


def _normalise(b: Builder, x: ir.Value, axes: list[int], eps: float) -> ir.Value:
    """``(x − mean(x)) / sqrt(mean((x − mean(x))²) + eps)`` over ``axes``.

    Centred in two passes, ``c = (x − m₁) − mean(x − m₁)`` with ``m₁ = mean(x)``: ``m₁`` is rounded to float32
    at the size of ``x``, so ``x − m₁`` alone is off by ``ulp(x)/2`` — 5 % of a 0.01 spread at ``x ≈ 1e4``; the
    second pass removes that rounding. Linear, so the sweep's linear rules see the same map; the second mean is
    0 up to rounding.
    """
    rough = b.op("Sub", [x, b.reduce("ReduceMean", x, axes)], hint="norm_rough_centred")
    centred = b.op("Sub", [rough, b.reduce("ReduceMean", rough, axes)], hint="norm_centred")
    variance = b.reduce("ReduceMean", b.op("Mul", [centred, centred]), axes)
    std = b.op("Sqrt", [b.op("Add", [variance, b.scalar(eps)])], hint="norm_std")
    return b.op("Div", [centred, std], hint="norm_normalised")


def _affine(b: Builder, y: ir.Value, scale: ir.Value | None, bias: ir.Value | None, shape) -> ir.Value:
    """``y · scale + bias`` with constant parameters reshaped to ``shape`` (None: as they are)."""
    for param, op in ((scale, "Mul"), (bias, "Add")):
        if param is not None:
            if shape is not None:
                param = b.const(const_array(param).reshape(shape), "norm_param")
            y = b.op(op, [y, param])
    return y


def _layer_norm(b: Builder, node: ir.Node, shape: tuple):
    axis = normalize_axis(op_attr(node, "axis", -1), len(shape))
    y = _normalise(b, node.inputs[0], list(range(axis, len(shape))), op_attr(node, "epsilon", 1e-5))
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return [_affine(b, y, node.inputs[1], bias, None)]


def _instance_norm(b: Builder, node: ir.Node, shape: tuple):
    """Normalise each (row, channel) over the spatial axes; scale and bias per channel."""
    x, scale, bias = node.inputs[:3]
    y = _normalise(b, x, list(range(2, len(shape))), op_attr(node, "epsilon", 1e-5))
    return [_affine(b, y, scale, bias, (-1,) + (1,) * (len(shape) - 2))]


def _group_norm(b: Builder, node: ir.Node, shape: tuple):
    """Normalise each (row, group of C/G channels) over those channels and the spatial axes; scale and bias
    per channel (opset 21; the per-group form of opset 18 is deprecated and refused by the ONNX checker)."""
    x, scale, bias = node.inputs[:3]
    grouped = b.reshape(x, [0, int(op_attr(node, "num_groups")), -1])
    y = b.reshape(_normalise(b, grouped, [2], op_attr(node, "epsilon", 1e-5)), [0, *shape[1:]])
    return [_affine(b, y, scale, bias, (shape[1],) + (1,) * (len(shape) - 2))]


def _squeeze(b: Builder, node: ir.Node, shape: tuple):
    if len(node.inputs) > 1 and node.inputs[1] is not None or op_attr(node, "axes") is not None:
        return None
    return [b.squeeze(node.inputs[0], [i for i, d in enumerate(shape) if d == 1])]  # the batch dim is None


def _constant_normalisation(node: ir.Node) -> str | None:
    return _constant_parameters(node) or _only_first_output_used(node)


REWRITES: dict[str, Rewrite] = {
    "Gemm": Rewrite(_always, _gemm),
    "BatchNormalization": Rewrite(_batchnorm_check, _batchnorm),
    "GlobalAveragePool": Rewrite(_always, _global_average_pool),
    "AveragePool": Rewrite(_always, _average_pool),
    "LayerNormalization": Rewrite(_only_first_output_used, _layer_norm),
    "InstanceNormalization": Rewrite(_constant_normalisation, _instance_norm),
    "GroupNormalization": Rewrite(_constant_normalisation, _group_norm),
    "Conv": Rewrite(_always, _resolve_auto_pad),
    "ConvTranspose": Rewrite(_auto_pad_check, _resolve_auto_pad),
    "MaxPool": Rewrite(_always, _resolve_auto_pad),
    "Squeeze": Rewrite(_always, _squeeze),
}
