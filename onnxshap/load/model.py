"""Load and check ONNX models: paths, bytes, protos; external data stays inside the model's folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from onnxshap.errors import ModelLoadError, first_line
from onnxshap.files.read import load_external_data, read_model_bytes, refuse_external_data
from onnxshap.graph.standard import standardize

MIN_OPSET = 17  # emitted ops (ScatterElements reduction, Split with an input, ...) need it


def load_model(model, max_bytes: int | None = None, read_files: list[Path] | None = None) -> onnx.ModelProto:
    """Read ``model`` (path, bytes or ``onnx.ModelProto``) into a checked ModelProto with opset >= 17.

    Ops outside the standard that have an exact standard form (tf2onnx's ``Erfc``) are rewritten into it
    (:func:`onnxshap.graph.standard.standardize`) before the checker sees the model. A path must be a regular
    file; it and its external data (read only from regular files inside the model's folder) are capped at
    ``max_bytes`` (default ``ONNXSHAP_MAX_MODEL_BYTES`` or 4 GiB, see :mod:`onnxshap.files`). Bytes
    and protos have no folder, so external-data references in them are refused.

    Args:
        model: the model.
        max_bytes: byte cap for a model read from a path.
        read_files: when given, the paths of the files read (the model, its external data) are appended.

    Raises:
        ModelLoadError: missing or non-regular file, too large, not an ONNX file, truncated file, external
            data outside the folder or without a folder.
    """
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        where = "model"
        refuse_external_data(proto, where)
    elif isinstance(model, (bytes, bytearray)):
        proto = _parse(bytes(model), "model bytes")
        where = "model bytes"
        refuse_external_data(proto, where)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        where = str(path)
        if path.is_dir():
            raise ModelLoadError(f"model path is a folder, not an .onnx file (nor a SavedModel folder: no "
                                 f"saved_model.pb): {path}")
        proto = _parse(read_model_bytes(path, max_bytes), str(path))
        external = load_external_data(proto, path, max_bytes)
        if read_files is not None:
            read_files.extend([path, *external])
    else:
        raise ModelLoadError(
            f"cannot read a model from {type(model).__name__}: pass a path, bytes or onnx.ModelProto "
            "(torch modules and Keras models go through onnxshap.DeepExplainer, which converts them)"
        )
    proto = standardize(proto)
    _check(proto, where)
    proto.ir_version = max(proto.ir_version, 4)  # IR 3 lists weights as inputs; dropping them needs IR >= 4
    return _upgrade_opset(proto, where)


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"not an ONNX model (or truncated): {where}: {first_line(exc)}") from None
    return proto


def _check(proto: onnx.ModelProto, where: str) -> None:
    """ONNX's checker on the graph's structure (ops, attributes, names, order, opsets), except that graph outputs
    may lack a shape (ONNX Runtime runs such models).

    The checker serialises the whole model, weights included (3 s for ViT-B/16's 344 MB); it sees a copy whose
    large initializers are one-element stand-ins, and ONNX Runtime validates the weights when it loads them.
    """
    if proto.ir_version <= 0 or not proto.graph.output or not proto.opset_import:
        raise ModelLoadError(f"not an ONNX model (or truncated): {where}: no graph outputs or opset")
    light = _structure_only(proto)
    for output in light.graph.output:
        if output.type.HasField("tensor_type") and not output.type.tensor_type.HasField("shape"):
            output.type.tensor_type.shape.SetInParent()
    try:
        onnx.checker.check_model(light)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"invalid ONNX model: {where}: {first_line(exc)}") from None


_MODEL_SCALARS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")
_MODEL_LISTS = ("opset_import", "metadata_props", "functions")
_GRAPH_LISTS = ("node", "input", "output", "value_info", "sparse_initializer")


def _structure_only(proto: onnx.ModelProto, large: int = 1 << 16) -> onnx.ModelProto:
    """A copy of ``proto`` whose initializers of more than ``large`` bytes hold one element (the weights are
    not copied)."""
    light = onnx.ModelProto()
    for name in _MODEL_SCALARS:
        setattr(light, name, getattr(proto, name))
    for name in _MODEL_LISTS:
        getattr(light, name).extend(getattr(proto, name))
    light.graph.name = proto.graph.name
    for name in _GRAPH_LISTS:
        getattr(light.graph, name).extend(getattr(proto.graph, name))
    for tensor in proto.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 1
        if int(np.prod(tensor.dims, dtype=np.int64)) * itemsize <= large:  # not ByteSize(): it walks the data
            light.graph.initializer.append(tensor)
            continue
        stand_in = light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type)
        stand_in.raw_data = bytes(itemsize)
    return light


def _upgrade_opset(proto: onnx.ModelProto, where: str) -> onnx.ModelProto:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= MIN_OPSET:
        return proto
    try:
        return onnx.version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
        raise ModelLoadError(
            f"{where}: opset {opset} could not be converted to opset {MIN_OPSET} ({first_line(exc)}); "
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
        index_bounds: integer inputs used as Gather indices into a constant table (token ids into an
            embedding): input name → (rows of the table, node name).
    """

    inputs: list[str]
    feature_shapes: dict[str, tuple]
    dtypes: dict[str, np.dtype]
    outputs: list[str]
    index_bounds: dict[str, tuple[int, str]]


def signature(proto: onnx.ModelProto) -> Signature:
    """The :class:`Signature` of a loaded model."""
    initializers = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    return Signature(
        inputs=[i.name for i in graph_inputs],
        feature_shapes={i.name: _feature_shape(i) for i in graph_inputs},
        dtypes={i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph_inputs},
        outputs=[o.name for o in proto.graph.output],
        index_bounds=index_bounds(proto),
    )


def _feature_shape(value_info: onnx.ValueInfoProto) -> tuple:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:])


def index_bounds(proto) -> dict[str, tuple[int, str]]:
    """Integer graph inputs used as ``Gather`` indices into a constant table (an embedding): input name →
    (rows of the table along the gathered axis, node name). Followed through Cast, Identity and reshapes."""
    tables = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    source = {i.name: i.name for i in proto.graph.input if i.name not in tables}
    bounds: dict[str, tuple[int, str]] = {}
    for node in proto.graph.node:
        if node.op_type in ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten") and node.input \
                and node.input[0] in source:
            source[node.output[0]] = source[node.input[0]]
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in source \
                and node.input[0] in tables:
            dims = tables[node.input[0]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if dims and -len(dims) <= axis < len(dims):
                name = source[node.input[1]]
                size = (dims[axis], node.name or node.output[0])
                bounds[name] = min(bounds.get(name, size), size)
    return bounds
