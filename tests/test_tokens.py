"""Token inputs (issue 9 item 4): integer ids explained at their embedding lookups, reported per token.

- A transformer trained on a planted rule (the label is 1 exactly when two specific tokens both occur) gives
  those two tokens the two largest attributions in ≥ 95 % of rows (issue 9, acceptance 3).
- Per-token values are the embedding values summed over the embedding axes and over every lookup of the
  input; they equal an explanation of the same lookups with ``layer=``; they add up to f(x) − E f(R); a token
  equal to its reference token gets exactly zero.
- Ids used on another value path (a mask from ``ids == pad``, a pooling index from the last non-pad token) and
  integer inputs without an embedding are refused, naming the node and what to do.
- Row-wise gathers whose indices depend on the data, or reach into other rows, are refused naming the node.
- The command line takes int64 ids from .npy and plots per-token values.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
import torch
from torch import nn

import onnxshap
from onnxshap.cli import EXIT_OK, main
from onnxshap.errors import InputDataError, UnsupportedModelError

FLOAT, INT64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
VOCAB, L, D, K = 10, 5, 4, 3
PAD = 0


# --------------------------------------------------------------------------------------------------
# hand-built token models
# --------------------------------------------------------------------------------------------------


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def _model(nodes: list, initializers: list, inputs: tuple[str, ...] = ("ids",)) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "tokens", [oh.make_tensor_value_info(name, INT64, ["N", L]) for name in inputs],
                          [oh.make_tensor_value_info("y", FLOAT, ["N", K])], initializer=initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _head(source: str) -> tuple[list, list]:
    """``y = mean_t tanh(source @ w1) @ w2``: a nonlinear head over (N, L, D) embeddings."""
    rng = np.random.default_rng(5)
    nodes = [oh.make_node("MatMul", [source, "w1"], ["h0"], name="dense1"),
             oh.make_node("Tanh", ["h0"], ["h"], name="tanh"),
             oh.make_node("ReduceMean", ["h"], ["pooled"], name="pool", axes=[1], keepdims=0),
             oh.make_node("MatMul", ["pooled", "w2"], ["y"], name="dense2")]
    weights = [_tensor("w1", rng.normal(size=(D, 6)).astype(np.float32)),
               _tensor("w2", rng.normal(size=(6, K)).astype(np.float32))]
    return nodes, weights


def one_lookup_model() -> onnx.ModelProto:
    """ids → Gather(table) → head."""
    table = np.random.default_rng(1).normal(size=(VOCAB, D)).astype(np.float32)
    head, weights = _head("embedded")
    return _model([oh.make_node("Gather", ["table", "ids"], ["embedded"], name="word_embedding"), *head],
                  [_tensor("table", table), *weights])


def two_lookup_model() -> onnx.ModelProto:
    """Two lookups of one input: ``Gather(t1, Cast(ids, int32))`` and ``Squeeze(Gather(t2, Reshape(ids,
    (-1, L, 1))))`` (ids reach each through casts and reshapes), added before the head."""
    rng = np.random.default_rng(2)
    head, weights = _head("embedded")
    nodes = [oh.make_node("Cast", ["ids"], ["ids32"], to=onnx.TensorProto.INT32, name="cast_ids"),
             oh.make_node("Gather", ["t1", "ids32"], ["e1"], name="lookup1"),
             oh.make_node("Reshape", ["ids", "column"], ["ids_column"], name="as_column"),
             oh.make_node("Gather", ["t2", "ids_column"], ["e2_column"], name="lookup2"),
             oh.make_node("Squeeze", ["e2_column", "axis2"], ["e2"], name="squeeze"),
             oh.make_node("Add", ["e1", "e2"], ["embedded"], name="sum_embeddings"), *head]
    return _model(nodes, [_tensor("t1", rng.normal(size=(VOCAB, D)).astype(np.float32)),
                          _tensor("t2", rng.normal(size=(VOCAB, D)).astype(np.float32)),
                          _tensor("column", np.array([-1, L, 1], np.int64)),
                          _tensor("axis2", np.array([2], np.int64)), *weights])


def _ids(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, size=(rows, L), dtype=np.int64)


def _run(model: onnx.ModelProto, ids: np.ndarray, **more: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"ids": ids, **more})[0].astype(np.float64)


# --------------------------------------------------------------------------------------------------
# acceptance 3: a planted rule
# --------------------------------------------------------------------------------------------------

PLANTED_VOCAB, PLANTED_L, PLANTED_D = 16, 8, 16
KEY_A, KEY_B = 1, 2  # the two tokens the label depends on; 0 is the pad token, 3.. are noise


def planted_rows(rng: np.random.Generator, has_a: np.ndarray, has_b: np.ndarray) -> np.ndarray:
    """Noise tokens, with KEY_A / KEY_B written at two distinct random positions where asked."""
    ids = rng.integers(3, PLANTED_VOCAB, size=(len(has_a), PLANTED_L), dtype=np.int64)
    for row in range(len(ids)):
        first, second = rng.choice(PLANTED_L, size=2, replace=False)
        if has_a[row]:
            ids[row, first] = KEY_A
        if has_b[row]:
            ids[row, second] = KEY_B
    return ids


class TokenClassifier(nn.Module):
    """Embedding + learned positions, one TransformerEncoderLayer (2 heads), mean pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(PLANTED_VOCAB, PLANTED_D)
        self.position = nn.Parameter(torch.randn(PLANTED_L, PLANTED_D) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(PLANTED_D, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(PLANTED_D, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids) + self.position).mean(1))


