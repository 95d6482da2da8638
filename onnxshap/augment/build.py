"""Build the augmented model: one ONNX graph that computes Deep SHAP values.

Inputs: the model's data inputs for the samples (their own names), the same inputs for the references
(``reference/<name>``), and ``output_index`` (n, k) int64: which outputs to explain for each sample.
The graph runs the lowered forward pass once on ``[X; R]``, seeds ``M_y = one-hot(output_index)`` for every
pair, sweeps multipliers backwards, and outputs, per explained tensor ``s``,

    φ = mean over the references of  M_s ⊙ (s_x − s_r),     shaped (n, *s.shape[1:], k)

(``shap_values_<i>``), so that ``Σ φ = f_o(x) − mean_r f_o(r)``, and ``prediction`` (n, outputs): f(x).
n, m and k are read from the feeds: one graph serves every chunk. The background is an input, not a
constant, so the graph is small, leaks no data, and references can be chunked and averaged by the runner.
Names that would collide with the model's own tensors get a suffix; :class:`AugmentedModel` has the real ones.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from onnxshap import runtime
from onnxshap.augment.plan import Plan, walk
from onnxshap.augment.rolled import find_runs
from onnxshap.augment.rolled_loops import roll_forward
from onnxshap.augment.sweep import sweep
from onnxshap.errors import OnnxShapError
from onnxshap.files.model_files import needs_external_data, weight_bytes
from onnxshap.graph.builder import Builder, collection_paused
from onnxshap.graph.edit import all_names, remove_dead_nodes
from onnxshap.lower.lowered import LoweredModel
from onnxshap.pairs import Multiplier, PairContext, PairSizes
from onnxshap.rules.pooling import column_elements
from onnxshap.rules.softmax import factor_bytes_per_pair

PEAK_TENSORS_PER_OUTPUT = 4  # live pair-sized float32 tensors per explained output (measured: 2.6-3.3)
PEAK_TENSORS_PER_PAIR = 8  # live pair-sized tensors that do not grow with k (measured: 5-8 beside the forward)


@dataclass
class AugmentedModel:
    """An augmented model ready for ONNX Runtime, and how to read it.

    Attributes:
        model: the model (onnx-ir; :attr:`proto` serializes it when it is below protobuf's 2 GB limit).
        inputs: graph input names of the samples, by model input name.
        references: graph input names of the references, by model input name.
        output_index: name of the ``output_index`` input.
        values: per explained tensor, the name of its SHAP-value output.
        value_shapes: per explained tensor, its feature shape (the values are ``(n, *shape, k)``).
        prediction: name of the prediction output.
        bytes_per_output, bytes_per_pair, bytes_per_row: the memory model of one run (see :meth:`memory`).
        serialized: the model's bytes, when a cache entry holds them (see :meth:`session_source`).
    """

    model: ir.Model
    inputs: dict[str, str]
    references: dict[str, str]
    output_index: str
    values: list[str]
    value_shapes: list[tuple[int, ...]]
    prediction: str
    bytes_per_output: int
    bytes_per_pair: int
    bytes_per_row: int
    serialized: bytes | None = field(default=None, repr=False)

    def memory(self, n: int, m: int, k: int) -> int:
        """Estimated peak bytes of one run on n samples, m references and k outputs:
        ``n·m·(k·bytes_per_output + bytes_per_pair) + (n + m)·bytes_per_row``."""
        return n * m * (k * self.bytes_per_output + self.bytes_per_pair) + (n + m) * self.bytes_per_row

    def session_source(self) -> ir.Model | bytes:
        """What ONNX Runtime's session is made from: the model's bytes when they exist already (read from or just
        written to the cache: serialising a 4 659-node graph again costs ~0.05 s), else the model."""
        return self.serialized if self.serialized is not None else self.model

    @functools.cached_property
    def proto(self) -> onnx.ModelProto:
        """The model as one ModelProto.

        Raises:
            OnnxShapError: its weights pass protobuf's 2 GB limit (save it with ``save_augmented``, which writes
                them to a side file).
        """
        if needs_external_data(self.model):
            raise OnnxShapError(f"the augmented model holds {weight_bytes(self.model) / 2**30:.2f} GiB of weights, "
                                "over protobuf's 2 GB limit for one ModelProto; save it with save_augmented(path) "
                                "(weights in path + '.data')")
        return runtime.to_proto(self.model)


def build_augmented(plan: Plan, roll: bool = True) -> AugmentedModel:
    """The augmented model of ``plan`` (see the module docstring); ``roll``: sweep the repeated steps of an
    unrolled recurrent layer as one ONNX Loop (``rolled.py``; off: every step swept on its own, same values)."""
    with collection_paused():
        return _build(plan, roll)


def _build(plan: Plan, roll: bool) -> AugmentedModel:
    model = plan.lowered.model.clone()  # the forward model stays as it is (initializer tensors are shared)
    graph = model.graph
    taken = all_names(graph)
    build = Builder(graph, "osh")
    samples = {v.name: v for v in graph.inputs}
    references, stacked = _stack_references(graph, build, taken)
    output_index = ir.Value(name=_free("output_index", taken), shape=ir.Shape(["n", "k"]),
                            type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(output_index)
    first = next(iter(samples))
    sizes = PairSizes(n=build.op("Shape", [samples[first]], {"start": 0, "end": 1}, hint="n"),
                      m=build.op("Shape", [references[first]], {"start": 0, "end": 1}, hint="m"),
                      k=build.op("Shape", [output_index], {"start": 1, "end": 2}, hint="k"))
    stacked_values = {name: node.outputs[0] for name, node in stacked.items()}
    ctx = PairContext(_with_stacked(plan.lowered, stacked_values), build, set(), sizes)
    values = {v.name: v for node in graph for v in node.outputs} | stacked_values  # inputs: their [X; R]
    explained = [values[name] for name in plan.explained]
    outputs = [values[name] for name in plan.outputs]
    found = walk(ctx, graph, [v.name for v in explained], [v.name for v in outputs])
    graph.outputs.clear()
    runs = find_runs(ctx, found) if roll else []
    multipliers = sweep(ctx, found, _seeds(ctx, outputs, output_index), runs)
    names = [_output(graph, _shap_values(ctx, value, multipliers.get(value.name)), _free(f"shap_values_{i}", taken),
                     ["n", *plan.lowered.feature_shape(name), "k"])
             for i, (name, value) in enumerate(zip(plan.explained, explained))]
    prediction = _output(graph, _prediction(ctx, outputs), _free("prediction", taken), ["n", _total(ctx, outputs)])
    for run in runs:
        roll_forward(ctx, run)
    remove_dead_nodes(model)
    if runs:
        graph.sort()  # the forward loops were appended after the nodes that now read them
    return AugmentedModel(
        model=model, inputs={name: name for name in samples},
        references={k: v.name for k, v in references.items()},
        output_index=output_index.name, values=names, prediction=prediction,
        value_shapes=[tuple(plan.lowered.feature_shape(name)) for name in plan.explained], **_memory_model(ctx, found))


def _memory_model(ctx: PairContext, found) -> dict[str, int]:
    """Bytes per (pair, output), per pair and per stacked row of one run (:meth:`AugmentedModel.memory`).

    Measured with ONNX Runtime 1.31 (README, "Speed and memory"): the peak is a few live float32 tensors of the
    largest pair-sized tensor (a forward tensor, or the window columns of an overlapping max-pool) per explained
    output and per pair, the softmax rule's float64 factors, and every
    forward activation of the n + m stacked rows (the backward reads them all).
    """
    sizes = [int(np.prod(ctx.lowered.feature_shape(n), dtype=np.int64)) for n in found.variable
             if isinstance(ctx.lowered.batch_axes.get(n), int)]
    columns = [column_elements(ctx, n) for n in found.nodes if n.op_type == "MaxPool"]  # pair-sized, K × output
    softmax_factors = max((factor_bytes_per_pair(ctx, n) for n in found.nodes
                           if n.op_type in ("Softmax", "LogSoftmax")), default=0)
    largest = max(sizes + columns)
    return {"bytes_per_output": 4 * PEAK_TENSORS_PER_OUTPUT * largest,
            "bytes_per_pair": 4 * PEAK_TENSORS_PER_PAIR * largest + softmax_factors,
            "bytes_per_row": 4 * sum(sizes)}


def _with_stacked(lowered: LoweredModel, stacked: dict[str, ir.Value]) -> LoweredModel:
    """The lowered model's tensor facts, with the stacked ``[X; R]`` tensors described like their inputs."""
    def extended(facts: dict, value_of) -> dict:
        return {**facts, **{v.name: value_of(name) for name, v in stacked.items()}}

    return dataclasses.replace(
        lowered,
        shapes=extended(lowered.shapes, lambda name: lowered.shapes[name]),
        batch_axes=extended(lowered.batch_axes, lambda name: 0),
        dtypes=extended(lowered.dtypes, lambda name: lowered.dtypes[name]),
    )


