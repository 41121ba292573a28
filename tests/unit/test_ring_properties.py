"""Property-based tests of the split ring (hypothesis).

1. Any well-formed chain shape, direct or indirect, reaches the device exactly as the driver
   laid it out, and comes back through the used ring with the length the device wrote.
2. Arbitrary bytes in the descriptor table and available ring never raise out of the device,
   and the device writes nothing but the used ring and buffers that descriptors marked
   device-writable inside guest memory.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.shims.inprocess import GUEST_RAM_BASE, InProcessMachine
from pyvirtio.spec import ring
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.status import DeviceStatus

from .echo import EchoDevice

QUEUE_SIZE = 16
MEMORY = 64 * 1024
FEATURES = bit(Feature.RING_INDIRECT_DESC) | bit(Feature.RING_EVENT_IDX) | bit(Feature.VERSION_1)

lengths = st.lists(st.integers(1, 600), max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    chains=st.lists(
        st.tuples(lengths, lengths, st.booleans()).filter(lambda c: c[0] or c[1]),
        min_size=1,
        max_size=8,
    ),
    data=st.data(),
)
def test_valid_chains_round_trip(
    chains: list[tuple[list[int], list[int], bool]], data: st.DataObject
) -> None:
    device = EchoDevice(queue_size=QUEUE_SIZE)
    machine = InProcessMachine(device, memory_size=1 << 20)
    drv = machine.driver()
    drv.negotiate(FEATURES)
    q = drv.setup_queues(1)[0]
    drv.driver_ok()
    expected = []
    for outs, ins, indirect in chains:
        if (1 if indirect else len(outs) + len(ins)) > q.num_free:
            continue
        out_bufs = []
        payload = b""
        for n in outs:
            chunk = data.draw(st.binary(min_size=n, max_size=n))
            addr = machine.allocator.alloc(n)
            machine.memory.write(addr, chunk)
            out_bufs.append((addr, n))
            payload += chunk
        in_bufs = [(machine.allocator.alloc(n), n) for n in ins]
        head = q.add(out_bufs, in_bufs, (payload, in_bufs), indirect=indirect)
        expected.append((head, payload, sum(ins)))
    drv.notify(0)
    assert device.broken is None
    assert device.seen == expected
    for (payload, in_bufs), written in q.get_used():
        assert written == sum(n for _, n in in_bufs)
        got = b"".join(machine.memory.read(a, n) for a, n in in_bufs)
        pattern = (payload or b"\x5a") * (len(got) // max(1, len(payload)) + 1)
        assert got == pattern[: len(got)]
    machine.close()


# Mostly plausible values, sometimes wild ones: that is where the walker's checks are.
addresses = st.one_of(
    st.integers(GUEST_RAM_BASE, GUEST_RAM_BASE + MEMORY),
    st.integers(GUEST_RAM_BASE - 4096, GUEST_RAM_BASE + MEMORY + 4096),
    st.integers(0, 2**64 - 1),
)
sizes = st.one_of(st.integers(0, 64), st.integers(0, 4096), st.integers(0, 2**32 - 1))
flags = st.one_of(st.sampled_from([0, 1, 2, 3, 4]), st.integers(0, 0xFFFF))
nexts = st.one_of(st.integers(0, QUEUE_SIZE - 1), st.integers(0, 0xFFFF))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    descs=st.lists(
        st.tuples(addresses, sizes, flags, nexts), min_size=QUEUE_SIZE, max_size=QUEUE_SIZE
    ),
    heads=st.lists(
        st.integers(0, QUEUE_SIZE - 1) | st.integers(0, 0xFFFF), max_size=QUEUE_SIZE
    ).filter(lambda h: sum(x >= QUEUE_SIZE for x in h) <= 1),
    avail_idx=st.none() | st.none() | st.integers(0, QUEUE_SIZE) | st.integers(0, 0xFFFF),
    tables=st.binary(min_size=0, max_size=512),
)
def test_random_rings_never_escape(
    descs: list[tuple[int, int, int, int]], heads: list[int], avail_idx: int | None, tables: bytes
) -> None:
    device = EchoDevice(queue_size=QUEUE_SIZE)
    machine = InProcessMachine(device, memory_size=MEMORY)
    memory = machine.memory
    region = next(iter(memory))
    drv = machine.driver()
    drv.negotiate(FEATURES)
    q = drv.setup_queues(1)[0]
    drv.driver_ok()
    # Random bytes where indirect tables might point, then a random descriptor table.
    memory.write(GUEST_RAM_BASE + MEMORY - len(tables), tables)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        q.write_desc(i, addr, length, flags, nxt)
    if heads:
        q.publish_heads(heads)
    if avail_idx is not None:
        q.set_avail_idx(avail_idx)
    before = bytes(region.view)

    drv.notify(0)  # must not raise

    after = bytes(region.view)
    used = (q.used_addr - GUEST_RAM_BASE, ring.used_ring_size(QUEUE_SIZE))
    allowed = [used] + [(a - GUEST_RAM_BASE, n) for a, n in device.writable_ranges]
    for offset in (i for i in range(MEMORY) if before[i] != after[i]):
        assert any(start <= offset < start + n for start, n in allowed), hex(offset)
    assert device.broken is None or drv.status & DeviceStatus.NEEDS_RESET
    machine.close()
