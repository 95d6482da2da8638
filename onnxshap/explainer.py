"""DeepExplainer: Deep SHAP for an ONNX model (or a torch / Keras model exported on the fly).

Mirrors ``shap.DeepExplainer``: construct it with a model and a background, read ``expected_value``, call
``shap_values(X)`` for arrays with shap's shapes, or ``explain(X)`` / ``ex(X)`` for an :class:`Explanation`.
The explainer only wires the pipeline's stages, in order — load → check → lower → augment → run — and the
data flows down through them once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx

from onnxshap import additivity, runtime
from onnxshap.augment.build import AugmentedModel, build_augmented
from onnxshap.augment.plan import make_plan, select_outputs
from onnxshap.check import unknown_ops
from onnxshap.errors import OnnxRuntimeError, Refusals, UsageError
from onnxshap.explanation import Explanation
from onnxshap.files.write import write_atomic
from onnxshap.load.data import feature_names_of, feeds
from onnxshap.load.frameworks import framework_to_onnx, is_onnx_source
from onnxshap.load.model import load_model, signature
from onnxshap.lower import lower
from onnxshap.run import Runner, chunking

RANK_ORDERS = ("max", "min", "max_abs")


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class DeepExplainer:
    """Deep SHAP (DeepLIFT with a background distribution) for ONNX models.

    Args:
        model: path to an ``.onnx`` file, its bytes, an ``onnx.ModelProto``, a ``torch.nn.Module``, a Keras model,
            or the path of a Keras ``.keras`` / ``.h5`` file or SavedModel folder (the last three are exported
            with ``onnxshap.converters`` on the background rows, and the export is checked numerically).
        data: the background: an array ``(m, ...)`` (numpy, torch tensor, DataFrame), or a list / dict of
            arrays for models with several inputs. The expected value is the mean model output over it.
        layer: explain this intermediate tensor (or list of tensors) instead of the graph inputs, like
            shap's ``(model, layer)``.
        outputs: names of the graph outputs to explain (default: every float output); their features are
            flattened and concatenated into one output vector.
        device: ``"auto"`` (CUDA when it really loads), ``"cpu"`` or ``"cuda"``.
        batch_size: samples per ONNX Runtime call (default: as many as fit ``max_memory``).
        max_memory: memory budget in bytes for one call (default: a quarter of the available RAM, ≤ 1 GiB).
        feature_names: names of the last axis of the (single) explained input; DataFrame columns by default.

    Example:
        >>> ex = DeepExplainer("model.onnx", background)          # doctest: +SKIP
        >>> values = ex.shap_values(x)                               # (n, *x.shape[1:], k)  # doctest: +SKIP
    """

    def __init__(self, model, data, *, layer=None, outputs=None, device: str = "auto",
                 batch_size: int | None = None, max_memory: int | None = None, feature_names=None) -> None:
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {batch_size}")
        self.providers = runtime.providers_for(device)
        self.batch_size = batch_size
        self.max_memory = max_memory or min(_available_memory() // 4, 1 << 30)
        self.feature_names = feature_names or feature_names_of(data)
        # load
        self.proto = load_model(model if is_onnx_source(model) else framework_to_onnx(model, data))
        self.signature = signature(self.proto)
        self.input_names = self.signature.inputs
        self.background = feeds(data, self.signature, "background")
        # check, lower
        self.lowered = _lower_checked(self.proto, self.background)
        # augment: plan and refuse now; the graph itself is built on first use
        self.layers = [layer] if isinstance(layer, str) else list(layer or [])
        self.explained = self.layers or self.input_names
        self.output_names = select_outputs(self.lowered, self.signature.outputs, outputs)
        self.plan = make_plan(self.lowered, self.explained, self.output_names)
        self._augmented: AugmentedModel | None = None
        # run
        self.runner = Runner(self.lowered, self.output_names, self.providers)
        reference_outputs = self.runner.predict(self.background)
        self.n_outputs = reference_outputs.shape[1]
        self._expected = reference_outputs.mean(axis=0)
        self._expected_magnitude = np.abs(reference_outputs).mean(axis=0)  # the additivity check's scale
        self.output_labels = self._output_labels()

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
            self._augmented = build_augmented(self.plan)
        return self._augmented

    def predict(self, X) -> np.ndarray:
        """The explained outputs f(X), flattened to (n, k)."""
        return self.runner.predict(feeds(X, self.signature, "data", like=self.background))

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
                check_additivity: bool = True, progress: bool = False) -> Explanation | list[Explanation]:
        """An :class:`Explanation` (a list of them when several tensors are explained).

        ``progress=True`` shows a progress bar over chunks on a terminal (silent when not a TTY).
        """
        explanations = self._explain(X, ranked_outputs, output_rank_order, check_additivity, progress)
        return explanations[0] if len(explanations) == 1 else explanations

    __call__ = explain

    def save_augmented(self, path) -> Path:
        """Write the augmented model atomically to ``path``.

        Inputs: the model's inputs (the samples), ``reference/<input>`` (the background rows, any number)
        and ``output_index`` (n, k) int64; outputs: ``shap_values_<i>`` per explained tensor and
        ``prediction`` (each name gets a suffix ``_1``, ``_2``, ... when the model already uses it). The
        background is not embedded: feed it (or any other) at run time. Written with
        :func:`onnxshap.files.write.write_atomic`: only a missing path or a regular file is replaced, and the
        folder must exist.
        """
        payload = self.augmented.proto.SerializeToString()
        return write_atomic(path, lambda file: file.write(payload))

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

    def _explain(self, X, ranked_outputs, order, check_additivity, progress=False) -> list[Explanation]:
        started = time.perf_counter()
        data = feeds(X, self.signature, "data", like=self.background)
        predictions_all = self.runner.predict(data)
        indices = self._output_indices(predictions_all, ranked_outputs, order)
        n, k = indices.shape
        m = next(iter(self.background.values())).shape[0]
        chunks = chunking(self.augmented, n, m, k, self.max_memory, self.batch_size)
        values = self.runner.explain(self.augmented, data, self.background, indices, chunks, progress)
        predictions = np.take_along_axis(predictions_all, indices, axis=1)
        base = self._expected[indices]
        error = additivity.check_additivity(values, predictions, base, self._expected_magnitude[indices],
                                            self.output_labels, indices, enforce=check_additivity)
        explained_data = self._explained_data(data)
        elapsed = time.perf_counter() - started
        return [
            Explanation(values=v, base_values=base, data=d, output_indices=indices,
                        output_names=self.output_labels, predictions=predictions, additivity_error=error,
                        feature_names=self.feature_names if len(self.explained) == 1 else None,
                        input_name=name, extra={"seconds": elapsed})
            for v, d, name in zip(values, explained_data, self.explained)
        ]

    def _explained_data(self, data: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.layers:
            return [data[name] for name in self.explained]
        values = runtime.evaluate(self.lowered.model, data, self.layers)
        return [values[name] for name in self.layers]


def _lower_checked(proto: onnx.ModelProto, background: dict[str, np.ndarray]):
    """Lower, naming every op the table does not know when ONNX Runtime cannot run the model either (a
    custom op); otherwise such ops are refused with the plan's other refusals, in one error."""
    unknown = unknown_ops(proto)
    try:
        return lower(proto, background)
    except OnnxRuntimeError:
        if not unknown:
            raise
        refusals = Refusals()
        refusals.extend(unknown, "no DeepLIFT rule for this op")
        raise refusals.error() from None
