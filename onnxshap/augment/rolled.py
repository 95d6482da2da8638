"""Find the recurrent steps whose backward and forward can run as one ONNX ``Loop`` each (``rolled_loops.py``).

Lowering unrolls an LSTM, GRU or RNN into one block of primitive ops per time step (``lower/recurrent.py``,
which tags each block and the nodes that compute its state). Swept node by node, every block adds ~80 backward
nodes beside its ~12 forward ones, and ONNX Runtime's session set-up is paid per node: the augmented graph, and
the cold start, grew with the sequence length. The blocks of a chain after its first (whose zero initial state
folded into constants) are one graph reading different values: a *run*, handled by one loop body.

A block joins a run only when it is provably the same graph as its neighbours — same ops, attributes, wiring,
tensor facts and fusion regions, no edge to the chain other than the tagged state — and every node outside the
run that reads one of its values comes after the whole run in the walk (so the sweep has given the run every
multiplier from outside when it reaches it). Anything else stays unrolled, as before; the values are the same
either way (the tests compare them on every recurrent variant).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx_ir as ir

from onnxshap.augment.plan import Walk
from onnxshap.lower.recurrent import STATE_KEY, STEP_KEY
from onnxshap.pairs import PairContext

MIN_STEPS = 3  # a shorter run saves fewer nodes than the loop's own plumbing costs


@dataclass
class Run:
    """Consecutive blocks of one chain that are the same graph.

    Attributes:
        blocks: per block (in the order the steps run), its walk nodes in walk order.
        steps: per block, the variable values it reads from outside the chain, by step role.
        carried: per block, the state values it reads from the block before, by carry role.
        carry_out: per carry role, ``(node, output)`` positions in a block of the value the next block reads.
        sources: fusion regions of the first block: tensor name → its region's source (a value of the block or
            one of its boundary values).
        last: the run's last node in walk order: the sweep handles the whole run there.
    """

    blocks: list[list[ir.Node]]
    steps: list[list[ir.Value]]
    carried: list[list[ir.Value]]
    carry_out: list[tuple[int, int]]
    sources: dict[str, ir.Value]
    last: ir.Node


@dataclass
class _Block:
    """What one block is, as far as rolling is concerned: its ``signature`` (equal for blocks that are the same
    graph) and its boundary values."""

    signature: tuple
    steps: list[ir.Value]
    carried: dict[str, ir.Value]
    carry_out: dict[str, tuple[int, int]]


# ---------------------------------------------------------------------------------------------------------
# Finding runs


def find_runs(ctx: PairContext, walk: Walk) -> list[Run]:
    """The runs of at least :data:`MIN_STEPS` identical blocks of every tagged chain in ``walk``."""
    chains: dict[str, dict[int, list[ir.Node]]] = defaultdict(lambda: defaultdict(list))
    for node in walk.nodes:
        step = node.metadata_props.get(STEP_KEY)
        if step:
            chain, _, position = step.rpartition("#")
            chains[chain][int(position)].append(node)
    order = {node: i for i, node in enumerate(walk.nodes)}
    runs = []
    for chain, blocks in chains.items():
        states = {p: _states(block) for p, block in blocks.items()}
        described = {p: _describe(ctx, walk, chain, blocks[p], states.get(p - 1, {}), states[p]) for p in blocks}
        for positions in _consecutive(described):
            run = _run(walk, [blocks[p] for p in positions], [described[p] for p in positions], order)
            if run is not None:
                runs.append(run)
    return runs


def _consecutive(described: dict[int, _Block | None]) -> list[list[int]]:
    """Maximal runs of consecutive positions whose blocks have one signature, at least MIN_STEPS long."""
    runs, current = [], []
    for position in sorted(described):
        block = described[position]
        if block is not None and current and position == current[-1] + 1 and \
                block.signature == described[current[-1]].signature:
            current.append(position)
            continue
        if len(current) >= MIN_STEPS:
            runs.append(current)
        current = [position] if block is not None else []
    if len(current) >= MIN_STEPS:
        runs.append(current)
    return runs


def _describe(ctx: PairContext, walk: Walk, chain: str, block: list[ir.Node], states_before: dict[ir.Value, str],
              states: dict[ir.Value, str]) -> _Block | None:
    """The signature and boundary of ``block`` (None: it cannot be part of a run), given the state values of the
    block before it and its own (:func:`_states`)."""
    index = {node: i for i, node in enumerate(block)}
    steps: list[ir.Value] = []
    carried: dict[str, ir.Value] = {}

    def reference(value: ir.Value | None) -> tuple | None:
        if value is None:
            return ("none",)
        producer = value.producer()
        if producer in index:
            return ("in", index[producer], value.index())
        if value in states_before:
            carried[states_before[value]] = value
            return ("carry", states_before[value])
        if not ctx.is_variable(value):
            return ("outer", id(value))
        if producer is not None and producer.metadata_props.get(STEP_KEY, "").rpartition("#")[0] == chain:
            return None  # reads the chain other than through the state
        if value not in steps:
            steps.append(value)
        return ("step", steps.index(value))

    shape = []
    for node in block:
        if node.domain not in ("", "ai.onnx") or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                                    for a in node.attributes.values()):
            return None
        inputs = tuple(reference(v) for v in node.inputs)
        sources = tuple(reference(walk.sources[o.name]) if o.name in walk.sources else ("own",)
                        for o in node.outputs)
        if None in inputs or None in sources or any(s[0] == "outer" for s in sources):
            return None
        shape.append((node.op_type, _attributes(node), node.metadata_props.get(STATE_KEY), inputs, sources,
                      tuple(_facts(ctx, o) for o in node.outputs)))
    carry_out = {role: (index[v.producer()], v.index()) for v, role in states.items()}
    boundary = tuple(_facts(ctx, v) for v in steps), tuple((r, _facts(ctx, v)) for r, v in sorted(carried.items()))
    return _Block((tuple(shape), boundary), steps, carried, carry_out)


def _states(block: list[ir.Node]) -> dict[ir.Value, str]:
    """The state values a block computes for the next one, with their roles (from the lowering's tags)."""
    found = {}
    for node in block:
        tag = node.metadata_props.get(STATE_KEY)
        if tag:
            role, _, output = tag.partition(":")
            found[node.outputs[int(output)]] = role
    return found


def _attributes(node: ir.Node) -> tuple:
    return tuple(sorted((name, attr.type, repr(attr.value)) for name, attr in node.attributes.items()))


def _facts(ctx: PairContext, value: ir.Value) -> tuple:
    lowered, name = ctx.lowered, value.name
    return (lowered.shapes.get(name), lowered.batch_axes.get(name), str(lowered.dtypes.get(name)),
            lowered.batch_split.get(name), name in lowered.row_constant, name in ctx.variable)


def _run(walk: Walk, blocks: list[list[ir.Node]], described: list[_Block], order: dict) -> Run | None:
    """The run of ``blocks``, or None when the rest of the walk does not let the sweep handle it in one place:
    a consumer outside the run must come after all of it (it hands the run its multipliers first)."""
    members = {node for block in blocks for node in block}
    last = max(members, key=order.__getitem__)
    for node in members:
        for value in node.outputs:
            if any(user in order and user not in members and order[user] < order[last] for user, _ in value.uses()):
                return None
    roles = sorted(described[0].carried)
    if any(role not in described[0].carry_out for role in roles):
        return None
    template = blocks[0]
    sources = {o.name: walk.sources[o.name] for node in template for o in node.outputs if o.name in walk.sources}
    return Run(blocks=blocks, steps=[d.steps for d in described],
               carried=[[d.carried[r] for r in roles] for d in described],
               carry_out=[described[0].carry_out[r] for r in roles], sources=sources, last=last)


def condense(nodes: list[ir.Node], runs: list[Run]) -> list[ir.Node | Run]:
    """The walk's nodes with each run's nodes replaced by the run, at its last node's place."""
    if not runs:
        return nodes
    member_of = {node: run for run in runs for block in run.blocks for node in block}
    return [member_of.get(node, node) for node in nodes
            if node not in member_of or node is member_of[node].last]
