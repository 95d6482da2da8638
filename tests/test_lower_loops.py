"""Tests for onnxshap.lower.loops: Loop/Scan unrolled into straight-line ops equal ONNX Runtime's output."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshap.errors import UnsupportedModelError
from onnxshap.lower.loops import UnrollLoops
from onnxshap.lower.recurrent import UnrollRecurrent


def _unroll_recurrent(model: ir.Model) -> bool:
    return UnrollRecurrent()(model).modified

def _unroll_loops(model: ir.Model) -> bool:
    return UnrollLoops()(model).modified

ALLOWED = {
    "MatMul", "Add", "Sub", "Mul", "Div", "Neg", "Sigmoid", "Tanh", "Relu", "LeakyRelu", "HardSigmoid", "Elu",
    "Softsign", "Softplus", "ThresholdedRelu", "Clip", "Split", "Concat", "Squeeze", "Unsqueeze", "Transpose",
    "Reshape", "Slice", "Gather", "Identity",
}
LOOPS = {"LSTM", "GRU", "RNN", "Loop", "Scan"}
F = TensorProto.FLOAT
I64 = TensorProto.INT64
B = TensorProto.BOOL


# ---------------------------------------------------------------------------------------------------------
# helpers


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def lower(model: onnx.ModelProto, extra_ops=()) -> onnx.ModelProto:
    m = ir.from_proto(model)
    assert _unroll_loops(m)
    _unroll_recurrent(m)
    out = ir.to_proto(m)
    out.ir_version = 10
    onnx.checker.check_model(out, full_check=True)
    ops = {n.op_type for n in out.graph.node}
    assert not ops & LOOPS, ops
    assert ops <= ALLOWED | set(extra_ops), ops - ALLOWED
    return out


def check(model: onnx.ModelProto, feeds_for, batches=(2, 5), extra_ops=(), atol=1e-5) -> onnx.ModelProto:
    """Lower ``model`` and compare every output with the original at two batch sizes."""
    lowered = lower(model, extra_ops)
    assert [o.name for o in model.graph.output] == [o.name for o in lowered.graph.output]
    for b in batches:
        feeds = feeds_for(b)
        for name, w, g in zip([o.name for o in model.graph.output], run(model, feeds), run(lowered, feeds)):
            assert w.shape == g.shape, (name, w.shape, g.shape)
            np.testing.assert_allclose(g, w, atol=atol, rtol=atol, err_msg=name)
    return lowered


RANKS = {"h_final": 2, "h_all": 3, "t_final": 0, "limit_final": 0, "wx_final": 2, "scaled_all": 3,
         "h_prev_all": 3, "hf": 2, "relu_out": 2, "acc_final": 2, "acc_all": 3, "s_final": 2, "s_all": 3, "x2_all": 3}


def out(name, elem=F):
    """A graph output of the rank listed in RANKS, with symbolic dims (the checker wants a shape)."""
    return helper.make_tensor_value_info(name, elem, [f"{name}_{k}" for k in range(RANKS[name])])


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, inits=(), opset=17):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def rnn_body(name="body", cond_node=None, extra_nodes=(), extra_inits=(), extra_inputs=(), extra_outputs=(),
             scan_output=True, prefix=""):
    """Body (i, cond, h) -> (cond', h', [h']) of a tanh RNN reading X[i] from the outer scope."""
    p = prefix
    nodes = [
        helper.make_node("Gather", ["X", f"{p}i"], [f"{p}x_t"], axis=0),
        helper.make_node("MatMul", [f"{p}x_t", "Wx"], [f"{p}xw"]),
        helper.make_node("MatMul", [f"{p}h", "Wh"], [f"{p}hw"]),
        helper.make_node("Add", [f"{p}xw", f"{p}hw"], [f"{p}pre"]),
        helper.make_node("Add", [f"{p}pre", f"{p}bias"], [f"{p}pre_b"]),
        helper.make_node("Tanh", [f"{p}pre_b"], [f"{p}h_new"]),
        *extra_nodes,
        cond_node or helper.make_node("Identity", [f"{p}cond"], [f"{p}cond_out"]),
    ]
    if scan_output:
        nodes.append(helper.make_node("Identity", [f"{p}h_new"], [f"{p}h_scan"]))
    inits = [const(f"{p}bias", np.linspace(-0.2, 0.3, 4).astype(np.float32)), *extra_inits]
    inputs = [helper.make_tensor_value_info(f"{p}i", I64, []), helper.make_tensor_value_info(f"{p}cond", B, []),
              helper.make_tensor_value_info(f"{p}h", F, None), *extra_inputs]
    outputs = [helper.make_tensor_value_info(f"{p}cond_out", B, []),
               helper.make_tensor_value_info(f"{p}h_new", F, None), *extra_outputs]
    if scan_output:
        outputs.append(helper.make_tensor_value_info(f"{p}h_scan", F, None))
    return helper.make_graph(nodes, name, inputs, outputs, inits)


def rnn_loop_model(T=5, loop_inputs=("M", "cond0", "h0"), body=None, inits=(), pre_nodes=(), outputs=("h_final",
                   "h_all"), extra_graph_inputs=(), downstream=False, seed=0, h0_input=False):
    rng = np.random.default_rng(seed)
    inits = [const("Wx", rng.normal(0, 0.5, (3, 4)).astype(np.float32)),
             const("Wh", rng.normal(0, 0.5, (4, 4)).astype(np.float32)),
             const("M", np.int64(T)), const("cond0", np.bool_(True)), *inits]
    if h0_input:  # h0 fed per row
        extra_graph_inputs = [*extra_graph_inputs, helper.make_tensor_value_info("h0", F, ["batch", 4])]
    else:  # h0 broadcast over the batch
        inits.append(const("h0", np.zeros((1, 4), np.float32)))
    node = helper.make_node("Loop", list(loop_inputs), list(outputs), name="rnn_loop", body=body or rnn_body())
    graph_outputs = [out(o, I64 if o in ("t_final", "limit_final") else F) for o in outputs if o]
    nodes = [*pre_nodes, node]
    if downstream:
        nodes.append(helper.make_node("Relu", [outputs[0]], ["relu_out"], name="relu"))
        graph_outputs.append(out("relu_out"))
    model = make_model(nodes, [helper.make_tensor_value_info("X", F, [T, "batch", 3]), *extra_graph_inputs],
                       graph_outputs, inits)

    def feeds(b):
        rng = np.random.default_rng(b)
        f = {"X": rng.normal(0, 1, (T, b, 3)).astype(np.float32)}
        if h0_input:
            f["h0"] = rng.normal(0, 1, (b, 4)).astype(np.float32)
        return f

    return model, feeds


# ---------------------------------------------------------------------------------------------------------
# Loop


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("T", [1, 4])
def test_for_loop_with_cond_passthrough(T, seed):
    model, feeds = rnn_loop_model(T=T, seed=seed)
    lowered = check(model, feeds)
    names = [n.name for n in lowered.graph.node]
    assert len(names) == len(set(names)) and any(n.startswith("rnn_loop/it0/") for n in names)


def test_for_loop_without_cond_input():
    model, feeds = rnn_loop_model(loop_inputs=("M", "", "h0"))
    check(model, feeds)


def test_cond_computed_in_body_stops_early():
    # M = 100 but the body's condition (i + 1 < 3) stops after 3 iterations
    cond_nodes = [helper.make_node("Add", ["i", "one"], ["i1"]),
                  helper.make_node("Less", ["i1", "limit"], ["cond_out"])]
    body = rnn_body(cond_node=cond_nodes[1], extra_nodes=[cond_nodes[0]],
                    extra_inits=[const("one", np.int64(1)), const("limit", np.int64(3))])
    model, feeds = rnn_loop_model(T=5, body=body, inits=[const("M100", np.int64(100))],
                                  loop_inputs=("M100", "cond0", "h0"))
    lowered = check(model, feeds)
    assert sum(n.op_type == "Tanh" for n in lowered.graph.node) == 3


def test_while_loop_with_carried_counter_like_tf2onnx():
    # no trip count; cond from a loop-carried counter compared with a passthrough limit; weights carried too
    body_nodes = [
        helper.make_node("Add", ["t", "one"], ["t_next"]),
        helper.make_node("Cast", ["t_next"], ["t_next_f"], to=F),
        helper.make_node("Cast", ["limit_in"], ["limit_f"], to=F),
        helper.make_node("Less", ["t_next_f", "limit_f"], ["cond_out"]),
        helper.make_node("Gather", ["X", "t"], ["x_t"], axis=0),
        helper.make_node("MatMul", ["x_t", "wx_in"], ["xw"]),
        helper.make_node("MatMul", ["h", "Wh"], ["hw"]),
        helper.make_node("Add", ["xw", "hw"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_new"]),
        helper.make_node("Identity", ["h_new"], ["h_scan"]),
    ]
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        body_nodes, "while_body",
        [vi("i", I64, []), vi("cond", B, []), vi("t", I64, []), vi("h", F, None), vi("limit_in", I64, []),
         vi("wx_in", F, None)],
        [vi("cond_out", B, []), vi("t_next", I64, []), vi("h_new", F, None), vi("limit_in", I64, []),
         vi("wx_in", F, None), vi("h_scan", F, None)],
        [const("one", np.int64(1))])
    pre = [helper.make_node("Less", ["zero", "limit"], ["cond0c"], name="cond_init")]
    model, feeds = rnn_loop_model(
        T=4, body=body, loop_inputs=("", "cond0c", "zero", "h0", "limit", "Wx"), pre_nodes=pre,
        inits=[const("zero", np.int64(0)), const("limit", np.int64(4))],
        outputs=("t_final", "h_final", "limit_final", "wx_final", "h_all"))
    check(model, feeds)


def test_body_constants_and_initializers_and_downstream_use():
    extra = [helper.make_node("Constant", [], ["scale"], value=const("scale_v", np.float32(0.5))),
             helper.make_node("Mul", ["h_new", "scale"], ["h_scaled"])]
    body = rnn_body(extra_nodes=extra, extra_outputs=[helper.make_tensor_value_info("h_scaled", F, None)])
    # body outputs: cond, h_new (carried), h_scaled (scan), h_scan (scan)
    model, feeds = rnn_loop_model(body=body, outputs=("h_final", "scaled_all", "h_all"), downstream=True)
    check(model, feeds)


def test_scan_output_of_carried_input_and_unused_outputs():
    body = rnn_body(scan_output=False, extra_outputs=[helper.make_tensor_value_info("h", F, None)])
    model, feeds = rnn_loop_model(body=body, outputs=("hf", "h_prev_all"), h0_input=True)
    check(model, feeds)
    # an omitted Loop output ("") — ONNX Runtime 1.31 segfaults on that model, so compare with the named one
    omitted = onnx.ModelProto()
    omitted.CopyFrom(model)
    omitted.graph.node[0].output[0] = ""
    del omitted.graph.output[0]
    lowered = lower(omitted)
    for b in (2, 3):
        np.testing.assert_allclose(run(lowered, feeds(b))[0], run(model, feeds(b))[1], atol=1e-6)


def test_nested_triangular_loops():
    # outer over i < 3: inner loop runs i + 1 times accumulating acc += X[i] * 0.5; outer stacks acc
    vi = helper.make_tensor_value_info
    inner = helper.make_graph(
        [helper.make_node("Gather", ["X", "oi"], ["xo"], axis=0),
         helper.make_node("Mul", ["xo", "half"], ["xh"]),
         helper.make_node("Add", ["acc_in", "xh"], ["acc_out"]),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "inner", [vi("j", I64, []), vi("c_in", B, []), vi("acc_in", F, None)],
        [vi("c_out", B, []), vi("acc_out", F, None)], [const("half", np.float32(0.5))])
    outer = helper.make_graph(
        [helper.make_node("Add", ["oi", "one"], ["n_inner"]),
         helper.make_node("Loop", ["n_inner", "", "acc"], ["acc_next"], name="inner_loop", body=inner),
         helper.make_node("Tanh", ["acc_next"], ["acc_scan"]),
         helper.make_node("Identity", ["oc"], ["oc_out"])],
        "outer", [vi("oi", I64, []), vi("oc", B, []), vi("acc", F, None)],
        [vi("oc_out", B, []), vi("acc_next", F, None), vi("acc_scan", F, None)], [const("one", np.int64(1))])
    node = helper.make_node("Loop", ["M", "", "acc0"], ["acc_final", "acc_all"], name="outer_loop", body=outer)
    model = make_model([node], [vi("X", F, [3, "batch", 2])],
                       [out("acc_final"), out("acc_all")],
                       [const("M", np.int64(3)), const("acc0", np.zeros((1, 2), np.float32))])
    lowered = check(model, lambda b: {"X": np.random.default_rng(b).normal(size=(3, b, 2)).astype(np.float32)})
    assert sum(n.op_type == "Add" for n in lowered.graph.node) == 1 + 2 + 3


# ---------------------------------------------------------------------------------------------------------
# Scan


def scan_model(in_axis=0, in_dir=0, out_axis=0, out_dir=0, T=4, opset=17, seed=0):
    """Scan: state s (carried, [batch, 4]); inputs x [.., T, ..] and y; outputs per-step s' and x·2."""
    rng = np.random.default_rng(seed)
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "Wx"], ["xw"]), helper.make_node("MatMul", ["s", "Wh"], ["sw"]),
         helper.make_node("Add", ["xw", "sw"], ["pre"]), helper.make_node("Add", ["pre", "y_t"], ["pre2"]),
         helper.make_node("Sigmoid", ["pre2"], ["s_new"]), helper.make_node("Mul", ["x_t", "two"], ["x2"]),
         helper.make_node("Identity", ["s_new"], ["s_out"])],
        "scan_body", [vi("s", F, ["batch", 4]), vi("x_t", F, ["batch", 3]), vi("y_t", F, ["batch", 4])],
        [vi("s_new", F, ["batch", 4]), vi("s_out", F, ["batch", 4]), vi("x2", F, ["batch", 3])],
        [const("two", np.float32(2.0))])
    x_shape = [T, "batch", 3] if in_axis in (0, -3) else ["batch", T, 3]
    attrs = {"num_scan_inputs": 2, "scan_input_axes": [in_axis, 0], "scan_input_directions": [in_dir, 1],
             "scan_output_axes": [out_axis, 0], "scan_output_directions": [out_dir, 0]}
    node = helper.make_node("Scan", ["s0", "x", "y"], ["s_final", "s_all", "x2_all"], name="scan1", body=body,
                            **attrs)
    model = make_model([node], [vi("x", F, x_shape), vi("y", F, [T, "batch", 4]), vi("s0", F, ["batch", 4])],
                       [out("s_final"), out("s_all"), out("x2_all")],
                       [const("Wx", rng.normal(0, 0.5, (3, 4)).astype(np.float32)),
                        const("Wh", rng.normal(0, 0.5, (4, 4)).astype(np.float32))], opset=opset)

    def feeds(b):
        r = np.random.default_rng(b + seed)
        shape = [T, b, 3] if in_axis in (0, -3) else [b, T, 3]
        return {"x": r.normal(size=shape).astype(np.float32), "y": r.normal(size=(T, b, 4)).astype(np.float32),
                "s0": r.normal(size=(b, 4)).astype(np.float32)}

    return model, feeds


