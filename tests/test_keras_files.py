"""Keras files passed as they are: ``DeepExplainer("model.keras", background)`` and ``onnxshap model.keras
data.npy`` (also ``.h5`` and SavedModel folders) export the model with ``converters.export_keras`` on the
background rows (the export checked against Keras) and explain it.

Values are checked against Keras itself: additivity with ``f`` = the Keras model's own outputs (never onnxshap's
forward pass), and equality with the values of the same model exported by hand and explained as an ONNX file.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from onnxshap.converters import export_keras

import onnxshap
from onnxshap.cli import EXIT_OK, EXIT_USAGE, main
from onnxshap.errors import ModelLoadError

keras = pytest.importorskip("keras")

ADDITIVITY = 1e-4  # DESIGN.md §5.1, relative to max(1, |Δf|)
N, M, F, K = 6, 10, 5, 3


@pytest.fixture(scope="module")
def model_and_data():
    """A small Keras 3 model (Dense gelu → Dense tanh → Dense) and standard-normal rows, background first."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((F,), name="features")
    hidden = keras.layers.Dense(8, activation="gelu")(inputs)
    net = keras.Model(inputs, keras.layers.Dense(K)(keras.layers.Dense(6, activation="tanh")(hidden)))
    rows = np.random.default_rng(0).standard_normal((M + N, F)).astype(np.float32)
    return net, rows[:M], rows[M:]


def saved(net, folder, kind: str) -> str:
    """``net`` saved as ``kind``: ``keras``, ``h5`` or ``savedmodel``; returns the path."""
    if kind == "savedmodel":
        net.export(str(folder / "saved"), verbose=False)
        return str(folder / "saved")
    path = folder / f"model.{kind}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "HDF5 is legacy"
        net.save(path)
    return str(path)


def keras_change(net, x: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``f(x) − mean f(background)`` from Keras, (n, K) float64."""
    fx = np.asarray(net(x, training=False), np.float64)
    return fx - np.asarray(net(background, training=False), np.float64).mean(axis=0)


def assert_additive_to_keras(values: np.ndarray, net, x: np.ndarray, background: np.ndarray) -> None:
    change = keras_change(net, x, background)
    total = values.reshape(len(x), -1, K).astype(np.float64).sum(axis=1)
    error = np.abs(total - change) / np.maximum(1.0, np.abs(change))
    assert error.max() <= ADDITIVITY, f"additivity against Keras: {error.max():.3g}"


@pytest.fixture(scope="module")
def reference_values(model_and_data):
    """The values of the same model exported by hand (``export_keras``) and explained as an ONNX proto."""
    net, background, x = model_and_data
    return onnxshap.DeepExplainer(export_keras(net, background), background).shap_values(x)


@pytest.mark.parametrize("kind", ["keras", "h5", "savedmodel"])
def test_deep_explainer_takes_a_keras_path(kind, model_and_data, reference_values, tmp_path):
    net, background, x = model_and_data
    path = saved(net, tmp_path, kind)
    explainer = onnxshap.DeepExplainer(path, background)
    values = explainer.shap_values(x)
    assert values.shape == (N, F, K)
    assert_additive_to_keras(values, net, x, background)
    np.testing.assert_allclose(values, reference_values, rtol=1e-5, atol=1e-6 * np.abs(reference_values).max())
    np.testing.assert_allclose(explainer.expected_value, np.asarray(net(background), np.float64).mean(axis=0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["keras", "savedmodel"])
def test_cli_takes_a_keras_path(kind, model_and_data, reference_values, tmp_path):
    net, background, x = model_and_data
    path = saved(net, tmp_path, kind)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "background.npy", background)
    out = tmp_path / "values.npz"
    code = main([path, str(tmp_path / "x.npy"), "-b", str(tmp_path / "background.npy"), "-o", str(out), "-q"])
    assert code == EXIT_OK
    with np.load(out) as result:
        values, predictions = result["shap_values"], result["predictions"]
    assert values.shape == (N, F, K)
    np.testing.assert_allclose(predictions, np.asarray(net(x), np.float64), rtol=1e-5, atol=1e-5)
    assert_additive_to_keras(values, net, x, background)
    np.testing.assert_allclose(values, reference_values, rtol=1e-5, atol=1e-6 * np.abs(reference_values).max())


def test_cli_samples_the_keras_export_rows_from_the_data(model_and_data, tmp_path):
    """Without ``-b`` the export is checked on the rows sampled from the data, which are also the background."""
    net, background, x = model_and_data
    rows = np.concatenate([background, x])
    np.save(tmp_path / "rows.npy", rows)
    out = tmp_path / "values.npz"
    code = main([saved(net, tmp_path, "keras"), str(tmp_path / "rows.npy"), "--background-size", "7", "-o",
                 str(out), "-q"])
    assert code == EXIT_OK
    chosen = np.sort(np.random.default_rng(0).choice(len(rows), size=7, replace=False))
    with np.load(out) as result:
        assert_additive_to_keras(result["shap_values"], net, rows, rows[chosen])


def test_missing_keras_path_is_a_load_error(tmp_path, capsys):
    with pytest.raises(ModelLoadError, match="no such Keras model file or SavedModel folder"):
        onnxshap.DeepExplainer(str(tmp_path / "missing.keras"), np.zeros((2, F), np.float32))
    np.save(tmp_path / "x.npy", np.zeros((2, F), np.float32))
    assert main([str(tmp_path / "missing.h5"), str(tmp_path / "x.npy")]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert error.startswith("onnxshap: error: no such Keras model file or SavedModel folder:"), error
    (tmp_path / "folder").mkdir()
    assert main([str(tmp_path / "folder"), str(tmp_path / "x.npy")]) == EXIT_USAGE
    assert "not an .onnx file (nor a SavedModel folder" in capsys.readouterr().err
