"""The public API around the engine: inputs, outputs, layers, batch handling, chunking, errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

import onnxshap
from onnxshap.runtime import to_proto

FLOAT = onnx.TensorProto.FLOAT


def _mlp_proto(batch="N", features=6, hidden=5, outputs=3, seed=0, two_outputs=False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = oh.make_tensor("w1", FLOAT, [features, hidden], rng.normal(size=(features, hidden)).ravel())
    b1 = oh.make_tensor("b1", FLOAT, [hidden], rng.normal(size=hidden))
    w2 = oh.make_tensor("w2", FLOAT, [hidden, outputs], rng.normal(size=(hidden, outputs)).ravel())
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h0"], name="dense1"),
        oh.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
        oh.make_node("Relu", ["h1"], ["h"], name="relu1"),
        oh.make_node("MatMul", ["h", "w2"], ["y"], name="dense2"),
    ]
    outs = [oh.make_tensor_value_info("y", FLOAT, [batch, outputs])]
    if two_outputs:
        nodes.append(oh.make_node("Sigmoid", ["y"], ["p"], name="sigmoid"))
        outs.append(oh.make_tensor_value_info("p", FLOAT, [batch, outputs]))
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", FLOAT, [batch, features])], outs,
                          initializer=[w1, b1, w2])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(8, 6)).astype(np.float32)


def test_shapes_and_expected_value_follow_shap(data):
    x, background = data
    ex = onnxshap.DeepExplainer(_mlp_proto(), background)
    values = ex.shap_values(x)
    assert values.shape == (5, 6, 3)
    expected = _run(_mlp_proto(), {"x": background})[0].mean(axis=0)
    np.testing.assert_allclose(ex.expected_value, expected, rtol=1e-5, atol=1e-6)
    change = _run(_mlp_proto(), {"x": x})[0] - expected
    np.testing.assert_allclose(values.sum(axis=1), change, rtol=1e-4, atol=1e-5)


def test_single_output_drops_the_output_axis(data):
    x, background = data
    ex = onnxshap.DeepExplainer(_mlp_proto(outputs=1), background)
    assert isinstance(ex.expected_value, float)
    assert ex.shap_values(x).shape == (5, 6)


def test_ranked_outputs_explain_each_rows_top_outputs(data):
    x, background = data
    ex = onnxshap.DeepExplainer(_mlp_proto(), background)
    full = ex.shap_values(x)
    values, indices = ex.shap_values(x, ranked_outputs=2, output_rank_order="max_abs")
    predictions = _run(_mlp_proto(), {"x": x})[0]
    assert indices.shape == (5, 2) and values.shape == (5, 6, 2)
    np.testing.assert_array_equal(indices, np.argsort(-np.abs(predictions), axis=1)[:, :2])
    np.testing.assert_allclose(values, np.take_along_axis(full, indices[:, None, :], axis=2), rtol=1e-5, atol=1e-6)


def test_two_graph_outputs_are_concatenated_and_selectable(data):
    x, background = data
    model = _mlp_proto(two_outputs=True)
    ex = onnxshap.DeepExplainer(model, background)
    assert ex.shap_values(x).shape == (5, 6, 6)
    assert ex.output_labels[:2] == ["y[0]", "y[1]"]
    only = onnxshap.DeepExplainer(model, background, outputs=["p"])
    np.testing.assert_allclose(only.shap_values(x), ex.shap_values(x)[..., 3:], rtol=1e-5, atol=1e-6)


def test_intermediate_layer_is_explained_like_an_input(data):
    x, background = data
    ex = onnxshap.DeepExplainer(_mlp_proto(), background, layer="h")
    exp = ex.explain(x)
    assert exp.values.shape == (5, 5, 3)
    hidden = np.maximum(x @ onnx.numpy_helper.to_array(_mlp_proto().graph.initializer[0])
                        + onnx.numpy_helper.to_array(_mlp_proto().graph.initializer[1]), 0)
    np.testing.assert_allclose(exp.data, hidden, rtol=1e-5, atol=1e-5)
    # the layer is followed by a linear map: values are exact (h − mean h_r) · w2
    w2 = onnx.numpy_helper.to_array(_mlp_proto().graph.initializer[2])
    hidden_bg = np.maximum(background @ onnx.numpy_helper.to_array(_mlp_proto().graph.initializer[0])
                           + onnx.numpy_helper.to_array(_mlp_proto().graph.initializer[1]), 0)
    exact = (hidden - hidden_bg.mean(axis=0))[:, :, None] * w2[None]
    np.testing.assert_allclose(exp.values, exact, rtol=1e-4, atol=1e-5)


def test_batch_fixed_at_one_is_relaxed(data):
    x, background = data
    fixed = _mlp_proto(batch=1)
    flat = oh.make_tensor("flat", onnx.TensorProto.INT64, [2], [1, -1])
    fixed.graph.initializer.append(flat)
    fixed.graph.node.append(oh.make_node("Reshape", ["y", "flat"], ["y2"], name="reshape_fixed"))
    fixed.graph.output[0].CopyFrom(oh.make_tensor_value_info("y2", FLOAT, [1, 3]))
    ex = onnxshap.DeepExplainer(fixed, background)
    np.testing.assert_allclose(ex.shap_values(x), onnxshap.DeepExplainer(_mlp_proto(), background).shap_values(x),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 7])
def test_chunk_size_does_not_change_values(data, batch_size):
    """Chunks are independent: only float32 rounding (BLAS blocking depends on the row count) may differ."""
    x, background = data
    reference = onnxshap.DeepExplainer(_mlp_proto(), background).shap_values(x)
    chunked = onnxshap.DeepExplainer(_mlp_proto(), background, batch_size=batch_size).shap_values(x)
    np.testing.assert_allclose(chunked, reference, rtol=1e-6, atol=1e-7)


def test_memory_budget_splits_into_chunks(data):
    """A budget that fits one (sample, reference, output) triple splits all three ways; values do not move."""
    x, background = data
    whole = onnxshap.DeepExplainer(_mlp_proto(), background)
    tiny = onnxshap.DeepExplainer(_mlp_proto(), background, max_memory=whole.augmented.memory(1, 1, 1))
    np.testing.assert_allclose(tiny.shap_values(x), whole.shap_values(x), rtol=1e-6, atol=1e-7)


def test_a_budget_below_one_pair_is_a_clear_error(data):
    x, background = data
    ex = onnxshap.DeepExplainer(_mlp_proto(), background, max_memory=1)
    with pytest.raises(onnxshap.OnnxShapError, match="memory budget"):
        ex.shap_values(x)


def test_saved_augmented_model_checks_and_runs_anywhere(tmp_path, data):
    x, background = data
    ex = onnxshap.DeepExplainer(_mlp_proto(), background)
    path = ex.save_augmented(tmp_path / "mlp.deepshap.onnx")
    saved = onnx.load(str(path))
    onnx.checker.check_model(saved, full_check=True)
    values, prediction = _run(saved, {"x": x, "reference/x": background,
                                      "output_index": np.tile(np.arange(3), (5, 1))})
    np.testing.assert_allclose(values, ex.shap_values(x), rtol=1e-6, atol=1e-7)
    assert prediction.shape == (5, 3)


def test_multi_input_model_accepts_list_and_dict():
    rng = np.random.default_rng(3)
    w = oh.make_tensor("w", FLOAT, [4, 2], rng.normal(size=8))
    nodes = [oh.make_node("Mul", ["a", "b"], ["ab"], name="product"),
             oh.make_node("MatMul", ["ab", "w"], ["y"], name="dense")]
    graph = oh.make_graph(nodes, "two", [oh.make_tensor_value_info("a", FLOAT, ["N", 4]),
                                        oh.make_tensor_value_info("b", FLOAT, ["N", 4])],
                          [oh.make_tensor_value_info("y", FLOAT, ["N", 2])], initializer=[w])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    a, b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    bg_a, bg_b = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    ex = onnxshap.DeepExplainer(model, [bg_a, bg_b])
    as_list = ex.shap_values([a, b])
    as_dict = onnxshap.DeepExplainer(model, {"a": bg_a, "b": bg_b}).shap_values({"a": a, "b": b})
    assert isinstance(as_list, list) and len(as_list) == 2
    np.testing.assert_allclose(as_list[0], as_dict[0], rtol=1e-6)
    total = as_list[0].sum(axis=1) + as_list[1].sum(axis=1)
    change = _run(model, {"a": a, "b": b})[0] - _run(model, {"a": bg_a, "b": bg_b})[0].mean(axis=0)
    np.testing.assert_allclose(total, change, rtol=1e-4, atol=1e-5)


def test_unsupported_op_error_names_every_node(data):
    x, background = data
    model = _mlp_proto()
    model.graph.node[2].op_type = "Hardmax"
    model.graph.node[2].name = "first_odd"
    model.graph.node.append(oh.make_node("TopK", ["y", "k"], ["top", "top_index"], name="second_odd", axis=1))
    model.graph.initializer.append(oh.make_tensor("k", onnx.TensorProto.INT64, [1], [2]))
    model.graph.output.append(oh.make_tensor_value_info("top", FLOAT, ["N", 2]))
    model.graph.node.append(oh.make_node("Custom", ["top"], ["custom"], name="third_odd", domain="my.domain"))
    model.opset_import.append(oh.make_opsetid("my.domain", 1))
    model.graph.output.append(oh.make_tensor_value_info("custom", FLOAT, ["N", 2]))
    with pytest.raises(onnxshap.UnsupportedModelError) as info:
        onnxshap.DeepExplainer(model, background).shap_values(x)
    message = str(info.value)
    assert message.splitlines()[0].startswith("unsupported model: 3 node(s)")
    for fragment in ("first_odd", "Hardmax", "second_odd", "TopK", "third_odd", "my.domain"):
        assert fragment in message


@pytest.mark.parametrize("bad, fragment", [
    (np.zeros((4, 7), np.float32), "axis 1 should be 6"),
    (np.zeros((4, 6, 1), np.float32), "rank 2"),
    (np.array([["a"] * 6] * 4), "dtype"),
    (np.full((4, 6), np.nan, np.float32), "NaN"),
])
def test_bad_data_is_refused_with_one_clear_line(data, bad, fragment):
    _, background = data
    ex = onnxshap.DeepExplainer(_mlp_proto(), background)
    with pytest.raises(onnxshap.InputDataError) as info:
        ex.shap_values(bad)
    assert fragment in str(info.value).splitlines()[0]


def test_background_with_other_feature_count_is_refused():
    with pytest.raises(onnxshap.InputDataError, match="axis 1 should be 6"):
        onnxshap.DeepExplainer(_mlp_proto(), np.zeros((4, 5), np.float32))


def test_lowered_model_serialises_with_runtime_ir_version(data):
    _, background = data
    ex = onnxshap.DeepExplainer(_mlp_proto(), background)
    proto = to_proto(ex.lowered.model)
    ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_lowering_that_changes_the_model_is_refused(monkeypatch, data):
    """Guard against engine bugs: the lowered model must reproduce the original before anything is explained."""
    _, background = data
    import onnx_ir as ir

    import onnxshap.lower as lower_module

    class DoubleTheLastWeight(ir.passes.InPlacePass):  # a lowering pass with a bug
        def call(self, model):
            weight = model.graph.initializers["w2"]
            weight.const_value = ir.tensor(weight.const_value.numpy() * 2)
            return ir.passes.PassResult(model, modified=True)

    monkeypatch.setattr(lower_module, "UnrollRecurrent", DoubleTheLastWeight)
    with pytest.raises(onnxshap.UnsupportedModelError, match="does not reproduce the original"):
        onnxshap.DeepExplainer(_mlp_proto(), background)


def test_float64_model_is_refused_clearly():
    rng = np.random.default_rng(0)
    double = onnx.TensorProto.DOUBLE
    w = oh.make_tensor("w", double, [3, 2], rng.normal(size=6))
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", double, ["N", 3])],
                          [oh.make_tensor_value_info("y", double, ["N", 2])], initializer=[w])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    with pytest.raises(onnxshap.UnsupportedModelError, match="float64: onnxshap explains float32 models"):
        onnxshap.DeepExplainer(model, rng.normal(size=(4, 3)))


def test_external_data_inside_the_folder_loads_and_outside_is_refused(tmp_path, data):
    x, background = data
    model = _mlp_proto()
    raw = [onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name) for t in model.graph.initializer]
    del model.graph.initializer[:]
    model.graph.initializer.extend(raw)  # external data holds raw_data tensors
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(model, str(folder / "mlp.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert (folder / "weights.bin").exists(), sorted(p.name for p in tmp_path.rglob("*"))
    values = onnxshap.DeepExplainer(folder / "mlp.onnx", background).shap_values(x)
    np.testing.assert_allclose(values, onnxshap.DeepExplainer(_mlp_proto(), background).shap_values(x), rtol=1e-6)
    escaped = onnx.load(str(folder / "mlp.onnx"), load_external_data=False)
    for tensor in escaped.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    (tmp_path / "weights.bin").write_bytes((folder / "weights.bin").read_bytes())
    onnx.save(escaped, str(folder / "escaped.onnx"))
    with pytest.raises(onnxshap.ModelLoadError, match="outside the model's folder"):
        onnxshap.DeepExplainer(folder / "escaped.onnx", background)


def test_data_must_have_the_backgrounds_shape():
    """Sequence models are unrolled for the background's length: other lengths are refused clearly."""
    rng = np.random.default_rng(0)
    axes = oh.make_tensor("axes", onnx.TensorProto.INT64, [1], [1])
    graph = oh.make_graph([oh.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)], "g",
                          [oh.make_tensor_value_info("x", FLOAT, ["N", "T"])],
                          [oh.make_tensor_value_info("y", FLOAT, ["N", 1])], initializer=[axes])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    model.ir_version = 9
    ex = onnxshap.DeepExplainer(model, rng.normal(size=(4, 5)).astype(np.float32))
    with pytest.raises(onnxshap.InputDataError, match="background"):
        ex.shap_values(rng.normal(size=(2, 6)).astype(np.float32))


