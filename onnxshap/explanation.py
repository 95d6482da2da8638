"""The result of an explanation: SHAP values with what they explain, in a form shap's plots accept."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Explanation:
    """SHAP values of one explained tensor.

    Attributes:
        values: ``(n, *feature_shape, k)`` SHAP values (k explained outputs per row).
        base_values: ``(n, k)`` expected value of each explained output, ``mean_r f(r)``.
        data: ``(n, *feature_shape)`` the explained values themselves.
        output_indices: ``(n, k)`` which model output each of the k slots explains.
        output_names: names of all model outputs (index with ``output_indices``).
        predictions: ``(n, k)`` f(x) for the explained outputs.
        additivity_error: ``(n,)`` worst relative error of ``Σφ = f(x) − E f`` per row.
        feature_names: names of the last feature axis (variables), when known.
        input_name: the explained tensor's name.
    """

    values: np.ndarray
    base_values: np.ndarray
    data: np.ndarray
    output_indices: np.ndarray
    output_names: list[str]
    predictions: np.ndarray
    additivity_error: np.ndarray
    feature_names: list[str] | None = None
    input_name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def __len__(self) -> int:
        return self.values.shape[0]

    def importance(self, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
        """Mean |φ| over rows and explained outputs, and over ``axis`` of the feature shape if given.

        For time-series data shaped ``(n, T, F)``, ``importance(0)`` is per variable (F,) and
        ``importance(1)`` per time step (T,).
        """
        magnitude = np.abs(self.values).mean(axis=(0, self.values.ndim - 1))
        if axis is not None:
            magnitude = magnitude.mean(axis=axis)
        return magnitude

    def to_shap(self, output: int | None = None):
        """A ``shap.Explanation`` so ``shap.plots.*`` work (needs shap installed).

        Args:
            output: which explained output slot to take; None keeps them all (values ``(n, ..., k)``,
                as shap does for multi-output models).
        """
        try:
            import shap
        except ImportError as exc:
            raise ImportError("to_shap() needs shap: pip install shap") from exc
        if output is None and self.values.shape[-1] == 1:
            output = 0
        names = self.feature_names
        if names is not None and self.data.ndim != 2:
            names = None  # shap's feature_names describe the last axis of 2-D data only
        if output is None:
            same_outputs = bool((self.output_indices == self.output_indices[:1]).all())
            labels = [self.output_names[i] for i in self.output_indices[0]] if same_outputs else None
            return shap.Explanation(values=self.values, base_values=self.base_values, data=self.data,
                                    feature_names=names, output_names=labels)
        return shap.Explanation(values=self.values[..., output], base_values=self.base_values[:, output],
                                data=self.data, feature_names=names)
