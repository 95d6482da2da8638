"""The op table: every ONNX op type onnxshap explains, with its DeepLIFT rule (one entry per op type).

Assembled here, explicitly, from each family's module (``OPS`` lists); nothing registers itself on import.
The sweep, the explainability checks, the unknown-op check and the README's support table all read
:data:`TABLE`. Adding an elementwise op is one line in ``elementwise.py`` (its derivative) plus one spec in
``tests/rule_specs.py``.
"""

from __future__ import annotations

from onnxshap.lower import LOWERED_OPS
from onnxshap.rules import elementwise, layout, linear, pooling, products, softmax, zero
from onnxshap.rules.table import Family, OpRule, build_table, lowered

TABLE: dict[str, OpRule] = build_table(
    linear.OPS, layout.OPS, elementwise.OPS, products.OPS, pooling.OPS, softmax.OPS, zero.OPS,
    lowered(LOWERED_OPS),
)

__all__ = ["TABLE", "Family", "OpRule"]
