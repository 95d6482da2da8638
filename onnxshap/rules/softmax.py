"""Softmax family: Softmax and LogSoftmax along any axis but the batch, in the logistic form.

The rule
--------
For one softmax row ``a`` (K logits) and output ``k``, write the output through its logistic form

    y_k = 1 / (1 + u_k),   u_k = Σ_{j≠k} exp(d_kj),   d_kj = a_j − a_k        (LogSoftmax: y_k = −log(1 + u_k))

and apply the ordinary rules piece by piece: the differences are linear, each ``exp`` a rescale
``h_kj = Δexp(d_kj) / Δd_kj``, the sum linear, ``1/(1+u)`` (or ``−log(1+u)``) a rescale ``g_k = Δy_k / Δu_k``.
The chain gives one factor per (output, logit) pair and per (sample, reference) pair,

    F[k, j] = g_k · h_kj   (j ≠ k),        F[k, k] = −Σ_{j≠k} F[k, j],        M_a[j] = Σ_k M_y[k] · F[k, j],

exact by construction: ``Σ_j F[k, j] Δa_j = Σ_{j≠k} F[k, j] Δd_kj = g_k Δu_k = Δy_k``. With ``ℓ = log softmax``
of each side and ``φ(t) = (1 − e^{−t}) / t`` (``φ(0) = 1``, the secant of ``exp`` over a gap ``t`` relative to its
larger end) the factors are closed forms of bounded exponents (``ℓ ≤ 0``):

- Softmax: ``g_k = −y_k^x y_k^r``, so ``F[k, j] = −exp(max(ℓ_j^x + ℓ_k^r, ℓ_k^x + ℓ_j^r)) · φ(|Δa_j − Δa_k|)``
  (symmetric in k, j, like the Jacobian ``diag(p) − p pᵀ``). ``|F| ≤ 1/4`` off the diagonal, ``|F[k, k]| ≤ 1``, so
  every value of one pair obeys ``|φ_j| ≤ |Δa_j|``.
- LogSoftmax: ``g_k = −exp(min(ℓ_k^x, ℓ_k^r)) / φ(|Δℓ_k|)`` (from ``Δy_k = Δℓ_k`` and ``Δu_k = expm1(−Δℓ_k)/p_k^r``), so
  ``F[k, j] = −exp(min(ℓ_k^x, ℓ_k^r) + max(ℓ_j^x − ℓ_k^x, ℓ_j^r − ℓ_k^r)) · φ(|Δa_j − Δa_k|) / φ(|Δℓ_k|)``, ``|F| ≤ 1``.

Where ``Δu_k = 0`` or ``Δd_kj = 0`` the closed forms are the derivatives (the slope the rescale rule takes there).
Logits masked with ``−inf`` on both sides (attention masks) get no multiplier: their factors are exactly 0.

Numerics: every exponent is ≤ 0, so nothing overflows at any logit gap (checked to gaps of 1 600). The parts that
cancel are float64 inside the graph: the float32 logits of each side are cast, and the log-softmax, the logit
differences ``Δa_j − Δa_k`` and the exponents are float64; each K×K float64 tensor is cast to float32 as soon as what
remains is well-conditioned (``exp`` of a float64 exponent; ``φ`` of a float32-rounded gap, which moves by at most
the same relative amount since ``|t φ'(t)/φ(t)| ≤ 1``). ``φ`` is evaluated without cancellation:
``(1 − w)/(−log w)`` with ``w = e^{−t}`` where ``w ≥ ½`` (Kahan's expm1 trick: the rounding of ``w`` cancels),
``(1 − w)/t`` elsewhere; measured in ONNX Runtime float32, within 1.5 ulp. ``F[k, k]`` is the float64 sum of the
float32 off-diagonal entries, rounded once, so each row of ``F`` sums to zero up to one rounding. The multiplier
stream stays float32. Measured over 10 000 random pairs with logit gaps up to 80: additivity within 6.9e-7 for
Softmax (values rounded to float32 alone give 4.4e-7; the factors in float64 throughout, 5.0e-7, cost 1.6× the
memory and 1.7× the time).

Why not the shared-shift decomposition ``e/Σe`` (``e = exp(a − s)``) with the division rule: its exact values grow
like ``e^gap``. For the pair of DESIGN.md §3a (output 2, ``Δy = −0.9945``) it gives −85.25 / +84.42 on logits 2
and 3; this rule gives −0.647 / +0.037 / −0.385 on logits 2, 3, 5.

shap's own rules differ from each other and from this one: ``deep_tf.py`` decomposes softmax into
``exp(a − max_side)``, a sum and a division and backpropagates its DeepLIFT rules through them (each side shifted by
its own maximum, then a correction ``Δ(a − max)/Δa``); ``deep_pytorch.py`` treats ``nn.Softmax`` as an elementwise
nonlinearity, ``M_i = Δy_i / Δa_i``, which ignores the coupling between logits and does not add up.

Memory: ``F`` has ``n·m·rows·K²`` elements (rows = softmax rows per sample, e.g. heads × L for attention over L
keys), K/k times the multiplier stream of the K logits; building it peaks at ~40 bytes per element (measured).
The augmented model's memory estimate counts it (:func:`factor_bytes_per_pair`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap.graph.builder import Builder
from onnxshap.graph.edit import normalize_axis, op_attr
from onnxshap.pairs import PairContext
from onnxshap.rules.table import Family, rule

FACTOR_BYTES = 40  # peak bytes per element of F while it is built (measured: K = 256, 16 rows, m = 10)


def softmax_axes(ctx: PairContext, node: ir.Node) -> list[int]:
    """The axes of ``node``'s input a softmax row runs over (opset < 13 coerces to 2-D: ``axis`` and after)."""
    rank = ctx.rank(node.inputs[0])
    default = -1 if ctx.lowered.opset >= 13 else 1
    axis = normalize_axis(op_attr(node, "axis", default), rank)
    return [axis] if ctx.lowered.opset >= 13 else list(range(axis, rank))


