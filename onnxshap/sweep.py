"""The backward sweep: build one ONNX model that computes Deep SHAP values.

The augmented model reads the explained inputs (n rows) and ``output_index`` (n, k: which outputs to explain
for each row), runs the lowered forward pass on the samples, and walks the lowered graph in reverse
topological order: the output is seeded with ``M_y = one-hot(output)``, multipliers are summed per tensor (a
tensor consumed twice gets the sum), and each node's rule turns output multipliers into input multipliers.
Reference-side tensors are constants computed once from the background. The result for an explained tensor
``s`` is ``φ = mean over references of M_s ⊙ (s_x − s_r)``, shaped ``(n, *s.shape[1:], k)``, so that
``Σ φ = f_o(x) − mean_r f_o(r)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from onnxshap.emit import Emitter
from onnxshap.errors import UnsupportedModelError
from onnxshap.lower import LoweredModel
from onnxshap.lower.fold import SHAPE_ONLY_OPS, remove_dead_nodes
from onnxshap.lower.probe import model_to_proto, run_values
from onnxshap.pairs import PairContext
from onnxshap.rules.elementwise import ELEMENTWISE_OPS, Fusion, is_linear, unfusable_reason
from onnxshap.rules.registry import CHECKS, RULES, load_rules

OUTPUT_INDEX = "output_index"
PREDICTION = "prediction"


@dataclass
class AugmentedModel:
    """An augmented model ready for ONNX Runtime, and how to read it.

    Attributes:
        proto: the model (reference values embedded as initializers).
        inputs: names of the graph inputs to feed with samples (besides ``output_index``).
        values: per explained tensor, the name of its SHAP-value output.
        explained: the explained tensor names, in order.
        k: outputs explained per row (the second dimension of ``output_index``).
        bytes_per_row: estimated peak memory per explained row, for chunking.
    """

    proto: onnx.ModelProto
    inputs: list[str]
    values: list[str]
    explained: list[str]
    k: int
    bytes_per_row: int


def variable_tensors(graph: ir.Graph, sources: list[str]) -> set[str]:
    """Names of tensors reachable from ``sources`` through edges that carry values."""
    variable = set(sources)
    for node in graph:
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        if any(v is not None and v.name in variable for v in node.inputs):
            variable.update(o.name for o in node.outputs)
    return variable


def _relevant_nodes(graph: ir.Graph, outputs: list[str], variable: set[str]) -> list[ir.Node]:
    """Nodes reading a variable tensor from which a selected output can be reached, in topological order."""
    needed = set(outputs)
    relevant = []
    for node in reversed(list(graph)):
        if any(o.name in needed for o in node.outputs) and any(
                v is not None and v.name in variable for v in node.inputs):
            relevant.append(node)
            needed.update(v.name for v in node.inputs if v is not None)
    return list(reversed(relevant))


class _Refusals:
    def __init__(self) -> None:
        self.items: list[tuple[ir.Node, str]] = []

    def add(self, node: ir.Node, reason: str) -> None:
        self.items.append((node, reason))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        kinds = sorted({n.op_type for n, _ in self.items})
        lines = [(f"unsupported model: {len(self.items)} node(s) cannot be explained exactly "
                  f"({', '.join(kinds)})")]
        for node, reason in self.items:
            lines.append(f"  node {node.name or '<unnamed>'!r} (op {node.op_type}, domain "
                         f"{node.domain or 'ai.onnx'}): {reason}")
        raise UnsupportedModelError("\n".join(lines))


def _uses_linear_rule(ctx: PairContext, node: ir.Node) -> bool:
    """A linear elementwise node with one variable input of the output's shape: pass-through is exact."""
    variable = [v for v in node.inputs if ctx.is_variable(v)]
    return (len(variable) == 1 and is_linear(ctx, node)
            and ctx.shape(variable[0]) == ctx.shape(node.outputs[0]))


