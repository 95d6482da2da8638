"""Framework → ONNX exporters that check the export reproduces the framework's outputs.

``export_torch`` (PyTorch, through ``torch.onnx``) and ``export_keras`` (Keras/TensorFlow, through tf2onnx)
each return an ``onnx.ModelProto`` with a dynamic batch axis, after ONNX Runtime has reproduced the
framework's outputs on the example inputs within tolerance. Importing this package imports neither torch
nor TensorFlow; each function imports its framework when called.

Example:
    >>> from onnxshap.converters import export_torch
    >>> model = export_torch(net, x_example, "net.onnx")
"""

from onnxshap.converters.keras_export import export_keras
from onnxshap.converters.torch_export import export_torch

__all__ = ["export_keras", "export_torch"]
