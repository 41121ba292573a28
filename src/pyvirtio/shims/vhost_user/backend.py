"""The back-end side of one vhost-user connection: messages in, device operations out.

A :class:`VhostUserBackend` holds the state of one front-end session: negotiated features, the
memory table mapped from the front-end's fds, and the vrings with their kick, call and err
eventfds. Each started and enabled vring is served by a :class:`QueueWorker` thread that blocks
on its kick eventfd and drains the queue, so queues scale across the interpreter's I/O waits
(``preadv``/``pwritev`` and ``read`` of an eventfd release the GIL).

The socket itself lives in ``server.py``; this module never reads or writes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyvirtio.device import VirtioDevice
from pyvirtio.memory.guest import GuestMemory, MemoryRegion
from pyvirtio.shims.vhost_user.protocol import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    REQUESTS_WITH_REPLY,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendReq,
    ConfigPayload,
    FrontendReq,
    InflightDesc,
    MemoryRegionDesc,
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
from pyvirtio.shims.worker import QueueWorker
from pyvirtio.spec.features import bit
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.virtqueue.inflight import InflightRegion, queue_region_size
from pyvirtio.virtqueue.split import VirtqueueError

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
)
#: Memory slots offered with CONFIGURE_MEM_SLOTS (a bound on what one front-end can map).
MAX_MEM_SLOTS = 32

Reply = tuple[bytes, list[int]]
_LIVE = (
    DeviceStatus.ACKNOWLEDGE
    | DeviceStatus.DRIVER
    | DeviceStatus.FEATURES_OK
    | DeviceStatus.DRIVER_OK
)


class VhostUserError(Exception):
    """A well-formed request that cannot be carried out (answered with a failed REPLY_ACK)."""


@dataclass
class Vring:
    index: int
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False
    worker: QueueWorker | None = None


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


class VhostUserBackend:
    """One vhost-user session for one device."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        protocol_features: int = PROTOCOL_FEATURES,
        on_config_change: Callable[[], None] | None = None,
    ) -> None:
        self.device = device
        self.offered_protocol_features = protocol_features
        self.protocol_features = 0
        self.features = 0
        self.vrings = [Vring(i) for i in range(len(device.queues))]
        self.regions: list[tuple[MemoryRegionDesc, MemoryRegion]] = []
        self.backend_channel: socket.socket | None = None
        self._channel_lock = threading.Lock()
        self._call_lock = threading.Lock()
        self._on_config_change = on_config_change
        self._inflight_map: mmap.mmap | None = None
        self.owner = False
        device.events = self
        device.reset()
        device.memory = GuestMemory()
        self._handlers: dict[int, Callable[[Message], bytes | Reply | None]] = {
            FrontendReq.GET_FEATURES: self._get_features,
            FrontendReq.SET_FEATURES: self._set_features,
            FrontendReq.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendReq.SET_OWNER: self._set_owner,
            FrontendReq.RESET_OWNER: self._reset_owner,
            FrontendReq.GET_QUEUE_NUM: self._get_queue_num,
            FrontendReq.SET_MEM_TABLE: self._set_mem_table,
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
        """Carry out one request; returns the reply to send, if any.

        Raises ProtocolError when the connection must be closed. File descriptors a handler
        keeps are removed from ``msg.fds``; the caller closes the rest.
        """
        handler = self._handlers.get(msg.request)
        expects_reply = msg.request in REQUESTS_WITH_REPLY
        if handler is None:
            if msg.need_reply and not expects_reply:
                log.warning("unsupported %s; answering with a failure", msg.name())
                return reply(msg, encode_u64(1)), []
            raise ProtocolError(f"unsupported {msg.name()}")
        try:
            result = handler(msg)
        except (VhostUserError, ProtocolError) as exc:
            if expects_reply or not msg.need_reply:
                raise ProtocolError(f"{msg.name()}: {exc}") from None
            log.warning("%s failed: %s", msg.name(), exc)
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
            raise VhostUserError(f"vring {index} does not exist ({len(self.vrings)} queues)")
        return self.vrings[index]

    # -- features ------------------------------------------------------------------------------

    def _get_features(self, msg: Message) -> bytes:
        return encode_u64(self.device.offered_features | bit(F_PROTOCOL_FEATURES))

    def _set_features(self, msg: Message) -> None:
        features = decode_u64(msg.payload)
        allowed = self.device.offered_features | bit(F_PROTOCOL_FEATURES) | bit(F_LOG_ALL)
        if features & ~allowed:
            raise VhostUserError(f"features {features & ~allowed:#x} were not offered")
        if features & bit(F_LOG_ALL):
            raise VhostUserError("dirty page logging (migration) is not supported")
        self.features = features
        self.device.driver_features = features & ~bit(F_PROTOCOL_FEATURES)
        self.device.on_activate()

    def _get_protocol_features(self, msg: Message) -> bytes:
        return encode_u64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        features = decode_u64(msg.payload)
        if features & ~self.offered_protocol_features:
            raise VhostUserError(
                f"protocol features {features & ~self.offered_protocol_features:#x} not offered"
            )
        self.protocol_features = features

    def has_protocol(self, feature: int) -> bool:
        return bool(self.protocol_features >> feature & 1)

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec recommends disabling all rings.
        for vring in self.vrings:
            self._stop_vring(vring)

    def _get_queue_num(self, msg: Message) -> bytes:
        return encode_u64(len(self.vrings))

    # -- memory --------------------------------------------------------------------------------

    def _map(self, desc: MemoryRegionDesc, fd: int) -> MemoryRegion:
        if desc.size == 0:
            raise VhostUserError("memory region of size 0")
        try:
            return MemoryRegion.from_fd(
                desc.guest_addr,
                desc.size,
                fd,
                desc.mmap_offset,
                label=f"user {desc.user_addr:#x}",
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise VhostUserError(f"cannot map region at {desc.guest_addr:#x}: {exc}") from None
        finally:
            os.close(fd)

    def _running_vrings(self) -> list[Vring]:
        return [v for v in self.vrings if v.started]

    def _pause(self) -> list[Vring]:
        """Stop the workers and unmap the rings so that the memory table can change."""
        running = self._running_vrings()
        for vring in running:
            self._stop_worker(vring)
            queue = self.device.queues[vring.index]
            vring.base = queue.last_avail_idx
            queue.deactivate()
            vring.started = False
        return running

    def _resume(self, vrings: list[Vring]) -> None:
        for vring in vrings:
            self._try_start(vring)

    def _install(self, regions: list[tuple[MemoryRegionDesc, MemoryRegion]]) -> None:
        memory = GuestMemory()
        for _, region in regions:
            try:
                memory.add(region)
            except ValueError as exc:
                for _, r in regions:
                    r.close()
                raise VhostUserError(str(exc)) from None
        old = self.regions
        self.regions = regions
        self.device.memory = memory
        for _, region in old:
            if all(region is not r for _, r in regions):
                self._unmap(region)

    @staticmethod
    def _unmap(region: MemoryRegion) -> None:
        try:
            region.close()
        except BufferError:
            log.warning("region at %#x still in use; it is unmapped when released", region.gpa)

    def _set_mem_table(self, msg: Message) -> None:
        descs = decode_mem_table(msg.payload)
        if len(msg.fds) != len(descs):
            raise ProtocolError(f"{len(descs)} regions but {len(msg.fds)} fds")
        fds, msg.fds[:] = list(msg.fds), []
        running = self._pause()
        try:
            mapped: list[tuple[MemoryRegionDesc, MemoryRegion]] = []
            try:
                for i, (desc, fd) in enumerate(zip(descs, fds, strict=True)):
                    mapped.append((desc, self._map(desc, fd)))
                    fds[i] = -1
            except VhostUserError:
                for fd in fds:
                    if fd >= 0:
                        _close(fd)
                for _, region in mapped:
                    region.close()
                raise
            self._install(mapped)
        finally:
            self._resume(running)

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return encode_u64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg: Message) -> None:
        desc = decode_single_region(msg.payload)
        if len(msg.fds) != 1:
            raise ProtocolError(f"ADD_MEM_REG with {len(msg.fds)} fds")
        if len(self.regions) >= MAX_MEM_SLOTS:
            _close(msg.fds.pop())
            raise VhostUserError(f"more than {MAX_MEM_SLOTS} memory regions")
        region = self._map(desc, msg.fds.pop())
        running = self._pause()
        try:
            self._install([*self.regions, (desc, region)])
        finally:
            self._resume(running)

    def _rem_mem_reg(self, msg: Message) -> None:
        desc = decode_single_region(msg.payload)
        for fd in msg.fds:  # the spec tolerates one fd here; close it unused
            _close(fd)
        msg.fds.clear()
        keep = [
            (d, r)
            for d, r in self.regions
            if (d.guest_addr, d.size, d.user_addr) != (desc.guest_addr, desc.size, desc.user_addr)
        ]
        if len(keep) == len(self.regions):
            raise VhostUserError(f"no memory region at guest address {desc.guest_addr:#x}")
        running = self._pause()
        try:
            self._install(keep)
        finally:
            self._resume(running)

    def user_to_guest(self, addr: int) -> int:
        """Translate a front-end user (virtual) address, as vring addresses are, to a GPA."""
        for desc, _ in self.regions:
            if desc.user_addr <= addr < desc.user_addr + desc.size:
                return addr - desc.user_addr + desc.guest_addr
        raise VhostUserError(f"user address {addr:#x} is in no memory region")

    # -- vrings --------------------------------------------------------------------------------

    def _set_vring_num(self, msg: Message) -> None:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        queue = self.device.queues[state.index]
        if not 0 < state.num <= queue.max_size or state.num & (state.num - 1):
            raise VhostUserError(f"vring {state.index}: size {state.num} (max {queue.max_size})")
        if vring.started:
            raise VhostUserError(f"vring {state.index}: size changed while started")
        vring.num = state.num
        queue.size = state.num

    def _set_vring_addr(self, msg: Message) -> None:
        addr = VringAddr.decode(msg.payload)
        vring = self._vring(addr.index)
        if vring.started:
            raise VhostUserError(f"vring {addr.index}: addresses changed while started")
        vring.addr = addr

    def _set_vring_base(self, msg: Message) -> None:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if vring.started:
            raise VhostUserError(f"vring {state.index}: base changed while started")
        vring.base = state.num & 0xFFFF

    def _get_vring_base(self, msg: Message) -> bytes:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        self._stop_vring(vring)
        return VringState(state.index, vring.base).encode()

    def _take_fd(self, msg: Message) -> tuple[Vring, int | None]:
        value = decode_u64(msg.payload)
        vring = self._vring(value & VRING_IDX_MASK)
        if value & VRING_NOFD_MASK:
            return vring, None
        if len(msg.fds) != 1:
            raise ProtocolError(f"{msg.name()} with {len(msg.fds)} fds")
        return vring, msg.fds.pop()

    def _set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._take_fd(msg)
        if fd is None:
            raise VhostUserError(f"vring {vring.index}: polling mode (no kick fd) not supported")
        if vring.started:
            self._stop_vring(vring)
        _close(vring.kick_fd)
        vring.kick_fd = fd
        if not self.features & bit(F_PROTOCOL_FEATURES):
            vring.enabled = True  # without protocol features rings start enabled
        self._try_start(vring)

    def _set_vring_call(self, msg: Message) -> None:
        vring, fd = self._take_fd(msg)
        with self._call_lock:
            old, vring.call_fd = vring.call_fd, fd
        _close(old)

    def _set_vring_err(self, msg: Message) -> None:
        vring, fd = self._take_fd(msg)
        _close(vring.err_fd)
        vring.err_fd = fd

    def _set_vring_enable(self, msg: Message) -> None:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if state.num not in (0, 1):
            raise VhostUserError(f"vring {state.index}: enable value {state.num}")
        vring.enabled = bool(state.num)
        if vring.enabled:
            self._try_start(vring)
        else:
            self._stop_worker(vring)

    def _try_start(self, vring: Vring) -> None:
        """Start the ring if it has everything it needs (addresses, memory, kick fd)."""
        if vring.kick_fd is None or vring.addr is None or not self.regions:
            return
        if not vring.started:
            queue = self.device.queues[vring.index]
            addr = vring.addr
            queue.desc_addr = self.user_to_guest(addr.desc)
            queue.avail_addr = self.user_to_guest(addr.avail)
            queue.used_addr = self.user_to_guest(addr.used)
            queue.ready = True
            try:
                self.device.start_queue(vring.index, last_avail_idx=vring.base, used_idx=None)
            except VirtqueueError as exc:
                raise VhostUserError(str(exc)) from None
            vring.started = True
            # vhost-user has no status register: a started ring means the driver is live.
            self.device.status |= _LIVE
        if vring.enabled and vring.worker is None:
            vring.worker = QueueWorker(self.device, vring.index, vring.kick_fd)
            vring.worker.start()

    def _stop_worker(self, vring: Vring) -> None:
        if vring.worker is not None:
            vring.worker.stop()
            vring.worker = None

    def _stop_vring(self, vring: Vring) -> None:
        """GET_VRING_BASE: stop processing, remember where the ring is, drop the kick fd."""
        self._stop_worker(vring)
        queue = self.device.queues[vring.index]
        if vring.started:
            vring.base = queue.last_avail_idx
            queue.deactivate()
            vring.started = False
        queue.ready = False
        _close(vring.kick_fd)
        vring.kick_fd = None

    # -- in-flight tracking --------------------------------------------------------------------

    def _get_inflight_fd(self, msg: Message) -> Reply:
        """Allocate the tracking area (a sealed memfd the front-end keeps across restarts).

        Each queue's region is sized for the largest ring the device accepts, not only for the
        size the front-end asks about: QEMU's virtio-mmio devices ask for their queue-size
        property and then use 1024-entry rings. Regions describe their own size, so the
        front-end's numbers on SET_INFLIGHT_FD do not matter.
        """
        desc = InflightDesc.decode(msg.payload)
        self._check_inflight(desc)
        entries = max([desc.queue_size, *(q.max_size for q in self.device.queues)])
        size = desc.num_queues * queue_region_size(entries)
        fd = os.memfd_create("pyvirtio-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
            )
            self._attach_inflight(fd, InflightDesc(size, 0, desc.num_queues, entries))
        except BaseException:
            os.close(fd)
            raise
        return InflightDesc(size, 0, desc.num_queues, desc.queue_size).encode(), [fd]

    def _set_inflight_fd(self, msg: Message) -> None:
        desc = InflightDesc.decode(msg.payload)
        if len(msg.fds) != 1:
            raise ProtocolError(f"SET_INFLIGHT_FD with {len(msg.fds)} fds")
        fd = msg.fds.pop()
        try:
            self._check_inflight(desc)
            self._attach_inflight(fd, desc)
        finally:
            os.close(fd)

    def _check_inflight(self, desc: InflightDesc) -> None:
        if not 0 < desc.num_queues <= len(self.vrings):
            raise VhostUserError(f"in-flight area for {desc.num_queues} queues")
        size = desc.queue_size
        if not 0 < size <= 32768 or size & (size - 1):
            raise VhostUserError(f"in-flight area for queues of {size} descriptors")
        if self._running_vrings():
            raise VhostUserError("in-flight area changed while rings run")

    def _attach_inflight(self, fd: int, desc: InflightDesc) -> None:
        """Map the area and give each queue its region (mmap_size split evenly)."""
        self._detach_inflight()
        step = desc.mmap_size // desc.num_queues
        if step < queue_region_size(4) or step % 64:
            raise VhostUserError(
                f"in-flight area of {desc.mmap_size} bytes for {desc.num_queues} queues"
            )
        try:
            m = mmap.mmap(fd, desc.mmap_size, flags=mmap.MAP_SHARED, offset=desc.mmap_offset)
        except (OSError, ValueError, OverflowError) as exc:
            raise VhostUserError(f"cannot map the in-flight area: {exc}") from None
        self._inflight_map = m
        view = memoryview(m)
        try:
            for i in range(desc.num_queues):
                region = view[i * step : (i + 1) * step]
                try:
                    self.device.queues[i].inflight = InflightRegion.attach(region)
                except ValueError as exc:
                    raise VhostUserError(str(exc)) from None
        finally:
            view.release()

    def _detach_inflight(self) -> None:
        for queue in self.device.queues:
            if queue.inflight is not None:
                queue.inflight.release()
                queue.inflight = None
        if self._inflight_map is not None:
            try:
                self._inflight_map.close()
            except BufferError:
                log.warning("in-flight area still referenced; unmapped when released")
            self._inflight_map = None

    # -- config and status ---------------------------------------------------------------------

    def _get_config(self, msg: Message) -> bytes:
        request = ConfigPayload.decode(msg.payload)
        data = self.device.read_config(request.offset, request.size)
        return ConfigPayload(request.offset, request.size, request.flags, data).encode()

    def _set_config(self, msg: Message) -> None:
        request = ConfigPayload.decode(msg.payload)
        if request.flags != 0:
            raise VhostUserError("config writes for live migration are not supported")
        self.device.write_config(request.offset, request.data)

    def _set_backend_req_fd(self, msg: Message) -> None:
        if len(msg.fds) != 1:
            raise ProtocolError(f"SET_BACKEND_REQ_FD with {len(msg.fds)} fds")
        with self._channel_lock:
            if self.backend_channel is not None:
                self.backend_channel.close()
            self.backend_channel = socket.socket(fileno=msg.fds.pop())
            self.backend_channel.settimeout(5.0)

    def _reset_device(self, msg: Message) -> None:
        self.reset()

    # -- DeviceEvents --------------------------------------------------------------------------

    def queue_interrupt(self, queue: int) -> None:
        with self._call_lock:
            fd = self.vrings[queue].call_fd
            if fd is not None:
                try:
                    os.eventfd_write(fd, 1)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        log.warning("vring %d: call eventfd failed: %s", queue, exc)

    def config_interrupt(self) -> None:
        if self.device.broken is not None:
            for vring in self.vrings:
                if vring.err_fd is not None:
                    with contextlib.suppress(OSError):
                        os.eventfd_write(vring.err_fd, 1)
        if self._on_config_change is not None:
            self._on_config_change()
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
                log.warning("cannot send config change to the front-end: %s", exc)

    # -- lifecycle -----------------------------------------------------------------------------

    def reset(self) -> None:
        """RESET_DEVICE: every ring stopped, device state as new (memory stays mapped)."""
        for vring in self.vrings:
            self._stop_vring(vring)
            vring.base = 0
            vring.addr = None
            vring.enabled = False
            with self._call_lock:
                _close(vring.call_fd)
                vring.call_fd = None
            _close(vring.err_fd)
            vring.err_fd = None
        self.features = 0
        memory = self.device.memory
        self.device.reset()
        self.device.memory = memory

    def close(self) -> None:
        """The front-end went away: stop everything, unmap, close every fd."""
        self.reset()
        for _, region in self.regions:
            self._unmap(region)
        self.regions = []
        self.device.memory = None
        self._detach_inflight()
        with self._channel_lock:
            if self.backend_channel is not None:
                self.backend_channel.close()
                self.backend_channel = None
