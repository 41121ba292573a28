"""The host's side of simulated peripherals: commands of their own, in words.

A GPIO or I2C model answers commands such as ``set 3 1`` or ``0x50 read 0 4``
(``devices/gpio.py``, ``devices/i2c.py``): the daemons carry them over their control socket as
``{"execute": "peripheral", "arguments": {"command": "set 3 1"}}`` (``management/``), and
``pyvirtio ctl --socket PATH peripheral set 3 1`` sends one by hand.
"""

from __future__ import annotations


class ControlError(Exception):
    """A command that cannot be carried out (the daemon answers with an error)."""


def parse_int(text: str, what: str, low: int, high: int) -> int:
    """An integer (decimal, or 0x.. hex) in ``low..high``; ControlError otherwise."""
    try:
        value = int(text, 0)
    except ValueError:
        raise ControlError(f"{what} {text!r} is not a number") from None
    if not low <= value <= high:
        raise ControlError(f"{what} {value} is not in {low}..{high}")
    return value