def _axis_check(ctx: PairContext, node: ir.Node) -> str | None:
    if ctx.batch_axis(node.inputs[0]) in softmax_axes(ctx, node):
        return f"{node.op_type} over the batch axis: rows must be explained independently"
    return None


def factor_bytes_per_pair(ctx: PairContext, node: ir.Node) -> int:
    """Peak bytes of building ``node``'s factor matrices, per (sample, reference) pair (``rows · K²`` elements)."""
    shape = ctx.shape(node.inputs[0])
    axes = softmax_axes(ctx, node)
    length = int(np.prod([shape[i] for i in axes]))
    rows = int(np.prod(shape)) // length // shape[ctx.batch_axis(node.inputs[0])]
    return FACTOR_BYTES * rows * length * length


def softmax(ctx: PairContext, node: ir.Node, outs):
    e = ctx.build
    a, y = node.inputs[0], node.outputs[0]
    shape = ctx.shape(a)
    axes = softmax_axes(ctx, node)
    length = int(np.prod([shape[i] for i in axes]))
    if length == 1:
        return [None]  # one logit per row: the output is constant
    to_last, from_last = _row_layout(ctx, a, axes)
    x64 = to_last(e.cast(ctx.pair_x(a), ir.DataType.DOUBLE))
    r64 = to_last(e.cast(ctx.pair_r(a), ir.DataType.DOUBLE))
    factor = _factor_matrix(e, x64, r64, length, log=node.op_type == "LogSoftmax")
    m_y = e.unsqueeze(to_last(ctx.expand(outs[0], y)), [-2])  # (..., 1, K): row vector per (pair, output, row)
    m_a = e.op("MatMul", [m_y, factor], hint="softmax_multiplier")
    return [ctx.collapse(from_last(m_a), a)]


def _row_layout(ctx: PairContext, a: ir.Value, axes: list[int]):
    """Functions moving the softmax row of an expanded tensor to the last axis, and back from the MatMul's
    ``(..., 1, K)`` result.

    One axis is transposed to the end; the trailing axes of an opset < 13 softmax are merged by a reshape.
    """
    e, rank = ctx.build, ctx.expanded_rank(a)
    first = ctx.expanded_axis(a, axes[0])
    if first == rank - 1 or len(axes) > 1:  # already last, or trailing axes merged: the collapse reshapes back
        merge = (lambda v: v) if len(axes) == 1 else (lambda v: e.reshape(v, [0] * first + [-1]))
        return merge, (lambda v: v)
    perm = [i for i in range(rank) if i != first] + [first]

    def back(v: ir.Value) -> ir.Value:
        return e.transpose(e.squeeze(v, [-2]), [int(i) for i in np.argsort(perm)])

    return (lambda v: e.transpose(v, perm)), back


