"""ONNX Runtime: provider choice, the IR version the runtime reads, and sessions.

``device="auto"`` takes CUDA only when its provider really loads in a session (onnxruntime-gpu lists
``CUDAExecutionProvider`` as available even on machines without a GPU or CUDA libraries); the probe runs with
ONNX Runtime's logging silenced so CPU-only machines see no error spew.
"""

from __future__ import annotations

import functools
import os
import warnings
from importlib import metadata

import onnx
import onnx.helper as oh

from onnxshap.errors import OnnxShapError

DEVICES = ("auto", "cpu", "cuda")


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


def _quiet_options():
    options = _ort().SessionOptions()
    options.log_severity_level = 4
    return options


@functools.cache
def runtime_ir_version() -> int:
    """The newest ONNX IR version the installed ONNX Runtime accepts (measured once, then cached)."""
    ort = _ort()
    for version in range(onnx.IR_VERSION, 6, -1):
        try:
            ort.InferenceSession(_tiny_model(version), _quiet_options(), providers=["CPUExecutionProvider"])
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
        session = ort.InferenceSession(
            _tiny_model(runtime_ir_version()),
            _quiet_options(),
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        )
        return "CUDAExecutionProvider" in session.get_providers()
    except Exception:  # noqa: BLE001
        return False
    finally:
        ort.set_default_logger_severity(2)


def providers_for(device: str) -> list[str]:
    """Execution providers for ``device`` in ``auto|cpu|cuda``."""
    if device not in DEVICES:
        raise OnnxShapError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if not cuda_usable():
            raise OnnxShapError(
                "device 'cuda' requested but ONNX Runtime's CUDA provider does not load here "
                "(no GPU, or CUDA/cuDNN libraries missing); use --device cpu or auto"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_usable() else ["CPUExecutionProvider"]


def make_session(model: onnx.ModelProto | bytes, providers: list[str], threads: int | None = None):
    """An InferenceSession with full graph optimisation and quiet logging."""
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get("ONNXSHAP_THREADS", "0"))
    if threads:
        options.intra_op_num_threads = threads
    payload = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(payload, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxShapError(f"ONNX Runtime refused the model: {first}") from None
