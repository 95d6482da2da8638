"""Unroll ONNX ``LSTM``, ``GRU`` and ``RNN`` nodes into primitive ops, one cell per time step.

Every ``LSTM``/``GRU``/``RNN`` node (default domain) of ``model.graph`` is replaced by MatMul, Add, Sub, Mul,
Split, Concat, Unsqueeze, Transpose, Gather (constant index), Clip and the activation ops, exactly per the
ONNX operator spec, so that the DeepLIFT engine sees linear pieces (gate pre-activations), rescale pieces
(the activations) and two-player products (the gating).  Per direction ``d``, with ``Xt`` the input at step
``t``, ``H``/``C`` the previous states, ``⊙`` the elementwise product and ``clip`` applied to every gate
pre-activation when the ``clip`` attribute is set:

    LSTM (gates i, o, f, c; f=Sigmoid, g=Tanh, h=Tanh by default)
        it = f(Xt·Wiᵀ + H·Riᵀ + Pi ⊙ C + Wbi + Rbi)
        ft = f(Xt·Wfᵀ + H·Rfᵀ + Pf ⊙ C + Wbf + Rbf)        (ft = 1 − it when input_forget=1)
        ct = g(Xt·Wcᵀ + H·Rcᵀ + Wbc + Rbc)
        Ct = ft ⊙ C + it ⊙ ct
        ot = f(Xt·Woᵀ + H·Roᵀ + Po ⊙ Ct + Wbo + Rbo)
        Ht = ot ⊙ h(Ct)
    GRU (gates z, r, h; f=Sigmoid, g=Tanh by default)
        zt = f(Xt·Wzᵀ + H·Rzᵀ + Wbz + Rbz)
        rt = f(Xt·Wrᵀ + H·Rrᵀ + Wbr + Rbr)
        ht = g(Xt·Whᵀ + (rt ⊙ H)·Rhᵀ + Rbh + Wbh)          (linear_before_reset=0)
        ht = g(Xt·Whᵀ + rt ⊙ (H·Rhᵀ + Rbh) + Wbh)          (linear_before_reset=1)
        Ht = (1 − zt) ⊙ ht + zt ⊙ H
    RNN (f=Tanh by default)
        Ht = f(Xt·Wiᵀ + H·Riᵀ + Wbi + Rbi)

``X·Wᵀ + b`` is computed for the whole sequence in one MatMul and split into time steps with one Split; per
step the gates are ``xw_t + H·Rᵀ`` followed by one Split.  The reverse direction walks the steps backwards.
``Y`` stacks every step's ``H`` (``[seq, dirs, batch, hidden]``, or ``[batch, seq, dirs, hidden]`` for
``layout=1``); ``Y_h``/``Y_c`` are the last states.  Absent initial states are zeros of shape
``(1, hidden)`` that broadcast, so the batch size is never baked in.  Activation parameters follow ONNX
Runtime: ``activation_alpha``/``activation_beta`` are consumed in order only by the activations that take
them; a missing value defaults to LeakyRelu 0.01, HardSigmoid 0.2/0.5, Elu 1.0 and 0 otherwise.

Refused (one error listing every offending node): non-constant W/R/B/P, a sequence length that is not a
static integer, and ``sequence_lens`` that is not constant or not equal to the sequence length everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir

from onnxshap.errors import unsupported_nodes_error

__all__ = [
    "GraphEmitter", "constant_array", "opset_version", "remove_dead_inputs", "replace_outputs", "unique_prefix",
    "unroll_recurrent",
]

# ---------------------------------------------------------------------------------------------------------
# Graph-building helpers (shared with loops.py)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or Constant node), or None; graph inputs never count."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def opset_version(graph: ir.Graph) -> int:
    """The default-domain opset version of ``graph``."""
    imports = graph.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 21)))


def unique_prefix(graph: ir.Graph, base: str) -> str:
    """A name prefix ``base`` (or ``base_k``) that no node or value name of ``graph`` starts with + '/'."""
    names = {n.name for n in graph.all_nodes()} | {v.name for v in graph.inputs}
    names |= {v.name for n in graph.all_nodes() for v in n.outputs} | set(graph.initializers)
    names.discard(None)
    prefix, k = base, 0
    while any(name.startswith(prefix + "/") for name in names):
        k += 1
        prefix = f"{base}_{k}"
    return prefix


class GraphEmitter:
    """Collects the nodes and initializers that replace one node, named ``<prefix>/<name>``."""

    def __init__(self, graph: ir.Graph, prefix: str, dtype: ir.DataType | None = None):
        self.graph, self.prefix, self.dtype = graph, prefix, dtype
        self.opset = opset_version(graph)
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []  # registered by replace_outputs, if used
        self._consts: dict[tuple, ir.Value] = {}
        self._names: set[str] = set()

    def fresh_name(self, name: str) -> str:
        """``<prefix>/<name>``, suffixed if needed so that no two emitted names collide."""
        full, k = f"{self.prefix}/{name}", 0
        while full in self._names or full in self.graph.initializers:
            k += 1
            full = f"{self.prefix}/{name}_{k}"
        self._names.add(full)
        return full

    def op(self, op_type: str, inputs, name: str, attrs: dict | None = None, num_outputs: int = 1):
        """Append a default-domain node; returns its output (or the list of outputs if several)."""
        full = self.fresh_name(name)
        node = ir.node(op_type, list(inputs), attrs, num_outputs=num_outputs, name=full)
        dtype = self.dtype or (inputs[0].dtype if inputs and inputs[0] is not None else None)
        for i, out in enumerate(node.outputs):
            out.name = full if num_outputs == 1 else f"{full}:{i}"
            if dtype is not None:
                out.dtype = dtype
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else list(node.outputs)

    def const(self, array, name: str, dtype=None) -> ir.Value:
        """An initializer holding ``array`` (deduplicated by contents).

        Its dtype is ``dtype``, else the emitter's float dtype, else the array's own.
        """
        if dtype is None and self.dtype is not None:
            dtype = self.dtype.numpy()
        array = np.array(array, dtype=dtype, order="C")
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            full = self.fresh_name(name)
            self._consts[key] = ir.Value(
                name=full, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                const_value=ir.tensor(array, name=full))
            self.initializers.append(self._consts[key])
        return self._consts[key]

    def ints(self, values, name: str = "axes") -> ir.Value:
        """An int64 initializer (axes, split sizes, indices)."""
        return self.const(np.asarray(values, dtype=np.int64), name, np.int64)

    def squeeze(self, x: ir.Value, axes: list[int], name: str) -> ir.Value:
        """Squeeze ``axes`` (axes as an input from opset 13, as an attribute before)."""
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.ints(axes)], name)
        return self.op("Squeeze", [x], name, {"axes": axes})

    def unsqueeze(self, x: ir.Value, axes: list[int], name: str) -> ir.Value:
        """Unsqueeze ``axes`` (axes as an input from opset 13, as an attribute before)."""
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(axes)], name)
        return self.op("Unsqueeze", [x], name, {"axes": axes})

    def split(self, x: ir.Value, axis: int, sizes: list[int], name: str) -> list[ir.Value]:
        """Split ``x`` along ``axis`` into pieces of the given sizes (one node)."""
        if len(sizes) == 1:
            return [x]
        if self.opset >= 13:
            return self.op("Split", [x, self.ints(sizes, "split")], name, {"axis": axis}, len(sizes))
        return self.op("Split", [x], name, {"axis": axis, "split": list(sizes)}, len(sizes))

    def concat(self, xs: list[ir.Value], axis: int, name: str) -> ir.Value:
        """Concat along ``axis``; a single tensor is returned as is."""
        return xs[0] if len(xs) == 1 else self.op("Concat", xs, name, {"axis": axis})

    def clip(self, x: ir.Value, bound: float, name: str) -> ir.Value:
        """Clip to [-bound, bound] (constant min/max inputs from opset 11, attributes before)."""
        if self.opset >= 11:
            return self.op("Clip", [x, self.const(-bound, "clip_min"), self.const(bound, "clip_max")], name)
        return self.op("Clip", [x], name, {"min": -bound, "max": bound})


def replace_outputs(graph: ir.Graph, node: ir.Node, emitter: GraphEmitter, new: dict[int, ir.Value]) -> None:
    """Insert the emitter's nodes before ``node``, hand ``node``'s outputs over to ``new``, remove ``node``.

    The replacements take the original output names (graph outputs keep theirs); a replacement that is not a
    fresh output of the emitter, or serves two outputs, gets an Identity so that every name stays unique.
    """
    fresh = {id(out) for n in emitter.nodes for out in n.outputs}
    renames = []
    for idx, value in new.items():
        old = node.outputs[idx]
        if id(value) not in fresh:
            value = emitter.op("Identity", [value], f"out{idx}")
        fresh.discard(id(value))
        if old.shape is not None:
            value.shape = old.shape.copy()
        if old.type is not None:
            value.type = old.type
        renames.append((old, value))
    graph.insert_before(node, emitter.nodes)
    for old, value in renames:
        old.replace_all_uses_with(value, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    for old, value in renames:
        value.name = old.name
    for value in emitter.initializers:
        if value.uses():
            graph.register_initializer(value)


def remove_dead_inputs(graph: ir.Graph, values) -> None:
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


# ---------------------------------------------------------------------------------------------------------
# Activations


class _Refusal(Exception):
    """Internal: this node cannot be lowered; the message says why."""


_ACT_PARAMS = {  # name -> (takes alpha, takes beta, default alpha, default beta), as ONNX Runtime
    "relu": (0, 0, 0, 0), "tanh": (0, 0, 0, 0), "sigmoid": (0, 0, 0, 0), "softsign": (0, 0, 0, 0),
    "softplus": (0, 0, 0, 0), "affine": (1, 1, 0.0, 0.0), "leakyrelu": (1, 0, 0.01, 0),
    "thresholdedrelu": (1, 0, 0.0, 0), "scaledtanh": (1, 1, 0.0, 0.0), "hardsigmoid": (1, 1, 0.2, 0.5),
    "elu": (1, 0, 1.0, 0),
}
_ACT_OPS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softsign": "Softsign", "softplus": "Softplus"}


def _parse_activations(node: ir.Node, defaults: tuple[str, ...], n_dirs: int) -> list[list[tuple]]:
    """Per direction, the list of (name, alpha, beta) for the node's activation slots."""
    names = list(node.attributes.get_strings("activations", None) or defaults * n_dirs)
    if len(names) == len(defaults) and n_dirs == 2:
        names *= 2
    if len(names) != len(defaults) * n_dirs:
        raise _Refusal(f"expected {len(defaults) * n_dirs} activations, got {names}")
    alphas = iter(node.attributes.get_floats("activation_alpha", None) or [])
    betas = iter(node.attributes.get_floats("activation_beta", None) or [])
    parsed = []
    for name in names:
        key = name.lower()
        if key not in _ACT_PARAMS:
            raise _Refusal(f"unknown activation {name!r}")
        takes_a, takes_b, alpha, beta = _ACT_PARAMS[key]
        alpha = next(alphas, alpha) if takes_a else alpha
        beta = next(betas, beta) if takes_b else beta
        parsed.append((key, float(alpha), float(beta)))
    k = len(defaults)
    return [parsed[d * k:(d + 1) * k] for d in range(n_dirs)]


