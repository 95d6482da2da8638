"""Command line: ``onnxshap model.onnx data.npy`` → SHAP values in an .npz, a summary, optionally a plot."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from onnxshap.errors import InputDataError, OnnxShapError, OutputFileError, UsageError, first_line
from onnxshap.files.checkpoint import Checkpoints, fingerprint, stale_folders
from onnxshap.files.model_files import data_path, stage_model
from onnxshap.files.read import load_arrays, read_text_file
from onnxshap.files.write import OutputSet, Terminated, raise_on_sigterm
from onnxshap.load.data import check_shape, feeds
from onnxshap.load.frameworks import framework_to_onnx, is_keras_path
from onnxshap.load.model import load_model, signature
from onnxshap.runtime import runtime_ir_version

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM

DESCRIPTION = """\
Explain an ONNX model with Deep SHAP: how much each input feature moved each output away from its
average over a background set. The values of a row add up to f(row) - E[f(background)] (checked).
"""

EPILOG = """\
examples:
  onnxshap model.onnx data.npy                      values for every output, background = 100 rows of the data
  onnxshap model.onnx data.npy -b background.npy -o values.npz --plot values.png
  onnxshap model.onnx data.npy --rank 1             explain only each row's top output
  onnxshap model.onnx --input ids:a.npy --input mask:b.npy      a model with several inputs (.npz works too)
  onnxshap bert.onnx ids.npy -b pad_ids.npy --vocab vocab.txt --plot tokens.png
                                                    token ids (int64): values per token, against pad tokens
  onnxshap model.keras data.npy                     a Keras model (.keras, .h5, SavedModel folder), via tf2onnx

token ids: an integer input is explained at its embedding lookup(s); its values are per token (summed over the
  embedding dims), shaped like the ids plus k; the background's ids give the reference embeddings.
output (.npz): shap_values (n, *input shape, k) [shap_values_<input> for several inputs], expected_value (k,),
  output_indices (n, k), predictions (n, k), additivity_error (n,).
files: inputs must be regular files (no devices, FIFOs, sockets); .npy/.npz headers are checked before any
  array is read, never unpickled. Limits: ONNXSHAP_MAX_MODEL_BYTES (model + external data, default 4 GiB),
  ONNXSHAP_MAX_DATA_BYTES (arrays of one data file, default half the RAM). Outputs (-o, --plot, --save-graph)
  are checked before the work (existing folder, not an input, only regular files replaced) and written
  together at the end, each through .NAME.onnxshap-partial-PID in its folder: no output unless all succeed.
  A partial file left by a SIGKILL is never the output; delete it. --save-graph writes the graph without the
  background; weights over protobuf's 2 GB go to FILE.onnx.data beside it.
memory: --max-memory bounds each ONNX Runtime call; samples, then references, then outputs are split to fit.
resume: with --resume, completed chunks are kept in .<output>.onnxshap-resume-<fingerprint>/ beside the output
  (keyed by the model, the data and the options) and a rerun with --resume continues from them; the folder is
  removed when the output is written.
