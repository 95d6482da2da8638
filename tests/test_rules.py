"""Every DeepLIFT rule on its own hand-built ONNX graph (the table in ``rule_specs.py``), seeds 0, 1, 2.

Each spec is run through a few checkers; the explainers of one (spec, seed) are built once and shared:

* **additivity** (every spec): with one reference and with m = 3, ``Σ_features φ = f(x) − mean_r f(r)`` for
  every row and output, ``f`` evaluated independently by ONNX Runtime on the spec graph.
* **finite differences** (every spec): explaining ``x = r + δ·u`` (δ = 1e-3, u random signs) against the
  single reference ``r``, the multipliers ``φ / (x − r)`` approach the Jacobian; the reference Jacobian is
  taken by central differences of the float64 copy of the graph at the midpoint ``(x + r)/2``, where every
  rule's multiplier is the Jacobian to O(δ²) (a secant of a smooth function is its slope at the midpoint to
  O(δ²), and so are products, quotients and chains of them).
* **exact linear values** (``LINEAR``): ``φ = J ⊙ (x − mean r)`` with ``J`` read off the graph by running it
  on basis vectors (it is affine), no differences of nearby points involved.
* **brute-force Shapley** (``SHAPLEY``): every feature of every input is a player; the exact Shapley value of
  ``v(S) = f(x_S, r_rest)`` over all 2^D coalitions, averaged over the references. For these graphs every
  output is a sum of two-player games, where Deep SHAP's product / division / four-corner rules are exact.
* **bilinear closed form** (``BILINEAR``): ``φ_A = ΔA ⊙ (M_Z·((B_x + B_r)/2)ᵀ)`` and its mirror (DESIGN §3).

Plus: MaxPool against Captum's DeepLift, refusals, and a coverage check that every rule and every op of
``DERIVATIVES`` has a line in the table.

Tolerances
----------
``ADD_TOL = 1e-5``: additivity is exact by construction, so only float32 rounding remains: a sum of at most
~100 float32 terms of size ≤ ~10 (≈ 1e-6) against ONNX Runtime's float32 forward pass (≈ 1e-7 relative).

``FD_TOL = 2e-3`` (relative to ``max(1, |J|)``): the engine runs in float32, and a multiplier is a secant
``(g(a_x) − g(a_r)) / (a_x − a_r)`` whose numerator carries the rounding of two float32 values of size
``|g| ≲ 4``: ``2 · 4 · 6e-8 / δ ≈ 5e-4`` per rescale, up to a few of them chained in one graph, ≈ 1e-3 (the
measured worst is printed by the test). O(δ²) truncation is ~1e-6. A wrong rule (wrong slope, a missing
factor ½, a gradient where a cross term belongs) is off by O(1).

``EXACT_TOL = 1e-5`` for linear and Shapley values, relative to each output's largest value (its own scale:
a wrong small output cannot hide behind a large one): float32 rounding of a few operations per value.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import rule_specs as rs

import onnxshap
from onnxshap.rules.elementwise import DERIVATIVES
from onnxshap.rules.registry import FAMILIES, supported_ops

SEEDS = (0, 1, 2)
N_SAMPLES = 4  # random rows explained against each background
M = 3  # background rows of the multi-reference explainer
N_FD = 3  # rows at x = r + δ·u explained against the single reference r
DELTA = 1e-3
FD_STEP = 1e-5  # central-difference step on the float64 graph (truncation ~1e-10, rounding ~1e-11)
FD_STEP_FLOAT32 = 3e-3  # on a float32 graph (ORT has no float64 kernel): truncation ~1e-5, rounding ~4e-5

ADD_TOL = 1e-5
FD_TOL = 2e-3
EXACT_TOL = 1e-5


# --------------------------------------------------------------------------------------------------
# running a spec
# --------------------------------------------------------------------------------------------------


class Forward:
    """ONNX Runtime on a spec graph: feeds → (rows, K), the flattened outputs concatenated (float64)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.dtype = np.float64 if model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE \
            else np.float32

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: np.ascontiguousarray(v, dtype=self.dtype) for k, v in feeds.items()}
        outs = self.session.run(None, feeds)
        return np.concatenate([o.reshape(o.shape[0], -1).astype(np.float64) for o in outs], axis=1)


@functools.cache
def forward32(name: str) -> Forward:
    return Forward(rs.ALL[name].model(np.float32))


@functools.cache
def reference_forward(name: str) -> tuple[Forward, float]:
    """The float64 graph and its FD step, or the float32 graph (with a larger step) where ORT lacks a
    float64 kernel for one of its ops."""
    spec = rs.ALL[name]
    try:
        forward = Forward(spec.model(np.float64))
        model = spec.model(np.float32)
        forward({i.name: np.zeros((1, *_shape(i)), np.float64) for i in model.graph.input})
        return forward, FD_STEP
    except Exception:  # noqa: BLE001 - "no kernel for type double" is raised as several ORT types
        return forward32(name), FD_STEP_FLOAT32


