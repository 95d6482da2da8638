"""The invariants the property suite holds every drawn graph to, and the regression files (not tests).

:func:`check_case` runs, on one :class:`graph_strategies.Case` (model, samples x, background R, spare row):

1. **finite**: values, expected values and predictions are never NaN or Inf.
2. **additivity**: ``Σ_features φ = f(x) − mean_r f(r)`` for every row and output, ``f`` run by ONNX Runtime
   on the original graph (not onnxshap's lowered copy).
3. **rows**: replacing one sample row leaves every other row's values unchanged.
4. **references** (optional: three more explainers): a permuted background gives the same values; two copies
   of one reference give the values of that reference alone (DESIGN §5.4).
5. **linear values** (affine graphs): ``φ[i, f, o] = J[o, f] · (x_if − mean_r r_f)``, ``J`` taken in float64
   by ONNX's reference evaluator (numpy) on a float64 copy of the graph.

Scales and tolerances. Each output o has its own scale ``s_o = max(|f_o(x_i)|, |f_o(r_j)|)`` over the rows of
the case, so a small output is checked at its own size (issue 8: ``1e-4 · max(1, |Δf|)`` let 100 % errors pass
on outputs that move by 1e-5).

- ``ADD_TOL = 1e-5``: additivity within ``1e-5 · s_o + NOISE_FACTOR · noise_o``. ``1e-5`` is the budget of
  ``test_rules.ADD_TOL``: a sum of ≲ 200 float32 terms, each a few float32 operations on values of the
  output's size, against ONNX Runtime's float32 forward pass. ``noise_o = max |f32 − f64|`` over the rows is
  the forward pass's own rounding: where a graph cancels (``f`` small beside the terms it sums) float32 cannot
  know ``f`` better than that, and neither can values computed from the same float32 tensors
  (``NOISE_FACTOR = 100``: the sweep runs a few operations per forward operation). A wrong rule is off by
  O(1); the shared-shift softmax rule is off by 6.6e-4 at a logit gap of 16 (issue 8).
- A case whose float32 forward pass is itself off by more than ``NOISE_LIMIT = 1e-5 · s_o`` (a LogSoftmax
  of a near-certain class, a log of a sum that cancels; ~1 % of drawn cases) cannot be judged sharply in
  float32: it is rejected (a hypothesis ``reject``; outside hypothesis, e.g. replaying a stored regression, a
  failure). So the noise allowance is at most ``1e-3 · s_o`` and typically ~1e-5 (median noise 1e-7).
- ``SAME_TOL = 1e-5`` (permuted / repeated references: the mean over m is summed in another order) and
  ``ROW_TOL = 1e-6`` (the other rows run through the same kernels at the same batch size), relative to
  ``max(s_o, max |φ_o|)``; ``EXACT_TOL = 1e-5`` relative to the largest exact value, as in
  ``test_rules.EXACT_TOL``.

Regressions: :func:`save_case` writes a case as ``<hash>.onnx`` + ``<hash>.npz`` (plain arrays, no pickles:
``x:<input>``, ``background:<input>``, ``spare:<input>``, ``families``, ``linear``); :func:`load_case` reads
it back; :func:`keep_failures` stores the last failing case of a hypothesis run, which is the shrunk one
(hypothesis replays the minimal example last).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import hypothesis
import numpy as np
import onnx
from graph_strategies import Case
from onnx.reference import ReferenceEvaluator
from test_rules import Forward, assert_scaled_close, feeds

import onnxshap

ADD_TOL = 1e-5
NOISE_FACTOR = 100.0
NOISE_LIMIT = 1e-5
SAME_TOL = 1e-5
ROW_TOL = 1e-6
EXACT_TOL = 1e-5
TINY = float(np.finfo(np.float32).tiny)
REGRESSIONS = Path(__file__).parent / "regressions"


# --------------------------------------------------------------------------------------------------
# running onnxshap and the model
# --------------------------------------------------------------------------------------------------


def values_of(result) -> tuple[np.ndarray, onnxshap.Explanation]:
    """(values (n, D, K) float64, the features of every explained input concatenated; the first
    Explanation) of what ``DeepExplainer.explain`` returned."""
    explanations = result if isinstance(result, list) else [result]
    values = [np.asarray(e.values, np.float64) for e in explanations]
    return np.concatenate([v.reshape(v.shape[0], -1, v.shape[-1]) for v in values], axis=1), explanations[0]


def explain(case: Case, background: dict[str, np.ndarray], x: dict[str, np.ndarray]):
    """``values_of`` the explanation of ``x`` against ``background``."""
    explainer = onnxshap.DeepExplainer(case.model, feeds(background, case.names))
    return values_of(explainer.explain(feeds(x, case.names), check_additivity=False))


def flat_data(case: Case, data: dict[str, np.ndarray]) -> np.ndarray:
    """(rows, D) float64: the features of every input, concatenated in input order."""
    return np.concatenate([data[k].reshape(len(data[k]), -1).astype(np.float64) for k in case.names], axis=1)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in float64: float initializers widened (exactly), inputs/outputs retyped."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    del wide.graph.value_info[:]
    for tensor in wide.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            array = onnx.numpy_helper.to_array(tensor).astype(np.float64)
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    for value in [*wide.graph.input, *wide.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    return wide


def affine_jacobian(case: Case) -> np.ndarray:
    """(K, D) of an affine graph, ``f(e_i) − f(0)`` in float64 (numpy reference evaluator)."""
    evaluator = ReferenceEvaluator(to_float64(case.model))
    d = flat_data(case, case.x).shape[1]
    rows = np.concatenate([np.zeros((1, d)), np.eye(d)])
    inputs, start = {}, 0
    for name in case.names:
        shape = case.x[name].shape[1:]
        size = int(np.prod(shape, dtype=np.int64))
        inputs[name] = rows[:, start:start + size].reshape(d + 1, *shape)
        start += size
    outs = evaluator.run(None, inputs)
    out = np.concatenate([o.reshape(d + 1, -1) for o in outs], axis=1)
    return (out[1:] - out[:1]).T


# --------------------------------------------------------------------------------------------------
# the properties
# --------------------------------------------------------------------------------------------------


def check_finite(values: np.ndarray, explanation, fx: np.ndarray, fr: np.ndarray) -> None:
    assert np.isfinite(fx).all() and np.isfinite(fr).all(), "the drawn graph's forward pass is not finite"
    for what, array in (("values", values), ("expected values", explanation.base_values),
                        ("predictions", explanation.predictions)):
        bad = ~np.isfinite(np.asarray(array, np.float64))
        assert not bad.any(), f"{what}: {int(bad.sum())} NaN/Inf entries (first at {np.argwhere(bad)[0]})"


def output_scale(fx: np.ndarray, fr: np.ndarray) -> np.ndarray:
    """Per output: ``max(|f_o(x_i)|, |f_o(r_j)|)`` over the rows of the case (never 0)."""
    return np.maximum(np.maximum(np.abs(fx).max(axis=0), np.abs(fr).max(axis=0)), TINY)


def forward_noise(case: Case, fx: np.ndarray, fr: np.ndarray) -> np.ndarray:
    """Per output: the float32 forward pass's own rounding, ``max |f32 − f64|`` over the rows, the float64
    values from ONNX's reference evaluator (numpy) on a float64 copy of the graph.

    Where a graph cancels (``f`` small beside the terms it sums) the float32 forward pass cannot know ``f``
    better than this, and neither can values computed from the same float32 tensors.
    """
    evaluator = ReferenceEvaluator(to_float64(case.model))
    rows = {k: np.concatenate([case.x[k], case.background[k]]).astype(np.float64) for k in case.names}
    outs = evaluator.run(None, rows)
    exact = np.concatenate([o.reshape(o.shape[0], -1) for o in outs], axis=1)
    noise = np.abs(np.concatenate([fx, fr]) - exact).max(axis=0)
    scale = output_scale(fx, fr)
    worst = int((noise / scale).argmax())
    if noise[worst] > NOISE_LIMIT * scale[worst]:
        reject(f"ill-conditioned: float32 forward pass off by {noise[worst] / scale[worst]:.2g} of output "
               f"{worst}'s scale {scale[worst]:.3g}")
    return noise


def reject(reason: str) -> None:
    """Drop a case no float32 check can judge: a hypothesis rejection (counted in its statistics) inside a
    hypothesis run, a failure anywhere else (a stored regression must be judgeable)."""
    if hypothesis.currently_in_test_context():
        hypothesis.event(reason.split(":")[0])
        hypothesis.reject()
    raise AssertionError(reason)


def check_additivity(values: np.ndarray, fx: np.ndarray, fr: np.ndarray, noise: np.ndarray) -> float:
    """``|Σφ − (f(x) − mean f(R))| ≤ ADD_TOL · scale_o + NOISE_FACTOR · noise_o``; returns the worst
    error as a fraction of that tolerance."""
    change = fx - fr.mean(axis=0)
    error = np.abs(values.sum(axis=1) - change)
    scale = output_scale(fx, fr)
    tolerance = ADD_TOL * scale + NOISE_FACTOR * noise
    ratio = error / tolerance
    row, out = np.unravel_index(ratio.argmax(), ratio.shape)
    assert ratio.max() <= 1.0, (
        f"additivity: row {row}, output {out}: Σφ = {values.sum(axis=1)[row, out]:.7g}, f(x) − E f(R) = "
        f"{change[row, out]:.7g}, error {error[row, out]:.3g} = {error[row, out] / scale[out]:.3g} of the "
        f"output's scale {scale[out]:.3g} (tolerance {ADD_TOL:g} of it + {NOISE_FACTOR:g} × forward rounding "
        f"{noise[out]:.3g}); largest |φ| {np.abs(values[row, :, out]).max():.3g}")
    return float(ratio.max())


def assert_same(actual: np.ndarray, expected: np.ndarray, scale: np.ndarray, tol: float, what: str) -> None:
    """``|a − b| ≤ tol · max(scale_o, max |b_o|)`` per output o (last axis)."""
    k = expected.shape[-1]
    bound = np.maximum(scale, np.abs(expected).reshape(-1, k).max(axis=0))
    error = np.abs(actual - expected).reshape(-1, k).max(axis=0) / bound
    out = int(error.argmax())
    assert error[out] <= tol, f"{what}: output {out} off by {error[out]:.3g} of its scale {bound[out]:.3g} " \
                              f"(tolerance {tol:g})"


def check_references(case: Case, values: np.ndarray, scale: np.ndarray) -> None:
    """Background order does not matter; 2 copies of one reference equal that reference alone."""
    m = next(iter(case.background.values())).shape[0]
    if m > 1:
        order = np.roll(np.arange(m)[::-1], 1)  # no row keeps its place
        permuted, _ = explain(case, {k: v[order] for k, v in case.background.items()}, case.x)
        assert_same(permuted, values, scale, SAME_TOL, "background permuted vs original order")
    one = {k: v[:1] for k, v in case.background.items()}
    copies = {k: np.repeat(v[:1], 2, axis=0) for k, v in case.background.items()}
    alone, _ = explain(case, one, case.x)
    repeated, _ = explain(case, copies, case.x)
    assert_same(repeated, alone, scale, SAME_TOL, "2 copies of one reference vs that reference")


def check_rows(case: Case, explainer, values: np.ndarray, scale: np.ndarray) -> None:
    """Replacing the last sample row by the spare row leaves the other rows' values unchanged."""
    changed = {k: np.concatenate([v[:-1], case.spare[k]]) for k, v in case.x.items()}
    moved, _ = values_of(explainer.explain(feeds(changed, case.names), check_additivity=False))
    assert_same(moved[:-1], values[:-1], scale, ROW_TOL, "other rows after replacing the last row")


