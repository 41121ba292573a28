"""virtio-i2c (VIRTIO 1.2 §5.16): the request header, flags and statuses."""

import struct
from enum import IntEnum, IntFlag

REQUEST_QUEUE = 0

#: ``struct virtio_i2c_out_hdr``: le16 addr, le16 padding, le32 flags.
OUT_HDR = struct.Struct("<HHI")
#: ``struct virtio_i2c_in_hdr``: u8 status.
IN_HDR_SIZE = 1


class I2cFeature(IntEnum):
    ZERO_LENGTH_REQUEST = 0  # VIRTIO_I2C_F_ZERO_LENGTH_REQUEST (mandatory, §5.16.3)


class I2cFlag(IntFlag):
    FAIL_NEXT = 1 << 0  # VIRTIO_I2C_FLAGS_FAIL_NEXT: more requests of the same group follow
    M_RD = 1 << 1  # VIRTIO_I2C_FLAGS_M_RD: a read request


class I2cStatus(IntEnum):
    OK = 0  # VIRTIO_I2C_MSG_OK
    ERR = 1  # VIRTIO_I2C_MSG_ERR


def decode_address(addr: int) -> int | None:
    """The 7-bit target address an ``addr`` field names (§5.16.6.1: A6..A0 in bits 7..1), or
    None for anything else: a 10-bit address (``0b11110`` in bits 7..3 and A7..A0 in bits
    15..8), bit 0 set, stray high bits."""
    if addr & 1 or addr >> 8:
        return None
    return addr >> 1
