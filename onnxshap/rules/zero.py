"""Zero family: ops whose outputs carry no multiplier (shapes, sizes, index computations).

``Shape``/``Size`` read only shapes; ``ConstantOfShape``/``Range`` build from shapes; ``ArgMax``/``ArgMin``/
``NonZero`` return integers. None of them passes a multiplier back. An integer or boolean tensor computed from
the explained values that influences the output outside an elementwise region is refused by the sweep (its
effect could not be attributed), so these rules never hide a contribution.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxshap.pairs import PairContext
from onnxshap.rules.registry import register


@register("Shape", "Size", "ConstantOfShape", "Range", "ArgMax", "ArgMin", "NonZero", family="zero")
def no_multiplier(ctx: PairContext, node: ir.Node, outs):
    return [None] * len(node.inputs)
