"""Deep SHAP on recurrent models, end to end: LSTM/GRU from PyTorch (both exporters) and Keras (tf2onnx).

The acceptance list, one section each:

1. Additivity (DESIGN.md §5.1) on every row for ``nn.LSTM`` / ``nn.GRU`` (1-2 layers, bidirectional,
   batch_first True/False, Linear head on the last step or the flattened sequence) exported with the
   TorchScript and the dynamo exporter, and for Keras 3 LSTM/GRU converted by tf2onnx (a Keras GRU arrives
   as a ``Loop``). ``f`` is ONNX Runtime on the original export, never onnxshap's lowered graph.
2. An independent reference: shap.DeepExplainer on the tf_keras twin (same weights) through shap's legacy
   TF1-graph path, run by ``benchmarks/legacy_shap.py`` in a subprocess (it needs ``TF_USE_LEGACY_KERAS=1``
   before TensorFlow is imported and ``disable_v2_behavior()``; the script's docstring says why).
3. Export-path invariance: a cell written out by hand in PyTorch (sharing the weights) equals the ONNX
   ``LSTM``/``GRU`` op path; the Keras 3 twin through tf2onnx equals the PyTorch export.
4. ``models/stacked_lstm.onnx``: the noise variable x3 gets < 1/10 of x1's and x2's importance.
5. ``models/runoff_lstm.onnx``: the driving variables and lags rank above every other one.
6. Unsupported recurrent variants are refused with one ``UnsupportedModelError`` naming the node.

Plus: a torch module and a Keras model passed to ``DeepExplainer`` directly equal their ``.onnx`` files.
Sizes are small (T = 5, F = 3, hidden 4, n = 4, m = 10) and exports are cached (``recurrent_zoo``).
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import recurrent_zoo as rz  # noqa: E402

import onnxshap  # noqa: E402
from onnxshap import UnsupportedModelError  # noqa: E402
from onnxshap.timeseries import perturbation_sensitivity, time_step_importance, variable_importance  # noqa: E402

ADDITIVITY = 1e-4  # DESIGN.md §5.1, relative to max(1, |Δf|)
LEGACY_TOLERANCE = 1e-3  # onnxshap vs shap's legacy TF path (measured: ~1e-6)
TWIN_TOLERANCE = 1e-5  # a framework twin reproduces the torch outputs
HAND_TOLERANCE = 1e-5  # hand-written cell vs the ONNX op path
KERAS_TWIN_TOLERANCE = 1e-4  # Keras twin through tf2onnx vs the torch export


def explain(model, background, x):
    """(explainer, Explanation) with onnxshap's own additivity check off: the tests measure it themselves."""
    explainer = onnxshap.DeepExplainer(model, background)
    return explainer, explainer.explain(x, check_additivity=False)


def assert_additive(values, model: onnx.ModelProto, x, background) -> float:
    errors, change = rz.additivity_errors(values, model, x, background)
    assert np.abs(change).max() > 1e-2, "the outputs barely move: the check would be vacuous"
    assert np.abs(values).max() > 0
    worst = int(errors.argmax())
    assert errors.max() <= ADDITIVITY, f"row {worst}: additivity error {errors[worst]:.3g} > {ADDITIVITY:g}"
    return float(errors.max())


def require_keras3():
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    keras = pytest.importorskip("keras")
    if int(keras.__version__.split(".")[0]) < 3:
        pytest.skip(f"needs keras 3, found {keras.__version__}")
    return keras


# --------------------------------------------------------------------------------------------------
# 1. additivity: PyTorch (both exporters) and Keras 3 (tf2onnx)
# --------------------------------------------------------------------------------------------------

# (layers, bidirectional, batch_first, head): every option takes both values, each pair of options meets
TORCH_CONFIGS = [
    (1, False, True, "last"),
    (2, False, False, "flat"),
    (1, True, False, "last"),
    (2, True, True, "flat"),
]


