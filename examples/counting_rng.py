"""A device of your own: a virtio-rng whose "entropy" counts 0, 1, 2, ... 255, 0, 1, ...

Linux's stock virtio-rng driver takes it for an entropy source, which makes what the guest
reads from /dev/hwrng easy to check. Serve it with:

    pyvirtio serve examples.counting_rng:CountingRng --socket-path /tmp/rng.sock
"""

from __future__ import annotations

from pyvirtio.device import DeviceError, VirtioDevice
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.split import DescriptorChain, SplitQueue


class CountingRng(VirtioDevice):
    device_id = DeviceId.ENTROPY  # what the guest's drivers bind to (VIRTIO 1.2 §5.4)

    def __init__(self, start: int = 0) -> None:
        super().__init__(num_queues=1, queue_size=1024)  # §5.4.2: one queue, requestq
        self.start = self.next = start % 256

    def handle_chain(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        # §5.4.6: the driver gives device-writable buffers; the device fills them.
        if chain.readable or not chain.writable:
            raise DeviceError("an entropy request is device-writable buffers only")
        written = 0
        for view in chain.writable:  # views straight into guest memory
            for i in range(len(view)):
                view[i] = self.next
                self.next = (self.next + 1) % 256
            written += len(view)
        return written  # how many bytes the driver may use

    def on_reset(self) -> None:
        self.next = self.start