def _shape(value_info: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in value_info.type.tensor_type.shape.dim[1:])


@dataclass
class Run:
    """One (spec, seed): the data, and the values of the two explainers (one and M references)."""

    names: list[str]  # graph inputs, in order
    shapes: dict[str, tuple[int, ...]]
    x: dict[str, np.ndarray]  # (N_SAMPLES, ...)
    r1: dict[str, np.ndarray]  # (1, ...)
    x_fd: dict[str, np.ndarray]  # (N_FD, ...) = r1 + δ·u
    r3: dict[str, np.ndarray]  # (M, ...)
    values1: dict[str, np.ndarray]  # against r1, rows x then x_fd: (N_SAMPLES + N_FD, ..., K)
    values3: dict[str, np.ndarray]  # against r3, rows x: (N_SAMPLES, ..., K)
    explanations: list  # the Explanation objects (r1 then r3), for their reported fields

    @property
    def x1(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate([self.x[k], self.x_fd[k]]) for k in self.names}


def _explain(model, background, x):
    ex = onnxshap.DeepExplainer(model, background)
    exp = ex.explain(x, check_additivity=False)
    return exp if isinstance(exp, list) else [exp]


@functools.cache
def run(name: str, seed: int) -> Run:
    spec = rs.ALL[name]
    model = spec.model(np.float32)
    names = [i.name for i in model.graph.input]
    shapes = {i.name: _shape(i) for i in model.graph.input}
    rng = np.random.default_rng([seed, len(name), sum(map(ord, name))])

    def draw(rows: int) -> dict[str, np.ndarray]:
        return {k: spec.draw(rng, k, (rows, *shapes[k])) for k in names}

    x, r1, r3 = draw(N_SAMPLES), draw(1), draw(M)
    x_fd = {k: (r1[k] + DELTA * rng.choice([-1.0, 1.0], size=(N_FD, *shapes[k]))).astype(np.float32)
            for k in names}
    feeds = (lambda d: d[names[0]]) if len(names) == 1 else (lambda d: d)
    run_ = Run(names, shapes, x, r1, x_fd, r3, {}, {}, [])
    exp1 = _explain(model, feeds(r1), feeds(run_.x1))
    exp3 = _explain(model, feeds(r3), feeds(x))
    run_.values1 = {k: np.asarray(e.values, np.float64) for k, e in zip(names, exp1)}
    run_.values3 = {k: np.asarray(e.values, np.float64) for k, e in zip(names, exp3)}
    run_.explanations = exp1 + exp3
    return run_


