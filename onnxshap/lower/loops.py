"""Unroll ONNX ``Loop`` and ``Scan`` nodes with a static trip count into straight-line ops.

Each iteration inlines a fresh copy of the body subgraph into ``model.graph`` (before the loop node):
body inputs are bound to the iteration's values, nodes are renamed ``<loop>/it<k>/<body node>``, and
outer-scope values are used directly.

``Loop(M, cond, v_1..v_N)`` with body ``(i, cond_in, v_1..v_N) -> (cond_out, v_1'..v_N', s_1..s_K)``:
iteration ``k`` binds ``i = k`` (an int64 constant) and the carried values of iteration ``k-1``; after the
last iteration the Loop's outputs are the final ``v`` and every scan output ``s_j`` stacked along a new
axis 0 (Unsqueeze + Concat).  The trip count is ``M`` when it is a constant (an initializer, a Constant, or
computed from those), stopped early when the condition turns false; the condition (input ``cond`` and the
body's ``cond_out``) must be a constant or computable from constants and the iteration number.  While
inlining, every node whose inputs are all constants is evaluated and replaced by an initializer, so
counters that tf2onnx threads through the loop become constants (and so do the Gather indices that
read ``X[t]``).

``Scan(s_1..s_N, x_1..x_M)`` (opset ≥ 9): the sequence length comes from the static shape of the scan
inputs; each ``x_j`` is cut into ``T`` slices along ``scan_input_axes[j]`` with one Split (+ Squeeze), taken
in reverse when ``scan_input_directions[j]`` is 1; the scan outputs are stacked along
``scan_output_axes[j]`` (reversed when ``scan_output_directions[j]`` is 1).

Nested loops are unrolled recursively (the inner copies are unrolled after the outer loop).  Refused, with
one error naming every node: a Loop whose trip count or condition depends on data, a Scan whose sequence
length is not static, and a loop that produces scan outputs over zero iterations.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap.errors import Refusals
from onnxshap.graph.builder import Builder
from onnxshap.graph.edit import const_array, is_used, opset_of, remove_dead_inputs, replace_node

LOOP_OPS = frozenset({"Loop", "Scan"})

_MAX_TRIPS = 100_000
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_NUMPY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Less": np.less, "Greater": np.greater,
    "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal, "Equal": np.equal, "And": np.logical_and,
    "Or": np.logical_or, "Not": np.logical_not, "Identity": lambda a: a, "Neg": np.negative,
}


class _Refusal(Exception):
    """Internal: this node cannot be unrolled; the message says why."""


# ---------------------------------------------------------------------------------------------------------
# Constant evaluation


class _Folder:
    """Evaluates nodes whose inputs are all constants (numpy for scalar arithmetic, else the ONNX reference)."""

    def __init__(self, opset_imports: dict[str, int]):
        self.opset_imports = dict(opset_imports)
        self._cache: dict[tuple, list[np.ndarray] | None] = {}

    def evaluate(self, node: ir.Node, arrays: list[np.ndarray | None]) -> list[np.ndarray] | None:
        """The node's outputs, or None when it cannot (or should not) be evaluated."""
        if node.domain != "" or node.op_type in _NO_FOLD or any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return None
        if node.op_type == "Constant":
            return [const_array(node.outputs[0])]
        if node.op_type in _NUMPY and all(a is not None for a in arrays):
            return [np.asarray(_NUMPY[node.op_type](*arrays))]
        if node.op_type == "Cast" and arrays and arrays[0] is not None:
            return [arrays[0].astype(ir.DataType(node.attributes.get_int("to")).numpy())]
        key = (node.op_type, tuple((k, repr(a.value)) for k, a in node.attributes.items()), tuple(
            None if a is None else (a.dtype.str, a.shape, a.tobytes()) for a in arrays))
        if key not in self._cache:
            self._cache[key] = self._reference(node, arrays)
        return self._cache[key]

    def _reference(self, node: ir.Node, arrays) -> list[np.ndarray] | None:
        from onnx.reference import ReferenceEvaluator

        inputs = [None if a is None else ir.Value(name=f"in{k}", shape=ir.Shape(a.shape),
                                                  type=ir.TensorType(ir.DataType.from_numpy(a.dtype)))
                  for k, a in enumerate(arrays)]
        copy = ir.Node("", node.op_type, inputs, attributes=list(node.attributes.values()),
                       num_outputs=len(node.outputs))
        for k, out in enumerate(copy.outputs):
            out.name = f"out{k}"
        graph = ir.Graph([v for v in inputs if v is not None], copy.outputs, nodes=[copy],
                         opset_imports=self.opset_imports)
        try:
            results = ReferenceEvaluator(ir.to_proto(ir.Model(graph, ir_version=10))).run(
                None, {f"in{k}": a for k, a in enumerate(arrays) if a is not None})
        except Exception:  # noqa: BLE001 - anything the reference cannot run simply stays a node
            return None
        return [np.asarray(r) for r in results]

    def value(self, value: ir.Value | None, depth: int = 0) -> np.ndarray | None:
        """The value's contents if it is a constant or computed from constants only (no graph edits)."""
        if value is None:
            return None
        array = const_array(value)
        if array is not None or value.is_graph_input() or depth > 32:
            return array
        node = value.producer()
        if node is None:
            return None
        arrays = [self.value(v, depth + 1) for v in node.inputs]
        if any(a is None and v is not None for a, v in zip(arrays, node.inputs)):
            return None
        results = self.evaluate(node, arrays)
        return None if results is None else results[value.index()]


