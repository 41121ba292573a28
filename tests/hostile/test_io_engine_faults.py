"""A hostile front-end against the io_uring engine and a polling queue: requests in flight on
the kernel's ring when the connection breaks, the memory table changes or the ring is stopped,
and requests whose buffers the guest makes as fragmented or as large as the ring allows. After
each, the daemon (``pyvirtio blk --io-engine io_uring --poll-us``) must still serve, hold no
leaked fd and have logged no traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvirtio.spec.blk import REQ_HEADER, BlkRequestType
from pyvirtio.storage.io_uring import available
from tests.hostile.conftest import IMAGE_SIZE, checked_daemon
from tests.hostile.frontend import eventfd, session

pytestmark = pytest.mark.skipif(available() is not None, reason=f"no io_uring: {available()}")
ENGINE = ("--io-engine", "io_uring", "--poll-us", "200")


def test_connection_closed_with_requests_in_flight(tmp_path: Path) -> None:
    with checked_daemon(tmp_path, *ENGINE) as d:
        assert "I/O engine UringImage" in d.log()
        for rnd in range(10):
            with session(d.socket) as s:
                s.set_mem_table()
                q = s.add_queue(256)
                kick = s.own(eventfd())
                s.start_queue(q, kick=kick, call=s.own(eventfd()))
                for i in range(80):
                    s.submit_read(q, (rnd * 80 + i) * 8, 16384)
                os.eventfd_write(kick, 1)
            # closed at once: the daemon's queue still has reads on its ring


def test_memory_table_changes_and_ring_stops_with_requests_in_flight(tmp_path: Path) -> None:
    with checked_daemon(tmp_path, *ENGINE) as d, session(d.socket) as s:
        s.set_mem_table()
        q = s.add_queue(256)
        kick = s.own(eventfd())
        s.start_queue(q, kick=kick, call=s.own(eventfd()))
        for i in range(40):
            s.submit_read(q, i * 8, 16384)
        os.eventfd_write(kick, 1)
        s.set_mem_table()  # the same table again: the queue stops and goes on
        for i in range(40):
            s.submit_read(q, i * 8, 16384)
        os.eventfd_write(kick, 1)
        s.fe.get_vring_base(q.index)  # stopped with whatever is left in flight


def test_fragmented_and_out_of_range_requests(tmp_path: Path) -> None:
    """A chain of single-byte buffers (more iovecs than a slot keeps), and requests past the
    end of the image: each fails or succeeds on its own."""
    with checked_daemon(tmp_path, *ENGINE) as d, session(d.socket) as s:
        s.set_mem_table()
        q = s.add_queue(256)
        kick = s.own(eventfd())
        s.start_queue(q, kick=kick, call=s.own(eventfd()))
        header = s.allocator.alloc(16)
        s.memory.write(header, REQ_HEADER.pack(BlkRequestType.IN, 0, 0))
        pieces = [(s.allocator.alloc(2), 2) for _ in range(200)]
        status = s.allocator.alloc(1)
        q.add([(header, 16)], [*pieces, (status, 1)], "frag", indirect=False)
        for sector in (IMAGE_SIZE // 512 - 1, IMAGE_SIZE // 512, 1 << 60):
            s.submit_read(q, sector, 4096)
        os.eventfd_write(kick, 1)
