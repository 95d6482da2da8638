"""Move boolean masks computed from the input through layout ops as 0/1 floats.

Keras's ``Masking(mask_value)`` computes ``keep[b, t] = any_f(x[b, t, f] ≠ mask_value)``, and a masked
LSTM/GRU (through tf2onnx) carries that boolean through ``Unsqueeze``/``Transpose`` into its loop, where each
step reads ``keep_t`` with a ``Gather`` and selects ``h_t = m_t·h_new + (1 − m_t)·h_{t−1}`` with
``m_t = Cast(keep_t)`` (the same for ``c_t`` and the output). A boolean that leaves its elementwise region
through such a layout op cannot be attributed, so this pass runs every layout op (:data:`LAYOUT_OPS`) whose
data input is a boolean computed from the input on 0/1 floats instead: ``Cast(float)`` before it, ``Cast(bool)``
after it (the boolean tensor keeps its name). The forward pass is unchanged: the layout ops only move the
values, and ``bool(float(v)) = v``.

The sweep then sees, with ``m`` a 0/1 float:

- ``keep = (s > 0)``, ``s = Σ_f [x_f ≠ mask_value]``: two elementwise regions (a step of each ``x_f``, a step of
  the count ``s``) joined by a linear sum, each with one rescale ``Δout/Δin``, which is 0 where the mask does
  not change;
- ``m·h_new`` and ``(1 − m)·h_prev``: Shapley products of two variable tensors, exact.

So the masked recurrence is exact for every (sample, reference) pair. Where the mask agrees between sample and
reference (``Δm = 0``) no multiplier flows through the comparison and every step is the product rule with a
constant 0/1 factor; where it differs, the selection's share of ``Δy`` reaches the features whose being equal to
``mask_value`` changed — the features that made the step padding in one of the two rows.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxshap.graph.builder import Builder
from onnxshap.graph.edit import is_default_domain
from onnxshap.lower.fold import SHAPE_ONLY_OPS

# op type → the positions of its data inputs (None: all of them); the other inputs are shapes or indices
LAYOUT_OPS: dict[str, tuple[int, ...] | None] = {
    "Unsqueeze": (0,), "Squeeze": (0,), "Transpose": (0,), "Reshape": (0,), "Flatten": (0,), "Gather": (0,),
    "Slice": (0,), "Split": (0,), "Expand": (0,), "Tile": (0,), "Identity": (0,), "Concat": None,
}


class FloatBooleanLayout(ir.passes.InPlacePass):
    """Run each layout op that moves a boolean computed from the input on a 0/1 float copy of it (a chain of
    layout ops stays in floats; the boolean is cast back once, for the consumers that need it)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        dependent = _from_float_inputs(graph)
        builder = Builder(graph, "lower")
        floats: dict[ir.Value, ir.Value] = {}  # a boolean → its 0/1 float copy
        backs: list[ir.Value] = []
        for node in list(graph):
            positions = _boolean_data_inputs(node, dependent, floats)
            if not positions:
                continue
            for i in positions:
                value = node.inputs[i]
                if value not in floats:
                    floats[value] = builder.cast(value, ir.DataType.FLOAT, hint="mask_float")
                    floats[value].dtype = ir.DataType.FLOAT
                node.replace_input_with(i, floats[value])
            for out in node.outputs:
                back = _cast_back(graph, builder, out)
                floats[back] = out
                backs.append(back)
        for back in backs:  # casts back that only fed other layout ops
            if not back.uses() and not back.is_graph_output():
                graph.remove(back.producer(), safe=True)
        if backs:
            graph.sort()
        return ir.passes.PassResult(model, modified=bool(backs))


def _from_float_inputs(graph: ir.Graph) -> set[ir.Value]:
    """Tensors computed from the values of a float graph input (what can be explained). Masks from integer
    inputs (an attention mask of token ids) are not touched: they are not attributed either way."""
    reached = {v for v in graph.inputs if v.dtype is not None and v.dtype.is_floating_point()}
    for node in graph:
        if node.op_type not in SHAPE_ONLY_OPS and any(v in reached for v in node.inputs if v is not None):
            reached.update(node.outputs)
    return reached


def _boolean_data_inputs(node: ir.Node, dependent: set[ir.Value], floats: dict) -> list[int]:
    """The data inputs to replace when ``node`` is a layout op moving a boolean computed from a float input."""
    if node.op_type not in LAYOUT_OPS or not is_default_domain(node):
        return []
    positions = LAYOUT_OPS[node.op_type]
    positions = range(len(node.inputs)) if positions is None else positions
    data = [i for i in positions if i < len(node.inputs) and node.inputs[i] is not None]
    if not any((node.inputs[i] in dependent or node.inputs[i] in floats)
               and node.inputs[i].dtype == ir.DataType.BOOL for i in data):
        return []
    return [i for i in data if node.inputs[i].dtype == ir.DataType.BOOL]


def _cast_back(graph: ir.Graph, builder: Builder, out: ir.Value) -> ir.Value:
    """Make ``out`` a float and hand its uses (and name) to ``Cast(out, bool)``, which is returned."""
    uses = list(out.uses())
    name = out.name
    out.name = f"{name}__float"
    out.dtype = ir.DataType.FLOAT
    back = builder.cast(out, ir.DataType.BOOL, hint="mask_bool")
    back.dtype = ir.DataType.BOOL
    back.shape = out.shape.copy() if out.shape is not None else None
    for user, index in uses:
        user.replace_input_with(index, back)
    if out.is_graph_output():
        graph.outputs[graph.outputs.index(out)] = back
    back.name = name
    return back
