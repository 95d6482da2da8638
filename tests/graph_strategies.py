"""Hypothesis strategies: small random float32 ONNX graphs from every op family onnxshap explains, with data.

A drawn :class:`Case` is a model (opset 20, IR 10, written with ``rule_specs.Graph``) with one or two
inputs of shape ``(n, F)`` or ``(n, C, H, W)``, the samples it is explained on (n rows), the background
(m rows) and a spare row (the row-independence check swaps it in).

Graphs. A chain of 1-5 *families* (``FAMILIES``: one builder each, grouped by the rule family onnxshap uses)
applied to the current tensor, with shape plumbing (Reshape, a linear map) where a family needs another rank.
Binary families (residual Add/Sub, Concat, Mul, Div, Max/Min) take a second operand branched off any live
tensor of the same shape by a fresh linear map, so graphs are DAGs (residual adds, two-branch products,
quotients of two paths) and a second input joins the chain. Never two copies of one tensor: those fuse into one
elementwise region, which the single-input families already exercise. An input the chain never read is
joined at the end; an output larger than 24 gets a linear head.

Units. Every input is drawn at a scale ``s = 10^u``, ``u ∈ [−3, 3]``, and every tensor carries an estimate
of its magnitude (:attr:`Tensor.scale`). Scale-equivariant ops (linear maps, ReLU, LeakyReLU, Abs, Clip with
bounds in units of its input, max-type, Max/Min, products, quotients) see the raw units, so the rules'
"tiny" decisions are tested at every scale; saturating ops (sigmoid, tanh, exp, softmax, ...) get their
input multiplied by ``gain / scale`` first (their function is fixed by the gain, not by the units) and the
elementwise ones, optionally, their output multiplied back into units. Weights are ``N(0, 1/fan_in)`` so that
activations keep their scale; a product whose units would leave ``[1e-9, 1e9]`` normalises its partner. A
draw whose forward pass still overflows is rejected (``assume``).

Data kinds (per case): ``normal``; ``near`` (x within 1e-4·s of a reference row: secant-vs-slope decisions);
``ties`` (about half the features of each x row copied from a reference row: Δ = 0 exactly); ``grid``
(multiples of s/2: exact ties inside max-pool windows, between Max/Min operands and between x and r).

Shrinking: the family list shrinks to fewer and earlier families (``FAMILIES`` starts with the simplest),
every parameter toward its first choice, the scale exponent toward 0, so a failure reduces to a short graph.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import rule_specs as rs
from hypothesis import assume
from hypothesis import strategies as st

MAX_ELEMENTS = 192  # per tensor (without the batch): keeps n·m·k pair batches small
MAX_OUTPUTS = 24  # a larger final tensor gets a linear head
DATA_KINDS = ("normal", "near", "ties", "grid")


@dataclass(frozen=True)
class Tensor:
    """A tensor of the graph being drawn: its name, shape without the batch axis, typical magnitude."""

    name: str
    shape: tuple[int, ...]
    scale: float

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Draft:
    """The graph being drawn: the builder, the live tensors, the families applied so far."""

    def __init__(self, draw, seed: int) -> None:
        self.draw = draw
        self.g = rs.Graph(np.float32, seed)
        self.pool: list[Tensor] = []
        self.families: list[str] = []

    def tensor(self, name: str, shape: Sequence[int], scale: float) -> Tensor:
        t = Tensor(name, tuple(int(d) for d in shape), float(scale))
        self.pool.append(t)
        return t

    def pick(self, options: Sequence):
        return self.draw(st.sampled_from(list(options)))

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def log_uniform(self, low: float, high: float) -> float:
        """10^u with u drawn from [log10 low, log10 high] (shrinks toward 10^0 = 1 where that is inside)."""
        lo, hi = math.log10(low), math.log10(high)
        return 10.0 ** self.draw(st.floats(lo, hi, allow_nan=False))

    def scaled(self, t: Tensor, factor: float) -> str:
        """``t · factor`` (a constant Mul, linear)."""
        return self.g("Mul", t.name, self.g.const(np.float32(factor)))

    def used(self, name: str) -> bool:
        """Whether a node reads the tensor ``name``."""
        return any(name in node.input for node in self.g.nodes)


# --------------------------------------------------------------------------------------------------
# shape plumbing and second operands
# --------------------------------------------------------------------------------------------------


def dense(d: Draft, t: Tensor, width: int, bias: bool = True) -> Tensor:
    """``t · W + b`` over the last axis, ``W ~ N(0, 1/fan_in)``, ``b`` in t's units."""
    fan_in = t.shape[-1]
    out = d.g("MatMul", t.name, d.g.weight(fan_in, width, scale=1 / math.sqrt(fan_in)))
    if bias:
        out = d.g("Add", out, d.g.weight(width, scale=0.5 * t.scale))
    return d.tensor(out, (*t.shape[:-1], width), t.scale)


