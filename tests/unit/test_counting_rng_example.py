"""docs/devices.md's worked example: its test through the in-process driver, and the docs
showing the example's code as it is."""

from __future__ import annotations

import re
from pathlib import Path

from examples.counting_rng import CountingRng

from pyvirtio.driver.rng import RngDriver
from pyvirtio.shims.inprocess import InProcessMachine

ROOT = Path(__file__).resolve().parents[2]


def test_the_guest_reads_the_count() -> None:
    with InProcessMachine(CountingRng(start=250), memory_size=1 << 20) as machine:
        rng = RngDriver(machine.driver())
        assert rng.read(10) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
        assert rng.read(3) == bytes([4, 5, 6])


def test_a_reset_starts_the_count_again() -> None:
    with InProcessMachine(CountingRng(start=7), memory_size=1 << 20) as machine:
        rng = RngDriver(machine.driver())
        assert rng.read(4) == bytes([7, 8, 9, 10])
        machine.driver().reset()
        assert RngDriver(machine.driver()).read(2) == bytes([7, 8])


def test_docs_show_the_example_as_it_is() -> None:
    docs = (ROOT / "docs" / "devices.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", docs, re.S)
    source = (ROOT / "examples" / "counting_rng.py").read_text()
    assert any(block.strip() in source for block in blocks if "class CountingRng" in block)
    test = Path(__file__).read_text()
    assert any(block.strip() in test for block in blocks if "def test_the_guest" in block)
