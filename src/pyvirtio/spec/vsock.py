"""virtio-vsock (VIRTIO 1.2 §5.10): the packet header, operations and config."""

import struct
from enum import IntEnum, IntFlag

#: ``struct virtio_vsock_hdr`` (packed): le64 src_cid, le64 dst_cid, le32 src_port,
#: le32 dst_port, le32 len, le16 type, le16 op, le32 flags, le32 buf_alloc, le32 fwd_cnt.
HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44
#: ``struct virtio_vsock_config``: le64 guest_cid.
CONFIG = struct.Struct("<Q")

#: Queue indices (§5.10.2).
RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2

#: Well-known CIDs (§5.10.4): the host, and the first a guest may have.
HOST_CID = 2
FIRST_GUEST_CID = 3
#: CIDs are 32-bit in practice; the spec reserves the upper bits (§5.10.4).
MAX_GUEST_CID = 0xFFFF_FFFE


class VsockFeature(IntEnum):
    STREAM = 0
    SEQPACKET = 1


class VsockType(IntEnum):
    STREAM = 1
    SEQPACKET = 2


class VsockOp(IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class ShutdownFlag(IntFlag):
    RCV = 1
    SEND = 2
