"""virtio-gpio (VIRTIO 1.2 §5.18): config, messages, statuses, directions, interrupt types."""

import struct
from enum import IntEnum

#: Queue indices (§5.18.2); the event queue exists with VIRTIO_GPIO_F_IRQ only.
REQUEST_QUEUE = 0
EVENT_QUEUE = 1

#: ``struct virtio_gpio_config``: le16 ngpio, u8 padding[2], le32 gpio_names_size.
CONFIG = struct.Struct("<H2xI")
#: ``struct virtio_gpio_request``: le16 type, le16 gpio, le32 value.
REQUEST = struct.Struct("<HHI")
#: ``struct virtio_gpio_response``: u8 status, u8 value.
RESPONSE = struct.Struct("<BB")
#: ``struct virtio_gpio_irq_request``: le16 gpio.
IRQ_REQUEST = struct.Struct("<H")
#: ``struct virtio_gpio_irq_response``: u8 status.
IRQ_RESPONSE_SIZE = 1


class GpioFeature(IntEnum):
    IRQ = 0  # VIRTIO_GPIO_F_IRQ


class GpioMsg(IntEnum):
    """VIRTIO_GPIO_MSG_* (§5.18.6)."""

    GET_LINE_NAMES = 0x0001
    GET_DIRECTION = 0x0002
    SET_DIRECTION = 0x0003
    GET_VALUE = 0x0004
    SET_VALUE = 0x0005
    SET_IRQ_TYPE = 0x0006


class GpioStatus(IntEnum):
    OK = 0x0
    ERR = 0x1


class Direction(IntEnum):
    NONE = 0x00
    OUT = 0x01
    IN = 0x02


class IrqType(IntEnum):
    NONE = 0x00
    EDGE_RISING = 0x01
    EDGE_FALLING = 0x02
    EDGE_BOTH = 0x03
    LEVEL_HIGH = 0x04
    LEVEL_LOW = 0x08


class IrqStatus(IntEnum):
    INVALID = 0x0
    VALID = 0x1
