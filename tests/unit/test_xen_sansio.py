"""The Xen shim's sans-I/O parts: IOREQ decoding and dispatch, xenstore configuration, xenbus."""

from __future__ import annotations

import pytest

from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.shims.xen import privcmd
from pyvirtio.shims.xen.config import ConfigError, parse_device_description, parse_disk
from pyvirtio.shims.xen.ioreq import (
    Ioreq,
    IoreqDispatcher,
    IoreqState,
    IoreqType,
    encode,
    kind,
    parse,
)
from pyvirtio.shims.xen.xenbus import XenbusState, parse_state
from pyvirtio.spec.mmio import MAGIC_VALUE, Reg

from .echo import EchoDevice


def req(
    addr: int,
    *,
    read: bool = True,
    size: int = 4,
    data: int = 0,
    kind: int = IoreqType.COPY,
    ptr: bool = False,
    count: int = 1,
) -> Ioreq:
    return Ioreq(addr, data, count, size, 5, IoreqState.READY, ptr, read, kind)


def test_ioreq_layout_round_trips() -> None:
    r = req(0x2000_0050, read=False, size=4, data=0xDEADBEEF)
    raw = encode(r)
    assert len(raw) == 32
    assert raw[30] == IoreqState.READY  # state in the low nibble, dir (write) bit clear
    assert raw[31] == IoreqType.COPY
    assert parse(raw) == r
    decoded = parse(encode(req(0, read=True, ptr=True)))
    assert (decoded.data_is_ptr, decoded.is_read) == (True, True)


def make_dispatcher() -> tuple[IoreqDispatcher, InProcessMachine, list[str]]:
    invalidated: list[str] = []
    d = IoreqDispatcher(on_invalidate=lambda: invalidated.append("x"))
    machine = InProcessMachine(EchoDevice(), memory_size=1 << 20)
    d.add(0x0200_0000, 0x200, machine.transport)
    return d, machine, invalidated


def test_dispatch_reads_and_writes_registers() -> None:
    d, machine, _ = make_dispatcher()
    assert d.handle(req(0x0200_0000)) == MAGIC_VALUE
    assert d.handle(req(0x0200_0000 + Reg.STATUS, read=False, data=1)) is None
    assert machine.device.status == 1
    assert d.handle(req(0x0200_0000 + 0x100, size=1)) == 0  # config space, narrow read


def test_dispatch_refuses_what_arm_never_sends() -> None:
    d, machine, _ = make_dispatcher()
    assert d.handle(req(0x0200_0000, ptr=True)) is None
    assert d.handle(req(0x0200_0000, count=4)) is None
    assert d.handle(req(0x0200_0000, kind=IoreqType.PIO)) == 0xFFFFFFFF
    assert d.handle(req(0x0300_0000)) == 0xFFFFFFFF  # no device there
    assert d.handle(req(0x0200_0000 + Reg.STATUS, read=False, size=3, data=1)) is None
    assert machine.device.status == 0


def test_invalidate_and_timeoffset() -> None:
    d, _, invalidated = make_dispatcher()
    assert d.handle(req(0, kind=IoreqType.INVALIDATE)) is None
    assert invalidated == ["x"]
    assert d.handle(req(0, kind=IoreqType.TIMEOFFSET)) is None


def test_overlapping_windows_are_refused() -> None:
    d, machine, _ = make_dispatcher()
    with pytest.raises(ValueError):
        d.add(0x0200_0100, 0x200, machine.transport)


GOOD = {
    "params": "/srv/disk.img",
    "mode": "w",
    "base": "33554432",
    "irq": "33",
    "frontend-id": "3",
    "state": "1",
    "online": "1",
}


def test_config_parses() -> None:
    c = parse_disk(3, 51712, GOOD)
    assert (c.image, c.read_only, c.base, c.irq) == ("/srv/disk.img", False, 0x0200_0000, 33)
    assert parse_disk(3, 51712, {**GOOD, "mode": "r", "base": "0x2000200"}).read_only


@pytest.mark.parametrize(
    "change, message",
    [
        ({"params": ""}, "params"),
        ({"params": "disk.img"}, "absolute"),
        ({"mode": "rw"}, "mode"),
        ({"base": "0x1000"}, "base"),
        ({"base": "0x2000100"}, "base"),  # not window aligned
        ({"base": "0x20FFE00 "}, None),  # the last window is fine
        ({"base": "0x2100000"}, "base"),
        ({"base": "lots"}, "not a number"),
        ({"irq": "32"}, "irq"),
        ({"irq": "44"}, "irq"),
        ({"frontend-id": "4"}, "frontend-id"),
        ({"params": "/x" * 5000}, "malformed"),
        ({"params": "/a\0b"}, "malformed"),
    ],
)
def test_config_refuses_bad_values(change: dict[str, str], message: str | None) -> None:
    values = {**GOOD, **change}
    if message is None:
        parse_disk(3, 51712, values)
        return
    with pytest.raises(ConfigError, match=message):
        parse_disk(3, 51712, values)