def _gate(em: GraphEmitter, pre: ir.Value, act: tuple, clip: float | None, name: str) -> ir.Value:
    """``act(clip(pre))`` for one gate; ``act`` is (name, alpha, beta) from _parse_activations."""
    if clip is not None:
        pre = em.clip(pre, clip, f"{name}_clip")
    key, alpha, beta = act
    if key in _ACT_OPS:
        return em.op(_ACT_OPS[key], [pre], name)
    if key == "affine":
        return em.op("Add", [em.op("Mul", [pre, em.const(alpha, "alpha")], f"{name}_scale"),
                             em.const(beta, "beta")], name)
    if key == "scaledtanh":
        inner = em.op("Tanh", [em.op("Mul", [pre, em.const(beta, "beta")], f"{name}_scale")], f"{name}_tanh")
        return em.op("Mul", [inner, em.const(alpha, "alpha")], name)
    if key == "hardsigmoid":
        return em.op("HardSigmoid", [pre], name, {"alpha": alpha, "beta": beta})
    op = {"leakyrelu": "LeakyRelu", "thresholdedrelu": "ThresholdedRelu", "elu": "Elu"}[key]
    return em.op(op, [pre], name, {"alpha": alpha})


# ---------------------------------------------------------------------------------------------------------
# Cells: prep turns one direction's W, R, B, P into (Wᵀ, bias added to X·Wᵀ, other arrays); cell builds a step


