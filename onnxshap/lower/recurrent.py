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
step the gate pre-activations are ``xw_t + H·Rᵀ``, activated together (each activation on the whole tensor, a
constant mask picking each gate's block: one elementwise region, one rescale per step) and then split; an LSTM
with peepholes activates each gate on its own.  The reverse direction walks the steps backwards.
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

from onnxshap.errors import Refusals
from onnxshap.graph.builder import Builder
from onnxshap.graph.edit import const_array, is_used, remove_dead_inputs, replace_node

RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})

# Node metadata the unrolled steps carry, so that the sweep can roll their backward into a loop
# (``augment/rolled.py``): the step, as ``<chain>#<position in the chain>`` (a chain is one direction of one
# node, in the order its steps run), and, on the nodes that compute the next state, ``<state role>:<output>``.
STEP_KEY = "onnxshap.recurrent_step"
STATE_KEY = "onnxshap.recurrent_state"


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


def _gate(em: Builder, pre: ir.Value, act: tuple, clip: float | None, name: str) -> ir.Value:
    """``act(clip(pre))`` for one gate; ``act`` is (name, alpha, beta) from _parse_activations."""
    if clip is not None:
        pre = em.clip(pre, clip, f"{name}_clip")
    key, alpha, beta = act
    if key in _ACT_OPS:
        return em.op(_ACT_OPS[key], [pre], hint=name)
    if key == "affine":
        return em.op("Add", [em.op("Mul", [pre, em.const(alpha, "alpha")], hint=f"{name}_scale"),
                             em.const(beta, "beta")], hint=name)
    if key == "scaledtanh":
        inner = em.op("Tanh", [em.op("Mul", [pre, em.const(beta, "beta")], hint=f"{name}_scale")], hint=f"{name}_tanh")
        return em.op("Mul", [inner, em.const(alpha, "alpha")], hint=name)
    if key == "hardsigmoid":
        return em.op("HardSigmoid", [pre], {"alpha": alpha, "beta": beta}, hint=name)
    op = {"leakyrelu": "LeakyRelu", "thresholdedrelu": "ThresholdedRelu", "elu": "Elu"}[key]
    return em.op(op, [pre], {"alpha": alpha}, hint=name)


