"""Load and check ONNX models: paths, bytes, protos; external data stays inside the model's folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from onnxshap.errors import ModelLoadError, first_line

MIN_OPSET = 17  # emitted ops (ScatterElements reduction, Split with an input, ...) need it


def load_model(model) -> onnx.ModelProto:
    """Read ``model`` (path, bytes or ``onnx.ModelProto``) into a checked ModelProto with opset >= 17.

    Raises:
        ModelLoadError: missing file, not an ONNX file, truncated file, external data outside the folder.
    """
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        where = "model"
    elif isinstance(model, (bytes, bytearray)):
        proto = _parse(bytes(model), "model bytes")
        where = "model bytes"
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        where = str(path)
        if not path.exists():
            raise ModelLoadError(f"model file not found: {path}")
        if path.is_dir():
            raise ModelLoadError(f"model path is a folder, not an .onnx file: {path}")
        proto = _parse(path.read_bytes(), str(path))
        _load_external_data(proto, path)
    else:
        raise ModelLoadError(
            f"cannot read a model from {type(model).__name__}: pass a path, bytes or onnx.ModelProto "
            "(torch modules and Keras models go through onnxshap.DeepExplainer, which converts them)"
        )
    _check(proto, where)
    return _upgrade_opset(proto, where)


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"not an ONNX model (or truncated): {where}: {exc}") from None
    return proto


def _check(proto: onnx.ModelProto, where: str) -> None:
    if proto.ir_version <= 0 or not proto.graph.output or not proto.opset_import:
        raise ModelLoadError(f"not an ONNX model (or truncated): {where}: no graph outputs or opset")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"invalid ONNX model: {where}: {first_line(exc)}") from None


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    folder = path.resolve().parent
    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if folder not in target.parents:
            raise ModelLoadError(
                f"external data of tensor {tensor.name!r} points outside the model's folder: {location!r}"
            )
        if not target.exists():
            raise ModelLoadError(f"external data file of tensor {tensor.name!r} not found: {target}")
    try:
        onnx.load_external_data_for_model(proto, str(folder))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read external data of {path}: {exc}") from None


def _upgrade_opset(proto: onnx.ModelProto, where: str) -> onnx.ModelProto:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= MIN_OPSET:
        return proto
    try:
        return onnx.version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
        raise ModelLoadError(
            f"{where}: opset {opset} could not be converted to opset {MIN_OPSET} ({exc}); "
            f"re-export the model with opset >= {MIN_OPSET}"
        ) from None


@dataclass(frozen=True)
class Signature:
    """What the data must look like: the model's data inputs (initializers excluded) and its outputs.

    Attributes:
        inputs: names of the inputs to feed, in graph order.
        feature_shapes: per input, the dims after the batch axis (None where dynamic).
        dtypes: per input, the numpy dtype the model takes.
        outputs: names of the graph outputs.
    """

    inputs: list[str]
    feature_shapes: dict[str, tuple]
    dtypes: dict[str, np.dtype]
    outputs: list[str]


def signature(proto: onnx.ModelProto) -> Signature:
    """The :class:`Signature` of a loaded model."""
    initializers = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    return Signature(
        inputs=[i.name for i in graph_inputs],
        feature_shapes={i.name: _feature_shape(i) for i in graph_inputs},
        dtypes={i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph_inputs},
        outputs=[o.name for o in proto.graph.output],
    )


def _feature_shape(value_info: onnx.ValueInfoProto) -> tuple:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:])
