"""Framework models in, ONNX out: torch modules, Keras models and Keras files are exported (and verified) on
the fly."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from onnxshap.errors import ModelLoadError
from onnxshap.graph.builder import collection_paused
from onnxshap.load.data import first_array

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
EXPORT_CHECK_ROWS = 8  # background rows the export is traced on and checked against the framework with


def export_rows(background):
    """The first :data:`EXPORT_CHECK_ROWS` rows of the background's first array: enough to trace the model and
    check the export (the converters also check one more row, the dynamic batch), and the export's cost does not
    grow with the background (ResNet-18 at 224² with 50 rows: 11.9 s and ~1 GB of traced activations)."""
    return first_array(background)[:EXPORT_CHECK_ROWS]


def is_keras_path(model) -> bool:
    """Whether ``model`` is the path of a Keras ``.keras`` / ``.h5`` file or of a SavedModel folder (a folder
    holding ``saved_model.pb``)."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    path = Path(model)
    return path.suffix.lower() in KERAS_SUFFIXES or (path.is_dir() and (path / "saved_model.pb").is_file())


def is_onnx_source(model) -> bool:
    """Whether ``model`` is something :func:`onnxshap.load.model.load_model` reads directly."""
    if isinstance(model, (str, os.PathLike)):
        return not is_keras_path(model)
    return isinstance(model, (bytes, bytearray, onnx.ModelProto))


def framework_to_onnx(model, background) -> onnx.ModelProto:
    """Export a torch module, a Keras model, or a Keras file / SavedModel folder with ``onnxshap.converters``
    (the export is checked numerically against the framework on the first background rows, :func:`export_rows`).

    The cyclic garbage collector is paused meanwhile: tracing allocates objects by the hundred thousand, and
    with TensorFlow's heap loaded one full collection took 0.27 s of tf2onnx's 0.6 s on the Keras BiLSTM×2.

    Raises:
        ModelLoadError: a Keras path that does not exist, or an object that is no model onnxshap knows.
        ExportError: the converter failed or its export does not reproduce the model.
    """
    with collection_paused():
        return _export(model, background)


def _export(model, background) -> onnx.ModelProto:
    """:func:`framework_to_onnx` with the collector as it is."""
    if is_keras_path(model):
        if not Path(model).exists():
            raise ModelLoadError(f"no such Keras model file or SavedModel folder: {model}")
        from onnxshap.converters import export_keras

        return export_keras(model, export_rows(background))
    module = type(model).__module__ or ""
    if module.startswith("torch") or hasattr(model, "state_dict") and hasattr(model, "forward"):
        from onnxshap.converters import export_torch

        return export_torch(model, export_rows(background))
    if module.startswith(("keras", "tf_keras", "tensorflow")) or hasattr(model, "layers") and hasattr(
            model, "predict"):
        from onnxshap.converters import export_keras

        return export_keras(model, export_rows(background))
    raise ModelLoadError(f"cannot explain a {type(model).__name__}: pass an ONNX model (path, bytes, "
                         "ModelProto), a torch.nn.Module, a Keras model, or the path of a .keras/.h5 file or "
                         "SavedModel folder")
