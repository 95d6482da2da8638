"""Run: forward predictions and the augmented graph on ONNX Runtime, in chunks that fit the memory budget.

One forward session (the lowered model, explained outputs only) gives predictions and the expected values;
one augmented session (any n, m, k) gives SHAP values. A run on n samples, m references and k outputs
needs about ``AugmentedModel.memory(n, m, k)`` bytes; :func:`chunking` picks the chunk sizes — outputs
split last, samples and references balanced — so that every call fits ``max_memory``. Values of reference chunks
are averaged with weights ``m_chunk / m`` (the graph returns the mean over its own references), which is exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from onnxshap import runtime
from onnxshap.augment.build import AugmentedModel
from onnxshap.errors import UsageError
from onnxshap.lower.lowered import LoweredModel

FORWARD_ROWS = 256  # rows per forward call at most; fewer when the memory budget holds fewer (Runner.predict)


@dataclass(frozen=True)
class Chunks:
    """Samples, references and outputs per augmented call."""

    samples: int
    references: int
    outputs: int


def chunking(augmented: AugmentedModel, n: int, m: int, k: int, budget: int, batch_size: int | None) -> Chunks:
    """Chunks within ``budget`` bytes, split evenly. Outputs are split only when one (sample, reference) pair
    cannot hold them all (every output chunk repeats the whole run). Samples and references are then split to
    send the fewest rows through the forward pass: every call runs it on its samples and references, so a run
    in ``S`` sample chunks and ``R`` reference chunks costs ``R·n + S·m`` rows, least when the chunks are
    balanced (the pair rows ``n·m·k`` are the same for any split). Measured on the CNN (n = 20, m = 100,
    k = 10, 2 000 pair rows per call): 14 samples × 14 references take ~160 µs per pair row, 2 × 100 ~250 µs.
    ``batch_size`` fixes the samples per call; the references are then the most that fit.

    Raises:
        UsageError: not even one (sample, reference, output) triple (or ``batch_size`` samples with one
            reference and one output) fits the budget.
    """
    memory = augmented.memory
    samples = batch_size or 1
    if memory(samples, 1, 1) > budget:
        what = ("one (sample, reference, output) triple" if batch_size is None
                else f"a batch of {batch_size} samples with one reference and one output")
        raise UsageError(
            f"{what} needs about {_size(memory(samples, 1, 1))}, more than the memory budget of {_size(budget)}; "
            "raise max_memory (--max-memory)"
            + ("" if batch_size is None else " or lower batch_size (--batch-size)"))
    outputs = _largest(lambda o: memory(samples, 1, o), k, budget)
    if batch_size is not None:
        references = _largest(lambda r: memory(samples, r, outputs), m, budget)
        return Chunks(_even(min(samples, n), n), _even(references, m), _even(outputs, k))
    samples, references = _balanced(memory, n, m, outputs, budget)
    return Chunks(samples, references, _even(outputs, k))


def _balanced(memory, n: int, m: int, outputs: int, budget: int) -> tuple[int, int]:
    """Even sample and reference chunk sizes within ``budget`` with the fewest forward rows over the run,
    ``R·n + S·m`` for S sample and R reference chunks (then the fewest calls): every number of reference
    chunks, each with the most samples that fit."""
    best = None
    for reference_calls in range(1, max(m, 1) + 1):
        references = _even(-(-m // reference_calls), m)
        if -(-m // references) != reference_calls or memory(1, references, outputs) > budget:
            continue
        samples = _even(_largest(lambda s: memory(s, references, outputs), max(n, 1), budget), n)
        sample_calls = -(-n // samples)
        key = (reference_calls * n + sample_calls * m, sample_calls * reference_calls)
        if best is None or key < best[0]:
            best = (key, samples, references)
    return best[1], best[2]


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _largest(cost, limit: int, budget: int) -> int:
    """The largest x in [1, limit] with ``cost(x) <= budget`` (cost is affine and increasing in x, cost(1) fits)."""
    step = cost(2) - cost(1)
    return limit if step <= 0 else max(1, min(limit, 1 + (budget - cost(1)) // step))


def _even(size: int, total: int) -> int:
    """The chunk size that splits ``total`` into as many chunks as ``size`` does, all of (nearly) equal size:
    ONNX Runtime's arena then reuses one set of buffers instead of holding two."""
    return -(-total // -(-total // size)) if total else size


class Checkpoint(Protocol):
    """Where :meth:`Runner.explain` keeps completed sample chunks (the CLI's ``--resume``)."""

    def restore(self, values: list[np.ndarray], chunk_size: int) -> set[int]:
        """Copy saved whole sample chunks (of ``chunk_size`` rows) into ``values``; return their first rows."""

    def save(self, start: int, stop: int, values: list[np.ndarray]) -> None:
        """Keep rows ``start:stop`` of ``values`` (a sample chunk just completed)."""


class Runner:
    """ONNX Runtime sessions for one explainer (made on first use), and the chunked runs.

    Args:
        lowered: the lowered model.
        outputs: names of the explained graph outputs (their features flattened and concatenated).
        providers: ONNX Runtime execution providers.

    Attributes:
        device: where the augmented runs keep their tensors through IO binding (``"cuda"``), or None for plain
            ``session.run`` on numpy arrays (CPU): see :func:`runtime.binding_device`.
    """

    def __init__(self, lowered: LoweredModel, outputs: list[str], providers: list[str]) -> None:
        self.lowered = lowered
        self.providers = providers
        self.outputs = outputs
        self.device = runtime.binding_device(providers)
        self._forward = None
        self._augmented = None

    def forward_session(self):
        """The forward session: the lowered model with only the explained outputs (made once)."""
        if self._forward is None:
            proto = runtime.to_proto(self.lowered.model)
            keep = [o for o in proto.graph.output if o.name in self.outputs]
            del proto.graph.output[:]
            proto.graph.output.extend(keep)
            self._forward = runtime.make_session(proto, self.providers, mode="forward")
        return self._forward

    def predict(self, feeds: dict[str, np.ndarray], budget: int | None = None) -> np.ndarray:
        """The explained outputs, flattened to (n, outputs), in float64 (written into one array as it goes).

        At most :data:`FORWARD_ROWS` rows per call, and no more than the per-row tensors of ``budget`` bytes
        hold in float32 (:meth:`LoweredModel.row_elements`: a ResNet-18 at 224² holds ~12 MB per row).
        """
        session = self.forward_session()
        rows = next(iter(feeds.values())).shape[0]
        step = FORWARD_ROWS if budget is None else \
            max(1, min(FORWARD_ROWS, budget // (4 * self.lowered.row_elements())))
        predictions = None
        for start in range(0, rows, step):
            chunk = {name: array[start:start + step] for name, array in feeds.items()}
            results = [r.reshape(r.shape[0], -1) for r in runtime.run(session, self.outputs, chunk)]
            if predictions is None:
                predictions = np.empty((rows, sum(r.shape[1] for r in results)), np.float64)
            np.concatenate(results, axis=1, out=predictions[start:start + step])
        return predictions

    def session(self, augmented: AugmentedModel):
        """The augmented model's session (made once)."""
        if self._augmented is None:
            self._augmented = runtime.make_session(augmented.session_source(), self.providers)
        return self._augmented

    def explain(self, augmented: AugmentedModel, feeds: dict[str, np.ndarray], background: dict[str, np.ndarray],
                indices: np.ndarray, chunks: Chunks, progress: bool = False,
                checkpoint: Checkpoint | None = None) -> list[np.ndarray]:
        """SHAP values per explained tensor, ``(n, *features, k)`` float32, over the whole background.

        The result arrays are allocated once and filled chunk by chunk (nothing is concatenated at the end);
        with a ``checkpoint``, sample chunks it restores are skipped and each completed one is saved.
        """
        n, k = indices.shape
        values = [np.zeros((n, *shape, k), np.float32) for shape in augmented.value_shapes]
        done = checkpoint.restore(values, chunks.samples) if checkpoint is not None else set()
        starts = [s for s in range(0, n, chunks.samples) if s not in done]
        m = _rows(background)
        references = [{augmented.references[name]: self._place(array[r:r + chunks.references])
                       for name, array in background.items()} for r in range(0, m, chunks.references)]
        per_samples = -(-k // chunks.outputs) * len(references)
        with _progress_bar(len(starts) * per_samples, progress) as bar:
            for s in starts:
                stop = min(s + chunks.samples, n)
                self._explain_samples(augmented, feeds, references, indices, chunks, values, s, stop, bar)
                if checkpoint is not None:
                    checkpoint.save(s, stop, values)
        return values

    def _place(self, array: np.ndarray):
        """A feed as the runs take it: the array itself on CPU, an OrtValue on the binding device (copied once)."""
        return array if self.device is None else runtime.on_device(array, self.device)

    def _run(self, session, names: list[str], feeds: dict) -> list[np.ndarray]:
        if self.device is None:
            return runtime.run(session, names, feeds)
        return runtime.run_bound(session, names, feeds, self.device)

    def _explain_samples(self, augmented, feeds, references, indices, chunks, values, s, stop, bar) -> None:
        """Rows ``s:stop`` of every value array, summed over the reference chunks ``references`` (their feeds,
        placed by :meth:`_place`) with weights ``m_chunk / m``."""
        session = self.session(augmented)
        k = indices.shape[1]
        m = sum(_rows(chunk) for chunk in references)
        run_feeds = {augmented.inputs[name]: self._place(feeds[name][s:stop]) for name in augmented.inputs}
        for o in range(0, k, chunks.outputs):
            run_feeds[augmented.output_index] = indices[s:stop, o:o + chunks.outputs]
            for chunk in references:
                run_feeds.update(chunk)
                results = self._run(session, augmented.values, run_feeds)
                weight = np.float32(_rows(chunk) / m)
                for store, result in zip(values, results):
                    if weight != 1:
                        result *= weight
                    store[s:stop, ..., o:o + chunks.outputs] += result
                bar.update(1)


def _rows(arrays: dict) -> int:
    """Rows of the first array (numpy or OrtValue) of a feed dictionary."""
    first = next(iter(arrays.values()))
    return first.shape[0] if isinstance(first, np.ndarray) else first.shape()[0]


class _NoBar:
    def update(self, steps: int) -> None:
        pass


@contextlib.contextmanager
def _progress_bar(steps: int, show: bool):
    """A tqdm bar over ``steps`` ONNX Runtime calls on a terminal (none when not asked, or for one call)."""
    if not show or steps < 2:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    with tqdm(total=steps, desc="onnxshap", unit="call", disable=None) as bar:
        yield bar
