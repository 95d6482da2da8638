"""Memory: graphs over protobuf's 2 GB limit, the per-call estimate against ONNX Runtime's real peak, and peak
RSS of whole runs (measured in subprocesses, tests/peak_rss.py) inside the memory budget."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxshap
from onnxshap import runtime
from onnxshap.cli import EXIT_OK, main
from onnxshap.errors import OnnxShapError
from onnxshap.files import model_files
from tests import peak_rss
from tests.scale_models import mlp

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MB = 1 << 20


# -- graphs over the 2 GB limit (the limit forced down to 256 KiB) ---------------------------------------------
@pytest.fixture
def wide():
    """An MLP with ~0.8 MB of weights, its background and rows."""
    rng = np.random.default_rng(0)
    return (mlp(features=64, hidden=(1024, 128), outputs=3), rng.normal(size=(8, 64)).astype(np.float32),
            rng.normal(size=(5, 64)).astype(np.float32))


def _partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".onnxshap-partial-" in p.name]


def test_a_graph_over_the_limit_runs_from_external_data_with_the_same_values(monkeypatch, wide):
    model, background, x = wide
    expected = onnxshap.DeepExplainer(model, background).shap_values(x)
    monkeypatch.setattr(model_files, "INLINE_LIMIT", 256 << 10)
    from_files = []
    original = runtime._session_from_files
    monkeypatch.setattr(runtime, "_session_from_files", lambda *a: from_files.append(1) or original(*a))
    ex = onnxshap.DeepExplainer(model, background)
    np.testing.assert_array_equal(ex.shap_values(x), expected)
    assert from_files, "the augmented session was not made from external data"
    with pytest.raises(OnnxShapError, match="over protobuf's 2 GB limit for one ModelProto; save it with"):
        ex.augmented.proto


def test_save_augmented_over_the_limit_writes_the_weights_beside_the_graph(monkeypatch, tmp_path, wide):
    model, background, x = wide
    monkeypatch.setattr(model_files, "INLINE_LIMIT", 256 << 10)
    ex = onnxshap.DeepExplainer(model, background)
    path = ex.save_augmented(tmp_path / "aug.onnx")
    side = tmp_path / "aug.onnx.data"
    assert path.stat().st_size < 64 << 10 and side.stat().st_size >= model_files.weight_bytes(ex.augmented.model)
    assert _partials(tmp_path) == []
    proto = onnx.load(str(path))  # reads the external data through the relative location
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(path), load_external_data=False)
               .graph.initializer)
    onnx.checker.check_model(str(path), full_check=True)
    aug = ex.augmented
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {aug.inputs["x"]: x, aug.references["x"]: background,
             aug.output_index: np.tile(np.arange(3, dtype=np.int64), (len(x), 1))}
    np.testing.assert_allclose(session.run([aug.values[0]], feeds)[0], ex.shap_values(x), rtol=1e-6, atol=1e-7)
    assert len(proto.graph.initializer) == len(aug.model.graph.initializers)


def test_cli_save_graph_over_the_limit_writes_both_files_and_below_it_one(monkeypatch, tmp_path, wide):
    model, background, x = wide
    onnx.save(model, str(tmp_path / "wide.onnx"))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "bg.npy", background)
    args = [str(tmp_path / "wide.onnx"), str(tmp_path / "x.npy"), "-b", str(tmp_path / "bg.npy"), "-q"]
    assert main([*args, "--save-graph", str(tmp_path / "small.onnx")]) == EXIT_OK
    assert not (tmp_path / "small.onnx.data").exists()
    monkeypatch.setattr(model_files, "INLINE_LIMIT", 256 << 10)
    assert main([*args, "--save-graph", str(tmp_path / "big.onnx")]) == EXIT_OK
    assert (tmp_path / "big.onnx.data").stat().st_size > 256 << 10
    a, b = onnx.load(str(tmp_path / "small.onnx")), onnx.load(str(tmp_path / "big.onnx"))
    assert [onnx.numpy_helper.to_array(t).tobytes() for t in a.graph.initializer] == \
        [onnx.numpy_helper.to_array(t).tobytes() for t in b.graph.initializer]
    assert _partials(tmp_path) == []


def test_the_side_file_is_checked_like_every_output(monkeypatch, tmp_path, wide):
    model, background, _ = wide
    monkeypatch.setattr(model_files, "INLINE_LIMIT", 256 << 10)
    (tmp_path / "aug.onnx.data").mkdir()
    with pytest.raises(OnnxShapError, match=r"aug.onnx.data is a folder; onnxshap only replaces regular files"):
        onnxshap.DeepExplainer(model, background).save_augmented(tmp_path / "aug.onnx")
    assert not (tmp_path / "aug.onnx").exists() and _partials(tmp_path) == []


# -- peak memory, measured --------------------------------------------------------------------------------------
def _peak_rss(args: list[str], timeout: float, stderr_tty: bool = False, env=None) -> tuple[int, str, str, int]:
    """Run ``args``; return (peak RSS in bytes, stdout, stderr, exit status), measured by the trampoline of
    ``tests/peak_rss.py`` (so pytest's own size is not counted). With ``stderr_tty`` stderr is a pseudo-terminal
    (progress bars draw only on a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "peak"
        out, err = _communicate(peak_rss.wrap(args, report), timeout, stderr_tty, env)
        peak_kib, code = peak_rss.read(report)
    return peak_kib * 1024, out.decode(), err.decode(errors="replace"), code


def _communicate(args: list[str], timeout: float, stderr_tty: bool, env: dict) -> tuple[bytes, bytes]:
    """Run ``args`` to completion; its (stdout, stderr)."""
    master = slave = None
    if stderr_tty:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave if stderr_tty else subprocess.PIPE,
                               env=env, cwd=ROOT)
    err = b""
    if stderr_tty:
        os.close(slave)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                err += chunk
            elif process.poll() is not None:
                break
        os.close(master)
    out = process.stdout.read()
    if not stderr_tty:
        err = process.stderr.read()
    process.wait(timeout)
    return out, err


CNN_RUN = """
import resource, sys, numpy as np, onnxshap
budget = int(sys.argv[1])
background = np.load("models/digits_background.npy")
rng = np.random.default_rng(0)
big = np.repeat(background, -(-10_000 // len(background)), axis=0)[:10_000]
big = big + rng.normal(scale=0.05, size=big.shape).astype(np.float32)
ex = onnxshap.DeepExplainer("models/digits_cnn.onnx", big, max_memory=budget, device="cpu")
x = np.load("models/digits_sample.npy")[:3]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
exp = ex(x)
print(before, float(exp.additivity_error.max()), exp.values.shape)
"""


def test_ten_thousand_background_rows_on_a_cnn_stay_inside_the_budget():
    """10 000 references × 3 rows × 10 outputs with a 256 MiB budget: the references are split across calls, the
    peak stays under budget + 500 MB, and ONNX Runtime's share of it under the per-call estimate (the budget)."""
    budget = 256 * MB
    peak, out, err, code = _peak_rss([sys.executable, "-c", CNN_RUN, str(budget)], timeout=300)
    assert code == 0, err
    before, error, shape = out.split(maxsplit=2)
    assert shape.strip() == "(3, 1, 8, 8, 10)" and float(error) <= 1e-4
    print(f"peak RSS {peak / MB:.0f} MB, before explaining {int(before) / MB:.0f} MB, budget {budget / MB:.0f} MB")
    assert peak < budget + 500 * MB
    assert peak - int(before) <= budget  # the estimate is an upper bound of what ONNX Runtime really takes


def test_the_estimate_bounds_onnx_runtimes_peak_for_each_call_shape():
    """One augmented call per shape (samples-heavy, references-heavy, outputs-heavy), each in its own process."""
    script = textwrap.dedent("""
        import resource, sys, numpy as np, onnxshap
        from onnxshap import runtime
        n, m, k = map(int, sys.argv[1:4])
        rng = np.random.default_rng(0)
        ex = onnxshap.DeepExplainer("models/digits_cnn.onnx", np.load("models/digits_background.npy"), device="cpu")
        aug = ex.augmented
        session = ex.runner.session(aug)
        feeds = {aug.inputs["input"]: rng.normal(size=(n, 1, 8, 8)).astype(np.float32),
                 aug.references["input"]: rng.normal(size=(m, 1, 8, 8)).astype(np.float32),
                 aug.output_index: np.tile(np.arange(k, dtype=np.int64), (n, 1))}
        references = feeds[aug.references["input"]]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        for size in (m, m // 2, m, m // 2):  # a last, smaller reference chunk between full ones
            feeds[aug.references["input"]] = references[:size]
            runtime.run(session, aug.values, feeds)
        print(before, aug.memory(n, m, k))
    """)
    from onnxshap.load.model import load_model, signature

    assert signature(load_model(MODELS / "digits_cnn.onnx")).inputs == ["input"]
    for n, m, k in [(2000, 4, 1), (1, 8000, 1), (40, 100, 10)]:
        peak, out, err, code = _peak_rss([sys.executable, "-c", script, str(n), str(m), str(k)], timeout=300)
        assert code == 0, err
        before, estimate = map(int, out.split())
        print(f"n={n} m={m} k={k}: ONNX Runtime {(peak - before) / MB:.0f} MB, estimate {estimate / MB:.0f} MB")
        assert peak - before <= estimate


OVERLAPPING_POOL = """
import resource, sys, numpy as np, onnx, onnx.helper as oh, onnxshap
from onnx import numpy_helper
from onnxshap import runtime
rng = np.random.default_rng(0)
weights = [numpy_helper.from_array(rng.normal(size=(16, 1, 3, 3)).astype(np.float32), "w"),
           numpy_helper.from_array(rng.normal(size=(10, 16 * 6 * 6)).astype(np.float32) * 0.01, "d")]
nodes = [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), oh.make_node("Relu", ["c"], ["a"]),
         oh.make_node("MaxPool", ["a"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
         oh.make_node("Flatten", ["p"], ["f"]), oh.make_node("Gemm", ["f", "d"], ["y"], transB=1)]
graph = oh.make_graph(nodes, "pool", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 12, 12])],
                      [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])], weights)
model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
model.ir_version = 9
n, m = 40, 200
ex = onnxshap.DeepExplainer(model, rng.random((m, 1, 12, 12), dtype=np.float32), device="cpu", cache=False)
aug = ex.augmented
session = ex.runner.session(aug)
feeds = {aug.inputs["x"]: rng.random((n, 1, 12, 12), dtype=np.float32),
         aug.references["x"]: ex.background["x"], aug.output_index: np.zeros((n, 1), np.int64)}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
for _ in range(2):
    runtime.run(session, aug.values, feeds)
print(before, aug.memory(n, m, 1))
"""


def test_the_estimate_counts_the_window_columns_of_an_overlapping_max_pool():
    """A 3×3 stride-2 max-pool routes through window columns of 9 × its output per pair row (2.25 × its input,
    the largest forward tensor): the estimate of a call on one output still bounds ONNX Runtime's peak."""
    peak, out, err, code = _peak_rss([sys.executable, "-c", OVERLAPPING_POOL], timeout=300)
    assert code == 0, err
    before, estimate = map(int, out.split())
    print(f"ONNX Runtime {(peak - before) / MB:.0f} MB, estimate {estimate / MB:.0f} MB")
    assert peak - before <= estimate


MILLION = """
import numpy as np, sys
from tests.scale_models import mlp
import onnx
onnx.save(mlp(features=10, hidden=(16,), outputs=2, seed=1), sys.argv[1] + "/mlp.onnx")
rng = np.random.default_rng(0)
np.save(sys.argv[1] + "/x.npy", rng.normal(size=(int(sys.argv[2]), 10)).astype(np.float32))
np.save(sys.argv[1] + "/bg.npy", rng.normal(size=(10, 10)).astype(np.float32))
"""


def _cli(folder: Path, rows: int, budget: str) -> tuple[int, str, str, int, float]:
    subprocess.run([sys.executable, "-c", MILLION, str(folder), str(rows)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    started = time.perf_counter()
    peak, out, err, code = _peak_rss([sys.executable, "-m", "onnxshap.cli", str(folder / "mlp.onnx"),
                                      str(folder / "x.npy"), "-b", str(folder / "bg.npy"), "-o",
                                      str(folder / "values.npz"), "--max-memory", budget],
                                     timeout=600, stderr_tty=True)
    return peak, out, err, code, time.perf_counter() - started


def test_a_million_rows_stream_within_the_budget_with_a_progress_bar(tmp_path):
    """1 000 000 rows × 10 features × 2 outputs against 10 references, 64 MiB per call: the peak is what a
    1 000-row run takes plus the data, the results and the budget, and nothing of it is held twice."""
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    base, _, err, code, _ = _cli(small, 1_000, "64M")
    assert code == EXIT_OK, err
    peak, out, err, code, seconds = _cli(big, 1_000_000, "64M")
    assert code == EXIT_OK, err
    assert "onnxshap: 100%" in err and "call" in err, err[-500:]  # tqdm's bar, drawn on the terminal
    n = 1_000_000
    data = n * 10 * 4
    # values; per row and output: predictions, output indices, expected values, their magnitudes, errors; per row:
    # the worst error
    results = n * 10 * 2 * 4 + n * 2 * 8 * 5 + n * 8
    print(f"1M rows: {seconds:.1f} s, peak RSS {peak / MB:.0f} MB (1 000 rows: {base / MB:.0f} MB; data "
          f"{data / MB:.0f} MB, results {results / MB:.0f} MB, budget 64 MB)")
    assert peak <= base + data + results + 64 * MB
    with np.load(big / "values.npz") as saved:
        assert saved["shap_values"].shape == (n, 10, 2) and saved["additivity_error"].max() <= 1e-4


# -- chunking -----------------------------------------------------------------------------------------------------
class _Costs:
    """Stands in for an AugmentedModel: only its memory model matters to chunking."""

    def __init__(self, per_output: int, per_pair: int, per_row: int) -> None:
        self.a, self.b, self.c = per_output, per_pair, per_row

    def memory(self, n: int, m: int, k: int) -> int:
        return n * m * (k * self.a + self.b) + (n + m) * self.c


def _calls(total: int, size: int) -> int:
    return -(-total // size)


def _forward_rows(n: int, m: int, samples: int, references: int) -> tuple[int, int]:
    """Rows through the forward pass over a run (each call runs its samples and references), and the calls."""
    return _calls(m, references) * n + _calls(n, samples) * m, _calls(n, samples) * _calls(m, references)


def test_chunks_fit_the_budget_evenly_with_the_fewest_forward_rows():
    """Every call fits the budget; outputs are split only when one pair cannot hold them all; the sample and
    reference chunks are even and send the fewest rows through the forward pass of all splits that fit
    (brute force over every (samples, references) pair)."""
    from onnxshap.run import chunking

    costs = _Costs(per_output=400, per_pair=900, per_row=300)
    rng = np.random.default_rng(0)
    for n, m, k in ((37, 23, 5), (1, 40, 3), (60, 1, 2), (20, 100, 10)):
        budgets = [costs.memory(n, m, k), *rng.integers(costs.memory(1, 1, 1), costs.memory(n, m, k), 60)]
        for budget in map(int, budgets):
            chunks = chunking(costs, n, m, k, budget, None)
            assert costs.memory(chunks.samples, chunks.references, chunks.outputs) <= budget
            assert chunks.outputs == k or costs.memory(1, 1, chunks.outputs + 1) > budget
            for total, size in ((n, chunks.samples), (m, chunks.references), (k, chunks.outputs)):
                assert size * _calls(total, size) - total < _calls(total, size)  # (nearly) equal chunks
            fitting = [_forward_rows(n, m, s, r) for s in range(1, n + 1) for r in range(1, m + 1)
                       if costs.memory(s, r, chunks.outputs) <= budget]
            assert _forward_rows(n, m, chunks.samples, chunks.references) == min(fitting)


def test_the_forward_pass_runs_as_many_rows_per_call_as_the_budget_holds(monkeypatch):
    """Predictions (the background's expected value, the data's outputs) run at most budget / bytes-per-row rows
    per ONNX Runtime call, and the same values come out of any split."""
    import onnxshap.run as run_module

    model = mlp(features=64, hidden=(256, 256), outputs=3)
    rng = np.random.default_rng(1)
    background, x = (rng.normal(size=(rows, 64)).astype(np.float32) for rows in (300, 40))
    whole = onnxshap.DeepExplainer(model, background)
    per_row = 4 * whole.lowered.row_elements()  # float32 bytes
    assert per_row >= 4 * (64 + 256 + 256 + 3)  # every per-row float tensor counts
    rows_per_call = []
    original = run_module.runtime.run

    def counting(session, names, feeds):
        rows_per_call.append(next(iter(feeds.values())).shape[0])
        return original(session, names, feeds)

    monkeypatch.setattr(run_module.runtime, "run", counting)
    budget = 7 * per_row + per_row // 2
    small = onnxshap.DeepExplainer(model, background, max_memory=max(budget, whole.augmented.memory(1, 1, 3)))
    predicted = small.predict(x)
    limit = max(1, small.max_memory // per_row)
    assert rows_per_call and max(rows_per_call) <= limit < 40  # the split really happened
    assert np.allclose(small.expected_value, whole.expected_value, rtol=1e-6, atol=0)
    assert np.allclose(predicted, whole.predict(x), rtol=1e-6, atol=0)


def test_a_budget_that_cannot_hold_one_triple_or_the_batch_size_is_one_clear_error():
    from onnxshap.run import chunking

    costs = _Costs(per_output=400, per_pair=900, per_row=300)
    with pytest.raises(OnnxShapError, match=r"^one \(sample, reference, output\) triple needs about"):
        chunking(costs, 10, 10, 1, costs.memory(1, 1, 1) - 1, None)
    with pytest.raises(OnnxShapError, match=r"^a batch of 64 samples with one reference and one output needs about "
                                            r".*lower batch_size \(--batch-size\)$"):
        chunking(costs, 100, 10, 1, costs.memory(32, 1, 1), 64)
    chunks = chunking(costs, 100, 10, 4, costs.memory(64, 3, 2), 64)
    assert chunks.samples == 50 and costs.memory(chunks.samples, chunks.references, chunks.outputs) <= \
        costs.memory(64, 3, 2)


def test_cli_max_memory_takes_sizes_and_refuses_nonsense(tmp_path, capsys):
    from onnxshap.cli import EXIT_USAGE

    data = np.load(MODELS / "digits_sample.npy")[:2]
    np.save(tmp_path / "x.npy", data)
    args = [str(MODELS / "digits_cnn.onnx"), str(tmp_path / "x.npy"), "-q", "-o", str(tmp_path / "v.npz")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--max-memory", "lots"])
    assert exit_info.value.code == EXIT_USAGE
    assert "expected a size such as 268435456, 256M or 2G, got 'lots'" in capsys.readouterr().err
    assert main([*args, "--max-memory", "1K"]) == EXIT_USAGE  # an option that cannot work: a usage error
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than the memory budget of 1.0 KiB; raise max_memory (--max-memory)" in err
    assert not (tmp_path / "v.npz").exists()
    assert main([*args, "--max-memory", "2M"]) == EXIT_OK
