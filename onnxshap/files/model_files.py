"""Models over protobuf's 2 GB limit: their large weights go to a side file (ONNX external data).

Protobuf cannot serialize a message of 2 GiB or more, and the Python protobuf runtime cannot even copy one, so
a model whose weights would pass :data:`INLINE_LIMIT` bytes is written as two files: ``NAME.onnx`` (the graph,
small) and ``NAME.onnx.data`` beside it (every initializer of at least :data:`MIN_EXTERNAL_BYTES`, each at an
offset aligned to :data:`ALIGNMENT`). Nothing here builds the large protobuf message: the weights are written
straight from the onnx-ir tensors, and the graph is serialized with references to them. Both files are written
atomically through :class:`onnxshap.files.write.OutputSet` (a partial file in the target's folder, renamed at the
end), with the same rules as every other output.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import onnx
import onnx_ir as ir

from onnxshap.files.read import PROTOBUF_LIMIT
from onnxshap.files.write import OutputSet

INLINE_LIMIT = PROTOBUF_LIMIT - (64 << 20)  # weights beyond this many bytes go to a side file (room for the graph)
MIN_EXTERNAL_BYTES = 1024  # smaller initializers stay inside the graph
ALIGNMENT = 4096  # offsets of external tensors (page-aligned, so ONNX Runtime can map them)
DATA_SUFFIX = ".data"


def weight_bytes(model: ir.Model) -> int:
    """Bytes of every initializer of ``model`` (the bulk of its serialized size)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def needs_external_data(model: ir.Model) -> bool:
    """True when ``model`` must be written with external data (its weights pass :data:`INLINE_LIMIT`)."""
    return weight_bytes(model) > INLINE_LIMIT


def data_path(path: str | os.PathLike) -> Path:
    """The side file that holds the external data of the model written to ``path``."""
    path = Path(path)
    return path.with_name(path.name + DATA_SUFFIX)


@contextmanager
def external_proto(model: ir.Model, location: str) -> Iterator[tuple[onnx.ModelProto, list[tuple[int, object]]]]:
    """``model`` as a ModelProto whose large initializers refer to ``location`` (relative to the graph file),
    and the ``(offset, tensor)`` pairs to write there. The model is restored when the block ends."""
    moved: list[tuple[ir.Value, object]] = []
    layout: list[tuple[int, object]] = []
    offset = 0
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < MIN_EXTERNAL_BYTES:
                continue
            offset = -(-offset // ALIGNMENT) * ALIGNMENT
            value.const_value = ir.ExternalTensor(location, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                                  name=tensor.name or value.name)
            moved.append((value, tensor))
            layout.append((offset, tensor))
            offset += tensor.nbytes
        yield ir.to_proto(model), layout
    finally:
        for value, tensor in moved:
            value.const_value = tensor


def write_data(file: IO[bytes], layout: list[tuple[int, object]]) -> None:
    """Write each tensor's bytes at its offset (zeros between them), without copying large arrays."""
    position = 0
    for offset, tensor in layout:
        file.write(b"\0" * (offset - position))
        file.write(_raw_bytes(tensor))
        position = offset + tensor.nbytes


def _raw_bytes(tensor) -> memoryview | bytes:
    """The tensor's little-endian bytes: a view of its numpy array where that is its storage layout."""
    if isinstance(tensor, ir.Tensor) and tensor.dtype.bitwidth % 8 == 0:
        array = np.ascontiguousarray(tensor.numpy())
        if array.dtype.byteorder != ">":
            return memoryview(array.reshape(-1).view(np.uint8))
    return tensor.tobytes()


def _capped(proto: onnx.ModelProto, ir_version: int | None) -> onnx.ModelProto:
    if ir_version is not None and proto.ir_version > ir_version:
        proto.ir_version = ir_version
    return proto


def stage_model(outputs: OutputSet, target: Path, model: ir.Model, data_target: Path | None = None,
                ir_version: int | None = None) -> bool:
    """Stage ``model`` as ``target`` in ``outputs``; a model over :data:`INLINE_LIMIT` also stages its weights as
    ``data_target`` (default :func:`data_path` of the target; check it with ``outputs.check`` first).

    Args:
        ir_version: the newest IR version to write (the reader's limit), if any.

    Returns:
        True when the weights went to the side file.
    """
    if not needs_external_data(model):
        payload = _capped(ir.to_proto(model), ir_version).SerializeToString()
        outputs.stage(target, lambda file: file.write(payload))
        return False
    data_target = data_target or data_path(target)
    with external_proto(model, data_target.name) as (proto, layout):
        outputs.stage(data_target, lambda file: write_data(file, layout))
        payload = _capped(proto, ir_version).SerializeToString()
    outputs.stage(target, lambda file: file.write(payload))
    return True
