"""Ops outside the ONNX standard that exporters write, rewritten into the standard ops that compute them.

tf2onnx passes a TensorFlow op it has no conversion for into the graph under its TensorFlow name, in the
default domain. Keras 3's exact GELU, ``0.5 · x · erfc(−x/√2)``, becomes such an ``Erfc`` node: no ONNX opset
defines ``Erfc``, so ONNX's checker and ONNX Runtime refuse the whole model. Where the op has an exact form
in standard ops, :func:`standardize` writes that form instead (the replacement keeps the node's output name):

- ``Erfc(x) = 1 − Erf(x)``. The two agree to float rounding of ``1 − erf(x)``, an absolute error of at most
  ``ulp(1) = 1.2e-7`` in float32 (``erfc(x)`` below that, for ``x ≳ 3.9``, comes out as 0); GELU multiplies it
  by ``x/2``.

:func:`nonstandard_nodes` lists the default-domain nodes that remain without a schema (what a converter must
report by op name, instead of ONNX Runtime's ``INVALID_GRAPH``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

from onnxshap.graph.builder import Builder
from onnxshap.graph.edit import is_default_domain, opset_of, replace_node

CAST_LIKE_SINCE = 15


def _erfc(b: Builder, node: ir.Node) -> ir.Value:
    """``1 − Erf(x)``, the constant 1 in ``x``'s float type (``CastLike`` when the type is not recorded)."""
    x = node.inputs[0]
    if x.dtype is not None:
        one = b.const(np.array(1.0, dtype=x.dtype.numpy()), "one")
    elif b.opset >= CAST_LIKE_SINCE:
        one = b.op("CastLike", [b.scalar(1.0), x], hint="one")
    else:
        one = b.scalar(1.0)
    return b.op("Sub", [one, b.op("Erf", [x], hint="erf")], hint="erfc")


STANDARD_FORMS: dict[str, Callable[[Builder, ir.Node], ir.Value]] = {"Erfc": _erfc}


def _proto_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs (Loop/If/Scan bodies), depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _proto_nodes(sub)


def nonstandard_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Default-domain nodes (subgraphs included) whose op type no ONNX opset up to the model's defines."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    found = []
    for node in _proto_nodes(proto.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            onnx.defs.get_schema(node.op_type, opset, node.domain)
        except onnx.defs.SchemaError:
            found.append(node)
    return found


def standardize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with every node of :data:`STANDARD_FORMS` replaced by its standard form (``proto`` itself,
    untouched, when it has none). Input types are taken from ONNX shape inference where the model does not
    record them."""
    if not any(n.op_type in STANDARD_FORMS for n in nonstandard_nodes(proto)):
        return proto
    try:
        typed = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - inference is only a source of dtypes; CastLike covers the rest
        typed = proto
    model = ir.from_proto(typed)
    graphs = [model.graph, *model.graph.subgraphs()]
    for graph in graphs:
        _rewrite(graph, opset_of(model))
    return ir.to_proto(model)


def _rewrite(graph: ir.Graph, opset: int) -> None:
    targets = [n for n in graph if is_default_domain(n) and n.op_type in STANDARD_FORMS]
    if not targets:
        return
    if not graph.opset_imports:
        graph.opset_imports[""] = opset  # a subgraph: the builder reads the opset from it
    builder = Builder(graph, "standard")
    for node in targets:
        replace_node(node, {0: STANDARD_FORMS[node.op_type](builder, node)})
    graph.sort()
