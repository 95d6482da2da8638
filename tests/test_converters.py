"""converters: torch and Keras exports round-trip through ONNX Runtime, and bad exports are refused."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from onnxshap.converters import _common, export_keras, export_torch

from onnxshap.errors import ExportError

REPO = Path(__file__).resolve().parents[1]


def run(model, *arrays):
    """Outputs of an ONNX model on CPU for positional inputs."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: a for i, a in zip(session.get_inputs(), arrays)})


def first_dims(model):
    """The first axis of every graph input and output, as a dim_param name or an int."""
    values = list(model.graph.input) + list(model.graph.output)
    return [v.type.tensor_type.shape.dim[0].dim_param or v.type.tensor_type.shape.dim[0].dim_value for v in values]


def test_import_loads_no_framework():
    code = (
        "import sys, onnxshap.converters, onnxshap.errors\n"
        "heavy = ('torch', 'tensorflow', 'keras', 'tf_keras', 'tf2onnx', 'jax', 'matplotlib')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- torch

torch = pytest.importorskip("torch")


class LSTMNet(torch.nn.Module):
    """Two stacked LSTMs over (batch, time, 3), a linear head on the last step."""

    def __init__(self):
        super().__init__()
        self.lstm1 = torch.nn.LSTM(3, 6, batch_first=True)
        self.lstm2 = torch.nn.LSTM(6, 4, batch_first=True)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.lstm1(x)
        h, _ = self.lstm2(h)
        return self.head(h[:, -1])


class TwoInTwoOut(torch.nn.Module):
    """Two inputs, two outputs."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(2, 3)

    def forward(self, x, z):
        s = torch.tanh(self.a(x) + self.b(z))
        return s, s.sum(dim=1, keepdim=True)


class ExportDiffers(torch.nn.Module):
    """Computes something else while being exported, so the export cannot match eager mode."""

    def forward(self, x):
        return x * (2.01 if torch.onnx.is_in_onnx_export() else 2.0)


def torch_model(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                  torch.nn.Linear(16, 3))
        return net, torch.randn(4, 5)
    if kind == "cnn":
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10),
        )
        return net, torch.rand(4, 1, 8, 8)
    return LSTMNet(), torch.randn(4, 7, 3)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "lstm"])
def test_torch_round_trip(kind, exporter, tmp_path):
    net, x = torch_model(kind)
    net.train()  # the export must use eval mode and leave the module as it was
    path = tmp_path / f"{kind}.onnx"
    model = export_torch(net, x, path, exporter=exporter)
    assert net.training
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert model.ir_version <= 10
    assert first_dims(model) == ["batch", "batch"]
    other = torch.randn(9, *x.shape[1:])  # a batch size the export never saw
    with torch.no_grad():
        expected = net.eval()(other).numpy()
    np.testing.assert_allclose(run(model, other.numpy())[0], expected, rtol=1e-4, atol=1e-5)


def test_torch_recurrent_export_keeps_lstm_node():
    net, x = torch_model("lstm")
    model = export_torch(net, x, exporter="torchscript")
    assert [n.op_type for n in model.graph.node].count("LSTM") == 2


def test_torch_auto_uses_torchscript_first_and_falls_back_to_dynamo(monkeypatch):
    from onnxshap.converters import torch_export

    net, x = torch_model("mlp")
    calls = []

    def broken(*args):
        calls.append("torchscript")
        raise RuntimeError("tracer broke")

    monkeypatch.setitem(torch_export._EXPORT, "torchscript", broken)
    model = export_torch(net, x)
    assert calls == ["torchscript"]
    assert model.opset_import[0].version >= 18  # the dynamo exporter's own default, written directly
    np.testing.assert_allclose(run(model, x.numpy())[0], net.eval()(x).detach().numpy(), rtol=1e-4, atol=1e-5)


class ThreeWaySplit(torch.nn.Module):
    """``Linear(x).split(2)``: the dynamo exporter writes ``Split`` with opset 18's ``num_outputs``."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 6)

    def forward(self, x):
        a, b, c = self.linear(x).split(2, dim=-1)
        return a * b + c


def test_torch_dynamo_default_opset_writes_a_valid_split():
    """The dynamo exporter at its default opset writes Split as that opset defines it; asked for opset 17, its
    down-conversion keeps ``num_outputs`` (invalid at 17): refused with the hint, never returned."""
    torch.manual_seed(0)
    net, x = ThreeWaySplit().eval(), torch.randn(4, 6)
    model = export_torch(net, x, exporter="dynamo")
    assert "Split" in {n.op_type for n in model.graph.node}
    assert model.opset_import[0].version >= 18
    onnx.checker.check_model(model, full_check=True)
    other = torch.randn(7, 6)
    np.testing.assert_allclose(run(model, other.numpy())[0], net(other).detach().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ExportError) as info:
        export_torch(net, x, exporter="dynamo", opset=17)
    first = str(info.value).splitlines()[0]
    assert "conversion to opset 17 wrote an invalid model" in first and "num_outputs" in first, first
    assert "opset >= 18" in first and "exporter='torchscript'" in first, first
    assert export_torch(net, x).opset_import[0].version == 17  # auto: the TorchScript tracer at 17


def test_torch_multi_input_output_names_and_numpy_inputs():
    torch.manual_seed(0)
    net = TwoInTwoOut()
    x = np.random.default_rng(0).random((3, 4))  # float64: cast to the module's float32
    z = np.random.default_rng(1).random((3, 2))
    model = export_torch(net, (x, z), input_names=["x", "z"], output_names=["s", "total"])
    assert [i.name for i in model.graph.input] == ["x", "z"]
    assert [o.name for o in model.graph.output] == ["s", "total"]
    s, total = run(model, x.astype(np.float32), z.astype(np.float32))
    np.testing.assert_allclose(total[:, 0], s.sum(axis=1), rtol=1e-5)


def test_torch_single_row_example_still_gives_dynamic_batch():
    net, _ = torch_model("mlp")
    for exporter in ("torchscript", "dynamo"):
        model = export_torch(net, torch.randn(1, 5), exporter=exporter)
        assert first_dims(model) == ["batch", "batch"]
        assert run(model, np.ones((6, 5), np.float32))[0].shape == (6, 3)


def test_torch_static_batch_when_asked():
    net, x = torch_model("mlp")
    model = export_torch(net, x, dynamic_batch=False)
    assert first_dims(model) == [4, 4]


def test_torch_export_that_differs_is_refused(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError) as info:
        export_torch(ExportDiffers(), torch.randn(3, 2), path)
    first = str(info.value).splitlines()[0]
    assert "output 'output'" in first and "max abs" in first and "rtol=0.0001*(|torch| + max|torch|)" in first
    assert "against torch in float64: onnx off by" in str(info.value)  # torch float64 agrees with eager mode
    assert not path.exists()


def test_torch_tolerance_is_respected():
    # 2.01 vs 2.0 is a 0.5% difference: accepted with rtol=1e-2, refused by the default.
    model = export_torch(ExportDiffers(), torch.randn(3, 2), exporter="torchscript", rtol=1e-2)
    assert model.graph.node


def test_torch_bad_arguments():
    net, x = torch_model("mlp")
    with pytest.raises(ExportError, match="exporter must be one of"):
        export_torch(net, x, exporter="onnx")
    with pytest.raises(ExportError, match="needs a torch.nn.Module"):
        export_torch(lambda t: t, x)
    with pytest.raises(ExportError, match="output_names must hold 1"):
        export_torch(net, x, output_names=["a", "b"])


def test_torch_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ExportError, match=r"pip install onnxshap\[torch\]"):
        export_torch(object(), np.zeros((1, 2)))


