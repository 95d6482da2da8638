"""The ONNX ``Loop`` nodes of a rolled run (``rolled.py``): its backward, and its forward.

**Backward** (:func:`backward`, during the sweep). For the run's blocks ``j = a … b`` the loop visits
``j = b … a``:

    forward     recompute block j on the stacked ``[X; R]`` rows from its boundary values ``x_j`` (what the
                step reads from outside the chain) and ``state_{j-1}`` (what it reads from the step before)
    backward    the ordinary sweep over block j, seeded with ``M(state_j)`` carried from block j + 1 plus
                the multipliers the rest of the graph gave block j's values (``external``)
    carried     ``M(state_{j-1})``;  scan output: ``M(x_j)``

The body is built by the same sweep, rules and fusion regions as the unrolled backward, from the same forward
values computed by the same ops, so its multipliers are the unrolled ones.

**Forward** (:func:`roll_forward`, once the graph is complete). The run's unrolled forward nodes are replaced by
one loop over ``j = a … b`` that carries the state and scans out every block value something outside the run
reads; the unrolled nodes are left without users and removed with the other dead nodes.

Values of one role (``x_j`` over the blocks, a position's multipliers over the blocks) are stacked on a first
axis: their own when it has size 1 and is not the batch's (an unrolled step's tensors are ``(1, batch, …)``),
else a new one.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable
from dataclasses import replace

import onnx_ir as ir

from onnxshap.augment.plan import Walk
from onnxshap.augment.rolled import Run
from onnxshap.graph.builder import Builder
from onnxshap.pairs import Multiplier, PairContext

Sweep = Callable[[PairContext, Walk, dict[str, Multiplier]], dict[str, Multiplier]]
Position = tuple[int, int]  # (node, output) within a block


class _Body:
    """A loop body under construction: its graph, a builder on it, and the index of the block an iteration
    handles (``count − 1 − i`` when ``reverse``, else ``i``).

    The body's inputs are the iteration number, the condition and the carried values (:meth:`input`); its
    outputs the condition (passed through), then the carried values, then the scanned ones (:meth:`output`).
    """

    def __init__(self, ctx: PairContext, count: int, reverse: bool) -> None:
        self.ctx = ctx
        prefix = ctx.build.fresh_name("rolled")  # unique in the whole model, as ONNX requires of subgraph names
        self.graph = ir.Graph([], [], nodes=[], name=prefix)
        self.build = Builder(self.graph, prefix, opset=ctx.build.opset)
        iteration = self.input(ir.DataType.INT64, [], "iteration")
        condition = self.input(ir.DataType.BOOL, [], "condition")
        self.output(condition, ir.DataType.BOOL, [])
        self.block = self.build.op("Sub", [self.build.ints(count - 1), iteration], hint="block") if reverse \
            else iteration
        self._blocks = self.build.unsqueeze(self.block, [0], hint="blocks")  # picks keeping the stacking axis

    def input(self, dtype: ir.DataType, shape: list, hint: str) -> ir.Value:
        value = ir.Value(name=self.build.fresh_name(hint), type=ir.TensorType(dtype), shape=_shape(shape))
        self.graph.inputs.append(value)
        return value

    def output(self, value: ir.Value, dtype: ir.DataType | None = None, shape: list | None = None) -> None:
        """Append ``value`` to the outputs (through an Identity: a body output must be a value of its own)."""
        out = self.build.op("Identity", [value], hint="output")
        out.type = ir.TensorType(dtype) if dtype is not None else value.type
        out.shape = _shape(shape) if shape is not None else value.shape
        self.graph.outputs.append(out)

    def pick(self, stacked: ir.Value, like: ir.Value, hint: str) -> ir.Value:
        """This iteration's block's entry of ``stacked`` (values laid out like the forward value ``like``)."""
        index = self._blocks if _stacks_as_is(self.ctx, like) else self.block
        return self.build.op("Gather", [stacked, index], {"axis": 0}, hint=hint)


# ---------------------------------------------------------------------------------------------------------
# Backward


def backward(ctx: PairContext, run: Run, multipliers: dict[str, Multiplier], sweep: Sweep) -> None:
    """Emit the backward loop of ``run`` and add the multipliers it gives the run's boundary values to
    ``multipliers`` (which holds, on entry, everything the rest of the graph gave the run's values)."""
    b, count = ctx.build, len(run.blocks)
    template = run.blocks[0]
    exposed = [p for p in _positions(template) if any(_at(block, p).name in multipliers for block in run.blocks)]
    boundaries = [list(role) for role in zip(*run.steps)] + [list(role) for role in zip(*run.carried)]
    forward = [_stack(ctx, values, values[0], "rolled_boundary") for values in boundaries]
    external = [_stack(ctx, _external(ctx, multipliers, [_at(block, p) for block in run.blocks]),
                       _at(template, p), "rolled_external") for p in exposed]
    body = _backward_body(ctx, run, exposed, forward, external, sweep)
    initial = [ctx.zeros(_at(template, p)) for p in run.carry_out]
    results = b.op_multi("Loop", [b.ints(count), None, *initial], {"body": body}, hint="rolled_backward",
                         num_outputs=len(initial) + len(run.steps[0]))
    for value, carried in zip(run.carried[0], results):
        carried.type, carried.shape = ir.TensorType(ir.DataType.FLOAT), _shape(ctx.p_shape(value))
        multipliers[value.name] = ctx.add(multipliers.get(value.name), carried)
    for role, scanned in enumerate(results[len(initial):]):
        pieces = _pieces(ctx, scanned, run.steps[0][role], count)
        for i, piece in enumerate(pieces):
            value = run.steps[count - 1 - i][role]  # the loop visits the blocks last to first
            multipliers[value.name] = ctx.add(multipliers.get(value.name), piece)


def _backward_body(ctx: PairContext, run: Run, exposed: list[Position], forward: list[ir.Value],
                   external: list[ir.Value], sweep: Sweep) -> ir.Graph:
    """The backward loop's body: iteration ``i`` sweeps block ``j = count − 1 − i`` of ``run``."""
    template = run.blocks[0]
    body = _Body(ctx, len(run.blocks), reverse=True)
    carried = [body.input(ir.DataType.FLOAT, ctx.p_shape(_at(template, p)), "carried") for p in run.carry_out]
    boundary = {value: body.pick(stacked, value, "boundary")
                for value, stacked in zip(run.steps[0] + run.carried[0], forward)}
    clones, nodes = _clone(body.build, template, boundary)
    body_ctx = PairContext(_lowered_facts(ctx, clones), body.build,
                           {clones[v].name for v in clones if ctx.is_variable(v)}, ctx.sizes)
    seeds: dict[str, Multiplier] = {}
    for p, value in zip(run.carry_out, carried):
        seeds[clones[_at(template, p)].name] = value
    for p, stacked in zip(exposed, external):
        name = clones[_at(template, p)].name
        seeds[name] = body_ctx.add(seeds.get(name), body.pick(stacked, _at(template, p), "external"))
    sources = {clones[v].name: clones[source] for node in template for v in node.outputs
               if (source := run.sources.get(v.name)) is not None}
    found = sweep(body_ctx, Walk(body_ctx.variable, nodes, sources), seeds)
    for value in run.carried[0] + run.steps[0]:
        inner = boundary[value]
        multiplier = found.get(inner.name)
        multiplier = body_ctx.materialize(multiplier) if multiplier is not None else body_ctx.zeros(inner)
        body.output(multiplier, ir.DataType.FLOAT, ctx.p_shape(value))
    return body.graph


def _external(ctx: PairContext, multipliers: dict[str, Multiplier], values: list[ir.Value]) -> list[ir.Value]:
    """The P-form multipliers the rest of the graph gave ``values`` (one position over the blocks: the same
    facts), with one zero tensor for those it gave none."""
    zero = None
    found = []
    for value in values:
        multiplier = multipliers.get(value.name)
        if multiplier is None:
            zero = zero if zero is not None else ctx.zeros(value)
        found.append(ctx.materialize(multiplier) if multiplier is not None else zero)
    return found


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


# ---------------------------------------------------------------------------------------------------------
# Forward


def roll_forward(ctx: PairContext, run: Run) -> None:
    """Replace the run's unrolled forward by one loop: every read of a block value from outside the run (the
    graph after it, the backward loop's stacked boundary values, the unrolled backward around it) reads that
    value from the loop's scan output instead. Call once the graph is complete; the unrolled nodes are left
    without users (remove them with the other dead nodes)."""
    b, count = ctx.build, len(run.blocks)
    template = run.blocks[0]
    members = {node for block in run.blocks for node in block}
    needed = [p for p in _positions(template) if any(_outside_uses(_at(block, p), members) for block in run.blocks)]
    steps = [_stack(ctx, list(role), role[0], "rolled_steps") for role in zip(*run.steps)]
    body = _Body(ctx, count, reverse=False)
    boundary = {value: body.pick(stacked, value, "step") for value, stacked in zip(run.steps[0], steps)}
    boundary |= {value: body.input(ir.DataType.FLOAT, [], "state") for value in run.carried[0]}
    clones, _ = _clone(body.build, template, boundary)
    for p in run.carry_out + needed:
        body.output(clones[_at(template, p)])
    results = b.op_multi("Loop", [b.ints(count), None, *run.carried[0]], {"body": body.graph},
                         hint="rolled_forward", num_outputs=len(run.carry_out) + len(needed))
    for p, scanned in zip(needed, results[len(run.carry_out):]):
        for block, piece in zip(run.blocks, _pieces(ctx, scanned, _at(template, p), count)):
            value = _at(block, p)
            piece.type, piece.shape = value.type, value.shape
            for user, index in _outside_uses(value, members):
                user.replace_input_with(index, piece)


def _outside_uses(value: ir.Value, members: set[ir.Node]) -> list[tuple[ir.Node, int]]:
    return [(user, index) for user, index in value.uses() if user not in members]


# ---------------------------------------------------------------------------------------------------------
# Shared


def _positions(block: list[ir.Node]) -> list[Position]:
    return [(i, o) for i, node in enumerate(block) for o in range(len(node.outputs))]


def _at(block: list[ir.Node], position: Position) -> ir.Value:
    return block[position[0]].outputs[position[1]]


def _stacks_as_is(ctx: PairContext, value: ir.Value) -> bool:
    """Whether the blocks' copies of ``value`` stack along its own first axis: size 1 and not the batch's."""
    shape = ctx.shape(value)
    return len(shape) > 1 and shape[0] == 1 and ctx.batch_axis(value) != 0


def _stack(ctx: PairContext, values: list[ir.Value], like: ir.Value, hint: str) -> ir.Value:
    """``values`` (laid out like the forward value ``like``) stacked on the first axis."""
    build = ctx.build
    as_is = _stacks_as_is(ctx, like)
    return build.concat(values if as_is else [build.unsqueeze(v, [0]) for v in values], 0, hint=hint)


def _pieces(ctx: PairContext, scanned: ir.Value, like: ir.Value, count: int) -> list[ir.Value]:
    """A loop's scan output (iterations on a new first axis) cut back into one value per iteration."""
    b = ctx.build
    if _stacks_as_is(ctx, like):
        return b.split(b.squeeze(scanned, [1]), 0, [1] * count, hint="rolled_piece")
    return [b.squeeze(piece, [0]) for piece in b.split(scanned, 0, [1] * count, hint="rolled_piece")]


def _clone(build: Builder, template: list[ir.Node], boundary: dict) -> tuple[dict, list[ir.Node]]:
    """Copy the template block's nodes into a body, reading the body's boundary values; returns the template
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


def _shape(dims: list) -> ir.Shape:
    return ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in dims])
