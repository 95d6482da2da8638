"""Keras / TensorFlow → ONNX with tf2onnx, checked against the model's own outputs.

Accepted models: an in-memory Keras 3 or tf_keras (Keras 2) model, a ``.keras`` file, an ``.h5`` file, or a
SavedModel folder (``model.export(dir)`` in Keras 3, ``tf.saved_model.save`` or a tf_keras ``model.save``).

tf2onnx 1.17's ``from_keras`` fails on Keras 3 ``Sequential`` models (``KeyError: 'keras_tensor_N'``: it
looks tensors up by Keras-3 names the traced graph does not have); functional models go through. When
``from_keras`` fails, the model is wrapped in a ``tf.function`` with a batch-dynamic input signature and
converted with ``from_function``, which works for both. SavedModels are converted through their ``serve``
endpoint (or the ``serving_default`` signature) the same way.

tf2onnx writes a TensorFlow op it cannot convert into the graph under its TensorFlow name. ``Erfc`` (Keras 3's
exact GELU) is rewritten as ``1 − Erf`` (:mod:`onnxshap.graph.standard`); any other such op is an ExportError
that names it, before ONNX Runtime would refuse the model as an ``INVALID_GRAPH``. Output names are set to ``output`` /
``output_i`` (tf2onnx would call them ``Identity:0``) and the dynamic batch axis is named ``batch``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnxshap.converters import _common

from onnxshap.errors import ExportError, first_line
from onnxshap.graph.standard import STANDARD_FORMS, nonstandard_nodes, standardize


def export_keras(
    model_or_path: Any,
    example_inputs: Any,
    path: str | os.PathLike | None = None,
    *,
    opset: int = 17,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    rtol: float = 1e-4,
    atol: float | None = None,
) -> onnx.ModelProto:
    """Export a Keras/TensorFlow model to ONNX and check the export reproduces the model.

    The batch (first) axis of every input and output is dynamic and named ``batch``. The export is run
    with ONNX Runtime (CPU) on ``example_inputs`` and on the same rows plus one more; each output must
    satisfy ``|onnx - keras| <= rtol * (|keras| + max|keras|)`` elementwise per output tensor (scale-free: no
    absolute term) against ``model(x, training=False)`` (called once, on the grown batch). Unlike
    :func:`export_torch` there is no float64 second opinion: a Keras model cannot generally be rerun in
    float64, so the float32 verdict is final.

    Args:
        model_or_path: a Keras model, or the path of a ``.keras`` file, ``.h5`` file or SavedModel folder.
        example_inputs: one array, or a list/tuple of arrays for a multi-input model, batch on axis 0.
            Float arrays are cast to float32. For a SavedModel called through a ``serving_default``
            signature, several inputs are taken in the sorted order of the signature's input names.
        path: where to write the ``.onnx`` file (atomically); nothing is written when None.
        opset: the ONNX opset to write.
        input_names: ONNX input names; default ``input`` or ``input_0, input_1, ...``.
        output_names: ONNX output names; default ``output`` or ``output_0, output_1, ...``.
        rtol: relative tolerance of the numerical check.
        atol: None (default): no absolute tolerance, ``rtol`` applies on each output's scale; a float: the
            old form ``|onnx - keras| <= atol + rtol * |keras|``.

    Returns:
        The exported model, with ``ir_version`` at most 10.

    Raises:
        ExportError: TensorFlow/tf2onnx is not installed, the model cannot be loaded or converted, or the
            export's outputs differ from the model's (the first line names the output, the max abs
            difference and the tolerance).

    Example: ``export_keras(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), x, "net.onnx")``.
    """
    tf = _common.require("tensorflow", "tf")
    tf2onnx = _common.require("tf2onnx", "tf")
    arrays = _as_arrays(example_inputs)
    input_names = _common.check_names(input_names, len(arrays), "input")
    call, keras_model = _load(tf, model_or_path)
    grown = _common.grow_batch(arrays)
    expected_grown = _outputs(call(*grown))  # one eager call (also builds a lazily built model) for both checks
    output_names = _common.check_names(output_names, len(expected_grown), "output")
    signature = tuple(tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype), name=n)
                      for a, n in zip(arrays, input_names))
    model = _standard(_convert(tf, tf2onnx, call, keras_model, signature, opset))
    _common.rename_outputs(model, output_names)
    _common.name_batch_axis(model)
    _common.cap_ir_version(model)
    _verify(model, arrays, grown, expected_grown, input_names, output_names, rtol=rtol, atol=atol)
    return _common.finish(model, path)


def _as_arrays(example_inputs: Any) -> list[np.ndarray]:
    """The example inputs as NumPy arrays; floats become float32."""
    items = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
    if not items:
        raise ExportError("example_inputs is empty: give at least one array with the batch on axis 0")
    arrays = []
    for i, item in enumerate(items):
        array = np.asarray(item)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        elif array.dtype.kind not in "biu":
            raise ExportError(f"example input {i} has dtype {array.dtype}; need numbers")
        if array.ndim == 0:
            raise ExportError(f"example input {i} is a scalar; need the batch on axis 0")
        arrays.append(np.ascontiguousarray(array))
    return arrays


def _load(tf, model_or_path: Any) -> tuple[Callable, Any]:
    """A callable ``f(*arrays) -> outputs`` for the model, and the Keras model object if there is one."""
    if isinstance(model_or_path, (str, os.PathLike)):
        location = os.fspath(model_or_path)
        if os.path.isdir(location):
            return _saved_model_call(tf, location), None
        if not os.path.isfile(location):
            raise ExportError(f"no Keras model at {location!r}: no such file or folder")
        suffix = os.path.splitext(location)[1].lower()
        if suffix not in (".keras", ".h5", ".hdf5"):
            raise ExportError(
                f"cannot read {location!r} as a Keras model: expected a .keras or .h5 file or a SavedModel folder"
            )
        model = _load_file(location)
    elif callable(model_or_path) and hasattr(model_or_path, "inputs"):
        model = model_or_path
    else:
        raise ExportError(
            f"export_keras needs a Keras model or a path; got {type(model_or_path).__name__}"
        )
    return _keras_call(model), model


def _load_file(location: str):
    """Load a ``.keras`` or ``.h5`` file with Keras 3, falling back to tf_keras for legacy ``.h5`` files."""
    errors = []
    for module in ("keras", "tf_keras"):
        try:
            keras = __import__(module)
        except ImportError as exc:
            errors.append(f"{module}: {exc}")
            continue
        try:
            return keras.models.load_model(location, compile=False)
        except Exception as exc:  # noqa: BLE001 - try the other Keras
            errors.append(f"{module}: {type(exc).__name__}: {first_line(exc)[:200]}")
    raise ExportError(f"cannot load the Keras model {location!r}\n  " + "\n  ".join(errors))


def _keras_call(model) -> Callable:
    def call(*xs):
        return model(xs[0] if len(xs) == 1 else list(xs), training=False)

    return call


def _saved_model_call(tf, folder: str) -> Callable:
    """A callable over the SavedModel's ``serve`` endpoint, else its ``serving_default`` signature."""
    try:
        loaded = tf.saved_model.load(folder)
    except Exception as exc:
        raise ExportError(f"cannot load the SavedModel folder {folder!r}: {type(exc).__name__}: {exc}") from exc
    if hasattr(loaded, "serve"):
        return lambda *xs: loaded.serve(*xs)
    signatures = getattr(loaded, "signatures", {})
    if "serving_default" not in signatures:
        raise ExportError(f"the SavedModel {folder!r} has no 'serve' endpoint and no 'serving_default' signature")
    signature = signatures["serving_default"]
    keys = sorted(signature.structured_input_signature[1])
    specs = signature.structured_input_signature[1]

    def call(*xs):
        if len(xs) != len(keys):
            raise ExportError(f"the SavedModel takes {len(keys)} input(s) {keys}; got {len(xs)} example input(s)")
        return signature(**{k: tf.cast(x, specs[k].dtype) for k, x in zip(keys, xs)})

    call.saved_model = loaded  # the signature alone does not keep the model's variables alive
    return call


