"""Make the batch axis dynamic: the explained inputs' first axis, and exports that fixed the batch at 1.

Explaining runs the model on the samples and the background stacked along the batch axis, so every input's
first axis must be free. Exporters sometimes bake a batch of 1 into Reshape targets (``[1, -1]``) or write
zero initial states of recurrent ops for one row; :func:`probe_relaxing_batch` notices (the outputs do not
follow the number of rows, or the model fails at another batch size), relaxes those constants once and
probes again, and otherwise refuses with the recipe for a dynamic-batch export.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap import runtime
from onnxshap.errors import OnnxRuntimeError, UnsupportedModelError, first_line
from onnxshap.lower.probe import BATCH, Probe, batch_axis, probe_feeds, probe_twice

RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})


def declared_batch(model: ir.Model, examples: dict[str, np.ndarray]) -> int:
    """The batch size the inputs fix (their common static first dimension); 1 when none or they differ."""
    dims = {value.shape[0] for value in model.graph.inputs
            if value.name in examples and value.shape is not None and len(value.shape) > 0}
    return dims.pop() if len(dims) == 1 and all(isinstance(d, int) and d > 0 for d in dims) else 1


def relax_input_batch(model: ir.Model, examples: dict[str, np.ndarray]) -> None:
    """Declare the first axis of every explained input as the symbolic ``batch``."""
    for value in model.graph.inputs:
        if value.name in examples and value.shape is not None and len(value.shape) > 0:
            value.shape = ir.Shape([ir.SymbolicDim(BATCH), *list(value.shape)[1:]])


def probe_relaxing_batch(model: ir.Model, examples: dict[str, np.ndarray], fixed_batch: int = 1
                         ) -> tuple[Probe, Probe]:
    """Probe at two batch sizes; if the export fixed the batch (at ``fixed_batch``, the inputs' declared batch
    dimension, else 1), relax its constants once and retry."""
    cause: Exception | str
    try:
        probes = probe_twice(model, examples)
        if _outputs_follow_batch(model, *probes):
            return probes
        cause = "its outputs do not follow the number of input rows"
    except OnnxRuntimeError as error:
        cause = error
    try:
        fixed_feeds = probe_feeds(examples, fixed_batch)
        at_fixed = {**fixed_feeds, **runtime.evaluate(model, fixed_feeds)}
    except OnnxRuntimeError:
        if isinstance(cause, Exception):  # it runs at no batch size: not a batch problem
            raise cause from None
        raise
    if not _relax_fixed_batch(model, at_fixed, fixed_batch):
        raise _fixed_batch_error(model, cause, fixed_batch)
    try:
        probes = probe_twice(model, examples)
    except OnnxRuntimeError:
        raise _fixed_batch_error(model, cause, fixed_batch) from None
    if not _outputs_follow_batch(model, *probes):
        raise _fixed_batch_error(model, cause, fixed_batch)
    return probes


def _outputs_follow_batch(model: ir.Model, probe_a: Probe, probe_b: Probe) -> bool:
    """At least one graph output follows the batch on axis 0 (batch-independent auxiliary outputs may not)."""
    axes = [batch_axis(probe_a[v.name].shape, probe_b[v.name].shape)
            for v in model.graph.outputs if v.name in probe_a]
    return 0 in axes and all(axis in (0, None) for axis in axes)


def _relax_fixed_batch(model: ir.Model, at_fixed: dict[str, np.ndarray], batch: int = 1) -> bool:
    """Turn Reshape targets that hard-code the batch (``batch`` rows, as the model ran in ``at_fixed``) into
    ones that follow it, and drop constant zero initial states of recurrent ops (zeros are the ONNX default,
    for any batch). A target's first entry is relaxed when it equals the batch and so does its input's first
    dimension; for batch 1, also a target whose only 1 is the batch."""
    changed = False
    for node in model.graph:
        if node.op_type in RECURRENT_OPS:
            for index in (5, 6):
                state = node.inputs[index] if len(node.inputs) > index else None
                if state is not None and state.const_value is not None and not state.const_value.numpy().any():
                    node.replace_input_with(index, None)
                    changed = True
            continue
        if node.op_type != "Reshape" or node.inputs[1] is None or node.inputs[1].const_value is None:
            continue
        target = node.inputs[1].const_value.numpy().copy()
        source = at_fixed.get(node.inputs[0].name)
        source_shape = source.shape if source is not None else None
        ones = np.flatnonzero(target == 1)
        if batch == 1 and -1 not in target and len(ones) == 1:  # the only 1 must be the batch: let it follow
            target[ones[0]] = -1
        elif target.size and target[0] == batch and (
                source_shape[:1] == (batch,) if source_shape is not None else batch == 1):
            target[0] = 0  # copy the input's leading (batch) dimension
        else:
            continue
        relaxed = ir.Value(name=f"{node.inputs[1].name}__relaxed", const_value=ir.tensor(target))
        node.replace_input_with(1, relaxed)
        model.graph.register_initializer(relaxed)
        changed = True
    return changed


def _fixed_batch_error(model: ir.Model, cause: Exception | str, batch: int = 1) -> UnsupportedModelError:
    names = ", ".join(v.name for v in model.graph.inputs)
    reason = cause if isinstance(cause, str) else first_line(cause)
    return UnsupportedModelError(
        f"the model only runs with a batch of {batch} (inputs: {names}) and onnxshap could not relax it: "
        f"{reason}\nRe-export with a dynamic batch axis: torch.onnx.export(..., dynamic_axes={{'<input>': "
        "{0: 'batch'}, '<output>': {0: 'batch'}}) or dynamo=True with dynamic_shapes; tf2onnx: an "
        "input_signature with None as the batch size."
    )
