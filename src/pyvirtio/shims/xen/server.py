"""The IOREQ server of one guest: Xen forwards the guest's accesses to our MMIO windows here.

Set-up follows the IOREQ server interface (xen/include/public/hvm/dm_op.h): create the server
without buffered ioreqs (Arm has none), map its shared ioreq page (one ``struct ioreq`` slot
per vCPU) with ``xenforeignmemory_map_resource``, enable it, bind one event channel per vCPU,
and claim each device's MMIO range. A thread then waits on the event channels and serves each
request with the protocol of ioreq.h:

    READY --(device model reads it, after a read barrier)--> INPROCESS
          --(answer written, then a write barrier)--> IORESP_READY, and notify the vCPU's port.

Where the kernel has privcmd ioeventfds (Linux >= 6.7), :meth:`GuestServer.kernel_notify`
hands a queue's QueueNotify writes to it: the kernel's handler for the same event channels
completes them and signals the queue's kick eventfd, so the vCPU does not wait for this
thread. The thread still wakes for each event (Linux leaves the port masked until it is
unmasked here) and must not touch those IOREQs.

The kernel's handler also looks at every other MMIO write, to decline it: it sets INPROCESS,
compares, and stores READY again, with plain stores and no lock this thread could take. It runs
in the same interrupt as the event channel device's handler that wakes this thread, after it,
on whichever CPU took the interrupt. Were this thread to claim such a write while the handler
still held it, the handler's late READY would overwrite the answer and the vCPU would wait
forever. So before claiming a write the thread runs once on every other CPU (a CPU that runs
a thread is not inside an interrupt handler, and the event that woke the thread was taken
before it woke), and it unmasks a port only after serving its IOREQ, so that no new
interrupt for that port begins meanwhile.

That READY after INPROCESS is also a hazard no backend can remove: Xen (common/ioreq.c,
wait_for_io) crashes the guest whose vCPU sees an IOREQ's state go backwards, which it does
when it looks between the handler's two stores. So the daemon hands QueueNotify to the kernel
only when asked to (``--notify kernel``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvirtio.memory.barrier import acquire_fence, release_fence
from pyvirtio.shims.xen.ioreq import (
    DATA_OFFSET,
    IOREQ_SIZE,
    KINDS,
    STATE_MASK,
    STATE_OFFSET,
    IoreqDispatcher,
    IoreqState,
    MmioDevice,
    kind,
    parse,
)
from pyvirtio.shims.xen.libs import (
    XENMEM_RESOURCE_IOREQ_SERVER,
    DeviceModel,
    EventChannels,
    ForeignMemory,
    XenError,
    resource_ioreq_frame,
)
from pyvirtio.shims.xen.privcmd import Privcmd

log = logging.getLogger(__name__)

_READY = IoreqState.READY.value
_INPROCESS = IoreqState.INPROCESS.value
_RESP_READY = IoreqState.RESP_READY.value
_DATA = struct.Struct("<Q")
#: Slots of one ioreq page (4 KiB / 32 bytes); guests with more vCPUs are refused.
MAX_VCPUS = 4096 // IOREQ_SIZE


@dataclass
class IoreqStats:
    """What the IOREQ thread did: per kind of access (:data:`KINDS`), how many it served and
    the nanoseconds from its wake-up to the notification of the vCPU; ``kernel``: events whose
    IOREQ the kernel had completed (or was completing) itself; ``outwaits``: writes served
    only after running on every other CPU (see the module's docstring)."""

    served: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    kernel: int = 0
    outwaits: int = 0

    def snapshot(self) -> dict[str, object]:
        return {
            "served": dict(self.served),
            "ns": dict(self.ns),
            "kernel": self.kernel,
            "outwaits": self.outwaits,
        }


class GuestServer:
    """One guest's IOREQ server and the thread that serves it."""

    def __init__(
        self,
        domid: int,
        dm: DeviceModel,
        fmem: ForeignMemory,
        *,
        on_invalidate: Callable[[], None] | None = None,
    ) -> None:
        self.domid = domid
        self.dm = dm
        self.fmem = fmem
        self.dispatcher = IoreqDispatcher(on_invalidate)
        self.requests = 0
        self.stats = IoreqStats()
        self._kernel_fds: dict[tuple[int, int], tuple[Privcmd, int]] = {}
        self._stopping = False
        self._resource: int | None = None
        self.evtchn: EventChannels | None = None
        self._ports: dict[int, int] = {}  # local port -> vCPU
        self._vcpu_port: list[int] = []
        self.vcpus = dm.nr_vcpus(domid)
        if not 0 < self.vcpus <= MAX_VCPUS:
            raise XenError(errno.EINVAL, f"dom{domid} has {self.vcpus} vCPUs")
        self.server_id = dm.create_ioreq_server(domid)
        try:
            self._resource, addr = fmem.map_resource(
                domid, XENMEM_RESOURCE_IOREQ_SERVER, self.server_id, resource_ioreq_frame(0), 1
            )
            self.page_address = addr
            self.page = memoryview((ctypes.c_ubyte * 4096).from_address(addr)).cast("B")
            dm.set_ioreq_server_state(domid, self.server_id, True)
            self.evtchn = EventChannels()
            for vcpu in range(self.vcpus):
                remote = struct.unpack_from("<I", self.page, vcpu * IOREQ_SIZE + 24)[0]
                local = self.evtchn.bind_interdomain(domid, remote)
                self._ports[local] = vcpu
                self._vcpu_port.append(local)
        except BaseException:
            self.close()
            raise
        self._cpus = sorted(os.sched_getaffinity(0))
        self._cpu: int | None = None  # the one CPU the thread is pinned to, once it is
        self._pin_failed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._run, name=f"ioreq-dom{domid}", daemon=True)
        self.thread.start()
        log.info("dom%d: IOREQ server %d up with %d vCPUs", domid, self.server_id, self.vcpus)

    # -- devices -------------------------------------------------------------------------------

    def add_window(self, base: int, size: int, device: MmioDevice) -> None:
        self.dispatcher.add(base, size, device)
        try:
            self.dm.map_mmio_range(self.domid, self.server_id, base, base + size - 1)
        except XenError:
            self.dispatcher.remove(base)
            raise

    def remove_window(self, base: int, size: int) -> None:
        self.remove_kernel_notifies(base)
        self.dispatcher.remove(base)
        with contextlib.suppress(XenError):
            self.dm.unmap_mmio_range(self.domid, self.server_id, base, base + size - 1)

    def kernel_notify(self, privcmd: Privcmd, base: int, queue: int, fd: int) -> None:
        """Have the kernel complete the QueueNotify writes of ``queue`` to the window at
        ``base`` and signal eventfd ``fd`` (which must stay open until :meth:`remove_window`).
        OSError (ENOTTY: the kernel has no privcmd ioeventfd) leaves this thread serving
        them."""
        privcmd.ioeventfd(
            self.domid, self.page_address, self._vcpu_port, base, fd, queue, assign=True
        )
        self._kernel_fds[(base, queue)] = (privcmd, fd)
        self.dispatcher.set_kernel_notify(base, queue, True)

    def remove_kernel_notifies(self, base: int) -> None:
        """Serve the QueueNotify writes of the window at ``base`` here again."""
        for window, queue in [k for k in self._kernel_fds if k[0] == base]:
            self._kernel_stop(window, queue)

    def _kernel_stop(self, base: int, queue: int) -> None:
        privcmd, fd = self._kernel_fds.pop((base, queue))
        self.dispatcher.set_kernel_notify(base, queue, False)
        try:
            privcmd.ioeventfd(
                self.domid, self.page_address, self._vcpu_port, base, fd, queue, assign=False
            )
        except OSError as exc:
            log.warning("dom%d: cannot remove the kernel's ioeventfd: %s", self.domid, exc)

    # -- the request loop ----------------------------------------------------------------------

    def _run(self) -> None:
        evtchn = self.evtchn
        assert evtchn is not None
        poller = select.poll()
        poller.register(evtchn.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stopping:
                for fd, _ in poller.poll():
                    if fd == self._wake_r:
                        return
                    port = evtchn.pending()
                    vcpu = self._ports.get(port)
                    try:
                        if vcpu is not None:
                            self._serve(vcpu)
                    finally:
                        evtchn.unmask(port)
        except XenError as exc:
            if not self._stopping:
                log.error("dom%d: event channel failed: %s", self.domid, exc)
        except Exception:
            log.exception("dom%d: IOREQ thread failed", self.domid)

    def _serve(self, vcpu: int) -> None:
        started = time.perf_counter_ns()
        page = self.page
        offset = vcpu * IOREQ_SIZE
        state_at = offset + STATE_OFFSET
        bits = page[state_at]
        state = bits & STATE_MASK
        kernel = bool(self._kernel_fds)
        if state != _READY and not (kernel and state == _INPROCESS):  # the kernel's: above
            self.stats.kernel += kernel
            return
        acquire_fence()  # the request's fields after its state (ioreq.h protocol)
        req = parse(page[offset : offset + IOREQ_SIZE])
        if self.dispatcher.for_kernel(req):
            self.stats.kernel += 1
            return
        if state == _INPROCESS or self.dispatcher.kernel_looks_at(req):
            self._outwait_kernel()
            bits = page[state_at]
            if bits & STATE_MASK != _READY:
                log.warning("dom%d: vCPU %d's IOREQ is in state %d", self.domid, vcpu, bits)
                return
            acquire_fence()
            self.stats.outwaits += 1
        page[state_at] = (bits & ~STATE_MASK) | _INPROCESS
        try:
            answer = self.dispatcher.handle(req)
        except Exception:
            log.exception("dom%d: IOREQ at %#x failed", self.domid, req.addr)
            answer = (1 << 64) - 1 if req.is_read else None
        if answer is not None:
            _DATA.pack_into(page, offset + DATA_OFFSET, answer)
        release_fence()  # the answer before the state that publishes it
        page[state_at] = (page[state_at] & ~STATE_MASK) | _RESP_READY
        self.requests += 1
        assert self.evtchn is not None
        self.evtchn.notify(self._vcpu_port[vcpu])
        what = kind(req)
        self.stats.served[what] += 1
        self.stats.ns[what] += time.perf_counter_ns() - started

    def _outwait_kernel(self) -> None:
        """Run on every CPU but the current one, and stay on the last: the kernel's handler
        that ran for the event which woke this thread has then returned, wherever it ran."""
        for cpu in self._cpus:
            if cpu == self._cpu:
                continue
            try:
                os.sched_setaffinity(0, {cpu})
            except OSError as exc:
                if not self._pin_failed:
                    log.warning(
                        "dom%d: cannot run on CPU %d (%s): a write may race the kernel's "
                        "ioeventfd handler",
                        self.domid,
                        cpu,
                        exc.strerror,
                    )
                    self._pin_failed = True
                continue
            self._cpu = cpu

    def slots(self) -> list[dict[str, object]]:
        """What each vCPU's IOREQ slot holds now (for the report on a stalled guest)."""
        out: list[dict[str, object]] = []
        for vcpu in range(self.vcpus):
            req = parse(self.page[vcpu * IOREQ_SIZE : (vcpu + 1) * IOREQ_SIZE])
            out.append(
                {
                    "state": IoreqState(req.state).name if req.state <= 3 else req.state,
                    "kind": kind(req),
                    "addr": f"{req.addr:#x}",
                    "read": req.is_read,
                }
            )
        return out

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving, release the event channels and page, destroy the server."""
        self._stopping = True
        if hasattr(self, "thread"):
            os.write(self._wake_w, b"x")
            self.thread.join(5)
            os.close(self._wake_r)
            os.close(self._wake_w)
        for base, queue in list(self._kernel_fds):  # the kernel holds on to the ioreq page
            self._kernel_stop(base, queue)
        if self.evtchn is not None:
            for port in self._ports:
                with contextlib.suppress(XenError):
                    self.evtchn.unbind(port)
            self.evtchn.close()
            self.evtchn = None
        with contextlib.suppress(XenError):
            self.dm.set_ioreq_server_state(self.domid, self.server_id, False)
        if self._resource is not None:
            if hasattr(self, "page"):
                self.page.release()
            with contextlib.suppress(XenError):
                self.fmem.unmap_resource(self._resource)
            self._resource = None
        with contextlib.suppress(XenError):
            self.dm.destroy_ioreq_server(self.domid, self.server_id)
        log.info("dom%d: IOREQ server %d destroyed", self.domid, self.server_id)
