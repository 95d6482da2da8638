"""The rule spec table: one tiny hand-built ONNX graph per op (helpers for ``test_rules.py``, not tests).

A :class:`Spec` is a name, a ``build(g)`` function that writes the graph with the :class:`Graph` builder
(raw ``onnx.helper``) and returns its output name(s), and the distribution each input is drawn from. The
same ``build`` writes the graph in float32 (what onnxshap explains) and in float64 (the finite-difference
and linear-Jacobian reference, where ONNX Runtime has float64 kernels for every op of the graph); constant
weights are drawn in float32 from a generator seeded by the spec's name, so both graphs hold the same
numbers.

Tables: ``LINEAR`` (values checked against ``J·(x − mean r)``), ``ELEMENTWISE`` (every op of
``rules.elementwise.DERIVATIVES``), ``FUSION`` (regions written out, normalisation, softmax), ``MAX_TYPE``
(cross-max), ``SHAPLEY`` (two variable inputs, checked against brute-force Shapley values) and ``BILINEAR``
(MatMul of two variable tensors, checked against the closed form). ``ALL`` maps every name to its spec.

Distributions keep the data away from kinks and poles so that finite differences taken at ``x → r`` see a
smooth function: positive inputs for Log/Sqrt/Pow, ``|x| ≥ 0.1`` around ReLU-type kinks, values spaced
≥ 0.03 apart for max-type ops (no near-ties within a window), grids with an offset for Max/Min of two
inputs (``|a − b| ≥ 0.05``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.helper as oh

OPSET = 20
IR_VERSION = 10

Dist = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]


# --------------------------------------------------------------------------------------------------
# distributions: (rng, shape) -> float64 array (cast to float32 by the caller)
# --------------------------------------------------------------------------------------------------


def normal(rng, shape):
    return rng.normal(size=shape)


def positive(rng, shape):
    """U(0.5, 2): Log, Sqrt, Reciprocal, Pow bases, Div denominators."""
    return rng.uniform(0.5, 2.0, size=shape)


def away(*points: float, gap: float = 0.1, low: float = -2.0, high: float = 2.0) -> Dist:
    """U(low, high) resampled until every value is at least ``gap`` from each of ``points`` (kinks)."""

    def draw(rng, shape):
        x = rng.uniform(low, high, size=shape)
        for _ in range(100):
            bad = np.zeros(shape, dtype=bool)
            for p in points:
                bad |= np.abs(x - p) < gap
            if not bad.any():
                return x
            x[bad] = rng.uniform(low, high, size=int(bad.sum()))
        raise AssertionError("could not draw values away from the kinks")

    return draw


KINK0 = away(0.0)


def off_integers(offset: float, spread: float) -> Dist:
    """Integers in [−3, 3] plus ``offset`` ± ``spread``: away from Floor/Ceil/Round's jumps."""

    def draw(rng, shape):
        return rng.integers(-3, 3, size=shape) + offset + rng.uniform(-spread, spread, size=shape)

    return draw


def distinct(rng, shape):
    """A random permutation of an evenly spaced grid in [−2, 2] (spacing ≥ 0.03 for ≤ 128 values) plus a
    little noise: no two values of a max-pool window are within 2δ of each other."""
    size = int(np.prod(shape))
    grid = np.linspace(-2.0, 2.0, size) if size > 1 else np.zeros(1)
    step = 4.0 / max(size - 1, 1)
    return (rng.permutation(grid) + rng.uniform(-0.2, 0.2, size) * step).reshape(shape)


def grid(offset: float) -> Dist:
    """Multiples of 0.1 in [−2, 2) plus ``offset``: two inputs drawn with offsets 0 and 0.05 never come
    within 0.05 of each other (Max/Min of two variable inputs, away from the tie)."""

    def draw(rng, shape):
        return rng.integers(-20, 20, size=shape) * 0.1 + offset

    return draw


# --------------------------------------------------------------------------------------------------
# the graph builder
# --------------------------------------------------------------------------------------------------

_ELEM = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float64): onnx.TensorProto.DOUBLE}


class Graph:
    """A tiny ONNX graph written with ``onnx.helper``; every input has a leading batch axis ``n``.

    Args:
        dtype: float type of the inputs, outputs and float constants (np.float32 or np.float64).
        seed: seed of ``self.rng``, the generator for constant weights (drawn in float32).
    """

    def __init__(self, dtype, seed: int) -> None:
        self.dtype = np.dtype(dtype)
        self.elem = _ELEM[self.dtype]
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.domains: set[str] = set()
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, *shape: int) -> str:
        self.inputs.append(oh.make_tensor_value_info(name, self.elem, ["n", *shape]))
        return name

    def const(self, value, hint: str = "c", exact: bool = False) -> str:
        """An initializer; float values are rounded to float32 and stored in the graph's float type (same
        numbers in both graphs) unless ``exact``."""
        array = np.asarray(value)
        if array.dtype.kind == "f" and not exact:
            array = array.astype(np.float32).astype(self.dtype)
        name = self._name(hint)
        self.initializers.append(onnx.numpy_helper.from_array(np.array(array), name))  # keeps 0-d arrays 0-d
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64), "ints")

    def weight(self, *shape: int, scale: float = 1.0) -> str:
        """A constant drawn from N(0, scale²)."""
        return self.const(self.rng.normal(size=shape) * scale, "w")

    def __call__(self, op_type: str, *inputs: str | None, outputs: int = 1, domain: str = "", **attrs):
        """Add a node; returns its output name (a list of names when ``outputs > 1``)."""
        names = [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(oh.make_node(op_type, [i or "" for i in inputs], names, name=self._name(op_type),
                                       domain=domain, **attrs))
        if domain:
            self.domains.add(domain)
        return names[0] if outputs == 1 else names

    def model(self, outputs: Sequence[str], opset: int = OPSET) -> onnx.ModelProto:
        graph = oh.make_graph(self.nodes, "spec", self.inputs, [onnx.ValueInfoProto(name=o) for o in outputs],
                              initializer=self.initializers)
        imports = [oh.make_opsetid("", opset)] + [oh.make_opsetid(d, 1) for d in sorted(self.domains)]
        model = oh.make_model(graph, opset_imports=imports)
        model.ir_version = IR_VERSION
        standard = all(onnx.defs.has(n.op_type) for n in self.nodes if not n.domain)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=standard and not self.domains)

        def typed(v: onnx.ValueInfoProto) -> bool:
            return v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")

        # what inference cannot type (after a custom-domain op) is dropped, or typed like the first input
        for v in [v for v in model.graph.value_info if not typed(v)]:
            model.graph.value_info.remove(v)
        for out in model.graph.output:
            if not typed(out):
                out.type.CopyFrom(self.inputs[0].type)
        return model


