"""Explanation.to_shap() feeds shap's own plots."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnxshap

shap = pytest.importorskip("shap")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = oh.make_tensor("w", onnx.TensorProto.FLOAT, [4, 2], rng.normal(size=8))
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Relu", ["h"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])], initializer=[w])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_to_shap_drives_shap_plots(tmp_path):
    import matplotlib.pyplot as plt
    import pandas as pd

    rng = np.random.default_rng(1)
    columns = ["rain", "temp", "wind", "sun"]
    background = pd.DataFrame(rng.normal(size=(10, 4)).astype(np.float32), columns=columns)
    x = pd.DataFrame(rng.normal(size=(6, 4)).astype(np.float32), columns=columns)
    exp = onnxshap.DeepExplainer(_model(), background).explain(x)
    assert exp.feature_names == columns
    one = exp.to_shap(output=1)
    assert one.values.shape == (6, 4) and list(one.feature_names) == columns
    np.testing.assert_allclose(one.values.sum(axis=1) + one.base_values, exp.predictions[:, 1], rtol=1e-4,
                               atol=1e-5)
    shap.plots.bar(one, show=False)
    plt.savefig(tmp_path / "bar.png")
    plt.close("all")
    shap.plots.waterfall(one[0], show=False)
    plt.savefig(tmp_path / "waterfall.png")
    plt.close("all")
    assert (tmp_path / "bar.png").stat().st_size > 5000 and (tmp_path / "waterfall.png").stat().st_size > 5000
    both = exp.to_shap()
    assert both.values.shape == (6, 4, 2) and list(both.output_names) == ["0", "1"]
