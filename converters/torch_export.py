"""PyTorch → ONNX with ``torch.onnx``, checked against the module's own outputs.

Two exporters exist in torch ≥ 2.5: the TorchScript tracer (``dynamo=False``; deprecated since torch 2.9
but still present) and the ``torch.export``-based one (``dynamo=True``). ``exporter="auto"`` tries the
TorchScript tracer first: it takes ~0.1 s where the dynamo exporter takes seconds, writes the requested
opset directly and emits one ``LSTM``/``GRU`` node per recurrent layer. When it fails, or its export does not
reproduce the module, the dynamo exporter is tried. Whichever is used, the result is accepted only if ONNX
Runtime reproduces the module's outputs.

Opsets: by default the TorchScript tracer writes opset 17 and the dynamo exporter its own default (20 in torch
2.13), which it writes directly. Below 18 the dynamo exporter converts its opset-18 graph down, and that
conversion can write an invalid model (torch 2.13 leaves opset 18's ``num_outputs`` attribute on ``Split`` at
opset 17: GPT-2's attention); such an export is refused by the ONNX checker with a hint, never returned.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnxshap.converters import _common

from onnxshap.errors import ExportError, first_line

EXPORTERS = ("auto", "torchscript", "dynamo")
TORCHSCRIPT_OPSET = 17


def export_torch(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike | None = None,
    *,
    opset: int | None = None,
    exporter: str = "auto",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    rtol: float = 1e-4,
    atol: float | None = None,
) -> onnx.ModelProto:
    """Export a ``torch.nn.Module`` to ONNX and check the export reproduces the module.

    The module runs in eval mode during the export (its previous mode is restored afterwards). Every input
    and output gets a dynamic first (batch) axis named ``batch`` unless ``dynamic_batch=False``. The
    export is run with ONNX Runtime (CPU) on ``example_inputs`` and, with a dynamic batch, on the same rows
    plus one more; each output tensor must satisfy ``|onnx - torch| <= rtol * (|torch| + max|torch|)``, or
    else be as close to the module run in float64 as a few times torch's own float32 result is
    (:func:`onnxshap.converters._common.compare_outputs` states the rule and why it has no absolute term).

    Args:
        module: the ``torch.nn.Module`` to export.
        example_inputs: one tensor/array, or a tuple/list of them (positional arguments of ``forward``),
            each with the batch on axis 0. NumPy floating arrays are cast to the module's float dtype.
        path: where to write the ``.onnx`` file (atomically); nothing is written when None.
        opset: the ONNX opset to write; None: 17 with the TorchScript tracer, the dynamo exporter's default
            (20 in torch 2.13) with dynamo.
        exporter: ``"auto"`` (TorchScript tracer, then dynamo), ``"torchscript"`` or ``"dynamo"``.
        input_names: ONNX input names; default ``input`` or ``input_0, input_1, ...``.
        output_names: ONNX output names; default ``output`` or ``output_0, output_1, ...``.
        dynamic_batch: make axis 0 of every input and output dynamic.
        rtol: relative tolerance of the numerical check.
        atol: None (default): no absolute tolerance, ``rtol`` applies on each output's scale; a float: the
            old form ``|onnx - torch| <= atol + rtol * |torch|`` (the float64 comparison still applies).

    Returns:
        The exported model, with ``ir_version`` at most 10.

    Raises:
        ExportError: torch is not installed, every exporter failed, or the export's outputs differ from the
            module's (the first line names the output, the max abs difference and the tolerance).

    Example: ``export_torch(torch.nn.Linear(4, 2), torch.randn(8, 4), "net.onnx")``.
    """
    torch = _common.require("torch", "torch")
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}; got {exporter!r}")
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"export_torch needs a torch.nn.Module; got {type(module).__name__}")
    was_training = module.training
    module.eval()
    try:
        return _export_checked(
            torch, module, example_inputs, path, opset=opset, exporter=exporter, input_names=input_names,
            output_names=output_names, dynamic_batch=dynamic_batch, rtol=rtol, atol=atol,
        )
    finally:
        module.train(was_training)


def _export_checked(torch, module, example_inputs, path, *, opset, exporter, input_names, output_names,
                    dynamic_batch, rtol, atol) -> onnx.ModelProto:
    inputs = _as_tensors(torch, module, example_inputs)
    expected = _run_module(torch, module, inputs)
    input_names = _common.check_names(input_names, len(inputs), "input")
    output_names = _common.check_names(output_names, len(expected), "output")
    trace_inputs = _at_least_two_rows(torch, inputs) if dynamic_batch else inputs
    order = ("torchscript", "dynamo") if exporter == "auto" else (exporter,)
    failures: list[tuple[str, Exception]] = []
    for name in order:
        try:
            model = _EXPORT[name](torch, module, trace_inputs, opset, input_names, output_names, dynamic_batch)
        except Exception as exc:  # noqa: BLE001 - any exporter failure means "try the next one"
            failures.append((name, exc))
            continue
        try:
            _verify(torch, module, model, inputs, expected, input_names, output_names, dynamic_batch,
                    rtol=rtol, atol=atol)
        except ExportError as exc:
            failures.append((name, exc))
            continue
        return _common.finish(model, path)
    raise _combined_error(type(module).__name__, failures)


def _as_tensors(torch, module, example_inputs) -> tuple:
    """The example inputs as a tuple of tensors; NumPy floats take the module's float dtype."""
    items = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not items:
        raise ExportError("example_inputs is empty: give at least one tensor with the batch on axis 0")
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    tensors = []
    for item in items:
        if isinstance(item, torch.Tensor):
            tensors.append(item.detach())
            continue
        array = np.asarray(item)
        if array.dtype.kind == "f":
            tensors.append(torch.from_numpy(np.ascontiguousarray(array)).to(dtype))
        elif array.dtype.kind in "biu":
            tensors.append(torch.from_numpy(np.ascontiguousarray(array)))
        else:
            raise ExportError(f"example input {len(tensors)} has dtype {array.dtype}; need numbers")
    return tuple(tensors)


