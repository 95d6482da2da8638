"""Run a model on small example batches and read every intermediate tensor.

The probe is how onnxshap learns what a static reading of the graph cannot always tell: the concrete shape of
every tensor, which axis carries the batch (the one whose size follows the number of rows), and which integer
"shape plumbing" tensors do not depend on the batch at all (so they can be folded into constants). The
probed shapes are written into the graph (:func:`annotate`), the batch dimension as the symbol ``batch``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap import runtime

PROBE_BATCHES = (2, 3)
BATCH = "batch"

Probe = dict[str, np.ndarray]


def probe_feeds(examples: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``batch`` rows for each input, cycling the example rows."""
    return {name: np.ascontiguousarray(array[np.arange(batch) % array.shape[0]])
            for name, array in examples.items()}


def probe_twice(model: ir.Model, examples: dict[str, np.ndarray]) -> tuple[Probe, Probe]:
    """Every tensor of ``model`` (inputs and initializers included) at the two probe batch sizes."""
    feeds = []
    for batch in PROBE_BATCHES:
        rows = probe_feeds(examples, batch)
        feeds.append({v.name: rows[v.name] for v in model.graph.inputs})
    probes = runtime.evaluate_each(model, feeds)
    weights = {name: init.const_value.numpy() for name, init in model.graph.initializers.items()}
    for values, feed in zip(probes, feeds):
        values.update(feed)
        values.update(weights)
    return probes[0], probes[1]


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


def annotate(model: ir.Model, probe_a: Probe, probe_b: Probe) -> None:
    """Write the probed shapes and element types into the graph's values (batch dims as ``batch``)."""
    values = [*model.graph.inputs, *(out for node in model.graph for out in node.outputs)]
    for value in values:
        if value.name in probe_a and value.name in probe_b:
            a, b = probe_a[value.name], probe_b[value.name]
            value.shape = ir.Shape([_dim(d, e) for d, e in zip(a.shape, b.shape)]) if a.ndim == b.ndim else None
            value.type = ir.TensorType(ir.DataType.from_numpy(a.dtype))


def _dim(at_a: int, at_b: int) -> int | ir.SymbolicDim:
    """A probed dim: static, ``batch`` where it is the batch, anonymous where it is a multiple of it (two
    dims named ``batch`` must be equal: ONNX Runtime's optimiser relies on it)."""
    if at_a == at_b:
        return at_a
    return ir.SymbolicDim(BATCH if (at_a, at_b) == PROBE_BATCHES else None)


def static_shape(value: ir.Value) -> tuple | None:
    """The annotated shape as a tuple (the batch dim as None), or None when unknown."""
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)
