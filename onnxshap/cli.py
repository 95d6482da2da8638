"""Command line: ``onnxshap model.onnx data.npy`` → SHAP values in an .npz, a summary, optionally a plot."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from onnxshap.errors import InputDataError, OnnxShapError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

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

output (.npz): shap_values (n, *input shape, k) [shap_values_<input> for several inputs], expected_value (k,),
  output_indices (n, k), predictions (n, k), additivity_error (n,). Written atomically.
exit codes: 0 success, 1 failed check or runtime error (unsupported op, additivity), 2 usage error
  (bad option, missing or unreadable file, data that does not fit the model).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no traceback
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"onnxshap: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxshap", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the model, an .onnx file")
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
    parser.add_argument("--save-graph", metavar="FILE.onnx", help="also write the augmented ONNX graph")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the values (images, time series or bars)")
    parser.add_argument("--names", metavar="FILE", help="variable names, one per line (for plots)")
    parser.add_argument("--no-check", action="store_true", help="do not fail when values do not add up")
    parser.add_argument("-v", "--verbose", action="store_true", help="print more detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser


def load_array_file(path: str, what: str):
    """An .npy array or a dict of .npz arrays; never unpickles."""
    file = Path(path)
    if not file.exists():
        raise InputDataError(f"{what} file not found: {file}")
    if file.is_dir():
        raise InputDataError(f"{what} path is a folder: {file}")
    try:
        loaded = np.load(file, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InputDataError(f"{what} file {file} holds Python objects that need pickle to load; refused "
                                 "(save plain numeric arrays with np.save)") from None
        raise InputDataError(f"{what} file {file} is not a readable .npy/.npz: {exc}") from None
    except (OSError, EOFError) as exc:
        raise InputDataError(f"{what} file {file} is not a readable .npy/.npz: {exc}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            try:
                return {name: loaded[name] for name in loaded.files}
            except ValueError as exc:
                raise InputDataError(f"{what} file {file} holds arrays that need pickle; refused") from exc
    return loaded


def _collect_data(args) -> object:
    if args.data and args.input:
        raise InputDataError("give the data either as a positional file or with --input, not both")
    if args.input:
        data = {}
        for item in args.input:
            name, sep, path = item.rpartition(":")
            if not sep or not name:
                raise InputDataError(f"--input expects NAME:FILE.npy, got {item!r}")
            data[name] = load_array_file(path, f"data for input {name!r}")
        return data
    if not args.data:
        raise InputDataError("no data: pass a .npy/.npz file after the model, or --input NAME:FILE.npy")
    return load_array_file(args.data, "data")


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


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial.npz")
    try:
        np.savez(temporary, **arrays)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def run(args) -> int:
    from onnxshap.explainer import DeepExplainer

    if args.background_size < 1:
        raise InputDataError("--background-size must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputDataError("--batch-size must be at least 1")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputDataError("--plot needs matplotlib: pip install 'onnxshap[plots]'") from None
    started = time.perf_counter()
    data = _collect_data(args)
    if args.background:
        background = load_array_file(args.background, "background")
    else:
        background = _sample_background(data, args.background_size, args.seed)
    names = Path(args.names).read_text().split() if args.names else None
    explainer = DeepExplainer(args.model, background, layer=args.layer, outputs=args.outputs,
                              device=args.device, batch_size=args.batch_size, feature_names=names)
    result = explainer.explain(data, ranked_outputs=args.rank, output_rank_order=args.rank_order,
                               check_additivity=not args.no_check, progress=not args.quiet)
    explanations = result if isinstance(result, list) else [result]
    first = explanations[0]
    arrays = {
        "expected_value": np.atleast_1d(explainer._expected),
        "output_indices": first.output_indices,
        "predictions": first.predictions,
        "additivity_error": first.additivity_error,
    }
    if len(explanations) == 1:
        arrays["shap_values"] = first.values
    else:
        arrays.update({f"shap_values_{e.input_name}": e.values for e in explanations})
    output = Path(args.output) if args.output else _default_output(args)
    _write_npz(output, arrays)
    if args.save_graph:
        explainer.save_augmented(args.save_graph)
    if args.plot:
        _plot(first, args.plot)
    if not args.quiet:
        _summary(explainer, explanations, output, time.perf_counter() - started, args)
    return EXIT_OK


def _plot(explanation, path: str) -> None:
    from onnxshap import plots

    values, data = explanation.values, explanation.data
    if data.ndim == 4:  # images (n, C, H, W) or (n, H, W, C)
        plots.image_plot(values, data, output_names=explanation.output_names, path=path)
    elif data.ndim == 3:  # sequences (n, T, F): the first explained output
        plots.timeseries_heatmap(values[..., 0], variable_names=explanation.feature_names, path=path)
    else:
        plots.importance_bar(np.abs(values).mean(axis=(0, -1)).reshape(-1), names=explanation.feature_names,
                             path=path)


def _summary(explainer, explanations, output: Path, seconds: float, args) -> None:
    first = explanations[0]
    n, k = first.output_indices.shape
    m = next(iter(explainer.background.values())).shape[0]
    print(f"onnxshap: explained {n} row(s) of {args.model} against {m} background row(s), "
          f"{k} output(s) per row")
    for e in explanations:
        print(f"  {e.input_name}: values {e.values.shape}")
    expected = np.atleast_1d(explainer._expected)
    shown = ", ".join(f"{v:.6g}" for v in expected[:10]) + (", ..." if expected.size > 10 else "")
    print(f"  expected value: [{shown}]")
    print(f"  worst additivity error: {first.additivity_error.max():.3g} (row {int(first.additivity_error.argmax())})")
    if args.verbose:
        total = sum(np.abs(e.values).mean(axis=(0, -1)) for e in explanations[:1])
        top = np.argsort(-total.reshape(-1))[:5]
        print(f"  largest mean |value| at flat feature indices {top.tolist()}")
    print(f"  wrote {output}" + (f", {args.plot}" if args.plot else "") +
          (f", {args.save_graph}" if args.save_graph else "") + f" in {seconds:.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v and -q exclude each other")
    try:
        return run(args)
    except OnnxShapError as exc:
        print(f"onnxshap: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxshap: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except MemoryError:
        print("onnxshap: error: out of memory; try a smaller --batch-size or background", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
