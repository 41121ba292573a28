"""Connection-level faults: a front-end that disconnects at any byte of a session, stalls in
the middle of a message, stops reading, floods, or connects beside another one."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.vhost_user.protocol import HEADER, FrontendReq
from tests.hostile.conftest import Daemon, checked_daemon
from tests.hostile.frontend import (
    message,
    raw_connect,
    record_session,
    replay_cut,
    serve_well,
    session,
)

PEER_TIMEOUT = 1.0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon whose peers time out after 1 s."""
    with checked_daemon(tmp_path, "--peer-timeout", str(PEER_TIMEOUT)) as d:
        yield d


def test_disconnect_at_every_byte_of_a_session(daemon: Daemon) -> None:
    """A complete session (negotiation, memory, in-flight area, vrings, I/O set-up) cut
    after every byte: each cut ends that session only, and the daemon serves the next."""
    messages = record_session(daemon.socket)
    total = sum(len(m.data) for m in messages)
    assert total > 500 and any(m.fds for m in messages)
    threads = daemon.threads()
    for cut in range(1, total + 1):
        replay_cut(daemon.socket, messages, cut)
        if cut % 200 == 0:
            assert daemon.alive(), daemon.log()[-3000:]
    serve_well(daemon.socket)
    time.sleep(0.5)
    assert daemon.threads() <= threads, "threads left behind by ended sessions"


def test_stall_in_the_middle_of_a_message(daemon: Daemon) -> None:
    stalled = raw_connect(daemon.socket)
    stalled.sendall(HEADER.pack(FrontendReq.GET_FEATURES, 1, 8)[:7])
    start = time.monotonic()
    serve_well(daemon.socket, timeout=PEER_TIMEOUT * 4 + 5)
    assert time.monotonic() - start < PEER_TIMEOUT * 4 + 5
    assert stalled.recv(16) == b""  # its session was ended
    stalled.close()


def test_front_end_that_never_reads_its_replies(daemon: Daemon) -> None:
    s = raw_connect(daemon.socket)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    burst = message(FrontendReq.GET_FEATURES) * 1000
    try:
        for _ in range(100):
            s.sendall(burst)
    except OSError:
        pass  # the daemon gave up on us
    serve_well(daemon.socket, timeout=PEER_TIMEOUT * 4 + 5)
    s.close()


def test_second_front_end_is_refused_while_one_is_connected(daemon: Daemon) -> None:
    with session(daemon.socket) as first:
        second = raw_connect(daemon.socket, timeout=PEER_TIMEOUT * 4 + 5)
        second.sendall(message(FrontendReq.GET_FEATURES))
        try:
            answer = second.recv(64)
        except ConnectionResetError:  # closed with our message unread: refused all the same
            answer = b""
        assert answer == b"", "two front-ends on one device"
        second.close()
        assert first.fe.get_queue_num() == 2  # the first one is undisturbed


def test_a_flood_of_connections(daemon: Daemon) -> None:
    conns = [raw_connect(daemon.socket) for _ in range(64)]
    for c in conns:
        c.close()
    serve_well(daemon.socket, timeout=PEER_TIMEOUT * 4 + 10)


def test_a_flood_of_fds(daemon: Daemon) -> None:
    """Kick, call and err fds replaced thousands of times: the daemon holds only the last."""
    with session(daemon.socket) as s:
        s.set_mem_table()
        q = s.add_queue()
        for _ in range(300):
            for request in (FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR):
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                s.fe.set_vring_fd(request, 0, fd)
                os.close(fd)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        s.own(kick)
        s.own(call)
        s.start_queue(q, kick=kick, call=call)
        assert daemon.fd_count() < 64
