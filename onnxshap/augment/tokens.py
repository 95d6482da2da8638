"""Token inputs: integer ids explained at their embedding lookups and reported per token.

A token id is a category, not a quantity: ``x − r`` of two ids means nothing. What the model does with an id
is look it up in an embedding table, ``e = Gather(table, ids)`` (axis 0; the ids possibly cast, reshaped,
squeezed or flattened first). Deep SHAP explains ``e`` instead, with the embeddings of the background's ids as
the references, so that over the embedding values

    Σ φ_e  =  f(x) − mean_r f(r)

as for any explained tensor. The attribution of token ``t`` is the sum over its embedding dimensions, and over
every embedding lookup of the same input (a model may look one id up in several tables):

    φ_token[n, t, k]  =  Σ_lookups Σ_d  φ_e[n, t, d, k]

so the per-token values add up too. The background sets the reference embeddings: background rows of pad (or
mask) tokens give each token's contribution relative to padding; real sequences, relative to typical text.

The ids must reach the model only through those lookups. A value computed from the ids on another path (an
attention mask from ``ids == pad``, sequence lengths for pooling) is refused by the plan, naming its node:
such a model should take the attention mask as an input of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxshap.errors import InputDataError
from onnxshap.graph.edit import is_default_domain, normalize_axis, op_attr
from onnxshap.lower.fold import SHAPE_ONLY_OPS
from onnxshap.lower.lowered import LoweredModel

# ops through which ids reach an embedding Gather unchanged (same values, same order within a row)
ID_PASS_THROUGH = frozenset({"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})


@dataclass(frozen=True)
class Embedding:
    """One embedding lookup ``Gather(table, ids)``.

    Attributes:
        node: the Gather's name.
        output: the gathered embeddings, ``(rows, *ids_row_shape, *table.shape[1:])`` (the ids possibly
            reshaped within each row).
        dims: embedding axes at the end of ``output`` (``table`` rank − 1), summed for per-token values.
    """

    node: str
    output: str
    dims: int


@dataclass(frozen=True)
class TokenInput:
    """An integer graph input explained at its embedding lookups."""

    name: str
    embeddings: tuple[Embedding, ...]

    @property
    def tensors(self) -> list[str]:
        return [e.output for e in self.embeddings]


def _is_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def find_embeddings(lowered: LoweredModel, name: str) -> list[ir.Node]:
    """The Gathers of a constant table (axis 0) indexed by input ``name`` (through :data:`ID_PASS_THROUGH`)."""
    reached, found = {name}, []
    for node in lowered.model.graph:
        if not is_default_domain(node) or not node.inputs or node.inputs[0] is None:
            continue
        if node.op_type in ID_PASS_THROUGH and node.inputs[0].name in reached:
            reached.add(node.outputs[0].name)
        elif node.op_type == "Gather" and node.inputs[1] is not None and node.inputs[1].name in reached \
                and _is_constant(node.inputs[0]):
            rank = len(lowered.shapes[node.inputs[0].name])
            if rank >= 1 and normalize_axis(op_attr(node, "axis", 0), rank) == 0:
                found.append(node)
    return found


def token_input(lowered: LoweredModel, name: str) -> TokenInput | None:
    """The embedding lookups of integer input ``name`` (None when it has none); refuses lookups that do not
    keep the batch on an axis of their own."""
    embeddings = []
    for node in find_embeddings(lowered, name):
        out = node.outputs[0].name
        if lowered.batch_axes.get(out) != 0 or out in lowered.batch_split:
            raise InputDataError(
                f"the embedding lookup {node.name!r} of input {name!r} writes {out!r} (shape "
                f"{lowered.shapes[out]}) without the batch on its first axis of its own; pass "
                "layer=<the embedding output, reshaped to (rows, tokens, dims)> to explain it")
        embeddings.append(Embedding(node.name, out, len(lowered.shapes[node.inputs[0].name]) - 1))
    return TokenInput(name, tuple(embeddings)) if embeddings else None


def token_inputs(lowered: LoweredModel, inputs: list[str]) -> dict[str, TokenInput]:
    """The integer inputs among ``inputs`` that index embeddings, each with its lookups."""
    found = {name: token_input(lowered, name) for name in inputs
             if not np.issubdtype(lowered.dtypes[name], np.floating)}
    return {name: token for name, token in found.items() if token is not None}


def context_inputs(lowered: LoweredModel, inputs: list[str], tokens: dict[str, TokenInput]) -> list[str]:
    """Integer inputs that index no embedding (an attention mask): fed, not explained (:func:`with_context`)."""
    context = [name for name in inputs if name not in tokens and not np.issubdtype(lowered.dtypes[name], np.floating)]
    if len(context) == len(inputs):
        raise InputDataError(
            f"nothing to explain: the integer input(s) {', '.join(map(repr, context))} index no embedding (a "
            "Gather from a constant table); integer inputs are explained only through their embeddings — pass "
            "layer=<float tensor> to explain a tensor computed from them")
    return context


def with_context(lowered: LoweredModel, context: list[str]) -> LoweredModel:
    """``lowered`` with every tensor computed only from the ``context`` inputs (and constants) marked
    row-constant: the sweep reads their first row. Exact when the context inputs are the same in every row of
    the samples and the references (:func:`check_context`): then so is every tensor computed from them alone,
    and it is a constant of each pair, like a weight."""
    if not context:
        return lowered
    origin = {v.name: frozenset([v.name]) for v in lowered.model.graph.inputs}
    for node in lowered.model.graph:
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        found = frozenset().union(*(origin.get(v.name, frozenset()) for v in node.inputs if v is not None))
        for out in node.outputs:
            origin[out.name] = found
    rows = {name for name, sources in origin.items()
            if sources and sources <= set(context) and isinstance(lowered.batch_axes.get(name), int)
            and name not in lowered.batch_split}
    return dataclasses.replace(lowered, row_constant=lowered.row_constant | rows)


def check_context(data: dict[str, np.ndarray], background: dict[str, np.ndarray], context: list[str],
                  what: str) -> None:
    """Refuse context inputs whose rows differ (within ``data``, or from the background's rows)."""
    for name in context:
        reference = background[name][:1]
        for where, array in ((what, data[name]), ("background", background[name])):
            differs = np.flatnonzero((array != reference).reshape(len(array), -1).any(axis=1))
            if differs.size:
                raise InputDataError(
                    f"{where} for input {name!r}: row {int(differs[0])} differs from background row 0; {name!r} is "
                    "an integer input that indexes no embedding (an attention mask), fed to the model as fixed "
                    "context, so it must be the same in every row of the data and the background — explain rows "
                    "with one mask at a time, against a background with that mask")


def explained_tensors(inputs: list[str], tokens: dict[str, TokenInput], context: list[str]) -> list[str]:
    """What the sweep explains for ``inputs``: a float input itself, a token input its embedding outputs, a
    context input nothing."""
    explained: list[str] = []
    for name in inputs:
        if name not in context:
            explained += tokens[name].tensors if name in tokens else [name]
    return explained


def per_token(token: TokenInput, values: dict[str, np.ndarray], ids_shape: tuple[int, ...]) -> np.ndarray:
    """``φ_token`` shaped ``(n, *ids_shape[1:], k)``: each lookup's values summed over its embedding axes and
    put back in the ids' shape (the ids only went through reshapes), summed over the lookups."""
    total = None
    for embedding in token.embeddings:
        phi = values[embedding.output]  # (n, *row_shape, *embedding dims, k)
        axes = tuple(range(phi.ndim - 1 - embedding.dims, phi.ndim - 1))
        summed = phi.astype(np.float64).sum(axis=axes).reshape(*ids_shape, phi.shape[-1])
        total = summed if total is None else total + summed
    return total.astype(np.float32)


def values_by_input(inputs: list[str], tokens: dict[str, TokenInput], values: dict[str, np.ndarray],
                    data: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray, dict]]:
    """``(input name, values, data, extra)`` per input: a float input's values as explained, a token input's
    per token (:func:`per_token`) with each embedding's own values in ``extra["embedding_values"]`` (tensor
    name → ``(n, *embedding shape, k)``)."""
    found = []
    for name in inputs:
        token = tokens.get(name)
        if token is None:
            found.append((name, values[name], data[name], {}))
        else:
            found.append((name, per_token(token, values, data[name].shape), data[name],
                          {"embedding_values": {t: values[t] for t in token.tensors}}))
    return found


def origins(graph: ir.Graph, value: ir.Value) -> list[str]:
    """The graph inputs ``value`` is computed from along edges that carry values (not shapes only)."""
    found, seen, stack = [], set(), [value]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.is_graph_input():
            found.append(current.name)
            continue
        producer = current.producer()
        if producer is not None and producer.op_type not in SHAPE_ONLY_OPS:
            stack.extend(producer.inputs)
    return sorted(found)
