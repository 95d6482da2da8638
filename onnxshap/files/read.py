"""Bounded reads: models and arrays from regular files only, checked before anything is allocated.

* Only regular files are opened. Devices (``/dev/zero``), FIFOs, sockets and folders are refused with one
  line, checked with ``os.stat`` *before* opening and again with ``fstat`` on the opened descriptor (opened
  with ``O_NONBLOCK``, so a FIFO swapped in between can never block).
* A model read into memory (the ``.onnx`` file plus its external data) is capped at
  ``ONNXSHAP_MAX_MODEL_BYTES`` bytes (default 4 GiB); the ``.onnx`` file itself also at protobuf's 2 GiB
  limit. At most cap + 1 bytes are ever read.
* External data is read only from regular files inside the model's folder: no absolute paths, no ``..``,
  no symlink that resolves outside the folder, offsets and lengths inside the file.
* ``.npy``/``.npz`` arrays are never unpickled. Every array's header (shape, dtype) is read first and
  checked — keys, shapes, dtypes, the size cap ``ONNXSHAP_MAX_DATA_BYTES`` (default half the physical
  memory) — before anything is allocated or any ``.npz`` member is decompressed.
"""

from __future__ import annotations

import ast
import os
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

from onnxshap.errors import InputDataError, ModelLoadError, OnnxShapError, first_line

MAX_MODEL_BYTES_ENV = "ONNXSHAP_MAX_MODEL_BYTES"
MAX_DATA_BYTES_ENV = "ONNXSHAP_MAX_DATA_BYTES"
DEFAULT_MAX_MODEL_BYTES = 4 << 30
PROTOBUF_LIMIT = (2 << 30) - 1  # protobuf cannot parse a message of 2 GiB or more
NPY_MAGIC, ZIP_MAGICS = b"\x93NUMPY", (b"PK\x03\x04", b"PK\x05\x06")
MAX_HEADER_BYTES = 10_000

ErrorClass = type[OnnxShapError]


# -- limits --------------------------------------------------------------------------------------------------
def _limit_from_env(variable: str, default: int, error: ErrorClass) -> int:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = int(float(text))
    except ValueError:
        raise error(f"{variable}={text!r} is not a number of bytes") from None
    if value < 1:
        raise error(f"{variable}={text!r} must be a positive number of bytes")
    return value


def model_byte_limit(limit: int | None = None) -> int:
    """Bytes a model (file + external data) may take in memory: ``limit``, else the env var, else 4 GiB."""
    if limit:
        return int(limit)
    return _limit_from_env(MAX_MODEL_BYTES_ENV, DEFAULT_MAX_MODEL_BYTES, ModelLoadError)


def data_byte_limit(limit: int | None = None) -> int:
    """Bytes the arrays of one data file may take: ``limit``, else the env var, else half the physical RAM."""
    if limit:
        return int(limit)
    try:
        default = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        default = 8 << 30
    return _limit_from_env(MAX_DATA_BYTES_ENV, default, InputDataError)


class _Budget:
    """A running byte count that refuses, naming the limit's variable, once it passes ``cap``."""

    def __init__(self, cap: int, error: ErrorClass, what: str, variable: str) -> None:
        self.cap, self.error, self.what, self.variable, self.total = cap, error, what, variable, 0

    def take(self, nbytes: int) -> None:
        self.total += nbytes
        if self.total > self.cap:
            raise self.error(f"{self.what} is over the limit of {self.cap} bytes ({self.total} bytes; raise it "
                             f"with {self.variable})")


# -- regular files only --------------------------------------------------------------------------------------
def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _stat_regular(path: Path, what: str, error: ErrorClass) -> os.stat_result:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise error(f"{what} file {path} cannot be read: {exc.strerror or first_line(exc)}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} path {path} is {file_kind(info.st_mode)}, not a regular file; refused")
    return info


