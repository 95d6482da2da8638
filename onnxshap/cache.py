"""A per-model cache of augmented graphs and Keras exports, so a fresh process skips the work it repeats.

What is kept, one file per entry in the user cache folder:

- ``augmented-<key>.osc``: the augmented graph of a plan, and how to read it (:class:`AugmentedModel`). The key
  hashes what the graph is built from — the lowered model's bytes and every fact the probe learned, the
  explained tensors and outputs — plus the versions of onnx, onnx-ir and a digest of onnxshap's own source
  files, so any change to the code or the model makes a new key. Not the background's values: they are fed at
  run time, and the lowering (which reads them) runs on every construction anyway, so its checks still hold.
- ``export-<key>.osc``: the ONNX export of a Keras model built only from Keras's own layers (a functional or
  sequential model): keyed by its architecture (``to_json``), its weights, the input shapes and dtypes, and the
  Keras, TensorFlow and tf2onnx versions. The export was checked against Keras when it was made. Subclassed
  models or custom layers (their ``call`` is code the key cannot see) and torch modules are exported every time.

A file is a JSON header (its byte length first, 8 bytes little-endian) then the body; the header holds the
body's SHA-256 and the entry's kind and key. An entry that does not read back exactly (truncated, edited,
another format) is ignored and removed. Files are written with :func:`onnxshap.files.write.write_atomic`.

The folder is ``$ONNXSHAP_CACHE_DIR`` if set, else the platform's user cache folder (``$XDG_CACHE_HOME`` or
``~/.cache`` on Linux, ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows) + ``onnxshap``. It is
safe to delete at any time. ``ONNXSHAP_CACHE=0`` (or ``DeepExplainer(..., cache=False)``, ``--no-cache``) turns
the cache off. When the folder passes ``ONNXSHAP_CACHE_SIZE`` bytes (default 2 GiB) the least recently used
entries are removed; models whose augmented graph needs external data (over 2 GB) are not cached.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import struct
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxshap import runtime
from onnxshap.augment.build import AugmentedModel
from onnxshap.augment.plan import Plan
from onnxshap.errors import OnnxShapError
from onnxshap.files.model_files import needs_external_data
from onnxshap.files.write import write_atomic

FORMAT = 1  # bumped when the file layout changes
SUFFIX = ".osc"
DEFAULT_SIZE = 2 << 30
_OFF = ("0", "false", "no", "off")


def folder() -> Path | None:
    """The cache folder, or None when the cache is off (``ONNXSHAP_CACHE=0``)."""
    if os.environ.get("ONNXSHAP_CACHE", "1").strip().lower() in _OFF:
        return None
    explicit = os.environ.get("ONNXSHAP_CACHE_DIR")
    if explicit:
        return Path(explicit)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "onnxshap" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "onnxshap"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "onnxshap"


@functools.cache
def code_digest() -> str:
    """SHA-256 over onnxshap's own source files (and the converters it installs): a code change is a new key."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    roots = [package] + [Path(p).resolve() for p in _converters_paths()]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _converters_paths() -> list[str]:
    try:
        import onnxshap.converters as converters
    except ImportError:  # pragma: no cover - the converters are part of the install
        return []
    return [p for p in getattr(converters, "__path__", []) if Path(p).resolve() != Path(__file__).resolve().parent]


def _versions(*names: str) -> list[str]:
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return found


def _canonical(value):
    """A JSON-able, order-independent form of the lowered model's facts."""
    if isinstance(value, dict):
        return sorted([str(k), _canonical(v)] for k, v in value.items())
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)  # numpy dtypes, guards


