"""Exceptions onnxshap raises for problems the user can fix, and the one format of their messages.

Every message starts with one line that names the problem (file, tensor, op, node, shape); details follow on
later lines. The CLI prints these without a traceback and exits with the class's ``exit_code``: 2 for usage,
model, data and output-file errors (the user's input is wrong), 1 for everything else (a failed check, a
refusal, a runtime failure). The Python API raises the same classes, so the two agree.
"""

from __future__ import annotations

from collections.abc import Iterable


class OnnxShapError(Exception):
    """Base class: a problem with the user's model, data or options (not a bug in onnxshap)."""

    exit_code = 1


class UsageError(OnnxShapError, ValueError):
    """An option or argument is invalid (unknown device, bad rank order, malformed flag value)."""

    exit_code = 2


class ModelLoadError(OnnxShapError):
    """The model file or object cannot be read as an ONNX model."""

    exit_code = 2


class InputDataError(OnnxShapError, ValueError):
    """The data to explain or the background does not fit the model (shape, dtype, NaN, names)."""

    exit_code = 2


class OutputFileError(OnnxShapError):
    """An output cannot be written as asked: missing or read-only folder, a target that is not a regular file
    or that is one of the run's inputs."""

    exit_code = 2


class UnsupportedModelError(OnnxShapError):
    """The model uses ops or structures onnxshap cannot explain exactly (never answered wrongly)."""


class AdditivityError(OnnxShapError):
    """The SHAP values do not add up to f(x) - E[f(background)] within tolerance (or are not finite)."""


class OnnxRuntimeError(OnnxShapError):
    """ONNX Runtime refused a model or failed while running it (out of memory, a kernel error)."""


class ExportError(OnnxShapError):
    """A framework model could not be exported to ONNX, or the export differs from the framework."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, stripped (its type name when there is none)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


class Refusals:
    """Collects the nodes a stage cannot handle and raises them together as one UnsupportedModelError.

    Every refusal of onnxshap goes through here, so the message has one format: a first line that counts the
    nodes and names their op types, then one line per node with its name, op type, domain and reason.
    """

    def __init__(self) -> None:
        self.items: list[tuple[object, str]] = []

    def add(self, node, reason: str) -> None:
        """Refuse ``node`` (anything with ``name``, ``op_type`` and ``domain``) for ``reason``."""
        self.items.append((node, reason))

    def extend(self, nodes: Iterable, reason: str) -> None:
        for node in nodes:
            self.add(node, reason)

    def __bool__(self) -> bool:
        return bool(self.items)

    def error(self) -> UnsupportedModelError:
        named = [f"{node.name or '<unnamed>'!r} ({_op_label(node)})" for node, _ in self.items[:4]]
        more = f" and {len(self.items) - 4} more" if len(self.items) > 4 else ""
        lines = [f"unsupported model: {len(self.items)} node(s) cannot be explained exactly: "
                 f"{', '.join(named)}{more}"]
        for node, reason in self.items:
            lines.append(f"  node {node.name or '<unnamed>'!r} (op {node.op_type}, domain "
                         f"{node.domain or 'ai.onnx'}): {reason}")
        return UnsupportedModelError("\n".join(lines))

    def raise_if_any(self) -> None:
        if self.items:
            raise self.error()


def _op_label(node) -> str:
    domain = node.domain or "ai.onnx"
    return node.op_type if domain == "ai.onnx" else f"{domain}::{node.op_type}"
