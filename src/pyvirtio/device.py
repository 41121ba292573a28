"""The generic virtio device model (VIRTIO 1.2 §2 and §3.1).

:class:`VirtioDevice` holds what every device has: offered and negotiated features, the device
status and its state machine, a config space with a generation counter, and the virtqueues.
A concrete device (``pyvirtio.devices``) declares its features and config and handles chains.

Transports and shims drive a device only through its control API (the public methods below),
never by writing its fields: virtio-mmio through :meth:`VirtioDevice.set_status`,
:meth:`VirtioDevice.configure_queue` and friends, vhost-user through
:meth:`VirtioDevice.negotiate`, :meth:`VirtioDevice.start_queue` and
:meth:`VirtioDevice.stop_queue`. The device tells its shim about used buffers and config changes
through the :class:`DeviceEvents` it is attached to, and it has its queues served by a
:class:`QueueHost` (the threads of ``runner.QueueRunner``, or the caller's thread): before it
deactivates or remaps a ring it asks the host to stop using it, so no worker ever runs on a ring
that is gone.

Two locks: ``__control`` serialises control operations (a reset waits for the queues' workers
while holding it) and is never taken on the data path; ``__state`` guards the status bits and
is only held for a few instructions, so that a worker can always report a broken ring. The
model's own state is name-mangled (``__``): a device subclass cannot clobber it by accident.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from contextlib import contextmanager
from typing import ClassVar, Protocol

from pyvirtio.memory.dirty_log import DirtyLog
from pyvirtio.memory.guest import GuestMemory
from pyvirtio.spec.features import Feature, bit, has
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.ring import DescFlag
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.stats import QueueStats
from pyvirtio.virtqueue.inflight import InflightRegion
from pyvirtio.virtqueue.split import DescriptorChain, QueueLayout, SplitQueue, VirtqueueError

log = logging.getLogger(__name__)

#: Ring features every pyvirtio device implements.
RING_FEATURES = bit(Feature.RING_INDIRECT_DESC) | bit(Feature.RING_EVENT_IDX)
#: Status bits a vhost-user front-end implies by negotiating features and starting rings
#: (vhost-user has no status register).
_NEGOTIATED = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK


class DeviceEvents(Protocol):
    """What a device needs from its shim: interrupts towards the driver."""

    def queue_interrupt(self, queue: int) -> None:
        """Used buffer notification for ``queue``."""

    def config_interrupt(self) -> None:
        """Configuration change notification (also used to report NEEDS_RESET)."""


class QueueHost(Protocol):
    """Who runs the device's queues: starts serving a queue, and stops before it goes away."""

    def start(self, index: int) -> None:
        """Queue ``index`` is active: serve it (drain it now and on every notification)."""

    def stop(self, index: int) -> None:
        """Return once no thread uses queue ``index``; it stays unused until :meth:`start`."""

    def notify(self, index: int) -> None:
        """Drain queue ``index`` soon, as if the driver had notified it (the device has work
        for buffers the driver already gave: data from the host for a receive queue)."""


class _Unattached:
    def queue_interrupt(self, queue: int) -> None:
        pass

    def config_interrupt(self) -> None:
        pass


class _CallerThread:
    """Queues processed in the thread that notifies (the synchronous in-process shim)."""

    def __init__(self, device: VirtioDevice | None = None) -> None:
        self.device = device

    def start(self, index: int) -> None:
        pass

    def stop(self, index: int) -> None:
        pass

    def notify(self, index: int) -> None:
        if self.device is not None:
            self.device.process_queue(index)


class DeviceError(Exception):
    """A chain the device cannot complete; the device needs a reset."""


class FeatureError(Exception):
    """The driver's feature set cannot be accepted (FEATURES_OK refused)."""


class InFlight:
    """A chain the device started and completes later (:meth:`VirtioDevice.start_chain`)."""

    __slots__ = ("chain", "taken")

    def __init__(self, chain: DescriptorChain, taken: int) -> None:
        self.chain = chain
        #: When it was taken from the ring (``time.monotonic_ns``).
        self.taken = taken

    def wait(self) -> None:
        """Return once the device no longer touches the chain's buffers, whatever the outcome
        (a queue that breaks waits for its chains in flight before it stops)."""
        raise NotImplementedError