def as_vector(d: Draft, t: Tensor) -> Tensor:
    """t flattened to (size,) (a Reshape; t itself if it is a vector)."""
    if len(t.shape) == 1:
        return t
    return d.tensor(d.g("Reshape", t.name, d.g.ints(0, -1)), (t.size,), t.scale)


def as_image(d: Draft, t: Tensor) -> Tensor:
    """A (C, H, W) tensor with H, W ≥ 2: t itself, a reshape of it, or a linear map of it reshaped."""
    if len(t.shape) == 3 and min(t.shape[1:]) >= 2:
        return t
    v = as_vector(d, t)
    shapes = [(c, h, w) for c in (1, 2, 3) for h in (2, 3, 4) for w in (2, 3, 4) if c * h * w == v.size]
    if not shapes:
        shapes = [d.pick([(1, 2, 2), (1, 2, 3), (2, 2, 3), (1, 3, 3)])]
        v = dense(d, v, math.prod(shapes[0]))
    shape = d.pick(shapes)
    return d.tensor(d.g("Reshape", v.name, d.g.ints(0, *shape)), shape, v.scale)


def branch(d: Draft, shape: tuple[int, ...]) -> Tensor:
    """A new tensor of ``shape``: a fresh linear map (MatMul over the last axis, or a 3×3 Conv) of a live
    tensor of that shape (possibly the current one)."""
    source = d.pick([t for t in d.pool if t.shape == shape])
    if len(shape) == 3 and d.draw(st.booleans()):
        c = shape[0]
        w = d.g.weight(c, c, 3, 3, scale=1 / math.sqrt(9 * c))
        return d.tensor(d.g("Conv", source.name, w, pads=[1, 1, 1, 1]), shape, source.scale)
    return dense(d, source, shape[-1])


def reduced_shape(shape: tuple[int, ...], axes: Sequence[int], keepdims: bool) -> tuple[int, ...]:
    """Shape after reducing the non-batch ``axes`` (1-based, as in the graph)."""
    return tuple(1 if i + 1 in axes else s for i, s in enumerate(shape) if keepdims or i + 1 not in axes)


def draw_axes(d: Draft, t: Tensor) -> tuple[list[int], bool]:
    """A non-empty subset of the non-batch axes (1-based) and keepdims (forced when all axes go: the result
    keeps one non-batch axis)."""
    rank = len(t.shape)
    subsets = [list(c) for r in range(1, rank + 1) for c in itertools.combinations(range(1, rank + 1), r)]
    axes = d.pick(subsets)
    keepdims = len(axes) == rank or d.draw(st.booleans())
    return axes, keepdims


def axis_attr(d: Draft, axis: int, rank: int) -> int:
    """A 1-based axis of a rank-``rank`` tensor (with batch: rank + 1), written positive or negative."""
    return d.pick([axis, axis - rank - 1])


# --------------------------------------------------------------------------------------------------
# families: (draft, current tensor) -> new current tensor
# --------------------------------------------------------------------------------------------------

Builder = Callable[[Draft, Tensor], Tensor]


def _matmul(d: Draft, t: Tensor) -> Tensor:
    """MatMul with a constant (last axis, W of shape (last, width)), plus a bias or not."""
    return dense(d, t, d.integer(1, 6), bias=d.draw(st.booleans()))


