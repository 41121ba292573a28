"""``pyvirtio xen``: serve the virtio disks the toolstack configures, for every guest.

The daemon watches ``/local/domain/<self>/backend/virtio_disk`` (libxl writes a directory there
for each ``disk = [ '..., backendtype=standalone, specification=virtio' ]``, at its own moment
after the domain appears, so the daemon keeps watching rather than listing once). For each
disk it validates the configuration, has the device built (by the factory it was given: the
CLI's builds virtio-blk on the image, or the device a ``*.pyvirtio`` description names) on a
virtio-mmio transport, claims the MMIO window in the guest's IOREQ server (one per guest,
shared by its disks) and answers the xenbus handshake. Devices go away when the toolstack asks
(state Closing, or the directory is removed) and everything of a guest goes when it dies.

Interrupts take the kernel's path where it has one (Linux >= 6.7's privcmd irqfd, see
``privcmd.py``): the kernel raises the interrupt when the disk's interrupt eventfd is written;
otherwise (``ENOTTY``, or ``Options.notify = "ioreq"``) ``set_irq_level`` does. QueueNotify
IOREQs are the IOREQ thread's, unless ``Options.notify = "kernel"`` hands them to privcmd's
ioeventfd, whose handler can crash the guest (``server.py``; docs/xen.md, "Notifications").
:meth:`XenBackendDaemon.log_stats` reports what each guest's notifications and mappings cost
(``kill -USR1`` runs it).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import queue
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvirtio.device import VirtioDevice
from pyvirtio.runner import QueueRunner
from pyvirtio.shims.xen.config import ConfigError, DiskConfig, parse_disk
from pyvirtio.shims.xen.gntdev import Gntdev
from pyvirtio.shims.xen.libs import DeviceModel, ForeignMemory, XenError, XenStore
from pyvirtio.shims.xen.memory import ForeignGuestMemory
from pyvirtio.shims.xen.privcmd import Privcmd, dm_op_set_irq_level
from pyvirtio.shims.xen.server import GuestServer
from pyvirtio.shims.xen.xenbus import XenbusState, parse_state
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.mmio import WINDOW_SIZE, Reg
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.transport.mmio import MmioTransport

log = logging.getLogger(__name__)

WATCH_TOKEN = "pyvirtio-disks"
RELEASE_TOKEN = "pyvirtio-release"


#: Options.notify: the kernel's irqfd where it has one; its irqfd and ioeventfd, or fail; neither.
NOTIFY_PATHS = ("auto", "kernel", "ioreq")


@dataclass
class Options:
    backend_domid: int | None = None
    static_mapping: bool = False
    map_cache_pages: int = 32768
    notify: str = "auto"


class DiskInterrupt:
    """Raises one disk's SPI: by writing an eventfd the kernel turns into XEN_DMOP_set_irq_level
    (privcmd irqfd), or by the dm_op itself. libxl declares the SPI edge-rising, so each raise
    is one interrupt and the line is never lowered (lowering would only cost a hypercall)."""

    def __init__(self, dm: DeviceModel, domid: int, irq: int) -> None:
        self.dm = dm
        self.domid = domid
        self.irq = irq
        self.fd: int | None = None  # the irqfd's eventfd
        self.raised = 0
        self.ns = 0

    def __call__(self, level: bool) -> None:
        if not level:
            return
        started = time.perf_counter_ns()
        fd = self.fd
        if fd is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(fd, 1)
        else:
            try:
                self.dm.set_irq_level(self.domid, self.irq, 1)
            except XenError as exc:
                log.debug("dom%d: set_irq_level(%d): %s", self.domid, self.irq, exc)
        self.raised += 1
        self.ns += time.perf_counter_ns() - started


@dataclass
class Disk:
    """One entry of the guest's ``disk = [...]``: a virtio-blk disk, or another device."""

    config: DiskConfig
    path: str
    device: VirtioDevice
    transport: MmioTransport
    runner: QueueRunner
    interrupt: DiskInterrupt
    kick_fds: list[int]
    state: XenbusState = XenbusState.INITIALISING


