"""Checkpoints of a long run (the CLI's ``--resume``): completed sample chunks kept beside the output.

A run is identified by a fingerprint: SHA-256 over the bytes of the model (and its external data), the data and
background arrays (names, dtypes, shapes, bytes) and every option that changes the values. Its checkpoints live in
the hidden folder ``.<output name>.onnxshap-resume-<fingerprint>`` in the output's folder — never the output's
name or extension, and never used by a run with another fingerprint. Each file ``rows-<start>-<stop>.npz`` holds
the values of rows ``start:stop`` (one or more completed sample chunks), written atomically through
:func:`onnxshap.files.write.write_atomic`; a killed run leaves only whole files. Files are written at most every
:data:`CHECKPOINT_SECONDS` seconds (the rows completed since the last one), and the folder is removed when the
run's outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from onnxshap.errors import OnnxShapError, OutputFileError
from onnxshap.files.read import load_arrays, open_regular
from onnxshap.files.write import write_atomic

RESUME_MARK = ".onnxshap-resume-"
CHECKPOINT_SECONDS = 10.0  # at most one checkpoint file per this many seconds
_FILE = re.compile(r"rows-(\d+)-(\d+)\.npz")
_READ_BLOCK = 1 << 24


def fingerprint(files: Iterable[str | os.PathLike], arrays: Mapping[str, Mapping[str, np.ndarray]],
                options: Mapping[str, object]) -> str:
    """SHA-256 (hex) of the files' bytes, the arrays (by group and name: dtype, shape, bytes) and the options
    (JSON with sorted keys). Files are read in blocks, arrays hashed in place."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"file {os.fspath(path)}\n".encode())
        with open_regular(path, "checkpointed file") as stream:
            while block := stream.read(_READ_BLOCK):
                digest.update(block)
    for group in sorted(arrays):
        for name in sorted(arrays[group]):
            array = np.ascontiguousarray(arrays[group][name])
            digest.update(f"array {group}/{name} {array.dtype.str} {array.shape}\n".encode())
            digest.update(memoryview(array.reshape(-1).view(np.uint8)))
    digest.update(json.dumps(dict(options), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def checkpoint_folder(output: Path, run_fingerprint: str) -> Path:
    """The hidden folder beside ``output`` that holds the checkpoints of the run ``run_fingerprint``."""
    return output.with_name(f".{output.name}{RESUME_MARK}{run_fingerprint[:32]}")


def stale_folders(output: Path, run_fingerprint: str) -> list[Path]:
    """Checkpoint folders of other runs for the same output (never used; the user may delete them)."""
    mine = checkpoint_folder(output, run_fingerprint)
    return sorted(p for p in output.parent.glob(f".{output.name}{RESUME_MARK}*") if p != mine)


class Checkpoints:
    """The checkpoints of one run: :meth:`restore` what a previous attempt completed, :meth:`save` as it goes.

    Args:
        output: the run's output file.
        run_fingerprint: see :func:`fingerprint`.
    """

    def __init__(self, output: Path, run_fingerprint: str) -> None:
        self.folder = checkpoint_folder(output, run_fingerprint)
        self.restored_rows = 0
        self._pending: tuple[int, int] | None = None
        self._last = time.monotonic()

    def _files(self) -> list[tuple[int, int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(_FILE.fullmatch(p.name), p) for p in self.folder.iterdir()]
        return sorted((int(m[1]), int(m[2]), p) for m, p in found if m)

    def restore(self, values: list[np.ndarray], chunk_size: int) -> set[int]:
        """Copy every saved file whose rows are whole sample chunks of ``chunk_size`` into ``values``; return
        the first rows of the chunks restored. A file that cannot be read or does not fit is skipped (its rows
        are computed again)."""
        n, done = values[0].shape[0], set()
        for start, stop, path in self._files():
            if start % chunk_size or not (stop == n or stop % chunk_size == 0) or not start < stop <= n:
                continue
            saved = self._read(path, [v[start:stop] for v in values])
            if saved is None:
                continue
            for store, array in zip(values, saved):
                store[start:stop] = array
            done.update(range(start, stop, chunk_size))
            self.restored_rows += stop - start
        return done

    @staticmethod
    def _read(path: Path, like: list[np.ndarray]) -> list[np.ndarray] | None:
        try:
            arrays = load_arrays(path, "checkpoint")
        except (OnnxShapError, OSError, ValueError):
            return None
        if not isinstance(arrays, dict) or sorted(arrays) != [f"values_{i}" for i in range(len(like))]:
            return None
        saved = [arrays[f"values_{i}"] for i in range(len(like))]
        if any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(saved, like)):
            return None
        return saved

    def save(self, start: int, stop: int, values: list[np.ndarray]) -> None:
        """Note rows ``start:stop`` as complete; write the rows completed since the last file when
        :data:`CHECKPOINT_SECONDS` have passed."""
        first = start if self._pending is None else self._pending[0]
        self._pending = (first, stop)
        if time.monotonic() - self._last >= CHECKPOINT_SECONDS:
            self.flush(values)

    def flush(self, values: list[np.ndarray]) -> None:
        """Write the pending rows now."""
        if self._pending is None:
            return
        start, stop = self._pending
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise OutputFileError(f"cannot create the checkpoint folder {self.folder}: {exc.strerror}") from None
        arrays = {f"values_{i}": v[start:stop] for i, v in enumerate(values)}
        write_atomic(self.folder / f"rows-{start:012d}-{stop:012d}.npz", lambda file: np.savez(file, **arrays))
        self._pending, self._last = None, time.monotonic()

    def remove(self) -> None:
        """Delete this run's checkpoint files and their folder (only files this module names)."""
        for _, _, path in self._files():
            path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except FileNotFoundError:
            pass
