"""Plan the sweep: which tensors are variable, which nodes the sweep visits, which form fusion regions —
and refuse, in one error listing every offending node, whatever could not be explained exactly.

Checks, per visited node (a node refused by an earlier check is not checked further):

1. structure: an input computed from the data along a path that bypasses the explained tensors; a variable
   integer/boolean input outside an elementwise region (its effect cannot be attributed); an output that
   merges the batch axis with others, or that no longer follows the batch (rows mixed);
2. the op: a custom domain, no entry in the op table, an elementwise op that could not join a region and
   has no rule of its own, a two-input Shapley op reached with one variable input (broadcast);
3. the entry's own check (constant weights, axes not on the batch, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxshap.augment.fusion import region_sources
from onnxshap.augment.tokens import origins
from onnxshap.errors import InputDataError, Refusals, UnsupportedModelError
from onnxshap.graph.builder import Builder
from onnxshap.graph.edit import is_default_domain
from onnxshap.lower.fold import SHAPE_ONLY_OPS
from onnxshap.lower.lowered import LoweredModel
from onnxshap.pairs import PairContext
from onnxshap.rules import TABLE
from onnxshap.rules.table import Family, OpRule


@dataclass
class Walk:
    """The part of a graph the sweep walks.

    Attributes:
        variable: names of the tensors that depend on an explained tensor.
        nodes: the nodes the sweep visits, in topological order.
        sources: fusion regions: tensor name → the region's single variable source.
    """

    variable: set[str]
    nodes: list[ir.Node]
    sources: dict[str, ir.Value]


@dataclass
class Plan:
    """What was checked and decided once per explainer: explained tensors, outputs, and the walk over the
    lowered graph (the augmented graph, a copy, walks its own copy of it)."""

    lowered: LoweredModel
    explained: list[str]
    outputs: list[str]
    walk: Walk


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


def uses_linear_rule(ctx: PairContext, node: ir.Node, entry: OpRule | None) -> bool:
    """A linear elementwise node with one variable input of the output's shape: pass-through is exact."""
    variable = [v for v in node.inputs if ctx.is_variable(v)]
    return (entry is not None and len(variable) == 1 and entry.is_linear(ctx, node)
            and ctx.shape(variable[0]) == ctx.shape(node.outputs[0]))


def walk(ctx: PairContext, graph: ir.Graph, explained: list[str], outputs: list[str]) -> Walk:
    """The walk over ``graph`` from ``outputs`` back to ``explained``; ``ctx.variable`` is filled in."""
    ctx.variable.clear()
    ctx.variable.update(variable_tensors(graph, explained))
    nodes = _relevant_nodes(graph, outputs, ctx.variable)
    return Walk(ctx.variable, nodes, region_sources(ctx, nodes, TABLE))


def make_plan(lowered: LoweredModel, explained: list[str], outputs: list[str]) -> Plan:
    """Check the explained tensors and outputs, find the nodes and regions; refuse what is not exact."""
    _check_explained(lowered, explained)
    ctx = PairContext(lowered, Builder(ir.Graph([], [], nodes=[]), "check"), set(), sizes=None)
    found = walk(ctx, lowered.model.graph, explained, outputs)
    for name in outputs:
        if name not in found.variable:
            raise UnsupportedModelError(f"output {name!r} does not depend on the explained tensors "
                                        f"({', '.join(explained)}): nothing to explain")
        if lowered.batch_axes.get(name) != 0:
            raise UnsupportedModelError(f"output {name!r} (shape {lowered.shapes[name]}) does not have the batch "
                                        "on its first axis")
    refusals = Refusals()
    visited = set(found.nodes)
    for node in found.nodes:
        reason = (_structure_reason(ctx, node, found.sources, set(outputs), visited)
                  or _op_reason(ctx, node, found.sources))
        if reason:
            refusals.add(node, reason)
    refusals.raise_if_any()
    return Plan(lowered, list(explained), list(outputs), found)


def _check_explained(lowered: LoweredModel, explained: list[str]) -> None:
    for name in explained:
        if name not in lowered.shapes:
            raise InputDataError(f"unknown tensor to explain: {name!r} (not an input or intermediate tensor of "
                                 "the model)")
        dtype = lowered.dtypes[name]
        if not np.issubdtype(dtype, np.floating):
            raise InputDataError(
                f"input {name!r} has dtype {dtype}: integer inputs (token ids) cannot be explained; pass "
                "layer=<name of the embedding output> to explain that tensor instead")
        if dtype != np.float32:
            raise UnsupportedModelError(
                f"tensor {name!r} is {dtype}: onnxshap explains float32 models; export the model in float32 "
                "(torch: module.float(); Keras: float32 layers)")
        if not isinstance(lowered.batch_axes.get(name), int):
            raise InputDataError(f"tensor {name!r} has no batch axis of its own; it cannot be explained")