def _prep_lstm(w, r, b, p, hidden, node):
    """LSTM constants of one direction: Wᵀ, Wb + Rb, Rᵀ and the peepholes Pi, Po, Pf."""
    g4 = 4 * hidden
    extra = {"R_t": r.T}
    if p is not None:
        extra.update(P_i=p[:hidden], P_o=p[hidden:2 * hidden], P_f=p[2 * hidden:])
    return w.T, b[:g4] + b[g4:], extra


def _cell_lstm(em, n, xw, state, p):
    """One LSTM step from ``xw`` = Xt·Wᵀ + b and state (H, C); returns (Ht, Ct)."""
    h, c = state
    f, g, hact = p.acts
    pre = em.op("Add", [xw, em.op("MatMul", [h, p.R_t], f"{n}h_proj")], f"{n}gates_pre")
    i_pre, o_pre, f_pre, c_pre = em.split(pre, -1, [p.hidden] * 4, f"{n}gates_split")
    if p.peephole:
        i_pre = em.op("Add", [i_pre, em.op("Mul", [c, p.P_i], f"{n}input_peephole")], f"{n}input_gate_pre")
        f_pre = em.op("Add", [f_pre, em.op("Mul", [c, p.P_f], f"{n}forget_peephole")], f"{n}forget_gate_pre")
    i = _gate(em, i_pre, f, p.clip, f"{n}input_gate")
    if p.input_forget:
        fg = em.op("Sub", [em.const(1.0, "one"), i], f"{n}forget_gate")
    else:
        fg = _gate(em, f_pre, f, p.clip, f"{n}forget_gate")
    cand = _gate(em, c_pre, g, p.clip, f"{n}cell_gate")
    c_new = em.op("Add", [em.op("Mul", [fg, c], f"{n}cell_keep"), em.op("Mul", [i, cand], f"{n}cell_write")],
                  f"{n}cell")
    if p.peephole:
        o_pre = em.op("Add", [o_pre, em.op("Mul", [c_new, p.P_o], f"{n}output_peephole")],
                      f"{n}output_gate_pre")
    o = _gate(em, o_pre, f, p.clip, f"{n}output_gate")
    h_new = em.op("Mul", [o, _gate(em, c_new, hact, None, f"{n}cell_act")], f"{n}hidden")
    return h_new, c_new


