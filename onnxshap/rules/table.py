"""The op table's types and the helpers that make an entry one line (like JAX's ``deflinear``/``defbilinear``).

An :class:`OpRule` is everything onnxshap knows about one ONNX op type:

- ``family``: which DeepLIFT rule family it belongs to (its value is the README's note);
- ``rule(ctx, node, outs)``: the node rule. ``outs`` holds the P-form multiplier of each output (None where
  none arrived); it returns one multiplier per input, or fewer (the sweep pads with None). Rules of ops that
  broadcast (``broadcasts=True``: Add, Mul, Where, ...) return multipliers in their **output's** shape and the
  sweep sums them down to each input's shape once; other rules return their inputs' shapes;
- ``derivative(build, node, inputs, output)``: the elementwise partials ``∂y/∂inputᵢ`` as ONNX ops on the
  values of one side (samples or references), for fusion regions and four-corner slopes — an op with a
  derivative is *elementwise* and may join a fusion region;
- ``is_linear(ctx, node)``: whether the node is linear in its variable inputs here (then the linear rule, a
  pass-through, is used instead of a rescale);
- ``check(ctx, node)``: why this node cannot be explained exactly, or None.

Helpers per kind: :func:`linear`, :func:`elementwise`, :func:`shapley`, :func:`rule`, :func:`zero`,
:func:`lowered`. :func:`build_table` assembles the entries (one per op type) into the table.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from onnxshap.graph.builder import Builder
from onnxshap.pairs import Multiplier, PairContext

Rule = Callable[[PairContext, ir.Node, Sequence[Multiplier | None]], Sequence[Multiplier | None]]
Check = Callable[[PairContext, ir.Node], "str | None"]
Derivative = Callable[[Builder, ir.Node, list, ir.Value], list]
Linearity = Callable[[PairContext, ir.Node], bool]


class Family(enum.Enum):
    """Rule families; each value is the README's one-line note."""

    LINEAR = "`M_in = Jᵀ M_out` (exact; biases vanish)"
    RESCALE = "elementwise fusion: one rescale `Δt/Δs` per single-source region"
    PRODUCT = "2-player Shapley: `M_a = M_z ⊙ (b_x + b_r)/2`"
    DIVISION = "2-player Shapley closed form"
    BILINEAR = "`M_A = M_Z·((B_x + B_r)/2)ᵀ` (linear when one side is constant)"
    SHAPLEY = "2-player Shapley from the four corners"
    MAX_TYPE = "cross-max routing to each window's argmax"
    SOFTMAX = "logistic form `y_k = 1/(1 + Σ_{j≠k} e^{a_j − a_k})`: per-pair K×K factors, float64 where they cancel"
    ZERO = "no multiplier flows"
    LOWERED = "rewritten into the ops above before the sweep"

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


def never(ctx: PairContext, node: ir.Node) -> bool:
    return False


def always(ctx: PairContext, node: ir.Node) -> bool:
    return True


@dataclass(frozen=True)
class OpRule:
    """One op type's entry in the table (see the module docstring)."""

    op_type: str
    family: Family
    rule: Rule | None = None
    derivative: Derivative | None = None
    is_linear: Linearity = never
    check: Check | None = None
    broadcasts: bool = False

    @property
    def elementwise(self) -> bool:
        return self.derivative is not None


def linear(op_type: str, rule: Rule, *, check: Check | None = None, derivative: Derivative | None = None,
           broadcasts: bool = False, is_linear: Linearity = always) -> OpRule:
    """A linear op: ``M_in = Jᵀ M_out`` (an elementwise one also carries its derivative for fusion)."""
    return OpRule(op_type, Family.LINEAR, rule, derivative, is_linear, check, broadcasts)


def elementwise(op_type: str, derivative: Derivative, *, is_linear: Linearity = never) -> OpRule:
    """A nonlinear elementwise op with one variable input: no node rule of its own; its fusion region gets
    one rescale (DeepLIFT's rescale rule when the region is the op alone)."""
    return OpRule(op_type, Family.RESCALE, None, derivative, is_linear)


def shapley(op_type: str, family: Family, rule: Rule, derivative: Derivative, *, is_linear: Linearity = never,
            check: Check | None = None) -> OpRule:
    """An elementwise op of two variable inputs with a Shapley rule (product, division, four corners)."""
    return OpRule(op_type, family, rule, derivative, is_linear, check, broadcasts=True)


def rule(op_type: str, family: Family, node_rule: Rule, *, check: Check | None = None) -> OpRule:
    """A non-elementwise op with its own node rule (max-type, softmax, bilinear)."""
    return OpRule(op_type, family, node_rule, None, never, check)


def _no_multiplier(ctx: PairContext, node: ir.Node, outs) -> list:
    return []


def zero(*op_types: str) -> list[OpRule]:
    """Ops whose outputs carry no multiplier (shapes, sizes, index computations)."""
    return [OpRule(op, Family.ZERO, _no_multiplier) for op in op_types]


def lowered(op_types: Iterable[str]) -> list[OpRule]:
    """Ops that lowering rewrites into others before the sweep: listed, never swept."""
    return [OpRule(op, Family.LOWERED) for op in sorted(op_types)]


def build_table(*groups: Iterable[OpRule]) -> dict[str, OpRule]:
    """One entry per op type; two entries for one op is a bug."""
    table: dict[str, OpRule] = {}
    for group in groups:
        for entry in group:
            if entry.op_type in table:
                raise RuntimeError(f"two entries for {entry.op_type} in the op table")
            table[entry.op_type] = entry
    return dict(sorted(table.items()))