@dataclass
class Guest:
    domid: int
    privcmd: Privcmd
    memory: ForeignGuestMemory
    server: GuestServer
    gntdev: Gntdev | None = None
    disks: dict[int, Disk] = field(default_factory=dict)
    #: The counters of disks already gone (see :meth:`retire`).
    gone: dict[str, int] = field(default_factory=dict)

    def _disk_counters(self, disks: list[Disk]) -> dict[str, int]:
        queues = [q for disk in disks for q in disk.device.stats]
        return {
            "raised": sum(d.interrupt.raised for d in disks),
            "irq_ns": sum(d.interrupt.ns for d in disks),
            "irqfd": sum(d.interrupt.fd is not None for d in disks),
            "requests": sum(q.requests for q in queues),
            "bytes": sum(q.bytes_read + q.bytes_written for q in queues),
            "request_ns": sum(q.latency_sum_ns for q in queues),
        }

    def retire(self, disk: Disk) -> None:
        """Keep the counters of ``disk``, which is going, in the guest's."""
        for key, value in self._disk_counters([disk]).items():
            self.gone[key] = self.gone.get(key, 0) + value

    def stats(self) -> dict[str, object]:
        """What the guest's notifications and mappings cost so far (counts, nanoseconds)."""
        now = self._disk_counters(list(self.disks.values()))
        c = {key: now[key] + self.gone.get(key, 0) for key in now}
        gntdev = self.gntdev
        return {
            "domid": self.domid,
            "ioreq": self.server.stats.snapshot(),
            "interrupts": {"raised": c["raised"], "ns": c["irq_ns"], "irqfd": c["irqfd"] > 0},
            "maps": {
                "foreign": [self.privcmd.maps, self.privcmd.map_ns],
                "grant": [gntdev.maps, gntdev.map_ns] if gntdev else [0, 0],
                "grant_unmap": [gntdev.unmaps, gntdev.unmap_ns] if gntdev else [0, 0],
            },
            "grant_copy": [gntdev.copies, gntdev.copy_ns] if gntdev else [0, 0],
            "slots": self.server.slots(),
            "queues": [
                {"disk": devid, **q.ring_indices(), "running": disk.runner.running(q.index)}
                for devid, disk in self.disks.items()
                for q in disk.device.queues
            ],
            "requests": c["requests"],
            "bytes": c["bytes"],
            "request_ns": c["request_ns"],
        }

    def invalidate(self) -> None:
        """IOREQ_TYPE_INVALIDATE: the guest's memory map changed. Every disk's queues stop
        (their workers finish the request in hand) and let go of their rings, the cached
        mappings go, and the queues map their rings again and go on."""
        with contextlib.ExitStack() as paused:
            for disk in list(self.disks.values()):
                paused.enter_context(disk.device.queues_paused())
            self.memory.invalidate()


def _log_stats(guest: Guest) -> None:
    times = os.times()
    record = {**guest.stats(), "cpu": {"user": times.user, "system": times.system}}
    log.info("dom%d: stats %s", guest.domid, json.dumps(record, sort_keys=True))


class _Window:
    """Forwards a disk's MMIO window to its transport and reports DRIVER_OK to the daemon."""

    def __init__(self, daemon: XenBackendDaemon, key: tuple[int, int], transport: MmioTransport):
        self.daemon = daemon
        self.key = key
        self.transport = transport
        self.read = transport.read

    def write(self, offset: int, size: int, value: int) -> None:
        self.transport.write(offset, size, value)
        if offset == Reg.STATUS:
            self.daemon.post(self.key)


#: Builds the device for one entry of a guest's ``disk = [...]`` and says what it is (for the
#: log); raises ConfigError for an entry it refuses. The daemon serves whatever it builds.
DeviceFactory = Callable[[DiskConfig], tuple[VirtioDevice, str]]


