"""Gathers whose indices follow the batch but stay inside each row: rewritten into a per-row Gather.

Exporters select within every row with indices built from the batch size:

- last-token pooling ``h[torch.arange(b), -1]``: TorchScript gathers ``arange(B)`` along the batch axis (or, on
  a flattened ``(B·L, d)``, the indices ``arange(B)·L + L − 1``); dynamo writes ``GatherND`` with rows
  ``[b, j]``;
- GPT-2's classifier ``logits[arange(b), sequence_lengths]`` with constant sequence lengths;
- pooling written channels-last as ``x.reshape(-1)`` and a Gather of ``b·HWC + offset``.

Let the gathered axis of ``data`` hold the batch as a factor ``(1, B, i)`` (``lower/layout.py``; ``i = 1`` for
a plain batch axis), so row ``b`` owns positions ``b·i … b·i + i − 1``. When the indices are computed from
shapes only (not from input values) and ``c = indices[b] − b·i`` is one constant array for every row ``b``,
with ``0 ≤ c < i``, at both probe batch sizes, then

    Gather(data, indices, axis)  =  Gather(Reshape(data, (…, B, i, …)), c, axis + 1)

and likewise ``GatherND(data, indices)`` whose first index column is ``b·i + c₀`` and whose other columns
``c₁ … c_{q−1}`` are the same in every row becomes ``Gather(Reshape(data, (B, i·d₁⋯d_{q−1}, …)), ravel(c), 1)``.
The result selects each row's own elements with constant indices: a linear op the sweep explains. Indices
that depend on input values (sequence lengths from ``input_ids == pad``) or that reach into other rows are
left alone, and the plan refuses them naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap.graph.builder import Builder
from onnxshap.graph.edit import const_array, is_default_domain, normalize_axis, op_attr, remove_dead_nodes, replace_node
from onnxshap.lower.fold import value_dependent
from onnxshap.lower.layout import BatchLayout, batch_layouts
from onnxshap.lower.probe import PROBE_BATCHES, Probe, batch_axis


class GatherWithinRows(ir.passes.InPlacePass):
    """Rewrite ``Gather`` / ``GatherND`` (``batch_dims = 0``) whose shape-computed indices select only inside
    each row (see the module docstring) into a Reshape that splits the batch off and a constant-index Gather.

    Args:
        probe_a, probe_b: every tensor's value at the two probe batch sizes (``probe.probe_twice``).
    """

    def __init__(self, probe_a: Probe, probe_b: Probe) -> None:
        super().__init__()
        self.probes = (probe_a, probe_b)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        candidates = [node for node in graph if node.op_type in ("Gather", "GatherND") and is_default_domain(node)
                      and len(node.inputs) == 2 and const_array(node.inputs[1]) is None]
        if not candidates:
            return ir.passes.PassResult(model, modified=False)
        layouts = batch_layouts(model, *self.probes)
        dependent = value_dependent(graph)
        builder = Builder(graph, "rows")
        changed = False
        for node in candidates:
            data, indices = node.inputs
            layout = layouts.get(data.name)
            if indices in dependent or not isinstance(layout, BatchLayout) or layout.outer != 1 \
                    or not self._follows_batch(indices):
                continue
            rewrite = _gather if node.op_type == "Gather" else _gather_nd
            replacement = rewrite(builder, node, layout, self.probes)
            if replacement is not None:
                replace_node(node, {0: replacement})
                changed = True
        if changed:
            graph.sort()
            remove_dead_nodes(model)
        return ir.passes.PassResult(model, modified=changed)

    def _follows_batch(self, indices: ir.Value) -> bool:
        """The indices have the batch on their first axis (and no other axis grows with it)."""
        probe_a, probe_b = self.probes
        if indices.name not in probe_a or indices.name not in probe_b:
            return False
        return batch_axis(probe_a[indices.name].shape, probe_b[indices.name].shape) == 0


def row_offsets(index: np.ndarray, batch: int, inner: int) -> np.ndarray | None:
    """``c`` with ``index[b] = b·inner + c`` for every row ``b`` (negative indices wrapped around the axis of
    size ``batch·inner``), when ``0 ≤ c < inner``; else None."""
    index = np.asarray(index, dtype=np.int64)
    if index.shape[:1] != (batch,):
        return None
    wrapped = np.where(index < 0, index + batch * inner, index)
    starts = (np.arange(batch, dtype=np.int64) * inner).reshape((batch,) + (1,) * (index.ndim - 1))
    offsets = wrapped - starts
    if not (offsets == offsets[:1]).all() or (offsets < 0).any() or (offsets >= inner).any():
        return None
    return offsets[0]


def _same_at_both(found: list[np.ndarray | None]) -> np.ndarray | None:
    """The array both probes agree on, else None."""
    first, second = found
    if first is None or second is None or first.shape != second.shape or not np.array_equal(first, second):
        return None
    return first


def _gather(builder: Builder, node: ir.Node, layout: BatchLayout, probes: tuple[Probe, Probe]) -> ir.Value | None:
    """``Gather(data, b·i + c, axis)`` → ``Gather(Reshape(data, (…, B, i, …)), c, axis + 1)``."""
    data, indices = node.inputs
    shape = probes[0][data.name].shape
    axis = normalize_axis(op_attr(node, "axis", 0), len(shape))
    if axis != layout.axis:
        return None
    offsets = _same_at_both([row_offsets(p[indices.name], batch, layout.inner)
                             for p, batch in zip(probes, PROBE_BATCHES)])
    if offsets is None:
        return None
    rows = builder.reshape(data, [*shape[:axis], -1, layout.inner, *shape[axis + 1:]], hint="split_rows")
    return builder.op("Gather", [rows, builder.ints(offsets.tolist() if offsets.ndim else int(offsets))],
                      {"axis": axis + 1}, hint="gather_in_row")


def _gather_nd(builder: Builder, node: ir.Node, layout: BatchLayout, probes: tuple[Probe, Probe]
               ) -> ir.Value | None:
    """``GatherND(data, [b·i + c₀, c₁, …])`` → ``Gather(Reshape(data, (B, i·d₁⋯, …)), ravel(c), 1)``."""
    data, indices = node.inputs
    shape = probes[0][data.name].shape
    depth = probes[0][indices.name].shape[-1]
    if op_attr(node, "batch_dims", 0) != 0 or layout.axis != 0 or probes[0][indices.name].ndim < 2 \
            or not 1 <= depth <= len(shape):
        return None
    columns = []
    for p, batch in zip(probes, PROBE_BATCHES):
        index = p[indices.name].astype(np.int64)
        first = row_offsets(index[..., 0], batch, layout.inner)
        rest = np.where(index[..., 1:] < 0, index[..., 1:] + np.array(shape[1:depth], dtype=np.int64), index[..., 1:])
        same_rows = (rest == rest[:1]).all()
        in_range = ((rest >= 0) & (rest < np.array(shape[1:depth], dtype=np.int64))).all()
        columns.append(np.concatenate([first[..., None], rest[0]], axis=-1)
                       if first is not None and same_rows and in_range else None)
    offsets = _same_at_both(columns)
    if offsets is None:
        return None
    dims = (layout.inner, *shape[1:depth])
    flat = np.ravel_multi_index(tuple(np.moveaxis(offsets, -1, 0)), dims).astype(np.int64)
    rows = builder.reshape(data, [-1, int(np.prod(dims)), *shape[depth:]], hint="split_rows")
    return builder.op("Gather", [rows, builder.ints(flat.tolist() if flat.ndim else int(flat))], {"axis": 1},
                      hint="gather_in_row")
