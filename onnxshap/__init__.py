"""onnxshap: Deep SHAP for any deep-learning framework, through ONNX and ONNX Runtime."""

from importlib import metadata

from onnxshap import plots, text, timeseries
from onnxshap.errors import (
    AdditivityError,
    ExportError,
    InputDataError,
    ModelLoadError,
    OnnxRuntimeError,
    OnnxShapError,
    OutputFileError,
    UnsupportedModelError,
    UsageError,
)
from onnxshap.explainer import DeepExplainer
from onnxshap.explanation import Explanation
from onnxshap.runtime import warn_if_both_runtimes_installed

try:
    __version__ = metadata.version("onnxshap")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AdditivityError",
    "DeepExplainer",
    "ExportError",
    "Explanation",
    "InputDataError",
    "ModelLoadError",
    "OnnxRuntimeError",
    "OnnxShapError",
    "OutputFileError",
    "UnsupportedModelError",
    "UsageError",
    "__version__",
    "plots",
    "text",
    "timeseries",
]

warn_if_both_runtimes_installed()
