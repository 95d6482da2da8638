"""DeepExplainer: Deep SHAP for an ONNX model (or a torch / Keras model exported on the fly).

Mirrors ``shap.DeepExplainer``: construct it with a model and a background, read ``expected_value``, call
``shap_values(X)`` for arrays with shap's shapes, or ``explain(X)`` / ``ex(X)`` for an :class:`Explanation`.
The explainer only wires the pipeline's stages, in order — load → check → lower → augment → run — and the
data flows down through them once.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import onnx

from onnxshap import additivity, runtime
from onnxshap.augment.build import AugmentedModel, build_augmented
from onnxshap.augment.plan import make_plan, select_outputs
from onnxshap.augment.tokens import (
    check_context,
    context_inputs,
    explained_tensors,
    token_inputs,
    values_by_input,
    with_context,
)
from onnxshap.cache import cached_augmented, cached_export
from onnxshap.check import refuse_unknown_ops
from onnxshap.errors import UsageError
from onnxshap.explanation import Explanation
from onnxshap.files.model_files import data_path, needs_external_data, stage_model
from onnxshap.files.write import OutputSet
from onnxshap.forward64 import Float64Reference
from onnxshap.load.data import feature_names_of, feeds, first_array
from onnxshap.load.frameworks import framework_to_onnx, is_onnx_source
from onnxshap.load.model import load_model, signature
from onnxshap.lower import lower
from onnxshap.lower.row_gather import check_guards
from onnxshap.run import Checkpoint, Runner, chunking

RANK_ORDERS = ("max", "min", "max_abs")
PICKLE_FORMAT = 1  # bumped when the pickled state changes
# The default cap of max_memory. Measured (README, "Speed and memory"): warm speed is flat from 256 MiB to 1 GiB per
# call on the CNN and both LSTMs (ResNet-18 at 224²: 5 % slower than at 1 GiB), while a first call pays ~1.3 µs per
# fresh 4 KiB page of ONNX Runtime's arena: 512 MiB halves that and the peak RSS (CNN 824 → 486 MB).
DEFAULT_BUDGET = 512 << 20


def _default_budget() -> int:
    """A quarter of the physical memory, at most 512 MiB. Physical, not free memory: the budget sets the chunk
    sizes, and chunk sizes must not change from run to run (the values would move in their last bits)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return min(physical // 4, DEFAULT_BUDGET)


class DeepExplainer:
    """Deep SHAP (DeepLIFT with a background distribution) for ONNX models.

    Args:
        model: path to an ``.onnx`` file, its bytes, an ``onnx.ModelProto``, a ``torch.nn.Module``, a Keras model,
            or the path of a Keras ``.keras`` / ``.h5`` file or SavedModel folder (the last three are exported
            with ``onnxshap.converters`` on the background rows, and the export is checked numerically).
        data: the background: an array ``(m, ...)`` (numpy, torch tensor, DataFrame), or a list / dict of
            arrays for models with several inputs. The expected value is the mean model output over it.
        layer: explain this intermediate tensor (or list of tensors) instead of the graph inputs, like
            shap's ``(model, layer)``. Without it, an integer input (token ids) is explained at its embedding
            lookups and reported per token (:mod:`onnxshap.augment.tokens`): values shaped like the ids plus
            the outputs axis; the background's ids give the reference embeddings (pad-token rows: a pad
            baseline). An integer input that indexes no embedding (an attention mask) is fed as fixed context,
            not explained: it must be the same in every row of the data and the background.
        outputs: names of the graph outputs to explain (default: every float output); their features are
            flattened and concatenated into one output vector.
        device: ``"auto"`` (CUDA when it really loads), ``"cpu"`` or ``"cuda"``.
        batch_size: samples per ONNX Runtime call (default: as many as fit ``max_memory``).
        max_memory: memory budget in bytes for one ONNX Runtime call (default: a quarter of the physical RAM,
            at most 512 MiB); the runner splits samples and references (balanced: the fewest forward rows), and
            outputs only where one pair cannot hold them all, to stay inside it.
        feature_names: names of the last axis of the (single) explained input; DataFrame columns by default.
        cache: keep the augmented graph (and the export of a Keras model made of Keras layers) in the user cache
            folder, so that the next process with the same model and background shapes skips building it
            (:mod:`onnxshap.cache`; ``ONNXSHAP_CACHE=0`` turns it off everywhere).

    The explainer pickles (the model's bytes, the background, the options and the expected values; ONNX Runtime
    sessions are made again on first use), so it can be sent to a ``ProcessPoolExecutor``, Ray or Dask worker.

    Example:
        >>> ex = DeepExplainer("model.onnx", background)          # doctest: +SKIP
        >>> values = ex.shap_values(x)                               # (n, *x.shape[1:], k)  # doctest: +SKIP
    """

    def __init__(self, model, data, *, layer=None, outputs=None, device: str = "auto",
                 batch_size: int | None = None, max_memory: int | None = None, feature_names=None,
                 cache: bool = True) -> None:
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {batch_size}")
        if is_onnx_source(model):
            proto = load_model(model)
        else:
            export = functools.partial(framework_to_onnx, model, data)
            proto = load_model(cached_export(model, [np.asarray(first_array(data))], export) if cache else export())
        self._setup(proto, data, layer=layer, outputs=outputs, device=device, batch_size=batch_size,
                    max_memory=max_memory or _default_budget(), feature_names=feature_names or feature_names_of(data),
                    cache=cache)
        reference_outputs = self.runner.predict(self.background, self.max_memory)
        self._expected = reference_outputs.mean(axis=0)
        self._expected_magnitude = np.abs(reference_outputs).mean(axis=0)  # the additivity check's scale

    def _setup(self, proto: onnx.ModelProto, data, *, layer, outputs, device, batch_size, max_memory,
               feature_names, cache: bool = True) -> None:
        """Every stage up to the runner (sessions are made on first use); shared by ``__init__`` and unpickling."""
        self._options = {"layer": layer, "outputs": outputs, "device": device, "batch_size": batch_size,
                         "max_memory": max_memory, "feature_names": feature_names, "cache": cache}
        self.providers = runtime.providers_for(device)
        self.batch_size = batch_size
        self.max_memory = max_memory
        self.feature_names = feature_names
        # load
        self.proto = proto
        self.signature = signature(self.proto)
        self.input_names = self.signature.inputs
        self.background = feeds(data, self.signature, "background")
        # check, lower
        refuse_unknown_ops(self.proto)
        self.lowered = lower(self.proto, self.background)
        check_guards(self.lowered.guards, self.background, "background")
        # augment: plan and refuse now; the graph itself is built on first use
        self.layers = [layer] if isinstance(layer, str) else list(layer or [])
        self.tokens = {} if self.layers else token_inputs(self.lowered, self.input_names)
        self.context = [] if self.layers else context_inputs(self.lowered, self.input_names, self.tokens)
        check_context(self.background, self.background, self.context, "background")
        self.explained = self.layers or explained_tensors(self.input_names, self.tokens, self.context)
        self.output_names = select_outputs(self.lowered, self.signature.outputs, outputs)
        self.plan = make_plan(with_context(self.lowered, self.context), self.explained, self.output_names)
        self._augmented: AugmentedModel | None = None
        # run
        self.runner = Runner(self.lowered, self.output_names, self.providers)
        self.float64 = Float64Reference(self.lowered, self.output_names, self.background, max_memory)  # lazy
        self.n_outputs = sum(self.lowered.output_size(name) for name in self.output_names)
        self.output_labels = self._output_labels()

    # -- pickling: the model's bytes, the background and the options; sessions are made again on first use ----
    def __getstate__(self) -> dict:
        return {"format": PICKLE_FORMAT, "model": self.proto.SerializeToString(), "background": self.background,
                "options": dict(self._options, max_memory=self.max_memory, batch_size=self.batch_size),
                "expected": self._expected, "expected_magnitude": self._expected_magnitude}

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != PICKLE_FORMAT:
            raise UsageError("this pickled DeepExplainer was written by another version of onnxshap; build it again")
        self._setup(load_model(state["model"]), state["background"], **state["options"])
        self._expected, self._expected_magnitude = state["expected"], state["expected_magnitude"]

    def _output_labels(self) -> list[str]:
        labels = []
        for name in self.output_names:
            size = self.lowered.output_size(name)
            if len(self.output_names) == 1:
                labels += [str(i) for i in range(size)]
            else:
                labels += [f"{name}[{i}]" for i in range(size)] if size > 1 else [name]
        return labels

    # -- public surface ------------------------------------------------------------------------------
    @property
    def expected_value(self):
        """Mean model output over the background: an array of shape (k,), or a float for one output."""
        return float(self._expected[0]) if self.n_outputs == 1 else self._expected.copy()

    @property
    def augmented(self) -> AugmentedModel:
        """The augmented model (built on first use)."""
        if self._augmented is None:
            self._augmented = cached_augmented(self.plan, build_augmented) if self._options["cache"] else \
                build_augmented(self.plan)
        return self._augmented

    def predict(self, X) -> np.ndarray:
        """The explained outputs f(X), flattened to (n, k)."""
        return self.runner.predict(self._data(X), self.max_memory)

    def shap_values(self, X, ranked_outputs: int | None = None, output_rank_order: str = "max",
                    check_additivity: bool = True):
        """SHAP values with shap.DeepExplainer's shapes.

        Returns:
            One explained input: an array ``(n, *x.shape[1:], k)`` (``(n, *x.shape[1:])`` when the model has a
            single output and ``ranked_outputs`` is None); several: a list of such arrays. With
            ``ranked_outputs=j``: ``(values, indices)`` with ``indices`` of shape ``(n, j)``.
        """
        explanations = self._explain(X, ranked_outputs, output_rank_order, check_additivity)
        values = [e.values for e in explanations]
        if ranked_outputs is None and self.n_outputs == 1:
            values = [v[..., 0] for v in values]
        result = values[0] if len(values) == 1 else values
        if ranked_outputs is not None:
            return result, explanations[0].output_indices
        return result

    def explain(self, X, ranked_outputs: int | None = None, output_rank_order: str = "max",
                check_additivity: bool = True, progress: bool = False,
                checkpoint: Checkpoint | None = None) -> Explanation | list[Explanation]:
        """An :class:`Explanation` (a list of them when several tensors are explained).

        ``progress=True`` shows a progress bar over ONNX Runtime calls on a terminal (silent when not a TTY).
        ``checkpoint`` (see :class:`onnxshap.run.Checkpoint`) restores completed sample chunks and keeps new ones.
        """
        explanations = self._explain(X, ranked_outputs, output_rank_order, check_additivity, progress, checkpoint)
        return explanations[0] if len(explanations) == 1 else explanations

    __call__ = explain

    def save_augmented(self, path) -> Path:
        """Write the augmented model atomically to ``path``.

        Inputs: the model's inputs (the samples), ``reference/<input>`` (the background rows, any number)
        and ``output_index`` (n, k) int64; outputs: ``shap_values_<i>`` per explained tensor and
        ``prediction`` (each name gets a suffix ``_1``, ``_2``, ... when the model already uses it). The
        background is not embedded: feed it (or any other) at run time. A model whose weights pass protobuf's
        2 GB limit is written with external data: its weights go to ``path + ".data"`` beside it (load it from
        the path). Written with :mod:`onnxshap.files.write`'s rules: only a missing path or a regular file is
        replaced, and the folder must exist.
        """
        with OutputSet() as outputs:
            target = outputs.check(path, "augmented model")
            model = self.augmented.model
            side = outputs.check(data_path(target), "its weights") if needs_external_data(model) else None
            stage_model(outputs, target, model, side, ir_version=runtime.runtime_ir_version())
            outputs.commit()
        return target

    # -- the work ------------------------------------------------------------------------------------
    def _output_indices(self, predictions: np.ndarray, ranked_outputs, order: str) -> np.ndarray:
        n = predictions.shape[0]
        if ranked_outputs is None:
            return np.tile(np.arange(self.n_outputs, dtype=np.int64), (n, 1))
        if order not in RANK_ORDERS:
            raise UsageError(f"output_rank_order must be one of {', '.join(RANK_ORDERS)}, got {order!r}")
        if not 1 <= int(ranked_outputs) <= self.n_outputs:
            raise UsageError(f"ranked_outputs must be between 1 and {self.n_outputs}, got {ranked_outputs}")
        key = {"max": -predictions, "min": predictions, "max_abs": -np.abs(predictions)}[order]
        return np.argsort(key, axis=1, kind="stable")[:, : int(ranked_outputs)].astype(np.int64)

    def _explain(self, X, ranked_outputs, order, check_additivity, progress=False,
                 checkpoint=None) -> list[Explanation]:
        started = time.perf_counter()
        data = self._data(X)
        predictions_all = self.runner.predict(data, self.max_memory)
        indices = self._output_indices(predictions_all, ranked_outputs, order)
        n, k = indices.shape
        m = next(iter(self.background.values())).shape[0]
        chunks = chunking(self.augmented, n, m, k, self.max_memory, self.batch_size)
        values = self.runner.explain(self.augmented, data, self.background, indices, chunks, progress, checkpoint)
        predictions = predictions_all if ranked_outputs is None else np.take_along_axis(predictions_all, indices, 1)
        del predictions_all
        base = self._expected[indices]
        error = additivity.check_additivity(values, predictions, base, self._expected_magnitude[indices],
                                            self.output_labels, indices, enforce=check_additivity,
                                            recheck=functools.partial(self.float64.at, data))
        elapsed = time.perf_counter() - started
        common = dict(base_values=base, output_indices=indices, output_names=self.output_labels,
                      predictions=predictions, additivity_error=error)
        found = self._per_name(dict(zip(self.explained, values)), data)
        return [Explanation(values=v, data=d, feature_names=self.feature_names if len(found) == 1 else None,
                            input_name=name, extra={"seconds": elapsed, **extra}, **common)
                for name, v, d, extra in found]

    def _data(self, X) -> dict[str, np.ndarray]:
        """``X`` as checked feeds: shapes like the background's, the same context, rows the lowering fits."""
        data = feeds(X, self.signature, "data", like=self.background)
        check_guards(self.lowered.guards, data, "data")
        check_context(data, self.background, self.context, "data")
        return data

    def _per_name(self, values: dict[str, np.ndarray], data: dict[str, np.ndarray]):
        """``(name, values, data, extra)`` per explained layer or input (token inputs per token, context
        inputs not at all: :func:`onnxshap.augment.tokens.values_by_input`)."""
        if self.layers:
            layer_values = runtime.evaluate(self.lowered.model, data, self.layers)
            return [(name, values[name], layer_values[name], {}) for name in self.layers]
        return values_by_input([n for n in self.input_names if n not in self.context], self.tokens, values, data)
