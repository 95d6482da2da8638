"""Lower ``ReverseSequence`` whose every sequence length is the full length to a constant reversal.

Keras's ``go_backwards=True`` (and the backward half of ``Bidirectional``) converts through tf2onnx to
``ReverseSequence(x, sequence_lens)`` with ``sequence_lens = Expand(T, [batch])`` computed from the input's
shape: every row is reversed over all ``T`` steps. That is ``x[..., ::-1, ...]`` along the time axis, a
``Slice`` with step −1 (a linear, row-preserving selection the rule table knows).

The rewrite is taken when ``sequence_lens`` does not depend on the input values (a constant, or shape
plumbing) and equals ``T`` in every row at both probe batch sizes; a value-independent tensor that agrees at
two batch sizes is a function of the (fixed) feature shape only, as for ``fold.FoldBatchInvariant``. Lengths
computed from the data (a padding mask) or shorter than ``T`` reverse a different prefix in each row and are
refused, naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshap.errors import Refusals
from onnxshap.graph.builder import Builder
from onnxshap.graph.edit import is_default_domain, op_attr, remove_dead_inputs, replace_node
from onnxshap.lower.fold import value_dependent
from onnxshap.lower.probe import Probe

INT64_MIN = np.iinfo(np.int64).min


class ReverseFullSequences(ir.passes.InPlacePass):
    """Replace each ``ReverseSequence`` with full-length sequences by a ``Slice`` with step −1 on its time axis.

    Args:
        probe_a, probe_b: every tensor's value at the two probe batch sizes (``probe.probe_twice``).

    Raises:
        UnsupportedModelError: a ``ReverseSequence`` whose lengths come from the input values or are not all
            the full length (one error listing every such node).
    """

    def __init__(self, probe_a: Probe, probe_b: Probe) -> None:
        super().__init__()
        self.probes = (probe_a, probe_b)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if n.op_type == "ReverseSequence" and is_default_domain(n)]
        if not nodes:
            return ir.passes.PassResult(model, modified=False)
        dependent = value_dependent(graph)
        refusals = Refusals()
        builder = Builder(graph, "lower")
        for node in nodes:
            reason = self._refusal(node, dependent)
            if reason:
                refusals.add(node, reason)
                continue
            lengths = node.inputs[1]
            time_axis = int(op_attr(node, "time_axis", 0))
            reversed_ = builder.op("Slice", [node.inputs[0], builder.ints([-1]), builder.ints([INT64_MIN]),
                                             builder.ints([time_axis]), builder.ints([-1])], hint="reversed")
            replace_node(node, {0: reversed_})
            remove_dead_inputs(graph, [lengths])
        refusals.raise_if_any()
        graph.sort()
        return ir.passes.PassResult(model, modified=True)

    def _refusal(self, node: ir.Node, dependent: set[ir.Value]) -> str | None:
        """Why ``node`` is not a full reversal of every row (None when it is)."""
        x, lengths = node.inputs[0], node.inputs[1]
        if lengths in dependent:
            return ("its sequence lengths are computed from the input values (a padding mask?): each row would "
                    "reverse a different prefix; only sequences reversed over their full length are supported")
        time_axis = int(op_attr(node, "time_axis", 0))
        for probe in self.probes:
            if x.name not in probe or lengths.name not in probe:
                return "its input was not probed"
            steps = probe[x.name].shape[time_axis]
            if not np.all(probe[lengths.name] == steps):
                found = sorted({int(v) for v in np.ravel(probe[lengths.name])})
                return (f"sequence lengths {found} differ from the {steps} time steps: each row would reverse "
                        "only a prefix; only sequences reversed over their full length are supported")
        return None
