"""virtio-blk (VIRTIO 1.2 §5.2, with the 1.3 draft's secure-erase, lifetime and zoned fields)."""

import struct
from dataclasses import dataclass, fields
from enum import IntEnum

SECTOR_SIZE = 512
SECTOR_SHIFT = 9
#: Bytes of the GET_ID answer (§5.2.6).
ID_BYTES = 20


class BlkFeature(IntEnum):
    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17
    # Legacy-only bits (§5.2.3.1).
    BARRIER = 0
    SCSI = 7


class BlkRequestType(IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    #: Legacy synonym of FLUSH that some old drivers send (§5.2.6.4).
    FLUSH_OUT = 5
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14
    ZONE_APPEND = 15
    ZONE_REPORT = 16
    ZONE_OPEN = 18
    ZONE_CLOSE = 20
    ZONE_FINISH = 22
    ZONE_RESET = 24
    ZONE_RESET_ALL = 26


#: Legacy drivers may OR this into the type (§5.2.6.3); it carries no meaning for us.
BARRIER_FLAG = 0x80000000


class BlkStatus(IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2
    ZONE_INVALID_CMD = 3
    ZONE_UNALIGNED_WP = 4
    ZONE_OPEN_RESOURCE = 5
    ZONE_ACTIVE_RESOURCE = 6


#: ``struct virtio_blk_req`` header: le32 type; le32 reserved (ioprio); le64 sector.
REQ_HEADER = struct.Struct("<IIQ")
#: ``struct virtio_blk_discard_write_zeroes``: le64 sector; le32 num_sectors; le32 flags.
DISCARD_SEGMENT = struct.Struct("<QII")
#: Flag bit 0 of a write-zeroes segment: the device may deallocate (§5.2.6).
WRITE_ZEROES_FLAG_UNMAP = 1

#: Config layout: name, struct format (little-endian), offset. Offsets follow §5.2.4.
_CONFIG_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("capacity", "Q", 0),
    ("size_max", "I", 8),
    ("seg_max", "I", 12),
    ("geometry_cylinders", "H", 16),
    ("geometry_heads", "B", 18),
    ("geometry_sectors", "B", 19),
    ("blk_size", "I", 20),
    ("physical_block_exp", "B", 24),
    ("alignment_offset", "B", 25),
    ("min_io_size", "H", 26),
    ("opt_io_size", "I", 28),
    ("writeback", "B", 32),
    ("num_queues", "H", 34),
    ("max_discard_sectors", "I", 36),
    ("max_discard_seg", "I", 40),
    ("discard_sector_alignment", "I", 44),
    ("max_write_zeroes_sectors", "I", 48),
    ("max_write_zeroes_seg", "I", 52),
    ("write_zeroes_may_unmap", "B", 56),
    ("max_secure_erase_sectors", "I", 60),
    ("max_secure_erase_seg", "I", 64),
    ("secure_erase_sector_alignment", "I", 68),
    ("zone_sectors", "I", 72),
    ("max_open_zones", "I", 76),
    ("max_active_zones", "I", 80),
    ("max_append_sectors", "I", 84),
    ("write_granularity", "I", 88),
    ("zoned_model", "B", 92),
)
CONFIG_SIZE = 96
#: The config a driver without SECURE_ERASE or ZONED reads (up to write_zeroes_may_unmap and
#: its padding); vhost-user back-ends answer GET_CONFIG only for sizes they know.
CONFIG_SIZE_BASIC = 60
CONFIG_OFFSETS = {name: offset for name, _, offset in _CONFIG_FIELDS}
#: Offset of the only field a driver writes (``writeback``, with CONFIG_WCE).
WRITEBACK_OFFSET = CONFIG_OFFSETS["writeback"]


@dataclass
class BlkConfig:
    """``struct virtio_blk_config``; fields a device does not offer stay zero."""

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    geometry_cylinders: int = 0
    geometry_heads: int = 0
    geometry_sectors: int = 0
    blk_size: int = 0
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 0
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    max_secure_erase_sectors: int = 0
    max_secure_erase_seg: int = 0
    secure_erase_sector_alignment: int = 0
    zone_sectors: int = 0
    max_open_zones: int = 0
    max_active_zones: int = 0
    max_append_sectors: int = 0
    write_granularity: int = 0
    zoned_model: int = 0

    def pack(self) -> bytes:
        out = bytearray(CONFIG_SIZE)
        for name, fmt, offset in _CONFIG_FIELDS:
            struct.pack_into("<" + fmt, out, offset, getattr(self, name))
        return bytes(out)

    @classmethod
    def unpack(cls, data: bytes) -> "BlkConfig":
        if len(data) < CONFIG_SIZE:
            data = bytes(data) + bytes(CONFIG_SIZE - len(data))
        values = {
            name: struct.unpack_from("<" + fmt, data, offset)[0]
            for name, fmt, offset in _CONFIG_FIELDS
        }
        return cls(**values)


assert {f.name for f in fields(BlkConfig)} == set(CONFIG_OFFSETS)
