"""Device-independent feature bits (VIRTIO 1.2 §6 "Reserved Feature Bits")."""

from enum import IntEnum


class Feature(IntEnum):
    """Bit numbers of the transport and ring features."""

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40


def bit(feature: int) -> int:
    """The feature mask for a feature bit number."""
    return 1 << feature


def has(features: int, feature: int) -> bool:
    return bool(features >> feature & 1)
