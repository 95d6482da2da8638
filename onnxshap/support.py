"""The table of supported ONNX ops for the README, generated from the op table (``python -m onnxshap.support``)."""

from __future__ import annotations

from collections import defaultdict

from onnxshap.rules import TABLE
from onnxshap.rules.table import Family


def support_table() -> str:
    """Markdown table: rule family → ops."""
    families: dict[Family, list[str]] = defaultdict(list)
    for op, entry in TABLE.items():
        families[entry.family].append(op)
    lines = ["| family | rule | ONNX ops |", "|---|---|---|"]
    for family in Family:
        if families[family]:
            lines.append(f"| {family.label} | {family.value} | {', '.join(sorted(families[family]))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(support_table())
