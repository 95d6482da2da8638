"""The additivity check: the SHAP values of every row must add up to its output's change, or we raise.

For row ``i`` and explained output ``o``, with ``Δf = f_o(x_i) − E f_o`` (the prediction minus the expected value
over the background) and ``S = Σ φ`` (over every feature of every explained tensor), the error is measured
relative to the output's own scale:

    error = |S − Δf| / scale,    scale = max(|Δf|, ROUNDING / TOLERANCE · (Σ|φ| + |f_o(x_i)| + E|f_o|), TINY)

and the row fails when ``error > TOLERANCE`` (1e-4), i.e. when ``|S − Δf|`` exceeds both ``1e-4 · |Δf|`` and
``ROUNDING · (Σ|φ| + |f(x)| + E|f|)`` with ``ROUNDING = 1e-6`` (about 8 float32 ulp). The second term is the float32
rounding the comparison itself carries: each (sample, reference) pair's values add up to ``f(x) − f(r)``, float32
numbers rounded relative to ``|f(x)| + |f(r)|`` (``E|f|`` is the mean of ``|f_o(r)|`` over the background: a
Ceil whose background outputs are 1, 0 and −1 has ``E f = 0`` but pair values of size 1), and the values are
float32 numbers whose sum may cancel (LogSoftmax of a shifted row: ``Σ|φ| ≈ 90`` for ``Δy ≈ 0``; legitimate
errors there are ~1e-5). Nothing in it is absolute, so

- a model whose outputs barely move is still checked: ``f ≈ 1``, ``Δf = 1e-5``, values of size ``Δf``: a value set
  that is 100 % wrong (``S = 2Δf`` or ``S = 0``) misses by ``1e-5`` against a tolerance of ``2e-6``;
- rescaling the model's output by any power of ten rescales every term alike;
- ``TINY`` (the smallest normal float64) only keeps ``0/0`` away when everything is exactly zero.

The ``ROUNDING`` term covers the rounding of the values and of ``f(x)``, ``E f`` as numbers, not the rounding
*inside* the float32 forward pass that computed them, which is set by the network's internal activations and can
dwarf ``|f|``: with inputs scaled by 1e-3, biases and position embeddings dominate MobileNetV2's, BERT's and
GPT-2's activations, and the float32 ``Δf`` misses torch's float64 one by 1.0e-4, 8.4e-5 and 1.1e-4 of
``max|Δf|`` while the values are within 1.9e-6, 2.9e-7 and 9.7e-8 of it. So rows over the tolerance are
checked again, with the same formula, against ``Δf⁶⁴ = f⁶⁴(x) − E f⁶⁴`` (and ``E|f⁶⁴|``) from the same lowered
model run in float64 (:mod:`onnxshap.forward64`; ``E f⁶⁴`` over the whole background once per explainer), and
only rows that fail that too raise. The error reported for a rechecked row is its float64 one; the predictions
and expected values stay the float32 model's outputs (what the model computes and what ``predict`` returns).
When the float64 forward pass cannot be built or run, the float32 verdict stands and its message says why. The
recheck runs only when a row fails: the normal path costs nothing.

NaN or Inf anywhere in the values, the predictions or the expected values is an error of its own (always, even
when the tolerance check is switched off): NaN is never a result, and ``NaN > tol`` is False.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxshap.errors import AdditivityError, OnnxShapError, first_line

TOLERANCE = 1e-4
ROUNDING = 1e-6
TINY = float(np.finfo(np.float64).tiny)


Recheck = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
BLOCK_BYTES = 1 << 22  # float64 copies of the values are made for one block of rows at a time


def _sums(values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(Σφ, Σ|φ|)`` per row and output, in float64, from arrays ``(n, *features, k)``."""
    flat = [v.reshape(v.shape[0], -1, v.shape[-1]).astype(np.float64) for v in values]
    return sum(f.sum(axis=1) for f in flat), sum(np.abs(f).sum(axis=1) for f in flat)


