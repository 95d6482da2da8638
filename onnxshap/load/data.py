"""Turn what users pass (numpy, torch tensors, pandas DataFrames, lists, dicts) into checked float32 feeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from onnxshap.errors import InputDataError
from onnxshap.load.model import Signature


def to_numpy(array, what: str) -> np.ndarray:
    """A numpy view of ``array`` (numpy, torch tensor, DataFrame, TF tensor, nested lists)."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor, without importing torch
        array = array.detach().cpu().numpy()
    elif hasattr(array, "to_numpy"):  # pandas
        array = array.to_numpy()
    elif hasattr(array, "numpy") and not isinstance(array, np.ndarray):  # tf.Tensor
        array = array.numpy()
    try:
        array = np.asarray(array)
    except (TypeError, ValueError) as exc:
        raise InputDataError(f"{what}: cannot read as an array: {exc}") from None
    if array.dtype == object:
        raise InputDataError(f"{what}: has dtype object (ragged or mixed data); pass a numeric array")
    return array


def feature_names_of(data) -> list[str] | None:
    """Column names of a pandas DataFrame, else None."""
    columns = getattr(data, "columns", None)
    return [str(c) for c in columns] if columns is not None else None


def as_feeds(data, input_names: Sequence[str], what: str) -> dict[str, np.ndarray]:
    """Map ``data`` (one array, a list in input order, or a dict by name) to the named inputs."""
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - set(input_names))
        if unknown:
            raise InputDataError(f"{what}: unknown input name(s) {', '.join(map(repr, unknown))}; "
                                 f"the model's inputs are {', '.join(map(repr, input_names))}")
        missing = [n for n in input_names if n not in data]
        if missing:
            raise InputDataError(f"{what}: missing input(s) {', '.join(map(repr, missing))}")
        arrays = {name: to_numpy(data[name], f"{what} {name!r}") for name in input_names}
    elif isinstance(data, (list, tuple)) and len(input_names) > 1:
        if len(data) != len(input_names):
            raise InputDataError(f"{what}: {len(data)} arrays for {len(input_names)} model inputs "
                                 f"({', '.join(input_names)})")
        arrays = {name: to_numpy(a, f"{what} {name!r}") for name, a in zip(input_names, data)}
    else:
        if len(input_names) != 1:
            raise InputDataError(f"{what}: the model has {len(input_names)} inputs "
                                 f"({', '.join(input_names)}); pass a list or a dict of arrays")
        arrays = {input_names[0]: to_numpy(data, what)}
    return arrays


def check_shape(name: str, shape: tuple[int, ...], expected: tuple, what: str) -> None:
    """Refuse ``shape`` (rows first) unless it has the rank and the fixed feature dims of ``expected``."""
    described = f"(rows, {', '.join(str(d) if d else '?' for d in expected)})"
    if len(shape) != len(expected) + 1:
        raise InputDataError(f"{what} for input {name!r} has shape {tuple(shape)} (rank {len(shape)}); the "
                             f"model expects rank {len(expected) + 1}: {described}")
    for axis, (got, want) in enumerate(zip(shape[1:], expected), start=1):
        if want is not None and got != want:
            raise InputDataError(f"{what} for input {name!r} has shape {tuple(shape)}; axis {axis} should be "
                                 f"{want} (model input shape: {described})")
    if shape[0] == 0:
        raise InputDataError(f"{what} for input {name!r} has no rows")


def check_feeds(arrays: dict[str, np.ndarray], expected: dict[str, tuple], dtypes: dict[str, np.dtype],
                what: str) -> dict[str, np.ndarray]:
    """Check rank, feature shape, dtype and finiteness; convert floats to the model's float type.

    Args:
        arrays: input name → array with a leading batch axis.
        expected: input name → feature shape (dims after the batch; None for a dynamic dim).
        dtypes: input name → the model's numpy dtype for that input.
        what: how to name the data in messages ("data", "background").
    """
    checked = {}
    rows = {name: a.shape[0] if a.ndim else None for name, a in arrays.items()}
    for name, array in arrays.items():
        check_shape(name, array.shape, expected[name], what)
        model_dtype = np.dtype(dtypes[name])
        if np.iscomplexobj(array):
            raise InputDataError(f"{what} for input {name!r} holds complex values ({array.dtype}); complex "
                                 "values cannot be explained (pass real and imaginary parts as separate real "
                                 "features)")
        if np.issubdtype(model_dtype, np.floating):
            if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
                raise InputDataError(f"{what} for input {name!r} has dtype {array.dtype}; expected numbers")
            array = _to_float(array, model_dtype, f"{what} for input {name!r}")
        elif array.dtype != model_dtype:
            if not np.can_cast(array.dtype, model_dtype, casting="same_kind"):
                raise InputDataError(f"{what} for input {name!r} has dtype {array.dtype}; the model expects "
                                     f"{model_dtype}")
            array = np.ascontiguousarray(array, dtype=model_dtype)
        checked[name] = array
    if len(set(rows.values())) > 1:
        raise InputDataError(f"{what}: inputs have different numbers of rows: {rows}")
    return checked


def _to_float(array: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """``array`` as the model's float type; refuses NaN/Inf, and values that only overflow in the cast."""
    with np.errstate(over="ignore", invalid="ignore"):
        converted = np.ascontiguousarray(array, dtype=dtype)
    bad = ~np.isfinite(converted)
    if not bad.any():
        return converted
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    original = array[first]
    if np.isfinite(original):
        limit = float(np.finfo(dtype).max)
        raise InputDataError(f"{where} has values that exceed the {np.dtype(dtype).name} range "
                             f"(±{limit:.4g}), first {float(original):.6g} at row {first[0]}; rescale the "
                             "data")
    raise InputDataError(f"{where} contains NaN or Inf (first at row {first[0]})")


def feeds(data, model: Signature, what: str, like: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``data`` as checked feeds for ``model``'s inputs.

    Args:
        data: one array, a list in input order, or a dict by input name (numpy, torch, pandas, ...).
        model: the model's signature.
        what: how messages name the data ("data", "background").
        like: feeds whose row shape ``data`` must match (the background: the model was lowered for it).
    """
    checked = check_feeds(as_feeds(data, model.inputs, what), model.feature_shapes, model.dtypes, what)
    check_index_bounds(checked, model.index_bounds, what)
    for name, array in checked.items():
        reference = (like or {}).get(name)
        if reference is not None and array.shape[1:] != reference.shape[1:]:
            raise InputDataError(
                f"{what} for input {name!r} has shape {array.shape} but the background has rows of shape "
                f"{reference.shape[1:]}; the model was lowered (sequences unrolled) for the background's "
                "shape: explain rows of that shape, or build a DeepExplainer with a matching background")
    return checked


def first_array(data):
    """The background as plain arrays (for exporters that need example inputs)."""
    if isinstance(data, Mapping):
        return {k: to_numpy(v, "background") for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [to_numpy(v, "background") for v in data]
    return to_numpy(data, "background")


def check_index_bounds(arrays: dict[str, np.ndarray], bounds: dict[str, tuple[int, str]], what: str) -> None:
    """Refuse integer indices (token ids) outside ``[-size, size - 1]`` of the table a Gather reads."""
    for name, (size, node) in bounds.items():
        array = arrays.get(name)
        if array is None or not np.issubdtype(array.dtype, np.integer):
            continue
        bad = (array < -size) | (array >= size)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputDataError(
                f"{what} for input {name!r} has index {int(array[where])} at row {where[0]}, outside the "
                f"{size} rows of the table that node {node!r} gathers from (valid: {-size}..{size - 1}; an "
                "out-of-range token id?)")