@pytest.mark.parametrize("domid", [0, 0x7FF0, 0xFFFF])
def test_config_refuses_non_guest_domains(domid: int) -> None:
    with pytest.raises(ConfigError):
        parse_disk(domid, 51712, {**GOOD, "frontend-id": str(domid)})


def test_xenbus_state_parsing() -> None:
    assert parse_state("2") == XenbusState.INIT_WAIT
    assert parse_state(" 4\n") == XenbusState.CONNECTED
    assert parse_state(None) == XenbusState.UNKNOWN
    assert parse_state("99") == XenbusState.UNKNOWN
    assert parse_state("-1") == XenbusState.UNKNOWN


def test_a_disk_entry_may_describe_another_device() -> None:
    values = {"params": "/etc/xen/vm1-rng.pyvirtio", "mode": "w", "base": "0x2000000", "irq": "33"}
    assert parse_disk(3, 51712, values).described
    values["params"] = "/srv/disk.img"
    assert not parse_disk(3, 51712, values).described


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("device = rng\n", ("rng", "/dev/urandom")),
        (
            "# entropy for vm1\ndevice=rng\nsource = /dev/hwrng  # the board's\n",
            ("rng", "/dev/hwrng"),
        ),
    ],
)
def test_device_descriptions(text: str, expected: tuple[str, str]) -> None:
    assert parse_device_description(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "device = gpu",
        "device = rng\nsource = relative",
        "device = rng\ndevice = rng",
        "device rng",
        "colour = blue",
        "",
        "device = rng\n" + "#" * 5000,
    ],
)
def test_bad_device_descriptions_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_device_description(text)


def test_notifies_the_kernel_completes_are_left_to_it() -> None:
    """With a privcmd ioeventfd for (window, queue) the kernel completes those QueueNotify
    writes (linux drivers/xen/privcmd.c ioeventfd_interrupt()); the IOREQ thread must not."""
    d, _, _ = make_dispatcher()
    base = 0x0200_0000
    notify = req(base + Reg.QUEUE_NOTIFY, read=False, data=0)
    assert not d.for_kernel(notify)
    d.set_kernel_notify(base, 0, True)
    assert d.for_kernel(notify)
    assert d.for_kernel(req(base + Reg.QUEUE_NOTIFY, read=False, data=0x1_0000))  # low 16 bits
    assert not d.for_kernel(req(base + Reg.QUEUE_NOTIFY, read=False, data=1))  # another queue
    assert not d.for_kernel(req(base + Reg.QUEUE_NOTIFY, read=False, data=0, size=2))
    assert not d.for_kernel(req(base + Reg.QUEUE_NOTIFY, read=True))
    assert not d.for_kernel(req(base + Reg.QUEUE_NOTIFY, read=False, kind=IoreqType.PIO))
    d.set_kernel_notify(base, 0, False)
    assert not d.for_kernel(notify)
    d.set_kernel_notify(base, 0, True)
    d.remove(base)
    assert not d.for_kernel(notify)


def test_the_kernel_looks_at_every_mmio_write_once_it_has_a_notify() -> None:
    """privcmd's handler takes every MMIO write over for a moment, even one it declines; the
    IOREQ thread waits it out for those, and only for those."""
    d, _, _ = make_dispatcher()
    base = 0x0200_0000
    ack = req(base + Reg.INTERRUPT_ACK, read=False, data=1)
    assert not d.kernel_looks_at(ack)  # no ioeventfd: no kernel handler on the ports
    d.set_kernel_notify(base, 0, True)
    assert d.kernel_looks_at(ack)
    assert d.kernel_looks_at(req(base + Reg.QUEUE_NOTIFY, read=False, data=1))
    assert not d.kernel_looks_at(req(base + Reg.INTERRUPT_STATUS))
    assert not d.kernel_looks_at(req(base + Reg.INTERRUPT_ACK, read=False, kind=IoreqType.PIO))


def test_ioreq_kinds() -> None:
    base = 0x0200_0200
    assert kind(req(base + Reg.QUEUE_NOTIFY, read=False)) == "notify"
    assert kind(req(base + Reg.INTERRUPT_STATUS)) == "interrupt_status"
    assert kind(req(base + Reg.INTERRUPT_ACK, read=False)) == "interrupt_ack"
    assert kind(req(base + Reg.INTERRUPT_ACK)) == "other"
    assert kind(req(base + Reg.STATUS)) == "other"
    assert kind(req(base, kind=IoreqType.INVALIDATE)) == "other"


def test_privcmd_layouts_match_linux() -> None:
    """linux/include/uapi/xen/privcmd.h and xen/include/public/hvm/dm_op.h."""
    assert privcmd.IOCTL_PRIVCMD_IRQFD == 0x40185008  # _IOW('P', 8, 24 bytes)
    assert privcmd.IOCTL_PRIVCMD_IOEVENTFD == 0x40305009  # _IOW('P', 9, 48 bytes)
    op = privcmd.dm_op_set_irq_level(33, 1)
    assert op == bytes.fromhex("13000000000000002100000001000000")