# --------------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One line of the table.

    Attributes:
        name: test id.
        build: writes the graph into a :class:`Graph` and returns its output name(s).
        dist: one distribution for every input, or one per input name.
        opset: the graph's default-domain opset.
        xfail: why onnxshap gets this graph wrong or refuses it today (its tests are expected to fail).
        standard: the same function written in standard ONNX ops, for ONNX Runtime's reference forward pass
            when ``build`` writes an op no opset defines (tf2onnx's ``Erfc``, which onnxshap rewrites on load);
            None: ``build`` itself.
    """

    name: str
    build: Callable[[Graph], str | Sequence[str]]
    dist: Dist | Mapping[str, Dist] = normal
    opset: int = OPSET
    xfail: str | None = None
    standard: Callable[[Graph], str | Sequence[str]] | None = None

    def model(self, dtype=np.float32, build: Callable[[Graph], str | Sequence[str]] | None = None) -> onnx.ModelProto:
        g = Graph(dtype, zlib.crc32(self.name.encode()))
        outputs = (build or self.build)(g)
        return g.model([outputs] if isinstance(outputs, str) else list(outputs), self.opset)

    def reference_model(self, dtype=np.float32) -> onnx.ModelProto:
        """The graph ONNX Runtime evaluates as the reference ``f`` (``standard`` when given)."""
        return self.model(dtype, self.standard)

    def draw(self, rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
        dist = self.dist[name] if isinstance(self.dist, Mapping) else self.dist
        return np.asarray(dist(rng, shape), dtype=np.float32)


def unary(op_type: str, shape=(2, 3), **attrs) -> Callable[[Graph], str]:
    """``y = op(x)`` with constant extra inputs given as ``attrs['inputs']`` (list of arrays or None)."""
    extra = attrs.pop("inputs", [])

    def build(g: Graph) -> str:
        x = g.input("x", *shape)
        return g(op_type, x, *[None if c is None else g.const(c) for c in extra], **attrs)

    return build


def two(op_type: str, a_shape=(5,), b_shape=(5,), **attrs) -> Callable[[Graph], str]:
    """``z = op(a, b)`` with two variable inputs (graph inputs a and b)."""

    def build(g: Graph) -> str:
        return g(op_type, g.input("a", *a_shape), g.input("b", *b_shape), **attrs)

    return build


# -- linear ops: values must equal J·(x − mean r) exactly ----------------------------------------------


def _gemm(trans_a: int, trans_b: int, alpha: float, beta: float, bias_shape) -> Callable[[Graph], str]:
    def build(g: Graph) -> str:
        x = g.input("x", 4)
        a = g("Transpose", x, perm=[1, 0]) if trans_a else x
        b = g.weight(5, 4) if trans_b else g.weight(4, 5)
        c = [g.weight(*bias_shape)] if bias_shape else []
        return g("Gemm", a, b, *c, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)

    return build


def _gemm_variable_b(g: Graph) -> str:
    """``Gemm(W, x, transB=1)`` = W·xᵀ: (5, n); the batch ends up on axis 1, transposed back."""
    x = g.input("x", 4)
    return g("Transpose", g("Gemm", g.weight(5, 4), x, g.weight(5, 1), transB=1), perm=[1, 0])


def _matmul_left(g: Graph) -> str:
    return g("MatMul", g.weight(5, 3), g.input("x", 3, 4))


def _conv(in_shape, w_shape, bias=True, **attrs) -> Callable[[Graph], str]:
    def build(g: Graph) -> str:
        x = g.input("x", *in_shape)
        b = [g.weight(w_shape[0])] if bias else []
        return g("Conv", x, g.weight(*w_shape, scale=0.5), *b, **attrs)

    return build


def _conv_transpose(in_shape, w_shape, **attrs) -> Callable[[Graph], str]:
    def build(g: Graph) -> str:
        x = g.input("x", *in_shape)
        groups = attrs.get("group", 1)
        return g("ConvTranspose", x, g.weight(*w_shape, scale=0.5), g.weight(w_shape[1] * groups), **attrs)

    return build


def _batchnorm(shape) -> Callable[[Graph], str]:
    def build(g: Graph) -> str:
        c = shape[0]
        var = g.const(g.rng.uniform(0.5, 2.0, c))
        return g("BatchNormalization", g.input("x", *shape), g.weight(c), g.weight(c), g.weight(c), var,
                 epsilon=1e-3)

    return build


def _reduce(op_type: str, shape, axes, keepdims: int) -> Callable[[Graph], str]:
    def build(g: Graph) -> str:
        return g(op_type, g.input("x", *shape), g.ints(*axes), keepdims=keepdims)

    return build


def _split(g: Graph, used: Sequence[int]) -> list[str]:
    parts = g("Split", g.input("x", 6, 2), g.ints(1, 3, 2), axis=1, outputs=3)
    return [g("Mul", parts[i], g.const(1.5 + i)) if i == 2 else parts[i] for i in used]


def _slice(shape, starts, ends, axes, steps) -> Callable[[Graph], str]:
    def build(g: Graph) -> str:
        return g("Slice", g.input("x", *shape), g.ints(*starts), g.ints(*ends), g.ints(*axes), g.ints(*steps))

    return build


def _gather(indices, axis: int) -> Callable[[Graph], str]:
    def build(g: Graph) -> str:
        return g("Gather", g.input("x", 3, 4), g.const(np.array(indices, dtype=np.int64)), axis=axis)

    return build


def _gather_seq_first(g: Graph) -> str:
    """The last time step of a sequence-first tensor (batch on axis 1), as RNN exports select it."""
    steps = g("Transpose", g.input("x", 3, 4), perm=[1, 0, 2])
    return g("Gather", steps, g.const(np.array(-1, np.int64)), axis=0)


def full_lengths(g: Graph, x: str, batch_axis: int, time_axis: int, less: int = 0) -> str:
    """``Expand(T − less, [batch])`` from ``x``'s shape: tf2onnx's sequence lengths for ``go_backwards``."""
    shape = g("Shape", x)
    steps = g("Sub", g("Gather", shape, g.const(np.array(time_axis, np.int64))), g.const(np.array(less, np.int64)))
    rows = g("Slice", shape, g.ints(batch_axis), g.ints(batch_axis + 1), g.ints(0))
    return g("Expand", steps, rows)


def _reverse_sequence(time_major: bool) -> Callable[[Graph], str]:
    """Every row reversed over all T = 3 steps (batch-major, or time-major as tf2onnx writes it)."""

    def build(g: Graph) -> str:
        x = g.input("x", 3, 4)
        if not time_major:
            return g("ReverseSequence", x, full_lengths(g, x, 0, 1), batch_axis=0, time_axis=1)
        steps = g("Transpose", x, perm=[1, 0, 2])
        flipped = g("ReverseSequence", steps, full_lengths(g, steps, 1, 0), batch_axis=1, time_axis=0)
        return g("Transpose", flipped, perm=[1, 0, 2])

    return build


def _pad(mode: str, pads, value=None) -> Callable[[Graph], str]:
    def build(g: Graph) -> str:
        extra = [g.const(np.float32(value))] if value is not None else []
        return g("Pad", g.input("x", 3, 4), g.ints(*pads), *extra, mode=mode)

    return build


def _where_const(g: Graph) -> str:
    cond = g.const(g.rng.uniform(size=(3, 4)) > 0.5)
    return g("Where", cond, g.input("x", 3, 4), g.weight(3, 4))


def _where_broadcast(g: Graph) -> str:
    cond = g.const(g.rng.uniform(size=(3, 1)) > 0.3)
    return g("Where", cond, g.weight(1, 4), g.input("x", 1, 4))


def _where_two_inputs(g: Graph) -> str:
    cond = g.const(np.array([[True, False, True, False]]))
    return g("Where", cond, g.input("a", 3, 4), g.input("b", 3, 1))


def _cast_chain(g: Graph) -> str:
    wide = g("Cast", g.input("x", 2, 3), to=onnx.TensorProto.DOUBLE)
    return g("Cast", g("Mul", wide, g.const(np.float64(2.0), exact=True)), to=g.elem)


def _sum_mean(g: Graph) -> list[str]:
    a, b = g.input("a", 2, 3), g.input("b", 2, 1)
    return [g("Sum", a, g.weight(3), b), g("Mean", b, g.weight(2, 3), a, a)]


def _concat_cls_token(g: Graph) -> str:
    """A constant row broadcast to the batch (Shape → Slice → Concat → Expand), then concatenated: the
    class-token pattern of vision transformers."""
    x = g.input("x", 2, 3)
    batch = g("Slice", g("Shape", x), g.ints(0), g.ints(1))
    token = g("Expand", g.weight(1, 1, 3), g("Concat", batch, g.ints(1, 3), axis=0))
    return g("Concat", token, x, axis=1)


def _batch_on_axis1(g: Graph) -> str:
    """Sequence-first layout (as RNN exports write): Unsqueeze before the batch, MatMul, ReduceSum over axis
    0, Transpose back."""
    x = g("Transpose", g.input("x", 3, 4), perm=[1, 0, 2])  # (3, n, 4)
    y = g("MatMul", g("Unsqueeze", x, g.ints(0)), g.weight(4, 2))  # (1, 3, n, 2)
    summed = g("ReduceSum", g("Mul", y, g.weight(3, 1, 1)), g.ints(0, 1), keepdims=0)  # (n, 2)
    return g("Concat", summed, g("Squeeze", g("Slice", x, g.ints(1), g.ints(2), g.ints(0)), g.ints(0)), axis=1)


def _expand_new_axes(g: Graph) -> str:
    """Expand to a shape with a new leading axis: the batch moves to axis 1, transposed back."""
    wide = g("Expand", g.input("x", 3, 1), g.ints(2, 1, 3, 4))
    return g("Transpose", wide, perm=[1, 0, 2, 3])


LINEAR: list[Spec] = [
    Spec("add_broadcast_const", lambda g: g("Add", g.input("x", 3, 4), g.weight(4))),
    Spec("add_const_column", lambda g: g("Add", g.weight(3, 1), g.input("x", 3, 4))),
    Spec("add_two_inputs_broadcast", lambda g: g("Add", g.input("a", 3, 1), g.input("b", 1, 4))),
    Spec("sub_const", lambda g: g("Sub", g.input("x", 3, 4), g.weight(1, 4))),
    Spec("sub_from_const", lambda g: g("Sub", g.weight(3, 1), g.input("x", 3, 4))),
    Spec("sub_two_inputs", lambda g: g("Sub", g.input("a", 4), g.input("b", 4))),
    Spec("neg", unary("Neg")),
    Spec("sum_mean", _sum_mean),
    Spec("mul_const_broadcast", lambda g: g("Mul", g.input("x", 3, 4), g.weight(3, 1))),
    Spec("mul_const_left", lambda g: g("Mul", g.weight(4), g.input("x", 3, 4))),
    # tf2onnx's LayerNormalization: a (T, 1) tensor times a (D,) constant, broadcast up to (T, D)
    Spec("mul_const_broadcasts_the_input", lambda g: g("Mul", g.input("x", 3, 1), g.weight(4))),
    Spec("div_by_const", lambda g: g("Div", g.input("x", 3, 4), g.const(g.rng.uniform(0.5, 2, (4,))))),
    Spec("matmul_const_right", lambda g: g("MatMul", g.input("x", 2, 4), g.weight(4, 5))),
    Spec("matmul_const_right_1d", lambda g: g("MatMul", g.input("x", 4), g.weight(4))),
    Spec("matmul_const_left", _matmul_left),
    Spec("matmul_const_left_1d", lambda g: g("MatMul", g.weight(3), g.input("x", 3, 4))),
    Spec("gemm_transb_alpha_beta", _gemm(0, 1, 0.5, 2.0, (5,))),
    Spec("gemm_plain_row_bias", _gemm(0, 0, 1.0, 1.0, (1, 5))),
    Spec("gemm_transa_no_bias", _gemm(1, 0, 1.5, 1.0, None)),
    Spec("gemm_variable_b", _gemm_variable_b),
    Spec("conv1d_stride_pads", _conv((2, 9), (3, 2, 3), strides=[2], pads=[1, 1])),
    Spec("conv2d_strides_pads_dilations", _conv((2, 6, 7), (4, 2, 3, 3), strides=[2, 1], pads=[1, 0, 1, 2],
                                                 dilations=[1, 2])),
    Spec("conv2d_same_upper", _conv((2, 5, 6), (3, 2, 3, 2), strides=[2, 2], auto_pad="SAME_UPPER")),
    Spec("conv2d_same_lower", _conv((2, 5, 6), (3, 2, 2, 3), auto_pad="SAME_LOWER", strides=[1, 2])),
    Spec("conv1d_valid", _conv((2, 7), (3, 2, 3), bias=False, auto_pad="VALID", strides=[3])),
    Spec("conv2d_groups", _conv((4, 5, 5), (6, 2, 3, 3), bias=False, group=2, pads=[1, 1, 1, 1])),
    Spec("conv2d_depthwise", _conv((3, 5, 5), (6, 1, 3, 3), group=3, strides=[2, 2])),
    Spec("conv3d", _conv((2, 4, 4, 5), (3, 2, 2, 2, 3), strides=[2, 1, 2], pads=[0, 1, 1, 1, 0, 1])),
    Spec("conv_transpose2d", _conv_transpose((3, 3, 4), (3, 2, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1],
                                             output_padding=[1, 0])),
    Spec("conv_transpose1d_groups_dilations", _conv_transpose((4, 5), (4, 1, 3), group=2, dilations=[2],
                                                              strides=[2])),
    Spec("conv_transpose2d_same_upper", _conv_transpose((2, 3, 3), (2, 3, 3, 3), strides=[2, 3],
                                                       auto_pad="SAME_UPPER")),
    Spec("conv_transpose1d_same_lower", _conv_transpose((2, 4), (2, 2, 3), strides=[2], auto_pad="SAME_LOWER")),
    Spec("batchnorm_2d", _batchnorm((3, 4, 4))),
    Spec("batchnorm_features", _batchnorm((5,))),
    Spec("avgpool_pads_exclude", unary("AveragePool", (2, 5, 5), kernel_shape=[3, 3], strides=[2, 2],
                                       pads=[1, 1, 1, 1])),
    Spec("avgpool_pads_include", unary("AveragePool", (2, 5, 5), kernel_shape=[3, 3], strides=[2, 2],
                                       pads=[1, 1, 1, 1], count_include_pad=1)),
    Spec("avgpool_ceil_mode", unary("AveragePool", (2, 6, 6), kernel_shape=[3, 3], strides=[2, 2],
                                    ceil_mode=1)),
    Spec("avgpool1d", unary("AveragePool", (2, 7), kernel_shape=[2], strides=[2])),
    Spec("avgpool_dilations", unary("AveragePool", (1, 6, 6), kernel_shape=[2, 2], dilations=[2, 2],
                                    pads=[1, 0, 1, 0])),
    Spec("avgpool_same_upper", unary("AveragePool", (2, 5, 5), kernel_shape=[2, 2], strides=[2, 2],
                                     auto_pad="SAME_UPPER")),
    Spec("global_avgpool", unary("GlobalAveragePool", (3, 3, 4))),
    Spec("reducesum_keepdims", _reduce("ReduceSum", (3, 4), [1], 1)),
    Spec("reducesum_no_keepdims", _reduce("ReduceSum", (2, 3, 4), [1, -1], 0)),
    Spec("reducemean_keepdims", _reduce("ReduceMean", (2, 3, 4), [-1], 1)),
    Spec("reducemean_no_keepdims", _reduce("ReduceMean", (2, 3, 4), [2, 1], 0)),
    Spec("reducemean_axes_attribute_opset17", lambda g: g("ReduceMean", g.input("x", 2, 3, 4), axes=[-1, 1],
                                                          keepdims=0), opset=17),
    Spec("reducesum_opset11", lambda g: g("ReduceSum", g.input("x", 2, 3), axes=[1]), opset=11),
    Spec("reshape", lambda g: g("Reshape", g.input("x", 2, 6), g.ints(0, 3, -1))),
    Spec("flatten", unary("Flatten", (2, 3, 2), axis=1)),
    Spec("flatten_negative_axis", unary("Flatten", (2, 3, 2), axis=-3)),
    Spec("transpose", unary("Transpose", (2, 3, 4), perm=[0, 3, 1, 2])),
    Spec("squeeze", lambda g: g("Squeeze", g.input("x", 1, 4, 1), g.ints(1, 3))),
    Spec("squeeze_no_axes", lambda g: g("Squeeze", g.input("x", 1, 4, 1))),
    Spec("unsqueeze", lambda g: g("Unsqueeze", g.input("x", 4), g.ints(1, -1))),
    Spec("concat_cls_token", _concat_cls_token),
    Spec("concat_two_inputs", lambda g: g("Concat", g.input("a", 2, 3), g.input("b", 1, 3), axis=1)),
    Spec("split_both_used", lambda g: _split(g, [0, 1, 2])),
    Spec("split_one_unused", lambda g: _split(g, [0, 2])),
    Spec("split_num_outputs", lambda g: g("Split", g.input("x", 3, 4), axis=-1, num_outputs=2, outputs=2)),
    Spec("slice_step1", _slice((4, 5), [1, 0], [3, 4], [1, 2], [1, 1])),
    Spec("slice_step2", _slice((5, 4), [0], [5], [1], [2])),
    Spec("slice_negative", _slice((5, 4), [-1, 3], [-100, 0], [1, 2], [-2, -1])),
    Spec("gather_scalar", _gather(2, 1)),
    Spec("gather_vector_repeats", _gather([3, 0, 3, -1], 2)),
    Spec("gather_2d_indices", _gather([[0, 2], [2, 1]], 1)),
    Spec("gather_last_step_seq_first", _gather_seq_first),
    Spec("reverse_sequence_full", _reverse_sequence(time_major=False)),
    Spec("reverse_sequence_full_time_major", _reverse_sequence(time_major=True)),
    Spec("pad_constant", _pad("constant", [0, 1, 0, 0, 0, 2], value=0.7)),
    Spec("pad_constant_crop", _pad("constant", [0, -1, 1, 0, 1, -1])),
    Spec("pad_reflect", _pad("reflect", [0, 2, 1, 0, 0, 3])),
    Spec("pad_edge", _pad("edge", [0, 1, 2, 0, 2, 1])),
    Spec("pad_wrap", _pad("wrap", [0, 1, 0, 0, 1, 2])),
    Spec("expand", lambda g: g("Expand", g.input("x", 1, 4), g.ints(1, 3, 4))),
    Spec("expand_new_axes", _expand_new_axes),
    Spec("tile", lambda g: g("Tile", g.input("x", 2, 2), g.ints(1, 2, 3))),
    Spec("identity_dropout", lambda g: g("Dropout", g("Identity", g.input("x", 2, 3)))),
    Spec("input_is_output", lambda g: [g.input("x", 2, 3), g("Mul", "x", g.const(2.0))]),
    Spec("batch_on_axis1", _batch_on_axis1),
    Spec("cast_float_chain", _cast_chain),
    Spec("where_const_cond", _where_const),
    Spec("where_const_cond_broadcast", _where_broadcast),
    Spec("where_const_cond_two_inputs", _where_two_inputs),
]


# -- elementwise ops (one rescale each): additivity + finite differences --------------------------------


def _gate(make_condition: Callable[[Graph, str], str]) -> Callable[[Graph], str]:
    """``Where(cond(x), sin(x), 0.5·x)``: a boolean op inside an elementwise region."""

    def build(g: Graph) -> str:
        x = g.input("x", 2, 3)
        return g("Where", make_condition(g, x), g("Sin", x), g("Mul", x, g.const(0.5)))

    return build


def _masked(g: Graph) -> str:
    """``x · float(x > 0.3)``: Cast of a comparison, multiplied back in (a step, 0 slope off the jump)."""
    x = g.input("x", 2, 3)
    return g("Mul", g("Cast", g("Greater", x, g.const(0.3)), to=g.elem), x)


def _region_arithmetic(g: Graph) -> str:
    """Add/Sub/Sum/Mean/Neg/Identity/Div joining branches of one source: one region, one rescale."""
    x = g.input("x", 2, 3)
    s = g("Sum", g("Sin", x), g("Neg", x), g("Mean", g("Cos", x), g("Identity", x)))
    return g("Sub", g("Div", s, g("Add", g("Exp", x), g.const(1.0))), g("Tanh", x))


ELEMENTWISE: list[Spec] = [
    Spec("relu", unary("Relu"), KINK0),
    Spec("leaky_relu", unary("LeakyRelu", alpha=0.2), KINK0),
    Spec("prelu", unary("PRelu", (2, 3), inputs=[np.array([0.1, -0.3, 0.5])]), KINK0),
    Spec("thresholded_relu", unary("ThresholdedRelu", alpha=0.5), away(0.5)),
    Spec("elu", unary("Elu", alpha=0.7), KINK0),
    Spec("selu", unary("Selu"), KINK0),
    Spec("celu", unary("Celu", alpha=1.5), KINK0),
    Spec("sigmoid", unary("Sigmoid"), away(low=-4, high=4)),
    Spec("hard_sigmoid", unary("HardSigmoid", alpha=0.3, beta=0.4), away(-4 / 3, 2, low=-3, high=3)),
    Spec("hard_swish", unary("HardSwish"), away(-3, 3, low=-4.5, high=4.5)),
    Spec("tanh", unary("Tanh")),
    Spec("softplus", unary("Softplus"), away(low=-3, high=3)),
    Spec("softsign", unary("Softsign"), KINK0),
    Spec("gelu", unary("Gelu"), away(low=-3, high=3)),
    Spec("gelu_tanh", unary("Gelu", approximate="tanh"), away(low=-3, high=3)),
    Spec("mish", unary("Mish"), away(low=-3, high=3)),
    Spec("erf", unary("Erf")),
    Spec("erfc_tf2onnx", unary("Erfc"), standard=lambda g: g("Sub", g.const(1.0), g("Erf", g.input("x", 2, 3)))),
    Spec("exp", unary("Exp")),
    Spec("log", unary("Log"), positive),
    Spec("sqrt", unary("Sqrt"), positive),
    Spec("reciprocal", unary("Reciprocal"), away(0.0, gap=0.5)),
    Spec("abs", unary("Abs"), KINK0),
    Spec("sqrt_of_relu", lambda g: g("Sqrt", g("Relu", g.input("x", 2, 3))), KINK0),
    Spec("sin", unary("Sin"), away(low=-3, high=3)),
    Spec("cos", unary("Cos"), away(low=-3, high=3)),
    Spec("tan", unary("Tan"), away(low=-1.2, high=1.2)),
    Spec("clip_min_max", unary("Clip", inputs=[np.float32(-0.5), np.float32(0.8)]), away(-0.5, 0.8)),
    Spec("clip_max_only", unary("Clip", inputs=[None, np.float32(0.8)]), away(0.8)),
    Spec("pow_const_exponent", unary("Pow", inputs=[np.float32(2.5)]), positive),
    Spec("pow_integer_exponent", unary("Pow", inputs=[np.float32(3.0)])),
    Spec("pow_const_base", lambda g: g("Pow", g.const(1.7), g.input("x", 2, 3))),
    Spec("max_with_const", lambda g: g("Max", g.input("x", 2, 3), g.const(0.2)), away(0.2)),
    Spec("max_variadic_with_consts", lambda g: g("Max", g.const(-0.5), g.input("x", 2, 3), g.const(0.4)),
         away(-0.5, 0.4)),
    Spec("pow_int64_exponent", unary("Pow", inputs=[np.array(3, np.int64)])),
    Spec("max_same_source", lambda g: g("Max", g.input("x", 2, 3), g("Neg", "x")), KINK0),
    Spec("pow_x_to_the_x", lambda g: g("Pow", *[g.input("x", 2, 3)] * 2), positive),
    Spec("min_with_const_row", lambda g: g("Min", g.weight(3), g.input("x", 2, 3)), distinct),
    Spec("div_const_by_x", lambda g: g("Div", g.const(1.3), g.input("x", 2, 3)), positive),
    Spec("floor", unary("Floor"), off_integers(0.5, 0.4)),
    Spec("ceil", unary("Ceil"), off_integers(0.5, 0.4)),
    Spec("round", unary("Round"), off_integers(0.0, 0.4)),
    Spec("sign", unary("Sign"), KINK0),
    Spec("greater_cast_mul", _masked, away(0.3)),
    Spec("where_less", _gate(lambda g, x: g("Less", x, g.const(0.3))), away(0.3)),
    Spec("where_greater_or_equal", _gate(lambda g, x: g("GreaterOrEqual", x, g.const(-0.2))), away(-0.2)),
    Spec("where_less_or_equal", _gate(lambda g, x: g("LessOrEqual", x, g.const(0.1))), away(0.1)),
    Spec("where_equal", _gate(lambda g, x: g("Equal", x, g.const(0.25))), away(0.25)),
    Spec("where_not_and_or_xor", _gate(lambda g, x: g("Xor", g("Or", g("Not", g("Greater", x, g.const(1.0))),
                                                                    g("Less", x, g.const(-1.0))),
                                                       g("And", g("Greater", x, g.const(0.0)),
                                                         g("Less", x, g.const(0.5))))),
         away(-1.0, 0.0, 0.5, 1.0)),
    Spec("where_isnan_isinf", _gate(lambda g, x: g("Or", g("IsNaN", x), g("Not", g("IsInf", x))))),
    Spec("region_arithmetic", _region_arithmetic, away(low=-2, high=2)),
]


# -- fusion regions, normalisation, softmax -------------------------------------------------------------


def _silu(g: Graph) -> str:
    x = g.input("x", 2, 3)
    return g("Mul", x, g("Sigmoid", x))


def _gelu_erf(g: Graph) -> str:
    x = g.input("x", 2, 3)
    cdf = g("Add", g.const(1.0), g("Erf", g("Div", x, g.const(np.sqrt(2.0)))))
    return g("Mul", g("Mul", x, g.const(0.5)), cdf)


def _gelu_keras(erfc: bool) -> Callable[[Graph], str]:
    """Keras 3's exact GELU as tf2onnx writes it, ``0.5·x·erfc(−x·(1/√2))``; ``erfc=False``: with ``1 − Erf``
    in place of ``Erfc`` (the reference ONNX Runtime can run)."""

    def build(g: Graph) -> str:
        x = g.input("x", 2, 3)
        scaled = g("Mul", g("Neg", x), g.const(1 / np.sqrt(2.0)))
        tail = g("Erfc", scaled) if erfc else g("Sub", g.const(1.0), g("Erf", scaled))
        return g("Mul", g("Mul", x, g.const(0.5)), tail)

    return build


def _mask_through_layout(g: Graph) -> str:
    """A step mask from the data, ``keep_t = x[t, 0] > 0``, carried as a boolean through Unsqueeze → Transpose →
    Gather (as a masked RNN's loop reads it), then selecting ``m·tanh(x_1 W) + (1 − m)·tanh(x_0 W)`` with
    ``m = Cast(keep_1)`` and ``1 − m = Cast(Not(keep_1))`` (tf2onnx's form of Keras's masked state update)."""
    x = g.input("x", 3, 2)
    keep = g("Greater", g("Gather", x, g.const(np.array(0, np.int64)), axis=2), g.const(0.0))  # (n, 3)
    steps = g("Transpose", g("Unsqueeze", keep, g.ints(2)), perm=[1, 0, 2])  # (3, n, 1)
    keep_1 = g("Gather", steps, g.const(np.array(1, np.int64)), axis=0)  # (n, 1)
    w = g.weight(2, 4)
    new, old = (g("Tanh", g("MatMul", g("Gather", x, g.const(np.array(t, np.int64)), axis=1), w)) for t in (1, 0))
    return g("Add", g("Mul", g("Cast", keep_1, to=g.elem), new), g("Mul", g("Cast", g("Not", keep_1), to=g.elem), old))


def _leaky_where(g: Graph) -> str:
    x = g.input("x", 2, 3)
    return g("Where", g("Greater", x, g.const(0.0)), x, g("Mul", x, g.const(0.1)))


def _mish_written(g: Graph) -> str:
    x = g.input("x", 2, 3)
    return g("Mul", x, g("Tanh", g("Softplus", x)))


def _hard_swish_written(g: Graph) -> str:
    x = g.input("x", 2, 3)
    return g("Mul", x, g("HardSigmoid", x, alpha=1 / 6, beta=0.5))


def _layer_norm(shape, axis: int) -> Callable[[Graph], str]:
    """LayerNormalization over the axes from ``axis`` (counted with the batch) on, with scale and bias."""

    def build(g: Graph) -> str:
        x = g.input("x", *shape)
        norm = (None, *shape)[axis:]
        return g("LayerNormalization", x, g.weight(*norm), g.weight(*norm), axis=axis, epsilon=1e-3)

    return build


def _group_norm(g: Graph) -> str:
    """stash_type 11 in the float64 graph: ONNX Runtime otherwise normalises in float32 (the default)."""
    return g("GroupNormalization", g.input("x", 4, 3), g.weight(4), g.weight(4), num_groups=2, epsilon=1e-3,
             stash_type=1 if g.dtype == np.float32 else onnx.TensorProto.DOUBLE)


def _rms_norm(g: Graph) -> str:
    x = g.input("x", 2, 4)
    mean_square = g("ReduceMean", g("Mul", x, x), g.ints(-1))
    return g("Mul", g("Div", x, g("Sqrt", g("Add", mean_square, g.const(1e-3)))), g.weight(4))


def _seq_first_nonlinear(g: Graph) -> str:
    """SiLU, Softmax over the last axis and LayerNormalization with the batch on axis 1, transposed back."""
    x = g("Transpose", g.input("x", 3, 4), perm=[1, 0, 2])  # (3, n, 4)
    silu = g("Mul", x, g("Sigmoid", x))
    norm = g("LayerNormalization", g("Softmax", silu, axis=-1), g.weight(4), axis=-1)
    return g("Transpose", norm, perm=[1, 0, 2])


def _region_two_exits(g: Graph) -> list[str]:
    """σ(x) is an output of its own and the inner tensor of the region x·σ(x), also an output."""
    x = g.input("x", 2, 3)
    s = g("Sigmoid", x)
    return [s, g("Mul", x, s)]


def _region_inner_used(g: Graph) -> str:
    """tanh(x) feeds a MatMul (outside any region) and the region exp(tanh(x))·x."""
    x = g.input("x", 3)
    t = g("Tanh", x)
    return g("Add", g("MatMul", t, g.weight(3, 3)), g("Mul", g("Exp", t), x))


def _mlp_head(g: Graph) -> str:
    """Linear → softmax over classes: the usual explained-probabilities head."""
    return g("Softmax", g("Add", g("MatMul", g.input("x", 4), g.weight(4, 3)), g.weight(3)), axis=-1)


FUSION: list[Spec] = [
    Spec("silu_written", _silu, away(low=-3, high=3)),
    Spec("gelu_written_erf", _gelu_erf, away(low=-3, high=3)),
    Spec("gelu_keras_erfc", _gelu_keras(erfc=True), away(low=-3, high=3), standard=_gelu_keras(erfc=False)),
    Spec("boolean_mask_through_layout", _mask_through_layout, KINK0),
    Spec("leaky_relu_where", _leaky_where, KINK0),
    Spec("mish_written", _mish_written, away(low=-3, high=3)),
    Spec("hard_swish_written", _hard_swish_written, away(-3, 3, low=-4.5, high=4.5)),
    Spec("x_times_x", lambda g: g("Mul", *[g.input("x", 2, 3)] * 2)),
    Spec("layer_norm_last", _layer_norm((3, 5), -1)),
    Spec("layer_norm_last_two", _layer_norm((3, 4), 1)),
    Spec("rms_norm_written", _rms_norm),
    Spec("instance_norm", lambda g: g("InstanceNormalization", g.input("x", 2, 2, 3), g.weight(2), g.weight(2),
                                      epsilon=1e-3)),
    Spec("group_norm_opset21", _group_norm, opset=21),
    Spec("softmax_last", unary("Softmax", (3, 4), axis=-1)),
    Spec("softmax_axis1", unary("Softmax", (3, 4), axis=1)),
    Spec("softmax_2d", unary("Softmax", (5,))),
    Spec("softmax_opset11_coerced_2d", unary("Softmax", (3, 4), axis=1), opset=11),
    Spec("softmax_opset11_coerced_3d", unary("Softmax", (2, 3, 4), axis=1), opset=11),
    Spec("logsoftmax_opset11_coerced_3d", unary("LogSoftmax", (2, 3, 4), axis=1), opset=11),
    Spec("softmax_middle_axis", unary("Softmax", (2, 3, 4), axis=1)),
    Spec("batch_on_axis1_silu_softmax", _seq_first_nonlinear),
    Spec("logsoftmax_last", unary("LogSoftmax", (3, 4), axis=-1)),
    Spec("logsoftmax_axis1", unary("LogSoftmax", (3, 4), axis=1)),
    Spec("linear_softmax_head", _mlp_head),
    Spec("region_two_exits", _region_two_exits, away(low=-3, high=3)),
    Spec("region_inner_tensor_used_outside", _region_inner_used, away(low=-3, high=3)),
]


# -- max-type: cross-max rule -------------------------------------------------------------------------


def _squashed_pool_conv(g: Graph) -> str:
    """``Conv(MaxPool(tanh(x/2)))`` with tiling windows: the pool's multiplier is copied to its windows (Resize)
    and kept lazy through the tanh's rescale (tanh is monotonic: distinct inputs keep distinct window values)."""
    squashed = g("Tanh", g("Mul", g.input("x", 2, 6, 4), g.const(0.5)))
    pooled = g("MaxPool", squashed, kernel_shape=[2, 2], strides=[2, 2])
    return g("Conv", pooled, g.weight(3, 2, 2, 2, scale=0.5), g.weight(3), pads=[1, 0, 0, 1])


MAX_TYPE: list[Spec] = [
    Spec("maxpool2d_k3_s2_p1", unary("MaxPool", (2, 5, 5), kernel_shape=[3, 3], strides=[2, 2],
                                     pads=[1, 1, 1, 1]), distinct),
    Spec("maxpool2d_k2_s1", unary("MaxPool", (1, 4, 5), kernel_shape=[2, 2]), distinct),
    Spec("maxpool2d_tiled_k2_s2", unary("MaxPool", (2, 4, 6), kernel_shape=[2, 2], strides=[2, 2]), distinct),
    Spec("maxpool2d_tiled_floor_crop", unary("MaxPool", (2, 5, 7), kernel_shape=[2, 3], strides=[2, 3]),
         distinct),
    Spec("maxpool1d_tiled", unary("MaxPool", (3, 8), kernel_shape=[4], strides=[4]), distinct),
    Spec("maxpool2d_tiled_k3x2", unary("MaxPool", (2, 6, 4), kernel_shape=[3, 2], strides=[3, 2]), distinct),
    Spec("maxpool3d_tiled", unary("MaxPool", (2, 4, 2, 4), kernel_shape=[2, 2, 2], strides=[2, 2, 2]), distinct),
    Spec("maxpool_tiled_lazy_through_tanh", _squashed_pool_conv, distinct),
    Spec("maxpool2d_ceil_mode", unary("MaxPool", (2, 6, 6), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
         distinct),
    Spec("maxpool2d_dilations", unary("MaxPool", (1, 6, 7), kernel_shape=[2, 3], dilations=[2, 2],
                                      strides=[1, 2], pads=[0, 1, 1, 0]), distinct),
    Spec("maxpool2d_same_upper", unary("MaxPool", (2, 5, 4), kernel_shape=[3, 2], strides=[2, 2],
                                       auto_pad="SAME_UPPER"), distinct),
    Spec("maxpool1d_k3_s2_p1", unary("MaxPool", (2, 9), kernel_shape=[3], strides=[2], pads=[1, 1]), distinct),
    Spec("maxpool1d_ceil_dilated", unary("MaxPool", (2, 10), kernel_shape=[3], strides=[3], dilations=[2],
                                         ceil_mode=1), distinct),
    Spec("maxpool3d", unary("MaxPool", (1, 4, 4, 4), kernel_shape=[2, 2, 2], strides=[2, 1, 2]), distinct),
    Spec("global_maxpool", unary("GlobalMaxPool", (3, 3, 4)), distinct),
    Spec("reducemax_keepdims", _reduce("ReduceMax", (3, 4), [-1], 1), distinct),
    Spec("reducemax_two_axes_no_keepdims", _reduce("ReduceMax", (2, 3, 4), [1, 2], 0), distinct),
    Spec("reducemin_keepdims", _reduce("ReduceMin", (3, 4), [1], 1), distinct),
    Spec("reducemin_no_keepdims", _reduce("ReduceMin", (2, 3, 4), [-1], 0), distinct),
]


# -- two variable inputs: brute-force Shapley -----------------------------------------------------------


def _matmul_bilinear(a_shape, b_shape) -> Callable[[Graph], str]:
    def build(g: Graph) -> str:
        return g("MatMul", g.input("a", *a_shape), g.input("b", *b_shape))

    return build


def _pairwise_games(g: Graph) -> list[str]:
    """Three scalar features in pairwise games: x0·x1 + max(x1, x2) + x2/x0, and x0 − min(x0, x2)."""
    x0, x1, x2 = g("Split", g.input("x", 3), g.ints(1, 1, 1), axis=1, outputs=3)
    first = g("Sum", g("Mul", x0, x1), g("Max", x1, x2), g("Div", x2, x0))
    return [first, g("Sub", x0, g("Min", x0, x2))]


def _x0_positive_grid(rng, shape):
    """x0 ∈ [0.5, 2] (a denominator), x1 and x2 on grids 0.05 apart (max/min never tie)."""
    x = grid(0.0)(rng, shape)
    x[..., 0] = rng.uniform(0.5, 2.0, size=x.shape[:-1])
    x[..., 2] += 0.05
    return x


SHAPLEY: list[Spec] = [
    Spec("mul_two_inputs", two("Mul")),
    Spec("mul_two_inputs_broadcast", two("Mul", (3, 1), (1, 2))),
    Spec("div_two_inputs", two("Div"), {"a": normal, "b": away(0.0, gap=0.5)}),
    Spec("max_two_inputs", two("Max"), {"a": grid(0.0), "b": grid(0.05)}),
    Spec("min_two_inputs_broadcast", two("Min", (2, 3), (1, 3)), {"a": grid(0.0), "b": grid(0.05)}),
    Spec("pow_two_inputs", two("Pow"), {"a": positive, "b": normal}),
    Spec("matmul_bilinear_2x2x3", _matmul_bilinear((2, 2), (2, 3))),
    Spec("pairwise_scalar_games", _pairwise_games, _x0_positive_grid),
    Spec("gated_product", lambda g: g("Mul", g("Sigmoid", g.input("a", 4)), g("Tanh", g.input("b", 4)))),
    Spec("gated_division", lambda g: g("Div", g("Exp", g.input("a", 4)), g("Softplus", g.input("b", 4)))),
    Spec("max_two_inputs_and_const", lambda g: g("Max", g.input("a", 4), g.const(0.15), g.input("b", 4)),
         {"a": grid(0.0), "b": grid(0.05)}),
]

# bilinear MatMul against the closed form M_A = M_Z·((B_x + B_r)/2)ᵀ, M_B = ((A_x + A_r)/2)ᵀ·M_Z
BILINEAR: list[Spec] = [
    Spec("matmul_bilinear_3d", _matmul_bilinear((2, 3), (3, 4))),
    Spec("matmul_bilinear_4d", _matmul_bilinear((2, 2, 3), (2, 3, 2))),
]

# --------------------------------------------------------------------------------------------------
# the batch merged with other axes (lower/layout.py): rows stay independent through the merge
# --------------------------------------------------------------------------------------------------


def _tokens_as_rows(g: Graph) -> str:
    """A dense layer on B·T rows: (n, 3, 4) → (n·3, 4) → MatMul, ReLU → (n, 3, 5) → mean over T."""
    rows = g("Reshape", g.input("x", 3, 4), g.ints(-1, 4))
    hidden = g("Relu", g("Add", g("MatMul", rows, g.weight(4, 5)), g.weight(5)))
    return g("ReduceMean", g("Reshape", hidden, g.ints(-1, 3, 5)), g.ints(1), keepdims=0)


def _sequence_first_rows(g: Graph) -> str:
    """Sequence-first rows (T·B, E): the batch is the inner factor (torch's attention out_proj)."""
    seq_first = g("Transpose", g.input("x", 3, 4), perm=[1, 0, 2])
    rows = g("Reshape", seq_first, g.ints(-1, 4))
    projected = g("Tanh", g("MatMul", rows, g.weight(4, 2)))
    return g("Transpose", g("Reshape", projected, g.ints(3, -1, 2)), perm=[1, 0, 2])


def _heads_merged_attention(g: Graph) -> str:
    """Self-attention with the heads merged into the batch, (n·2, 3, 2): QKᵀ, softmax, AV, and back."""
    x = g.input("x", 3, 4)
    heads = g("Reshape", g("Transpose", g("Reshape", x, g.ints(-1, 3, 2, 2)), perm=[0, 2, 1, 3]), g.ints(-1, 3, 2))
    q = g("MatMul", heads, g.weight(2, 2))
    k = g("MatMul", heads, g.weight(2, 2))
    scores = g("Softmax", g("MatMul", q, g("Transpose", k, perm=[0, 2, 1])), axis=-1)
    mixed = g("MatMul", scores, heads)
    return g("Reshape", g("Transpose", g("Reshape", mixed, g.ints(-1, 2, 3, 2)), perm=[0, 2, 1, 3]), g.ints(-1, 3, 4))


def _flat_rows(g: Graph) -> str:
    """The whole tensor flattened, batch included: (n·12,), then back to rows."""
    flat = g("Reshape", g.input("x", 3, 4), g.ints(-1))
    return g("Reshape", g("Sigmoid", g("Mul", flat, g.const(0.7))), g.ints(-1, 12))


def _masked_softmax(g: Graph) -> str:
    """A causal mask of −inf added before the softmax, as attention writes it."""
    mask = np.triu(np.full((3, 3), -np.inf), 1)
    scores = g("MatMul", g.input("x", 3, 2), g("Transpose", g.input("y", 3, 2), perm=[0, 2, 1]))
    return g("Softmax", g("Add", scores, g.const(mask)), axis=-1)


MERGED: list[Spec] = [
    Spec("softmax_masked_minus_inf", _masked_softmax),
    Spec("merged_tokens_as_rows", _tokens_as_rows),
    Spec("merged_sequence_first_rows", _sequence_first_rows),
    Spec("merged_heads_attention", _heads_merged_attention),
    Spec("merged_flat_rows", _flat_rows),
]

# --------------------------------------------------------------------------------------------------
# gathers whose indices follow the batch but stay in each row (lower/row_gather.py)
# --------------------------------------------------------------------------------------------------


def _batch_range(g: Graph, x: str) -> str:
    """``arange(n)`` (int64, shape (n,)) from the shape of ``x``, as exporters write it."""
    rows = g("Squeeze", g("Shape", x, start=0, end=1), g.ints(0))
    return g("Range", g.const(np.array(0, np.int64)), rows, g.const(np.array(1, np.int64)))


def _last_token_flat(g: Graph) -> str:
    """TorchScript's ``h[arange(b), -1]`` on a flattened (n·3, 4): Gather of ``arange(n)·3 + 2`` on axis 0."""
    x = g.input("x", 3, 4)
    hidden = g("Tanh", g("MatMul", x, g.weight(4, 4)))
    rows = g("Flatten", hidden, axis=2)
    last = g("Add", g("Mul", _batch_range(g, x), g.ints(3)), g.ints(2))
    return g("MatMul", g("Gather", rows, last, axis=0), g.weight(4, 2))


def _batch_rows_gather(g: Graph) -> str:
    """TorchScript's last-token pooling after selecting the token: Gather of ``arange(n)`` on the batch axis."""
    x = g.input("x", 3, 4)
    token = g("Gather", x, g.const(np.array(-1, np.int64)), axis=1)
    return g("Gather", token, _batch_range(g, x), axis=0)


def _gathernd_batch_rows(g: Graph) -> str:
    """dynamo's ``h[arange(b), -1]``: GatherND with index rows ``[b, -1]``."""
    x = g.input("x", 3, 4)
    hidden = g("Sigmoid", x)
    batch = g("Unsqueeze", _batch_range(g, x), g.ints(1))
    last = g("Add", g("Mul", batch, g.ints(0)), g.ints(-1))
    return g("GatherND", hidden, g("Concat", batch, last, axis=1))


def _flat_offsets(offsets: list[int], nd: bool) -> Callable[[Graph], str]:
    """Channels-last pooling written as ``x.permute(0, 2, 1).reshape(-1)`` and a Gather (or dynamo's GatherND
    with one index column) of ``b·6 + offset``; offsets may repeat."""

    def build(g: Graph) -> str:
        x = g.input("x", 2, 3)
        flat = g("Reshape", g("Transpose", x, perm=[0, 2, 1]), g.ints(-1))
        starts = g("Unsqueeze", g("Mul", _batch_range(g, x), g.ints(6)), g.ints(1))
        index = g("Add", starts, g.const(np.array([offsets], np.int64)))
        picked = g("GatherND", flat, g("Unsqueeze", index, g.ints(2))) if nd else g("Gather", flat, index, axis=0)
        return g("Mul", picked, g.weight(len(offsets)))

    return build


ROW_GATHERS: list[Spec] = [
    Spec("row_gather_last_token_flat", _last_token_flat),
    Spec("row_gathernd_batch_rows", _gathernd_batch_rows),
]
LINEAR += [  # linear graphs: their values are also checked against J·(x − mean r)
    Spec("row_gather_batch_arange", _batch_rows_gather),
    Spec("row_gather_flat_offsets", _flat_offsets([5, 0, 3, 3, 1], nd=False)),
    Spec("row_gathernd_flat_offsets", _flat_offsets([4, 2, 2, 0], nd=True)),
]

TABLES = LINEAR + ELEMENTWISE + FUSION + MAX_TYPE + SHAPLEY + BILINEAR + MERGED + ROW_GATHERS
ALL: dict[str, Spec] = {s.name: s for s in TABLES}
assert len(ALL) == len(TABLES), "duplicate spec names"
