"""Fixtures for unit tests: a virtio-blk device on a temporary image, driven in-process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlkDevice
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.storage.raw import RawImage, open_image

IMAGE_SIZE = 8 << 20


@dataclass
class Blk:
    path: Path
    image: RawImage
    device: BlkDevice
    machine: InProcessMachine
    driver: BlkDriver


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


@pytest.fixture
def io_engine() -> str:
    """The I/O engine of the images make_blk opens (test_blk.py runs with each)."""
    return "sync"


@pytest.fixture
def make_blk(image_path: Path, io_engine: str) -> Iterator[Callable[..., Blk]]:
    made: list[Blk] = []

    def make(
        *,
        read_only: bool = False,
        direct: bool = False,
        legacy: bool = False,
        threaded: bool = False,
        driver_kw: dict[str, object] | None = None,
        **device_kw: object,
    ) -> Blk:
        image = open_image(str(image_path), read_only=read_only, direct=direct, engine=io_engine)
        device = BlkDevice(image, **device_kw)  # type: ignore[arg-type]
        machine = InProcessMachine(device, legacy=legacy, threaded=threaded)
        wait = machine.wait_interrupt if threaded else None
        driver = BlkDriver(machine.driver(), wait=wait, **(driver_kw or {}))  # type: ignore[arg-type]
        blk = Blk(image_path, image, device, machine, driver)
        made.append(blk)
        return blk

    yield make
    for blk in made:
        blk.machine.close()
        blk.image.close()


@pytest.fixture
def blk(make_blk: Callable[..., Blk]) -> Blk:
    return make_blk()