def additivity_errors(values: list[np.ndarray], predictions: np.ndarray, base: np.ndarray,
                      base_magnitude: np.ndarray | None = None) -> np.ndarray:
    """Per row and output: ``|Σφ − Δf| / scale`` (see the module docstring); NaN where anything is not finite.

    Computed a block of rows at a time, so the float64 temporaries stay small next to the values.

    Args:
        values: per explained tensor, the SHAP values ``(n, *features, k)``.
        predictions: ``f_o(x)`` per row and explained output, ``(n, k)``.
        base: ``E f_o`` per row and explained output, ``(n, k)``.
        base_magnitude: ``E|f_o|`` over the background, like ``base`` (default ``|base|``).
    """
    predictions, base = np.asarray(predictions), np.asarray(base)
    base_magnitude = np.abs(base) if base_magnitude is None else np.asarray(base_magnitude)
    errors = np.empty(predictions.shape, np.float64)
    features = max(int(np.prod(v.shape[1:], dtype=np.int64)) for v in values)
    rows = max(1, BLOCK_BYTES // (8 * max(1, features)))
    for start in range(0, predictions.shape[0], rows):
        block = slice(start, start + rows)
        errors[block] = _errors([v[block] for v in values], predictions[block], base[block], base_magnitude[block])
    return errors


def _errors(values: list[np.ndarray], predictions: np.ndarray, base: np.ndarray,
            base_magnitude: np.ndarray) -> np.ndarray:
    total, magnitude = _sums(values)
    predictions, base = predictions.astype(np.float64), base.astype(np.float64)
    base_magnitude = base_magnitude.astype(np.float64)
    change = predictions - base
    scale = np.maximum(np.abs(change), ROUNDING / TOLERANCE * (magnitude + np.abs(predictions) + base_magnitude))
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.abs(total - change) / np.maximum(scale, TINY)
    return np.where(np.isfinite(total) & np.isfinite(magnitude) & np.isfinite(change), error, np.nan)


def check_additivity(values: list[np.ndarray], predictions: np.ndarray, base: np.ndarray,
                     base_magnitude: np.ndarray | None = None, output_names: list[str] | None = None,
                     indices: np.ndarray | None = None, enforce: bool = True,
                     recheck: Recheck | None = None) -> np.ndarray:
    """The per-row error (max over outputs); raises :class:`AdditivityError` naming the first bad row.

    Non-finite values, predictions or expected values always raise; the tolerance only when ``enforce``. Rows over
    the tolerance are checked again against ``recheck``'s float64 forward pass when it is given (see the module
    docstring); their returned errors are then the float64 ones, and only rows failing those too raise.

    Args:
        values, predictions, base, base_magnitude: as for :func:`additivity_errors`.
        output_names: labels of the model's outputs (for the message), indexed by ``indices``.
        indices: ``(n, k)`` the model output each column explains (default: column number).
        recheck: ``rows -> (f64(x_rows) (r, K), E f64 (K,), E|f64| (K,))`` over all K model outputs
            (:meth:`onnxshap.forward64.Float64Reference.at` on the data); raises :class:`OnnxShapError` when
            the float64 forward pass cannot be built or run. Called only when a row fails.
    """
    errors = additivity_errors(values, predictions, base, base_magnitude)
    _raise_if_not_finite(values, predictions, base, errors, output_names, indices)
    per_row = errors.max(axis=1) if errors.size else np.zeros(errors.shape[0])
    if not (enforce and per_row.size and (per_row > TOLERANCE).any()):
        return per_row
    failing = np.flatnonzero(per_row > TOLERANCE)
    row = int(failing[0])
    column = int(errors[row].argmax())
    change = float(predictions[row, column]) - float(base[row, column])
    if recheck is None:
        raise _not_additive(values, row, column, change, per_row[row], "", output_names, indices)
    try:
        precise, changes = _precise_errors(values, failing, indices, recheck)
    except OnnxShapError as exc:
        note = f"; the float64 recheck was unavailable: {first_line(exc)}"
        raise _not_additive(values, row, column, change, per_row[row], note, output_names, indices) from None
    worst = precise.max(axis=1)
    still = np.flatnonzero(~(worst <= TOLERANCE))  # NaN fails
    if still.size:
        i = int(still[0])
        row, column = int(failing[i]), int(np.argmax(np.nan_to_num(precise[i], nan=np.inf)))
        note = f" by a float64 forward pass, {float(predictions[row, column]) - float(base[row, column]):.6g} by " \
               "the float32 one"
        raise _not_additive(values, row, column, float(changes[i, column]), worst[i], note, output_names, indices)
    per_row = per_row.copy()
    per_row[failing] = worst
    return per_row


def _precise_errors(values: list[np.ndarray], rows: np.ndarray, indices: np.ndarray | None,
                    recheck: Recheck) -> tuple[np.ndarray, np.ndarray]:
    """``(errors, Δf)`` of ``rows`` (r, k) against the float64 forward pass: the same formula, with ``f(x)``,
    ``E f`` and ``E|f|`` from ``recheck``."""
    outputs, expected, magnitude = recheck(rows)
    columns = indices[rows] if indices is not None else np.arange(outputs.shape[1])[None, :].repeat(len(rows), 0)
    predictions = np.take_along_axis(outputs, columns, axis=1)
    base, base_magnitude = expected[columns], magnitude[columns]
    errors = additivity_errors([v[rows] for v in values], predictions, base, base_magnitude)
    return errors, predictions - base


def _not_additive(values, row: int, column: int, change: float, error: float, note: str, output_names,
                  indices) -> AdditivityError:
    total = sum(v[row, ..., column].astype(np.float64).sum() for v in values)
    return AdditivityError(
        f"SHAP values do not add up: row {row}, output {_label(row, column, output_names, indices)}: sum of values "
        f"{total:.6g} vs f(x) - E[f(background)] = {change:.6g}{note} (relative error {error:.3g} > "
        f"{TOLERANCE:g}); please report this model")


def _raise_if_not_finite(values, predictions, base, errors, output_names, indices) -> None:
    bad = np.isnan(errors)
    if not bad.any():
        return
    row, column = (int(i) for i in np.argwhere(bad)[0])
    where = f"row {row}, output {_label(row, column, output_names, indices)}"
    if not np.isfinite(base[row, column]):
        what = f"the expected value E[f(background)] is {base[row, column]}"
    elif not np.isfinite(predictions[row, column]):
        what = f"the prediction f(x) is {predictions[row, column]}"
    else:
        what = "the SHAP values contain NaN or Inf"
    raise AdditivityError(f"non-finite result: {where}: {what}; NaN/Inf is never returned "
                          "(check the model and the data for overflow, log/sqrt of negatives, division by zero)")


def _label(row: int, column: int, output_names, indices) -> str:
    index = int(indices[row, column]) if indices is not None else column
    if output_names is not None and index < len(output_names):
        return f"{index} ({output_names[index]!r})" if output_names[index] != str(index) else str(index)
    return str(index)