def _check(ctx: PairContext, fusion: Fusion, nodes: list[ir.Node], outputs: set[str]) -> None:
    refusals = _Refusals()
    absorbed = {n.name for n in nodes if fusion.source_of(n.outputs[0]) is not None}
    for node in nodes:
        for value in node.inputs:
            if value is None or ctx.is_variable(value):
                continue
            if isinstance(ctx.lowered.batch_axes.get(value.name), int) and \
                    value.name not in ctx.lowered.row_constant:
                refusals.add(node, f"input {value.name!r} depends on the data through a path that bypasses "
                                   "the explained tensors")
        for value in node.inputs:
            if (ctx.is_variable(value) and not np.issubdtype(ctx.dtype(value), np.floating)
                    and node.name not in absorbed and node.op_type not in ("Shape", "Size")):
                refusals.add(node, f"reads {value.name!r}, an integer/boolean tensor computed from the input; "
                                   "its effect cannot be attributed")
        for value in node.outputs:
            axis = ctx.lowered.batch_axes.get(value.name)
            if ctx.is_variable(value) and axis == "merged":
                refusals.add(node, f"output {value.name!r} (shape {ctx.shape(value)}) merges the batch axis with "
                                   "other axes; onnxshap needs the batch on an axis of its own")
            elif ctx.is_variable(value) and axis is None and np.issubdtype(ctx.dtype(value), np.floating):
                refusals.add(node, f"output {value.name!r} does not follow the batch (it mixes rows)")
        if refusals.items and refusals.items[-1][0] is node:
            continue
        if node.domain not in ("", "ai.onnx"):
            refusals.add(node, "custom-domain op: no DeepLIFT rule")
            continue
        if node.name in absorbed and not _uses_linear_rule(ctx, node):
            out = node.outputs[0]
            if not np.issubdtype(ctx.dtype(out), np.floating) and _is_exit(out, nodes, absorbed, outputs):
                refusals.add(node, f"boolean/integer tensor {out.name!r} computed from the input leaves an "
                                   "elementwise region")
            continue
        if node.op_type not in RULES:
            reason = (unfusable_reason(ctx, node) if node.op_type in ELEMENTWISE_OPS else None)
            refusals.add(node, reason or "no DeepLIFT rule for this op")
            continue
        if node.op_type in ELEMENTWISE_OPS and not _uses_linear_rule(ctx, node):
            variable = [v for v in node.inputs if ctx.is_variable(v)]
            if len(variable) != 2 and node.op_type not in ("Add", "Sub", "Sum", "Mean", "Where", "Identity",
                                                             "Cast", "Neg"):
                refusals.add(node, unfusable_reason(ctx, node) or "unsupported elementwise form")
                continue
        check = CHECKS.get(node.op_type)
        reason = check(ctx, node) if check else None
        if reason:
            refusals.add(node, reason)
    refusals.raise_if_any()


def _is_exit(value: ir.Value, nodes: list[ir.Node], absorbed: set[str], outputs: set[str]) -> bool:
    names = {n.name for n in nodes}
    return value.name in outputs or any(
        user.name in names and user.name not in absorbed for user, _ in value.uses())


def _plan(lowered: LoweredModel, graph: ir.Graph, emit: Emitter, explained: list[str], outputs: list[str],
          m: int, k: int) -> tuple[PairContext, list[ir.Node], Fusion]:
    """The pair context, the nodes the sweep visits and the elementwise regions; refuses what cannot be
    explained exactly (every offending node in one error)."""
    load_rules()
    variable = variable_tensors(graph, explained)
    ctx = PairContext(lowered=lowered, emit=emit, m=m, k=k, variable=variable)
    for name in outputs:
        if name not in variable:
            raise UnsupportedModelError(f"output {name!r} does not depend on the explained tensors "
                                        f"({', '.join(explained)}): nothing to explain")
        if lowered.batch_axes.get(name) != 0:
            raise UnsupportedModelError(f"output {name!r} (shape {lowered.shapes[name]}) does not have the batch "
                                        "on its first axis")
    nodes = _relevant_nodes(graph, outputs, variable)
    fusion = Fusion(ctx, nodes)
    _check(ctx, fusion, nodes, set(outputs))
    return ctx, nodes, fusion


def check_explainable(lowered: LoweredModel, explained: list[str], outputs: list[str]) -> None:
    """Refuse, before any work, a model the sweep could not explain exactly (lists every offending node)."""
    scratch = ir.Graph([], [], nodes=[])
    _plan(lowered, lowered.model.graph, Emitter(scratch, lowered.opset), explained, outputs, m=1, k=1)


