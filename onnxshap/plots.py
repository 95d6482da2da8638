"""Plots of SHAP values: image attributions, time-series heatmaps, and global importance bars.

matplotlib is optional (``pip install onnxshap[plots]``) and is imported only when a plot is drawn. Figures
are built as ``matplotlib.figure.Figure`` objects without pyplot, so no display or GUI backend is needed
(they render with Agg) and no global figure state accumulates; Jupyter shows a returned Figure inline.
Every function returns the Figure and, given ``path``, also writes it there atomically (the format follows
the file extension: .png, .svg, .pdf, ...).

Each function takes a NumPy array of SHAP values or any object with a ``values`` attribute holding one
(an ``onnxshap.Explanation`` or a ``shap.Explanation``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxshap.errors import InputDataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# |values| percentile that sets symmetric colour limits, so a few extreme pixels do not wash out the rest.
CLIP_PERCENTILE = 99.5
DPI = 120


def image_plot(
    values: Any,
    images: np.ndarray,
    *,
    output_names: Sequence[str] | None = None,
    max_images: int = 8,
    path: str | os.PathLike | None = None,
    cmap: str = "bwr",
) -> Figure:
    """Show each image beside its attribution map for every output, like ``shap.image_plot``.

    One row per image: the input (grayscale or RGB), then one panel per output with the attribution summed
    over colour channels, drawn over a faint grayscale copy of the image. Colours are zero-centred with
    symmetric limits ``±v``, ``v`` the 99.5th percentile of |values| over the shown images, so red and blue
    mean the same amount in every panel (with ``cmap="bwr"``: red raises the output, blue lowers it).
    Values near zero are drawn transparent.

    Args:
        values: SHAP values, shape ``(n, *image_shape, k)`` for k outputs or ``(n, *image_shape)`` for one;
            also a list of k arrays ``(n, *image_shape)`` (old shap layout).
        images: the explained images, ``(n, C, H, W)``, ``(n, H, W, C)`` with 1 or 3 channels, or
            ``(n, H, W)``.
        output_names: a title per output; default ``output 0``, ``output 1``, ...
        max_images: draw at most this many rows (the first images).
        path: write the figure here when given.
        cmap: a diverging matplotlib colormap name.

    Returns:
        The matplotlib Figure.

    Raises:
        InputDataError: the shapes of values and images do not fit together, or the channel axis is unclear.
    """
    mpl = _matplotlib()
    images = np.asarray(images, dtype=np.float64)
    values = _image_values(values, images.shape)
    layout = _image_layout(images.shape)
    n = min(len(images), max_images)
    shown = _to_display(images[:n], layout)
    maps = _channel_sum(values[:n], layout)
    names = _names(output_names, maps.shape[-1], "output")
    limit = _symmetric_limit(maps)

    fig, axes, colorbar = _image_grid(mpl, n, maps.shape[-1], aspect=maps.shape[2] / maps.shape[1])
    overlay = _transparent_center(mpl, cmap)
    gray = shown if shown.ndim == 3 else shown.mean(axis=-1)
    for row in range(n):
        _show_input(axes[row, 0], shown[row])
        for col in range(maps.shape[-1]):
            ax = axes[row, col + 1]
            ax.imshow(gray[row], cmap="gray", alpha=0.2, interpolation="nearest")
            ax.imshow(maps[row, ..., col], cmap=overlay, vmin=-limit, vmax=limit, interpolation="nearest")
    axes[0, 0].set_title("input")
    for col, name in enumerate(names):
        axes[0, col + 1].set_title(name)
    mappable = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(-limit, limit), cmap=cmap)
    fig.colorbar(mappable, cax=colorbar, orientation="horizontal", label="SHAP value")
    return _finish(fig, path)


def timeseries_heatmap(
    values: Any,
    *,
    variable_names: Sequence[str] | None = None,
    time_labels: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Variables × time steps heatmap of attributions.

    Given SHAP values of many samples, ``(n, T, V)``, each cell is the mean |φ| over the samples: how much
    that variable at that step moves the output on average (a sequential colour scale from zero). Given one
    sample's values, ``(T, V)``, each cell is the signed φ on a zero-centred diverging scale (red raises the
    output, blue lowers it). A trailing output axis of size 1, ``(n, T, V, 1)``, is dropped.

    Args:
        values: SHAP values ``(n, T, V)`` or ``(T, V)``, time on the first axis after the samples.
        variable_names: a label per variable (row); default ``x0``, ``x1``, ...
        time_labels: a label per time step (column); default ``t-(T-1)`` ... ``t-1``, ``t``, treating the
            last step as the present.
        path: write the figure here when given.
        title: the figure title.

    Returns:
        The matplotlib Figure.

    Raises:
        InputDataError: values has a shape other than those above, or the label counts do not match.
    """
    mpl = _matplotlib()
    values = _squeeze_output_axis(_values_array(values), keep=3, name="timeseries_heatmap")
    if values.ndim not in (2, 3):
        raise InputDataError(f"timeseries_heatmap needs values of shape (n, T, V) or (T, V); got {values.shape}")
    signed = values.ndim == 2
    grid = (values if signed else np.abs(values).mean(axis=0)).T  # (V, T)
    n_vars, n_steps = grid.shape
    rows = _names(variable_names, n_vars, "x", sep="")
    cols = _time_labels(time_labels, n_steps)

    fig = mpl.figure.Figure(figsize=(2.6 + 0.55 * n_steps, 1.3 + 0.38 * n_vars), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    if signed:
        limit = _symmetric_limit(grid, percentile=100.0)
        image = ax.imshow(grid, cmap="bwr", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        label = "SHAP value"
    else:
        image = ax.imshow(grid, cmap="Reds", vmin=0.0, aspect="auto", interpolation="nearest")
        label = f"mean |SHAP value| over {values.shape[0]} samples"
    ax.set_xticks(range(n_steps), cols, rotation=45 if max(map(len, cols)) > 3 else 0)
    ax.set_yticks(range(n_vars), rows)
    ax.set_xlabel("time step")
    ax.set_xticks(np.arange(n_steps + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_vars + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(image, ax=ax, label=label)
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def importance_bar(
    values_or_importance: Any,
    *,
    names: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    top: int = 20,
    title: str | None = None,
) -> Figure:
    """Horizontal bar chart of global importance, largest on top.

    Given SHAP values with the samples first and the variables last, ``(n, F)`` or ``(n, T, V)``, the
    importance of a variable is its mean |φ| over the samples; with time steps (or any axes) between, its
    |φ| is summed over them first, so the bar is the average total attribution the variable carries in one
    sample. A 1-D array is taken as the importance itself. Beyond ``top`` variables, the rest are summed
    into one grey bar.

    Args:
        values_or_importance: SHAP values (variables on the last axis) or a 1-D importance per variable.
        names: a label per variable; default ``x0``, ``x1``, ...
        path: write the figure here when given.
        top: how many variables get their own bar.
        title: the figure title.

    Returns:
        The matplotlib Figure.

    Raises:
        InputDataError: the array is empty or the name count does not match.
    """
    mpl = _matplotlib()
    data = _values_array(values_or_importance)
    if data.size == 0 or data.ndim == 0:
        raise InputDataError(f"importance_bar needs a non-empty array; got shape {data.shape}")
    importance = _importance(data)
    labels = _names(names, importance.size, "x", sep="")
    order = np.argsort(-importance, kind="stable")
    bars = [(labels[i], float(importance[i]), "#d6604d") for i in order[:top]]
    if importance.size > top:
        bars.append((f"sum of {importance.size - top} others", float(importance[order[top:]].sum()), "#bdbdbd"))

    fig = mpl.figure.Figure(figsize=(6.4, 0.9 + 0.32 * len(bars)), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(bars))[::-1]
    ax.barh(y, [b[1] for b in bars], color=[b[2] for b in bars], height=0.7)
    ax.set_yticks(y, [b[0] for b in bars])
    for yi, (_, value, _) in zip(y, bars):
        ax.annotate(f"{value:.3g}", (value, yi), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.set_xlabel({1: "importance", 2: "mean |SHAP value|"}.get(data.ndim, "mean of Σ|SHAP value| over steps"))
    ax.margins(x=0.15)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title)
    return _finish(fig, path)


# ---------------------------------------------------------------- helpers


def _importance(data: np.ndarray) -> np.ndarray:
    """Per variable (last axis): 1-D data as is, else mean over axis 0 of |φ| summed over middle axes."""
    if data.ndim == 1:
        return data
    magnitude = np.abs(data).reshape(data.shape[0], -1, data.shape[-1]).sum(axis=1)
    return magnitude.mean(axis=0)


def _matplotlib():
    """The matplotlib modules the plots use, or an ImportError that says how to install it."""
    try:
        import matplotlib
        import matplotlib.cm
        import matplotlib.colors
        import matplotlib.figure
    except ImportError as exc:
        raise ImportError("onnxshap's plots need matplotlib: pip install onnxshap[plots]") from exc
    return matplotlib


def _values_array(values: Any) -> np.ndarray:
    """SHAP values as a float array; objects with a ``values`` attribute are unwrapped."""
    values = getattr(values, "values", values)
    if isinstance(values, (list, tuple)) and values and np.ndim(values[0]) > 1:
        values = np.stack([np.asarray(v) for v in values], axis=-1)
    return np.asarray(values, dtype=np.float64)


def _squeeze_output_axis(values: np.ndarray, keep: int, name: str) -> np.ndarray:
    """Drop a trailing output axis of size 1 from arrays with more than ``keep`` axes."""
    if values.ndim > keep:
        if values.shape[-1] != 1:
            raise InputDataError(
                f"{name} draws one output; values has shape {values.shape} with {values.shape[-1]} outputs "
                "on the last axis: pass values[..., j] for output j"
            )
        values = values[..., 0]
    return values


def _names(names: Sequence[str] | None, count: int, prefix: str, sep: str = " ") -> list[str]:
    if names is None:
        return [f"{prefix}{sep}{i}" for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise InputDataError(f"got {len(names)} name(s) for {count} item(s): {names}")
    return names


def _time_labels(labels: Sequence[str] | None, steps: int) -> list[str]:
    if labels is None:
        return [f"t-{steps - 1 - i}" if i < steps - 1 else "t" for i in range(steps)]
    return _names(labels, steps, "")


def _symmetric_limit(values: np.ndarray, percentile: float = CLIP_PERCENTILE) -> float:
    """A positive colour limit: the given percentile of |values| (1.0 when everything is zero)."""
    finite = np.abs(values[np.isfinite(values)])
    limit = float(np.percentile(finite, percentile)) if finite.size else 0.0
    if limit <= 0.0:
        limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return limit


def _image_values(values: Any, image_shape: tuple[int, ...]) -> np.ndarray:
    """Values as ``(n, *image_shape, k)``; raises when they do not fit the images."""
    values = _values_array(values)
    if values.shape == image_shape:
        values = values[..., None]
    if values.shape[:-1] != image_shape:
        raise InputDataError(
            f"image_plot: values of shape {values.shape} do not fit images of shape {image_shape}; "
            "expected (n, *image_shape, k) or (n, *image_shape)"
        )
    return values


def _image_layout(shape: tuple[int, ...]) -> str:
    """``"NHW"``, ``"NCHW"`` or ``"NHWC"``: where the 1 or 3 colour channels are."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        if shape[1] in (1, 3) and shape[-1] not in (1, 3):
            return "NCHW"
        if shape[-1] in (1, 3):
            return "NHWC"
        if shape[1] in (1, 3):
            return "NCHW"
    raise InputDataError(
        f"image_plot needs images (n, C, H, W), (n, H, W, C) with C = 1 or 3, or (n, H, W); got {shape}"
    )


def _to_display(images: np.ndarray, layout: str) -> np.ndarray:
    """Images as (n, H, W) grayscale or (n, H, W, 3) RGB, each scaled to [0, 1] by its own range."""
    if layout == "NCHW":
        images = np.moveaxis(images, 1, -1)
    if layout != "NHW" and images.shape[-1] == 1:
        images = images[..., 0]
    axes = tuple(range(1, images.ndim))
    low = images.min(axis=axes, keepdims=True)
    span = images.max(axis=axes, keepdims=True) - low
    return (images - low) / np.where(span > 0, span, 1.0)


def _channel_sum(values: np.ndarray, layout: str) -> np.ndarray:
    """Values (n, *image_shape, k) summed over colour channels → (n, H, W, k)."""
    if layout == "NCHW":
        return values.sum(axis=1)
    if layout == "NHWC":
        return values.sum(axis=3)
    return values


# Image grid geometry in inches: fixed, so no layout engine runs (matplotlib's "compressed" layout took 1.2 s of
# a 1.8 s plot of 8 images × 10 outputs: it measures every one of the 88 panels' tight boxes, twice).
PANEL_GAP = 0.06  # between panels
TITLE_BAND = 0.3  # above the first row: the column titles
COLORBAR_BAND = 0.85  # below the last row: the colour bar (0.1 high, 0.5 above the bottom), its ticks and label
MARGIN = 0.1


def _image_grid(mpl, rows: int, outputs: int, aspect: float = 1.0):
    """A Figure with rows × (1 + outputs) bare panels shaped like the images (``aspect`` = width / height, each
    panel the area of a square of side 1.5 or 1.9 in), and the axes of a horizontal colour bar below them."""
    size = 1.5 if outputs > 4 else 1.9
    panel_width, panel_height = size * aspect ** 0.5, size / aspect ** 0.5
    columns = outputs + 1
    width = 2 * MARGIN + columns * panel_width + (columns - 1) * PANEL_GAP
    height = TITLE_BAND + rows * panel_height + (rows - 1) * PANEL_GAP + COLORBAR_BAND
    fig = mpl.figure.Figure(figsize=(width, height), dpi=DPI)
    axes = fig.subplots(rows, columns, squeeze=False, gridspec_kw={
        "left": MARGIN / width, "right": 1 - MARGIN / width, "top": 1 - TITLE_BAND / height,
        "bottom": COLORBAR_BAND / height, "wspace": PANEL_GAP / panel_width, "hspace": PANEL_GAP / panel_height})
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    bar_width = max(min(0.6, 0.25 + 0.05 * outputs), min(0.9, 2.4 / width))  # at least 2.4 in: room for ticks
    colorbar = fig.add_axes((0.5 - bar_width / 2, 0.5 / height, bar_width, 0.1 / height))
    return fig, axes, colorbar


def _show_input(ax, image: np.ndarray) -> None:
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")


def _transparent_center(mpl, name: str):
    """The named colormap with opacity rising from 0 at its centre to 1 at both ends."""
    base = mpl.colormaps[name]
    colors = base(np.linspace(0.0, 1.0, 256))
    colors[:, 3] = np.minimum(1.0, np.abs(np.linspace(-1.0, 1.0, 256)) * 1.6)
    return mpl.colors.ListedColormap(colors, name=f"{name}_transparent_center")


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        _save_atomic(fig, path)
    return fig


def _save_atomic(fig: Figure, path: str | os.PathLike) -> None:
    """Save atomically (:func:`onnxshap.files.write.write_atomic`: a partial file in the same folder, renamed
    over ``path``; parent folders are created); the format follows the extension (default png)."""
    from onnxshap.files.write import write_atomic

    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    write_atomic(path, lambda file: fig.savefig(file, format=fmt, dpi=DPI), make_parents=True)
