"""Fold every tensor that depends neither on the input values nor on the batch size into a constant.

A tensor is *value-dependent* when some path from a graph input reaches it without passing through a
``Shape``/``Size`` node. Tensors that are not value-dependent are functions of the input *shapes* only (the
Shape → Gather → Concat → Reshape plumbing that exporters write) or of constants. If such a tensor has the
same value at both probe batch sizes it cannot depend on the batch either, and it becomes an initializer.
Only the frontier is materialised: tensors that a remaining node (or a graph output) still reads.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

SHAPE_ONLY_OPS = {"Shape", "Size"}


def value_dependent(graph: ir.Graph) -> set[ir.Value]:
    """Tensors reachable from a graph input through edges that carry values (not just shapes)."""
    dependent: set[ir.Value] = set(graph.inputs)
    for node in graph:
        if node.op_type in SHAPE_ONLY_OPS and node.domain in ("", "ai.onnx"):
            continue
        reads_outer = any(_subgraph_reads(node, dependent))
        if reads_outer or any(v in dependent for v in node.inputs if v is not None):
            dependent.update(node.outputs)
    return dependent


def _subgraph_reads(node: ir.Node, dependent: set[ir.Value]):
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for sub in graphs:
            for inner in sub.all_nodes() if hasattr(sub, "all_nodes") else sub:
                yield any(v in dependent for v in inner.inputs if v is not None)


def fold_batch_invariant(model: ir.Model, probe_a: dict[str, np.ndarray], probe_b: dict[str, np.ndarray]) -> bool:
    """Replace batch-invariant, value-independent tensors by initializers; drop the dead nodes.

    Args:
        model: the model whose main graph is rewritten in place.
        probe_a, probe_b: every tensor's value at the two probe batch sizes (see ``probe.probe_twice``).

    Returns:
        Whether anything was folded.
    """
    graph = model.graph
    dependent = value_dependent(graph)
    foldable: set[ir.Value] = set()
    for node in graph:
        for out in node.outputs:
            if out in dependent or out.name not in probe_a or out.name not in probe_b:
                continue
            a, b = probe_a[out.name], probe_b[out.name]
            if a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True):
                foldable.add(out)
    frontier = [
        v for v in foldable
        if v.is_graph_output() or any(user not in _producers(foldable) for user, _ in v.uses())
    ]
    for value in frontier:
        constant = ir.Value(
            name=f"{value.name}__folded",
            const_value=ir.tensor(probe_a[value.name]),
            shape=ir.Shape(probe_a[value.name].shape),
            type=ir.TensorType(ir.tensor(probe_a[value.name]).dtype),
        )
        graph.register_initializer(constant)
        if value.is_graph_output():
            continue
        value.replace_all_uses_with(constant)
    remove_dead_nodes(model)
    return bool(frontier)


def _producers(values: set[ir.Value]) -> set[ir.Node]:
    return {v.producer() for v in values if v.producer() is not None}


def remove_dead_nodes(model: ir.Model) -> None:
    """Remove nodes none of whose outputs is used, and initializers nothing reads."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