def build_augmented(
    lowered: LoweredModel,
    explained: list[str],
    outputs: list[str],
    background: dict[str, np.ndarray],
    k: int,
) -> AugmentedModel:
    """Build the augmented model.

    Args:
        lowered: the lowered forward model.
        explained: names of the tensors to explain (graph inputs or intermediate tensors).
        outputs: names of the graph outputs to explain; their flattened, concatenated features are the
            output vector that ``output_index`` selects from.
        background: the background rows per graph input.
        k: number of outputs explained per row.
    """
    model = ir.from_proto(model_to_proto(lowered.model))
    graph = model.graph
    emit = Emitter(graph, lowered.opset)
    m = next(iter(background.values())).shape[0]
    ctx, nodes, fusion = _plan(lowered, graph, emit, explained, outputs, m, k)

    values = {v.name: v for node in graph for v in node.outputs}
    values.update({v.name: v for v in graph.inputs})
    graph.outputs.clear()

    # the output vector and its seed: M_y = one-hot(output_index) for every pair
    sizes = [int(np.prod(lowered.shapes[name][1:], dtype=np.int64)) for name in outputs]
    total = int(sum(sizes))
    flat = [emit.reshape(values[name], [-1, size]) for name, size in zip(outputs, sizes)]
    prediction = flat[0] if len(flat) == 1 else emit.op("Concat", flat, {"axis": 1})
    output_index = ir.Value(name=OUTPUT_INDEX, shape=ir.Shape(["n", k]), type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(output_index)
    onehot = emit.op("OneHot", [output_index, emit.ints([total]),
                                emit.const(np.array([0, 1], np.float32), "onehot")], {"axis": -1})
    seed = emit.reshape(emit.op("Expand", [emit.unsqueeze(onehot, [1]), emit.ints([1, m, 1, 1])]), [-1, total])
    multipliers: dict[str, ir.Value] = {}
    offset = 0
    for name, size in zip(outputs, sizes):
        part = seed if len(outputs) == 1 else emit.op(
            "Slice", [seed, emit.ints([offset]), emit.ints([offset + size]), emit.ints([1])])
        multipliers[name] = emit.reshape(part, [-1, *lowered.shapes[name][1:]])
        offset += size

    for node in reversed(nodes):
        outs = [multipliers.get(o.name) for o in node.outputs]
        if all(m_out is None for m_out in outs):
            continue
        source = fusion.source_of(node.outputs[0])
        if source is not None and not _uses_linear_rule(ctx, node):
            contributions = {source.name: fusion.rescale(outs[0], node.outputs[0])}
        else:
            result = RULES[node.op_type](ctx, node, [ctx.materialize(m_out) for m_out in outs])
            if len(result) != len(node.inputs):
                raise AssertionError(f"rule for {node.op_type} returned {len(result)} multipliers for "
                                     f"{len(node.inputs)} inputs")
            contributions = {}
            for value, m_in in zip(node.inputs, result):
                if m_in is not None and ctx.is_variable(value):
                    contributions[value.name] = ctx.add(contributions.get(value.name), m_in)
        for name, m_in in contributions.items():
            multipliers[name] = ctx.add(multipliers.get(name), m_in)

    value_names = []
    for i, name in enumerate(explained):
        tensor = values[name]
        m_s = ctx.materialize(multipliers.get(name)) or ctx.zeros(tensor)
        b = ctx.batch_axis(tensor)
        per_pair = emit.op("Mul", [ctx.expand(m_s, tensor), ctx.pair_delta(tensor)])
        phi = emit.reduce("ReduceMean", per_pair, [b + 1], keepdims=False)  # (..., n, k, ...)
        rank = ctx.rank(tensor) + 1
        perm = [b] + [j for j in range(rank) if j not in (b, b + 1)] + [b + 1]
        phi = emit.op("Identity", [emit.transpose(phi, perm)])
        phi.name = f"shap_values_{i}"
        phi.type = ir.TensorType(ir.DataType.FLOAT)
        phi.shape = ir.Shape(["n", *lowered.feature_shape(name), k])
        graph.outputs.append(phi)
        value_names.append(phi.name)
    prediction = emit.op("Identity", [prediction])
    prediction.name = PREDICTION
    prediction.type = ir.TensorType(ir.DataType.FLOAT)
    prediction.shape = ir.Shape(["n", total])
    graph.outputs.append(prediction)

    _fill_references(lowered, ctx, background, graph)
    remove_dead_nodes(model)
    graph_inputs = [v.name for v in graph.inputs if v.name != OUTPUT_INDEX]
    largest = max(int(np.prod(lowered.feature_shape(n), dtype=np.int64)) for n in ctx.variable
                  if isinstance(lowered.batch_axes.get(n), int))
    return AugmentedModel(
        proto=model_to_proto(model),
        inputs=graph_inputs,
        values=value_names,
        explained=list(explained),
        k=k,
        bytes_per_row=4 * largest * m * (6 * k + 16),  # measured: ~2-3 tensors of the largest pair size alive
    )


def _fill_references(lowered: LoweredModel, ctx: PairContext, background: dict[str, np.ndarray],
                     graph: ir.Graph, rows_per_run: int = 256) -> None:
    """Compute every requested reference-side tensor once from the background; embed them as constants."""
    requested = dict(ctx.reference_requests)
    from_inputs = {name: background[name] for name in requested if name in background}
    wanted = [name for name in requested if name not in from_inputs]
    results: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    m = next(iter(background.values())).shape[0]
    if wanted:
        proto = model_to_proto(lowered.model)
        for start in range(0, m, rows_per_run):
            feeds = {name: array[start:start + rows_per_run] for name, array in background.items()}
            run = run_values(proto, feeds, wanted)
            for name in wanted:
                results[name].append(run[name])
    arrays = {**from_inputs, **{name: np.concatenate(parts, axis=_axis(lowered, name))
                                for name, parts in results.items()}}
    for name, placeholder in requested.items():
        placeholder.const_value = ir.tensor(np.ascontiguousarray(arrays[name]))
        placeholder.shape = ir.Shape(arrays[name].shape)
        placeholder.type = ir.TensorType(placeholder.const_value.dtype)
        graph.register_initializer(placeholder)


def _axis(lowered: LoweredModel, name: str) -> int:
    axis = lowered.batch_axes[name]
    return axis if isinstance(axis, int) else 0