def _structure_reason(ctx: PairContext, node: ir.Node, sources: dict, outputs: set[str],
                      visited: set[ir.Node]) -> str | None:
    absorbed = node.outputs[0].name in sources
    for value in node.inputs:
        if value is None:
            continue
        if not ctx.is_variable(value) and isinstance(ctx.lowered.batch_axes.get(value.name), int) and \
                value.name not in ctx.lowered.row_constant:
            return _bypass_reason(ctx, value)
        if ctx.is_variable(value) and not np.issubdtype(ctx.dtype(value), np.floating) and not absorbed and \
                node.op_type not in SHAPE_ONLY_OPS:
            return (f"reads {value.name!r}, an integer/boolean tensor computed from the input; its effect cannot "
                    "be attributed")
    for value in node.outputs:
        axis = ctx.lowered.batch_axes.get(value.name)
        if ctx.is_variable(value) and axis == "merged":
            return (f"output {value.name!r} (shape {ctx.shape(value)}) merges the batch axis with other axes; "
                    "onnxshap needs the batch on an axis of its own")
        if ctx.is_variable(value) and axis is None and np.issubdtype(ctx.dtype(value), np.floating):
            return f"output {value.name!r} does not follow the batch (it mixes rows)"
    if absorbed and not np.issubdtype(ctx.dtype(node.outputs[0]), np.floating) and \
            not uses_linear_rule(ctx, node, TABLE.get(node.op_type)) and \
            _leaves_region(node, sources, outputs, visited):
        return (f"boolean/integer tensor {node.outputs[0].name!r} computed from the input leaves an elementwise "
                "region")
    return None


def _bypass_reason(ctx: PairContext, value: ir.Value) -> str:
    sources = origins(ctx.lowered.model.graph, value)
    if not sources:
        return (f"input {value.name!r} is computed from the batch size (like arange(batch)) and does not select "
                "within each row: rows must be explained independently")
    reason = (f"input {value.name!r} depends on the data through a path that bypasses the explained tensors (it "
              f"is computed from {', '.join(map(repr, sources))})")
    if any(not np.issubdtype(ctx.lowered.dtypes[name], np.floating) for name in sources):
        reason += ("; integer inputs enter only through embedding lookups (token ids) or as fixed context (an "
                   "attention mask input, the same in every row, with the batch on an axis of its own): a value "
                   "computed from token ids on another path (a mask from ids == pad, a pooling index from the last "
                   "non-pad token) cannot be attributed — pass the attention mask to the model as an input of its "
                   "own, or export the model from inputs_embeds")
    return reason


def _leaves_region(node: ir.Node, sources: dict, outputs: set[str], visited: set[ir.Node]) -> bool:
    value = node.outputs[0]
    return value.name in outputs or any(user in visited and user.outputs[0].name not in sources
                                        for user, _ in value.uses())


def _op_reason(ctx: PairContext, node: ir.Node, sources: dict) -> str | None:
    if not is_default_domain(node):
        return "custom-domain op: no DeepLIFT rule"
    entry = TABLE.get(node.op_type)
    if entry is None or entry.family is Family.LOWERED:
        return "no DeepLIFT rule for this op"
    linear_rule = uses_linear_rule(ctx, node, entry)
    if node.outputs[0].name in sources and not linear_rule:
        return None  # one rescale for the whole region
    variable = sum(ctx.is_variable(v) for v in node.inputs)
    linear = variable == 1 and entry.is_linear(ctx, node)  # a broadcast variable input included: summed back
    if entry.rule is None or entry.elementwise and entry.family is not Family.LINEAR and not linear and \
            variable != 2:
        return (f"elementwise {node.op_type} whose variable inputs come from several tensors or are broadcast to "
                "a larger output has no exact rule")
    return entry.check(ctx, node) if entry.check else None


def select_outputs(lowered: LoweredModel, available: list[str], outputs) -> list[str]:
    """The graph outputs to explain: ``outputs`` (checked) or every float output that follows the batch."""
    if outputs is None:
        chosen = [n for n in available if np.issubdtype(lowered.dtypes.get(n, np.float32), np.floating)
                  and lowered.batch_axes.get(n) == 0]
    else:
        chosen = [outputs] if isinstance(outputs, str) else list(outputs)
        unknown = [n for n in chosen if n not in available]
        if unknown:
            raise InputDataError(f"unknown output name(s) {', '.join(map(repr, unknown))}; the model's outputs "
                                 f"are {', '.join(map(repr, available))}")
    if not chosen:
        raise InputDataError("the model has no float outputs that follow the batch to explain")
    return chosen
