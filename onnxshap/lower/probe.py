"""Run a model on small example batches and read every intermediate tensor.

The probe is how onnxshap learns what a static reading of the graph cannot always tell: the concrete shape of
every tensor, which axis carries the batch (the one whose size follows the number of rows), and which integer
"shape plumbing" tensors do not depend on the batch at all (so they can be folded into constants).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxshap.errors import UnsupportedModelError
from onnxshap.runtime import runtime_ir_version

PROBE_BATCHES = (2, 3)


def model_to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model`` with an IR version the installed ONNX Runtime reads."""
    proto = ir.to_proto(model)
    proto.ir_version = min(proto.ir_version or runtime_ir_version(), runtime_ir_version())
    return proto


def run_values(
    model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Run ``model`` on ``feeds`` and return the named tensors (default: every top-level tensor).

    Raises:
        UnsupportedModelError: ONNX Runtime refused the model or failed while running it.
    """
    import onnxruntime as ort

    proto = model if isinstance(model, onnx.ModelProto) else model_to_proto(model)
    proto = _with_outputs(proto, names)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1  # small probe batches: thread-pool start-up costs more than it saves
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        wanted = [o.name for o in session.get_outputs()]
        results = session.run(wanted, feeds)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"ONNX Runtime could not run the model: {first}") from None
    return dict(zip(wanted, results))


def _with_outputs(proto: onnx.ModelProto, names: list[str] | None) -> onnx.ModelProto:
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


def probe_feeds(examples: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``batch`` rows for each input, cycling the example rows."""
    feeds = {}
    for name, array in examples.items():
        index = np.arange(batch) % array.shape[0]
        feeds[name] = np.ascontiguousarray(array[index])
    return feeds


def probe_twice(model: ir.Model, examples: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Every tensor of ``model`` at the two probe batch sizes."""
    return tuple(run_values(model, probe_feeds(examples, b)) for b in PROBE_BATCHES)


def batch_axis(shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> int | None | str:
    """The axis whose size is the batch size in both probes.

    Returns the axis, None when no axis follows the batch, or ``"merged"`` when the batch is folded into an
    axis together with other dimensions (its size is a multiple of the batch).
    """
    batch_a, batch_b = PROBE_BATCHES
    if len(shape_a) != len(shape_b):
        return "merged"
    changed = [i for i, (a, b) in enumerate(zip(shape_a, shape_b)) if a != b]
    if not changed:
        return None
    if len(changed) == 1 and shape_a[changed[0]] == batch_a and shape_b[changed[0]] == batch_b:
        return changed[0]
    return "merged"