def check_linear_values(case: Case, values: np.ndarray) -> None:
    """φ[i, f, o] = J[o, f] · (x_if − mean_r r_f) on an affine graph."""
    jac = affine_jacobian(case)
    delta = flat_data(case, case.x) - flat_data(case, case.background).mean(axis=0)
    assert_scaled_close(values, delta[:, :, None] * jac.T[None], EXACT_TOL, "linear values vs J·(x − mean r)")


def check_case(case: Case, references: bool = True) -> None:
    """Every invariant on one case (raises AssertionError naming the first that fails); ``references=False``
    skips the background-order and repeated-reference checks (three more explainers: the costly part)."""
    forward = Forward(case.model)
    fx, fr = forward(case.x), forward(case.background)
    explainer = onnxshap.DeepExplainer(case.model, feeds(case.background, case.names))
    values, explanation = values_of(explainer.explain(feeds(case.x, case.names), check_additivity=False))
    check_finite(values, explanation, fx, fr)
    scale = output_scale(fx, fr)
    check_additivity(values, fx, fr, forward_noise(case, fx, fr))
    check_rows(case, explainer, values, scale)
    if references:
        check_references(case, values, scale)
    if case.linear:
        check_linear_values(case, values)


# --------------------------------------------------------------------------------------------------
# regressions
# --------------------------------------------------------------------------------------------------