def train_planted(rng: np.random.Generator, rows: int = 2000, epochs: int = 5) -> nn.Module:
    """Train on rows where each key token occurs with probability ½; label 1 iff both occur."""
    torch.manual_seed(0)
    has_a, has_b = rng.random(rows) < 0.5, rng.random(rows) < 0.5
    ids = torch.from_numpy(planted_rows(rng, has_a, has_b))
    labels = torch.from_numpy((has_a & has_b).astype(np.int64))
    net = TokenClassifier()
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(rows).split(64):
            loss = nn.functional.cross_entropy(net(ids[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def test_planted_rule_tokens_get_the_largest_attributions():
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransformerEncoderLayer's nested-tensor note
        net = train_planted(rng)
    test_a, test_b = rng.random(400) < 0.5, rng.random(400) < 0.5
    held_out = planted_rows(rng, test_a, test_b)
    with torch.no_grad():
        predicted = net(torch.from_numpy(held_out)).argmax(1).numpy()
    accuracy = (predicted == (test_a & test_b)).mean()
    assert accuracy >= 0.98, f"the model did not learn the planted rule (held-out accuracy {accuracy:.3f})"
    assert time.perf_counter() - started < 60, "training took over a minute"

    rows = 200
    x = planted_rows(rng, np.ones(rows, bool), np.ones(rows, bool))  # both key tokens: label 1
    for background in (planted_rows(rng, np.zeros(20, bool), np.zeros(20, bool)),  # noise-only sequences
                       np.full((1, PLANTED_L), PAD, np.int64)):  # a pad baseline
        explanation = onnxshap.DeepExplainer(net, torch.from_numpy(background)).explain(x)
        assert explanation.values.shape == (rows, PLANTED_L, 2)
        phi = explanation.values[..., 1]  # the "both tokens" logit
        top_two = np.sort(np.argsort(-np.abs(phi), axis=1)[:, :2], axis=1)
        keys = np.sort(np.stack([np.argmax(x == KEY_A, axis=1), np.argmax(x == KEY_B, axis=1)], axis=1), axis=1)
        hits = (top_two == keys).all(axis=1).mean()
        assert hits >= 0.95, (f"the two planted tokens got the two largest attributions in only {hits:.1%} of "
                              f"rows (background of {len(background)} row(s))")


# --------------------------------------------------------------------------------------------------
# per-token values
# --------------------------------------------------------------------------------------------------


def test_per_token_values_sum_the_embedding_values():
    model = one_lookup_model()
    x, background = _ids(4, 1), _ids(6, 2)
    explainer = onnxshap.DeepExplainer(model, background)
    explanation = explainer.explain(x)
    assert explanation.values.shape == (4, L, K)
    assert explanation.input_name == "ids"
    np.testing.assert_array_equal(explanation.data, x)
    (embedding,) = explanation.extra["embedding_values"]
    assert embedding == "embedded"
    per_dim = explanation.extra["embedding_values"][embedding]
    assert per_dim.shape == (4, L, D, K)
    np.testing.assert_allclose(explanation.values, per_dim.sum(axis=2), rtol=1e-5, atol=1e-6)
    change = _run(model, x) - _run(model, background).mean(axis=0)
    np.testing.assert_allclose(explanation.values.sum(axis=1), change, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(explainer.shap_values(x), explanation.values, rtol=1e-6)
    at_layer = onnxshap.DeepExplainer(model, background, layer="embedded").explain(x)
    np.testing.assert_allclose(at_layer.values, per_dim, rtol=1e-5, atol=1e-6)


def test_lookups_of_one_input_add_up():
    model = two_lookup_model()
    x, background = _ids(3, 3), _ids(5, 4)
    explanation = onnxshap.DeepExplainer(model, background).explain(x)
    assert sorted(explanation.extra["embedding_values"]) == ["e1", "e2_column"]
    e1, e2 = (onnxshap.DeepExplainer(model, background, layer=["e1", "e2_column"]).explain(x))
    assert e2.values.shape == (3, L, 1, D, K)
    expected = e1.values.sum(axis=2) + e2.values.sum(axis=3).reshape(3, L, K)
    np.testing.assert_allclose(explanation.values, expected, rtol=1e-5, atol=1e-6)
    change = _run(model, x) - _run(model, background).mean(axis=0)
    np.testing.assert_allclose(explanation.values.sum(axis=1), change, rtol=1e-4, atol=1e-5)


def test_pad_baseline_credits_only_the_tokens_that_differ():
    """Against one row of pad tokens, a row that differs from it in one position gives all of
    f(x) − f(pad) to that position and exactly zero to every other one (φ = M ⊙ Δ, Δ = 0 there)."""
    model = one_lookup_model()
    pad = np.full((1, L), PAD, np.int64)
    x = np.repeat(pad, L, axis=0)
    x[np.arange(L), np.arange(L)] = np.arange(1, L + 1)  # row t differs from the pad row at position t only
    values = onnxshap.DeepExplainer(model, pad).shap_values(x)
    off_diagonal = values[~np.eye(L, dtype=bool)]
    assert np.all(off_diagonal == 0.0)
    change = _run(model, x) - _run(model, pad)
    np.testing.assert_allclose(values[np.arange(L), np.arange(L)], change, rtol=1e-4, atol=1e-6)
    assert np.abs(change).max() > 1e-3  # the test is not vacuous


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------


def test_ids_used_beside_the_embedding_are_refused_naming_the_node():
    """A padding mask computed from ``ids == pad`` multiplies the embeddings: not attributable."""
    table = np.random.default_rng(1).normal(size=(VOCAB, D)).astype(np.float32)
    head, weights = _head("masked")
    nodes = [oh.make_node("Gather", ["table", "ids"], ["embedded"], name="word_embedding"),
             oh.make_node("Equal", ["ids", "pad"], ["is_pad"], name="find_pad"),
             oh.make_node("Not", ["is_pad"], ["keep"], name="keep"),
             oh.make_node("Cast", ["keep"], ["keep_float"], to=FLOAT, name="keep_float"),
             oh.make_node("Unsqueeze", ["keep_float", "last"], ["mask"], name="mask"),
             oh.make_node("Mul", ["embedded", "mask"], ["masked"], name="apply_mask"), *head]
    model = _model(nodes, [_tensor("table", table), _tensor("pad", np.array(PAD, np.int64)),
                           _tensor("last", np.array([2], np.int64)), *weights])
    with pytest.raises(UnsupportedModelError) as error:
        onnxshap.DeepExplainer(model, _ids(4, 2))
    message = str(error.value)
    assert "'apply_mask'" in message and "'ids'" in message and "attention mask" in message


def test_integer_input_without_embedding_is_refused():
    nodes = [oh.make_node("Cast", ["ids"], ["counts"], to=FLOAT, name="as_float"),
             oh.make_node("MatMul", ["counts", "w"], ["y"], name="dense")]
    model = _model(nodes, [_tensor("w", np.ones((L, K), np.float32))])
    with pytest.raises(InputDataError, match="nothing to explain: the integer input.s. 'ids' index no embedding"):
        onnxshap.DeepExplainer(model, _ids(4, 2))


def masked_model() -> onnx.ModelProto:
    """Inputs ids and an int64 attention mask: ``embeddings ⊙ mask`` (a padding mask) before the head."""
    table = np.random.default_rng(1).normal(size=(VOCAB, D)).astype(np.float32)
    head, weights = _head("masked")
    nodes = [oh.make_node("Gather", ["table", "ids"], ["embedded"], name="word_embedding"),
             oh.make_node("Cast", ["attention_mask"], ["mask_float"], to=FLOAT, name="mask_float"),
             oh.make_node("Unsqueeze", ["mask_float", "last"], ["mask"], name="mask"),
             oh.make_node("Mul", ["embedded", "mask"], ["masked"], name="apply_mask"), *head]
    return _model(nodes, [_tensor("table", table), _tensor("last", np.array([2], np.int64)), *weights],
                  inputs=("ids", "attention_mask"))


def test_attention_mask_input_is_fixed_context():
    """An integer input that indexes no embedding is fed, not explained; with one mask for every row the
    explanation is exact (masked tokens get exactly zero), and a row with another mask is refused."""
    model = masked_model()
    mask = np.array([[1, 1, 1, 0, 0]], np.int64)
    x, background = _ids(4, 1), _ids(6, 2)
    explainer = onnxshap.DeepExplainer(model, {"ids": background, "attention_mask": mask.repeat(6, 0)})
    explanation = explainer.explain({"ids": x, "attention_mask": mask.repeat(4, 0)})
    assert explanation.input_name == "ids" and explanation.values.shape == (4, L, K)
    assert np.all(explanation.values[:, 3:] == 0.0)
    change = _run(model, x, attention_mask=mask.repeat(4, 0)) - _run(
        model, background, attention_mask=mask.repeat(6, 0)).mean(axis=0)
    np.testing.assert_allclose(explanation.values.sum(axis=1), change, rtol=1e-4, atol=1e-5)
    other = mask.repeat(4, 0)
    other[2, 2] = 0
    with pytest.raises(InputDataError, match="'attention_mask': row 2 differs from background row 0"):
        explainer.explain({"ids": x, "attention_mask": other})


def _pooled_at(index_nodes: list, index: str) -> onnx.ModelProto:
    """Embeddings → tanh → flattened to (N·L, D) → Gather(index) → (N, D) → dense: the GPT-2 pooling pattern."""
    table = np.random.default_rng(1).normal(size=(VOCAB, D)).astype(np.float32)
    nodes = [oh.make_node("Gather", ["table", "ids"], ["embedded"], name="word_embedding"),
             oh.make_node("Tanh", ["embedded"], ["hidden"], name="tanh"),
             oh.make_node("Flatten", ["hidden"], ["rows"], axis=2, name="flatten"),
             oh.make_node("Shape", ["ids"], ["shape"], start=0, end=1, name="shape"),
             oh.make_node("Squeeze", ["shape", "zero_axis"], ["batch"], name="batch"),
             oh.make_node("Range", ["zero", "batch", "one"], ["arange"], name="arange"),
             oh.make_node("Mul", ["arange", "length"], ["starts"], name="starts"),
             *index_nodes,
             oh.make_node("Gather", ["rows", index], ["pooled"], axis=0, name="pool_rows"),
             oh.make_node("MatMul", ["pooled", "w"], ["y"], name="dense")]
    constants = [_tensor("table", table), _tensor("zero_axis", np.array([0], np.int64)),
                 _tensor("zero", np.array(0, np.int64)), _tensor("one", np.array(1, np.int64)),
                 _tensor("length", np.array(L, np.int64)), _tensor("last", np.array(L - 1, np.int64)),
                 _tensor("positions", np.arange(L, dtype=np.int64)), _tensor("pad", np.array(PAD, np.int64)),
                 _tensor("w", np.random.default_rng(3).normal(size=(D, K)).astype(np.float32))]
    return _model(nodes, constants)


def test_last_token_pooling_by_arange_is_explained():
    model = _pooled_at([oh.make_node("Add", ["starts", "last"], ["index"], name="last_index")], "index")
    x, background = _ids(4, 1), _ids(6, 2)
    values = onnxshap.DeepExplainer(model, background).shap_values(x)
    change = _run(model, x) - _run(model, background).mean(axis=0)
    np.testing.assert_allclose(values.sum(axis=1), change, rtol=1e-4, atol=1e-5)
    assert np.all(values[:, : L - 1] == 0.0)  # only the last token reaches the output


def test_pooling_index_from_the_ids_is_guarded_row_by_row():
    """GPT-2's classifier pools at the last non-pad position, argmax(positions · (ids != pad)). Rows that all
    pool at the same position are explained exactly; a data or background row that pools elsewhere is refused
    by row, naming the node."""
    index_nodes = [oh.make_node("Equal", ["ids", "pad"], ["is_pad"], name="find_pad"),
                   oh.make_node("Not", ["is_pad"], ["not_pad"], name="not_pad"),
                   oh.make_node("Cast", ["not_pad"], ["not_pad_int"], to=INT64, name="not_pad_int"),
                   oh.make_node("Mul", ["not_pad_int", "positions"], ["weighted"], name="weighted"),
                   oh.make_node("ArgMax", ["weighted"], ["last_real"], axis=1, keepdims=0, name="last_real"),
                   oh.make_node("Add", ["starts", "last_real"], ["index"], name="index")]
    model = _pooled_at(index_nodes, "index")
    x, background = _ids(4, 1), _ids(6, 2)
    explainer = onnxshap.DeepExplainer(model, background)
    values = explainer.shap_values(x)
    change = _run(model, x) - _run(model, background).mean(axis=0)
    np.testing.assert_allclose(values.sum(axis=1), change, rtol=1e-4, atol=1e-5)
    assert np.all(values[:, : L - 1] == 0.0)  # every row pools at its last token
    padded = x.copy()
    padded[2, L - 2:] = PAD  # row 2 pools two positions earlier
    with pytest.raises(onnxshap.InputDataError, match="data row 2: node 'pool_rows'"):
        explainer.shap_values(padded)
    with pytest.raises(onnxshap.InputDataError, match="background row 4: node 'pool_rows'"):
        onnxshap.DeepExplainer(model, np.concatenate([background[:4], padded[2:3]]))
    # a padded row among the rows the lowering probes (the first three): no uniform position to lower for
    with pytest.raises(UnsupportedModelError, match="'pool_rows'.*pooling index from the last non-pad token"):
        onnxshap.DeepExplainer(model, np.concatenate([background[:2], padded[2:3]]))


def test_row_gather_reaching_into_other_rows_is_refused_naming_the_node():
    """Indices ``((b + 1) mod B)·L + L − 1`` follow the batch but take the next row's last token."""
    index_nodes = [oh.make_node("Add", ["arange", "one"], ["next"], name="next"),
                   oh.make_node("Mod", ["next", "batch"], ["next_row"], name="next_row"),
                   oh.make_node("Mul", ["next_row", "length"], ["next_start"], name="next_start"),
                   oh.make_node("Add", ["next_start", "last"], ["index"], name="index")]
    model = _pooled_at(index_nodes, "index")
    with pytest.raises(UnsupportedModelError) as error:
        onnxshap.DeepExplainer(model, _ids(4, 2))
    message = str(error.value)
    assert "'pool_rows'" in message and "rows" in message


# --------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------


def test_cli_explains_int64_ids_and_plots_per_token_values(tmp_path, capsys):
    model_path, ids_path, background_path = tmp_path / "tokens.onnx", tmp_path / "ids.npy", tmp_path / "pad.npy"
    vocab, out, png = tmp_path / "vocab.txt", tmp_path / "values.npz", tmp_path / "tokens.png"
    onnx.save(one_lookup_model(), str(model_path))
    x = _ids(4, 1)
    np.save(ids_path, x)
    np.save(background_path, np.full((1, L), PAD, np.int64))
    vocab.write_text("\n".join(["<pad>", *[f"word{i}" for i in range(1, VOCAB)]]) + "\n")
    code = main([str(model_path), str(ids_path), "-b", str(background_path), "-o", str(out), "--plot", str(png),
                 "--vocab", str(vocab)])
    assert code == EXIT_OK, capsys.readouterr().err
    with np.load(out) as result:
        values = result["shap_values"]
        assert values.shape == (4, L, K)
        change = _run(one_lookup_model(), x) - _run(one_lookup_model(), np.full((1, L), PAD, np.int64))
        np.testing.assert_allclose(values.sum(axis=1), change, rtol=1e-4, atol=1e-5)
    assert png.stat().st_size > 1000
    assert "ids: values (4, 5, 3)" in capsys.readouterr().out


def test_token_heatmap_labels_cells_with_the_vocabulary():
    values = np.array([[0.5, -1.0, 0.0], [0.1, 0.2, -0.3]])
    figure = onnxshap.text.token_heatmap(values, np.array([[0, 1, 2], [2, 1, 0]]), vocabulary=["a", "b", "c"])
    texts = sorted(t.get_text() for t in figure.axes[0].texts)
    assert texts == ["a", "a", "b", "b", "c", "c"]
    with pytest.raises(InputDataError, match="one shape"):
        onnxshap.text.token_heatmap(values, np.zeros((2, 4), np.int64))
