"""The model's forward pass in float64: the reference the additivity check falls back on.

The SHAP values must add up to ``Δf = f(x) − E f``, and the check (:mod:`onnxshap.additivity`) reads ``Δf`` off
ONNX Runtime's float32 forward pass. Its rounding is set by the magnitudes of the activations *inside* the
network, which the check cannot see: with inputs scaled by 1e-3, MobileNetV2's, BERT's and GPT-2's activations
are dominated by biases and position embeddings, ``f`` is of their size and moves by ~1e-4 of it, and the float32
``Δf`` is off by 1.0e-4, 8.4e-5 and 1.1e-4 of ``max|Δf|`` while the values are within 1.9e-6, 2.9e-7 and
9.7e-8 of the float64 ``Δf`` (torch in float64). So when the float32 check fails, ``Δf`` is computed again by the
same lowered model with every float32 tensor made float64, and only a failure against that is an error.

- :func:`to_float64`: a copy of the lowered model in float64 — float32 graph inputs, outputs and intermediate
  tensors, initializers, ``Constant`` values (``value``, ``value_float(s)``), every other float32 tensor attribute
  (``ConstantOfShape``; its default value, a float32 zero, is written out as a float64 one), and the type
  attributes ``to`` (``Cast``) and ``dtype`` (``EyeLike``, ``Random*``, ``Bernoulli``) that say float32. Integer
  and boolean tensors (token ids, shapes, indices, masks) stay as they are, and so do other float types.
- :class:`Float64Forward` runs it: on ONNX Runtime's CPU provider, or, when ONNX Runtime refuses the model
  (onnxruntime 1.31 has no float64 CPU kernel for Conv, ConvTranspose, AveragePool, GlobalAveragePool, Erf,
  HardSigmoid, Elu), on ``onnx.reference.ReferenceEvaluator`` — numpy, much slower, but it only runs when a
  check has failed. Any failure to build or run it is one :class:`OnnxRuntimeError` line.
- :class:`Float64Reference`: ``f64`` at chosen rows of the data, and ``E f64`` and ``E|f64|`` over the background
  (computed on first use, then kept for the explainer's life). Nothing is built until it is first asked.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxshap import runtime
from onnxshap.errors import OnnxRuntimeError, OnnxShapError, first_line
from onnxshap.graph.edit import is_default_domain, remove_dead_nodes
from onnxshap.lower.lowered import LoweredModel

FLOAT, DOUBLE = ir.DataType.FLOAT, ir.DataType.DOUBLE
TYPE_ATTRIBUTES = ("to", "dtype")  # Cast(to); EyeLike, RandomNormal(Like), RandomUniform(Like), Bernoulli(dtype)
MAX_ROWS = 256  # rows per float64 forward call, at most; fewer where the memory budget says so


def to_float64(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every float32 tensor float64 (see the module docstring); ``model`` is unchanged."""
    copy = ir.from_proto(ir.to_proto(model))
    for graph in (copy.graph, *copy.graph.subgraphs()):
        for value in graph.inputs:
            _retype(value)
        for value in graph.initializers.values():
            _retype(value)
            if value.const_value is not None and value.const_value.dtype == FLOAT:
                value.const_value = ir.tensor(value.const_value.numpy().astype(np.float64), name=value.name)
    for node in copy.graph.all_nodes():
        for value in node.outputs:
            _retype(value)
        _retype_attributes(node)
    return copy


def _retype(value: ir.Value) -> None:
    """A float32 tensor value becomes float64 (a fresh type object: types may be shared between values)."""
    if isinstance(value.type, ir.TensorType) and value.type.dtype == FLOAT:
        value.type = ir.TensorType(DOUBLE)


def _retype_attributes(node: ir.Node) -> None:
    """Float32 tensor attributes become float64 tensors; type attributes that say float32 say float64."""
    attributes = node.attributes
    for name, attr in list(attributes.items()):
        if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == FLOAT:
            attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy().astype(np.float64)))
        elif name in TYPE_ATTRIBUTES and attr.type == ir.AttributeType.INT and attr.value == FLOAT:
            attributes[name] = ir.AttrInt64(name, DOUBLE)
    if node.op_type not in ("Constant", "ConstantOfShape") or not is_default_domain(node):
        return
    if node.op_type == "ConstantOfShape" and "value" not in attributes:  # the default is a float32 zero
        attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float64)))
    for name in ("value_float", "value_floats"):
        if name in attributes:
            constant = np.asarray(attributes.pop(name).value, np.float64)
            attributes["value"] = ir.AttrTensor("value", ir.tensor(constant))


