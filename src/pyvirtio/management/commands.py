"""The control socket's commands, sans-I/O: a JSON line in, a JSON line out.

The shape is QMP's (QEMU's machine protocol), so that tools and people who know QEMU know it:
``{"execute": "query"}`` or ``{"execute": "resize", "arguments": {"size": 1073741824}}`` in,
``{"return": {...}}`` or ``{"error": {"class": "...", "desc": "..."}}`` out. Every daemon has
``query``, ``metrics`` and ``stop``; a device adds its own (virtio-blk: ``resize`` and
``set-read-only``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pyvirtio.device import VirtioDevice
from pyvirtio.management.metrics import metrics_text

log = logging.getLogger(__name__)

#: Longest command line accepted.
MAX_LINE = 64 * 1024

Handler = Callable[[Mapping[str, Any]], object]


class CommandError(Exception):
    """A command that cannot be carried out; ``kind`` is QMP's error class."""

    def __init__(self, desc: str, kind: str = "GenericError") -> None:
        super().__init__(desc)
        self.kind = kind


class Commands:
    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers = dict(handlers)

    def handle(self, line: bytes) -> bytes:
        """One command line in, one reply line out (never raises for what the line says)."""
        try:
            reply: dict[str, object] = {"return": self._run(line)}
        except CommandError as exc:
            reply = {"error": {"class": exc.kind, "desc": str(exc)}}
        return json.dumps(reply).encode() + b"\n"

    def _run(self, line: bytes) -> object:
        if len(line) > MAX_LINE:
            raise CommandError(f"command longer than {MAX_LINE} bytes")
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CommandError(f"not JSON: {exc}") from None
        if not isinstance(request, dict) or not isinstance(request.get("execute"), str):
            raise CommandError('a command is {"execute": NAME, "arguments": {...}}')
        arguments = request.get("arguments", {})
        if not isinstance(arguments, dict):
            raise CommandError("arguments must be an object")
        handler = self.handlers.get(request["execute"])
        if handler is None:
            raise CommandError(
                f"no command {request['execute']!r} (there are {sorted(self.handlers)})",
                "CommandNotFound",
            )
        return handler(arguments)


def describe(device: VirtioDevice) -> dict[str, object]:
    """What ``query`` says of a device: its type, features, status and queues."""
    return {
        "type": type(device).__name__,
        "device_id": int(device.device_id),
        "status": int(device.status),
        "needs_reset": device.broken,
        "offered_features": f"{device.offered_features:#x}",
        "driver_features": f"{device.driver_features:#x}",
        "config_generation": device.config_generation,
        "queues": [
            {
                "index": queue.index,
                "size": queue.size,
                "active": queue.active,
                **queue.ring_indices(),
                **stats.snapshot(),
            }
            for queue, stats in zip(device.queues, device.stats, strict=True)
        ],
    }


def peripheral_command(control: Callable[[list[str]], str]) -> Handler:
    """``peripheral``: one command of a simulated peripheral's own (``devices/control.py``),
    ``{"execute": "peripheral", "arguments": {"command": "set 3 1"}}``, answered with
    ``{"reply": ...}``."""
    from pyvirtio.devices.control import ControlError

    def run(arguments: Mapping[str, Any]) -> object:
        command = arguments.get("command")
        if not isinstance(command, str) or not command.split():
            raise CommandError('"command" must be a peripheral command such as "get 3"')
        try:
            return {"reply": control(command.split())}
        except ControlError as exc:
            raise CommandError(str(exc), "PeripheralError") from None
        except Exception:  # a model's bug: the peripheral and the daemon go on
            log.exception("peripheral command %r failed", command)
            raise CommandError("internal error (see the daemon's log)") from None

    return run


def common_commands(
    devices: Callable[[], list[VirtioDevice]], stop: Callable[[], None]
) -> dict[str, Handler]:
    """``query``, ``metrics`` and ``stop`` for the devices ``devices()`` gives now (a
    vhost-user daemon has one while a front-end is connected, none otherwise)."""

    def query(_: Mapping[str, Any]) -> object:
        return {"devices": [describe(d) for d in devices()]}

    def metrics(_: Mapping[str, Any]) -> object:
        return {"text": metrics_text(devices())}

    def stop_daemon(_: Mapping[str, Any]) -> object:
        stop()
        return {}

    return {"query": query, "metrics": metrics, "stop": stop_daemon}