def _prep_gru(w, r, b, p, hidden, node):
    """GRU constants of one direction; with linear_before_reset, Rbh stays out of the X·Wᵀ bias."""
    g3 = 3 * hidden
    wb, rb = b[:g3], b[g3:]
    if node.attributes.get_int("linear_before_reset", 0):
        bx = wb + np.concatenate([rb[:2 * hidden], np.zeros_like(rb[2 * hidden:])])
        return w.T, bx, {"R_t": r.T, "Rb_h": rb[2 * hidden:]}
    return w.T, wb + rb, {"R_zr_t": r[:2 * hidden].T, "R_h_t": r[2 * hidden:].T}


def _cell_gru(em, n, xw, state, p):
    """One GRU step from ``xw`` = Xt·Wᵀ + b and state (H,); returns (Ht,)."""
    (h,) = state
    f, g = p.acts
    hid = p.hidden
    x_zr, x_h = em.split(xw, -1, [2 * hid, hid], f"{n}x_split")
    if p.lbr:
        h_zr, h_h = em.split(em.op("MatMul", [h, p.R_t], f"{n}h_proj"), -1, [2 * hid, hid], f"{n}h_split")
        h_h = em.op("Add", [h_h, p.Rb_h], f"{n}h_proj_bias")
    else:
        h_zr = em.op("MatMul", [h, p.R_zr_t], f"{n}h_proj")
    z_pre, r_pre = em.split(em.op("Add", [x_zr, h_zr], f"{n}gates_pre"), -1, [hid, hid], f"{n}gates_split")
    z = _gate(em, z_pre, f, p.clip, f"{n}update_gate")
    r = _gate(em, r_pre, f, p.clip, f"{n}reset_gate")
    if p.lbr:
        reset = em.op("Mul", [r, h_h], f"{n}reset")
    else:
        reset = em.op("MatMul", [em.op("Mul", [r, h], f"{n}reset_hidden"), p.R_h_t], f"{n}reset")
    cand = _gate(em, em.op("Add", [x_h, reset], f"{n}candidate_pre"), g, p.clip, f"{n}candidate")
    keep = em.op("Sub", [em.const(1.0, "one"), z], f"{n}update_complement")
    h_new = em.op("Add", [em.op("Mul", [keep, cand], f"{n}hidden_new"), em.op("Mul", [z, h], f"{n}hidden_keep")],
                  f"{n}hidden")
    return (h_new,)


