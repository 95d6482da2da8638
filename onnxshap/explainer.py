"""DeepExplainer: Deep SHAP for an ONNX model (or a torch / Keras model exported on the fly).

Mirrors ``shap.DeepExplainer``: construct it with a model and a background, read ``expected_value``, call
``shap_values(X)`` for arrays with shap's shapes, or ``explain(X)`` / ``ex(X)`` for an :class:`Explanation`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx

from onnxshap.data import as_feeds, check_feeds, feature_names_of, to_numpy
from onnxshap.errors import AdditivityError, InputDataError, OnnxShapError, UnsupportedModelError
from onnxshap.explanation import Explanation
from onnxshap.lower import lower
from onnxshap.lower.probe import model_to_proto
from onnxshap.model import load_model
from onnxshap.runtime import make_session, providers_for
from onnxshap.sweep import OUTPUT_INDEX, PREDICTION, AugmentedModel, build_augmented, check_explainable

RANK_ORDERS = ("max", "min", "max_abs")
ADDITIVITY_TOLERANCE = 1e-4


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _framework_to_onnx(model, background):
    """Export a torch module or Keras model through ``converters``; None for anything else."""
    module = type(model).__module__ or ""
    if module.startswith("torch") or hasattr(model, "state_dict") and hasattr(model, "forward"):
        from converters import export_torch

        return export_torch(model, background)
    if module.startswith(("keras", "tf_keras", "tensorflow")) or hasattr(model, "layers") and hasattr(
            model, "predict"):
        from converters import export_keras

        return export_keras(model, background)
    return None


class DeepExplainer:
    """Deep SHAP (DeepLIFT with a background distribution) for ONNX models.

    Args:
        model: path to an ``.onnx`` file, its bytes, an ``onnx.ModelProto``, a ``torch.nn.Module`` or a Keras
            model (the last two are exported with ``converters`` and the export is checked numerically).
        data: the background: an array ``(m, ...)`` (numpy, torch tensor, DataFrame), or a list / dict of
            arrays for models with several inputs. The expected value is the mean model output over it.
        layer: explain this intermediate tensor (or list of tensors) instead of the graph inputs, like
            shap's ``(model, layer)``.
        outputs: names of the graph outputs to explain (default: every float output); their features are
            flattened and concatenated into one output vector.
        device: ``"auto"`` (CUDA when it really loads), ``"cpu"`` or ``"cuda"``.
        batch_size: rows per ONNX Runtime call (default: as many as fit ``max_memory``).
        max_memory: memory budget in bytes for one call (default: a quarter of the available RAM, ≤ 1 GiB).
        feature_names: names of the last axis of the (single) explained input; DataFrame columns by default.

    Example:
        >>> ex = DeepExplainer("model.onnx", background)          # doctest: +SKIP
        >>> values = ex.shap_values(x)                               # (n, *x.shape[1:], k)  # doctest: +SKIP
    """

    def __init__(self, model, data, *, layer=None, outputs=None, device: str = "auto",
                 batch_size: int | None = None, max_memory: int | None = None, feature_names=None) -> None:
        background_raw = data
        if not isinstance(model, (str, os.PathLike, bytes, bytearray, onnx.ModelProto)):
            exported = _framework_to_onnx(model, _first_array(data))
            if exported is None:
                raise OnnxShapError(f"cannot explain a {type(model).__name__}: pass an ONNX model (path, bytes, "
                                    "ModelProto), a torch.nn.Module or a Keras model")
            model = exported
        self.proto = load_model(model)
        self.providers = providers_for(device)
        self.batch_size = batch_size
        self.max_memory = max_memory or min(_available_memory() // 4, 1 << 30)
        initializers = {i.name for i in self.proto.graph.initializer}
        graph_inputs = [i for i in self.proto.graph.input if i.name not in initializers]
        self.input_names = [i.name for i in graph_inputs]
        self._input_shapes = {i.name: _feature_shape(i) for i in graph_inputs}
        self._input_dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                              for i in graph_inputs}
        self.feature_names = feature_names or feature_names_of(background_raw)
        background = self._feeds(background_raw, "background")
        self.background = background
        self.lowered = lower(self.proto, background)
        self.layers = [layer] if isinstance(layer, str) else list(layer or [])
        self.explained = self.layers or self.input_names
        self._check_explained()
        self.output_names = self._select_outputs(outputs)
        check_explainable(self.lowered, self.explained, self.output_names)
        self._forward_session = make_session(self._forward_proto(), self.providers)
        reference_outputs = self._predict(background)
        self._check_lowering(background, reference_outputs)
        self.n_outputs = reference_outputs.shape[1]
        self._expected = reference_outputs.mean(axis=0)
        self.output_labels = self._output_labels()
        self._augmented: dict[int, tuple[AugmentedModel, object]] = {}

    # -- set-up --------------------------------------------------------------------------------------
    def _feeds(self, data, what: str) -> dict[str, np.ndarray]:
        arrays = as_feeds(data, self.input_names, what)
        checked = check_feeds(arrays, self._input_shapes, self._input_dtypes, what)
        for name, array in checked.items():
            reference = getattr(self, "background", {}).get(name)
            if reference is not None and array.shape[1:] != reference.shape[1:]:
                raise InputDataError(
                    f"{what} for input {name!r} has shape {array.shape} but the background has rows of shape "
                    f"{reference.shape[1:]}; the model was lowered (sequences unrolled) for the background's "
                    "shape: explain rows of that shape, or build a DeepExplainer with a matching background")
        return checked

    def _check_explained(self) -> None:
        known = set(self.lowered.shapes)
        for name in self.explained:
            if name not in known:
                raise InputDataError(f"unknown tensor to explain: {name!r} (not an input or intermediate "
                                     "tensor of the lowered model)")
            if not np.issubdtype(self.lowered.dtypes[name], np.floating):
                raise InputDataError(
                    f"input {name!r} has dtype {self.lowered.dtypes[name]}: integer inputs (token ids) cannot be "
                    "explained; pass layer=<name of the embedding output> to explain that tensor instead")
            if self.lowered.dtypes[name] != np.float32:
                raise UnsupportedModelError(
                    f"tensor {name!r} is {self.lowered.dtypes[name]}: onnxshap explains float32 models; export the "
                    "model in float32 (torch: module.float(); Keras: float32 layers)")
            if not isinstance(self.lowered.batch_axes.get(name), int):
                raise InputDataError(f"tensor {name!r} has no batch axis of its own; it cannot be explained")

    def _select_outputs(self, outputs) -> list[str]:
        available = [o.name for o in self.proto.graph.output]
        if outputs is None:
            chosen = [n for n in available if np.issubdtype(self.lowered.dtypes.get(n, np.float32), np.floating)]
        else:
            chosen = [outputs] if isinstance(outputs, str) else list(outputs)
            unknown = [n for n in chosen if n not in available]
            if unknown:
                raise InputDataError(f"unknown output name(s) {', '.join(map(repr, unknown))}; the model's "
                                     f"outputs are {', '.join(map(repr, available))}")
        if not chosen:
            raise InputDataError("the model has no float outputs to explain")
        return chosen

    def _forward_proto(self) -> onnx.ModelProto:
        proto = model_to_proto(self.lowered.model)
        keep = [o for o in proto.graph.output if o.name in self.output_names]
        del proto.graph.output[:]
        proto.graph.output.extend(keep)
        return proto

    def _check_lowering(self, background: dict[str, np.ndarray], lowered_outputs: np.ndarray,
                        rows: int = 8) -> None:
        """The lowered model must reproduce the original on background rows (else refuse: never wrong)."""
        session = make_session(self.proto, ["CPUExecutionProvider"])
        index = np.arange(max(rows, 2)) % next(iter(background.values())).shape[0]  # ≥ 2 rows: no size-1 batch
        sample = {name: array[index] for name, array in background.items()}
        lowered_outputs = lowered_outputs[index]
        try:
            results = session.run(self.output_names, sample)
        except Exception:  # noqa: BLE001 - a batch fixed at 1: compare row by row
            per_row = [session.run(self.output_names, {n: a[i:i + 1] for n, a in sample.items()})
                       for i in range(min(len(index), 4))]
            results = [np.concatenate(parts) for parts in zip(*per_row)]
        original = np.concatenate([r.reshape(r.shape[0], -1) for r in results], axis=1).astype(np.float64)
        lowered = lowered_outputs[: original.shape[0]]  # fewer when run row by row
        error = np.abs(original - lowered) / np.maximum(1.0, np.abs(original))
        if error.max() > 1e-4:
            raise UnsupportedModelError(
                f"the lowered model does not reproduce the original (relative difference {error.max():.3g} on "
                "the background); refusing to explain it — please report this model")

    def _output_labels(self) -> list[str]:
        labels = []
        for name in self.output_names:
            size = int(np.prod(self.lowered.shapes[name][1:], dtype=np.int64))
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

    def predict(self, X) -> np.ndarray:
        """The explained outputs f(X), flattened to (n, k)."""
        return self._predict(self._feeds(X, "data"))

    def _predict(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        parts = []
        rows = next(iter(feeds.values())).shape[0]
        step = 256  # rows per forward call: bounds the forward session's memory
        for start in range(0, rows, step):
            chunk = {n: a[start:start + step] for n, a in feeds.items()}
            results = _run_session(self._forward_session, self.output_names, chunk)
            parts.append(np.concatenate([r.reshape(r.shape[0], -1) for r in results], axis=1))
        return np.concatenate(parts, axis=0).astype(np.float64)

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

    def save_augmented(self, path, k: int | None = None) -> Path:
        """Write the augmented model (inputs: the model's inputs + ``output_index`` (n, k) int64; outputs:
        ``shap_values_i`` per explained tensor and ``prediction``) atomically to ``path``."""
        augmented, _ = self._augmented_for(k or self.n_outputs)
        path = Path(path)
        temporary = path.with_name(f".{path.name}.partial")
        try:
            onnx.save(augmented.proto, str(temporary))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    # -- the work ------------------------------------------------------------------------------------
    def _augmented_for(self, k: int):
        if k not in self._augmented:
            augmented = build_augmented(self.lowered, self.explained, self.output_names, self.background, k)
            session = make_session(augmented.proto, self.providers)
            self._augmented[k] = (augmented, session)
        return self._augmented[k]

    def _output_indices(self, predictions: np.ndarray, ranked_outputs, order: str) -> np.ndarray:
        n = predictions.shape[0]
        if ranked_outputs is None:
            return np.tile(np.arange(self.n_outputs, dtype=np.int64), (n, 1))
        if order not in RANK_ORDERS:
            raise InputDataError(f"output_rank_order must be one of {', '.join(RANK_ORDERS)}, got {order!r}")
        if not 1 <= int(ranked_outputs) <= self.n_outputs:
            raise InputDataError(f"ranked_outputs must be between 1 and {self.n_outputs}, got {ranked_outputs}")
        key = {"max": -predictions, "min": predictions, "max_abs": -np.abs(predictions)}[order]
        return np.argsort(key, axis=1, kind="stable")[:, : int(ranked_outputs)].astype(np.int64)

    def _explain(self, X, ranked_outputs, order, check_additivity, progress=False) -> list[Explanation]:
        started = time.perf_counter()
        feeds = self._feeds(X, "data")
        predictions_all = self._predict(feeds)
        indices = self._output_indices(predictions_all, ranked_outputs, order)
        augmented, session = self._augmented_for(indices.shape[1])
        n = indices.shape[0]
        rows = self.batch_size or max(1, int(self.max_memory // max(augmented.bytes_per_row, 1)))
        chunks: list[list[np.ndarray]] = [[] for _ in augmented.values]
        starts = range(0, n, rows)
        if progress and len(starts) > 1:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="onnxshap", unit="chunk", disable=None)
        for start in starts:
            run_feeds = {name: feeds[name][start:start + rows] for name in augmented.inputs}
            run_feeds[OUTPUT_INDEX] = indices[start:start + rows]
            results = _run_session(session, augmented.values + [PREDICTION], run_feeds)
            for store, result in zip(chunks, results):
                store.append(result)
        values = [np.concatenate(parts, axis=0) for parts in chunks]
        predictions = np.take_along_axis(predictions_all, indices, axis=1)
        base = self._expected[indices]
        error = _additivity_error(values, predictions, base)
        if check_additivity and error.size and error.max() > ADDITIVITY_TOLERANCE:
            row = int(error.argmax())
            raise AdditivityError(
                f"SHAP values do not add up: row {row} has relative error {error[row]:.3g} > "
                f"{ADDITIVITY_TOLERANCE:g} (sum of values vs f(x) - E[f(background)]); please report this model")
        data = self._explained_data(feeds)
        elapsed = time.perf_counter() - started
        return [
            Explanation(values=v, base_values=base, data=d, output_indices=indices,
                        output_names=self.output_labels, predictions=predictions, additivity_error=error,
                        feature_names=self.feature_names if len(self.explained) == 1 else None,
                        input_name=name, extra={"seconds": elapsed})
            for v, d, name in zip(values, data, self.explained)
        ]

    def _explained_data(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.layers:
            return [feeds[name] for name in self.explained]
        from onnxshap.lower.probe import run_values

        values = run_values(self.lowered.model, feeds, self.layers)
        return [values[name] for name in self.layers]


def _run_session(session, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run`` with ONNX Runtime's failures turned into one clear OnnxShapError."""
    try:
        return session.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (out of memory? pass a smaller batch_size / --batch-size)" if "alloc" in first.lower() else ""
        raise OnnxShapError(f"ONNX Runtime failed: {first}{hint}") from None


def _additivity_error(values: list[np.ndarray], predictions: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per row: max over outputs of |Σφ − (f(x) − E f)| / max(1, |f(x) − E f|)."""
    total = sum(v.reshape(v.shape[0], -1, v.shape[-1]).astype(np.float64).sum(axis=1) for v in values)
    change = predictions - base
    return (np.abs(total - change) / np.maximum(1.0, np.abs(change))).max(axis=1)


def _feature_shape(value_info: onnx.ValueInfoProto) -> tuple:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:])


def _first_array(data):
    if isinstance(data, dict):
        return {k: to_numpy(v, "background") for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [to_numpy(v, "background") for v in data]
    return to_numpy(data, "background")