def test_onnx_runtime_mismatch_is_refused(monkeypatch):
    real = _common.run_onnx
    monkeypatch.setattr(_common, "run_onnx", lambda m, *feeds: [[o + 1e-3 for o in outs] for outs in real(m, *feeds)])
    net, x = torch_model("mlp")
    with pytest.raises(ExportError, match="export check failed: output 'output' differs from torch"):
        export_torch(net, x)


# ---------------------------------------------------------------- Keras / TensorFlow

def keras_model(kind: str):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if kind == "dense":
        net = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"),
                                keras.layers.Dropout(0.5), keras.layers.Dense(3)])
        return net, rng.random((4, 5))
    if kind == "conv2d":
        net = keras.Sequential([
            keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(), keras.layers.MaxPooling2D(), keras.layers.Flatten(),
            keras.layers.Dense(10),
        ])
        return net, rng.random((4, 8, 8, 1))
    if kind == "lstm":
        net = keras.Sequential([keras.Input((7, 3)), keras.layers.LSTM(6, return_sequences=True),
                                keras.layers.LSTM(4), keras.layers.Dense(1)])
        return net, rng.random((4, 7, 3))
    inputs = [keras.Input((4,), name="a"), keras.Input((2,), name="b")]
    hidden = keras.layers.Dense(5, activation="tanh")(inputs[0])
    merged = keras.layers.Concatenate()([hidden, inputs[1]])
    net = keras.Model(inputs, [keras.layers.Dense(2)(merged), keras.layers.Dense(1)(merged)])
    return net, [rng.random((4, 4)), rng.random((4, 2))]


