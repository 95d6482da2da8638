"""Exceptions onnxshap raises for problems the user can fix.

Every message starts with one line that names the problem (file, tensor, op, node, shape); details follow on
later lines. The CLI prints these without a traceback and exits with the documented code.
"""

from __future__ import annotations


class OnnxShapError(Exception):
    """Base class: a problem with the user's model, data or options (not a bug in onnxshap)."""

    exit_code = 1


class ModelLoadError(OnnxShapError):
    """The model file or object cannot be read as an ONNX model."""


class UnsupportedModelError(OnnxShapError):
    """The model uses ops or structures onnxshap cannot explain exactly (never answered wrongly)."""


class InputDataError(OnnxShapError):
    """The data to explain or the background does not fit the model (shape, dtype, NaN, names)."""


class AdditivityError(OnnxShapError):
    """The SHAP values do not add up to f(x) - E[f(background)] within tolerance."""


class ExportError(OnnxShapError):
    """A framework model could not be exported to ONNX, or the export differs from the framework."""


def unsupported_nodes_error(nodes, reason: str = "no DeepLIFT rule for these ops") -> UnsupportedModelError:
    """Build one error that lists every offending node at once.

    Args:
        nodes: iterable of objects with ``name``, ``op_type`` and ``domain`` (onnx_ir nodes).
        reason: what is wrong with all of them.
    """
    nodes = list(nodes)
    kinds = sorted({(n.domain or "ai.onnx", n.op_type) for n in nodes})
    kind_text = ", ".join(f"{op}" if dom == "ai.onnx" else f"{dom}::{op}" for dom, op in kinds)
    lines = [f"unsupported model: {len(nodes)} node(s) of type {kind_text}: {reason}"]
    for n in nodes:
        lines.append(f"  node {n.name or '<unnamed>'!r}: op {n.op_type} (domain {n.domain or 'ai.onnx'})")
    return UnsupportedModelError("\n".join(lines))
