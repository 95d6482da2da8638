"""A small node builder over onnx-ir that writes opset-correct ONNX.

Every value it creates gets a unique, readable name (``prefix/hint_N``) so emitted graphs never collide
with the names an exporter chose. Ops whose signature changed across opsets (axes as attribute or input)
are written in the form the graph's opset expects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

AttrValue = int | float | str | Sequence[int] | Sequence[float] | ir.TensorProtocol

# Opset from which each reduce op takes ``axes`` as an input instead of an attribute.
_AXES_INPUT_SINCE = {
    "ReduceSum": 13,
    "ReduceMean": 18,
    "ReduceMax": 18,
    "ReduceMin": 18,
    "ReduceProd": 18,
    "ReduceL2": 18,
    "ReduceSumSquare": 18,
}


class Emitter:
    """Appends nodes and initializers to one graph.

    Args:
        graph: the graph to append to.
        opset: the default-domain opset version the graph imports.
        prefix: prefix for every created name.
    """

    def __init__(self, graph: ir.Graph, opset: int, prefix: str = "osh") -> None:
        self.graph = graph
        self.opset = opset
        self.prefix = prefix
        self._count = 0
        self._int_constants: dict[tuple, ir.Value] = {}
        self._float_constants: dict[tuple, ir.Value] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: Mapping[str, AttrValue] | None = None,
        *,
        hint: str | None = None,
        num_outputs: int = 1,
    ) -> ir.Value:
        """Emit one node; returns its first output (see :meth:`op_multi`)."""
        return self.op_multi(op_type, inputs, attributes, hint=hint, num_outputs=num_outputs)[0]

    def op_multi(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: Mapping[str, AttrValue] | None = None,
        *,
        hint: str | None = None,
        num_outputs: int = 1,
    ) -> Sequence[ir.Value]:
        """Emit one node with ``num_outputs`` outputs and return them."""
        hint = hint or op_type.lower()
        attrs = ir.convenience.convert_attributes(dict(attributes or {}))
        node = ir.Node("", op_type, list(inputs), attrs, num_outputs=num_outputs, name=self._name(hint))
        for i, out in enumerate(node.outputs):
            out.name = f"{node.name}:{i}" if num_outputs > 1 else node.name
        self.graph.append(node)
        return node.outputs

    # -- constants -----------------------------------------------------------------------------------
    def const(self, array: np.ndarray, hint: str = "const") -> ir.Value:
        """A new initializer holding ``array``."""
        value = ir.Value(name=self._name(hint), const_value=ir.tensor(np.asarray(array, order="C")))
        value.shape = ir.Shape(array.shape)
        value.type = ir.TensorType(value.const_value.dtype)
        self.graph.register_initializer(value)
        return value

    def ints(self, values: Sequence[int]) -> ir.Value:
        """A shared 1-D int64 initializer (shapes, axes, indices)."""
        key = tuple(int(v) for v in values)
        if key not in self._int_constants:
            self._int_constants[key] = self.const(np.array(key, dtype=np.int64), "ints")
        return self._int_constants[key]

    def scalar(self, value: float, dtype=np.float32) -> ir.Value:
        """A shared 0-d float initializer."""
        key = (float(value), np.dtype(dtype).str)
        if key not in self._float_constants:
            self._float_constants[key] = self.const(np.array(value, dtype=dtype), "scalar")
        return self._float_constants[key]

    # -- opset-aware helpers -------------------------------------------------------------------------
    def reduce(self, op_type: str, x: ir.Value, axes: Sequence[int], keepdims: bool = True) -> ir.Value:
        """``op_type`` (ReduceSum, ReduceMean, ReduceMax, ...) over ``axes``."""
        if not axes:
            return x
        attrs: dict[str, AttrValue] = {"keepdims": int(keepdims)}
        if self.opset >= _AXES_INPUT_SINCE[op_type]:
            return self.op(op_type, [x, self.ints(axes)], attrs)
        return self.op(op_type, [x], {**attrs, "axes": list(axes)})

    def reshape(self, x: ir.Value, shape: Sequence[int]) -> ir.Value:
        return self.op("Reshape", [x, self.ints(shape)])

    def unsqueeze(self, x: ir.Value, axes: Sequence[int]) -> ir.Value:
        return self.op("Unsqueeze", [x, self.ints(axes)])

    def transpose(self, x: ir.Value, perm: Sequence[int]) -> ir.Value:
        perm = [int(p) for p in perm]
        if perm == list(range(len(perm))):
            return x
        return self.op("Transpose", [x], {"perm": perm})

    def add(self, a: ir.Value | None, b: ir.Value | None) -> ir.Value | None:
        """a + b where either may be absent (None means zero)."""
        if a is None:
            return b
        if b is None:
            return a
        return self.op("Add", [a, b])


def op_attr(node: ir.Node, name: str, default=None):
    """The Python value of attribute ``name`` of ``node``, or ``default``."""
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return value.numpy()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant ``value`` (initializer or folded), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()