def _gemm(d: Draft, t: Tensor) -> Tensor:
    v = as_vector(d, t)
    width, trans_b = d.integer(1, 6), d.draw(st.booleans())
    alpha, beta = d.pick([1.0, 0.5, 2.0]), d.pick([1.0, -0.5])
    w = d.g.weight(*((width, v.size) if trans_b else (v.size, width)), scale=1 / math.sqrt(v.size))
    bias = d.pick([(width,), (1, width), None])
    extra = [d.g.weight(*bias, scale=v.scale)] if bias else []
    out = d.g("Gemm", v.name, w, *extra, transB=int(trans_b), alpha=alpha, beta=beta)
    return d.tensor(out, (width,), v.scale * alpha)


def _conv(d: Draft, t: Tensor) -> Tensor:
    im = as_image(d, t)
    c, h, w = im.shape
    kernel, stride, pad = d.pick([3, 1, 2]), d.pick([1, 2]), d.pick([1, 0])
    kernel = min(kernel, min(h, w) + 2 * pad)
    out_c = d.integer(1, 3)
    weight = d.g.weight(out_c, c, kernel, kernel, scale=1 / math.sqrt(c * kernel * kernel))
    bias = [d.g.weight(out_c, scale=0.5 * im.scale)] if d.draw(st.booleans()) else []
    out = d.g("Conv", im.name, weight, *bias, strides=[stride, stride], pads=[pad] * 4)
    size = [(s + 2 * pad - kernel) // stride + 1 for s in (h, w)]
    return d.tensor(out, (out_c, *size), im.scale)


def _bias(d: Draft, t: Tensor) -> Tensor:
    """Add or subtract a constant broadcast over the leading axes."""
    shape = t.shape[d.integer(0, len(t.shape) - 1):]
    c = d.g.weight(*shape, scale=t.scale)
    out = d.g("Add", t.name, c) if d.draw(st.booleans()) else d.g("Sub", c, t.name)
    return d.tensor(out, t.shape, t.scale)


def _reduce(op_type: str) -> Builder:
    def build(d: Draft, t: Tensor) -> Tensor:
        axes, keepdims = draw_axes(d, t)
        out = d.g(op_type, t.name, d.g.ints(*axes), keepdims=int(keepdims))
        count = math.prod(t.shape[a - 1] for a in axes)
        scale = t.scale * math.sqrt(count) if op_type == "ReduceSum" else t.scale
        return d.tensor(out, reduced_shape(t.shape, axes, keepdims), scale)

    return build


def _reshape(d: Draft, t: Tensor) -> Tensor:
    if len(t.shape) > 1 and d.draw(st.booleans()):
        return as_vector(d, t)
    splits = [(a, t.size // a) for a in range(2, t.size) if t.size % a == 0 and t.size // a >= 2]
    if not splits:
        return as_vector(d, t)
    shape = d.pick(splits)
    return d.tensor(d.g("Reshape", t.name, d.g.ints(0, *shape)), shape, t.scale)


def _transpose(d: Draft, t: Tensor) -> Tensor:
    rank = len(t.shape)
    if rank < 2:
        return _reshape(d, t)
    perm = d.pick([p for p in itertools.permutations(range(rank)) if list(p) != list(range(rank))])
    out = d.g("Transpose", t.name, perm=[0, *(p + 1 for p in perm)])
    return d.tensor(out, tuple(t.shape[p] for p in perm), t.scale)


def _concat(d: Draft, t: Tensor) -> Tensor:
    if 2 * t.size > MAX_ELEMENTS:
        return t
    other = branch(d, t.shape)
    axis = d.integer(1, len(t.shape))
    out = d.g("Concat", *d.pick([(t.name, other.name), (other.name, t.name)]),
              axis=axis_attr(d, axis, len(t.shape)))
    shape = tuple(s * 2 if i + 1 == axis else s for i, s in enumerate(t.shape))
    return d.tensor(out, shape, max(t.scale, other.scale))


def _slice(d: Draft, t: Tensor) -> Tensor:
    axes = [i + 1 for i, s in enumerate(t.shape) if s >= 2]
    if not axes:
        return t
    axis = d.pick(axes)
    size = t.shape[axis - 1]
    step = d.pick([1, 2, -1])
    low = d.integer(0, size - 2)
    high = d.integer(low + 1, size)
    # step −1: the same elements reversed, from high − 1 down to low (−size − 1: through index 0)
    start, end = (low, high) if step > 0 else (high - 1, low - 1 if low > 0 else -size - 1)
    out = d.g("Slice", t.name, d.g.ints(start), d.g.ints(end), d.g.ints(axis), d.g.ints(step))
    length = len(range(size)[start:end:step])  # Python's slice clamps negative ends as ONNX does
    shape = tuple(length if i + 1 == axis else s for i, s in enumerate(t.shape))
    return d.tensor(out, shape, t.scale)


def _pad(d: Draft, t: Tensor) -> Tensor:
    mode = d.pick(["constant", "reflect", "edge"])
    limit = [min(1, s - 1) if mode == "reflect" else 1 for s in t.shape]
    before = [d.integer(0, lim) for lim in limit]
    after = [d.integer(0, lim) for lim in limit]
    if math.prod(s + b + a for s, b, a in zip(t.shape, before, after)) > MAX_ELEMENTS:
        return t
    value = [d.g.const(np.float32(d.pick([0.0, 0.5]) * t.scale))] if mode == "constant" else []
    out = d.g("Pad", t.name, d.g.ints(0, *before, 0, *after), *value, mode=mode)
    return d.tensor(out, tuple(s + b + a for s, b, a in zip(t.shape, before, after)), t.scale)


def _batchnorm(d: Draft, t: Tensor) -> Tensor:
    c = t.shape[0]
    rng = d.g.rng
    mean = d.g.const(rng.normal(size=c) * 0.5 * t.scale)
    var = d.g.const(rng.uniform(0.5, 2.0, size=c) * t.scale**2)
    out = d.g("BatchNormalization", t.name, d.g.weight(c), d.g.weight(c, scale=0.5), mean, var,
              epsilon=d.pick([1e-5, 1e-3]))
    return d.tensor(out, t.shape, 1.0)


def _residual(d: Draft, t: Tensor) -> Tensor:
    other = branch(d, t.shape)
    op = d.pick(["Add", "Sub"])
    return d.tensor(d.g(op, t.name, other.name), t.shape, t.scale + other.scale)


# -- elementwise (rescale) ------------------------------------------------------------------------------


def _equivariant(op_type: str, **attrs) -> Builder:
    """An op with g(c·a) = c·g(a) for c > 0: applied to the raw units."""

    def build(d: Draft, t: Tensor) -> Tensor:
        extra = {"alpha": d.pick([0.1, 0.01, 0.3])} if op_type == "LeakyRelu" else {}
        return d.tensor(d.g(op_type, t.name, **attrs, **extra), t.shape, t.scale)

    return build


def _saturating(write: Callable[[Draft, str], str], max_gain: float, out_scale: float = 1.0) -> Builder:
    """``g(a · gain / scale)``, optionally times ``scale`` again (the result back in a's units)."""

    def build(d: Draft, t: Tensor) -> Tensor:
        gain = d.log_uniform(0.1, max_gain)
        out = write(d, d.scaled(t, gain / t.scale))
        if d.draw(st.booleans()):
            out = d.g("Mul", out, d.g.const(np.float32(t.scale)))
            return d.tensor(out, t.shape, t.scale * out_scale)
        return d.tensor(out, t.shape, out_scale)

    return build


def _unary(op_type: str) -> Callable[[Draft, str], str]:
    return lambda d, a: d.g(op_type, a)


def _positive(d: Draft, a: str) -> str:
    """Softplus(a) + eps > 0."""
    return d.g("Add", d.g("Softplus", a), d.g.const(np.float32(d.pick([1e-3, 0.1, 1.0]))))


def _clip(d: Draft, t: Tensor) -> Tensor:
    low, high = -d.pick([0.5, 0.1, 2.0]) * t.scale, d.pick([0.5, 0.1, 2.0]) * t.scale
    bounds = d.pick([(low, high), (None, high), (low, None)])
    inputs = [None if b is None else d.g.const(np.float32(b)) for b in bounds]
    return d.tensor(d.g("Clip", t.name, *inputs), t.shape, t.scale)


# -- two variable inputs ------------------------------------------------------------------------------


def _mul(d: Draft, t: Tensor) -> Tensor:
    other = branch(d, t.shape)
    name, scale = other.name, other.scale
    if not 1e-9 <= t.scale * scale <= 1e9:
        name, scale = d.scaled(other, 1 / scale), 1.0
    return d.tensor(d.g("Mul", *d.pick([(t.name, name), (name, t.name)])), t.shape, t.scale * scale)


def _div(d: Draft, t: Tensor) -> Tensor:
    """``t / ((Softplus(b̂) + 0.5) · unit)``: a positive denominator from another path, in its own units."""
    other = branch(d, t.shape)
    unit = d.log_uniform(1e-3, 1e3)
    positive = d.g("Add", d.g("Softplus", d.scaled(other, 1 / other.scale)), d.g.const(np.float32(0.5)))
    denominator = d.g("Mul", positive, d.g.const(np.float32(unit)))
    return d.tensor(d.g("Div", t.name, denominator), t.shape, t.scale / unit)


def _max_min(op_type: str) -> Builder:
    def build(d: Draft, t: Tensor) -> Tensor:
        other = branch(d, t.shape)
        matched = d.scaled(other, t.scale / other.scale)  # the same units: the operands cross
        return d.tensor(d.g(op_type, *d.pick([(t.name, matched), (matched, t.name)])), t.shape, t.scale)

    return build


# -- max-type -----------------------------------------------------------------------------------------


def _maxpool(tiled: bool) -> Builder:
    def build(d: Draft, t: Tensor) -> Tensor:
        im = as_image(d, t)
        c, h, w = im.shape
        if tiled:
            kernel, stride, pad = 2, 2, 0
        else:
            kernel, stride, pad = d.pick([(3, 1, 1), (3, 2, 1), (2, 1, 0)])
        out = d.g("MaxPool", im.name, kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pad] * 4)
        size = [(s + 2 * pad - kernel) // stride + 1 for s in (h, w)]
        return d.tensor(out, (c, *size), im.scale)

    return build


def _global_maxpool(d: Draft, t: Tensor) -> Tensor:
    im = as_image(d, t)
    return d.tensor(d.g("GlobalMaxPool", im.name), (im.shape[0], 1, 1), im.scale)


def _reduce_max(d: Draft, t: Tensor) -> Tensor:
    axes, keepdims = draw_axes(d, t)
    out = d.g("ReduceMax", t.name, d.g.ints(*axes), keepdims=int(keepdims))
    return d.tensor(out, reduced_shape(t.shape, axes, keepdims), t.scale)


# -- normalisation and softmax ------------------------------------------------------------------------


def _layernorm(d: Draft, t: Tensor) -> Tensor:
    rank = len(t.shape)
    axes = [a for a in range(1, rank + 1) if math.prod(t.shape[a - 1:]) >= 2]
    if not axes:
        t = dense(d, t, 4)
        rank, axes = len(t.shape), [len(t.shape)]
    axis = d.pick(axes)
    norm = t.shape[axis - 1:]
    out = d.g("LayerNormalization", t.name, d.g.weight(*norm), d.g.weight(*norm, scale=0.5),
              axis=axis_attr(d, axis, rank), epsilon=d.pick([1e-5, 1e-3]))
    return d.tensor(out, t.shape, 1.0)


def _softmax(op_type: str) -> Builder:
    """Softmax/LogSoftmax over any non-batch axis of logits ``a · gain / scale``; gains up to 50 make logit
    gaps up to ~200 between classes and between a sample and a reference."""

    def build(d: Draft, t: Tensor) -> Tensor:
        axes = [i + 1 for i, s in enumerate(t.shape) if s >= 2]
        if not axes:
            t = dense(d, t, d.integer(2, 5))
            axes = [len(t.shape)]
        axis = d.pick(axes)
        gain = d.log_uniform(0.1, 50.0)
        out = d.g(op_type, d.scaled(t, gain / t.scale), axis=axis_attr(d, axis, len(t.shape)))
        return d.tensor(out, t.shape, 1.0 if op_type == "Softmax" else gain)

    return build


@dataclass(frozen=True)
class Family:
    """An op family: its kind (the rule family onnxshap uses), its builder, whether it is linear."""

    kind: str
    build: Builder

    @property
    def linear(self) -> bool:
        return self.kind == "linear"


FAMILIES: dict[str, Family] = {
    # linear (first: shrinking prefers them)
    "matmul": Family("linear", _matmul),
    "gemm": Family("linear", _gemm),
    "conv": Family("linear", _conv),
    "bias": Family("linear", _bias),
    "reduce_sum": Family("linear", _reduce("ReduceSum")),
    "reduce_mean": Family("linear", _reduce("ReduceMean")),
    "reshape": Family("linear", _reshape),
    "transpose": Family("linear", _transpose),
    "concat": Family("linear", _concat),
    "slice": Family("linear", _slice),
    "pad": Family("linear", _pad),
    "batchnorm": Family("linear", _batchnorm),
    "residual": Family("linear", _residual),
    # elementwise rescale
    "relu": Family("rescale", _equivariant("Relu")),
    "leaky_relu": Family("rescale", _equivariant("LeakyRelu")),
    "abs": Family("rescale", _equivariant("Abs")),
    "clip": Family("rescale", _clip),
    "sigmoid": Family("rescale", _saturating(_unary("Sigmoid"), 10.0)),
    "tanh": Family("rescale", _saturating(_unary("Tanh"), 10.0)),
    "softplus": Family("rescale", _saturating(_unary("Softplus"), 10.0, 2.0)),
    "gelu": Family("rescale", _saturating(_unary("Gelu"), 10.0, 2.0)),
    "erf": Family("rescale", _saturating(_unary("Erf"), 10.0)),
    "hard_swish": Family("rescale", _saturating(_unary("HardSwish"), 10.0, 2.0)),
    "exp": Family("rescale", _saturating(_unary("Exp"), 3.0, 3.0)),
    "log": Family("rescale", _saturating(lambda d, a: d.g("Log", _positive(d, a)), 10.0)),
    "sqrt": Family("rescale", _saturating(lambda d, a: d.g("Sqrt", _positive(d, a)), 10.0, 2.0)),
    # two variable inputs
    "mul": Family("product", _mul),
    "div": Family("division", _div),
    "max": Family("shapley", _max_min("Max")),
    "min": Family("shapley", _max_min("Min")),
    # max-type
    "maxpool_overlapping": Family("max", _maxpool(tiled=False)),
    "maxpool_tiled": Family("max", _maxpool(tiled=True)),
    "global_maxpool": Family("max", _global_maxpool),
    "reduce_max": Family("max", _reduce_max),
    # normalisation, softmax
    "layernorm": Family("normalisation", _layernorm),
    "softmax": Family("softmax", _softmax("Softmax")),
    "logsoftmax": Family("softmax", _softmax("LogSoftmax")),
}
LINEAR_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.linear)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def draw_data(rng: np.random.Generator, kind: str, scale: float, n: int, m: int, shape: tuple[int, ...]):
    """(x (n rows), background (m rows), spare (1 row)) of one input, float32, in units of ``scale``."""
    if kind == "grid":
        rows = rng.integers(-3, 4, size=(n + m + 1, *shape)) * 0.5
    else:
        rows = rng.normal(size=(n + m + 1, *shape)) + rng.normal(scale=0.5, size=shape)
    rows = rows * scale
    background, x, spare = rows[:m], rows[m:m + n], rows[m + n:]
    if kind == "near":  # each sample within 1e-4·scale of a reference row
        x = background[np.arange(n) % m] + 1e-4 * scale * rng.normal(size=x.shape)
    elif kind == "ties":  # about half the features of each sample equal to a reference row's
        same = rng.uniform(size=x.shape) < 0.5
        x = np.where(same, background[np.arange(n) % m], x)
    return tuple(np.asarray(a, np.float32) for a in (x, background, spare))


# --------------------------------------------------------------------------------------------------
# the strategy
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A graph, its data and what it was built from.

    Attributes:
        model: the float32 model (opset 20, IR 10).
        families: the families applied, in order (``FAMILIES`` keys; an unused second input is joined at the
            end as "residual" or "mul").
        x, background, spare: per input name, the samples (n rows), the references (m rows), one spare row.
        linear: whether the graph is affine in its inputs (only linear families).
        note: input scales and data kind, for the report.
    """

    model: onnx.ModelProto
    families: tuple[str, ...]
    x: dict[str, np.ndarray]
    background: dict[str, np.ndarray]
    spare: dict[str, np.ndarray]
    linear: bool
    note: str = ""
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [i.name for i in self.model.graph.input]

    def __repr__(self) -> str:
        n, m = (next(iter(a.values())).shape[0] for a in (self.x, self.background))
        return (f"Case(families={list(self.families)}, n={n}, m={m}, {self.note}\n"
                f"  graph: {describe(self.model)})")


def describe(model: onnx.ModelProto) -> str:
    """One line per node: ``out = Op(inputs; attrs)`` with constants shown by shape."""
    consts = {i.name: tuple(i.dims) for i in model.graph.initializer}
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input}
    lines = [f"inputs {shapes}"]
    for node in model.graph.node:
        args = ", ".join(f"const{list(consts[i])}" if i in consts else i for i in node.input)
        attrs = ", ".join(f"{a.name}={onnx.helper.get_attribute_value(a)}" for a in node.attribute)
        lines.append(f"{node.output[0]} = {node.op_type}({args}{'; ' + attrs if attrs else ''})")
    return "\n    ".join(lines)


def _input_shape(draw) -> tuple[int, ...]:
    if draw(st.booleans()):
        return (draw(st.integers(2, 6)),)
    return draw(st.integers(1, 3)), draw(st.integers(2, 5)), draw(st.integers(2, 5))


def _finish(d: Draft, t: Tensor, inputs: list[Tensor], products: bool) -> Tensor:
    """Join inputs the chain never read (added, or multiplied if ``products``, through a linear map); cap the
    output size."""
    for unused in [i for i in inputs if not d.used(i.name)]:
        t = as_vector(d, t)
        u = dense(d, as_vector(d, unused), t.size)
        op = d.pick(["Add", "Mul"] if products else ["Add"])
        d.families.append("residual" if op == "Add" else "mul")
        scale = t.scale + u.scale if op == "Add" else t.scale * u.scale
        t = d.tensor(d.g(op, t.name, u.name), t.shape, scale)
    if t.size > MAX_OUTPUTS:
        t = dense(d, as_vector(d, t), d.integer(1, 4))
    return t


@st.composite
def cases(draw, families: Sequence[str] = tuple(FAMILIES), max_steps: int = 5) -> Case:
    """A random graph of 1..max_steps families (from ``families``) and its data (finite forward pass)."""
    d = Draft(draw, draw(st.integers(0, 2**16)))
    first = _input_shape(draw)
    shapes = [first]
    if draw(st.booleans()):
        shapes.append(first if draw(st.booleans()) else _input_shape(draw))
    scales = [10.0 ** draw(st.floats(-3, 3, allow_nan=False)) for _ in shapes]
    inputs = [d.tensor(d.g.input(f"x{i}", *shape), shape, scale)
              for i, (shape, scale) in enumerate(zip(shapes, scales))]
    t = inputs[0]
    for name in draw(st.lists(st.sampled_from(list(families)), min_size=1, max_size=max_steps)):
        before = len(d.g.nodes)
        t = FAMILIES[name].build(d, t)
        if len(d.g.nodes) > before:
            d.families.append(name)
    if not d.g.nodes:
        t = dense(d, t if len(t.shape) == 1 else as_vector(d, t), 3)
        d.families.append("matmul")
    t = _finish(d, t, inputs, products="mul" in families)
    model = d.g.model([t.name])

    n, m = draw(st.integers(2, 4)), draw(st.integers(1, 4))
    kind = draw(st.sampled_from(DATA_KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x, background, spare = {}, {}, {}
    for i, shape, scale in zip(inputs, shapes, scales):
        x[i.name], background[i.name], spare[i.name] = draw_data(rng, kind, scale, n, m, shape)
    # the scale estimates keep activations finite; what slips through (a rare overflow) is not a case
    assume(all(np.isfinite(_forward(model, data)).all() for data in (x, background, spare)))
    linear = all(FAMILIES[f].linear for f in d.families)
    return Case(model, tuple(d.families), x, background, spare, linear,
                note=f"data={kind}, input scales={[f'{s:.3g}' for s in scales]}")


def _forward(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([o.reshape(o.shape[0], -1) for o in session.run(None, data)], axis=1)


def linear_cases(max_steps: int = 5):
    """Graphs from the linear families only (affine in their inputs)."""
    return cases(families=LINEAR_FAMILIES, max_steps=max_steps)
