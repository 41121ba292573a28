"""The IOREQ server of one guest: Xen forwards the guest's accesses to our MMIO windows here.

Set-up follows the IOREQ server interface (xen/include/public/hvm/dm_op.h): create the server
without buffered ioreqs (Arm has none), map its shared ioreq page (one ``struct ioreq`` slot
per vCPU) with ``xenforeignmemory_map_resource``, enable it, bind one event channel per vCPU,
and claim each device's MMIO range. A thread then waits on the event channels and serves each
request with the protocol of ioreq.h:

    READY --(device model reads it, after a read barrier)--> INPROCESS
          --(answer written, then a write barrier)--> IORESP_READY, and notify the vCPU's port.
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
from collections.abc import Callable

from pyvirtio.memory.barrier import acquire_fence, release_fence
from pyvirtio.shims.xen.ioreq import (
    DATA_OFFSET,
    IOREQ_SIZE,
    STATE_MASK,
    STATE_OFFSET,
    IoreqDispatcher,
    IoreqState,
    MmioDevice,
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

log = logging.getLogger(__name__)

_READY = IoreqState.READY.value
_INPROCESS = IoreqState.INPROCESS.value
_RESP_READY = IoreqState.RESP_READY.value
_DATA = struct.Struct("<Q")
#: Slots of one ioreq page (4 KiB / 32 bytes); guests with more vCPUs are refused.
MAX_VCPUS = 4096 // IOREQ_SIZE


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
        self.dispatcher.remove(base)
        with contextlib.suppress(XenError):
            self.dm.unmap_mmio_range(self.domid, self.server_id, base, base + size - 1)

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
                    evtchn.unmask(port)
                    vcpu = self._ports.get(port)
                    if vcpu is not None:
                        self._serve(vcpu)
        except XenError as exc:
            if not self._stopping:
                log.error("dom%d: event channel failed: %s", self.domid, exc)
        except Exception:
            log.exception("dom%d: IOREQ thread failed", self.domid)

    def _serve(self, vcpu: int) -> None:
        page = self.page
        offset = vcpu * IOREQ_SIZE
        state_at = offset + STATE_OFFSET
        bits = page[state_at]
        if bits & STATE_MASK != _READY:
            return
        acquire_fence()  # the request's fields after its state (ioreq.h protocol)
        req = parse(page[offset : offset + IOREQ_SIZE])
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

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving, release the event channels and page, destroy the server."""
        self._stopping = True
        if hasattr(self, "thread"):
            os.write(self._wake_w, b"x")
            self.thread.join(5)
            os.close(self._wake_r)
            os.close(self._wake_w)
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
