"""ONNX Runtime: the one place that makes sessions, runs them and turns their failures into onnxshap errors.

- :func:`providers_for` picks execution providers. ``device="auto"`` takes CUDA only when its provider really
  loads in a session (onnxruntime-gpu lists ``CUDAExecutionProvider`` even on machines without a GPU); the
  check runs with ONNX Runtime's logging silenced so CPU-only machines see no error spew.
- :func:`to_proto` serializes a model with an IR version the installed runtime reads.
- :func:`make_session` builds a session (from files with external data when the model is over protobuf's 2 GB
  limit, :mod:`onnxshap.files.model_files`) in one of three modes: ``"explain"`` (the thread pool, and the graph
  optimisation :func:`graph_optimization` picks for the graph) for the work, ``"forward"`` (the same without
  ONNX Runtime's memory arena, for the occasional forward passes) and ``"probe"`` (no optimisation, one thread)
  for small probing runs where session set-up dominates.
- :func:`run` and :func:`evaluate` run sessions; every failure becomes one :class:`OnnxRuntimeError` line.
  :func:`run_bound` runs through IO binding on a device (CUDA): inputs placed once with :func:`on_device`,
  intermediate tensors kept there, only the outputs copied back; :func:`binding_device` says when to use it.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir

from onnxshap.errors import OnnxRuntimeError, UsageError, first_line
from onnxshap.files import model_files
from onnxshap.files.write import OutputSet
from onnxshap.graph.builder import collection_paused

DEVICES = ("auto", "cpu", "cuda")
CPU = ["CPUExecutionProvider"]


def warn_if_both_runtimes_installed() -> None:
    """Warn when both ``onnxruntime`` and ``onnxruntime-gpu`` are installed: they overwrite one module."""
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            found.append(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(found) == 2:
        warnings.warn(
            "both 'onnxruntime' and 'onnxruntime-gpu' are installed; they overwrite each other's "
            "'onnxruntime' module. Keep one: pip uninstall -y onnxruntime onnxruntime-gpu && "
            "pip install onnxruntime-gpu  (or onnxruntime on CPU-only platforms)",
            RuntimeWarning,
            stacklevel=2,
        )


def _ort():
    import onnxruntime

    return onnxruntime


def _tiny_model(ir_version: int) -> bytes:
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    model.ir_version = ir_version
    return model.SerializeToString()


OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
CONVOLUTIONS = frozenset({"Conv", "ConvTranspose"})


def graph_optimization(model: ir.Model | onnx.ModelProto | bytes) -> str:
    """ONNX Runtime's graph optimisation level for running ``model``: ``"all"`` when it convolves, else
    ``"disable"``.

    Session creation costs ONNX Runtime time per node, several times more with its optimisers on; the unrolled
    recurrent graphs have thousands of small nodes and gain nothing at run time from the optimisers, while
    convolutions gain their blocked layouts. Measured with onnxruntime 1.31 on 2 cores, n = 100, m = 100: stacked
    LSTM (3 019 nodes) session 0.27 s "disable" (without buffer-reuse planning) against 0.63 s "all", runs
    0.23 s against 0.30 s; CNN (217 nodes, k = 10, n = 20) session 0.02 s either way, runs 6.1 s "all" against
    10.5 s "disable". ``ONNXSHAP_GRAPH_OPTIMIZATION`` (one of OPTIMIZATION_LEVELS) overrides the choice.
    """
    forced = os.environ.get("ONNXSHAP_GRAPH_OPTIMIZATION", "").strip().lower()
    if forced:
        if forced not in OPTIMIZATION_LEVELS:
            raise UsageError(f"ONNXSHAP_GRAPH_OPTIMIZATION must be one of {', '.join(OPTIMIZATION_LEVELS)}, "
                             f"got {forced!r}")
        return forced
    if isinstance(model, ir.Model):
        ops = {node.op_type for node in model.graph}
    else:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.ModelProto.FromString(model)
        ops = {node.op_type for node in proto.graph.node}
    return "all" if ops & CONVOLUTIONS else "disable"


def _options(mode: str, optimization: str = "all"):
    ort = _ort()
    options = ort.SessionOptions()
    if mode in ("explain", "forward"):
        options.log_severity_level = 4  # failures come back as exceptions, worded by the caller; no log lines
        levels = ort.GraphOptimizationLevel
        options.graph_optimization_level = {
            "disable": levels.ORT_DISABLE_ALL, "basic": levels.ORT_ENABLE_BASIC,
            "extended": levels.ORT_ENABLE_EXTENDED, "all": levels.ORT_ENABLE_ALL}[optimization]
        if optimization == "disable":  # many small nodes: planning buffer reuse costs more than it saves
            options.enable_mem_reuse = False
        # Memory patterns pre-allocate one block per input shape beside the arena's freed chunks: measured, they
        # doubled the peak and cost time whenever chunk sizes change (the last chunk of each kind does).
        options.enable_mem_pattern = False
        if mode == "forward":  # its activations go back to the system after each call, not into an arena kept
            options.enable_cpu_mem_arena = False  # for the explainer's life (ResNet-18, 50 rows: 590 MB)
        threads = int(os.environ.get("ONNXSHAP_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
    else:  # probe: small batches, where thread-pool start-up and optimisation cost more than they save
        options.log_severity_level = 4
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
    return options


@functools.cache
def runtime_ir_version() -> int:
    """The newest ONNX IR version the installed ONNX Runtime accepts (measured once, then cached)."""
    ort = _ort()
    for version in range(onnx.IR_VERSION, 6, -1):
        try:
            ort.InferenceSession(_tiny_model(version), _options("probe"), providers=CPU)
        except Exception:  # noqa: BLE001, S112 - any refusal means "not this version"
            continue
        return version
    return 7


@functools.cache
def cuda_usable() -> bool:
    """True when a session really runs on the CUDA provider here."""
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    ort.set_default_logger_severity(4)  # the provider bridge logs load failures on the global logger
    try:
        session = ort.InferenceSession(_tiny_model(runtime_ir_version()), _options("probe"),
                                       providers=["CUDAExecutionProvider", *CPU])
        return "CUDAExecutionProvider" in session.get_providers()
    except Exception:  # noqa: BLE001
        return False
    finally:
        ort.set_default_logger_severity(2)


def providers_for(device: str) -> list[str]:
    """Execution providers for ``device`` in ``auto|cpu|cuda``."""
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return list(CPU)
    if device == "cuda" and not cuda_usable():
        raise UsageError("device 'cuda' requested but ONNX Runtime's CUDA provider does not load here "
                         "(no GPU, or CUDA/cuDNN libraries missing); use --device cpu or auto")
    return ["CUDAExecutionProvider", *CPU] if cuda_usable() else list(CPU)


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as a ModelProto with an IR version the installed ONNX Runtime reads.

    Serialising allocates an object per node, value and shape: the collector is paused as when building
    (measured on the Keras BiLSTM×2's 4 851-node graph with TensorFlow loaded: 0.59 s → 0.06 s).
    """
    with collection_paused():
        proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    if proto.ir_version > runtime_ir_version():
        if not isinstance(model, ir.Model):
            copy = onnx.ModelProto()
            copy.CopyFrom(proto)
            proto = copy
        proto.ir_version = runtime_ir_version()
    return proto