def open_regular(path: str | os.PathLike, what: str, error: ErrorClass = InputDataError) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file (checked before and after opening).

    Raises:
        error: the path is missing, unreadable, a folder, a device, a FIFO or a socket.
    """
    path = Path(path)
    before = _stat_regular(path, what, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{what} file {path} cannot be read: {exc.strerror or first_line(exc)}") from None
    after = os.fstat(fd)
    if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise error(f"{what} path {path} changed while being opened (now {file_kind(after.st_mode)}); refused")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bounded(path: str | os.PathLike, what: str, limit: int, error: ErrorClass, hint: str = "") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (reads at most ``limit + 1``)."""
    with open_regular(path, what, error) as file:
        size = os.fstat(file.fileno()).st_size
        if size > limit:
            raise error(f"{what} file {path} is {size} bytes, over the limit of {limit} bytes{hint}")
        data = _read_upto(file, min(size, limit) + 1, limit + 1)  # not read(limit + 1): that allocates limit bytes
    if len(data) > limit:
        raise error(f"{what} file {path} grew past the limit of {limit} bytes while being read{hint}")
    return data


def _read_upto(file: IO[bytes], expected: int, most: int) -> bytes:
    """Up to ``most`` bytes: ``expected`` at once, then blocks of 16 MiB if the file grew while being read."""
    parts = [file.read(expected)]
    while len(parts[0]) == expected and parts[-1] and (total := sum(map(len, parts))) < most:
        parts.append(file.read(min(1 << 24, most - total)))
    return b"".join(parts)


