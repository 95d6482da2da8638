"""onnxshap.plots: each plot renders a non-blank PNG, saves atomically, and refuses shapes it cannot draw."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib.image
from matplotlib.figure import Figure

from onnxshap import plots

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def assert_png_drawn(path: Path, min_kb: float = 8.0) -> None:
    """The PNG exists, is not tiny, and its pixels are not one flat colour."""
    assert path.is_file()
    assert path.stat().st_size > min_kb * 1024
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels[..., :3].std() > 0.05
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def digits_like(n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Blobby 8×8 grayscale images (n, 1, 8, 8) and signed attributions for 3 outputs (n, 1, 8, 8, 3)."""
    yy, xx = np.mgrid[:8, :8]
    images = np.stack([np.exp(-((yy - 2 - i % 4) ** 2 + (xx - 4) ** 2) / 6.0) for i in range(n)])[:, None]
    values = np.stack([images * (j - 1) + 0.1 * RNG.standard_normal(images.shape) for j in range(3)], axis=-1)
    return images, values


def test_image_plot_gray_nchw(tmp_path):
    images, values = digits_like()
    path = tmp_path / "image.png"
    fig = plots.image_plot(values, images, output_names=["a", "b", "c"], path=path)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4 * 4 + 1  # 4 rows × (input + 3 outputs), plus the colorbar
    assert [t for t in (ax.get_title() for ax in fig.axes) if t] == ["input", "a", "b", "c"]
    assert_png_drawn(path)


def test_image_plot_rgb_nhwc_single_output_and_max_images(tmp_path):
    images = RNG.random((10, 16, 16, 3)) * 255.0
    values = RNG.standard_normal((10, 16, 16, 3))
    path = tmp_path / "nested" / "rgb.png"
    fig = plots.image_plot(values, images, max_images=2, path=path)
    assert len(fig.axes) == 2 * 2 + 1
    assert_png_drawn(path)


def test_image_plot_accepts_explanation_and_list_of_outputs(tmp_path):
    images, values = digits_like(2)
    per_output = [values[:, 0, ..., j] for j in range(3)]  # (n, H, W) each
    fig = plots.image_plot(SimpleNamespace(values=per_output), images[:, 0], path=tmp_path / "x.png")
    assert len(fig.axes) == 2 * 4 + 1


@pytest.mark.parametrize(
    ("values_shape", "images_shape", "message"),
    [
        ((2, 1, 8, 8, 3), (2, 1, 8, 9), "do not fit"),
        ((2, 5, 8, 8), (2, 5, 8, 8), "C = 1 or 3"),
        ((2, 8), (2, 8), "C = 1 or 3"),
    ],
)
def test_image_plot_refuses_bad_shapes(values_shape, images_shape, message):
    with pytest.raises(ValueError, match=message):
        plots.image_plot(np.zeros(values_shape), np.zeros(images_shape))


def runoff_like(n: int = 30, steps: int = 12, variables: int = 5) -> np.ndarray:
    """Signed attributions (n, T, V) concentrated on variable 0 at the last steps."""
    values = 0.05 * RNG.standard_normal((n, steps, variables))
    values[:, -3:, 0] += RNG.standard_normal((n, 3)) * np.array([0.5, 1.0, 2.0])
    values[:, -2, 1] -= 0.8
    return values


def test_timeseries_heatmap_mean_abs(tmp_path):
    path = tmp_path / "heat.png"
    names = ["rain", "temp", "et", "wind", "noise"]
    fig = plots.timeseries_heatmap(runoff_like(), variable_names=names, path=path, title="mean |φ|")
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    assert grid.shape == (5, 12) and grid.min() >= 0  # variables × time, magnitudes
    assert int(np.argmax(grid[:, -1])) == 0
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert [t.get_text() for t in ax.get_xticklabels()][-2:] == ["t-1", "t"]
    assert_png_drawn(path)


def test_timeseries_heatmap_single_sample_is_signed_and_centred(tmp_path):
    path = tmp_path / "one.png"
    one = runoff_like(1)[0]
    fig = plots.timeseries_heatmap(one, time_labels=[f"m{i}" for i in range(12)], path=path)
    image = fig.axes[0].images[0]
    low, high = image.get_clim()
    assert low == -high and image.get_array().min() < 0
    assert_png_drawn(path)


def test_timeseries_heatmap_drops_a_single_output_axis():
    values = runoff_like()
    fig = plots.timeseries_heatmap(values[..., None])
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), np.abs(values).mean(axis=0).T)


def test_timeseries_heatmap_refuses_several_outputs_and_bad_names():
    with pytest.raises(ValueError, match=r"pass values\[\.\.\., j\]"):
        plots.timeseries_heatmap(np.zeros((3, 12, 5, 2)))
    with pytest.raises(ValueError, match="got 2 name"):
        plots.timeseries_heatmap(np.zeros((3, 12, 5)), variable_names=["a", "b"])
    with pytest.raises(ValueError, match=r"\(n, T, V\)"):
        plots.timeseries_heatmap(np.zeros(5))


def test_importance_bar_from_values_sorted_with_others(tmp_path):
    path = tmp_path / "bar.png"
    values = runoff_like(variables=30)
    fig = plots.importance_bar(values, path=path, top=5, title="global")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[:2] == ["x0", "x1"] and labels[-1] == "sum of 25 others" and len(labels) == 6
    assert_png_drawn(path, min_kb=5.0)


def test_importance_bar_from_importance(tmp_path):
    path = tmp_path / "bar.svg"
    fig = plots.importance_bar(np.array([0.1, 3.0, 1.0]), names=["a", "b", "c"], path=path)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["b", "c", "a"]
    assert path.read_text().lstrip().startswith("<?xml")


def test_save_leaves_old_file_when_rendering_fails(tmp_path, monkeypatch):
    path = tmp_path / "bar.png"
    path.write_bytes(b"old")

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.importance_bar(np.ones(3), path=path)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bar.png"]


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install onnxshap\[plots\]"):
        plots.importance_bar(np.ones(3))


def test_import_does_not_load_matplotlib():
    code = "import sys, onnxshap.plots; print('matplotlib' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
