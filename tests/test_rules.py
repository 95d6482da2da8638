"""Every DeepLIFT rule on its own hand-built ONNX graph (the table in ``rule_specs.py``), seeds 0, 1, 2.

Each spec is run through a few checkers; the explainers of one (spec, seed) are built once and shared:

* **additivity** (every spec): with one reference and with m = 3, ``Σ_features φ = f(x) − mean_r f(r)`` for
  every row and output, ``f`` evaluated independently by ONNX Runtime on the spec graph.
* **finite differences** (every spec): explaining ``x = r + δ·u`` (δ = 1e-3, u random signs) against the
  single reference ``r``, the multipliers ``φ / (x − r)`` approach the Jacobian; the reference Jacobian is
  taken by central differences of the float64 copy of the graph at the midpoint ``(x + r)/2``, where every
  rule's multiplier is the Jacobian to O(δ²) (a secant of a smooth function, and the average of its end-point
  slopes, is its slope at the midpoint to O(δ²); so are products, quotients and chains of them).
* **zero at the reference**: explaining ``r`` against ``r`` gives exactly 0, and never inf or NaN.
* **rows are independent**: one row explained alone gets the values it had in a batch.
* **exact linear values** (``LINEAR``): ``φ = J ⊙ (x − mean r)`` with ``J`` read off the graph by running it
  on basis vectors (it is affine), no differences of nearby points involved.
* **brute-force Shapley** (``SHAPLEY``): every feature of every input is a player; the exact Shapley value of
  ``v(S) = f(x_S, r_rest)`` over all 2^D coalitions, averaged over the references. For these graphs every
  output is a sum of two-player games, where Deep SHAP's product / division / four-corner rules are exact.
* **bilinear closed form** (``BILINEAR``): ``φ_A = ΔA ⊙ (M_Z·((B_x + B_r)/2)ᵀ)`` and its mirror (DESIGN §3).

Plus: MaxPool against Captum's DeepLift, refusals (one error naming every unsupported node), and a coverage
check that every entry of the op table has a line in the spec table, and that its rule (or, for the rescale
family, its derivative) really runs on it.

Tolerances
----------
``ADD_TOL = 1e-5``: additivity is exact by construction up to float32 rounding: a sum of at most ~100 float32
terms of size ≤ ~10 (≈ 1e-6) against ONNX Runtime's float32 forward pass (≈ 1e-7 relative), plus where a
rescale takes the slope instead of the secant, at most 4 ulp of the rescaled value (``rescale_factor``).

``FD_TOL = 2e-3`` (relative to ``max(1, |J|)``; measured worst 1.6e-4): at ``x → r`` the engine's multipliers
are its derivative formulas wherever the float32 secant is no more accurate (``rules/elementwise.py``), else
secants whose numerators carry a few ulp of rounding of values ``|g| ≲ 4`` (ONNX Runtime's float32 tanh/erf
kernels are approximations of about that accuracy): ``≲ 4 · 4 · 6e-8 / δ ≈ 1e-3``. The float32 FD reference
(ops without float64 kernels in ONNX Runtime) adds ``6e-8·|f| / 3e-3 ≈ 1e-4``; O(δ²) truncation is ~1e-6.
A wrong rule (wrong slope, a missing factor ½, a gradient where a cross term belongs) is off by O(1).

``EXACT_TOL = 1e-5`` for linear and Shapley values, relative to each output's largest value (its own scale:
a wrong small output cannot hide behind a large one): float32 rounding of a few operations per value.
"""

from __future__ import annotations

import dataclasses
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
from onnxshap.rules import TABLE, Family

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
        options.intra_op_num_threads = 1  # tiny graphs: a thread pool costs more than it saves
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.dtype = np.float64 if model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE \
            else np.float32

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        rows = next(iter(feeds.values())).shape[0]
        # one row is run as two: a graph may drop a batch axis of size 1 (Squeeze without axes)
        feeds = {k: np.ascontiguousarray(np.repeat(v, 2, axis=0) if rows == 1 else v, dtype=self.dtype)
                 for k, v in feeds.items()}
        outs = self.session.run(None, feeds)
        return np.concatenate([o.reshape(o.shape[0], -1).astype(np.float64) for o in outs], axis=1)[:rows]


@functools.cache
def forward32(name: str) -> Forward:
    return Forward(rs.ALL[name].reference_model(np.float32))


