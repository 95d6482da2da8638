"""Side-by-side benchmark, cold and warm: onnxshap vs Captum DeepLiftShap, shap.DeepExplainer, shap's legacy TF1
path and the gradient floor.

Every (tool, model) cell runs in its own process, so its peak RSS and its cold start are its own. Per cell:

- **cold**: construction + the first call, in a fresh process, imports excluded. onnxshap gets the model as
  the framework object (a torch module or a Keras model), so its cold time includes the export to ONNX (shown
  apart as ``export``). It runs twice: ``onnxshap`` with an empty cache folder, then ``onnxshap (cached)`` in
  a new process with the folder the first one filled (``onnxshap.cache``: the augmented graph, and a Keras
  model's export). shap and Captum need no graph build: their first call is their only call, so their cold
  time is set-up + that call and their warm time the call alone. The legacy path reports shap's own set-up
  and call times.
- **whole fresh process** (a note, onnxshap and the legacy path): wall time from the cell's start (after NumPy's
  import) to the end of the first call: the framework's and the tool's imports, building the model and its
  reference predictions, then the cold call (for the legacy path: TensorFlow's start and the tf_keras model's
  graph-mode build).
- **warm**: the median of ``--repeats`` further calls (onnxshap, the floor).
- additivity: ``max |Σφ − (f(x) − mean f(R))| / max(1, |f(x) − mean f(R)|)`` over the values.

The gradient floor is the least any DeepLIFT-style method must do: one ONNX Runtime forward over the n + m rows
and one torch.autograd backward over the n·m·k (sample, reference, output) pairs.

    python benchmarks/run.py                          # every model and tool, n = m = 100, all outputs
    python benchmarks/run.py --n 20 --models cnn      # one model
    python benchmarks/run.py --acceptance             # issue 12's acceptance runs, with PASS/FAIL and ratios
    python benchmarks/run.py --resnet                 # ResNet-18 at 224², n = 8, m = 50, top-1: time, RSS
    python benchmarks/run.py --large                  # 10 000 CNN rows against 100 references, top output
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

STARTED = time.perf_counter()  # a cell's "process" time counts from here, as legacy_shap.py's does
BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

from models import KERAS_MODELS, RECURRENT, build_model, hook_safe, keras_twin_weights, make_data, predict  # noqa: E402

TOOLS = ("onnxshap", "onnxshap-cached", "captum", "shap", "shap-keras", "floor")
MODELS = ("mlp", "cnn", "runoff_lstm", "stacked_lstm", "keras_bilstm")
FLOOR_CHUNK = 10_000  # rows per autograd pass of the gradient floor


def applies(tool: str, model: str) -> bool:
    """Whether ``tool`` runs on ``model`` (the torch tools need a torch model; the legacy path an LSTM stack)."""
    if model in KERAS_MODELS:
        return tool.startswith("onnxshap")
    if tool == "shap-keras":
        return model in RECURRENT
    return True


# -- tools: each returns {"cold", "warm", "values" (n, *features, k) or None, ...} ----------------------------
MAX_MEMORY = {"resnet18": 1 << 30}  # issue 12's ResNet run: RSS within this budget + 500 MB; others: the default


def run_onnxshap(model, x, background, repeats, ranked=None, model_name=""):
    import onnxshap
    import onnxshap.explainer as explainer_module

    exported = []
    export = explainer_module.framework_to_onnx

    def timed_export(*args):
        start = time.perf_counter()
        try:
            return export(*args)
        finally:
            exported.append(time.perf_counter() - start)

    explainer_module.framework_to_onnx = timed_export
    start = time.perf_counter()
    explainer = onnxshap.DeepExplainer(model, background, max_memory=MAX_MEMORY.get(model_name))
    values = explainer.shap_values(x, ranked_outputs=ranked, check_additivity=False)
    cold = time.perf_counter() - start
    process = time.perf_counter() - STARTED
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        values = explainer.shap_values(x, ranked_outputs=ranked, check_additivity=False)
        times.append(time.perf_counter() - begin)
    values, indices = values if ranked else (values, None)
    values = values if values.ndim == x.ndim + 1 else values[..., None]
    return {"cold": cold, "warm": statistics.median(times) if times else None, "values": values,
            "indices": indices, "export": sum(exported), "nodes": len(explainer.augmented.model.graph),
            "process": process}


CAPTUM_PAIR_ROWS = {"resnet18": 50}  # (sample, reference) rows per Captum call where all of them exceed RAM
DEFAULT_CAPTUM_PAIR_ROWS = 2_000  # CNN: 2 000 rows took 4.7 GB; all 10 000 of n = 100 were killed (23 GB RAM)


def run_captum(module, x, background, repeats, ranked=None, model_name=""):
    """DeepLiftShap, one call per output and per chunk of samples (all references each: Captum expands every
    sample over the m baselines, so a call holds n_chunk·m rows of activations)."""
    import torch
    from captum.attr import DeepLiftShap

    start = time.perf_counter()
    explainer = DeepLiftShap(module)
    inputs, baselines = torch.tensor(x), torch.tensor(background)
    with torch.no_grad():
        outputs = module(inputs)
    targets = outputs.argmax(1, keepdim=True) if ranked else torch.arange(outputs.shape[1]).repeat(len(x), 1)
    rows = max(1, CAPTUM_PAIR_ROWS.get(model_name, DEFAULT_CAPTUM_PAIR_ROWS) // len(background))
    set_up = time.perf_counter()
    values = np.concatenate([np.stack([explainer.attribute(inputs[s:s + rows], baselines=baselines,
                                                           target=targets[s:s + rows, j]).detach().numpy()
                                       for j in range(targets.shape[1])], axis=-1)
                             for s in range(0, len(x), rows)])
    end = time.perf_counter()
    return {"cold": end - start, "warm": end - set_up, "values": values, "indices": targets.numpy()}


def run_shap(module, x, background, repeats, ranked=None):
    import shap
    import torch

    start = time.perf_counter()
    explainer = shap.DeepExplainer(module, torch.tensor(background))
    set_up = time.perf_counter()
    values = explainer.shap_values(torch.tensor(x), ranked_outputs=ranked, check_additivity=False)
    end = time.perf_counter()
    values, indices = values if ranked else (values, None)
    values = np.asarray(values)
    values = values if values.ndim == x.ndim + 1 else values[..., None]
    return {"cold": end - start, "warm": end - set_up, "values": values,
            "indices": None if indices is None else np.asarray(indices)}


def run_floor(module, x, background, repeats, ranked=None):
    """ORT forward over n + m rows + an autograd backward over the n·m·k pair rows (in chunks of 10 000)."""
    import onnxruntime as ort
    import torch
    from onnxshap.converters import export_torch

    proto = export_torch(module, background[:2])
    m = len(background)
    k = 1 if ranked else predict(module, x[:1]).shape[1]
    rows = np.repeat(x, m * k, axis=0)
    times = []
    start = time.perf_counter()
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(repeats + 1):
        begin = time.perf_counter()
        session.run(None, {name: np.concatenate([x, background])})
        for first in range(0, len(rows), FLOOR_CHUNK):  # chunks keep activations in memory
            pairs = torch.tensor(rows[first:first + FLOOR_CHUNK], requires_grad=True)
            out = module(pairs)
            seed = torch.zeros_like(out)
            index = torch.arange(first, first + len(pairs))
            seed[index - first, index % k if not ranked else out.argmax(1)] = 1.0
            out.backward(seed)
        times.append(time.perf_counter() - begin)
        if len(times) == 1:
            cold = time.perf_counter() - start
    return {"cold": cold, "warm": statistics.median(times[1:]) if repeats else times[0], "values": None}


def run_shap_keras(module, x, background, repeats, ranked=None):
    """shap.DeepExplainer on the tf_keras twin through shap's legacy TF1 path (one-direction LSTM stacks)."""
    import legacy_shap

    with tempfile.TemporaryDirectory() as folder:
        source, target = f"{folder}/in.npz", f"{folder}/out.npz"
        legacy_shap.write_input(source, x=x, background=background, **keras_twin_weights(module))
        result = legacy_shap.run([(source, target)])[0]
    seconds, setup = float(result["seconds"]), float(result["setup_seconds"])
    return {"cold": setup + seconds, "warm": seconds, "values": result["shap_values"],
            "process": float(result["process_seconds"])}