def _prep_rnn(w, r, b, p, hidden, node):
    """RNN constants of one direction: Wᵀ, Wb + Rb, Rᵀ."""
    return w.T, b[:hidden] + b[hidden:], {"R_t": r.T}


def _cell_rnn(em, n, xw, state, p):
    """One RNN step: Ht = f(xw + H·Rᵀ)."""
    pre = em.op("Add", [xw, em.op("MatMul", [state[0], p.R_t], f"{n}h_proj")], f"{n}hidden_pre")
    return (_gate(em, pre, p.acts[0], p.clip, f"{n}hidden"),)


@dataclass(frozen=True)
class _Kind:
    """What differs between LSTM, GRU and RNN; everything else is the shared driver."""

    gates: int
    activations: tuple[str, ...]
    prep: Callable
    cell: Callable
    states: int


_KINDS = {
    "LSTM": _Kind(4, ("Sigmoid", "Tanh", "Tanh"), _prep_lstm, _cell_lstm, 2),
    "GRU": _Kind(3, ("Sigmoid", "Tanh"), _prep_gru, _cell_gru, 1),
    "RNN": _Kind(1, ("Tanh",), _prep_rnn, _cell_rnn, 1),
}

# ---------------------------------------------------------------------------------------------------------
# Driver


def _needed(node: ir.Node, idx: int) -> bool:
    """Whether output ``idx`` of ``node`` exists and is read (by a node or as a graph output)."""
    if idx >= len(node.outputs):
        return False
    out = node.outputs[idx]
    return bool(out.uses()) or out.is_graph_output()


