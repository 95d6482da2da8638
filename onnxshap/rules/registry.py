"""The rule table: one DeepLIFT rule per ONNX op type.

A rule receives the pair context, the node, and the P-form multiplier of each output (None where no multiplier
reached it) and returns one multiplier per input (None for inputs that are constant or carry none).
A *check* returns why a node cannot be explained exactly (or None): the sweep asks every check first so that
one error lists every offending node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx_ir as ir

Multipliers = Sequence[ir.Value | None]
Rule = Callable[["PairContext", ir.Node, Multipliers], list[ir.Value | None]]  # noqa: F821
Check = Callable[["PairContext", ir.Node], str | None]  # noqa: F821

RULES: dict[str, Rule] = {}
CHECKS: dict[str, Check] = {}
FAMILIES: dict[str, str] = {}


def register(*op_types: str, family: str, check: Check | None = None):
    """Decorator: register ``rule`` for ``op_types`` under ``family`` (for docs and the support table)."""

    def wrap(rule: Rule) -> Rule:
        for op_type in op_types:
            if op_type in RULES:
                raise RuntimeError(f"two rules for {op_type}")
            RULES[op_type] = rule
            FAMILIES[op_type] = family
            if check is not None:
                CHECKS[op_type] = check
        return rule

    return wrap


def load_rules() -> None:
    """Import every rule module so its registrations run."""
    from onnxshap.rules import layout, linear, pooling, products, softmax, zero  # noqa: F401


def supported_ops() -> dict[str, str]:
    """op type → family, for the README's support table."""
    load_rules()
    return dict(sorted(FAMILIES.items()))
