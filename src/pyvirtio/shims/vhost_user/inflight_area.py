"""The in-flight tracking area of INFLIGHT_SHMFD: shared memory the front-end keeps across
back-end restarts, one region per queue (``virtqueue/inflight.py`` has the layout).

GET_INFLIGHT_FD allocates it (a sealed memfd, handed to the front-end); SET_INFLIGHT_FD maps
the one the front-end gives back, which is checked like any memory from a peer. The area only
changes while no ring runs.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os

from pyvirtio.shims.vhost_user.fds import PeerFdError, check_memory_fd
from pyvirtio.vhost_user.protocol import InflightDesc
from pyvirtio.virtqueue.inflight import InflightRegion, queue_region_size

log = logging.getLogger(__name__)


class InflightError(Exception):
    """An in-flight area that cannot be used."""


def check_request(desc: InflightDesc, num_queues: int) -> None:
    if not 0 < desc.num_queues <= num_queues:
        raise InflightError(f"in-flight area for {desc.num_queues} queues")
    size = desc.queue_size
    if not 0 < size <= 32768 or size & (size - 1):
        raise InflightError(f"in-flight area for queues of {size} descriptors")


def allocate(desc: InflightDesc, largest_ring: int) -> tuple[InflightDesc, int]:
    """A fresh area for GET_INFLIGHT_FD: (what to map it as, its memfd).

    Each queue's region is sized for the largest ring the device accepts, not only for the
    size the front-end asks about: QEMU's virtio-mmio devices ask for their queue-size
    property and then use 1024-entry rings. Regions describe their own size, so the
    front-end's numbers on SET_INFLIGHT_FD do not matter.
    """
    entries = max(desc.queue_size, largest_ring)
    size = desc.num_queues * queue_region_size(entries)
    fd = os.memfd_create("pyvirtio-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        )
    except BaseException:
        os.close(fd)
        raise
    return InflightDesc(size, 0, desc.num_queues, entries), fd


class InflightArea:
    """One mapped area and its per-queue regions."""

    def __init__(self, fd: int, desc: InflightDesc) -> None:
        """Map ``desc.mmap_size`` bytes of ``fd`` (left open: the caller closes it) split evenly
        between ``desc.num_queues`` queues; raises InflightError."""
        step = desc.mmap_size // desc.num_queues
        if step < queue_region_size(4) or step % 64:
            raise InflightError(
                f"in-flight area of {desc.mmap_size} bytes for {desc.num_queues} queues"
            )
        try:
            check_memory_fd(fd, desc.mmap_offset, desc.mmap_size, "in-flight area")
            self._map = mmap.mmap(
                fd, desc.mmap_size, flags=mmap.MAP_SHARED, offset=desc.mmap_offset
            )
        except PeerFdError as exc:
            raise InflightError(str(exc)) from None
        except (OSError, ValueError, OverflowError) as exc:
            raise InflightError(f"cannot map the in-flight area: {exc}") from None
        self.regions: list[InflightRegion] = []
        view = memoryview(self._map)
        try:
            for i in range(desc.num_queues):
                self.regions.append(InflightRegion.attach(view[i * step : (i + 1) * step]))
        except ValueError as exc:
            self.close()
            raise InflightError(str(exc)) from None
        finally:
            view.release()

    def close(self) -> None:
        """Unmap; the queues must have let go of their regions (``attach_inflight(None)``)."""
        for region in self.regions:
            region.release()
        self.regions = []
        try:
            self._map.close()
        except BufferError:
            log.warning("in-flight area still referenced; unmapped when released")
