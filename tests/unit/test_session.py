"""The vhost-user session without a socket: messages in, replies out, with real fds.

Every fd a message carries is either kept by the session (then it is gone from ``msg.fds``)
or left in ``msg.fds`` for the caller to close, once: a handler never closes one itself, so a
number can never be closed twice (by then it may belong to another file)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlkDevice
from pyvirtio.shims.vhost_user.session import VhostUserSession
from pyvirtio.spec.features import bit
from pyvirtio.storage.raw import RawImage
from pyvirtio.vhost_user.channel import close_fds
from pyvirtio.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FrontendReq,
    MemoryRegionDesc,
    Message,
    ProtocolError,
    ProtocolFeature,
    decode_u64,
    encode_mem_table,
    encode_u64,
)


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


@pytest.fixture
def session(image_path: Path) -> Iterator[VhostUserSession]:
    image = RawImage(str(image_path))
    s = VhostUserSession(BlkDevice(image, num_queues=2))
    s.handle(
        Message(FrontendReq.SET_PROTOCOL_FEATURES, 1, encode_u64(bit(ProtocolFeature.REPLY_ACK)))
    )
    yield s
    s.close()
    image.close()


def _memfd(size: int) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def test_a_region_that_fails_to_map_closes_no_fd(session: VhostUserSession) -> None:
    good, (r, w) = _memfd(1 << 20), os.pipe()
    descs = [
        MemoryRegionDesc(0, 1 << 20, 0x1000_0000, 0),
        MemoryRegionDesc(1 << 20, 4096, 0x2000_0000, 0),
    ]
    msg = Message(
        FrontendReq.SET_MEM_TABLE, 1 | FLAG_NEED_REPLY, encode_mem_table(descs), [good, r]
    )
    reply = session.handle(msg)
    assert reply is not None and decode_u64(reply[0][12:]) == 1  # refused, with a failure ack
    assert msg.fds == [good, r] and all(_is_open(fd) for fd in (good, r))  # the caller's, open
    close_fds(msg.fds)
    os.close(w)
    assert not session.memory_table.entries  # and nothing of it was installed


def test_kept_fds_leave_the_message(session: VhostUserSession) -> None:
    call = os.eventfd(0, os.EFD_CLOEXEC)
    msg = Message(FrontendReq.SET_VRING_CALL, 1 | FLAG_NEED_REPLY, encode_u64(0), [call])
    reply = session.handle(msg)
    assert reply is not None and decode_u64(reply[0][12:]) == 0
    assert msg.fds == []  # kept by the vring, closed with it
    assert os.eventfd_read(call) == 1  # signalled once when it was handed over
    session.reset()
    assert not _is_open(call)


def test_a_mem_table_whose_fds_do_not_match_ends_the_session(session: VhostUserSession) -> None:
    fd = _memfd(4096)
    msg = Message(FrontendReq.SET_MEM_TABLE, 1, encode_mem_table([]), [fd])
    with pytest.raises(ProtocolError):
        session.handle(msg)
    assert msg.fds == [fd] and _is_open(fd)
    os.close(fd)


def test_get_features_answers_without_a_socket(session: VhostUserSession) -> None:
    reply = session.handle(Message(FrontendReq.GET_FEATURES, 1))
    assert reply is not None
    data, fds = reply
    assert fds == [] and decode_u64(data[12:]) & (1 << 30)  # PROTOCOL_FEATURES
