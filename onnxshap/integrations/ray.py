"""Ray Data: explain a Dataset with ``map_batches``, numpy or pandas batches in, SHAP value columns out.

    import onnxshap
    from onnxshap.integrations.ray import explain_dataset

    ex = onnxshap.DeepExplainer("model.onnx", background)
    explained = explain_dataset(ds, ex, concurrency=4)      # ds's columns plus shap_<feature> columns

:class:`ExplainBatch` is a callable class for ``Dataset.map_batches``: Ray makes one instance per actor and
calls it on every batch, so the explainer (pickled: model bytes, background, options) travels once per actor,
and each actor makes its ONNX Runtime sessions once. :func:`explain_dataset` puts the explainer in Ray's object
store once and maps it over the dataset. Rows are explained independently, so the values equal a
single-process run's (same explainer, same memory budget).

Where the model's inputs are in a batch (``columns``):

- a single input with named features (a DataFrame background, or ``columns=[...]``): one scalar column per
  feature; the values come back as ``shap_<feature>`` (one explained output) or ``shap_<feature>_<output>``;
- otherwise a column per model input (named like the input, or ``columns={input: column}``) holding its rows
  as a tensor column; the values come back as ``shap_<input>``, one ``(*features, k)`` array per row
  (``(*features,)`` for a single-output model), like ``shap_values``.

With ``ranked_outputs=j`` the outputs are each row's top j (``output_rank_order``), labelled ``rank0``,
``rank1``, ..., and ``output_index_rank<r>`` columns say which output each rank is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from onnxshap.errors import InputDataError, UsageError
from onnxshap.explainer import DeepExplainer


class ExplainBatch:
    """A callable for ``Dataset.map_batches(ExplainBatch, fn_constructor_kwargs={"explainer": ...})``.

    Args:
        explainer: a :class:`~onnxshap.DeepExplainer`, or a ``ray.ObjectRef`` to one (fetched once, here).
        columns: the batch columns that hold the model's inputs: None (see the module docstring), a list of
            scalar feature columns (single-input models), or a dict input name → tensor column.
        ranked_outputs, output_rank_order, check_additivity: as for ``DeepExplainer.shap_values``.
        keep_columns: return the batch's own columns beside the SHAP columns (default True).
        prefix: prefix of the SHAP value columns (default ``"shap_"``).
    """

    def __init__(self, explainer, columns: Sequence[str] | Mapping[str, str] | None = None, *,
                 ranked_outputs: int | None = None, output_rank_order: str = "max", check_additivity: bool = True,
                 keep_columns: bool = True, prefix: str = "shap_") -> None:
        if not isinstance(explainer, DeepExplainer):
            import ray

            explainer = ray.get(explainer)
        if not isinstance(explainer, DeepExplainer):
            raise UsageError(f"ExplainBatch needs a DeepExplainer (or a ray.ObjectRef to one), got "
                             f"{type(explainer).__name__}")
        self.explainer = explainer
        self.features, self.tensors = _layout(explainer, columns)
        self.ranked_outputs, self.order = ranked_outputs, output_rank_order
        self.check_additivity, self.keep_columns, self.prefix = check_additivity, keep_columns, prefix

    def __call__(self, batch):
        """SHAP value columns for one batch (a dict of numpy arrays or a pandas DataFrame, returned alike)."""
        is_frame = hasattr(batch, "columns") and hasattr(batch, "to_numpy")
        explanations = self.explainer.explain(self._inputs(batch), ranked_outputs=self.ranked_outputs,
                                              output_rank_order=self.order, check_additivity=self.check_additivity)
        explanations = explanations if isinstance(explanations, list) else [explanations]
        columns = self._columns(explanations)
        if is_frame:
            import pandas as pd

            shap = pd.DataFrame({k: list(v) if v.ndim > 1 else v for k, v in columns.items()}, index=batch.index)
            return pd.concat([batch, shap], axis=1) if self.keep_columns else shap
        return {**batch, **columns} if self.keep_columns else columns

    def _inputs(self, batch) -> dict[str, np.ndarray]:
        try:
            if self.features is not None:
                (name,) = self.explainer.input_names
                return {name: np.stack([np.asarray(batch[c]) for c in self.features], axis=1)}
            return {name: np.stack(list(np.asarray(batch[column]))) if np.asarray(batch[column]).dtype == object
                    else np.asarray(batch[column]) for name, column in self.tensors.items()}
        except KeyError as exc:
            raise InputDataError(f"batch has no column {exc.args[0]!r}; its columns are "
                                 f"{', '.join(map(repr, list(batch.keys())))}") from None

    def _labels(self, k: int) -> list[str]:
        if self.ranked_outputs is not None:
            return [f"rank{r}" for r in range(k)]
        return list(self.explainer.output_labels)

    def _columns(self, explanations) -> dict[str, np.ndarray]:
        first = explanations[0]
        k = first.values.shape[-1]
        drop_k = self.ranked_outputs is None and self.explainer.n_outputs == 1
        columns = {}
        if self.features is not None:
            labels = self._labels(k)
            for i, feature in enumerate(self.features):
                for j, label in enumerate(labels):
                    key = f"{self.prefix}{feature}" if drop_k else f"{self.prefix}{feature}_{label}"
                    columns[key] = first.values[:, i, j]
        else:
            for e in explanations:
                columns[f"{self.prefix}{e.input_name}"] = e.values[..., 0] if drop_k else e.values
        if self.ranked_outputs is not None:
            columns.update({f"output_index_rank{r}": first.output_indices[:, r] for r in range(k)})
        return columns


def _layout(explainer: DeepExplainer, columns) -> tuple[list[str] | None, dict[str, str] | None]:
    """(scalar feature columns, None) or (None, input name → tensor column)."""
    inputs = explainer.input_names
    if isinstance(columns, Mapping):
        unknown = sorted(set(columns) - set(inputs))
        if unknown or len(columns) != len(inputs):
            raise UsageError(f"columns must map every model input ({', '.join(inputs)}) to a column; got "
                             f"{sorted(columns)}")
        return None, dict(columns)
    names = explainer.feature_names
    if columns is None and names and len(inputs) == 1 and explainer.background[inputs[0]].shape[1:] == (len(names),):
        columns = names
    if columns is None:
        return None, {name: name for name in inputs}
    columns = [str(c) for c in columns]
    shape = explainer.background[inputs[0]].shape[1:]
    if len(inputs) != 1 or shape != (len(columns),):
        raise UsageError(f"a list of feature columns needs a single model input with one feature axis; the model "
                         f"takes {', '.join(f'{n} {explainer.background[n].shape[1:]}' for n in inputs)} and "
                         f"{len(columns)} columns were given")
    return columns, None


def explain_dataset(ds, explainer: DeepExplainer, columns=None, *, batch_size: int = 4096,
                    concurrency: int | tuple[int, int] = 1, batch_format: str = "numpy",
                    num_cpus: float | None = None, **options):
    """``ds.map_batches`` with :class:`ExplainBatch`: a lazy Ray Dataset with SHAP value columns.

    The explainer is put in Ray's object store once; each of the ``concurrency`` actors fetches it once.

    Args:
        ds: a ``ray.data.Dataset``.
        explainer: the :class:`~onnxshap.DeepExplainer`.
        columns: see :class:`ExplainBatch`.
        batch_size: rows per batch (each batch is one ``explain`` call, chunked within the memory budget).
        concurrency: actors (or a ``(min, max)`` autoscaling range).
        batch_format: ``"numpy"`` or ``"pandas"``.
        num_cpus: CPUs Ray reserves per actor (ONNX Runtime uses every core of its machine unless
            ``ONNXSHAP_THREADS`` is set in the workers).
        options: ``ranked_outputs``, ``output_rank_order``, ``check_additivity``, ``keep_columns``, ``prefix``.
    """
    import ray

    if batch_format not in ("numpy", "pandas"):
        raise UsageError(f"batch_format must be 'numpy' or 'pandas', got {batch_format!r}")
    _layout(explainer, columns)  # refuse a bad column layout here, not in every actor
    sizes = {"min_size": concurrency[0], "max_size": concurrency[1]} if isinstance(concurrency, tuple) \
        else {"size": concurrency}
    extra = {} if num_cpus is None else {"num_cpus": num_cpus}
    return ds.map_batches(ExplainBatch, fn_constructor_kwargs={"explainer": ray.put(explainer), "columns": columns,
                                                               **options},
                          batch_size=batch_size, batch_format=batch_format,
                          compute=ray.data.ActorPoolStrategy(**sizes), **extra)