def keras_outputs(net, arrays):
    out = net(arrays, training=False)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def as_f32(arrays):
    return [np.asarray(a, np.float32) for a in (arrays if isinstance(arrays, list) else [arrays])]


def grow(arrays, rows=9):
    """New random inputs with a batch size the export never saw."""
    rng = np.random.default_rng(1)
    return [rng.random((rows, *a.shape[1:])).astype(np.float32) for a in as_f32(arrays)]


@pytest.mark.parametrize("kind", ["dense", "conv2d", "lstm", "functional"])
def test_keras_in_memory_round_trip(kind, tmp_path):
    net, x = keras_model(kind)
    model = export_keras(net, x, tmp_path / "k.onnx")
    assert (tmp_path / "k.onnx").is_file()
    assert model.ir_version <= 10
    assert set(first_dims(model)) == {"batch"}
    other = grow(x)
    for got, want in zip(run(model, *other), keras_outputs(net, other if len(other) > 1 else other[0])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv2d", "lstm"])
def test_keras_file_round_trip(kind, tmp_path):
    net, x = keras_model(kind)
    net.save(tmp_path / "m.keras")
    model = export_keras(str(tmp_path / "m.keras"), x)
    other = grow(x)
    np.testing.assert_allclose(run(model, *other)[0], keras_outputs(net, other[0])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "lstm"])
def test_keras_saved_model_round_trip(kind, tmp_path):
    net, x = keras_model(kind)
    net.export(str(tmp_path / "saved"), verbose=False)
    model = export_keras(tmp_path / "saved", x)
    assert first_dims(model) == ["batch", "batch"]
    other = grow(x)
    np.testing.assert_allclose(run(model, *other)[0], keras_outputs(net, other[0])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_keras_legacy_tf_keras_h5(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    tf_keras.utils.set_random_seed(0)
    net = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(6, activation="relu"),
                               tf_keras.layers.Dense(2)])
    net.save(tmp_path / "legacy.h5")
    x = np.random.default_rng(0).random((3, 4))
    model = export_keras(str(tmp_path / "legacy.h5"), x, output_names=["scores"])
    assert [o.name for o in model.graph.output] == ["scores"]
    np.testing.assert_allclose(run(model, x.astype(np.float32))[0], net(x).numpy(), rtol=1e-4, atol=1e-5)


