"""ONNX Runtime plumbing: providers, the IR version the runtime reads, the two-runtimes warning."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

from onnxshap import runtime
from onnxshap.errors import OnnxShapError


def test_cpu_is_always_available():
    assert runtime.providers_for("cpu") == ["CPUExecutionProvider"]


def test_auto_takes_cuda_only_when_it_really_loads():
    providers = runtime.providers_for("auto")
    assert providers[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in providers) == runtime.cuda_usable()


def test_cuda_request_without_a_usable_gpu_is_a_clear_error():
    if runtime.cuda_usable():
        pytest.skip("this machine has a working CUDA provider")
    with pytest.raises(OnnxShapError, match="CUDA provider does not load"):
        runtime.providers_for("cuda")


def test_unknown_device_is_refused():
    with pytest.raises(OnnxShapError, match="unknown device 'tpu'"):
        runtime.providers_for("tpu")


def test_probing_cuda_prints_nothing():
    code = "from onnxshap import runtime; runtime.cuda_usable(); runtime.providers_for('auto')"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0
    assert "CUDAExecutionProvider" not in done.stderr and "Failed" not in done.stderr, done.stderr


def test_runtime_ir_version_is_measured():
    assert 9 <= runtime.runtime_ir_version() <= 13


def test_warns_when_both_runtime_distributions_are_installed(monkeypatch):
    monkeypatch.setattr(metadata, "version", lambda name: "1.0")
    with pytest.warns(RuntimeWarning, match="both 'onnxruntime' and 'onnxruntime-gpu'"):
        runtime.warn_if_both_runtimes_installed()


def test_no_warning_with_one_distribution(monkeypatch, recwarn):
    def only_gpu(name):
        if name == "onnxruntime":
            raise metadata.PackageNotFoundError(name)
        return "1.0"

    monkeypatch.setattr(metadata, "version", only_gpu)
    runtime.warn_if_both_runtimes_installed()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_probing_two_batch_sizes_makes_one_session(monkeypatch):
    """probe_twice runs both batch sizes through one session, with the values of two separate runs."""
    import onnx_ir as ir

    from onnxshap.lower.probe import PROBE_BATCHES, probe_twice

    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])
    weight = onh.from_array(np.arange(9, dtype=np.float32).reshape(3, 3), "w")
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Tanh", ["h"], ["y"])],
                          "g", [x], [y], [weight])
    model = ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    examples = {"x": np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)}
    sessions = []
    make_session = runtime.make_session
    monkeypatch.setattr(runtime, "make_session", lambda *a, **k: sessions.append(1) or make_session(*a, **k))
    probes = probe_twice(model, examples)
    assert len(sessions) == 1
    for probe, batch in zip(probes, PROBE_BATCHES):
        rows = examples["x"][np.arange(batch) % 4]
        assert probe["x"].shape == (batch, 3) and np.array_equal(probe["x"], rows)
        np.testing.assert_allclose(probe["y"], np.tanh(rows @ probe["w"]), rtol=1e-6)
        assert set(probe) >= {"x", "w", "h", "y"}
