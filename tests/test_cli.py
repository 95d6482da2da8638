"""The command line: a working run on the bundled digit CNN, and one clear line for every bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from onnxshap.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

MODELS = Path(__file__).resolve().parent.parent / "models"
FLOAT = onnx.TensorProto.FLOAT


@pytest.fixture
def mlp(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    w = oh.make_tensor("w", FLOAT, [4, 2], rng.normal(size=8))
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Tanh", ["h"], ["y"])], "mlp",
                          [oh.make_tensor_value_info("x", FLOAT, ["N", 4])],
                          [oh.make_tensor_value_info("y", FLOAT, ["N", 2])], initializer=[w])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", rng.normal(size=(6, 4)).astype(np.float32))
    return path


def test_digits_cnn_run_writes_values_and_plot(tmp_path, capsys):
    out, png = tmp_path / "values.npz", tmp_path / "digits.png"
    code = main([str(MODELS / "digits_cnn.onnx"), str(MODELS / "digits_sample.npy"),
                 "-b", str(MODELS / "digits_background.npy"), "-o", str(out), "--plot", str(png)])
    assert code == EXIT_OK
    with np.load(out) as result:
        values, expected = result["shap_values"], result["expected_value"]
        predictions, errors = result["predictions"], result["additivity_error"]
    sample = np.load(MODELS / "digits_sample.npy")
    assert values.shape == sample.shape + (10,)
    assert errors.max() <= 1e-4
    np.testing.assert_allclose(values.reshape(len(sample), -1, 10).sum(axis=1), predictions - expected,
                               rtol=1e-4, atol=1e-4)
    assert png.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))
    assert pixels.std() > 0.05  # not a blank canvas
    assert "worst additivity error" in capsys.readouterr().out


def test_default_output_sits_beside_the_data(mlp, tmp_path):
    assert main([str(mlp), str(tmp_path / "x.npy"), "-q"]) == EXIT_OK
    assert (tmp_path / "x.shap.npz").exists()


def test_npz_and_named_inputs_and_ranking(mlp, tmp_path):
    x = np.load(tmp_path / "x.npy")
    np.savez(tmp_path / "x.npz", x=x)
    assert main([str(mlp), str(tmp_path / "x.npz"), "-o", str(tmp_path / "a.npz"), "-q"]) == EXIT_OK
    assert main([str(mlp), "--input", f"x:{tmp_path / 'x.npy'}", "-o", str(tmp_path / "b.npz"), "--rank", "1",
                 "-q"]) == EXIT_OK
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        np.testing.assert_allclose(b["shap_values"][..., 0],
                                   np.take_along_axis(a["shap_values"], b["output_indices"][:, None, :1], 2)[..., 0],
                                   rtol=1e-6)


def _write_bad(tmp_path: Path, kind: str, mlp: Path) -> list[str]:
    x = tmp_path / "x.npy"
    if kind == "missing model":
        return [str(tmp_path / "nope.onnx"), str(x)]
    if kind == "missing data":
        return [str(mlp), str(tmp_path / "nope.npy")]
    if kind == "not onnx":
        return [str(x), str(x)]
    if kind == "truncated onnx":
        cut = tmp_path / "cut.onnx"
        cut.write_bytes(mlp.read_bytes()[:60])
        return [str(cut), str(x)]
    bad = tmp_path / "bad.npy"
    if kind == "wrong shape":
        np.save(bad, np.zeros((3, 5), np.float32))
    elif kind == "wrong rank":
        np.save(bad, np.zeros((3, 4, 1), np.float32))
    elif kind == "wrong dtype":
        np.save(bad, np.array([["a", "b", "c", "d"]]))
    elif kind == "nan":
        np.save(bad, np.full((3, 4), np.nan, np.float32))
    elif kind == "inf":
        np.save(bad, np.full((3, 4), np.inf, np.float32))
    elif kind == "pickle":
        np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "background features":
        np.save(bad, np.zeros((3, 5), np.float32))
        return [str(mlp), str(x), "-b", str(bad)]
    elif kind == "unknown input":
        return [str(mlp), "--input", f"nope:{x}"]
    elif kind == "unknown output":
        return [str(mlp), str(x), "--outputs", "nope"]
    return [str(mlp), str(bad)]


BAD_INPUTS = ["missing model", "missing data", "not onnx", "truncated onnx", "wrong shape", "wrong rank",
              "wrong dtype", "nan", "inf", "pickle", "background features", "unknown input", "unknown output"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_gives_one_line_and_usage_exit(kind, mlp, tmp_path, capsys):
    argv = _write_bad(tmp_path, kind, mlp)
    before = set(tmp_path.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert err.startswith("onnxshap: error: ")
    assert "Traceback" not in err
    assert set(tmp_path.iterdir()) == before  # nothing written, nothing half-written


def test_unsupported_op_exits_1_naming_the_node(tmp_path, capsys):
    graph = oh.make_graph([oh.make_node("Hardmax", ["x"], ["y"], name="hm")], "g",
                          [oh.make_tensor_value_info("x", FLOAT, ["N", 4])],
                          [oh.make_tensor_value_info("y", FLOAT, ["N", 4])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "hm.onnx"))
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    assert main([str(tmp_path / "hm.onnx"), str(tmp_path / "x.npy")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "unsupported" in err and "'hm'" in err and "Hardmax" in err
    assert not (tmp_path / "x.shap.npz").exists()


def test_help_and_usage_errors_as_a_user_sees_them(mlp, tmp_path):
    shown = subprocess.run(check=False, args=[sys.executable, "-m", "onnxshap.cli", "--help"], capture_output=True,
                           text=True)
    assert shown.returncode == 0 and "exit codes" in shown.stdout and "--background" in shown.stdout
    wrong = subprocess.run(check=False, args=[sys.executable, "-m", "onnxshap.cli", str(mlp), str(tmp_path / "x.npy"),
                            "--batch-size", "zero"], capture_output=True, text=True)
    assert wrong.returncode == EXIT_USAGE and "Traceback" not in wrong.stderr
    missing = subprocess.run(check=False, args=[sys.executable, "-m", "onnxshap.cli", str(tmp_path / "none.onnx"),
                              str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert missing.returncode == EXIT_USAGE
    assert missing.stderr.strip() == f"onnxshap: error: model file not found: {tmp_path / 'none.onnx'}"


def _not_blank(path: Path) -> None:
    import matplotlib.image

    assert path.stat().st_size > 10_000
    assert matplotlib.image.imread(str(path)).std() > 0.05


def test_runoff_model_heatmap_and_bar(tmp_path):
    """The bundled runoff LSTM: the CLI draws the variables × time-steps heatmap; the bar plot of global
    importance draws from the explanation with the variable names."""
    import json

    from onnxshap import DeepExplainer, plots
    from onnxshap.timeseries import variable_importance

    data = np.load(MODELS / "runoff_data.npy")
    np.save(tmp_path / "runoff.npy", data[:12])
    np.save(tmp_path / "background.npy", data[100:140])
    names = json.loads((MODELS / "runoff_variables.json").read_text())
    (tmp_path / "names.txt").write_text("\n".join(names))
    heatmap = tmp_path / "heatmap.png"
    code = main([str(MODELS / "runoff_lstm.onnx"), str(tmp_path / "runoff.npy"), "-b", str(tmp_path / "background.npy"),
                 "--names", str(tmp_path / "names.txt"), "--plot", str(heatmap), "-q"])
    assert code == EXIT_OK
    _not_blank(heatmap)
    explanation = DeepExplainer(MODELS / "runoff_lstm.onnx", data[100:140]).explain(data[:12])
    importance = variable_importance(explanation, names)
    bar = tmp_path / "bar.png"
    plots.importance_bar(np.array(list(importance.values())), names=list(importance), path=bar)
    _not_blank(bar)


def test_three_variable_sequences_plot_as_a_heatmap(tmp_path, monkeypatch):
    """(n, T, 3) data is a time series, not RGB images."""
    from matplotlib.figure import Figure

    from onnxshap import plots

    drawn = []
    monkeypatch.setattr(plots, "timeseries_heatmap", lambda values, **kw: drawn.append(values.shape) or Figure())
    monkeypatch.setattr(plots, "image_plot", lambda *a, **kw: drawn.append("image") or Figure())
    data = np.load(MODELS / "stacked_lstm_data.npy")[:6]
    np.save(tmp_path / "seq.npy", data)
    assert main([str(MODELS / "stacked_lstm.onnx"), str(tmp_path / "seq.npy"), "--plot", str(tmp_path / "p.png"),
                 "-q"]) == EXIT_OK
    assert drawn == [data.shape]