@pytest.mark.parametrize("in_axis,in_dir,out_axis,out_dir",
                         [(0, 0, 0, 0), (1, 1, 1, 0), (0, 1, 0, 1), (-2, 0, -1, 1), (1, 0, 2, 1), (-3, 1, 1, 1)])
def test_scan_axes_and_directions(in_axis, in_dir, out_axis, out_dir):
    model, feeds = scan_model(in_axis, in_dir, out_axis, out_dir, seed=abs(in_axis) + 3 * abs(out_axis))
    check(model, feeds)


def test_scan_single_step_opset11():
    model, feeds = scan_model(T=1, opset=11, in_axis=1, out_axis=1)
    check(model, feeds)


def test_scan_dynamic_length_refused():
    model, _ = scan_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "time"
    with pytest.raises(UnsupportedModelError, match="scan1.*sequence length of scan input 'x' is not static"):
        _unroll_loops(ir.from_proto(model))


# ---------------------------------------------------------------------------------------------------------
# refusals


def test_dynamic_trip_count_refused():
    vi = helper.make_tensor_value_info
    model, _ = rnn_loop_model(loop_inputs=("n", "cond0", "h0"), extra_graph_inputs=[vi("n", I64, [])])
    with pytest.raises(UnsupportedModelError, match="rnn_loop.*trip count 'n' is not a constant"):
        _unroll_loops(ir.from_proto(model))


