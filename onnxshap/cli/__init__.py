"""Command line: ``onnxshap model.onnx data.npy`` → SHAP values in an .npz, a summary, optionally a plot."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from onnxshap.cli.inputs import collect_data, data_files, load_array_file, memory_size, read_model, sample_background
from onnxshap.cli.outputs import checkpoints_of, default_output, plot_format, result_arrays, stage_plot, summary
from onnxshap.errors import OnnxShapError, UsageError, first_line
from onnxshap.files.model_files import data_path, stage_model
from onnxshap.files.read import read_text_file
from onnxshap.files.write import OutputSet, Terminated, raise_on_sigterm
from onnxshap.load.data import feeds
from onnxshap.load.model import signature
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
memory: --max-memory bounds each ONNX Runtime call; samples and references are split to fit (balanced), outputs
  only where one pair cannot hold them all.
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
    parser.add_argument("--max-memory", type=memory_size, metavar="SIZE",
                        help="memory budget per ONNX Runtime call: bytes or 512M, 2G (default: a quarter of the RAM, "
                             "at most 512M); samples and references are split to fit, outputs last")
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



def _check_options(args) -> None:
    if args.background_size < 1:
        raise UsageError("--background-size must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")


def run(args) -> int:
    """Check every option, file and output target; explain; then write every output together."""
    from onnxshap.explainer import DeepExplainer

    _check_options(args)
    image_format = plot_format(args.plot) if args.plot else None
    started = time.perf_counter()
    names = read_text_file(args.names, "--names").split() if args.names else None
    vocabulary = read_text_file(args.vocab, "--vocab").splitlines() if args.vocab else None
    model_files: list[Path] = []
    proto = read_model(args, model_files)
    checkpoints = None
    with OutputSet(inputs=[*model_files, *data_files(args)]) as outputs:
        output = outputs.check(args.output or default_output(args), "output")
        plot = outputs.check(args.plot, "--plot") if args.plot else None
        graph = outputs.check(args.save_graph, "--save-graph") if args.save_graph else None
        graph_data = outputs.check(data_path(graph), "--save-graph weights") if graph else None
        model = signature(proto)
        shapes = model.feature_shapes
        data = feeds(collect_data(args, shapes), model, "data")
        if args.background:
            background = load_array_file(args.background, "background", shapes)
        else:
            background = sample_background(data, args.background_size, args.seed)
        explainer = DeepExplainer(proto, background, layer=args.layer, outputs=args.outputs, device=args.device,
                                  batch_size=args.batch_size, max_memory=args.max_memory, feature_names=names,
                                  cache=not args.no_cache)
        if args.resume:
            checkpoints = checkpoints_of(args, output, model_files, data, explainer)
        result = explainer.explain(data, ranked_outputs=args.rank, output_rank_order=args.rank_order,
                                   check_additivity=not args.no_check, progress=not args.quiet,
                                   checkpoint=checkpoints)
        explanations = result if isinstance(result, list) else [result]
        if plot is not None:
            stage_plot(outputs, plot, image_format, explanations[0], vocabulary)
        if graph is not None:
            stage_model(outputs, graph, explainer.augmented.model, graph_data, ir_version=runtime_ir_version())
        arrays = result_arrays(explainer, explanations)
        outputs.stage(output, lambda file: np.savez(file, **arrays))
        outputs.commit()
    if checkpoints is not None:
        checkpoints.remove()
    if not args.quiet:
        summary(explainer, explanations, output, time.perf_counter() - started, args, checkpoints)
    return EXIT_OK


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