# -- augmented graphs ---------------------------------------------------------------------------------------
def augmented_key(plan: Plan) -> str:
    """The key of ``plan``'s augmented graph (see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(_canonical_bytes(plan.lowered.model))
    facts = {f.name: getattr(plan.lowered, f.name) for f in dataclasses.fields(plan.lowered) if f.name != "model"}
    header = {"facts": _canonical(facts), "explained": plan.explained, "outputs": plan.outputs,
              "code": code_digest(), "versions": _versions("onnx", "onnx-ir")}
    digest.update(json.dumps(header, sort_keys=True).encode())
    return digest.hexdigest()


def _canonical_bytes(model: ir.Model) -> bytes:
    """The model's bytes with its initializers and value infos in name order (lowering leaves them in an order
    that varies from run to run; the nodes' order is the graph's topological sort)."""
    proto = runtime.to_proto(model)
    for field in (proto.graph.initializer, proto.graph.value_info):
        ordered = sorted(field, key=lambda item: item.name)
        del field[:]
        field.extend(ordered)
    return proto.SerializeToString()


def cached_augmented(plan: Plan, build: Callable[[Plan], AugmentedModel]) -> AugmentedModel:
    """``build(plan)``, read from the cache when an entry for ``plan`` exists, written to it when not."""
    where = folder()
    if where is None:
        return build(plan)
    key = augmented_key(plan)
    path = where / f"augmented-{key}{SUFFIX}"
    found = _read(path, "augmented", key)
    if found is not None:
        header, body = found
        try:
            fields = {k: header["fields"][k] for k in _AUGMENTED_FIELDS}
            fields["value_shapes"] = [tuple(s) for s in fields["value_shapes"]]
            return CachedAugmentedModel(body, fields)
        except (KeyError, TypeError):  # an entry that does not read back is a miss
            _remove(path)
    result = build(plan)
    if needs_external_data(result.model):
        return result
    fields = {k: getattr(result, k) for k in _AUGMENTED_FIELDS}
    serialized = runtime.to_proto(result.model).SerializeToString()
    _write(where, path, {"kind": "augmented", "key": key, "fields": fields}, serialized)
    return dataclasses.replace(result, serialized=serialized)  # the session is made from the bytes just written


_AUGMENTED_FIELDS = tuple(f.name for f in dataclasses.fields(AugmentedModel) if f.name not in ("model", "serialized"))


class CachedAugmentedModel(AugmentedModel):
    """An augmented model read from the cache: ONNX Runtime gets its bytes as they are; the graph object
    (``model``, for saving it) is parsed only when asked for (parsing costs about what building did)."""

    def __init__(self, payload: bytes, fields: dict) -> None:
        for name, value in fields.items():
            setattr(self, name, value)
        self.serialized = payload

    @functools.cached_property
    def model(self) -> ir.Model:  # type: ignore[override]
        return ir.from_proto(onnx.ModelProto.FromString(self.serialized))


# -- Keras exports ------------------------------------------------------------------------------------------
def keras_key(model, arrays: list[np.ndarray]) -> str | None:
    """The key of a Keras model's export, or None when the model is not made of Keras's own layers only."""
    module = type(model).__module__ or ""
    if not module.startswith(("keras", "tf_keras")) or type(model).__name__ not in ("Functional", "Sequential"):
        return None
    if any(not (type(layer).__module__ or "").startswith(("keras", "tf_keras")) for layer in _layers(model)):
        return None
    try:
        architecture = model.to_json()
        weights = model.get_weights()
    except Exception:  # noqa: BLE001 - a model that cannot describe itself is not cached
        return None
    digest = hashlib.sha256(architecture.encode())
    for weight in weights:
        array = np.ascontiguousarray(weight)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    header = {"inputs": [[a.dtype.str, list(a.shape[1:])] for a in arrays], "code": code_digest(),
              "versions": _versions("keras", "tf-keras", "tensorflow", "tf2onnx", "onnx")}
    digest.update(json.dumps(header, sort_keys=True).encode())
    return digest.hexdigest()


def _layers(model) -> list:
    """Every layer of a Keras model, nested ones (Bidirectional's, a sub-model's) included."""
    found, stack = [], list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        found.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
        stack.extend(getattr(layer, attr) for attr in ("forward_layer", "backward_layer", "layer")
                     if getattr(layer, attr, None) is not None)
    return found


def cached_export(model, arrays: list[np.ndarray], export: Callable[[], onnx.ModelProto]) -> onnx.ModelProto:
    """``export()``, read from the cache for a Keras model of Keras's own layers (see the module docstring)."""
    where = folder()
    key = keras_key(model, arrays) if where is not None else None
    if key is None:
        return export()
    path = where / f"export-{key}{SUFFIX}"
    found = _read(path, "export", key)
    if found is not None:
        try:
            return onnx.ModelProto.FromString(found[1])
        except Exception:  # noqa: BLE001 - any entry that does not read back is a miss
            _remove(path)
    proto = export()
    _write(where, path, {"kind": "export", "key": key}, proto.SerializeToString())
    return proto


# -- files --------------------------------------------------------------------------------------------------
def _read(path: Path, kind: str, key: str) -> tuple[dict, bytes] | None:
    """The header and body of the entry at ``path``, or None (a missing, foreign or damaged entry is a miss)."""
    try:
        payload = path.read_bytes()
    except OSError:
        return None
    try:
        (length,) = struct.unpack("<Q", payload[:8])
        header = json.loads(payload[8:8 + length])
        body = payload[8 + length:]
        valid = header.get("format") == FORMAT and header.get("kind") == kind and header.get("key") == key and \
            header.get("sha256") == hashlib.sha256(body).hexdigest()
    except (struct.error, ValueError, AttributeError):
        valid = False
    if not valid:
        _remove(path)
        return None
    try:
        os.utime(path)  # recently used: kept when the folder is trimmed
    except OSError:
        pass
    return header, body


def _write(where: Path, path: Path, header: dict, body: bytes) -> None:
    """Write one entry atomically, then trim the folder; a cache that cannot be written is skipped."""
    header = {**header, "format": FORMAT, "sha256": hashlib.sha256(body).hexdigest()}
    encoded = json.dumps(header).encode()
    try:
        where.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda file: (file.write(struct.pack("<Q", len(encoded))), file.write(encoded),
                                         file.write(body)))
        _trim(where)
    except (OSError, OnnxShapError):
        pass


def _trim(where: Path) -> None:
    """Remove the least recently used entries until the folder holds at most ``ONNXSHAP_CACHE_SIZE`` bytes."""
    try:
        limit = int(os.environ.get("ONNXSHAP_CACHE_SIZE", DEFAULT_SIZE))
    except ValueError:
        limit = DEFAULT_SIZE
    entries = []
    for path in where.glob(f"*{SUFFIX}"):
        try:
            info = path.stat()
        except OSError:
            continue
        entries.append((info.st_mtime, info.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        _remove(path)
        total -= size


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