def _config_id(config) -> str:
    layers, bidirectional, batch_first, head = config
    return f"{layers}layer-{'bi' if bidirectional else 'uni'}-{'bf' if batch_first else 'tf'}-{head}"


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("config", TORCH_CONFIGS, ids=_config_id)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_torch_recurrent_additivity(cell, config, exporter):
    model = rz.torch_export(cell, *config, exporter=exporter)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(cell.upper()) == config[0], f"expected one ONNX {cell.upper()} node per layer: {ops}"
    x, background = rz.data()
    _, explanation = explain(model, background, x)
    assert explanation.values.shape == (rz.N, rz.T, rz.F, rz.K)
    assert_additive(explanation.values, model, x, background)


KERAS_KINDS = {  # kind -> the ONNX op tf2onnx turns the recurrent layer into
    "lstm": "LSTM",
    "lstm_flat": "LSTM",
    "bilstm": "LSTM",
    "gru": "Loop",
    "gru_flat": "Loop",
    "lstm_gru": "Loop",
}


@pytest.mark.parametrize("kind", list(KERAS_KINDS))
def test_keras_recurrent_additivity(kind):
    require_keras3()
    model = rz.keras_export(kind)
    assert KERAS_KINDS[kind] in rz.op_types(model), rz.op_types(model)
    x, background = rz.data()
    _, explanation = explain(model, background, x)
    assert explanation.values.shape == (rz.N, rz.T, rz.F, rz.K)
    assert_additive(explanation.values, model, x, background)


# --------------------------------------------------------------------------------------------------
# 2. independent reference: shap.DeepExplainer (legacy TF1 graph path) on the tf_keras twin
# --------------------------------------------------------------------------------------------------

LEGACY_NETS = {"lstm": ("lstm", 1, False, True, "last"), "gru": ("gru", 1, False, True, "flat")}


@pytest.fixture(scope="module")
def legacy_results(tmp_path_factory):
    """shap's values for one LSTM and one GRU net, both computed in one subprocess (one TensorFlow start)."""
    for module in ("tensorflow", "tf_keras", "shap"):
        pytest.importorskip(module)
    folder = tmp_path_factory.mktemp("legacy_shap")
    x, background = rz.data()
    nets = {name: rz.recurrent_net(*config) for name, config in LEGACY_NETS.items()}
    pairs = [(rz.write_legacy_input(folder / f"{name}_in.npz", net, x, background), folder / f"{name}_out.npz")
             for name, net in nets.items()]
    results = rz.legacy_shap().run(pairs)
    return {name: (nets[name], result) for name, result in zip(nets, results)}, x, background


@pytest.mark.parametrize("cell", list(LEGACY_NETS))
def test_legacy_twin_reproduces_torch(cell, legacy_results):
    results, x, background = legacy_results
    net, result = results[cell]
    assert rz.rel_err(result["predictions"], rz.torch_forward(net, x)) <= TWIN_TOLERANCE
    assert rz.rel_err(result["background_predictions"], rz.torch_forward(net, background)) <= TWIN_TOLERANCE


