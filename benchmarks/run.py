"""Side-by-side benchmark: onnxshap vs Captum DeepLiftShap, shap.DeepExplainer and the gradient floor.

Every (tool, model) cell runs in its own process, so its peak RSS is its own. Each prints the median wall time
of the explanation (model set-up excluded for all tools, the first call included in the median for none),
the peak RSS of its process and the worst additivity error of its values:
``max |Σφ − (f(x) − mean f(R))| / max(1, |f(x) − mean f(R)|)``.

The gradient floor is the least any DeepLIFT-style method must do: one ONNX Runtime forward over the n + m
rows and one torch.autograd backward over the n·m·k (sample, reference, output) pairs.

    python benchmarks/run.py                       # all models, n = m = 100, all outputs
    python benchmarks/run.py --n 20 --models cnn   # the issue's reference point
    python benchmarks/run.py --large               # 10 000 CNN rows against 100 references, top output
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
TOOLS = ("onnxshap", "captum", "shap", "shap-keras", "floor")
FLOOR_CHUNK = 10_000  # rows per autograd pass of the gradient floor
MODELS = ("mlp", "cnn", "runoff_lstm", "stacked_lstm")


# -- models -------------------------------------------------------------------------------------------
def build_model(name: str):
    """(torch module in eval mode, input feature shape) with seeded random weights."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3)).eval(), (20,)
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10)).eval(), (1, 28, 28)

    class Recurrent(nn.Module):
        def __init__(self, features: int, hidden: list[int]) -> None:
            super().__init__()
            sizes = [features] + hidden
            self.layers = nn.ModuleList(nn.LSTM(a, b, batch_first=True) for a, b in itertools.pairwise(sizes))
            self.head = nn.Linear(hidden[-1], 1)

        def forward(self, x):
            for layer in self.layers:
                x, _ = layer(x)
            return self.head(x[:, -1])

    if name == "runoff_lstm":
        return Recurrent(9, [32]).eval(), (12, 9)
    if name == "stacked_lstm":
        return Recurrent(3, [10, 5, 1]).eval(), (10, 3)
    raise ValueError(name)


def make_data(shape, n: int, m: int):
    rng = np.random.default_rng(0)
    return rng.random((n, *shape), dtype=np.float32), rng.random((m, *shape), dtype=np.float32)


def additivity(values: np.ndarray, predictions: np.ndarray, expected: np.ndarray) -> float:
    """values (n, *features, k); predictions (n, k); expected (k,)."""
    total = values.reshape(values.shape[0], -1, values.shape[-1]).sum(axis=1)
    change = predictions - expected
    return float((np.abs(total - change) / np.maximum(1.0, np.abs(change))).max())


# -- tools (each returns: seconds per repeat, values (n, *features, k)) -------------------------------
def run_onnxshap(module, x, background, repeats):
    from onnxshap.converters import export_torch

    import onnxshap

    proto = export_torch(module, background[:2])
    explainer = onnxshap.DeepExplainer(proto, background)
    explainer.shap_values(x[:1], check_additivity=False)  # builds and caches the augmented graph for k outputs
    times, values = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        values = explainer.shap_values(x, check_additivity=False)
        times.append(time.perf_counter() - start)
    return times, values if values.ndim == x.ndim + 1 else values[..., None]


def run_captum(module, x, background, repeats):
    import torch
    from captum.attr import DeepLiftShap

    explainer = DeepLiftShap(module)
    inputs, baselines = torch.tensor(x), torch.tensor(background)
    k = module(inputs[:1]).shape[1]
    times, values = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        values = np.stack([explainer.attribute(inputs, baselines=baselines, target=j).detach().numpy()
                           for j in range(k)], axis=-1)
        times.append(time.perf_counter() - start)
    return times, values


def run_shap(module, x, background, repeats):
    import shap
    import torch

    explainer = shap.DeepExplainer(module, torch.tensor(background))
    times, values = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        values = np.asarray(explainer.shap_values(torch.tensor(x), check_additivity=False))
        times.append(time.perf_counter() - start)
    return times, values if values.ndim == x.ndim + 1 else values[..., None]


def run_floor(module, x, background, repeats):
    """ORT forward over n + m rows + an autograd backward over the n·m·k pair rows (in chunks of 10 000)."""
    import onnxruntime as ort
    import torch
    from onnxshap.converters import export_torch

    proto = export_torch(module, background[:2])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    m = len(background)
    k = module(torch.tensor(x[:1])).shape[1]
    rows = np.repeat(x, m * k, axis=0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: np.concatenate([x, background])})
        for begin in range(0, len(rows), FLOOR_CHUNK):  # chunks keep activations in memory
            pairs = torch.tensor(rows[begin:begin + FLOOR_CHUNK], requires_grad=True)
            out = module(pairs)
            seed = torch.zeros_like(out)
            index = torch.arange(begin, begin + len(pairs))
            seed[index - begin, index % k] = 1.0
            out.backward(seed)
        times.append(time.perf_counter() - start)
    return times, None


