"""The dirty log of LOG_SHMFD: the bitmap a front-end shares for live migration
(``memory/dirty_log.py`` says what its bits mean).

SET_LOG_BASE hands it over as an fd, checked like any memory from a peer (a memfd that cannot
shrink under us, holding the whole range), and mapped shared: the front-end reads and clears
what the device's queues set.
"""

from __future__ import annotations

import logging
import mmap

from pyvirtio.memory.dirty_log import DirtyLog
from pyvirtio.shims.vhost_user.fds import PeerFdError, check_memory_fd
from pyvirtio.vhost_user.protocol import LogDesc

log = logging.getLogger(__name__)


class LogAreaError(Exception):
    """A dirty log that cannot be used."""


class LogArea:
    """One mapped dirty log."""

    def __init__(self, fd: int, desc: LogDesc) -> None:
        """Map ``desc.mmap_size`` bytes of ``fd`` (left open: the caller closes it)."""
        try:
            check_memory_fd(fd, desc.mmap_offset, desc.mmap_size, "dirty log")
            self._map = mmap.mmap(
                fd, desc.mmap_size, flags=mmap.MAP_SHARED, offset=desc.mmap_offset
            )
        except PeerFdError as exc:
            raise LogAreaError(str(exc)) from None
        except (OSError, ValueError, OverflowError) as exc:
            raise LogAreaError(f"cannot map the dirty log: {exc}") from None
        self.dirty_log = DirtyLog(memoryview(self._map))
        self.size = desc.mmap_size

    def close(self) -> None:
        """Unmap; no queue may log into it any more (the device was given another log)."""
        self.dirty_log.release()
        try:
            self._map.close()
        except BufferError:
            log.warning("dirty log still referenced; unmapped when released")