def _outputs(out) -> list[np.ndarray]:
    """Model outputs (tensor, list, tuple or dict; dicts in sorted key order) as a flat list of arrays."""
    import tensorflow as tf

    return [np.asarray(t) for t in tf.nest.flatten(out)]


def _convert(tf, tf2onnx, call, keras_model, signature, opset) -> onnx.ModelProto:
    """tf2onnx's ``from_keras`` for Keras models, else (or when it fails) ``from_function``."""
    failures = []
    # tf2onnx logs ops it cannot convert as errors; _standard rewrites them or reports them itself
    with _common.quiet("tf2onnx", "tensorflow", "absl", level=logging.CRITICAL):
        if keras_model is not None:
            try:
                model, _ = tf2onnx.convert.from_keras(keras_model, input_signature=signature, opset=opset)
                return model
            except Exception as exc:  # noqa: BLE001 - fall back to from_function
                failures.append(("from_keras", exc))
        try:
            function = tf.function(call, input_signature=signature)
            model, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)
            return model
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(("from_function", exc))
    name, exc = failures[-1]
    lines = [f"tf2onnx could not convert the model: {name}: {type(exc).__name__}: {_first_line(exc)}"]
    lines += [f"  {n} also failed: {type(e).__name__}: {_first_line(e)}" for n, e in failures[:-1]]
    raise ExportError("\n".join(lines)) from exc


def _standard(model: onnx.ModelProto) -> onnx.ModelProto:
    """The export with :data:`STANDARD_FORMS` rewritten; raises ExportError naming ops tf2onnx left as they were."""
    model = standardize(model)
    left = nonstandard_nodes(model)
    if left:
        ops = sorted({n.op_type for n in left})
        nodes = ", ".join(repr(n.name or n.output[0]) for n in left[:5]) + (", ..." if len(left) > 5 else "")
        raise ExportError(
            f"tf2onnx could not convert the TensorFlow op(s) {', '.join(ops)} ({len(left)} node(s): {nodes}); "
            f"onnxshap rewrites only {', '.join(sorted(STANDARD_FORMS))}. Replace the layer that writes them or "
            "pass an ONNX model converted another way")
    return model


def _first_line(exc: Exception) -> str:
    """The line of an exception's message that says what went wrong (TF puts it after a traceback)."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not text:
        return ""
    return (text[-1] if text[0] == "in user code:" else text[0])[:300]


def _verify(model, arrays, grown, expected_grown, input_names, output_names, *, rtol, atol) -> None:
    """Compare the export with the model on the example inputs and on one row more (two batch sizes: a fixed
    batch shows). The model ran once, on the grown batch: its first rows are the example inputs' outputs (an
    inference model's rows are independent; a batch-size-dependent rounding is far inside the tolerance)."""
    batch = arrays[0].shape[0]
    got, got_grown = _common.run_onnx(model, dict(zip(input_names, arrays)), dict(zip(input_names, grown)))
    first_rows = [e[:batch] if e.ndim else e for e in expected_grown]
    _common.compare_outputs(got, first_rows, output_names, rtol=rtol, atol=atol, framework="keras",
                            context=f"example inputs, batch {batch}")
    _common.compare_outputs(got_grown, expected_grown, output_names, rtol=rtol, atol=atol,
                            framework="keras", context=f"example inputs plus one row, batch {batch + 1}")
