"""Seeded recurrent models for ``test_recurrent_models.py`` (helpers, not tests).

* :class:`RecurrentNet`: ``nn.LSTM`` / ``nn.GRU`` (layers, bidirectional, batch_first) + a Linear head on the
  last step or on the flattened sequence; input always ``(batch, T, F)``.
* :class:`HandLSTM` / :class:`HandGRU`: the same cell written out per time step (Linear, sigmoid, tanh,
  elementwise products, a Python loop over T), *sharing* the parameters of a one-layer ``RecurrentNet``.
* Keras 3 models (random weights, non-zero biases) and Keras 3 twins of torch nets, converted with tf2onnx
  through ``converters.export_keras``.
* ``legacy_shap``: ``benchmarks/legacy_shap.py`` loaded as a module (it imports no framework at import time),
  to run shap's TF1-graph DeepExplainer on a tf_keras twin in a subprocess.
* :func:`additivity_errors`: DESIGN.md §5.1 measured with ONNX Runtime on the *original* export, never with
  onnxshap's own forward pass.

Exports are cached for the session by configuration (``functools.cache`` over serialized bytes); callers get
fresh ``ModelProto`` copies.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import zoo
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SEED = 0
T, F, H, K = 5, 3, 4, 2  # steps, variables, hidden units, outputs
N, M = 4, 10  # explained rows, background rows
RECURRENT_OPS = {"LSTM", "GRU", "RNN", "Loop", "Scan"}


def data(n: int = N, m: int = M, steps: int = T, features: int = F, seed: int = SEED):
    """``(X, background)``: disjoint standard-normal float32 draws of shape ``(n | m, steps, features)``."""
    rng = np.random.default_rng(seed + 7919)
    x = rng.standard_normal((n + m, steps, features), dtype=np.float32)
    return np.ascontiguousarray(x[:n]), np.ascontiguousarray(x[n:])


# --------------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------------


class RecurrentNet(nn.Module):
    """``(batch, T, F)`` → LSTM/GRU stack → Linear(k) on the last step (``head="last"``) or the flattened
    sequence (``head="flat"``). With ``batch_first=False`` the input is transposed to (T, batch, F) for the
    recurrent layer and back, so the explained input is batch-major either way."""

    def __init__(self, cell: str, layers: int = 1, bidirectional: bool = False, batch_first: bool = True,
                 head: str = "last", steps: int = T, features: int = F, hidden: int = H, k: int = K):
        super().__init__()
        assert cell in ("lstm", "gru") and head in ("last", "flat")
        self.cell, self.batch_first, self.head_kind = cell, batch_first, head
        kind = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = kind(features, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        width = hidden * (2 if bidirectional else 1)
        self.head = nn.Linear(width if head == "last" else steps * width, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        y, _ = self.rnn(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y[:, -1] if self.head_kind == "last" else y.flatten(1))


def recurrent_net(cell: str, layers: int = 1, bidirectional: bool = False, batch_first: bool = True,
                  head: str = "last", seed: int = SEED, **sizes) -> RecurrentNet:
    """A seeded :class:`RecurrentNet` in eval mode; weights ~ U(±0.8) so the gates really saturate."""
    torch.manual_seed(seed)
    net = RecurrentNet(cell, layers, bidirectional, batch_first, head, **sizes)
    with torch.no_grad():
        for p in net.rnn.parameters():
            p.uniform_(-0.8, 0.8)
    return net.eval()


class _HandCell(nn.Module):
    """Shares the (one-layer, one-direction, batch_first) recurrent weights and head of a RecurrentNet.

    ``masked=True``: Keras's ``Masking(0)`` written out, ``keep_t = [Σ_f [x_tf ≠ 0] > 0]`` as a 0/1 float, the
    input multiplied by it and each state carried over where it is 0 (``s_t = keep_t·s_new + (1 − keep_t)·s``).
    """

    def __init__(self, net: RecurrentNet, masked: bool = False):
        super().__init__()
        rnn = net.rnn
        assert rnn.num_layers == 1 and not rnn.bidirectional and rnn.batch_first
        self.hidden, self.head_kind, self.masked = rnn.hidden_size, net.head_kind, masked
        self.ih = nn.Linear(rnn.input_size, rnn.weight_ih_l0.shape[0])
        self.hh = nn.Linear(rnn.hidden_size, rnn.weight_hh_l0.shape[0])
        # the same Parameter objects: one set of weights, two modules
        self.ih.weight, self.ih.bias = rnn.weight_ih_l0, rnn.bias_ih_l0
        self.hh.weight, self.hh.bias = rnn.weight_hh_l0, rnn.bias_hh_l0
        self.head = net.head

    def finish(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return self.head(hs[-1] if self.head_kind == "last" else torch.cat(hs, dim=1))

    def keep(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x·keep, keep)`` with ``keep`` (batch, T, 1) the 0/1 mask (all ones unless ``masked``)."""
        if not self.masked:
            return x, torch.ones_like(x[..., :1])
        keep = ((x != 0).float().sum(dim=-1, keepdim=True) > 0).float()
        return x * keep, keep

    @staticmethod
    def carry(keep: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return keep * new + (1 - keep) * old


class HandLSTM(_HandCell):
    """torch's LSTM equations per step: gates i, f, g, o from Linear(x_t) + Linear(h)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, keep = self.keep(x)
        h = x.new_zeros(x.shape[0], self.hidden)
        c = x.new_zeros(x.shape[0], self.hidden)
        hs = []
        for t in range(x.shape[1]):
            gates = self.ih(x[:, t]) + self.hh(h)
            i, f, g, o = gates.chunk(4, dim=1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c_new = f * c + i * g
            h_new = o * torch.tanh(c_new)
            if self.masked:
                c, h = self.carry(keep[:, t], c_new, c), self.carry(keep[:, t], h_new, h)
            else:
                c, h = c_new, h_new
            hs.append(h)
        return self.finish(hs)


class HandGRU(_HandCell):
    """torch's GRU equations per step: r, z from the summed projections, n = tanh(x_n + r ⊙ h_n)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, keep = self.keep(x)
        h = x.new_zeros(x.shape[0], self.hidden)
        hs = []
        for t in range(x.shape[1]):
            x_r, x_z, x_n = self.ih(x[:, t]).chunk(3, dim=1)
            h_r, h_z, h_n = self.hh(h).chunk(3, dim=1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h_new = (1 - z) * n + z * h
            h = self.carry(keep[:, t], h_new, h) if self.masked else h_new
            hs.append(h)
        return self.finish(hs)


def hand_written(net: RecurrentNet, masked: bool = False) -> nn.Module:
    return (HandLSTM if net.cell == "lstm" else HandGRU)(net, masked).eval()


def torch_forward(module: nn.Module, x: np.ndarray) -> np.ndarray:
    return zoo.torch_forward(module, x)


def export_dynamo(module: nn.Module, example: np.ndarray) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)`` with ``dynamic_shapes`` at opset 18 (its native opset: no version
    conversion), checked like ``zoo.export_onnx``: full ONNX check, ORT vs torch on two batch sizes."""
    example_t = torch.from_numpy(np.asarray(example, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (example_t,), dynamo=True, opset_version=18,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), input_names=["x"],
                                    output_names=["y"], verbose=False)
    model = program.model_proto
    model.ir_version = min(model.ir_version, zoo.IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    other = np.random.default_rng(SEED).standard_normal((len(example) + 2, *example.shape[1:]), dtype=np.float32)
    for x in (np.asarray(example, dtype=np.float32), other):
        zoo.assert_close_scaled(zoo.run_onnx(model, x), zoo.torch_forward(module, x), 1e-5, "dynamo export vs torch")
    return model


@functools.cache
def _torch_export_bytes(config: tuple, exporter: str, hand: bool, masked: bool = False) -> bytes:
    net = recurrent_net(*config)
    module = hand_written(net, masked) if hand else net
    x, _ = data()
    if exporter == "dynamo":
        return export_dynamo(module, x[:3]).SerializeToString()
    return zoo.export_onnx(module, x[:3], dynamo=False).SerializeToString()


def torch_export(cell: str, layers: int = 1, bidirectional: bool = False, batch_first: bool = True,
                 head: str = "last", exporter: str = "torchscript", hand: bool = False,
                 masked: bool = False) -> onnx.ModelProto:
    """The cached, checked ONNX export of ``recurrent_net(...)`` (or of its hand-written twin, ``masked``:
    with Keras's ``Masking(0)`` written out).

    ``exporter``: ``"torchscript"`` (``dynamo=False`` with ``dynamic_axes``, opset 17, ``zoo.export_onnx``) or
    ``"dynamo"`` (``dynamo=True`` with ``dynamic_shapes``, opset 18, :func:`export_dynamo`); both checked
    against torch.
    """
    assert exporter in ("torchscript", "dynamo")
    return onnx.load_from_string(_torch_export_bytes((cell, layers, bidirectional, batch_first, head), exporter,
                                                     hand, masked))


# --------------------------------------------------------------------------------------------------
# ONNX Runtime reference
# --------------------------------------------------------------------------------------------------


def ort_predict(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The original model's first output on ``x`` (stock ONNX Runtime, CPU), flattened to ``(n, k)``."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: np.asarray(x, dtype=np.float32)})[0]
    return out.reshape(out.shape[0], -1).astype(np.float64)


def additivity_errors(values: np.ndarray, model: onnx.ModelProto, x: np.ndarray, background: np.ndarray):
    """Per row: ``max_j |Σφ_j − (f_j(x) − mean f_j(R))| / max(1, |f_j(x) − mean f_j(R)|)`` with f from ORT.

    ``values``: ``(n, T, F)`` or ``(n, T, F, k)``. Returns ``(errors (n,), change (n, k))``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == x.ndim:
        values = values[..., None]
    total = values.reshape(values.shape[0], -1, values.shape[-1]).sum(axis=1)
    change = ort_predict(model, x) - ort_predict(model, background).mean(axis=0)
    assert total.shape == change.shape, (total.shape, change.shape)
    return (np.abs(total - change) / np.maximum(1.0, np.abs(change))).max(axis=1), change


def rel_err(actual: np.ndarray, desired: np.ndarray) -> float:
    """``max|a − b| / max(max|b|, 1e-6)`` per output (last axis), worst output."""
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    a = actual.reshape(-1, actual.shape[-1])
    d = desired.reshape(-1, desired.shape[-1])
    return float((np.abs(a - d).max(axis=0) / np.maximum(np.abs(d).max(axis=0), 1e-6)).max())


def op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


# --------------------------------------------------------------------------------------------------
# Keras 3 (tf2onnx through converters.export_keras)
# --------------------------------------------------------------------------------------------------


def _keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    return keras


def keras_model(kind: str, seed: int = SEED, activation: str = "tanh"):
    """A keras-3 functional model on ``(T, F)`` inputs with every weight (biases too) drawn ~ U(±0.8).

    kinds: ``lstm`` / ``gru`` (Dense on the last state), ``lstm_flat`` / ``gru_flat`` (return_sequences,
    Flatten, Dense), ``bilstm`` (Bidirectional LSTM), ``lstm_gru`` (LSTM(seq) → GRU).
    """
    keras = _keras()
    layers = keras.layers
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((T, F), name="x")
    if kind in ("lstm", "lstm_flat"):
        h = layers.LSTM(H, activation=activation, return_sequences=kind.endswith("flat"))(inputs)
    elif kind in ("gru", "gru_flat"):
        h = layers.GRU(H, activation=activation, return_sequences=kind.endswith("flat"))(inputs)
    elif kind == "bilstm":
        h = layers.Bidirectional(layers.LSTM(H, activation=activation))(inputs)
    elif kind == "lstm_gru":
        h = layers.GRU(H)(layers.LSTM(H, return_sequences=True)(inputs))
    else:
        raise ValueError(kind)
    if kind.endswith("flat"):
        h = layers.Flatten()(h)
    model = keras.Model(inputs, layers.Dense(K)(h))
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-0.8, 0.8, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def keras_twin(net: RecurrentNet, go_backwards: bool = False, mask_value: float | None = None):
    """A keras-3 LSTM/GRU + Dense with the weights of a one-layer, one-direction, ``head="last"`` net;
    ``go_backwards`` reads the sequence last step first, ``mask_value`` puts ``Masking(mask_value)`` before it."""
    keras = _keras()
    rnn = net.rnn
    assert rnn.num_layers == 1 and not rnn.bidirectional and net.head_kind == "last"
    w = [p.detach().numpy() for p in (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)]
    legacy = legacy_shap()
    inputs = keras.Input((T, F), name="x")
    if net.cell == "lstm":
        layer = keras.layers.LSTM(rnn.hidden_size, go_backwards=go_backwards)
        weights = legacy.keras_lstm_weights(*w)
    else:
        layer = keras.layers.GRU(rnn.hidden_size, reset_after=True, go_backwards=go_backwards)
        weights = legacy.keras_gru_weights(*w)
    dense = keras.layers.Dense(net.head.out_features)
    masked = inputs if mask_value is None else keras.layers.Masking(mask_value)(inputs)
    model = keras.Model(inputs, dense(layer(masked)))
    layer.set_weights(weights)
    dense.set_weights([net.head.weight.detach().numpy().T, net.head.bias.detach().numpy()])
    return model


def keras_predict(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(np.asarray(x, dtype=np.float32), training=False), dtype=np.float64)


@functools.cache
def _keras_export_bytes(kind: str) -> bytes:
    from onnxshap.converters import export_keras

    x, background = data()
    return export_keras(keras_model(kind), np.concatenate([x, background])).SerializeToString()


def keras_export(kind: str) -> onnx.ModelProto:
    """The cached tf2onnx export (checked against Keras by ``export_keras``) of ``keras_model(kind)``."""
    return onnx.load_from_string(_keras_export_bytes(kind))


# --------------------------------------------------------------------------------------------------
# shap's legacy TF1 path (benchmarks/legacy_shap.py, run in a subprocess)
# --------------------------------------------------------------------------------------------------


@functools.cache
def legacy_shap():
    """``benchmarks/legacy_shap.py`` as a module (numpy-only at import; TensorFlow runs in its subprocess)."""
    spec = importlib.util.spec_from_file_location("legacy_shap", ROOT / "benchmarks" / "legacy_shap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_legacy_input(path, net: RecurrentNet, x: np.ndarray, background: np.ndarray, **options) -> Path:
    """The script's input ``.npz`` for a one-layer, one-direction net (its weights in Keras layout); ``options``:
    ``go_backwards``, ``mask_value`` (see ``benchmarks/legacy_shap.py``)."""
    legacy = legacy_shap()
    rnn = net.rnn
    assert rnn.num_layers == 1 and not rnn.bidirectional
    w = [p.detach().numpy() for p in (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)]
    kernel, recurrent, bias = (legacy.keras_lstm_weights if net.cell == "lstm" else legacy.keras_gru_weights)(*w)
    dense = net.head.weight.detach().numpy().T  # "flat": torch and Keras both flatten (T, H) row-major
    return legacy.write_input(path, cell=net.cell, kernel=kernel, recurrent_kernel=recurrent, bias=bias,
                              dense_kernel=dense, dense_bias=net.head.bias.detach().numpy(), x=x,
                              background=background, head=net.head_kind, **options)
