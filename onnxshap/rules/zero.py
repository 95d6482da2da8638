"""Zero family: ops whose outputs carry no multiplier (shapes, sizes, index computations).

``Shape``/``Size`` read only shapes; ``ConstantOfShape``/``Range`` build from shapes; ``ArgMax``/``ArgMin``/
``NonZero`` return integers. None of them passes a multiplier back. An integer or boolean tensor computed from
the explained values that influences the output outside an elementwise region is refused by the sweep (its
effect could not be attributed), so these entries never hide a contribution.
"""

from __future__ import annotations

from onnxshap.rules.table import zero

OPS = zero("Shape", "Size", "ConstantOfShape", "Range", "ArgMax", "ArgMin", "NonZero")