def test_layer_can_name_any_tensor_of_the_users_graph_even_lowered_ones():
    """Gemm, LayerNormalization and BatchNormalization are rewritten into primitives; their outputs keep the
    user's names, so ``layer=`` and ``outputs=`` still find them (values add up to the output's change)."""
    rng = np.random.default_rng(5)
    weights = [oh.make_tensor("w", FLOAT, [4, 6], rng.normal(size=24)),
               oh.make_tensor("b", FLOAT, [6], rng.normal(size=6)),
               oh.make_tensor("g", FLOAT, [6], rng.uniform(0.5, 2, size=6)),
               oh.make_tensor("beta", FLOAT, [6], rng.normal(size=6)),
               oh.make_tensor("v", FLOAT, [6, 2], rng.normal(size=12))]
    nodes = [oh.make_node("Gemm", ["x", "w", "b"], ["dense_out"]),
             oh.make_node("LayerNormalization", ["dense_out", "g", "beta"], ["ln_out"], axis=-1),
             oh.make_node("Tanh", ["ln_out"], ["act"]), oh.make_node("MatMul", ["act", "v"], ["y"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", FLOAT, ["N", 4])],
                          [oh.make_tensor_value_info("y", FLOAT, ["N", 2]),
                           oh.make_tensor_value_info("ln_out", FLOAT, ["N", 6])],
                          initializer=weights)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    x, background = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(7, 4)).astype(np.float32)
    for layer in ("dense_out", "ln_out"):
        ex = onnxshap.DeepExplainer(model, background, layer=layer, outputs="y")
        explanation = ex.explain(x)
        assert explanation.values.shape == (5, 6, 2)
        assert explanation.additivity_error.max() <= 1e-4
    ln = onnxshap.DeepExplainer(model, background, outputs="ln_out").explain(x)
    assert ln.values.shape == (5, 4, 6)