# ---------------------------------------------------------------------------------------------------------
# Inlining one iteration


def _inline(em: Builder, folder: _Folder, body: ir.Graph, bindings: list[ir.Value], tag: str) -> list[ir.Value]:
    """Append one copy of ``body`` with its inputs bound to ``bindings``; returns the copy's outputs."""
    copy = body.clone(allow_outer_scope_values=True)
    copy.sort()
    outputs = list(copy.outputs)
    copy.outputs.clear()
    subst: dict[ir.Value, ir.Value] = {}
    for inp, value in zip(copy.inputs, bindings):
        inp.replace_all_uses_with(value)
        subst[inp] = value
    for init in list(copy.initializers.values()):
        subst[init] = em.const(init.const_value.numpy(), f"{tag}{init.name}")
        init.replace_all_uses_with(subst[init])
    nodes = list(copy)
    copy.remove(nodes)
    for k, node in enumerate(nodes):
        arrays = [const_array(v) for v in node.inputs]
        if all(a is not None or v is None for a, v in zip(arrays, node.inputs)):
            results = folder.evaluate(node, arrays)
            if results is not None:
                for out, array in zip(node.outputs, results):
                    subst[out] = em.const(array, f"{tag}{out.name}")
                    out.replace_all_uses_with(subst[out])
                for i in range(len(node.inputs)):
                    node.replace_input_with(i, None)
                continue
        node.name = em.fresh_name(f"{tag}{node.name or f'{node.op_type}_{k}'}")
        for j, out in enumerate(node.outputs):
            out.name = em.fresh_name(f"{tag}{out.name or f'{k}_{j}'}")
        em.adopt(node)
    return [subst.get(v, v) for v in outputs]


def _stack(em: Builder, values: list[ir.Value], axis: int, name: str) -> ir.Value:
    """Stack same-shaped tensors along a new ``axis`` (Unsqueeze each, one Concat)."""
    parts = [em.unsqueeze(v, [axis], f"{name}/unsqueeze_{k}") for k, v in enumerate(values)]
    return em.concat(parts, axis, name) if len(parts) > 1 else em.op("Identity", parts, hint=name)


# ---------------------------------------------------------------------------------------------------------
# Loop and Scan


def _unroll_loop(graph: ir.Graph, node: ir.Node, em: Builder, folder: _Folder) -> None:
    """Replace a Loop by its iterations; raises _Refusal when the trip count is not static."""
    body = node.attributes["body"].as_graph()
    inputs = list(node.inputs) + [None] * (2 - len(node.inputs))
    trip_value, cond_value, carried = inputs[0], inputs[1], list(inputs[2:])
    trips = folder.value(trip_value)
    if trip_value is not None and trips is None:
        raise _Refusal(f"its trip count {trip_value.name!r} is not a constant (it depends on the data)")
    cond = True if cond_value is None else folder.value(cond_value)
    if cond is None:
        raise _Refusal(f"its condition {cond_value.name!r} is not a constant (it depends on the data)")
    if trips is None and cond_value is None:
        raise _Refusal("it has neither a trip count nor a condition (an infinite loop)")
    limit = _MAX_TRIPS if trips is None else int(trips)
    n_scan = len(body.outputs) - 1 - len(carried)
    scans: list[list[ir.Value]] = [[] for _ in range(n_scan)]
    k = 0
    while k < limit and bool(cond):
        bindings = [em.const(np.int64(k), f"it{k}/iteration", np.int64),
                    em.const(np.bool_(True), "cond_true", np.bool_)] + carried
        outs = _inline(em, folder, body, bindings, f"it{k}/")
        carried = outs[1:1 + len(carried)]
        for j, value in enumerate(outs[1 + len(carried):]):
            scans[j].append(value)
        if cond_value is not None:  # a for-loop (no cond input) ignores the body's condition
            cond = const_array(outs[0])
            if cond is None:
                raise _Refusal(f"its condition {body.outputs[0].name!r} depends on the data")
        k += 1
        if k == _MAX_TRIPS:
            raise _Refusal(f"it runs more than {_MAX_TRIPS} iterations")
    if k == 0 and n_scan:
        raise _Refusal("it runs zero iterations and has scan outputs")
    new = {j: v for j, v in enumerate(carried) if _used(node, j)}
    for j, values in enumerate(scans):
        if _used(node, len(carried) + j):
            new[len(carried) + j] = _stack(em, values, 0, f"scan_output_{j}")
    replace_node(node, new)


