"""Framework models in, ONNX out: torch modules and Keras models are exported (and verified) on the fly."""

from __future__ import annotations

import os

import onnx

from onnxshap.errors import ModelLoadError
from onnxshap.load.data import first_array


def is_onnx_source(model) -> bool:
    """Whether ``model`` is something :func:`onnxshap.load.model.load_model` reads directly."""
    return isinstance(model, (str, os.PathLike, bytes, bytearray, onnx.ModelProto))


def framework_to_onnx(model, background) -> onnx.ModelProto:
    """Export a torch module or a Keras model with ``onnxshap.converters`` (the export is checked
    numerically against the framework on the background rows)."""
    module = type(model).__module__ or ""
    if module.startswith("torch") or hasattr(model, "state_dict") and hasattr(model, "forward"):
        from onnxshap.converters import export_torch

        return export_torch(model, first_array(background))
    if module.startswith(("keras", "tf_keras", "tensorflow")) or hasattr(model, "layers") and hasattr(
            model, "predict"):
        from onnxshap.converters import export_keras

        return export_keras(model, first_array(background))
    raise ModelLoadError(f"cannot explain a {type(model).__name__}: pass an ONNX model (path, bytes, "
                         "ModelProto), a torch.nn.Module or a Keras model")
