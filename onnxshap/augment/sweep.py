"""The backward sweep: walk the planned nodes in reverse topological order and propagate multipliers.

Every output starts with its seed; a tensor consumed several times gets the sum of its users' multipliers;
each node either belongs to a fusion region (its exit gets one rescale to the region's source) or asks its
table entry for input multipliers. The sweep pads a rule's answer to one entry per input and, for ops that
broadcast, sums each multiplier down to its input's shape — once, here, so rules are only their math.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxshap.augment import rolled
from onnxshap.augment.fusion import Fusion
from onnxshap.augment.plan import Walk, uses_linear_rule
from onnxshap.augment.rolled_loops import backward
from onnxshap.pairs import Multiplier, PairContext
from onnxshap.rules import TABLE


def sweep(ctx: PairContext, walk: Walk, seeds: dict[str, Multiplier],
          runs: list[rolled.Run] | None = None) -> dict[str, Multiplier]:
    """Multipliers of every tensor the sweep reaches, starting from ``seeds`` (output name → multiplier).

    Each of ``runs`` (recurrent steps that are one graph, ``rolled.py``) is swept as one loop, at its place.
    """
    fusion = Fusion(ctx, walk.sources, TABLE)
    multipliers: dict[str, Multiplier] = dict(seeds)
    for node in reversed(rolled.condense(walk.nodes, runs or [])):
        if isinstance(node, rolled.Run):
            backward(ctx, node, multipliers, sweep)
            continue
        outs = [multipliers.get(o.name) for o in node.outputs]
        if all(m is None for m in outs):
            continue
        for value, m_in in _input_multipliers(ctx, fusion, node, outs):
            multipliers[value.name] = ctx.add(multipliers.get(value.name), m_in)
    return multipliers


def _input_multipliers(ctx: PairContext, fusion: Fusion, node: ir.Node, outs: list) -> list[tuple]:
    """``(input, multiplier)`` pairs for the variable inputs of ``node`` that receive a multiplier."""
    entry = TABLE[node.op_type]
    source = fusion.source_of(node.outputs[0])
    if source is not None and not uses_linear_rule(ctx, node, entry):
        return [(source, fusion.rescale(outs[0], node.outputs[0]))]
    result = list(entry.rule(ctx, node, [ctx.materialize(m) for m in outs]))
    if len(result) > len(node.inputs):
        raise AssertionError(f"rule for {node.op_type} returned {len(result)} multipliers for "
                             f"{len(node.inputs)} inputs")
    pairs = []
    for value, m_in in zip(node.inputs, result):
        if m_in is None or not ctx.is_variable(value):
            continue
        if entry.broadcasts:
            m_in = ctx.unbroadcast(m_in, node.outputs[0], value)
        pairs.append((value, m_in))
    return pairs
