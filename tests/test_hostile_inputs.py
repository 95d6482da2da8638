"""Hostile and careless inputs (issue 10, items 1-3).

Every case fails closed: a first line that names the problem, the documented exit code, no traceback, nothing
written, nothing read outside the model folder, no allocation spike. The cases that are really fine (name
collisions, auxiliary outputs, shapeless outputs, IR-3, fixed batches, deep elementwise chains) give the right
values.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import numpy_helper

import onnxshap
import onnxshap.load.model
from onnxshap.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, main
from onnxshap.errors import first_line
from onnxshap.files import read as files_read
from onnxshap.files import write as files_write
from tests import peak_rss

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
FLOAT, INT64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 2)).astype(np.float32)
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
RSS_ALLOWANCE_KIB = 200 * 1024  # a refused file may cost at most this much memory over the bare imports


# -- helpers -------------------------------------------------------------------------------------------------
def save_model(
    path: Path, nodes, inputs, outputs, initializers=(), ir_version: int = 9, opset: int = 17
) -> Path:
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.save(model, str(path))
    return path


def mlp_nodes(x: str = "x", hidden: str = "h", y: str = "y"):
    return [oh.make_node("MatMul", [x, "w"], [hidden]), oh.make_node("Tanh", [hidden], [y])]


def weights(width: int = 4):
    return numpy_helper.from_array(RNG.normal(size=(width, 2)).astype(np.float32) if width != 4 else W, "w")


@pytest.fixture
def mlp(tmp_path) -> Path:
    """x (N, 4) → MatMul → Tanh → y (N, 2), with data x.npy beside it."""
    np.save(tmp_path / "x.npy", RNG.normal(size=(6, 4)).astype(np.float32))
    return save_model(
        tmp_path / "mlp.onnx",
        mlp_nodes(),
        [oh.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [oh.make_tensor_value_info("y", FLOAT, ["N", 2])],
        [weights()],
    )


def listing(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` with its type and content fingerprint (to prove nothing was written)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
        found[str(path.relative_to(folder))] = (stat.S_IFMT(info.st_mode), content)
    return found


def run_cli(argv, capfd) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capfd.readouterr().err


def assert_refused(code: int, err: str, expected_code: int, *words: str) -> str:
    """One error line (first line names the problem), the documented exit code, no traceback or ORT log."""
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxshap: error: "), err
    assert "Traceback" not in err and "\x1b[" not in err and "onnxruntime:" not in err, err
    for word in words:
        assert word in lines[0], err
    return lines[0]


def refused_without_writing(argv, folder: Path, capfd, expected_code: int, *words: str) -> str:
    before = listing(folder)
    code, err = run_cli(argv, capfd)
    line = assert_refused(code, err, expected_code, *words)
    assert listing(folder) == before
    return line


def peak_rss_kib(args, env=None, timeout: float = 120.0) -> tuple[int, int, str]:
    """(exit status, peak resident set size in KiB, stderr) of a child process (tests/peak_rss.py)."""
    with tempfile.TemporaryDirectory() as folder, open(os.devnull, "rb") as stdin:
        report = Path(folder) / "peak"
        child = subprocess.Popen(
            peak_rss.wrap(args, report), stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env or ENV
        )
        try:
            _, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            raise AssertionError(f"{args} did not finish in {timeout} s") from None
        peak, code = peak_rss.read(report)
    return code, peak, err.decode()


@pytest.fixture(scope="module")
def baseline_rss_kib() -> int:
    """Peak RSS of a process that only imports what the CLI imports."""
    code, rss, err = peak_rss_kib(
        [sys.executable, "-c", "import onnxshap.cli, onnxshap.explainer, onnxruntime"]
    )
    assert code == 0, err
    return rss


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "onnxshap.cli", *map(str, args)]


# -- 1. bounded reads ---------------------------------------------------------------------------------------
def test_dev_zero_as_model_is_refused_without_reading(mlp, tmp_path, baseline_rss_kib):
    code, rss, err = peak_rss_kib(cli("/dev/zero", tmp_path / "x.npy"))
    assert_refused(code, err, EXIT_USAGE, "/dev/zero", "character device", "not a regular file")
    assert rss < baseline_rss_kib + RSS_ALLOWANCE_KIB, (rss, baseline_rss_kib)


@pytest.mark.parametrize("device", ["/dev/urandom", "/dev/zero"])
def test_devices_as_model_or_data_are_refused(device, mlp, tmp_path, capfd):
    refused_without_writing([device, tmp_path / "x.npy"], tmp_path, capfd, EXIT_USAGE, "model", device)
    refused_without_writing([mlp, device], tmp_path, capfd, EXIT_USAGE, "data", device, "character device")


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_fifo_as_data_or_background_does_not_hang(mlp, tmp_path):
    pipe = fifo(tmp_path / "pipe.npy")
    for args in ([mlp, pipe], [mlp, tmp_path / "x.npy", "-b", pipe], [mlp, "--input", f"x:{pipe}"]):
        before = listing(tmp_path)
        shown = subprocess.run(cli(*args), env=ENV, capture_output=True, text=True, timeout=60, check=False)
        assert_refused(shown.returncode, shown.stderr, EXIT_USAGE, "FIFO", str(pipe))
        assert listing(tmp_path) == before


def test_model_over_the_size_cap_is_refused(mlp, tmp_path, capfd, monkeypatch):
    size = mlp.stat().st_size
    monkeypatch.setenv(files_read.MAX_MODEL_BYTES_ENV, str(size - 1))
    refused_without_writing(
        [mlp, tmp_path / "x.npy"],
        tmp_path,
        capfd,
        EXIT_USAGE,
        f"{size} bytes",
        "over the limit",
        files_read.MAX_MODEL_BYTES_ENV,
    )
    monkeypatch.setenv(files_read.MAX_MODEL_BYTES_ENV, str(size))
    assert main([str(mlp), str(tmp_path / "x.npy"), "-q"]) == EXIT_OK
    with pytest.raises(onnxshap.ModelLoadError, match="over the limit of 10 bytes"):
        onnxshap.DeepExplainer(onnxshap.load.model.load_model(mlp, max_bytes=10), np.load(tmp_path / "x.npy"))


ZERO_ROWS = (2 << 30) // 16  # a 2 GiB float32 array of shape (ZERO_ROWS, 4)


@pytest.fixture(scope="module")
def zero_npz(tmp_path_factory) -> Path:
    """A ~2 MB .npz whose one member 'x' declares and holds a 2 GiB zero float32 array (ZERO_ROWS, 4); built
    by streaming the .npy header and zeros into the zip, so building it stays cheap."""
    path = tmp_path_factory.mktemp("zip") / "zeros.npz"
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open("x.npy", "w", force_zip64=True) as member,
    ):
        np.lib.format.write_array_header_1_0(
            member, {"descr": "<f4", "fortran_order": False, "shape": (ZERO_ROWS, 4)}
        )
        chunk, left = bytes(32 << 20), ZERO_ROWS * 16
        while left:
            member.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    assert path.stat().st_size < 16 << 20
    return path


@pytest.mark.parametrize("case", ["unknown input name", "wrong feature shape", "over the data cap"])
def test_npz_bomb_is_refused_before_decompressing(case, zero_npz, tmp_path, baseline_rss_kib):
    """The 2 GiB member is never decompressed: keys, declared shape and size are checked from the zip
    directory and the member's .npy header."""
    name, width, env = {
        "unknown input name": ("features", 4, {}),
        "wrong feature shape": ("x", 5, {}),
        "over the data cap": ("x", 4, {files_read.MAX_DATA_BYTES_ENV: str(1 << 30)}),
    }[case]
    model = save_model(
        tmp_path / "m.onnx",
        mlp_nodes(x=name),
        [oh.make_tensor_value_info(name, FLOAT, ["N", width])],
        [oh.make_tensor_value_info("y", FLOAT, ["N", 2])],
        [weights(width)],
    )
    before = listing(tmp_path)
    started = time.monotonic()
    code, rss, err = peak_rss_kib(cli(model, zero_npz, "-o", tmp_path / "out.npz"), env=dict(ENV, **env))
    words = {
        "unknown input name": ["unknown input name", "'x'", "'features'"],
        "wrong feature shape": [f"({ZERO_ROWS}, 4)", "axis 1 should be 5"],
        "over the data cap": ["over the limit", files_read.MAX_DATA_BYTES_ENV],
    }[case]
    assert_refused(code, err, EXIT_USAGE, str(zero_npz), *words)
    assert rss < baseline_rss_kib + RSS_ALLOWANCE_KIB, (rss, baseline_rss_kib)
    assert time.monotonic() - started < 60  # decompressing 2 GiB took 16 s before; refusing takes ~3 s
    assert listing(tmp_path) == before


