"""Peak resident set size of a command, measured so that the test process's own size does not leak in.

Linux carries a process's peak RSS across ``fork`` and ``exec``: a child of a 10 GB pytest process reports a
peak of at least 10 GB through ``os.wait4``. The command is therefore started by this file run as a script (a
small trampoline), whose few megabytes are all the command inherits; the trampoline waits for it and writes
``<peak KiB> <exit code>`` to a report file. Use :func:`wrap` for the command line and :func:`read` after the
trampoline exits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def wrap(args: list, report: Path) -> list[str]:
    """The command line that runs ``args`` under the trampoline, reporting into ``report``."""
    return [sys.executable, "-S", __file__, str(report), *map(str, args)]


def read(report: Path) -> tuple[int, int]:
    """(peak RSS in KiB, exit code; negative for a signal) of the command the trampoline ran."""
    peak, code = Path(report).read_text().split()
    return int(peak), int(code)


def _main() -> None:
    report, *command = sys.argv[1:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    Path(report).write_text(f"{usage.ru_maxrss} {code}")
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    _main()