def make_session(model: ir.Model | onnx.ModelProto | bytes, providers: list[str] | None = None,
                 mode: str = "explain"):
    """An InferenceSession for ``model`` in mode ``"explain"`` or ``"probe"`` (see the module docstring).

    Raises:
        OnnxRuntimeError: ONNX Runtime refused the model (its first line).
    """
    optimization = graph_optimization(model)
    if isinstance(model, ir.Model) and model_files.needs_external_data(model):
        return _session_from_files(model, providers, mode, optimization)
    payload = model if isinstance(model, bytes) else to_proto(model).SerializeToString()
    return _session(payload, providers, mode, optimization)


def _session(source: bytes | str, providers: list[str] | None, mode: str, optimization: str):
    try:
        return _ort().InferenceSession(source, _options(mode, optimization), providers=providers or CPU)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise OnnxRuntimeError(f"ONNX Runtime refused the model: {first_line(exc)}") from None


def _session_from_files(model: ir.Model, providers: list[str] | None, mode: str, optimization: str):
    """A session for a model over protobuf's 2 GB limit: written with external data to a temporary folder that
    ONNX Runtime reads from (it copies or maps the weights; the folder is removed once the session exists)."""
    with tempfile.TemporaryDirectory(prefix="onnxshap-model-") as folder:
        path = Path(folder) / "model.onnx"
        with OutputSet() as outputs:
            model_files.stage_model(outputs, outputs.check(path, "temporary model"), model,
                                    ir_version=runtime_ir_version())
            outputs.commit()
        return _session(str(path), providers, mode, optimization)


