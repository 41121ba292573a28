"""The seccomp filter (``--seccomp``): what it refuses, what it lets through, on every thread;
and a daemon serving under it (I/O, a new in-flight area, a reconnection, the control socket,
metrics, a clean stop)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.vhost_user import VhostUserDriver
from pyvirtio.spec.ids import DeviceId
from pyvirtio.storage.io_uring import available

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import errno, json, mmap, os, socket, sys, threading
sys.path.insert(0, {src!r})
from pyvirtio.syscall_filter import install
from pyvirtio.storage.io_uring import Ring

results = {{}}

def attempt(name, call):
    try:
        call()
        results[name] = "allowed"
    except OSError as exc:
        results[name] = errno.errorcode.get(exc.errno, str(exc.errno))

go = threading.Event()
def early_thread():  # started before the filter: TSYNC must cover it
    go.wait()
    attempt("write_open_in_early_thread", lambda: os.open({path!r} + ".early", os.O_WRONLY | os.O_CREAT, 0o600))
early = threading.Thread(target=early_thread)
early.start()

install(network={network}, io_uring={io_uring})

go.set()
early.join()
attempt("write_open", lambda: os.open({path!r}, os.O_WRONLY | os.O_CREAT, 0o600))
attempt("read_open", lambda: os.close(os.open("/etc/hostname", os.O_RDONLY)))
attempt("unlink", lambda: os.unlink({existing!r}))
attempt("fork", lambda: os.waitpid(os.fork() or os._exit(0), 0))
attempt("exec", lambda: os.execv("/bin/true", ["true"]))
attempt("inet_socket", lambda: socket.socket(socket.AF_INET).close())
attempt("unix_socket", lambda: socket.socket(socket.AF_UNIX).close())
attempt("memfd", lambda: os.close(os.memfd_create("probe")))
attempt("exec_mapping", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC).close())
attempt("mapping", lambda: mmap.mmap(-1, 4096).close())
attempt("setuid", lambda: os.setuid(0))
attempt("io_uring", lambda: Ring(2).close())
t = threading.Thread(target=lambda: results.__setitem__("thread", "ran"))
t.start()
t.join()
print(json.dumps(results))
"""


def _probe(tmp_path: Path, *, network: bool, io_uring: bool = False) -> dict[str, str]:
    existing = tmp_path / "keep"
    existing.write_text("x")
    code = PROBE.format(
        src=str(ROOT / "src"),
        path=str(tmp_path / "new"),
        existing=str(existing),
        network=network,
        io_uring=io_uring,
    )
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    results: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    assert existing.exists()
    return results


def test_the_filter_refuses_what_serving_never_does(tmp_path: Path) -> None:
    r = _probe(tmp_path, network=False)
    for refused in (
        "write_open",
        "write_open_in_early_thread",
        "read_open",
        "unlink",
        "fork",
        "exec",
        "inet_socket",
        "exec_mapping",
        "setuid",
        "io_uring",
    ):
        assert r[refused] == "EPERM", (refused, r)
    for allowed in ("unix_socket", "memfd", "mapping"):
        assert r[allowed] == "allowed", (allowed, r)
    assert r["thread"] == "ran"  # clone3 refused with ENOSYS, the C library falls back to clone
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.early").exists()


def test_an_nbd_server_over_tcp_needs_inet_sockets_and_read_only_opens(tmp_path: Path) -> None:
    r = _probe(tmp_path, network=True)
    assert (r["inet_socket"], r["read_open"]) == ("allowed", "allowed")
    assert (r["write_open"], r["unlink"], r["fork"], r["exec"]) == ("EPERM",) * 4


@pytest.mark.skipif(available() is not None, reason=f"no io_uring here: {available()}")
def test_io_uring_system_calls_only_for_the_io_uring_engine(tmp_path: Path) -> None:
    r = _probe(tmp_path, network=False, io_uring=True)
    assert r["io_uring"] == "allowed"
    assert (r["write_open"], r["unlink"], r["fork"], r["exec"]) == ("EPERM",) * 4


def _ctl(ctl: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio", "ctl", "--socket", str(ctl), *words],
        capture_output=True,
        text=True,
        timeout=20,
    )


@pytest.mark.parametrize("engine", ["auto", "io_uring"])
def test_a_daemon_serves_under_the_filter(tmp_path: Path, engine: str) -> None:
    """``auto`` is sync under the filter; ``io_uring`` has its system calls let through."""
    if engine == "io_uring" and available() is not None:
        pytest.skip(f"no io_uring here: {available()}")
    image, sock, ctl = tmp_path / "d.img", tmp_path / "vu.sock", tmp_path / "ctl.sock"
    image.write_bytes(bytes(16 << 20))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "pyvirtio", "blk", "--socket-path", str(sock), "--seccomp"),
            *("--image", str(image), "--control-socket", str(ctl), "--metrics-port", str(port)),
            *("--num-queues", "2", "--io-engine", engine, "-v"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    try:
        deadline = time.monotonic() + 20
        while not ctl.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        # The control socket is made before the filter is loaded: wait for the filter.
        status = ""
        while "Seccomp:\t2" not in status and time.monotonic() < deadline:
            time.sleep(0.05)
            status = Path(f"/proc/{proc.pid}/status").read_text()
        assert "Seccomp:\t2" in status  # filter mode, on the main thread...
        for task in Path(f"/proc/{proc.pid}/task").iterdir():  # ...and on every other one
            assert "Seccomp:\t2" in (task / "status").read_text()
        for _ in range(2):  # a second front-end gets a new in-flight area (memfd_create)
            transport = VhostUserDriver(str(sock), DeviceId.BLOCK)
            drv = BlkDriver(transport, wait=transport.wait_interrupt)
            data = os.urandom(256 * 1024)
            drv.write(64, data, queue=1)
            drv.flush()
            assert drv.read(64, len(data), queue=0) == data
            transport.close()
        assert json.loads(_ctl(ctl, "query").stdout) is not None
        assert _ctl(ctl, "resize", "32m").returncode == 0 and image.stat().st_size == 32 << 20
        assert "pyvirtio_requests" in _ctl(ctl, "metrics").stdout
        assert _ctl(ctl, "stop").returncode == 0
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in err, err
    assert "seccomp filter loaded" in err
    expected = {"auto": "I/O engine RawImage", "io_uring": "I/O engine UringImage"}[engine]
    assert expected in err
    assert "no io_uring in this thread" not in err
