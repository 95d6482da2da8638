"""The CLI's outputs: default paths, the plot, the .npz arrays, checkpoints and the summary."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from onnxshap.errors import InputDataError, OutputFileError
from onnxshap.files.checkpoint import Checkpoints, fingerprint, stale_folders
from onnxshap.files.write import OutputSet


def default_output(args) -> Path:
    source = Path(args.data or args.input[0].rpartition(":")[2])
    return source.with_name(f"{source.stem}.shap.npz")


def plot_format(path: str) -> str:
    """The image format of ``--plot`` from its extension (png when it has none); refuses unknown ones."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise InputDataError("--plot needs matplotlib: pip install 'onnxshap[plots]'") from None
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise OutputFileError(f"--plot {path}: unknown image format {fmt!r}; use one of "
                              f"{', '.join(sorted(supported))}")
    return fmt


def stage_plot(outputs: OutputSet, plot: Path, image_format: str, explanation, vocabulary) -> None:
    from onnxshap import plots

    figure = choose_figure(explanation, vocabulary)
    outputs.stage(plot, lambda file: figure.savefig(file, format=image_format, dpi=plots.DPI))


def checkpoints_of(args, output: Path, model_files: list[Path], data: dict, explainer) -> Checkpoints:
    """``--resume``: the checkpoints of this run, keyed by the model's bytes, the data, the background and every
    option that changes the values (checkpoints of any other run are never used)."""
    from onnxshap import __version__

    options = {"onnxshap": __version__, "layer": args.layer, "outputs": explainer.output_names, "rank": args.rank,
               "rank_order": args.rank_order, "providers": explainer.providers, "batch_size": explainer.batch_size,
               "max_memory": explainer.max_memory}
    key = fingerprint(model_files, {"data": data, "background": explainer.background}, options)
    stale = stale_folders(output, key)
    if stale:
        print(f"onnxshap: note: {len(stale)} checkpoint folder(s) of other runs beside {output.name} are not used "
              f"(different model, data or options), e.g. {stale[0].name}; delete them", file=sys.stderr)
    return Checkpoints(output, key)


def result_arrays(explainer, explanations) -> dict[str, np.ndarray]:
    first = explanations[0]
    arrays = {
        "expected_value": np.atleast_1d(explainer.expected_value),
        "output_indices": first.output_indices,
        "predictions": first.predictions,
        "additivity_error": first.additivity_error,
    }
    if len(explanations) == 1:
        arrays["shap_values"] = first.values
    else:
        arrays.update({f"shap_values_{e.input_name}": e.values for e in explanations})
    return arrays


def choose_figure(explanation, vocabulary=None):
    """The figure for ``--plot``: per-token values of token ids as a rows × positions heatmap of the first
    explained output (cells labelled with the tokens), images, a variables × time-steps heatmap, or a bar of
    mean |value|."""
    from onnxshap import plots, text

    values, data = explanation.values, explanation.data
    if "embedding_values" in explanation.extra:
        output = explanation.output_names[int(explanation.output_indices[0, 0])]
        return text.token_heatmap(values[..., 0], data, vocabulary=vocabulary,
                                  title=f"per-token SHAP values, output {output}")
    if data.ndim == 4:  # images (n, C, H, W) or (n, H, W, C)
        return plots.image_plot(values, data, output_names=explanation.output_names)
    if data.ndim == 3:  # sequences (n, T, F): the first explained output
        return plots.timeseries_heatmap(values[..., 0], variable_names=explanation.feature_names)
    return plots.importance_bar(np.abs(values).mean(axis=(0, -1)).reshape(-1), names=explanation.feature_names)


def summary(explainer, explanations, output: Path, seconds: float, args, checkpoints=None) -> None:
    first = explanations[0]
    n, k = first.output_indices.shape
    m = next(iter(explainer.background.values())).shape[0]
    print(f"onnxshap: explained {n} row(s) of {args.model} against {m} background row(s), "
          f"{k} output(s) per row")
    if checkpoints is not None and checkpoints.restored_rows:
        print(f"  resumed: {checkpoints.restored_rows} of {n} row(s) restored from checkpoints")
    for e in explanations:
        print(f"  {e.input_name}: values {e.values.shape}")
    expected = np.atleast_1d(explainer.expected_value)
    shown = ", ".join(f"{v:.6g}" for v in expected[:10]) + (", ..." if expected.size > 10 else "")
    print(f"  expected value: [{shown}]")
    print(f"  worst additivity error: {first.additivity_error.max():.3g} (row {int(first.additivity_error.argmax())})")
    if args.verbose:
        top = np.argsort(-mean_abs(first.values))[:5]
        print(f"  largest mean |value| at flat feature indices {top.tolist()}")
    print(f"  wrote {output}" + (f", {args.plot}" if args.plot else "") +
          (f", {args.save_graph}" if args.save_graph else "") + f" in {seconds:.2f} s")


def mean_abs(values: np.ndarray, block: int = 4096) -> np.ndarray:
    """Mean |value| per flat feature over rows and outputs, a block of rows at a time (no copy of the values)."""
    flat = values.reshape(values.shape[0], -1, values.shape[-1])
    total = np.zeros(flat.shape[1])
    for start in range(0, flat.shape[0], block):
        total += np.abs(flat[start:start + block]).sum(axis=(0, 2))
    return total / max(1, flat.shape[0] * flat.shape[2])


