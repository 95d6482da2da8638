"""Small ONNX models for the memory and scale-out tests (built in code, seeded)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh

FLOAT = onnx.TensorProto.FLOAT


def mlp(features: int = 8, hidden: tuple[int, ...] = (16,), outputs: int = 2, seed: int = 0) -> onnx.ModelProto:
    """``x → (MatMul, Add, Relu)* → MatMul → Tanh``: a dense net with a nonlinear head (rescale rules run)."""
    rng = np.random.default_rng(seed)
    sizes = [features, *hidden, outputs]
    nodes, weights, source = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        weights += [oh.make_tensor(f"w{i}", FLOAT, [a, b], rng.normal(size=a * b) / np.sqrt(a)),
                    oh.make_tensor(f"b{i}", FLOAT, [b], rng.normal(size=b) * 0.1)]
        nodes += [oh.make_node("MatMul", [source, f"w{i}"], [f"m{i}"]),
                  oh.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        last = i == len(sizes) - 2
        nodes.append(oh.make_node("Tanh" if last else "Relu", [f"a{i}"], ["y" if last else f"h{i}"]))
        source = f"h{i}"
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", FLOAT, ["N", features])],
                          [oh.make_tensor_value_info("y", FLOAT, ["N", outputs])], initializer=weights)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    return model
