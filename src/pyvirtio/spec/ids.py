"""Device IDs (VIRTIO 1.2 §5)."""

from enum import IntEnum


class DeviceId(IntEnum):
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON = 5
    SCSI = 8
    GPU = 16
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    IOMMU = 23
    MEMORY = 24
    SOUND = 25
    FS = 26
    PMEM = 27
    RPMB = 28
    SCMI = 32
    I2C_ADAPTER = 34
    CAN = 36
    GPIO = 41
