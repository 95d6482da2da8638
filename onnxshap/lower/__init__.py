"""Lower a model to the primitive ops the rule table knows, and learn every tensor's static shape.

Passes, in order (each documented in its module):

1. inline local functions; make the explained inputs' batch axis dynamic;
2. probe (``probe.py``): run the model on two small batches, read every tensor;
3. fold batch-invariant shape plumbing into constants (``fold.py``);
4. unroll ``Loop``/``Scan`` with a static trip count (``loops.py``) and ``LSTM``/``GRU``/``RNN``
   (``recurrent.py``) over the sequence length of the data being explained;
5. decompose composites (``composites.py``): Gemm, BatchNormalization, AveragePool, LayerNormalization, ...;
6. probe again: the lowered graph's shapes and batch axes, which the sweep builds on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, NameFixPass

from onnxshap.errors import UnsupportedModelError, unsupported_nodes_error
from onnxshap.lower.composites import decompose_composites
from onnxshap.lower.fold import fold_batch_invariant
from onnxshap.lower.probe import PROBE_BATCHES, batch_axis, probe_feeds, probe_twice, run_values

BATCH = "batch"


@dataclass
class LoweredModel:
    """A lowered forward model and what the probe learned about it.

    Attributes:
        model: the lowered model (primitive ops only, parameters constant).
        opset: its default-domain opset.
        shapes: static shape of every tensor at the first probe batch size, by name.
        batch_axes: per tensor name, the batch axis, None (batch-independent) or "merged".
        dtypes: numpy dtype of every tensor, by name.
        row_constant: tensors with a batch axis whose value does not depend on the data and is the same in
            every row (zero initial states sized from the batch); rules may use their first row.
    """

    model: ir.Model
    opset: int
    shapes: dict[str, tuple[int, ...]]
    batch_axes: dict[str, int | None | str]
    dtypes: dict[str, np.dtype]
    row_constant: frozenset[str] = frozenset()

    def feature_shape(self, name: str) -> tuple[int, ...]:
        """The shape with the batch axis dropped."""
        shape, axis = self.shapes[name], self.batch_axes[name]
        return tuple(d for i, d in enumerate(shape) if i != axis)


def lower(proto: onnx.ModelProto, examples: dict[str, np.ndarray]) -> LoweredModel:
    """Lower ``proto`` for data shaped like ``examples`` (input name → array with a leading batch axis)."""
    model = ir.from_proto(proto)
    _drop_overridable_initializer_inputs(model)
    InlinePass()(model)
    NameFixPass()(model)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    unknown = _unknown_ops(model)
    _relax_input_batch(model, examples)
    try:
        probe_a, probe_b = _probe_relaxing_batch(model, examples)
    except UnsupportedModelError:
        if unknown:  # e.g. custom-domain ops ONNX Runtime cannot run either: name them all
            raise unsupported_nodes_error(unknown) from None
        raise
    _annotate(model, probe_a, probe_b)
    fold_batch_invariant(model, probe_a, probe_b)
    if _unroll(model):
        probe_a, probe_b = probe_twice(model, examples)
        _annotate(model, probe_a, probe_b)
        fold_batch_invariant(model, probe_a, probe_b)
    shapes = {name: array.shape for name, array in probe_a.items()}
    for value in model.graph.inputs:
        shapes[value.name] = probe_feeds(examples, PROBE_BATCHES[0])[value.name].shape
    if decompose_composites(model, shapes, opset):
        probe_a, probe_b = probe_twice(model, examples)
        fold_batch_invariant(model, probe_a, probe_b)
    probe_a, probe_b = probe_twice(model, examples)
    for value in model.graph.inputs:
        probe_a[value.name] = probe_feeds(examples, PROBE_BATCHES[0])[value.name]
        probe_b[value.name] = probe_feeds(examples, PROBE_BATCHES[1])[value.name]
    for init in model.graph.initializers.values():
        probe_a[init.name] = probe_b[init.name] = init.const_value.numpy()
    _annotate(model, probe_a, probe_b)
    batch_axes = {n: batch_axis(a.shape, probe_b[n].shape) for n, a in probe_a.items()}
    return LoweredModel(
        model=model,
        opset=opset,
        shapes={n: a.shape for n, a in probe_a.items()},
        batch_axes=batch_axes,
        dtypes={n: a.dtype for n, a in probe_a.items()},
        row_constant=_row_constant(model, probe_a, probe_b, batch_axes),
    )


def _row_constant(model: ir.Model, probe_a: dict, probe_b: dict, batch_axes: dict) -> frozenset[str]:
    """Tensors that follow the batch in shape only: not value-dependent, every row equal in both probes."""
    from onnxshap.lower.fold import value_dependent

    dependent = {v.name for v in value_dependent(model.graph)}
    found = set()
    for name, axis in batch_axes.items():
        if not isinstance(axis, int) or name in dependent:
            continue
        if all(np.array_equal(np.take(p[name], [0], axis=axis).repeat(p[name].shape[axis], axis=axis), p[name])
               for p in (probe_a, probe_b)):
            found.add(name)
    return frozenset(found)


def _drop_overridable_initializer_inputs(model: ir.Model) -> None:
    """Inputs that are also initializers (``keep_initializers_as_inputs``, IR < 4) are weights, not data."""
    initializers = model.graph.initializers
    for value in list(model.graph.inputs):
        if value.name in initializers:
            model.graph.inputs.remove(value)


def _unknown_ops(model: ir.Model) -> list[ir.Node]:
    """Nodes on a data path with no rule, lowering or fold (the sweep's check refuses them with the rest)."""
    from onnxshap.lower.composites import REWRITTEN_OPS
    from onnxshap.lower.fold import value_dependent
    from onnxshap.rules.elementwise import ELEMENTWISE_OPS
    from onnxshap.rules.registry import RULES, load_rules

    load_rules()
    known = set(RULES) | ELEMENTWISE_OPS | REWRITTEN_OPS | LOOP_OPS | RECURRENT_OPS | {"Constant"}
    dependent = value_dependent(model.graph)
    unknown = [node for node in model.graph
               if any(v in dependent for v in node.inputs if v is not None)
               and (node.domain not in ("", "ai.onnx") or node.op_type not in known)]
    return unknown


def _relax_input_batch(model: ir.Model, examples: dict[str, np.ndarray]) -> None:
    for value in model.graph.inputs:
        if value.name in examples and value.shape is not None and len(value.shape) > 0:
            dims = list(value.shape)
            dims[0] = ir.SymbolicDim(BATCH)
            value.shape = ir.Shape(dims)


def _probe_relaxing_batch(model: ir.Model, examples: dict[str, np.ndarray]):
    """Probe at two batch sizes; if the export fixed the batch at 1, relax its Reshapes once and retry."""
    try:
        probes = probe_twice(model, examples)
        if _outputs_follow_batch(model, *probes):
            return probes
        cause: Exception | str = "its outputs do not follow the number of input rows"
    except UnsupportedModelError as error:
        cause = error
    try:
        at_one = run_values(model, probe_feeds(examples, 1))
    except UnsupportedModelError:
        if isinstance(cause, Exception):
            raise cause from None
        raise
    if not _relax_fixed_batch(model, at_one):
        raise _fixed_batch_error(model, cause) from None
    try:
        probes = probe_twice(model, examples)
    except UnsupportedModelError:
        raise _fixed_batch_error(model, cause) from None
    if not _outputs_follow_batch(model, *probes):
        raise _fixed_batch_error(model, cause)
    return probes


def _outputs_follow_batch(model: ir.Model, probe_a: dict, probe_b: dict) -> bool:
    return all(batch_axis(probe_a[v.name].shape, probe_b[v.name].shape) == 0
               for v in model.graph.outputs if v.name in probe_a)


def _relax_fixed_batch(model: ir.Model, at_one: dict[str, np.ndarray]) -> bool:
    """Turn Reshape targets that hard-code batch 1 into ones that follow the batch, and drop constant zero
    initial states of recurrent ops (zeros are the ONNX default, for any batch)."""
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
        source = at_one.get(node.inputs[0].name)
        source_shape = source.shape if source is not None else None
        ones = np.flatnonzero(target == 1)
        if -1 not in target and len(ones) == 1:  # the only 1 must be the batch: let it follow
            target[ones[0]] = -1
        elif target.size and target[0] == 1 and (source_shape is None or source_shape[:1] == (1,)):
            target[0] = 0  # copy the input's leading (batch) dimension
        else:
            continue
        node.replace_input_with(1, ir.Value(name=f"{node.inputs[1].name}__relaxed", const_value=ir.tensor(target)))
        model.graph.register_initializer(node.inputs[1])
        changed = True
    return changed


def _fixed_batch_error(model: ir.Model, cause: Exception) -> UnsupportedModelError:
    names = ", ".join(v.name for v in model.graph.inputs)
    return UnsupportedModelError(
        f"the model only runs with a batch of 1 (inputs: {names}) and onnxshap could not relax it: {cause}\n"
        "Re-export with a dynamic batch axis: torch.onnx.export(..., dynamic_axes={'<input>': {0: 'batch'}, "
        "'<output>': {0: 'batch'}}) or dynamo=True with dynamic_shapes; tf2onnx: an input_signature with "
        "None as the batch size."
    )


def _annotate(model: ir.Model, probe_a: dict[str, np.ndarray], probe_b: dict[str, np.ndarray]) -> None:
    """Write the probed static shapes into the graph (batch axis symbolic) for the passes that read them."""
    for node in model.graph:
        for value in node.outputs:
            if value.name in probe_a:
                _set_shape(value, probe_a[value.name], probe_b[value.name])


def _set_shape(value: ir.Value, a: np.ndarray, b: np.ndarray) -> None:
    """Static dims where both probes agree; a symbolic dim wherever the size follows the batch."""
    if a.ndim != b.ndim:
        value.shape = None
    else:
        value.shape = ir.Shape([d if d == e else ir.SymbolicDim(BATCH) for d, e in zip(a.shape, b.shape)])
    value.type = ir.TensorType(ir.DataType.from_numpy(a.dtype))


LOOP_OPS = {"Loop", "Scan"}
RECURRENT_OPS = {"LSTM", "GRU", "RNN"}


def _unroll(model: ir.Model) -> bool:
    """Unroll loops and recurrent ops; returns whether anything changed."""
    present = {node.op_type for node in model.graph}
    if not present & (LOOP_OPS | RECURRENT_OPS):
        return False
    from onnxshap.lower.loops import unroll_loops
    from onnxshap.lower.recurrent import unroll_recurrent

    changed = unroll_loops(model)
    return unroll_recurrent(model) or changed
