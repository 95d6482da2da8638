"""Safe writes (:class:`OutputSet`, :func:`write_atomic`): every output of onnxshap goes through here.

* Only a missing path or an existing regular file is ever replaced; a target that is an input of the run
  (same inode or same resolved path) is refused.
* Each output is first written to ``.<name>.onnxshap-partial-<pid>`` in the target's folder, flushed and
  fsynced, then renamed over the target. The partial file is removed on any exception, including the
  ``SystemExit`` that :func:`raise_on_sigterm` turns SIGTERM into. A SIGKILL cannot be caught: its partial
  file stays, hidden, and its name (never the output's name or extension) says what it is; delete it.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from onnxshap.errors import OutputFileError, first_line
from onnxshap.files.read import file_kind

PARTIAL_MARK = ".onnxshap-partial-"


# -- writes --------------------------------------------------------------------------------------------------
Writer = Callable[[IO[bytes]], None]


def partial_name(target: Path) -> Path:
    """The temporary file an output is written to before it is renamed over ``target``."""
    return target.with_name(f".{target.name}{PARTIAL_MARK}{os.getpid()}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return a.resolve() == b.resolve()


class OutputSet:
    """Outputs of one run: every target checked before the work, written together after it.

    ``check`` each target first (refuses what must not be replaced, before any work is done); ``stage`` each
    output into its partial file; ``commit`` renames them all. Leaving the ``with`` block by an exception
    removes every partial file, so no output appears unless all of them could be written.
    """

    def __init__(self, inputs: Iterable[str | os.PathLike] = (), make_parents: bool = False) -> None:
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.make_parents = make_parents
        self.targets: list[Path] = []
        self.staged: list[tuple[Path, Path]] = []

    def __enter__(self):  # returns self
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()

    def check(self, path: str | os.PathLike, what: str = "output") -> Path:
        """Refuse ``path`` unless writing it can only create a file or replace a regular one that no input of
        the run is; returns the absolute target path."""
        target = Path(os.path.abspath(os.fspath(path)))
        try:
            info = os.stat(target)
        except FileNotFoundError:
            info = None
        except OSError as exc:
            reason = exc.strerror or first_line(exc)
            raise OutputFileError(f"{what} {path} cannot be checked: {reason}") from None
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise OutputFileError(f"{what} {path} is {file_kind(info.st_mode)}; onnxshap only replaces regular "
                                  "files")
        for source in self.inputs:
            if _same_file(target, source):
                raise OutputFileError(f"{what} {path} is the input file {source}; refused (it would be "
                                      "overwritten)")
        for other in self.targets:
            if _same_file(target, other):
                raise OutputFileError(f"{what} {path} is also another output of this run")
        self._check_folder(target.parent, what, path)
        self.targets.append(target)
        return target

    def _check_folder(self, folder: Path, what: str, path) -> None:
        if not folder.exists():
            if self.make_parents:
                return
            raise OutputFileError(f"{what} {path}: folder {folder} does not exist")
        if not folder.is_dir():
            raise OutputFileError(f"{what} {path}: {folder} is not a folder")
        probe = partial_name(folder / f"probe-{len(self.targets)}")
        try:  # a real attempt: permissions, read-only file systems and root's privileges all show here
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise OutputFileError(f"{what} {path}: cannot write in folder {folder}: "
                                  f"{exc.strerror or first_line(exc)}") from None

    def stage(self, target: Path, writer: Writer) -> None:
        """Write one output into its partial file (flushed and fsynced)."""
        if self.make_parents:
            target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = _create_partial(target)
        self.staged.append((partial, target))
        with os.fdopen(fd, "wb") as file:
            writer(file)
            file.flush()
            os.fsync(file.fileno())

    def commit(self) -> None:
        """Rename every staged partial file over its target."""
        for partial, target in self.staged:
            info = _stat_or_none(target)
            if info is not None and not stat.S_ISREG(info.st_mode):
                raise OutputFileError(f"output {target} became {file_kind(info.st_mode)} during the run; refused")
            os.replace(partial, target)
        self.staged.clear()

    def discard(self) -> None:
        """Remove every staged partial file that was not committed."""
        for partial, _ in self.staged:
            try:
                os.unlink(partial)
            except FileNotFoundError:
                pass
        self.staged.clear()


def _create_partial(target: Path) -> tuple[int, Path]:
    """Create the partial file for ``target`` exclusively: ``partial_name(target)``, or with ``-1``, ``-2``,
    ... appended when another writer in this process (or a stale file of a reused pid) holds that name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    base = partial_name(target)
    for attempt in range(1000):
        partial = base if attempt == 0 else base.with_name(f"{base.name}-{attempt}")
        try:
            return os.open(partial, flags, 0o666), partial
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputFileError(f"cannot write {target}: {exc.strerror or first_line(exc)}") from None
    raise OutputFileError(f"cannot write {target}: too many partial files named {base.name}-N in its folder")


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def write_atomic(path: str | os.PathLike, writer: Writer, inputs: Iterable[str | os.PathLike] = (),
                 make_parents: bool = False) -> Path:
    """Write one file atomically: ``writer(file)`` fills a partial file in the target's folder, which is then
    renamed over ``path``. Refuses a target that is not a regular file or is one of ``inputs``; creates
    missing parent folders only with ``make_parents``.

    Raises:
        OutputFileError: the target or its folder cannot be written as asked (nothing is written).
    """
    with OutputSet(inputs, make_parents=make_parents) as outputs:
        target = outputs.check(path)
        outputs.stage(target, writer)
        outputs.commit()
    return target


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so that ``finally`` blocks (and partial-file clean-up) run."""


def raise_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` (exit status 143) instead of killing the process outright."""
    def handler(signum, frame):
        raise Terminated(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
