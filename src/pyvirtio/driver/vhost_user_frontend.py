"""The front-end side of vhost-user: what QEMU does, for tests and the load generator.

Every request waits at most ``timeout`` seconds for its reply; a back-end that answers wrongly,
hangs or goes away raises :class:`FrontendError`, never hangs the caller.
"""

from __future__ import annotations

import os
import socket

from pyvirtio.unix_socket import SocketError, connected_socket
from pyvirtio.vhost_user.channel import recv_message, send_message
from pyvirtio.vhost_user.protocol import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    ConfigPayload,
    FrontendReq,
    InflightDesc,
    LogDesc,
    MemoryRegionDesc,
    Message,
    ProtocolError,
    ProtocolFeature,
    VringAddr,
    VringState,
    decode_u64,
    encode,
    encode_mem_table,
    encode_u64,
)


class FrontendError(Exception):
    """The back-end did not answer as the protocol says."""


class VhostUserFrontend:
    """A connection to a vhost-user back-end."""

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        try:
            self.sock = connected_socket(path, timeout)
        except SocketError as exc:
            raise FrontendError(str(exc)) from None
        self.protocol_features = 0
        self.backend_channel: socket.socket | None = None

    def close(self) -> None:
        self.sock.close()
        if self.backend_channel is not None:
            self.backend_channel.close()

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------

    def _send(
        self, request: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = 0
    ) -> None:
        try:
            send_message(self.sock, encode(request, payload, flags), fds or [])
        except OSError as exc:
            raise FrontendError(f"{FrontendReq(request).name}: send failed: {exc}") from None

    def _recv(self, request: int) -> Message:
        try:
            msg = recv_message(self.sock)
        except TimeoutError:
            raise FrontendError(
                f"{FrontendReq(request).name}: no reply within {self.timeout} s"
            ) from None
        except (OSError, ProtocolError) as exc:
            raise FrontendError(f"{FrontendReq(request).name}: {exc}") from None
        if msg is None:
            raise FrontendError(f"{FrontendReq(request).name}: back-end closed the connection")
        for fd in msg.fds:
            os.close(fd)
        if msg.request != request or not msg.is_reply:
            raise FrontendError(
                f"{FrontendReq(request).name}: got {msg.name()} (flags {msg.flags:#x}) instead"
            )
        return msg

    def request(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        """A request with a reply of its own (GET_*)."""
        self._send(request, payload, fds)
        return self._recv(request).payload

    def command(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """A request without a reply; acknowledged when REPLY_ACK was negotiated."""
        ack = bool(self.protocol_features >> ProtocolFeature.REPLY_ACK & 1)
        self._send(request, payload, fds, FLAG_NEED_REPLY if ack else 0)
        if ack:
            status = self._u64(self._recv(request).payload, request)
            if status != 0:
                raise FrontendError(f"{FrontendReq(request).name}: back-end reported failure")

    @staticmethod
    def _u64(payload: bytes, request: int) -> int:
        try:
            return decode_u64(payload)
        except ProtocolError as exc:
            raise FrontendError(f"{FrontendReq(request).name}: {exc}") from None

    # -- requests ------------------------------------------------------------------------------

    def get_features(self) -> int:
        return self._u64(self.request(FrontendReq.GET_FEATURES), FrontendReq.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.command(FrontendReq.SET_FEATURES, encode_u64(features))

    def get_protocol_features(self) -> int:
        req = FrontendReq.GET_PROTOCOL_FEATURES
        return self._u64(self.request(req), req)

    def set_protocol_features(self, features: int) -> None:
        # Not acknowledged: REPLY_ACK only applies once this message is through.
        self._send(FrontendReq.SET_PROTOCOL_FEATURES, encode_u64(features))
        self.protocol_features = features

    def negotiate_protocol(self, wanted: int) -> int:
        """GET_FEATURES / GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES, as QEMU starts."""
        features = self.get_features()
        if not features >> F_PROTOCOL_FEATURES & 1:
            return 0
        chosen = self.get_protocol_features() & wanted
        self.set_protocol_features(chosen)
        return chosen

    def set_owner(self) -> None:
        self.command(FrontendReq.SET_OWNER)

    def get_queue_num(self) -> int:
        return self._u64(self.request(FrontendReq.GET_QUEUE_NUM), FrontendReq.GET_QUEUE_NUM)

    def get_config(self, offset: int, size: int) -> bytes:
        payload = ConfigPayload(offset, size, 0, bytes(size)).encode()
        answer = self.request(FrontendReq.GET_CONFIG, payload)
        if len(answer) <= 12:
            raise FrontendError(f"GET_CONFIG: the back-end refused {size} bytes at {offset}")
        try:
            config = ConfigPayload.decode(answer)
        except ProtocolError as exc:
            raise FrontendError(f"GET_CONFIG: {exc}") from None
        if config.size != size:
            raise FrontendError(f"GET_CONFIG: asked for {size} bytes, got {config.size}")
        return config.data

    def set_config(self, offset: int, data: bytes) -> None:
        self.command(FrontendReq.SET_CONFIG, ConfigPayload(offset, len(data), 0, data).encode())

    def set_mem_table(self, regions: list[tuple[MemoryRegionDesc, int]]) -> None:
        self.command(
            FrontendReq.SET_MEM_TABLE,
            encode_mem_table([desc for desc, _ in regions]),
            [fd for _, fd in regions],
        )

    def set_vring_num(self, index: int, num: int) -> None:
        self.command(FrontendReq.SET_VRING_NUM, VringState(index, num).encode())

    def set_vring_base(self, index: int, base: int) -> None:
        self.command(FrontendReq.SET_VRING_BASE, VringState(index, base).encode())

    def set_vring_addr(self, addr: VringAddr) -> None:
        self.command(FrontendReq.SET_VRING_ADDR, addr.encode())

    def get_vring_base(self, index: int) -> int:
        answer = self.request(FrontendReq.GET_VRING_BASE, VringState(index, 0).encode())
        try:
            state = VringState.decode(answer)
        except ProtocolError as exc:
            raise FrontendError(f"GET_VRING_BASE: {exc}") from None
        if state.index != index:
            raise FrontendError(f"GET_VRING_BASE: asked for vring {index}, got {state.index}")
        return state.num

    def set_vring_fd(self, request: FrontendReq, index: int, fd: int) -> None:
        self.command(request, encode_u64(index), [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.command(FrontendReq.SET_VRING_ENABLE, VringState(index, int(enable)).encode())

    def set_backend_req_fd(self) -> socket.socket:
        """Give the back-end a channel for its requests; returns our end of it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.command(FrontendReq.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        finally:
            theirs.close()
        self.backend_channel = ours
        return ours

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[InflightDesc, int]:
        """GET_INFLIGHT_FD: the back-end's in-flight tracking area and its fd."""
        req = FrontendReq.GET_INFLIGHT_FD
        self._send(req, InflightDesc(0, 0, num_queues, queue_size).encode())
        try:
            msg = recv_message(self.sock)
        except (OSError, ProtocolError) as exc:
            raise FrontendError(f"GET_INFLIGHT_FD: {exc}") from None
        if msg is None or msg.request != req or len(msg.fds) != 1:
            if msg is not None:
                for fd in msg.fds:
                    os.close(fd)
            raise FrontendError("GET_INFLIGHT_FD: no reply with one fd")
        try:
            return InflightDesc.decode(msg.payload), msg.fds[0]
        except ProtocolError as exc:
            os.close(msg.fds[0])
            raise FrontendError(f"GET_INFLIGHT_FD: {exc}") from None

    def set_inflight_fd(self, desc: InflightDesc, fd: int) -> None:
        self.command(FrontendReq.SET_INFLIGHT_FD, desc.encode(), [fd])

    def set_log_base(self, fd: int, size: int) -> None:
        """SET_LOG_BASE with LOG_SHMFD: the back-end logs into ``size`` bytes of ``fd`` and
        answers once it does (the answer's contents do not matter: libvhost-user's is not 0)."""
        self.request(FrontendReq.SET_LOG_BASE, LogDesc(size, 0).encode(), [fd])

    def reset_device(self) -> None:
        self.command(FrontendReq.RESET_DEVICE)
