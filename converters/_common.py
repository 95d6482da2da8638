"""What the torch and Keras exporters share: the numerical check, batch-axis checks, naming, atomic saving.

An export is accepted only when ONNX Runtime (CPU) reproduces the framework's outputs on the example inputs
and on a batch of a different size (which proves the batch axis is really dynamic). The tolerance is
scale-free (:func:`within_tolerance`): per output tensor ``|onnx - framework| <= rtol * (|framework| +
max|framework|)`` elementwise, with no absolute term unless the caller gives one. When the float32 check
fails and the framework can compute the exact outputs (torch in float64), the export is still accepted if
ONNX Runtime is about as close to that truth as the framework's own float32 result (:func:`compare_outputs`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from onnxshap import runtime
from onnxshap.errors import ExportError, OnnxRuntimeError, first_line
from onnxshap.files.write import write_atomic

# The newest IR version onnxruntime 1.20-1.31 loads; exporters may write newer ones.
MAX_IR_VERSION = 10

BATCH_DIM = "batch"


def require(module: str, extra: str):
    """Import a framework module, or raise an ExportError naming the pip extra that installs it.

    Args:
        module: the module to import, e.g. ``"torch"``.
        extra: the onnxshap extra that provides it, e.g. ``"torch"`` or ``"tf"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExportError(
            f"exporting needs the Python package {module!r}, which is not installed: "
            f"pip install onnxshap[{extra}]\n  ({exc})"
        ) from exc


def default_names(prefix: str, count: int) -> list[str]:
    """``[prefix]`` for one tensor, else ``[prefix_0, prefix_1, ...]``."""
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def check_names(names: Sequence[str] | None, count: int, what: str) -> list[str]:
    """The given tensor names, or defaults, after checking there is one per tensor."""
    if names is None:
        return default_names(what, count)
    names = list(names)
    if len(names) != count or len(set(names)) != count:
        raise ExportError(
            f"{what}_names must hold {count} distinct name(s), one per model {what}; got {names!r}"
        )
    return names