@pytest.mark.parametrize("cell", list(LEGACY_NETS))
def test_values_equal_shap_legacy_deep_explainer(cell, legacy_results):
    results, x, background = legacy_results
    net, result = results[cell]
    # the reference itself is exact (additive) on this model, else agreeing with it would prove little
    change = rz.torch_forward(net, x) - rz.torch_forward(net, background).mean(axis=0)
    total = result["shap_values"].reshape(rz.N, -1, rz.K).sum(axis=1)
    assert np.abs(total - change).max() <= ADDITIVITY * max(1.0, np.abs(change).max())
    model = rz.torch_export(*LEGACY_NETS[cell])
    explainer, explanation = explain(model, background, x)
    assert explanation.values.shape == result["shap_values"].shape
    err = rz.rel_err(explanation.values, result["shap_values"])
    assert err <= LEGACY_TOLERANCE, f"onnxshap vs shap legacy DeepExplainer: relative error {err:.3g}"
    np.testing.assert_allclose(np.atleast_1d(explainer.expected_value), result["expected_value"], rtol=1e-5,
                               atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 3. export-path invariance
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["last", "flat"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_hand_written_cell_equals_onnx_recurrent_op(cell, head):
    net = rz.recurrent_net(cell, head=head)
    hand = rz.hand_written(net)
    x, background = rz.data()
    both = np.concatenate([x, background])
    assert rz.rel_err(rz.torch_forward(hand, both), rz.torch_forward(net, both)) <= 1e-6  # one function
    op_model = rz.torch_export(cell, head=head)
    hand_model = rz.torch_export(cell, head=head, hand=True)
    assert cell.upper() in rz.op_types(op_model)
    assert not rz.op_types(hand_model) & rz.RECURRENT_OPS, rz.op_types(hand_model)
    _, op_explanation = explain(op_model, background, x)
    _, hand_explanation = explain(hand_model, background, x)
    assert_additive(hand_explanation.values, hand_model, x, background)
    err = rz.rel_err(hand_explanation.values, op_explanation.values)
    assert err <= HAND_TOLERANCE, f"hand-written {cell} vs ONNX {cell.upper()} op: relative error {err:.3g}"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_keras_twin_through_tf2onnx_equals_torch_export(cell):
    require_keras3()
    from onnxshap.converters import export_keras

    net = rz.recurrent_net(cell)
    twin = rz.keras_twin(net)
    x, background = rz.data()
    both = np.concatenate([x, background])
    assert rz.rel_err(rz.keras_predict(twin, both), rz.torch_forward(net, both)) <= TWIN_TOLERANCE
    keras_model = export_keras(twin, both)
    assert {"lstm": "LSTM", "gru": "Loop"}[cell] in rz.op_types(keras_model)
    torch_model = rz.torch_export(cell)
    _, keras_explanation = explain(keras_model, background, x)
    _, torch_explanation = explain(torch_model, background, x)
    err = rz.rel_err(keras_explanation.values, torch_explanation.values)
    assert err <= KERAS_TWIN_TOLERANCE, f"Keras twin (tf2onnx) vs torch export: relative error {err:.3g}"


# --------------------------------------------------------------------------------------------------
# 3b. Keras go_backwards (ReverseSequence) and Masking, against shap's legacy path and exact twins
# --------------------------------------------------------------------------------------------------

CELLS = ["lstm", "gru"]
SAME_PADDING = (1, 3)  # steps that are all zeros in every row: each pair has the same mask


def padded(x: np.ndarray, steps_per_row) -> np.ndarray:
    """``x`` with the listed steps of each row set to 0 (Masking(0) skips them); rows past the list untouched."""
    x = x.copy()
    for row, steps in enumerate(steps_per_row):
        x[row, list(steps)] = 0.0
    return x


def same_mask_data() -> tuple[np.ndarray, np.ndarray]:
    x, background = rz.data()
    return (padded(x, [SAME_PADDING] * len(x)), padded(background, [SAME_PADDING] * len(background)))


def differing_mask_data() -> tuple[np.ndarray, np.ndarray]:
    """Trailing, leading, inner and no padding among the rows and the background: masks differ in most pairs."""
    x, background = rz.data()
    return (padded(x, [(3, 4), (0,), (), (2,)]), padded(background, [(4,), (4,), (3, 4), (), (0, 1), (), (2,)]))


def keras_twin_export(cell: str, data: np.ndarray, **options) -> tuple[onnx.ModelProto, object]:
    """(tf2onnx export, Keras model) of the Keras 3 twin of ``rz.recurrent_net(cell)`` with ``options``."""
    require_keras3()
    from onnxshap.converters import export_keras

    twin = rz.keras_twin(rz.recurrent_net(cell), **options)
    return export_keras(twin, data), twin


SEQUENCE_OPTIONS = {"go_backwards": {"go_backwards": True}, "masking": {"mask_value": 0.0}}
LEGACY_SEQUENCE_CASES = [(cell, option) for option in SEQUENCE_OPTIONS for cell in CELLS]


@pytest.fixture(scope="module")
def legacy_sequence_results(tmp_path_factory):
    """shap's legacy values for go_backwards and Masking(0) (same-mask data) twins, in one subprocess."""
    for module in ("tensorflow", "tf_keras", "shap"):
        pytest.importorskip(module)
    folder = tmp_path_factory.mktemp("legacy_sequences")
    pairs = []
    for cell, option in LEGACY_SEQUENCE_CASES:
        x, background = same_mask_data() if option == "masking" else rz.data()
        source = rz.write_legacy_input(folder / f"{cell}_{option}_in.npz", rz.recurrent_net(cell), x, background,
                                       **SEQUENCE_OPTIONS[option])
        pairs.append((source, folder / f"{cell}_{option}_out.npz"))
    return dict(zip(LEGACY_SEQUENCE_CASES, rz.legacy_shap().run(pairs)))


@pytest.mark.parametrize("cell,option", LEGACY_SEQUENCE_CASES, ids=[f"{c}-{o}" for c, o in LEGACY_SEQUENCE_CASES])
def test_keras_go_backwards_and_masking_equal_shap_legacy(cell, option, legacy_sequence_results):
    """go_backwards (tf2onnx: ReverseSequence) and Masking(0) with the same padded steps in every row (so every
    pair has the same mask, where shap's legacy path is exact too) agree with shap's legacy DeepExplainer."""
    result = legacy_sequence_results[(cell, option)]
    x, background = same_mask_data() if option == "masking" else rz.data()
    model, twin = keras_twin_export(cell, np.concatenate([x, background]), **SEQUENCE_OPTIONS[option])
    assert rz.rel_err(result["predictions"], rz.keras_predict(twin, x)) <= TWIN_TOLERANCE
    assert ("ReverseSequence" if option == "go_backwards" else "Greater") in rz.op_types(model)
    change = rz.keras_predict(twin, x) - rz.keras_predict(twin, background).mean(axis=0)
    total = result["shap_values"].reshape(rz.N, -1, rz.K).sum(axis=1)
    assert np.abs(total - change).max() <= ADDITIVITY * max(1.0, np.abs(change).max())  # the reference is exact
    _, explanation = explain(model, background, x)
    assert_additive(explanation.values, model, x, background)
    err = rz.rel_err(explanation.values, result["shap_values"])
    assert err <= LEGACY_TOLERANCE, f"onnxshap vs shap legacy DeepExplainer: relative error {err:.3g}"


@pytest.mark.parametrize("cell", CELLS)
def test_keras_go_backwards_equals_forward_on_reversed_steps(cell):
    """A go_backwards layer on x is the forward layer on x reversed in time: the values are the forward torch
    export's on the reversed rows, reversed back (ReverseSequence lowered to a Slice with step −1)."""
    x, background = rz.data()
    model, _ = keras_twin_export(cell, np.concatenate([x, background]), go_backwards=True)
    _, backwards = explain(model, background, x)
    _, forwards = explain(rz.torch_export(cell), background[:, ::-1].copy(), x[:, ::-1].copy())
    err = rz.rel_err(backwards.values, forwards.values[:, ::-1])
    assert err <= KERAS_TWIN_TOLERANCE, f"go_backwards vs forward on reversed steps: relative error {err:.3g}"


@pytest.mark.parametrize("cell", CELLS)
def test_keras_masking_with_differing_masks_equals_hand_written_mask(cell):
    """Masks that differ between samples and references: still additive on every row, and equal to the same
    masked recurrence written out in PyTorch (``keep·x``, ``keep·s_new + (1 − keep)·s`` with ``keep`` a 0/1
    float), whose export needs no boolean handling: the mask's share of Δf goes to the features that made a
    step padding in one row of the pair and not in the other."""
    x, background = differing_mask_data()
    model, twin = keras_twin_export(cell, np.concatenate([x, background]), mask_value=0.0)
    hand = rz.hand_written(rz.recurrent_net(cell), masked=True)
    both = np.concatenate([x, background])
    assert rz.rel_err(rz.torch_forward(hand, both), rz.keras_predict(twin, both)) <= TWIN_TOLERANCE
    keep_x, keep_r = (np.abs(a).sum(axis=2) > 0 for a in (x, background))
    assert (keep_x[:, None] != keep_r[None]).any(axis=2).mean() > 0.5  # most pairs have different masks
    _, keras_explanation = explain(model, background, x)
    assert_additive(keras_explanation.values, model, x, background)
    hand_model = rz.torch_export(cell, hand=True, masked=True)
    _, hand_explanation = explain(hand_model, background, x)
    assert_additive(hand_explanation.values, hand_model, x, background)
    err = rz.rel_err(keras_explanation.values, hand_explanation.values)
    assert err <= KERAS_TWIN_TOLERANCE, f"Keras Masking vs hand-written mask: relative error {err:.3g}"


# --------------------------------------------------------------------------------------------------
# 4-5. the bundled models find what drives their targets
# --------------------------------------------------------------------------------------------------


def test_stacked_lstm_noise_variable_is_unimportant():
    data = np.load(rz.MODELS / "stacked_lstm_data.npy")
    model_path = rz.MODELS / "stacked_lstm.onnx"
    background, x = data[:20], data[20:60]
    explainer, explanation = explain(str(model_path), background, x)
    assert_additive(explanation.values, onnx.load(model_path), x, background)
    names = ["x1", "x2", "x3"]
    by_shap = variable_importance(explanation, names)
    by_perturbation = perturbation_sensitivity(explainer.predict, data, names=names)
    for method, importance in (("SHAP", by_shap), ("perturbation", by_perturbation)):
        for driver in ("x1", "x2"):
            ratio = importance["x3"] / importance[driver]
            assert ratio < 0.1, f"{method}: importance(x3) / importance({driver}) = {ratio:.3g} ≥ 0.1 ({importance})"


# from make_runoff_lstm.py: runoff_t depends on P at lags 0-2, T at lags 1-3 (snowmelt), E at lag 0 only;
# the other six variables are pure noise. Time index 11 of a window is lag 0.
RUNOFF_DRIVERS = {"precipitation": (0, 1, 2), "temperature": (1, 2, 3), "evapotranspiration": (0,)}
RUNOFF_DRIVING_LAGS = (0, 1, 2, 3)


def test_runoff_lstm_ranks_drivers_and_driving_lags_first():
    data = np.load(rz.MODELS / "runoff_data.npy")
    names = json.loads((rz.MODELS / "runoff_variables.json").read_text())
    model_path = rz.MODELS / "runoff_lstm.onnx"
    background, x = data[:50], data[50:70]
    _, explanation = explain(str(model_path), background, x)
    assert_additive(explanation.values, onnx.load(model_path), x, background)
    importance = variable_importance(explanation)
    drivers = [names.index(v) for v in RUNOFF_DRIVERS]
    noise = [i for i in range(len(names)) if i not in drivers]
    assert importance[drivers].min() > importance[noise].max(), dict(zip(names, importance.round(3)))
    window = data.shape[1]

    def split(lags):
        driving = [window - 1 - lag for lag in lags]
        return driving, [t for t in range(window) if t not in driving]

    steps = time_step_importance(explanation)
    driving, rest = split(RUNOFF_DRIVING_LAGS)
    assert steps[driving].min() > steps[rest].max(), steps.round(3)
    # and per driver: its own lags above its other lags (e.g. temperature at lag 0 carries no signal)
    per_step = np.abs(explanation.values).mean(axis=(0, 3))  # (T, F)
    for variable, lags in RUNOFF_DRIVERS.items():
        column = per_step[:, names.index(variable)]
        driving, rest = split(lags)
        assert column[driving].min() > column[rest].max(), (variable, column[::-1].round(3))


# --------------------------------------------------------------------------------------------------
# 6. unsupported recurrent variants: one clear UnsupportedModelError naming the node
# --------------------------------------------------------------------------------------------------


def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _recurrent_graph(kind: str, node_name: str, *, seq_lens=None, weight_from_data=None):
    """Batch-major X (batch, T, F) → Transpose → one LSTM/GRU → Y_h → Linear(1). Returns (model, background).

    ``seq_lens``: None, ``"input"`` (a per-sample int32 graph input, values differ) or ``"computed"``
    (Expand of the constant 3 < T over the batch). ``weight_from_data``: None or ``"W"``/``"R"``/``"B"``, that
    weight is a constant scaled by the data's mean (so it is not a constant).
    """
    gates = {"LSTM": 4, "GRU": 3}[kind]
    rng = np.random.default_rng(1)
    weights = {"W": rng.normal(0, 0.5, (1, gates * rz.H, rz.F)), "R": rng.normal(0, 0.5, (1, gates * rz.H, rz.H)),
               "B": rng.normal(0, 0.3, (1, 2 * gates * rz.H))}
    inits = [_const("Wd", rng.normal(0, 0.5, (rz.H, 1)).astype(np.float32)), _const("axis0", np.array([0]))]
    nodes = [helper.make_node("Transpose", ["X"], ["X_tm"], perm=[1, 0, 2], name="time_major")]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", rz.T, rz.F])]
    background = {"X": rz.data()[1]}
    for name, array in weights.items():
        if name == weight_from_data:
            inits.append(_const(name + "0", array.astype(np.float32)))
            nodes += [helper.make_node("ReduceMean", ["X"], ["x_mean"], keepdims=0, name="data_mean"),
                      helper.make_node("Mul", [name + "0", "x_mean"], [name], name="weight_from_data")]
        else:
            inits.append(_const(name, array.astype(np.float32)))
    node_inputs = ["X_tm", "W", "R", "B"]
    if seq_lens == "input":
        inputs.append(helper.make_tensor_value_info("seq_lens", TensorProto.INT32, ["batch"]))
        background["seq_lens"] = np.arange(len(background["X"]), dtype=np.int32) % rz.T + 1
        node_inputs.append("seq_lens")
    elif seq_lens == "computed":
        inits += [_const("three", np.array([3], np.int32)), _const("zero", np.array([0])), _const("one", np.array([1]))]
        nodes += [helper.make_node("Shape", ["X"], ["x_shape"], name="x_shape"),
                  helper.make_node("Slice", ["x_shape", "zero", "one"], ["batch_size"], name="batch_size"),
                  helper.make_node("Expand", ["three", "batch_size"], ["seq_lens"], name="seq_lens_3")]
        node_inputs.append("seq_lens")
    nodes += [helper.make_node(kind, node_inputs, ["", "Y_h"], name=node_name, hidden_size=rz.H,
                               **({"linear_before_reset": 1} if kind == "GRU" else {})),
              helper.make_node("Squeeze", ["Y_h", "axis0"], ["h_last"], name="squeeze"),
              helper.make_node("MatMul", ["h_last", "Wd"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "recurrent", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model, background


def _data_dependent_loop(node_name: str):
    """h ← tanh(h·Wh) repeated round(max(X)) + 1 times, from h = mean over time of X: a data-dependent trip count."""
    rng = np.random.default_rng(2)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "Wh"], ["h_pre"], name="body_matmul"),
         helper.make_node("Tanh", ["h_pre"], ["h_out"], name="body_tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("ReduceMean", ["X"], ["h0"], axes=[1], keepdims=0, name="h0"),
        helper.make_node("ReduceMax", ["X"], ["x_max"], keepdims=0, name="x_max"),
        helper.make_node("Abs", ["x_max"], ["x_abs"], name="x_abs"),
        helper.make_node("Cast", ["x_abs"], ["trips_raw"], to=TensorProto.INT64, name="trips_raw"),
        helper.make_node("Add", ["trips_raw", "one"], ["trips"], name="trips"),
        helper.make_node("Loop", ["trips", "true", "h0"], ["h_final"], name=node_name, body=body),
        helper.make_node("MatMul", ["h_final", "Wd"], ["y"], name="head"),
    ]
    inits = [_const("Wh", rng.normal(0, 0.5, (rz.F, rz.F)).astype(np.float32)),
             _const("Wd", rng.normal(0, 0.5, (rz.F, 1)).astype(np.float32)),
             _const("one", np.array(1)), _const("true", np.array(True))]
    graph = helper.make_graph(nodes, "loop", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                             ["batch", rz.T, rz.F])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model, {"X": rz.data()[1]}


UNSUPPORTED = {  # case -> (builder, node name, op type, words the reason must contain)
    "lstm-per-sample-sequence-lens": (lambda n: _recurrent_graph("LSTM", n, seq_lens="input"), "LSTM",
                                      "sequence"),
    "gru-per-sample-sequence-lens": (lambda n: _recurrent_graph("GRU", n, seq_lens="input"), "GRU", "sequence"),
    "lstm-sequence-lens-shorter-than-T": (lambda n: _recurrent_graph("LSTM", n, seq_lens="computed"), "LSTM",
                                          "sequence"),
    "lstm-recurrent-weights-from-data": (lambda n: _recurrent_graph("LSTM", n, weight_from_data="R"), "LSTM",
                                         "not a constant"),
    "gru-input-weights-from-data": (lambda n: _recurrent_graph("GRU", n, weight_from_data="W"), "GRU",
                                    "not a constant"),
    "gru-bias-from-data": (lambda n: _recurrent_graph("GRU", n, weight_from_data="B"), "GRU", "not a constant"),
    "loop-trip-count-from-data": (_data_dependent_loop, "Loop", "trip count"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_recurrent_variant_is_refused(case):
    build, op_type, reason = UNSUPPORTED[case]
    node_name = f"my_{op_type.lower()}_node"
    model, background = build(node_name)
    # the model itself runs on ONNX Runtime: the refusal is about explaining it, not a broken file
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, background)[0]).all()
    with pytest.raises(UnsupportedModelError) as info:
        explainer = onnxshap.DeepExplainer(model, background)
        explainer.shap_values(background)  # never reached: no values are ever answered
    message = str(info.value)
    first_line = message.splitlines()[0]
    assert node_name in first_line, message
    assert op_type in first_line, message
    assert reason in message, message


# --------------------------------------------------------------------------------------------------
# framework models passed to DeepExplainer directly
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_torch_module_passed_directly_equals_its_onnx_file(cell, tmp_path):
    from onnxshap.converters import export_torch

    net = rz.recurrent_net(cell, layers=2, head="last")
    x, background = rz.data()
    direct = onnxshap.DeepExplainer(net, torch.from_numpy(background)).shap_values(torch.from_numpy(x))
    path = tmp_path / f"{cell}.onnx"
    export_torch(net, background, path)
    from_file = onnxshap.DeepExplainer(str(path), background).shap_values(x)
    assert direct.shape == from_file.shape == (rz.N, rz.T, rz.F, rz.K)
    assert rz.rel_err(direct, from_file) <= 1e-6
    assert_additive(direct, onnx.load(path), x, background)


def test_keras_relu_lstm_passed_directly_equals_its_onnx_file(tmp_path):
    require_keras3()
    from onnxshap.converters import export_keras

    keras_model = rz.keras_model("lstm", activation="relu")
    x, background = rz.data()
    direct = onnxshap.DeepExplainer(keras_model, background).shap_values(x)
    path = tmp_path / "relu_lstm.onnx"
    export_keras(keras_model, background, path)
    model = onnx.load(path)
    (lstm,) = [n for n in model.graph.node if n.op_type == "LSTM"]
    activations = [a for a in lstm.attribute if a.name == "activations"]
    assert activations and b"Relu" in activations[0].strings, lstm
    from_file = onnxshap.DeepExplainer(str(path), background).shap_values(x)
    assert direct.shape == from_file.shape == (rz.N, rz.T, rz.F, rz.K)
    assert rz.rel_err(direct, from_file) <= 1e-6
    assert_additive(direct, model, x, background)


# --------------------------------------------------------------------------------------------------
# weights that are graph inputs with initializer defaults (keep_initializers_as_inputs, IR < 4 files)
# --------------------------------------------------------------------------------------------------


def test_lstm_with_initializers_listed_as_graph_inputs():
    net = rz.recurrent_net("lstm")
    x, background = rz.data()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.from_numpy(x[:2]),), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
                          keep_initializers_as_inputs=True)
    model = onnx.load_from_string(buffer.getvalue())
    assert len(model.graph.input) > 1
    values = onnxshap.DeepExplainer(model, background).shap_values(x)
    reference = onnxshap.DeepExplainer(rz.torch_export("lstm"), background).shap_values(x)
    assert rz.rel_err(values, reference) <= 1e-6
