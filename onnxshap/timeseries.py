"""Time-series views of SHAP values, and the perturbation-sensitivity baseline people use on RNNs.

Values of a sequence model are shaped ``(n, T, F)`` per explained output (``(n, T, F, k)`` for k outputs):
``variable_importance`` reduces them to one number per input variable, ``time_step_importance`` to one per
time step (lag), both as the mean of ``|φ|``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxshap.errors import InputDataError


def _sequence_values(values) -> np.ndarray:
    values = np.asarray(getattr(values, "values", values), dtype=np.float64)
    if values.ndim == 3:
        values = values[..., None]
    if values.ndim != 4:
        raise InputDataError(f"time-series values must be (n, T, F) or (n, T, F, k); got shape {values.shape}")
    return values


def variable_importance(values, names: Sequence[str] | None = None) -> dict[str, float] | np.ndarray:
    """Mean ``|φ|`` per variable over samples, time steps and explained outputs.

    Args:
        values: ``(n, T, F[, k])`` SHAP values, or an Explanation.
        names: variable names; when given, a dict name → importance sorted by importance.
    """
    importance = np.abs(_sequence_values(values)).mean(axis=(0, 1, 3))
    return _named(importance, names)


def time_step_importance(values) -> np.ndarray:
    """Mean ``|φ|`` per time step over samples, variables and explained outputs: shape (T,)."""
    return np.abs(_sequence_values(values)).mean(axis=(0, 2, 3))


def perturbation_sensitivity(predict, X, *, sigma: float | Sequence[float] | None = None, repeats: int = 10,
                             seed: int = 0, names: Sequence[str] | None = None):
    """RMS change of the prediction when one variable at a time gets Gaussian noise.

    For each variable ``v``: ``X'[:, :, v] = X[:, :, v] + N(0, σ_v)`` (all time steps), the others untouched;
    the score is ``sqrt(mean((f(X') − f(X))²))`` over rows, outputs and ``repeats`` draws.

    Args:
        predict: a callable ``X → (n, k)`` predictions, e.g. ``DeepExplainer.predict`` (the same ONNX Runtime
            session the explanation uses).
        X: ``(n, T, F)`` data.
        sigma: noise scale per variable (or one for all); default: each variable's standard deviation in ``X``.
        repeats: noise draws per variable.
        seed: seed of the noise generator.
        names: variable names; when given, a dict name → score.
    """
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 3:
        raise InputDataError(f"perturbation_sensitivity needs (n, T, F) data; got shape {X.shape}")
    features = X.shape[2]
    scale = X.reshape(-1, features).std(axis=0) if sigma is None else np.broadcast_to(
        np.asarray(sigma, dtype=np.float64), (features,))
    rng = np.random.default_rng(seed)
    base = np.asarray(predict(X), dtype=np.float64)
    scores = np.zeros(features)
    for v in range(features):
        squared = []
        for _ in range(repeats):
            noisy = X.copy()
            noisy[:, :, v] += rng.normal(0.0, scale[v], size=noisy.shape[:2]).astype(np.float32)
            squared.append((np.asarray(predict(noisy), dtype=np.float64) - base) ** 2)
        scores[v] = float(np.sqrt(np.mean(squared)))
    return _named(scores, names)


def _named(scores: np.ndarray, names: Sequence[str] | None):
    if names is None:
        return scores
    if len(names) != len(scores):
        raise InputDataError(f"{len(names)} names for {len(scores)} variables")
    order = np.argsort(-scores, kind="stable")
    return {str(names[i]): float(scores[i]) for i in order}
