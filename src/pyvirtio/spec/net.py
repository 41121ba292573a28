"""virtio-net (VIRTIO 1.2 §5.1): feature bits, the packet header, config."""

import struct
from enum import IntEnum, IntFlag


class NetFeature(IntEnum):
    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23


#: ``struct virtio_net_hdr`` as a modern device uses it (§5.1.6): u8 flags, u8 gso_type,
#: le16 hdr_len, le16 gso_size, le16 csum_start, le16 csum_offset, le16 num_buffers.
HEADER = struct.Struct("<BBHHHHH")
HEADER_SIZE = HEADER.size  # 12
#: Offset of num_buffers in the header (MRG_RXBUF).
NUM_BUFFERS_OFFSET = 10


class HeaderFlag(IntFlag):
    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class GsoType(IntEnum):
    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    ECN = 0x80


class NetStatus(IntFlag):
    LINK_UP = 1
    ANNOUNCE = 2


#: ``struct virtio_net_config`` up to mtu: u8 mac[6], le16 status, le16 max_virtqueue_pairs,
#: le16 mtu.
CONFIG = struct.Struct("<6sHHH")

#: Queue indices without MQ (§5.1.2).
RX_QUEUE = 0
TX_QUEUE = 1
