"""The recurrent backward rolled into an ONNX Loop (``onnxshap/augment/rolled.py``) gives the multipliers of the
unrolled sweep, and keeps the augmented graph's size from growing with the sequence length."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import recurrent_zoo
from test_lower_recurrent import make_rnn_model

import onnxshap
from onnxshap import explainer as explainer_module
from onnxshap.augment.build import build_augmented

N, M = 3, 7

CASES = {  # ONNX recurrent nodes on batch-major data, every variant the lowering distinguishes
    "lstm": ("LSTM", {}),
    "lstm_bidirectional_peephole": ("LSTM", {"direction": "bidirectional", "peephole": True}),
    "lstm_reverse_clip_coupled": ("LSTM", {"direction": "reverse", "clip": 0.7, "input_forget": 1}),
    "lstm_last_states_only": ("LSTM", {"outputs": ["Y_h", "Y_c"]}),
    "lstm_outputs_read_downstream": ("LSTM", {"outputs": ["Y", "Y_c"], "downstream": True}),
    "gru_linear_before_reset": ("GRU", {"direction": "bidirectional", "lbr": 1}),
    "gru": ("GRU", {"lbr": 0}),
    "rnn_bidirectional": ("RNN", {"direction": "bidirectional"}),
    "rnn_relu": ("RNN", {"activations": ["Relu"]}),
}


def _onnx_case(name: str, seed: int, steps: int = 6) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    op, options = CASES[name]
    _, model, _ = make_rnn_model(op, layout=1, T=steps, seed=seed, **options)  # the node wrapped in Transposes
    rng = np.random.default_rng(seed + 11)
    data = rng.normal(0, 1, (N + M, steps, 3)).astype(np.float32)
    return model, data[:N], data[N:]


def _old_opset_case(opset: int, seed: int, steps: int = 6) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A bidirectional GRU at an opset before ``layout`` (and before Split/Squeeze took their sizes and axes as
    inputs), made batch-major by Transposes around it."""
    model, _, _ = make_rnn_model("GRU", direction="bidirectional", T=steps, seed=seed, opset=opset)
    graph = model.graph
    graph.input[0].name = "X_batch_major"
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    graph.input[0].type.tensor_type.shape.dim[1].dim_value = steps
    graph.node.insert(0, onnx.helper.make_node("Transpose", ["X_batch_major"], ["X"], perm=[1, 0, 2]))
    for output, perm in zip(list(graph.output), ([2, 0, 1, 3], [1, 0, 2])):
        graph.node.append(onnx.helper.make_node("Transpose", [output.name], [output.name + "_bm"], perm=perm))
        graph.output.remove(output)
        graph.output.append(onnx.helper.make_tensor_value_info(output.name + "_bm", onnx.TensorProto.FLOAT, None))
    rng = np.random.default_rng(seed + 11)
    data = rng.normal(0, 1, (N + M, steps, 3)).astype(np.float32)
    return model, data[:N], data[N:]


def _explainer(model, background, roll: bool, monkeypatch) -> onnxshap.DeepExplainer:
    monkeypatch.setattr(explainer_module, "build_augmented", functools.partial(build_augmented, roll=roll))
    return onnxshap.DeepExplainer(model, background, cache=False)


def _loops(explainer: onnxshap.DeepExplainer) -> int:
    return sum(node.op_type == "Loop" for node in explainer.augmented.model.graph)


def _assert_rolled_equals_unrolled(model, x, background, monkeypatch) -> onnxshap.DeepExplainer:
    """Values of the rolled graph equal the unrolled graph's (both additive: the check is on), to rounding."""
    unrolled = _explainer(model, background, False, monkeypatch)
    want = np.asarray(unrolled.shap_values(x))
    rolled = _explainer(model, background, True, monkeypatch)
    got = np.asarray(rolled.shap_values(x))
    assert _loops(unrolled) == 0 and _loops(rolled) >= 1
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    return rolled


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rolled_backward_equals_unrolled(case, seed, monkeypatch):
    model, x, background = _onnx_case(case, seed)
    rolled = _assert_rolled_equals_unrolled(model, x, background, monkeypatch)
    chains = 2 if CASES[case][1].get("direction") == "bidirectional" else 1
    assert _loops(rolled) == 2 * chains  # per direction, a forward and a backward loop


@pytest.mark.parametrize("opset", [10, 12])
def test_rolled_backward_equals_unrolled_at_old_opsets(opset, monkeypatch):
    model, x, background = _old_opset_case(opset, 0)
    rolled = _assert_rolled_equals_unrolled(model, x, background, monkeypatch)
    assert _loops(rolled) == 4


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rolled_backward_equals_unrolled_on_stacked_bidirectional_torch_export(cell, monkeypatch):
    net = recurrent_zoo.recurrent_net(cell, layers=2, bidirectional=True, head="flat", steps=8)
    x, background = recurrent_zoo.data(n=N, m=M, steps=8)
    rolled = _assert_rolled_equals_unrolled(net, x, background, monkeypatch)
    assert _loops(rolled) == 8  # two layers, two directions, a forward and a backward loop each


def test_runs_shorter_than_three_steps_stay_unrolled(monkeypatch):
    """Three steps: the first folds its zero state, two identical steps remain, too few to roll."""
    model, x, background = _onnx_case("lstm", 0, steps=3)
    explainer = _explainer(model, background, True, monkeypatch)
    explainer.shap_values(x)
    assert _loops(explainer) == 0


def _nodes(model, background, roll: bool, monkeypatch) -> int:
    return len(_explainer(model, background, roll, monkeypatch).augmented.model.graph)


@pytest.mark.parametrize("case", ["lstm", "gru_linear_before_reset"])
def test_graph_size_does_not_grow_with_the_sequence(case, monkeypatch):
    """Unrolled, every step adds its forward and its backward (~90 nodes); rolled, the steps after the first
    are one forward loop and one backward loop whatever their number (the values are stacked by one Concat and
    cut apart by one Split)."""
    sizes = {}
    for roll in (False, True):
        for steps in (8, 24):
            model, _, background = _onnx_case(case, 0, steps)
            sizes[roll, steps] = _nodes(model, background, roll, monkeypatch)
    assert sizes[True, 8] == sizes[True, 24], sizes
    assert sizes[False, 24] - sizes[False, 8] > 16 * 50, sizes  # the unrolled graph does grow


def test_saved_rolled_graph_runs_in_plain_onnx_runtime(tmp_path, monkeypatch):
    model, x, background = _onnx_case("lstm_bidirectional_peephole", 1)
    explainer = _explainer(model, background, True, monkeypatch)
    path = explainer.save_augmented(tmp_path / "lstm.deepshap.onnx")
    saved = onnx.load(str(path))
    onnx.checker.check_model(saved, full_check=True)
    assert any(node.op_type == "Loop" for node in saved.graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    k = explainer.n_outputs
    names = [o.name for o in session.get_outputs()]
    values = session.run([names[0]], {"X": x, "reference/X": background,
                                      "output_index": np.tile(np.arange(k), (N, 1))})[0]
    want = explainer.shap_values(x)
    want = np.stack(want, -1) if isinstance(want, list) else np.asarray(want)
    np.testing.assert_allclose(values, want.reshape(values.shape), rtol=1e-5, atol=1e-6 * np.abs(want).max())