def _gates(em: Builder, pre: ir.Value, acts: list[tuple], hidden: int, clip: float | None, name: str) -> list[ir.Value]:
    """``act_j(clip(pre_j))`` for every gate block ``j`` of ``pre``'s last axis (``hidden`` wide each).

    All gates are activated at once, before the split: each distinct activation is applied to the whole
    pre-activation and a constant mask picks each block's (``Where``). The result is one elementwise region
    with one source, so the sweep rescales every gate of a step with one factor instead of one per gate.
    """
    if clip is not None:
        pre = em.clip(pre, clip, f"{name}_clip")
    distinct = list(dict.fromkeys(acts))
    single = len(distinct) == 1
    activated = {act: _gate(em, pre, act, None, name if single else f"{name}_{act[0]}") for act in distinct}
    result = activated[distinct[0]]
    for act in distinct[1:]:
        mask = np.repeat(np.array([a == act for a in acts]), hidden)
        result = em.op("Where", [em.const(mask, f"{name}_mask"), activated[act], result], hint=name)
    return em.split(result, -1, [hidden] * len(acts), f"{name}_split")


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
    """One LSTM step from ``xw`` = Xt·Wᵀ + b and state (H, C); returns (Ht, Ct).

    Without peepholes every gate depends on the pre-activation alone, so all four are activated at once
    (:func:`_gates`); peepholes add ``P ⊙ C`` per gate (``Ct`` for the output gate), so each gate is its own.
    """
    h, c = state
    f, g, hact = p.acts
    pre = em.op("Add", [xw, em.op("MatMul", [h, p.R_t], hint=f"{n}h_proj")], hint=f"{n}gates_pre")
    if not p.peephole:
        i, o, fg, cand = _gates(em, pre, [f, f, f, g], p.hidden, p.clip, f"{n}gates")
    else:
        i_pre, o_pre, f_pre, c_pre = em.split(pre, -1, [p.hidden] * 4, f"{n}gates_split")
        i_pre = em.op("Add", [i_pre, em.op("Mul", [c, p.P_i], hint=f"{n}input_peephole")], hint=f"{n}input_gate_pre")
        f_pre = em.op("Add", [f_pre, em.op("Mul", [c, p.P_f], hint=f"{n}forget_peephole")], hint=f"{n}forget_gate_pre")
        i = _gate(em, i_pre, f, p.clip, f"{n}input_gate")
        fg = None if p.input_forget else _gate(em, f_pre, f, p.clip, f"{n}forget_gate")
        cand = _gate(em, c_pre, g, p.clip, f"{n}cell_gate")
    if p.input_forget:
        fg = em.op("Sub", [em.const(1.0, "one"), i], hint=f"{n}forget_gate")
    keep = em.op("Mul", [fg, c], hint=f"{n}cell_keep")
    c_new = em.op("Add", [keep, em.op("Mul", [i, cand], hint=f"{n}cell_write")], hint=f"{n}cell")
    if p.peephole:
        peephole = em.op("Mul", [c_new, p.P_o], hint=f"{n}output_peephole")
        o = _gate(em, em.op("Add", [o_pre, peephole], hint=f"{n}output_gate_pre"), f, p.clip, f"{n}output_gate")
    h_new = em.op("Mul", [o, _gate(em, c_new, hact, None, f"{n}cell_act")], hint=f"{n}hidden")
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
        h_zr, h_h = em.split(em.op("MatMul", [h, p.R_t], hint=f"{n}h_proj"), -1, [2 * hid, hid], f"{n}h_split")
        h_h = em.op("Add", [h_h, p.Rb_h], hint=f"{n}h_proj_bias")
    else:
        h_zr = em.op("MatMul", [h, p.R_zr_t], hint=f"{n}h_proj")
    z, r = _gates(em, em.op("Add", [x_zr, h_zr], hint=f"{n}gates_pre"), [f, f], hid, p.clip, f"{n}gates")
    if p.lbr:
        reset = em.op("Mul", [r, h_h], hint=f"{n}reset")
    else:
        reset = em.op("MatMul", [em.op("Mul", [r, h], hint=f"{n}reset_hidden"), p.R_h_t], hint=f"{n}reset")
    cand = _gate(em, em.op("Add", [x_h, reset], hint=f"{n}candidate_pre"), g, p.clip, f"{n}candidate")
    keep = em.op("Sub", [em.const(1.0, "one"), z], hint=f"{n}update_complement")
    new = em.op("Mul", [keep, cand], hint=f"{n}hidden_new")
    h_new = em.op("Add", [new, em.op("Mul", [z, h], hint=f"{n}hidden_keep")], hint=f"{n}hidden")
    return (h_new,)


def _prep_rnn(w, r, b, p, hidden, node):
    """RNN constants of one direction: Wᵀ, Wb + Rb, Rᵀ."""
    return w.T, b[:hidden] + b[hidden:], {"R_t": r.T}


def _cell_rnn(em, n, xw, state, p):
    """One RNN step: Ht = f(xw + H·Rᵀ)."""
    pre = em.op("Add", [xw, em.op("MatMul", [state[0], p.R_t], hint=f"{n}h_proj")], hint=f"{n}hidden_pre")
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
    return idx < len(node.outputs) and is_used(node.outputs[idx])


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
            consts[label] = const_array(inputs[idx])
            if consts[label] is None:
                raise _Refusal(f"weight {label} ({inputs[idx].name!r}) is not a constant")
    if inputs[4] is not None:
        lens = const_array(inputs[4])
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


