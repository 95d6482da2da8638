"""``graph/tiles.py``: a per-window tensor copied to its windows' elements times a per-element tensor, checked
against numpy on hand-built graphs — 1-D to 3-D windows, square and oblong kernels, leftover elements floor
mode drops (on the last axis, on the others, on both), broadcast leading axes, several seeds."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxshap.graph.builder import Builder
from onnxshap.graph.tiles import Tiles
from onnxshap.runtime import evaluate

CASES = [  # (kernel, in_size)
    ((2,), (8,)),
    ((3,), (10,)),           # last-axis leftover
    ((2, 2), (6, 8)),
    ((2, 2), (5, 7)),        # leftover on both axes
    ((3, 2), (7, 4)),        # leftover on the first axis only
    ((2, 3), (4, 8)),        # leftover on the last axis only
    ((1, 2), (3, 4)),
    ((2, 1), (4, 3)),        # kernel 1 on the last axis: no copy
    ((2, 2, 2), (4, 5, 4)),
]


def _numpy_times(small, big, kernel, in_size):
    """The definition: ``result[…, i] = small[…, i // k] · big[…, i]`` inside the covered part, 0 outside."""
    copied = small
    for axis, k in enumerate(kernel):
        copied = np.repeat(copied, k, axis=4 + axis)
    full = np.zeros(copied.shape[:4] + tuple(in_size), np.float32)
    full[(..., *(slice(0, c) for c in copied.shape[4:]))] = copied
    return full * big


def _graph(small_shape, big_shape, kernel, out_size, in_size, channels):
    small = ir.Value(name="small", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(small_shape))
    big = ir.Value(name="big", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(big_shape))
    graph = ir.Graph([small, big], [], nodes=[], opset_imports={"": 17}, name="tiles")
    tiles = Tiles(small, channels, kernel, out_size, in_size)
    result = tiles.times(Builder(graph), small, big)
    result.name = "result"
    graph.outputs.append(result)
    return ir.Model(graph, ir_version=9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("kernel", "in_size"), CASES, ids=[f"k{k}-in{s}" for k, s in CASES])
def test_tiles_times_matches_numpy(kernel, in_size, seed):
    rng = np.random.default_rng(seed)
    channels = 3
    out_size = tuple(s // k for s, k in zip(in_size, kernel))
    small = rng.standard_normal((2, 3, 4, channels, *out_size)).astype(np.float32)  # (n, m, k, C, *out)
    big = rng.standard_normal((2, 3, 1, channels, *in_size)).astype(np.float32)     # k broadcast
    model = _graph(small.shape, big.shape, kernel, out_size, in_size, channels)
    result = evaluate(model, {"small": small, "big": big}, ["result"])["result"]
    expected = _numpy_times(small, big, kernel, in_size)
    assert result.shape == expected.shape
    np.testing.assert_array_equal(result, expected)  # one product per element: exact


@pytest.mark.parametrize("seed", [0, 1])
def test_tiles_times_broadcasts_leading_axes_of_the_big_side(seed):
    """A per-sample ``big`` ((n, 1, 1, …), a one-hot) against per-pair ``small`` ((n, m, 1, …))."""
    rng = np.random.default_rng(seed)
    kernel, in_size, channels = (2, 2), (5, 6), 2
    out_size = (2, 3)
    small = rng.standard_normal((3, 4, 1, channels, *out_size)).astype(np.float32)
    big = rng.standard_normal((3, 1, 1, channels, *in_size)).astype(np.float32)
    model = _graph(small.shape, big.shape, kernel, out_size, in_size, channels)
    result = evaluate(model, {"small": small, "big": big}, ["result"])["result"]
    np.testing.assert_array_equal(result, _numpy_times(small, big, kernel, in_size))
