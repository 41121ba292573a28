"""Write seed inputs for each fuzz target into ``fuzz/seeds/<target>/`` (valid, typical inputs
that lead the fuzzer to the interesting paths quickly)."""

from __future__ import annotations

import struct
from pathlib import Path

from fuzz.targets import CONN_MEMORY, FD_KINDS
from pyvirtio.shims.inprocess import GUEST_RAM_BASE
from pyvirtio.spec.blk import REQ_HEADER
from pyvirtio.spec.gpio import IRQ_REQUEST, REQUEST, GpioMsg
from pyvirtio.spec.i2c import OUT_HDR, I2cFlag
from pyvirtio.spec.mmio import Reg
from pyvirtio.spec.vsock import HEADER, HOST_CID, VsockOp, VsockType
from pyvirtio.vhost_user.protocol import (
    ConfigPayload,
    FrontendReq,
    InflightDesc,
    LogDesc,
    MemoryRegionDesc,
    VringAddr,
    VringState,
    encode,
    encode_mem_table,
    encode_single_region,
    encode_u64,
)

HERE = Path(__file__).parent / "seeds"
QUEUE_SIZE = 16


def ring_blk() -> list[bytes]:
    """A descriptor table at offset 0, heads at 256; the input is also guest RAM from +8192,
    so descriptors point back into the input: header at 1024, data at 2048, status at 4096."""
    ram = GUEST_RAM_BASE + 8192
    seeds = []
    for req_type, data_flags in ((0, 3), (1, 1), (4, 1), (8, 3), (11, 1), (13, 1)):
        seed = bytearray(4200)
        struct.pack_into("<QIHH", seed, 0, ram + 1024, 16, 1, 1)
        struct.pack_into("<QIHH", seed, 16, ram + 2048, 512, data_flags, 2)
        struct.pack_into("<QIHH", seed, 32, ram + 4096, 1, 2, 0)
        seed[256:273] = bytes([0] + [QUEUE_SIZE] * 15 + [1])  # one head: 0
        payload = struct.pack("<QII", 8, 8, 0) if req_type in (11, 13) else b""
        REQ_HEADER.pack_into(seed, 1024, req_type, 0, 1)
        seed[2048 : 2048 + len(payload)] = payload
        seeds.append(bytes(seed))
    return seeds


def ring_rng() -> list[bytes]:
    """One and two device-writable buffers (an entropy request)."""
    ram = GUEST_RAM_BASE + 8192
    seeds = []
    for chained in (False, True):
        seed = bytearray(4200)
        struct.pack_into("<QIHH", seed, 0, ram + 2048, 512, 2 | (1 if chained else 0), 1)
        struct.pack_into("<QIHH", seed, 16, ram + 3072, 256, 2, 0)
        seed[256:273] = bytes([0] + [QUEUE_SIZE] * 15 + [1])
        seeds.append(bytes(seed))
    return seeds


def ring_vsock() -> list[bytes]:
    """Packets from the guest (CID 3) to the host: a connection request, data, a reset."""
    ram = GUEST_RAM_BASE + 8192
    seeds = []
    for op, payload in ((VsockOp.REQUEST, b""), (VsockOp.RW, b"hello"), (VsockOp.RST, b"")):
        seed = bytearray(4200)
        struct.pack_into("<QIHH", seed, 0, ram + 1024, HEADER.size, 1 if payload else 0, 1)
        struct.pack_into("<QIHH", seed, 16, ram + 2048, len(payload), 0, 0)
        seed[256:273] = bytes([0] + [QUEUE_SIZE] * 15 + [1])
        header = HEADER.pack(
            3, HOST_CID, 1000, 5000, len(payload), VsockType.STREAM, op, 0, 65536, 0
        )
        seed[1024 : 1024 + len(header)] = header
        seed[2048 : 2048 + len(payload)] = payload
        seeds.append(bytes(seed))
    return seeds


def ring_gpio() -> list[bytes]:
    """One message of each type (request at 1024, response at 2048), names' response long."""
    ram = GUEST_RAM_BASE + 8192
    seeds = []
    for kind, gpio, value, response in (
        (GpioMsg.GET_LINE_NAMES, 0, 0, 1 + 8 + 2 + 12 + 5),
        (GpioMsg.GET_DIRECTION, 1, 0, 2),
        (GpioMsg.SET_DIRECTION, 2, 1, 2),
        (GpioMsg.GET_VALUE, 3, 0, 2),
        (GpioMsg.SET_VALUE, 4, 1, 2),
        (GpioMsg.SET_IRQ_TYPE, 5, 3, 2),
    ):
        seed = bytearray(4200)
        struct.pack_into("<QIHH", seed, 0, ram + 1024, REQUEST.size, 1, 1)
        struct.pack_into("<QIHH", seed, 16, ram + 2048, response, 2, 0)
        seed[256:273] = bytes([0] + [QUEUE_SIZE] * 15 + [1])
        REQUEST.pack_into(seed, 1024, kind, gpio, value)
        seeds.append(bytes(seed))
    return seeds


