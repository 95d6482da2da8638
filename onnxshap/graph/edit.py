"""Reading and editing onnx-ir graphs: constants, attributes, opsets, names, output replacement, dead code."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

DEFAULT_DOMAINS = ("", "ai.onnx")


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in DEFAULT_DOMAINS


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or Constant node), or None; graph inputs never count."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def op_attr(node: ir.Node, name: str, default=None):
    """The Python value of attribute ``name`` of ``node`` (lists for repeated values, str for strings)."""
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return value.numpy()
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return value


def opset_of(graph_or_model: ir.Graph | ir.Model) -> int:
    """The default-domain opset version a graph or model imports (0 when it imports none)."""
    imports = graph_or_model.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 0)))


def normalize_axis(axis: int, rank: int) -> int:
    """``axis`` counted from the front (ONNX allows negative axes)."""
    return axis + rank if axis < 0 else axis


def all_names(graph: ir.Graph) -> set[str]:
    """Every node, value and initializer name of ``graph`` and its subgraphs."""
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph.all_nodes():
        names.add(node.name)
        names.update(v.name for v in node.outputs)
    names.discard(None)
    return names


def unique_prefix(graph: ir.Graph, base: str) -> str:
    """A name prefix ``base`` (or ``base_k``) that no name of ``graph`` starts with (followed by ``/``)."""
    names = all_names(graph)
    prefix, k = base, 0
    while any(name.startswith(prefix + "/") for name in names):
        k += 1
        prefix = f"{base}_{k}"
    return prefix


def replace_output(old: ir.Value, new: ir.Value) -> None:
    """Make ``new`` take over every use of ``old`` — graph outputs included — and its name.

    The user's tensor names survive lowering this way: ``layer=`` and ``outputs=`` keep naming the tensor a
    LayerNorm or Softmax wrote even after it is decomposed. ``old`` is renamed out of the way. A ``new`` that
    already has a name of its own that matters (a graph input, an initializer, a graph output) keeps it;
    :func:`replace_node` routes such values through an Identity so that the original name survives too.
    """
    name = old.name
    keeps_name = new.is_graph_input() or new.is_initializer() or new.is_graph_output()
    old.name = f"{name}__replaced"
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if keeps_name:
        return
    new.name = name
    if old.shape is not None and new.shape is None:
        new.shape = old.shape.copy()
    if old.type is not None and new.type is None:
        new.type = old.type


def replace_node(node: ir.Node, new_outputs: dict[int, ir.Value]) -> None:
    """Hand ``node``'s outputs over to ``new_outputs`` (index → value) and remove ``node``.

    Each replacement takes over the original output's uses and name; a replacement that already has a role
    (a graph input, an initializer, or the stand-in for two outputs) is routed through an Identity first so
    that every original name survives.
    """
    graph = node.graph
    seen: set[int] = set()
    for index, value in new_outputs.items():
        if value.producer() is None or value.is_graph_output() or id(value) in seen:
            identity = ir.node("Identity", [value], name=f"{node.name}/out{index}")
            graph.insert_before(node, identity)
            value = identity.outputs[0]
        seen.add(id(value))
        replace_output(node.outputs[index], value)
    graph.remove(node, safe=True)


def remove_dead_inputs(graph: ir.Graph, values: Iterable[ir.Value | None]) -> None:
    """Drop what fed a replaced node once nothing reads it: initializers, and producers (recursively)."""
    stack = [v for v in values if v is not None]
    while stack:
        value = stack.pop()
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
            continue
        node = value.producer()
        if node is None or node.graph is not graph or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        stack.extend(inputs)


def remove_dead_nodes(model: ir.Model) -> None:
    """Remove nodes none of whose outputs is used, and initializers nothing reads."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)


def is_used(value: ir.Value) -> bool:
    """Whether a node reads ``value`` or it is a graph output."""
    return bool(value.uses()) or value.is_graph_output()