def test_truncated_npz_member_is_refused_before_allocation(tmp_path):
    path = tmp_path / "cut.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array_header_1_0(
            member, {"descr": "<f4", "fortran_order": False, "shape": (1 << 30, 4)}
        )
        member.write(bytes(64))
    with pytest.raises(onnxshap.InputDataError, match=r"array 'x' is truncated: shape \(1073741824, 4\)"):
        files_read.load_arrays(path, "data")
    np.save(tmp_path / "cut.npy", np.zeros((10, 4), np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:-8])
    with pytest.raises(onnxshap.InputDataError, match="cut.npy is truncated"):
        files_read.load_arrays(tmp_path / "cut.npy", "data")


def external_model(folder: Path) -> Path:
    """The mlp with its weight in external data file weights.bin (both in ``folder``)."""
    folder.mkdir(exist_ok=True)
    graph = oh.make_graph(
        mlp_nodes(),
        "g",
        [oh.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [oh.make_tensor_value_info("y", FLOAT, ["N", 2])],
        initializer=[weights()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(
        model,
        str(folder / "mlp.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (folder / "weights.bin").is_file()
    return folder / "mlp.onnx"


AUDIT = """
import os, sys
watched = {os.path.realpath(p) for p in sys.argv[1].split(os.pathsep)}
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        if os.path.realpath(os.fsdecode(args[0])) in watched:
            opened.append(os.fsdecode(args[0]))
sys.addaudithook(hook)
from onnxshap.cli import main
code = main(sys.argv[2:])
print("OPENED", opened, file=sys.stderr if opened else sys.stdout)
sys.exit(code)
"""


def run_audited(watched: list[Path], argv, cwd=None) -> subprocess.CompletedProcess:
    """Run the CLI in a child that records every attempt to open one of ``watched``."""
    return subprocess.run(
        [sys.executable, "-c", AUDIT, os.pathsep.join(map(str, watched)), *map(str, argv)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


@pytest.mark.parametrize("kind", ["symlink out of the folder", "dot-dot", "fifo", "device"])
def test_hostile_external_data_is_refused_and_never_opened(kind, tmp_path):
    model = external_model(tmp_path / "model")
    weights_file = tmp_path / "model" / "weights.bin"
    secret = tmp_path / "secret.bin"
    secret.write_bytes(weights_file.read_bytes())
    weights_file.unlink()
    if kind == "symlink out of the folder":
        weights_file.symlink_to("../secret.bin")
        words = ["outside the model's folder", "symlink"]
    elif kind == "dot-dot":
        proto = onnx.load(str(model), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "../secret.bin"
        onnx.save(proto, str(model))
        words = ["outside the model's folder", "'../secret.bin'"]
    elif kind == "fifo":
        fifo(weights_file)
        words = ["FIFO", "not a regular file"]
    else:
        os.mknod(weights_file, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # what /dev/zero is
        words = ["character device", "not a regular file"]
    np.save(tmp_path / "x.npy", RNG.normal(size=(6, 4)).astype(np.float32))
    before = listing(tmp_path)
    shown = run_audited([secret, weights_file], [model, tmp_path / "x.npy"])
    assert_refused(
        shown.returncode,
        shown.stderr.replace("OPENED []\n", ""),
        EXIT_USAGE,
        "external data of tensor 'w'",
        *words,
    )
    assert "OPENED []" in shown.stdout, shown.stderr  # neither the secret nor the hostile file was opened
    assert listing(tmp_path) == before


def test_symlink_inside_the_folder_is_followed(tmp_path):
    model = external_model(tmp_path / "model")
    (tmp_path / "model" / "link.bin").symlink_to("weights.bin")
    proto = onnx.load(str(model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "link.bin"
    onnx.save(proto, str(tmp_path / "model" / "linked.onnx"))
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    linked = onnxshap.DeepExplainer(tmp_path / "model" / "linked.onnx", x).shap_values(x)
    np.testing.assert_allclose(linked, onnxshap.DeepExplainer(model, x).shap_values(x), rtol=1e-6)


def test_proto_or_bytes_with_relative_external_data_never_reads_the_working_directory(tmp_path):
    """A ModelProto or bytes has no folder: its relative external data is refused, even when a file of that
    name sits in the working directory (which the old code read)."""
    model = external_model(tmp_path / "model")
    script = """
import os, sys, onnx, numpy as np, onnxshap
weights = os.path.realpath("weights.bin")
opened = []
sys.addaudithook(lambda e, a: opened.append(1) if e == "open" and isinstance(a[0], str)
                 and os.path.realpath(a[0]) == weights else None)
proto = onnx.load("mlp.onnx", load_external_data=False)
for model in (proto, proto.SerializeToString()):
    try:
        onnxshap.DeepExplainer(model, np.zeros((3, 4), np.float32))
    except onnxshap.ModelLoadError as exc:
        print(str(exc).splitlines()[0])
print("opened", len(opened))
"""
    shown = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path / "model",
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = shown.stdout.strip().splitlines()
    assert lines[0].startswith("model: tensor 'w' keeps its values in external data file 'weights.bin'")
    assert lines[1].startswith("model bytes: tensor 'w' keeps its values in external data file")
    assert lines[2] == "opened 0"
    assert onnxshap.DeepExplainer(onnx.load(str(model)), np.zeros((3, 4), np.float32)).n_outputs == 2


# -- 2. safe writes -----------------------------------------------------------------------------------------
def test_output_onto_a_device_node_fifo_or_folder_is_refused(mlp, tmp_path, capfd):
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    pipe = fifo(tmp_path / "pipe.png")  # .png: a format --plot accepts, so the target itself is refused
    (tmp_path / "folder.png").mkdir()
    for target, kind in ((node, "character device"), (pipe, "FIFO"), (tmp_path / "folder.png", "a folder")):
        for option in ("-o", "--plot", "--save-graph"):
            refused_without_writing(
                [mlp, tmp_path / "x.npy", option, target],
                tmp_path,
                capfd,
                EXIT_USAGE,
                str(target),
                kind,
                "only replaces regular files",
            )
    assert stat.S_ISCHR(node.lstat().st_mode) and stat.S_ISFIFO(pipe.lstat().st_mode)


@pytest.mark.parametrize("link", ["same path", "hard link", "symlink"])
@pytest.mark.parametrize("which", ["model", "data", "background", "names"])
def test_output_equal_to_an_input_is_refused(which, link, mlp, tmp_path, capfd):
    np.save(tmp_path / "b.npy", RNG.normal(size=(4, 4)).astype(np.float32))
    (tmp_path / "names.txt").write_text("a b c d")
    source = {
        "model": mlp,
        "data": tmp_path / "x.npy",
        "background": tmp_path / "b.npy",
        "names": tmp_path / "names.txt",
    }[which]
    target = source
    if link == "hard link":
        target = tmp_path / "hard.npz"
        os.link(source, target)
    elif link == "symlink":
        target = tmp_path / "sym.npz"
        target.symlink_to(source)
    argv = [mlp, tmp_path / "x.npy", "-b", tmp_path / "b.npy", "--names", tmp_path / "names.txt"]
    for option in ("-o", "--save-graph"):
        refused_without_writing([*argv, option, target], tmp_path, capfd, EXIT_USAGE, "is the input file")


def test_output_equal_to_external_data_is_refused(tmp_path, capfd):
    model = external_model(tmp_path / "model")
    np.save(tmp_path / "x.npy", RNG.normal(size=(6, 4)).astype(np.float32))
    refused_without_writing(
        [model, tmp_path / "x.npy", "-o", tmp_path / "model" / "weights.bin"],
        tmp_path,
        capfd,
        EXIT_USAGE,
        "is the input file",
        "weights.bin",
    )


@pytest.mark.parametrize("option", ["-o", "--plot", "--save-graph"])
def test_output_into_a_missing_folder_is_one_line(option, mlp, tmp_path, capfd):
    target = tmp_path / "missing" / "out.png"
    refused_without_writing(
        [mlp, tmp_path / "x.npy", option, target],
        tmp_path,
        capfd,
        EXIT_USAGE,
        "does not exist",
        str(tmp_path / "missing"),
    )


def test_outputs_into_a_read_only_folder_are_one_line(mlp, tmp_path):
    """A read-only file system (a private tmpfs mount, so it holds even for root) refuses every output before
    the work starts."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    runs = "; ".join(
        f"{sys.executable} -m onnxshap.cli {mlp} {tmp_path / 'x.npy'} {option} {folder / name}; echo rc=$?"
        for option, name in (("-o", "v.npz"), ("--plot", "p.png"), ("--save-graph", "g.onnx"))
    )
    shown = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {folder} && {runs}"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert shown.stdout.split() == [f"rc={EXIT_USAGE}"] * 3, shown.stdout + shown.stderr
    lines = shown.stderr.strip().splitlines()
    assert len(lines) == 3 and all("Read-only file system" in line and str(folder) in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "readonly", "x.npy"]


def test_unknown_plot_extension_is_refused_before_the_work(mlp, tmp_path, capfd, monkeypatch):
    from onnxshap import explainer

    def never(*args, **kwargs):
        raise AssertionError("the explainer was built although --plot was refused")

    monkeypatch.setattr(explainer.DeepExplainer, "__init__", never)
    refused_without_writing(
        [mlp, tmp_path / "x.npy", "--plot", tmp_path / "p.xyz"],
        tmp_path,
        capfd,
        EXIT_USAGE,
        "unknown image format 'xyz'",
        "png",
    )


def test_failed_plot_or_graph_leaves_nothing_written(mlp, tmp_path, capfd, monkeypatch):
    """Outputs are written together after every check: a failure while writing one leaves none (and an old
    file at the target is untouched)."""
    import errno

    from matplotlib.figure import Figure

    (tmp_path / "x.shap.npz").write_bytes(b"old values")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    refused_without_writing(
        [mlp, tmp_path / "x.npy", "--plot", tmp_path / "p.png"],
        tmp_path,
        capfd,
        EXIT_FAILED,
        "No space left on device",
    )
    monkeypatch.undo()
    real_stage = files_write.OutputSet.stage

    def stage(self, target, writer):
        if target.suffix == ".onnx":
            real_stage(self, target, lambda file: file.write(b"half a graph"))
            disk_full()
        return real_stage(self, target, writer)

    monkeypatch.setattr(files_write.OutputSet, "stage", stage)
    refused_without_writing(
        [mlp, tmp_path / "x.npy", "--plot", tmp_path / "p.png", "--save-graph", tmp_path / "g.onnx"],
        tmp_path,
        capfd,
        EXIT_FAILED,
        "No space left on device",
    )
    monkeypatch.undo()
    assert (
        main(
            [
                str(mlp),
                str(tmp_path / "x.npy"),
                "--plot",
                str(tmp_path / "p.png"),
                "--save-graph",
                str(tmp_path / "g.onnx"),
                "-q",
            ]
        )
        == EXIT_OK
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "g.onnx",
        "mlp.onnx",
        "p.png",
        "x.npy",
        "x.shap.npz",
    ]


WRITER = """
import sys, time
from pathlib import Path
from onnxshap.files import write as files_write
from tests import peak_rss
files_write.raise_on_sigterm()
def writer(file):
    file.write(b"x" * 1000)
    file.flush()
    print("writing", flush=True)
    time.sleep(60)
files_write.write_atomic(Path(sys.argv[1]), writer)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_while_writing(sig, tmp_path):
    """SIGTERM removes the partial file; SIGKILL cannot be caught, so the partial file stays, but hidden and
    named ``.<name>.onnxshap-partial-<pid>``, never the output's name or extension."""
    target = tmp_path / "values.npz"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "writing"
    partial = tmp_path / f".values.npz.onnxshap-partial-{child.pid}"
    assert sorted(tmp_path.iterdir()) == [partial]
    child.send_signal(sig)
    child.wait(timeout=60)
    assert child.returncode == (EXIT_TERMINATED if sig == signal.SIGTERM else -signal.SIGKILL)
    assert "Traceback" not in child.stderr.read()
    child.stdout.close()
    child.stderr.close()
    left = sorted(p.name for p in tmp_path.iterdir())
    if sig == signal.SIGTERM:
        assert left == []
    else:
        assert left == [partial.name]
        assert left[0].startswith(".") and not left[0].endswith(".npz") and files_write.PARTIAL_MARK in left[0]


def wait_until_sigterm_is_caught(pid: int, timeout: float = 120.0) -> None:
    """Poll /proc until the child's SIGTERM handler is installed (the CLI's main has started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.05)
    raise AssertionError("the CLI never installed its SIGTERM handler")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_long_run_leaves_nothing(sig, tmp_path):
    """A long run on the bundled digits CNN, stopped mid-work: one line, 143 (SIGTERM) or 130 (SIGINT), and
    neither an output nor a partial file."""
    np.save(tmp_path / "digits.npy", np.tile(np.load(MODELS / "digits_sample.npy"), (250, 1, 1, 1)))
    child = subprocess.Popen(
        cli(
            MODELS / "digits_cnn.onnx",
            tmp_path / "digits.npy",
            "-b",
            MODELS / "digits_background.npy",
            "--batch-size",
            "50",
            "--plot",
            tmp_path / "p.png",
            "--save-graph",
            tmp_path / "g.onnx",
        ),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_sigterm_is_caught(child.pid)
    time.sleep(3.0)  # into the work (4 000 rows take ~30 s)
    assert child.poll() is None, "the run finished before the signal; give it more rows"
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    expected = {
        signal.SIGTERM: (EXIT_TERMINATED, "onnxshap: terminated"),
        signal.SIGINT: (EXIT_INTERRUPTED, "onnxshap: interrupted"),
    }[sig]
    assert (child.returncode, err.strip()) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.npy"]


# -- 3. one line, the right code, the right words -----------------------------------------------------------
def test_empty_npz_holds_no_arrays(mlp, tmp_path, capfd):
    np.savez(tmp_path / "empty.npz")
    refused_without_writing([mlp, tmp_path / "empty.npz"], tmp_path, capfd, EXIT_USAGE, "holds no arrays")


def test_missing_names_file(mlp, tmp_path, capfd):
    refused_without_writing(
        [mlp, tmp_path / "x.npy", "--names", tmp_path / "nope.txt"],
        tmp_path,
        capfd,
        EXIT_USAGE,
        "--names file not found",
        "nope.txt",
    )


@pytest.mark.parametrize(
    "content", [b"a,b,c,d\n1,2,3,4\n", bytes(RNG.integers(0, 256, 4096, dtype=np.uint8)), b""]
)
def test_csv_or_random_bytes_are_not_npy(content, mlp, tmp_path, capfd):
    (tmp_path / "data.npy").write_bytes(content)
    line = refused_without_writing(
        [mlp, tmp_path / "data.npy"], tmp_path, capfd, EXIT_USAGE, "not a .npy/.npz file"
    )
    assert "pickle" not in line


def test_pickled_objects_still_need_pickle(mlp, tmp_path, capfd):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    refused_without_writing([mlp, tmp_path / "obj.npz"], tmp_path, capfd, EXIT_USAGE, "need pickle")


def test_complex_data_is_refused(mlp, tmp_path, capfd):
    np.save(tmp_path / "c.npy", np.ones((3, 4), np.complex64) * (1 + 2j))
    refused_without_writing(
        [mlp, tmp_path / "c.npy"], tmp_path, capfd, EXIT_USAGE, "complex values cannot be explained"
    )
    refused_without_writing(
        [mlp, tmp_path / "x.npy", "-b", tmp_path / "c.npy"],
        tmp_path,
        capfd,
        EXIT_USAGE,
        "background",
        "complex values cannot be explained",
    )
    with pytest.raises(onnxshap.InputDataError, match="complex values cannot be explained"):
        onnxshap.DeepExplainer(mlp, np.ones((3, 4), np.complex128))


def test_float64_beyond_float32_is_an_overflow_not_nan(mlp, tmp_path, capfd):
    big = np.ones((3, 4))
    big[1, 2] = 1e300
    np.save(tmp_path / "big.npy", big)
    line = refused_without_writing(
        [mlp, tmp_path / "big.npy"],
        tmp_path,
        capfd,
        EXIT_USAGE,
        "exceed the float32 range",
        "1e+300",
        "row 1",
    )
    assert "NaN" not in line
    with pytest.raises(onnxshap.InputDataError, match="background for input 'x' has values that exceed"):
        onnxshap.DeepExplainer(mlp, big)


def test_errors_in_the_data_are_worded_for_the_data(mlp, tmp_path, capfd):
    """No -b: the background is sampled from the data, but a bad data file is named as data."""
    bad = RNG.normal(size=(8, 4))
    bad[5, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    line = refused_without_writing(
        [mlp, tmp_path / "nan.npy"],
        tmp_path,
        capfd,
        EXIT_USAGE,
        "data for input 'x' contains NaN or Inf (first at row 5)",
    )
    assert "background" not in line


def test_out_of_range_token_id_is_one_line_without_runtime_log(tmp_path, capfd):
    table = numpy_helper.from_array(RNG.normal(size=(100, 4)).astype(np.float32), "table")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    model = save_model(
        tmp_path / "tokens.onnx",
        [
            oh.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
            oh.make_node("ReduceSum", ["emb", "axes"], ["s"], keepdims=0),
            oh.make_node("MatMul", ["s", "w"], ["h"]),
            oh.make_node("Tanh", ["h"], ["y"]),
        ],
        [oh.make_tensor_value_info("ids", INT64, ["N", 5])],
        [oh.make_tensor_value_info("y", FLOAT, ["N", 2])],
        [table, axes, weights()],
    )
    ids = RNG.integers(0, 100, size=(6, 5))
    np.save(tmp_path / "ids.npy", ids)
    ids[3, 2] = 1000
    np.save(tmp_path / "bad.npy", ids)
    refused_without_writing(
        [model, tmp_path / "bad.npy", "-b", tmp_path / "ids.npy", "--layer", "emb"],
        tmp_path,
        capfd,
        EXIT_USAGE,
        "index 1000 at row 3",
        "'embed'",
        "-100..99",
    )
    assert main([str(model), str(tmp_path / "ids.npy"), "--layer", "emb", "-q"]) == EXIT_OK


def rename_everywhere(model: onnx.ModelProto, renames: dict[str, str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in [*copy.graph.input, *copy.graph.output]:
        value.name = renames.get(value.name, value.name)
    return copy


def test_tensor_names_that_the_augmented_graph_uses(tmp_path):
    plain = onnx.load(
        str(
            save_model(
                tmp_path / "plain.onnx",
                [
                    oh.make_node("MatMul", ["x", "w"], ["a"]),
                    oh.make_node("Tanh", ["a"], ["b"]),
                    oh.make_node("Relu", ["b"], ["c"]),
                ],
                [oh.make_tensor_value_info("x", FLOAT, ["N", 4])],
                [oh.make_tensor_value_info("c", FLOAT, ["N", 2])],
                [weights()],
            )
        )
    )
    clashing = rename_everywhere(plain, {"a": "prediction", "b": "output_index", "c": "shap_values_0"})
    x = RNG.normal(size=(7, 4)).astype(np.float32)
    expected = onnxshap.DeepExplainer(plain, x[:4]).shap_values(x)
    ex = onnxshap.DeepExplainer(clashing, x[:4])
    np.testing.assert_allclose(ex.shap_values(x), expected, rtol=1e-6, atol=1e-7)
    saved = onnx.load(str(ex.save_augmented(tmp_path / "aug.onnx")))
    assert [i.name for i in saved.graph.input] == ["x", "reference/x", "output_index_1"]
    assert [o.name for o in saved.graph.output] == ["shap_values_0_1", "prediction_1"]


def test_batch_independent_auxiliary_output_does_not_block(tmp_path, capfd):
    aux = numpy_helper.from_array(np.arange(3, dtype=np.float32), "constant")
    model = save_model(
        tmp_path / "aux.onnx",
        [*mlp_nodes(), oh.make_node("Identity", ["constant"], ["aux"])],
        [oh.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [oh.make_tensor_value_info("y", FLOAT, ["N", 2]), oh.make_tensor_value_info("aux", FLOAT, [3])],
        [weights(), aux],
    )
    x = RNG.normal(size=(6, 4)).astype(np.float32)
    plain = onnxshap.DeepExplainer(_mlp_proto(), x).shap_values(x)
    for outputs in (["y"], None):
        np.testing.assert_allclose(
            onnxshap.DeepExplainer(model, x, outputs=outputs).shap_values(x), plain, rtol=1e-6
        )
    with pytest.raises(onnxshap.UnsupportedModelError, match="output 'aux' does not depend on the explained"):
        onnxshap.DeepExplainer(model, x, outputs=["aux"])


def _mlp_proto() -> onnx.ModelProto:
    graph = oh.make_graph(
        mlp_nodes(),
        "g",
        [oh.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [oh.make_tensor_value_info("y", FLOAT, ["N", 2])],
        initializer=[weights()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_output_without_a_shape_is_accepted(tmp_path):
    model = _mlp_proto()
    model.graph.output[0].type.tensor_type.ClearField("shape")
    x = RNG.normal(size=(6, 4)).astype(np.float32)
    np.testing.assert_allclose(
        onnxshap.DeepExplainer(model, x).shap_values(x),
        onnxshap.DeepExplainer(_mlp_proto(), x).shap_values(x),
        rtol=1e-6,
    )


@pytest.mark.parametrize("opset", [9, 11])
def test_ir3_model_with_initializers_as_inputs(opset):
    bias = numpy_helper.from_array(np.array([0.1, -0.2], np.float32), "b")
    graph = oh.make_graph(
        [oh.make_node("Gemm", ["x", "w", "b"], ["h"]), oh.make_node("Relu", ["h"], ["y"])],
        "g",
        [
            oh.make_tensor_value_info("x", FLOAT, ["N", 4]),
            oh.make_tensor_value_info("w", FLOAT, [4, 2]),
            oh.make_tensor_value_info("b", FLOAT, [2]),
        ],
        [oh.make_tensor_value_info("y", FLOAT, ["N", 2])],
        initializer=[weights(), bias],
    )
    old = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    old.ir_version = 3
    x = RNG.normal(size=(6, 4)).astype(np.float32)
    values = onnxshap.DeepExplainer(old, x[:3]).shap_values(x)
    # exact reference: Relu after an affine map is one rescale region: φ = W ⊙ Δx · Δy/Δh, averaged over refs
    hx, hr = (x @ W + [0.1, -0.2])[:, None], (x[:3] @ W + [0.1, -0.2])[None]
    slope = np.where(
        np.abs(hx - hr) > 0,
        (np.maximum(hx, 0) - np.maximum(hr, 0)) / np.where(hx == hr, 1, hx - hr),
        (hx > 0).astype(np.float32),
    )
    delta = x[:, None, :] - x[None, :3, :]
    expected = (delta[..., None] * W[None, None] * slope[:, :, None, :]).mean(axis=1)
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-6)


def test_thousand_op_elementwise_chain(tmp_path, capfd):
    """1 000 fused Tanh ops (recursed once per op before: RecursionError): exact rescale values."""
    nodes = [oh.make_node("MatMul", ["x", "w"], ["t0"])]
    nodes += [oh.make_node("Tanh", [f"t{i}"], [f"t{i + 1}"]) for i in range(1000)]
    model = save_model(
        tmp_path / "chain.onnx",
        nodes,
        [oh.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [oh.make_tensor_value_info("t1000", FLOAT, ["N", 2])],
        [weights()],
    )
    x = (RNG.normal(size=(6, 4)) * 2).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, err = run_cli([model, tmp_path / "x.npy", "-o", tmp_path / "v.npz", "-q"], capfd)
    assert code == EXIT_OK, err
    with np.load(tmp_path / "v.npz") as result:
        values = result["shap_values"]

    def chain(t):
        t = t.astype(np.float64)
        for _ in range(1000):
            t = np.tanh(t)
        return t

    tx, tr = (x @ W)[:, None], (x @ W)[None]
    fx, fr = chain(tx), chain(tr)
    slope = np.where(np.abs(tx - tr) > 1e-6, (fx - fr) / np.where(tx == tr, 1, tx - tr), 0.0)
    expected = ((x[:, None, :] - x[None, :, :])[..., None] * W[None, None] * slope[:, :, None, :]).mean(
        axis=1
    )
    np.testing.assert_allclose(values, expected, rtol=1e-3, atol=1e-6)


def _fixed_batch_model(path: Path, batch: int, target: list[int]) -> Path:
    shape = numpy_helper.from_array(np.array(target, np.int64), "target")
    return save_model(
        path,
        [oh.make_node("Reshape", ["x", "target"], ["f"]), *mlp_nodes(x="f")],
        [oh.make_tensor_value_info("x", FLOAT, [batch, 1, 2, 2])],
        [oh.make_tensor_value_info("y", FLOAT, [batch, 2])],
        [shape, weights()],
    )


@pytest.mark.parametrize("batch", [1, 8, 16])
def test_fixed_batch_exports_are_relaxed(batch, tmp_path, capfd):
    """Input and Reshape fixed at 1, 8 or 16 rows (16 raised 'Got: 1 Expected: 16' before): same values as
    the dynamic model."""
    x = RNG.normal(size=(20, 1, 2, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    fixed = _fixed_batch_model(tmp_path / "fixed.onnx", batch, [batch, 4])
    code, err = run_cli([fixed, tmp_path / "x.npy", "-o", tmp_path / "v.npz", "-q"], capfd)
    assert code == EXIT_OK, err
    with np.load(tmp_path / "v.npz") as result:
        values = result["shap_values"]
    dynamic = onnxshap.DeepExplainer(_fixed_batch_model(tmp_path / "dyn.onnx", "N", [-1, 4]), x)
    np.testing.assert_allclose(values, dynamic.shap_values(x), rtol=1e-5, atol=1e-7)


def test_fixed_batch_that_cannot_be_relaxed_is_one_clear_error(tmp_path, capfd):
    np.save(tmp_path / "x.npy", RNG.normal(size=(20, 1, 2, 2)).astype(np.float32))
    model = _fixed_batch_model(tmp_path / "fixed.onnx", 16, [4, 16])  # rows of 16 → transposed-style mix
    model_proto = onnx.load(str(model))
    model_proto.graph.node[0].output[0] = "f0"
    model_proto.graph.node.insert(1, oh.make_node("Reshape", ["f0", "back"], ["f"]))
    model_proto.graph.initializer.append(numpy_helper.from_array(np.array([16, 4], np.int64), "back"))
    onnx.save(model_proto, str(model))
    before = listing(tmp_path)
    code, err = run_cli([model, tmp_path / "x.npy"], capfd)
    assert code == EXIT_FAILED and "Traceback" not in err
    assert err.startswith("onnxshap: error: the model only runs with a batch of 16 (inputs: x)")
    assert listing(tmp_path) == before


def test_first_line_helper():
    assert first_line(ValueError("\n  first  \nsecond")) == "first"
    assert first_line(ValueError("")) == "ValueError"


def test_error_classes_carry_their_exit_codes():
    assert onnxshap.ModelLoadError.exit_code == onnxshap.InputDataError.exit_code == EXIT_USAGE
    assert onnxshap.OutputFileError.exit_code == EXIT_USAGE
    assert onnxshap.UnsupportedModelError.exit_code == onnxshap.AdditivityError.exit_code == EXIT_FAILED


def test_write_atomic_contract(tmp_path, mlp):
    """Two writers of one target get distinct partial files; a failing writer leaves the old file; folders are
    created only when asked (plots and converters do, save_augmented and the CLI do not)."""
    target = tmp_path / "out.bin"
    with files_write.OutputSet() as first, files_write.OutputSet() as second:
        first.stage(first.check(target), lambda file: file.write(b"first"))
        second.stage(second.check(target), lambda file: file.write(b"second"))
        partials = sorted(p.name for p in tmp_path.iterdir() if files_write.PARTIAL_MARK in p.name)
        assert partials == [
            f".out.bin{files_write.PARTIAL_MARK}{os.getpid()}",
            f".out.bin{files_write.PARTIAL_MARK}{os.getpid()}-1",
        ]
        first.commit()
        second.commit()
    assert target.read_bytes() == b"second"

    def broken(file):
        file.write(b"half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        files_write.write_atomic(target, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out.bin", "x.npy"]
    assert target.read_bytes() == b"second"
    with pytest.raises(onnxshap.OutputFileError, match="is the input file"):
        files_write.write_atomic(target, lambda file: None, inputs=[target])
    nested = tmp_path / "a" / "b" / "c.bin"
    with pytest.raises(onnxshap.OutputFileError, match="does not exist"):
        files_write.write_atomic(nested, lambda file: file.write(b"x"))
    files_write.write_atomic(nested, lambda file: file.write(b"x"), make_parents=True)
    assert nested.read_bytes() == b"x"
    ex = onnxshap.DeepExplainer(mlp, np.load(tmp_path / "x.npy"))
    with pytest.raises(onnxshap.OutputFileError, match="does not exist"):
        ex.save_augmented(tmp_path / "missing" / "g.onnx")