@functools.cache
def reference_forward(name: str) -> tuple[Forward, float]:
    """The float64 graph and its FD step, or the float32 graph (with a larger step) where ORT lacks a
    float64 kernel for one of its ops."""
    spec = rs.ALL[name]
    try:
        forward = Forward(spec.reference_model(np.float64))
        model = spec.reference_model(np.float32)
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
    values1: dict[str, np.ndarray]  # against r1, rows x, x_fd, r1: (N_SAMPLES + N_FD + 1, ..., K)
    values3: dict[str, np.ndarray]  # against r3, rows x: (N_SAMPLES, ..., K)
    explanation3: onnxshap.Explanation  # against r3 (the first explained input's), for its reported fields
    alone3: dict[str, np.ndarray]  # against r3, row 1 of x explained on its own: (1, ..., K)

    @property
    def x1(self) -> dict[str, np.ndarray]:
        """The rows explained against r1: x, then x_fd, then r1 itself."""
        return _rows_against_r1(self.x, self.x_fd, self.r1)


def _rows_against_r1(x: dict, x_fd: dict, r1: dict) -> dict[str, np.ndarray]:
    return {k: np.concatenate([x[k], x_fd[k], r1[k]]) for k in x}


def _explain(model: onnx.ModelProto, background, x):
    """(explainer, one Explanation per explained input)."""
    ex = onnxshap.DeepExplainer(model, background)
    exp = ex.explain(x, check_additivity=False)
    return ex, exp if isinstance(exp, list) else [exp]


@functools.cache
def run(name: str, seed: int) -> Run:
    """Draw the data of (spec, seed) and explain it with both explainers (built once, shared by all checks)."""
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
    x1 = _rows_against_r1(x, x_fd, r1)
    _, exp1 = _explain(model, feeds(r1, names), feeds(x1, names))
    explainer3, exp3 = _explain(model, feeds(r3, names), feeds(x, names))
    alone = explainer3.explain(feeds({k: v[1:2] for k, v in x.items()}, names), check_additivity=False)
    return Run(names, shapes, x, r1, x_fd, r3,
               values1={k: np.asarray(e.values, np.float64) for k, e in zip(names, exp1)},
               values3={k: np.asarray(e.values, np.float64) for k, e in zip(names, exp3)},
               explanation3=exp3[0],
               alone3={k: np.asarray(e.values, np.float64)
                       for k, e in zip(names, alone if isinstance(alone, list) else [alone])})


