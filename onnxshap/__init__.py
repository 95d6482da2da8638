"""onnxshap: Deep SHAP for any deep-learning framework, through ONNX and ONNX Runtime."""

from onnxshap import plots, timeseries
from onnxshap.errors import (
    AdditivityError,
    InputDataError,
    ModelLoadError,
    OnnxShapError,
    UnsupportedModelError,
)
from onnxshap.explainer import DeepExplainer
from onnxshap.explanation import Explanation
from onnxshap.runtime import warn_if_both_runtimes_installed

__version__ = "0.1.0"
__all__ = [
    "AdditivityError",
    "DeepExplainer",
    "Explanation",
    "InputDataError",
    "ModelLoadError",
    "OnnxShapError",
    "UnsupportedModelError",
    "__version__",
    "plots",
    "timeseries",
]

warn_if_both_runtimes_installed()
