"""One vhost-user session: messages in, replies out, device operations on the side.

A :class:`VhostUserSession` holds what one front-end set up: negotiated features, the memory
table (``memory_table``), the in-flight area (``inflight_area``), the vrings (``vrings``) and
the back-end channel, for one device. :meth:`VhostUserSession.handle` takes a decoded message
with its fds and returns the reply to send: it never touches the socket, so it can be driven
message by message in tests and fuzzing, with real fds.

The session talks to its device only through the device's control API, and the device's queues
run on the session's :class:`~pyvirtio.runner.QueueRunner`, which owns the kick fds.

File descriptors: a handler that keeps one removes it from ``msg.fds`` (only once it is
checked and stored); the caller closes whatever is left, once, whatever happened. Memory and
in-flight fds are never kept: their mappings hold the files.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from pyvirtio.device import FeatureError, VirtioDevice
from pyvirtio.guest_log import GuestErrorLog
from pyvirtio.memory.guest import GuestMemory
from pyvirtio.runner import QueueRunner
from pyvirtio.shims.vhost_user.fds import (
    PeerFdError,
    check_eventfd,
    check_kick_eventfd,
    check_unix_socket,
)
from pyvirtio.shims.vhost_user.inflight_area import (
    InflightArea,
    InflightError,
    allocate,
    check_request,
)
from pyvirtio.shims.vhost_user.log_area import LogArea, LogAreaError
from pyvirtio.shims.vhost_user.memory_table import (
    MAX_MEM_SLOTS,
    Entry,
    MemoryTable,
    MemoryTableError,
)
from pyvirtio.shims.vhost_user.vrings import Vring
from pyvirtio.spec.features import bit
from pyvirtio.vhost_user.protocol import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    REQUESTS_WITH_REPLY,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendReq,
    ConfigPayload,
    FrontendReq,
    InflightDesc,
    LogDesc,
    Message,
    ProtocolError,
    ProtocolFeature,
    VringAddr,
    VringState,
    decode_mem_table,
    decode_single_region,
    decode_u64,
    encode,
    encode_u64,
    reply,
)
from pyvirtio.virtqueue.split import QueueLayout, VirtqueueError

log = logging.getLogger(__name__)

#: Protocol features this back-end implements.
PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.BACKEND_REQ)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.RESET_DEVICE)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.INFLIGHT_SHMFD)
    | bit(ProtocolFeature.LOG_SHMFD)
)
#: Feature bits of vhost itself, beside the device's: SET_FEATURES strips them.
_VHOST_FEATURES = bit(F_PROTOCOL_FEATURES) | bit(F_LOG_ALL)
#: How long the front-end may take to read one message on the back-end channel.
CHANNEL_TIMEOUT = 1.0

Reply = tuple[bytes, list[int]]


class SessionError(Exception):
    """A well-formed request that cannot be carried out (answered with a failed REPLY_ACK)."""


#: What a request's failure may look like, besides SessionError: checks of peer input.
_REFUSALS = (
    SessionError,
    FeatureError,
    MemoryTableError,
    InflightError,
    LogAreaError,
    PeerFdError,
    VirtqueueError,
)


class VhostUserSession:
    """The state of one front-end's session with one device."""

    def __init__(self, device: VirtioDevice, *, protocol_features: int = PROTOCOL_FEATURES) -> None:
        self.device = device
        if not device.config_bytes():  # nothing to read: do not make QEMU warn about CONFIG
            protocol_features &= ~bit(ProtocolFeature.CONFIG)
        self.offered_protocol_features = protocol_features
        self.protocol_features = 0
        self.features = 0
        self.vrings = [Vring(i) for i in range(len(device.queues))]
        self.memory_table = MemoryTable()
        self.inflight: InflightArea | None = None
        #: The dirty log the front-end gave (SET_LOG_BASE), and the one the device logs into
        #: (the same while VHOST_F_LOG_ALL is negotiated).
        self.log_area: LogArea | None = None
        self._logging: LogArea | None = None
        self.backend_channel: socket.socket | None = None
        self._channel_lock = threading.Lock()
        self.runner = QueueRunner(device, unblock=self._unblock)
        self._errors = GuestErrorLog(log)
        device.attach(self, self.runner)
        device.set_memory(GuestMemory())
        self._handlers: dict[int, Callable[[Message], bytes | Reply | None]] = {
            FrontendReq.GET_FEATURES: self._get_features,
            FrontendReq.SET_FEATURES: self._set_features,
            FrontendReq.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendReq.SET_OWNER: self._set_owner,
            FrontendReq.RESET_OWNER: self._reset_owner,
            FrontendReq.GET_QUEUE_NUM: self._get_queue_num,
            FrontendReq.SET_MEM_TABLE: self._set_mem_table,
            FrontendReq.SET_LOG_BASE: self._set_log_base,
            FrontendReq.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            FrontendReq.ADD_MEM_REG: self._add_mem_reg,
            FrontendReq.REM_MEM_REG: self._rem_mem_reg,
            FrontendReq.SET_VRING_NUM: self._set_vring_num,
            FrontendReq.SET_VRING_ADDR: self._set_vring_addr,
            FrontendReq.SET_VRING_BASE: self._set_vring_base,
            FrontendReq.GET_VRING_BASE: self._get_vring_base,
            FrontendReq.SET_VRING_KICK: self._set_vring_kick,
            FrontendReq.SET_VRING_CALL: self._set_vring_call,
            FrontendReq.SET_VRING_ERR: self._set_vring_err,
            FrontendReq.SET_VRING_ENABLE: self._set_vring_enable,
            FrontendReq.GET_CONFIG: self._get_config,
            FrontendReq.SET_CONFIG: self._set_config,
            FrontendReq.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            FrontendReq.RESET_DEVICE: self._reset_device,
            FrontendReq.GET_INFLIGHT_FD: self._get_inflight_fd,
            FrontendReq.SET_INFLIGHT_FD: self._set_inflight_fd,
        }

    # -- dispatch ------------------------------------------------------------------------------

    def handle(self, msg: Message) -> Reply | None:
        """Carry out one request; returns the reply to send (bytes and fds), if any.

        Raises ProtocolError when the session must end. A request that cannot be carried out
        gets a failure REPLY_ACK when the front-end asked for one; otherwise the session ends
        (the front-end would go on as if it had worked).
        """
        handler = self._handlers.get(msg.request)
        expects_reply = msg.request in REQUESTS_WITH_REPLY or (
            msg.request == FrontendReq.SET_LOG_BASE and self.has_protocol(ProtocolFeature.LOG_SHMFD)
        )
        if handler is None:
            if msg.need_reply and not expects_reply:
                self._errors.warning("unsupported %s; answering with a failure", msg.name())
                return reply(msg, encode_u64(1)), []
            raise ProtocolError(f"unsupported {msg.name()}")
        try:
            result = handler(msg)
        except (*_REFUSALS, ProtocolError) as exc:
            if expects_reply or not msg.need_reply or isinstance(exc, ProtocolError):
                raise ProtocolError(f"{msg.name()}: {exc}") from None
            self._errors.warning("%s failed: %s", msg.name(), exc)
            return reply(msg, encode_u64(1)), []
        if expects_reply:
            if isinstance(result, tuple):
                return reply(msg, result[0]), result[1]
            return reply(msg, result or b""), []
        if msg.need_reply:
            return reply(msg, encode_u64(0)), []
        return None

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise SessionError(f"vring {index} does not exist ({len(self.vrings)} queues)")
        return self.vrings[index]

    @staticmethod
    def _one_fd(msg: Message) -> int:
        if len(msg.fds) != 1:
            raise ProtocolError(f"{msg.name()} with {len(msg.fds)} fds")
        return msg.fds[0]

    # -- features ------------------------------------------------------------------------------

    def _get_features(self, msg: Message) -> bytes:
        return encode_u64(self.device.offered_features | _VHOST_FEATURES)

    def _set_features(self, msg: Message) -> None:
        """The front-end's features. A migration sets and clears VHOST_F_LOG_ALL while the
        rings run, with the device's features unchanged: that only switches logging."""
        features = decode_u64(msg.payload)
        device_features = features & ~_VHOST_FEATURES
        running = any(v.running for v in self.vrings)
        if not running or device_features != self.features & ~_VHOST_FEATURES:
            self.device.negotiate(device_features)
        self.features = features
        self._update_logging()

    def _get_protocol_features(self, msg: Message) -> bytes:
        return encode_u64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        features = decode_u64(msg.payload)
        if features & ~self.offered_protocol_features:
            raise SessionError(
                f"protocol features {features & ~self.offered_protocol_features:#x} not offered"
            )
        self.protocol_features = features

    def has_protocol(self, feature: int) -> bool:
        return bool(self.protocol_features >> feature & 1)

    def _set_owner(self, msg: Message) -> None:
        pass

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec recommends disabling all rings.
        for vring in self.vrings:
            self._stop(vring, drop_kick=True)

    def _get_queue_num(self, msg: Message) -> bytes:
        return encode_u64(len(self.vrings))

    # -- memory --------------------------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> None:
        descs = decode_mem_table(msg.payload)
        if len(msg.fds) != len(descs):
            raise ProtocolError(f"{len(descs)} regions but {len(msg.fds)} fds")
        self._install(self.memory_table.prepare_table(list(zip(descs, msg.fds, strict=True))))

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return encode_u64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg: Message) -> None:
        desc = decode_single_region(msg.payload)
        self._install(self.memory_table.prepare_add(desc, self._one_fd(msg)))

    def _rem_mem_reg(self, msg: Message) -> None:
        desc = decode_single_region(
            msg.payload
        )  # an fd, if any (the spec tolerates one), is closed
        self._install(self.memory_table.prepare_remove(desc))

    def _install(self, entries: list[Entry]) -> None:
        """Make ``entries`` the memory table while the queues are paused; running vrings are
        mapped again through it (their addresses are user addresses, which may move)."""
        with self.device.queues_paused():
            self.device.set_memory(self.memory_table.install(entries))
            for vring in self.vrings:
                if vring.running:
                    try:
                        self.device.configure_queue(vring.index, self._layout(vring))
                    except (SessionError, VirtqueueError) as exc:
                        self._errors.warning("vring %d stops: %s", vring.index, exc)
                        self.device.disable_queue(vring.index)
                        vring.running = False

    def _layout(self, vring: Vring) -> QueueLayout:
        addr = vring.addr
        assert addr is not None
        return QueueLayout(
            vring.num,
            self._guest_address(vring, "descriptor table", addr.desc),
            self._guest_address(vring, "available ring", addr.avail),
            self._guest_address(vring, "used ring", addr.used),
        )

    def _guest_address(self, vring: Vring, what: str, user: int) -> int:
        gpa = self.memory_table.user_to_guest(user)
        if gpa is None:
            raise SessionError(f"vring {vring.index}: {what} at {user:#x} is in no memory region")
        return gpa

    # -- live migration: the dirty log ---------------------------------------------------------

    def _set_log_base(self, msg: Message) -> bytes:
        """The dirty log to use while VHOST_F_LOG_ALL is negotiated (LOG_SHMFD: the reply says
        the back-end has it). Writes to the used ring are logged at the used ring's guest
        address, the one SET_VRING_ADDR's ``log`` also names."""
        if not self.has_protocol(ProtocolFeature.LOG_SHMFD):
            raise ProtocolError("SET_LOG_BASE without LOG_SHMFD (no shared log)")
        desc = LogDesc.decode(msg.payload)
        area = LogArea(self._one_fd(msg), desc)
        old, self.log_area = self.log_area, area
        self._update_logging()
        if old is not None:
            old.close()
        return encode_u64(0)

    def _update_logging(self) -> None:
        """Have the device log into the front-end's log exactly while LOG_ALL is negotiated."""
        want = self.log_area if self.features & bit(F_LOG_ALL) else None
        if want is self._logging:
            return
        self.device.set_dirty_log(want.dirty_log if want is not None else None)
        if want is not None and self._logging is None:
            log.info("dirty page logging on (%d KiB log)", want.size // 1024)
        elif want is None:
            log.info("dirty page logging off")
        self._logging = want

    # -- vrings --------------------------------------------------------------------------------

    def _set_vring_num(self, msg: Message) -> None:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if vring.running:
            raise SessionError(f"vring {state.index}: size changed while it runs")
        max_size = self.device.queues[state.index].max_size
        if not 0 < state.num <= max_size or state.num & (state.num - 1):
            raise SessionError(f"vring {state.index}: size {state.num} (max {max_size})")
        vring.num = state.num

    def _set_vring_addr(self, msg: Message) -> None:
        addr = VringAddr.decode(msg.payload)
        vring = self._vring(addr.index)
        if vring.running:
            # A migration sets VHOST_VRING_F_LOG on running rings (the same addresses).
            old = vring.addr
            assert old is not None
            if (addr.desc, addr.avail, addr.used) != (old.desc, old.avail, old.used):
                raise SessionError(f"vring {addr.index}: addresses changed while it runs")
        vring.addr = addr

    def _set_vring_base(self, msg: Message) -> None:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if vring.running:
            raise SessionError(f"vring {state.index}: base changed while it runs")
        vring.base = state.num & 0xFFFF

    def _get_vring_base(self, msg: Message) -> bytes:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        self._stop(vring, drop_kick=True)
        return VringState(state.index, vring.base).encode()

    def _vring_fd(self, msg: Message) -> tuple[Vring, int | None]:
        """The vring a KICK/CALL/ERR message names, and its fd (None: no fd, polling)."""
        value = decode_u64(msg.payload)
        vring = self._vring(value & VRING_IDX_MASK)
        if value & VRING_NOFD_MASK:
            if msg.fds:
                raise ProtocolError(f"{msg.name()} says no fd and carries {len(msg.fds)}")
            return vring, None
        return vring, self._one_fd(msg)

    def _set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        if fd is None:
            raise SessionError(f"vring {vring.index}: polling mode (no kick fd) not supported")
        check_kick_eventfd(fd)
        self._stop(vring, drop_kick=False)
        msg.fds.remove(fd)
        self.runner.set_kick_fd(vring.index, fd)
        vring.has_kick = True
        if not self.features & bit(F_PROTOCOL_FEATURES):
            vring.enabled = True  # without protocol features rings start enabled
        self._try_start(vring)

    def _set_vring_call(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        if fd is not None:
            check_eventfd(fd, "call fd")
            msg.fds.remove(fd)
        vring.set_call(fd)

    def _set_vring_err(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        if fd is not None:
            check_eventfd(fd, "err fd")
            msg.fds.remove(fd)
        vring.set_err(fd)

    def _set_vring_enable(self, msg: Message) -> None:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if state.num not in (0, 1):
            raise SessionError(f"vring {state.index}: enable value {state.num}")
        vring.enabled = bool(state.num)
        if vring.enabled:
            self._try_start(vring)
        else:
            self._stop(vring, drop_kick=False)

    def _try_start(self, vring: Vring) -> None:
        """Start the vring if it has all it needs: addresses, memory, a kick fd, enabled."""
        if vring.running or not (vring.has_kick and vring.enabled and vring.addr):
            return
        if not len(self.memory_table):
            return
        if not vring.num:
            raise SessionError(f"vring {vring.index}: started without SET_VRING_NUM")
        self.device.start_queue(
            vring.index, self._layout(vring), last_avail_idx=vring.base, used_idx=None
        )
        vring.running = True

    def _stop(self, vring: Vring, *, drop_kick: bool) -> None:
        """Stop the vring's queue (its worker first) and remember where it is."""
        if vring.running:
            vring.base = self.device.stop_queue(vring.index)
            vring.running = False
        if drop_kick and vring.has_kick:
            self.runner.set_kick_fd(vring.index, None)
            vring.has_kick = False

    def _unblock(self, index: int) -> None:
        self.vrings[index].unblock()

    # -- in-flight tracking --------------------------------------------------------------------

    def _check_inflight(self, desc: InflightDesc) -> None:
        check_request(desc, len(self.vrings))
        if any(v.running for v in self.vrings):
            raise SessionError("in-flight area changed while rings run")

    def _get_inflight_fd(self, msg: Message) -> Reply:
        """Allocate the tracking area (a sealed memfd the front-end keeps across restarts)."""
        desc = InflightDesc.decode(msg.payload)
        self._check_inflight(desc)
        largest = max(q.max_size for q in self.device.queues)
        mapped_as, fd = allocate(desc, largest)
        try:
            self._attach_inflight(InflightArea(fd, mapped_as))
        except BaseException:
            os.close(fd)
            raise
        size = mapped_as.mmap_size
        return InflightDesc(size, 0, desc.num_queues, desc.queue_size).encode(), [fd]

    def _set_inflight_fd(self, msg: Message) -> None:
        desc = InflightDesc.decode(msg.payload)
        fd = self._one_fd(msg)
        self._check_inflight(desc)
        self._attach_inflight(InflightArea(fd, desc))

    def _attach_inflight(self, area: InflightArea) -> None:
        self._detach_inflight()
        self.inflight = area
        for index, region in enumerate(area.regions):
            self.device.attach_inflight(index, region)

    def _detach_inflight(self) -> None:
        if self.inflight is None:
            return
        for index in range(len(self.inflight.regions)):
            self.device.attach_inflight(index, None)
        self.inflight.close()
        self.inflight = None

    # -- config and the back-end channel -------------------------------------------------------

    def _get_config(self, msg: Message) -> bytes:
        request = ConfigPayload.decode(msg.payload)
        data = self.device.read_config(request.offset, request.size)
        return ConfigPayload(request.offset, request.size, request.flags, data).encode()

    def _set_config(self, msg: Message) -> None:
        request = ConfigPayload.decode(msg.payload)
        if request.flags != 0:
            raise SessionError("config writes for live migration are not supported")
        self.device.write_config(request.offset, request.data)

    def _set_backend_req_fd(self, msg: Message) -> None:
        channel = check_unix_socket(self._one_fd(msg), "back-end channel")
        channel.settimeout(CHANNEL_TIMEOUT)
        with self._channel_lock:
            old, self.backend_channel = self.backend_channel, channel
        if old is not None:
            old.close()

    def _reset_device(self, msg: Message) -> None:
        self.reset()

    # -- DeviceEvents (from queue workers and housekeeping) ------------------------------------

    def queue_interrupt(self, queue: int) -> None:
        self.vrings[queue].signal_call()

    def config_interrupt(self) -> None:
        if self.device.broken is not None:
            for vring in self.vrings:
                vring.signal_err()
        self.send_config_change()

    def send_config_change(self) -> None:
        """Tell the front-end to re-read the config space (CONFIG_CHANGE_MSG)."""
        if not self.has_protocol(ProtocolFeature.CONFIG):
            return
        with self._channel_lock:
            channel = self.backend_channel
            if channel is None:
                log.info("config changed, but the front-end gave no back-end channel")
                return
            try:
                # No NEED_REPLY: the front-end may be waiting on us on the main channel.
                channel.sendall(encode(BackendReq.CONFIG_CHANGE_MSG, flags=0))
            except OSError as exc:
                # A front-end that does not read its channel (or closed it) loses it: a
                # message cut in the middle would corrupt the stream anyway.
                self._errors.warning("back-end channel dropped: %s", exc)
                channel.close()
                self.backend_channel = None

    # -- lifecycle -----------------------------------------------------------------------------

    def reset(self) -> None:
        """RESET_DEVICE: every ring stopped, device state as new (memory stays mapped)."""
        for vring in self.vrings:
            self._stop(vring, drop_kick=True)
            vring.base = 0
            vring.num = 0
            vring.addr = None
            vring.enabled = False
            vring.close()
        self.features = 0
        self._update_logging()
        self.device.reset()

    def close(self) -> None:
        """The front-end went away: stop everything, unmap, close every fd."""
        self.reset()
        self.runner.close()
        self._detach_inflight()
        if self.log_area is not None:
            self.log_area.close()
            self.log_area = None
        self.device.set_memory(None)
        self.memory_table.close()
        with self._channel_lock:
            channel, self.backend_channel = self.backend_channel, None
        if channel is not None:
            channel.close()
        self.device.close()