def run_shap_keras(module, x, background, repeats):
    """shap.DeepExplainer on the tf_keras twin through shap's legacy TF1 path (single-layer LSTMs only)."""
    import tempfile

    import legacy_shap

    if len(module.layers) != 1:
        raise ValueError("the legacy Keras path is benchmarked on single-layer LSTMs only")
    lstm = module.layers[0]
    weights = legacy_shap.keras_lstm_weights(*(getattr(lstm, f"{p}_l0").detach().numpy()
                                               for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    with tempfile.TemporaryDirectory() as folder:
        source, target = f"{folder}/in.npz", f"{folder}/out.npz"
        legacy_shap.write_input(source, cell="lstm", kernel=weights[0], recurrent_kernel=weights[1], bias=weights[2],
                                dense_kernel=module.head.weight.detach().numpy().T,
                                dense_bias=module.head.bias.detach().numpy(), x=x, background=background)
        result = legacy_shap.run([(source, target)])[0]
    return [float(result["seconds"])], result["shap_values"]


RUNNERS = {"onnxshap": run_onnxshap, "captum": run_captum, "shap": run_shap, "floor": run_floor,
           "shap-keras": run_shap_keras}


def worker(tool: str, model_name: str, n: int, m: int, repeats: int) -> dict:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    module, shape = build_model(model_name)
    x, background = make_data(shape, n, m)
    with torch.no_grad():
        predictions = module(torch.tensor(x)).numpy().astype(np.float64)
        expected = module(torch.tensor(background)).numpy().astype(np.float64).mean(axis=0)
    times, values = RUNNERS[tool](module, x, background, repeats)
    error = additivity(values.astype(np.float64), predictions, expected) if values is not None else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times), "rss": rss, "additivity": error}


def worker_large(n: int, m: int) -> dict:
    """10 000 CNN rows against 100 references, top output only, with progress."""
    from onnxshap.converters import export_torch

    import onnxshap

    module, shape = build_model("cnn")
    x, background = make_data(shape, n, m)
    explainer = onnxshap.DeepExplainer(export_torch(module, background[:2]), background)
    start = time.perf_counter()
    exp = explainer.explain(x, ranked_outputs=1, progress=True)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "rss": rss, "additivity": float(exp.additivity_error.max())}


def _spawn(args: list[str], timeout: float) -> dict | None:
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": tail[:120]}
    return json.loads(lines[-1])


def _cell(result: dict | None, base: float | None) -> str:
    if result is None or "error" in result:
        return f"{'n/a':>9} {'':>7} {'':>8} {'':>9}"
    ratio = f"{result['seconds'] / base:6.2f}×" if base else ""
    error = f"{result['additivity']:.1e}" if result.get("additivity") is not None else "—"
    return f"{result['seconds']:8.3f}s {ratio:>7} {result['rss'] / 2**20:6.0f}MB {error:>9}"


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
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="samples to explain (default 100)")
    parser.add_argument("--m", type=int, default=100, help="background rows (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median; default 3)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per cell before giving up")
    parser.add_argument("--large", action="store_true", help="10 000 CNN rows, top output, peak RSS")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        tool, model = args.worker
        result = worker_large(args.n, args.m) if tool == "large" else worker(tool, model, args.n, args.m,
                                                                               args.repeats)
        print(json.dumps(result))
        return 0
    print(f"machine: {machine()}")
    if args.large:
        n = 10_000 if args.n == 100 else args.n
        print(f"large: CNN, n = {n}, m = {args.m}, ranked_outputs = 1")
        result = _spawn(["--worker", "large", "cnn", "--n", str(n), "--m", str(args.m)], args.timeout)
        print(json.dumps(result))
        return 0 if result and "error" not in result else 1
    print(f"n = {args.n} samples, m = {args.m} references, all outputs; median of {args.repeats}; "
          "ratio = time / onnxshap's time")
    header = f"{'model':14s}" + "".join(f" | {tool:>35s}" for tool in args.tools)
    print("shap-keras: shap's legacy TF1 path on the tf_keras twin (the only exact shap path for LSTMs); "
          "floor: ORT forward + torch backward over the n·m·k pairs")
    print(header)
    print(f"{'':14s}" + "".join(f" | {'time':>9} {'ratio':>7} {'peakRSS':>8} {'additiv.':>9}" for _ in args.tools))
    for model in args.models:
        results = {}
        for tool in args.tools:
            if tool == "shap-keras" and model != "runoff_lstm":
                results[tool] = None
                continue
            repeats = args.repeats if tool in ("onnxshap", "floor") else 1
            results[tool] = _spawn(["--worker", tool, model, "--n", str(args.n), "--m", str(args.m),
                                    "--repeats", str(repeats)], args.timeout)
        base = results.get("onnxshap", {}) or {}
        base_seconds = base.get("seconds") if "error" not in base else None
        print(f"{model:14s}" + "".join(f" | {_cell(results[t], base_seconds)}" for t in args.tools), flush=True)
        for tool, result in results.items():
            if result is not None and "error" in result:
                print(f"    {tool} on {model}: {result['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