def test_trip_count_computed_from_data_refused():
    pre = [helper.make_node("ReduceMax", ["X"], ["xmax"], keepdims=0, name="max"),
           helper.make_node("Cast", ["xmax"], ["n"], to=I64, name="cast")]
    model, _ = rnn_loop_model(loop_inputs=("n", "cond0", "h0"), pre_nodes=pre)
    m = ir.from_proto(model)
    with pytest.raises(UnsupportedModelError, match="rnn_loop.*trip count 'n'"):
        _unroll_loops(m)
    assert len(m.graph.node("max").outputs[0].uses()) == 1  # nothing half-built left behind
    assert {n.op_type for n in m.graph} == {"ReduceMax", "Cast", "Loop"}


def test_data_dependent_condition_refused():
    cond_nodes = [helper.make_node("ReduceSum", ["h_new"], ["s"], keepdims=0),
                  helper.make_node("Less", ["s", "zero_f"], ["cond_out"])]
    body = rnn_body(cond_node=cond_nodes[1], extra_nodes=[cond_nodes[0]],
                    extra_inits=[const("zero_f", np.float32(0))])
    model, _ = rnn_loop_model(body=body)
    m = ir.from_proto(model)
    with pytest.raises(UnsupportedModelError, match="rnn_loop.*condition 'cond_out' depends on the data"):
        _unroll_loops(m)
    assert [n.op_type for n in m.graph] == ["Loop"] and len(m.graph.inputs[0].uses()) == 1


