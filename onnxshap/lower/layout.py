"""Where the batch lives in every tensor: its own axis, or a factor of an axis merged with others.

Exporters merge the batch with other axes: attention's ``(L, B·heads, d)``, ``B·T`` rows for a dense layer on
a sequence (``x.view(-1, d) @ W``), window partitions ``(B·windows, 49, C)``, a flat ``(B·H·W·C,)``. Rows stay
independent as long as the batch is one *factor* of one axis, in memory order: the axis of size ``o·B·i`` is
a view ``(o, B, i)``. A :class:`BatchLayout` records the axis and the factors ``o`` (outer) and ``i`` (inner);
a plain batch axis is ``o = i = 1``.

Layouts are derived in topological order from the graph inputs (batch on axis 0):

- ``Reshape`` (and ``Flatten``, ``Squeeze``, ``Unsqueeze``, reshapes too) keeps memory order, so the number of
  elements before the batch factor (``outer_total``) and after it (``inner_total``) carry over; the output axis
  that contains that position gets the factor — or, when the batch would straddle two axes, the rows really
  mix and the tensor has no layout;
- ``Transpose`` moves the merged axis with its factors;
- any other op keeps the factors of its inputs: the output axis whose size follows the batch gets the ``(o, i)``
  of the variable input whose merged size ``o·i`` matches (one candidate, or the candidates agree).

The probe (two batch sizes) says which axis follows the batch and by how much; this module says how.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxshap.graph.edit import op_attr
from onnxshap.lower.probe import PROBE_BATCHES, Probe, batch_axis

MIXED = "merged"  # the batch is spread over the tensor in a way that mixes rows
RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # ops that keep memory order


@dataclass(frozen=True)
class BatchLayout:
    """The batch is a factor of axis ``axis``: its size is ``outer · B · inner`` (``B`` the number of rows)."""

    axis: int
    outer: int = 1
    inner: int = 1

    @property
    def merged(self) -> bool:
        return self.outer != 1 or self.inner != 1


def batch_layouts(model: ir.Model, probe_a: Probe, probe_b: Probe) -> dict[str, BatchLayout | None | str]:
    """Every probed tensor's layout: a :class:`BatchLayout`, None (no batch) or :data:`MIXED`."""
    layouts: dict[str, BatchLayout | None | str] = {}
    for name, a in probe_a.items():
        axis = batch_axis(a.shape, probe_b[name].shape)
        layouts[name] = BatchLayout(axis) if isinstance(axis, int) else (None if axis is None else MIXED)
    for node in model.graph:
        for out in node.outputs:
            if layouts.get(out.name) == MIXED:
                layouts[out.name] = _derive(node, out, layouts, probe_a, probe_b)
    return layouts


def _merged_axis(shape_a: tuple, shape_b: tuple) -> tuple[int, int] | None:
    """``(axis, o·i)`` when exactly one axis grows like ``o·i·B`` between the probes, else None."""
    if len(shape_a) != len(shape_b):
        return None
    changed = [k for k, (x, y) in enumerate(zip(shape_a, shape_b)) if x != y]
    batch_a, batch_b = PROBE_BATCHES
    if len(changed) != 1 or shape_a[changed[0]] % batch_a or shape_a[changed[0]] // batch_a * batch_b != \
            shape_b[changed[0]]:
        return None
    return changed[0], shape_a[changed[0]] // batch_a


def _derive(node: ir.Node, out: ir.Value, layouts: dict, probe_a: Probe, probe_b: Probe) -> BatchLayout | str:
    found = _merged_axis(probe_a[out.name].shape, probe_b[out.name].shape)
    if found is None:
        return MIXED
    axis, factor = found
    source = node.inputs[0] if node.inputs else None
    source_layout = layouts.get(source.name) if source is not None else None
    if node.op_type in RESHAPES and isinstance(source_layout, BatchLayout):
        layout = _through_reshape(source_layout, probe_a[source.name].shape, probe_a[out.name].shape)
    elif node.op_type == "Transpose" and isinstance(source_layout, BatchLayout):
        perm = op_attr(node, "perm", list(reversed(range(len(probe_a[source.name].shape)))))
        layout = BatchLayout(list(perm).index(source_layout.axis), source_layout.outer, source_layout.inner)
    else:
        candidates = {(v.outer, v.inner) for v in (layouts.get(i.name) for i in node.inputs if i is not None)
                      if isinstance(v, BatchLayout) and v.outer * v.inner == factor}
        layout = BatchLayout(axis, *candidates.pop()) if len(candidates) == 1 else MIXED
    if isinstance(layout, BatchLayout) and (layout.axis != axis or layout.outer * layout.inner != factor):
        return MIXED
    return layout


def _through_reshape(layout: BatchLayout, in_shape: tuple, out_shape: tuple) -> BatchLayout | str:
    """The layout a Reshape gives: the batch factor stays at the same memory position (shapes at batch 2)."""
    batch = PROBE_BATCHES[0]
    outer_total = int(np.prod(in_shape[:layout.axis], dtype=np.int64)) * layout.outer
    inner_total = layout.inner * int(np.prod(in_shape[layout.axis + 1:], dtype=np.int64))
    prefix = 1
    for axis, size in enumerate(out_shape):
        if prefix <= outer_total < prefix * size:
            outer, rest = divmod(outer_total, prefix)
            if rest or size % (outer * batch):
                return MIXED
            inner = size // (outer * batch)
            if inner * int(np.prod(out_shape[axis + 1:], dtype=np.int64)) != inner_total:
                return MIXED
            return BatchLayout(axis, outer, inner)
        prefix *= size
    return MIXED
