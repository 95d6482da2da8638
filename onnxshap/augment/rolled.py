"""Roll the backward of an unrolled recurrent chain into one ONNX ``Loop``.

Lowering unrolls an LSTM, GRU or RNN into one block of primitive ops per time step (``lower/recurrent.py``,
which tags each block). Swept node by node, every block adds ~80 backward nodes, and ONNX Runtime's session
set-up is paid per node: the augmented graph, and the cold start, grew with the sequence length. The blocks
of a chain after its first (whose zero initial state folded into constants) are one graph reading different
values, so their backward is one loop body. For the run of blocks ``j = a … b`` the loop visits ``j = b … a``:

    forward     recompute block j on the stacked ``[X; R]`` rows from its boundary values ``x_j`` (what the
                step reads from outside the chain) and ``state_{j-1}`` (what it reads from the step before)
    backward    the ordinary sweep over block j, seeded with ``M(state_j)`` carried from block j + 1 plus
                the multipliers the rest of the graph gave block j's values (``external``)
    carried     ``M(state_{j-1})``;  scan output: ``M(x_j)``

The body is built by the same sweep, rules and fusion regions as the unrolled backward, from the same forward
values computed by the same ops, so its multipliers are the unrolled ones (the tests compare them on every
recurrent model). A block is rolled only when it is provably the same graph as its neighbours: same ops,
attributes, wiring, tensor facts and fusion regions, no edge to the chain other than the state, and every
consumer outside the run visited before it in the sweep; anything else stays unrolled.
"""

from __future__ import annotations

from collections import ChainMap, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import onnx_ir as ir

from onnxshap.augment.plan import Walk
from onnxshap.graph.builder import Builder
from onnxshap.lower.recurrent import STATE_KEY, STEP_KEY
from onnxshap.pairs import Multiplier, PairContext

MIN_STEPS = 3  # a shorter run saves fewer nodes than the loop's own plumbing costs

Sweep = Callable[[PairContext, Walk, dict[str, Multiplier]], dict[str, Multiplier]]


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
        described = {p: _describe(ctx, walk, chain, blocks, p) for p in blocks}
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


def _describe(ctx: PairContext, walk: Walk, chain: str, blocks: dict, position: int) -> _Block | None:
    """The signature and boundary of block ``position`` (None: it cannot be part of a run)."""
    block = blocks[position]
    index = {node: i for i, node in enumerate(block)}
    states_before = _states(blocks.get(position - 1, []))
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
    carry_out = {role: (index[v.producer()], v.index()) for v, role in _states(block).items()}
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


# ---------------------------------------------------------------------------------------------------------
# The loop


def backward(ctx: PairContext, run: Run, multipliers: dict[str, Multiplier], sweep: Sweep) -> None:
    """Emit the loop for ``run`` and add the multipliers it gives the run's boundary values to ``multipliers``
    (which holds, on entry, everything the rest of the graph gave the run's values)."""
    b, count = ctx.build, len(run.blocks)
    template = run.blocks[0]
    positions = [(i, o) for i, node in enumerate(template) for o in range(len(node.outputs))]
    exposed = [p for p in positions if any(_at(block, p).name in multipliers for block in run.blocks)]
    boundaries = [list(role) for role in zip(*run.steps)] + [list(role) for role in zip(*run.carried)]
    forward = [_stack(b, values, "rolled_forward") for values in boundaries]
    external = [_stack(b, [_multiplier(ctx, multipliers, _at(block, p)) for block in run.blocks], "rolled_external")
                for p in exposed]
    body = _body(ctx, run, exposed, forward, external, sweep)
    initial = [ctx.zeros(_at(template, p)) for p in run.carry_out]
    results = b.op_multi("Loop", [b.ints(count), None, *initial], {"body": body}, hint="rolled",
                         num_outputs=len(initial) + len(run.steps[0]))
    for value, carried in zip(run.carried[0], results):
        carried.type, carried.shape = ir.TensorType(ir.DataType.FLOAT), _shape(ctx.p_shape(value))
        multipliers[value.name] = ctx.add(multipliers.get(value.name), carried)
    for role, scanned in enumerate(results[len(initial):]):
        for i, piece in enumerate(b.split(scanned, 0, [1] * count, hint="rolled_step")):
            value = run.steps[count - 1 - i][role]  # the loop visits the blocks last to first
            multipliers[value.name] = ctx.add(multipliers.get(value.name), b.squeeze(piece, [0]))


def _at(block: list[ir.Node], position: tuple[int, int]) -> ir.Value:
    return block[position[0]].outputs[position[1]]


def _stack(build: Builder, values: list[ir.Value], hint: str) -> ir.Value:
    """``values`` stacked on a new first axis."""
    return build.concat([build.unsqueeze(v, [0]) for v in values], 0, hint=hint)