RUNNERS = {"onnxshap": run_onnxshap, "onnxshap-cached": run_onnxshap, "captum": run_captum, "shap": run_shap,
           "floor": run_floor, "shap-keras": run_shap_keras}


def additivity(values: np.ndarray, predictions: np.ndarray, expected: np.ndarray, indices=None) -> float:
    """values (n, *features, k); predictions (n, all outputs); expected (all outputs,)."""
    total = values.reshape(values.shape[0], -1, values.shape[-1]).sum(axis=1)
    change = predictions - expected
    if indices is not None:
        change = np.take_along_axis(change, np.asarray(indices).reshape(len(change), -1), axis=1)
    return float((np.abs(total - change) / np.maximum(1.0, np.abs(change))).max())


def worker(tool: str, model_name: str, n: int, m: int, repeats: int, ranked: int | None) -> dict:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(model_name)
    x, background = make_data(model_name, n, m)
    predictions, expected = predict(model, x), predict(model, background).mean(axis=0)
    if tool in ("shap", "captum") and model_name == "resnet18":
        model = hook_safe(model)
    extra = {"model_name": model_name} if tool in ("captum", "onnxshap", "onnxshap-cached") else {}
    result = RUNNERS[tool](model, x, background, repeats, ranked, **extra)
    values = result.pop("values")
    indices = result.pop("indices", None)
    if values is not None:
        result["additivity"] = additivity(values.astype(np.float64), predictions, expected, indices)
    result["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# -- the driver ---------------------------------------------------------------------------------------------
def spawn(tool: str, model: str, n: int, m: int, repeats: int, timeout: float, ranked: int | None = None,
          env: dict | None = None) -> dict:
    """Run one cell in a fresh Python (its own cold start and peak RSS); ``{"error": ...}`` when it fails."""
    args = ["--worker", tool, model, "--n", str(n), "--m", str(m), "--repeats", str(repeats)]
    args += ["--ranked", str(ranked)] if ranked else []
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": tail[:160]}
    return json.loads(lines[-1])


def run_model(model: str, tools: list[str], n: int, m: int, repeats: int, timeout: float,
              ranked: int | None = None) -> dict[str, dict | None]:
    """Every tool on one model; the two onnxshap runs share one fresh cache folder (empty for the first)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnxshap-bench-cache-") as cache:
        for tool in tools:
            if not applies(tool, model):
                results[tool] = None
                continue
            tool_repeats = repeats if tool.startswith("onnxshap") or tool == "floor" else 1
            env = {"ONNXSHAP_CACHE": "1", "ONNXSHAP_CACHE_DIR": cache}
            results[tool] = spawn(tool, model, n, m, tool_repeats, timeout, ranked, env)
    return results


def _seconds(value) -> str:
    return f"{value:8.3f}s" if isinstance(value, (int, float)) else f"{'—':>9}"


def print_table(title: str, rows: dict[str, dict[str, dict | None]], tools: list[str]) -> None:
    """Cold and warm per model and tool, ratios to onnxshap's cold and warm, peak RSS and additivity."""
    print(f"\n{title}")
    print(f"{'model':14s} {'tool':16s} {'cold':>9s} {'ratio':>7s} {'warm':>9s} {'ratio':>7s} {'peakRSS':>8s} "
          f"{'additiv.':>9s}  notes")
    for model, results in rows.items():
        base = results.get("onnxshap") or {}
        for tool in tools:
            result = results.get(tool)
            if result is None:
                continue
            if "error" in result:
                print(f"{model:14s} {tool:16s} failed: {result['error']}")
                continue
            ratios = [f"{result[key] / base[key]:6.2f}×" if isinstance(result.get(key), (int, float)) and
                      isinstance(base.get(key), (int, float)) and base[key] > 0 else "" for key in ("cold", "warm")]
            error = f"{result['additivity']:.1e}" if result.get("additivity") is not None else "—"
            notes = []
            if result.get("export"):
                notes.append(f"export {result['export']:.2f} s")
            if result.get("nodes"):
                notes.append(f"{result['nodes']} nodes")
            if result.get("process"):
                notes.append(f"whole fresh process {result['process']:.2f} s")
            print(f"{model:14s} {tool:16s} {_seconds(result['cold'])} {ratios[0]:>7s} {_seconds(result.get('warm'))} "
                  f"{ratios[1]:>7s} {result['rss'] / 2**20:6.0f}MB {error:>9s}  {', '.join(notes)}", flush=True)


def machine() -> str:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return (f"{cpu}, {os.cpu_count()} cores{load}, Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="samples to explain (default 100)")
    parser.add_argument("--m", type=int, default=100, help="background rows (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="warm repeats per cell (median; default 3)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per cell before giving up")
    parser.add_argument("--acceptance", action="store_true", help="issue 12's acceptance runs (see acceptance.py)")
    parser.add_argument("--resnet", action="store_true", help="ResNet-18 at 224², n = 8, m = 50, top-1")
    parser.add_argument("--large", action="store_true", help="10 000 CNN rows, top output, peak RSS")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--ranked", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        tool, model = args.worker
        if tool == "large":
            print(json.dumps(worker_large(args.n, args.m)))
        else:
            print(json.dumps(worker(tool, model, args.n, args.m, args.repeats, args.ranked)))
        return 0
    print(f"machine: {machine()}")
    if args.acceptance or args.resnet:
        import acceptance

        return acceptance.main(args, resnet_only=args.resnet and not args.acceptance)
    if args.large:
        n = 10_000 if args.n == 100 else args.n
        print(f"large: CNN, n = {n}, m = {args.m}, ranked_outputs = 1")
        result = spawn("large", "cnn", n, args.m, 1, args.timeout)
        print(json.dumps(result))
        return 0 if "error" not in result else 1
    rows = {model: run_model(model, args.tools, args.n, args.m, args.repeats, args.timeout) for model in args.models}
    print_table(f"n = {args.n} samples, m = {args.m} references, all outputs; warm: median of {args.repeats}; "
                "ratio = time / onnxshap's", rows, args.tools)
    return 0


def worker_large(n: int, m: int) -> dict:
    """10 000 CNN rows against 100 references, top output only, with progress."""
    import onnxshap

    module = build_model("cnn")
    x, background = make_data("cnn", n, m)
    explainer = onnxshap.DeepExplainer(module, background)
    start = time.perf_counter()
    exp = explainer.explain(x, ranked_outputs=1, progress=True)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "rss": rss, "additivity": float(exp.additivity_error.max())}


if __name__ == "__main__":
    sys.exit(main())
