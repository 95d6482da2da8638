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

from onnxshap.graph.edit import is_default_domain, remove_dead_nodes
from onnxshap.lower.probe import Probe

SHAPE_ONLY_OPS = {"Shape", "Size"}


def value_dependent(graph: ir.Graph) -> set[ir.Value]:
    """Tensors reachable from a graph input through edges that carry values (not just shapes)."""
    dependent: set[ir.Value] = set(graph.inputs)
    for node in graph:
        if node.op_type in SHAPE_ONLY_OPS and is_default_domain(node):
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


class FoldBatchInvariant(ir.passes.InPlacePass):
    """Replace batch-invariant, value-independent tensors by initializers and drop the dead nodes.

    Args:
        probe_a, probe_b: every tensor's value at the two probe batch sizes (``probe.probe_twice``).
    """

    def __init__(self, probe_a: Probe, probe_b: Probe) -> None:
        super().__init__()
        self.probe_a, self.probe_b = probe_a, probe_b

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        dependent = value_dependent(graph)
        foldable: set[ir.Value] = set()
        for node in graph:
            for out in node.outputs:
                if out in dependent or out.name not in self.probe_a or out.name not in self.probe_b:
                    continue
                a, b = self.probe_a[out.name], self.probe_b[out.name]
                if a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True):
                    foldable.add(out)
        producers = {v.producer() for v in foldable}
        frontier = [v for v in foldable
                    if v.is_graph_output() or any(user not in producers for user, _ in v.uses())]
        for value in frontier:
            array = self.probe_a[value.name]
            constant = ir.Value(name=f"{value.name}__folded", const_value=ir.tensor(array),
                                shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
            graph.register_initializer(constant)
            if not value.is_graph_output():
                value.replace_all_uses_with(constant)
        remove_dead_nodes(model)
        return ir.passes.PassResult(model, modified=bool(frontier))
