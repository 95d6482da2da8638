"""Run: forward predictions and the augmented graph on ONNX Runtime, in chunks that fit the memory budget.

One forward session (the lowered model, explained outputs only) gives predictions and the expected values;
one augmented session (any n, m, k) gives SHAP values. A run on n samples, m references and k outputs
needs about ``AugmentedModel.memory(n, m, k)`` bytes; :func:`chunking` picks the chunk sizes — samples
first, then references, then outputs — so that every call fits ``max_memory``. Values of reference chunks
are averaged with weights ``m_chunk / m`` (the graph returns the mean over its own references), which is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxshap import runtime
from onnxshap.augment.build import AugmentedModel
from onnxshap.errors import UsageError
from onnxshap.lower.lowered import LoweredModel

FORWARD_ROWS = 256  # rows per forward call: bounds the forward session's memory


@dataclass(frozen=True)
class Chunks:
    """Samples, references and outputs per augmented call."""

    samples: int
    references: int
    outputs: int


def chunking(augmented: AugmentedModel, n: int, m: int, k: int, budget: int, batch_size: int | None) -> Chunks:
    """The largest chunks within ``budget`` bytes (``batch_size`` fixes the samples per call).

    Raises:
        UsageError: not even one (sample, reference, output) triple fits the budget.
    """
    if augmented.memory(1, 1, 1) > budget:
        raise UsageError(
            f"one (sample, reference, output) triple needs about {augmented.memory(1, 1, 1) / 2**20:.0f} MiB, more "
            f"than the memory budget of {budget / 2**20:.0f} MiB; raise max_memory (--max-memory)")
    outputs = k if augmented.memory(1, 1, k) <= budget else max(1, budget // augmented.memory(1, 1, 1))
    references = m if augmented.memory(1, m, outputs) <= budget else max(
        1, budget // augmented.memory(1, 1, outputs))
    samples = batch_size or max(1, budget // augmented.memory(1, references, outputs))
    return Chunks(min(samples, n), min(references, m), min(outputs, k))


class Runner:
    """ONNX Runtime sessions for one explainer, and the chunked runs.

    Args:
        lowered: the lowered model.
        outputs: names of the explained graph outputs (their features flattened and concatenated).
        providers: ONNX Runtime execution providers.
    """

    def __init__(self, lowered: LoweredModel, outputs: list[str], providers: list[str]) -> None:
        self.providers = providers
        self.outputs = outputs
        proto = runtime.to_proto(lowered.model)
        keep = [o for o in proto.graph.output if o.name in outputs]
        del proto.graph.output[:]
        proto.graph.output.extend(keep)
        self._forward = runtime.make_session(proto, providers)
        self._augmented = None

    def predict(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The explained outputs, flattened to (n, outputs), in float64."""
        parts = []
        rows = next(iter(feeds.values())).shape[0]
        for start in range(0, rows, FORWARD_ROWS):
            chunk = {name: array[start:start + FORWARD_ROWS] for name, array in feeds.items()}
            results = runtime.run(self._forward, self.outputs, chunk)
            parts.append(np.concatenate([r.reshape(r.shape[0], -1) for r in results], axis=1))
        return np.concatenate(parts, axis=0).astype(np.float64)

    def session(self, augmented: AugmentedModel):
        """The augmented model's session (made once)."""
        if self._augmented is None:
            self._augmented = runtime.make_session(augmented.proto, self.providers)
        return self._augmented

    def explain(self, augmented: AugmentedModel, feeds: dict[str, np.ndarray], background: dict[str, np.ndarray],
                indices: np.ndarray, chunks: Chunks, progress: bool = False) -> list[np.ndarray]:
        """SHAP values per explained tensor, ``(n, *features, k)`` float32, over the whole background."""
        session = self.session(augmented)
        n, k = indices.shape
        m = next(iter(background.values())).shape[0]
        values: list[np.ndarray] | None = None
        steps = [(s, r, o) for s in range(0, n, chunks.samples) for o in range(0, k, chunks.outputs)
                 for r in range(0, m, chunks.references)]
        for s, r, o in _progress(steps, progress):
            run_feeds = {augmented.inputs[name]: feeds[name][s:s + chunks.samples] for name in augmented.inputs}
            run_feeds.update({augmented.references[name]: array[r:r + chunks.references]
                              for name, array in background.items()})
            run_feeds[augmented.output_index] = indices[s:s + chunks.samples, o:o + chunks.outputs]
            results = runtime.run(session, augmented.values, run_feeds)
            if values is None:
                values = [np.zeros((n, *v.shape[1:-1], k), np.float32) for v in results]
            weight = np.float32(min(chunks.references, m - r) / m)
            for store, result in zip(values, results):
                store[s:s + chunks.samples, ..., o:o + chunks.outputs] += result if weight == 1 else weight * result
        return values


def _progress(steps: list, show: bool):
    if not show or len(steps) < 2:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="onnxshap", unit="chunk", disable=None)