def ring_gpio_events() -> list[bytes]:
    """Event buffers for lines 0-3 (a line number at 1024 + 16 i, its status at 2048 + 16 i),
    and the same with a repeat and a line that does not exist."""
    ram = GUEST_RAM_BASE + 8192
    seeds = []
    for lines in ((0, 1, 2, 3), (1, 1, 9, 4)):
        seed = bytearray(4200)
        for i, line in enumerate(lines):
            struct.pack_into("<QIHH", seed, 32 * i, ram + 1024 + 16 * i, 2, 1, 2 * i + 1)
            struct.pack_into("<QIHH", seed, 32 * i + 16, ram + 2048 + 16 * i, 1, 2, 0)
            IRQ_REQUEST.pack_into(seed, 1024 + 16 * i, line)
        heads = [2 * i for i in range(len(lines))]
        seed[256:273] = bytes(heads + [QUEUE_SIZE] * (16 - len(heads)) + [len(heads)])
        seeds.append(bytes(seed))
    return seeds


def ring_i2c() -> list[bytes]:
    """A write, a read, a Quick write, and a write-then-read group (FAIL_NEXT): headers at
    1024 + 16 i, data at 2048 + 64 i, statuses at 4096 + i."""
    ram = GUEST_RAM_BASE + 8192
    seeds = []
    requests = (
        [(0x50, 0, b"\x10\xab", 0)],
        [(0x50, I2cFlag.M_RD, b"", 4)],
        [(0x48, 0, b"", 0)],
        [(0x48, I2cFlag.FAIL_NEXT, b"\x00", 0), (0x48, I2cFlag.M_RD, b"", 2)],
    )
    for group in requests:
        seed = bytearray(4200)
        desc = 0
        heads = []
        for i, (address, flags, data, length) in enumerate(group):
            heads.append(desc)
            OUT_HDR.pack_into(seed, 1024 + 16 * i, address << 1, 0, flags)
            seed[2048 + 64 * i : 2048 + 64 * i + len(data)] = data
            struct.pack_into("<QIHH", seed, 16 * desc, ram + 1024 + 16 * i, 8, 1, desc + 1)
            desc += 1
            if data or length:
                write = 2 if flags & I2cFlag.M_RD else 0
                size = length or len(data)
                struct.pack_into(
                    "<QIHH", seed, 16 * desc, ram + 2048 + 64 * i, size, write | 1, desc + 1
                )
                desc += 1
            struct.pack_into("<QIHH", seed, 16 * desc, ram + 4096 + i, 1, 2, 0)
            desc += 1
        seed[256:273] = bytes(heads + [QUEUE_SIZE] * (16 - len(heads)) + [len(heads)])
        seeds.append(bytes(seed))
    return seeds


def vhost_user() -> list[bytes]:
    msgs = [
        encode(FrontendReq.GET_FEATURES),
        encode(FrontendReq.GET_PROTOCOL_FEATURES),
        encode(FrontendReq.SET_PROTOCOL_FEATURES, encode_u64(0x8209)),
        encode(FrontendReq.SET_OWNER),
        encode(FrontendReq.SET_FEATURES, encode_u64((1 << 32) | (1 << 30) | (1 << 28))),
        encode(FrontendReq.GET_CONFIG, ConfigPayload(0, 60, 0, bytes(60)).encode()),
        encode(FrontendReq.SET_VRING_NUM, VringState(0, 128).encode()),
        encode(FrontendReq.SET_VRING_BASE, VringState(0, 0).encode()),
        encode(FrontendReq.SET_VRING_ADDR, VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0).encode()),
        encode(FrontendReq.SET_VRING_ENABLE, VringState(0, 1).encode()),
        encode(FrontendReq.GET_VRING_BASE, VringState(0, 0).encode()),
        encode(FrontendReq.SET_CONFIG, ConfigPayload(32, 1, 0, b"\0").encode()),
        encode(FrontendReq.GET_QUEUE_NUM, flags=8),
    ]
    return [b"".join(msgs), b"".join(msgs[:4])]