def _run_module(torch, module, inputs) -> list[np.ndarray]:
    """The module's outputs on ``inputs``, flattened to a list of arrays."""
    with torch.no_grad():
        out = module(*inputs)
    flat = _flatten(out)
    if not flat or not all(isinstance(t, torch.Tensor) for t in flat):
        raise ExportError(
            f"{type(module).__name__}.forward must return a tensor or a tuple/list/dict of tensors; "
            f"got {type(out).__name__}"
        )
    return [t.detach().cpu().numpy() for t in flat]


def _flatten(out) -> list:
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _flatten(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _flatten(item)]
    return [out]


def _at_least_two_rows(torch, inputs) -> tuple:
    """Repeat a single-row example so tracing cannot specialise the batch size to 1."""
    if all(t.ndim == 0 or t.shape[0] != 1 for t in inputs):
        return inputs
    return tuple(t if t.ndim == 0 else torch.cat([t, t], dim=0) for t in inputs)


def _export_torchscript(torch, module, inputs, opset, input_names, output_names, dynamic_batch):
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {
            name: {0: _common.BATCH_DIM} for name, t in zip(input_names, inputs) if t.ndim > 0
        }
        dynamic_axes.update({name: {0: _common.BATCH_DIM} for name in output_names})
    buffer = io.BytesIO()
    with _common.quiet(*TORCH_LOGGERS):
        torch.onnx.export(
            module, inputs, buffer, dynamo=False, opset_version=opset or TORCHSCRIPT_OPSET, input_names=input_names,
            output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(torch, module, inputs, opset, input_names, output_names, dynamic_batch):
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim(_common.BATCH_DIM)
        dynamic_shapes = tuple({0: batch} if t.ndim > 0 else None for t in inputs)
    with _common.quiet(*TORCH_LOGGERS):
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False,
        )
    model = program.model_proto
    if opset is not None:
        _check_converted(model, opset)
    return model


def _check_converted(model: onnx.ModelProto, opset: int) -> None:
    """Refuse a dynamo export converted to ``opset`` that the ONNX checker finds invalid."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"the dynamo exporter's conversion to opset {opset} wrote an invalid model: {first_line(exc)}; "
            "export at opset >= 18 (opset=None: the exporter's default) or with exporter='torchscript'") from None


_EXPORT = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


TORCH_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


def _verify(torch, module, model, inputs, expected, input_names, output_names, dynamic_batch, *, rtol, atol):
    """Compare the export with the module on the example inputs and, if dynamic, on one row more."""
    if dynamic_batch:
        _common.name_batch_axis(model)
    _common.cap_ir_version(model)
    arrays = [t.cpu().numpy() for t in inputs]
    batch = next((a.shape[0] for a in arrays if a.ndim), 0)
    feeds = [dict(zip(input_names, arrays))]
    if dynamic_batch:
        grown = tuple(torch.from_numpy(a) for a in _common.grow_batch(arrays))
        feeds.append(dict(zip(input_names, (t.numpy() for t in grown))))
    got = _common.run_onnx(model, *feeds)
    _common.compare_outputs(got[0], expected, output_names, rtol=rtol, atol=atol, framework="torch",
                            context=f"example inputs, batch {batch}",
                            truth=lambda: _run_float64(torch, module, inputs))
    if dynamic_batch:
        expected_grown = _run_module(torch, module, grown)
        _common.compare_outputs(got[1], expected_grown, output_names, rtol=rtol, atol=atol, framework="torch",
                                context=f"example inputs plus one row, batch {batch + 1}",
                                truth=lambda: _run_float64(torch, module, grown))


def _run_float64(torch, module, inputs) -> list[np.ndarray] | None:
    """The exact outputs: a float64 copy of the module on the float inputs cast to float64 (integer inputs
    unchanged); None when that cannot be run (no double kernel, the module cannot be deep-copied, ...)."""
    try:
        double = copy.deepcopy(module).double().eval()
        cast = tuple(t.double() if t.is_floating_point() else t for t in inputs)
        return _run_module(torch, double, cast)
    except Exception:  # noqa: BLE001 - any failure means "no float64 truth": the float32 verdict stands
        return None


def _combined_error(module_name: str, failures: list[tuple[str, Exception]]) -> ExportError:
    """One ExportError: a numerical mismatch if any exporter got that far, else the first export error."""
    mismatches = [(n, e) for n, e in failures if isinstance(e, ExportError)]
    lead_name, lead = (mismatches or failures)[0]
    first, *rest = str(lead).splitlines() or [type(lead).__name__]
    if not isinstance(lead, ExportError):
        first = f"torch.onnx could not export {module_name}: {type(lead).__name__}: {first}"
    lines = [first, *rest, f"  exporter: {lead_name}"]
    for name, exc in failures:
        if exc is not lead:
            text = str(exc).strip().splitlines()
            lines.append(f"  {name} exporter also failed: {type(exc).__name__}: {text[0] if text else ''}")
    return ExportError("\n".join(lines))
