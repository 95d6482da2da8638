"""Replay every graph the property suite shrank a failure to (``tests/regressions/<hash>.onnx`` + ``.npz``).

``test_properties.py`` stores the minimal failing case of a hypothesis run here; each stored case is checked
against every invariant of ``property_checks.check_case`` on every run from then on, so a failure found once
stays a test. The families each graph was drawn from are part of the test id.
"""

from __future__ import annotations

import numpy as np
import property_checks as pc
import pytest

STORED = sorted(pc.REGRESSIONS.glob("*.onnx"))


def _id(path) -> str:
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as stored:
        return f"{path.stem}-{'+'.join(str(f) for f in stored['families'])}"


@pytest.mark.parametrize("path", STORED, ids=[_id(p) for p in STORED])
def test_stored_regression(path):
    """Every invariant on a stored case (its model, samples, background and spare row)."""
    pc.check_case(pc.load_case(path))


def test_regressions_round_trip(tmp_path):
    """A case stored and loaded again is the same model and the same data (what the replay relies on)."""
    import graph_strategies as gs
    from hypothesis import find, settings

    case = find(gs.cases(), lambda c: len(c.names) == 2, settings=settings(database=None, derandomize=True))
    loaded = pc.load_case(pc.save_case(case, tmp_path))
    assert loaded.model.SerializeToString() == case.model.SerializeToString()
    assert loaded.families == case.families and loaded.linear == case.linear and loaded.names == case.names
    for part in ("x", "background", "spare"):
        for name in case.names:
            np.testing.assert_array_equal(getattr(loaded, part)[name], getattr(case, part)[name])
