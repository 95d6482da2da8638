"""Check a loaded model against the op table before any work: every op on a data path must be known.

An op is known when the table has an entry for it (a rule, or a lowering that rewrites it) or when it is a
``Constant``. Only ops that read data count: shape plumbing and constant subgraphs are folded away.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

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