exit codes: 0 success; 1 failed check or runtime error (unsupported op, additivity, a write that failed);
  2 usage error (bad option, missing/unreadable/unsafe file or output, data that does not fit the model);
  130 interrupted (SIGINT); 143 terminated (SIGTERM; partial files removed).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no traceback
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"onnxshap: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxshap", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the model: an .onnx file, a Keras .keras/.h5 file or a SavedModel folder "
                        "(exported to ONNX on the background rows and checked against Keras)")
    parser.add_argument("data", nargs="?", help="rows to explain: .npy (one input) or .npz (arrays by input name)")
    parser.add_argument("--input", action="append", default=[], metavar="NAME:FILE.npy",
                        help="data for one named input (repeat for several inputs)")
    parser.add_argument("-b", "--background", metavar="FILE",
                        help="background rows (.npy/.npz); default: a seeded sample of the data")
    parser.add_argument("--background-size", type=int, default=100, metavar="M",
                        help="rows sampled from the data when no background is given (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling the background (default 0)")
    parser.add_argument("-o", "--output", metavar="FILE.npz", help="where to write the values "
                        "(default: <data>.shap.npz beside the data)")
    parser.add_argument("--outputs", nargs="+", metavar="NAME", help="graph outputs to explain (default: all)")
    parser.add_argument("--layer", action="append", metavar="TENSOR",
                        help="explain this intermediate tensor instead of the inputs")
    parser.add_argument("--rank", type=int, metavar="J", help="explain only each row's top J outputs")
    parser.add_argument("--rank-order", choices=("max", "min", "max_abs"), default="max",
                        help="how --rank orders outputs (default max)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where ONNX Runtime runs (default auto: CUDA when it loads)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="rows per ONNX Runtime call")
    parser.add_argument("--max-memory", type=_memory_size, metavar="SIZE",
                        help="memory budget per ONNX Runtime call: bytes or 512M, 2G (default: a quarter of the RAM, "
                             "at most 1G); samples, then references, then outputs are split to fit")
    parser.add_argument("--resume", action="store_true",
                        help="keep checkpoints of completed chunks beside the output and resume from them")
    parser.add_argument("--save-graph", metavar="FILE.onnx",
                        help="also write the augmented ONNX graph (background not embedded; weights over 2 GB go "
                             "to FILE.onnx.data)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the values (images, time series or bars)")
    parser.add_argument("--names", metavar="FILE", help="variable names, one per line (for plots)")
    parser.add_argument("--vocab", metavar="FILE", help="token ids: the vocabulary, one token per line, line i "
                        "for id i (labels the --plot of a token input)")
    parser.add_argument("--no-check", action="store_true", help="do not fail when values do not add up")
    parser.add_argument("--no-cache", action="store_true", help="do not keep the augmented graph in the user cache "
                        "folder (ONNXSHAP_CACHE=0 does the same)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print more detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _memory_size(text: str) -> int:
    """``--max-memory``: bytes, or a number with K, M, G or T (binary units, an optional trailing B)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not match or float(match[1]) * _UNITS[match[2]] < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 268435456, 256M or 2G, got {text!r}")
    return int(float(match[1]) * _UNITS[match[2]])


def load_array_file(path: str, what: str, shapes: dict[str, tuple] | None = None, only: str | None = None):
    """An .npy array or a dict of .npz arrays; never unpickles. With ``shapes`` (input name → feature shape),
    keys and declared shapes are checked before any array is read; ``only`` names the one input the file is
    for (``--input NAME:FILE``)."""
    def check_keys(keys: list[str]) -> None:
        if only is not None:
            if len(keys) != 1:
                raise InputDataError(f"{what} file {path} holds {len(keys)} arrays; --input NAME:FILE needs "
                                     "one")
            return
        unknown = sorted(set(keys) - set(shapes))
        if unknown:
            raise InputDataError(f"{what} file {path}: unknown input name(s) "
                                 f"{', '.join(map(repr, unknown))}; the model's inputs are "
                                 f"{', '.join(map(repr, shapes))}")
        missing = [name for name in shapes if name not in keys]
        if missing:
            raise InputDataError(f"{what} file {path}: missing input(s) {', '.join(map(repr, missing))}")

    def check_array(key, shape, dtype) -> None:
        name = only or key or (next(iter(shapes)) if len(shapes) == 1 else None)
        if name is None:
            raise InputDataError(f"{what} file {path} holds one array but the model has {len(shapes)} inputs "
                                 f"({', '.join(shapes)}); pass an .npz keyed by input name, or --input "
                                 "NAME:FILE")
        check_shape(name, shape, shapes[name], f"{what} file {path}")

    if shapes is None:
        return load_arrays(path, what)
    arrays = load_arrays(path, what, check_keys=check_keys, check_array=check_array)
    if only is not None and isinstance(arrays, dict):
        return next(iter(arrays.values()))
    return arrays


def _collect_data(args, shapes: dict[str, tuple]) -> object:
    if args.data and args.input:
        raise InputDataError("give the data either as a positional file or with --input, not both")
    if args.input:
        data = {}
        for item in args.input:
            name, sep, path = item.rpartition(":")
            if not sep or not name:
                raise InputDataError(f"--input expects NAME:FILE.npy, got {item!r}")
            if name not in shapes:
                raise InputDataError(f"--input {item}: unknown input name {name!r}; the model's inputs are "
                                     f"{', '.join(map(repr, shapes))}")
            if name in data:
                raise InputDataError(f"--input {name!r} given twice")
            data[name] = load_array_file(path, "data", shapes, only=name)
        return data
    if not args.data:
        raise InputDataError("no data: pass a .npy/.npz file after the model, or --input NAME:FILE.npy")
    return load_array_file(args.data, "data", shapes)


def _data_files(args) -> list[str]:
    return [p for p in [args.data, args.background, args.names, args.vocab] if p] + [
        item.rpartition(":")[2] for item in args.input]


def _rows(data) -> int:
    first = next(iter(data.values())) if isinstance(data, dict) else data
    return int(np.asarray(first).shape[0]) if np.ndim(first) else 0


def _sample_background(data, size: int, seed: int):
    rows = _rows(data)
    if rows <= size:
        return data
    index = np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False))
    return {k: v[index] for k, v in data.items()} if isinstance(data, dict) else data[index]


def _default_output(args) -> Path:
    source = Path(args.data or args.input[0].rpartition(":")[2])
    return source.with_name(f"{source.stem}.shap.npz")


def _plot_format(path: str) -> str:
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


def _read_model(args, model_files: list[Path]):
    """The model as ONNX: an ONNX file as it is; a Keras file or SavedModel folder exported with
    ``onnxshap.converters.export_keras`` on the background rows (``-b``, else the rows sampled from the data),
    the export checked against Keras."""
    if not is_keras_path(args.model):
        return load_model(args.model, read_files=model_files)
    model_files.append(Path(args.model))
    source = args.background or args.data or (args.input[0].rpartition(":")[2] if args.input else None)
    if source is None:
        raise InputDataError("no data: pass a .npy/.npz file after the model, or --input NAME:FILE.npy")
    if len(args.input) > 1:
        raise InputDataError(f"{args.model}: a Keras model with several inputs cannot be read from --input "
                             "files; export it with onnxshap.converters.export_keras and explain the .onnx file")
    rows = load_array_file(source, "background" if args.background else "data")
    if isinstance(rows, dict):
        if len(rows) != 1:
            raise InputDataError(f"{source} holds {len(rows)} arrays; a Keras model is exported on one input "
                                 "array (export a multi-input model with onnxshap.converters.export_keras)")
        rows = next(iter(rows.values()))
    if not args.background:
        rows = _sample_background(rows, args.background_size, args.seed)
    return load_model(framework_to_onnx(args.model, rows))


def _check_options(args) -> None:
    if args.background_size < 1:
        raise UsageError("--background-size must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")


def run(args) -> int:
    """Check every option, file and output target; explain; then write every output together."""
    from onnxshap.explainer import DeepExplainer

    _check_options(args)
    plot_format = _plot_format(args.plot) if args.plot else None
    started = time.perf_counter()
    names = read_text_file(args.names, "--names").split() if args.names else None
    vocabulary = read_text_file(args.vocab, "--vocab").splitlines() if args.vocab else None
    model_files: list[Path] = []
    proto = _read_model(args, model_files)
    checkpoints = None
    with OutputSet(inputs=[*model_files, *_data_files(args)]) as outputs:
        output = outputs.check(args.output or _default_output(args), "output")
        plot = outputs.check(args.plot, "--plot") if args.plot else None
        graph = outputs.check(args.save_graph, "--save-graph") if args.save_graph else None
        graph_data = outputs.check(data_path(graph), "--save-graph weights") if graph else None
        model = signature(proto)
        shapes = model.feature_shapes
        data = feeds(_collect_data(args, shapes), model, "data")
        if args.background:
            background = load_array_file(args.background, "background", shapes)
        else:
            background = _sample_background(data, args.background_size, args.seed)
        explainer = DeepExplainer(proto, background, layer=args.layer, outputs=args.outputs, device=args.device,
                                  batch_size=args.batch_size, max_memory=args.max_memory, feature_names=names,
                                  cache=not args.no_cache)
        if args.resume:
            checkpoints = _checkpoints(args, output, model_files, data, explainer)
        result = explainer.explain(data, ranked_outputs=args.rank, output_rank_order=args.rank_order,
                                   check_additivity=not args.no_check, progress=not args.quiet,
                                   checkpoint=checkpoints)
        explanations = result if isinstance(result, list) else [result]
        if plot is not None:
            _stage_plot(outputs, plot, plot_format, explanations[0], vocabulary)
        if graph is not None:
            stage_model(outputs, graph, explainer.augmented.model, graph_data, ir_version=runtime_ir_version())
        arrays = _result_arrays(explainer, explanations)
        outputs.stage(output, lambda file: np.savez(file, **arrays))
        outputs.commit()
    if checkpoints is not None:
        checkpoints.remove()
    if not args.quiet:
        _summary(explainer, explanations, output, time.perf_counter() - started, args, checkpoints)
    return EXIT_OK


def _stage_plot(outputs: OutputSet, plot: Path, plot_format: str, explanation, vocabulary) -> None:
    from onnxshap import plots

    figure = _figure(explanation, vocabulary)
    outputs.stage(plot, lambda file: figure.savefig(file, format=plot_format, dpi=plots.DPI))


def _checkpoints(args, output: Path, model_files: list[Path], data: dict, explainer) -> Checkpoints:
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


def _result_arrays(explainer, explanations) -> dict[str, np.ndarray]:
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


def _figure(explanation, vocabulary=None):
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


def _summary(explainer, explanations, output: Path, seconds: float, args, checkpoints=None) -> None:
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
        top = np.argsort(-_mean_abs(first.values))[:5]
        print(f"  largest mean |value| at flat feature indices {top.tolist()}")
    print(f"  wrote {output}" + (f", {args.plot}" if args.plot else "") +
          (f", {args.save_graph}" if args.save_graph else "") + f" in {seconds:.2f} s")


def _mean_abs(values: np.ndarray, block: int = 4096) -> np.ndarray:
    """Mean |value| per flat feature over rows and outputs, a block of rows at a time (no copy of the values)."""
    flat = values.reshape(values.shape[0], -1, values.shape[-1])
    total = np.zeros(flat.shape[1])
    for start in range(0, flat.shape[0], block):
        total += np.abs(flat[start:start + block]).sum(axis=(0, 2))
    return total / max(1, flat.shape[0] * flat.shape[2])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v and -q exclude each other")
    previous = _catch_sigterm()
    try:
        return run(args)
    except OnnxShapError as exc:
        print(f"onnxshap: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxshap: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("onnxshap: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except MemoryError:
        print("onnxshap: error: out of memory; try a smaller --batch-size or background", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # a write that failed midway (disk full, I/O error): nothing was left behind
        print(f"onnxshap: error: {first_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _catch_sigterm():
    """SIGTERM raises Terminated (so partial files are removed); returns the previous handler to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    raise_on_sigterm()
    return previous


if __name__ == "__main__":
    sys.exit(main())