def _factor_matrix(e: Builder, x: ir.Value, r: ir.Value, length: int, log: bool) -> ir.Value:
    """``F[..., k, j]`` (float32) from the float64 logits of each side, the softmax row (K = ``length``) last.

    The cancelling parts (log-softmax, logit differences, exponents) are float64; each K×K float64 tensor is
    cast to float32 as soon as what remains is well-conditioned: ``exp`` of a float64 exponent, and ``φ`` of a
    gap whose float32 rounding moves ``φ`` by at most the same relative amount (``|t φ'(t)/φ(t)| ≤ 1``).
    """
    lx, lr = _log_softmax(e, x), _log_softmax(e, r)

    def col(v):  # indexes k
        return e.unsqueeze(v, [-1])

    def row(v):  # indexes j
        return e.unsqueeze(v, [-2])

    def to_float(v):
        return e.cast(v, ir.DataType.FLOAT)

    delta = _difference(e, x, r)
    gap = to_float(e.op("Abs", [e.op("Sub", [row(delta), col(delta)])]))  # |Δd_kj| = |Δa_j − Δa_k|
    if not log:
        exponent = e.op("Max", [e.op("Add", [row(lx), col(lr)]), e.op("Add", [col(lx), row(lr)])])
        scale = _phi(e, gap)
    else:
        d_max = e.op("Max", [_difference(e, row(lx), col(lx)), _difference(e, row(lr), col(lr))])
        exponent = e.op("Add", [col(e.op("Min", [lx, lr])), d_max])
        change = to_float(e.op("Abs", [_difference(e, lx, lr)]))  # |Δℓ_k| = |Δy_k|
        scale = e.op("Div", [_phi(e, gap), col(_phi(e, change))])
    magnitude = to_float(e.op("Exp", [exponent]))
    off_diagonal = e.op("Mul", [e.op("Mul", [magnitude, scale]), e.const(np.eye(length, dtype=np.float32) - 1,
                                                                          "minus_off_diagonal")])
    diagonal = e.op("Mul", [e.const(np.eye(length, dtype=np.float32), "eye"),
                            to_float(e.reduce("ReduceSum", e.cast(off_diagonal, ir.DataType.DOUBLE), [-1]))])
    return e.op("Sub", [off_diagonal, diagonal], hint="softmax_factor")


def _difference(e: Builder, a: ir.Value, b: ir.Value) -> ir.Value:
    """``a − b``, and 0 where they are equal: a masked logit is ``−inf`` on both sides (an attention mask), and
    ``−inf − (−inf)`` is NaN; with the difference 0 its factors are ``exp(−inf) · φ(·) = 0``, as they must."""
    return e.op("Where", [e.op("Equal", [a, b]), e.scalar(0.0, np.float64), e.op("Sub", [a, b])])


def _log_softmax(e: Builder, v: ir.Value) -> ir.Value:
    """``v − max − log Σ exp(v − max)`` over the last axis."""
    shifted = e.op("Sub", [v, e.reduce("ReduceMax", v, [-1])])
    return e.op("Sub", [shifted, e.op("Log", [e.reduce("ReduceSum", e.op("Exp", [shifted]), [-1])])])


def _phi(e: Builder, t: ir.Value) -> ir.Value:
    """``φ(t) = (1 − e^{−t}) / t`` for ``t ≥ 0`` (float32), ``φ(0) = 1``, accurate to a few ulp for every t."""
    one = e.scalar(1.0)
    w = e.op("Exp", [e.op("Neg", [t])])
    near = e.op("GreaterOrEqual", [w, e.scalar(0.5)])
    denominator = e.op("Where", [near, e.op("Neg", [e.op("Log", [w])]), t])
    ratio = e.op("Div", [e.op("Sub", [one, w]), denominator])
    return e.op("Where", [e.op("Equal", [w, one]), one, ratio], hint="phi")


OPS = [rule(op, Family.SOFTMAX, softmax, check=_axis_check) for op in ("Softmax", "LogSoftmax")]