class Float64Forward:
    """The float64 forward pass of a lowered model (built on first use; see the module docstring).

    Args:
        lowered: the lowered model (float32).
        outputs: names of the explained outputs; :meth:`predict` flattens and concatenates them like
            :meth:`onnxshap.run.Runner.predict`.
        budget: bytes one call may hold. The reference evaluator keeps every intermediate tensor of a call
            (and Conv's im2col copies), so a call of ``rows`` rows needs about ``2 · 8 · rows · Σ_t |t|`` bytes,
            ``|t|`` the per-row size of each batched tensor (ResNet-18 at 224²: 45 MiB of float64 tensors per
            row); calls are sized to that, at most MAX_ROWS rows.

    Attributes:
        engine: ``"onnxruntime"`` or ``"reference"`` (onnx's ReferenceEvaluator) once built, else None.
        refusal: why ONNX Runtime refused the float64 model (the reason for the reference engine), or None.
    """

    def __init__(self, lowered: LoweredModel, outputs: list[str], budget: int) -> None:
        self.lowered, self.outputs, self.budget = lowered, list(outputs), budget
        self.rows = 1  # rows per call: set from the budget when the model is built
        self.engine: str | None = None
        self.refusal: str | None = None
        self._run = None
        self._float_inputs: set[str] = set()

    def predict(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """``f64`` on ``feeds`` (float32 inputs are fed as float64), flattened to ``(rows, outputs)``.

        Raises:
            OnnxRuntimeError: the float64 model cannot be built or run by either engine (one line, saying why).
        """
        run = self._runner()
        rows = next(iter(feeds.values())).shape[0]
        blocks = []
        for start in range(0, rows, self.rows):  # float64 copies of one chunk of the feeds at a time
            chunk = {name: array[start:start + self.rows].astype(np.float64) if name in self._float_inputs
                     else array[start:start + self.rows] for name, array in feeds.items()}
            try:
                results = run(chunk)
            except OnnxShapError:
                raise
            except Exception as exc:  # noqa: BLE001 - the reference evaluator raises anything numpy raises
                raise OnnxRuntimeError(f"the float64 forward pass failed ({self.engine}): {first_line(exc)}") from None
            blocks.append(np.concatenate([np.asarray(r, np.float64).reshape(len(r), -1) for r in results], axis=1))
        return np.concatenate(blocks, axis=0)

    def _runner(self):
        """``feeds -> [outputs]`` on ONNX Runtime, else on the reference evaluator (made once)."""
        if self._run is not None:
            return self._run
        try:
            model = to_float64(self.lowered.model)
            kept = [v for v in model.graph.outputs if v.name in self.outputs]
            model.graph.outputs.clear()
            model.graph.outputs.extend(kept)
            remove_dead_nodes(model)  # the reference evaluator would run every node
        except Exception as exc:  # noqa: BLE001 - onnx-ir raises its own types on a graph it cannot copy
            raise OnnxRuntimeError(f"the model cannot be written in float64: {first_line(exc)}") from None
        self._float_inputs = {v.name for v in self.lowered.model.graph.inputs if v.dtype == FLOAT}
        self.rows = max(1, min(MAX_ROWS, self.budget // (2 * 8 * self.lowered.row_elements())))
        try:
            session = runtime.make_session(model, runtime.CPU, mode="forward")
            self.engine, self._run = "onnxruntime", lambda feeds: runtime.run(session, self.outputs, feeds)
        except OnnxRuntimeError as exc:
            self.refusal = str(exc)
            self._run = self._reference(model)
        return self._run

    def _reference(self, model: ir.Model):
        from onnx.reference import ReferenceEvaluator

        try:
            evaluator = ReferenceEvaluator(runtime.to_proto(model), new_ops=_float64_reference_ops())
        except Exception as exc:  # noqa: BLE001 - the reference evaluator raises its own types
            raise OnnxRuntimeError(f"the float64 forward pass has no engine: {self.refusal}; onnx's reference "
                                   f"evaluator refused it too: {first_line(exc)}") from None
        self.engine = "reference"
        return lambda feeds: evaluator.run(self.outputs, feeds)


def _float64_reference_ops() -> list[type]:
    """Reference-evaluator ops that stay in float64 where onnx's own do not: its ``Erf`` rounds every result to
    float32 (``np.vectorize(erf, otypes=["f"])``); this one keeps the input's type (``math.erf``, ~6e6 values/s)."""
    from onnx.reference.op_run import OpRun

    class Erf(OpRun):
        op_domain = ""

        def _run(self, x):
            return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)

    return [Erf]


class Float64Reference:
    """``f64`` at rows of the data, and ``E f64``, ``E|f64|`` over the background (computed once, kept).

    Args:
        lowered, outputs, budget: as for :class:`Float64Forward`.
        background: the background feeds (input name → array ``(m, ...)``), held, not copied.
    """

    def __init__(self, lowered: LoweredModel, outputs: list[str], background: dict[str, np.ndarray],
                 budget: int) -> None:
        self.forward = Float64Forward(lowered, outputs, budget)
        self.background = background
        self._expected: tuple[np.ndarray, np.ndarray] | None = None

    def expected(self) -> tuple[np.ndarray, np.ndarray]:
        """``(E f64, E|f64|)`` over the background, per output ``(k,)``."""
        if self._expected is None:
            outputs = self.forward.predict(self.background)
            self._expected = outputs.mean(axis=0), np.abs(outputs).mean(axis=0)
        return self._expected

    def at(self, data: dict[str, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(f64(x_rows) (r, k), E f64 (k,), E|f64| (k,))`` for rows ``rows`` of ``data``.

        Raises:
            OnnxRuntimeError: the float64 forward pass cannot be built or run (one line, saying why).
        """
        predictions = self.forward.predict({name: array[rows] for name, array in data.items()})
        return (predictions, *self.expected())
