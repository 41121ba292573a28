"""A minimal device for ring-level tests: it records each chain and fills its writable part."""

from __future__ import annotations

from pyvirtio.device import VirtioDevice
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.split import DescriptorChain, SplitQueue


class EchoDevice(VirtioDevice):
    """Writes the readable bytes back (repeated or truncated) into the writable part."""

    device_id = DeviceId.CONSOLE

    def __init__(self, num_queues: int = 1, queue_size: int = 16) -> None:
        super().__init__(num_queues, queue_size)
        self.seen: list[tuple[int, bytes, int]] = []  # (head, readable bytes, writable length)
        self.writable_ranges: list[tuple[int, int]] = []  # every device-writable descriptor

    def handle_chain(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        data = b"".join(bytes(v) for v in chain.readable)
        self.seen.append((chain.head, data, chain.write_len))
        self.writable_ranges += [(a, n) for a, n, f in chain.descriptors if f & 2]
        if chain.fault:
            return 0
        pattern = (data or b"\x5a") * (chain.write_len // max(1, len(data)) + 1)
        pos = 0
        for view in chain.writable:
            view[:] = pattern[pos : pos + len(view)]
            pos += len(view)
        return chain.write_len