def _multiplier(ctx: PairContext, multipliers: dict[str, Multiplier], value: ir.Value) -> ir.Value:
    """The P-form multiplier the rest of the graph gave ``value`` (zeros when none)."""
    found = multipliers.get(value.name)
    return ctx.materialize(found) if found is not None else ctx.zeros(value)


def _body(ctx: PairContext, run: Run, exposed: list, forward: list[ir.Value], external: list[ir.Value],
          sweep: Sweep) -> ir.Graph:
    """The loop body: iteration ``i`` handles block ``j = count − 1 − i`` of ``run``."""
    prefix = ctx.build.fresh_name("rolled")
    graph = ir.Graph([], [], nodes=[], name=prefix)
    build = Builder(graph, prefix, opset=ctx.build.opset)
    template = run.blocks[0]
    iteration = _input(graph, build.fresh_name("iteration"), ir.DataType.INT64, [])
    condition = _input(graph, build.fresh_name("condition"), ir.DataType.BOOL, [])
    carried = [_input(graph, build.fresh_name("carried"), ir.DataType.FLOAT, ctx.p_shape(_at(template, p)))
               for p in run.carry_out]
    block = build.op("Sub", [build.ints(len(run.blocks) - 1), iteration], hint="block")
    boundary = {value: build.op("Gather", [stacked, block], {"axis": 0}, hint="boundary")
                for value, stacked in zip(run.steps[0] + run.carried[0], forward)}
    clones, nodes = _clone(build, template, boundary)
    body_ctx = PairContext(_lowered_facts(ctx, clones), build, {clones[v].name for v in clones if ctx.is_variable(v)},
                           ctx.sizes)
    seeds: dict[str, Multiplier] = {}
    for p, value in zip(run.carry_out, carried):
        seeds[clones[_at(template, p)].name] = value
    for p, stacked in zip(exposed, external):
        name = clones[_at(template, p)].name
        seeds[name] = body_ctx.add(seeds.get(name), build.op("Gather", [stacked, block], {"axis": 0}))
    sources = {clones[value].name: clones[source] for value, source in _template_sources(template, run.sources)}
    found = sweep(body_ctx, Walk(body_ctx.variable, nodes, sources), seeds)
    _output(graph, build, condition, ir.DataType.BOOL, [])
    for value in run.carried[0] + run.steps[0]:
        inner = boundary[value]
        multiplier = found.get(inner.name)
        multiplier = body_ctx.materialize(multiplier) if multiplier is not None else body_ctx.zeros(inner)
        _output(graph, build, multiplier, ir.DataType.FLOAT, ctx.p_shape(value))
    return graph


def _template_sources(template: list[ir.Node], sources: dict[str, ir.Value]):
    for node in template:
        for value in node.outputs:
            if value.name in sources:
                yield value, sources[value.name]


def _clone(build: Builder, template: list[ir.Node], boundary: dict) -> tuple[dict, list[ir.Node]]:
    """Copy the template block's nodes into the body, reading the body's boundary values; returns the template
    value → body value map (boundary values included) and the copies, in order."""
    clones: dict[ir.Value, ir.Value] = {}
    for value, inner in boundary.items():
        inner.shape, inner.type = value.shape, value.type
        clones[value] = inner
    nodes = []
    for node in template:
        inputs = [None if v is None else clones.get(v, v) for v in node.inputs]
        outputs = build.op_multi(node.op_type, inputs, dict(node.attributes), hint=node.op_type.lower(),
                                 num_outputs=len(node.outputs))
        for value, copy in zip(node.outputs, outputs):
            copy.shape, copy.type = value.shape, value.type
            clones[value] = copy
        nodes.append(outputs[0].producer())
    return clones, nodes


def _lowered_facts(ctx: PairContext, clones: dict[ir.Value, ir.Value]):
    """The lowered model's tensor facts, with every body value described like the template value it copies."""
    lowered = ctx.lowered

    def extended(facts: dict) -> ChainMap:
        return ChainMap({copy.name: facts[value.name] for value, copy in clones.items() if value.name in facts},
                        facts)

    row_constant = {copy.name for value, copy in clones.items() if value.name in lowered.row_constant}
    return replace(lowered, shapes=extended(lowered.shapes), batch_axes=extended(lowered.batch_axes),
                   dtypes=extended(lowered.dtypes), batch_split=extended(lowered.batch_split),
                   row_constant=lowered.row_constant | row_constant)


def _input(graph: ir.Graph, name: str, dtype: ir.DataType, shape: list) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=_shape(shape))
    graph.inputs.append(value)
    return value


def _output(graph: ir.Graph, build: Builder, value: ir.Value, dtype: ir.DataType, shape: list) -> None:
    out = build.op("Identity", [value], hint="output")
    out.type, out.shape = ir.TensorType(dtype), _shape(shape)
    graph.outputs.append(out)


def _shape(dims: list) -> ir.Shape:
    return ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in dims])
