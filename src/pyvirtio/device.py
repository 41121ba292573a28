"""The generic virtio device model (VIRTIO 1.2 §2 and §3.1).

:class:`VirtioDevice` holds what every device has: offered and negotiated features, the device
status and its state machine, a config space with a generation counter, and the virtqueues.
A concrete device (``pyvirtio.devices``) declares its features and config and handles chains.

Transports and shims drive it: virtio-mmio through :meth:`set_status` and friends, vhost-user by
setting features and starting queues directly. The device tells its shim about used buffers and
config changes through the :class:`DeviceEvents` it is attached to; it knows nothing else of it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Executor, Future
from typing import ClassVar, Protocol

from pyvirtio.memory.guest import GuestMemory
from pyvirtio.spec.features import Feature, bit, has
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.virtqueue.split import DescriptorChain, SplitQueue, VirtqueueError

log = logging.getLogger(__name__)

#: Ring features every pyvirtio device implements.
RING_FEATURES = bit(Feature.RING_INDIRECT_DESC) | bit(Feature.RING_EVENT_IDX)


class DeviceEvents(Protocol):
    """What a device needs from its shim: interrupts towards the driver."""

    def queue_interrupt(self, queue: int) -> None:
        """Used buffer notification for ``queue``."""

    def config_interrupt(self) -> None:
        """Configuration change notification (also used to report NEEDS_RESET)."""


class _Unattached:
    def queue_interrupt(self, queue: int) -> None:
        pass

    def config_interrupt(self) -> None:
        pass


class DeviceError(Exception):
    """A chain the device cannot complete; the device needs a reset."""


class VirtioDevice:
    """Base class of devices. Subclasses set ``device_id`` and implement the hooks below."""

    device_id: ClassVar[DeviceId]
    #: Runs large requests in parallel when a shim sets it (the vhost-user CLI's --io-threads).
    executor: Executor | None = None
    #: Requests of at least this many bytes go to the executor...
    parallel_threshold = 1024 * 1024
    #: ...at most this many of one queue at a time (the executor's threads); the queue's own
    #: thread handles the next one meanwhile.
    parallel_requests = 1

    def __init__(self, num_queues: int, queue_size: int) -> None:
        if num_queues < 1:
            raise ValueError("a device needs at least one queue")
        self.queues = [SplitQueue(i, queue_size) for i in range(num_queues)]
        self.events: DeviceEvents = _Unattached()
        self.memory: GuestMemory | None = None
        #: Features offered to the driver; a transport may mask some off (legacy: VERSION_1).
        self.offered_features = self.device_features() | RING_FEATURES | bit(Feature.VERSION_1)
        self.driver_features = 0
        self.status = DeviceStatus(0)
        self.config_generation = 0
        self.broken: str | None = None
        self._lock = threading.RLock()

    # -- hooks for concrete devices ------------------------------------------------------------

    def device_features(self) -> int:
        """Device-type feature bits this device offers."""
        return 0

    def config_bytes(self) -> bytes:
        """The current config space."""
        return b""

    def write_config_bytes(self, offset: int, data: bytes) -> None:
        """A driver write to the config space (ignored unless the device allows it)."""

    def validate_features(self, features: int) -> str | None:
        """Reason why the driver's feature set is unacceptable, or None (checked at FEATURES_OK)."""
        return None

    def handle_chain(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        """Process one chain and return the number of bytes written to its writable part.

        Raise DeviceError when the chain cannot be completed at all.
        """
        raise NotImplementedError

    def on_activate(self) -> None:
        """Called once the driver is ready (DRIVER_OK, or vhost-user's first started queue)."""

    def on_reset(self) -> None:
        """Called on device reset, after the queues were reset."""

    def housekeeping(self) -> None:
        """Called about once a second by a shim: look for host-side changes."""

    # -- features and status -------------------------------------------------------------------

    def set_driver_features(self, features: int) -> None:
        if self.status & DeviceStatus.FEATURES_OK:
            log.warning("driver wrote features after FEATURES_OK; ignored")
            return
        self.driver_features = features

    def negotiated(self, feature: int) -> bool:
        return has(self.driver_features, feature)

    def features_acceptable(self) -> str | None:
        """Why the negotiated features cannot be used (§3.1.1 step 5), or None."""
        extra = self.driver_features & ~self.offered_features
        if extra:
            return f"driver accepted features {extra:#x} that were not offered"
        if has(self.offered_features, Feature.VERSION_1) and not self.negotiated(Feature.VERSION_1):
            return "driver did not accept VERSION_1 on a modern transport"
        return self.validate_features(self.driver_features)

    def set_status(self, value: int) -> None:
        """A driver write to the status field (§2.1, §3.1.1)."""
        with self._lock:
            if value == 0:
                self.reset()
                return
            new = DeviceStatus(value & 0xFF)
            old = self.status
            if old & ~new & ~DeviceStatus.NEEDS_RESET:
                log.warning("driver cleared status bits %s without a reset", old & ~new)
            if new & DeviceStatus.FEATURES_OK and not old & DeviceStatus.FEATURES_OK:
                why = self.features_acceptable()
                if why is not None:
                    log.warning("refusing FEATURES_OK: %s", why)
                    new &= ~DeviceStatus.FEATURES_OK
            self.status = new | (old & DeviceStatus.NEEDS_RESET)
            if new & DeviceStatus.DRIVER_OK and not old & DeviceStatus.DRIVER_OK:
                self._driver_ok()

    def _driver_ok(self) -> None:
        memory = self.memory
        if memory is None:
            self.fail("DRIVER_OK without guest memory")
            return
        for queue in self.queues:
            if queue.ready and not queue.active:
                try:
                    self.start_queue(queue.index)
                except VirtqueueError as exc:
                    self.fail(str(exc))
                    return
        self.on_activate()

    def start_queue(self, index: int, last_avail_idx: int = 0, used_idx: int | None = 0) -> None:
        """Map queue ``index``'s rings and start using them (raises VirtqueueError)."""
        assert self.memory is not None
        self.queues[index].activate(
            self.memory,
            event_idx=self.negotiated(Feature.RING_EVENT_IDX),
            indirect=self.negotiated(Feature.RING_INDIRECT_DESC),
            last_avail_idx=last_avail_idx,
            used_idx=used_idx,
        )

    def reset(self) -> None:
        """Device reset (§2.1.2, §2.4): back to the state before the driver found it."""
        with self._lock:
            for queue in self.queues:
                queue.deactivate()
                queue.reset()
            self.driver_features = 0
            self.status = DeviceStatus(0)
            self.broken = None
            self.on_reset()

    def fail(self, reason: str) -> None:
        """The driver broke a rule we cannot recover from: set NEEDS_RESET and tell it (§2.1.2)."""
        with self._lock:
            if self.broken is None:
                log.error("device needs reset: %s", reason)
                self.broken = reason
            self.status |= DeviceStatus.NEEDS_RESET
        if self.status & DeviceStatus.DRIVER_OK:
            self.events.config_interrupt()

    # -- config space --------------------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes of the config space; reads beyond it return zeros."""
        config = self.config_bytes()
        data = config[offset : offset + size]
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > len(self.config_bytes()):
            log.warning("config write outside config space at %#x ignored", offset)
            return
        self.write_config_bytes(offset, data)

    def config_changed(self) -> None:
        """The device changed its config: bump the generation (§2.5.1) and interrupt."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.status & DeviceStatus.DRIVER_OK:
            self.events.config_interrupt()

    # -- queue processing ----------------------------------------------------------------------

    def _complete(self, queue: SplitQueue, chain: DescriptorChain, written: int) -> None:
        if chain.held:
            self._release(chain)
        queue.push(chain.head, written)

    def _release(self, chain: DescriptorChain) -> None:
        """Unmap what was mapped for ``chain`` alone before the driver sees it completed (a
        Xen guest may revoke its grants as soon as it does)."""
        if not chain.release():
            log.error(
                "queue request %d: a mapping made for it is still referenced and is unmapped late",
                chain.head,
            )

    def process_queue(self, index: int) -> None:
        """Drain queue ``index``: handle every available chain, then interrupt if asked to.

        With an ``executor``, up to ``parallel_requests`` chains of at least
        ``parallel_threshold`` bytes run on it while this thread handles the next ones. Each
        completes as soon as it is done and this thread looks for new chains then, so that the
        driver can refill the ring while the others run; the call returns once none is left in
        flight.
        """
        queue = self.queues[index]
        if not queue.active or self.broken is not None:
            return
        executor = self.executor
        threshold = self.parallel_threshold
        limit = self.parallel_requests
        pending: deque[tuple[DescriptorChain, Future[int]]] = deque()
        try:
            queue.disable_notifications()
            while True:
                while (chain := queue.pop()) is not None:
                    if (
                        executor is not None
                        and len(pending) < limit
                        and chain.read_len + chain.write_len >= threshold
                    ):
                        pending.append((chain, executor.submit(self.handle_chain, queue, chain)))
                        continue
                    self._complete(queue, chain, self.handle_chain(queue, chain))
                    while pending and pending[0][1].done():
                        chain, future = pending.popleft()
                        self._complete(queue, chain, future.result())
                if queue.publish():
                    self.events.queue_interrupt(index)
                if pending:
                    chain, future = pending.popleft()
                    self._complete(queue, chain, future.result())
                    continue
                if not queue.enable_notifications():
                    break
                queue.disable_notifications()
        except (VirtqueueError, DeviceError) as exc:
            for _, future in pending:  # they write guest memory: let them finish first
                future.exception()
            if queue.publish():
                self.events.queue_interrupt(index)
            self.fail(str(exc))
