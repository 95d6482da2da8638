"""Lower a model to the primitive ops the rule table knows, and learn every tensor's static shape.

Passes, in order (each documented in its module):

1. inline local functions; initializers listed as inputs are weights; the explained inputs' batch is dynamic
   (``batch.py``, which also relaxes exports that fixed the batch at 1);
2. probe (``probe.py``): run the model on two small batches, read every tensor, write the shapes into it;
3. fold batch-invariant shape plumbing into constants (``fold.py``); rewrite Gathers whose shape-computed
   indices select inside each row (``arange(batch)``: last-token pooling) into constant-index Gathers
   (``row_gather.py``); reverse full-length sequences with a constant ``Slice`` (``ReverseSequence``,
   ``sequences.py``);
4. unroll ``Loop``/``Scan`` with a static trip count (``loops.py``); decompose the composites whose input shapes
   the probe knows (``composites.py``: Gemm, BatchNormalization, AveragePool, LayerNormalization, ...); unroll
   ``LSTM``/``GRU``/``RNN`` (``recurrent.py``) over the sequence length of the data being explained (one probe
   after both); boolean masks computed from the input move through layout ops as 0/1 floats (``masks.py``:
   Keras ``Masking``);
5. decompose the composites left (those whose input shape only the new probe knows);
6. probe again: the lowered graph's shapes and batch axes, which the sweep builds on; the lowered model must
   reproduce the original's outputs on the probe rows, else it is refused (never answered wrongly).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, NameFixPass

from onnxshap.errors import UnsupportedModelError
from onnxshap.graph.builder import collection_paused
from onnxshap.graph.edit import opset_of
from onnxshap.lower.batch import RECURRENT_OPS, declared_batch, probe_relaxing_batch, relax_input_batch
from onnxshap.lower.composites import REWRITES, DecomposeComposites
from onnxshap.lower.fold import FoldBatchInvariant, value_dependent
from onnxshap.lower.layout import BatchLayout, batch_layouts
from onnxshap.lower.loops import LOOP_OPS, UnrollLoops
from onnxshap.lower.lowered import LoweredModel
from onnxshap.lower.masks import FloatBooleanLayout
from onnxshap.lower.probe import Probe, annotate, probe_twice
from onnxshap.lower.recurrent import UnrollRecurrent
from onnxshap.lower.row_gather import GatherWithinRows
from onnxshap.lower.sequences import ReverseFullSequences

# Ops that lowering rewrites away (the rule table lists them as "lowered"); GatherND where its first index
# column is arange(batch) and the others are constant (row_gather.py).
LOWERED_OPS = (frozenset(REWRITES) - {"Conv", "ConvTranspose", "MaxPool", "Squeeze"} | LOOP_OPS | RECURRENT_OPS
               | {"GatherND", "ReverseSequence"})
MAX_PROBE_ROUNDS = 8


def lower(proto: onnx.ModelProto, examples: dict[str, np.ndarray]) -> LoweredModel:
    """Lower ``proto`` for data shaped like ``examples`` (input name → array with a leading batch axis)."""
    with collection_paused():
        return _lower(proto, examples)


def _lower(proto: onnx.ModelProto, examples: dict[str, np.ndarray]) -> LoweredModel:
    model = ir.from_proto(proto)
    for value in list(model.graph.inputs):  # keep_initializers_as_inputs / IR < 4: weights, not data
        if value.name in model.graph.initializers:
            model.graph.inputs.remove(value)
    InlinePass()(model)
    NameFixPass()(model)
    fixed_batch = declared_batch(model, examples)
    relax_input_batch(model, examples)
    probes = probe_relaxing_batch(model, examples, fixed_batch)
    expected = {v.name: probes[1][v.name] for v in model.graph.outputs}
    probes = _settle(model, examples, probes)
    row_gathers = GatherWithinRows(*probes)
    if row_gathers(model).modified:
        probes = _settle(model, examples)
    if ReverseFullSequences(*probes)(model).modified:
        probes = _settle(model, examples)
    if UnrollLoops()(model).modified:
        probes = _settle(model, examples)
    decompose = DecomposeComposites()
    # composites the probe has shapes for are rewritten before the unroll, so one probe serves both changes
    decompose(model)
    if UnrollRecurrent()(model).modified or decompose.rewritten:
        probes = _settle(model, examples)
    if FloatBooleanLayout()(model).modified:
        probes = _settle(model, examples)
    for _ in range(MAX_PROBE_ROUNDS):
        decompose(model)
        if decompose.rewritten or decompose.deferred:
            probes = _settle(model, examples)
        if not decompose.deferred:
            break
    else:
        raise UnsupportedModelError(f"lowering did not converge: {decompose.deferred} composite node(s) still "
                                    "have inputs of unknown shape; please report this model")
    _verify(model, probes[1], expected)
    lowered = _lowered(model, *probes)
    lowered.guards = row_gathers.guards
    return lowered


def _settle(model: ir.Model, examples: dict[str, np.ndarray], probes: tuple[Probe, Probe] | None = None):
    """Probe (unless given), annotate and fold; probe again when folding changed the graph."""
    probes = probes or probe_twice(model, examples)
    annotate(model, *probes)
    if FoldBatchInvariant(*probes)(model).modified:
        probes = probe_twice(model, examples)
        annotate(model, *probes)
    return probes


def _verify(model: ir.Model, probe: Probe, expected: dict[str, np.ndarray]) -> None:
    """The lowered model must reproduce the original's outputs on the probe rows (else refuse).

    Relative to each output's own scale; NaN where the original has NaN (and an equal inf) counts as equal —
    non-finite outputs are the additivity check's business, not a lowering bug.
    """
    for name, original in expected.items():
        lowered = probe[name]
        if lowered.shape != original.shape:
            worst = np.inf
        elif not np.issubdtype(original.dtype, np.floating):
            worst = 0.0 if np.array_equal(original, lowered) else np.inf
        else:
            with np.errstate(invalid="ignore"):
                same = (original == lowered) | (np.isnan(original) & np.isnan(lowered))
                difference = np.where(same, 0.0, np.abs(original.astype(np.float64) - lowered))
            finite = np.abs(original[np.isfinite(original)])
            scale = finite.max() if finite.size else 0.0
            worst = difference.max() / scale if scale > 0 else difference.max()
        if not worst <= 1e-4:
            raise UnsupportedModelError(
                f"the lowered model does not reproduce the original on output {name!r} (relative difference "
                f"{worst:.3g} on the background); refusing to explain it — please report this model")


def _lowered(model: ir.Model, probe_a: Probe, probe_b: Probe) -> LoweredModel:
    layouts = batch_layouts(model, probe_a, probe_b)
    batch_axes = {n: layout.axis if isinstance(layout, BatchLayout) else layout for n, layout in layouts.items()}
    return LoweredModel(
        model=model,
        opset=opset_of(model),
        shapes={n: a.shape for n, a in probe_a.items()},
        batch_axes=batch_axes,
        dtypes={n: a.dtype for n, a in probe_a.items()},
        row_constant=_row_constant(model, probe_a, probe_b, {
            n: layout.axis for n, layout in layouts.items() if isinstance(layout, BatchLayout) and not layout.merged}),
        batch_split={n: (layout.outer, layout.inner) for n, layout in layouts.items()
                     if isinstance(layout, BatchLayout) and layout.merged},
    )


def _row_constant(model: ir.Model, probe_a: Probe, probe_b: Probe, batch_axes: dict) -> frozenset[str]:
    """Tensors that follow the batch in shape only: not value-dependent, every row equal in both probes."""
    dependent = {v.name for v in value_dependent(model.graph)}
    found = set()
    for name, axis in batch_axes.items():
        if not isinstance(axis, int) or name in dependent:
            continue
        if all(np.array_equal(np.take(p[name], [0], axis=axis).repeat(p[name].shape[axis], axis=axis), p[name])
               for p in (probe_a, probe_b)):
            found.add(name)
    return frozenset(found)