def _unroll_scan(graph: ir.Graph, node: ir.Node, em: Builder, folder: _Folder) -> None:
    """Replace a Scan by its iterations; raises _Refusal when the sequence length is not static."""
    body = node.attributes["body"].as_graph()
    n_in = node.attributes.get_int("num_scan_inputs")
    states, xs = list(node.inputs[: len(node.inputs) - n_in]), list(node.inputs[len(node.inputs) - n_in:])
    in_axes = list(node.attributes.get_ints("scan_input_axes", [0] * n_in))
    in_dirs = list(node.attributes.get_ints("scan_input_directions", [0] * n_in))
    n_out = len(body.outputs) - len(states)
    out_axes = list(node.attributes.get_ints("scan_output_axes", [0] * n_out))
    out_dirs = list(node.attributes.get_ints("scan_output_directions", [0] * n_out))
    lengths = set()
    for j, x in enumerate(xs):
        shape = x.shape if x.shape is not None else (
            ir.Shape(const_array(x).shape) if const_array(x) is not None else None)
        if shape is None or not isinstance(shape[in_axes[j] % shape.rank()], int):
            raise _Refusal(f"the sequence length of scan input {x.name!r} is not static (shape {x.shape})")
        in_axes[j] %= shape.rank()
        lengths.add(shape[in_axes[j]])
    if len(lengths) != 1 or min(lengths) < 1:
        raise _Refusal(f"scan inputs have sequence lengths {sorted(lengths)}")
    steps = lengths.pop()
    for j, axis in enumerate(out_axes):
        shape = body.outputs[len(states) + j].shape
        rank = shape.rank() if shape is not None else None
        if axis < 0 and rank is None:
            raise _Refusal(f"scan output {j} has a negative axis and an unknown rank")
        out_axes[j] = axis % (rank + 1) if axis < 0 else axis
    slices = []
    for j, x in enumerate(xs):
        pieces = em.split(x, in_axes[j], [1] * steps, f"scan_input_{j}/split")
        pieces = [em.squeeze(p, [in_axes[j]], f"scan_input_{j}/t{t}") for t, p in enumerate(pieces)]
        slices.append(pieces[::-1] if in_dirs[j] else pieces)
    outs_per_step = []
    for t in range(steps):
        outs = _inline(em, folder, body, states + [s[t] for s in slices], f"it{t}/")
        states = outs[: len(states)]
        outs_per_step.append(outs[len(states):])
    new = {j: v for j, v in enumerate(states) if _used(node, j)}
    for j in range(n_out):
        if _used(node, len(states) + j):
            values = [outs[j] for outs in outs_per_step]
            new[len(states) + j] = _stack(em, values[::-1] if out_dirs[j] else values, out_axes[j],
                                          f"scan_output_{j}")
    replace_node(node, new)


def _used(node: ir.Node, idx: int) -> bool:
    """Whether output ``idx`` of ``node`` is read (by a node or as a graph output)."""
    return is_used(node.outputs[idx])


class UnrollLoops(ir.passes.InPlacePass):
    """Unroll every Loop and Scan node of the main graph (and the loops they contain).

    Trip counts must already be constants (see ``fold.py``).

    Raises:
        UnsupportedModelError: listing every loop that cannot be unrolled, with the reason.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folder = _Folder(graph.opset_imports)
        changed, refused = False, {}
        while True:
            todo = [n for n in graph if n.domain == "" and n.op_type in LOOP_OPS and n not in refused]
            if not todo:
                break
            for node in todo:
                if node.op_type == "Scan" and opset_of(graph) < 9:
                    refused[node] = "Scan before opset 9 (with a batch axis) is not supported"
                    continue
                em = Builder(graph, node.name or node.op_type)
                try:
                    inputs = list(node.inputs)
                    (_unroll_loop if node.op_type == "Loop" else _unroll_scan)(graph, node, em, folder)
                    remove_dead_inputs(graph, inputs)
                    changed = True
                except _Refusal as exc:
                    em.discard()
                    refused[node] = f"cannot be unrolled: {exc}"
        refusals = Refusals()
        for node, reason in refused.items():
            refusals.add(node, reason)
        refusals.raise_if_any()
        if changed:
            graph.sort()
        return ir.passes.PassResult(model, modified=changed)