def grow_batch(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The same rows plus a repeat of the first row, so the batch size differs from the example's."""
    return [a if a.ndim == 0 else np.concatenate([a, a[:1]], axis=0) for a in arrays]


def run_onnx(model: onnx.ModelProto, *feeds: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
    """Run a model with ONNX Runtime on CPU, as the explainer does, once per feed dict through one session
    (the export check's two batch sizes share its set-up); feeds the model does not take are left out.

    Raises:
        ExportError: ONNX Runtime refused the export or failed running it (an exporter bug or an op ONNX
            Runtime lacks): the export is unusable, and the torch exporter tries its next exporter.
    """
    try:
        session = runtime.make_session(model, runtime.CPU)
        wanted = {i.name for i in session.get_inputs()}
        return [runtime.run(session, None, {k: v for k, v in feed.items() if k in wanted}) for feed in feeds]
    except OnnxRuntimeError as exc:
        raise ExportError(f"the export does not run: {exc}") from None


# ONNX Runtime may be this many times as far from the float64 truth as the framework's own float32 result.
TRUTH_FACTOR = 4.0


def compare_outputs(
    got: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    rtol: float,
    atol: float | None = None,
    framework: str,
    context: str,
    truth: Callable[[], Sequence[np.ndarray] | None] | None = None,
) -> None:
    """Raise ExportError unless every ONNX output matches the framework's within tolerance.

    Each output tensor ``e`` (framework) and ``g`` (ONNX) must have the same shape, the same NaN and ±inf
    elements, and, on the finite elements, pass :func:`within_tolerance`. An output that fails is accepted
    after all when ``truth`` gives the exact outputs ``t`` (the framework in float64) and

        ``max|g - t| <= TRUTH_FACTOR * max|e - t| + rtol * max|t|``

    i.e. ONNX Runtime is at most 4x as far from the truth as the framework's own float32 result is, plus
    the relative tolerance on the output's scale. Both run in float32 and may each be off by rounding that
    scales with the internal activations, which can be far larger than the outputs; a wrong export is
    off by its error, whatever torch's rounding. ``truth`` is called only when some output fails (at most
    once); when it returns None the float32 verdict stands.

    Args:
        got: outputs of the ONNX model, in graph-output order.
        expected: the framework's outputs for the same inputs.
        names: the ONNX output names.
        rtol: relative tolerance.
        atol: None (default): none, the tolerance is relative to each output's scale; a float: an absolute
            tolerance added to ``rtol * |framework|`` in place of ``rtol * max|framework|``.
        framework: ``"torch"`` or ``"keras"``, for the message.
        context: what was run (e.g. ``"example inputs, batch 16"``), for the message.
        truth: returns the exact (float64) outputs for the same inputs, or None when it cannot.
    """
    if len(got) != len(expected):
        raise ExportError(
            f"export check failed: the ONNX model has {len(got)} output(s), {framework} returned "
            f"{len(expected)}\n  inputs: {context}"
        )
    failed = []
    for index, (name, g, e) in enumerate(zip(names, got, expected)):
        g64, e64, finite = _checked_pair(name, g, e, framework, context)
        if not within_tolerance(g64[finite], e64[finite], rtol=rtol, atol=atol).all():
            failed.append((index, g64, e64, finite))
    if not failed:
        return
    exact = _call_truth(truth, expected)
    for index, g64, e64, finite in failed:
        t64 = None if exact is None else np.asarray(exact[index], np.float64)
        _refuse_unless_near_truth(names[index], g64, e64, t64, finite, rtol=rtol, atol=atol,
                                  framework=framework, context=context)


def within_tolerance(got: np.ndarray, expected: np.ndarray, *, rtol: float, atol: float | None) -> np.ndarray:
    """Elementwise ``|got - expected| <= rtol * (|expected| + max|expected|)`` (``atol=None``), else
    ``|got - expected| <= atol + rtol * |expected|``.

    The scale-free form has no unit: multiplying both tensors by any factor gives the same verdict. Float32
    rounding of a computation is relative to the magnitudes it passes through; of those, the check sees only
    the output, whose largest element is the scale every element may be off by ``rtol`` of (an element
    near zero, e.g. from cancellation, is judged on that scale, not on its own).
    """
    return np.abs(got - expected) <= _bound(expected, rtol, atol)


def _bound(expected: np.ndarray, rtol: float, atol: float | None) -> np.ndarray:
    """The elementwise tolerance of :func:`within_tolerance` (``expected`` finite)."""
    if atol is None:
        return rtol * (np.abs(expected) + np.abs(expected).max(initial=0.0))
    return atol + rtol * np.abs(expected)


def _checked_pair(name, g, e, framework, context) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both outputs in float64 and the mask of finite elements, after checking the shape and that NaN and
    ±inf sit in the same places."""
    g64 = np.asarray(g).astype(np.float64)
    e64 = np.asarray(e).astype(np.float64)
    if g64.shape != e64.shape:
        raise ExportError(
            f"export check failed: output {name!r} has shape {g64.shape} in ONNX but {e64.shape} in "
            f"{framework}\n  inputs: {context}"
        )
    if not np.array_equal(np.isnan(g64), np.isnan(e64)):
        raise ExportError(
            f"export check failed: output {name!r} has NaN where {framework} has none (or the reverse)"
            f"\n  inputs: {context}"
        )
    finite = np.isfinite(e64)
    infinite = np.isinf(e64)
    if not np.array_equal(np.isfinite(g64), finite) or not np.array_equal(g64[infinite], e64[infinite]):
        raise ExportError(
            f"export check failed: output {name!r} has ±inf where {framework} has another value (or the reverse)"
            f"\n  inputs: {context}"
        )
    return g64, e64, finite


def _call_truth(truth, expected) -> list[np.ndarray] | None:
    """The exact outputs, or None when there is no way to compute them or they do not match in number/shape."""
    if truth is None:
        return None
    exact = truth()
    if exact is None or len(exact) != len(expected):
        return None
    if any(np.shape(t) != np.shape(e) for t, e in zip(exact, expected)):
        return None
    return list(exact)


def _refuse_unless_near_truth(name, g64, e64, t64, finite, *, rtol, atol, framework, context) -> None:
    """Raise the export-check error for one output, unless ONNX is as near the float64 truth (``t64``; None:
    unknown) as the framework's float32 result is. Only the elements finite in every array are compared."""
    if t64 is not None:
        both = finite & np.isfinite(t64)
        onnx_off = float(np.abs(g64[both] - t64[both]).max(initial=0.0))
        float32_off = float(np.abs(e64[both] - t64[both]).max(initial=0.0))
        allowed = TRUTH_FACTOR * float32_off + rtol * float(np.abs(t64[both]).max(initial=0.0))
        if onnx_off <= allowed:
            return
    e_finite = np.where(finite, e64, 0.0)
    diff = np.where(finite, np.abs(g64 - e64), 0.0)
    worst = np.unravel_index(int(np.argmax(diff - _bound(e_finite, rtol, atol))), diff.shape)
    if atol is None:
        tolerance = f"rtol={rtol:g}*(|{framework}| + max|{framework}|), max|{framework}| {np.abs(e_finite).max():.3g}"
    else:
        tolerance = f"atol={atol:g} + rtol={rtol:g}*|{framework}|"
    lines = [
        f"export check failed: output {name!r} differs from {framework} by max abs {diff.max():.3g} "
        f"(tolerance {tolerance})",
        f"  inputs: {context}",
        f"  worst element {tuple(int(i) for i in worst)}: onnx {g64[worst]:.7g}, {framework} {e64[worst]:.7g}",
    ]
    if t64 is not None:
        lines.append(f"  against {framework} in float64: onnx off by {onnx_off:.3g}, {framework} float32 off by "
                     f"{float32_off:.3g} (allowed {TRUTH_FACTOR:g}x that + rtol*max|float64| = {allowed:.3g})")
    raise ExportError("\n".join(lines))


def name_batch_axis(model: onnx.ModelProto) -> None:
    """Name the symbolic first axis of every graph input and output ``batch``; raise if one is fixed.

    Raises:
        ExportError: an input's first axis has a fixed size, so the model cannot take other batch sizes.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            if value.name in initializers or not value.type.HasField("tensor_type"):
                continue
            tensor_type = value.type.tensor_type
            if not tensor_type.HasField("shape") or not tensor_type.shape.dim:
                continue
            dim = tensor_type.shape.dim[0]
            if dim.HasField("dim_value"):
                if kind == "input":
                    raise ExportError(
                        f"export check failed: input {value.name!r} has a fixed batch size {dim.dim_value}; "
                        "the exporter did not keep the batch axis dynamic"
                    )
                continue
            dim.dim_param = BATCH_DIM


def cap_ir_version(model: onnx.ModelProto) -> None:
    """Lower ``ir_version`` to one the supported onnxruntime versions load."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)


def rename_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Rename the graph outputs (in order) to ``names``, updating every node that reads or writes them.

    A different tensor already called by one of the new names is renamed out of the way first.
    """
    graph = model.graph
    old = [o.name for o in graph.output]
    mapping = {o: n for o, n in zip(old, names) if o != n}
    if not mapping:
        return
    taken = _all_names(graph)
    for new in mapping.values():
        if new in taken and new not in mapping:
            spare = _fresh(new, taken)
            taken.add(spare)
            _rename(graph, new, spare)
    for o, n in mapping.items():
        _rename(graph, o, n)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
    return names


def _fresh(base: str, taken: set[str]) -> str:
    k = 0
    while f"{base}__{k}" in taken:
        k += 1
    return f"{base}__{k}"


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename one tensor throughout a graph (subgraphs that read it by name included)."""
    for collection in (graph.input, graph.output, graph.value_info):
        for value in collection:
            if value.name == old:
                value.name = new
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                _rename(sub, old, new)


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write a model to ``path`` atomically (:func:`onnxshap.files.write.write_atomic`; parent folders are
    created). Only a missing path or a regular file is replaced."""
    payload = model.SerializeToString()
    write_atomic(path, lambda file: file.write(payload), make_parents=True)


def finish(model: onnx.ModelProto, path: str | os.PathLike | None) -> onnx.ModelProto:
    """Cap the IR version, check the model, and write it to ``path`` when given."""
    cap_ir_version(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported model is not valid ONNX: {first_line(exc)}") from exc
    if path is not None:
        save_atomic(model, path)
    return model


@contextlib.contextmanager
def quiet(*logger_names: str, level: int = logging.ERROR):
    """Silence warnings and the named loggers' output below ``level`` (progress: ERROR) for the duration."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
