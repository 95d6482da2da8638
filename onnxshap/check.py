"""Check a loaded model against the op table before any work: every op on a data path must be known.

An op is known when the table has an entry for it (a rule, or a lowering that rewrites it) or when it is a
``Constant``. Only ops that read data count: shape plumbing and constant subgraphs are folded away.

This runs before lowering, which probes the model at two batch sizes (seconds and gigabytes on a large
transformer): an unknown op is refused at the cost of reading the graph. Refusals that need the probed shapes
(a merge that mixes rows, a reduction over the batch, a weight computed from the input) come from the plan,
once every op is known, all in one error.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from onnxshap.errors import Refusals
from onnxshap.graph.edit import is_default_domain
from onnxshap.lower.fold import value_dependent
from onnxshap.rules import TABLE


def unknown_ops(proto: onnx.ModelProto) -> list[ir.Node]:
    """The nodes on a data path whose op type the table does not know (custom domains included)."""
    model = ir.from_proto(proto)
    dependent = value_dependent(model.graph)
    return [node for node in model.graph
            if any(v in dependent for v in node.inputs if v is not None)
            and not (is_default_domain(node) and (node.op_type in TABLE or node.op_type == "Constant"))]


def refuse_unknown_ops(proto: onnx.ModelProto) -> None:
    """Raise one UnsupportedModelError naming every node whose op the table does not know."""
    refusals = Refusals()
    refusals.extend(unknown_ops(proto), "no DeepLIFT rule for this op (nor a lowering)")
    refusals.raise_if_any()