def feeds(data: dict[str, np.ndarray], names: list[str]):
    """The explainer's input form: one array for a one-input graph, else the dict."""
    return data[names[0]] if len(names) == 1 else data


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
    """(name, seed) parameters for ``specs``, with readable ids; a spec's known failure is a strict xfail."""
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
    exp3 = r.explanation3
    np.testing.assert_allclose(exp3.predictions, f(r.x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.broadcast_to(exp3.base_values, f(r.x).shape),
                               np.broadcast_to(f(r.r3).mean(axis=0), f(r.x).shape), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(exp3.additivity_error) <= 10 * ADD_TOL)


@pytest.mark.parametrize("name,seed", cases(rs.ALL.values()))
def test_rows_are_independent(name, seed):
    """Explaining one row alone gives that row's values from the batch (to float32 rounding, relative to the
    values' own scale: ONNX Runtime may pick other kernels for another batch size — the forward pass runs on
    samples and references stacked, so a lone row changes the batch — and a batch of one is where a graph may
    lose its batch axis)."""
    r = run(name, seed)
    for k in r.names:
        scale = np.abs(r.values3[k]).max()
        np.testing.assert_allclose(r.alone3[k], r.values3[k][1:2], rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("name,seed", cases(rs.ALL.values()))
def test_zero_at_the_reference(name, seed):
    """Explaining the reference itself gives exactly 0 for every feature and output (finite: a multiplier
    where Δ = 0 must not be inf or NaN, e.g. the slope of √ at 0)."""
    r = run(name, seed)
    for k in r.names:
        at_reference = r.values1[k][-1]
        assert np.all(np.isfinite(at_reference)), f"non-finite values for input {k} at x = r"
        assert np.abs(at_reference).max() == 0.0, f"input {k}: φ(r; r) = {np.abs(at_reference).max():.3g} ≠ 0"


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


@pytest.mark.parametrize("name,seed", cases(rs.ALL.values()))
def test_finite_differences(name, seed):
    """φ / (x − r) → ∂f/∂x at (x + r)/2 as x → r (float64 central differences of the spec graph)."""
    r = run(name, seed)
    forward, step = reference_forward(name)
    multipliers = _flat(r.values1, r.names)[N_SAMPLES:N_SAMPLES + N_FD]  # (N_FD, D, K)
    delta = _flat_data(r.x_fd, r.names) - _flat_data(r.r1, r.names)  # exact: float32 values δ apart
    multipliers = multipliers / delta[:, :, None]
    worst = 0.0
    for i in range(N_FD):
        mid = {k: (r.x_fd[k][i:i + 1].astype(np.float64) + r.r1[k].astype(np.float64)) / 2 for k in r.names}
        jac = jacobian(forward, mid, r.names, step).T  # (D, K)
        scale = max(1.0, float(np.abs(jac).max()))
        # the reference checks itself: doubling the step must not move it by more than its own error budget
        # (float32 rounding of a float32 reference is ~6e-8·|f|/step ≲ 2e-4; a kernel computing in float32
        # inside a float64 graph would move it by ~1e-2 and show here, not as an engine error)
        wobble = np.abs(jacobian(forward, mid, r.names, 2 * step).T - jac).max() / scale
        assert wobble <= FD_TOL / 4, f"FD reference unreliable at step {step:g}: moves by {wobble:.3g}"
        err = np.abs(multipliers[i] - jac).max() / scale
        worst = max(worst, err)
        feature, out = np.unravel_index(np.abs(multipliers[i] - jac).argmax(), jac.shape)
        assert err <= FD_TOL, (f"FD row {i}: multiplier of feature {feature} for output {out} is "
                               f"{multipliers[i][feature, out]:.6g}, Jacobian {jac[feature, out]:.6g} "
                               f"(error {err:.3g} of max(1, |J|) = {scale:.3g})")
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
        all_ = slice(None)
        for o, (*idx, i, l) in enumerate(np.ndindex(*lead, p, s)):  # noqa: E741 - Z[i, l] as in DESIGN  # output o = Z[.., i, l]
            at = tuple(idx)
            gain_a = (a_x - a_r)[(all_, all_, *at, i)] * b_mean[(all_, all_, *at, all_, l)]  # (n, m, q)
            gain_b = a_mean[(all_, all_, *at, i)] * (b_x - b_r)[(all_, all_, *at, all_, l)]  # (n, m, q)
            want_a[(all_, *at, i, all_, o)] = gain_a.mean(axis=1)
            want_b[(all_, *at, all_, l, o)] = gain_b.mean(axis=1)
        assert_scaled_close(values["a"], want_a, EXACT_TOL, f"φ_A, {what}")
        assert_scaled_close(values["b"], want_b, EXACT_TOL, f"φ_B, {what}")


def test_squeeze_without_axes_keeps_a_batch_of_one():
    """``torch.squeeze()`` exports Squeeze without axes, which on one row squeezes the batch too; lowered with
    explicit axes, one row is explained like any other (3 references, so the explainer accepts it)."""
    model = rs.ALL["squeeze_no_axes"].model()
    rng = np.random.default_rng(0)
    x, refs = rng.normal(size=(1, 1, 4, 1)).astype(np.float32), rng.normal(size=(3, 1, 4, 1)).astype(np.float32)
    _, (exp,) = _explain(model, refs, x)
    assert exp.values.shape == (1, 1, 4, 1, 4)
    expected = np.eye(4) * (x - refs.mean(axis=0)).reshape(4)[:, None]  # φ[i, j] = δ_ij (x_i − mean r_i)
    np.testing.assert_allclose(np.asarray(exp.values).reshape(4, 4), expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# 5. MaxPool against Captum's DeepLift
# --------------------------------------------------------------------------------------------------


def _maxpool_flatten(g: rs.Graph) -> str:
    return g("Flatten", g("MaxPool", g.input("x", 2, 4, 6), kernel_shape=[2, 2], strides=[2, 2]), axis=1)


@pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")
@pytest.mark.parametrize("seed", SEEDS)
def test_maxpool_matches_captum(seed):
    """``MaxPool(2)`` + flatten == Captum's ``DeepLift`` on ``nn.Sequential(nn.MaxPool2d(2), nn.Flatten())``
    with one reference, output by output (non-overlapping windows, the same inputs).

    Captum's ``maxpool`` hook is the cross-max rule: ``c = max(z_x, z_r)``, ``M·(c − z_r)`` unpooled to the
    x argmax and ``M·(z_x − c)`` to the r argmax, divided by Δ (the gradient where ``|Δ| < 1e-10``; the data
    has no such element). The reference runs in float64 and must be additive.
    """
    torch = pytest.importorskip("torch")
    captum_attr = pytest.importorskip("captum.attr")
    spec = rs.Spec("maxpool_captum", _maxpool_flatten, rs.distinct)
    rng = np.random.default_rng([seed, 7])
    x = spec.draw(rng, "x", (4, 2, 4, 6))
    r = spec.draw(rng, "x", (1, 2, 4, 6))
    values = np.asarray(_explain(spec.model(), r, x)[1][0].values, np.float64)
    k = values.shape[-1]
    module = torch.nn.Sequential(torch.nn.MaxPool2d(2), torch.nn.Flatten()).double().eval()
    deeplift = captum_attr.DeepLift(module)
    xt, rt = torch.from_numpy(x.astype(np.float64)).requires_grad_(), torch.from_numpy(r.astype(np.float64))
    ref = np.stack([deeplift.attribute(xt, baselines=rt, target=j).detach().numpy() for j in range(k)], axis=-1)
    with torch.no_grad():
        change = (module(xt) - module(rt)).numpy()
    assert np.abs(ref.reshape(4, -1, k).sum(1) - change).max() <= 1e-12, "Captum is not additive here"
    assert_scaled_close(values, ref, EXACT_TOL, "onnxshap vs Captum DeepLift")


# --------------------------------------------------------------------------------------------------
# 6. refusals: one error naming every unsupported node
# --------------------------------------------------------------------------------------------------


def _refusal(build) -> tuple[onnx.ModelProto, str]:
    """The spec graph of ``build`` and the message of the UnsupportedModelError that explaining it raises."""
    model = rs.Spec("refusal", build).model()
    rng = np.random.default_rng(0)
    data = {i.name: rng.normal(size=(2, *_shape(i))).astype(np.float32) for i in model.graph.input}
    names = list(data)
    with pytest.raises(onnxshap.UnsupportedModelError) as info:
        onnxshap.DeepExplainer(model, feeds(data, names)).explain(feeds(data, names), check_additivity=False)
    return model, str(info.value)


def test_refuses_custom_domain_op():
    """``com.microsoft::Gelu`` (ONNX Runtime runs it) has no DeepLIFT rule: refused, named with its domain."""
    model, message = _refusal(lambda g: g("Gelu", g.input("x", 2, 3), domain="com.microsoft"))
    (node,) = model.graph.node
    assert node.name in message and "Gelu" in message and "com.microsoft" in message


@pytest.mark.parametrize("op_type,build", [
    ("TopK", lambda g: g("TopK", g.input("x", 2, 3), g.ints(2), outputs=2)[0]),
    ("CumSum", lambda g: g("CumSum", g.input("x", 2, 3), g.const(np.array(1, np.int64)))),
    ("Atan", lambda g: g("Atan", g.input("x", 2, 3))),
    ("LpNormalization", lambda g: g("LpNormalization", g.input("x", 2, 3), axis=-1)),
    ("ReduceProd", lambda g: g("ReduceProd", g.input("x", 2, 3), g.ints(-1))),
], ids=["TopK", "CumSum", "Atan", "LpNormalization", "ReduceProd"])
def test_refuses_op_without_rule(op_type, build):
    """An op with no rule (and no lowering) is refused by name and op type, never answered with a gradient."""
    model, message = _refusal(build)
    names = [n.name for n in model.graph.node if n.op_type == op_type]
    assert names and all(n in message for n in names) and op_type in message


def _reverse_prefix(g: rs.Graph) -> str:
    """Sequence lengths T − 1: every row reverses only its first two of three steps."""
    x = g.input("x", 3, 2)
    return g("ReverseSequence", x, rs.full_lengths(g, x, 0, 1, less=1), batch_axis=0, time_axis=1)


def _reverse_masked(g: rs.Graph) -> str:
    """Sequence lengths counted from the data (the steps whose first feature is positive): a padding mask."""
    x = g.input("x", 3, 2)
    first = g("Gather", x, g.const(np.array(0, np.int64)), axis=2)
    lengths = g("ReduceSum", g("Cast", g("Greater", first, g.const(0.0)), to=onnx.TensorProto.INT64), g.ints(1),
                keepdims=0)
    return g("ReverseSequence", x, lengths, batch_axis=0, time_axis=1)


@pytest.mark.parametrize("build,reason", [
    pytest.param(_reverse_prefix, "sequence lengths [2] differ from the 3 time steps", id="prefix"),
    pytest.param(_reverse_masked, "sequence lengths are computed from the input values", id="from_data"),
])
def test_refuses_reverse_sequence_of_a_prefix(build, reason):
    """ReverseSequence is lowered only where every row is reversed over all its steps; else refused by name."""
    model, message = _refusal(build)
    (node,) = [n for n in model.graph.node if n.op_type == "ReverseSequence"]
    assert node.name in message.splitlines()[0] and reason in message, message


def _no_rule_and_custom(g: rs.Graph) -> str:
    x = g.input("x", 2, 3)
    return g("Add", g("CumSum", x, g.const(np.array(2, np.int64))), g("Gelu", x, domain="com.microsoft"))


def _two_failed_checks(g: rs.Graph) -> list[str]:
    """A Where whose condition is computed from the input over two different sources, and a MaxPool whose
    Indices output is used: both have rules, and both rules' checks refuse."""
    a, b = g.input("a", 2, 3), g.input("b", 2, 3)
    chosen = g("Where", g("Greater", a, g.const(0.0)), a, b)
    pooled, indices = g("MaxPool", chosen, kernel_shape=[2], outputs=2)
    return [g("Flatten", pooled), indices]


def _two_unknown_ops_and_failed_check(g: rs.Graph) -> str:
    """Unknown ops are refused before lowering (cheaply: no probe), all of them at once; the plan's checks,
    which need probed shapes, speak once every op is known."""
    a, b = g.input("a", 2, 3), g.input("b", 2, 3)
    chosen = g("Where", g("Greater", a, g.const(0.0)), a, b)
    return g("Add", g("Atan", chosen), g("CumSum", a, g.const(np.array(2, np.int64))))


@pytest.mark.parametrize("build,refused", [
    pytest.param(_no_rule_and_custom, ("CumSum", "Gelu"), id="no_rule+custom_domain"),
    pytest.param(_two_failed_checks, ("Where", "MaxPool"), id="two_failed_checks"),
    pytest.param(_two_unknown_ops_and_failed_check, ("CumSum", "Atan"), id="two_unknown_ops_first"),
])
def test_one_error_lists_every_unsupported_node(build, refused):
    """Two unsupported nodes in one graph → one UnsupportedModelError naming both nodes and op types."""
    model, message = _refusal(build)
    nodes = {n.name: n.op_type for n in model.graph.node if n.op_type in refused}
    assert sorted(nodes.values()) == sorted(refused)
    for name, op_type in nodes.items():
        assert name in message and op_type in message, f"{name} ({op_type}) missing from:\n{message}"


# --------------------------------------------------------------------------------------------------
# 7. the table covers every rule
# --------------------------------------------------------------------------------------------------

def _swept_entries() -> dict[str, object]:
    """Table entries the sweep runs: all but the zero family (its outputs are shape plumbing, folded before
    the sweep, or integers the sweep refuses outside elementwise regions) and the lowered ops."""
    return {op: e for op, e in TABLE.items() if e.family not in (Family.ZERO, Family.LOWERED)}


def test_every_rule_has_a_spec():
    """Every swept entry of the op table appears in some spec graph."""
    covered = {n.op_type for spec in rs.ALL.values() for n in spec.model().graph.node}
    missing = sorted(set(_swept_entries()) - covered)
    assert not missing, f"ops without a spec: {missing}"


def test_every_rule_runs_on_its_specs(monkeypatch):
    """Building the augmented graph of every spec calls every swept entry's rule — or, for the rescale family
    (no node rule), its derivative: an entry that is listed but never runs is caught."""
    ran: set[str] = set()

    def recording(op: str, function):
        def wrapper(*args, **kwargs):
            ran.add(op)
            return function(*args, **kwargs)

        return wrapper

    for op, entry in _swept_entries().items():
        function = "rule" if entry.rule is not None else "derivative"
        recorded = dataclasses.replace(entry, **{function: recording(op, getattr(entry, function))})
        monkeypatch.setitem(TABLE, op, recorded)
    for spec in rs.ALL.values():
        model = spec.model(np.float32)
        rng = np.random.default_rng(0)
        data = {i.name: spec.draw(rng, i.name, (2, *_shape(i))) for i in model.graph.input}
        names = list(data)
        assert onnxshap.DeepExplainer(model, feeds(data, names)).augmented.proto.graph.node
    assert not set(_swept_entries()) - ran, f"entries that never ran: {sorted(set(_swept_entries()) - ran)}"