def save_case(case: Case, directory: Path = REGRESSIONS) -> Path:
    """Write ``<hash>.onnx`` and ``<hash>.npz`` into ``directory``; returns the .onnx path."""
    arrays = {f"{part}:{name}": data[name] for part, data in (("x", case.x), ("background", case.background),
                                                             ("spare", case.spare)) for name in case.names}
    arrays["families"] = np.array(case.families, dtype=str)
    arrays["linear"] = np.array(case.linear)
    model_bytes = case.model.SerializeToString(deterministic=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    digest = hashlib.sha256(model_bytes + buffer.getvalue()).hexdigest()[:16]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{digest}.onnx"
    path.write_bytes(model_bytes)
    path.with_suffix(".npz").write_bytes(buffer.getvalue())
    return path


def load_case(path: Path) -> Case:
    """The case stored by :func:`save_case` at ``path`` (the .onnx file)."""
    model = onnx.load(str(path))
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as stored:
        parts = {part: {key.split(":", 1)[1]: stored[key] for key in stored.files
                        if key.startswith(part + ":")} for part in ("x", "background", "spare")}
        families = tuple(str(f) for f in stored["families"])
        linear = bool(stored["linear"])
    return Case(model, families, parts["x"], parts["background"], parts["spare"], linear, note=path.name)


class FailureRecorder:
    """Remembers the last case that failed :func:`check_case` (during a hypothesis run: the shrunk one)."""

    def __init__(self) -> None:
        self.last: Case | None = None

    def check(self, case: Case, references: bool = True) -> None:
        try:
            check_case(case, references)
        except BaseException:
            self.last = case
            raise


@contextlib.contextmanager
def keep_failures(recorder: FailureRecorder, directory: Path = REGRESSIONS):
    """On failure, store ``recorder.last`` as a regression and name the file in the error."""
    try:
        yield recorder
    except BaseException as error:
        if recorder.last is not None:
            path = save_case(recorder.last, directory)
            error.add_note(f"shrunk failing case stored as {path} (replayed by test_regressions.py)")
        raise
