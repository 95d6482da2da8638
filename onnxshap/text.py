"""Views of per-token SHAP values (token inputs explained at their embeddings, :mod:`onnxshap.augment.tokens`).

A token input's values are shaped like its ids plus the outputs axis, ``(n, L, k)``: ``φ[i, t, j]`` is how much
token ``t`` of row ``i`` moved output ``j`` away from its expected value (relative to the background's
tokens). :func:`token_heatmap` draws one output as rows × positions, each cell labelled with its token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxshap.errors import InputDataError
from onnxshap.plots import DPI, _finish, _matplotlib, _squeeze_output_axis, _symmetric_limit, _values_array

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def token_labels(tokens: np.ndarray, vocabulary: Sequence[str] | None = None) -> np.ndarray:
    """The text of each token: ``vocabulary[id]`` when given (ids outside it show as ``#id``), else the id."""
    tokens = np.asarray(tokens)
    if vocabulary is None or not np.issubdtype(tokens.dtype, np.integer):
        return tokens.astype(str)
    words = [str(w) for w in vocabulary]
    return np.vectorize(lambda i: words[i] if 0 <= i < len(words) else f"#{i}", otypes=[object])(tokens)


def token_heatmap(
    values: Any,
    tokens: Any,
    *,
    vocabulary: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    max_rows: int = 20,
) -> Figure:
    """Rows × token positions heatmap of per-token attributions, each cell labelled with its token.

    Each cell is the signed ``φ`` of one token on a zero-centred diverging scale (red raises the output, blue
    lowers it; the colour limit is the 99.5th percentile of ``|φ|`` so one token does not wash out the rest).

    Args:
        values: per-token SHAP values of one output, ``(n, L)`` (or ``(n, L, 1)``; more token axes are
            flattened).
        tokens: the ids (or token strings) of the same shape ``(n, L)``.
        vocabulary: token text by id (line ``i`` of a vocabulary file is id ``i``); default: the ids.
        path: write the figure here when given.
        title: the figure title.
        max_rows: draw at most this many rows (the first ones).

    Returns:
        The matplotlib Figure.

    Raises:
        InputDataError: values and tokens do not have matching shapes.
    """
    mpl = _matplotlib()
    values = _squeeze_output_axis(_values_array(values), keep=np.ndim(tokens), name="token_heatmap")
    tokens = np.asarray(tokens)
    if values.shape != tokens.shape or values.ndim < 2:
        raise InputDataError(f"token_heatmap needs values and tokens of one shape (n, L); got values "
                             f"{values.shape} and tokens {tokens.shape}")
    rows = min(len(values), max_rows)
    grid = values[:rows].reshape(rows, -1)
    labels = token_labels(tokens[:rows].reshape(rows, -1), vocabulary)
    steps = grid.shape[1]
    fig = mpl.figure.Figure(figsize=(2.0 + 0.62 * steps, 1.2 + 0.36 * rows), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    limit = _symmetric_limit(grid)
    image = ax.imshow(grid, cmap="bwr", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    for (i, t), text in np.ndenumerate(labels):
        ax.text(t, i, str(text)[:8], ha="center", va="center", fontsize=7)
    ax.set_xticks(range(steps), [str(t) for t in range(steps)])
    ax.set_yticks(range(rows), [f"row {i}" for i in range(rows)])
    ax.set_xlabel("token position")
    fig.colorbar(image, ax=ax, label="SHAP value")
    if title:
        ax.set_title(title)
    return _finish(fig, path)
