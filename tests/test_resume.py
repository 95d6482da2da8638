"""``--resume``: an interrupted CLI run continues from its last checkpoint and writes the same file as a run that
was never interrupted; checkpoints of other runs are never used; checkpoints go when the run completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxshap.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, main
from onnxshap.files import checkpoint
from tests.scale_models import mlp

ROOT = Path(__file__).resolve().parent.parent
RUN = "import sys; import onnxshap.files.checkpoint as c; c.CHECKPOINT_SECONDS = 0; from onnxshap.cli import main; " \
      "sys.exit(main(sys.argv[1:]))"


@pytest.fixture
def files(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    onnx.save(mlp(features=10, hidden=(32, 16), outputs=2, seed=3), str(tmp_path / "mlp.onnx"))
    np.save(tmp_path / "x.npy", rng.normal(size=(20_000, 10)).astype(np.float32))
    np.save(tmp_path / "bg.npy", rng.normal(size=(50, 10)).astype(np.float32))
    return [str(tmp_path / "mlp.onnx"), str(tmp_path / "x.npy"), "-b", str(tmp_path / "bg.npy"), "-q"]


def _folders(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}{checkpoint.RESUME_MARK}*"))


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".onnxshap-partial-" in p.name]


def test_a_run_terminated_midway_resumes_to_the_same_bytes(files, tmp_path):
    full, resumed = tmp_path / "full.npz", tmp_path / "resumed.npz"
    started = time.perf_counter()
    assert main([*files, "-o", str(full), "--batch-size", "500"]) == EXIT_OK
    seconds = time.perf_counter() - started
    command = [sys.executable, "-c", RUN, *files, "-o", str(resumed), "--batch-size", "500", "--resume"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        folders = _folders(resumed)
        if folders and len(list(folders[0].glob("rows-*.npz"))) >= 5:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_TERMINATED, err.decode()
    (folder,) = _folders(resumed)
    kept = sorted(folder.glob("rows-*.npz"))
    assert 5 <= len(kept) < 40 and not resumed.exists() and _leftovers(tmp_path) == [] and _leftovers(folder) == []
    done = subprocess.run([sys.executable, "-c", RUN, *files[:-1], "-o", str(resumed), "--batch-size", "500",
                           "--resume"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == EXIT_OK, done.stderr
    restored = int(done.stdout.split("resumed: ")[1].split(" of ")[0])
    print(f"uninterrupted {seconds:.1f} s; restored {restored} of 20000 rows from {len(kept)} checkpoint files")
    assert 0 < restored < 20_000 and restored % 500 == 0
    assert resumed.read_bytes() == full.read_bytes()  # np.savez writes equal arrays to equal bytes
    assert _folders(resumed) == []  # checkpoints removed once the output is written


def _interrupt_after(monkeypatch, saves: int) -> None:
    """Checkpoint every chunk, and raise KeyboardInterrupt after ``saves`` of them."""
    monkeypatch.setattr(checkpoint, "CHECKPOINT_SECONDS", 0)
    original, count = checkpoint.Checkpoints.save, [0]

    def save(self, start, stop, values):
        original(self, start, stop, values)
        count[0] += 1
        if count[0] == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpoints, "save", save)


def test_a_damaged_checkpoint_is_computed_again(files, tmp_path, monkeypatch):
    full, resumed = tmp_path / "full.npz", tmp_path / "resumed.npz"
    assert main([*files, "-o", str(full), "--batch-size", "2000"]) == EXIT_OK
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 4)
        assert main([*files, "-o", str(resumed), "--batch-size", "2000", "--resume"]) == EXIT_INTERRUPTED
    (folder,) = _folders(resumed)
    first, second, *_ = sorted(folder.glob("rows-*.npz"))
    np.savez(first, values_0=np.zeros((2000, 10, 1), np.float32))  # wrong shape: must not be used
    second.write_bytes(b"not an npz")
    assert main([*files, "-o", str(resumed), "--batch-size", "2000", "--resume"]) == EXIT_OK
    assert resumed.read_bytes() == full.read_bytes() and _folders(resumed) == []


def test_checkpoints_of_another_run_are_never_used(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "values.npz"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        assert main([*files, "-o", str(out), "--batch-size", "2000", "--resume"]) == EXIT_INTERRUPTED
    (stale,) = _folders(out)
    other = np.load(files[1]) * 2  # same shape, other data: another fingerprint
    np.save(tmp_path / "x.npy", other)
    capsys.readouterr()
    assert main([*files[:-1], "-o", str(out), "--batch-size", "2000", "--resume"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "resumed:" not in captured.out
    assert "1 checkpoint folder(s) of other runs beside values.npz are not used" in captured.err
    assert _folders(out) == [stale]  # the other run's checkpoints are left alone
    assert main([*files, "-o", str(tmp_path / "fresh.npz"), "--batch-size", "2000"]) == EXIT_OK
    assert out.read_bytes() == (tmp_path / "fresh.npz").read_bytes()


def test_options_that_change_the_values_change_the_fingerprint(tmp_path):
    data = {"data": {"x": np.arange(6, dtype=np.float32).reshape(3, 2)}}
    (tmp_path / "m.onnx").write_bytes(b"model")
    base = checkpoint.fingerprint([tmp_path / "m.onnx"], data, {"rank": None})
    assert base == checkpoint.fingerprint([tmp_path / "m.onnx"], data, {"rank": None})
    assert base != checkpoint.fingerprint([tmp_path / "m.onnx"], data, {"rank": 1})
    assert base != checkpoint.fingerprint([tmp_path / "m.onnx"], {"data": {"x": data["data"]["x"] + 1}},
                                          {"rank": None})
    assert base != checkpoint.fingerprint([tmp_path / "m.onnx"], {"data": {"x": data["data"]["x"].T.copy()}},
                                          {"rank": None})  # same bytes, other shape
    (tmp_path / "m.onnx").write_bytes(b"modem")
    assert base != checkpoint.fingerprint([tmp_path / "m.onnx"], data, {"rank": None})