class XenBackendDaemon:
    def __init__(self, options: Options, new_device: DeviceFactory) -> None:
        self.options = options
        if options.notify == "kernel":
            log.warning(
                "--notify kernel: privcmd's ioeventfd handler puts every other MMIO write it "
                "looked at back to READY after INPROCESS, and Xen crashes a guest that sees an "
                "IOREQ's state go backwards"
            )
        self.new_device = new_device
        self.xs = XenStore()
        self.dm = DeviceModel()
        self.fmem = ForeignMemory()
        if options.backend_domid is not None:
            self.domid = options.backend_domid
        else:
            text = self.xs.read("domid")
            self.domid = int(text) if text and text.isdigit() else 0
        self.root = f"/local/domain/{self.domid}/backend/virtio_disk"
        self.guests: dict[int, Guest] = {}
        self._refused: dict[str, str] = {}
        self._events: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._stats_wanted = False

    # -- main loop -----------------------------------------------------------------------------

    def request_stats(self) -> None:
        """Ask the main loop for :meth:`log_stats` (safe from a signal handler)."""
        self._stats_wanted = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def log_stats(self) -> None:
        """One line per guest: ``dom<N>: stats {json}`` (see :meth:`Guest.stats`), with this
        process's CPU time."""
        for guest in list(self.guests.values()):
            _log_stats(guest)

    def post(self, key: tuple[int, int]) -> None:
        """From the IOREQ thread: a disk's status changed; the main loop looks at it."""
        self._events.put(key)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def run(self) -> None:
        self.xs.watch(self.root, WATCH_TOKEN)
        self.xs.watch("@releaseDomain", RELEASE_TOKEN)
        log.info("dom%d: watching %s", self.domid, self.root)
        poller = select.poll()
        poller.register(self.xs.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        self.scan()
        while not self._stopping:
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    self._drain_events()
                    if self._stats_wanted:
                        self._stats_wanted = False
                        self.log_stats()
                else:
                    _, token = self.xs.read_watch()
                    if token == RELEASE_TOKEN:
                        self.reap_dead_guests()
                    self.scan()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        for domid in list(self.guests):
            self.remove_guest(domid, write_closed=True)
        with contextlib.suppress(XenError):
            self.xs.unwatch(self.root, WATCH_TOKEN)
            self.xs.unwatch("@releaseDomain", RELEASE_TOKEN)
        self.xs.close()
        self.dm.close()
        self.fmem.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _drain_events(self) -> None:
        while True:
            try:
                domid, devid = self._events.get_nowait()
            except queue.Empty:
                return
            guest = self.guests.get(domid)
            disk = guest.disks.get(devid) if guest else None
            if (
                disk is not None
                and disk.state == XenbusState.INIT_WAIT
                and disk.device.status & DeviceStatus.DRIVER_OK
            ):
                self._set_state(disk, XenbusState.CONNECTED)

    # -- xenstore ------------------------------------------------------------------------------

    def _set_state(self, disk: Disk, state: XenbusState) -> None:
        disk.state = state
        with contextlib.suppress(XenError):
            self.xs.write(f"{disk.path}/state", str(int(state)))
        log.info(
            "dom%d disk %d: xenbus state %s", disk.config.frontend_id, disk.config.devid, state.name
        )

    def _values(self, path: str) -> dict[str, str]:
        values = {}
        for key in self.xs.directory(path):
            value = self.xs.read(f"{path}/{key}")
            if value is not None:
                values[key] = value
        return values

    def scan(self) -> None:
        """Bring the served disks in line with what xenstore says."""
        present: set[tuple[int, int]] = set()
        for fe_text in self.xs.directory(self.root):
            if not fe_text.isdigit():
                continue
            frontend = int(fe_text)
            for dev_text in self.xs.directory(f"{self.root}/{fe_text}"):
                if not dev_text.isdigit():
                    continue
                devid = int(dev_text)
                present.add((frontend, devid))
                self._scan_disk(frontend, devid, f"{self.root}/{fe_text}/{dev_text}")
        for domid, guest in list(self.guests.items()):
            for devid in list(guest.disks):
                if (domid, devid) not in present:
                    log.info("dom%d disk %d: removed by the toolstack", domid, devid)
                    self.remove_disk(domid, devid, write_closed=False)

    def _scan_disk(self, frontend: int, devid: int, path: str) -> None:
        guest = self.guests.get(frontend)
        disk = guest.disks.get(devid) if guest else None
        state = parse_state(self.xs.read(f"{path}/state"))
        if disk is not None:
            online = self.xs.read(f"{path}/online")
            if state == XenbusState.CLOSING or online == "0":
                self.remove_disk(frontend, devid, write_closed=True)
            return
        if state not in (XenbusState.INITIALISING, XenbusState.UNKNOWN):
            return  # not ours to set up (closed, or served by an earlier run)
        try:
            config = parse_disk(frontend, devid, self._values(path))
            self.add_disk(config, path)
        except (ConfigError, XenError, OSError, ValueError) as exc:
            if self._refused.get(path) != str(exc):
                log.error("dom%d disk %d: refused: %s", frontend, devid, exc)
                self._refused[path] = str(exc)
            with contextlib.suppress(XenError):
                self.xs.write(f"{path}/error", str(exc)[:200])
                self.xs.write(f"{path}/state", str(int(XenbusState.CLOSED)))

    # -- guests and disks ----------------------------------------------------------------------

    def _guest(self, domid: int) -> Guest:
        guest = self.guests.get(domid)
        if guest is not None:
            return guest
        privcmd = Privcmd(domid)
        try:
            gntdev: Gntdev | None = Gntdev()
        except OSError as exc:
            log.warning(
                "dom%d: no grant mappings (%s); a guest that uses grants will fail",
                domid,
                exc.strerror,
            )
            gntdev = None
        try:
            memory = ForeignGuestMemory(
                privcmd,
                domid,
                max_pages=self.options.map_cache_pages,
                static=self.options.static_mapping,
                gntdev=gntdev,
            )
            server = GuestServer(
                domid, self.dm, self.fmem, on_invalidate=functools.partial(self._invalidate, domid)
            )
        except BaseException:
            privcmd.close()
            if gntdev is not None:
                gntdev.close()
            raise
        guest = Guest(domid, privcmd, memory, server, gntdev)
        self.guests[domid] = guest
        return guest

    def _invalidate(self, domid: int) -> None:
        guest = self.guests.get(domid)
        if guest is not None:
            guest.invalidate()

    def add_disk(self, config: DiskConfig, path: str) -> None:
        guest = self._guest(config.frontend_id)
        device, what = self.new_device(config)
        try:
            device.set_memory(guest.memory)
            # Guests that restrict their backends to grants require ACCESS_PLATFORM; with it
            # negotiated, addresses are grant references or plain guest-physical ones.
            device.change_offer(add=bit(Feature.ACCESS_PLATFORM))
            runner = QueueRunner(device)
            kick_fds = []
            for index in range(len(device.queues)):
                kick_fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
                runner.set_kick_fd(index, kick_fds[-1])  # the runner owns it now
            interrupt = DiskInterrupt(self.dm, config.frontend_id, config.irq)
            transport = MmioTransport(
                device, interrupt=interrupt, notify=runner.notify, host=runner
            )
            disk = Disk(config, path, device, transport, runner, interrupt, kick_fds)
            guest.disks[config.devid] = disk
            guest.server.add_window(
                config.base,
                WINDOW_SIZE,
                _Window(self, (config.frontend_id, config.devid), transport),
            )
            how = self._kernel_paths(guest, disk)
        except BaseException:
            if config.devid in guest.disks:
                self.remove_disk(config.frontend_id, config.devid, write_closed=False)
            else:
                device.close()
            raise
        log.info(
            "dom%d disk %d: serving %s at %#x irq %d; notifications %s",
            config.frontend_id,
            config.devid,
            what,
            config.base,
            config.irq,
            how,
        )
        self._set_state(disk, XenbusState.INIT_WAIT)

    def _kernel_paths(self, guest: Guest, disk: Disk) -> str:
        """Hand the disk's interrupt (and with ``--notify kernel`` its QueueNotify writes) to
        the kernel, privcmd irqfd (and ioeventfd), if it can take them and the options allow;
        say which path the notifications take. OSError if the options demand the kernel's
        and it has none."""
        if self.options.notify == "ioreq":
            return "through the IOREQ thread and set_irq_level (--notify ioreq)"
        config = disk.config
        try:
            if self.options.notify == "kernel":
                for index, fd in enumerate(disk.kick_fds):
                    guest.server.kernel_notify(guest.privcmd, config.base, index, fd)
            irqfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                guest.privcmd.irqfd(
                    config.frontend_id, irqfd, dm_op_set_irq_level(config.irq, 1), assign=True
                )
            except OSError:
                os.close(irqfd)
                raise
            disk.interrupt.fd = irqfd
        except OSError as exc:
            guest.server.remove_kernel_notifies(config.base)
            if self.options.notify == "kernel":
                raise
            reason = errno.errorcode.get(exc.errno or 0, str(exc))
            return f"through the IOREQ thread and set_irq_level (privcmd: {reason})"
        if self.options.notify == "kernel":
            return "through the kernel (privcmd ioeventfd and irqfd)"
        return "through the IOREQ thread (QueueNotify) and the kernel (interrupts: privcmd irqfd)"

    def remove_disk(self, domid: int, devid: int, *, write_closed: bool) -> None:
        guest = self.guests.get(domid)
        if guest is None or devid not in guest.disks:
            return
        disk = guest.disks.pop(devid)
        guest.server.remove_window(disk.config.base, WINDOW_SIZE)  # and the kernel's notifies
        disk.device.reset()
        disk.runner.close()  # closes the kick eventfds
        guest.retire(disk)
        disk.device.set_memory(None)
        disk.device.close()
        irqfd, disk.interrupt.fd = disk.interrupt.fd, None
        if irqfd is not None:
            try:
                guest.privcmd.irqfd(
                    domid, irqfd, dm_op_set_irq_level(disk.config.irq, 1), assign=False
                )
            except OSError as exc:
                log.warning("dom%d disk %d: cannot remove the irqfd: %s", domid, devid, exc)
            os.close(irqfd)
        if write_closed:
            self._set_state(disk, XenbusState.CLOSED)
        log.info("dom%d disk %d: stopped", domid, devid)
        if not guest.disks:
            self.remove_guest(domid, write_closed=write_closed)

    def remove_guest(self, domid: int, *, write_closed: bool) -> None:
        guest = self.guests.get(domid)
        if guest is None:
            return
        for devid in list(guest.disks):
            self.remove_disk(domid, devid, write_closed=write_closed)
        self.guests.pop(domid, None)
        _log_stats(guest)
        guest.server.close()
        guest.memory.close()
        guest.privcmd.close()
        if guest.gntdev is not None:
            guest.gntdev.close()

    def reap_dead_guests(self) -> None:
        for domid in list(self.guests):
            try:
                self.dm.nr_vcpus(domid)
            except XenError:
                log.info("dom%d: gone; releasing everything it used", domid)
                self.remove_guest(domid, write_closed=False)
