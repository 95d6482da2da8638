"""The one node builder: appends opset-correct ONNX nodes and initializers to a graph through onnx-ir's Tape.

Every value it creates gets a unique, readable name (``<prefix>/<hint>``, suffixed ``_k`` on a clash) under a
prefix no existing name of the graph uses, so emitted graphs never collide with the names an exporter chose.
Ops whose signature changed across opsets (axes, split sizes and clip bounds as attributes or inputs) are
written in the form the graph's opset expects. Constants are deduplicated by contents.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxshap.graph.edit import opset_of, unique_prefix

AttrValue = int | float | str | Sequence[int] | Sequence[float] | ir.TensorProtocol

# Opset from which each reduce op takes ``axes`` as an input instead of an attribute.
_AXES_INPUT_SINCE = {"ReduceSum": 13, "ReduceMean": 18, "ReduceMax": 18, "ReduceMin": 18, "ReduceProd": 18,
                     "ReduceL2": 18, "ReduceSumSquare": 18, "ReduceLogSumExp": 18}


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a graph is built (restored after, whatever happens).

    Building allocates tens of thousands of long-lived objects (nodes, values, attributes); each allocation
    burst triggers a collection that walks them all again, for nothing: measured on the stacked LSTM, 0.27 s of
    a 0.12 s build. Reference counting still frees everything that is not part of a cycle.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Builder:
    """Appends nodes and initializers to ``graph``.

    Args:
        graph: the graph to append to (its opset decides op forms).
        prefix: base of every created name; made unique against the graph's names.
        dtype: when given, the element type recorded on every node output (lowering passes use it).
        opset: the opset to write for (default: the graph's; a loop body imports none of its own).
    """

    def __init__(self, graph: ir.Graph, prefix: str = "osh", dtype: ir.DataType | None = None,
                 opset: int | None = None) -> None:
        self.graph = graph
        self.opset = opset_of(graph) if opset is None else opset
        self.prefix = unique_prefix(graph, prefix)
        self.dtype = dtype
        self.tape = ir.tape.Tape(graph)
        self.nodes: list[ir.Node] = []  # every node this builder appended, in order
        self._names: set[str] = set()
        self._next_suffix: dict[str, int] = {}  # per hint, the suffix to try next (keeps naming linear)
        self._constants: dict[tuple, ir.Value] = {}

    def fresh_name(self, hint: str) -> str:
        """``<prefix>/<hint>``, suffixed so that no two names of this builder collide."""
        base = f"{self.prefix}/{hint}"
        k = self._next_suffix.get(base, 0)
        name = base if k == 0 else f"{base}_{k}"
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._next_suffix[base] = k + 1
        self._names.add(name)
        return name

    # -- nodes ---------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: Mapping[str, AttrValue] | None = None,
           *, hint: str | None = None) -> ir.Value:
        """Append one single-output node; returns its output."""
        return self.op_multi(op_type, inputs, attributes, hint=hint, num_outputs=1)[0]

    def op_multi(self, op_type: str, inputs: Sequence[ir.Value | None],
                 attributes: Mapping[str, AttrValue] | None = None, *, hint: str | None = None,
                 num_outputs: int = 1) -> Sequence[ir.Value]:
        """Append one node with ``num_outputs`` outputs (named ``<node>`` or ``<node>:i``) and return them."""
        name = self.fresh_name(hint or op_type.lower())
        outputs = self.tape.op_multi_out(op_type, list(inputs), dict(attributes or {}), num_outputs=num_outputs,
                                         name=name)
        for i, out in enumerate(outputs):
            out.name = name if num_outputs == 1 else f"{name}:{i}"
            if self.dtype is not None:
                out.dtype = self.dtype
        self.nodes.append(outputs[0].producer())
        return outputs

    def adopt(self, node: ir.Node) -> None:
        """Append an existing detached node (an inlined loop body's) as if this builder had made it."""
        self.graph.append(node)
        self.nodes.append(node)

    def discard(self) -> None:
        """Remove every node this builder appended (a rewrite that was abandoned half way)."""
        for node in self.nodes:
            for i in range(len(node.inputs)):
                node.replace_input_with(i, None)
        self.graph.remove([n for n in self.nodes if n.graph is self.graph], safe=False)
        self.nodes.clear()

    # -- constants -----------------------------------------------------------------------------------
    def const(self, array, hint: str = "const", dtype=None) -> ir.Value:
        """An initializer holding ``array`` (as ``dtype``, else the builder's float type for floats)."""
        if dtype is None and self.dtype is not None and np.issubdtype(np.asarray(array).dtype, np.floating):
            dtype = self.dtype.numpy()
        array = np.array(array, dtype=dtype, order="C")
        digest = hashlib.blake2b(array.tobytes(), digest_size=16).digest()
        key = (array.dtype.str, array.shape, digest)
        if key not in self._constants:
            name = self.fresh_name(hint)
            self._constants[key] = self.tape.initializer(ir.tensor(array, name=name), name=name)
        return self._constants[key]

    def ints(self, values: Sequence[int] | int, hint: str = "ints") -> ir.Value:
        """A 1-D (or, for a plain int, 0-d) int64 initializer: shapes, axes, indices."""
        return self.const(np.asarray(values, dtype=np.int64), hint, np.int64)

    def scalar(self, value: float, dtype=np.float32) -> ir.Value:
        """A 0-d float initializer."""
        return self.const(np.array(value, dtype=dtype), "scalar", dtype)

    # -- op forms ------------------------------------------------------------------------------------
    def reduce(self, op_type: str, x: ir.Value, axes: Sequence[int], keepdims: bool = True) -> ir.Value:
        """``op_type`` (ReduceSum, ReduceMean, ReduceMax, ...) over ``axes``; no axes: ``x`` itself."""
        if not axes:
            return x
        attrs: dict[str, AttrValue] = {"keepdims": int(keepdims)}
        if self.opset >= _AXES_INPUT_SINCE[op_type]:
            return self.op(op_type, [x, self.ints(list(axes))], attrs)
        return self.op(op_type, [x], {**attrs, "axes": list(axes)})

    def reshape(self, x: ir.Value, shape: Sequence[int] | ir.Value, hint: str | None = None) -> ir.Value:
        target = shape if isinstance(shape, ir.Value) else self.ints(list(shape))
        return self.op("Reshape", [x, target], hint=hint)

    def unsqueeze(self, x: ir.Value, axes: Sequence[int], hint: str | None = None) -> ir.Value:
        if self.opset < 13:
            return self.op("Unsqueeze", [x], {"axes": list(axes)}, hint=hint)
        return self.op("Unsqueeze", [x, self.ints(list(axes))], hint=hint)

    def squeeze(self, x: ir.Value, axes: Sequence[int], hint: str | None = None) -> ir.Value:
        if self.opset < 13:
            return self.op("Squeeze", [x], {"axes": list(axes)}, hint=hint)
        return self.op("Squeeze", [x, self.ints(list(axes))], hint=hint)

    def transpose(self, x: ir.Value, perm: Sequence[int], hint: str | None = None) -> ir.Value:
        """Transpose by ``perm``; the identity permutation returns ``x``."""
        perm = [int(p) for p in perm]
        if perm == list(range(len(perm))):
            return x
        return self.op("Transpose", [x], {"perm": perm}, hint=hint)

    def split(self, x: ir.Value, axis: int, sizes: Sequence[int], hint: str | None = None) -> list[ir.Value]:
        """Split ``x`` along ``axis`` into pieces of ``sizes`` (one node; one piece: ``x``)."""
        if len(sizes) == 1:
            return [x]
        if self.opset < 13:
            return list(self.op_multi("Split", [x], {"axis": axis, "split": list(sizes)}, hint=hint,
                                      num_outputs=len(sizes)))
        return list(self.op_multi("Split", [x, self.ints(list(sizes))], {"axis": axis}, hint=hint,
                                  num_outputs=len(sizes)))

    def clip(self, x: ir.Value, bound: float, hint: str | None = None) -> ir.Value:
        """Clip to ``[-bound, bound]`` (bounds as inputs from opset 11, attributes before)."""
        if self.opset < 11:
            return self.op("Clip", [x], {"min": -bound, "max": bound}, hint=hint)
        return self.op("Clip", [x, self.const(-bound, "clip_min"), self.const(bound, "clip_max")], hint=hint)

    def concat(self, xs: Sequence[ir.Value], axis: int, hint: str | None = None) -> ir.Value:
        """Concat along ``axis``; a single tensor is returned as is."""
        return xs[0] if len(xs) == 1 else self.op("Concat", list(xs), {"axis": axis}, hint=hint)

    def slice(self, x: ir.Value, starts, ends, axes, hint: str | None = None) -> ir.Value:
        """``Slice`` with starts/ends given as ints or as 1-D int64 values."""
        parts = [v if isinstance(v, ir.Value) else self.ints(list(v)) for v in (starts, ends, axes)]
        return self.op("Slice", [x, *parts], hint=hint)

    def cast(self, x: ir.Value, dtype: ir.DataType, hint: str | None = None) -> ir.Value:
        return self.op("Cast", [x], {"to": dtype}, hint=hint)

    def add(self, a: ir.Value | None, b: ir.Value | None) -> ir.Value | None:
        """``a + b`` where either may be absent (None means zero)."""
        if a is None or b is None:
            return a if b is None else b
        return self.op("Add", [a, b])

    def product(self, *values: ir.Value) -> ir.Value:
        """``values[0] · values[1] · …`` elementwise."""
        out = values[0]
        for value in values[1:]:
            out = self.op("Mul", [out, value])
        return out