def vhost_user_conn() -> list[bytes]:
    """A whole session: each message preceded by the kind of fd it carries
    (``fuzz.targets.FD_KINDS``): memory, an in-flight area, kick/call/err eventfds, a channel."""
    kinds = {name: i for i, name in enumerate(FD_KINDS)}
    user = 0x7000_0000
    addr = VringAddr(0, 0, user, user + 0x200, user + 0x100, 0)
    logged = VringAddr(0, 1, user, user + 0x200, user + 0x100, 0x200)  # VHOST_VRING_F_LOG
    region = MemoryRegionDesc(0, CONN_MEMORY, user, 0)
    features = (1 << 32) | (1 << 30)
    msgs = [
        ("none", encode(FrontendReq.GET_FEATURES)),
        ("none", encode(FrontendReq.SET_PROTOCOL_FEATURES, encode_u64(0xB22B))),
        ("none", encode(FrontendReq.SET_OWNER)),
        ("none", encode(FrontendReq.SET_FEATURES, encode_u64(features), flags=8)),
        ("memfd", encode(FrontendReq.SET_MEM_TABLE, encode_mem_table([region]), flags=8)),
        ("socket", encode(FrontendReq.SET_BACKEND_REQ_FD, flags=8)),
        ("none", encode(FrontendReq.GET_INFLIGHT_FD, InflightDesc(0, 0, 2, 16).encode())),
        ("memfd", encode(FrontendReq.SET_INFLIGHT_FD, InflightDesc(1024, 0, 2, 16).encode())),
        ("none", encode(FrontendReq.SET_VRING_NUM, VringState(0, 16).encode(), flags=8)),
        ("none", encode(FrontendReq.SET_VRING_ADDR, addr.encode(), flags=8)),
        ("eventfd", encode(FrontendReq.SET_VRING_CALL, encode_u64(0), flags=8)),
        ("eventfd", encode(FrontendReq.SET_VRING_ERR, encode_u64(0), flags=8)),
        ("eventfd", encode(FrontendReq.SET_VRING_KICK, encode_u64(0), flags=8)),
        ("none", encode(FrontendReq.SET_VRING_ENABLE, VringState(0, 1).encode(), flags=8)),
        ("memfd", encode(FrontendReq.SET_LOG_BASE, LogDesc(4096, 0).encode())),
        ("none", encode(FrontendReq.SET_FEATURES, encode_u64(features | 1 << 26), flags=8)),
        ("none", encode(FrontendReq.SET_VRING_ADDR, logged.encode(), flags=8)),
        ("memfd", encode(FrontendReq.ADD_MEM_REG, encode_single_region(region), flags=8)),
        ("none", encode(FrontendReq.GET_VRING_BASE, VringState(0, 0).encode())),
        ("none", encode(FrontendReq.RESET_DEVICE, flags=8)),
    ]
    whole = b"".join(bytes([kinds[k]]) + m for k, m in msgs)
    hostile = [
        (k if k == "none" else bad, m) for (k, m), bad in zip(msgs, FD_KINDS * 3, strict=False)
    ]
    return [whole, b"".join(bytes([kinds[k]]) + m for k, m in hostile)]


def mmio() -> list[bytes]:
    ops = []

    def op(offset: int, value: int = 0, write: bool = True, size: int = 4) -> None:
        ops.append(
            struct.pack("<HBIB", offset, {1: 0, 2: 1, 4: 2, 8: 3}[size], value, 1 if write else 0)
        )

    op(Reg.MAGIC_VALUE, write=False)
    op(Reg.STATUS, 0)
    op(Reg.STATUS, 1)
    op(Reg.STATUS, 3)
    op(Reg.DEVICE_FEATURES_SEL, 1)
    op(Reg.DEVICE_FEATURES, write=False)
    op(Reg.DRIVER_FEATURES_SEL, 1)
    op(Reg.DRIVER_FEATURES, 1)
    op(Reg.STATUS, 11)
    op(Reg.QUEUE_SEL, 0)
    op(Reg.QUEUE_NUM, 16)
    op(Reg.QUEUE_DESC_LOW, GUEST_RAM_BASE)
    op(Reg.QUEUE_DRIVER_LOW, GUEST_RAM_BASE + 4096)
    op(Reg.QUEUE_DEVICE_LOW, GUEST_RAM_BASE + 8192)
    op(Reg.QUEUE_READY, 1)
    op(Reg.STATUS, 15)
    op(Reg.QUEUE_NOTIFY, 0)
    op(0x100, write=False, size=8)
    op(0x100 + 32, 0, size=1)
    op(Reg.INTERRUPT_ACK, 3)
    return [b"".join(ops)]


def xen_config() -> list[bytes]:
    return [b"params=/tmp/disk.img\nmode=w\nbase=33554432\nirq=33\nfrontend-id=3\nstate=1"]


def main() -> None:
    for name, make in (
        ("ring_blk", ring_blk),
        ("ring_rng", ring_rng),
        ("ring_vsock", ring_vsock),
        ("ring_gpio", ring_gpio),
        ("ring_gpio_events", ring_gpio_events),
        ("ring_i2c", ring_i2c),
        ("vhost_user", vhost_user),
        ("vhost_user_conn", vhost_user_conn),
        ("mmio", mmio),
        ("xen_config", xen_config),
    ):
        directory = HERE / name
        directory.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(make()):
            (directory / f"seed-{i}").write_bytes(seed)


if __name__ == "__main__":
    main()