def _plan(node: ir.Node) -> SimpleNamespace:
    """Check the node and collect everything the rewrite needs; raises _Refusal."""
    kind = _KINDS[node.op_type]
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    x = inputs[0]
    layout = node.attributes.get_int("layout", 0)
    direction = node.attributes.get_string("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise _Refusal(f"unknown direction {direction!r}")
    n_dirs = 2 if direction == "bidirectional" else 1
    dim = x.shape[layout] if x.shape is not None and x.shape.rank() == 3 else None
    if not isinstance(dim, int) or dim < 1:
        raise _Refusal(f"the sequence length of input {x.name!r} is not static (shape {x.shape})")
    consts = {}
    for idx, label in [(1, "W"), (2, "R"), (3, "B"), (7, "P")]:
        if inputs[idx] is not None and (idx != 7 or node.op_type == "LSTM"):
            consts[label] = constant_array(inputs[idx])
            if consts[label] is None:
                raise _Refusal(f"weight {label} ({inputs[idx].name!r}) is not a constant")
    if inputs[4] is not None:
        lens = constant_array(inputs[4])
        if lens is None or not np.all(lens == dim):
            raise _Refusal(f"per-sample sequence lengths are not supported (sequence_lens {inputs[4].name!r}); "
                           f"pad every sequence to length {dim} and drop sequence_lens")
    w, r = consts["W"], consts["R"]
    hidden = node.attributes.get_int("hidden_size", r.shape[-1])
    b = consts.get("B", np.zeros((n_dirs, 2 * kind.gates * hidden), w.dtype))
    clip = node.attributes.get_float("clip", None)
    return SimpleNamespace(
        kind=kind, x=x, layout=layout, n_dirs=n_dirs, reverse=direction == "reverse", steps=dim,
        w=w, r=r, b=b, p=consts.get("P"), hidden=hidden, clip=clip,
        acts=_parse_activations(node, kind.activations, n_dirs),
        init=[inputs[5], inputs[6] if node.op_type == "LSTM" else None][:kind.states],
    )


def _initial_state(em: GraphEmitter, value, d: int, plan, name: str) -> ir.Value:
    """Direction ``d``'s slice of an initial state as ``[batch, hidden]`` (or zeros ``[1, hidden]``)."""
    axis = 1 if plan.layout else 0
    if value is None:
        return em.const(np.zeros((1, plan.hidden)), "zeros")
    array = constant_array(value)
    if array is not None:
        return em.const(np.take(array, d, axis=axis), name)
    return em.op("Gather", [value, em.ints(d, "dir_index")], name, {"axis": axis})


def _lower(graph: ir.Graph, node: ir.Node, plan) -> None:
    """Replace ``node`` by its unrolled subgraph: per direction, X·Wᵀ + b once, then one cell per step."""
    kind, hidden, steps = plan.kind, plan.hidden, plan.steps
    dtype = plan.x.dtype or ir.DataType.from_numpy(plan.w.dtype)
    em = GraphEmitter(graph, unique_prefix(graph, node.name or f"{node.op_type}"), dtype)
    x = em.op("Transpose", [plan.x], "x_time_major", {"perm": [1, 0, 2]}) if plan.layout else plan.x
    ys, finals = [], []
    for d in range(plan.n_dirs):
        backward = d == 1 or plan.reverse
        tag = ("bw/" if d else "fw/") if plan.n_dirs == 2 else ""
        w_t, bias, extra = kind.prep(plan.w[d], plan.r[d], plan.b[d],
                                     None if plan.p is None else plan.p[d], hidden, node)
        p = SimpleNamespace(hidden=hidden, clip=plan.clip, acts=plan.acts[d], peephole=plan.p is not None,
                            input_forget=node.attributes.get_int("input_forget", 0),
                            lbr=node.attributes.get_int("linear_before_reset", 0),
                            **{k: em.const(v, f"{tag}{k}") for k, v in extra.items()})
        xw = em.op("MatMul", [x, em.const(w_t, f"{tag}W_t")], f"{tag}x_proj")
        xw = em.op("Add", [xw, em.const(bias, f"{tag}bias")], f"{tag}x_proj_bias")
        pieces = em.split(xw, 0, [1] * steps, f"{tag}x_steps")
        state = tuple(_initial_state(em, v, d, plan, f"{tag}initial_{'hc'[k]}") for k, v in enumerate(plan.init))
        hs = [None] * steps
        for t in (reversed(range(steps)) if backward else range(steps)):
            state = kind.cell(em, f"{tag}t{t}/", pieces[t], state, p)
            hs[t] = state[0]
        if _needed(node, 0):
            ys.append(em.unsqueeze(em.concat(hs, 0, f"{tag}Y_steps"), [1], f"{tag}Y_dir"))
        finals.append(state)
    new = {}
    if ys:
        y = em.concat(ys, 1, "Y")
        new[0] = em.op("Transpose", [y], "Y_batch_major", {"perm": [2, 0, 1, 3]}) if plan.layout else y
    for k in range(kind.states):
        if _needed(node, k + 1):
            last = em.concat([s[k] for s in finals], 0, f"Y_{'hc'[k]}")
            new[k + 1] = em.op("Transpose", [last], f"Y_{'hc'[k]}_batch_major", {"perm": [1, 0, 2]}) \
                if plan.layout else last
    replace_outputs(graph, node, em, new)


def unroll_recurrent(model: ir.Model) -> bool:
    """Replace every LSTM, GRU and RNN node of ``model.graph`` by its unrolled primitive-op subgraph.

    Args:
        model: the model, edited in place. The sequence dim of each node's ``X`` must be a static integer.

    Returns:
        Whether any node was replaced.

    Raises:
        UnsupportedModelError: listing every recurrent node that cannot be unrolled, with the reason.
    """
    graph = model.graph
    todo, refused = [], []
    for node in graph:
        if node.domain == "" and node.op_type in _KINDS:
            try:
                todo.append((node, _plan(node)))
            except _Refusal as exc:
                refused.append((node, f"node {node.name!r}: {exc}"))
    if refused:
        raise unsupported_nodes_error([n for n, _ in refused], "; ".join(reason for _, reason in refused))
    for node, plan in todo:
        inputs = list(node.inputs)
        _lower(graph, node, plan)
        remove_dead_inputs(graph, inputs)
    if todo:
        graph.sort()
    return bool(todo)
