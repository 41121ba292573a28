"""virtio-mmio register layout (VIRTIO 1.2 §4.2.2, legacy §4.2.4)."""

from enum import IntEnum, IntFlag

MAGIC_VALUE = 0x74726976  # "virt" in little-endian
VENDOR_ID = 0x554D4551  # "QEMU", what Linux and QEMU use for an unspecified vendor
VERSION_LEGACY = 1
VERSION_MODERN = 2
#: Size of one virtio-mmio window as libxl and QEMU allocate it.
WINDOW_SIZE = 0x200
CONFIG_OFFSET = 0x100
#: Legacy interface (§4.2.4): QueueAlign and GuestPageSize when the driver wrote none; Linux's
#: virtio_mmio uses the page size for both.
LEGACY_DEFAULT_QUEUE_ALIGN = 4096
LEGACY_DEFAULT_PAGE_SIZE = 4096


class Reg(IntEnum):
    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    GUEST_PAGE_SIZE = 0x028  # legacy only
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_ALIGN = 0x03C  # legacy only
    QUEUE_PFN = 0x040  # legacy only
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC


class Interrupt(IntFlag):
    VRING = 1
    CONFIG = 2
