"""Exports without dynamic axes (batch fixed at 1) are relaxed and explained like dynamic ones."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest

import onnxshap

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from zoo import cached_onnx, mnist_cnn  # noqa: E402


class Forecaster(nn.Module):
    """LSTM over (T, F) windows → one value from the last step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _export_fixed(module: nn.Module, example: torch.Tensor, dynamo: bool) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(module, (example,), dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17)
        return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["cnn", "lstm"])
def test_batch_one_export_matches_dynamic_export(name, dynamo):
    rng = np.random.default_rng(0)
    if name == "cnn":
        module, shape, dynamic = mnist_cnn(), (1, 28, 28), cached_onnx("mnist_cnn")
    else:
        from onnxshap.converters import export_torch

        module, shape = Forecaster().eval(), (5, 4)
        dynamic = export_torch(module, np.zeros((2, *shape), np.float32))
    fixed = _export_fixed(module, torch.zeros(1, *shape), dynamo)
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1  # really exported with the batch fixed at 1
    x = rng.random((3, *shape), dtype=np.float32)
    background = rng.random((6, *shape), dtype=np.float32)
    relaxed = onnxshap.DeepExplainer(fixed, background).explain(x)
    reference = onnxshap.DeepExplainer(dynamic, background).explain(x)
    assert relaxed.additivity_error.max() <= 1e-4
    np.testing.assert_allclose(relaxed.values, reference.values, rtol=1e-4, atol=1e-6)
