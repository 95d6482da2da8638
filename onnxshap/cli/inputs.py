"""The CLI's inputs: the model (ONNX or Keras), data and background files checked against the model."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from onnxshap.errors import InputDataError
from onnxshap.files.read import load_arrays
from onnxshap.load.data import check_shape
from onnxshap.load.frameworks import framework_to_onnx, is_keras_path
from onnxshap.load.model import load_model

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

def memory_size(text: str) -> int:
    """``--max-memory``: bytes, or a number with K, M, G or T (binary units, an optional trailing B)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not match or float(match[1]) * _UNITS[match[2]] < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 268435456, 256M or 2G, got {text!r}")
    return int(float(match[1]) * _UNITS[match[2]])


def load_array_file(path: str, what: str, shapes: dict[str, tuple] | None = None, only: str | None = None):
    """An .npy array or a dict of .npz arrays; never unpickles. With ``shapes`` (input name → feature shape),
    keys and declared shapes are checked before any array is read; ``only`` names the one input the file is
    for (``--input NAME:FILE``)."""
    def check_keys(keys: list[str]) -> None:
        if only is not None:
            if len(keys) != 1:
                raise InputDataError(f"{what} file {path} holds {len(keys)} arrays; --input NAME:FILE needs "
                                     "one")
            return
        unknown = sorted(set(keys) - set(shapes))
        if unknown:
            raise InputDataError(f"{what} file {path}: unknown input name(s) "
                                 f"{', '.join(map(repr, unknown))}; the model's inputs are "
                                 f"{', '.join(map(repr, shapes))}")
        missing = [name for name in shapes if name not in keys]
        if missing:
            raise InputDataError(f"{what} file {path}: missing input(s) {', '.join(map(repr, missing))}")

    def check_array(key, shape, dtype) -> None:
        name = only or key or (next(iter(shapes)) if len(shapes) == 1 else None)
        if name is None:
            raise InputDataError(f"{what} file {path} holds one array but the model has {len(shapes)} inputs "
                                 f"({', '.join(shapes)}); pass an .npz keyed by input name, or --input "
                                 "NAME:FILE")
        check_shape(name, shape, shapes[name], f"{what} file {path}")

    if shapes is None:
        return load_arrays(path, what)
    arrays = load_arrays(path, what, check_keys=check_keys, check_array=check_array)
    if only is not None and isinstance(arrays, dict):
        return next(iter(arrays.values()))
    return arrays


def collect_data(args, shapes: dict[str, tuple]) -> object:
    if args.data and args.input:
        raise InputDataError("give the data either as a positional file or with --input, not both")
    if args.input:
        data = {}
        for item in args.input:
            name, sep, path = item.rpartition(":")
            if not sep or not name:
                raise InputDataError(f"--input expects NAME:FILE.npy, got {item!r}")
            if name not in shapes:
                raise InputDataError(f"--input {item}: unknown input name {name!r}; the model's inputs are "
                                     f"{', '.join(map(repr, shapes))}")
            if name in data:
                raise InputDataError(f"--input {name!r} given twice")
            data[name] = load_array_file(path, "data", shapes, only=name)
        return data
    if not args.data:
        raise InputDataError("no data: pass a .npy/.npz file after the model, or --input NAME:FILE.npy")
    return load_array_file(args.data, "data", shapes)


def data_files(args) -> list[str]:
    return [p for p in [args.data, args.background, args.names, args.vocab] if p] + [
        item.rpartition(":")[2] for item in args.input]


def rows_of(data) -> int:
    first = next(iter(data.values())) if isinstance(data, dict) else data
    return int(np.asarray(first).shape[0]) if np.ndim(first) else 0


def sample_background(data, size: int, seed: int):
    rows = rows_of(data)
    if rows <= size:
        return data
    index = np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False))
    return {k: v[index] for k, v in data.items()} if isinstance(data, dict) else data[index]


def read_model(args, model_files: list[Path]):
    """The model as ONNX: an ONNX file as it is; a Keras file or SavedModel folder exported with
    ``onnxshap.converters.export_keras`` on the background rows (``-b``, else the rows sampled from the data),
    the export checked against Keras."""
    if not is_keras_path(args.model):
        return load_model(args.model, read_files=model_files)
    model_files.append(Path(args.model))
    source = args.background or args.data or (args.input[0].rpartition(":")[2] if args.input else None)
    if source is None:
        raise InputDataError("no data: pass a .npy/.npz file after the model, or --input NAME:FILE.npy")
    if len(args.input) > 1:
        raise InputDataError(f"{args.model}: a Keras model with several inputs cannot be read from --input "
                             "files; export it with onnxshap.converters.export_keras and explain the .onnx file")
    rows = load_array_file(source, "background" if args.background else "data")
    if isinstance(rows, dict):
        if len(rows) != 1:
            raise InputDataError(f"{source} holds {len(rows)} arrays; a Keras model is exported on one input "
                                 "array (export a multi-input model with onnxshap.converters.export_keras)")
        rows = next(iter(rows.values()))
    if not args.background:
        rows = sample_background(rows, args.background_size, args.seed)
    return load_model(framework_to_onnx(args.model, rows))