def run(session, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run`` with ONNX Runtime's failures turned into one :class:`OnnxRuntimeError` line."""
    try:
        return session.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise _run_failed(exc) from None


def _run_failed(exc: Exception) -> OnnxRuntimeError:
    """A failed run as one line, with a hint where ONNX Runtime could not allocate."""
    first = first_line(exc)
    hint = " (out of memory? pass a smaller batch_size / --batch-size)" if "alloc" in first.lower() else ""
    return OnnxRuntimeError(f"ONNX Runtime failed: {first}{hint}")


def binding_device(providers: list[str]) -> str | None:
    """The device whose memory :func:`run_bound` keeps tensors in: ``"cuda"`` when CUDA runs the session,
    else None (on CPU, plain :func:`run` reads numpy arrays in place: binding buys nothing)."""
    return "cuda" if providers and providers[0] == "CUDAExecutionProvider" else None


def on_device(array: np.ndarray, device: str):
    """``array`` copied once into an OrtValue on ``device`` (``"cuda"`` or ``"cpu"``), to be fed many times."""
    try:
        return _ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise OnnxRuntimeError(f"ONNX Runtime could not place a {array.shape} {array.dtype} array on {device}: "
                               f"{first_line(exc)}") from None


def run_bound(session, names: list[str], feeds: dict, device: str) -> list[np.ndarray]:
    """``session.run`` through IO binding: feeds that are OrtValues (:func:`on_device`) stay where they are,
    numpy feeds are copied in, every output is allocated on ``device`` and only the outputs named come back
    to the host. Intermediate tensors (the multiplier stream) never leave the device.

    Raises:
        OnnxRuntimeError: ONNX Runtime failed (its first line).
    """
    try:
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, device)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise _run_failed(exc) from None


def evaluate(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray],
             names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` once in probe mode and return the named tensors (default: every node output).

    Raises:
        OnnxRuntimeError: ONNX Runtime refused the model or failed while running it.
    """
    return evaluate_each(model, [feeds], names)[0]


def evaluate_each(model: ir.Model | onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                  names: list[str] | None = None) -> list[dict[str, np.ndarray]]:
    """:func:`evaluate` on each of ``feeds`` through one session (one serialisation and one session set-up:
    ~40 % of a probe of the unrolled Keras BiLSTM×2's 591-node graph)."""
    proto = _with_outputs(to_proto(model), names)
    session = make_session(proto, CPU, mode="probe")
    produced = [o.name for o in session.get_outputs()]
    wanted = produced if names is None else [n for n in dict.fromkeys(names) if n in set(produced)]
    results = []
    for feed in feeds:
        values = dict(zip(wanted, run(session, wanted, feed)))
        values.update({n: feed[n] for n in names or () if n in feed})
        results.append(values)
    return results


def _with_outputs(proto: onnx.ModelProto, names: list[str] | None) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph outputs include ``names`` (every node output when None)."""
    graph_inputs = {i.name for i in proto.graph.input}
    if names is None:
        names = [o for node in proto.graph.node for o in node.output if o]
    existing = {o.name for o in proto.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in existing and n not in graph_inputs]
    if not wanted:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted)
    return copy