def test_keras_mismatch_is_refused(monkeypatch, tmp_path):
    net, x = keras_model("dense")
    real = _common.run_onnx
    monkeypatch.setattr(_common, "run_onnx",
                        lambda m, *feeds: [[o * 1.01 + 0.01 for o in outs] for outs in real(m, *feeds)])
    with pytest.raises(ExportError) as info:
        export_keras(net, x, tmp_path / "bad.onnx")
    first = str(info.value).splitlines()[0]
    assert "output 'output' differs from keras by max abs" in first and "rtol=0.0001*(|keras| + max|keras|)" in first
    assert not (tmp_path / "bad.onnx").exists()


def test_keras_bad_paths(tmp_path):
    pytest.importorskip("tensorflow")
    with pytest.raises(ExportError, match="no such file or folder"):
        export_keras(tmp_path / "missing.keras", np.zeros((2, 3)))
    (tmp_path / "model.txt").write_text("not a model")
    with pytest.raises(ExportError, match="expected a .keras or .h5 file"):
        export_keras(tmp_path / "model.txt", np.zeros((2, 3)))


def test_tensorflow_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ExportError, match=r"pip install onnxshap\[tf\]"):
        export_keras("model.keras", np.zeros((1, 2)))


def gelu_model():
    """Dense(8, gelu) → Dense(2): Keras 3's exact GELU, which tf2onnx writes with the non-standard ``Erfc``."""
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    net = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(8, activation="gelu")(inputs)))
    return net, np.random.default_rng(0).normal(scale=2.0, size=(16, 6)).astype(np.float32)


def test_keras_gelu_erfc_is_rewritten_as_one_minus_erf():
    net, x = gelu_model()
    model = export_keras(net, x)
    ops = {n.op_type for n in model.graph.node}
    assert "Erfc" not in ops and "Erf" in ops, ops
    other = grow([x])[0] * 4 - 2  # U(−2, 2): both tails of the GELU
    np.testing.assert_allclose(run(model, other)[0], keras_outputs(net, other)[0], rtol=1e-4, atol=1e-5)


def test_onnx_with_erfc_from_tf2onnx_is_explained():
    """A user's own tf2onnx export keeps ``Erfc`` (no ONNX opset defines it; ONNX Runtime refuses it):
    onnxshap rewrites it on load, and the values add up to the Keras model's own outputs."""
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    import onnxshap

    net, x = gelu_model()
    signature = (tf.TensorSpec((None, 6), tf.float32, name="input"),)
    with _common.quiet("tf2onnx", "tensorflow", "absl", level=logging.CRITICAL):
        raw, _ = tf2onnx.convert.from_keras(net, input_signature=signature, opset=17)
    assert "Erfc" in {n.op_type for n in raw.graph.node}
    background, rows = x[:8], x[8:]
    explanation = onnxshap.DeepExplainer(raw, background).explain(rows)
    change = keras_outputs(net, rows)[0] - keras_outputs(net, background)[0].mean(axis=0)
    total = explanation.values.reshape(len(rows), -1, 2).sum(axis=1)
    np.testing.assert_allclose(total, change, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(change).max()))


def test_keras_op_tf2onnx_cannot_convert_is_an_export_error_naming_it(tmp_path):
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    inputs = keras.Input((6,))
    net = keras.Model(inputs, keras.layers.Lambda(lambda t: tf.math.lgamma(t))(keras.layers.Dense(4)(inputs)))
    with pytest.raises(ExportError) as info:
        export_keras(net, np.random.default_rng(0).uniform(1, 2, (4, 6)), tmp_path / "lgamma.onnx")
    first = str(info.value).splitlines()[0]
    assert "tf2onnx could not convert the TensorFlow op(s) Lgamma" in first and "Lgamma'" in first, first
    assert not (tmp_path / "lgamma.onnx").exists()