def _initial_state(em: Builder, value, d: int, plan, name: str) -> ir.Value:
    """Direction ``d``'s slice of an initial state as ``[batch, hidden]`` (or zeros ``[1, hidden]``)."""
    axis = 1 if plan.layout else 0
    if value is None:
        return em.const(np.zeros((1, plan.hidden)), "zeros")
    array = const_array(value)
    if array is not None:
        return em.const(np.take(array, d, axis=axis), name)
    return em.op("Gather", [value, em.ints(d, "dir_index")], {"axis": axis}, hint=name)


def _tag_step(nodes: list[ir.Node], step: str, state: tuple[ir.Value, ...]) -> None:
    """Mark the nodes of one step (:data:`STEP_KEY`) and the producers of its state (:data:`STATE_KEY`)."""
    for node in nodes:
        node.metadata_props[STEP_KEY] = step
    for role, value in enumerate(state):
        value.producer().metadata_props[STATE_KEY] = f"{role}:{value.index()}"


def _lower(graph: ir.Graph, node: ir.Node, plan) -> None:
    """Replace ``node`` by its unrolled subgraph: per direction, X·Wᵀ + b once, then one cell per step."""
    kind, hidden, steps = plan.kind, plan.hidden, plan.steps
    dtype = plan.x.dtype or ir.DataType.from_numpy(plan.w.dtype)
    em = Builder(graph, node.name or node.op_type, dtype)
    x = em.op("Transpose", [plan.x], {"perm": [1, 0, 2]}, hint="x_time_major") if plan.layout else plan.x
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
        xw = em.op("MatMul", [x, em.const(w_t, f"{tag}W_t")], hint=f"{tag}x_proj")
        xw = em.op("Add", [xw, em.const(bias, f"{tag}bias")], hint=f"{tag}x_proj_bias")
        pieces = em.split(xw, 0, [1] * steps, f"{tag}x_steps")
        state = tuple(_initial_state(em, v, d, plan, f"{tag}initial_{'hc'[k]}") for k, v in enumerate(plan.init))
        hs = [None] * steps
        for position, t in enumerate(reversed(range(steps)) if backward else range(steps)):
            first = len(em.nodes)
            state = kind.cell(em, f"{tag}t{t}/", pieces[t], state, p)
            _tag_step(em.nodes[first:], f"{em.prefix}/{tag}#{position}", state)
            hs[t] = state[0]
        if _needed(node, 0):
            ys.append(em.unsqueeze(em.concat(hs, 0, f"{tag}Y_steps"), [1], f"{tag}Y_dir"))
        finals.append(state)
    new = {}
    if ys:
        y = em.concat(ys, 1, "Y")
        new[0] = em.op("Transpose", [y], {"perm": [2, 0, 1, 3]}, hint="Y_batch_major") if plan.layout else y
    for k in range(kind.states):
        if _needed(node, k + 1):
            last = em.concat([s[k] for s in finals], 0, f"Y_{'hc'[k]}")
            new[k + 1] = em.op("Transpose", [last], {"perm": [1, 0, 2]}, hint=f"Y_{'hc'[k]}_batch_major") \
                if plan.layout else last
    replace_node(node, new)


class UnrollRecurrent(ir.passes.InPlacePass):
    """Replace every LSTM, GRU and RNN node of the main graph by its unrolled primitive-op subgraph.

    The sequence dim of each node's ``X`` must be a static integer (the probe annotates it).

    Raises:
        UnsupportedModelError: listing every recurrent node that cannot be unrolled, with the reason.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        todo, refusals = [], Refusals()
        for node in graph:
            if node.domain == "" and node.op_type in _KINDS:
                try:
                    todo.append((node, _plan(node)))
                except _Refusal as exc:
                    refusals.add(node, f"cannot be unrolled: {exc}")
        refusals.raise_if_any()
        for node, plan in todo:
            inputs = list(node.inputs)
            _lower(graph, node, plan)
            remove_dead_inputs(graph, inputs)
        if todo:
            graph.sort()
        return ir.passes.PassResult(model, modified=bool(todo))
