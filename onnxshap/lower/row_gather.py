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
that reach into other rows are left alone, and the plan refuses them naming the node.

Indices computed from integer inputs alone — GPT-2's classifier pools at the last non-pad token,
``argmax(arange(L) · (ids != pad))`` — are rewritten the same way when the probe rows agree, with a
:class:`RowGuard`: the rewrite is exact only for rows whose index gives the same offsets, so every data and
background row is checked (:func:`check_guards`) and a row that differs is refused, naming the node and the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from onnxshap import runtime
from onnxshap.errors import InputDataError
from onnxshap.graph.builder import Builder
from onnxshap.graph.edit import const_array, is_default_domain, normalize_axis, op_attr, remove_dead_nodes, replace_node
from onnxshap.lower.fold import value_dependent
from onnxshap.lower.layout import BatchLayout, batch_layouts
from onnxshap.lower.probe import PROBE_BATCHES, Probe, batch_axis


@dataclass(frozen=True)
class RowGuard:
    """A row gather whose index tensor is computed from integer inputs: every row must give ``offsets``.

    Attributes:
        node: the rewritten node's name (for messages).
        index: the index tensor's name in ``model``.
        inner: the gathered axis holds ``B · inner`` positions; row ``b`` owns ``b·inner`` onwards.
        dims: for a GatherND, the sizes of the axes its other index columns address (else empty).
        offsets: what every row's index must be, relative to the row (:func:`_relative`).
        model: the subgraph that computes ``index`` from the integer inputs.
    """

    node: str
    index: str
    inner: int
    dims: tuple[int, ...]
    offsets: np.ndarray
    model: onnx.ModelProto


def check_guards(guards: list[RowGuard], feeds: dict[str, np.ndarray], what: str) -> None:
    """Refuse rows of ``feeds`` for which a guarded row gather would select other positions than it was
    lowered for (their index, computed from their token ids, differs)."""
    for guard in guards:
        inputs = {value.name for value in guard.model.graph.input}
        index = runtime.evaluate(guard.model, {n: a for n, a in feeds.items() if n in inputs}, [guard.index])
        relative = _relative(np.asarray(index[guard.index], dtype=np.int64), guard.inner, guard.dims)
        wrong = ~np.all((relative == guard.offsets).reshape(relative.shape[0], -1), axis=1)
        if wrong.any():
            row = int(np.argmax(wrong))
            raise InputDataError(
                f"{what} row {row}: node {guard.node!r} selects a position computed from the row's token ids "
                f"(e.g. the last non-pad token) that differs from the other rows'; onnxshap explains such a "
                f"model exactly only when every row of the data and the background selects the same position "
                f"(pad every sequence to the same length, or export from inputs_embeds)")


class GatherWithinRows(ir.passes.InPlacePass):
    """Rewrite ``Gather`` / ``GatherND`` (``batch_dims = 0``) whose shape-computed indices select only inside
    each row (see the module docstring) into a Reshape that splits the batch off and a constant-index Gather.

    Args:
        probe_a, probe_b: every tensor's value at the two probe batch sizes (``probe.probe_twice``).
    """

    def __init__(self, probe_a: Probe, probe_b: Probe) -> None:
        super().__init__()
        self.probes = (probe_a, probe_b)
        self.guards: list[RowGuard] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        candidates = [node for node in graph if node.op_type in ("Gather", "GatherND") and is_default_domain(node)
                      and len(node.inputs) == 2 and const_array(node.inputs[1]) is None]
        if not candidates:
            return ir.passes.PassResult(model, modified=False)
        layouts = batch_layouts(model, *self.probes)
        dependent = value_dependent(graph)
        from_tokens = _computed_from_integer_inputs(graph)
        builder = Builder(graph, "rows")
        changed = False
        for node in candidates:
            data, indices = node.inputs
            layout = layouts.get(data.name)
            guarded = indices in dependent
            if guarded and indices not in from_tokens or not isinstance(layout, BatchLayout) or \
                    layout.outer != 1 or not self._follows_batch(indices):
                continue
            guard = _guard(model, node, layout, self.probes) if guarded else None
            rewrite = _gather if node.op_type == "Gather" else _gather_nd
            replacement = rewrite(builder, node, layout, self.probes)
            if replacement is not None:
                if guard is not None:
                    self.guards.append(guard)
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


def _computed_from_integer_inputs(graph: ir.Graph) -> set[ir.Value]:
    """Integer tensors that depend on the inputs' values through integer inputs only (token ids), never a float."""
    floats = {v for v in graph.inputs if v.dtype is None or v.dtype.is_floating_point()}
    tainted, found = set(floats), set(graph.inputs) - floats
    for node in graph:
        inputs = [v for v in node.inputs if v is not None]
        if any(v in tainted for v in inputs):
            tainted.update(node.outputs)
        elif any(v in found for v in inputs):
            found.update(v for v in node.outputs if v.dtype is not None and not v.dtype.is_floating_point())
    return found - tainted


def _relative(index: np.ndarray, inner: int, dims: tuple[int, ...]) -> np.ndarray:
    """Each row's index relative to its own row: ``index[b] − b·inner`` (a GatherND's first column; its other
    columns wrapped into the axes ``dims``), negative indices wrapped around."""
    rows = index.shape[0]
    first = index if not dims else index[..., 0]
    starts = (np.arange(rows, dtype=np.int64) * inner).reshape((rows,) + (1,) * (first.ndim - 1))
    first = np.where(first < 0, first + rows * inner, first) - starts
    if not dims:
        return first
    rest = index[..., 1:]
    rest = np.where(rest < 0, rest + np.array(dims, dtype=np.int64), rest)
    return np.concatenate([first[..., None], rest], axis=-1)


def _guard(model: ir.Model, node: ir.Node, layout: BatchLayout, probes: tuple[Probe, Probe]) -> RowGuard | None:
    """The :class:`RowGuard` of a gather whose index comes from token ids (None if the probes disagree)."""
    index = node.inputs[1]
    shape = probes[0][node.inputs[0].name].shape
    dims = () if node.op_type == "Gather" else tuple(shape[1:probes[0][index.name].shape[-1]])
    relative = [_relative(np.asarray(p[index.name], dtype=np.int64), layout.inner, dims) for p in probes]
    same_rows = [r[0] if (r == r[:1]).all() else None for r in relative]
    offsets = _same_at_both(same_rows)
    if offsets is None:
        return None
    proto = runtime.to_proto(model)
    inputs = [v.name for v in model.graph.inputs if v.dtype is not None and not v.dtype.is_floating_point()]
    subgraph = onnx.utils.Extractor(proto).extract_model(inputs, [index.name])
    return RowGuard(node.name, index.name, layout.inner, dims, offsets, subgraph)
