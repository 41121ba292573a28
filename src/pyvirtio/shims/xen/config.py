"""A virtio disk's configuration, read from the xenstore directory the toolstack wrote.

Sans-I/O: :func:`parse_disk` takes the key/value strings of one back-end device directory and
returns a validated :class:`DiskConfig` or raises :class:`ConfigError` with one clear line.
Nothing is trusted: values are checked for syntax and range, and the MMIO window and interrupt
must fall where libxl allocates virtio-mmio devices on Arm.

Xen 4.17's ``xl`` describes only virtio disks, but what it gives the guest is device-type
agnostic: a ``virtio,mmio`` node with a window and an interrupt, whose device ID the guest
reads from the device itself. So a disk entry whose target is a *device description*, a file
named ``*.pyvirtio`` (libxl checks that the target exists), is served as the device the file
describes instead of a disk (:func:`parse_device_description`)::

    device = rng
    source = /dev/urandom
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from pyvirtio.spec.mmio import WINDOW_SIZE

#: Where libxl places virtio-mmio devices (xen/include/public/arch-arm.h).
GUEST_VIRTIO_MMIO_BASE = 0x0200_0000
GUEST_VIRTIO_MMIO_SIZE = 0x0010_0000
GUEST_VIRTIO_MMIO_SPI_FIRST = 33
GUEST_VIRTIO_MMIO_SPI_LAST = 43
#: Domain ids at and above DOMID_FIRST_RESERVED are not guests.
DOMID_FIRST_RESERVED = 0x7FF0
#: Longest value accepted from xenstore (paths included).
MAX_VALUE = 4096
#: The suffix of a ``target=`` that describes another device than a disk.
DESCRIPTION_SUFFIX = ".pyvirtio"
#: Devices a description may name, and their default argument.
DEVICES = {"rng": "/dev/urandom"}


class ConfigError(Exception):
    """A xenstore configuration the back-end refuses."""


@dataclass(frozen=True)
class DiskConfig:
    frontend_id: int
    devid: int
    #: The image path of a disk, or a device description (``*.pyvirtio``).
    image: str
    read_only: bool
    base: int
    irq: int

    @property
    def described(self) -> bool:
        """The target describes a device other than a disk."""
        return self.image.endswith(DESCRIPTION_SUFFIX)


def _int(values: Mapping[str, str], key: str) -> int:
    text = values.get(key)
    if text is None:
        raise ConfigError(f"missing key {key!r}")
    text = text.strip()
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise ConfigError(f"{key}={text[:40]!r} is not a number") from None


def parse_disk(frontend_id: int, devid: int, values: Mapping[str, str]) -> DiskConfig:
    """Validate one ``backend/virtio_disk/<frontend>/<devid>`` directory."""
    for key, value in values.items():
        if len(value) > MAX_VALUE or "\0" in value:
            raise ConfigError(f"value of {key!r} is malformed")
    if not 0 < frontend_id < DOMID_FIRST_RESERVED:
        raise ConfigError(f"frontend id {frontend_id} is not a guest domain")
    if "frontend-id" in values and _int(values, "frontend-id") != frontend_id:
        raise ConfigError("frontend-id does not match the directory it is in")
    image = values.get("params", "").strip()
    if not image:
        raise ConfigError("missing key 'params' (the image path)")
    if not os.path.isabs(image):
        raise ConfigError(f"path {image[:80]!r} is not absolute")
    mode = values.get("mode", "r").strip()
    if mode not in ("r", "w", "w!"):
        raise ConfigError(f"mode={mode[:10]!r} is neither r nor w")
    base = _int(values, "base")
    if (
        not base >= GUEST_VIRTIO_MMIO_BASE
        or base + WINDOW_SIZE > GUEST_VIRTIO_MMIO_BASE + GUEST_VIRTIO_MMIO_SIZE
        or base % WINDOW_SIZE
    ):
        raise ConfigError(f"base={base:#x} is not a virtio-mmio window of the guest")
    irq = _int(values, "irq")
    if not GUEST_VIRTIO_MMIO_SPI_FIRST <= irq <= GUEST_VIRTIO_MMIO_SPI_LAST:
        raise ConfigError(f"irq={irq} is not a virtio-mmio SPI (33-43)")
    return DiskConfig(frontend_id, devid, image, "w" not in mode, base, irq)


def parse_device_description(text: str) -> tuple[str, str]:
    """(device, its source) from a ``*.pyvirtio`` file: ``key = value`` lines, ``#`` comments;
    ``device`` is one of :data:`DEVICES`, ``source`` an absolute path (the device's default
    when absent)."""
    if len(text) > MAX_VALUE:
        raise ConfigError("device description longer than 4 KiB")
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in ("device", "source") or key in values:
            raise ConfigError(f"device description line {number}: {line[:60]!r}")
        values[key] = value
    device = values.get("device", "")
    if device not in DEVICES:
        raise ConfigError(f"device {device[:20]!r} is not one of {sorted(DEVICES)}")
    source = values.get("source") or DEVICES[device]
    if not os.path.isabs(source):
        raise ConfigError(f"source {source[:80]!r} is not absolute")
    return device, source
