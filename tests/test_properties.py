"""Property-based tests: onnxshap's invariants on random graphs from every op family (hypothesis).

Graphs and data come from ``graph_strategies.cases`` (chains and DAGs of linear maps, elementwise
nonlinearities, products, quotients, Max/Min, max-pools, LayerNorm, Softmax/LogSoftmax; inputs at scales
1e-3..1e3); the invariants are ``property_checks.check_case`` (finite values, additivity within the output's
own scale, background order and repeated references, row independence, exact values of affine graphs).

Settings (hypothesis profiles ``onnxshap-ci`` and ``onnxshap-explore``):

- ``ONNXSHAP_HYPOTHESIS_EXAMPLES``: examples of ``test_invariants`` (default 500;
  ``test_reference_invariance`` runs half as many, ``test_linear_values_exact`` a fifth).
- ``ONNXSHAP_HYPOTHESIS_PROFILE``: ``onnxshap-ci`` (default: derandomized, the same examples on every run) or
  ``onnxshap-explore`` (new random examples each run, failures kept in hypothesis' local database).
- ``ONNXSHAP_HYPOTHESIS_FAMILIES``: comma-separated ``graph_strategies.FAMILIES`` names to draw from (default:
  all), to study one family.

A failure shrinks to a minimal graph, which is stored under ``tests/regressions/`` (``<hash>.onnx`` and
``<hash>.npz``) and replayed by ``test_regressions.py`` from then on.
"""

from __future__ import annotations

import os

import graph_strategies as gs
import property_checks as pc
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis.errors import UnsatisfiedAssumption

EXAMPLES = int(os.environ.get("ONNXSHAP_HYPOTHESIS_EXAMPLES", "500"))
FAMILIES = tuple(f for f in os.environ.get("ONNXSHAP_HYPOTHESIS_FAMILIES", "").split(",") if f) or tuple(
    gs.FAMILIES)
_unknown = sorted(set(FAMILIES) - set(gs.FAMILIES))
assert not _unknown, f"ONNXSHAP_HYPOTHESIS_FAMILIES: unknown families {_unknown}; known: {list(gs.FAMILIES)}"

_COMMON = {"deadline": None, "print_blob": True, "report_multiple_bugs": False,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("onnxshap-ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("onnxshap-explore", derandomize=False, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("ONNXSHAP_HYPOTHESIS_PROFILE", "onnxshap-ci"))


def _run_keeping_failures(property_test, recorder: pc.FailureRecorder) -> None:
    with pc.keep_failures(recorder):
        property_test()


_invariants_recorder = pc.FailureRecorder()


@settings(PROFILE, max_examples=EXAMPLES)
@given(case=gs.cases(families=FAMILIES))
def _invariants(case: gs.Case) -> None:
    _invariants_recorder.check(case, references=False)


def test_invariants():
    """Finite values, additivity, row independence (and exact values where the graph is affine) on random
    graphs of every family."""
    _run_keeping_failures(_invariants, _invariants_recorder)


_references_recorder = pc.FailureRecorder()


@settings(PROFILE, max_examples=max(1, EXAMPLES // 2))
@given(case=gs.cases(families=FAMILIES))
def _references(case: gs.Case) -> None:
    _references_recorder.check(case, references=True)


def test_reference_invariance():
    """Every invariant, plus: background order does not matter and repeated references equal one (three more
    explainers per graph, so half as many examples)."""
    _run_keeping_failures(_references, _references_recorder)


_linear_recorder = pc.FailureRecorder()


@settings(PROFILE, max_examples=max(1, EXAMPLES // 5))
@given(case=gs.linear_cases())
def _linear_values(case: gs.Case) -> None:
    assert case.linear
    _linear_recorder.check(case)


def test_linear_values_exact():
    """Affine graphs (linear families only): φ = J·(x − mean r) exactly, besides every other invariant."""
    _run_keeping_failures(_linear_values, _linear_recorder)


# --------------------------------------------------------------------------------------------------
# the suite catches a wrong rule
# --------------------------------------------------------------------------------------------------


def plant_wrong_product_rule(monkeypatch) -> None:
    """Make the product rule (Mul of two variable tensors) use ``M_a = M_z ⊙ b_x`` instead of
    ``M_z ⊙ (b_x + b_r)/2`` (``M_b`` stays right). Additivity then fails by ``Δa·Δb/2`` per pair.

    The one place that knows where rules live: the op table's ``Mul`` entry.
    """
    import dataclasses

    from onnxshap.rules import TABLE
    from onnxshap.rules.linear import scale_by_constant

    def wrong_mul(ctx, node, outs):
        a, b = node.inputs
        if not (ctx.is_variable(a) and ctx.is_variable(b)):
            return scale_by_constant(ctx, node, outs[0])
        z = node.outputs[0]
        return [ctx.scale(outs[0], ctx.pair_x(b), z), ctx.scale(outs[0], ctx.pair_mean(a), z)]

    monkeypatch.setitem(TABLE, "Mul", dataclasses.replace(TABLE["Mul"], rule=wrong_mul))


def _fails(case: gs.Case) -> bool:
    """Whether ``case`` breaks an invariant (or onnxshap raises on it)."""
    try:
        pc.check_case(case, references=False)
    except UnsatisfiedAssumption:
        raise  # an ill-conditioned case: not an example at all
    except Exception:  # noqa: BLE001 - any failure counts, an engine crash included
        return True
    return False


def _only_the_plant_fails(case: gs.Case) -> bool:
    """The case fails with the planted product rule and passes with the real one."""
    with pytest.MonkeyPatch.context() as patch:
        plant_wrong_product_rule(patch)
        if not _fails(case):
            return False
    return not _fails(case)


def test_planted_wrong_product_rule_is_found(monkeypatch, tmp_path):
    """Among the same random graphs (every family) hypothesis finds, and shrinks, a graph that the suite
    fails with a wrong product rule and passes with the real one; it holds a product of two variable tensors,
    and its stored regression replays the failure while the plant is in place."""
    search = settings(PROFILE, max_examples=300, phases=[Phase.generate, Phase.shrink])
    case = find(gs.cases(), _only_the_plant_fails, settings=search)
    print(f"counterexample found with the planted rule: {case}")
    constants = {c.name for c in case.model.graph.initializer}
    products = [n for n in case.model.graph.node if n.op_type == "Mul" and not constants & set(n.input)]
    assert products, f"the counterexample has no product of two tensors: {case}"
    stored = pc.load_case(pc.save_case(case, tmp_path))
    pc.check_case(stored)  # the real rule passes the stored graph and data
    plant_wrong_product_rule(monkeypatch)
    assert _fails(stored), "the stored regression does not replay the failure"
