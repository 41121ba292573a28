"""The vhost-user message codec (QEMU docs/interop/vhost-user.rst), shared by both sides.

Sans-I/O: bytes in, messages out, and the reverse. A message is a 12-byte header (request,
flags, payload size; native byte order, which is little-endian on every host pyvirtio supports)
and a payload whose layout depends on the request. File descriptors travel beside the bytes
(SCM_RIGHTS) and are carried in :attr:`Message.fds`.

Everything decoded here comes from another process and is validated: a wrong size, an unknown
version or a payload larger than any request needs raises :class:`ProtocolError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

#: Virtio feature bit (the unused bit 30) that announces protocol feature negotiation.
F_PROTOCOL_FEATURES = 30
#: vhost feature bit: the front-end logs dirty pages (migration).
F_LOG_ALL = 26

#: The largest payload any request carries here (SET_MEM_TABLE with 8 regions is 264 bytes,
#: GET_CONFIG at most 12 + 256). Anything larger is refused before it is read.
MAX_PAYLOAD = 4096
#: File descriptors one message may carry (SET_MEM_TABLE: one per region).
MAX_FDS = 8
#: Regions one SET_MEM_TABLE carries.
MAX_MEM_TABLE_REGIONS = 8
#: Largest config space access (the virtio-mmio/pci config windows are at most this).
MAX_CONFIG_SIZE = 256


class FrontendReq(IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendReq(IntEnum):
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17


#: Requests whose reply is part of the protocol (not only a REPLY_ACK).
REQUESTS_WITH_REPLY = frozenset(
    {
        FrontendReq.GET_FEATURES,
        FrontendReq.GET_PROTOCOL_FEATURES,
        FrontendReq.GET_VRING_BASE,
        FrontendReq.GET_QUEUE_NUM,
        FrontendReq.GET_CONFIG,
        FrontendReq.GET_INFLIGHT_FD,
        FrontendReq.GET_MAX_MEM_SLOTS,
        FrontendReq.GET_STATUS,
        FrontendReq.POSTCOPY_ADVISE,
        FrontendReq.POSTCOPY_END,
        FrontendReq.IOTLB_MSG,
    }
)


class ProtocolError(Exception):
    """A message that does not follow the vhost-user protocol."""


@dataclass
class Message:
    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def name(self) -> str:
        try:
            return FrontendReq(self.request).name
        except ValueError:
            return f"request {self.request}"


def decode_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a 12-byte header; checks the version and the size bound."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"header of {len(data)} bytes")
    request, flags, size = HEADER.unpack(data)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported protocol version {flags & FLAG_VERSION_MASK}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
    return request, flags, size


def encode(request: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(request, VERSION | flags, len(payload)) + payload


def reply(msg: Message, payload: bytes) -> bytes:
    return encode(msg.request, payload, FLAG_REPLY)


# -- payloads -----------------------------------------------------------------------------------

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEMORY_REGION = struct.Struct("<QQQQ")
CONFIG_HEADER = struct.Struct("<III")
INFLIGHT = struct.Struct("<QQHH")
LOG = struct.Struct("<QQ")
#: SET_VRING_ADDR flags: log the used ring's writes at ``log`` (a guest-physical address).
VRING_F_LOG = 0
#: Bits of the u64 of SET_VRING_KICK/CALL/ERR.
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
#: SET_CONFIG flags.
CONFIG_FLAG_WRITABLE = 0
CONFIG_FLAG_MIGRATION = 1


def _exact(payload: bytes, s: struct.Struct, what: str) -> tuple[int, ...]:
    if len(payload) != s.size:
        raise ProtocolError(f"{what} payload is {len(payload)} bytes, expected {s.size}")
    return s.unpack(payload)


def decode_u64(payload: bytes) -> int:
    # Some front-ends send a u64 that was declared with a larger size; accept only exact.
    return _exact(payload, U64, "u64")[0]


def encode_u64(value: int) -> bytes:
    return U64.pack(value & 0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class VringState:
    index: int
    num: int

    @classmethod
    def decode(cls, payload: bytes) -> VringState:
        return cls(*_exact(payload, VRING_STATE, "vring state"))

    def encode(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    @classmethod
    def decode(cls, payload: bytes) -> VringAddr:
        return cls(*_exact(payload, VRING_ADDR, "vring address"))

    def encode(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


@dataclass(frozen=True)
class MemoryRegionDesc:
    """One region of the front-end's memory: guest address, size, user address, mmap offset."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def encode(self) -> bytes:
        return MEMORY_REGION.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)


def decode_mem_table(payload: bytes) -> list[MemoryRegionDesc]:
    if len(payload) < 8:
        raise ProtocolError("memory table payload is too short")
    count = struct.unpack_from("<I", payload)[0]
    if count > MAX_MEM_TABLE_REGIONS:
        raise ProtocolError(f"memory table with {count} regions (at most 8)")
    if len(payload) < 8 + count * MEMORY_REGION.size:
        raise ProtocolError(f"memory table payload too short for {count} regions")
    return [
        MemoryRegionDesc(*MEMORY_REGION.unpack_from(payload, 8 + i * MEMORY_REGION.size))
        for i in range(count)
    ]


def encode_mem_table(regions: list[MemoryRegionDesc]) -> bytes:
    return struct.pack("<II", len(regions), 0) + b"".join(r.encode() for r in regions)


def decode_single_region(payload: bytes) -> MemoryRegionDesc:
    if len(payload) != 8 + MEMORY_REGION.size:
        raise ProtocolError(f"memory region payload is {len(payload)} bytes, expected 40")
    return MemoryRegionDesc(*MEMORY_REGION.unpack_from(payload, 8))


def encode_single_region(region: MemoryRegionDesc) -> bytes:
    return bytes(8) + region.encode()


@dataclass(frozen=True)
class ConfigPayload:
    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def decode(cls, payload: bytes) -> ConfigPayload:
        if len(payload) < CONFIG_HEADER.size:
            raise ProtocolError("config payload is too short")
        offset, size, flags = CONFIG_HEADER.unpack_from(payload)
        data = payload[CONFIG_HEADER.size :]
        if size > MAX_CONFIG_SIZE or len(data) != size:
            raise ProtocolError(f"config payload declares {size} bytes and carries {len(data)}")
        return cls(offset, size, flags, data)

    def encode(self) -> bytes:
        return CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.data


@dataclass(frozen=True)
class LogDesc:
    """SET_LOG_BASE: the dirty log is ``mmap_size`` bytes of the fd at ``mmap_offset``."""

    mmap_size: int
    mmap_offset: int

    @classmethod
    def decode(cls, payload: bytes) -> LogDesc:
        return cls(*_exact(payload, LOG, "log"))

    def encode(self) -> bytes:
        return LOG.pack(self.mmap_size, self.mmap_offset)


@dataclass(frozen=True)
class InflightDesc:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    @classmethod
    def decode(cls, payload: bytes) -> InflightDesc:
        # QEMU pads the structure to 24 bytes; the fields are in the first 20.
        if len(payload) not in (INFLIGHT.size, 24):
            raise ProtocolError(f"inflight payload is {len(payload)} bytes")
        return cls(*INFLIGHT.unpack_from(payload))

    def encode(self) -> bytes:
        packed = INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)
        return packed + bytes(4)  # padded as the C structure is