def _flat(values: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """Per-input values (rows, *shape, K) → (rows, D, K), features of all inputs concatenated."""
    return np.concatenate([values[k].reshape(values[k].shape[0], -1, values[k].shape[-1]) for k in names],
                          axis=1)


def _flat_data(data: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([data[k].reshape(data[k].shape[0], -1).astype(np.float64) for k in names], axis=1)


def _unflat(flat: np.ndarray, run_: Run) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for k in run_.names:
        size = int(np.prod(run_.shapes[k], dtype=np.int64))
        out[k] = flat[:, start:start + size].reshape(flat.shape[0], *run_.shapes[k])
        start += size
    return out


def assert_scaled_close(actual, expected, tol: float, what: str, floor: float = 1e-6) -> float:
    """``|a − b| ≤ tol · max|b[..., j]|`` for each output j (last axis); returns the worst ratio."""
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != expected {b.shape}"
    k = b.shape[-1]
    scale = np.maximum(np.abs(b.reshape(-1, k)).max(0), floor)
    err = (np.abs(a - b).reshape(-1, k) / scale).max(0)
    worst = int(err.argmax())
    assert err[worst] <= tol, (f"{what}: output {worst} off by {err[worst]:.3g} of its scale "
                               f"{scale[worst]:.3g} (tolerance {tol:g})")
    return float(err.max())


# --------------------------------------------------------------------------------------------------
# 1. additivity
# --------------------------------------------------------------------------------------------------

def cases(specs) -> list:
    """(name, seed) parameters for ``specs``; a spec with ``xfail`` is expected to fail (strictly)."""
    return [pytest.param(s.name, seed, id=f"{s.name}-seed{seed}",
                         marks=[pytest.mark.xfail(reason=s.xfail, strict=True)] if s.xfail else [])
            for s in specs for seed in SEEDS]


def _check_additivity(values: dict[str, np.ndarray], names, fx: np.ndarray, base: np.ndarray, what: str):
    total = _flat(values, names).sum(axis=1)
    change = fx - base
    err = np.abs(total - change) / np.maximum(1.0, np.abs(change))
    row, out = np.unravel_index(err.argmax(), err.shape)
    assert err.max() <= ADD_TOL, (f"{what}: Σφ − (f(x) − E f(r)) off by {err.max():.3g} (row {row}, output "
                                  f"{out}: Σφ = {total[row, out]:.6g}, Δf = {change[row, out]:.6g})")


@pytest.mark.parametrize("name,seed", cases(rs.ALL.values()))
def test_additivity(name, seed):
    """Σ_features φ == f(x) − mean_r f(r) per row and output, with one reference and with M = 3."""
    r = run(name, seed)
    f = forward32(name)
    _check_additivity(r.values1, r.names, f(r.x1), f(r.r1)[0], "one reference")
    _check_additivity(r.values3, r.names, f(r.x), f(r.r3).mean(axis=0), f"{M} references")
    # what the Explanation reports agrees with the independent forward pass
    exp3 = r.explanations[len(r.names)]
    np.testing.assert_allclose(exp3.predictions, f(r.x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.broadcast_to(exp3.base_values, f(r.x).shape),
                               np.broadcast_to(f(r.r3).mean(axis=0), f(r.x).shape), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(exp3.additivity_error) <= 10 * ADD_TOL)


# --------------------------------------------------------------------------------------------------
# 2. finite differences as x → r
# --------------------------------------------------------------------------------------------------


def jacobian(forward: Forward, point: dict[str, np.ndarray], names, step: float) -> np.ndarray:
    """Central differences at one point (rows of 1): (K, D), D = features of all inputs."""
    base = _flat_data(point, names)[0]
    d = base.size
    rows = np.concatenate([base + step * np.eye(d), base - step * np.eye(d)])
    sizes = [int(np.prod(point[k].shape[1:], dtype=np.int64)) for k in names]
    feeds, start = {}, 0
    for k, size in zip(names, sizes):
        feeds[k] = rows[:, start:start + size].reshape(2 * d, *point[k].shape[1:])
        start += size
    out = forward(feeds)
    return ((out[:d] - out[d:]) / (2 * step)).T


FD_WORST: dict[str, float] = {}


@pytest.mark.parametrize("name,seed", cases(rs.ALL.values()))
def test_finite_differences(name, seed):
    """φ / (x − r) → ∂f/∂x at (x + r)/2 as x → r (float64 central differences of the spec graph)."""
    r = run(name, seed)
    forward, step = reference_forward(name)
    multipliers = _flat(r.values1, r.names)[N_SAMPLES:]  # (N_FD, D, K)
    delta = _flat_data(r.x_fd, r.names) - _flat_data(r.r1, r.names)  # exact: float32 values δ apart
    multipliers = multipliers / delta[:, :, None]
    worst = 0.0
    for i in range(N_FD):
        mid = {k: (r.x_fd[k][i:i + 1].astype(np.float64) + r.r1[k].astype(np.float64)) / 2 for k in r.names}
        jac = jacobian(forward, mid, r.names, step).T  # (D, K)
        scale = max(1.0, float(np.abs(jac).max()))
        err = np.abs(multipliers[i] - jac).max() / scale
        worst = max(worst, err)
        feature, out = np.unravel_index(np.abs(multipliers[i] - jac).argmax(), jac.shape)
        assert err <= FD_TOL, (f"FD row {i}: multiplier of feature {feature} for output {out} is "
                               f"{multipliers[i][feature, out]:.6g}, Jacobian {jac[feature, out]:.6g} "
                               f"(error {err:.3g} of max(1, |J|) = {scale:.3g})")
    FD_WORST[name] = max(FD_WORST.get(name, 0.0), worst)
    print(f"{name} seed {seed}: worst FD error {worst:.2e} (reference step {step:g})")


# --------------------------------------------------------------------------------------------------
# 3. exact linear values
# --------------------------------------------------------------------------------------------------

def linear_jacobian(name: str, run_: Run) -> np.ndarray:
    """(K, D) of an affine graph: f(e_i) − f(0), in float64 where ORT has the kernels."""
    forward, _ = reference_forward(name)
    d = sum(int(np.prod(run_.shapes[k], dtype=np.int64)) for k in run_.names)
    rows = np.concatenate([np.zeros((1, d)), np.eye(d)])
    out = forward(_unflat(rows, run_))
    return (out[1:] - out[:1]).T


@pytest.mark.parametrize("name,seed", cases(rs.LINEAR))
def test_linear_values_exact(name, seed):
    """For an affine graph φ[i, j] = J[j, i] · (x_i − mean_r r_i) exactly (one and M references)."""
    r = run(name, seed)
    jac = linear_jacobian(name, r)
    for values, x, ref, what in ((r.values3, r.x, r.r3, f"{M} references"),
                                 (r.values1, r.x1, r.r1, "one reference")):
        delta = _flat_data(x, r.names) - _flat_data(ref, r.names).mean(axis=0)
        expected = delta[:, :, None] * jac.T[None]
        assert_scaled_close(_flat(values, r.names), expected, EXACT_TOL, what)


# --------------------------------------------------------------------------------------------------
# 4. brute-force Shapley and the bilinear closed form
# --------------------------------------------------------------------------------------------------

def brute_force_shapley(forward: Forward, x: np.ndarray, refs: np.ndarray, run_: Run) -> np.ndarray:
    """Exact Shapley values of ``v(S) = f(x on S, r elsewhere)``, averaged over references: (n, D, K)."""
    n, d = x.shape
    masks = np.array(list(itertools.product([0, 1], repeat=d)), dtype=bool)  # (2^d, d)
    weights = np.array([math.factorial(s) * math.factorial(d - s - 1) / math.factorial(d) for s in range(d)])
    phi = 0.0
    for ref in refs:
        rows = np.where(masks[None], x[:, None], ref[None, None])  # (n, 2^d, d)
        v = forward(_unflat(rows.reshape(-1, d), run_)).reshape(n, len(masks), -1)
        index = masks @ (1 << np.arange(d - 1, -1, -1))  # row of each coalition
        lookup = np.empty(len(masks), dtype=np.int64)
        lookup[index] = np.arange(len(masks))
        contrib = np.zeros((n, d, v.shape[-1]))
        for i in range(d):
            bit = 1 << (d - 1 - i)
            without = masks[:, i] == 0
            size = masks[without].sum(axis=1)
            gain = v[:, lookup[index[without] | bit]] - v[:, without]
            contrib[:, i] = np.einsum("s,nsk->nk", weights[size], gain)
        phi = phi + contrib
    return phi / len(refs)


@pytest.mark.parametrize("name,seed", cases(rs.SHAPLEY))
def test_brute_force_shapley(name, seed):
    """Product, division, Max/Min, Pow with two variable inputs and a bilinear MatMul: each output is a
    two-player game per pair, where Deep SHAP equals the exact Shapley value (one and M references)."""
    r = run(name, seed)
    f = forward32(name)
    for values, x, refs, what in ((r.values1, r.x1, r.r1, "one reference"), (r.values3, r.x, r.r3,
                                                                             f"{M} references")):
        expected = brute_force_shapley(f, _flat_data(x, r.names), _flat_data(refs, r.names), r)
        assert_scaled_close(_flat(values, r.names), expected, EXACT_TOL, f"Shapley, {what}", floor=1.0)


@pytest.mark.parametrize("name,seed", cases(rs.BILINEAR))
def test_bilinear_closed_form(name, seed):
    """Z = A·B with both variable: φ_A[.., i, k; (.., i, l)] = ΔA_ik · (B_x + B_r)_kl / 2, mirrored for B,
    averaged over references (DESIGN.md §3)."""
    r = run(name, seed)
    for values, x, refs, what in ((r.values1, r.x1, r.r1, "one reference"), (r.values3, r.x, r.r3,
                                                                             f"{M} references")):
        a_x, b_x = (x[k].astype(np.float64)[:, None] for k in ("a", "b"))  # (n, 1, ...)
        a_r, b_r = (refs[k].astype(np.float64)[None] for k in ("a", "b"))  # (1, m, ...)
        b_mean, a_mean = (b_x + b_r) / 2, (a_x + a_r) / 2  # (n, m, ..., q, s), (n, m, ..., p, q)
        n, lead, (p, q), s = a_x.shape[0], a_x.shape[2:-2], a_x.shape[-2:], b_x.shape[-1]
        k = int(np.prod(lead, dtype=np.int64)) * p * s
        want_a, want_b = np.zeros((n, *lead, p, q, k)), np.zeros((n, *lead, q, s, k))
        for o, (*idx, i, l) in enumerate(np.ndindex(*lead, p, s)):
            idx = tuple(idx)
            want_a[(slice(None), *idx, i, slice(None), o)] = (
                (a_x - a_r)[(slice(None), slice(None), *idx, i)] * b_mean[(slice(None), slice(None), *idx, slice(None), l)]
            ).mean(axis=1)
            want_b[(slice(None), *idx, slice(None), l, o)] = (
                a_mean[(slice(None), slice(None), *idx, i)] * (b_x - b_r)[(slice(None), slice(None), *idx, slice(None), l)]
            ).mean(axis=1)
        assert_scaled_close(values["a"], want_a, EXACT_TOL, f"φ_A, {what}")
        assert_scaled_close(values["b"], want_b, EXACT_TOL, f"φ_B, {what}")
