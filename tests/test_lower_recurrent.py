"""Tests for onnxshap.lower.recurrent: LSTM/GRU/RNN unrolled into primitive ops equal ONNX Runtime's output."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxshap.errors import UnsupportedModelError
from onnxshap.lower.recurrent import UnrollRecurrent


def _unroll_recurrent(model: ir.Model) -> bool:
    return UnrollRecurrent()(model).modified

ALLOWED = {
    "MatMul", "Add", "Sub", "Mul", "Div", "Neg", "Sigmoid", "Tanh", "Relu", "LeakyRelu", "HardSigmoid", "Elu",
    "Softsign", "Softplus", "ThresholdedRelu", "Clip", "Split", "Concat", "Squeeze", "Unsqueeze", "Transpose",
    "Reshape", "Slice", "Gather", "Identity", "Where",
}
RECURRENT = {"LSTM", "GRU", "RNN", "Loop", "Scan"}
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


# ---------------------------------------------------------------------------------------------------------
# helpers


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def lower(model: onnx.ModelProto, passes=(_unroll_recurrent,), extra_allowed=()) -> onnx.ModelProto:
    """Run the passes on an ir copy; check the result is valid and uses only allowed ops."""
    m = ir.from_proto(model)
    changed = [p(m) for p in passes]
    assert any(changed)
    out = ir.to_proto(m)
    out.ir_version = 10
    onnx.checker.check_model(out, full_check=True)
    ops = {n.op_type for n in out.graph.node}
    assert not ops & RECURRENT, ops
    assert ops <= ALLOWED | set(extra_allowed), ops - ALLOWED
    inits = {i.name for i in out.graph.initializer}
    for node in out.graph.node:  # MatMul only against constant weights: the DeepLIFT linear rule applies
        assert node.op_type != "MatMul" or node.input[1] in inits, node.name
    return out


def assert_same(original: onnx.ModelProto, lowered: onnx.ModelProto, feeds_list, atol=1e-5) -> None:
    assert [o.name for o in original.graph.output] == [o.name for o in lowered.graph.output]
    for feeds in feeds_list:
        want, got = run(original, feeds), run(lowered, feeds)
        for name, w, g in zip([o.name for o in original.graph.output], want, got):
            assert w.shape == g.shape, (name, w.shape, g.shape)
            np.testing.assert_allclose(g, w, atol=atol, rtol=atol, err_msg=name)


def make_rnn_model(op, *, direction="forward", layout=0, T=4, I=3, H=5,  # noqa: E741 - the ONNX spec's names
                   seed=0, peephole=False,
                   init="none", clip=None, input_forget=0, lbr=0, activations=None, alpha=None, beta=None,
                   seq_lens=None, bias=True, opset=17, outputs=None, downstream=False, const_batch=2):
    """One LSTM/GRU/RNN node with random constant weights; returns (model, ORT-runnable reference, feeds)."""
    rng = np.random.default_rng(seed)
    D = 2 if direction == "bidirectional" else 1
    G = GATES[op]
    x_shape = [T, "batch", I] if layout == 0 else ["batch", T, I]
    inits = [
        helper.make_tensor("W", TensorProto.FLOAT, [D, G * H, I], rng.normal(0, 0.6, (D, G * H, I)).ravel()),
        helper.make_tensor("R", TensorProto.FLOAT, [D, G * H, H], rng.normal(0, 0.6, (D, G * H, H)).ravel()),
    ]
    node_inputs = ["X", "W", "R", "", "", "", "", ""]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    nodes = []
    if bias:
        inits.append(helper.make_tensor("B", TensorProto.FLOAT, [D, 2 * G * H],
                                        rng.normal(0, 0.3, (D, 2 * G * H)).ravel()))
        node_inputs[3] = "B"
    if seq_lens is not None:
        if seq_lens == "input":
            graph_inputs.append(helper.make_tensor_value_info("seq_lens", TensorProto.INT32, ["batch"]))
        else:
            inits.append(helper.make_tensor("seq_lens", TensorProto.INT32, [len(seq_lens)], seq_lens))
        node_inputs[4] = "seq_lens"
    state_shape = [D, "batch", H] if layout == 0 else ["batch", D, H]
    const_shape = [D, const_batch, H] if layout == 0 else [const_batch, D, H]
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    for k, s in enumerate(states):
        if init == "input":
            graph_inputs.append(helper.make_tensor_value_info(s, TensorProto.FLOAT, state_shape))
        elif init == "computed":  # a computed tensor: tanh of a graph input
            graph_inputs.append(helper.make_tensor_value_info(s + "_raw", TensorProto.FLOAT, state_shape))
            nodes.append(helper.make_node("Tanh", [s + "_raw"], [s], name=f"make_{s}"))
        elif init == "constant":
            inits.append(helper.make_tensor(s, TensorProto.FLOAT, const_shape, rng.normal(0, 0.5, const_shape).ravel()))
        if init != "none":
            node_inputs[5 + k] = s
    if peephole:
        inits.append(helper.make_tensor("P", TensorProto.FLOAT, [D, 3 * H], rng.normal(0, 0.5, (D, 3 * H)).ravel()))
        node_inputs[7] = "P"
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    attrs = {"hidden_size": H, "direction": direction}
    if opset >= 14:
        attrs["layout"] = layout
    if clip is not None:
        attrs["clip"] = clip
    if op == "LSTM" and input_forget:
        attrs["input_forget"] = input_forget
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    if activations is not None:
        attrs["activations"] = activations
    if alpha is not None:
        attrs["activation_alpha"] = alpha
    if beta is not None:
        attrs["activation_beta"] = beta
    all_outs = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    outputs = all_outs if outputs is None else outputs
    node_outputs = [o if o in outputs else "" for o in all_outs]
    while node_outputs[-1] == "":
        node_outputs.pop()
    nodes.append(helper.make_node(op, node_inputs, node_outputs, name=f"{op.lower()}1", **attrs))
    ref_nodes = list(nodes)
    if layout == 1:  # ONNX Runtime lacks layout=1: the reference wraps a layout-0 node in Transposes
        attrs["layout"] = 0
        tin = [(n + "_tm" if n and k in (0, 5, 6) else n) for k, n in enumerate(node_inputs)]
        tout = [n + "_tm" if n else "" for n in node_outputs]
        ref_nodes = nodes[:-1] + [helper.make_node("Transpose", [n], [n + "_tm"], perm=[1, 0, 2])
                                  for k, n in enumerate(node_inputs) if n and k in (0, 5, 6)]
        ref_nodes.append(helper.make_node(op, tin, tout, name=f"{op.lower()}1", **attrs))
        ref_nodes += [helper.make_node("Transpose", [n + "_tm"], [n], perm=[2, 0, 1, 3] if n == "Y" else [1, 0, 2])
                      for n in node_outputs if n]
    y_shape = [T, D, "batch", H] if layout == 0 else ["batch", T, D, H]
    shapes = {"Y": y_shape, "Y_h": state_shape, "Y_c": state_shape}
    graph_outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[o]) for o in outputs]
    if downstream:  # every output also consumed by another node
        for o in outputs:
            relu = helper.make_node("Relu", [o], [o + "_relu"], name=f"relu_{o}")
            nodes.append(relu)
            ref_nodes.append(relu)
            graph_outputs.append(helper.make_tensor_value_info(o + "_relu", TensorProto.FLOAT, shapes[o]))
    models = []
    for node_list in (nodes, ref_nodes):
        graph = helper.make_graph(node_list, "g", graph_inputs, graph_outputs, inits)
        models.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
        models[-1].ir_version = 10

    def feeds(batch, feed_seed):
        r = np.random.default_rng(feed_seed)
        f = {"X": r.normal(0, 1, [T, batch, I] if layout == 0 else [batch, T, I]).astype(np.float32)}
        sshape = [D, batch, H] if layout == 0 else [batch, D, H]
        for s in states:
            if init == "input":
                f[s] = r.normal(0, 0.5, sshape).astype(np.float32)
            elif init == "computed":
                f[s + "_raw"] = r.normal(0, 1, sshape).astype(np.float32)
        if seq_lens == "input":
            f["seq_lens"] = np.full(batch, T, np.int32)
        return f

    return models[0], models[1], feeds


def check(op, batches=(2, 5), **kw):
    model, reference, feeds = make_rnn_model(op, **kw)
    lowered = lower(model)
    if kw.get("init") == "constant":
        batches = (kw.get("const_batch", 2),)
    assert_same(reference, lowered, [feeds(b, 100 + b) for b in batches])
    return lowered


# ---------------------------------------------------------------------------------------------------------
# hand-built nodes: every attribute combination

DIRS = ["forward", "reverse", "bidirectional"]


@pytest.mark.parametrize("direction", DIRS)
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_direction_layout(op, direction, layout):
    check(op, direction=direction, layout=layout, seed=DIRS.index(direction) + 3 * layout)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_gru_linear_before_reset(lbr, direction, seed):
    check("GRU", lbr=lbr, direction=direction, seed=seed, layout=seed % 2, init=["none", "input", "computed"][seed])


@pytest.mark.parametrize("peephole", [False, True])
@pytest.mark.parametrize("input_forget", [0, 1])
@pytest.mark.parametrize("clip", [None, 0.7])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_lstm_peephole_forget_clip(peephole, input_forget, clip, direction):
    seed = int(peephole) + 2 * input_forget + 4 * (clip is not None)
    check("LSTM", peephole=peephole, input_forget=input_forget, clip=clip, direction=direction, seed=seed,
          layout=seed % 2)


@pytest.mark.parametrize("init", ["none", "input", "constant", "computed"])
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_initial_states(op, init, layout):
    check(op, init=init, layout=layout, direction="bidirectional", seed=7)


@pytest.mark.parametrize("op", ["GRU", "RNN"])
@pytest.mark.parametrize("clip", [0.3, 2.0])
def test_clip(op, clip):
    check(op, clip=clip, direction="bidirectional", lbr=1, seed=11)


ACTS = [  # (activations per direction, alpha, beta) — LSTM needs 3, GRU 2, RNN 1 per direction
    (["HardSigmoid", "LeakyRelu", "Elu"], [0.3, 0.05, 0.7], [0.4]),
    (["Sigmoid", "ScaledTanh", "Affine"], [0.9, 0.5], [1.1, 0.2]),
    (["Softsign", "Softplus", "ThresholdedRelu"], [0.1], None),
    (["Relu", "Tanh", "Sigmoid"], None, None),
    (["HardSigmoid", "Elu", "LeakyRelu"], None, None),  # defaults for alpha/beta
    (["Affine", "Relu", "ScaledTanh"], [0.5, 0.8], [0.1, 0.9]),
]


@pytest.mark.parametrize("case", range(len(ACTS)))
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_activations(op, case):
    names, alpha, beta = ACTS[case]
    n = {"LSTM": 3, "GRU": 2, "RNN": 1}[op]
    direction = "bidirectional" if case % 2 else "forward"
    names = names[:n]
    if direction == "bidirectional":  # reverse direction gets the list rotated
        names = names + names[1:] + names[:1]
    check(op, activations=names, alpha=alpha, beta=beta, direction=direction, seed=20 + case, clip=3.0,
          peephole=op == "LSTM" and case % 3 == 0, lbr=case % 2)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_sequence_lens_full_is_ignored(op):
    check(op, seq_lens=[4, 4], batches=(2,), direction="bidirectional", T=4)


@pytest.mark.parametrize("opset", [10, 12])
def test_old_opsets(opset):
    check("LSTM", opset=opset, clip=1.0, direction="bidirectional", init="input", peephole=True, seed=3)
    check("GRU", opset=opset, clip=1.0, direction="reverse", lbr=1, seed=4)


@pytest.mark.parametrize("outputs", [["Y"], ["Y_h"], ["Y_c"], ["Y_h", "Y_c"], ["Y", "Y_c"]])
def test_output_subsets_and_downstream(outputs):
    check("LSTM", outputs=outputs, downstream=True, direction="bidirectional", layout=1, seed=5)


def test_downstream_use_of_all_outputs():
    check("GRU", downstream=True, direction="reverse", layout=1, init="computed", seed=6)
    check("LSTM", downstream=True, layout=0, T=1, seed=8)


def test_no_bias_single_step():
    check("LSTM", bias=False, T=1, direction="bidirectional", seed=9)
    check("GRU", bias=False, T=1, lbr=1, seed=10)


def test_names_and_structure():
    model, _, _ = make_rnn_model("LSTM", T=3)
    m = ir.from_proto(model)
    _unroll_recurrent(m)
    names = [n.name for n in m.graph]
    assert "lstm1/t2/gates" in names and "lstm1/t0/cell_act" in names
    assert len(names) == len(set(names))
    assert [n.op_type for n in m.graph].count("Split") == 1 + 3  # one time split + one gate split per step
    # all four gates of a step activated at once: Sigmoid and Tanh on the whole pre-activation, one Where
    assert [n.op_type for n in m.graph].count("Where") == 3
    assert [o.name for o in m.graph.outputs] == ["Y", "Y_h", "Y_c"]
    assert not {"W", "R", "B"} & set(m.graph.initializers)  # the original weights are dropped
    assert not _unroll_recurrent(m)  # nothing left to do


def test_absent_initial_state_is_broadcast_zeros():
    model, _, _ = make_rnn_model("LSTM", direction="bidirectional", init="none")
    zeros = [i for i in lower(model).graph.initializer if i.name.endswith("zeros")]
    assert len(zeros) == 1 and list(zeros[0].dims) == [1, 5]


# ---------------------------------------------------------------------------------------------------------
# refusals


def test_refuses_dynamic_sequence_lens():
    model, _, _ = make_rnn_model("LSTM", seq_lens="input")
    with pytest.raises(UnsupportedModelError, match="lstm1.*per-sample sequence lengths are not supported"):
        _unroll_recurrent(ir.from_proto(model))


def test_refuses_unequal_sequence_lens():
    model, _, _ = make_rnn_model("GRU", seq_lens=[4, 2])
    with pytest.raises(UnsupportedModelError, match="gru1.*per-sample sequence lengths"):
        _unroll_recurrent(ir.from_proto(model))


def test_refuses_unknown_sequence_length_and_lists_all_nodes():
    model, _, _ = make_rnn_model("RNN")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "time"
    model.graph.node.append(helper.make_node("GRU", ["X", "W", "R"], ["Y2"], name="other", hidden_size=5))
    with pytest.raises(UnsupportedModelError) as info:
        _unroll_recurrent(ir.from_proto(model))
    msg = str(info.value)
    assert "rnn1" in msg and "'X'" in msg and "not static" in msg and "'other'" in msg
    assert msg.splitlines()[0].startswith("unsupported model: 2 node(s)")


def test_refuses_non_constant_weights():
    model, _, _ = make_rnn_model("RNN")
    w = next(i for i in model.graph.initializer if i.name == "W")
    model.graph.initializer.remove(w)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.dims)))
    with pytest.raises(UnsupportedModelError, match="rnn1.*weight W"):
        _unroll_recurrent(ir.from_proto(model))


# ---------------------------------------------------------------------------------------------------------
# exported models: PyTorch (TorchScript and dynamo exporters)

def _prepare_like_pipeline(model: onnx.ModelProto, x: np.ndarray, seq: int) -> ir.Model:
    """What onnxshap.lower does before unrolling: probe two batches, annotate shapes, fold shape plumbing.

    Falls back to ONNX shape inference (plus the known sequence length) if those modules are missing.
    """
    m = ir.from_proto(model)
    try:
        from onnxshap.lower.fold import FoldBatchInvariant
        from onnxshap.lower.probe import batch_axis, probe_twice
    except ImportError:
        m = ir.from_proto(onnx.shape_inference.infer_shapes(model, data_prop=True))
    else:
        probe_a, probe_b = probe_twice(m, {"x": x})
        for node in m.graph:
            for value in node.outputs:
                if value.name in probe_a:
                    a = probe_a[value.name]
                    axis = batch_axis(a.shape, probe_b[value.name].shape)
                    value.shape = ir.Shape([ir.SymbolicDim("batch") if i == axis else d for i, d in enumerate(a.shape)])
        FoldBatchInvariant(probe_a, probe_b)(m)
    for node in m.graph:
        if node.op_type in GATES:
            x_value, layout = node.inputs[0], node.attributes.get_int("layout", 0)
            assert x_value.shape is not None and x_value.shape[layout] == seq, x_value.shape
    return m


def _export_torch(module, x, dynamo: bool, path: str) -> onnx.ModelProto:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, (x,), path, dynamo=True, opset_version=18, input_names=["x"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        else:
            torch.onnx.export(module, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["out"], dynamic_axes={"x": {0: "batch"}, "out": {0: "batch"}})
    return onnx.load(path)


TORCH_CASES = [("LSTM", 1, False, False), ("LSTM", 2, True, False), ("GRU", 2, True, False),
               ("GRU", 1, False, False), ("RNN", 2, True, False),
               # the dynamo exporter is slow (3-8 s a model): one case. It writes nn.GRU the same way as nn.LSTM
               # (GRU nodes, X through Shape/Slice/Concat/Reshape) and decomposes nn.RNN itself.
               ("LSTM", 2, True, True)]


@pytest.mark.parametrize("cls,layers,bidirectional,dynamo", TORCH_CASES)
def test_torch_export(tmp_path, cls, layers, bidirectional, dynamo):
    """TorchScript export: LSTM/GRU/RNN nodes, initial states from ConstantOfShape(Shape(x)) plumbing.

    Dynamo export: LSTM/GRU nodes whose X is a Reshape of the previous layer's Y through Shape/Slice/Concat
    (the sequence dim is unknown until folded); nn.RNN arrives already decomposed (MatMul/Add/Tanh).
    """
    torch = pytest.importorskip("torch")

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(torch.nn, cls)(4, 6, num_layers=layers, bidirectional=bidirectional,
                                              batch_first=True)
            self.fc = torch.nn.Linear(6 * (2 if bidirectional else 1), 3)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.fc(y[:, -1])

    torch.manual_seed(layers)
    module = Head().eval()
    T = 5
    model = _export_torch(module, torch.randn(2, T, 4), dynamo, str(tmp_path / "m.onnx"))
    model.ir_version = 10
    m = _prepare_like_pipeline(model, torch.randn(4, T, 4).numpy(), T)
    had_recurrent = any(n.op_type in GATES for n in m.graph)
    assert _unroll_recurrent(m) == had_recurrent
    out = ir.to_proto(m)
    out.ir_version = 10
    onnx.checker.check_model(out, full_check=True)
    assert not {n.op_type for n in out.graph.node} & RECURRENT
    for batch in (1, 3):
        x = torch.randn(batch, T, 4)
        want = module(x).detach().numpy()
        np.testing.assert_allclose(run(model, {"x": x.numpy()})[0], want, atol=1e-5)
        np.testing.assert_allclose(run(out, {"x": x.numpy()})[0], want, atol=1e-5)