# ---------------------------------------------------------------------------------------------------------
# Keras through tf2onnx (keras 3: a GRU arrives as a Loop, an LSTM as an LSTM node)


@pytest.fixture(scope="module")
def keras_env():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    keras = pytest.importorskip("keras")
    return keras


def _keras_to_onnx(kmodel, shape):
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *shape), tf.float32, name="x"),)
    try:
        model, _ = tf2onnx.convert.from_keras(kmodel, input_signature=spec, opset=17)
    except Exception:  # noqa: BLE001 - tf2onnx 1.17 fails on some keras-3 models
        fn = tf.function(lambda x: kmodel(x, training=False))
        model, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    model.ir_version = 10
    return model


@pytest.mark.parametrize("layer,kwargs,expect", [
    ("GRU", {}, "Loop"),
    ("GRU", {"return_sequences": True, "reset_after": False}, "Loop"),
    ("LSTM", {}, "LSTM"),
    ("SimpleRNN", {"go_backwards": True}, "Loop"),
])
def test_keras_tf2onnx(keras_env, layer, kwargs, expect):
    keras = keras_env
    keras.utils.set_random_seed(0)
    T = 6
    inp = keras.Input((T, 3))
    h = getattr(keras.layers, layer)(5, **kwargs)(inp)
    if kwargs.get("return_sequences"):
        h = keras.layers.Flatten()(h)
    kmodel = keras.Model(inp, keras.layers.Dense(2)(h))
    model = _keras_to_onnx(kmodel, (T, 3))
    ops = {n.op_type for n in model.graph.node}
    assert expect in ops, ops
    m = ir.from_proto(model)
    # tf2onnx writes a constant trip count / constant-computable condition: no folding needed here
    _unroll_loops(m)
    for node in m.graph:  # the recurrent pass needs X's sequence dim (the probe sets it in the pipeline)
        if node.op_type in ("LSTM", "GRU", "RNN") and not isinstance((node.inputs[0].shape or [None])[0], int):
            node.inputs[0].shape = ir.Shape([T, ir.SymbolicDim("batch"), 3])
    _unroll_recurrent(m)
    out = ir.to_proto(m)
    out.ir_version = 10
    onnx.checker.check_model(out, full_check=True)
    assert not {n.op_type for n in out.graph.node} & LOOPS
    for b in (1, 4):
        x = np.random.default_rng(b).normal(size=(b, T, 3)).astype(np.float32)
        want = kmodel(x).numpy()
        np.testing.assert_allclose(run(model, {"x": x})[0], want, atol=1e-5)
        np.testing.assert_allclose(run(out, {"x": x})[0], want, atol=1e-5)