def _free(name: str, taken: set[str]) -> str:
    """``name``, or ``name_k``: a graph name the model does not use yet."""
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def _stack_references(graph: ir.Graph, build: Builder, taken: set[str]) -> tuple[dict, dict]:
    """Add a reference input beside every data input and feed the forward pass ``[X; R]`` instead of X.

    Returns the reference inputs and the Concat nodes that stack them, by input name.
    """
    references, stacks = {}, {}
    for value in list(graph.inputs):
        reference = ir.Value(name=_free(f"reference/{value.name}", taken), shape=value.shape, type=value.type)
        uses = list(value.uses())
        stacked = build.op("Concat", [value, reference], {"axis": 0}, hint="stacked")
        for user, index in uses:
            user.replace_input_with(index, stacked)
        references[value.name], stacks[value.name] = reference, stacked.producer()
    graph.inputs.extend(references.values())
    graph.sort()
    return references, stacks


def _total(ctx: PairContext, outputs: list[ir.Value]) -> int:
    return sum(ctx.lowered.output_size(v.name) for v in outputs)


def _seeds(ctx: PairContext, outputs: list[ir.Value], output_index: ir.Value) -> dict[str, Multiplier]:
    """``M_y = one-hot(output_index)`` for every pair, split over the explained outputs in their shapes."""
    build, total = ctx.build, _total(ctx, outputs)
    onehot = build.unsqueeze(ctx.onehot(output_index, total), [1])  # (n, 1, k, total)
    repeat = build.concat([build.ints([1]), ctx.sizes.m, build.ints([1, 1])], 0)
    seed = build.reshape(build.op("Expand", [onehot, repeat]), [-1, total])
    seeds, offset = {}, 0
    for value in outputs:
        size = ctx.lowered.output_size(value.name)
        part = seed if len(outputs) == 1 else build.slice(seed, [offset], [offset + size], [1])
        part = build.reshape(part, [-1, *ctx.shape(value)[1:]])
        seeds[value.name] = ctx.add(seeds.get(value.name), part)  # a tensor listed twice as output: both seeds
        offset += size
    return seeds


