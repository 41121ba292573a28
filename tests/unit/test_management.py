"""The control socket's commands and the metrics, against a device driven in-process."""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pyvirtio.management.commands import CommandError, Commands, common_commands
from pyvirtio.management.metrics import metrics_text
from pyvirtio.management.server import ControlServer
from pyvirtio.management.systemd import notify

from .conftest import Blk


def _commands(blk: Blk, stopped: list[bool]) -> Commands:
    handlers = common_commands(lambda: [blk.device], lambda: stopped.append(True))

    def fails(_: object) -> object:
        raise CommandError("no", "DeviceNotActive")

    handlers["fails"] = fails
    return Commands(handlers)


def _run(commands: Commands, line: str) -> dict[str, object]:
    reply = commands.handle(line.encode())
    assert reply.endswith(b"\n")
    result: dict[str, object] = json.loads(reply)
    return result


def test_query_describes_the_device_and_its_queues(blk: Blk) -> None:
    blk.driver.write(0, b"a" * 4096)
    reply = _run(_commands(blk, []), '{"execute": "query"}')
    (device,) = reply["return"]["devices"]  # type: ignore[index]
    assert device["type"] == "BlkDevice" and device["device_id"] == 2
    assert device["status"] & 4  # DRIVER_OK
    queue = device["queues"][0]
    assert queue["active"] and queue["requests"] == 1 and queue["in_flight"] == 0
    # Both sides' ring indices: one chain made available, taken, used and signalled.
    assert queue["avail_idx"] == queue["last_avail_idx"] == 1
    assert queue["used_idx"] == queue["published_used_idx"] == queue["signalled_used_idx"] == 1
    assert isinstance(queue["used_event"], int)


def test_bad_commands_get_qmp_errors(blk: Blk) -> None:
    commands = _commands(blk, [])
    for line, kind in (
        ("not json", "GenericError"),
        ("[1, 2]", "GenericError"),
        ('{"execute": "nope"}', "CommandNotFound"),
        ('{"execute": "query", "arguments": 3}', "GenericError"),
        ('{"execute": "fails"}', "DeviceNotActive"),
        ("x" * 70000, "GenericError"),
    ):
        reply = _run(commands, line)
        assert reply["error"]["class"] == kind, (line[:20], reply)  # type: ignore[index]


def test_stop_calls_the_daemon_back(blk: Blk) -> None:
    stopped: list[bool] = []
    assert _run(_commands(blk, stopped), '{"execute": "stop"}') == {"return": {}}
    assert stopped == [True]


def test_metrics_in_prometheus_text_format(blk: Blk) -> None:
    blk.driver.write(0, b"b" * 8192)
    blk.driver.request(99)  # unsupported: an error of its kind
    families = {f.name: f for f in text_string_to_metric_families(metrics_text([blk.device]))}
    requests = families["pyvirtio_requests"].samples
    assert any(s.labels["queue"] == "0" and s.value == 2 for s in requests)
    errors = families["pyvirtio_errors"].samples
    assert [(s.labels["kind"], s.value) for s in errors] == [("unsupp", 1)]
    latency = families["pyvirtio_request_seconds"].samples
    count = next(s for s in latency if s.name.endswith("_count") and s.labels["queue"] == "0")
    assert count.value == 2
    written = [s for s in families["pyvirtio_bytes"].samples if s.labels["direction"] == "read"]
    assert written[0].value >= 8192


def test_control_server_over_a_socket(blk: Blk) -> None:
    path = str(Path(tempfile.mkdtemp()) / "ctl.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    server = ControlServer(_commands(blk, []), listener)
    try:
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.connect(path)
        stalled.sendall(b'{"execute": ')  # holds its own thread only
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(path)
        client.sendall(b'{"execute": "query"}\n{"execute": "metrics"}\n')
        data = b""
        while data.count(b"\n") < 2:
            data += client.recv(65536)
        first, second = data.split(b"\n")[:2]
        assert "devices" in json.loads(first)["return"]
        assert "pyvirtio_requests" in json.loads(second)["return"]["text"]
        client.close()
        stalled.close()
    finally:
        server.close()
        listener.close()


def test_sd_notify(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify("READY=1")
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("READY=1")
    assert sock.recv(64) == b"READY=1"
    sock.close()
