"""A refusal is cheap: an op the table does not know is named before any probing, even on a large model.

The model is ViT-B/16-sized (hidden 768, 12 layers, MLP 3072, 196 patches + class token, 86 M parameters,
344 MB of float32 weights), written directly in ONNX so the test needs no export, with one op onnxshap has no
rule for. ``DeepExplainer`` runs in a fresh process; its CPU time and peak RSS (``VmHWM``: ``ru_maxrss`` would
carry the parent's peak across ``exec``) are measured there (issue 9 item 6: < 2 s and < 1 GB). CPU time, not wall
time: probing the model would cost tens of CPU seconds, while a stall of this shared VM (one full-suite run took
7.8 s of wall time for 0.4 s of work) is not the refusal's cost.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx.helper as oh
from onnx import TensorProto, numpy_helper

HIDDEN, LAYERS, MLP, TOKENS, PATCH = 768, 12, 3072, 197, 16

CHILD = """
import json, sys, time
import numpy as np
import onnxshap
background = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
started, cpu = time.perf_counter(), time.process_time()
try:
    onnxshap.DeepExplainer(sys.argv[1], background)
    outcome = "constructed"
except onnxshap.UnsupportedModelError as error:
    outcome = str(error).splitlines()[0]
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                  "outcome": outcome, "peak_mb": peak_kb / 1024}))
"""


def _vit_b16_with_an_unknown_op(path) -> None:
    """Patch embedding, 12 encoder layers (LayerNorm, QKV, attention, MLP with an op onnxshap does not know in
    the middle layer's activation), head; random weights."""
    rng = np.random.default_rng(0)
    weights, nodes = [], []

    def weight(name, *shape):
        weights.append(numpy_helper.from_array((rng.normal(size=shape) * 0.02).astype(np.float32), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(oh.make_node(op, inputs, [name], name=name, **attrs))
        return name

    shape = numpy_helper.from_array(np.array([0, HIDDEN, -1], np.int64), "patch_shape")
    weights.append(shape)
    x = node("Conv", ["pixels", weight("patch_w", HIDDEN, 3, PATCH, PATCH)], "patches", strides=[PATCH, PATCH])
    x = node("Transpose", [node("Reshape", [x, "patch_shape"], "flat")], "tokens", perm=[0, 2, 1])
    for layer in range(LAYERS):
        p = f"l{layer}"
        h = node("LayerNormalization", [x, weight(f"{p}_g1", HIDDEN), weight(f"{p}_b1", HIDDEN)], f"{p}_ln1",
                 axis=-1)
        q = node("MatMul", [h, weight(f"{p}_q", HIDDEN, HIDDEN)], f"{p}_qm")
        k = node("MatMul", [h, weight(f"{p}_k", HIDDEN, HIDDEN)], f"{p}_km")
        v = node("MatMul", [h, weight(f"{p}_v", HIDDEN, HIDDEN)], f"{p}_vm")
        scores = node("Softmax", [node("MatMul", [q, node("Transpose", [k], f"{p}_kt", perm=[0, 2, 1])],
                                       f"{p}_s")], f"{p}_a", axis=-1)
        x = node("Add", [x, node("MatMul", [node("MatMul", [scores, v], f"{p}_av"),
                                             weight(f"{p}_o", HIDDEN, HIDDEN)], f"{p}_om")], f"{p}_r1")
        h = node("LayerNormalization", [x, weight(f"{p}_g2", HIDDEN), weight(f"{p}_b2", HIDDEN)], f"{p}_ln2",
                 axis=-1)
        up = node("MatMul", [h, weight(f"{p}_up", HIDDEN, MLP)], f"{p}_up_m")
        act = node("Atan" if layer == LAYERS // 2 else "Gelu", [up], f"{p}_act")
        x = node("Add", [x, node("MatMul", [act, weight(f"{p}_down", MLP, HIDDEN)], f"{p}_down_m")], f"{p}_r2")
    logits = node("MatMul", [node("ReduceMean", [x, "axis1"], "pooled", keepdims=0), weight("head", HIDDEN, 10)],
                  "logits")
    weights.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    graph = oh.make_graph(nodes, "vit_b16", [oh.make_tensor_value_info("pixels", TensorProto.FLOAT,
                                                                      ["n", 3, 224, 224])],
                          [oh.make_tensor_value_info(logits, TensorProto.FLOAT, ["n", 10])], initializer=weights)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))


def test_an_unknown_op_in_a_vit_b16_is_refused_in_under_2_s_and_1_gb(tmp_path):
    path = tmp_path / "vit_b16.onnx"
    _vit_b16_with_an_unknown_op(path)
    assert path.stat().st_size > 300e6  # the weights really are ViT-B/16's size
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    assert "l6_act" in result["outcome"] and "Atan" in result["outcome"], result["outcome"]
    assert result["cpu_seconds"] < 2.0, f"refusal took {result['cpu_seconds']:.2f} s of CPU"
    assert result["peak_mb"] < 1024, f"refusal peaked at {result['peak_mb']:.0f} MB"
