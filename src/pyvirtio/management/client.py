"""A client of the control socket: what ``pyvirtio ctl`` and tests use."""

from __future__ import annotations

import json
from typing import Any

from pyvirtio.unix_socket import SocketError, connected_socket


class ControlClientError(Exception):
    """The daemon answered with an error (``kind`` is its QMP error class), or did not answer."""

    def __init__(self, desc: str, kind: str = "") -> None:
        super().__init__(f"{kind}: {desc}" if kind else desc)
        self.kind = kind
        self.desc = desc


class ControlClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        try:
            self.sock = connected_socket(path, timeout)
        except SocketError as exc:
            raise ControlClientError(str(exc)) from None
        self._buffer = b""

    def call(self, execute: str, **arguments: Any) -> Any:
        """Run one command; its ``return`` value, or ControlClientError."""
        request: dict[str, Any] = {"execute": execute}
        if arguments:
            request["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            while b"\n" not in self._buffer:
                data = self.sock.recv(65536)
                if not data:
                    raise ControlClientError("the daemon closed the connection")
                self._buffer += data
        except OSError as exc:
            raise ControlClientError(str(exc)) from None
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        error = reply.get("error")
        if error is not None:
            raise ControlClientError(error.get("desc", ""), error.get("class", ""))
        return reply.get("return")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
