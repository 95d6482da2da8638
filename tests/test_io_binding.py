"""GPU readiness: with CUDA, the augmented runs go through ONNX Runtime's IO binding — samples and references
placed on the device once, the multiplier stream kept there, only the SHAP values copied back — and give the
CPU's values. On CPU the runs stay plain ``session.run`` calls on numpy arrays.

The binding code is device-generic, so its wiring (placed reference chunks, their weights, outputs copied
back) is checked here on CPU memory against the plain runs, value for value; the CUDA comparison runs where
ONNX Runtime's CUDA provider really runs a session, and is skipped, saying why, elsewhere.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import onnxshap
from onnxshap import runtime
from onnxshap.run import chunking
from tests import zoo

NAME = "mnist_cnn"


def _cnn():
    x, background = zoo.data(NAME, n=5, m=7)
    return zoo.cached_onnx(NAME), x, background


def _additivity(explainer, x, values):
    """Largest |Σφ − (f(x) − E f(R))| relative to max(1, |f(x) − E f(R)|)."""
    change = explainer.predict(x) - explainer.expected_value
    total = values.reshape(len(x), -1, values.shape[-1]).sum(axis=1)
    return float((np.abs(total - change) / np.maximum(1.0, np.abs(change))).max())


def _counting(monkeypatch) -> list:
    calls = []
    bound = runtime.run_bound

    def counted(*args, **kwargs):
        calls.append(args[-1] if len(args) == 4 else kwargs.get("device"))
        return bound(*args, **kwargs)

    monkeypatch.setattr(runtime, "run_bound", counted)
    return calls


def test_cpu_runs_are_plain_session_runs(monkeypatch):
    """On CPU no run goes through IO binding (numpy arrays are read in place; binding would only add copies)."""
    model, x, background = _cnn()
    explainer = onnxshap.DeepExplainer(model, background, device="cpu")
    assert explainer.runner.device is None
    calls = _counting(monkeypatch)
    values = explainer.shap_values(x)
    assert calls == [] and np.all(np.isfinite(values))


def test_bound_runs_give_the_plain_runs_values(monkeypatch):
    """The binding path on CPU memory, in several sample and reference chunks (a budget of ~3 pairs of rows per
    call): values identical to the plain runs', every call bound, additivity exact."""
    model, x, background = _cnn()
    plain = onnxshap.DeepExplainer(model, background, device="cpu")
    expected = plain.shap_values(x)
    budget = plain.augmented.memory(1, 3, 10)
    bound = onnxshap.DeepExplainer(model, background, device="cpu", max_memory=budget)
    bound.runner.device = "cpu"
    calls = _counting(monkeypatch)
    values = bound.shap_values(x)
    chunks = chunking(bound.augmented, len(x), len(background), 10, budget, None)
    assert chunks.references < len(background)  # several reference chunks, each placed once and reused
    expected_calls = -(-len(x) // chunks.samples) * -(-len(background) // chunks.references) * -(-10 // chunks.outputs)
    assert len(calls) == expected_calls and set(calls) == {"cpu"}
    scale = np.abs(expected).max()
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6 * scale)
    assert _additivity(bound, x, values) <= 1e-4


def _cuda_reason() -> str | None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (a CPU-only build)"
    if not runtime.cuda_usable():
        return ("onnxruntime lists CUDAExecutionProvider but a session on it does not run here "
                "(no GPU, or CUDA/cuDNN libraries missing)")
    return None


@pytest.mark.skipif(_cuda_reason() is not None, reason=f"CUDA unusable: {_cuda_reason()}")
def test_cuda_values_equal_cpu_values():
    """device="cuda" binds every augmented run on the GPU and returns the CPU's values (to float32 rounding of
    other kernels: 1e-5 of the values' scale), with exact additivity."""
    model, x, background = _cnn()
    cpu = onnxshap.DeepExplainer(model, background, device="cpu").shap_values(x)
    explainer = onnxshap.DeepExplainer(model, background, device="cuda")
    assert explainer.runner.device == "cuda"
    values = explainer.shap_values(x)
    np.testing.assert_allclose(values, cpu, rtol=0, atol=1e-5 * np.abs(cpu).max())
    assert _additivity(explainer, x, values) <= 1e-4
