"""Guest memory: translation, bounds and regions."""

from __future__ import annotations

import os

import pytest

from pyvirtio.memory.guest import GuestMemory, GuestMemoryError, MemoryRegion


def make() -> GuestMemory:
    return GuestMemory(
        [MemoryRegion.anonymous(0x1000, 0x1000), MemoryRegion.anonymous(0x2000, 0x1000)]
    )


def test_translation_spans_adjacent_regions() -> None:
    mem = make()
    views = mem.buffers(0x1F00, 0x200, True)
    assert [len(v) for v in views] == [0x100, 0x100]
    mem.write(0x1F00, bytes(range(256)) * 2)
    assert mem.read(0x1F00, 0x200) == bytes(range(256)) * 2


@pytest.mark.parametrize(
    "addr, length", [(0, 1), (0xFFF, 2), (0x2F00, 0x101), (0x3000, 1), (2**64 - 1, 2)]
)
def test_out_of_bounds_raise(addr: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        make().buffers(addr, length, False)


def test_hole_between_regions_is_not_memory() -> None:
    mem = GuestMemory(
        [MemoryRegion.anonymous(0x1000, 0x1000), MemoryRegion.anonymous(0x3000, 0x1000)]
    )
    with pytest.raises(GuestMemoryError):
        mem.buffers(0x1FFF, 2, True)


def test_read_only_views_cannot_be_written() -> None:
    view = make().buffers(0x1000, 4, False)[0]
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1


def test_rings_must_not_span_regions() -> None:
    with pytest.raises(GuestMemoryError):
        make().ring(0x1FF0, 0x20)
    assert len(make().ring(0x1F00, 0x100)) == 0x100


def test_overlapping_regions_are_refused() -> None:
    mem = make()
    with pytest.raises(ValueError):
        mem.add(MemoryRegion.anonymous(0x1800, 0x1000))


def test_fd_region_at_unaligned_offset() -> None:
    fd = os.memfd_create("t")
    os.ftruncate(fd, 0x3000)
    os.pwrite(fd, b"xyz", 0x1234)
    region = MemoryRegion.from_fd(0x10000, 0x100, fd, 0x1234)
    os.close(fd)
    assert bytes(region.view[:3]) == b"xyz"


def test_region_cannot_be_unmapped_while_views_exist() -> None:
    mem = make()
    region = next(iter(mem))
    view = mem.buffers(0x1000, 8, True)[0]
    with pytest.raises(BufferError):
        region.close()
    view.release()
    region.close()