class _Offloaded(InFlight):
    """A chain handled on the executor."""

    __slots__ = ("future",)

    def __init__(self, chain: DescriptorChain, taken: int, future: Future[int]) -> None:
        super().__init__(chain, taken)
        self.future = future

    def wait(self) -> None:
        self.future.exception()


class VirtioDevice:
    """Base class of devices. Subclasses set ``device_id`` and implement the hooks below."""

    device_id: ClassVar[DeviceId]
    #: Requests of at least this many bytes go to the executor (see :meth:`use_executor`).
    parallel_threshold = 1024 * 1024

    def __init__(self, num_queues: int, queue_size: int) -> None:
        if num_queues < 1:
            raise ValueError("a device needs at least one queue")
        self.queues = [SplitQueue(i, queue_size) for i in range(num_queues)]
        #: What each queue did (written by its worker; read by management and metrics).
        self.stats = [QueueStats(i) for i in range(num_queues)]
        self.__events: DeviceEvents = _Unattached()
        self.__host: QueueHost = _CallerThread(self)
        self.__memory: GuestMemory | None = None
        self.__dirty_log: DirtyLog | None = None
        self.__offered = self.device_features() | RING_FEATURES | bit(Feature.VERSION_1)
        self.__driver_features = 0
        self.__status = DeviceStatus(0)
        self.__config_generation = 0
        self.broken: str | None = None
        self.__executor: Executor | None = None
        self.__parallel_requests = 1
        self.__poll_ns = 0
        self.__stop_events: dict[int, threading.Event] = {}
        self.__control = threading.RLock()
        self.__state = threading.Lock()

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

    def handle_chains(
        self, queue: SplitQueue, chain: DescriptorChain
    ) -> list[tuple[DescriptorChain, int]]:
        """Handle ``chain``, taking more of the queue's chains with ``queue.pop()`` when one
        request needs several (virtio-net's mergeable receive buffers). Returns every chain
        taken with the bytes written to it, in the order the driver must see them; an empty
        list means that the device gave the chains back (``queue.unpop()``) and waits for the
        driver's next buffers. The default handles one chain with :meth:`handle_chain`."""
        return [(chain, self.handle_chain(queue, chain))]

    def on_features(self) -> None:
        """The driver's features are final: at FEATURES_OK on virtio-mmio, at every
        SET_FEATURES on vhost-user (before any ring of the device runs)."""

    def on_reset(self) -> None:
        """Called on device reset, after the queues were stopped and reset."""

    def housekeeping(self) -> None:
        """Called about once a second by a shim: look for host-side changes."""

    def has_work(self, queue: SplitQueue) -> bool:
        """Whether to take buffers from ``queue`` now. A queue whose buffers the device fills
        when the host has something for the driver (a receive queue) says no while it has
        nothing, and calls :meth:`notify_queue` when it has."""
        return True

    def start_chain(
        self, queue: SplitQueue, chain: DescriptorChain, taken: int, in_flight: int
    ) -> InFlight | int | None:
        """Start handling ``chain`` and return without waiting for it: the chain in flight,
        which :meth:`reap` hands back once done; or the bytes written to it, if it was done
        at once; or None, to have :meth:`handle_chains` handle it. ``in_flight``: how many of
        the queue's chains are in flight already. The default runs chains of at least
        ``parallel_threshold`` bytes on the executor (:meth:`use_executor`)."""
        executor = self.__executor
        if (
            executor is None
            or in_flight >= self.__parallel_requests
            or chain.read_len + chain.write_len < self.parallel_threshold
        ):
            return None
        return _Offloaded(chain, taken, executor.submit(self.handle_chain, queue, chain))

    def reap(
        self, queue: SplitQueue, in_flight: Collection[InFlight], *, block: bool
    ) -> list[tuple[InFlight, int]]:
        """Those of the queue's chains in flight that are done, with the bytes written to each,
        in any order; with ``block``, at least one. Raise DeviceError as
        :meth:`handle_chain` would."""
        futures = [item for item in in_flight if isinstance(item, _Offloaded)]
        if block:
            wait([item.future for item in futures], return_when=FIRST_COMPLETED)
        return [(item, item.future.result()) for item in futures if item.future.done()]

    def in_flight_limit(self, queue: SplitQueue) -> int:
        """How many chains of ``queue`` may be in flight before the device takes no more."""
        return sys.maxsize

    def close(self) -> None:
        """The device will not be used again: release what it holds on the host (threads,
        sockets). Called by the shim that made it, after its last reset."""

    # -- what the device is attached to ------------------------------------------------------

    def attach(self, events: DeviceEvents, host: QueueHost | None = None) -> None:
        """Connect the device to its shim: where interrupts go, and who runs the queues
        (None: the thread that notifies)."""
        with self.__control:
            self.__events = events
            self.__host = host if host is not None else _CallerThread(self)

    @property
    def memory(self) -> GuestMemory | None:
        return self.__memory

    def set_memory(self, memory: GuestMemory | None) -> None:
        """Guest memory for the rings and buffers. While queues run, only inside
        :meth:`queues_paused` (their rings are remapped on the way out)."""
        with self.__control:
            if any(q.active for q in self.queues):
                raise RuntimeError("guest memory replaced under running queues")
            self.__memory = memory

    def change_offer(self, *, add: int = 0, remove: int = 0) -> None:
        """Offer more (or fewer) features than the device type does: a transport withholding
        VERSION_1 (legacy virtio-mmio) or a shim offering ACCESS_PLATFORM. Only before the
        driver looks at the device."""
        with self.__control:
            if self.__status:
                raise RuntimeError("features changed while a driver uses the device")
            self.__offered = (self.__offered | add) & ~remove

    def use_executor(self, executor: Executor | None, parallel_requests: int = 1) -> None:
        """Copy requests of at least ``parallel_threshold`` bytes on ``executor``, up to
        ``parallel_requests`` of one queue at a time, while the queue's own thread goes on
        (the default :meth:`start_chain`)."""
        if parallel_requests < 1:
            raise ValueError("parallel_requests must be at least 1")
        with self.__control:
            self.__executor = executor
            self.__parallel_requests = parallel_requests

    def use_polling(self, microseconds: int) -> None:
        """Have the queues' workers look at their rings for new buffers for up to this long
        before they wait for a kick (0: never). The runner adapts the time to what it finds."""
        if microseconds < 0:
            raise ValueError("the polling time cannot be negative")
        self.__poll_ns = microseconds * 1000

    @property
    def poll_ns(self) -> int:
        """The longest a worker polls a ring before it waits for a kick, in nanoseconds."""
        return self.__poll_ns

    # -- features and status -------------------------------------------------------------------

    @property
    def offered_features(self) -> int:
        return self.__offered

    @property
    def driver_features(self) -> int:
        return self.__driver_features

    @property
    def status(self) -> DeviceStatus:
        return self.__status

    @property
    def config_generation(self) -> int:
        return self.__config_generation

    def negotiated(self, feature: int) -> bool:
        return has(self.__driver_features, feature)

    def set_driver_features(self, features: int) -> None:
        """A driver write to the driver features (virtio-mmio); final at FEATURES_OK."""
        with self.__control:
            if self.__status & DeviceStatus.FEATURES_OK:
                log.warning("driver wrote features after FEATURES_OK; ignored")
                return
            self.__driver_features = features

    def __features_problem(self, features: int, *, modern: bool) -> str | None:
        """Why the features cannot be used (§3.1.1 step 5), or None."""
        extra = features & ~self.__offered
        if extra:
            return f"driver accepted features {extra:#x} that were not offered"
        if (
            modern
            and has(self.__offered, Feature.VERSION_1)
            and not has(features, Feature.VERSION_1)
        ):
            return "driver did not accept VERSION_1 on a modern transport"
        return self.validate_features(features)

    def negotiate(self, features: int) -> None:
        """The front-end's features (vhost-user SET_FEATURES): checked, then final.

        vhost-user has no status register; accepting the features stands for FEATURES_OK.
        Raises FeatureError for features that were not offered or that the device refuses.
        """
        with self.__control:
            why = self.__features_problem(features, modern=False)
            if why is not None:
                raise FeatureError(why)
            self.__driver_features = features
            with self.__state:
                self.__status |= _NEGOTIATED
            self.on_features()

    def set_status(self, value: int) -> None:
        """A driver write to the status field (§2.1, §3.1.1); 0 resets the device."""
        with self.__control:
            if value == 0:
                self.reset()
                return
            new = DeviceStatus(value & 0xFF)
            old = self.__status
            if old & ~new & ~DeviceStatus.NEEDS_RESET:
                log.warning("driver cleared status bits %s without a reset", old & ~new)
            if new & DeviceStatus.FEATURES_OK and not old & DeviceStatus.FEATURES_OK:
                why = self.__features_problem(self.__driver_features, modern=True)
                if why is not None:
                    log.warning("refusing FEATURES_OK: %s", why)
                    new &= ~DeviceStatus.FEATURES_OK
                else:
                    self.on_features()
            with self.__state:
                self.__status = new | (self.__status & DeviceStatus.NEEDS_RESET)
            if new & DeviceStatus.DRIVER_OK and not old & DeviceStatus.DRIVER_OK:
                self.__driver_ok()

    def __driver_ok(self) -> None:
        if self.__memory is None:
            self.fail("DRIVER_OK without guest memory")
            return
        for queue in self.queues:
            if queue.ready and not queue.active:
                self.__activate(queue.index)

    def reset(self) -> None:
        """Device reset (§2.1.2, §2.4): back to the state before the driver found it.

        Returns once no worker uses a ring any more: a request in flight completes first (the
        driver's write of 0 to the status waits for it), and nothing of the old rings is
        touched afterwards.
        """
        with self.__control:
            for queue in self.queues:
                self.__host.stop(queue.index)
                queue.deactivate()
                queue.reset()
            self.__driver_features = 0
            with self.__state:
                self.__status = DeviceStatus(0)
                self.broken = None
            self.on_reset()

    def fail(self, reason: str) -> None:
        """The driver broke a rule we cannot recover from: set NEEDS_RESET and tell it (§2.1.2)."""
        with self.__state:
            if self.broken is None:
                log.error("device needs reset: %s", reason)
                self.broken = reason
            self.__status |= DeviceStatus.NEEDS_RESET
            live = bool(self.__status & DeviceStatus.DRIVER_OK)
        if live:
            self.__events.config_interrupt()

    # -- queues --------------------------------------------------------------------------------

    def configure_queue(self, index: int, layout: QueueLayout) -> None:
        """Size and ring addresses of a queue that is not running (raises VirtqueueError)."""
        with self.__control:
            self.queues[index].configure(layout)

    def attach_inflight(self, index: int, region: InflightRegion | None) -> None:
        """In-flight tracking for a queue that is not running (vhost-user INFLIGHT_SHMFD)."""
        with self.__control:
            self.queues[index].attach_inflight(region)

    def enable_queue(self, index: int) -> None:
        """The driver made the queue ready (QueueReady=1); it runs from DRIVER_OK on."""
        with self.__control:
            queue = self.queues[index]
            if queue.ready:
                return
            queue.ready = True
            if self.__status & DeviceStatus.DRIVER_OK and self.broken is None:
                self.__activate(index)

    def disable_queue(self, index: int) -> None:
        """The driver took the queue back (QueueReady=0): its worker stops, then the rings go."""
        with self.__control:
            self.__host.stop(index)
            queue = self.queues[index]
            queue.deactivate()
            queue.ready = False

    def start_queue(
        self, index: int, layout: QueueLayout, *, last_avail_idx: int, used_idx: int | None
    ) -> None:
        """Start a ring where the front-end says it is (vhost-user): configure, map, serve.

        ``used_idx=None`` resumes the used ring where guest memory says it is. vhost-user has
        no status register: a started ring means the driver is live. Raises VirtqueueError.
        """
        with self.__control:
            queue = self.queues[index]
            if queue.active:
                raise VirtqueueError(f"queue {index} is already running")
            if self.__memory is None:
                raise VirtqueueError(f"queue {index}: no guest memory")
            queue.configure(layout)
            queue.ready = True
            with self.__state:
                self.__status |= _NEGOTIATED | DeviceStatus.DRIVER_OK
            self.__activate(index, last_avail_idx, used_idx, raise_errors=True)

    def stop_queue(self, index: int) -> int:
        """Stop a ring (vhost-user GET_VRING_BASE): its worker first, then the rings.
        Returns where the driver's next available buffer is (``last_avail_idx``)."""
        with self.__control:
            self.__host.stop(index)
            queue = self.queues[index]
            last = queue.last_avail_idx
            queue.deactivate()
            queue.ready = False
            return last

    def __activate(
        self,
        index: int,
        last_avail_idx: int = 0,
        used_idx: int | None = 0,
        *,
        raise_errors: bool = False,
    ) -> None:
        queue = self.queues[index]
        assert self.__memory is not None
        try:
            queue.activate(
                self.__memory,
                event_idx=self.negotiated(Feature.RING_EVENT_IDX),
                indirect=self.negotiated(Feature.RING_INDIRECT_DESC),
                last_avail_idx=last_avail_idx,
                used_idx=used_idx,
                dirty_log=self.__dirty_log,
            )
        except VirtqueueError as exc:
            if raise_errors:
                raise
            self.fail(str(exc))
            return
        self.__host.start(index)

    def set_dirty_log(self, dirty_log: DirtyLog | None) -> None:
        """Log every write to guest memory in ``dirty_log`` from now on (live migration), or
        stop logging. Running queues pause while the log changes, so that no write of theirs
        escapes it; the caller may release the previous log once this returns."""
        with self.queues_paused():
            self.__dirty_log = dirty_log

    @contextmanager
    def queues_paused(self) -> Iterator[None]:
        """Stop every running queue and unmap its rings; on exit map them again and go on.

        Inside, guest memory may change (:meth:`set_memory`, a Xen map cache dropping its
        mappings) and the queues may be configured anew (:meth:`configure_queue`). Each queue
        resumes where it stopped; one whose rings no longer map makes the device need a reset.
        """
        with self.__control:
            paused: list[tuple[int, int]] = []
            for queue in self.queues:
                if queue.active:
                    self.__host.stop(queue.index)
                    paused.append((queue.index, queue.last_avail_idx))
                    queue.deactivate()
            try:
                yield
            finally:
                for index, last in paused:
                    if self.__memory is None:
                        self.fail(f"queue {index}: guest memory went away")
                    elif self.queues[index].ready:
                        self.__activate(index, last, None)

    # -- config space --------------------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes of the config space; reads beyond it return zeros."""
        config = self.config_bytes()
        data = config[offset : offset + size]
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        with self.__control:
            if offset < 0 or offset + len(data) > len(self.config_bytes()):
                log.warning("config write outside config space at %#x ignored", offset)
                return
            self.write_config_bytes(offset, data)

    def config_changed(self) -> None:
        """The device changed its config: bump the generation (§2.5.1) and interrupt."""
        with self.__state:
            self.__config_generation = (self.__config_generation + 1) & 0xFFFFFFFF
            live = bool(self.__status & DeviceStatus.DRIVER_OK)
        if live:
            self.__events.config_interrupt()

    # -- queue processing (the data path: workers, never under ``__control``) ------------------

    def notify_queue(self, index: int) -> None:
        """The device has work for queue ``index``'s buffers: have it drained soon."""
        self.__host.notify(index)

    def wait_unless_stopping(self, index: int, seconds: float) -> bool:
        """For a device whose request must wait (a rate limit): sleep up to ``seconds``, and
        return True at once if queue ``index``'s worker is being stopped meanwhile (a reset
        must not wait for it)."""
        stop = self.__stop_events.get(index)
        if stop is None:
            time.sleep(seconds)
            return False
        return stop.wait(seconds)

    def __complete(self, queue: SplitQueue, chain: DescriptorChain, written: int) -> None:
        if chain.held:
            self.__release(chain)
        if queue.logging:
            for addr, length, flags in chain.descriptors:
                if flags & DescFlag.WRITE:
                    queue.log_write(addr, length)
        queue.push(chain.head, written)

    def __release(self, chain: DescriptorChain) -> None:
        """Unmap what was mapped for ``chain`` alone before the driver sees it completed (a
        Xen guest may revoke its grants as soon as it does)."""
        if not chain.release():
            log.error(
                "queue request %d: a mapping made for it is still referenced and is unmapped late",
                chain.head,
            )

    def __complete_in_flight(
        self, queue: SplitQueue, stats: QueueStats, in_flight: set[InFlight], block: bool
    ) -> None:
        clock = time.monotonic_ns
        for item, written in self.reap(queue, in_flight, block=block):
            in_flight.discard(item)
            chain = item.chain
            self.__complete(queue, chain, written)
            stats.completed(chain.read_len, written, clock() - item.taken)

    def process_queue(
        self, index: int, stop: threading.Event | None = None, poll_ns: int = 0
    ) -> None:
        """Drain queue ``index``: handle every available chain, then interrupt if asked to.

        ``stop`` (the worker's) ends the drain early, after the chain in hand: every chain
        taken from the ring is completed and published before this returns. Chains the device
        starts (:meth:`start_chain`: asynchronous storage, the executor) are completed as they
        finish, while this thread takes the next ones, and the call returns once none is left.
        ``poll_ns``: once the ring is empty, look at it for new buffers for up to this long
        before asking the driver for kicks again (the driver does not kick meanwhile); a
        ``stop`` ends the polling at once.
        """
        queue = self.queues[index]
        if not queue.active or self.broken is not None:
            return
        if stop is not None:
            self.__stop_events[index] = stop
        stats = self.stats[index]
        clock = time.monotonic_ns
        in_flight: set[InFlight] = set()
        limit = self.in_flight_limit(queue)
        stopping = stop.is_set if stop is not None else lambda: False
        try:
            queue.disable_notifications()
            while True:
                starved = False
                while (
                    not stopping()
                    and len(in_flight) < limit
                    and self.has_work(queue)
                    and (chain := queue.pop()) is not None
                ):
                    started = clock()
                    stats.taken()
                    item = self.start_chain(queue, chain, started, len(in_flight))
                    if isinstance(item, InFlight):
                        in_flight.add(item)
                        continue
                    if item is not None:
                        self.__complete(queue, chain, item)
                        stats.completed(chain.read_len, item, clock() - started)
                        continue
                    done = self.handle_chains(queue, chain)
                    if not done:
                        stats.in_flight -= 1  # given back to the ring
                        starved = True
                        break
                    read = written = 0
                    for taken, count in done:
                        self.__complete(queue, taken, count)
                        read += taken.read_len
                        written += count
                    stats.completed(read, written, clock() - started)
                    if in_flight:
                        self.__complete_in_flight(queue, stats, in_flight, False)
                if in_flight:
                    self.__complete_in_flight(queue, stats, in_flight, False)
                if queue.publish():
                    self.__events.queue_interrupt(index)
                if in_flight:
                    if len(in_flight) >= limit or stopping() or not queue.has_available():
                        self.__complete_in_flight(queue, stats, in_flight, True)
                    continue
                if stopping() or not self.has_work(queue):
                    queue.enable_notifications()  # the driver's next buffers will kick
                    break
                if poll_ns and not starved and self.__poll(queue, stopping, poll_ns):
                    continue
                if not queue.enable_notifications(new_only=starved):
                    break
                queue.disable_notifications()
        except (VirtqueueError, DeviceError) as exc:
            for item in in_flight:  # they write guest memory: let them finish first
                item.wait()
            stats.in_flight = 0  # nothing of this ring completes any more
            if queue.publish():
                self.__events.queue_interrupt(index)
            self.fail(str(exc))
        except BaseException:
            # A bug of ours (the worker reports it): the kernel or the executor may still be
            # writing the buffers of the chains in flight, whose memory a reset unmaps next.
            for item in in_flight:
                with contextlib.suppress(Exception):
                    item.wait()
            raise

    @staticmethod
    def __poll(queue: SplitQueue, stopping: Callable[[], bool], poll_ns: int) -> bool:
        """Whether the driver added buffers within ``poll_ns`` (False if told to stop). Each
        look releases the GIL (``sched_yield``), so the other queues' threads run meanwhile."""
        deadline = time.monotonic_ns() + poll_ns
        clock, pause = time.monotonic_ns, os.sched_yield
        while not stopping():
            if queue.has_available():
                return True
            if clock() >= deadline:
                return False
            pause()
        return False