def _shap_values(ctx: PairContext, tensor: ir.Value, multiplier: Multiplier | None) -> ir.Value:
    """``mean over references of M ⊙ Δ``, moved to ``(n, *features, k)``."""
    build = ctx.build
    m_s = ctx.materialize(multiplier) if multiplier is not None else ctx.zeros(tensor)
    b = ctx.batch_axis(tensor)
    per_pair = build.op("Mul", [ctx.expand(m_s, tensor), ctx.pair_delta(tensor)])
    phi = build.reduce("ReduceMean", per_pair, [b + 1], keepdims=False)  # (..., n, k, ...)
    rank = ctx.rank(tensor) + 1
    return build.transpose(phi, [b] + [j for j in range(rank) if j not in (b, b + 1)] + [b + 1])


def _prediction(ctx: PairContext, outputs: list[ir.Value]) -> ir.Value:
    flat = [ctx.build.reshape(ctx.x(v), [-1, ctx.lowered.output_size(v.name)]) for v in outputs]
    return ctx.build.concat(flat, 1)


def _output(graph: ir.Graph, value: ir.Value, name: str, shape: list) -> str:
    """Expose ``value`` as graph output ``name`` (through an Identity, so the name is free to choose)."""
    node = ir.node("Identity", [value], name=f"{name}/output")
    graph.append(node)
    out = node.outputs[0]
    out.name = name
    out.type = ir.TensorType(ir.DataType.FLOAT)
    out.shape = ir.Shape(shape)
    graph.outputs.append(out)
    return name
