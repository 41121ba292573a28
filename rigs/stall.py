"""A stalled disk under a back-end: its storage calls wait while a flag file exists.

A guest kernel that crashes needs seconds (under TCG) to boot its kdump kernel, and a back-end
finishes the old kernel's requests in milliseconds. For the kdump kernel's reset to find
requests in flight, the tests stall the back-end's storage while it serves them and let it go
on only once the back-end says that the reset came while it was serving requests.

``python3 stall.py run FLAG MODULE ARGS...`` runs ``python3 -m MODULE ARGS...`` with
``os.preadv``, ``os.pwritev`` (at an offset: not an eventfd's read at the file position) and
``os.fdatasync`` waiting while the file FLAG exists (:func:`hold_storage`), and so does the
reaping of io_uring completions (the io_uring engine: the kernel still does the I/O, the
back-end sees none of it finish); a call that waits first creates ``FLAG.held``. The
back-end's code is untouched and the rest of it (the vhost-user session, the Xen IOREQ
thread) keeps running, as with a real disk that stopped answering: only the system calls under
the storage are slow.
(Stopping the whole process instead is not the same: the back-end could finish the old
requests in the moment between being let go and reading the reset, and under Xen the guest's
vCPU would wait for the stopped IOREQ thread at its next register access.)

Standard library only: dom0 runs this file with its own python3.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from collections.abc import Callable
from typing import Any

#: The calls of :mod:`os` that the storage layer (pyvirtio.storage.raw) moves data with.
STORAGE_CALLS = ("preadv", "pwritev", "fdatasync")
POLL = 0.05  # seconds between looks at the flag


def hold_storage(flag: str) -> None:
    """From now on, in this process, :data:`STORAGE_CALLS` wait while the file ``flag``
    exists; one that waits first creates ``flag + ".held"``."""

    def stalled(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            # Offset -1 is I/O at the file position: an eventfd drained (runner.py), never
            # the image, whose I/O is positional.
            positional = len(args) < 3 or args[2] != -1
            if positional and os.path.exists(flag):
                with open(flag + ".held", "w"):
                    pass
                while os.path.exists(flag):
                    time.sleep(POLL)
            return real(*args, **kwargs)

        return call

    for name in STORAGE_CALLS:
        setattr(os, name, stalled(getattr(os, name)))
    try:
        from pyvirtio.storage.io_uring import Ring
    except ImportError:  # a back-end without the io_uring engine
        return
    Ring.reap = stalled(Ring.reap)  # type: ignore[method-assign]


def command(python: str, flag: str, module: str, *args: str) -> list[str]:
    """The command line that runs ``python -m module args`` with its storage held on ``flag``."""
    return [python, os.path.abspath(__file__), "run", flag, module, *args]


def main(argv: list[str]) -> int:
    """``stall.py run FLAG MODULE [ARGS...]``: run MODULE as ``python -m`` would, its storage
    calls held while FLAG exists."""
    if len(argv) < 3 or argv[0] != "run":
        print(main.__doc__, file=sys.stderr)
        return 2
    # As ``python -m``: the working directory first on the path, not this file's folder.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path[0] = os.getcwd()
    hold_storage(argv[1])
    sys.argv = [argv[2], *argv[3:]]
    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