def read_model_bytes(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes of an ``.onnx`` file: a regular file of at most ``min(limit, 2 GiB - 1)`` bytes.

    Args:
        path: the model file.
        limit: byte cap; default ``ONNXSHAP_MAX_MODEL_BYTES`` or 4 GiB (protobuf's 2 GiB limit applies too).

    Raises:
        ModelLoadError: not a regular file, missing, unreadable, or over the cap.
    """
    cap = model_byte_limit(limit)
    if cap <= PROTOBUF_LIMIT:
        return read_bounded(path, "model", cap, ModelLoadError, f" (raise it with {MAX_MODEL_BYTES_ENV})")
    return read_bounded(path, "model", PROTOBUF_LIMIT, ModelLoadError,
                        " (protobuf's 2 GiB limit: save larger weights as ONNX external data)")


def read_text_file(path: str | os.PathLike, what: str, limit: int = 64 << 20) -> str:
    """A small UTF-8 text file (regular files only, at most ``limit`` bytes)."""
    data = read_bounded(path, what, limit, InputDataError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputDataError(f"{what} file {path} is not UTF-8 text: {exc.reason} at byte "
                             f"{exc.start}") from None


# -- external data -------------------------------------------------------------------------------------------
def _external_entries(tensor) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _inside_folder(folder: Path, location: str, tensor_name: str) -> Path:
    """The resolved path of ``location``, which must be relative and resolve inside ``folder``."""
    if not location or os.path.isabs(location) or Path(location).drive:
        raise ModelLoadError(f"external data of tensor {tensor_name!r} has an absolute or empty location "
                             f"{location!r}; only files inside the model's folder are read")
    target = (folder / location).resolve()
    if folder not in target.parents:
        through = " (through a symlink)" if ".." not in Path(location).parts else ""
        raise ModelLoadError(f"external data of tensor {tensor_name!r} points outside the model's folder: "
                             f"{location!r}{through}")
    return target


def load_external_data(proto, model_path: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Read every external-data tensor of ``proto`` into ``raw_data``, from regular files inside the model's
    folder only, within the model byte cap (the ``.onnx`` file's bytes count against it too); returns the
    files read.

    Raises:
        ModelLoadError: a location outside the folder (``..``, absolute, or a symlink leaving it), a file that
            is not a regular file, a range outside the file, or more bytes than the cap.
    """
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model_path = Path(model_path)
    folder = model_path.resolve().parent
    budget = _Budget(model_byte_limit(limit), ModelLoadError,
                     f"model {model_path} with its external data", MAX_MODEL_BYTES_ENV)
    budget.take(os.stat(model_path).st_size)
    tensors = [t for t in _get_all_tensors(proto) if uses_external_data(t)]
    files: list[Path] = []
    for tensor in tensors:  # every location checked before any is read
        _inside_folder(folder, _external_entries(tensor).get("location", ""), tensor.name)
    for tensor in tensors:
        entries = _external_entries(tensor)
        target = _inside_folder(folder, entries.get("location", ""), tensor.name)
        what = f"external data of tensor {tensor.name!r}"
        try:
            offset, length = int(entries.get("offset", 0)), entries.get("length")
        except ValueError:
            raise ModelLoadError(f"{what}: offset {entries.get('offset')!r} is not a number") from None
        with open_regular(target, what, ModelLoadError) as file:
            size = os.fstat(file.fileno()).st_size
            length = size - offset if length is None else int(length)
            if offset < 0 or length < 0 or offset + length > size:
                raise ModelLoadError(f"{what}: bytes {offset}..{offset + length} lie outside {target.name} "
                                     f"({size} bytes)")
            budget.take(length)
            file.seek(offset)
            tensor.raw_data = file.read(length)
        tensor.data_location = type(tensor).DEFAULT
        del tensor.external_data[:]
        files.append(target)
    return files


def refuse_external_data(proto, where: str) -> None:
    """A ModelProto or bytes has no folder: external data references cannot be resolved safely."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            location = _external_entries(tensor).get("location", "")
            raise ModelLoadError(
                f"{where}: tensor {tensor.name!r} keeps its values in external data file {location!r}, which "
                "cannot be found without the model's folder; pass the model's path instead "
                "(or onnx.load(path), which reads the external data)")


# -- arrays --------------------------------------------------------------------------------------------------
KeysCheck = Callable[[list[str]], None]
ArrayCheck = Callable[[str | None, tuple[int, ...], np.dtype], None]


def _read_npy_header(stream: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of an ``.npy`` stream positioned at its start; reads only the header."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(stream, max_header_size=MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(stream, max_header_size=MAX_HEADER_BYTES)
        else:
            shape, _, dtype = _read_header_any(stream, version)
    except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile) as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise _pickle_error(where) from None
        raise InputDataError(f"{where} is not a readable .npy array: {first_line(exc)}") from None
    return tuple(int(d) for d in shape), np.dtype(dtype), stream.tell()


def _read_header_any(stream: IO[bytes], version: tuple[int, int]):
    """Headers of other .npy versions (3.0: UTF-8): the dict literal after a 4-byte length."""
    if version != (3, 0):
        raise ValueError(f"unsupported .npy format version {version}")
    length = int.from_bytes(stream.read(4), "little")
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"header of {length} bytes is too long")
    header = ast.literal_eval(stream.read(length).decode("utf-8"))
    dtype = np.lib.format.descr_to_dtype(header["descr"])
    return header["shape"], header["fortran_order"], dtype


def _pickle_error(where: str) -> InputDataError:
    return InputDataError(f"{where} holds Python objects that need pickle to load; refused "
                          "(save plain numeric arrays with np.save)")


def check_array_header(where: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Refuse dtypes onnxshap cannot use, before reading any values; returns the array's size in bytes."""
    if dtype.hasobject:
        raise _pickle_error(where)
    if dtype.kind == "c":
        raise InputDataError(f"{where} holds complex values ({dtype}); complex values cannot be explained "
                             "(pass the real and imaginary parts as separate real features)")
    if dtype.kind not in "biuf":
        raise InputDataError(f"{where} has dtype {dtype}; expected numbers (float, int or bool)")
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _sniff(file: IO[bytes], where: str) -> str:
    head = file.read(6)
    file.seek(0)
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head[:4] in ZIP_MAGICS:
        return "npz"
    raise InputDataError(f"{where} is not a .npy/.npz file (NumPy's binary formats; convert text such as "
                         "CSV with np.save)" if head else f"{where} is empty, not a .npy/.npz file")


def load_arrays(path: str | os.PathLike, what: str, *, check_keys: KeysCheck | None = None,
                check_array: ArrayCheck | None = None, limit: int | None = None):
    """An ``.npy`` array or a dict of ``.npz`` arrays, checked before anything is allocated; never unpickles.

    Args:
        path: the file.
        what: how to name it in messages ("data", "background", "data for input 'x'").
        check_keys: called with the ``.npz`` keys before any member is read (raise for unknown names).
        check_array: called with (key or None for ``.npy``, declared shape, dtype) before the array is read.
        limit: byte cap for all arrays of the file (default ``ONNXSHAP_MAX_DATA_BYTES`` or half the RAM).

    Raises:
        InputDataError: not a regular file, not .npy/.npz, pickled objects, complex or non-numeric dtypes,
            an empty .npz, a truncated array, a shape the checks refuse, or more bytes than the cap.
    """
    where = f"{what} file {path}"
    cap = data_byte_limit(limit)
    with open_regular(path, what, InputDataError) as file:
        if _sniff(file, where) == "npy":
            size = os.fstat(file.fileno()).st_size
            return _read_member(file, where, None, check_array, cap, size)
        try:
            archive = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise InputDataError(f"{where} is not a readable .npz file: {first_line(exc)}") from None
        with archive:
            return _read_npz(archive, where, check_keys, check_array, cap)


def _read_npz(archive: zipfile.ZipFile, where: str, check_keys, check_array, cap: int) -> dict:
    members = [info for info in archive.infolist() if not info.is_dir()]
    if not members:
        raise InputDataError(f"{where} holds no arrays")
    keys = [info.filename.removesuffix(".npy") for info in members]
    if len(set(keys)) != len(keys):
        raise InputDataError(f"{where} holds the same array name twice")
    if check_keys is not None:
        check_keys(keys)
    headers = []
    budget = _Budget(cap, InputDataError, f"{where} (its arrays)", MAX_DATA_BYTES_ENV)
    for key, info in zip(keys, members):
        with _open_member(archive, info, where) as stream:
            shape, dtype, offset = _read_npy_header(stream, f"{where} array {key!r}")
        nbytes = check_array_header(f"{where} array {key!r}", shape, dtype)
        if check_array is not None:
            check_array(key, shape, dtype)
        if info.file_size < offset + nbytes:
            raise InputDataError(f"{where} array {key!r} is truncated: shape {shape} {dtype} needs {nbytes} "
                                 f"bytes, the member holds {max(info.file_size - offset, 0)}")
        budget.take(nbytes)
        headers.append((key, info))
    arrays = {}
    for key, info in headers:
        with _open_member(archive, info, where) as stream:
            arrays[key] = _read_values(stream, f"{where} array {key!r}")
    return arrays


def _open_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> IO[bytes]:
    try:
        return archive.open(info)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, ValueError) as exc:
        raise InputDataError(f"{where}: member {info.filename!r} cannot be read: {first_line(exc)}") from None


def _read_member(stream: IO[bytes], where: str, key, check_array, cap: int, size: int) -> np.ndarray:
    shape, dtype, offset = _read_npy_header(stream, where)
    nbytes = check_array_header(where, shape, dtype)
    if check_array is not None:
        check_array(key, shape, dtype)
    if size < offset + nbytes:
        raise InputDataError(f"{where} is truncated: shape {shape} {dtype} needs {nbytes} bytes, the file "
                             f"holds {max(size - offset, 0)}")
    if nbytes > cap:
        raise InputDataError(f"{where} holds {nbytes} bytes, over the limit of {cap} bytes "
                             f"(raise it with {MAX_DATA_BYTES_ENV})")
    stream.seek(0)
    return _read_values(stream, where)


def _read_values(stream: IO[bytes], where: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(stream, allow_pickle=False, max_header_size=MAX_HEADER_BYTES)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputDataError(f"{where} cannot be read: {first_line(exc)}") from None


