"""The table of supported ONNX ops, generated from the rule registry (``python -m onnxshap.support``)."""

from __future__ import annotations

from collections import defaultdict

FAMILY_NOTES = {
    "linear": "`M_in = Jᵀ M_out` (exact; biases vanish)",
    "rescale": "elementwise fusion: one rescale `Δt/Δs` per single-source region",
    "product": "2-player Shapley: `M_a = M_z ⊙ (b_x + b_r)/2`",
    "division": "2-player Shapley closed form",
    "bilinear": "`M_A = M_Z·((B_x + B_r)/2)ᵀ` (linear when one side is constant)",
    "shapley": "2-player Shapley from the four corners",
    "max-type": "cross-max routing to each window's argmax",
    "softmax": "exp → rescale, sum → linear, div → division, shared shift",
    "zero": "no multiplier flows",
    "lowered": "rewritten into the ops above before the sweep",
}


def support_table() -> str:
    """Markdown table: rule family → ops."""
    from onnxshap.lower import LOOP_OPS, RECURRENT_OPS
    from onnxshap.lower.composites import REWRITTEN_OPS
    from onnxshap.rules.elementwise import ELEMENTWISE_OPS
    from onnxshap.rules.registry import supported_ops

    families: dict[str, set[str]] = defaultdict(set)
    registered = supported_ops()
    for op, family in registered.items():
        families[family].add(op)
    families["rescale"] |= {op for op in ELEMENTWISE_OPS if op not in registered}
    families["lowered"] |= set(REWRITTEN_OPS - set(registered)) | LOOP_OPS | RECURRENT_OPS
    lines = ["| family | rule | ONNX ops |", "|---|---|---|"]
    for family, note in FAMILY_NOTES.items():
        if families.get(family):
            lines.append(f"| {family} | {note} | {', '.join(sorted(families[family]))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(support_table())
